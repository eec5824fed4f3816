//! The shared harness of roundhouse's integration tests.
//!
//! Every file in `tests/` that drives the real binaries starts with `mod common;` and uses this
//! module. Nothing here needs a crate beyond the root package's dev-dependencies (`nix`,
//! `serde_json`, `libc`).
//!
//! # What it gives you
//!
//! - [`Primary`]: a running `roundhouse run` with its own temp dir, control socket, captured log
//!   and a kill-and-reap guard. Start it with [`Primary::start`] (extra `run` flags, default worker
//!   command `hello-worker`) or [`Primary::builder`] when the test needs to choose the worker
//!   command, listeners, environment, or write files into the temp dir before starting;
//!   [`PrimaryBuilder::start_program`] runs an embedding program (e.g. `examples/embed`) the
//!   same way, and [`PrimaryBuilder::nofile_limit`] starts it under a low `RLIMIT_NOFILE`.
//!   Then: [`Primary::wait_ready`], [`Primary::addr`], [`Primary::admin_addr`], [`Primary::stats`],
//!   [`Primary::worker_pids`], [`Primary::wait_worker_online`], [`Primary::signal`],
//!   [`Primary::wait_exit`], [`Primary::wait_for_log`] / [`Primary::wait_for_event`] /
//!   [`Primary::wait_for_count`], [`Primary::client`] (a control command against this primary).
//! - A tiny HTTP/1.1 client over `std::net::TcpStream`: [`get`], [`get_timeout`], [`request`]
//!   (one request per connection, `Connection: close`) and [`HttpConn`] (several requests on one
//!   keep-alive connection, or send and read separately), [`KeepAliveClient`] (keep-alive that
//!   retries like a browser: only a request whose reused connection closed before any response
//!   byte). [`Response::worker_id`] reads the `x-worker-id` header.
//! - [`Load`]: background client threads (connection-per-request or mixed keep-alive) that
//!   record every success, failure and serving worker, for tests under load.
//! - Process helpers reading `/proc`: [`pid_alive`], [`children_of`], [`descendants_of`],
//!   [`fd_targets`], [`environ_of`], [`processes_tagged`], [`proc_rss_kib`], [`proc_cpu_time`],
//!   and [`wait_until`] (poll with a
//!   deadline — the only way tests synchronise; never a fixed sleep).
//! - [`server_side_socket`] (an exact `sock_diag` lookup) to know, without sleeping, whether a
//!   request has been read by a worker (`rx_queue == 0`) or which process holds a connection
//!   ([`pid_holds_socket`] with its inode).
//! - [`Gate`]: a worker command that is *started* but not *online* until the test opens the gate
//!   (the reliable way to have no worker online), and [`PrimaryBuilder::inherit_stray_fd`] to
//!   hand the primary an inheritable fd a worker must not get.
//! - `ROUNDHOUSE_TEST_WORKER=/path/to/worker`: run the same tests with another worker than
//!   `hello-worker` (e.g. `examples/python/worker.py`); see [`hello_worker`].
//! - [`roundhouse`] / [`roundhouse_with`]: one-shot CLI invocations (usage errors, client
//!   commands) with a timeout, and [`describe`] to print command, status, stdout and stderr.
//! - [`TempDir`]: a per-test directory under `/tmp`, removed on drop.
//!
//! # Cleaning up
//!
//! Every process a test starts is tagged: the harness sets `ROUNDHOUSE_TEST_TAG=<unique>` in the
//! primary's environment, which its workers inherit. When a [`Primary`] is dropped (test passed or
//! panicked) it stops the primary (`SIGSTOP`, so it cannot start new workers), SIGKILLs every
//! worker pid it logged and every descendant of the primary — only processes carrying its tag or
//! still children of the stopped primary — then SIGKILLs and reaps the primary. If the test is
//! panicking, the command line and the whole captured log are printed to the test's stderr
//! (shown by `cargo test` for failing tests).
//!
//! # Log lines relied on
//!
//! The primary logs with tracing's fmt layer to stderr (`RUST_LOG=info` is set); the harness
//! strips ANSI escapes and parses `key=value` fields with [`log_field`]:
//! `listening listener.addr=…`, `admin listening admin.addr=…`,
//! `worker started worker.id=N worker.pid=P`, `worker online worker.id=N worker.pid=P`,
//! `worker exited worker.id=N worker.pid=P status=…`,
//! `restarting worker worker.id=N delay_ms=D`, `ready workers=N`.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub use nix::sys::signal::Signal;
use nix::unistd::Pid;

/// How long a primary may take to log its listeners / become ready.
pub const STARTUP: Duration = Duration::from_secs(20);
/// Default timeout of one HTTP exchange.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(10);
/// Default timeout of a one-shot CLI invocation.
pub const CLI_TIMEOUT: Duration = Duration::from_secs(10);
/// Poll interval of the waiting helpers.
pub const POLL: Duration = Duration::from_millis(10);
/// The environment variable that tags every process a test starts.
pub const TAG_VAR: &str = "ROUNDHOUSE_TEST_TAG";

/// Path of the `roundhouse` binary under test.
pub fn roundhouse_bin() -> &'static str {
    env!("CARGO_BIN_EXE_roundhouse")
}

/// Path of the worker the tests run by default: the `hello-worker` binary under test, or the
/// executable named by `ROUNDHOUSE_TEST_WORKER` when set (to run the same end-to-end tests against
/// another implementation of the routes and protocol, e.g. `examples/python/worker.py`).
pub fn hello_worker() -> String {
    match std::env::var("ROUNDHOUSE_TEST_WORKER") {
        Ok(w) if !w.is_empty() => w,
        _ => env!("CARGO_BIN_EXE_hello-worker").to_string(),
    }
}

fn unique(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{prefix}-{}-{n}-{nanos:x}", std::process::id())
}

// ---------------------------------------------------------------------------------------------
// Temp dirs
// ---------------------------------------------------------------------------------------------

/// A directory of its own for one test, removed (recursively) on drop.
///
/// Created under `$TMPDIR` when that path is short, else `/tmp`, so that a Unix socket inside it
/// stays well under the 108-byte `sun_path` limit.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new() -> TempDir {
        let mut base = std::env::temp_dir();
        if base.as_os_str().len() > 40 {
            base = PathBuf::from("/tmp");
        }
        let path = base.join(unique("rh-test"));
        fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("could not create temp dir {}: {e}", path.display()));
        TempDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, name: impl AsRef<Path>) -> PathBuf {
        self.path.join(name)
    }

    /// Writes `body` to `name` in this dir with mode 0755 and returns its path.
    pub fn write_script(&self, name: &str, body: &str) -> PathBuf {
        let path = self.join(name);
        fs::write(&path, body).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755))
            .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
        path
    }
}

impl Default for TempDir {
    fn default() -> Self {
        TempDir::new()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// A file whose existence lets gated workers proceed: a worker started from
/// [`Gate::worker_cmd`] polls for the file, then `exec`s `hello-worker` (same pid). Until the test
/// calls [`Gate::open`], such a worker is *started* but not *online* — the reliable way to have
/// no worker online. It runs as `/bin/sh -c`, which opens no file of its own while it waits, so
/// its `/proc/<pid>/fd` is exactly what it inherited.
pub struct Gate {
    path: PathBuf,
}

impl Gate {
    /// A gate at `<dir>/<name>`, initially closed.
    pub fn new(dir: &TempDir, name: &str) -> Gate {
        Gate {
            path: dir.join(name),
        }
    }

    /// `/bin/sh -c 'while [ ! -e GATE ]; do sleep 0.02; done; exec hello-worker "$@"' gated-worker`
    pub fn worker_cmd(&self) -> Vec<String> {
        vec![
            "/bin/sh".to_string(),
            "-c".to_string(),
            format!(
                "while [ ! -e '{}' ]; do sleep 0.02; done; exec '{}' \"$@\"",
                self.path.display(),
                hello_worker()
            ),
            "gated-worker".to_string(),
        ]
    }

    pub fn open(&self) {
        fs::write(&self.path, b"")
            .unwrap_or_else(|e| panic!("create {}: {e}", self.path.display()));
    }

    pub fn close(&self) {
        let _ = fs::remove_file(&self.path);
    }
}

// ---------------------------------------------------------------------------------------------
// Captured log
// ---------------------------------------------------------------------------------------------

/// One line of captured output, with the time the harness read it.
#[derive(Clone, Debug)]
pub struct LogLine {
    pub at: Instant,
    pub text: String,
}

impl LogLine {
    /// The value of `key=value` in this line (see [`log_field`]).
    pub fn field(&self, key: &str) -> Option<String> {
        log_field(&self.text, key)
    }

    /// The value of `key` parsed as `T`.
    pub fn field_as<T: std::str::FromStr>(&self, key: &str) -> Option<T> {
        self.field(key).and_then(|v| v.parse().ok())
    }

    pub fn contains(&self, s: &str) -> bool {
        self.text.contains(s)
    }

    /// Seconds since midnight UTC from the line's leading RFC 3339 timestamp (tracing's default
    /// format, e.g. `2025-11-25T08:54:00.123456Z`), if it has one.
    pub fn timestamp(&self) -> Option<f64> {
        let first = self.text.split_whitespace().next()?;
        let (_, time) = first.split_once('T')?;
        let time = time.trim_end_matches('Z');
        let time = time.split(['+', '-']).next()?;
        let mut it = time.split(':');
        let h: f64 = it.next()?.parse().ok()?;
        let m: f64 = it.next()?.parse().ok()?;
        let s: f64 = it.next()?.parse().ok()?;
        Some(h * 3600.0 + m * 60.0 + s)
    }

    /// Time from `earlier` to this line: by the log's own timestamps when both lines have one
    /// (exact even if the reader thread was slow), else by when the harness read them.
    pub fn since(&self, earlier: &LogLine) -> Duration {
        match (earlier.timestamp(), self.timestamp()) {
            (Some(a), Some(b)) => {
                let mut d = b - a;
                if d < -43200.0 {
                    d += 86400.0; // midnight
                }
                Duration::from_secs_f64(d.max(0.0))
            }
            _ => self.at.saturating_duration_since(earlier.at),
        }
    }
}

/// The value of a structured field `key=value` in a tracing fmt line: the *last* occurrence
/// (event fields follow span fields), preceded by start, space, `{`, `,` or `:`, ending at
/// whitespace, `}` or `,`; a value in double quotes is unquoted.
pub fn log_field(line: &str, key: &str) -> Option<String> {
    let pat = format!("{key}=");
    let mut found = None;
    let mut start = 0;
    while let Some(pos) = line[start..].find(&pat) {
        let at = start + pos;
        let ok_before = at == 0
            || matches!(
                line[..at].chars().next_back(),
                Some(' ' | '{' | ',' | ':' | '\t')
            );
        if ok_before {
            let rest = &line[at + pat.len()..];
            let value = if let Some(quoted) = rest.strip_prefix('"') {
                quoted.split('"').next().unwrap_or("").to_string()
            } else {
                rest.split(|c: char| c.is_whitespace() || c == '}' || c == ',')
                    .next()
                    .unwrap_or("")
                    .to_string()
            };
            found = Some(value);
        }
        start = at + pat.len();
    }
    found
}

/// Removes ANSI escape sequences (`ESC [ ... letter`).
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

#[derive(Default)]
struct LogState {
    lines: Vec<LogLine>,
    open_streams: usize,
}

/// A log shared between reader threads and the test.
#[derive(Clone, Default)]
pub struct Log {
    inner: Arc<(Mutex<LogState>, Condvar)>,
}

impl Log {
    fn spawn_reader<R: Read + Send + 'static>(&self, stream: R, prefix: &'static str) {
        self.inner.0.lock().unwrap().open_streams += 1;
        let log = self.clone();
        thread::spawn(move || {
            let mut reader = BufReader::new(stream);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match reader.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let raw = String::from_utf8_lossy(&buf);
                        let text =
                            format!("{prefix}{}", strip_ansi(raw.trim_end_matches(['\n', '\r'])));
                        let (m, cv) = &*log.inner;
                        m.lock().unwrap().lines.push(LogLine {
                            at: Instant::now(),
                            text,
                        });
                        cv.notify_all();
                    }
                }
            }
            let (m, cv) = &*log.inner;
            m.lock().unwrap().open_streams -= 1;
            cv.notify_all();
        });
    }

    pub fn lines(&self) -> Vec<LogLine> {
        self.inner.0.lock().unwrap().lines.clone()
    }

    pub fn text(&self) -> String {
        let st = self.inner.0.lock().unwrap();
        let mut s = String::new();
        for l in &st.lines {
            s.push_str(&l.text);
            s.push('\n');
        }
        s
    }

    /// Waits until every captured stream reached end-of-file; false on timeout.
    pub fn wait_closed(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let (m, cv) = &*self.inner;
        let mut st = m.lock().unwrap();
        while st.open_streams > 0 {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            st = cv.wait_timeout(st, deadline - now).unwrap().0;
        }
        true
    }

    /// True once every captured stream reached end-of-file.
    pub fn closed(&self) -> bool {
        self.inner.0.lock().unwrap().open_streams == 0
    }

    /// Waits until `f` returns `Some` for the current lines, or `timeout` elapses; `alive` is
    /// consulted on every wake-up and the wait gives up early when it has been false for 300 ms
    /// (the producing process is gone, no new line will come).
    fn wait_with<T>(
        &self,
        timeout: Duration,
        alive: &dyn Fn() -> bool,
        f: &dyn Fn(&[LogLine]) -> Option<T>,
    ) -> Option<T> {
        let deadline = Instant::now() + timeout;
        let mut dead_since: Option<Instant> = None;
        let (m, cv) = &*self.inner;
        let mut st = m.lock().unwrap();
        loop {
            if let Some(v) = f(&st.lines) {
                return Some(v);
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            if !alive() {
                let since = *dead_since.get_or_insert(now);
                if now.duration_since(since) > Duration::from_millis(300) {
                    return None;
                }
            }
            let wait = (deadline - now).min(Duration::from_millis(50));
            st = cv.wait_timeout(st, wait).unwrap().0;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The primary
// ---------------------------------------------------------------------------------------------

/// How to start a primary. `Primary::builder()` returns one with: a fresh [`TempDir`], listener
/// `127.0.0.1:0`, control socket `<dir>/ctl.sock`, the machine's default worker count, and worker
/// command `hello-worker`.
pub struct PrimaryBuilder {
    dir: TempDir,
    listen: Vec<String>,
    workers: Option<usize>,
    flags: Vec<String>,
    cmd: Vec<String>,
    env: Vec<(String, String)>,
    rust_log: String,
    stray_fds: Vec<i32>,
    nofile: Option<u64>,
}

impl PrimaryBuilder {
    pub fn new() -> PrimaryBuilder {
        PrimaryBuilder {
            dir: TempDir::new(),
            listen: Vec::new(),
            workers: None,
            flags: Vec::new(),
            cmd: vec![hello_worker()],
            env: Vec::new(),
            rust_log: "info".to_string(),
            stray_fds: Vec::new(),
            nofile: None,
        }
    }

    /// The temp dir the primary will own (write scripts or files into it before `start`).
    pub fn temp_dir(&self) -> &TempDir {
        &self.dir
    }

    /// Adds a `-l ADDR`; the first call replaces the default `127.0.0.1:0`.
    pub fn listen(mut self, addr: &str) -> Self {
        self.listen.push(addr.to_string());
        self
    }

    /// `-w N`.
    pub fn workers(mut self, n: usize) -> Self {
        self.workers = Some(n);
        self
    }

    /// Extra `run` flags (before `--`), e.g. `&["--admin", "127.0.0.1:0", "--grace", "2s"]`.
    /// Passing your own `-l`/`--listen` or `--control` replaces the default one.
    pub fn args(mut self, args: &[&str]) -> Self {
        self.flags.extend(args.iter().map(|s| s.to_string()));
        self
    }

    /// The worker command and its arguments (after `--`).
    pub fn cmd<S: AsRef<str>>(mut self, cmd: &[S]) -> Self {
        self.cmd = cmd.iter().map(|s| s.as_ref().to_string()).collect();
        self
    }

    /// An environment variable for the primary (and so its workers).
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// `RUST_LOG` of the primary (default `info`).
    pub fn rust_log(mut self, filter: &str) -> Self {
        self.rust_log = filter.to_string();
        self
    }

    /// Starts the primary with `fd` open on `/dev/null` *without* close-on-exec, as a careless
    /// parent would leave it (through `/bin/sh -c 'exec FD</dev/null; exec roundhouse ...'`, so
    /// the pid is still the primary's). A worker must not inherit it.
    pub fn inherit_stray_fd(mut self, fd: i32) -> Self {
        assert!(
            (3..=9).contains(&fd),
            "stray fd {fd}: /bin/sh (dash) redirects only 0-9"
        );
        self.stray_fds.push(fd);
        self
    }

    /// Starts the primary with `RLIMIT_NOFILE` soft = hard = `n` (set in the child before
    /// `exec`), so its workers inherit it too. The hard limit is what matters: the primary raises
    /// its soft limit to the hard one at start.
    pub fn nofile_limit(mut self, n: u64) -> Self {
        self.nofile = Some(n);
        self
    }

    /// The full argument list after the program name.
    pub fn run_args(&self) -> Vec<String> {
        let user_listen = self
            .flags
            .iter()
            .any(|f| f == "-l" || f == "--listen" || f.starts_with("--listen="));
        let user_control = self
            .flags
            .iter()
            .any(|f| f == "--control" || f.starts_with("--control="));
        let mut args = vec!["run".to_string()];
        if self.listen.is_empty() && !user_listen {
            args.extend(["-l".to_string(), "127.0.0.1:0".to_string()]);
        }
        for l in &self.listen {
            args.extend(["-l".to_string(), l.clone()]);
        }
        if !user_control {
            args.extend([
                "--control".to_string(),
                self.dir.join("ctl.sock").display().to_string(),
            ]);
        }
        if let Some(n) = self.workers {
            args.extend(["-w".to_string(), n.to_string()]);
        }
        args.extend(self.flags.iter().cloned());
        args.push("--".to_string());
        args.extend(self.cmd.iter().cloned());
        args
    }

    /// Spawns the primary. Panics if it cannot be spawned at all.
    pub fn start(self) -> Primary {
        let args = self.run_args();
        self.spawn(roundhouse_bin(), args)
    }

    /// Spawns `program ARGS` instead of `roundhouse run ...` — an embedding program such as
    /// `examples/embed` — with everything else as for a primary: the temp dir as working
    /// directory, environment and tag, captured stdout/stderr, the kill-and-reap guard. The
    /// builder's `listen`, `workers`, `args` and `cmd` are not used; pass what the program needs
    /// in `args` (e.g. `--control` with [`PrimaryBuilder::control_path`]).
    pub fn start_program(self, program: &str, args: &[String]) -> Primary {
        self.spawn(program, args.to_vec())
    }

    /// The control socket path the primary will get: `<dir>/ctl.sock` unless `--control` was
    /// given in [`PrimaryBuilder::args`].
    pub fn control_path(&self) -> PathBuf {
        match self.flags.iter().position(|f| f == "--control") {
            Some(i) if i + 1 < self.flags.len() => PathBuf::from(&self.flags[i + 1]),
            _ => self.dir.join("ctl.sock"),
        }
    }

    fn spawn(self, program: &str, args: Vec<String>) -> Primary {
        let control = self.control_path();
        let tag = unique("rh");
        let mut command = if self.stray_fds.is_empty() {
            let mut c = Command::new(program);
            c.args(&args);
            c
        } else {
            let opens: Vec<String> = self
                .stray_fds
                .iter()
                .map(|fd| format!("{fd}</dev/null"))
                .collect();
            let mut c = Command::new("/bin/sh");
            c.arg("-c")
                .arg(format!("exec {}; exec \"$0\" \"$@\"", opens.join(" ")))
                .arg(program)
                .args(&args);
            c
        };
        command
            .env("RUST_LOG", &self.rust_log)
            .env(TAG_VAR, &tag)
            .env_remove("ROUNDHOUSE_SCHED_POLICY")
            .env_remove("NOTIFY_SOCKET")
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in &self.env {
            command.env(k, v);
        }
        if let Some(n) = self.nofile {
            use std::os::unix::process::CommandExt;
            // SAFETY: runs in the forked child before exec; setrlimit is async-signal-safe and
            // touches no memory of the parent.
            unsafe {
                command.pre_exec(move || {
                    let lim = libc::rlimit {
                        rlim_cur: n as libc::rlim_t,
                        rlim_max: n as libc::rlim_t,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                        return Err(io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("could not spawn {program}: {e}"));
        let log = Log::default();
        log.spawn_reader(child.stderr.take().unwrap(), "");
        log.spawn_reader(child.stdout.take().unwrap(), "stdout| ");
        Primary {
            program: program.to_string(),
            pid: child.id() as i32,
            child,
            dir: self.dir,
            control,
            log,
            tag,
            argv: args,
            stray_fds: self.stray_fds,
            status: None,
        }
    }
}

impl Default for PrimaryBuilder {
    fn default() -> Self {
        PrimaryBuilder::new()
    }
}

/// A running `roundhouse run`, killed and reaped (with every worker it logged) on drop.
pub struct Primary {
    program: String,
    child: Child,
    pid: i32,
    dir: TempDir,
    control: PathBuf,
    log: Log,
    tag: String,
    argv: Vec<String>,
    stray_fds: Vec<i32>,
    status: Option<ExitStatus>,
}

impl Primary {
    /// Starts `roundhouse run -l 127.0.0.1:0 --control <tmp>/ctl.sock ARGS -- hello-worker`.
    /// If `args` contain `--`, what follows it is the worker command instead of `hello-worker`;
    /// if they contain `-l`/`--listen` or `--control`, those replace the defaults.
    ///
    /// `Primary::start(&["-w", "4", "--admin", "127.0.0.1:0"])`
    pub fn start(args: &[&str]) -> Primary {
        let mut b = PrimaryBuilder::new();
        match args.iter().position(|a| *a == "--") {
            Some(i) => b = b.args(&args[..i]).cmd(&args[i + 1..]),
            None => b = b.args(args),
        }
        b.start()
    }

    pub fn builder() -> PrimaryBuilder {
        PrimaryBuilder::new()
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// This primary's temp dir (also its working directory).
    pub fn dir(&self) -> &TempDir {
        &self.dir
    }

    /// Path of its control socket.
    pub fn control(&self) -> &Path {
        &self.control
    }

    /// The value of `ROUNDHOUSE_TEST_TAG` in its (and its workers') environment.
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// The command line it was started with (for messages).
    pub fn command_line(&self) -> String {
        let stray = if self.stray_fds.is_empty() {
            String::new()
        } else {
            format!(" (started with stray inherited fds {:?})", self.stray_fds)
        };
        format!("{} {}{stray}", self.program, self.argv.join(" "))
    }

    /// The whole captured log (stderr; stdout lines prefixed `stdout| `).
    pub fn log(&self) -> String {
        self.log.text()
    }

    pub fn lines(&self) -> Vec<LogLine> {
        self.log.lines()
    }

    /// Lines containing `substr`, in order.
    pub fn lines_matching(&self, substr: &str) -> Vec<LogLine> {
        self.log
            .lines()
            .into_iter()
            .filter(|l| l.contains(substr))
            .collect()
    }

    /// Number of lines containing `substr`.
    pub fn count(&self, substr: &str) -> usize {
        self.lines_matching(substr).len()
    }

    /// Lines containing `msg` whose fields equal the given values.
    pub fn events(&self, msg: &str, fields: &[(&str, &str)]) -> Vec<LogLine> {
        self.log
            .lines()
            .into_iter()
            .filter(|l| event_matches(l, msg, fields))
            .collect()
    }

    fn alive_fn(&self) -> impl Fn() -> bool + '_ {
        move || self.status.is_none() && pid_alive(self.pid)
    }

    /// Waits for the first line satisfying `pred`; panics after `timeout` (or 300 ms after the
    /// primary exited) naming `what`.
    pub fn wait_for_line(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&LogLine) -> bool,
    ) -> LogLine {
        let alive = self.alive_fn();
        self.log
            .wait_with(timeout, &alive, &|lines| {
                lines.iter().find(|l| pred(l)).cloned()
            })
            .unwrap_or_else(|| self.fail_wait(what, timeout))
    }

    /// Waits for a line containing `substr` and returns it.
    pub fn wait_for_log(&self, substr: &str, timeout: Duration) -> String {
        self.wait_for_line(&format!("a log line containing {substr:?}"), timeout, |l| {
            l.contains(substr)
        })
        .text
    }

    /// Waits for a line containing `msg` whose fields have the given values,
    /// e.g. `wait_for_event("worker online", &[("worker.id", "1")], STARTUP)`.
    pub fn wait_for_event(&self, msg: &str, fields: &[(&str, &str)], timeout: Duration) -> LogLine {
        self.wait_for_line(&format!("{msg:?} with {fields:?}"), timeout, |l| {
            event_matches(l, msg, fields)
        })
    }

    /// Waits until at least `n` lines contain `substr`; returns all of them.
    pub fn wait_for_count(&self, substr: &str, n: usize, timeout: Duration) -> Vec<LogLine> {
        let alive = self.alive_fn();
        self.log
            .wait_with(timeout, &alive, &|lines| {
                let m: Vec<LogLine> = lines
                    .iter()
                    .filter(|l| l.contains(substr))
                    .cloned()
                    .collect();
                (m.len() >= n).then_some(m)
            })
            .unwrap_or_else(|| {
                self.fail_wait(&format!("{n} log lines containing {substr:?}"), timeout)
            })
    }

    fn fail_wait(&self, what: &str, timeout: Duration) -> ! {
        let state = if self.status.is_some() || !pid_alive(self.pid) {
            "the primary exited (status below)"
        } else {
            "timed out"
        };
        panic!("waiting for {what}: {state} (timeout {timeout:?})")
    }

    /// Waits for the `ready` line (every first worker online); returns it.
    pub fn wait_ready(&self) -> String {
        self.wait_for_log("ready workers=", STARTUP)
    }

    /// The first listener's bound address (waits for its `listening` line).
    pub fn addr(&self) -> SocketAddr {
        let line = self.wait_for_line("a listening line", STARTUP, |l| {
            l.contains("listening") && l.field("listener.addr").is_some()
        });
        parse_addr(&line, "listener.addr")
    }

    /// Every listener address logged so far, in log order (call after `wait_ready`).
    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.addr();
        self.lines()
            .iter()
            .filter(|l| l.contains("listening") && l.field("listener.addr").is_some())
            .map(|l| parse_addr(l, "listener.addr"))
            .collect()
    }

    /// The admin endpoint's address (needs `--admin`; waits for its line).
    pub fn admin_addr(&self) -> SocketAddr {
        let line = self.wait_for_line("an admin listening line", STARTUP, |l| {
            l.contains("admin listening") && l.field("admin.addr").is_some()
        });
        parse_addr(&line, "admin.addr")
    }

    /// `GET /stats` on the admin endpoint (needs `--admin`), parsed; panics if it fails.
    pub fn stats(&self) -> serde_json::Value {
        let r = get(self.admin_addr(), "/stats").expect("GET /stats");
        assert_eq!(r.status, 200, "GET /stats: {r:?}");
        r.json()
    }

    /// Worker id → pid, from the `worker online` lines so far (the latest line per id).
    pub fn worker_pids(&self) -> BTreeMap<u32, i32> {
        let mut map = BTreeMap::new();
        for l in self.lines_matching("worker online") {
            if let (Some(id), Some(pid)) = (l.field_as("worker.id"), l.field_as("worker.pid")) {
                map.insert(id, pid);
            }
        }
        map
    }

    /// Waits until worker `id` is online with a pid other than `not_pid`; returns the pid.
    pub fn wait_worker_online(&self, id: u32, not_pid: Option<i32>, timeout: Duration) -> i32 {
        let ids = id.to_string();
        let line = self.wait_for_line(
            &format!("worker {id} online (pid other than {not_pid:?})"),
            timeout,
            |l| {
                event_matches(l, "worker online", &[("worker.id", &ids)])
                    && l.field_as::<i32>("worker.pid").is_some()
                    && l.field_as::<i32>("worker.pid") != not_pid
            },
        );
        line.field_as("worker.pid").unwrap()
    }

    /// Every worker pid in a `worker started` or `worker online` line.
    pub fn logged_worker_pids(&self) -> BTreeSet<i32> {
        self.lines()
            .iter()
            .filter(|l| l.contains("worker started") || l.contains("worker online"))
            .filter_map(|l| l.field_as("worker.pid"))
            .collect()
    }

    /// Sends `sig` to the primary.
    pub fn signal(&self, sig: Signal) {
        nix::sys::signal::kill(Pid::from_raw(self.pid), sig)
            .unwrap_or_else(|e| panic!("kill({}, {sig}): {e}", self.pid));
    }

    /// Sends `sig` to the worker with `id` (its pid from the latest `worker online` line).
    pub fn signal_worker(&self, id: u32, sig: Signal) -> i32 {
        let pid = *self
            .worker_pids()
            .get(&id)
            .unwrap_or_else(|| panic!("worker {id} was never online"));
        signal_pid(pid, sig);
        pid
    }

    /// Waits for the primary to exit (and reaps it); panics after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        self.try_wait_exit(timeout).unwrap_or_else(|| {
            panic!(
                "the primary (pid {}) did not exit within {timeout:?}",
                self.pid
            )
        })
    }

    /// Like [`Primary::wait_exit`] but returns `None` on timeout. Once the primary exited it
    /// also waits (up to 1 s) for the reader threads to reach end-of-file, so the log holds
    /// everything it wrote (workers still alive keep the pipes open; then it gives up).
    pub fn try_wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if let Some(s) = self.status {
            return Some(s);
        }
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                self.status = Some(s);
                self.log.wait_closed(Duration::from_secs(1));
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// Live processes (not zombies) carrying this primary's tag, other than the primary itself:
    /// its workers and anything they started.
    pub fn tagged_processes(&self) -> Vec<i32> {
        processes_tagged(&self.tag)
            .into_iter()
            .filter(|p| *p != self.pid)
            .collect()
    }

    /// Runs a control client command against this primary: `roundhouse SUB --control <ctl> REST`,
    /// e.g. `p.client(&["status", "--json"])`.
    pub fn client(&self, args: &[&str]) -> Output {
        let ctl = self.control.display().to_string();
        let mut full: Vec<&str> = Vec::new();
        if let Some((sub, rest)) = args.split_first() {
            full.push(sub);
            full.extend(["--control", ctl.as_str()]);
            full.extend(rest);
        }
        roundhouse(&full)
    }

    fn cleanup(&mut self) {
        let running = self.status.is_none() && matches!(self.child.try_wait(), Ok(None));
        if running {
            // Stopped, it cannot start new workers, and its dead children stay zombies (their
            // pids cannot be reused) while we kill the rest.
            let _ = nix::sys::signal::kill(Pid::from_raw(self.pid), Signal::SIGSTOP);
        }
        let mut victims: BTreeSet<i32> = BTreeSet::new();
        if running {
            victims.extend(descendants_of(self.pid));
        }
        for pid in self.logged_worker_pids() {
            if victims.contains(&pid) || has_tag(pid, &self.tag) {
                victims.insert(pid);
                victims.extend(descendants_of(pid));
            }
        }
        victims.extend(processes_tagged(&self.tag));
        victims.remove(&self.pid);
        victims.remove(&(std::process::id() as i32));
        for pid in victims {
            let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        if self.status.is_none() {
            let _ = self.child.kill();
            if let Ok(s) = self.child.wait() {
                self.status = Some(s);
            }
        }
    }
}

impl Drop for Primary {
    fn drop(&mut self) {
        let was_running = self.status.is_none() && matches!(self.child.try_wait(), Ok(None));
        self.cleanup();
        if thread::panicking() {
            // Everything is dead now: let the readers drain what was still in the pipes.
            self.log.wait_closed(Duration::from_secs(1));
            let status = match self.status {
                Some(s) if was_running => format!("{} (killed by the harness)", status_str(&s)),
                Some(s) => status_str(&s),
                None => "unknown".to_string(),
            };
            eprintln!(
                "---- roundhouse primary pid {}, exit: {status}\n---- command: {}\n---- log:\n{}---- end of log",
                self.pid,
                self.command_line(),
                self.log()
            );
        }
    }
}

fn event_matches(l: &LogLine, msg: &str, fields: &[(&str, &str)]) -> bool {
    l.contains(msg)
        && fields
            .iter()
            .all(|(k, v)| l.field(k).as_deref() == Some(*v))
}

fn parse_addr(line: &LogLine, key: &str) -> SocketAddr {
    let v = line.field(key).unwrap();
    v.parse()
        .unwrap_or_else(|e| panic!("cannot parse {key}={v:?} in {:?}: {e}", line.text))
}

/// Describes an exit status as `code N` or `signal S`.
pub fn status_str(s: &ExitStatus) -> String {
    match (s.code(), s.signal()) {
        (Some(c), _) => format!("code {c}"),
        (None, Some(sig)) => format!("signal {sig}"),
        _ => format!("{s:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// One-shot CLI invocations
// ---------------------------------------------------------------------------------------------

/// Runs `roundhouse ARGS` with `RUST_LOG=info`, stdin closed, a [`CLI_TIMEOUT`]; returns its
/// output. On timeout the process (and anything tagged as started by it) is killed and the
/// test panics.
/// Whether `program --version` runs and succeeds (a tool a test needs is installed).
pub fn installed(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// `roundhouse ARGS` on a thread of its own, for a command that answers late (`reload`,
/// `upgrade`) while the test goes on.
pub fn roundhouse_in_background(args: &[&str]) -> thread::JoinHandle<Output> {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    thread::spawn(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        roundhouse(&args)
    })
}

pub fn roundhouse(args: &[&str]) -> Output {
    roundhouse_with(args, &[], CLI_TIMEOUT)
}

/// [`roundhouse`] with extra environment and a timeout of your choice.
pub fn roundhouse_with(args: &[&str], env: &[(&str, &str)], timeout: Duration) -> Output {
    let tag = unique("rh-cli");
    let mut cmd = Command::new(roundhouse_bin());
    cmd.args(args)
        .env("RUST_LOG", "info")
        .env(TAG_VAR, &tag)
        .env_remove("ROUNDHOUSE_SCHED_POLICY")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("could not spawn {}: {e}", roundhouse_bin()));
    // A leftover process holding the pipes would block the readers: kill tagged ones first.
    let kill_tagged = || {
        for pid in processes_tagged(&tag) {
            signal_pid(pid, Signal::SIGKILL);
        }
    };
    collect_within(&mut child, timeout, kill_tagged).unwrap_or_else(|_| {
        panic!(
            "`roundhouse {}` did not exit within {timeout:?}",
            args.join(" ")
        )
    })
}

/// Waits at most `timeout` for `child` (stdout and stderr piped), reading both meanwhile; on
/// timeout it is killed and reaped and `Err` carries what it printed. `before_join` runs before
/// the readers are joined (to kill what else may hold the pipes).
fn collect_within(
    child: &mut Child,
    timeout: Duration,
    before_join: impl Fn(),
) -> Result<Output, Output> {
    let mut out = child.stdout.take().expect("piped stdout");
    let mut err = child.stderr.take().expect("piped stderr");
    let out_t = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let err_t = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            break Ok(s);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            break Err(child.wait().expect("wait"));
        }
        thread::sleep(Duration::from_millis(5));
    };
    before_join();
    let output = |status| Output {
        status,
        stdout: out_t.join().unwrap_or_default(),
        stderr: err_t.join().unwrap_or_default(),
    };
    match status {
        Ok(s) => Ok(output(s)),
        Err(s) => Err(output(s)),
    }
}

/// `command`, status, stdout and stderr, for assertion messages.
pub fn describe(args: &[&str], out: &Output) -> String {
    format!(
        "command: roundhouse {}\nstatus: {}\nstdout:\n{}\nstderr:\n{}",
        args.join(" "),
        status_str(&out.status),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Non-empty lines of a byte buffer.
pub fn nonempty_lines(bytes: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(bytes)
        .lines()
        .map(strip_ansi)
        .filter(|l| !l.trim().is_empty())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// HTTP/1.1 client
// ---------------------------------------------------------------------------------------------

/// An HTTP response. Header names are lowercase.
#[derive(Clone, Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The `x-worker-id` header as a number.
    pub fn worker_id(&self) -> Option<u32> {
        self.header("x-worker-id")
            .and_then(|v| v.trim().parse().ok())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body parsed as JSON (panics if it is not).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?}", self.text()))
    }
}

/// One client connection: send requests and read responses, keep-alive or not.
pub struct HttpConn {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    host: String,
    timeout: Duration,
}

impl HttpConn {
    /// Connects with [`HTTP_TIMEOUT`] as connect, read and write timeout.
    pub fn connect(addr: SocketAddr) -> io::Result<HttpConn> {
        HttpConn::connect_timeout(addr, HTTP_TIMEOUT)
    }

    pub fn connect_timeout(addr: SocketAddr, timeout: Duration) -> io::Result<HttpConn> {
        let stream = TcpStream::connect_timeout(&addr, timeout)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        stream.set_nodelay(true)?;
        Ok(HttpConn {
            writer: stream.try_clone()?,
            reader: BufReader::new(stream),
            host: addr.to_string(),
            timeout,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.writer.local_addr().unwrap()
    }

    pub fn set_timeout(&mut self, timeout: Duration) -> io::Result<()> {
        self.timeout = timeout;
        self.writer.set_read_timeout(Some(timeout))?;
        self.writer.set_write_timeout(Some(timeout))
    }

    /// A socket timeout (`EAGAIN`) reads as "no response within …".
    fn explain(&self, e: io::Error) -> io::Error {
        if matches!(
            e.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ) {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no response within {:?} ({e})", self.timeout),
            )
        } else {
            e
        }
    }

    /// Writes one request (with `Host` and `Content-Length` added).
    pub fn send(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> io::Result<()> {
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {}\r\n", self.host);
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        if !body.is_empty() || method == "POST" || method == "PUT" {
            req.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        req.push_str("\r\n");
        let mut bytes = req.into_bytes();
        bytes.extend_from_slice(body);
        self.writer
            .write_all(&bytes)
            .and_then(|()| self.writer.flush())
            .map_err(|e| self.explain(e))
    }

    /// Reads one response (for a request that was not `HEAD`).
    pub fn read_response(&mut self) -> io::Result<Response> {
        read_response(&mut self.reader, false).map_err(|e| self.explain(e))
    }

    /// Sends a request and reads its response.
    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> io::Result<Response> {
        self.send(method, path, headers, body)?;
        read_response(&mut self.reader, method == "HEAD").map_err(|e| self.explain(e))
    }

    /// `GET path` on this (keep-alive) connection.
    pub fn get(&mut self, path: &str) -> io::Result<Response> {
        self.request("GET", path, &[], &[])
    }

    /// Reads one response, or `Ok(None)` if the server closed the connection (end-of-file or
    /// reset) before sending a single byte of it — the one case in which browsers and urllib3
    /// send an idempotent request again on a new connection. Closed after some bytes is an error.
    pub fn read_response_or_closed(&mut self) -> io::Result<Option<Response>> {
        loop {
            match self.reader.fill_buf() {
                Ok([]) => return Ok(None),
                Ok(_) => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if closed_by_peer(&e) => return Ok(None),
                Err(e) => return Err(self.explain(e)),
            }
        }
        self.read_response().map(Some)
    }
}

/// Errors that mean the peer closed the connection (`EPIPE`, `ECONNRESET`, `ECONNABORTED`).
fn closed_by_peer(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
    )
}

/// A keep-alive HTTP client with the retry rule of browsers and urllib3: a request sent on a
/// *reused* connection that the server closed before any byte of the response arrived (it had
/// gone idle and was closed as the request crossed) is sent once more on a new connection.
/// Anything else — a fresh connection closed without a response, a response cut short, a
/// timeout — is returned as an error. A response with `Connection: close` ends the connection;
/// the next request opens a new one.
pub struct KeepAliveClient {
    addr: SocketAddr,
    timeout: Duration,
    conn: Option<HttpConn>,
    /// Connections opened so far.
    pub connections: u64,
    /// Requests sent again under the rule above.
    pub retries: u64,
}

impl KeepAliveClient {
    pub fn new(addr: SocketAddr) -> KeepAliveClient {
        KeepAliveClient::with_timeout(addr, HTTP_TIMEOUT)
    }

    pub fn with_timeout(addr: SocketAddr, timeout: Duration) -> KeepAliveClient {
        KeepAliveClient {
            addr,
            timeout,
            conn: None,
            connections: 0,
            retries: 0,
        }
    }

    /// `GET path`, on the open connection if there is one.
    pub fn get(&mut self, path: &str) -> io::Result<Response> {
        loop {
            let reused = self.conn.is_some();
            let mut c = match self.conn.take() {
                Some(c) => c,
                None => {
                    self.connections += 1;
                    HttpConn::connect_timeout(self.addr, self.timeout)?
                }
            };
            let got = match c.send("GET", path, &[], &[]) {
                Ok(()) => c.read_response_or_closed(),
                Err(e) if closed_by_peer(&e) => Ok(None),
                Err(e) => Err(e),
            };
            match got? {
                Some(r) => {
                    let close = r
                        .header("connection")
                        .is_some_and(|v| v.eq_ignore_ascii_case("close"));
                    if !close {
                        self.conn = Some(c);
                    }
                    return Ok(r);
                }
                None if reused => self.retries += 1,
                None => {
                    return Err(io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        "a new connection was closed without a response",
                    ))
                }
            }
        }
    }

    /// Closes the open connection, if any.
    pub fn close(&mut self) {
        self.conn = None;
    }
}

/// `GET path` on a new connection with `Connection: close`, [`HTTP_TIMEOUT`].
pub fn get(addr: SocketAddr, path: &str) -> io::Result<Response> {
    get_timeout(addr, path, HTTP_TIMEOUT)
}

/// [`get`] with a timeout of your choice (connect, and each read/write).
pub fn get_timeout(addr: SocketAddr, path: &str, timeout: Duration) -> io::Result<Response> {
    let mut c = HttpConn::connect_timeout(addr, timeout)?;
    c.request("GET", path, &[("Connection", "close")], &[])
}

/// Any method on a new connection with `Connection: close`.
pub fn request(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> io::Result<Response> {
    let mut c = HttpConn::connect(addr)?;
    c.request(method, path, &[("Connection", "close")], body)
}

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

fn read_line(r: &mut impl BufRead) -> io::Result<String> {
    let mut buf = Vec::new();
    let n = r.read_until(b'\n', &mut buf)?;
    if n == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed before a complete response",
        ));
    }
    Ok(String::from_utf8_lossy(&buf)
        .trim_end_matches(['\r', '\n'])
        .to_string())
}

fn read_response(r: &mut impl BufRead, head: bool) -> io::Result<Response> {
    loop {
        let status_line = read_line(r)?;
        let mut parts = status_line.splitn(3, ' ');
        let version = parts.next().unwrap_or("");
        if !version.starts_with("HTTP/1.") {
            return Err(bad(format!("bad status line {status_line:?}")));
        }
        let status: u16 = parts
            .next()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad(format!("bad status line {status_line:?}")))?;
        let mut headers = Vec::new();
        loop {
            let line = read_line(r)?;
            if line.is_empty() {
                break;
            }
            let (k, v) = line
                .split_once(':')
                .ok_or_else(|| bad(format!("bad header line {line:?}")))?;
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
        if (100..200).contains(&status) {
            continue;
        }
        let mut resp = Response {
            status,
            headers,
            body: Vec::new(),
        };
        if head || status == 204 || status == 304 {
            return Ok(resp);
        }
        let chunked = resp
            .header("transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
        if chunked {
            loop {
                let size_line = read_line(r)?;
                let size = usize::from_str_radix(size_line.split(';').next().unwrap().trim(), 16)
                    .map_err(|_| bad(format!("bad chunk size {size_line:?}")))?;
                if size == 0 {
                    while !read_line(r)?.is_empty() {}
                    break;
                }
                let start = resp.body.len();
                resp.body.resize(start + size, 0);
                r.read_exact(&mut resp.body[start..])?;
                read_line(r)?;
            }
        } else if let Some(len) = resp.header("content-length") {
            let len: usize = len
                .parse()
                .map_err(|_| bad(format!("bad content-length {len:?}")))?;
            resp.body.resize(len, 0);
            r.read_exact(&mut resp.body)?;
        } else {
            r.read_to_end(&mut resp.body)?;
        }
        return Ok(resp);
    }
}

// ---------------------------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------------------------

/// Polls `f` every `interval` until it returns true (→ true) or `timeout` elapses (→ false).
pub fn wait_until(timeout: Duration, interval: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(interval);
    }
}

/// Sends `sig` to `pid`, ignoring "no such process".
pub fn signal_pid(pid: i32, sig: Signal) {
    let _ = nix::sys::signal::kill(Pid::from_raw(pid), sig);
}

/// State letter and parent pid from `/proc/<pid>/stat`.
pub fn proc_stat(pid: i32) -> Option<(char, i32)> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // comm is in parentheses and may contain anything: parse after the last ')'.
    let rest = &s[s.rfind(')')? + 1..];
    let mut it = rest.split_whitespace();
    let state = it.next()?.chars().next()?;
    let ppid = it.next()?.parse().ok()?;
    Some((state, ppid))
}

/// Resident set size of `pid` in KiB (`VmRSS` in `/proc/<pid>/status`).
pub fn proc_rss_kib(pid: i32) -> Option<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// CPU time (user + system, all threads) `pid` has used so far, from `/proc/<pid>/stat`.
pub fn proc_cpu_time(pid: i32) -> Option<Duration> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the comm: state(0) ppid(1) ... utime(11) stime(12), in clock ticks.
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no memory-safety requirements.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = if hz > 0 { hz as u64 } else { 100 };
    Some(Duration::from_secs_f64(ticks as f64 / hz as f64))
}

/// True if `pid` exists and is not a zombie (a dead, unreaped process counts as dead).
pub fn pid_alive(pid: i32) -> bool {
    matches!(proc_stat(pid), Some((s, _)) if s != 'Z' && s != 'X')
}

fn all_pids() -> Vec<i32> {
    let Ok(rd) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

/// Direct children of `pid` (scanning every `/proc/*/stat`'s ppid).
pub fn children_of(pid: i32) -> Vec<i32> {
    all_pids()
        .into_iter()
        .filter(|p| proc_stat(*p).is_some_and(|(_, pp)| pp == pid))
        .collect()
}

/// Children, grandchildren, ... of `pid`.
pub fn descendants_of(pid: i32) -> Vec<i32> {
    let table: Vec<(i32, i32)> = all_pids()
        .into_iter()
        .filter_map(|p| proc_stat(p).map(|(_, pp)| (p, pp)))
        .collect();
    let mut out = Vec::new();
    let mut frontier = vec![pid];
    while let Some(parent) = frontier.pop() {
        for (p, pp) in &table {
            if *pp == parent && !out.contains(p) {
                out.push(*p);
                frontier.push(*p);
            }
        }
    }
    out
}

/// The environment of `pid` (empty for zombies; `None` if unreadable).
pub fn environ_of(pid: i32) -> Option<Vec<(String, String)>> {
    let raw = fs::read(format!("/proc/{pid}/environ")).ok()?;
    Some(
        raw.split(|b| *b == 0)
            .filter(|s| !s.is_empty())
            .filter_map(|kv| {
                let s = String::from_utf8_lossy(kv);
                s.split_once('=')
                    .map(|(k, v)| (k.to_string(), v.to_string()))
            })
            .collect(),
    )
}

/// One variable of `pid`'s environment.
pub fn env_var_of(pid: i32, key: &str) -> Option<String> {
    environ_of(pid)?
        .into_iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v)
}

fn has_tag(pid: i32, tag: &str) -> bool {
    env_var_of(pid, TAG_VAR).as_deref() == Some(tag)
}

/// Live (non-zombie) processes whose environment has `ROUNDHOUSE_TEST_TAG=tag`.
pub fn processes_tagged(tag: &str) -> Vec<i32> {
    all_pids()
        .into_iter()
        .filter(|p| has_tag(*p, tag) && pid_alive(*p))
        .collect()
}

/// fd number → `readlink` target (`socket:[123]`, `pipe:[45]`, `/dev/null`, `anon_inode:[…]`).
pub fn fd_targets(pid: i32) -> io::Result<BTreeMap<i32, String>> {
    let mut map = BTreeMap::new();
    for e in fs::read_dir(format!("/proc/{pid}/fd"))? {
        let e = e?;
        let Some(fd) = e.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        if let Ok(t) = fs::read_link(e.path()) {
            map.insert(fd, t.display().to_string());
        }
    }
    Ok(map)
}

/// True if a `socket:[…]`/`pipe:[…]` target names a specific kernel object (so two processes
/// showing it share that object); `anon_inode:[eventpoll]` and paths do not.
pub fn is_inode_target(target: &str) -> bool {
    target.starts_with("socket:[") || target.starts_with("pipe:[")
}

// ---------------------------------------------------------------------------------------------
// TCP table
// ---------------------------------------------------------------------------------------------

/// One row of `/proc/net/tcp{,6}`.
#[derive(Clone, Debug)]
pub struct TcpSocketInfo {
    pub local_port: u16,
    pub remote_port: u16,
    /// Kernel state (1 = ESTABLISHED, 10 = LISTEN, ...).
    pub state: u8,
    pub tx_queue: u64,
    /// Bytes received and not yet read by the process holding the socket.
    pub rx_queue: u64,
    /// Socket inode (`socket:[inode]` in `/proc/<pid>/fd`); 0 while still in the accept queue.
    pub inode: u64,
}

/// Every IPv4 and IPv6 TCP socket of this network namespace, from `/proc/net/tcp{,6}`.
///
/// Beware: the kernel returns that table a page per `read`, resuming its walk of the socket hash
/// at an offset, so while other sockets come and go (another test's load) rows are skipped — a
/// live connection can be missing from every read. To look at one connection, use
/// [`server_side_socket`], which asks the kernel for exactly that socket.
pub fn tcp_sockets() -> Vec<TcpSocketInfo> {
    let mut out = Vec::new();
    for file in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = fs::read_to_string(file) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 {
                continue;
            }
            let port = |s: &str| {
                s.rsplit(':')
                    .next()
                    .and_then(|p| u16::from_str_radix(p, 16).ok())
            };
            let (Some(lp), Some(rp)) = (port(f[1]), port(f[2])) else {
                continue;
            };
            let Some((tx, rx)) = f[4].split_once(':') else {
                continue;
            };
            out.push(TcpSocketInfo {
                local_port: lp,
                remote_port: rp,
                state: u8::from_str_radix(f[3], 16).unwrap_or(0),
                tx_queue: u64::from_str_radix(tx, 16).unwrap_or(0),
                rx_queue: u64::from_str_radix(rx, 16).unwrap_or(0),
                inode: f[9].parse().unwrap_or(0),
            });
        }
    }
    out
}

/// The server side of the connection from `client` (a client socket's local address) to a
/// listener on `server`: the socket the primary accepts and hands to a worker, whoever holds it
/// now (`inode` 0 while it waits in the accept queue). `None` once it is closed and gone.
///
/// Looked up by its exact 4-tuple with a `SOCK_DIAG_BY_FAMILY` netlink request (what `ss` uses),
/// which, unlike reading `/proc/net/tcp`, cannot miss it while other sockets churn.
pub fn server_side_socket(server: SocketAddr, client: SocketAddr) -> Option<TcpSocketInfo> {
    sock_diag_lookup(server, client).unwrap_or_else(|e| panic!("sock_diag lookup: {e}"))
}

/// One `SOCK_DIAG_BY_FAMILY` exact lookup of the TCP socket `local` ↔ `remote`.
fn sock_diag_lookup(local: SocketAddr, remote: SocketAddr) -> io::Result<Option<TcpSocketInfo>> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    const SOCK_DIAG_BY_FAMILY: u16 = 20;
    const NLMSG_ERROR: u16 = 2;
    const REQ_LEN: usize = 16 + 56; // nlmsghdr + inet_diag_req_v2

    fn addr_bytes(a: &SocketAddr) -> [u8; 16] {
        let mut b = [0u8; 16];
        match a {
            SocketAddr::V4(v4) => b[..4].copy_from_slice(&v4.ip().octets()),
            SocketAddr::V6(v6) => b.copy_from_slice(&v6.ip().octets()),
        }
        b
    }
    let family = if local.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    let mut req = [0u8; REQ_LEN];
    // struct nlmsghdr (native endian)
    req[0..4].copy_from_slice(&(REQ_LEN as u32).to_ne_bytes());
    req[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    req[6..8].copy_from_slice(&(libc::NLM_F_REQUEST as u16).to_ne_bytes());
    req[8..12].copy_from_slice(&1u32.to_ne_bytes());
    // struct inet_diag_req_v2: family, protocol, ext, pad, states, then inet_diag_sockid
    req[16] = family as u8;
    req[17] = libc::IPPROTO_TCP as u8;
    req[20..24].copy_from_slice(&u32::MAX.to_ne_bytes());
    let id = 24;
    req[id..id + 2].copy_from_slice(&local.port().to_be_bytes());
    req[id + 2..id + 4].copy_from_slice(&remote.port().to_be_bytes());
    req[id + 4..id + 20].copy_from_slice(&addr_bytes(&local));
    req[id + 20..id + 36].copy_from_slice(&addr_bytes(&remote));
    // idiag_if = 0; cookie = INET_DIAG_NOCOOKIE
    req[id + 40..id + 48].copy_from_slice(&[0xff; 8]);

    // SAFETY: plain socket(2); the returned fd is owned by `sock` at once.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            libc::NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: an all-zero sockaddr_nl is valid; we set the family (pid 0 = the kernel).
    let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    // SAFETY: `req` and `kernel` are valid for the lengths passed; `sock` is open.
    let sent = unsafe {
        libc::sendto(
            sock.as_raw_fd(),
            req.as_ptr().cast(),
            req.len(),
            0,
            (&kernel as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = [0u8; 8192];
    // SAFETY: `buf` is valid for writes of its length; `sock` is open.
    let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let msg = &buf[..n as usize];
    if msg.len() < 16 {
        return Err(bad("short netlink reply"));
    }
    let u32_at = |o: usize| u32::from_ne_bytes(msg[o..o + 4].try_into().unwrap());
    let kind = u16::from_ne_bytes([msg[4], msg[5]]);
    if kind == NLMSG_ERROR {
        let errno = -(u32_at(16) as i32);
        return if errno == libc::ENOENT {
            Ok(None)
        } else {
            Err(io::Error::from_raw_os_error(errno))
        };
    }
    if kind != SOCK_DIAG_BY_FAMILY || msg.len() < 16 + 72 {
        return Err(bad(format!("unexpected netlink reply type {kind}")));
    }
    // struct inet_diag_msg after the header: family, state, timer, retrans, sockid (48 bytes),
    // expires, rqueue, wqueue, uid, inode.
    let m = 16;
    Ok(Some(TcpSocketInfo {
        local_port: u16::from_be_bytes([msg[m + 4], msg[m + 5]]),
        remote_port: u16::from_be_bytes([msg[m + 6], msg[m + 7]]),
        state: msg[m + 1],
        tx_queue: u64::from(u32_at(m + 60)),
        rx_queue: u64::from(u32_at(m + 56)),
        inode: u64::from(u32_at(m + 68)),
    }))
}

/// True if `pid` has an fd on the socket with `inode`.
pub fn pid_holds_socket(pid: i32, inode: u64) -> bool {
    let want = format!("socket:[{inode}]");
    fd_targets(pid)
        .map(|m| m.values().any(|t| *t == want))
        .unwrap_or(false)
}

/// True if `[::1]` can be bound on this machine.
pub fn ipv6_available() -> bool {
    TcpListener::bind("[::1]:0").is_ok()
}

// ---------------------------------------------------------------------------------------------
// Background load
// ---------------------------------------------------------------------------------------------

/// How each [`Load`] client thread talks to the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoadMode {
    /// A new connection per request (`Connection: close`).
    PerRequest,
    /// Even-numbered threads keep one connection alive across requests (reconnecting after a
    /// failure or a `Connection: close`), odd ones connect per request.
    Mixed,
}

/// What a [`Load`] saw: successes, every failure with its reason, and who served.
#[derive(Clone, Debug, Default)]
pub struct LoadReport {
    pub ok: usize,
    /// `"client N after 1.234s: reason"`, in the order they happened per thread.
    pub failures: Vec<String>,
    /// `(x-worker-id, pid from a /whoami body or 0)` → responses.
    pub served: BTreeMap<(u32, i32), usize>,
    pub elapsed: Duration,
}

impl LoadReport {
    /// Responses from worker `id` whose pid is `pid`.
    pub fn served_by(&self, id: u32, pid: i32) -> usize {
        self.served.get(&(id, pid)).copied().unwrap_or(0)
    }
    /// Responses from worker `id`, any pid.
    pub fn served_by_id(&self, id: u32) -> usize {
        self.served
            .iter()
            .filter(|((i, _), _)| *i == id)
            .map(|(_, n)| n)
            .sum()
    }
}

/// Background HTTP load: `threads` clients asking `GET path` in a loop until [`Load::finish`];
/// a response other than 200, or any I/O error, is a failure (recorded with its reason). With
/// `path` `/whoami` the serving pid is recorded too.
pub struct Load {
    stop: Arc<std::sync::atomic::AtomicBool>,
    report: Arc<Mutex<LoadReport>>,
    threads: Vec<thread::JoinHandle<()>>,
    started: Instant,
}

impl Load {
    pub fn start(addr: SocketAddr, threads: usize, path: &str, mode: LoadMode) -> Load {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let report = Arc::new(Mutex::new(LoadReport::default()));
        let started = Instant::now();
        let threads = (0..threads)
            .map(|i| {
                let (stop, report, path) = (stop.clone(), report.clone(), path.to_string());
                let keep_alive = mode == LoadMode::Mixed && i % 2 == 0;
                thread::spawn(move || {
                    let mut conn: Option<HttpConn> = None;
                    while !stop.load(Ordering::Relaxed) {
                        let r = if keep_alive {
                            let c = match conn.take() {
                                Some(c) => Ok(c),
                                None => HttpConn::connect(addr),
                            };
                            c.and_then(|mut c| {
                                let r = c.get(&path)?;
                                let close = r
                                    .header("connection")
                                    .is_some_and(|v| v.eq_ignore_ascii_case("close"));
                                if !close {
                                    conn = Some(c);
                                }
                                Ok(r)
                            })
                        } else {
                            get(addr, &path)
                        };
                        let mut rep = report.lock().unwrap();
                        match r {
                            Ok(r) if r.status == 200 => {
                                rep.ok += 1;
                                let id = r.worker_id().unwrap_or(0);
                                let pid = serde_json::from_slice::<serde_json::Value>(&r.body)
                                    .ok()
                                    .and_then(|v| v["pid"].as_i64())
                                    .unwrap_or(0) as i32;
                                *rep.served.entry((id, pid)).or_default() += 1;
                            }
                            other => {
                                let what = match other {
                                    Ok(r) => format!("status {} {:?}", r.status, r.text()),
                                    Err(e) => e.to_string(),
                                };
                                let at = started.elapsed().as_secs_f64();
                                rep.failures
                                    .push(format!("client {i} after {at:.3}s: {what}"));
                            }
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            report,
            threads,
            started,
        }
    }

    /// A copy of what the load has seen so far.
    pub fn snapshot(&self) -> LoadReport {
        let mut r = self.report.lock().unwrap().clone();
        r.elapsed = self.started.elapsed();
        r
    }

    /// Polls until `f` holds for the report so far; false after `timeout`.
    pub fn wait_for(&self, timeout: Duration, f: impl Fn(&LoadReport) -> bool) -> bool {
        wait_until(timeout, POLL, || f(&self.report.lock().unwrap()))
    }

    /// Waits until `n` more requests than now have succeeded; false after `timeout`.
    pub fn wait_ok(&self, n: usize, timeout: Duration) -> bool {
        let target = self.report.lock().unwrap().ok + n;
        self.wait_for(timeout, |r| r.ok >= target)
    }

    /// Stops the clients (each finishes its current request) and returns the report.
    pub fn finish(self) -> LoadReport {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().expect("load thread panicked");
        }
        let mut r = self.report.lock().unwrap().clone();
        r.elapsed = self.started.elapsed();
        r
    }
}

// ---------------------------------------------------------------------------------------------
// Process groups
// ---------------------------------------------------------------------------------------------

/// Process group of `pid` (field 5 of `/proc/<pid>/stat`).
pub fn proc_pgid(pid: i32) -> Option<i32> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 1..];
    // After the comm: state(0) ppid(1) pgrp(2).
    rest.split_whitespace().nth(2)?.parse().ok()
}

/// Live (non-zombie) processes whose process group is `pgid`. A worker is started as the leader
/// of its own group (pgid = its pid), so this is the worker and everything it started that did
/// not leave the group (gunicorn's own workers, a shell's background job).
pub fn processes_in_group(pgid: i32) -> Vec<i32> {
    all_pids()
        .into_iter()
        .filter(|p| proc_pgid(*p) == Some(pgid) && pid_alive(*p))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Other programs (e.g. a Node.js client script)
// ---------------------------------------------------------------------------------------------

/// A child process that is killed (`SIGKILL`) and reaped when dropped, also when the test panics.
pub struct ChildGuard {
    child: Option<Child>,
}

impl ChildGuard {
    pub fn new(child: Child) -> ChildGuard {
        ChildGuard { child: Some(child) }
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map_or(0, |c| c.id() as i32)
    }

    /// Waits for the child to exit, at most `timeout`, collecting its stdout and stderr (both must
    /// be piped). On timeout it is killed and reaped, and the test panics with what it printed.
    pub fn output_within(mut self, what: &str, timeout: Duration) -> Output {
        let mut child = self.child.take().expect("a child");
        collect_within(&mut child, timeout, || {}).unwrap_or_else(|out| {
            panic!(
                "{what} did not exit within {timeout:?}\n--- stdout:\n{}\n--- stderr:\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Runs `cmd` (stdin closed, stdout and stderr captured) to completion within `timeout`; on
/// timeout or panic the process is killed and reaped.
pub fn output_within(cmd: &mut Command, timeout: Duration) -> Output {
    let what = format!("{cmd:?}");
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("could not spawn {what}: {e}"));
    ChildGuard::new(child).output_within(&what, timeout)
}

// ---------------------------------------------------------------------------------------------
// Requests from a chosen source address (sticky tests)
// ---------------------------------------------------------------------------------------------

/// One `GET /` on a new connection from source address `src` (a loopback address such as
/// 127.0.0.7, bound before connecting), with `extra` header lines (each ending in `\r\n`):
/// the `x-worker-id` that answered.
pub fn worker_from(src: std::net::Ipv4Addr, addr: SocketAddr, extra: &str) -> u32 {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.bind(&std::net::SocketAddrV4::new(src, 0).into())
        .unwrap_or_else(|e| panic!("bind {src}: {e}"));
    s.connect(&addr.into()).unwrap();
    let mut c: TcpStream = s.into();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        c,
        "GET / HTTP/1.1\r\nhost: x\r\n{extra}connection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    c.read_to_string(&mut out).unwrap();
    out.lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("x-worker-id: ")
                .map(|v| v.trim().parse().unwrap())
        })
        .unwrap_or_else(|| panic!("no x-worker-id: {out:?}"))
}

// ---------------------------------------------------------------------------------------------
// reuseport-rr
// ---------------------------------------------------------------------------------------------

/// Waits until a primary started with `--policy reuseport-rr` is ready (`Some`), or has exited
/// because this kernel refuses BPF altogether (`None`, printed: the caller skips). Any other exit
/// — a missing capability included — fails the test.
pub fn ready_unless_bpf_refused(mut p: Primary) -> Option<Primary> {
    let ready = wait_until(STARTUP, Duration::from_millis(20), || {
        p.count("ready workers=") > 0 || p.try_wait_exit(Duration::ZERO).is_some()
    });
    assert!(
        ready,
        "the primary neither got ready nor exited:\n{}",
        p.log()
    );
    if p.count("ready workers=") > 0 {
        return Some(p);
    }
    let log = p.log();
    assert!(
        log.contains("this kernel cannot run reuseport-rr"),
        "the primary exited:\n{log}"
    );
    eprintln!("skipped: the kernel refuses BPF here:\n{log}");
    None
}
