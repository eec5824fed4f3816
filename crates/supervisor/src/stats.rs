//! The statistics document: what `GET /stats`, `GET /metrics` and `roundhouse status` report.
//!
//! These types are the SPEC's `/stats` JSON, field for field and in the same order, so that
//! `serde_json::to_string(&snapshot)` *is* the document and the control client can print it back
//! unchanged. The owner task builds a [`StatsSnapshot`] on request (it owns the counters); readers
//! only ever see snapshots.
//!
//! Fairness is computed over the slots' `connections_total` (see [`fairness`] for the exact
//! definitions, including what each figure is when a slot has handled nothing).

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

/// The metric fairness is computed over, as named in the `fairness.metric` field.
pub const FAIRNESS_METRIC: &str = "connections_total";

/// The whole `/stats` document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatsSnapshot {
    /// The dispatch policy: `rr`, `least-conn`, `none`, `reuseport` or `reuseport-rr`.
    pub policy: String,
    /// Seconds since the primary started.
    pub uptime_s: f64,
    /// Bound listener addresses (real ports), e.g. `127.0.0.1:8000`.
    pub listeners: Vec<String>,
    /// One entry per worker slot, in slot order.
    pub workers: Vec<WorkerStats>,
    pub totals: Totals,
    /// Over the slots whose `connections_total` is known; `null` when none is.
    pub fairness: Option<Fairness>,
    /// Under `sticky` with a `header:` key: connections that got the client's address as their
    /// key instead (no such header, no complete request head within 1 s or 8 KiB, garbage).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sticky_fallbacks: Option<u64>,
}

impl StatsSnapshot {
    /// Builds a snapshot from per-slot figures, deriving `totals` and `fairness` from them so the
    /// three can never disagree.
    pub fn new(
        policy: impl Into<String>,
        uptime_s: f64,
        listeners: Vec<String>,
        workers: Vec<WorkerStats>,
    ) -> Self {
        let totals = Totals::sum(&workers);
        let fairness = fairness_of(&workers);
        StatsSnapshot {
            policy: policy.into(),
            uptime_s,
            listeners,
            workers,
            totals,
            fairness,
            sticky_fallbacks: None,
        }
    }

    /// True when at least one worker is `online` (what `/healthz` reports).
    pub fn any_online(&self) -> bool {
        self.workers.iter().any(|w| w.state == WorkerState::Online)
    }
}

/// One worker slot. Counters belong to the slot and survive restarts of its process.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerStats {
    /// Slot id, `1..=N`.
    pub id: u32,
    /// The current process, `null` while the slot has none (between a death and its restart).
    pub pid: Option<u32>,
    pub state: WorkerState,
    /// Connections handed to (or, under `none`/`reuseport`, accepted by; under `reuseport-rr`,
    /// steered by the kernel to) this slot. `null` where roundhouse cannot know (`--plain`
    /// workers under `none`/`reuseport`).
    pub connections_total: Option<u64>,
    /// Connections currently open in this slot; `null` for `--plain` workers.
    pub connections_active: Option<u64>,
    /// Requests served by this slot, as reported by its workers; `null` for `--plain` workers.
    pub requests_total: Option<u64>,
    /// Acknowledged connections that were still open when the slot's worker died.
    pub connections_lost: u64,
    /// Times this slot's worker was replaced after an unexpected exit.
    pub restarts: u64,
    /// Resident set size of the current process in bytes (0 when there is none).
    pub rss_bytes: u64,
    /// Present while the slot is waiting to restart a worker that keeps failing (a crash loop).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<Backoff>,
    /// Under `sticky`: how many distinct affinity keys the slot's workers were handed (an
    /// estimate: a 256-register HyperLogLog, about 6.5 % standard error; close to exact for a
    /// few dozen keys).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys: Option<u64>,
}

/// A slot in a crash loop: its worker failed `failures` starts in a row (exited before coming
/// online, or soon after), and the next attempt is `next_attempt_in_s` seconds away.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Backoff {
    pub failures: u32,
    pub next_attempt_in_s: f64,
}

/// A worker slot's state, serialized lowercase as in the SPEC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkerState {
    Starting,
    Online,
    Draining,
    Stopped,
}

impl WorkerState {
    /// Every state, in lifecycle order (used for the `/metrics` state set).
    pub const ALL: [WorkerState; 4] = [
        WorkerState::Starting,
        WorkerState::Online,
        WorkerState::Draining,
        WorkerState::Stopped,
    ];

    /// The lowercase name used in JSON, metrics and the status table.
    pub fn as_str(self) -> &'static str {
        match self {
            WorkerState::Starting => "starting",
            WorkerState::Online => "online",
            WorkerState::Draining => "draining",
            WorkerState::Stopped => "stopped",
        }
    }
}

impl std::fmt::Display for WorkerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Sums over all slots; a figure no slot knows is `null`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    pub connections_total: Option<u64>,
    pub requests_total: Option<u64>,
    pub connections_lost: u64,
}

/// Sum of the known values (saturating), `None` when none is known.
fn sum_known(values: impl Iterator<Item = Option<u64>>) -> Option<u64> {
    values.flatten().fold(None, |acc: Option<u64>, x| {
        Some(acc.unwrap_or(0).saturating_add(x))
    })
}

impl Totals {
    /// Adds up the slots' counters (saturating: a sum never wraps).
    pub fn sum(workers: &[WorkerStats]) -> Totals {
        Totals {
            connections_total: sum_known(workers.iter().map(|w| w.connections_total)),
            requests_total: sum_known(workers.iter().map(|w| w.requests_total)),
            connections_lost: workers
                .iter()
                .fold(0u64, |t, w| t.saturating_add(w.connections_lost)),
        }
    }
}

/// Fairness over the slots whose `connections_total` is known; `None` when no slot's is.
pub fn fairness_of(workers: &[WorkerStats]) -> Option<Fairness> {
    let known: Vec<u64> = workers.iter().filter_map(|w| w.connections_total).collect();
    if known.is_empty() && workers.iter().any(|w| w.connections_total.is_none()) {
        return None;
    }
    Some(fairness(&known))
}

/// How evenly the load is spread over the slots.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Fairness {
    /// What the figures are computed over; always [`FAIRNESS_METRIC`].
    pub metric: String,
    /// Jain's fairness index, in `1/n ..= 1`; 1 is perfectly even.
    pub jain: f64,
    /// Largest over smallest value; 1 is perfectly even.
    pub max_min_ratio: f64,
    /// Coefficient of variation (population standard deviation over mean); 0 is perfectly even.
    pub cv: f64,
}

/// Fairness figures over per-slot values (the slots' `connections_total`).
///
/// - `jain` = (Σx)² / (n·Σx²). With no slots, or when every value is 0, nothing is uneven yet
///   and the index is `1.0`.
/// - `max_min_ratio` = max / min when min > 0; `1.0` with no slots or when every value is 0.
///   When some slot has 0 and another more, the plain ratio is infinite, which JSON cannot
///   carry; it is then reported as `max + 1` (the ratio after adding one to every slot): a
///   finite number, always greater than 1 and growing with the imbalance, so "some slot got
///   nothing" never reads as fair.
/// - `cv` = population standard deviation / mean; `0.0` with no slots or when the mean is 0.
///
/// Sums are taken in `f64`, so counters near `u64::MAX` lose precision but never overflow.
pub fn fairness(values: &[u64]) -> Fairness {
    let n = values.len() as f64;
    let sum: f64 = values.iter().map(|&x| x as f64).sum();
    let sum_sq: f64 = values.iter().map(|&x| (x as f64) * (x as f64)).sum();

    let jain = if values.is_empty() || sum_sq == 0.0 {
        1.0
    } else {
        (sum * sum) / (n * sum_sq)
    };

    let max = values.iter().copied().max().unwrap_or(0);
    let min = values.iter().copied().min().unwrap_or(0);
    let max_min_ratio = if max == 0 {
        1.0
    } else if min == 0 {
        max as f64 + 1.0
    } else {
        max as f64 / min as f64
    };

    let cv = if values.is_empty() || sum == 0.0 {
        0.0
    } else {
        let mean = sum / n;
        let variance = values
            .iter()
            .map(|&x| {
                let d = x as f64 - mean;
                d * d
            })
            .sum::<f64>()
            / n;
        variance.sqrt() / mean
    };

    Fairness {
        metric: FAIRNESS_METRIC.to_string(),
        jain,
        max_min_ratio,
        cv,
    }
}

/// Resident set size of process `pid` in bytes, from `/proc/<pid>/statm` (resident pages × page
/// size): one small read, no parsing of `status`. `None` when the process is gone or the file
/// cannot be read or parsed.
pub fn read_rss(pid: u32) -> Option<u64> {
    let path = PathBuf::from(format!("/proc/{pid}/statm"));
    let text = std::fs::read_to_string(path).ok()?;
    parse_statm_rss(&text, page_size())
}

fn parse_statm_rss(statm: &str, page_size: u64) -> Option<u64> {
    // Fields: size resident shared text lib data dt (all in pages).
    let resident: u64 = statm.split_ascii_whitespace().nth(1)?.parse().ok()?;
    resident.checked_mul(page_size)
}

fn page_size() -> u64 {
    static PAGE_SIZE: OnceLock<u64> = OnceLock::new();
    *PAGE_SIZE.get_or_init(
        || match nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE) {
            Ok(Some(n)) if n > 0 => n as u64,
            _ => 4096,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn fairness_of_equal_values_is_perfect() {
        let f = fairness(&[100, 100, 100, 100]);
        assert_eq!(f.metric, "connections_total");
        assert!(close(f.jain, 1.0), "{f:?}");
        assert!(close(f.max_min_ratio, 1.0), "{f:?}");
        assert!(close(f.cv, 0.0), "{f:?}");
    }

    #[test]
    fn fairness_known_values() {
        // x = [1, 2, 3, 4]: Σx = 10, Σx² = 30, Jain = 100 / 120; mean 2.5,
        // population variance 1.25, cv = sqrt(1.25) / 2.5.
        let f = fairness(&[1, 2, 3, 4]);
        assert!(close(f.jain, 100.0 / 120.0), "{f:?}");
        assert!(close(f.max_min_ratio, 4.0), "{f:?}");
        assert!(close(f.cv, 1.25f64.sqrt() / 2.5), "{f:?}");

        // One slot takes everything: Jain = 1/n.
        let f = fairness(&[0, 0, 0, 12]);
        assert!(close(f.jain, 0.25), "{f:?}");
        assert!(close(f.max_min_ratio, 13.0), "{f:?}");
        // mean 3, deviations -3,-3,-3,9: variance (27+81)/4 = 27, cv = sqrt(27)/3.
        assert!(close(f.cv, 27f64.sqrt() / 3.0), "{f:?}");

        let f = fairness(&[101, 100]);
        assert!(close(f.max_min_ratio, 1.01), "{f:?}");
        assert!(f.jain > 0.9999 && f.jain < 1.0, "{f:?}");
    }

    #[test]
    fn fairness_degenerate_inputs() {
        for values in [&[][..], &[0][..], &[0, 0, 0][..]] {
            let f = fairness(values);
            assert_eq!(
                (f.jain, f.max_min_ratio, f.cv),
                (1.0, 1.0, 0.0),
                "{values:?}"
            );
        }
        let f = fairness(&[7]);
        assert_eq!((f.jain, f.max_min_ratio, f.cv), (1.0, 1.0, 0.0));
        // Huge counters neither overflow nor produce NaN.
        let f = fairness(&[u64::MAX, u64::MAX]);
        assert!(close(f.jain, 1.0) && close(f.max_min_ratio, 1.0) && close(f.cv, 0.0));
        // A slot with nothing is never reported as fair.
        let f = fairness(&[1, 0]);
        assert!(
            f.max_min_ratio > 1.0 && f.max_min_ratio.is_finite(),
            "{f:?}"
        );
    }

    /// The SPEC's example document, verbatim.
    const SPEC_EXAMPLE: &str = r#"{"policy":"rr","uptime_s":12.3,"listeners":["127.0.0.1:8000"],"workers":[{"id":1,"pid":4242,"state":"online","connections_total":100,"connections_active":3,"requests_total":250,"connections_lost":0,"restarts":0,"rss_bytes":5242880}],"totals":{"connections_total":400,"requests_total":1000,"connections_lost":0},"fairness":{"metric":"connections_total","jain":0.9999,"max_min_ratio":1.01,"cv":0.004}}"#;

    fn spec_snapshot() -> StatsSnapshot {
        StatsSnapshot {
            policy: "rr".into(),
            uptime_s: 12.3,
            listeners: vec!["127.0.0.1:8000".into()],
            workers: vec![WorkerStats {
                id: 1,
                pid: Some(4242),
                state: WorkerState::Online,
                connections_total: Some(100),
                connections_active: Some(3),
                requests_total: Some(250),
                connections_lost: 0,
                restarts: 0,
                rss_bytes: 5242880,
                backoff: None,
                keys: None,
            }],
            totals: Totals {
                connections_total: Some(400),
                requests_total: Some(1000),
                connections_lost: 0,
            },
            fairness: Some(Fairness {
                metric: "connections_total".into(),
                jain: 0.9999,
                max_min_ratio: 1.01,
                cv: 0.004,
            }),
            sticky_fallbacks: None,
        }
    }

    #[test]
    fn serializes_exactly_as_the_spec_example() {
        // Same fields, same order, same spelling: byte-identical.
        assert_eq!(
            serde_json::to_string(&spec_snapshot()).unwrap(),
            SPEC_EXAMPLE
        );
        let parsed: StatsSnapshot = serde_json::from_str(SPEC_EXAMPLE).unwrap();
        assert_eq!(parsed, spec_snapshot());
    }

    #[test]
    fn pid_none_is_null_and_states_are_lowercase() {
        let mut w = spec_snapshot().workers[0].clone();
        w.pid = None;
        for state in WorkerState::ALL {
            w.state = state;
            let v = serde_json::to_value(&w).unwrap();
            assert!(v["pid"].is_null());
            assert_eq!(v["state"], state.as_str());
            assert_eq!(state.to_string(), state.as_str());
        }
    }

    #[test]
    fn new_derives_totals_and_fairness() {
        let mut a = spec_snapshot().workers[0].clone();
        let mut b = a.clone();
        b.id = 2;
        b.connections_total = Some(300);
        b.requests_total = Some(750);
        b.connections_lost = 2;
        a.state = WorkerState::Draining;
        b.state = WorkerState::Stopped;
        let s = StatsSnapshot::new("least-conn", 1.5, vec![], vec![a.clone(), b.clone()]);
        assert_eq!(
            s.totals,
            Totals {
                connections_total: Some(400),
                requests_total: Some(1000),
                connections_lost: 2
            }
        );
        assert_eq!(s.fairness, Some(fairness(&[100, 300])));
        assert!(!s.any_online());
        b.state = WorkerState::Online;
        assert!(StatsSnapshot::new("rr", 0.0, vec![], vec![a.clone(), b.clone()]).any_online());
    }

    /// Promise 10: what roundhouse cannot see is `null`, never a made-up 0 or 1.0.
    #[test]
    fn unknown_figures_are_null_and_fairness_is_over_what_is_known() {
        let mut a = spec_snapshot().workers[0].clone();
        a.connections_total = None;
        a.connections_active = None;
        a.requests_total = None;
        let mut b = a.clone();
        b.id = 2;
        let s = StatsSnapshot::new("none", 1.0, vec![], vec![a.clone(), b.clone()]);
        let v = serde_json::to_value(&s).unwrap();
        assert!(v["workers"][0]["requests_total"].is_null());
        assert!(v["workers"][0]["connections_active"].is_null());
        assert!(v["totals"]["connections_total"].is_null());
        assert!(v["totals"]["requests_total"].is_null());
        assert!(v["fairness"].is_null());
        // Known connections (reuseport-rr counts them in the kernel), unknown requests.
        a.connections_total = Some(10);
        b.connections_total = Some(30);
        let s = StatsSnapshot::new("reuseport-rr", 1.0, vec![], vec![a, b]);
        assert_eq!(s.totals.connections_total, Some(40));
        assert_eq!(s.totals.requests_total, None);
        assert_eq!(s.fairness, Some(fairness(&[10, 30])));
    }

    #[test]
    fn statm_parsing() {
        assert_eq!(
            parse_statm_rss("2000 1280 300 10 0 500 0\n", 4096),
            Some(1280 * 4096)
        );
        assert_eq!(parse_statm_rss("", 4096), None);
        assert_eq!(parse_statm_rss("12 x", 4096), None);
    }

    #[test]
    fn rss_of_this_process_is_plausible() {
        let rss = read_rss(std::process::id()).expect("own statm readable");
        assert!(rss > 100 * 1024 && rss < 64 * 1024 * 1024 * 1024, "{rss}");
        // A pid that cannot exist (above pid_max's hard limit of 2^22).
        assert_eq!(read_rss(u32::MAX), None);
    }
}
