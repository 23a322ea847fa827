//! Typed bodies of the kinds this build implements (docs/PROTOCOL.md lists them all).
//! Unknown fields are ignored on the way in; replies get `ok: true` added by the server.

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::WireError;

/// Reads a request body as `T`; a wrong or missing field is `invalid`, naming it.
pub fn parse_body<T: DeserializeOwned>(kind: &str, body: &Value) -> Result<T, WireError> {
    T::deserialize(body).map_err(|e| WireError::invalid(format!("{kind}: {e}")))
}

/// A body as JSON.
pub fn to_body<T: Serialize>(t: &T) -> Value {
    serde_json::to_value(t).expect("bodies serialize")
}

pub const PING: &str = "ping";
pub const STATS: &str = "stats";

/// `ping` reply.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Pong {
    pub daemon: String,
    pub node: String,
    pub instance: String,
    pub version: String,
    pub uptime_ms: u64,
}

pub const HEARTBEAT_BEAT: &str = "heartbeat.beat";
pub const REGISTRY_LIST: &str = "registry.list";
pub const REGISTRY_UP: &str = "registry.up";
pub const REGISTRY_DOWN: &str = "registry.down";

/// `heartbeat.beat` body.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Beat {
    pub daemon: String,
    pub node: String,
    pub instance: String,
    #[serde(default)]
    pub endpoints: BTreeMap<String, String>,
    pub interval_ms: u64,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum ServiceState {
    Alive,
    Suspect,
    Dead,
}

impl ServiceState {
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceState::Alive => "alive",
            ServiceState::Suspect => "suspect",
            ServiceState::Dead => "dead",
        }
    }
}

/// One entry of the registry (`registry.list`, `registry.up`, `registry.down`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Service {
    pub daemon: String,
    pub node: String,
    pub instance: String,
    pub endpoints: BTreeMap<String, String>,
    pub state: ServiceState,
    pub last_seen: i64,
    #[serde(default)]
    pub interval_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ServiceList {
    pub services: Vec<Service>,
}

pub const LOCK_ACQUIRE: &str = "lock.acquire";
pub const LOCK_RENEW: &str = "lock.renew";
pub const LOCK_RELEASE: &str = "lock.release";
pub const LOCK_CHECK: &str = "lock.check";
pub const LOCK_LIST: &str = "lock.list";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LockAcquire {
    pub name: String,
    pub owner: String,
    pub ttl_ms: u64,
    #[serde(default)]
    pub wait_ms: u64,
}

/// Reply to `lock.acquire` and `lock.renew`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LockGrant {
    pub token: i64,
    pub expires: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LockRenew {
    pub name: String,
    pub token: i64,
    pub ttl_ms: u64,
}

/// Body of `lock.release` and `lock.check`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LockToken {
    pub name: String,
    pub token: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LockValid {
    pub valid: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LockInfo {
    pub name: String,
    pub owner: String,
    pub token: i64,
    pub expires: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LockList {
    pub locks: Vec<LockInfo>,
}
