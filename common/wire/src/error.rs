//! The protocol's error codes and the one error type that crosses the wire.

use std::fmt;

/// Error codes shared by every kind (PROTOCOL.md, "Shared error codes"), plus the
/// kind-specific codes this project defines. `Other` carries a code this build does
/// not know, so a client never loses what a newer server said.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Code {
    Malformed,
    TooLarge,
    UnknownKey,
    BadSignature,
    UnsupportedVersion,
    Stale,
    Replay,
    Forbidden,
    UnknownKind,
    Invalid,
    NotFound,
    Conflict,
    Unavailable,
    Timeout,
    Internal,
    /// locker: the lock is held by someone else.
    Held,
    /// locker: the token is not the current grant's.
    StaleToken,
    /// The request may or may not have been carried out (the database failed while
    /// committing it); unlike `unavailable`, resending the same message is not safe
    /// to assume nothing happened: re-issue it as a new request to learn which.
    UnknownOutcome,
    Other(String),
}

impl Code {
    pub fn as_str(&self) -> &str {
        match self {
            Code::Malformed => "malformed",
            Code::TooLarge => "too_large",
            Code::UnknownKey => "unknown_key",
            Code::BadSignature => "bad_signature",
            Code::UnsupportedVersion => "unsupported_version",
            Code::Stale => "stale",
            Code::Replay => "replay",
            Code::Forbidden => "forbidden",
            Code::UnknownKind => "unknown_kind",
            Code::Invalid => "invalid",
            Code::NotFound => "not_found",
            Code::Conflict => "conflict",
            Code::Unavailable => "unavailable",
            Code::Timeout => "timeout",
            Code::Internal => "internal",
            Code::Held => "held",
            Code::StaleToken => "stale_token",
            Code::UnknownOutcome => "unknown_outcome",
            Code::Other(s) => s,
        }
    }

    pub fn parse(s: &str) -> Code {
        match s {
            "malformed" => Code::Malformed,
            "too_large" => Code::TooLarge,
            "unknown_key" => Code::UnknownKey,
            "bad_signature" => Code::BadSignature,
            "unsupported_version" => Code::UnsupportedVersion,
            "stale" => Code::Stale,
            "replay" => Code::Replay,
            "forbidden" => Code::Forbidden,
            "unknown_kind" => Code::UnknownKind,
            "invalid" => Code::Invalid,
            "not_found" => Code::NotFound,
            "conflict" => Code::Conflict,
            "unavailable" => Code::Unavailable,
            "timeout" => Code::Timeout,
            "internal" => Code::Internal,
            "held" => Code::Held,
            "stale_token" => Code::StaleToken,
            "unknown_outcome" => Code::UnknownOutcome,
            other => Code::Other(other.to_string()),
        }
    }

    /// Codes a receiver sends unsigned, because the request could not be authenticated.
    pub fn is_unauthenticated(&self) -> bool {
        matches!(
            self,
            Code::Malformed | Code::TooLarge | Code::UnknownKey | Code::BadSignature
        )
    }

    /// Codes after which retrying the very same request can succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, Code::Unavailable | Code::Timeout)
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error as it travels in a reply: `body.error = {"code", "message"}` plus any
/// kind-specific fields (`extra`, merged into `body.error`).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct WireError {
    pub code: Code,
    pub message: String,
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl WireError {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        WireError {
            code,
            message: message.into(),
            extra: serde_json::Map::new(),
        }
    }

    pub fn with(mut self, key: &str, value: impl Into<serde_json::Value>) -> Self {
        self.extra.insert(key.to_string(), value.into());
        self
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        WireError::new(Code::Invalid, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        WireError::new(Code::Internal, message)
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        WireError::new(Code::Unavailable, message)
    }

    /// The `body` of an error reply.
    pub fn to_body(&self) -> serde_json::Value {
        let mut err = self.extra.clone();
        err.insert("code".into(), self.code.as_str().into());
        err.insert("message".into(), self.message.clone().into());
        serde_json::json!({"ok": false, "error": err})
    }

    /// Reads `body.error` of a reply whose `ok` is false.
    pub fn from_body(body: &serde_json::Value) -> Option<WireError> {
        if body.get("ok").and_then(|v| v.as_bool()) != Some(false) {
            return None;
        }
        let err = body.get("error")?.as_object()?;
        let code = Code::parse(err.get("code")?.as_str()?);
        let message = err
            .get("message")
            .and_then(|m| m.as_str())
            .unwrap_or("")
            .to_string();
        let mut extra = err.clone();
        extra.remove("code");
        extra.remove("message");
        Some(WireError {
            code,
            message,
            extra,
        })
    }
}
