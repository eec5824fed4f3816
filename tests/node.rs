//! Node.js workers end to end: `roundhouse run --node` serving the apps in `examples/node`
//! through Node's IPC channel and the preloaded shim (`node/roundhouse.js`).
//!
//! Skipped, with a message, when `node` is not installed; the Express test also when
//! `examples/node/express/node_modules` is missing (`npm ci` there installs it).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// Upper bound for anything a test waits for; only reached on failure.
const DEADLINE: Duration = Duration::from_secs(30);
const RH: &str = env!("CARGO_BIN_EXE_roundhouse");

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn plain_app() -> PathBuf {
    repo().join("examples/node/app.js")
}

fn node_available() -> bool {
    Command::new("node")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

macro_rules! require_node {
    () => {
        if !node_available() {
            eprintln!("SKIPPED: `node` is not installed; the --node tests need Node.js >= 18");
            return;
        }
    };
}

// --- processes and logs -----------------------------------------------------------------------

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "rh-node-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running `roundhouse run --node`, killed (with its workers) on drop.
struct Rh {
    child: Child,
    args: Vec<String>,
    log: Arc<Mutex<String>>,
    addr: SocketAddr,
    admin: SocketAddr,
    control: PathBuf,
    _dir: TempDir,
}

fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let at = line.find(key)? + key.len();
    line[at..].split_whitespace().next()
}

impl Rh {
    fn start(app: &Path, workers: u32, policy: &str) -> Rh {
        let dir = TempDir::new(policy);
        let control = dir.0.join("rh.sock");
        let args: Vec<String> = [
            "run",
            "--node",
            "-l",
            "127.0.0.1:0",
            "-w",
            &workers.to_string(),
            "--policy",
            policy,
            "--admin",
            "127.0.0.1:0",
            "--control",
            control.to_str().unwrap(),
            "--grace",
            "10s",
            "--",
            "node",
            app.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let mut child = Command::new(RH)
            .args(&args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("could not start roundhouse");
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let mut l = sink.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        let mut rh = Rh {
            child,
            args,
            log,
            addr: "0.0.0.0:0".parse().unwrap(),
            admin: "0.0.0.0:0".parse().unwrap(),
            control,
            _dir: dir,
        };
        rh.wait_log(&format!("ready workers={workers}"));
        let log = rh.log();
        let addr_of = |marker: &str, key: &str| -> SocketAddr {
            log.lines()
                .find(|l| l.contains(marker))
                .and_then(|l| field(l, key))
                .and_then(|a| a.parse().ok())
                .unwrap_or_else(|| panic!("no `{marker}` line with an address in the log"))
        };
        rh.addr = addr_of("listening listener.addr=", "listener.addr=");
        rh.admin = addr_of("admin listening admin.addr=", "admin.addr=");
        rh
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits until a log line contains `needle`; returns that line.
    fn wait_log(&mut self, needle: &str) -> String {
        self.wait_line(|l| l.contains(needle), needle)
    }

    fn wait_line(&mut self, pred: impl Fn(&str) -> bool, what: &str) -> String {
        let end = Instant::now() + DEADLINE;
        loop {
            if let Some(l) = self.log().lines().find(|l| pred(l)) {
                return l.to_string();
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!("roundhouse exited ({st}) while waiting for `{what}`");
            }
            assert!(
                Instant::now() < end,
                "no log line `{what}` before the deadline"
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Current pid of each worker slot, from the `worker online` lines.
    fn worker_pids(&self) -> BTreeMap<u32, i32> {
        let mut m = BTreeMap::new();
        for l in self.log().lines().filter(|l| l.contains("worker online")) {
            if let (Some(id), Some(pid)) = (field(l, "worker.id="), field(l, "worker.pid=")) {
                m.insert(id.parse().unwrap(), pid.parse().unwrap());
            }
        }
        m
    }

    fn all_worker_pids(&self) -> BTreeSet<i32> {
        self.log()
            .lines()
            .filter(|l| l.contains("worker started"))
            .filter_map(|l| field(l, "worker.pid=")?.parse().ok())
            .collect()
    }

    fn stats(&self) -> serde_json::Value {
        let r = http(self.admin, "GET", "/stats").expect("GET /stats");
        assert_eq!(r.status, 200);
        serde_json::from_slice(&r.body).expect("/stats is JSON")
    }

    /// Runs a `roundhouse` control command against this primary.
    fn control(&self, args: &[&str]) -> std::process::Output {
        Command::new(RH)
            .args(args)
            .arg("--control")
            .arg(&self.control)
            .output()
            .unwrap()
    }
}

impl Drop for Rh {
    fn drop(&mut self) {
        let workers = self.all_worker_pids();
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Workers die with the primary (parent-death signal, channel EOF); make sure of it.
        for pid in workers {
            if alive(pid) {
                kill(pid, libc::SIGKILL);
            }
        }
        if thread::panicking() {
            eprintln!(
                "--- roundhouse {}\n--- its stderr:\n{}",
                self.args.join(" "),
                self.log()
            );
        }
    }
}

fn kill(pid: i32, sig: i32) {
    // SAFETY: plain kill(2) on a pid this test started (through roundhouse).
    unsafe {
        libc::kill(pid, sig);
    }
}

/// Running (not gone, not a zombie waiting to be reaped by whoever inherited it).
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => {
            let state = s
                .rsplit(')')
                .next()
                .and_then(|r| r.split_whitespace().next());
            state != Some("Z") && state != Some("X")
        }
        Err(_) => false,
    }
}

fn poll_until(what: &str, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + DEADLINE;
    while !f() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(20));
    }
}

// --- a small HTTP/1.1 client --------------------------------------------------------------------

#[derive(Debug)]
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    fn worker(&self) -> u32 {
        self.header("x-worker-id")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("response without x-worker-id: {self:?}"))
    }
    fn closes(&self) -> bool {
        self.header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"))
    }
}

fn connect(addr: SocketAddr) -> io::Result<BufReader<TcpStream>> {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    s.set_write_timeout(Some(Duration::from_secs(10)))?;
    Ok(BufReader::new(s))
}

fn write_request(
    c: &mut BufReader<TcpStream>,
    method: &str,
    path: &str,
    close: bool,
) -> io::Result<()> {
    let conn = if close { "close" } else { "keep-alive" };
    write!(
        c.get_mut(),
        "{method} {path} HTTP/1.1\r\nHost: test\r\nContent-Length: 0\r\nConnection: {conn}\r\n\r\n"
    )
}

/// Reads one response. `Ok(None)`: the connection was closed before any byte of it.
fn read_response(c: &mut BufReader<TcpStream>) -> io::Result<Option<Resp>> {
    let mut line = String::new();
    match c.read_line(&mut line) {
        Ok(0) => return Ok(None),
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Ok(None),
        Err(e) => return Err(e),
        Ok(_) => {}
    }
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::other(format!("bad status line {line:?}")))?;
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        c.read_line(&mut h)?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h
            .split_once(':')
            .ok_or_else(|| io::Error::other(format!("bad header {h:?}")))?;
        headers.push((k.trim().to_string(), v.trim().to_string()));
    }
    let mut r = Resp {
        status,
        headers,
        body: Vec::new(),
    };
    if let Some(n) = r.header("content-length") {
        let n: usize = n.parse().map_err(io::Error::other)?;
        r.body.resize(n, 0);
        c.read_exact(&mut r.body)?;
    } else if r.closes() {
        c.read_to_end(&mut r.body)?;
    } else {
        return Err(io::Error::other("response without content-length"));
    }
    Ok(Some(r))
}

/// One request on a fresh connection (`Connection: close`).
fn http(addr: SocketAddr, method: &str, path: &str) -> io::Result<Resp> {
    let mut c = connect(addr)?;
    write_request(&mut c, method, path, true)?;
    read_response(&mut c)?.ok_or_else(|| io::Error::other("connection closed without a response"))
}

fn get(addr: SocketAddr, path: &str) -> io::Result<Resp> {
    http(addr, "GET", path)
}

/// A keep-alive client that behaves like a browser or curl: a request on a *reused* connection
/// that the server closed before answering (it was idle) is retried once on a new connection.
/// A fresh connection gets no second chance.
struct KeepAlive {
    addr: SocketAddr,
    conn: Option<BufReader<TcpStream>>,
}

impl KeepAlive {
    fn new(addr: SocketAddr) -> Self {
        KeepAlive { addr, conn: None }
    }

    fn get(&mut self, path: &str) -> io::Result<Resp> {
        for _ in 0..2 {
            let reused = self.conn.is_some();
            let mut c = match self.conn.take() {
                Some(c) => c,
                None => connect(self.addr)?,
            };
            let sent = write_request(&mut c, "GET", path, false);
            let got = match sent {
                Ok(()) => read_response(&mut c),
                Err(e) if reused => {
                    let _ = e;
                    Ok(None)
                }
                Err(e) => Err(e),
            };
            match got? {
                Some(r) => {
                    if !r.closes() {
                        self.conn = Some(c);
                    }
                    return Ok(r);
                }
                None if reused => continue,
                None => {
                    return Err(io::Error::other(
                        "fresh connection closed without a response",
                    ))
                }
            }
        }
        Err(io::Error::other("closed twice without a response"))
    }
}

// --- tests --------------------------------------------------------------------------------------

#[test]
fn express_example_serves() {
    require_node!();
    let dir = repo().join("examples/node/express");
    if !dir.join("node_modules/express").is_dir() {
        eprintln!(
            "SKIPPED: examples/node/express/node_modules is missing; run `npm ci` in {}",
            dir.display()
        );
        return;
    }
    let rh = Rh::start(&dir.join("app.js"), 2, "rr");
    let r = get(rh.addr, "/").unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.body, b"hello world\n");
    let r = get(rh.addr, "/users/ann").unwrap();
    assert_eq!(r.status, 200);
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v, serde_json::json!({"hello": "ann"}));
    let mut seen = BTreeSet::new();
    for _ in 0..4 {
        let r = get(rh.addr, "/whoami").unwrap();
        assert_eq!(r.status, 200);
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v["worker_id"], r.worker(), "{v}");
        seen.insert(r.worker());
    }
    assert_eq!(seen, BTreeSet::from([1, 2]), "both Express workers serve");
}

#[test]
fn rr_rotates_strictly_and_serves_concurrent_load() {
    require_node!();
    let rh = Rh::start(&plain_app(), 2, "rr");

    let order: Vec<u32> = (0..10)
        .map(|_| {
            let r = get(rh.addr, "/whoami").unwrap();
            assert_eq!(r.status, 200);
            let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
            assert_eq!(v["worker_id"], r.worker());
            r.worker()
        })
        .collect();
    assert!(
        order.windows(2).all(|w| w[0] != w[1]) && order.contains(&1) && order.contains(&2),
        "not a strict rotation: {order:?}"
    );

    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let ok = Arc::new(AtomicUsize::new(0));
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let (failures, ok, addr) = (failures.clone(), ok.clone(), rh.addr);
            thread::spawn(move || {
                let mut ka = KeepAlive::new(addr);
                for _ in 0..40 {
                    let r = if t % 2 == 0 {
                        get(addr, "/")
                    } else {
                        ka.get("/")
                    };
                    match r {
                        Ok(r) if r.status == 200 && r.body == b"hello world\n" => {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        other => failures.lock().unwrap().push(format!("{other:?}")),
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let failures = failures.lock().unwrap();
    assert!(failures.is_empty(), "failed requests: {failures:?}");
    assert_eq!(ok.load(Ordering::Relaxed), 320);
}

#[test]
fn stats_count_node_requests() {
    require_node!();
    let rh = Rh::start(&plain_app(), 2, "rr");
    let r = http(rh.admin, "POST", "/stats/reset").unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    for _ in 0..20 {
        assert_eq!(get(rh.addr, "/").unwrap().status, 200);
    }
    // The shim batches its counters (at most every 100 ms).
    poll_until("the stats to count 20 requests", || {
        rh.stats()["totals"]["requests_total"] == 20
    });
    let stats = rh.stats();
    for w in stats["workers"].as_array().unwrap() {
        assert_eq!(w["requests_total"], 10, "strict rotation, 10 each: {stats}");
        assert_eq!(w["connections_total"], 10, "{stats}");
    }
}

#[test]
fn send_reaches_process_on_message_and_the_reply_arrives() {
    require_node!();
    let mut rh = Rh::start(&plain_app(), 2, "rr");
    let out = rh.control(&["send", "--to", "1", r#"{"ping":"node-one"}"#]);
    assert!(out.status.success(), "roundhouse send failed: {out:?}");
    let line = rh.wait_line(
        |l| l.contains("message from worker") && l.contains("node-one") && l.contains("pong"),
        "pong node-one",
    );
    assert!(line.contains("worker.id=1"), "{line}");

    let out = rh.control(&["send", "--to", "all", r#"{"ping":"node-all"}"#]);
    assert!(out.status.success(), "roundhouse send failed: {out:?}");
    for id in [1, 2] {
        rh.wait_line(
            |l| {
                l.contains("message from worker")
                    && l.contains("node-all")
                    && l.contains(&format!("worker.id={id}"))
            },
            &format!("pong node-all from worker {id}"),
        );
    }
}

#[test]
fn sigkilled_node_worker_is_replaced_and_its_unacked_connection_served_elsewhere() {
    require_node!();
    let mut rh = Rh::start(&plain_app(), 2, "rr");
    let pids = rh.worker_pids();
    let victim = pids[&1];

    // A stopped worker cannot acknowledge what it is handed.
    kill(victim, libc::SIGSTOP);
    const N: usize = 6;
    let done = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..N)
        .map(|_| {
            let (done, addr) = (done.clone(), rh.addr);
            let t = thread::spawn(move || {
                let r = get(addr, "/whoami");
                done.fetch_add(1, Ordering::SeqCst);
                r
            });
            // Sequential starts, so the rotation reaches the stopped worker.
            thread::sleep(Duration::from_millis(30));
            t
        })
        .collect();
    // Worker 2 serves what it gets; at least one connection is stuck with worker 1.
    poll_until("worker 2 to serve its share", || {
        done.load(Ordering::SeqCst) >= 1
    });
    thread::sleep(Duration::from_millis(300));
    assert!(
        done.load(Ordering::SeqCst) < N,
        "no connection was handed to the stopped worker"
    );

    kill(victim, libc::SIGKILL);
    for c in clients {
        let r = c
            .join()
            .unwrap()
            .expect("a client failed after the worker was killed");
        assert_eq!(r.status, 200);
    }
    rh.wait_log(&format!("worker exited worker.id=1 worker.pid={victim}"));
    rh.wait_line(
        |l| {
            l.contains("worker online worker.id=1")
                && field(l, "worker.pid=").is_some_and(|p| p != victim.to_string())
        },
        "a new worker 1 online",
    );
    let seen: BTreeSet<u32> = (0..6)
        .map(|_| get(rh.addr, "/whoami").unwrap().worker())
        .collect();
    assert_eq!(seen, BTreeSet::from([1, 2]), "the replacement serves");
}

#[test]
fn reload_under_load_fails_no_request() {
    require_node!();
    let mut rh = Rh::start(&plain_app(), 2, "rr");
    let before = rh.worker_pids();

    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let threads: Vec<_> = (0..6)
        .map(|t| {
            let (stop, ok, failures, addr) = (stop.clone(), ok.clone(), failures.clone(), rh.addr);
            thread::spawn(move || {
                let mut ka = KeepAlive::new(addr);
                while !stop.load(Ordering::Relaxed) {
                    let r = match t % 3 {
                        0 => get(addr, "/"),
                        1 => ka.get("/"),
                        _ => get(addr, "/sleep?ms=50"),
                    };
                    match r {
                        Ok(r) if r.status == 200 => {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        other => failures.lock().unwrap().push(format!("{other:?}")),
                    }
                }
            })
        })
        .collect();
    poll_until("load to start", || ok.load(Ordering::Relaxed) >= 50);
    kill(rh.child.id() as i32, libc::SIGHUP);
    rh.wait_log("reload complete");
    let mark = ok.load(Ordering::Relaxed);
    poll_until("load to go on after the reload", || {
        ok.load(Ordering::Relaxed) >= mark + 50
    });
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    let failures = failures.lock().unwrap();
    assert!(
        failures.is_empty(),
        "failed requests during reload: {failures:?}"
    );
    let after = rh.worker_pids();
    for id in [1, 2] {
        assert_ne!(before[&id], after[&id], "worker {id} was not replaced");
    }
}

#[test]
fn no_orphan_node_worker_after_primary_sigkill() {
    require_node!();
    let mut rh = Rh::start(&plain_app(), 2, "rr");
    let pids: Vec<i32> = rh.worker_pids().into_values().collect();
    assert_eq!(pids.len(), 2);
    assert!(pids.iter().all(|&p| alive(p)));
    rh.child.kill().unwrap();
    rh.child.wait().unwrap();
    poll_until("the Node workers to exit", || {
        pids.iter().all(|&p| !alive(p))
    });
}

/// Every policy serves the unmodified app: `least-conn` by handoff, `none` and `reuseport` with
/// the app's server listening on the inherited listener (the shim's stats are then the only
/// per-worker counts).
#[test]
fn other_policies_serve_node_apps() {
    require_node!();
    for policy in ["least-conn", "none", "reuseport"] {
        let rh = Rh::start(&plain_app(), 2, policy);
        for _ in 0..20 {
            let r = get(rh.addr, "/").unwrap_or_else(|e| panic!("{policy}: {e}"));
            assert_eq!(r.status, 200, "{policy}");
            assert_eq!(r.body, b"hello world\n", "{policy}");
        }
        poll_until(&format!("{policy}: the stats to count 20 requests"), || {
            rh.stats()["totals"]["requests_total"] == 20
        });
    }
}
