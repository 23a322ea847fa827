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
    pub fn write(&self, path: &Path) -> Result<(), CredentialsError> {
        use std::io::Write;
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
        let err = |e: std::io::Error| CredentialsError::Write {
            path: path.to_path_buf(),
            why: e.to_string(),
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(err)?;
        }
        let tmp = path.with_extension("tmp");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(err)?;
        f.write_all(self.to_toml().as_bytes()).map_err(err)?;
        f.sync_all().map_err(err)?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
        std::fs::rename(&tmp, path).map_err(err)
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
}
