//! The primary's request queue: how the admin endpoint and the control socket talk to the owner.
//!
//! The primary's state lives in one owner task (CONVENTIONS 6). Everything outside it, the
//! admin HTTP server and the control socket, holds a cloneable [`ApiClient`] and sends it
//! [`Request`]s, each carrying a `oneshot` sender for the reply (a "ticket"). The owner loop
//! holds the matching `mpsc::Receiver<Request>` from [`channel`] and answers in its `select!`.
//! Nobody else touches the state, so no locks, and a slow reader can only slow itself.
//!
//! If the owner has stopped (receiver dropped) or drops a reply sender without answering,
//! callers get [`ApiError::Gone`].

#![forbid(unsafe_code)]

use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

use crate::events::ExitInfo;
use crate::stats::StatsSnapshot;

/// A request to the owner task. The owner must answer every `reply` (dropping it unanswered
/// reports [`ApiError::Gone`] to the caller).
#[derive(Debug)]
pub enum Request {
    /// A fresh snapshot of every slot's counters.
    Stats {
        reply: oneshot::Sender<StatsSnapshot>,
    },
    /// Zero every slot's cumulative counters (`connections_total`, `requests_total`,
    /// `connections_lost`, `restarts`); `connections_active` is a gauge of what is open now and
    /// stays. Uptime is not reset.
    ResetStats { reply: oneshot::Sender<()> },
    /// Replace every worker one by one (as SIGHUP). `Err` carries a one-line reason.
    /// Answered when every worker serving was started after the request (a reload asked for
    /// while one runs is not merged into it: it runs next).
    Reload {
        reply: oneshot::Sender<Result<(), OpError>>,
    },
    /// Set the number of workers. A scale-up is answered once every added worker is online
    /// (or with the error of one that failed to start); a scale-down once the removed workers
    /// are told to drain.
    Scale {
        workers: u32,
        reply: oneshot::Sender<Result<(), OpError>>,
    },
    /// Deliver a JSON message to workers, as if the primary sent it. `Err` for an unknown
    /// worker id.
    Send {
        to: Target,
        message: Value,
        reply: oneshot::Sender<Result<(), OpError>>,
    },
    /// Begin a graceful stop (as SIGTERM). Reply once the stop has begun; the control server
    /// keeps the requesting connection open until the process exits, so the client can wait
    /// for the end.
    Stop { reply: oneshot::Sender<()> },
    /// Replace the supervisor itself with the binary at the path it was started from (same pid,
    /// same workers, same connections). `Err` if it is refused or the new binary cannot take
    /// over (the old one keeps serving); on success there is no reply from this process: the
    /// new image answers `client` (the control connection that asked), if any.
    Upgrade {
        client: Option<std::os::fd::OwnedFd>,
        reply: oneshot::Sender<Result<(), OpError>>,
    },
    /// `--max-memory`: worker `pid` of slot `id` was seen at `rss` bytes, over the limit.
    /// Recycle it gracefully (replacement online first), unless it is no longer that slot's
    /// serving worker. No reply.
    OverMemory { id: u32, pid: u32, rss: u64 },
}

/// Recipient of a [`Request::Send`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    All,
    /// A worker slot id, `1..=N`.
    Worker(u32),
}

/// Why the owner refused or failed a request. Messages are lowercase and carry no prefix: the
/// edge (control server, CLI, log) says what failed ("reload failed: …") once.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpError {
    #[error("the primary is stopping")]
    Stopping,
    #[error("worker count must be 1..={max}, got {0}", max = crate::config::MAX_WORKERS)]
    WorkerCount(u32),
    #[error("could not bind the listeners of worker {id}: {why}")]
    Bind { id: u32, why: String },
    #[error("could not start a new worker {0}")]
    StartFailed(u32),
    #[error("new worker {id} exited ({status}) before it was online")]
    ExitedBeforeOnline { id: u32, status: ExitInfo },
    #[error("no worker with id {0}")]
    NoSuchWorker(u32),
    #[error("message too large ({0} bytes)")]
    MessageTooLarge(usize),
    /// An upgrade was refused or failed; the old primary keeps serving.
    #[error("{0}")]
    Upgrade(String),
    #[error("an upgrade is in progress")]
    Upgrading,
}

/// Why a request got no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// The owner task is gone (the primary is stopping) or dropped the reply.
    #[error("the primary is shutting down")]
    Gone,
    /// The owner refused or failed the request.
    #[error(transparent)]
    Failed(#[from] OpError),
}

/// Creates the request queue: the client for admin and control, the receiver for the owner.
pub fn channel(capacity: usize) -> (ApiClient, mpsc::Receiver<Request>) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    (ApiClient(tx), rx)
}

/// A handle to the owner task. Cheap to clone; every method is one round trip.
#[derive(Debug, Clone)]
pub struct ApiClient(pub mpsc::Sender<Request>);

impl ApiClient {
    async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Request,
    ) -> Result<T, ApiError> {
        let (reply, answer) = oneshot::channel();
        self.0.send(make(reply)).await.map_err(|_| ApiError::Gone)?;
        answer.await.map_err(|_| ApiError::Gone)
    }

    /// The current statistics. The owner fills in the counters; the per-worker RSS (left 0 by the owner)
    /// is read from `/proc` here, in the caller's task, so a scrape costs the accept path nothing but the copy.
    pub async fn stats(&self) -> Result<StatsSnapshot, ApiError> {
        let mut snapshot = self.call(|reply| Request::Stats { reply }).await?;
        for w in snapshot.workers.iter_mut().filter(|w| w.rss_bytes == 0) {
            w.rss_bytes = w.pid.and_then(crate::stats::read_rss).unwrap_or(0);
        }
        Ok(snapshot)
    }

    pub async fn reset_stats(&self) -> Result<(), ApiError> {
        self.call(|reply| Request::ResetStats { reply }).await
    }

    pub async fn reload(&self) -> Result<(), ApiError> {
        self.call(|reply| Request::Reload { reply })
            .await?
            .map_err(ApiError::Failed)
    }

    pub async fn scale(&self, workers: u32) -> Result<(), ApiError> {
        self.call(|reply| Request::Scale { workers, reply })
            .await?
            .map_err(ApiError::Failed)
    }

    pub async fn send(&self, to: Target, message: Value) -> Result<(), ApiError> {
        self.call(|reply| Request::Send { to, message, reply })
            .await?
            .map_err(ApiError::Failed)
    }

    pub async fn stop(&self) -> Result<(), ApiError> {
        self.call(|reply| Request::Stop { reply }).await
    }

    /// Asks for an upgrade (see [`Request::Upgrade`]). Returns only if it was refused or
    /// failed: on success this process is replaced before an answer could come back.
    pub async fn upgrade(&self, client: Option<std::os::fd::OwnedFd>) -> Result<(), ApiError> {
        self.call(|reply| Request::Upgrade { client, reply })
            .await?
            .map_err(ApiError::Failed)
    }

    /// Reports a worker over `--max-memory` (see [`Request::OverMemory`]).
    pub async fn over_memory(&self, id: u32, pid: u32, rss: u64) -> Result<(), ApiError> {
        self.0
            .send(Request::OverMemory { id, pid, rss })
            .await
            .map_err(|_| ApiError::Gone)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn round_trips_and_errors() {
        let (api, mut rx) = channel(4);
        let owner = tokio::spawn(async move {
            while let Some(req) = rx.recv().await {
                match req {
                    Request::Scale { workers, reply } => {
                        let _ = reply.send(if workers == 3 {
                            Ok(())
                        } else {
                            Err(OpError::WorkerCount(workers))
                        });
                    }
                    Request::Send { to, reply, .. } => {
                        let _ = reply.send(match to {
                            Target::Worker(9) => Err(OpError::NoSuchWorker(9)),
                            _ => Ok(()),
                        });
                    }
                    // Dropped unanswered: the caller must see Gone, not hang.
                    Request::Reload { reply } => drop(reply),
                    Request::Stop { reply } => {
                        let _ = reply.send(());
                        return;
                    }
                    _ => {}
                }
            }
        });
        assert_eq!(api.scale(3).await, Ok(()));
        assert_eq!(
            api.scale(4).await,
            Err(ApiError::Failed(OpError::WorkerCount(4)))
        );
        assert_eq!(api.send(Target::All, Value::Null).await, Ok(()));
        assert_eq!(
            api.send(Target::Worker(9), Value::Null)
                .await
                .unwrap_err()
                .to_string(),
            "no worker with id 9"
        );
        assert_eq!(api.reload().await, Err(ApiError::Gone));
        assert_eq!(api.stop().await, Ok(()));
        owner.await.unwrap();
        // The owner is gone: every call fails fast.
        assert_eq!(api.stats().await.unwrap_err(), ApiError::Gone);
    }
}

/// A stand-in for the owner task, for the admin and control tests: answers every [`Request`]
/// from a shared canned snapshot and records what it was asked.
#[cfg(test)]
pub(crate) mod fake {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::stats::{StatsSnapshot, WorkerState, WorkerStats};

    /// What the fake owner shares with the test.
    #[derive(Clone)]
    pub(crate) struct Owner {
        pub snapshot: Arc<Mutex<StatsSnapshot>>,
        pub log: Arc<Mutex<Vec<String>>>,
        /// When set, `Reload` fails with this error.
        pub reload_error: Arc<Mutex<Option<OpError>>>,
    }

    impl Owner {
        pub fn log(&self) -> Vec<String> {
            self.log.lock().unwrap().clone()
        }
        pub fn set_state(&self, state: WorkerState) {
            for w in &mut self.snapshot.lock().unwrap().workers {
                w.state = state;
            }
        }
    }

    pub(crate) fn worker(id: u32, connections_total: u64) -> WorkerStats {
        WorkerStats {
            id,
            pid: Some(4000 + id),
            state: WorkerState::Online,
            connections_total: Some(connections_total),
            connections_active: Some(2),
            requests_total: Some(connections_total * 3),
            connections_lost: id as u64 - 1,
            restarts: 1,
            rss_bytes: 5 * 1024 * 1024 + id as u64,
            backoff: None,
            keys: None,
        }
    }

    /// Three workers, the last without a process.
    pub(crate) fn canned() -> StatsSnapshot {
        let mut w3 = worker(3, 98);
        w3.pid = None;
        w3.state = WorkerState::Starting;
        StatsSnapshot::new(
            "rr",
            12.5,
            vec!["127.0.0.1:8000".into()],
            vec![worker(1, 100), worker(2, 102), w3],
        )
    }

    /// Spawns the fake owner on the current runtime.
    pub(crate) fn spawn(snapshot: StatsSnapshot) -> (ApiClient, Owner) {
        let (api, mut rx) = channel(16);
        let owner = Owner {
            snapshot: Arc::new(Mutex::new(snapshot)),
            log: Arc::default(),
            reload_error: Arc::default(),
        };
        let o = owner.clone();
        tokio::spawn(async move {
            while let Some(req) = rx.recv().await {
                let say = |s: String| o.log.lock().unwrap().push(s);
                match req {
                    Request::Stats { reply } => {
                        let _ = reply.send(o.snapshot.lock().unwrap().clone());
                    }
                    Request::ResetStats { reply } => {
                        let mut s = o.snapshot.lock().unwrap();
                        for w in &mut s.workers {
                            w.connections_total = Some(0);
                            w.requests_total = Some(0);
                            w.connections_lost = 0;
                            w.restarts = 0;
                        }
                        *s = StatsSnapshot::new(
                            s.policy.clone(),
                            s.uptime_s,
                            s.listeners.clone(),
                            s.workers.clone(),
                        );
                        drop(s);
                        say("reset".into());
                        let _ = reply.send(());
                    }
                    Request::Reload { reply } => {
                        say("reload".into());
                        let _ = reply.send(match o.reload_error.lock().unwrap().clone() {
                            Some(e) => Err(e),
                            None => Ok(()),
                        });
                    }
                    Request::Scale { workers, reply } => {
                        say(format!("scale {workers}"));
                        let _ = reply.send(Ok(()));
                    }
                    Request::Send { to, message, reply } => {
                        let known = match to {
                            Target::All => true,
                            Target::Worker(id) => o
                                .snapshot
                                .lock()
                                .unwrap()
                                .workers
                                .iter()
                                .any(|w| w.id == id),
                        };
                        if known {
                            say(format!("send {to:?} {message}"));
                            let _ = reply.send(Ok(()));
                        } else if let Target::Worker(id) = to {
                            let _ = reply.send(Err(OpError::NoSuchWorker(id)));
                        }
                    }
                    Request::Stop { reply } => {
                        say("stop".into());
                        let _ = reply.send(());
                    }
                    Request::OverMemory { id, .. } => say(format!("over memory {id}")),
                    Request::Upgrade { client, reply } => {
                        say(format!("upgrade (client {})", client.is_some()));
                        let _ = reply.send(Err(OpError::Upgrade(
                            "/x/roundhouse: not executable (permission denied)".into(),
                        )));
                    }
                }
            }
        });
        (api, owner)
    }
}
