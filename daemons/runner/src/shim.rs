//! `paddock-shim`: the small per-instance parent of an app (as conmon is for
//! containers). It holds the app's pipes and exit status, so the runner can restart
//! (or be killed) without touching apps.
//!
//! One thread, one poll loop: the control socket, the app's stdout/stderr pipes and a
//! signalfd for SIGCHLD/SIGTERM. It is a child subreaper, so whatever the app
//! double-forks is reparented here, reaped here and killed on stop.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::shim_proto::{CgroupKill, ExitInfo, ShimCommand, ShimEvent, ShimSpec};

pub fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

fn now_ms() -> i64 {
    now_ns() / 1_000_000
}

/// Reads the `oom_kill N` counter of a cgroup (v1 memory.oom_control, v2 memory.events).
pub fn oom_kills(path: &Path) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("oom_kill ")
                    .and_then(|n| n.trim().parse().ok())
            })
        })
        .unwrap_or(0)
}

/// Every descendant of `pid`, from /proc/<pid>/task/*/children, depth first.
pub fn descendants(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let mut stack = vec![pid];
    while let Some(p) = stack.pop() {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) else {
            continue;
        };
        for t in tasks.flatten() {
            if let Ok(kids) = std::fs::read_to_string(t.path().join("children")) {
                for k in kids
                    .split_whitespace()
                    .filter_map(|k| k.parse::<i32>().ok())
                {
                    if !out.contains(&k) {
                        out.push(k);
                        stack.push(k);
                    }
                }
            }
        }
    }
    out
}

/// SIGKILL to everything of the instance: its cgroup exactly (when it has one), and
/// every descendant of this process. Only the shim calls this (the runner would
/// take every shim it started with it); the runner uses [`kill_cgroup`].
pub fn kill_everything(kill_spec: Option<&CgroupKill>) {
    kill_cgroup(kill_spec);
    for p in descendants(std::process::id() as i32) {
        let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
    }
}

/// Pids still in the instance's kill cgroup (never the caller itself).
pub fn cgroup_pids(kill_spec: Option<&CgroupKill>) -> Vec<i32> {
    let procs = match kill_spec {
        Some(CgroupKill::V2 { kill_file }) => kill_file.with_file_name("cgroup.procs"),
        Some(CgroupKill::V1 { procs, .. }) => procs.clone(),
        None => return vec![],
    };
    let me = std::process::id() as i32;
    std::fs::read_to_string(procs)
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .filter(|p| *p != me)
        .collect()
}

/// SIGKILL to every process in the instance's cgroup, exactly: `cgroup.kill` on v2
/// (each pid when the kernel predates it), freeze → kill → thaw on v1.
pub fn kill_cgroup(kill_spec: Option<&CgroupKill>) {
    match kill_spec {
        Some(CgroupKill::V2 { kill_file }) if std::fs::write(kill_file, "1").is_err() => {
            for p in cgroup_pids(kill_spec) {
                let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
            }
        }
        Some(CgroupKill::V2 { .. }) => {}
        Some(CgroupKill::V1 {
            freezer_state,
            procs,
        }) => {
            // Freeze so nothing can fork while we kill, then thaw so SIGKILL lands.
            let frozen = std::fs::write(freezer_state, "FROZEN").is_ok();
            if frozen {
                let deadline = Instant::now() + Duration::from_millis(200);
                while Instant::now() < deadline {
                    if std::fs::read_to_string(freezer_state)
                        .map(|s| s.trim() == "FROZEN")
                        .unwrap_or(true)
                    {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            if let Ok(list) = std::fs::read_to_string(procs) {
                for p in list
                    .split_whitespace()
                    .filter_map(|p| p.parse::<i32>().ok())
                {
                    let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
                }
            }
            if frozen {
                let _ = std::fs::write(freezer_state, "THAWED");
            }
        }
        None => {}
    }
}

struct Pipe {
    file: File,
    stream: &'static str,
    buf: Vec<u8>,
}

struct Client {
    stream: UnixStream,
    inbuf: Vec<u8>,
    out: VecDeque<u8>,
}

struct App {
    pid: i32,
    started_ns: i64,
    oom_before: u64,
}

struct Shim {
    spec: ShimSpec,
    listener: UnixListener,
    client: Option<Client>,
    pipes: Vec<Pipe>,
    app: Option<App>,
    last_exit: Option<ExitInfo>,
    /// A stop in progress: SIGKILL everything at this instant.
    stop_deadline: Option<Instant>,
    stopping: bool,
    exit_when_stopped: bool,
    /// Restart at once on the next unexpected exit (normal exit codes listed).
    armed: Option<Vec<i32>>,
    log: Option<File>,
    log_size: u64,
}

/// Maximum bytes kept in the outbound buffer of a slow runner connection.
const MAX_OUT: usize = 4 << 20;
/// Longest line; longer output is split.
const MAX_LINE: usize = 16 << 10;

impl Shim {
    fn emit(&mut self, ev: &ShimEvent) {
        let Some(c) = &mut self.client else { return };
        let mut line = serde_json::to_vec(ev).expect("events serialize");
        line.push(b'\n');
        if c.out.len() + line.len() > MAX_OUT {
            // The runner is not reading; it will reconnect and get a Hello.
            self.client = None;
            return;
        }
        c.out.extend(line);
        self.flush();
    }

    fn flush(&mut self) {
        let Some(c) = &mut self.client else { return };
        while !c.out.is_empty() {
            let (a, _) = c.out.as_slices();
            match c.stream.write(a) {
                Ok(0) => {
                    self.client = None;
                    return;
                }
                Ok(n) => {
                    c.out.drain(..n);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(_) => {
                    self.client = None;
                    return;
                }
            }
        }
    }

    fn log_line(&mut self, stream: &'static str, bytes: &[u8]) {
        let line = String::from_utf8_lossy(bytes).to_string();
        let ts = now_ms();
        let rec = serde_json::json!({"ts": ts, "stream": stream, "line": line});
        let mut text = rec.to_string();
        text.push('\n');
        if self.log_size + text.len() as u64 > self.spec.log_max_bytes {
            // Bounded: keep the current file and one older.
            let old = self.spec.log_file.with_extension("log.1");
            let _ = std::fs::rename(&self.spec.log_file, old);
            self.log = open_log(&self.spec.log_file);
            self.log_size = 0;
        }
        if let Some(f) = &mut self.log {
            if f.write_all(text.as_bytes()).is_ok() {
                self.log_size += text.len() as u64;
            }
        }
        self.emit(&ShimEvent::Log {
            ts,
            stream: stream.to_string(),
            line,
        });
    }

    fn spawn_app(&mut self) {
        if self.app.is_some() {
            return;
        }
        // What the last run left behind (daemonized children) goes first.
        self.clear_leftovers();
        match spawn(&self.spec) {
            Ok((pid, out, err)) => {
                let started_ns = now_ns();
                let oom_before = self.spec.oom_counter.as_deref().map(oom_kills).unwrap_or(0);
                self.pipes.push(Pipe {
                    file: File::from(out),
                    stream: "stdout",
                    buf: Vec::new(),
                });
                self.pipes.push(Pipe {
                    file: File::from(err),
                    stream: "stderr",
                    buf: Vec::new(),
                });
                self.app = Some(App {
                    pid,
                    started_ns,
                    oom_before,
                });
                self.emit(&ShimEvent::Started { pid, started_ns });
                for p in self.spec.late_cgroup_procs.clone() {
                    if let Err(e) = std::fs::write(&p, pid.to_string()) {
                        self.log_line(
                            "stderr",
                            format!(
                                "paddock-shim: cannot move the app into {}: {e}",
                                p.display()
                            )
                            .as_bytes(),
                        );
                    }
                }
            }
            Err(e) => {
                let exit = ExitInfo {
                    pid: 0,
                    code: Some(127),
                    signal: None,
                    oom: false,
                    at: now_ms(),
                    restarted: false,
                };
                self.log_line(
                    "stderr",
                    format!("paddock-shim: cannot start the app: {e}").as_bytes(),
                );
                self.last_exit = Some(exit.clone());
                self.emit(&ShimEvent::Error {
                    message: format!("cannot start the app: {e}"),
                });
                self.emit(&ShimEvent::Exited(exit));
            }
        }
    }

    fn reap(&mut self) {
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => self.on_exit(pid.as_raw(), Some(code), None),
                Ok(WaitStatus::Signaled(pid, sig, _)) => {
                    self.on_exit(pid.as_raw(), None, Some(sig as i32))
                }
                Ok(WaitStatus::StillAlive) | Err(_) => return,
                Ok(_) => {}
            }
        }
    }

    fn on_exit(&mut self, pid: i32, code: Option<i32>, signal: Option<i32>) {
        let Some(app) = &self.app else { return }; // a reparented orphan
        if app.pid != pid {
            return;
        }
        let oom = match &self.spec.oom_counter {
            Some(p) => oom_kills(p) > app.oom_before,
            None => false,
        };
        let normal = code.is_some_and(|c| self.armed.as_ref().is_some_and(|n| n.contains(&c)));
        let restart = !self.stopping && self.armed.is_some() && !normal;
        let exit = ExitInfo {
            pid,
            code,
            signal,
            oom,
            at: now_ms(),
            restarted: restart,
        };
        self.app = None;
        self.last_exit = Some(exit.clone());
        self.emit(&ShimEvent::Exited(exit));
        if self.stopping {
            self.finish_stop();
        } else if restart {
            self.armed = None;
            self.spawn_app();
        }
    }

    /// Kills whatever is left of the instance and waits (bounded) until it is gone,
    /// so a `Start` after `Stopped` never races the old processes for the port.
    fn clear_leftovers(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let me = std::process::id() as i32;
            let left = !descendants(me).is_empty()
                || !cgroup_pids(self.spec.cgroup_kill.as_ref()).is_empty();
            if !left || Instant::now() > deadline {
                return;
            }
            kill_everything(self.spec.cgroup_kill.as_ref());
            std::thread::sleep(Duration::from_millis(2));
            self.reap();
        }
    }

    fn finish_stop(&mut self) {
        self.clear_leftovers();
        self.stopping = false;
        self.stop_deadline = None;
        self.emit(&ShimEvent::Stopped);
    }

    fn command(&mut self, cmd: ShimCommand) {
        match cmd {
            ShimCommand::Start => self.spawn_app(),
            ShimCommand::Signal { sig } => {
                if let (Some(app), Ok(s)) = (&self.app, Signal::try_from(sig)) {
                    let _ = kill(Pid::from_raw(app.pid), s);
                }
            }
            ShimCommand::Stop { sig, grace_ms } => self.stop(sig, grace_ms),
            ShimCommand::Arm { normal_exit } => self.armed = Some(normal_exit),
            ShimCommand::Disarm => self.armed = None,
            ShimCommand::Exit => {
                self.exit_when_stopped = true;
                self.stop(Signal::SIGKILL as i32, 0);
            }
        }
    }

    fn stop(&mut self, sig: i32, grace_ms: u64) {
        match &self.app {
            Some(app) => {
                let s = Signal::try_from(sig).unwrap_or(Signal::SIGTERM);
                // The app leads its own process group (setsid): signal the group.
                let _ = kill(Pid::from_raw(-app.pid), s);
                let _ = kill(Pid::from_raw(app.pid), s);
                self.stopping = true;
                self.stop_deadline = Some(Instant::now() + Duration::from_millis(grace_ms));
            }
            None => self.finish_stop(),
        }
    }

    fn read_client(&mut self) {
        let mut buf = [0u8; 8192];
        let mut closed = false;
        if let Some(c) = &mut self.client {
            loop {
                match c.stream.read(&mut buf) {
                    Ok(0) => {
                        closed = true;
                        break;
                    }
                    Ok(n) => c.inbuf.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(_) => {
                        closed = true;
                        break;
                    }
                }
            }
        }
        let mut cmds = Vec::new();
        if let Some(c) = &mut self.client {
            while let Some(i) = c.inbuf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = c.inbuf.drain(..=i).collect();
                match serde_json::from_slice::<ShimCommand>(&line) {
                    Ok(cmd) => cmds.push(Ok(cmd)),
                    Err(e) => cmds.push(Err(e.to_string())),
                }
            }
        }
        if closed {
            self.client = None;
        }
        for c in cmds {
            match c {
                Ok(cmd) => self.command(cmd),
                Err(e) => self.emit(&ShimEvent::Error {
                    message: format!("bad command: {e}"),
                }),
            }
        }
    }

    fn accept(&mut self) {
        while let Ok((stream, _)) = self.listener.accept() {
            let _ = stream.set_nonblocking(true);
            self.client = Some(Client {
                stream,
                inbuf: Vec::new(),
                out: VecDeque::new(),
            });
            let hello = ShimEvent::Hello {
                proto: crate::shim_proto::SHIM_PROTO,
                pid: self.app.as_ref().map(|a| a.pid),
                started_ns: self.app.as_ref().map(|a| a.started_ns),
                last_exit: self.last_exit.clone(),
            };
            self.emit(&hello);
        }
    }

    fn read_pipe(&mut self, i: usize) -> bool {
        let mut buf = [0u8; 16384];
        let mut lines = Vec::new();
        let eof;
        {
            let p = &mut self.pipes[i];
            match p.file.read(&mut buf) {
                Ok(0) => eof = true,
                Ok(n) => {
                    eof = false;
                    p.buf.extend_from_slice(&buf[..n]);
                    while let Some(pos) = p.buf.iter().position(|b| *b == b'\n') {
                        let mut l: Vec<u8> = p.buf.drain(..=pos).collect();
                        l.pop();
                        lines.push(l);
                    }
                    while p.buf.len() > MAX_LINE {
                        lines.push(p.buf.drain(..MAX_LINE).collect());
                    }
                }
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::Interrupted =>
                {
                    eof = false
                }
                Err(_) => eof = true,
            }
            if eof && !p.buf.is_empty() {
                lines.push(std::mem::take(&mut p.buf));
            }
        }
        let stream = self.pipes[i].stream;
        for l in lines {
            self.log_line(stream, &l);
        }
        eof
    }
}

fn open_log(path: &Path) -> Option<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .ok()
}

/// The words of a command line that needs no shell (no quoting, expansion,
/// redirection, globbing or assignments); `None` when `sh -c` must parse it.
pub fn plain_words(command: &str) -> Option<Vec<&str>> {
    const SHELL: &[char] = &[
        '|', '&', ';', '<', '>', '(', ')', '$', '`', '\\', '"', '\'', '*', '?', '[', ']', '#', '~',
        '=', '%', '{', '}', '\n',
    ];
    if command.contains(SHELL) {
        return None;
    }
    let words: Vec<&str> = command.split_whitespace().collect();
    (!words.is_empty()).then_some(words)
}

/// The program and arguments to exec for a spec: `argv` as given, a plain command
/// line split into words, or `sh -c 'exec COMMAND'` when it has shell syntax (the
/// tracked pid is the app's own in every case).
pub fn program(spec: &ShimSpec) -> Vec<String> {
    if let Some(argv) = spec.argv.as_ref().filter(|a| !a.is_empty()) {
        return argv.clone();
    }
    match plain_words(&spec.command) {
        Some(words) => words.into_iter().map(String::from).collect(),
        None => vec![
            "/bin/sh".into(),
            "-c".into(),
            format!("exec {}", spec.command),
        ],
    }
}

/// fork + exec the app: own session, cgroups joined, rlimits, umask 077, the app's
/// user and group, its `dir` entered as that user, default signals, nothing but
/// stdio inherited, a clean environment.
fn spawn(spec: &ShimSpec) -> std::io::Result<(i32, OwnedFd, OwnedFd)> {
    let mut prepared = crate::child::Prepared::new(
        &spec.cgroup_procs,
        spec.uid,
        spec.gid,
        spec.nofile,
        spec.nproc,
        &spec.dir,
    )?;
    if let Some(m) = &spec.app_mount {
        // A new, empty writable layer at every start: what the app wrote to
        // `/app` last time is gone, as on Heroku.
        let (upper, work) = crate::release::fresh_layers(&m.layers, (spec.uid, spec.gid))?;
        prepared = prepared.with_mount(crate::child::AppMount::overlay(&m.lower, &upper, &work)?);
    }
    let (out_r, out_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let (err_r, err_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    for fd in [&out_r, &err_r] {
        nix::fcntl::fcntl(
            fd.as_raw_fd(),
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        )?;
    }
    let argv = program(spec);
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .env_clear()
        .envs(&spec.env)
        .stdin(Stdio::null())
        .stdout(Stdio::from(out_w))
        .stderr(Stdio::from(err_w));
    // SAFETY: only syscalls on memory prepared before the fork (see child.rs).
    unsafe {
        cmd.pre_exec(move || {
            // The shim is never the OOM killer's pick; the app is an ordinary process.
            let _ = std::fs::write("/proc/self/oom_score_adj", "0");
            nix::unistd::setsid()?;
            prepared.apply()
        });
    }
    let child = cmd.spawn()?;
    Ok((child.id() as i32, out_r, err_r))
}

/// The shim's main: `paddock-shim <instance dir>`. Returns the exit code.
pub fn run(dir: &Path) -> i32 {
    let spec: ShimSpec = match std::fs::read(dir.join("spec.json"))
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
    {
        Ok(s) => s,
        Err(e) => {
            eprintln!("paddock-shim: cannot read {}/spec.json: {e}", dir.display());
            return 78;
        }
    };
    // SAFETY: prctl with integer arguments.
    unsafe {
        libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
    }
    let me = std::process::id().to_string();
    for p in &spec.shim_cgroup_procs {
        if let Err(e) = std::fs::write(p, &me) {
            eprintln!("paddock-shim: cannot join {}: {e}", p.display());
        }
    }
    if !spec.shim_cgroup_procs.is_empty() {
        let _ = std::fs::write("/proc/self/oom_score_adj", "-1000");
    }
    let mut mask = SigSet::empty();
    for s in [
        Signal::SIGCHLD,
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
    ] {
        mask.add(s);
    }
    if mask.thread_block().is_err() {
        return 71;
    }
    // SAFETY: ignoring SIGPIPE; writes to a closed socket return EPIPE instead.
    unsafe {
        let _ = nix::sys::signal::signal(Signal::SIGPIPE, nix::sys::signal::SigHandler::SigIgn);
    }
    let sfd = match SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC) {
        Ok(s) => s,
        Err(_) => return 71,
    };
    let sock: PathBuf = dir.join("shim.sock");
    let _ = std::fs::remove_file(&sock);
    let listener = match UnixListener::bind(&sock) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("paddock-shim: cannot bind {}: {e}", sock.display());
            return 71;
        }
    };
    let _ = listener.set_nonblocking(true);
    let _ = std::fs::write(dir.join("shim.pid"), std::process::id().to_string());
    let log = open_log(&spec.log_file);
    let log_size = std::fs::metadata(&spec.log_file)
        .map(|m| m.len())
        .unwrap_or(0);
    let mut shim = Shim {
        spec,
        listener,
        client: None,
        pipes: Vec::new(),
        app: None,
        last_exit: None,
        stop_deadline: None,
        stopping: false,
        exit_when_stopped: false,
        armed: None,
        log,
        log_size,
    };
    shim.spawn_app();
    loop {
        if shim.exit_when_stopped && !shim.stopping && shim.app.is_none() {
            shim.flush();
            return 0;
        }
        let timeout = match shim.stop_deadline {
            Some(d) => PollTimeout::try_from(
                d.saturating_duration_since(Instant::now())
                    .as_millis()
                    .min(60_000) as i32,
            )
            .unwrap_or(PollTimeout::ZERO),
            None => PollTimeout::NONE,
        };
        let (sig_ready, lis_ready, cli_ready, cli_write, pipe_ready) = {
            let mut fds = vec![
                PollFd::new(sfd.as_fd(), PollFlags::POLLIN),
                PollFd::new(shim.listener.as_fd(), PollFlags::POLLIN),
            ];
            let has_client = shim.client.is_some();
            if let Some(c) = &shim.client {
                let mut f = PollFlags::POLLIN;
                if !c.out.is_empty() {
                    f |= PollFlags::POLLOUT;
                }
                fds.push(PollFd::new(c.stream.as_fd(), f));
            }
            let first_pipe = fds.len();
            for p in &shim.pipes {
                fds.push(PollFd::new(p.file.as_fd(), PollFlags::POLLIN));
            }
            match poll(&mut fds, timeout) {
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(_) => return 71,
            }
            let r = |i: usize| fds[i].revents().map(|e| !e.is_empty()).unwrap_or(false);
            let pipes: Vec<bool> = (first_pipe..fds.len()).map(r).collect();
            let cw = has_client
                && fds[2]
                    .revents()
                    .map(|e| e.contains(PollFlags::POLLOUT))
                    .unwrap_or(false);
            (r(0), r(1), has_client && r(2), cw, pipes)
        };
        // Pipes first, so the last lines of a dying app precede its exit event.
        let mut closed = Vec::new();
        for (i, ready) in pipe_ready.iter().enumerate() {
            if *ready && shim.read_pipe(i) {
                closed.push(i);
            }
        }
        for i in closed.into_iter().rev() {
            shim.pipes.remove(i);
        }
        if sig_ready {
            while let Ok(Some(info)) = sfd.read_signal() {
                let s = info.ssi_signo as i32;
                if s == Signal::SIGTERM as i32 || s == Signal::SIGINT as i32 {
                    // Asked to go away (dev down, node shutdown): nothing survives.
                    shim.exit_when_stopped = true;
                    shim.stop(Signal::SIGTERM as i32, 2000);
                }
            }
            shim.reap();
        }
        if lis_ready {
            shim.accept();
        }
        if cli_ready {
            shim.read_client();
        }
        if cli_write {
            shim.flush();
        }
        if let Some(d) = shim.stop_deadline {
            if Instant::now() >= d {
                shim.stop_deadline = None;
                kill_everything(shim.spec.cgroup_kill.as_ref());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_commands_skip_the_shell() {
        assert_eq!(
            plain_words("python3 -u app.py"),
            Some(vec!["python3", "-u", "app.py"])
        );
        assert_eq!(
            plain_words("  gunicorn  app:app "),
            Some(vec!["gunicorn", "app:app"])
        );
        for c in [
            "echo $PORT",
            "a | b",
            "FOO=1 x",
            "sh -c 'x'",
            "run > log",
            "ls *.py",
            "",
        ] {
            assert_eq!(plain_words(c), None, "{c}");
        }
    }
}
