//! The JSON payload every message carries, and how it is built and checked.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Code, WireError};
use crate::keyring::{Keyring, UNSIGNED};

/// The protocol version this build speaks.
pub const VERSION: u64 = 1;

/// One message's payload (PROTOCOL.md, "Payload fields").
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Envelope {
    pub v: u64,
    pub id: String,
    pub ts: i64,
    pub from: String,
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub re: Option<String>,
    pub body: Value,
}

/// Unix epoch milliseconds now.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A new message id: a ULID (26 characters of Crockford base32).
pub fn new_id() -> String {
    ulid::Ulid::new().to_string()
}

pub fn valid_id(id: &str) -> bool {
    (16..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

pub fn valid_kind(kind: &str) -> bool {
    !kind.is_empty()
        && kind.len() <= 128
        && kind
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'.')
}

impl Envelope {
    /// A new request or event from `from`.
    pub fn new(from: &str, kind: &str, body: Value) -> Envelope {
        Envelope {
            v: VERSION,
            id: new_id(),
            ts: now_ms(),
            from: from.to_string(),
            kind: kind.to_string(),
            re: None,
            body,
        }
    }

    /// A reply to `req` carrying `body`.
    pub fn reply_to(from: &str, req_id: Option<&str>, kind: &str, body: Value) -> Envelope {
        Envelope {
            re: req_id.map(str::to_string),
            ..Envelope::new(from, kind, body)
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        // Serializing a struct of strings, ints and a Value cannot fail.
        serde_json::to_vec(self).expect("envelope serializes")
    }

    /// The payload bytes and their signature.
    pub fn sign(&self, keys: &Keyring) -> (Vec<u8>, String) {
        let payload = self.to_bytes();
        let sig = keys.sign(&payload);
        (payload, sig)
    }

    /// Whether the body says `ok: true`.
    pub fn is_ok(&self) -> bool {
        self.body.get("ok").and_then(Value::as_bool) == Some(true)
    }
}

/// Step 4 of the receiver's checks: a JSON object with the protocol's fields and a
/// supported version. Called only after the signature was verified.
pub fn parse_payload(payload: &[u8]) -> Result<Envelope, WireError> {
    let value: Value = serde_json::from_slice(payload)
        .map_err(|e| WireError::new(Code::Malformed, format!("payload is not JSON: {e}")))?;
    let obj = value
        .as_object()
        .ok_or_else(|| WireError::new(Code::Malformed, "payload is not a JSON object"))?;
    match obj.get("v") {
        Some(Value::Number(n)) if n.as_u64() == Some(VERSION) => {}
        Some(Value::Number(n)) => {
            return Err(WireError::new(
                Code::UnsupportedVersion,
                format!(
                    "protocol version {n} is not supported; this daemon speaks version {VERSION}"
                ),
            ))
        }
        _ => {
            return Err(WireError::new(
                Code::Malformed,
                "field `v` is missing or not an integer",
            ))
        }
    }
    let env: Envelope = serde_json::from_value(value)
        .map_err(|e| WireError::new(Code::Malformed, format!("payload fields: {e}")))?;
    if !valid_id(&env.id) {
        return Err(WireError::new(
            Code::Malformed,
            "field `id` must be 16-64 characters of [A-Za-z0-9_-]",
        ));
    }
    if !valid_kind(&env.kind) {
        return Err(WireError::new(
            Code::Malformed,
            "field `kind` must be a dotted verb of [a-z0-9_.]",
        ));
    }
    if !env.body.is_object() {
        return Err(WireError::new(
            Code::Malformed,
            "field `body` must be a JSON object",
        ));
    }
    Ok(env)
}

/// Best effort, for error replies only: the `id` and `kind` of a payload we could not
/// authenticate, so the sender can match our refusal to its request. Nothing is acted on.
pub fn peek_id_kind(payload: &[u8]) -> (Option<String>, Option<String>) {
    #[derive(Deserialize)]
    struct Peek {
        id: Option<String>,
        kind: Option<String>,
    }
    match serde_json::from_slice::<Peek>(payload) {
        Ok(p) => (
            p.id.filter(|i| valid_id(i)),
            p.kind.filter(|k| valid_kind(k)),
        ),
        Err(_) => (None, None),
    }
}

/// The `re` of a reply, read without trusting it (to find the request it answers;
/// the reply is verified by whoever takes it).
pub fn peek_re(payload: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Peek {
        re: Option<String>,
    }
    serde_json::from_slice::<Peek>(payload)
        .ok()?
        .re
        .filter(|r| valid_id(r))
}

/// An unsigned error reply (for requests that could not be authenticated).
pub fn unsigned_error(
    from: &str,
    re: Option<&str>,
    kind: Option<&str>,
    err: &WireError,
) -> (Vec<u8>, String) {
    let env = Envelope::reply_to(from, re, kind.unwrap_or("error"), err.to_body());
    (env.to_bytes(), UNSIGNED.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_accepts_the_protocol_example() {
        let p = br#"{"v":1,"id":"01JCT6S3W4F8D9X2QZ7N5K0BVA","ts":1763900000123,"from":"user:alice","kind":"ping","body":{},"extra":"ignored"}"#;
        let e = parse_payload(p).unwrap();
        assert_eq!(e.kind, "ping");
        assert_eq!(e.ts, 1763900000123);
        assert_eq!(e.re, None);
    }

    #[test]
    fn parse_rejects_bad_shapes_with_the_right_code() {
        let cases: &[(&[u8], Code)] = &[
            (b"not json", Code::Malformed),
            (b"[1,2]", Code::Malformed),
            (br#"{"id":"x"}"#, Code::Malformed),
            (
                br#"{"v":2,"id":"01JCT6S3W4F8D9X2QZ7N5K0BVA","ts":1,"from":"a","kind":"ping","body":{}}"#,
                Code::UnsupportedVersion,
            ),
            (
                br#"{"v":1,"id":"short","ts":1,"from":"a","kind":"ping","body":{}}"#,
                Code::Malformed,
            ),
            (
                br#"{"v":1,"id":"01JCT6S3W4F8D9X2QZ7N5K0BVA","ts":1,"from":"a","kind":"Ping!","body":{}}"#,
                Code::Malformed,
            ),
            (
                br#"{"v":1,"id":"01JCT6S3W4F8D9X2QZ7N5K0BVA","ts":1,"from":"a","kind":"ping","body":[]}"#,
                Code::Malformed,
            ),
            (
                br#"{"v":1,"id":"01JCT6S3W4F8D9X2QZ7N5K0BVA","ts":"1","from":"a","kind":"ping","body":{}}"#,
                Code::Malformed,
            ),
        ];
        for (payload, code) in cases {
            let err = parse_payload(payload).unwrap_err();
            assert_eq!(&err.code, code, "{}", String::from_utf8_lossy(payload));
        }
    }

    #[test]
    fn ids_are_valid_and_unique() {
        let a = new_id();
        let b = new_id();
        assert!(valid_id(&a));
        assert_ne!(a, b);
    }

    #[test]
    fn error_body_round_trips() {
        let e = WireError::new(Code::Held, "held by x").with("holder", "x");
        let back = WireError::from_body(&e.to_body()).unwrap();
        assert_eq!(back, e);
    }
}
