//! What every app process goes through between fork and exec, shared by the shim
//! (instances) and the PTY relay (one-offs): cgroups joined, rlimits, umask,
//! privileges dropped (and checked), the app's `dir` entered as the app's user,
//! signals back to their defaults, and no inherited fd above stdio.
//!
//! Everything here runs in a forked child of a possibly multi-threaded process
//! (the runner), so it only makes async-signal-safe syscalls on memory prepared
//! before the fork: no allocation, no locks.

use std::ffi::{CStr, CString};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// What the child needs, prepared (allocated) before the fork.
pub struct Prepared {
    /// `cgroup.procs` files to join; writing `0` moves the writer itself.
    pub cgroup_procs: Vec<CString>,
    pub uid: u32,
    pub gid: u32,
    pub nofile: u64,
    pub nproc: Option<u64>,
    pub dir: CString,
    /// Where the app's files appear at [`APP_ROOT`], in a mount namespace of the
    /// child's own; `None` leaves the child in its parent's namespace.
    pub mount: Option<AppMount>,
}

/// The one path every build and every release instance sees its app at, on any
/// node, so absolute paths baked into a slug (a venv's scripts) keep working.
pub const APP_ROOT: &str = "/app";

/// How the app's files are put at `/app` in the child's private mount namespace.
pub enum AppMount {
    /// `src` bind-mounted at `/app`: a build's working tree (writable by the build).
    Bind { src: CString },
    /// An overlay of a read-only unpacked slug (`lower`) and a per-start writable
    /// layer (`upper`, `work` on the same filesystem): the instance may write to
    /// `/app`, and a fresh `upper` at each start throws those writes away.
    Overlay { options: CString },
}

impl AppMount {
    pub fn bind(src: &Path) -> std::io::Result<AppMount> {
        Ok(AppMount::Bind { src: cstring(src)? })
    }

    pub fn overlay(lower: &Path, upper: &Path, work: &Path) -> std::io::Result<AppMount> {
        for p in [lower, upper, work] {
            // overlayfs splits its options on ',' and ':' and has no escape for them.
            let s = p.as_os_str().as_bytes();
            if s.iter().any(|b| matches!(b, b',' | b':' | b'\\' | 0)) {
                return Err(std::io::Error::other(format!(
                    "{} cannot be an overlay layer (it holds ',', ':' or '\\')",
                    p.display()
                )));
            }
        }
        let options = format!(
            "lowerdir={},upperdir={},workdir={}",
            lower.display(),
            upper.display(),
            work.display()
        );
        Ok(AppMount::Overlay {
            options: CString::new(options).map_err(std::io::Error::other)?,
        })
    }

    /// In the child, still as root: a mount namespace of its own in which nothing
    /// propagates back to the host, then the app's files at `/app`.
    fn apply(&self) -> std::io::Result<()> {
        let target = c"/app";
        private_mount_namespace()?;
        // SAFETY: mount with NUL-terminated strings prepared before the fork (or
        // static); it only makes a syscall.
        unsafe {
            let r = match self {
                AppMount::Bind { src } => libc::mount(
                    src.as_ptr(),
                    target.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND | libc::MS_REC,
                    std::ptr::null(),
                ),
                AppMount::Overlay { options } => libc::mount(
                    c"overlay".as_ptr(),
                    target.as_ptr(),
                    c"overlay".as_ptr(),
                    libc::MS_NOSUID | libc::MS_NODEV,
                    options.as_ptr().cast(),
                ),
            };
            if r != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    }
}

/// In a forked child, still as root: a mount namespace of its own from which
/// nothing propagates back to the host (every mount below `/` made private).
pub fn private_mount_namespace() -> std::io::Result<()> {
    // SAFETY: unshare and mount with static strings; they only make syscalls.
    unsafe {
        if libc::unshare(libc::CLONE_NEWNS) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Makes the empty, root-owned `/app` that mounts go on, once per host.
pub fn ensure_app_root() -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::DirBuilder::new().mode(0o755).create(APP_ROOT) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

pub fn cstring(p: &Path) -> std::io::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::other(format!("{} holds a NUL byte", p.display())))
}

impl Prepared {
    pub fn new(
        cgroup_procs: &[std::path::PathBuf],
        uid: u32,
        gid: u32,
        nofile: u64,
        nproc: Option<u64>,
        dir: &Path,
    ) -> std::io::Result<Prepared> {
        if uid == 0 || gid == 0 {
            return Err(std::io::Error::other("refusing to run an app as root"));
        }
        Ok(Prepared {
            cgroup_procs: cgroup_procs
                .iter()
                .map(|p| cstring(p))
                .collect::<Result<_, _>>()?,
            uid,
            gid,
            nofile,
            nproc,
            dir: cstring(dir)?,
            mount: None,
        })
    }

    /// The child's files at `/app` (see [`AppMount`]); `dir` should then be inside `/app`.
    pub fn with_mount(mut self, mount: AppMount) -> Prepared {
        self.mount = Some(mount);
        self
    }

    /// Runs in the child, after fork, before exec. The caller has made the child a
    /// session leader (and given it its terminal) already when it wants that.
    pub fn apply(&self) -> std::io::Result<()> {
        // First, while RLIMIT_NOFILE is still the parent's: the fallback sweep of
        // older kernels reaches every fd the parent could have open.
        cloexec_from(3);
        for p in &self.cgroup_procs {
            join_cgroup(p)?;
        }
        use nix::sys::resource::{setrlimit, Resource};
        setrlimit(Resource::RLIMIT_NOFILE, self.nofile, self.nofile)?;
        setrlimit(Resource::RLIMIT_CORE, 0, 0)?;
        if let Some(n) = self.nproc {
            setrlimit(Resource::RLIMIT_NPROC, n, n)?;
        }
        if let Some(m) = &self.mount {
            m.apply()?;
        }
        // SAFETY: umask cannot fail.
        unsafe { libc::umask(0o077) };
        drop_privileges(self.uid, self.gid)?;
        // Entered as the app's user, never as root: a `dir` the app may not enter
        // (or one swapped for a root-only place after the check) is refused here.
        // SAFETY: a NUL-terminated path prepared before the fork.
        if unsafe { libc::chdir(self.dir.as_ptr()) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        reset_signals()?;
        Ok(())
    }
}

/// Moves the calling process into a cgroup (`0` names the writer).
fn join_cgroup(procs: &CStr) -> std::io::Result<()> {
    // SAFETY: open/write/close on a NUL-terminated path and a static buffer.
    unsafe {
        let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let n = libc::write(fd, b"0".as_ptr().cast(), 1);
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        if n != 1 {
            return Err(err);
        }
    }
    Ok(())
}

/// setgroups, setgid, setuid, then a check that no way back to root is left.
pub fn drop_privileges(uid: u32, gid: u32) -> std::io::Result<()> {
    // EPERM, not a message: building one would allocate after fork (the parent
    // refuses uid/gid 0 with a message in `Prepared::new`).
    let refuse = || std::io::Error::from_raw_os_error(libc::EPERM);
    if uid == 0 || gid == 0 {
        return Err(refuse());
    }
    let g = nix::unistd::Gid::from_raw(gid);
    nix::unistd::setgroups(&[g])?;
    nix::unistd::setgid(g)?;
    nix::unistd::setuid(nix::unistd::Uid::from_raw(uid))?;
    if nix::unistd::geteuid().is_root()
        || nix::unistd::getegid().as_raw() == 0
        || nix::unistd::setuid(nix::unistd::Uid::from_raw(0)).is_ok()
    {
        return Err(refuse());
    }
    Ok(())
}

/// Every signal back to its default action and none blocked: the shim blocks the
/// signals it reads from a signalfd and ignores SIGPIPE, and both would otherwise
/// be inherited through fork and exec (an app that never sees SIGTERM can only be
/// SIGKILLed).
pub fn reset_signals() -> std::io::Result<()> {
    // The kernel's own sigaction (handler, flags, restorer, mask: all zero is
    // SIG_DFL with nothing masked) through the raw syscall: the C library's
    // wrapper refuses the signals it reserves for itself (32 and 33), and those
    // are inherited like any other.
    let dfl = [0u64; 4];
    for sig in 1..=64 {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        // SAFETY: rt_sigaction with a valid, zeroed kernel sigaction and no old
        // action; an invalid number only returns EINVAL.
        unsafe {
            libc::syscall(
                libc::SYS_rt_sigaction,
                sig,
                dfl.as_ptr(),
                std::ptr::null_mut::<u64>(),
                8usize,
            )
        };
    }
    let empty = 0u64;
    // SAFETY: rt_sigprocmask with an empty 64-bit set we own.
    let r = unsafe {
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK,
            &empty as *const u64,
            std::ptr::null_mut::<u64>(),
            8usize,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Marks every fd from `first` up close-on-exec, so the app inherits nothing but
/// its stdio, whatever its parent had open. close-on-exec rather than close: the
/// standard library's exec-error pipe must stay usable until the exec itself.
pub fn cloexec_from(first: u32) {
    // SAFETY: close_range with CLOSE_RANGE_CLOEXEC only sets flags.
    let r = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            first,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    if r == 0 {
        return;
    }
    // Older kernels (< 5.11): one fcntl per possible fd.
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills a struct we own; fcntl on any number is harmless.
    unsafe {
        let max = if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur.min(1 << 20) as i32
        } else {
            1024
        };
        for fd in first as i32..max {
            libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
        }
    }
}
