//! The daemon's side of the helpers' unix socket: key lookups, push authorization,
//! and the push itself (source to the blobstore, the build lease, the deployer's
//! log relayed to the pusher line by line).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use paddock_daemon::calls::Calls;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::proto::{PushLine, Reply, Request, MAX_LINE};
use crate::repos::Repos;
use crate::rules::{self, RefUpdate, Service};

/// The biggest source tree a push may send (the `git archive` tar).
pub const MAX_SOURCE: u64 = 1 << 30;
/// How long `serve`'s grant stays usable by its push's hook.
const GRANT_TTL: Duration = Duration::from_secs(3600);
/// A write to the pusher that takes longer than this means they stopped reading.
const PUSHER_STALL: Duration = Duration::from_secs(10);
/// The build lease: renewed well inside its TTL while the build runs.
const LEASE_TTL_MS: u64 = 30_000;
const LEASE_RENEW: Duration = Duration::from_secs(10);

struct Grant {
    user: String,
    app: String,
    fingerprint: String,
    expires: Instant,
}

pub struct Server {
    pub calls: Calls,
    pub repos: Arc<Repos>,
    pub helper: std::path::PathBuf,
    pub socket: std::path::PathBuf,
    pub git_uid: u32,
    pub identity: String,
    grants: Mutex<HashMap<String, Grant>>,
    /// Pushes rolling out, by app, oldest first; and how ended ones ended.
    inflight: Arc<Mutex<Flights>>,
    next_id: std::sync::atomic::AtomicU64,
}

impl Server {
    pub fn new(
        calls: Calls,
        repos: Arc<Repos>,
        helper: std::path::PathBuf,
        socket: std::path::PathBuf,
        git_uid: u32,
        identity: String,
    ) -> Server {
        Server {
            calls,
            repos,
            helper,
            socket,
            git_uid,
            identity,
            grants: Mutex::new(HashMap::new()),
            inflight: Arc::new(Mutex::new(Flights::default())),
            next_id: std::sync::atomic::AtomicU64::new(1),
        }
    }

    fn flights(&self) -> std::sync::MutexGuard<'_, Flights> {
        self.inflight.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Under the build lease, before anything is built: a push to a branch
    /// whose previous push is still rolling out must contain that push's commit
    /// (else its release would drop that code while git, at the end, refuses one
    /// of the two updates); one that does supersedes it: the older push is
    /// rejected, its branch never moves, and this one's update moves it past.
    async fn supersede<W>(
        &self,
        app: &str,
        deploy: &RefUpdate,
        quarantine: Option<&str>,
        pusher: &mut Pusher<W>,
    ) -> Result<Option<u64>, String>
    where
        W: tokio::io::AsyncWrite + Unpin,
    {
        let Some(prior) = self.flights().newest(app, &deploy.name) else {
            return Ok(None);
        };
        let branch = deploy.name.trim_start_matches("refs/heads/").to_string();
        let moving = || {
            format!(
                " !     {branch} is moving to {} (the push before yours has just gone live): \
                 fetch, and push again; nothing was built",
                short(&prior.commit)
            )
        };
        if prior.finishing {
            return Err(moving());
        }
        let repos = self.repos.clone();
        let (a, anc, new, q) = (
            app.to_string(),
            prior.commit.clone(),
            deploy.new.clone(),
            quarantine.map(str::to_string),
        );
        let contains =
            tokio::task::spawn_blocking(move || repos.is_ancestor(&a, &anc, &new, q.as_deref()))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("could not read the pushed history: {e:#}"))?;
        if !contains {
            return Err(format!(
                " !     A push of {} to {branch} is still rolling out and yours does not contain it: \
                 wait for it to end, fetch, merge or rebase, and push again; nothing was built",
                short(&prior.commit)
            ));
        }
        if self
            .flights()
            .get(app, prior.id)
            .is_some_and(|f| f.finishing)
        {
            return Err(moving());
        }
        pusher
            .say(&PushLine::Log {
                line: format!(
                    "-----> This push contains {}, still rolling out: its release will replace that deploy",
                    short(&prior.commit)
                ),
            })
            .await;
        Ok(Some(prior.id))
    }

    /// After a build: Some(why) when the branch no longer points where the push
    /// found it (another push landed meanwhile), so git would refuse its update.
    async fn branch_moved(&self, app: &str, deploy: &RefUpdate) -> Option<String> {
        (!self.branch_unmoved(app, deploy).await).then(|| {
            format!(
                " !     Push rejected: {} moved while this push built (another push landed): \
                 fetch, and push again; its release is marked failed",
                deploy.name.trim_start_matches("refs/heads/")
            )
        })
    }

    /// Whether the pushed branch still points where the push found it (git
    /// refuses to move a branch that moved since).
    async fn branch_unmoved(&self, app: &str, deploy: &RefUpdate) -> bool {
        let repos = self.repos.clone();
        let (a, r) = (app.to_string(), deploy.name.clone());
        let now = tokio::task::spawn_blocking(move || repos.resolve(&a, &r))
            .await
            .ok()
            .and_then(Result::ok)
            .flatten();
        now == (!rules::is_new_branch(&deploy.old)).then(|| deploy.old.clone())
    }

    /// A newer push's release exists (push `id`): in-flight push `prior` of
    /// `app` is superseded by it. Err when it has gone live meanwhile (git is
    /// moving the branch to its commit).
    fn replace_inflight(&self, app: &str, prior: u64, id: u64) -> Result<(), String> {
        let mut f = self.flights();
        match f.get_mut(app, prior) {
            Some(p) if p.finishing => Err(format!(
                " !     Push rejected: the push before yours went live while yours built, and git \
                 moves the branch to {}: fetch, and push again (your release is marked failed)",
                short(&p.commit)
            )),
            Some(p) => {
                p.superseded_by = Some(id);
                Ok(())
            }
            // It ended: the branch check after the build says whether it moved.
            None => Ok(()),
        }
    }

    /// The in-flight push `id` of `app` went live. It moves its branch
    /// (`Finishing`) unless a newer push's release replaces it: then it waits
    /// for that push's end, and is rejected if that push landed (its update
    /// moves the branch past this one), accepted if it failed (the scheduler
    /// rolled back to this one's release, which serves).
    fn settle_inflight(&self, app: &str, id: u64) -> Settle {
        let mut f = self.flights();
        let Some(by) = f.get(app, id).map(|p| p.superseded_by) else {
            return Settle::Finishing;
        };
        if let Some(b) = by {
            let newer_landed = f
                .ended
                .get(&b)
                .copied()
                .or_else(|| f.get(app, b).and_then(|n| n.finishing.then_some(true)));
            match newer_landed {
                Some(true) => {
                    return Settle::Rejected(
                        " !     Push rejected: a newer push that contains this one went live \
                         and moves the branch past it"
                            .into(),
                    )
                }
                Some(false) => {}
                None => return Settle::Wait,
            }
        }
        if let Some(p) = f.get_mut(app, id) {
            p.finishing = true;
        }
        Settle::Finishing
    }

    /// Serves one helper connection. Only root and the `git` account may talk.
    pub async fn connection(self: Arc<Self>, stream: UnixStream) {
        let uid = match stream.peer_cred() {
            Ok(c) => c.uid(),
            Err(_) => return,
        };
        if uid != 0 && uid != self.git_uid {
            static LAST: std::sync::Mutex<Option<Instant>> = std::sync::Mutex::new(None);
            let mut last = LAST.lock().unwrap_or_else(|e| e.into_inner());
            if last.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                *last = Some(Instant::now());
                tracing::warn!(
                    uid,
                    "refused a connection to the gitserver socket from a stranger (said at most every 10 s)"
                );
            }
            return;
        }
        let (rd, mut wr) = stream.into_split();
        let mut rd = BufReader::new(rd);
        let mut line = Vec::new();
        // The helpers send their one line at once; a connection that does not is
        // not one of them and holds nothing for long.
        let mut limited = (&mut rd).take(MAX_LINE as u64);
        let read = limited.read_until(b'\n', &mut line);
        let n = match tokio::time::timeout(Duration::from_secs(10), read).await {
            Ok(Ok(n)) => n,
            _ => return,
        };
        if n == 0 || line.last() != Some(&b'\n') {
            return;
        }
        let req: Request = match serde_json::from_slice(&line) {
            Ok(r) => r,
            Err(_) => {
                let _ = send(
                    &mut wr,
                    &refuse("the git service could not read the request"),
                )
                .await;
                return;
            }
        };
        match req {
            Request::Keys { fingerprint } => {
                let r = self.keys(&fingerprint).await;
                let _ = send(&mut wr, &r).await;
            }
            Request::Authorize {
                fingerprint,
                service,
                app,
            } => {
                let r = self.authorize(&fingerprint, &service, &app).await;
                let _ = send(&mut wr, &r).await;
            }
            Request::Push {
                token,
                refs,
                receive_pack,
                hook,
                quarantine,
            } => {
                let mut pusher = Pusher {
                    wr,
                    gone: false,
                    hook: hook.and_then(|pid| pidfd_of(pid, self.git_uid)),
                };
                let outcome = self
                    .push(
                        &token,
                        refs,
                        receive_pack,
                        quarantine.as_deref(),
                        rd,
                        &mut pusher,
                    )
                    .await;
                let (ok, message, held) = match outcome {
                    Ok((m, held)) => (true, m, held),
                    Err(m) => (false, m, None),
                };
                pusher
                    .say(&PushLine::Done {
                        done: true,
                        ok,
                        message,
                    })
                    .await;
                drop(pusher);
                if let Some(held) = held {
                    held.finish(&self).await;
                }
            }
        }
    }

    async fn api(
        &self,
        kind: &str,
        body: Value,
    ) -> Result<Value, paddock_daemon::calls::CallError> {
        self.calls.call_daemon("api", kind, body).await
    }

    /// sshd asks for a key: its authorized_keys line if a user has it.
    async fn keys(&self, fingerprint: &str) -> Reply {
        if !valid_fingerprint(fingerprint) {
            return refuse("not a SHA256 fingerprint");
        }
        let v = match self
            .api("sshkey.lookup", json!({ "fingerprint": fingerprint }))
            .await
        {
            Ok(v) => v,
            Err(e) => {
                if !is_not_found(&e) {
                    tracing::warn!("key lookup failed: {}", paddock_daemon::chain(&e));
                }
                return refuse("unknown key");
            }
        };
        let Some(key) = v["public_key"].as_str().and_then(key_text) else {
            return refuse("unknown key");
        };
        Reply {
            ok: true,
            line: Some(format!(
                "command=\"{} serve --socket {} {}\",restrict {}",
                self.helper.display(),
                self.socket.display(),
                fingerprint,
                key
            )),
            ..Default::default()
        }
    }

    /// The forced command asks whether this key may run `service` on `app`.
    async fn authorize(&self, fingerprint: &str, service: &str, app: &str) -> Reply {
        let Some(service) = Service::from_name(service) else {
            return refuse("unknown git service");
        };
        if !valid_fingerprint(fingerprint) || !rules::valid_app(app) {
            return refuse("not an app's repository");
        }
        let v = match self
            .api(
                "push.authorize",
                json!({ "fingerprint": fingerprint, "app": app }),
            )
            .await
        {
            Ok(v) => v,
            Err(e) => return refuse(&call_message(&e, app)),
        };
        let user = v["user"].as_str().unwrap_or_default().to_string();
        let repos = self.repos.clone();
        let (name, id) = (app.to_string(), v["app_id"].as_i64());
        let made = tokio::task::spawn_blocking(move || repos.ensure(&name, id)).await;
        let repo = match made {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                tracing::error!(app, "could not make the repository: {e:#}");
                return refuse("the app's repository could not be prepared; try again");
            }
            Err(e) => {
                tracing::error!(app, "making the repository panicked: {e}");
                return refuse("the app's repository could not be prepared; try again");
            }
        };
        let token = hex::encode(rand::random::<[u8; 24]>());
        if service == Service::ReceivePack {
            let mut g = self.grants.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            g.retain(|_, v| v.expires > now);
            g.insert(
                token.clone(),
                Grant {
                    user: user.clone(),
                    app: app.to_string(),
                    fingerprint: fingerprint.to_string(),
                    expires: now + GRANT_TTL,
                },
            );
        }
        tracing::info!(user, app, service = service.name(), "git access granted");
        Reply {
            ok: true,
            repo: Some(repo.display().to_string()),
            git: Some(self.repos.git.display().to_string()),
            hooks: Some(self.repos.hooks.display().to_string()),
            token: Some(token),
            ..Default::default()
        }
    }

    /// A push's pre-receive: the tar of the pushed commit follows on `rd`.
    async fn push<R, W>(
        &self,
        token: &str,
        refs: Vec<crate::proto::PushRef>,
        receive_pack: Option<i32>,
        quarantine: Option<&str>,
        rd: R,
        pusher: &mut Pusher<W>,
    ) -> Result<(String, Option<Held>), String>
    where
        R: tokio::io::AsyncRead + Unpin,
        W: tokio::io::AsyncWrite + Unpin,
    {
        let grant = {
            let mut g = self.grants.lock().unwrap_or_else(|e| e.into_inner());
            g.remove(token)
                .filter(|g| g.expires > Instant::now())
                .ok_or("this push was not authorized by Paddock's git service")?
        };
        let updates: Vec<RefUpdate> = refs
            .iter()
            .filter_map(|r| RefUpdate::parse(&format!("{} {} {}", r.old, r.new, r.name)))
            .collect();
        if updates.len() != refs.len() {
            return Err("the hook sent a ref update that is not one".into());
        }
        let deploy = rules::deploy_ref(&updates)?.clone();
        let app = grant.app.clone();
        let started = Instant::now();
        pusher
            .say(&PushLine::Log {
                line: format!("-----> Receiving {} for {app}", short(&deploy.new)),
            })
            .await;

        // One build per app at a time, across every gitserver: a locker lease,
        // taken before the tree is stored (so a long wait cannot outlast the
        // blobstore's grace for young blobs) and given up if the pusher leaves.
        let lease = Lease::acquire(&self.calls, &app, &self.identity, token, pusher).await?;
        let prepared = match self.prepare(&grant, &deploy, rd).await {
            Ok(source) => self
                .supersede(&app, &deploy, quarantine, pusher)
                .await
                .map(|prior| (source, prior)),
            Err(e) => Err(e),
        };
        let (source, prior) = match prepared {
            Ok(p) => p,
            Err(e) => {
                lease.release(&self.calls).await;
                return Err(e);
            }
        };
        let renew = lease.keep_renewed(self.calls.clone());
        // Subscribed before the build, so the rollout's first lines are not
        // published before anyone listens.
        let mut watch = DeployWatch::new(&self.calls, &app).await;
        let result = self
            .build(&app, &grant.user, &deploy, &source, pusher)
            .await;
        let held = Held {
            lease: Some(lease),
            inflight: None,
            flights: self.inflight.clone(),
            renew,
            repo: self.repos.path(&app),
            reference: deploy.name.clone(),
            new: deploy.new.clone(),
            receive_pack: receive_pack.and_then(|pid| pidfd_of(pid, self.git_uid)),
        };
        match result {
            // The hook was killed: git moves no ref, so there is nothing to wait for.
            Ok(_) if pusher.gone => {
                held.release(self).await;
                Err("the pusher went away; the build finished without them".into())
            }
            Ok((message, None)) => Ok((
                format!("{message} ({:.1} s)", started.elapsed().as_secs_f64()),
                Some(held),
            )),
            // A scheduler rolls the release out: the build lease goes now (a
            // newer push may build, and its release cancel this deploy), and
            // the push waits for the rollout's outcome.
            Ok((_, Some(version))) => {
                let id = self
                    .next_id
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                // Its release exists and replaces the push it contains: that
                // one waits for this one's end and is rejected if this one
                // lands. Unless it has just gone live, or the branch moved
                // while this one built (another push landed): git would refuse
                // this push's update at its end, so its release is marked
                // failed now, before it can go live.
                let replaced = match prior {
                    Some(prior) => self.replace_inflight(&app, prior, id),
                    None => Ok(()),
                };
                let moved = match replaced {
                    Err(e) => Some(e),
                    Ok(()) => self.branch_moved(&app, &deploy).await,
                };
                if let Some(e) = moved {
                    let _ = mark_failed(
                        &self.calls,
                        &app,
                        version,
                        "its branch moved while it built",
                    )
                    .await;
                    held.release(self).await;
                    return Err(e);
                }
                // In flight from now until git has moved the branch (or the
                // push ended without): a newer push to the branch must contain
                // this commit (supersede).
                self.flights().push(
                    &app,
                    Inflight {
                        id,
                        reference: deploy.name.clone(),
                        commit: deploy.new.clone(),
                        superseded_by: None,
                        finishing: false,
                    },
                );
                let mut held = held;
                held.inflight = Some((app.clone(), id));
                if let Some(l) = held.lease.take() {
                    held.renew.abort();
                    l.release(&self.calls).await;
                }
                pusher
                    .say(&PushLine::Log {
                        line: format!("-----> Rolling out v{version}"),
                    })
                    .await;
                match watch.follow(self, &app, id, version, pusher).await {
                    Ok(said) => Ok((
                        format!("{said} ({:.1} s)", started.elapsed().as_secs_f64()),
                        Some(held),
                    )),
                    Err(e) => {
                        held.release(self).await;
                        Err(e)
                    }
                }
            }
            Err(e) => {
                held.release(self).await;
                Err(e)
            }
        }
    }

    /// Under the lease: access checked again (it may have been taken away while
    /// the push waited), the branch checked unmoved, the pushed tree stored.
    async fn prepare<R>(&self, grant: &Grant, deploy: &RefUpdate, rd: R) -> Result<String, String>
    where
        R: tokio::io::AsyncRead + Unpin,
    {
        let app = &grant.app;
        if let Err(e) = self
            .api(
                "push.authorize",
                json!({ "fingerprint": grant.fingerprint, "app": app }),
            )
            .await
        {
            return Err(call_message(&e, app));
        }
        // A push that waited for another may find its branch moved meanwhile; git
        // would refuse to move it after the build, so it is refused before one.
        if !self.branch_unmoved(app, deploy).await {
            return Err(format!(
                " !     {} moved while this push waited (another push landed first): \
                 fetch, merge or rebase, and push again; nothing was built",
                deploy.name.trim_start_matches("refs/heads/")
            ));
        }
        let source = paddock_blob::put_reader(&self.calls, Tarball::new(rd))
            .await
            .map_err(|e| {
                format!(
                    "could not store the pushed source: {}",
                    paddock_daemon::chain(&e)
                )
            })?;
        tracing::info!(
            app,
            user = grant.user,
            commit = deploy.new,
            size = source.size,
            "source stored"
        );
        Ok(source.sha256)
    }

    async fn build<W>(
        &self,
        app: &str,
        user: &str,
        deploy: &RefUpdate,
        source: &str,
        pusher: &mut Pusher<W>,
    ) -> Result<(String, Option<u64>), String>
    where
        W: tokio::io::AsyncWrite + Unpin,
    {
        // A deployer that is restarting (or not yet in the registry) is waited
        // for a little; the pusher is told once.
        let body = json!({
            "app": app,
            "commit": deploy.new,
            "source": source,
            "ref": deploy.name,
            "pusher": user,
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut told = false;
        let started = loop {
            match self
                .calls
                .call_daemon("deployer", "build.start", body.clone())
                .await
            {
                Err(paddock_daemon::calls::CallError::Find(_)) if Instant::now() < deadline => {
                    if !told {
                        told = true;
                        pusher
                            .say(&PushLine::Log {
                                line: "-----> Waiting for a deployer to be up".into(),
                            })
                            .await;
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                r => {
                    break r.map_err(|e| {
                        format!("the build could not start: {}", paddock_daemon::chain(&e))
                    })?
                }
            }
        };
        let build = started["build"]
            .as_str()
            .ok_or("the deployer gave no build id")?
            .to_string();
        let endpoint = self
            .calls
            .find("deployer")
            .await
            .map_err(|e| format!("the deployer went away: {e}"))?
            .remove(0);
        let mut after = 0u64;
        let mut failures = 0;
        loop {
            let r = self
                .calls
                .call(
                    &endpoint,
                    "build.log",
                    json!({ "build": build, "after": after, "wait_ms": 20_000 }),
                    Duration::from_secs(30),
                )
                .await;
            let v = match r {
                Ok(v) => {
                    failures = 0;
                    v
                }
                Err(e) => {
                    failures += 1;
                    if failures > 5 {
                        return Err(format!(
                            "lost the build's log ({e}); see `paddock builds info {build}`"
                        ));
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            for l in v["lines"].as_array().into_iter().flatten() {
                if let Some(l) = l.as_str() {
                    // A pusher that hung up or stopped reading does not stop the
                    // build (as on Heroku): its lines are just not sent.
                    pusher
                        .say(&PushLine::Log {
                            line: l.to_string(),
                        })
                        .await;
                }
            }
            after = v["next"].as_u64().unwrap_or(after);
            if v["done"].as_bool() == Some(true) {
                return match v["status"].as_str() {
                    Some("succeeded") => {
                        let version = v["release"]["version"].as_u64();
                        // Left pending by the deployer: a scheduler rolls it out.
                        let pending = v["release"]["status"].as_str() == Some("pending");
                        Ok(match version {
                            Some(n) => (format!("-----> Done: {app} v{n}"), pending.then_some(n)),
                            None => (format!("-----> Done: {app} built"), None),
                        })
                    }
                    _ => {
                        let step = v["error"]["step"].as_str().unwrap_or("build");
                        let msg = v["error"]["message"].as_str().unwrap_or("the build failed");
                        Err(format!(
                            " !     Push rejected: {step} failed: {msg} (build {build}; nothing was deployed)"
                        ))
                    }
                };
            }
        }
    }
}

/// How long a push waits for its rollout at most: the scheduler's own deadlines
/// (progress, then a rollback's) end every deploy well before.
const ROLLOUT_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// With no scheduler in the registry for this long, the push stops waiting.
const NO_SCHEDULER: Duration = Duration::from_secs(30);

/// The schedulers' `deploy.*` events of one app, for a push following its
/// rollout.
struct DeployWatch {
    app: String,
    /// Every scheduler's events go here; a task keeps the app's.
    raw: tokio::sync::mpsc::Sender<paddock_wire::Envelope>,
    rx: tokio::sync::mpsc::Receiver<paddock_wire::Envelope>,
    subscribed: std::collections::BTreeSet<String>,
    said_unsubscribable: std::collections::BTreeSet<String>,
}

impl DeployWatch {
    async fn new(calls: &Calls, app: &str) -> DeployWatch {
        let (raw, mut raw_rx) = tokio::sync::mpsc::channel::<paddock_wire::Envelope>(1024);
        let (tx, rx) = tokio::sync::mpsc::channel(1024);
        // Only this app's events are kept (the build may take minutes while
        // other apps deploy); the task ends when the watch is dropped.
        let mine = app.to_string();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    ev = raw_rx.recv() => {
                        let Some(ev) = ev else { return };
                        if ev.body["app"].as_str() == Some(mine.as_str())
                            && tx.send(ev).await.is_err()
                        {
                            return;
                        }
                    }
                    // The watch is gone: its subscriptions end with this task.
                    _ = tx.closed() => return,
                }
            }
        });
        let mut w = DeployWatch {
            app: app.to_string(),
            raw,
            rx,
            subscribed: Default::default(),
            said_unsubscribable: Default::default(),
        };
        w.subscribe(calls).await;
        w
    }

    /// Subscribes to every scheduler not yet listened to. `Some(false)` when
    /// the registry lists none, `None` when it could not be asked.
    async fn subscribe(&mut self, calls: &Calls) -> Option<bool> {
        let list = calls.services("scheduler").await.ok()?;
        for s in &list {
            let Some(publish) = s.endpoints.get("pub") else {
                continue;
            };
            if self.subscribed.insert(publish.clone()) {
                if let Err(e) = calls
                    .wire()
                    .subscribe_into(publish, "deploy.", self.raw.clone())
                {
                    self.subscribed.remove(publish);
                    if self.said_unsubscribable.insert(publish.clone()) {
                        tracing::warn!("cannot follow the scheduler's deploys at {publish}: {e}");
                    }
                }
            }
        }
        Some(!list.is_empty())
    }

    /// Whether any scheduler leads (asks each registered one); `None` when
    /// none could be asked.
    async fn leader(calls: &Calls) -> Option<bool> {
        let list = calls.services("scheduler").await.ok()?;
        let mut asked = false;
        for s in list {
            let Some(rpc) = s.endpoints.get("rpc") else {
                continue;
            };
            match calls
                .call(rpc, "scheduler.status", json!({}), Duration::from_secs(2))
                .await
            {
                Ok(v) if v["leader"] == true => return Some(true),
                Ok(_) => asked = true,
                Err(_) => {}
            }
        }
        asked.then_some(false)
    }

    /// Relays the deploy of v`version` to the pusher until the release is
    /// marked: Ok with the last line when it serves, Err with the reason when it
    /// failed (the previous release keeps serving) or a newer push superseded
    /// this one (`id` in the server's in-flight map).
    async fn follow<W>(
        &mut self,
        server: &Server,
        app: &str,
        id: u64,
        version: u64,
        pusher: &mut Pusher<W>,
    ) -> Result<String, String>
    where
        W: tokio::io::AsyncWrite + Unpin,
    {
        let calls = &server.calls;
        let deadline = Instant::now() + ROLLOUT_TIMEOUT;
        let mut next_check = Instant::now();
        let mut next_leader_check = Instant::now() + Duration::from_secs(5);
        let mut last_keepalive = Instant::now();
        let mut lonely_since: Option<Instant> = None;
        let mut failures = 0u32;
        loop {
            let now = Instant::now();
            if now >= next_check {
                next_check = now + Duration::from_secs(1);
                let r = calls
                    .call_daemon(
                        "api",
                        "release.get",
                        json!({"app": app, "version": version}),
                    )
                    .await;
                match r {
                    Ok(v) => {
                        failures = 0;
                        let r = &v["release"];
                        match r["status"].as_str() {
                            Some("succeeded") => {
                                self.drain(version, pusher).await;
                                let mut told = false;
                                loop {
                                    match server.settle_inflight(app, id) {
                                        Settle::Finishing => break,
                                        Settle::Rejected(why) => return Err(why),
                                        Settle::Wait => {}
                                    }
                                    if !told {
                                        told = true;
                                        pusher
                                            .say(&PushLine::Log {
                                                line: "-----> Live; a newer push that contains this one is rolling out: waiting for it".into(),
                                            })
                                            .await;
                                    }
                                    if pusher.gone || Instant::now() > deadline {
                                        return Err("gave up waiting for the newer push".into());
                                    }
                                    pusher.keepalive().await;
                                    tokio::time::sleep(Duration::from_secs(1)).await;
                                }
                                return Ok(format!("-----> Done: {app} v{version} is serving"));
                            }
                            Some("failed") => {
                                self.drain(version, pusher).await;
                                let why = r["status_message"]
                                    .as_str()
                                    .filter(|m| !m.is_empty())
                                    .unwrap_or("the deploy failed");
                                return Err(format!(
                                    " !     Push rejected: v{version} did not go live: {}. \
                                     The previous release keeps serving; see `paddock deploys info {version}`",
                                    clean(why)
                                ));
                            }
                            _ => {}
                        }
                    }
                    Err(e) => {
                        failures += 1;
                        if failures == 5 {
                            tracing::warn!(
                                app,
                                "cannot read v{version}'s status: {}",
                                paddock_daemon::chain(&e)
                            );
                        }
                    }
                }
                // Nobody to roll it out (no scheduler registered, or none
                // leads) for a while: the release is marked failed, so that it
                // does not go live later behind the pusher's back.
                let mut lonely = self.subscribe(calls).await == Some(false);
                if !lonely && now >= next_leader_check {
                    next_leader_check = now + Duration::from_secs(5);
                    lonely = Self::leader(calls).await == Some(false);
                } else if !lonely && lonely_since.is_some() {
                    lonely = true; // until the next leader check says otherwise
                }
                if !lonely {
                    lonely_since = None;
                } else if lonely_since.get_or_insert(now).elapsed() > NO_SCHEDULER {
                    let why = "no scheduler rolled it out (none was running, or none led)";
                    if mark_failed(calls, app, version, why).await.is_ok() {
                        return Err(format!(
                            " !     Push rejected: v{version} did not go live: {why}; \
                             it is marked failed. Ask the operator to start a scheduler, then push again"
                        ));
                    }
                    // Marked meanwhile (a scheduler came): its status is read
                    // at the next check.
                    lonely_since = None;
                }
                if now > deadline {
                    return Err(format!(
                        " !     Push rejected: v{version} did not go live within {} minutes; \
                         see `paddock deploys info {version}`",
                        ROLLOUT_TIMEOUT.as_secs() / 60
                    ));
                }
                if pusher.gone {
                    // Its branch will not move: the release must not go live
                    // behind it. Marked failed while still pending (a deploy
                    // under way is then undone by the scheduler's reconcile).
                    let why = "its pusher left before it went live";
                    let _ = mark_failed(calls, app, version, why).await;
                    return Err("the pusher went away; the release was cancelled".into());
                }
                if last_keepalive.elapsed() > Duration::from_secs(5) {
                    last_keepalive = Instant::now();
                    pusher.keepalive().await;
                }
            }
            let wait = next_check.saturating_duration_since(Instant::now());
            tokio::select! {
                ev = self.rx.recv() => {
                    if let Some(ev) = ev {
                        if self.relay(&ev, version, pusher).await {
                            // Its outcome is being recorded: look at once.
                            next_check = Instant::now() + Duration::from_millis(50);
                        }
                    }
                }
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Says a `deploy.progress` line of this deploy; true on its `deploy.done`.
    async fn relay<W>(
        &mut self,
        ev: &paddock_wire::Envelope,
        version: u64,
        pusher: &mut Pusher<W>,
    ) -> bool
    where
        W: tokio::io::AsyncWrite + Unpin,
    {
        if ev.body["app"].as_str() != Some(self.app.as_str())
            || ev.body["version"].as_u64() != Some(version)
        {
            return false;
        }
        match ev.kind.as_str() {
            "deploy.progress" => {
                if let Some(line) = ev.body["line"].as_str() {
                    let line: String = clean(line).chars().take(500).collect();
                    pusher
                        .say(&PushLine::Log {
                            line: format!("       {line}"),
                        })
                        .await;
                }
                false
            }
            "deploy.done" => true,
            _ => false,
        }
    }

    /// The lines already come in, said before the outcome.
    async fn drain<W>(&mut self, version: u64, pusher: &mut Pusher<W>)
    where
        W: tokio::io::AsyncWrite + Unpin,
    {
        let until = Instant::now() + Duration::from_millis(100);
        while let Ok(Some(ev)) = tokio::time::timeout_at(until.into(), self.rx.recv()).await {
            self.relay(&ev, version, pusher).await;
        }
    }
}

/// Marks a pending release failed at the api, so it never goes live (`conflict`
/// when it was marked already).
async fn mark_failed(
    calls: &Calls,
    app: &str,
    version: u64,
    why: &str,
) -> Result<Value, paddock_daemon::calls::CallError> {
    calls
        .call_daemon(
            "api",
            "release.status",
            json!({"app": app, "version": version, "status": "failed", "message": why}),
        )
        .await
}

/// A line for the pusher's terminal: control characters (escape sequences,
/// carriage returns, newlines) shown as `?`.
fn clean(line: &str) -> String {
    line.chars()
        .map(|c| if c.is_control() && c != '\t' { '?' } else { c })
        .collect()
}

/// A built push's lease, kept until git has moved the branch: released the moment
/// the next push could check the branch and find it not yet moved, it would build
/// a push that git then refuses.
struct Held {
    /// The build lease, while held (given up for the rollout).
    lease: Option<Lease>,
    /// The push's entry in the in-flight map, from the rollout on.
    inflight: Option<(String, u64)>,
    /// That map, for `Drop`: an entry must not outlive its push (a task
    /// cancelled or panicking would leave every later push of the app refused).
    flights: Arc<Mutex<Flights>>,
    renew: tokio::task::JoinHandle<()>,
    repo: std::path::PathBuf,
    reference: String,
    new: String,
    /// `git receive-pack`, as a pidfd: once it has ended, the ref will not move.
    receive_pack: Option<std::os::fd::OwnedFd>,
}

impl Held {
    async fn finish(mut self, server: &Server) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let loose = self.repo.join(&self.reference);
        let moved = loop {
            let moved = read_nofollow(&loose).is_some_and(|s| s.trim() == self.new);
            // Without receive-pack's pidfd, the ref is watched until the deadline.
            let ended = self.receive_pack.as_ref().is_some_and(exited);
            if moved || ended || Instant::now() > deadline {
                break moved || read_nofollow(&loose).is_some_and(|s| s.trim() == self.new);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        if let Some((app, id)) = self.inflight.take() {
            server.flights().end(&app, id, moved);
        }
        self.release(server).await;
    }

    /// Gives up what is held at once (git will move no ref).
    async fn release(mut self, server: &Server) {
        self.renew.abort();
        if let Some(l) = self.lease.take() {
            l.release(&server.calls).await;
        }
        if let Some((app, id)) = self.inflight.take() {
            server.flights().end(&app, id, false);
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some((app, id)) = self.inflight.take() {
            self.flights
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .end(&app, id, false);
        }
    }
}

/// The outcome of an in-flight push that went live (`Server::settle_inflight`).
enum Settle {
    Finishing,
    Rejected(String),
    /// A newer push's release replaces it: wait for that push's end.
    Wait,
}

/// A push whose release is rolling out (or has just gone live, its branch about
/// to move).
#[derive(Debug, Clone)]
struct Inflight {
    id: u64,
    reference: String,
    commit: String,
    /// A newer push that contains this commit has made a release: this push
    /// waits for that one's end (`settle_inflight`).
    superseded_by: Option<u64>,
    /// Its rollout succeeded: git is about to move the branch to `commit`.
    finishing: bool,
}

/// The in-flight pushes of every app, oldest first, and whether each ended
/// one moved its branch (kept for pushes it superseded; the last 1,024).
#[derive(Debug, Default)]
struct Flights {
    by_app: HashMap<String, Vec<Inflight>>,
    ended: HashMap<u64, bool>,
    ended_order: std::collections::VecDeque<u64>,
}

impl Flights {
    fn newest(&self, app: &str, reference: &str) -> Option<Inflight> {
        self.by_app
            .get(app)?
            .iter()
            .rev()
            .find(|f| f.reference == reference)
            .cloned()
    }

    fn get(&self, app: &str, id: u64) -> Option<&Inflight> {
        self.by_app.get(app)?.iter().find(|f| f.id == id)
    }

    fn get_mut(&mut self, app: &str, id: u64) -> Option<&mut Inflight> {
        self.by_app.get_mut(app)?.iter_mut().find(|f| f.id == id)
    }

    fn push(&mut self, app: &str, f: Inflight) {
        self.by_app.entry(app.to_string()).or_default().push(f);
    }

    fn end(&mut self, app: &str, id: u64, moved: bool) {
        if let Some(list) = self.by_app.get_mut(app) {
            list.retain(|f| f.id != id);
            if list.is_empty() {
                self.by_app.remove(app);
            }
        }
        self.ended.insert(id, moved);
        self.ended_order.push_back(id);
        while self.ended_order.len() > 1024 {
            if let Some(old) = self.ended_order.pop_front() {
                self.ended.remove(&old);
            }
        }
    }
}

/// A small file of the `git` account's, read without following a symlink it
/// may have put there.
fn read_nofollow(path: &std::path::Path) -> Option<String> {
    use std::io::Read as _;
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .ok()?;
    if !f.metadata().ok()?.is_file() {
        return None;
    }
    let mut s = String::new();
    f.take(256).read_to_string(&mut s).ok()?;
    Some(s)
}

/// The pusher's end of a push: the hook's socket, written with a deadline. Once
/// a write fails or stalls, the pusher is gone: nothing more is sent, and the
/// hook is killed, since git (receive-pack) would otherwise wait for it forever
/// while its stderr is full; the push then fails and no ref moves.
pub struct Pusher<W> {
    wr: W,
    gone: bool,
    hook: Option<std::os::fd::OwnedFd>,
}

impl<W: tokio::io::AsyncWrite + Unpin> Pusher<W> {
    /// Sends a line; false once the pusher is gone.
    async fn say(&mut self, line: &PushLine) -> bool {
        if self.gone {
            return false;
        }
        match tokio::time::timeout(PUSHER_STALL, send(&mut self.wr, line)).await {
            Ok(Ok(())) => true,
            _ => {
                self.gone = true;
                if let Some(fd) = &self.hook {
                    use std::os::fd::AsRawFd;
                    // SAFETY: pidfd_send_signal on a pidfd we own; no siginfo.
                    unsafe {
                        libc::syscall(
                            libc::SYS_pidfd_send_signal,
                            fd.as_raw_fd(),
                            libc::SIGKILL,
                            std::ptr::null::<libc::siginfo_t>(),
                            0,
                        )
                    };
                }
                tracing::info!("the pusher stopped reading or went away; the push is ended");
                false
            }
        }
    }

    async fn keepalive(&mut self) -> bool {
        self.say(&PushLine::Keepalive { keepalive: true }).await
    }
}

/// The pushed tree as it arrives: at most [`MAX_SOURCE`] bytes, and only a
/// whole tar (ending in its two zero blocks), or reading fails and the upload is
/// never committed.
struct Tarball<R> {
    inner: R,
    seen: u64,
    tail: Vec<u8>,
}

impl<R> Tarball<R> {
    fn new(inner: R) -> Tarball<R> {
        Tarball {
            inner,
            seen: 0,
            tail: Vec::with_capacity(2048),
        }
    }
}

impl<R: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Tarball<R> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::task::Poll;
        let before = buf.filled().len();
        match std::pin::Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {}
            other => return other,
        }
        let new = &buf.filled()[before..];
        if new.is_empty() {
            let whole = self.tail.len() >= 1024
                && self.tail[self.tail.len() - 1024..].iter().all(|b| *b == 0);
            if !whole {
                return Poll::Ready(Err(std::io::Error::other(
                    "the pushed tree arrived incomplete (git archive did not finish)",
                )));
            }
            return Poll::Ready(Ok(()));
        }
        let n = new.len() as u64;
        let new = new.to_vec();
        let me = &mut *self;
        me.seen += n;
        if me.seen > MAX_SOURCE {
            return Poll::Ready(Err(std::io::Error::other(format!(
                "the pushed tree is larger than {} MiB; leave big files out of the repository",
                MAX_SOURCE >> 20
            ))));
        }
        me.tail.extend_from_slice(&new);
        if me.tail.len() > 1024 {
            let cut = me.tail.len() - 1024;
            me.tail.drain(..cut);
        }
        Poll::Ready(Ok(()))
    }
}

/// A pidfd for `pid` if it is a process of the `git` account (the hook's parent).
fn pidfd_of(pid: i32, uid: u32) -> Option<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: pidfd_open returns a new fd (close-on-exec by the kernel) or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: the fd was just returned to us and is owned by nobody else.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) };
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let real = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .next()?
        .parse::<u32>()
        .ok()?;
    (real == uid).then_some(fd)
}

/// Whether the process behind a pidfd has ended (its fd polls readable).
fn exited(fd: &std::os::fd::OwnedFd) -> bool {
    use std::os::fd::AsRawFd;
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll on one pollfd we own, without waiting.
    unsafe { libc::poll(&mut p, 1, 0) == 1 }
}

/// The push lease `push/APP` on the locker, taken for the build and release only.
struct Lease {
    name: String,
    token: i64,
}

impl Lease {
    async fn acquire<W>(
        calls: &Calls,
        app: &str,
        identity: &str,
        push: &str,
        pusher: &mut Pusher<W>,
    ) -> Result<Lease, String>
    where
        W: tokio::io::AsyncWrite + Unpin,
    {
        let name = format!("push/{app}");
        let owner = format!("{identity}/{}", &push[..12.min(push.len())]);
        let mut told = false;
        let deadline = Instant::now() + Duration::from_secs(3600);
        loop {
            // Between waits, a keepalive: a pusher who left is noticed here, and
            // nothing is built for them.
            if told && !pusher.keepalive().await {
                return Err("the pusher went away while waiting; nothing was built".into());
            }
            let wait = if told { 2_000 } else { 0 };
            let r = calls
                .call_daemon_timeout(
                    "locker",
                    "lock.acquire",
                    json!({ "name": name, "owner": owner, "ttl_ms": LEASE_TTL_MS, "wait_ms": wait }),
                    Duration::from_millis(wait + 5_000),
                )
                .await;
            match r {
                Ok(v) => {
                    let token = v["token"].as_i64().ok_or("the locker gave no token")?;
                    return Ok(Lease { name, token });
                }
                Err(e) if is_code(&e, "held") => {
                    if !told {
                        told = true;
                        pusher
                            .say(&PushLine::Log {
                                line: format!(
                                    "-----> Another push to {app} is building; waiting for it to finish"
                                ),
                            })
                            .await;
                    }
                }
                Err(e) => {
                    return Err(format!(
                        "could not take the build lease: {}",
                        paddock_daemon::chain(&e)
                    ))
                }
            }
            if Instant::now() > deadline {
                return Err("waited an hour for another push's build; try again".into());
            }
        }
    }

    fn keep_renewed(&self, calls: Calls) -> tokio::task::JoinHandle<()> {
        let (name, token) = (self.name.clone(), self.token);
        tokio::task::spawn_local(async move {
            loop {
                tokio::time::sleep(LEASE_RENEW).await;
                if let Err(e) = calls
                    .call_daemon(
                        "locker",
                        "lock.renew",
                        json!({ "name": name, "token": token, "ttl_ms": LEASE_TTL_MS }),
                    )
                    .await
                {
                    tracing::warn!(
                        lease = name,
                        "renewing the build lease failed: {}",
                        paddock_daemon::chain(&e)
                    );
                }
            }
        })
    }

    async fn release(&self, calls: &Calls) {
        if let Err(e) = calls
            .call_daemon(
                "locker",
                "lock.release",
                json!({ "name": self.name, "token": self.token }),
            )
            .await
        {
            tracing::warn!(
                lease = self.name,
                "releasing the build lease failed (it expires by itself): {}",
                paddock_daemon::chain(&e)
            );
        }
    }
}

fn refuse(message: &str) -> Reply {
    Reply {
        ok: false,
        message: Some(message.to_string()),
        ..Default::default()
    }
}

async fn send<W, T>(wr: &mut W, v: &T) -> std::io::Result<()>
where
    W: tokio::io::AsyncWrite + Unpin,
    T: serde::Serialize,
{
    let mut b = serde_json::to_vec(v).map_err(std::io::Error::other)?;
    b.push(b'\n');
    wr.write_all(&b).await?;
    wr.flush().await
}

fn short(commit: &str) -> &str {
    &commit[..commit.len().min(10)]
}

/// `SHA256:` and unpadded base64, as sshd's `%f` gives it.
pub fn valid_fingerprint(fp: &str) -> bool {
    fp.strip_prefix("SHA256:").is_some_and(|b| {
        (40..=50).contains(&b.len())
            && b.bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'+' || c == b'/')
    })
}

/// `TYPE BASE64` of a stored public key, without its comment, checked to be
/// nothing sshd would read as options.
fn key_text(stored: &str) -> Option<String> {
    let mut it = stored.split_whitespace();
    let (t, b) = (it.next()?, it.next()?);
    let t_ok = t
        .bytes()
        .all(|c| c.is_ascii_alphanumeric() || b"-@.".contains(&c));
    let b_ok = b
        .bytes()
        .all(|c| c.is_ascii_alphanumeric() || b"+/=".contains(&c));
    (t_ok && b_ok).then(|| format!("{t} {b}"))
}

fn is_code(e: &paddock_daemon::calls::CallError, code: &str) -> bool {
    use paddock_daemon::calls::CallError;
    use paddock_wire::ClientError;
    matches!(e, CallError::Call(ClientError::Remote(w)) if w.code.as_str() == code)
}

fn is_not_found(e: &paddock_daemon::calls::CallError) -> bool {
    is_code(e, "not_found")
}

/// What the pusher reads when the api says no (or cannot say).
fn call_message(e: &paddock_daemon::calls::CallError, app: &str) -> String {
    let text = paddock_daemon::chain(e);
    if is_code(e, "forbidden") || is_not_found(e) {
        // The api's own words: "user X may not push to app Y", "no such app".
        text
    } else {
        tracing::warn!(app, "push authorization failed: {text}");
        "Paddock could not check your access right now; try again shortly".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_and_keys_are_checked_before_they_reach_sshd() {
        assert!(valid_fingerprint(
            "SHA256:uNiVztksCsDhcc0u9e8BujQXVUpKZIDTMczCvj3tD2s"
        ));
        assert!(!valid_fingerprint("SHA256:abc\" ,command=\"sh"));
        assert!(!valid_fingerprint("MD5:aa:bb"));
        assert_eq!(
            key_text("ssh-ed25519 AAAAC3Nz+/= a comment").as_deref(),
            Some("ssh-ed25519 AAAAC3Nz+/=")
        );
        assert_eq!(key_text("ssh-ed25519 AAA\",command=\"x"), None);
        assert_eq!(key_text("ssh-ed25519"), None);
    }
}
