//! `--policy reuseport-rr`: strict round-robin chosen in the kernel by an eBPF `SK_REUSEPORT`
//! program, from outside: exact rotation, skip and rejoin around a killed worker, scale-down
//! under load with no socket error, and the one-line error without `CAP_BPF`.
//!
//! The policy needs `CAP_BPF` (CI runs as root). Where the kernel refuses BPF altogether, each
//! test says so and skips; a missing capability is not a reason to skip, it is what the last
//! test checks.

mod common;

use common::*;
use nix::sys::signal::Signal;
use std::collections::BTreeMap;
use std::time::Duration;

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// Starts a primary under reuseport-rr, or `None` (printed) where the kernel cannot run it.
fn start_rr(workers: usize, extra: &[&str]) -> Option<Primary> {
    let mut args = vec!["--policy", "reuseport-rr"];
    args.extend(extra);
    ready_unless_bpf_refused(Primary::builder().workers(workers).args(&args).start())
}

/// Sequential requests, one connection each: who served them.
fn served(p: &Primary, n: usize) -> BTreeMap<u32, usize> {
    let mut by = BTreeMap::new();
    for i in 0..n {
        let r = get(p.addr(), "/").unwrap_or_else(|e| panic!("request {i}: {e}"));
        assert_eq!(r.status, 200, "request {i}");
        *by.entry(r.worker_id().expect("x-worker-id")).or_default() += 1;
    }
    by
}

fn stats(p: &Primary) -> serde_json::Value {
    let out = p.client(&["status", "--json"]);
    assert!(out.status.success(), "{}", describe(&["status"], &out));
    serde_json::from_slice(&out.stdout).expect("status JSON")
}

#[test]
fn two_hundred_sequential_connections_over_four_workers_are_fifty_each() {
    let Some(p) = start_rr(4, &[]) else { return };
    let by = served(&p, 200);
    eprintln!("FIGURE reuseport-rr 200 sequential connections over 4 workers: {by:?}");
    assert_eq!(by.values().copied().collect::<Vec<_>>(), [50, 50, 50, 50]);
    // The kernel's own counts are the workers' connections_total.
    let doc = stats(&p);
    assert_eq!(doc["policy"], "reuseport-rr");
    for w in doc["workers"].as_array().unwrap() {
        assert_eq!(w["connections_total"], 50, "{w}");
    }
    assert_eq!(doc["fairness"]["jain"], 1.0);
}

#[test]
fn a_killed_worker_is_skipped_and_rejoins_when_back_online() {
    let Some(p) = start_rr(3, &[]) else { return };
    p.wait_ready();
    let old = p.worker_pids()[&2];
    signal_pid(old, Signal::SIGKILL);
    p.wait_for_log("worker exited", secs(10));
    // While slot 2 restarts, nothing is steered to it: every request is served at once by the
    // others (a connection queued on its listener would wait for the restart).
    let by = served(&p, 20);
    let new = p.wait_worker_online(2, Some(old), STARTUP);
    assert!(new != old);
    // Back online: the rotation is exact over all three again.
    let again = served(&p, 30);
    eprintln!(
        "FIGURE reuseport-rr skip and rejoin: while slot 2 restarted {by:?}; after {again:?}"
    );
    assert_eq!(again.values().copied().collect::<Vec<_>>(), [10, 10, 10]);
}

#[test]
fn scaling_down_and_up_under_load_resets_no_connection() {
    let Some(p) = start_rr(4, &[]) else { return };
    scale_cycles_lose_nothing(&p, "reuseport-rr");
}

/// Plain `reuseport` gets the migration half of the program: a slot scaled away no longer
/// resets the connections the kernel had queued on its listener.
#[test]
fn plain_reuseport_scaling_down_under_load_resets_no_connection() {
    let p = Primary::builder()
        .workers(4)
        .args(&["--policy", "reuseport"])
        .start();
    p.wait_ready();
    if p.count("migration program could not be attached") > 0 {
        eprintln!("skipped: no BPF here:\n{}", p.log());
        return;
    }
    scale_cycles_lose_nothing(&p, "reuseport");
}

fn scale_cycles_lose_nothing(p: &Primary, policy: &str) {
    p.wait_ready();
    let load = Load::start(p.addr(), 4, "/", LoadMode::PerRequest);
    assert!(load.wait_ok(100, STARTUP), "no progress");
    for cycle in 0..4 {
        for n in ["2", "4"] {
            let out = p.client(&["scale", n]);
            assert!(
                out.status.success(),
                "cycle {cycle}: {}",
                describe(&["scale", n], &out)
            );
        }
        let before = load.snapshot().ok;
        assert!(
            load.wait_ok(before + 50, STARTUP),
            "no progress after cycle {cycle}"
        );
    }
    let report = load.finish();
    eprintln!(
        "FIGURE {policy} 4 cycles of scale 4->2->4 under connection-per-request load: ok={} \
         failed={}",
        report.ok,
        report.failures.len()
    );
    assert!(report.failures.is_empty(), "{:?}", report.failures);
}

#[test]
fn without_cap_bpf_it_exits_1_naming_the_capability() {
    if !common::installed("setpriv") {
        eprintln!("skipped: setpriv (util-linux) is not installed");
        return;
    }
    let b = Primary::builder()
        .workers(1)
        .args(&["--policy", "reuseport-rr"]);
    let mut args: Vec<String> = [
        "--bounding-set=-all",
        "--inh-caps=-all",
        "--ambient-caps=-all",
        "--",
        roundhouse_bin(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(b.run_args());
    let mut p = b.start_program("setpriv", &args);
    let status = p.wait_exit(secs(15));
    let log = p.log();
    if log.contains("this kernel cannot run reuseport-rr") {
        eprintln!("skipped: the kernel refuses BPF here:\n{log}");
        return;
    }
    assert_eq!(status.code(), Some(1), "{log}");
    let line = log
        .lines()
        .find(|l| l.contains("CAP_BPF"))
        .unwrap_or_else(|| panic!("no line names CAP_BPF:\n{log}"));
    assert!(line.contains("--policy rr"), "{line}");
    eprintln!("FIGURE reuseport-rr without CAP_BPF: {line}");
}
