//! BaseDaemon: what every Paddock daemon shares, in ep.io's shape.
//!
//! Start order: flags, logging, panic hook, validated config (exit 78 before any
//! socket), pid lock on the state dir, sockets, the daemon's own setup, `READY=1`.
//! Then named main loops run under an actix System; resilient loops restart with
//! backoff, a critical loop that ends ends the process (non-zero), and so does any
//! panic: a daemon is never left half-alive. SIGTERM/SIGINT drain and exit 0;
//! SIGHUP reloads the cluster file and keyring.
//!
//! Architecture invariant: this crate knows the daemon lifecycle and nothing of any
//! one daemon's domain; it reaches the wire only through `paddock-wire`'s API.

pub mod calls;
pub mod log;

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use paddock_backoff::Backoff;
use paddock_config::ClusterConfig;
use paddock_wire::keyring::UserKeys;
use paddock_wire::kinds::{self, Beat, Pong};
use paddock_wire::{Code, Envelope, Inbound, ServerHandle, ServerSpec, SharedKeyring, WireError};
use serde_json::{json, Value};
use tokio::sync::watch;
use tracing::Instrument;

/// sysexits.h codes the daemons use.
pub mod exit {
    pub const CONFIG: i32 = 78;
    pub const OSERR: i32 = 71;
    pub const UNAVAILABLE: i32 = 69;
    pub const SOFTWARE: i32 = 70;
}

/// Command-line flags every daemon takes.
#[derive(Debug, Parser)]
pub struct DaemonArgs {
    /// The cluster file (else $PADDOCK_CONFIG, else /etc/paddock/paddock.toml).
    #[arg(long, short = 'c')]
    pub config: Option<PathBuf>,
    /// Log JSON lines instead of human ones.
    #[arg(long)]
    pub log_json: bool,
    /// Also log to the local syslog (/dev/log).
    #[arg(long)]
    pub syslog: bool,
}

/// Which daemon this is.
#[derive(Debug, Clone)]
pub struct Spec {
    pub name: &'static str,
    pub version: &'static str,
    /// Bind `[daemons.NAME].pull`.
    pub pull: bool,
    /// Bind `[daemons.NAME].pub`.
    pub publish: bool,
    /// The daemon's own config checks, run before any socket is bound (exit 78).
    pub check: fn(&ClusterConfig) -> Result<(), paddock_config::ConfigError>,
    /// Named PUSH targets (name, endpoint) from the config, e.g. a log sink.
    pub push_to: fn(&ClusterConfig) -> Vec<(String, String)>,
    /// The api only: the secret its user keys are derived from. With it, the rpc
    /// socket also verifies user keys and admits the CURVE keys the daemon puts in
    /// `Ctx::user_clients`; a user key reaches only `Routes::on_user` handlers.
    pub user_keys: Option<UserKeysFn>,
}

/// Reads a daemon's user-key secret from the cluster file (see `Spec::user_keys`).
pub type UserKeysFn = fn(&ClusterConfig) -> Result<UserKeys, paddock_config::ConfigError>;

/// A `Spec::push_to` for daemons that push nothing but beats.
pub fn no_push_to(_: &ClusterConfig) -> Vec<(String, String)> {
    Vec::new()
}

/// A `Spec::check` for daemons with nothing of their own to check.
pub fn no_check(_: &ClusterConfig) -> Result<(), paddock_config::ConfigError> {
    Ok(())
}

pub type HandlerFuture = Pin<Box<dyn Future<Output = Result<Value, WireError>>>>;
type HandlerFn = Rc<dyn Fn(Envelope, Caller) -> HandlerFuture>;

/// Who signed a request: its key id, and whether that is a user key (the api's)
/// rather than a cluster key.
#[derive(Debug, Clone)]
pub struct Caller {
    pub key_id: String,
    pub user: bool,
}

#[derive(Clone)]
struct Handler {
    f: HandlerFn,
    /// Whether a user key may send this kind.
    users: bool,
}
type PullHandler = Rc<dyn Fn(Envelope)>;

/// The kinds a daemon answers, beyond the built-in `ping` and `stats`.
#[derive(Default, Clone)]
pub struct Routes {
    handlers: HashMap<String, Handler>,
    pull: Option<PullHandler>,
}

impl Routes {
    pub fn new() -> Routes {
        Routes::default()
    }

    /// Answers `kind` with `f`; its `Ok` value gets `ok: true` added. Only cluster
    /// keys reach it: a user key gets `forbidden`.
    pub fn on<F, Fut>(mut self, kind: &str, f: F) -> Routes
    where
        F: Fn(Envelope) -> Fut + 'static,
        Fut: Future<Output = Result<Value, WireError>> + 'static,
    {
        self.handlers.insert(
            kind.to_string(),
            Handler {
                f: Rc::new(move |e, _| Box::pin(f(e)) as HandlerFuture),
                users: false,
            },
        );
        self
    }

    /// Answers `kind` with `f`, which is told who signed; user keys reach it too
    /// (the api's kinds), so `f` must authorize them itself.
    pub fn on_user<F, Fut>(mut self, kind: &str, f: F) -> Routes
    where
        F: Fn(Envelope, Caller) -> Fut + 'static,
        Fut: Future<Output = Result<Value, WireError>> + 'static,
    {
        self.handlers.insert(
            kind.to_string(),
            Handler {
                f: Rc::new(move |e, c| Box::pin(f(e, c)) as HandlerFuture),
                users: true,
            },
        );
        self
    }

    /// Answers each of `kinds` by sending the request to an actor as `wrap(envelope)`.
    pub fn forward<A, M>(
        mut self,
        kinds: &[&str],
        addr: actix::Addr<A>,
        wrap: fn(Envelope) -> M,
    ) -> Routes
    where
        A: actix::Actor + actix::Handler<M>,
        A::Context: actix::dev::ToEnvelope<A, M>,
        M: actix::Message<Result = Result<Value, WireError>> + Send + 'static,
    {
        for kind in kinds {
            let addr = addr.clone();
            self = self.on(kind, move |env| {
                let addr = addr.clone();
                async move {
                    addr.send(wrap(env))
                        .await
                        .map_err(|e| WireError::internal(format!("actor mailbox closed: {e}")))?
                }
            });
        }
        self
    }

    /// Takes every authentic message from the PULL socket.
    pub fn on_pull(mut self, f: impl Fn(Envelope) + 'static) -> Routes {
        self.pull = Some(Rc::new(f));
        self
    }
}

/// Whether a loop may restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoopKind {
    /// Errors are logged, counted, and the loop restarts with backoff.
    Resilient,
    /// The loop ending at all (other than at shutdown) ends the process non-zero.
    Critical,
}

/// What a daemon's setup and loops get.
#[derive(Clone)]
pub struct Ctx {
    pub spec: Spec,
    /// This process's random start id (PROTOCOL.md: `incarnation`).
    pub incarnation: String,
    pub started: Instant,
    config: watch::Receiver<Arc<ClusterConfig>>,
    server: ServerHandle,
    calls: calls::Calls,
    shutdown: watch::Receiver<bool>,
    stop: Arc<tokio::sync::Notify>,
    loop_restarts: Arc<Mutex<BTreeMap<String, u64>>>,
    user_clients: Option<paddock_wire::curve::Admitted>,
}

impl Ctx {
    /// The CURVE client keys of users that the rpc socket admits beside the
    /// cluster's (only for a daemon with `Spec::user_keys`, under CURVE); the
    /// daemon keeps it current.
    pub fn user_clients(&self) -> Option<&paddock_wire::curve::Admitted> {
        self.user_clients.as_ref()
    }

    /// The current cluster file (replaced on SIGHUP).
    pub fn config(&self) -> Arc<ClusterConfig> {
        self.config.borrow().clone()
    }

    /// A receiver that sees each reload.
    pub fn config_updates(&self) -> watch::Receiver<Arc<ClusterConfig>> {
        self.config.clone()
    }

    pub fn server(&self) -> &ServerHandle {
        &self.server
    }

    /// The outgoing client: calls to other daemons (by endpoint, or found through the
    /// heartbeat registry) and subscriptions to their events, all carried by this
    /// daemon's I/O thread. Daemons never open their own sockets.
    pub fn calls(&self) -> &calls::Calls {
        &self.calls
    }

    /// `role@node`.
    pub fn identity(&self) -> String {
        format!("{}@{}", self.spec.name, self.config().node())
    }

    /// Begins the same drain a SIGTERM does (the balancer's handoff to its
    /// successor uses it): the rpc sockets close and the pid lock is released when
    /// the drain ends.
    pub fn stop(&self) {
        self.stop.notify_one();
    }

    pub fn is_shutting_down(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// Resolves when shutdown starts.
    pub async fn shutdown_started(&self) {
        let mut rx = self.shutdown.clone();
        while !*rx.borrow() {
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// Runs a named main loop (ep.io's BaseDaemon loops) on the actix arbiter.
    pub fn spawn_loop<F, Fut>(&self, name: &'static str, kind: LoopKind, mut f: F)
    where
        F: FnMut() -> Fut + 'static,
        Fut: Future<Output = anyhow::Result<()>> + 'static,
    {
        let ctx = self.clone();
        actix_rt::spawn(async move {
            let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(30));
            loop {
                let began = Instant::now();
                let result = tokio::select! {
                    r = f() => Some(r),
                    _ = ctx.shutdown_started() => None,
                };
                let Some(result) = result else { return };
                if ctx.is_shutting_down() {
                    return;
                }
                match kind {
                    LoopKind::Critical => {
                        match result {
                            Ok(()) => {
                                tracing::error!(r#loop = name, "critical loop ended; exiting")
                            }
                            Err(e) => tracing::error!(
                                r#loop = name,
                                "critical loop failed: {e:#}; exiting"
                            ),
                        }
                        std::process::exit(1);
                    }
                    LoopKind::Resilient => {
                        if began.elapsed() > Duration::from_secs(60) {
                            backoff.reset();
                        }
                        *ctx.loop_restarts
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .entry(name.to_string())
                            .or_insert(0) += 1;
                        let delay = backoff.next_delay();
                        match result {
                            Ok(()) => {
                                tracing::warn!(r#loop = name, "loop ended; restarting in {delay:?}")
                            }
                            Err(e) => tracing::warn!(
                                r#loop = name,
                                "loop failed: {e:#}; restarting in {delay:?}"
                            ),
                        }
                        tokio::select! {
                            _ = tokio::time::sleep(delay) => {}
                            _ = ctx.shutdown_started() => return,
                        }
                    }
                }
            }
        });
    }
}

/// Runs a daemon to completion and exits the process. `setup` registers the daemon's
/// actors, loops and routes; it runs inside the actix System after sockets are bound.
/// An error and its causes on one line, each said once.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Marks every fd above stdio close-on-exec. Called first thing in a daemon (and
/// the CLI), when every such fd is one the process inherited, not one it opened.
pub fn cloexec_inherited() {
    // SAFETY: close_range with CLOSE_RANGE_CLOEXEC only sets flags; on a kernel
    // without it (< 5.11) each possible fd is marked with fcntl.
    unsafe {
        if libc::syscall(
            libc::SYS_close_range,
            3u32,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        ) != 0
        {
            for fd in 3..1024 {
                libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
            }
        }
    }
}

/// What a daemon may do around [`run`] (the balancer starts its listeners before
/// the pid lock, and drains its connections after the lock is released).
#[derive(Default)]
pub struct Hooks {
    /// Runs after the config is valid and before the pid lock; an error exits 71.
    pub before_run: Option<fn(&ClusterConfig) -> anyhow::Result<()>>,
    /// Runs after `run` returned (rpc sockets closed, pid lock released) with its
    /// exit code; returns the process's.
    pub after_run: Option<fn(i32) -> i32>,
}

/// Makes `cmd`'s child start with `fds` as its fds 3, 4, … (the systemd
/// `LISTEN_FDS` layout), inherited across exec; the caller sets `LISTEN_FDS` and
/// `LISTEN_FDNAMES`. At most 8.
pub fn pass_fds(cmd: &mut std::process::Command, fds: &[std::os::fd::RawFd]) {
    use std::os::unix::process::CommandExt;
    let mut sources = [0 as std::os::fd::RawFd; 8];
    let n = fds.len().min(8);
    sources[..n].copy_from_slice(&fds[..n]);
    // SAFETY: between fork and exec only fcntl, dup2 and close run, all
    // async-signal-safe, on a copied array: no allocation, no lock.
    unsafe {
        cmd.pre_exec(move || {
            // Every source goes above the target range first, so no dup2 below
            // overwrites a source not yet moved.
            let mut high = [0 as std::os::fd::RawFd; 8];
            for i in 0..n {
                high[i] = libc::fcntl(sources[i], libc::F_DUPFD, 64);
                if high[i] < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            for (i, h) in high.iter().enumerate().take(n) {
                // dup2 to another number clears close-on-exec on the copy.
                if libc::dup2(*h, 3 + i as std::os::fd::RawFd) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::close(*h);
            }
            Ok(())
        });
    }
}

pub fn main<S, Fut>(spec: Spec, setup: S) -> !
where
    S: FnOnce(Ctx) -> Fut + 'static,
    Fut: Future<Output = anyhow::Result<Routes>> + 'static,
{
    main_with(spec, setup, Hooks::default())
}

/// [`main`] with [`Hooks`].
pub fn main_with<S, Fut>(spec: Spec, setup: S, hooks: Hooks) -> !
where
    S: FnOnce(Ctx) -> Fut + 'static,
    Fut: Future<Output = anyhow::Result<Routes>> + 'static,
{
    // Before anything of ours is open: whatever the parent left open (a
    // supervisor's pipes, a shell's redirections) reaches none of our children.
    cloexec_inherited();
    let args = DaemonArgs::parse();
    let path = ClusterConfig::locate(args.config.as_deref());
    let loaded = ClusterConfig::load(&path);
    let mut opts = log::LogOptions {
        json: args.log_json,
        syslog: args.syslog,
        syslog_socket: None,
        level: None,
    };
    if let Ok(c) = &loaded {
        opts.json |= c.file.log.json;
        opts.syslog |= c.file.log.syslog;
        opts.level = c.file.log.level.clone();
        opts.syslog_socket = c.file.log.syslog_socket.clone();
    }
    log::init(&format!("paddock-{}", spec.name), &opts);
    install_panic_hook();
    let config = match loaded {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("{e}");
            std::process::exit(exit::CONFIG);
        }
    };
    if let Some(before) = hooks.before_run {
        if let Err(e) = before(&config) {
            tracing::error!("{e:#}");
            std::process::exit(exit::OSERR);
        }
    }
    let code = run(spec, config, setup);
    let code = match hooks.after_run {
        Some(after) => after(code),
        None => code,
    };
    std::process::exit(code)
}

/// `PADDOCK_TAKEOVER_WAIT_MS`: set by a process handing over to this one (the
/// balancer's upgrade). The pid lock and the rpc endpoints are still the old
/// process's when this one starts, so both are retried for that long.
fn takeover_wait() -> Option<Duration> {
    std::env::var("PADDOCK_TAKEOVER_WAIT_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map(Duration::from_millis)
}

/// A panic anywhere (an actor's handler included, which actix would otherwise swallow
/// into a closed mailbox) ends the process, so the supervisor restarts it whole.
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current();
        let bt = std::backtrace::Backtrace::force_capture();
        tracing::error!(
            thread = thread.name().unwrap_or("?"),
            "panic: {info}; exiting so the supervisor restarts this daemon\n{bt}"
        );
        eprintln!("panic: {info}");
        std::process::exit(exit::SOFTWARE);
    }));
}

/// Why the pid lock could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum PidfileError {
    #[error("cannot create the state dir {}", dir.display())]
    CreateDir {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot open {}", path.display())]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("another paddock-{name} holds {} (one per node and state dir)", path.display())]
    Held { name: String, path: PathBuf },
    #[error("cannot write the pid to {}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Whether another process holds `<state_dir>/<name>.pid` (a daemon that must not
/// start serving anything when it would then fail its pid lock asks first; the
/// lock itself is still taken by [`run`]).
pub fn pid_lock_held(dir: &std::path::Path, name: &str) -> bool {
    matches!(lock_pidfile(dir, name), Err(PidfileError::Held { .. }))
}

/// Holds an exclusive flock on `<state_dir>/<name>.pid` for the process's life.
fn lock_pidfile(dir: &std::path::Path, name: &str) -> Result<std::fs::File, PidfileError> {
    use std::io::Write;
    use std::os::unix::fs::DirBuilderExt;
    use std::os::unix::io::AsRawFd;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| PidfileError::CreateDir {
            dir: dir.to_path_buf(),
            source,
        })?;
    let path = dir.join(format!("{name}.pid"));
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        // A symlink planted at the path is refused, never followed and truncated.
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&path)
        .map_err(|source| PidfileError::Open {
            path: path.clone(),
            source,
        })?;
    // SAFETY: flock on a file descriptor we own; no memory is involved.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        return Err(PidfileError::Held {
            name: name.to_string(),
            path,
        });
    }
    let write = |source| PidfileError::Write {
        path: path.clone(),
        source,
    };
    f.set_len(0).map_err(write)?;
    writeln!(f, "{}", std::process::id()).map_err(write)?;
    Ok(f)
}

/// The body of `main` after config is valid; returns the exit code.
pub fn run<S, Fut>(spec: Spec, config: ClusterConfig, setup: S) -> i32
where
    S: FnOnce(Ctx) -> Fut + 'static,
    Fut: Future<Output = anyhow::Result<Routes>> + 'static,
{
    let section = match config
        .daemon(spec.name)
        .and_then(|s| (spec.check)(&config).map(|()| s))
    {
        Ok(s) => s.clone(),
        Err(e) => {
            tracing::error!("{e}");
            return exit::CONFIG;
        }
    };
    let endpoint = |want: bool, name: &str| -> Result<Option<String>, i32> {
        if !want {
            return Ok(None);
        }
        config
            .daemon_endpoint(spec.name, name)
            .map(Some)
            .map_err(|e| {
                tracing::error!("{e}");
                exit::CONFIG
            })
    };
    let (pull, publish) = match (endpoint(spec.pull, "pull"), endpoint(spec.publish, "pub")) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(c), _) | (_, Err(c)) => return c,
    };
    let takeover = takeover_wait().map(|w| Instant::now() + w);
    let locked = loop {
        match lock_pidfile(&config.state_dir, spec.name) {
            Err(PidfileError::Held { .. }) if takeover.is_some_and(|t| Instant::now() < t) => {
                std::thread::sleep(Duration::from_millis(20));
            }
            other => break other,
        }
    };
    let _pidfile = match locked {
        Ok(f) => f,
        Err(e) => {
            // The whole chain, once: what failed and the OS's reason.
            tracing::error!("{:#}", anyhow::Error::new(e));
            return exit::UNAVAILABLE;
        }
    };
    let node_keys = match config.node_keys() {
        Ok(k) => k,
        Err(e) => {
            tracing::error!("{e}");
            return exit::CONFIG;
        }
    };
    match &node_keys {
        Some(_) => {
            if let Err(e) = paddock_wire::curve::require() {
                tracing::error!("{e}");
                return exit::CONFIG;
            }
        }
        None => tracing::warn!(
            "{} has no [curve] table: every socket of this daemon runs in PLAINTEXT and admits any peer (docs/OPERATOR.md, \"Transport encryption\")",
            config.path.display()
        ),
    }
    let admitted = node_keys.as_ref().map(|k| k.server.admitted.clone());
    let keyring = match with_user_keys(&spec, &config) {
        Ok(k) => k,
        Err(e) => {
            tracing::error!("{e}");
            return exit::CONFIG;
        }
    };
    let keys = SharedKeyring::new(keyring);
    let user_clients = match (&spec.user_keys, &node_keys) {
        (Some(_), Some(_)) => Some(paddock_wire::curve::Admitted::pending()),
        _ => None,
    };
    let identity = format!("{}@{}", spec.name, config.node());
    let started = loop {
        let r = paddock_wire::server::start(
            ServerSpec {
                identity: identity.clone(),
                rpc: section.rpc.clone(),
                pull: pull.clone(),
                publish: publish.clone(),
                push: config.file.cluster.heartbeats.clone(),
                push_to: (spec.push_to)(&config),
                limits: config.limits.clone(),
                curve: node_keys.clone(),
                rpc_clients: user_clients.clone(),
                max_calls: paddock_wire::outgoing::DEFAULT_MAX_CALLS,
            },
            keys.clone(),
            4096,
        );
        match r {
            // The old process closes its sockets just before it releases the pid
            // lock; the kernel may not have let the ports go yet.
            Err(_) if takeover.is_some_and(|t| Instant::now() < t) => {
                std::thread::sleep(Duration::from_millis(20));
            }
            other => break other,
        }
    };
    let server = match started {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("{}", chain(&e));
            return exit::OSERR;
        }
    };
    let incarnation = ulid::Ulid::new().to_string().to_lowercase();
    let system = actix_rt::System::new();
    let handle = server.handle.clone();
    let code = system.block_on(async move {
        let (config_tx, config_rx) = watch::channel(Arc::new(config));
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let ctx = Ctx {
            spec: spec.clone(),
            incarnation,
            started: Instant::now(),
            config: config_rx.clone(),
            server: server.handle.clone(),
            calls: calls::Calls::new(server.handle.calls(), config_rx.clone()),
            shutdown: shutdown_rx,
            stop: Arc::new(tokio::sync::Notify::new()),
            loop_restarts: Arc::new(Mutex::new(BTreeMap::new())),
            user_clients,
        };
        let routes = match setup(ctx.clone()).await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!("{} setup failed: {e:#}", spec.name);
                return exit::SOFTWARE;
            }
        };
        let inflight = Rc::new(RefCell::new(0usize));
        actix_rt::spawn(dispatch(
            ctx.clone(),
            routes,
            server.inbound,
            inflight.clone(),
        ));
        spawn_beats(&ctx);
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
        tracing::info!(
            daemon = spec.name,
            incarnation = %ctx.incarnation,
            rpc = %section.rpc,
            "paddock-{} {} ready",
            spec.name,
            spec.version
        );
        wait_for_signals(&ctx, &config_tx, &keys, admitted.as_ref()).await;
        let _ = shutdown_tx.send(true);
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
        // Drain: let requests already taken finish, within a grace period.
        let grace = Instant::now() + Duration::from_secs(5);
        while *inflight.borrow() > 0 && Instant::now() < grace {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tracing::info!(daemon = spec.name, "stopped");
        0
    });
    handle.stop();
    let _ = server.thread.join();
    code
}

async fn wait_for_signals(
    ctx: &Ctx,
    config_tx: &watch::Sender<Arc<ClusterConfig>>,
    keys: &SharedKeyring,
    admitted: Option<&paddock_wire::curve::Admitted>,
) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        tracing::error!("cannot install signal handlers");
        std::process::exit(exit::OSERR);
    };
    loop {
        tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM: draining"); return; }
            _ = int.recv() => { tracing::info!("SIGINT: draining"); return; }
            _ = hup.recv() => reload(ctx, config_tx, keys, admitted),
            _ = ctx.stop.notified() => { tracing::info!("stop requested: draining"); return; }
        }
    }
}

/// SIGHUP: re-read the cluster file; on success swap keys, admitted CURVE client
/// keys, limits and heartbeat list. The CURVE server key and the plaintext/CURVE
/// choice are fixed for the process's life (sockets are bound with them).
fn reload(
    ctx: &Ctx,
    config_tx: &watch::Sender<Arc<ClusterConfig>>,
    keys: &SharedKeyring,
    admitted: Option<&paddock_wire::curve::Admitted>,
) {
    let old = ctx.config();
    match ClusterConfig::load(&old.path) {
        Ok(new) => {
            match (admitted, &new.curve) {
                (Some(a), Some(c)) => a.replace(c.admitted.iter().copied()),
                (None, None) => {}
                _ => tracing::warn!(
                    "SIGHUP: adding or removing [curve] takes a restart; the transport is unchanged"
                ),
            }
            if new.daemon(ctx.spec.name).map(|d| d.rpc.clone()).ok()
                != old.daemon(ctx.spec.name).map(|d| d.rpc.clone()).ok()
            {
                tracing::warn!("the rpc endpoint changed; that takes a restart");
            }
            match with_user_keys(&ctx.spec, &new) {
                Ok(k) => keys.replace(k),
                Err(e) => {
                    tracing::warn!("SIGHUP: keeping the old keys: {e}");
                }
            }
            ctx.server.set_limits(new.limits.clone());
            ctx.server
                .set_push_endpoints(new.file.cluster.heartbeats.clone());
            let ids: Vec<String> = new.keyring.key_ids().map(str::to_string).collect();
            tracing::info!(keys = ?ids, signing = new.keyring.signing_key_id(), "SIGHUP: configuration reloaded");
            let _ = config_tx.send(Arc::new(new));
        }
        Err(e) => tracing::warn!("SIGHUP: keeping the old configuration: {e}"),
    }
}

/// The config's keyring, plus the user keys of a daemon that has them.
fn with_user_keys(
    spec: &Spec,
    config: &ClusterConfig,
) -> Result<paddock_wire::Keyring, paddock_config::ConfigError> {
    let k = config.keyring.clone();
    match spec.user_keys {
        None => Ok(k),
        Some(f) => {
            let users = f(config)?;
            k.with_user_keys(users)
                .map_err(|e| paddock_config::ConfigError::Invalid {
                    path: config.path.clone(),
                    key: "keys".into(),
                    why: e.to_string(),
                })
        }
    }
}

fn spawn_beats(ctx: &Ctx) {
    let c = ctx.clone();
    ctx.spawn_loop("heartbeat-sender", LoopKind::Critical, move || {
        let c = c.clone();
        async move {
            // A PUSH to a heartbeat drops what it cannot deliver yet (ZMQ_IMMEDIATE),
            // so the first beats come in a quick burst while connections complete.
            let mut startup = [20u64, 50, 100, 200, 400].into_iter();
            loop {
                let cfg = c.config();
                let endpoints = cfg
                    .daemon(c.spec.name)
                    .map(|d| d.endpoints())
                    .unwrap_or_default();
                let interval = cfg.beat_interval;
                let beat = Beat {
                    daemon: c.spec.name.to_string(),
                    node: cfg.node().to_string(),
                    incarnation: c.incarnation.clone(),
                    endpoints,
                    interval_ms: interval.as_millis() as u64,
                };
                c.server.push(kinds::HEARTBEAT_BEAT, kinds::to_body(&beat));
                let next = startup
                    .next()
                    .map(Duration::from_millis)
                    .unwrap_or(interval)
                    .min(interval);
                tokio::time::sleep(next).await;
            }
        }
    });
}

struct InflightGuard(Rc<RefCell<usize>>);

impl Drop for InflightGuard {
    fn drop(&mut self) {
        *self.0.borrow_mut() -= 1;
    }
}

async fn dispatch(
    ctx: Ctx,
    routes: Routes,
    mut inbound: tokio::sync::mpsc::Receiver<Inbound>,
    inflight: Rc<RefCell<usize>>,
) {
    loop {
        let Some(msg) = inbound.recv().await else {
            // The I/O thread is gone (its sockets failed, or it was stopped). A daemon
            // that cannot answer must not look alive: end it, so the supervisor
            // restarts it whole.
            if !ctx.is_shutting_down() {
                tracing::error!(
                    "the ZeroMQ I/O thread stopped; exiting so the supervisor restarts this daemon"
                );
                std::process::exit(exit::SOFTWARE);
            }
            return;
        };
        match msg {
            Inbound::Pulled(env) => {
                if let Some(p) = &routes.pull {
                    p(env);
                }
            }
            Inbound::Request(req) => {
                if ctx.is_shutting_down() {
                    ctx.server.answer(
                        req,
                        Err(WireError::unavailable(
                            "the daemon is shutting down; retry shortly",
                        )),
                    );
                    continue;
                }
                let kind = req.env.kind.clone();
                if req.user && !routes.handlers.get(&kind).is_some_and(|h| h.users) {
                    // Check 7: a user key sends only the api's kinds (not even
                    // `ping` or `stats`).
                    let err = WireError::new(
                        Code::Forbidden,
                        format!(
                            "a user key may not send `{kind}` to paddock-{}; only the api's customer kinds are open to user keys",
                            ctx.spec.name
                        ),
                    );
                    ctx.server.answer(req, Err(err));
                    continue;
                }
                match kind.as_str() {
                    kinds::PING => {
                        let pong = Pong {
                            daemon: ctx.spec.name.to_string(),
                            node: ctx.config().node().to_string(),
                            incarnation: ctx.incarnation.clone(),
                            version: ctx.spec.version.to_string(),
                            uptime_ms: ctx.started.elapsed().as_millis() as u64,
                        };
                        ctx.server.answer(req, Ok(kinds::to_body(&pong)));
                    }
                    kinds::STATS => {
                        let mut s = ctx.server.stats().snapshot();
                        let loops = ctx
                            .loop_restarts
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .clone();
                        s["loop_restarts"] = json!(loops);
                        s["daemon"] = json!(ctx.spec.name);
                        ctx.server.answer(req, Ok(s));
                    }
                    _ => match routes.handlers.get(&kind) {
                        Some(h) => {
                            // Everything the handler logs carries the request's kind
                            // and sender. `from` is the sender's text (signed, but a
                            // user's to choose): Debug-quoted, so no control
                            // character reaches the log as written.
                            let span = tracing::info_span!(
                                "request",
                                kind = %kind,
                                from = ?req.env.from
                            );
                            let caller = Caller {
                                key_id: req.key_id.clone(),
                                user: req.user,
                            };
                            let fut = span
                                .in_scope(|| (h.f)(req.env.clone(), caller))
                                .instrument(span);
                            *inflight.borrow_mut() += 1;
                            let guard = InflightGuard(inflight.clone());
                            let server = ctx.server.clone();
                            actix_rt::spawn(async move {
                                let result = fut.await;
                                server.answer(req, result);
                                drop(guard);
                            });
                        }
                        None => {
                            let err = WireError::new(
                                Code::UnknownKind,
                                format!("paddock-{} does not handle `{kind}`", ctx.spec.name),
                            );
                            ctx.server.answer(req, Err(err));
                        }
                    },
                }
            }
        }
    }
}

/// Handy for handlers: a request's body as `T`, or `invalid` naming the field.
pub fn body<T: serde::de::DeserializeOwned>(env: &Envelope) -> Result<T, WireError> {
    kinds::parse_body(&env.kind, &env.body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "paddock-daemon-{name}-{}-{}",
            std::process::id(),
            ulid::Ulid::new()
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn the_pid_lock_is_held_once_and_says_who_holds_it() {
        let base = scratch("pid");
        let dir = base.join("state");
        let first = lock_pidfile(&dir, "x").expect("first lock");
        let pid = std::fs::read_to_string(dir.join("x.pid")).unwrap();
        assert_eq!(pid.trim(), std::process::id().to_string());
        let err = lock_pidfile(&dir, "x").unwrap_err();
        assert!(matches!(err, PidfileError::Held { .. }), "{err}");
        assert!(err.to_string().contains("another paddock-x holds"), "{err}");
        // Another daemon's name is another lock.
        let _other = lock_pidfile(&dir, "y").expect("another daemon's lock");
        drop(first);
        lock_pidfile(&dir, "x").expect("free again once the holder is gone");
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn a_state_dir_that_cannot_be_made_is_a_typed_error_with_its_cause() {
        let base = scratch("pid-bad");
        let file = base.join("not-a-dir");
        std::fs::write(&file, b"").unwrap();
        let err = lock_pidfile(&file.join("state"), "x").unwrap_err();
        assert!(matches!(err, PidfileError::CreateDir { .. }), "{err}");
        // Display names what failed; the OS's reason is the source, said once.
        let shown = err.to_string();
        let cause = std::error::Error::source(&err)
            .expect("a source")
            .to_string();
        assert!(shown.contains("cannot create the state dir"), "{shown}");
        assert!(!shown.contains(&cause), "{shown} repeats {cause}");
        std::fs::remove_dir_all(&base).unwrap();
    }
}
