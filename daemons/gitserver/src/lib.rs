//! paddock-gitserver: `git push` over OpenSSH.
//!
//! The root daemon holds the cluster key and runs its own sshd. sshd's helpers —
//! the AuthorizedKeysCommand (`paddock-gitserver keys`), the forced command
//! (`serve`) and the repositories' pre-receive hook (`hook`) — run as the `git`
//! account, cannot read the cluster file, and only talk to this daemon over a unix
//! socket that checks its caller with SO_PEERCRED. A push stores the pushed tree in
//! the blobstore, takes the app's build lease on the locker, has a deployer build
//! it, and relays the build's log to the pusher as it comes; a failed build makes
//! the hook fail, so git moves no ref.
//!
//! Architecture invariant: nothing the `git` account runs holds a secret or decides
//! anything; every decision (which key, which user, which app, may they push) is
//! made here or by the api, from the socket's request and the peer's uid.

pub mod helpers;
pub mod proto;
pub mod repos;
pub mod rules;
pub mod server;
pub mod settings;
pub mod sshd;

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::sync::Arc;

use anyhow::Context;
use paddock_config::{ClusterConfig, ConfigError};
use paddock_daemon::{Ctx, LoopKind, Routes, Spec};

pub use settings::{settings, GitserverSection, Settings, NAME};

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

/// Finds the git the helpers will run (an absolute path: sshd's PATH is not ours).
fn find_git() -> anyhow::Result<std::path::PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    std::env::split_paths(&path)
        .map(|d| d.join("git"))
        .find(|p| p.is_file() && crate::sshd::root_safe(p))
        .context("no root-owned git on PATH (install git)")
}

/// Repositories follow the apps: made when an app is created, removed when it is
/// destroyed (the api's `app.changed`), and reconciled with `apps.state` at start
/// and every 30 s, so a missed event heals.
fn spawn_app_sync(ctx: &Ctx, server: Arc<server::Server>) {
    use std::collections::HashSet;
    let c = ctx.clone();
    actix_rt::spawn(async move {
        let mut subscribed: HashSet<String> = HashSet::new();
        let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
        loop {
            if c.is_shutting_down() {
                return;
            }
            for svc in c.calls().services("api").await.unwrap_or_default() {
                let Some(ep) = svc.endpoints.get("pub") else {
                    continue;
                };
                if subscribed.contains(ep) {
                    continue;
                }
                match c.calls().subscribe(ep, "app.changed") {
                    Ok(mut events) => {
                        subscribed.insert(ep.clone());
                        let (server, tx) = (server.clone(), tx.clone());
                        actix_rt::spawn(async move {
                            while let Some(env) = events.recv().await {
                                let app = env.body["app"].as_str().unwrap_or_default();
                                match env.body["what"].as_str() {
                                    Some("destroyed") if rules::valid_app(app) => {
                                        let (repos, app) = (server.repos.clone(), app.to_string());
                                        let gone =
                                            tokio::task::spawn_blocking(move || repos.remove(&app))
                                                .await;
                                        if let Ok(Err(e)) = gone {
                                            tracing::warn!("could not remove a repository: {e:#}");
                                        }
                                    }
                                    // A new app: the reconcile learns its id.
                                    Some("created") => {
                                        let _ = tx.try_send(());
                                    }
                                    _ => {}
                                }
                            }
                        });
                    }
                    Err(e) => tracing::warn!("cannot subscribe to {ep}: {e}"),
                }
            }
            let reconciled = match reconcile_repos(&c, &server).await {
                Ok(()) => true,
                Err(e) => {
                    tracing::debug!("repositories not reconciled this time: {e:#}");
                    false
                }
            };
            // Until an api is found and heard, look again every second.
            let tick = if reconciled && !subscribed.is_empty() {
                30
            } else {
                1
            };
            let _ = tokio::time::timeout(std::time::Duration::from_secs(tick), rx.recv()).await;
        }
    });
}

async fn reconcile_repos(c: &Ctx, server: &server::Server) -> anyhow::Result<()> {
    let asked = std::time::SystemTime::now();
    let v = c
        .calls()
        .call_daemon("api", "apps.state", serde_json::json!({}))
        .await?;
    let listed: Vec<(String, Option<i64>)> = v["apps"]
        .as_array()
        .context("apps.state gave no apps")?
        .iter()
        .filter_map(|a| Some((a["name"].as_str()?.to_string(), a["id"].as_i64())))
        .collect();
    let repos = server.repos.clone();
    tokio::task::spawn_blocking(move || sync_repos(&repos, &listed, asked)).await?
}

fn sync_repos(
    repos: &repos::Repos,
    listed: &[(String, Option<i64>)],
    asked: std::time::SystemTime,
) -> anyhow::Result<()> {
    for (app, id) in listed {
        repos.ensure(app, *id)?;
    }
    let apps: std::collections::HashSet<&str> = listed.iter().map(|(a, _)| a.as_str()).collect();
    if apps.is_empty() {
        // An empty list removes nothing: a wrong answer must not cost every
        // repository (a destroyed app's goes with its `destroyed` event too).
        return Ok(());
    }
    for entry in std::fs::read_dir(&repos.root)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().to_string();
        let Some(app) = name.strip_suffix(".git") else {
            continue;
        };
        // A repository made after the listing belongs to an app newer than it.
        let older = entry
            .metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|t| t < asked);
        if !apps.contains(app) && older {
            tracing::info!(app, "removing the repository of a destroyed app");
            repos.remove(app)?;
        }
    }
    Ok(())
}

/// Lets other accounts pass through (o+x, never read) every existing parent of
/// `dir`: the `git` account must reach the socket and the repositories under it.
fn passable(dir: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let mut p = dir.parent();
    while let Some(d) = p {
        if let Ok(m) = std::fs::metadata(d) {
            if m.mode() & 0o001 == 0 {
                std::fs::set_permissions(
                    d,
                    std::fs::Permissions::from_mode((m.mode() & 0o7777) | 0o001),
                )
                .with_context(|| format!("letting the git account pass through {}", d.display()))?;
                tracing::info!(dir = %d.display(), "made passable (o+x) for the git account");
            }
        }
        p = d.parent();
    }
    Ok(())
}

pub async fn setup(ctx: Ctx) -> anyhow::Result<Routes> {
    let cfg = ctx.config();
    let s = settings(&cfg)?;
    let (uid, gid) = sshd::ensure_account(&s.user)?;
    let helper = sshd::helper_binary()?;
    let git = find_git()?;

    // Our directory: root's, passable by `git` (it reaches the socket and repos).
    passable(&s.dir)?;
    for d in [&s.dir, &s.repos()] {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(d)?;
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755))?;
    }
    let hook = format!(
        "#!/bin/sh\n# Written by paddock-gitserver.\nexec {} hook --socket {}\n",
        helper.display(),
        s.socket().display()
    );
    let repos = Arc::new(repos::Repos {
        root: s.repos(),
        uid,
        gid,
        git,
        hooks: s.dir.join("hooks"),
        ids: s.dir.join("ids"),
    });
    repos.write_hook(&hook)?;

    let socket = s.socket();
    let _ = std::fs::remove_file(&socket);
    let listener = tokio::net::UnixListener::bind(&socket)
        .with_context(|| format!("binding {}", socket.display()))?;
    // Anyone may connect; the peer's uid decides (root and `git` only).
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666))?;
    let server = Arc::new(server::Server::new(
        ctx.calls().clone(),
        repos,
        helper.clone(),
        socket.clone(),
        uid,
        ctx.identity(),
    ));
    spawn_app_sync(&ctx, server.clone());
    let listener = std::rc::Rc::new(listener);
    ctx.spawn_loop("socket", LoopKind::Critical, move || {
        let (l, server) = (listener.clone(), server.clone());
        async move {
            loop {
                let (stream, _) = l.accept().await?;
                tokio::task::spawn_local(server.clone().connection(stream));
            }
        }
    });

    if let Some(listen) = s.ssh_listen {
        let config = sshd::prepare(&s, listen, &helper)?;
        let sshd_bin = s.sshd.clone();
        ctx.spawn_loop("sshd", LoopKind::Resilient, move || {
            let (bin, config) = (sshd_bin.clone(), config.clone());
            async move { sshd::run(&bin, &config).await }
        });
        tracing::info!(%listen, "sshd for git pushes");
    } else {
        tracing::info!("no ssh_listen: this gitserver runs no sshd of its own");
    }
    Ok(Routes::new())
}
