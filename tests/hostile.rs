//! Hostile input (SPEC promise 8, issue 7): misbehaving workers, floods, running out of file
//! descriptors, malformed control and admin requests, control peers of another uid.
//!
//! The misbehaving worker is `tests/workers/hostile.py` (Python 3 standard library, written from
//! `docs/protocol.md` alone), one mode per violation. It runs as the *first* process of slot 1;
//! slot 2 and slot 1's replacements run `hello-worker` (a wrapper script picks by
//! `ROUNDHOUSE_WORKER_ID` and a marker file). Every test drives client load through the whole
//! episode and requires that no client sees a failure, that the bad worker is logged once with
//! its id, killed and replaced, that the good worker is left alone, and that the primary leaks
//! no fd. `docs/reliability.md` records the figures these tests print (`FIGURE ...` lines on
//! stderr: `cargo test --test hostile -- --nocapture`).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use common::{
    get, hello_worker, pid_alive, proc_cpu_time, proc_rss_kib, wait_until, Load, LoadMode, LogLine,
    Primary, PrimaryBuilder, POLL, STARTUP,
};

const HOSTILE_PY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/workers/hostile.py");

fn have_python3() -> bool {
    match Command::new("python3").arg("--version").output() {
        Ok(out) if out.status.success() => true,
        _ => {
            eprintln!("SKIPPED: python3 is not installed; the misbehaving worker needs it");
            false
        }
    }
}

macro_rules! require_python3 {
    () => {
        if !have_python3() {
            return;
        }
    };
}

/// A builder for two workers where slot 1's first process runs `hostile.py MODE` and every
/// other process is `hello-worker`; with `--admin`.
fn hostile_builder(mode: &str) -> PrimaryBuilder {
    let b = Primary::builder()
        .workers(2)
        .args(&["--admin", "127.0.0.1:0"]);
    let marker = b.temp_dir().join("misbehaved");
    let script = b.temp_dir().write_script(
        "worker.sh",
        &format!(
            "#!/bin/sh\n\
             if [ \"$ROUNDHOUSE_WORKER_ID\" = 1 ] && [ ! -e '{marker}' ]; then\n\
             \x20   : > '{marker}'\n\
             \x20   exec python3 '{HOSTILE_PY}' '{mode}'\n\
             fi\n\
             exec '{hello}'\n",
            marker = marker.display(),
            hello = hello_worker(),
        ),
    );
    b.cmd(&[script.display().to_string()])
}

/// Pid of the first process of slot 1 (the hostile one).
fn first_pid_of_slot1(p: &Primary) -> i32 {
    p.wait_for_event("worker started", &[("worker.id", "1")], STARTUP)
        .field_as("worker.pid")
        .expect("worker.pid")
}

fn fd_count(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Lines about `pid` containing `what`.
fn lines_for_pid(p: &Primary, pid: i32, what: &str) -> Vec<LogLine> {
    let pid = pid.to_string();
    p.lines()
        .into_iter()
        .filter(|l| l.contains(what) && l.field("worker.pid").as_deref() == Some(pid.as_str()))
        .collect()
}

/// Waits until the primary holds `baseline` fds again (connections closed, nothing leaked).
fn assert_no_fd_leak(p: &Primary, baseline: usize) {
    let ok = wait_until(Duration::from_secs(10), POLL, || {
        fd_count(p.pid()) <= baseline
    });
    assert!(
        ok,
        "the primary holds {} fds, {} before the episode: fds leaked ({:?})",
        fd_count(p.pid()),
        baseline,
        common::fd_targets(p.pid())
    );
}

/// The common shape of the misbehaving-worker tests: hostile worker in slot 1, load through
/// both workers, the bad worker detected (one of `reasons` in its `killing worker` or
/// `protocol error` line), killed once, replaced by a worker that serves, zero client failures, worker 2 untouched,
/// no fd leaked.
fn misbehaving_worker_is_killed_and_replaced(mode: &str, args: &[&str], reasons: &[&str]) {
    require_python3!();
    let p = hostile_builder(mode).args(args).start();
    let bad = first_pid_of_slot1(&p);
    p.wait_ready();
    let good = p.worker_pids()[&2];
    // Let the first request settle the fds of a fresh primary (lazy allocations, admin).
    let _ = p.stats();
    let fds_before = fd_count(p.pid());
    let load = Load::start(p.addr(), 2, "/whoami", LoadMode::PerRequest);

    let pid = bad.to_string();
    p.wait_for_line(
        &format!("worker 1 (pid {bad}) killed"),
        Duration::from_secs(30),
        |l| is_kill_line(l) && l.field("worker.pid").as_deref() == Some(pid.as_str()),
    );
    let exited = p.wait_for_event(
        "worker exited",
        &[("worker.id", "1"), ("worker.pid", &pid)],
        STARTUP,
    );
    let new = p.wait_worker_online(1, Some(bad), STARTUP);
    assert!(
        load.wait_for(STARTUP, |r| r.served_by(1, new) >= 5),
        "the replacement worker 1 (pid {new}) did not serve: {:?}",
        load.snapshot()
    );
    let report = load.finish();

    assert!(
        report.failures.is_empty(),
        "{} of {} requests failed while worker 1 misbehaved ({mode}): {:?}",
        report.failures.len(),
        report.ok + report.failures.len(),
        report.failures
    );
    assert!(
        p.log()
            .contains(&format!("hostile worker 1 pid {bad}: {mode}")),
        "the hostile worker did not get to misbehave"
    );
    // Detected and logged once, with its id and pid.
    let kills: Vec<LogLine> = lines_for_pid(&p, bad, "")
        .into_iter()
        .filter(is_kill_line)
        .collect();
    assert_eq!(kills.len(), 1, "one `killing worker` line: {kills:?}");
    let errors = lines_for_pid(&p, bad, "protocol error: worker");
    assert!(
        errors.len() <= 1,
        "at most one `protocol error` line: {errors:?}"
    );
    let why: Vec<&LogLine> = kills.iter().chain(errors.iter()).collect();
    assert!(
        why.iter().any(|l| reasons.iter().any(|r| l.contains(r))),
        "the log says why (one of {reasons:?}): {why:?}"
    );
    assert!(
        why.iter()
            .all(|l| l.field("worker.id").as_deref() == Some("1")),
        "{why:?}"
    );
    assert!(
        exited.contains("SIGKILL") || exited.contains("SIGTERM"),
        "the primary killed it: {}",
        exited.text
    );
    assert!(!pid_alive(bad), "the bad worker is gone");
    // Replaced in its slot, with backoff (not a busy loop).
    let restart = p.wait_for_event("restarting worker", &[("worker.id", "1")], STARTUP);
    assert!(
        restart
            .field_as::<u64>("delay_ms")
            .is_some_and(|d| d >= 100),
        "restarted with backoff: {}",
        restart.text
    );
    assert_eq!(
        p.events("worker started", &[("worker.id", "1")]).len(),
        2,
        "one replacement"
    );
    // The good worker was left alone and served throughout.
    assert_eq!(p.events("worker online", &[("worker.id", "2")]).len(), 1);
    assert!(pid_alive(good));
    assert!(report.served_by(2, good) > 0);
    assert!(pid_alive(p.pid()), "the primary keeps running");
    assert_no_fd_leak(&p, fds_before);
    eprintln!(
        "FIGURE misbehave mode={mode}: requests ok={} failed=0 in {:.1}s; detected as {:?}",
        report.ok,
        report.elapsed.as_secs_f64(),
        why.iter()
            .map(|l| strip_prefix(&l.text))
            .collect::<Vec<_>>()
    );
}

/// A line saying the primary is killing a worker: `killing worker: <why>`, or the hung-worker
/// warning (SIGTERM first, `killing worker` only if that does not end it).
fn is_kill_line(l: &LogLine) -> bool {
    l.contains("killing worker") || l.contains("hung; terminating")
}

/// The message of a log line, without timestamp, level and target.
fn strip_prefix(line: &str) -> String {
    match line.find(": ") {
        Some(i) => line[i + 2..].to_string(),
        None => line.to_string(),
    }
}

#[test]
fn worker_writing_garbage_is_killed_and_replaced() {
    misbehaving_worker_is_killed_and_replaced("garbage", &[], &["protocol error: worker"]);
}

#[test]
fn worker_sending_an_oversized_frame_is_killed_and_replaced() {
    misbehaving_worker_is_killed_and_replaced("oversized", &[], &["oversized frame"]);
}

#[test]
fn worker_sending_ready_twice_is_killed_and_replaced() {
    misbehaving_worker_is_killed_and_replaced("ready-twice", &[], &["READY twice"]);
}

#[test]
fn worker_acknowledging_an_id_it_was_never_given_is_killed_and_replaced() {
    misbehaving_worker_is_killed_and_replaced("ack-unknown", &[], &["which it does not hold"]);
}

#[test]
fn worker_refusing_an_id_it_was_never_given_is_killed_and_replaced() {
    misbehaving_worker_is_killed_and_replaced("refuse-unknown", &[], &["which it does not hold"]);
}

#[test]
fn worker_sending_an_fd_with_a_frame_is_killed_and_replaced() {
    misbehaving_worker_is_killed_and_replaced("fds", &[], &["carries 1 fds"]);
}

#[test]
fn worker_sending_more_fds_than_fit_is_killed_and_replaced_and_none_leak() {
    misbehaving_worker_is_killed_and_replaced("many-fds", &[], &["control data truncated"]);
}

#[test]
fn worker_sending_invalid_json_is_killed_and_replaced() {
    misbehaving_worker_is_killed_and_replaced("bad-json", &[], &["not valid JSON"]);
}

#[test]
fn worker_announcing_another_protocol_version_is_killed_and_replaced() {
    misbehaving_worker_is_killed_and_replaced("bad-version", &[], &["protocol version 2"]);
}

#[test]
fn worker_reporting_counters_going_backwards_is_killed_and_replaced() {
    misbehaving_worker_is_killed_and_replaced("stats-backwards", &[], &["backwards"]);
}

#[test]
fn worker_closing_its_channel_but_running_on_is_killed_and_replaced() {
    misbehaving_worker_is_killed_and_replaced("close-channel", &[], &["closed its channel"]);
}

#[test]
fn silent_worker_is_killed_as_hung_and_its_connections_served() {
    // Whichever comes first: the heartbeat timeout or the ack deadline (min(2 s, 5 s)) for the
    // connection it was handed.
    misbehaving_worker_is_killed_and_replaced(
        "silent",
        &["--heartbeat-timeout", "2s"],
        &["hung", "did not acknowledge"],
    );
}

/// Bug H1 (docs/reliability.md): a worker that stops reading its channel but keeps sending
/// heartbeats must not keep the connections handed to it. With default settings, it is killed
/// by the ack deadline and its connections are served by the other worker; meanwhile dispatch
/// to the good worker and control requests (messages to the stuck worker) go on.
#[test]
fn worker_that_stops_reading_but_heartbeats_is_killed_and_its_connections_served() {
    require_python3!();
    let p = hostile_builder("no-read").start();
    let bad = first_pid_of_slot1(&p);
    p.wait_ready();
    let good = p.worker_pids()[&2];
    let load = Load::start(p.addr(), 2, "/whoami", LoadMode::PerRequest);
    // While worker 1 sits on its connections: the good worker keeps serving and the primary
    // answers control requests, including messages for the stuck worker.
    let stalled_at = Instant::now();
    assert!(
        load.wait_ok(20, STARTUP),
        "no progress while worker 1 is stuck"
    );
    for i in 0..20 {
        let msg = format!("{{\"n\":{i}}}");
        let out = p.client(&["send", "--to", "1", &msg]);
        assert!(
            out.status.success(),
            "{}",
            common::describe(&["send", "--to", "1", &msg], &out)
        );
    }
    let pid = bad.to_string();
    let kill = p.wait_for_event(
        "killing worker",
        &[("worker.id", "1"), ("worker.pid", &pid)],
        Duration::from_secs(30),
    );
    let detected_after = stalled_at.elapsed();
    let new = p.wait_worker_online(1, Some(bad), STARTUP);
    assert!(
        load.wait_for(STARTUP, |r| r.served_by(1, new) >= 5),
        "the replacement did not serve"
    );
    let report = load.finish();
    assert!(
        report.failures.is_empty(),
        "{} requests failed: {:?}",
        report.failures.len(),
        report.failures
    );
    assert_eq!(lines_for_pid(&p, bad, "killing worker").len(), 1);
    assert!(
        kill.contains("acknowledge") || kill.contains("read"),
        "{}",
        kill.text
    );
    assert_eq!(p.events("worker online", &[("worker.id", "2")]).len(), 1);
    assert!(pid_alive(good));
    eprintln!(
        "FIGURE no-read: detected after {:.1}s ({}), requests ok={} failed=0",
        detected_after.as_secs_f64(),
        strip_prefix(&kill.text),
        report.ok
    );
}

/// A worker that never reads its channel and is only sent messages (under `none` it gets no
/// handoffs, so no ack deadline applies): its queue in the primary stays bounded and it is
/// killed once the queue has made no progress for a while; the good worker, accepting on the
/// shared listener, serves every request meanwhile.
#[test]
fn worker_that_reads_nothing_is_killed_when_messages_for_it_stall() {
    require_python3!();
    let p = hostile_builder("no-read")
        .args(&["--policy", "none"])
        .start();
    let bad = first_pid_of_slot1(&p);
    p.wait_ready();
    let _ = p.stats();
    let rss_before = proc_rss_kib(p.pid()).expect("primary RSS");
    let load = Load::start(p.addr(), 2, "/whoami", LoadMode::PerRequest);
    // 4 MiB of messages for worker 1: far more than its channel and the primary's queue hold.
    let stream = UnixStream::connect(p.control()).expect("connect control socket");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut c = BufReader::new(stream);
    let big = format!(
        "{{\"cmd\":\"send\",\"to\":1,\"message\":\"{}\"}}\n",
        "m".repeat(60_000)
    );
    let sent_at = Instant::now();
    for _ in 0..70 {
        let v = control_line(&mut c, big.as_bytes());
        assert_eq!(v["ok"], true, "{v}");
    }
    let rss_queued = proc_rss_kib(p.pid()).unwrap_or(0);
    let pid = bad.to_string();
    let kill = p.wait_for_event(
        "killing worker",
        &[("worker.id", "1"), ("worker.pid", &pid)],
        Duration::from_secs(30),
    );
    let detected_after = sent_at.elapsed();
    p.wait_worker_online(1, Some(bad), STARTUP);
    assert!(load.wait_ok(20, STARTUP));
    let report = load.finish();
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    assert!(kill.contains("does not read its channel"), "{}", kill.text);
    assert_eq!(lines_for_pid(&p, bad, "killing worker").len(), 1);
    assert!(
        rss_queued < rss_before + 20 * 1024,
        "primary RSS {rss_before} KiB -> {rss_queued} KiB with 4 MiB of messages queued"
    );
    eprintln!(
        "FIGURE no-read, messages only: 70 x 60 KB messages queued; primary RSS {rss_before} KiB \
         before, {rss_queued} KiB after queueing; killed {:.1}s after the first message ({}); \
         requests ok={} failed=0",
        detected_after.as_secs_f64(),
        strip_prefix(&kill.text),
        report.ok
    );
}

/// Primary RSS in KiB, sampled every 50 ms while `busy()` is true; returns the maximum.
fn max_rss_while(pid: i32, timeout: Duration, busy: impl Fn() -> bool) -> u64 {
    let mut max = proc_rss_kib(pid).unwrap_or(0);
    let deadline = Instant::now() + timeout;
    while busy() && Instant::now() < deadline {
        max = max.max(proc_rss_kib(pid).unwrap_or(0));
        thread::sleep(Duration::from_millis(50));
    }
    max.max(proc_rss_kib(pid).unwrap_or(0))
}

/// A worker floods megabytes of small valid frames (STATS, HEARTBEAT), then sends an oversized
/// frame. The primary keeps dispatching to the good worker, its memory stays bounded, and the
/// flooder is detected at its oversized frame and replaced.
#[test]
fn flood_of_frames_keeps_memory_bounded_and_the_good_worker_serving() {
    require_python3!();
    let p = hostile_builder("flood")
        .env("FLOOD_KIND", "small")
        .env("FLOOD_MB", "8")
        .start();
    let bad = first_pid_of_slot1(&p);
    p.wait_ready();
    let _ = p.stats();
    let rss_before = proc_rss_kib(p.pid()).expect("primary RSS");
    let load = Load::start(p.addr(), 2, "/whoami", LoadMode::PerRequest);
    let pid = bad.to_string();
    let rss_max = max_rss_while(p.pid(), Duration::from_secs(60), || {
        p.events("killing worker", &[("worker.pid", &pid)])
            .is_empty()
    });
    let line = p.wait_for_event("killing worker", &[("worker.pid", &pid)], STARTUP);
    let new = p.wait_worker_online(1, Some(bad), STARTUP);
    assert!(load.wait_for(STARTUP, |r| r.served_by(1, new) >= 5));
    let report = load.finish();
    let rss_after = proc_rss_kib(p.pid()).unwrap_or(0);
    let flooded = p.wait_for_log("flooded", STARTUP);
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    assert!(
        lines_for_pid(&p, bad, "protocol error")
            .iter()
            .any(|l| l.contains("oversized")),
        "detected after the flood: {}",
        line.text
    );
    assert!(
        rss_max < rss_before + 20 * 1024,
        "primary RSS grew from {rss_before} KiB to {rss_max} KiB during the flood"
    );
    eprintln!(
        "FIGURE flood small frames: {}; primary RSS {rss_before} KiB before, {rss_max} KiB max, \
         {rss_after} KiB after; requests ok={} failed=0 over {:.1}s",
        flooded.split("flood: ").nth(1).unwrap_or(&flooded),
        report.ok,
        report.elapsed.as_secs_f64()
    );
}

/// Bug H2 (docs/reliability.md): a worker flooding max-size messages to the good worker must
/// not get that worker killed (protocol.md 4.6: messages for a recipient that does not keep up
/// are dropped), and the primary's queues for it must stay bounded in bytes.
#[test]
fn flood_of_messages_to_a_good_worker_does_not_get_it_killed_and_memory_stays_bounded() {
    require_python3!();
    let p = hostile_builder("flood")
        .env("FLOOD_KIND", "big")
        .env("FLOOD_TO", "2")
        .env("FLOOD_MB", "96")
        // hello-worker logs every message it gets; 96 MiB of that would only fill the test log.
        .rust_log("info,hello_worker=warn")
        .start();
    let bad = first_pid_of_slot1(&p);
    p.wait_ready();
    let good = p.worker_pids()[&2];
    let _ = p.stats();
    let rss_before = proc_rss_kib(p.pid()).expect("primary RSS");
    let load = Load::start(p.addr(), 2, "/whoami", LoadMode::PerRequest);
    let pid = bad.to_string();
    let rss_max = max_rss_while(p.pid(), Duration::from_secs(60), || {
        p.events("killing worker", &[("worker.pid", &pid)])
            .is_empty()
    });
    p.wait_for_event("killing worker", &[("worker.pid", &pid)], STARTUP);
    let new = p.wait_worker_online(1, Some(bad), STARTUP);
    load.wait_for(STARTUP, |r| r.served_by(1, new) >= 5);
    let report = load.finish();
    let rss_after = proc_rss_kib(p.pid()).unwrap_or(0);
    let flooded = p.wait_for_log("flooded", STARTUP);
    let dropped = p.count("dropped") + p.count("dropping messages");
    eprintln!(
        "FIGURE flood messages to worker 2: {}; primary RSS {rss_before} KiB before, \
         {rss_max} KiB max, {rss_after} KiB after; worker 2 kills: {}; drop warnings: {dropped}; \
         requests ok={} failed={}",
        flooded.split("flood: ").nth(1).unwrap_or(&flooded),
        p.events("killing worker", &[("worker.id", "2")]).len(),
        report.ok,
        report.failures.len()
    );
    assert!(
        p.events("killing worker", &[("worker.id", "2")]).is_empty(),
        "the good worker 2, which reads its channel, was killed because another worker flooded it"
    );
    assert!(pid_alive(good), "worker 2 is still the same process");
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    assert!(
        rss_max < rss_before + 20 * 1024,
        "primary RSS grew from {rss_before} KiB to {rss_max} KiB: the queue for worker 2 is not \
         bounded in bytes"
    );
    assert!(
        dropped <= 20,
        "{dropped} drop warnings: a flood should be logged once per episode, not per message"
    );
}

/// Promise 8: out of fds, the primary backs off instead of spinning, says so once per episode,
/// and recovers by itself when fds free up. Also bug H3 (logged 8 times in one episode).
#[test]
fn out_of_fds_the_primary_backs_off_logs_once_per_episode_and_recovers() {
    let p = Primary::builder().workers(2).nofile_limit(64).start();
    p.wait_ready();
    let addr = p.addr();
    assert_eq!(get(addr, "/").expect("GET / before").status, 200);
    let mut cpu_shares = Vec::new();
    for episode in 1..=2 {
        // Hundreds of idle connections: more than the primary and both workers can hold.
        let idle: Vec<TcpStream> = (0..300)
            .map(|i| TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {i}: {e}")))
            .collect();
        p.wait_for_count("could not accept", episode, STARTUP);
        // Exhausted now: measure the primary's CPU over a second.
        let cpu0 = proc_cpu_time(p.pid()).expect("cpu");
        let t0 = Instant::now();
        thread::sleep(Duration::from_secs(1)); // the measuring window, not a synchronisation
        let cpu = proc_cpu_time(p.pid()).expect("cpu") - cpu0;
        let share = cpu.as_secs_f64() / t0.elapsed().as_secs_f64();
        cpu_shares.push(share);
        assert!(
            share < 0.25,
            "the primary used {:.0}% of a CPU while out of fds: it spins",
            share * 100.0
        );
        assert!(pid_alive(p.pid()));
        drop(idle);
        // Recovery: a new request is served once the idle connections are gone.
        let t = Instant::now();
        let served = wait_until(STARTUP, Duration::from_millis(50), || {
            get(addr, "/").is_ok_and(|r| r.status == 200)
        });
        assert!(
            served,
            "episode {episode}: no request served after the fds were freed"
        );
        let n = p.count("could not accept");
        eprintln!(
            "FIGURE fd exhaustion episode {episode}: primary CPU {:.1}% over 1 s while out of \
             fds; served again {:.2}s after the idle connections closed; 'could not accept' \
             lines so far: {n}",
            share * 100.0,
            t.elapsed().as_secs_f64()
        );
        assert_eq!(
            n,
            episode,
            "the exhaustion is logged once per episode: {:?}",
            p.lines_matching("could not accept")
        );
        // The episode ends when the primary says so (backlog drained, or a second without
        // running out), promptly.
        p.wait_for_count("accepting again", episode, Duration::from_secs(5));
    }
    let _ = cpu_shares;
}

/// Workers out of fds refuse handoffs (`MSG_CTRUNC`) and the primary re-sends the connections to
/// another worker: every client is served.
#[test]
fn a_worker_out_of_fds_refuses_and_its_connections_are_served_by_another() {
    let b = Primary::builder()
        .workers(2)
        .args(&["--admin", "127.0.0.1:0"]);
    let script = b.temp_dir().write_script(
        "worker.sh",
        &format!(
            "#!/bin/sh\n\
             if [ \"$ROUNDHOUSE_WORKER_ID\" = 1 ]; then ulimit -n 24; fi\n\
             exec '{}'\n",
            hello_worker()
        ),
    );
    let p = b.cmd(&[script.display().to_string()]).start();
    p.wait_ready();
    let addr = p.addr();
    // 40 concurrent slow requests: worker 1 can hold only a dozen connections at a time.
    let clients: Vec<_> = (0..40)
        .map(|_| thread::spawn(move || get(addr, "/sleep?ms=1500")))
        .collect();
    let results: Vec<_> = clients.into_iter().map(|h| h.join().unwrap()).collect();
    let failures: Vec<String> = results
        .iter()
        .filter(|r| !matches!(r, Ok(r) if r.status == 200))
        .map(|r| format!("{r:?}"))
        .collect();
    assert!(failures.is_empty(), "{failures:?}");
    let by_worker = |id: u32| {
        results
            .iter()
            .filter(|r| matches!(r, Ok(r) if r.worker_id() == Some(id)))
            .count()
    };
    assert!(
        p.log().contains("MSG_CTRUNC"),
        "worker 1 never ran out of fds: the test proves nothing"
    );
    assert!(by_worker(2) > by_worker(1), "worker 2 took what 1 refused");
    assert_eq!(p.count("killing worker"), 0);
    assert_eq!(p.count("protocol error"), 0);
    eprintln!(
        "FIGURE worker out of fds: 40/40 served, worker 1 {} and worker 2 {}; refusals logged: {}",
        by_worker(1),
        by_worker(2),
        p.count("MSG_CTRUNC")
    );
}

// ---- control and admin surfaces -------------------------------------------------------------

fn control_line(conn: &mut BufReader<UnixStream>, line: &[u8]) -> serde_json::Value {
    conn.get_mut().write_all(line).expect("write request");
    let mut answer = String::new();
    conn.read_line(&mut answer).expect("read answer");
    serde_json::from_str(&answer).unwrap_or_else(|e| panic!("answer {answer:?} is not JSON: {e}"))
}

fn assert_error(v: &serde_json::Value, contains: &str) {
    assert_eq!(v["ok"], false, "{v}");
    let e = v["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error: {v}"));
    assert!(
        e.contains(contains),
        "error {e:?} should contain {contains:?}"
    );
}

#[test]
fn malformed_control_requests_get_errors_and_the_primary_keeps_running() {
    let p = Primary::start(&["-w", "1"]);
    p.wait_ready();
    let stream = UnixStream::connect(p.control()).expect("connect control socket");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut c = BufReader::new(stream);
    assert_error(&control_line(&mut c, b"this is not json\n"), "bad request");
    assert_error(
        &control_line(&mut c, b"\xff\xfe\x00\x01 binary\n"),
        "bad request",
    );
    assert_error(&control_line(&mut c, b"[1,2,3]\n"), "bad request");
    assert_error(
        &control_line(&mut c, b"{\"cmd\":\"explode\"}\n"),
        "bad request",
    );
    assert_error(
        &control_line(
            &mut c,
            b"{\"cmd\":\"send\",\"to\":1,\"message\":{\"a\": }\n",
        ),
        "bad request",
    );
    assert_error(
        &control_line(
            &mut c,
            b"{\"cmd\":\"send\",\"to\":\"nobody\",\"message\":1}\n",
        ),
        "bad request",
    );
    assert_error(
        &control_line(&mut c, b"{\"cmd\":\"send\",\"to\":9,\"message\":1}\n"),
        "no worker with id 9",
    );
    assert_error(
        &control_line(&mut c, b"{\"cmd\":\"scale\",\"workers\":0}\n"),
        "workers",
    );
    let too_big = format!(
        "{{\"cmd\":\"send\",\"to\":1,\"message\":\"{}\"}}\n",
        "x".repeat(70_000)
    );
    assert_error(&control_line(&mut c, too_big.as_bytes()), "too large");
    let deep = format!(
        "{{\"cmd\":\"send\",\"to\":1,\"message\":{}1{}}}\n",
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    assert_eq!(control_line(&mut c, deep.as_bytes())["ok"], false);
    // The connection is still usable after all that.
    let v = control_line(&mut c, b"{\"cmd\":\"status\"}\n");
    assert_eq!(v["ok"], true, "{v}");
    drop(c);

    // A line over 1 MiB: an error, then the server closes the connection.
    let s = UnixStream::connect(p.control()).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let writer = {
        let mut s = s.try_clone().unwrap();
        thread::spawn(move || {
            let chunk = vec![b'x'; 64 * 1024];
            for _ in 0..32 {
                if s.write_all(&chunk).is_err() {
                    break; // closed by the server: expected
                }
            }
        })
    };
    let mut answer = String::new();
    let mut r = BufReader::new(s);
    r.read_line(&mut answer)
        .expect("answer to an overlong line");
    let v: serde_json::Value = serde_json::from_str(&answer).expect("JSON");
    assert_error(&v, "longer than");
    let mut rest = Vec::new();
    let _ = r.read_to_end(&mut rest);
    writer.join().unwrap();

    // The CLI refuses bad JSON itself (usage error), and the primary is still fine.
    let out = p.client(&["send", "--to", "1", "{bad"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let out = p.client(&["status", "--json"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(get(p.addr(), "/").expect("GET /").status, 200);
    assert!(pid_alive(p.pid()));
}

/// Sends raw bytes to the admin endpoint; returns the status code of its answer, if any.
fn admin_raw(addr: std::net::SocketAddr, bytes: &[u8]) -> Option<u16> {
    let mut s = TcpStream::connect(addr).expect("connect admin");
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    // The server may answer and close before we finish writing a huge head.
    let _ = s.write_all(bytes);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out);
    text.strip_prefix("HTTP/1.1 ")
        .and_then(|t| t.get(..3))
        .and_then(|c| c.parse().ok())
}

#[test]
fn admin_requests_with_huge_or_broken_heads_are_refused_and_it_keeps_serving() {
    let p = Primary::start(&["-w", "1", "--admin", "127.0.0.1:0"]);
    p.wait_ready();
    let admin = p.admin_addr();
    let refused = |what: &str, code: Option<u16>| {
        eprintln!("FIGURE admin: {what} -> {code:?}");
        assert!(
            matches!(code, Some(400 | 413 | 414 | 431)),
            "{what}: answered {code:?}, expected a 4xx refusal"
        );
    };
    let big_header = format!(
        "GET /stats HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    refused("a 64 KiB header", admin_raw(admin, big_header.as_bytes()));
    let many_headers = format!(
        "GET /stats HTTP/1.1\r\nHost: x\r\n{}\r\n",
        (0..5000)
            .map(|i| format!("X-H{i}: v\r\n"))
            .collect::<String>()
    );
    refused("5000 headers", admin_raw(admin, many_headers.as_bytes()));
    let long_uri = format!(
        "GET /{} HTTP/1.1\r\nHost: x\r\n\r\n",
        "u".repeat(100 * 1024)
    );
    refused(
        "a 100 KiB request line",
        admin_raw(admin, long_uri.as_bytes()),
    );
    refused(
        "bytes that are not HTTP",
        admin_raw(admin, b"\x00\x01\x02\x03 NOT HTTP AT ALL\r\n\r\n"),
    );
    let bad_json = "POST /stats/reset HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n{bad\"";
    let code = admin_raw(admin, bad_json.as_bytes());
    assert!(code.is_some(), "a POST with a junk body is answered");
    // Still serving, admin and clients alike.
    let s = p.stats();
    assert_eq!(s["workers"][0]["state"], "online", "{s}");
    assert_eq!(get(p.addr(), "/").expect("GET /").status, 200);
    assert!(pid_alive(p.pid()));
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// As root: a control client running as `nobody` is refused with a clear error, whether the
/// socket file's mode stops it (0600, the default) or only `SO_PEERCRED` does (mode loosened).
#[test]
fn control_peer_of_another_uid_is_refused() {
    if !is_root() {
        eprintln!("SKIPPED: needs root to run a client as another uid");
        return;
    }
    if Command::new("setpriv").arg("--version").output().is_err() {
        eprintln!("SKIPPED: setpriv is not installed");
        return;
    }
    let p = Primary::start(&["-w", "1"]);
    p.wait_ready();
    let dir = p.dir();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    // A copy of the client that nobody may execute (the build dir may not be traversable).
    let exe = dir.join("roundhouse-client");
    std::fs::copy(common::roundhouse_bin(), &exe).expect("copy roundhouse");
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
    let as_nobody = || {
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(&exe)
            .args(["status", "--control"])
            .arg(p.control())
            .env("RUST_LOG", "off")
            .output()
            .expect("run setpriv")
    };
    let mode = std::fs::metadata(p.control()).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the control socket is created 0600");
    let out = as_nobody();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        err.to_lowercase().contains("permission denied") && !err.contains("no primary running"),
        "a clear error, not 'no primary running': {err}"
    );
    // Only SO_PEERCRED in the way now.
    std::fs::set_permissions(p.control(), std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = as_nobody();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        err.contains("permission denied: peer uid 65534 is not the primary's uid 0"),
        "{err}"
    );
    assert!(p
        .wait_for_log("refused a peer of another uid", STARTUP)
        .contains("65534"));
    // Root still gets in, and the primary is fine.
    let out = p.client(&["status", "--json"]);
    assert!(out.status.success(), "{out:?}");
    assert!(pid_alive(p.pid()));
}

/// Issue 11, item 6: a worker whose channel is full while the primary has connections for it
/// must not make the primary spin on write readiness (every write goes through the reactor);
/// the other worker serves everything meanwhile, and the stuck worker is killed once its
/// channel has made no progress for a while.
#[test]
fn a_full_channel_does_not_make_the_primary_spin() {
    require_python3!();
    let p = hostile_builder("no-read").start();
    let bad = first_pid_of_slot1(&p);
    p.wait_ready();
    // Messages worker 1 never reads: about four of these fill its channel's socket buffer.
    let big = format!("\"{}\"", "x".repeat(60_000));
    for _ in 0..4 {
        let out = p.client(&["send", "--to", "1", &big]);
        assert!(
            out.status.success(),
            "{}",
            common::describe(&["send"], &out)
        );
    }
    // Now every other connection is offered to worker 1, whose channel is full.
    let load = Load::start(p.addr(), 2, "/", LoadMode::PerRequest);
    assert!(load.wait_ok(50, STARTUP), "no progress with worker 1 stuck");
    let cpu0 = proc_cpu_time(p.pid()).expect("cpu");
    let t0 = Instant::now();
    thread::sleep(Duration::from_secs(2)); // the measuring window, not a synchronisation
    let share =
        (proc_cpu_time(p.pid()).expect("cpu") - cpu0).as_secs_f64() / t0.elapsed().as_secs_f64();
    let pid = bad.to_string();
    let kill = p.wait_for_event(
        "killing worker",
        &[("worker.id", "1"), ("worker.pid", &pid)],
        Duration::from_secs(30),
    );
    let report = load.finish();
    eprintln!(
        "FIGURE full channel: primary CPU {:.1}% over 2 s under load with worker 1's channel \
         full; then {}; requests ok={} failed={}",
        share * 100.0,
        strip_prefix(&kill.text),
        report.ok,
        report.failures.len()
    );
    assert!(
        share < 0.5,
        "the primary used {:.0}% of a CPU: it spins on a full channel",
        share * 100.0
    );
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    assert!(kill.contains("read"), "{}", kill.text);
}

/// Issue 11, item 5 (promise 8): with the primary limited to 40 fds, connection-per-request load
/// is all served, at a rate that is a fair share of an unconstrained primary's (it resumes
/// accepting as soon as a worker's acknowledgement frees an fd, not after a fixed pause), and
/// the exhaustion episode ends within a second after the load stops.
#[test]
fn limited_to_40_fds_the_primary_keeps_serving_at_speed() {
    let window = Duration::from_secs(3);
    let measure = |limit: bool| {
        let p = Primary::builder().workers(2).start();
        p.wait_ready();
        if limit {
            let out = std::process::Command::new("prlimit")
                .args(["--pid", &p.pid().to_string(), "--nofile=40:40"])
                .output();
            match out {
                Ok(o) if o.status.success() => {}
                other => {
                    eprintln!("skipped: prlimit could not limit the primary: {other:?}");
                    return None;
                }
            }
        }
        let load = Load::start(p.addr(), 48, "/sleep?ms=20", LoadMode::PerRequest);
        thread::sleep(window); // the measuring window, not a synchronisation
        let report = load.finish();
        let stopped = Instant::now();
        // Every episode that began ends (is logged as over) promptly once the load stops.
        let episodes = p.count("could not accept");
        let ended = (limit && episodes > 0)
            .then(|| {
                wait_until(Duration::from_secs(5), Duration::from_millis(10), || {
                    p.count("accepting again") >= episodes
                })
                .then(|| stopped.elapsed())
            })
            .flatten();
        Some((
            report.ok as f64 / report.elapsed.as_secs_f64(),
            report,
            p.count("could not accept"),
            ended,
        ))
    };
    let Some((free, free_report, _, _)) = measure(false) else {
        return;
    };
    let Some((limited, limited_report, episodes, ended)) = measure(true) else {
        return;
    };
    eprintln!(
        "FIGURE 40-fd primary: {limited:.0} req/s vs {free:.0} req/s unconstrained ({:.2}x), \
         48 clients x /sleep?ms=20 for {}s; exhaustion episodes {episodes}; 'accepting again' \
         {:?} after the load stopped; failed {} / {}",
        limited / free,
        window.as_secs(),
        ended,
        limited_report.failures.len(),
        free_report.failures.len()
    );
    assert!(
        free_report.failures.is_empty(),
        "{:?}",
        free_report.failures
    );
    assert!(
        limited_report.failures.is_empty(),
        "{:?}",
        limited_report.failures
    );
    assert!(
        episodes > 0,
        "the limit was never reached: the test tests nothing"
    );
    assert!(
        limited >= 0.25 * free,
        "limited to 40 fds the primary served {limited:.0} req/s against {free:.0} unconstrained"
    );
    assert!(
        ended.is_some_and(|d| d < Duration::from_secs(2)),
        "the exhaustion episode did not end promptly: {ended:?}"
    );
}
