//! Helpers for tests of the api: users made with the cluster key, and clients
//! that sign with a user's own key, as a customer's CLI does.

use std::time::Duration;

use paddock_config::credentials::{UserCredentials, UserCurve};
use paddock_config::Secret;
use paddock_wire::Client;
use serde_json::{json, Value};

use crate::Node;

/// The credentials document for the key in a `user.create` / `key.create` /
/// `key.rotate` reply, for the api of `node`.
pub fn creds_from(node: &Node, reply: &Value) -> UserCredentials {
    let s = |v: &Value| v.as_str().expect("a string").to_string();
    UserCredentials {
        api: node.rpc("api"),
        user: s(&reply["user"]),
        key_id: s(&reply["key_id"]),
        secret: Secret::new(s(&reply["secret"])),
        curve: node.file.curve.as_ref().map(|c| UserCurve {
            server_public: c.server_public.clone(),
            client_public: s(&reply["curve"]["client_public"]),
            client_secret: Secret::new(s(&reply["curve"]["client_secret"])),
        }),
    }
}

/// Makes user `name` with the cluster key and returns their credentials.
pub fn create_user(node: &Node, name: &str, admin: bool) -> UserCredentials {
    let reply = node
        .client("api")
        .call("user.create", json!({"name": name, "admin": admin}))
        .unwrap_or_else(|e| panic!("user.create {name}: {e}"));
    creds_from(node, &reply)
}

/// A client that signs with the user's key (and connects with their CURVE key).
pub fn user_client(c: &UserCredentials) -> Client {
    user_client_to(c, &c.api)
}

/// The same, to another endpoint (to show other daemons refuse user keys).
pub fn user_client_to(c: &UserCredentials, endpoint: &str) -> Client {
    Client::connect(
        endpoint,
        &format!("user:{}", c.user),
        c.credentials().unwrap(),
    )
    .unwrap()
    .with_timeout(Duration::from_secs(5))
}
