//! Keep-alive connections to one backend: idle HTTP/1.1 senders ready for their
//! next request, newest first (a warm connection is the likeliest still open).
//! One idle list per proxy thread: a connection's task runs on the thread that
//! made it, so a request reuses only its own thread's connections and never
//! wakes another thread.

use std::cell::Cell;
use std::net::SocketAddr;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;

use crate::proxy::ReqBody;

pub type Sender = SendRequest<ReqBody>;

static THREADS: OnceLock<usize> = OnceLock::new();
static IDLE_TTL: OnceLock<Duration> = OnceLock::new();

/// How long an idle connection is kept: less than the shortest keep-alive a
/// backend is likely to have (gunicorn closes after 2 s), so a request rarely
/// meets a connection the backend is closing.
pub fn set_idle_ttl(d: Duration) {
    let _ = IDLE_TTL.set(d);
}

thread_local! {
    static WORKER: Cell<usize> = const { Cell::new(usize::MAX) };
}

/// Called once, before any pool exists: how many proxy threads there are.
pub fn set_threads(n: usize) {
    let _ = THREADS.set(n.max(1));
}

/// Called first on each proxy thread.
pub fn set_worker(i: usize) {
    WORKER.with(|w| w.set(i));
}

fn slot(n: usize) -> usize {
    WORKER.with(|w| w.get()).min(n - 1)
}

/// One thread's idle connections, each with the time it went idle.
type Idle = Mutex<Vec<(Sender, Instant)>>;

pub struct Pool {
    /// One list per proxy thread, and one for any other thread.
    idle: Box<[Idle]>,
    cap: usize,
}

impl Pool {
    pub fn new(cap: usize) -> Pool {
        let n = THREADS.get().copied().unwrap_or(1) + 1;
        Pool {
            idle: (0..n).map(|_| Mutex::new(Vec::new())).collect(),
            cap,
        }
    }

    fn mine(&self) -> &Idle {
        &self.idle[slot(self.idle.len())]
    }

    /// A pooled connection the backend has not closed, ready for a request.
    pub async fn take(&self) -> Option<Sender> {
        let ttl = IDLE_TTL
            .get()
            .copied()
            .unwrap_or(Duration::from_millis(1500));
        loop {
            let (mut s, since) = self
                .mine()
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .pop()?;
            if s.is_closed() || since.elapsed() > ttl {
                continue;
            }
            if s.is_ready() {
                return Some(s);
            }
            // Its last exchange ended whole; the connection task may not have
            // marked it idle yet. Never wait long on one: a fresh connection is
            // better than a request stuck behind another.
            if let Ok(Ok(())) = tokio::time::timeout(Duration::from_millis(20), s.ready()).await {
                return Some(s);
            }
        }
    }

    pub fn put(&self, s: Sender) {
        if s.is_closed() {
            return;
        }
        let mut idle = self.mine().lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < self.cap {
            idle.push((s, Instant::now()));
        }
    }

    pub fn clear(&self) {
        for l in self.idle.iter() {
            l.lock().unwrap_or_else(|e| e.into_inner()).clear();
        }
    }

    pub fn idle(&self) -> usize {
        self.idle
            .iter()
            .map(|l| l.lock().unwrap_or_else(|e| e.into_inner()).len())
            .sum()
    }
}

/// Why a new connection could not be made (nothing was sent on it).
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect to {0} timed out")]
    Timeout(SocketAddr),
    #[error("connect to {0}: {1}")]
    Io(SocketAddr, std::io::Error),
    #[error("HTTP handshake with {0}: {1}")]
    Handshake(SocketAddr, hyper::Error),
}

impl ConnectError {
    /// The failure is this process's (out of file descriptors or kernel
    /// buffers), not the backend's: it must not count against the backend.
    pub fn is_local(&self) -> bool {
        matches!(self, ConnectError::Io(_, e) if matches!(
            e.raw_os_error(),
            Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
        ))
    }
}

/// A new keep-alive connection to `addr`; its connection task runs on the proxy's
/// runtime and ends when either side closes.
pub async fn connect(addr: SocketAddr, timeout: Duration) -> Result<Sender, ConnectError> {
    let stream = match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await {
        Err(_) => return Err(ConnectError::Timeout(addr)),
        Ok(Err(e)) => return Err(ConnectError::Io(addr, e)),
        Ok(Ok(s)) => s,
    };
    let _ = stream.set_nodelay(true);
    let (sender, conn) = hyper::client::conn::http1::Builder::new()
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|e| ConnectError::Handshake(addr, e))?;
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    Ok(sender)
}
