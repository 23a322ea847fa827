//! `[daemons.gitserver]`: the section as written, and its validation into [`Settings`].

use std::path::PathBuf;

use paddock_config::{ClusterConfig, ConfigError};
use serde::Deserialize;

pub const NAME: &str = "gitserver";

/// `[daemons.gitserver]` as the file has it (`rpc` is read by paddock-config).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GitserverSection {
    /// The URL users add as their git remote, e.g. `ssh://git@127.0.0.1:2222`
    /// (the api shows it as `<ssh>/<app>.git`).
    pub ssh: Option<String>,
    /// Where this gitserver's own sshd listens, `ADDR:PORT`; unset: no sshd is run
    /// (an operator's sshd is configured with `paddock-gitserver sshd-config`).
    pub ssh_listen: Option<String>,
    /// Bare repositories, sshd's files and the helpers' socket; default
    /// `<state_dir>/gitserver`. Its parents must let the `git` account through.
    pub dir: Option<PathBuf>,
    /// The account every push runs as (sshd's user, the forced command, the hook).
    pub user: Option<String>,
    /// The sshd binary; default `/usr/sbin/sshd`.
    pub sshd: Option<PathBuf>,
}

/// The gitserver's validated settings.
#[derive(Debug, Clone)]
pub struct Settings {
    pub ssh_url: Option<String>,
    pub ssh_listen: Option<std::net::SocketAddr>,
    pub dir: PathBuf,
    pub user: String,
    pub sshd: PathBuf,
}

impl Settings {
    pub fn repos(&self) -> PathBuf {
        self.dir.join("repos")
    }
    pub fn socket(&self) -> PathBuf {
        self.dir.join("gitserver.sock")
    }
    pub fn sshd_dir(&self) -> PathBuf {
        self.dir.join("sshd")
    }
}

/// Paths sshd and git get on command lines and in overlay-free configs: no
/// spaces, quotes or other characters a shell or sshd_config would read.
pub fn plain_path(p: &std::path::Path) -> bool {
    let s = p.as_os_str().as_encoded_bytes();
    p.is_absolute()
        && s.iter()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-+".contains(b))
}

pub fn settings(cfg: &ClusterConfig) -> Result<Settings, ConfigError> {
    let s: GitserverSection = cfg.section(NAME)?;
    let key = |k: &str| format!("daemons.{NAME}.{k}");
    let ssh_listen = match &s.ssh_listen {
        None => None,
        Some(a) => Some(a.parse().map_err(|_| {
            cfg.invalid(
                &key("ssh_listen"),
                format!("must be ADDR:PORT, like 127.0.0.1:2222, not {a:?}"),
            )
        })?),
    };
    if let Some(u) = &s.ssh {
        if !u.starts_with("ssh://") || u.ends_with('/') || u.contains(char::is_whitespace) {
            return Err(cfg.invalid(
                &key("ssh"),
                format!("must look like ssh://git@HOST:PORT (no trailing /), not {u:?}"),
            ));
        }
    }
    let dir = s.dir.unwrap_or_else(|| cfg.state_dir.join(NAME));
    if !plain_path(&dir) {
        return Err(cfg.invalid(
            &key("dir"),
            format!(
                "{} must be an absolute path of letters, digits and /._-+ only \
                 (it goes into sshd's config and the forced command)",
                dir.display()
            ),
        ));
    }
    let user = s.user.unwrap_or_else(|| "git".into());
    if !crate::rules::valid_app(&user) {
        return Err(cfg.invalid(
            &key("user"),
            format!("{user:?} is not a plain account name"),
        ));
    }
    Ok(Settings {
        ssh_url: s.ssh,
        ssh_listen,
        dir,
        user,
        sshd: s.sshd.unwrap_or_else(|| "/usr/sbin/sshd".into()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_examples_are_valid_and_bad_values_name_their_key() {
        for (p, cfg) in paddock_config::shipped_examples() {
            let s = settings(&cfg).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            if cfg.file.daemons.contains_key(NAME) {
                assert!(
                    s.ssh_url.is_some() && s.ssh_listen.is_some(),
                    "{}",
                    p.display()
                );
            }
        }
        assert!(plain_path(std::path::Path::new(
            "/var/lib/paddock/gitserver"
        )));
        assert!(!plain_path(std::path::Path::new("/var/lib/pad dock")));
        assert!(!plain_path(std::path::Path::new("relative/dir")));
        assert!(!plain_path(std::path::Path::new("/x\"y")));
    }
}
