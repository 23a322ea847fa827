//! One build, from the pushed source to a release: the steps, their log lines
//! and their failures. Build code only ever runs in the [`Sandbox`].

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Map, Value};

use crate::procfile::{self, BuildpackRef};
use crate::sandbox::{Ended, Sandbox};
use crate::{Deployer, Job};

/// The most buildpacks one build runs (lines of `.buildpacks`).
pub const MAX_BUILDPACKS: usize = 16;

/// Why a build failed: the step and a message for the person who pushed.
#[derive(Debug)]
pub struct Failure {
    pub step: &'static str,
    pub message: String,
}

fn fail(step: &'static str, message: impl Into<String>) -> Failure {
    Failure {
        step,
        message: message.into(),
    }
}

/// A buildpack chosen for the build: its name (what detect said) and where the
/// sandbox finds it.
struct Pack {
    label: String,
    dir: String,
}

/// The paths of one build on the host.
///
/// `root` (root's, 0700) holds `app` (the app user's, seen at `/app`) and `tmp`
/// (root's, 0755, seen at `/tmp`); in `tmp` only `env` and `work` (`$TMPDIR`)
/// are the app user's, and every mount point (`cache`, `buildpacks`, `.app`,
/// `buildpack-local-N`) is root's, so no path the deployer mounts on, writes or
/// reads as root can have been changed by build code.
pub struct Paths {
    pub root: PathBuf,
    pub app: PathBuf,
    pub tmp: PathBuf,
    pub work: PathBuf,
}

impl Paths {
    pub fn new(dir: &Path, id: &str) -> Paths {
        let root = dir.join("builds").join(id);
        let tmp = root.join("tmp");
        Paths {
            app: root.join("app"),
            work: tmp.join("work"),
            tmp,
            root,
        }
    }
}

/// Makes a new directory (an existing one is an error: nothing is taken over,
/// and no chmod or chown ever goes through a path that was there before),
/// with `mode` exactly, owned by `owner` (else root). Only ever called on paths
/// whose parents are root's.
fn mkdir(p: &Path, mode: u32, owner: Option<(u32, u32)>) -> std::io::Result<()> {
    std::fs::DirBuilder::new().mode(mode).create(p)?;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(p)?;
    f.set_permissions(std::fs::Permissions::from_mode(mode))?;
    if let Some((u, g)) = owner {
        std::os::unix::fs::fchown(&f, Some(u), Some(g))?;
    }
    Ok(())
}

/// Reads a small file of the build tree as root, never through a symlink and
/// never blocking on a FIFO; `None` when it is missing. It must be a regular
/// file of the app's user (`uid`) with one link, as the slug's tar: a hard
/// link to a file the build did not make (on a host with
/// fs.protected_hardlinks=0, even a root-only one) is refused, not read.
pub fn read_tree_file(p: &Path, max: u64, uid: u32) -> Result<Option<String>, String> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(p);
    let mut f = match f {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(format!(
                "{} is refused: it is a symlink (it must be a regular file of the app's own)",
                name(p)
            ))
        }
        Err(e) => return Err(format!("cannot read {}: {e}", name(p))),
    };
    let meta = f
        .metadata()
        .map_err(|e| format!("cannot read {}: {e}", name(p)))?;
    if !meta.is_file() {
        return Err(format!("{} is refused: it is not a regular file", name(p)));
    }
    if meta.uid() != uid {
        return Err(format!(
            "{} is refused: it is not the app's own file (owner uid {})",
            name(p),
            meta.uid()
        ));
    }
    if meta.nlink() != 1 {
        return Err(format!(
            "{} is refused: it has {} hard links (it must have exactly one)",
            name(p),
            meta.nlink()
        ));
    }
    if meta.size() > max {
        return Err(format!("{} is larger than {max} bytes", name(p)));
    }
    // The size was checked, but what is read is capped all the same.
    let mut bytes = Vec::new();
    (&mut f)
        .take(max + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read {}: {e}", name(p)))?;
    if bytes.len() as u64 > max {
        return Err(format!("{} is larger than {max} bytes", name(p)));
    }
    let s = String::from_utf8(bytes).map_err(|_| format!("{} is not UTF-8 text", name(p)))?;
    Ok(Some(s))
}

/// A regular file the deployer made in the build's root-owned tmp, opened
/// read-only (never through a symlink) to be build code's stdin.
fn open_regular(p: &Path) -> std::io::Result<std::fs::File> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(p)?;
    if !f.metadata()?.is_file() {
        return Err(std::io::Error::other(format!(
            "{} is not a regular file",
            name(p)
        )));
    }
    Ok(f)
}

fn name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn human(bytes: u64) -> String {
    if bytes >= 1 << 20 {
        format!("{:.1} MB", bytes as f64 / (1 << 20) as f64)
    } else {
        format!("{:.1} KB", bytes as f64 / 1024.0)
    }
}

/// Writer that hashes what passes through it.
struct Hashing<W> {
    inner: W,
    ctx: ring::digest::Context,
    size: u64,
}

impl<W: std::io::Write> std::io::Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.ctx.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Writer that refuses to grow past `max` bytes.
struct Capped<W> {
    inner: W,
    left: u64,
}

impl<W: std::io::Write> std::io::Write for Capped<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if buf.len() as u64 > self.left {
            return Err(std::io::Error::new(
                std::io::ErrorKind::FileTooLarge,
                "over the limit",
            ));
        }
        let n = self.inner.write(buf)?;
        self.left -= n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Why a slug could not be made.
#[derive(Debug, thiserror::Error)]
pub enum SlugError {
    #[error("the app's files come to more than {0} MB uncompressed (build_disk_mb); leave some out with .slugignore")]
    TarTooLarge(u64),
    #[error("the compressed slug is larger than {0} MB (max_slug_mb); leave some files out with .slugignore")]
    SlugTooLarge(u64),
    #[error("slug.tar is not a regular file of the app's own")]
    NotTheBuilds,
    #[error("cannot compress the slug")]
    Io(#[from] std::io::Error),
}

/// zstd of the tar the build left at `tar` (a regular file of the app user's,
/// one link) into a new file `out`: the sha256 and size of the compressed
/// bytes. At most `max_tar` bytes are read and `max_slug` written.
fn compress(
    tar: &Path,
    out: &Path,
    uid: u32,
    max_tar: u64,
    max_slug: u64,
) -> Result<(String, u64), SlugError> {
    let src = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(tar)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => SlugError::NotTheBuilds,
            _ => SlugError::Io(e),
        })?;
    let meta = src.metadata()?;
    if !meta.is_file() || meta.uid() != uid || meta.nlink() != 1 {
        return Err(SlugError::NotTheBuilds);
    }
    if meta.size() > max_tar {
        return Err(SlugError::TarTooLarge(max_tar >> 20));
    }
    let _ = std::fs::remove_file(out);
    let dst = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(out)?;
    let hashing = Hashing {
        inner: Capped {
            inner: std::io::BufWriter::with_capacity(1 << 16, dst),
            left: max_slug,
        },
        ctx: ring::digest::Context::new(&ring::digest::SHA256),
        size: 0,
    };
    let too_big = |e: std::io::Error| {
        if e.kind() == std::io::ErrorKind::FileTooLarge {
            SlugError::SlugTooLarge(max_slug >> 20)
        } else {
            SlugError::Io(e)
        }
    };
    let mut enc = zstd::stream::Encoder::new(hashing, 3)?;
    let copied = std::io::copy(&mut src.take(max_tar + 1), &mut enc).map_err(too_big)?;
    if copied > max_tar {
        return Err(SlugError::TarTooLarge(max_tar >> 20));
    }
    let mut hashing = enc.finish().map_err(too_big)?;
    std::io::Write::flush(&mut hashing).map_err(too_big)?;
    hashing
        .inner
        .inner
        .into_inner()
        .map_err(|e| e.into_error())?
        .sync_all()?;
    let _ = std::fs::remove_file(tar);
    Ok((hex::encode(hashing.ctx.finish().as_ref()), hashing.size))
}

/// A build in progress: the job, its sandbox, and its clock.
pub struct Run {
    pub dep: Rc<Deployer>,
    pub job: Job,
    pub paths: Paths,
    pub sandbox: Sandbox,
    pub deadline: Instant,
    pub durations: Map<String, Value>,
    pub config: BTreeMap<String, String>,
    pub release: Option<Value>,
    /// app.json's scheduling settings for the release (`formation.TYPE.*`).
    pub scheduling: Option<Value>,
}

impl Run {
    fn log(&self, line: impl Into<String>) {
        self.dep.push_line(&self.job.id, line.into());
    }

    /// A new step: recorded with the lines so far at once, so a build cut off
    /// by a crash says where it was.
    async fn step(&self, step: &'static str) {
        self.dep.set_step(&self.job.id, step);
        self.dep.flush(&self.job.id).await;
    }

    fn timed(&mut self, step: &str, began: Instant) {
        self.durations
            .insert(step.to_string(), json!(began.elapsed().as_millis() as u64));
    }

    fn left(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }

    /// Runs a command in the sandbox with its output in the log.
    async fn sandboxed(
        &self,
        step: &'static str,
        what: &str,
        argv: &[&str],
        capture: bool,
    ) -> Result<String, Failure> {
        self.sandboxed_with(step, what, argv, capture, None).await
    }

    /// [`Run::sandboxed`] with `stdin` as the command's standard input.
    async fn sandboxed_with(
        &self,
        step: &'static str,
        what: &str,
        argv: &[&str],
        capture: bool,
        stdin: Option<std::fs::File>,
    ) -> Result<String, Failure> {
        let dep = self.dep.clone();
        let id = self.job.id.clone();
        let line = move |l: String| dep.push_line(&id, l);
        let ooms = self.sandbox.oom_kills();
        let (ended, out) = self
            .sandbox
            .run_with(argv, self.deadline, capture, stdin, &line)
            .await
            .map_err(|e| fail(step, format!("cannot run {what}: {e}")))?;
        if ended.ok() {
            return Ok(out);
        }
        let s = &self.dep.settings;
        let message = if ended == Ended::Disk {
            format!(
                "{what} was stopped: the build used more than {} MB of disk (build_disk_mb) in \
                 /app, /tmp/work and its cache",
                self.sandbox.max_disk_bytes >> 20
            )
        } else if ended == Ended::Files {
            format!(
                "{what} was stopped: the build made more than {} files (build_inodes) in \
                 /app, /tmp/work and its cache",
                s.build_inodes
            )
        } else if ended == Ended::Deep {
            format!(
                "{what} was stopped: the build made a directory too deep to measure (a path \
                 longer than {} bytes) in /app, /tmp/work or its cache",
                libc::PATH_MAX
            )
        } else if ended == Ended::TimedOut {
            format!(
                "{what} ran past the build's time limit ({} s) and was stopped",
                s.build_timeout.as_secs()
            )
        } else if ended == Ended::Signal(libc::SIGXFSZ) {
            format!(
                "{what} wrote a file larger than the build's disk limit ({} MB, build_disk_mb) and was stopped",
                s.build_disk_mb
            )
        } else if ended == Ended::Exit(128 + libc::SIGXFSZ) {
            // A shell says so for a command it ran.
            format!(
                "{what} exited with status {}: a command was stopped for writing a file larger \
                 than the build's disk limit ({} MB, build_disk_mb)",
                128 + libc::SIGXFSZ,
                s.build_disk_mb
            )
        } else if self.sandbox.oom_kills() > ooms {
            format!(
                "{what} ran out of memory (the build's limit is {} MB) and was killed",
                s.build_memory_mb
            )
        } else {
            format!("{what} {ended}")
        };
        Err(fail(step, message))
    }

    /// Every step in order; the release object at the end.
    pub async fn steps(&mut self) -> Result<Value, Failure> {
        let t = Instant::now();
        self.step("source").await;
        self.source().await?;
        self.timed("source", t);

        let t = Instant::now();
        self.step("detect").await;
        let packs = self.detect().await?;
        self.timed("detect", t);

        let t = Instant::now();
        self.step("compile").await;
        for p in &packs {
            let compile = format!("{}/bin/compile", p.dir);
            let what = format!("the {} buildpack's bin/compile", p.label);
            self.sandboxed(
                "compile",
                &what,
                &[&compile, "/app", "/tmp/cache", "/tmp/env"],
                false,
            )
            .await?;
        }
        self.timed("compile", t);

        let t = Instant::now();
        self.step("process-types").await;
        let (types, healthchecks) = self.process_types(&packs).await?;
        self.timed("process-types", t);

        let t = Instant::now();
        self.step("slug").await;
        let (sha, size) = self.slug().await?;
        self.timed("slug", t);

        let t = Instant::now();
        self.step("release").await;
        let short: String = self.job.commit.chars().take(7).collect();
        let mut body = json!({
            "app": self.job.app,
            "slug": sha,
            "process_types": types,
            "description": format!("Deploy {short}"),
            "created_by": self.job.pusher,
        });
        if let Some(h) = healthchecks {
            body["healthchecks"] = h;
        }
        if let Some(sch) = self.scheduling.take() {
            body["scheduling"] = sch;
        }
        let reply = self
            .dep
            .api("release.create", body, self.left())
            .await
            .map_err(|e| {
                fail(
                    "release",
                    format!("the api did not record the release: {e}"),
                )
            })?;
        let release = reply["release"].clone();
        let version = release["version"].as_i64().unwrap_or(0);
        self.release = Some(release.clone());
        self.log(format!(
            "-----> Release v{version} created (slug {}…, {})",
            &sha[..12],
            human(size)
        ));
        self.timed("release", t);

        if types.contains_key("release") {
            let t = Instant::now();
            self.step("release-phase").await;
            let r = self
                .release_phase(&sha, version, types["release"].as_str().unwrap_or(""))
                .await;
            self.timed("release-phase", t);
            if let Err(f) = r {
                let _ = self
                    .dep
                    .api(
                        "release.status",
                        json!({"app": self.job.app, "version": version, "status": "failed",
                               "message": f.message}),
                        Duration::from_secs(10),
                    )
                    .await;
                return Err(f);
            }
        }
        if self.dep.settings.scheduled {
            self.log(format!(
                "-----> v{version} is ready: the scheduler rolls it out"
            ));
            return Ok(release);
        }
        let reply = self
            .dep
            .api(
                "release.status",
                json!({"app": self.job.app, "version": version, "status": "succeeded"}),
                Duration::from_secs(10).max(self.left().min(Duration::from_secs(30))),
            )
            .await
            .map_err(|e| {
                fail(
                    "release",
                    format!("the api did not mark v{version} succeeded: {e}"),
                )
            })?;
        self.release = Some(reply["release"].clone());
        Ok(reply["release"].clone())
    }

    /// Directories, config, the source blob, unpacked at /app.
    async fn source(&mut self) -> Result<(), Failure> {
        let (uid, gid) = (self.sandbox.uid, self.sandbox.gid);
        let owner = Some((uid, gid));
        let p = &self.paths;
        // Every directory and mount point, before any build code runs; `tmp`
        // is root's, so build code can add nothing to it (a mount point made
        // later, for a local buildpack named in .buildpacks, is as safe).
        let made = (|| -> std::io::Result<()> {
            mkdir(&p.root, 0o700, None)?;
            mkdir(&p.app, 0o755, owner)?;
            mkdir(&p.tmp, 0o755, None)?;
            mkdir(&p.tmp.join("cache"), 0o755, None)?;
            mkdir(&p.tmp.join("buildpacks"), 0o755, None)?;
            mkdir(&p.tmp.join(".app"), 0o755, None)?;
            mkdir(&p.tmp.join("env"), 0o700, owner)?;
            mkdir(&p.work, 0o700, owner)?;
            Ok(())
        })();
        made.map_err(|e| {
            fail(
                "source",
                format!("cannot make the build's directories: {e}"),
            )
        })?;
        // Which app this is (an app destroyed and made again under the same
        // name is another): its creation time, for the cache.
        let info = self
            .dep
            .api(
                "app.info",
                json!({"app": self.job.app}),
                Duration::from_secs(10),
            )
            .await
            .map_err(|e| fail("source", format!("cannot read the app: {e}")))?;
        let identity = format!("created_at {}", info["app"]["created_at"]);
        self.dep
            .app_cache(&self.job.app, uid, gid, &identity)
            .map_err(|e| fail("source", format!("cannot prepare the build cache: {e}")))?;

        // The app's config, for ENV_DIR.
        let state = self
            .dep
            .api(
                "app.state",
                json!({"app": self.job.app}),
                Duration::from_secs(10),
            )
            .await
            .map_err(|e| fail("source", format!("cannot read the app's config: {e}")))?;
        let app = &state["app"];
        // The newest config: a config change after a deploy makes a pending
        // release (of the deployed slug) that holds it.
        let config = [&app["pending"]["config"], &app["current"]["config"]]
            .into_iter()
            .find_map(|c| c.as_object())
            .cloned()
            .unwrap_or_default();
        for (k, v) in &config {
            let v = v.as_str().unwrap_or_default().to_string();
            self.config.insert(k.clone(), v);
        }
        let env = self.paths.tmp.join("env");
        for (k, v) in &self.config {
            if k.is_empty() || k.contains('/') || k.starts_with('.') {
                continue;
            }
            let f = env.join(k);
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&f)
                .and_then(|mut fh| {
                    std::io::Write::write_all(&mut fh, v.as_bytes())?;
                    std::os::unix::fs::fchown(&fh, Some(uid), Some(gid))
                })
                .map_err(|e| fail("source", format!("cannot write ENV_DIR: {e}")))?;
        }

        let tar = self.paths.tmp.join("source.tar");
        let got = tokio::time::timeout(
            self.left(),
            paddock_blob::get_file(self.dep.calls(), &self.job.source, &tar),
        )
        .await
        .map_err(|_| {
            fail(
                "source",
                "fetching the source ran past the build's time limit",
            )
        })?
        .map_err(|e| {
            fail(
                "source",
                format!(
                    "cannot fetch the pushed source {}: {}",
                    self.job.source,
                    paddock_daemon::chain(&e)
                ),
            )
        })?;
        let source = open_regular(&tar)
            .map_err(|e| fail("source", format!("cannot hand the source over: {e}")))?;
        let short: String = self.job.commit.chars().take(7).collect();
        self.log(format!(
            "-----> Building {} ({short}, {}) as {}",
            self.job.app,
            human(got),
            paddock_runner::users::user_name(&self.job.app)
        ));
        // The tar (root's) is the unpacking's stdin: build code never gets a
        // path the deployer writes to.
        let r = self
            .sandboxed_with(
                "source",
                "unpacking the source",
                &["/bin/bash", "/tmp/buildpacks/_paddock/unpack"],
                false,
                Some(source),
            )
            .await;
        let _ = std::fs::remove_file(&tar);
        r.map(|_| ())
    }

    /// The buildpacks to run: named by `.buildpacks` or `BUILDPACK_URL`, else the
    /// first built-in whose detect passes.
    async fn detect(&mut self) -> Result<Vec<Pack>, Failure> {
        let listed = read_tree_file(
            &self.paths.app.join(".buildpacks"),
            64 << 10,
            self.sandbox.uid,
        )
        .map_err(|e| fail("detect", e))?;
        let refs: Vec<BuildpackRef> = match (listed, self.config.get("BUILDPACK_URL")) {
            (Some(text), _) => procfile::parse_buildpacks_file(&text)
                .map_err(|e| fail("detect", format!(".buildpacks: {e}")))?,
            (None, Some(url)) if !url.trim().is_empty() => vec![procfile::parse_buildpack_ref(url)
                .map_err(|e| fail("detect", format!("BUILDPACK_URL: {e}")))?],
            _ => vec![],
        };
        if refs.len() > MAX_BUILDPACKS {
            return Err(fail(
                "detect",
                format!(
                    ".buildpacks names {} buildpacks; at most {MAX_BUILDPACKS} are allowed",
                    refs.len()
                ),
            ));
        }
        if refs.is_empty() {
            for b in procfile::BUILTINS {
                let dir = format!("{}/{b}", crate::buildpacks::MOUNTED);
                if let Some(label) = self.detect_one(&dir).await? {
                    self.log(format!("-----> {label} app detected"));
                    return Ok(vec![Pack { label, dir }]);
                }
            }
            return Err(fail(
                "detect",
                "no buildpack detected this app: add a Procfile, requirements.txt or \
                 pyproject.toml (Python), package.json (Node.js) or public/index.html \
                 (a static site), or name a buildpack in .buildpacks or BUILDPACK_URL",
            ));
        }
        let mut packs = Vec::new();
        for (n, r) in refs.iter().enumerate() {
            let dir = match r {
                BuildpackRef::Builtin(b) => format!("{}/{b}", crate::buildpacks::MOUNTED),
                BuildpackRef::Local(p) => {
                    let (uid, gid) = (self.sandbox.uid, self.sandbox.gid);
                    let allowed = self.dep.settings.local_buildpacks.clone();
                    let typed = p.clone();
                    // Resolved once and opened: the sandbox binds this fd.
                    let (dir, resolved) = tokio::task::spawn_blocking(move || {
                        let (dir, resolved) = crate::local::open(&typed, &allowed)?;
                        paddock_runner::users::check_readable_dir(&resolved, uid, gid)
                            .map_err(|e| e.to_string())?;
                        Ok::<_, String>((dir, resolved))
                    })
                    .await
                    .map_err(|e| fail("detect", e.to_string()))?
                    .map_err(|e| fail("detect", format!("buildpack {p}: {e}")))?;
                    // Seen read-only at /tmp/buildpack-local-N, a mount point in
                    // the build's root-owned tmp.
                    let name = format!("buildpack-local-{n}");
                    mkdir(&self.paths.tmp.join(&name), 0o755, None)
                        .map_err(|e| fail("detect", format!("cannot mount buildpack {p}: {e}")))?;
                    self.sandbox.local.push(crate::sandbox::LocalPack {
                        dir,
                        resolved: resolved.clone(),
                        name: name.clone(),
                    });
                    self.log(format!(
                        "       Using the buildpack at {}",
                        resolved.display()
                    ));
                    format!("/tmp/{name}")
                }
                BuildpackRef::Blob(sha) => {
                    // Only a blob recorded as a buildpack: any other (another
                    // app's source or slug) is not run, nor even fetched.
                    let list = self
                        .dep
                        .api("buildpack.list", json!({}), Duration::from_secs(10))
                        .await
                        .map_err(|e| fail("detect", format!("cannot list the buildpacks: {e}")))?;
                    let recorded = list["buildpacks"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .find(|b| {
                            let blob = b["blob"].as_str().unwrap_or_default();
                            blob.strip_prefix("sha256:")
                                .unwrap_or(blob)
                                .eq_ignore_ascii_case(sha)
                        });
                    let Some(b) = recorded else {
                        return Err(fail(
                            "detect",
                            format!(
                                "sha256:{sha} is not an uploaded buildpack (`paddock buildpacks` lists them; name one as paddock:NAME)"
                            ),
                        ));
                    };
                    self.log(format!(
                        "       Using the uploaded buildpack {}",
                        b["name"].as_str().unwrap_or_default()
                    ));
                    self.fetch_buildpack(n, sha).await?
                }
                BuildpackRef::Named(name) => {
                    let got = self
                        .dep
                        .api(
                            "buildpack.get",
                            json!({ "name": name }),
                            Duration::from_secs(10),
                        )
                        .await
                        .map_err(|e| fail("detect", format!("buildpack {name}: {e}")))?;
                    let blob = got["buildpack"]["blob"].as_str().unwrap_or_default();
                    let sha = blob.strip_prefix("sha256:").unwrap_or(blob).to_string();
                    self.log(format!("       Using the uploaded buildpack {name}"));
                    self.fetch_buildpack(n, &sha).await?
                }
            };
            let label = self.detect_one(&dir).await?.ok_or_else(|| {
                fail(
                    "detect",
                    format!("the buildpack {dir} does not detect this app (its bin/detect failed)"),
                )
            })?;
            self.log(format!("-----> {label} app detected"));
            packs.push(Pack { label, dir });
        }
        Ok(packs)
    }

    /// `bin/detect /app`: `Some(name)` when it passes.
    async fn detect_one(&self, dir: &str) -> Result<Option<String>, Failure> {
        let detect = format!("{dir}/bin/detect");
        let dep = self.dep.clone();
        let id = self.job.id.clone();
        let line = move |l: String| dep.push_line(&id, format!("       {l}"));
        let (ended, out) = self
            .sandbox
            .run(&[&detect, "/app"], self.deadline, true, &line)
            .await
            .map_err(|e| fail("detect", format!("cannot run {detect}: {e}")))?;
        match ended {
            Ended::Exit(0) => {
                let label = out.lines().next().unwrap_or("").trim().to_string();
                Ok(Some(if label.is_empty() {
                    "Buildpack".to_string()
                } else {
                    label
                }))
            }
            Ended::TimedOut => Err(fail(
                "detect",
                format!("{detect} ran past the build's time limit"),
            )),
            Ended::Disk | Ended::Files | Ended::Deep => {
                let what = if ended == Ended::Deep {
                    "a directory too deep to measure".to_string()
                } else if ended == Ended::Disk {
                    format!(
                        "more than {} MB of disk (build_disk_mb)",
                        self.dep.settings.build_disk_mb
                    )
                } else {
                    format!(
                        "more than {} files (build_inodes)",
                        self.dep.settings.build_inodes
                    )
                };
                Err(fail(
                    "detect",
                    format!("{detect} was stopped: the build used {what}"),
                ))
            }
            _ => Ok(None),
        }
    }

    /// An uploaded buildpack: its blob (a tar) unpacked at `/tmp/buildpack-N`.
    async fn fetch_buildpack(&self, n: usize, sha: &str) -> Result<String, Failure> {
        let tar = self.paths.tmp.join(format!("buildpack-{n}.tar"));
        paddock_blob::get_file(self.dep.calls(), sha, &tar)
            .await
            .map_err(|e| {
                fail(
                    "detect",
                    format!(
                        "cannot fetch buildpack sha256:{sha}: {}",
                        paddock_daemon::chain(&e)
                    ),
                )
            })?;
        // Root's, in root's tmp: the build reads it (tar needs a file to tell
        // its compression) but can neither change nor replace it.
        open_regular(&tar)
            .and_then(|f| f.set_permissions(std::fs::Permissions::from_mode(0o644)))
            .map_err(|e| fail("detect", e.to_string()))?;
        // Unpacked by the app's user into its scratch space.
        let dir = format!("/tmp/work/buildpack-{n}");
        let script = format!(
            "set -e; mkdir -p {dir}; tar -xf /tmp/buildpack-{n}.tar -C {dir} --no-same-owner; \
             if [ ! -d {dir}/bin ] && [ $(ls -A {dir} | wc -l) = 1 ]; then echo {dir}/$(ls -A {dir}); else echo {dir}; fi"
        );
        let out = self
            .sandboxed(
                "detect",
                "unpacking the buildpack",
                &["/bin/bash", "-c", &script],
                true,
            )
            .await;
        let _ = std::fs::remove_file(&tar);
        Ok(out?.trim().to_string())
    }

    /// The Procfile's types over the buildpacks' defaults; health checks from app.json.
    async fn process_types(
        &mut self,
        packs: &[Pack],
    ) -> Result<(Map<String, Value>, Option<Value>), Failure> {
        let mut defaults = BTreeMap::new();
        for p in packs {
            let release = format!("{}/bin/release", p.dir);
            let what = format!("the {} buildpack's bin/release", p.label);
            let yaml = self
                .sandboxed("process-types", &what, &[&release, "/app"], true)
                .await?;
            let d = procfile::parse_release_yaml(&yaml).map_err(|e| fail("process-types", e))?;
            defaults.extend(d);
        }
        let procfile = read_tree_file(
            &self.paths.app.join("Procfile"),
            256 << 10,
            self.sandbox.uid,
        )
        .map_err(|e| fail("process-types", e))?;
        let declared = match &procfile {
            Some(text) => procfile::parse_procfile(text).map_err(|e| fail("process-types", e))?,
            None => BTreeMap::new(),
        };
        self.log("-----> Discovering process types");
        if !declared.is_empty() {
            self.log(format!(
                "       Procfile declares types     -> {}",
                declared.keys().cloned().collect::<Vec<_>>().join(", ")
            ));
        }
        let defaulted: Vec<String> = defaults
            .keys()
            .filter(|k| !declared.contains_key(*k))
            .cloned()
            .collect();
        if !defaulted.is_empty() {
            self.log(format!(
                "       Default types for buildpack -> {}",
                defaulted.join(", ")
            ));
        }
        let mut types = Map::new();
        for (k, v) in defaults.into_iter().chain(declared) {
            types.insert(k, json!(v));
        }
        if types.is_empty() {
            return Err(fail(
                "process-types",
                "no process types: the app has no Procfile and its buildpack gives no default; \
                 add a Procfile such as `web: python app.py`",
            ));
        }
        let app_json =
            match read_tree_file(&self.paths.app.join("app.json"), 1 << 20, self.sandbox.uid)
                .map_err(|e| fail("process-types", e))?
            {
                Some(text) => Some(
                    serde_json::from_str::<Value>(&text)
                        .map_err(|e| fail("process-types", format!("app.json is not JSON: {e}")))?,
                ),
                None => None,
            };
        let healthchecks = app_json
            .as_ref()
            .and_then(|v| v.get("healthchecks").cloned());
        // `formation.TYPE.stop_after_disconnect` (seconds): the api checks the
        // values; Heroku's other formation keys (quantity, size) are not read.
        let mut scheduling = Map::new();
        if let Some(f) = app_json
            .as_ref()
            .and_then(|v| v.get("formation"))
            .and_then(Value::as_object)
        {
            for (t, v) in f {
                if let Some(n) = v.get("stop_after_disconnect") {
                    scheduling.insert(t.clone(), json!({ "stop_after_disconnect": n }));
                }
            }
        }
        self.scheduling = (!scheduling.is_empty()).then_some(Value::Object(scheduling));
        Ok((types, healthchecks))
    }

    /// The slug: compressed in the sandbox, then hashed and stored.
    async fn slug(&mut self) -> Result<(String, u64), Failure> {
        self.log("-----> Compressing the slug");
        // The tar is written beside the app (in /tmp/work): room for both.
        let limit = self.sandbox.max_disk_bytes;
        self.sandbox.max_disk_bytes = limit.saturating_mul(2);
        let r = self
            .sandboxed(
                "slug",
                "compressing the slug",
                &["/bin/bash", "/tmp/buildpacks/_paddock/slug"],
                false,
            )
            .await;
        self.sandbox.max_disk_bytes = limit;
        r?;
        // Nothing of the build runs any more (its cgroup was killed), and the
        // build's directories are root's: the file is what the build left. It is
        // compressed here, hashing the compressed bytes as they are written.
        let tar = self.paths.work.join("slug.tar");
        let path = self.paths.tmp.join("slug.tar.zst");
        let p = path.clone();
        let uid = self.sandbox.uid;
        let s = &self.dep.settings;
        let (max_tar, max_slug) = (s.build_disk_mb << 20, s.max_slug_mb << 20);
        let (sha, size) =
            tokio::task::spawn_blocking(move || compress(&tar, &p, uid, max_tar, max_slug))
                .await
                .map_err(|e| fail("slug", e.to_string()))?
                .map_err(|e| fail("slug", paddock_daemon::chain(&e)))?;
        self.log(format!("       Done: {}", human(size)));
        let stored =
            tokio::time::timeout(self.left(), paddock_blob::put_file(self.dep.calls(), &path))
                .await
                .map_err(|_| fail("slug", "storing the slug ran past the build's time limit"))?
                .map_err(|e| {
                    fail(
                        "slug",
                        format!("cannot store the slug: {}", paddock_daemon::chain(&e)),
                    )
                })?;
        if stored.sha256 != sha {
            return Err(fail(
                "slug",
                format!(
                    "the blobstore stored the slug as {} but it hashes to {sha}",
                    stored.sha256
                ),
            ));
        }
        Ok((sha, size))
    }

    /// The `release` process type, once, as a one-off of the new release on a
    /// runner (no PTY); its output goes to the build log.
    async fn release_phase(&self, sha: &str, version: i64, command: &str) -> Result<(), Failure> {
        self.log(format!("-----> Running the release command: {command}"));
        let calls = self.dep.calls();
        let runner = calls
            .find("runner")
            .await
            .map_err(|e| fail("release-phase", format!("cannot find a runner: {e}")))?;
        let started = calls
            .call(
                &runner[0],
                "run.start",
                json!({"app": self.job.app, "release": {"slug": sha, "version": version},
                       "command": command, "pty": false}),
                Duration::from_secs(60),
            )
            .await
            .map_err(|e| {
                fail(
                    "release-phase",
                    format!("the runner did not start the release command: {e}"),
                )
            })?;
        let id = started["id"].as_str().unwrap_or_default().to_string();
        let limit = Instant::now() + self.dep.settings.release_timeout;
        let deadline = limit.min(self.deadline);
        let mut offset = 0u64;
        let mut lines = crate::sandbox::LineSplitter::default();
        let mut emit = |l: String| self.log(format!("       {l}"));
        loop {
            if Instant::now() >= deadline {
                let _ = calls
                    .call(
                        &runner[0],
                        "run.kill",
                        json!({"id": id}),
                        Duration::from_secs(5),
                    )
                    .await;
                return Err(fail(
                    "release-phase",
                    "the release command ran past its time limit and was killed",
                ));
            }
            let out = calls
                .call(
                    &runner[0],
                    "run.output",
                    json!({"id": id, "offset": offset, "wait_ms": 20_000}),
                    Duration::from_secs(30),
                )
                .await
                .map_err(|e| {
                    fail(
                        "release-phase",
                        format!("lost the release command's output: {e}"),
                    )
                })?;
            let data = base64::engine::general_purpose::STANDARD
                .decode(out["data"].as_str().unwrap_or_default())
                .unwrap_or_default();
            lines.feed(&data, &mut emit);
            offset = out["next_offset"].as_u64().unwrap_or(offset);
            if out["done"].as_bool() == Some(true) {
                lines.finish(&mut emit);
                let code = out["exit_code"].as_i64().unwrap_or(-1);
                if code != 0 {
                    return Err(fail(
                        "release-phase",
                        format!("the release command `{command}` exited with status {code}"),
                    ));
                }
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tree_files_must_be_the_apps_own_with_one_link() {
        let d = std::env::temp_dir().join(format!("paddock-tree-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        let me = nix::unistd::geteuid().as_raw();
        let p = d.join("Procfile");
        std::fs::write(&p, "web: true\n").unwrap();
        assert_eq!(
            read_tree_file(&p, 100, me).unwrap().as_deref(),
            Some("web: true\n")
        );
        assert_eq!(read_tree_file(&d.join("missing"), 100, me), Ok(None));
        // Another user's file (on a host without protected_hardlinks, a link
        // to /etc/shadow would be root's).
        let e = read_tree_file(&p, 100, me + 1).unwrap_err();
        assert!(
            e.contains("Procfile is refused: it is not the app's own"),
            "{e}"
        );
        // Two links.
        std::fs::hard_link(&p, d.join("Procfile2")).unwrap();
        let e = read_tree_file(&p, 100, me).unwrap_err();
        assert!(
            e.contains("Procfile is refused: it has 2 hard links"),
            "{e}"
        );
        // A symlink, even to a good file.
        std::fs::remove_file(d.join("Procfile2")).unwrap();
        std::os::unix::fs::symlink(&p, d.join("app.json")).unwrap();
        let e = read_tree_file(&d.join("app.json"), 100, me).unwrap_err();
        assert!(e.contains("app.json is refused: it is a symlink"), "{e}");
        // A directory.
        std::fs::create_dir(d.join(".buildpacks")).unwrap();
        let e = read_tree_file(&d.join(".buildpacks"), 100, me).unwrap_err();
        assert!(e.contains("not a regular file"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
