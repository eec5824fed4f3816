//! `MSG_CTRUNC` for real: the worker is out of descriptors when a `CONNS` frame arrives, so the
//! kernel installs only some of its fds. The worker must refuse every id of the frame, close the
//! fds that did arrive, and carry on.
//!
//! Alone in its own test binary (its own process) because it lowers `RLIMIT_NOFILE`, which would
//! break any test running beside it.

mod common;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use common::{local_listener, pair, tcp_pair, DEADLINE, F};
use nix::sys::resource::{getrlimit, setrlimit, Resource};

/// The lowest free descriptor number (what the kernel hands out next).
fn lowest_free_fd() -> i32 {
    let probe = nix::unistd::dup(std::io::stdin().as_raw_fd()).unwrap();
    // SAFETY: `probe` was just created by dup and is owned by nobody else.
    drop(unsafe { OwnedFd::from_raw_fd(probe) });
    probe
}

#[tokio::test]
async fn lost_fds_refuse_the_whole_batch_and_leak_nothing() {
    let (mut p, w) = pair(1);
    let mut listener = w.take_listener().unwrap();
    w.ready();
    assert_eq!(p.recv().await, Some(F::Ready));

    let l = local_listener();
    let conns: Vec<_> = (0..3).map(|_| tcp_pair(&l)).collect();
    let extra = tcp_pair(&l);

    // Room for exactly one more descriptor: the kernel installs the first fd of the batch and
    // drops the other two.
    let free = lowest_free_fd();
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, free as u64 + 1, hard).unwrap();
    p.send_conns(&[(1, &conns[0].1), (2, &conns[1].1), (3, &conns[2].1)])
        .await;
    let got = p.recv_significant().await;
    setrlimit(Resource::RLIMIT_NOFILE, soft, hard).unwrap();
    assert_eq!(got, Some(F::Refuse(vec![1, 2, 3])));
    // The one fd that arrived was closed again.
    assert_eq!(lowest_free_fd(), free, "a received fd leaked");

    // The worker goes on: the next batch is acknowledged and handed over.
    p.send_conns(&[(4, &extra.1)]).await;
    assert_eq!(p.recv_significant().await, Some(F::Ack(vec![4])));
    let (conn, _) = tokio::time::timeout(DEADLINE, listener.accept())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(conn.conn_id(), Some(4));
}
