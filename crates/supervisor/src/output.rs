//! Worker output: each worker's stdout and stderr, captured through pipes and written into the
//! primary's log line by line, with the worker's id.
//!
//! Why a thread of its own (`roundhouse-output`): reading what workers print must never take
//! the accept path's time, and a worker that prints without end must cost log lines, never the
//! primary's memory or its loop. The owner only creates the pipes at spawn and hands their read
//! ends over here; this thread reads them (non-blocking, its own current-thread runtime) and
//! emits one log event per line (target `roundhouse_supervisor::output`, fields `worker.id`,
//! `worker.pid` and `stream`; the text format reads `worker 3 stderr| …`). A line longer than
//! [`MAX_LINE`] is cut and marked; the log itself is lossy and counted (see `roundhouse-log`),
//! so a flood drops lines rather than growing anything. A pipe is read until end-of-file, not
//! until its worker is reaped: output written just before an exit, or by a worker's own
//! children, is not lost.

#![forbid(unsafe_code)]

use std::io;
use std::os::fd::OwnedFd;

use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;

/// Longest line written as it is; longer ones are cut here and marked.
pub const MAX_LINE: usize = 16 * 1024;

/// Which of a worker's streams a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    pub fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

struct Pipe {
    id: u32,
    pid: u32,
    stream: Stream,
    fd: OwnedFd,
    /// The start of a line read before an upgrade, not logged yet.
    partial: Vec<u8>,
}

enum Msg {
    Pipe(Pipe),
    /// Stop reading and report every pipe (an upgrade is about to exec); the pipes stay open.
    Pause(std::sync::mpsc::Sender<Vec<crate::upgrade::CarriedPipe>>),
    /// The upgrade failed: read the paused pipes again.
    Resume,
}

/// The owner's handle: hands pipes to the output thread.
pub(crate) struct Output {
    tx: mpsc::UnboundedSender<Msg>,
}

impl Output {
    /// Starts the output thread. It ends once this handle is dropped and every pipe it reads
    /// has reached end-of-file.
    pub(crate) fn start() -> io::Result<Output> {
        let (tx, mut rx) = mpsc::unbounded_channel::<Msg>();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()?;
        std::thread::Builder::new()
            .name("roundhouse-output".into())
            .spawn(move || {
                rt.block_on(async move {
                    let (pause_tx, pause_rx) = tokio::sync::watch::channel(false);
                    let mut readers = tokio::task::JoinSet::new();
                    let mut paused: Vec<Pipe> = Vec::new();
                    loop {
                        tokio::select! {
                            msg = rx.recv() => match msg {
                                Some(Msg::Pipe(p)) if *pause_tx.borrow() => paused.push(p),
                                Some(Msg::Pipe(p)) => { readers.spawn(relay(p, pause_rx.clone())); }
                                Some(Msg::Pause(reply)) => {
                                    let _ = pause_tx.send(true);
                                    while let Some(r) = readers.join_next().await {
                                        paused.extend(r.ok().flatten());
                                    }
                                    let _ = reply.send(paused.iter().map(Pipe::carried).collect());
                                }
                                Some(Msg::Resume) => {
                                    let _ = pause_tx.send(false);
                                    for p in paused.drain(..) {
                                        readers.spawn(relay(p, pause_rx.clone()));
                                    }
                                }
                                None => break,
                            },
                            Some(_) = readers.join_next(), if !readers.is_empty() => {}
                        }
                    }
                    while readers.join_next().await.is_some() {}
                });
            })?;
        Ok(Output { tx })
    }

    /// Captures `fd` (the read end of worker `id`'s `stream` pipe).
    pub(crate) fn capture(&self, id: u32, pid: u32, stream: Stream, fd: OwnedFd) {
        self.capture_with(id, pid, stream, fd, Vec::new());
    }

    /// As [`Output::capture`], with the start of a line read before an upgrade.
    pub(crate) fn capture_with(
        &self,
        id: u32,
        pid: u32,
        stream: Stream,
        fd: OwnedFd,
        partial: Vec<u8>,
    ) {
        let _ = self.tx.send(Msg::Pipe(Pipe {
            id,
            pid,
            stream,
            fd,
            partial,
        }));
    }

    /// Stops reading every pipe (they stay open) and lists them, for an upgrade. `None` if the
    /// output thread did not answer in time.
    pub(crate) fn pause(&self) -> Option<Vec<crate::upgrade::CarriedPipe>> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.tx.send(Msg::Pause(tx)).ok()?;
        rx.recv_timeout(std::time::Duration::from_secs(2)).ok()
    }

    /// Reads the paused pipes again (the upgrade did not happen).
    pub(crate) fn resume(&self) {
        let _ = self.tx.send(Msg::Resume);
    }
}

impl Pipe {
    fn carried(&self) -> crate::upgrade::CarriedPipe {
        use std::os::fd::AsRawFd;
        crate::upgrade::CarriedPipe {
            id: self.id,
            pid: self.pid,
            stderr: self.stream == Stream::Stderr,
            fd: self.fd.as_raw_fd(),
            partial: self.partial.clone(),
        }
    }
}

/// Reads one pipe to its end, one log event per line; or, when `pause` turns true, stops and
/// returns the pipe (with the start of a line not logged yet).
async fn relay(pipe: Pipe, mut pause: tokio::sync::watch::Receiver<bool>) -> Option<Pipe> {
    let Pipe {
        id,
        pid,
        stream,
        fd,
        partial,
    } = pipe;
    let p = Source { id, pid, stream };
    let Ok(mut rx) = tokio::net::unix::pipe::Receiver::from_owned_fd(fd) else {
        return None;
    };
    let mut lines = Lines {
        partial,
        skipping: false,
    };
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        tokio::select! {
            biased;
            _ = pause.wait_for(|&p| p) => {
                let fd = rx.into_nonblocking_fd().ok()?;
                return Some(Pipe { id, pid, stream, fd, partial: std::mem::take(&mut lines.partial) });
            }
            r = rx.read(&mut buf) => match r {
                Ok(0) | Err(_) => break,
                Ok(n) => lines.feed(&buf[..n], |line, cut| emit(&p, line, cut)),
            },
        }
    }
    lines.finish(|line, cut| emit(&p, line, cut));
    None
}

/// Whose line it is.
struct Source {
    id: u32,
    pid: u32,
    stream: Stream,
}

fn emit(p: &Source, line: &[u8], cut: bool) {
    let text = String::from_utf8_lossy(line);
    let text = text.trim_end_matches('\r');
    let mark = if cut { " [line cut]" } else { "" };
    let stream = p.stream.as_str();
    let msg = format!("worker {} {stream}| {text}{mark}", p.id);
    tracing::info!(worker.id = p.id, worker.pid = p.pid, stream, "{msg}");
}

/// Splits bytes into lines of at most [`MAX_LINE`]: the part of a longer line beyond it is
/// dropped (and the line marked as cut), so memory stays bounded whatever a worker prints.
#[derive(Default)]
struct Lines {
    partial: Vec<u8>,
    /// The current line was cut: skip to its end.
    skipping: bool,
}

impl Lines {
    fn feed(&mut self, mut data: &[u8], mut out: impl FnMut(&[u8], bool)) {
        while !data.is_empty() {
            let nl = data.iter().position(|&b| b == b'\n');
            let (chunk, rest, ends) = match nl {
                Some(i) => (&data[..i], &data[i + 1..], true),
                None => (data, &[][..], false),
            };
            data = rest;
            if !self.skipping {
                let room = MAX_LINE - self.partial.len();
                if chunk.len() > room {
                    self.partial.extend_from_slice(&chunk[..room]);
                    out(&self.partial, true);
                    self.partial.clear();
                    self.skipping = !ends;
                } else {
                    self.partial.extend_from_slice(chunk);
                    if ends {
                        out(&self.partial, false);
                        self.partial.clear();
                    }
                }
            } else if ends {
                self.skipping = false;
            }
        }
    }

    fn finish(&mut self, mut out: impl FnMut(&[u8], bool)) {
        if !self.partial.is_empty() {
            out(&self.partial, false);
            self.partial.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(chunks: &[&[u8]]) -> Vec<(Vec<u8>, bool)> {
        let mut l = Lines::default();
        let mut got = Vec::new();
        for c in chunks {
            l.feed(c, |line, cut| got.push((line.to_vec(), cut)));
        }
        l.finish(|line, cut| got.push((line.to_vec(), cut)));
        got
    }

    #[test]
    fn lines_across_reads_and_a_last_line_without_newline() {
        let got = split(&[b"one\ntw", b"o\n\nthr", b"ee"]);
        let want: Vec<(Vec<u8>, bool)> = vec![
            (b"one".to_vec(), false),
            (b"two".to_vec(), false),
            (b"".to_vec(), false),
            (b"three".to_vec(), false),
        ];
        assert_eq!(got, want);
    }

    #[test]
    fn a_long_line_is_cut_once_and_the_next_line_is_whole() {
        let long = vec![b'x'; MAX_LINE * 3 + 5];
        let mut chunks: Vec<&[u8]> = long.chunks(1000).collect();
        chunks.push(b"\nnext\n");
        let got = split(&chunks);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].0.len(), MAX_LINE);
        assert!(got[0].1, "marked as cut");
        assert_eq!(got[1], (b"next".to_vec(), false));
    }

    #[test]
    fn a_line_of_exactly_the_limit_is_not_cut() {
        let mut line = vec![b'y'; MAX_LINE];
        line.push(b'\n');
        let got = split(&[&line]);
        assert_eq!(got, vec![(vec![b'y'; MAX_LINE], false)]);
    }
}
