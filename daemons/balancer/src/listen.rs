//! The public listening sockets: taken from a supervisor or a predecessor
//! (`LISTEN_FDS`, systemd's protocol) or bound here; the accept loops; and the
//! handoff to a successor process on upgrade.
//!
//! `LISTEN_FDS=N` names fds 3..3+N, `LISTEN_FDNAMES=http:https:admin` which is
//! which (by position when absent). `LISTEN_PID`, when set, must be this process;
//! Paddock's own supervisor and the upgrade cannot know the child's pid before it
//! starts, so they leave it unset.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};

use crate::proxy::{self, stopped, ConnInfo, Proto, Shared};

pub const NAMES: [&str; 3] = ["http", "https", "admin"];

/// The fds a supervisor or predecessor passed, by name.
pub fn inherited() -> anyhow::Result<HashMap<String, OwnedFd>> {
    let mut out = HashMap::new();
    let Ok(n) = std::env::var("LISTEN_FDS") else {
        return Ok(out);
    };
    let n: i32 = n
        .parse()
        .with_context(|| format!("LISTEN_FDS={n:?} is not a number"))?;
    if let Ok(pid) = std::env::var("LISTEN_PID") {
        if pid.parse::<u32>().ok() != Some(std::process::id()) {
            // Meant for another process (systemd's rule): use none of them.
            return Ok(out);
        }
    }
    let given = std::env::var("LISTEN_FDNAMES").unwrap_or_default();
    let names = fd_names(n.clamp(0, 16) as usize, &given)?;
    for i in 0..n.clamp(0, 16) {
        let fd = 3 + i;
        // SAFETY: fcntl on an fd number only reads its flags.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            bail!("LISTEN_FDS={n} but fd {fd} is not open");
        }
        // SAFETY: the fd is open and was handed to this process to own.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sets close-on-exec on an fd we own.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        let name = names
            .get(i as usize)
            .cloned()
            .unwrap_or_else(|| format!("fd{fd}"));
        out.insert(name, owned);
    }
    for v in ["LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"] {
        std::env::remove_var(v);
    }
    Ok(out)
}

/// Which listener each passed fd is. Names we know are used as given; any other
/// (systemd's default is the socket unit's name) falls back to the position:
/// http, https, admin. Two fds of one name are refused.
pub fn fd_names(n: usize, given: &str) -> anyhow::Result<Vec<String>> {
    let given: Vec<&str> = if given.is_empty() {
        Vec::new()
    } else {
        given.split(':').collect()
    };
    let names: Vec<String> = (0..n)
        .map(|i| match given.get(i) {
            Some(g) if NAMES.contains(g) => g.to_string(),
            _ => NAMES
                .get(i)
                .map(|s| s.to_string())
                .unwrap_or_else(|| format!("fd{}", 3 + i)),
        })
        .collect();
    for (i, a) in names.iter().enumerate() {
        if names[..i].contains(a) {
            bail!("LISTEN_FDNAMES names two sockets `{a}` (one socket unit per listener: FileDescriptorName names every socket of its unit)");
        }
    }
    Ok(names)
}

/// A listening TCP socket: the inherited one of that name, else bound to `addr`.
pub fn listener(
    inherited: &mut HashMap<String, OwnedFd>,
    name: &str,
    addr: SocketAddr,
) -> anyhow::Result<TcpListener> {
    let l = match inherited.remove(name) {
        Some(fd) => {
            let l = TcpListener::from(fd);
            let got = l
                .local_addr()
                .with_context(|| format!("the inherited `{name}` fd is not a TCP socket"))?;
            let mut listening: libc::c_int = 0;
            let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
            // SAFETY: reads an int socket option into a local of the right size.
            let rc = unsafe {
                libc::getsockopt(
                    l.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_ACCEPTCONN,
                    &mut listening as *mut _ as *mut libc::c_void,
                    &mut len,
                )
            };
            if rc != 0 || listening == 0 {
                bail!("the inherited `{name}` fd ({got}) is not listening");
            }
            if got.port() != addr.port() {
                tracing::warn!("the inherited `{name}` socket listens on {got}, the cluster file says {addr}; serving on {got}");
            }
            tracing::info!("{name}: serving on inherited socket {got}");
            l
        }
        None => {
            let l = TcpListener::bind(addr)
                .with_context(|| format!("cannot listen on {addr} ({name})"))?;
            tracing::info!("{name}: listening on {addr}");
            l
        }
    };
    // A deep accept queue: connections wait there while the process restarts.
    // SAFETY: listen on our own listening socket only resizes its backlog.
    unsafe { libc::listen(l.as_raw_fd(), 4096) };
    l.set_nonblocking(true)?;
    Ok(l)
}

/// A public listener: what it speaks.
pub struct Public {
    pub listener: TcpListener,
    pub proto: Proto,
    pub tls: Option<tokio_rustls::TlsAcceptor>,
}

struct Ready {
    listener: tokio::net::TcpListener,
    proto: Proto,
    tls: Option<tokio_rustls::TlsAcceptor>,
    port: u16,
}

/// An accepted connection on its way to the proxy thread that will serve it.
pub struct Accepted {
    stream: std::net::TcpStream,
    peer: SocketAddr,
    proto: Proto,
    port: u16,
    tls: Option<tokio_rustls::TlsAcceptor>,
    permit: tokio::sync::OwnedSemaphorePermit,
}

/// The proxy threads' inboxes and how many connections each serves now.
pub struct Workers {
    pub inboxes: Vec<tokio::sync::mpsc::UnboundedSender<Accepted>>,
    pub load: Arc<[std::sync::atomic::AtomicUsize]>,
}

/// Accepts on the HTTP and HTTPS listeners until shutdown starts, at most
/// `max_connections` at once: with every slot taken it accepts nothing, so the
/// rest wait in the kernel's queue (HAProxy's maxconn). Each connection goes to
/// the proxy thread serving the fewest (the kernel would wake one thread for a
/// burst of connections and leave the others idle).
pub async fn accept_loop(
    shared: Arc<Shared>,
    public: Vec<Public>,
    slots: Arc<tokio::sync::Semaphore>,
    workers: Workers,
) {
    let mut ls = Vec::new();
    for p in public {
        let port = p.listener.local_addr().map(|a| a.port()).unwrap_or(0);
        match tokio::net::TcpListener::from_std(p.listener) {
            Ok(listener) => ls.push(Ready {
                listener,
                proto: p.proto,
                tls: p.tls,
                port,
            }),
            Err(e) => {
                tracing::error!("cannot register the {:?} listener: {e}", p.proto);
                return;
            }
        }
    }
    let Some(first) = ls.first() else { return };
    let second = ls.get(1);
    let mut stop = shared.shutdown.subscribe();
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            _ = stopped(&mut stop) => return,
        };
        let (l, accepted) = tokio::select! {
            r = first.listener.accept() => (first, r),
            r = async {
                match second {
                    Some(s) => s.listener.accept().await,
                    None => std::future::pending().await,
                }
            } => (second.unwrap_or(first), r),
            _ = stopped(&mut stop) => return,
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: back off a little, never spin.
                tracing::warn!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let Ok(stream) = stream.into_std() else {
            continue;
        };
        let w = (0..workers.inboxes.len())
            .min_by_key(|i| workers.load[*i].load(Relaxed))
            .unwrap_or(0);
        let a = Accepted {
            stream,
            peer,
            proto: l.proto,
            port: l.port,
            tls: l.tls.clone(),
            permit,
        };
        workers.load[w].fetch_add(1, Relaxed);
        // Counted active from here, not from when its thread picks it up: a
        // shutdown waits for a connection still in an inbox too.
        shared.global.connections_active.fetch_add(1, Relaxed);
        if workers.inboxes[w].send(a).is_err() {
            workers.load[w].fetch_sub(1, Relaxed);
            shared.global.connections_active.fetch_sub(1, Relaxed);
        }
    }
}

/// One proxy thread's part: serves every connection it is handed, on its own
/// runtime, until the acceptor is gone.
pub async fn serve_loop(
    shared: Arc<Shared>,
    mut inbox: tokio::sync::mpsc::UnboundedReceiver<Accepted>,
    load: Arc<[std::sync::atomic::AtomicUsize]>,
    me: usize,
) {
    while let Some(a) = inbox.recv().await {
        let Ok(stream) = tokio::net::TcpStream::from_std(a.stream) else {
            load[me].fetch_sub(1, Relaxed);
            shared.global.connections_active.fetch_sub(1, Relaxed);
            continue;
        };
        let sh = shared.clone();
        let load = load.clone();
        let info = ConnInfo::new(a.peer, a.proto, a.port);
        let (tls, permit) = (a.tls, a.permit);
        tokio::spawn(async move {
            sh.global.connections_total.fetch_add(1, Relaxed);
            match tls {
                None => proxy::serve(sh.clone(), stream, info).await,
                Some(acc) => {
                    match tokio::time::timeout(sh.settings.header_timeout, acc.accept(stream)).await
                    {
                        Ok(Ok(s)) => proxy::serve(sh.clone(), s, info).await,
                        // The client left (or never spoke) before a handshake:
                        // a port probe, a browser's spare connection.
                        Ok(Err(e))
                            if matches!(
                                e.kind(),
                                std::io::ErrorKind::UnexpectedEof
                                    | std::io::ErrorKind::ConnectionReset
                                    | std::io::ErrorKind::BrokenPipe
                            ) =>
                        {
                            sh.global.tls_abandoned.fetch_add(1, Relaxed);
                        }
                        Err(_) => {
                            sh.global.tls_abandoned.fetch_add(1, Relaxed);
                        }
                        // A handshake that failed: no certificate for the name,
                        // no common version or cipher, garbage.
                        Ok(Err(e)) => {
                            sh.global.tls_handshake_failures.fetch_add(1, Relaxed);
                            tracing::debug!(peer = %info.peer, "TLS handshake failed: {e}");
                        }
                    }
                }
            }
            sh.global.connections_active.fetch_sub(1, Relaxed);
            load[me].fetch_sub(1, Relaxed);
            drop(permit);
        });
    }
}

/// Starts this same program with the listening sockets (as `LISTEN_FDS`) and
/// waits until it says it accepts on them (a byte on a pipe), or `timeout`.
pub fn spawn_successor(fds: &[(String, RawFd)], timeout: Duration) -> anyhow::Result<u32> {
    let (rd, wr) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    // After the binary was replaced (a package upgrade renames the new one into
    // place), /proc/self/exe says "PATH (deleted)": PATH is the new binary.
    let exe = std::env::current_exe()?;
    let exe = match exe.to_str().and_then(|s| s.strip_suffix(" (deleted)")) {
        Some(s) => std::path::PathBuf::from(s),
        None => exe,
    };
    let mut cmd = std::process::Command::new(exe);
    cmd.args(std::env::args_os().skip(1))
        .env("LISTEN_FDS", fds.len().to_string())
        .env(
            "LISTEN_FDNAMES",
            fds.iter()
                .map(|(n, _)| n.as_str())
                .collect::<Vec<_>>()
                .join(":"),
        )
        .env("PADDOCK_READY_FD", (3 + fds.len()).to_string())
        .env("PADDOCK_TAKEOVER_WAIT_MS", "30000")
        .env("PADDOCK_PREDECESSOR_PID", std::process::id().to_string())
        .env_remove("LISTEN_PID")
        .stdin(std::process::Stdio::null());
    let mut sources: Vec<RawFd> = fds.iter().map(|(_, fd)| *fd).collect();
    sources.push(wr.as_raw_fd());
    paddock_daemon::pass_fds(&mut cmd, &sources);
    let mut child = cmd.spawn().context("starting the successor balancer")?;
    drop(wr);
    let pid = child.id();
    let mut pfd = [nix::poll::PollFd::new(
        std::os::fd::AsFd::as_fd(&rd),
        nix::poll::PollFlags::POLLIN,
    )];
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    let ready = matches!(nix::poll::poll(&mut pfd, nix::poll::PollTimeout::try_from(ms).unwrap_or(nix::poll::PollTimeout::MAX)), Ok(n) if n > 0)
        && {
            let mut b = [0u8; 1];
            matches!(nix::unistd::read(rd.as_raw_fd(), &mut b), Ok(1))
        };
    if !ready {
        let _ = child.kill();
        let _ = child.wait();
        bail!("the successor (pid {pid}) did not start serving within {timeout:?}; this process keeps serving");
    }
    // The successor is reparented when this process exits; nothing waits for it here.
    std::mem::forget(child);
    Ok(pid)
}

/// What an upgrade's predecessor handed this process: the pipe to say "ready"
/// on, and a pidfd of the predecessor itself. Taken from the environment once,
/// first thing, while this process has no other thread (changing the
/// environment is only sound then).
pub struct Handed {
    ready: Option<OwnedFd>,
    predecessor: Option<OwnedFd>,
}

pub fn take_handed() -> Handed {
    let ready = std::env::var("PADDOCK_READY_FD")
        .ok()
        .and_then(|v| v.parse::<RawFd>().ok())
        // SAFETY: the fd was handed to us for one write; we own and close it.
        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) });
    let predecessor = std::env::var("PADDOCK_PREDECESSOR_PID")
        .ok()
        .and_then(|v| v.parse::<libc::pid_t>().ok())
        .and_then(|pid| {
            // SAFETY: pidfd_open takes a pid and flags and returns a new fd
            // (close-on-exec by the kernel's rule for pidfds) or -1.
            let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
            // SAFETY: a non-negative return is a new fd we own.
            (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
        });
    std::env::remove_var("PADDOCK_READY_FD");
    std::env::remove_var("PADDOCK_PREDECESSOR_PID");
    Handed { ready, predecessor }
}

impl Handed {
    /// Tells the process that started this one that the listeners are served.
    pub fn signal_ready(&mut self) {
        if let Some(f) = self.ready.take() {
            let _ = nix::unistd::write(&f, b"1");
        }
    }

    /// Whether the predecessor of an upgrade still runs (and may still have
    /// requests in flight to a backend this process sees drained).
    pub fn predecessor_running(&self) -> bool {
        let Some(fd) = &self.predecessor else {
            return false;
        };
        let mut p = [nix::poll::PollFd::new(
            std::os::fd::AsFd::as_fd(fd),
            nix::poll::PollFlags::POLLIN,
        )];
        // A pidfd is readable once its process has exited.
        !matches!(nix::poll::poll(&mut p, nix::poll::PollTimeout::ZERO), Ok(n) if n > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passed_fds_are_named_by_name_or_position() {
        assert_eq!(fd_names(2, "").unwrap(), ["http", "https"]);
        assert_eq!(fd_names(2, "https:http").unwrap(), ["https", "http"]);
        assert_eq!(
            fd_names(2, "paddock-balancer-http.socket:x").unwrap(),
            ["http", "https"]
        );
        let e = fd_names(2, "https:https").unwrap_err().to_string();
        assert!(e.contains("two sockets `https`"), "{e}");
        assert_eq!(fd_names(4, "").unwrap()[3], "fd6");
    }
}
