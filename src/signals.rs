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
//!
//! Child exits (`SIGCHLD`) are handled inside the supervisor.

use roundhouse_supervisor::{Builder, RunError};
use tokio::signal::unix::{signal, SignalKind};

/// Installs the handlers, starts the supervisor and runs on the main thread until it has
/// stopped, forwarding signals to it.
pub fn run(builder: Builder) -> Result<(), RunError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut hup = signal(SignalKind::hangup())?;
        let mut ttin = signal(SignalKind::from_raw(libc::SIGTTIN))?;
        let mut ttou = signal(SignalKind::from_raw(libc::SIGTTOU))?;
        let handle = builder.start()?;
        let api = handle.api();
        let wait = handle.wait();
        tokio::pin!(wait);
        loop {
            tokio::select! {
                result = &mut wait => return result,
                _ = term.recv() => { let a = api.clone(); tokio::spawn(async move { let _ = a.stop().await; }); }
                _ = int.recv() => { let a = api.clone(); tokio::spawn(async move { let _ = a.stop().await; }); }
                _ = hup.recv() => {
                    let a = api.clone();
                    tokio::spawn(async move {
                        if let Err(e) = a.reload().await { tracing::error!("reload failed: {e}"); }
                    });
                }
                _ = ttin.recv() => scale_by(&api, 1).await,
                _ = ttou.recv() => scale_by(&api, -1).await,
            }
        }
    })
}

async fn scale_by(api: &roundhouse_supervisor::ApiClient, delta: i64) {
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
