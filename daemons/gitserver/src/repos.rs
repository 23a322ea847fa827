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
    /// The pre-receive hook's text (runs the helper binary against our socket).
    pub hook: String,
}

impl Repos {
    pub fn path(&self, app: &str) -> PathBuf {
        self.root.join(format!("{app}.git"))
    }

    /// Where `reference` points in the app's repository now (`None`: nowhere).
    pub fn resolve(&self, app: &str, reference: &str) -> Result<Option<String>> {
        let out = Command::new(&self.git)
            .args(["rev-parse", "--verify", "-q", reference])
            .current_dir(self.path(app))
            .uid(self.uid)
            .gid(self.gid)
            .env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .env("HOME", "/")
            .output()
            .context("running git rev-parse")?;
        let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
        Ok((out.status.success() && !id.is_empty()).then_some(id))
    }

    fn as_git(&self, args: &[&str], dir: &Path) -> Result<()> {
        let out = Command::new(&self.git)
            .args(args)
            .current_dir(dir)
            .uid(self.uid)
            .gid(self.gid)
            .env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .env("HOME", "/")
            .output()
            .with_context(|| format!("running git {}", args.join(" ")))?;
        if !out.status.success() {
            bail!(
                "git {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// Makes the app's bare repository if it is missing, and (re)writes its hook.
    pub fn ensure(&self, app: &str) -> Result<PathBuf> {
        if !valid_app(app) {
            bail!("{app:?} is not an app name");
        }
        let repo = self.path(app);
        if !repo.join("HEAD").exists() {
            let tmp = self.root.join(format!(".new-{app}-{}", ulid::Ulid::new()));
            std::fs::DirBuilder::new().mode(0o700).create(&tmp)?;
            std::os::unix::fs::chown(&tmp, Some(self.uid), Some(self.gid))?;
            self.as_git(
                &["init", "-q", "--bare", "--initial-branch=main", "."],
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
        self.write_hooks(&repo)?;
        Ok(repo)
    }

    fn write_hooks(&self, repo: &Path) -> Result<()> {
        let hooks = repo.join("hooks");
        if let Ok(m) = std::fs::symlink_metadata(&hooks) {
            if !m.is_dir() || std::os::unix::fs::MetadataExt::uid(&m) != 0 {
                std::fs::remove_dir_all(&hooks).or_else(|_| std::fs::remove_file(&hooks))?;
            }
        }
        std::fs::DirBuilder::new()
            .mode(0o755)
            .recursive(true)
            .create(&hooks)?;
        std::os::unix::fs::chown(&hooks, Some(0), Some(0))?;
        std::fs::set_permissions(&hooks, std::fs::Permissions::from_mode(0o755))?;
        let hook = hooks.join("pre-receive");
        let tmp = hooks.join(".pre-receive.tmp");
        std::fs::write(&tmp, &self.hook)?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))?;
        std::fs::rename(&tmp, &hook)?;
        Ok(())
    }

    /// Removes a destroyed app's repository.
    pub fn remove(&self, app: &str) -> Result<()> {
        if !valid_app(app) {
            return Ok(());
        }
        match std::fs::remove_dir_all(self.path(app)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}
