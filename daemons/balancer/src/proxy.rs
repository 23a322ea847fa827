//! The data path: one hyper HTTP/1.1 server connection per client, each request
//! routed by Host to a backend picked by power of two choices, sent over a pooled
//! keep-alive connection, retried on another backend when that is safe, and
//! answered with the backend's response streamed through. Upgrades (websockets)
//! become byte tunnels. Nothing here blocks, locks for long or logs per request
//! (router lines go to a bounded channel, dropped and counted when it is full).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};

use crate::pool::{self, Sender};
use crate::settings::Settings;
use crate::stats::{Counters, Global};
use crate::table::{Backend, Route, Table};

/// A router log line and the app it is about.
pub type RouterLine = (Arc<str>, String);

/// What every connection task shares.
pub struct Shared {
    pub settings: Settings,
    pub table: ArcSwap<Table>,
    pub global: Global,
    /// Router log lines (bounded; a full channel drops the line and counts it).
    pub log: Option<tokio::sync::mpsc::Sender<RouterLine>>,
    /// Set when the balancer stops or hands over: connections finish their request
    /// in flight and close.
    pub shutdown: tokio::sync::watch::Sender<bool>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Proto {
    Http,
    Https,
}

/// The client connection a request came on.
pub struct ConnInfo {
    pub peer: SocketAddr,
    pub proto: Proto,
    pub port: u16,
    /// Tunnels (upgraded requests) of this connection still open: the connection's
    /// slot and its place in `connections_active` are held until they end.
    pub tunnels: std::sync::atomic::AtomicUsize,
    pub tunnel_ended: tokio::sync::Notify,
}

impl ConnInfo {
    pub fn new(peer: SocketAddr, proto: Proto, port: u16) -> ConnInfo {
        ConnInfo {
            peer,
            proto,
            port,
            tunnels: std::sync::atomic::AtomicUsize::new(0),
            tunnel_ended: tokio::sync::Notify::new(),
        }
    }
}

/// A request counted in flight on its backend from the moment it is picked
/// until it is dropped, however it ends (answered, failed, or cancelled because
/// the client went away).
pub struct InFlight(Arc<Backend>);

impl InFlight {
    pub fn new(b: Arc<Backend>) -> InFlight {
        b.outstanding.fetch_add(1, SeqCst);
        InFlight(b)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.outstanding.fetch_sub(1, SeqCst);
    }
}

// ---- bodies ---------------------------------------------------------------------

/// Why a request body stopped.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("the request body is larger than the limit")]
    TooLarge,
    #[error("reading the request body: {0}")]
    Read(#[from] hyper::Error),
}

/// A request body on its way to a backend, counted against the size limit;
/// `ended` is set once it was sent whole (a backend connection goes back to the
/// pool only then).
pub enum ReqBody {
    Empty,
    Stream {
        inner: Incoming,
        limit: u64,
        seen: u64,
        ended: Arc<AtomicBool>,
    },
}

impl Body for ReqBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            ReqBody::Empty => Poll::Ready(None),
            ReqBody::Stream {
                inner,
                limit,
                seen,
                ended,
            } => match Pin::new(&mut *inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(f))) => {
                    if let Some(d) = f.data_ref() {
                        *seen += d.len() as u64;
                        if *seen > *limit {
                            return Poll::Ready(Some(Err(BodyError::TooLarge)));
                        }
                    }
                    if inner.is_end_stream() {
                        ended.store(true, Relaxed);
                    }
                    Poll::Ready(Some(Ok(f)))
                }
                Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
                Poll::Ready(None) => {
                    ended.store(true, Relaxed);
                    Poll::Ready(None)
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ReqBody::Empty => true,
            ReqBody::Stream { inner, .. } => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ReqBody::Empty => SizeHint::with_exact(0),
            ReqBody::Stream { inner, .. } => inner.size_hint(),
        }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A response body: a page of our own, or a backend's body streamed through.
pub struct RespBody(RespKind);

enum RespKind {
    Full(Option<Bytes>),
    Proxied {
        inner: Incoming,
        done: Done,
        /// Armed only while the backend sends nothing (the common small response
        /// never arms it): a backend stalled mid-body is cut off after
        /// `request_timeout`, and a drain deadline is noticed within a second.
        stall: Option<Stall>,
    },
}

struct Stall {
    since: Instant,
    tick: Pin<Box<tokio::time::Sleep>>,
}

/// How often a stalled body looks at its backend's drain deadline.
const STALL_TICK: Duration = Duration::from_secs(1);

impl RespBody {
    fn full(b: impl Into<Bytes>) -> RespBody {
        RespBody(RespKind::Full(Some(b.into())))
    }

    fn empty() -> RespBody {
        RespBody(RespKind::Full(None))
    }
}

impl Drop for RespBody {
    fn drop(&mut self) {
        // A body hyper never polled because it was empty (HEAD, 204, 304) still
        // ended cleanly: the connection may go back to the pool.
        if let RespKind::Proxied { inner, done, .. } = &mut self.0 {
            if inner.is_end_stream() {
                done.complete = true;
            }
        }
    }
}

impl Body for RespBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut self.get_mut().0 {
            RespKind::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            RespKind::Proxied { inner, done, stall } => {
                if done.backend.closing.load(Relaxed) {
                    return Poll::Ready(Some(Err("the backend's drain deadline passed".into())));
                }
                match Pin::new(inner).poll_frame(cx) {
                    Poll::Ready(Some(Ok(f))) => {
                        *stall = None;
                        if let Some(d) = f.data_ref() {
                            done.bytes += d.len() as u64;
                        }
                        Poll::Ready(Some(Ok(f)))
                    }
                    Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
                    Poll::Ready(None) => {
                        done.complete = true;
                        Poll::Ready(None)
                    }
                    Poll::Pending => {
                        let limit = done.shared.settings.request_timeout;
                        let st = stall.get_or_insert_with(|| Stall {
                            since: Instant::now(),
                            tick: Box::pin(tokio::time::sleep(STALL_TICK.min(limit))),
                        });
                        while std::future::Future::poll(st.tick.as_mut(), cx).is_ready() {
                            if st.since.elapsed() >= limit {
                                return Poll::Ready(Some(Err(format!(
                                    "the backend sent nothing for {} s mid-body",
                                    limit.as_secs_f64()
                                )
                                .into())));
                            }
                            if done.backend.closing.load(Relaxed) {
                                return Poll::Ready(Some(Err(
                                    "the backend's drain deadline passed".into(),
                                )));
                            }
                            let next = tokio::time::Instant::now() + STALL_TICK.min(limit);
                            st.tick.as_mut().reset(next);
                        }
                        Poll::Pending
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.0 {
            RespKind::Full(b) => b.is_none(),
            RespKind::Proxied { inner, .. } => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            RespKind::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            RespKind::Full(None) => SizeHint::with_exact(0),
            RespKind::Proxied { inner, .. } => inner.size_hint(),
        }
    }
}

/// The router log line's fields, made only when router lines are wanted.
struct LogCtx {
    method: Method,
    path: String,
    host: String,
    request_id: HeaderValue,
    fwd: SocketAddr,
    proto: Proto,
}

/// Closes a proxied request's books when its response body ends or is dropped:
/// the backend's outstanding count, stats, the connection back to the pool (only
/// when the body was read to its end), the router line.
struct Done {
    shared: Arc<Shared>,
    backend: Arc<Backend>,
    _inflight: InFlight,
    route_stats: Arc<Counters>,
    sender: Option<Sender>,
    complete: bool,
    /// The request body's end, when it had one.
    req_ended: Option<Arc<AtomicBool>>,
    started: Instant,
    connect_us: u64,
    service_us: u64,
    status: u16,
    bytes: u64,
    log: Option<Box<LogCtx>>,
}

impl Drop for Done {
    fn drop(&mut self) {
        let us = self.started.elapsed().as_micros() as u64;
        self.backend.stats.record(self.status, us, self.bytes);
        self.route_stats.record(self.status, us, self.bytes);
        if let Some(s) = self.sender.take() {
            // Only a connection whose request and response both went through whole
            // is ready for another request; anything else is closed.
            let req_done = self.req_ended.as_ref().is_none_or(|e| e.load(Relaxed));
            if self.complete && req_done {
                self.backend.pool.put(s);
            }
        }
        if let Some(l) = self.log.take() {
            let line = format!(
                "at=info method={} path={:?} host={:?} request_id={:?} fwd=\"{}\" backend={:?} connect={}ms service={}ms status={} bytes={} protocol={}",
                l.method,
                l.path,
                l.host,
                l.request_id.to_str().unwrap_or("-"),
                l.fwd.ip(),
                self.backend.id,
                self.connect_us / 1000,
                self.service_us / 1000,
                self.status,
                self.bytes,
                if l.proto == Proto::Https { "https" } else { "http" },
            );
            send_log(&self.shared, &self.backend.app, line);
        }
    }
}

fn send_log(shared: &Shared, app: &Arc<str>, line: String) {
    if let Some(tx) = &shared.log {
        if tx.try_send((app.clone(), line)).is_err() {
            shared.global.log_dropped.fetch_add(1, Relaxed);
        }
    }
}

// ---- pages ----------------------------------------------------------------------

fn page(
    status: StatusCode,
    what: &str,
    detail: &str,
    request_id: Option<&HeaderValue>,
) -> Response<RespBody> {
    let rid = request_id.and_then(|v| v.to_str().ok()).unwrap_or("");
    let body = format!(
        "<!doctype html>\n<html><head><title>{code} {what}</title></head><body>\n<h1>{code} {what}</h1>\n<p>{}</p>\n<p><small>paddock-balancer{}</small></p>\n</body></html>\n",
        crate::stats::html(detail),
        if rid.is_empty() { String::new() } else { format!(" · request {}", crate::stats::html(rid)) },
        code = status.as_u16(),
    );
    let mut r = Response::new(RespBody::full(body));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Some(v) = request_id {
        h.insert(X_REQUEST_ID.clone(), v.clone());
    }
    if status == StatusCode::SERVICE_UNAVAILABLE {
        h.insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
    }
    r
}

static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_PORT: HeaderName = HeaderName::from_static("x-forwarded-port");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static FORWARDED: HeaderName = HeaderName::from_static("forwarded");
static X_FORWARDED_SSL: HeaderName = HeaderName::from_static("x-forwarded-ssl");
static X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Removes hop-by-hop headers: those `Connection` lists, and the standard ones.
/// An upgrade keeps `Connection: upgrade` and `Upgrade`.
fn strip_hop_by_hop(h: &mut HeaderMap, upgrade: bool) {
    let simple = |v: &HeaderValue| {
        let b = v.as_bytes();
        b.eq_ignore_ascii_case(b"keep-alive")
            || b.eq_ignore_ascii_case(b"close")
            || b.eq_ignore_ascii_case(b"upgrade")
    };
    // Every Connection header, every name each lists; never the headers that
    // route or frame the request, whatever a client nominates.
    if h.get_all(header::CONNECTION).iter().any(|v| !simple(v)) {
        let listed: Vec<HeaderName> = h
            .get_all(header::CONNECTION)
            .iter()
            .flat_map(|c| c.to_str().unwrap_or("").split(','))
            .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
            .filter(|n| !(upgrade && *n == header::UPGRADE))
            .filter(|n| {
                ![
                    header::HOST,
                    header::CONTENT_LENGTH,
                    header::TRANSFER_ENCODING,
                ]
                .contains(n)
            })
            .collect();
        for n in listed {
            h.remove(n);
        }
    }
    if upgrade {
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        h.remove(header::CONNECTION);
        h.remove(header::UPGRADE);
    }
    h.remove(&KEEP_ALIVE);
    h.remove(&PROXY_CONNECTION);
    h.remove(header::TE);
    h.remove(header::TRAILER);
}

fn is_upgrade(req: &Request<Incoming>) -> bool {
    req.headers().contains_key(header::UPGRADE)
        && req.headers().get_all(header::CONNECTION).iter().any(|v| {
            v.to_str()
                .unwrap_or("")
                .split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
        })
}

/// The Host a request names: the absolute-form URI's authority (RFC 9112
/// §3.2.2: it wins over the Host header, which is then replaced), else its one
/// `Host` header. `Err`: more than one Host header.
fn host_of(req: &Request<Incoming>) -> Result<Option<&str>, ()> {
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let first = hosts.next();
    if hosts.next().is_some() {
        return Err(());
    }
    if let Some(a) = req.uri().authority() {
        return Ok(Some(a.as_str()));
    }
    Ok(first
        .and_then(|h| h.to_str().ok())
        .filter(|h| !h.is_empty()))
}

fn request_id(req: &Request<Incoming>) -> HeaderValue {
    if let Some(v) = req.headers().get(&X_REQUEST_ID) {
        let b = v.as_bytes();
        if (1..=200).contains(&b.len()) && b.iter().all(|c| c.is_ascii_graphic()) {
            return v.clone();
        }
    }
    let (a, b) = (crate::table::rand_u64(), crate::table::rand_u64());
    let mut buf = [0u8; 32];
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for (i, byte) in a
        .to_be_bytes()
        .iter()
        .chain(b.to_be_bytes().iter())
        .enumerate()
    {
        buf[2 * i] = HEX[(byte >> 4) as usize];
        buf[2 * i + 1] = HEX[(byte & 15) as usize];
    }
    // Hex digits are always a valid header value.
    HeaderValue::from_bytes(&buf).unwrap_or(HeaderValue::from_static("-"))
}

fn idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

// ---- the request ----------------------------------------------------------------

/// Answers one client request.
pub async fn handle(
    shared: Arc<Shared>,
    info: Arc<ConnInfo>,
    mut req: Request<Incoming>,
) -> Result<Response<RespBody>, Infallible> {
    let started = Instant::now();
    let rid = request_id(&req);
    let bad = |shared: &Shared, detail: &str, rid: &HeaderValue| {
        shared.global.bad_requests.fetch_add(1, Relaxed);
        page(StatusCode::BAD_REQUEST, "Bad Request", detail, Some(rid))
    };
    if req.method() == Method::CONNECT {
        let mut r = page(
            StatusCode::METHOD_NOT_ALLOWED,
            "Method Not Allowed",
            "CONNECT is not served: this is a reverse proxy.",
            Some(&rid),
        );
        r.headers_mut().insert(
            header::ALLOW,
            HeaderValue::from_static("GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"),
        );
        return Ok(r);
    }
    let upgrade = is_upgrade(&req);
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let host = match host_of(&req) {
        Ok(Some(h)) => h,
        Ok(None) => return Ok(bad(&shared, "The request has no Host header.", &rid)),
        Err(()) => {
            return Ok(bad(
                &shared,
                "The request has more than one Host header.",
                &rid,
            ))
        }
    };
    if !crate::table::valid_host(host) {
        return Ok(bad(
            &shared,
            "The Host header is not a valid host name (a DNS name or IP address, then at most :PORT).",
            &rid,
        ));
    }
    let route = match shared.table.load().lookup(host) {
        Some(r) => r.clone(),
        None => {
            shared.global.unknown_host.fetch_add(1, Relaxed);
            let detail = format!("No app is routed for the host {host:?}.");
            if shared.log.is_some() {
                send_log(&shared, &Arc::from(""), format!("at=error code=no_route desc=\"unknown host\" method={} path={:?} host={host:?} request_id={:?} fwd=\"{}\" status=404", req.method(), req.uri().path(), rid.to_str().unwrap_or("-"), info.peer.ip()));
            }
            return Ok(page(
                StatusCode::NOT_FOUND,
                "Not Found",
                &detail,
                Some(&rid),
            ));
        }
    };
    let host_value = HeaderValue::from_str(host).unwrap_or(HeaderValue::from_static(""));
    let content_length = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if content_length.is_some_and(|n| n > shared.settings.max_body_bytes) {
        return Ok(error(
            &shared,
            &route,
            info.peer,
            req.method(),
            req.uri().path(),
            &rid,
            started,
            StatusCode::PAYLOAD_TOO_LARGE,
            "Payload Too Large",
            &format!(
                "The request body is larger than {} bytes.",
                shared.settings.max_body_bytes
            ),
        ));
    }
    let log = shared.log.is_some().then(|| {
        Box::new(LogCtx {
            method: req.method().clone(),
            path: req
                .uri()
                .path_and_query()
                .map(|p| p.as_str())
                .unwrap_or("/")
                .to_string(),
            host: host.to_string(),
            request_id: rid.clone(),
            fwd: info.peer,
            proto: info.proto,
        })
    });
    let (mut parts, body) = req.into_parts();
    let bodiless = body.is_end_stream();
    let req_ended = (!bodiless).then(|| Arc::new(AtomicBool::new(false)));
    let mut body = match &req_ended {
        None => ReqBody::Empty,
        Some(ended) => ReqBody::Stream {
            inner: body,
            limit: shared.settings.max_body_bytes,
            seen: 0,
            ended: ended.clone(),
        },
    };
    // The request as the backend gets it.
    let uri: Uri = parts
        .uri
        .path_and_query()
        .map(|p| Uri::from(p.clone()))
        .unwrap_or_else(|| Uri::from_static("/"));
    let headers = &mut parts.headers;
    strip_hop_by_hop(headers, upgrade);
    // The Host routed on is the Host the backend sees.
    headers.insert(header::HOST, host_value.clone());
    // Forwarding headers are ours to set: a client's own are not believed.
    headers.remove(&FORWARDED);
    headers.remove(&X_FORWARDED_SSL);
    let peer_ip =
        HeaderValue::from_str(&info.peer.ip().to_string()).unwrap_or(HeaderValue::from_static(""));
    headers.insert(X_REAL_IP.clone(), peer_ip.clone());
    match headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(prev) => {
            let v =
                HeaderValue::from_str(&format!("{prev}, {}", info.peer.ip())).unwrap_or(peer_ip);
            headers.insert(X_FORWARDED_FOR.clone(), v);
        }
        None => {
            headers.insert(X_FORWARDED_FOR.clone(), peer_ip);
        }
    }
    headers.insert(
        X_FORWARDED_PROTO.clone(),
        HeaderValue::from_static(if info.proto == Proto::Https {
            "https"
        } else {
            "http"
        }),
    );
    headers.insert(X_FORWARDED_PORT.clone(), HeaderValue::from(info.port));
    headers.insert(X_FORWARDED_HOST.clone(), host_value);
    headers.insert(X_REQUEST_ID.clone(), rid.clone());
    match headers.get(header::VIA).and_then(|v| v.to_str().ok()) {
        Some(prev) => {
            if let Ok(v) = HeaderValue::from_str(&format!("{prev}, 1.1 paddock")) {
                headers.insert(header::VIA, v);
            }
        }
        None => {
            headers.insert(header::VIA, HeaderValue::from_static("1.1 paddock"));
        }
    }
    // A copy for a retry after the request was sent: only a bodiless idempotent
    // request may be sent again.
    let resend = (bodiless && idempotent(&parts.method) && !upgrade).then(|| parts.headers.clone());
    let method = parts.method.clone();
    let mut next: Option<Request<ReqBody>> = Some({
        let mut r = Request::new(ReqBody::Empty);
        *r.method_mut() = parts.method;
        *r.uri_mut() = uri.clone();
        *r.version_mut() = Version::HTTP_11;
        *r.headers_mut() = parts.headers;
        r
    });
    let s = &shared.settings;
    // One of our own pages for this routed request, counted and logged.
    let fail = |status: StatusCode, detail: &str| -> Result<Response<RespBody>, Infallible> {
        Ok(error(
            &shared,
            &route,
            info.peer,
            &method,
            uri.path(),
            &rid,
            started,
            status,
            reason(status),
            detail,
        ))
    };
    let mut tried: Vec<usize> = Vec::new();
    let max_attempts = route.backends.len().clamp(1, 3);
    // Panic mode (every backend ejected) still tries them; if that fails too the
    // answer is the 503 of an app with no healthy backend, not a 502.
    let none_healthy = !route.backends.iter().any(|b| b.in_rotation());
    let mut fresh_retries = 0;
    let mut last_error = StatusCode::SERVICE_UNAVAILABLE;
    let mut last_detail = String::from("The app has no backend in rotation.");
    let body_error =
        |ended: &Option<Arc<AtomicBool>>| ended.as_ref().is_some_and(|e| !e.load(Relaxed));
    while tried.len() < max_attempts {
        let Some(backend) = route.pick(&tried).cloned() else {
            break;
        };
        tried.push(Arc::as_ptr(&backend) as usize);
        if tried.len() > 1 {
            shared.global.retries.fetch_add(1, Relaxed);
        }
        let inflight = InFlight::new(backend.clone());
        // A drain that began between the pick and the count: pick again, so
        // `backend.drained` never fires with this request on its way.
        if backend.draining.load(SeqCst) {
            continue;
        }
        let attempt_start = Instant::now();
        let (mut sender, fresh) = match backend.pool.take().await {
            Some(snd) => (snd, false),
            None => match pool::connect(backend.addr, s.connect_timeout).await {
                Ok(snd) => (snd, true),
                Err(e) if e.is_local() => {
                    // Out of file descriptors here: no backend is to blame and
                    // another attempt would fail the same way.
                    tracing::warn!(app = %route.app, backend = %backend.id, "{e} (the balancer's own limit; raise LimitNOFILE or lower max_connections)");
                    return fail(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "The balancer is out of resources for a moment; retry shortly.",
                    );
                }
                Err(e) => {
                    backend.failed(s.eject_after);
                    last_error = StatusCode::BAD_GATEWAY;
                    last_detail = "The app's backends could not be reached.".into();
                    tracing::debug!(app = %route.app, backend = %backend.id, "{e}");
                    continue;
                }
            },
        };
        let connect_us = attempt_start.elapsed().as_micros() as u64;
        let mut out = match next.take() {
            Some(r) => r,
            None => match &resend {
                Some(h) => {
                    let mut r = Request::new(ReqBody::Empty);
                    *r.method_mut() = method.clone();
                    *r.uri_mut() = uri.clone();
                    *r.headers_mut() = h.clone();
                    r
                }
                None => break,
            },
        };
        *out.body_mut() = std::mem::replace(&mut body, ReqBody::Empty);
        // The drain deadline also ends a request still waiting for its response
        // head (registered before the flag is read, so no close is missed).
        let closing = backend.close_now.notified();
        tokio::pin!(closing);
        let sent = if backend.closing.load(Relaxed) {
            None
        } else {
            tokio::select! {
                biased;
                r = tokio::time::timeout(s.request_timeout, sender.try_send_request(out)) => Some(r),
                _ = &mut closing => None,
            }
        };
        let Some(sent) = sent else {
            return fail(
                StatusCode::BAD_GATEWAY,
                "The app's backend was drained and had not answered by the drain deadline.",
            );
        };
        match sent {
            Err(_) if body_error(&req_ended) => {
                // The client's body did not arrive in time: not the backend's fault.
                return fail(
                    StatusCode::REQUEST_TIMEOUT,
                    &format!(
                        "The request body did not arrive within {} s.",
                        s.request_timeout.as_secs_f64()
                    ),
                );
            }
            Err(_) => {
                backend.failed(s.eject_after);
                return fail(
                    StatusCode::GATEWAY_TIMEOUT,
                    &format!(
                        "The app did not answer within {} s.",
                        s.request_timeout.as_secs_f64()
                    ),
                );
            }
            Ok(Err(mut e)) => {
                let unsent = e.take_message();
                let body_err = std::error::Error::source(e.error())
                    .and_then(|s| s.downcast_ref::<BodyError>());
                match body_err {
                    Some(BodyError::TooLarge) => {
                        return fail(
                            StatusCode::PAYLOAD_TOO_LARGE,
                            &format!(
                                "The request body is larger than {} bytes.",
                                s.max_body_bytes
                            ),
                        );
                    }
                    Some(BodyError::Read(_)) => {
                        // A malformed or cut-off body from the client.
                        shared.global.bad_requests.fetch_add(1, Relaxed);
                        return fail(StatusCode::BAD_REQUEST, "The request body could not be read (malformed chunked encoding, or the client stopped sending).");
                    }
                    None => {}
                }
                if fresh {
                    backend.failed(s.eject_after);
                }
                last_error = StatusCode::BAD_GATEWAY;
                last_detail = "The app closed the connection without answering.".into();
                tracing::debug!(app = %route.app, backend = %backend.id, "request failed: {}", e.error());
                // A pooled connection the backend had closed is not the backend's
                // fault: the same backend may be tried again on a fresh
                // connection (once).
                if !fresh && fresh_retries < 1 {
                    fresh_retries += 1;
                    tried.pop();
                }
                match unsent {
                    // Nothing was sent: any method may go on.
                    Some(r) => {
                        let (p, b) = r.into_parts();
                        body = b;
                        next = Some(Request::from_parts(p, ReqBody::Empty));
                        continue;
                    }
                    None if resend.is_some() => continue,
                    None => break,
                }
            }
            Ok(Ok(mut resp)) => {
                backend.succeeded();
                let service_us = attempt_start.elapsed().as_micros() as u64 - connect_us;
                let status = resp.status();
                let mut done = Done {
                    shared: shared.clone(),
                    backend: backend.clone(),
                    _inflight: inflight,
                    route_stats: route.stats.clone(),
                    sender: None,
                    complete: false,
                    req_ended: req_ended.clone(),
                    started,
                    connect_us,
                    service_us,
                    status: status.as_u16(),
                    bytes: 0,
                    log,
                };
                if let (true, StatusCode::SWITCHING_PROTOCOLS, Some(cu)) =
                    (upgrade, status, client_upgrade)
                {
                    let bu = hyper::upgrade::on(&mut resp);
                    // Counted now, before hyper ends this connection's future.
                    info.tunnels.fetch_add(1, SeqCst);
                    tokio::spawn(tunnel(cu, bu, done, info.clone()));
                    let (p, _) = resp.into_parts();
                    return Ok(Response::from_parts(p, RespBody::empty()));
                }
                done.sender = Some(sender);
                let (mut p, inner) = resp.into_parts();
                strip_hop_by_hop(&mut p.headers, false);
                p.headers.remove(header::TRANSFER_ENCODING);
                return Ok(Response::from_parts(
                    p,
                    RespBody(RespKind::Proxied {
                        inner,
                        done,
                        stall: None,
                    }),
                ));
            }
        }
    }
    if none_healthy {
        last_error = StatusCode::SERVICE_UNAVAILABLE;
        if !route.backends.is_empty() {
            last_detail = "No backend of the app is healthy right now; retry shortly.".into();
        }
    }
    fail(last_error, &last_detail)
}

fn reason(s: StatusCode) -> &'static str {
    s.canonical_reason().unwrap_or("Error")
}

/// A page of ours for a routed request, counted in the app's stats and logged.
#[allow(clippy::too_many_arguments)]
fn error(
    shared: &Shared,
    route: &Route,
    peer: SocketAddr,
    method: &Method,
    path: &str,
    rid: &HeaderValue,
    started: Instant,
    status: StatusCode,
    what: &str,
    detail: &str,
) -> Response<RespBody> {
    route
        .stats
        .record(status.as_u16(), started.elapsed().as_micros() as u64, 0);
    if shared.log.is_some() {
        send_log(
            shared,
            &route.app,
            format!(
                "at=error desc={detail:?} method={method} path={path:?} host={:?} request_id={:?} fwd=\"{}\" status={}",
                route.domains.first().map(String::as_str).unwrap_or(""),
                rid.to_str().unwrap_or("-"),
                peer.ip(),
                status.as_u16()
            ),
        );
    }
    page(status, what, detail, Some(rid))
}

/// An upgraded connection: bytes both ways until either side closes or the
/// backend's drain deadline passes. It keeps its client connection's slot.
async fn tunnel(
    client: hyper::upgrade::OnUpgrade,
    backend: hyper::upgrade::OnUpgrade,
    done: Done,
    info: Arc<ConnInfo>,
) {
    struct Ended(Arc<ConnInfo>);
    impl Drop for Ended {
        fn drop(&mut self) {
            self.0.tunnels.fetch_sub(1, SeqCst);
            self.0.tunnel_ended.notify_waiters();
        }
    }
    let _ended = Ended(info);
    let (c, b) = match tokio::join!(client, backend) {
        (Ok(c), Ok(b)) => (c, b),
        _ => return,
    };
    let mut c = TokioIo::new(c);
    let mut b = TokioIo::new(b);
    let be = done.backend.clone();
    let closing = be.close_now.notified();
    tokio::pin!(closing);
    if be.closing.load(Relaxed) {
        return;
    }
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut c, &mut b) => {}
        _ = &mut closing => {}
    }
    drop(done);
}

/// A client connection whose writes may not stay blocked longer than `limit`: a
/// client that stops reading (a slow reader) is cut off instead of holding its
/// slot, its backend connection and its buffers for ever.
///
/// It also gives hyper's own error answers a body. hyper answers a request it
/// cannot parse (400), whose head is too large (431) or whose URI is too long
/// (414) by itself, with an empty body and no handler called; those heads are
/// replaced by a page that says what was wrong, as every other error has.
pub struct Watched<I> {
    io: I,
    limit: Duration,
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
    /// A page written in place of hyper's bare error head: (bytes, written).
    page: Option<(Bytes, usize)>,
    global: Option<Arc<Shared>>,
}

impl<I> Watched<I> {
    pub fn new(io: I, limit: Duration) -> Watched<I> {
        Watched {
            io,
            limit,
            stalled: None,
            page: None,
            global: None,
        }
    }

    /// Counts rewritten parser errors in `shared`'s `bad_requests`.
    pub fn counting(mut self, shared: Arc<Shared>) -> Watched<I> {
        self.global = Some(shared);
        self
    }

    fn check<T>(
        &mut self,
        cx: &mut Context<'_>,
        r: Poll<std::io::Result<T>>,
    ) -> Poll<std::io::Result<T>> {
        match r {
            Poll::Pending => {
                let limit = self.limit;
                let s = self
                    .stalled
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
                if std::future::Future::poll(s.as_mut(), cx).is_ready() {
                    return Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "the client read nothing within the send timeout",
                    )));
                }
                Poll::Pending
            }
            done => {
                self.stalled = None;
                done
            }
        }
    }
}

impl<I: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Watched<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

/// hyper's answer to a request it could not parse: a status line, then exactly
/// `connection: close`, `content-length: 0` and `date`, and nothing else. Our own
/// pages and proxied responses always carry other headers.
fn bare_error_status(buf: &[u8]) -> Option<StatusCode> {
    const TAIL: &[u8] = b"\r\nconnection: close\r\ncontent-length: 0\r\ndate: ";
    let rest = buf.strip_prefix(b"HTTP/1.1 ")?;
    let code = std::str::from_utf8(rest.get(..3)?)
        .ok()?
        .parse::<u16>()
        .ok()?;
    let status = StatusCode::from_u16(code).ok()?;
    if !matches!(code, 400 | 414 | 431 | 501 | 505) {
        return None;
    }
    let line_end = rest.windows(2).position(|w| w == b"\r\n")?;
    let after = rest[line_end..].strip_prefix(TAIL)?;
    // An IMF-fixdate is 29 bytes, then the end of the head.
    (after.len() == 29 + 4 && after.ends_with(b"\r\n\r\n") && !after[..29].contains(&b'\r'))
        .then_some(status)
}

fn parser_error_page(status: StatusCode) -> Bytes {
    let detail = match status.as_u16() {
        431 => "The request's header section is larger than this balancer accepts (too many or too long header fields).",
        414 => "The request's URI is longer than this balancer accepts.",
        505 => "The request's HTTP version is not supported; send HTTP/1.1.",
        501 => "The request uses a feature this balancer does not implement.",
        _ => "The request is not valid HTTP/1.1 (a malformed request line or header, an invalid or repeated Content-Length, or a bad Transfer-Encoding).",
    };
    let mut r = page(status, reason(status), detail, None);
    let RespKind::Full(Some(body)) = std::mem::replace(&mut r.body_mut().0, RespKind::Full(None))
    else {
        return Bytes::new();
    };
    let mut head = format!("HTTP/1.1 {} {}\r\n", status.as_u16(), reason(status));
    for (k, v) in r.headers() {
        head.push_str(k.as_str());
        head.push_str(": ");
        head.push_str(v.to_str().unwrap_or(""));
        head.push_str("\r\n");
    }
    head.push_str(&format!(
        "connection: close\r\ncontent-length: {}\r\n\r\n",
        body.len()
    ));
    let mut out = head.into_bytes();
    out.extend_from_slice(&body);
    Bytes::from(out)
}

impl<I: tokio::io::AsyncWrite + Unpin> Watched<I> {
    /// Writes what is left of a replacement page; Ready(Ok) once it is all out.
    fn drain_page(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        while let Some((bytes, done)) = &mut self.page {
            if *done >= bytes.len() {
                self.page = None;
                break;
            }
            let chunk = bytes.slice(*done..);
            let r = Pin::new(&mut self.io).poll_write(cx, &chunk);
            match self.check(cx, r) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()))
                }
                Poll::Ready(Ok(n)) => {
                    if let Some((_, done)) = &mut self.page {
                        *done += n;
                    }
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Takes `buf` in place of writing it when it is hyper's bare error head.
    fn replaced(&mut self, buf: &[u8]) -> bool {
        let Some(status) = bare_error_status(buf) else {
            return false;
        };
        if let Some(sh) = &self.global {
            sh.global.bad_requests.fetch_add(1, Relaxed);
        }
        self.page = Some((parser_error_page(status), 0));
        true
    }
}

impl<I: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Watched<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.drain_page(cx) {
            Poll::Ready(Ok(())) => {}
            other => return other.map(|r| r.map(|()| 0)),
        }
        if self.replaced(buf) {
            return Poll::Ready(Ok(buf.len()));
        }
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        self.check(cx, r)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.drain_page(cx) {
            Poll::Ready(Ok(())) => {}
            other => return other.map(|r| r.map(|()| 0)),
        }
        // hyper's error head goes out alone, as one buffer.
        if let [one] = bufs {
            if self.replaced(one) {
                return Poll::Ready(Ok(one.len()));
            }
        }
        let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.check(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.drain_page(cx) {
            Poll::Ready(Ok(())) => {}
            other => return other,
        }
        let r = Pin::new(&mut self.io).poll_flush(cx);
        self.check(cx, r)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.drain_page(cx) {
            Poll::Ready(Ok(())) => {}
            other => return other,
        }
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Serves one client connection until it closes, or — once shutdown starts —
/// until its request in flight is answered. A connection accepted but whose
/// first request has not arrived yet is given that request (within the header
/// deadline) before it is closed: a client on a fresh connection must never see
/// it closed unanswered.
pub async fn serve<I>(shared: Arc<Shared>, io: I, info: ConnInfo)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let info = Arc::new(info);
    let conn_info = info.clone();
    let sh = shared.clone();
    let asked = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let seen = asked.clone();
    let svc = service_fn(move |req| {
        seen.store(true, Relaxed);
        handle(sh.clone(), conn_info.clone(), req)
    });
    let mut b = hyper::server::conn::http1::Builder::new();
    b.timer(TokioTimer::new())
        .header_read_timeout(shared.settings.header_timeout)
        .max_buf_size(shared.settings.max_header_bytes)
        .max_headers(shared.settings.max_headers)
        .keep_alive(true);
    let io = Watched::new(io, shared.settings.send_timeout).counting(shared.clone());
    let conn = b.serve_connection(TokioIo::new(io), svc).with_upgrades();
    tokio::pin!(conn);
    let mut stop = shared.shutdown.subscribe();
    let stopping = tokio::select! {
        _ = conn.as_mut() => false,
        _ = stopped(&mut stop) => true,
    };
    if stopping {
        let first = async {
            while !asked.load(Relaxed) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        let ended = tokio::select! {
            _ = conn.as_mut() => true,
            _ = tokio::time::timeout(shared.settings.header_timeout, first) => false,
        };
        if !ended {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
    // An upgraded request's tunnel outlives hyper's connection future: this
    // connection is over only when its tunnels are.
    loop {
        let ended = info.tunnel_ended.notified();
        if info.tunnels.load(SeqCst) == 0 {
            break;
        }
        ended.await;
    }
}

/// Resolves once shutdown has started (at once if it already has).
pub async fn stopped(rx: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_hypers_bare_error_heads_are_replaced_by_a_page() {
        let date = "Sun, 06 Dec 2026 06:23:55 GMT";
        for (code, reason) in [
            (400, "Bad Request"),
            (431, "Request Header Fields Too Large"),
            (414, "URI Too Long"),
        ] {
            let head = format!(
                "HTTP/1.1 {code} {reason}\r\nconnection: close\r\ncontent-length: 0\r\ndate: {date}\r\n\r\n"
            );
            assert_eq!(
                bare_error_status(head.as_bytes()).map(|s| s.as_u16()),
                Some(code)
            );
            let page = parser_error_page(StatusCode::from_u16(code).unwrap());
            let text = String::from_utf8_lossy(&page);
            assert!(text.starts_with(&format!("HTTP/1.1 {code} ")), "{text}");
            let (head, body) = text.split_once("\r\n\r\n").unwrap();
            assert!(
                head.contains(&format!("content-length: {}", body.len())),
                "{text}"
            );
            assert!(body.contains("<h1>"), "{text}");
        }
        // A response with anything more (a body, another header, another
        // status) is left alone.
        for other in [
            format!("HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 3\r\ndate: {date}\r\n\r\n"),
            format!("HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\ndate: {date}\r\nx: y\r\n\r\n"),
            format!("HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 0\r\ndate: {date}\r\n\r\n"),
            format!("HTTP/1.1 404 Not Found\r\nconnection: close\r\ncontent-length: 0\r\ndate: {date}\r\n\r\n"),
            format!("HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\ndate: {date}\r\n\r\n"),
            "HTTP/1.1 4".to_string(),
        ] {
            assert_eq!(bare_error_status(other.as_bytes()), None, "{other}");
        }
    }
}
