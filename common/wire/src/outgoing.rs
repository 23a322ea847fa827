//! Outgoing calls and subscriptions of a daemon, run on its one I/O thread
//! (docs/ARCHITECTURE.md: no daemon opens its own DEALER or SUB socket).
//!
//! - One DEALER per remote endpoint, made on first use (CURVE client, `LINGER` 0,
//!   `IMMEDIATE`), carrying any number of concurrent requests told apart by their
//!   replies' `re`. Each request is driven by the same [`Attempt`] rules as the
//!   blocking [`crate::Client`]: the same signed bytes are resent when no reply came,
//!   transient errors are retried, a `replay` of our own resend waits for the real
//!   answer, and the deadline ends it with a clear error. Its result reaches the
//!   async caller through a oneshot; dropping the caller's future cancels it.
//! - One SUB per publishing endpoint, shared by every subscription to it; events
//!   pass the receiver's checks (a [`Gate`]) and `topic == kind` before they are
//!   handed to a subscriber's bounded channel.
//!
//! Async code reaches all this through [`Calls`] (from `ServerHandle::calls`).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

use crate::client::{into_result, Attempt, ClientError};
use crate::curve::{self, ClientKeys};
use crate::envelope::{now_ms, peek_re, Envelope};
use crate::error::{Code, WireError};
use crate::gate::{Admit, Gate, Limits};
use crate::keyring::Keyring;
use crate::server::{Outbound, ServerHandle, Stats, WarnLimiter};
use crate::zmq_context;

/// How many calls may be in flight at once per daemon, unless told otherwise.
pub const DEFAULT_MAX_CALLS: usize = 1024;

/// How many events a subscription buffers before newer ones are dropped.
pub const SUBSCRIPTION_QUEUE: usize = 1024;

/// A DEALER without calls for this long is closed (it is made again on next use),
/// so endpoints that went away do not keep sockets reconnecting forever.
const IDLE_DEALER: Duration = Duration::from_secs(60);

/// How many messages one socket may take per poll round before others get a turn.
const BATCH: usize = 256;

/// How long to wait for a reply before sending the same request again: a fifth of
/// the timeout, so a call survives its callee restarting, between 50 ms and 1 s.
pub fn resend_interval(timeout: Duration) -> Duration {
    (timeout / 5).clamp(Duration::from_millis(50), Duration::from_secs(1))
}

/// Whether `endpoint` is one a daemon may connect to (`tcp://` or `ipc://`): never
/// `inproc://`, where the process's own ZAP handler lives.
pub fn connectable(endpoint: &str) -> bool {
    (endpoint.starts_with("tcp://") && endpoint.len() > "tcp://".len())
        || (endpoint.starts_with("ipc://") && endpoint.len() > "ipc://".len())
}

/// What async code asks of the I/O thread.
pub(crate) enum Command {
    Call(CallCmd),
    Subscribe(SubCmd),
}

pub(crate) struct CallCmd {
    endpoint: String,
    kind: String,
    body: Value,
    timeout: Duration,
    resend_every: Duration,
    reply: oneshot::Sender<Result<Value, ClientError>>,
}

pub(crate) struct SubCmd {
    endpoint: String,
    prefix: String,
    tx: mpsc::Sender<Envelope>,
}

/// The async side's outgoing client: calls and subscriptions carried by the
/// daemon's I/O thread. Cheap to clone.
#[derive(Clone)]
pub struct Calls {
    server: ServerHandle,
    max: usize,
}

impl Calls {
    pub(crate) fn new(server: ServerHandle, max: usize) -> Calls {
        Calls { server, max }
    }

    /// The most calls that may be in flight at once.
    pub fn max_in_flight(&self) -> usize {
        self.max
    }

    /// Calls in flight right now.
    pub fn in_flight(&self) -> usize {
        self.server.stats().calls_in_flight.load(Ordering::Relaxed)
    }

    /// Sends `kind` with `body` to the rpc endpoint `endpoint`; resolves to the reply
    /// body when it says `ok: true`. The request is queued at once (so several calls
    /// made before awaiting any run concurrently); dropping the future cancels it.
    pub fn call(&self, endpoint: &str, kind: &str, body: Value, timeout: Duration) -> Pending {
        self.call_with(endpoint, kind, body, timeout, resend_interval(timeout))
    }

    /// [`Calls::call`] with an explicit resend interval.
    pub fn call_with(
        &self,
        endpoint: &str,
        kind: &str,
        body: Value,
        timeout: Duration,
        resend_every: Duration,
    ) -> Pending {
        if !connectable(endpoint) {
            return Pending::failed(ClientError::BadEndpoint {
                endpoint: endpoint.to_string(),
            });
        }
        let counter = &self.server.stats().calls_in_flight;
        if counter.fetch_add(1, Ordering::AcqRel) >= self.max {
            counter.fetch_sub(1, Ordering::AcqRel);
            return Pending::failed(ClientError::TooManyCalls { limit: self.max });
        }
        let (tx, rx) = oneshot::channel();
        let cmd = CallCmd {
            endpoint: endpoint.to_string(),
            kind: kind.to_string(),
            body,
            timeout,
            resend_every: resend_every.max(Duration::from_millis(1)),
            reply: tx,
        };
        if !self.server.send(Outbound::Out(Command::Call(cmd))) {
            counter.fetch_sub(1, Ordering::AcqRel);
            return Pending::failed(ClientError::Stopped);
        }
        Pending {
            rx: Some(rx),
            early: None,
        }
    }

    /// Subscribes to events on the PUB endpoint `endpoint` whose kind starts with
    /// `prefix` (`""` for all). Each received event is verified (signature, skew,
    /// replay, topic = kind) before it is queued; when the receiver is behind by
    /// [`SUBSCRIPTION_QUEUE`] events, newer ones are dropped and counted. The stream
    /// ends only if the socket cannot be made; libzmq reconnects it otherwise.
    /// Dropping the receiver ends the subscription.
    pub fn subscribe(
        &self,
        endpoint: &str,
        prefix: &str,
    ) -> Result<mpsc::Receiver<Envelope>, ClientError> {
        let (tx, rx) = mpsc::channel(SUBSCRIPTION_QUEUE);
        self.subscribe_into(endpoint, prefix, tx)?;
        Ok(rx)
    }

    /// [`Calls::subscribe`] into a channel of the caller's, so several endpoints can
    /// feed one stream.
    pub fn subscribe_into(
        &self,
        endpoint: &str,
        prefix: &str,
        tx: mpsc::Sender<Envelope>,
    ) -> Result<(), ClientError> {
        if !connectable(endpoint) {
            return Err(ClientError::BadEndpoint {
                endpoint: endpoint.to_string(),
            });
        }
        let cmd = SubCmd {
            endpoint: endpoint.to_string(),
            prefix: prefix.to_string(),
            tx,
        };
        if self.server.send(Outbound::Out(Command::Subscribe(cmd))) {
            Ok(())
        } else {
            Err(ClientError::Stopped)
        }
    }
}

/// A call's result, to be awaited.
pub struct Pending {
    rx: Option<oneshot::Receiver<Result<Value, ClientError>>>,
    early: Option<ClientError>,
}

impl Pending {
    fn failed(e: ClientError) -> Pending {
        Pending {
            rx: None,
            early: Some(e),
        }
    }
}

impl Future for Pending {
    type Output = Result<Value, ClientError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        if let Some(e) = this.early.take() {
            return Poll::Ready(Err(e));
        }
        let Some(rx) = this.rx.as_mut() else {
            return Poll::Ready(Err(ClientError::Stopped));
        };
        match Pin::new(rx).poll(cx) {
            Poll::Ready(Ok(r)) => {
                this.rx = None;
                Poll::Ready(r)
            }
            // The I/O thread ended without answering: the daemon is stopping.
            Poll::Ready(Err(_)) => {
                this.rx = None;
                Poll::Ready(Err(ClientError::Stopped))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

struct Call {
    attempt: Attempt,
    payload: Vec<u8>,
    sig: String,
    reply: oneshot::Sender<Result<Value, ClientError>>,
}

struct Dealer {
    socket: zmq::Socket,
    calls: HashMap<String, Call>,
    idle_since: Instant,
}

struct Subscriber {
    prefix: String,
    tx: mpsc::Sender<Envelope>,
}

struct Sub {
    socket: zmq::Socket,
    subscribers: Vec<Subscriber>,
}

/// Which of the outgoing sockets a poll item belongs to.
pub(crate) enum Slot {
    Dealer(String),
    Sub(String),
}

/// The I/O thread's outgoing sockets and the calls on them.
pub(crate) struct Outgoing {
    dealers: HashMap<String, Dealer>,
    subs: HashMap<String, Sub>,
    event_gate: Gate,
    client_keys: Option<ClientKeys>,
    stats: Arc<Stats>,
}

/// The largest message any of a daemon's sockets takes from a peer (its rpc
/// ROUTER and PULL, and these outgoing sockets): a larger one drops the connection.
pub(crate) fn max_message(limits: &Limits) -> i64 {
    ((limits.max_payload as i64) * 4).max(16 << 20)
}

fn dealer_socket(
    endpoint: &str,
    keys: Option<&ClientKeys>,
    limits: &Limits,
) -> Result<zmq::Socket, zmq::Error> {
    let s = zmq_context().socket(zmq::DEALER)?;
    curve::client_socket(&s, keys)?;
    s.set_linger(0)?;
    s.set_maxmsgsize(max_message(limits))?;
    // Queue only to completed connections: a send while the peer is down fails at
    // once (EAGAIN, retried shortly by the Attempt) instead of piling up copies.
    s.set_immediate(true)?;
    s.set_reconnect_ivl(50)?;
    s.set_reconnect_ivl_max(1000)?;
    s.set_heartbeat_ivl(1000)?;
    s.set_heartbeat_timeout(3000)?;
    s.connect(endpoint)?;
    Ok(s)
}

fn sub_socket(
    endpoint: &str,
    keys: Option<&ClientKeys>,
    limits: &Limits,
) -> Result<zmq::Socket, zmq::Error> {
    let s = zmq_context().socket(zmq::SUB)?;
    curve::client_socket(&s, keys)?;
    s.set_linger(0)?;
    s.set_maxmsgsize(max_message(limits))?;
    s.set_reconnect_ivl(100)?;
    s.set_reconnect_ivl_max(2000)?;
    s.set_heartbeat_ivl(2000)?;
    s.set_heartbeat_timeout(6000)?;
    s.connect(endpoint)?;
    Ok(s)
}

impl Outgoing {
    pub(crate) fn new(
        limits: Limits,
        client_keys: Option<ClientKeys>,
        stats: Arc<Stats>,
    ) -> Outgoing {
        Outgoing {
            dealers: HashMap::new(),
            subs: HashMap::new(),
            event_gate: Gate::new(limits),
            client_keys,
            stats,
        }
    }

    pub(crate) fn set_limits(&mut self, limits: Limits) {
        self.event_gate.set_limits(limits);
    }

    fn finish(&self, call: Call, result: Result<Value, ClientError>) {
        self.stats.calls_in_flight.fetch_sub(1, Ordering::AcqRel);
        // A cancelled call (its caller gone) is not a failure.
        if result.is_err() && !call.reply.is_closed() {
            self.stats.calls_failed.fetch_add(1, Ordering::Relaxed);
        }
        // The caller may have gone (cancelled): nothing to tell it.
        let _ = call.reply.send(result);
    }

    pub(crate) fn command(&mut self, cmd: Command, identity: &str, keys: &Keyring) {
        match cmd {
            Command::Call(c) => self.start_call(c, identity, keys),
            Command::Subscribe(s) => self.subscribe(s),
        }
    }

    fn start_call(&mut self, c: CallCmd, identity: &str, keys: &Keyring) {
        self.stats.calls.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        let env = Envelope::new(identity, &c.kind, c.body);
        let (payload, sig) = env.sign(keys);
        let call = Call {
            attempt: Attempt::new(
                &c.endpoint,
                Some(env.id.clone()),
                now,
                c.timeout,
                c.resend_every,
            ),
            payload,
            sig,
            reply: c.reply,
        };
        // The cluster's receivers share one payload limit: a larger request would be
        // refused unread (an unsigned reply without `re`, matched to no call), so
        // it is refused here, before anything is sent, with the receiver's code.
        let max = self.event_gate.limits().max_payload;
        if call.payload.len() > max {
            let err = WireError::new(
                Code::TooLarge,
                format!(
                    "`{}` to {}: payload is {} bytes; the limit is {max} (not sent)",
                    c.kind,
                    c.endpoint,
                    call.payload.len()
                ),
            );
            self.finish(call, Err(ClientError::Remote(err)));
            return;
        }
        if !self.dealers.contains_key(&c.endpoint) {
            match dealer_socket(
                &c.endpoint,
                self.client_keys.as_ref(),
                self.event_gate.limits(),
            ) {
                Ok(socket) => {
                    self.dealers.insert(
                        c.endpoint.clone(),
                        Dealer {
                            socket,
                            calls: HashMap::new(),
                            idle_since: now,
                        },
                    );
                }
                Err(source) => {
                    let endpoint = c.endpoint.clone();
                    self.finish(call, Err(ClientError::Zmq { endpoint, source }));
                    return;
                }
            }
        }
        let d = self.dealers.get_mut(&c.endpoint).expect("inserted above");
        d.calls.insert(env.id, call);
    }

    fn subscribe(&mut self, s: SubCmd) {
        if !self.subs.contains_key(&s.endpoint) {
            match sub_socket(
                &s.endpoint,
                self.client_keys.as_ref(),
                self.event_gate.limits(),
            ) {
                Ok(socket) => {
                    self.subs.insert(
                        s.endpoint.clone(),
                        Sub {
                            socket,
                            subscribers: Vec::new(),
                        },
                    );
                }
                Err(e) => {
                    // Dropping `tx` ends the subscriber's stream, which it can see.
                    tracing::warn!(endpoint = ?s.endpoint, "cannot subscribe: {e}");
                    return;
                }
            }
        }
        let sub = self.subs.get_mut(&s.endpoint).expect("inserted above");
        if let Err(e) = sub.socket.set_subscribe(s.prefix.as_bytes()) {
            tracing::warn!(endpoint = ?s.endpoint, "cannot subscribe: {e}");
            return;
        }
        sub.subscribers.push(Subscriber {
            prefix: s.prefix,
            tx: s.tx,
        });
    }

    /// Appends a poll item for every outgoing socket; `slots` says whose each is.
    pub(crate) fn poll_items<'a>(
        &'a self,
        items: &mut Vec<zmq::PollItem<'a>>,
        slots: &mut Vec<Slot>,
    ) {
        for (ep, d) in &self.dealers {
            items.push(d.socket.as_poll_item(zmq::POLLIN));
            slots.push(Slot::Dealer(ep.clone()));
        }
        for (ep, s) in &self.subs {
            items.push(s.socket.as_poll_item(zmq::POLLIN));
            slots.push(Slot::Sub(ep.clone()));
        }
    }

    pub(crate) fn readable(&mut self, slot: Slot, keys: &Keyring, warn: &mut WarnLimiter) {
        match slot {
            Slot::Dealer(ep) => self.drain_dealer(&ep, keys),
            Slot::Sub(ep) => self.drain_sub(&ep, keys, warn),
        }
    }

    fn drain_dealer(&mut self, endpoint: &str, keys: &Keyring) {
        let Some(d) = self.dealers.get_mut(endpoint) else {
            return;
        };
        let mut done = Vec::new();
        for _ in 0..BATCH {
            let frames = match d.socket.recv_multipart(zmq::DONTWAIT) {
                Ok(f) => f,
                Err(zmq::Error::EAGAIN) => break,
                Err(e) => {
                    tracing::warn!(endpoint, "receive failed: {e}");
                    break;
                }
            };
            // The payload is the first non-empty frame (a REQ-style peer may echo an
            // empty delimiter). Its `re` finds the request; the Attempt verifies.
            let re = frames
                .iter()
                .find(|f| !f.is_empty())
                .and_then(|p| peek_re(p));
            let Some(re) = re else {
                tracing::debug!(endpoint, "a reply without a readable `re` was dropped");
                continue;
            };
            let Some(call) = d.calls.get_mut(&re) else {
                // A late reply to a request that already ended (or a duplicate).
                continue;
            };
            if let Some(result) = call.attempt.on_reply(keys, frames, Instant::now()) {
                if let Some(call) = d.calls.remove(&re) {
                    done.push((call, result.and_then(into_result)));
                }
            }
        }
        if d.calls.is_empty() {
            d.idle_since = Instant::now();
        }
        for (call, result) in done {
            self.finish(call, result);
        }
    }

    fn drain_sub(&mut self, endpoint: &str, keys: &Keyring, warn: &mut WarnLimiter) {
        let Some(sub) = self.subs.get_mut(endpoint) else {
            return;
        };
        for _ in 0..BATCH {
            let frames = match sub.socket.recv_multipart(zmq::DONTWAIT) {
                Ok(f) => f,
                Err(zmq::Error::EAGAIN) => break,
                Err(e) => {
                    tracing::warn!(endpoint, "event receive failed: {e}");
                    break;
                }
            };
            let reject = |err: WireError, warn: &mut WarnLimiter| {
                self.stats.reject(&err.code);
                warn.warn("event", &err);
            };
            if frames.len() != 3 {
                let err = WireError::new(
                    Code::Malformed,
                    format!(
                        "expected 3 frames ([topic][payload][sig]), got {}",
                        frames.len()
                    ),
                );
                reject(err, warn);
                continue;
            }
            let env = match self
                .event_gate
                .admit(keys, &frames[1], &frames[2], now_ms())
            {
                Admit::Fresh { env, .. } => env,
                Admit::Resend(_) => {
                    reject(WireError::new(Code::Replay, "event id seen before"), warn);
                    continue;
                }
                Admit::Reject { err, .. } => {
                    reject(err, warn);
                    continue;
                }
            };
            if env.kind.as_bytes() != frames[0].as_slice() {
                let err = WireError::new(
                    Code::Malformed,
                    format!("event topic is not its kind `{}`", env.kind),
                );
                reject(err, warn);
                continue;
            }
            self.stats.events.fetch_add(1, Ordering::Relaxed);
            let mut gone = Vec::new();
            for (i, s) in sub.subscribers.iter().enumerate() {
                if !env.kind.starts_with(&s.prefix) {
                    continue;
                }
                match s.tx.try_send(env.clone()) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        self.stats.events_dropped.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => gone.push(i),
                }
            }
            for i in gone.into_iter().rev() {
                let s = sub.subscribers.remove(i);
                let _ = sub.socket.set_unsubscribe(s.prefix.as_bytes());
            }
        }
        // Subscribers that went away without an event to notice it are swept by
        // `tick`.
    }

    /// Sends what is due, ends what expired or was cancelled, closes idle sockets;
    /// returns when the next call needs attention.
    pub(crate) fn tick(&mut self, now: Instant) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        let mut done = Vec::new();
        for d in self.dealers.values_mut() {
            let had_calls = !d.calls.is_empty();
            let ids: Vec<String> = d.calls.keys().cloned().collect();
            for id in ids {
                let Some(call) = d.calls.get_mut(&id) else {
                    continue;
                };
                if call.reply.is_closed() {
                    // The caller dropped its future: nobody wants the answer.
                    let call = d.calls.remove(&id).expect("present");
                    done.push((call, Err(ClientError::Stopped)));
                    continue;
                }
                if call.attempt.due(now) {
                    let sent = d
                        .socket
                        .send_multipart([&call.payload[..], call.sig.as_bytes()], zmq::DONTWAIT);
                    if let Some(result) = call.attempt.sent(now, sent) {
                        let call = d.calls.remove(&id).expect("present");
                        done.push((call, result.and_then(into_result)));
                        continue;
                    }
                }
                if let Some(result) = call.attempt.expired(now) {
                    let call = d.calls.remove(&id).expect("present");
                    done.push((call, result.and_then(into_result)));
                    continue;
                }
                let at = call.attempt.wake_at();
                next = Some(next.map_or(at, |n| n.min(at)));
            }
            if had_calls && d.calls.is_empty() {
                d.idle_since = now;
            }
        }
        for (call, result) in done {
            self.finish(call, result);
        }
        self.dealers
            .retain(|_, d| !d.calls.is_empty() || now.duration_since(d.idle_since) < IDLE_DEALER);
        for s in self.subs.values_mut() {
            let sock = &s.socket;
            s.subscribers.retain(|x| {
                let keep = !x.tx.is_closed();
                if !keep {
                    let _ = sock.set_unsubscribe(x.prefix.as_bytes());
                }
                keep
            });
        }
        self.subs.retain(|_, s| !s.subscribers.is_empty());
        if !self.dealers.is_empty() {
            // Idle sockets are swept on a coarse timer of their own.
            let sweep = now + IDLE_DEALER;
            next = Some(next.map_or(sweep, |n| n.min(sweep)));
        }
        next
    }

    /// Ends every call (the I/O thread is stopping).
    pub(crate) fn stop(&mut self) {
        let calls: Vec<Call> = self
            .dealers
            .drain()
            .flat_map(|(_, d)| d.calls.into_values())
            .collect();
        for call in calls {
            self.finish(call, Err(ClientError::Stopped));
        }
        self.subs.clear();
    }
}

/// Milliseconds for `zmq_poll` until `at` (rounded up, so a poll never wakes just
/// before its deadline and spins), or 0 when it has passed.
pub(crate) fn poll_ms(now: Instant, at: Instant) -> i64 {
    let d = at.saturating_duration_since(now);
    if d.is_zero() {
        return 0;
    }
    let ms = d.as_micros().div_ceil(1000);
    ms.min(i64::MAX as u128) as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resend_interval_is_a_fifth_of_the_timeout_within_bounds() {
        let ms = Duration::from_millis;
        assert_eq!(resend_interval(ms(100)), ms(50));
        assert_eq!(resend_interval(ms(1000)), ms(200));
        assert_eq!(resend_interval(ms(5000)), ms(1000));
        assert_eq!(resend_interval(Duration::from_secs(60)), ms(1000));
        assert_eq!(resend_interval(Duration::ZERO), ms(50));
    }

    #[test]
    fn only_tcp_and_ipc_endpoints_are_connectable() {
        assert!(connectable("tcp://127.0.0.1:7101"));
        assert!(connectable("ipc:///run/paddock/x.sock"));
        assert!(!connectable("inproc://zeromq.zap.01"));
        assert!(!connectable("tcp://"));
        assert!(!connectable("http://x:1"));
        assert!(!connectable(""));
    }

    #[test]
    fn poll_ms_rounds_up_and_never_goes_negative() {
        let now = Instant::now();
        assert_eq!(poll_ms(now, now), 0);
        assert_eq!(poll_ms(now + Duration::from_millis(5), now), 0);
        assert_eq!(poll_ms(now, now + Duration::from_micros(1)), 1);
        assert_eq!(poll_ms(now, now + Duration::from_micros(1500)), 2);
        assert_eq!(poll_ms(now, now + Duration::from_millis(7)), 7);
    }
}
