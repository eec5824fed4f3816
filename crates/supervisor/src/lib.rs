//! The roundhouse primary, as a library.
//!
//! # Theory of operation
//!
//! [`start`] checks the command, binds every listener (so a busy port is an error the caller
//! sees at once), and starts the primary on a thread of its own running a single-threaded tokio
//! runtime. That thread is the *owner*: it alone accepts connections, spawns and reaps workers,
//! reads and writes their channels and keeps the counters (see `primary`). Everyone else —
//! the `roundhouse` binary's signal handlers, the admin endpoint, the control socket, an
//! embedding program — talks to it through an [`ApiClient`] (requests with a reply) and watches
//! it through [`Event`]s, the way Node's `cluster.on('fork' | 'online' | 'exit' | 'message')`
//! works.
//!
//! Why a dedicated thread: workers are started with `PR_SET_PDEATHSIG`, which fires when the
//! *thread* that forked them exits, not the process. Forking from one long-lived thread keeps
//! that promise ("no orphans", even if the primary is SIGKILLed) without killing workers when a
//! runtime's pool thread retires. It also keeps the hot path on one core with no locks.
//!
//! ```no_run
//! use roundhouse_supervisor::{Builder, Event};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let handle = Builder::new("hello-worker")
//!     .listen("127.0.0.1:8000".parse()?)
//!     .workers(4)
//!     .start()?;
//! let mut events = handle.subscribe();
//! // ... react to events (in an async context), send requests through handle.api() ...
//! handle.join()?;
//! # Ok(()) }
//! ```

pub mod admin;
pub mod api;
pub mod config;
pub mod control;
pub mod events;
pub mod listen;
pub(crate) mod node;
pub mod notify;
pub mod output;
mod primary;
pub mod spawn;
pub mod spawner;
pub mod stats;
mod sys;
pub mod upgrade;

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::broadcast;

pub use api::{ApiClient, ApiError, OpError, Request, Target};
pub use config::{parse_duration, parse_size, Config, Policy, StickyKey, MAX_WORKERS};
pub use events::{Event, ExitInfo};
pub use stats::StatsSnapshot;

/// Why the supervisor could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Bind(#[from] listen::BindError),
    #[error(transparent)]
    Spawn(#[from] spawn::SpawnError),
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("could not start the admin endpoint on {addr}: {source}")]
    Admin {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Control(#[from] control::ControlError),
    #[error("could not start the primary: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Bpf(#[from] roundhouse_bpf::BpfError),
    #[error("the primary thread panicked")]
    Panicked,
}

/// Builds a [`Config`] and starts the supervisor.
pub struct Builder {
    cfg: Config,
    spawner: Option<Box<dyn spawner::Spawner>>,
}

impl std::fmt::Debug for Builder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Builder")
            .field("cfg", &self.cfg)
            .field("spawner", &self.spawner.as_ref().map(|_| "custom"))
            .finish()
    }
}

impl Builder {
    /// A supervisor for `command` (looked up in `PATH` like `execvp`).
    pub fn new(command: impl Into<OsString>) -> Self {
        Builder {
            cfg: Config::new(command),
            spawner: None,
        }
    }
    pub fn from_config(cfg: Config) -> Self {
        Builder { cfg, spawner: None }
    }
    /// Starts, signals and reaps workers through `s` instead of real processes (see
    /// [`spawner`]): how tests drive the real owner loop in-process.
    pub fn spawner(mut self, s: impl spawner::Spawner) -> Self {
        self.spawner = Some(Box::new(s));
        self
    }
    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.cfg.args.push(arg.into());
        self
    }
    pub fn args<I: IntoIterator<Item = S>, S: Into<OsString>>(mut self, args: I) -> Self {
        self.cfg.args.extend(args.into_iter().map(Into::into));
        self
    }
    /// Adds a listener (repeatable). Port 0 picks a free port.
    pub fn listen(mut self, addr: SocketAddr) -> Self {
        self.cfg.listen.push(addr);
        self
    }
    pub fn workers(mut self, n: u32) -> Self {
        self.cfg.workers = n;
        self
    }
    pub fn policy(mut self, p: Policy) -> Self {
        self.cfg.policy = p;
        self
    }
    pub fn grace(mut self, d: Duration) -> Self {
        self.cfg.grace = d;
        self
    }
    pub fn ready_timeout(mut self, d: Duration) -> Self {
        self.cfg.ready_timeout = d;
        self
    }
    /// `None` turns hung-worker detection off.
    pub fn heartbeat_timeout(mut self, d: Option<Duration>) -> Self {
        self.cfg.heartbeat_timeout = d;
        self
    }
    pub fn max_requests(mut self, n: Option<u64>) -> Self {
        self.cfg.max_requests = n;
        self
    }
    pub fn backlog(mut self, n: u32) -> Self {
        self.cfg.backlog = n;
        self
    }
    pub fn admin(mut self, addr: SocketAddr) -> Self {
        self.cfg.admin = Some(addr);
        self
    }
    pub fn control(mut self, path: PathBuf) -> Self {
        self.cfg.control = Some(path);
        self
    }
    /// Workers are Node.js programs speaking Node's IPC channel.
    pub fn node(mut self, on: bool) -> Self {
        self.cfg.node = on;
        self
    }
    /// Workers speak no channel protocol: any socket-activation-aware server (gunicorn,
    /// uvicorn, ...). Only with `none`, `reuseport` or `reuseport-rr`.
    pub fn plain(mut self, on: bool) -> Self {
        self.cfg.plain = on;
        self
    }
    /// Under `--policy sticky`: what a connection's affinity key is.
    pub fn sticky_key(mut self, key: StickyKey) -> Self {
        self.cfg.sticky_key = key;
        self
    }
    /// An environment variable for every worker (repeatable), on top of the primary's own.
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.cfg.env.push((key.into(), value.into()));
        self
    }
    /// Environment variables for every worker (see [`Builder::env`]).
    pub fn envs<I, K, V>(mut self, vars: I) -> Self
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<OsString>,
        V: Into<OsString>,
    {
        self.cfg
            .env
            .extend(vars.into_iter().map(|(k, v)| (k.into(), v.into())));
        self
    }
    /// Recycle (gracefully) a worker whose RSS exceeds `bytes`; `None` = off.
    pub fn max_memory(mut self, bytes: Option<u64>) -> Self {
        self.cfg.max_memory = bytes;
        self
    }
    /// This program's `main` resumes an upgrade (see [`Config::upgradable`]); without it,
    /// `upgrade` is refused.
    pub fn upgradable(mut self, on: bool) -> Self {
        self.cfg.upgradable = on;
        self
    }
    pub fn config(&self) -> &Config {
        &self.cfg
    }
    /// Checks the configuration, binds everything and starts the primary.
    pub fn start(self) -> Result<Handle, RunError> {
        let spawner = self
            .spawner
            .unwrap_or_else(|| Box::new(spawner::ProcessSpawner));
        start_with(self.cfg, spawner)
    }
}

/// A running supervisor.
pub struct Handle {
    api: ApiClient,
    events: broadcast::Sender<Event>,
    /// Subscribed before the first worker was forked, so the first `subscribe()` misses nothing.
    first_events: std::sync::Mutex<Option<broadcast::Receiver<Event>>>,
    admin_addr: Option<SocketAddr>,
    thread: std::thread::JoinHandle<Result<(), RunError>>,
    /// The admin/control thread; it ends when the primary does.
    surfaces: std::thread::JoinHandle<()>,
    done: tokio::sync::oneshot::Receiver<()>,
}

impl Handle {
    /// Sends requests (stats, reload, scale, send, stop) to the primary.
    pub fn api(&self) -> ApiClient {
        self.api.clone()
    }
    /// Events. The first call returns every event since the start (the first workers' `Fork`
    /// and `Online` included); later calls, events from then on. A slow receiver loses the
    /// oldest (`RecvError::Lagged`) rather than growing the primary's memory.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        let first = self.first_events.lock().ok().and_then(|mut f| f.take());
        first.unwrap_or_else(|| self.events.subscribe())
    }
    /// The admin endpoint's bound address (with the real port when 0 was asked).
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }
    /// Waits (blocking) until the primary has stopped, and its admin endpoint and control
    /// socket are closed.
    pub fn join(self) -> Result<(), RunError> {
        let result = self.thread.join().unwrap_or(Err(RunError::Panicked));
        let _ = self.surfaces.join();
        result
    }
    /// Waits (async) until the primary has stopped, and its admin endpoint and control socket
    /// are closed.
    pub async fn wait(self) -> Result<(), RunError> {
        let Handle {
            thread,
            surfaces,
            done,
            ..
        } = self;
        let _ = done.await;
        let result = thread.join().unwrap_or(Err(RunError::Panicked));
        let _ = surfaces.join();
        result
    }
}

/// Raises the soft fd limit to the hard one: the primary holds a copy of every unacknowledged
/// connection and the kernel counts fds in flight against this limit (`ETOOMANYREFS`).
fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
    }
}

/// `--max-memory`: once a second, off the owner thread (the RSS is read from `/proc` by
/// [`ApiClient::stats`] in this task), reports every online worker over the limit to the owner,
/// which recycles it gracefully. Never returns (pending forever without a limit).
async fn watch_memory(limit: Option<u64>, api: ApiClient) {
    let Some(limit) = limit else {
        return std::future::pending().await;
    };
    let mut every = tokio::time::interval(std::time::Duration::from_secs(1));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let Ok(stats) = api.stats().await else {
            continue;
        };
        for w in &stats.workers {
            if let (Some(pid), stats::WorkerState::Online) = (w.pid, w.state) {
                if w.rss_bytes > limit {
                    let _ = api.over_memory(w.id, pid, w.rss_bytes).await;
                }
            }
        }
    }
}

/// Starts the admin/control thread: the admin endpoint (if any), the control socket and the
/// `--max-memory` watcher, on a current-thread runtime of their own so a scrape or a slow client
/// never takes the owner's (accept path's) time; they reach the owner only through `api`.
/// They end when the returned sender is dropped (as the primary ends, however it ends).
fn spawn_surfaces(
    admin: Option<std::net::TcpListener>,
    control: std::os::unix::net::UnixListener,
    api: ApiClient,
    max_memory: Option<u64>,
) -> std::io::Result<(
    std::thread::JoinHandle<()>,
    tokio::sync::oneshot::Sender<()>,
)> {
    let surfaces_api = api.clone();
    let memory_api = api;
    let (surfaces_stop, surfaces_stopped) = tokio::sync::oneshot::channel::<()>();
    let surfaces = std::thread::Builder::new()
        .name("roundhouse-admin".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!("could not start the admin thread: {e}");
                    return;
                }
            };
            rt.block_on(async move {
                let surfaces = async move {
                    if let Some(l) = admin {
                        match tokio::net::TcpListener::from_std(l) {
                            Ok(l) => {
                                if let Ok(addr) = l.local_addr() {
                                    tracing::info!(admin.addr = %addr, "admin listening");
                                }
                                tokio::spawn(admin::serve_admin(l, surfaces_api.clone()));
                            }
                            Err(e) => tracing::error!("could not serve the admin endpoint: {e}"),
                        }
                    }
                    match tokio::net::UnixListener::from_std(control) {
                        Ok(l) => control::serve_control(l, surfaces_api).await,
                        Err(e) => tracing::error!("could not serve the control socket: {e}"),
                    }
                };
                tokio::select! {
                    () = surfaces => {}
                    () = watch_memory(max_memory, memory_api) => {}
                    _ = surfaces_stopped => {}
                }
            });
        })?;
    Ok((surfaces, surfaces_stop))
}

/// The new image of an upgrade, ready to go on: see [`resume`].
pub struct Resumed {
    api: ApiClient,
    primary: primary::Primary,
    client: Option<std::os::fd::OwnedFd>,
    surfaces: std::thread::JoinHandle<()>,
    surfaces_stop: tokio::sync::oneshot::Sender<()>,
    control_path: PathBuf,
    node_shim: Option<PathBuf>,
}

/// In the new image of an upgrade: takes over everything the old image described in `state`.
/// Call it on the thread that executed the new image (the one that forked the workers: see
/// [`upgrade`]), inside a current-thread tokio runtime, then [`Resumed::run`] there.
pub fn resume(state: upgrade::State) -> Result<Resumed, RunError> {
    upgrade::set_log_json(state.log_json);
    let control_path = state.control_path.clone();
    let node_shim = state.node_shim_written.clone();
    let (api, rx) = api::channel(64);
    let (events, _) = broadcast::channel(1024);
    let restored = primary::Primary::restore(state, rx, events, Box::new(spawner::ProcessSpawner))?;
    let max_memory = restored.primary.max_memory();
    let (surfaces, surfaces_stop) =
        spawn_surfaces(restored.admin, restored.control, api.clone(), max_memory)?;
    Ok(Resumed {
        api,
        primary: restored.primary,
        client: restored.client,
        surfaces,
        surfaces_stop,
        control_path,
        node_shim,
    })
}

impl Resumed {
    /// Sends requests to the primary (the binary's signal handlers).
    pub fn api(&self) -> ApiClient {
        self.api.clone()
    }

    /// Runs the primary on this thread until it stops.
    pub async fn run(self) -> Result<(), RunError> {
        let Resumed {
            primary,
            client,
            surfaces,
            surfaces_stop,
            control_path,
            node_shim,
            ..
        } = self;
        let result = primary.run_upgraded(client).await;
        let _ = std::fs::remove_file(&control_path);
        if let Some(shim) = node_shim {
            node::remove_shim(&shim);
        }
        drop(surfaces_stop);
        let _ = surfaces.join();
        result
    }
}

/// Starts the supervisor described by `cfg`.
pub fn start(cfg: Config) -> Result<Handle, RunError> {
    start_with(cfg, Box::new(spawner::ProcessSpawner))
}

/// Starts the supervisor described by `cfg`, its workers started through `spawner`.
pub fn start_with(mut cfg: Config, spawner: Box<dyn spawner::Spawner>) -> Result<Handle, RunError> {
    if cfg.workers == 0 || cfg.workers > MAX_WORKERS {
        return Err(RunError::Config(format!(
            "--workers must be 1..={MAX_WORKERS}, got {}",
            cfg.workers
        )));
    }
    if cfg.listen.is_empty() {
        cfg.listen.push(SocketAddr::from(([127, 0, 0, 1], 8000)));
    }
    if cfg.listen.len() > 60 {
        return Err(RunError::Config("at most 60 listeners".into()));
    }
    if cfg.plain && cfg.policy.hands_off() {
        return Err(RunError::Config(format!(
            "--plain needs a policy where workers accept on their own listeners (none, reuseport \
             or reuseport-rr): under {} the primary hands connections over a channel that a \
             plain worker does not have",
            cfg.policy
        )));
    }
    if cfg.plain && cfg.node {
        return Err(RunError::Config(
            "--plain and --node exclude each other: a --node worker speaks Node's IPC channel"
                .into(),
        ));
    }
    let exe = spawn::resolve_command(&cfg.command)?;
    raise_fd_limit();
    let reuse = cfg.policy.per_slot_listeners();
    let mut listeners = Vec::new();
    for addr in &cfg.listen {
        let l = listen::bind(*addr, cfg.backlog, reuse)?;
        // Port 0 under reuseport: every slot must bind the port the first bind picked.
        listeners.push(l);
    }
    let admin = match cfg.admin {
        Some(addr) => Some(listen::bind(addr, 128, false).map_err(|e| RunError::Admin {
            addr,
            source: e.source,
        })?),
        None => None,
    };
    let admin_addr = admin.as_ref().and_then(|l| l.local_addr().ok());
    let control_path = cfg
        .control
        .clone()
        .unwrap_or_else(control::default_control_path);
    let control = control::bind_control(&control_path)?;
    let mut written_shim = None;
    if cfg.node && cfg.node_shim.is_none() {
        let path = node::write_shim()?;
        cfg.node_shim = Some(path.clone());
        written_shim = Some(path);
    }
    let surfaces_fds = primary::Surfaces {
        self_exe: cfg.upgradable.then(upgrade::started_from).flatten(),
        admin: admin
            .as_ref()
            .map(|l| l.try_clone().map(std::os::fd::OwnedFd::from))
            .transpose()?,
        control: Some(control.try_clone()?.into()),
        control_path: control_path.clone(),
        node_shim_written: written_shim.clone(),
    };
    let (api, rx) = api::channel(64);
    let (events, first_events) = broadcast::channel(1024);
    let (done_tx, done) = tokio::sync::oneshot::channel();
    let thread_events = events.clone();
    let (surfaces, surfaces_stop) = spawn_surfaces(admin, control, api.clone(), cfg.max_memory)?;
    let thread = std::thread::Builder::new()
        .name("roundhouse-primary".into())
        .spawn(move || {
            let _done = done_tx;
            let _surfaces = surfaces_stop;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let result = rt.block_on(async move {
                let primary = primary::Primary::new(
                    cfg,
                    exe,
                    listeners,
                    rx,
                    thread_events,
                    spawner,
                    surfaces_fds,
                )?;
                primary.run().await
            });
            let _ = std::fs::remove_file(&control_path);
            if let Some(shim) = written_shim {
                node::remove_shim(&shim);
            }
            result
        })?;
    Ok(Handle {
        api,
        events,
        first_events: std::sync::Mutex::new(Some(first_events)),
        admin_addr,
        thread,
        surfaces,
        done,
    })
}
