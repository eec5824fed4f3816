//! What a user of the `roundhouse` command line sees: usage messages and exit codes, `--help`,
//! the `--config` file (overrides and errors), `--log-format json`, `ROUNDHOUSE_CONTROL`, and
//! the primary's pid in `status` and `/stats`. Spawned binaries only (issue 16).

mod common;

use std::fs;

use common::*;
use serde_json::Value;

fn text(bytes: &[u8]) -> String {
    strip_ansi(&String::from_utf8_lossy(bytes))
}

/// Runs `roundhouse ARGS`, expects exit `code`, and that stderr contains every one of `want`.
#[track_caller]
fn expect(args: &[&str], code: i32, want: &[&str]) -> std::process::Output {
    let out = roundhouse(args);
    let d = describe(args, &out);
    assert_eq!(out.status.code(), Some(code), "{d}");
    let err = text(&out.stderr);
    for w in want {
        assert!(err.contains(w), "stderr lacks {w:?}:\n{d}");
    }
    out
}

/// Each usage error: exit 2, the whole of clap's message (what is missing, not just the
/// sentence that announces it), nothing on stdout. Before issue 16 these printed one line that
/// stopped at "were not provided:".
#[test]
fn missing_arguments_are_named_in_full() {
    for (args, names) in [
        (&["run", "-w", "1"][..], &["<CMD>", "after `--`"][..]),
        (&["send", "{}"], &["--to <ID|all>"]),
        (&["send", "--to", "all"], &["<JSON>"]),
        (&["scale"], &["<N>"]),
    ] {
        let out = expect(
            args,
            2,
            &[
                "the following required arguments were not provided:",
                "Usage: roundhouse",
            ],
        );
        let err = text(&out.stderr);
        for n in names {
            assert!(err.contains(n), "{args:?} does not name {n}:\n{err}");
        }
        assert!(out.stdout.is_empty(), "{}", describe(args, &out));
    }
}

#[test]
fn bare_roundhouse_prints_help_on_stderr_and_exits_2() {
    let out = expect(&[], 2, &["Usage: roundhouse <COMMAND>", "run", "status"]);
    assert!(out.stdout.is_empty(), "{}", describe(&[], &out));
    // Asked for, help is on stdout with 0.
    for args in [
        &["--help"][..],
        &["help"],
        &["run", "--help"],
        &["--version"],
    ] {
        let out = roundhouse(args);
        assert_eq!(out.status.code(), Some(0), "{}", describe(args, &out));
        assert!(!out.stdout.is_empty(), "{}", describe(args, &out));
    }
}

#[test]
fn typos_get_a_did_you_mean() {
    expect(
        &["stauts"],
        2,
        &[
            "unrecognized subcommand 'stauts'",
            "a similar subcommand exists: 'status'",
        ],
    );
    let hw = hello_worker();
    let out = expect(
        &["run", "--wrokers", "2", "--", &hw],
        2,
        &[
            "unexpected argument '--wrokers'",
            "a similar argument exists: '--workers'",
        ],
    );
    // Not clap's other tip, to pass the typo to the worker after `--`.
    assert!(!text(&out.stderr).contains("to pass '--wrokers'"));
}

#[test]
fn a_command_without_the_double_dash_gets_a_hint() {
    let hw = hello_worker();
    expect(
        &["run", "-w", "1", &hw],
        2,
        &[
            "unexpected argument",
            "the worker command goes last, after `--`",
        ],
    );
}

/// `0` for a timeout: `--heartbeat-timeout 0` means off; `--ready-timeout 0` (which killed
/// every worker as it started, in a loop) and `--grace 0` (a drain that kills mid-request) are
/// refused before anything starts, saying why.
#[test]
fn zero_timeouts_are_refused_or_off_and_numbers_are_explained() {
    let dir = TempDir::new();
    let ctl = dir.join("ctl.sock").display().to_string();
    let hw = hello_worker();
    let run = |extra: &[&str]| {
        let mut a = vec!["run", "-l", "127.0.0.1:0", "--control", &ctl];
        a.extend_from_slice(extra);
        a.extend(["--", &hw]);
        a.into_iter().map(String::from).collect::<Vec<_>>()
    };
    for (flag, want) in [
        ("--ready-timeout", "the ready timeout must be more than 0"),
        ("--grace", "the grace period must be more than 0"),
    ] {
        let args = run(&[flag, "0"]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        expect(
            &args,
            2,
            &[&format!("invalid value '0' for '{flag} <DUR>'"), want],
        );
    }
    let args = run(&["--max-requests", "0"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = expect(&args, 2, &["at least 1 request", "leave the option out"]);
    assert!(!text(&out.stderr).contains("18446744073709551615"));
    let args = run(&["-w", "0"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    expect(
        &args,
        2,
        &["the number of workers must be between 1 and 1024, got 0"],
    );
    expect(&["scale", "0"], 2, &["between 1 and 1024"]);

    // --heartbeat-timeout 0 is "off": the primary runs.
    let p = Primary::start(&["-w", "1", "--heartbeat-timeout", "0"]);
    p.wait_ready();
}

/// Every flag and argument has a help text; defaults are shown.
#[test]
fn help_describes_every_flag_and_shows_defaults() {
    for (args, want) in [
        (
            &["run", "--help"][..],
            &[
                "[default: 127.0.0.1:8000]",
                "[default: 30s]",
                "[default: 4096]",
                "[default: text]",
                "[default: available CPUs]",
                "[env: ROUNDHOUSE_CONTROL",
                "--config <FILE>",
                "--max-memory <SIZE>",
                "--log-format <F>",
            ][..],
        ),
        (
            &["scale", "--help"],
            &["The number of workers wanted", "[env: ROUNDHOUSE_CONTROL"],
        ),
        (&["send", "--help"], &["--to <ID|all>", "JSON"]),
        (
            &["status", "--help"],
            &["--json", "[env: ROUNDHOUSE_CONTROL"],
        ),
        (&["reload", "--help"], &["[env: ROUNDHOUSE_CONTROL"]),
        (&["stop", "--help"], &["[env: ROUNDHOUSE_CONTROL"]),
    ] {
        let out = roundhouse(args);
        let help = text(&out.stdout);
        assert_eq!(out.status.code(), Some(0), "{}", describe(args, &out));
        for w in want {
            assert!(help.contains(w), "{args:?} help lacks {w:?}:\n{help}");
        }
        // An option line is `  -x, --name <V>  Help` or `      --name  Help`: never bare.
        for line in help.lines() {
            let t = line.trim_start();
            if t.starts_with('-') || t.starts_with('<') || t.starts_with('[') {
                let words: Vec<&str> = t.split("  ").filter(|w| !w.trim().is_empty()).collect();
                assert!(
                    words.len() >= 2,
                    "{args:?}: no help text on {line:?}\n{help}"
                );
            }
        }
    }
}

fn write(dir: &TempDir, name: &str, body: &str) -> String {
    let path = dir.join(name);
    fs::write(&path, body).unwrap();
    path.display().to_string()
}

/// The file gives the command, workers, listener and admin; a flag on the command line wins.
#[test]
fn config_file_runs_and_flags_override_it() {
    let b = Primary::builder().cmd::<&str>(&[]);
    let hw = hello_worker();
    let path = write(
        b.temp_dir(),
        "rh.toml",
        &format!(
            "workers = 3\nadmin = \"127.0.0.1:0\"\ngrace = \"5s\"\n\
             command = [\"{hw}\"]\n\n[env]\nRH_CLI_TEST = \"from the file\"\n"
        ),
    );
    let p = b.args(&["--config", &path, "-w", "2"]).start();
    p.wait_ready();
    let stats = p.stats();
    assert_eq!(
        stats["workers"].as_array().unwrap().len(),
        2,
        "-w 2 wins over workers = 3: {stats}"
    );
    let r = get(p.addr(), "/").expect("GET /");
    assert_eq!(r.status, 200);
}

/// The file's `env` reaches every worker, on top of the primary's environment.
#[test]
fn config_env_reaches_every_worker() {
    let b = Primary::builder().workers(2);
    let path = write(
        b.temp_dir(),
        "rh.toml",
        "[env]\nRH_CLI_TEST = \"from the file\"\nRH_CLI_OTHER = \"2\"\n",
    );
    let p = b.args(&["--config", &path]).start();
    p.wait_ready();
    for (id, pid) in p.worker_pids() {
        let env = environ_of(pid).expect("the worker's environ");
        for (k, v) in [("RH_CLI_TEST", "from the file"), ("RH_CLI_OTHER", "2")] {
            assert!(
                env.iter().any(|(ek, ev)| ek == k && ev == v),
                "worker {id} (pid {pid}) lacks {k}={v}"
            );
        }
        let wid = id.to_string();
        assert!(env
            .iter()
            .any(|(k, v)| k == "ROUNDHOUSE_WORKER_ID" && *v == wid));
    }
}

/// Each mistake in the file is one line naming the file, the line and the key; exit 2, and
/// nothing was started.
#[test]
fn config_errors_name_file_line_and_key() {
    let dir = TempDir::new();
    let ctl = dir.join("ctl.sock").display().to_string();
    let hw = hello_worker();
    for (body, line, key, what) in [
        (
            "workers = 2\n\nwrokers = 2\n",
            3,
            "wrokers",
            "unknown key (did you mean `workers`?)",
        ),
        (
            "workers = \"2\"\n",
            1,
            "workers",
            "expected a number, 1 to 1024, got a string",
        ),
        (
            "grace = \"5s\"\nready-timeout = \"0s\"\n",
            2,
            "ready-timeout",
            "must be more than 0",
        ),
        ("policy = \"fair\"\n", 1, "policy", "unknown policy 'fair'"),
        (
            "[env]\nPORT = 8080\n",
            2,
            "env.PORT",
            "expected a string, got an integer",
        ),
        (
            "max-memory = \"lots\"\n",
            1,
            "max-memory",
            "invalid size 'lots'",
        ),
    ] {
        let path = write(&dir, "bad.toml", body);
        let args = [
            "run",
            "-l",
            "127.0.0.1:0",
            "--control",
            &ctl,
            "--config",
            &path,
            "--",
            &hw,
        ];
        let out = roundhouse(&args);
        let d = format!("{body:?}\n{}", describe(&args, &out));
        assert_eq!(out.status.code(), Some(2), "{d}");
        let lines = nonempty_lines(&out.stderr);
        assert_eq!(lines.len(), 1, "one line: {d}");
        let want = format!("roundhouse: {path}:{line}: {key}: ");
        assert!(lines[0].starts_with(&want), "want {want:?}…: {d}");
        assert!(lines[0].contains(what), "want {what:?}: {d}");
    }
    // No command anywhere.
    let path = write(&dir, "nocmd.toml", "workers = 1\n");
    let args = ["run", "--control", &ctl, "--config", &path];
    expect(&args, 2, &[&path, "no worker command"]);
    // A file that is not there.
    let args = ["run", "--control", &ctl, "--config", "/nonexistent/rh.toml"];
    expect(
        &args,
        2,
        &["/nonexistent/rh.toml: could not read the config file"],
    );
}

/// A JSON log line, parsed; panics naming the line if it is not one.
fn json(line: &str) -> Value {
    serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"))
}

fn message(v: &Value) -> &str {
    v["fields"]["message"].as_str().unwrap_or("")
}

/// `--log-format json` (here from the config file): every line one object with `timestamp`,
/// `level`, `fields` (the message and the structured fields); the fatal line too.
#[test]
fn json_log_lines_parse_with_level_and_fields() {
    let b = Primary::builder()
        .workers(1)
        // Workers inherit RUST_LOG: keep hello-worker's own (text) lines out of this log.
        .rust_log("warn,roundhouse_supervisor=info");
    let path = write(b.temp_dir(), "rh.toml", "log-format = \"json\"\n");
    let p = b.args(&["--config", &path]).start();
    let ready = p.wait_for_line("a JSON ready line", STARTUP, |l| {
        serde_json::from_str::<Value>(&l.text).is_ok_and(|v| message(&v) == "ready")
    });
    let ready = json(&ready.text);
    assert_eq!(ready["level"], "INFO", "{ready}");
    assert_eq!(ready["fields"]["pid"], p.pid(), "{ready}");
    assert!(ready["timestamp"].is_string(), "{ready}");
    let lines = p.lines();
    let parsed: Vec<Value> = lines
        .iter()
        .filter(|l| !l.text.starts_with("stdout| "))
        .map(|l| json(&l.text))
        .collect();
    let listening = parsed
        .iter()
        .find(|v| message(v) == "listening")
        .expect("a listening line");
    assert!(
        listening["fields"]["listener.addr"]
            .as_str()
            .is_some_and(|a| a.starts_with("127.0.0.1:")),
        "{listening}"
    );
    let online = parsed
        .iter()
        .find(|v| message(v) == "worker online")
        .expect("a worker online line");
    assert_eq!(online["fields"]["worker.id"], 1, "{online}");

    // The command line overrides the file: text again.
    let b = Primary::builder().workers(1);
    let path = write(b.temp_dir(), "rh.toml", "log-format = \"json\"\n");
    let p = b.args(&["--config", &path, "--log-format", "text"]).start();
    let line = p.wait_ready();
    assert!(!line.trim_start().starts_with('{'), "{line}");

    // A fatal error (the port is taken) is a JSON object too.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dir = TempDir::new();
    let ctl = dir.join("ctl.sock").display().to_string();
    let hw = hello_worker();
    let args = [
        "run",
        "-l",
        &addr,
        "--control",
        &ctl,
        "--log-format",
        "json",
        "--",
        &hw,
    ];
    let out = roundhouse(&args);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&args, &out));
    let last = nonempty_lines(&out.stderr).pop().expect("a line");
    let v = json(&last);
    assert_eq!(v["level"], "ERROR", "{v}");
    assert!(message(&v).contains(&addr), "{v}");
}

/// `ROUNDHOUSE_CONTROL` stands for `--control` in every command, `run` included; a flag wins.
#[test]
fn roundhouse_control_env_finds_the_primary() {
    let b = Primary::builder().workers(1);
    let ctl = b.temp_dir().join("env-ctl.sock").display().to_string();
    let hw = hello_worker();
    let args: Vec<String> = ["run", "-l", "127.0.0.1:0", "--", &hw]
        .map(String::from)
        .to_vec();
    let p = b
        .env("ROUNDHOUSE_CONTROL", &ctl)
        .start_program(roundhouse_bin(), &args);
    p.wait_ready();
    let env = [("ROUNDHOUSE_CONTROL", ctl.as_str())];
    let out = roundhouse_with(&["status", "--json"], &env, CLI_TIMEOUT);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        describe(&["status", "--json"], &out)
    );
    let doc = json(text(&out.stdout).trim());
    assert_eq!(doc["pid"], p.pid(), "{doc}");
    // The flag wins over the environment.
    let args = ["status", "--control", "/nonexistent/rh.sock"];
    let out = roundhouse_with(&args, &env, CLI_TIMEOUT);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&args, &out));
    assert!(text(&out.stderr).contains("no primary running on /nonexistent/rh.sock"));
    let out = roundhouse_with(&["send", "--to", "all", "{\"ping\":1}"], &env, CLI_TIMEOUT);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&["send"], &out));
    // Empty is unset: the default path, where no primary runs (not a usage error).
    let dir = TempDir::new();
    let runtime = dir.path().display().to_string();
    let empty = [
        ("ROUNDHOUSE_CONTROL", ""),
        ("XDG_RUNTIME_DIR", runtime.as_str()),
    ];
    let out = roundhouse_with(&["status"], &empty, CLI_TIMEOUT);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        describe(&["status"], &out)
    );
    assert!(text(&out.stderr).contains(&format!("no primary running on {runtime}/roundhouse.sock")));
    let out = roundhouse_with(&["stop"], &env, CLI_TIMEOUT);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&["stop"], &out));
}

/// The primary's pid: in `status`, `status --json`, `/stats` and `/metrics`.
#[test]
fn the_primary_pid_is_in_status_and_stats() {
    let p = Primary::start(&["-w", "1", "--admin", "127.0.0.1:0"]);
    p.wait_ready();
    assert_eq!(p.stats()["pid"], p.pid());
    let out = p.client(&["status"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        describe(&["status"], &out)
    );
    let first = text(&out.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .to_string();
    assert!(
        first.starts_with(&format!("primary pid {} ", p.pid())),
        "{first}"
    );
    let out = p.client(&["status", "--json"]);
    assert_eq!(json(text(&out.stdout).trim())["pid"], p.pid());
    let metrics = get(p.admin_addr(), "/metrics").expect("GET /metrics");
    let body = String::from_utf8_lossy(&metrics.body).to_string();
    assert!(
        body.contains(&format!("\nroundhouse_pid {}\n", p.pid())),
        "{body}"
    );
    // Stable order: the same lines twice (the figures may move, the names and labels not).
    let names = |b: &str| -> Vec<String> {
        b.lines()
            .map(|l| l.split(' ').next().unwrap_or("").to_string())
            .collect()
    };
    let again = get(p.admin_addr(), "/metrics").expect("GET /metrics");
    assert_eq!(names(&body), names(&String::from_utf8_lossy(&again.body)));
}
