//! The seam between the owner loop and the operating system's processes.
//!
//! The owner loop never forks, signals or reaps by itself: it asks a [`Spawner`]. The default,
//! [`ProcessSpawner`], forks and executes the command (`spawn::spawn_nowait`), signals the
//! worker's whole process group and reaps with `waitpid`. Tests (and embedders with unusual
//! needs) can give [`crate::Builder::spawner`] another one — for instance workers from the worker
//! library running on threads of the test process over a socketpair, so that the *real* owner
//! loop is driven in-process, breadth-first, without a binary per case (watchexec's supervisor
//! tests work the same way). A spawner that runs no processes must still wake the loop when a
//! worker ends: the loop reaps on `SIGCHLD`, so it raises `SIGCHLD` in its own process
//! ([`wake_reaper`]).

#![forbid(unsafe_code)]

use std::os::fd::OwnedFd;

use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::events::ExitInfo;
use crate::spawn::{self, Forked, SpawnError, SpawnSpec};

/// Starts, signals and reaps workers for the owner loop. Called only on the owner's thread.
pub trait Spawner: Send + 'static {
    /// Starts a worker as described (the fds in `spec.fds` are lent for the call: duplicate
    /// what must outlive it). Returns its id — a pid for processes — and a pipe that reaches
    /// end-of-file once the command runs, or carries 4 bytes of errno if it could not (see
    /// [`Forked`]). Must not block.
    fn spawn(&mut self, spec: &SpawnSpec<'_>) -> Result<Forked, SpawnError>;
    /// Delivers `sig` to the worker `pid` and everything it started. Never called after
    /// [`Spawner::try_wait`] reported it gone.
    fn signal(&mut self, pid: u32, sig: Signal);
    /// `Some` once the worker has ended (and is reaped), `None` while it runs.
    fn try_wait(&mut self, pid: u32) -> Option<ExitInfo>;
}

/// Real processes: fork + execve, process groups, `waitpid`.
#[derive(Debug, Default)]
pub struct ProcessSpawner;

impl Spawner for ProcessSpawner {
    fn spawn(&mut self, spec: &SpawnSpec<'_>) -> Result<Forked, SpawnError> {
        spawn::spawn_nowait(spec)
    }

    /// Like systemd's `KillMode=mixed`: the polite signals (`SIGTERM`, `SIGCONT`) go to the
    /// worker itself, which stops its own children its own way (gunicorn's master drains its
    /// workers; signalled directly, they would exit under it and be re-forked mid-stop);
    /// `SIGKILL` goes to the worker's whole process group. What the worker leaves behind in its
    /// group when it exits is killed when it is reaped ([`ProcessSpawner::try_wait`]), so no
    /// child outlives it either way.
    fn signal(&mut self, pid: u32, sig: Signal) {
        let pid = pid as i32;
        if sig == Signal::SIGKILL {
            // The worker leads its own group (set on both sides of the fork); fall back to the
            // process itself should the group not exist.
            if kill(Pid::from_raw(-pid), sig).is_ok() {
                return;
            }
        }
        let _ = kill(Pid::from_raw(pid), sig);
    }

    fn try_wait(&mut self, pid: u32) -> Option<ExitInfo> {
        let status = self.wait(pid)?;
        // Whatever the worker started and left in its group goes with it. (The group's id
        // cannot be reused while any member lives, so this reaches only the worker's own.)
        let _ = kill(Pid::from_raw(-(pid as i32)), Signal::SIGKILL);
        Some(status)
    }
}

impl ProcessSpawner {
    fn wait(&mut self, pid: u32) -> Option<ExitInfo> {
        match waitpid(Pid::from_raw(pid as i32), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(_, code)) => Some(ExitInfo::Code(code)),
            Ok(WaitStatus::Signaled(_, sig, _)) => Some(ExitInfo::Signal(sig as i32)),
            Ok(_) => None,
            // Reaped by someone else (an embedder's own `waitpid(-1)`).
            Err(Errno::ECHILD) => Some(ExitInfo::Unknown),
            Err(e) => {
                tracing::debug!("waitpid: {e}");
                None
            }
        }
    }
}

/// For spawners without processes: tells the owner loop that a worker ended, as `SIGCHLD` does.
pub fn wake_reaper() {
    let _ = kill(Pid::this(), Signal::SIGCHLD);
}

/// An exec-status pipe that says "started" at once (end-of-file), for spawners whose workers
/// need no `execve`.
pub fn started_pipe() -> std::io::Result<OwnedFd> {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)?;
    drop(w);
    Ok(r)
}
