//! A small blocking HTTP/1.1 client for the balancer's tests: exact control of
//! the bytes sent (hostile requests), keep-alive connections, and a bounded load
//! loop that counts every failed request the way the issue defines it: a request
//! fails unless it is answered 2xx, except that a request on a *reused* keep-alive
//! connection that closed before any response byte is retried once on a fresh
//! connection (as browsers do).

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One client connection.
pub struct Conn {
    s: TcpStream,
    buf: Vec<u8>,
    pub used: bool,
}

impl Conn {
    pub fn connect(addr: SocketAddr) -> io::Result<Conn> {
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        s.set_nodelay(true)?;
        Ok(Conn {
            s,
            buf: Vec::new(),
            used: false,
        })
    }

    /// The socket itself (for an upgraded connection's bytes).
    pub fn stream(&mut self) -> &mut TcpStream {
        &mut self.s
    }

    pub fn send(&mut self, raw: &[u8]) -> io::Result<()> {
        self.s.write_all(raw)
    }

    /// The next response; `Ok(None)`: the connection closed before any byte of it.
    pub fn read(&mut self, head_only: bool) -> io::Result<Option<Resp>> {
        let mut chunk = [0u8; 16384];
        // The head.
        let (status, headers, head_len) = loop {
            let mut hs = [httparse::EMPTY_HEADER; 64];
            let mut r = httparse::Response::new(&mut hs);
            match r.parse(&self.buf) {
                Ok(httparse::Status::Complete(n)) => {
                    let h: Vec<(String, String)> = r
                        .headers
                        .iter()
                        .map(|h| {
                            (
                                h.name.to_string(),
                                String::from_utf8_lossy(h.value).into_owned(),
                            )
                        })
                        .collect();
                    break (r.code.unwrap_or(0), h, n);
                }
                Ok(httparse::Status::Partial) => {}
                Err(e) => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("bad response: {e}"),
                    ))
                }
            }
            let n = match self.s.read(&mut chunk) {
                Ok(n) => n,
                Err(e) if self.buf.is_empty() && e.kind() == io::ErrorKind::ConnectionReset => 0,
                Err(e) => return Err(e),
            };
            if n == 0 {
                if self.buf.is_empty() {
                    return Ok(None);
                }
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "closed inside a response head",
                ));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        };
        self.buf.drain(..head_len);
        self.used = true;
        let mut resp = Resp {
            status,
            headers,
            body: Vec::new(),
        };
        if head_only || status == 101 || status == 204 || status == 304 {
            return Ok(Some(resp));
        }
        let chunked = resp
            .header("transfer-encoding")
            .is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
        let len = resp
            .header("content-length")
            .and_then(|v| v.parse::<usize>().ok());
        let mut fill = |this: &mut Conn, want: usize| -> io::Result<()> {
            while this.buf.len() < want {
                let n = this.s.read(&mut chunk)?;
                if n == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "closed inside a body",
                    ));
                }
                this.buf.extend_from_slice(&chunk[..n]);
            }
            Ok(())
        };
        if let Some(len) = len {
            fill(self, len)?;
            resp.body = self.buf.drain(..len).collect();
        } else if chunked {
            loop {
                let line_end = loop {
                    if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                        break i;
                    }
                    let have = self.buf.len();
                    fill(self, have + 1)?;
                };
                let size = usize::from_str_radix(
                    String::from_utf8_lossy(&self.buf[..line_end])
                        .split(';')
                        .next()
                        .unwrap_or("")
                        .trim(),
                    16,
                )
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad chunk size"))?;
                self.buf.drain(..line_end + 2);
                fill(self, size + 2)?;
                resp.body.extend(self.buf.drain(..size));
                self.buf.drain(..2);
                if size == 0 {
                    break;
                }
            }
        } else {
            // Until close.
            loop {
                let n = self.s.read(&mut chunk)?;
                if n == 0 {
                    break;
                }
                self.buf.extend_from_slice(&chunk[..n]);
            }
            resp.body = std::mem::take(&mut self.buf);
        }
        Ok(Some(resp))
    }

    pub fn request(&mut self, raw: &[u8]) -> io::Result<Option<Resp>> {
        self.send(raw)?;
        self.read(raw.starts_with(b"HEAD "))
    }
}

pub fn get_req(host: &str, path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: paddock-test\r\n\r\n").into_bytes()
}

/// One request on a fresh connection.
pub fn raw(addr: SocketAddr, raw: &[u8]) -> io::Result<Resp> {
    let mut c = Conn::connect(addr)?;
    c.request(raw)?
        .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "closed without a response"))
}

pub fn get(addr: SocketAddr, host: &str, path: &str) -> io::Result<Resp> {
    raw(addr, &get_req(host, path))
}

/// What a load loop saw.
#[derive(Debug, Default)]
pub struct Report {
    pub ok: u64,
    pub failed: u64,
    /// Connections refused (or otherwise not made).
    pub refused: u64,
    /// Reused connections closed before any response byte, retried once.
    pub retried: u64,
    pub statuses: BTreeMap<u16, u64>,
    pub by_backend: BTreeMap<String, u64>,
    pub errors: Vec<String>,
}

impl Report {
    fn merge(&mut self, o: Report) {
        self.ok += o.ok;
        self.failed += o.failed;
        self.refused += o.refused;
        self.retried += o.retried;
        for (k, v) in o.statuses {
            *self.statuses.entry(k).or_default() += v;
        }
        for (k, v) in o.by_backend {
            *self.by_backend.entry(k).or_default() += v;
        }
        self.errors.extend(o.errors.into_iter().take(20));
    }
}

/// A bounded load loop: `threads` keep-alive clients sending `GET path` until
/// `stop` is set (or `max` seconds pass, so a test can never hang on it).
pub struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<Report>>,
}

impl Load {
    pub fn start(addr: SocketAddr, host: &str, path: &str, threads: usize) -> Load {
        Load::start_with(addr, get_req(host, path), threads, false)
    }

    /// `close`: a new connection for every request.
    pub fn start_with(addr: SocketAddr, req: Vec<u8>, threads: usize, close: bool) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let handles = (0..threads)
            .map(|_| {
                let (stop, req) = (stop.clone(), req.clone());
                std::thread::spawn(move || run_client(addr, &req, &stop, close))
            })
            .collect();
        Load {
            stop,
            threads: handles,
        }
    }

    pub fn finish(self) -> Report {
        self.stop.store(true, Ordering::SeqCst);
        let mut r = Report::default();
        for t in self.threads {
            r.merge(t.join().expect("load thread"));
        }
        r
    }
}

fn run_client(addr: SocketAddr, req: &[u8], stop: &AtomicBool, close: bool) -> Report {
    let mut rep = Report::default();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let mut conn: Option<Conn> = None;
    while !stop.load(Ordering::SeqCst) && std::time::Instant::now() < deadline {
        let mut outcome: Result<Resp, String> = Err("not sent".into());
        for attempt in 0..2 {
            if conn.is_none() {
                match Conn::connect(addr) {
                    Ok(c) => conn = Some(c),
                    Err(e) => {
                        rep.refused += 1;
                        outcome = Err(format!("connect: {e}"));
                        break;
                    }
                }
            }
            let Some(c) = conn.as_mut() else { break };
            let reused = c.used;
            match c.request(req) {
                Ok(Some(r)) => {
                    outcome = Ok(r);
                    break;
                }
                Ok(None) if reused && attempt == 0 => {
                    rep.retried += 1;
                    conn = None;
                }
                Ok(None) => {
                    outcome = Err("closed before any response byte on a fresh connection".into());
                    conn = None;
                    break;
                }
                // A reset before any byte on a reused connection counts as a close.
                Err(e)
                    if reused
                        && attempt == 0
                        && c.buf.is_empty()
                        && matches!(
                            e.kind(),
                            io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
                        ) =>
                {
                    rep.retried += 1;
                    conn = None;
                }
                Err(e) => {
                    outcome = Err(format!("{e}"));
                    conn = None;
                    break;
                }
            }
        }
        match outcome {
            Ok(r) => {
                *rep.statuses.entry(r.status).or_default() += 1;
                if let Some(b) = r.header("x-backend") {
                    *rep.by_backend.entry(b.to_string()).or_default() += 1;
                }
                if (200..300).contains(&r.status) {
                    rep.ok += 1;
                } else {
                    rep.failed += 1;
                    if rep.errors.len() < 20 {
                        rep.errors.push(format!(
                            "status {}: {}",
                            r.status,
                            r.text().chars().take(200).collect::<String>()
                        ));
                    }
                }
                if close
                    || r.header("connection")
                        .is_some_and(|v| v.eq_ignore_ascii_case("close"))
                {
                    conn = None;
                }
            }
            Err(e) => {
                rep.failed += 1;
                if rep.errors.len() < 20 {
                    rep.errors.push(e);
                }
            }
        }
    }
    rep
}
