//! The receiving side: one I/O thread per daemon owns its libzmq sockets (rpc ROUTER,
//! optional PULL and PUB, one PUSH per heartbeat), runs `zmq_poll`, checks every
//! message through a [`Gate`], and hands authentic ones to async code over a bounded
//! channel. Async code answers through a [`ServerHandle`], which queues the reply and
//! wakes the poll with an eventfd (never a poll timeout).

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use nix::sys::eventfd::{EfdFlags, EventFd};
use serde_json::Value;
use tokio::sync::mpsc;

use crate::curve::{self, ClientKeys, CurveError, NodeKeys};
use crate::envelope::{now_ms, unsigned_error, Envelope};
use crate::error::{Code, WireError};
use crate::gate::{Admit, Gate, Limits};
use crate::keyring::SharedKeyring;
use crate::outgoing::{self, Calls, Outgoing};
use crate::zmq_context;

/// Where a daemon's sockets live.
#[derive(Debug, Clone)]
pub struct ServerSpec {
    /// `role@node`, the `from` of everything this server sends.
    pub identity: String,
    /// The ROUTER endpoint to bind.
    pub rpc: String,
    /// A PULL endpoint to bind, if the daemon takes pipeline messages.
    pub pull: Option<String>,
    /// A PUB endpoint to bind, if the daemon publishes events.
    pub publish: Option<String>,
    /// Endpoints to connect one PUSH socket each to (every heartbeat's pull).
    pub push: Vec<String>,
    /// Named PUSH targets for other pipelines (a log sink), sent to by name.
    pub push_to: Vec<(String, String)>,
    pub limits: Limits,
    /// CURVE keys for every socket; `None` runs in plaintext.
    pub curve: Option<NodeKeys>,
    /// Client keys the rpc socket admits beyond `curve`'s (the api's users; never
    /// admitted on `pull` or `pub`).
    pub rpc_clients: Option<curve::Admitted>,
    /// Most outgoing calls in flight at once (`outgoing::DEFAULT_MAX_CALLS`).
    pub max_calls: usize,
}

/// An authenticated request waiting for its reply.
#[derive(Debug)]
pub struct Request {
    pub env: Envelope,
    pub key_id: String,
    /// Signed with a user key (only the api derives those).
    pub user: bool,
    routing: Vec<Vec<u8>>,
}

/// What the I/O thread hands to async code.
#[derive(Debug)]
pub enum Inbound {
    Request(Request),
    /// An authentic message from the PULL socket.
    Pulled(Envelope),
}

pub(crate) enum Outbound {
    Reply {
        routing: Vec<Vec<u8>>,
        key_id: String,
        re: String,
        kind: String,
        body: Value,
    },
    Publish(String, Value),
    Push(String, Value),
    PushTo(String, String, Value),
    SetPush(Vec<String>),
    SetLimits(Limits),
    /// An outgoing call or subscription.
    Out(outgoing::Command),
    Stop,
}

/// Counters a daemon reports in `stats`.
#[derive(Debug, Default)]
pub struct Stats {
    pub requests: AtomicU64,
    pub pulled: AtomicU64,
    pub rejected: Mutex<HashMap<String, u64>>,
    /// Outgoing calls started, failed (errors, not cancellations) and in flight.
    pub calls: AtomicU64,
    pub calls_failed: AtomicU64,
    pub calls_in_flight: AtomicUsize,
    /// Verified events delivered to subscriptions, and those dropped because a
    /// subscriber was behind.
    pub events: AtomicU64,
    pub events_dropped: AtomicU64,
}

impl Stats {
    pub(crate) fn reject(&self, code: &Code) {
        let mut m = self.rejected.lock().unwrap_or_else(|e| e.into_inner());
        *m.entry(code.as_str().to_string()).or_insert(0) += 1;
    }

    pub fn snapshot(&self) -> Value {
        let rejected = self
            .rejected
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        serde_json::json!({
            "requests": self.requests.load(Ordering::Relaxed),
            "pulled": self.pulled.load(Ordering::Relaxed),
            "rejected": rejected,
            "calls": self.calls.load(Ordering::Relaxed),
            "calls_failed": self.calls_failed.load(Ordering::Relaxed),
            "calls_in_flight": self.calls_in_flight.load(Ordering::Relaxed),
            "events": self.events.load(Ordering::Relaxed),
            "events_dropped": self.events_dropped.load(Ordering::Relaxed),
        })
    }
}

/// The async side's way to answer, publish and push.
#[derive(Clone)]
pub struct ServerHandle {
    tx: std_mpsc::Sender<Outbound>,
    wake: Arc<EventFd>,
    stats: Arc<Stats>,
    max_calls: usize,
}

impl ServerHandle {
    /// Queues `o` for the I/O thread and wakes it; false when the thread is gone.
    pub(crate) fn send(&self, o: Outbound) -> bool {
        if self.tx.send(o).is_ok() {
            // A full eventfd counter cannot happen with writes of 1; ignore errors on a
            // stopped server.
            let _ = self.wake.write(1);
            true
        } else {
            false
        }
    }

    /// The daemon's outgoing client: calls to other daemons and subscriptions to
    /// their events, carried by this same I/O thread.
    pub fn calls(&self) -> Calls {
        Calls::new(self.clone(), self.max_calls)
    }

    /// Answers `req` with `body` (`{"ok": true, …}` or an error body).
    pub fn reply(&self, req: Request, body: Value) {
        let _ = self.send(Outbound::Reply {
            routing: req.routing,
            key_id: req.key_id,
            re: req.env.id,
            kind: req.env.kind,
            body,
        });
    }

    /// Answers `req` with `Ok(body)` (gets `ok: true` added) or an error.
    pub fn answer(&self, req: Request, result: Result<Value, WireError>) {
        let body = match result {
            Ok(mut v) => {
                if let Some(o) = v.as_object_mut() {
                    o.insert("ok".into(), Value::Bool(true));
                }
                v
            }
            Err(e) => e.to_body(),
        };
        self.reply(req, body);
    }

    /// Publishes an event whose topic is its kind.
    pub fn publish(&self, kind: &str, body: Value) {
        let _ = self.send(Outbound::Publish(kind.to_string(), body));
    }

    /// Sends one signed message on every PUSH socket.
    pub fn push(&self, kind: &str, body: Value) {
        let _ = self.send(Outbound::Push(kind.to_string(), body));
    }

    /// Sends one signed message on the named PUSH target (`ServerSpec::push_to`);
    /// dropped when that target is not connected or is behind.
    pub fn push_to(&self, target: &str, kind: &str, body: Value) {
        let _ = self.send(Outbound::PushTo(target.to_string(), kind.to_string(), body));
    }

    /// Replaces the PUSH sockets (after a config reload).
    pub fn set_push_endpoints(&self, endpoints: Vec<String>) {
        let _ = self.send(Outbound::SetPush(endpoints));
    }

    pub fn set_limits(&self, limits: Limits) {
        let _ = self.send(Outbound::SetLimits(limits));
    }

    pub fn stats(&self) -> &Arc<Stats> {
        &self.stats
    }

    /// Stops the I/O thread; sockets close once queued replies are flushed (short linger).
    pub fn stop(&self) {
        let _ = self.send(Outbound::Stop);
    }
}

/// A running server: the handle, the inbound channel and the I/O thread.
pub struct Server {
    pub handle: ServerHandle,
    pub inbound: mpsc::Receiver<Inbound>,
    pub thread: JoinHandle<()>,
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot bind {what} socket to {endpoint}")]
    Bind {
        what: &'static str,
        endpoint: String,
        source: zmq::Error,
    },
    #[error("cannot create socket")]
    Socket(#[from] zmq::Error),
    #[error("cannot create eventfd")]
    EventFd(#[from] nix::Error),
    #[error("cannot start I/O thread")]
    Thread(#[from] std::io::Error),
    #[error("CURVE")]
    Curve(#[from] CurveError),
}

fn bind(sock: &zmq::Socket, what: &'static str, endpoint: &str) -> Result<(), ServerError> {
    sock.bind(endpoint).map_err(|source| ServerError::Bind {
        what,
        endpoint: endpoint.to_string(),
        source,
    })
}

/// Options for a PUSH socket to a heartbeat: drop instead of queueing stale beats.
pub(crate) fn push_socket(
    endpoint: &str,
    curve: Option<&ClientKeys>,
) -> Result<zmq::Socket, zmq::Error> {
    let s = zmq_context().socket(zmq::PUSH)?;
    curve::client_socket(&s, curve)?;
    s.set_linger(0)?;
    s.set_immediate(true)?;
    s.set_sndhwm(16)?;
    s.set_reconnect_ivl(100)?;
    s.set_reconnect_ivl_max(2000)?;
    s.set_heartbeat_ivl(2000)?;
    s.set_heartbeat_timeout(6000)?;
    s.connect(endpoint)?;
    Ok(s)
}

/// Binds the sockets in the caller's thread (so bind errors surface at once), then
/// starts the I/O thread. `queue` bounds how many requests may wait for async code.
pub fn start(spec: ServerSpec, keys: SharedKeyring, queue: usize) -> Result<Server, ServerError> {
    let ctx = zmq_context();
    let server_keys = spec.curve.as_ref().map(|c| &c.server);
    let client_keys = spec.curve.as_ref().map(|c| c.client.clone());
    let router = ctx.socket(zmq::ROUTER)?;
    let rpc_keys = server_keys.map(|k| match &spec.rpc_clients {
        Some(extra) => curve::ServerKeys {
            secret: k.secret,
            admitted: k.admitted.with_extra(extra),
        },
        None => k.clone(),
    });
    curve::server_socket(&router, rpc_keys.as_ref())?;
    router.set_linger(200)?;
    router.set_maxmsgsize(crate::outgoing::max_message(&spec.limits))?;
    router.set_heartbeat_ivl(2000)?;
    router.set_heartbeat_timeout(6000)?;
    bind(&router, "rpc", &spec.rpc)?;
    let pull = match &spec.pull {
        Some(ep) => {
            let s = ctx.socket(zmq::PULL)?;
            curve::server_socket(&s, server_keys)?;
            s.set_linger(0)?;
            s.set_maxmsgsize(crate::outgoing::max_message(&spec.limits))?;
            bind(&s, "pull", ep)?;
            Some(s)
        }
        None => None,
    };
    let publ = match &spec.publish {
        Some(ep) => {
            let s = ctx.socket(zmq::PUB)?;
            curve::server_socket(&s, server_keys)?;
            s.set_linger(0)?;
            bind(&s, "pub", ep)?;
            Some(s)
        }
        None => None,
    };
    let mut pushes = Vec::new();
    for ep in &spec.push {
        pushes.push(push_socket(ep, client_keys.as_ref())?);
    }
    let mut named = HashMap::new();
    for (name, ep) in &spec.push_to {
        let s = ctx.socket(zmq::PUSH)?;
        curve::client_socket(&s, client_keys.as_ref())?;
        s.set_linger(0)?;
        s.set_sndhwm(10_000)?;
        s.set_reconnect_ivl(100)?;
        s.set_reconnect_ivl_max(2000)?;
        s.connect(ep)?;
        named.insert(name.clone(), s);
    }
    let wake = Arc::new(EventFd::from_value_and_flags(
        0,
        EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC,
    )?);
    let (out_tx, out_rx) = std_mpsc::channel();
    let (in_tx, in_rx) = mpsc::channel(queue.max(1));
    let stats = Arc::new(Stats::default());
    let io = Io {
        out: Outgoing::new(spec.limits.clone(), client_keys.clone(), stats.clone()),
        identity: spec.identity.clone(),
        keys,
        router,
        pull,
        publ,
        pushes,
        named,
        rpc_gate: Gate::new(spec.limits.clone()),
        pull_gate: Gate::new(spec.limits.clone()),
        inbound: in_tx,
        outbound: out_rx,
        wake: wake.clone(),
        stats: stats.clone(),
        warn: WarnLimiter::new(),
        awaiting: 0,
        client_keys,
    };
    let thread = std::thread::Builder::new()
        .name(format!("zmq-io {}", spec.identity))
        .spawn(move || io.run())?;
    Ok(Server {
        handle: ServerHandle {
            tx: out_tx,
            wake,
            stats,
            max_calls: spec.max_calls.max(1),
        },
        inbound: in_rx,
        thread,
    })
}

/// At most `BURST` warnings per `WINDOW`; the rest are counted and summarised, so a
/// stranger sending junk cannot fill the disk.
pub(crate) struct WarnLimiter {
    window_start: Instant,
    logged: u32,
    suppressed: u64,
}

impl WarnLimiter {
    const BURST: u32 = 10;
    const WINDOW: std::time::Duration = std::time::Duration::from_secs(10);

    fn new() -> Self {
        WarnLimiter {
            window_start: Instant::now(),
            logged: 0,
            suppressed: 0,
        }
    }

    pub(crate) fn warn(&mut self, what: &str, err: &WireError) {
        if self.window_start.elapsed() > Self::WINDOW {
            if self.suppressed > 0 {
                tracing::warn!(
                    suppressed = self.suppressed,
                    "more rejected messages were not logged in the last window"
                );
            }
            self.window_start = Instant::now();
            self.logged = 0;
            self.suppressed = 0;
        }
        if self.logged < Self::BURST {
            self.logged += 1;
            // The message may quote what a stranger sent (a key id, a kind): escape
            // it, so no CR/LF or control character reaches the log as written.
            tracing::warn!(code = %err.code, "rejected {what}: {}", err.message.escape_debug());
        } else {
            self.suppressed += 1;
        }
    }
}

struct Io {
    identity: String,
    keys: SharedKeyring,
    router: zmq::Socket,
    pull: Option<zmq::Socket>,
    publ: Option<zmq::Socket>,
    pushes: Vec<zmq::Socket>,
    named: HashMap<String, zmq::Socket>,
    rpc_gate: Gate,
    pull_gate: Gate,
    inbound: mpsc::Sender<Inbound>,
    outbound: std_mpsc::Receiver<Outbound>,
    wake: Arc<EventFd>,
    stats: Arc<Stats>,
    warn: WarnLimiter,
    /// Requests handed to async code and not answered yet.
    awaiting: usize,
    /// CURVE client keys for PUSH sockets made after a reload.
    client_keys: Option<ClientKeys>,
    /// Outgoing calls and subscriptions.
    out: Outgoing,
}

/// How long the I/O thread polls without sleeping while a reply is due.
/// Measured on a 2-core machine (docs/BENCHMARKS.md): 50 µs gave the best p50 and
/// p99; longer spins steal the core the actor thread needs and hurt the tail.
const SPIN: std::time::Duration = std::time::Duration::from_micros(50);

/// How many messages one socket may take per poll round before others get a turn.
const BATCH: usize = 256;

impl Io {
    fn run(mut self) {
        let wake_fd = self.wake.as_fd_raw();
        let mut spin_since = Instant::now();
        let mut slots = Vec::new();
        let mut ready = Vec::new();
        loop {
            // Outgoing calls due now are sent here; the poll sleeps no longer than
            // until the next resend or deadline. Wake-ups from async code come by
            // the eventfd, never by this timeout.
            let now = Instant::now();
            let next = self.out.tick(now);
            // While requests are with async code, poll without sleeping for a short
            // while: the reply then goes out without waiting for an eventfd wake-up
            // of this thread (one thread hand-off less per round trip).
            let mut timeout = if self.awaiting > 0 && spin_since.elapsed() < SPIN {
                0
            } else {
                -1
            };
            if let Some(at) = next {
                let ms = outgoing::poll_ms(now, at);
                timeout = if timeout < 0 { ms } else { timeout.min(ms) };
            }
            slots.clear();
            ready.clear();
            let (router_ready, pull_ready, wake_ready) = {
                let mut items = vec![
                    self.router.as_poll_item(zmq::POLLIN),
                    zmq::PollItem::from_fd(wake_fd, zmq::POLLIN),
                ];
                if let Some(p) = &self.pull {
                    items.push(p.as_poll_item(zmq::POLLIN));
                }
                let fixed = items.len();
                self.out.poll_items(&mut items, &mut slots);
                if let Err(e) = zmq::poll(&mut items, timeout) {
                    if e == zmq::Error::EINTR {
                        continue;
                    }
                    // The context is gone: nothing more can be done on these sockets.
                    tracing::error!("zmq_poll failed: {e}; stopping the I/O thread");
                    self.out.stop();
                    return;
                }
                ready.extend(items[fixed..].iter().map(|i| i.is_readable()));
                (
                    items[0].is_readable(),
                    self.pull.is_some() && items[2].is_readable(),
                    items[1].is_readable(),
                )
            };
            if router_ready {
                self.drain_router();
                spin_since = Instant::now();
            }
            if pull_ready {
                self.drain_pull();
            }
            if ready.iter().any(|r| *r) {
                let keys = self.keys.get();
                for (slot, r) in slots.drain(..).zip(ready.iter()) {
                    if *r {
                        self.out.readable(slot, &keys, &mut self.warn);
                    }
                }
            }
            if wake_ready {
                let _ = self.wake.read();
            }
            if !self.drain_outbound() {
                self.out.stop();
                return;
            }
        }
    }

    fn drain_router(&mut self) {
        for _ in 0..BATCH {
            let frames = match self.router.recv_multipart(zmq::DONTWAIT) {
                Ok(f) => f,
                Err(zmq::Error::EAGAIN) => return,
                Err(e) => {
                    tracing::warn!("rpc receive failed: {e}");
                    return;
                }
            };
            self.on_request(frames);
        }
    }

    fn on_request(&mut self, mut frames: Vec<Vec<u8>>) {
        // Routing frames: the peer identity, then the empty delimiter a REQ (or a
        // REQ-style DEALER) sends. We answer with exactly these.
        let routing_len = if frames.len() >= 2 && frames[1].is_empty() {
            2
        } else {
            1
        };
        let rest = frames.split_off(routing_len.min(frames.len()));
        let routing = frames;
        if rest.len() != 2 {
            let err = WireError::new(
                Code::Malformed,
                format!(
                    "expected 2 frames after the routing frames ([payload][sig]), got {}",
                    rest.len()
                ),
            );
            self.reject("request", &err);
            let (p, s) = unsigned_error(&self.identity, None, None, &err);
            self.send_router(routing, p, s);
            return;
        }
        let keys = self.keys.get();
        match self.rpc_gate.admit(&keys, &rest[0], &rest[1], now_ms()) {
            Admit::Fresh { env, key_id } => {
                self.stats.requests.fetch_add(1, Ordering::Relaxed);
                let req = Request {
                    user: keys.is_user_key(&key_id),
                    env,
                    key_id,
                    routing,
                };
                self.awaiting += 1;
                if let Err(e) = self.inbound.try_send(Inbound::Request(req)) {
                    let (req, why) = match e {
                        mpsc::error::TrySendError::Full(Inbound::Request(r)) => {
                            (r, "the daemon is overloaded; retry shortly")
                        }
                        mpsc::error::TrySendError::Closed(Inbound::Request(r)) => {
                            (r, "the daemon is shutting down; retry shortly")
                        }
                        _ => unreachable!("only requests are sent here"),
                    };
                    let err = WireError::new(Code::Unavailable, why);
                    self.send_reply(
                        req.routing,
                        &req.key_id,
                        req.env.id,
                        req.env.kind,
                        err.to_body(),
                    );
                }
            }
            Admit::Resend(reply) => {
                self.send_router(routing, reply.0.clone(), reply.1.clone());
            }
            Admit::Reject {
                err,
                re,
                kind,
                signer,
            } => {
                self.reject("request", &err);
                if let Some(signer) = signer {
                    let env = Envelope::reply_to(
                        &self.identity,
                        re.as_deref(),
                        kind.as_deref().unwrap_or("error"),
                        err.to_body(),
                    );
                    let p = env.to_bytes();
                    let s = keys.sign_reply(&signer, &p);
                    self.send_router(routing, p, s);
                } else {
                    let (p, s) =
                        unsigned_error(&self.identity, re.as_deref(), kind.as_deref(), &err);
                    self.send_router(routing, p, s);
                }
            }
        }
    }

    fn reject(&mut self, what: &str, err: &WireError) {
        self.stats.reject(&err.code);
        self.warn.warn(what, err);
    }

    fn drain_pull(&mut self) {
        for _ in 0..BATCH {
            let Some(pull) = &self.pull else { return };
            let frames = match pull.recv_multipart(zmq::DONTWAIT) {
                Ok(f) => f,
                Err(zmq::Error::EAGAIN) => return,
                Err(e) => {
                    tracing::warn!("pull receive failed: {e}");
                    return;
                }
            };
            if frames.len() != 2 {
                let err = WireError::new(
                    Code::Malformed,
                    format!("expected 2 frames ([payload][sig]), got {}", frames.len()),
                );
                self.reject("pipeline message", &err);
                continue;
            }
            let keys = self.keys.get();
            match self
                .pull_gate
                .admit(&keys, &frames[0], &frames[1], now_ms())
            {
                Admit::Fresh { env, .. } => {
                    self.stats.pulled.fetch_add(1, Ordering::Relaxed);
                    // Pipeline messages are fire-and-forget: when async code is behind,
                    // dropping is the documented behaviour (beats come again).
                    if self.inbound.try_send(Inbound::Pulled(env)).is_err() {
                        let err = WireError::new(
                            Code::Unavailable,
                            "inbound queue full; message dropped",
                        );
                        self.reject("pipeline message", &err);
                    }
                }
                Admit::Resend(_) => {
                    let err = WireError::new(Code::Replay, "pipeline message id seen before");
                    self.reject("pipeline message", &err);
                }
                Admit::Reject { err, .. } => self.reject("pipeline message", &err),
            }
        }
    }

    /// Returns false when told to stop.
    fn drain_outbound(&mut self) -> bool {
        loop {
            match self.outbound.try_recv() {
                Ok(Outbound::Reply {
                    routing,
                    key_id,
                    re,
                    kind,
                    body,
                }) => self.send_reply(routing, &key_id, re, kind, body),
                Ok(Outbound::Publish(kind, body)) => {
                    if let Some(p) = &self.publ {
                        let (payload, sig) = self.signed(&kind, body);
                        let _ = p.send_multipart(
                            [kind.as_bytes(), &payload[..], sig.as_bytes()],
                            zmq::DONTWAIT,
                        );
                    }
                }
                Ok(Outbound::Push(kind, body)) => {
                    let (payload, sig) = self.signed(&kind, body);
                    for s in &self.pushes {
                        // EAGAIN: that peer is not connected or is behind; a later
                        // message supersedes this one.
                        let _ = s.send_multipart([&payload[..], sig.as_bytes()], zmq::DONTWAIT);
                    }
                }
                Ok(Outbound::PushTo(target, kind, body)) => {
                    if let Some(s) = self.named.get(&target) {
                        let (payload, sig) = self.signed(&kind, body);
                        let _ = s.send_multipart([&payload[..], sig.as_bytes()], zmq::DONTWAIT);
                    }
                }
                Ok(Outbound::SetPush(endpoints)) => {
                    let mut fresh = Vec::new();
                    for ep in &endpoints {
                        match push_socket(ep, self.client_keys.as_ref()) {
                            Ok(s) => fresh.push(s),
                            Err(e) => tracing::warn!("cannot connect PUSH to {ep}: {e}"),
                        }
                    }
                    self.pushes = fresh;
                }
                Ok(Outbound::SetLimits(l)) => {
                    self.rpc_gate.set_limits(l.clone());
                    self.out.set_limits(l.clone());
                    self.pull_gate.set_limits(l);
                }
                Ok(Outbound::Out(cmd)) => {
                    let keys = self.keys.get();
                    self.out.command(cmd, &self.identity, &keys);
                }
                Ok(Outbound::Stop) | Err(std_mpsc::TryRecvError::Disconnected) => return false,
                Err(std_mpsc::TryRecvError::Empty) => return true,
            }
        }
    }

    /// A new message from this daemon, signed with the current signing key.
    fn signed(&self, kind: &str, body: Value) -> (Vec<u8>, String) {
        Envelope::new(&self.identity, kind, body).sign(&self.keys.get())
    }

    fn send_reply(
        &mut self,
        routing: Vec<Vec<u8>>,
        key_id: &str,
        re: String,
        kind: String,
        body: Value,
    ) {
        self.awaiting = self.awaiting.saturating_sub(1);
        let transient = WireError::from_body(&body)
            .map(|e| e.code.is_transient())
            .unwrap_or(false);
        let env = Envelope::reply_to(&self.identity, Some(&re), &kind, body);
        let payload = env.to_bytes();
        let sig = self.keys.get().sign_reply(key_id, &payload);
        if transient {
            // Nothing was done: let a resend of the same id be acted on later.
            self.rpc_gate.forget(key_id, &re);
        } else {
            self.rpc_gate.answered(key_id, &re, &payload, &sig);
        }
        self.send_router(routing, payload, sig);
    }

    fn send_router(&self, mut routing: Vec<Vec<u8>>, payload: Vec<u8>, sig: String) {
        routing.push(payload);
        routing.push(sig.into_bytes());
        if let Err(e) = self.router.send_multipart(routing, zmq::DONTWAIT) {
            tracing::debug!("reply not sent: {e}");
        }
    }
}

trait RawFd {
    fn as_fd_raw(&self) -> std::os::fd::RawFd;
}

impl RawFd for EventFd {
    fn as_fd_raw(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsFd;
        self.as_fd().as_raw_fd()
    }
}
