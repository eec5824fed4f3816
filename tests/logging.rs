//! The log can never take the service down or stall it (SPEC): the primary and `hello-worker`
//! with stderr on a full disk (`/dev/full`), on a pipe whose reader is gone, and on a pipe nobody
//! reads keep serving, reloading and stopping cleanly, and lines they could not write are
//! counted and reported once writing works again.
//!
//! Before `roundhouse-log`, the first two made the primary panic at its next log line (exit 101,
//! every worker gone) and the third froze it once the pipe's 64 KiB were full.
//!
//! The accounting itself is tested end to end with a FIFO whose reader goes away and comes back
//! (`lines_lost_while_stderr_failed_are_reported_when_it_works_again`), and in-process, with
//! exact counts, in `crates/log`.
//!
//! A primary whose stderr the test cannot read does not tell us its port in the log: the tests
//! here ask it over the control socket instead (`roundhouse status --json` has `listeners` with
//! the bound port, and every worker's pid and state).

mod common;

use std::fs::File;
use std::io::Read;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use nix::unistd::Pid;

/// How long one reload may take on a loaded 2-core CI machine.
const RELOAD_TIMEOUT: Duration = Duration::from_secs(30);

/// Where the primary's stderr (and so its workers') goes.
enum Stderr {
    /// `2>/dev/full`: every write fails with `ENOSPC`.
    DevFull,
    /// A pipe whose read end is closed before the primary starts: every write fails with
    /// `EPIPE` (`... 2>&1 | head -1` once `head` is gone).
    ClosedPipe,
    /// A pipe the test holds but does not read until it chooses to; shrunk to one page so that
    /// it is full after a few lines.
    UnreadPipe,
    /// An fd the test opened (the write end of a FIFO).
    Fd(OwnedFd),
}

/// A `roundhouse run` with a stderr the harness does not capture; killed and reaped, with its
/// workers, on drop.
struct BlindPrimary {
    child: Child,
    status: Option<ExitStatus>,
    _dir: TempDir,
    control: PathBuf,
    tag: String,
    /// The read end of the stderr pipe, for [`Stderr::UnreadPipe`].
    pipe: Option<File>,
}

impl BlindPrimary {
    fn start(stderr: Stderr, workers: usize) -> BlindPrimary {
        let dir = TempDir::new();
        let control = dir.join("ctl.sock");
        let tag = unique_tag();
        let (err, pipe): (Stdio, Option<File>) = match stderr {
            Stderr::DevFull => (
                File::options()
                    .write(true)
                    .open("/dev/full")
                    .expect("open /dev/full")
                    .into(),
                None,
            ),
            Stderr::ClosedPipe => {
                let (r, w) = pipe();
                drop(r);
                (w.into(), None)
            }
            Stderr::UnreadPipe => {
                let (r, w) = pipe();
                shrink_pipe(&w);
                (w.into(), Some(r.into()))
            }
            Stderr::Fd(fd) => (fd.into(), None),
        };
        let child = Command::new(roundhouse_bin())
            .args(["run", "-l", "127.0.0.1:0", "-w", &workers.to_string()])
            .arg("--control")
            .arg(&control)
            .args(["--grace", "5s", "--", &hello_worker()])
            .env("RUST_LOG", "info")
            .env(TAG_VAR, &tag)
            .env_remove("ROUNDHOUSE_SCHED_POLICY")
            .env_remove("NOTIFY_SOCKET")
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("could not spawn {}: {e}", roundhouse_bin()));
        BlindPrimary {
            child,
            status: None,
            _dir: dir,
            control,
            tag,
            pipe,
        }
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// `roundhouse status --json` against it: the `/stats` document, or `None` (not up yet).
    fn stats(&self) -> Option<serde_json::Value> {
        let out = roundhouse(&[
            "status",
            "--json",
            "--control",
            self.control.to_str().unwrap(),
        ]);
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    /// Waits until `n` workers are online (and no other state is left); returns their pids.
    fn wait_online(&mut self, n: usize, timeout: Duration) -> Vec<i32> {
        let mut last = None;
        let ok = wait_until(timeout, Duration::from_millis(20), || {
            self.assert_alive();
            last = self.stats();
            last.as_ref().is_some_and(|s| {
                let ws = s["workers"].as_array().unwrap();
                ws.len() == n && ws.iter().all(|w| w["state"] == "online")
            })
        });
        assert!(
            ok,
            "{n} workers not online within {timeout:?}; last stats: {last:?}"
        );
        online_pids(last.as_ref().unwrap())
    }

    /// The listener's bound address, from `status --json`.
    fn addr(&self) -> SocketAddr {
        let s = self.stats().expect("status --json");
        s["listeners"][0]
            .as_str()
            .expect("listeners[0]")
            .parse()
            .expect("listener address")
    }

    fn reload(&self) {
        let ctl = self.control.to_str().unwrap();
        let args = ["reload", "--control", ctl];
        let out = roundhouse_with(&args, &[], RELOAD_TIMEOUT);
        assert!(out.status.success(), "{}", describe(&args, &out));
    }

    fn upgrade(&self) {
        let ctl = self.control.to_str().unwrap();
        let args = ["upgrade", "--control", ctl];
        let out = roundhouse_with(&args, &[], RELOAD_TIMEOUT);
        assert!(out.status.success(), "{}", describe(&args, &out));
    }

    fn assert_alive(&mut self) {
        if let Some(s) = self.child.try_wait().expect("try_wait") {
            self.status = Some(s);
            panic!("the primary exited: {}", status_str(&s));
        }
    }

    /// SIGTERM, then waits for the exit (a graceful stop within `--grace 5s`).
    fn terminate(&mut self) -> ExitStatus {
        signal_pid(self.pid(), Signal::SIGTERM);
        let mut status = None;
        let exited = wait_until(Duration::from_secs(20), POLL, || {
            status = self.child.try_wait().expect("try_wait");
            status.is_some()
        });
        assert!(exited, "the primary did not exit within 20 s of SIGTERM");
        self.status = status;
        status.unwrap()
    }
}

impl Drop for BlindPrimary {
    fn drop(&mut self) {
        if self.status.is_none() && matches!(self.child.try_wait(), Ok(None)) {
            // Stopped, it cannot start new workers while we kill the ones it has.
            let _ = nix::sys::signal::kill(Pid::from_raw(self.pid()), Signal::SIGSTOP);
        }
        for pid in processes_tagged(&self.tag) {
            if pid != self.pid() {
                signal_pid(pid, Signal::SIGKILL);
            }
        }
        if self.status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn unique_tag() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "rh-logging-{}-{}-{nanos:x}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

fn online_pids(stats: &serde_json::Value) -> Vec<i32> {
    stats["workers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|w| w["state"] == "online")
        .map(|w| w["pid"].as_i64().unwrap() as i32)
        .collect()
}

/// A pipe, close-on-exec (the child gets its end through `Stdio`): (read end, write end).
fn pipe() -> (OwnedFd, OwnedFd) {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).expect("pipe2")
}

/// Shrinks a pipe to one page, so that a few log lines fill it.
fn shrink_pipe(w: &OwnedFd) {
    use std::os::fd::AsRawFd;
    let _ = nix::fcntl::fcntl(w.as_raw_fd(), nix::fcntl::FcntlArg::F_SETPIPE_SZ(4096));
}

/// Requests that must all be answered, with a deadline each.
fn serve_burst(addr: SocketAddr, n: usize, timeout: Duration) {
    for i in 0..n {
        let r = get_timeout(addr, "/", timeout)
            .unwrap_or_else(|e| panic!("request {i} of {n} to {addr}: {e}"));
        assert_eq!(r.status, 200, "request {i}: {r:?}");
        assert_eq!(r.text(), "hello world\n");
    }
}

/// After the primary exited: the workers it had are gone (reaped), and so is every process
/// carrying its tag. Earlier generations are checked by the tag only: their pids may have been
/// reused by now on a busy machine (`pid_max` can be 32768).
fn assert_reaped(p: &BlindPrimary, last: &[i32]) {
    let gone = wait_until(Duration::from_secs(5), POLL, || {
        last.iter().all(|pid| !pid_alive(*pid)) && processes_tagged(&p.tag).is_empty()
    });
    let left: Vec<i32> = last.iter().copied().filter(|pid| pid_alive(*pid)).collect();
    assert!(
        gone,
        "still alive after the primary exited: workers {left:?}, tagged {:?}",
        processes_tagged(&p.tag)
    );
}

/// Serves, reloads, serves, and exits 0 on SIGTERM with every worker gone, while each write to
/// stderr fails.
fn survives_a_failing_stderr(stderr: Stderr) {
    let mut p = BlindPrimary::start(stderr, 2);
    let first = p.wait_online(2, STARTUP);
    let addr = p.addr();
    serve_burst(addr, 50, HTTP_TIMEOUT);
    p.reload();
    let second = p.wait_online(2, STARTUP);
    assert!(
        second.iter().all(|pid| !first.contains(pid)),
        "a reload replaces every worker: before {first:?}, after {second:?}"
    );
    serve_burst(addr, 50, HTTP_TIMEOUT);
    p.reload();
    let third = p.wait_online(2, STARTUP);
    serve_burst(addr, 10, HTTP_TIMEOUT);
    let status = p.terminate();
    assert_eq!(
        status.code(),
        Some(0),
        "exit status {}",
        status_str(&status)
    );
    assert_reaped(&p, &third);
}

#[test]
fn stderr_on_a_full_disk_costs_lines_not_the_service() {
    survives_a_failing_stderr(Stderr::DevFull);
}

#[test]
fn stderr_a_pipe_whose_reader_is_gone_costs_lines_not_the_service() {
    survives_a_failing_stderr(Stderr::ClosedPipe);
}

/// Reads everything from `r` until end of file (every writer gone) or `timeout`.
fn drain(mut r: File, timeout: Duration) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        let mut buf = [0u8; 65536];
        while Instant::now() < deadline {
            match r.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    })
}

/// A stderr pipe nobody reads: once it is full, the primary must go on as if nothing happened —
/// before, it froze at its next log line (new connections timed out, `status` hung). When the
/// pipe is drained, what was queued is written, and any lines lost are reported by count.
#[test]
fn a_stderr_pipe_nobody_reads_never_stalls_the_primary() {
    let mut p = BlindPrimary::start(Stderr::UnreadPipe, 2);
    let mut pids = p.wait_online(2, STARTUP);
    let addr = p.addr();
    let mut worst = Duration::ZERO;
    let all_started = Instant::now();
    for i in 0..60 {
        p.reload();
        let started = Instant::now();
        let r = get_timeout(addr, "/", Duration::from_secs(1))
            .unwrap_or_else(|e| panic!("request after reload {i}: {e} (a stalled primary?)"));
        assert_eq!(r.status, 200, "request after reload {i}: {r:?}");
        worst = worst.max(started.elapsed());
        let now = online_pids(&p.stats().expect("status --json"));
        assert!(
            now.iter().all(|pid| !pids.contains(pid)),
            "reload {i} replaced every worker: before {pids:?}, after {now:?}"
        );
        pids = now;
    }
    let took = all_started.elapsed();
    eprintln!(
        "FIGURE logging unread pipe: 60 reloads in {took:?}, slowest request after one {worst:?}"
    );

    // Drain: the queued lines come out; lost ones are reported with their count.
    let reader = drain(p.pipe.take().unwrap(), Duration::from_secs(30));
    serve_burst(addr, 5, HTTP_TIMEOUT);
    let status = p.terminate();
    assert_eq!(
        status.code(),
        Some(0),
        "exit status {}",
        status_str(&status)
    );
    assert_reaped(&p, &pids);
    let text = reader.join().unwrap();
    assert!(
        text.len() > 4096,
        "the pipe (one page) was never full: {} bytes logged",
        text.len()
    );
    assert!(!text.contains("panicked"), "a panic in the log:\n{text}");
    // Every line the primary logged is either in the output or counted in a notice: about 5
    // lines per reload, so with nothing lost there are 60 reloads' worth of `worker online`.
    let lost: u64 = text
        .lines()
        .filter_map(|l| l.strip_prefix("roundhouse: "))
        .filter_map(|l| l.strip_suffix(" log lines could not be written"))
        .map(|n| n.parse::<u64>().expect("a count in the notice"))
        .sum();
    let online = text.lines().filter(|l| l.contains("worker online")).count() as u64;
    assert!(
        online + lost >= 2 + 60 * 2,
        "{online} `worker online` lines and {lost} reported lost, for 122 workers started:\n{text}"
    );
    assert!(
        text.contains("all workers stopped") || lost > 0,
        "the last line before exit is missing and no loss was reported:\n{text}"
    );
}

/// An in-place upgrade with a stderr pipe nobody reads: the exec waits at most a moment for the
/// log, so the primary keeps accepting (lines still queued go with the old image).
#[test]
fn upgrades_with_a_stderr_pipe_nobody_reads_never_stall_the_primary() {
    let mut p = BlindPrimary::start(Stderr::UnreadPipe, 2);
    let pids = p.wait_online(2, STARTUP);
    let addr = p.addr();
    // Fill the pipe first: reloads log a few lines each.
    for _ in 0..20 {
        p.reload();
    }
    let pids_before = online_pids(&p.stats().expect("status --json"));
    // A client asking all along, each request with a second to be answered.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let prober = {
        let stop = stop.clone();
        thread::spawn(move || {
            let (mut worst, mut n) = (Duration::ZERO, 0);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let started = Instant::now();
                let r = get_timeout(addr, "/", Duration::from_secs(1));
                if !r.as_ref().is_ok_and(|r| r.status == 200) {
                    return Err(format!("request {n}: {r:?} (a stalled primary?)"));
                }
                worst = worst.max(started.elapsed());
                n += 1;
                thread::sleep(Duration::from_millis(2));
            }
            Ok((n, worst))
        })
    };
    for i in 0..5 {
        p.upgrade();
        p.assert_alive();
        let stats = p.stats().expect("status --json");
        assert_eq!(stats["pid"].as_i64(), Some(p.pid() as i64));
        assert_eq!(
            online_pids(&stats),
            pids_before,
            "upgrade {i} replaced workers"
        );
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (n, worst) = prober.join().unwrap().unwrap_or_else(|e| panic!("{e}"));
    assert!(n > 0);
    eprintln!("FIGURE logging unread pipe: 5 upgrades, {n} requests, slowest {worst:?}");
    let _reader = drain(p.pipe.take().unwrap(), Duration::from_secs(30));
    let status = p.terminate();
    assert_eq!(
        status.code(),
        Some(0),
        "exit status {}",
        status_str(&status)
    );
    let _ = pids;
}

/// `hello-worker` alone with stderr on a full disk (its primary's log is fine): it used to panic
/// at its first log line. It must serve, survive a burst, drain on reload and exit 0.
#[test]
fn hello_worker_with_stderr_on_a_full_disk_serves_and_drains() {
    let worker = hello_worker();
    let mut p = Primary::builder()
        .workers(2)
        .args(&["--grace", "5s"])
        .cmd(&["/bin/sh", "-c", "exec \"$0\" 2>/dev/full", worker.as_str()])
        .start();
    p.wait_ready();
    let addr = p.addr();
    let first = p.worker_pids();
    assert_eq!(first.len(), 2, "{first:?}");
    // A burst, with keep-alive too: a logging worker that dies shows up as a failed request.
    serve_burst(addr, 100, HTTP_TIMEOUT);
    let mut conn = HttpConn::connect(addr).expect("connect");
    for i in 0..100 {
        let r = conn
            .get("/whoami")
            .unwrap_or_else(|e| panic!("keep-alive request {i}: {e}"));
        assert_eq!(r.status, 200);
    }
    drop(conn);
    assert_eq!(p.count("worker exited"), 0, "a worker exited under load");
    assert_eq!(p.worker_pids(), first, "workers were replaced under load");

    let out = p.client(&["reload"]);
    assert!(out.status.success(), "{}", describe(&["reload"], &out));
    for (id, pid) in &first {
        p.wait_for_event(
            "worker exited",
            &[
                ("worker.id", &id.to_string()),
                ("worker.pid", &pid.to_string()),
            ],
            STARTUP,
        );
    }
    for line in p.lines_matching("worker exited") {
        assert!(
            line.contains("status=exit code 0"),
            "a drained worker must exit 0, not panic (101): {}",
            line.text
        );
    }
    serve_burst(addr, 20, HTTP_TIMEOUT);
    p.signal(Signal::SIGTERM);
    let status = p.wait_exit(Duration::from_secs(20));
    assert_eq!(
        status.code(),
        Some(0),
        "exit status {}",
        status_str(&status)
    );
}

/// Opens `path` (a FIFO) with `flags`, close-on-exec.
fn open_fifo(path: &std::path::Path, flags: nix::fcntl::OFlag) -> OwnedFd {
    use std::os::fd::FromRawFd;
    let fd = nix::fcntl::open(
        path,
        flags | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    // SAFETY: `open` just returned this fd and nothing else owns it.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Reads the non-blocking `r` until `done(text so far)`; panics after `timeout`.
fn read_until(r: &mut File, timeout: Duration, done: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + timeout;
    let mut got = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        let text = String::from_utf8_lossy(&got).into_owned();
        if done(&text) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?}; read so far:\n{text}"
        );
        match r.read(&mut buf) {
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => thread::sleep(POLL),
            Err(e) => panic!("read: {e}"),
        }
    }
}

/// The loss accounting end to end: stderr is a FIFO whose reader goes away (every write fails
/// with `EPIPE`) during a reload, then a new reader opens it. The lines logged meanwhile are
/// reported by count before the next line, and the service never noticed.
#[test]
fn lines_lost_while_stderr_failed_are_reported_when_it_works_again() {
    use nix::fcntl::OFlag;
    let dir = TempDir::new();
    let fifo = dir.join("stderr.fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
    // A writer can only open a FIFO that has a reader.
    let first_reader = open_fifo(&fifo, OFlag::O_RDONLY | OFlag::O_NONBLOCK);
    let writer = open_fifo(&fifo, OFlag::O_WRONLY);
    let mut p = BlindPrimary::start(Stderr::Fd(writer), 2);
    let mut first_reader = File::from(first_reader);
    read_until(&mut first_reader, STARTUP, |t| {
        t.contains("ready workers=2")
    });
    let addr = p.addr();

    // The reader goes away: everything logged now fails (EPIPE), counted.
    drop(first_reader);
    p.reload();
    p.wait_online(2, STARTUP);
    serve_burst(addr, 20, HTTP_TIMEOUT);

    // A reader again; the next line the primary logs is preceded by the count.
    let mut reader = File::from(open_fifo(&fifo, OFlag::O_RDONLY | OFlag::O_NONBLOCK));
    p.reload();
    let pids = p.wait_online(2, STARTUP);
    let text = read_until(&mut reader, STARTUP, |t| {
        t.lines().filter(|l| l.contains("worker online")).count() >= 2
    });
    let notice = text
        .lines()
        .find_map(|l| {
            l.strip_prefix("roundhouse: ")?
                .strip_suffix(" log lines could not be written")
        })
        .unwrap_or_else(|| panic!("no loss notice from the primary:\n{text}"));
    let lost: u64 = notice.parse().expect("a count");
    // At least the first reload's `worker started` and `worker online` lines of both slots.
    assert!(lost >= 4, "only {lost} lines reported lost:\n{text}");
    // Before the lines of the second reload, not after.
    let at = text.find(" log lines could not be written").unwrap();
    let first_online = text.find("worker online").unwrap();
    assert!(at < first_online, "the notice comes first:\n{text}");
    let status = p.terminate();
    assert_eq!(
        status.code(),
        Some(0),
        "exit status {}",
        status_str(&status)
    );
    assert_reaped(&p, &pids);
}
