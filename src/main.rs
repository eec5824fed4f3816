//! `roundhouse`: the supervisor (`run`) and its control client (`status`, `reload`, `scale`,
//! `send`, `stop`). Thin: parsing, logging setup, signals and exit codes; everything else is in
//! `roundhouse-supervisor`.
//!
//! Exit codes: 0 success; 1 runtime failure (bind, command not executable, no primary running,
//! a failed reload); 2 usage error (one line on stderr).

#![forbid(unsafe_code)]

mod client;
mod signals;

use std::ffi::OsString;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use roundhouse_supervisor::{parse_duration, Builder, Policy, RunError, MAX_WORKERS};

#[derive(Parser, Debug)]
#[command(
    name = "roundhouse",
    version,
    about = "Node's cluster for any executable: one primary accepts, workers serve"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Start the primary and N workers running CMD.
    Run(RunArgs),
    /// Show per-worker statistics and fairness.
    Status {
        /// Print the /stats JSON document instead of a table.
        #[arg(long)]
        json: bool,
        #[arg(long, value_name = "PATH")]
        control: Option<PathBuf>,
    },
    /// Replace every worker, one at a time, without dropping a connection.
    Reload {
        #[arg(long, value_name = "PATH")]
        control: Option<PathBuf>,
    },
    /// Set the number of workers.
    Scale {
        #[arg(value_parser = clap::value_parser!(u32).range(1..=MAX_WORKERS as i64))]
        workers: u32,
        #[arg(long, value_name = "PATH")]
        control: Option<PathBuf>,
    },
    /// Send a JSON message to one worker (by id) or to all.
    Send {
        /// Worker id or `all`.
        #[arg(long, value_name = "ID|all")]
        to: String,
        /// The message, a JSON value.
        json: String,
        #[arg(long, value_name = "PATH")]
        control: Option<PathBuf>,
    },
    /// Stop the primary gracefully.
    Stop {
        #[arg(long, value_name = "PATH")]
        control: Option<PathBuf>,
    },
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// TCP address to listen on (`host:port`, `[v6]:port`); repeatable; port 0 picks one.
    #[arg(short = 'l', long = "listen", value_name = "ADDR")]
    listen: Vec<SocketAddr>,
    /// Number of workers (default: available CPUs).
    #[arg(short = 'w', long, value_parser = clap::value_parser!(u32).range(1..=MAX_WORKERS as i64))]
    workers: Option<u32>,
    /// Dispatch policy: rr, least-conn, sticky, none, reuseport, reuseport-rr (default: $ROUNDHOUSE_SCHED_POLICY or rr).
    #[arg(long, value_name = "P")]
    policy: Option<Policy>,
    /// HTTP admin endpoint address (/stats, /metrics, /healthz).
    #[arg(long, value_name = "ADDR")]
    admin: Option<SocketAddr>,
    /// Unix control socket path.
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
    /// Graceful stop/reload deadline per worker.
    #[arg(long, value_name = "DUR", default_value = "30s", value_parser = parse_duration)]
    grace: Duration,
    /// A worker not online by then is killed and counted as a failed start.
    #[arg(long, value_name = "DUR", default_value = "30s", value_parser = parse_duration)]
    ready_timeout: Duration,
    /// An online worker silent this long is killed and replaced (0 = off).
    #[arg(long, value_name = "DUR", default_value = "30s", value_parser = parse_duration)]
    heartbeat_timeout: Duration,
    /// Recycle a worker gracefully after N requests (with jitter).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    max_requests: Option<u64>,
    /// Listen backlog of each listener (capped by the kernel at somaxconn).
    #[arg(long, value_name = "N", default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..))]
    backlog: u32,
    /// Workers are Node.js programs: speak Node's IPC channel and preload the roundhouse shim.
    #[arg(long)]
    node: bool,
    /// Workers speak no channel protocol (gunicorn, uvicorn, any LISTEN_FDS server): online once
    /// started, drained by SIGTERM. Only with --policy none, reuseport or reuseport-rr.
    #[arg(long)]
    plain: bool,
    /// Under --policy sticky: the affinity key, `ip` (the client's address) or `header:NAME`
    /// (the first address in that header of the first request, e.g. header:X-Forwarded-For).
    #[arg(long, value_name = "K")]
    sticky_key: Option<roundhouse_supervisor::StickyKey>,
    /// The worker command and its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    cmd: Vec<OsString>,
}

fn usage_error(msg: impl std::fmt::Display) -> ExitCode {
    // Errors ignored: with stderr full or closed there is no one to tell, and `eprintln!` would
    // panic (exit 101 instead of 2).
    let _ = writeln!(std::io::stderr(), "roundhouse: {msg}");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            // One clear line: clap's first line, without its "error: " prefix.
            let text = e.render().to_string();
            let first = text.lines().next().unwrap_or("invalid usage");
            return usage_error(first.trim_start_matches("error: "));
        }
    };
    let control_or_default =
        |c: Option<PathBuf>| c.unwrap_or_else(roundhouse_supervisor::control::default_control_path);
    let code = match cli.command {
        Command::Run(args) => return run(args),
        Command::Status { json, control } => client::status(&control_or_default(control), json),
        Command::Reload { control } => client::reload(&control_or_default(control)),
        Command::Scale { workers, control } => client::scale(&control_or_default(control), workers),
        Command::Send { to, json, control } => {
            client::send(&control_or_default(control), &to, &json)
        }
        Command::Stop { control } => client::stop(&control_or_default(control)),
    };
    ExitCode::from(code.clamp(0, 255) as u8)
}

/// The log: tracing's text format to stderr, `RUST_LOG` filtering (default `info`), written off
/// the supervisor's threads by `roundhouse-log` so that a full disk or a stderr pipe that is
/// closed or never read costs lines (counted, reported), never a panic or a stalled primary.
/// The guard flushes (bounded) when `run` returns.
fn init_logging() -> roundhouse_log::LogGuard {
    roundhouse_log::init("roundhouse")
}

fn run(args: RunArgs) -> ExitCode {
    let policy = match args.policy {
        Some(p) => p,
        None => match std::env::var("ROUNDHOUSE_SCHED_POLICY") {
            Ok(v) if !v.is_empty() => match v.parse::<Policy>() {
                Ok(p) => p,
                Err(e) => return usage_error(format!("ROUNDHOUSE_SCHED_POLICY: {e}")),
            },
            _ => Policy::RoundRobin,
        },
    };
    let log = init_logging();
    let mut cmd = args.cmd.into_iter();
    let program = cmd.next().expect("clap requires CMD");
    let mut builder = Builder::new(program)
        .args(cmd)
        .policy(policy)
        .grace(args.grace)
        .ready_timeout(args.ready_timeout)
        .heartbeat_timeout(Some(args.heartbeat_timeout).filter(|d| !d.is_zero()))
        .max_requests(args.max_requests)
        .backlog(args.backlog);
    for addr in args.listen {
        builder = builder.listen(addr);
    }
    if let Some(n) = args.workers {
        builder = builder.workers(n);
    }
    if let Some(a) = args.admin {
        builder = builder.admin(a);
    }
    if let Some(c) = args.control {
        builder = builder.control(c);
    }
    if args.node {
        builder = builder.node(true);
    }
    if args.plain {
        builder = builder.plain(true);
    }
    if let Some(k) = args.sticky_key {
        if policy != Policy::Sticky {
            return usage_error(format!(
                "--sticky-key applies to --policy sticky only (the policy is {policy})"
            ));
        }
        builder = builder.sticky_key(k);
    }
    let code = match signals::run(builder) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fatal(e),
    };
    drop(log); // flushed, the fatal line last; bounded if stderr is stuck
    code
}

fn fatal(e: RunError) -> ExitCode {
    let code = match e {
        RunError::Config(_) => 2,
        _ => 1,
    };
    // One line, not through tracing: it must show even with RUST_LOG=off. Through the log's
    // queue all the same, so it follows the lines logged before it and cannot block or panic.
    roundhouse_log::line(&format!("roundhouse: {e}"));
    ExitCode::from(code)
}
