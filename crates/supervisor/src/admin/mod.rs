//! The admin HTTP endpoint (`--admin ADDR`).
//!
//! | route | method | answer |
//! |---|---|---|
//! | `/stats` | `GET`, `HEAD` | `200` the SPEC `/stats` JSON document ([`StatsSnapshot`]) |
//! | `/stats/reset` | `POST` | `200 reset`: zeroes the slots' counters (a benchmark calls it after warm-up) |
//! | `/metrics` | `GET`, `HEAD` | `200` the same figures in Prometheus text format 0.0.4 |
//! | `/healthz` | `GET`, `HEAD` | `200 ok` while at least one worker is `online`, else `503` |
//!
//! Any other path is `404`; a known path with another method is `405` with an `Allow` header.
//! When the owner task is gone (the primary is stopping) every route answers `503`.
//!
//! Why it cannot slow the accept path: this server runs in its own tasks and only ever sends the
//! owner a [`Request`](crate::api::Request) through [`ApiClient`] and waits for a snapshot; it
//! holds no state of its own and no lock the owner takes. It is also bounded: at most
//! [`MAX_CONNECTIONS`] connections at once (further clients wait in the listen backlog), request
//! heads larger than [`MAX_HEAD_BYTES`] are refused by hyper, and a client that does not send
//! its head within [`HEAD_TIMEOUT`] is dropped.
//!
//! `/metrics` is produced by the `prometheus-client` crate from a fresh snapshot per scrape
//! (a new `Registry` each time: the owner's counters are the source of truth, and slots come and
//! go with scaling). Names, all prefixed `roundhouse_`:
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `roundhouse_policy_info` | gauge (info, always 1) | `policy` |
//! | `roundhouse_uptime_seconds` | gauge | |
//! | `roundhouse_workers` | gauge (number of slots) | |
//! | `roundhouse_pid` | gauge (the primary's process id) | |
//! | `roundhouse_worker_state` | gauge (1 for the current state, 0 for the others) | `worker`, `state` |
//! | `roundhouse_worker_pid` | gauge (only for slots with a process) | `worker` |
//! | `roundhouse_worker_connections_total` | counter | `worker` |
//! | `roundhouse_worker_connections_active` | gauge | `worker` |
//! | `roundhouse_worker_requests_total` | counter | `worker` |
//! | `roundhouse_worker_connections_lost_total` | counter | `worker` |
//! | `roundhouse_worker_restarts_total` | counter | `worker` |
//! | `roundhouse_worker_rss_bytes` | gauge | `worker` |
//! | `roundhouse_connections_total`, `roundhouse_requests_total`, `roundhouse_connections_lost_total` | counter | |
//! | `roundhouse_fairness_jain`, `roundhouse_fairness_max_min_ratio`, `roundhouse_fairness_cv` | gauge | |
//!
//! Within a family, samples are sorted by slot id (then state), so every scrape lists the same
//! lines in the same order.
//!
//! Counters drop to zero after `POST /stats/reset`; Prometheus treats that as a counter reset.

#![forbid(unsafe_code)]

use std::convert::Infallible;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::encoding::prometheus_text;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::api::{ApiClient, ApiError};
use crate::stats::{StatsSnapshot, WorkerState};

/// Connections served at once; more wait in the listen backlog.
pub const MAX_CONNECTIONS: usize = 256;
/// Largest request head (request line + headers) accepted.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Time a client has to send a complete request head.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

type Body = Full<Bytes>;

/// Serves the admin endpoint on `listener` until the task is dropped. Never returns on its own:
/// accept errors (such as running out of file descriptors) are logged and retried after a
/// short pause rather than spun on.
pub async fn serve_admin(listener: TcpListener, api: ApiClient) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        // Hold a slot before accepting, so a flood waits in the backlog, not in our memory.
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return; // the semaphore is never closed; this is unreachable
        };
        let (stream, peer) = match listener.accept().await {
            Ok(conn) => conn,
            Err(err) => {
                tracing::warn!(error = %err, "admin: could not accept a connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let api = api.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let api = api.clone();
                async move { Ok::<_, Infallible>(route(req, &api).await) }
            });
            let result = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEAD_TIMEOUT)
                .max_buf_size(MAX_HEAD_BYTES)
                .serve_connection(TokioIo::new(stream), service)
                .await;
            if let Err(err) = result {
                tracing::debug!(client.addr = %peer, error = %err, "admin: connection ended with an error");
            }
            drop(permit);
        });
    }
}

async fn route(req: hyper::Request<Incoming>, api: &ApiClient) -> Response<Body> {
    let read = matches!(*req.method(), Method::GET | Method::HEAD);
    match req.uri().path() {
        "/stats" if read => match api.stats().await {
            Ok(snapshot) => json_response(&snapshot),
            Err(err) => unavailable(&err),
        },
        "/stats/reset" if req.method() == Method::POST => match api.reset_stats().await {
            Ok(()) => text(StatusCode::OK, "reset\n"),
            Err(err) => unavailable(&err),
        },
        "/metrics" if read => match api.stats().await {
            Ok(snapshot) => {
                let mut response = text(StatusCode::OK, render_metrics(&snapshot));
                response.headers_mut().insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static(prometheus_text::CONTENT_TYPE),
                );
                response
            }
            Err(err) => unavailable(&err),
        },
        "/healthz" if read => match api.stats().await {
            Ok(snapshot) if snapshot.any_online() => text(StatusCode::OK, "ok\n"),
            Ok(_) => text(StatusCode::SERVICE_UNAVAILABLE, "no worker online\n"),
            Err(err) => unavailable(&err),
        },
        "/stats" | "/metrics" | "/healthz" => method_not_allowed("GET, HEAD"),
        "/stats/reset" => method_not_allowed("POST"),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

fn json_response(snapshot: &StatsSnapshot) -> Response<Body> {
    match serde_json::to_vec(snapshot) {
        Ok(mut body) => {
            body.push(b'\n');
            let mut response = text(StatusCode::OK, body);
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            response
        }
        // Cannot happen for these plain structs; answer rather than panic all the same.
        Err(err) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("could not encode stats: {err}\n"),
        ),
    }
}

fn method_not_allowed(allow: &'static str) -> Response<Body> {
    let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
    response
        .headers_mut()
        .insert(ALLOW, HeaderValue::from_static(allow));
    response
}

fn unavailable(err: &ApiError) -> Response<Body> {
    text(StatusCode::SERVICE_UNAVAILABLE, format!("{err}\n"))
}

type Labels = Vec<(&'static str, String)>;

fn worker_label(id: u32) -> Labels {
    vec![("worker", id.to_string())]
}

/// Renders `snapshot` in Prometheus text format 0.0.4 (content type
/// [`prometheus_text::CONTENT_TYPE`]). The metric names are listed in the module docs.
pub fn render_metrics(snapshot: &StatsSnapshot) -> String {
    let mut registry = Registry::with_prefix("roundhouse");

    registry.register(
        "policy",
        "The dispatch policy",
        Info::new(vec![("policy", snapshot.policy.clone())]),
    );
    let uptime = Gauge::<f64, AtomicU64>::default();
    uptime.set(snapshot.uptime_s);
    registry.register_with_unit(
        "uptime",
        "Time since the primary started",
        Unit::Seconds,
        uptime,
    );
    let slots = Gauge::<u64, AtomicU64>::default();
    slots.set(snapshot.workers.len() as u64);
    registry.register("workers", "Number of worker slots", slots);
    let pid = Gauge::<u64, AtomicU64>::default();
    pid.set(u64::from(snapshot.pid));
    registry.register("pid", "Process id of the primary", pid);

    let state = Family::<Labels, Gauge<u64, AtomicU64>>::default();
    let pid = Family::<Labels, Gauge<u64, AtomicU64>>::default();
    let connections = Family::<Labels, Counter>::default();
    let active = Family::<Labels, Gauge<u64, AtomicU64>>::default();
    let requests = Family::<Labels, Counter>::default();
    let lost = Family::<Labels, Counter>::default();
    let restarts = Family::<Labels, Counter>::default();
    let rss = Family::<Labels, Gauge<u64, AtomicU64>>::default();
    for w in &snapshot.workers {
        let label = worker_label(w.id);
        for s in WorkerState::ALL {
            let labels = vec![
                ("worker", w.id.to_string()),
                ("state", s.as_str().to_string()),
            ];
            state.get_or_create(&labels).set(u64::from(w.state == s));
        }
        if let Some(p) = w.pid {
            pid.get_or_create(&label).set(u64::from(p));
        }
        // A figure roundhouse cannot know (`--plain`) is absent, not 0.
        if let Some(n) = w.connections_total {
            connections.get_or_create(&label).inc_by(n);
        }
        if let Some(n) = w.connections_active {
            active.get_or_create(&label).set(n);
        }
        if let Some(n) = w.requests_total {
            requests.get_or_create(&label).inc_by(n);
        }
        lost.get_or_create(&label).inc_by(w.connections_lost);
        restarts.get_or_create(&label).inc_by(w.restarts);
        rss.get_or_create(&label).set(w.rss_bytes);
    }
    registry.register(
        "worker_state",
        "Worker slot state: 1 for the current state, 0 for the others",
        state,
    );
    registry.register("worker_pid", "Process id of the slot's current worker", pid);
    registry.register(
        "worker_connections",
        "Connections handed to the slot (survives restarts)",
        connections,
    );
    registry.register(
        "worker_connections_active",
        "Connections open in the slot now",
        active,
    );
    registry.register("worker_requests", "Requests served by the slot", requests);
    registry.register(
        "worker_connections_lost",
        "Acknowledged connections still open when the slot's worker died",
        lost,
    );
    registry.register(
        "worker_restarts",
        "Times the slot's worker was replaced after an unexpected exit",
        restarts,
    );
    registry.register_with_unit(
        "worker_rss",
        "Resident set size of the slot's current worker",
        Unit::Bytes,
        rss,
    );

    for (name, help, value) in [
        (
            "connections",
            "Connections handed to workers, all slots",
            snapshot.totals.connections_total,
        ),
        (
            "requests",
            "Requests served, all slots",
            snapshot.totals.requests_total,
        ),
        (
            "connections_lost",
            "Acknowledged connections lost with their worker, all slots",
            Some(snapshot.totals.connections_lost),
        ),
    ] {
        let Some(value) = value else { continue };
        let counter = Counter::<u64>::default();
        counter.inc_by(value);
        registry.register(name, help, counter);
    }

    let fairness = snapshot.fairness.iter().flat_map(|f| {
        [
            (
                "fairness_jain",
                "Jain's fairness index over the slots' connections_total (1 is even)",
                f.jain,
            ),
            (
                "fairness_max_min_ratio",
                "Largest over smallest slot connections_total (1 is even)",
                f.max_min_ratio,
            ),
            (
                "fairness_cv",
                "Coefficient of variation of the slots' connections_total (0 is even)",
                f.cv,
            ),
        ]
    });
    // Absent when no slot's connections are known.
    for (name, help, value) in fairness {
        let gauge = Gauge::<f64, AtomicU64>::default();
        gauge.set(value);
        registry.register(name, help, gauge);
    }

    let mut out = String::new();
    // Writing into a String cannot fail; an encoder error would only mean a bug in the
    // crate, and an empty scrape is better than a panic.
    if let Err(err) = prometheus_text::encode(&mut out, &registry) {
        tracing::error!(error = %err, "admin: could not encode metrics");
        out.clear();
    }
    sort_samples(&out)
}

/// The encoder writes a family's samples in the order of its hash map: sort them (by slot id as
/// a number, then by the rest of the line) so that two scrapes list the same lines in the same
/// order and a diff of two scrapes shows only what changed. Families keep their registration
/// order; comment lines (`# HELP`, `# TYPE`) stay where they are.
fn sort_samples(text: &str) -> String {
    fn key(line: &str) -> (&str, u64, &str) {
        let name = line.split(['{', ' ']).next().unwrap_or(line);
        let worker = line
            .split_once("worker=\"")
            .and_then(|(_, rest)| rest.split('"').next())
            .and_then(|id| id.parse().ok())
            .unwrap_or(0);
        (name, worker, line)
    }
    let mut out = String::with_capacity(text.len());
    let mut run: Vec<&str> = Vec::new();
    let flush = |run: &mut Vec<&str>, out: &mut String| {
        run.sort_by(|a, b| key(a).cmp(&key(b)));
        for line in run.drain(..) {
            out.push_str(line);
            out.push('\n');
        }
    };
    for line in text.lines() {
        if line.starts_with('#') {
            flush(&mut run, &mut out);
            out.push_str(line);
            out.push('\n');
        } else {
            run.push(line);
        }
    }
    flush(&mut run, &mut out);
    out
}

#[cfg(test)]
mod tests;
