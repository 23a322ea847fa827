//! The blobstore's files: where each thing lives under `dir`, and the blocking
//! disk work (run on tokio's blocking pool, never on the actix thread).
//!
//! ```text
//! <dir>/blobs/<aa>/<sha256>   a verified blob (aa = its first two hex digits)
//! <dir>/blobs/<aa>/.<sha256>.tmp-<n>   a copy from the peer being written
//! <dir>/uploads/<upload id>   an upload in progress
//! ```
//!
//! Names that reach a path are checked first: a sha256 is 64 lowercase hex
//! digits, an upload id is `up-` and 26 lowercase ULID digits.

use std::collections::HashSet;
use std::fs;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use paddock_blob::proto::is_sha256;
use ring::digest;

pub fn blobs_dir(dir: &Path) -> PathBuf {
    dir.join("blobs")
}

pub fn uploads_dir(dir: &Path) -> PathBuf {
    dir.join("uploads")
}

/// `<dir>/blobs/<aa>/<sha256>`; `sha256` must have passed `is_sha256`.
pub fn blob_path(dir: &Path, sha256: &str) -> PathBuf {
    debug_assert!(is_sha256(sha256));
    blobs_dir(dir).join(&sha256[..2]).join(sha256)
}

/// `<dir>/uploads/<id>`; `id` must have passed `is_upload_id`.
pub fn upload_path(dir: &Path, id: &str) -> PathBuf {
    debug_assert!(is_upload_id(id));
    uploads_dir(dir).join(id)
}

pub fn new_upload_id() -> String {
    format!("up-{}", ulid::Ulid::new().to_string().to_lowercase())
}

/// Whether `s` is an upload id this blobstore makes.
pub fn is_upload_id(s: &str) -> bool {
    s.len() == 29
        && s.starts_with("up-")
        && s[3..]
            .bytes()
            .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase())
}

/// What identifies one version of a file on disk: a blob verified once is hashed
/// again only when this changed (rewritten, replaced, or edited in place).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileId {
    pub size: u64,
    pub ino: u64,
    pub mtime_ns: i128,
    pub ctime_ns: i128,
}

impl FileId {
    pub fn of(m: &fs::Metadata) -> FileId {
        FileId {
            size: m.len(),
            ino: m.ino(),
            mtime_ns: m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128,
            ctime_ns: m.ctime() as i128 * 1_000_000_000 + m.ctime_nsec() as i128,
        }
    }
}

/// The blob's file id, or `None` when it is not there.
pub fn stat_blob(dir: &Path, sha256: &str) -> io::Result<Option<FileId>> {
    match fs::metadata(blob_path(dir, sha256)) {
        Ok(m) if m.is_file() => Ok(Some(FileId::of(&m))),
        Ok(_) => Ok(None),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// The sha256 of the file at `path` (hex), and the id of the version hashed.
pub fn hash_file(path: &Path) -> io::Result<(String, FileId)> {
    let mut f = fs::File::open(path)?;
    let before = FileId::of(&f.metadata()?);
    let mut ctx = digest::Context::new(&digest::SHA256);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match f.read(&mut buf)? {
            0 => break,
            n => ctx.update(&buf[..n]),
        }
    }
    Ok((hex::encode(ctx.finish().as_ref()), before))
}

/// Up to `len` bytes at `offset` of the blob, and its size. `NotFound` when the
/// blob is not here.
pub fn read_at(dir: &Path, sha256: &str, offset: u64, len: usize) -> io::Result<(Vec<u8>, u64)> {
    let mut f = fs::File::open(blob_path(dir, sha256))?;
    let size = f.metadata()?.len();
    if offset > size {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("offset {offset} is past the end of the blob ({size} bytes)"),
        ));
    }
    f.seek(SeekFrom::Start(offset))?;
    let want = (size - offset).min(len as u64) as usize;
    let mut buf = vec![0u8; want];
    f.read_exact(&mut buf)?;
    Ok((buf, size))
}

fn mkdir(p: &Path) -> io::Result<()> {
    fs::DirBuilder::new().recursive(true).mode(0o700).create(p)
}

/// fsyncs the directory holding `path`.
pub fn sync_parent(path: &Path) -> io::Result<()> {
    match path.parent() {
        Some(d) => fs::File::open(d)?.sync_all(),
        None => Ok(()),
    }
}

/// Why the blob directory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error("another blobstore uses {} (it holds {}): give each blobstore its own `dir`", dir.display(), dir.join("lock").display())]
    Held { dir: PathBuf },
    #[error("cannot prepare the blob directory {}", dir.display())]
    Io {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Takes the directory's lock (held for the process's life through the returned
/// file: two blobstores in one `dir` would discard each other's uploads), makes
/// the layout and clears what a previous run left half done: uploads (their
/// clients get `not_found` and start again) and peer copies being written.
pub fn prepare(dir: &Path) -> Result<fs::File, PrepareError> {
    let io = |source| PrepareError::Io {
        dir: dir.to_path_buf(),
        source,
    };
    mkdir(dir).map_err(io)?;
    let lock = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("lock"))
        .map_err(io)?;
    match lock.try_lock() {
        Ok(()) => {}
        Err(fs::TryLockError::WouldBlock) => {
            return Err(PrepareError::Held {
                dir: dir.to_path_buf(),
            })
        }
        Err(fs::TryLockError::Error(e)) => return Err(io(e)),
    }
    clear(dir).map_err(io)?;
    Ok(lock)
}

fn clear(dir: &Path) -> io::Result<()> {
    mkdir(&blobs_dir(dir))?;
    mkdir(&uploads_dir(dir))?;
    for e in fs::read_dir(uploads_dir(dir))? {
        let p = e?.path();
        fs::remove_file(&p).or_else(ignore_missing)?;
    }
    for sub in fs::read_dir(blobs_dir(dir))? {
        let sub = sub?;
        if !sub.file_type()?.is_dir() {
            continue;
        }
        for e in fs::read_dir(sub.path())? {
            let e = e?;
            if e.file_name().to_string_lossy().starts_with('.') {
                fs::remove_file(e.path()).or_else(ignore_missing)?;
            }
        }
    }
    Ok(())
}

fn ignore_missing(e: io::Error) -> io::Result<()> {
    if e.kind() == io::ErrorKind::NotFound {
        Ok(())
    } else {
        Err(e)
    }
}

/// Makes the directory a blob goes into.
pub fn make_blob_dir(dir: &Path, sha256: &str) -> io::Result<PathBuf> {
    let p = blob_path(dir, sha256);
    let parent = p.parent().expect("a blob path has a parent");
    mkdir(parent)?;
    Ok(p)
}

/// Moves a finished, verified upload into place, durably.
pub fn install(file: &fs::File, from: &Path, dir: &Path, sha256: &str) -> io::Result<()> {
    file.sync_all()?;
    let to = make_blob_dir(dir, sha256)?;
    fs::rename(from, &to)?;
    sync_parent(&to)
}

/// One stored blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub sha256: String,
    pub size: u64,
    pub mtime: SystemTime,
}

/// Every blob, in sha256 order (files that are not blobs are left out).
pub fn list(dir: &Path) -> io::Result<Vec<Listed>> {
    let mut out = Vec::new();
    let top = match fs::read_dir(blobs_dir(dir)) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    for sub in top {
        let sub = sub?;
        let prefix = sub.file_name().to_string_lossy().into_owned();
        if prefix.len() != 2 || !sub.file_type()?.is_dir() {
            continue;
        }
        for e in fs::read_dir(sub.path())? {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            if !is_sha256(&name) || !name.starts_with(&prefix) {
                continue;
            }
            let m = match e.metadata() {
                Ok(m) if m.is_file() => m,
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            out.push(Listed {
                sha256: name,
                size: m.len(),
                mtime: m.modified()?,
            });
        }
    }
    out.sort_by(|a, b| a.sha256.cmp(&b.sha256));
    Ok(out)
}

/// One page of a listing in sha256 order: at most `n` blobs after `after`, and
/// whether more follow.
pub fn page<'a>(all: &'a [Listed], after: Option<&str>, n: usize) -> (&'a [Listed], bool) {
    let start = match after {
        Some(a) => all.partition_point(|b| b.sha256.as_str() <= a),
        None => 0,
    };
    let rest = &all[start..];
    (&rest[..rest.len().min(n)], rest.len() > n)
}

/// Which listed blobs a collection removes: not referenced, and older than the
/// grace period (a blob put by a build not released yet is young).
pub fn doomed<'a>(
    blobs: &'a [Listed],
    referenced: &HashSet<String>,
    grace: Duration,
    now: SystemTime,
) -> Vec<&'a Listed> {
    blobs
        .iter()
        .filter(|b| !referenced.contains(&b.sha256))
        .filter(|b| now.duration_since(b.mtime).is_ok_and(|age| age >= grace))
        .collect()
}

/// Removes one blob (gone already is fine).
pub fn remove(dir: &Path, sha256: &str) -> io::Result<()> {
    fs::remove_file(blob_path(dir, sha256)).or_else(ignore_missing)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHA: &str = "ab00000000000000000000000000000000000000000000000000000000000001";

    #[test]
    fn paths_are_fanned_out_by_the_first_two_digits() {
        let d = Path::new("/srv/b");
        assert_eq!(blob_path(d, SHA), Path::new("/srv/b/blobs/ab").join(SHA));
        let id = new_upload_id();
        assert!(is_upload_id(&id), "{id}");
        assert_eq!(upload_path(d, &id), Path::new("/srv/b/uploads").join(&id));
    }

    #[test]
    fn only_our_upload_ids_pass() {
        let good = new_upload_id();
        let table = [
            "".to_string(),
            "up-".to_string(),
            format!("{good}x"),
            good.to_uppercase(),
            format!("up-../{}", &good[6..]),
            format!("xx-{}", &good[3..]),
            format!("up-{}/", &good[4..]),
        ];
        for bad in table {
            assert!(!is_upload_id(&bad), "{bad:?}");
        }
    }

    fn listed(sha: char, age_s: u64, now: SystemTime) -> Listed {
        Listed {
            sha256: sha.to_string().repeat(64),
            size: 1,
            mtime: now - Duration::from_secs(age_s),
        }
    }

    #[test]
    fn collection_spares_referenced_and_young_blobs() {
        let now = SystemTime::now();
        let blobs = vec![
            listed('a', 7200, now), // old, unreferenced: removed
            listed('b', 7200, now), // old, referenced: kept
            listed('c', 60, now),   // young, unreferenced: kept
            listed('d', 3600, now), // exactly the grace: removed
        ];
        // A clock step back puts an mtime in the future: kept.
        let mut future = listed('e', 0, now);
        future.mtime = now + Duration::from_secs(60);
        let mut blobs = blobs;
        blobs.push(future);
        let referenced: HashSet<String> = ["b".repeat(64)].into_iter().collect();
        let gone: Vec<char> = doomed(&blobs, &referenced, Duration::from_secs(3600), now)
            .iter()
            .map(|b| b.sha256.chars().next().unwrap())
            .collect();
        assert_eq!(gone, ['a', 'd']);
        // With nothing referenced, the old referenced one would have gone too.
        let none = HashSet::new();
        assert_eq!(
            doomed(&blobs, &none, Duration::from_secs(3600), now).len(),
            3
        );
    }

    #[test]
    fn a_listing_is_paged_after_a_name() {
        let now = SystemTime::now();
        let all: Vec<Listed> = ['1', '3', '5', '7', '9']
            .map(|c| listed(c, 0, now))
            .to_vec();
        let names = |p: &[Listed]| -> String {
            p.iter().map(|b| b.sha256.chars().next().unwrap()).collect()
        };
        let (p, more) = page(&all, None, 2);
        assert_eq!((names(p), more), ("13".into(), true));
        let (p, more) = page(&all, Some(&"3".repeat(64)), 2);
        assert_eq!((names(p), more), ("57".into(), true));
        // `after` need not be a listed name.
        let (p, more) = page(&all, Some(&"6".repeat(64)), 2);
        assert_eq!((names(p), more), ("79".into(), false));
        let (p, more) = page(&all, Some(&"9".repeat(64)), 2);
        assert_eq!((names(p), more), ("".into(), false));
        let (p, more) = page(&all, None, 5);
        assert_eq!((names(p), more), ("13579".into(), false));
    }

    #[test]
    fn prepare_clears_leftovers_and_list_skips_what_is_not_a_blob() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path();
        let held = prepare(d).unwrap();
        assert!(
            matches!(prepare(d), Err(PrepareError::Held { .. })),
            "a second blobstore in the same dir is refused"
        );
        drop(held);
        let p = make_blob_dir(d, SHA).unwrap();
        fs::write(&p, b"x").unwrap();
        let tmp = p.with_file_name(format!(".{SHA}.tmp-1"));
        fs::write(&tmp, b"half").unwrap();
        fs::write(p.with_file_name("junk"), b"j").unwrap();
        // A valid name in the wrong fan-out dir is not listed either.
        let other = "cd".to_string() + &SHA[2..];
        fs::write(p.with_file_name(&other), b"j").unwrap();
        let up = upload_path(d, &new_upload_id());
        fs::write(&up, b"partial").unwrap();
        let _held = prepare(d).unwrap();
        assert!(!tmp.exists() && !up.exists() && p.exists());
        let l = list(d).unwrap();
        assert_eq!(l.len(), 1);
        assert_eq!((l[0].sha256.as_str(), l[0].size), (SHA, 1));
        let (bytes, size) = read_at(d, SHA, 0, 10).unwrap();
        assert_eq!((bytes.as_slice(), size), (&b"x"[..], 1));
        assert!(read_at(d, SHA, 2, 10).is_err());
        assert_eq!(read_at(d, SHA, 1, 10).unwrap().0.len(), 0);
    }
}
