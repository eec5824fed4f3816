//! Binding the listening sockets.
//!
//! `std`'s and tokio's `bind` use a backlog of 128, which a burst of connection-per-request
//! clients overflows while the primary is busy; we bind with `socket2` and the configured
//! backlog (the kernel caps it at `somaxconn`). Every socket is close-on-exec and non-blocking;
//! it reaches a worker only by an explicit `dup2` in the child (see `spawn`).

#![forbid(unsafe_code)]

use std::io;
use std::net::{SocketAddr, TcpListener};

use socket2::{Domain, Protocol, Socket, Type};

/// Why a listener could not be bound; the message names the address.
#[derive(Debug, thiserror::Error)]
#[error("could not listen on {addr}: {source}")]
pub struct BindError {
    pub addr: SocketAddr,
    #[source]
    pub source: io::Error,
}

/// Binds one TCP listener (`SO_REUSEADDR`, `IPV6_V6ONLY` for v6, optional `SO_REUSEPORT`).
pub fn bind(addr: SocketAddr, backlog: u32, reuseport: bool) -> Result<TcpListener, BindError> {
    let err = |source| BindError { addr, source };
    let socket =
        Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP)).map_err(err)?;
    socket.set_reuse_address(true).map_err(err)?;
    if reuseport {
        socket.set_reuse_port(true).map_err(err)?;
    }
    if addr.is_ipv6() {
        socket.set_only_v6(true).map_err(err)?;
    }
    socket.set_nonblocking(true).map_err(err)?;
    socket.bind(&addr.into()).map_err(err)?;
    socket
        .listen(backlog.min(i32::MAX as u32) as i32)
        .map_err(err)?;
    Ok(socket.into())
}
