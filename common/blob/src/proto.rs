//! The blob kinds as they travel (docs/PROTOCOL.md, "blobstore"): kind names,
//! bodies and replies, and the rules both sides check. The blobstore daemon and
//! every client use these, so the two can never disagree on a field.

use serde::{Deserialize, Serialize};

/// The daemon that stores blobs, as the registry names it.
pub const DAEMON: &str = "blobstore";

pub const PUT_BEGIN: &str = "blob.put.begin";
pub const PUT_CHUNK: &str = "blob.put.chunk";
pub const PUT_COMMIT: &str = "blob.put.commit";
pub const GET: &str = "blob.get";
pub const STAT: &str = "blob.stat";
pub const LIST: &str = "blob.list";
pub const GC: &str = "blob.gc";
/// The api's cluster kind the blobstore asks before collecting.
pub const REFERENCED: &str = "blob.referenced";

/// The most raw bytes one chunk carries (base64 makes it 4/3 larger, well inside
/// the envelope's 1 MiB limit).
pub const CHUNK: usize = 512 * 1024;

/// The blobstore's own error code: its copy does not match its sha256 and no
/// peer has a good one.
pub const CODE_CORRUPT: &str = "corrupt";

/// Whether `s` is a sha256 as blobs are named: 64 lowercase hex digits. It
/// becomes a path component, so nothing else may pass.
pub fn is_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// `is_sha256` as a reason a person can act on.
pub fn check_sha256(field: &str, s: &str) -> Result<(), String> {
    if is_sha256(s) {
        Ok(())
    } else {
        let shown: String = s.chars().take(80).collect();
        Err(format!(
            "`{field}` must be a sha256 of 64 lowercase hex digits, not {shown:?}"
        ))
    }
}

/// `blob.put.begin` reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Begun {
    pub upload: String,
}

/// `blob.put.chunk` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chunk {
    pub upload: String,
    pub offset: u64,
    /// base64 (standard alphabet, padded) of at most [`CHUNK`] bytes.
    pub data: String,
}

/// `blob.put.chunk` reply: the bytes received so far.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Received {
    pub received: u64,
}

fn yes() -> bool {
    true
}

/// `blob.put.commit` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Commit {
    pub upload: String,
    pub sha256: String,
    pub size: u64,
    /// Copy the blob to the peer blobstore before answering (a peer's own copy
    /// is put with `false`).
    #[serde(default = "yes")]
    pub replicate: bool,
}

/// `blob.put.commit` reply: where the blob now is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stored {
    pub sha256: String,
    pub size: u64,
    /// How many blobstores hold it now (2 with a pair, 1 without a live peer).
    pub copies: u32,
}

/// `blob.get` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Get {
    pub sha256: String,
    pub offset: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub length: Option<u64>,
    /// Answer from this blobstore's own copy only, never repairing it from the
    /// peer first (the blobstores' own fetches from each other set it, so two
    /// members missing one blob never ask each other in a circle).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub local: bool,
}

/// `blob.get` reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Got {
    pub data: String,
    pub size: u64,
    pub eof: bool,
}

/// `blob.stat` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stat {
    pub sha256: String,
}

/// `blob.stat` reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatReply {
    pub present: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
}

/// `blob.list` body: blobs in sha256 order, from after `after`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct List {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<String>,
}

/// One blob in a listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub sha256: String,
    pub size: u64,
}

/// `blob.list` reply: at most [`LIST_PAGE`] entries; `more` says to ask again
/// with `after` = the last sha256.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Listing {
    pub blobs: Vec<Entry>,
    #[serde(default)]
    pub more: bool,
}

/// Entries per `blob.list` page (about 90 bytes each: well inside 1 MiB).
pub const LIST_PAGE: usize = 5000;

/// `blob.gc` reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Collected {
    pub removed: Vec<String>,
    pub kept: u64,
}

/// `blob.referenced` (api) body: the releases to keep per app.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Referenced {
    pub keep: u32,
}

/// `blob.referenced` reply: every blob a kept release (or anything else the api
/// knows of) still needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReferencedReply {
    pub blobs: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_64_lowercase_hex_digits_name_a_blob() {
        let good = "0123456789abcdef".repeat(4);
        assert!(is_sha256(&good));
        let table = [
            "".to_string(),
            good[..63].to_string(),
            format!("{good}0"),
            good.to_uppercase(),
            format!("../{}", &good[3..]),
            format!("{}/x", &good[..62]),
            format!("{}\0", &good[..63]),
            format!("{}g", &good[..63]),
            format!("{}é", &good[..62]),
        ];
        for bad in table {
            assert!(!is_sha256(&bad), "{bad:?}");
            assert!(check_sha256("sha256", &bad)
                .unwrap_err()
                .contains("`sha256`"));
        }
    }

    #[test]
    fn commit_replicates_unless_told_not_to_and_get_is_not_local_by_default() {
        let c: Commit = serde_json::from_str(r#"{"upload":"u","sha256":"s","size":1}"#).unwrap();
        assert!(c.replicate);
        let g: Get = serde_json::from_str(r#"{"sha256":"s","offset":0}"#).unwrap();
        assert!(!g.local && g.length.is_none());
        // A get that is not local does not say so on the wire.
        let v = serde_json::to_value(&g).unwrap();
        assert!(v.get("local").is_none() && v.get("length").is_none());
    }
}
