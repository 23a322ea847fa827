//! A person's credentials file: what `paddock users create` prints once and
//! `paddock login` stores (docs/APPS.md). It names the api, the user, their user
//! key (id and secret) and their CURVE keys; a customer needs nothing else.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use paddock_wire::client::Credentials;
use paddock_wire::curve::ClientKeys;
use paddock_wire::keyring::{Keyring, UserKeys};
use serde::{Deserialize, Serialize};

use crate::Secret;

#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct UserCredentials {
    /// The api's rpc endpoint, `tcp://host:port`.
    pub api: String,
    pub user: String,
    pub key_id: String,
    /// The user key's secret, hex.
    pub secret: Secret,
    /// Absent for a cluster running in plaintext.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub curve: Option<UserCurve>,
}

#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct UserCurve {
    /// The cluster's CURVE server key (every daemon binds with it).
    pub server_public: String,
    pub client_public: String,
    pub client_secret: Secret,
}

impl std::fmt::Debug for UserCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserCredentials")
            .field("api", &self.api)
            .field("user", &self.user)
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("cannot read credentials {path}: {why}")]
    Read { path: PathBuf, why: String },
    #[error("credentials {path} are not valid: {why}")]
    Invalid { path: PathBuf, why: String },
    #[error("cannot write credentials {path}: {why}")]
    Write { path: PathBuf, why: String },
}

impl UserCredentials {
    /// Parses and checks a credentials document (`path` names it in errors).
    pub fn parse(text: &str, path: &Path) -> Result<UserCredentials, CredentialsError> {
        let invalid = |why: String| CredentialsError::Invalid {
            path: path.to_path_buf(),
            why,
        };
        let c: UserCredentials =
            toml::from_str(text).map_err(|e| invalid(e.message().to_string()))?;
        if !UserKeys::is_user_key_id(&c.key_id) {
            return Err(invalid(format!(
                "key_id {:?} is not a user key id (user.…)",
                c.key_id
            )));
        }
        if !crate::is_endpoint(&c.api) {
            return Err(invalid(format!(
                "api {:?} is not an endpoint like tcp://host:port",
                c.api
            )));
        }
        c.credentials().map_err(invalid)?;
        Ok(c)
    }

    pub fn load(path: &Path) -> Result<UserCredentials, CredentialsError> {
        let text = std::fs::read_to_string(path).map_err(|e| CredentialsError::Read {
            path: path.to_path_buf(),
            why: e.to_string(),
        })?;
        Self::parse(&text, path)
    }

    /// The TOML document.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("credentials serialize")
    }

    /// Writes the file with mode 0600, atomically, making its folder (0700).
    ///
    /// The document goes to a temp file with a random name in the same folder,
    /// created with `O_CREAT|O_EXCL|O_NOFOLLOW|O_CLOEXEC` and mode 0600 (so a
    /// file or symlink someone planted is never opened or followed), then is
    /// renamed over `path`. An existing folder is used as it is: see
    /// `folder_warning` for one others may write to.
    pub fn write(&self, path: &Path) -> Result<(), CredentialsError> {
        use std::io::Write;
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
        let err = |e: std::io::Error| CredentialsError::Write {
            path: path.to_path_buf(),
            why: e.to_string(),
        };
        let dir = match path.parent().filter(|d| !d.as_os_str().is_empty()) {
            Some(dir) => {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(dir)
                    .map_err(err)?;
                dir.to_path_buf()
            }
            None => PathBuf::from("."),
        };
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "credentials".into());
        let (tmp, mut f) = {
            let mut tries = 0;
            loop {
                let tmp = dir.join(format!(".{name}.{:016x}.tmp", rand::random::<u64>()));
                match std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
                    .open(&tmp)
                {
                    Ok(f) => break (tmp, f),
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && tries < 8 => {
                        tries += 1
                    }
                    Err(e) => return Err(err(e)),
                }
            }
        };
        let written = (|| {
            f.write_all(self.to_toml().as_bytes())?;
            // The umask cannot have widened 0600, but a narrower one must not
            // leave the owner unable to read the file either.
            f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(err(e));
        }
        Ok(())
    }

    /// A warning when the folder `path` is in (the credentials file's) may be
    /// written by its group or by others: they could replace or remove the
    /// file. None when it cannot be read or is private.
    pub fn folder_warning(path: &Path) -> Option<String> {
        use std::os::unix::fs::PermissionsExt;
        let dir = match path.parent().filter(|d| !d.as_os_str().is_empty()) {
            Some(d) => d,
            None => Path::new("."),
        };
        let mode = std::fs::metadata(dir).ok()?.permissions().mode();
        (mode & 0o022 != 0).then(|| {
            format!(
                "{} can be written by {} (mode {:o}): they could replace your credentials file; chmod 700 it",
                dir.display(),
                if mode & 0o002 != 0 { "anyone" } else { "its group" },
                mode & 0o7777
            )
        })
    }

    /// The keyring and CURVE keys a client signs and connects with.
    pub fn credentials(&self) -> Result<Credentials, String> {
        let keys = Keyring::from_hex([(self.key_id.as_str(), self.secret.expose())], &self.key_id)
            .map_err(|e| e.to_string())?;
        let curve = match &self.curve {
            None => None,
            Some(c) => Some(
                ClientKeys::from_z85(&c.server_public, &c.client_public, c.client_secret.expose())
                    .map_err(|e| format!("curve: {e}"))?,
            ),
        };
        Ok(Credentials::new(Arc::new(keys), curve))
    }

    /// `$XDG_CONFIG_HOME/paddock/credentials`, else `~/.config/paddock/credentials`.
    pub fn default_path() -> Option<PathBuf> {
        let base = match std::env::var_os("XDG_CONFIG_HOME") {
            Some(x) if !x.is_empty() => PathBuf::from(x),
            _ => PathBuf::from(std::env::var_os("HOME")?).join(".config"),
        };
        Some(base.join("paddock").join("credentials"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_checks() {
        let (sp, _) = paddock_wire::curve::generate().unwrap();
        let (cp, cs) = paddock_wire::curve::generate().unwrap();
        let c = UserCredentials {
            api: "tcp://127.0.0.1:7000".into(),
            user: "alice".into(),
            key_id: "user.01jct6s3w4f8d9x2qz7n5k0bva".into(),
            secret: Secret::new(paddock_wire::keyring::generate_secret_hex()),
            curve: Some(UserCurve {
                server_public: sp,
                client_public: cp,
                client_secret: Secret::new(cs.clone()),
            }),
        };
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/credentials");
        c.write(&p).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(UserCredentials::load(&p).unwrap(), c);
        assert!(!format!("{c:?}").contains(&cs));
        let bad = c.to_toml().replace("user.01", "cluster01");
        assert!(UserCredentials::parse(&bad, &p).is_err());
        let bad = c.to_toml().replace("tcp://", "http://");
        assert!(UserCredentials::parse(&bad, &p).is_err());
    }

    fn sample() -> UserCredentials {
        UserCredentials {
            api: "tcp://127.0.0.1:7000".into(),
            user: "alice".into(),
            key_id: "user.01jct6s3w4f8d9x2qz7n5k0bva".into(),
            secret: Secret::new(paddock_wire::keyring::generate_secret_hex()),
            curve: None,
        }
    }

    #[test]
    fn planted_symlinks_are_not_followed() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let folder = dir.path().join("paddock");
        std::fs::create_dir(&folder).unwrap();
        let p = folder.join("credentials");
        // What someone else may have planted: symlinks at the names the old
        // code wrote through (credentials.tmp) pointing at a file of theirs.
        let target = dir.path().join("theirs");
        std::fs::write(&target, "untouched").unwrap();
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o644)).unwrap();
        for name in ["credentials.tmp", ".credentials.tmp", "credentials~"] {
            std::os::unix::fs::symlink(&target, folder.join(name)).unwrap();
        }
        let c = sample();
        c.write(&p).unwrap();
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "untouched");
        assert_eq!(
            std::fs::metadata(&target).unwrap().permissions().mode() & 0o777,
            0o644
        );
        assert!(std::fs::symlink_metadata(folder.join("credentials.tmp"))
            .unwrap()
            .file_type()
            .is_symlink());
        let meta = std::fs::symlink_metadata(&p).unwrap();
        assert!(meta.file_type().is_file());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(UserCredentials::load(&p).unwrap(), c);
        // Written twice, the folder holds no temp file.
        c.write(&p).unwrap();
        let mut names: Vec<String> = std::fs::read_dir(&folder)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                ".credentials.tmp",
                "credentials",
                "credentials.tmp",
                "credentials~"
            ]
        );
    }

    #[test]
    fn a_folder_others_may_write_to_is_warned_about() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("paddock/credentials");
        sample().write(&p).unwrap();
        assert_eq!(UserCredentials::folder_warning(&p), None);
        let folder = p.parent().unwrap();
        for (mode, who) in [(0o770, "its group"), (0o777, "anyone"), (0o1733, "anyone")] {
            std::fs::set_permissions(folder, std::fs::Permissions::from_mode(mode)).unwrap();
            let w = UserCredentials::folder_warning(&p).unwrap_or_else(|| panic!("{mode:o}"));
            assert!(w.contains(who) && w.contains("chmod 700"), "{w}");
        }
        std::fs::set_permissions(folder, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(UserCredentials::folder_warning(&p), None);
    }
}
