//! Reading what the primary gave us: the environment and the inherited descriptors.
//!
//! This is the only module that turns a number into an owned descriptor, so it is where the
//! checks live. A descriptor is taken only after the environment says it is ours *and* the
//! kernel agrees it is what the environment says (an open `AF_UNIX` `SOCK_SEQPACKET` socket for
//! the channel, listening TCP sockets for `LISTEN_FDS`, after `LISTEN_PID` matched our pid as
//! `sd_listen_fds` does). If any check fails nothing is closed: a descriptor we did not prove is
//! ours is left alone. Taken descriptors are made close-on-exec at once, so a program the worker
//! runs does not inherit its channel or listeners.

use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::error::Error;
use crate::Policy;

/// The first descriptor of the systemd socket-activation convention.
const SD_LISTEN_FDS_START: RawFd = 3;

/// `Worker::from_env` takes the channel once; a second call would create a second owner.
static TAKEN: AtomicBool = AtomicBool::new(false);

pub(crate) struct FromEnv {
    pub(crate) channel: OwnedFd,
    pub(crate) id: u32,
    pub(crate) policy: Policy,
    pub(crate) listeners: Vec<std::net::TcpListener>,
}

fn var(name: &'static str) -> Result<String, Error> {
    match std::env::var(name) {
        Ok(v) => Ok(v),
        Err(std::env::VarError::NotPresent) => Err(Error::NotUnderRoundhouse(name)),
        Err(std::env::VarError::NotUnicode(v)) => Err(Error::InvalidEnv {
            var: name,
            value: v.to_string_lossy().into_owned(),
            reason: "not UTF-8",
        }),
    }
}

fn parse<T: std::str::FromStr>(
    name: &'static str,
    value: &str,
    reason: &'static str,
) -> Result<T, Error> {
    value.trim().parse().map_err(|_| Error::InvalidEnv {
        var: name,
        value: value.to_owned(),
        reason,
    })
}

pub(crate) fn take() -> Result<FromEnv, Error> {
    let fd_s = var("ROUNDHOUSE_FD")?;
    let id_s = var("ROUNDHOUSE_WORKER_ID")?;
    let policy_s = var("ROUNDHOUSE_POLICY")?;
    let fd: RawFd = parse("ROUNDHOUSE_FD", &fd_s, "not a file descriptor number")?;
    if fd < 0 {
        return Err(Error::InvalidEnv {
            var: "ROUNDHOUSE_FD",
            value: fd_s,
            reason: "not a file descriptor number",
        });
    }
    let id: u32 = parse("ROUNDHOUSE_WORKER_ID", &id_s, "not a worker id (1..)")?;
    if id == 0 {
        return Err(Error::InvalidEnv {
            var: "ROUNDHOUSE_WORKER_ID",
            value: id_s,
            reason: "not a worker id (1..)",
        });
    }
    let policy: Policy = parse(
        "ROUNDHOUSE_POLICY",
        &policy_s,
        "not one of rr, least-conn, none, reuseport",
    )?;

    // Check every descriptor before taking any, so an error leaves all of them alone.
    check_socket(
        fd,
        libc::AF_UNIX,
        libc::SOCK_SEQPACKET,
        "the roundhouse channel",
    )?;
    let listen_fds = if policy.hands_off() {
        Vec::new()
    } else {
        listen_fds(policy, fd)?
    };

    if TAKEN.swap(true, Ordering::SeqCst) {
        return Err(Error::AlreadyTaken);
    }
    // SAFETY: the primary passed this fd to us alone (ROUNDHOUSE_FD), check_socket proved it is
    // open and a SOCK_SEQPACKET socket, and TAKEN makes this the only OwnedFd ever made of it.
    let channel = unsafe { OwnedFd::from_raw_fd(fd) };
    set_cloexec(fd, "the roundhouse channel")?;
    let mut listeners = Vec::with_capacity(listen_fds.len());
    for l in listen_fds {
        // SAFETY: LISTEN_PID named this process, so these fds were passed to us; listen_fds
        // proved each is an open listening TCP socket distinct from the channel, and TAKEN
        // guarantees they are taken once.
        let owned = unsafe { OwnedFd::from_raw_fd(l) };
        set_cloexec(l, "a LISTEN_FDS listener")?;
        listeners.push(std::net::TcpListener::from(owned));
    }
    Ok(FromEnv {
        channel,
        id,
        policy,
        listeners,
    })
}

/// The listener fds under `none`/`reuseport`, checked but not yet owned.
fn listen_fds(policy: Policy, channel: RawFd) -> Result<Vec<RawFd>, Error> {
    let n_s = std::env::var("LISTEN_FDS").map_err(|_| Error::MissingListeners(policy))?;
    let pid_s = var("LISTEN_PID")?;
    let listen_pid: u32 = parse("LISTEN_PID", &pid_s, "not a process id")?;
    let pid = std::process::id();
    if listen_pid != pid {
        return Err(Error::ListenPidMismatch { listen_pid, pid });
    }
    let n: RawFd = parse("LISTEN_FDS", &n_s, "not a count of descriptors")?;
    if n <= 0 || n > 1024 {
        return Err(Error::InvalidEnv {
            var: "LISTEN_FDS",
            value: n_s,
            reason: "not a count of descriptors (1..=1024)",
        });
    }
    let fds: Vec<RawFd> = (SD_LISTEN_FDS_START..SD_LISTEN_FDS_START + n).collect();
    if fds.contains(&channel) {
        return Err(Error::InvalidEnv {
            var: "ROUNDHOUSE_FD",
            value: channel.to_string(),
            reason: "the channel is one of the LISTEN_FDS descriptors",
        });
    }
    for &fd in &fds {
        check_listener(fd)?;
    }
    Ok(fds)
}

fn getsockopt_int(fd: RawFd, opt: libc::c_int) -> std::io::Result<libc::c_int> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `v` and `len` are valid for writes of an int; getsockopt does not keep them and
    // does not touch the fd's ownership (a bad fd is EBADF, not undefined behaviour).
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            opt,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(v)
}

fn bad(fd: RawFd, what: &'static str, msg: &str) -> Error {
    Error::BadFd {
        fd,
        what,
        error: std::io::Error::new(std::io::ErrorKind::InvalidInput, msg.to_owned()),
    }
}

fn check_socket(
    fd: RawFd,
    domain: libc::c_int,
    ty: libc::c_int,
    what: &'static str,
) -> Result<(), Error> {
    let got_ty =
        getsockopt_int(fd, libc::SO_TYPE).map_err(|error| Error::BadFd { fd, what, error })?;
    let got_domain =
        getsockopt_int(fd, libc::SO_DOMAIN).map_err(|error| Error::BadFd { fd, what, error })?;
    if got_ty != ty || got_domain != domain {
        return Err(bad(fd, what, "the socket has the wrong type"));
    }
    Ok(())
}

fn check_listener(fd: RawFd) -> Result<(), Error> {
    const WHAT: &str = "a LISTEN_FDS listener";
    let domain = getsockopt_int(fd, libc::SO_DOMAIN).map_err(|error| Error::BadFd {
        fd,
        what: WHAT,
        error,
    })?;
    if domain != libc::AF_INET && domain != libc::AF_INET6 {
        return Err(bad(fd, WHAT, "not a TCP socket"));
    }
    check_socket(fd, domain, libc::SOCK_STREAM, WHAT)?;
    let listening = getsockopt_int(fd, libc::SO_ACCEPTCONN).map_err(|error| Error::BadFd {
        fd,
        what: WHAT,
        error,
    })?;
    if listening == 0 {
        return Err(bad(fd, WHAT, "the socket is not listening"));
    }
    Ok(())
}

fn set_cloexec(fd: RawFd, what: &'static str) -> Result<(), Error> {
    // SAFETY: fcntl on an fd we own has no memory-safety requirements.
    let r = unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    if r < 0 {
        return Err(Error::BadFd {
            fd,
            what,
            error: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}
