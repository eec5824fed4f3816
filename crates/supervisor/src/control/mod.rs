//! The control socket: how `roundhouse status|reload|scale|send|stop` reach a running primary.
//!
//! A Unix stream socket (`--control PATH`, default [`default_control_path`]) speaking one JSON
//! object per line in each direction: a request line in, one response line out, repeated until
//! either side closes. The protocol is documented for humans and other tools in
//! `docs/control.md`; [`ControlRequest`] is its request side.
//!
//! Who may talk to it: the socket file is created mode `0600` inside a private directory and
//! only then linked to its final path, so there is no moment when another user could connect
//! (see [`bind_control`]); and every accepted peer's credentials are checked with `SO_PEERCRED`,
//! so a peer of another uid is answered with one error line and closed even if the file mode was
//! loosened. Root is let in: it can bypass file permissions anyway.
//!
//! One primary per path: [`bind_control`] refuses a path where a primary answers and replaces a
//! stale socket file left by a dead one.
//!
//! The server side ([`serve_control`]) runs in its own tasks and talks to the owner only through
//! [`ApiClient`], like the admin endpoint. It is bounded: [`MAX_CONNECTIONS`] clients at once, a
//! request line of at most [`MAX_LINE`] bytes, [`IDLE_TIMEOUT`] between requests. Bad input gets
//! an error response, never a panic. The client side ([`request`], [`stop_and_wait`]) is
//! synchronous (std sockets with timeouts) so the CLI needs no runtime for it.

#![forbid(unsafe_code)]

use std::io::{self, BufRead, BufReader, ErrorKind, Read, Write};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener as StdUnixListener, UnixStream as StdUnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::Semaphore;

use crate::api::{ApiClient, ApiError, Target};
use crate::stats::StatsSnapshot;

/// Longest request or response line, newline excluded.
pub const MAX_LINE: usize = 1 << 20;
/// Control clients served at once; more wait in the listen backlog.
pub const MAX_CONNECTIONS: usize = 32;
/// A connected client silent this long between requests is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Time allowed to write one response to a client before it is closed.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time [`request`] waits for an answer.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Highest worker count `scale` accepts (as `--workers`).
pub use crate::config::MAX_WORKERS;

/// What can go wrong on either side of the control socket.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Nothing listens on the path (no file, or a stale file nobody accepts on).
    #[error("no primary running on {}", path.display())]
    NotRunning { path: PathBuf },
    /// A primary already answers on the path.
    #[error("another roundhouse primary is running on {}", path.display())]
    AlreadyRunning { path: PathBuf },
    #[error("could not bind control socket {}: {source}", path.display())]
    Bind { path: PathBuf, source: io::Error },
    #[error("could not talk to the primary on {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("the primary on {} did not answer within {:?}", path.display(), after)]
    Timeout { path: PathBuf, after: Duration },
    /// The primary answered with something that is not a response line.
    #[error("bad answer from the primary on {}: {detail}", path.display())]
    Protocol { path: PathBuf, detail: String },
    /// The primary answered `{"ok":false,"error":...}`; the message is its `error`.
    #[error("{0}")]
    Failed(String),
}

/// A request line, as the server parses it. `to` is `"all"` or a worker id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase")]
pub enum ControlRequest {
    Status,
    Reload,
    Scale { workers: u32 },
    Send { to: Value, message: Value },
    Stop,
    Upgrade,
}

/// `$XDG_RUNTIME_DIR/roundhouse.sock` when `XDG_RUNTIME_DIR` is set (absolute, non-empty),
/// else `/tmp/roundhouse-$UID.sock` (per SPEC).
pub fn default_control_path() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from) {
        Some(dir) if dir.is_absolute() => dir.join("roundhouse.sock"),
        _ => PathBuf::from(format!("/tmp/roundhouse-{}.sock", nix::unistd::getuid())),
    }
}

/// Binds the control socket at `path`, mode `0600`, and returns it non-blocking (ready for
/// [`serve_control`]; callable before any runtime exists).
///
/// - If a primary answers on `path`: [`ControlError::AlreadyRunning`] (the caller exits 1).
/// - If `path` is a socket file nobody accepts on (a primary that died without cleaning up),
///   it is removed and replaced.
/// - If `path` exists and is not a socket, it is left alone and this fails.
///
/// How the mode is set with no window: the socket is bound inside a fresh `0700` directory
/// next to `path`, chmod-ed to `0600` there, then hard-linked to `path` (which fails, rather
/// than overwrites, if another primary took the path meanwhile) and the directory removed. The
/// process umask is never touched (it is per process, not per thread). Where that cannot be
/// done (the temporary path would exceed the `sun_path` limit, or the filesystem has no hard
/// links) it falls back to binding `path` directly and chmod-ing right after; the
/// `SO_PEERCRED` check still refuses other users during that instant.
///
/// The caller should remove `path` when the primary exits; a leftover is replaced next time.
pub fn bind_control(path: &Path) -> Result<StdUnixListener, ControlError> {
    let bind_err = |source| ControlError::Bind {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(bind_err(io::Error::new(
                ErrorKind::AlreadyExists,
                "the path exists and is not a socket",
            )))
        }
        Ok(_) => match StdUnixStream::connect(path) {
            Ok(_) => {
                return Err(ControlError::AlreadyRunning {
                    path: path.to_path_buf(),
                })
            }
            Err(err) if err.kind() == ErrorKind::ConnectionRefused => {
                tracing::info!(control.path = %path.display(), "replacing stale control socket");
                match std::fs::remove_file(path) {
                    Err(err) if err.kind() != ErrorKind::NotFound => return Err(bind_err(err)),
                    _ => {}
                }
            }
            Err(err) if err.kind() == ErrorKind::NotFound => {}
            Err(err) => return Err(bind_err(err)),
        },
        Err(err) if err.kind() == ErrorKind::NotFound => {}
        Err(err) => return Err(bind_err(err)),
    }

    let listener = match bind_via_private_dir(path) {
        Ok(Some(listener)) => listener,
        Ok(None) => bind_then_chmod(path).map_err(bind_err)?,
        Err(err) if err.kind() == ErrorKind::AlreadyExists => {
            return Err(ControlError::AlreadyRunning {
                path: path.to_path_buf(),
            })
        }
        Err(err) => return Err(bind_err(err)),
    };
    listener.set_nonblocking(true).map_err(bind_err)?;
    Ok(listener)
}

/// `sun_path` is 108 bytes on Linux, including the terminating NUL.
const SUN_PATH_MAX: usize = 107;

/// The no-window bind. `Ok(None)` means "cannot be done here, fall back".
fn bind_via_private_dir(path: &Path) -> io::Result<Option<StdUnixListener>> {
    static SEQ: AtomicU32 = AtomicU32::new(0);
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let dir = parent.join(format!(
        ".roundhouse-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let tmp = dir.join("s");
    if tmp.as_os_str().len() > SUN_PATH_MAX {
        return Ok(None);
    }
    std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
    let result = (|| {
        // The umask can only have removed bits; make it exactly 0700.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
        let listener = StdUnixListener::bind(&tmp)?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
        match std::fs::hard_link(&tmp, path) {
            Ok(()) => Ok(Some(listener)),
            Err(err) if err.kind() == ErrorKind::AlreadyExists => Err(err),
            // No hard links here (EPERM, EXDEV, ENOTSUP...): fall back.
            Err(_) => Ok(None),
        }
    })();
    let _ = std::fs::remove_file(&tmp);
    let _ = std::fs::remove_dir(&dir);
    result
}

fn bind_then_chmod(path: &Path) -> io::Result<StdUnixListener> {
    let listener = StdUnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Serves control clients on `listener` until the task is dropped. `listener` is the one
/// [`bind_control`] returned, registered with `tokio::net::UnixListener::from_std` (it is
/// already non-blocking).
pub async fn serve_control(listener: tokio::net::UnixListener, api: ApiClient) {
    let our_uid = nix::unistd::geteuid().as_raw();
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return; // never closed
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(err) => {
                tracing::warn!(error = %err, "control: could not accept a connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let api = api.clone();
        tokio::spawn(async move {
            serve_client(stream, api, our_uid, permit).await;
        });
    }
}

/// Whether a peer with `peer_uid` may use a primary running as `our_uid`.
pub fn peer_allowed(peer_uid: u32, our_uid: u32) -> bool {
    peer_uid == our_uid || peer_uid == 0
}

async fn serve_client(
    stream: UnixStream,
    api: ApiClient,
    our_uid: u32,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    let peer_uid = stream.peer_cred().map(|c| c.uid());
    let (read_half, mut write_half) = stream.into_split();
    match peer_uid {
        Ok(uid) if peer_allowed(uid, our_uid) => {}
        Ok(uid) => {
            tracing::warn!(peer.uid = uid, "control: refused a peer of another uid");
            let msg =
                format!("permission denied: peer uid {uid} is not the primary's uid {our_uid}");
            let _ = write_line(&mut write_half, &error_response(&msg)).await;
            return;
        }
        Err(err) => {
            let msg = format!("permission denied: could not read peer credentials: {err}");
            let _ = write_line(&mut write_half, &error_response(&msg)).await;
            return;
        }
    }

    let mut reader = tokio::io::BufReader::new(read_half);
    let mut line = Vec::new();
    loop {
        line.clear();
        let mut limited = (&mut reader).take(MAX_LINE as u64 + 1);
        let read = limited.read_until(b'\n', &mut line);
        let n = match tokio::time::timeout(IDLE_TIMEOUT, read).await {
            Ok(Ok(n)) => n,
            Ok(Err(_)) | Err(_) => return, // broken or idle client
        };
        if n == 0 {
            return; // client closed
        }
        if line.last() == Some(&b'\n') {
            line.pop();
        } else if line.len() > MAX_LINE {
            let msg = format!("request line longer than {MAX_LINE} bytes");
            let _ = write_line(&mut write_half, &error_response(&msg)).await;
            return;
        } // else: the last line, without its newline; answer it all the same

        // An upgrade that works is answered by the new image, on a copy of this connection.
        let client = || {
            use std::os::fd::AsFd;
            let stream: &UnixStream = write_half.as_ref();
            stream.as_fd().try_clone_to_owned()
        };
        let (response, stopping) = answer(&line, &api, client).await;
        if write_line(&mut write_half, &response).await.is_err() {
            return;
        }
        if stopping {
            // Keep this connection open until the process exits: the client reads end-of-file
            // then, which is how `roundhouse stop` knows the primary is gone. Free the slot.
            // Reading also notices a client that gives up and closes first.
            drop(permit);
            let mut sink = [0u8; 256];
            while let Ok(n) = reader.read(&mut sink).await {
                if n == 0 {
                    break;
                }
            }
            drop(write_half);
            return;
        }
    }
}

async fn write_line(
    writer: &mut tokio::net::unix::OwnedWriteHalf,
    response: &[u8],
) -> io::Result<()> {
    let write = async {
        writer.write_all(response).await?;
        writer.write_all(b"\n").await?;
        writer.flush().await
    };
    match tokio::time::timeout(WRITE_TIMEOUT, write).await {
        Ok(result) => result,
        Err(_) => Err(io::Error::new(ErrorKind::TimedOut, "client not reading")),
    }
}

fn error_response(message: &str) -> Vec<u8> {
    json!({"ok": false, "error": message})
        .to_string()
        .into_bytes()
}

fn ok_response() -> Vec<u8> {
    br#"{"ok":true}"#.to_vec()
}

/// The status response keeps the `/stats` field order (a `Value` would sort the keys).
#[derive(Serialize)]
struct StatusResponse<'a> {
    ok: bool,
    stats: &'a StatsSnapshot,
}

/// Parses one request line, asks the owner, and returns the response line and whether a stop
/// was accepted.
async fn answer(
    line: &[u8],
    api: &ApiClient,
    client: impl FnOnce() -> io::Result<std::os::fd::OwnedFd>,
) -> (Vec<u8>, bool) {
    let request: ControlRequest = match serde_json::from_slice(line) {
        Ok(request) => request,
        Err(err) => return (error_response(&format!("bad request: {err}")), false),
    };
    let api_err = |err: ApiError| error_response(&err.to_string());
    match request {
        ControlRequest::Status => match api.stats().await {
            Ok(stats) => match serde_json::to_vec(&StatusResponse {
                ok: true,
                stats: &stats,
            }) {
                Ok(bytes) => (bytes, false),
                Err(err) => (
                    error_response(&format!("could not encode stats: {err}")),
                    false,
                ),
            },
            Err(err) => (api_err(err), false),
        },
        ControlRequest::Reload => match api.reload().await {
            Ok(()) => (ok_response(), false),
            Err(err) => (error_response(&format!("reload failed: {err}")), false),
        },
        ControlRequest::Scale { workers } if !(1..=MAX_WORKERS).contains(&workers) => (
            error_response(&format!(
                "workers must be between 1 and {MAX_WORKERS}, got {workers}"
            )),
            false,
        ),
        ControlRequest::Scale { workers } => match api.scale(workers).await {
            Ok(()) => (ok_response(), false),
            Err(err) => (api_err(err), false),
        },
        ControlRequest::Send { to, message } => match parse_target(&to) {
            Ok(target) => match api.send(target, message).await {
                Ok(()) => (ok_response(), false),
                Err(err) => (api_err(err), false),
            },
            Err(msg) => (error_response(&msg), false),
        },
        ControlRequest::Stop => match api.stop().await {
            Ok(()) => (ok_response(), true),
            Err(err) => (api_err(err), false),
        },
        // The new image answers on a copy of this connection; without one (out of fds) the
        // client could not learn that it worked, so the upgrade is not attempted.
        ControlRequest::Upgrade => match client() {
            Err(e) => (
                error_response(&format!(
                    "upgrade failed: could not keep this connection for the new image's answer: {e}"
                )),
                false,
            ),
            Ok(fd) => match api.upgrade(Some(fd)).await {
                // Not reached when the upgrade works: the new image answers.
                Ok(()) => (ok_response(), false),
                Err(err) => (error_response(&format!("upgrade failed: {err}")), false),
            },
        },
    }
}

/// `"all"` or a worker id `1..=u32::MAX`.
pub fn parse_target(to: &Value) -> Result<Target, String> {
    match to {
        Value::String(s) if s == "all" => Ok(Target::All),
        Value::Number(n) => match n.as_u64().and_then(|id| u32::try_from(id).ok()) {
            Some(id) if id >= 1 => Ok(Target::Worker(id)),
            _ => Err(format!(
                "bad request: `to` must be \"all\" or a worker id, got {n}"
            )),
        },
        other => Err(format!(
            "bad request: `to` must be \"all\" or a worker id, got {other}"
        )),
    }
}

// ---- client side -------------------------------------------------------------------------

fn connect(path: &Path) -> Result<StdUnixStream, ControlError> {
    StdUnixStream::connect(path).map_err(|err| match err.kind() {
        ErrorKind::NotFound | ErrorKind::ConnectionRefused => ControlError::NotRunning {
            path: path.to_path_buf(),
        },
        _ => ControlError::Io {
            path: path.to_path_buf(),
            source: err,
        },
    })
}

fn io_err(path: &Path, timeout: Duration) -> impl Fn(io::Error) -> ControlError + '_ {
    move |err| match err.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => ControlError::Timeout {
            path: path.to_path_buf(),
            after: timeout,
        },
        _ => ControlError::Io {
            path: path.to_path_buf(),
            source: err,
        },
    }
}

/// A response and the reader it came from (for [`stop_and_wait`] to wait on).
type Answer = (Value, BufReader<StdUnixStream>);

/// Sends `req` and reads one response line, waiting at most `timeout` for it. `Ok(None)`: the
/// primary closed the connection without answering (what a primary that exits right after
/// accepting a stop looks like).
fn round_trip(
    stream: &mut StdUnixStream,
    path: &Path,
    req: &Value,
    timeout: Duration,
) -> Result<Option<Answer>, ControlError> {
    let err = io_err(path, timeout);
    let mut line = serde_json::to_vec(req).map_err(|e| ControlError::Protocol {
        path: path.to_path_buf(),
        detail: e.to_string(),
    })?;
    line.push(b'\n');
    stream.set_write_timeout(Some(timeout)).map_err(&err)?;
    stream.set_read_timeout(Some(timeout)).map_err(&err)?;
    // A primary that refuses us (another uid) answers and closes at once, so our write can
    // fail with a broken pipe while its answer is already waiting: read it before giving up.
    let write_error = match stream.write_all(&line) {
        Ok(()) => None,
        Err(e) if matches!(e.kind(), ErrorKind::BrokenPipe | ErrorKind::ConnectionReset) => Some(e),
        Err(e) => return Err(err(e)),
    };

    let mut reader = BufReader::new(stream.try_clone().map_err(&err)?);
    let mut answer = Vec::new();
    let read = (&mut reader)
        .take(MAX_LINE as u64 + 1)
        .read_until(b'\n', &mut answer);
    let n = match (read, write_error) {
        (Ok(0), Some(e)) | (Err(_), Some(e)) => return Err(err(e)),
        (Ok(n), _) => n,
        (Err(e), None) => return Err(err(e)),
    };
    let protocol = |detail: String| ControlError::Protocol {
        path: path.to_path_buf(),
        detail,
    };
    if n == 0 {
        return Ok(None);
    }
    if answer.last() != Some(&b'\n') {
        return Err(protocol("the answer was cut short or too long".into()));
    }
    let value: Value =
        serde_json::from_slice(&answer).map_err(|e| protocol(format!("not JSON: {e}")))?;
    match value.get("ok") {
        Some(Value::Bool(true)) => Ok(Some((value, reader))),
        Some(Value::Bool(false)) => Err(ControlError::Failed(
            value
                .get("error")
                .and_then(Value::as_str)
                .unwrap_or("the primary refused the request")
                .to_string(),
        )),
        _ => Err(protocol(format!("no \"ok\" field in {value}"))),
    }
}

/// Sends one request and returns the primary's `{"ok":true,...}` response, waiting at most
/// [`DEFAULT_TIMEOUT`]. `{"ok":false,"error":E}` becomes [`ControlError::Failed`]`(E)`; nothing
/// listening on `path` is [`ControlError::NotRunning`].
pub fn request(path: &Path, req: &Value) -> Result<Value, ControlError> {
    request_timeout(path, req, DEFAULT_TIMEOUT)
}

/// [`request`] with an explicit answer deadline (reload and scale can take a while: each new
/// worker must come online).
pub fn request_timeout(path: &Path, req: &Value, timeout: Duration) -> Result<Value, ControlError> {
    let mut stream = connect(path)?;
    match round_trip(&mut stream, path, req, timeout)? {
        Some((value, _)) => Ok(value),
        None => Err(ControlError::Protocol {
            path: path.to_path_buf(),
            detail: "the connection closed without an answer".into(),
        }),
    }
}

/// Asks the primary to stop gracefully, then waits (at most `exit_timeout`) until it has exited:
/// the server keeps this connection open until the process ends. A primary that exits before
/// its answer is written closes the connection unanswered; that counts as stopped once nothing
/// accepts on `path` any more.
pub fn stop_and_wait(path: &Path, exit_timeout: Duration) -> Result<(), ControlError> {
    let mut stream = connect(path)?;
    let start = Instant::now();
    let timeout_err = ControlError::Timeout {
        path: path.to_path_buf(),
        after: exit_timeout,
    };
    let answer = round_trip(&mut stream, path, &json!({"cmd": "stop"}), DEFAULT_TIMEOUT)?;
    let Some((_, mut reader)) = answer else {
        drop(stream);
        while start.elapsed() < exit_timeout {
            match connect(path) {
                Err(ControlError::NotRunning { .. }) => return Ok(()),
                Err(err) => return Err(err),
                Ok(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        return Err(timeout_err);
    };
    let mut sink = [0u8; 256];
    loop {
        let left = exit_timeout.saturating_sub(start.elapsed());
        if left.is_zero() {
            return Err(timeout_err);
        }
        reader
            .get_ref()
            .set_read_timeout(Some(left))
            .map_err(io_err(path, exit_timeout))?;
        match reader.read(&mut sink) {
            Ok(0) => return Ok(()),
            Ok(_) => continue, // nothing more is expected; ignore it
            Err(err) if matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Err(timeout_err)
            }
            Err(err) if err.kind() == ErrorKind::Interrupted => continue,
            // A reset also means the process is gone.
            Err(err) if err.kind() == ErrorKind::ConnectionReset => return Ok(()),
            Err(err) => return Err(io_err(path, exit_timeout)(err)),
        }
    }
}

#[cfg(test)]
mod tests;
