//! A real HTTP backend for the balancer's tests (never installed):
//! `paddock-test-backend ID 127.0.0.1:PORT`. Every answer names the backend
//! (`x-backend`) and the number of the connection it came on (`x-conn`).
//! - `/sleep/MS`: answers after MS milliseconds;
//! - `/headers`: the request's headers as JSON;
//! - `/big/N`: N bytes;
//! - `/health`: 503 while the file `$PADDOCK_TEST_BACKEND_SICK` exists, else 200;
//! - `/ws`: a websocket handshake (101 with Sec-WebSocket-Accept), then every byte
//!   received is sent back;
//! - `/hold/FILE`: answers once FILE exists (released by the test);
//! - `/early`: 401 at once, without reading the request body;
//! - `/stall`: a 200 head promising 100 bytes, 10 of them, then nothing (the
//!   connection stays open for 10 minutes): a backend stalled mid-body;
//! - `/vanish/ID`: on backend ID, reads the whole request, then the process
//!   exits without answering (a backend that dies holding a request); any other
//!   backend answers it as usual;
//! - any request with a body: answers with the body's length.

use std::convert::Infallible;
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn answer(
    id: String,
    conn: u64,
    mut req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_string();
    let resp = |status: StatusCode, body: Vec<u8>| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r.headers_mut().insert("x-backend", id.parse().unwrap());
        r.headers_mut().insert("x-conn", conn.into());
        r
    };
    if let Some(ms) = path.strip_prefix("/sleep/") {
        let ms: u64 = ms.parse().unwrap_or(0);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        return Ok(resp(
            StatusCode::OK,
            format!("{id} slept {ms}\n").into_bytes(),
        ));
    }
    if let Some(file) = path.strip_prefix("/hold") {
        // Answers once FILE exists (a test releases it), at most after 30 s.
        for _ in 0..3000 {
            if std::path::Path::new(file).exists() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        return Ok(resp(
            StatusCode::OK,
            format!("{id} released\n").into_bytes(),
        ));
    }
    if path.strip_prefix("/vanish/") == Some(id.as_str()) {
        let _ = req.into_body().collect().await;
        std::process::exit(3);
    }
    if path == "/early" {
        // Answers before reading the request body (as an auth check does).
        return Ok(resp(StatusCode::UNAUTHORIZED, b"early\n".to_vec()));
    }
    if path == "/headers" {
        let m: serde_json::Map<String, serde_json::Value> = req
            .headers()
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    serde_json::Value::String(v.to_str().unwrap_or("").into()),
                )
            })
            .collect();
        return Ok(resp(StatusCode::OK, serde_json::to_vec(&m).unwrap()));
    }
    if let Some(n) = path.strip_prefix("/big/") {
        let n: usize = n.parse().unwrap_or(0);
        return Ok(resp(StatusCode::OK, vec![b'x'; n]));
    }
    if path == "/health" {
        let sick = std::env::var_os("PADDOCK_TEST_BACKEND_SICK")
            .is_some_and(|p| std::path::Path::new(&p).exists());
        return Ok(resp(
            if sick {
                StatusCode::SERVICE_UNAVAILABLE
            } else {
                StatusCode::OK
            },
            b"health\n".to_vec(),
        ));
    }
    if path == "/ws" {
        let key = req
            .headers()
            .get("sec-websocket-key")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let accept = {
            let mut d = ring::digest::Context::new(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY);
            d.update(key.as_bytes());
            d.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
            base64::engine::general_purpose::STANDARD.encode(d.finish())
        };
        let up = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(u) = up.await {
                let mut io = TokioIo::new(u);
                let mut buf = [0u8; 4096];
                while let Ok(n) = io.read(&mut buf).await {
                    if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        });
        let mut r = resp(StatusCode::SWITCHING_PROTOCOLS, Vec::new());
        let h = r.headers_mut();
        h.insert("upgrade", "websocket".parse().unwrap());
        h.insert("connection", "upgrade".parse().unwrap());
        h.insert("sec-websocket-accept", accept.parse().unwrap());
        return Ok(r);
    }
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes().len())
        .unwrap_or(0);
    if body > 0 {
        return Ok(resp(
            StatusCode::OK,
            format!("{id} got {body} bytes\n").into_bytes(),
        ));
    }
    Ok(resp(StatusCode::OK, format!("{id} {path}\n").into_bytes()))
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (id, addr) = match &args[..] {
        [_, id, addr] => (id.clone(), addr.clone()),
        _ => {
            eprintln!("usage: paddock-test-backend ID HOST:PORT");
            std::process::exit(64);
        }
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let l = tokio::net::TcpListener::bind(&addr)
            .await
            .unwrap_or_else(|e| {
                eprintln!("cannot listen on {addr}: {e}");
                std::process::exit(71);
            });
        let mut conns = 0u64;
        loop {
            let Ok((s, _)) = l.accept().await else {
                continue;
            };
            let id = id.clone();
            conns += 1;
            let conn = conns;
            tokio::spawn(async move {
                let mut first = [0u8; 11];
                if matches!(s.peek(&mut first).await, Ok(11)) && &first == b"GET /stall " {
                    let mut s = s;
                    let mut buf = [0u8; 4096];
                    let _ = s.read(&mut buf).await;
                    let _ = s
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n0123456789")
                        .await;
                    tokio::time::sleep(Duration::from_secs(600)).await;
                    return;
                }
                let svc = hyper::service::service_fn(move |r| answer(id.clone(), conn, r));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .with_upgrades()
                    .await;
            });
        }
    });
}
