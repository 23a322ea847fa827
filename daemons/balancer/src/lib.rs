//! paddock-balancer: the HTTP(S) front door. Requests are routed by Host to a
//! healthy backend of the app, over pooled keep-alive connections, with retries,
//! passive ejection and active health checks, draining, websockets, TLS by SNI,
//! stats and router log lines.
//!
//! Two halves. The **data plane** (`proxy`, `listen`, `pool`, `health`, `tls`) runs
//! on its own threads, one single-threaded tokio runtime each (a connection and
//! its backend connections stay on the thread that accepted it), started before
//! the daemon takes its pid
//! lock (so a successor serves its inherited listeners while its predecessor still
//! holds the lock) and drained after the lock is released. The **control plane**
//! (`control`) is an ordinary BaseDaemon: rpc kinds, the schedulers' route tables,
//! drains, router log shipping; it owns the `model` and swaps a new `table`
//! snapshot into the data plane after every change.
//!
//! Architecture invariant: the data plane never reads the model and never waits
//! on the control plane; it sees only whole table snapshots.

pub mod admin;
mod control;
pub mod health;
pub mod listen;
pub mod model;
pub mod pool;
pub mod proxy;
pub mod settings;
pub mod stats;
pub mod table;
pub mod tls;

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use paddock_config::ClusterConfig;
use paddock_daemon::{Ctx, Hooks, Routes, Spec};

pub use settings::{BalancerSection, Settings};

pub fn spec() -> Spec {
    Spec {
        name: "balancer",
        version: env!("CARGO_PKG_VERSION"),
        pull: false,
        publish: true,
        user_keys: None,
        check: |cfg| Settings::from_config(cfg).map(|_| ()),
        push_to: |cfg| {
            Settings::from_config(cfg)
                .ok()
                .and_then(|s| s.log_sink)
                .map(|e| vec![("logs".to_string(), e)])
                .unwrap_or_default()
        },
    }
}

pub fn hooks() -> Hooks {
    Hooks {
        before_run: Some(start_plane),
        after_run: Some(finish),
    }
}

/// The data plane, started once per process before the daemon runtime.
pub(crate) struct Plane {
    pub shared: Arc<proxy::Shared>,
    pub live: table::Live,
    pub resolver: Arc<tls::Resolver>,
    /// The listening sockets (dups, kept for a handoff).
    pub fds: Vec<(String, OwnedFd)>,
    pub model: model::Model,
    pub log_rx: Mutex<Option<tokio::sync::mpsc::Receiver<proxy::RouterLine>>>,
    /// What an upgrade's predecessor handed over (its pidfd).
    pub handed: listen::Handed,
}

static PLANE: OnceLock<Plane> = OnceLock::new();

pub(crate) fn plane() -> &'static Plane {
    PLANE.get().expect("the data plane starts before setup")
}

fn start_plane(cfg: &ClusterConfig) -> anyhow::Result<()> {
    // Until the daemon runtime installs its handlers, SIGUSR2 (an upgrade) and
    // SIGHUP (a reload) must not end this process: from the first accepted
    // connection on, it serves.
    // SAFETY: sets two signals' disposition to ignore; no handler code runs.
    unsafe {
        libc::signal(libc::SIGUSR2, libc::SIG_IGN);
        libc::signal(libc::SIGHUP, libc::SIG_IGN);
    }
    // What the daemon runtime would refuse later (exit 78) is refused here,
    // before this process serves and, as an upgrade's successor, says it is
    // ready: a successor that fails on an edited cluster file must fail while
    // its predecessor still serves, so the upgrade is refused and nothing is lost.
    let mut handed = listen::take_handed();
    let settings = match preflight(cfg) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("{e}");
            std::process::exit(paddock_daemon::exit::CONFIG);
        }
    };
    raise_nofile(&settings);
    pool::set_threads(settings.threads);
    pool::set_idle_ttl(settings.pool_idle_timeout);
    // A second balancer on this state dir would accept connections on the
    // supervisor's sockets for a moment and then fail its pid lock, dropping them:
    // it stops here instead. (A successor in a handoff serves before it gets the
    // lock, by design.)
    if std::env::var_os("PADDOCK_TAKEOVER_WAIT_MS").is_none()
        && paddock_daemon::pid_lock_held(&cfg.state_dir, "balancer")
    {
        tracing::error!(
            "another paddock-balancer holds {} (one per node and state dir)",
            cfg.state_dir.join("balancer.pid").display()
        );
        std::process::exit(paddock_daemon::exit::UNAVAILABLE);
    }
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&settings.dir)?;
    }
    let model = model::Model::load(&settings.dir)?;
    let live = table::Live::new();
    let resolver = Arc::new(tls::Resolver::default());
    resolver.set(&model.certs);
    let (log_tx, log_rx) = if settings.router_log || settings.log_sink.is_some() {
        let (t, r) = tokio::sync::mpsc::channel(16 * 1024);
        (Some(t), Some(r))
    } else {
        (None, None)
    };
    let shared = Arc::new(proxy::Shared {
        table: ArcSwap::from_pointee(live.build(&model, settings.pool_idle_per_backend)),
        global: stats::Global::default(),
        log: log_tx,
        shutdown: tokio::sync::watch::channel(false).0,
        settings: settings.clone(),
    });
    let mut inherited = listen::inherited()?;
    let http = listen::listener(&mut inherited, "http", settings.http)?;
    let https = settings
        .https
        .map(|a| listen::listener(&mut inherited, "https", a))
        .transpose()?;
    let admin_l = settings
        .admin
        .map(|a| listen::listener(&mut inherited, "admin", a))
        .transpose()?;
    let mut fds = Vec::new();
    for (name, l) in [
        ("http", Some(&http)),
        ("https", https.as_ref()),
        ("admin", admin_l.as_ref()),
    ] {
        if let Some(l) = l {
            fds.push((name.to_string(), l.as_fd_dup()?));
        }
    }
    let slots = Arc::new(tokio::sync::Semaphore::new(settings.max_connections));
    let acceptor = match &https {
        Some(_) => Some(tokio_rustls::TlsAcceptor::from(Arc::new(
            tls::server_config(resolver.clone())?,
        ))),
        None => None,
    };
    // One single-threaded runtime per proxy thread: a connection, its requests
    // and its backend connections stay on the thread it was handed to (no
    // cross-thread wake-ups, no work stealing on the hot path). Thread 0 also
    // accepts, handing each connection to the least busy thread.
    let mut public = vec![listen::Public {
        listener: http.try_clone()?,
        proto: proxy::Proto::Http,
        tls: None,
    }];
    if let (Some(l), Some(acc)) = (&https, &acceptor) {
        public.push(listen::Public {
            listener: l.try_clone()?,
            proto: proxy::Proto::Https,
            tls: Some(acc.clone()),
        });
    }
    let load: Arc<[std::sync::atomic::AtomicUsize]> = (0..settings.threads)
        .map(|_| std::sync::atomic::AtomicUsize::new(0))
        .collect();
    let (senders, mut receivers): (Vec<_>, Vec<_>) = (0..settings.threads)
        .map(|_| tokio::sync::mpsc::unbounded_channel())
        .unzip();
    let mut acceptor_part = Some((
        public,
        listen::Workers {
            inboxes: senders,
            load: load.clone(),
        },
    ));
    for i in (0..settings.threads).rev() {
        let inbox = receivers.pop().expect("one inbox per thread");
        let accept = if i == 0 { acceptor_part.take() } else { None };
        let (sh, slots, load) = (shared.clone(), slots.clone(), load.clone());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        std::thread::Builder::new()
            .name(format!("proxy-{i}"))
            .spawn(move || {
                pool::set_worker(i);
                rt.block_on(async move {
                    if let Some((public, workers)) = accept {
                        tokio::spawn(listen::accept_loop(sh.clone(), public, slots, workers));
                    }
                    listen::serve_loop(sh, inbox, load, i).await;
                    // Shutdown: the connections this thread serves still run
                    // until the process exits (`finish` waits for them).
                    std::future::pending::<()>().await
                })
            })?;
    }
    drop((http, https));
    // Health checks and the admin port on a thread of their own.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let sh = shared.clone();
    std::thread::Builder::new()
        .name("proxy-checks".into())
        .spawn(move || {
            rt.block_on(async move {
                if let Some(l) = admin_l {
                    tokio::spawn(admin::serve(sh.clone(), l));
                }
                health::run(sh).await;
                std::future::pending::<()>().await
            })
        })?;
    handed.signal_ready();
    let _ = PLANE.set(Plane {
        handed,
        shared,
        live,
        resolver,
        fds,
        model,
        log_rx: Mutex::new(log_rx),
    });
    Ok(())
}

fn preflight(cfg: &ClusterConfig) -> anyhow::Result<Settings> {
    cfg.daemon("balancer")?;
    let s = Settings::from_config(cfg)?;
    if cfg.node_keys()?.is_some() {
        paddock_wire::curve::require()?;
    }
    Ok(s)
}

/// Every proxied request holds two descriptors (client and backend) and the
/// pools keep idle ones: the soft RLIMIT_NOFILE (1024 under systemd's default)
/// would run out long before `max_connections`. Raise it to the hard limit and
/// say so when even that is too small.
fn raise_nofile(s: &Settings) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    if soft < hard {
        if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            tracing::warn!("cannot raise the open-file limit from {soft} to {hard}: {e}");
        }
    }
    let now = getrlimit(Resource::RLIMIT_NOFILE)
        .map(|l| l.0)
        .unwrap_or(soft);
    let need = s.max_connections as u64 * 2;
    if now < need {
        tracing::warn!(
            "the open-file limit is {now}, below the {need} that max_connections = {} needs (two descriptors per connection); raise LimitNOFILE (systemd) or ulimit -n",
            s.max_connections
        );
    }
}

trait DupFd {
    fn as_fd_dup(&self) -> std::io::Result<OwnedFd>;
}

impl DupFd for std::net::TcpListener {
    fn as_fd_dup(&self) -> std::io::Result<OwnedFd> {
        std::os::fd::AsFd::as_fd(self).try_clone_to_owned()
    }
}

/// After the daemon runtime ended (rpc closed, pid lock released): stop accepting,
/// let every connection finish its request in flight, then exit.
fn finish(code: i32) -> i32 {
    let Some(p) = PLANE.get() else { return code };
    p.shared.shutdown.send_replace(true);
    let deadline = Instant::now() + p.shared.settings.handoff_drain;
    while p.shared.global.connections_active.load(Relaxed) > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let left = p.shared.global.connections_active.load(Relaxed);
    if left > 0 {
        tracing::warn!("{left} connection(s) still open at the drain deadline; closing them");
    } else {
        tracing::info!("every client connection finished");
    }
    code
}

pub async fn setup(ctx: Ctx) -> anyhow::Result<Routes> {
    let p = plane();
    let raw: Vec<(String, i32)> = p
        .fds
        .iter()
        .map(|(n, f)| (n.clone(), f.as_raw_fd()))
        .collect();
    control::setup(ctx, raw).await
}
