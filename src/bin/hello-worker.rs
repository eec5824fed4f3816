//! `hello-worker`: the example HTTP worker, and the one the tests and the benchmark run.
//!
//! It is deliberately a plain hyper server whose connections come from
//! [`roundhouse_worker::Listener`] instead of a `TcpListener`, so it runs unchanged under every
//! policy (handed connections under `rr`/`least-conn`, its own accept under `none`/`reuseport`).
//!
//! Routes (SPEC): `GET /` → `hello world\n`; `GET /whoami` → `{"worker_id":N,"pid":P}`;
//! `GET /cpu?ms=N` busy-spins N ms of this thread's CPU time (not wall time, so a request costs
//! the same however crowded the cores are); `GET /sleep?ms=N` waits N ms without holding the
//! CPU; anything else is 404. Every response carries `x-worker-id: N`. A message with a `ping`
//! field is answered with `{"pong":<value>,"worker_id":N}` to its sender.
//!
//! One process per core and a current-thread runtime: no work stealing, no cross-thread wakeups,
//! a small resident set; parallelism comes from the number of workers.
//!
//! # Draining
//!
//! When the primary asks for a drain, the accept loop runs until the library reports the accept
//! stream is over (every connection acknowledged before the drain has been taken), then waits
//! for the connections to finish and exits 0.
//!
//! No connection is closed while its client may be sending a request on it. Every response
//! written once the drain began says `Connection: close`, so a busy connection, or a keep-alive
//! connection whose client sends its next request, ends cleanly after that response. A
//! connection that stays silent for [`KEEPALIVE_GRACE`] is then shut down gracefully (closed if
//! idle, `Connection: close` if a request is in progress). Closing idle connections at once, as
//! hyper-util's `GracefulShutdown` does, races every keep-alive client's next request (and a
//! connection handed over just before the drain, whose first request is still in flight, looks
//! idle too): in a reload under load that is a failed request per unlucky connection.

use std::convert::Infallible;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, ALLOW, CONNECTION, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use roundhouse_worker::{is_drained, Conn, Messages, Worker};
use tokio::sync::mpsc;
use tracing::{debug, info, warn, Instrument};

/// After a drain began, how long a connection may stay silent before it is shut down rather
/// than ended by its next response's `Connection: close`.
const KEEPALIVE_GRACE: Duration = Duration::from_secs(1);
/// Longest `/cpu` or `/sleep` a request may ask for.
const MAX_MS: u64 = 60_000;

fn main() -> ExitCode {
    // Our stderr is the primary's: written off the serving thread, lossy and counted, never a
    // panic or a stall when it is full, closed or never read (`roundhouse_worker::log`). The
    // guard flushes, bounded, when `main` returns.
    let _log = roundhouse_worker::log::init("hello-worker");
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "could not start the tokio runtime");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> anyhow::Result<()> {
    let worker = Worker::from_env().context("hello-worker could not start")?;
    let span = tracing::info_span!("worker", worker.id = worker.id());
    serve(worker).instrument(span).await
}

async fn serve(worker: Worker) -> anyhow::Result<()> {
    let mut listener = worker.take_listener().context("listener already taken")?;
    let messages = worker.take_messages().context("messages already taken")?;
    tokio::spawn(answer_messages(worker.clone(), messages).in_current_span());
    worker.ready();
    info!(
        worker.pid = std::process::id(),
        policy = %worker.policy(),
        "hello-worker ready"
    );

    // Every connection task holds a clone; `recv` returns `None` once they are all gone.
    let (live_tx, mut live_rx) = mpsc::channel::<()>(1);
    loop {
        match listener.accept().await {
            Ok((conn, _peer)) => {
                let _ = conn.set_nodelay(true);
                tokio::spawn(serve_conn(conn, worker.clone(), live_tx.clone()).in_current_span());
            }
            Err(e) if is_drained(&e) => break,
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => break,
            Err(e) => {
                // Out of fds and the like under `none`/`reuseport`: back off, do not spin.
                warn!(error = %e, "accept failed; retrying in 50 ms");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    info!("draining: no new connections; waiting for open ones");
    drop(live_tx);
    let _ = live_rx.recv().await;
    worker.flush().await;
    info!("drained; exiting");
    Ok(())
}

async fn serve_conn(conn: Conn, worker: Worker, _live: mpsc::Sender<()>) {
    let svc = {
        let worker = worker.clone();
        hyper::service::service_fn(move |req| {
            let worker = worker.clone();
            async move { Ok::<_, Infallible>(route(&worker, req).await) }
        })
    };
    let http = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .serve_connection(TokioIo::new(conn), svc);
    tokio::pin!(http);

    tokio::select! {
        r = http.as_mut() => return log_end(r),
        _ = worker.draining() => {}
    }
    // Draining: the next response says `Connection: close` and hyper closes after it.
    tokio::select! {
        r = http.as_mut() => return log_end(r),
        _ = tokio::time::sleep(KEEPALIVE_GRACE) => {}
    }
    // Silent that long: close it if idle; a request in progress still finishes.
    http.as_mut().graceful_shutdown();
    log_end(http.await);
}

fn log_end(r: Result<(), hyper::Error>) {
    if let Err(e) = r {
        debug!(error = %e, "connection ended with an error");
    }
}

async fn route(worker: &Worker, req: Request<Incoming>) -> Response<Full<Bytes>> {
    worker.count_request();
    let get = matches!(*req.method(), Method::GET | Method::HEAD);
    let path = req.uri().path();
    let mut resp = match (get, path) {
        (true, "/") => text(StatusCode::OK, "hello world\n".into()),
        (true, "/whoami") => {
            let body = serde_json::json!({ "worker_id": worker.id(), "pid": std::process::id() });
            let mut r = text(StatusCode::OK, format!("{body}\n"));
            r.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            r
        }
        (true, "/cpu") => match millis(req.uri().query()) {
            Ok(ms) => {
                spin_cpu(Duration::from_millis(ms));
                text(StatusCode::OK, format!("spun {ms} ms of cpu\n"))
            }
            Err(msg) => text(StatusCode::BAD_REQUEST, msg),
        },
        (true, "/sleep") => match millis(req.uri().query()) {
            Ok(ms) => {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                text(StatusCode::OK, format!("slept {ms} ms\n"))
            }
            Err(msg) => text(StatusCode::BAD_REQUEST, msg),
        },
        (false, "/" | "/whoami" | "/cpu" | "/sleep") => {
            let mut r = text(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed\n".into(),
            );
            r.headers_mut()
                .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
            r
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
    };
    resp.headers_mut()
        .insert("x-worker-id", HeaderValue::from(worker.id()));
    if worker.is_draining() {
        // Whatever the connection's state, its client must not send another request on it.
        resp.headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// The `ms` query parameter, `0..=MAX_MS`.
fn millis(query: Option<&str>) -> Result<u64, String> {
    let v = query
        .unwrap_or("")
        .split('&')
        .find_map(|kv| kv.strip_prefix("ms="))
        .ok_or_else(|| "missing ms=N\n".to_string())?;
    match v.parse::<u64>() {
        Ok(ms) if ms <= MAX_MS => Ok(ms),
        _ => Err(format!("ms must be an integer 0..={MAX_MS}\n")),
    }
}

/// CPU time consumed by the calling thread.
fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; the call only writes to it.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if r != 0 {
        return Duration::ZERO;
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Burns `d` of this thread's CPU time. On purpose it blocks the (single-threaded) runtime:
/// that is what a CPU-bound request does to a worker.
fn spin_cpu(d: Duration) {
    let start = thread_cpu_time();
    if start == Duration::ZERO && d > Duration::ZERO {
        // No thread CPU clock: fall back to wall time rather than spinning forever.
        let until = std::time::Instant::now() + d;
        while std::time::Instant::now() < until {
            std::hint::spin_loop();
        }
        return;
    }
    while thread_cpu_time() - start < d {
        for _ in 0..1000 {
            std::hint::spin_loop();
        }
    }
}

async fn answer_messages(worker: Worker, mut messages: Messages) {
    while let Some(m) = messages.recv().await {
        match m.value.get("ping") {
            Some(v) => {
                let reply = serde_json::json!({ "pong": v, "worker_id": worker.id() });
                if let Err(e) = worker.send(m.sender(), &reply) {
                    warn!(from = m.from, error = %e, "could not answer a ping");
                }
            }
            None => info!(from = m.from, message = %m.value, "message"),
        }
    }
}
