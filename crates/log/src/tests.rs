//! The sink against socketpairs: order, failures counted and reported once, cut lines,
//! a reader that stops, EAGAIN, a bounded exit.
use super::*;
use std::io::Read;
use std::os::fd::BorrowedFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::AtomicU8;

const WAIT: Duration = Duration::from_secs(10);

/// Reads from `r` until `done(text so far)` or the deadline; returns the text.
fn read_until(r: &mut UnixStream, done: impl Fn(&str) -> bool) -> String {
    r.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
    let deadline = Instant::now() + WAIT;
    let mut got = Vec::new();
    let mut buf = [0u8; 65536];
    while !done(&String::from_utf8_lossy(&got)) {
        assert!(
            Instant::now() < deadline,
            "timed out; read so far:\n{}",
            String::from_utf8_lossy(&got)
        );
        match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e) => panic!("read: {e}"),
        }
    }
    String::from_utf8(got).unwrap()
}

fn log(w: &LogWriter, text: &str) {
    w.make_writer().write_all(text.as_bytes()).unwrap();
}

fn notices(text: &str) -> Vec<u64> {
    text.lines()
        .filter_map(|l| l.strip_prefix("t: "))
        .filter_map(|l| l.strip_suffix(" log lines could not be written"))
        .map(|n| n.parse().unwrap())
        .collect()
}

/// A socket that fails every write while `mode` is FAIL, writes half a buffer then fails
/// while it is HALF, and works while it is OK.
struct Switch {
    out: UnixStream,
    mode: Arc<AtomicU8>,
}
const OK: u8 = 0;
const FAIL: u8 = 1;
const HALF: u8 = 2;

impl Write for Switch {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self.mode.load(SeqCst) {
            OK => self.out.write(buf),
            HALF => {
                self.mode.store(FAIL, SeqCst);
                self.out.write(&buf[..buf.len() / 2])
            }
            _ => Err(io::Error::from_raw_os_error(libc_enospc())),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
impl AsFd for Switch {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.out.as_fd()
    }
}
fn libc_enospc() -> i32 {
    nix::errno::Errno::ENOSPC as i32
}

/// Fills the socket's buffers (the peer reads nothing) so that the next write blocks;
/// returns what was written.
fn fill(out: &UnixStream) -> String {
    out.set_nonblocking(true).unwrap();
    let chunk = "f".repeat(999) + "\n";
    let mut written = String::new();
    loop {
        match (&*out).write(chunk.as_bytes()) {
            Ok(n) => written.push_str(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("fill: {e}"),
        }
    }
    out.set_nonblocking(false).unwrap();
    written
}

#[test]
fn lines_arrive_in_order_and_flush_says_so() {
    let (out, mut r) = UnixStream::pair().unwrap();
    let (w, guard) = Builder::new("t").writer_to(out);
    for i in 0..100 {
        log(&w, &format!("line {i}\n"));
    }
    assert!(guard.flush(WAIT));
    let text = read_until(&mut r, |t| t.contains("line 99\n"));
    let expected: String = (0..100).map(|i| format!("line {i}\n")).collect();
    assert_eq!(text, expected);
    assert_eq!(guard.lost(), 0);
}

#[test]
fn failed_writes_are_counted_and_reported_once_writing_works_again() {
    let (out, mut r) = UnixStream::pair().unwrap();
    let mode = Arc::new(AtomicU8::new(OK));
    let (w, guard) = Builder::new("t").writer_to(Switch {
        out,
        mode: Arc::clone(&mode),
    });
    log(&w, "before\n");
    assert!(guard.flush(WAIT));
    mode.store(FAIL, SeqCst);
    for i in 0..7 {
        log(&w, &format!("lost {i}\n"));
    }
    assert!(guard.flush(WAIT));
    assert_eq!(guard.lost(), 7);
    mode.store(OK, SeqCst);
    log(&w, "after\n");
    log(&w, "later\n");
    assert!(guard.flush(WAIT));
    let text = read_until(&mut r, |t| t.contains("later\n"));
    assert_eq!(
        text,
        "before\nt: 7 log lines could not be written\nafter\nlater\n"
    );
    // Reported once: a further flush writes no second notice.
    log(&w, "last\n");
    assert!(guard.flush(WAIT));
    let text = read_until(&mut r, |t| t.contains("last\n"));
    assert_eq!(text, "last\n");
}

/// Under `--log-format json` the notice is a JSON object like tracing's own lines.
#[test]
fn the_json_notice_is_one_json_object() {
    let (out, mut r) = UnixStream::pair().unwrap();
    let mode = Arc::new(AtomicU8::new(FAIL));
    let (w, guard) = Builder::new("t").format(Format::Json).writer_to(Switch {
        out,
        mode: Arc::clone(&mode),
    });
    for _ in 0..3 {
        log(&w, "{\"lost\":true}\n");
    }
    assert!(guard.flush(WAIT));
    mode.store(OK, SeqCst);
    log(&w, "{\"after\":1}\n");
    let text = read_until(&mut r, |t| t.contains("after"));
    let mut lines = text.lines();
    let notice: serde_json::Value = serde_json::from_str(lines.next().unwrap()).unwrap();
    assert_eq!(notice["level"], "WARN", "{notice}");
    assert_eq!(notice["target"], "t", "{notice}");
    assert_eq!(
        notice["fields"]["message"], "log lines could not be written",
        "{notice}"
    );
    assert_eq!(notice["fields"]["lost"], 3, "{notice}");
    assert!(
        notice["timestamp"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z')),
        "{notice}"
    );
    assert_eq!(lines.next(), Some("{\"after\":1}"));
}

#[test]
fn formats_parse_and_print() {
    assert_eq!("text".parse::<Format>().unwrap(), Format::Text);
    assert_eq!("json".parse::<Format>().unwrap(), Format::Json);
    assert_eq!(Format::Json.to_string(), "json");
    assert!("JSON"
        .parse::<Format>()
        .unwrap_err()
        .contains("text or json"));
    assert_eq!(Format::default(), Format::Text);
}

#[test]
fn a_line_cut_short_by_an_error_does_not_swallow_the_next_one() {
    let (out, mut r) = UnixStream::pair().unwrap();
    let mode = Arc::new(AtomicU8::new(HALF));
    let (w, guard) = Builder::new("t").writer_to(Switch {
        out,
        mode: Arc::clone(&mode),
    });
    log(&w, "abcdefgh\n");
    assert!(guard.flush(WAIT));
    mode.store(OK, SeqCst);
    log(&w, "next\n");
    assert!(guard.flush(WAIT));
    let text = read_until(&mut r, |t| t.contains("next\n"));
    assert_eq!(text, "abcd\nt: 1 log lines could not be written\nnext\n");
}

#[test]
fn the_flush_marker_reports_a_loss_without_a_new_line() {
    let (out, mut r) = UnixStream::pair().unwrap();
    let mode = Arc::new(AtomicU8::new(FAIL));
    let (w, guard) = Builder::new("t").writer_to(Switch {
        out,
        mode: Arc::clone(&mode),
    });
    log(&w, "lost\n");
    assert!(guard.flush(WAIT));
    mode.store(OK, SeqCst);
    assert!(guard.flush(WAIT));
    let text = read_until(&mut r, |t| t.contains('\n'));
    assert_eq!(text, "t: 1 log lines could not be written\n");
}

/// A reader that stops reading: the caller never blocks, the queue drops (counted), and
/// when the reader comes back every line is either there or in the notice's count.
#[test]
fn a_stuck_reader_costs_counted_lines_never_a_blocked_caller() {
    let (out, mut r) = UnixStream::pair().unwrap();
    let filled = fill(&out);
    let (w, guard) = Builder::new("t")
        .queue_lines(16)
        .exit_flush(Duration::from_millis(50))
        .writer_to(out);
    const N: usize = 20_000;
    let line = format!("{}\n", "x".repeat(100));
    let started = Instant::now();
    for _ in 0..N {
        log(&w, &line);
    }
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "logging {N} lines into a stuck sink took {took:?}"
    );
    assert!(w.dropped() > 0, "a socket buffer cannot hold 2 MB");
    // Stuck: a bounded flush gives up in time.
    let t = Instant::now();
    assert!(!guard.flush(Duration::from_millis(100)));
    assert!(t.elapsed() < Duration::from_secs(2));
    // The reader comes back; once the queue is empty, one more line.
    let reader = std::thread::spawn(move || read_until(&mut r, |t| t.ends_with("end\n")));
    assert!(guard.flush(WAIT));
    log(&w, "end\n");
    let text = reader.join().unwrap();
    assert!(text.starts_with(&filled));
    let text = &text[filled.len()..];
    let written = text.lines().filter(|l| l.starts_with('x')).count();
    let reported: u64 = notices(text).iter().sum();
    assert!(reported > 0, "no notice in the output");
    assert_eq!(
        written as u64 + reported,
        N as u64,
        "every line written or counted"
    );
    assert_eq!(guard.lost(), reported);
}

/// stderr shared with a process that made it non-blocking: `EAGAIN` waits for the fd to be
/// writable instead of losing lines.
#[test]
fn eagain_waits_for_writability() {
    let (out, mut r) = UnixStream::pair().unwrap();
    out.set_nonblocking(true).unwrap();
    let (w, guard) = Builder::new("t").queue_lines(100_000).writer_to(out);
    const N: usize = 5_000;
    let line = format!("{}\n", "y".repeat(100));
    for _ in 0..N {
        log(&w, &line);
    }
    log(&w, "end\n");
    let text = read_until(&mut r, |t| t.ends_with("end\n"));
    assert!(guard.flush(WAIT));
    assert_eq!(text.lines().filter(|l| l.starts_with('y')).count(), N);
    assert_eq!(guard.lost(), 0);
}

#[test]
fn dropping_the_guard_is_bounded_when_the_sink_is_stuck() {
    let (out, _r) = UnixStream::pair().unwrap();
    fill(&out);
    let (w, guard) = Builder::new("t")
        .queue_lines(8)
        .exit_flush(Duration::from_millis(100))
        .writer_to(out);
    let line = "z".repeat(1000) + "\n";
    for _ in 0..2000 {
        log(&w, &line);
    }
    let t = Instant::now();
    drop(guard);
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
}
