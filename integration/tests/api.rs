//! paddock-api against a real PostgreSQL and real daemon processes: user keys,
//! the authorization matrix, other daemons refusing user keys, no usable secret
//! at rest, releases under concurrency, audit, crash safety and bad input.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::Duration;

use base64::Engine;
use paddock_config::credentials::UserCredentials;
use paddock_integration::api::*;
use paddock_integration::*;
use paddock_wire::{Client, ClientError, Code, Envelope, Subscriber};
use serde_json::{json, Value};

#[test]
fn a_user_key_works_end_to_end() {
    let mut w = ApiCluster::start("api-smoke", &[]);
    let alice = create_user(&w.node, "alice", false);
    let mut c = user_client(&alice);
    let me = c.call("whoami", json!({})).unwrap();
    assert_eq!(me["user"], "alice");
    let app = c.call("app.create", json!({"name": "myapp"})).unwrap();
    assert_eq!(app["app"]["domains"], json!(["myapp.localhost"]));
    let r = c
        .call("config.set", json!({"app": "myapp", "vars": {"A": "1"}}))
        .unwrap();
    assert_eq!(r["release"]["version"], 2);
    let bob = create_user(&w.node, "bob", false);
    let before = w.snapshot();
    let r = user_client(&bob).call("app.info", json!({"app": "myapp"}));
    assert_eq!(code(r), Code::Forbidden);
    assert_eq!(w.snapshot(), before);
}

// ---- the authorization matrix -------------------------------------------------

/// The kinds daemons/api/src/lib.rs lists in `USER_KINDS` or `CLUSTER_KINDS`, read
/// from the source so that a kind added there without a row here fails the test.
fn listed_kinds(list: &str) -> BTreeSet<String> {
    const LIB: &str = include_str!("../../daemons/api/src/lib.rs");
    let start = LIB
        .find(&format!("pub const {list}: &[&str] = &["))
        .unwrap_or_else(|| panic!("{list} not found in the api's lib.rs"));
    let rest = &LIB[start..];
    let list_src = &rest[rest.find("&[").unwrap() + 2..rest.find("];").unwrap()];
    list_src
        .split('"')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Caller {
    Owner,
    Collaborator,
    Stranger,
    Admin,
    /// A key of the owner's, connected while it was live, then revoked.
    Revoked,
    Cluster,
}

const CALLERS: [Caller; 6] = [
    Caller::Owner,
    Caller::Collaborator,
    Caller::Stranger,
    Caller::Admin,
    Caller::Revoked,
    Caller::Cluster,
];

/// Who may send a kind (docs/PROTOCOL.md, api: "who").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Rule {
    /// Any live key.
    Any,
    /// Admins (and the cluster).
    Admin,
    /// The user named in the body (the owner here), admins, the cluster.
    SelfOwner,
    /// A key of the owner's named by its id or fingerprint: the owner, admins, the
    /// cluster; to anyone else it is `not_found`, as if it did not exist (whose
    /// key it is is not told).
    OwnKey,
    /// The app's owner or a collaborator, admins, the cluster.
    Access,
    /// The app's owner, admins, the cluster.
    Owner,
    /// The cluster key only: every user key is refused, admins' too.
    ClusterOnly,
    /// `key.rotate`: every live user key; the cluster key has nothing to rotate.
    Rotate,
    /// Authorized as `Access`, then forwarded to a deployer: none runs here, so
    /// whoever passes gets `unavailable` (and nothing changes).
    Forwarded,
}

impl Rule {
    /// `None`: the call succeeds; else the code it is refused with.
    fn expect(self, c: Caller) -> Option<Code> {
        use Caller::*;
        let forbidden = Some(Code::Forbidden);
        match (self, c) {
            (_, Revoked) => Some(Code::UnknownKey),
            (Rule::ClusterOnly, Cluster) => None,
            (Rule::ClusterOnly, _) => forbidden,
            (Rule::Rotate, Cluster) => Some(Code::Invalid),
            (Rule::Forwarded, Owner | Collaborator | Admin | Cluster) => Some(Code::Unavailable),
            (Rule::Forwarded, _) => forbidden,
            (_, Cluster) | (_, Admin) | (Rule::Any, _) | (Rule::Rotate, _) => None,
            (Rule::Admin, _) => forbidden,
            (Rule::SelfOwner | Rule::Owner | Rule::OwnKey, Owner) => None,
            (Rule::OwnKey, _) => Some(Code::NotFound),
            (Rule::SelfOwner | Rule::Owner, _) => forbidden,
            (Rule::Access, Owner | Collaborator) => None,
            (Rule::Access, _) => forbidden,
        }
    }
}

/// Makes what a case needs, fresh for each call, with the cluster key.
struct Fx {
    c: Client,
    n: usize,
}

impl Fx {
    fn unique(&mut self, prefix: &str) -> String {
        self.n += 1;
        format!("{prefix}{}", self.n)
    }

    fn ok(&mut self, kind: &str, body: Value) -> Value {
        self.c
            .call(kind, body.clone())
            .unwrap_or_else(|e| panic!("fixture {kind} {body}: {e}"))
    }

    /// A fresh app of `owner`'s with `collab` as collaborator, config A and B (v2),
    /// a pending build with web and worker types (v3) and a custom domain.
    fn app(&mut self) -> String {
        let a = self.unique("m");
        self.ok("app.create", json!({"name": a, "owner": "owner"}));
        self.ok("access.add", json!({"app": a, "user": "collab"}));
        self.ok(
            "config.set",
            json!({"app": a, "vars": {"A": "1", "B": "2"}}),
        );
        self.ok(
            "release.create",
            json!({"app": a, "slug": "sha256:0123abcd00000000000000000000000000000000000000000000000000000000", "description": "Deploy 0123abc",
                   "process_types": {"web": "python3 app.py", "worker": "python3 worker.py"}}),
        );
        self.ok(
            "domain.add",
            json!({"app": a, "domain": format!("{a}.example.com")}),
        );
        a
    }

    /// A fresh buildpack record; its name.
    fn buildpack(&mut self) -> String {
        let n = self.unique("bp");
        self.ok("buildpack.add", json!({"name": n, "blob": "be".repeat(32)}));
        n
    }

    fn user(&mut self) -> String {
        let u = self.unique("u");
        self.ok("user.create", json!({ "name": u }));
        u
    }

    /// A further key of the owner's; its id.
    fn owner_key(&mut self) -> String {
        let r = self.ok("key.create", json!({"user": "owner"}));
        r["key_id"].as_str().unwrap().to_string()
    }

    /// A fresh SSH key of the owner's; its fingerprint.
    fn owner_ssh_key(&mut self) -> String {
        let r = self.ok(
            "sshkey.add",
            json!({"user": "owner", "public_key": random_ed25519("owner@laptop")}),
        );
        r["fingerprint"].as_str().unwrap().to_string()
    }
}

type Body = fn(&mut Fx, Caller) -> Value;

struct Case {
    kind: &'static str,
    rule: Rule,
    /// The audit row's kind when the call changes something; `None` for reads.
    audit: Option<&'static str>,
    body: Body,
}

fn cases() -> Vec<Case> {
    use Rule::*;
    let c = |kind, rule, audit, body: Body| Case {
        kind,
        rule,
        audit,
        body,
    };
    vec![
        c("whoami", Any, None, |_, _| json!({})),
        c(
            "user.create",
            Admin,
            Some("user.create"),
            |f, _| json!({"name": f.unique("new")}),
        ),
        c("user.list", Admin, None, |_, _| json!({})),
        c(
            "user.revoke",
            Admin,
            Some("user.revoke"),
            |f, _| json!({"name": f.user()}),
        ),
        c(
            "key.create",
            SelfOwner,
            Some("key.create"),
            |_, _| json!({"user": "owner"}),
        ),
        c("key.rotate", Rotate, Some("key.rotate"), |_, _| json!({})),
        c("key.list", SelfOwner, None, |_, _| json!({"user": "owner"})),
        c(
            "key.revoke",
            OwnKey,
            Some("key.revoke"),
            |f, _| json!({"key_id": f.owner_key()}),
        ),
        c(
            "sshkey.add",
            SelfOwner,
            Some("sshkey.add"),
            |_, _| json!({"user": "owner", "public_key": random_ed25519("x@y")}),
        ),
        c(
            "sshkey.list",
            SelfOwner,
            None,
            |_, _| json!({"user": "owner"}),
        ),
        c(
            "sshkey.remove",
            OwnKey,
            Some("sshkey.remove"),
            |f, _| json!({"fingerprint": f.owner_ssh_key()}),
        ),
        c(
            "sshkey.lookup",
            ClusterOnly,
            None,
            |f, _| json!({"fingerprint": f.owner_ssh_key()}),
        ),
        c("app.create", Any, Some("app.create"), |f, caller| {
            let mut b = json!({"name": f.unique("new")});
            if caller == Caller::Cluster {
                b["owner"] = json!("owner");
            }
            b
        }),
        c("app.list", Any, None, |_, _| json!({})),
        c("app.info", Access, None, |f, _| json!({"app": f.app()})),
        c("app.destroy", Owner, Some("app.destroy"), |f, _| {
            let a = f.app();
            json!({"app": a, "confirm": a})
        }),
        c("access.list", Access, None, |f, _| json!({"app": f.app()})),
        c(
            "access.add",
            Owner,
            Some("access.add"),
            |f, _| json!({"app": f.app(), "user": f.user()}),
        ),
        c(
            "access.remove",
            Owner,
            Some("access.remove"),
            |f, _| json!({"app": f.app(), "user": "collab"}),
        ),
        c("config.get", Access, None, |f, _| json!({"app": f.app()})),
        c(
            "config.set",
            Access,
            Some("config.set"),
            |f, _| json!({"app": f.app(), "vars": {"NEW": "a value"}}),
        ),
        c(
            "config.unset",
            Access,
            Some("config.unset"),
            |f, _| json!({"app": f.app(), "names": ["A"]}),
        ),
        c("release.list", Access, None, |f, _| json!({"app": f.app()})),
        c(
            "release.info",
            Access,
            None,
            |f, _| json!({"app": f.app(), "version": 2}),
        ),
        c(
            "rollback",
            Access,
            Some("rollback"),
            |f, _| json!({"app": f.app(), "version": 2}),
        ),
        c(
            "formation.get",
            Access,
            None,
            |f, _| json!({"app": f.app()}),
        ),
        c(
            "formation.scale",
            Access,
            Some("formation.scale"),
            |f, _| json!({"app": f.app(), "changes": [{"type": "web", "quantity": 2}]}),
        ),
        c("domain.list", Access, None, |f, _| json!({"app": f.app()})),
        c("domain.add", Access, Some("domain.add"), |f, _| {
            let d = format!("{}.example.org", f.unique("d"));
            json!({"app": f.app(), "domain": d})
        }),
        c("domain.remove", Access, Some("domain.remove"), |f, _| {
            let a = f.app();
            json!({"app": a, "domain": format!("{a}.example.com")})
        }),
        c("audit.list", Access, None, |f, _| json!({"app": f.app()})),
        c(
            "release.create",
            ClusterOnly,
            Some("release.create"),
            |f, _| {
                json!({"app": f.app(), "slug": "sha256:feed000000000000000000000000000000000000000000000000000000000000", "process_types": {"web": "run"},
                   "description": "Deploy feed", "created_by": "user:owner"})
            },
        ),
        c(
            "release.status",
            ClusterOnly,
            Some("release.status"),
            |f, _| json!({"app": f.app(), "version": 3, "status": "succeeded"}),
        ),
        c(
            "audit.append",
            ClusterOnly,
            Some("deploy.note"),
            |f, _| json!({"actor": "user:owner", "kind": "deploy.note", "app": f.app(), "detail": {"n": 1}}),
        ),
        c(
            "app.state",
            ClusterOnly,
            None,
            |f, _| json!({"app": f.app()}),
        ),
        c("apps.state", ClusterOnly, None, |_, _| json!({})),
        c(
            "push.authorize",
            ClusterOnly,
            None,
            |f, _| json!({"fingerprint": f.owner_ssh_key(), "app": f.app()}),
        ),
        c(
            "release.get",
            ClusterOnly,
            None,
            |f, _| json!({"app": f.app(), "version": 2}),
        ),
        c(
            "blob.referenced",
            ClusterOnly,
            None,
            |_, _| json!({"keep": 3}),
        ),
        c(
            "buildpack.add",
            ClusterOnly,
            Some("buildpack.add"),
            |f, _| json!({"name": f.unique("bp"), "blob": format!("sha256:{}", "ca".repeat(32))}),
        ),
        c("buildpack.list", ClusterOnly, None, |_, _| json!({})),
        c(
            "buildpack.get",
            ClusterOnly,
            None,
            |f, _| json!({"name": f.buildpack()}),
        ),
        c(
            "buildpack.remove",
            ClusterOnly,
            Some("buildpack.remove"),
            |f, _| json!({"name": f.buildpack()}),
        ),
        c(
            "build.list",
            Forwarded,
            None,
            |f, _| json!({"app": f.app()}),
        ),
        c(
            "build.info",
            Forwarded,
            None,
            |f, _| json!({"app": f.app(), "build": "01JCT6S3W4F8D9X2QZ7N5K0BVA"}),
        ),
    ]
}

/// Every kind of the api, sent by the owner, a collaborator, a stranger, an admin,
/// a revoked key and the cluster key: each gets exactly what the docs say; a
/// refused call changes no row of any api table (the audit log included); a change
/// writes one audit row naming its actor, key, kind and app; a read writes nothing.
#[test]
fn the_authorization_matrix_for_every_kind_and_caller() {
    let mut w = ApiCluster::start("api-matrix", &["heartbeat"]);
    let cases = cases();
    let user_kinds = listed_kinds("USER_KINDS");
    let cluster_kinds = listed_kinds("CLUSTER_KINDS");
    assert!(user_kinds.len() >= 30 && cluster_kinds.len() >= 6);
    let covered: BTreeSet<String> = cases.iter().map(|c| c.kind.to_string()).collect();
    assert_eq!(covered.len(), cases.len(), "a kind has two rows");
    let listed: BTreeSet<String> = user_kinds.union(&cluster_kinds).cloned().collect();
    assert_eq!(covered, listed, "every kind of the api has a row");
    for c in &cases {
        assert_eq!(
            c.rule == Rule::ClusterOnly,
            cluster_kinds.contains(c.kind),
            "{}: only CLUSTER_KINDS are cluster-only",
            c.kind
        );
    }

    let owner = create_user(&w.node, "owner", false);
    let collab = create_user(&w.node, "collab", false);
    let stranger = create_user(&w.node, "stranger", false);
    let admin = create_user(&w.node, "boss", true);
    // Connected while live, then revoked: the connection stays, the key is dead.
    let revoked = create_key(&w.node, "owner");
    let mut revoked_c = user_client(&revoked);
    revoked_c.call("whoami", json!({})).unwrap();
    w.cluster()
        .call("key.revoke", json!({"key_id": revoked.key_id}))
        .unwrap();
    let mut fx = Fx {
        c: w.cluster(),
        n: 0,
    };
    let mut clients: Vec<(Caller, Client, String, String)> = vec![
        (
            Caller::Owner,
            user_client(&owner),
            "user:owner".into(),
            owner.key_id.clone(),
        ),
        (
            Caller::Collaborator,
            user_client(&collab),
            "user:collab".into(),
            collab.key_id.clone(),
        ),
        (
            Caller::Stranger,
            user_client(&stranger),
            "user:stranger".into(),
            stranger.key_id.clone(),
        ),
        (
            Caller::Admin,
            user_client(&admin),
            "user:boss".into(),
            admin.key_id.clone(),
        ),
        (
            Caller::Revoked,
            revoked_c,
            "user:owner".into(),
            revoked.key_id.clone(),
        ),
        (
            Caller::Cluster,
            w.cluster(),
            "cluster:user:test".into(),
            w.node.file.signing_key.clone(),
        ),
    ];
    let creds_of = |c: Caller| -> Option<&UserCredentials> {
        match c {
            Caller::Owner => Some(&owner),
            Caller::Collaborator => Some(&collab),
            Caller::Stranger => Some(&stranger),
            Caller::Admin => Some(&admin),
            _ => None,
        }
    };

    let mut failures = vec![];
    let mut checked = 0;
    for case in &cases {
        for (caller, client, actor, key_id) in clients.iter_mut() {
            assert_eq!(CALLERS.iter().filter(|c| *c == caller).count(), 1);
            let body = (case.body)(&mut fx, *caller);
            // key.rotate revokes the calling key: each user rotates a spare one.
            let mut spare = None;
            if case.rule == Rule::Rotate {
                if let Some(cr) = creds_of(*caller) {
                    let k = create_key(&w.node, &cr.user);
                    spare = Some((user_client(&k), k.key_id.clone()));
                }
            }
            let (client, key_id) = match &mut spare {
                Some((c, k)) => (c, k.clone()),
                None => (&mut *client, key_id.clone()),
            };
            let before = w.snapshot();
            let last = w.last_audit_id();
            // A client retries `unavailable` until its deadline: keep that short
            // where no deployer answers.
            if case.rule == Rule::Forwarded {
                client.set_timeout(Duration::from_millis(700));
            }
            let r = client.call(case.kind, body.clone());
            client.set_timeout(Duration::from_secs(5));
            let expect = case.rule.expect(*caller);
            let what = format!("{} by {caller:?} with {body}", case.kind);
            checked += 1;
            match (&expect, r) {
                (None, Ok(_)) => {
                    let rows = w.audit_after(last);
                    match case.audit {
                        None => {
                            if w.snapshot() != before {
                                failures.push(format!("{what}: a read changed the tables"));
                            }
                        }
                        Some(kind) => {
                            let app = body
                                .get("app")
                                .or_else(|| (case.kind == "app.create").then(|| &body["name"]))
                                .cloned()
                                .unwrap_or(Value::Null);
                            let want = json!({"actor": if case.kind == "audit.append" { "user:owner" } else { actor.as_str() },
                                              "key_id": key_id, "kind": kind, "app": app});
                            let got: Vec<Value> = rows
                                .iter()
                                .map(|r| {
                                    json!({"actor": r["actor"], "key_id": r["key_id"],
                                           "kind": r["kind"], "app": r["app"]})
                                })
                                .collect();
                            if got != vec![want.clone()] {
                                failures
                                    .push(format!("{what}: audit rows {got:?}, want one {want}"));
                            }
                        }
                    }
                }
                (Some(code), Err(ClientError::Remote(e))) if e.code == *code => {
                    if w.snapshot() != before {
                        failures.push(format!(
                            "{what}: refused ({}) but the tables changed",
                            e.code.as_str()
                        ));
                    }
                    // The refusal names what was refused.
                    let needle = match (code, case.rule) {
                        (Code::UnknownKey, _) => "revoked".to_string(),
                        (Code::Unavailable, Rule::Forwarded) => "deployer".to_string(),
                        (_, Rule::ClusterOnly) => case.kind.to_string(),
                        (_, Rule::Admin) => "admin".to_string(),
                        (_, Rule::SelfOwner) => "owner".to_string(),
                        (_, Rule::OwnKey) => "no such".to_string(),
                        (_, Rule::Rotate) => "key.rotate".to_string(),
                        _ => body["app"].as_str().unwrap_or_default().to_string(),
                    };
                    if needle.is_empty() || !e.message.contains(&needle) {
                        failures.push(format!(
                            "{what}: message {:?} does not name {needle:?}",
                            e.message
                        ));
                    }
                }
                (_, r) => failures.push(format!(
                    "{what}: want {}, got {}",
                    expect.as_ref().map_or("ok", |c| c.as_str()),
                    match r {
                        Ok(v) => format!("ok {v}"),
                        Err(e) => e.to_string(),
                    }
                )),
            }
        }
    }
    assert_eq!(checked, cases.len() * CALLERS.len());

    // A user key reaches nothing but the api's user kinds, admins' keys included.
    for (caller, client, ..) in clients.iter_mut() {
        if *caller == Caller::Cluster {
            continue;
        }
        for kind in [
            "ping",
            "stats",
            "lock.acquire",
            "instance.list",
            "route.set",
            "no.such.kind",
        ] {
            let before = w.snapshot();
            match client.call(kind, json!({})) {
                Err(ClientError::Remote(e))
                    if e.code == Code::Forbidden || e.code == Code::UnknownKey => {}
                other => failures.push(format!("{kind} by {caller:?}: {other:?}")),
            }
            assert_eq!(w.snapshot(), before);
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {checked} checks failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

// ---- other daemons ----------------------------------------------------------------

/// The locker, the runner and the heartbeat never act for a user key: under CURVE
/// they do not even admit the user's connection, and with the transport passed
/// (the node's own CURVE key, as in a plaintext cluster) the HMAC layer answers
/// `unknown_key`. The api's `pub` does not admit a user either.
#[test]
fn other_daemons_refuse_user_keys() {
    let mut w = ApiCluster::start("api-others", &["heartbeat", "locker", "runner"]);
    let alice = create_user(&w.node, "alice", true);
    // The key works where it should.
    assert_eq!(
        user_client(&alice).call("whoami", json!({})).unwrap()["user"],
        "alice"
    );
    let probes = [
        (
            "locker",
            "lock.acquire",
            json!({"name": "by-a-user", "owner": "alice", "ttl_ms": 60000, "wait_ms": 0}),
        ),
        ("locker", "lock.list", json!({})),
        (
            "runner",
            "instance.start",
            json!({"app": "evil", "dir": "/tmp", "command": "sleep 100"}),
        ),
        ("runner", "instance.list", json!({})),
        ("heartbeat", "registry.list", json!({})),
    ];

    // 1. The user's own credentials: no connection at all (ZAP refuses the key).
    let handles: Vec<_> = probes
        .iter()
        .map(|(daemon, kind, body)| {
            let (ep, alice, kind, body) = (
                w.node.rpc(daemon),
                alice.clone(),
                kind.to_string(),
                body.clone(),
            );
            let daemon = daemon.to_string();
            std::thread::spawn(move || {
                let r = user_client_to(&alice, &ep)
                    .with_timeout(Duration::from_millis(1500))
                    .call(&kind, body);
                match r {
                    Ok(v) => panic!("{daemon} answered {kind} for a user key: {v}"),
                    Err(ClientError::NotConnected { .. } | ClientError::Timeout { .. }) => {}
                    Err(e) => assert!(
                        matches!(e.code(), Some(Code::UnknownKey | Code::Forbidden)),
                        "{daemon} {kind}: {e}"
                    ),
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }

    // 2. Past the transport, the user's HMAC key is unknown to every other daemon.
    let creds = user_hmac_with_node_curve(&alice, &w.node);
    for (daemon, kind, body) in probes.iter().chain(&[
        ("locker", "ping", json!({})),
        ("runner", "ping", json!({})),
        ("heartbeat", "ping", json!({})),
    ]) {
        let mut c = Client::connect(&w.node.rpc(daemon), "user:alice", creds.clone())
            .unwrap()
            .with_timeout(Duration::from_secs(5));
        let e = remote_err(c.call(kind, body.clone()));
        assert_eq!(e.code, Code::UnknownKey, "{daemon} {kind}: {}", e.message);
    }
    // ... and nothing happened.
    let locks = w
        .node
        .client("locker")
        .call("lock.list", json!({}))
        .unwrap();
    assert_eq!(locks["locks"], json!([]), "{locks}");
    let inst = w
        .node
        .client("runner")
        .call("instance.list", json!({}))
        .unwrap();
    assert_eq!(inst["instances"], json!([]), "{inst}");

    // 3. A beat signed with the user key is dropped by the heartbeat; a genuine one
    // sent after it on the same connection arrives, so the first was looked at.
    let pull = w.node.file.daemons["heartbeat"].other["pull"]
        .as_str()
        .unwrap()
        .to_string();
    let pusher = paddock_wire::client::Pusher::connect(&pull, "user:alice", creds.clone()).unwrap();
    let beat = |daemon: &str| {
        json!({"daemon": daemon, "node": "node-x", "incarnation": format!("{daemon}-1"),
               "endpoints": {"rpc": "tcp://127.0.0.1:9"}, "interval_ms": 200})
    };
    let (p1, s1) = Envelope::new("user:alice", "heartbeat.beat", beat("forged")).sign(&creds);
    let (p2, s2) =
        Envelope::new("locker@node-x", "heartbeat.beat", beat("genuine")).sign(&w.node.keys);
    pusher.push_frames(&[&p1, s1.as_bytes()]).unwrap();
    pusher.push_frames(&[&p2, s2.as_bytes()]).unwrap();
    let mut hb = w.node.client("heartbeat");
    let services = eventually(Duration::from_secs(10), "the genuine beat", || {
        let l = hb.call("registry.list", json!({})).unwrap();
        let s = l["services"].as_array().unwrap().clone();
        s.iter().any(|x| x["daemon"] == "genuine").then_some(s)
    });
    assert!(
        !services.iter().any(|x| x["daemon"] == "forged"),
        "{services:?}"
    );

    // 4. The api's pub admits cluster subscribers only: after a cluster subscriber
    // has the event, a subscriber with the user's keys has had nothing.
    let ep = api_pub(&w.node);
    let mut user_sub = Subscriber::connect(
        std::slice::from_ref(&ep),
        &["app.changed"],
        alice.credentials().unwrap(),
    )
    .unwrap();
    let mut sub = subscribed(&mut w);
    let mut c = user_client(&alice);
    c.call("app.create", json!({"name": "watched"})).unwrap();
    wait_event(&mut sub, "watched", "created");
    c.call("config.set", json!({"app": "watched", "vars": {"X": "1"}}))
        .unwrap();
    wait_event(&mut sub, "watched", "config");
    assert!(
        user_sub.next(Duration::from_millis(300)).unwrap().is_none(),
        "a user key subscribed to the api's pub"
    );
}

fn api_pub(node: &Node) -> String {
    node.file.daemons["api"].other["pub"]
        .as_str()
        .unwrap()
        .to_string()
}

/// A cluster subscriber to the api's `app.changed`, known to be receiving: changes
/// are made to a scratch app until one is heard (a SUB joins a little after its
/// connect).
fn subscribed(w: &mut ApiCluster) -> Subscriber {
    let mut sub =
        Subscriber::connect(&[api_pub(&w.node)], &["app.changed"], w.node.keys.clone()).unwrap();
    let mut c = w.cluster();
    c.call("user.create", json!({"name": "pubprobe"})).ok();
    c.call(
        "app.create",
        json!({"name": "pubprobe", "owner": "pubprobe"}),
    )
    .ok();
    let mut n = 0;
    eventually(Duration::from_secs(10), "a first app.changed event", || {
        n += 1;
        c.call(
            "config.set",
            json!({"app": "pubprobe", "vars": {"N": n.to_string()}}),
        )
        .unwrap();
        sub.next(Duration::from_millis(100)).unwrap().map(|_| ())
    });
    // Drain the probe's events.
    while sub.next(Duration::from_millis(50)).unwrap().is_some() {}
    sub
}

/// Waits for `app.changed {app, what}`; events for the probe app are skipped, any
/// other event first fails.
fn wait_event(sub: &mut Subscriber, app: &str, what: &str) {
    loop {
        let e = sub
            .next(Duration::from_secs(5))
            .unwrap()
            .unwrap_or_else(|| panic!("no app.changed {{{app}, {what}}} within 5 s"));
        assert_eq!(e.kind, "app.changed");
        if e.body["app"] == "pubprobe" {
            continue;
        }
        assert_eq!(
            e.body,
            json!({"app": app, "what": what}),
            "the next event after the change"
        );
        return;
    }
}

/// Every change an app's subscribers act on is published after it commits, with
/// what changed; a refused change publishes nothing.
#[test]
fn changes_are_published_as_app_changed() {
    let mut w = ApiCluster::start("api-pub", &["heartbeat"]);
    let alice = create_user(&w.node, "alice", false);
    create_user(&w.node, "bob", false);
    let mut sub = subscribed(&mut w);
    let mut c = user_client(&alice);
    let mut cl = w.cluster();
    c.call("app.create", json!({"name": "pubapp"})).unwrap();
    wait_event(&mut sub, "pubapp", "created");
    c.call("config.set", json!({"app": "pubapp", "vars": {"A": "1"}}))
        .unwrap();
    wait_event(&mut sub, "pubapp", "config");
    // Refused (reserved name): nothing is published, so the next event is the next
    // change's.
    assert_eq!(
        code(c.call(
            "config.set",
            json!({"app": "pubapp", "vars": {"PORT": "1"}})
        )),
        Code::Invalid
    );
    c.call("config.unset", json!({"app": "pubapp", "names": ["A"]}))
        .unwrap();
    wait_event(&mut sub, "pubapp", "config");
    let build = cl
        .call(
            "release.create",
            json!({"app": "pubapp", "slug": "sha256:ab00000000000000000000000000000000000000000000000000000000000000", "process_types": {"web": "run"}, "description": "d"}),
        )
        .unwrap();
    wait_event(&mut sub, "pubapp", "release");
    // Only a release that succeeded is rolled back to.
    cl.call(
        "release.status",
        json!({"app": "pubapp", "version": build["release"]["version"], "status": "succeeded"}),
    )
    .unwrap();
    wait_event(&mut sub, "pubapp", "release");
    c.call(
        "rollback",
        json!({"app": "pubapp", "version": build["release"]["version"]}),
    )
    .unwrap();
    wait_event(&mut sub, "pubapp", "release");
    c.call(
        "formation.scale",
        json!({"app": "pubapp", "changes": [{"type": "web", "quantity": 3}]}),
    )
    .unwrap();
    wait_event(&mut sub, "pubapp", "formation");
    c.call(
        "domain.add",
        json!({"app": "pubapp", "domain": "pub.example.com"}),
    )
    .unwrap();
    wait_event(&mut sub, "pubapp", "domains");
    c.call("access.add", json!({"app": "pubapp", "user": "bob"}))
        .unwrap();
    wait_event(&mut sub, "pubapp", "access");
    c.call("app.destroy", json!({"app": "pubapp", "confirm": "pubapp"}))
        .unwrap();
    wait_event(&mut sub, "pubapp", "destroyed");
}

// ---- secrets at rest -------------------------------------------------------------

fn b64_forms(b: &[u8]) -> Vec<String> {
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    vec![
        STANDARD.encode(b),
        STANDARD_NO_PAD.encode(b),
        URL_SAFE.encode(b),
        URL_SAFE_NO_PAD.encode(b),
    ]
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || !s.bytes().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}

/// Every form a stored string could hold key material in: its bytes, and what it
/// decodes to as hex or base64.
fn decodings(s: &str) -> Vec<Vec<u8>> {
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    let mut out = vec![s.as_bytes().to_vec()];
    out.extend(unhex(s));
    for e in [STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD] {
        out.extend(e.decode(s).ok());
    }
    if let Ok(k) = paddock_wire::curve::Key::from_z85(s) {
        out.push(k.bytes().to_vec());
    }
    out
}

/// After users and keys are made (created, added, rotated), no text, bytea or
/// JSON column of any api table holds a user's HMAC secret, a user's CURVE secret
/// or the api's `user_key_secret`, in hex, base64 or Z85; and no stored string, nor
/// anything it decodes to, works as the HMAC key of a user's request, either
/// directly or as the HKDF secret it is derived from.
#[test]
fn the_database_holds_no_secret_that_verifies_a_user_request() {
    let mut w = ApiCluster::start("api-secrets", &[]);
    let alice = create_user(&w.node, "alice", false);
    let boss = create_user(&w.node, "boss", true);
    let mut keys = vec![alice.clone(), boss.clone()];
    let second = creds_from(
        &w.node,
        &user_client(&alice)
            .call("key.create", json!({}))
            .expect("alice makes a second key"),
    );
    keys.push(second.clone());
    let rotated = creds_from(
        &w.node,
        &user_client(&second)
            .call("key.rotate", json!({}))
            .expect("alice rotates her second key"),
    );
    keys.push(rotated.clone());
    let mut ac = user_client(&alice);
    ac.call("app.create", json!({"name": "vault"})).unwrap();
    ac.call(
        "sshkey.add",
        json!({"public_key": random_ed25519("alice@laptop")}),
    )
    .unwrap();
    // The keys that are live verify requests (so the secrets are the real ones).
    for k in [&alice, &boss, &rotated] {
        assert_eq!(
            user_client(k).call("whoami", json!({})).unwrap()["key_id"],
            k.key_id
        );
    }

    let cols: Vec<(String, String)> = w
        .sql(
            "SELECT table_name::text, column_name::text FROM information_schema.columns
             WHERE table_schema = current_schema() AND table_name LIKE 'api\\_%'
               AND data_type IN ('text', 'character varying', 'character', 'bytea', 'json', 'jsonb')
             ORDER BY 1, 2",
        )
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert!(cols.iter().any(|(t, c)| t == "api_keys" && c == "key_id"));
    let mut stored: Vec<String> = vec![];
    for (t, c) in &cols {
        for r in w.sql(&format!(
            "SELECT \"{c}\"::text FROM {t} WHERE \"{c}\" IS NOT NULL"
        )) {
            stored.push(r.get(0));
        }
    }
    let dump = stored.join("\n");
    // The dump sees what is stored: key ids and CURVE public keys are there.
    for k in &keys {
        assert!(dump.contains(&k.key_id), "key id {} not stored", k.key_id);
        let public = &k.curve.as_ref().unwrap().client_public;
        assert!(
            dump.contains(public.as_str()),
            "CURVE public key not stored"
        );
    }

    let master = w.node.file.daemons["api"].other["user_key_secret"]
        .as_str()
        .unwrap()
        .to_string();
    let mut secrets: Vec<(String, Vec<u8>)> =
        vec![("user_key_secret".into(), unhex(&master).unwrap())];
    for k in &keys {
        secrets.push((
            format!("secret of {}", k.key_id),
            unhex(k.secret.expose()).unwrap(),
        ));
        let cs = k.curve.as_ref().unwrap().client_secret.expose().to_string();
        secrets.push((
            format!("CURVE secret of {}", k.key_id),
            paddock_wire::curve::Key::from_z85(&cs)
                .unwrap()
                .bytes()
                .to_vec(),
        ));
        assert!(
            !dump.contains(&cs),
            "the CURVE secret (Z85) of {} is stored",
            k.key_id
        );
    }
    let lower = dump.to_lowercase();
    for (what, bytes) in &secrets {
        assert_eq!(bytes.len(), 32, "{what}");
        assert!(!lower.contains(&hex(bytes)), "{what} is stored in hex");
        for f in b64_forms(bytes) {
            assert!(!dump.contains(&f), "{what} is stored in base64 ({f})");
        }
        // Half of it is no better (a split secret).
        assert!(
            !lower.contains(&hex(&bytes[..16])),
            "{what}: half of it in hex"
        );
    }

    // Nor does the api's log hold any of them.
    let raw_log = std::fs::read_to_string(w.node.log("api")).unwrap();
    for k in &keys {
        let cs = k.curve.as_ref().unwrap().client_secret.expose();
        assert!(
            !raw_log.contains(cs),
            "a CURVE secret (Z85) is in the api's log"
        );
    }
    let log = raw_log.to_lowercase();
    for (what, bytes) in &secrets {
        assert!(!log.contains(&hex(bytes)), "{what} is in the api's log");
        for f in b64_forms(bytes) {
            assert!(
                !log.contains(&f.to_lowercase()),
                "{what} is in the api's log"
            );
        }
    }

    // Nothing stored, in any decoding, signs a request as alice's key does or
    // derives her key.
    let probe = br#"{"v":1,"id":"01JCT6S3W4F8D9X2QZ7N5K0BVA","ts":1,"from":"user:alice","kind":"config.set","body":{}}"#;
    let sign = |k: &[u8]| {
        ring::hmac::sign(&ring::hmac::Key::new(ring::hmac::HMAC_SHA256, k), probe)
            .as_ref()
            .to_vec()
    };
    let real = sign(&unhex(alice.secret.expose()).unwrap());
    let alice_secret = unhex(alice.secret.expose()).unwrap();
    let mut tried = 0;
    for value in &stored {
        let tokens = std::iter::once(value.as_str()).chain(
            value
                .split(|c: char| !(c.is_ascii_alphanumeric() || "+/=_-.:".contains(c)))
                .filter(|t| t.len() >= 16),
        );
        for t in tokens {
            for cand in decodings(t) {
                tried += 1;
                assert_ne!(sign(&cand), real, "stored {t:?} signs as alice's key");
                if cand.len() >= 32 {
                    let uk = paddock_wire::keyring::UserKeys::from_hex(&hex(&cand)).unwrap();
                    assert_ne!(
                        uk.secret(&alice.key_id).map(|s| s.to_vec()),
                        Some(alice_secret.clone()),
                        "stored {t:?} derives alice's key"
                    );
                }
            }
        }
    }
    assert!(tried > 50, "only {tried} candidates looked at");
}

// ---- releases under concurrency ---------------------------------------------------

/// 20 clients set a config var on one app at the same moment: 20 releases, v2 to
/// v21, none lost, none repeated; each release holds every earlier change (no lost
/// update), and release.list shows them all.
#[test]
fn twenty_concurrent_config_sets_make_twenty_consecutive_releases() {
    let w = ApiCluster::start("api-concurrent", &[]);
    let alice = create_user(&w.node, "alice", false);
    user_client(&alice)
        .call("app.create", json!({"name": "busy"}))
        .unwrap();
    let start = Arc::new(Barrier::new(20));
    let threads: Vec<_> = (0..20)
        .map(|i| {
            let (alice, start) = (alice.clone(), start.clone());
            std::thread::spawn(move || {
                let mut c = user_client(&alice).with_timeout(Duration::from_secs(20));
                c.call("whoami", json!({})).unwrap();
                start.wait();
                let r = c
                    .call(
                        "config.set",
                        json!({"app": "busy", "vars": {format!("V{i}"): format!("value-{i}")}}),
                    )
                    .unwrap_or_else(|e| panic!("config.set V{i}: {e}"));
                (i, r["release"]["version"].as_i64().unwrap())
            })
        })
        .collect();
    let got: Vec<(usize, i64)> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let versions: BTreeSet<i64> = got.iter().map(|g| g.1).collect();
    assert_eq!(
        versions,
        (2..=21).collect::<BTreeSet<_>>(),
        "versions handed out: {got:?}"
    );
    let mut c = user_client(&alice);
    let list = c
        .call("release.list", json!({"app": "busy", "limit": 100}))
        .unwrap();
    let listed: Vec<i64> = list["releases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["version"].as_i64().unwrap())
        .collect();
    assert_eq!(listed, (1..=21).rev().collect::<Vec<_>>());
    let mut prev: BTreeMap<String, String> = BTreeMap::new();
    for v in 2..=21 {
        let i = got.iter().find(|g| g.1 == v).unwrap().0;
        let r = c
            .call("release.info", json!({"app": "busy", "version": v}))
            .unwrap();
        let config: BTreeMap<String, String> =
            serde_json::from_value(r["release"]["config"].clone()).unwrap();
        assert_eq!(r["release"]["description"], format!("Set V{i}"));
        assert_eq!(config.len() as i64, v - 1, "v{v} holds {config:?}");
        assert_eq!(config[&format!("V{i}")], format!("value-{i}"));
        assert!(
            prev.iter().all(|(k, val)| config.get(k) == Some(val)),
            "v{v} lost an earlier change"
        );
        prev = config;
    }
    let now = c.call("config.get", json!({"app": "busy"})).unwrap();
    assert_eq!(now["config"].as_object().unwrap().len(), 20);
}

// ---- audit -----------------------------------------------------------------------

/// Audit rows name config vars but never their values (nor do the api's logs);
/// audit.list shows an app's log to its owner and collaborators, not to others;
/// a user without an app reads only their own entries, an admin reads all.
#[test]
fn audit_names_config_vars_never_their_values_and_is_read_by_who_may() {
    let mut w = ApiCluster::start("api-audit", &[]);
    let alice = create_user(&w.node, "alice", false);
    let bob = create_user(&w.node, "bob", false);
    let eve = create_user(&w.node, "eve", false);
    let boss = create_user(&w.node, "boss", true);
    let values = [
        "postgres://u:hunter2-value@db/x",
        "sk_live_value_0123456789",
        "third-value-zzz",
    ];
    let mut a = user_client(&alice);
    a.call("app.create", json!({"name": "ledger"})).unwrap();
    a.call("access.add", json!({"app": "ledger", "user": "bob"}))
        .unwrap();
    a.call(
        "config.set",
        json!({"app": "ledger", "vars": {"DATABASE_URL": values[0], "STRIPE_KEY": values[1]}}),
    )
    .unwrap();
    let mut b = user_client(&bob);
    b.call(
        "config.set",
        json!({"app": "ledger", "vars": {"THIRD": values[2]}}),
    )
    .unwrap();
    b.call(
        "config.unset",
        json!({"app": "ledger", "names": ["STRIPE_KEY"]}),
    )
    .unwrap();
    w.cluster()
        .call(
            "release.create",
            json!({"app": "ledger", "slug": "sha256:aa00000000000000000000000000000000000000000000000000000000000000", "process_types": {"web": "run"}, "description": "Deploy aa"}),
        )
        .unwrap();
    a.call("rollback", json!({"app": "ledger", "version": 3}))
        .unwrap();
    // Refused: no row.
    let before = w.last_audit_id();
    let mut e = user_client(&eve);
    assert_eq!(
        code(e.call(
            "config.set",
            json!({"app": "ledger", "vars": {"X": "never-stored-value"}})
        )),
        Code::Forbidden
    );
    assert_eq!(w.last_audit_id(), before);

    let rows = w.audit_after(0);
    let text = serde_json::to_string(&rows).unwrap();
    for v in values.iter().chain(&["never-stored-value"]) {
        assert!(!text.contains(v), "a config value is in the audit log");
    }
    let log = std::fs::read_to_string(w.node.log("api")).unwrap();
    for v in values.iter().chain(&["never-stored-value"]) {
        assert!(!log.contains(v), "a config value is in the api's log");
    }
    let ledger: Vec<&Value> = rows.iter().filter(|r| r["app"] == "ledger").collect();
    let kinds: Vec<&str> = ledger.iter().map(|r| r["kind"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        [
            "app.create",
            "access.add",
            "config.set",
            "config.set",
            "config.unset",
            "release.create",
            "rollback"
        ]
    );
    assert_eq!(ledger[2]["actor"], "user:alice");
    assert_eq!(ledger[2]["key_id"], alice.key_id.as_str());
    assert_eq!(
        ledger[2]["detail"]["set"],
        json!(["DATABASE_URL", "STRIPE_KEY"])
    );
    assert_eq!(ledger[3]["actor"], "user:bob");
    assert_eq!(ledger[3]["key_id"], bob.key_id.as_str());
    assert_eq!(ledger[4]["detail"]["unset"], json!(["STRIPE_KEY"]));
    assert_eq!(ledger[5]["actor"], "cluster:user:test");
    assert_eq!(ledger[5]["key_id"], "cluster-1");

    // Read through the api: the app's log for its people, newest first.
    let entries = |r: Value| -> Vec<String> {
        r["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["kind"].as_str().unwrap().to_string())
            .collect()
    };
    let by_bob = b
        .call("audit.list", json!({"app": "ledger", "limit": 100}))
        .unwrap();
    let mut want: Vec<String> = kinds.iter().map(|s| s.to_string()).collect();
    want.reverse();
    assert_eq!(entries(by_bob.clone()), want);
    let first = &by_bob["entries"][0];
    assert_eq!(first["actor"], "user:alice");
    assert_eq!(first["app"], "ledger");
    assert_eq!(first["key_id"], alice.key_id.as_str());
    assert!(first["at"].as_i64().unwrap() > 0);
    let only_bob = a
        .call(
            "audit.list",
            json!({"app": "ledger", "user": "bob", "limit": 100}),
        )
        .unwrap();
    assert_eq!(entries(only_bob), ["config.unset", "config.set"]);
    assert_eq!(
        code(e.call("audit.list", json!({"app": "ledger"}))),
        Code::Forbidden
    );
    // Without an app: a user's own entries only; another's are an admin's to read.
    let mine = b.call("audit.list", json!({"limit": 100})).unwrap();
    assert!(mine["entries"]
        .as_array()
        .unwrap()
        .iter()
        .all(|e| e["actor"] == "user:bob"));
    assert_eq!(entries(mine), ["config.unset", "config.set"]);
    assert_eq!(
        code(b.call("audit.list", json!({"user": "alice"}))),
        Code::Forbidden
    );
    let all = user_client(&boss)
        .call("audit.list", json!({"limit": 1000}))
        .unwrap();
    assert_eq!(all["entries"].as_array().unwrap().len(), rows.len());
    assert_eq!(
        user_client(&boss)
            .call("audit.list", json!({"user": "alice", "limit": 1000}))
            .unwrap()["entries"]
            .as_array()
            .unwrap()
            .len(),
        rows.iter().filter(|r| r["actor"] == "user:alice").count()
    );
}

// ---- crash safety ----------------------------------------------------------------

fn transport_error(e: &ClientError) -> bool {
    e.code().is_none()
}

/// `kill -9` of the api while three clients set config vars in a loop, then a
/// restart: every change the api acknowledged is there, in the release it named,
/// and versions still have no gaps.
#[test]
fn kill_9_of_the_api_during_a_burst_loses_no_acknowledged_change() {
    let mut w = ApiCluster::start("api-kill9", &[]);
    let alice = create_user(&w.node, "alice", false);
    user_client(&alice)
        .call("app.create", json!({"name": "burst"}))
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    // (version, var, value, the names the reply said the release holds)
    type Ack = (i64, String, String, Value);
    let acks = Arc::new(Mutex::new(Vec::<Ack>::new()));
    let errors = Arc::new(Mutex::new(Vec::<String>::new()));
    let threads: Vec<_> = (0..3)
        .map(|t| {
            let (alice, stop, acks, errors) =
                (alice.clone(), stop.clone(), acks.clone(), errors.clone());
            std::thread::spawn(move || {
                let mut client: Option<Client> = None;
                let mut j = 0;
                while !stop.load(Ordering::SeqCst) {
                    j += 1;
                    let c = client.get_or_insert_with(|| {
                        user_client(&alice).with_timeout(Duration::from_secs(3))
                    });
                    let (name, value) = (format!("T{t}_{j}"), format!("value-{t}-{j}"));
                    match c.call(
                        "config.set",
                        json!({"app": "burst", "vars": {&name: &value}}),
                    ) {
                        Ok(r) => {
                            let v = r["release"]["version"].as_i64().unwrap();
                            let names = r["release"]["config_names"].clone();
                            acks.lock().unwrap().push((v, name, value, names));
                        }
                        Err(e) => {
                            // A customer's CLI would run again: a fresh connection.
                            // (Needed: a connection that comes back while the new
                            // api has not yet read the users' CURVE keys is refused
                            // by ZAP, and libzmq never retries a refused handshake.)
                            if transport_error(&e) {
                                client = None;
                            }
                            errors.lock().unwrap().push(format!("{name}: {e}"));
                        }
                    }
                }
            })
        })
        .collect();
    let n = || acks.lock().unwrap().len();
    eventually(Duration::from_secs(30), "30 acknowledged changes", || {
        (n() >= 30).then_some(())
    });
    w.restart_api_hard();
    let at_restart = n();
    eventually(
        Duration::from_secs(30),
        "30 more acknowledged changes after the restart",
        || (n() >= at_restart + 30).then_some(()),
    );
    stop.store(true, Ordering::SeqCst);
    for t in threads {
        t.join().unwrap();
    }
    let acks = acks.lock().unwrap().clone();
    let errors = errors.lock().unwrap().clone();
    eprintln!(
        "{} acknowledged, {} failed around the kill: {errors:?}",
        acks.len(),
        errors.len()
    );

    let mut c = user_client(&alice);
    let list = c
        .call("release.list", json!({"app": "burst", "limit": 1000}))
        .unwrap();
    let versions: Vec<i64> = list["releases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["version"].as_i64().unwrap())
        .collect();
    let top = versions[0];
    assert_eq!(versions, (1..=top).rev().collect::<Vec<_>>(), "a gap");
    let mut seen = BTreeSet::new();
    for (v, name, value, names) in &acks {
        assert!(seen.insert(*v), "v{v} acknowledged twice");
        let r = c
            .call("release.info", json!({"app": "burst", "version": v}))
            .unwrap_or_else(|e| panic!("acknowledged v{v} ({name}) is gone: {e}"));
        assert_eq!(r["release"]["description"], format!("Set {name}"));
        assert_eq!(r["release"]["config"][name], *value, "v{v} lost its change");
        let held: Vec<&String> = r["release"]["config"].as_object().unwrap().keys().collect();
        assert_eq!(
            json!(held),
            *names,
            "v{v} holds other vars than its reply said"
        );
    }
    let now = c.call("config.get", json!({"app": "burst"})).unwrap();
    for (_, name, value, _) in &acks {
        assert_eq!(now["config"][name], *value, "{name} is no longer set");
    }
}

// ---- bad input -------------------------------------------------------------------

const RSA1024: &str = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAAAgQCy/BkZch9tDd0oCkp9B1Gw3Z+i6PT0F4zByjLlCzUiWXHWZMblVaC7nOlfiYZhjV+Oa60geczikE48Mh031kW7bYRMj6slsn05uITb2zxEOeP7Tzp1BglHgS3fgv0ylI5dDbwtIww6hlGdGge4Vg0Ik6IIgw5/+Q8r6vBFUcvaGQ==";
const DSA: &str = "ssh-dss AAAAB3NzaC1kc3MAAACBAMa7KaIVVdIsNUTNaco3aUxE3pk/36Qf2WB/vDc7cUHIC3AjT/I+kUlpeswispangLWEdUAQHe+q6CPiL+CZLgc8f9NP7jUWYAnsrQE+p0kpVEequofoD19WaFun6XawbEuk9G4/5qnH63EjOHHNGMToUMQdpJBgEZC6dSm4ecp1AAAAFQDPV65xRzSEDdpca2Kek4arBeYlZQAAAIAN6HKnWF54vgjh7nNj6S+1VV+pugpZMsAlb7i735ZmgwLQCf7/iQThEBrE12Ua3QeVMuHvwAqNxg/9KiPXybNiH/nh+kyk4Vzvu2VW/HCNSD/At2m05gfwRU2cn4YUCzyn6htBNRb2uIL3DamHxpbnuhOxD7r1vBQNLvHY2MWeAwAAAIBinX2VkJIgsTc8dNki9p4PS2sv8fiN/sLKeXyVoeALVKgibe61iLxVNF1z1lHepFjNMD1WvX0c9C9DLcO6yEMG40B3X6JWI+sJwMOp1FFvDhXC73gDRs3N85erzCofSkA3OYBWUqZiqoz6iv6vxVWMsRHKB11PxDGv6F0uHcNneg==";

/// Sends a request that must be refused with `code` and a message containing
/// `needle`, and checks that no row of any api table changed.
fn refused(w: &mut ApiCluster, c: &mut Client, kind: &str, body: Value, want: Code, needle: &str) {
    let before = w.snapshot();
    let e = remote_err(c.call(kind, body.clone()));
    assert_eq!(e.code, want, "{kind} {body}: {}", e.message);
    assert!(
        e.message.to_lowercase().contains(&needle.to_lowercase()),
        "{kind} {body}: message {:?} does not say {needle:?}",
        e.message
    );
    assert_eq!(w.snapshot(), before, "{kind} {body} changed the tables");
}

/// Point 10 of the issue: each bad input gets its code and a message that says
/// what was wrong (and what to do), and changes nothing.
#[test]
fn bad_input_gets_a_clear_error_and_changes_nothing() {
    let mut w = ApiCluster::start("api-bad-input", &["heartbeat"]);
    let alice = create_user(&w.node, "alice", false);
    let bob = create_user(&w.node, "bob", false);
    let boss = create_user(&w.node, "boss", true);
    let mut a = user_client(&alice);
    let mut b = user_client(&bob);
    a.call("app.create", json!({"name": "shop"})).unwrap();
    b.call("app.create", json!({"name": "other"})).unwrap();
    w.cluster()
        .call(
            "release.create",
            json!({"app": "shop", "slug": "sha256:aa00000000000000000000000000000000000000000000000000000000000000", "process_types": {"web": "run"}, "description": "d"}),
        )
        .unwrap();

    // Unknown app.
    for (kind, body) in [
        ("app.info", json!({"app": "nosuchapp"})),
        (
            "config.set",
            json!({"app": "nosuchapp", "vars": {"A": "1"}}),
        ),
        ("rollback", json!({"app": "nosuchapp"})),
        (
            "domain.add",
            json!({"app": "nosuchapp", "domain": "x.example.com"}),
        ),
        (
            "app.destroy",
            json!({"app": "nosuchapp", "confirm": "nosuchapp"}),
        ),
    ] {
        refused(&mut w, &mut a, kind, body, Code::NotFound, "nosuchapp");
    }

    // Bad and reserved app names; a name taken.
    for bad in [
        "",
        "Shop",
        "1shop",
        "my_shop",
        "shop-",
        "my shop",
        "café",
        &"a".repeat(29),
    ] {
        refused(
            &mut w,
            &mut a,
            "app.create",
            json!({ "name": bad }),
            Code::Invalid,
            "not valid",
        );
    }
    assert!(a
        .call("app.create", json!({"name": "a".repeat(28)}))
        .is_ok());
    for reserved in ["api", "www", "git", "admin", "paddock", "localhost"] {
        refused(
            &mut w,
            &mut a,
            "app.create",
            json!({ "name": reserved }),
            Code::Invalid,
            "reserved",
        );
    }
    refused(
        &mut w,
        &mut a,
        "app.create",
        json!({"name": "other"}),
        Code::Conflict,
        "taken",
    );
    // Bad user names and a user that exists (an admin asking).
    let mut boss_c = user_client(&boss);
    refused(
        &mut w,
        &mut boss_c,
        "user.create",
        json!({"name": "Bad Name"}),
        Code::Invalid,
        "not valid",
    );
    refused(
        &mut w,
        &mut boss_c,
        "user.create",
        json!({"name": "alice"}),
        Code::Conflict,
        "already exists",
    );

    // SSH keys: malformed, private, too weak, of a refused type, duplicated.
    for (bad, says) in [
        ("", "empty"),
        ("ssh-ed25519", "not an OpenSSH public key"),
        ("ssh-ed25519 AAAA", "not an OpenSSH public key"),
        ("hello world", "not an OpenSSH public key"),
        (
            "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n-----END OPENSSH PRIVATE KEY-----",
            "private key",
        ),
        (RSA1024, "1024 bits"),
        (DSA, "not accepted"),
    ] {
        refused(
            &mut w,
            &mut a,
            "sshkey.add",
            json!({ "public_key": bad }),
            Code::Invalid,
            says,
        );
    }
    let key = random_ed25519("alice@laptop");
    let fp = a.call("sshkey.add", json!({ "public_key": key })).unwrap()["fingerprint"]
        .as_str()
        .unwrap()
        .to_string();
    let same_other_comment = format!("{} bob@desk", key.rsplit_once(' ').unwrap().0);
    refused(
        &mut w,
        &mut b,
        "sshkey.add",
        json!({ "public_key": same_other_comment }),
        Code::Conflict,
        &fp,
    );
    refused(
        &mut w,
        &mut a,
        "sshkey.add",
        json!({ "public_key": key }),
        Code::Conflict,
        "already added",
    );

    // Domains: one app each; bob may not learn which app has it; bad names;
    // wildcards for admins only.
    a.call(
        "domain.add",
        json!({"app": "shop", "domain": "www.shop.example"}),
    )
    .unwrap();
    let e = remote_err(b.call(
        "domain.add",
        json!({"app": "other", "domain": "WWW.shop.example."}),
    ));
    assert_eq!(e.code, Code::Conflict);
    assert!(
        e.message.contains("another app") && !e.message.contains("shop "),
        "{}",
        e.message
    );
    // An admin may add names under apps_domain, but not another app's default.
    refused(
        &mut w,
        &mut boss_c,
        "domain.add",
        json!({"app": "other", "domain": "shop.localhost"}),
        Code::Conflict,
        "belongs to app shop",
    );
    refused(
        &mut w,
        &mut boss_c,
        "domain.add",
        json!({"app": "other", "domain": "www.shop.example"}),
        Code::Conflict,
        "belongs to app shop",
    );
    for bad in ["not a domain", "-x.example.com", "localhost", "a..b.com"] {
        refused(
            &mut w,
            &mut a,
            "domain.add",
            json!({"app": "shop", "domain": bad}),
            Code::Invalid,
            "not valid",
        );
    }
    refused(
        &mut w,
        &mut a,
        "domain.add",
        json!({"app": "shop", "domain": "*.shop.example"}),
        Code::Forbidden,
        "admin",
    );
    // Names under the platform's apps_domain are the platform's: every app has its
    // own there, and `admin.localhost` must not become someone's.
    for taken in [
        "admin.localhost",
        "future-app.localhost",
        "a.b.localhost",
        "localhost.localhost",
    ] {
        refused(
            &mut w,
            &mut a,
            "domain.add",
            json!({"app": "shop", "domain": taken}),
            Code::Invalid,
            "localhost",
        );
    }
    refused(
        &mut w,
        &mut a,
        "domain.remove",
        json!({"app": "shop", "domain": "shop.localhost"}),
        Code::Invalid,
        "default domain",
    );

    // A revoked key: the open connection gets unknown_key, a new one no connection.
    let spare = creds_from(&w.node, &a.call("key.create", json!({})).unwrap());
    let mut s = user_client(&spare);
    s.call("whoami", json!({})).unwrap();
    a.call("key.revoke", json!({"key_id": spare.key_id}))
        .unwrap();
    refused(
        &mut w,
        &mut s,
        "config.set",
        json!({"app": "shop", "vars": {"A": "1"}}),
        Code::UnknownKey,
        "paddock login",
    );
    let fresh = user_client(&spare)
        .with_timeout(Duration::from_millis(1500))
        .call("whoami", json!({}));
    assert!(
        matches!(fresh, Err(ref e) if e.code().is_none() || e.code() == Some(&Code::UnknownKey)),
        "{fresh:?}"
    );

    // Config: sizes, reserved and bad names, all or nothing.
    let max = "v".repeat(32 * 1024);
    let over = "v".repeat(32 * 1024 + 1);
    refused(
        &mut w,
        &mut a,
        "config.set",
        json!({"app": "shop", "vars": {"BIG": over}}),
        Code::Invalid,
        "BIG",
    );
    a.call("config.set", json!({"app": "shop", "vars": {"BIG": max}}))
        .expect("a value of exactly 32 KiB");
    refused(
        &mut w,
        &mut a,
        "config.set",
        json!({"app": "shop", "vars": {"BIG2": max}}),
        Code::Invalid,
        "64 KiB",
    );
    for name in ["PORT", "PADDOCK_X", "PADDOCK_"] {
        refused(
            &mut w,
            &mut a,
            "config.set",
            json!({"app": "shop", "vars": {"OK": "1", name: "1"}}),
            Code::Invalid,
            "reserved",
        );
    }
    for name in ["1A", "A-B", "", "A B", "É"] {
        refused(
            &mut w,
            &mut a,
            "config.set",
            json!({"app": "shop", "vars": {"OK": "1", name: "1"}}),
            Code::Invalid,
            "not valid",
        );
    }
    refused(
        &mut w,
        &mut a,
        "config.set",
        json!({"app": "shop", "vars": {"N": 5}}),
        Code::Invalid,
        "must be a string",
    );
    refused(
        &mut w,
        &mut a,
        "config.unset",
        json!({"app": "shop", "names": ["BIG", "NOPE"]}),
        Code::NotFound,
        "NOPE",
    );

    // Releases: a rollback to, or info on, a release that does not exist.
    refused(
        &mut w,
        &mut a,
        "rollback",
        json!({"app": "shop", "version": 99}),
        Code::NotFound,
        "v99",
    );
    refused(
        &mut w,
        &mut a,
        "rollback",
        json!({"app": "shop", "version": "v0"}),
        Code::Invalid,
        "version",
    );
    refused(
        &mut w,
        &mut a,
        "release.info",
        json!({"app": "shop", "version": 99}),
        Code::NotFound,
        "v99",
    );

    // Formation: a type the release does not have, quantities out of range.
    refused(
        &mut w,
        &mut a,
        "formation.scale",
        json!({"app": "shop", "changes": [{"type": "web", "quantity": 1}, {"type": "worker", "quantity": 1}]}),
        Code::Invalid,
        "worker",
    );
    refused(
        &mut w,
        &mut a,
        "formation.scale",
        json!({"app": "shop", "changes": [{"type": "web", "quantity": 101}]}),
        Code::Invalid,
        "0-100",
    );

    // Access: an unknown user, one already there.
    refused(
        &mut w,
        &mut a,
        "access.add",
        json!({"app": "shop", "user": "nobody"}),
        Code::NotFound,
        "nobody",
    );
    a.call("access.add", json!({"app": "shop", "user": "bob"}))
        .unwrap();
    refused(
        &mut w,
        &mut a,
        "access.add",
        json!({"app": "shop", "user": "bob"}),
        Code::Conflict,
        "already has access",
    );
    refused(
        &mut w,
        &mut a,
        "access.remove",
        json!({"app": "shop", "user": "alice"}),
        Code::Invalid,
        "owner",
    );

    // Destroy: the name must be repeated.
    refused(
        &mut w,
        &mut a,
        "app.destroy",
        json!({"app": "shop", "confirm": "shpo"}),
        Code::Invalid,
        "--confirm shop",
    );
    refused(
        &mut w,
        &mut a,
        "app.destroy",
        json!({"app": "shop"}),
        Code::Invalid,
        "confirm",
    );
    assert_eq!(
        a.call("app.info", json!({"app": "shop"})).unwrap()["app"]["name"],
        "shop"
    );
}

// ---- releases and the scheduler's view ----------------------------------------------

/// A config change is a release of the newest code that did not fail: after a
/// failed deploy it keeps the running slug (a failed build is never rolled out
/// again by a config change); during a deploy it takes the deploy's slug. The
/// scheduler's `app.state` shows the current and pending releases, the formation
/// (web=1 from the first web release), the domains and the default health checks.
#[test]
fn config_changes_build_on_the_newest_release_that_did_not_fail() {
    let w = ApiCluster::start("api-releases", &[]);
    let alice = create_user(&w.node, "alice", false);
    let mut a = user_client(&alice);
    let mut cl = w.cluster();
    a.call("app.create", json!({"name": "deploys"})).unwrap();
    let build = |cl: &mut Client, slug: &str| -> i64 {
        cl.call(
            "release.create",
            json!({"app": "deploys", "slug": slug, "description": format!("Deploy {slug}"),
                   "process_types": {"web": format!("run {slug}")},
                   "healthchecks": {"web": [{"type": "startup", "path": "/health", "timeout": 5, "attempts": 3}]}}),
        )
        .unwrap()["release"]["version"]
            .as_i64()
            .unwrap()
    };
    let status = |cl: &mut Client, v: i64, s: &str| {
        cl.call(
            "release.status",
            json!({"app": "deploys", "version": v, "status": s}),
        )
        .unwrap()
    };
    let good = build(
        &mut cl,
        "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    );
    assert_eq!(good, 2);
    status(&mut cl, good, "succeeded");
    assert_eq!(
        code(cl.call(
            "release.status",
            json!({"app": "deploys", "version": good, "status": "failed"})
        )),
        Code::Conflict,
        "only a pending release changes status"
    );
    let bad = build(
        &mut cl,
        "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb",
    );
    status(&mut cl, bad, "failed");
    let r = a
        .call("config.set", json!({"app": "deploys", "vars": {"X": "1"}}))
        .unwrap()["release"]
        .clone();
    assert_eq!(r["version"], 4);
    assert_eq!(
        r["slug"], "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        "a config change reused a failed build"
    );
    assert_eq!(
        r["process_types"],
        json!({"web": format!("run {}", "a".repeat(64))})
    );
    assert_eq!(r["status"], "pending");
    // During a deploy, a config change goes with the code being deployed.
    let next = build(
        &mut cl,
        "cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc",
    );
    let r = a
        .call("config.set", json!({"app": "deploys", "vars": {"Y": "2"}}))
        .unwrap()["release"]
        .clone();
    assert_eq!(
        r["slug"],
        "cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc"
    );
    assert_eq!(r["config_names"], json!(["X", "Y"]));

    let state = cl.call("app.state", json!({"app": "deploys"})).unwrap()["app"].clone();
    assert_eq!(state["current"]["version"], good);
    assert_eq!(state["current"]["config"], json!({}));
    assert_eq!(state["pending"]["version"], next + 1);
    assert_eq!(state["pending"]["config"], json!({"X": "1", "Y": "2"}));
    assert_eq!(state["domains"], json!(["deploys.localhost"]));
    assert_eq!(state["formation"][0]["type"], "web");
    assert_eq!(state["formation"][0]["quantity"], 1);
    assert_eq!(
        state["healthchecks"]["web"][0]["path"], "/health",
        "{state}"
    );
    // The current release succeeds: the pointer moves; an older success does not
    // move it back.
    status(&mut cl, next + 1, "succeeded");
    status(&mut cl, next, "succeeded");
    let info = a.call("app.info", json!({"app": "deploys"})).unwrap();
    assert_eq!(info["app"]["current_release"], next + 1);
    // A rollback with no version goes to the release before the current one.
    let r = a.call("rollback", json!({"app": "deploys"})).unwrap()["release"].clone();
    assert_eq!(r["description"], format!("Rollback to v{next}"));
    assert_eq!(
        r["slug"],
        "cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc"
    );
    assert_eq!(r["config_names"], json!(["X"]));
    let all = cl.call("apps.state", json!({})).unwrap();
    assert_eq!(all["apps"][0]["name"], "deploys");
    // A process type with no health check of its own gets a TCP connect.
    cl.call(
        "release.create",
        json!({"app": "deploys", "slug": "sha256:dddd000000000000000000000000000000000000000000000000000000000000", "description": "d",
               "process_types": {"web": "run", "worker": "work"}}),
    )
    .unwrap();
    let state = cl.call("app.state", json!({"app": "deploys"})).unwrap()["app"].clone();
    assert_eq!(state["healthchecks"]["worker"], json!([{"type": "tcp"}]));
    assert_eq!(state["healthchecks"]["web"], json!([{"type": "tcp"}]));
    let f = a.call("formation.get", json!({"app": "deploys"})).unwrap();
    assert_eq!(
        f["formation"],
        json!([{"type": "web", "quantity": 1, "memory_mb": 512, "pids": 256, "command": "run"},
               {"type": "worker", "quantity": 0, "memory_mb": 512, "pids": 256, "command": "work"}])
    );
}

// ---- people, keys and access over time -------------------------------------------

/// Rotating a key ends the old one at once; revoking a user ends every key of
/// theirs, their open connections and their SSH keys' matches; removing a
/// collaborator ends their access; random app names follow the rules; the audit
/// log pages with `before`.
#[test]
fn keys_users_and_access_end_when_revoked_or_removed() {
    let w = ApiCluster::start("api-lifecycle", &[]);
    let alice = create_user(&w.node, "alice", false);
    let bob = create_user(&w.node, "bob", false);
    let boss = create_user(&w.node, "boss", true);
    let mut a = user_client(&alice);
    let mut admin = user_client(&boss);

    // Rotation: the new key works, the old one is dead on its open connection.
    let rotated = creds_from(&w.node, &a.call("key.rotate", json!({})).unwrap());
    assert_ne!(rotated.key_id, alice.key_id);
    let e = remote_err(a.call("whoami", json!({})));
    assert_eq!(e.code, Code::UnknownKey);
    assert!(e.message.contains("revoked"), "{}", e.message);
    let mut a = user_client(&rotated);
    let keys = a.call("key.list", json!({})).unwrap()["keys"].clone();
    let keys = keys.as_array().unwrap();
    assert_eq!(keys.len(), 2);
    assert!(keys[0]["revoked_at"].is_i64() && keys[0]["current"] == false);
    assert!(keys[1]["revoked_at"].is_null() && keys[1]["current"] == true);

    // Random names: valid, distinct, and the app is the caller's.
    let mut names = BTreeSet::new();
    for _ in 0..5 {
        let app = a.call("app.create", json!({})).unwrap()["app"].clone();
        let n = app["name"].as_str().unwrap().to_string();
        assert!(
            n.len() <= 28
                && n.starts_with(|c: char| c.is_ascii_lowercase())
                && n.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                && !n.ends_with('-'),
            "{n}"
        );
        assert_eq!(app["owner"], "alice");
        names.insert(n);
    }
    assert_eq!(names.len(), 5);
    let app = names.iter().next().unwrap().clone();

    // A collaborator removed loses access at once.
    let mut b = user_client(&bob);
    a.call("access.add", json!({"app": app, "user": "bob"}))
        .unwrap();
    b.call("config.get", json!({ "app": app })).unwrap();
    assert_eq!(
        b.call("app.list", json!({})).unwrap()["apps"][0]["role"],
        "collaborator"
    );
    a.call("access.remove", json!({"app": app, "user": "bob"}))
        .unwrap();
    assert_eq!(
        code(b.call("config.get", json!({ "app": app }))),
        Code::Forbidden
    );
    assert_eq!(b.call("app.list", json!({})).unwrap()["apps"], json!([]));

    // Revoking a user: every key, open connections, SSH key matches.
    let fp = a
        .call(
            "sshkey.add",
            json!({"public_key": random_ed25519("alice@laptop")}),
        )
        .unwrap()["fingerprint"]
        .clone();
    let mut cl = w.cluster();
    assert_eq!(
        cl.call("sshkey.lookup", json!({ "fingerprint": fp }))
            .unwrap()["user"],
        "alice"
    );
    let second = creds_from(&w.node, &a.call("key.create", json!({})).unwrap());
    let r = admin.call("user.revoke", json!({"name": "alice"})).unwrap();
    assert_eq!(r["revoked_keys"], 2);
    let e = remote_err(a.call("app.list", json!({})));
    assert_eq!(e.code, Code::UnknownKey);
    assert!(e.message.contains("disabled"), "{}", e.message);
    let fresh = user_client(&second)
        .with_timeout(Duration::from_millis(1500))
        .call("whoami", json!({}));
    assert!(
        matches!(fresh, Err(ref e) if e.code().is_none() || e.code() == Some(&Code::UnknownKey)),
        "{fresh:?}"
    );
    assert_eq!(
        code(cl.call("sshkey.lookup", json!({ "fingerprint": fp }))),
        Code::NotFound
    );
    assert_eq!(
        code(admin.call("key.create", json!({"user": "alice"}))),
        Code::Conflict
    );
    let users = admin.call("user.list", json!({})).unwrap()["users"].clone();
    let al = users
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["name"] == "alice")
        .unwrap()
        .clone();
    assert_eq!(al["disabled"], true);
    assert_eq!(al["keys"], 0);

    // The audit log pages: `before` gives the entries older than an id.
    let page1 = admin.call("audit.list", json!({"limit": 3})).unwrap()["entries"].clone();
    let page1 = page1.as_array().unwrap();
    assert_eq!(page1.len(), 3);
    let last = page1[2]["id"].as_i64().unwrap();
    let page2 = admin
        .call("audit.list", json!({"limit": 3, "before": last}))
        .unwrap()["entries"]
        .clone();
    let ids: Vec<i64> = page1
        .iter()
        .chain(page2.as_array().unwrap())
        .map(|e| e["id"].as_i64().unwrap())
        .collect();
    assert!(ids.windows(2).all(|p| p[0] > p[1]), "{ids:?}");
    assert_eq!(ids.len(), 6);
}

// ---- destroying an app -----------------------------------------------------------

/// `app.destroy` removes every row of the app in one go, removes its balancer
/// route and stops its runner instances (found through the registry), reports
/// each, and leaves other apps' instances alone; its name and domain are free again.
#[test]
fn destroying_an_app_removes_its_rows_routes_and_instances() {
    let mut w = ApiCluster::start("api-destroy", &["heartbeat", "runner", "balancer"]);
    let app_dir = w.t.path().join("appdir");
    std::fs::create_dir_all(&app_dir).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&app_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    paddock_harness::allow_traverse(&app_dir).unwrap();
    let alice = create_user(&w.node, "alice", false);
    let boss = create_user(&w.node, "boss", true);
    let mut a = user_client(&alice);
    for app in ["doomed", "keeper"] {
        a.call("app.create", json!({ "name": app })).unwrap();
        a.call("config.set", json!({"app": app, "vars": {"A": "1"}}))
            .unwrap();
    }
    let mut runner = w.node.client("runner");
    let mut bal = w.node.client("balancer");
    let mut ids = BTreeMap::new();
    for app in ["doomed", "keeper"] {
        let r = runner
            .call(
                "instance.start",
                json!({"app": app, "proc": "web", "dir": app_dir, "argv": ["sleep", "1000"],
                       "health": {"none": true}}),
            )
            .unwrap();
        ids.insert(app, r["id"].as_str().unwrap().to_string());
        bal.call(
            "route.set",
            json!({"app": app, "domains": [format!("{app}.localhost")]}),
        )
        .unwrap();
    }
    let mut hb = w.node.client("heartbeat");
    eventually(
        Duration::from_secs(10),
        "runner and balancer registered",
        || {
            let l = hb.call("registry.list", json!({})).unwrap();
            let alive = |d: &str| {
                l["services"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|s| s["daemon"] == d && s["state"] == "alive")
            };
            (alive("runner") && alive("balancer")).then_some(())
        },
    );

    let r = a
        .call("app.destroy", json!({"app": "doomed", "confirm": "doomed"}))
        .unwrap();
    let cleanup = &r["cleanup"];
    assert_eq!(cleanup["domains"], json!(["doomed.localhost"]), "{r}");
    assert_eq!(cleanup["routes"][0]["result"], "done", "{r}");
    // One runner, asked to purge the app: it stops the instance (purged once
    // it has stopped).
    let inst = cleanup["instances"].as_array().unwrap();
    assert_eq!(inst.len(), 1, "{r}");
    assert_eq!(inst[0]["instances"], json!([ids["doomed"]]), "{r}");
    assert_eq!(inst[0]["result"], "stopping", "{r}");

    let routes = bal.call("routes.list", json!({})).unwrap();
    let apps: Vec<&str> = routes["apps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["app"].as_str().unwrap())
        .collect();
    assert_eq!(apps, ["keeper"]);
    eventually(Duration::from_secs(15), "doomed's instance stopped", || {
        let l = runner.call("instance.list", json!({})).unwrap();
        let state = |id: &str| {
            l["instances"]
                .as_array()
                .unwrap()
                .iter()
                .find(|i| i["id"] == id)
                .map(|i| i["state"].as_str().unwrap().to_string())
        };
        let keeper = state(&ids["keeper"]);
        assert!(
            !matches!(keeper.as_deref(), Some("stopping" | "stopped") | None),
            "keeper's instance: {keeper:?}"
        );
        // Purged: the record is gone, not merely stopped.
        state(&ids["doomed"]).is_none().then_some(())
    });
    // The app's account is gone with it; keeper's stays.
    let account = |app: &str| nix::unistd::User::from_name(&format!("pdk-{app}")).unwrap();
    assert!(account("doomed").is_none(), "pdk-doomed still exists");
    assert!(account("keeper").is_some());

    // No row of the app is left but its audit trail.
    let left = w.sql(
        "SELECT (SELECT count(*) FROM api_apps WHERE name = 'doomed')
              + (SELECT count(*) FROM api_domains WHERE domain LIKE 'doomed.%')
              + (SELECT count(*) FROM api_releases r WHERE NOT EXISTS (SELECT 1 FROM api_apps a WHERE a.id = r.app_id))
              + (SELECT count(*) FROM api_access x WHERE NOT EXISTS (SELECT 1 FROM api_apps a WHERE a.id = x.app_id))",
    )[0]
    .get::<_, i64>(0);
    assert_eq!(left, 0);
    assert_eq!(
        code(w.cluster().call("app.state", json!({"app": "doomed"}))),
        Code::NotFound
    );
    assert!(w
        .audit_after(0)
        .iter()
        .any(|r| r["kind"] == "app.destroy" && r["app"] == "doomed"));
    // The name and its domain are free again.
    user_client(&boss)
        .call(
            "domain.add",
            json!({"app": "keeper", "domain": "doomed.localhost"}),
        )
        .unwrap();
    let again = a.call("app.create", json!({"name": "doomed"}));
    assert_eq!(
        code(again),
        Code::Conflict,
        "its default domain is keeper's now"
    );
    user_client(&boss)
        .call(
            "domain.remove",
            json!({"app": "keeper", "domain": "doomed.localhost"}),
        )
        .unwrap();
    let again = a.call("app.create", json!({"name": "doomed"})).unwrap();
    assert_eq!(again["app"]["current_release"], 1);
    runner
        .call("instance.stop", json!({"id": ids["keeper"]}))
        .unwrap();
}

// ---- review fixes ------------------------------------------------------------------

/// The entries' `(kind, actor)`, newest first.
fn kinds_and_actors(r: &Value) -> Vec<(String, String)> {
    r["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["kind"].as_str().unwrap().to_string(),
                e["actor"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
    v.iter()
        .map(|(k, a)| (k.to_string(), a.to_string()))
        .collect()
}

/// An app's audit log is that app's (by id), not every app's that ever had its
/// name: after alice destroys `shop` and bob creates another `shop`, bob reads only
/// his app's entries; the old rows stay, for alice (her own entries) and admins.
#[test]
fn a_reused_app_name_does_not_show_the_previous_apps_audit_log() {
    let mut w = ApiCluster::start("api-audit-reuse", &[]);
    let alice = create_user(&w.node, "alice", false);
    let bob = create_user(&w.node, "bob", false);
    let boss = create_user(&w.node, "boss", true);
    let mut a = user_client(&alice);
    a.call("app.create", json!({"name": "shop"})).unwrap();
    a.call(
        "config.set",
        json!({"app": "shop", "vars": {"ALICES_SECRET_PLAN": "x"}}),
    )
    .unwrap();
    a.call("app.destroy", json!({"app": "shop", "confirm": "shop"}))
        .unwrap();
    // A row another daemon appends after the app went names no app of bob's.
    w.cluster()
        .call(
            "audit.append",
            json!({"actor": "user:alice", "kind": "git.push", "app": "shop"}),
        )
        .unwrap();

    let mut b = user_client(&bob);
    b.call("app.create", json!({"name": "shop"})).unwrap();
    b.call("config.set", json!({"app": "shop", "vars": {"B": "1"}}))
        .unwrap();
    w.cluster()
        .call(
            "audit.append",
            json!({"actor": "user:bob", "kind": "git.push", "app": "shop"}),
        )
        .unwrap();
    let bobs = pairs(&[
        ("git.push", "user:bob"),
        ("config.set", "user:bob"),
        ("app.create", "user:bob"),
    ]);
    let log = b
        .call("audit.list", json!({"app": "shop", "limit": 1000}))
        .unwrap();
    assert_eq!(kinds_and_actors(&log), bobs, "bob reads alice's old app");
    assert!(!log.to_string().contains("ALICES_SECRET_PLAN"));
    // An admin's app filter is the app too; the old rows are there without it.
    let mut boss_c = user_client(&boss);
    let log = boss_c
        .call("audit.list", json!({"app": "shop", "limit": 1000}))
        .unwrap();
    assert_eq!(kinds_and_actors(&log), bobs);
    let alices = pairs(&[
        ("git.push", "user:alice"),
        ("app.destroy", "user:alice"),
        ("config.set", "user:alice"),
        ("app.create", "user:alice"),
    ]);
    let log = boss_c
        .call("audit.list", json!({"user": "alice", "limit": 1000}))
        .unwrap();
    assert_eq!(kinds_and_actors(&log), alices);
    assert!(log["entries"]
        .as_array()
        .unwrap()
        .iter()
        .all(|e| e["app"] == "shop"));
    let all = boss_c.call("audit.list", json!({"limit": 1000})).unwrap();
    let shop_rows = all["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["app"] == "shop")
        .count();
    assert_eq!(shop_rows, alices.len() + bobs.len());
    // Alice reads her own entries (no app: her own), not bob's app.
    let mine = a.call("audit.list", json!({"limit": 1000})).unwrap();
    assert_eq!(kinds_and_actors(&mine), alices);
    assert_eq!(
        code(a.call("audit.list", json!({"app": "shop"}))),
        Code::Forbidden
    );
    // Two apps' ids, none missing for a row made while its app was there.
    let ids = w.sql(
        "SELECT count(DISTINCT app_id), count(*) FILTER (WHERE app_id IS NULL) FROM api_audit WHERE app = 'shop'",
    );
    assert_eq!(ids[0].get::<_, i64>(0), 2);
    assert_eq!(
        ids[0].get::<_, i64>(1),
        1,
        "only the row appended while no app had the name"
    );
}

/// `key.rotate` revokes the calling key in its own transaction before it makes a
/// new one: of many concurrent rotations of one key exactly one gets a new key
/// (the others `unknown_key`), and the user is left with exactly one live key.
#[test]
fn concurrent_rotations_of_one_key_make_exactly_one_new_key() {
    let w = ApiCluster::start("api-rotate-race", &[]);
    let mut cur = create_user(&w.node, "alice", false);
    for round in 0..3 {
        let n = 8;
        let start = Arc::new(Barrier::new(n));
        let threads: Vec<_> = (0..n)
            .map(|_| {
                let (cur, start) = (cur.clone(), start.clone());
                std::thread::spawn(move || {
                    let mut c = user_client(&cur).with_timeout(Duration::from_secs(20));
                    c.call("whoami", json!({})).unwrap();
                    start.wait();
                    c.call("key.rotate", json!({}))
                })
            })
            .collect();
        let mut won = vec![];
        for t in threads {
            match t.join().unwrap() {
                Ok(v) => won.push(v),
                Err(ClientError::Remote(e)) if e.code == Code::UnknownKey => {
                    assert!(e.message.contains("revoked"), "{}", e.message)
                }
                Err(e) => panic!("round {round}: key.rotate: {e}"),
            }
        }
        assert_eq!(
            won.len(),
            1,
            "round {round}: {} rotations of one key succeeded",
            won.len()
        );
        let next = creds_from(&w.node, &won[0]);
        let keys = w
            .cluster()
            .call("key.list", json!({"user": "alice"}))
            .unwrap();
        let live: Vec<&str> = keys["keys"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|k| k["revoked_at"].is_null())
            .map(|k| k["key_id"].as_str().unwrap())
            .collect();
        assert_eq!(live, [next.key_id.as_str()], "round {round}");
        user_client(&next).call("whoami", json!({})).unwrap();
        cur = next;
    }
}

/// A key revoked after `key.rotate` checked it, but before the rotation's
/// transaction revokes it, gets no successor: the test holds the key row's lock
/// with the revoking UPDATE `key.revoke` makes (as another api would), lets the
/// rotation reach that row, then commits.
#[test]
fn a_key_revoked_while_it_is_rotated_gets_no_successor() {
    let mut w = ApiCluster::start("api-rotate-revoke", &[]);
    let alice = create_user(&w.node, "alice", false);
    let spare = create_key(&w.node, "alice");
    let last = w.last_audit_id();
    w.batch(&format!(
        "BEGIN; UPDATE api_keys SET revoked_at = now() WHERE key_id = '{}'",
        spare.key_id
    ));
    let rotating = {
        let spare = spare.clone();
        std::thread::spawn(move || {
            user_client(&spare)
                .with_timeout(Duration::from_secs(20))
                .call("key.rotate", json!({}))
        })
    };
    let mut waited = 0;
    loop {
        let waiting: i64 = w.sql("SELECT count(*) FROM pg_locks WHERE NOT granted")[0].get(0);
        if waiting > 0 {
            break;
        }
        waited += 1;
        assert!(
            waited < 200 && !rotating.is_finished(),
            "the rotation never waited for the key's row"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    w.batch("COMMIT");
    let e = remote_err(rotating.join().unwrap());
    assert_eq!(e.code, Code::UnknownKey, "{}", e.message);
    assert!(e.message.contains("revoked"), "{}", e.message);
    let live: Vec<String> = w
        .sql("SELECT key_id FROM api_keys WHERE revoked_at IS NULL ORDER BY key_id")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(live, [alice.key_id.as_str()]);
    assert!(w.audit_after(last).is_empty());
}

/// Domains: a name under another app's wildcard is that app's traffic, so only an
/// admin may give it to another app (and the other app is not named); an IP
/// address is not a domain; a domain is removed only from its own app.
#[test]
fn domains_under_another_apps_wildcard_or_like_ip_addresses_are_refused() {
    let mut w = ApiCluster::start("api-domains", &[]);
    let alice = create_user(&w.node, "alice", false);
    let bob = create_user(&w.node, "bob", false);
    let boss = create_user(&w.node, "boss", true);
    let (mut a, mut b, mut admin) = (user_client(&alice), user_client(&bob), user_client(&boss));
    a.call("app.create", json!({"name": "shop"})).unwrap();
    b.call("app.create", json!({"name": "other"})).unwrap();
    admin
        .call(
            "domain.add",
            json!({"app": "shop", "domain": "*.shop.example"}),
        )
        .unwrap();
    for covered in ["x.shop.example", "a.b.shop.example"] {
        let before = w.snapshot();
        let e = remote_err(b.call("domain.add", json!({"app": "other", "domain": covered})));
        assert_eq!(e.code, Code::Conflict, "{covered}: {}", e.message);
        assert!(e.message.contains("wildcard"), "{}", e.message);
        let rest = e.message.replace(covered, "").replace("*.shop.example", "");
        assert!(!rest.contains("shop"), "names the other app: {}", e.message);
        assert_eq!(w.snapshot(), before);
    }
    // Not covered: the wildcard's base, another name.
    b.call(
        "domain.add",
        json!({"app": "other", "domain": "shop.example"}),
    )
    .unwrap();
    b.call(
        "domain.add",
        json!({"app": "other", "domain": "x.other.example"}),
    )
    .unwrap();
    // The wildcard's own app may add names under it; an admin may carve one out.
    a.call(
        "domain.add",
        json!({"app": "shop", "domain": "www.shop.example"}),
    )
    .unwrap();
    admin
        .call(
            "domain.add",
            json!({"app": "other", "domain": "x.shop.example"}),
        )
        .unwrap();

    // IP addresses and all-digit top-level labels are not domains, for anyone.
    for ip in ["10.0.0.1", "127.0.0.1", "192.168.1.300", "example.123"] {
        for c in [&mut a, &mut admin] {
            refused(
                &mut w,
                c,
                "domain.add",
                json!({"app": "shop", "domain": ip}),
                Code::Invalid,
                "not valid",
            );
        }
    }
    a.call(
        "domain.add",
        json!({"app": "shop", "domain": "1.2.shop2.example"}),
    )
    .unwrap();

    // Another app's domain is not removed through this one.
    refused(
        &mut w,
        &mut a,
        "domain.remove",
        json!({"app": "shop", "domain": "x.shop.example"}),
        Code::NotFound,
        "not a domain of shop",
    );
    b.call(
        "domain.remove",
        json!({"app": "other", "domain": "x.shop.example"}),
    )
    .unwrap();
    let left: Vec<String> = w
        .sql("SELECT domain FROM api_domains ORDER BY domain COLLATE \"C\"")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        left,
        [
            "*.shop.example",
            "1.2.shop2.example",
            "other.localhost",
            "shop.example",
            "shop.localhost",
            "www.shop.example",
            "x.other.example"
        ]
    );
}

/// Removing someone else's SSH key or revoking someone else's key is `not_found`,
/// worded as for a key that does not exist: the answer does not tell whose it is.
/// Admins still may.
#[test]
fn key_errors_do_not_tell_whose_key_it_is() {
    let mut w = ApiCluster::start("api-key-owners", &[]);
    let alice = create_user(&w.node, "alice", false);
    let bob = create_user(&w.node, "bob", false);
    let boss = create_user(&w.node, "boss", true);
    let (mut a, mut b) = (user_client(&alice), user_client(&bob));
    let fp = a
        .call(
            "sshkey.add",
            json!({"public_key": random_ed25519("alice@laptop")}),
        )
        .unwrap()["fingerprint"]
        .as_str()
        .unwrap()
        .to_string();
    let spare = create_key(&w.node, "alice");
    let nobody_fp = "SHA256:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
    let nobody_key = "user.01aaaaaaaaaaaaaaaaaaaaaaaa";

    let message = |w: &mut ApiCluster, c: &mut Client, kind: &str, body: Value| -> String {
        let before = w.snapshot();
        let e = remote_err(c.call(kind, body.clone()));
        assert_eq!(e.code, Code::NotFound, "{kind} {body}: {}", e.message);
        assert_eq!(w.snapshot(), before, "{kind} {body} changed the tables");
        assert!(!e.message.contains("alice"), "{}", e.message);
        e.message
    };
    let theirs = message(
        &mut w,
        &mut b,
        "sshkey.remove",
        json!({ "fingerprint": fp }),
    );
    let none = message(
        &mut w,
        &mut b,
        "sshkey.remove",
        json!({ "fingerprint": nobody_fp }),
    );
    assert!(theirs.contains("no such SSH key"), "{theirs}");
    assert_eq!(theirs.replace(&fp, "FP"), none.replace(nobody_fp, "FP"));

    let theirs = message(
        &mut w,
        &mut b,
        "key.revoke",
        json!({ "key_id": spare.key_id }),
    );
    let none = message(
        &mut w,
        &mut b,
        "key.revoke",
        json!({ "key_id": nobody_key }),
    );
    assert!(theirs.contains("no such key"), "{theirs}");
    assert_eq!(
        theirs.replace(&spare.key_id, "ID"),
        none.replace(nobody_key, "ID")
    );

    // The owner and admins may.
    let mut admin = user_client(&boss);
    admin
        .call("sshkey.remove", json!({ "fingerprint": fp }))
        .unwrap();
    admin
        .call("key.revoke", json!({ "key_id": spare.key_id }))
        .unwrap();
    let mine = create_key(&w.node, "alice");
    a.call("key.revoke", json!({ "key_id": mine.key_id }))
        .unwrap();
    // Revoked already: `not_found` again.
    message(
        &mut w,
        &mut a,
        "key.revoke",
        json!({ "key_id": mine.key_id }),
    );
}

/// Limits: `formation.scale` takes at most 50 changes, each type once, checked
/// against the newest release that did not fail; a rollback goes only to a release
/// that succeeded; an RSA SSH key has at most 16384 bits, as OpenSSH allows.
#[test]
fn formation_rollback_and_ssh_key_limits() {
    let mut w = ApiCluster::start("api-limits", &[]);
    let alice = create_user(&w.node, "alice", false);
    let mut a = user_client(&alice);
    let mut cl = w.cluster();
    a.call("app.create", json!({"name": "lim"})).unwrap();
    let build = |cl: &mut Client, slug: &str, types: Value| -> i64 {
        cl.call(
            "release.create",
            json!({"app": "lim", "slug": slug, "description": "d", "process_types": types}),
        )
        .unwrap()["release"]["version"]
            .as_i64()
            .unwrap()
    };
    let status = |cl: &mut Client, v: i64, s: &str| {
        cl.call(
            "release.status",
            json!({"app": "lim", "version": v, "status": s}),
        )
        .unwrap();
    };
    let good = build(
        &mut cl,
        "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        json!({"web": "w", "worker": "k"}),
    );
    status(&mut cl, good, "succeeded");
    let bad = build(
        &mut cl,
        "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb",
        json!({"web": "w", "clock": "c"}),
    );
    status(&mut cl, bad, "failed");

    // The failed build's types are not the app's; the running release's are.
    refused(
        &mut w,
        &mut a,
        "formation.scale",
        json!({"app": "lim", "changes": [{"type": "clock", "quantity": 1}]}),
        Code::Invalid,
        "clock",
    );
    a.call(
        "formation.scale",
        json!({"app": "lim", "changes": [{"type": "worker", "quantity": 2}]}),
    )
    .expect("a type of the running release");
    refused(
        &mut w,
        &mut a,
        "formation.scale",
        json!({"app": "lim", "changes": [{"type": "web", "quantity": 1}, {"type": "web", "quantity": 3}]}),
        Code::Invalid,
        "twice",
    );
    let many: Vec<Value> = (0..51)
        .map(|i| json!({"type": format!("t{i}"), "quantity": 1}))
        .collect();
    refused(
        &mut w,
        &mut a,
        "formation.scale",
        json!({"app": "lim", "changes": many}),
        Code::Invalid,
        "at most 50",
    );

    // Rollback: not to a failed release, nor to one not finished.
    refused(
        &mut w,
        &mut a,
        "rollback",
        json!({"app": "lim", "version": bad}),
        Code::Conflict,
        "failed",
    );
    let pending = build(
        &mut cl,
        "cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc",
        json!({"web": "w"}),
    );
    refused(
        &mut w,
        &mut a,
        "rollback",
        json!({"app": "lim", "version": pending}),
        Code::Conflict,
        "not finished",
    );
    let r = a
        .call("rollback", json!({"app": "lim", "version": good}))
        .unwrap();
    assert_eq!(
        r["release"]["slug"],
        "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
    );

    // RSA keys: 16384 bits at most.
    let ok = a
        .call(
            "sshkey.add",
            json!({"public_key": rsa_of_bits(16384, "big@host")}),
        )
        .expect("a 16384-bit RSA key");
    assert_eq!(ok["algorithm"], "ssh-rsa");
    for bits in [16385, 20000] {
        refused(
            &mut w,
            &mut a,
            "sshkey.add",
            json!({"public_key": rsa_of_bits(bits, "huge@host")}),
            Code::Invalid,
            &format!("{bits} bits"),
        );
    }
}

/// The database restarts under the api: while it is down a change is
/// `unavailable` (and not made); once it is back the api serves again with every
/// acknowledged change, and versions go on without a gap.
#[test]
fn a_database_restart_loses_no_acknowledged_change() {
    let t = TestDir::new("api-dbdown");
    let pg_dir = t.path().join("db");
    std::fs::create_dir_all(&pg_dir).unwrap();
    let mut pg = Postgres::private(&pg_dir);
    let key = test_key();
    let mut n = Node::new(t.path(), "node-a", &key, &[], Some(pg.url()));
    n.start("api");
    let alice = create_user(&n, "alice", false);
    let mut c = user_client(&alice);
    c.call("app.create", json!({"name": "steady"})).unwrap();
    for i in 0..5 {
        c.call(
            "config.set",
            json!({"app": "steady", "vars": {format!("K{i}"): format!("v{i}")}}),
        )
        .unwrap();
    }
    pg.stop();
    c.set_timeout(Duration::from_secs(2));
    let e = c
        .call(
            "config.set",
            json!({"app": "steady", "vars": {"DOWN": "1"}}),
        )
        .unwrap_err();
    assert!(
        matches!(e.code(), Some(Code::Unavailable) | None),
        "not unavailable (or no answer) while the database is down: {e}"
    );
    pg.restart(&t.path().join("logs/postgres2.log"));
    c.set_timeout(Duration::from_secs(5));
    let config = eventually(Duration::from_secs(20), "the api serving again", || {
        c.call("config.get", json!({"app": "steady"})).ok()
    });
    let want: Value = (0..5)
        .map(|i| (format!("K{i}"), json!(format!("v{i}"))))
        .collect::<serde_json::Map<_, _>>()
        .into();
    assert_eq!(
        config["config"], want,
        "acknowledged changes after the restart"
    );
    let r = c
        .call(
            "config.set",
            json!({"app": "steady", "vars": {"AFTER": "1"}}),
        )
        .unwrap();
    // v1 (created) and five changes made v6; the refused change made none.
    assert_eq!(r["release"]["version"], 7, "{r}");
}

/// A change whose reply was lost when the api died is resent with the same id
/// and signature (as every client does): the restarted api, whose replay cache
/// is empty, answers `replay` from the audit log instead of making it twice.
#[test]
fn a_change_resent_after_the_api_restarted_is_not_made_twice() {
    let t = TestDir::new("api-resend");
    let pg = Postgres::start(t.path());
    let key = test_key();
    let mut n = Node::new(t.path(), "node-a", &key, &[], Some(pg.url()));
    n.start("api");
    let alice = create_user(&n, "alice", false);
    let mut c = user_client(&alice);
    c.call("app.create", json!({"name": "once"})).unwrap();
    let keys = paddock_wire::Keyring::from_hex(
        [(alice.key_id.as_str(), alice.secret.expose())],
        &alice.key_id,
    )
    .unwrap();
    let env = Envelope::new(
        "user:alice",
        "config.set",
        json!({"app": "once", "vars": {"A": "1"}}),
    );
    let (payload, sig) = env.sign(&keys);
    let first = c.call_signed(&env.id, &payload, sig.as_bytes()).unwrap();
    assert_eq!(first.body["ok"], true, "{}", first.body);
    assert_eq!(first.body["release"]["version"], 2);
    n.kill9("api");
    n.start("api");
    // Until it has migrated, the restarted api answers `unavailable` (nothing
    // done, the id forgotten), so the same bytes are sent again.
    let again = eventually(Duration::from_secs(10), "the restarted api", || {
        user_client(&alice)
            .call_signed(&env.id, &payload, sig.as_bytes())
            .ok()
            .filter(|r| r.body["error"]["code"] != "unavailable")
    });
    assert_eq!(again.body["ok"], false, "acted on twice: {}", again.body);
    assert_eq!(again.body["error"]["code"], "replay", "{}", again.body);
    let releases = user_client(&alice)
        .call("release.list", json!({"app": "once"}))
        .unwrap();
    assert_eq!(
        releases["releases"].as_array().unwrap().len(),
        2,
        "{releases}"
    );
}
