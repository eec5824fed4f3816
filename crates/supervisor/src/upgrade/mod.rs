//! In-place upgrade: the primary re-executes its own binary, keeping its pid, its workers, its
//! listeners and every connection it holds (`roundhouse upgrade`, `SIGUSR2`).
//!
//! # Theory of operation
//!
//! Like einhorn (and unlike nginx's two masters), the primary `execve`s the binary now at the
//! path it was started from: the pid stays (systemd's `MAINPID`, the workers' parent), and so do
//! every fd without close-on-exec. The state travels as a versioned JSON document ([`State`])
//! in a memfd whose number is in `ROUNDHOUSE_UPGRADE_STATE`; every fd the state names (the
//! listeners, the control and admin sockets, each worker's channel, exec-status pipe and output
//! pipes, each connection held or in flight) has its close-on-exec flag cleared just before the
//! exec and set again by the new image once it has adopted it.
//!
//! **Pre-flight.** Before anything is touched, the new binary runs as `roundhouse
//! upgrade-check` with the serialized state on its stdin, and must answer that it can read this
//! version. A binary that is missing, not executable, of another architecture or that refuses
//! the state fails the upgrade; the old primary keeps serving as if nothing had happened.
//!
//! **`PR_SET_PDEATHSIG`** fires when the *thread* that forked a worker exits, and `execve` ends
//! every thread but its caller. So the exec is made by the owner thread, the thread that forked
//! every worker, and the new image runs its owner loop on that same thread (its main thread,
//! after the exec): no worker's parent thread ever exits.
//!
//! **Signals.** Between the exec and the new image's handlers there is no handler: the owner
//! blocks the signals it handles before the exec (the mask survives `execve`), and the new image
//! unblocks them once its handlers are installed; a `SIGTERM` sent meanwhile waits, it does not
//! kill the primary. The fatal ones are also ignored across the exec, in case something between
//! the images (a wrapper script) unblocks them. A child that exits meanwhile stays a zombie until
//! the new image reaps.
//!
//! **Connections.** The kernel's backlog holds new connections during the exec (a few ms).
//! Connections handed to a worker and not yet acknowledged are carried with their ids, so the
//! acks the worker sends meanwhile (they wait in the channel) are matched in the new image.

use std::ffi::CString;
use std::io::{self, Read, Seek, Write};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::time::Duration;

use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use serde::{Deserialize, Serialize};

use crate::config::Config;

/// The state format this binary writes and reads.
pub const STATE_VERSION: u32 = 1;
/// The environment variable that names the state memfd in the new image.
pub const STATE_ENV: &str = "ROUNDHOUSE_UPGRADE_STATE";
/// The hidden subcommand the pre-flight runs.
pub const CHECK_COMMAND: &str = "upgrade-check";
/// Longest the pre-flight may take.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(10);

/// How often, and how far apart, a binary that is busy being written (ETXTBSY) is tried.
const TXTBSY_TRIES: u32 = 20;
const TXTBSY_PAUSE: Duration = Duration::from_millis(50);

/// Signals the binary handles: blocked across the exec, unblocked by the new image.
pub const HANDLED: [Signal; 7] = [
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGHUP,
    Signal::SIGTTIN,
    Signal::SIGTTOU,
    Signal::SIGUSR2,
    Signal::SIGCHLD,
];

/// Of those, the ones whose default action would end the primary: also *ignored* across the
/// exec. Blocked, a signal sent meanwhile stays pending (a blocked signal is never discarded)
/// and reaches the new image's handler; ignored as well, it cannot kill the process if
/// something between the two images unblocks it (a wrapper script: the shell resets the mask)
/// — it is lost then, not fatal. Not `SIGCHLD`: ignoring it would make the kernel reap the
/// workers' exits itself, and their statuses would be lost.
const IGNORED_ACROSS: [Signal; 6] = [
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGHUP,
    Signal::SIGTTIN,
    Signal::SIGTTOU,
    Signal::SIGUSR2,
];

/// Everything the primary is, as it crosses an `execve`. Times are relative (milliseconds from
/// the moment of writing), fds are numbers the new image adopts.
#[derive(Debug, Serialize, Deserialize)]
pub struct State {
    pub version: u32,
    /// `roundhouse X.Y.Z` that wrote it.
    pub written_by: String,
    /// The binary to execute, the path the primary was started from.
    pub self_exe: PathBuf,
    /// `--log-format json`.
    pub log_json: bool,
    pub config: Config,
    /// The worker command, resolved.
    pub exe: PathBuf,
    pub uptime_ms: u64,
    pub addrs: Vec<SocketAddr>,
    /// Handoff policies: the listeners the primary accepts on.
    pub accept: Vec<RawFd>,
    /// `none`: the listeners every worker receives.
    pub shared: Vec<RawFd>,
    pub admin: Option<RawFd>,
    pub control: RawFd,
    pub control_path: PathBuf,
    /// `--node`: the shim file the primary wrote (removed at stop).
    pub node_shim_written: Option<PathBuf>,
    pub next_conn_id: u64,
    pub held: Vec<CarriedConn>,
    pub peeking: Vec<CarriedConn>,
    pub sticky_fallbacks: u64,
    /// The rotation's position (`rr`): where the next connection goes.
    pub cursor: usize,
    pub slots: Vec<CarriedSlot>,
    pub workers: Vec<CarriedWorker>,
    /// `reuseport-rr`: the programs and maps (still attached, still steering), per address.
    pub kernel_rr: Option<CarriedKernelRr>,
    pub any_online_ever: bool,
    pub announced_ready: bool,
    pub output: Vec<CarriedPipe>,
    /// The control client that asked for the upgrade: the new image answers it.
    pub client: Option<RawFd>,
}

/// A connection the primary holds a copy of.
#[derive(Debug, Serialize, Deserialize)]
pub struct CarriedConn {
    pub id: u64,
    pub fd: RawFd,
    pub listener: u16,
    pub peer: SocketAddr,
    pub sent_ms_ago: u64,
    pub key: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct CarriedStart {
    pub in_ms: u64,
    pub restart: bool,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct CarriedSlot {
    pub id: u32,
    pub wanted: bool,
    /// The key of its serving worker in [`State::workers`].
    pub current: Option<usize>,
    pub connections_total: u64,
    pub requests_total: u64,
    pub connections_lost: u64,
    pub restarts: u64,
    pub failures: u32,
    pub start: Option<CarriedStart>,
    pub reuse: Vec<RawFd>,
    pub was_online: bool,
    pub keys: Vec<u8>,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum CarriedLife {
    Spawned {
        exec: RawFd,
        in_ms: u64,
    },
    Starting {
        in_ms: u64,
    },
    Online,
    Draining {
        in_ms: u64,
    },
    Dying {
        kill_in_ms: Option<u64>,
        why: String,
    },
}

#[derive(Debug, Serialize, Deserialize)]
pub struct CarriedNode {
    pub buf: Vec<u8>,
    pub in_flight: Option<u64>,
    pub warnings: u32,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct CarriedLink {
    pub fd: RawFd,
    pub node: Option<CarriedNode>,
    pub inflight: Vec<CarriedConn>,
    pub write_blocked: bool,
    pub outbox: Vec<Vec<u8>>,
    pub stalled_ms_ago: Option<u64>,
    pub dropping_messages: bool,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct CarriedWorker {
    /// Its key in the worker table (slots name their worker by it).
    pub key: usize,
    pub slot: u32,
    pub pid: u32,
    /// `current`, `replacement` or `retiring`.
    pub role: String,
    pub life: CarriedLife,
    pub link: Option<CarriedLink>,
    pub acked: u64,
    /// Last reported (accepted, closed, requests).
    pub reported: [u64; 3],
    pub online_ms_ago: Option<u64>,
    pub last_seen_ms_ago: u64,
    pub skip_ms: Option<u64>,
    pub recycle_at: Option<u64>,
}

/// `reuseport-rr`'s programs and maps, and the counts at the last `/stats/reset`.
#[derive(Debug, Serialize, Deserialize)]
pub struct CarriedKernelRr {
    pub groups: Vec<CarriedRrGroup>,
    pub baseline: Vec<u64>,
}

/// One address's program and maps: see `roundhouse_bpf::RrGroup::carry`.
#[derive(Debug, Serialize, Deserialize)]
pub struct CarriedRrGroup {
    /// prog, socks, ring, origins, state, counts.
    pub fds: [RawFd; 6],
    pub max_slots: u32,
    /// The rotation: (slot, its listener's socket cookie), in order.
    pub members: Vec<(u32, u64)>,
}

/// A worker's stdout or stderr pipe and the start of a line not yet logged.
#[derive(Debug, Serialize, Deserialize)]
pub struct CarriedPipe {
    pub id: u32,
    pub pid: u32,
    pub stderr: bool,
    pub fd: RawFd,
    pub partial: Vec<u8>,
}

impl State {
    /// Every fd the state names.
    pub fn fds(&self) -> Vec<RawFd> {
        let mut v = Vec::new();
        v.extend(&self.accept);
        v.extend(&self.shared);
        v.extend(self.admin);
        v.push(self.control);
        v.extend(self.held.iter().chain(&self.peeking).map(|c| c.fd));
        for s in &self.slots {
            v.extend(&s.reuse);
        }
        for w in &self.workers {
            if let CarriedLife::Spawned { exec, .. } = w.life {
                v.push(exec);
            }
            if let Some(l) = &w.link {
                v.push(l.fd);
                v.extend(l.inflight.iter().map(|c| c.fd));
            }
        }
        v.extend(self.output.iter().map(|p| p.fd));
        v.extend(self.client);
        for g in self.kernel_rr.iter().flat_map(|k| &k.groups) {
            v.extend(g.fds);
        }
        v
    }

    /// Parses and checks a state document: the version this binary reads, every fd named once.
    pub fn parse(bytes: &[u8]) -> Result<State, String> {
        #[derive(Deserialize)]
        struct Version {
            version: u32,
            #[serde(default)]
            written_by: String,
        }
        let v: Version = serde_json::from_slice(bytes)
            .map_err(|e| format!("the upgrade state is not readable: {e}"))?;
        if v.version != STATE_VERSION {
            return Err(format!(
                "upgrade state version {} (from {}) is not the version this binary reads ({})",
                v.version, v.written_by, STATE_VERSION
            ));
        }
        let state: State = serde_json::from_slice(bytes)
            .map_err(|e| format!("the upgrade state is not readable: {e}"))?;
        let mut fds = state.fds();
        let n = fds.len();
        fds.sort_unstable();
        fds.dedup();
        if fds.len() != n || fds.first().is_some_and(|&fd| fd < 3) {
            return Err("the upgrade state names an fd twice, or stdio".into());
        }
        // Slots name their worker by key, workers their slot by id: both must be there (the
        // owner's table is indexed by them).
        let keys: Vec<usize> = state.workers.iter().map(|w| w.key).collect();
        for (i, s) in state.slots.iter().enumerate() {
            if s.id as usize != i + 1 {
                return Err(format!(
                    "the upgrade state is inconsistent: slot {} at position {}",
                    s.id,
                    i + 1
                ));
            }
            if let Some(k) = s.current.filter(|k| !keys.contains(k)) {
                return Err(format!(
                    "the upgrade state is inconsistent: slot {} names worker {k}, which it lacks",
                    s.id
                ));
            }
        }
        let slots = state.slots.len() as u32;
        let mut seen = Vec::with_capacity(keys.len());
        for w in &state.workers {
            if w.slot == 0 || w.slot > slots || seen.contains(&w.key) {
                return Err(format!(
                    "the upgrade state is inconsistent: worker {} (pid {}) in slot {} of {slots}",
                    w.key, w.pid, w.slot
                ));
            }
            seen.push(w.key);
        }
        Ok(state)
    }
}

/// `roundhouse upgrade-check`: reads a state document on stdin and says whether this binary can
/// take it over. Exit code 0 and one line on stdout if it can; the reason otherwise.
pub fn check_stdin() -> Result<String, String> {
    let mut bytes = Vec::new();
    io::stdin()
        .read_to_end(&mut bytes)
        .map_err(|e| format!("could not read the state: {e}"))?;
    let s = State::parse(&bytes)?;
    Ok(format!(
        "ok: roundhouse {} reads upgrade state version {} ({} workers, {} connections held)",
        env!("CARGO_PKG_VERSION"),
        s.version,
        s.workers.len(),
        s.held.len()
            + s.workers
                .iter()
                .filter_map(|w| w.link.as_ref())
                .map(|l| l.inflight.len())
                .sum::<usize>()
    ))
}

/// Runs `exe upgrade-check` with `state` on its stdin; `Err` says why the binary cannot take
/// over. Blocking (run it off the owner thread).
pub fn preflight(exe: &std::path::Path, state: &[u8]) -> Result<String, String> {
    use std::process::{Command, Stdio};
    let what = exe.display();
    // A binary being installed right now may still be open for writing somewhere (ETXTBSY,
    // e.g. in a child forked while the installer had it open): try again for a moment.
    let mut tries = 0;
    let mut child = loop {
        let spawned = Command::new(exe)
            .arg(CHECK_COMMAND)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env_remove(STATE_ENV)
            .spawn();
        match spawned {
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && tries < TXTBSY_TRIES => {
                tries += 1;
                std::thread::sleep(TXTBSY_PAUSE);
            }
            Err(e) => {
                return Err(match e.raw_os_error() {
                    Some(libc::ENOENT) => format!("{what}: no such file"),
                    Some(libc::EACCES) => format!("{what}: not executable (permission denied)"),
                    Some(libc::ENOEXEC) => {
                        format!("{what}: not an executable for this machine (exec format error)")
                    }
                    _ => format!("{what}: {e}"),
                })
            }
            Ok(c) => break c,
        }
    };
    let pid = child.id();
    let mut stdin = child.stdin.take().expect("piped");
    let feed = std::thread::spawn({
        let state = state.to_vec();
        move || {
            let _ = stdin.write_all(&state);
        }
    });
    let deadline = std::time::Instant::now() + CHECK_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if std::time::Instant::now() >= deadline => {
                let _ =
                    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGKILL);
                let _ = child.wait();
                return Err(format!(
                    "{what} upgrade-check did not answer within {}s",
                    CHECK_TIMEOUT.as_secs()
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => return Err(format!("{what} upgrade-check: {e}")),
        }
    };
    let _ = feed.join();
    let mut out = String::new();
    let mut err = String::new();
    if let Some(mut o) = child.stdout.take() {
        let _ = o.read_to_string(&mut out);
    }
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    let first = |s: &str| s.lines().next().unwrap_or("").trim().to_string();
    if status.success() && out.starts_with("ok") {
        return Ok(first(&out));
    }
    let why = [first(&err), first(&out)]
        .into_iter()
        .find(|s| !s.is_empty())
        .unwrap_or_else(|| format!("exited with {status}"));
    Err(format!("{what} cannot take over: {why}"))
}

/// The path this program was started from, as the user named it: `argv[0]` if it has a `/`
/// (made absolute), else where `PATH` finds it, else `/proc/self/exe`. Not `/proc/self/exe`
/// first: that resolves symlinks, and an upgrade must follow a symlink that now points to the
/// new version (`/usr/local/bin/roundhouse -> /opt/roundhouse-1.2/roundhouse`).
pub fn started_from() -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let arg0 = PathBuf::from(std::env::args_os().next()?);
    if arg0.as_os_str().as_bytes().contains(&b'/') {
        return std::path::absolute(&arg0).ok();
    }
    let found = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(&arg0))
            .find(|c| {
                std::fs::metadata(c)
                    .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            })
    });
    match found {
        Some(c) => std::path::absolute(c).ok(),
        None => std::env::current_exe().ok(),
    }
}

/// Sets or clears close-on-exec on `fd`.
pub(crate) fn set_cloexec(fd: RawFd, on: bool) -> io::Result<()> {
    let flags = if on {
        FdFlag::FD_CLOEXEC
    } else {
        FdFlag::empty()
    };
    fcntl(fd, FcntlArg::F_SETFD(flags))?;
    Ok(())
}

/// Whether `fd` is open.
fn is_open(fd: RawFd) -> bool {
    fcntl(fd, FcntlArg::F_GETFD).is_ok()
}

/// Blocks (or unblocks) the handled signals on the calling thread.
pub fn block_signals(block: bool) {
    let mut set = SigSet::empty();
    for s in HANDLED {
        set.add(s);
    }
    let how = if block {
        SigmaskHow::SIG_BLOCK
    } else {
        SigmaskHow::SIG_UNBLOCK
    };
    let _ = nix::sys::signal::pthread_sigmask(how, Some(&set), None);
}

/// Writes `state` into a memfd that survives the exec.
fn state_memfd(state: &[u8]) -> io::Result<OwnedFd> {
    let name = CString::new("roundhouse-upgrade-state").expect("no NUL");
    let fd = nix::sys::memfd::memfd_create(&name, nix::sys::memfd::MemFdCreateFlag::empty())?;
    let mut f = std::fs::File::from(fd);
    f.write_all(state)?;
    f.rewind()?;
    Ok(f.into())
}

/// Executes `exe` in place of this process with `state` in a memfd. Returns only on failure,
/// with every fd's close-on-exec flag and the signal mask as they were.
pub(crate) fn exec(exe: &std::path::Path, state: &[u8], fds: &[RawFd]) -> io::Error {
    let memfd = match state_memfd(state) {
        Ok(fd) => fd,
        Err(e) => return e,
    };
    let argv: Vec<CString> = std::env::args_os()
        .map(|a| CString::new(a.as_bytes()).unwrap_or_default())
        .collect();
    let mut env: Vec<CString> = std::env::vars_os()
        .filter(|(k, _)| k != STATE_ENV)
        .filter_map(|(k, v)| {
            let mut kv = k.as_bytes().to_vec();
            kv.push(b'=');
            kv.extend_from_slice(v.as_bytes());
            CString::new(kv).ok()
        })
        .collect();
    env.push(
        CString::new(format!("{STATE_ENV}={}", memfd.as_raw_fd())).expect("no NUL in a number"),
    );
    let path = match CString::new(exe.as_os_str().as_bytes()) {
        Ok(p) => p,
        Err(e) => return io::Error::new(io::ErrorKind::InvalidInput, e),
    };
    let mut cleared = Vec::with_capacity(fds.len() + 1);
    for &fd in fds.iter().chain([&memfd.as_raw_fd()]) {
        if let Err(e) = set_cloexec(fd, false) {
            for &fd in &cleared {
                let _ = set_cloexec(fd, true);
            }
            return io::Error::new(e.kind(), format!("fd {fd}: {e}"));
        }
        cleared.push(fd);
    }
    block_signals(true);
    let saved = ignore_across_exec();
    let mut tries = 0;
    let err = loop {
        match nix::unistd::execve(&path, &argv, &env) {
            Err(nix::errno::Errno::ETXTBSY) if tries < TXTBSY_TRIES => {
                tries += 1;
                std::thread::sleep(TXTBSY_PAUSE);
            }
            Err(e) => break io::Error::from(e),
            Ok(never) => match never {},
        }
    };
    restore_actions(saved);
    block_signals(false);
    for &fd in &cleared {
        let _ = set_cloexec(fd, true);
    }
    err
}

/// Sets [`IGNORED_ACROSS`] to `SIG_IGN` (they are blocked already); returns the actions to put
/// back if the exec fails. The new image replaces them with its handlers.
fn ignore_across_exec() -> Vec<(Signal, nix::sys::signal::SigAction)> {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler};
    let ignore = SigAction::new(SigHandler::SigIgn, SaFlags::empty(), SigSet::empty());
    IGNORED_ACROSS
        .iter()
        .filter_map(|&sig| {
            // SAFETY: installs SIG_IGN, which runs no code of ours in a signal context.
            let old = unsafe { sigaction(sig, &ignore) }.ok()?;
            Some((sig, old))
        })
        .collect()
}

/// Puts back what [`ignore_across_exec`] replaced (the exec failed).
fn restore_actions(saved: Vec<(Signal, nix::sys::signal::SigAction)>) {
    for (sig, old) in saved {
        // SAFETY: reinstalls exactly the action the kernel returned for this signal a moment
        // ago (the runtime's handler), as it was installed.
        let _ = unsafe { nix::sys::signal::sigaction(sig, &old) };
    }
}

/// In the new image: the state the old one left, if this process is the result of an upgrade.
/// Removes the variable from the environment (workers must not see it). Call it while the
/// process has one thread.
pub fn take_state() -> Option<Result<State, String>> {
    let v = std::env::var_os(STATE_ENV)?;
    std::env::remove_var(STATE_ENV);
    let fd: RawFd = match v.to_str().and_then(|s| s.parse().ok()) {
        Some(fd) if fd > 2 && is_open(fd) => fd,
        _ => {
            return Some(Err(format!(
                "{STATE_ENV}={} does not name an open fd",
                v.to_string_lossy()
            )))
        }
    };
    // SAFETY: the old image left this memfd open for us under this number, and nothing else
    // in this process knows it.
    let mut f = unsafe { std::fs::File::from_raw_fd(fd) };
    let mut bytes = Vec::new();
    if let Err(e) = f.read_to_end(&mut bytes) {
        return Some(Err(format!("could not read the upgrade state: {e}")));
    }
    drop(f);
    Some(State::parse(&bytes).and_then(|s| {
        let missing: Vec<RawFd> = s.fds().into_iter().filter(|&fd| !is_open(fd)).collect();
        if missing.is_empty() {
            Ok(s)
        } else {
            Err(format!(
                "the upgrade state names fds that are not open: {missing:?}"
            ))
        }
    }))
}

/// Takes ownership of an fd the state names, close-on-exec again.
pub(crate) fn adopt(fd: RawFd) -> OwnedFd {
    let _ = set_cloexec(fd, true);
    // SAFETY: `take_state` checked that every fd the state names is open, and each is named
    // once (`State::parse`); it was left to this image by the old one and is adopted once.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Milliseconds from now until `t` (0 if past).
pub(crate) fn ms_until(t: std::time::Instant, now: std::time::Instant) -> u64 {
    t.saturating_duration_since(now).as_millis() as u64
}

/// Milliseconds since `t` (0 if in the future).
pub(crate) fn ms_since(t: std::time::Instant, now: std::time::Instant) -> u64 {
    now.saturating_duration_since(t).as_millis() as u64
}

/// `now + ms`.
pub(crate) fn after(now: std::time::Instant, ms: u64) -> std::time::Instant {
    now + Duration::from_millis(ms)
}

/// `now - ms` (or `now`, if the clock does not go back that far).
pub(crate) fn before(now: std::time::Instant, ms: u64) -> std::time::Instant {
    now.checked_sub(Duration::from_millis(ms)).unwrap_or(now)
}

static LOG_JSON: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The binary's `--log-format json`, remembered so an upgrade keeps it.
pub fn set_log_json(json: bool) {
    LOG_JSON.store(json, std::sync::atomic::Ordering::Relaxed);
}

pub(crate) fn log_json() -> bool {
    LOG_JSON.load(std::sync::atomic::Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> State {
        State {
            version: STATE_VERSION,
            written_by: "roundhouse test".into(),
            self_exe: "/usr/local/bin/roundhouse".into(),
            log_json: false,
            config: {
                let mut c = Config::new("hello-worker");
                c.policy = "sticky".parse().unwrap();
                c.sticky_key = "header:X-Forwarded-For".parse().unwrap();
                c.env.push(("A".into(), "b".into()));
                c
            },
            exe: "/usr/bin/hello-worker".into(),
            uptime_ms: 1234,
            addrs: vec!["127.0.0.1:8000".parse().unwrap()],
            accept: vec![5],
            shared: vec![],
            admin: None,
            control: 6,
            control_path: "/run/rh.sock".into(),
            node_shim_written: None,
            next_conn_id: 42,
            held: vec![CarriedConn {
                id: 41,
                fd: 7,
                listener: 0,
                peer: "127.0.0.1:5555".parse().unwrap(),
                sent_ms_ago: 3,
                key: 9,
            }],
            peeking: vec![],
            sticky_fallbacks: 0,
            cursor: 1,
            slots: vec![],
            workers: vec![],
            kernel_rr: None,
            any_online_ever: true,
            announced_ready: true,
            output: vec![],
            client: Some(8),
        }
    }

    #[test]
    fn a_state_round_trips_with_its_config() {
        let bytes = serde_json::to_vec(&state()).unwrap();
        let back = State::parse(&bytes).unwrap();
        assert_eq!(back.config.policy.as_str(), "sticky");
        assert_eq!(back.config.sticky_key.to_string(), "header:x-forwarded-for");
        assert_eq!(back.config.env, vec![("A".into(), "b".into())]);
        assert_eq!(back.fds(), vec![5, 6, 7, 8]);
    }

    #[test]
    fn another_version_a_reused_fd_or_stdio_is_refused_with_a_reason() {
        let mut s = state();
        s.version = 99;
        let e = State::parse(&serde_json::to_vec(&s).unwrap()).unwrap_err();
        assert!(e.contains("version 99") && e.contains("(1)"), "{e}");
        let mut s = state();
        s.client = Some(7);
        let e = State::parse(&serde_json::to_vec(&s).unwrap()).unwrap_err();
        assert!(e.contains("fd twice"), "{e}");
        let mut s = state();
        s.control = 2;
        assert!(State::parse(&serde_json::to_vec(&s).unwrap()).is_err());
        let e = State::parse(b"{\"version\":1}").unwrap_err();
        assert!(e.contains("not readable"), "{e}");
        let mut v = serde_json::to_value(state()).unwrap();
        v["slots"] = serde_json::json!([{"id": 1, "wanted": true, "current": 3,
            "connections_total": 0, "requests_total": 0, "connections_lost": 0, "restarts": 0,
            "failures": 0, "start": null, "reuse": [], "was_online": true, "keys": []}]);
        let e = State::parse(v.to_string().as_bytes()).unwrap_err();
        assert!(e.contains("slot 1 names worker 3"), "{e}");
        let mut v = serde_json::to_value(state()).unwrap();
        v["config"]["policy"] = "fastest".into();
        let e = State::parse(v.to_string().as_bytes()).unwrap_err();
        assert!(e.contains("fastest"), "{e}");
    }
}
