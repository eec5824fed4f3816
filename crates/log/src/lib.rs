//! Logging for roundhouse processes — the primary, `hello-worker`, any worker built on
//! `roundhouse-worker` — that can never take the service down or stall it.
//!
//! # Why this exists
//!
//! The obvious setup, `tracing_subscriber::fmt().with_writer(std::io::stderr)`, writes each log
//! line on the thread that logs it, and treats stderr as if it could not fail. Both are false
//! for a supervisor:
//!
//! - **A failed write panicked the process.** With stderr on a full disk (`2>/dev/full`) or on a
//!   pipe whose reader went away (`2>&1 | head -1`), tracing-subscriber reports its own failed
//!   write with `eprintln!`, which panics when stderr itself fails: the primary died at its next
//!   log line (exit 101) and every worker with it.
//! - **A slow or stuck reader stalled the service.** With stderr a pipe nobody reads, the write
//!   blocks once the pipe's 64 KiB are full — on the primary's owner loop, so new connections
//!   time out and `roundhouse status` hangs.
//!
//! The SPEC's promise is the opposite: *a full disk, a closed or never-read stderr pipe costs log
//! lines (counted, and reported once writing works again), never a panic, a blocked primary or a
//! refused connection.*
//!
//! # How
//!
//! - A thread that logs only formats the line and `try_send`s it into a bounded queue
//!   (tracing-appender's non-blocking writer, `lossy(true)`): it never blocks and never fails.
//!   When the queue is full the line is dropped and counted.
//! - One background thread (the `Sink`) writes the queued lines to stderr. It may block on a full
//!   pipe — only itself; the queue absorbs bursts meanwhile, then drops (counted). A write that
//!   fails (`EPIPE`, `ENOSPC`, `EIO`, …) costs that line, counted; `EAGAIN` (stderr is a
//!   non-blocking file shared with another process) waits for the fd to be writable, on this
//!   thread. Nothing here panics, and nothing here writes anywhere but its own sink.
//! - Before each line it writes, the sink checks whether lines were lost since its last report
//!   and, if so, first writes one line `PROGRAM: N log lines could not be written`. So the loss
//!   is reported as soon as writing works again, exactly once per episode, with the exact count.
//! - The [`LogGuard`] returned by [`init`] flushes at exit — bounded by a timeout, so a pipe
//!   nobody reads cannot hang the exit. tracing-appender's own `WorkerGuard` is only dropped when
//!   the queue is known to be empty: its `Drop` can block for over a second and then `println!`s,
//!   which is exactly the kind of write this crate exists to avoid.
//! - [`init`] also opens `/dev/null` on any of fds 0, 1, 2 that is closed (`roundhouse run
//!   2>&-`): otherwise the next socket the process opens becomes fd 2 and log lines would be
//!   written into a listener or, worse, into a client's connection.
//!
//! # Formats
//!
//! [`Format::Text`] (the default) is tracing-subscriber's default text format, unchanged: ANSI
//! colours only when stderr is a terminal. [`Format::Json`] (`roundhouse run --log-format json`)
//! is tracing-subscriber's JSON format, one object per line, for log shippers:
//!
//! ```text
//! {"timestamp":"2026-01-01T00:00:00.000000Z","level":"INFO","fields":{"message":"worker online","worker.id":1,"worker.pid":4242},"target":"roundhouse_supervisor::primary::lifecycle"}
//! ```
//!
//! (`span`/`spans` are added for events inside spans). Everything this crate writes itself
//! follows the format: the loss notice is then
//! `{"timestamp":…,"level":"WARN","fields":{"message":"log lines could not be written","lost":N},"target":"PROGRAM"}`
//! and a [`line`] is an `ERROR` object whose `fields.message` is the text. Either way, the env
//! filter comes from `RUST_LOG` (default `info`).

#![forbid(unsafe_code)]

use std::io::{self, IsTerminal, Write};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tracing_appender::non_blocking::{ErrorCounter, NonBlocking, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::fmt::MakeWriter;

/// Lines the queue holds while the sink cannot keep up (about 150 bytes each: ~1-2 MiB at most).
/// A burst beyond it (a thousand workers starting while stderr is slow) costs lines, counted.
pub const DEFAULT_QUEUE_LINES: usize = 8192;
/// How long [`LogGuard`]'s drop (and the worker library's exit) waits for queued lines.
pub const DEFAULT_EXIT_FLUSH: Duration = Duration::from_millis(500);

/// Sets up logging for the whole process: tracing's fmt layer to stderr through the
/// non-blocking, lossy, counting writer; `RUST_LOG` filters (default `info`). `program` names
/// the process in the "log lines could not be written" notice. Keep the guard alive until the
/// process exits (a binding in `main`); dropping it flushes, bounded by [`DEFAULT_EXIT_FLUSH`].
///
/// Never panics: if a global subscriber is already installed, it is left in place.
pub fn init(program: &str) -> LogGuard {
    Builder::new(program).init()
}

/// How each line is written: see the module docs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Format {
    /// tracing-subscriber's text format.
    #[default]
    Text,
    /// One JSON object per line: `timestamp`, `level`, `fields` (with `message`), `target`.
    Json,
}

impl Format {
    /// `text` or `json`.
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Text => "text",
            Format::Json => "json",
        }
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Format, String> {
        match s {
            "text" => Ok(Format::Text),
            "json" => Ok(Format::Json),
            other => Err(format!(
                "unknown log format '{other}' (expected text or json)"
            )),
        }
    }
}

/// How to set logging up; [`init`] is `Builder::new(program).init()`.
#[derive(Debug, Clone)]
pub struct Builder {
    program: String,
    queue_lines: usize,
    exit_flush: Duration,
    format: Format,
}

impl Builder {
    pub fn new(program: impl Into<String>) -> Builder {
        Builder {
            program: program.into(),
            queue_lines: DEFAULT_QUEUE_LINES,
            exit_flush: DEFAULT_EXIT_FLUSH,
            format: Format::Text,
        }
    }

    /// The format of every line, the crate's own notices included (default [`Format::Text`]).
    pub fn format(mut self, format: Format) -> Builder {
        self.format = format;
        self
    }

    /// Lines queued before further lines are dropped (counted); at least 1.
    pub fn queue_lines(mut self, n: usize) -> Builder {
        self.queue_lines = n.max(1);
        self
    }

    /// How long dropping the [`LogGuard`] waits for the queued lines to be written.
    pub fn exit_flush(mut self, timeout: Duration) -> Builder {
        self.exit_flush = timeout;
        self
    }

    /// Installs the global subscriber writing to stderr (see [`init`]).
    pub fn init(self) -> LogGuard {
        open_closed_stdio();
        let format = self.format;
        let (writer, guard) = self.writer_to(io::stderr());
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
        // Our writer never returns an error; and if it did, tracing-subscriber would report it
        // with `eprintln!` unless told not to, which panics when stderr is what failed.
        let installed = match format {
            Format::Text => tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_writer(writer.clone())
                .with_ansi(io::stderr().is_terminal())
                .log_internal_errors(false)
                .try_init()
                .is_ok(),
            Format::Json => tracing_subscriber::fmt()
                .json()
                .with_env_filter(filter)
                .with_writer(writer.clone())
                .with_ansi(false)
                .log_internal_errors(false)
                .try_init()
                .is_ok(),
        };
        if installed {
            let _ = GLOBAL.set(writer);
        }
        guard
    }

    /// The writer alone, writing to `sink` on its own thread, without installing anything: for
    /// a subscriber of your own (`.with_writer(writer)`) and for tests.
    pub fn writer_to<W: Write + AsFd + Send + 'static>(self, sink: W) -> (LogWriter, LogGuard) {
        let shared = Arc::new(Shared {
            format: self.format,
            program: self.program.clone(),
            ..Shared::default()
        });
        let (queue, worker) = NonBlockingBuilder::default()
            .lossy(true)
            .buffered_lines_limit(self.queue_lines)
            .thread_name("roundhouse-log")
            .finish(Sink {
                out: Box::new(sink),
                program: self.program,
                shared: Arc::clone(&shared),
                reported: 0,
                mid_line: false,
            });
        let _ = shared.dropped.set(queue.error_counter());
        let writer = LogWriter { queue, shared };
        let guard = LogGuard {
            writer: writer.clone(),
            exit_flush: self.exit_flush,
            worker: Some(worker),
        };
        (writer, guard)
    }
}

/// The writer of the process-wide subscriber, once [`init`] installed it.
static GLOBAL: OnceLock<LogWriter> = OnceLock::new();

/// Waits up to `timeout` for the lines queued so far to be written (or to fail, counted), and
/// writes the "could not be written" notice if lines were lost. For a process about to leave
/// through `std::process::exit`, which runs no destructor. Returns `true` when everything queued
/// was dealt with; `true` too when [`init`] was not used.
pub fn flush(timeout: Duration) -> bool {
    match GLOBAL.get() {
        Some(w) => w.flush(timeout),
        None => true,
    }
}

/// Log lines lost so far by the process-wide writer: dropped (queue full) or failed to write.
/// `0` when [`init`] was not used.
pub fn lost_lines() -> u64 {
    GLOBAL.get().map_or(0, LogWriter::lost)
}

/// Writes one line to stderr outside tracing (not filtered by `RUST_LOG`): through the queue
/// when [`init`] installed the writer — so it comes after the lines logged before it, and never
/// blocks — else directly, errors ignored. For the one-line fatal error a binary prints before
/// exiting; the guard's drop then flushes it.
pub fn line(text: &str) {
    let mut buf = String::with_capacity(text.len() + 1);
    buf.push_str(text);
    if !buf.ends_with('\n') {
        buf.push('\n');
    }
    match GLOBAL.get() {
        Some(w) if w.shared.format == Format::Json => {
            let obj = own_line(
                &w.shared.program,
                "ERROR",
                text.trim_end_matches('\n'),
                None,
            );
            let _ = w.make_writer().write_all(obj.as_bytes());
        }
        Some(w) => {
            let _ = w.make_writer().write_all(buf.as_bytes());
        }
        None => {
            let _ = io::stderr().write_all(buf.as_bytes());
        }
    }
}

/// A line this crate writes itself, as one JSON object shaped like tracing-subscriber's
/// (`timestamp`, `level`, `fields.message`, `target`), newline-terminated.
fn own_line(program: &str, level: &str, message: &str, lost: Option<u64>) -> String {
    use tracing_subscriber::fmt::{format::Writer, time::FormatTime};
    let mut timestamp = String::new();
    let _ = tracing_subscriber::fmt::time::SystemTime.format_time(&mut Writer::new(&mut timestamp));
    let mut fields = serde_json::Map::new();
    fields.insert("message".into(), message.into());
    if let Some(n) = lost {
        fields.insert("lost".into(), n.into());
    }
    let mut obj = serde_json::Map::new();
    obj.insert("timestamp".into(), timestamp.into());
    obj.insert("level".into(), level.into());
    obj.insert("fields".into(), fields.into());
    obj.insert("target".into(), program.into());
    let mut line = serde_json::Value::Object(obj).to_string();
    line.push('\n');
    line
}

#[derive(Debug, Default)]
struct Shared {
    /// The format of the lines this crate writes itself.
    format: Format,
    /// Names the process in those lines.
    program: String,
    /// Lines handed to the queue (queued or dropped).
    submitted: AtomicU64,
    /// Lines the sink is done with (written or failed).
    done: AtomicU64,
    /// Lines whose write failed.
    failed: AtomicU64,
    /// Flush markers the sink has seen (see [`LogWriter::flush`]).
    markers: AtomicU64,
    /// The queue's count of lines dropped because it was full (set once the queue exists).
    dropped: OnceLock<ErrorCounter>,
}

impl Shared {
    fn dropped(&self) -> u64 {
        self.dropped.get().map_or(0, |c| c.dropped_lines() as u64)
    }
}

/// The [`MakeWriter`] to give a fmt layer: each event becomes one queued line. Cheap to clone.
#[derive(Debug, Clone)]
pub struct LogWriter {
    queue: NonBlocking,
    shared: Arc<Shared>,
}

impl LogWriter {
    /// Lines lost so far: dropped because the queue was full, or failed to write.
    pub fn lost(&self) -> u64 {
        self.dropped() + self.shared.failed.load(SeqCst)
    }

    /// Lines dropped because the queue was full (part of [`LogWriter::lost`]).
    pub fn dropped(&self) -> u64 {
        self.shared.dropped()
    }

    fn drained(&self) -> bool {
        let s = &self.shared;
        s.done.load(SeqCst) + self.dropped() >= s.submitted.load(SeqCst)
    }

    /// Waits up to `timeout` for every line submitted so far to be written or counted as lost;
    /// then has the sink write the loss notice, if any is due. Returns whether it all happened
    /// in time. Polls every millisecond: meant for exits and tests, not for a hot path.
    pub fn flush(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let wait = |done: &dyn Fn() -> bool| loop {
            if done() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        if !wait(&|| self.drained()) {
            return false;
        }
        // The queue is empty and the sink idle: a marker (an empty line, not a log line) cannot
        // be dropped now, and makes the sink write the notice for lines lost so far.
        let seen = self.shared.markers.load(SeqCst);
        let mut queue = self.queue.clone();
        let _ = queue.write(&[]);
        wait(&|| self.shared.markers.load(SeqCst) > seen)
    }
}

impl<'a> MakeWriter<'a> for LogWriter {
    type Writer = Line<'a>;

    fn make_writer(&'a self) -> Line<'a> {
        Line {
            queue: self.queue.clone(),
            shared: &self.shared,
        }
    }
}

/// Writes one event into the queue; never blocks, never fails.
#[derive(Debug)]
pub struct Line<'a> {
    queue: NonBlocking,
    shared: &'a Shared,
}

impl Write for Line<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0); // an empty write is the flush marker's, never a log line
        }
        self.shared.submitted.fetch_add(1, SeqCst);
        self.queue.write(buf)
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        // One call, one queued line (the default `write_all` would loop on `write`; ours
        // always takes the whole buffer anyway).
        self.write(buf).map(|_| ())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Flushes (bounded) when dropped. Keep it alive as long as the process logs.
#[derive(Debug)]
pub struct LogGuard {
    writer: LogWriter,
    exit_flush: Duration,
    worker: Option<WorkerGuard>,
}

impl LogGuard {
    /// See [`LogWriter::flush`].
    pub fn flush(&self, timeout: Duration) -> bool {
        self.writer.flush(timeout)
    }

    /// See [`LogWriter::lost`].
    pub fn lost(&self) -> u64 {
        self.writer.lost()
    }
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        let flushed = self.writer.flush(self.exit_flush);
        if let Some(worker) = self.worker.take() {
            if flushed {
                // The queue is empty: its shutdown handshake completes at once.
                drop(worker);
            } else {
                // The sink is stuck on a write: tracing-appender's drop would wait 1.1 s and then
                // `println!`. Leave the thread to the process's exit instead.
                std::mem::forget(worker);
            }
        }
    }
}

/// What the sink can write to: stderr, a file, a socket (tests). `AsFd` so that `EAGAIN` can
/// wait for writability with `poll`.
trait Target: Write + AsFd + Send {}
impl<T: Write + AsFd + Send> Target for T {}

/// The writing end, on tracing-appender's thread. Its `write_all` never fails: a line that
/// cannot be written is counted, the "could not be written" notice is written once writing
/// works again.
struct Sink {
    out: Box<dyn Target>,
    program: String,
    shared: Arc<Shared>,
    /// Lost lines already reported by a notice.
    reported: u64,
    /// The last write stopped in the middle of a line: start the next one on a new line.
    mid_line: bool,
}

/// `EAGAIN`s in a row (each after `poll` said writable) before a line is given up as failed.
const MAX_EAGAIN: u32 = 100;

impl Sink {
    fn lost(&self, dropped: u64) -> u64 {
        dropped + self.shared.failed.load(SeqCst)
    }

    /// Writes the notice if lines were lost since the last one.
    fn report(&mut self, dropped: u64) {
        let lost = self.lost(dropped);
        if lost > self.reported {
            let n = lost - self.reported;
            let notice = match self.shared.format {
                Format::Text => format!("{}: {n} log lines could not be written\n", self.program),
                Format::Json => own_line(
                    &self.program,
                    "WARN",
                    "log lines could not be written",
                    Some(n),
                ),
            };
            if self.put(notice.as_bytes()).is_ok() {
                self.reported = lost;
            }
        }
    }

    /// Writes all of `buf`, retrying `EINTR`, waiting for writability on `EAGAIN`.
    fn put(&mut self, buf: &[u8]) -> io::Result<()> {
        if self.mid_line {
            self.write_fully(b"\n")?;
            self.mid_line = false;
        }
        self.write_fully(buf)
    }

    fn write_fully(&mut self, mut buf: &[u8]) -> io::Result<()> {
        let mut eagain = 0;
        let mut wrote_some = false;
        while !buf.is_empty() {
            match self.out.write(buf) {
                Ok(0) => {
                    self.mid_line |= wrote_some;
                    return Err(io::ErrorKind::WriteZero.into());
                }
                Ok(n) => {
                    wrote_some = true;
                    eagain = 0;
                    buf = &buf[n..];
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && eagain < MAX_EAGAIN => {
                    eagain += 1;
                    let mut fds = [nix::poll::PollFd::new(
                        self.out.as_fd(),
                        nix::poll::PollFlags::POLLOUT,
                    )];
                    // Blocks this thread only, as a blocking write would.
                    let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::NONE);
                }
                Err(e) => {
                    self.mid_line |= wrote_some;
                    return Err(e);
                }
            }
        }
        Ok(())
    }
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_all(buf).map(|()| buf.len())
    }

    /// One queued line (or, empty, a flush marker). Always `Ok`: tracing-appender's thread
    /// would only discard an error (and one day might print it).
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        let dropped = self.shared.dropped();
        self.report(dropped);
        if buf.is_empty() {
            self.shared.markers.fetch_add(1, SeqCst);
            return Ok(());
        }
        if self.put(buf).is_err() {
            self.shared.failed.fetch_add(1, SeqCst);
        }
        self.shared.done.fetch_add(1, SeqCst);
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Opens `/dev/null` on each of fds 0, 1, 2 that is closed, so that no socket or file the
/// process opens later becomes its stdin, stdout or stderr. Without close-on-exec: they are the
/// stdio workers inherit. Called by [`Builder::init`] before anything else opens an fd.
fn open_closed_stdio() {
    use nix::fcntl::{open, OFlag};
    use nix::sys::stat::Mode;
    // `open` returns the lowest free fd: while that is 0, 1 or 2 it filled a hole.
    for _ in 0..3 {
        match open("/dev/null", OFlag::O_RDWR, Mode::empty()) {
            Ok(fd) if fd <= 2 => continue,
            Ok(fd) => {
                let _ = nix::unistd::close(fd);
                return;
            }
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests;
