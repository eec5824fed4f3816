//! Signals, in one place. The handlers are installed before the supervisor starts its first
//! worker, so a signal never finds the default action; each becomes an API request:
//!
//! | signal            | meaning                                                        |
//! |-------------------|----------------------------------------------------------------|
//! | `SIGTERM`, `SIGINT` | graceful stop: stop accepting, drain within `--grace`, exit 0 |
//! | second `SIGTERM`/`SIGINT` | stop at once: kill the workers, exit 0               |
//! | `SIGHUP`          | reload: replace workers one by one, new one online first       |
//! | `SIGTTIN`         | scale up by one worker                                         |
//! | `SIGTTOU`         | scale down by one worker (the highest slot drains)             |
//! | `SIGUSR2`         | upgrade in place: re-execute the binary (same pid, workers)    |
//!
//! Child exits (`SIGCHLD`) are handled inside the supervisor.

use std::future::Future;

use roundhouse_supervisor::{ApiClient, Builder, RunError};
use tokio::signal::unix::{signal, Signal, SignalKind};

/// The handlers, installed before anything starts so a signal never finds the default action.
struct Handlers {
    term: Signal,
    int: Signal,
    hup: Signal,
    ttin: Signal,
    ttou: Signal,
    usr2: Signal,
}

impl Handlers {
    fn install() -> std::io::Result<Handlers> {
        Ok(Handlers {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
            ttin: signal(SignalKind::from_raw(libc::SIGTTIN))?,
            ttou: signal(SignalKind::from_raw(libc::SIGTTOU))?,
            usr2: signal(SignalKind::user_defined2())?,
        })
    }

    /// Turns signals into requests to `api` until `until` is done.
    async fn forward<F: Future<Output = Result<(), RunError>>>(
        mut self,
        api: ApiClient,
        until: F,
    ) -> Result<(), RunError> {
        tokio::pin!(until);
        loop {
            tokio::select! {
                result = &mut until => return result,
                _ = self.term.recv() => stop(&api),
                _ = self.int.recv() => stop(&api),
                _ = self.hup.recv() => {
                    let a = api.clone();
                    tokio::spawn(async move {
                        if let Err(e) = a.reload().await { tracing::error!("reload failed: {e}"); }
                    });
                }
                _ = self.ttin.recv() => scale_by(&api, 1).await,
                _ = self.ttou.recv() => scale_by(&api, -1).await,
                // Refusals and failures are logged by the primary.
                _ = self.usr2.recv() => {
                    let a = api.clone();
                    tokio::spawn(async move { let _ = a.upgrade(None).await; });
                }
            }
        }
    }
}

fn stop(api: &ApiClient) {
    let a = api.clone();
    tokio::spawn(async move {
        let _ = a.stop().await;
    });
}

/// Installs the handlers, starts the supervisor and runs on the main thread until it has
/// stopped, forwarding signals to it.
pub fn run(builder: Builder) -> Result<(), RunError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let handlers = Handlers::install()?;
        let handle = builder.start()?;
        let api = handle.api();
        handlers.forward(api, handle.wait()).await
    })
}

/// The new image of an upgrade: the handlers first, then the primary on this thread (the one
/// that forked the workers), then the signals blocked across the exec are let in.
pub fn run_resumed(state: roundhouse_supervisor::upgrade::State) -> Result<(), RunError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let handlers = Handlers::install()?;
        let resumed = roundhouse_supervisor::resume(state)?;
        roundhouse_supervisor::upgrade::block_signals(false);
        let api = resumed.api();
        handlers.forward(api, resumed.run()).await
    })
}

async fn scale_by(api: &ApiClient, delta: i64) {
    let Ok(stats) = api.stats().await else { return };
    let live = stats
        .workers
        .iter()
        .filter(|w| w.state != roundhouse_supervisor::stats::WorkerState::Draining)
        .count() as i64;
    let target = (live + delta).clamp(1, roundhouse_supervisor::MAX_WORKERS as i64) as u32;
    let api = api.clone();
    tokio::spawn(async move {
        if let Err(e) = api.scale(target).await {
            tracing::error!("scale failed: {e}");
        }
    });
}
