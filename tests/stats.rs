//! End-to-end tests of issue 3: dispatch policies, live per-worker statistics with fairness
//! figures, the admin endpoint (`/stats`, `/stats/reset`, `/metrics`, `/healthz`), the control
//! socket and `roundhouse status` / `send`. The real `roundhouse` primary with real
//! `hello-worker`s, over loopback, asserting what a client sees.
//!
//! Worker statistics arrive batched (a worker reports at most every 100 ms), so every check of a
//! counter polls `/stats` with a deadline until the expected figure appears ([`wait_stats`]);
//! a counter that overshoots never matches and the test fails showing the last document.

mod common;

use common::*;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::thread;
use std::time::Duration;

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// How long batched worker statistics may take to show in `/stats`.
const SETTLE: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// Admin endpoint helpers
// ---------------------------------------------------------------------------------------------

fn admin_request(admin: SocketAddr, method: &str, path: &str) -> Response {
    request(admin, method, path, b"")
        .unwrap_or_else(|e| panic!("{method} {path} on the admin endpoint {admin}: {e}"))
}

/// `GET /stats`, which must be 200 JSON.
fn stats(admin: SocketAddr) -> Value {
    let r = admin_request(admin, "GET", "/stats");
    assert_eq!(r.status, 200, "GET /stats → {r:?}");
    assert!(
        r.header("content-type")
            .is_some_and(|v| v.starts_with("application/json")),
        "GET /stats content-type: {r:?}"
    );
    r.json()
}

/// `POST /stats/reset`, which must be 200.
fn reset(admin: SocketAddr) {
    let r = admin_request(admin, "POST", "/stats/reset");
    assert_eq!(r.status, 200, "POST /stats/reset → {r:?}");
}

/// Polls `/stats` until `pred` holds; returns that document. Panics after `timeout` with the
/// last document seen.
fn wait_stats(
    admin: SocketAddr,
    what: &str,
    timeout: Duration,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let mut last = Value::Null;
    let ok = wait_until(timeout, Duration::from_millis(25), || {
        last = stats(admin);
        pred(&last)
    });
    if !ok {
        panic!("waiting {timeout:?} for /stats where {what}; last document:\n{last:#}");
    }
    last
}

/// A non-negative integer field.
fn num(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("`{key}` is not a non-negative integer in {v}"))
}

fn float(v: &Value, key: &str) -> f64 {
    v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("`{key}` is not a number in {v}"))
}

fn workers(s: &Value) -> &Vec<Value> {
    s["workers"]
        .as_array()
        .unwrap_or_else(|| panic!("no `workers` array in {s}"))
}

/// The entry of slot `id`.
fn worker(s: &Value, id: u32) -> &Value {
    workers(s)
        .iter()
        .find(|w| w["id"].as_u64() == Some(u64::from(id)))
        .unwrap_or_else(|| panic!("no worker {id} in {s}"))
}

fn total(s: &Value, key: &str) -> u64 {
    num(&s["totals"], key)
}

/// Slot id → `key` for every slot.
fn per_worker(s: &Value, key: &str) -> BTreeMap<u32, u64> {
    workers(s)
        .iter()
        .map(|w| (num(w, "id") as u32, num(w, key)))
        .collect()
}

/// A worker entry without its `rss_bytes` (which moves on its own).
fn without_rss(w: &Value) -> Value {
    let mut w = w.clone();
    if let Some(o) = w.as_object_mut() {
        o.remove("rss_bytes");
    }
    w
}

fn active_sum(s: &Value) -> u64 {
    per_worker(s, "connections_active").values().sum()
}

/// Every connection and request of the load counted, nothing open any more.
fn settled(s: &Value, n: u64) -> bool {
    total(s, "connections_total") == n && total(s, "requests_total") == n && active_sum(s) == 0
}

/// Waits until `/stats` counts exactly `n` connections and `n` requests, none open.
fn wait_settled(admin: SocketAddr, n: u64) -> Value {
    wait_stats(
        admin,
        &format!("totals are {n} connections and {n} requests, none active"),
        SETTLE,
        |s| settled(s, n),
    )
}

fn close_to(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * (1.0 + a.abs().max(b.abs()))
}

/// Jain's index, max/min ratio and coefficient of variation of `xs`, by the definitions of
/// `docs/control.md` (all zero: 1, 1, 0; a zero minimum with a positive maximum: max + 1).
fn expected_fairness(xs: &[u64]) -> (f64, f64, f64) {
    let n = xs.len() as f64;
    let sum: f64 = xs.iter().map(|&x| x as f64).sum();
    let sum_sq: f64 = xs.iter().map(|&x| (x as f64).powi(2)).sum();
    let jain = if sum_sq == 0.0 {
        1.0
    } else {
        sum * sum / (n * sum_sq)
    };
    let max = xs.iter().copied().max().unwrap_or(0) as f64;
    let min = xs.iter().copied().min().unwrap_or(0) as f64;
    let ratio = if max == 0.0 {
        1.0
    } else if min == 0.0 {
        max + 1.0
    } else {
        max / min
    };
    let cv = if sum == 0.0 {
        0.0
    } else {
        let mean = sum / n;
        (xs.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n).sqrt() / mean
    };
    (jain, ratio, cv)
}

/// `fairness` of the document equals what its per-worker `connections_total` give, and
/// `totals` are the sums of the per-worker figures.
fn assert_figures_consistent(s: &Value) {
    let xs: Vec<u64> = workers(s)
        .iter()
        .map(|w| num(w, "connections_total"))
        .collect();
    let (jain, ratio, cv) = expected_fairness(&xs);
    let f = &s["fairness"];
    assert_eq!(f["metric"], "connections_total", "fairness metric in {s}");
    for (key, want) in [("jain", jain), ("max_min_ratio", ratio), ("cv", cv)] {
        let got = float(f, key);
        assert!(
            close_to(got, want),
            "fairness.{key} is {got}, but the per-worker connections_total {xs:?} give {want}; document: {s}"
        );
    }
    for key in ["connections_total", "requests_total", "connections_lost"] {
        let sum: u64 = per_worker(s, key).values().sum();
        assert_eq!(
            total(s, key),
            sum,
            "totals.{key} vs the per-worker sum in {s}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Load
// ---------------------------------------------------------------------------------------------

/// `threads` clients, each sending `per_thread` connection-per-request `GET /`; every response
/// must be `200 hello world\n` with an `x-worker-id`. Returns how many requests each worker id
/// served.
fn load(addr: SocketAddr, threads: usize, per_thread: usize) -> BTreeMap<u32, u64> {
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            thread::spawn(move || {
                let mut ids = Vec::new();
                let mut failures = Vec::new();
                for i in 0..per_thread {
                    match get(addr, "/") {
                        Ok(r) if r.status == 200 && r.text() == "hello world\n" => {
                            match r.worker_id() {
                                Some(id) => ids.push(id),
                                None => failures.push(format!("t{t}#{i}: no x-worker-id: {r:?}")),
                            }
                        }
                        Ok(r) => failures.push(format!("t{t}#{i}: {r:?}")),
                        Err(e) => failures.push(format!("t{t}#{i}: {e}")),
                    }
                }
                (ids, failures)
            })
        })
        .collect();
    let mut per = BTreeMap::new();
    let mut failures = Vec::new();
    for h in handles {
        let (ids, f) = h.join().expect("a client thread panicked");
        for id in ids {
            *per.entry(id).or_insert(0u64) += 1;
        }
        failures.extend(f);
    }
    assert!(
        failures.is_empty(),
        "{} of {} requests failed; first ones: {:#?}",
        failures.len(),
        threads * per_thread,
        &failures[..failures.len().min(5)]
    );
    per
}

fn start_with_admin(policy: &str, workers: usize) -> (Primary, SocketAddr, SocketAddr) {
    let p = Primary::builder()
        .workers(workers)
        .args(&["--policy", policy, "--admin", "127.0.0.1:0"])
        .start();
    p.wait_ready();
    let (addr, admin) = (p.addr(), p.admin_addr());
    (p, addr, admin)
}

// ---------------------------------------------------------------------------------------------
// Policies and counting
// ---------------------------------------------------------------------------------------------

/// Under `policy`, three workers serve concurrent connection-per-request load with zero
/// failures; `/stats` names the policy; after `POST /stats/reset` and N requests it counts
/// exactly N connections and N requests, slot by slot as the clients saw them.
fn policy_serves_and_counts_exactly(policy: &str) {
    let (p, addr, admin) = start_with_admin(policy, 3);
    let s = stats(admin);
    let first = s.clone();
    assert_eq!(s["policy"], policy, "/stats policy: {s}");
    assert_eq!(
        s["listeners"],
        serde_json::json!([addr.to_string()]),
        "/stats listeners: {s}"
    );
    let logged = p.worker_pids();
    let ids: Vec<u64> = workers(&s).iter().map(|w| num(w, "id")).collect();
    assert_eq!(ids, [1, 2, 3], "slot ids in {s}");
    for w in workers(&s) {
        let id = num(w, "id") as u32;
        assert_eq!(w["state"], "online", "worker {id} state in {s}");
        assert_eq!(
            num(w, "pid") as i32,
            logged[&id],
            "worker {id}'s pid in /stats vs the log; {s}"
        );
        assert!(num(w, "rss_bytes") > 0, "worker {id} rss_bytes in {s}");
    }
    check_listen_fds(&p, policy);

    // Warm-up, counted, then zeroed.
    load(addr, 2, 10);
    wait_settled(admin, 20);
    reset(admin);
    let s = stats(admin);
    assert_eq!(
        (total(&s, "connections_total"), total(&s, "requests_total")),
        (0, 0),
        "after POST /stats/reset: {s}"
    );
    for w in workers(&s) {
        for key in ["connections_total", "requests_total", "connections_lost"] {
            assert_eq!(num(w, key), 0, "{key} after reset: {s}");
        }
    }
    assert_figures_consistent(&s);

    let (threads, per_thread) = (4, 30);
    let n = (threads * per_thread) as u64;
    let seen = load(addr, threads, per_thread);
    let s = wait_settled(admin, n);
    assert_eq!(s["policy"], policy);
    // Each slot counts exactly the connections (one request each) its worker answered.
    let mut expected: BTreeMap<u32, u64> = (1..=3).map(|id| (id, 0)).collect();
    expected.extend(seen);
    assert_eq!(
        per_worker(&s, "connections_total"),
        expected,
        "per-slot connections_total vs the x-worker-id the clients saw; {s}"
    );
    assert_eq!(
        per_worker(&s, "requests_total"),
        expected,
        "per-slot requests_total vs the x-worker-id the clients saw; {s}"
    );
    assert_eq!(total(&s, "connections_lost"), 0, "{s}");
    assert_figures_consistent(&s);
    // Nothing trickles in afterwards (the next report interval has long passed by now).
    let again = wait_settled(admin, n);
    assert_eq!(per_worker(&again, "connections_total"), expected);
    assert!(
        float(&again, "uptime_s") > float(&first, "uptime_s"),
        "uptime_s does not grow: {} then {}",
        first["uptime_s"],
        again["uptime_s"]
    );
    eprintln!("{policy}: per-slot connections {expected:?}");
}

/// Under `none` and `reuseport` every worker gets its listener the systemd way (`LISTEN_FDS=1`,
/// `LISTEN_PID` = its pid, the socket at fd 3): the same socket for all under `none`, one per
/// slot under `reuseport`. Handoff policies pass no listener.
fn check_listen_fds(p: &Primary, policy: &str) {
    let mut sockets = BTreeSet::new();
    for (id, pid) in p.worker_pids() {
        let env: BTreeMap<String, String> = environ_of(pid)
            .unwrap_or_else(|| panic!("cannot read worker {id}'s environment"))
            .into_iter()
            .collect();
        assert_eq!(
            env.get("ROUNDHOUSE_POLICY").map(String::as_str),
            Some(policy),
            "worker {id}'s ROUNDHOUSE_POLICY"
        );
        match policy {
            "none" | "reuseport" => {
                assert_eq!(
                    env.get("LISTEN_FDS").map(String::as_str),
                    Some("1"),
                    "{policy}: worker {id}'s LISTEN_FDS"
                );
                assert_eq!(
                    env.get("LISTEN_PID"),
                    Some(&pid.to_string()),
                    "{policy}: worker {id}'s LISTEN_PID"
                );
                assert_eq!(
                    env.get("LISTEN_FDNAMES").map(String::as_str),
                    Some("listen0"),
                    "{policy}: worker {id}'s LISTEN_FDNAMES"
                );
                let fds = fd_targets(pid).unwrap_or_else(|e| panic!("fds of worker {id}: {e}"));
                let fd3 = fds
                    .get(&3)
                    .unwrap_or_else(|| panic!("{policy}: worker {id} has no fd 3: {fds:?}"));
                assert!(fd3.starts_with("socket:["), "{policy}: fd 3 is {fd3}");
                sockets.insert(fd3.clone());
            }
            _ => assert!(
                !env.contains_key("LISTEN_FDS"),
                "{policy}: worker {id} got LISTEN_FDS={:?}",
                env["LISTEN_FDS"]
            ),
        }
    }
    match policy {
        "none" => assert_eq!(
            sockets.len(),
            1,
            "none: every worker shares one listener: {sockets:?}"
        ),
        "reuseport" => assert_eq!(
            sockets.len(),
            p.worker_pids().len(),
            "reuseport: one listener per slot: {sockets:?}"
        ),
        _ => {}
    }
}

#[test]
fn rr_serves_concurrent_load_and_counts_exactly() {
    policy_serves_and_counts_exactly("rr");
}

#[test]
fn least_conn_serves_concurrent_load_and_counts_exactly() {
    policy_serves_and_counts_exactly("least-conn");
}

#[test]
fn none_serves_concurrent_load_and_counts_exactly() {
    policy_serves_and_counts_exactly("none");
}

#[test]
fn reuseport_serves_concurrent_load_and_counts_exactly() {
    policy_serves_and_counts_exactly("reuseport");
}

#[test]
fn the_policy_comes_from_the_flag_else_from_roundhouse_sched_policy() {
    for (env, flag, want) in [
        ("least-conn", None, "least-conn"),
        ("none", Some("reuseport"), "reuseport"),
    ] {
        let mut b = Primary::builder()
            .workers(1)
            .args(&["--admin", "127.0.0.1:0"])
            .env("ROUNDHOUSE_SCHED_POLICY", env);
        if let Some(f) = flag {
            b = b.args(&["--policy", f]);
        }
        let p = b.start();
        p.wait_ready();
        let s = stats(p.admin_addr());
        assert_eq!(
            s["policy"], want,
            "ROUNDHOUSE_SCHED_POLICY={env} --policy {flag:?}: {s}"
        );
        load(p.addr(), 1, 3);
    }
    // An unknown policy is a usage error, from the flag or from the environment.
    let dir = TempDir::new();
    let ctl = dir.join("ctl.sock").display().to_string();
    let worker = hello_worker();
    for (env, flag) in [(None, Some("bogus")), (Some("bogus"), None)] {
        let mut args = vec!["run", "-l", "127.0.0.1:0", "-w", "1", "--control", &ctl];
        if let Some(f) = flag {
            args.extend(["--policy", f]);
        }
        args.extend(["--", &worker]);
        let env: Vec<(&str, &str)> = env
            .map(|e| ("ROUNDHOUSE_SCHED_POLICY", e))
            .into_iter()
            .collect();
        let out = roundhouse_with(&args, &env, CLI_TIMEOUT);
        let d = format!("ROUNDHOUSE_SCHED_POLICY={env:?}\n{}", describe(&args, &out));
        assert_eq!(out.status.code(), Some(2), "{d}");
        assert!(
            stderr(&out).contains("bogus"),
            "the error names the value: {d}"
        );
    }
}

#[test]
fn rr_spreads_concurrent_connection_per_request_load_evenly() {
    let (_p, addr, admin) = start_with_admin("rr", 4);
    reset(admin);
    let seen = load(addr, 8, 50);
    let s = wait_settled(admin, 400);
    assert_eq!(
        per_worker(&s, "connections_total"),
        seen,
        "per-slot connections_total vs what the clients saw; {s}"
    );
    assert_figures_consistent(&s);
    let jain = float(&s["fairness"], "jain");
    assert!(
        jain >= 0.99,
        "rr with 4 equal workers: Jain {jain} < 0.99; per slot {:?}",
        per_worker(&s, "connections_total")
    );
}

/// The figures are checked where they are not trivially perfect: one connection on three
/// slots (a slot has everything, the others nothing), then five.
#[test]
fn fairness_figures_follow_uneven_per_worker_counts() {
    let (_p, addr, admin) = start_with_admin("rr", 3);
    reset(admin);
    let s = stats(admin);
    assert_figures_consistent(&s);
    let f = &s["fairness"];
    assert_eq!(
        (float(f, "jain"), float(f, "max_min_ratio"), float(f, "cv")),
        (1.0, 1.0, 0.0),
        "no connection yet: {s}"
    );

    load(addr, 1, 1);
    let s = wait_settled(admin, 1);
    assert_figures_consistent(&s);
    let f = &s["fairness"];
    // [1, 0, 0] in some order: Jain 1/3, max/min reported as max + 1 = 2, cv sqrt(2).
    assert!(close_to(float(f, "jain"), 1.0 / 3.0), "{s}");
    assert!(close_to(float(f, "max_min_ratio"), 2.0), "{s}");
    assert!(close_to(float(f, "cv"), 2f64.sqrt()), "{s}");

    load(addr, 1, 4);
    let s = wait_settled(admin, 5);
    assert_figures_consistent(&s);
    assert!(float(&s["fairness"], "jain") < 1.0, "5 over 3 slots: {s}");
}

/// Opens a keep-alive connection and has one request served on it; returns it and the id of
/// the worker that holds it.
fn held_connection(addr: SocketAddr, what: &str) -> (HttpConn, u32) {
    let mut c = HttpConn::connect(addr).unwrap_or_else(|e| panic!("{what}: connect: {e}"));
    let r = c
        .get("/")
        .unwrap_or_else(|e| panic!("{what}: keep-alive GET: {e}"));
    assert_eq!(r.status, 200, "{what}: {r:?}");
    let id = r.worker_id().expect("x-worker-id");
    (c, id)
}

/// Under `least-conn` a new connection goes to a worker with the fewest open connections, not
/// to the next in rotation: with one connection held open on worker A and rotation pointing at
/// A again, the next two held connections go to the two other workers.
#[test]
fn least_conn_hands_off_to_the_worker_with_fewest_open_connections() {
    let (_p, addr, admin) = start_with_admin("least-conn", 3);
    let (c1, a) = held_connection(addr, "first held connection");
    // Two short connections: under plain rotation the next one would be A's turn again.
    load(addr, 1, 2);
    let mut want: BTreeMap<u32, u64> = (1..=3).map(|id| (id, 0)).collect();
    want.insert(a, 1);
    wait_stats(
        admin,
        &format!("only worker {a}'s connection is open"),
        SETTLE,
        |s| per_worker(s, "connections_active") == want && total(s, "requests_total") == 3,
    );
    let (c2, b) = held_connection(addr, "second held connection");
    assert_ne!(
        b, a,
        "least-conn: worker {a} has an open connection, the others none, yet it got the next"
    );
    want.insert(b, 1);
    wait_stats(admin, "two workers hold one connection each", SETTLE, |s| {
        per_worker(s, "connections_active") == want
    });
    let (c3, c) = held_connection(addr, "third held connection");
    assert!(
        c != a && c != b,
        "least-conn: workers {a} and {b} hold a connection each, worker {c} got the third"
    );
    drop((c1, c2, c3));
    wait_stats(admin, "no connection active", SETTLE, |s| {
        active_sum(s) == 0
    });
}

/// A connection its worker acknowledged and still held when the worker was SIGKILLed is counted
/// in the slot's `connections_lost` (and no longer active).
fn open_connection_of_a_killed_worker_is_counted_lost(policy: &str) {
    let (p, addr, admin) = start_with_admin(policy, 2);
    let (mut conn, id) = held_connection(addr, "held connection");
    let mut want: BTreeMap<u32, u64> = (1..=2).map(|id| (id, 0)).collect();
    want.insert(id, 1);
    wait_stats(admin, "the held connection is active", SETTLE, |s| {
        per_worker(s, "connections_active") == want && total(s, "requests_total") == 1
    });
    let pid = p.worker_pids()[&id];
    signal_pid(pid, Signal::SIGKILL);
    // The client sees its connection end.
    assert!(
        conn.get("/").is_err(),
        "the connection survived its worker's SIGKILL"
    );
    let s = wait_stats(
        admin,
        &format!("slot {id} counts the connection lost"),
        SETTLE,
        |s| {
            num(worker(s, id), "connections_lost") == 1
                && total(s, "connections_lost") == 1
                && active_sum(s) == 0
        },
    );
    assert_eq!(
        num(worker(&s, 3 - id), "connections_lost"),
        0,
        "the other slot lost nothing: {s}"
    );
    assert_eq!(total(&s, "connections_total"), 1, "{s}");
    assert_figures_consistent(&s);
    p.wait_worker_online(id, Some(pid), secs(15));
}

#[test]
fn rr_open_connection_of_a_killed_worker_is_counted_lost() {
    open_connection_of_a_killed_worker_is_counted_lost("rr");
}

#[test]
fn none_open_connection_of_a_killed_worker_is_counted_lost() {
    open_connection_of_a_killed_worker_is_counted_lost("none");
}

// ---------------------------------------------------------------------------------------------
// Restarts
// ---------------------------------------------------------------------------------------------

/// SIGKILLs the busiest slot's worker: the slot keeps its `connections_total` and
/// `requests_total`, `restarts` goes up by one, its pid changes, and it counts on from there.
fn slot_counters_survive_a_sigkill(policy: &str) {
    let (p, addr, admin) = start_with_admin(policy, 2);
    load(addr, 2, 10);
    let before = wait_settled(admin, 20);
    let conns = per_worker(&before, "connections_total");
    let (&id, &c) = conns
        .iter()
        .max_by_key(|(id, c)| (**c, std::cmp::Reverse(**id)))
        .unwrap();
    assert!(c > 0, "{before}");
    let w = worker(&before, id).clone();
    let old_pid = num(&w, "pid") as i32;
    assert_eq!(old_pid, p.worker_pids()[&id], "{before}");
    let other = 3 - id;

    signal_pid(old_pid, Signal::SIGKILL);
    let new_pid = p.wait_worker_online(id, Some(old_pid), secs(15));
    let after = wait_stats(
        admin,
        &format!("worker {id} is online again as pid {new_pid}"),
        SETTLE,
        |s| {
            let w = worker(s, id);
            w["pid"].as_u64() == Some(new_pid as u64) && w["state"] == "online"
        },
    );
    let n = worker(&after, id);
    assert_ne!(new_pid, old_pid);
    assert_eq!(
        num(n, "connections_total"),
        num(&w, "connections_total"),
        "{policy}: slot {id}'s connections_total across the restart; before {before}, after {after}"
    );
    assert_eq!(
        num(n, "requests_total"),
        num(&w, "requests_total"),
        "{policy}: slot {id}'s requests_total across the restart; before {before}, after {after}"
    );
    assert_eq!(
        num(n, "restarts"),
        num(&w, "restarts") + 1,
        "{policy}: slot {id}'s restarts; before {before}, after {after}"
    );
    assert_eq!(
        num(n, "connections_lost"),
        0,
        "nothing was open when it died: {after}"
    );
    assert_eq!(
        without_rss(worker(&after, other)),
        without_rss(worker(&before, other)),
        "{policy}: the other slot is untouched; before {before}, after {after}"
    );
    assert_figures_consistent(&after);

    // The slot counts on from where it was.
    let seen = load(addr, 1, 10);
    let s = wait_settled(admin, 30);
    let now = per_worker(&s, "connections_total");
    assert_eq!(
        now[&id],
        conns[&id] + seen.get(&id).copied().unwrap_or(0),
        "{policy}: slot {id} after more load; {s}"
    );
    assert_eq!(num(worker(&s, id), "restarts"), num(&w, "restarts") + 1);
}

#[test]
fn rr_slot_counters_survive_a_sigkill_of_its_worker() {
    slot_counters_survive_a_sigkill("rr");
}

#[test]
fn none_slot_counters_survive_a_sigkill_of_its_worker() {
    slot_counters_survive_a_sigkill("none");
}

// ---------------------------------------------------------------------------------------------
// /metrics
// ---------------------------------------------------------------------------------------------

/// One sample line of the Prometheus text format.
#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// A parsed exposition: family → type, family → help, samples in order.
#[derive(Debug, Default)]
struct Exposition {
    types: BTreeMap<String, String>,
    help: BTreeMap<String, String>,
    samples: Vec<Sample>,
}

impl Exposition {
    /// The value of the sample `name` whose labels are exactly `labels`.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let want: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.samples
            .iter()
            .find(|s| s.name == name && s.labels == want)
            .map(|s| s.value)
    }

    fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.value(name, labels)
            .unwrap_or_else(|| panic!("no sample {name}{labels:?} in /metrics"))
    }
}

fn valid_metric_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn valid_label_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// The family a sample name belongs to, given the declared types: itself, or for histograms and
/// summaries (and OpenMetrics-style counters) the name without its suffix.
fn family_of(name: &str, types: &BTreeMap<String, String>) -> Option<String> {
    if types.contains_key(name) {
        return Some(name.to_string());
    }
    for (suffix, kinds) in [
        ("_bucket", &["histogram"][..]),
        ("_sum", &["histogram", "summary"][..]),
        ("_count", &["histogram", "summary"][..]),
        ("_total", &["counter"][..]),
    ] {
        if let Some(base) = name.strip_suffix(suffix) {
            if types.get(base).is_some_and(|t| kinds.contains(&t.as_str())) {
                return Some(base.to_string());
            }
        }
    }
    None
}

fn parse_value(s: &str) -> Option<f64> {
    match s {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ => s.parse().ok(),
    }
}

/// Parses `{name="value",...}` starting after the `{`; returns the labels and the rest after
/// the `}`.
fn parse_labels(s: &str) -> Result<(BTreeMap<String, String>, &str), String> {
    let mut labels = BTreeMap::new();
    let mut rest = s;
    loop {
        rest = rest.trim_start();
        if let Some(after) = rest.strip_prefix('}') {
            return Ok((labels, after));
        }
        let eq = rest.find('=').ok_or("label without `=`")?;
        let name = rest[..eq].trim();
        if !valid_label_name(name) {
            return Err(format!("bad label name {name:?}"));
        }
        rest = rest[eq + 1..]
            .strip_prefix('"')
            .ok_or_else(|| format!("label {name}'s value is not quoted"))?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next() {
                None => return Err(format!("label {name}'s value is not closed")),
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, '\\')) => value.push('\\'),
                    Some((_, '"')) => value.push('"'),
                    Some((_, 'n')) => value.push('\n'),
                    other => return Err(format!("bad escape {other:?} in label {name}")),
                },
                Some((_, c)) => value.push(c),
            }
        };
        if labels.insert(name.to_string(), value).is_some() {
            return Err(format!("label {name} given twice"));
        }
        rest = rest[end + 1..].trim_start();
        if let Some(after) = rest.strip_prefix(',') {
            rest = after;
        } else if !rest.starts_with('}') {
            return Err("labels not separated by `,` or closed by `}`".into());
        }
    }
}

/// A strict-enough reader of the Prometheus text exposition format (0.0.4): `# HELP name doc`
/// and `# TYPE name type` lines (at most one each per family, TYPE before the family's samples),
/// other `#` lines are comments; sample lines are `name{label="value",...} value [timestamp]`,
/// each sample's family declared by a TYPE line, each family's samples together, no sample
/// twice.
fn parse_prometheus(text: &str) -> Result<Exposition, String> {
    let mut e = Exposition::default();
    let mut finished: BTreeSet<String> = BTreeSet::new();
    let mut current: Option<String> = None;
    let mut seen: BTreeSet<(String, Vec<(String, String)>)> = BTreeSet::new();
    if !text.is_empty() && !text.ends_with('\n') {
        return Err("the text does not end with a newline".into());
    }
    for (no, line) in text.lines().enumerate() {
        let at = |msg: String| format!("line {}: {msg}: {line:?}", no + 1);
        if line.trim().is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            let mut parts = comment.trim_start().splitn(3, ' ');
            match parts.next() {
                Some("HELP") => {
                    let name = parts.next().unwrap_or("");
                    if !valid_metric_name(name) {
                        return Err(at(format!("bad metric name {name:?} in HELP")));
                    }
                    let doc = parts.next().unwrap_or("").to_string();
                    if e.help.insert(name.to_string(), doc).is_some() {
                        return Err(at(format!("second HELP for {name}")));
                    }
                }
                Some("TYPE") => {
                    let name = parts.next().unwrap_or("");
                    if !valid_metric_name(name) {
                        return Err(at(format!("bad metric name {name:?} in TYPE")));
                    }
                    let ty = parts.next().unwrap_or("").trim();
                    if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&ty) {
                        return Err(at(format!("unknown type {ty:?}")));
                    }
                    if e.types.insert(name.to_string(), ty.to_string()).is_some() {
                        return Err(at(format!("second TYPE for {name}")));
                    }
                    if finished.contains(name) || current.as_deref() == Some(name) {
                        return Err(at(format!("TYPE for {name} after its samples")));
                    }
                }
                _ => {} // a comment
            }
            continue;
        }
        let name_end = line
            .find(|c: char| c == '{' || c.is_whitespace())
            .ok_or_else(|| at("a sample without a value".into()))?;
        let name = &line[..name_end];
        if !valid_metric_name(name) {
            return Err(at(format!("bad metric name {name:?}")));
        }
        let (labels, rest) = match line[name_end..].strip_prefix('{') {
            Some(inner) => parse_labels(inner).map_err(at)?,
            None => (BTreeMap::new(), &line[name_end..]),
        };
        let mut fields = rest.split_whitespace();
        let value = fields
            .next()
            .ok_or_else(|| at("a sample without a value".into()))?;
        let value = parse_value(value).ok_or_else(|| at(format!("bad value {value:?}")))?;
        if let Some(ts) = fields.next() {
            ts.parse::<i64>()
                .map_err(|_| at(format!("bad timestamp {ts:?}")))?;
        }
        if fields.next().is_some() {
            return Err(at("trailing fields".into()));
        }
        let family = family_of(name, &e.types)
            .ok_or_else(|| at(format!("sample {name} of an undeclared family (no TYPE)")))?;
        if current.as_deref() != Some(family.as_str()) {
            if finished.contains(&family) {
                return Err(at(format!("the samples of {family} are not together")));
            }
            if let Some(prev) = current.replace(family.clone()) {
                finished.insert(prev);
            }
        }
        let key = (
            name.to_string(),
            labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        );
        if !seen.insert(key) {
            return Err(at("the same sample twice".into()));
        }
        e.samples.push(Sample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    Ok(e)
}

#[test]
fn the_prometheus_parser_accepts_good_text_and_rejects_bad() {
    let good = "# HELP a_total Things.\n# TYPE a_total counter\na_total{w=\"1\"} 3\na_total{w=\"2\",x=\"q\\\"\"} 4 1700000000\n\
                # TYPE b gauge\nb 1.5e3\n# TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_sum 3\nh_count 2\n# EOF\n";
    let e = parse_prometheus(good).unwrap();
    assert_eq!(e.get("a_total", &[("w", "1")]), 3.0);
    assert_eq!(e.get("a_total", &[("w", "2"), ("x", "q\"")]), 4.0);
    assert_eq!(e.get("b", &[]), 1500.0);
    assert_eq!(e.get("h_count", &[]), 2.0);
    for bad in [
        "a 1\n",                                                    // no TYPE
        "# TYPE a gauge\na\n",                                      // no value
        "# TYPE a gauge\na one\n",                                  // not a number
        "# TYPE a gauge\na{w=\"1\" 1\n",                            // unclosed labels
        "# TYPE a gauge\na{w=1} 1\n",                               // unquoted value
        "# TYPE a gauge\na{1w=\"1\"} 1\n",                          // bad label name
        "# TYPE a gauge\n9a 1\n",                                   // bad name
        "# TYPE a gauge\na 1\na 2\n",                               // twice
        "# TYPE a gauge\n# TYPE a counter\na 1\n",                  // two TYPEs
        "# TYPE a gauge\n# TYPE b gauge\na 1\nb 1\na{x=\"1\"} 1\n", // split family
        "# TYPE a summary_ish\na 1\n",                              // unknown type
        "# TYPE a gauge\na 1 2 3\n",                                // trailing field
        "# TYPE a gauge\na 1",                                      // no final newline
    ] {
        assert!(parse_prometheus(bad).is_err(), "accepted: {bad:?}");
    }
}

#[test]
fn metrics_parse_as_prometheus_text_and_match_stats() {
    let (p, addr, admin) = start_with_admin("rr", 2);
    load(addr, 2, 8);
    let s = wait_settled(admin, 16);
    let r = admin_request(admin, "GET", "/metrics");
    assert_eq!(r.status, 200, "GET /metrics → {r:?}");
    assert!(
        r.header("content-type").is_some_and(
            |v| v.starts_with("text/plain") || v.starts_with("application/openmetrics-text")
        ),
        "GET /metrics content-type: {r:?}"
    );
    let text = r.text();
    let m = parse_prometheus(&text).unwrap_or_else(|e| panic!("/metrics: {e}\n{text}"));
    // Nothing moved between the two scrapes (no load), except uptime and rss.
    let again = stats(admin);
    for key in [
        "connections_total",
        "requests_total",
        "connections_active",
        "restarts",
    ] {
        assert_eq!(per_worker(&again, key), per_worker(&s, key), "{key} moved");
    }

    let f = |v: u64| v as f64;
    assert_eq!(m.get("roundhouse_policy_info", &[("policy", "rr")]), 1.0);
    assert_eq!(m.get("roundhouse_workers", &[]), 2.0);
    assert!(m.get("roundhouse_uptime_seconds", &[]) > 0.0);
    let pids = p.worker_pids();
    for w in workers(&s) {
        let id = num(w, "id").to_string();
        let l = [("worker", id.as_str())];
        for (metric, key) in [
            ("roundhouse_worker_connections_total", "connections_total"),
            ("roundhouse_worker_connections_active", "connections_active"),
            ("roundhouse_worker_requests_total", "requests_total"),
            (
                "roundhouse_worker_connections_lost_total",
                "connections_lost",
            ),
            ("roundhouse_worker_restarts_total", "restarts"),
            ("roundhouse_worker_pid", "pid"),
        ] {
            assert_eq!(
                m.get(metric, &l),
                f(num(w, key)),
                "{metric}{{worker={id}}} vs /stats {key}; /stats {s}\n/metrics:\n{text}"
            );
        }
        assert_eq!(
            m.get("roundhouse_worker_pid", &l),
            f(pids[&(num(w, "id") as u32)] as u64)
        );
        assert!(m.get("roundhouse_worker_rss_bytes", &l) > 0.0, "{text}");
        let state = w["state"].as_str().unwrap();
        for st in ["starting", "online", "draining", "stopped"] {
            assert_eq!(
                m.get("roundhouse_worker_state", &[("worker", &id), ("state", st)]),
                if st == state { 1.0 } else { 0.0 },
                "worker {id} state {st}; /stats says {state}"
            );
        }
    }
    for (metric, key) in [
        ("roundhouse_connections_total", "connections_total"),
        ("roundhouse_requests_total", "requests_total"),
        ("roundhouse_connections_lost_total", "connections_lost"),
    ] {
        assert_eq!(m.get(metric, &[]), f(total(&s, key)), "{metric}");
    }
    for (metric, key) in [
        ("roundhouse_fairness_jain", "jain"),
        ("roundhouse_fairness_max_min_ratio", "max_min_ratio"),
        ("roundhouse_fairness_cv", "cv"),
    ] {
        let got = m.get(metric, &[]);
        let want = float(&s["fairness"], key);
        assert!(close_to(got, want), "{metric} {got} vs /stats {want}");
    }
    // Every family has a HELP line too.
    for name in m.types.keys() {
        assert!(m.help.contains_key(name), "no HELP for {name}");
    }
}

// ---------------------------------------------------------------------------------------------
// /stats/reset, unknown paths, /healthz
// ---------------------------------------------------------------------------------------------

#[test]
fn stats_reset_is_post_only_and_unknown_paths_are_404() {
    let (p, addr, admin) = start_with_admin("rr", 2);
    load(addr, 2, 5);
    wait_settled(admin, 10);

    let r = admin_request(admin, "GET", "/stats/reset");
    assert_eq!(r.status, 405, "GET /stats/reset → {r:?}");
    assert!(
        r.header("allow").is_some_and(|a| a.contains("POST")),
        "405 without `Allow: POST`: {r:?}"
    );
    let s = stats(admin);
    assert!(settled(&s, 10), "GET /stats/reset must not reset: {s}");

    for path in ["/nope", "/stats/", "/statsx", "/metrics/x", "/"] {
        let r = admin_request(admin, "GET", path);
        assert_eq!(r.status, 404, "GET {path} → {r:?}");
    }
    let r = admin_request(admin, "POST", "/stats");
    assert_eq!(r.status, 405, "POST /stats → {r:?}");

    reset(admin);
    let s = stats(admin);
    for key in [
        "connections_total",
        "requests_total",
        "connections_lost",
        "restarts",
    ] {
        assert!(
            per_worker(&s, key).values().all(|v| *v == 0),
            "{key} after reset: {s}"
        );
    }
    // The workers themselves are untouched.
    let pids: BTreeMap<u32, i32> = workers(&s)
        .iter()
        .map(|w| (num(w, "id") as u32, num(w, "pid") as i32))
        .collect();
    assert_eq!(pids, p.worker_pids());
    assert!(workers(&s).iter().all(|w| w["state"] == "online"), "{s}");
    load(addr, 1, 3);
    wait_settled(admin, 3);
}

fn healthz(admin: SocketAddr) -> u16 {
    admin_request(admin, "GET", "/healthz").status
}

fn wait_healthz(admin: SocketAddr, want: u16, what: &str) {
    let mut last = 0;
    let ok = wait_until(secs(15), Duration::from_millis(20), || {
        last = healthz(admin);
        last == want
    });
    assert!(
        ok,
        "{what}: /healthz stayed {last}, expected {want}; /stats {}",
        stats(admin)
    );
}

#[test]
fn healthz_is_200_with_a_worker_online_and_503_with_none() {
    let b = Primary::builder()
        .workers(1)
        .args(&["--admin", "127.0.0.1:0"]);
    let gate = Gate::new(b.temp_dir(), "gate");
    let p = b.cmd(&gate.worker_cmd()).start();
    let admin = p.admin_addr();
    let first = p.wait_for_event("worker started", &[("worker.id", "1")], STARTUP);

    // Started but waiting at the gate: not online.
    assert_eq!(p.count("worker online"), 0);
    assert_eq!(healthz(admin), 503, "no worker online yet");
    let s = stats(admin);
    assert!(
        workers(&s).iter().all(|w| w["state"] != "online"),
        "/stats says a worker is online before the gate opened: {s}"
    );

    gate.open();
    p.wait_ready();
    wait_healthz(admin, 200, "worker 1 online");

    // Kill it with the gate closed: its replacement starts but does not come online.
    gate.close();
    let old: i32 = first.field_as("worker.pid").unwrap();
    signal_pid(old, Signal::SIGKILL);
    p.wait_for_event("worker exited", &[("worker.id", "1")], secs(10));
    wait_healthz(admin, 503, "the only worker died");
    assert!(
        workers(&stats(admin))
            .iter()
            .all(|w| w["state"] != "online"),
        "/healthz 503 while /stats shows an online worker"
    );

    gate.open();
    p.wait_worker_online(1, Some(old), secs(15));
    wait_healthz(admin, 200, "worker 1 back online");
}

// ---------------------------------------------------------------------------------------------
// connections_active
// ---------------------------------------------------------------------------------------------

/// Holds four keep-alive connections open: `/stats` shows them active on the slots that served
/// them, and back to zero once they close.
fn connections_active_follows_open_connections(policy: &str) {
    let (_p, addr, admin) = start_with_admin(policy, 2);
    let mut conns = Vec::new();
    let mut expected: BTreeMap<u32, u64> = (1..=2).map(|id| (id, 0)).collect();
    for i in 0..4 {
        let mut c = HttpConn::connect(addr).unwrap_or_else(|e| panic!("connect {i}: {e}"));
        let r = c
            .get("/")
            .unwrap_or_else(|e| panic!("keep-alive GET {i}: {e}"));
        assert_eq!(r.status, 200, "{r:?}");
        *expected
            .get_mut(&r.worker_id().expect("x-worker-id"))
            .unwrap() += 1;
        conns.push(c);
    }
    let s = wait_stats(admin, "the 4 open connections are active", SETTLE, |s| {
        per_worker(s, "connections_active") == expected
            && total(s, "connections_total") == 4
            && total(s, "requests_total") == 4
    });
    assert_figures_consistent(&s);
    // A second request on each keeps them and counts.
    for c in &mut conns {
        assert_eq!(c.get("/").expect("second keep-alive GET").status, 200);
    }
    wait_stats(admin, "8 requests on 4 active connections", SETTLE, |s| {
        per_worker(s, "connections_active") == expected
            && total(s, "connections_total") == 4
            && total(s, "requests_total") == 8
    });
    drop(conns);
    wait_stats(admin, "no connection active", SETTLE, |s| {
        active_sum(s) == 0 && total(s, "connections_total") == 4
    });
}

#[test]
fn rr_connections_active_counts_open_keep_alive_connections() {
    connections_active_follows_open_connections("rr");
}

#[test]
fn none_connections_active_counts_open_keep_alive_connections() {
    connections_active_follows_open_connections("none");
}

// ---------------------------------------------------------------------------------------------
// Control socket and client
// ---------------------------------------------------------------------------------------------

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The same slots with the same pids, states and counters (uptime and rss move on their own).
fn assert_same_stats(a: &Value, b: &Value, what: &str) {
    assert_eq!(a["policy"], b["policy"], "{what}: policy");
    assert_eq!(a["listeners"], b["listeners"], "{what}: listeners");
    assert_eq!(a["totals"], b["totals"], "{what}: totals");
    assert_eq!(a["fairness"], b["fairness"], "{what}: fairness");
    let strip = |s: &Value| -> Vec<Value> { workers(s).iter().map(without_rss).collect() };
    assert_eq!(strip(a), strip(b), "{what}: workers\n{a}\n{b}");
}

#[test]
fn status_table_and_json_agree_with_stats() {
    let (p, addr, admin) = start_with_admin("rr", 3);
    load(addr, 3, 6);
    let s = wait_settled(admin, 18);

    let out = p.client(&["status", "--json"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        describe(&["status", "--json"], &out)
    );
    let j: Value = serde_json::from_str(stdout(&out).trim())
        .unwrap_or_else(|e| panic!("status --json is not JSON ({e}): {}", stdout(&out)));
    assert_same_stats(&s, &j, "status --json vs /stats");
    let keys: Vec<&String> = j.as_object().unwrap().keys().collect();
    for k in [
        "policy",
        "uptime_s",
        "listeners",
        "workers",
        "totals",
        "fairness",
    ] {
        assert!(j.get(k).is_some(), "status --json lacks {k}: {keys:?}");
    }

    let out = p.client(&["status"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        describe(&["status"], &out)
    );
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    let header_at = lines
        .iter()
        .position(|l| l.split_whitespace().next() == Some("ID"))
        .unwrap_or_else(|| panic!("no header line starting with ID:\n{text}"));
    let header: Vec<&str> = lines[header_at].split_whitespace().collect();
    assert_eq!(
        header,
        ["ID", "PID", "STATE", "CONNS", "ACTIVE", "REQUESTS", "LOST", "RESTARTS", "RSS"],
        "status header:\n{text}"
    );
    assert!(
        lines[..header_at]
            .iter()
            .any(|l| l.contains("rr") && l.contains(&addr.to_string())),
        "the summary above the table names the policy and the listener:\n{text}"
    );
    let rows: Vec<Vec<&str>> = lines[header_at + 1..]
        .iter()
        .take_while(|l| {
            l.split_whitespace()
                .next()
                .is_some_and(|t| t.parse::<u32>().is_ok())
        })
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows.len(), workers(&s).len(), "one row per slot:\n{text}");
    for (row, w) in rows.iter().zip(workers(&s)) {
        assert_eq!(
            row.len(),
            10,
            "row {row:?} (the rss is `N.N UNIT`):\n{text}"
        );
        let want = [
            num(w, "id").to_string(),
            num(w, "pid").to_string(),
            w["state"].as_str().unwrap().to_string(),
            num(w, "connections_total").to_string(),
            num(w, "connections_active").to_string(),
            num(w, "requests_total").to_string(),
            num(w, "connections_lost").to_string(),
            num(w, "restarts").to_string(),
        ];
        assert_eq!(
            row[..8],
            want.each_ref().map(String::as_str),
            "row vs /stats {w}:\n{text}"
        );
        assert!(
            row[8].parse::<f64>().is_ok() && ["B", "KiB", "MiB", "GiB"].contains(&row[9]),
            "rss in human units, got {:?}:\n{text}",
            &row[8..]
        );
    }
    let rest = &lines[header_at + 1 + rows.len()..];
    let t = &s["totals"];
    let total_line = format!(
        "total: {} connections, {} requests, {} lost",
        num(t, "connections_total"),
        num(t, "requests_total"),
        num(t, "connections_lost")
    );
    assert!(
        rest.contains(&total_line.as_str()),
        "no `{total_line}`:\n{text}"
    );
    let f = &s["fairness"];
    let fair = format!(
        "jain {:.4}  max/min {:.2}  cv {:.3}",
        float(f, "jain"),
        float(f, "max_min_ratio"),
        float(f, "cv")
    );
    assert!(
        rest.iter()
            .any(|l| l.starts_with("fairness") && l.contains(&fair)),
        "no fairness line with `{fair}`:\n{text}"
    );
}

#[test]
fn control_socket_is_a_0600_socket_of_our_uid() {
    let p = Primary::start(&["-w", "1"]);
    p.wait_ready();
    let path = p.control().to_path_buf();
    assert!(
        wait_until(secs(5), POLL, || path.exists()),
        "no control socket at {}",
        path.display()
    );
    let meta = std::fs::symlink_metadata(&path).unwrap();
    assert!(
        meta.file_type().is_socket(),
        "{} is not a socket",
        path.display()
    );
    assert_eq!(
        meta.mode() & 0o7777,
        0o600,
        "mode of {} is {:o}",
        path.display(),
        meta.mode() & 0o7777
    );
    assert_eq!(meta.uid(), nix::unistd::geteuid().as_raw());
    let out = p.client(&["status"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        describe(&["status"], &out)
    );
}

#[test]
fn a_second_primary_on_the_same_control_path_fails_and_the_first_keeps_serving() {
    let p1 = Primary::start(&["-w", "2"]);
    p1.wait_ready();
    let ctl = p1.control().display().to_string();

    let mut p2 = Primary::start(&["-w", "1", "--control", &ctl]);
    let st = p2.wait_exit(secs(15));
    assert_eq!(st.code(), Some(1), "second primary on {ctl}:\n{}", p2.log());
    let log2 = p2.log();
    assert!(
        log2.contains(&ctl),
        "the second primary's error should name {ctl}:\n{log2}"
    );
    assert!(
        log2.to_lowercase().contains("another roundhouse primary"),
        "the second primary's error should say another primary runs there:\n{log2}"
    );
    assert!(
        wait_until(secs(5), POLL, || p2.tagged_processes().is_empty()),
        "the failed primary left processes: {:?}",
        p2.tagged_processes()
    );

    // The first one is unharmed: socket in place, control and HTTP work.
    let meta = std::fs::symlink_metadata(p1.control()).expect("first primary's socket is gone");
    assert!(meta.file_type().is_socket());
    let out = p1.client(&["status", "--json"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        describe(&["status", "--json"], &out)
    );
    let j: Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    let pids: BTreeMap<u32, i32> = workers(&j)
        .iter()
        .map(|w| (num(w, "id") as u32, num(w, "pid") as i32))
        .collect();
    assert_eq!(pids, p1.worker_pids(), "status reaches the first primary");
    load(p1.addr(), 2, 5);
    assert!(pid_alive(p1.pid()));
}

#[test]
fn a_control_socket_left_by_a_killed_primary_is_replaced() {
    let mut p1 = Primary::start(&["-w", "1"]);
    p1.wait_ready();
    let ctl = p1.control().to_path_buf();
    let ctl_s = ctl.display().to_string();
    p1.signal(Signal::SIGKILL);
    p1.wait_exit(secs(10));
    assert!(
        std::fs::symlink_metadata(&ctl).is_ok_and(|m| m.file_type().is_socket()),
        "a SIGKILLed primary cannot remove its socket file; expected a stale one at {ctl_s}"
    );
    // Nobody accepts on it now.
    let out = p1.client(&["status"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        describe(&["status"], &out)
    );
    assert!(
        stderr(&out).contains(&ctl_s),
        "{}",
        describe(&["status"], &out)
    );

    let p2 = Primary::start(&["-w", "1", "--control", &ctl_s]);
    p2.wait_ready();
    let out = p2.client(&["status", "--json"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        describe(&["status", "--json"], &out)
    );
    let j: Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(
        num(worker(&j, 1), "pid") as i32,
        p2.worker_pids()[&1],
        "status reaches the new primary"
    );
}

#[test]
fn control_commands_with_no_primary_exit_1_naming_the_path() {
    let dir = TempDir::new();
    let missing = dir.join("nobody.sock");
    // A stale socket file: bound, then closed; nothing accepts on it.
    let stale = dir.join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    for path in [&missing, &stale] {
        let p = path.display().to_string();
        for cmd in [
            &["status"][..],
            &["status", "--json"],
            &["stop"],
            &["reload"],
            &["scale", "2"],
            &["send", "--to", "all", "{}"],
        ] {
            let mut args = vec![cmd[0], "--control", &p];
            args.extend(&cmd[1..]);
            let out = roundhouse(&args);
            let d = describe(&args, &out);
            assert_eq!(out.status.code(), Some(1), "{d}");
            let err = stderr(&out);
            assert!(
                err.contains("no primary running") && err.contains(&p),
                "{d}"
            );
            assert_eq!(nonempty_lines(&out.stderr).len(), 1, "one line: {d}");
            assert!(out.stdout.is_empty(), "{d}");
        }
    }
}

#[test]
fn send_to_an_unknown_worker_exits_1_and_bad_json_exits_2() {
    let p = Primary::start(&["-w", "2"]);
    p.wait_ready();

    let ok = ["send", "--to", "1", r#"{"ping":"x"}"#];
    let out = p.client(&ok);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&ok, &out));

    let unknown = ["send", "--to", "99", "{}"];
    let out = p.client(&unknown);
    let d = describe(&unknown, &out);
    assert_eq!(out.status.code(), Some(1), "{d}");
    assert!(
        stderr(&out).contains("99"),
        "the error should name worker 99: {d}"
    );

    let bad = ["send", "--to", "all", "not json"];
    let out = p.client(&bad);
    let d = describe(&bad, &out);
    assert_eq!(out.status.code(), Some(2), "{d}");
    assert_eq!(nonempty_lines(&out.stderr).len(), 1, "one line: {d}");

    // The primary is unaffected.
    assert!(pid_alive(p.pid()));
    load(p.addr(), 1, 2);
}

/// least-conn at scale: the choice comes from a heap, not a scan. With 16 workers: hold 8
/// connections open, run 8 short ones (under plain rotation the next pick would be an occupied
/// worker again), then hold 8 more: every held connection must land on a worker with none open,
/// so the 16 land on 16 different workers.
#[test]
fn least_conn_spreads_held_connections_over_sixteen_workers_one_each() {
    let (_p, addr, admin) = start_with_admin("least-conn", 16);
    let mut held = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    let mut hold = |i: usize, held: &mut Vec<HttpConn>| {
        let (c, id) = held_connection(addr, &format!("held connection {i}"));
        assert!(
            seen.insert(id),
            "least-conn gave held connection {i} to worker {id}, which already had one open \
             (workers with one so far: {seen:?})"
        );
        held.push(c);
    };
    for i in 0..8 {
        hold(i, &mut held);
    }
    load(addr, 1, 8);
    wait_stats(admin, "only the 8 held connections open", SETTLE, |s| {
        active_sum(s) == 8 && total(s, "requests_total") == 16
    });
    for i in 8..16 {
        hold(i, &mut held);
    }
    let want: BTreeMap<u32, u64> = (1..=16).map(|id| (id, 1)).collect();
    wait_stats(admin, "one open connection per worker", SETTLE, |s| {
        per_worker(s, "connections_active") == want
    });
    drop(held);
}
