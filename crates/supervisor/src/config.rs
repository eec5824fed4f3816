//! What a supervisor is asked to run: the command, the listeners, the policy and the timeouts.

#![forbid(unsafe_code)]

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Most worker slots a primary runs.
pub const MAX_WORKERS: u32 = 1024;

pub use roundhouse_proto::Policy;

/// Everything the primary needs to run. Build it with [`crate::Builder`]. It crosses an
/// in-place upgrade as part of the state (JSON): a field added later needs `#[serde(default)]`
/// so that a newer binary still reads what an older one wrote.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Config {
    pub command: OsString,
    pub args: Vec<OsString>,
    pub listen: Vec<SocketAddr>,
    pub workers: u32,
    #[serde(with = "by_name")]
    pub policy: Policy,
    pub grace: Duration,
    pub ready_timeout: Duration,
    /// `None` = off.
    pub heartbeat_timeout: Option<Duration>,
    pub max_requests: Option<u64>,
    pub backlog: u32,
    pub admin: Option<SocketAddr>,
    pub control: Option<PathBuf>,
    /// Workers are Node.js programs speaking Node's IPC channel.
    pub node: bool,
    /// `--node`: where the preload shim is; `start` writes the embedded one when `None`.
    pub node_shim: Option<PathBuf>,
    /// Workers speak no channel protocol (socket-activated servers): online once `execve`
    /// succeeded, drained by `SIGTERM`. Only where workers accept themselves.
    pub plain: bool,
    /// `sticky`: what a connection's affinity key is.
    #[serde(with = "by_name")]
    pub sticky_key: StickyKey,
    /// Extra environment for every worker (`--config`'s `env` table), on top of the primary's
    /// own. The variables roundhouse sets for a worker (`ROUNDHOUSE_*`, `LISTEN_*`,
    /// `NODE_CHANNEL_*`) are roundhouse's: a same-named entry here does not replace them.
    pub env: Vec<(OsString, OsString)>,
    /// Recycle (gracefully) a worker whose resident set exceeds this many bytes; `None` = off.
    pub max_memory: Option<u64>,
    /// `roundhouse upgrade` may re-execute this process's binary: its `main` takes the state
    /// over first thing ([`crate::upgrade::take_state`], [`crate::resume`]). Off for embedding
    /// programs that do not.
    pub upgradable: bool,
}

/// A connection's affinity key under `--policy sticky`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum StickyKey {
    /// The client's address, without its port.
    #[default]
    Ip,
    /// The first address in this request header of the connection's first request (e.g.
    /// `X-Forwarded-For` behind a proxy), read by peeking; the client's address when absent.
    Header(String),
}

impl std::fmt::Display for StickyKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StickyKey::Ip => f.write_str("ip"),
            StickyKey::Header(h) => write!(f, "header:{h}"),
        }
    }
}

/// Serde as the name the command line uses (`rr`, `header:x-forwarded-for`).
mod by_name {
    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    pub fn serialize<T: std::fmt::Display, S: Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(v)
    }

    pub fn deserialize<'de, T, D>(d: D) -> Result<T, D::Error>
    where
        T: std::str::FromStr,
        T::Err: std::fmt::Display,
        D: Deserializer<'de>,
    {
        String::deserialize(d)?.parse().map_err(D::Error::custom)
    }
}

impl std::str::FromStr for StickyKey {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "ip" {
            return Ok(StickyKey::Ip);
        }
        match s.strip_prefix("header:") {
            Some(name)
                if !name.is_empty()
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)) =>
            {
                Ok(StickyKey::Header(name.to_ascii_lowercase()))
            }
            _ => Err(format!(
                "invalid sticky key '{s}' (expected ip or header:NAME, e.g. header:X-Forwarded-For)"
            )),
        }
    }
}

impl Config {
    pub fn new(command: impl Into<OsString>) -> Self {
        Config {
            command: command.into(),
            args: Vec::new(),
            listen: Vec::new(),
            workers: std::thread::available_parallelism()
                .map(|n| n.get() as u32)
                .unwrap_or(1)
                .min(MAX_WORKERS),
            policy: Policy::RoundRobin,
            grace: Duration::from_secs(30),
            ready_timeout: Duration::from_secs(30),
            heartbeat_timeout: Some(Duration::from_secs(30)),
            max_requests: None,
            backlog: 4096,
            admin: None,
            control: None,
            node: false,
            node_shim: None,
            plain: false,
            sticky_key: StickyKey::Ip,
            env: Vec::new(),
            max_memory: None,
            upgradable: false,
        }
    }
}

/// Parses a duration like `500ms`, `10s`, `2m`, `1h` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("invalid duration '{s}' (expected e.g. 500ms, 10s, 2m)"))?;
    let secs = match unit {
        "ms" => value / 1000.0,
        "" | "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => {
            return Err(format!(
                "invalid duration '{s}' (expected e.g. 500ms, 10s, 2m)"
            ))
        }
    };
    if !(0.0..=1e9).contains(&secs) {
        return Err(format!("invalid duration '{s}'"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Parses a size like `512MiB`, `2GiB`, `1.5G`, `100k` or a bare number of bytes. Binary
/// (`KiB`, `MiB`, `GiB`, `TiB`) and decimal (`kB`/`KB`, `MB`, `GB`, `TB`) units; a single
/// letter (`K`, `M`, `G`, `T`, either case) is binary, as in `ps` and systemd's `MemoryMax=`.
/// Zero and sizes that do not fit in a `u64` are refused.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let bad = || format!("invalid size '{s}' (expected e.g. 512MiB, 2GiB, 1500MB)");
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let value: f64 = num.parse().map_err(|_| bad())?;
    const K: f64 = 1024.0;
    let factor = match unit.trim_start() {
        "" | "B" | "b" => 1.0,
        "KiB" | "K" | "k" => K,
        "MiB" | "M" | "m" => K * K,
        "GiB" | "G" | "g" => K * K * K,
        "TiB" | "T" | "t" => K * K * K * K,
        "kB" | "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "TB" => 1e12,
        _ => return Err(bad()),
    };
    let bytes = (value * factor).round();
    if !(bytes >= 1.0 && bytes < u64::MAX as f64) {
        return Err(format!("invalid size '{s}' (must be at least 1 byte)"));
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        for bad in ["", "ms", "10x", "-1s", "1e999s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sticky_keys() {
        assert_eq!("ip".parse::<StickyKey>().unwrap(), StickyKey::Ip);
        assert_eq!(
            "header:X-Forwarded-For".parse::<StickyKey>().unwrap(),
            StickyKey::Header("x-forwarded-for".into())
        );
        for bad in ["", "header:", "header:a b", "cookie", "header:x:y"] {
            assert!(bad.parse::<StickyKey>().is_err(), "{bad}");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("2G").unwrap(), 2 << 30);
        assert_eq!(parse_size("1.5GiB").unwrap(), 3 << 29);
        assert_eq!(parse_size("100k").unwrap(), 102_400);
        assert_eq!(parse_size("1500MB").unwrap(), 1_500_000_000);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("64 MiB").unwrap(), 64 << 20);
        for bad in [
            "",
            "0",
            "0MiB",
            "MiB",
            "12XB",
            "-1G",
            "1e3",
            "99999999999TiB",
        ] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn policies() {
        for p in [
            "rr",
            "least-conn",
            "sticky",
            "none",
            "reuseport",
            "reuseport-rr",
        ] {
            assert_eq!(p.parse::<Policy>().unwrap().as_str(), p);
        }
        assert!("fair".parse::<Policy>().is_err());
    }
}
