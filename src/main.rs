//! `roundhouse`: the supervisor (`run`) and its control client (`status`, `reload`, `scale`,
//! `send`, `stop`, `upgrade`). Thin: parsing, logging setup, signals and exit codes; everything
//! else is in `roundhouse-supervisor`.
//!
//! A process started as `roundhouse run …` may be the new image of an in-place upgrade: then
//! `ROUNDHOUSE_UPGRADE_STATE` names the state the old image left, and `main` resumes it instead
//! of parsing the command line (the argv is the original one, kept for `ps`). The hidden
//! `upgrade-check` subcommand is the pre-flight: it says whether this binary reads a state.
//!
//! Exit codes: 0 success; 1 runtime failure (bind, command not executable, no primary running,
//! a failed reload); 2 usage error: clap's whole message (what is wrong, the usage line, a "did
//! you mean" when there is one) or one `roundhouse: ...` line for what is checked after parsing
//! (a `--config` file, `ROUNDHOUSE_SCHED_POLICY`).
//!
//! Where a `run` option comes from, first found wins: the command line, the environment
//! (`ROUNDHOUSE_SCHED_POLICY` for `--policy`, `ROUNDHOUSE_CONTROL` for `--control`), the
//! `--config` file, the default.

#![forbid(unsafe_code)]

mod client;
mod config;
mod signals;

use std::ffi::OsString;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser, Subcommand};
use roundhouse_log::Format;
use roundhouse_supervisor::{Builder, Policy, RunError};

/// `--control`'s help, shared by every subcommand.
const CONTROL_HELP: &str = "Unix control socket of the primary \
[default: $XDG_RUNTIME_DIR/roundhouse.sock, else /tmp/roundhouse-$UID.sock]";

#[derive(Parser, Debug)]
#[command(
    name = "roundhouse",
    version,
    about = "Node's cluster for any executable: one primary accepts, workers serve",
    after_help = "Start with `roundhouse run -w 4 -- CMD [ARGS...]`; `roundhouse help run` lists its options."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Start the primary and N workers running CMD.
    Run(Box<RunArgs>),
    /// Show the primary's pid, per-worker statistics and fairness.
    Status {
        /// Print the /stats JSON document instead of a table.
        #[arg(long)]
        json: bool,
        #[arg(long, value_name = "PATH", env = "ROUNDHOUSE_CONTROL", help = CONTROL_HELP)]
        control: Option<PathBuf>,
    },
    /// Replace every worker, one at a time, without dropping a connection.
    Reload {
        #[arg(long, value_name = "PATH", env = "ROUNDHOUSE_CONTROL", help = CONTROL_HELP)]
        control: Option<PathBuf>,
    },
    /// Set the number of workers (removed ones drain gracefully).
    Scale {
        /// The number of workers wanted, 1 to 1024.
        #[arg(value_name = "N", value_parser = config::workers)]
        workers: u32,
        #[arg(long, value_name = "PATH", env = "ROUNDHOUSE_CONTROL", help = CONTROL_HELP)]
        control: Option<PathBuf>,
    },
    /// Send a JSON message to one worker (by id) or to all.
    Send {
        /// The worker to send to: its id (1..=N) or `all`.
        #[arg(long, value_name = "ID|all")]
        to: String,
        /// The message, a JSON value, e.g. '{"ping":1}'.
        #[arg(value_name = "JSON")]
        json: String,
        #[arg(long, value_name = "PATH", env = "ROUNDHOUSE_CONTROL", help = CONTROL_HELP)]
        control: Option<PathBuf>,
    },
    /// Stop the primary gracefully; returns once it has exited.
    Stop {
        #[arg(long, value_name = "PATH", env = "ROUNDHOUSE_CONTROL", help = CONTROL_HELP)]
        control: Option<PathBuf>,
    },
    /// Replace the primary with the binary now at the path it was started from: same pid,
    /// same workers and connections (as SIGUSR2).
    Upgrade {
        #[arg(long, value_name = "PATH", env = "ROUNDHOUSE_CONTROL", help = CONTROL_HELP)]
        control: Option<PathBuf>,
    },
    /// Pre-flight of an upgrade: reads the state on stdin, says whether this binary takes it.
    #[command(name = "upgrade-check", hide = true)]
    UpgradeCheck,
}

/// `roundhouse run`. Each field's id (its name) is also what [`merge`] asks `value_source`
/// about, to tell a flag on the command line from a default.
#[derive(clap::Args, Debug)]
#[command(
    after_help = "The worker command comes last, after `--`: roundhouse run -w 4 -- node app.js"
)]
struct RunArgs {
    /// TCP address to listen on (host:port, [v6]:port); repeatable; port 0 picks a free one.
    #[arg(short = 'l', long = "listen", value_name = "ADDR", default_value = "127.0.0.1:8000", value_parser = config::addr)]
    listen: Vec<SocketAddr>,
    /// Number of workers, 1 to 1024 [default: available CPUs].
    #[arg(short = 'w', long, value_name = "N", value_parser = config::workers)]
    workers: Option<u32>,
    /// Dispatch policy: rr, least-conn, sticky, none, reuseport, reuseport-rr
    /// [default: $ROUNDHOUSE_SCHED_POLICY, else rr].
    #[arg(long, value_name = "P", value_parser = config::policy)]
    policy: Option<Policy>,
    /// HTTP admin endpoint address (/stats, /metrics, /healthz) [default: off].
    #[arg(long, value_name = "ADDR", value_parser = config::addr)]
    admin: Option<SocketAddr>,
    #[arg(long, value_name = "PATH", env = "ROUNDHOUSE_CONTROL", help = CONTROL_HELP)]
    control: Option<PathBuf>,
    /// Graceful stop/reload deadline per worker, more than 0 (500ms, 10s, 2m).
    #[arg(long, value_name = "DUR", default_value = "30s", value_parser = config::grace)]
    grace: Duration,
    /// A worker not online by then is killed and counted as a failed start; more than 0.
    #[arg(long, value_name = "DUR", default_value = "30s", value_parser = config::ready_timeout)]
    ready_timeout: Duration,
    /// An online worker silent on its channel this long is killed and replaced (0 = off).
    #[arg(long, value_name = "DUR", default_value = "30s", value_parser = config::heartbeat_timeout)]
    heartbeat_timeout: Duration,
    /// Recycle a worker gracefully after N requests, with jitter [default: off].
    #[arg(long, value_name = "N", value_parser = config::max_requests)]
    max_requests: Option<u64>,
    /// Recycle a worker gracefully when its RSS exceeds SIZE (512MiB, 2GiB) [default: off].
    #[arg(long, value_name = "SIZE", value_parser = config::max_memory)]
    max_memory: Option<u64>,
    /// Listen backlog of each listener (capped by the kernel at somaxconn).
    #[arg(long, value_name = "N", default_value = "4096", value_parser = config::backlog)]
    backlog: u32,
    /// Log format on stderr: text, or json (one object per line).
    #[arg(long, value_name = "F", default_value = "text", value_parser = config::log_format)]
    log_format: Format,
    /// A TOML file holding any of these options under the same names, `command` and `env`;
    /// a flag given here overrides the file.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Workers are Node.js programs: speak Node's IPC channel and preload the roundhouse shim.
    #[arg(long)]
    node: bool,
    /// Workers speak no channel protocol (gunicorn, uvicorn, any LISTEN_FDS server): online once
    /// started, drained by SIGTERM. Only with --policy none, reuseport or reuseport-rr.
    #[arg(long)]
    plain: bool,
    /// Under --policy sticky: the affinity key, `ip` (the client's address) or `header:NAME`
    /// (the first address in that header of the first request, e.g. header:X-Forwarded-For).
    #[arg(long, value_name = "K")]
    sticky_key: Option<roundhouse_supervisor::StickyKey>,
    /// The worker command and its arguments, after `--` (or `command` in the --config file).
    #[arg(last = true, value_name = "CMD", required_unless_present = "config")]
    cmd: Vec<OsString>,
}

fn usage_error(msg: impl std::fmt::Display) -> ExitCode {
    // Errors ignored: with stderr full or closed there is no one to tell, and `eprintln!` would
    // panic (exit 101 instead of 2).
    let _ = writeln!(std::io::stderr(), "roundhouse: {msg}");
    ExitCode::from(2)
}

/// Adds to clap's error, where it helps, the hint that the worker command goes after `--`.
fn with_hints(mut e: clap::Error, args: &[OsString]) -> clap::Error {
    let in_run = args
        .iter()
        .skip(1)
        .find(|a| !a.to_string_lossy().starts_with('-'))
        == Some(&OsString::from("run"));
    if !in_run {
        return e;
    }
    let invalid = match e.get(ContextKind::InvalidArg) {
        Some(ContextValue::String(s)) => vec![s.clone()],
        Some(ContextValue::Strings(v)) => v.clone(),
        _ => Vec::new(),
    };
    let hint = match e.kind() {
        // `roundhouse run -w 2 node app.js`: the command without `--`.
        ErrorKind::UnknownArgument if invalid.iter().any(|a| !a.starts_with('-')) => true,
        // `roundhouse run -w 2`: no command at all.
        ErrorKind::MissingRequiredArgument if invalid.iter().any(|a| a.contains("CMD")) => true,
        _ => false,
    };
    if e.kind() == ErrorKind::UnknownArgument
        && invalid.iter().all(|a| a.starts_with('-'))
        && e.get(ContextKind::SuggestedArg).is_some()
    {
        // `--wrokers`: clap's "did you mean --workers" is the help; its other tip, to pass
        // `--wrokers` to the worker after `--`, is a red herring for a typo.
        e.remove(ContextKind::Suggested);
    }
    if hint {
        let mut tips = match e.get(ContextKind::Suggested) {
            Some(ContextValue::StyledStrs(v)) => v.clone(),
            _ => Vec::new(),
        };
        tips.push(
            "the worker command goes last, after `--`: roundhouse run [OPTIONS] -- CMD [ARGS...] \
             (e.g. roundhouse run -w 4 -- node app.js)"
                .into(),
        );
        e.insert(ContextKind::Suggested, ContextValue::StyledStrs(tips));
    }
    e
}

fn main() -> ExitCode {
    // The new image of an upgrade (only ever a `run`): no command line to parse, everything is
    // in the state. Still single-threaded here, as `take_state` needs.
    if std::env::args_os().nth(1).is_some_and(|a| a == "run") {
        if let Some(state) = roundhouse_supervisor::upgrade::take_state() {
            return resume(state);
        }
    }
    // An empty ROUNDHOUSE_CONTROL is unset (as for ROUNDHOUSE_SCHED_POLICY), not "a value is
    // required for --control". Still single-threaded here: nothing else reads the environment.
    if std::env::var_os("ROUNDHOUSE_CONTROL").is_some_and(|v| v.is_empty()) {
        std::env::remove_var("ROUNDHOUSE_CONTROL");
    }
    let args: Vec<OsString> = std::env::args_os().collect();
    let parsed = Cli::command()
        .try_get_matches_from(&args)
        .and_then(|m| Cli::from_arg_matches(&m).map(|cli| (cli, m)));
    let (cli, matches) = match parsed {
        Ok(parsed) => parsed,
        Err(e) => {
            // clap's whole message: what is wrong, a "did you mean", the usage line. Help and
            // version go to stdout with 0; bare `roundhouse` prints the help on stderr, exit 2.
            let e = with_hints(e, &args);
            let _ = e.print();
            return match e.kind() {
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => ExitCode::SUCCESS,
                _ => ExitCode::from(2),
            };
        }
    };
    let control_or_default =
        |c: Option<PathBuf>| c.unwrap_or_else(roundhouse_supervisor::control::default_control_path);
    let code = match cli.command {
        Command::Run(args) => {
            let m = matches.subcommand_matches("run").expect("run's matches");
            return run(*args, m);
        }
        Command::Status { json, control } => client::status(&control_or_default(control), json),
        Command::Reload { control } => client::reload(&control_or_default(control)),
        Command::Scale { workers, control } => client::scale(&control_or_default(control), workers),
        Command::Send { to, json, control } => {
            client::send(&control_or_default(control), &to, &json)
        }
        Command::Stop { control } => client::stop(&control_or_default(control)),
        Command::Upgrade { control } => client::upgrade(&control_or_default(control)),
        Command::UpgradeCheck => match roundhouse_supervisor::upgrade::check_stdin() {
            Ok(line) => {
                let _ = writeln!(std::io::stdout(), "{line}");
                0
            }
            Err(why) => {
                let _ = writeln!(std::io::stderr(), "{why}");
                1
            }
        },
    };
    ExitCode::from(code.clamp(0, 255) as u8)
}

/// What `run` will do, every source merged.
#[derive(Debug)]
struct Settings {
    builder: Builder,
    log_format: Format,
}

/// Merges the command line (`args`, with `m` to tell a flag from a default), the environment
/// and the `--config` file; `Err` is the one line of a usage error.
fn merge(args: RunArgs, m: &ArgMatches) -> Result<Settings, String> {
    let file = match &args.config {
        Some(path) => config::load(path).map_err(|e| e.to_string())?,
        None => config::FileConfig::default(),
    };
    // From the command line or the environment (not a default): wins over the file.
    let given = |id: &str| {
        matches!(
            m.value_source(id),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        )
    };
    fn pick<T>(given: bool, flag: T, from_file: Option<T>) -> T {
        if given {
            flag
        } else {
            from_file.unwrap_or(flag)
        }
    }
    let policy = match args.policy {
        Some(p) => p,
        None => match std::env::var("ROUNDHOUSE_SCHED_POLICY") {
            Ok(v) if !v.is_empty() => v
                .parse::<Policy>()
                .map_err(|e| format!("ROUNDHOUSE_SCHED_POLICY: {e}"))?,
            _ => file.policy.unwrap_or(Policy::RoundRobin),
        },
    };
    let (program, cmd_args) = if !args.cmd.is_empty() {
        let mut cmd = args.cmd.into_iter();
        (cmd.next(), cmd.collect())
    } else {
        let mut cmd = file.command.unwrap_or_default().into_iter();
        (cmd.next(), cmd.collect::<Vec<_>>())
    };
    let Some(program) = program else {
        let path = args.config.as_deref().unwrap_or("--config".as_ref());
        return Err(format!(
            "{}: no worker command: give `command = [\"PROGRAM\", \"ARG\", ...]` in the file, \
             or CMD after `--`: roundhouse run [OPTIONS] -- CMD [ARGS...]",
            path.display()
        ));
    };
    let listen = if given("listen") {
        args.listen
    } else {
        file.listen.unwrap_or(args.listen)
    };
    let heartbeat = pick(
        given("heartbeat_timeout"),
        args.heartbeat_timeout,
        file.heartbeat_timeout,
    );
    let mut builder = Builder::new(program)
        .upgradable(true)
        .args(cmd_args)
        .policy(policy)
        .grace(pick(given("grace"), args.grace, file.grace))
        .ready_timeout(pick(
            given("ready_timeout"),
            args.ready_timeout,
            file.ready_timeout,
        ))
        .heartbeat_timeout(Some(heartbeat).filter(|d| !d.is_zero()))
        .max_requests(args.max_requests.or(file.max_requests))
        .max_memory(args.max_memory.or(file.max_memory))
        .backlog(pick(given("backlog"), args.backlog, file.backlog))
        .envs(file.env);
    for addr in listen {
        builder = builder.listen(addr);
    }
    if let Some(n) = args.workers.or(file.workers) {
        builder = builder.workers(n);
    }
    if let Some(a) = args.admin.or(file.admin) {
        builder = builder.admin(a);
    }
    if let Some(c) = args.control.or(file.control) {
        builder = builder.control(c);
    }
    if args.node || file.node == Some(true) {
        builder = builder.node(true);
    }
    if args.plain || file.plain == Some(true) {
        builder = builder.plain(true);
    }
    if let Some(k) = args.sticky_key.or(file.sticky_key) {
        if policy != Policy::Sticky {
            return Err(format!(
                "--sticky-key applies to --policy sticky only (the policy is {policy})"
            ));
        }
        builder = builder.sticky_key(k);
    }
    Ok(Settings {
        builder,
        log_format: pick(given("log_format"), args.log_format, file.log_format),
    })
}

/// The log: tracing to stderr in the chosen format, `RUST_LOG` filtering (default `info`),
/// written off the supervisor's threads by `roundhouse-log` so that a full disk or a stderr pipe
/// that is closed or never read costs lines (counted, reported), never a panic or a stalled
/// primary. The guard flushes (bounded) when `run` returns.
fn init_logging(format: Format) -> roundhouse_log::LogGuard {
    roundhouse_log::Builder::new("roundhouse")
        .format(format)
        .init()
}

fn run(args: RunArgs, m: &ArgMatches) -> ExitCode {
    let settings = match merge(args, m) {
        Ok(s) => s,
        Err(msg) => return usage_error(msg),
    };
    roundhouse_supervisor::upgrade::set_log_json(settings.log_format == Format::Json);
    let log = init_logging(settings.log_format);
    let code = match signals::run(settings.builder) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fatal(e),
    };
    drop(log); // flushed, the fatal line last; bounded if stderr is stuck
    code
}

/// The new image of an upgrade: the same process, going on with the state the old image left.
fn resume(state: Result<roundhouse_supervisor::upgrade::State, String>) -> ExitCode {
    let json = state.as_ref().is_ok_and(|s| s.log_json);
    let log = init_logging(if json { Format::Json } else { Format::Text });
    let code = match state {
        Ok(state) => match signals::run_resumed(state) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fatal(e),
        },
        Err(why) => {
            // Nothing to go on with: the workers die with this process (PDEATHSIG).
            roundhouse_log::line(&format!(
                "roundhouse: upgrade failed in the new image: {why}"
            ));
            ExitCode::from(1)
        }
    };
    drop(log);
    code
}

fn fatal(e: RunError) -> ExitCode {
    let code = match e {
        RunError::Config(_) => 2,
        _ => 1,
    };
    // One line, not through tracing: it must show even with RUST_LOG=off. Through the log's
    // queue all the same, so it follows the lines logged before it and cannot block or panic.
    roundhouse_log::line(&format!("roundhouse: {e}"));
    ExitCode::from(code)
}
