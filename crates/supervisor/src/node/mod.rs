//! Node.js workers (`--node`): the primary's side of Node's own IPC channel.
//!
//! A Node process cannot receive a file descriptor on an arbitrary Unix socket, but it can on
//! the IPC channel Node sets up when started with `NODE_CHANNEL_FD` (what `child_process.fork`
//! uses). So a `--node` worker gets one end of an `AF_UNIX` **`SOCK_STREAM`** socket pair as its
//! channel instead of the roundhouse `SOCK_SEQPACKET` channel, and the preloaded shim
//! (`node/roundhouse.js`) speaks the roundhouse protocol over it. This module translates; it
//! does no I/O, so the owner loop keeps reading and writing the socket itself.
//!
//! # The channel (Node 20, `NODE_CHANNEL_SERIALIZATION_MODE=json`)
//!
//! Each message is one JSON value followed by `\n`, both ways. Node hands a received object
//! whose `cmd` is a string starting with `NODE_` to its internal handlers (`internalMessage`),
//! never to the app's `process.on('message')`; everything else reaches the app as is. The shim's
//! traffic therefore uses `cmd: "NODE_ROUNDHOUSE_*"` and is invisible to the app.
//!
//! A connection travels as `{"cmd":"NODE_HANDLE","type":"net.Native","msg":{...}}` with the
//! socket attached by `SCM_RIGHTS` to the same `sendmsg`. Node's child answers each handle line,
//! in order, with `{"cmd":"NODE_HANDLE_ACK"}` (got it) or `{"cmd":"NODE_HANDLE_NACK"}` (the
//! line came without an fd, e.g. the child was at its fd limit), then passes the handle and
//! `msg` to the shim, which acknowledges or refuses the connection by id.
//!
//! **One handle in flight per worker.** Node's reader keeps at most one received fd aside and
//! gives it to the next `NODE_HANDLE` line it parses. If a 64 KiB read ends inside a handle line
//! and the next read brings a second fd, the first fd is overwritten: connection A's line gets
//! B's socket and B's line gets none (we reproduced this: A's client is never answered, B's is
//! served under A's id). Node's own senders therefore wait for `NODE_HANDLE_ACK`/`NACK` before
//! sending the next handle, and so must the primary: [`NodeCodec::encode_conn`] refuses while a
//! handle is in flight, [`NodeEvent::HandleAck`]/[`NodeEvent::HandleNack`] end it.

#![forbid(unsafe_code)]

use roundhouse_proto::frame::{ConnRecord, Recipient, Stats, ACK_MAX_IDS, TO_ALL};
use serde_json::Value;

/// Longest line accepted from a worker; a longer one is a protocol error.
pub(crate) const MAX_LINE: usize = 1 << 20;
/// At most this many `NODE_ROUNDHOUSE_WARN` lines of one worker reach the log; the shim sends
/// each kind once, so only a broken or hostile worker sends more.
const MAX_WARNINGS: u32 = 16;
/// A warning's text is cut to this many characters in the log.
const MAX_WARNING_CHARS: usize = 512;

/// What a Node worker said, decoded from its channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum NodeEvent {
    /// The app listens (`{"cmd":"NODE_ROUNDHOUSE_READY","version":1}`).
    Ready,
    /// The shim took these connections; the primary may close its copies.
    Ack(Vec<u64>),
    /// The shim refused these connections (draining, no server, `maxConnections`); hand them to
    /// another worker.
    Refuse(Vec<u64>),
    /// Cumulative counters.
    Stats(Stats),
    Heartbeat,
    /// `process.send(x)` from the app (to the primary) or `process.roundhouse.send(to, x)`.
    Message {
        to: Recipient,
        json: Vec<u8>,
    },
    /// Node's child received the handle of this connection: the next handle may be sent.
    /// (The connection is acknowledged only by [`NodeEvent::Ack`].)
    HandleAck(u64),
    /// The child got this connection's handle line without its fd, so it never saw the
    /// connection: treat it as refused. The next handle may be sent.
    HandleNack(u64),
    /// The app sent a handle to the primary (`process.send(msg, socket)`). Close any fd that
    /// came with it and answer with [`NodeCodec::encode_handle_ack`]: until that answer Node's
    /// child queues every later message, the shim's acks included.
    WorkerHandle,
}

/// Decoder for one Node worker's channel, plus the encoders for what the primary sends it.
#[derive(Debug, Default)]
pub(crate) struct NodeCodec {
    /// Received bytes not yet returned as events; `buf[start..]` is unconsumed.
    buf: Vec<u8>,
    start: usize,
    /// The connection whose handle line was sent and not yet answered by
    /// `NODE_HANDLE_ACK`/`NACK`.
    in_flight: Option<u64>,
    /// `NODE_ROUNDHOUSE_WARN` lines logged so far.
    warnings: u32,
}

impl NodeCodec {
    pub fn new() -> Self {
        Self::default()
    }

    /// What an upgrade carries: the bytes not yet consumed, the handle in flight, the count of
    /// warnings logged.
    pub(crate) fn carried(&self) -> crate::upgrade::CarriedNode {
        crate::upgrade::CarriedNode {
            buf: self.buf[self.start..].to_vec(),
            in_flight: self.in_flight,
            warnings: self.warnings,
        }
    }

    pub(crate) fn from_carried(c: crate::upgrade::CarriedNode) -> Self {
        NodeCodec {
            buf: c.buf,
            start: 0,
            in_flight: c.in_flight,
            warnings: c.warnings,
        }
    }

    /// The connection whose handle is in flight, if any. While one is, no other may be sent.
    pub fn handle_in_flight(&self) -> Option<u64> {
        self.in_flight
    }

    /// Appends the handoff line of one connection and marks its handle in flight. The caller
    /// sends these bytes with **one `sendmsg` carrying exactly this connection's fd** (lines
    /// encoded earlier may go in front of it in the same `sendmsg`, never a second handle line;
    /// after a partial write the rest goes without the fd). Returns `false`, writing nothing, if
    /// a handle is still in flight: wait for [`NodeEvent::HandleAck`]/[`NodeEvent::HandleNack`].
    #[must_use]
    pub fn encode_conn(&mut self, out: &mut Vec<u8>, rec: &ConnRecord) -> bool {
        if self.in_flight.is_some() {
            return false;
        }
        self.in_flight = Some(rec.id);
        // Written in place: the handoff path allocates nothing per connection.
        use std::io::Write as _;
        let _ = writeln!(
            out,
            "{{\"cmd\":\"NODE_HANDLE\",\"type\":\"net.Native\",\"msg\":{{\"cmd\":\"NODE_ROUNDHOUSE_CONN\",\"id\":{},\"listener\":{}}}}}",
            rec.id, rec.listener
        );
        true
    }

    /// Forgets the handle line just encoded because it could not be sent (the channel was
    /// full); the connection goes to another worker and this one may take the next handle.
    pub fn cancel_in_flight(&mut self) {
        self.in_flight = None;
    }

    /// Appends the drain request.
    pub fn encode_drain(out: &mut Vec<u8>) {
        out.extend_from_slice(b"{\"cmd\":\"NODE_ROUNDHOUSE_DRAIN\"}\n");
    }

    /// Appends the answer to [`NodeEvent::WorkerHandle`].
    pub fn encode_handle_ack(out: &mut Vec<u8>) {
        out.extend_from_slice(b"{\"cmd\":\"NODE_HANDLE_ACK\"}\n");
    }

    /// Appends a message for the app, from `from` (0 = the primary / outside, else a worker id).
    /// The app's `process.on('message')` receives exactly the JSON value `json`. It is written
    /// as it is (Node parses it itself), unless Node would take it for an internal message (an
    /// object whose `cmd` starts with `NODE_`): that one is wrapped and the shim unwraps it.
    /// Errs, writing nothing, if `json` is not valid JSON (it would crash the child's reader).
    pub fn encode_message(out: &mut Vec<u8>, from: u32, json: &[u8]) -> Result<(), String> {
        let value: Value =
            serde_json::from_slice(json).map_err(|e| format!("message is not valid JSON: {e}"))?;
        let wrap = is_internal(&value);
        if wrap {
            out.extend_from_slice(
                format!("{{\"cmd\":\"NODE_ROUNDHOUSE_MSG\",\"from\":{from},\"message\":")
                    .as_bytes(),
            );
        }
        // In valid JSON a newline can only be whitespace (strings escape it), and Node splits
        // messages on '\n': make it a space.
        out.extend(json.iter().map(|&b| if b == b'\n' { b' ' } else { b }));
        if wrap {
            out.push(b'}');
        }
        out.push(b'\n');
        Ok(())
    }

    /// Takes bytes read from the channel. Errs if a line exceeds [`MAX_LINE`] (protocol error:
    /// kill the worker).
    pub fn feed(&mut self, data: &[u8]) -> Result<(), String> {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(data);
        let partial = match self.buf.iter().rposition(|&b| b == b'\n') {
            Some(i) => self.buf.len() - i - 1,
            None => self.buf.len(),
        };
        if partial > MAX_LINE {
            return Err(format!("line longer than {MAX_LINE} bytes"));
        }
        Ok(())
    }

    /// The next event from the bytes fed so far; `None` when no complete line is left. An
    /// `Err` is a protocol error (kill the worker); the codec should not be used after it.
    pub fn next_event(&mut self) -> Option<Result<NodeEvent, String>> {
        loop {
            let rest = &self.buf[self.start..];
            let nl = rest.iter().position(|&b| b == b'\n')?;
            let line_start = self.start;
            self.start += nl + 1;
            if nl > MAX_LINE {
                return Some(Err(format!("line longer than {MAX_LINE} bytes")));
            }
            match self.decode_line(line_start, nl) {
                Ok(Some(ev)) => return Some(Ok(ev)),
                Ok(None) => continue,
                Err(e) => return Some(Err(e)),
            }
        }
    }

    fn decode_line(&mut self, at: usize, len: usize) -> Result<Option<NodeEvent>, String> {
        let mut line = &self.buf[at..at + len];
        let fixed;
        let value: Value = match serde_json::from_slice(line) {
            Ok(v) => v,
            Err(e) => match replace_lone_surrogates(line) {
                Some(f) => {
                    fixed = f;
                    line = &fixed;
                    serde_json::from_slice(line)
                        .map_err(|e| format!("line is not valid JSON: {e}"))?
                }
                None => return Err(format!("line is not valid JSON: {e}")),
            },
        };
        let cmd = match internal_cmd(&value) {
            Some(cmd) => cmd,
            // An app message (`process.send(x)`): to the primary, exactly as Node wrote it.
            None => {
                return Ok(Some(NodeEvent::Message {
                    to: Recipient::Primary,
                    json: line.to_vec(),
                }))
            }
        };
        let ev = match cmd {
            "NODE_HANDLE_ACK" | "NODE_HANDLE_NACK" => {
                let id = self
                    .in_flight
                    .take()
                    .ok_or_else(|| format!("{cmd} with no handle in flight"))?;
                if cmd == "NODE_HANDLE_ACK" {
                    NodeEvent::HandleAck(id)
                } else {
                    NodeEvent::HandleNack(id)
                }
            }
            "NODE_HANDLE" => NodeEvent::WorkerHandle,
            "NODE_ROUNDHOUSE_READY" => match value.get("version").and_then(Value::as_u64) {
                Some(1) => NodeEvent::Ready,
                v => return Err(format!("unsupported shim protocol version {v:?}")),
            },
            "NODE_ROUNDHOUSE_ACK" => NodeEvent::Ack(ids(&value)?),
            "NODE_ROUNDHOUSE_REFUSE" => NodeEvent::Refuse(ids(&value)?),
            "NODE_ROUNDHOUSE_STATS" => NodeEvent::Stats(Stats {
                accepted: counter(&value, "accepted")?,
                closed: counter(&value, "closed")?,
                requests: counter(&value, "requests")?,
            }),
            "NODE_ROUNDHOUSE_HEARTBEAT" => NodeEvent::Heartbeat,
            "NODE_ROUNDHOUSE_WARN" => {
                self.warn(&value)?;
                return Ok(None);
            }
            "NODE_ROUNDHOUSE_SEND" => {
                let to = match value.get("to") {
                    Some(Value::String(s)) if s == "all" => Recipient::All,
                    Some(Value::Number(n)) => match n.as_u64() {
                        Some(id) if id < u64::from(TO_ALL) => {
                            Recipient::from_wire(u32::try_from(id).unwrap_or(TO_ALL))
                        }
                        _ => return Err(format!("bad message recipient {n}")),
                    },
                    other => return Err(format!("bad message recipient {other:?}")),
                };
                let message = value
                    .get("message")
                    .ok_or("NODE_ROUNDHOUSE_SEND without a message")?;
                let json = serde_json::to_vec(message).map_err(|e| e.to_string())?;
                NodeEvent::Message { to, json }
            }
            // Other internal messages (Node's own, e.g. cluster's) are none of our business.
            _ => return Ok(None),
        };
        Ok(Some(ev))
    }
}

impl NodeCodec {
    /// `{"cmd":"NODE_ROUNDHOUSE_WARN","worker":N,"pid":P,"message":"..."}`: the shim saw the
    /// app do something roundhouse will not serve (node/README.md, section 4). Logged here, as
    /// one WARN line naming the worker, because no [`NodeEvent`] carries it to the owner loop;
    /// the worker and pid are the shim's own (its `ROUNDHOUSE_WORKER_ID` and `process.pid`).
    fn warn(&mut self, value: &Value) -> Result<(), String> {
        let id = value
            .get("worker")
            .and_then(Value::as_u64)
            .and_then(|v| u32::try_from(v).ok())
            .ok_or("NODE_ROUNDHOUSE_WARN without a valid worker")?;
        let pid = value
            .get("pid")
            .and_then(Value::as_u64)
            .and_then(|v| u32::try_from(v).ok())
            .ok_or("NODE_ROUNDHOUSE_WARN without a valid pid")?;
        let message = value
            .get("message")
            .and_then(Value::as_str)
            .ok_or("NODE_ROUNDHOUSE_WARN without a message")?;
        self.warnings = self.warnings.saturating_add(1);
        if self.warnings > MAX_WARNINGS {
            return Ok(());
        }
        let text = warning_text(message);
        tracing::warn!(worker.id = id, worker.pid = pid, "{text}");
        if self.warnings == MAX_WARNINGS {
            tracing::warn!(
                worker.id = id,
                worker.pid = pid,
                "further warnings from this worker are not logged"
            );
        }
        Ok(())
    }
}

/// A worker's warning as one log line: control characters become spaces, at most
/// [`MAX_WARNING_CHARS`] characters.
fn warning_text(message: &str) -> String {
    let mut text: String = message
        .chars()
        .take(MAX_WARNING_CHARS)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if message.chars().nth(MAX_WARNING_CHARS).is_some() {
        text.push('…');
    }
    text
}

/// Node's `JSON.stringify` writes a lone UTF-16 surrogate (a JS string cut inside an emoji, say)
/// as a `\uD800`-style escape, which is valid JSON grammar but no Unicode scalar value, so
/// serde_json (and UTF-8) refuse it. Replaces each such escape with `\uFFFD`, as
/// `String::from_utf16_lossy` would; `None` if there is none.
fn replace_lone_surrogates(line: &[u8]) -> Option<Vec<u8>> {
    fn unit_at(b: &[u8], i: usize) -> Option<u16> {
        // `\uXXXX` at i
        if b.get(i) != Some(&b'\\') || b.get(i + 1) != Some(&b'u') {
            return None;
        }
        let hex = std::str::from_utf8(b.get(i + 2..i + 6)?).ok()?;
        u16::from_str_radix(hex, 16).ok()
    }
    let is_high = |u: u16| (0xD800..0xDC00).contains(&u);
    let is_low = |u: u16| (0xDC00..0xE000).contains(&u);
    let mut out: Option<Vec<u8>> = None;
    let mut copied = 0; // line[..copied] is in `out` already
    let (mut i, mut in_string) = (0, false);
    while i < line.len() {
        match line[i] {
            b'"' => in_string = !in_string,
            b'\\' if in_string => {
                if let Some(u) = unit_at(line, i) {
                    let paired = is_high(u) && unit_at(line, i + 6).is_some_and(is_low);
                    if paired {
                        i += 12;
                        continue;
                    }
                    if is_high(u) || is_low(u) {
                        let o = out.get_or_insert_with(|| Vec::with_capacity(line.len()));
                        o.extend_from_slice(&line[copied..i]);
                        o.extend_from_slice(b"\\ufffd");
                        copied = i + 6;
                    }
                    i += 6;
                } else {
                    i += 2; // any other escape, `\"` included
                }
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    let mut out = out?;
    out.extend_from_slice(&line[copied..]);
    Some(out)
}

/// Node's rule (`isInternal` in `lib/internal/child_process.js`): an object whose `cmd` is a
/// string longer than `NODE_` that starts with it.
fn internal_cmd(v: &Value) -> Option<&str> {
    match v.get("cmd") {
        Some(Value::String(cmd)) if cmd.len() > 5 && cmd.starts_with("NODE_") => Some(cmd),
        _ => None,
    }
}

fn is_internal(v: &Value) -> bool {
    v.is_object() && internal_cmd(v).is_some()
}

fn ids(v: &Value) -> Result<Vec<u64>, String> {
    let arr = v
        .get("ids")
        .and_then(Value::as_array)
        .ok_or("ack without ids")?;
    if arr.is_empty() || arr.len() > ACK_MAX_IDS {
        return Err(format!("bad id count {}", arr.len()));
    }
    arr.iter()
        .map(|id| id.as_u64().ok_or_else(|| format!("bad connection id {id}")))
        .collect()
}

fn counter(v: &Value, name: &str) -> Result<u64, String> {
    v.get(name)
        .and_then(Value::as_u64)
        .ok_or_else(|| format!("stats without a valid {name}"))
}

/// The preload shim, embedded so that `roundhouse run --node` needs no file of the repository.
pub(crate) const SHIM: &str = include_str!("../../../../node/roundhouse.js");

/// Writes the embedded shim to a private directory (`$TMPDIR/roundhouse-node-<pid>/`, mode
/// 0700) and returns its path. The directory is the primary's: `remove_shim` deletes it at exit.
pub(crate) fn write_shim() -> std::io::Result<std::path::PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    let dir = std::env::temp_dir().join(format!("roundhouse-node-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
    let path = dir.join("roundhouse.js");
    std::fs::write(&path, SHIM)?;
    Ok(path)
}

/// After an upgrade: the shim the old image wrote at `path` becomes this binary's, for the
/// workers started from now on (those running keep what they loaded).
pub(crate) fn rewrite_shim(path: &std::path::Path) {
    if let Err(e) = std::fs::write(path, SHIM) {
        tracing::warn!("could not update the node shim at {}: {e}", path.display());
    }
}

/// Removes what `write_shim` wrote.
pub(crate) fn remove_shim(path: &std::path::Path) {
    if let Some(dir) = path.parent() {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// The environment of a `--node` worker (node/README.md, section 2).
pub(crate) fn worker_env(
    channel_fd: usize,
    shim: Option<&std::path::Path>,
    addrs: &[std::net::SocketAddr],
    backlog: u32,
) -> Vec<(std::ffi::OsString, std::ffi::OsString)> {
    let mut env: Vec<(std::ffi::OsString, std::ffi::OsString)> = vec![
        ("NODE_CHANNEL_FD".into(), channel_fd.to_string().into()),
        ("NODE_CHANNEL_SERIALIZATION_MODE".into(), "json".into()),
        ("ROUNDHOUSE_NODE".into(), "1".into()),
        (
            "ROUNDHOUSE_LISTENERS".into(),
            addrs
                .iter()
                .map(|a| a.to_string())
                .collect::<Vec<_>>()
                .join(",")
                .into(),
        ),
        ("ROUNDHOUSE_BACKLOG".into(), backlog.to_string().into()),
    ];
    if let Some(shim) = shim {
        // Node's NODE_OPTIONS parser honours "..." with backslash escapes.
        let quoted: String = shim
            .to_string_lossy()
            .chars()
            .flat_map(|c| match c {
                '"' | '\\' => vec!['\\', c],
                c => vec![c],
            })
            .collect();
        let mut opts = std::env::var("NODE_OPTIONS").unwrap_or_default();
        if !opts.is_empty() {
            opts.push(' ');
        }
        opts.push_str(&format!("--require \"{quoted}\""));
        env.push(("NODE_OPTIONS".into(), opts.into()));
    }
    env
}

#[cfg(test)]
mod tests;
