//! The supervisor's one reactor registration that needs `unsafe`, kept beside the syscalls it
//! guards (the rest are in `spawn` and in `roundhouse_proto::sys`).

use std::io;
use std::os::fd::AsRawFd;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// Registers an fd-owning value with the reactor.
pub(crate) fn register<T: AsRawFd>(inner: T, interest: Interest) -> io::Result<AsyncFd<T>> {
    // SAFETY: `inner` owns its fd (a TcpListener, a pipe or a socket as OwnedFd) and is moved
    // into the AsyncFd, so the fd cannot be closed or replaced while it is registered; dropping
    // the AsyncFd deregisters before the fd is closed.
    unsafe { AsyncFd::register_with_interest(inner, interest) }.map_err(|e| e.into())
}
