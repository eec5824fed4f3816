//! systemd readiness notification (`sd_notify`), without libsystemd.
//!
//! With `NOTIFY_SOCKET` set, the primary sends `READY=1` once every first worker is online,
//! `RELOADING=1` (with `MONOTONIC_USEC`) when a reload starts and `READY=1` after it, and
//! `STOPPING=1` on stop. Without it, every call is a no-op. Failures are logged, never fatal.

#![forbid(unsafe_code)]

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// Sends `state` (e.g. `"READY=1"`) to `$NOTIFY_SOCKET` if it is set.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str()).to_vec();
    let addr = if let Some(name) = bytes.strip_prefix(b"@") {
        SocketAddr::from_abstract_name(name)
    } else {
        SocketAddr::from_pathname(std::path::Path::new(&path))
    };
    let result = addr.and_then(|addr| {
        let sock = UnixDatagram::unbound()?;
        sock.send_to_addr(state.as_bytes(), &addr)
    });
    if let Err(e) = result {
        tracing::warn!(notify.state = state, "could not notify systemd: {e}");
    }
}

/// `RELOADING=1` with the `MONOTONIC_USEC` systemd requires for `Type=notify-reload`.
pub fn reloading() {
    let usec = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1000)
        .unwrap_or(0);
    notify(&format!("RELOADING=1\nMONOTONIC_USEC={usec}"));
}
