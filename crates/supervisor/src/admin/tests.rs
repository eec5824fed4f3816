//! Unit tests of the admin module.
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
    let ok = parse_prometheus("# HELP foo x\n# TYPE foo gauge\nfoo{a=\"b\\\"}\",c=\"d\"} 1.5\n");
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
        backoff: None,
        keys: None,
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
