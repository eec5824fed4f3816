//! The real owner loop, driven in-process: workers are worker-library workers on threads of
//! this test process, over real socketpairs, started, signalled and reaped through a
//! [`Spawner`] of the test's own. Breadth here (rotation, restarts, reloads, scaling, stop);
//! the spawned-binary tests in the top-level `tests/` keep signals, exit codes and what a client
//! of the real binaries sees.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use roundhouse_supervisor::spawn::{Forked, SpawnError, SpawnSpec};
use roundhouse_supervisor::spawner::{started_pipe, wake_reaper, Spawner};
use roundhouse_supervisor::{Builder, Event, ExitInfo, Handle, Policy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;

/// Ids far above any real pid (`pid_max` is at most 2^22).
const FIRST_ID: u32 = 3_000_000_000;

#[derive(Default)]
struct Shared {
    next: u32,
    /// Per worker: how to end it, and how it ended (taken by `try_wait`).
    workers: HashMap<u32, (Arc<Notify>, Option<ExitInfo>)>,
}

/// Runs each worker as a thread: a worker-library worker answering `GET` with its slot id.
#[derive(Clone, Default)]
struct Threads(Arc<Mutex<Shared>>);

impl Threads {
    /// Ends worker `pid` as SIGKILL would.
    fn kill(&self, pid: u32) {
        self.signal_(pid, Signal::SIGKILL);
    }
    fn signal_(&self, pid: u32, sig: Signal) {
        let shared = self.0.lock().unwrap();
        if let Some((stop, None)) = shared.workers.get(&pid) {
            if sig == Signal::SIGKILL || sig == Signal::SIGTERM {
                stop.notify_one();
            }
        }
    }
}

impl Spawner for Threads {
    fn spawn(&mut self, spec: &SpawnSpec<'_>) -> Result<Forked, SpawnError> {
        let id: u32 = spec
            .env
            .iter()
            .find(|(k, _)| k == "ROUNDHOUSE_WORKER_ID")
            .and_then(|(_, v)| v.to_str()?.parse().ok())
            .expect("a slot id");
        let channel: OwnedFd = spec.fds.last().expect("a channel").try_clone_to_owned()?;
        let stop = Arc::new(Notify::new());
        let pid = {
            let mut shared = self.0.lock().unwrap();
            let pid = FIRST_ID + shared.next;
            shared.next += 1;
            shared.workers.insert(pid, (stop.clone(), None));
            pid
        };
        let threads = self.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let status = rt.block_on(serve(channel, id, stop));
            threads.0.lock().unwrap().workers.get_mut(&pid).unwrap().1 = Some(status);
            wake_reaper();
        });
        Ok(Forked {
            pid,
            exec_status: started_pipe()?,
        })
    }

    fn signal(&mut self, pid: u32, sig: Signal) {
        self.signal_(pid, sig);
    }

    fn try_wait(&mut self, pid: u32) -> Option<ExitInfo> {
        let mut shared = self.0.lock().unwrap();
        let done = shared.workers.get_mut(&pid)?.1.take();
        if done.is_some() {
            shared.workers.remove(&pid);
        }
        done
    }
}

/// The worker: serves until drained (exit 0) or stopped (SIGKILL-like: everything dropped).
async fn serve(channel: OwnedFd, id: u32, stop: Arc<Notify>) -> ExitInfo {
    let worker = Arc::new(roundhouse_worker::Worker::from_fd(channel, id).expect("worker"));
    let mut listener = worker.take_listener().expect("listener");
    worker.ready();
    let mut serving = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let mut conn = match accepted {
                    Ok((conn, _)) => conn,
                    // Drained: every connection handed over was accepted; finish them, exit 0.
                    Err(e) if roundhouse_worker::is_drained(&e) => {
                        while serving.join_next().await.is_some() {}
                        return ExitInfo::Code(0);
                    }
                    Err(_) => continue,
                };
                let w = worker.clone();
                serving.spawn(async move {
                    let mut buf = [0u8; 1024];
                    let _ = conn.read(&mut buf).await;
                    let body = format!("{id}\n");
                    let _ = conn
                        .write_all(
                            format!(
                                "HTTP/1.1 200 OK\r\nx-worker-id: {id}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                                body.len()
                            )
                            .as_bytes(),
                        )
                        .await;
                    w.count_request();
                });
            }
            () = stop.notified() => return ExitInfo::Signal(9),
        }
    }
}

fn start(threads: &Threads, workers: u32, policy: Policy) -> (Handle, SocketAddr) {
    // The primary removes its control socket when it stops.
    let control = std::env::temp_dir().join(format!(
        "rh-owner-{}-{}.sock",
        std::process::id(),
        rand_id()
    ));
    let handle = Builder::new("/bin/true")
        .listen("127.0.0.1:0".parse().unwrap())
        .workers(workers)
        .policy(policy)
        .grace(Duration::from_secs(5))
        .control(control)
        .spawner(threads.clone())
        .start()
        .expect("start");
    let rt = runtime();
    let addr = rt.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let s = handle.api().stats().await.unwrap();
            if s.workers
                .iter()
                .filter(|w| w.state.as_str() == "online")
                .count()
                == workers as usize
            {
                return s.listeners[0].parse().unwrap();
            }
            assert!(Instant::now() < deadline, "workers not online: {s:?}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    (handle, addr)
}

fn rand_id() -> u32 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// One request on a new connection: the slot that answered.
fn who(addr: SocketAddr) -> u32 {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out.lines()
        .find_map(|l| l.strip_prefix("x-worker-id: "))
        .unwrap_or_else(|| panic!("no x-worker-id in {out:?}"))
        .trim()
        .parse()
        .unwrap()
}

fn spread(addr: SocketAddr, n: usize) -> BTreeMap<u32, usize> {
    let mut by = BTreeMap::new();
    for _ in 0..n {
        *by.entry(who(addr)).or_default() += 1;
    }
    by
}

fn stop(handle: Handle) {
    let rt = runtime();
    rt.block_on(handle.api().stop()).unwrap();
    handle.join().unwrap();
}

#[test]
fn rotation_is_exact_over_thread_workers() {
    let threads = Threads::default();
    let (handle, addr) = start(&threads, 4, Policy::RoundRobin);
    assert_eq!(
        spread(addr, 40).values().copied().collect::<Vec<_>>(),
        [10, 10, 10, 10]
    );
    stop(handle);
}

#[test]
fn a_killed_worker_is_restarted_in_its_slot_and_serves_again() {
    let threads = Threads::default();
    let (handle, addr) = start(&threads, 3, Policy::RoundRobin);
    let mut events = handle.subscribe();
    let rt = runtime();
    let victim = rt.block_on(handle.api().stats()).unwrap().workers[1]
        .pid
        .unwrap();
    threads.kill(victim);
    rt.block_on(async {
        let mut exited = false;
        loop {
            match tokio::time::timeout(Duration::from_secs(20), events.recv())
                .await
                .expect("events")
                .expect("event")
            {
                Event::Exit { id: 2, pid, status } if pid == victim => {
                    assert_eq!(status, ExitInfo::Signal(9));
                    exited = true;
                }
                Event::Online { id: 2, pid } if exited && pid != victim => break,
                _ => {}
            }
        }
    });
    let s = rt.block_on(handle.api().stats()).unwrap();
    assert_eq!(s.workers[1].restarts, 1);
    assert_eq!(
        spread(addr, 30).values().copied().collect::<Vec<_>>(),
        [10, 10, 10]
    );
    stop(handle);
}

#[test]
fn reload_and_scale_replace_and_add_workers_and_keep_serving() {
    let threads = Threads::default();
    let (handle, addr) = start(&threads, 2, Policy::LeastConn);
    let rt = runtime();
    let api = handle.api();
    let before: Vec<u32> = rt
        .block_on(api.stats())
        .unwrap()
        .workers
        .iter()
        .map(|w| w.pid.unwrap())
        .collect();
    let serving = std::thread::spawn(move || spread(addr, 200));
    rt.block_on(api.reload()).expect("reload");
    rt.block_on(api.scale(16)).expect("scale up");
    let s = rt.block_on(api.stats()).unwrap();
    assert_eq!(
        s.workers
            .iter()
            .filter(|w| w.state.as_str() == "online")
            .count(),
        16,
        "scale answered once every new worker was online"
    );
    assert!(s.workers[..2]
        .iter()
        .all(|w| !before.contains(&w.pid.unwrap())));
    rt.block_on(api.scale(2)).expect("scale down");
    let by = serving.join().expect("every request answered");
    assert_eq!(by.values().sum::<usize>(), 200);
    stop(handle);
}

/// Issue 11: the admin endpoint and control socket end with the primary, so an embedding
/// program that stops its supervisor gets the port (and the socket path) back.
#[test]
fn the_admin_endpoint_and_control_socket_end_with_the_primary() {
    let threads = Threads::default();
    let control = std::env::temp_dir().join(format!(
        "rh-owner-{}-admin-{}.sock",
        std::process::id(),
        rand_id()
    ));
    let handle = Builder::new("/bin/true")
        .listen("127.0.0.1:0".parse().unwrap())
        .workers(1)
        .admin("127.0.0.1:0".parse().unwrap())
        .control(control.clone())
        .spawner(threads)
        .start()
        .expect("start");
    let admin = handle.admin_addr().expect("admin bound");
    assert!(TcpStream::connect(admin).is_ok(), "admin answers");
    stop(handle);
    // Joined: the admin listener is closed and its port free again.
    assert!(
        TcpStream::connect(admin).is_err(),
        "the admin endpoint outlived the primary"
    );
    std::net::TcpListener::bind(admin).expect("the admin port is free");
    assert!(!control.exists(), "the control socket was removed");
}
