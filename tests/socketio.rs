//! socket.io across workers: why `--policy sticky` exists (issue 13, promise 9).
//!
//! socket.io keeps each client's session in the process that opened it; with the polling
//! transport every poll is a new HTTP request, often on a new connection, which must reach that
//! same process or it is answered `400 {"code":1,"message":"Session ID unknown"}`. The app is
//! `examples/node/socketio/app.js` (socket.io 4.8, unmodified, an `echo` event answered with the
//! serving worker), the clients `examples/node/socketio/client.js` (socket.io-client, one
//! process, each client from its own loopback source address or with its own
//! `X-Forwarded-For`), run under `roundhouse run --node -w 4`:
//!
//! - `--policy sticky` (key: the client address): every client connects and gets its echo, with
//!   the polling transport and with the default transports (polling, then the websocket upgrade,
//!   which must reach the same worker too); `--policy rr` on the same clients: some fail.
//! - `--sticky-key header:X-Forwarded-For`: clients behind one proxy address spread over the
//!   workers and every one connects; with the `ip` key they all land on one worker.
//! - Underneath, with the plain Node app: many concurrent connections from one address reach one
//!   worker even though a Node worker takes one handed connection at a time (busy is not gone).
//!
//! Skipped, with the reason printed, when `node` or the example's `npm ci`-installed
//! `node_modules` are missing (the last test needs only `node`).

mod common;

use common::*;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

/// Clients per run: 10 over 4 workers, so that under `rr` at least one is all but certain to
/// have its requests split over workers.
const CLIENTS: u8 = 10;
/// How long one client may take to connect and get its echo (the machine may be crowded).
const CLIENT_TIMEOUT_MS: u32 = 20_000;

fn app_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/node/socketio")
}

/// True when the tests can run; otherwise prints why they are skipped.
fn socketio_available() -> bool {
    let node = Command::new("node")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !node {
        eprintln!("SKIPPED: `node` is not installed; the socket.io tests need Node.js >= 18");
        return false;
    }
    for package in ["socket.io", "socket.io-client"] {
        if !app_dir().join("node_modules").join(package).is_dir() {
            eprintln!(
                "SKIPPED: examples/node/socketio/node_modules/{package} is missing; run `npm ci` in {}",
                app_dir().display()
            );
            return false;
        }
    }
    true
}

macro_rules! require_socketio {
    () => {
        if !socketio_available() {
            return;
        }
    };
}

/// `roundhouse run --node -w 4 --admin … ARGS -- node app.js`, every worker online.
fn start(args: &[&str]) -> Primary {
    let app = app_dir().join("app.js");
    let p = Primary::builder()
        .workers(4)
        .args(&["--node", "--admin", "127.0.0.1:0", "--grace", "5s"])
        .args(args)
        .cmd(&["node", app.to_str().unwrap()])
        .start();
    p.wait_ready();
    p
}

/// The source addresses 127.0.0.2, 127.0.0.3, … (every 127/8 address is local on Linux).
fn sources(n: u8) -> String {
    (2..2 + n)
        .map(|i| format!("127.0.0.{i}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// What one run of `client.js` saw.
#[derive(Debug)]
struct Run {
    clients: usize,
    /// Clients that connected and got their echo.
    connected: usize,
    /// Worker id → clients it served.
    per_worker: BTreeMap<u64, usize>,
    /// Transport of each client that connected (`polling` / `websocket`).
    transports: Vec<String>,
    /// `client N (from A, xff X): reason` for each client that failed.
    failures: Vec<String>,
    raw: String,
}

impl Run {
    fn workers(&self) -> BTreeSet<u64> {
        self.per_worker.keys().copied().collect()
    }

    fn figure(&self) -> String {
        format!(
            "{}/{} connected, across {} worker(s) {:?}",
            self.connected,
            self.clients,
            self.per_worker.len(),
            self.per_worker
        )
    }
}

/// Runs `node client.js http://ADDR ARGS` (one process, its clients concurrent) to completion.
fn clients(p: &Primary, args: &[&str]) -> Run {
    let url = format!("http://{}", p.addr());
    let timeout = CLIENT_TIMEOUT_MS.to_string();
    let mut cmd = Command::new("node");
    cmd.arg(app_dir().join("client.js"))
        .arg(&url)
        .args(["--timeout-ms", &timeout])
        .args(args);
    let out = output_within(&mut cmd, Duration::from_secs(90));
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let code = out.status.code();
    assert!(
        matches!(code, Some(0 | 1)),
        "client.js {args:?} failed to run ({:?})\n--- stdout:\n{stdout}\n--- stderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let mut run = Run {
        clients: 0,
        connected: 0,
        per_worker: BTreeMap::new(),
        transports: Vec::new(),
        failures: Vec::new(),
        raw: stdout.clone(),
    };
    for line in stdout.lines().filter(|l| l.starts_with('{')) {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        if v["summary"] == true {
            continue;
        }
        run.clients += 1;
        if v["ok"] == true {
            run.connected += 1;
            let w = v["worker_id"].as_u64().expect("worker_id in an echo");
            *run.per_worker.entry(w).or_default() += 1;
            run.transports
                .push(v["transport"].as_str().unwrap_or("?").to_string());
        } else {
            run.failures.push(format!(
                "client {} (from {}, xff {}): {}",
                v["client"], v["from"], v["xff"], v["error"]
            ));
        }
    }
    assert!(run.clients > 0, "no client results:\n{stdout}");
    assert_eq!(
        code == Some(0),
        run.connected == run.clients,
        "exit status and results disagree:\n{stdout}"
    );
    run
}

/// Per-worker `keys` from `/stats`, summed, and the workers that have any.
fn stats_keys(p: &Primary) -> (u64, BTreeSet<u64>) {
    let doc = p.stats();
    let mut total = 0;
    let mut with_keys = BTreeSet::new();
    for w in doc["workers"].as_array().expect("workers") {
        let keys = w["keys"]
            .as_u64()
            .unwrap_or_else(|| panic!("keys under sticky: {doc}"));
        total += keys;
        if keys > 0 {
            with_keys.insert(w["id"].as_u64().unwrap());
        }
    }
    (total, with_keys)
}

/// 10 polling clients from 10 source addresses: all connect under `sticky`, spread over the
/// workers, and so do clients with the default transports (upgraded to websocket on the same
/// worker); under `rr` the same polling clients fail (`Session ID unknown`) — the before/after of
/// one run.
#[test]
fn polling_clients_from_distinct_addresses_all_connect_under_sticky_not_under_rr() {
    require_socketio!();
    let from = sources(CLIENTS);

    let p = start(&["--policy", "sticky"]);
    let polling = clients(&p, &["--from", &from, "--transports", "polling"]);
    eprintln!(
        "FIGURE socket.io polling, sticky (ip), -w 4: {}",
        polling.figure()
    );
    assert_eq!(
        polling.connected, polling.clients,
        "under sticky every polling client connects: {:#?}",
        polling.failures
    );
    assert!(
        polling.workers().len() >= 2,
        "{CLIENTS} addresses on {:?}",
        polling.workers()
    );
    let default = clients(&p, &["--from", &from]);
    eprintln!(
        "FIGURE socket.io default transports, sticky (ip), -w 4: {}, transports {:?}",
        default.figure(),
        default.transports
    );
    assert_eq!(
        default.connected, default.clients,
        "under sticky every client connects: {:#?}",
        default.failures
    );
    assert!(
        default.transports.iter().all(|t| t == "websocket"),
        "every client upgraded to websocket: {}",
        default.raw
    );
    // Each address stays with its worker from one run to the next.
    assert_eq!(polling.per_worker, default.per_worker);
    // The primary counted one key per address, on the workers that served them.
    let (keys, with_keys) = stats_keys(&p);
    eprintln!("FIGURE /stats keys: {keys} over workers {with_keys:?}");
    assert!(
        (keys as i64 - i64::from(CLIENTS)).abs() <= 1,
        "{keys} keys for {CLIENTS} addresses"
    );
    assert_eq!(with_keys, polling.workers());
    drop(p);

    // The before: the same clients under rr.
    let p = start(&["--policy", "rr"]);
    let rr = clients(&p, &["--from", &from, "--transports", "polling"]);
    eprintln!("FIGURE socket.io polling, rr, -w 4: {}", rr.figure());
    eprintln!("rr failures: {:#?}", rr.failures);
    assert!(
        rr.connected < polling.connected,
        "rr served every polling client ({}) — this test no longer shows why sticky exists",
        rr.figure()
    );
    let rr_default = clients(&p, &["--from", &from]);
    eprintln!(
        "FIGURE socket.io default transports, rr, -w 4: {}",
        rr_default.figure()
    );
}

/// Behind a proxy every client has the proxy's address: with `--sticky-key header:X-Forwarded-For`
/// the clients spread over the workers by the address the proxy forwards, and each connects
/// (polling and default transports); keyed by `ip` they all land on one worker.
#[test]
fn clients_behind_one_proxy_address_spread_by_x_forwarded_for() {
    require_socketio!();
    let xff: String = (1..=CLIENTS)
        .map(|i| format!("192.0.2.{i}"))
        .collect::<Vec<_>>()
        .join(",");

    let p = start(&[
        "--policy",
        "sticky",
        "--sticky-key",
        "header:X-Forwarded-For",
    ]);
    let polling = clients(&p, &["--xff", &xff, "--transports", "polling"]);
    eprintln!(
        "FIGURE socket.io polling, sticky header:X-Forwarded-For, one source address, -w 4: {}",
        polling.figure()
    );
    assert_eq!(
        polling.connected, polling.clients,
        "{:#?}",
        polling.failures
    );
    assert!(
        polling.workers().len() >= 2,
        "{CLIENTS} forwarded addresses on {:?}",
        polling.workers()
    );
    let default = clients(&p, &["--xff", &xff]);
    eprintln!(
        "FIGURE socket.io default transports, sticky header:X-Forwarded-For: {}, transports {:?}",
        default.figure(),
        default.transports
    );
    assert_eq!(
        default.connected, default.clients,
        "{:#?}",
        default.failures
    );
    assert!(
        default.transports.iter().all(|t| t == "websocket"),
        "{}",
        default.raw
    );
    assert_eq!(polling.per_worker, default.per_worker);
    let doc = p.stats();
    assert_eq!(
        doc["sticky_fallbacks"], 0,
        "every request carried the header: {doc}"
    );
    drop(p);

    // Keyed by the peer address, the whole proxy is one key: one worker serves everyone.
    let p = start(&["--policy", "sticky"]);
    let by_ip = clients(&p, &["--xff", &xff, "--transports", "polling"]);
    eprintln!(
        "FIGURE socket.io polling, sticky ip, one source address: {}",
        by_ip.figure()
    );
    assert_eq!(by_ip.connected, by_ip.clients, "{:#?}", by_ip.failures);
    assert_eq!(by_ip.workers().len(), 1, "{:?}", by_ip.per_worker);
}

/// The mechanism under the socket.io figures, with the plain Node app (no npm packages): many
/// connections at once from each of 10 addresses. A Node worker takes one handed connection at
/// a time (the next one once Node acknowledged the handle, `node/README.md` section 5), so it is
/// often busy for an instant; a busy worker is still online, and promise 9 keeps its keys with it:
/// every connection from one address reaches one worker.
#[test]
fn concurrent_connections_from_one_address_reach_one_node_worker() {
    if Command::new("node").arg("--version").output().is_err() {
        eprintln!("SKIPPED: `node` is not installed");
        return;
    }
    let app = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/node/app.js");
    let p = Primary::builder()
        .workers(4)
        .args(&["--node", "--policy", "sticky", "--grace", "5s"])
        .cmd(&["node", app.to_str().unwrap()])
        .start();
    p.wait_ready();
    let addr = p.addr();
    let srcs: Vec<std::net::Ipv4Addr> = (2..2 + CLIENTS)
        .map(|i| std::net::Ipv4Addr::new(127, 0, 0, i))
        .collect();
    // 4 threads per address, 5 connections each, all started together.
    let start = std::sync::Arc::new(std::sync::Barrier::new(srcs.len() * 4));
    let threads: Vec<_> = srcs
        .iter()
        .flat_map(|&src| std::iter::repeat_n(src, 4))
        .map(|src| {
            let start = start.clone();
            std::thread::spawn(move || {
                start.wait();
                (0..5)
                    .map(|_| (src, worker_from(src, addr, "")))
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut seen: BTreeMap<std::net::Ipv4Addr, BTreeMap<u32, usize>> = BTreeMap::new();
    for t in threads {
        for (src, w) in t.join().expect("client thread") {
            *seen.entry(src).or_default().entry(w).or_default() += 1;
        }
    }
    eprintln!("FIGURE sticky, node workers, 20 concurrent connections per address: {seen:?}");
    let split: Vec<_> = seen.iter().filter(|(_, ws)| ws.len() > 1).collect();
    assert!(
        split.is_empty(),
        "addresses served by more than one worker (address → worker → connections): {split:?}"
    );
}
