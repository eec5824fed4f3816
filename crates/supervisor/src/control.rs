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

        let (response, stopping) = answer(&line, &api).await;
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
async fn answer(line: &[u8], api: &ApiClient) -> (Vec<u8>, bool) {
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
mod tests {
    use std::os::unix::fs::MetadataExt;
    use std::os::unix::process::CommandExt;
    use std::process::Command;

    use super::*;
    use crate::api::fake;

    /// A fresh short directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> TempDir {
            static N: AtomicU32 = AtomicU32::new(0);
            let dir = std::env::temp_dir().join(format!(
                "rh-ctl-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
        fn sock(&self) -> PathBuf {
            self.0.join("control.sock")
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A control server with a fake owner on its own runtime; dropping the runtime closes every
    /// connection, as the process exiting would.
    struct Server {
        rt: Option<tokio::runtime::Runtime>,
        owner: fake::Owner,
    }

    impl Server {
        fn start(path: &Path) -> Server {
            let listener = bind_control(path).expect("bind");
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            let (api, owner) = rt.block_on(async { fake::spawn(fake::canned()) });
            rt.spawn(async move {
                let listener = tokio::net::UnixListener::from_std(listener).unwrap();
                serve_control(listener, api).await
            });
            Server {
                rt: Some(rt),
                owner,
            }
        }
        /// As if the primary's process ended.
        fn exit(&mut self) {
            if let Some(rt) = self.rt.take() {
                rt.shutdown_background();
            }
        }
    }

    impl Drop for Server {
        fn drop(&mut self) {
            self.exit();
        }
    }

    /// A raw client: write lines, read answer lines.
    struct Raw {
        reader: BufReader<StdUnixStream>,
        writer: StdUnixStream,
    }

    impl Raw {
        fn connect(path: &Path) -> Raw {
            let writer = StdUnixStream::connect(path).unwrap();
            writer
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            Raw {
                reader: BufReader::new(writer.try_clone().unwrap()),
                writer,
            }
        }
        fn send(&mut self, bytes: &[u8]) -> Option<Value> {
            self.writer.write_all(bytes).unwrap();
            let mut line = String::new();
            match self.reader.read_line(&mut line).unwrap() {
                0 => None,
                _ => Some(serde_json::from_str(&line).expect("a JSON line")),
            }
        }
        fn is_closed(&mut self) -> bool {
            let mut buf = [0u8; 16];
            matches!(self.reader.read(&mut buf), Ok(0) | Err(_))
        }
    }

    fn error_of(v: &Value) -> &str {
        assert_eq!(v["ok"], false, "{v}");
        v["error"].as_str().expect("an error string")
    }

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().mode() & 0o7777
    }

    #[test]
    fn socket_is_0600_and_nothing_is_left_behind() {
        let dir = TempDir::new();
        let path = dir.sock();
        let _server = Server::start(&path);
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(mode(&path), 0o600);
        let entries: Vec<_> = std::fs::read_dir(&dir.0)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(entries, ["control.sock"], "the private bind dir is removed");
        // Reachable under its final name.
        let v = request(&path, &json!({"cmd": "status"})).unwrap();
        assert_eq!(v["ok"], true);
    }

    #[test]
    fn fallback_bind_is_0600_too() {
        let dir = TempDir::new();
        let path = dir.sock();
        let listener = bind_then_chmod(&path).unwrap();
        assert_eq!(mode(&path), 0o600);
        drop(listener);
    }

    #[test]
    fn second_primary_on_a_live_path_is_refused() {
        let dir = TempDir::new();
        let path = dir.sock();
        let _server = Server::start(&path);
        let err = bind_control(&path).unwrap_err();
        assert!(
            matches!(err, ControlError::AlreadyRunning { .. }),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            format!(
                "another roundhouse primary is running on {}",
                path.display()
            )
        );
        // The live primary is untouched.
        assert_eq!(mode(&path), 0o600);
        assert_eq!(
            request(&path, &json!({"cmd": "status"})).unwrap()["ok"],
            true
        );
    }

    #[test]
    fn stale_socket_is_replaced_and_other_files_are_not() {
        let dir = TempDir::new();
        let path = dir.sock();
        // A dead primary: the file is there, nobody accepts.
        drop(StdUnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let err = request(&path, &json!({"cmd": "status"})).unwrap_err();
        assert!(matches!(err, ControlError::NotRunning { .. }), "{err:?}");

        let _server = Server::start(&path);
        assert_eq!(mode(&path), 0o600);
        assert_eq!(
            request(&path, &json!({"cmd": "status"})).unwrap()["ok"],
            true
        );

        let file = dir.0.join("not-a-socket");
        std::fs::write(&file, "keep me").unwrap();
        let err = bind_control(&file).unwrap_err();
        assert!(matches!(err, ControlError::Bind { .. }), "{err:?}");
        assert!(err.to_string().contains("not a socket"), "{err}");
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");
    }

    #[test]
    fn no_primary_is_a_distinct_error() {
        let dir = TempDir::new();
        let path = dir.sock();
        let err = request(&path, &json!({"cmd": "status"})).unwrap_err();
        assert!(matches!(err, ControlError::NotRunning { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            format!("no primary running on {}", path.display())
        );
        let err = stop_and_wait(&path, Duration::from_secs(1)).unwrap_err();
        assert!(matches!(err, ControlError::NotRunning { .. }), "{err:?}");
    }

    #[test]
    fn requests_round_trip_to_the_owner() {
        let dir = TempDir::new();
        let path = dir.sock();
        let server = Server::start(&path);

        let v = request(&path, &json!({"cmd": "status"})).unwrap();
        let stats: StatsSnapshot = serde_json::from_value(v["stats"].clone()).unwrap();
        assert_eq!(stats, fake::canned());

        assert_eq!(
            request(&path, &json!({"cmd": "reload"})).unwrap(),
            json!({"ok": true})
        );
        *server.owner.reload_error.lock().unwrap() = Some(crate::api::OpError::StartFailed(2));
        let err = request(&path, &json!({"cmd": "reload"})).unwrap_err();
        assert_eq!(
            err.to_string(),
            "reload failed: could not start a new worker 2"
        );

        assert_eq!(
            request(&path, &json!({"cmd": "scale", "workers": 4})).unwrap(),
            json!({"ok": true})
        );
        for bad in [0, 1025] {
            let err = request(&path, &json!({"cmd": "scale", "workers": bad})).unwrap_err();
            assert!(matches!(err, ControlError::Failed(_)), "{err:?}");
            assert!(err.to_string().contains("between 1 and 1024"), "{err}");
        }

        let msg = json!({"ping": 1});
        request(&path, &json!({"cmd": "send", "to": "all", "message": msg})).unwrap();
        request(&path, &json!({"cmd": "send", "to": 2, "message": msg})).unwrap();
        let err = request(&path, &json!({"cmd": "send", "to": 9, "message": msg})).unwrap_err();
        assert_eq!(err.to_string(), "no worker with id 9");
        for to in [
            json!(0),
            json!(-1),
            json!("two"),
            json!(1.5),
            json!(null),
            json!(4294967296u64),
        ] {
            let err =
                request(&path, &json!({"cmd": "send", "to": to, "message": msg})).unwrap_err();
            assert!(err.to_string().contains("`to` must be"), "{to}: {err}");
        }

        assert_eq!(
            server.owner.log(),
            [
                "reload",
                "reload",
                "scale 4",
                "send All {\"ping\":1}",
                "send Worker(2) {\"ping\":1}"
            ]
        );
    }

    #[test]
    fn malformed_requests_get_errors_and_the_connection_lives_on() {
        let dir = TempDir::new();
        let path = dir.sock();
        let server = Server::start(&path);
        let mut c = Raw::connect(&path);
        for bad in [
            &b"not json\n"[..],
            b"\n",
            b"[1,2]\n",
            b"{\"cmd\":\"bogus\"}\n",
            b"{\"cmd\":\"scale\"}\n",
            b"{\"cmd\":\"scale\",\"workers\":\"4\"}\n",
            b"{\"cmd\":\"send\",\"to\":\"all\"}\n",
            b"{\"nocmd\":1}\n",
            b"\xff\xfe\x00garbage\n",
        ] {
            let v = c.send(bad).expect("an answer");
            assert!(
                error_of(&v).starts_with("bad request"),
                "{:?}: {v}",
                String::from_utf8_lossy(bad)
            );
        }
        // Same connection, a good request now.
        let v = c.send(b"{\"cmd\":\"status\"}\n").unwrap();
        assert_eq!(v["ok"], true);
        assert_eq!(v["stats"]["policy"], "rr");
        assert!(server.owner.log().is_empty(), "nothing reached the owner");

        // A last line without its newline is still answered.
        let mut c = Raw::connect(&path);
        c.writer.write_all(b"{\"cmd\":\"status\"}").unwrap();
        c.writer.shutdown(std::net::Shutdown::Write).unwrap();
        let mut line = String::new();
        c.reader.read_line(&mut line).unwrap();
        assert!(
            line.starts_with("{\"ok\":true,\"stats\":{\"policy\":\"rr\""),
            "{line}"
        );
    }

    #[test]
    fn an_overlong_line_is_refused_and_closed() {
        let dir = TempDir::new();
        let path = dir.sock();
        let _server = Server::start(&path);
        let mut c = Raw::connect(&path);
        let big = vec![b'x'; MAX_LINE + 10];
        // The server answers after MAX_LINE + 1 bytes and closes; the rest of our write may fail.
        let writer = c.writer.try_clone().unwrap();
        let t = std::thread::spawn(move || {
            let mut w = writer;
            let _ = w.write_all(&big);
        });
        let mut line = String::new();
        c.reader.read_line(&mut line).unwrap();
        let v: Value = serde_json::from_str(&line).unwrap();
        assert!(error_of(&v).contains("longer than"), "{v}");
        assert!(c.is_closed());
        t.join().unwrap();
        // The server is still fine.
        assert_eq!(
            request(&path, &json!({"cmd": "status"})).unwrap()["ok"],
            true
        );
    }

    #[test]
    fn stop_waits_for_the_primary_to_exit() {
        let dir = TempDir::new();
        let path = dir.sock();
        let mut server = Server::start(&path);
        let p = path.clone();
        let waiter = std::thread::spawn(move || stop_and_wait(&p, Duration::from_secs(20)));
        let deadline = Instant::now() + Duration::from_secs(10);
        while server.owner.log() != ["stop"] {
            assert!(Instant::now() < deadline, "stop never reached the owner");
            std::thread::sleep(Duration::from_millis(10));
        }
        // Acknowledged, but the primary has not exited: the client is still waiting.
        std::thread::sleep(Duration::from_millis(200));
        assert!(
            !waiter.is_finished(),
            "stop returned before the primary exited"
        );
        server.exit();
        waiter
            .join()
            .unwrap()
            .expect("stop succeeds once the primary is gone");
    }

    /// A primary that reads the stop request and, like one exiting at once, closes without
    /// answering; `remove` says whether it also removes its socket file (as the real one does).
    fn unanswered_stop(path: &Path, remove: bool) -> std::thread::JoinHandle<()> {
        let listener = StdUnixListener::bind(path).unwrap();
        let path = path.to_path_buf();
        std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut line = String::new();
            BufReader::new(&stream).read_line(&mut line).unwrap();
            assert_eq!(line, "{\"cmd\":\"stop\"}\n");
            if remove {
                std::fs::remove_file(&path).unwrap();
                return; // listener and stream dropped: the process is gone
            }
            drop(stream);
            // Still accepting (never answering) until the test ends.
            for conn in listener.incoming() {
                drop(conn);
            }
        })
    }

    #[test]
    fn stop_answered_by_an_exit_counts_as_stopped() {
        let dir = TempDir::new();
        let path = dir.sock();
        let server = unanswered_stop(&path, true);
        stop_and_wait(&path, Duration::from_secs(10)).expect("the primary is gone");
        server.join().unwrap();

        // Closed unanswered but still accepting: not stopped, and said so within the deadline.
        let path = dir.0.join("alive.sock");
        let _server = unanswered_stop(&path, false);
        let start = Instant::now();
        let err = stop_and_wait(&path, Duration::from_millis(300)).unwrap_err();
        assert!(matches!(err, ControlError::Timeout { .. }), "{err:?}");
        assert!(start.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn stop_gives_up_after_its_deadline() {
        let dir = TempDir::new();
        let path = dir.sock();
        let _server = Server::start(&path);
        let start = Instant::now();
        let err = stop_and_wait(&path, Duration::from_millis(300)).unwrap_err();
        assert!(matches!(err, ControlError::Timeout { .. }), "{err:?}");
        assert!(start.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn peer_uid_rule() {
        assert!(peer_allowed(1000, 1000));
        assert!(peer_allowed(0, 1000), "root is let in");
        assert!(!peer_allowed(1001, 1000));
        assert!(!peer_allowed(65534, 0));
    }

    #[test]
    fn default_path_follows_the_spec() {
        let got = default_control_path();
        match std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from) {
            Some(dir) if dir.is_absolute() => assert_eq!(got, dir.join("roundhouse.sock")),
            _ => assert_eq!(
                got,
                PathBuf::from(format!("/tmp/roundhouse-{}.sock", nix::unistd::getuid()))
            ),
        }
    }

    const PEER_ENV: &str = "ROUNDHOUSE_TEST_CONTROL_PEER";

    /// Run by [`a_peer_of_another_uid_is_refused`] in a child process under another uid.
    #[test]
    #[ignore = "helper: run by a_peer_of_another_uid_is_refused"]
    fn peer_helper_child() {
        let Some(path) = std::env::var_os(PEER_ENV) else {
            return;
        };
        match request(Path::new(&path), &json!({"cmd": "status"})) {
            Ok(v) => println!("PEER-RESULT OK {v}"),
            Err(e) => println!("PEER-RESULT ERR {e}"),
        }
    }

    #[test]
    fn a_peer_of_another_uid_is_refused() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root to run a client under another uid");
            return;
        }
        const NOBODY: u32 = 65534;
        let dir = TempDir::new();
        std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = dir.sock();
        let server = Server::start(&path);
        // Loosen the file mode so only SO_PEERCRED stands in the way.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
        // A copy of this test binary that the other user can execute.
        let exe = dir.0.join("peer-test");
        std::fs::copy(std::env::current_exe().unwrap(), &exe).unwrap();
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();

        let out = Command::new(&exe)
            .args([
                "--exact",
                "control::tests::peer_helper_child",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(PEER_ENV, &path)
            .current_dir(&dir.0)
            .uid(NOBODY)
            .gid(NOBODY)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.contains(&format!(
                "PEER-RESULT ERR permission denied: peer uid {NOBODY} is not the primary's uid 0"
            )),
            "status {:?}\nstdout:\n{stdout}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(server.owner.log().is_empty());
        // Our own uid still gets in.
        assert_eq!(
            request(&path, &json!({"cmd": "status"})).unwrap()["ok"],
            true
        );
    }
}
