//! Embedding roundhouse: a Rust program that runs workers under the supervisor library and
//! reacts to them the way a Node.js `cluster` primary does with
//! `cluster.on('fork' | 'online' | 'exit' | 'message')`.
//!
//! ```text
//! cargo build --bin hello-worker
//! cargo run --example embed -- --workers 2 target/debug/hello-worker
//! ```
//!
//! It prints one line per event on stdout (`fork`, `online`, `exit`, `message`), greets every
//! worker that comes online with `{"ping": ...}` (hello-worker answers with a pong, which comes
//! back as a `message` event), answers any worker message carrying a `ping` the same way, and
//! stops gracefully on SIGTERM or SIGINT (a second one stops at once) — or by itself, exit
//! status 1, once workers have crashed more than `--max-crashes` times: the primary restarts
//! crashed workers with backoff on its own; giving up is this program's policy.
//!
//! The supervisor's own log (listeners, worker states) goes to stderr through `tracing`
//! (`RUST_LOG` filters, default `info`).

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
use roundhouse_supervisor::{ApiClient, Builder, Event, ExitInfo, Target};
use serde_json::json;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::broadcast::error::RecvError;

#[derive(Parser, Debug)]
#[command(about = "Run workers under roundhouse and react to their events")]
struct Args {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:8000")]
    listen: SocketAddr,
    /// Number of workers.
    #[arg(long, default_value_t = 2)]
    workers: u32,
    /// Control socket, for `roundhouse status|reload|scale|send|stop --control PATH`.
    #[arg(long)]
    control: Option<PathBuf>,
    /// Stop (exit status 1) once workers have crashed more than this many times.
    #[arg(long, default_value_t = 5)]
    max_crashes: u32,
    /// The worker command (default: `$ROUNDHOUSE_WORKER`, else `hello-worker` from `PATH`)
    /// and its arguments.
    #[arg(trailing_var_arg = true, value_name = "WORKER")]
    command: Vec<OsString>,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<ExitCode> {
    let args = Args::parse();
    // The supervisor's logging: off the owner loop, lossy and counted, never a panic or a
    // stall on a full or unread stderr (`roundhouse-log`). Flushed, bounded, at return.
    let _log = roundhouse_log::init("embed");

    let mut command = args.command.into_iter();
    let program = command
        .next()
        .or_else(|| std::env::var_os("ROUNDHOUSE_WORKER"))
        .unwrap_or_else(|| "hello-worker".into());
    let mut builder = Builder::new(program)
        .args(command)
        .listen(args.listen)
        .workers(args.workers);
    if let Some(path) = args.control {
        builder = builder.control(path);
    }

    // Signal handlers first, so a signal that comes early never finds the default action.
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let handle = builder.start().context("could not start the supervisor")?;
    let mut events = handle.subscribe();
    let api = handle.api();
    let stats = api.stats().await?;
    println!("listening on {}", stats.listeners.join(", "));

    let done = handle.wait();
    tokio::pin!(done);
    let mut stopping = false;
    let mut crashes = 0u32;
    let mut gave_up = false;
    let mut events_open = true;
    loop {
        tokio::select! {
            result = &mut done => {
                result?;
                // The last exits may still be queued behind the end of the supervisor.
                while let Ok(event) = events.try_recv() {
                    on_event(&api, event, stopping);
                }
                println!("stopped");
                return Ok(if gave_up { ExitCode::FAILURE } else { ExitCode::SUCCESS });
            }
            _ = term.recv() => stop(&api, &mut stopping),
            _ = int.recv() => stop(&api, &mut stopping),
            event = events.recv(), if events_open => match event {
                Ok(event) => {
                    if on_event(&api, event, stopping) {
                        crashes += 1;
                        if crashes > args.max_crashes && !stopping {
                            println!("{crashes} crashes: giving up");
                            gave_up = true;
                            stop(&api, &mut stopping);
                        }
                    }
                }
                Err(RecvError::Lagged(n)) => println!("missed {n} events"),
                // The supervisor is gone; `done` resolves next.
                Err(RecvError::Closed) => events_open = false,
            },
        }
    }
}

/// Prints one event and reacts to it; returns true if it was a crash.
fn on_event(api: &ApiClient, event: Event, stopping: bool) -> bool {
    match event {
        Event::Fork { id, pid } => println!("fork worker={id} pid={pid}"),
        Event::Online { id, pid } => {
            println!("online worker={id} pid={pid}");
            send(
                api,
                Target::Worker(id),
                json!({ "ping": format!("hello worker {id}") }),
            );
        }
        Event::Exit { id, pid, status } => {
            println!("exit worker={id} pid={pid} status={status}");
            // Exit code 0 is a worker that drained (reload, scale down, stop); anything else
            // while we are not stopping is a crash, which the primary answers with a restart.
            return !stopping && status != ExitInfo::Code(0);
        }
        Event::Message { from, message } => {
            println!("message worker={from} {message}");
            if let Some(ping) = message.get("ping") {
                send(api, Target::Worker(from), json!({ "pong": ping }));
            }
        }
    }
    false
}

/// Sends without waiting: the event loop must keep draining events.
fn send(api: &ApiClient, to: Target, message: serde_json::Value) {
    let api = api.clone();
    tokio::spawn(async move {
        if let Err(e) = api.send(to, message).await {
            eprintln!("could not send to {to:?}: {e}");
        }
    });
}

/// First call: graceful stop (drain within the grace period). Second call: stop at once.
fn stop(api: &ApiClient, stopping: &mut bool) {
    println!(
        "{}",
        if *stopping {
            "stopping now"
        } else {
            "stopping"
        }
    );
    *stopping = true;
    let api = api.clone();
    tokio::spawn(async move {
        let _ = api.stop().await;
    });
}
