//! The release form of `instance.start` and `run.start`: the release read from the
//! api (`release.get`), its slug fetched once per node from the blobstore,
//! verified, and unpacked hostile-safely into a read-only cache that instances
//! see at `/app` through an overlay with a fresh writable layer at every start.
//!
//! Cache layout: `<instances_dir>/slugs/` (root, 0700) holds `<app>/<sha256>/`,
//! the unpacked slug, owned by the app's user with group and other bits cleared.
//! The app's user cannot reach it (its parents are root-only): it sees it only
//! through the overlay, where every write is copied up into the start's own layer,
//! so the cache is never changed by an app. It is per app, not per sha256, so that
//! one app's files are never readable by another's user.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::rc::Rc;

use paddock_wire::{Code, WireError};
use serde::Deserialize;
use serde_json::Value;

/// What an unpacked slug may hold at most: a slug that inflates past this is
/// refused (a build can make a large `/app`, not an unbounded one).
pub const MAX_UNPACKED_BYTES: u64 = 8 << 30;
pub const MAX_ENTRIES: u64 = 1_000_000;

/// `"release": {"slug", "version"}` in a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReleaseRef {
    /// 64 lowercase hex characters (the sha256 of the compressed slug).
    pub slug: String,
    pub version: i64,
}

/// A slug id as the request or the api gives it: `<64 hex>` or `sha256:<64 hex>`,
/// as 64 lowercase hex characters.
pub fn slug_sha(s: &str) -> Option<String> {
    let hex = s.strip_prefix("sha256:").unwrap_or(s);
    (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| hex.to_ascii_lowercase())
}

impl ReleaseRef {
    /// Reads and checks the `release` field of a request body.
    pub fn parse(v: &Value) -> Result<ReleaseRef, WireError> {
        let o = v.as_object().ok_or_else(|| {
            WireError::invalid("`release` must be an object {\"slug\": sha256, \"version\": n}")
        })?;
        let slug = o
            .get("slug")
            .and_then(Value::as_str)
            .and_then(slug_sha)
            .ok_or_else(|| {
                WireError::invalid("`release.slug` must be the slug's sha256 (64 hex characters)")
            })?;
        let version = o
            .get("version")
            .and_then(Value::as_i64)
            .filter(|v| *v > 0 && *v <= i32::MAX as i64)
            .ok_or_else(|| {
                WireError::invalid("`release.version` must be a release version (an integer > 0)")
            })?;
        Ok(ReleaseRef { slug, version })
    }
}

/// The parts of the api's release a runner uses.
#[derive(Debug, Clone, Deserialize)]
pub struct Release {
    pub version: i64,
    #[serde(default)]
    pub slug: Option<String>,
    #[serde(default, deserialize_with = "null_is_empty")]
    pub process_types: BTreeMap<String, String>,
    #[serde(default, deserialize_with = "null_is_empty")]
    pub config: BTreeMap<String, String>,
}

fn null_is_empty<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<BTreeMap<String, String>, D::Error> {
    Ok(Option::<BTreeMap<String, String>>::deserialize(d)?.unwrap_or_default())
}

/// A one-off's command line as the shell runs it: `exec COMMAND` for a single
/// command (its pid is the one-off's own), but the line as it is when it may hold
/// several (`;`, `&`, `|`, a newline): `exec a && b` would never run `b`. A
/// one-off is killed by its cgroup, so the shell staying its parent costs nothing.
/// (Instances always exec: their pid gets the reload signal.)
pub fn one_off_line(command: &str) -> String {
    if command.contains([';', '&', '|', '\n']) {
        command.to_string()
    } else {
        format!("exec {command}")
    }
}

/// The command that sources the slug's `.profile.d/*.sh` (as Heroku does) and then
/// runs `line`, a shell line (`exec COMMAND` for instances, so the tracked pid is
/// still the app's); `argv`, when given, is exec'd as given after the sourcing.
pub fn profile_wrapped(line: &str, argv: Option<&[String]>) -> Vec<String> {
    const SOURCE: &str =
        "for f in /app/.profile.d/*.sh; do [ -r \"$f\" ] && . \"$f\"; done; unset f; ";
    match argv.filter(|a| !a.is_empty()) {
        Some(a) => {
            let mut v = vec![
                "/bin/sh".to_string(),
                "-c".to_string(),
                format!("{SOURCE}exec \"$@\""),
                "sh".to_string(),
            ];
            v.extend(a.iter().cloned());
            v
        }
        None => vec![
            "/bin/sh".to_string(),
            "-c".to_string(),
            format!("{SOURCE}{line}"),
        ],
    }
}

/// Why a slug could not be unpacked.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("the slug is not a valid zstd-compressed tar: {0}")]
    Format(std::io::Error),
    #[error("the slug holds {path:?}, {why}; refused")]
    Hostile { path: String, why: &'static str },
    #[error("the slug unpacks to more than {0} bytes; refused")]
    TooLarge(u64),
    #[error("the slug holds more than {0} entries; refused")]
    TooMany(u64),
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The path an entry is written to, relative to the slug's root: no absolute
/// paths, no `..`, nothing but plain names (`./` is dropped). `None` for the root.
fn entry_path(raw: &[u8]) -> Result<Option<PathBuf>, UnpackError> {
    let shown = String::from_utf8_lossy(raw).to_string();
    let hostile = |why| UnpackError::Hostile {
        path: shown.clone(),
        why,
    };
    if raw.contains(&0) {
        return Err(hostile("a path with a NUL byte"));
    }
    let p = Path::new(OsStr::from_bytes(raw));
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            Component::ParentDir => return Err(hostile("a path with `..`")),
            Component::RootDir | Component::Prefix(_) => return Err(hostile("an absolute path")),
        }
    }
    Ok((!out.as_os_str().is_empty()).then_some(out))
}

/// Every ancestor of `rel` under `root` must be a real directory (never a
/// symlink): nothing is ever written through a link the slug made. Missing ones
/// are made (mode 0700 until the final modes are set).
fn real_parent(root: &Path, rel: &Path, shown: &str) -> Result<PathBuf, UnpackError> {
    let mut at = root.to_path_buf();
    if let Some(parent) = rel.parent() {
        for c in parent.components() {
            at.push(c);
            match std::fs::symlink_metadata(&at) {
                Ok(m) if m.file_type().is_dir() => {}
                Ok(_) => {
                    return Err(UnpackError::Hostile {
                        path: shown.to_string(),
                        why: "a path through a symlink or a file",
                    })
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    std::fs::DirBuilder::new()
                        .mode(0o700)
                        .create(&at)
                        .map_err(|source| UnpackError::Write {
                            path: at.clone(),
                            source,
                        })?;
                }
                Err(source) => return Err(UnpackError::Write { path: at, source }),
            }
        }
    }
    Ok(root.join(rel))
}

/// Removes what an earlier entry of the same name left (a later entry wins, as
/// with tar), but never a directory for a non-directory.
fn clear(path: &Path, shown: &str) -> Result<(), UnpackError> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_dir() => Err(UnpackError::Hostile {
            path: shown.to_string(),
            why: "a file where the slug has a directory",
        }),
        Ok(_) => std::fs::remove_file(path).map_err(|source| UnpackError::Write {
            path: path.to_path_buf(),
            source,
        }),
        Err(_) => Ok(()),
    }
}

/// What [`unpack`] wrote.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Unpacked {
    pub entries: u64,
    pub bytes: u64,
}

/// Unpacks a zstd-compressed tar into `dest` (an empty directory nobody else can
/// reach), refusing anything hostile: absolute paths, `..`, devices, fifos,
/// sockets, writes through a symlink, hard links leaving the slug. Then gives it
/// all to `owner` (uid, gid) with group and other bits cleared; symlinks are
/// created as they are (they resolve inside the app's own view at `/app`) and
/// never followed by the runner.
pub fn unpack(
    src: impl Read,
    dest: &Path,
    owner: (u32, u32),
    max_bytes: u64,
) -> Result<Unpacked, UnpackError> {
    let z = zstd::stream::read::Decoder::new(src).map_err(UnpackError::Format)?;
    let mut ar = tar::Archive::new(z);
    let mut n = Unpacked::default();
    // Directories get their final modes last, so that a read-only directory does
    // not stop the entries written into it.
    let mut dirs: Vec<(PathBuf, u32)> = Vec::new();
    for e in ar.entries().map_err(UnpackError::Format)? {
        let mut e = e.map_err(UnpackError::Format)?;
        n.entries += 1;
        if n.entries > MAX_ENTRIES {
            return Err(UnpackError::TooMany(MAX_ENTRIES));
        }
        let raw = e.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&raw).to_string();
        let kind = e.header().entry_type();
        let mode = e.header().mode().unwrap_or(0o644) & 0o7777;
        let Some(rel) = entry_path(&raw)? else {
            continue; // the root itself (`./`)
        };
        let hostile = |why| UnpackError::Hostile {
            path: shown.clone(),
            why,
        };
        use tar::EntryType as T;
        match kind {
            T::Directory => {
                let path = real_parent(dest, &rel, &shown)?;
                match std::fs::symlink_metadata(&path) {
                    Ok(m) if m.file_type().is_dir() => {}
                    Ok(_) => return Err(hostile("a directory where the slug has a file")),
                    Err(_) => std::fs::DirBuilder::new()
                        .mode(0o700)
                        .create(&path)
                        .map_err(|source| UnpackError::Write {
                            path: path.clone(),
                            source,
                        })?,
                }
                dirs.push((path, mode));
            }
            T::Regular | T::Continuous => {
                let path = real_parent(dest, &rel, &shown)?;
                clear(&path, &shown)?;
                let size = e.header().size().map_err(UnpackError::Format)?;
                if n.bytes.saturating_add(size) > max_bytes {
                    return Err(UnpackError::TooLarge(max_bytes));
                }
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&path)
                    .map_err(|source| UnpackError::Write {
                        path: path.clone(),
                        source,
                    })?;
                // Bounded by the header's size (the tar reader stops there).
                let copied = std::io::copy(&mut e, &mut f).map_err(UnpackError::Format)?;
                n.bytes += copied;
                // The build's times: Python's bytecode caches compare them.
                if let Ok(t) = e.header().mtime() {
                    let _ =
                        f.set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(t));
                }
                f.set_permissions(std::fs::Permissions::from_mode(owner_mode(mode, false)))
                    .map_err(|source| UnpackError::Write {
                        path: path.clone(),
                        source,
                    })?;
            }
            T::Symlink => {
                let target = e
                    .link_name_bytes()
                    .ok_or_else(|| hostile("a symlink without a target"))?
                    .into_owned();
                if target.is_empty() || target.contains(&0) {
                    return Err(hostile("a symlink with an empty or NUL target"));
                }
                let path = real_parent(dest, &rel, &shown)?;
                clear(&path, &shown)?;
                std::os::unix::fs::symlink(OsStr::from_bytes(&target), &path).map_err(
                    |source| UnpackError::Write {
                        path: path.clone(),
                        source,
                    },
                )?;
            }
            T::Link => {
                let target = e
                    .link_name_bytes()
                    .ok_or_else(|| hostile("a hard link without a target"))?
                    .into_owned();
                let Some(trel) = entry_path(&target)? else {
                    return Err(hostile("a hard link to the slug's root"));
                };
                let tpath = real_parent(dest, &trel, &shown)?;
                match std::fs::symlink_metadata(&tpath) {
                    Ok(m) if m.file_type().is_file() => {}
                    _ => return Err(hostile("a hard link to something not a file of the slug")),
                }
                let path = real_parent(dest, &rel, &shown)?;
                clear(&path, &shown)?;
                // linkat without AT_SYMLINK_FOLLOW: the target was checked to be a
                // regular file of the slug, not a link.
                std::fs::hard_link(&tpath, &path).map_err(|source| UnpackError::Write {
                    path: path.clone(),
                    source,
                })?;
            }
            T::XGlobalHeader | T::XHeader | T::GNULongName | T::GNULongLink => {}
            T::Char | T::Block => return Err(hostile("a device")),
            T::Fifo => return Err(hostile("a fifo")),
            _ => {
                return Err(hostile(
                    "an entry type that is not a file, directory or link",
                ))
            }
        }
    }
    chown_tree(dest, owner)?;
    for (d, mode) in dirs.into_iter().rev() {
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(owner_mode(mode, true)))
            .map_err(|source| UnpackError::Write { path: d, source })?;
    }
    std::fs::set_permissions(dest, std::fs::Permissions::from_mode(0o700)).map_err(|source| {
        UnpackError::Write {
            path: dest.to_path_buf(),
            source,
        }
    })?;
    Ok(n)
}

/// The owner's bits only (no set-id, no sticky bit, nothing for group or others),
/// always readable, and searchable for directories.
fn owner_mode(mode: u32, dir: bool) -> u32 {
    let m = (mode & 0o700) | 0o400;
    if dir {
        m | 0o100
    } else {
        m
    }
}

/// `lchown` of everything under (and including) `root`; links are never followed.
fn chown_tree(root: &Path, (uid, gid): (u32, u32)) -> Result<(), UnpackError> {
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        std::os::unix::fs::lchown(&p, Some(uid), Some(gid)).map_err(|source| {
            UnpackError::Write {
                path: p.clone(),
                source,
            }
        })?;
        let m = std::fs::symlink_metadata(&p).map_err(|source| UnpackError::Write {
            path: p.clone(),
            source,
        })?;
        if m.file_type().is_dir() {
            for e in std::fs::read_dir(&p).map_err(|source| UnpackError::Write {
                path: p.clone(),
                source,
            })? {
                let e = e.map_err(|source| UnpackError::Write {
                    path: p.clone(),
                    source,
                })?;
                stack.push(e.path());
            }
        }
    }
    Ok(())
}

/// One async lock per (app, sha256) being fetched.
type FetchLocks = HashMap<(String, String), Rc<tokio::sync::Mutex<()>>>;

/// The node's slug cache, and the release look-ups (shared by instances and
/// one-offs; everything runs on the runner's one thread).
#[derive(Clone)]
pub struct Releases {
    calls: paddock_daemon::calls::Calls,
    root: PathBuf,
    /// One lock per (app, sha256): concurrent starts of one slug wait for one fetch.
    locks: Rc<RefCell<FetchLocks>>,
}

/// What a release-form request becomes: the release as the api has it, and the
/// unpacked slug to put under `/app`.
pub struct Resolved {
    pub release: Release,
    pub sha: String,
    pub lower: PathBuf,
}

impl Releases {
    pub fn new(calls: paddock_daemon::calls::Calls, instances_dir: &Path) -> Releases {
        Releases {
            calls,
            root: instances_dir.join("slugs"),
            locks: Rc::default(),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `release.get` from the api, checked against the request.
    pub async fn get(&self, app: &str, r: &ReleaseRef) -> Result<Release, WireError> {
        let body = serde_json::json!({"app": app, "version": r.version});
        let reply = self
            .calls
            .call_daemon("api", "release.get", body)
            .await
            .map_err(|e| match e {
                paddock_daemon::calls::CallError::Call(paddock_wire::ClientError::Remote(w)) => {
                    WireError::new(
                        w.code,
                        format!("release v{} of {app}: {}", r.version, w.message),
                    )
                }
                other => WireError::unavailable(format!(
                    "cannot read release v{} of {app} from the api: {}",
                    r.version,
                    crate::chain(&other)
                )),
            })?;
        let rel: Release = serde_json::from_value(reply["release"].clone()).map_err(|e| {
            WireError::internal(format!(
                "the api's release v{} of {app} is not readable: {e}",
                r.version
            ))
        })?;
        let theirs = rel.slug.as_deref().and_then(slug_sha);
        match theirs {
            None => Err(WireError::invalid(format!(
                "release v{} of {app} has no slug: nothing to run",
                r.version
            ))),
            Some(s) if s != r.slug => Err(WireError::invalid(format!(
                "`release.slug` {} is not release v{}'s slug ({s})",
                r.slug, r.version
            ))),
            Some(_) if rel.version != r.version => Err(WireError::internal(format!(
                "the api answered release v{} for v{}",
                rel.version, r.version
            ))),
            Some(_) => Ok(rel),
        }
    }

    /// The release and its unpacked slug, fetched and unpacked if this node does
    /// not have it yet.
    /// The app's account is made once the api has said the release exists.
    pub async fn resolve(&self, app: &str, r: &ReleaseRef) -> Result<Resolved, WireError> {
        let release = self.get(app, r).await?;
        let owner =
            crate::users::ensure_user(app).map_err(|e| WireError::internal(crate::chain(&e)))?;
        let lower = self.ensure(app, &r.slug, owner).await?;
        Ok(Resolved {
            release,
            sha: r.slug.clone(),
            lower,
        })
    }

    /// The unpacked slug `<root>/<app>/<sha256>/`, made once per node: a fetch
    /// in progress is waited for, not repeated.
    pub async fn ensure(
        &self,
        app: &str,
        sha: &str,
        owner: (u32, u32),
    ) -> Result<PathBuf, WireError> {
        let key = (app.to_string(), sha.to_string());
        let lock = self
            .locks
            .borrow_mut()
            .entry(key.clone())
            .or_default()
            .clone();
        let result = {
            let _one = lock.lock().await;
            self.ensure_locked(app, sha, owner).await
        };
        // The last one out removes the lock (the map holds one reference).
        let mut locks = self.locks.borrow_mut();
        if locks.get(&key).is_some_and(|l| Rc::strong_count(l) <= 2) {
            locks.remove(&key);
        }
        result
    }

    async fn ensure_locked(
        &self,
        app: &str,
        sha: &str,
        owner: (u32, u32),
    ) -> Result<PathBuf, WireError> {
        let app_dir = self.root.join(app);
        let dest = app_dir.join(sha);
        match std::fs::symlink_metadata(&dest) {
            // Made for this account: an account made again (same name, another
            // uid) must not get files owned by a uid someone else may have now.
            Ok(m) if m.is_dir() && m.uid() == owner.0 && m.gid() == owner.1 => {
                // Its time says when it was last used (the cache sweep keeps it).
                let _ = std::fs::File::open(&dest)
                    .and_then(|f| f.set_modified(std::time::SystemTime::now()));
                return Ok(dest);
            }
            Ok(_) => {
                tracing::info!(
                    app,
                    slug = sha,
                    "cached slug of another account; unpacking again"
                );
                std::fs::remove_dir_all(&dest).map_err(|e| {
                    WireError::internal(format!("cannot remove {}: {e}", dest.display()))
                })?;
            }
            Err(_) => {}
        }
        for d in [&self.root, &app_dir] {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(d)
                .and_then(|_| std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700)))
                .map_err(|e| WireError::internal(format!("cannot create {}: {e}", d.display())))?;
        }
        let tag = ulid::Ulid::new().to_string().to_lowercase();
        let file = app_dir.join(format!(".{sha}.{tag}.tar.zst"));
        let tmp = app_dir.join(format!(".{sha}.{tag}"));
        let started = std::time::Instant::now();
        let fetched = paddock_blob::get_file(&self.calls, sha, &file).await;
        let size = match fetched {
            Ok(n) => n,
            Err(e) => {
                let _ = std::fs::remove_file(&file);
                return Err(WireError::new(
                    Code::Unavailable,
                    format!(
                        "cannot fetch slug {sha} from the blobstore: {}",
                        crate::chain(&e)
                    ),
                ));
            }
        };
        let (f2, t2) = (file.clone(), tmp.clone());
        let unpacked = tokio::task::spawn_blocking(move || {
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(&t2)
                .map_err(|source| UnpackError::Write {
                    path: t2.clone(),
                    source,
                })?;
            let f = std::fs::File::open(&f2).map_err(|source| UnpackError::Write {
                path: f2.clone(),
                source,
            })?;
            unpack(std::io::BufReader::new(f), &t2, owner, MAX_UNPACKED_BYTES)
        })
        .await
        .map_err(|e| WireError::internal(format!("unpacking slug {sha}: {e}")))
        .and_then(|r| r.map_err(|e| WireError::invalid(crate::chain(&e))));
        let _ = std::fs::remove_file(&file);
        let n = match unpacked {
            Ok(n) => n,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&tmp);
                return Err(WireError::new(
                    e.code,
                    format!("slug {sha} of {app}: {}", e.message),
                ));
            }
        };
        std::fs::rename(&tmp, &dest).map_err(|e| {
            let _ = std::fs::remove_dir_all(&tmp);
            WireError::internal(format!("cannot move the slug to {}: {e}", dest.display()))
        })?;
        tracing::info!(
            app,
            slug = sha,
            compressed = size,
            bytes = n.bytes,
            entries = n.entries,
            ms = started.elapsed().as_millis() as u64,
            "slug fetched and unpacked"
        );
        Ok(dest)
    }

    /// A release-form request body completed from its release: `release`
    /// removed, `dir` `/app`, the release's config under the request's `env`
    /// (the request wins), and, for instances (`proc` given) without `command`
    /// or `argv`, the release's command for that process type.
    async fn complete(
        &self,
        body: &Value,
        proc: Option<&str>,
    ) -> Result<(Value, Resolved), WireError> {
        let r = ReleaseRef::parse(&body["release"])?;
        if body.get("dir").is_some_and(|d| !d.is_null()) {
            return Err(WireError::invalid(
                "give either `dir` (a directory on the node) or `release`, not both",
            ));
        }
        let app = body["app"]
            .as_str()
            .filter(|a| crate::users::valid_app(a))
            .ok_or_else(|| {
                WireError::invalid(
                    "`app` must be 1-28 characters of [a-z0-9-], starting with a letter",
                )
            })?;
        if let Some(p) = proc {
            if !crate::users::valid_proc(p) {
                return Err(WireError::invalid(
                    "`proc` must be 1-30 characters of [a-z0-9_-]",
                ));
            }
        }
        let env: BTreeMap<String, String> = match body.get("env") {
            None | Some(Value::Null) => BTreeMap::new(),
            Some(v) => serde_json::from_value(v.clone())
                .map_err(|_| WireError::invalid("`env` must be an object of strings"))?,
        };
        let resolved = self.resolve(app, &r).await?;
        let mut b = body.clone();
        let o = b
            .as_object_mut()
            .ok_or_else(|| WireError::invalid("the body must be an object"))?;
        o.remove("release");
        o.insert("dir".into(), Value::from(crate::child::APP_ROOT));
        let mut merged = resolved.release.config.clone();
        merged.extend(env);
        o.insert("env".into(), serde_json::to_value(merged).expect("strings"));
        let given = |k: &str| match o.get(k) {
            Some(Value::String(s)) => !s.trim().is_empty(),
            Some(Value::Null) | None => false,
            Some(_) => true,
        };
        if let Some(p) = proc {
            if !given("command") && !given("argv") {
                let cmd = resolved.release.process_types.get(p).ok_or_else(|| {
                    let have: Vec<&String> = resolved.release.process_types.keys().collect();
                    WireError::invalid(format!(
                        "release v{} of {app} has no process type `{p}` (it has {have:?}); give `command`",
                        r.version
                    ))
                })?;
                o.insert("command".into(), Value::from(cmd.clone()));
            }
        }
        Ok((b, resolved))
    }

    /// `instance.start` in the release form, ready for the runner actor.
    pub async fn instance_start(
        &self,
        body: &Value,
    ) -> Result<
        (
            paddock_wire::kinds::InstanceStart,
            crate::store::ReleaseSpec,
        ),
        WireError,
    > {
        let kind = paddock_wire::kinds::INSTANCE_START;
        let proc = body["proc"].as_str().unwrap_or_default().to_string();
        let (b, resolved) = self.complete(body, Some(&proc)).await?;
        let req = paddock_wire::kinds::parse_body(kind, &b)?;
        Ok((
            req,
            crate::store::ReleaseSpec {
                slug: resolved.sha,
                version: resolved.release.version,
                lower: resolved.lower,
            },
        ))
    }

    /// `run.start` in the release form: the request (its `dir` `/app`) and the
    /// unpacked slug.
    pub async fn run_start(
        &self,
        body: &Value,
    ) -> Result<(paddock_wire::kinds::RunStart, PathBuf), WireError> {
        let kind = paddock_wire::kinds::RUN_START;
        let (b, resolved) = self.complete(body, None).await?;
        let req = paddock_wire::kinds::parse_body(kind, &b)?;
        Ok((req, resolved.lower))
    }

    /// Forgets an app's cached slugs (its account is going away).
    pub fn purge(&self, app: &str) {
        let d = self.root.join(app);
        if let Err(e) = std::fs::remove_dir_all(&d) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(app, "cannot remove {}: {e}", d.display());
            }
        }
    }
}

/// How long a cached slug no instance runs is kept after its last use (a start
/// may be about to use it; a one-off may be running it).
pub const UNUSED_KEEP: std::time::Duration = std::time::Duration::from_secs(3600);
/// Unused slugs kept per app however old: the newest ones, for a rollback or the
/// next one-off.
pub const KEEP_PER_APP: usize = 2;
/// A fetch or unpack left behind by a runner that died meanwhile.
const STALE_TEMP: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// Removes cached slugs that no instance in `in_use` ((app, sha256)) runs, except
/// each app's `keep` most recently used ones and those used within
/// `unused_keep`; and temporary files of fetches that ended long ago. A slug is
/// taken out of the cache by a rename (at once, so a start that found it a moment
/// before keeps it: that start made it recently used); the caller deletes the
/// renamed trees returned (`.gone-*`, swept like temporary files if it does not).
/// Says what it took out, as (cache path, path to delete).
pub fn sweep_cache(
    root: &Path,
    in_use: &std::collections::BTreeSet<(String, String)>,
    keep: usize,
    unused_keep: std::time::Duration,
    now: std::time::SystemTime,
) -> Vec<(PathBuf, PathBuf)> {
    let mut removed = Vec::new();
    let age = |p: &Path| {
        std::fs::symlink_metadata(p)
            .and_then(|m| m.modified())
            .map(|t| (t, now.duration_since(t).unwrap_or_default()))
            .ok()
    };
    let Ok(apps) = std::fs::read_dir(root) else {
        return removed;
    };
    for app in apps.flatten() {
        let app_name = app.file_name().to_string_lossy().to_string();
        let Ok(entries) = std::fs::read_dir(app.path()) else {
            continue;
        };
        let mut slugs: Vec<(std::time::SystemTime, std::time::Duration, PathBuf, String)> =
            Vec::new();
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            let Some((t, old)) = age(&e.path()) else {
                continue;
            };
            if name.starts_with('.') {
                if old > STALE_TEMP {
                    let p = e.path();
                    let gone = match std::fs::symlink_metadata(&p) {
                        Ok(m) if m.is_dir() => std::fs::remove_dir_all(&p),
                        _ => std::fs::remove_file(&p),
                    };
                    if gone.is_ok() {
                        removed.push((p.clone(), p));
                    }
                }
                continue;
            }
            slugs.push((t, old, e.path(), name));
        }
        // Newest first: the first `keep` stay whatever their age.
        slugs.sort_by_key(|s| std::cmp::Reverse(s.0));
        for (_, old, path, sha) in slugs.into_iter().skip(keep) {
            if old < unused_keep || in_use.contains(&(app_name.clone(), sha.clone())) {
                continue;
            }
            let gone = path.with_file_name(format!(".gone-{sha}-{}", ulid::Ulid::new()));
            if std::fs::rename(&path, &gone).is_ok() {
                removed.push((path, gone));
            }
        }
    }
    removed
}

/// A fresh, empty pair of overlay layers under `parent` (root-only): `upper`
/// owned by the app's user (it is the root of `/app`), `work` root's. Older
/// pairs there are removed first (best effort: a pair still in use by a process
/// that outlived its start is left and tried again next time).
pub fn fresh_layers(parent: &Path, owner: (u32, u32)) -> std::io::Result<(PathBuf, PathBuf)> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(parent)?;
    std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o700))?;
    if let Ok(rd) = std::fs::read_dir(parent) {
        for e in rd.flatten() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
    let pair = parent.join(format!(
        "{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    ));
    let (upper, work) = (pair.join("upper"), pair.join("work"));
    std::fs::DirBuilder::new().mode(0o700).create(&pair)?;
    std::fs::DirBuilder::new().mode(0o700).create(&upper)?;
    std::fs::DirBuilder::new().mode(0o700).create(&work)?;
    std::os::unix::fs::chown(&upper, Some(owner.0), Some(owner.1))?;
    Ok((upper, work))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn me() -> (u32, u32) {
        (
            nix::unistd::getuid().as_raw(),
            nix::unistd::getgid().as_raw(),
        )
    }

    /// A raw tar header block with any path (the tar crate's builder refuses
    /// hostile ones, so they are written by hand here).
    fn raw_entry(out: &mut Vec<u8>, path: &str, kind: u8, data: &[u8], link: &str) {
        let mut h = tar::Header::new_old();
        {
            let b = h.as_old_mut();
            b.name[..path.len()].copy_from_slice(path.as_bytes());
            b.linkname[..link.len()].copy_from_slice(link.as_bytes());
        }
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        h.set_entry_type(tar::EntryType::new(kind));
        h.set_cksum();
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(data);
        let pad = (512 - data.len() % 512) % 512;
        out.extend(std::iter::repeat_n(0u8, pad));
    }

    fn zst(entries: &[(&str, u8, &[u8], &str)]) -> Vec<u8> {
        let mut t = Vec::new();
        for (p, k, d, l) in entries {
            raw_entry(&mut t, p, *k, d, l);
        }
        t.extend(std::iter::repeat_n(0u8, 1024));
        zstd::encode_all(&t[..], 3).unwrap()
    }

    fn unpack_into(z: &[u8]) -> (tempfile::TempDir, Result<Unpacked, UnpackError>) {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("slug");
        std::fs::create_dir(&d).unwrap();
        let r = unpack(z, &d, me(), 1 << 20);
        (t, r)
    }

    #[test]
    fn a_plain_slug_unpacks_with_owner_only_modes() {
        let z = zst(&[
            ("./", b'5', b"", ""),
            ("./Procfile", b'0', b"web: python3 app.py\n", ""),
            ("./.profile.d/", b'5', b"", ""),
            ("./.profile.d/x.sh", b'0', b"export X=1\n", ""),
            ("bin/run", b'0', b"#!/bin/sh\n", ""),
            ("bin/link", b'2', b"", "run"),
            ("bin/hard", b'1', b"", "bin/run"),
            ("abs-link", b'2', b"", "/etc/passwd"),
        ]);
        let (t, r) = unpack_into(&z);
        let n = r.unwrap();
        assert_eq!(n.entries, 8);
        let d = t.path().join("slug");
        assert_eq!(
            std::fs::read_to_string(d.join("Procfile")).unwrap(),
            "web: python3 app.py\n"
        );
        let mode = |p: &str| std::fs::symlink_metadata(d.join(p)).unwrap().mode() & 0o7777;
        assert_eq!(mode("Procfile"), 0o600);
        assert_eq!(mode(".profile.d"), 0o700);
        assert_eq!(
            std::fs::read_link(d.join("abs-link")).unwrap(),
            Path::new("/etc/passwd")
        );
        assert_eq!(
            std::fs::read_to_string(d.join("bin/hard")).unwrap(),
            "#!/bin/sh\n"
        );
    }

    #[test]
    fn hostile_slugs_are_refused_and_write_nothing_outside() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (zst(&[("../escape", b'0', b"x", "")]), "`..`"),
            (zst(&[("a/../../escape", b'0', b"x", "")]), "`..`"),
            (zst(&[("/tmp/abs-escape", b'0', b"x", "")]), "absolute"),
            (zst(&[("dev", b'3', b"", "")]), "device"),
            (zst(&[("blk", b'4', b"", "")]), "device"),
            (zst(&[("fifo", b'6', b"", "")]), "fifo"),
            (
                zst(&[("up", b'2', b"", ".."), ("up/escape", b'0', b"x", "")]),
                "symlink",
            ),
            (
                zst(&[("l", b'2', b"", "/tmp"), ("l/escape", b'0', b"x", "")]),
                "symlink",
            ),
            (zst(&[("h", b'1', b"", "../../etc/passwd")]), "`..`"),
            (zst(&[("h", b'1', b"", "/etc/passwd")]), "absolute"),
            (
                zst(&[("s", b'2', b"", "/etc/passwd"), ("h", b'1', b"", "s")]),
                "not a file",
            ),
            (b"not zstd at all".to_vec(), "not a valid"),
        ];
        for (z, want) in cases {
            let (t, r) = unpack_into(&z);
            let e = r.expect_err(want).to_string();
            assert!(e.contains(want), "{want}: {e}");
            assert!(!t.path().join("escape").exists());
        }
        assert!(!Path::new("/tmp/abs-escape").exists());
        assert!(!Path::new("/tmp/escape").exists());
    }

    #[test]
    fn a_slug_larger_than_allowed_is_refused() {
        let big = vec![7u8; 4096];
        let z = zst(&[("a", b'0', &big, ""), ("b", b'0', &big, "")]);
        let t = tempfile::tempdir().unwrap();
        let e = unpack(&z[..], t.path(), me(), 6000).unwrap_err();
        assert!(matches!(e, UnpackError::TooLarge(6000)), "{e}");
    }

    #[test]
    fn the_cache_sweep_keeps_what_runs_the_newest_and_the_recently_used() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        let now = std::time::SystemTime::now();
        let hours = |h: u64| now - std::time::Duration::from_secs(h * 3600);
        let mk = |app: &str, name: &str, at: std::time::SystemTime| {
            let p = root.join(app).join(name);
            std::fs::create_dir_all(&p).unwrap();
            std::fs::write(p.join("f"), "x").unwrap();
            std::fs::File::open(&p).unwrap().set_modified(at).unwrap();
        };
        mk("a", "s1", hours(1)); // newest
        mk("a", "s2", hours(2)); // second newest
        mk("a", "s3", hours(3)); // old, but an instance runs it
        mk("a", "s4", hours(4)); // old and unused: removed
        mk("a", ".s5.tmp", hours(1)); // a fetch in progress
        mk("a", ".s6.tmp", hours(48)); // a fetch of a runner that died
        mk("b", "s1", hours(9)); // another app's only slug
        let in_use = [("a".to_string(), "s3".to_string())].into();
        let removed = sweep_cache(root, &in_use, 2, UNUSED_KEEP, now);
        for (_, gone) in &removed {
            let _ = std::fs::remove_dir_all(gone);
        }
        let mut names: Vec<String> = removed
            .iter()
            .map(|(p, _)| p.strip_prefix(root).unwrap().display().to_string())
            .collect();
        names.sort();
        assert_eq!(names, ["a/.s6.tmp", "a/s4"]);
        for kept in ["a/s1", "a/s2", "a/s3", "a/.s5.tmp", "b/s1"] {
            assert!(root.join(kept).exists(), "{kept}");
        }
        // Used within the keep time: kept even beyond the newest two.
        mk("a", "s7", hours(0));
        mk("a", "s8", hours(0));
        assert!(sweep_cache(root, &in_use, 2, UNUSED_KEEP * 3, now).is_empty());
        assert_eq!(std::fs::read_dir(root.join("a")).unwrap().count(), 6);
    }

    #[test]
    fn release_refs_are_checked() {
        let sha = "ab".repeat(32);
        let r = ReleaseRef::parse(&serde_json::json!({"slug": sha, "version": 3})).unwrap();
        assert_eq!(r.version, 3);
        let r = ReleaseRef::parse(
            &serde_json::json!({"slug": format!("sha256:{}", sha.to_uppercase()), "version": 1}),
        )
        .unwrap();
        assert_eq!(r.slug, sha);
        for bad in [
            serde_json::json!({"slug": sha, "version": 0}),
            serde_json::json!({"slug": sha, "version": -1}),
            serde_json::json!({"slug": sha, "version": "3"}),
            serde_json::json!({"slug": sha}),
            serde_json::json!({"slug": "abc", "version": 1}),
            serde_json::json!({"slug": format!("{sha}/.."), "version": 1}),
            serde_json::json!("v1"),
        ] {
            let e = ReleaseRef::parse(&bad).unwrap_err();
            assert_eq!(e.code, Code::Invalid, "{bad}");
        }
    }

    #[test]
    fn a_one_off_of_several_commands_runs_them_all() {
        assert_eq!(one_off_line("rake db:migrate"), "exec rake db:migrate");
        for line in ["a && b", "a; b", "a | b", "a || b", "a\nb", "a & wait"] {
            assert_eq!(one_off_line(line), line);
        }
        let out = std::process::Command::new("/bin/sh")
            .args(["-c", &one_off_line("echo one && echo two; exit 4")])
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "one\ntwo\n");
        assert_eq!(out.status.code(), Some(4));
    }

    #[test]
    fn the_profile_wrapper_execs_the_command_itself() {
        let v = profile_wrapped("exec python3 app.py", None);
        assert_eq!(v[0], "/bin/sh");
        assert!(v[2].ends_with("exec python3 app.py"), "{}", v[2]);
        let v = profile_wrapped("", Some(&["python3".into(), "a b.py".into()]));
        assert_eq!(&v[3..], &["sh", "python3", "a b.py"]);
        assert!(v[2].ends_with("exec \"$@\""));
        // It runs: sources a profile script and keeps the pid.
        let t = tempfile::tempdir().unwrap();
        let script = profile_wrapped("exec echo $$ $X", None)[2]
            .replace("/app/.profile.d", &t.path().join("p").display().to_string());
        std::fs::create_dir(t.path().join("p")).unwrap();
        std::fs::write(t.path().join("p/x.sh"), "export X=sourced\n").unwrap();
        let out = std::process::Command::new("/bin/sh")
            .args(["-c", &format!("echo $$; {script}")])
            .output()
            .unwrap();
        let text = String::from_utf8(out.stdout).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[1], format!("{} sourced", lines[0]), "{text}");
    }
}
