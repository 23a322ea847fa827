//! Keep-alive connections to one backend: idle HTTP/1.1 senders ready for their
//! next request, newest first (a warm connection is the likeliest still open).

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;

use crate::proxy::ReqBody;

pub type Sender = SendRequest<ReqBody>;

pub struct Pool {
    idle: Mutex<Vec<Sender>>,
    cap: usize,
}

impl Pool {
    pub fn new(cap: usize) -> Pool {
        Pool {
            idle: Mutex::new(Vec::new()),
            cap,
        }
    }

    /// A pooled connection the backend has not closed, ready for a request.
    pub async fn take(&self) -> Option<Sender> {
        loop {
            let s = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop()?;
            if s.is_closed() {
                continue;
            }
            if s.is_ready() {
                return Some(s);
            }
            // Its last response was read to the end; the connection task has not
            // marked it idle yet.
            let mut s = s;
            if s.ready().await.is_ok() {
                return Some(s);
            }
        }
    }

    pub fn put(&self, s: Sender) {
        if s.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < self.cap {
            idle.push(s);
        }
    }

    pub fn clear(&self) {
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    pub fn idle(&self) -> usize {
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).len()
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
