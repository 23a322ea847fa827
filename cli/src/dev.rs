//! `paddock dev`: a whole local cluster under one directory — PostgreSQL made with
//! the installed server binaries, a cluster file, and every daemon supervised.
//!
//! Layout of DIR:
//!   paddock.toml   the cluster file (0600)
//!   pg/            PostgreSQL data, socket and password
//!   state/         daemons' state dir: NAME.pid, each daemon's flock'd pid file
//!   logs/NAME.log  each process's output; supervisor.log for the detached supervisor
//!   dev.lock       the supervisor's flock'd pid file; dev.ready once every daemon
//!                  answered ping
//!
//! `dev down` signals only processes it can prove are this cluster's (pids are
//! recycled): a pid file's holder while it holds the flock (supervisor, daemons),
//! a `paddock-shim` serving its own instance dir, the postmaster of `pg/data`. A
//! pid file failing that is stale and removed, never signalled.

use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::Subcommand;
use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;
use paddock_config::{ClusterConfig, ClusterFile};
use paddock_harness::pidfile::{self, Proc};
use paddock_harness::{self as harness, PgCluster, PgOptions, DAEMONS};

#[derive(Debug, Subcommand)]
pub enum DevCmd {
    /// Start PostgreSQL and every daemon under DIR, supervised.
    Up {
        #[arg(long, default_value = ".paddock-dev")]
        dir: PathBuf,
        /// Return once everything is healthy, leaving the supervisor running.
        #[arg(long)]
        detach: bool,
        /// Blobstores to run: 1, or 2 for a pair that replicates every slug.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=2))]
        blobstores: u8,
        /// Runners to run, each as a node of its own (`dev`, `dev-2`, …) with
        /// its own state dir and app port range: 1 to 8.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=8))]
        runners: u8,
    },
    /// Stop everything `dev up` started under DIR, PostgreSQL included.
    Down {
        #[arg(long, default_value = ".paddock-dev")]
        dir: PathBuf,
    },
    /// Show the daemons' logs (all, or one daemon's).
    Logs {
        #[arg(long, default_value = ".paddock-dev")]
        dir: PathBuf,
        daemon: Option<String>,
        /// Keep printing new lines.
        #[arg(short, long)]
        follow: bool,
        /// Lines of history to show per log.
        #[arg(short = 'n', long, default_value_t = 50)]
        lines: usize,
    },
    /// (internal) the supervisor process behind `dev up --detach`.
    #[command(hide = true)]
    Supervise {
        #[arg(long)]
        dir: PathBuf,
    },
}

pub fn run(cmd: DevCmd) -> Result<()> {
    match cmd {
        DevCmd::Up {
            dir,
            detach,
            blobstores,
            runners,
        } => up(&absolute(&dir)?, detach, blobstores, runners),
        DevCmd::Down { dir } => down(&absolute(&dir)?),
        DevCmd::Logs {
            dir,
            daemon,
            follow,
            lines,
        } => logs(&absolute(&dir)?, daemon.as_deref(), follow, lines),
        DevCmd::Supervise { dir } => supervise(&absolute(&dir)?, None),
    }
}

fn absolute(dir: &Path) -> Result<PathBuf> {
    Ok(if dir.is_absolute() {
        dir.to_path_buf()
    } else {
        std::env::current_dir()?.join(dir)
    })
}

/// The supervisor running for DIR: the holder of `dev.lock`.
fn running_supervisor(dir: &Path) -> Result<Option<Proc>> {
    let path = dir.join("dev.lock");
    pidfile::lock_holder(&path).with_context(|| format!("cannot check {}", path.display()))
}

/// The daemons' state dir: always DIR/state, whatever a cluster file in DIR says
/// (a copied production file must never make `dev down` stop production).
fn state_dir(dir: &Path) -> PathBuf {
    dir.join("state")
}

/// The postmaster serving DIR/pg/data, from PostgreSQL's own postmaster.pid, when
/// its command line is `postgres -D DIR/pg/data …` (PostgreSQL holds no flock).
fn running_postmaster(dir: &Path) -> Option<Proc> {
    let data = dir.join("pg/data");
    pidfile::matching(&data.join("postmaster.pid"), |argv| {
        argv.first()
            .is_some_and(|a| Path::new(a).file_name().is_some_and(|n| n == "postgres"))
            && argv
                .windows(2)
                .any(|w| w[0] == "-D" && Path::new(&w[1]) == data)
    })
}

fn prepare(dir: &Path) -> Result<()> {
    for d in [dir.to_path_buf(), dir.join("logs"), dir.join("state")] {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&d)
            .with_context(|| format!("cannot create {}", d.display()))?;
        // An existing directory is used only when it is ours and nobody else can
        // write to it: another user's (say, a `.paddock-dev` planted under /tmp)
        // could hold symlinks and pid files meant for us to follow and trust.
        use std::os::unix::fs::MetadataExt;
        let m = fs::symlink_metadata(&d).with_context(|| format!("cannot read {}", d.display()))?;
        if !m.is_dir() || m.uid() != nix::unistd::geteuid().as_raw() || m.mode() & 0o022 != 0 {
            bail!(
                "{} must be a directory owned by you that nobody else can write to (it is mode {:o}, owner uid {}); pick another --dir or fix it",
                d.display(),
                m.mode() & 0o7777,
                m.uid()
            );
        }
    }
    Ok(())
}

fn up(dir: &Path, detach: bool, blobstores: u8, runners: u8) -> Result<()> {
    if let Some(p) = running_supervisor(dir)? {
        bail!(
            "a dev cluster is already running in {} (supervisor pid {}); run `paddock dev down --dir {}` first",
            dir.display(),
            p.pid(),
            dir.display()
        );
    }
    prepare(dir)?;
    let _ = fs::remove_file(dir.join("dev.ready"));
    // Read by the supervisor (which `--detach` starts as another process).
    fs::write(dir.join("blobstores"), blobstores.to_string())?;
    fs::write(dir.join("runners"), runners.to_string())?;
    if !detach {
        return supervise(dir, Some(print_summary));
    }
    let log = dir.join("logs/supervisor.log");
    let logf = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)?;
    let mut child = Command::new(std::env::current_exe()?)
        .args(["dev", "supervise", "--dir"])
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(logf.try_clone()?)
        .stderr(logf)
        .process_group(0)
        .spawn()
        .context("starting the dev supervisor")?;
    eprintln!("starting a dev cluster in {} …", dir.display());
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if dir.join("dev.ready").exists() {
            print_summary(dir);
            return Ok(());
        }
        if let Some(st) = child.try_wait()? {
            bail!(
                "the dev supervisor exited ({st}) before the cluster was ready:\n{}",
                tail(&log, 20)
            );
        }
        if Instant::now() > deadline {
            let _ = signal::kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
            bail!(
                "the dev cluster was not ready within 120 s:\n{}",
                tail(&log, 20)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn print_summary(dir: &Path) {
    let cfg_path = dir.join("paddock.toml");
    let Ok(cfg) = ClusterConfig::load(&cfg_path) else {
        println!("dev cluster up in {}", dir.display());
        return;
    };
    println!("Paddock dev cluster is up in {}", dir.display());
    println!("  node       {}", cfg.node());
    if let Some(db) = &cfg.file.database {
        let safe = db
            .url
            .split_whitespace()
            .filter(|kv| !kv.starts_with("password="))
            .collect::<Vec<_>>()
            .join(" ");
        println!("  postgres   {safe}");
    }
    for (name, d) in &cfg.file.daemons {
        let eps: Vec<String> = d
            .endpoints()
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        println!("  {name:<10} {}", eps.join(" "));
    }
    println!("  logs       {}", dir.join("logs").display());
    if let Some(http) = cfg
        .file
        .daemons
        .get("balancer")
        .and_then(|b| b.endpoint("http"))
    {
        let url = http.replace("tcp://", "http://");
        println!("  apps at    {url}/ (route with `paddock routes set APP DOMAIN`; curl -H 'Host: DOMAIN' {url}/)");
    }
    if let Some(ssh) = cfg
        .file
        .daemons
        .get("gitserver")
        .and_then(|g| g.other.get("ssh"))
        .and_then(|v| v.as_str())
    {
        println!("  git push   {ssh}/APP.git (after `paddock apps create APP`: git remote add paddock {ssh}/APP.git)");
    }
    println!();
    println!("export PADDOCK_CONFIG={}", cfg_path.display());
    println!("paddock status");
}

/// The cluster file for DIR: the existing one (its key and ports kept), or a new one.
fn cluster_file(dir: &Path, pg: &PgCluster) -> Result<ClusterFile> {
    let path = dir.join("paddock.toml");
    if path.exists() {
        let cfg = ClusterConfig::load(&path)?;
        let mut f = cfg.file;
        f.database = Some(paddock_config::DatabaseSection {
            url: pg.url("paddock"),
        });
        // A DIR made before a daemon existed gets that daemon's table (free ports).
        let (fresh, _) =
            harness::node_file("dev", &dir.join("state"), ("k", "00"), None, &[], None)?;
        for (name, mut sec) in fresh.daemons {
            if name == "api" {
                // Not the placeholder key's derivation: a secret of its own.
                sec.other.insert(
                    "user_key_secret".into(),
                    toml::Value::String(paddock_wire::keyring::generate_secret_hex()),
                );
            }
            f.daemons.entry(name).or_insert(sec);
        }
        if f.cluster.apps_domain.is_none() {
            f.cluster.apps_domain = Some("localhost".into());
        }
        dev_tuning(dir, &mut f)?;
        return Ok(f);
    }
    let secret = paddock_wire::keyring::generate_secret_hex();
    let curve = harness::ClusterCurve::generate()?;
    let (f, _) = harness::node_file(
        "dev",
        &dir.join("state"),
        ("cluster-1", &secret),
        Some(&curve),
        &[],
        Some(pg.url("paddock")),
    )?;
    let mut f = f;
    dev_tuning(dir, &mut f)?;
    Ok(f)
}

/// How many runners `dev up` runs (`--runners`, kept in DIR/runners).
fn runner_count(dir: &Path) -> u16 {
    fs::read_to_string(dir.join("runners"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1u16)
        .clamp(1, 8)
}

/// Runner `k` of `n`'s share of the app ports 20000–29999 (disjoint).
fn runner_ports(k: u16, n: u16) -> (u16, u16) {
    let width = 10_000 / n;
    let lo = 20_000 + (k - 1) * width;
    (lo, lo + width - 1)
}

/// What a local cluster wants that production does not: a scheduler with
/// deadlines short enough that a deploy takes seconds, and the first runner's
/// share of the app ports when `--runners` runs more.
fn dev_tuning(dir: &Path, f: &mut ClusterFile) -> Result<()> {
    if !f.daemons.contains_key("scheduler") {
        let mut s = paddock_config::DaemonSection {
            rpc: harness::tcp(harness::free_port()?),
            ..Default::default()
        };
        s.other.insert(
            "pub".into(),
            toml::Value::String(harness::tcp(harness::free_port()?)),
        );
        for (k, v) in [
            ("min_healthy_ms", 2_000),
            ("healthy_deadline_ms", 20_000),
            ("progress_deadline_ms", 120_000),
            ("watch_window_ms", 5_000),
            ("drain_ms", 2_000),
            ("node_settle_ms", 2_000),
            ("resync_ms", 2_000),
            ("lease_ttl_ms", 5_000),
        ] {
            s.other.insert(k.into(), toml::Value::Integer(v));
        }
        f.daemons.insert("scheduler".into(), s);
    }
    let (lo, hi) = runner_ports(1, runner_count(dir));
    if let Some(r) = f.daemons.get_mut("runner") {
        r.other
            .insert("port_min".into(), toml::Value::Integer(lo.into()));
        r.other
            .insert("port_max".into(), toml::Value::Integer(hi.into()));
    }
    Ok(())
}

/// With `dev up --runners N`: runners 2…N, each a node of its own (`dev-K`) with
/// its own state dir (`state/runner-K`), endpoints (kept in `runner-K.ports`),
/// apps dir and share of the app ports.
fn extra_runners(dir: &Path) -> Result<Vec<Supervised>> {
    let n = runner_count(dir);
    let mut out = Vec::new();
    for k in 2..=n {
        let port_file = dir.join(format!("runner-{k}.ports"));
        let kept: Vec<u16> = fs::read_to_string(&port_file)
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .filter(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
            .collect();
        let (rpc, publish) = match kept[..] {
            [a, b] => (a, b),
            _ => (harness::free_port()?, harness::free_port()?),
        };
        fs::write(&port_file, format!("{rpc} {publish}"))?;
        let state = state_dir(dir).join(format!("runner-{k}"));
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&state)?;
        harness::allow_traverse(&state)?;
        let (lo, hi) = runner_ports(k, n);
        out.push(Supervised {
            name: format!("runner-{k}"),
            env: vec![
                ("PADDOCK__NODE".into(), format!("dev-{k}")),
                ("PADDOCK__STATE_DIR".into(), state.display().to_string()),
                ("PADDOCK__DAEMONS__RUNNER__RPC".into(), harness::tcp(rpc)),
                (
                    "PADDOCK__DAEMONS__RUNNER__PUB".into(),
                    harness::tcp(publish),
                ),
                (
                    "PADDOCK__DAEMONS__RUNNER__APPS_DIR".into(),
                    dir.join(format!("apps-{k}")).display().to_string(),
                ),
                ("PADDOCK__DAEMONS__RUNNER__PORT_MIN".into(), lo.to_string()),
                ("PADDOCK__DAEMONS__RUNNER__PORT_MAX".into(), hi.to_string()),
            ],
            child: None,
            adopted: None,
            restarts: 0,
            started: Instant::now(),
            next_start: Some(Instant::now()),
        });
    }
    Ok(out)
}

/// `state/runner-K` of every runner beyond the first that ever ran here.
fn extra_runner_states(state: &Path) -> Vec<PathBuf> {
    fs::read_dir(state)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_prefix("runner-"))
                .is_some_and(|k| k.parse::<u8>().is_ok())
        })
        .map(|e| e.path())
        .collect()
}

/// The app instances' shims of every runner here.
fn stop_every_shim(state: &Path) -> usize {
    std::iter::once(state.to_path_buf())
        .chain(extra_runner_states(state))
        .map(|d| harness::stop_shims(&d))
        .sum()
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop(_: i32) {
    STOP.store(true, Ordering::SeqCst);
}

struct Supervised {
    name: String,
    /// The second of a blobstore pair: the blobstore binary with a state dir and
    /// rpc endpoint of its own (environment overrides of the one cluster file).
    env: Vec<(String, String)>,
    child: Option<Child>,
    /// A balancer's successor after an upgrade: not started by us, but ours to
    /// watch (this process is a subreaper, so it is reparented here).
    adopted: Option<Proc>,
    restarts: u32,
    started: Instant,
    next_start: Option<Instant>,
}

/// Ready means usable: every daemon is alive in the registry too (daemons find
/// each other there: a push right after `dev up` needs the deployer listed).
fn all_alive(cfg: &ClusterConfig, expected: usize) -> bool {
    let Ok(list) = crate::cluster::registry(cfg, Duration::from_millis(500)) else {
        return false;
    };
    let alive = list
        .services
        .iter()
        .filter(|s| s.state == paddock_wire::kinds::ServiceState::Alive)
        .count();
    alive >= expected
        && DAEMONS.iter().all(|d| {
            list.services
                .iter()
                .any(|s| s.daemon == *d && s.state == paddock_wire::kinds::ServiceState::Alive)
        })
}

fn cfg_rpc(cfg_path: &Path, daemon: &str) -> Option<String> {
    let cfg = ClusterConfig::load(cfg_path).ok()?;
    cfg.file.daemons.get(daemon).map(|s| s.rpc.clone())
}

/// With `dev up --blobstores 2`: the pair's second member, `blobstore-2`, with its
/// own node name (`dev-b`), state dir (`state/blobstore-2`) and rpc port (kept in
/// `blobstore-2.port`).
/// It finds its peer, as in production, through the heartbeat registry.
fn second_blobstore(dir: &Path) -> Result<Option<Supervised>> {
    let n: u8 = fs::read_to_string(dir.join("blobstores"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1);
    if n < 2 {
        return Ok(None);
    }
    let port_file = dir.join("blobstore-2.port");
    let port = fs::read_to_string(&port_file)
        .ok()
        .and_then(|p| p.trim().parse::<u16>().ok())
        .filter(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
        .map(Ok)
        .unwrap_or_else(harness::free_port)?;
    fs::write(&port_file, port.to_string())?;
    let state = state_dir(dir).join("blobstore-2");
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&state)?;
    Ok(Some(Supervised {
        name: "blobstore-2".into(),
        // A node name of its own too: the registry takes a second incarnation of
        // one daemon on one node for a restart of the first.
        env: vec![
            ("PADDOCK__NODE".into(), "dev-b".into()),
            ("PADDOCK__STATE_DIR".into(), state.display().to_string()),
            (
                "PADDOCK__DAEMONS__BLOBSTORE__RPC".into(),
                harness::tcp(port),
            ),
        ],
        child: None,
        adopted: None,
        restarts: 0,
        started: Instant::now(),
        next_start: Some(Instant::now()),
    }))
}

/// Runs the cluster in this process until SIGTERM/SIGINT, restarting what dies.
fn supervise(dir: &Path, on_ready: Option<fn(&Path)>) -> Result<()> {
    prepare(dir)?;
    // Held (close-on-exec, so no child inherits it) until this process ends: the
    // pid file `dev down` trusts.
    let Some(_lock) = pidfile::lock_own(&dir.join("dev.lock"))? else {
        bail!(
            "another supervisor holds {}",
            dir.join("dev.lock").display()
        );
    };
    let action = signal::SigAction::new(
        signal::SigHandler::Handler(on_stop),
        signal::SaFlags::empty(),
        signal::SigSet::empty(),
    );
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        signal::sigaction(Signal::SIGTERM, &action)?;
        signal::sigaction(Signal::SIGINT, &action)?;
    }
    // A balancer's successor (after an upgrade) is reparented here when its
    // predecessor exits, so this process can watch and reap it.
    // SAFETY: prctl with an integer argument changes only this process's flag.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    let result = supervise_inner(dir, on_ready);
    let _ = fs::remove_file(dir.join("dev.ready"));
    result
}

fn supervise_inner(dir: &Path, on_ready: Option<fn(&Path)>) -> Result<()> {
    let logs = dir.join("logs");
    let prev_port = fs::read_to_string(dir.join("pg/port"))
        .ok()
        .and_then(|p| p.trim().parse().ok());
    let pg = PgCluster::init(
        dir,
        &PgOptions {
            fast: false,
            port: prev_port.filter(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok()),
        },
    )?;
    fs::write(dir.join("pg/port"), pg.port.to_string())?;
    eprintln!("starting postgres on 127.0.0.1:{}", pg.port);
    let pg_child = pg.start(&logs.join("postgres.log"))?;
    let mut procs: Vec<Supervised> = vec![Supervised {
        name: "postgres".into(),
        env: Vec::new(),
        child: Some(pg_child),
        adopted: None,
        restarts: 0,
        started: Instant::now(),
        next_start: None,
    }];
    let setup = (|| -> Result<PathBuf> {
        pg.create_db("paddock")?;
        let file = cluster_file(dir, &pg)?;
        let cfg_path = dir.join("paddock.toml");
        file.write(&cfg_path)?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let report = rt.block_on(paddock_db::migrate(&pg.url("paddock")))?;
        eprintln!(
            "migrations: {} applied, {} known",
            report.applied.len(),
            paddock_db::embedded_migrations().len()
        );
        Ok(cfg_path)
    })();
    let cfg_path = match setup {
        Ok(p) => p,
        Err(e) => {
            stop_all(dir, &mut procs);
            return Err(e);
        }
    };
    for d in DAEMONS {
        procs.push(Supervised {
            name: d.to_string(),
            env: Vec::new(),
            child: None,
            adopted: None,
            restarts: 0,
            started: Instant::now(),
            next_start: Some(Instant::now()),
        });
    }
    let mut pings: Vec<String> = DAEMONS
        .iter()
        .filter_map(|d| cfg_rpc(&cfg_path, d))
        .collect();
    match second_blobstore(dir) {
        Ok(Some(p)) => {
            pings.push(p.env[2].1.clone());
            procs.push(p);
        }
        Ok(None) => {}
        Err(e) => {
            stop_all(dir, &mut procs);
            return Err(e);
        }
    }
    match extra_runners(dir) {
        Ok(list) => {
            for p in list {
                pings.push(p.env[2].1.clone());
                procs.push(p);
            }
        }
        Err(e) => {
            stop_all(dir, &mut procs);
            return Err(e);
        }
    }
    let cfg = ClusterConfig::load(&cfg_path)?;
    let keys = cfg.credentials();
    let held = match hold_listeners(&cfg) {
        Ok(h) => h,
        Err(e) => {
            stop_all(dir, &mut procs);
            return Err(e);
        }
    };
    let mut ready = false;
    let mut last_ready_check = Instant::now() - Duration::from_secs(1);
    let mut last_reap = Instant::now();
    while !STOP.load(Ordering::SeqCst) {
        for p in procs.iter_mut() {
            tend(dir, &pg, &cfg_path, &held, p);
        }
        if last_reap.elapsed() > Duration::from_secs(1) {
            last_reap = Instant::now();
            reap_strays(&procs);
        }
        if !ready && last_ready_check.elapsed() > Duration::from_millis(200) {
            last_ready_check = Instant::now();
            ready = pings.len() >= DAEMONS.len()
                && pings.iter().all(|rpc| {
                    harness::wait_ping(rpc, keys.clone(), Duration::from_millis(100)).is_ok()
                })
                && all_alive(&cfg, pings.len());
            if ready {
                fs::write(dir.join("dev.ready"), "")?;
                eprintln!("all daemons answer ping");
                if let Some(f) = on_ready {
                    f(dir);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("stopping the dev cluster");
    stop_all(dir, &mut procs);
    eprintln!("stopped");
    Ok(())
}

/// This process is a subreaper, so orphans of the processes it started (a shim
/// whose runner was restarted, say) become its children: reap those that ended,
/// leaving alone the children it tracks (their owners wait for them).
fn reap_strays(procs: &[Supervised]) {
    let me = std::process::id() as i32;
    let known: Vec<i32> = procs
        .iter()
        .filter_map(|p| {
            p.child
                .as_ref()
                .map(|c| c.id() as i32)
                .or(p.adopted.as_ref().map(|a| a.pid()))
        })
        .collect();
    let Ok(entries) = fs::read_dir("/proc") else {
        return;
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        if known.contains(&pid) {
            continue;
        }
        let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // "PID (COMM) STATE PPID …": COMM may hold spaces and parentheses.
        let mut rest = stat.rsplit(')').next().unwrap_or("").split_whitespace();
        let (state, ppid) = (rest.next(), rest.next().and_then(|p| p.parse::<i32>().ok()));
        if state == Some("Z") && ppid == Some(me) {
            let _ = nix::sys::wait::waitpid(
                Pid::from_raw(pid),
                Some(nix::sys::wait::WaitPidFlag::WNOHANG),
            );
        }
    }
}

/// The balancer's public listening sockets, bound once by the supervisor and
/// handed to every balancer it starts (`LISTEN_FDS`), so a balancer that dies
/// or is killed refuses no connection: they wait in the accept queue.
fn hold_listeners(cfg: &ClusterConfig) -> Result<Vec<(String, std::net::TcpListener)>> {
    let mut out = Vec::new();
    let Some(sec) = cfg.file.daemons.get("balancer") else {
        return Ok(out);
    };
    for name in ["http", "https", "admin"] {
        let Some(ep) = sec.endpoint(name) else {
            continue;
        };
        let addr = ep.strip_prefix("tcp://").unwrap_or(ep);
        let l = std::net::TcpListener::bind(addr)
            .with_context(|| format!("the balancer's {name} listener {ep}"))?;
        out.push((name.to_string(), l));
    }
    Ok(out)
}

/// Starts the balancer with the held listeners as its fds 3, 4, ….
fn spawn_balancer(
    cfg_path: &Path,
    log: &Path,
    held: &[(String, std::net::TcpListener)],
) -> Result<Child> {
    use std::os::fd::AsRawFd;
    let logf = fs::OpenOptions::new().create(true).append(true).open(log)?;
    let mut cmd = Command::new(harness::bin("paddock-balancer")?);
    cmd.arg("--config")
        .arg(cfg_path)
        .env("LISTEN_FDS", held.len().to_string())
        .env(
            "LISTEN_FDNAMES",
            held.iter()
                .map(|(n, _)| n.as_str())
                .collect::<Vec<_>>()
                .join(":"),
        )
        .env_remove("LISTEN_PID")
        .stdin(Stdio::null())
        .stdout(logf.try_clone()?)
        .stderr(logf)
        .process_group(0);
    let fds: Vec<i32> = held.iter().map(|(_, l)| l.as_raw_fd()).collect();
    paddock_daemon::pass_fds(&mut cmd, &fds);
    cmd.spawn().context("starting paddock-balancer")
}

/// After the balancer exited cleanly on its own: the successor an upgrade
/// started, if one now holds the balancer's pid lock.
fn successor(dir: &Path, name: &str, old: i32) -> Option<Proc> {
    let path = state_dir(dir).join(format!("{name}.pid"));
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        if let Ok(Some(p)) = pidfile::lock_holder(&path) {
            if p.pid() != old {
                return Some(p);
            }
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// When `old` exited cleanly after an upgrade: watches its successor instead.
fn adopt_successor(dir: &Path, p: &mut Supervised, old: i32) -> bool {
    let Some(next) = successor(dir, &p.name, old) else {
        return false;
    };
    eprintln!(
        "{} upgraded: pid {old} handed over to pid {}",
        p.name,
        next.pid()
    );
    p.adopted = Some(next);
    true
}

/// Restarts `p` if it died, with backoff (immediate first, then doubling to 5 s).
fn tend(
    dir: &Path,
    pg: &PgCluster,
    cfg_path: &Path,
    held: &[(String, std::net::TcpListener)],
    p: &mut Supervised,
) {
    if let Some(a) = &p.adopted {
        if !a.exited() {
            return;
        }
        // Reap it (it was reparented to this subreaper) and learn how it ended.
        let old = a.pid();
        let st = nix::sys::wait::waitpid(
            Pid::from_raw(old),
            Some(nix::sys::wait::WaitPidFlag::WNOHANG),
        );
        p.adopted = None;
        let clean = matches!(st, Ok(nix::sys::wait::WaitStatus::Exited(_, 0)));
        // Upgraded again: follow the next successor.
        if clean && adopt_successor(dir, p, old) {
            return;
        }
        eprintln!(
            "{} (pid {old}, adopted after an upgrade) exited ({st:?}); restarting",
            p.name
        );
        p.next_start = Some(Instant::now());
    }
    if let Some(child) = &mut p.child {
        match child.try_wait() {
            Ok(None) => return,
            Ok(Some(st)) if st.success() && p.name == "balancer" => {
                let old = child.id() as i32;
                if adopt_successor(dir, p, old) {
                    p.child = None;
                    return;
                }
                eprintln!("balancer exited ({st}); restarting");
                p.child = None;
                p.next_start = Some(Instant::now());
            }
            Ok(Some(st)) => {
                let up = p.started.elapsed();
                if up > Duration::from_secs(30) {
                    p.restarts = 0;
                }
                let delay = if p.restarts == 0 {
                    Duration::ZERO
                } else {
                    Duration::from_millis(250 * (1u64 << p.restarts.min(5)))
                        .min(Duration::from_secs(5))
                };
                eprintln!(
                    "{} exited ({st}) after {:.1} s; restarting in {delay:?}",
                    p.name,
                    up.as_secs_f64()
                );
                p.restarts += 1;
                p.child = None;
                p.next_start = Some(Instant::now() + delay);
            }
            Err(e) => {
                eprintln!("cannot wait for {}: {e}", p.name);
                return;
            }
        }
    }
    let Some(at) = p.next_start else { return };
    if Instant::now() < at {
        return;
    }
    let log = dir.join("logs").join(format!("{}.log", p.name));
    let spawned = if p.name == "postgres" {
        pg.start(&log)
    } else if p.name == "balancer" && !held.is_empty() {
        spawn_balancer(cfg_path, &log, held)
    } else if !p.env.is_empty() {
        let env: Vec<(&str, &str)> = p
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let daemon = p.name.split('-').next().unwrap_or(&p.name);
        harness::spawn_daemon_env(daemon, cfg_path, &log, &env)
    } else {
        harness::spawn_daemon(&p.name, cfg_path, &log)
    };
    match spawned {
        Ok(c) => {
            p.child = Some(c);
            p.started = Instant::now();
            p.next_start = None;
        }
        Err(e) => {
            eprintln!("cannot start {}: {e:#}", p.name);
            p.next_start = Some(Instant::now() + Duration::from_secs(2));
        }
    }
}

/// Daemons first (SIGTERM, 5 s grace), then the app instances' shims (each takes
/// its app and everything it started), PostgreSQL last (fast shutdown, 15 s grace).
fn stop_all(dir: &Path, procs: &mut [Supervised]) {
    for p in procs.iter_mut().rev() {
        if p.name == "postgres" {
            let n = stop_every_shim(&state_dir(dir));
            if n > 0 {
                eprintln!("stopped {n} app instance(s)");
            }
        }
        if let Some(a) = p.adopted.take() {
            a.stop(Signal::SIGTERM, Duration::from_secs(5));
            let _ = nix::sys::wait::waitpid(
                Pid::from_raw(a.pid()),
                Some(nix::sys::wait::WaitPidFlag::WNOHANG),
            );
        }
        if let Some(mut c) = p.child.take() {
            let (sig, grace) = if p.name == "postgres" {
                (Signal::SIGINT, Duration::from_secs(15))
            } else {
                (Signal::SIGTERM, Duration::from_secs(5))
            };
            if p.name == "postgres" {
                // Fast shutdown ends its backends; a crash if it hangs.
                harness::stop_postgres(&mut c, sig, grace);
            } else {
                harness::stop_child(&mut c, sig, grace);
            }
        }
    }
}

fn down(dir: &Path) -> Result<()> {
    if !dir.join("paddock.toml").exists() && !dir.join("dev.lock").exists() {
        bail!(
            "{} is not a dev cluster directory (no paddock.toml)",
            dir.display()
        );
    }
    if let Some(p) = running_supervisor(dir)? {
        p.signal(Signal::SIGTERM)?;
        if !p.wait_exit(Duration::from_secs(30)) {
            eprintln!(
                "the supervisor (pid {}) did not stop in 30 s; killing it",
                p.pid()
            );
            let _ = p.signal(Signal::SIGKILL);
            p.wait_exit(Duration::from_secs(5));
        }
    }
    // Whatever a killed supervisor left behind, found only through proof that it
    // is ours, stopped in the supervisor's order: daemons (a runner would restart
    // what it lost), app instances' shims (each takes its app along), PostgreSQL.
    let state = state_dir(dir);
    let mut pidfiles: Vec<PathBuf> = [state.clone(), state.join("blobstore-2")]
        .into_iter()
        .chain(extra_runner_states(&state))
        .collect::<Vec<_>>()
        .iter()
        .flat_map(|d| fs::read_dir(d).into_iter().flatten().flatten())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "pid"))
        .collect();
    pidfiles.sort();
    let mut daemons: Vec<Proc> = Vec::new();
    for path in pidfiles {
        match pidfile::lock_holder(&path) {
            Ok(Some(p)) => {
                eprintln!("stopping leftover {} (pid {})", path.display(), p.pid());
                daemons.push(p);
            }
            Ok(None) => {}
            Err(e) => eprintln!("cannot check {}: {e}", path.display()),
        }
    }
    pidfile::stop_all(&daemons, Signal::SIGTERM, Duration::from_secs(15));
    let shims = stop_every_shim(&state);
    if shims > 0 {
        eprintln!("stopped {shims} leftover app instance(s)");
    }
    if let Some(pg) = running_postmaster(dir) {
        eprintln!("stopping leftover postgres (pid {})", pg.pid());
        // Fast shutdown; its backends end with it.
        pg.stop(Signal::SIGINT, Duration::from_secs(15));
    }
    // Pid files of an older `dev` (run/NAME.pid, dev.pid) prove nothing: removed.
    for e in fs::read_dir(dir.join("run"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let _ = fs::remove_file(e.path());
    }
    let _ = fs::remove_dir(dir.join("run"));
    let _ = fs::remove_file(dir.join("dev.pid"));
    let _ = fs::remove_file(dir.join("dev.ready"));
    println!("dev cluster in {} stopped", dir.display());
    Ok(())
}

fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let v: Vec<&str> = text.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

fn logs(dir: &Path, daemon: Option<&str>, follow: bool, lines: usize) -> Result<()> {
    let logdir = dir.join("logs");
    let files: Vec<(String, PathBuf)> = match daemon {
        Some(d) => {
            let p = logdir.join(format!("{d}.log"));
            if !p.exists() {
                let known: Vec<String> = fs::read_dir(&logdir)
                    .map(|rd| {
                        rd.flatten()
                            .map(|e| {
                                e.file_name()
                                    .to_string_lossy()
                                    .trim_end_matches(".log")
                                    .to_string()
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                bail!(
                    "no log for `{d}` in {} (have: {})",
                    logdir.display(),
                    known.join(", ")
                );
            }
            vec![(d.to_string(), p)]
        }
        None => {
            let mut v: Vec<(String, PathBuf)> = fs::read_dir(&logdir)
                .map_err(|e| anyhow!("cannot read {}: {e}", logdir.display()))?
                .flatten()
                .map(|e| {
                    (
                        e.file_name()
                            .to_string_lossy()
                            .trim_end_matches(".log")
                            .to_string(),
                        e.path(),
                    )
                })
                .collect();
            v.sort();
            v
        }
    };
    let prefix = files.len() > 1;
    let mut offsets = Vec::new();
    for (name, p) in &files {
        let text = fs::read_to_string(p).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        for l in &all[all.len().saturating_sub(lines)..] {
            if prefix {
                println!("{name:>10} | {l}");
            } else {
                println!("{l}");
            }
        }
        offsets.push(text.len() as u64);
    }
    if !follow {
        return Ok(());
    }
    loop {
        std::thread::sleep(Duration::from_millis(200));
        for ((name, p), off) in files.iter().zip(offsets.iter_mut()) {
            let Ok(mut f) = fs::File::open(p) else {
                continue;
            };
            let len = f.metadata().map(|m| m.len()).unwrap_or(0);
            if len < *off {
                *off = 0; // truncated
            }
            if len == *off {
                continue;
            }
            f.seek(SeekFrom::Start(*off))?;
            let mut s = String::new();
            f.read_to_string(&mut s)?;
            *off = len;
            for l in s.lines() {
                if prefix {
                    println!("{name:>10} | {l}");
                } else {
                    println!("{l}");
                }
            }
        }
    }
}
