//! Helpers for tests of the api: users made with the cluster key, clients that
//! sign with a user's own key (as a customer's CLI does), and direct looks at the
//! api's tables.

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine;
use paddock_config::credentials::{UserCredentials, UserCurve};
use paddock_config::Secret;
use paddock_wire::{Client, ClientError, Code, Credentials, WireError};
use serde_json::{json, Value};

use crate::{test_key, Node, Postgres, TestDir};

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

/// A further key of user `name`, made with the cluster key.
pub fn create_key(node: &Node, name: &str) -> UserCredentials {
    let reply = node
        .client("api")
        .call("key.create", json!({ "user": name }))
        .unwrap_or_else(|e| panic!("key.create for {name}: {e}"));
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

/// The user's HMAC key with the node's own CURVE client keys: what someone who
/// got past the transport (a plaintext cluster, a leaked node key) could send. It
/// shows the HMAC layer refuses user keys on its own.
pub fn user_hmac_with_node_curve(c: &UserCredentials, node: &Node) -> Credentials {
    Credentials::new(c.credentials().unwrap().keys, node.keys.curve.clone())
}

/// The remote error of a call that must have failed with one.
pub fn remote_err(r: Result<Value, ClientError>) -> WireError {
    match r {
        Ok(v) => panic!("expected an error, got {v}"),
        Err(ClientError::Remote(e)) => e,
        Err(e) => panic!("not a remote error: {e}"),
    }
}

/// The protocol code of a call that must have failed with one.
pub fn code(r: Result<Value, ClientError>) -> Code {
    remote_err(r).code
}

/// A fresh random ed25519 public key line (`ssh-ed25519 AAAA… comment`).
pub fn random_ed25519(comment: &str) -> String {
    let mut key = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut key).unwrap();
    let mut blob = Vec::new();
    for part in [&b"ssh-ed25519"[..], &key[..]] {
        blob.extend_from_slice(&(part.len() as u32).to_be_bytes());
        blob.extend_from_slice(part);
    }
    format!(
        "ssh-ed25519 {} {comment}",
        base64::engine::general_purpose::STANDARD.encode(blob)
    )
}

/// Waits until the api has migrated its database: it answers `ping` before that,
/// and `unavailable` to its own kinds until then.
pub fn wait_migrated(node: &Node) {
    let mut c = node.client("api");
    let until = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        match c.call("whoami", json!({})) {
            Err(ClientError::Remote(e))
                if e.code == Code::Unavailable && std::time::Instant::now() < until =>
            {
                std::thread::sleep(Duration::from_millis(50))
            }
            Ok(_) => return,
            Err(e) => panic!("the api did not finish migrating: {e}"),
        }
    }
}

/// An `ssh-rsa` public key line whose modulus has exactly `bits` bits (random and
/// odd, not a product of primes: only its size matters to the api). ssh-keygen
/// makes no key over 16384 bits, so the test of that limit needs one made here.
pub fn rsa_of_bits(bits: usize, comment: &str) -> String {
    assert!(bits >= 9);
    let len = bits.div_ceil(8);
    let mut n = vec![0u8; len];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut n).unwrap();
    let top = (bits - 1) % 8;
    n[0] &= 0xff >> (7 - top);
    n[0] |= 1 << top;
    n[len - 1] |= 1;
    if n[0] & 0x80 != 0 {
        n.insert(0, 0);
    }
    let mut blob = Vec::new();
    for part in [&b"ssh-rsa"[..], &[1, 0, 1][..], &n[..]] {
        blob.extend_from_slice(&(part.len() as u32).to_be_bytes());
        blob.extend_from_slice(part);
    }
    format!(
        "ssh-rsa {} {comment}",
        base64::engine::general_purpose::STANDARD.encode(blob)
    )
}

/// A per-table digest of every `api_*` table: equal digests, equal contents.
pub type Snapshot = BTreeMap<String, String>;

/// One api on a node of its own with a database of its own, plus a direct
/// PostgreSQL connection for looking at what it stored. Fields drop in order:
/// the daemons stop before the database goes, the directory last.
pub struct ApiCluster {
    pub node: Node,
    db: Option<tokio_postgres::Client>,
    rt: tokio::runtime::Runtime,
    pub pg: Postgres,
    pub t: TestDir,
}

impl ApiCluster {
    /// Starts the api (and, listed in `also`, other daemons of the node first).
    pub fn start(name: &str, also: &[&str]) -> ApiCluster {
        let t = TestDir::new(name);
        let pg = Postgres::start(t.path());
        let mut node = Node::new(t.path(), "node-a", &test_key(), &[], Some(pg.url()));
        for d in also {
            node.start(d);
        }
        node.start("api");
        wait_migrated(&node);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        ApiCluster {
            node,
            db: None,
            rt,
            pg,
            t,
        }
    }

    /// A client with the cluster key (`from` is `user:test`).
    pub fn cluster(&self) -> Client {
        self.node.client("api")
    }

    fn connect(&mut self) {
        if self.db.is_none() {
            let c = self
                .rt
                .block_on(paddock_db::connect(&self.pg.url()))
                .expect("connect to the test database");
            self.db = Some(c);
        }
    }

    /// A query on the test's database (made once the api has migrated it).
    pub fn sql(&mut self, query: &str) -> Vec<tokio_postgres::Row> {
        self.connect();
        let db = self.db.as_ref().unwrap();
        self.rt
            .block_on(db.query(query, &[]))
            .unwrap_or_else(|e| panic!("{query}: {e}"))
    }

    /// Statements run as one simple query on the same connection as `sql`; a
    /// `BEGIN` stays open until a later `batch("COMMIT")`, so a test can hold row
    /// locks while the api works.
    pub fn batch(&mut self, statements: &str) {
        self.connect();
        let db = self.db.as_ref().unwrap();
        self.rt
            .block_on(db.batch_execute(statements))
            .unwrap_or_else(|e| panic!("{statements}: {e}"))
    }

    /// The names of the api's tables.
    pub fn api_tables(&mut self) -> Vec<String> {
        self.sql(
            "SELECT table_name::text FROM information_schema.tables
             WHERE table_schema = current_schema() AND table_name LIKE 'api\\_%' ORDER BY 1",
        )
        .iter()
        .map(|r| r.get(0))
        .collect()
    }

    /// A digest of every row of every `api_*` table (audit log included), to show
    /// that a refused request changed nothing.
    pub fn snapshot(&mut self) -> Snapshot {
        let tables = self.api_tables();
        assert!(tables.len() >= 8, "the api's tables: {tables:?}");
        let q = tables
            .iter()
            .map(|t| {
                format!(
                    "SELECT '{t}', count(*)::text || ':' || \
                     coalesce(md5(string_agg(row_to_json(x)::text, ',' ORDER BY row_to_json(x)::text)), '') \
                     FROM {t} x"
                )
            })
            .collect::<Vec<_>>()
            .join(" UNION ALL ");
        self.sql(&q).iter().map(|r| (r.get(0), r.get(1))).collect()
    }

    /// The audit rows with `id` greater than `after`, oldest first, as
    /// `{"id", "actor", "key_id", "kind", "app", "detail"}`.
    pub fn audit_after(&mut self, after: i64) -> Vec<Value> {
        self.sql(&format!(
            "SELECT json_build_object('id', id, 'actor', actor, 'key_id', key_id, 'kind', kind,
                    'app', app, 'detail', detail)::text
             FROM api_audit WHERE id > {after} ORDER BY id"
        ))
        .iter()
        .map(|r| serde_json::from_str(r.get::<_, &str>(0)).unwrap())
        .collect()
    }

    /// The largest audit id so far (0 when there is none).
    pub fn last_audit_id(&mut self) -> i64 {
        self.sql("SELECT coalesce(max(id), 0) FROM api_audit")[0].get(0)
    }

    /// Kills the api with SIGKILL and starts it again (waiting until it answers).
    pub fn restart_api_hard(&mut self) {
        self.node.kill9("api");
        self.node.start("api");
    }
}
