//! paddock-runner: the node agent. It runs app instances as supervised processes,
//! each under its own `paddock-shim` (the app's parent, holder of its pipes and exit
//! status), as the app's own unprivileged user, with rlimits and cgroup limits;
//! restarts what dies (first at once, then with backoff, up to a respawn limit);
//! checks health; captures logs; and runs one-off commands on a PTY.
//!
//! Architecture invariant: the runner's memory is never the only record of an
//! instance. Each instance has a directory (spec, record, log, the shim's socket);
//! a restarted runner re-adopts running instances from there, and the shims keep
//! the apps alive while no runner exists.

pub mod cgroup;
pub mod child;
pub mod health;
pub mod pty;
pub mod shim;
pub mod shim_proto;
pub mod users;

use std::cell::Cell;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use paddock_config::{ClusterConfig, ConfigError};
use paddock_daemon::{body, Ctx, Routes, Spec};
use paddock_wire::kinds::{
    self, InstanceId, InstanceInfo, InstanceList, InstanceLogs, InstanceStart, InstanceStarted,
    LastExit, LogLine, LogLines,
};
use paddock_wire::{now_ms, Code, ServerHandle, WireError};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::shim_proto::{ExitInfo, ShimCommand, ShimEvent, ShimSpec};

pub fn spec() -> Spec {
    Spec {
        name: "runner",
        version: env!("CARGO_PKG_VERSION"),
        pull: false,
        publish: true,
        check: |cfg| Settings::from_config(cfg).map(|_| ()),
        push_to: |cfg| {
            cfg.file
                .daemons
                .get("runner")
                .and_then(|d| {
                    d.endpoint("log_sink")
                        .map(|e| vec![("logs".to_string(), e.to_string())])
                })
                .unwrap_or_default()
        },
    }
}

/// The runner's settings from `[daemons.runner]`, with defaults.
#[derive(Debug, Clone)]
pub struct Settings {
    pub port_min: u16,
    pub port_max: u16,
    /// Root of the per-instance home and tmp directories (must be searchable by
    /// app users).
    pub apps_dir: PathBuf,
    pub instances_dir: PathBuf,
    pub cgroup_root: PathBuf,
    pub stop_grace: Duration,
    pub start_timeout: Duration,
    pub health_interval: Duration,
    pub health_failures: u32,
    pub none_up_after: Duration,
    pub restart_limit: u32,
    pub restart_window: Duration,
    pub backoff_base: Duration,
    pub backoff_cap: Duration,
    pub backoff_reset: Duration,
    pub log_max_bytes: u64,
    pub nofile: u64,
    pub pids: u64,
    pub memory_mb: Option<u64>,
    /// How long a stopped instance's directories (record, logs, home) are kept
    /// before they are removed.
    pub stopped_keep: Duration,
}

impl Settings {
    pub fn from_config(cfg: &ClusterConfig) -> Result<Settings, ConfigError> {
        let get = |k: &str, d: u64| cfg.daemon_u64("runner", k, d);
        let ms = |k: &str, d: u64| get(k, d).map(Duration::from_millis);
        let port_min = get("port_min", 20_000)?;
        let port_max = get("port_max", 29_999)?;
        if port_min == 0 || port_max > 65_535 || port_min > port_max {
            return Err(cfg.invalid(
                "daemons.runner.port_min",
                format!("port range {port_min}-{port_max} is not valid"),
            ));
        }
        let section = cfg.file.daemons.get("runner");
        let path = |k: &str, d: PathBuf| {
            section
                .and_then(|s| s.other.get(k))
                .and_then(|v| v.as_str())
                .map(PathBuf::from)
                .unwrap_or(d)
        };
        let mem = get("memory_mb", 0)?;
        Ok(Settings {
            port_min: port_min as u16,
            port_max: port_max as u16,
            apps_dir: path("apps_dir", cfg.state_dir.join("apps")),
            instances_dir: path("instances_dir", cfg.state_dir.join("runner")),
            cgroup_root: path("cgroup_root", PathBuf::from("/sys/fs/cgroup")),
            stop_grace: ms("stop_grace_ms", 10_000)?,
            start_timeout: ms("start_timeout_ms", 30_000)?,
            health_interval: ms("health_interval_ms", 5_000)?,
            health_failures: get("health_failures", 3)? as u32,
            none_up_after: ms("none_up_after_ms", 2_000)?,
            restart_limit: get("restart_limit", 10)? as u32,
            restart_window: ms("restart_window_ms", 60_000)?,
            backoff_base: ms("backoff_base_ms", 100)?,
            backoff_cap: ms("backoff_cap_ms", 30_000)?,
            backoff_reset: ms("backoff_reset_ms", 30_000)?,
            log_max_bytes: get("log_max_bytes", 1 << 20)?,
            nofile: get("nofile", 4096)?,
            pids: get("pids", 512)?,
            memory_mb: (mem > 0).then_some(mem),
            stopped_keep: ms("stopped_keep_ms", 3_600_000)?,
        })
    }
}

/// What the runner keeps on disk for each instance (`instance.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    id: String,
    req: InstanceStart,
    port: u16,
    uid: u32,
    gid: u32,
    created: i64,
    /// False from the moment a stop is requested: a restarted runner finishes the
    /// stop instead of starting the app again.
    running: bool,
    restarts: u32,
    /// Why it was given up on, if it was (survives a runner restart).
    #[serde(default)]
    crashed: Option<String>,
    /// When it stopped (epoch ms); its directories are removed `stopped_keep`
    /// later.
    #[serde(default)]
    stopped_at: Option<i64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Starting,
    Up,
    Backoff,
    Crashed,
    Stopping,
    Stopped,
}

impl State {
    fn as_str(self) -> &'static str {
        match self {
            State::Starting => "starting",
            State::Up => "up",
            State::Backoff => "backoff",
            State::Crashed => "crashed",
            State::Stopping => "stopping",
            State::Stopped => "stopped",
        }
    }
}

/// A restart policy resolved against the runner's defaults.
struct Policy {
    limit: u32,
    window: Duration,
    base: Duration,
    cap: Duration,
    reset: Duration,
}

/// What to do once the shim reports `Stopped`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AfterStop {
    /// `instance.stop`: stay stopped, shim exits.
    Remove,
    /// `instance.restart` or a failed health check: start again.
    Start,
    /// Health failed past the respawn limit: stay down as `crashed`.
    Crash,
}

struct Inst {
    rec: Record,
    dir: PathBuf,
    state: State,
    pid: Option<i32>,
    started_ms: Option<i64>,
    /// Restart times inside the respawn window.
    recent: VecDeque<Instant>,
    next_delay: Duration,
    last_exit: Option<ExitInfo>,
    reason: Option<String>,
    /// Bumped at every app start, exit and stop; health watchers and results of
    /// an older generation stand down.
    generation: Rc<Cell<u64>>,
    shim: ShimLink,
    /// True from the moment this runner spawned the instance's shim until that
    /// process is reaped: a shim counts as alive before it has written
    /// `shim.pid`, so a stop or restart right after a start finds it.
    spawned: Rc<Cell<Option<i32>>>,
    /// Whether the shim is armed to restart on its own (None: unknown).
    armed: Option<bool>,
    after_stop: Option<AfterStop>,
    cgroup: cgroup::InstanceCgroup,
}

impl Inst {
    fn info(&self, node: &str) -> InstanceInfo {
        InstanceInfo {
            id: self.rec.id.clone(),
            app: self.rec.req.app.clone(),
            proc: self.rec.req.proc.clone(),
            pid: self.pid,
            port: self.rec.port,
            state: self.state.as_str().into(),
            restarts: self.rec.restarts,
            uptime_ms: match (self.state, self.started_ms) {
                (State::Starting | State::Up, Some(s)) => (now_ms() - s).max(0) as u64,
                _ => 0,
            },
            last_exit: self.last_exit.as_ref().map(|e| LastExit {
                code: e.code,
                signal: e.signal,
                oom: e.oom,
                at: e.at,
                reason: e.describe(),
            }),
            node: node.to_string(),
            reason: self.reason.clone(),
        }
    }

    fn bump(&self) -> u64 {
        self.generation.set(self.generation.get() + 1);
        self.generation.get()
    }

    /// The instance's restart policy with the runner's defaults filled in.
    fn policy(&self, s: &Settings) -> Policy {
        let p = &self.rec.req.restart;
        Policy {
            limit: p.limit.unwrap_or(s.restart_limit),
            window: ms_or(p.window_ms, s.restart_window),
            base: ms_or(p.backoff_base_ms, s.backoff_base),
            cap: ms_or(p.backoff_cap_ms, s.backoff_cap),
            reset: ms_or(p.reset_after_ms, s.backoff_reset),
        }
    }

    /// Restarts inside the respawn window (older ones are forgotten).
    fn recent_restarts(&mut self, window: Duration) -> u32 {
        let now = Instant::now();
        while self
            .recent
            .front()
            .is_some_and(|t| now.duration_since(*t) > window)
        {
            self.recent.pop_front();
        }
        self.recent.len() as u32
    }

    /// Counts a restart against the respawn limit: `Err(reason)` when the limit
    /// is reached (the instance is to be `crashed`).
    fn count_restart(&mut self, s: &Settings, why: &str) -> Result<(), String> {
        let p = self.policy(s);
        let used = self.recent_restarts(p.window);
        if used >= p.limit {
            return Err(format!(
                "{used} restarts within {:?}; last: {why}",
                p.window
            ));
        }
        self.recent.push_back(Instant::now());
        Ok(())
    }

    /// Asks the shim to stop the app (stop signal, grace, then everything killed);
    /// `then` says what happens once it reports `Stopped`.
    fn begin_stop(&mut self, s: &Settings, then: AfterStop) {
        let (sig, grace_ms) = Runner::stop_signal(self, s);
        self.state = State::Stopping;
        self.after_stop = Some(then);
        self.bump();
        self.send(ShimCommand::Stop { sig, grace_ms });
    }

    /// Arms the shim exactly when its next restart would be immediate anyway (no
    /// backoff due, room under the respawn limit, running, nobody stopping it), so
    /// that restart needs no round trip to the runner.
    fn rearm(&mut self, s: &Settings) {
        let p = self.policy(s);
        let want = matches!(self.state, State::Starting | State::Up)
            && self.after_stop.is_none()
            && self.next_delay.is_zero()
            && self.recent_restarts(p.window) < p.limit;
        if self.armed == Some(want) {
            return;
        }
        self.armed = Some(want);
        if want {
            let normal_exit = self.rec.req.restart.normal_exit.clone().unwrap_or_default();
            self.send(ShimCommand::Arm { normal_exit });
        } else {
            self.send(ShimCommand::Disarm);
        }
    }

    fn crash(&mut self, reason: String) {
        self.state = State::Crashed;
        self.reason = Some(reason.clone());
        self.rec.crashed = Some(reason);
        self.save();
    }

    /// Writes a command to the shim straight from the actor (no task hop, so a
    /// restart goes out at once); queued until the shim's socket is connected.
    fn send(&mut self, c: ShimCommand) {
        if let Some(w) = &self.shim.writer {
            if write_line(w, &c).is_ok() {
                self.shim.stop_sent |= matches!(c, ShimCommand::Stop { .. });
                return;
            }
            self.shim.writer = None;
        }
        self.shim.pending.push(c);
    }

    fn save(&self) {
        if let Err(e) = write_json(&self.dir.join("instance.json"), &self.rec) {
            tracing::warn!(instance = %self.rec.id, "cannot save {}/instance.json: {e}", self.dir.display());
        }
    }

    /// Whether its shim runs: one this runner spawned and has not reaped yet, or
    /// the live `paddock-shim` named by `shim.pid` (an adopted one).
    fn shim_alive(&self) -> bool {
        self.spawned.get().is_some_and(|pid| !zombie_or_gone(pid)) || shim_alive(&self.dir)
    }

    /// The instance is stopped for good: recorded, with the time its
    /// directories become removable.
    fn mark_stopped(&mut self) {
        self.state = State::Stopped;
        self.pid = None;
        self.rec.running = false;
        self.rec.stopped_at = Some(now_ms());
        self.save();
    }
}

/// The actor's end of a shim's socket.
#[derive(Default)]
struct ShimLink {
    writer: Option<std::os::unix::net::UnixStream>,
    pending: Vec<ShimCommand>,
    /// A `Stop` went out on the current connection (a shim answers each `Stop`
    /// with a `Stopped`, so it is sent once per connection).
    stop_sent: bool,
}

/// One command line on a (non-blocking) unix socket; a full buffer is waited out
/// briefly (commands are tiny, so this practically never happens).
fn write_line(w: &std::os::unix::net::UnixStream, c: &ShimCommand) -> std::io::Result<()> {
    use std::io::Write;
    let mut line = serde_json::to_vec(c).expect("commands serialize");
    line.push(b'\n');
    let mut off = 0;
    let mut tries = 0;
    let mut w = w;
    while off < line.len() {
        match w.write(&line[off..]) {
            Ok(n) => off += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && tries < 500 => {
                tries += 1;
                std::thread::sleep(Duration::from_micros(100));
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn write_json<T: Serialize>(path: &Path, v: &T) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    std::io::Write::write_all(&mut f, &serde_json::to_vec_pretty(v).expect("serializes"))?;
    // Durable before it is visible: the data, then the rename, then the directory
    // entry (a crash leaves the old record or the new one, never an empty file).
    f.sync_all()?;
    std::fs::rename(tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

fn signal_named(name: &str) -> Result<i32, WireError> {
    let n = name.trim().to_ascii_uppercase();
    let full = if n.starts_with("SIG") {
        n
    } else {
        format!("SIG{n}")
    };
    full.parse::<nix::sys::signal::Signal>()
        .map(|s| s as i32)
        .map_err(|_| WireError::invalid(format!("`{name}` is not a signal name")))
}

/// The runner actor: every instance's state; shim events, health results and
/// requests are its messages.
pub struct Runner {
    settings: Settings,
    node: String,
    server: ServerHandle,
    hierarchy: cgroup::Hierarchy,
    shim_bin: PathBuf,
    instances: HashMap<String, Inst>,
    log_sink: bool,
}

impl Actor for Runner {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.adopt(ctx);
        let every = (self.settings.stopped_keep / 2)
            .clamp(Duration::from_millis(50), Duration::from_secs(60));
        ctx.run_interval(every, |act, _| act.sweep_stopped());
    }
}

#[derive(Message)]
#[rtype(result = "()")]
struct FromShim {
    id: String,
    ev: ShimEvent,
}

#[derive(Message)]
#[rtype(result = "()")]
struct ShimGone {
    id: String,
}

#[derive(Message)]
#[rtype(result = "()")]
struct ShimConnected {
    id: String,
    writer: std::os::unix::net::UnixStream,
}

#[derive(Message)]
#[rtype(result = "()")]
struct HealthResult {
    id: String,
    generation: u64,
    ok: Result<(), String>,
}

#[derive(Message)]
#[rtype(result = "Result<Value, WireError>")]
pub struct Call(pub paddock_wire::Envelope);

impl Runner {
    fn instance_dir(&self, id: &str) -> PathBuf {
        self.settings.instances_dir.join("instances").join(id)
    }

    /// Re-reads every instance directory: running shims are reconnected, dead
    /// shims of instances that should run are started again.
    fn adopt(&mut self, ctx: &mut Context<Self>) {
        let root = self.settings.instances_dir.join("instances");
        let Ok(rd) = std::fs::read_dir(&root) else {
            return;
        };
        for e in rd.flatten() {
            let dir = e.path();
            let Ok(rec) = std::fs::read(dir.join("instance.json"))
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<Record>(&b).map_err(|e| e.to_string()))
            else {
                continue;
            };
            let cg = self
                .hierarchy
                .create(&rec.id, &limits_of(&self.settings, &rec.req))
                .unwrap_or_default();
            let shim_alive = shim_alive(&dir);
            let id = rec.id.clone();
            let running = rec.running;
            let crashed = rec.crashed.clone();
            let mut inst = new_inst(rec, dir, cg);
            if !running {
                if shim_alive {
                    // A stop was asked for before the runner went away: finish it.
                    inst.begin_stop(&self.settings, AfterStop::Remove);
                    self.instances.insert(id.clone(), inst);
                    self.connect(ctx, &id);
                } else {
                    inst.state = State::Stopped;
                    if inst.rec.stopped_at.is_none() {
                        // Stopped by an older runner: its keep time starts now.
                        inst.rec.stopped_at = Some(now_ms());
                        inst.save();
                    }
                    inst.cgroup.remove();
                    self.instances.insert(id, inst);
                }
                continue;
            }
            if let Some(reason) = crashed {
                inst.state = State::Crashed;
                inst.reason = Some(reason);
                self.instances.insert(id.clone(), inst);
                if shim_alive {
                    self.connect(ctx, &id);
                }
                continue;
            }
            tracing::info!(instance = %id, shim_alive, "re-adopting instance");
            self.instances.insert(id.clone(), inst);
            if shim_alive {
                self.connect(ctx, &id);
            } else {
                self.spawn_shim(ctx, &id);
            }
        }
    }

    /// Forgets stopped instances `stopped_keep` after they stopped, with their
    /// directories (record, logs, home, tmp) and cgroups.
    fn sweep_stopped(&mut self) {
        let keep = self.settings.stopped_keep.as_millis() as i64;
        let now = now_ms();
        let old: Vec<String> = self
            .instances
            .values()
            .filter(|i| i.state == State::Stopped)
            .filter(|i| i.rec.stopped_at.is_some_and(|t| now - t >= keep))
            .filter(|i| !i.shim_alive())
            .map(|i| i.rec.id.clone())
            .collect();
        for id in old {
            let Some(inst) = self.instances.remove(&id) else {
                continue;
            };
            inst.cgroup.remove();
            for d in [inst.dir.clone(), self.settings.apps_dir.join(&id)] {
                if let Err(e) = std::fs::remove_dir_all(&d) {
                    if e.kind() != std::io::ErrorKind::NotFound {
                        tracing::warn!(instance = %id, "cannot remove {}: {e}", d.display());
                    }
                }
            }
            tracing::info!(instance = %id, "stopped instance removed");
        }
    }

    fn spawn_shim(&mut self, ctx: &mut Context<Self>, id: &str) {
        let Some(inst) = self.instances.get(id) else {
            return;
        };
        let dir = inst.dir.clone();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("shim.log"));
        let mut cmd = tokio::process::Command::new(&self.shim_bin);
        cmd.arg(&dir).stdin(std::process::Stdio::null());
        if let Ok(l) = log {
            if let Ok(l2) = l.try_clone() {
                cmd.stdout(l).stderr(l2);
            }
        }
        // Its own session: no signal to the runner's group (Ctrl-C, a supervisor's
        // stop) reaches the shim or the app.
        // SAFETY: setsid is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                nix::unistd::setsid()?;
                Ok(())
            });
        }
        let _ = std::fs::remove_file(dir.join("shim.sock"));
        match cmd.spawn() {
            Ok(mut child) => {
                let spawned = inst.spawned.clone();
                let pid = child.id().map(|p| p as i32);
                spawned.set(pid);
                // Reap it whenever it ends (a re-adopting runner is not its parent).
                actix_rt::spawn(async move {
                    let _ = child.wait().await;
                    if spawned.get() == pid {
                        spawned.set(None);
                    }
                });
                self.connect(ctx, id);
            }
            Err(e) => {
                let reason = format!("cannot start paddock-shim: {e}");
                tracing::error!(instance = %id, "{reason}");
                if let Some(i) = self.instances.get_mut(id) {
                    i.state = State::Crashed;
                    i.reason = Some(reason);
                }
            }
        }
    }

    /// Connects to the instance's shim socket (retrying while the shim starts)
    /// and relays its events to the actor until the socket closes.
    fn connect(&mut self, ctx: &mut Context<Self>, id: &str) {
        let Some(inst) = self.instances.get_mut(id) else {
            return;
        };
        inst.shim.writer = None;
        let sock = inst.dir.join("shim.sock");
        let (dir, spawned) = (inst.dir.clone(), inst.spawned.clone());
        let addr = ctx.address();
        let id = id.to_string();
        actix_rt::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(10);
            // Retried while the shim starts; given up at once when it has died
            // (an exiting shim closes its socket before it is a zombie).
            let alive =
                || spawned.get().is_some_and(|pid| !zombie_or_gone(pid)) || shim_alive(&dir);
            let stream = loop {
                match tokio::net::UnixStream::connect(&sock).await {
                    Ok(s) => break Some(s),
                    Err(_) if Instant::now() < deadline && alive() => {
                        tokio::time::sleep(Duration::from_millis(5)).await
                    }
                    Err(_) => break None,
                }
            };
            let split = stream.and_then(|s| {
                let std = s.into_std().ok()?;
                let writer = std.try_clone().ok()?;
                Some((tokio::net::UnixStream::from_std(std).ok()?, writer))
            });
            let Some((reader, writer)) = split else {
                addr.do_send(ShimGone { id });
                return;
            };
            addr.do_send(ShimConnected {
                id: id.clone(),
                writer,
            });
            let mut lines = BufReader::new(reader).lines();
            while let Ok(Some(l)) = lines.next_line().await {
                match serde_json::from_str::<ShimEvent>(&l) {
                    Ok(ev) => addr.do_send(FromShim { id: id.clone(), ev }),
                    Err(e) => tracing::warn!(instance = %id, "bad line from shim: {e}"),
                }
            }
            addr.do_send(ShimGone { id });
        });
    }

    fn check_for(req: &InstanceStart) -> health::Check {
        if let Some(p) = &req.health.http {
            health::Check::Http(p.clone())
        } else if req.health.none == Some(true) {
            health::Check::None
        } else {
            health::Check::Tcp
        }
    }

    /// Watches one start of the app: `starting` → `up` when healthy within the
    /// start timeout, then periodic liveness checks.
    fn watch_health(&self, ctx: &mut Context<Self>, id: &str) {
        let Some(inst) = self.instances.get(id) else {
            return;
        };
        let check = Self::check_for(&inst.rec.req);
        let port = inst.rec.port;
        let generation = inst.generation.get();
        let current = inst.generation.clone();
        let s = &self.settings;
        let start_timeout = ms_or(inst.rec.req.start_timeout_ms, s.start_timeout);
        let interval = ms_or(inst.rec.req.health_interval_ms, s.health_interval);
        let (failures, none_after) = (s.health_failures.max(1), s.none_up_after);
        let addr = ctx.address();
        let id = id.to_string();
        actix_rt::spawn(async move {
            let deadline = Instant::now() + start_timeout;
            let report = |ok| {
                addr.do_send(HealthResult {
                    id: id.clone(),
                    generation,
                    ok,
                })
            };
            if check == health::Check::None {
                tokio::time::sleep(none_after).await;
                report(Ok(()));
                return; // a worker without a port: its exits are its health
            }
            let mut last = String::new();
            let mut up = false;
            while Instant::now() < deadline && current.get() == generation {
                match health::probe(&check, port, Duration::from_secs(2)).await {
                    Ok(()) => {
                        up = true;
                        break;
                    }
                    Err(e) => last = e,
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            if !up {
                report(Err(format!("not healthy within {start_timeout:?}: {last}")));
                return;
            }
            report(Ok(()));
            let mut failed = 0;
            loop {
                tokio::time::sleep(interval).await;
                if current.get() != generation {
                    return; // that process is gone; a newer watcher has it
                }
                match health::probe(&check, port, Duration::from_secs(2)).await {
                    Ok(()) => failed = 0,
                    Err(e) => {
                        failed += 1;
                        if failed >= failures {
                            report(Err(format!("{failed} liveness checks failed: {e}")));
                            return;
                        }
                    }
                }
            }
        });
    }

    fn on_event(&mut self, ctx: &mut Context<Self>, id: &str, ev: ShimEvent) {
        match ev {
            ShimEvent::Hello {
                pid,
                started_ns,
                last_exit,
            } => {
                let stop = self.stop_signal_of(id);
                let Some(inst) = self.instances.get_mut(id) else {
                    return;
                };
                if inst.state == State::Stopping {
                    // A stop may have been lost with the old connection: ask again
                    // (a shim with no app answers `Stopped` at once), unless this
                    // connection already carried it.
                    if !inst.shim.stop_sent {
                        let (sig, grace_ms) = stop;
                        inst.send(ShimCommand::Stop { sig, grace_ms });
                    }
                    return;
                }
                match pid {
                    Some(p) => {
                        // It may have ended and been restarted by its armed shim
                        // while no runner listened.
                        if let Some(e) = last_exit.filter(|e| inst.last_exit.as_ref() != Some(e)) {
                            if e.restarted {
                                inst.rec.restarts += 1;
                                inst.save();
                            }
                            inst.last_exit = Some(e);
                        }
                        inst.pid = Some(p);
                        inst.started_ms = started_ns.map(|n| n / 1_000_000);
                        if !matches!(inst.state, State::Stopped | State::Crashed) {
                            inst.state = State::Starting;
                            inst.bump();
                            self.watch_health(ctx, id);
                        }
                    }
                    None => {
                        // The exit we already handled is not news.
                        if let Some(e) = last_exit.filter(|e| inst.last_exit.as_ref() != Some(e)) {
                            if !matches!(inst.state, State::Stopped | State::Crashed) {
                                self.on_exit(ctx, id, e);
                            }
                        }
                    }
                }
            }
            ShimEvent::Started { pid, started_ns } => {
                let Some(inst) = self.instances.get_mut(id) else {
                    return;
                };
                inst.pid = Some(pid);
                inst.started_ms = Some(started_ns / 1_000_000);
                tracing::info!(instance = %id, pid, "started");
                if inst.state == State::Stopping {
                    return; // a stop is in flight; the new process goes with it
                }
                inst.state = State::Starting;
                inst.bump();
                let s = self.settings.clone();
                inst.rearm(&s);
                self.watch_health(ctx, id);
            }
            ShimEvent::Exited(e) => self.on_exit(ctx, id, e),
            ShimEvent::Log { ts, stream, line } => {
                if self.log_sink {
                    if let Some(inst) = self.instances.get(id) {
                        self.server.push_to(
                            "logs",
                            kinds::LOG_LINE,
                            json!({"app": inst.rec.req.app, "proc": inst.rec.req.proc, "instance": id,
                                   "node": self.node, "ts": ts, "stream": stream, "line": line}),
                        );
                    }
                }
            }
            ShimEvent::Stopped => {
                let Some(inst) = self.instances.get_mut(id) else {
                    return;
                };
                if inst.state != State::Stopping {
                    // An answer to a stop already handled (sent twice across a
                    // reconnection): not news.
                    return;
                }
                inst.pid = None;
                inst.bump();
                match inst.after_stop.take() {
                    Some(AfterStop::Start) => {
                        inst.rec.restarts += 1;
                        inst.state = State::Starting;
                        inst.save();
                        inst.send(ShimCommand::Start);
                    }
                    Some(AfterStop::Crash) => {
                        let reason = inst.reason.clone().unwrap_or_else(|| "gave up".into());
                        inst.crash(reason);
                        let info = inst.info(&self.node);
                        self.server
                            .publish(kinds::INSTANCE_CRASHED, kinds::to_body(&info));
                    }
                    Some(AfterStop::Remove) | None => {
                        inst.mark_stopped();
                        inst.send(ShimCommand::Exit);
                        inst.cgroup.remove();
                        tracing::info!(instance = %id, "stopped");
                    }
                }
            }
            ShimEvent::Error { message } => tracing::warn!(instance = %id, "shim: {message}"),
        }
    }

    fn on_exit(&mut self, ctx: &mut Context<Self>, id: &str, e: ExitInfo) {
        let s = self.settings.clone();
        let Some(inst) = self.instances.get_mut(id) else {
            return;
        };
        let uptime = inst
            .started_ms
            .map(|st| (e.at - st).max(0) as u64)
            .unwrap_or(0);
        inst.pid = None;
        inst.started_ms = None;
        inst.bump(); // stop health checks of the dead process
        inst.last_exit = Some(e.clone());
        tracing::info!(instance = %id, "exited: {}", e.describe());
        if matches!(inst.state, State::Stopping | State::Stopped) || inst.after_stop.is_some() {
            return; // asked for; `Stopped` follows
        }
        let down = inst.info(&self.node);
        self.server
            .publish(kinds::INSTANCE_DOWN, kinds::to_body(&down));
        let Some(inst) = self.instances.get_mut(id) else {
            return;
        };
        let normal = inst.rec.req.restart.normal_exit.clone().unwrap_or_default();
        if let Some(code) = e.code {
            if normal.contains(&code) {
                inst.reason = Some(format!("exited normally ({})", e.describe()));
                inst.mark_stopped();
                inst.send(ShimCommand::Exit);
                return;
            }
        }
        let Policy {
            base, cap, reset, ..
        } = inst.policy(&s);
        if Duration::from_millis(uptime) >= reset {
            inst.next_delay = Duration::ZERO;
        }
        if let Err(reason) = inst.count_restart(&s, &e.describe()) {
            tracing::warn!(instance = %id, "crashed: {reason}");
            if e.restarted {
                // Armed a moment too early: take the new process down again.
                inst.reason = Some(reason);
                inst.begin_stop(&s, AfterStop::Crash);
                return;
            }
            inst.crash(reason);
            let info = inst.info(&self.node);
            self.server
                .publish(kinds::INSTANCE_CRASHED, kinds::to_body(&info));
            return;
        }
        let delay = inst.next_delay;
        inst.next_delay = (delay * 2).max(base).min(cap);
        inst.rec.restarts += 1;
        if e.restarted {
            // The armed shim already started it again (its `Started` follows).
            inst.armed = Some(false);
            inst.state = State::Starting;
            inst.save();
            return;
        }
        inst.save();
        if delay.is_zero() {
            inst.state = State::Starting;
            inst.send(ShimCommand::Start);
        } else {
            inst.state = State::Backoff;
            inst.reason = Some(format!("restarting in {delay:?} after {}", e.describe()));
            let id = id.to_string();
            let generation = inst.generation.get();
            ctx.run_later(delay, move |act, _| {
                if let Some(i) = act.instances.get_mut(&id) {
                    if i.state == State::Backoff && i.generation.get() == generation {
                        i.state = State::Starting;
                        i.send(ShimCommand::Start);
                    }
                }
            });
        }
    }

    fn start_instance(
        &mut self,
        ctx: &mut Context<Self>,
        req: InstanceStart,
    ) -> Result<Value, WireError> {
        if !users::valid_app(&req.app) {
            return Err(WireError::invalid(
                "`app` must be 1-28 characters of [a-z0-9-], starting with a letter",
            ));
        }
        if !users::valid_proc(&req.proc) {
            return Err(WireError::invalid(
                "`proc` must be 1-30 characters of [a-z0-9_-]",
            ));
        }
        match (&req.argv, req.command.trim().is_empty()) {
            (Some(a), true) if !a.is_empty() && !a[0].is_empty() => {}
            (None, false) => {}
            _ => {
                return Err(WireError::invalid(
                    "give either `command` (a Procfile line) or `argv` (a non-empty list)",
                ))
            }
        }
        // Both signal names must be valid now, not when they are needed.
        signal_named(req.stop_signal.as_deref().unwrap_or("TERM"))?;
        signal_named(req.reload_signal.as_deref().unwrap_or("HUP"))?;
        let dir = PathBuf::from(&req.dir);
        if !dir.is_absolute() {
            return Err(WireError::invalid("`dir` must be an absolute path"));
        }
        let (uid, gid) = users::ensure_user(&req.app).map_err(WireError::internal)?;
        users::check_readable_dir(&dir, uid, gid).map_err(WireError::invalid)?;
        let port = self
            .free_port()
            .ok_or_else(|| WireError::unavailable("no free port left in the runner's range"))?;
        let id = format!(
            "{}-{}-{}",
            req.app,
            req.proc,
            &ulid::Ulid::new().to_string().to_lowercase()[16..]
        );
        let idir = self.instance_dir(&id);
        let home = self.settings.apps_dir.join(&id).join("home");
        let tmp = self.settings.apps_dir.join(&id).join("tmp");
        let mk = |d: &Path, owner: Option<(u32, u32)>| -> Result<(), WireError> {
            use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(d)
                .map_err(|e| WireError::internal(format!("cannot create {}: {e}", d.display())))?;
            if let Some((u, g)) = owner {
                std::os::unix::fs::chown(d, Some(u), Some(g))
                    .map_err(|e| WireError::internal(format!("chown {}: {e}", d.display())))?;
            } else {
                let _ = std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700));
            }
            Ok(())
        };
        mk(&idir, None)?;
        {
            // Root-owned, searchable: the app's user reaches only its own home and tmp.
            use std::os::unix::fs::PermissionsExt;
            let base = self.settings.apps_dir.join(&id);
            std::fs::create_dir_all(&base).map_err(|e| {
                WireError::internal(format!("cannot create {}: {e}", base.display()))
            })?;
            let _ = std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o711));
        }
        mk(&home, Some((uid, gid)))?;
        mk(&tmp, Some((uid, gid)))?;
        // The app's user must reach its home through apps_dir.
        users::check_readable_dir(&home, uid, gid).map_err(|e| {
            WireError::internal(format!(
                "apps_dir {} is not usable: {e}",
                self.settings.apps_dir.display()
            ))
        })?;
        let cg = self
            .hierarchy
            .create(&id, &limits_of(&self.settings, &req))
            .map_err(|e| WireError::internal(format!("cannot create cgroups: {e}")))?;
        let mut env: BTreeMap<String, String> = BTreeMap::new();
        env.insert("PATH".into(), "/usr/local/bin:/usr/bin:/bin".into());
        env.insert("LANG".into(), "C.UTF-8".into());
        env.extend(req.env.clone());
        env.insert("HOME".into(), home.display().to_string());
        env.insert("TMPDIR".into(), tmp.display().to_string());
        env.insert("PORT".into(), port.to_string());
        env.insert("PADDOCK_APP".into(), req.app.clone());
        env.insert("PADDOCK_PROC".into(), req.proc.clone());
        env.insert("PADDOCK_INSTANCE".into(), id.clone());
        let shim_spec = ShimSpec {
            id: id.clone(),
            command: req.command.clone(),
            argv: req.argv.clone(),
            dir: dir.clone(),
            env,
            uid,
            gid,
            nofile: req.limits.nofile.unwrap_or(self.settings.nofile),
            // Per user, so across all of this app's instances on the node; the
            // exact per-instance bound is the pids cgroup.
            nproc: Some(
                limits_of(&self.settings, &req)
                    .pids
                    .unwrap_or(self.settings.pids)
                    * 8,
            ),
            cgroup_procs: cg.procs.clone(),
            shim_cgroup_procs: cg.shim_procs.clone(),
            late_cgroup_procs: cg.late_procs.clone(),
            cgroup_kill: cg.kill.clone(),
            oom_counter: cg.oom_counter.clone(),
            log_file: idir.join("app.log"),
            log_max_bytes: self.settings.log_max_bytes,
        };
        write_json(&idir.join("spec.json"), &shim_spec)
            .map_err(|e| WireError::internal(format!("cannot write spec: {e}")))?;
        let rec = Record {
            id: id.clone(),
            req,
            port,
            uid,
            gid,
            created: now_ms(),
            running: true,
            restarts: 0,
            crashed: None,
            stopped_at: None,
        };
        let inst = new_inst(rec, idir, cg);
        inst.save();
        self.instances.insert(id.clone(), inst);
        self.spawn_shim(ctx, &id);
        tracing::info!(instance = %id, port, "instance started");
        Ok(kinds::to_body(&InstanceStarted { id, port }))
    }

    fn free_port(&self) -> Option<u16> {
        let used: Vec<u16> = self
            .instances
            .values()
            .filter(|i| i.state != State::Stopped)
            .map(|i| i.rec.port)
            .collect();
        let span = (self.settings.port_max - self.settings.port_min) as u32 + 1;
        let offset = rand_u32() % span;
        (0..span)
            .map(|i| self.settings.port_min + ((offset + i) % span) as u16)
            .find(|p| !used.contains(p) && std::net::TcpListener::bind(("0.0.0.0", *p)).is_ok())
    }

    fn get(&mut self, id: &str) -> Result<&mut Inst, WireError> {
        self.instances.get_mut(id).ok_or_else(|| {
            WireError::new(Code::NotFound, format!("no instance `{id}` on this runner"))
        })
    }

    fn stop_signal_of(&self, id: &str) -> (i32, u64) {
        self.instances
            .get(id)
            .map(|i| Self::stop_signal(i, &self.settings))
            .unwrap_or((15, 10_000))
    }

    fn stop_signal(inst: &Inst, s: &Settings) -> (i32, u64) {
        let sig = signal_named(inst.rec.req.stop_signal.as_deref().unwrap_or("TERM")).unwrap_or(15);
        let grace = inst
            .rec
            .req
            .stop_grace_ms
            .unwrap_or(s.stop_grace.as_millis() as u64);
        (sig, grace)
    }

    fn handle_call(
        &mut self,
        ctx: &mut Context<Self>,
        env: paddock_wire::Envelope,
    ) -> Result<Value, WireError> {
        let s = self.settings.clone();
        match env.kind.as_str() {
            kinds::INSTANCE_START => self.start_instance(ctx, body(&env)?),
            kinds::INSTANCE_STOP => {
                let req: InstanceId = body(&env)?;
                let inst = self.get(&req.id)?;
                if inst.state == State::Stopped {
                    return Ok(json!({"state": "stopped"}));
                }
                // The intent is on disk first: a runner restarted mid-stop finishes it.
                inst.rec.running = false;
                inst.save();
                if !inst.shim_alive() {
                    // Nothing left to stop (its shim is gone).
                    inst.mark_stopped();
                    inst.bump();
                    inst.cgroup.remove();
                    return Ok(json!({"state": "stopped"}));
                }
                inst.begin_stop(&s, AfterStop::Remove);
                Ok(json!({"state": "stopping"}))
            }
            kinds::INSTANCE_RESTART => {
                let req: InstanceId = body(&env)?;
                let inst = self.get(&req.id)?;
                if inst.state == State::Stopped {
                    return Err(WireError::new(
                        Code::Conflict,
                        format!("instance `{}` is stopped; start a new one", req.id),
                    ));
                }
                inst.recent.clear();
                inst.next_delay = Duration::ZERO;
                inst.reason = None;
                inst.rec.crashed = None;
                inst.bump();
                if !inst.shim_alive() {
                    // Its shim died: a fresh shim starts the app.
                    inst.state = State::Starting;
                    inst.rec.restarts += 1;
                    inst.save();
                    self.spawn_shim(ctx, &req.id);
                    return Ok(json!({"state": "restarting"}));
                }
                inst.save();
                inst.begin_stop(&s, AfterStop::Start);
                Ok(json!({"state": "restarting"}))
            }
            kinds::INSTANCE_RELOAD => {
                let req: InstanceId = body(&env)?;
                let inst = self.get(&req.id)?;
                let sig = signal_named(inst.rec.req.reload_signal.as_deref().unwrap_or("HUP"))?;
                if inst.pid.is_none() {
                    return Err(WireError::new(
                        Code::Conflict,
                        format!("instance `{}` is not running", req.id),
                    ));
                }
                inst.send(ShimCommand::Signal { sig });
                Ok(json!({"signal": sig}))
            }
            kinds::INSTANCE_LIST => {
                let mut v: Vec<InstanceInfo> = self
                    .instances
                    .values()
                    .map(|i| i.info(&self.node))
                    .collect();
                v.sort_by(|a, b| a.id.cmp(&b.id));
                Ok(kinds::to_body(&InstanceList { instances: v }))
            }
            kinds::INSTANCE_LOGS => {
                let req: InstanceLogs = body(&env)?;
                let inst = self.get(&req.id)?;
                Ok(kinds::to_body(&LogLines {
                    lines: tail_log(&inst.dir.join("app.log"), req.lines.min(10_000)),
                }))
            }
            other => Err(WireError::new(
                Code::UnknownKind,
                format!("runner does not handle `{other}`"),
            )),
        }
    }
}

/// Whether the instance's shim is running: the pid in `shim.pid` must be a live
/// `paddock-shim` serving this very directory (pids are reused after a reboot).
fn shim_alive(dir: &Path) -> bool {
    let Some(pid) = std::fs::read_to_string(dir.join("shim.pid"))
        .ok()
        .and_then(|p| p.trim().parse::<i32>().ok())
    else {
        return false;
    };
    let zombie = zombie_or_gone(pid);
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let cmdline = String::from_utf8_lossy(&cmdline);
    !zombie && cmdline.contains("paddock-shim") && cmdline.contains(&*dir.to_string_lossy())
}

/// Whether process `pid` has ended (reaped, or a zombie waiting to be).
fn zombie_or_gone(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.contains(") Z "))
        .unwrap_or(true)
}

fn rand_u32() -> u32 {
    let mut b = [0u8; 4];
    let _ = getrandom(&mut b);
    u32::from_le_bytes(b)
}

fn getrandom(b: &mut [u8]) -> std::io::Result<()> {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")?.read_exact(b)
}

/// A request's optional milliseconds, else the runner's default.
fn ms_or(v: Option<u64>, default: Duration) -> Duration {
    v.map(Duration::from_millis).unwrap_or(default)
}

fn limits_of(s: &Settings, req: &InstanceStart) -> cgroup::Limits {
    cgroup::Limits {
        memory_mb: req.limits.memory_mb.or(s.memory_mb),
        pids: Some(req.limits.pids.unwrap_or(s.pids)),
        cpu_weight: req.limits.cpu_weight,
    }
}

fn new_inst(rec: Record, dir: PathBuf, cg: cgroup::InstanceCgroup) -> Inst {
    Inst {
        rec,
        dir,
        state: State::Starting,
        pid: None,
        started_ms: None,
        recent: VecDeque::new(),
        next_delay: Duration::ZERO,
        last_exit: None,
        reason: None,
        generation: Rc::new(Cell::new(0)),
        shim: ShimLink::default(),
        spawned: Rc::new(Cell::new(None)),
        armed: None,
        after_stop: None,
        cgroup: cg,
    }
}

/// The last `n` lines of an instance's log (the rotated file first when needed).
fn tail_log(path: &Path, n: usize) -> Vec<LogLine> {
    let mut lines: Vec<LogLine> = Vec::new();
    for p in [path.with_extension("log.1"), path.to_path_buf()] {
        if let Ok(text) = std::fs::read_to_string(&p) {
            lines.extend(text.lines().filter_map(|l| serde_json::from_str(l).ok()));
        }
    }
    let skip = lines.len().saturating_sub(n);
    lines.split_off(skip)
}

impl Handler<FromShim> for Runner {
    type Result = ();
    fn handle(&mut self, m: FromShim, ctx: &mut Context<Self>) {
        self.on_event(ctx, &m.id, m.ev);
    }
}

impl Handler<ShimConnected> for Runner {
    type Result = ();
    fn handle(&mut self, m: ShimConnected, _: &mut Context<Self>) {
        let Some(inst) = self.instances.get_mut(&m.id) else {
            return;
        };
        inst.shim.writer = Some(m.writer);
        inst.shim.stop_sent = false;
        for c in std::mem::take(&mut inst.shim.pending) {
            inst.send(c);
        }
    }
}

impl Handler<ShimGone> for Runner {
    type Result = ();
    fn handle(&mut self, m: ShimGone, ctx: &mut Context<Self>) {
        let Some(inst) = self.instances.get_mut(&m.id) else {
            return;
        };
        inst.shim.writer = None;
        if inst.shim_alive() && inst.state != State::Stopped {
            // Only the connection broke (the shim drops a runner that stops
            // reading): connect again; the shim's Hello brings us up to date.
            tracing::warn!(instance = %m.id, "lost the shim's socket; reconnecting");
            self.connect(ctx, &m.id);
            return;
        }
        inst.shim.pending.clear();
        if inst.state == State::Stopped {
            // The shim left its cgroups when it exited: now they can go.
            inst.cgroup.remove();
        } else {
            // The shim died (or was killed): what it held goes with it. Only the
            // cgroup: the runner's own descendants are every other shim.
            shim::kill_cgroup(inst.cgroup.kill.as_ref());
            inst.bump();
            inst.pid = None;
            inst.crash("its paddock-shim ended unexpectedly".into());
            tracing::warn!(instance = %m.id, "shim gone; instance crashed");
            let info = inst.info(&self.node);
            self.server
                .publish(kinds::INSTANCE_CRASHED, kinds::to_body(&info));
        }
    }
}

impl Handler<HealthResult> for Runner {
    type Result = ();
    fn handle(&mut self, m: HealthResult, ctx: &mut Context<Self>) {
        let s = self.settings.clone();
        let Some(inst) = self.instances.get_mut(&m.id) else {
            return;
        };
        if inst.generation.get() != m.generation {
            return;
        }
        match m.ok {
            Ok(()) => {
                if inst.state == State::Starting {
                    inst.state = State::Up;
                    inst.reason = None;
                    // After a stable run the backoff resets (and the shim is armed).
                    let reset = inst.policy(&s).reset;
                    let (id, generation) = (m.id.clone(), m.generation);
                    ctx.run_later(reset, move |act, _| {
                        let s = act.settings.clone();
                        if let Some(i) = act.instances.get_mut(&id) {
                            if i.state == State::Up && i.generation.get() == generation {
                                i.next_delay = Duration::ZERO;
                                i.rearm(&s);
                            }
                        }
                    });
                    inst.rearm(&s);
                    tracing::info!(instance = %m.id, "up");
                    let info = inst.info(&self.node);
                    self.server
                        .publish(kinds::INSTANCE_UP, kinds::to_body(&info));
                }
            }
            Err(reason) => {
                // Only a running instance nobody is stopping is restarted for health.
                if !matches!(inst.state, State::Starting | State::Up) || inst.after_stop.is_some() {
                    return;
                }
                let then = match inst.count_restart(&s, &reason) {
                    Ok(()) => {
                        tracing::warn!(instance = %m.id, "health: {reason}; restarting");
                        inst.reason = Some(reason);
                        AfterStop::Start
                    }
                    Err(limit) => {
                        tracing::warn!(instance = %m.id, "health: {reason}; giving up: {limit}");
                        inst.reason = Some(format!("{limit} (health: {reason})"));
                        AfterStop::Crash
                    }
                };
                inst.begin_stop(&s, then);
            }
        }
    }
}

impl Handler<Call> for Runner {
    type Result = Result<Value, WireError>;
    fn handle(&mut self, m: Call, ctx: &mut Context<Self>) -> Self::Result {
        if m.0.kind.starts_with("run.") {
            return Err(WireError::internal("run.* is handled by the PTY relay"));
        }
        self.handle_call(ctx, m.0)
    }
}

pub async fn setup(ctx: Ctx) -> anyhow::Result<Routes> {
    let cfg = ctx.config();
    let settings = Settings::from_config(&cfg)?;
    for d in [&settings.instances_dir, &settings.apps_dir] {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o711)
            .create(d)?;
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o711))?;
    }
    std::fs::create_dir_all(settings.instances_dir.join("instances"))?;
    let hierarchy = cgroup::Hierarchy::detect(&settings.cgroup_root);
    tracing::info!(
        cgroups = hierarchy.name(),
        "runner ready to place instances"
    );
    let shim_bin = std::env::current_exe()?
        .parent()
        .map(|p| p.join("paddock-shim"))
        .filter(|p| p.exists())
        .ok_or_else(|| anyhow::anyhow!("paddock-shim not found next to paddock-runner"))?;
    let log_sink = cfg
        .file
        .daemons
        .get("runner")
        .and_then(|d| d.endpoint("log_sink"))
        .is_some();
    let pty = pty::Runs::new(
        settings.apps_dir.clone(),
        hierarchy.clone(),
        pty::Defaults {
            nofile: settings.nofile,
            pids: settings.pids,
            memory_mb: settings.memory_mb,
        },
    );
    let runner = Runner {
        settings,
        node: cfg.node().to_string(),
        server: ctx.server().clone(),
        hierarchy,
        shim_bin,
        instances: HashMap::new(),
        log_sink,
    }
    .start();
    let kinds = [
        kinds::INSTANCE_START,
        kinds::INSTANCE_STOP,
        kinds::INSTANCE_RESTART,
        kinds::INSTANCE_RELOAD,
        kinds::INSTANCE_LOGS,
        kinds::INSTANCE_LIST,
    ];
    pty::routes(Routes::new().forward(&kinds, runner, Call), pty)
}
