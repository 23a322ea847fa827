//! One-off commands (`run.*`): started in an app's environment as the app's
//! user, on a pseudo-terminal (input, output and window size relayed over ZeroMQ
//! requests, output by long polling) or, with `"pty": false`, with stdout and
//! stderr captured into the same output and no input; the exit status returned.
//! A one-off of a release (`"release"` instead of `"dir"`) runs at `/app` as a
//! release instance does, with a writable layer of its own.

use std::cell::RefCell;
use std::collections::HashMap;
use std::os::fd::{AsRawFd, IntoRawFd, OwnedFd};
use std::path::PathBuf;
use std::rc::Rc;
use std::time::Duration;

use base64::Engine;
use paddock_daemon::{body, Routes};
use paddock_wire::kinds::{
    self, RunInput, RunOutput, RunOutputReq, RunResize, RunStart, RunStarted,
};
use paddock_wire::{Code, WireError};
use serde_json::{json, Value};
use tokio::io::unix::AsyncFd;
use tokio::sync::Notify;

use crate::{cgroup, child, shim, users};

/// Output kept per run; beyond it the oldest bytes are dropped (offsets stay true).
const MAX_BUFFER: usize = 8 << 20;
/// The buffer may grow this far past `MAX_BUFFER` before the oldest bytes are
/// dropped, so a flood costs one large move per 2 MiB, not one per read.
const SLACK: usize = 2 << 20;
/// Output bytes in one `run.output` reply (the client asks again for the rest).
const MAX_REPLY: usize = 256 << 10;
/// How long `run.input` waits for a terminal that takes no input.
const INPUT_WAIT: Duration = Duration::from_secs(2);

struct Run {
    /// The terminal's master side, or (without a terminal) the output pipe's
    /// read end.
    master: Rc<AsyncFd<OwnedFd>>,
    /// On a terminal: input and resizing are possible.
    tty: bool,
    pid: i32,
    /// The one-off's own cgroup: its limits, and the exact kill.
    cgroup: cgroup::InstanceCgroup,
    /// Output bytes `[base, base + buf.len())`.
    buf: Vec<u8>,
    base: u64,
    eof: bool,
    exit: Option<i32>,
    changed: Rc<Notify>,
}

/// The runner's defaults for what a one-off may use (as for instances).
#[derive(Debug, Clone, Copy)]
pub struct Defaults {
    pub nofile: u64,
    pub pids: u64,
    pub memory_mb: Option<u64>,
}

/// How a one-off runs, beyond its request.
#[derive(Debug, Clone, Default)]
pub struct RunOpts {
    /// Without a terminal: stdin is /dev/null, stdout and stderr one pipe.
    pub no_pty: bool,
    /// A release's unpacked slug, seen at `/app` (the request's `dir` is `/app`).
    pub lower: Option<PathBuf>,
}

#[derive(Clone)]
pub struct Runs {
    runs: Rc<RefCell<HashMap<String, Run>>>,
    apps_dir: PathBuf,
    /// Root-only: each release one-off's overlay layers, `<layers>/<id>/`.
    layers: PathBuf,
    hierarchy: Rc<cgroup::Hierarchy>,
    defaults: Defaults,
}

/// A pseudo-terminal whose both ends are close-on-exec from the moment they exist
/// (the runner forks other tenants' shims at any time; an inherited terminal
/// would cross tenants).
fn open_pty(ws: &libc::winsize) -> nix::Result<(OwnedFd, OwnedFd)> {
    use nix::fcntl::OFlag;
    let master = nix::pty::posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC)?;
    nix::pty::grantpt(&master)?;
    nix::pty::unlockpt(&master)?;
    let name = nix::pty::ptsname_r(&master)?;
    let slave = nix::fcntl::open(
        name.as_str(),
        OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )?;
    // SAFETY: open returned a fresh fd that nothing else owns.
    let slave = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(slave) };
    // SAFETY: TIOCSWINSZ with a valid winsize on an open pty.
    if unsafe { libc::ioctl(slave.as_raw_fd(), libc::TIOCSWINSZ, ws) } != 0 {
        return Err(nix::errno::Errno::last());
    }
    // SAFETY: posix_openpt's fd is ours from here on.
    let master = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(master.into_raw_fd()) };
    Ok((master, slave))
}

impl Runs {
    pub fn new(
        apps_dir: PathBuf,
        layers: PathBuf,
        hierarchy: cgroup::Hierarchy,
        defaults: Defaults,
    ) -> Runs {
        Runs {
            runs: Rc::new(RefCell::new(HashMap::new())),
            apps_dir,
            layers,
            hierarchy: Rc::new(hierarchy),
            defaults,
        }
    }

    fn start(&self, req: RunStart, opts: RunOpts) -> Result<Value, WireError> {
        if !users::valid_app(&req.app) {
            return Err(WireError::invalid(
                "`app` must be 1-28 characters of [a-z0-9-]",
            ));
        }
        let mut argv: Vec<String> = match (&req.argv, req.command.trim()) {
            (Some(a), "") if !a.is_empty() => a.clone(),
            (None, c) if !c.is_empty() => vec![
                "/bin/sh".into(),
                "-c".into(),
                crate::release::one_off_line(&req.command),
            ],
            _ => {
                return Err(WireError::invalid(
                    "give either `command` (a shell line) or `argv` (a non-empty list)",
                ))
            }
        };
        let shown = req
            .argv
            .as_ref()
            .map(|a| a.join(" "))
            .unwrap_or_else(|| req.command.clone());
        if opts.lower.is_some() {
            // A release sources its `.profile.d` first, then execs the command.
            argv = crate::release::profile_wrapped(
                &crate::release::one_off_line(&req.command),
                req.argv.as_deref(),
            );
        }
        let dir = PathBuf::from(&req.dir);
        let (uid, gid) =
            users::ensure_user(&req.app).map_err(|e| WireError::internal(crate::chain(&e)))?;
        if opts.lower.is_none() {
            users::check_readable_dir(&dir, uid, gid)
                .map_err(|e| WireError::invalid(e.to_string()))?;
        }
        let id = format!("run-{}", ulid::Ulid::new().to_string().to_lowercase());
        let layers = self.layers.join(&id);
        let mount = match &opts.lower {
            Some(lower) => {
                let made = crate::release::fresh_layers(&layers, (uid, gid))
                    .and_then(|(upper, work)| child::AppMount::overlay(lower, &upper, &work));
                match made {
                    Ok(m) => Some(m),
                    Err(e) => {
                        let _ = std::fs::remove_dir_all(&layers);
                        return Err(WireError::internal(format!(
                            "cannot make the one-off's /app layers: {e}"
                        )));
                    }
                }
            }
            None => None,
        };
        let home = self.apps_dir.join(&id);
        {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(&home)
                .map_err(|e| {
                    WireError::internal(format!("cannot create {}: {e}", home.display()))
                })?;
            std::os::unix::fs::chown(&home, Some(uid), Some(gid))
                .map_err(|e| WireError::internal(e.to_string()))?;
        }
        let d = self.defaults;
        let pids = req.limits.pids.unwrap_or(d.pids);
        let limits = cgroup::Limits {
            memory_mb: req.limits.memory_mb.or(d.memory_mb),
            pids: Some(pids),
            cpu_weight: req.limits.cpu_weight,
        };
        let cg = self
            .hierarchy
            .create(&id, &limits)
            .map_err(|e| WireError::internal(format!("cannot create cgroups: {e}")))?;
        // A one-off joins every one of its cgroups before exec (nothing here is
        // restarted, so the v1 freezer's migration cost does not matter).
        let join: Vec<PathBuf> = cg
            .procs
            .iter()
            .chain(&cg.shim_procs)
            .chain(&cg.late_procs)
            .cloned()
            .collect();
        let mut prepared = child::Prepared::new(
            &join,
            uid,
            gid,
            req.limits.nofile.unwrap_or(d.nofile),
            Some(pids.saturating_mul(8)),
            &dir,
        )
        .map_err(|e| WireError::internal(e.to_string()))?;
        if let Some(m) = mount {
            prepared = prepared.with_mount(m);
        }
        let tty = !opts.no_pty;
        let clone = |fd: &OwnedFd| {
            fd.try_clone()
                .map_err(|e| WireError::internal(e.to_string()))
        };
        // stdin, stdout, stderr and the side the runner reads.
        let (stdin, stdout, stderr, master) = if tty {
            let ws = libc::winsize {
                ws_row: req.rows,
                ws_col: req.cols,
                ws_xpixel: 0,
                ws_ypixel: 0,
            };
            let (master, slave) =
                open_pty(&ws).map_err(|e| WireError::internal(format!("openpty: {e}")))?;
            (
                std::process::Stdio::from(clone(&slave)?),
                std::process::Stdio::from(clone(&slave)?),
                std::process::Stdio::from(slave),
                master,
            )
        } else {
            // One pipe for both streams keeps their order as the command wrote it.
            let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
                .map_err(|e| WireError::internal(format!("pipe: {e}")))?;
            (
                std::process::Stdio::null(),
                std::process::Stdio::from(clone(&w)?),
                std::process::Stdio::from(w),
                r,
            )
        };
        let mut cmd = tokio::process::Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .env("LANG", "C.UTF-8");
        if tty {
            cmd.env(
                "TERM",
                req.env
                    .get("TERM")
                    .map(String::as_str)
                    .unwrap_or("xterm-256color"),
            );
        }
        cmd.envs(&req.env)
            .env(
                "HOME",
                if opts.lower.is_some() {
                    PathBuf::from(child::APP_ROOT)
                } else {
                    home.clone()
                },
            )
            .env("TMPDIR", &home)
            .env("PADDOCK_APP", &req.app)
            .stdin(stdin)
            .stdout(stdout)
            .stderr(stderr);
        // SAFETY: only async-signal-safe syscalls on memory prepared before the fork
        // (the runner has other threads, so nothing here allocates).
        unsafe {
            cmd.pre_exec(move || {
                nix::unistd::setsid()?;
                if tty && libc::ioctl(0, libc::TIOCSCTTY as _, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                prepared.apply()
            });
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                cg.remove();
                let _ = std::fs::remove_dir_all(&home);
                let _ = std::fs::remove_dir_all(&layers);
                return Err(WireError::invalid(format!("cannot start `{shown}`: {e}")));
            }
        };
        // The child's ends are closed here (dropped with `cmd`), so the output
        // ends once the command and whatever it left are gone.
        drop(cmd);
        let pid = child.id().unwrap_or(0) as i32;
        nix::fcntl::fcntl(
            master.as_raw_fd(),
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        )
        .map_err(|e| WireError::internal(e.to_string()))?;
        // SAFETY: the AsyncFd owns the master fd and is the only thing that closes it.
        let master = Rc::new(
            unsafe { AsyncFd::register(master) }.map_err(|e| WireError::internal(e.to_string()))?,
        );
        let changed = Rc::new(Notify::new());
        let kill_spec = cg.kill.clone();
        let cg_dirs = cg.clone();
        self.runs.borrow_mut().insert(
            id.clone(),
            Run {
                master: master.clone(),
                tty,
                pid,
                cgroup: cg,
                buf: Vec::new(),
                base: 0,
                eof: false,
                exit: None,
                changed: changed.clone(),
            },
        );
        // Reader: until EIO (every slave fd closed).
        let (runs, rid) = (self.runs.clone(), id.clone());
        actix_rt::spawn(async move {
            let mut chunk = vec![0u8; 16384];
            loop {
                let Ok(mut guard) = master.readable().await else {
                    break;
                };
                match guard.try_io(|fd| {
                    nix::unistd::read(fd.as_raw_fd(), &mut chunk).map_err(std::io::Error::from)
                }) {
                    Ok(Ok(0)) | Ok(Err(_)) => break,
                    Ok(Ok(n)) => {
                        if let Some(r) = runs.borrow_mut().get_mut(&rid) {
                            r.buf.extend_from_slice(&chunk[..n]);
                            if r.buf.len() > MAX_BUFFER + SLACK {
                                let drop = r.buf.len() - MAX_BUFFER;
                                r.buf.drain(..drop);
                                r.base += drop as u64;
                            }
                            r.changed.notify_waiters();
                        }
                    }
                    Err(_would_block) => continue,
                }
            }
            if let Some(r) = runs.borrow_mut().get_mut(&rid) {
                r.eof = true;
                r.changed.notify_waiters();
            }
        });
        let (runs, rid) = (self.runs.clone(), id.clone());
        actix_rt::spawn(async move {
            let code = match child.wait().await {
                Ok(st) => st.code().unwrap_or_else(|| {
                    128 + std::os::unix::process::ExitStatusExt::signal(&st).unwrap_or(0)
                }),
                Err(_) => 255,
            };
            // A one-off ends with its command: whatever it left behind (background
            // children, which would also hold the terminal open) goes with it.
            shim::kill_cgroup(kill_spec.as_ref());
            let notify = runs.borrow_mut().get_mut(&rid).map(|r| {
                r.exit = Some(code);
                r.changed.clone()
            });
            if let Some(n) = notify {
                n.notify_waiters();
            }
            // The killed processes leave the cgroup once the kernel has reaped them.
            for _ in 0..100 {
                if cg_dirs.pids().is_empty() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            cg_dirs.remove();
            // Its `/app` layer: nothing of it is in use once its processes are gone.
            let _ = std::fs::remove_dir_all(&layers);
            // Forget the run a while after it ended (its output was fetched by then).
            tokio::time::sleep(Duration::from_secs(300)).await;
            runs.borrow_mut().remove(&rid);
            let _ = std::fs::remove_dir_all(home);
        });
        tracing::info!(run = %id, pid, app = %req.app, "one-off command started");
        Ok(kinds::to_body(&RunStarted { id, pid }))
    }

    fn with<T>(&self, id: &str, f: impl FnOnce(&mut Run) -> T) -> Result<T, WireError> {
        let mut runs = self.runs.borrow_mut();
        let r = runs.get_mut(id).ok_or_else(|| {
            WireError::new(Code::NotFound, format!("no run `{id}` on this runner"))
        })?;
        Ok(f(r))
    }

    /// Writes the input as the terminal takes it, waiting (without holding the
    /// runner's thread) up to `INPUT_WAIT` for room; what was written is said.
    async fn input(&self, req: RunInput) -> Result<Value, WireError> {
        let data = base64::engine::general_purpose::STANDARD
            .decode(&req.data)
            .map_err(|e| WireError::invalid(format!("`data` is not base64: {e}")))?;
        let (master, tty) = self.with(&req.id, |r| (r.master.clone(), r.tty))?;
        if !tty {
            return Err(WireError::new(
                Code::Conflict,
                format!(
                    "run `{}` has no terminal (\"pty\": false): it takes no input",
                    req.id
                ),
            ));
        }
        let deadline = tokio::time::Instant::now() + INPUT_WAIT;
        let mut off = 0;
        while off < data.len() {
            let ready = tokio::time::timeout_at(deadline, master.writable()).await;
            let Ok(Ok(mut guard)) = ready else {
                if off > 0 {
                    break; // a part went in: say how much
                }
                return Err(WireError::unavailable("the terminal is not taking input"));
            };
            match guard.try_io(|fd| {
                nix::unistd::write(fd.get_ref(), &data[off..]).map_err(std::io::Error::from)
            }) {
                Ok(Ok(n)) => off += n,
                Ok(Err(e)) => {
                    return Err(WireError::internal(format!("writing to the terminal: {e}")))
                }
                Err(_would_block) => continue,
            }
        }
        Ok(json!({"written": off}))
    }

    fn resize(&self, req: RunResize) -> Result<Value, WireError> {
        let (fd, tty) = self.with(&req.id, |r| (r.master.get_ref().as_raw_fd(), r.tty))?;
        if !tty {
            return Err(WireError::new(
                Code::Conflict,
                format!("run `{}` has no terminal (\"pty\": false)", req.id),
            ));
        }
        let ws = libc::winsize {
            ws_row: req.rows,
            ws_col: req.cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ with a valid winsize on an open pty master.
        if unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &ws) } != 0 {
            return Err(WireError::internal(format!(
                "resize: {}",
                std::io::Error::last_os_error()
            )));
        }
        Ok(json!({}))
    }

    async fn output(&self, req: RunOutputReq) -> Result<Value, WireError> {
        let deadline = tokio::time::Instant::now() + Duration::from_millis(req.wait_ms.min(30_000));
        loop {
            let (ready, notify) = self.with(&req.id, |r| {
                let end = r.base + r.buf.len() as u64;
                let has = req.offset < end || (r.eof && r.exit.is_some());
                (has, r.changed.clone())
            })?;
            if ready || tokio::time::Instant::now() >= deadline {
                return self.with(&req.id, |r| {
                    let end = r.base + r.buf.len() as u64;
                    let from = req.offset.clamp(r.base, end);
                    let start = (from - r.base) as usize;
                    let bytes = &r.buf[start..r.buf.len().min(start + MAX_REPLY)];
                    let next = from + bytes.len() as u64;
                    let done = next == end && r.eof && r.exit.is_some();
                    kinds::to_body(&RunOutput {
                        data: base64::engine::general_purpose::STANDARD.encode(bytes),
                        next_offset: next,
                        exit_code: if done { r.exit } else { None },
                        done,
                    })
                });
            }
            // Register for the wake-up before re-checking, so output that arrives in
            // between is not missed.
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let again = self.with(&req.id, |r| {
                req.offset < r.base + r.buf.len() as u64 || (r.eof && r.exit.is_some())
            })?;
            if !again {
                let _ = tokio::time::timeout_at(deadline, notified).await;
            }
        }
    }

    fn kill(&self, id: &str) -> Result<Value, WireError> {
        let (pid, ended, kill_spec) =
            self.with(id, |r| (r.pid, r.exit.is_some(), r.cgroup.kill.clone()))?;
        if ended {
            // Its process group may belong to someone else by now.
            return Err(WireError::new(
                Code::Conflict,
                format!("run `{id}` has already ended"),
            ));
        }
        // Exactly the one-off's processes, wherever they moved (setsid, double
        // fork): its cgroup. The process group too, for hosts without cgroups.
        shim::kill_cgroup(kill_spec.as_ref());
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(-pid),
            nix::sys::signal::Signal::SIGKILL,
        );
        Ok(json!({}))
    }
}

/// Adds the `run.*` kinds.
pub fn routes(
    routes: Routes,
    runs: Runs,
    releases: crate::release::Releases,
) -> anyhow::Result<Routes> {
    let (a, b, c, d, e) = (runs.clone(), runs.clone(), runs.clone(), runs.clone(), runs);
    Ok(routes
        .on(kinds::RUN_START, move |env| {
            let (r, releases) = (a.clone(), releases.clone());
            async move {
                let no_pty = match env.body.get("pty") {
                    None | Some(Value::Null) => false,
                    Some(Value::Bool(b)) => !b,
                    Some(_) => return Err(WireError::invalid("`pty` must be true or false")),
                };
                match env.body.get("release") {
                    None | Some(Value::Null) => r.start(
                        body(&env)?,
                        RunOpts {
                            no_pty,
                            lower: None,
                        },
                    ),
                    Some(_) => {
                        let (req, lower) = releases.run_start(&env.body).await?;
                        let opts = RunOpts {
                            no_pty,
                            lower: Some(lower),
                        };
                        r.start(req, opts)
                    }
                }
            }
        })
        .on(kinds::RUN_INPUT, move |env| {
            let r = b.clone();
            async move { r.input(body(&env)?).await }
        })
        .on(kinds::RUN_RESIZE, move |env| {
            let r = c.clone();
            async move { r.resize(body(&env)?) }
        })
        .on(kinds::RUN_OUTPUT, move |env| {
            let r = d.clone();
            async move { r.output(body(&env)?).await }
        })
        .on(kinds::RUN_KILL, move |env| {
            let r = e.clone();
            async move {
                let req: kinds::InstanceId = body(&env)?;
                r.kill(&req.id)
            }
        }))
}
