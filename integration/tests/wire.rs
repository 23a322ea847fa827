//! The wire contract against real daemons: signed round trips, every rejection code
//! (with the daemon still serving after each), resends answered once, client recovery
//! across `kill -9`, key rotation by SIGHUP, exit codes.

use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::Signal;
use paddock_integration::*;
use paddock_wire::kinds::Pong;
use paddock_wire::{Client, ClientError, Code, Credentials, Envelope, Keyring};
use serde_json::json;

fn ping_ok(c: &mut Client) -> Pong {
    serde_json::from_value(c.call("ping", json!({})).expect("ping answered")).unwrap()
}

fn remote_code(r: Result<Envelope, ClientError>) -> (Code, Envelope) {
    match r {
        Ok(env) => {
            let e = paddock_wire::WireError::from_body(&env.body).expect("an error body");
            (e.code, env)
        }
        Err(e) => panic!("expected a signed error reply, got {e}"),
    }
}

fn unsigned_code(r: Result<Envelope, ClientError>) -> Code {
    match r {
        Err(ClientError::Remote(e)) => e.code,
        other => panic!("expected an unsigned error, got {other:?}"),
    }
}

#[test]
fn signed_ping_round_trip_on_each_daemon() {
    let t = TestDir::new("ping");
    let pg = Postgres::start(t.path());
    let key = test_key();
    let mut n = Node::new(t.path(), "node-a", &key, &[], Some(pg.url()));
    n.start("heartbeat");
    n.start("locker");
    for d in ["heartbeat", "locker"] {
        let mut c = n.client(d);
        let p = ping_ok(&mut c);
        assert_eq!(p.daemon, d);
        assert_eq!(p.node, "node-a");
        assert_eq!(p.version, env!("CARGO_PKG_VERSION"));
        assert!(p.incarnation.len() >= 16);
        // The raw reply is signed by the cluster key and answers our id.
        let env = Envelope::new("user:test", "ping", json!({}));
        let (payload, sig) = env.sign(&n.keys);
        let reply = c.call_signed(&env.id, &payload, sig.as_bytes()).unwrap();
        assert_eq!(reply.re.as_deref(), Some(env.id.as_str()));
        assert_eq!(reply.kind, "ping");
        assert_eq!(reply.from, format!("{d}@node-a"));
        assert!(reply.is_ok());
    }
    let err = n
        .client("heartbeat")
        .call("no.such.kind", json!({}))
        .unwrap_err();
    assert_eq!(err.code(), Some(&Code::UnknownKind), "{err}");
}

#[test]
fn every_rejection_code_and_the_daemon_keeps_serving() {
    let t = TestDir::new("reject");
    let key = test_key();
    let mut n = Node::new(t.path(), "node-a", &key, &[], None);
    n.start("heartbeat");
    let mut c = n.client("heartbeat");
    let keys = n.keys.clone();

    // bad_signature: a payload changed after signing; the reply is unsigned.
    let env = Envelope::new("user:test", "ping", json!({}));
    let (mut payload, sig) = env.sign(&keys);
    let last = payload.len() - 2;
    payload[last] = b' ';
    assert_eq!(
        unsigned_code(c.call_signed(&env.id, &payload, sig.as_bytes())),
        Code::BadSignature
    );
    ping_ok(&mut c);

    // unknown_key
    let other = Keyring::from_hex(
        [(
            "stranger",
            paddock_wire::keyring::generate_secret_hex().as_str(),
        )],
        "stranger",
    )
    .unwrap();
    let env = Envelope::new("user:test", "ping", json!({}));
    let (payload, sig) = env.sign(&other);
    assert_eq!(
        unsigned_code(c.call_signed(&env.id, &payload, sig.as_bytes())),
        Code::UnknownKey
    );
    ping_ok(&mut c);

    // too_large: over the default 1 MiB
    let env = Envelope::new("user:test", "ping", json!({"pad": "x".repeat(1_100_000)}));
    let (payload, sig) = env.sign(&keys);
    assert_eq!(
        unsigned_code(c.call_frames(None, &[&payload, sig.as_bytes()])),
        Code::TooLarge
    );
    ping_ok(&mut c);

    // malformed: wrong frame count (unsigned), then a signed non-JSON payload (signed)
    assert_eq!(
        unsigned_code(c.call_frames(None, &[b"just one frame"])),
        Code::Malformed
    );
    assert_eq!(
        unsigned_code(c.call_frames(None, &[b"{}", b"no-colon"])),
        Code::Malformed
    );
    let junk = b"{\"v\":1,\"id\":";
    let sig = keys.sign(junk);
    // After authentication the refusal is signed (the client verified it).
    let (code, _) = remote_code(c.call_frames(None, &[junk, sig.as_bytes()]));
    assert_eq!(code, Code::Malformed);
    ping_ok(&mut c);

    // unsupported_version
    let mut env = Envelope::new("user:test", "ping", json!({}));
    env.v = 2;
    let (payload, sig) = env.sign(&keys);
    let (code, _) = remote_code(c.call_signed(&env.id, &payload, sig.as_bytes()));
    assert_eq!(code, Code::UnsupportedVersion);

    // stale: 60 s in the past, and 60 s in the future
    for shift in [-60_000i64, 60_000] {
        let mut env = Envelope::new("user:test", "ping", json!({}));
        env.ts += shift;
        let (payload, sig) = env.sign(&keys);
        let (code, reply) = remote_code(c.call_signed(&env.id, &payload, sig.as_bytes()));
        assert_eq!(code, Code::Stale);
        assert_eq!(reply.re.as_deref(), Some(env.id.as_str()));
    }
    ping_ok(&mut c);

    // A resend of an answered request gets the very same reply (not acted on twice).
    let env = Envelope::new("user:test", "ping", json!({}));
    let (payload, sig) = env.sign(&keys);
    let first = c.call_signed(&env.id, &payload, sig.as_bytes()).unwrap();
    let again = c.call_signed(&env.id, &payload, sig.as_bytes()).unwrap();
    assert_eq!(first, again, "the cached reply is sent again");

    // The daemon counted each rejection.
    let stats = c.call("stats", json!({})).unwrap();
    let rejected = &stats["rejected"];
    for code in [
        "bad_signature",
        "unknown_key",
        "too_large",
        "malformed",
        "unsupported_version",
        "stale",
    ] {
        assert!(
            rejected[code].as_u64().unwrap_or(0) >= 1,
            "{code} not counted: {stats}"
        );
    }
    // Rejections are WARN, never ERROR.
    let log = std::fs::read_to_string(n.log("heartbeat")).unwrap();
    assert!(log.contains("WARN"), "rejections are logged at WARN");
    assert!(
        !log.contains("ERROR"),
        "no ERROR lines for rejected input:\n{log}"
    );
}

#[test]
fn replay_of_a_request_still_in_flight_is_refused() {
    let t = TestDir::new("replay");
    let pg = Postgres::start(t.path());
    let key = test_key();
    let mut n = Node::new(t.path(), "node-a", &key, &[], Some(pg.url()));
    n.start("locker");
    let mut c = n.client("locker");
    c.call(
        "lock.acquire",
        json!({"name": "r", "owner": "a", "ttl_ms": 60_000}),
    )
    .unwrap();
    // B waits 1.5 s for the held lock; the same frames sent meanwhile are a replay.
    let env = Envelope::new(
        "user:test",
        "lock.acquire",
        json!({"name": "r", "owner": "b", "ttl_ms": 1000, "wait_ms": 1500}),
    );
    let (payload, sig) = env.sign(&n.keys);
    let (p2, s2) = (payload.clone(), sig.clone());
    let rpc = n.rpc("locker");
    let keys = n.keys.clone();
    let waiter = std::thread::spawn(move || {
        let mut c = Client::connect(&rpc, "user:test", keys)
            .unwrap()
            .with_timeout(Duration::from_secs(5))
            .with_resend_every(Duration::from_secs(5));
        c.call_signed(&env.id, &payload, sig.as_bytes())
    });
    std::thread::sleep(Duration::from_millis(300));
    let mut other = n.client("locker");
    let (code, _) = remote_code(other.call_frames(None, &[&p2, s2.as_bytes()]));
    assert_eq!(code, Code::Replay);
    let (code, _) = remote_code(waiter.join().unwrap());
    assert_eq!(code, Code::Held, "the first copy is still answered");
}

#[test]
fn client_recovers_after_kill_9_and_restart_on_the_same_port() {
    let t = TestDir::new("recover");
    let key = test_key();
    let mut n = Node::new(t.path(), "node-a", &key, &[], None);
    n.start("heartbeat");
    let mut c = n.client("heartbeat");
    let before = ping_ok(&mut c);
    n.kill9("heartbeat");
    c.set_timeout(Duration::from_millis(1500));
    let err = c.call("ping", json!({})).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(
            err,
            ClientError::NotConnected { .. } | ClientError::Timeout { .. }
        ),
        "{msg}"
    );
    assert!(
        msg.contains(&n.rpc("heartbeat")),
        "the error names the endpoint: {msg}"
    );
    n.spawn("heartbeat");
    // The same client object, no reconnect by the caller.
    c.set_timeout(Duration::from_secs(10));
    let after = ping_ok(&mut c);
    assert_ne!(
        before.incarnation, after.incarnation,
        "a new process answered"
    );
}

#[test]
fn sighup_rotates_keys_without_a_restart() {
    let t = TestDir::new("rotate");
    let key = test_key();
    let mut n = Node::new(t.path(), "node-a", &key, &[], None);
    n.start("heartbeat");
    let old_keys = n.keys.clone();
    let pid = n.pid("heartbeat");

    let new_secret = paddock_wire::keyring::generate_secret_hex();
    n.file
        .keys
        .insert("cluster-2".into(), new_secret.clone().into());
    n.file.signing_key = "cluster-2".into();
    n.save();
    n.signal("heartbeat", Signal::SIGHUP);
    let new_only = Credentials::new(
        Arc::new(Keyring::from_hex([("cluster-2", new_secret.as_str())], "cluster-2").unwrap()),
        n.keys.curve.clone(),
    );
    let rpc = n.rpc("heartbeat");
    // New-key clients are accepted once the reload happened, and replies are signed
    // with the new signing key.
    eventually(Duration::from_secs(5), "the new key to be accepted", || {
        let mut c = Client::connect(&rpc, "user:test", new_only.clone())
            .unwrap()
            .with_timeout(Duration::from_millis(500));
        c.call("ping", json!({})).ok()
    });
    // Old-key clients still work during rotation (both keys are in the keyring) but
    // cannot verify replies signed with the new key: they see a clear protocol error.
    let mut both = n.client("heartbeat");
    ping_ok(&mut both);
    let mut old = Client::connect(&rpc, "user:test", old_keys)
        .unwrap()
        .with_timeout(Duration::from_secs(2));
    let err = old.call("ping", json!({})).unwrap_err();
    assert!(matches!(err, ClientError::Protocol { .. }), "{err}");
    assert_eq!(n.pid("heartbeat"), pid, "no restart");

    // Removing the old key: its messages are now unknown_key.
    n.file.keys.remove("cluster-1");
    n.save();
    n.signal("heartbeat", Signal::SIGHUP);
    let old_only = Credentials::new(
        Arc::new(Keyring::from_hex([("cluster-1", key.1.as_str())], "cluster-1").unwrap()),
        n.keys.curve.clone(),
    );
    eventually(Duration::from_secs(5), "the old key to be refused", || {
        let mut c = Client::connect(&rpc, "user:test", old_only.clone())
            .unwrap()
            .with_timeout(Duration::from_millis(500));
        match c.call("ping", json!({})) {
            Err(ClientError::Remote(e)) if e.code == Code::UnknownKey => Some(()),
            _ => None,
        }
    });
}

#[test]
fn sigterm_exits_zero_and_a_bad_config_exits_78() {
    let t = TestDir::new("exit");
    let key = test_key();
    let mut n = Node::new(t.path(), "node-a", &key, &[], None);
    n.start("heartbeat");
    n.signal("heartbeat", Signal::SIGTERM);
    assert_eq!(n.wait_exit("heartbeat", Duration::from_secs(10)), Some(0));

    // A locker without a [database] table: exit 78 (EX_CONFIG) before binding. The
    // test holds the rpc port itself: a daemon that bound before checking its config
    // would fail on the taken port instead (exit 71, EX_OSERR) and say so.
    let held = std::net::TcpListener::bind(("127.0.0.1", n.ports.locker_rpc)).unwrap();
    n.spawn("locker");
    assert_eq!(n.wait_exit("locker", Duration::from_secs(10)), Some(78));
    let log = std::fs::read_to_string(n.log("locker")).unwrap();
    assert!(
        log.contains("database.url"),
        "the error names the key:\n{log}"
    );
    assert!(!log.contains("cannot bind"), "{log}");
    drop(held);

    // A cluster file readable by others is refused the same way, every port of
    // the heartbeat held so that binding any of them first would show.
    use std::os::unix::fs::PermissionsExt;
    let held: Vec<std::net::TcpListener> = [
        n.ports.heartbeat_rpc,
        n.ports.heartbeat_pull,
        n.ports.heartbeat_pub,
    ]
    .into_iter()
    .map(|p| std::net::TcpListener::bind(("127.0.0.1", p)).unwrap())
    .collect();
    std::fs::set_permissions(&n.config, std::fs::Permissions::from_mode(0o644)).unwrap();
    n.spawn("heartbeat");
    assert_eq!(n.wait_exit("heartbeat", Duration::from_secs(10)), Some(78));
    let log = std::fs::read_to_string(n.log("heartbeat")).unwrap();
    assert!(!log.contains("cannot bind"), "{log}");
    drop(held);
}

#[test]
fn a_second_daemon_of_a_kind_on_one_state_dir_is_refused() {
    let t = TestDir::new("pidlock");
    let key = test_key();
    let mut n = Node::new(t.path(), "node-a", &key, &[], None);
    n.start("heartbeat");
    let first = n.pid("heartbeat");
    let log = n.log("heartbeat");
    let mut second = paddock_harness::spawn_daemon("heartbeat", &n.config, &log).unwrap();
    let st = second.wait().unwrap();
    assert_eq!(st.code(), Some(69), "EX_UNAVAILABLE");
    assert_eq!(n.pid("heartbeat"), first);
    ping_ok(&mut n.client("heartbeat"));
}

/// The control for `sigterm_exits_zero_and_a_bad_config_exits_78`: the same
/// daemons with a *valid* config reach
/// their bind, and each held port (every one the heartbeat binds, the locker's
/// rpc) makes that a different exit (71, EX_OSERR) and a "cannot bind" line. So a
/// daemon that bound before checking its config could not pass that test (checked
/// once by moving a bind ahead of the config check in paddock-daemon: it failed).
#[test]
fn a_daemon_binding_first_would_be_caught_by_the_held_port() {
    let t = TestDir::new("held");
    let key = test_key();
    // Never reached: the locker binds before it connects.
    let db = "host=127.0.0.1 port=1 user=paddock password=x dbname=paddock".to_string();
    let mut n = Node::new(t.path(), "node-a", &key, &[], Some(db));
    let cases = [
        ("heartbeat", n.ports.heartbeat_rpc),
        ("heartbeat", n.ports.heartbeat_pull),
        ("heartbeat", n.ports.heartbeat_pub),
        ("locker", n.ports.locker_rpc),
    ];
    for (daemon, port) in cases {
        let _ = std::fs::remove_file(n.log(daemon));
        let held = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
        n.spawn(daemon);
        assert_eq!(
            n.wait_exit(daemon, Duration::from_secs(10)),
            Some(71),
            "{daemon} with port {port} held"
        );
        let log = std::fs::read_to_string(n.log(daemon)).unwrap();
        assert!(
            log.contains("cannot bind") && log.contains(&port.to_string()),
            "{log}"
        );
        drop(held);
    }
}

/// Credentials with the cluster's HMAC key but CURVE client keys of their own.
fn stranger_keys(n: &Node) -> (Credentials, paddock_harness::CurvePair) {
    let pair = paddock_harness::CurvePair::generate().unwrap();
    let mut curve = n.keys.curve.clone().expect("a CURVE cluster");
    curve.public = paddock_wire::curve::Key::from_z85(&pair.public).unwrap();
    curve.secret = paddock_wire::curve::Key::from_z85(&pair.secret).unwrap();
    (Credentials::new(n.keys.keys.clone(), Some(curve)), pair)
}

#[test]
fn under_curve_strangers_cannot_connect_and_sighup_admits_a_new_client_key() {
    let t = TestDir::new("curve");
    let key = test_key();
    let mut n = Node::new(t.path(), "node-a", &key, &[], None);
    n.start("heartbeat");
    let rpc = n.rpc("heartbeat");
    let short = Duration::from_millis(700);

    // Even with the cluster's HMAC key, a client whose CURVE key is not admitted
    // never completes the handshake, and a plaintext client never either.
    let (stranger, pair) = stranger_keys(&n);
    let err = Client::connect(&rpc, "user:test", stranger.clone())
        .unwrap()
        .with_timeout(short)
        .call("ping", json!({}))
        .unwrap_err();
    assert!(matches!(err, ClientError::NotConnected { .. }), "{err}");
    let plain = Credentials::new(n.keys.keys.clone(), None);
    let err = Client::connect(&rpc, "user:test", plain)
        .unwrap()
        .with_timeout(short)
        .call("ping", json!({}))
        .unwrap_err();
    assert!(matches!(err, ClientError::NotConnected { .. }), "{err}");
    // The daemon keeps serving admitted clients, and said what it refused.
    ping_ok(&mut n.client("heartbeat"));
    let log = std::fs::read_to_string(n.log("heartbeat")).unwrap();
    assert!(log.contains("client key is not admitted"), "{log}");
    assert!(
        log.contains(&pair.public),
        "the refused key is named:\n{log}"
    );
    assert!(!log.contains(&pair.secret));

    // Admitting the stranger's public key and SIGHUP: it connects, no restart.
    let pid = n.pid("heartbeat");
    n.file
        .curve
        .as_mut()
        .unwrap()
        .clients
        .insert("laptop".into(), pair.public.clone());
    n.save();
    n.signal("heartbeat", Signal::SIGHUP);
    eventually(
        Duration::from_secs(5),
        "the new client key to be admitted",
        || {
            Client::connect(&rpc, "user:test", stranger.clone())
                .unwrap()
                .with_timeout(short)
                .call("ping", json!({}))
                .ok()
        },
    );
    assert_eq!(n.pid("heartbeat"), pid);
}

#[test]
fn a_plaintext_cluster_file_still_runs_and_says_so_at_warn() {
    let t = TestDir::new("plaintext");
    let key = plaintext_test_key();
    let mut n = Node::new(t.path(), "node-a", &key, &[], None);
    n.start("heartbeat");
    ping_ok(&mut n.client("heartbeat"));
    let log = std::fs::read_to_string(n.log("heartbeat")).unwrap();
    assert!(log.contains("WARN") && log.contains("PLAINTEXT"), "{log}");
}

#[test]
fn an_outside_pyzmq_client_with_the_right_keys_gets_a_signed_pong() {
    let t = TestDir::new("pyzmq");
    let key = test_key();
    let mut n = Node::new(t.path(), "node-a", &key, &[], None);
    n.start("heartbeat");
    let curve = n.file.curve.clone().unwrap();
    // Only Debian's python3 has Debian's python3-zmq (ops/install-deps.sh).
    let script = r#"
import hashlib, hmac, json, os, sys, time, uuid, zmq
ctx = zmq.Context()
s = ctx.socket(zmq.DEALER)
s.curve_serverkey = os.environ["SERVER_PUBLIC"].encode()
s.curve_publickey = os.environ["CLIENT_PUBLIC"].encode()
s.curve_secretkey = os.environ["CLIENT_SECRET"].encode()
s.connect(os.environ["RPC"])
payload = json.dumps({"v": 1, "id": uuid.uuid4().hex, "ts": int(time.time() * 1000),
                      "from": "user:probe", "kind": "ping", "body": {}}).encode()
secret = bytes.fromhex(os.environ["KEY_HEX"])
sig = os.environ["KEY_ID"] + ":" + hmac.new(secret, payload, hashlib.sha256).hexdigest()
s.send_multipart([payload, sig.encode()])
if not s.poll(5000):
    sys.exit("no reply")
reply, rsig = s.recv_multipart()
kid, tag = rsig.decode().split(":")
assert hmac.compare_digest(tag, hmac.new(secret, reply, hashlib.sha256).hexdigest()), "bad reply signature"
body = json.loads(reply)["body"]
print(json.dumps(body))
"#;
    let out = std::process::Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(script)
        .env("SERVER_PUBLIC", &curve.server_public)
        .env("CLIENT_PUBLIC", &curve.client_public)
        .env("CLIENT_SECRET", curve.client_secret.expose())
        .env("RPC", n.rpc("heartbeat"))
        .env("KEY_ID", &key.0)
        .env("KEY_HEX", &key.1)
        .output()
        .expect("/usr/bin/python3 runs");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let body: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(body["ok"], json!(true), "{body}");
    assert_eq!(body["daemon"], json!("heartbeat"));
}

#[test]
fn a_stranger_cannot_write_lines_into_the_log() {
    let t = TestDir::new("loginject");
    let key = test_key();
    let mut n = Node::new(t.path(), "node-a", &key, &[], None);
    n.start("heartbeat");
    let mut c = n.client("heartbeat");
    let env = Envelope::new("user:test", "ping", json!({}));
    let payload = env.to_bytes();
    let sig = b"x\r\nFORGED ERROR paddock accounts wiped:00";
    let _ = c.call_frames(Some(&env.id), &[&payload, &sig[..]]);
    ping_ok(&mut c);
    let log = std::fs::read_to_string(n.log("heartbeat")).unwrap();
    assert!(
        log.contains("FORGED ERROR"),
        "the rejection was logged:\n{log}"
    );
    assert!(
        !log.lines().any(|l| l.starts_with("FORGED")),
        "a stranger wrote a line of their own into the log:\n{log}"
    );
}
