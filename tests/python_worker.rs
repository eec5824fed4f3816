//! The Python standard-library worker (`examples/python/worker.py`) under the real primary.
//!
//! Each test runs `roundhouse run -l 127.0.0.1:0 ... -- python3 examples/python/worker.py`,
//! reads the bound port and the workers' pids from the primary's log, and checks what a real
//! client sees. The worker was written from `docs/protocol.md` alone, so these tests are the
//! proof that the protocol document is enough to build a worker in another language.
//!
//! Every test is skipped, with a message on stderr, when `python3` is not installed.

use std::collections::{BTreeMap, HashSet};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

const ROUNDHOUSE: &str = env!("CARGO_BIN_EXE_roundhouse");
const WORKER_PY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/python/worker.py");
const START: Duration = Duration::from_secs(30);

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

// --- the primary under test ----------------------------------------------------------------------

/// A running `roundhouse run ... -- python3 worker.py`, its collected log, and a temp dir.
/// Dropping it kills the primary and its workers (by pid) and reaps the primary.
struct Primary {
    child: Child,
    log: Arc<(Mutex<Log>, Condvar)>,
    dir: PathBuf,
    control: PathBuf,
    command: String,
}

impl Primary {
    /// Starts the primary with `args` after `run`; in `env` values, `{dir}` is the test's temp dir.
    fn start(name: &str, args: &[&str], env: &[(&str, &str)]) -> Primary {
        let dir = std::env::temp_dir().join(format!("roundhouse-py-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the test's temp dir");
        let control = dir.join("control.sock");
        let mut cmd = Command::new(ROUNDHOUSE);
        cmd.arg("run")
            .args(["-l", "127.0.0.1:0", "--control"])
            .arg(&control)
            .args(args)
            .args(["--", "python3", WORKER_PY])
            .env("RUST_LOG", "info")
            .env_remove("ROUNDHOUSE_SCHED_POLICY")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v.replace("{dir}", &dir.to_string_lossy()));
        }
        let command = format!("{cmd:?}");
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("could not spawn {command}: {e}"));
        let stderr = child.stderr.take().expect("piped stderr");
        let log = Arc::new((Mutex::new(Log::default()), Condvar::new()));
        let sink = Arc::clone(&log);
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                sink.0.lock().unwrap().lines.push(line);
                sink.1.notify_all();
            }
            sink.0.lock().unwrap().closed = true;
            sink.1.notify_all();
        });
        Primary {
            child,
            log,
            dir,
            control,
            command,
        }
    }

    /// The command line and everything logged so far, for failure messages.
    fn dump(&self) -> String {
        let lines = self.log.0.lock().unwrap().lines.join("\n");
        format!(
            "command: {}\n--- log ---\n{lines}\n--- end of log ---",
            self.command
        )
    }

    fn lines(&self) -> Vec<String> {
        self.log.0.lock().unwrap().lines.clone()
    }

    /// The first log line satisfying `pred`, waiting up to `timeout`.
    fn wait_for(&self, what: &str, timeout: Duration, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + timeout;
        let (lock, cv) = &*self.log;
        let mut log = lock.lock().unwrap();
        loop {
            if let Some(line) = log.lines.iter().find(|l| pred(l)) {
                return line.clone();
            }
            let now = Instant::now();
            if now >= deadline || log.closed {
                let when = if log.closed {
                    "before the primary closed stderr"
                } else {
                    "in time"
                };
                drop(log);
                panic!(
                    "no log line {what} {when} (waited up to {timeout:?})\n{}",
                    self.dump()
                );
            }
            log = cv.wait_timeout(log, deadline - now).unwrap().0;
        }
    }

    /// Waits for a log line containing every one of `parts`.
    fn wait_line(&self, parts: &[&str], timeout: Duration) -> String {
        self.wait_for(&format!("containing {parts:?}"), timeout, |l| {
            parts.iter().all(|p| l.contains(p))
        })
    }

    fn listen_addr(&self) -> SocketAddr {
        let line = self.wait_for("`listening listener.addr=`", START, |l| {
            l.contains("listening") && field(l, "listener.addr").is_some()
        });
        field(&line, "listener.addr")
            .unwrap()
            .parse()
            .expect("listener.addr is host:port")
    }

    fn admin_addr(&self) -> SocketAddr {
        let line = self.wait_line(&["admin listening", "admin.addr="], START);
        field(&line, "admin.addr")
            .unwrap()
            .parse()
            .expect("admin.addr is host:port")
    }

    /// `(worker id, pid)` of every `worker online` line so far, in log order.
    fn online(&self) -> Vec<(u32, u32)> {
        self.lines()
            .iter()
            .filter(|l| l.contains("worker online"))
            .filter_map(|l| {
                Some((
                    field(l, "worker.id")?.parse().ok()?,
                    field(l, "worker.pid")?.parse().ok()?,
                ))
            })
            .collect()
    }

    /// Runs a control subcommand (`send`, `reload`, ...) against this primary.
    fn control(&self, sub: &str, args: &[&str]) -> Output {
        Command::new(ROUNDHOUSE)
            .arg(sub)
            .arg("--control")
            .arg(&self.control)
            .args(args)
            .output()
            .expect("run the control client")
    }

    fn assert_alive(&mut self) {
        let status = self.child.try_wait().expect("try_wait");
        assert!(
            status.is_none(),
            "the primary exited ({status:?})\n{}",
            self.dump()
        );
    }
}

/// The primary's stderr, line by line; `closed` once it reached end-of-file.
#[derive(Default)]
struct Log {
    lines: Vec<String>,
    closed: bool,
}

impl Drop for Primary {
    fn drop(&mut self) {
        let workers = children_of(self.child.id());
        let _ = self.child.kill();
        for pid in workers {
            // They die with the primary (parent-death signal); this is belt and braces.
            let _ =
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL);
        }
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The live children of `pid` (its workers), from `/proc/PID/task/*/children`.
fn children_of(pid: u32) -> Vec<i32> {
    let mut out = Vec::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for task in tasks.flatten() {
            if let Ok(s) = std::fs::read_to_string(task.path().join("children")) {
                out.extend(s.split_whitespace().filter_map(|p| p.parse::<i32>().ok()));
            }
        }
    }
    out
}

/// The value of a `key=value` field in a log line.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let pat = format!("{key}=");
    let mut from = 0;
    while let Some(i) = line[from..].find(&pat) {
        let at = from + i;
        let boundary = at == 0 || line[..at].ends_with([' ', '{', ',', ':']);
        if boundary {
            let rest = &line[at + pat.len()..];
            let end = rest.find([' ', ',', '}']).unwrap_or(rest.len());
            return Some(rest[..end].trim_matches('"'));
        }
        from = at + pat.len();
    }
    None
}

/// Starts two Python workers and waits until both are online.
fn start_two(name: &str, args: &[&str], env: &[(&str, &str)]) -> (Primary, SocketAddr) {
    let mut all = vec!["-w", "2"];
    all.extend_from_slice(args);
    let p = Primary::start(name, &all, env);
    p.wait_line(&["ready workers=2"], START);
    let addr = p.listen_addr();
    (p, addr)
}

// --- a tiny HTTP/1.1 client ----------------------------------------------------------------------

#[derive(Debug)]
struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn worker_id(&self) -> u32 {
        self.header("x-worker-id")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no x-worker-id header in {self:?}"))
    }
}

/// An error before any byte of the response: on a reused keep-alive connection the server may
/// have closed it as idle, and a client retries (as browsers and curl do).
#[derive(Debug)]
enum HttpError {
    Stale(io::Error),
    Broken(io::Error),
}

fn connect(addr: SocketAddr) -> io::Result<BufReader<TcpStream>> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
    stream.set_read_timeout(Some(Duration::from_secs(20)))?;
    stream.set_write_timeout(Some(Duration::from_secs(20)))?;
    Ok(BufReader::new(stream))
}

fn exchange(
    conn: &mut BufReader<TcpStream>,
    path: &str,
    close: bool,
) -> Result<Response, HttpError> {
    let extra = if close { "connection: close\r\n" } else { "" };
    let req = format!("GET {path} HTTP/1.1\r\nhost: test\r\n{extra}\r\n");
    conn.get_mut()
        .write_all(req.as_bytes())
        .map_err(HttpError::Stale)?;
    let mut line = String::new();
    match conn.read_line(&mut line) {
        Ok(0) => {
            return Err(HttpError::Stale(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "closed",
            )))
        }
        Ok(_) => {}
        Err(e) => return Err(HttpError::Stale(e)),
    }
    let broken = |what: &str| {
        HttpError::Broken(io::Error::new(io::ErrorKind::InvalidData, what.to_string()))
    };
    let status = line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| broken(&format!("bad status line {line:?}")))?;
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if conn.read_line(&mut h).map_err(HttpError::Broken)? == 0 {
            return Err(broken("closed in the response head"));
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h
            .split_once(':')
            .ok_or_else(|| broken(&format!("bad header {h:?}")))?;
        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
    }
    let len: usize = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .ok_or_else(|| broken("no content-length"))?;
    let mut body = vec![0; len];
    conn.read_exact(&mut body).map_err(HttpError::Broken)?;
    let body = String::from_utf8(body).map_err(|_| broken("body is not UTF-8"))?;
    Ok(Response {
        status,
        headers,
        body,
    })
}

/// One request on a fresh connection (`Connection: close`).
fn get(addr: SocketAddr, path: &str) -> io::Result<Response> {
    let mut conn = connect(addr)?;
    exchange(&mut conn, path, true).map_err(|e| match e {
        HttpError::Stale(e) | HttpError::Broken(e) => e,
    })
}

/// A keep-alive client: reuses its connection, reconnects after `Connection: close`, and retries
/// once when a reused connection fails before any byte of the response arrived.
struct KeepAlive {
    addr: SocketAddr,
    conn: Option<BufReader<TcpStream>>,
}

impl KeepAlive {
    fn new(addr: SocketAddr) -> Self {
        KeepAlive { addr, conn: None }
    }

    fn get(&mut self, path: &str) -> io::Result<Response> {
        let reused = self.conn.is_some();
        match self.try_get(path) {
            Err(HttpError::Stale(_)) if reused => self.try_get(path),
            other => other,
        }
        .map_err(|e| match e {
            HttpError::Stale(e) | HttpError::Broken(e) => e,
        })
    }

    fn try_get(&mut self, path: &str) -> Result<Response, HttpError> {
        let mut conn = match self.conn.take() {
            Some(c) => c,
            None => connect(self.addr).map_err(HttpError::Broken)?,
        };
        let resp = exchange(&mut conn, path, false)?;
        if !resp
            .header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"))
        {
            self.conn = Some(conn);
        }
        Ok(resp)
    }
}

fn whoami(resp: &Response) -> (u32, u32) {
    let v: serde_json::Value = serde_json::from_str(&resp.body)
        .unwrap_or_else(|e| panic!("/whoami body {:?} is not JSON: {e}", resp.body));
    let n = |k: &str| v[k].as_u64().unwrap_or_else(|| panic!("no {k} in {v}")) as u32;
    (n("worker_id"), n("pid"))
}

/// Background load: `threads` clients (alternately keep-alive and connection-per-request) asking
/// `/whoami` until stopped; every failure is recorded with its reason.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    failures: Arc<Mutex<Vec<String>>>,
    pids: Arc<Mutex<HashSet<u32>>>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Load {
    fn start(addr: SocketAddr, threads: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicUsize::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let pids = Arc::new(Mutex::new(HashSet::new()));
        let threads = (0..threads)
            .map(|i| {
                let (stop, ok, failures, pids) =
                    (stop.clone(), ok.clone(), failures.clone(), pids.clone());
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
                            Ok(r) => failures
                                .lock()
                                .unwrap()
                                .push(format!("status {}: {r:?}", r.status)),
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

    /// Waits until the load has `n` more successes than now (or panics after `timeout`).
    fn wait_ok(&self, n: usize, timeout: Duration, p: &Primary) {
        let target = self.ok.load(Ordering::Relaxed) + n;
        let deadline = Instant::now() + timeout;
        while self.ok.load(Ordering::Relaxed) < target {
            assert!(
                Instant::now() < deadline,
                "load made no progress\n{}",
                p.dump()
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    fn finish(self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().expect("load thread panicked");
        }
        (
            self.ok.load(Ordering::Relaxed),
            self.failures.lock().unwrap().clone(),
        )
    }
}

// --- the tests -----------------------------------------------------------------------------------

#[test]
fn python_workers_share_sequential_requests_equally_under_rr() {
    require_python3!();
    let (p, addr) = start_two("rr", &["--policy", "rr"], &[]);
    let mut per_worker = BTreeMap::new();
    for i in 0..40 {
        let r = get(addr, "/").unwrap_or_else(|e| panic!("request {i}: {e}\n{}", p.dump()));
        assert_eq!((r.status, r.body.as_str()), (200, "hello world\n"), "{r:?}");
        *per_worker.entry(r.worker_id()).or_insert(0u32) += 1;
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
    let (p, addr) = start_two("load", &[], &[]);
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
                        Ok(r) if r.status == want && (path != "/" || r.body == "hello world\n") => {
                            *served.lock().unwrap().entry(r.worker_id()).or_insert(0) += 1;
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
        "{} failures, first: {:?}\n{}",
        failures.len(),
        &failures[..failures.len().min(5)],
        p.dump()
    );
    let served = served.lock().unwrap();
    assert_eq!(served.values().sum::<u32>(), 240);
    assert_eq!(served.len(), 2, "both workers served: {served:?}");
}

#[test]
fn python_whoami_reports_the_workers_pid() {
    require_python3!();
    let (p, addr) = start_two("whoami", &[], &[]);
    let online: BTreeMap<u32, u32> = p.online().into_iter().collect();
    assert_eq!(online.len(), 2, "two `worker online` lines\n{}", p.dump());
    let mut seen = BTreeMap::new();
    for _ in 0..10 {
        let r = get(addr, "/whoami").expect("GET /whoami");
        assert_eq!(r.status, 200);
        assert!(r
            .header("content-type")
            .is_some_and(|v| v.starts_with("application/json")));
        let (id, pid) = whoami(&r);
        assert_eq!(
            id,
            r.worker_id(),
            "worker_id in the body matches x-worker-id"
        );
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
    let (p, _addr) = start_two("ping", &[], &[]);
    let out = p.control("send", &["--to", "all", r#"{"ping":4242}"#]);
    assert!(
        out.status.success(),
        "roundhouse send failed: {out:?}\n{}",
        p.dump()
    );
    for id in [1, 2] {
        // The primary logs messages addressed to it; the JSON may be quoted in the log line.
        let want = format!(r#""worker_id":{id}"#);
        p.wait_for(
            &format!("with the pong of worker {id}"),
            Duration::from_secs(10),
            |l| {
                let flat: String = l.chars().filter(|c| *c != '\\' && *c != ' ').collect();
                flat.contains(r#""pong":4242"#) && flat.contains(&want)
            },
        );
    }
}

#[test]
fn python_worker_stats_count_its_requests() {
    require_python3!();
    let (p, addr) = start_two("stats", &["--admin", "127.0.0.1:0"], &[]);
    let admin = p.admin_addr();
    let mut per_worker = BTreeMap::new();
    for _ in 0..30 {
        let r = get(addr, "/").expect("GET /");
        *per_worker.entry(r.worker_id() as u64).or_insert(0u64) += 1;
    }
    // STATS frames are batched (at most every 100 ms): poll until the totals arrive.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = get(admin, "/stats").expect("GET /stats");
        assert_eq!(r.status, 200, "{r:?}");
        let v: serde_json::Value = serde_json::from_str(&r.body).expect("/stats is JSON");
        let total = v["totals"]["requests_total"]
            .as_u64()
            .expect("totals.requests_total");
        assert!(total <= 30, "more requests counted than made: {v}");
        let workers: BTreeMap<u64, (u64, u64)> = v["workers"]
            .as_array()
            .expect("workers array")
            .iter()
            .map(|w| {
                let n = |k: &str| w[k].as_u64().unwrap_or_else(|| panic!("no {k} in {w}"));
                (n("id"), (n("requests_total"), n("connections_total")))
            })
            .collect();
        let requests: BTreeMap<u64, u64> = workers.iter().map(|(id, (r, _))| (*id, *r)).collect();
        if total == 30 && requests == per_worker {
            let conns: BTreeMap<u64, u64> = workers.iter().map(|(id, (_, c))| (*id, *c)).collect();
            assert_eq!(conns, per_worker, "one connection per request: {v}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "stats never reached {per_worker:?}: {v}\n{}",
            p.dump()
        );
        thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn python_workers_reload_under_load_without_failures() {
    require_python3!();
    reload_under_load("reload", |p| {
        let out = p.control("reload", &[]);
        assert!(
            out.status.success(),
            "roundhouse reload failed: {out:?}\n{}",
            p.dump()
        );
    });
}

#[test]
fn python_workers_reload_on_sighup_under_load_without_failures() {
    require_python3!();
    reload_under_load("sighup", |p| {
        let pid = nix::unistd::Pid::from_raw(p.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::SIGHUP).expect("SIGHUP the primary");
    });
}

/// Two Python workers under keep-alive and connection-per-request load; `reload` replaces them;
/// every request must succeed and the new workers must take over.
fn reload_under_load(name: &str, reload: impl FnOnce(&Primary)) {
    let (p, addr) = start_two(name, &["--grace", "10s"], &[]);
    let old: Vec<(u32, u32)> = p.online();
    let load = Load::start(addr, 4);
    load.wait_ok(40, START, &p);
    reload(&p);
    for (id, pid) in &old {
        let pid = format!("worker.pid={pid}");
        let line = p.wait_line(
            &["worker exited", &format!("worker.id={id}"), &pid],
            Duration::from_secs(60),
        );
        // Drained, not killed at the end of --grace: the Python worker finished and exited 0.
        assert!(
            line.contains("status=exit code 0"),
            "old worker {id} did not exit 0 after DRAIN: {line}\n{}",
            p.dump()
        );
    }
    let old_pids: HashSet<u32> = old.iter().map(|(_, pid)| *pid).collect();
    let new_pids: HashSet<u32> = p
        .online()
        .into_iter()
        .map(|(_, pid)| pid)
        .filter(|pid| !old_pids.contains(pid))
        .collect();
    assert_eq!(
        new_pids.len(),
        2,
        "two new workers online after the reload\n{}",
        p.dump()
    );
    let deadline = Instant::now() + START;
    while !new_pids.is_subset(&load.pids.lock().unwrap()) {
        assert!(
            Instant::now() < deadline,
            "the load never reached both new workers\n{}",
            p.dump()
        );
        thread::sleep(Duration::from_millis(10));
    }
    load.wait_ok(40, START, &p);
    let (ok, failures) = load.finish();
    assert!(
        failures.is_empty(),
        "{} of {} requests failed during the reload, first: {:?}\n{}",
        failures.len(),
        ok + failures.len(),
        &failures[..failures.len().min(5)],
        p.dump()
    );
}

#[test]
fn python_worker_writing_a_malformed_frame_is_killed_and_replaced() {
    require_python3!();
    // Worker 1 writes a garbage frame right after its third response, once (the marker file
    // makes its replacement behave).
    let spec = "garbage,after=3,worker=1,once={dir}/misbehaved";
    let (mut p, addr) = start_two("garbage", &[], &[("ROUNDHOUSE_PY_MISBEHAVE", spec)]);
    let old_pid = p
        .online()
        .into_iter()
        .find(|(id, _)| *id == 1)
        .expect("worker 1 online")
        .1;
    let mut failures = Vec::new();
    let mut served_by_new = false;
    let deadline = Instant::now() + START;
    let mut after_replacement = 0;
    while after_replacement < 20 {
        assert!(
            Instant::now() < deadline,
            "worker 1 was not replaced\n{}",
            p.dump()
        );
        match get(addr, "/whoami") {
            Ok(r) if r.status == 200 => {
                let (id, pid) = whoami(&r);
                served_by_new |= id == 1 && pid != old_pid;
            }
            other => failures.push(format!("{other:?}")),
        }
        if p.online()
            .iter()
            .any(|(id, pid)| *id == 1 && *pid != old_pid)
        {
            after_replacement += 1;
        }
    }
    assert!(
        failures.is_empty(),
        "{} requests failed: {failures:?}\n{}",
        failures.len(),
        p.dump()
    );
    assert!(
        served_by_new,
        "the replacement worker 1 served requests\n{}",
        p.dump()
    );
    assert!(
        p.dir.join("misbehaved").exists(),
        "the worker did misbehave"
    );
    let exited = p.wait_line(
        &[
            "worker exited",
            "worker.id=1",
            &format!("worker.pid={old_pid}"),
        ],
        START,
    );
    // The primary kills it; if the channel closes before the SIGKILL lands, the worker exits 0
    // on end-of-file by itself (docs/protocol.md 4.8). Either way it is gone and replaced.
    assert!(
        exited.contains("SIGKILL") || exited.contains("status=exit code 0"),
        "the worker was killed: {exited}\n{}",
        p.dump()
    );
    p.wait_line(&["protocol error", "worker.id=1"], START);
    let restarts_of_2 = p.online().iter().filter(|(id, _)| *id == 2).count();
    assert_eq!(restarts_of_2, 1, "worker 2 was left alone\n{}", p.dump());
    p.assert_alive();
}

#[test]
fn python_worker_serves_inherited_listeners_under_none_and_reuseport() {
    require_python3!();
    for policy in ["none", "reuseport"] {
        let (p, addr) = start_two(policy, &["--policy", policy], &[]);
        let mut ids = HashSet::new();
        let mut ka = KeepAlive::new(addr);
        for i in 0..40 {
            let r = if i % 2 == 0 {
                get(addr, "/")
            } else {
                ka.get("/")
            };
            let r = r.unwrap_or_else(|e| panic!("{policy}: request {i}: {e}\n{}", p.dump()));
            assert_eq!(
                (r.status, r.body.as_str()),
                (200, "hello world\n"),
                "{policy}: {r:?}"
            );
            ids.insert(r.worker_id());
        }
        assert!(ids.is_subset(&HashSet::from([1, 2])), "{policy}: {ids:?}");
    }
}
