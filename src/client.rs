//! The client side of `roundhouse status|reload|scale|send|stop`.
//!
//! Each command is one request on the running primary's control socket
//! (`roundhouse_supervisor::control`, protocol in `docs/control.md`). Each public function prints
//! its result on stdout, or one `roundhouse: ...` line on stderr, and returns the exit code:
//!
//! | code | meaning |
//! |---|---|
//! | 0 | done |
//! | 1 | failure: no primary running on the path, the primary refused or failed the request (unknown worker id, reload failed, ...), no answer in time |
//! | 2 | usage: `send` JSON that does not parse, `--to` neither `all` nor a positive integer, `scale` outside `1..=1024` |
//!
//! The work is done by `run_*` functions that return the text to print, so tests can check
//! both the output and the exit code without capturing stdio.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use roundhouse_supervisor::control::{self, ControlError, MAX_WORKERS};
use roundhouse_supervisor::stats::StatsSnapshot;
use serde_json::{json, Value};

/// How long `reload` and `scale` wait for their answer: the primary answers when every new
/// worker is online, which can take up to `--ready-timeout` per worker.
const LONG_TIMEOUT: Duration = Duration::from_secs(15 * 60);
/// How long `stop` waits for the primary to exit after acknowledging (its `--grace` plus the
/// kill of what is left).
const STOP_TIMEOUT: Duration = Duration::from_secs(15 * 60);

const OK: i32 = 0;
const FAILURE: i32 = 1;
const USAGE: i32 = 2;

/// Why a command did not succeed: its exit code and the one line for stderr (without the
/// `roundhouse: ` prefix).
#[derive(Debug, PartialEq, Eq)]
struct Failure {
    code: i32,
    message: String,
}

impl Failure {
    fn usage(message: impl Into<String>) -> Failure {
        Failure {
            code: USAGE,
            message: message.into(),
        }
    }
}

impl From<ControlError> for Failure {
    fn from(err: ControlError) -> Failure {
        Failure {
            code: FAILURE,
            message: err.to_string(),
        }
    }
}

fn write_flushed(w: &mut impl std::io::Write, bytes: &[u8]) -> std::io::Result<()> {
    w.write_all(bytes)?;
    w.flush()
}

/// Prints the result and returns the exit code. Never panics on a failed write (`print!` would,
/// with exit 101): a reader that stopped reading (`roundhouse status | head -1`, `EPIPE`) is
/// not an error — the command did what it was asked; any other failure to write the output
/// (`>/dev/full`) is exit 1, as for `cat`, since the output was the point.
fn finish(result: Result<String, Failure>) -> i32 {
    use std::io::Write as _;
    match result {
        Ok(out) => match write_flushed(&mut std::io::stdout().lock(), out.as_bytes()) {
            Ok(()) => OK,
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => OK,
            Err(e) => {
                let _ = writeln!(
                    std::io::stderr(),
                    "roundhouse: could not write the output: {e}"
                );
                FAILURE
            }
        },
        Err(failure) => {
            let _ = writeln!(std::io::stderr(), "roundhouse: {}", failure.message);
            failure.code
        }
    }
}

/// `roundhouse status [--json]`: a summary line with the primary's pid, the stats table and fairness line, or with `json` the `/stats`
/// document itself.
pub fn status(control: &Path, json: bool) -> i32 {
    finish(run_status(control, json))
}

/// `roundhouse reload`: replaces every worker one by one; returns when the primary reports the
/// reload done.
pub fn reload(control: &Path) -> i32 {
    finish(run_reload(control))
}

/// `roundhouse scale N`.
pub fn scale(control: &Path, workers: u32) -> i32 {
    finish(run_scale(control, workers))
}

/// `roundhouse send --to ID|all JSON`.
pub fn send(control: &Path, to: &str, json: &str) -> i32 {
    finish(run_send(control, to, json))
}

/// `roundhouse stop`: graceful stop; returns once the primary has exited.
pub fn stop(control: &Path) -> i32 {
    finish(run_stop(control))
}

fn run_status(control: &Path, as_json: bool) -> Result<String, Failure> {
    let answer = control::request(control, &json!({"cmd": "status"}))?;
    let stats: StatsSnapshot = answer
        .get("stats")
        .cloned()
        .ok_or_else(|| "no stats in the answer".to_string())
        .and_then(|v| serde_json::from_value(v).map_err(|e| e.to_string()))
        .map_err(|detail| Failure {
            code: FAILURE,
            message: format!(
                "bad answer from the primary on {}: {detail}",
                control.display()
            ),
        })?;
    if as_json {
        // The same struct /stats serializes, so the same fields in the same order; serde_json's
        // float_roundtrip keeps every number exactly as the primary sent it.
        let doc = serde_json::to_string(&stats).map_err(|e| Failure {
            code: FAILURE,
            message: format!("could not encode stats: {e}"),
        })?;
        Ok(doc + "\n")
    } else {
        Ok(render_status(&stats))
    }
}

fn run_reload(control: &Path) -> Result<String, Failure> {
    control::request_timeout(control, &json!({"cmd": "reload"}), LONG_TIMEOUT)?;
    Ok("reloaded\n".into())
}

/// `roundhouse upgrade`: answered by the new image once it serves (the pre-flight may take up
/// to 10 s), or by the old one with why it keeps serving.
pub fn upgrade(control: &Path) -> i32 {
    finish(run_upgrade(control))
}

fn run_upgrade(control: &Path) -> Result<String, Failure> {
    let answer = control::request_timeout(control, &json!({"cmd": "upgrade"}), LONG_TIMEOUT)?;
    let pid = answer.get("pid").and_then(Value::as_u64).unwrap_or(0);
    let version = answer.get("version").and_then(Value::as_str).unwrap_or("?");
    let workers = answer.get("workers").and_then(Value::as_u64).unwrap_or(0);
    let s = if workers == 1 { "" } else { "s" };
    Ok(format!(
        "upgraded: primary {pid} now runs roundhouse {version} ({workers} worker{s} carried over)\n"
    ))
}

fn run_scale(control: &Path, workers: u32) -> Result<String, Failure> {
    if !(1..=MAX_WORKERS).contains(&workers) {
        return Err(Failure::usage(format!(
            "scale: the number of workers must be between 1 and {MAX_WORKERS}, got {workers}"
        )));
    }
    control::request_timeout(
        control,
        &json!({"cmd": "scale", "workers": workers}),
        LONG_TIMEOUT,
    )?;
    Ok(format!(
        "scaled to {workers} worker{}\n",
        if workers == 1 { "" } else { "s" }
    ))
}

/// `all` or a worker id `1..=u32::MAX`, as the `to` field of a send request.
fn parse_to(to: &str) -> Result<Value, Failure> {
    if to == "all" {
        return Ok(json!("all"));
    }
    match to.parse::<u32>() {
        Ok(id) if id >= 1 && !to.starts_with('+') => Ok(json!(id)),
        _ => Err(Failure::usage(format!(
            "send: --to must be `all` or a worker id (a positive integer), got `{to}`"
        ))),
    }
}

fn run_send(control: &Path, to: &str, message: &str) -> Result<String, Failure> {
    let target = parse_to(to)?;
    let message: Value = serde_json::from_str(message)
        .map_err(|e| Failure::usage(format!("send: the message is not valid JSON: {e}")))?;
    control::request(
        control,
        &json!({"cmd": "send", "to": target, "message": message}),
    )?;
    Ok(match target {
        Value::String(_) => "sent to all workers\n".into(),
        id => format!("sent to worker {id}\n"),
    })
}

fn run_stop(control: &Path) -> Result<String, Failure> {
    match control::stop_and_wait(control, STOP_TIMEOUT) {
        Ok(()) => Ok("stopped\n".into()),
        Err(ControlError::Timeout { path, after }) => Err(Failure {
            code: FAILURE,
            message: format!(
                "stop requested, but the primary on {} has not exited after {}s",
                path.display(),
                after.as_secs()
            ),
        }),
        Err(err) => Err(err.into()),
    }
}

/// `4.2 MiB`: binary units, one decimal from KiB up.
fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// `12.5s`, `4m 05s`, `3h 02m`, `2d 07h`.
fn human_uptime(seconds: f64) -> String {
    if !seconds.is_finite() || seconds < 0.0 {
        return "-".into();
    }
    if seconds < 60.0 {
        return format!("{seconds:.1}s");
    }
    let s = seconds as u64;
    match s {
        0..=3599 => format!("{}m {:02}s", s / 60, s % 60),
        3600..=86399 => format!("{}h {:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d {:02}h", s / 86400, s % 86400 / 3600),
    }
}

/// The `status` table: a summary line, one row per slot, the fairness line.
fn render_status(stats: &StatsSnapshot) -> String {
    const HEADERS: [&str; 9] = [
        "ID", "PID", "STATE", "CONNS", "ACTIVE", "REQUESTS", "LOST", "RESTARTS", "RSS",
    ];
    // STATE is text, left-aligned; the rest are numbers, right-aligned.
    const LEFT: [bool; 9] = [false, false, true, false, false, false, false, false, false];

    let rows: Vec<[String; 9]> = stats
        .workers
        .iter()
        .map(|w| {
            [
                w.id.to_string(),
                w.pid.map_or_else(|| "-".to_string(), |p| p.to_string()),
                match &w.backoff {
                    Some(b) => format!("backoff {:.1}s", b.next_attempt_in_s),
                    None => w.state.to_string(),
                },
                known(w.connections_total),
                known(w.connections_active),
                known(w.requests_total),
                w.connections_lost.to_string(),
                w.restarts.to_string(),
                human_bytes(w.rss_bytes),
            ]
        })
        .collect();
    let mut widths = HEADERS.map(str::len);
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.len());
        }
    }

    let mut out = String::new();
    let listeners = if stats.listeners.is_empty() {
        "-".to_string()
    } else {
        stats.listeners.join(", ")
    };
    let _ = writeln!(
        out,
        "primary pid {}  policy {}  uptime {}  listeners {}",
        if stats.pid == 0 {
            "-".to_string()
        } else {
            stats.pid.to_string()
        },
        stats.policy,
        human_uptime(stats.uptime_s),
        listeners
    );
    let header = HEADERS.map(str::to_string);
    for row in std::iter::once(&header).chain(&rows) {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            let w = widths[i];
            if LEFT[i] {
                let _ = write!(line, "{cell:<w$}");
            } else {
                let _ = write!(line, "{cell:>w$}");
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    let t = &stats.totals;
    let _ = writeln!(
        out,
        "total: {} connections, {} requests, {} lost",
        known(t.connections_total),
        known(t.requests_total),
        t.connections_lost
    );
    if stats.workers.iter().any(|w| w.keys.is_some()) {
        let keys: Vec<String> = stats
            .workers
            .iter()
            .map(|w| format!("{}:{}", w.id, known(w.keys)))
            .collect();
        let _ = writeln!(
            out,
            "sticky keys per worker (estimated): {}",
            keys.join("  ")
        );
    }
    match &stats.fairness {
        Some(f) => {
            let _ = writeln!(
                out,
                "fairness ({}): jain {:.4}  max/min {:.2}  cv {:.3}",
                f.metric, f.jain, f.max_min_ratio, f.cv
            );
        }
        None => {
            let _ = writeln!(
                out,
                "fairness: unknown (roundhouse cannot see these workers' connections)"
            );
        }
    }
    out
}

/// A figure roundhouse knows, or `-` for one it cannot (plain workers).
fn known(v: Option<u64>) -> String {
    v.map_or_else(|| "-".to_string(), |n| n.to_string())
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixListener;
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::thread::JoinHandle;

    use roundhouse_supervisor::stats::{WorkerState, WorkerStats};

    use super::*;

    fn snapshot() -> StatsSnapshot {
        let worker = |id: u32, conns: u64, state, pid, rss| WorkerStats {
            id,
            pid,
            state,
            connections_total: Some(conns),
            connections_active: Some(1),
            requests_total: Some(conns * 2),
            backoff: None,
            keys: None,
            connections_lost: 0,
            restarts: u64::from(id == 2),
            rss_bytes: rss,
        };
        let mut s = StatsSnapshot::new(
            "rr",
            12.34,
            vec!["127.0.0.1:8000".into()],
            vec![
                worker(1, 1000, WorkerState::Online, Some(4242), 4_404_019),
                worker(2, 1001, WorkerState::Starting, None, 0),
            ],
        );
        s.pid = 4141;
        s
    }

    #[test]
    fn table_and_fairness_line() {
        let out = render_status(&snapshot());
        let expected = "\
primary pid 4141  policy rr  uptime 12.3s  listeners 127.0.0.1:8000
ID   PID  STATE     CONNS  ACTIVE  REQUESTS  LOST  RESTARTS      RSS
 1  4242  online     1000       1      2000     0         0  4.2 MiB
 2     -  starting   1001       1      2002     0         1      0 B
total: 2001 connections, 4002 requests, 0 lost
fairness (connections_total): jain 1.0000  max/min 1.00  cv 0.000
";
        assert_eq!(out, expected, "\n{out}");
    }

    #[test]
    fn human_units() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1024), "1.0 KiB");
        assert_eq!(human_bytes(5 * 1024 * 1024), "5.0 MiB");
        assert_eq!(human_bytes(3 * 1024 * 1024 * 1024 / 2), "1.5 GiB");
        assert_eq!(human_bytes(u64::MAX), "16384.0 PiB");
        assert_eq!(human_uptime(0.04), "0.0s");
        assert_eq!(human_uptime(245.0), "4m 05s");
        assert_eq!(human_uptime(3.0 * 3600.0 + 125.0), "3h 02m");
        assert_eq!(human_uptime(2.0 * 86400.0 + 7.0 * 3600.0), "2d 07h");
    }

    #[test]
    fn usage_errors_exit_2_before_any_connection() {
        let nowhere = Path::new("/nonexistent/roundhouse-test.sock");
        for to in ["0", "-1", "x", "", "1.5", "+3", "4294967296", "ALL"] {
            let err = run_send(nowhere, to, "{}").unwrap_err();
            assert_eq!(err.code, 2, "{to}: {err:?}");
            assert!(err.message.contains("--to must be"), "{err:?}");
        }
        let err = run_send(nowhere, "all", "{not json").unwrap_err();
        assert_eq!(err.code, 2);
        assert!(err.message.contains("not valid JSON"), "{err:?}");
        for n in [0, 1025] {
            let err = run_scale(nowhere, n).unwrap_err();
            assert_eq!(err.code, 2, "{n}");
        }
    }

    #[test]
    fn no_primary_exits_1_with_the_path() {
        let path = Path::new("/nonexistent/roundhouse-test.sock");
        let want = Failure {
            code: 1,
            message: format!("no primary running on {}", path.display()),
        };
        assert_eq!(run_status(path, false).unwrap_err(), want);
        assert_eq!(run_status(path, true).unwrap_err(), want);
        assert_eq!(run_reload(path).unwrap_err(), want);
        assert_eq!(run_scale(path, 2).unwrap_err(), want);
        assert_eq!(run_send(path, "all", "{}").unwrap_err(), want);
        assert_eq!(run_stop(path).unwrap_err(), want);
        assert_eq!(status(path, false), 1);
    }

    /// A stand-in primary: answers each request line with the next canned line, records the
    /// requests, then closes.
    struct FakePrimary {
        path: PathBuf,
        dir: PathBuf,
        thread: Option<JoinHandle<Vec<Value>>>,
    }

    impl FakePrimary {
        fn start(answers: Vec<String>) -> FakePrimary {
            static N: AtomicU32 = AtomicU32::new(0);
            let dir = std::env::temp_dir().join(format!(
                "rh-cli-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join("c.sock");
            let listener = UnixListener::bind(&path).unwrap();
            let thread = std::thread::spawn(move || {
                let mut seen = Vec::new();
                for answer in answers {
                    let (stream, _) = listener.accept().unwrap();
                    let mut reader = BufReader::new(stream.try_clone().unwrap());
                    let mut line = String::new();
                    reader.read_line(&mut line).unwrap();
                    seen.push(serde_json::from_str(&line).unwrap());
                    (&stream).write_all(answer.as_bytes()).unwrap();
                    (&stream).write_all(b"\n").unwrap();
                }
                seen
            });
            FakePrimary {
                path,
                dir,
                thread: Some(thread),
            }
        }
        fn requests(mut self) -> Vec<Value> {
            self.thread.take().unwrap().join().unwrap()
        }
    }

    impl Drop for FakePrimary {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    #[test]
    fn commands_send_the_documented_requests() {
        let stats = snapshot();
        let status_answer = serde_json::to_string(&json!({"ok": true, "stats": stats})).unwrap();
        let fake = FakePrimary::start(vec![
            status_answer.clone(),
            status_answer,
            r#"{"ok":true}"#.into(),
            r#"{"ok":true}"#.into(),
            r#"{"ok":true}"#.into(),
            r#"{"ok":false,"error":"no worker with id 9"}"#.into(),
            r#"{"ok":false,"error":"reload failed: worker 2 did not come online"}"#.into(),
            r#"{"ok":true}"#.into(),
        ]);
        let p = fake.path.clone();

        assert_eq!(run_status(&p, false).unwrap(), render_status(&stats));
        // --json prints the /stats document byte for byte (what admin.rs serves).
        assert_eq!(
            run_status(&p, true).unwrap(),
            serde_json::to_string(&stats).unwrap() + "\n"
        );
        assert_eq!(run_reload(&p).unwrap(), "reloaded\n");
        assert_eq!(run_scale(&p, 3).unwrap(), "scaled to 3 workers\n");
        assert_eq!(
            run_send(&p, "2", r#"{"ping":"x"}"#).unwrap(),
            "sent to worker 2\n"
        );
        let err = run_send(&p, "9", "1").unwrap_err();
        assert_eq!((err.code, err.message.as_str()), (1, "no worker with id 9"));
        let err = run_reload(&p).unwrap_err();
        assert_eq!(err.code, 1);
        assert_eq!(err.message, "reload failed: worker 2 did not come online");
        // The fake closes right after acknowledging: the primary "exited".
        assert_eq!(run_stop(&p).unwrap(), "stopped\n");

        assert_eq!(
            fake.requests(),
            [
                json!({"cmd": "status"}),
                json!({"cmd": "status"}),
                json!({"cmd": "reload"}),
                json!({"cmd": "scale", "workers": 3}),
                json!({"cmd": "send", "to": 2, "message": {"ping": "x"}}),
                json!({"cmd": "send", "to": 9, "message": 1}),
                json!({"cmd": "reload"}),
                json!({"cmd": "stop"}),
            ]
        );
    }
}
