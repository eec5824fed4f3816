//! Requests to the primary's owner task (temporary minimal version; see branch `admin`).

use tokio::sync::{mpsc, oneshot};

use crate::stats::StatsSnapshot;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    All,
    Worker(u32),
}

#[derive(Debug)]
pub enum Request {
    Stats {
        reply: oneshot::Sender<StatsSnapshot>,
    },
    ResetStats {
        reply: oneshot::Sender<()>,
    },
    Reload {
        reply: oneshot::Sender<Result<(), String>>,
    },
    Scale {
        workers: u32,
        reply: oneshot::Sender<Result<(), String>>,
    },
    Send {
        to: Target,
        message: serde_json::Value,
        reply: oneshot::Sender<Result<(), String>>,
    },
    Stop {
        reply: oneshot::Sender<()>,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("the primary is gone")]
    Gone,
    #[error("{0}")]
    Failed(String),
}

#[derive(Debug, Clone)]
pub struct ApiClient(pub mpsc::Sender<Request>);

impl ApiClient {
    async fn call<T>(&self, f: impl FnOnce(oneshot::Sender<T>) -> Request) -> Result<T, ApiError> {
        let (tx, rx) = oneshot::channel();
        self.0.send(f(tx)).await.map_err(|_| ApiError::Gone)?;
        rx.await.map_err(|_| ApiError::Gone)
    }
    pub async fn stats(&self) -> Result<StatsSnapshot, ApiError> {
        self.call(|reply| Request::Stats { reply }).await
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
    pub async fn send(&self, to: Target, message: serde_json::Value) -> Result<(), ApiError> {
        self.call(|reply| Request::Send { to, message, reply })
            .await?
            .map_err(ApiError::Failed)
    }
    pub async fn stop(&self) -> Result<(), ApiError> {
        self.call(|reply| Request::Stop { reply }).await
    }
}
