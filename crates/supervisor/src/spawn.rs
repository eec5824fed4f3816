//! Starting a worker process: `fork` + `execve` with an exact fd layout.
//!
//! Why not `std::process::Command`: the worker must find its listeners at fds `3..` with
//! `LISTEN_PID` equal to its *own* pid (systemd's rule, checked by every socket-activation-aware
//! server), and that pid is only known after `fork`. std builds the environment before forking
//! and offers no safe way to change it afterwards, so we prepare argv and envp in the parent
//! (with a fixed-width `LISTEN_PID=` placeholder) and, in the child, do only async-signal-safe
//! things: write the pid digits into the placeholder, move fds into place with `dup2`, reset the
//! signal mask and `SIGPIPE`, join a new process group, set `PR_SET_PDEATHSIG`, `execve`. An exec
//! failure travels back over a close-on-exec pipe (as std does), so "not found" or "not
//! executable" is one clear error in the parent instead of a worker that exits 127 in a loop.
//! The parent does not wait for that pipe ([`spawn_nowait`]): the owner loop watches it with its
//! reactor, so starting many workers never holds up accepting connections.
//!
//! Every fd the primary owns is close-on-exec; the child clears that flag only on the fds it
//! must keep, by `dup2`-ing them to their final numbers. So a worker inherits 0, 1, 2, its
//! listeners (under `none`/`reuseport`) and its channel — nothing else.

use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

/// Why a command could not be started.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("could not execute {path}: {source}")]
    Exec { path: String, source: io::Error },
    #[error("could not start a worker: {0}")]
    Os(#[from] io::Error),
}

/// Finds `cmd` the way `execvp` would (a name with a `/` is used as is), and checks that it is
/// an executable regular file, so a bad command is reported before anything is forked.
pub fn resolve_command(cmd: &OsStr) -> Result<PathBuf, SpawnError> {
    let display = cmd.to_string_lossy().into_owned();
    let not_found = || SpawnError::Exec {
        path: display.clone(),
        source: io::Error::new(io::ErrorKind::NotFound, "command not found"),
    };
    let check = |p: &Path| -> Result<PathBuf, SpawnError> {
        let meta = std::fs::metadata(p).map_err(|source| SpawnError::Exec {
            path: p.display().to_string(),
            source,
        })?;
        use std::os::unix::fs::PermissionsExt;
        if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
            return Err(SpawnError::Exec {
                path: p.display().to_string(),
                source: io::Error::new(io::ErrorKind::PermissionDenied, "not an executable file"),
            });
        }
        Ok(p.to_path_buf())
    };
    if cmd.is_empty() {
        return Err(not_found());
    }
    if cmd.as_bytes().contains(&b'/') {
        return check(Path::new(cmd));
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    for dir in std::env::split_paths(&path) {
        let candidate = dir.join(cmd);
        if candidate.is_file() {
            if let Ok(p) = check(&candidate) {
                return Ok(p);
            }
        }
    }
    Err(not_found())
}

/// What the child should receive.
pub struct SpawnSpec<'a> {
    pub path: &'a Path,
    /// argv[0] and the rest.
    pub argv: &'a [OsString],
    /// Extra environment on top of the primary's (overrides same-named variables).
    pub env: &'a [(OsString, OsString)],
    /// Variables of the primary's environment not to pass on.
    pub env_remove: &'a [&'a str],
    /// Fds to place at 3, 4, ... in order (listeners first, then the channel).
    pub fds: &'a [BorrowedFd<'a>],
    /// Announce the first `listen_fds` of `fds` the systemd way (sets `LISTEN_PID` in the child).
    pub listen_fds: usize,
    /// The child's stdout and stderr (write ends of the primary's capture pipes); `None` keeps
    /// the primary's own.
    pub stdout: Option<BorrowedFd<'a>>,
    pub stderr: Option<BorrowedFd<'a>>,
}

const PID_PLACEHOLDER: &[u8] = b"LISTEN_PID=0000000000";

/// A forked worker whose `execve` may not have happened yet.
///
/// The child reports an exec failure as 4 bytes (its errno) on a close-on-exec pipe, so the
/// read end reaching end-of-file means `execve` succeeded. The read end is non-blocking: the
/// owner registers it with its reactor and learns the outcome without waiting for it, so a
/// thousand workers starting never stall the accept path.
#[derive(Debug)]
pub struct Forked {
    pub pid: u32,
    /// Read end of the exec-status pipe (non-blocking, close-on-exec).
    pub exec_status: OwnedFd,
}

/// What the exec-status pipe says.
#[derive(Debug)]
pub enum ExecStatus {
    /// The child has not reached `execve` yet.
    Pending,
    /// `execve` succeeded.
    Done,
    /// The child could not execute the command (it has `_exit`ed with 127).
    Failed(io::Error),
}

/// Reads the exec-status pipe without blocking.
pub fn exec_status(fd: &OwnedFd) -> ExecStatus {
    let mut buf = [0u8; 4];
    // SAFETY: reading into a live 4-byte buffer from a pipe we own. The child writes its errno
    // with one `write` of 4 bytes (atomic on a pipe), so we see all of it or nothing.
    let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr() as *mut libc::c_void, 4) };
    match n {
        0 => ExecStatus::Done,
        4 => ExecStatus::Failed(io::Error::from_raw_os_error(i32::from_ne_bytes(buf))),
        n if n < 0 => {
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => ExecStatus::Pending,
                _ => ExecStatus::Failed(e),
            }
        }
        _ => ExecStatus::Failed(io::Error::new(
            io::ErrorKind::InvalidData,
            "short exec-status report",
        )),
    }
}

/// Forks and executes the worker, waiting (blocking) until `execve` has succeeded. Returns its
/// pid. The owner loop uses [`spawn_nowait`]; this is for simple embedders and tests.
pub fn spawn(spec: &SpawnSpec<'_>) -> Result<u32, SpawnError> {
    let forked = spawn_nowait(spec)?;
    let fd = forked.exec_status.as_raw_fd();
    loop {
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd on a pipe we own.
        unsafe { libc::poll(&mut pfd, 1, -1) };
        match exec_status(&forked.exec_status) {
            ExecStatus::Pending => continue,
            ExecStatus::Done => return Ok(forked.pid),
            ExecStatus::Failed(source) => {
                reap_failed(forked.pid);
                return Err(SpawnError::Exec {
                    path: spec.path.display().to_string(),
                    source,
                });
            }
        }
    }
}

/// Reaps a child that reported an exec failure (it `_exit`s right after), so it is no zombie.
pub fn reap_failed(pid: u32) {
    let mut status = 0;
    // SAFETY: waiting for our own child, which has exited or is about to.
    unsafe { libc::waitpid(pid as libc::pid_t, &mut status, 0) };
}

/// Forks the worker and returns at once; see [`Forked`] for how to learn whether `execve`
/// succeeded. The child is in its own process group (set on both sides of the fork, so the
/// group exists before either returns and a signal to it cannot miss).
pub fn spawn_nowait(spec: &SpawnSpec<'_>) -> Result<Forked, SpawnError> {
    let cstr =
        |b: Vec<u8>| CString::new(b).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e));
    let path_c = cstr(spec.path.as_os_str().as_bytes().to_vec())?;
    let argv: Vec<CString> = spec
        .argv
        .iter()
        .map(|a| cstr(a.clone().into_vec()))
        .collect::<Result<_, _>>()?;
    let mut envp: Vec<CString> = Vec::new();
    for (k, v) in std::env::vars_os() {
        let ks = k.to_string_lossy();
        if spec.env_remove.iter().any(|r| *r == ks) || spec.env.iter().any(|(ek, _)| *ek == k) {
            continue;
        }
        let mut kv = k.into_vec();
        kv.push(b'=');
        kv.extend_from_slice(v.as_bytes());
        envp.push(cstr(kv)?);
    }
    for (k, v) in spec.env {
        let mut kv = k.clone().into_vec();
        kv.push(b'=');
        kv.extend_from_slice(v.as_bytes());
        envp.push(cstr(kv)?);
    }
    let placeholder_index = if spec.listen_fds > 0 {
        envp.push(cstr(PID_PLACEHOLDER.to_vec())?);
        Some(envp.len() - 1)
    } else {
        None
    };
    let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|c| c.as_ptr()).collect();
    argv_ptrs.push(std::ptr::null());
    let mut envp_ptrs: Vec<*const libc::c_char> = envp.iter().map(|c| c.as_ptr()).collect();
    envp_ptrs.push(std::ptr::null());
    let placeholder: *mut u8 = match placeholder_index {
        Some(i) => envp[i].as_ptr() as *mut u8,
        None => std::ptr::null_mut(),
    };
    let raw_fds: Vec<RawFd> = spec.fds.iter().map(|f| f.as_raw_fd()).collect();
    let stdio = [
        spec.stdout.map(|f| f.as_raw_fd()),
        spec.stderr.map(|f| f.as_raw_fd()),
    ];

    let (err_r, err_w) = pipe_cloexec()?;
    let parent_pid = std::process::id() as libc::pid_t;

    // SAFETY: after fork the child only calls async-signal-safe functions (see `child`) on data
    // prepared above, then execs or _exits; it never returns into Rust code. The parent keeps
    // ownership of every fd; the child's copies vanish with its exec or exit.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error().into());
    }
    if pid == 0 {
        // SAFETY: we are the freshly forked child; see `child`'s contract.
        unsafe {
            child(
                parent_pid,
                &path_c,
                &argv_ptrs,
                &envp_ptrs,
                placeholder,
                ChildFds {
                    fds: &raw_fds,
                    stdio,
                },
                err_w.as_raw_fd(),
            )
        }
    }
    drop(err_w);
    // Join the group on the parent's side too (the classic race: either may run first).
    // SAFETY: setpgid on our own child; EACCES after its exec is harmless.
    unsafe { libc::setpgid(pid, pid) };
    set_nonblocking(&err_r)?;
    Ok(Forked {
        pid: pid as u32,
        exec_status: err_r,
    })
}

fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    // SAFETY: fcntl on an fd we own.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0
        || unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn pipe_cloexec() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: valid 2-element array; on success both fds are new and owned by us.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Closes every fd from `first` up, except `keep`. Async-signal-safe.
///
/// # Safety
/// Only for a freshly forked child: closes fds that other code might think it owns.
unsafe fn close_from(first: libc::c_int, keep: libc::c_int) {
    let close_range = |lo: libc::c_int, hi: libc::c_uint| -> bool {
        lo as libc::c_uint > hi
            || libc::syscall(libc::SYS_close_range, lo as libc::c_uint, hi, 0) == 0
    };
    let below = if keep > first {
        (keep - 1) as libc::c_uint
    } else {
        0
    };
    let ok =
        (keep <= first || close_range(first, below)) && close_range(keep + 1, libc::c_uint::MAX);
    if !ok {
        // Kernels before 5.9: close one by one up to the fd limit.
        let mut rl: libc::rlimit = std::mem::zeroed();
        let max = if libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) == 0 {
            rl.rlim_cur.min(1 << 20) as libc::c_int
        } else {
            65536
        };
        for fd in first..max {
            if fd != keep {
                libc::close(fd);
            }
        }
    }
}

/// What the child moves into place: `fds` to 3.., `stdio` (if any) to 1 and 2.
struct ChildFds<'a> {
    fds: &'a [RawFd],
    stdio: [Option<RawFd>; 2],
}

/// The child side of `spawn`.
///
/// # Safety
/// Must be called only in a freshly forked child; uses only async-signal-safe calls and never
/// returns. `placeholder` is null or points at the writable `LISTEN_PID=0000000000` entry of
/// `envp` (our own copy-on-write memory).
unsafe fn child(
    parent_pid: libc::pid_t,
    path: &CString,
    argv: &[*const libc::c_char],
    envp: &[*const libc::c_char],
    placeholder: *mut u8,
    ChildFds { fds, stdio }: ChildFds<'_>,
    err_w: RawFd,
) -> ! {
    let fail = |err_w: RawFd| -> ! {
        let errno = *libc::__errno_location();
        let bytes = errno.to_ne_bytes();
        libc::write(err_w, bytes.as_ptr() as *const libc::c_void, 4);
        libc::_exit(127);
    };
    // Signals: nothing blocked, SIGPIPE back to default (Rust ignores it in the primary).
    let mut set: libc::sigset_t = std::mem::zeroed();
    libc::sigemptyset(&mut set);
    libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
    libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    // Own process group: a terminal's Ctrl-C reaches the primary, which drains the workers.
    libc::setpgid(0, 0);
    // No orphans: die with the primary. If it already died before prctl, exit now.
    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
        fail(err_w);
    }
    if libc::getppid() != parent_pid {
        libc::_exit(1);
    }
    // Move fds into place. First copy every source (and the error pipe) above the target range,
    // so no dup2 clobbers an fd still needed; dup2 onto the target then clears close-on-exec.
    let high = 4 + fds.len() as libc::c_int;
    let err_w = if err_w < high {
        let e = libc::fcntl(err_w, libc::F_DUPFD_CLOEXEC, high);
        if e < 0 {
            fail(err_w);
        }
        e
    } else {
        err_w
    };
    let mut temps = [0 as libc::c_int; 64];
    let n = fds.len().min(temps.len());
    for i in 0..n {
        let t = libc::fcntl(fds[i], libc::F_DUPFD_CLOEXEC, high);
        if t < 0 {
            fail(err_w);
        }
        temps[i] = t;
    }
    // The capture pipes too, before any dup2 can clobber them.
    let mut stdio_temps = [-1 as libc::c_int; 2];
    for (slot, fd) in stdio_temps.iter_mut().zip(stdio) {
        if let Some(fd) = fd {
            *slot = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, high);
            if *slot < 0 {
                fail(err_w);
            }
        }
    }
    for (i, t) in temps.iter().take(n).enumerate() {
        if libc::dup2(*t, 3 + i as libc::c_int) < 0 {
            fail(err_w);
        }
    }
    for (target, t) in [1, 2].into_iter().zip(stdio_temps) {
        if t >= 0 && libc::dup2(t, target) < 0 {
            fail(err_w);
        }
    }
    // Close everything else the primary may have inherited without close-on-exec (from a
    // careless parent): the worker gets 0-2, its fds at 3.., and nothing more. The error pipe
    // moves to the first fd after the targets so two close_range calls cover the rest.
    let first_free = 3 + n as libc::c_int;
    let err_w = if err_w != first_free {
        let e = libc::fcntl(err_w, libc::F_DUPFD_CLOEXEC, first_free);
        if e < 0 {
            fail(err_w);
        }
        e
    } else {
        err_w
    };
    close_from(first_free, err_w);
    if !placeholder.is_null() {
        // Write our pid right-aligned into the 10 digits after "LISTEN_PID=", then shift it to
        // the start so no leading zeros remain.
        let mut pid = libc::getpid() as u32;
        let digits_at = placeholder.add(b"LISTEN_PID=".len());
        let mut tmp = [0u8; 10];
        let mut len = 0;
        loop {
            tmp[len] = b'0' + (pid % 10) as u8;
            len += 1;
            pid /= 10;
            if pid == 0 {
                break;
            }
        }
        for i in 0..len {
            *digits_at.add(i) = tmp[len - 1 - i];
        }
        *digits_at.add(len) = 0;
    }
    libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr());
    fail(err_w)
}
