//! `roundhouse run`'s options: the value checks shared by the command line and the `--config`
//! file, and the file's loader.
//!
//! Every option has one parser here, used both as clap's `value_parser` and for the same key in
//! the file, so a value means the same thing and is refused with the same words wherever it is
//! written. Their messages name no flag: clap adds `invalid value 'X' for '--flag <V>':`, the
//! loader adds `FILE:LINE: key:`.
//!
//! # The file
//!
//! TOML; each `run` option under its flag's name (`workers = 4`, `ready-timeout = "5s"`;
//! `ready_timeout` is accepted too), plus `command = ["node", "app.js"]` (the worker command,
//! replaced by a CMD after `--`) and an `env` table for every worker. An unknown key, a value
//! of the wrong type or a bad value is one [`ConfigError`] line naming the file, the line and
//! the key; the caller exits 2. Which source wins is [`crate`]'s business (`main.rs`: command
//! line, then environment, then file, then default).

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use roundhouse_log::Format;
use roundhouse_supervisor::{parse_duration, parse_size, Policy, MAX_WORKERS};
use toml::Spanned;

// ---------------------------------------------------------------------------------------------
// Value parsers (clap's `value_parser`, and the file's keys)
// ---------------------------------------------------------------------------------------------

pub fn workers(s: &str) -> Result<u32, String> {
    let n: i64 = s
        .trim()
        .parse()
        .map_err(|_| format!("expected a number of workers, 1 to {MAX_WORKERS}"))?;
    workers_n(n)
}

fn workers_n(n: i64) -> Result<u32, String> {
    match u32::try_from(n) {
        Ok(n) if (1..=MAX_WORKERS).contains(&n) => Ok(n),
        _ => Err(format!(
            "the number of workers must be between 1 and {MAX_WORKERS}, got {n}"
        )),
    }
}

pub fn policy(s: &str) -> Result<Policy, String> {
    s.parse()
}

pub fn log_format(s: &str) -> Result<Format, String> {
    s.parse()
}

pub fn addr(s: &str) -> Result<SocketAddr, String> {
    s.trim().parse().map_err(|_| {
        format!(
            "'{s}' is not a TCP address (expected host:port such as 127.0.0.1:8000 or [::1]:8000)"
        )
    })
}

/// `--grace`: more than 0. A drain with no time at all would kill every draining worker in
/// the middle of its requests, a failed request for each client — the opposite of graceful.
pub fn grace(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d.is_zero() {
        return Err(
            "the grace period must be more than 0: it is how long a draining worker may \
                    finish its requests (a second SIGTERM already stops at once)"
                .into(),
        );
    }
    Ok(d)
}

/// `--ready-timeout`: more than 0. A worker cannot be online the instant it is started, so 0
/// would kill every worker as a failed start, forever.
pub fn ready_timeout(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d.is_zero() {
        return Err(
            "the ready timeout must be more than 0: it is how long a new worker has to \
                    come online (0 would kill every worker as it starts)"
                .into(),
        );
    }
    Ok(d)
}

/// `--heartbeat-timeout`: `0` turns hung-worker detection off.
pub fn heartbeat_timeout(s: &str) -> Result<Duration, String> {
    parse_duration(s)
}

pub fn max_requests(s: &str) -> Result<u64, String> {
    match s.trim().parse::<u64>() {
        Ok(n) if n >= 1 => Ok(n),
        Ok(_) => Err(
            "a worker is recycled after at least 1 request (leave the option out to never \
             recycle)"
                .into(),
        ),
        Err(_) => Err("expected a number of requests, 1 or more".into()),
    }
}

pub fn backlog(s: &str) -> Result<u32, String> {
    match s.trim().parse::<u32>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!(
            "the backlog must be between 1 and {} (the kernel caps it at somaxconn)",
            u32::MAX
        )),
    }
}

pub fn max_memory(s: &str) -> Result<u64, String> {
    parse_size(s)
}

// ---------------------------------------------------------------------------------------------
// The file
// ---------------------------------------------------------------------------------------------

/// What a `--config` file sets; `None` where it says nothing.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct FileConfig {
    pub listen: Option<Vec<SocketAddr>>,
    pub workers: Option<u32>,
    pub policy: Option<Policy>,
    pub admin: Option<SocketAddr>,
    pub control: Option<PathBuf>,
    pub grace: Option<Duration>,
    pub ready_timeout: Option<Duration>,
    pub heartbeat_timeout: Option<Duration>,
    pub max_requests: Option<u64>,
    pub backlog: Option<u32>,
    pub node: Option<bool>,
    pub plain: Option<bool>,
    pub sticky_key: Option<roundhouse_supervisor::StickyKey>,
    pub max_memory: Option<u64>,
    pub log_format: Option<Format>,
    /// The worker command and its arguments.
    pub command: Option<Vec<OsString>>,
    /// For every worker, in the file's order.
    pub env: Vec<(OsString, OsString)>,
}

/// The keys a file may hold, as written in it (the flags' names).
pub const KEYS: [&str; 17] = [
    "listen",
    "workers",
    "policy",
    "admin",
    "control",
    "grace",
    "ready-timeout",
    "heartbeat-timeout",
    "max-requests",
    "backlog",
    "node",
    "plain",
    "sticky-key",
    "max-memory",
    "log-format",
    "command",
    "env",
];

/// Variables roundhouse sets for each worker itself; an `env` entry may not claim them.
fn reserved(name: &str) -> bool {
    name.starts_with("ROUNDHOUSE_")
        || name.starts_with("NODE_CHANNEL_")
        || matches!(name, "LISTEN_FDS" | "LISTEN_PID" | "LISTEN_FDNAMES")
}

/// A file that cannot be used, as one line: `FILE:LINE: KEY: what is wrong`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub path: PathBuf,
    pub line: Option<usize>,
    pub key: Option<String>,
    pub message: String,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.path.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if let Some(key) = &self.key {
            write!(f, ": {key}")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

/// Reads and checks the file at `path`.
pub fn load(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        path: path.to_path_buf(),
        line: None,
        key: None,
        message: format!("could not read the config file: {e}"),
    })?;
    parse(path, &text)
}

type Entries = BTreeMap<Spanned<String>, Spanned<toml::Value>>;

/// Makes a [`ConfigError`] from the byte offset of the mistake, the key and the message.
type MakeError<'a> = dyn Fn(Option<usize>, Option<&str>, String) -> ConfigError + 'a;

/// Checks `text`, the contents of the file at `path` (named in errors).
pub fn parse(path: &Path, text: &str) -> Result<FileConfig, ConfigError> {
    let line_of = |offset: usize| text[..offset.min(text.len())].matches('\n').count() + 1;
    let error = |offset: Option<usize>, key: Option<&str>, message: String| ConfigError {
        path: path.to_path_buf(),
        line: offset.map(line_of),
        key: key.map(str::to_string),
        message,
    };
    let syntax = |e: toml::de::Error| {
        // toml's own message, without its multi-line excerpt: the line number says where.
        error(
            e.span().map(|s| s.start),
            None,
            e.message().trim().replace('\n', "; "),
        )
    };
    let entries: Entries = toml::from_str(text).map_err(syntax)?;
    // In the file's order, so the first mistake reported is the first one in the file.
    let mut entries: Vec<_> = entries.into_iter().collect();
    entries.sort_by_key(|(k, _)| k.span().start);

    let mut file = FileConfig::default();
    for (key, value) in &entries {
        let name = key.get_ref().replace('_', "-");
        let at = Some(key.span().start);
        let fail = |message: String| error(at, Some(key.get_ref()), message);
        let v = value.get_ref();
        match name.as_str() {
            "listen" => {
                let items: Vec<&toml::Value> = match v {
                    toml::Value::String(_) => vec![v],
                    toml::Value::Array(a) => a.iter().collect(),
                    other => return Err(fail(expected("an address or a list of them", other))),
                };
                if items.is_empty() {
                    return Err(fail("an empty list: give at least one address".into()));
                }
                let mut addrs = Vec::new();
                for item in items {
                    let s = string(item, "an address such as \"127.0.0.1:8000\"").map_err(&fail)?;
                    addrs.push(addr(s).map_err(&fail)?);
                }
                file.listen = Some(addrs);
            }
            "workers" => match v {
                toml::Value::Integer(n) => file.workers = Some(workers_n(*n).map_err(&fail)?),
                other => {
                    return Err(fail(expected(
                        &format!("a number, 1 to {MAX_WORKERS}"),
                        other,
                    )))
                }
            },
            "policy" => {
                file.policy =
                    Some(policy(string(v, "a policy name").map_err(&fail)?).map_err(&fail)?)
            }
            "admin" => {
                file.admin = Some(
                    addr(string(v, "an address such as \"127.0.0.1:9000\"").map_err(&fail)?)
                        .map_err(&fail)?,
                )
            }
            "control" => {
                let s = string(v, "a path").map_err(&fail)?;
                if s.is_empty() {
                    return Err(fail("an empty path".into()));
                }
                file.control = Some(PathBuf::from(s));
            }
            "grace" => file.grace = Some(duration(v, grace).map_err(&fail)?),
            "ready-timeout" => {
                file.ready_timeout = Some(duration(v, ready_timeout).map_err(&fail)?)
            }
            "heartbeat-timeout" => {
                file.heartbeat_timeout = Some(duration(v, heartbeat_timeout).map_err(&fail)?)
            }
            "max-requests" => match v {
                toml::Value::Integer(n) => {
                    file.max_requests = Some(max_requests(&n.to_string()).map_err(&fail)?)
                }
                other => return Err(fail(expected("a number of requests", other))),
            },
            "backlog" => match v {
                toml::Value::Integer(n) => {
                    file.backlog = Some(backlog(&n.to_string()).map_err(&fail)?)
                }
                other => return Err(fail(expected("a number", other))),
            },
            "node" => file.node = Some(boolean(v).map_err(&fail)?),
            "plain" => file.plain = Some(boolean(v).map_err(&fail)?),
            "sticky-key" => {
                file.sticky_key = Some(
                    string(v, "ip or \"header:NAME\"")
                        .map_err(&fail)?
                        .parse()
                        .map_err(&fail)?,
                )
            }
            "max-memory" => {
                file.max_memory = Some(match v {
                    toml::Value::Integer(n) => max_memory(&n.to_string()).map_err(&fail)?,
                    other => max_memory(string(other, "a size such as \"512MiB\"").map_err(&fail)?)
                        .map_err(&fail)?,
                })
            }
            "log-format" => {
                file.log_format = Some(
                    log_format(string(v, "\"text\" or \"json\"").map_err(&fail)?).map_err(&fail)?,
                )
            }
            "command" => {
                let toml::Value::Array(items) = v else {
                    return Err(fail(expected(
                        "a list: the program and its arguments, e.g. [\"node\", \"app.js\"]",
                        v,
                    )));
                };
                if items.is_empty() {
                    return Err(fail("an empty list: give at least the program".into()));
                }
                let mut argv = Vec::new();
                for (i, item) in items.iter().enumerate() {
                    let s = string(item, "a string")
                        .map_err(|m| fail(format!("item {}: {m}", i + 1)))?;
                    argv.push(OsString::from(s));
                }
                file.command = Some(argv);
            }
            "env" => {
                if !matches!(v, toml::Value::Table(_)) {
                    return Err(fail(expected(
                        "a table of strings, e.g. env = { NODE_ENV = \"production\" }",
                        v,
                    )));
                }
                file.env = env_table(text, &error)?;
            }
            _ => {
                let hint = closest(&name)
                    .map(|k| format!(" (did you mean `{k}`?)"))
                    .unwrap_or_default();
                return Err(fail(format!(
                    "unknown key{hint}; the keys are {}",
                    KEYS.join(", ")
                )));
            }
        }
    }
    Ok(file)
}

/// The `env` table again, with the position of each of its keys.
fn env_table(text: &str, error: &MakeError<'_>) -> Result<Vec<(OsString, OsString)>, ConfigError> {
    #[derive(serde::Deserialize)]
    struct OnlyEnv {
        env: Entries,
    }
    let only: OnlyEnv = toml::from_str(text).map_err(|e| {
        error(
            e.span().map(|s| s.start),
            Some("env"),
            e.message().to_string(),
        )
    })?;
    let mut vars: Vec<_> = only.env.into_iter().collect();
    vars.sort_by_key(|(k, _)| k.span().start);
    let mut env = Vec::new();
    for (name, value) in vars {
        let key = format!("env.{}", name.get_ref());
        let fail = |m: String| error(Some(name.span().start), Some(&key), m);
        let n = name.get_ref();
        if n.is_empty() || n.contains(['=', '\0']) {
            return Err(fail(
                "not a variable name (empty, or holds `=` or NUL)".into(),
            ));
        }
        if reserved(n) {
            return Err(fail(
                "set by roundhouse for each worker (ROUNDHOUSE_*, LISTEN_FDS, LISTEN_PID, \
                 LISTEN_FDNAMES, NODE_CHANNEL_*): it cannot be given here"
                    .into(),
            ));
        }
        let v = match value.get_ref() {
            toml::Value::String(s) => s.clone(),
            other => {
                return Err(fail(format!(
                    "expected a string, got {} (quote it: {n} = \"{}\")",
                    article(other.type_str()),
                    other
                )))
            }
        };
        if v.contains('\0') {
            return Err(fail("the value holds a NUL byte".into()));
        }
        env.push((OsString::from(n), OsString::from(v)));
    }
    Ok(env)
}

fn article(type_name: &str) -> String {
    match type_name {
        "integer" | "array" => format!("an {type_name}"),
        other => format!("a {other}"),
    }
}

fn expected(what: &str, got: &toml::Value) -> String {
    format!("expected {what}, got {}", article(got.type_str()))
}

fn string<'a>(v: &'a toml::Value, what: &str) -> Result<&'a str, String> {
    v.as_str().ok_or_else(|| expected(what, v))
}

fn boolean(v: &toml::Value) -> Result<bool, String> {
    v.as_bool().ok_or_else(|| expected("true or false", v))
}

/// A duration as a string (`"10s"`) or a number of seconds, through the option's own parser.
fn duration(
    v: &toml::Value,
    parse: fn(&str) -> Result<Duration, String>,
) -> Result<Duration, String> {
    match v {
        toml::Value::String(s) => parse(s),
        toml::Value::Integer(n) if *n >= 0 => parse(&n.to_string()),
        toml::Value::Float(x) if *x >= 0.0 => parse(&x.to_string()),
        other => Err(expected("a duration such as \"500ms\" or \"10s\"", other)),
    }
}

/// The known key nearest to `name` (at most two edits away).
fn closest(name: &str) -> Option<&'static str> {
    KEYS.iter()
        .map(|k| (edit_distance(name, k), *k))
        .filter(|(d, _)| *d <= 2)
        .min()
        .map(|(_, k)| k)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str) -> Result<FileConfig, ConfigError> {
        parse(Path::new("rh.toml"), text)
    }

    fn err(text: &str) -> String {
        p(text).unwrap_err().to_string()
    }

    #[test]
    fn every_key() {
        let f = p(r#"
listen = ["127.0.0.1:8001", "[::1]:8002"]
workers = 4
policy = "least-conn"
admin = "127.0.0.1:9000"
control = "/run/rh.sock"
grace = "10s"
ready_timeout = "5s"
heartbeat-timeout = 0
max-requests = 1000
backlog = 128
node = false
plain = true
max-memory = "512MiB"
log-format = "json"
command = ["node", "app.js"]

[env]
NODE_ENV = "production"
A = "1"
"#)
        .unwrap();
        assert_eq!(
            f.listen,
            Some(vec![
                "127.0.0.1:8001".parse().unwrap(),
                "[::1]:8002".parse().unwrap()
            ])
        );
        assert_eq!(f.workers, Some(4));
        assert_eq!(f.policy, Some(Policy::LeastConn));
        assert_eq!(f.admin, Some("127.0.0.1:9000".parse().unwrap()));
        assert_eq!(f.control, Some(PathBuf::from("/run/rh.sock")));
        assert_eq!(f.grace, Some(Duration::from_secs(10)));
        assert_eq!(f.ready_timeout, Some(Duration::from_secs(5)));
        assert_eq!(f.heartbeat_timeout, Some(Duration::ZERO));
        assert_eq!(f.max_requests, Some(1000));
        assert_eq!(f.backlog, Some(128));
        assert_eq!((f.node, f.plain), (Some(false), Some(true)));
        assert_eq!(f.max_memory, Some(512 << 20));
        assert_eq!(f.log_format, Some(Format::Json));
        assert_eq!(f.command, Some(vec!["node".into(), "app.js".into()]));
        assert_eq!(
            f.env,
            vec![
                ("NODE_ENV".into(), "production".into()),
                ("A".into(), "1".into())
            ]
        );
        assert_eq!(p("").unwrap(), FileConfig::default());
        assert_eq!(
            p("listen = \"0.0.0.0:80\"").unwrap().listen.unwrap().len(),
            1
        );
        assert_eq!(
            p("env = { K = \"v\" }").unwrap().env,
            vec![("K".into(), "v".into())]
        );
    }

    #[test]
    fn one_line_naming_file_line_and_key() {
        for (text, want) in [
            ("workers = 4\nwrokers = 2\n", "rh.toml:2: wrokers: unknown key (did you mean `workers`?)"),
            ("workers = \"4\"\n", "rh.toml:1: workers: expected a number, 1 to 1024, got a string"),
            ("workers = 0\n", "rh.toml:1: workers: the number of workers must be between 1 and 1024, got 0"),
            ("\n\ngrace = \"soon\"\n", "rh.toml:3: grace: invalid duration 'soon'"),
            ("grace = 0\n", "rh.toml:1: grace: the grace period must be more than 0"),
            ("ready-timeout = \"0s\"\n", "rh.toml:1: ready-timeout: the ready timeout must be more than 0"),
            ("policy = \"fair\"\n", "rh.toml:1: policy: unknown policy 'fair'"),
            ("listen = [\"nope\"]\n", "rh.toml:1: listen: 'nope' is not a TCP address"),
            ("max-requests = 0\n", "rh.toml:1: max-requests: a worker is recycled after at least 1 request"),
            ("max-memory = \"lots\"\n", "rh.toml:1: max-memory: invalid size 'lots'"),
            ("node = \"yes\"\n", "rh.toml:1: node: expected true or false, got a string"),
            ("log-format = \"xml\"\n", "rh.toml:1: log-format: unknown log format 'xml'"),
            ("command = \"node app.js\"\n", "rh.toml:1: command: expected a list"),
            ("command = [\"node\", 1]\n", "rh.toml:1: command: item 2: expected a string, got an integer"),
            ("[env]\nA = \"1\"\nPORT = 8080\n", "rh.toml:3: env.PORT: expected a string, got an integer (quote it: PORT = \"8080\")"),
            ("env = { ROUNDHOUSE_WORKER_ID = \"9\" }\n", "rh.toml:1: env.ROUNDHOUSE_WORKER_ID: set by roundhouse"),
            ("workers = 4\nworkers = 5\n", "rh.toml:2: duplicate key"),
            ("workers = \n", "rh.toml:1: "),
        ] {
            let got = err(text);
            assert!(got.starts_with(want), "{text:?}:\n got {got}\nwant {want}…");
            assert!(!got.contains('\n'), "one line: {got:?}");
        }
        let missing = load(Path::new("/nonexistent/rh.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            missing.starts_with("/nonexistent/rh.toml: could not read the config file"),
            "{missing}"
        );
    }

    #[test]
    fn flag_parsers_speak_plainly() {
        assert!(max_requests("0")
            .unwrap_err()
            .contains("leave the option out"));
        assert!(grace("0").is_err() && ready_timeout("0ms").is_err());
        assert_eq!(heartbeat_timeout("0").unwrap(), Duration::ZERO);
        assert!(workers("1025").unwrap_err().contains("between 1 and 1024"));
        assert!(workers("x").is_err());
        assert_eq!(backlog("16").unwrap(), 16);
        assert!(backlog("0").is_err());
        assert_eq!(closest("heartbeat-timout"), Some("heartbeat-timeout"));
        assert_eq!(closest("zzz"), None);
    }

    /// The sample in docs/deploy.md is a real, complete config file.
    #[test]
    fn the_sample_in_the_deploy_doc_loads() {
        let doc = include_str!("../docs/deploy.md");
        let start = doc
            .find("```toml\n")
            .expect("a ```toml block in docs/deploy.md")
            + 8;
        let len = doc[start..].find("```").expect("the block's end");
        let f = parse(Path::new("docs/deploy.md"), &doc[start..start + len])
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            f.command.is_some() && f.workers.is_some() && !f.env.is_empty(),
            "{f:?}"
        );
    }
}
