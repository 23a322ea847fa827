//! Finding a process to stop without trusting "a number in a file": the kernel
//! recycles pids, so a pid file left by a dead process can name a stranger.
//!
//! A daemon's pid file is a flock held for its whole life (`paddock-daemon` takes it
//! before binding anything). [`lock_holder`] only answers a process when the lock is
//! still held *and* the process named in the file has that very file open; a file
//! nobody holds is stale and is removed. Processes that hold no lock (an instance
//! shim, a PostgreSQL postmaster) are matched by their command line instead
//! ([`matching`]). Either way the answer is a [`Proc`]: a pidfd opened *before* the
//! checks, so a signal sent through it reaches the checked process or nobody.

use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

/// A live process, held by a pidfd: signals through it cannot reach a process that
/// later got the same pid.
#[derive(Debug)]
pub struct Proc {
    pid: i32,
    fd: OwnedFd,
}

impl Proc {
    /// Opens a pidfd for `pid`; `None` when no such process exists.
    pub fn open(pid: i32) -> Option<Proc> {
        if pid <= 0 {
            return None;
        }
        // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor
        // (close-on-exec by definition) or -1; no memory is passed.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if fd < 0 {
            return None;
        }
        // SAFETY: the kernel just returned this descriptor to us; we own it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        Some(Proc { pid, fd })
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Sends `sig` to this process (never to a later holder of its pid).
    pub fn signal(&self, sig: Signal) -> io::Result<()> {
        // SAFETY: pidfd_send_signal on a descriptor we own, with no siginfo.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.fd.as_raw_fd(),
                sig as i32,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// Whether the process has ended (a zombie counts as ended).
    pub fn exited(&self) -> bool {
        self.wait_exit(Duration::ZERO)
    }

    /// Waits up to `timeout` for the process to end; true once it has.
    pub fn wait_exit(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let mut pfd = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = left.as_millis().min(i32::MAX as u128) as i32;
            // SAFETY: poll on one pollfd we own for the duration of the call.
            let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
            if rc > 0 {
                return true;
            }
            if rc == 0 || Instant::now() >= deadline {
                return false;
            }
            // EINTR: poll again for the time that is left.
        }
    }

    /// `sig`, then SIGKILL for whatever still runs after `grace`.
    pub fn stop(&self, sig: Signal, grace: Duration) {
        stop_all(std::slice::from_ref(self), sig, grace);
    }
}

/// Sends `sig` to each, waits up to `grace` for all to end, then SIGKILLs the rest.
pub fn stop_all(procs: &[Proc], sig: Signal, grace: Duration) {
    for p in procs {
        let _ = p.signal(sig);
    }
    let deadline = Instant::now() + grace;
    for p in procs {
        p.wait_exit(deadline.saturating_duration_since(Instant::now()));
    }
    for p in procs {
        if !p.exited() {
            let _ = p.signal(Signal::SIGKILL);
        }
    }
}

/// The process holding the flock on pid file `path`, or `None`.
///
/// `None` when the file is missing, or when nobody holds its lock (the file is then
/// stale and is removed), or when the number in it is not a process that has this
/// file open (a holder still writing its pid, or something odd: never guess).
/// (A caller holding the lock itself is answered as the holder: ask about others'
/// pid files only.)
pub fn lock_holder(path: &Path) -> io::Result<Option<Proc>> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let f = match fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    // A shared try-lock fails only while someone holds the exclusive lock.
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) } == 0 {
        // Nobody holds it: stale. Removed while we hold the lock, so a starting
        // daemon either sees our lock (and refuses) or a fresh file.
        let _ = fs::remove_file(path);
        return Ok(None);
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
        return Err(err);
    }
    let me = f.metadata()?;
    // The holder writes its pid right after taking the lock: give it a moment.
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        if let Some(p) = read_pid(path).and_then(Proc::open) {
            if has_open(p.pid, me.dev(), me.ino()) {
                return Ok(Some(p));
            }
        }
        if Instant::now() > deadline {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The process named by plain pid file `path` (its first line) if its command line
/// passes `expected`. A file naming no such process is removed.
pub fn matching(path: &Path, expected: impl Fn(&[String]) -> bool) -> Option<Proc> {
    let pid = read_pid(path)?;
    // Opened before the check: the checked process is the one signalled.
    let found = Proc::open(pid).filter(|p| !p.exited() && expected(&cmdline(p.pid)));
    if found.is_none() {
        let _ = fs::remove_file(path);
    }
    found
}

/// The first line of a pid file as a pid.
pub fn read_pid(path: &Path) -> Option<i32> {
    fs::read_to_string(path)
        .ok()?
        .lines()
        .next()?
        .trim()
        .parse()
        .ok()
        .filter(|p| *p > 0)
}

/// A process's argv (empty when it is gone or a kernel thread).
pub fn cmdline(pid: i32) -> Vec<String> {
    fs::read(format!("/proc/{pid}/cmdline"))
        .unwrap_or_default()
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

/// Whether process `pid` has a descriptor open on the file `dev`/`ino`.
fn has_open(pid: i32, dev: u64, ino: u64) -> bool {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| {
            fs::metadata(e.path())
                .map(|m| m.dev() == dev && m.ino() == ino)
                .unwrap_or(false)
        })
}

/// Takes the exclusive flock on `path` (created 0600 when missing) and writes our
/// pid into it: the pid file [`lock_holder`] trusts. `Ok(None)` when another
/// process holds it. The returned file holds the lock until dropped.
pub fn lock_own(path: &Path) -> io::Result<Option<fs::File>> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        // A symlink planted at the path is refused, never followed and truncated.
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Ok(None);
        }
        return Err(err);
    }
    f.set_len(0)?;
    writeln!(f, "{}", std::process::id())?;
    Ok(Some(f))
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_symlink_at_a_pid_file_path_is_refused_not_followed() {
        let t = tempfile::tempdir().unwrap();
        let target = t.path().join("important");
        fs::write(&target, "IMPORTANT CONTENT").unwrap();
        let link = t.path().join("dev.lock");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(lock_own(&link).is_err());
        assert_eq!(fs::read_to_string(&target).unwrap(), "IMPORTANT CONTENT");
    }
    use super::*;
    use std::process::{Command, Stdio};

    fn sleeper() -> std::process::Child {
        Command::new("sleep")
            .arg("60")
            .stdin(Stdio::null())
            .spawn()
            .unwrap()
    }

    fn still_sleeping(c: &mut std::process::Child) -> bool {
        c.try_wait().unwrap().is_none()
    }

    #[test]
    fn a_stale_pid_file_naming_a_live_stranger_is_removed_not_signalled() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("locker.pid");
        let mut stranger = sleeper();
        fs::write(&path, format!("{}\n", stranger.id())).unwrap();
        assert!(lock_holder(&path).unwrap().is_none());
        assert!(!path.exists(), "the stale file is removed");
        assert!(still_sleeping(&mut stranger));
        let _ = stranger.kill();
        let _ = stranger.wait();
    }

    #[test]
    fn a_locked_file_whose_number_is_a_stranger_is_not_trusted() {
        // Locked (by us) but naming a process that does not have the file open:
        // the number may be left over from before the holder wrote its own.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("locker.pid");
        let _held = lock_own(&path).unwrap().unwrap();
        let mut stranger = sleeper();
        fs::write(&path, format!("{}\n", stranger.id())).unwrap();
        assert!(lock_holder(&path).unwrap().is_none());
        assert!(still_sleeping(&mut stranger));
        let _ = stranger.kill();
        let _ = stranger.wait();
    }

    #[test]
    fn the_holder_of_a_locked_pid_file_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("locker.pid");
        let _held = lock_own(&path).unwrap().unwrap();
        let p = lock_holder(&path).unwrap().expect("the holder");
        assert_eq!(p.pid(), std::process::id() as i32);
        assert!(lock_own(&path).unwrap().is_none(), "one holder at a time");
    }

    #[test]
    fn a_plain_pid_file_is_trusted_only_for_a_matching_command_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shim.pid");
        let mut stranger = sleeper();
        // `spawn` returns once exec has begun (the close-on-exec pipe closed), but
        // the new program's argv is set up a little later: until then
        // /proc/PID/cmdline reads empty (seen in full runs: "not matched: []"
        // with the `sleep` alive). Wait for the exec to finish.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while cmdline(stranger.id() as i32).is_empty() {
            assert!(std::time::Instant::now() < deadline, "sleep never exec'd");
            std::thread::sleep(Duration::from_millis(1));
        }
        fs::write(&path, stranger.id().to_string()).unwrap();
        assert!(matching(&path, |argv| argv
            .iter()
            .any(|a| a.contains("paddock-shim")))
        .is_none());
        assert!(!path.exists());
        assert!(still_sleeping(&mut stranger));
        fs::write(&path, stranger.id().to_string()).unwrap();
        let p = matching(&path, |argv| argv.first().is_some_and(|a| a == "sleep")).unwrap_or_else(
            || {
                panic!(
                    "not matched: {:?}; the stranger: {:?}",
                    cmdline(stranger.id() as i32),
                    stranger.try_wait()
                )
            },
        );
        p.stop(Signal::SIGTERM, Duration::from_secs(5));
        assert!(p.exited());
        let _ = stranger.wait();
    }
}
