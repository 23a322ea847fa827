//! Where build code runs: as the app's own user, in the build's cgroups, in a
//! mount namespace of its own where the build tree is `/app` and a private
//! `/tmp` (root's, read-only to the build) holds the app's cache (`/tmp/cache`),
//! its config (`/tmp/env`), the build's scratch space (`/tmp/work`, `$TMPDIR`)
//! and the built-in buildpacks (`/tmp/buildpacks`, read-only); `/var/tmp` and
//! `/dev/shm` are small private tmpfs and `/proc` shows only the app user's
//! own processes (hidepid=2); `/run/lock` and `/var/lock` (where they are
//! directories) are small private tmpfs too, and the build has an IPC
//! namespace of its own (System V shm, semaphores and message queues, POSIX
//! message queues: none shared with other builds or the host, all gone with
//! the build). Every mount the sandbox makes is nosuid and nodev, the
//! child has no_new_privs (a setuid binary does not elevate), RLIMIT_FSIZE
//! caps any file it writes and it dies with the deployer (PR_SET_PDEATHSIG).
//! The runner's [`paddock_runner::child::Prepared`] does the rest: cgroups
//! joined, rlimits, `/app` mounted, privileges dropped (and checked), no fd
//! above stdio. While build code runs, a watchdog measures the build's trees
//! (`/app`, `/tmp/work`, the cache) every second and at the end of each
//! command ([`measure`]), and kills the build when they hold more than
//! `max_disk_bytes` or `max_entries` ([`Ended::Disk`], [`Ended::Files`]).
//!
//! The build's output is read through a fixed buffer and cut into lines of at
//! most [`MAX_LINE`] bytes ([`LineSplitter`]), with control characters made
//! visible ([`clean_line`]): a line without a newline costs no memory, and no
//! NUL or terminal escape reaches the database or the pusher.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Instant;

use paddock_runner::cgroup::InstanceCgroup;
use paddock_runner::child::{self, AppMount, Prepared};
use tokio::io::AsyncReadExt;

/// Longest log line kept (bytes of output); the rest of a longer line is cut.
pub const MAX_LINE: usize = 4096;

/// Output bytes as one log line: invalid UTF-8 replaced, a trailing CR (CRLF)
/// dropped, and every control character but tab (C0, DEL, C1: NUL, which
/// PostgreSQL refuses in text, ESC, BEL, a bare CR, ...) written as visible text
/// (`\x1b`, `\u009b`), so no terminal escape reaches the pusher.
pub fn clean_line(bytes: &[u8]) -> String {
    let s = String::from_utf8_lossy(bytes);
    let s = s.strip_suffix('\r').unwrap_or(&s);
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\t' => out.push(c),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\x{:02x}", c as u32))
            }
            c if (0x80..0xa0).contains(&(c as u32)) => {
                out.push_str(&format!("\\u{:04x}", c as u32))
            }
            c => out.push(c),
        }
    }
    out
}

/// Cuts a byte stream into log lines with a fixed memory bound: a line longer
/// than [`MAX_LINE`] is given cut (ending in `…`) as soon as it is that long,
/// and the rest of it, up to the next newline, is dropped.
#[derive(Default)]
pub struct LineSplitter {
    buf: Vec<u8>,
    /// The current line was given cut already: drop bytes to the next newline.
    skipping: bool,
}

impl LineSplitter {
    pub fn feed(&mut self, mut data: &[u8], out: &mut dyn FnMut(String)) {
        while !data.is_empty() {
            let nl = data.iter().position(|b| *b == b'\n');
            let (chunk, rest, ends) = match nl {
                Some(i) => (&data[..i], &data[i + 1..], true),
                None => (data, &data[data.len()..], false),
            };
            data = rest;
            if !self.skipping {
                let room = MAX_LINE - self.buf.len();
                if chunk.len() > room {
                    self.buf.extend_from_slice(&chunk[..room]);
                    out(self.cut());
                    self.skipping = true;
                } else {
                    self.buf.extend_from_slice(chunk);
                    if ends {
                        out(clean_line(&self.buf));
                        self.buf.clear();
                    }
                }
            }
            if ends {
                self.skipping = false;
            }
        }
    }

    /// The last line, when the stream ended without a newline.
    pub fn finish(&mut self, out: &mut dyn FnMut(String)) {
        if !self.buf.is_empty() {
            out(clean_line(&self.buf));
        }
        self.buf.clear();
        self.skipping = false;
    }

    fn cut(&mut self) -> String {
        // Cut on a character boundary: a split UTF-8 sequence at the end is
        // dropped rather than shown as a replacement character.
        let mut n = self.buf.len();
        while n > 0 && std::str::from_utf8(&self.buf[..n]).is_err() && self.buf.len() - n < 4 {
            n -= 1;
        }
        if std::str::from_utf8(&self.buf[..n]).is_err() {
            n = self.buf.len();
        }
        let mut s = clean_line(&self.buf[..n]);
        s.push('…');
        self.buf.clear();
        s
    }
}

/// How a sandboxed command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    Exit(i32),
    Signal(i32),
    TimedOut,
    /// Killed: the build's trees held more than `max_disk_bytes`.
    Disk,
    /// Killed: the build's trees held more than `max_entries` files.
    Files,
    /// Killed: a directory of the build's trees was too deep to measure.
    Deep,
}

impl Ended {
    pub fn ok(self) -> bool {
        self == Ended::Exit(0)
    }
}

impl std::fmt::Display for Ended {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ended::Exit(c) => write!(f, "exited with status {c}"),
            Ended::Signal(9) => write!(f, "was killed (signal 9)"),
            Ended::Signal(s) => write!(f, "was killed by signal {s}"),
            Ended::TimedOut => write!(f, "ran out of time"),
            Ended::Disk => write!(f, "used too much disk and was stopped"),
            Ended::Files => write!(f, "made too many files and was stopped"),
            Ended::Deep => write!(f, "made a directory too deep to measure and was stopped"),
        }
    }
}

/// One build's sandbox: the host directories it mounts and who it runs as.
pub struct Sandbox {
    pub uid: u32,
    pub gid: u32,
    /// Appears at `/app`.
    pub app_dir: PathBuf,
    /// Appears at `/tmp`: root's, holding the mount points made before any
    /// build code ran (see `build::Run::source`).
    pub tmp_dir: PathBuf,
    /// Appears at `/tmp/cache`.
    pub cache_dir: PathBuf,
    /// Appears at `/tmp/buildpacks`, read-only.
    pub buildpacks_dir: PathBuf,
    /// Local buildpacks: each appears read-only at `/tmp/NAME`.
    pub local: Vec<LocalPack>,
    pub cgroup: InstanceCgroup,
    pub pids: u64,
    /// RLIMIT_FSIZE: no file the build writes grows past this.
    pub max_file_bytes: u64,
    /// Size of the private tmpfs at `/var/tmp` and `/dev/shm`, in MiB.
    pub tmpfs_mb: u64,
    /// The build's trees on the host (its app dir, its `/tmp/work`, the
    /// app's cache), measured by the watchdog.
    pub watch: Vec<PathBuf>,
    /// The most disk (allocated blocks) the watched trees may hold together.
    pub max_disk_bytes: u64,
    /// The most files, directories and other entries they may hold together.
    pub max_entries: u64,
    pub env: Vec<(String, String)>,
}

/// A local buildpack, resolved and checked once ([`crate::local::open`]).
pub struct LocalPack {
    /// The directory as it was checked, opened `O_PATH`.
    pub dir: std::fs::File,
    /// Its resolved path: no symlink in it, every directory root's and
    /// writable by no one else (or sticky), so only root could change what it
    /// names. A bind's source must be in the binder's own mount namespace, so
    /// the sandbox binds this path, not the fd; before every run it checks that
    /// the path still names the directory opened.
    pub resolved: PathBuf,
    pub name: String,
}

enum Mount {
    Bind {
        src: CString,
        target: CString,
        rec: bool,
        read_only: bool,
    },
    Tmpfs {
        target: CString,
        options: CString,
        noexec: bool,
    },
    /// A procfs of the build's own at /proc with hidepid=2: the build sees
    /// only its own user's processes, not other builds' or the platform's.
    Proc,
}

fn bind(src: &Path, target: &Path, rec: bool, read_only: bool) -> std::io::Result<Mount> {
    Ok(Mount::Bind {
        src: child::cstring(src)?,
        target: child::cstring(target)?,
        rec,
        read_only,
    })
}

impl Mount {
    /// In the child, as root, in its own mount namespace.
    fn apply(&self) -> std::io::Result<()> {
        // SAFETY: mount with NUL-terminated strings prepared before the fork.
        unsafe {
            match self {
                Mount::Bind {
                    src,
                    target,
                    rec,
                    read_only,
                } => {
                    let flags = libc::MS_BIND | if *rec { libc::MS_REC } else { 0 };
                    if libc::mount(
                        src.as_ptr(),
                        target.as_ptr(),
                        std::ptr::null(),
                        flags,
                        std::ptr::null(),
                    ) != 0
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                    // A bind takes its flags from a remount: nosuid and nodev
                    // on every one (and read-only where asked).
                    let ro = if *read_only { libc::MS_RDONLY } else { 0 };
                    if libc::mount(
                        std::ptr::null(),
                        target.as_ptr(),
                        std::ptr::null(),
                        libc::MS_BIND | libc::MS_REMOUNT | libc::MS_NOSUID | libc::MS_NODEV | ro,
                        std::ptr::null(),
                    ) != 0
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Mount::Proc => {
                    if libc::mount(
                        c"proc".as_ptr(),
                        c"/proc".as_ptr(),
                        c"proc".as_ptr(),
                        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                        c"hidepid=2".as_ptr().cast(),
                    ) != 0
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Mount::Tmpfs {
                    target,
                    options,
                    noexec,
                } => {
                    let noexec = if *noexec { libc::MS_NOEXEC } else { 0 };
                    if libc::mount(
                        c"tmpfs".as_ptr(),
                        target.as_ptr(),
                        c"tmpfs".as_ptr(),
                        libc::MS_NOSUID | libc::MS_NODEV | noexec,
                        options.as_ptr().cast(),
                    ) != 0
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                }
            }
        }
        Ok(())
    }
}

/// In the child: a private mount namespace, then the mounts in order, then an
/// IPC namespace of its own (no other build's or the host's System V objects
/// or POSIX message queues; the build's own go when its last process ends).
fn private_mounts(mounts: &[Mount]) -> std::io::Result<()> {
    paddock_runner::child::private_mount_namespace()?;
    for m in mounts {
        m.apply()?;
    }
    // SAFETY: unshare with a constant flag.
    if unsafe { libc::unshare(libc::CLONE_NEWIPC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// What the watched trees hold: allocated bytes and entries.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub bytes: u64,
    pub entries: u64,
    /// A directory could not be read for its path's length (deeper than
    /// PATH_MAX): what is under it was not counted, so it fails closed.
    pub too_deep: bool,
}

/// Walks `roots` (never through a symlink, never onto another filesystem's
/// mount), summing allocated blocks (an inode with several links once) and
/// counting entries; stops early once past `max_bytes` or `max_entries`.
/// A root that is missing counts nothing.
///
/// Build code changes the trees while they are walked: each directory is
/// opened `O_NOFOLLOW` and read through that fd only if it is still the
/// directory (device and inode) seen in its parent, so a directory swapped for
/// a symlink (or one above it swapped) leads nowhere else on the host.
pub fn measure(roots: &[PathBuf], max_bytes: u64, max_entries: u64) -> Usage {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let mut u = Usage::default();
    let mut linked = std::collections::HashSet::new();
    // (path, device, inode)
    let mut stack: Vec<(PathBuf, u64, u64)> = Vec::new();
    for r in roots {
        if let Ok(m) = std::fs::symlink_metadata(r) {
            if m.is_dir() {
                stack.push((r.clone(), m.dev(), m.ino()));
            }
        }
    }
    while let Some((dir, dev, ino)) = stack.pop() {
        let opened = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&dir);
        let fd = match opened {
            Ok(fd) => fd,
            Err(e) if e.raw_os_error() == Some(libc::ENAMETOOLONG) => {
                u.too_deep = true;
                return u;
            }
            // Removed meanwhile, or replaced (by a file, a symlink).
            Err(_) => continue,
        };
        match fd.metadata() {
            Ok(m) if m.dev() == dev && m.ino() == ino => {}
            _ => continue,
        }
        // Read through the fd (entries are lstat'ed relative to it).
        let Ok(rd) = std::fs::read_dir(format!("/proc/self/fd/{}", fd.as_raw_fd())) else {
            continue;
        };
        for e in rd.flatten() {
            // DirEntry::metadata is fstatat(AT_SYMLINK_NOFOLLOW): a symlink is
            // counted, not followed.
            let Ok(m) = e.metadata() else { continue };
            u.entries += 1;
            if m.nlink() <= 1 || m.is_dir() || linked.insert((m.dev(), m.ino())) {
                u.bytes += m.blocks() * 512;
            }
            if m.is_dir() && m.dev() == dev {
                stack.push((dir.join(e.file_name()), m.dev(), m.ino()));
            }
            if u.bytes > max_bytes || u.entries > max_entries {
                return u;
            }
        }
    }
    u
}

/// In the child, before privileges are dropped: nothing it execs may gain
/// privileges (setuid and file capabilities are ignored), and no file it
/// writes grows past `fsize` bytes (SIGXFSZ, then EFBIG).
fn harden(fsize: u64) -> std::io::Result<()> {
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_FSIZE, fsize, fsize)?;
    Ok(())
}

/// In the child, after privileges are dropped (a change of credentials clears
/// it): killed when the deployer's thread that started it dies, so build code
/// never outlives a deployer that does not come back. `parent` is the
/// deployer's pid, checked after, in case it died before.
fn die_with_parent(parent: libc::pid_t) -> std::io::Result<()> {
    // SAFETY: prctl and getppid with integer arguments only.
    unsafe {
        if libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL as libc::c_ulong,
            0,
            0,
            0,
        ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
        if libc::getppid() != parent {
            libc::_exit(137);
        }
    }
    Ok(())
}

impl Sandbox {
    /// Runs `argv` in the sandbox (cwd `/app`) until it ends or `deadline`.
    /// stderr lines, and stdout lines unless `capture`, go to `line` as they come;
    /// with `capture`, stdout is returned instead (at most 1 MiB). `stdin`, when
    /// given, is the command's standard input (else /dev/null).
    pub async fn run(
        &self,
        argv: &[&str],
        deadline: Instant,
        capture: bool,
        line: &dyn Fn(String),
    ) -> std::io::Result<(Ended, String)> {
        self.run_with(argv, deadline, capture, None, line).await
    }

    pub async fn run_with(
        &self,
        argv: &[&str],
        deadline: Instant,
        capture: bool,
        stdin: Option<std::fs::File>,
        line: &dyn Fn(String),
    ) -> std::io::Result<(Ended, String)> {
        // The mounts cover /tmp, where the build's own directories may live (a
        // test's temp dir), so everything is first bound onto mount points inside
        // the build's tmp (root's, made before any build code ran, so no path
        // here is one the build could have changed) and that whole tree
        // (MS_REC) onto /tmp last; `/app` is then bound by `Prepared` from
        // `/tmp/.app` in its own new namespace.
        let mut mounts = vec![
            bind(&self.app_dir, &self.tmp_dir.join(".app"), false, false)?,
            bind(&self.cache_dir, &self.tmp_dir.join("cache"), false, false)?,
            bind(
                &self.buildpacks_dir,
                &self.tmp_dir.join("buildpacks"),
                false,
                true,
            )?,
        ];
        for p in &self.local {
            crate::local::still_names(&p.dir, &p.resolved).map_err(std::io::Error::other)?;
            mounts.push(bind(&p.resolved, &self.tmp_dir.join(&p.name), false, true)?);
        }
        mounts.push(bind(&self.tmp_dir, Path::new("/tmp"), true, false)?);
        let options = CString::new(format!("size={}m,mode=1777", self.tmpfs_mb))
            .map_err(std::io::Error::other)?;
        for target in [c"/var/tmp", c"/dev/shm"] {
            mounts.push(Mount::Tmpfs {
                target: target.to_owned(),
                options: options.clone(),
                noexec: false,
            });
        }
        // Lock files are not shared with other builds or the host either
        // (`/var/lock` is often a symlink to `/run/lock`: only directories).
        for target in [c"/run/lock", c"/var/lock"] {
            let p = Path::new(std::ffi::OsStr::from_bytes(target.to_bytes()));
            if std::fs::symlink_metadata(p).is_ok_and(|m| m.is_dir()) {
                mounts.push(Mount::Tmpfs {
                    target: target.to_owned(),
                    options: c"size=1m,mode=1777".to_owned(),
                    noexec: true,
                });
            }
        }
        mounts.push(Mount::Proc);
        let join: Vec<PathBuf> = self
            .cgroup
            .procs
            .iter()
            .chain(&self.cgroup.shim_procs)
            .chain(&self.cgroup.late_procs)
            .cloned()
            .collect();
        let prepared = Prepared::new(
            &join,
            self.uid,
            self.gid,
            4096,
            Some(self.pids.saturating_mul(8)),
            Path::new(child::APP_ROOT),
        )?
        .with_mount(AppMount::bind(Path::new("/tmp/.app"))?);
        let mut cmd = tokio::process::Command::new(argv[0]);
        cmd.args(&argv[1..])
            .env_clear()
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(match stdin {
                Some(f) => Stdio::from(f),
                None => Stdio::null(),
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let fsize = self.max_file_bytes;
        let parent = std::process::id() as libc::pid_t;
        // SAFETY: only async-signal-safe syscalls on memory prepared before the
        // fork (the deployer has other threads, so nothing here allocates).
        unsafe {
            cmd.pre_exec(move || {
                nix::unistd::setsid()?;
                private_mounts(&mounts)?;
                harden(fsize)?;
                prepared.apply()?;
                die_with_parent(parent)
            });
        }
        let mut proc = cmd.spawn()?;
        let mut out = proc.stdout.take().expect("piped");
        let mut err = proc.stderr.take().expect("piped");
        let (mut obuf, mut ebuf) = (vec![0u8; 16 << 10], vec![0u8; 16 << 10]);
        let (mut osplit, mut esplit) = (LineSplitter::default(), LineSplitter::default());
        let (mut o_done, mut e_done) = (false, false);
        let mut captured = String::new();
        let mut to_stdout = |l: String| {
            if capture {
                if captured.len() < 1 << 20 {
                    captured.push_str(&l);
                    captured.push('\n');
                }
            } else {
                line(l);
            }
        };
        let mut to_stderr = |l: String| line(l);
        let mut status: Option<Ended> = None;
        let deadline = tokio::time::Instant::from_std(deadline);
        let mut watchdog = tokio::time::interval(std::time::Duration::from_secs(1));
        watchdog.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while !(o_done && e_done && status.is_some()) {
            tokio::select! {
                _ = watchdog.tick(), if status.is_none() => {
                    if let Some(over) = self.over_limits().await {
                        self.kill_all().await;
                        let _ = proc.wait().await;
                        return Ok((over, captured));
                    }
                },
                r = out.read(&mut obuf), if !o_done => match r {
                    Ok(n) if n > 0 => osplit.feed(&obuf[..n], &mut to_stdout),
                    _ => {
                        osplit.finish(&mut to_stdout);
                        o_done = true;
                    }
                },
                r = err.read(&mut ebuf), if !e_done => match r {
                    Ok(n) if n > 0 => esplit.feed(&ebuf[..n], &mut to_stderr),
                    _ => {
                        esplit.finish(&mut to_stderr);
                        e_done = true;
                    }
                },
                st = proc.wait(), if status.is_none() => {
                    use std::os::unix::process::ExitStatusExt;
                    let st = st?;
                    status = Some(match (st.code(), st.signal()) {
                        (Some(c), _) => Ended::Exit(c),
                        (None, Some(s)) => Ended::Signal(s),
                        _ => Ended::Exit(255),
                    });
                    // What the command left behind (a daemon holding the pipes)
                    // ends with it.
                    self.kill_all().await;
                },
                _ = tokio::time::sleep_until(deadline) => {
                    self.kill_all().await;
                    let _ = proc.wait().await;
                    return Ok((Ended::TimedOut, captured));
                }
            }
        }
        let status = status.unwrap_or(Ended::Exit(255));
        // A command that filled the disk faster than the watchdog looked (one
        // file past RLIMIT_FSIZE says so itself: SIGXFSZ, or a shell's 153).
        let xfsz = [
            Ended::Signal(libc::SIGXFSZ),
            Ended::Exit(128 + libc::SIGXFSZ),
        ];
        if !xfsz.contains(&status) {
            if let Some(over) = self.over_limits().await {
                return Ok((over, captured));
            }
        }
        Ok((status, captured))
    }

    /// The watched trees measured: `Some` when over a limit.
    pub async fn over_limits(&self) -> Option<Ended> {
        let (roots, max_bytes, max_entries) =
            (self.watch.clone(), self.max_disk_bytes, self.max_entries);
        let u = tokio::task::spawn_blocking(move || measure(&roots, max_bytes, max_entries))
            .await
            .ok()?;
        if u.bytes > max_bytes {
            Some(Ended::Disk)
        } else if u.entries > max_entries {
            Some(Ended::Files)
        } else if u.too_deep {
            Some(Ended::Deep)
        } else {
            None
        }
    }

    /// SIGKILL to every process of the build, exactly (freeze, kill, thaw on v1).
    pub async fn kill_all(&self) {
        let kill = self.cgroup.kill.clone();
        let _ = tokio::task::spawn_blocking(move || {
            paddock_runner::shim::kill_cgroup(kill.as_ref());
        })
        .await;
    }

    /// OOM kills in the build's memory cgroup so far (v1 `oom_kill`, v2 `oom_kill`).
    pub fn oom_kills(&self) -> u64 {
        let Some(p) = &self.cgroup.oom_counter else {
            return 0;
        };
        std::fs::read_to_string(p)
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("oom_kill "))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(chunks: &[&[u8]]) -> Vec<String> {
        let mut s = LineSplitter::default();
        let mut out = Vec::new();
        for c in chunks {
            s.feed(c, &mut |l| out.push(l));
        }
        s.finish(&mut |l| out.push(l));
        out
    }

    #[test]
    fn lines_are_split_across_reads_and_cut_at_max_line() {
        assert_eq!(split(&[b"a\nb", b"c\r\n", b"d"]), ["a", "bc", "d"]);
        assert_eq!(split(&[b"\n\n"]), ["", ""]);
        let long = vec![b'x'; MAX_LINE * 3 + 5];
        let out = split(&[&long, &long, b"\nafter\n"]);
        assert_eq!(
            out.len(),
            2,
            "{:?}",
            out.iter().map(String::len).collect::<Vec<_>>()
        );
        assert_eq!(out[0], format!("{}…", "x".repeat(MAX_LINE)));
        assert_eq!(out[1], "after");
        // Exactly MAX_LINE fits.
        let exact = vec![b'y'; MAX_LINE];
        assert_eq!(split(&[&exact, b"\n"]), [String::from_utf8(exact).unwrap()]);
        // A cut never splits a character.
        let mut multi = vec![b'z'; MAX_LINE - 1];
        multi.extend_from_slice("é and more".as_bytes());
        let out = split(&[&multi]);
        assert_eq!(out[0], format!("{}…", "z".repeat(MAX_LINE - 1)));
    }

    #[test]
    fn measure_counts_blocks_and_entries_without_following_symlinks() {
        let d = std::env::temp_dir().join(format!("paddock-measure-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("a/b")).unwrap();
        std::fs::write(d.join("a/b/f"), vec![1u8; 1 << 20]).unwrap();
        std::fs::hard_link(d.join("a/b/f"), d.join("a/g")).unwrap();
        std::os::unix::fs::symlink("/usr", d.join("a/usr")).unwrap();
        for i in 0..10 {
            std::fs::write(d.join(format!("e{i}")), b"").unwrap();
        }
        let u = measure(&[d.clone(), d.join("missing")], u64::MAX, u64::MAX);
        // a, a/b, a/b/f, a/g, a/usr and ten empty files.
        assert_eq!(u.entries, 15);
        assert!((1 << 20..2 << 20).contains(&u.bytes), "{u:?}");
        // It stops once past a limit.
        assert!(measure(std::slice::from_ref(&d), u64::MAX, 3).entries <= 4);
        assert!(!u.too_deep);
        // A tree deeper than PATH_MAX fails closed.
        let n = "n".repeat(250);
        let st = std::process::Command::new("bash")
            .arg("-c")
            .arg(format!(
                "cd {} && for i in $(seq 20); do mkdir {n} && cd {n} || exit 1; done",
                d.display()
            ))
            .status()
            .unwrap();
        assert!(st.success());
        assert!(measure(std::slice::from_ref(&d), u64::MAX, u64::MAX).too_deep);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn control_characters_are_made_visible() {
        assert_eq!(clean_line(b"nul:\0:end"), "nul:\\x00:end");
        assert_eq!(
            clean_line(b"\x1b[31mred\x1b[0m\x07 a\rb\ttab\r"),
            "\\x1b[31mred\\x1b[0m\\x07 a\\x0db\ttab"
        );
        assert_eq!(clean_line("\u{9b}31m".as_bytes()), "\\u009b31m");
        assert_eq!(clean_line(b"del\x7f"), "del\\x7f");
        assert_eq!(clean_line(b"bad \xff utf8"), "bad \u{fffd} utf8");
        assert_eq!(clean_line("naïve ✓".as_bytes()), "naïve ✓");
    }
}
