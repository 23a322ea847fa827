//! The cluster file (docs/PROTOCOL.md, "The cluster file"): one TOML file per node,
//! with `PADDOCK__SECTION__KEY` environment overrides, turned into a validated
//! [`ClusterConfig`].
//!
//! Architecture invariant: this crate reads and writes the file and validates it; it
//! knows nothing of sockets or databases. A load error names the file and the key.

pub mod credentials;

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use paddock_wire::curve::{Admitted, ClientKeys, Key, NodeKeys, ServerKeys};
use paddock_wire::keyring::KeyError;
use paddock_wire::{Credentials, Keyring, Limits};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Where the cluster file is when neither `--config` nor `PADDOCK_CONFIG` says.
pub const DEFAULT_PATH: &str = "/etc/paddock/paddock.toml";
pub const ENV_PATH: &str = "PADDOCK_CONFIG";

/// What went wrong with the cluster file. Each message says everything once: the
/// underlying error is part of the text and is not also given as `source()`, so a
/// caller that prints the chain (`{:#}`) does not repeat it, and one that prints only
/// the message (the daemons' start-up log) still shows it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read cluster file {path}: {cause}")]
    Read {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("cluster file {path}: {cause}")]
    Parse {
        path: PathBuf,
        cause: Box<config::ConfigError>,
    },
    #[error("cluster file {path}: `{key}` {why}")]
    Invalid {
        path: PathBuf,
        key: String,
        why: String,
    },
}

/// A secret as the file holds it (a hex HMAC key, a Z85 CURVE secret key). Its
/// `Debug` never shows the value, so a logged config struct leaks nothing.
#[derive(Clone, Serialize, Deserialize, Default, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }

    /// The value itself: for building keys only, never for printing.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl From<String> for Secret {
    fn from(s: String) -> Secret {
        Secret(s)
    }
}

/// The file as written (serde's view). Every section but `node`, `signing_key` and
/// `keys` has defaults.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct ClusterFile {
    pub node: String,
    pub signing_key: String,
    pub keys: BTreeMap<String, Secret>,
    /// CURVE keys for every ZeroMQ socket (docs/PROTOCOL.md, "Transport"); without
    /// this table the node runs in plaintext and says so at every start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub curve: Option<CurveSection>,
    #[serde(default)]
    pub state_dir: Option<PathBuf>,
    #[serde(default)]
    pub cluster: ClusterSection,
    #[serde(default)]
    pub daemons: BTreeMap<String, DaemonSection>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database: Option<DatabaseSection>,
    #[serde(default)]
    pub log: LogSection,
    #[serde(default)]
    pub wire: WireSection,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterSection {
    /// Every heartbeat's pull endpoint: the bootstrap list every daemon beats to.
    #[serde(default)]
    pub heartbeats: Vec<String>,
    /// Heartbeat rpc endpoints to ask for `registry.list` (the CLI's way in). When
    /// empty, this node's own `[daemons.heartbeat].rpc` is used.
    #[serde(default)]
    pub registries: Vec<String>,
    /// How often every daemon beats, in milliseconds.
    #[serde(default = "default_beat_ms")]
    pub beat_interval_ms: u64,
    /// Every app gets the domain `<app>.<apps_domain>` (`paddock dev up` writes
    /// `localhost`). None: apps get no default domain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub apps_domain: Option<String>,
}

fn default_beat_ms() -> u64 {
    1000
}

// By hand, not derived: a file without `[cluster]` gets the same beat interval as
// one with an empty `[cluster]` table (a derived Default would give 0).
impl Default for ClusterSection {
    fn default() -> Self {
        ClusterSection {
            heartbeats: Vec::new(),
            registries: Vec::new(),
            beat_interval_ms: default_beat_ms(),
            apps_domain: None,
        }
    }
}

/// One daemon on this node: its rpc endpoint, any others (`pub`, `pull`, …) and
/// daemon-specific settings, all as plain TOML values.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct DaemonSection {
    pub rpc: String,
    #[serde(flatten)]
    pub other: BTreeMap<String, toml::Value>,
}

impl DaemonSection {
    pub fn endpoint(&self, name: &str) -> Option<&str> {
        if name == "rpc" {
            return Some(&self.rpc);
        }
        self.other.get(name).and_then(|v| v.as_str())
    }

    /// Every string-valued entry that looks like an endpoint, `rpc` included.
    pub fn endpoints(&self) -> BTreeMap<String, String> {
        let mut m: BTreeMap<String, String> = self
            .other
            .iter()
            .filter_map(|(k, v)| {
                v.as_str()
                    .filter(|s| is_endpoint(s))
                    .map(|s| (k.clone(), s.to_string()))
            })
            .collect();
        m.insert("rpc".into(), self.rpc.clone());
        m
    }

    /// An integer setting; values from the environment arrive as strings.
    pub fn get_u64(&self, key: &str) -> Result<Option<u64>, NotAnInteger> {
        match self.other.get(key) {
            None => Ok(None),
            Some(toml::Value::Integer(i)) if *i >= 0 => Ok(Some(*i as u64)),
            Some(toml::Value::String(s)) => {
                s.parse().map(Some).map_err(|_| NotAnInteger(s.clone()))
            }
            Some(v) => Err(NotAnInteger(v.to_string())),
        }
    }
}

/// A setting that should be a non-negative integer and is not (the value as given).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("must be a non-negative integer, not `{0}`")]
pub struct NotAnInteger(pub String);

/// The cluster's rule for `interval_ms`, the beat interval: every daemon's beats
/// (`cluster.beat_interval_ms`) must lie in it, and a heartbeat refuses a beat whose
/// interval does not. Ten milliseconds to one hour: shorter would flood the
/// heartbeats, longer would leave a dead daemon listed as alive for hours.
pub const BEAT_INTERVAL_MS: std::ops::RangeInclusive<u64> = 10..=3_600_000;

/// `[curve]`: the cluster's server keypair (every daemon binds with it), this
/// node's client keypair (every connect uses it), and the client public keys the
/// daemons on this node admit, by name. Keys are 40-character Z85 strings.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct CurveSection {
    pub server_public: String,
    /// Needed only on nodes that run daemons (a CLI-only file may leave it out).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_secret: Option<Secret>,
    pub client_public: String,
    pub client_secret: Secret,
    #[serde(default)]
    pub clients: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DatabaseSection {
    /// libpq-style connection string; may list several hosts.
    pub url: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct LogSection {
    #[serde(default)]
    pub json: bool,
    #[serde(default)]
    pub syslog: bool,
    /// The syslog datagram socket (default /dev/log).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub syslog_socket: Option<PathBuf>,
    /// A tracing filter such as `info` or `paddock_locker=debug,info`.
    #[serde(default)]
    pub level: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WireSection {
    #[serde(default = "default_max_payload")]
    pub max_payload: usize,
    #[serde(default = "default_skew")]
    pub skew_ms: i64,
    #[serde(default = "default_cache")]
    pub replay_cache: usize,
    /// Most bytes the replay/reply cache may hold; past it new requests get
    /// `unavailable` (live ids are never forgotten early).
    #[serde(default = "default_cache_bytes")]
    pub replay_cache_bytes: usize,
}

fn default_cache_bytes() -> usize {
    64 << 20
}

fn default_max_payload() -> usize {
    1 << 20
}
fn default_skew() -> i64 {
    30_000
}
fn default_cache() -> usize {
    100_000
}

impl Default for WireSection {
    fn default() -> Self {
        WireSection {
            max_payload: default_max_payload(),
            skew_ms: default_skew(),
            replay_cache: default_cache(),
            replay_cache_bytes: default_cache_bytes(),
        }
    }
}

/// A duration written as whole milliseconds (the `*_ms` keys). Environment
/// overrides arrive as strings of digits, which are read too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Ms(pub Duration);

impl Ms {
    pub const fn from_millis(ms: u64) -> Ms {
        Ms(Duration::from_millis(ms))
    }

    pub fn get(self) -> Duration {
        self.0
    }
}

impl From<Ms> for Duration {
    fn from(m: Ms) -> Duration {
        m.0
    }
}

impl<'de> Deserialize<'de> for Ms {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Ms, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d) {
            Ok(Raw::N(n)) => Ok(Ms::from_millis(n)),
            Ok(Raw::S(s)) => s.trim().parse().map(Ms::from_millis).map_err(|_| {
                serde::de::Error::custom(format!("`{s}` is not a whole number of milliseconds"))
            }),
            Err(_) => Err(serde::de::Error::custom(
                "must be a whole, non-negative number of milliseconds",
            )),
        }
    }
}

impl Serialize for Ms {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.0.as_millis() as u64)
    }
}

/// `tcp://host:port` or `ipc://path`.
pub fn is_endpoint(s: &str) -> bool {
    if let Some(rest) = s.strip_prefix("tcp://") {
        match rest.rsplit_once(':') {
            Some((host, port)) => !host.is_empty() && (port == "*" || port.parse::<u16>().is_ok()),
            None => false,
        }
    } else if let Some(path) = s.strip_prefix("ipc://") {
        !path.is_empty()
    } else {
        false
    }
}

/// `[curve]`, decoded and checked.
#[derive(Debug, Clone)]
pub struct CurveConfig {
    pub client: ClientKeys,
    pub server_secret: Option<Key>,
    /// `[curve.clients]` plus this node's own client key.
    pub admitted: Vec<Key>,
}

impl CurveConfig {
    fn from_section(path: &Path, c: &CurveSection) -> Result<CurveConfig, ConfigError> {
        let key = |name: &str, v: &str| {
            Key::from_z85(v).map_err(|e| ConfigError::Invalid {
                path: path.to_path_buf(),
                key: format!("curve.{name}"),
                why: e.to_string(),
            })
        };
        let client = ClientKeys {
            server_public: key("server_public", &c.server_public)?,
            public: key("client_public", &c.client_public)?,
            secret: key("client_secret", c.client_secret.expose())?,
        };
        let server_secret = match &c.server_secret {
            Some(s) => Some(key("server_secret", s.expose())?),
            None => None,
        };
        let mut admitted = vec![client.public];
        for (name, v) in &c.clients {
            admitted.push(key(&format!("clients.{name}"), v)?);
        }
        Ok(CurveConfig {
            client,
            server_secret,
            admitted,
        })
    }
}

/// The validated cluster file.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    pub path: PathBuf,
    pub file: ClusterFile,
    pub keyring: Keyring,
    /// `None`: the node runs in plaintext (no `[curve]` table).
    pub curve: Option<CurveConfig>,
    pub state_dir: PathBuf,
    pub limits: Limits,
    pub beat_interval: Duration,
}

impl ClusterConfig {
    /// The cluster file's path: `--config`, else `PADDOCK_CONFIG`, else the default.
    pub fn locate(flag: Option<&Path>) -> PathBuf {
        if let Some(p) = flag {
            return p.to_path_buf();
        }
        match std::env::var_os(ENV_PATH) {
            Some(p) if !p.is_empty() => PathBuf::from(p),
            _ => PathBuf::from(DEFAULT_PATH),
        }
    }

    /// Reads, merges the environment overrides, and validates.
    pub fn load(path: &Path) -> Result<ClusterConfig, ConfigError> {
        let meta = std::fs::metadata(path).map_err(|cause| ConfigError::Read {
            path: path.to_path_buf(),
            cause,
        })?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                key: "(file mode)".into(),
                why: format!(
                    "is mode {mode:04o}; it holds the cluster key, so it must not be readable by group or others (chmod 600 {})",
                    path.display()
                ),
            });
        }
        // Someone else's file could have been written by anyone who can write as
        // them: only our own (or root's) is trusted with the cluster's keys.
        let me = nix::unistd::Uid::effective().as_raw();
        if meta.uid() != me && meta.uid() != 0 {
            return Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                key: "(file owner)".into(),
                why: format!(
                    "is owned by uid {}; it must be owned by the user reading it (uid {me}) or by root (chown {me} {})",
                    meta.uid(),
                    path.display()
                ),
            });
        }
        let text = std::fs::read_to_string(path).map_err(|cause| ConfigError::Read {
            path: path.to_path_buf(),
            cause,
        })?;
        Self::check_raw(path, &text)?;
        let built = config::Config::builder()
            .add_source(config::File::from(path).format(config::FileFormat::Toml))
            .add_source(
                config::Environment::with_prefix("PADDOCK")
                    .prefix_separator("__")
                    .separator("__")
                    .try_parsing(true),
            )
            .build()
            .and_then(|c| c.try_deserialize::<ClusterFile>())
            .map_err(|cause| ConfigError::Parse {
                path: path.to_path_buf(),
                cause: Box::new(cause),
            })?;
        Self::validate(path, built)
    }

    /// Checks the file's text before the `config` crate reads it: a TOML syntax
    /// error is reported by line and column only, never by quoting the line (it may
    /// hold a secret), and key ids must be lower case, since the loader folds the
    /// case of every key (a `Cluster-1` would silently become `cluster-1`).
    fn check_raw(path: &Path, text: &str) -> Result<(), ConfigError> {
        let bad = |key: &str, why: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            key: key.to_string(),
            why,
        };
        let table: toml::Table = toml::from_str(text).map_err(|e| {
            let (line, col) = match e.span() {
                Some(span) => {
                    let before = &text[..span.start.min(text.len())];
                    let line = before.matches('\n').count() + 1;
                    let col = before.len() - before.rfind('\n').map(|i| i + 1).unwrap_or(0) + 1;
                    (line, col)
                }
                None => (0, 0),
            };
            bad(
                &format!("(line {line}, column {col})"),
                format!("is not valid TOML: {}", e.message()),
            )
        })?;
        if let Some(keys) = table.get("keys").and_then(|k| k.as_table()) {
            for id in keys.keys() {
                if id.bytes().any(|b| b.is_ascii_uppercase()) {
                    return Err(bad(
                        &format!("keys.{id}"),
                        "key ids must be lower case (keys are read case-insensitively, so upper case would not survive)".into(),
                    ));
                }
            }
        }
        if let Some(sk) = table.get("signing_key").and_then(|k| k.as_str()) {
            if sk.bytes().any(|b| b.is_ascii_uppercase()) {
                return Err(bad(
                    "signing_key",
                    "must be lower case, like every key id".into(),
                ));
            }
        }
        Ok(())
    }

    /// Validates an in-memory file (tests, and `load`).
    pub fn validate(path: &Path, file: ClusterFile) -> Result<ClusterConfig, ConfigError> {
        let bad = |key: &str, why: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            key: key.to_string(),
            why,
        };
        if file.node.is_empty()
            || !file
                .node
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        {
            return Err(bad(
                "node",
                "must be a non-empty name of [A-Za-z0-9._-]".into(),
            ));
        }
        let keyring = Keyring::from_hex(
            file.keys.iter().map(|(k, v)| (k.as_str(), v.expose())),
            &file.signing_key,
        )
        .map_err(|e| match e {
            KeyError::NoSigningKey(_) => bad("signing_key", e.to_string()),
            other => bad("keys", other.to_string()),
        })?;
        for (i, hb) in file.cluster.heartbeats.iter().enumerate() {
            if !is_endpoint(hb) {
                return Err(bad(
                    &format!("cluster.heartbeats[{i}]"),
                    format!("`{hb}` is not an endpoint (tcp://host:port or ipc://path)"),
                ));
            }
        }
        for (name, d) in &file.daemons {
            if !is_endpoint(&d.rpc) {
                return Err(bad(
                    &format!("daemons.{name}.rpc"),
                    format!(
                        "`{}` is not an endpoint (tcp://host:port or ipc://path)",
                        d.rpc
                    ),
                ));
            }
        }
        if !BEAT_INTERVAL_MS.contains(&file.cluster.beat_interval_ms) {
            return Err(bad(
                "cluster.beat_interval_ms",
                format!(
                    "must be {}-{} (10 ms to 1 hour), not {}",
                    BEAT_INTERVAL_MS.start(),
                    BEAT_INTERVAL_MS.end(),
                    file.cluster.beat_interval_ms
                ),
            ));
        }
        if file.wire.max_payload < 1024 {
            return Err(bad(
                "wire.max_payload",
                "must be at least 1024 bytes".into(),
            ));
        }
        if file.wire.skew_ms < 1000 {
            return Err(bad("wire.skew_ms", "must be at least 1000".into()));
        }
        if file.wire.replay_cache < 1000 {
            return Err(bad("wire.replay_cache", "must be at least 1000".into()));
        }
        if file.wire.replay_cache_bytes < 1 << 20 {
            return Err(bad(
                "wire.replay_cache_bytes",
                "must be at least 1048576 (1 MiB)".into(),
            ));
        }
        let curve = match &file.curve {
            None => None,
            Some(c) => Some(CurveConfig::from_section(path, c)?),
        };
        let state_dir = file
            .state_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("/var/lib/paddock"));
        let limits = Limits {
            max_payload: file.wire.max_payload,
            skew_ms: file.wire.skew_ms,
            cache_entries: file.wire.replay_cache,
            cache_bytes: file.wire.replay_cache_bytes,
            ..Limits::default()
        };
        Ok(ClusterConfig {
            path: path.to_path_buf(),
            beat_interval: Duration::from_millis(file.cluster.beat_interval_ms),
            keyring,
            curve,
            state_dir,
            limits,
            file,
        })
    }

    pub fn node(&self) -> &str {
        &self.file.node
    }

    /// This node's section for `daemon`, or an error naming the missing table.
    pub fn daemon(&self, daemon: &str) -> Result<&DaemonSection, ConfigError> {
        self.file
            .daemons
            .get(daemon)
            .ok_or_else(|| ConfigError::Invalid {
                path: self.path.clone(),
                key: format!("daemons.{daemon}"),
                why: "is missing: this node has no such daemon configured".into(),
            })
    }

    /// A required endpoint of `daemon` other than rpc.
    pub fn daemon_endpoint(&self, daemon: &str, name: &str) -> Result<String, ConfigError> {
        let d = self.daemon(daemon)?;
        match d.endpoint(name) {
            Some(ep) if is_endpoint(ep) => Ok(ep.to_string()),
            Some(ep) => Err(self.invalid(
                &format!("daemons.{daemon}.{name}"),
                format!("`{ep}` is not an endpoint"),
            )),
            None => Err(self.invalid(&format!("daemons.{daemon}.{name}"), "is missing".into())),
        }
    }

    pub fn database_url(&self) -> Result<&str, ConfigError> {
        match &self.file.database {
            Some(d) if !d.url.trim().is_empty() => Ok(&d.url),
            _ => Err(self.invalid(
                "database.url",
                "is missing; this daemon needs PostgreSQL".into(),
            )),
        }
    }

    /// Heartbeat rpc endpoints to ask for the registry.
    pub fn registries(&self) -> Vec<String> {
        if !self.file.cluster.registries.is_empty() {
            return self.file.cluster.registries.clone();
        }
        self.file
            .daemons
            .get("heartbeat")
            .map(|d| vec![d.rpc.clone()])
            .unwrap_or_default()
    }

    /// What a client on this node connects with: the keyring and CURVE client keys.
    pub fn credentials(&self) -> Credentials {
        Credentials::new(
            std::sync::Arc::new(self.keyring.clone()),
            self.curve.as_ref().map(|c| c.client.clone()),
        )
    }

    /// What a daemon on this node binds and connects with, or `None` in plaintext.
    /// A `[curve]` table without `server_secret` cannot serve.
    pub fn node_keys(&self) -> Result<Option<NodeKeys>, ConfigError> {
        let Some(c) = &self.curve else {
            return Ok(None);
        };
        let secret = c.server_secret.ok_or_else(|| {
            self.invalid(
                "curve.server_secret",
                "is missing: a node that runs daemons needs the cluster's server secret key".into(),
            )
        })?;
        Ok(Some(NodeKeys {
            server: ServerKeys {
                secret,
                admitted: Admitted::new(c.admitted.iter().copied()),
            },
            client: c.client.clone(),
        }))
    }

    /// `[daemons.NAME]` (everything but `rpc`) as the daemon's own typed settings.
    /// `T` is `#[serde(default, deny_unknown_fields)]`, so a misspelt key fails
    /// naming `daemons.NAME.KEY`; a missing table gives the defaults.
    pub fn section<T: DeserializeOwned + Default>(&self, daemon: &str) -> Result<T, ConfigError> {
        let Some(d) = self.file.daemons.get(daemon) else {
            return Ok(T::default());
        };
        let table: toml::Table = d.other.clone().into_iter().collect();
        serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner().to_string();
            // serde names an unknown field in its message, not in the path.
            let key = match inner.split('`').nth(1) {
                Some(field) if inner.starts_with("unknown field") => field.to_string(),
                _ => path,
            };
            let key = if key == "." || key.is_empty() {
                format!("daemons.{daemon}")
            } else {
                format!("daemons.{daemon}.{key}")
            };
            self.invalid(&key, inner)
        })
    }

    pub fn invalid(&self, key: &str, why: String) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.clone(),
            key: key.to_string(),
            why,
        }
    }
}

/// Every example cluster file shipped in the workspace's `ops/config`, loaded and
/// validated, for the tests that check each daemon's section against them. Panics
/// naming a file that does not load, or when there is none.
pub fn shipped_examples() -> Vec<(PathBuf, ClusterConfig)> {
    let ops = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../ops/config");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&ops).unwrap_or_else(|e| panic!("{}: {e}", ops.display())) {
        let p = entry.expect("a directory entry").path();
        if p.extension().and_then(|e| e.to_str()) != Some("toml") {
            continue;
        }
        let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        let file: ClusterFile =
            toml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        let cfg = ClusterConfig::validate(&p, file).unwrap_or_else(|e| panic!("{e}"));
        out.push((p, cfg));
    }
    assert!(!out.is_empty(), "no example configs in {}", ops.display());
    out
}

impl ClusterFile {
    /// TOML text of the file.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("cluster file serializes")
    }

    /// Writes the file with mode 0600 (it holds the cluster key), atomically.
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        write_private(path, self.to_toml().as_bytes())
    }
}

/// Writes `bytes` to `path` atomically (a `.tmp` sibling, fsync'd, renamed) as a
/// file only its owner can read (0600): cluster files, sshd's config.
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    // A leftover of a crash goes; create_new then never writes through a link.
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
    std::fs::rename(tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> ClusterFile {
        let mut f = ClusterFile {
            node: "node-a".into(),
            signing_key: "cluster-1".into(),
            ..Default::default()
        };
        f.keys.insert(
            "cluster-1".into(),
            Secret::new(paddock_wire::keyring::generate_secret_hex()),
        );
        f.cluster.heartbeats = vec!["tcp://127.0.0.1:7111".into()];
        f.cluster.beat_interval_ms = 1000;
        f.daemons.insert(
            "heartbeat".into(),
            DaemonSection {
                rpc: "tcp://127.0.0.1:7101".into(),
                other: [
                    (
                        "pull".to_string(),
                        toml::Value::String("tcp://127.0.0.1:7111".into()),
                    ),
                    ("suspect_after".to_string(), toml::Value::Integer(2)),
                ]
                .into_iter()
                .collect(),
            },
        );
        f
    }

    #[test]
    fn round_trip_through_a_0600_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("paddock.toml");
        sample().write(&p).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let c = ClusterConfig::load(&p).unwrap();
        assert_eq!(c.node(), "node-a");
        assert_eq!(
            c.daemon_endpoint("heartbeat", "pull").unwrap(),
            "tcp://127.0.0.1:7111"
        );
        assert_eq!(c.registries(), vec!["tcp://127.0.0.1:7101".to_string()]);
        assert!(c.daemon_endpoint("locker", "rpc").is_err());
    }

    #[test]
    fn readable_by_others_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("paddock.toml");
        sample().write(&p).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = ClusterConfig::load(&p).unwrap_err().to_string();
        assert!(e.contains("chmod 600"), "{e}");
    }

    #[test]
    fn errors_name_the_key() {
        let p = Path::new("/x/paddock.toml");
        let mut f = sample();
        f.signing_key = "nope".into();
        let e = ClusterConfig::validate(p, f).unwrap_err().to_string();
        assert!(
            e.contains("`signing_key`") && e.contains("/x/paddock.toml"),
            "{e}"
        );

        let mut f = sample();
        f.keys.insert("cluster-1".into(), Secret::new("abcd"));
        let e = ClusterConfig::validate(p, f).unwrap_err().to_string();
        assert!(e.contains("`keys`") && e.contains("at least 32"), "{e}");

        let mut f = sample();
        f.cluster.heartbeats = vec!["127.0.0.1:7111".into()];
        let e = ClusterConfig::validate(p, f).unwrap_err().to_string();
        assert!(e.contains("cluster.heartbeats[0]"), "{e}");
    }

    #[test]
    fn a_file_without_a_cluster_table_gets_the_default_beat_interval() {
        let secret = paddock_wire::keyring::generate_secret_hex();
        let text = format!("node = \"a\"\nsigning_key = \"k\"\n[keys]\nk = \"{secret}\"\n");
        let file: ClusterFile = toml::from_str(&text).unwrap();
        let c = ClusterConfig::validate(Path::new("/x"), file).unwrap();
        assert_eq!(c.beat_interval, Duration::from_millis(1000));
        assert_eq!(ClusterFile::default().cluster.beat_interval_ms, 1000);
    }

    #[test]
    fn beat_interval_is_bounded_both_ways() {
        let p = Path::new("/x/paddock.toml");
        for bad in [0, 9, 3_600_001, u64::MAX] {
            let mut f = sample();
            f.cluster.beat_interval_ms = bad;
            let e = ClusterConfig::validate(p, f).unwrap_err().to_string();
            assert!(e.contains("`cluster.beat_interval_ms`"), "{e}");
        }
        for good in [10, 1000, 3_600_000] {
            let mut f = sample();
            f.cluster.beat_interval_ms = good;
            ClusterConfig::validate(p, f).unwrap();
        }
    }

    /// The message and its causes, joined as `{:#}` would join them.
    fn chain(e: &(dyn std::error::Error + 'static)) -> String {
        let mut s = e.to_string();
        let mut cur = e.source();
        while let Some(c) = cur {
            s = format!("{s}: {c}");
            cur = c.source();
        }
        s
    }

    #[test]
    fn a_load_error_says_its_cause_once() {
        let dir = tempfile::tempdir().unwrap();
        let e = ClusterConfig::load(&dir.path().join("absent.toml")).unwrap_err();
        let shown = chain(&e);
        assert_eq!(shown.matches("No such file").count(), 1, "{shown}");
        assert!(shown.contains("absent.toml"), "{shown}");

        let p = write_text(dir.path(), "signing_key = \"k\"\n");
        let shown = chain(&ClusterConfig::load(&p).unwrap_err());
        assert_eq!(shown.matches("node").count(), 1, "{shown}");
    }

    #[test]
    fn a_non_integer_setting_is_a_typed_error() {
        let mut d = DaemonSection::default();
        d.other
            .insert("n".into(), toml::Value::String("many".into()));
        d.other.insert("f".into(), toml::Value::Float(1.5));
        assert_eq!(d.get_u64("n"), Err(NotAnInteger("many".into())));
        assert_eq!(d.get_u64("f"), Err(NotAnInteger("1.5".into())));
        assert_eq!(d.get_u64("absent"), Ok(None));
    }

    #[test]
    fn missing_field_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("paddock.toml");
        std::fs::write(&p, "signing_key = \"k\"\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        let e = ClusterConfig::load(&p).unwrap_err().to_string();
        assert!(e.contains("paddock.toml") && e.contains("node"), "{e}");
    }

    #[test]
    fn endpoints_are_checked() {
        assert!(is_endpoint("tcp://127.0.0.1:7101"));
        assert!(is_endpoint("tcp://*:7101"));
        assert!(is_endpoint("ipc:///tmp/x.sock"));
        assert!(!is_endpoint("tcp://127.0.0.1"));
        assert!(!is_endpoint("http://x:1"));
    }

    #[test]
    fn shipped_example_configs_load() {
        assert!(!shipped_examples().is_empty());
    }

    fn write_text(dir: &Path, text: &str) -> PathBuf {
        let p = dir.join("paddock.toml");
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        p
    }

    #[derive(Debug, Default, Deserialize, PartialEq)]
    #[serde(default, deny_unknown_fields)]
    struct Demo {
        backoff_base_ms: Ms,
        restart_limit: u32,
        #[serde(rename = "pub")]
        publish: Option<String>,
    }

    #[test]
    fn a_daemon_section_is_typed_and_a_typo_names_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let mut f = sample();
        let mut d = DaemonSection {
            rpc: "tcp://127.0.0.1:7131".into(),
            ..Default::default()
        };
        d.other
            .insert("backoff_base_ms".into(), toml::Value::Integer(250));
        d.other.insert(
            "pub".into(),
            toml::Value::String("tcp://127.0.0.1:7132".into()),
        );
        f.daemons.insert("demo".into(), d.clone());
        let p = dir.path().join("paddock.toml");
        f.write(&p).unwrap();
        let c = ClusterConfig::load(&p).unwrap();
        let demo: Demo = c.section("demo").unwrap();
        assert_eq!(demo.backoff_base_ms.get(), Duration::from_millis(250));
        assert_eq!(demo.publish.as_deref(), Some("tcp://127.0.0.1:7132"));
        assert_eq!(c.section::<Demo>("absent").unwrap(), Demo::default());

        d.other
            .insert("backof_base_ms".into(), toml::Value::Integer(1));
        f.daemons.insert("demo".into(), d.clone());
        f.write(&p).unwrap();
        let e = ClusterConfig::load(&p)
            .unwrap()
            .section::<Demo>("demo")
            .unwrap_err()
            .to_string();
        assert!(e.contains("`daemons.demo.backof_base_ms`"), "{e}");

        d.other.remove("backof_base_ms");
        d.other
            .insert("restart_limit".into(), toml::Value::String("many".into()));
        f.daemons.insert("demo".into(), d);
        f.write(&p).unwrap();
        let e = ClusterConfig::load(&p)
            .unwrap()
            .section::<Demo>("demo")
            .unwrap_err()
            .to_string();
        assert!(e.contains("`daemons.demo.restart_limit`"), "{e}");
    }

    #[test]
    fn milliseconds_are_read_from_numbers_and_digit_strings() {
        let v: Ms = serde_json::from_str("1500").unwrap();
        assert_eq!(v.get(), Duration::from_millis(1500));
        let v: Ms = serde_json::from_str("\"20\"").unwrap();
        assert_eq!(v.get(), Duration::from_millis(20));
        assert!(serde_json::from_str::<Ms>("\"soon\"").is_err());
        assert!(serde_json::from_str::<Ms>("-1").is_err());
    }

    #[test]
    fn a_toml_error_gives_the_place_but_never_quotes_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let secret = paddock_wire::keyring::generate_secret_hex();
        let p = write_text(
            dir.path(),
            &format!("node = \"a\"\nsigning_key = \"k\"\n[keys]\nk = \"{secret}\" oops\n"),
        );
        let e = ClusterConfig::load(&p).unwrap_err().to_string();
        assert!(e.contains("line 4"), "{e}");
        assert!(!e.contains(&secret), "the error quotes the secret: {e}");
    }

    #[test]
    fn upper_case_key_ids_are_refused_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let secret = paddock_wire::keyring::generate_secret_hex();
        let p = write_text(
            dir.path(),
            &format!(
                "node = \"a\"\nsigning_key = \"cluster-1\"\n[keys]\nCluster-1 = \"{secret}\"\n"
            ),
        );
        let e = ClusterConfig::load(&p).unwrap_err().to_string();
        assert!(
            e.contains("`keys.Cluster-1`") && e.contains("lower case"),
            "{e}"
        );
    }

    #[test]
    fn a_file_owned_by_someone_else_is_refused() {
        assert!(
            nix::unistd::Uid::effective().is_root(),
            "this test chowns a file: run it as root, as CI does"
        );
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("paddock.toml");
        sample().write(&p).unwrap();
        std::os::unix::fs::chown(&p, Some(65534), None).unwrap();
        let e = ClusterConfig::load(&p).unwrap_err().to_string();
        assert!(e.contains("owned by uid 65534"), "{e}");
    }

    #[test]
    fn debug_output_shows_no_secret() {
        let mut f = sample();
        let (cp, cs) = paddock_wire::curve::generate().unwrap();
        let (sp, ss) = paddock_wire::curve::generate().unwrap();
        f.curve = Some(CurveSection {
            server_public: sp,
            server_secret: Some(Secret::new(ss.clone())),
            client_public: cp,
            client_secret: Secret::new(cs.clone()),
            clients: BTreeMap::new(),
        });
        let hmac = f.keys["cluster-1"].expose().to_string();
        let c = ClusterConfig::validate(Path::new("/x"), f).unwrap();
        let shown = format!("{c:?} {:?} {:?}", c.file, c.credentials());
        for secret in [&hmac, &ss, &cs] {
            assert!(!shown.contains(secret.as_str()), "Debug shows a secret");
        }
        assert!(c.node_keys().unwrap().is_some());
    }

    #[test]
    fn curve_keys_are_checked() {
        let mut f = sample();
        let (cp, cs) = paddock_wire::curve::generate().unwrap();
        f.curve = Some(CurveSection {
            server_public: "too-short".into(),
            server_secret: None,
            client_public: cp,
            client_secret: Secret::new(cs),
            clients: BTreeMap::new(),
        });
        let e = ClusterConfig::validate(Path::new("/x"), f.clone())
            .unwrap_err()
            .to_string();
        assert!(e.contains("`curve.server_public`"), "{e}");
        let (sp, _) = paddock_wire::curve::generate().unwrap();
        f.curve.as_mut().unwrap().server_public = sp;
        let c = ClusterConfig::validate(Path::new("/x"), f).unwrap();
        let e = c.node_keys().unwrap_err().to_string();
        assert!(e.contains("`curve.server_secret`"), "{e}");
    }
}
