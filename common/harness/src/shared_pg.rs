//! One throwaway PostgreSQL for a whole test run, a database per test.
//!
//! initdb and a server start cost a second or two; most tests only need an empty
//! database of their own. Under nextest every test is its own process, so "shared"
//! must outlive one test: the server belongs to the *run*. The first test of a run
//! takes a flock on `$TMPDIR/paddock-pg-<key>/lock`, finds no keeper there and starts
//! one (`paddock-test-pg`, in its own session); later tests find it through the
//! keeper's flock'd pid file and only create a database (`CREATE DATABASE`, a few
//! tens of milliseconds).
//!
//! The key is nextest's `NEXTEST_RUN_ID`, and the keeper watches nextest itself (the
//! test process's parent) through a pidfd: when the run ends, however it ends, the
//! keeper stops PostgreSQL and removes the directory. Without nextest (`cargo
//! test`, one process per test binary) the key is the test process and the keeper
//! watches it. Nothing has to remember to clean up, and no postgres outlives a run.
//!
//! Tests that stop, crash, reconfigure or replicate PostgreSQL must not use this:
//! they make a private server with [`PgCluster::init`] as before.

use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::{pidfile, PgCluster, PgOptions};

/// The keeper binary, built with the workspace's binaries.
pub const KEEPER: &str = "paddock-test-pg";

/// The run's shared server: where it is and how to reach it.
#[derive(Debug, Clone)]
pub struct SharedPg {
    pub cluster: PgCluster,
    /// The server's log (shared by every test of the run).
    pub log: PathBuf,
}

static SHARED: Mutex<Option<SharedPg>> = Mutex::new(None);

/// The run's shared server, started by the first caller of the run.
pub fn server() -> Result<SharedPg> {
    let mut slot = SHARED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(s) = slot.as_ref() {
        return Ok(s.clone());
    }
    let (key, watch) = match std::env::var("NEXTEST_RUN_ID") {
        Ok(run) => (format!("run-{}", sanitize(&run)), nix::unistd::getppid()),
        Err(_) => (format!("pid-{}", std::process::id()), nix::unistd::getpid()),
    };
    let dir = base_dir().join(format!("paddock-pg-{key}"));
    let s = attach_or_start(&dir, watch.as_raw())?;
    *slot = Some(s.clone());
    Ok(s)
}

/// Where runs' servers live: `$PADDOCK_TEST_PG_DIR` (ops/test.sh makes one per
/// invocation and checks it is empty at the end), else the temp dir.
pub fn base_dir() -> PathBuf {
    std::env::var_os("PADDOCK_TEST_PG_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir)
}

/// Stops every keeper still serving under `base` (each normally stops by itself
/// when its run ends): SIGTERM through its flock'd pid file, then waits for it to
/// remove its directory. Returns how many were running.
pub fn stop_keepers(base: &Path) -> Result<usize> {
    let mut keepers = Vec::new();
    for e in fs::read_dir(base)?.flatten() {
        if let Some(p) = pidfile::lock_holder(&e.path().join("keeper.pid"))? {
            let _ = p.signal(nix::sys::signal::Signal::SIGTERM);
            keepers.push(p);
        }
    }
    for p in &keepers {
        if !p.wait_exit(Duration::from_secs(20)) {
            let _ = p.signal(nix::sys::signal::Signal::SIGKILL);
        }
    }
    Ok(keepers.len())
}

fn sanitize(s: &str) -> String {
    s.chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
        .take(64)
        .collect()
}

/// Makes `dir` (0700), or checks that an existing one is ours and not a symlink:
/// it sits in a world-writable temp dir.
fn own_dir(dir: &Path) -> Result<()> {
    match fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => return Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e).with_context(|| format!("cannot create {}", dir.display())),
    }
    let m = fs::symlink_metadata(dir)?;
    if !m.file_type().is_dir() || m.uid() != nix::unistd::geteuid().as_raw() {
        bail!(
            "{} exists but is not a directory of ours: remove it and run again",
            dir.display()
        );
    }
    Ok(())
}

/// Under the run's lock: the running keeper's server, or a new keeper's.
pub fn attach_or_start(dir: &Path, watch: i32) -> Result<SharedPg> {
    own_dir(dir)?;
    // 0600 and never through a symlink: nobody else may flock it (and so hang
    // every test of the run).
    let lock = {
        use std::os::unix::fs::OpenOptionsExt;
        fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(dir.join("lock"))?
    };
    // Blocking: tests of the run starting together queue here while one starts
    // the server. SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(io::Error::last_os_error()).context("locking the shared PostgreSQL");
    }
    let ready = dir.join("ready");
    let log = dir.join("keeper.log");
    if pidfile::lock_holder(&dir.join("keeper.pid"))?.is_none() {
        // No keeper (first test of the run, or the last one died): start one.
        let _ = fs::remove_file(&ready);
        let _ = fs::remove_dir_all(dir.join("pg"));
        let logf = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let mut cmd = Command::new(crate::bin(KEEPER)?);
        cmd.arg("--dir")
            .arg(dir)
            .arg("--watch")
            .arg(watch.to_string())
            .stdin(Stdio::null())
            .stdout(logf.try_clone()?)
            .stderr(logf);
        // Its own session: it serves later tests, so a signal to this test's
        // process group (nextest's timeout) must not reach it.
        // SAFETY: setsid is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                nix::unistd::setsid()?;
                Ok(())
            });
        }
        let mut child = cmd.spawn().with_context(|| format!("starting {KEEPER}"))?;
        let deadline = Instant::now() + Duration::from_secs(60);
        while !ready.exists() {
            if let Some(st) = child.try_wait()? {
                bail!(
                    "{KEEPER} exited ({st}) before PostgreSQL was ready; see {}",
                    log.display()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "the shared PostgreSQL was not ready within 60 s; see {}",
                    log.display()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let port: u16 = fs::read_to_string(&ready)
        .with_context(|| format!("no shared PostgreSQL is ready in {}", dir.display()))?
        .trim()
        .parse()
        .context("the shared PostgreSQL's ready file")?;
    let cluster = PgCluster::init(
        dir,
        &PgOptions {
            fast: true,
            port: Some(port),
        },
    )?;
    Ok(SharedPg {
        cluster,
        log: dir.join("postgres.log"),
    })
}

impl SharedPg {
    /// Creates database `name`, which must not exist yet (a name is one test's).
    pub fn create_db(&self, name: &str) -> Result<String> {
        self.psql(
            &format!("CREATE DATABASE \"{name}\""),
            &format!("CREATE DATABASE {name}"),
        )?;
        Ok(self.cluster.url(name))
    }

    /// Drops database `name`, closing whatever is still connected to it.
    pub fn drop_db(&self, name: &str) -> Result<()> {
        self.psql(
            &format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"),
            &format!("DROP DATABASE {name}"),
        )
    }

    /// Runs one statement as `paddock` on the `postgres` database; `what` names it
    /// in the error.
    fn psql(&self, sql: &str, what: &str) -> Result<()> {
        let out = self
            .cluster
            .command("psql")
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1"])
            .args(["-h", "127.0.0.1", "-U", "paddock", "-d", "postgres"])
            .arg("-p")
            .arg(self.cluster.port.to_string())
            .arg("-c")
            .arg(sql)
            .env("PGPASSWORD", &self.cluster.password)
            .stdin(Stdio::null())
            .output()
            .context("running psql")?;
        crate::check_output(what, &out)
    }
}

/// A database name unique in the run: `t_<random>_<what>` (lower case, at most 63
/// bytes, only `[a-z0-9_]`).
pub fn unique_db_name(what: &str) -> String {
    let tag: String = what
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .take(40)
        .collect();
    format!("t_{:012x}_{tag}", rand::random::<u64>() & 0xffff_ffff_ffff)
}

/// The keeper's body: serves PostgreSQL under `dir` until process `watch` ends
/// (or SIGTERM/SIGINT), then stops it and removes `dir`. Returns the exit code.
pub fn keep(dir: &Path, watch: i32) -> Result<i32> {
    let Some(_me) = pidfile::lock_own(&dir.join("keeper.pid"))? else {
        eprintln!("another {KEEPER} serves {}", dir.display());
        return Ok(0);
    };
    let Some(watched) = pidfile::Proc::open(watch) else {
        eprintln!("process {watch} is gone already; nothing to serve");
        let _ = fs::remove_dir_all(dir);
        return Ok(0);
    };
    install_stop_handlers()?;
    let pg = PgCluster::init(
        dir,
        &PgOptions {
            fast: true,
            port: None,
        },
    )?;
    let mut child = pg.start(&dir.join("postgres.log"))?;
    // Written whole, then renamed: a reader never sees half a port.
    let tmp = dir.join("ready.tmp");
    fs::write(&tmp, format!("{}\n", pg.port))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o600))?;
    fs::rename(&tmp, dir.join("ready"))?;
    eprintln!(
        "PostgreSQL on 127.0.0.1:{} for process {watch}'s run",
        pg.port
    );
    let code = loop {
        if watched.wait_exit(Duration::from_millis(200)) {
            eprintln!("process {watch} ended: stopping PostgreSQL");
            break 0;
        }
        if STOP.load(std::sync::atomic::Ordering::SeqCst) {
            eprintln!("asked to stop: stopping PostgreSQL");
            break 0;
        }
        if let Some(st) = child.try_wait()? {
            eprintln!("PostgreSQL exited by itself ({st})");
            break 1;
        }
    };
    let _ = fs::remove_file(dir.join("ready"));
    crate::stop_postgres(
        &mut child,
        nix::sys::signal::Signal::SIGINT,
        Duration::from_secs(10),
    );
    fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    Ok(code)
}

static STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_stop(_: i32) {
    STOP.store(true, std::sync::atomic::Ordering::SeqCst);
}

fn install_stop_handlers() -> Result<()> {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    let action = SigAction::new(
        SigHandler::Handler(on_stop),
        SaFlags::empty(),
        SigSet::empty(),
    );
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        // SAFETY: the handler only stores to an atomic.
        unsafe { sigaction(s, &action) }?;
    }
    Ok(())
}
