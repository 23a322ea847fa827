//! Bare repositories, one per app, owned by the `git` account; their hooks are
//! root's, so nothing a push does can change what runs at the next push.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::rules::valid_app;

pub struct Repos {
    pub root: PathBuf,
    pub uid: u32,
    pub gid: u32,
    pub git: PathBuf,
    /// The root-owned hooks directory every push runs with (`core.hooksPath`):
    /// never inside a repository, which the `git` account owns.
    pub hooks: PathBuf,
    /// Root-only: which app (by its id) each repository was made for, so an app
    /// made again under a destroyed app's name never gets the old history.
    pub ids: PathBuf,
}

impl Repos {
    pub fn path(&self, app: &str) -> PathBuf {
        self.root.join(format!("{app}.git"))
    }

    /// Where `reference` points in the app's repository now (`None`: nowhere).
    pub fn resolve(&self, app: &str, reference: &str) -> Result<Option<String>> {
        let out = self.run_git(&["rev-parse", "--verify", "-q", reference], &self.path(app))?;
        let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
        Ok((out.status.success() && !id.is_empty()).then_some(id))
    }

    /// Whether `ancestor` is in `commit`'s history; `quarantine` is the push's
    /// quarantine of new objects (only a directory `objects/incoming-*` of the
    /// app's repository is used; git reads it as the `git` account).
    pub fn is_ancestor(
        &self,
        app: &str,
        ancestor: &str,
        commit: &str,
        quarantine: Option<&str>,
    ) -> Result<bool> {
        let repo = self.path(app);
        let objects = repo.join("objects");
        // An ancestor that is not among the repository's objects nor the push's
        // (a commit still in another push's quarantine, which this push did
        // not send) is not in its history.
        let probe = format!("{ancestor}^{{commit}}");
        let mut has = self.git_command(&["cat-file", "-e", &probe], &repo);
        let mut cmd = self.git_command(&["merge-base", "--is-ancestor", ancestor, commit], &repo);
        if let Some(q) = quarantine {
            // Both resolved (git names its quarantine by its real path): a
            // directory `incoming-*` (`tmp_objdir-incoming-*` since git 2.34)
            // right inside the repository's objects.
            let objects = std::fs::canonicalize(&objects)
                .with_context(|| format!("resolving {}", objects.display()))?;
            let q = std::fs::canonicalize(q).context("resolving the push's quarantine")?;
            let inside = q.parent() == Some(objects.as_path())
                && q.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                    n.starts_with("incoming-") || n.starts_with("tmp_objdir-incoming-")
                });
            if !inside {
                bail!(
                    "the hook named a quarantine outside the app's repository ({})",
                    q.display()
                );
            }
            for c in [&mut cmd, &mut has] {
                c.env("GIT_OBJECT_DIRECTORY", &q)
                    .env("GIT_ALTERNATE_OBJECT_DIRECTORIES", &objects);
            }
        }
        if !has
            .output()
            .context("running git cat-file")?
            .status
            .success()
        {
            return Ok(false);
        }
        let out = cmd.output().context("running git merge-base")?;
        match out.status.code() {
            Some(0) => Ok(true),
            Some(1) => Ok(false),
            _ => bail!(
                "git merge-base failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        }
    }

    fn as_git(&self, args: &[&str], dir: &Path) -> Result<()> {
        let out = self.run_git(args, dir)?;
        if !out.status.success() {
            bail!(
                "git {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// git as the `git` account, in `dir`, with nothing of ours in its environment
    /// and no system config.
    fn run_git(&self, args: &[&str], dir: &Path) -> Result<std::process::Output> {
        self.git_command(args, dir)
            .output()
            .with_context(|| format!("running git {}", args.join(" ")))
    }

    fn git_command(&self, args: &[&str], dir: &Path) -> Command {
        let mut c = Command::new(&self.git);
        c.args(args)
            .current_dir(dir)
            .uid(self.uid)
            .gid(self.gid)
            .env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .env("HOME", "/")
            .env("GIT_CONFIG_NOSYSTEM", "1");
        c
    }

    /// Writes the pre-receive hook (root's, 0755) into the hooks directory.
    pub fn write_hook(&self, text: &str) -> Result<()> {
        for d in [&self.hooks, &self.ids] {
            let mode = if *d == self.hooks { 0o755 } else { 0o700 };
            std::fs::DirBuilder::new()
                .mode(mode)
                .recursive(true)
                .create(d)?;
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(mode))?;
        }
        let hook = self.hooks.join("pre-receive");
        let tmp = self.hooks.join(".pre-receive.tmp");
        let _ = std::fs::remove_file(&tmp);
        std::fs::write(&tmp, text)?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))?;
        std::fs::rename(&tmp, &hook)?;
        Ok(())
    }

    /// Makes the app's bare repository if it is missing. With the app's id: a
    /// repository made for another app of that name (destroyed, then made again
    /// while we did not hear it) is removed first.
    pub fn ensure(&self, app: &str, id: Option<i64>) -> Result<PathBuf> {
        if !valid_app(app) {
            bail!("{app:?} is not an app name");
        }
        let repo = self.path(app);
        let marker = self.ids.join(app);
        if let Some(id) = id {
            let known = std::fs::read_to_string(&marker).ok();
            if known.as_deref().is_some_and(|k| k.trim() != id.to_string()) {
                tracing::info!(app, "the app was made again: its old repository goes");
                self.remove(app)?;
            }
        }
        if !repo.join("HEAD").exists() {
            let tmp = self.root.join(format!(".new-{app}-{}", ulid::Ulid::new()));
            std::fs::DirBuilder::new().mode(0o700).create(&tmp)?;
            std::os::unix::fs::chown(&tmp, Some(self.uid), Some(self.gid))?;
            // No template: no hooks directory in a repository at all.
            self.as_git(
                &[
                    "init",
                    "-q",
                    "--bare",
                    "--template=",
                    "--initial-branch=main",
                    ".",
                ],
                &tmp,
            )?;
            for (k, v) in [
                ("receive.denyDeletes", "true"),
                ("receive.fsckObjects", "true"),
                ("core.logAllRefUpdates", "true"),
                ("gc.auto", "0"),
                // A push's pack is bounded like the tree built from it.
                ("receive.maxInputSize", "1073741824"),
            ] {
                self.as_git(&["config", k, v], &tmp)?;
            }
            // Two pushes of a new app may race here: the first rename wins.
            if std::fs::rename(&tmp, &repo).is_err() {
                let _ = std::fs::remove_dir_all(&tmp);
            }
        }
        if let Some(id) = id {
            std::fs::write(&marker, id.to_string())?;
        }
        Ok(repo)
    }

    /// Removes a destroyed app's repository.
    pub fn remove(&self, app: &str) -> Result<()> {
        if !valid_app(app) {
            return Ok(());
        }
        let _ = std::fs::remove_file(self.ids.join(app));
        match std::fs::remove_dir_all(self.path(app)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}
