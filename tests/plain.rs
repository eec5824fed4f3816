//! `--plain`: workers that speak no channel protocol (any socket-activated server), from
//! outside, with a standard-library Python server that reads `LISTEN_FDS` (the fast path of the
//! suite; the real gunicorn and uvicorn have tests of their own where pip can install them).

mod common;

use common::*;
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

const PLAIN_PY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/workers/plain_server.py");

macro_rules! require_python3 {
    () => {
        if !installed("python3") {
            eprintln!("skipped: python3 is not installed");
            return;
        }
    };
}

fn plain(policy: &str, extra: &[&str]) -> PrimaryBuilder {
    let mut args = vec!["--plain", "--policy", policy];
    args.extend(extra);
    Primary::builder()
        .workers(2)
        .args(&args)
        .cmd(&["python3", PLAIN_PY])
}

/// Sequential requests, one connection each; the worker ids and pids that answered.
fn serve(p: &Primary, n: usize) -> (BTreeSet<u32>, BTreeSet<i32>) {
    let (mut ids, mut pids) = (BTreeSet::new(), BTreeSet::new());
    for i in 0..n {
        let r = get(p.addr(), "/whoami").unwrap_or_else(|e| panic!("request {i}: {e}"));
        assert_eq!(r.status, 200, "request {i}");
        ids.insert(r.worker_id().expect("x-worker-id"));
        let v: serde_json::Value = serde_json::from_slice(&r.body).expect("JSON body");
        pids.insert(v["pid"].as_i64().expect("pid") as i32);
    }
    (ids, pids)
}

fn status(p: &Primary) -> serde_json::Value {
    let out = p.client(&["status", "--json"]);
    assert!(out.status.success(), "{}", describe(&["status"], &out));
    serde_json::from_slice(&out.stdout).expect("status JSON")
}

fn plain_worker_is_online_serves_and_reports_only_what_it_knows(policy: &str) {
    require_python3!();
    let p = plain(policy, &["--ready-timeout", "1s"]).start();
    p.wait_ready();
    // Online as soon as it runs, whatever --ready-timeout says: nothing waits for a READY that
    // a plain worker never sends.
    let t = Instant::now();
    let (ids, _) = serve(&p, 40);
    // Past --ready-timeout: the window in which a worker waiting for READY would be killed (a
    // measuring window, not a synchronisation).
    std::thread::sleep(Duration::from_millis(1500).saturating_sub(t.elapsed()));
    assert_eq!(p.count("not ready"), 0, "{}", p.log());
    assert_eq!(p.count("killing worker"), 0, "{}", p.log());
    if policy == "reuseport" {
        assert_eq!(ids, BTreeSet::from([1, 2]), "both workers serve");
    }
    let doc = status(&p);
    for w in doc["workers"].as_array().unwrap() {
        assert_eq!(w["state"], "online", "{w}");
        // Promise 10: figures roundhouse cannot see are null, not 0.
        assert!(w["requests_total"].is_null(), "{w}");
        assert!(w["connections_active"].is_null(), "{w}");
        assert!(w["connections_total"].is_null(), "{w}");
    }
    assert!(doc["fairness"].is_null(), "{doc}");
    let table = p.client(&["status"]);
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(text.contains("fairness: unknown"), "{text}");
}

#[test]
fn plain_workers_under_none_are_online_at_exec_and_figures_are_null() {
    plain_worker_is_online_serves_and_reports_only_what_it_knows("none");
}

#[test]
fn plain_workers_under_reuseport_are_online_at_exec_and_figures_are_null() {
    plain_worker_is_online_serves_and_reports_only_what_it_knows("reuseport");
}

#[test]
fn plain_workers_reload_under_load_without_a_failed_request() {
    require_python3!();
    let p = plain("reuseport", &[]).start();
    p.wait_ready();
    let (_, before) = serve(&p, 10);
    let load = Load::start(p.addr(), 4, "/whoami", LoadMode::PerRequest);
    assert!(load.wait_ok(50, STARTUP), "no progress");
    for round in 0..2 {
        let out = p.client(&["reload"]);
        assert!(
            out.status.success(),
            "reload {round}: {}",
            describe(&["reload"], &out)
        );
    }
    let ok = load.snapshot().ok;
    assert!(load.wait_ok(ok + 50, STARTUP), "no progress after reloads");
    let report = load.finish();
    let (_, after) = serve(&p, 10);
    eprintln!(
        "FIGURE plain reuseport: 2 reloads under connection-per-request load: ok={} failed={}",
        report.ok,
        report.failures.len()
    );
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    assert!(before.is_disjoint(&after), "{before:?} {after:?}");
}

/// Issue 14, item 2: every signal that stops a worker goes to its process group, so a child the
/// worker started itself (gunicorn's workers, a shell's background job) does not outlive it.
#[test]
fn a_plain_workers_own_children_are_gone_after_stop() {
    require_python3!();
    let b = plain("none", &["--grace", "5s"]);
    let pidfile = b.temp_dir().join("child");
    let mut p = b
        .env("PLAIN_CHILD_PIDFILE", pidfile.to_str().unwrap())
        .start();
    p.wait_ready();
    serve(&p, 4);
    let dir = pidfile.parent().unwrap().to_path_buf();
    let children = || -> Vec<i32> {
        std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("child."))
            .filter_map(|e| std::fs::read_to_string(e.path()).ok()?.trim().parse().ok())
            .collect()
    };
    assert!(
        wait_until(STARTUP, Duration::from_millis(20), || children().len() == 2),
        "each worker wrote its child's pid"
    );
    let kids = children();
    assert!(kids.iter().all(|&k| pid_alive(k)));
    p.signal(nix::sys::signal::Signal::SIGTERM);
    let t = Instant::now();
    let status = p.wait_exit(Duration::from_secs(15));
    assert!(status.success(), "{status:?}\n{}", p.log());
    let gone = wait_until(Duration::from_secs(5), Duration::from_millis(10), || {
        kids.iter().all(|&k| !pid_alive(k))
    });
    eprintln!(
        "FIGURE plain: the workers' own children gone {:.2}s after SIGTERM to the primary",
        t.elapsed().as_secs_f64()
    );
    assert!(gone, "the workers' children {kids:?} outlived them");
}

#[test]
fn plain_with_a_handoff_policy_is_a_usage_error() {
    for policy in ["rr", "least-conn"] {
        let out = roundhouse(&[
            "run",
            "--plain",
            "--policy",
            policy,
            "-l",
            "127.0.0.1:0",
            "--",
            "/bin/true",
        ]);
        assert_eq!(out.status.code(), Some(2), "{}", describe(&["run"], &out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("--plain") && err.contains(policy),
            "{policy}: {err}"
        );
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    }
}

/// Issue 16, item 4: a worker whose RSS goes over `--max-memory` is recycled gracefully (its
/// replacement online first), logged with its RSS; the other worker is left alone.
#[test]
fn a_worker_over_max_memory_is_recycled() {
    require_python3!();
    let p = plain("reuseport", &["--max-memory", "64MiB"]).start();
    p.wait_ready();
    let pids = p.worker_pids();
    // Grow whichever worker answers by 100 MiB.
    let r = get(p.addr(), "/grow?mb=100").expect("grow");
    let grown = r.worker_id().expect("x-worker-id");
    let old = pids[&grown];
    let line = p.wait_for_line("the over-memory line", STARTUP, |l| {
        l.contains("over --max-memory") && l.field_as::<i32>("worker.pid") == Some(old)
    });
    assert!(
        line.field_as::<u64>("rss_mib").is_some_and(|m| m >= 64),
        "{}",
        line.text
    );
    let new = p.wait_worker_online(grown, Some(old), STARTUP);
    assert_ne!(new, old);
    let other = if grown == 1 { 2 } else { 1 };
    assert_eq!(
        p.worker_pids()[&other],
        pids[&other],
        "the other worker was left alone"
    );
    // The old one drains and exits; the slot serves on.
    assert!(wait_until(STARTUP, Duration::from_millis(20), || {
        !pid_alive(old)
    }));
    serve(&p, 4);
}
