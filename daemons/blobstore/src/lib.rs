//! paddock-blobstore: content-addressed blobs (slugs, source tarballs,
//! buildpacks), named by the sha256 of their bytes and replicated to a pair.
//!
//! A put is streamed in chunks (`blob.put.begin`, `.chunk`, `.commit`), hashed
//! as it arrives and checked against the sha256 the commit names; only then is it
//! fsynced and renamed into `<dir>/blobs/<aa>/<sha256>`, and copied to the peer
//! blobstore (another alive incarnation in the heartbeat registry) before the
//! commit is answered. A get at offset 0 checks the stored file's hash whenever
//! the file changed since it was last checked, and repairs a missing or corrupt
//! copy from the peer first. Every `sync_interval` the blobstore fetches what the
//! peer has and it lacks, so a pair heals after one member was down. Garbage
//! collection removes blobs no kept release references (the api says which), and
//! never when the api cannot be asked.
//!
//! Architecture invariant: a blob's bytes never sit whole in memory, and a file
//! under `blobs/` is only ever a complete blob whose bytes were hashed on the way
//! in (a later corruption is caught at the next get from offset 0).

pub mod settings;
pub mod store;

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::io::Write;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use base64::Engine as _;
use paddock_blob::proto::{self, CHUNK};
use paddock_config::{ClusterConfig, ConfigError};
use paddock_daemon::calls::Calls;
use paddock_daemon::{body, chain, Ctx, LoopKind, Routes, Spec};
use paddock_wire::{Code, Envelope, WireError};
use ring::digest;
use serde_json::{json, Value};

pub use settings::{settings, BlobstoreSection, Settings, NAME};
use store::FileId;

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

/// The most uploads in progress at once: each holds an open file.
pub const MAX_UPLOADS: usize = 64;

/// How long a blob collected here is not fetched back from the peer by the pair
/// sync (the peer collects it at its own next collection).
const COLLECTED_MEMORY: Duration = Duration::from_secs(24 * 3600);

/// Timeout of the api's `blob.referenced`.
const REFERENCED_TIMEOUT: Duration = Duration::from_secs(30);

/// One upload in progress: its partial file, bytes so far, and their hash.
struct Upload {
    file: std::fs::File,
    path: PathBuf,
    received: u64,
    hash: digest::Context,
    touched: Instant,
    /// Committed or discarded: a chunk that took the upload from the map just
    /// before must not write into it (after a commit its file is the blob).
    closed: bool,
}

type SharedUpload = Arc<Mutex<Upload>>;

fn lock(u: &SharedUpload) -> MutexGuard<'_, Upload> {
    u.lock().unwrap_or_else(|e| e.into_inner())
}

/// What a stored copy was found to be.
enum Copy {
    Good(FileId),
    Missing,
    Corrupt,
}

/// The blobstore's state, shared by its handlers and loops on the actix thread.
pub struct Blobstore {
    /// `<dir>/lock`, flocked for the process's life.
    _lock: std::fs::File,
    s: Settings,
    calls: Calls,
    incarnation: String,
    uploads: RefCell<HashMap<String, SharedUpload>>,
    /// The file version each blob's hash was last found right for.
    verified: RefCell<HashMap<String, FileId>>,
    /// Blobs collected here, and when: the pair sync does not fetch them back.
    collected: RefCell<HashMap<String, Instant>>,
}

/// Runs disk work on the blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, WireError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| WireError::internal(format!("a disk task failed: {e}")))
}

/// A disk error as the caller sees it (logged here: it needs a person).
fn disk(what: String) -> impl FnOnce(std::io::Error) -> WireError {
    move |e| {
        tracing::error!("cannot {what}: {e}");
        WireError::internal(format!("cannot {what}: {e}"))
    }
}

fn check_sha(field: &str, s: &str) -> Result<(), WireError> {
    proto::check_sha256(field, s).map_err(WireError::invalid)
}

fn check_upload(id: &str) -> Result<(), WireError> {
    if store::is_upload_id(id) {
        Ok(())
    } else {
        let shown: String = id.chars().take(40).collect();
        Err(WireError::invalid(format!(
            "`upload` {shown:?} is not an upload id this blobstore makes (from blob.put.begin)"
        )))
    }
}

fn unknown_upload(id: &str) -> WireError {
    WireError::new(
        Code::NotFound,
        format!("upload {id} is not in progress here (committed, discarded, idle too long, or the blobstore restarted): begin the put again"),
    )
}

impl Blobstore {
    fn new(s: Settings, calls: Calls, incarnation: String, lock: std::fs::File) -> Blobstore {
        Blobstore {
            _lock: lock,
            s,
            calls,
            incarnation,
            uploads: RefCell::new(HashMap::new()),
            verified: RefCell::new(HashMap::new()),
            collected: RefCell::new(HashMap::new()),
        }
    }

    /// The rpc endpoints of the other alive blobstores (the pair's other member).
    /// A cached listing without one is asked for again: it may predate the peer's
    /// start (a pair just started), and a commit would then keep one copy.
    async fn peers(&self) -> Vec<String> {
        let out = match self.calls.services(NAME).await {
            Ok(s) => self.others(s),
            Err(e) => {
                tracing::debug!("cannot list peer blobstores: {e}");
                return Vec::new();
            }
        };
        if !out.is_empty() {
            return out;
        }
        match self.calls.services_now(NAME).await {
            Ok(s) => self.others(s),
            Err(e) => {
                tracing::debug!("cannot list peer blobstores: {e}");
                Vec::new()
            }
        }
    }

    fn others(&self, services: Vec<paddock_wire::kinds::Service>) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for s in services {
            if s.incarnation == self.incarnation {
                continue;
            }
            if let Some(ep) = s.endpoints.get("rpc") {
                if *ep != self.s.rpc && !out.contains(ep) {
                    out.push(ep.clone());
                }
            }
        }
        out
    }

    async fn begin(self: Rc<Self>, _env: Envelope) -> Result<Value, WireError> {
        let n = self.uploads.borrow().len();
        if n >= MAX_UPLOADS {
            return Err(WireError::unavailable(format!(
                "{n} uploads are in progress here, the most at once: retry shortly"
            )));
        }
        let id = store::new_upload_id();
        let path = store::upload_path(&self.s.dir, &id);
        let p = path.clone();
        let file = blocking(move || {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&p)
        })
        .await?
        .map_err(disk(format!("create {}", path.display())))?;
        let up = Upload {
            file,
            path,
            received: 0,
            hash: digest::Context::new(&digest::SHA256),
            touched: Instant::now(),
            closed: false,
        };
        self.uploads
            .borrow_mut()
            .insert(id.clone(), Arc::new(Mutex::new(up)));
        Ok(json!({ "upload": id }))
    }

    /// Forgets an upload and removes its file.
    async fn discard(&self, id: &str) {
        let up = self.uploads.borrow_mut().remove(id);
        if let Some(up) = up {
            // Locked on the blocking pool: a chunk being written holds the lock.
            let _ = blocking(move || {
                let mut u = lock(&up);
                u.closed = true;
                let _ = std::fs::remove_file(&u.path);
            })
            .await;
        }
    }

    async fn chunk(self: Rc<Self>, env: Envelope) -> Result<Value, WireError> {
        let c: proto::Chunk = body(&env)?;
        check_upload(&c.upload)?;
        // base64 of CHUNK bytes is this long; anything longer cannot be a chunk.
        if c.data.len() > CHUNK.div_ceil(3) * 4 {
            return Err(WireError::invalid(format!(
                "`data` holds more than {CHUNK} bytes, the most one chunk may"
            )));
        }
        let up = self
            .uploads
            .borrow()
            .get(&c.upload)
            .cloned()
            .ok_or_else(|| unknown_upload(&c.upload))?;
        let max = self.s.max_blob_size;
        let (offset, data, id) = (c.offset, c.data, c.upload.clone());
        let r = blocking(move || -> Result<u64, (WireError, bool)> {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(data.as_bytes())
                .map_err(|e| (WireError::invalid(format!("`data` is not base64: {e}")), false))?;
            if bytes.len() > CHUNK {
                return Err((
                    WireError::invalid(format!(
                        "`data` holds {} bytes; a chunk holds at most {CHUNK}",
                        bytes.len()
                    )),
                    false,
                ));
            }
            let mut u = lock(&up);
            if u.closed {
                return Err((unknown_upload(&id), false));
            }
            if offset != u.received {
                let received = u.received;
                return Err((
                    WireError::new(
                        Code::Conflict,
                        format!("a chunk at offset {offset}, but {received} bytes are received so far: send from offset {received}"),
                    )
                    .with("received", received),
                    false,
                ));
            }
            let end = u.received + bytes.len() as u64;
            if end > max {
                return Err((
                    WireError::invalid(format!(
                        "the blob would be over {max} bytes, the most this blobstore keeps (max_blob_size); the upload is discarded"
                    )),
                    true,
                ));
            }
            if let Err(e) = u.file.write_all(&bytes) {
                let what = format!("write upload {}", u.path.display());
                return Err((disk(what)(e), true));
            }
            u.hash.update(&bytes);
            u.received = end;
            u.touched = Instant::now();
            Ok(end)
        })
        .await?;
        match r {
            Ok(received) => Ok(json!({ "received": received })),
            Err((e, discard)) => {
                if discard {
                    self.discard(&c.upload).await;
                }
                Err(e)
            }
        }
    }

    async fn stat_id(&self, sha256: &str) -> Result<Option<FileId>, WireError> {
        let (dir, sha) = (self.s.dir.clone(), sha256.to_string());
        blocking(move || store::stat_blob(&dir, &sha))
            .await?
            .map_err(disk(format!("stat blob {sha256}")))
    }

    async fn commit(self: Rc<Self>, env: Envelope) -> Result<Value, WireError> {
        let c: proto::Commit = body(&env)?;
        check_upload(&c.upload)?;
        check_sha("sha256", &c.sha256)?;
        if c.size > self.s.max_blob_size {
            self.discard(&c.upload).await;
            return Err(WireError::invalid(format!(
                "`size` {} is over {}, the most this blobstore keeps (max_blob_size)",
                c.size, self.s.max_blob_size
            )));
        }
        let sha = c.sha256.clone();
        // A blob already here is not stored twice: its bytes are the same by name.
        // A corrupt copy is replaced by the upload (when that is right).
        if let Copy::Good(id) = self.check_copy(&sha).await? {
            if id.size == c.size {
                self.discard(&c.upload).await;
                // Put again means in use again: young for the collection's grace,
                // so the build about to fetch it does not find it collected.
                let path = store::blob_path(&self.s.dir, &sha);
                let _ = tokio::task::spawn_blocking(move || {
                    std::fs::File::options()
                        .write(true)
                        .open(&path)
                        .and_then(|f| f.set_modified(SystemTime::now()))
                })
                .await;
                self.collected.borrow_mut().remove(&sha);
                let copies = self.copy_to_peers(&sha, c.size, c.replicate).await;
                return Ok(json!({"sha256": sha, "size": c.size, "copies": copies}));
            }
        }
        let up = self
            .uploads
            .borrow_mut()
            .remove(&c.upload)
            .ok_or_else(|| unknown_upload(&c.upload))?;
        let (dir, s2, size, id) = (self.s.dir.clone(), sha.clone(), c.size, c.upload.clone());
        let r = blocking(move || -> Result<FileId, WireError> {
            let mut u = lock(&up);
            if u.closed {
                return Err(unknown_upload(&id));
            }
            u.closed = true;
            let u = u;
            let refuse = |why: String| {
                let _ = std::fs::remove_file(&u.path);
                Err(WireError::invalid(format!(
                    "{why}: nothing was stored, put the blob again"
                )))
            };
            if u.received != size {
                return refuse(format!(
                    "the upload holds {} bytes but the commit says `size` {size}",
                    u.received
                ));
            }
            let got = hex::encode(u.hash.clone().finish().as_ref());
            if got != s2 {
                return refuse(format!(
                    "the upload's sha256 is {got} but the commit says {s2}"
                ));
            }
            store::install(&u.file, &u.path, &dir, &s2)
                .map_err(disk(format!("store blob {s2}")))?;
            let m = std::fs::metadata(store::blob_path(&dir, &s2))
                .map_err(disk(format!("stat blob {s2}")))?;
            Ok(FileId::of(&m))
        })
        .await??;
        self.verified.borrow_mut().insert(sha.clone(), r);
        self.collected.borrow_mut().remove(&sha);
        tracing::debug!(sha256 = %sha, size, "stored");
        let copies = self.copy_to_peers(&sha, size, c.replicate).await;
        Ok(json!({"sha256": sha, "size": size, "copies": copies}))
    }

    /// Copies a stored blob to every alive peer that lacks it; returns how many
    /// blobstores hold it now (counting this one).
    async fn copy_to_peers(&self, sha256: &str, size: u64, replicate: bool) -> u32 {
        if !replicate {
            return 1;
        }
        let peers = self.peers().await;
        if peers.is_empty() {
            tracing::info!(sha256, "blob stored with 1 copy: no peer blobstore is alive; the pair sync copies it once one is");
            return 1;
        }
        let mut copies = 1;
        for peer in peers {
            match paddock_blob::stat_from(&self.calls, &peer, sha256).await {
                Ok(st) if st.present && st.size == Some(size) => {
                    copies += 1;
                    continue;
                }
                _ => {}
            }
            let path = store::blob_path(&self.s.dir, sha256);
            let f = match tokio::fs::File::open(&path).await {
                Ok(f) => f,
                Err(e) => {
                    tracing::error!("cannot open {} to copy it to the peer: {e}", path.display());
                    break;
                }
            };
            match paddock_blob::put_reader_to(&self.calls, &peer, f, false).await {
                Ok(_) => copies += 1,
                Err(e) => tracing::warn!(
                    sha256,
                    "cannot copy the blob to the peer blobstore at {peer}: {}; the pair sync retries",
                    chain(&e)
                ),
            }
        }
        copies
    }

    /// Whether the stored copy is there and whole: its sha256 is computed again
    /// when its file changed since it was last found right.
    async fn check_copy(&self, sha256: &str) -> Result<Copy, WireError> {
        let Some(id) = self.stat_id(sha256).await? else {
            return Ok(Copy::Missing);
        };
        if self.verified.borrow().get(sha256) == Some(&id) {
            return Ok(Copy::Good(id));
        }
        let path = store::blob_path(&self.s.dir, sha256);
        let p = path.clone();
        let (got, id) = blocking(move || store::hash_file(&p))
            .await?
            .map_err(disk(format!("read {}", path.display())))?;
        if got == sha256 {
            self.verified.borrow_mut().insert(sha256.to_string(), id);
            return Ok(Copy::Good(id));
        }
        self.verified.borrow_mut().remove(sha256);
        tracing::warn!(
            sha256,
            "the stored blob is corrupt (its bytes hash to {got})"
        );
        Ok(Copy::Corrupt)
    }

    /// Makes sure the stored copy is whole and right, repairing it from a peer
    /// when it is missing or corrupt and `repair` allows.
    async fn ensure_good(&self, sha256: &str, repair: bool) -> Result<(), WireError> {
        let corrupt = match self.check_copy(sha256).await? {
            Copy::Good(_) => return Ok(()),
            Copy::Missing => false,
            Copy::Corrupt => true,
        };
        let what = if corrupt { "corrupt" } else { "missing" };
        if repair {
            for peer in self.peers().await {
                match self.fetch_from(&peer, sha256).await {
                    Ok(()) => {
                        tracing::info!(
                            sha256,
                            "repaired the {what} blob from the peer blobstore at {peer}"
                        );
                        return Ok(());
                    }
                    Err(e) => tracing::warn!(
                        sha256,
                        "cannot repair the {what} blob from the peer blobstore at {peer}: {}",
                        chain(&e)
                    ),
                }
            }
        }
        let whom = if repair {
            "and on the peer"
        } else {
            "(asked not to repair)"
        };
        Err(if corrupt {
            WireError::new(
                Code::Other(proto::CODE_CORRUPT.into()),
                format!("blob {sha256} is corrupt here {whom}: put it again"),
            )
        } else {
            WireError::new(
                Code::NotFound,
                format!("blob {sha256} is missing here {whom}"),
            )
        })
    }

    /// Copies a blob from `peer`'s own copy into place here (verified on the way).
    async fn fetch_from(&self, peer: &str, sha256: &str) -> Result<(), paddock_blob::BlobError> {
        let (dir, sha) = (self.s.dir.clone(), sha256.to_string());
        let dest = blocking(move || store::make_blob_dir(&dir, &sha))
            .await
            .map_err(|e| paddock_blob::BlobError::Io {
                what: "make the directory of",
                path: store::blob_path(&self.s.dir, sha256),
                source: std::io::Error::other(e.message),
            })?
            .map_err(|source| paddock_blob::BlobError::Io {
                what: "make the directory of",
                path: store::blob_path(&self.s.dir, sha256),
                source,
            })?;
        paddock_blob::get_file_from(&self.calls, peer, sha256, &dest, true).await?;
        if let Ok(Some(id)) = self.stat_id(sha256).await {
            self.verified.borrow_mut().insert(sha256.to_string(), id);
        }
        self.collected.borrow_mut().remove(sha256);
        Ok(())
    }

    async fn get(self: Rc<Self>, env: Envelope) -> Result<Value, WireError> {
        let g: proto::Get = body(&env)?;
        check_sha("sha256", &g.sha256)?;
        let len = g.length.unwrap_or(CHUNK as u64).min(CHUNK as u64) as usize;
        if g.offset == 0 {
            self.ensure_good(&g.sha256, !g.local).await?;
        }
        let (dir, sha, offset) = (self.s.dir.clone(), g.sha256.clone(), g.offset);
        match blocking(move || store::read_at(&dir, &sha, offset, len)).await? {
            Ok((data, size)) => {
                let eof = g.offset + data.len() as u64 >= size;
                Ok(json!({
                    "data": base64::engine::general_purpose::STANDARD.encode(&data),
                    "size": size,
                    "eof": eof,
                }))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(WireError::new(
                Code::NotFound,
                format!("blob {} is not stored here", g.sha256),
            )),
            Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => {
                Err(WireError::invalid(format!("`offset`: {e}")))
            }
            Err(e) => Err(disk(format!("read blob {}", g.sha256))(e)),
        }
    }

    async fn stat(self: Rc<Self>, env: Envelope) -> Result<Value, WireError> {
        let s: proto::Stat = body(&env)?;
        check_sha("sha256", &s.sha256)?;
        Ok(match self.stat_id(&s.sha256).await? {
            Some(id) => json!({"present": true, "size": id.size}),
            None => json!({"present": false}),
        })
    }

    async fn list(self: Rc<Self>, env: Envelope) -> Result<Value, WireError> {
        let l: proto::List = body(&env)?;
        if let Some(a) = &l.after {
            check_sha("after", a)?;
        }
        let dir = self.s.dir.clone();
        let all = blocking(move || store::list(&dir))
            .await?
            .map_err(disk(format!("list {}", self.s.dir.display())))?;
        let (page, more) = store::page(&all, l.after.as_deref(), proto::LIST_PAGE);
        let blobs: Vec<Value> = page
            .iter()
            .map(|b| json!({"sha256": b.sha256, "size": b.size}))
            .collect();
        Ok(json!({"blobs": blobs, "more": more}))
    }

    async fn gc(self: Rc<Self>, _env: Envelope) -> Result<Value, WireError> {
        let (removed, kept) = self.collect().await?;
        Ok(json!({"removed": removed, "kept": kept}))
    }

    /// One collection: asks the api what is referenced, removes the rest that is
    /// older than the grace period. Nothing is removed when the api cannot say.
    async fn collect(&self) -> Result<(Vec<String>, u64), WireError> {
        let reply = self
            .calls
            .call_daemon_timeout(
                "api",
                proto::REFERENCED,
                json!({"keep": self.s.keep_releases}),
                REFERENCED_TIMEOUT,
            )
            .await
            .map_err(|e| {
                WireError::unavailable(format!(
                    "cannot ask the api which blobs releases reference ({}); nothing was collected: retry once the api answers",
                    chain(&e)
                ))
            })?;
        let referenced: proto::ReferencedReply = serde_json::from_value(reply).map_err(|e| {
            WireError::unavailable(format!(
                "the api's blob.referenced reply is not understood ({e}); nothing was collected"
            ))
        })?;
        let referenced: HashSet<String> = referenced.blobs.into_iter().collect();
        let (dir, grace) = (self.s.dir.clone(), self.s.gc_grace);
        let (removed, kept) = blocking(move || -> std::io::Result<(Vec<String>, u64)> {
            let all = store::list(&dir)?;
            let doomed: Vec<String> = store::doomed(&all, &referenced, grace, SystemTime::now())
                .into_iter()
                .map(|b| b.sha256.clone())
                .collect();
            for sha in &doomed {
                store::remove(&dir, sha)?;
            }
            Ok((doomed.clone(), (all.len() - doomed.len()) as u64))
        })
        .await?
        .map_err(disk(format!("collect blobs in {}", self.s.dir.display())))?;
        let now = Instant::now();
        {
            let mut verified = self.verified.borrow_mut();
            let mut collected = self.collected.borrow_mut();
            collected.retain(|_, t| now.duration_since(*t) < COLLECTED_MEMORY);
            for sha in &removed {
                verified.remove(sha);
                collected.insert(sha.clone(), now);
            }
        }
        if !removed.is_empty() {
            tracing::info!(
                removed = removed.len(),
                kept,
                "collected blobs no kept release references"
            );
        }
        Ok((removed, kept))
    }

    /// Fetches what each peer has and this blobstore lacks; returns how many.
    async fn sync(&self) -> anyhow::Result<usize> {
        let mut fetched = 0;
        for peer in self.peers().await {
            let theirs = match paddock_blob::list_from(&self.calls, &peer).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!("cannot list the peer blobstore at {peer}: {}", chain(&e));
                    continue;
                }
            };
            let dir = self.s.dir.clone();
            let ours: HashSet<String> = blocking(move || store::list(&dir))
                .await?
                .map_err(disk(format!("list {}", self.s.dir.display())))?
                .into_iter()
                .map(|b| b.sha256)
                .collect();
            for e in theirs {
                if ours.contains(&e.sha256)
                    || !proto::is_sha256(&e.sha256)
                    || e.size > self.s.max_blob_size
                    || self.collected.borrow().contains_key(&e.sha256)
                {
                    continue;
                }
                match self.fetch_from(&peer, &e.sha256).await {
                    Ok(()) => fetched += 1,
                    Err(err) => tracing::warn!(
                        sha256 = %e.sha256,
                        "cannot copy the blob from the peer blobstore at {peer}: {}",
                        chain(&err)
                    ),
                }
            }
        }
        if fetched > 0 {
            tracing::info!(
                fetched,
                "pair sync: copied blobs the peer had and this blobstore lacked"
            );
        }
        Ok(fetched)
    }

    /// Discards uploads without a chunk for `upload_idle`.
    async fn reap_idle(&self) {
        let idle: Vec<String> = self
            .uploads
            .borrow()
            .iter()
            .filter(|(_, u)| {
                // A locked upload is being written to right now: not idle.
                u.try_lock()
                    .is_ok_and(|u| u.touched.elapsed() >= self.s.upload_idle)
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in idle {
            tracing::info!(upload = %id, "discarded an upload idle for {:?}", self.s.upload_idle);
            self.discard(&id).await;
        }
    }
}

fn route<F, Fut>(routes: Routes, b: &Rc<Blobstore>, kind: &str, f: F) -> Routes
where
    F: Fn(Rc<Blobstore>, Envelope) -> Fut + 'static,
    Fut: Future<Output = Result<Value, WireError>> + 'static,
{
    let b = b.clone();
    routes.on(kind, move |env| f(b.clone(), env))
}

pub async fn setup(ctx: Ctx) -> anyhow::Result<Routes> {
    let s = settings(&ctx.config())?;
    let dir = s.dir.clone();
    let lock = tokio::task::spawn_blocking(move || store::prepare(&dir)).await??;
    tracing::info!(dir = %s.dir.display(), "blob directory ready");
    let b = Rc::new(Blobstore::new(
        s.clone(),
        ctx.calls().clone(),
        ctx.incarnation.clone(),
        lock,
    ));

    let bb = b.clone();
    let tick = (s.upload_idle / 4).clamp(Duration::from_millis(250), Duration::from_secs(10));
    ctx.spawn_loop("reap-idle-uploads", LoopKind::Resilient, move || {
        let b = bb.clone();
        async move {
            loop {
                tokio::time::sleep(tick).await;
                b.reap_idle().await;
            }
        }
    });
    let bb = b.clone();
    ctx.spawn_loop("pair-sync", LoopKind::Resilient, move || {
        let b = bb.clone();
        async move {
            loop {
                b.sync().await?;
                tokio::time::sleep(b.s.sync_interval).await;
            }
        }
    });
    let bb = b.clone();
    ctx.spawn_loop("collect", LoopKind::Resilient, move || {
        let b = bb.clone();
        async move {
            loop {
                tokio::time::sleep(b.s.gc_interval).await;
                if let Err(e) = b.collect().await {
                    tracing::warn!("garbage collection skipped: {}", e.message);
                }
            }
        }
    });

    let mut r = Routes::new();
    r = route(r, &b, proto::PUT_BEGIN, Blobstore::begin);
    r = route(r, &b, proto::PUT_CHUNK, Blobstore::chunk);
    r = route(r, &b, proto::PUT_COMMIT, Blobstore::commit);
    r = route(r, &b, proto::GET, Blobstore::get);
    r = route(r, &b, proto::STAT, Blobstore::stat);
    r = route(r, &b, proto::LIST, Blobstore::list);
    r = route(r, &b, proto::GC, Blobstore::gc);
    Ok(r)
}
