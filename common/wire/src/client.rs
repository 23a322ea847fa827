//! The sending side: a request client on a DEALER socket, a subscriber and a pusher.
//! All are blocking and own their socket; async code runs them on a blocking thread.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::curve::{self, ClientKeys};
use crate::envelope::{parse_payload, Envelope};
use crate::error::{Code, WireError};
use crate::keyring::{Keyring, UNSIGNED};
use crate::zmq_context;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The daemon answered with `ok: false`.
    #[error("{0}")]
    Remote(WireError),
    #[error("could not connect to {endpoint} within {waited:?}: is the daemon running there?")]
    NotConnected { endpoint: String, waited: Duration },
    #[error("no reply from {endpoint} within {waited:?} ({attempts} attempts): the daemon may be down or overloaded")]
    Timeout {
        endpoint: String,
        waited: Duration,
        attempts: u32,
    },
    #[error("bad reply from {endpoint}: {why}")]
    Protocol { endpoint: String, why: String },
    #[error("ZeroMQ error on {endpoint}: {source}")]
    Zmq {
        endpoint: String,
        source: zmq::Error,
    },
    /// An outgoing call beyond the daemon's bound on calls in flight.
    #[error(
        "too many calls in flight (the limit is {limit}): the peers are slow or down; retry later"
    )]
    TooManyCalls { limit: usize },
    /// The daemon's I/O thread has stopped (it is shutting down).
    #[error("the daemon's I/O thread has stopped; no call can be made")]
    Stopped,
    #[error("`{endpoint}` is not an endpoint to connect to (tcp://host:port or ipc://path)")]
    BadEndpoint { endpoint: String },
}

impl ClientError {
    /// The protocol error code, when the daemon sent one.
    pub fn code(&self) -> Option<&Code> {
        match self {
            ClientError::Remote(e) => Some(&e.code),
            _ => None,
        }
    }
}

/// What a connecting side needs: the HMAC keyring it signs and verifies with, and
/// the CURVE client keys when the cluster encrypts its transport.
#[derive(Clone, Debug)]
pub struct Credentials {
    pub keys: Arc<Keyring>,
    pub curve: Option<ClientKeys>,
}

impl Credentials {
    pub fn new(keys: Arc<Keyring>, curve: Option<ClientKeys>) -> Credentials {
        Credentials { keys, curve }
    }
}

/// Plaintext credentials: the keyring alone (a cluster file without `[curve]`).
impl From<Arc<Keyring>> for Credentials {
    fn from(keys: Arc<Keyring>) -> Credentials {
        Credentials { keys, curve: None }
    }
}

/// Signing and verifying go to the keyring, so credentials sign like a keyring.
impl std::ops::Deref for Credentials {
    type Target = Keyring;
    fn deref(&self) -> &Keyring {
        &self.keys
    }
}

impl From<&Credentials> for Credentials {
    fn from(c: &Credentials) -> Credentials {
        c.clone()
    }
}

/// A signed request client. It resends the very same signed message when no reply
/// came within `resend_every` (the server's reply cache answers a resend once), and
/// gives up with a clear error at `timeout`. It survives the server restarting on the
/// same endpoint: libzmq reconnects the DEALER underneath.
pub struct Client {
    socket: zmq::Socket,
    endpoint: String,
    from: String,
    keys: Arc<Keyring>,
    timeout: Duration,
    resend_every: Duration,
}

impl Client {
    pub fn connect(
        endpoint: &str,
        from: &str,
        creds: impl Into<Credentials>,
    ) -> Result<Client, ClientError> {
        let Credentials { keys, curve } = creds.into();
        let zerr = |source| ClientError::Zmq {
            endpoint: endpoint.to_string(),
            source,
        };
        let socket = zmq_context().socket(zmq::DEALER).map_err(zerr)?;
        curve::client_socket(&socket, curve.as_ref()).map_err(zerr)?;
        socket.set_linger(0).map_err(zerr)?;
        // Queue only to completed connections: a send while the server is down fails
        // at once (EAGAIN) instead of piling up copies in a dead pipe.
        socket.set_immediate(true).map_err(zerr)?;
        socket.set_reconnect_ivl(50).map_err(zerr)?;
        socket.set_reconnect_ivl_max(1000).map_err(zerr)?;
        socket.set_heartbeat_ivl(1000).map_err(zerr)?;
        socket.set_heartbeat_timeout(3000).map_err(zerr)?;
        socket.connect(endpoint).map_err(zerr)?;
        Ok(Client {
            socket,
            endpoint: endpoint.to_string(),
            from: from.to_string(),
            keys,
            timeout: Duration::from_secs(5),
            resend_every: Duration::from_millis(1000),
        })
    }

    /// Total time a call may take (default 5 s).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// How long to wait for a reply before resending (default 1 s).
    pub fn with_resend_every(mut self, every: Duration) -> Self {
        self.resend_every = every;
        self
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Sends `kind` with `body`; returns the reply body when `ok` is true.
    pub fn call(&mut self, kind: &str, body: Value) -> Result<Value, ClientError> {
        let env = Envelope::new(&self.from, kind, body);
        let (payload, sig) = env.sign(&self.keys);
        let reply = self.call_signed(&env.id, &payload, sig.as_bytes())?;
        into_result(reply)
    }

    /// Sends already-built frames (`payload`, `sig`) and waits for the reply to `id`.
    /// Unsigned replies come back only as `Remote` errors, never as data.
    pub fn call_signed(
        &mut self,
        id: &str,
        payload: &[u8],
        sig: &[u8],
    ) -> Result<Envelope, ClientError> {
        self.call_frames(Some(id), &[payload, sig])
    }

    /// Sends arbitrary frames (tests use this to send malformed messages). With `id`
    /// `None`, the first reply is taken whatever its `re`.
    pub fn call_frames(
        &mut self,
        id: Option<&str>,
        frames: &[&[u8]],
    ) -> Result<Envelope, ClientError> {
        let mut a = Attempt::new(
            &self.endpoint,
            id.map(str::to_string),
            Instant::now(),
            self.timeout,
            self.resend_every,
        );
        loop {
            let now = Instant::now();
            if a.due(now) {
                let sent = self
                    .socket
                    .send_multipart(frames.iter().copied(), zmq::DONTWAIT);
                if let Some(done) = a.sent(now, sent) {
                    return done;
                }
            }
            if let Some(done) = a.expired(Instant::now()) {
                return done;
            }
            let wait = a.wake_at().saturating_duration_since(Instant::now());
            let ready = self
                .socket
                .poll(zmq::POLLIN, wait.as_millis().max(1) as i64)
                .map_err(|source| ClientError::Zmq {
                    endpoint: self.endpoint.clone(),
                    source,
                })?;
            if ready == 0 {
                continue;
            }
            while let Ok(reply) = self.socket.recv_multipart(zmq::DONTWAIT) {
                if let Some(done) = a.on_reply(&self.keys, reply, Instant::now()) {
                    return done;
                }
            }
        }
    }
}

/// One request's life on a DEALER socket, shared by the blocking [`Client`] and the
/// I/O thread's asynchronous calls: when to (re)send the same signed frames, which
/// reply answers it, and when to give up.
///
/// - No reply within `resend_every`: the same bytes go again (the server's reply
///   cache answers a resend once, so nothing is done twice).
/// - A reply of `unavailable` or `timeout` means nothing was done: the same message
///   is sent again after a short, growing pause, until the deadline.
/// - A `replay` error after our own resend means the first copy is still being
///   handled: keep waiting for its real answer.
/// - Unsigned replies are only ever errors; a signed one must verify.
pub(crate) struct Attempt {
    endpoint: String,
    id: Option<String>,
    deadline: Instant,
    timeout: Duration,
    resend_every: Duration,
    next_send: Instant,
    attempts: u32,
    sent_once: bool,
    transient_pause: Duration,
    last_transient: Option<Envelope>,
}

impl Attempt {
    pub(crate) fn new(
        endpoint: &str,
        id: Option<String>,
        now: Instant,
        timeout: Duration,
        resend_every: Duration,
    ) -> Attempt {
        Attempt {
            endpoint: endpoint.to_string(),
            id,
            deadline: now + timeout,
            timeout,
            resend_every,
            next_send: now,
            attempts: 0,
            sent_once: false,
            transient_pause: Duration::from_millis(25),
            last_transient: None,
        }
    }

    /// Whether the frames should be sent (again) now.
    pub(crate) fn due(&self, now: Instant) -> bool {
        now >= self.next_send && now < self.deadline
    }

    /// The outcome of a send: EAGAIN (not connected yet) tries again shortly.
    pub(crate) fn sent(
        &mut self,
        now: Instant,
        result: Result<(), zmq::Error>,
    ) -> Option<Result<Envelope, ClientError>> {
        match result {
            Ok(()) => {
                self.attempts += 1;
                self.sent_once = true;
                self.next_send = now + self.resend_every;
                None
            }
            Err(zmq::Error::EAGAIN) => {
                self.next_send = now + Duration::from_millis(20);
                None
            }
            Err(source) => Some(Err(ClientError::Zmq {
                endpoint: self.endpoint.clone(),
                source,
            })),
        }
    }

    /// The outcome once the deadline has passed, if it has.
    pub(crate) fn expired(&mut self, now: Instant) -> Option<Result<Envelope, ClientError>> {
        if now < self.deadline {
            return None;
        }
        if let Some(env) = self.last_transient.take() {
            return Some(Ok(env));
        }
        Some(Err(if self.sent_once {
            ClientError::Timeout {
                endpoint: self.endpoint.clone(),
                waited: self.timeout,
                attempts: self.attempts,
            }
        } else {
            ClientError::NotConnected {
                endpoint: self.endpoint.clone(),
                waited: self.timeout,
            }
        }))
    }

    /// When this attempt next needs attention (a resend or its deadline).
    pub(crate) fn wake_at(&self) -> Instant {
        self.next_send.min(self.deadline)
    }

    /// A reply arrived: `Some` ends the attempt, `None` keeps waiting.
    pub(crate) fn on_reply(
        &mut self,
        keys: &Keyring,
        frames: Vec<Vec<u8>>,
        now: Instant,
    ) -> Option<Result<Envelope, ClientError>> {
        match judge_reply(
            keys,
            &self.endpoint,
            self.id.as_deref(),
            self.attempts,
            frames,
        ) {
            None => None,
            Some(Ok(env))
                if self.id.is_some()
                    && Self::transient(&env)
                    && now + self.transient_pause < self.deadline =>
            {
                self.next_send = now + self.transient_pause;
                self.transient_pause = (self.transient_pause * 2).min(self.resend_every);
                self.last_transient = Some(env);
                None
            }
            Some(result) => Some(result),
        }
    }

    fn transient(env: &Envelope) -> bool {
        WireError::from_body(&env.body).is_some_and(|e| e.code.is_transient())
    }
}

/// Decides whether `frames` answers request `id`: `None` means "not ours, keep waiting".
fn judge_reply(
    keys: &Keyring,
    endpoint: &str,
    id: Option<&str>,
    attempts: u32,
    frames: Vec<Vec<u8>>,
) -> Option<Result<Envelope, ClientError>> {
    let proto = |why: String| {
        Some(Err(ClientError::Protocol {
            endpoint: endpoint.to_string(),
            why,
        }))
    };
    // A REQ-style server may echo an empty delimiter first.
    let frames: Vec<Vec<u8>> = frames.into_iter().skip_while(|f| f.is_empty()).collect();
    if frames.len() != 2 {
        return proto(format!("expected 2 frames, got {}", frames.len()));
    }
    let (payload, sig) = (&frames[0], &frames[1]);
    if sig.as_slice() == UNSIGNED.as_bytes() {
        // Only ever an error: the server could not authenticate what we sent.
        let env: Envelope = match serde_json::from_slice(payload) {
            Ok(e) => e,
            Err(e) => return proto(format!("unsigned reply is not an envelope: {e}")),
        };
        if let (Some(want), Some(re)) = (id, env.re.as_deref()) {
            if want != re {
                return None;
            }
        }
        return match WireError::from_body(&env.body) {
            Some(err) => Some(Err(ClientError::Remote(err))),
            None => proto("an unsigned reply claimed success; ignored".into()),
        };
    }
    if let Err(code) = keys.verify(payload, sig) {
        return proto(format!("reply signature rejected ({code})"));
    }
    let env = match parse_payload(payload) {
        Ok(e) => e,
        Err(e) => return proto(e.message),
    };
    if let Some(want) = id {
        if env.re.as_deref() != Some(want) {
            return None; // a late reply to an earlier request
        }
        // Our own resend reached the server while the first copy was still being
        // handled: the real answer is on its way, keep waiting.
        if attempts > 1 {
            if let Some(err) = WireError::from_body(&env.body) {
                if err.code == Code::Replay {
                    return None;
                }
            }
        }
    }
    Some(Ok(env))
}

/// A reply's body as the caller's result: `ok: true` → the body, else its error.
pub(crate) fn into_result(reply: Envelope) -> Result<Value, ClientError> {
    if reply.is_ok() {
        Ok(reply.body)
    } else {
        Err(ClientError::Remote(
            WireError::from_body(&reply.body).unwrap_or_else(|| {
                WireError::new(Code::Internal, "reply had neither ok:true nor an error")
            }),
        ))
    }
}

/// A verified event stream from one or more PUB endpoints.
pub struct Subscriber {
    socket: zmq::Socket,
    keys: Arc<Keyring>,
}

impl Subscriber {
    pub fn connect(
        endpoints: &[String],
        prefixes: &[&str],
        creds: impl Into<Credentials>,
    ) -> Result<Subscriber, zmq::Error> {
        let Credentials { keys, curve } = creds.into();
        let socket = zmq_context().socket(zmq::SUB)?;
        curve::client_socket(&socket, curve.as_ref())?;
        socket.set_linger(0)?;
        socket.set_reconnect_ivl(100)?;
        socket.set_reconnect_ivl_max(2000)?;
        for p in prefixes {
            socket.set_subscribe(p.as_bytes())?;
        }
        for ep in endpoints {
            socket.connect(ep)?;
        }
        Ok(Subscriber { socket, keys })
    }

    /// The next authentic event, or `None` after `timeout`. Unsigned, forged or
    /// malformed events are dropped (and logged at WARN).
    pub fn next(&mut self, timeout: Duration) -> Result<Option<Envelope>, zmq::Error> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if self.socket.poll(zmq::POLLIN, left.as_millis() as i64)? == 0 {
                return Ok(None);
            }
            let frames = self.socket.recv_multipart(0)?;
            if frames.len() != 3 {
                tracing::warn!("dropped an event with {} frames", frames.len());
                continue;
            }
            if let Err(code) = self.keys.verify(&frames[1], &frames[2]) {
                tracing::warn!("dropped an event: {code}");
                continue;
            }
            match parse_payload(&frames[1]) {
                Ok(env) if env.kind.as_bytes() == frames[0].as_slice() => return Ok(Some(env)),
                Ok(_) => tracing::warn!("dropped an event whose topic is not its kind"),
                Err(e) => tracing::warn!("dropped an event: {e}"),
            }
        }
    }
}

/// Signed PUSH to one PULL endpoint.
pub struct Pusher {
    socket: zmq::Socket,
    from: String,
    keys: Arc<Keyring>,
}

impl Pusher {
    pub fn connect(
        endpoint: &str,
        from: &str,
        creds: impl Into<Credentials>,
    ) -> Result<Pusher, zmq::Error> {
        let Credentials { keys, curve } = creds.into();
        let socket = zmq_context().socket(zmq::PUSH)?;
        curve::client_socket(&socket, curve.as_ref())?;
        socket.set_linger(1000)?;
        socket.connect(endpoint)?;
        Ok(Pusher {
            socket,
            from: from.to_string(),
            keys,
        })
    }

    /// Signs and queues one message (blocks when the high-water mark is reached).
    pub fn push(&self, kind: &str, body: Value) -> Result<(), zmq::Error> {
        let (payload, sig) = Envelope::new(&self.from, kind, body).sign(&self.keys);
        self.socket
            .send_multipart([&payload[..], sig.as_bytes()], 0)
    }

    /// Sends raw frames (for tests of rejection).
    pub fn push_frames(&self, frames: &[&[u8]]) -> Result<(), zmq::Error> {
        self.socket.send_multipart(frames.iter().copied(), 0)
    }
}
