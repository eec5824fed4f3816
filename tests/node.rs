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
        Rh::start_with(app, workers, policy, &[])
    }

    /// Starts `roundhouse run --node` with `extra` options and waits until every worker is
    /// online.
    fn start_with(app: &Path, workers: u32, policy: &str, extra: &[&str]) -> Rh {
        let mut rh = Rh::spawn(app, workers, policy, extra);
        rh.wait_log(&format!("ready workers={workers}"));
        rh.read_addrs();
        rh
    }

    /// Starts `roundhouse run --node` without waiting for its workers. Its log holds its
    /// stderr and its stdout (where the workers' `console.log` lines go).
    fn spawn(app: &Path, workers: u32, policy: &str, extra: &[&str]) -> Rh {
        let dir = TempDir::new(policy);
        let control = dir.0.join("rh.sock");
        let mut args: Vec<String> = [
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
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if !extra.contains(&"--grace") {
            args.extend(["--grace".into(), "10s".into()]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        args.extend(["--".into(), "node".into(), app.to_str().unwrap().into()]);
        let mut child = Command::new(RH)
            .args(&args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("could not start roundhouse");
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        fn pump(from: impl Read + Send + 'static, sink: Arc<Mutex<String>>) {
            thread::spawn(move || {
                for line in BufReader::new(from).lines() {
                    let Ok(line) = line else { break };
                    let mut l = sink.lock().unwrap();
                    l.push_str(&line);
                    l.push('\n');
                }
            });
        }
        pump(stderr, log.clone());
        pump(stdout, log.clone());
        Rh {
            child,
            args,
            log,
            addr: "0.0.0.0:0".parse().unwrap(),
            admin: "0.0.0.0:0".parse().unwrap(),
            control,
            _dir: dir,
        }
    }

    /// Reads the listener's and the admin endpoint's addresses from the log.
    fn read_addrs(&mut self) {
        let admin = self.wait_log("admin listening admin.addr=");
        let listener = self.wait_log("listening listener.addr=");
        let addr_of = |line: &str, key: &str| -> SocketAddr {
            field(line, key)
                .and_then(|a| a.parse().ok())
                .unwrap_or_else(|| panic!("no address in `{line}`"))
        };
        self.addr = addr_of(&listener, "listener.addr=");
        self.admin = addr_of(&admin, "admin.addr=");
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
    s.set_nodelay(true)?;
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
    // One write: `write!` on the socket would send each piece in its own segment.
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\nContent-Length: 0\r\nConnection: {conn}\r\n\r\n"
    );
    c.get_mut().write_all(req.as_bytes())
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
    if r.header("transfer-encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
    {
        loop {
            let mut size = String::new();
            c.read_line(&mut size)?;
            let n = usize::from_str_radix(size.trim_end().split(';').next().unwrap_or(""), 16)
                .map_err(|e| io::Error::other(format!("bad chunk size {size:?}: {e}")))?;
            let at = r.body.len();
            r.body.resize(at + n, 0);
            c.read_exact(&mut r.body[at..])?;
            let mut crlf = String::new();
            c.read_line(&mut crlf)?;
            if n == 0 {
                break; // no trailers from the apps under test
            }
        }
    } else if let Some(n) = r.header("content-length") {
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

// --- real Node apps: the cluster tutorial, Express, Fastify, Koa, ws ----------------------------

/// `examples/node/<name>`, or `None` (after printing why the test is skipped) when its
/// `npm ci`-installed `package` is missing.
fn example_app(name: &str, package: &str) -> Option<PathBuf> {
    let dir = repo().join("examples/node").join(name);
    if !dir.join("node_modules").join(package).is_dir() {
        eprintln!(
            "SKIPPED: examples/node/{name}/node_modules/{package} is missing; run `npm ci` in {}",
            dir.display()
        );
        return None;
    }
    Some(dir.join("app.js"))
}

/// The process's direct children, from /proc.
fn children_of(pid: i32) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/stat")).is_ok_and(|s| {
                s.rsplit(')')
                    .next()
                    .and_then(|r| r.split_whitespace().nth(1))
                    .and_then(|pp| pp.parse::<i32>().ok())
                    == Some(pid)
            })
        })
        .collect()
}

/// A load client that counts failures the way `wrk` does: each connection sends its requests
/// back to back, keep-alive, and never retries. A request whose connection fails or closes
/// before the whole response arrived is an error, so is a status other than 200; the
/// connection is then replaced. A response saying `Connection: close` ends its connection
/// cleanly (a new one follows).
struct WrkLoad {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    errors: Arc<Mutex<Vec<String>>>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl WrkLoad {
    fn start(addr: SocketAddr, connections: usize, path: &'static str) -> WrkLoad {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicUsize::new(0));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let threads = (0..connections)
            .map(|_| {
                let (stop, ok, errors) = (stop.clone(), ok.clone(), errors.clone());
                thread::spawn(move || {
                    let mut conn: Option<BufReader<TcpStream>> = None;
                    while !stop.load(Ordering::Relaxed) {
                        let mut c = match conn.take() {
                            Some(c) => c,
                            None => match connect(addr) {
                                Ok(c) => c,
                                Err(e) => {
                                    errors.lock().unwrap().push(format!("connect: {e}"));
                                    continue;
                                }
                            },
                        };
                        if let Err(e) = write_request(&mut c, "GET", path, false) {
                            errors.lock().unwrap().push(format!("write: {e}"));
                            continue;
                        }
                        match read_response(&mut c) {
                            Ok(Some(r)) if r.status == 200 => {
                                ok.fetch_add(1, Ordering::Relaxed);
                                if !r.closes() {
                                    conn = Some(c);
                                }
                            }
                            Ok(Some(r)) => errors
                                .lock()
                                .unwrap()
                                .push(format!("status {}: {r:?}", r.status)),
                            Ok(None) => errors
                                .lock()
                                .unwrap()
                                .push("read: closed before the response".into()),
                            Err(e) => errors.lock().unwrap().push(format!("read: {e}")),
                        }
                    }
                })
            })
            .collect();
        WrkLoad {
            stop,
            ok,
            errors,
            threads,
        }
    }

    fn ok(&self) -> usize {
        self.ok.load(Ordering::Relaxed)
    }

    /// Waits until `n` more requests succeeded.
    fn wait_more(&self, n: usize) {
        let mark = self.ok();
        poll_until(&format!("{n} more requests to succeed"), || {
            self.ok() >= mark + n
        });
    }

    /// Stops the load; returns (requests served, errors).
    fn finish(mut self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            t.join().unwrap();
        }
        let errors = std::mem::take(&mut *self.errors.lock().unwrap());
        (self.ok(), errors)
    }
}

impl Drop for WrkLoad {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Node's cluster tutorial program, unchanged: under roundhouse each worker runs its worker
/// branch (no forks, no EADDRINUSE from `listen(8000)`), both serve, and its messaging half
/// answers `roundhouse send`.
#[test]
fn cluster_tutorial_serves_on_every_worker_without_forking() {
    require_node!();
    let mut rh = Rh::start(&repo().join("examples/node/cluster/app.js"), 2, "rr");
    let pids = rh.worker_pids();
    assert_eq!(pids.len(), 2);
    for _ in 0..10 {
        let r = get(rh.addr, "/").unwrap();
        assert_eq!((r.status, r.body.as_slice()), (200, &b"hello world\n"[..]));
    }
    poll_until("both workers to count their requests", || {
        let stats = rh.stats();
        stats["workers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|w| w["requests_total"].as_u64() == Some(5))
    });
    for (id, pid) in &pids {
        rh.wait_log(&format!("Worker {pid} started"));
        assert!(alive(*pid), "worker {id} is gone");
        assert_eq!(children_of(*pid), Vec::<i32>::new(), "worker {id} forked");
    }
    let out = rh.control(&["send", "--to", "all", r#"{"ping":"tutorial"}"#]);
    assert!(out.status.success(), "roundhouse send failed: {out:?}");
    for (id, pid) in &pids {
        rh.wait_line(
            |l| {
                l.contains("message from worker")
                    && l.contains(&format!("worker.id={id}"))
                    && l.contains(&format!(
                        r#""pong":"tutorial","worker_id":{id},"pid":{pid}"#
                    ))
            },
            &format!("worker {id}'s pong, with cluster.worker.id = {id}"),
        );
    }
    let log = rh.log();
    for bad in ["Primary ", "EADDRINUSE", "WARN", "died"] {
        assert!(!log.contains(bad), "`{bad}` in the log:\n{log}");
    }
}

/// The cluster worker API the app sees, and what a drain tells it: `disconnect` on
/// `cluster.worker` and `process`, then the app's SIGTERM listeners.
#[test]
fn cluster_worker_api_and_drain_events() {
    require_node!();
    let dir = TempDir::new("api");
    let app = dir.0.join("app.js");
    std::fs::write(
        &app,
        r#"
const cluster = require('cluster');
const http = require('http');
const w = cluster.worker;
console.log(`api isPrimary=${cluster.isPrimary} isMaster=${cluster.isMaster} isWorker=${cluster.isWorker}`
  + ` id=${w.id} env=${process.env.ROUNDHOUSE_WORKER_ID} process=${w.process === process}`
  + ` connected=${w.isConnected()} dead=${w.isDead()} workers=${typeof cluster.workers}`
  + ` instance=${w instanceof cluster.Worker}`);
w.on('message', (m) => { if (m && m.ping) w.send({ pong: m.ping, via: 'cluster.worker' }); });
w.on('disconnect', () => console.log(`event worker.disconnect id=${w.id} connected=${w.isConnected()}`));
process.on('disconnect', () => console.log(`event process.disconnect id=${w.id}`));
process.on('SIGTERM', (sig) => {
  console.log(`event ${sig} id=${w.id}`);
  server.close(() => process.exit(0));
});
const server = http.createServer((req, res) => res.end('ok\n')).listen(8000);
"#,
    )
    .unwrap();
    let mut rh = Rh::start(&app, 1, "rr");
    let pid = rh.worker_pids()[&1];
    let line = rh.wait_log("api isPrimary");
    assert!(
        line.contains(
            "api isPrimary=false isMaster=false isWorker=true id=1 env=1 process=true \
             connected=true dead=false workers=undefined instance=true"
        ),
        "{line}"
    );
    let out = rh.control(&["send", "--to", "1", r#"{"ping":"api"}"#]);
    assert!(out.status.success(), "{out:?}");
    rh.wait_line(
        |l| l.contains("message from worker") && l.contains(r#""via":"cluster.worker""#),
        "the pong sent with cluster.worker.send",
    );
    assert_eq!(get(rh.addr, "/").unwrap().status, 200);

    let out = rh.control(&["reload"]);
    assert!(out.status.success(), "{out:?}");
    rh.wait_log(&format!(
        "worker exited worker.id=1 worker.pid={pid} status=exit code 0"
    ));
    let log = rh.log();
    let at = |needle: &str| {
        log.find(needle)
            .unwrap_or_else(|| panic!("no `{needle}` in the log:\n{log}"))
    };
    let (wd, pd, term) = (
        at("event worker.disconnect id=1 connected=false"),
        at("event process.disconnect id=1"),
        at("event SIGTERM id=1"),
    );
    assert!(wd < pd && pd < term, "disconnect, then SIGTERM:\n{log}");
    assert_eq!(log.matches("event SIGTERM").count(), 1, "{log}");
}

/// Connections of the load in the drain tests (`wrk -c16`, as in the issue's figures).
const LOAD_CONNECTIONS: usize = 16;

/// Under load, 3 reloads and then `--max-requests` recycling: not one failed request for a
/// keep-alive client that never retries (as `wrk` counts).
fn drains_fail_no_request(name: &str, package: &str) {
    require_node!();
    let Some(app) = example_app(name, package) else {
        return;
    };
    // 3 reloads.
    {
        let rh = Rh::start(&app, 2, "rr");
        let before = rh.worker_pids();
        let started = Instant::now();
        let load = WrkLoad::start(rh.addr, LOAD_CONNECTIONS, "/");
        load.wait_more(200);
        for i in 0..3 {
            let out = rh.control(&["reload"]);
            assert!(out.status.success(), "{name}: reload {i}: {out:?}");
            load.wait_more(100);
        }
        let (ok, errors) = load.finish();
        assert!(
            errors.is_empty(),
            "{name}: {} failed requests (of {ok}) during 3 reloads, first: {:?}",
            errors.len(),
            &errors[..errors.len().min(5)]
        );
        let after = rh.worker_pids();
        for id in [1, 2] {
            assert_ne!(
                before[&id], after[&id],
                "{name}: worker {id} was not replaced"
            );
        }
        poll_until("the old workers to exit", || {
            rh.log().matches("status=exit code 0").count() >= 6
        });
        let log = rh.log();
        assert!(!log.contains("connections lost"), "{name}:\n{log}");
        assert!(!log.contains("killing worker"), "{name}:\n{log}");
        eprintln!(
            "{name}: 3 reloads, {ok} requests in {:.1} s, 0 failed",
            started.elapsed().as_secs_f64()
        );
    }
    // --max-requests: at least 2 recycles.
    {
        let rh = Rh::start_with(&app, 2, "rr", &["--max-requests", "400"]);
        let load = WrkLoad::start(rh.addr, LOAD_CONNECTIONS, "/");
        // Every drain here is a recycle (one that was due during another logs no line of its
        // own, so count the drains).
        poll_until("2 workers recycled", || {
            let log = rh.log();
            log.contains("worker reached --max-requests")
                && log.matches("draining worker").count() >= 2
                && log.matches("status=exit code 0").count() >= 2
        });
        load.wait_more(100);
        let (ok, errors) = load.finish();
        assert!(
            errors.is_empty(),
            "{name}: {} failed requests (of {ok}) while recycling, first: {:?}",
            errors.len(),
            &errors[..errors.len().min(5)]
        );
        let log = rh.log();
        let recycles = log.matches("draining worker").count();
        assert!(!log.contains("connections lost"), "{name}:\n{log}");
        assert!(!log.contains("killing worker"), "{name}:\n{log}");
        eprintln!("{name}: {recycles} recycles, {ok} requests, 0 failed");
    }
}

#[test]
fn express_reload_and_recycle_fail_no_request() {
    drains_fail_no_request("express", "express");
}

#[test]
fn fastify_reload_and_recycle_fail_no_request() {
    drains_fail_no_request("fastify", "fastify");
}

#[test]
fn koa_reload_and_recycle_fail_no_request() {
    drains_fail_no_request("koa", "koa");
}

/// Reads one websocket frame (server frames are not masked): (opcode, payload).
fn ws_frame(c: &mut BufReader<TcpStream>) -> io::Result<(u8, Vec<u8>)> {
    let mut head = [0u8; 2];
    c.read_exact(&mut head)?;
    let len = match head[1] & 0x7f {
        126 => {
            let mut b = [0u8; 2];
            c.read_exact(&mut b)?;
            u64::from(u16::from_be_bytes(b))
        }
        127 => {
            let mut b = [0u8; 8];
            c.read_exact(&mut b)?;
            u64::from_be_bytes(b)
        }
        n => u64::from(n),
    };
    let mut payload = vec![0u8; usize::try_from(len).unwrap()];
    c.read_exact(&mut payload)?;
    Ok((head[0] & 0x0f, payload))
}

/// An open websocket does not hold a drained worker for `--grace`: the app's own SIGTERM
/// handler closes it (1001) and the worker exits at once.
#[test]
fn websocket_closed_by_the_apps_sigterm_handler_and_worker_exits_early() {
    require_node!();
    let Some(app) = example_app("websocket", "ws") else {
        return;
    };
    let mut rh = Rh::start_with(&app, 1, "rr", &["--grace", "20s"]);
    let old = rh.worker_pids()[&1];
    let mut ws = connect(rh.addr).unwrap();
    write!(
        ws.get_mut(),
        "GET /chat HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .unwrap();
    let mut line = String::new();
    ws.read_line(&mut line).unwrap();
    assert!(line.starts_with("HTTP/1.1 101"), "{line:?}");
    while line.trim_end() != "" {
        line.clear();
        ws.read_line(&mut line).unwrap();
    }
    let (op, text) = ws_frame(&mut ws).unwrap();
    assert_eq!((op, text.as_slice()), (1, &b"hello from worker 1"[..]));

    let t0 = Instant::now();
    let out = rh.control(&["reload"]);
    assert!(out.status.success(), "{out:?}");
    let (op, payload) = ws_frame(&mut ws).unwrap();
    let closed_after = t0.elapsed();
    assert_eq!(op, 8, "a close frame");
    assert_eq!(&payload[..2], &1001u16.to_be_bytes(), "going away");
    // Our close frame in answer (masked, as a client's must be).
    let mask = [1u8, 2, 3, 4];
    let code = 1001u16.to_be_bytes();
    ws.get_mut()
        .write_all(&[0x88, 0x82, 1, 2, 3, 4, code[0] ^ mask[0], code[1] ^ mask[1]])
        .unwrap();
    // The server closes the TCP connection first (RFC 6455, 7.1.1); then so does the client.
    let mut rest = Vec::new();
    ws.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "nothing after the close frame: {rest:?}");
    drop(ws);
    poll_until("the old worker to exit", || !alive(old));
    let exited_after = t0.elapsed();
    eprintln!(
        "websocket: reload -> close frame {} ms, -> old worker gone {} ms (--grace 20s)",
        closed_after.as_millis(),
        exited_after.as_millis()
    );
    assert!(
        exited_after < Duration::from_secs(5),
        "the old worker took {exited_after:?} to exit"
    );
    rh.wait_log(&format!(
        "worker exited worker.id=1 worker.pid={old} status=exit code 0"
    ));
    let log = rh.log();
    assert!(log.contains("SIGTERM, closing 1 websocket(s)"), "{log}");
    assert!(!log.contains("connections lost"), "{log}");
    assert!(!log.contains("killing worker"), "{log}");
}

/// No silent hang: what roundhouse will not serve is one WARN line naming the worker — a
/// listen on a Unix socket, a server without a listener of its own, a `cluster.fork()` — and a
/// worker whose app never listens is not online (healthz 503) and is warned about.
#[test]
fn what_roundhouse_does_not_serve_is_a_warning_naming_the_worker() {
    require_node!();
    let dir = TempDir::new("warn");
    let app = dir.0.join("app.js");
    let sock = dir.0.join("app.sock");
    // A child process of the app that binds a port itself (it leaves with its parent).
    let child = dir.0.join("child.js");
    std::fs::write(
        &child,
        "require('http').createServer().listen(0, '127.0.0.1');\n\
         process.on('disconnect', () => process.exit(0));\n\
         setTimeout(() => process.exit(0), 20000).unref();\n",
    )
    .unwrap();
    std::fs::write(
        &app,
        format!(
            r#"
const cluster = require('cluster');
const http = require('http');
const hello = (req, res) => res.end('hello\n');
http.createServer(hello).listen(8000);
http.createServer(hello).listen(9090); // a second port, and roundhouse has one listener
http.createServer(hello).listen({sock:?});
try {{ cluster.fork(); }} catch (e) {{ console.log(`fork threw: ${{e.message}}`); }}
require('child_process').fork({child:?});
"#
        ),
    )
    .unwrap();
    let mut rh = Rh::start(&app, 1, "rr");
    let pid = rh.worker_pids()[&1];
    rh.wait_log("fork threw: roundhouse: cluster.fork() in a worker");
    for what in [
        "cluster.fork()",
        "server #2 (port 9090) has no roundhouse listener",
        "app.sock itself",
    ] {
        let line = rh.wait_line(|l| l.contains("WARN") && l.contains(what), what);
        assert!(
            line.contains(&format!("worker.id=1 worker.pid={pid}")),
            "{line}"
        );
    }
    // The child has no channel to the primary: its line is its own stderr, naming the worker.
    rh.wait_line(
        |l| l.contains("roundhouse: WARN worker 1: its child process") && l.contains("child.js"),
        "the child's warning",
    );
    assert_eq!(
        get(rh.addr, "/").unwrap().status,
        200,
        "the first server serves"
    );
    drop(rh);

    // An app that closes its server on its own: still online, so it says why it serves nothing.
    let closer = dir.0.join("closer.js");
    std::fs::write(
        &closer,
        "const s = require('http').createServer((q, r) => r.end('ok')).listen(8000);\n\
         setTimeout(() => s.close(), 200);\nsetInterval(() => {}, 1000);\n",
    )
    .unwrap();
    let mut rh = Rh::start(&closer, 1, "rr");
    let line = rh.wait_line(
        |l| l.contains("WARN") && l.contains("closed every server"),
        "the closed-server warning",
    );
    assert!(line.contains("worker.id=1"), "{line}");
    drop(rh);

    // An app that never listens: never online, /healthz says so, and a WARN says why.
    let silent = dir.0.join("silent.js");
    std::fs::write(&silent, "setInterval(() => {}, 1000);\n").unwrap();
    let mut rh = Rh::spawn(&silent, 1, "rr", &[]);
    rh.read_addrs();
    let line = rh.wait_line(
        |l| l.contains("WARN") && l.contains("has not listened"),
        "the no-listen warning",
    );
    assert!(line.contains("worker.id=1"), "{line}");
    assert!(!rh.log().contains("worker online"), "{}", rh.log());
    assert_eq!(http(rh.admin, "GET", "/healthz").unwrap().status, 503);
}

/// hello-worker's drain rules, connection by connection (`-w 1`, one reload): a request already
/// sent is answered with `Connection: close`; an idle keep-alive connection that sends its next
/// request during the drain is answered with `Connection: close`; one that stays silent is
/// closed about `KEEPALIVE_GRACE` (1 s) after the drain began, never at once.
#[test]
fn drain_follows_hello_workers_keepalive_rule() {
    require_node!();
    let mut rh = Rh::start(&plain_app(), 1, "rr");
    let old = rh.worker_pids()[&1];
    let ka = |path: &str| {
        let mut c = connect(rh.addr).unwrap();
        write_request(&mut c, "GET", path, false).unwrap();
        let r = read_response(&mut c).unwrap().expect("a response");
        assert!(!r.closes(), "{r:?}");
        c
    };
    let (mut busy, mut active, mut silent) = (ka("/"), ka("/"), ka("/"));
    // The silent one's end, timed as it happens.
    let silent = thread::spawn(move || {
        let r = read_response(&mut silent).unwrap();
        (r.is_none(), Instant::now())
    });
    write_request(&mut busy, "GET", "/sleep?ms=1500", false).unwrap();
    thread::sleep(Duration::from_millis(100)); // the slow request is in the worker

    // `reload` answers once the new worker is online and the old one told to drain.
    let out = rh.control(&["reload"]);
    let drained = Instant::now();
    assert!(out.status.success(), "{out:?}");
    rh.wait_log(&format!("draining worker worker.id=1 worker.pid={old}"));

    write_request(&mut active, "GET", "/whoami", false).unwrap();
    let r = read_response(&mut active)
        .unwrap()
        .expect("answered during the drain");
    assert_eq!(r.status, 200);
    assert!(r.closes(), "Connection: close during a drain: {r:?}");
    assert_eq!(r.worker(), 1);
    assert!(
        read_response(&mut active).unwrap().is_none(),
        "closed after it"
    );

    let r = read_response(&mut busy)
        .unwrap()
        .expect("the slow request is answered");
    assert_eq!(r.status, 200);
    assert!(r.closes(), "{r:?}");

    let (closed, at) = silent.join().unwrap();
    assert!(closed, "the silent one is closed, not answered");
    let after = at.saturating_duration_since(drained);
    assert!(
        after >= Duration::from_millis(500) && after < Duration::from_secs(5),
        "silent keep-alive connection closed {after:?} after the drain began (rule: ~1 s)"
    );
    eprintln!("silent keep-alive connection closed {after:?} after the drain began");
    rh.wait_log(&format!(
        "worker exited worker.id=1 worker.pid={old} status=exit code 0"
    ));
    assert!(!rh.log().contains("connections lost"), "{}", rh.log());
}

/// Under `none` and `reuseport` the app's server accepts on the inherited listener itself; a
/// drain closes that listener behind a stand-in handle. Under load, a reload fails no request
/// and the old workers exit on their own.
#[test]
fn drain_under_none_and_reuseport_fails_no_request() {
    require_node!();
    for policy in ["none", "reuseport"] {
        let rh = Rh::start(&plain_app(), 2, policy);
        let load = WrkLoad::start(rh.addr, LOAD_CONNECTIONS, "/");
        load.wait_more(200);
        let out = rh.control(&["reload"]);
        assert!(out.status.success(), "{policy}: {out:?}");
        load.wait_more(200);
        let (ok, errors) = load.finish();
        assert!(
            errors.is_empty(),
            "{policy}: {} failed requests (of {ok}), first: {:?}",
            errors.len(),
            &errors[..errors.len().min(5)]
        );
        poll_until(&format!("{policy}: the old workers to exit"), || {
            rh.log().matches("status=exit code 0").count() >= 2
        });
        assert!(
            !rh.log().contains("killing worker"),
            "{policy}: {}",
            rh.log()
        );
    }
}

/// A self-signed certificate for localhost (EC P-256, valid until 2126): test fixture only.
const TLS_KEY: &str = "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgNN1bpGW1uMwFs6DC\nhfWPOPwwn2D0DIp9mH9LlyKvjPChRANCAASlagm6hNzTFsFZuUWy9vmyE7Lrx0mh\nsC6PJRlyZJs3z4VUE0OtLuta5TDV2fm7aS5CJNDKOBE5EGliaAZGo+kS\n-----END PRIVATE KEY-----\n";
const TLS_CERT: &str = "-----BEGIN CERTIFICATE-----\nMIIBfzCCASWgAwIBAgIUaQ/QczSIk2Esgn2fRn9BgAyQ3hIwCgYIKoZIzj0EAwIw\nFDESMBAGA1UEAwwJbG9jYWxob3N0MCAXDTI2MTEyOTIxMDMyOFoYDzIxMjYxMTA1\nMjEwMzI4WjAUMRIwEAYDVQQDDAlsb2NhbGhvc3QwWTATBgcqhkjOPQIBBggqhkjO\nPQMBBwNCAASlagm6hNzTFsFZuUWy9vmyE7Lrx0mhsC6PJRlyZJs3z4VUE0OtLuta\n5TDV2fm7aS5CJNDKOBE5EGliaAZGo+kSo1MwUTAdBgNVHQ4EFgQUn7093B2TetX8\nJ4R8lcnEeZDefygwHwYDVR0jBBgwFoAUn7093B2TetX8J4R8lcnEeZDefygwDwYD\nVR0TAQH/BAUwAwEB/zAKBggqhkjOPQQDAgNIADBFAiEAlysMIMmE0O1TTDjkn7KF\nBTdTErTFWQQuZcrrixrxZAICIBcC1xIgZBaFcritoMFm/pRLAmIlGG+yAvCFvAIe\nl2KU\n-----END CERTIFICATE-----\n";

/// A child process killed and reaped on drop.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// HTTPS keeps its HTTP state on the TLS socket, not on the TCP socket the server counts: the
/// drain's keep-alive rule applies there too (an idle keep-alive HTTPS connection is closed about
/// a second after the drain began and the worker exits), not only after the 5 s cap.
#[test]
fn https_keepalive_connection_is_drained_by_the_same_rule() {
    require_node!();
    let dir = TempDir::new("tls");
    std::fs::write(dir.0.join("key.pem"), TLS_KEY).unwrap();
    std::fs::write(dir.0.join("cert.pem"), TLS_CERT).unwrap();
    let app = dir.0.join("app.js");
    std::fs::write(
        &app,
        "const fs = require('fs'); const path = require('path');\n\
         const opts = { key: fs.readFileSync(path.join(__dirname, 'key.pem')),\n\
                        cert: fs.readFileSync(path.join(__dirname, 'cert.pem')) };\n\
         require('https').createServer(opts, (q, r) => r.end('ok\\n')).listen(8443);\n",
    )
    .unwrap();
    // One request on a keep-alive agent, then the connection stays idle.
    let client = dir.0.join("client.js");
    std::fs::write(
        &client,
        "const https = require('https');\n\
         const agent = new https.Agent({ keepAlive: true, maxSockets: 1 });\n\
         const req = https.get({ host: '127.0.0.1', port: Number(process.argv[2]), agent,\n\
                     rejectUnauthorized: false }, (res) => {\n\
           res.resume();\n\
           res.on('end', () => console.log(`idle ${res.headers.connection}`));\n\
         });\n\
         req.on('socket', (s) => s.on('close', () => { console.log('closed'); process.exit(0); }));\n\
         req.on('error', (e) => { console.log(`error ${e.message}`); process.exit(1); });\n\
         setTimeout(() => process.exit(2), 20000);\n",
    )
    .unwrap();
    let mut rh = Rh::start(&app, 1, "rr");
    let old = rh.worker_pids()[&1];
    let mut c = ChildGuard(
        Command::new("node")
            .arg(&client)
            .arg(rh.addr.port().to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let mut out = BufReader::new(c.0.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "idle keep-alive", "the client's request");

    let out_reload = rh.control(&["reload"]);
    let drained = Instant::now();
    assert!(out_reload.status.success(), "{out_reload:?}");
    poll_until("the old worker to exit", || !alive(old));
    let after = drained.elapsed();
    line.clear();
    out.read_line(&mut line).unwrap();
    assert_eq!(
        line.trim(),
        "closed",
        "the server closed the idle connection"
    );
    assert!(
        after >= Duration::from_millis(500) && after < Duration::from_secs(4),
        "the worker holding an idle HTTPS keep-alive connection exited {after:?} after the drain"
    );
    rh.wait_log(&format!(
        "worker exited worker.id=1 worker.pid={old} status=exit code 0"
    ));
    assert!(!rh.log().contains("connections lost"), "{}", rh.log());
}

/// With a `--grace` shorter than the shim's 5 s, a worker busy with a response that never ends
/// (server-sent events) is still told in time: the shim tells the app at half of `--grace`
/// (`ROUNDHOUSE_GRACE_MS`), so the app's own `SIGTERM` handler runs and the worker exits 0
/// before it would be killed.
#[test]
fn a_short_grace_still_lets_the_apps_sigterm_handler_run() {
    require_node!();
    let dir = TempDir::new("grace");
    let app = dir.0.join("app.js");
    std::fs::write(
        &app,
        r#"
const http = require('http');
const server = http.createServer((req, res) => {
  if (req.url === '/events') {
    res.writeHead(200, { 'content-type': 'text/event-stream' });
    res.write('data: hello\n\n');
    return; // never ends
  }
  res.end('ok\n');
}).listen(8000);
process.on('SIGTERM', () => {
  console.log(`app sigterm grace=${process.env.ROUNDHOUSE_GRACE_MS}`);
  process.exit(0);
});
"#,
    )
    .unwrap();
    let mut rh = Rh::start_with(&app, 1, "rr", &["--grace", "2s"]);
    let old = rh.worker_pids()[&1];
    let mut events = connect(rh.addr).expect("connect");
    write_request(&mut events, "GET", "/events", false).expect("request");
    let mut first = String::new();
    events.read_line(&mut first).expect("status line");
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    let out = rh.control(&["reload"]);
    assert!(out.status.success(), "{out:?}");
    let line = rh.wait_log("app sigterm");
    assert!(line.contains("grace=2000"), "{line}");
    let exit = rh.wait_line(
        |l| l.contains("worker exited") && l.contains(&format!("worker.pid={old}")),
        "the old worker's exit",
    );
    assert!(
        exit.contains("exit code 0"),
        "killed instead of exiting: {exit}"
    );
}
