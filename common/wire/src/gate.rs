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
    /// Most bytes the replay/reply cache may hold (ids, signatures and replies).
    pub cache_bytes: usize,
    /// Largest reply kept for answering a resend, in bytes.
    pub max_cached_reply: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_payload: 1 << 20,
            skew_ms: 30_000,
            cache_entries: 100_000,
            cache_bytes: 64 << 20,
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
    /// Refused. `signer` is the key id that verified the message, `None` when it
    /// could not be authenticated (the error then goes unsigned).
    Reject {
        err: WireError,
        re: Option<String>,
        kind: Option<String>,
        signer: Option<String>,
    },
}

enum Seen {
    InFlight,
    Answered(Arc<(Vec<u8>, String)>),
    /// Answered, but the reply was too large to keep: a resend gets `replay`.
    Forgotten,
}

struct Entry {
    /// The request's signature: the same bytes under the same key mean the same
    /// message, so a resend is told apart from a different message reusing the id.
    sig: Vec<u8>,
    seen: Seen,
    /// Bytes this entry is charged against `cache_bytes`.
    cost: usize,
}

/// Bytes charged for an entry beyond its strings and reply (map and queue slots).
const ENTRY_OVERHEAD: usize = 128;

/// The replay/reply cache is keyed by the signing key's id and the message id, so
/// one sender resending another's id never gets the other's reply.
type CacheKey = (String, String);

pub struct Gate {
    limits: Limits,
    seen: HashMap<CacheKey, Entry>,
    /// (ts + skew after which the id can be forgotten, key), in arrival order.
    order: VecDeque<(i64, CacheKey)>,
    bytes: usize,
    /// Entries and bytes (cached replies included) each user key holds: one
    /// person's flood may take at most `1 / USER_SHARE` of the cache's ids, and
    /// have at most that share of its bytes in cached replies, so it cannot lock
    /// every other caller (cluster daemons included) out with `unavailable`.
    per_user: HashMap<String, (usize, usize)>,
}

/// The share of the replay cache one user key may hold (a quarter: 25,000
/// message ids inside the window at the default limits).
const USER_SHARE: usize = 4;

/// Cached replies may fill at most this share of `cache_bytes`, so admitting a
/// new id always finds room however large the replies were (a reply that does
/// not fit is not cached: a resend of its request is then `replay`).
const REPLY_SHARE_NUM: usize = 3;
const REPLY_SHARE_DEN: usize = 4;

impl Gate {
    pub fn new(limits: Limits) -> Gate {
        Gate {
            limits,
            seen: HashMap::new(),
            order: VecDeque::new(),
            bytes: 0,
            per_user: HashMap::new(),
        }
    }

    /// Gives back what entry `(key_id, …)` held of its user key's share (a key
    /// that is not a user key has no row).
    fn refund_user(&mut self, key_id: &str, cost: usize) {
        if let Some(e) = self.per_user.get_mut(key_id) {
            e.0 = e.0.saturating_sub(1);
            e.1 = e.1.saturating_sub(cost);
            if e.0 == 0 {
                self.per_user.remove(key_id);
            }
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
            signer: None,
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
                signer: None,
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
                    signer: Some(key_id),
                };
            }
        };
        // `ts` is the sender's to choose: compare without overflowing on extremes.
        if now.abs_diff(env.ts) > self.limits.skew_ms.unsigned_abs() {
            return Admit::Reject {
                err: WireError::new(
                    Code::Stale,
                    format!(
                        "message time is {} ms from this daemon's clock; the window is {} ms (check NTP)",
                        i128::from(now) - i128::from(env.ts),
                        self.limits.skew_ms
                    ),
                ),
                re: Some(env.id),
                kind: Some(env.kind),
                signer: Some(key_id),
            };
        }
        let key = (key_id, env.id);
        match self.seen.get(&key) {
            Some(entry) if entry.sig != sig => {
                return Admit::Reject {
                    err: WireError::new(
                        Code::Replay,
                        format!(
                            "message id {} was already used for a different message",
                            key.1
                        ),
                    ),
                    re: Some(key.1),
                    kind: Some(env.kind),
                    signer: Some(key.0),
                }
            }
            Some(Entry {
                seen: Seen::Answered(reply),
                ..
            }) => return Admit::Resend(reply.clone()),
            Some(_) => {
                return Admit::Reject {
                    err: WireError::new(
                        Code::Replay,
                        format!("message id {} was already received", key.1),
                    ),
                    re: Some(key.1),
                    kind: Some(env.kind),
                    signer: Some(key.0),
                }
            }
            None => {}
        }
        let cost = ENTRY_OVERHEAD + key.0.len() + key.1.len() + sig.len();
        if self.seen.len() >= self.limits.cache_entries
            || self.bytes + cost > self.limits.cache_bytes
        {
            // Full of ids still inside the skew window. Evicting one would let its
            // resend be acted on twice, so refuse the new message instead: nothing is
            // done, and the sender may retry once older ids expire.
            return Admit::Reject {
                err: WireError::new(
                    Code::Unavailable,
                    format!(
                        "this daemon is overloaded: its replay cache holds {} messages ({} bytes) from the last {} ms; retry shortly",
                        self.seen.len(),
                        self.bytes,
                        self.limits.skew_ms
                    ),
                ),
                re: Some(key.1),
                kind: Some(env.kind),
                signer: Some(key.0),
            };
        }
        let user = crate::keyring::UserKeys::is_user_key_id(&key.0);
        if user {
            let n = self.per_user.get(&key.0).map(|e| e.0).unwrap_or_default();
            if n >= self.limits.cache_entries / USER_SHARE {
                return Admit::Reject {
                    err: WireError::new(
                        Code::Unavailable,
                        format!(
                            "too many requests with key {} in the last {} ms ({n}); slow down and retry",
                            key.0, self.limits.skew_ms
                        ),
                    ),
                    re: Some(key.1),
                    kind: Some(env.kind),
                    signer: Some(key.0),
                };
            }
        }
        self.bytes += cost;
        if user {
            let e = self.per_user.entry(key.0.clone()).or_default();
            e.0 += 1;
            e.1 += cost;
        }
        self.seen.insert(
            key.clone(),
            Entry {
                sig: sig.to_vec(),
                seen: Seen::InFlight,
                cost,
            },
        );
        let until = env.ts.max(now).saturating_add(self.limits.skew_ms);
        self.order.push_back((until, key.clone()));
        Admit::Fresh {
            env: Envelope { id: key.1, ..env },
            key_id: key.0,
        }
    }

    /// Records the reply sent for request `id` (signed with `key_id`), so a resend
    /// gets the same answer.
    pub fn answered(&mut self, key_id: &str, id: &str, payload: &[u8], sig: &str) {
        let key = (key_id.to_string(), id.to_string());
        let mut charged = 0;
        // A user key's admitted ids have a row in `per_user`; other keys none.
        let user_room = match self.per_user.get(key_id) {
            Some(e) => (self.limits.cache_bytes / USER_SHARE).saturating_sub(e.1),
            None => usize::MAX,
        };
        let reply_limit = self.limits.cache_bytes / REPLY_SHARE_DEN * REPLY_SHARE_NUM;
        if let Some(entry) = self.seen.get_mut(&key) {
            let extra = payload.len() + sig.len();
            entry.seen = if payload.len() <= self.limits.max_cached_reply
                && self.bytes + extra <= reply_limit
                && extra <= user_room
            {
                self.bytes += extra;
                entry.cost += extra;
                charged = extra;
                Seen::Answered(Arc::new((payload.to_vec(), sig.to_string())))
            } else {
                Seen::Forgotten
            };
        }
        if let Some(e) = self.per_user.get_mut(key_id) {
            e.1 += charged;
        }
    }

    /// Forgets request `id` (its reply said nothing was done), so a resend is acted on.
    pub fn forget(&mut self, key_id: &str, id: &str) {
        if let Some(e) = self.seen.remove(&(key_id.to_string(), id.to_string())) {
            self.bytes -= e.cost;
            self.refund_user(key_id, e.cost);
        }
    }

    fn expire(&mut self, now: i64) {
        while let Some((until, _)) = self.order.front() {
            if *until >= now {
                break;
            }
            if let Some((_, key)) = self.order.pop_front() {
                if let Some(e) = self.seen.remove(&key) {
                    self.bytes -= e.cost;
                    self.refund_user(&key.0, e.cost);
                }
            }
        }
    }

    pub fn cached(&self) -> usize {
        self.seen.len()
    }

    pub fn cached_bytes(&self) -> usize {
        self.bytes
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
            Admit::Reject { err, signer, .. } => (err.code, signer.is_some()),
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
        g.answered("k", &env.id, b"reply", "k:00");
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
    fn one_user_key_may_fill_only_its_share_of_the_cache() {
        let secret = generate_secret_hex();
        let users = crate::keyring::UserKeys::from_hex(&secret).unwrap();
        let api = Keyring::from_hex([("cluster", secret.as_str())], "cluster")
            .unwrap()
            .with_user_keys(users.clone())
            .unwrap();
        let id = "user.01JCT6S3W4F8D9X2QZ7N5K0BVA";
        let user =
            Keyring::from_hex([(id, hex::encode(users.secret(id).unwrap()).as_str())], id).unwrap();
        let mut g = Gate::new(Limits {
            cache_entries: 10 * USER_SHARE,
            ..Limits::default()
        });
        let now = now_ms();
        for _ in 0..10 {
            let (p, s) = Envelope::new("user:a", "whoami", json!({})).sign(&user);
            let a = g.admit(&api, &p, s.as_bytes(), now);
            assert!(matches!(a, Admit::Fresh { .. }), "{a:?}");
        }
        let (p, s) = Envelope::new("user:a", "whoami", json!({})).sign(&user);
        match g.admit(&api, &p, s.as_bytes(), now) {
            Admit::Reject { err, .. } => {
                assert_eq!(err.code, Code::Unavailable);
                assert!(
                    err.message.contains("too many requests with key"),
                    "{}",
                    err.message
                );
            }
            other => panic!("the user's 11th message was admitted: {other:?}"),
        }
        // The cluster's own messages still get in: the cache is far from full.
        let (p, s) = Envelope::new("t@n", "ping", json!({})).sign(&api);
        assert!(matches!(
            g.admit(&api, &p, s.as_bytes(), now),
            Admit::Fresh { .. }
        ));
        // Once the window has passed the user's share is free again.
        let later = now + 31_000;
        let mut fresh = Envelope::new("user:a", "whoami", json!({}));
        fresh.ts = later;
        let (p, s) = fresh.sign(&user);
        assert!(matches!(
            g.admit(&api, &p, s.as_bytes(), later),
            Admit::Fresh { .. }
        ));
    }

    #[test]
    fn cached_replies_never_leave_no_room_to_admit_a_new_id() {
        let k = keys();
        let mut g = Gate::new(Limits {
            cache_bytes: 64 * 1024,
            ..Limits::default()
        });
        let now = now_ms();
        // Twenty 4 KB replies would fill the 64 KiB whole; they may take at
        // most three quarters of it.
        for _ in 0..20 {
            let (p, s) = Envelope::new("t@n", "ping", json!({})).sign(&k);
            let Admit::Fresh { env, key_id } = g.admit(&k, &p, s.as_bytes(), now) else {
                panic!("refused while filling");
            };
            g.answered(&key_id, &env.id, &[b'x'; 4000], "k:00");
        }
        assert!(g.cached_bytes() <= 56 * 1024, "{}", g.cached_bytes());
        // New ids are still admitted.
        let (p, s) = Envelope::new("t@n", "ping", json!({})).sign(&k);
        assert!(matches!(
            g.admit(&k, &p, s.as_bytes(), now),
            Admit::Fresh { .. }
        ));
    }

    #[test]
    fn a_full_cache_refuses_new_ids_instead_of_forgetting_live_ones() {
        let k = keys();
        let mut g = Gate::new(Limits {
            cache_entries: 10,
            ..Limits::default()
        });
        let now = now_ms();
        let mut first = Vec::new();
        for _ in 0..10 {
            let (p, s) = Envelope::new("t@n", "ping", json!({})).sign(&k);
            assert!(matches!(
                g.admit(&k, &p, s.as_bytes(), now),
                Admit::Fresh { .. }
            ));
            first.push((p, s));
        }
        let (p, s) = Envelope::new("t@n", "ping", json!({})).sign(&k);
        assert_eq!(
            code(g.admit(&k, &p, s.as_bytes(), now)),
            (Code::Unavailable, true),
            "the eleventh id is refused while ten are live"
        );
        // Every live id is still remembered: none of them can be acted on twice.
        for (p, s) in &first {
            assert_eq!(
                code(g.admit(&k, p, s.as_bytes(), now)),
                (Code::Replay, true)
            );
        }
        assert_eq!(g.cached(), 10);
        // Once the window has passed they expire and new ids are taken again.
        let later = now + 31_000;
        let mut fresh = Envelope::new("t@n", "ping", json!({}));
        fresh.ts = later;
        let (p, s2) = fresh.sign(&k);
        assert!(matches!(
            g.admit(&k, &p, s2.as_bytes(), later),
            Admit::Fresh { .. }
        ));
        assert_eq!(g.cached(), 1, "every old id expired with the window");
    }

    #[test]
    fn the_cache_is_bounded_by_bytes_too() {
        let k = keys();
        let mut g = Gate::new(Limits {
            cache_bytes: 4 * 1024,
            ..Limits::default()
        });
        let now = now_ms();
        let mut admitted = 0;
        let mut refused = 0;
        for _ in 0..100 {
            let env = Envelope::new("t@n", "ping", json!({}));
            let (p, s) = env.sign(&k);
            match g.admit(&k, &p, s.as_bytes(), now) {
                Admit::Fresh { env, key_id } => {
                    admitted += 1;
                    g.answered(&key_id, &env.id, &[b'x'; 200], "k:00");
                }
                Admit::Reject { err, .. } => {
                    assert_eq!(err.code, Code::Unavailable);
                    refused += 1;
                }
                other => panic!("{other:?}"),
            }
            assert!(g.cached_bytes() <= 4 * 1024);
        }
        assert!(
            admitted > 0 && refused > 0,
            "{admitted} admitted, {refused} refused"
        );
    }

    #[test]
    fn ids_are_per_key_and_a_reused_id_with_other_content_is_a_replay() {
        let a_secret = generate_secret_hex();
        let b_secret = generate_secret_hex();
        let both =
            Keyring::from_hex([("a", a_secret.as_str()), ("b", b_secret.as_str())], "a").unwrap();
        let only_b = Keyring::from_hex([("b", b_secret.as_str())], "b").unwrap();
        let mut g = Gate::new(Limits::default());
        let now = now_ms();
        let env = Envelope::new("user:a", "ping", json!({}));
        let (p, s) = env.sign(&both);
        let Admit::Fresh { key_id, .. } = g.admit(&both, &p, s.as_bytes(), now) else {
            panic!("fresh")
        };
        g.answered(&key_id, &env.id, b"a's reply", "a:00");
        // B sends a message with A's id: it is B's own message, never A's reply.
        let (pb, sb) = env.sign(&only_b);
        assert!(matches!(
            g.admit(&both, &pb, sb.as_bytes(), now),
            Admit::Fresh { .. }
        ));
        // A reuses its id for different content: refused, not answered with the old reply.
        let mut other = env.clone();
        other.body = json!({"x": 1});
        let (po, so) = other.sign(&both);
        assert_eq!(
            code(g.admit(&both, &po, so.as_bytes(), now)),
            (Code::Replay, true)
        );
        // A's true resend gets A's reply.
        match g.admit(&both, &p, s.as_bytes(), now) {
            Admit::Resend(r) => assert_eq!(r.0, b"a's reply"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn extreme_timestamps_are_stale_not_a_panic() {
        let k = keys();
        let mut g = Gate::new(Limits::default());
        for ts in [i64::MIN, i64::MAX, i64::MIN + 1] {
            let mut env = Envelope::new("t@n", "ping", json!({}));
            env.ts = ts;
            let (p, s) = env.sign(&k);
            assert_eq!(
                code(g.admit(&k, &p, s.as_bytes(), now_ms())),
                (Code::Stale, true)
            );
        }
    }
}
