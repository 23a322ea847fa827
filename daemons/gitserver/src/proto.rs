//! What sshd's helpers (`keys`, `serve`, the pre-receive `hook`) and the root daemon
//! say over the daemon's unix socket: one JSON request line; then, for a push, the
//! raw `git archive` tar until the hook shuts its side down; then JSON reply lines.
//! The socket admits only root and the `git` account (SO_PEERCRED).

use serde::{Deserialize, Serialize};

/// The longest request line the daemon reads.
pub const MAX_LINE: usize = 64 * 1024;

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// sshd's AuthorizedKeysCommand: the `authorized_keys` line for a key, if any.
    Keys { fingerprint: String },
    /// The forced command: may this key's user run `service` on `app`?
    Authorize {
        fingerprint: String,
        service: String,
        app: String,
    },
    /// The pre-receive hook: build the pushed commit (its tar follows the line).
    Push {
        token: String,
        refs: Vec<PushRef>,
        /// The hook's parent, `git receive-pack`: the daemon holds the build lease
        /// until it has moved the ref (or ended), so the next push sees the move.
        #[serde(default)]
        receive_pack: Option<i32>,
        /// The hook itself: killed when its pusher stops reading, so git ends.
        #[serde(default)]
        hook: Option<i32>,
        /// git's quarantine of the pushed objects (`GIT_QUARANTINE_PATH`), so
        /// the daemon can ask git about the pushed commit's history.
        #[serde(default)]
        quarantine: Option<String>,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PushRef {
    pub old: String,
    pub new: String,
    pub name: String,
}

/// The daemon's answer to `keys` and `authorize` (one line).
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// `keys`: the authorized_keys line to print.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line: Option<String>,
    /// `authorize`: the bare repository, the git binary and the push's token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repo: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub git: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// `authorize`: the root-owned hooks directory git is told to use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hooks: Option<String>,
}

/// One line of a push's progress: a log line for the pusher, or the outcome.
#[derive(Debug, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PushLine {
    Done {
        done: bool,
        ok: bool,
        message: String,
    },
    Log {
        line: String,
    },
    /// Sent while a push waits: a hook that is gone makes it fail.
    Keepalive {
        keepalive: bool,
    },
}

/// The hook's environment: the token `serve` got for this push.
pub const ENV_TOKEN: &str = "PADDOCK_PUSH_TOKEN";
