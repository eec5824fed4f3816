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
mod tests {
    use std::collections::{BTreeMap, HashMap};
    use std::net::SocketAddr;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    use super::*;
    use crate::api::fake;
    use crate::stats::WorkerState;

    struct Reply {
        status: u16,
        headers: HashMap<String, String>,
        body: String,
    }

    async fn start() -> (SocketAddr, fake::Owner) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (api, owner) = fake::spawn(fake::canned());
        tokio::spawn(serve_admin(listener, api));
        (addr, owner)
    }

    /// One raw HTTP/1.1 exchange: writes `head` verbatim and reads until the server closes.
    async fn raw(addr: SocketAddr, request: &[u8]) -> Vec<u8> {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(request).await.unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut out))
            .await
            .expect("server answered in time")
            .unwrap();
        out
    }

    fn parse(raw: &[u8]) -> Reply {
        let text = String::from_utf8(raw.to_vec()).expect("utf-8 response");
        let (head, body) = text.split_once("\r\n\r\n").expect("a complete head");
        let mut lines = head.lines();
        let status_line = lines.next().unwrap();
        let status = status_line.split(' ').nth(1).unwrap().parse().unwrap();
        let headers = lines
            .map(|l| {
                let (k, v) = l.split_once(':').unwrap();
                (k.trim().to_ascii_lowercase(), v.trim().to_string())
            })
            .collect();
        Reply {
            status,
            headers,
            body: body.to_string(),
        }
    }

    async fn http(addr: SocketAddr, method: &str, path: &str) -> Reply {
        let req = format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        parse(&raw(addr, req.as_bytes()).await)
    }

    #[tokio::test]
    async fn stats_is_the_snapshot_document() {
        let (addr, owner) = start().await;
        let r = http(addr, "GET", "/stats").await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.headers["content-type"], "application/json");
        let expected = serde_json::to_string(&*owner.snapshot.lock().unwrap()).unwrap();
        assert_eq!(r.body, expected + "\n");
        let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        let keys: Vec<_> = v.as_object().unwrap().keys().cloned().collect();
        let mut want = vec![
            "fairness",
            "listeners",
            "pid",
            "policy",
            "totals",
            "uptime_s",
            "workers",
        ];
        want.sort();
        assert_eq!(keys, want);
        assert_eq!(v["workers"][2]["pid"], serde_json::Value::Null);
        assert_eq!(v["totals"]["connections_total"], 300);
    }

    #[tokio::test]
    async fn reset_is_post_only() {
        let (addr, owner) = start().await;
        let r = http(addr, "GET", "/stats/reset").await;
        assert_eq!(r.status, 405);
        assert_eq!(r.headers["allow"], "POST");
        assert!(owner.log().is_empty(), "GET must not reset");

        let r = http(addr, "POST", "/stats/reset").await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(owner.log(), ["reset"]);
        let v: serde_json::Value =
            serde_json::from_str(&http(addr, "GET", "/stats").await.body).unwrap();
        assert_eq!(v["totals"]["connections_total"], 0);
        assert_eq!(v["totals"]["requests_total"], 0);
    }

    #[tokio::test]
    async fn healthz_follows_online_workers() {
        let (addr, owner) = start().await;
        let r = http(addr, "GET", "/healthz").await;
        assert_eq!((r.status, r.body.as_str()), (200, "ok\n"));
        owner.set_state(WorkerState::Draining);
        assert_eq!(http(addr, "GET", "/healthz").await.status, 503);
        owner.set_state(WorkerState::Online);
        assert_eq!(http(addr, "GET", "/healthz").await.status, 200);
    }

    #[tokio::test]
    async fn unknown_paths_and_wrong_methods() {
        let (addr, _owner) = start().await;
        for path in ["/", "/nope", "/stats/", "/stats/reset/x", "/metricsx"] {
            assert_eq!(http(addr, "GET", path).await.status, 404, "{path}");
        }
        for path in ["/stats", "/metrics", "/healthz"] {
            let r = http(addr, "POST", path).await;
            assert_eq!(r.status, 405, "{path}");
            assert_eq!(r.headers["allow"], "GET, HEAD", "{path}");
            assert_eq!(http(addr, "DELETE", path).await.status, 405, "{path}");
        }
        // A query string does not change the route.
        assert_eq!(http(addr, "GET", "/stats?pretty=1").await.status, 200);
    }

    #[tokio::test]
    async fn bad_input_is_refused_and_the_server_lives_on() {
        let (addr, _owner) = start().await;
        // Garbage instead of HTTP.
        let out = raw(addr, b"\x00\x01garbage\r\n\r\n").await;
        assert!(out.is_empty() || parse(&out).status == 400);
        // A head far over the limit.
        let big = format!(
            "GET /stats HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
            "a".repeat(MAX_HEAD_BYTES * 4)
        );
        let out = raw(addr, big.as_bytes()).await;
        assert!(
            out.is_empty() || parse(&out).status == 431,
            "{:?}",
            String::from_utf8_lossy(&out)
        );
        // Still serving.
        assert_eq!(http(addr, "GET", "/stats").await.status, 200);
    }

    #[tokio::test]
    async fn owner_gone_is_503() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (api, rx) = crate::api::channel(1);
        drop(rx);
        tokio::spawn(serve_admin(listener, api));
        for (m, p) in [
            ("GET", "/stats"),
            ("GET", "/metrics"),
            ("GET", "/healthz"),
            ("POST", "/stats/reset"),
        ] {
            assert_eq!(http(addr, m, p).await.status, 503, "{m} {p}");
        }
    }

    /// A strict-enough reader of the Prometheus text format 0.0.4: every sample line is
    /// `name{label="value",...} number` or `name number`, and its family has `# HELP` and
    /// `# TYPE` lines before it. Returns `name{labels}` → value.
    fn parse_prometheus(text: &str) -> BTreeMap<String, f64> {
        let valid_name = |s: &str| {
            !s.is_empty()
                && s.chars().enumerate().all(|(i, c)| {
                    c.is_ascii_alphabetic() || c == '_' || c == ':' || (i > 0 && c.is_ascii_digit())
                })
        };
        let mut help = HashMap::new();
        let mut types = HashMap::new();
        let mut samples = BTreeMap::new();
        assert!(text.ends_with('\n'), "text ends with a newline");
        for line in text.lines() {
            if line.is_empty() {
                continue;
            }
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, doc) = rest.split_once(' ').expect("HELP name doc");
                assert!(valid_name(name) && !doc.is_empty(), "{line}");
                assert!(
                    help.insert(name.to_string(), doc.to_string()).is_none(),
                    "dup HELP {name}"
                );
                continue;
            }
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, ty) = rest.split_once(' ').expect("TYPE name type");
                assert!(help.contains_key(name), "TYPE before HELP: {line}");
                assert!(
                    ["counter", "gauge", "histogram", "summary", "untyped"].contains(&ty),
                    "{line}"
                );
                assert!(
                    types.insert(name.to_string(), ty.to_string()).is_none(),
                    "dup TYPE {name}"
                );
                continue;
            }
            assert!(!line.starts_with('#'), "unexpected comment: {line}");
            let name_end = line.find(['{', ' ']).expect("name then labels or value");
            let name = &line[..name_end];
            assert!(valid_name(name), "bad metric name in {line}");
            assert!(types.contains_key(name), "sample without TYPE: {line}");
            let mut rest = &line[name_end..];
            let mut labels = String::new();
            if let Some(inner) = rest.strip_prefix('{') {
                // label="value" pairs; values may hold escaped quotes.
                let mut chars = inner.char_indices();
                let mut end = None;
                let mut in_value = false;
                let mut escaped = false;
                for (i, c) in chars.by_ref() {
                    match (in_value, escaped, c) {
                        (true, true, _) => escaped = false,
                        (true, false, '\\') => escaped = true,
                        (true, false, '"') => in_value = false,
                        (false, _, '"') => in_value = true,
                        (false, _, '}') => {
                            end = Some(i);
                            break;
                        }
                        _ => {}
                    }
                }
                let end = end.unwrap_or_else(|| panic!("unclosed labels: {line}"));
                labels = inner[..end].to_string();
                for pair in labels.split("\",").filter(|p| !p.is_empty()) {
                    let (k, v) = pair.split_once('=').unwrap_or_else(|| panic!("{line}"));
                    assert!(valid_name(k), "bad label name {k} in {line}");
                    assert!(v.starts_with('"'), "unquoted label value in {line}");
                }
                rest = &inner[end + 1..];
            }
            let value = rest
                .strip_prefix(' ')
                .unwrap_or_else(|| panic!("no value: {line}"));
            let value: f64 = value
                .trim()
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {line}"));
            let key = if labels.is_empty() {
                name.to_string()
            } else {
                format!("{name}{{{labels}}}")
            };
            assert!(
                samples.insert(key, value).is_none(),
                "duplicate sample: {line}"
            );
        }
        samples
    }

    #[tokio::test]
    async fn metrics_parse_and_match_the_snapshot() {
        let (addr, owner) = start().await;
        let r = http(addr, "GET", "/metrics").await;
        assert_eq!(r.status, 200);
        assert_eq!(r.headers["content-type"], prometheus_text::CONTENT_TYPE);
        let m = parse_prometheus(&r.body);
        let s = owner.snapshot.lock().unwrap().clone();

        assert_eq!(m["roundhouse_policy_info{policy=\"rr\"}"], 1.0);
        assert_eq!(m["roundhouse_uptime_seconds"], s.uptime_s);
        assert_eq!(m["roundhouse_workers"], 3.0);
        for w in &s.workers {
            let l = format!("{{worker=\"{}\"}}", w.id);
            let get = |name: &str| m[&format!("{name}{l}")];
            assert_eq!(
                get("roundhouse_worker_connections_total"),
                w.connections_total.unwrap() as f64
            );
            assert_eq!(
                get("roundhouse_worker_connections_active"),
                w.connections_active.unwrap() as f64
            );
            assert_eq!(
                get("roundhouse_worker_requests_total"),
                w.requests_total.unwrap() as f64
            );
            assert_eq!(
                get("roundhouse_worker_connections_lost_total"),
                w.connections_lost as f64
            );
            assert_eq!(get("roundhouse_worker_restarts_total"), w.restarts as f64);
            assert_eq!(get("roundhouse_worker_rss_bytes"), w.rss_bytes as f64);
            match w.pid {
                Some(pid) => assert_eq!(get("roundhouse_worker_pid"), pid as f64),
                None => assert!(!m.contains_key(&format!("roundhouse_worker_pid{l}"))),
            }
            for st in WorkerState::ALL {
                let key = format!(
                    "roundhouse_worker_state{{worker=\"{}\",state=\"{}\"}}",
                    w.id,
                    st.as_str()
                );
                assert_eq!(m[&key], if st == w.state { 1.0 } else { 0.0 }, "{key}");
            }
        }
        assert_eq!(m["roundhouse_connections_total"], 300.0);
        assert_eq!(m["roundhouse_requests_total"], 900.0);
        assert_eq!(m["roundhouse_connections_lost_total"], 3.0);
        let f = s.fairness.expect("known");
        assert_eq!(m["roundhouse_fairness_jain"], f.jain);
        assert_eq!(m["roundhouse_fairness_max_min_ratio"], f.max_min_ratio);
        assert_eq!(m["roundhouse_fairness_cv"], f.cv);
    }

    #[test]
    fn the_test_parser_rejects_bad_text() {
        for bad in [
            "foo 1\n",                                         // no HELP/TYPE
            "# HELP foo x\n# TYPE foo gauge\nfoo\n",           // no value
            "# HELP foo x\n# TYPE foo gauge\nfoo{a=\"b\" 1\n", // unclosed labels
            "# HELP foo x\n# TYPE foo gauge\nfoo{a=b} 1\n",    // unquoted
            "# HELP foo x\n# TYPE foo gauge\nfoo one\n",       // not a number
            "# HELP foo x\n# TYPE foo gauge\n9foo 1\n",        // bad name
        ] {
            assert!(
                std::panic::catch_unwind(|| parse_prometheus(bad)).is_err(),
                "accepted: {bad:?}"
            );
        }
        let ok =
            parse_prometheus("# HELP foo x\n# TYPE foo gauge\nfoo{a=\"b\\\"}\",c=\"d\"} 1.5\n");
        assert_eq!(ok["foo{a=\"b\\\"}\",c=\"d\"}"], 1.5);
    }

    /// Two renders of the same snapshot are identical, and each family lists its samples by
    /// slot id as a number (2 before 10), whatever order the hash maps iterate in.
    #[test]
    fn metrics_come_out_in_a_stable_sorted_order() {
        use crate::stats::WorkerStats;
        let worker = |id| WorkerStats {
            id,
            pid: Some(1000 + id),
            state: WorkerState::Online,
            connections_total: Some(u64::from(id)),
            connections_active: Some(0),
            requests_total: Some(0),
            connections_lost: 0,
            restarts: 0,
            rss_bytes: 0,
        };
        let snapshot = StatsSnapshot::new("rr", 1.0, vec![], (1..=12).rev().map(worker).collect());
        let text = render_metrics(&snapshot);
        for _ in 0..5 {
            assert_eq!(render_metrics(&snapshot), text);
        }
        let ids: Vec<u32> = text
            .lines()
            .filter(|l| l.starts_with("roundhouse_worker_pid{"))
            .map(|l| l.split('"').nth(1).unwrap().parse().unwrap())
            .collect();
        assert_eq!(ids, (1..=12).collect::<Vec<_>>());
        let states: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("roundhouse_worker_state{worker=\"2\""))
            .map(|l| l.split('"').nth(3).unwrap())
            .collect();
        assert_eq!(states, ["draining", "online", "starting", "stopped"]);
        assert!(text.contains(&format!("roundhouse_pid {}\n", std::process::id())));
    }
}
