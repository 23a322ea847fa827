//! The runner actor: thin glue around each instance's [`Machine`]. It turns
//! requests, shim lines, health results and timers into events, and the machine's
//! effects into I/O (the shim's socket, the record on disk, PUB events, cgroups,
//! tasks). No instance state is changed here except through `Machine::step`.

use std::cell::Cell;
use std::collections::HashMap;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use paddock_daemon::body;
use paddock_wire::kinds::{
    self, InstanceId, InstanceInfo, InstanceList, InstanceLogs, InstanceStart, InstanceStarted,
    LastExit, LogLines, RunnerInfo,
};
use paddock_wire::{now_ms, Code, ServerHandle, WireError};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::link::{self, ShimLink, Writer};
use crate::machine::{Effect, Event, Machine, Now, Policy, State};
use crate::provision::{self, signal_named};
use crate::settings::Settings;
use crate::shim_proto::{ShimCommand, ShimEvent, SHIM_PROTO};
use crate::store::{self, AppSpec, Record};
use crate::{cgroup, health, shim};

/// One instance: its record, its state machine, and the actor's handles on it.
struct Inst {
    rec: Record,
    dir: PathBuf,
    m: Machine,
    policy: Policy,
    link: ShimLink,
    /// The machine's generation, shared with health watchers so that the watcher
    /// of a process that is gone stands down.
    generation: Rc<Cell<u64>>,
    /// The shim this runner spawned, from the moment of spawn until it is reaped:
    /// a shim counts as alive before it has written `shim.pid`, so a stop or a
    /// restart right after a start finds it.
    spawned: Rc<Cell<Option<i32>>>,
    cgroup: cgroup::InstanceCgroup,
    /// The current connection to the shim: its number (messages of an older
    /// connection are ignored) and its task (aborted when a new one starts, so
    /// only one connection per instance is ever being made or read).
    conn: u64,
    conn_task: Option<tokio::task::JoinHandle<()>>,
}

impl Inst {
    fn new(rec: Record, dir: PathBuf, cgroup: cgroup::InstanceCgroup, s: &Settings) -> Inst {
        Inst {
            m: Machine::new(
                rec.running,
                rec.restarts,
                rec.crashed.clone(),
                rec.stopped_at,
            ),
            policy: policy(s, &rec.spec),
            rec,
            dir,
            link: ShimLink::default(),
            generation: Rc::new(Cell::new(0)),
            spawned: Rc::new(Cell::new(None)),
            cgroup,
            conn: 0,
            conn_task: None,
        }
    }

    fn shim_alive(&self) -> bool {
        self.spawned
            .get()
            .is_some_and(|pid| !link::zombie_or_gone(pid))
            || link::shim_alive(&self.dir)
    }

    fn save(&mut self) {
        self.rec.running = self.m.running;
        self.rec.restarts = self.m.restarts;
        self.rec.crashed = self.m.crashed.clone();
        self.rec.stopped_at = self.m.stopped_at;
        if let Err(e) = store::save(&self.dir, &self.rec) {
            tracing::warn!(
                "cannot save {}/instance.json: {}",
                self.dir.display(),
                crate::chain(&e)
            );
        }
    }

    fn info(&self, node: &str, s: &Settings) -> InstanceInfo {
        let m = &self.m;
        InstanceInfo {
            addr: addr_of(s, self.rec.port),
            release: self.rec.spec.release.as_ref().map(|r| r.version),
            token: self.rec.token,
            up_at: m.up_at,
            owner: self.rec.owner,
            memory_mb: self.memory_mb(s),
            id: self.rec.id.clone(),
            app: self.rec.spec.app.clone(),
            proc: self.rec.spec.proc.clone(),
            pid: m.pid,
            port: self.rec.port,
            state: m.state.as_str().into(),
            restarts: m.restarts,
            uptime_ms: match (m.state, m.started_ms) {
                (State::Starting | State::Up, Some(s)) => now_ms().saturating_sub(s).max(0) as u64,
                _ => 0,
            },
            last_exit: m.last_exit.as_ref().map(|e| LastExit {
                code: e.code,
                signal: e.signal,
                oom: e.oom,
                at: e.at,
                reason: e.describe(),
            }),
            node: node.to_string(),
            reason: m.reason.clone(),
        }
    }

    /// Its memory limit (the request's, else the runner's default).
    fn memory_mb(&self, s: &Settings) -> Option<u64> {
        provision::limits_of(s, &self.rec.spec).memory_mb
    }

    /// The answer its start got (and a resend of that start gets).
    fn started(&self, s: &Settings) -> Value {
        kinds::to_body(&InstanceStarted {
            id: self.rec.id.clone(),
            port: self.rec.port,
            addr: addr_of(s, self.rec.port),
        })
    }

    fn span(&self) -> tracing::Span {
        tracing::info_span!("instance", instance = %self.rec.id, app = %self.rec.spec.app)
    }
}

/// `IP:PORT` at the node's advertised address; None without a port.
fn addr_of(s: &Settings, port: u16) -> Option<String> {
    (port != 0).then(|| std::net::SocketAddr::new(s.advertise, port).to_string())
}

/// The instance's restart and stop rules: its request's, else the runner's.
fn policy(s: &Settings, spec: &AppSpec) -> Policy {
    let r = &spec.restart;
    let ms = |v: Option<u64>, d: Duration| v.map(Duration::from_millis).unwrap_or(d);
    Policy {
        limit: r.limit.unwrap_or(s.restart_limit),
        window: ms(r.window_ms, s.restart_window),
        base: ms(r.backoff_base_ms, s.backoff_base),
        cap: ms(r.backoff_cap_ms, s.backoff_cap),
        reset: ms(r.reset_after_ms, s.backoff_reset),
        normal_exit: r.normal_exit.clone().unwrap_or_default(),
        // Checked when the instance was started.
        stop_signal: signal_named(spec.stop_signal.as_deref().unwrap_or("TERM")).unwrap_or(15),
        stop_grace_ms: spec
            .stop_grace_ms
            .unwrap_or(s.stop_grace.as_millis() as u64),
    }
}

pub struct Runner {
    pub settings: Settings,
    pub node: String,
    pub server: ServerHandle,
    pub hierarchy: cgroup::Hierarchy,
    pub shim_bin: PathBuf,
    instances: HashMap<String, Inst>,
    /// Apps `app.purge` was asked for while instances still ran: purged once
    /// every one has stopped.
    purging: std::collections::BTreeSet<String>,
    /// The largest fencing token accepted (as in `fence.json`), or why the
    /// file could not be read (then every fenced request is refused).
    max_token: Result<Option<u64>, String>,
    /// When a scheduler last reached this runner: a fenced call accepted, or an
    /// `instance.list` carrying a token not stale. Counted from the runner's
    /// start (a restarted runner gives its instances the whole grace again).
    scheduler_contact: std::time::Instant,
}

impl Runner {
    pub fn new(
        settings: Settings,
        node: String,
        server: ServerHandle,
        hierarchy: cgroup::Hierarchy,
        shim_bin: PathBuf,
    ) -> Runner {
        Runner {
            node,
            server,
            hierarchy,
            shim_bin,
            scheduler_contact: std::time::Instant::now(),
            max_token: store::load_fence(&settings.instances_dir).map_err(|e| {
                let why = crate::chain(&e);
                tracing::error!(
                    "{why}; requests with a fencing token are refused until the file is fixed or removed"
                );
                why
            }),
            instances: HashMap::new(),
            purging: Default::default(),
            settings,
        }
    }
}

impl Actor for Runner {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.adopt(ctx);
        let every = (self.settings.stopped_keep / 2)
            .clamp(Duration::from_millis(50), Duration::from_secs(60));
        ctx.run_interval(every, |act, _| act.sweep_stopped());
        ctx.run_interval(Duration::from_secs(600), |act, _| act.sweep_slugs());
        ctx.run_interval(Duration::from_millis(500), |act, ctx| {
            act.stop_disconnected(ctx)
        });
        ctx.run_interval(Duration::from_millis(200), |act, ctx| {
            let apps: Vec<String> = act.purging.iter().cloned().collect();
            for app in apps {
                match act.purge_app(ctx, &app) {
                    Ok(v) if v["purged"] == false => {}
                    Ok(_) => {
                        act.purging.remove(&app);
                    }
                    Err(e) => {
                        // Asked again by the next app.purge (the api's destroy).
                        tracing::warn!(app = %app, "purge not finished: {}", e.message);
                        act.purging.remove(&app);
                    }
                }
            }
        });
    }
}

#[derive(Message)]
#[rtype(result = "()")]
struct FromShim {
    id: String,
    conn: u64,
    ev: ShimEvent,
}

#[derive(Message)]
#[rtype(result = "()")]
struct ShimGone {
    id: String,
    conn: u64,
}

#[derive(Message)]
#[rtype(result = "()")]
struct ShimConnected {
    id: String,
    conn: u64,
    writer: std::os::unix::net::UnixStream,
}

#[derive(Message)]
#[rtype(result = "()")]
struct HealthResult {
    id: String,
    generation: u64,
    ok: Result<(), health::Unhealthy>,
}

#[derive(Message)]
#[rtype(result = "Result<Value, WireError>")]
pub struct Call(pub paddock_wire::Envelope);

/// `instance.start` in the release form, once its slug is unpacked on this node
/// and the request completed from the release (`dir` `/app`, command, config).
/// `request`: the fingerprint of the body as it came.
#[derive(Message)]
#[rtype(result = "Result<Value, WireError>")]
pub struct StartRelease {
    pub req: InstanceStart,
    pub release: store::ReleaseSpec,
    pub request: String,
}

/// Before a release-form start fetches anything: whether its token is stale or
/// its id taken by another start (an error), a resend of a start already done
/// (`Some`: that start's answer), or new (`None`).
#[derive(Message)]
#[rtype(result = "Result<Option<Value>, WireError>")]
pub struct Admit {
    pub body: Value,
}

/// The parts of a start body the admission looks at.
#[derive(serde::Deserialize)]
struct StartKey {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    token: Option<u64>,
}

impl Runner {
    /// The one way an instance's state changes: its machine steps, then the
    /// effects are carried out in order.
    fn step(&mut self, ctx: &mut Context<Self>, id: &str, ev: Event) {
        let Some(inst) = self.instances.get_mut(id) else {
            return;
        };
        let span = inst.span();
        let _enter = span.enter();
        let effects = inst.m.step(ev, Now::current(), &inst.policy);
        inst.generation.set(inst.m.generation);
        for e in effects {
            self.apply(ctx, id, e);
        }
    }

    fn apply(&mut self, ctx: &mut Context<Self>, id: &str, e: Effect) {
        let Some(inst) = self.instances.get_mut(id) else {
            return;
        };
        match e {
            Effect::Send(c) => inst.link.send(c),
            Effect::Save => inst.save(),
            Effect::Publish(kind) => {
                let info = inst.info(&self.node, &self.settings);
                self.server.publish(kind, kinds::to_body(&info));
            }
            Effect::WatchHealth { generation } => self.watch_health(ctx, id, generation),
            Effect::After { delay, event } => {
                let id = id.to_string();
                ctx.run_later(delay, move |act, ctx| act.step(ctx, &id, *event));
            }
            Effect::SpawnShim => self.spawn_shim(ctx, id),
            Effect::Connect => self.connect(ctx, id),
            Effect::ForgetPending => inst.link.forget_pending(),
            Effect::KillCgroup => {
                shim::kill_cgroup(inst.cgroup.kill.as_ref());
                // On v1 a process the app forked before it joined the freezer is
                // only in the instance's other cgroups; its shim is gone (this
                // effect follows a shim's death), so every member left is the app's.
                for pid in inst.cgroup.pids() {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
            Effect::RemoveCgroup => inst.cgroup.remove(),
            Effect::Info(m) => tracing::info!("{m}"),
            Effect::Warn(m) => tracing::warn!("{m}"),
        }
    }

    /// Re-reads every instance directory: running shims are reconnected, dead
    /// shims of instances that should run are started again. A directory whose
    /// record cannot be read is left as it is and said at ERROR (a person must
    /// look: the runner will not guess what it held).
    fn adopt(&mut self, ctx: &mut Context<Self>) {
        let root = self.settings.instances_dir.join("instances");
        let rd = match std::fs::read_dir(&root) {
            Ok(rd) => rd,
            Err(e) => {
                tracing::error!("cannot list {}: {e}", root.display());
                return;
            }
        };
        for e in rd.flatten() {
            let dir = e.path();
            let rec = match store::load(&dir) {
                Ok(r) => r,
                Err(err) => {
                    tracing::error!(
                        "not adopting {}: {}; its processes (if any) are left alone",
                        dir.display(),
                        crate::chain(&err)
                    );
                    continue;
                }
            };
            let limits = provision::limits_of(&self.settings, &rec.spec);
            let cg = self.hierarchy.create(&rec.id, &limits).unwrap_or_else(|e| {
                tracing::warn!(instance = %rec.id, "cannot create cgroups again: {e}");
                cgroup::InstanceCgroup::default()
            });
            let id = rec.id.clone();
            let inst = Inst::new(rec, dir, cg, &self.settings);
            let shim_alive = inst.shim_alive();
            self.instances.insert(id.clone(), inst);
            self.step(ctx, &id, Event::Adopted { shim_alive });
        }
    }

    /// Removes cached slugs that no instance here runs and that were not used
    /// lately (release::sweep_cache).
    fn sweep_slugs(&mut self) {
        let in_use: std::collections::BTreeSet<(String, String)> = self
            .instances
            .values()
            .filter(|i| i.m.state != State::Stopped)
            .filter_map(|i| {
                let r = i.rec.spec.release.as_ref()?;
                Some((i.rec.spec.app.clone(), r.slug.clone()))
            })
            .collect();
        // On the actor's thread, so that no start is between finding a slug and
        // using it; the trees taken out are deleted off it (that takes a while).
        let removed = crate::release::sweep_cache(
            &self.settings.instances_dir.join("slugs"),
            &in_use,
            crate::release::KEEP_PER_APP,
            crate::release::UNUSED_KEEP,
            std::time::SystemTime::now(),
        );
        if removed.is_empty() {
            return;
        }
        tokio::task::spawn_blocking(move || {
            for (p, gone) in removed {
                if gone.exists() {
                    let _ = std::fs::remove_dir_all(&gone);
                }
                tracing::info!("unused cached slug removed: {}", p.display());
            }
        });
    }

    /// Forgets stopped instances `stopped_keep` after they stopped, with their
    /// directories (record, logs, home, tmp) and cgroups.
    fn sweep_stopped(&mut self) {
        let keep = self.settings.stopped_keep.as_millis() as i64;
        let now = now_ms();
        let old: Vec<String> = self
            .instances
            .values()
            .filter(|i| i.m.state == State::Stopped)
            .filter(|i| {
                i.m.stopped_at
                    .is_some_and(|t| now.saturating_sub(t) >= keep)
            })
            .filter(|i| !i.shim_alive())
            .map(|i| i.rec.id.clone())
            .collect();
        for id in old {
            self.forget(&id);
        }
    }

    /// Removes a stopped instance: its cgroups and directories (record, logs,
    /// home, tmp).
    fn forget(&mut self, id: &str) {
        let Some(inst) = self.instances.remove(id) else {
            return;
        };
        inst.cgroup.remove();
        for d in [inst.dir.clone(), self.settings.apps_dir.join(id)] {
            if let Err(e) = std::fs::remove_dir_all(&d) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(instance = %id, "cannot remove {}: {e}", d.display());
                }
            }
        }
        tracing::info!(instance = %id, "stopped instance removed");
    }

    /// `app.purge`: once every instance of the app has stopped, forgets them and
    /// removes the app's account, so a later app of the same name starts with
    /// nothing of this one's.
    fn purge_app(&mut self, ctx: &mut Context<Self>, app: &str) -> Result<Value, WireError> {
        if !crate::users::valid_app(app) {
            return Err(WireError::invalid(format!("{app:?} is not an app name")));
        }
        let mine: Vec<&Inst> = self
            .instances
            .values()
            .filter(|i| i.rec.spec.app == app)
            .collect();
        let running: Vec<(String, bool)> = mine
            .iter()
            .filter(|i| i.m.state != State::Stopped || i.shim_alive())
            .map(|i| (i.rec.id.clone(), i.m.state != State::Stopped))
            .collect();
        if !running.is_empty() {
            // Stop them (each with its grace period); the purge finishes once
            // the last has stopped.
            for (id, ask) in &running {
                if *ask {
                    let shim_alive = self.get(id)?.shim_alive();
                    self.step(ctx, id, Event::StopAsked { shim_alive });
                }
            }
            self.purging.insert(app.to_string());
            let ids: Vec<&String> = running.iter().map(|(id, _)| id).collect();
            return Ok(json!({"app": app, "purged": false, "stopping": ids}));
        }
        let ids: Vec<String> = mine.iter().map(|i| i.rec.id.clone()).collect();
        for id in &ids {
            self.forget(id);
        }
        let user_removed = crate::users::remove_user(app).map_err(|e| {
            WireError::new(
                Code::Conflict,
                format!(
                    "the instances of {app} are gone but its account is not: {:#}",
                    anyhow::Error::new(e)
                ),
            )
        })?;
        // Its cached slugs go with its account (a later account may get its uid).
        let slugs = self.settings.instances_dir.join("slugs").join(app);
        if let Err(e) = std::fs::remove_dir_all(&slugs) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(app = %app, "cannot remove {}: {e}", slugs.display());
            }
        }
        tracing::info!(app = %app, instances = ids.len(), user_removed, "app purged");
        Ok(
            json!({"app": app, "purged": true, "instances_removed": ids, "user_removed": user_removed}),
        )
    }

    fn spawn_shim(&mut self, ctx: &mut Context<Self>, id: &str) {
        let Some(inst) = self.instances.get(id) else {
            return;
        };
        let dir = inst.dir.clone();
        let mut cmd = tokio::process::Command::new(&self.shim_bin);
        cmd.arg(&dir).stdin(std::process::Stdio::null());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("shim.log"));
        if let Ok(l) = log {
            if let Ok(l2) = l.try_clone() {
                cmd.stdout(l).stderr(l2);
            }
        }
        // Its own session: no signal to the runner's group (Ctrl-C, a supervisor's
        // stop) reaches the shim or the app. And nothing but stdio: whatever the
        // runner holds or inherited (a supervisor's pipes) stays out of the shim.
        // SAFETY: setsid and close_range are async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                nix::unistd::setsid()?;
                crate::child::cloexec_from(3);
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
                self.step(ctx, id, Event::ShimUnstartable { reason });
            }
        }
    }

    /// Connects to the instance's shim socket (retrying while the shim starts)
    /// and relays its lines to the actor until the socket closes.
    fn connect(&mut self, ctx: &mut Context<Self>, id: &str) {
        let Some(inst) = self.instances.get_mut(id) else {
            return;
        };
        inst.link.disconnected();
        inst.conn += 1;
        let conn = inst.conn;
        if let Some(old) = inst.conn_task.take() {
            old.abort();
        }
        let sock = inst.dir.join("shim.sock");
        let (dir, spawned) = (inst.dir.clone(), inst.spawned.clone());
        let addr = ctx.address();
        let id = id.to_string();
        inst.conn_task = Some(actix_rt::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(10);
            // Retried while the shim starts; given up at once when it has died
            // (an exiting shim closes its socket before it is a zombie).
            let alive = || {
                spawned.get().is_some_and(|pid| !link::zombie_or_gone(pid))
                    || link::shim_alive(&dir)
            };
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
                addr.do_send(ShimGone { id, conn });
                return;
            };
            addr.do_send(ShimConnected {
                id: id.clone(),
                conn,
                writer,
            });
            let mut lines = BufReader::new(reader).lines();
            while let Ok(Some(l)) = lines.next_line().await {
                match serde_json::from_str::<ShimEvent>(&l) {
                    Ok(ev) => addr.do_send(FromShim {
                        id: id.clone(),
                        conn,
                        ev,
                    }),
                    Err(e) => tracing::warn!(instance = %id, "bad line from shim: {e}"),
                }
            }
            addr.do_send(ShimGone { id, conn });
        }));
    }

    /// Watches one start of the app: healthy within the start timeout, then
    /// periodic liveness checks, until the generation moves on.
    fn watch_health(&self, ctx: &mut Context<Self>, id: &str, generation: u64) {
        let Some(inst) = self.instances.get(id) else {
            return;
        };
        let spec = &inst.rec.spec;
        let check = if let Some(p) = &spec.health.http {
            health::Check::Http(p.clone())
        } else if spec.health.none == Some(true) {
            health::Check::None
        } else {
            health::Check::Tcp
        };
        let port = inst.rec.port;
        let current = inst.generation.clone();
        let s = &self.settings;
        let ms = |v: Option<u64>, d: Duration| v.map(Duration::from_millis).unwrap_or(d);
        let start_timeout = ms(spec.start_timeout_ms, s.start_timeout);
        let interval = ms(spec.health_interval_ms, s.health_interval);
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
            let mut last = None;
            let mut up = false;
            while Instant::now() < deadline && current.get() == generation {
                match health::probe(&check, port, Duration::from_secs(2)).await {
                    Ok(()) => {
                        up = true;
                        break;
                    }
                    Err(e) => last = Some(e),
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            if !up {
                let last = last.map(|e| e.0).unwrap_or_default();
                report(Err(health::Unhealthy(format!(
                    "not healthy within {start_timeout:?}: {last}"
                ))));
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
                            report(Err(health::Unhealthy(format!(
                                "{failed} liveness checks failed: {e}"
                            ))));
                            return;
                        }
                    }
                }
            }
        });
    }

    /// Stops the scheduler's instances that asked to be stopped once no
    /// scheduler has reached this node for `stop_after_disconnect_ms`: a node
    /// cut off has them placed elsewhere, and they must not run twice.
    fn stop_disconnected(&mut self, ctx: &mut Context<Self>) {
        // Without its fence file the runner cannot tell a scheduler's contact
        // (every tokened request is refused, and said at ERROR): it decides
        // nothing rather than stop what may well be reached.
        if self.max_token.is_err() {
            return;
        }
        let quiet = self.scheduler_contact.elapsed();
        let due: Vec<(String, u64)> = self
            .instances
            .iter()
            .filter(|(_, i)| i.m.running && i.rec.owner == kinds::Owner::Scheduler)
            .filter_map(|(id, i)| {
                let limit = i.rec.spec.stop_after_disconnect_ms?;
                (quiet >= Duration::from_millis(limit)).then(|| (id.clone(), limit))
            })
            .collect();
        for (id, limit) in due {
            let Some(inst) = self.instances.get(&id) else {
                continue;
            };
            let shim_alive = inst.shim_alive();
            inst.span().in_scope(|| {
                tracing::warn!(
                    "no scheduler has reached this node for {:.1} s (its limit: {} ms): stopping it, as it asked",
                    quiet.as_secs_f64(),
                    limit
                )
            });
            self.step(ctx, &id, Event::StopAsked { shim_alive });
        }
    }

    /// Refuses a token smaller than the largest accepted (`stale_token`); a
    /// request without one (an operator's) is not fenced.
    fn fence(&self, token: Option<u64>) -> Result<(), WireError> {
        let Some(t) = token else {
            return Ok(());
        };
        match &self.max_token {
            Err(why) => Err(WireError::internal(format!(
                "this runner cannot tell stale fencing tokens ({why}); fix or remove the file"
            ))),
            Ok(Some(max)) if t < *max => Err(WireError::new(
                Code::StaleToken,
                format!("a newer scheduler leads: token {t} < {max}"),
            )),
            Ok(_) => Ok(()),
        }
    }

    /// Records the token of a request that is being carried out, durably and
    /// before it is, when it is larger than any before.
    fn accept(&mut self, token: Option<u64>) -> Result<(), WireError> {
        self.fence(token)?;
        let Some(t) = token else {
            return Ok(());
        };
        self.scheduler_contact = std::time::Instant::now();
        if matches!(self.max_token, Ok(Some(max)) if max >= t) {
            return Ok(());
        }
        store::save_fence(&self.settings.instances_dir, t).map_err(|e| {
            WireError::internal(format!(
                "cannot record fencing token {t} in {}: {e}",
                self.settings.instances_dir.join("fence.json").display()
            ))
        })?;
        tracing::info!(token = t, "a newer fencing token accepted");
        self.max_token = Ok(Some(t));
        Ok(())
    }

    /// A start that names an id this runner has: the first start's answer again
    /// when it is the same request (a resend), else `conflict`.
    fn existing_start(&self, id: &str, request: &str) -> Option<Result<Value, WireError>> {
        let inst = self.instances.get(id)?;
        Some(if inst.rec.request.as_deref() == Some(request) {
            Ok(inst.started(&self.settings))
        } else {
            Err(WireError::new(
                Code::Conflict,
                format!(
                    "instance `{id}` already exists on this runner ({}) from another start; give a new id",
                    inst.m.state.as_str()
                ),
            ))
        })
    }

    /// The release form's admission, before its slug is fetched (see [`Admit`]).
    fn admit(&mut self, body: &Value) -> Result<Option<Value>, WireError> {
        let key: StartKey = paddock_wire::kinds::parse_body(kinds::INSTANCE_START, body)?;
        self.fence(key.token)?;
        let Some(id) = key.id else {
            return Ok(None);
        };
        match self.existing_start(&id, &store::fingerprint(body)) {
            None => Ok(None),
            Some(Err(e)) => Err(e),
            Some(Ok(v)) => {
                self.accept(key.token)?;
                Ok(Some(v))
            }
        }
    }

    fn start_instance(
        &mut self,
        ctx: &mut Context<Self>,
        req: InstanceStart,
        release: Option<store::ReleaseSpec>,
        request: String,
    ) -> Result<Value, WireError> {
        self.fence(req.token)?;
        provision::check(&req)?;
        if let Some(id) = &req.id {
            if let Some(answer) = self.existing_start(id, &request) {
                let v = answer?;
                self.accept(req.token)?;
                return Ok(v);
            }
            provision::check_id_fits(&self.settings, id)?;
        }
        let port = self
            .free_port()
            .ok_or_else(|| WireError::unavailable("no free port left in the runner's range"))?;
        let id = match &req.id {
            Some(id) => id.clone(),
            None => loop {
                let id = format!(
                    "{}-{}-{}",
                    req.app,
                    req.proc,
                    &ulid::Ulid::new().to_string().to_lowercase()[16..]
                );
                // A caller's id may look like one made here.
                if !self.instances.contains_key(&id) {
                    break id;
                }
            },
        };
        self.accept(req.token)?;
        let p = provision::provision(
            &self.settings,
            &self.hierarchy,
            &id,
            req,
            port,
            release,
            request,
        )?;
        let inst = Inst::new(p.rec, p.dir, p.cgroup, &self.settings);
        let span = inst.span();
        let started = inst.started(&self.settings);
        self.instances.insert(id.clone(), inst);
        span.in_scope(|| tracing::info!(port, "instance started"));
        self.spawn_shim(ctx, &id);
        Ok(started)
    }

    /// `runner.info`: what this runner offers and holds.
    fn runner_info(&self) -> RunnerInfo {
        let live: Vec<&Inst> = self
            .instances
            .values()
            .filter(|i| i.m.state != State::Stopped)
            .collect();
        RunnerInfo {
            node: self.node.clone(),
            offer_memory_mb: self.settings.offer_memory_mb,
            used_memory_mb: live
                .iter()
                .map(|i| i.memory_mb(&self.settings).unwrap_or(0))
                .sum(),
            instances: live.len() as u64,
            max_token: self.max_token.clone().ok().flatten(),
        }
    }

    fn free_port(&self) -> Option<u16> {
        let used: Vec<u16> = self
            .instances
            .values()
            .filter(|i| i.m.state != State::Stopped)
            .map(|i| i.rec.port)
            .collect();
        let (min, max) = (self.settings.port_min, self.settings.port_max);
        let span = (max - min) as u32 + 1;
        let offset = rand_u32() % span;
        (0..span)
            .map(|i| min + ((offset + i) % span) as u16)
            .find(|p| !used.contains(p) && std::net::TcpListener::bind(("0.0.0.0", *p)).is_ok())
    }

    fn get(&mut self, id: &str) -> Result<&mut Inst, WireError> {
        self.instances.get_mut(id).ok_or_else(|| {
            WireError::new(Code::NotFound, format!("no instance `{id}` on this runner"))
        })
    }

    fn handle_call(
        &mut self,
        ctx: &mut Context<Self>,
        env: paddock_wire::Envelope,
    ) -> Result<Value, WireError> {
        match env.kind.as_str() {
            kinds::INSTANCE_START => {
                let request = store::fingerprint(&env.body);
                self.start_instance(ctx, body(&env)?, None, request)
            }
            kinds::RUNNER_INFO => Ok(kinds::to_body(&self.runner_info())),
            kinds::INSTANCE_STOP => {
                let req: InstanceId = body(&env)?;
                self.fence(req.token)?;
                let shim_alive = self.get(&req.id)?.shim_alive();
                self.accept(req.token)?;
                self.step(ctx, &req.id, Event::StopAsked { shim_alive });
                let state = self.get(&req.id)?.m.state;
                Ok(json!({"state": state.as_str()}))
            }
            kinds::INSTANCE_RESTART => {
                let req: InstanceId = body(&env)?;
                self.fence(req.token)?;
                let inst = self.get(&req.id)?;
                if inst.m.state == State::Stopped {
                    return Err(WireError::new(
                        Code::Conflict,
                        format!("instance `{}` is stopped; start a new one", req.id),
                    ));
                }
                let shim_alive = inst.shim_alive();
                self.accept(req.token)?;
                self.step(ctx, &req.id, Event::RestartAsked { shim_alive });
                Ok(json!({"state": "restarting"}))
            }
            kinds::INSTANCE_RELOAD => {
                let req: InstanceId = body(&env)?;
                self.fence(req.token)?;
                let inst = self.get(&req.id)?;
                let sig = signal_named(inst.rec.spec.reload_signal.as_deref().unwrap_or("HUP"))?;
                if inst.m.pid.is_none() {
                    return Err(WireError::new(
                        Code::Conflict,
                        format!("instance `{}` is not running", req.id),
                    ));
                }
                self.accept(req.token)?;
                self.get(&req.id)?.link.send(ShimCommand::Signal { sig });
                Ok(json!({"signal": sig}))
            }
            kinds::INSTANCE_LIST => {
                // The leading scheduler lists with its token every pass: that
                // is the contact `stop_after_disconnect` counts from.
                // A larger token than any seen is a newer leader's: recorded,
                // as its first command would.
                if let Some(t) = env.body.get("token").and_then(Value::as_u64) {
                    if let Err(e) = self.accept(Some(t)) {
                        tracing::debug!("a list with token {t} is no contact: {}", e.message);
                    }
                }
                let mut v: Vec<InstanceInfo> = self
                    .instances
                    .values()
                    .map(|i| i.info(&self.node, &self.settings))
                    .collect();
                v.sort_by(|a, b| a.id.cmp(&b.id));
                Ok(kinds::to_body(&InstanceList { instances: v }))
            }
            kinds::APP_PURGE => {
                let req: kinds::AppPurge = body(&env)?;
                self.purge_app(ctx, &req.app)
            }
            kinds::INSTANCE_LOGS => {
                let req: InstanceLogs = body(&env)?;
                let inst = self.get(&req.id)?;
                Ok(kinds::to_body(&LogLines {
                    lines: store::tail_log(&inst.dir.join("app.log"), req.lines.min(10_000)),
                }))
            }
            other => Err(WireError::new(
                Code::UnknownKind,
                format!("runner does not handle `{other}`"),
            )),
        }
    }
}

fn rand_u32() -> u32 {
    use std::io::Read;
    let mut b = [0u8; 4];
    let _ = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b));
    u32::from_le_bytes(b)
}

impl Handler<FromShim> for Runner {
    type Result = ();
    fn handle(&mut self, m: FromShim, ctx: &mut Context<Self>) {
        let Some(inst) = self.instances.get(&m.id).filter(|i| i.conn == m.conn) else {
            return; // an older connection's line: not about the shim as it is now
        };
        let ev = match m.ev {
            ShimEvent::Hello {
                proto,
                pid,
                started_ns,
                last_exit,
            } => {
                inst.span().in_scope(|| {
                    if proto == 0 {
                        tracing::info!("the shim speaks the version-less protocol of the first paddock-shim; adopted as it is");
                    } else if proto > SHIM_PROTO {
                        tracing::warn!(
                            "the shim speaks protocol {proto}, newer than this runner's {SHIM_PROTO}; only commands both know are used"
                        );
                    }
                });
                Event::Hello {
                    pid,
                    started_ms: started_ns.map(|n| n / 1_000_000),
                    last_exit,
                    stop_sent: inst.link.stop_sent,
                }
            }
            ShimEvent::Started { pid, started_ns } => Event::Started {
                pid,
                started_ms: started_ns / 1_000_000,
            },
            ShimEvent::Exited(e) => Event::Exited(e),
            ShimEvent::Stopped => Event::Stopped,
            ShimEvent::Log { ts, stream, line } => {
                if self.settings.log_sink.is_some() {
                    self.server.push_to(
                        "logs",
                        kinds::LOG_LINE,
                        json!({"app": inst.rec.spec.app, "proc": inst.rec.spec.proc, "instance": m.id,
                               "node": self.node, "ts": ts, "stream": stream, "line": line}),
                    );
                }
                return;
            }
            ShimEvent::Error { message } => {
                inst.span().in_scope(|| tracing::warn!("shim: {message}"));
                return;
            }
        };
        self.step(ctx, &m.id, ev);
    }
}

impl Handler<ShimConnected> for Runner {
    type Result = ();
    fn handle(&mut self, m: ShimConnected, _: &mut Context<Self>) {
        let Some(inst) = self.instances.get_mut(&m.id).filter(|i| i.conn == m.conn) else {
            return;
        };
        match Writer::new(m.writer) {
            Ok(w) => inst.link.connected(w),
            Err(e) => inst
                .span()
                .in_scope(|| tracing::warn!("cannot use the shim's socket: {e}")),
        }
    }
}

impl Handler<ShimGone> for Runner {
    type Result = ();
    fn handle(&mut self, m: ShimGone, ctx: &mut Context<Self>) {
        let Some(inst) = self.instances.get_mut(&m.id).filter(|i| i.conn == m.conn) else {
            return; // an older connection ended: the current one is not affected
        };
        inst.link.disconnected();
        let shim_alive = inst.shim_alive();
        self.step(ctx, &m.id, Event::ShimGone { shim_alive });
    }
}

impl Handler<HealthResult> for Runner {
    type Result = ();
    fn handle(&mut self, m: HealthResult, ctx: &mut Context<Self>) {
        let generation = m.generation;
        let ev = match m.ok {
            Ok(()) => Event::Healthy { generation },
            Err(e) => Event::Unhealthy {
                generation,
                reason: e.0,
            },
        };
        self.step(ctx, &m.id, ev);
    }
}

impl Handler<StartRelease> for Runner {
    type Result = Result<Value, WireError>;
    fn handle(&mut self, m: StartRelease, ctx: &mut Context<Self>) -> Self::Result {
        self.start_instance(ctx, m.req, Some(m.release), m.request)
    }
}

impl Handler<Admit> for Runner {
    type Result = Result<Option<Value>, WireError>;
    fn handle(&mut self, m: Admit, _: &mut Context<Self>) -> Self::Result {
        self.admit(&m.body)
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
