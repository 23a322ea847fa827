//! The receiver's checks, in the protocol's order, with the bounded replay and reply
//! cache. One `Gate` per receiving socket; it is owned by the I/O thread, so no locks.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use crate::envelope::{parse_payload, peek_id_kind, Envelope};
use crate::error::{Code, WireError};
use crate::keyring::Keyring;

/// Limits a receiver enforces.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest payload accepted, in bytes (default 1 MiB).
    pub max_payload: usize,
    /// Allowed `|now - ts|`, in milliseconds (default 30 s).
    pub skew_ms: i64,
    /// Most message ids remembered for replay detection (and replies for resends).
    pub cache_entries: usize,
    /// Largest reply kept for answering a resend, in bytes.
    pub max_cached_reply: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_payload: 1 << 20,
            skew_ms: 30_000,
            cache_entries: 100_000,
            max_cached_reply: 64 << 10,
        }
    }
}

/// What the gate decided about one incoming message.
#[derive(Debug)]
pub enum Admit {
    /// New, authentic and fresh: act on it.
    Fresh { env: Envelope, key_id: String },
    /// A resend of a request already answered: send this same reply again.
    Resend(Arc<(Vec<u8>, String)>),
    /// Refused. `signed` is false when the message could not be authenticated.
    Reject {
        err: WireError,
        re: Option<String>,
        kind: Option<String>,
        signed: bool,
    },
}

enum Seen {
    InFlight,
    Answered(Arc<(Vec<u8>, String)>),
    Forgotten,
}

pub struct Gate {
    limits: Limits,
    seen: HashMap<String, Seen>,
    /// (ts + skew after which the id can be forgotten, id), in arrival order.
    order: VecDeque<(i64, String)>,
}

impl Gate {
    pub fn new(limits: Limits) -> Gate {
        Gate {
            limits,
            seen: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    pub fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
    }

    fn unauth(code: Code, msg: String, payload: &[u8]) -> Admit {
        let (re, kind) = peek_id_kind(payload);
        Admit::Reject {
            err: WireError::new(code, msg),
            re,
            kind,
            signed: false,
        }
    }

    /// Runs checks 1-6 on one message (frame count is the caller's step 1).
    pub fn admit(&mut self, keys: &Keyring, payload: &[u8], sig: &[u8], now: i64) -> Admit {
        self.expire(now);
        if payload.len() > self.limits.max_payload {
            return Admit::Reject {
                err: WireError::new(
                    Code::TooLarge,
                    format!(
                        "payload is {} bytes; the limit is {}",
                        payload.len(),
                        self.limits.max_payload
                    ),
                ),
                re: None,
                kind: None,
                signed: false,
            };
        }
        let key_id = match keys.verify(payload, sig) {
            Ok(id) => id.to_string(),
            Err(Code::UnknownKey) => {
                let id = String::from_utf8_lossy(sig.split(|b| *b == b':').next().unwrap_or(b""))
                    .chars()
                    .take(64)
                    .collect::<String>();
                return Self::unauth(
                    Code::UnknownKey,
                    format!("key id `{id}` is not in this daemon's keyring"),
                    payload,
                );
            }
            Err(Code::BadSignature) => {
                return Self::unauth(
                    Code::BadSignature,
                    "HMAC-SHA256 signature does not match the payload".into(),
                    payload,
                )
            }
            Err(code) => {
                return Self::unauth(
                    code,
                    "signature frame must be `<key-id>:<hex>`".into(),
                    payload,
                )
            }
        };
        let env = match parse_payload(payload) {
            Ok(env) => env,
            Err(err) => {
                let (re, kind) = peek_id_kind(payload);
                return Admit::Reject {
                    err,
                    re,
                    kind,
                    signed: true,
                };
            }
        };
        let skew = (now - env.ts).abs();
        if skew > self.limits.skew_ms {
            return Admit::Reject {
                err: WireError::new(
                    Code::Stale,
                    format!(
                        "message time is {} ms from this daemon's clock; the window is {} ms (check NTP)",
                        now - env.ts,
                        self.limits.skew_ms
                    ),
                ),
                re: Some(env.id),
                kind: Some(env.kind),
                signed: true,
            };
        }
        match self.seen.get(&env.id) {
            Some(Seen::Answered(reply)) => return Admit::Resend(reply.clone()),
            Some(_) => {
                return Admit::Reject {
                    err: WireError::new(
                        Code::Replay,
                        format!("message id {} was already received", env.id),
                    ),
                    re: Some(env.id),
                    kind: Some(env.kind),
                    signed: true,
                }
            }
            None => {}
        }
        while self.seen.len() >= self.limits.cache_entries {
            // Over capacity: forget the oldest ids first. A flood that big within one
            // skew window is logged by the caller as rejected traffic anyway.
            match self.order.pop_front() {
                Some((_, id)) => {
                    self.seen.remove(&id);
                }
                None => break,
            }
        }
        self.seen.insert(env.id.clone(), Seen::InFlight);
        self.order
            .push_back((env.ts.max(now) + self.limits.skew_ms, env.id.clone()));
        Admit::Fresh { env, key_id }
    }

    /// Records the reply sent for request `id`, so a resend gets the same answer.
    pub fn answered(&mut self, id: &str, payload: &[u8], sig: &str) {
        if let Some(entry) = self.seen.get_mut(id) {
            *entry = if payload.len() <= self.limits.max_cached_reply {
                Seen::Answered(Arc::new((payload.to_vec(), sig.to_string())))
            } else {
                Seen::Forgotten
            };
        }
    }

    /// Forgets request `id` (its reply said nothing was done), so a resend is acted on.
    pub fn forget(&mut self, id: &str) {
        self.seen.remove(id);
    }

    fn expire(&mut self, now: i64) {
        while let Some((until, _)) = self.order.front() {
            if *until >= now {
                break;
            }
            if let Some((_, id)) = self.order.pop_front() {
                self.seen.remove(&id);
            }
        }
    }

    pub fn cached(&self) -> usize {
        self.seen.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::{now_ms, Envelope};
    use crate::keyring::generate_secret_hex;
    use serde_json::json;

    fn keys() -> Keyring {
        let s = generate_secret_hex();
        Keyring::from_hex([("k", s.as_str())], "k").unwrap()
    }

    fn code(a: Admit) -> (Code, bool) {
        match a {
            Admit::Reject { err, signed, .. } => (err.code, signed),
            other => panic!("expected a rejection, got {other:?}"),
        }
    }

    #[test]
    fn fresh_then_replay_then_resend_after_answer() {
        let k = keys();
        let mut g = Gate::new(Limits::default());
        let env = Envelope::new("t@n", "ping", json!({}));
        let (p, s) = env.sign(&k);
        let now = now_ms();
        assert!(matches!(
            g.admit(&k, &p, s.as_bytes(), now),
            Admit::Fresh { .. }
        ));
        assert_eq!(
            code(g.admit(&k, &p, s.as_bytes(), now)),
            (Code::Replay, true)
        );
        g.answered(&env.id, b"reply", "k:00");
        match g.admit(&k, &p, s.as_bytes(), now) {
            Admit::Resend(r) => assert_eq!(r.0, b"reply"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn each_check_has_its_code() {
        let k = keys();
        let limits = Limits {
            max_payload: 200,
            ..Limits::default()
        };
        let mut g = Gate::new(limits);
        let now = now_ms();
        let big = Envelope::new("t@n", "ping", json!({"pad": "x".repeat(300)}));
        let (p, s) = big.sign(&k);
        assert_eq!(
            code(g.admit(&k, &p, s.as_bytes(), now)),
            (Code::TooLarge, false)
        );

        let env = Envelope::new("t@n", "ping", json!({}));
        let (p, s) = env.sign(&k);
        let bad = s.replace("k:", "zz:");
        assert_eq!(
            code(g.admit(&k, &p, bad.as_bytes(), now)),
            (Code::UnknownKey, false)
        );
        let mut tampered = p.clone();
        tampered[10] ^= 1;
        assert_eq!(
            code(g.admit(&k, &tampered, s.as_bytes(), now)),
            (Code::BadSignature, false)
        );
        let junk = b"{not json";
        let sig = k.sign(junk);
        assert_eq!(
            code(g.admit(&k, junk, sig.as_bytes(), now)),
            (Code::Malformed, true)
        );

        let mut old = Envelope::new("t@n", "ping", json!({}));
        old.ts -= 31_000;
        let (p, s) = old.sign(&k);
        assert_eq!(
            code(g.admit(&k, &p, s.as_bytes(), now)),
            (Code::Stale, true)
        );
    }

    #[test]
    fn cache_is_bounded_and_expires_with_the_window() {
        let k = keys();
        let mut g = Gate::new(Limits {
            cache_entries: 10,
            ..Limits::default()
        });
        let now = now_ms();
        for _ in 0..50 {
            let (p, s) = Envelope::new("t@n", "ping", json!({})).sign(&k);
            assert!(matches!(
                g.admit(&k, &p, s.as_bytes(), now),
                Admit::Fresh { .. }
            ));
        }
        assert!(g.cached() <= 10);
        let (p, s) = Envelope::new("t@n", "ping", json!({})).sign(&k);
        assert!(matches!(
            g.admit(&k, &p, s.as_bytes(), now + 61_000),
            Admit::Reject { .. } // stale: ts is now far behind
        ));
        assert_eq!(g.cached(), 0, "every id expired with the window");
    }
}
