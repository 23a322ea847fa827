//! The blobstore's client: streamed, verified put and get of content-addressed
//! blobs (slugs, source tarballs, buildpacks).
//!
//! A put streams the data in chunks of at most [`proto::CHUNK`] bytes, hashing as
//! it goes, and commits with the sha256 it computed; the blobstore checks it again
//! and answers once the blob is on disk (on both members of a pair when the peer
//! is alive). A get streams into a temporary file beside the destination, hashes
//! as it goes, and renames only a verified, fsynced file into place, so the
//! destination is either the whole blob or untouched.
//!
//! Async functions take a daemon's [`Calls`] (`ctx.calls()`) and find blobstores
//! through the heartbeat registry; the `_blocking` ones take a wire [`Client`]
//! connected to one blobstore (the CLI's way).
//!
//! Architecture invariant: this crate knows the blob kinds and nothing of how a
//! blobstore keeps its files; it never holds a whole blob in memory.

pub mod proto;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use paddock_daemon::calls::{Calls, FindError};
use paddock_wire::{Client, ClientError, Code};
use ring::digest;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

pub use proto::Stored;

/// What a blob operation ran into: each says what happened and what to do.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("{name:?} is not a blob name: a blob is named by its sha256, 64 lowercase hex digits")]
    BadName { name: String },
    #[error("cannot find a blobstore to ask")]
    Find(#[source] FindError),
    #[error("{kind} to the blobstore at {endpoint} failed")]
    Call {
        endpoint: String,
        kind: &'static str,
        #[source]
        source: ClientError,
    },
    #[error("blob {sha256} is not stored (never put, or collected since): put it again")]
    NotFound { sha256: String },
    #[error("blob {sha256} is corrupt at {endpoint} and no peer has a good copy: put it again")]
    Corrupt { sha256: String, endpoint: String },
    #[error("the bytes {endpoint} sent for blob {sha256} hash to {got}; nothing was written to the destination: try again (the blobstore verifies and repairs its copy)")]
    Mismatch {
        sha256: String,
        endpoint: String,
        got: String,
    },
    #[error("bad reply from the blobstore at {endpoint}: {why}")]
    Protocol { endpoint: String, why: String },
    #[error("cannot {what} {}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl BlobError {
    /// Whether another blobstore might do better (the blob missing or corrupt at
    /// one, or one not answering); not for a wrong name or a local file error.
    pub fn worth_another(&self) -> bool {
        !matches!(self, BlobError::BadName { .. } | BlobError::Io { .. })
    }
}

/// Timeout of a chunk, a list page and a begin: each is one round trip.
pub const SHORT_TIMEOUT: Duration = Duration::from_secs(20);

/// Timeout of a stat: a tiny call, and the first a blobstore makes to a peer
/// that may have just died (the registry lists it alive for up to two beats).
pub const STAT_TIMEOUT: Duration = Duration::from_secs(5);

/// Timeout of a call that may move a whole blob first (a commit copying it to the
/// peer, a get at offset 0 repairing it from the peer): a minute plus the time
/// to move `size` bytes at 4 MiB/s. Such a call is sent once, never resent: a
/// resend later than the receiver's skew window would be refused as stale.
pub fn long_timeout(size: u64) -> Duration {
    Duration::from_secs(60) + Duration::from_secs(size / (4 << 20))
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> BlobError + 'a {
    move |source| BlobError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

fn check_name(sha256: &str) -> Result<(), BlobError> {
    if proto::is_sha256(sha256) {
        Ok(())
    } else {
        Err(BlobError::BadName {
            name: sha256.chars().take(80).collect(),
        })
    }
}

fn parse<T: DeserializeOwned>(endpoint: &str, kind: &str, v: Value) -> Result<T, BlobError> {
    serde_json::from_value(v).map_err(|e| BlobError::Protocol {
        endpoint: endpoint.to_string(),
        why: format!("{kind} reply: {e}"),
    })
}

/// A failed get as the caller should see it: the blobstore's `not_found` and
/// `corrupt` become their own variants.
fn get_error(endpoint: &str, sha256: &str, source: ClientError) -> BlobError {
    match source.code() {
        Some(Code::NotFound) => BlobError::NotFound {
            sha256: sha256.to_string(),
        },
        Some(Code::Other(c)) if c == proto::CODE_CORRUPT => BlobError::Corrupt {
            sha256: sha256.to_string(),
            endpoint: endpoint.to_string(),
        },
        _ => BlobError::Call {
            endpoint: endpoint.to_string(),
            kind: proto::GET,
            source,
        },
    }
}

fn sha_hex(ctx: digest::Context) -> String {
    hex::encode(ctx.finish().as_ref())
}

/// The streaming side of a put: chunk bodies in order, checked replies.
struct Upload {
    endpoint: String,
    id: String,
    sent: u64,
    hash: digest::Context,
}

impl Upload {
    fn begun(endpoint: &str, reply: Value) -> Result<Upload, BlobError> {
        let b: proto::Begun = parse(endpoint, proto::PUT_BEGIN, reply)?;
        Ok(Upload {
            endpoint: endpoint.to_string(),
            id: b.upload,
            sent: 0,
            hash: digest::Context::new(&digest::SHA256),
        })
    }

    fn chunk(&mut self, data: &[u8]) -> Value {
        self.hash.update(data);
        let body = proto::Chunk {
            upload: self.id.clone(),
            offset: self.sent,
            data: base64::engine::general_purpose::STANDARD.encode(data),
        };
        self.sent += data.len() as u64;
        serde_json::to_value(body).expect("a chunk serializes")
    }

    fn chunk_done(&self, reply: Value) -> Result<(), BlobError> {
        let r: proto::Received = parse(&self.endpoint, proto::PUT_CHUNK, reply)?;
        if r.received != self.sent {
            return Err(BlobError::Protocol {
                endpoint: self.endpoint.clone(),
                why: format!("it has {} bytes, {} were sent", r.received, self.sent),
            });
        }
        Ok(())
    }

    fn commit(&self, replicate: bool) -> (Value, String) {
        let sha256 = sha_hex(self.hash.clone());
        let body = proto::Commit {
            upload: self.id.clone(),
            sha256: sha256.clone(),
            size: self.sent,
            replicate,
        };
        (
            serde_json::to_value(body).expect("a commit serializes"),
            sha256,
        )
    }

    fn committed(&self, sha256: &str, reply: Value) -> Result<Stored, BlobError> {
        let s: Stored = parse(&self.endpoint, proto::PUT_COMMIT, reply)?;
        if s.sha256 != sha256 || s.size != self.sent {
            return Err(BlobError::Protocol {
                endpoint: self.endpoint.clone(),
                why: format!(
                    "it stored {} ({} bytes) for {sha256} ({} bytes)",
                    s.sha256, s.size, self.sent
                ),
            });
        }
        Ok(s)
    }
}

/// The receiving side of a get: the next request, checked chunks, the hash.
struct Download {
    endpoint: String,
    sha256: String,
    offset: u64,
    size: Option<u64>,
    hash: digest::Context,
    local: bool,
}

impl Download {
    fn new(endpoint: &str, sha256: &str, local: bool) -> Download {
        Download {
            endpoint: endpoint.to_string(),
            sha256: sha256.to_string(),
            offset: 0,
            size: None,
            hash: digest::Context::new(&digest::SHA256),
            local,
        }
    }

    fn request(&self) -> Value {
        serde_json::to_value(proto::Get {
            sha256: self.sha256.clone(),
            offset: self.offset,
            length: None,
            local: self.local,
        })
        .expect("a get serializes")
    }

    fn bad(&self, why: String) -> BlobError {
        BlobError::Protocol {
            endpoint: self.endpoint.clone(),
            why,
        }
    }

    /// Takes one reply: the bytes to write, and whether that was the last.
    fn accept(&mut self, reply: Value) -> Result<(Vec<u8>, bool), BlobError> {
        let got: proto::Got = parse(&self.endpoint, proto::GET, reply)?;
        let data = base64::engine::general_purpose::STANDARD
            .decode(got.data.as_bytes())
            .map_err(|e| self.bad(format!("chunk at {} is not base64: {e}", self.offset)))?;
        if *self.size.get_or_insert(got.size) != got.size {
            return Err(self.bad("the blob's size changed during the get".into()));
        }
        let end = self.offset + data.len() as u64;
        if data.len() > proto::CHUNK || end > got.size {
            return Err(self.bad(format!(
                "chunk at {} runs past the end or the chunk limit",
                self.offset
            )));
        }
        if data.is_empty() && end < got.size {
            return Err(self.bad(format!("an empty chunk at {} before the end", self.offset)));
        }
        let eof = end == got.size;
        if got.eof != eof {
            return Err(self.bad(format!("eof is {} at {end} of {}", got.eof, got.size)));
        }
        self.hash.update(&data);
        self.offset = end;
        Ok((data, eof))
    }

    fn finish(self) -> Result<u64, BlobError> {
        let got = sha_hex(self.hash);
        if got != self.sha256 {
            return Err(BlobError::Mismatch {
                sha256: self.sha256,
                endpoint: self.endpoint,
                got,
            });
        }
        Ok(self.offset)
    }
}

/// A temporary name for `dest` in its own directory (so the rename is atomic).
fn temp_beside(dest: &Path) -> PathBuf {
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "blob".into());
    let tag: u64 = rand::random();
    dest.with_file_name(format!(".{name}.tmp-{tag:016x}"))
}

fn create_temp(path: &Path) -> Result<std::fs::File, BlobError> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io("create", path))
}

/// fsyncs the directory holding `path`, so a rename into it survives a crash.
pub fn sync_parent(path: &Path) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::File::open(dir)?.sync_all()
}

/// Renames the finished temp file into place, durably.
fn install(tmp: &Path, dest: &Path) -> Result<(), BlobError> {
    std::fs::rename(tmp, dest).map_err(io("rename into place", dest))?;
    sync_parent(dest).map_err(io("fsync the directory of", dest))
}

// ---------------------------------------------------------------------------
// async, over a daemon's Calls

async fn call(
    calls: &Calls,
    endpoint: &str,
    kind: &'static str,
    body: Value,
    timeout: Duration,
    once: bool,
) -> Result<Value, ClientError> {
    if once {
        calls
            .wire()
            .call_with(endpoint, kind, body, timeout, timeout)
            .await
    } else {
        calls.call(endpoint, kind, body, timeout).await
    }
}

fn call_err<'a>(
    endpoint: &'a str,
    kind: &'static str,
) -> impl FnOnce(ClientError) -> BlobError + 'a {
    move |source| BlobError::Call {
        endpoint: endpoint.to_string(),
        kind,
        source,
    }
}

/// Alive blobstores' rpc endpoints, this node's first.
pub async fn blobstores(calls: &Calls) -> Result<Vec<String>, BlobError> {
    calls.find(proto::DAEMON).await.map_err(BlobError::Find)
}

/// Fills `buf` from `r` as far as it goes; fewer bytes only at the end.
async fn fill<R: AsyncRead + Unpin>(r: &mut R, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]).await? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Streams `r` to the blobstore at `endpoint` and commits it under the sha256 of
/// what was read. `replicate` asks that blobstore to copy it to its peer before
/// answering (a blobstore copying to its peer says `false`).
pub async fn put_reader_to<R: AsyncRead + Unpin>(
    calls: &Calls,
    endpoint: &str,
    mut r: R,
    replicate: bool,
) -> Result<Stored, BlobError> {
    let reply = call(
        calls,
        endpoint,
        proto::PUT_BEGIN,
        serde_json::json!({}),
        SHORT_TIMEOUT,
        false,
    )
    .await
    .map_err(call_err(endpoint, proto::PUT_BEGIN))?;
    let mut up = Upload::begun(endpoint, reply)?;
    let mut buf = vec![0u8; proto::CHUNK];
    loop {
        let n = fill(&mut r, &mut buf)
            .await
            .map_err(|source| BlobError::Io {
                what: "read the data to put as",
                path: PathBuf::from("a blob"),
                source,
            })?;
        if n == 0 {
            break;
        }
        let body = up.chunk(&buf[..n]);
        let reply = call(
            calls,
            endpoint,
            proto::PUT_CHUNK,
            body,
            SHORT_TIMEOUT,
            false,
        )
        .await
        .map_err(call_err(endpoint, proto::PUT_CHUNK))?;
        up.chunk_done(reply)?;
        if n < buf.len() {
            break;
        }
    }
    let (body, sha256) = up.commit(replicate);
    let reply = call(
        calls,
        endpoint,
        proto::PUT_COMMIT,
        body,
        long_timeout(up.sent),
        true,
    )
    .await
    .map_err(call_err(endpoint, proto::PUT_COMMIT))?;
    up.committed(&sha256, reply)
}

/// Streams `r` to a blobstore (this node's when it is alive), hashing as it goes.
pub async fn put_reader<R: AsyncRead + Unpin>(calls: &Calls, r: R) -> Result<Stored, BlobError> {
    let endpoints = blobstores(calls).await?;
    put_reader_to(calls, &endpoints[0], r, true).await
}

/// Puts the file at `path`, trying each alive blobstore in turn until one stores it.
pub async fn put_file(calls: &Calls, path: &Path) -> Result<Stored, BlobError> {
    let endpoints = blobstores(calls).await?;
    let mut last = None;
    for ep in &endpoints {
        let f = tokio::fs::File::open(path)
            .await
            .map_err(io("open", path))?;
        match put_reader_to(calls, ep, f, true).await {
            Ok(s) => return Ok(s),
            Err(e) if e.worth_another() => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.expect("find returns at least one endpoint"))
}

/// Streams blob `sha256` from the blobstore at `endpoint` into `dest` (see
/// [`get_file`]). With `local`, that blobstore answers from its own copy only,
/// without repairing it from its peer first.
pub async fn get_file_from(
    calls: &Calls,
    endpoint: &str,
    sha256: &str,
    dest: &Path,
    local: bool,
) -> Result<u64, BlobError> {
    check_name(sha256)?;
    let st = stat_at(calls, endpoint, sha256).await?;
    let mut d = Download::new(endpoint, sha256, local);
    let tmp = temp_beside(dest);
    let file = create_temp(&tmp)?;
    let mut file = tokio::fs::File::from_std(file);
    let result = async {
        loop {
            // The first get may repair the blobstore's copy from its peer first.
            let first = d.offset == 0;
            let timeout = if first {
                long_timeout(st.size.unwrap_or(2 << 30))
            } else {
                SHORT_TIMEOUT
            };
            let reply = call(calls, endpoint, proto::GET, d.request(), timeout, first)
                .await
                .map_err(|e| get_error(endpoint, sha256, e))?;
            let (data, eof) = d.accept(reply)?;
            file.write_all(&data).await.map_err(io("write", &tmp))?;
            if eof {
                break;
            }
        }
        file.flush().await.map_err(io("write", &tmp))?;
        file.sync_all().await.map_err(io("fsync", &tmp))?;
        let size = d.finish()?;
        let (t, dst) = (tmp.clone(), dest.to_path_buf());
        tokio::task::spawn_blocking(move || install(&t, &dst))
            .await
            .map_err(|e| BlobError::Io {
                what: "rename into place",
                path: dest.to_path_buf(),
                source: std::io::Error::other(e.to_string()),
            })??;
        Ok(size)
    }
    .await;
    if result.is_err() {
        let _ = tokio::fs::remove_file(&tmp).await;
    }
    result
}

/// Streams blob `sha256` into `dest`: written under a temporary name in the same
/// directory, verified against its sha256 as it arrives, fsynced, then renamed.
/// Each alive blobstore is tried in turn (this node's first). Returns the size.
pub async fn get_file(calls: &Calls, sha256: &str, dest: &Path) -> Result<u64, BlobError> {
    check_name(sha256)?;
    let endpoints = blobstores(calls).await?;
    let mut last = None;
    for ep in &endpoints {
        match get_file_from(calls, ep, sha256, dest, false).await {
            Ok(n) => return Ok(n),
            Err(e) if e.worth_another() => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.expect("find returns at least one endpoint"))
}

async fn stat_at(
    calls: &Calls,
    endpoint: &str,
    sha256: &str,
) -> Result<proto::StatReply, BlobError> {
    let body = serde_json::to_value(proto::Stat {
        sha256: sha256.to_string(),
    })
    .expect("a stat serializes");
    let reply = call(calls, endpoint, proto::STAT, body, STAT_TIMEOUT, false)
        .await
        .map_err(call_err(endpoint, proto::STAT))?;
    parse(endpoint, proto::STAT, reply)
}

/// Whether a blobstore (this node's first) holds `sha256`, and its size.
pub async fn stat(calls: &Calls, sha256: &str) -> Result<proto::StatReply, BlobError> {
    check_name(sha256)?;
    let endpoints = blobstores(calls).await?;
    stat_at(calls, &endpoints[0], sha256).await
}

/// [`stat`] at one blobstore.
pub async fn stat_from(
    calls: &Calls,
    endpoint: &str,
    sha256: &str,
) -> Result<proto::StatReply, BlobError> {
    check_name(sha256)?;
    stat_at(calls, endpoint, sha256).await
}

/// Every blob the blobstore at `endpoint` holds, page by page.
pub async fn list_from(calls: &Calls, endpoint: &str) -> Result<Vec<proto::Entry>, BlobError> {
    let mut out: Vec<proto::Entry> = Vec::new();
    loop {
        let body = serde_json::to_value(proto::List {
            after: out.last().map(|e| e.sha256.clone()),
        })
        .expect("a list serializes");
        let reply = call(calls, endpoint, proto::LIST, body, SHORT_TIMEOUT, false)
            .await
            .map_err(call_err(endpoint, proto::LIST))?;
        let page: proto::Listing = parse(endpoint, proto::LIST, reply)?;
        let more = page.more && !page.blobs.is_empty();
        out.extend(page.blobs);
        if !more {
            return Ok(out);
        }
    }
}

// ---------------------------------------------------------------------------
// blocking, over one wire Client (the CLI)

fn blocking_call(
    client: &mut Client,
    kind: &'static str,
    body: Value,
    timeout: Duration,
) -> Result<Value, ClientError> {
    client.set_timeout(timeout);
    client.call(kind, body)
}

/// Puts the file at `path` through `client`'s blobstore. The client's timeout is
/// set per call (it is left at [`SHORT_TIMEOUT`]).
pub fn put_file_blocking(client: &mut Client, path: &Path) -> Result<Stored, BlobError> {
    let mut f = std::fs::File::open(path).map_err(io("open", path))?;
    let endpoint = client.endpoint().to_string();
    let err = |kind| call_err(&endpoint, kind);
    let reply = blocking_call(
        client,
        proto::PUT_BEGIN,
        serde_json::json!({}),
        SHORT_TIMEOUT,
    )
    .map_err(err(proto::PUT_BEGIN))?;
    let mut up = Upload::begun(&endpoint, reply)?;
    let mut buf = vec![0u8; proto::CHUNK];
    loop {
        let mut n = 0;
        while n < buf.len() {
            match f.read(&mut buf[n..]).map_err(io("read", path))? {
                0 => break,
                k => n += k,
            }
        }
        if n == 0 {
            break;
        }
        let body = up.chunk(&buf[..n]);
        let reply = blocking_call(client, proto::PUT_CHUNK, body, SHORT_TIMEOUT)
            .map_err(err(proto::PUT_CHUNK))?;
        up.chunk_done(reply)?;
        if n < buf.len() {
            break;
        }
    }
    let (body, sha256) = up.commit(true);
    let reply = blocking_call(client, proto::PUT_COMMIT, body, long_timeout(up.sent));
    let reply = match reply {
        // The wire client resends a call it has no answer to; a resend later than
        // the skew window is refused as stale while the first copy still runs
        // (a long copy to the peer). The upload is consumed by then, so the blob
        // is committed again by name: a blob already present answers at once.
        Err(e) if e.code() == Some(&Code::Stale) => commit_by_name(client, &sha256, up.sent),
        other => other,
    };
    client.set_timeout(SHORT_TIMEOUT);
    up.committed(&sha256, reply.map_err(err(proto::PUT_COMMIT))?)
}

/// Commits an empty upload as `sha256`: answered from the blob already present.
fn commit_by_name(client: &mut Client, sha256: &str, size: u64) -> Result<Value, ClientError> {
    let deadline = std::time::Instant::now() + long_timeout(size);
    loop {
        let begun = blocking_call(
            client,
            proto::PUT_BEGIN,
            serde_json::json!({}),
            SHORT_TIMEOUT,
        )?;
        let upload = begun
            .get("upload")
            .and_then(|u| u.as_str())
            .unwrap_or_default()
            .to_string();
        let body = serde_json::to_value(proto::Commit {
            upload,
            sha256: sha256.to_string(),
            size,
            replicate: true,
        })
        .expect("a commit serializes");
        let r = blocking_call(client, proto::PUT_COMMIT, body, long_timeout(size));
        match r {
            // Not present yet: the first commit is still verifying or copying.
            Err(e)
                if matches!(e.code(), Some(Code::Stale) | Some(Code::Invalid))
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_secs(1));
            }
            other => return other,
        }
    }
}

/// Streams blob `sha256` from `client`'s blobstore into `dest`, as [`get_file`]
/// does. Returns the size.
pub fn get_file_blocking(client: &mut Client, sha256: &str, dest: &Path) -> Result<u64, BlobError> {
    check_name(sha256)?;
    let endpoint = client.endpoint().to_string();
    let st = stat_blocking(client, sha256)?;
    let mut d = Download::new(&endpoint, sha256, false);
    let tmp = temp_beside(dest);
    let mut file = create_temp(&tmp)?;
    let result = (|| {
        loop {
            let timeout = if d.offset == 0 {
                long_timeout(st.size.unwrap_or(2 << 30))
            } else {
                SHORT_TIMEOUT
            };
            let reply = blocking_call(client, proto::GET, d.request(), timeout)
                .map_err(|e| get_error(&endpoint, sha256, e))?;
            let (data, eof) = d.accept(reply)?;
            file.write_all(&data).map_err(io("write", &tmp))?;
            if eof {
                break;
            }
        }
        file.sync_all().map_err(io("fsync", &tmp))?;
        let size = d.finish()?;
        install(&tmp, dest)?;
        Ok(size)
    })();
    client.set_timeout(SHORT_TIMEOUT);
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Whether `client`'s blobstore holds `sha256`, and its size.
pub fn stat_blocking(client: &mut Client, sha256: &str) -> Result<proto::StatReply, BlobError> {
    check_name(sha256)?;
    let endpoint = client.endpoint().to_string();
    let body = serde_json::to_value(proto::Stat {
        sha256: sha256.to_string(),
    })
    .expect("a stat serializes");
    let reply = blocking_call(client, proto::STAT, body, STAT_TIMEOUT)
        .map_err(call_err(&endpoint, proto::STAT))?;
    parse(&endpoint, proto::STAT, reply)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn b64(d: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(d)
    }

    fn sha(d: &[u8]) -> String {
        hex::encode(digest::digest(&digest::SHA256, d).as_ref())
    }

    #[test]
    fn a_download_checks_every_chunk_and_the_hash() {
        let data = b"hello blob".to_vec();
        let mut d = Download::new("tcp://x:1", &sha(&data), false);
        assert_eq!(d.request()["offset"], 0);
        let (got, eof) = d
            .accept(json!({"data": b64(&data[..4]), "size": 10, "eof": false}))
            .unwrap();
        assert_eq!((got.as_slice(), eof), (&data[..4], false));
        assert_eq!(d.request()["offset"], 4);
        let (_, eof) = d
            .accept(json!({"data": b64(&data[4..]), "size": 10, "eof": true}))
            .unwrap();
        assert!(eof);
        assert_eq!(d.finish().unwrap(), 10);
    }

    #[test]
    fn a_download_refuses_lies() {
        let data = b"hello blob".to_vec();
        let table = [
            // The size changes between chunks.
            vec![
                json!({"data": b64(&data[..4]), "size": 10, "eof": false}),
                json!({"data": b64(&data[4..]), "size": 11, "eof": false}),
            ],
            // Past the end.
            vec![json!({"data": b64(b"hello blob!"), "size": 10, "eof": true})],
            // eof claimed early, and not claimed at the end.
            vec![json!({"data": b64(&data[..4]), "size": 10, "eof": true})],
            vec![json!({"data": b64(&data), "size": 10, "eof": false})],
            // Nothing, before the end (would loop forever).
            vec![json!({"data": "", "size": 10, "eof": false})],
            vec![json!({"data": "not base64!", "size": 10, "eof": false})],
        ];
        for replies in table {
            let mut d = Download::new("tcp://x:1", &sha(&data), false);
            let r: Result<Vec<_>, _> = replies.iter().map(|r| d.accept(r.clone())).collect();
            assert!(
                matches!(r, Err(BlobError::Protocol { .. })),
                "{replies:?}: {r:?}"
            );
        }
        // Well-formed but other bytes: the hash says so.
        let mut d = Download::new("tcp://x:1", &sha(&data), false);
        d.accept(json!({"data": b64(b"HELLO BLOB"), "size": 10, "eof": true}))
            .unwrap();
        assert!(matches!(d.finish(), Err(BlobError::Mismatch { .. })));
    }

    #[test]
    fn an_upload_numbers_its_chunks_and_commits_their_hash() {
        let mut u = Upload::begun("tcp://x:1", json!({"upload": "up-1"})).unwrap();
        let c = u.chunk(b"abc");
        assert_eq!(
            (c["offset"].as_u64(), c["data"].as_str()),
            (Some(0), Some("YWJj"))
        );
        u.chunk_done(json!({"received": 3})).unwrap();
        let c = u.chunk(b"de");
        assert_eq!(c["offset"], 3);
        assert!(u.chunk_done(json!({"received": 3})).is_err());
        let (body, sha256) = u.commit(true);
        assert_eq!(sha256, sha(b"abcde"));
        assert_eq!(body["size"], 5);
        assert_eq!(body["replicate"], true);
        let ok = json!({"sha256": sha256, "size": 5, "copies": 2});
        assert_eq!(u.committed(&sha256, ok).unwrap().copies, 2);
        let wrong = json!({"sha256": sha(b"x"), "size": 5, "copies": 2});
        assert!(u.committed(&sha256, wrong).is_err());
    }

    #[test]
    fn the_temp_file_is_a_hidden_sibling() {
        let t = temp_beside(Path::new("/var/x/slug.tar.zst"));
        assert_eq!(t.parent(), Some(Path::new("/var/x")));
        let name = t.file_name().unwrap().to_str().unwrap();
        assert!(name.starts_with(".slug.tar.zst.tmp-"), "{name}");
    }
}
