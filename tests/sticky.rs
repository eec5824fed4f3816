//! `--policy sticky` (promise 9): connections with the same affinity key reach the same worker
//! while its slot is online; keys spread over the slots; a slot that goes away moves only its own
//! keys, and gets them back when it returns. Clients come from distinct loopback source
//! addresses (127.0.0.2, 127.0.0.3, ...), bound before connecting.

mod common;

use common::*;
use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::Duration;

fn sources(n: u8) -> Vec<Ipv4Addr> {
    (2..2 + n).map(|i| Ipv4Addr::new(127, 0, 0, i)).collect()
}

/// Where each source address goes, asserting it is the same worker `rounds` times in a row.
fn homes(addr: SocketAddr, srcs: &[Ipv4Addr], rounds: usize) -> BTreeMap<Ipv4Addr, u32> {
    let mut home = BTreeMap::new();
    for _ in 0..rounds {
        for &src in srcs {
            let w = worker_from(src, addr, "");
            let first = *home.entry(src).or_insert(w);
            assert_eq!(first, w, "{src} went to worker {w} after worker {first}");
        }
    }
    home
}

#[test]
fn each_address_always_reaches_one_worker_and_addresses_spread() {
    let p = Primary::start(&["-w", "4", "--policy", "sticky"]);
    p.wait_ready();
    let srcs = sources(16);
    let home = homes(p.addr(), &srcs, 4);
    let used: BTreeSet<u32> = home.values().copied().collect();
    let per_worker: BTreeMap<u32, usize> = home.values().fold(BTreeMap::new(), |mut m, w| {
        *m.entry(*w).or_default() += 1;
        m
    });
    eprintln!("FIGURE sticky 16 addresses over 4 workers: {per_worker:?}");
    assert!(used.len() >= 3, "16 addresses on {used:?}");
    // The primary's own count of distinct keys per worker agrees.
    let out = p.client(&["status", "--json"]);
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for w in doc["workers"].as_array().unwrap() {
        let id = w["id"].as_u64().unwrap() as u32;
        let keys = w["keys"].as_u64().expect("keys under sticky");
        let want = per_worker.get(&id).copied().unwrap_or(0) as i64;
        assert!(
            (keys as i64 - want).abs() <= 1,
            "worker {id}: {keys} keys, {want} addresses"
        );
        assert_eq!(w["connections_total"].as_u64(), Some(want as u64 * 4));
    }
}

#[test]
fn a_restarted_slot_gets_its_addresses_back_and_no_other_address_moves() {
    let p = Primary::start(&["-w", "4", "--policy", "sticky"]);
    p.wait_ready();
    let srcs = sources(16);
    let home = homes(p.addr(), &srcs, 2);
    let (&victim_src, &slot) = home.iter().next().unwrap();
    let old = p.worker_pids()[&slot];
    // Stop the slot's worker so it cannot come back at once; its keys go to their next choice.
    signal_pid(old, nix::sys::signal::Signal::SIGSTOP);
    signal_pid(old, nix::sys::signal::Signal::SIGKILL);
    p.wait_for_log("worker exited", STARTUP);
    for &src in &srcs {
        let w = worker_from(src, p.addr(), "");
        if home[&src] == slot {
            // Served by another worker or by the restarted one; either way, served.
            let _ = w;
        } else {
            assert_eq!(w, home[&src], "{src} moved although its slot stayed online");
        }
    }
    p.wait_worker_online(slot, Some(old), STARTUP);
    let again = homes(p.addr(), &srcs, 2);
    assert_eq!(again, home, "after the restart every address is home again");
    eprintln!("FIGURE sticky: slot {slot} ({victim_src} among others) killed and restarted; every address back home");
}

#[test]
fn sticky_key_with_another_policy_is_a_usage_error() {
    let out = roundhouse(&[
        "run",
        "--sticky-key",
        "ip",
        "-l",
        "127.0.0.1:0",
        "--",
        "/bin/true",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&["run"], &out));
    let out = roundhouse(&[
        "run",
        "--policy",
        "sticky",
        "--sticky-key",
        "cookie",
        "-l",
        "127.0.0.1:0",
        "--",
        "/bin/true",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&["run"], &out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("header:NAME"));
}

/// One request with `X-Forwarded-For: xff` from 127.0.0.1: the worker id that answered.
fn via_proxy(xff: &str, addr: SocketAddr) -> u32 {
    worker_from(
        Ipv4Addr::LOCALHOST,
        addr,
        &format!("x-forwarded-for: {xff}, 10.255.0.1\r\n"),
    )
}

#[test]
fn header_keys_from_one_proxy_address_spread_and_stick() {
    let p = Primary::start(&[
        "-w",
        "4",
        "--policy",
        "sticky",
        "--sticky-key",
        "header:X-Forwarded-For",
    ]);
    p.wait_ready();
    let clients: Vec<String> = (1..=16).map(|i| format!("192.0.2.{i}")).collect();
    let mut home: BTreeMap<&str, u32> = BTreeMap::new();
    for _ in 0..3 {
        for c in &clients {
            let w = via_proxy(c, p.addr());
            let first = *home.entry(c).or_insert(w);
            assert_eq!(first, w, "{c} went to {w} after {first}");
        }
    }
    let used: BTreeSet<u32> = home.values().copied().collect();
    eprintln!("FIGURE sticky header:X-Forwarded-For, 16 clients behind one address: {home:?}");
    assert!(used.len() >= 3, "{used:?}");
    let out = p.client(&["status", "--json"]);
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["sticky_fallbacks"], 0, "{doc}");
}

/// Peeking never stalls the loop: a client that sends nothing gets the fallback after a second
/// (and is served once it speaks), garbage gets the fallback at once, and meanwhile everyone
/// else is served; nothing is consumed: the worker reads each request as it was sent.
#[test]
fn silent_slow_and_garbage_clients_get_the_fallback_and_nobody_waits() {
    let p = Primary::start(&[
        "-w",
        "2",
        "--policy",
        "sticky",
        "--sticky-key",
        "header:X-Forwarded-For",
    ]);
    p.wait_ready();
    let addr = p.addr();
    // A client that connects and says nothing yet.
    let mut silent = TcpStream::connect(addr).unwrap();
    // Garbage.
    let mut garbage = TcpStream::connect(addr).unwrap();
    garbage
        .write_all(b"\x16\x03\x01\x02\x00 not http\r\n\r\n")
        .unwrap();
    // Meanwhile others are served at once.
    for i in 0..20 {
        let t = std::time::Instant::now();
        via_proxy(&format!("198.51.100.{i}"), addr);
        assert!(
            t.elapsed() < Duration::from_millis(500),
            "a request waited {:?}",
            t.elapsed()
        );
    }
    // After the peek deadline the silent client is handed over; when it speaks, it is served.
    let out = wait_until(Duration::from_secs(5), Duration::from_millis(50), || {
        let o = p.client(&["status", "--json"]);
        let doc: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
        doc["sticky_fallbacks"].as_u64().is_some_and(|n| n >= 2)
    });
    assert!(
        out,
        "the silent and garbage clients were not counted as fallbacks"
    );
    silent
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    silent
        .write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    silent.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
}
