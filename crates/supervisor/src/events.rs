//! Events an embedding program can watch, like Node's `cluster.on(...)`.

#![forbid(unsafe_code)]

use std::fmt;

/// How a worker process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitInfo {
    /// Exited with this status code.
    Code(i32),
    /// Killed by this signal number.
    Signal(i32),
    /// Reaped by someone else; the status is unknown.
    Unknown,
}

impl fmt::Display for ExitInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitInfo::Code(c) => write!(f, "exit code {c}"),
            ExitInfo::Signal(s) => match nix::sys::signal::Signal::try_from(*s) {
                Ok(sig) => write!(f, "signal {s} ({})", sig.as_str()),
                Err(_) => write!(f, "signal {s}"),
            },
            ExitInfo::Unknown => f.write_str("unknown status"),
        }
    }
}

/// Something that happened to the workers.
#[derive(Debug, Clone)]
pub enum Event {
    /// A worker process was started in slot `id` (`cluster.on('fork')`).
    Fork { id: u32, pid: u32 },
    /// The worker said it is ready (`cluster.on('online')`/`'listening'`).
    Online { id: u32, pid: u32 },
    /// The worker process ended (`cluster.on('exit')`).
    Exit { id: u32, pid: u32, status: ExitInfo },
    /// A worker sent a message to the primary (`cluster.on('message')`).
    Message {
        from: u32,
        message: serde_json::Value,
    },
}
