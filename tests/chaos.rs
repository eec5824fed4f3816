//! Chaos under load (issue 7 item 4; SPEC promises 1 and 7): workers SIGKILLed or stopped at
//! random while clients hammer the listener, and the primary itself SIGKILLed mid-load.
//!
//! The books must balance: a client failure is only allowed for a connection a worker had
//! acknowledged and then died with, which the primary counts in `/stats`
//! `totals.connections_lost`; everything not yet acknowledged is handed to another worker. The
//! tests print `FIGURE ...` lines (load held, faults injected, failures vs accounted) that
//! `docs/reliability.md` records: `cargo test --test chaos -- --nocapture`.

mod common;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{
    pid_alive, signal_pid, wait_until, Load, LoadMode, LoadReport, Primary, Signal, POLL, STARTUP,
};

/// A small deterministic generator (xorshift64*), seeded from the clock; the seed is printed so
/// a failing run can be replayed by setting `CHAOS_SEED`.
struct Rng(u64);

impl Rng {
    fn from_env_or_clock() -> (Rng, u64) {
        let seed = std::env::var("CHAOS_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(1)
            })
            | 1;
        (Rng(seed), seed)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }
}

const WORKERS: u32 = 3;
const CHAOS_FOR: Duration = Duration::from_secs(5);
const EVERY: Duration = Duration::from_millis(300);

/// Waits until every slot has an online worker that is alive, and returns their pids.
fn wait_all_online(p: &Primary) -> Vec<i32> {
    let ok = wait_until(STARTUP, POLL, || {
        let pids = p.worker_pids();
        pids.len() == WORKERS as usize && pids.values().all(|pid| pid_alive(*pid))
    });
    assert!(ok, "not every slot came back online: {:?}", p.worker_pids());
    p.worker_pids().values().copied().collect()
}

fn lost_total(p: &Primary) -> u64 {
    let s = p.stats();
    s["totals"]["connections_lost"]
        .as_u64()
        .unwrap_or_else(|| panic!("no totals.connections_lost in {s}"))
}

fn summary(r: &LoadReport) -> String {
    format!(
        "{} ok, {} failed in {:.1}s ({:.0} req/s)",
        r.ok,
        r.failures.len(),
        r.elapsed.as_secs_f64(),
        r.ok as f64 / r.elapsed.as_secs_f64()
    )
}

#[test]
fn sigkill_of_random_workers_under_load_fails_only_connections_counted_as_lost() {
    let p = Primary::builder()
        .workers(WORKERS as usize)
        .args(&["--admin", "127.0.0.1:0"])
        .start();
    p.wait_ready();
    let (mut rng, seed) = Rng::from_env_or_clock();
    let lost_before = lost_total(&p);
    // Connections that live a little (a short sleep per request, some keep-alive), so that
    // kills land on acknowledged connections as well as on unacknowledged ones.
    let load = Load::start(p.addr(), 8, "/sleep?ms=20", LoadMode::Mixed);
    assert!(load.wait_ok(20, STARTUP), "the load does not start");
    let mut kills = 0;
    let end = Instant::now() + CHAOS_FOR;
    while Instant::now() < end {
        let id = 1 + rng.below(WORKERS as u64) as u32;
        if let Some(&pid) = p.worker_pids().get(&id) {
            if pid_alive(pid) {
                signal_pid(pid, Signal::SIGKILL);
                kills += 1;
            }
        }
        std::thread::sleep(EVERY); // the chaos interval, not a synchronisation
    }
    // Let the slots come back and the load run on a fully restored primary for a moment.
    wait_all_online(&p);
    assert!(load.wait_ok(50, STARTUP), "no progress after the chaos");
    let report = load.finish();
    // Every reaped worker's losses are in the books once its exit is handled: wait for the
    // exits of all the killed workers to be logged.
    assert!(
        wait_until(STARTUP, POLL, || p.count("worker exited") >= kills),
        "not every killed worker was reaped"
    );
    let lost = lost_total(&p) - lost_before;
    let failed = report.failures.len() as u64;
    eprintln!(
        "FIGURE chaos sigkill (seed {seed}): {WORKERS} workers, 8 clients (4 keep-alive), \
         {kills} SIGKILLs every {}ms over {:.0}s; {}; connections_lost {lost}",
        EVERY.as_millis(),
        CHAOS_FOR.as_secs_f64(),
        summary(&report)
    );
    assert!(
        kills >= 8,
        "only {kills} kills: the test injected too few faults"
    );
    assert!(
        report.ok >= 200,
        "the load was too small: {}",
        summary(&report)
    );
    assert!(
        failed <= lost,
        "{failed} client failures but only {lost} connections counted as lost (seed {seed}): \
         a connection was dropped without being accounted for: {:?}",
        report.failures
    );
    assert!(pid_alive(p.pid()));
}

#[test]
fn sigstop_and_sigcont_of_workers_under_load_fail_no_request() {
    let p = Primary::builder()
        .workers(WORKERS as usize)
        .args(&["--admin", "127.0.0.1:0", "--heartbeat-timeout", "0"])
        .start();
    p.wait_ready();
    let pids = wait_all_online(&p);
    let (mut rng, seed) = Rng::from_env_or_clock();
    let load = Load::start(p.addr(), 6, "/whoami", LoadMode::Mixed);
    assert!(load.wait_ok(20, STARTUP), "the load does not start");
    let mut stops = 0;
    let end = Instant::now() + CHAOS_FOR;
    while Instant::now() < end {
        let pid = pids[rng.below(pids.len() as u64) as usize];
        signal_pid(pid, Signal::SIGSTOP);
        stops += 1;
        std::thread::sleep(Duration::from_millis(200)); // stopped this long
        signal_pid(pid, Signal::SIGCONT);
        std::thread::sleep(EVERY - Duration::from_millis(200));
    }
    assert!(load.wait_ok(50, STARTUP), "no progress after the stops");
    let report = load.finish();
    eprintln!(
        "FIGURE chaos sigstop (seed {seed}): {WORKERS} workers, 6 clients (3 keep-alive), \
         {stops} SIGSTOP/SIGCONT (200 ms each) over {:.0}s; {}",
        CHAOS_FOR.as_secs_f64(),
        summary(&report)
    );
    assert!(
        report.failures.is_empty(),
        "{} requests failed while workers were only stopped (seed {seed}): {:?}",
        report.failures.len(),
        report.failures
    );
    assert_eq!(p.count("killing worker"), 0, "a stopped worker was killed");
    assert_eq!(p.count("worker exited"), 0);
    for pid in pids {
        assert!(pid_alive(pid), "worker {pid} survived");
    }
    assert_eq!(lost_total(&p), 0);
}

#[test]
fn sigkill_of_the_primary_mid_load_takes_every_worker_down_within_two_seconds() {
    let mut p = Primary::builder().workers(WORKERS as usize).start();
    p.wait_ready();
    let pids = wait_all_online(&p);
    let load = Load::start(p.addr(), 6, "/sleep?ms=20", LoadMode::Mixed);
    assert!(load.wait_ok(50, STARTUP), "the load does not start");
    p.signal(Signal::SIGKILL);
    let killed_at = Instant::now();
    let gone = wait_until(Duration::from_secs(2), Duration::from_millis(5), || {
        pids.iter().all(|pid| !pid_alive(*pid)) && p.tagged_processes().is_empty()
    });
    let took = killed_at.elapsed();
    let report = load.finish();
    p.try_wait_exit(Duration::from_secs(5));
    eprintln!(
        "FIGURE primary SIGKILL mid-load: {} workers gone {:.0} ms after; load before: {} ok",
        pids.len(),
        took.as_secs_f64() * 1000.0,
        report.ok
    );
    assert!(
        gone,
        "workers still alive 2 s after the primary died: {:?}",
        p.tagged_processes()
    );
}
