//! The Python standard-library worker (`examples/python/worker.py`) under the real primary.
//!
//! Each test runs `roundhouse run -l 127.0.0.1:0 ... -- python3 examples/python/worker.py`
//! through the shared harness (`tests/common`), reads the bound port and the workers' pids from
//! the primary's log, and checks what a real client sees. The worker was written from
//! `docs/protocol.md` alone, so these tests are the proof that the protocol document is enough to
//! build a worker in another language.
//!
//! Every test is skipped, with a message on stderr, when `python3` is not installed.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::{get, pid_alive, wait_until, HttpConn, Primary, Response, Signal, POLL, STARTUP};

const WORKER_PY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/python/worker.py");
const LONG: Duration = Duration::from_secs(60);

/// Whether `python3` can run; prints why the test is skipped when it cannot.
fn have_python3() -> bool {
    match Command::new("python3").arg("--version").output() {
        Ok(out) if out.status.success() => true,
        _ => {
            eprintln!("SKIPPED: python3 is not installed; the Python worker tests need it");
            false
        }
    }
}

macro_rules! require_python3 {
    () => {
        if !have_python3() {
            return;
        }
    };
}

/// Two Python workers with `args`, online; `env` values may name `{dir}`, the primary's temp dir.
fn start_two(args: &[&str], env: &[(&str, &str)]) -> (Primary, SocketAddr) {
    let mut b = Primary::builder()
        .workers(2)
        .args(args)
        .cmd(&["python3", WORKER_PY]);
    let dir = b.temp_dir().path().display().to_string();
    for (k, v) in env {
        b = b.env(k, &v.replace("{dir}", &dir));
    }
    let p = b.start();
    p.wait_ready();
    let addr = p.addr();
    (p, addr)
}

fn id_of(r: &Response) -> u32 {
    r.worker_id()
        .unwrap_or_else(|| panic!("no x-worker-id header in {r:?}"))
}

/// `(worker_id, pid)` from a `/whoami` body, checked against its `x-worker-id` header.
fn whoami(r: &Response) -> (u32, i32) {
    let v = r.json();
    let id = v["worker_id"].as_u64().expect("worker_id") as u32;
    let pid = v["pid"].as_i64().expect("pid") as i32;
    assert_eq!(id, id_of(r), "body and x-worker-id agree: {r:?}");
    (id, pid)
}

/// A keep-alive client as browsers and curl behave: it reuses its connection, reconnects after
/// `Connection: close`, and retries once when a *reused* connection is found closed before any
/// response arrived (the server closed it as idle — during a drain, for instance — while the
/// request was on its way). A truncated response is not retried.
struct KeepAlive {
    addr: SocketAddr,
    conn: Option<HttpConn>,
}

impl KeepAlive {
    fn new(addr: SocketAddr) -> Self {
        KeepAlive { addr, conn: None }
    }

    fn get(&mut self, path: &str) -> io::Result<Response> {
        let reused = self.conn.is_some();
        match self.try_get(path) {
            Err(e) if reused && stale(&e) => self.try_get(path),
            other => other,
        }
    }

    fn try_get(&mut self, path: &str) -> io::Result<Response> {
        let mut conn = match self.conn.take() {
            Some(c) => c,
            None => HttpConn::connect(self.addr)?,
        };
        let r = conn.get(path)?;
        let close = r
            .header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"));
        if !close {
            self.conn = Some(conn);
        }
        Ok(r)
    }
}

/// A reused connection the server had already closed: write refused, or end of stream / reset
/// before the status line.
fn stale(e: &io::Error) -> bool {
    use io::ErrorKind::*;
    match e.kind() {
        BrokenPipe | ConnectionReset | ConnectionAborted => true,
        UnexpectedEof => e.to_string().contains("before a complete response"),
        _ => false,
    }
}

/// Background load: `threads` clients (even ones keep-alive, odd ones connection-per-request)
/// asking `/whoami` until stopped; every failure is recorded with its reason.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    failures: Arc<Mutex<Vec<String>>>,
    pids: Arc<Mutex<BTreeSet<i32>>>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Load {
    fn start(addr: SocketAddr, threads: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicUsize::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let pids = Arc::new(Mutex::new(BTreeSet::new()));
        let threads = (0..threads)
            .map(|i| {
                let (stop, ok) = (stop.clone(), ok.clone());
                let (failures, pids) = (failures.clone(), pids.clone());
                thread::spawn(move || {
                    let mut ka = KeepAlive::new(addr);
                    while !stop.load(Ordering::Relaxed) {
                        let r = if i % 2 == 0 {
                            ka.get("/whoami")
                        } else {
                            get(addr, "/whoami")
                        };
                        match r {
                            Ok(r) if r.status == 200 => {
                                pids.lock().unwrap().insert(whoami(&r).1);
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            Ok(r) => failures.lock().unwrap().push(format!("client {i}: {r:?}")),
                            Err(e) => failures.lock().unwrap().push(format!("client {i}: {e}")),
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            ok,
            failures,
            pids,
            threads,
        }
    }

    /// Waits until the load has `n` more successes than now.
    fn wait_ok(&self, n: usize, timeout: Duration) {
        let target = self.ok.load(Ordering::Relaxed) + n;
        assert!(
            wait_until(timeout, POLL, || self.ok.load(Ordering::Relaxed) >= target),
            "the load made no progress ({} ok, failures: {:?})",
            self.ok.load(Ordering::Relaxed),
            self.failures.lock().unwrap()
        );
    }

    fn finish(self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().expect("load thread panicked");
        }
        let failures = self.failures.lock().unwrap().clone();
        (self.ok.load(Ordering::Relaxed), failures)
    }
}

// --- the tests -----------------------------------------------------------------------------------

#[test]
fn python_workers_share_sequential_requests_equally_under_rr() {
    require_python3!();
    let (_p, addr) = start_two(&["--policy", "rr"], &[]);
    let mut per_worker = BTreeMap::new();
    for i in 0..40 {
        let r = get(addr, "/").unwrap_or_else(|e| panic!("request {i}: {e}"));
        assert_eq!(
            (r.status, r.text().as_str()),
            (200, "hello world\n"),
            "{r:?}"
        );
        *per_worker.entry(id_of(&r)).or_insert(0u32) += 1;
    }
    assert_eq!(
        per_worker.keys().copied().collect::<Vec<_>>(),
        [1, 2],
        "{per_worker:?}"
    );
    assert!(
        per_worker[&1].abs_diff(per_worker[&2]) <= 1,
        "unequal shares {per_worker:?}"
    );
}

#[test]
fn python_workers_serve_concurrent_load_without_failures() {
    require_python3!();
    let (_p, addr) = start_two(&[], &[]);
    let failures = Arc::new(Mutex::new(Vec::new()));
    let served = Arc::new(Mutex::new(BTreeMap::new()));
    let paths = ["/", "/whoami", "/sleep?ms=5", "/cpu?ms=2", "/nope"];
    let clients: Vec<_> = (0..8)
        .map(|c| {
            let (failures, served) = (failures.clone(), served.clone());
            thread::spawn(move || {
                let mut ka = KeepAlive::new(addr);
                for i in 0..30 {
                    let path = paths[(c + i) % paths.len()];
                    let r = if c % 2 == 0 {
                        ka.get(path)
                    } else {
                        get(addr, path)
                    };
                    let want = if path == "/nope" { 404 } else { 200 };
                    match r {
                        Ok(r)
                            if r.status == want && (path != "/" || r.text() == "hello world\n") =>
                        {
                            *served.lock().unwrap().entry(id_of(&r)).or_insert(0) += 1;
                        }
                        other => failures.lock().unwrap().push(format!("{path}: {other:?}")),
                    }
                }
            })
        })
        .collect();
    for c in clients {
        c.join().expect("client thread");
    }
    let failures = failures.lock().unwrap();
    assert!(
        failures.is_empty(),
        "{} failures: {failures:?}",
        failures.len()
    );
    let served = served.lock().unwrap();
    assert_eq!(served.values().sum::<u32>(), 240);
    assert_eq!(served.len(), 2, "both workers served: {served:?}");
}

#[test]
fn python_whoami_reports_the_workers_pid() {
    require_python3!();
    let (p, addr) = start_two(&[], &[]);
    let online = p.worker_pids();
    assert_eq!(online.len(), 2, "two `worker online` lines");
    let mut seen = BTreeMap::new();
    for _ in 0..10 {
        let r = get(addr, "/whoami").expect("GET /whoami");
        assert_eq!(r.status, 200);
        assert!(r
            .header("content-type")
            .is_some_and(|v| v.starts_with("application/json")));
        let (id, pid) = whoami(&r);
        seen.insert(id, pid);
    }
    assert_eq!(
        seen, online,
        "/whoami pids match the `worker online ... worker.pid=` lines"
    );
}

#[test]
fn python_workers_answer_ping_sent_to_all() {
    require_python3!();
    let (p, _addr) = start_two(&[], &[]);
    let out = p.client(&["send", "--to", "all", r#"{"ping":4242}"#]);
    assert!(
        out.status.success(),
        "{}",
        common::describe(&["send", "--to", "all", "{\"ping\":4242}"], &out)
    );
    for id in [1, 2] {
        // The primary logs messages addressed to it; the JSON may be quoted in the log line.
        let want = format!(r#""worker_id":{id}"#);
        p.wait_for_line(&format!("the pong of worker {id}"), STARTUP, |l| {
            let flat: String = l.text.chars().filter(|c| *c != '\\' && *c != ' ').collect();
            flat.contains(r#""pong":4242"#) && flat.contains(&want)
        });
    }
}

#[test]
fn python_worker_stats_count_its_requests() {
    require_python3!();
    let (p, addr) = start_two(&["--admin", "127.0.0.1:0"], &[]);
    let admin = p.admin_addr();
    let mut per_worker = BTreeMap::new();
    for _ in 0..30 {
        let r = get(addr, "/").expect("GET /");
        *per_worker.entry(id_of(&r) as u64).or_insert(0u64) += 1;
    }
    // STATS frames are batched (at most every 100 ms): poll until the totals arrive.
    let mut last = serde_json::Value::Null;
    let arrived = wait_until(STARTUP, Duration::from_millis(50), || {
        let r = get(admin, "/stats").expect("GET /stats");
        assert_eq!(r.status, 200, "{r:?}");
        last = r.json();
        let total = last["totals"]["requests_total"]
            .as_u64()
            .expect("totals.requests_total");
        assert!(total <= 30, "more requests counted than made: {last}");
        let requests: BTreeMap<u64, u64> = workers_field(&last, "requests_total");
        total == 30 && requests == per_worker
    });
    assert!(arrived, "stats never reached {per_worker:?}: {last}");
    assert_eq!(
        workers_field(&last, "connections_total"),
        per_worker,
        "one connection per request: {last}"
    );
}

/// Worker id → the numeric field `key` of each entry of `/stats`'s `workers`.
fn workers_field(stats: &serde_json::Value, key: &str) -> BTreeMap<u64, u64> {
    stats["workers"]
        .as_array()
        .expect("workers array")
        .iter()
        .map(|w| {
            let n = |k: &str| w[k].as_u64().unwrap_or_else(|| panic!("no {k} in {w}"));
            (n("id"), n(key))
        })
        .collect()
}

#[test]
fn python_workers_reload_under_load_without_failures() {
    require_python3!();
    reload_under_load(|p| {
        let out = p.client(&["reload"]);
        assert!(
            out.status.success(),
            "{}",
            common::describe(&["reload"], &out)
        );
    });
}

#[test]
fn python_workers_reload_on_sighup_under_load_without_failures() {
    require_python3!();
    reload_under_load(|p| p.signal(Signal::SIGHUP));
}

/// Two Python workers under keep-alive and connection-per-request load; `reload` replaces them;
/// every request must succeed, the old workers must drain and exit 0, the new ones take over.
fn reload_under_load(reload: impl FnOnce(&Primary)) {
    let (p, addr) = start_two(&["--grace", "10s"], &[]);
    let old = p.worker_pids();
    let load = Load::start(addr, 4);
    load.wait_ok(40, STARTUP);
    reload(&p);
    let mut new = BTreeSet::new();
    for (id, pid) in &old {
        new.insert(p.wait_worker_online(*id, Some(*pid), LONG));
        let (ids, pids) = (id.to_string(), pid.to_string());
        let exited = p.wait_for_event(
            "worker exited",
            &[("worker.id", &ids), ("worker.pid", &pids)],
            LONG,
        );
        // Drained, not killed at the end of --grace: the Python worker finished and exited 0.
        assert!(
            exited.contains("status=exit code 0"),
            "old worker {id} did not exit 0 after DRAIN: {}",
            exited.text
        );
    }
    assert!(
        wait_until(STARTUP, POLL, || new.is_subset(&load.pids.lock().unwrap())),
        "the load never reached both new workers {new:?}"
    );
    load.wait_ok(40, STARTUP);
    let (ok, failures) = load.finish();
    assert!(
        failures.is_empty(),
        "{} of {} requests failed during the reload: {failures:?}",
        failures.len(),
        ok + failures.len()
    );
}

#[test]
fn python_worker_writing_a_malformed_frame_is_killed_and_replaced() {
    require_python3!();
    // Worker 1 writes a garbage frame right after its third response, once (the marker file
    // makes its replacement behave). See ROUNDHOUSE_PY_MISBEHAVE in worker.py.
    let spec = "garbage,after=3,worker=1,once={dir}/misbehaved";
    let (p, addr) = start_two(&[], &[("ROUNDHOUSE_PY_MISBEHAVE", spec)]);
    let old_pid = p.worker_pids()[&1];
    let mut failures = Vec::new();
    let mut new_pid = None;
    let mut served_by_new = 0;
    let deadline = Instant::now() + LONG;
    // Sequential requests on fresh connections, before, during and after the replacement.
    while served_by_new < 5 {
        assert!(Instant::now() < deadline, "worker 1 was not replaced");
        match get(addr, "/whoami") {
            Ok(r) if r.status == 200 => {
                let (id, pid) = whoami(&r);
                if id == 1 && pid != old_pid {
                    assert_eq!(*new_pid.get_or_insert(pid), pid, "one replacement");
                    served_by_new += 1;
                }
            }
            other => failures.push(format!("{other:?}")),
        }
    }
    assert!(
        failures.is_empty(),
        "{} requests failed: {failures:?}",
        failures.len()
    );
    assert_eq!(
        new_pid,
        Some(p.wait_worker_online(1, Some(old_pid), STARTUP)),
        "the replacement that served is the one the primary logged online"
    );
    assert!(
        p.dir().join("misbehaved").exists(),
        "the worker did misbehave"
    );
    p.wait_for_event("protocol error", &[("worker.id", "1")], STARTUP);
    let pid = old_pid.to_string();
    let exited = p.wait_for_event(
        "worker exited",
        &[("worker.id", "1"), ("worker.pid", &pid)],
        STARTUP,
    );
    // The primary kills it; if the channel closes before the SIGKILL lands, the worker exits 0
    // on end-of-file by itself (docs/protocol.md 4.8). Either way it is gone and replaced.
    assert!(
        exited.contains("SIGKILL") || exited.contains("status=exit code 0"),
        "the worker was killed: {}",
        exited.text
    );
    assert!(!pid_alive(old_pid), "the old worker 1 is gone");
    assert_eq!(
        p.events("worker online", &[("worker.id", "2")]).len(),
        1,
        "worker 2 was left alone"
    );
    assert!(pid_alive(p.pid()), "the primary keeps running");
}

#[test]
fn python_worker_serves_inherited_listeners_under_none_and_reuseport() {
    require_python3!();
    for policy in ["none", "reuseport"] {
        let (_p, addr) = start_two(&["--policy", policy], &[]);
        let mut ids = BTreeSet::new();
        let mut ka = KeepAlive::new(addr);
        for i in 0..40 {
            let r = if i % 2 == 0 {
                get(addr, "/")
            } else {
                ka.get("/")
            };
            let r = r.unwrap_or_else(|e| panic!("{policy}: request {i}: {e}"));
            assert_eq!(
                (r.status, r.text().as_str()),
                (200, "hello world\n"),
                "{policy}: {r:?}"
            );
            ids.insert(id_of(&r));
        }
        assert!(ids.is_subset(&BTreeSet::from([1, 2])), "{policy}: {ids:?}");
    }
}
