//! Worker output (SPEC "Worker output", issue 16 item 1): each worker's stdout and stderr reach
//! the primary's log line by line with the worker's id; long lines are cut and marked; what a
//! worker writes just before it exits is not lost; a worker that writes without end costs log
//! lines, never the primary's memory or its accept path.

mod common;

use common::*;
use std::time::{Duration, Instant};

#[test]
fn worker_lines_carry_the_worker_id_and_stream() {
    let b = Primary::builder().workers(2);
    let script = b.temp_dir().write_script(
        "talk.sh",
        &format!(
            "#!/bin/sh\n\
             echo \"to stdout from $ROUNDHOUSE_WORKER_ID\"\n\
             echo \"to stderr from $ROUNDHOUSE_WORKER_ID\" >&2\n\
             head -c 40000 /dev/zero | tr '\\0' x; echo\n\
             echo after the long line\n\
             exec '{}'\n",
            hello_worker()
        ),
    );
    let p = b.cmd(&[script.display().to_string()]).start();
    p.wait_ready();
    let line = |text: String| p.wait_for_line(&text, STARTUP, |l| l.contains(&text));
    for id in ["1", "2"] {
        let out = line(format!("worker {id} stdout| to stdout from {id}"));
        assert_eq!(out.field("worker.id").as_deref(), Some(id), "{}", out.text);
        assert_eq!(
            out.field("stream").as_deref(),
            Some("stdout"),
            "{}",
            out.text
        );
        let err = line(format!("worker {id} stderr| to stderr from {id}"));
        assert_eq!(
            err.field("stream").as_deref(),
            Some("stderr"),
            "{}",
            err.text
        );
        p.wait_for_log(&format!("worker {id} stdout| after the long line"), STARTUP);
    }
    // The 40,000-byte line is cut at 16 KiB and marked, once per worker.
    let cut = p.lines_matching("[line cut]");
    assert_eq!(cut.len(), 2, "{cut:?}");
    assert!(cut.iter().all(|l| l.text.matches('x').count() == 16 * 1024));
    assert_eq!(get(p.addr(), "/").expect("serves").status, 200);
}

#[test]
fn last_words_before_an_exit_are_not_lost() {
    let b = Primary::builder().workers(1);
    let script = b.temp_dir().write_script(
        "bye.sh",
        "#!/bin/sh\necho \"goodbye from $$\"\necho 'and on stderr' >&2\nexit 3\n",
    );
    let p = b.cmd(&[script.display().to_string()]).start();
    let exited = p.wait_for_line("an exit", STARTUP, |l| l.contains("worker exited"));
    let pid = exited.field("worker.pid").expect("pid");
    p.wait_for_log(&format!("worker 1 stdout| goodbye from {pid}"), STARTUP);
    p.wait_for_log("worker 1 stderr| and on stderr", STARTUP);
}

#[test]
fn a_worker_that_writes_without_end_costs_lines_not_memory() {
    let b = Primary::builder().workers(2);
    let script = b.temp_dir().write_script(
        "flood.sh",
        &format!(
            "#!/bin/sh\n\
             if [ \"$ROUNDHOUSE_WORKER_ID\" = 1 ]; then yes 'flooding the log' >&2 & fi\n\
             exec '{}'\n",
            hello_worker()
        ),
    );
    let p = b.cmd(&[script.display().to_string()]).start();
    p.wait_ready();
    p.wait_for_log("worker 1 stderr| flooding the log", STARTUP);
    let rss_before = proc_rss_kib(p.pid()).expect("rss");
    let mut rss_max = rss_before;
    let mut worst = Duration::ZERO;
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(2) {
        let r0 = Instant::now();
        assert_eq!(
            get(p.addr(), "/").expect("serves while flooded").status,
            200
        );
        worst = worst.max(r0.elapsed());
        rss_max = rss_max.max(proc_rss_kib(p.pid()).expect("rss"));
    }
    eprintln!(
        "FIGURE output flood: primary RSS {rss_before} KiB before, {rss_max} KiB max over 2 s; \
         slowest request {:.1} ms",
        worst.as_secs_f64() * 1000.0
    );
    assert!(
        rss_max < rss_before + 32 * 1024,
        "the primary grew from {rss_before} KiB to {rss_max} KiB under a worker's output flood"
    );
}

/// Under `--log-format json` a worker's line is one JSON object with `worker.id` and `stream`.
#[test]
fn json_log_worker_lines_carry_worker_id_and_stream() {
    let b = Primary::builder()
        .workers(1)
        .args(&["--log-format", "json"]);
    let script = b.temp_dir().write_script(
        "talk.sh",
        &format!(
            "#!/bin/sh\necho 'json from the worker'\nexec '{}'\n",
            hello_worker()
        ),
    );
    let p = b.cmd(&[script.display().to_string()]).start();
    let line = p.wait_for_line("the worker's line", STARTUP, |l| {
        l.contains("json from the worker")
    });
    let v: serde_json::Value = serde_json::from_str(&line.text)
        .unwrap_or_else(|e| panic!("not one JSON object ({e}): {}", line.text));
    assert_eq!(v["fields"]["worker.id"], 1, "{v}");
    assert_eq!(v["fields"]["stream"], "stdout", "{v}");
    assert_eq!(
        v["fields"]["message"], "worker 1 stdout| json from the worker",
        "{v}"
    );
}
