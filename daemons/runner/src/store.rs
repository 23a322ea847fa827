//! What the runner keeps on disk for each instance, in
//! `<instances_dir>/instances/<id>/`: `instance.json` (the record below),
//! `spec.json` (what the shim runs), `app.log`, and the shim's socket and pid.
//!
//! The record is the runner's own boundary type, versioned, not the wire request:
//! the wire may grow fields the runner does not keep, and a record written by an
//! older runner must still be read by a newer one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use paddock_wire::kinds::{Health, InstanceLimits, InstanceStart, LogLine, Owner, RestartPolicy};
use serde::{Deserialize, Serialize};

/// The record version this runner writes. Version 0 is the first runner's
/// version-less record (the same fields, the spec under `req`).
pub const RECORD_VERSION: u32 = 1;

/// What the instance was asked to be, as the runner keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AppSpec {
    pub app: String,
    pub proc: String,
    pub dir: String,
    #[serde(default)]
    pub command: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub argv: Option<Vec<String>>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub health: Health,
    #[serde(default)]
    pub limits: InstanceLimits,
    #[serde(default)]
    pub restart: RestartPolicy,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_signal: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reload_signal: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_grace_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_timeout_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_interval_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_after_disconnect_ms: Option<u64>,
    /// The release form: the release it runs, seen at `/app` (absent from records
    /// of `dir`-form instances and from records written before releases).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release: Option<ReleaseSpec>,
}

/// The release an instance runs, as the runner keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReleaseSpec {
    /// The slug's sha256 (64 lowercase hex).
    pub slug: String,
    pub version: i64,
    /// The unpacked slug, the overlay's read-only layer.
    pub lower: PathBuf,
}

impl From<InstanceStart> for AppSpec {
    fn from(r: InstanceStart) -> AppSpec {
        AppSpec {
            app: r.app,
            proc: r.proc,
            dir: r.dir,
            command: r.command,
            argv: r.argv,
            env: r.env,
            health: r.health,
            limits: r.limits,
            restart: r.restart,
            stop_signal: r.stop_signal,
            reload_signal: r.reload_signal,
            stop_grace_ms: r.stop_grace_ms,
            start_timeout_ms: r.start_timeout_ms,
            health_interval_ms: r.health_interval_ms,
            stop_after_disconnect_ms: r.stop_after_disconnect_ms,
            release: None,
        }
    }
}

/// `instance.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Absent (0) in records written before records were versioned.
    #[serde(default)]
    pub version: u32,
    pub id: String,
    #[serde(alias = "req")]
    pub spec: AppSpec,
    pub port: u16,
    pub uid: u32,
    pub gid: u32,
    pub created: i64,
    /// False from the moment a stop is requested: a restarted runner finishes the
    /// stop instead of starting the app again.
    pub running: bool,
    pub restarts: u32,
    /// Why it was given up on, if it was (survives a runner restart).
    #[serde(default)]
    pub crashed: Option<String>,
    /// When it stopped (epoch ms); its directories are removed `stopped_keep`
    /// later.
    #[serde(default)]
    pub stopped_at: Option<i64>,
    /// The fencing token of the start that placed it (absent: none given, or an
    /// older runner's record).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<u64>,
    /// Who placed it (older records: the operator).
    #[serde(default)]
    pub owner: Owner,
    /// A fingerprint of the start request ([`fingerprint`]), so that a resend of
    /// that start is told from another start under the same id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<String>,
}

/// A stable fingerprint of a start request's body without its `token`: FNV-1a
/// (128 bits) of the body's JSON with every object's keys sorted. Not a
/// defence against anyone (senders hold the cluster key); it only tells one
/// request from another, the same across runner versions.
pub fn fingerprint(body: &serde_json::Value) -> String {
    fn canonical(v: &serde_json::Value, top: bool, out: &mut String) {
        match v {
            serde_json::Value::Object(m) => {
                let mut keys: Vec<&String> = m
                    .keys()
                    .filter(|k| !(top && k.as_str() == "token"))
                    .collect();
                keys.sort();
                out.push('{');
                for (i, k) in keys.into_iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&serde_json::Value::from(k.as_str()).to_string());
                    out.push(':');
                    canonical(&m[k], false, out);
                }
                out.push('}');
            }
            serde_json::Value::Array(a) => {
                out.push('[');
                for (i, x) in a.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    canonical(x, false, out);
                }
                out.push(']');
            }
            other => out.push_str(&other.to_string()),
        }
    }
    let mut text = String::new();
    canonical(body, true, &mut text);
    let mut h: u128 = 0x6c62272e07bb014262b821756295c58d;
    for b in text.bytes() {
        h ^= u128::from(b);
        h = h.wrapping_mul(0x0000000001000000000000000000013B);
    }
    format!("fnv1a128:{h:032x}")
}

/// `<instances_dir>/fence.json`: the largest fencing token this runner has
/// accepted, so that a restarted runner still refuses older leaders.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct FenceRecord {
    version: u32,
    max_token: u64,
}

/// Reads the largest accepted token (None: no fenced request yet). A file that
/// exists but cannot be read is an error: guessing could readmit an old leader.
pub fn load_fence(instances_dir: &Path) -> Result<Option<u64>, StoreError> {
    let path = instances_dir.join("fence.json");
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(StoreError::Read { path, source }),
    };
    let rec: FenceRecord =
        serde_json::from_slice(&bytes).map_err(|source| StoreError::Parse { path, source })?;
    Ok(Some(rec.max_token))
}

/// Records a larger accepted token durably (fsync'd before the request is
/// carried out).
pub fn save_fence(instances_dir: &Path, max_token: u64) -> std::io::Result<()> {
    write_json(
        &instances_dir.join("fence.json"),
        &FenceRecord {
            version: 1,
            max_token,
        },
    )
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not an instance record")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path} is record version {found}; this runner reads versions 0 to {RECORD_VERSION} (upgrade the runner)")]
    Version { path: PathBuf, found: u32 },
    #[error("{path} names instance `{id}`, which is not its directory's name")]
    Misplaced { path: PathBuf, id: String },
}

/// Reads an instance directory's record, whichever version wrote it.
pub fn load(dir: &Path) -> Result<Record, StoreError> {
    let path = dir.join("instance.json");
    let bytes = std::fs::read(&path).map_err(|source| StoreError::Read {
        path: path.clone(),
        source,
    })?;
    let rec: Record = serde_json::from_slice(&bytes).map_err(|source| StoreError::Parse {
        path: path.clone(),
        source,
    })?;
    if rec.version > RECORD_VERSION {
        return Err(StoreError::Version {
            path,
            found: rec.version,
        });
    }
    if dir.file_name().and_then(|n| n.to_str()) != Some(rec.id.as_str()) {
        return Err(StoreError::Misplaced { path, id: rec.id });
    }
    Ok(Record {
        version: RECORD_VERSION,
        ..rec
    })
}

/// Writes `instance.json` durably.
pub fn save(dir: &Path, rec: &Record) -> std::io::Result<()> {
    write_json(&dir.join("instance.json"), rec)
}

/// Writes JSON durably and atomically, mode 0600: the data, then the rename, then
/// the directory entry (a crash leaves the old file or the new one, never an empty
/// one).
pub fn write_json<T: Serialize>(path: &Path, v: &T) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    std::io::Write::write_all(&mut f, &serde_json::to_vec_pretty(v).expect("serializes"))?;
    f.sync_all()?;
    std::fs::rename(tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// The last `n` lines of an instance's log (the rotated file first when needed).
pub fn tail_log(path: &Path, n: usize) -> Vec<LogLine> {
    let mut lines: Vec<LogLine> = Vec::new();
    for p in [path.with_extension("log.1"), path.to_path_buf()] {
        if let Ok(text) = std::fs::read_to_string(&p) {
            lines.extend(text.lines().filter_map(|l| serde_json::from_str(l).ok()));
        }
    }
    let skip = lines.len().saturating_sub(n);
    lines.split_off(skip)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str) -> Record {
        Record {
            version: RECORD_VERSION,
            id: id.into(),
            spec: AppSpec {
                app: "shop".into(),
                proc: "web".into(),
                dir: "/srv/shop".into(),
                command: "python3 app.py".into(),
                argv: None,
                env: BTreeMap::new(),
                health: Health::default(),
                limits: InstanceLimits::default(),
                restart: RestartPolicy::default(),
                stop_signal: None,
                reload_signal: None,
                stop_grace_ms: None,
                start_timeout_ms: None,
                health_interval_ms: None,
                stop_after_disconnect_ms: None,
                release: None,
            },
            port: 20001,
            uid: 1001,
            gid: 1001,
            created: 1,
            running: true,
            restarts: 2,
            crashed: None,
            stopped_at: None,
            token: Some(7),
            owner: Owner::Scheduler,
            request: Some("fnv1a128:00".into()),
        }
    }

    #[test]
    fn a_record_round_trips_with_its_version() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("shop-web-1");
        std::fs::create_dir(&dir).unwrap();
        save(&dir, &record("shop-web-1")).unwrap();
        let text = std::fs::read_to_string(dir.join("instance.json")).unwrap();
        assert!(text.contains("\"version\": 1"), "{text}");
        assert!(text.contains("\"spec\""), "{text}");
        assert_eq!(load(&dir).unwrap(), record("shop-web-1"));
    }

    #[test]
    fn a_release_instance_round_trips_and_older_records_have_no_release() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("shop-web-2");
        std::fs::create_dir(&dir).unwrap();
        let mut r = record("shop-web-2");
        r.spec.release = Some(ReleaseSpec {
            slug: "ab".repeat(32),
            version: 7,
            lower: PathBuf::from("/var/lib/paddock/runner/slugs/shop/abab"),
        });
        save(&dir, &r).unwrap();
        assert_eq!(load(&dir).unwrap(), r);
        r.spec.release = None;
        save(&dir, &r).unwrap();
        let text = std::fs::read_to_string(dir.join("instance.json")).unwrap();
        assert!(!text.contains("release"), "{text}");
        assert_eq!(load(&dir).unwrap().spec.release, None);
    }

    #[test]
    fn the_first_runners_version_less_record_is_read() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("old-web-1");
        std::fs::create_dir(&dir).unwrap();
        // As the first runner wrote it: no version, the wire request under `req`.
        std::fs::write(
            dir.join("instance.json"),
            r#"{"id":"old-web-1","req":{"app":"old","proc":"web","dir":"/srv/old",
                "command":"python3 app.py","env":{},"health":{},"limits":{},"restart":{}},
                "port":20002,"uid":1002,"gid":1002,"created":5,"running":true,"restarts":0}"#,
        )
        .unwrap();
        let r = load(&dir).unwrap();
        assert_eq!(r.version, RECORD_VERSION);
        assert_eq!((r.spec.app.as_str(), r.port), ("old", 20002));
        assert_eq!(r.crashed, None);
        assert_eq!((r.token, r.owner, r.request), (None, Owner::Operator, None));
    }

    #[test]
    fn fingerprints_ignore_key_order_and_the_token_only() {
        let a = serde_json::json!({"app": "a", "env": {"X": "1", "Y": "2"}, "token": 3});
        let b = serde_json::json!({"env": {"Y": "2", "X": "1"}, "app": "a", "token": 9});
        let c = serde_json::json!({"env": {"Y": "2", "X": "2"}, "app": "a", "token": 3});
        let d = serde_json::json!({"app": "a", "env": {"X": "1", "Y": "2", "token": 3}});
        assert_eq!(fingerprint(&a), fingerprint(&b));
        assert_ne!(fingerprint(&a), fingerprint(&c));
        assert_ne!(fingerprint(&a), fingerprint(&d), "only the top-level token");
        // Stable across builds: a record written today is compared tomorrow.
        assert_eq!(
            fingerprint(&serde_json::json!({"b": null, "token": 1, "a": [1, "x"]})),
            "fnv1a128:85875fc3c9bc05f9cddf8bc43c940b56"
        );
    }

    #[test]
    fn the_fence_survives_and_a_damaged_one_is_an_error() {
        let t = tempfile::tempdir().unwrap();
        assert_eq!(load_fence(t.path()).unwrap(), None);
        save_fence(t.path(), 42).unwrap();
        assert_eq!(load_fence(t.path()).unwrap(), Some(42));
        std::fs::write(t.path().join("fence.json"), "{oops").unwrap();
        assert!(load_fence(t.path()).is_err());
    }

    #[test]
    fn unreadable_records_say_what_is_wrong() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("x-web-1");
        std::fs::create_dir(&dir).unwrap();
        assert!(matches!(load(&dir), Err(StoreError::Read { .. })));
        std::fs::write(dir.join("instance.json"), "{not json").unwrap();
        assert!(matches!(load(&dir), Err(StoreError::Parse { .. })));
        let mut future = record("x-web-1");
        future.version = RECORD_VERSION + 1;
        save(&dir, &future).unwrap();
        let e = load(&dir).unwrap_err();
        assert!(matches!(e, StoreError::Version { found: 2, .. }), "{e}");
        assert!(e.to_string().contains("upgrade the runner"), "{e}");
        save(&dir, &record("elsewhere")).unwrap();
        assert!(matches!(load(&dir), Err(StoreError::Misplaced { .. })));
    }
}
