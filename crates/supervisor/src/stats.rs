//! Statistics snapshot types (temporary minimal version; see branch `admin`).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkerState {
    Starting,
    Online,
    Draining,
    Stopped,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerStats {
    pub id: u32,
    pub pid: Option<u32>,
    pub state: WorkerState,
    pub connections_total: u64,
    pub connections_active: u64,
    pub requests_total: u64,
    pub connections_lost: u64,
    pub restarts: u64,
    pub rss_bytes: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Totals {
    pub connections_total: u64,
    pub requests_total: u64,
    pub connections_lost: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Fairness {
    pub metric: String,
    pub jain: f64,
    pub max_min_ratio: f64,
    pub cv: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatsSnapshot {
    pub policy: String,
    pub uptime_s: f64,
    pub listeners: Vec<String>,
    pub workers: Vec<WorkerStats>,
    pub totals: Totals,
    pub fairness: Fairness,
}

pub fn fairness(values: &[u64]) -> Fairness {
    let n = values.len() as f64;
    let sum: f64 = values.iter().map(|&v| v as f64).sum();
    let sq: f64 = values.iter().map(|&v| (v as f64) * (v as f64)).sum();
    let jain = if sq == 0.0 { 1.0 } else { sum * sum / (n * sq) };
    let max = values.iter().copied().max().unwrap_or(0) as f64;
    let min = values.iter().copied().min().unwrap_or(0) as f64;
    let mean = if n > 0.0 { sum / n } else { 0.0 };
    let var = if n > 0.0 { sq / n - mean * mean } else { 0.0 };
    Fairness {
        metric: "connections_total".into(),
        jain,
        max_min_ratio: if max == 0.0 { 1.0 } else { max / min.max(1.0) },
        cv: if mean == 0.0 {
            0.0
        } else {
            var.max(0.0).sqrt() / mean
        },
    }
}

pub fn read_rss(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let pages: u64 = s.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}
