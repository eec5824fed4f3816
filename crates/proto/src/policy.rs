//! The dispatch policy, named the same way on both sides (`--policy`, `ROUNDHOUSE_POLICY`).

#![forbid(unsafe_code)]

use std::fmt;
use std::str::FromStr;

/// How the primary spreads connections over workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Policy {
    /// The primary accepts and hands each connection to the next online worker (Node's
    /// `SCHED_RR`).
    #[default]
    RoundRobin,
    /// The primary accepts and hands each connection to the online worker with the fewest open
    /// connections.
    LeastConn,
    /// The primary accepts and hands each connection to the worker its affinity key (the
    /// client's address, or a request header) maps to, by consistent hashing over the slots.
    Sticky,
    /// Every worker gets the shared listeners and accepts itself (Node's `SCHED_NONE`).
    None,
    /// Every worker slot gets its own `SO_REUSEPORT` listeners; the kernel spreads.
    ReusePort,
    /// As `ReusePort`, and an eBPF `SK_REUSEPORT` program attached by the primary picks the
    /// listener in strict rotation over the online workers.
    ReusePortRr,
}

impl Policy {
    pub fn as_str(self) -> &'static str {
        match self {
            Policy::RoundRobin => "rr",
            Policy::LeastConn => "least-conn",
            Policy::Sticky => "sticky",
            Policy::None => "none",
            Policy::ReusePort => "reuseport",
            Policy::ReusePortRr => "reuseport-rr",
        }
    }
    /// Whether every worker slot has listeners of its own (`SO_REUSEPORT`).
    pub fn per_slot_listeners(self) -> bool {
        matches!(self, Policy::ReusePort | Policy::ReusePortRr)
    }
    /// Whether the primary accepts and hands off connections itself.
    pub fn hands_off(self) -> bool {
        matches!(
            self,
            Policy::RoundRobin | Policy::LeastConn | Policy::Sticky
        )
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Policy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "rr" => Ok(Policy::RoundRobin),
            "least-conn" => Ok(Policy::LeastConn),
            "sticky" => Ok(Policy::Sticky),
            "none" => Ok(Policy::None),
            "reuseport" => Ok(Policy::ReusePort),
            "reuseport-rr" => Ok(Policy::ReusePortRr),
            other => Err(format!(
                "unknown policy '{other}' (expected rr, least-conn, sticky, none, reuseport or reuseport-rr)"
            )),
        }
    }
}
