//! The errors a worker program can see, one enum per thing that can fail.
//!
//! [`Error`] is about starting: the common case is "this program was not started by roundhouse",
//! which deserves a one-line explanation rather than a panic or a bare `EBADF`. [`SendError`] is
//! Each message carries its cause inline (`could not X: cause`) and does not repeat it as a
//! `source()`, so printing the chain (`{:#}` in anyhow) shows every cause once.
//!
//! [`SendError`] is about sending a message, which can fail without anything being wrong with the worker (a full
//! queue while the primary is busy). [`Drained`] is not a failure at all: it is how
//! [`Listener::accept`](crate::Listener::accept) says "the primary asked us to drain and every
//! connection we acknowledged has been handed to you; stop accepting".

use std::io;
use std::os::fd::RawFd;

/// Why a [`Worker`](crate::Worker) could not be started.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A variable roundhouse always sets is missing: the program was started some other way.
    #[error("not running under roundhouse: {0} is not set")]
    NotUnderRoundhouse(&'static str),
    /// A variable is set but its value makes no sense.
    #[error("invalid {var}={value:?}: {reason}")]
    InvalidEnv {
        var: &'static str,
        value: String,
        reason: &'static str,
    },
    /// `LISTEN_PID` names another process: the listeners were meant for someone else (for
    /// example the variables leaked into a grandchild), so they must not be touched.
    #[error("LISTEN_PID={listen_pid} is not this process ({pid}): the listeners are not ours")]
    ListenPidMismatch { listen_pid: u32, pid: u32 },
    /// The policy makes workers accept for themselves but no listener was passed.
    #[error("policy {0} passes listeners, but LISTEN_FDS is not set")]
    MissingListeners(crate::Policy),
    /// An inherited fd is not what the environment says it is.
    #[error("could not use fd {fd} as {what}: {error}")]
    BadFd {
        fd: RawFd,
        what: &'static str,
        error: io::Error,
    },
    /// `Worker::from_env` was called a second time: the channel fd has a single owner.
    #[error("the roundhouse channel was already taken by an earlier Worker::from_env")]
    AlreadyTaken,
    /// The worker was started outside a tokio runtime (it spawns its channel task).
    #[error("could not start the worker: not called inside a tokio runtime")]
    NoRuntime,
    /// tokio could not register a descriptor with its reactor.
    #[error("could not register {what} with the tokio reactor: {error}")]
    Register {
        what: &'static str,
        error: io::Error,
    },
}

/// Why [`Worker::send`](crate::Worker::send) did not queue a message.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The JSON text is longer than one frame can carry.
    #[error("message is {len} bytes of JSON, more than the {max} a frame can carry")]
    TooLarge { len: usize, max: usize },
    /// Too many messages are waiting for the primary to read the channel; this one was dropped.
    #[error("too many messages are queued for the primary; message dropped")]
    QueueFull,
    /// The channel to the primary is closed.
    #[error("the channel to the primary is closed")]
    Closed,
    /// The value could not be serialized.
    #[error("could not serialize the message: {0}")]
    Json(serde_json::Error),
}

impl From<serde_json::Error> for SendError {
    fn from(e: serde_json::Error) -> Self {
        SendError::Json(e)
    }
}

/// The error [`Listener::accept`](crate::Listener::accept) returns once the worker is draining
/// and every connection it acknowledged has been accepted. Test for it with [`is_drained`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the worker is draining: no more connections will come")]
pub struct Drained;

/// True when `e` is the [`Drained`] end of the accept stream rather than a real failure.
pub fn is_drained(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<Drained>())
}

pub(crate) fn drained_error() -> io::Error {
    io::Error::other(Drained)
}

/// How the channel to the primary ended (what [`Worker::closed`](crate::Worker::closed)
/// resolves to when the worker was built not to exit the process).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Closed {
    /// End of file: the primary is gone. A worker under roundhouse exits with status 0.
    Eof,
    /// The primary sent something that is not a valid frame (a bug in roundhouse). A worker
    /// under roundhouse exits with status 70.
    Protocol(String),
    /// The channel failed in another way (the error text). Exit status 70.
    Io(String),
}

impl Closed {
    /// The exit status a worker under roundhouse uses for this ending.
    pub fn exit_code(&self) -> i32 {
        match self {
            Closed::Eof => 0,
            Closed::Protocol(_) | Closed::Io(_) => 70,
        }
    }
}
