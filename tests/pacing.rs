//! Accept pacing (issue 18, `primary/pace.rs`): when a burst of connections is waiting, the
//! primary takes them in one go, hands them out and pauses before the next burst. What a client
//! must see: every waiting connection answered, the rotation exact, nobody kept waiting.

mod common;

use common::*;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Opens `n` connections and writes a `Connection: close` request on each, without reading.
fn requests_waiting(addr: std::net::SocketAddr, n: usize) -> Vec<HttpConn> {
    (0..n)
        .map(|i| {
            let mut c = HttpConn::connect(addr).unwrap_or_else(|e| panic!("connect {i}: {e}"));
            c.send("GET", "/", &[("Connection", "close")], b"")
                .unwrap_or_else(|e| panic!("request {i}: {e}"));
            c
        })
        .collect()
}

/// Reads every response; returns the per-worker counts.
fn answers(conns: &mut [HttpConn]) -> BTreeMap<u32, usize> {
    let mut per = BTreeMap::new();
    for (i, c) in conns.iter_mut().enumerate() {
        let r = c
            .read_response()
            .unwrap_or_else(|e| panic!("connection {i}: {e}"));
        assert_eq!(r.status, 200, "connection {i}: {r:?}");
        assert_eq!(r.text(), "hello world\n");
        *per.entry(r.worker_id().expect("x-worker-id")).or_insert(0) += 1;
    }
    per
}

/// The primary is stopped while 40 clients connect and send their requests, so its first
/// accept after it resumes finds all 40 in the backlog: far over pacing's threshold (12), so
/// the burst is paced. All 40 are answered, 10 per worker (one dispatch round: strict
/// rotation), well within a second; a second burst right behind the paced one likewise.
#[test]
fn a_paced_burst_is_served_whole_and_in_exact_rotation() {
    let p = Primary::start(&["-w", "4"]);
    p.wait_ready();
    let addr = p.addr();
    let even: BTreeMap<u32, usize> = (1..=4).map(|i| (i, 10)).collect();
    for round in 1..=2 {
        p.signal(Signal::SIGSTOP);
        let mut conns = requests_waiting(addr, 40);
        let resumed = Instant::now();
        p.signal(Signal::SIGCONT);
        let per = answers(&mut conns);
        let took = resumed.elapsed();
        eprintln!(
            "FIGURE pacing round {round}: 40 waiting connections answered in {took:?}: {per:?}"
        );
        assert_eq!(per, even, "round {round}: per-worker answers");
        assert!(
            took < Duration::from_secs(2),
            "round {round}: 40 waiting connections took {took:?}"
        );
    }
    // And a lone connection right after is not held back by a pause.
    let t = Instant::now();
    let r = get(addr, "/").expect("GET / after the bursts");
    assert_eq!(r.status, 200);
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "took {:?}",
        t.elapsed()
    );
}
