//! `Worker::from_env`: what it accepts and how it explains what it does not. Alone in its own
//! test binary because it changes the process environment.

mod common;

use std::os::fd::{AsRawFd, IntoRawFd};

use common::F;
use roundhouse_worker::{Error, Policy, Worker};

fn set(vars: &[(&str, &str)]) {
    for k in [
        "ROUNDHOUSE_FD",
        "ROUNDHOUSE_WORKER_ID",
        "ROUNDHOUSE_POLICY",
        "LISTEN_FDS",
        "LISTEN_PID",
    ] {
        std::env::remove_var(k);
    }
    for (k, v) in vars {
        std::env::set_var(k, v);
    }
}

fn is_open(fd: i32) -> bool {
    nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD).is_ok()
}

#[tokio::test]
async fn from_env_checks_everything_before_taking_anything() {
    set(&[]);
    let e = Worker::from_env().unwrap_err();
    assert!(
        matches!(e, Error::NotUnderRoundhouse("ROUNDHOUSE_FD")),
        "{e}"
    );
    assert_eq!(
        e.to_string(),
        "not running under roundhouse: ROUNDHOUSE_FD is not set"
    );

    let (p, w) = roundhouse_proto::sys::seqpacket_pair().unwrap();
    let wfd = w.into_raw_fd().to_string();
    let base = [
        ("ROUNDHOUSE_FD", wfd.as_str()),
        ("ROUNDHOUSE_WORKER_ID", "2"),
        ("ROUNDHOUSE_POLICY", "rr"),
    ];
    let with = |k: &'static str, v: &'static str| {
        let mut vars: Vec<(&str, &str)> = base.iter().copied().filter(|(n, _)| *n != k).collect();
        vars.push((k, v));
        set(&vars);
    };

    with("ROUNDHOUSE_FD", "x3");
    let e = Worker::from_env().unwrap_err();
    assert!(
        matches!(
            e,
            Error::InvalidEnv {
                var: "ROUNDHOUSE_FD",
                ..
            }
        ),
        "{e}"
    );

    // An fd that is not a SOCK_SEQPACKET socket is refused, and left open.
    let stdin = std::io::stdin().as_raw_fd().to_string();
    let leaked: &'static str = Box::leak(stdin.into_boxed_str());
    with("ROUNDHOUSE_FD", leaked);
    let e = Worker::from_env().unwrap_err();
    assert!(matches!(e, Error::BadFd { fd: 0, .. }), "{e}");
    assert!(is_open(0));

    with("ROUNDHOUSE_WORKER_ID", "0");
    assert!(matches!(
        Worker::from_env().unwrap_err(),
        Error::InvalidEnv {
            var: "ROUNDHOUSE_WORKER_ID",
            ..
        }
    ));
    with("ROUNDHOUSE_POLICY", "fastest");
    assert!(matches!(
        Worker::from_env().unwrap_err(),
        Error::InvalidEnv {
            var: "ROUNDHOUSE_POLICY",
            ..
        }
    ));
    with("ROUNDHOUSE_POLICY", "none");
    assert!(matches!(
        Worker::from_env().unwrap_err(),
        Error::MissingListeners(Policy::None)
    ));
    let mut vars = base.to_vec();
    vars.retain(|(k, _)| *k != "ROUNDHOUSE_POLICY");
    vars.extend([
        ("ROUNDHOUSE_POLICY", "reuseport"),
        ("LISTEN_FDS", "1"),
        ("LISTEN_PID", "1"),
    ]);
    set(&vars);
    let e = Worker::from_env().unwrap_err();
    assert!(
        matches!(e, Error::ListenPidMismatch { listen_pid: 1, .. }),
        "{e}"
    );

    // The channel fd survived every failed attempt; now it is taken.
    set(&base);
    let w = Worker::from_env().unwrap();
    assert_eq!((w.id(), w.policy()), (2, Policy::RoundRobin));
    let flags = nix::fcntl::fcntl(wfd.parse().unwrap(), nix::fcntl::FcntlArg::F_GETFD).unwrap();
    assert!(
        flags & libc::FD_CLOEXEC != 0,
        "the channel must be close-on-exec"
    );
    let mut p = common::Primary::new(p);
    w.ready();
    assert_eq!(p.recv().await, Some(F::Ready));

    assert!(matches!(
        Worker::from_env().unwrap_err(),
        Error::AlreadyTaken
    ));
    // This worker exits the process at end of file: keep the primary's end open past the test.
    std::mem::forget(p);
}
