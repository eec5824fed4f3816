//! Against the real kernel (run as root, or with CAP_BPF): rotation, skip and rejoin, migration
//! of a closing listener's queue, and the errors without CAP_BPF.
//!
//! Every test binds its own group of `SO_REUSEPORT` listeners on 127.0.0.1 (the first on port 0,
//! the rest on the port it got), so tests run in parallel without sharing a group. A test skips
//! (with the reason printed) only when the kernel refuses BPF altogether
//! ([`BpfError::Unsupported`]).

use std::io::{ErrorKind, Read, Write};
use std::mem::size_of;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsFd, AsRawFd};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use roundhouse_bpf::{BpfError, MigrateOnly, RrGroup, SlotCount};
use socket2::{Domain, Socket, Type};

/// Set in the environment of a test binary re-run under `setpriv` with reduced capabilities.
const CHILD_ENV: &str = "ROUNDHOUSE_BPF_TEST_CHILD";

fn listener(addr: SocketAddr) -> Socket {
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    s.set_reuse_port(true).unwrap();
    s.bind(&addr.into()).unwrap();
    s.listen(256).unwrap();
    s.set_nonblocking(true).unwrap();
    s
}

/// `k` listeners of one reuseport group on 127.0.0.1 and the address they share.
fn group_of(k: usize) -> (Vec<Socket>, SocketAddr) {
    let first = listener("127.0.0.1:0".parse().unwrap());
    let addr = first.local_addr().unwrap().as_socket().unwrap();
    let mut all = vec![first];
    all.extend((1..k).map(|_| listener(addr)));
    (all, addr)
}

/// `RrGroup::new`, or `None` (with the reason printed) when the kernel refuses BPF altogether.
fn new_group(max_slots: u32) -> Option<RrGroup> {
    match RrGroup::new(max_slots) {
        Ok(g) => Some(g),
        Err(e @ BpfError::Unsupported { .. }) => {
            eprintln!("SKIPPED: the kernel refuses BPF: {e}");
            None
        }
        Err(e) => panic!("RrGroup::new: {e}"),
    }
}

/// Accepts the one connection that one of `listeners` has or is about to have; returns which.
fn accept_any(listeners: &[&Socket]) -> (usize, Socket) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        for (i, l) in listeners.iter().enumerate() {
            match l.accept() {
                Ok((s, _)) => return (i, s),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => panic!("accept on listener {i}: {e}"),
            }
        }
        assert!(
            Instant::now() < deadline,
            "no listener got the connection within 5 s"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// `count` sequential connections, each accepted before the next is made; per-listener tallies.
fn sequential(addr: SocketAddr, listeners: &[&Socket], count: usize) -> Vec<u64> {
    let mut tally = vec![0u64; listeners.len()];
    for _ in 0..count {
        let client = TcpStream::connect(addr).unwrap();
        let (i, _server) = accept_any(listeners);
        tally[i] += 1;
        drop(client);
    }
    tally
}

/// Connections waiting in `l`'s accept queue (`tcpi_unacked` of a listening socket).
fn queued(l: &Socket) -> u32 {
    // SAFETY: tcp_info is plain data (all-zero is valid); getsockopt writes at most `len` bytes
    // into it and `l` is a live socket for the call.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::tcp_info>() as libc::socklen_t;
    let r = unsafe {
        libc::getsockopt(
            l.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            &mut info as *mut libc::tcp_info as *mut libc::c_void,
            &mut len,
        )
    };
    assert_eq!(r, 0, "TCP_INFO: {}", std::io::Error::last_os_error());
    info.tcpi_unacked
}

fn wait_queued(listeners: &[&Socket], total: u32) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while listeners.iter().map(|l| queued(l)).sum::<u32>() < total {
        assert!(
            Instant::now() < deadline,
            "connections never reached the accept queues"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Accepts everything `listeners` have, until `total` connections, and checks each one is alive
/// end to end: the server writes a byte the client reads. Returns per-listener tallies and the
/// number of clients that saw a reset.
fn drain_and_check(listeners: &[&Socket], clients: &mut [TcpStream], total: usize) -> Vec<u64> {
    let mut tally = vec![0u64; listeners.len()];
    let mut accepted = Vec::new();
    for _ in 0..total {
        let (i, s) = accept_any(listeners);
        tally[i] += 1;
        accepted.push(s);
    }
    for s in &accepted {
        s.set_nonblocking(false).unwrap();
        (&*s).write_all(b"x").unwrap();
    }
    for (k, c) in clients.iter_mut().enumerate() {
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut b = [0u8; 1];
        c.read_exact(&mut b)
            .unwrap_or_else(|e| panic!("client {k}: {e}"));
    }
    tally
}

fn steered(group: &RrGroup, slots: &[u32]) -> Vec<u64> {
    slots.iter().map(|&s| group.count(s).steered).collect()
}

#[test]
fn verifier_accepts_the_program() {
    let Some(group) = new_group(8) else { return };
    println!(
        "rotation program, {} insns: {}",
        roundhouse_bpf::RR_PROGRAM_LEN,
        group.verifier_stats()
    );
    assert!(
        group.verifier_stats().contains("processed"),
        "{}",
        group.verifier_stats()
    );
    let m = MigrateOnly::new().unwrap();
    println!("migrate-only program: {}", m.verifier_stats());
}

#[test]
fn strict_rotation_200_connections_over_4_listeners() {
    let Some(mut group) = new_group(8) else {
        return;
    };
    let (ls, addr) = group_of(4);
    let members: Vec<_> = ls
        .iter()
        .enumerate()
        .map(|(i, l)| (i as u32, l.as_fd()))
        .collect();
    group.set_members(&members).unwrap();
    group.attach(ls[0].as_fd()).unwrap();
    let refs: Vec<&Socket> = ls.iter().collect();
    let tally = sequential(addr, &refs, 200);
    assert_eq!(tally, vec![50, 50, 50, 50]);
    assert_eq!(steered(&group, &[0, 1, 2, 3]), vec![50, 50, 50, 50]);
    assert_eq!(group.fallbacks(), Default::default());
    assert_eq!(group.tickets(), 200);
    assert_eq!(group.count(4), SlotCount::default());
}

#[test]
fn strict_rotation_over_ipv6_listeners() {
    let Some(mut group) = new_group(4) else {
        return;
    };
    let v6 = |addr: SocketAddr| {
        let s = Socket::new(Domain::IPV6, Type::STREAM, None).unwrap();
        s.set_reuse_port(true).unwrap();
        s.bind(&addr.into()).unwrap();
        s.listen(64).unwrap();
        s.set_nonblocking(true).unwrap();
        s
    };
    let first = v6("[::1]:0".parse().unwrap());
    let addr = first.local_addr().unwrap().as_socket().unwrap();
    let ls = [first, v6(addr), v6(addr)];
    let members: Vec<_> = ls
        .iter()
        .enumerate()
        .map(|(i, l)| (i as u32, l.as_fd()))
        .collect();
    group.set_members(&members).unwrap();
    group.attach(ls[2].as_fd()).unwrap();
    let refs: Vec<&Socket> = ls.iter().collect();
    assert_eq!(sequential(addr, &refs, 30), vec![10, 10, 10]);
}

#[test]
fn a_removed_slot_is_skipped_and_rejoins_with_a_fresh_listener() {
    let Some(mut group) = new_group(8) else {
        return;
    };
    let (mut ls, addr) = group_of(4);
    // Slot ids need not be dense nor start at 0: use 1..=4, as worker ids.
    for (i, l) in ls.iter().enumerate() {
        group.insert(i as u32 + 1, l.as_fd()).unwrap();
    }
    group.attach(ls[3].as_fd()).unwrap();

    // Slot 3 leaves (its worker is draining): it gets nothing, the others exactly a third each.
    group.remove(3).unwrap();
    assert_eq!(group.members().len(), 3);
    let refs: Vec<&Socket> = ls.iter().collect();
    assert_eq!(sequential(addr, &refs, 150), vec![50, 50, 0, 50]);

    // Its worker is replaced: the old listener closes, a fresh one joins the group and the
    // rotation when the new worker is online.
    ls[2] = listener(addr);
    let members: Vec<_> = ls
        .iter()
        .enumerate()
        .map(|(i, l)| (i as u32 + 1, l.as_fd()))
        .collect();
    group.set_members(&members).unwrap();
    let refs: Vec<&Socket> = ls.iter().collect();
    assert_eq!(sequential(addr, &refs, 200), vec![50, 50, 50, 50]);

    assert_eq!(steered(&group, &[1, 2, 3, 4]), vec![100, 100, 50, 100]);
    assert_eq!(group.fallbacks(), Default::default());

    // set_members with fewer slots removes the rest; with the same slots it changes nothing.
    group.set_members(&members[..2]).unwrap();
    assert_eq!(group.members(), &[1, 2]);
    let refs: Vec<&Socket> = ls.iter().collect();
    assert_eq!(sequential(addr, &refs, 10), vec![5, 5, 0, 0]);
}

#[test]
fn no_member_online_falls_back_to_hash_and_counts_it() {
    let Some(group) = new_group(4) else { return };
    let (ls, addr) = group_of(2);
    group.attach(ls[0].as_fd()).unwrap();
    let refs: Vec<&Socket> = ls.iter().collect();
    let tally = sequential(addr, &refs, 10);
    assert_eq!(tally.iter().sum::<u64>(), 10);
    assert_eq!(group.fallbacks().new, 10);
    assert_eq!(group.tickets(), 0);
}

/// Scale-down done in the documented order: `remove(slot)`, then close the listener. The
/// connections queued on it (not yet accepted) move to the other listeners; none is reset.
#[test]
fn queued_connections_migrate_when_a_removed_listener_closes() {
    let Some(mut group) = new_group(4) else {
        return;
    };
    let (mut ls, addr) = group_of(3);
    let members: Vec<_> = ls
        .iter()
        .enumerate()
        .map(|(i, l)| (i as u32, l.as_fd()))
        .collect();
    group.set_members(&members).unwrap();
    group.attach(ls[0].as_fd()).unwrap();

    let mut clients: Vec<TcpStream> = (0..30).map(|_| TcpStream::connect(addr).unwrap()).collect();
    let refs: Vec<&Socket> = ls.iter().collect();
    wait_queued(&refs, 30);
    assert_eq!(
        refs.iter().map(|l| queued(l)).collect::<Vec<_>>(),
        vec![10, 10, 10]
    );

    group.remove(0).unwrap();
    drop(ls.remove(0));
    let refs: Vec<&Socket> = ls.iter().collect();
    let tally = drain_and_check(&refs, &mut clients, 30);
    assert_eq!(tally, vec![15, 15]);

    assert_eq!(steered(&group, &[0, 1, 2]), vec![10, 10, 10]);
    let migrated: Vec<u64> = [0, 1, 2]
        .iter()
        .map(|&s| group.count(s).migrated_in)
        .collect();
    assert_eq!(migrated, vec![0, 5, 5]);
    let gone: Vec<u64> = [0, 1, 2]
        .iter()
        .map(|&s| group.count(s).migrated_out)
        .collect();
    assert_eq!(gone, vec![10, 0, 0]);
    // What each slot's workers were given: slot 0 none, the others their own and half of 0's.
    let received: Vec<u64> = [0, 1, 2]
        .iter()
        .map(|&s| group.count(s).received())
        .collect();
    assert_eq!(received, vec![0, 15, 15]);
    assert_eq!(group.fallbacks(), Default::default());
}

/// The careless order: the listener closes while still in the rotation. The kernel takes it out
/// of the sockarray itself; the program's selection of it fails, it falls back to hash (counted)
/// and the queued connections still migrate, none reset.
#[test]
fn queued_connections_migrate_even_if_the_listener_closes_before_remove() {
    let Some(mut group) = new_group(4) else {
        return;
    };
    let (mut ls, addr) = group_of(3);
    let members: Vec<_> = ls
        .iter()
        .enumerate()
        .map(|(i, l)| (i as u32, l.as_fd()))
        .collect();
    group.set_members(&members).unwrap();
    group.attach(ls[0].as_fd()).unwrap();

    let mut clients: Vec<TcpStream> = (0..30).map(|_| TcpStream::connect(addr).unwrap()).collect();
    let refs: Vec<&Socket> = ls.iter().collect();
    wait_queued(&refs, 30);

    drop(ls.remove(0));
    let refs: Vec<&Socket> = ls.iter().collect();
    let tally = drain_and_check(&refs, &mut clients, 30);
    assert_eq!(tally.iter().sum::<u64>(), 30);
    let f = group.fallbacks();
    let migrated_in: u64 = [1, 2].iter().map(|&s| group.count(s).migrated_in).sum();
    assert_eq!(migrated_in + f.migrated, 10, "{f:?}");
    assert_eq!(group.count(0).migrated_out, 10);
    assert!(
        f.migrated > 0,
        "the closed slot was still in the ring: some selections must fail"
    );

    // remove() after the kernel already dropped the socket from the sockarray is fine.
    group.remove(0).unwrap();
    assert_eq!(group.members(), &[2, 1]);

    // And the slot comes back with a fresh listener, in strict rotation again.
    ls.insert(0, listener(addr));
    group.insert(0, ls[0].as_fd()).unwrap();
    let refs: Vec<&Socket> = ls.iter().collect();
    assert_eq!(sequential(addr, &refs, 30), vec![10, 10, 10]);
}

/// The control for the two tests above: without a program, closing a listener resets the
/// connections queued on it.
#[test]
fn without_a_program_queued_connections_are_reset() {
    let (mut ls, addr) = group_of(2);
    let mut clients: Vec<TcpStream> = (0..40).map(|_| TcpStream::connect(addr).unwrap()).collect();
    let refs: Vec<&Socket> = ls.iter().collect();
    wait_queued(&refs, 40);
    let on_first = queued(&ls[0]);
    assert!(
        on_first > 0,
        "hash put nothing on the first listener; cannot test"
    );
    drop(ls.remove(0));
    // The resets are sent as the listener closes; poll the clients until they have all arrived.
    for c in &clients {
        c.set_nonblocking(true).unwrap();
    }
    let mut was_reset = vec![false; clients.len()];
    let deadline = Instant::now() + Duration::from_secs(5);
    while (was_reset.iter().filter(|&&r| r).count() as u32) < on_first {
        assert!(
            Instant::now() < deadline,
            "only some of the {on_first} resets arrived"
        );
        for (c, r) in clients.iter_mut().zip(was_reset.iter_mut()) {
            let mut b = [0u8; 1];
            match c.read(&mut b) {
                _ if *r => {}
                Err(e) if e.kind() == ErrorKind::ConnectionReset => *r = true,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                other => panic!("unexpected read result {other:?}"),
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    // And no more than those: the other listener's connections are intact.
    std::thread::sleep(Duration::from_millis(20));
    for (c, r) in clients.iter_mut().zip(&was_reset) {
        if !r {
            let mut b = [0u8; 1];
            let e = c.read(&mut b).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::WouldBlock, "{e}");
        }
    }
}

/// The stretch for plain `reuseport`: the two-instruction program keeps hash selection and adds
/// migration.
#[test]
fn migrate_only_program_keeps_hashing_and_migrates() {
    let m = match MigrateOnly::new() {
        Ok(m) => m,
        Err(e @ BpfError::Unsupported { .. }) => {
            eprintln!("SKIPPED: the kernel refuses BPF: {e}");
            return;
        }
        Err(e) => panic!("{e}"),
    };
    let (mut ls, addr) = group_of(2);
    m.attach(ls[1].as_fd()).unwrap();
    let mut clients: Vec<TcpStream> = (0..40).map(|_| TcpStream::connect(addr).unwrap()).collect();
    let refs: Vec<&Socket> = ls.iter().collect();
    wait_queued(&refs, 40);
    // Hash, not rotation: both got some (40 connections: the chance one gets all is 2^-39).
    assert!(queued(&ls[0]) > 0 && queued(&ls[1]) > 0);
    drop(ls.remove(0));
    let refs: Vec<&Socket> = ls.iter().collect();
    assert_eq!(drain_and_check(&refs, &mut clients, 40), vec![40]);
}

#[test]
fn several_groups_rotate_independently() {
    let Some(mut a) = new_group(4) else { return };
    let Some(mut b) = new_group(4) else { return };
    let (la, addr_a) = group_of(2);
    let (lb, addr_b) = group_of(3);
    a.set_members(&[(0, la[0].as_fd()), (1, la[1].as_fd())])
        .unwrap();
    b.set_members(&[(0, lb[0].as_fd()), (1, lb[1].as_fd()), (2, lb[2].as_fd())])
        .unwrap();
    a.attach(la[0].as_fd()).unwrap();
    b.attach(lb[0].as_fd()).unwrap();
    // A socket can be in one sockarray only.
    assert!(matches!(
        a.insert(2, lb[0].as_fd()),
        Err(BpfError::Member { slot: 2, .. })
    ));
    let ra: Vec<&Socket> = la.iter().collect();
    let rb: Vec<&Socket> = lb.iter().collect();
    for _ in 0..10 {
        assert_eq!(sequential(addr_a, &ra, 2), vec![1, 1]);
        assert_eq!(sequential(addr_b, &rb, 3), vec![1, 1, 1]);
    }
    assert_eq!(steered(&a, &[0, 1]), vec![10, 10]);
    assert_eq!(steered(&b, &[0, 1, 2]), vec![10, 10, 10]);
}

#[test]
fn bad_slots_and_sockets_are_refused_with_their_reason() {
    let Some(mut group) = new_group(4) else {
        return;
    };
    let (ls, _) = group_of(1);
    assert!(matches!(
        group.insert(4, ls[0].as_fd()),
        Err(BpfError::SlotOutOfRange { .. })
    ));
    assert!(matches!(RrGroup::new(0), Err(BpfError::BadMaxSlots(0))));
    // Not listening: the kernel refuses it (EINVAL), and the rotation is left unchanged.
    let unbound = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    let e = group.insert(0, unbound.as_fd()).unwrap_err();
    assert!(matches!(e, BpfError::Member { slot: 0, .. }), "{e}");
    assert!(group.members().is_empty());
}

/// Re-runs this test binary's test `name` under `setpriv` with `caps` as the only capabilities
/// (`-all` for none) and returns its output.
fn rerun_with_caps(name: &str, bounding: &str) -> std::process::Output {
    let exe = std::env::current_exe().unwrap();
    let out = Command::new("setpriv")
        .args([
            "--inh-caps=-all",
            &format!("--bounding-set={bounding}"),
            "--",
        ])
        .arg(&exe)
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, "1")
        .output()
        .expect("could not run setpriv (util-linux)");
    let show = format!(
        "command: setpriv --inh-caps=-all --bounding-set={bounding} -- {} --exact {name}\n\
         status: {}\nstdout:\n{}\nstderr:\n{}",
        exe.display(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{show}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("CHILD-OK"),
        "{show}"
    );
    out
}

#[test]
fn without_cap_bpf_the_error_is_missing_capability() {
    const NAME: &str = "without_cap_bpf_the_error_is_missing_capability";
    if std::env::var_os(CHILD_ENV).is_some() {
        match RrGroup::new(4) {
            Err(e @ BpfError::MissingCapability { .. }) => {
                let line = e.to_string();
                assert!(!line.contains('\n'));
                println!("CHILD-OK {line}");
            }
            Err(e) => panic!("expected MissingCapability, got: {e}"),
            Ok(_) => panic!("RrGroup::new succeeded without any capability"),
        }
        match MigrateOnly::new() {
            Err(BpfError::MissingCapability { .. }) => {}
            Err(e) => panic!("expected MissingCapability, got: {e}"),
            Ok(_) => panic!("MigrateOnly::new succeeded without any capability"),
        }
        return;
    }
    if new_group(1).is_none() {
        return;
    }
    let out = rerun_with_caps(NAME, "-all");
    let stdout = String::from_utf8_lossy(&out.stdout);
    // libtest prints `test NAME ... ` before the test's own output on the same line.
    let line = stdout
        .lines()
        .find_map(|l| l.split_once("CHILD-OK "))
        .unwrap()
        .1;
    println!("{line}");
    assert!(
        line.contains("CAP_BPF") && line.contains("--policy rr"),
        "{line}"
    );
}

/// CAP_BPF alone (no CAP_SYS_ADMIN, CAP_NET_ADMIN or CAP_PERFMON) is enough for everything.
#[test]
fn only_cap_bpf_is_enough() {
    const NAME: &str = "only_cap_bpf_is_enough";
    if std::env::var_os(CHILD_ENV).is_some() {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let eff = status
            .lines()
            .find(|l| l.starts_with("CapEff:"))
            .unwrap()
            .to_string();
        // CAP_BPF is capability 39.
        assert_eq!(
            eff.split_whitespace().nth(1),
            Some("0000008000000000"),
            "{eff}"
        );
        let mut group = RrGroup::new(4).unwrap();
        let (ls, addr) = group_of(4);
        let members: Vec<_> = ls
            .iter()
            .enumerate()
            .map(|(i, l)| (i as u32, l.as_fd()))
            .collect();
        group.set_members(&members).unwrap();
        group.attach(ls[0].as_fd()).unwrap();
        let refs: Vec<&Socket> = ls.iter().collect();
        assert_eq!(sequential(addr, &refs, 40), vec![10, 10, 10, 10]);
        assert_eq!(steered(&group, &[0, 1, 2, 3]), vec![10, 10, 10, 10]);
        MigrateOnly::new().unwrap();
        println!("CHILD-OK with {eff}");
        return;
    }
    if new_group(1).is_none() {
        return;
    }
    rerun_with_caps(NAME, "-all,+bpf");
}

/// A worker of the load test: a thread accepting on its own listener and answering each
/// connection with one line, until told to stop; then its listener closes.
struct LoadWorker {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<u64>,
    listener: Arc<Socket>,
}

fn wait_readable(l: &Socket, ms: i32) -> bool {
    let mut pfd = libc::pollfd {
        fd: l.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd on our stack, for the duration of the call.
    unsafe { libc::poll(&mut pfd, 1, ms) > 0 }
}

fn spawn_load_worker(l: Socket) -> LoadWorker {
    let listener = Arc::new(l);
    let stop = Arc::new(AtomicBool::new(false));
    let (l, s) = (listener.clone(), stop.clone());
    let thread = std::thread::spawn(move || {
        let mut served = 0;
        while !s.load(Ordering::Relaxed) {
            if !wait_readable(&l, 20) {
                continue;
            }
            match l.accept() {
                Ok((c, _)) => {
                    c.set_nonblocking(false).unwrap();
                    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                    let mut c = TcpStream::from(c);
                    let mut buf = [0u8; 16];
                    let mut got = 0;
                    while !buf[..got].contains(&b'\n') {
                        match c.read(&mut buf[got..]) {
                            Ok(0) | Err(_) => break,
                            Ok(k) => got += k,
                        }
                    }
                    let _ = c.write_all(b"ok\n");
                    served += 1;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => panic!("accept: {e}"),
            }
        }
        served
    });
    LoadWorker {
        stop,
        thread,
        listener,
    }
}

impl LoadWorker {
    /// Stops accepting; the listener stays open (and keeps queueing) until the caller drops it.
    /// Returns the connections served and the listener.
    fn stop(self) -> (u64, Arc<Socket>) {
        self.stop.store(true, Ordering::Relaxed);
        (self.thread.join().unwrap(), self.listener)
    }

    /// Stops accepting and closes the listener: what a draining worker does.
    fn drain(self) -> u64 {
        self.stop().0
    }
}

/// One connection-per-request client: connect, send a line, read the answer to EOF.
fn one_request(addr: SocketAddr) -> std::io::Result<()> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET\n")?;
    let mut answer = Vec::new();
    s.read_to_end(&mut answer)?;
    if answer != b"ok\n" {
        return Err(std::io::Error::other(format!("answer {answer:?}")));
    }
    Ok(())
}

/// Issue 15's scale test, in process: `Connection: close` load from two clients while slots
/// are drained (remove from the rotation, stop accepting, close the listener) and brought back
/// with fresh listeners, three times. Not one client error.
#[test]
fn scale_down_and_up_under_connection_per_request_load_loses_nothing() {
    let Some(mut group) = new_group(8) else {
        return;
    };
    let (ls, addr) = group_of(4);
    let mut workers: Vec<Option<LoadWorker>> = Vec::new();
    for (slot, l) in ls.into_iter().enumerate() {
        group.insert(slot as u32, l.as_fd()).unwrap();
        if slot == 0 {
            group.attach(l.as_fd()).unwrap();
        }
        workers.push(Some(spawn_load_worker(l)));
    }

    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..2)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let (mut ok, mut errors) = (0u64, Vec::new());
                while !stop.load(Ordering::Relaxed) {
                    match one_request(addr) {
                        Ok(()) => ok += 1,
                        Err(e) => errors.push(e.to_string()),
                    }
                }
                (ok, errors)
            })
        })
        .collect();

    let phase = Duration::from_millis(250);
    let mut served = 0;
    std::thread::sleep(phase);
    for slot in [3u32, 0, 1] {
        let worker = workers[slot as usize].take().unwrap();
        if slot == 1 {
            // A worker that hangs: it stops accepting while still in the rotation, connections
            // (and the clients waiting on them) pile up in its queue until the primary notices,
            // takes it out and closes its listener. They migrate, requests and all.
            let (k, l) = worker.stop();
            served += k;
            let deadline = Instant::now() + Duration::from_secs(5);
            while queued(&l) == 0 {
                assert!(
                    Instant::now() < deadline,
                    "nothing queued on the hung worker"
                );
                std::thread::sleep(Duration::from_millis(1));
            }
            std::thread::sleep(Duration::from_millis(20));
            group.remove(slot).unwrap();
            drop(l);
        } else {
            // Scale down: out of the rotation first, then the worker drains and its listener
            // closes.
            group.remove(slot).unwrap();
            served += worker.drain();
        }
        std::thread::sleep(phase);
        // Back up: a fresh listener, in the rotation once its worker runs.
        let l = listener(addr);
        group.insert(slot, l.as_fd()).unwrap();
        workers[slot as usize] = Some(spawn_load_worker(l));
        std::thread::sleep(phase);
    }
    stop.store(true, Ordering::Relaxed);
    let (mut ok, mut errors) = (0, Vec::new());
    for c in clients {
        let (k, e) = c.join().unwrap();
        ok += k;
        errors.extend(e);
    }
    for w in workers.into_iter().flatten() {
        served += w.drain();
    }

    // Read through a counters handle, as the admin endpoint would, after the group is gone.
    let counters = group.counters();
    drop(group);
    let counts = counters.counts();
    let steered: u64 = counts.iter().map(|c| c.steered).sum();
    let migrated: u64 = counts.iter().map(|c| c.migrated_in).sum();
    let migrated_out: u64 = counts.iter().map(|c| c.migrated_out).sum();
    let received: u64 = counts.iter().map(|c| c.received()).sum();
    let f = counters.fallbacks();
    println!(
        "{ok} requests, {} errors, {served} served, steered {steered}, migrated {migrated}, \
         fallbacks {f:?}, per slot {:?}",
        errors.len(),
        &counts[..4]
    );
    assert!(
        errors.is_empty(),
        "client errors: {:?}",
        &errors[..errors.len().min(10)]
    );
    assert!(ok > 100, "too little load to mean anything: {ok}");
    assert_eq!(served, ok);
    // Every connection was selected by the program, once (no SYN was dropped and retried).
    assert_eq!(steered + f.new, ok);
    assert!(
        migrated + f.migrated > 0,
        "the hung worker's queue did not migrate"
    );
    assert_eq!(migrated_out, migrated + f.migrated);
    // In all, what the program says the slots received is what the workers served.
    assert_eq!(received + f.new + f.migrated, ok);
}

/// Why the doc says to attach on a *listening* socket: attaching to a socket that is only bound
/// gives it a reuseport group of its own, and its `listen` then fails with `EADDRINUSE` instead
/// of joining the address's group (Linux 6.18).
#[test]
fn attach_before_listen_on_a_joining_socket_breaks_its_listen() {
    let Some(group) = new_group(4) else { return };
    let first = listener("127.0.0.1:0".parse().unwrap());
    let addr = first.local_addr().unwrap().as_socket().unwrap();
    let second = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    second.set_reuse_port(true).unwrap();
    second.bind(&addr.into()).unwrap();
    group.attach(second.as_fd()).unwrap();
    let e = second.listen(64).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::AddrInUse, "{e}");
}
