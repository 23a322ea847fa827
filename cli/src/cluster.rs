//! Verbs that talk to a running cluster: status, ping, lock.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::Subcommand;
use comfy_table::presets::{NOTHING, UTF8_FULL_CONDENSED};
use comfy_table::Table;
use paddock_config::ClusterConfig;
use paddock_locker::client::AcquireOptions;
use paddock_wire::kinds::{self, LockGrant, LockList, Pong, ServiceList, ServiceState};
use paddock_wire::{now_ms, Client};
use serde_json::{json, Value};

pub struct Opts {
    pub config: Option<PathBuf>,
    pub json: bool,
    pub timeout: Duration,
    /// `-a/--app`, when given (see `identity::app` for the default).
    pub app: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum LockCmd {
    /// Take lock NAME; prints its fencing token.
    Acquire {
        name: String,
        /// Who holds it (default: user:$USER@NODE/PID, unique to this run). An
        /// acquire by the owner that holds the lock returns its current grant.
        #[arg(long)]
        owner: Option<String>,
        /// Lease length in milliseconds.
        #[arg(long, default_value_t = 30_000)]
        ttl_ms: u64,
        /// Wait up to this long for a held lock, in milliseconds.
        #[arg(long, default_value_t = 0)]
        wait_ms: u64,
    },
    /// Extend the lease of lock NAME held with TOKEN.
    Renew {
        name: String,
        token: i64,
        #[arg(long, default_value_t = 30_000)]
        ttl_ms: u64,
    },
    /// Give lock NAME back.
    Release { name: String, token: i64 },
    /// Whether TOKEN is still lock NAME's current grant.
    Check { name: String, token: i64 },
    /// Every lock currently held.
    List,
}

fn user() -> String {
    format!(
        "user:{}",
        std::env::var("USER").unwrap_or_else(|_| "operator".into())
    )
}

/// The cluster file for an operator's verb (`identity::cluster` says which).
pub(crate) fn load(opts: &Opts) -> Result<ClusterConfig> {
    crate::identity::cluster(opts)
}

pub(crate) fn client(cfg: &ClusterConfig, endpoint: &str, timeout: Duration) -> Result<Client> {
    Ok(Client::connect(endpoint, &user(), cfg.credentials())?
        .with_timeout(timeout)
        .with_resend_every(Duration::from_millis(500).min(timeout)))
}

/// The registry from the first heartbeat that answers.
pub(crate) fn registry(cfg: &ClusterConfig, timeout: Duration) -> Result<ServiceList> {
    let eps = cfg.registries();
    if eps.is_empty() {
        bail!(
            "{} lists no heartbeat: add [cluster] registries = [\"tcp://…\"] or a [daemons.heartbeat] table",
            cfg.path.display()
        );
    }
    let mut errors = Vec::new();
    for ep in &eps {
        match client(cfg, ep, timeout)
            .and_then(|mut c| Ok(c.call(kinds::REGISTRY_LIST, json!({}))?))
        {
            Ok(v) => return serde_json::from_value(v).context("registry.list reply"),
            Err(e) => errors.push(format!("{ep}: {e}")),
        }
    }
    bail!("no heartbeat answered:\n  {}", errors.join("\n  "))
}

/// `daemon`'s rpc endpoint: this node's from the cluster file, else the registry's
/// newest alive one (on `node`, when given).
pub(crate) fn find(
    cfg: &ClusterConfig,
    daemon: &str,
    node: Option<&str>,
    timeout: Duration,
) -> Result<String> {
    if node.is_none() || node == Some(cfg.node()) {
        if let Some(d) = cfg.file.daemons.get(daemon) {
            return Ok(d.rpc.clone());
        }
    }
    let list = registry(cfg, timeout)?;
    list.services
        .iter()
        .rev()
        .find(|s| {
            s.daemon == daemon && s.state == ServiceState::Alive && node.is_none_or(|n| s.node == n)
        })
        .and_then(|s| s.endpoints.get("rpc").cloned())
        .ok_or_else(|| {
            anyhow!(
                "no alive {daemon}{} in the registry",
                node.map(|n| format!(" on {n}")).unwrap_or_default()
            )
        })
}

fn ago(ms: i64) -> String {
    let d = (now_ms() - ms).max(0);
    if d < 1000 {
        format!("{d} ms ago")
    } else {
        format!("{:.1} s ago", d as f64 / 1000.0)
    }
}

pub(crate) fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    // Borders on a terminal only: piped output is plain columns for grep and awk.
    if std::io::IsTerminal::is_terminal(&std::io::stdout()) {
        t.load_preset(UTF8_FULL_CONDENSED);
    } else {
        t.load_preset(NOTHING);
        t.force_no_tty();
    }
    t.set_header(header.to_vec());
    t
}

pub fn status(opts: &Opts) -> Result<()> {
    let cfg = load(opts)?;
    let list = registry(&cfg, opts.timeout)?;
    if opts.json {
        println!("{}", serde_json::to_string_pretty(&list.services)?);
        return Ok(());
    }
    let mut t = table(&["DAEMON", "NODE", "STATE", "LAST SEEN", "INCARNATION", "RPC"]);
    for s in &list.services {
        t.add_row(vec![
            s.daemon.clone(),
            s.node.clone(),
            s.state.as_str().to_string(),
            ago(s.last_seen),
            s.incarnation.clone(),
            s.endpoints.get("rpc").cloned().unwrap_or_default(),
        ]);
    }
    println!("{t}");
    let alive = list
        .services
        .iter()
        .filter(|s| s.state == ServiceState::Alive)
        .count();
    println!("{alive} of {} alive", list.services.len());
    Ok(())
}

pub fn ping(opts: &Opts, daemon: &str, node: Option<&str>) -> Result<()> {
    let cfg = load(opts)?;
    let ep = find(&cfg, daemon, node, opts.timeout)?;
    let mut c = client(&cfg, &ep, opts.timeout)?;
    let t = Instant::now();
    let v = c.call(kinds::PING, json!({}))?;
    let rtt = t.elapsed();
    if opts.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let p: Pong = serde_json::from_value(v)?;
    println!(
        "{}@{} answered in {:.2} ms (incarnation {}, version {}, up {:.1} s, {ep})",
        p.daemon,
        p.node,
        rtt.as_secs_f64() * 1000.0,
        p.incarnation,
        p.version,
        p.uptime_ms as f64 / 1000.0
    );
    Ok(())
}

pub fn lock(opts: &Opts, cmd: LockCmd) -> Result<()> {
    let cfg = load(opts)?;
    let ep = find(&cfg, "locker", None, opts.timeout)?;
    let mut c = client(&cfg, &ep, opts.timeout)?;
    let out: Value = match cmd {
        LockCmd::Acquire {
            name,
            owner,
            ttl_ms,
            wait_ms,
        } => {
            // Unique to this run by default: an acquire by the owner that holds the
            // lock returns its grant, so two runs must not share an owner unless
            // they mean to (a re-run with `--owner` re-learns a grant).
            let owner = owner
                .unwrap_or_else(|| format!("{}@{}/{}", user(), cfg.node(), std::process::id()));
            // A wait of any length: fresh requests of a few seconds each, so no
            // request outlives the skew window (paddock_locker::client).
            let req = kinds::LockAcquire {
                name: name.clone(),
                owner: owner.clone(),
                ttl_ms,
                wait_ms,
            };
            let acquire = AcquireOptions::new(opts.timeout, cfg.file.wire.skew_ms);
            let g = paddock_locker::client::acquire(&mut c, &req, &acquire)?;
            if !opts.json {
                println!(
                    "acquired {name} for {owner}: token {} (expires in {} ms)",
                    g.token,
                    g.expires - now_ms()
                );
                return Ok(());
            }
            serde_json::to_value(&g)?
        }
        LockCmd::Renew {
            name,
            token,
            ttl_ms,
        } => {
            let v = c.call(
                kinds::LOCK_RENEW,
                json!({"name": name, "token": token, "ttl_ms": ttl_ms}),
            )?;
            if !opts.json {
                let g: LockGrant = serde_json::from_value(v)?;
                println!(
                    "renewed {name} (token {token}): expires in {} ms",
                    g.expires - now_ms()
                );
                return Ok(());
            }
            v
        }
        LockCmd::Release { name, token } => {
            let v = c.call(kinds::LOCK_RELEASE, json!({"name": name, "token": token}))?;
            if !opts.json {
                println!("released {name} (token {token})");
                return Ok(());
            }
            v
        }
        LockCmd::Check { name, token } => {
            let v = c.call(kinds::LOCK_CHECK, json!({"name": name, "token": token}))?;
            if !opts.json {
                let valid = v.get("valid").and_then(Value::as_bool).unwrap_or(false);
                println!(
                    "token {token} of {name} is {}",
                    if valid { "valid" } else { "not valid" }
                );
                return Ok(());
            }
            v
        }
        LockCmd::List => {
            let v = c.call(kinds::LOCK_LIST, json!({}))?;
            if !opts.json {
                let l: LockList = serde_json::from_value(v)?;
                let mut t = table(&["NAME", "OWNER", "TOKEN", "EXPIRES IN"]);
                for lk in &l.locks {
                    t.add_row(vec![
                        lk.name.clone(),
                        lk.owner.clone(),
                        lk.token.to_string(),
                        format!("{} ms", lk.expires - now_ms()),
                    ]);
                }
                println!("{t}");
                return Ok(());
            }
            v
        }
    };
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}
