//! Who signs, and which app a verb is about.
//!
//! The identity comes from the first of: `--config FILE`, `$PADDOCK_CONFIG`, the
//! user's credentials file (`paddock login`), `/etc/paddock/paddock.toml`, then
//! `./.paddock-dev/paddock.toml` (what `ops/dev-up.sh` makes). A file named by
//! `--config` or `$PADDOCK_CONFIG` may be either a cluster file or a credentials
//! file. Operator verbs need the cluster key, so they skip the credentials file.
//! A file the CLI found by looking on its own (`/etc/…`, `./.paddock-dev/…`) is
//! named on stderr, so nobody signs with the cluster key without knowing.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{anyhow, bail, Context, Result};
use paddock_config::credentials::UserCredentials;
use paddock_config::{ClusterConfig, DEFAULT_PATH, ENV_PATH};

use crate::cluster::Opts;

/// Where the local cluster of `ops/dev-up.sh` keeps its cluster file.
pub const DEV_PATH: &str = ".paddock-dev/paddock.toml";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Flag,
    Env,
    Credentials,
    System,
    DevDir,
}

impl Source {
    pub fn describe(self) -> &'static str {
        match self {
            Source::Flag => "--config",
            Source::Env => "$PADDOCK_CONFIG",
            Source::Credentials => "your credentials file",
            Source::System => "the system's cluster file",
            Source::DevDir => "the local dev cluster in this directory",
        }
    }
}

pub enum Identity {
    Cluster {
        cfg: Box<ClusterConfig>,
        source: Source,
    },
    User {
        creds: UserCredentials,
        path: PathBuf,
        source: Source,
    },
}

impl Identity {
    pub fn path(&self) -> &Path {
        match self {
            Identity::Cluster { cfg, .. } => &cfg.path,
            Identity::User { path, .. } => path,
        }
    }

    pub fn source(&self) -> Source {
        match self {
            Identity::Cluster { source, .. } | Identity::User { source, .. } => *source,
        }
    }
}

/// The credentials file `paddock login` writes.
pub fn credentials_path() -> Result<PathBuf> {
    UserCredentials::default_path().ok_or_else(|| {
        anyhow!("neither $XDG_CONFIG_HOME nor $HOME is set: cannot find where credentials go")
    })
}

fn explicit(opts: &Opts) -> Option<(PathBuf, Source)> {
    if let Some(p) = &opts.config {
        return Some((p.clone(), Source::Flag));
    }
    match std::env::var_os(ENV_PATH) {
        Some(p) if !p.is_empty() => Some((PathBuf::from(p), Source::Env)),
        _ => None,
    }
}

/// A credentials document has `api` and `key_id` at its top level; a cluster file
/// has neither.
fn is_credentials(path: &Path) -> bool {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|t| t.parse::<toml::Table>().ok())
        .is_some_and(|t| t.contains_key("key_id") && t.contains_key("api"))
}

fn load_cluster(path: &Path, source: Source) -> Result<Identity> {
    let cfg = ClusterConfig::load(path).map_err(|e| {
        anyhow!("{e}\n(pass --config FILE or set PADDOCK_CONFIG; `paddock dev up --dir DIR` writes DIR/paddock.toml; a customer runs `paddock login`)")
    })?;
    Ok(Identity::Cluster {
        cfg: Box::new(cfg),
        source,
    })
}

fn load_user(path: &Path, source: Source) -> Result<Identity> {
    let creds = UserCredentials::load(path)
        .map_err(|e| anyhow!("{e}\n(log in again: `paddock login --credentials FILE`)"))?;
    // The file is a password: say so when others can read it (the CLI still
    // works, as ssh does not for a private key, because refusing would not
    // take back what was already readable).
    use std::os::unix::fs::PermissionsExt;
    if let Ok(m) = std::fs::metadata(path) {
        if m.permissions().mode() & 0o077 != 0 {
            eprintln!(
                "warning: {} can be read by others (mode {:o}): chmod 600 it, and `paddock auth rotate` if someone may have copied it",
                path.display(),
                m.permissions().mode() & 0o777
            );
        }
    }
    warn_folder(path);
    Ok(Identity::User {
        creds,
        path: path.to_path_buf(),
        source,
    })
}

/// Warns on stderr when others may write to the folder of a credentials file
/// (they could swap the file for one of theirs, or remove it).
pub fn warn_folder(path: &Path) {
    if let Some(w) = UserCredentials::folder_warning(path) {
        eprintln!("warning: {w}");
    }
}

fn note(id: &Identity) {
    if matches!(id.source(), Source::System | Source::DevDir) {
        eprintln!(
            "paddock: using {} ({})",
            id.path().display(),
            id.source().describe()
        );
    }
}

/// The identity for a verb the api answers (customer verbs and `users`).
pub fn resolve(opts: &Opts) -> Result<Identity> {
    let id = find(opts, true)?;
    note(&id);
    Ok(id)
}

/// The cluster file, for operator verbs that talk to daemons other than the api.
pub fn cluster(opts: &Opts) -> Result<ClusterConfig> {
    let id = find(opts, false)?;
    note(&id);
    match id {
        Identity::Cluster { cfg, .. } => Ok(*cfg),
        Identity::User { path, .. } => bail!(
            "{} is a user's credentials file; this is an operator's verb and needs the cluster file (--config FILE)",
            path.display()
        ),
    }
}

fn find(opts: &Opts, with_credentials: bool) -> Result<Identity> {
    if let Some((path, source)) = explicit(opts) {
        if is_credentials(&path) {
            return load_user(&path, source);
        }
        return load_cluster(&path, source);
    }
    if with_credentials {
        if let Ok(p) = credentials_path() {
            if p.exists() {
                return load_user(&p, Source::Credentials);
            }
        }
    }
    if Path::new(DEFAULT_PATH).exists() {
        return load_cluster(Path::new(DEFAULT_PATH), Source::System);
    }
    if Path::new(DEV_PATH).exists() {
        let abs = std::env::current_dir()
            .map(|d| d.join(DEV_PATH))
            .unwrap_or_else(|_| PathBuf::from(DEV_PATH));
        return load_cluster(&abs, Source::DevDir);
    }
    if with_credentials {
        bail!(
            "you are not logged in: run `paddock login --credentials FILE` with the document your operator gave you (an operator passes --config FILE or sets PADDOCK_CONFIG)"
        )
    }
    bail!(
        "no cluster file: pass --config FILE or set PADDOCK_CONFIG (looked for {DEFAULT_PATH} and ./{DEV_PATH}; `paddock dev up` writes one)"
    )
}

/// A cluster file the CLI would use if the credentials file were not there.
pub fn cluster_file_nearby() -> Option<PathBuf> {
    [DEFAULT_PATH, DEV_PATH]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// The app a verb is about: `-a APP`, else the app of the git remote named
/// `paddock` in the current repository.
pub fn app(opts: &Opts) -> Result<String> {
    if let Some(a) = &opts.app {
        return Ok(a.clone());
    }
    match remote_app()? {
        Some(a) => Ok(a),
        None => bail!("no app given: pass -a APP or run inside a git repo with a `paddock` remote"),
    }
}

/// The app named by `git remote get-url paddock`, if the current directory is in
/// a git repository with that remote.
pub fn remote_app() -> Result<Option<String>> {
    let out = match Command::new("git")
        .args(["remote", "get-url", "paddock"])
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output()
    {
        Ok(o) => o,
        // No git installed: no remote either.
        Err(_) => return Ok(None),
    };
    if !out.status.success() {
        return Ok(None);
    }
    let url = String::from_utf8(out.stdout).context("the `paddock` remote's URL is not UTF-8")?;
    let url = url.trim();
    app_of_url(url).map(Some).ok_or_else(|| {
        anyhow!("cannot tell the app from the `paddock` git remote {url:?}: expected a URL ending in /APP.git; pass -a APP")
    })
}

/// `ssh://git@host:2222/myapp.git`, `git@host:myapp.git`, `https://host/myapp` → `myapp`.
pub fn app_of_url(url: &str) -> Option<String> {
    let path = url.trim_end_matches('/');
    let last = path.rsplit(['/', ':']).next()?;
    let name = last.strip_suffix(".git").unwrap_or(last);
    let ok = !name.is_empty()
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    ok.then(|| name.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apps_from_remote_urls() {
        for (url, app) in [
            ("ssh://git@localhost:2222/myapp.git", Some("myapp")),
            ("ssh://git@paddock.example.com/shop-2.git/", Some("shop-2")),
            ("git@paddock.example.com:myapp.git", Some("myapp")),
            ("https://paddock.example.com/git/myapp", Some("myapp")),
            ("ssh://git@host:2222/", None),
            ("ssh://git@host/My_App.git", None),
        ] {
            assert_eq!(app_of_url(url).as_deref(), app, "{url}");
        }
    }
}
