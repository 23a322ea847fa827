//! paddock-deployer: builds pushed commits with buildpacks into slugs and
//! releases (docs/design/PUSH.md).
//!
//! `build.start` records a build and runs it in the background: the source blob
//! fetched and unpacked at `/app`, buildpacks detected and compiled, process
//! types found, the slug compressed and stored, the release recorded with the
//! api and its release phase run on a runner. Every line of the build's log goes
//! to an in-memory buffer (long-polled by `build.log`) and, in batches, to the
//! `deployer_builds` table, which keeps every build's outcome and log.
//!
//! Architecture invariant: build code (buildpacks, the app's own scripts, tar on
//! the pushed source) never runs as root: only in the [`sandbox`], as the app's
//! own user, in the build's cgroups, with `/app` and a private `/tmp` mounted in
//! a namespace of its own. The deployer itself reads from a build's tree only
//! small regular files (never through a symlink) and the finished slug.

pub mod build;
pub mod buildpacks;
pub mod live;
pub mod local;
pub mod procfile;
pub mod sandbox;
pub mod settings;
pub mod store;

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::rc::Rc;
use std::time::{Duration, Instant};

use paddock_config::{ClusterConfig, ConfigError};
use paddock_daemon::{Ctx, LoopKind, Routes, Spec};
use paddock_db::Db;
use paddock_runner::cgroup::{Hierarchy, Limits};
use paddock_wire::{Code, Envelope, WireError};
use serde_json::{json, Map, Value};

pub use live::{Live, MAX_LOG_BYTES, MAX_LOG_LINES, MAX_REPLY_LINES};
pub use settings::{settings, DeployerSection, Settings, NAME};

/// How long a finished build stays in memory for `build.log` long-polls.
const KEEP_LIVE: Duration = Duration::from_secs(600);
const FLUSH_EVERY: Duration = Duration::from_millis(250);
const CACHE_SWEEP_EVERY: Duration = Duration::from_secs(3600);

pub fn spec() -> Spec {
    Spec {
        name: NAME,
        version: env!("CARGO_PKG_VERSION"),
        pull: false,
        publish: false,
        user_keys: None,
        check,
        push_to: paddock_daemon::no_push_to,
    }
}

fn check(cfg: &ClusterConfig) -> Result<(), ConfigError> {
    settings(cfg).map(|_| ())
}

/// What `build.start` asked for.
#[derive(Debug, Clone)]
pub struct Job {
    pub id: String,
    pub app: String,
    pub commit: String,
    /// The source blob's sha256 (64 lowercase hex).
    pub source: String,
    pub git_ref: String,
    pub pusher: String,
}

impl Job {
    /// A `build.start` body, checked field by field (`invalid` names the field).
    pub fn parse(b: &Value) -> Result<Job, WireError> {
        let app = str_field(b, "app")?;
        if !paddock_runner::users::valid_app(app) {
            return Err(WireError::invalid(
                "`app` must be 1-28 characters of [a-z0-9-], starting with a letter",
            ));
        }
        let commit = str_field(b, "commit")?;
        if commit.is_empty() || commit.len() > 100 || commit.chars().any(char::is_control) {
            return Err(WireError::invalid(
                "`commit` must be the pushed commit's id",
            ));
        }
        let source = str_field(b, "source")?;
        let source = source
            .strip_prefix("sha256:")
            .unwrap_or(source)
            .to_ascii_lowercase();
        if source.len() != 64 || !source.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Err(WireError::invalid(
                "`source` must be the sha256 of the source tar in the blobstore (64 hex digits)",
            ));
        }
        let git_ref = opt_str(b, "ref")?;
        let pusher = opt_str(b, "pusher")?;
        if git_ref.len() > 300 || pusher.len() > 200 {
            return Err(WireError::invalid("`ref` or `pusher` is too long"));
        }
        let id = match opt_str(b, "build")? {
            "" => ulid::Ulid::new().to_string().to_lowercase(),
            given if valid_id(given) => given.to_string(),
            _ => {
                return Err(WireError::invalid(
                    "`build` must be 1-64 characters of [a-z0-9-]",
                ))
            }
        };
        Ok(Job {
            id,
            app: app.to_string(),
            commit: commit.to_string(),
            source,
            git_ref: git_ref.to_string(),
            pusher: pusher.to_string(),
        })
    }
}

/// The deployer's state, shared by the handlers and the builds (one thread).
pub struct Deployer {
    pub settings: Settings,
    store: store::Store,
    calls: paddock_daemon::calls::Calls,
    hierarchy: Hierarchy,
    ready: Cell<bool>,
    builds: RefCell<HashMap<String, Live>>,
    running_apps: RefCell<HashSet<String>>,
    /// Build slots (`max_builds`): a build holds one from its start to its end.
    slots: std::sync::Arc<tokio::sync::Semaphore>,
    /// Running builds' cgroups, killed when the deployer stops.
    cgroups: RefCell<HashMap<String, paddock_runner::cgroup::InstanceCgroup>>,
}

impl Deployer {
    pub fn calls(&self) -> &paddock_daemon::calls::Calls {
        &self.calls
    }

    /// Appends one line to a build's log and wakes its readers (see [`Live::push`]).
    pub fn push_line(&self, id: &str, line: String) {
        if let Some(l) = self.builds.borrow_mut().get_mut(id) {
            l.push(line);
        }
    }

    /// A line kept whatever the limits: the build's outcome.
    fn push_outcome(&self, id: &str, line: String) {
        if let Some(l) = self.builds.borrow_mut().get_mut(id) {
            l.push_outcome(line);
        }
    }

    pub fn set_step(&self, id: &str, step: &'static str) {
        if let Some(l) = self.builds.borrow_mut().get_mut(id) {
            l.step = step;
        }
    }

    /// A cluster kind of the api; the error is said for a person.
    pub async fn api(&self, kind: &str, body: Value, timeout: Duration) -> Result<Value, String> {
        let timeout = timeout.max(Duration::from_secs(2));
        self.calls
            .call_daemon_timeout("api", kind, body, timeout)
            .await
            .map_err(|e| paddock_daemon::chain(&e))
    }

    /// `<dir>/cache/<app>`, the app user's own. A cache is kept only for the
    /// same app: `identity` (when it was created) is recorded beside it
    /// (`<app>.identity`, root's), and a cache of an earlier app of the same
    /// name (destroyed, made again, perhaps by someone else and with the old
    /// uid reused by useradd) or of another uid is dropped first, so nothing an
    /// old app's build put there can reach a new app's build.
    pub fn app_cache(
        &self,
        app: &str,
        uid: u32,
        gid: u32,
        identity: &str,
    ) -> std::io::Result<std::path::PathBuf> {
        use std::os::unix::fs::{DirBuilderExt, MetadataExt};
        let d = self.settings.dir.join("cache").join(app);
        let marker = self
            .settings
            .dir
            .join("cache")
            .join(format!("{app}.identity"));
        let recorded = std::fs::read_to_string(&marker).ok();
        if let Ok(m) = std::fs::symlink_metadata(&d) {
            let same = m.is_dir() && m.uid() == uid && recorded.as_deref() == Some(identity);
            if !same {
                if m.is_dir() {
                    std::fs::remove_dir_all(&d)?;
                } else {
                    std::fs::remove_file(&d)?;
                }
            }
        }
        if recorded.as_deref() != Some(identity) {
            std::fs::write(&marker, identity)?;
        }
        match std::fs::DirBuilder::new().mode(0o700).create(&d) {
            Ok(()) => std::os::unix::fs::chown(&d, Some(uid), Some(gid))?,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        Ok(d)
    }

    /// Removes the build caches of apps the api no longer has.
    pub async fn sweep_caches(&self) {
        let apps = match self
            .api("apps.state", json!({}), Duration::from_secs(30))
            .await
        {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!("cache sweep skipped: cannot list the apps: {e}");
                return;
            }
        };
        let Some(list) = apps["apps"].as_array() else {
            tracing::warn!("cache sweep skipped: apps.state gave no list");
            return;
        };
        let known: HashSet<&str> = list.iter().filter_map(|a| a["name"].as_str()).collect();
        let dir = self.settings.dir.join("cache");
        let Ok(rd) = std::fs::read_dir(&dir) else {
            return;
        };
        for e in rd.flatten() {
            let file = e.file_name().to_string_lossy().into_owned();
            let app = file.strip_suffix(".identity").unwrap_or(&file).to_string();
            if known.contains(app.as_str()) || self.running_apps.borrow().contains(&app) {
                continue;
            }
            let p = e.path();
            let r = if p.is_dir() {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            };
            match r {
                Ok(()) => {
                    tracing::info!(app = %app, "removed the build cache of an app that no longer exists")
                }
                Err(err) => tracing::warn!("cannot remove {}: {err}", p.display()),
            }
        }
    }

    /// Writes the lines not yet in the database, and the current step. One
    /// flush of a build at a time: another one meanwhile does nothing (it would
    /// write the same lines twice).
    pub async fn flush(&self, id: &str) {
        let (lines, step) = {
            let mut b = self.builds.borrow_mut();
            let Some(l) = b.get_mut(id) else { return };
            if l.flushing || (l.flushed == l.lines.len() && l.saved_step == l.step) {
                return;
            }
            l.flushing = true;
            (l.lines[l.flushed..].to_vec(), l.step)
        };
        let r = self.store.append(id, &lines, step).await;
        let mut b = self.builds.borrow_mut();
        let Some(l) = b.get_mut(id) else { return };
        l.flushing = false;
        match r {
            Ok(()) => {
                l.flushed += lines.len();
                l.saved_step = step;
            }
            Err(e) => {
                tracing::warn!(build = %id, "cannot save log lines (retried): {}", paddock_db::chain(&e))
            }
        }
    }
}

fn dir_0700(p: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(p)?;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
}

pub async fn setup(ctx: Ctx) -> anyhow::Result<Routes> {
    use anyhow::Context as _;
    let s = settings(&ctx.config())?;
    // Builds need root: accounts (useradd), mount namespaces, cgroups.
    if !nix::unistd::geteuid().is_root() {
        anyhow::bail!(
            "paddock-deployer must run as root (it makes the apps' accounts, mounts each build's /app and limits it with cgroups); build code itself never runs as root"
        );
    }
    for d in [s.dir.clone(), s.dir.join("builds"), s.dir.join("cache")] {
        dir_0700(&d, 0o700).with_context(|| format!("cannot make {}", d.display()))?;
    }
    let bp = s.dir.join("buildpacks");
    buildpacks::install(&bp).with_context(|| {
        format!(
            "cannot install the built-in buildpacks into {}",
            bp.display()
        )
    })?;
    paddock_runner::child::ensure_app_root()
        .context("cannot make /app, where builds see their app")?;
    let hierarchy = Hierarchy::detect(&s.cgroup_root);
    if let Some(missing) = missing_controllers(&hierarchy) {
        if s.allow_unconfined_builds {
            tracing::warn!(
                "no writable {missing} cgroup controller(s) under {}: builds run without those limits (allow_unconfined_builds)",
                s.cgroup_root.display()
            );
        } else {
            tracing::warn!(
                "no writable {missing} cgroup controller(s) under {}: builds are refused (set allow_unconfined_builds = true to run them unlimited)",
                s.cgroup_root.display()
            );
        }
    }
    // Builds a stopped deployer left: their processes are killed, trees removed.
    if let Ok(rd) = std::fs::read_dir(s.dir.join("builds")) {
        for e in rd.flatten() {
            let id = e.file_name().to_string_lossy().into_owned();
            if let Ok(cg) = hierarchy.create(
                &format!("build-{id}"),
                &Limits {
                    memory_mb: None,
                    pids: None,
                    cpu_weight: None,
                },
            ) {
                for _ in 0..100 {
                    paddock_runner::shim::kill_cgroup(cg.kill.as_ref());
                    if cg.pids().is_empty() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                if cg.pids().is_empty() {
                    cg.remove();
                } else {
                    tracing::warn!(build = %id, "processes of an old build survive kills; its cgroup is kept");
                }
            }
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
    let db = Db::new(&s.database_url, s.pool_size)?;
    let dep = Rc::new(Deployer {
        store: store::Store::new(db),
        calls: ctx.calls().clone(),
        hierarchy,
        ready: Cell::new(false),
        builds: RefCell::new(HashMap::new()),
        running_apps: RefCell::new(HashSet::new()),
        cgroups: RefCell::new(HashMap::new()),
        slots: std::sync::Arc::new(tokio::sync::Semaphore::new(s.max_builds)),
        settings: s,
    });

    let d = dep.clone();
    ctx.spawn_loop("migrate", LoopKind::Resilient, move || {
        let d = d.clone();
        async move {
            if d.ready.get() {
                return std::future::pending().await;
            }
            paddock_db::migrate(&d.settings.database_url).await?;
            let n = d.store.fail_orphans(&d.settings.node).await?;
            if n > 0 {
                tracing::info!(
                    builds = n,
                    "marked builds left running by an earlier deployer failed"
                );
            }
            d.ready.set(true);
            tracing::info!("build database ready");
            std::future::pending().await
        }
    });

    // Caches of apps that no longer exist are removed (at start, then hourly; never while the
    // api cannot say which apps exist, never an app's that is building).
    let d = dep.clone();
    ctx.spawn_loop("sweep-caches", LoopKind::Resilient, move || {
        let d = d.clone();
        async move {
            loop {
                while !d.ready.get() {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                d.sweep_caches().await;
                tokio::time::sleep(CACHE_SWEEP_EVERY).await;
            }
        }
    });

    // A stopping deployer ends its builds (their records are failed by the
    // next start): build code never runs unsupervised.
    let (d, c2) = (dep.clone(), ctx.clone());
    actix_rt::spawn(async move {
        c2.shutdown_started().await;
        let cgroups: Vec<_> = d.cgroups.borrow().values().cloned().collect();
        for cg in cgroups {
            paddock_runner::shim::kill_cgroup(cg.kill.as_ref());
        }
    });

    let (a, b, c, e) = (dep.clone(), dep.clone(), dep.clone(), dep);
    Ok(Routes::new()
        .on("build.start", move |env| {
            let d = a.clone();
            async move { start(d, env).await }
        })
        .on("build.log", move |env| {
            let d = b.clone();
            async move { log(d, env).await }
        })
        .on("build.list", move |env| {
            let d = c.clone();
            async move { list(d, env).await }
        })
        .on("build.info", move |env| {
            let d = e.clone();
            async move { info(d, env).await }
        }))
}

fn ready(d: &Deployer) -> Result<(), WireError> {
    if d.ready.get() {
        Ok(())
    } else {
        Err(WireError::unavailable(
            "the deployer has not finished migrating its database yet; retry shortly",
        ))
    }
}

fn str_field<'a>(b: &'a Value, k: &str) -> Result<&'a str, WireError> {
    b.get(k)
        .and_then(Value::as_str)
        .ok_or_else(|| WireError::invalid(format!("`{k}` must be a string")))
}

fn opt_str<'a>(b: &'a Value, k: &str) -> Result<&'a str, WireError> {
    match b.get(k) {
        None | Some(Value::Null) => Ok(""),
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(WireError::invalid(format!("`{k}` must be a string"))),
    }
}

fn valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
}

async fn start(d: Rc<Deployer>, env: Envelope) -> Result<Value, WireError> {
    ready(&d)?;
    let job = Job::parse(&env.body)?;
    let (id, app) = (job.id.clone(), job.app.as_str());
    if !d.running_apps.borrow_mut().insert(app.to_string()) {
        return Err(WireError::new(
            Code::Conflict,
            format!("app {app} is already being built; wait for it to finish"),
        ));
    }
    let inserted = d
        .store
        .insert(
            &store::NewBuild {
                id: &job.id,
                app: &job.app,
                commit: &job.commit,
                source: &job.source,
                git_ref: &job.git_ref,
                pusher: &job.pusher,
                node: &d.settings.node,
            },
            // The build's own limit plus the release phase's and a margin.
            (d.settings.build_timeout + d.settings.release_timeout + Duration::from_secs(600))
                .as_millis() as i64,
        )
        .await;
    if let Err(e) = inserted {
        d.running_apps.borrow_mut().remove(app);
        return Err(e);
    }
    d.builds
        .borrow_mut()
        .insert(id.clone(), Live::new(&job.app));
    tracing::info!(build = %id, app = %job.app, commit = %job.commit, "build started");
    actix_rt::spawn(run_build(d, job));
    Ok(json!({ "build": id }))
}

/// The build task: steps, then the outcome recorded before readers see `done`.
async fn run_build(d: Rc<Deployer>, job: Job) {
    let began = Instant::now();
    let id = job.id.clone();
    let flushing = Rc::new(Cell::new(true));
    let flusher = {
        let (d, id, on) = (d.clone(), id.clone(), flushing.clone());
        actix_rt::spawn(async move {
            while on.get() {
                tokio::time::sleep(FLUSH_EVERY).await;
                d.flush(&id).await;
            }
        })
    };
    // A slot first: the build's clock starts once it has one.
    let slot = match d.slots.clone().try_acquire_owned() {
        Ok(p) => p,
        Err(_) => {
            d.set_step(&id, "queued");
            d.push_line(
                &id,
                format!(
                    "-----> Waiting for a build slot ({} builds are running on this deployer)",
                    d.settings.max_builds
                ),
            );
            d.flush(&id).await;
            d.slots
                .clone()
                .acquire_owned()
                .await
                .expect("the slots are never closed")
        }
    };
    let mut run = None;
    let result = match prepare(&d, &job).await {
        Ok(r) => {
            let r = run.insert(r);
            r.steps().await
        }
        Err(f) => Err(f),
    };
    let mut durations = run
        .as_ref()
        .map(|r| r.durations.clone())
        .unwrap_or_default();
    durations.insert("total".into(), json!(began.elapsed().as_millis() as u64));
    // Nothing of the build outlives it, and it is gone before anyone is told.
    let mut empty = false;
    if let Some(r) = &run {
        for _ in 0..100 {
            r.sandbox.kill_all().await;
            if r.sandbox.cgroup.pids().is_empty() {
                empty = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if empty {
            r.sandbox.cgroup.remove();
        } else {
            // Kept, so the processes stay limited and findable; the next start
            // kills what is in it and removes it.
            tracing::warn!(build = %id, "processes of the build survived two seconds of kills; its cgroup is kept");
        }
    }
    // A cache past cache_mb is dropped, once nothing of the build runs.
    if empty {
        let cache = d.settings.dir.join("cache").join(&job.app);
        let cap = d.settings.cache_mb << 20;
        let dropped = tokio::task::spawn_blocking(move || {
            let u = sandbox::measure(std::slice::from_ref(&cache), cap, u64::MAX);
            (u.bytes > cap).then(|| std::fs::remove_dir_all(&cache))
        })
        .await
        .ok()
        .flatten();
        match dropped {
            Some(Ok(())) => d.push_outcome(
                &id,
                format!(
                    "-----> The build cache held more than {} MB (cache_mb): it was dropped, the next build starts without it",
                    d.settings.cache_mb
                ),
            ),
            Some(Err(e)) => {
                tracing::warn!(build = %id, app = %job.app, "cannot drop the build cache over cache_mb: {e}")
            }
            None => {}
        }
    }
    let (status, error, release) = match &result {
        Ok(release) => {
            let v = release["version"].as_i64().unwrap_or(0);
            d.push_outcome(&id, format!("-----> Released v{v}"));
            d.push_outcome(
                &id,
                format!(
                    "       Build {id} succeeded in {:.1} s",
                    began.elapsed().as_secs_f64()
                ),
            );
            ("succeeded", None, Some(release.clone()))
        }
        Err(f) => {
            d.push_outcome(
                &id,
                format!(" !     Build failed at step {}: {}", f.step, f.message),
            );
            (
                "failed",
                Some(json!({"step": f.step, "message": f.message})),
                run.as_ref().and_then(|r| r.release.clone()),
            )
        }
    };
    if let Some(n) = d
        .builds
        .borrow()
        .get(&id)
        .map(|l| l.dropped)
        .filter(|n| *n > 0)
    {
        tracing::info!(build = %id, "{n} log lines over the limit were dropped");
    }
    d.cgroups.borrow_mut().remove(&id);
    let root = build::Paths::new(&d.settings.dir, &id).root;
    let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(root)).await;
    flushing.set(false);
    let _ = flusher.await;
    let step = match &result {
        Ok(_) => None,
        Err(f) => Some(f.step),
    };
    let outcome = store::Outcome {
        status,
        step,
        error: error.clone(),
        release: release.clone(),
        durations: Value::Object(durations),
    };
    // The outcome is saved before readers are told, so `build.info` after a
    // `done` agrees with it; the database may be failing over, so retry a while.
    for attempt in 0..20 {
        d.flush(&id).await;
        let all_saved = d
            .builds
            .borrow()
            .get(&id)
            .is_none_or(|l| l.flushed == l.lines.len());
        if !all_saved && attempt < 19 {
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        }
        match d.store.finish(&id, &outcome).await {
            Ok(()) => break,
            Err(e) => {
                tracing::warn!(build = %id, attempt, "cannot record the build's outcome: {}", paddock_db::chain(&e));
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
    if let Some(l) = d.builds.borrow_mut().get_mut(&id) {
        l.done = true;
        l.status = status;
        l.error = error;
        l.release = release;
        l.durations = Some(outcome.durations.clone());
        if let Some(s) = step {
            l.step = s;
        }
        l.changed.notify_waiters();
    }
    tracing::info!(build = %id, app = %job.app, status, "build finished");
    drop(slot);
    d.running_apps.borrow_mut().remove(&job.app);
    if let Err(e) = d.store.prune(&job.app, d.settings.keep_builds).await {
        tracing::warn!(app = %job.app, "cannot prune old builds: {}", paddock_db::chain(&e));
    }
    tokio::time::sleep(KEEP_LIVE).await;
    d.builds.borrow_mut().remove(&id);
}

/// The controllers a build needs to be confined (memory and pids) that the
/// host lacks, named; `None` when both are there.
fn missing_controllers(h: &Hierarchy) -> Option<String> {
    let (memory, pids) = match h {
        Hierarchy::None => (false, false),
        Hierarchy::V1 { memory, pids, .. } => (memory.is_some(), pids.is_some()),
        Hierarchy::V2 { root } => {
            let list = std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
            let has = |c: &str| list.split_whitespace().any(|x| x == c);
            (has("memory"), has("pids"))
        }
    };
    let missing: Vec<&str> = [("memory", memory), ("pids", pids)]
        .into_iter()
        .filter(|(_, ok)| !ok)
        .map(|(c, _)| c)
        .collect();
    (!missing.is_empty()).then(|| missing.join(" and "))
}

/// The build's account, cgroup and sandbox.
async fn prepare(d: &Rc<Deployer>, job: &Job) -> Result<build::Run, build::Failure> {
    let f = |m: String| build::Failure {
        step: "source",
        message: m,
    };
    let app = job.app.clone();
    let (uid, gid) = tokio::task::spawn_blocking(move || paddock_runner::users::ensure_user(&app))
        .await
        .map_err(|e| f(e.to_string()))?
        .map_err(|e| {
            f(format!(
                "cannot get the app's account: {}",
                paddock_daemon::chain(&e)
            ))
        })?;
    let s = &d.settings;
    if let Some(missing) = missing_controllers(&d.hierarchy) {
        if !s.allow_unconfined_builds {
            return Err(f(format!(
                "this deployer has no usable {missing} cgroup controller(s) under {}, so a build \
                 could not be limited; builds are refused until the operator mounts them \
                 (or sets [daemons.deployer] allow_unconfined_builds = true)",
                s.cgroup_root.display()
            )));
        }
    }
    let cgroup = d
        .hierarchy
        .create(
            &format!("build-{}", job.id),
            &Limits {
                memory_mb: Some(s.build_memory_mb),
                pids: Some(s.build_pids),
                cpu_weight: Some(s.build_cpu_weight),
            },
        )
        .map_err(|e| f(format!("cannot create the build's cgroups: {e}")))?;
    d.cgroups
        .borrow_mut()
        .insert(job.id.clone(), cgroup.clone());
    let paths = build::Paths::new(&s.dir, &job.id);
    let env = vec![
        ("PATH".into(), "/usr/local/bin:/usr/bin:/bin".into()),
        ("HOME".into(), "/app".into()),
        ("LANG".into(), "C.UTF-8".into()),
        // /tmp is root's (see build::Paths): the build's scratch space is /tmp/work.
        ("TMPDIR".into(), "/tmp/work".into()),
        ("STACK".into(), "paddock-1".into()),
        ("SOURCE_VERSION".into(), job.commit.clone()),
        ("PADDOCK_APP".into(), job.app.clone()),
        ("PADDOCK_BUILD".into(), job.id.clone()),
    ];
    let sandbox = sandbox::Sandbox {
        uid,
        gid,
        app_dir: paths.app.clone(),
        tmp_dir: paths.tmp.clone(),
        cache_dir: s.dir.join("cache").join(&job.app),
        buildpacks_dir: s.dir.join("buildpacks"),
        local: Vec::new(),
        cgroup,
        pids: s.build_pids,
        max_file_bytes: s.build_disk_mb << 20,
        tmpfs_mb: 256.min(s.build_memory_mb / 2),
        watch: vec![
            paths.app.clone(),
            paths.work.clone(),
            s.dir.join("cache").join(&job.app),
        ],
        max_disk_bytes: s.build_disk_mb << 20,
        max_entries: s.build_inodes,
        env,
    };
    Ok(build::Run {
        dep: d.clone(),
        job: job.clone(),
        paths,
        sandbox,
        deadline: Instant::now() + s.build_timeout,
        durations: Map::new(),
        config: Default::default(),
        release: None,
        scheduling: None,
    })
}

async fn log(d: Rc<Deployer>, env: Envelope) -> Result<Value, WireError> {
    let b = &env.body;
    let id = str_field(b, "build")?.to_string();
    let after = match b.get("after") {
        None | Some(Value::Null) => 0,
        Some(v) => v
            .as_u64()
            .ok_or_else(|| WireError::invalid("`after` must be a line count"))?
            as usize,
    };
    let wait = match b.get("wait_ms") {
        None | Some(Value::Null) => 0,
        Some(v) => v
            .as_u64()
            .filter(|w| *w <= 25_000)
            .ok_or_else(|| WireError::invalid("`wait_ms` must be 0-25000"))?,
    };
    let until = tokio::time::Instant::now() + Duration::from_millis(wait);
    loop {
        let changed = {
            let builds = d.builds.borrow();
            match builds.get(&id) {
                None => None,
                Some(l)
                    if l.lines.len() > after || l.done || tokio::time::Instant::now() >= until =>
                {
                    return Ok(l.reply(&id, after))
                }
                Some(l) => Some(l.changed.clone()),
            }
        };
        let Some(changed) = changed else {
            // Another deployer's build (or an old one): the database has what
            // it flushed; a running one is re-read a little later, not in a
            // tight loop, until the wait is over.
            let reply = log_from_db(&d, &id, after).await?;
            let more = reply["lines"].as_array().is_some_and(|l| !l.is_empty());
            if more || reply["status"] != "running" || tokio::time::Instant::now() >= until {
                return Ok(reply);
            }
            tokio::time::sleep_until(
                until.min(tokio::time::Instant::now() + Duration::from_millis(500)),
            )
            .await;
            continue;
        };
        let _ = tokio::time::timeout_at(until, changed.notified()).await;
    }
}

async fn log_from_db(d: &Deployer, id: &str, after: usize) -> Result<Value, WireError> {
    ready(d)?;
    let (mut row, log) = d
        .store
        .info(id)
        .await?
        .ok_or_else(|| WireError::new(Code::NotFound, format!("no build {id}")))?;
    let lines: Vec<&str> = log.lines().collect();
    let from = after.min(lines.len());
    let to = (from + MAX_REPLY_LINES).min(lines.len());
    let running = row["status"] == "running";
    row["lines"] = json!(lines[from..to]);
    row["next"] = json!(to);
    row["done"] = json!(!running && to == lines.len());
    row["build"] = json!(id);
    Ok(row)
}

async fn list(d: Rc<Deployer>, env: Envelope) -> Result<Value, WireError> {
    ready(&d)?;
    let app = str_field(&env.body, "app")?;
    let limit = match env.body.get("limit") {
        None | Some(Value::Null) => 50,
        Some(v) => v
            .as_i64()
            .filter(|n| (1..=1000).contains(n))
            .ok_or_else(|| WireError::invalid("`limit` must be 1-1000"))?,
    };
    let mut builds = d.store.list(app, limit).await?;
    for b in &mut builds {
        live_step(&d, b);
    }
    Ok(json!({ "builds": builds }))
}

/// A running build's step as this deployer knows it now (the row lags a little).
fn live_step(d: &Deployer, b: &mut Value) {
    let id = b["id"].as_str().unwrap_or_default().to_string();
    if let Some(l) = d.builds.borrow().get(&id) {
        if !l.done {
            b["step"] = json!(l.step);
        }
    }
}

async fn info(d: Rc<Deployer>, env: Envelope) -> Result<Value, WireError> {
    ready(&d)?;
    let id = str_field(&env.body, "build")?;
    let (mut row, log) = d
        .store
        .info(id)
        .await?
        .ok_or_else(|| WireError::new(Code::NotFound, format!("no build {id}")))?;
    live_step(&d, &mut row);
    let live_log = d.builds.borrow().get(id).map(|l| l.lines.join("\n") + "\n");
    row["log"] = json!(live_log
        .filter(|_| row["status"] == "running")
        .unwrap_or(log));
    Ok(json!({ "build": row }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_start_bodies() {
        let sha = "AB".repeat(32);
        let ok = json!({"app": "shop", "commit": "abc123", "source": format!("sha256:{sha}"),
                        "ref": "refs/heads/main", "pusher": "alice"});
        let j = Job::parse(&ok).unwrap();
        assert_eq!(j.source, sha.to_ascii_lowercase());
        assert_eq!((j.app.as_str(), j.pusher.as_str()), ("shop", "alice"));
        assert_eq!(j.id.len(), 26, "a ULID");
        let mut given = ok.clone();
        given["build"] = json!("b-1");
        assert_eq!(Job::parse(&given).unwrap().id, "b-1");
        for (field, value, says) in [
            ("app", json!("Shop"), "`app`"),
            ("app", json!(1), "`app`"),
            ("commit", json!(""), "`commit`"),
            ("commit", json!("a\nb"), "`commit`"),
            ("source", json!("abc"), "`source`"),
            ("source", json!("zz".repeat(32)), "`source`"),
            ("ref", json!("x".repeat(301)), "`ref`"),
            ("pusher", json!(5), "`pusher`"),
            ("build", json!("B_1"), "`build`"),
        ] {
            let mut b = ok.clone();
            b[field] = value;
            let e = Job::parse(&b).unwrap_err();
            assert_eq!(e.code, Code::Invalid, "{field}");
            assert!(e.message.contains(says), "{field}: {}", e.message);
        }
        let mut b = ok.clone();
        b.as_object_mut().unwrap().remove("source");
        assert!(Job::parse(&b).unwrap_err().message.contains("`source`"));
    }
}
