//! Verbs for app instances on runners: `paddock instance ps|run|start|…`.

use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand};
use paddock_config::ClusterConfig;
use paddock_wire::kinds::{self, InstanceInfo, InstanceList, LogLines, ServiceState};
use paddock_wire::now_ms;
use serde_json::{json, Value};

use crate::cluster::{client, load, registry, table, Opts};
use crate::out;
use crate::tty::{self, command_fields, term_size, RunConn};

#[derive(Debug, Subcommand)]
pub enum InstanceCmd {
    /// Every app instance on every runner.
    Ps,
    /// Run a one-off command in an app's environment on a PTY (-a APP), from a
    /// directory on the node or from a release (--release SHA --version N).
    Run(RunArgs),
    /// Start an app instance (-a APP) on a runner; prints its id and port.
    Start(StartArgs),
    /// Stop an instance (stop signal, grace period, then SIGKILL to everything it started).
    Stop { id: String },
    /// Stop and start an instance again.
    Restart { id: String },
    /// Send an instance its reload signal.
    Reload { id: String },
    /// Show an instance's captured output.
    Logs {
        id: String,
        #[arg(short = 'n', long, default_value_t = 100)]
        lines: usize,
        /// Keep printing new lines.
        #[arg(short, long)]
        follow: bool,
    },
}

/// A release to run instead of a directory: its slug, fetched and unpacked by the
/// runner, at `/app`, with the release's config vars.
#[derive(Debug, Args)]
pub struct ReleaseArgs {
    /// The release's slug (its sha256); with --version.
    #[arg(
        long = "release",
        value_name = "SHA256",
        requires = "release_version",
        conflicts_with = "dir"
    )]
    release: Option<String>,
    /// The release's version number; with --release.
    #[arg(long = "version", value_name = "N", requires = "release")]
    release_version: Option<u32>,
}

impl ReleaseArgs {
    /// `{"release": {…}}` or `{"dir": …}` and the command fields; a release may
    /// leave the command out (an instance then runs its process type's command).
    fn fields(
        &self,
        dir: &Option<String>,
        command: &[String],
    ) -> Result<serde_json::Map<String, Value>> {
        let mut m = serde_json::Map::new();
        match (&self.release, self.release_version, dir) {
            (Some(sha), Some(v), _) => {
                m.insert("release".into(), json!({"slug": sha, "version": v}));
            }
            (None, None, Some(d)) => {
                m.insert("dir".into(), json!(d));
            }
            _ => bail!("give --dir DIR, or --release SHA256 --version N"),
        }
        if command.is_empty() {
            if self.release.is_none() {
                bail!("give the command after `--`");
            }
        } else {
            let (command, argv) = command_fields(command);
            m.insert("command".into(), json!(command));
            m.insert("argv".into(), json!(argv));
        }
        Ok(m)
    }
}

#[derive(Debug, Args)]
pub struct StartArgs {
    #[arg(long, default_value = "web")]
    proc: String,
    /// The app's code directory (absolute; must be readable by the app's user).
    #[arg(long)]
    dir: Option<String>,
    #[command(flatten)]
    release: ReleaseArgs,
    /// KEY=VALUE, repeatable.
    #[arg(long = "env", short = 'e')]
    env: Vec<String>,
    /// Health check: HTTP GET of this path must answer 2xx/3xx.
    #[arg(long, conflicts_with_all = ["health_none"])]
    health_http: Option<String>,
    /// No port: up once it stayed alive a few seconds.
    #[arg(long)]
    health_none: bool,
    #[arg(long)]
    memory_mb: Option<u64>,
    #[arg(long)]
    pids: Option<u64>,
    #[arg(long)]
    nofile: Option<u64>,
    /// The runner's node (default: this node's runner, else any alive one).
    #[arg(long)]
    node: Option<String>,
    /// One argument: a command line, Procfile style (run by `sh` when it has
    /// shell syntax). Several: the program and its arguments, exec'd as given.
    /// With --release it may be left out: the release's command for --proc.
    #[arg(last = true)]
    command: Vec<String>,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The app's code directory (absolute; must be readable by the app's user).
    #[arg(long)]
    dir: Option<String>,
    #[command(flatten)]
    release: ReleaseArgs,
    /// No terminal: output (stdout and stderr) is printed as it comes, nothing
    /// is read from stdin.
    #[arg(long)]
    no_pty: bool,
    #[arg(long = "env", short = 'e')]
    env: Vec<String>,
    #[arg(long)]
    node: Option<String>,
    /// One argument: a shell command line. Several: the program and its
    /// arguments, exec'd as given (no shell, no re-splitting).
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

/// Every alive runner: (node, rpc endpoint). This node's runner from the cluster
/// file when the registry cannot be reached.
fn runners(cfg: &ClusterConfig, opts: &Opts) -> Result<Vec<(String, String)>> {
    match registry(cfg, opts.timeout) {
        Ok(list) => {
            let v: Vec<(String, String)> = list
                .services
                .into_iter()
                .filter(|s| s.daemon == "runner" && s.state == ServiceState::Alive)
                .filter_map(|s| Some((s.node, s.endpoints.get("rpc")?.clone())))
                .collect();
            if v.is_empty() {
                bail!("no alive runner in the registry");
            }
            Ok(v)
        }
        Err(e) => match cfg.file.daemons.get("runner") {
            Some(d) => Ok(vec![(cfg.node().to_string(), d.rpc.clone())]),
            None => Err(e),
        },
    }
}

fn pick(cfg: &ClusterConfig, opts: &Opts, node: Option<&str>) -> Result<String> {
    let all = runners(cfg, opts)?;
    let want = node.unwrap_or(cfg.node());
    all.iter()
        .find(|(n, _)| n == want)
        .or_else(|| if node.is_none() { all.first() } else { None })
        .map(|(_, ep)| ep.clone())
        .ok_or_else(|| anyhow!("no alive runner on node {want}"))
}

/// The runner that has instance `id`.
fn owner(cfg: &ClusterConfig, opts: &Opts, id: &str) -> Result<String> {
    for (_, ep) in runners(cfg, opts)? {
        let mut c = client(cfg, &ep, opts.timeout)?;
        let l: InstanceList = serde_json::from_value(c.call(kinds::INSTANCE_LIST, json!({}))?)?;
        if l.instances.iter().any(|i| i.id == id) {
            return Ok(ep);
        }
    }
    bail!("no runner has an instance `{id}` (see `paddock instance ps`)")
}

fn env_map(pairs: &[String]) -> Result<serde_json::Map<String, Value>> {
    let mut m = serde_json::Map::new();
    for p in pairs {
        let (k, v) = p
            .split_once('=')
            .ok_or_else(|| anyhow!("--env {p}: expected KEY=VALUE"))?;
        m.insert(k.to_string(), Value::String(v.to_string()));
    }
    Ok(m)
}

fn uptime(ms: u64) -> String {
    match ms / 1000 {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{}s", s / 60, s % 60),
        s => format!("{}h{}m", s / 3600, (s % 3600) / 60),
    }
}

pub fn ps(opts: &Opts) -> Result<()> {
    let cfg = load(opts)?;
    let mut all: Vec<InstanceInfo> = Vec::new();
    let mut errors = Vec::new();
    for (node, ep) in runners(&cfg, opts)? {
        match client(&cfg, &ep, opts.timeout)
            .and_then(|mut c| Ok(c.call(kinds::INSTANCE_LIST, json!({}))?))
        {
            Ok(v) => all.extend(serde_json::from_value::<InstanceList>(v)?.instances),
            Err(e) => errors.push(format!("runner on {node}: {e}")),
        }
    }
    if opts.json {
        println!("{}", serde_json::to_string_pretty(&all)?);
    } else {
        let mut t = table(&[
            "INSTANCE", "APP", "PROC", "RELEASE", "OWNER", "NODE", "PID", "PORT", "STATE",
            "RESTARTS", "UPTIME",
        ]);
        for i in &all {
            let state = match (&i.state[..], &i.reason) {
                ("crashed", Some(r)) => format!("crashed: {r}"),
                (s, _) => s.to_string(),
            };
            t.add_row(vec![
                out::term(&i.id).into_owned(),
                out::term(&i.app).into_owned(),
                out::term(&i.proc).into_owned(),
                i.release
                    .map(|v| format!("v{v}"))
                    .unwrap_or_else(|| "-".into()),
                i.owner.as_str().to_string(),
                out::term(&i.node).into_owned(),
                i.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
                i.port.to_string(),
                out::term(&state).into_owned(),
                i.restarts.to_string(),
                uptime(i.uptime_ms),
            ]);
        }
        println!("{t}");
    }
    for e in &errors {
        eprintln!("warning: {e}");
    }
    Ok(())
}

pub fn instance(opts: &Opts, cmd: InstanceCmd) -> Result<()> {
    let cmd = match cmd {
        InstanceCmd::Ps => return ps(opts),
        InstanceCmd::Run(a) => std::process::exit(run(opts, a)?),
        other => other,
    };
    let cfg = load(opts)?;
    match cmd {
        InstanceCmd::Ps | InstanceCmd::Run(_) => unreachable!("handled above"),
        InstanceCmd::Start(a) => {
            let app = crate::identity::app(opts)?;
            let ep = pick(&cfg, opts, a.node.as_deref())?;
            let health = match (&a.health_http, a.health_none) {
                (Some(p), _) => json!({"http": p}),
                (None, true) => json!({"none": true}),
                _ => json!({"tcp": true}),
            };
            let mut limits = serde_json::Map::new();
            for (k, v) in [
                ("memory_mb", a.memory_mb),
                ("pids", a.pids),
                ("nofile", a.nofile),
            ] {
                if let Some(v) = v {
                    limits.insert(k.into(), v.into());
                }
            }
            let mut body = a.release.fields(&a.dir, &a.command)?;
            for (k, v) in [
                ("app", json!(app)),
                ("proc", json!(a.proc)),
                ("env", Value::Object(env_map(&a.env)?)),
                ("health", health),
                ("limits", Value::Object(limits)),
            ] {
                body.insert(k.into(), v);
            }
            let body = Value::Object(body);
            // A release's slug may be fetched and unpacked first.
            let timeout = match a.release.release {
                Some(_) => opts.timeout.max(Duration::from_secs(120)),
                None => opts.timeout,
            };
            let v = client(&cfg, &ep, timeout)?.call(kinds::INSTANCE_START, body)?;
            if opts.json {
                println!("{v}");
            } else {
                println!(
                    "started {} on port {}",
                    v["id"].as_str().unwrap_or("?"),
                    v["port"]
                );
            }
        }
        InstanceCmd::Stop { id } => simple(&cfg, opts, kinds::INSTANCE_STOP, &id, "stopping")?,
        InstanceCmd::Restart { id } => {
            simple(&cfg, opts, kinds::INSTANCE_RESTART, &id, "restarting")?
        }
        InstanceCmd::Reload { id } => simple(
            &cfg,
            opts,
            kinds::INSTANCE_RELOAD,
            &id,
            "sent the reload signal to",
        )?,
        InstanceCmd::Logs { id, lines, follow } => {
            let ep = owner(&cfg, opts, &id)?;
            let mut c = client(&cfg, &ep, opts.timeout)?;
            let mut last_ts = 0i64;
            let mut seen_at_last = 0usize;
            let tty = out::is_tty();
            loop {
                let l: LogLines = serde_json::from_value(c.call(
                    kinds::INSTANCE_LOGS,
                    json!({"id": id, "lines": if last_ts == 0 { lines } else { 10_000 }}),
                )?)?;
                let mut same_ts = 0;
                for line in l.lines.iter() {
                    // Print only what is newer than what was printed.
                    if line.ts < last_ts {
                        continue;
                    }
                    if line.ts == last_ts {
                        same_ts += 1;
                        if same_ts <= seen_at_last {
                            continue;
                        }
                    } else {
                        same_ts = 1;
                        last_ts = line.ts;
                    }
                    seen_at_last = same_ts;
                    if opts.json {
                        println!("{}", out::safe_json(serde_json::to_string(line)?));
                    } else {
                        let t = chrono_like(line.ts);
                        println!("{}", out::log_line(&t, &line.stream, &line.line, tty));
                    }
                }
                if !follow {
                    return Ok(());
                }
                if last_ts == 0 {
                    last_ts = now_ms() - 1;
                }
                std::thread::sleep(Duration::from_millis(300));
            }
        }
    }
    Ok(())
}

fn simple(cfg: &ClusterConfig, opts: &Opts, kind: &str, id: &str, verb: &str) -> Result<()> {
    let ep = owner(cfg, opts, id)?;
    let v = client(cfg, &ep, opts.timeout)?.call(kind, json!({"id": id}))?;
    if opts.json {
        println!("{v}");
    } else {
        println!("{verb} {id}");
    }
    Ok(())
}

/// `HH:MM:SS.mmm` UTC, enough for a log view.
fn chrono_like(ms: i64) -> String {
    let s = ms / 1000;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        (s / 3600) % 24,
        (s / 60) % 60,
        s % 60,
        ms % 1000
    )
}

/// `paddock instance run`: a one-off command on a PTY; returns its exit code.
pub fn run(opts: &Opts, a: RunArgs) -> Result<i32> {
    let app = crate::identity::app(opts)?;
    let cfg = load(opts)?;
    tty::catch_stop();
    let ep = pick(&cfg, opts, a.node.as_deref())?;
    let (cols, rows) = term_size();
    let mut c = client(&cfg, &ep, opts.timeout)?;
    let mut body = a.release.fields(&a.dir, &a.command)?;
    for (k, v) in [
        ("app", json!(app)),
        ("env", Value::Object(env_map(&a.env)?)),
        ("cols", json!(cols)),
        ("rows", json!(rows)),
        ("pty", json!(!a.no_pty)),
    ] {
        body.insert(k.into(), v);
    }
    // A release's slug may be fetched and unpacked first.
    c.set_timeout(opts.timeout.max(Duration::from_secs(120)));
    let v = c.call(kinds::RUN_START, Value::Object(body))?;
    let id = v["id"]
        .as_str()
        .context("run.start reply has no id")?
        .to_string();
    // The output is long-polled: each call waits up to OUTPUT_WAIT_MS there.
    c.set_timeout(opts.timeout + Duration::from_secs(5));
    let timeout = opts.timeout;
    let connect: tty::Connect = Box::new(move || {
        let c = client(&cfg, &ep, timeout)?;
        Ok(Box::new(Runner(c)) as Box<dyn RunConn>)
    });
    tty::attach(Box::new(Runner(c)), &id, !a.no_pty, connect)
}

/// A runner connection for the shared one-off terminal.
struct Runner(paddock_wire::Client);

impl RunConn for Runner {
    fn call(&mut self, kind: &str, body: Value) -> Result<Value> {
        Ok(self.0.call(kind, body)?)
    }
}
