//! Health checks: a TCP connect, or an HTTP GET that must answer 2xx/3xx.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Debug, Clone, PartialEq)]
pub enum Check {
    Http(String),
    Tcp,
    /// A worker with no port: up once it has stayed alive a while.
    None,
}

/// A failed check, said for a person (what was tried and what came back).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct Unhealthy(pub String);

/// One check against 127.0.0.1:`port`, bounded by `timeout`.
pub async fn probe(check: &Check, port: u16, timeout: Duration) -> Result<(), Unhealthy> {
    probe_inner(check, port, timeout).await.map_err(Unhealthy)
}

async fn probe_inner(check: &Check, port: u16, timeout: Duration) -> Result<(), String> {
    let attempt = async {
        match check {
            Check::None => Ok(()),
            Check::Tcp => TcpStream::connect(("127.0.0.1", port))
                .await
                .map(|_| ())
                .map_err(|e| format!("connect to port {port}: {e}")),
            Check::Http(path) => {
                let mut s = TcpStream::connect(("127.0.0.1", port))
                    .await
                    .map_err(|e| format!("connect to port {port}: {e}"))?;
                let req = format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: paddock-runner\r\nConnection: close\r\n\r\n");
                s.write_all(req.as_bytes())
                    .await
                    .map_err(|e| e.to_string())?;
                let mut buf = vec![0u8; 256];
                let mut n = 0;
                while n < 12 {
                    let r = s.read(&mut buf[n..]).await.map_err(|e| e.to_string())?;
                    if r == 0 {
                        break;
                    }
                    n += r;
                }
                let head = String::from_utf8_lossy(&buf[..n]);
                let code: u16 = head
                    .split_whitespace()
                    .nth(1)
                    .and_then(|c| c.parse().ok())
                    .ok_or_else(|| format!("GET {path}: not an HTTP answer"))?;
                if (200..400).contains(&code) {
                    Ok(())
                } else {
                    Err(format!("GET {path} answered {code}"))
                }
            }
        }
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {timeout:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    async fn serve(status: &'static str) -> u16 {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let mut b = [0u8; 512];
                let _ = s.read(&mut b).await;
                let _ = s
                    .write_all(format!("HTTP/1.0 {status}\r\n\r\n").as_bytes())
                    .await;
            }
        });
        port
    }

    #[tokio::test]
    async fn http_accepts_2xx_3xx_only() {
        let t = Duration::from_secs(2);
        let ok = serve("200 OK").await;
        assert!(probe(&Check::Http("/".into()), ok, t).await.is_ok());
        let redirect = serve("302 Found").await;
        assert!(probe(&Check::Http("/".into()), redirect, t).await.is_ok());
        let bad = serve("503 Unavailable").await;
        let e = probe(&Check::Http("/health".into()), bad, t)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("503"), "{e}");
        assert!(probe(&Check::Tcp, ok, t).await.is_ok());
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        assert!(probe(&Check::Tcp, closed, t).await.is_err());
    }
}
