//! `roundhouse upgrade` / `SIGUSR2`: the primary re-executes the binary at the path it was
//! started from, keeping its pid, its workers (same pids, still its children), its listeners,
//! its counters and every connection in flight; a binary that cannot take over leaves the old
//! primary serving, untouched.
//!
//! Each primary runs from its own copy of the `roundhouse` binary in its temp dir; "a new
//! binary" is a fresh copy renamed over it (a new inode, as a package manager installs one).

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{
    get, pid_alive, ready_unless_bpf_refused, roundhouse_bin, wait_until, Gate, HttpConn, Load,
    LoadMode, LoadReport, Primary, PrimaryBuilder, Signal, POLL,
};

/// Copies the `roundhouse` binary to `dir/roundhouse` and returns its path.
fn own_binary(dir: &Path) -> PathBuf {
    let path = dir.join("roundhouse");
    install(&path, Path::new(roundhouse_bin()));
    path
}

/// Installs `from` at `path` the way a package manager does: a new file renamed over the old.
/// The copy is made by `cp`, not by this process: a file this process had open for writing
/// would be inherited by every child another test forks meanwhile, and executing it would
/// fail with ETXTBSY until they exec.
fn install(path: &Path, from: &Path) {
    let tmp = path.with_extension("new");
    let ok = std::process::Command::new("cp")
        .arg(from)
        .arg(&tmp)
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "cp {} {}", from.display(), tmp.display());
    std::fs::rename(&tmp, path).unwrap();
}

/// Installs a file with `body` (mode `mode`) at `path`.
fn install_bytes(path: &Path, body: &[u8], mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    let src = path.with_extension("src");
    std::fs::write(&src, body).unwrap();
    std::fs::set_permissions(&src, std::fs::Permissions::from_mode(mode)).unwrap();
    install(path, &src);
}

/// Installs at `bin` a shell script that runs `before` (e.g. a sleep), then executes a copy
/// of the real binary with the same arguments.
fn install_wrapper(bin: &Path, before: &str) {
    let real = bin.with_extension("real");
    install(&real, Path::new(roundhouse_bin()));
    let script = format!("#!/bin/sh\n{before}\nexec '{}' \"$@\"\n", real.display());
    install_bytes(bin, script.as_bytes(), 0o755);
}

/// `roundhouse CMD --control <p's socket>` on a thread of its own.
fn in_background(p: &Primary, cmd: &str) -> std::thread::JoinHandle<std::process::Output> {
    common::roundhouse_in_background(&[cmd, "--control", p.control().to_str().unwrap()])
}

/// Starts `roundhouse run ARGS -- hello-worker` from its own copy of the binary.
fn start(workers: usize, args: &[&str]) -> (Primary, PathBuf) {
    let b = Primary::builder()
        .workers(workers)
        .args(&[&["--admin", "127.0.0.1:0"], args].concat());
    let (p, bin) = start_from(b);
    p.wait_ready();
    (p, bin)
}

/// Starts what `b` describes from its own copy of the binary (not waiting for ready).
fn start_from(b: PrimaryBuilder) -> (Primary, PathBuf) {
    let bin = own_binary(b.temp_dir().path());
    let run_args = b.run_args();
    let p = b.start_program(bin.to_str().unwrap(), &run_args);
    (p, bin)
}

fn open_fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// The primary's open fds by kind (`socket`, `pipe`, `anon_inode:[eventpoll]`, a path...):
/// what an upgrade carries are sockets and pipes; each runtime has its own anon inodes.
fn fd_kinds(pid: i32) -> BTreeMap<String, usize> {
    let mut kinds = BTreeMap::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
    {
        let Ok(target) = std::fs::read_link(e.path()) else {
            continue;
        };
        let t = target.display().to_string();
        let kind = match t.split_once(':') {
            Some((k, _)) if k == "socket" || k == "pipe" => k.to_string(),
            _ => t,
        };
        *kinds.entry(kind).or_default() += 1;
    }
    kinds
}

fn parent_of(pid: i32) -> Option<i32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("PPid:"))
        .and_then(|v| v.trim().parse().ok())
}

/// `/stats`' view: worker id → pid of every worker.
fn worker_pids(p: &Primary) -> BTreeMap<u32, i32> {
    p.stats()["workers"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|w| Some((w["id"].as_u64()? as u32, w["pid"].as_i64()? as i32)))
        .collect()
}

/// The primary's fd count once it has not changed for 200 ms.
fn settled_fds(pid: i32) -> usize {
    let mut last = open_fds(pid);
    let mut since = std::time::Instant::now();
    while since.elapsed() < Duration::from_millis(200) {
        std::thread::sleep(Duration::from_millis(10));
        let now = open_fds(pid);
        if now != last {
            last = now;
            since = std::time::Instant::now();
        }
    }
    last
}

fn connections_total(p: &Primary) -> u64 {
    p.stats()["totals"]["connections_total"].as_u64().unwrap()
}

/// Runs `roundhouse upgrade` and asserts it worked.
fn upgrade_ok(p: &Primary) -> String {
    let out = p.client(&["upgrade"]);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "upgrade failed: {}{}\n--- log ---\n{}",
        stdout,
        String::from_utf8_lossy(&out.stderr),
        p.log()
    );
    assert!(stdout.contains("upgraded"), "{stdout}");
    stdout
}

fn no_failures(r: &LoadReport, p: &Primary) {
    assert!(
        r.failures.is_empty(),
        "{} failed of {}: {:?}\n--- log ---\n{}",
        r.failures.len(),
        r.ok + r.failures.len(),
        &r.failures[..r.failures.len().min(10)],
        p.log()
    );
    assert!(r.ok > 50, "too few requests to mean anything: {}", r.ok);
}

/// Every worker alive and still the primary's child (no PDEATHSIG fired, nothing re-parented).
fn children_of(p: &Primary, pids: &BTreeMap<u32, i32>) {
    for (&id, &pid) in pids {
        assert!(pid_alive(pid), "worker {id} ({pid}) died");
        assert_eq!(
            parent_of(pid),
            Some(p.pid()),
            "worker {id} ({pid}) is no longer the primary's child"
        );
    }
}

#[test]
fn two_upgrades_under_per_request_load_keep_pid_workers_counters_and_fds() {
    let (p, bin) = start(2, &[]);
    let pids = worker_pids(&p);
    let fds_before = fd_kinds(p.pid());
    let load = Load::start(p.addr(), 4, "/", LoadMode::PerRequest);
    assert!(wait_until(
        Duration::from_secs(10),
        POLL,
        || connections_total(&p) >= 100
    ));
    for round in 1..=2 {
        let before = connections_total(&p);
        install(&bin, Path::new(roundhouse_bin()));
        upgrade_ok(&p);
        assert_eq!(worker_pids(&p), pids, "round {round}: workers replaced");
        children_of(&p, &pids);
        let stats = p.stats();
        assert_eq!(stats["pid"].as_i64(), Some(p.pid() as i64));
        // The counters continue (not reset), and connections keep being served.
        assert!(connections_total(&p) >= before, "{stats}");
        assert!(wait_until(
            Duration::from_secs(10),
            POLL,
            || connections_total(&p) >= before + 100
        ));
    }
    let report = load.finish();
    no_failures(&report, &p);
    assert_eq!(p.count("upgraded: roundhouse"), 2, "{}", p.log());
    // No fd leaked or lost by the execs (measured idle, no connection in flight): the same
    // pipes (the workers' output) and no more fds than before; and a third upgrade leaves
    // exactly as many fds as it found. (The first image has one runtime more than the next
    // ones, whose owner loop runs on the main thread's runtime: its epoll, eventfd and
    // signal-driver socket are the difference.)
    let total = |k: &BTreeMap<String, usize>| k.values().sum::<usize>();
    assert!(
        wait_until(Duration::from_secs(5), POLL, || {
            let now = fd_kinds(p.pid());
            now.get("pipe") == fds_before.get("pipe") && total(&now) <= total(&fds_before)
        }),
        "before: {fds_before:?}\nafter: {:?}",
        fd_kinds(p.pid())
    );
    let after_two = settled_fds(p.pid());
    upgrade_ok(&p);
    assert!(
        wait_until(Duration::from_secs(5), POLL, || open_fds(p.pid())
            == after_two),
        "{after_two} fds after the second upgrade, {:?} after the third",
        fd_kinds(p.pid())
    );
    // The workers' output pipes were carried: what they print as they drain is in the log.
    let out = p.client(&["stop"]);
    assert!(out.status.success());
    assert!(
        wait_until(Duration::from_secs(5), POLL, || p.count("drained; exiting")
            == 2),
        "{}",
        p.log()
    );
}

#[test]
fn sigusr2_under_keep_alive_load_then_reload_scale_and_upgrade_again() {
    let (p, bin) = start(2, &[]);
    let pids = worker_pids(&p);
    let load = Load::start(p.addr(), 6, "/", LoadMode::Mixed);
    assert!(wait_until(
        Duration::from_secs(10),
        POLL,
        || connections_total(&p) >= 50
    ));
    install(&bin, Path::new(roundhouse_bin()));
    p.signal(Signal::SIGUSR2);
    p.wait_for_log("upgraded: roundhouse", Duration::from_secs(20));
    assert_eq!(worker_pids(&p), pids);
    children_of(&p, &pids);
    // The new image forks the replacements; they must survive the next upgrade too.
    let out = p.client(&["reload"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reloaded = worker_pids(&p);
    assert!(reloaded
        .values()
        .all(|pid| !pids.values().any(|old| old == pid)));
    let out = p.client(&["scale", "3"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let scaled = worker_pids(&p);
    assert_eq!(scaled.len(), 3, "{scaled:?}");
    upgrade_ok(&p);
    assert_eq!(worker_pids(&p), scaled);
    children_of(&p, &scaled);
    let report = load.finish();
    no_failures(&report, &p);
    let out = p.client(&["status"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("primary pid {}", p.pid())));
}

#[test]
fn a_binary_that_cannot_take_over_fails_the_upgrade_and_the_old_primary_keeps_serving() {
    let (p, bin) = start(2, &[]);
    let pids = worker_pids(&p);
    type Make<'a> = Box<dyn Fn() + 'a>;
    let cases: [(&str, Make); 4] = [
        (
            "exec format error",
            Box::new(|| install_bytes(&bin, b"\x7fELF garbage, not a program", 0o755)),
        ),
        (
            "not executable",
            Box::new(|| {
                install(&bin, Path::new(roundhouse_bin()));
                install_bytes(&bin, &std::fs::read(roundhouse_bin()).unwrap(), 0o644)
            }),
        ),
        (
            "no such file",
            Box::new(|| {
                let _ = std::fs::remove_file(&bin);
            }),
        ),
        (
            "cannot take over: roundhouse 99 cannot read",
            Box::new(|| {
                install_bytes(
                    &bin,
                    b"#!/bin/sh\necho 'roundhouse 99 cannot read upgrade state version 1' >&2\nexit 1\n",
                    0o755,
                )
            }),
        ),
    ];
    for (why, make) in cases {
        make();
        let out = p.client(&["upgrade"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{why}: {stderr}");
        assert!(stderr.contains("upgrade failed"), "{why}: {stderr}");
        assert!(stderr.contains(why), "wanted '{why}' in: {stderr}");
        // Untouched: same pid, same workers, serving.
        assert_eq!(worker_pids(&p), pids, "{why}");
        assert_eq!(get(p.addr(), "/").unwrap().status, 200, "{why}");
    }
    // And a good binary afterwards still works.
    install(&bin, Path::new(roundhouse_bin()));
    upgrade_ok(&p);
    assert_eq!(worker_pids(&p), pids);
    assert_eq!(get(p.addr(), "/").unwrap().status, 200);
}

#[test]
fn upgrade_during_a_reload_is_refused_with_a_reason() {
    let b = Primary::builder().workers(1);
    let gate = Gate::new(b.temp_dir(), "gate");
    gate.open();
    let b = b.cmd(&gate.worker_cmd());
    let bin = own_binary(b.temp_dir().path());
    let run_args = b.run_args();
    let p = b.start_program(bin.to_str().unwrap(), &run_args);
    p.wait_ready();
    gate.close();
    // The reload waits for its replacement, which waits for the gate.
    let reload = in_background(&p, "reload");
    p.wait_for_log("worker started worker.id=1", Duration::from_secs(10));
    assert!(wait_until(Duration::from_secs(10), POLL, || p
        .count("worker started")
        >= 2));
    let out = p.client(&["upgrade"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("a reload is running"), "{stderr}");
    gate.open();
    assert!(reload.join().unwrap().status.success());
    upgrade_ok(&p);
}

/// The number in a `field=N` of the last log line containing `msg`.
fn logged_number(p: &Primary, msg: &str, field: &str) -> u64 {
    let line = p.wait_for_log(msg, Duration::from_secs(10));
    common::log_field(&line, field)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {field}= in {line}"))
}

#[test]
fn connections_in_flight_to_a_stopped_worker_are_acknowledged_to_the_new_image() {
    let (p, bin) = start(2, &[]);
    let pids = worker_pids(&p);
    // Worker 1 stops reading its channel: what rr hands it stays unacknowledged.
    let stopped = p.signal_worker(1, Signal::SIGSTOP);
    let addr = p.addr();
    let clients: Vec<_> = (0..6)
        .map(|_| std::thread::spawn(move || get(addr, "/whoami").map(|r| r.status)))
        .collect();
    // Worker 2 answers its share at once; the rest wait in worker 1's window.
    assert!(wait_until(Duration::from_secs(10), POLL, || {
        p.stats()["workers"][1]["connections_total"].as_u64() >= Some(3)
    }));
    install(&bin, Path::new(roundhouse_bin()));
    upgrade_ok(&p);
    let carried = logged_number(&p, "upgraded: roundhouse", "inflight");
    assert!(carried >= 1, "nothing was in flight: {}", p.log());
    common::signal_pid(stopped, Signal::SIGCONT);
    for c in clients {
        assert_eq!(c.join().unwrap().unwrap(), 200);
    }
    assert_eq!(worker_pids(&p), pids);
    let stats = p.stats();
    assert_eq!(
        stats["totals"]["connections_lost"].as_u64(),
        Some(0),
        "{stats}"
    );
}

#[test]
fn a_worker_still_starting_at_the_upgrade_comes_online_in_the_new_image() {
    let b = Primary::builder()
        .workers(2)
        .args(&["--admin", "127.0.0.1:0"]);
    let gate = Gate::new(b.temp_dir(), "gate");
    gate.open();
    let (p, bin) = start_from(b.cmd(&gate.worker_cmd()));
    p.wait_ready();
    gate.close();
    // Worker 2 is killed; its replacement waits at the gate (started, not online).
    p.signal_worker(2, Signal::SIGKILL);
    assert!(wait_until(Duration::from_secs(10), POLL, || p
        .count("worker started worker.id=2")
        >= 2));
    install(&bin, Path::new(roundhouse_bin()));
    upgrade_ok(&p);
    let upgraded_at = p.count("worker online worker.id=2");
    assert_eq!(upgraded_at, 1, "{}", p.log());
    gate.open();
    assert!(
        wait_until(Duration::from_secs(10), POLL, || p
            .count("worker online worker.id=2")
            == 2),
        "{}",
        p.log()
    );
    let states: Vec<String> = p.stats()["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["state"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(states, ["online", "online"]);
}

#[test]
fn systemd_is_told_reloading_then_ready_with_the_same_mainpid() {
    let b = Primary::builder().workers(1);
    let path = b.temp_dir().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let (p, bin) = start_from(b.env("NOTIFY_SOCKET", path.to_str().unwrap()));
    let recv = || -> String {
        let mut buf = [0u8; 4096];
        let n = sock.recv(&mut buf).expect("nothing on NOTIFY_SOCKET");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    assert_eq!(recv(), "READY=1");
    install(&bin, Path::new(roundhouse_bin()));
    upgrade_ok(&p);
    assert!(recv().starts_with("RELOADING=1\nMONOTONIC_USEC="));
    assert_eq!(recv(), format!("READY=1\nMAINPID={}", p.pid()));
}

#[test]
fn a_sticky_connection_waiting_for_its_header_crosses_the_upgrade() {
    let (p, bin) = start(
        2,
        &[
            "--policy",
            "sticky",
            "--sticky-key",
            "header:X-Forwarded-For",
        ],
    );
    // Connected, head not sent: the primary is peeking at it when it upgrades.
    let mut conn = HttpConn::connect(p.addr()).unwrap();
    install(&bin, Path::new(roundhouse_bin()));
    upgrade_ok(&p);
    let r = conn.get("/whoami").unwrap();
    assert_eq!(r.status, 200);
    // Counted when the worker's acknowledgement is read (soon after, not before, the answer).
    assert!(
        wait_until(Duration::from_secs(5), POLL, || connections_total(&p) == 1),
        "{}",
        p.stats()
    );
}

#[test]
fn reuseport_rr_keeps_its_exact_rotation_and_counts_across_an_upgrade() {
    let b =
        Primary::builder()
            .workers(3)
            .args(&["--policy", "reuseport-rr", "--admin", "127.0.0.1:0"]);
    let (p, bin) = start_from(b);
    let Some(p) = ready_unless_bpf_refused(p) else {
        return;
    };
    let load = Load::start(p.addr(), 4, "/", LoadMode::PerRequest);
    assert!(wait_until(
        Duration::from_secs(10),
        POLL,
        || connections_total(&p) >= 100
    ));
    let before = connections_total(&p);
    install(&bin, Path::new(roundhouse_bin()));
    upgrade_ok(&p);
    assert!(connections_total(&p) >= before);
    no_failures(&load.finish(), &p);
    // Still exact: 30 connections one after another, 10 each.
    let r = ureq_reset(&p);
    assert!(r, "reset");
    for _ in 0..30 {
        assert_eq!(get(p.addr(), "/").unwrap().status, 200);
    }
    let counts: Vec<u64> = p.stats()["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["connections_total"].as_u64().unwrap())
        .collect();
    assert_eq!(counts, [10, 10, 10]);
}

/// `POST /stats/reset` on the admin endpoint.
fn ureq_reset(p: &Primary) -> bool {
    common::request(p.admin_addr(), "POST", "/stats/reset", b"")
        .map(|r| r.status == 200)
        .unwrap_or(false)
}

#[test]
fn node_workers_keep_their_channel_and_handles_across_an_upgrade() {
    if !common::installed("node") {
        eprintln!("SKIPPED: `node` is not installed");
        return;
    }
    let app = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/node/app.js");
    let b = Primary::builder()
        .workers(2)
        .args(&["--node", "--admin", "127.0.0.1:0"])
        .cmd(&["node", app]);
    let (p, bin) = start_from(b);
    p.wait_ready();
    let pids = worker_pids(&p);
    let load = Load::start(p.addr(), 4, "/", LoadMode::Mixed);
    assert!(wait_until(
        Duration::from_secs(10),
        POLL,
        || connections_total(&p) >= 50
    ));
    for _ in 0..2 {
        install(&bin, Path::new(roundhouse_bin()));
        upgrade_ok(&p);
    }
    let before = connections_total(&p);
    assert!(wait_until(
        Duration::from_secs(10),
        POLL,
        || connections_total(&p) >= before + 50
    ));
    no_failures(&load.finish(), &p);
    assert_eq!(worker_pids(&p), pids);
    children_of(&p, &pids);
    // Messages still flow both ways on the carried channels.
    let out = p.client(&["send", "--to", "all", r#"{"ping":1}"#]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn plain_workers_keep_their_listeners_and_output_across_an_upgrade() {
    if !common::installed("python3") {
        eprintln!("SKIPPED: python3 is not installed");
        return;
    }
    let server = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/workers/plain_server.py");
    let b = Primary::builder()
        .workers(2)
        .args(&["--plain", "--policy", "reuseport", "--admin", "127.0.0.1:0"])
        .cmd(&["python3", server]);
    let (p, bin) = start_from(b);
    p.wait_ready();
    let pids = worker_pids(&p);
    // Online at execve (a plain worker's readiness): wait until Python serves.
    assert!(wait_until(Duration::from_secs(20), POLL, || get(
        p.addr(),
        "/"
    )
    .is_ok_and(|r| r.status == 200)));
    let load = Load::start(p.addr(), 4, "/", LoadMode::PerRequest);
    std::thread::sleep(Duration::from_millis(500));
    install(&bin, Path::new(roundhouse_bin()));
    upgrade_ok(&p);
    std::thread::sleep(Duration::from_millis(500));
    no_failures(&load.finish(), &p);
    assert_eq!(worker_pids(&p), pids);
    children_of(&p, &pids);
    // A stop still drains them (SIGTERM) and waits for them.
    let out = p.client(&["stop"]);
    assert!(out.status.success());
    for pid in pids.values() {
        assert!(!pid_alive(*pid), "worker {pid} outlived the stop");
    }
}

#[test]
fn the_path_it_was_started_from_is_followed_through_a_symlink_to_the_new_version() {
    // /…/bin/roundhouse -> v1/roundhouse; the upgrade re-points it to v2/roundhouse.
    let b = Primary::builder()
        .workers(1)
        .args(&["--admin", "127.0.0.1:0"]);
    let dir = b.temp_dir().path().to_path_buf();
    for v in ["v1", "v2", "bin"] {
        std::fs::create_dir(dir.join(v)).unwrap();
    }
    install(&dir.join("v1/roundhouse"), Path::new(roundhouse_bin()));
    install(&dir.join("v2/roundhouse"), Path::new(roundhouse_bin()));
    let link = dir.join("bin/roundhouse");
    std::os::unix::fs::symlink(dir.join("v1/roundhouse"), &link).unwrap();
    let run_args = b.run_args();
    let p = b.start_program(link.to_str().unwrap(), &run_args);
    p.wait_ready();
    let exe = || std::fs::read_link(format!("/proc/{}/exe", p.pid())).unwrap();
    assert_eq!(exe(), dir.join("v1/roundhouse"));
    let tmp = dir.join("bin/roundhouse.new");
    std::os::unix::fs::symlink(dir.join("v2/roundhouse"), &tmp).unwrap();
    std::fs::rename(&tmp, &link).unwrap();
    upgrade_ok(&p);
    assert_eq!(exe(), dir.join("v2/roundhouse"));
    assert_eq!(get(p.addr(), "/").unwrap().status, 200);
}

#[test]
fn a_second_upgrade_while_the_first_is_checked_is_refused_by_command_and_by_sigusr2() {
    let (p, bin) = start(1, &[]);
    let pids = worker_pids(&p);
    // The "new binary" takes a second to answer its pre-flight, then is the real one.
    install_wrapper(&bin, "[ \"$1\" = upgrade-check ] && sleep 1");
    let first = in_background(&p, "upgrade");
    p.wait_for_log("upgrade: checking the new binary", Duration::from_secs(10));
    let out = p.client(&["upgrade"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("an upgrade is in progress"), "{stderr}");
    let out = p.client(&["reload"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("an upgrade is in progress"));
    p.signal(Signal::SIGUSR2);
    p.wait_for_log(
        "upgrade refused: an upgrade is in progress",
        Duration::from_secs(10),
    );
    let out = first.join().unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stderr),
        p.log()
    );
    assert_eq!(worker_pids(&p), pids);
    assert_eq!(get(p.addr(), "/").unwrap().status, 200);
}

#[test]
fn upgrade_check_says_what_it_cannot_read() {
    use std::io::Write;
    for (input, want) in [
        (&b"not json"[..], "not readable"),
        (
            b"{\"version\":2,\"written_by\":\"roundhouse 9.0.0\"}",
            "version 2 (from roundhouse 9.0.0)",
        ),
    ] {
        let mut child = std::process::Command::new(roundhouse_bin())
            .arg("upgrade-check")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(input).unwrap();
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains(want), "wanted {want:?} in {stderr}");
    }
    // Hidden from the help: it is the pre-flight's, not the user's.
    let help = std::process::Command::new(roundhouse_bin())
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(
        help.contains("upgrade") && !help.contains("upgrade-check"),
        "{help}"
    );
}

/// The primary's blocked-signal mask, from `/proc`.
fn sig_blocked(pid: i32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let hex = status.lines().find_map(|l| l.strip_prefix("SigBlk:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

#[test]
fn a_sigterm_sent_during_the_exec_waits_for_the_new_image_and_stops_it_gracefully() {
    let (mut p, bin) = start(2, &[]);
    let pid = p.pid();
    // SIGTERM, SIGHUP and SIGCHLD blocked together: only the upgrade's exec window does that.
    let window = |m: u64| {
        m & (1 << 14) != 0
            && m & (1 << 0) != 0
            && m & (1 << 16) != 0
            && m != u64::MAX
            && m.count_ones() < 16
    };
    let mut sent = false;
    for _ in 0..3 {
        install(&bin, Path::new(roundhouse_bin()));
        let watcher = std::thread::spawn(move || {
            let end = std::time::Instant::now() + Duration::from_secs(10);
            while std::time::Instant::now() < end {
                if sig_blocked(pid).is_some_and(window) {
                    common::signal_pid(pid, Signal::SIGTERM);
                    return true;
                }
            }
            false
        });
        let out = p.client(&["upgrade"]);
        sent = watcher.join().unwrap();
        if sent {
            break;
        }
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(sent, "never saw the exec window in three upgrades");
    // Not killed by it: the new image takes it as a graceful stop.
    let status = p.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(0), "{}", p.log());
    let log = p.log();
    let upgraded = log.find("upgraded: roundhouse").expect("the new image ran");
    let stopping = log
        .find("stopping: draining workers")
        .expect("a graceful stop");
    assert!(upgraded < stopping, "{log}");
    assert_eq!(p.count("drained; exiting"), 2, "{log}");
}

#[test]
fn a_sigterm_while_a_wrapper_script_runs_does_not_kill_the_primary() {
    let (p, bin) = start(1, &[]);
    let pids = worker_pids(&p);
    // A shell between the two images resets the signal mask; the signal must not be fatal.
    install_wrapper(&bin, "[ \"$1\" != upgrade-check ] && sleep 2");
    let upgrade = in_background(&p, "upgrade");
    p.wait_for_log("upgrade: executing the new binary", Duration::from_secs(10));
    p.signal(Signal::SIGTERM);
    let out = upgrade.join().unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stderr),
        p.log()
    );
    assert_eq!(worker_pids(&p), pids);
    assert_eq!(get(p.addr(), "/").unwrap().status, 200);
}

#[test]
fn under_reuseport_a_slot_added_after_an_upgrade_gets_its_listeners_and_serves() {
    let (p, bin) = start(2, &["--policy", "reuseport"]);
    let listeners = p.stats()["listeners"].clone();
    install(&bin, Path::new(roundhouse_bin()));
    upgrade_ok(&p);
    assert_eq!(p.stats()["listeners"], listeners);
    // The new image binds the new slot's own listeners on the same addresses.
    let out = p.client(&["scale", "3"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let served_by_3 = wait_until(Duration::from_secs(10), POLL, || {
        get(p.addr(), "/whoami").is_ok_and(|r| r.header("x-worker-id") == Some("3"))
    });
    assert!(served_by_3, "worker 3 never served:\n{}", p.log());
}
