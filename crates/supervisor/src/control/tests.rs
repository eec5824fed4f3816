//! The control socket from both sides: the server against a fake owner, the synchronous
//! client against the server.

use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::process::Command;

use super::*;
use crate::api::fake;

/// A fresh short directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "rh-ctl-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
    fn sock(&self) -> PathBuf {
        self.0.join("control.sock")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A control server with a fake owner on its own runtime; dropping the runtime closes every
/// connection, as the process exiting would.
struct Server {
    rt: Option<tokio::runtime::Runtime>,
    owner: fake::Owner,
}

impl Server {
    fn start(path: &Path) -> Server {
        let listener = bind_control(path).expect("bind");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let (api, owner) = rt.block_on(async { fake::spawn(fake::canned()) });
        rt.spawn(async move {
            let listener = tokio::net::UnixListener::from_std(listener).unwrap();
            serve_control(listener, api).await
        });
        Server {
            rt: Some(rt),
            owner,
        }
    }
    /// As if the primary's process ended.
    fn exit(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.exit();
    }
}

/// A raw client: write lines, read answer lines.
struct Raw {
    reader: BufReader<StdUnixStream>,
    writer: StdUnixStream,
}

impl Raw {
    fn connect(path: &Path) -> Raw {
        let writer = StdUnixStream::connect(path).unwrap();
        writer
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        Raw {
            reader: BufReader::new(writer.try_clone().unwrap()),
            writer,
        }
    }
    fn send(&mut self, bytes: &[u8]) -> Option<Value> {
        self.writer.write_all(bytes).unwrap();
        let mut line = String::new();
        match self.reader.read_line(&mut line).unwrap() {
            0 => None,
            _ => Some(serde_json::from_str(&line).expect("a JSON line")),
        }
    }
    fn is_closed(&mut self) -> bool {
        let mut buf = [0u8; 16];
        matches!(self.reader.read(&mut buf), Ok(0) | Err(_))
    }
}

fn error_of(v: &Value) -> &str {
    assert_eq!(v["ok"], false, "{v}");
    v["error"].as_str().expect("an error string")
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().mode() & 0o7777
}

#[test]
fn socket_is_0600_and_nothing_is_left_behind() {
    let dir = TempDir::new();
    let path = dir.sock();
    let _server = Server::start(&path);
    let meta = std::fs::symlink_metadata(&path).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(mode(&path), 0o600);
    let entries: Vec<_> = std::fs::read_dir(&dir.0)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(entries, ["control.sock"], "the private bind dir is removed");
    // Reachable under its final name.
    let v = request(&path, &json!({"cmd": "status"})).unwrap();
    assert_eq!(v["ok"], true);
}

#[test]
fn fallback_bind_is_0600_too() {
    let dir = TempDir::new();
    let path = dir.sock();
    let listener = bind_then_chmod(&path).unwrap();
    assert_eq!(mode(&path), 0o600);
    drop(listener);
}

#[test]
fn second_primary_on_a_live_path_is_refused() {
    let dir = TempDir::new();
    let path = dir.sock();
    let _server = Server::start(&path);
    let err = bind_control(&path).unwrap_err();
    assert!(
        matches!(err, ControlError::AlreadyRunning { .. }),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        format!(
            "another roundhouse primary is running on {}",
            path.display()
        )
    );
    // The live primary is untouched.
    assert_eq!(mode(&path), 0o600);
    assert_eq!(
        request(&path, &json!({"cmd": "status"})).unwrap()["ok"],
        true
    );
}

#[test]
fn stale_socket_is_replaced_and_other_files_are_not() {
    let dir = TempDir::new();
    let path = dir.sock();
    // A dead primary: the file is there, nobody accepts.
    drop(StdUnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let err = request(&path, &json!({"cmd": "status"})).unwrap_err();
    assert!(matches!(err, ControlError::NotRunning { .. }), "{err:?}");

    let _server = Server::start(&path);
    assert_eq!(mode(&path), 0o600);
    assert_eq!(
        request(&path, &json!({"cmd": "status"})).unwrap()["ok"],
        true
    );

    let file = dir.0.join("not-a-socket");
    std::fs::write(&file, "keep me").unwrap();
    let err = bind_control(&file).unwrap_err();
    assert!(matches!(err, ControlError::Bind { .. }), "{err:?}");
    assert!(err.to_string().contains("not a socket"), "{err}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");
}

#[test]
fn no_primary_is_a_distinct_error() {
    let dir = TempDir::new();
    let path = dir.sock();
    let err = request(&path, &json!({"cmd": "status"})).unwrap_err();
    assert!(matches!(err, ControlError::NotRunning { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!("no primary running on {}", path.display())
    );
    let err = stop_and_wait(&path, Duration::from_secs(1)).unwrap_err();
    assert!(matches!(err, ControlError::NotRunning { .. }), "{err:?}");
}

#[test]
fn requests_round_trip_to_the_owner() {
    let dir = TempDir::new();
    let path = dir.sock();
    let server = Server::start(&path);

    let v = request(&path, &json!({"cmd": "status"})).unwrap();
    let stats: StatsSnapshot = serde_json::from_value(v["stats"].clone()).unwrap();
    assert_eq!(stats, fake::canned());

    assert_eq!(
        request(&path, &json!({"cmd": "reload"})).unwrap(),
        json!({"ok": true})
    );
    *server.owner.reload_error.lock().unwrap() = Some(crate::api::OpError::StartFailed(2));
    let err = request(&path, &json!({"cmd": "reload"})).unwrap_err();
    assert_eq!(
        err.to_string(),
        "reload failed: could not start a new worker 2"
    );

    // The owner gets a copy of the connection (the new image answers on it when an upgrade
    // works); a failure is answered here.
    let err = request(&path, &json!({"cmd": "upgrade"})).unwrap_err();
    assert_eq!(
        err.to_string(),
        "upgrade failed: /x/roundhouse: not executable (permission denied)"
    );

    assert_eq!(
        request(&path, &json!({"cmd": "scale", "workers": 4})).unwrap(),
        json!({"ok": true})
    );
    for bad in [0, 1025] {
        let err = request(&path, &json!({"cmd": "scale", "workers": bad})).unwrap_err();
        assert!(matches!(err, ControlError::Failed(_)), "{err:?}");
        assert!(err.to_string().contains("between 1 and 1024"), "{err}");
    }

    let msg = json!({"ping": 1});
    request(&path, &json!({"cmd": "send", "to": "all", "message": msg})).unwrap();
    request(&path, &json!({"cmd": "send", "to": 2, "message": msg})).unwrap();
    let err = request(&path, &json!({"cmd": "send", "to": 9, "message": msg})).unwrap_err();
    assert_eq!(err.to_string(), "no worker with id 9");
    for to in [
        json!(0),
        json!(-1),
        json!("two"),
        json!(1.5),
        json!(null),
        json!(4294967296u64),
    ] {
        let err = request(&path, &json!({"cmd": "send", "to": to, "message": msg})).unwrap_err();
        assert!(err.to_string().contains("`to` must be"), "{to}: {err}");
    }

    assert_eq!(
        server.owner.log(),
        [
            "reload",
            "reload",
            "upgrade (client true)",
            "scale 4",
            "send All {\"ping\":1}",
            "send Worker(2) {\"ping\":1}"
        ]
    );
}

#[test]
fn malformed_requests_get_errors_and_the_connection_lives_on() {
    let dir = TempDir::new();
    let path = dir.sock();
    let server = Server::start(&path);
    let mut c = Raw::connect(&path);
    for bad in [
        &b"not json\n"[..],
        b"\n",
        b"[1,2]\n",
        b"{\"cmd\":\"bogus\"}\n",
        b"{\"cmd\":\"scale\"}\n",
        b"{\"cmd\":\"scale\",\"workers\":\"4\"}\n",
        b"{\"cmd\":\"send\",\"to\":\"all\"}\n",
        b"{\"nocmd\":1}\n",
        b"\xff\xfe\x00garbage\n",
    ] {
        let v = c.send(bad).expect("an answer");
        assert!(
            error_of(&v).starts_with("bad request"),
            "{:?}: {v}",
            String::from_utf8_lossy(bad)
        );
    }
    // Same connection, a good request now.
    let v = c.send(b"{\"cmd\":\"status\"}\n").unwrap();
    assert_eq!(v["ok"], true);
    assert_eq!(v["stats"]["policy"], "rr");
    assert!(server.owner.log().is_empty(), "nothing reached the owner");

    // A last line without its newline is still answered.
    let mut c = Raw::connect(&path);
    c.writer.write_all(b"{\"cmd\":\"status\"}").unwrap();
    c.writer.shutdown(std::net::Shutdown::Write).unwrap();
    let mut line = String::new();
    c.reader.read_line(&mut line).unwrap();
    assert!(
        line.starts_with("{\"ok\":true,\"stats\":{\"policy\":\"rr\""),
        "{line}"
    );
}

#[test]
fn an_overlong_line_is_refused_and_closed() {
    let dir = TempDir::new();
    let path = dir.sock();
    let _server = Server::start(&path);
    let mut c = Raw::connect(&path);
    let big = vec![b'x'; MAX_LINE + 10];
    // The server answers after MAX_LINE + 1 bytes and closes; the rest of our write may fail.
    let writer = c.writer.try_clone().unwrap();
    let t = std::thread::spawn(move || {
        let mut w = writer;
        let _ = w.write_all(&big);
    });
    let mut line = String::new();
    c.reader.read_line(&mut line).unwrap();
    let v: Value = serde_json::from_str(&line).unwrap();
    assert!(error_of(&v).contains("longer than"), "{v}");
    assert!(c.is_closed());
    t.join().unwrap();
    // The server is still fine.
    assert_eq!(
        request(&path, &json!({"cmd": "status"})).unwrap()["ok"],
        true
    );
}

#[test]
fn stop_waits_for_the_primary_to_exit() {
    let dir = TempDir::new();
    let path = dir.sock();
    let mut server = Server::start(&path);
    let p = path.clone();
    let waiter = std::thread::spawn(move || stop_and_wait(&p, Duration::from_secs(20)));
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.owner.log() != ["stop"] {
        assert!(Instant::now() < deadline, "stop never reached the owner");
        std::thread::sleep(Duration::from_millis(10));
    }
    // Acknowledged, but the primary has not exited: the client is still waiting.
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        !waiter.is_finished(),
        "stop returned before the primary exited"
    );
    server.exit();
    waiter
        .join()
        .unwrap()
        .expect("stop succeeds once the primary is gone");
}

/// A primary that reads the stop request and, like one exiting at once, closes without
/// answering; `remove` says whether it also removes its socket file (as the real one does).
fn unanswered_stop(path: &Path, remove: bool) -> std::thread::JoinHandle<()> {
    let listener = StdUnixListener::bind(path).unwrap();
    let path = path.to_path_buf();
    std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let mut line = String::new();
        BufReader::new(&stream).read_line(&mut line).unwrap();
        assert_eq!(line, "{\"cmd\":\"stop\"}\n");
        if remove {
            std::fs::remove_file(&path).unwrap();
            return; // listener and stream dropped: the process is gone
        }
        drop(stream);
        // Still accepting (never answering) until the test ends.
        for conn in listener.incoming() {
            drop(conn);
        }
    })
}

#[test]
fn stop_answered_by_an_exit_counts_as_stopped() {
    let dir = TempDir::new();
    let path = dir.sock();
    let server = unanswered_stop(&path, true);
    stop_and_wait(&path, Duration::from_secs(10)).expect("the primary is gone");
    server.join().unwrap();

    // Closed unanswered but still accepting: not stopped, and said so within the deadline.
    let path = dir.0.join("alive.sock");
    let _server = unanswered_stop(&path, false);
    let start = Instant::now();
    let err = stop_and_wait(&path, Duration::from_millis(300)).unwrap_err();
    assert!(matches!(err, ControlError::Timeout { .. }), "{err:?}");
    assert!(start.elapsed() < Duration::from_secs(5));
}

#[test]
fn stop_gives_up_after_its_deadline() {
    let dir = TempDir::new();
    let path = dir.sock();
    let _server = Server::start(&path);
    let start = Instant::now();
    let err = stop_and_wait(&path, Duration::from_millis(300)).unwrap_err();
    assert!(matches!(err, ControlError::Timeout { .. }), "{err:?}");
    assert!(start.elapsed() < Duration::from_secs(5));
}

#[test]
fn peer_uid_rule() {
    assert!(peer_allowed(1000, 1000));
    assert!(peer_allowed(0, 1000), "root is let in");
    assert!(!peer_allowed(1001, 1000));
    assert!(!peer_allowed(65534, 0));
}

#[test]
fn default_path_follows_the_spec() {
    let got = default_control_path();
    match std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from) {
        Some(dir) if dir.is_absolute() => assert_eq!(got, dir.join("roundhouse.sock")),
        _ => assert_eq!(
            got,
            PathBuf::from(format!("/tmp/roundhouse-{}.sock", nix::unistd::getuid()))
        ),
    }
}

const PEER_ENV: &str = "ROUNDHOUSE_TEST_CONTROL_PEER";

/// Run by [`a_peer_of_another_uid_is_refused`] in a child process under another uid.
#[test]
#[ignore = "helper: run by a_peer_of_another_uid_is_refused"]
fn peer_helper_child() {
    let Some(path) = std::env::var_os(PEER_ENV) else {
        return;
    };
    match request(Path::new(&path), &json!({"cmd": "status"})) {
        Ok(v) => println!("PEER-RESULT OK {v}"),
        Err(e) => println!("PEER-RESULT ERR {e}"),
    }
}

#[test]
fn a_peer_of_another_uid_is_refused() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root to run a client under another uid");
        return;
    }
    const NOBODY: u32 = 65534;
    let dir = TempDir::new();
    std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = dir.sock();
    let server = Server::start(&path);
    // Loosen the file mode so only SO_PEERCRED stands in the way.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
    // A copy of this test binary that the other user can execute.
    let exe = dir.0.join("peer-test");
    std::fs::copy(std::env::current_exe().unwrap(), &exe).unwrap();
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();

    let out = Command::new(&exe)
        .args([
            "--exact",
            "control::tests::peer_helper_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(PEER_ENV, &path)
        .current_dir(&dir.0)
        .uid(NOBODY)
        .gid(NOBODY)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!(
            "PEER-RESULT ERR permission denied: peer uid {NOBODY} is not the primary's uid 0"
        )),
        "status {:?}\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(server.owner.log().is_empty());
    // Our own uid still gets in.
    assert_eq!(
        request(&path, &json!({"cmd": "status"})).unwrap()["ok"],
        true
    );
}

#[tokio::test]
async fn an_upgrade_without_a_copy_of_the_connection_is_not_attempted() {
    let (api, owner) = fake::spawn(fake::canned());
    let (response, stopping) = answer(br#"{"cmd":"upgrade"}"#, &api, || {
        Err(io::Error::from_raw_os_error(libc::EMFILE))
    })
    .await;
    let v: Value = serde_json::from_slice(&response).unwrap();
    assert_eq!(v["ok"], false);
    let e = v["error"].as_str().unwrap();
    assert!(
        e.starts_with("upgrade failed: could not keep this connection")
            && e.contains("os error 24"),
        "{e}"
    );
    assert!(!stopping);
    assert!(
        owner.log().is_empty(),
        "the owner was asked: {:?}",
        owner.log()
    );
}
