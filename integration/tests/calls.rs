//! Daemon-to-daemon calls through the BaseDaemon's outgoing client, driven end to end
//! through a real daemon process (`paddock-caller`, a test daemon whose `test.*` kinds
//! forward to `ctx.calls()`): discovery through the heartbeat registry preferring
//! this node, a call surviving its callee's kill -9 and restart, clear errors for
//! dead and silent endpoints, and registry events on a subscription.

use std::time::Duration;

use paddock_integration::*;
use paddock_wire::Client;
use serde_json::{json, Value};

fn ask(c: &mut Client, kind: &str, body: Value) -> Value {
    c.call(kind, body)
        .unwrap_or_else(|e| panic!("{kind} to the caller daemon: {e}"))
}

fn ports(n: &Node) -> Vec<u16> {
    let p = n.ports;
    vec![
        p.heartbeat_rpc,
        p.heartbeat_pull,
        p.heartbeat_pub,
        p.locker_rpc,
        p.runner_rpc,
        p.runner_pub,
    ]
}

/// Like `Node::add_daemon`, but never on a port another node of the test was given:
/// each node's ports are free when picked and released after, so a later pick may
/// return one of them.
fn add_daemon(n: &mut Node, daemon: &str, taken: &mut Vec<u16>) {
    let port = loop {
        let p = free_port().unwrap();
        if !taken.contains(&p) {
            break p;
        }
    };
    taken.push(port);
    let section = paddock_config::DaemonSection {
        rpc: tcp(port),
        ..Default::default()
    };
    n.file.daemons.insert(daemon.to_string(), section);
    n.save();
}

/// Nodes of one cluster whose ports do not overlap.
fn nodes(t: &TestDir, names: &[&str]) -> (Vec<Node>, Vec<u16>) {
    let key = test_key();
    let mut out: Vec<Node> = Vec::new();
    let mut taken = Vec::new();
    for name in names {
        let n = loop {
            let n = Node::new(t.path(), name, &key, &[], None);
            if !ports(&n).iter().any(|p| taken.contains(p)) {
                break n;
            }
        };
        taken.extend(ports(&n));
        out.push(n);
    }
    (out, taken)
}

/// Two nodes, each with a heartbeat and a caller, beating to both heartbeats and
/// listing both as registries.
fn pair(t: &TestDir) -> (Node, Node) {
    let (mut ns, mut taken) = nodes(t, &["node-a", "node-b"]);
    let mut b = ns.pop().unwrap();
    let mut a = ns.pop().unwrap();
    let pulls = vec![tcp(a.ports.heartbeat_pull), tcp(b.ports.heartbeat_pull)];
    let registries = vec![a.rpc("heartbeat"), b.rpc("heartbeat")];
    for n in [&mut a, &mut b] {
        n.file.cluster.heartbeats = pulls.clone();
        n.file.cluster.registries = registries.clone();
        add_daemon(n, "caller", &mut taken);
    }
    (a, b)
}

fn find(c: &mut Client, daemon: &str) -> Vec<String> {
    let v = ask(c, "test.find", json!({"daemon": daemon}));
    serde_json::from_value(v["endpoints"].clone()).unwrap_or_default()
}

/// `call_daemon(daemon, "ping")` from a caller: the answering node, or the error.
fn ping_daemon(c: &mut Client, daemon: &str) -> Result<String, Value> {
    let v = ask(
        c,
        "test.call_daemon",
        json!({"daemon": daemon, "kind": "ping", "timeout_ms": 500}),
    );
    match v["reply"]["node"].as_str() {
        Some(n) => Ok(n.to_string()),
        None => Err(v["error"].clone()),
    }
}

#[test]
fn a_call_found_through_the_registry_is_answered_by_this_nodes_instance_first() {
    let t = TestDir::new("calls-find");
    let (mut a, mut b) = pair(&t);
    a.start("heartbeat");
    b.start("heartbeat");
    a.start("caller");
    b.start("caller");
    let mut ca = a.client("caller");
    let mut cb = b.client("caller");
    let (hb_a, hb_b) = (a.rpc("heartbeat"), b.rpc("heartbeat"));

    // Both heartbeats are found, this node's first, from either side.
    let found = eventually(Duration::from_secs(10), "both heartbeats found", || {
        Some(find(&mut ca, "heartbeat")).filter(|f| f.len() == 2)
    });
    assert_eq!(found, [hb_a.clone(), hb_b.clone()]);
    let found = eventually(Duration::from_secs(10), "both heartbeats found", || {
        Some(find(&mut cb, "heartbeat")).filter(|f| f.len() == 2)
    });
    assert_eq!(found, [hb_b.clone(), hb_a.clone()]);

    // A call by daemon name goes to this node's own instance.
    assert_eq!(ping_daemon(&mut ca, "heartbeat"), Ok("node-a".into()));
    assert_eq!(ping_daemon(&mut cb, "heartbeat"), Ok("node-b".into()));
    // The callers find each other too (each beat reached both registries).
    assert_eq!(ping_daemon(&mut ca, "caller"), Ok("node-a".into()));

    // A daemon nobody runs: a clear error, not a hang.
    let err = ping_daemon(&mut ca, "gitserver").unwrap_err();
    assert_eq!(err["variant"], "find", "{err}");
    assert!(
        err["message"]
            .as_str()
            .unwrap()
            .contains("no alive gitserver"),
        "{err}"
    );

    // node-a's heartbeat dies: node-a's caller learns it from node-b's heartbeat
    // (its registry.down event, or the next listing) and calls node-b's instead.
    a.kill9("heartbeat");
    eventually(
        Duration::from_secs(10),
        "node-a's caller to use node-b's heartbeat",
        || (ping_daemon(&mut ca, "heartbeat") == Ok("node-b".into())).then_some(()),
    );
    assert_eq!(find(&mut ca, "heartbeat"), [hb_b]);
}

/// Requests the daemon behind `c` has taken beyond `base` and our own `polls` stats
/// calls (each counted when it arrives).
fn others_since(c: &mut Client, base: u64, polls: u64) -> u64 {
    let s = c.call("stats", json!({})).expect("stats");
    s["requests"].as_u64().unwrap() - base - polls
}

#[test]
fn a_call_survives_its_callee_kill9_and_restart_by_resending() {
    let t = TestDir::new("calls-resend");
    let (mut ns, mut taken) = nodes(&t, &["node-a", "node-b"]);
    let mut b = ns.pop().unwrap();
    let mut a = ns.pop().unwrap();
    add_daemon(&mut a, "caller", &mut taken);
    add_daemon(&mut b, "testd", &mut taken);
    a.start("caller");
    b.start("testd");
    let callee = b.rpc("testd");
    let mut stats = b.client("testd");
    let base = stats.call("stats", json!({})).unwrap()["requests"]
        .as_u64()
        .unwrap();

    let (rpc, keys) = (a.rpc("caller"), a.keys.clone());
    let call = std::thread::spawn(move || {
        let mut c = Client::connect(&rpc, "user:test", keys)
            .unwrap()
            .with_timeout(Duration::from_secs(40));
        c.call(
            "test.call",
            json!({
                "endpoint": callee,
                "kind": "test.sleep",
                "body": {"ms": 1500},
                "timeout_ms": 30000,
            }),
        )
    });
    // The callee has the request and is sleeping on it: kill it before it answers.
    let mut polls = 0;
    eventually(
        Duration::from_secs(10),
        "the call to reach the callee",
        || {
            polls += 1;
            (others_since(&mut stats, base, polls) >= 1).then_some(())
        },
    );
    b.kill9("testd");
    b.start("testd");

    // The caller's resend (the same signed message) reaches the new incarnation,
    // which answers within the call's timeout.
    let v = call.join().unwrap().expect("test.call");
    assert_eq!(v["reply"]["slept_ms"], json!(1500), "{v}");
    let s = a.client("caller").call("stats", json!({})).unwrap();
    assert_eq!(s["calls_in_flight"], json!(0), "{s}");
}

#[test]
fn calls_to_dead_or_silent_endpoints_fail_clearly_and_logs_carry_the_kind() {
    let t = TestDir::new("calls-dead");
    let (mut ns, mut taken) = nodes(&t, &["node-a"]);
    let mut a = ns.pop().unwrap();
    add_daemon(&mut a, "caller", &mut taken);
    add_daemon(&mut a, "testd", &mut taken);
    a.start("caller");
    a.start("testd");
    let mut c = a.client("caller");

    // Nobody listens: not connected, naming the endpoint.
    let dead = tcp(free_port().unwrap());
    let v = ask(
        &mut c,
        "test.call",
        json!({"endpoint": dead, "kind": "ping", "timeout_ms": 500}),
    );
    assert_eq!(v["error"]["variant"], "not_connected", "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains(&dead) && msg.contains("is the daemon running"),
        "{msg}"
    );

    // Connected, but no answer in time: a timeout naming the endpoint.
    let slow = a.rpc("testd");
    let v = ask(
        &mut c,
        "test.call",
        json!({"endpoint": slow, "kind": "test.sleep", "body": {"ms": 3000}, "timeout_ms": 500}),
    );
    assert_eq!(v["error"]["variant"], "timeout", "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains(&slow) && msg.contains("no reply"), "{msg}");

    // What a handler logs carries the request's kind and sender from the
    // dispatcher's span, without the handler writing them.
    let log = std::fs::read_to_string(a.log("caller")).unwrap();
    let line = log
        .lines()
        .find(|l| l.contains("forwarding test.sleep"))
        .unwrap_or_else(|| panic!("no forwarding line in:\n{log}"));
    assert!(
        line.contains("kind=test.call") && line.contains(r#"from="user:test""#),
        "{line}"
    );
}

#[test]
fn a_subscription_receives_registry_up_for_a_starting_daemon() {
    let t = TestDir::new("calls-sub");
    let (mut ns, mut taken) = nodes(&t, &["node-a"]);
    let mut a = ns.pop().unwrap();
    add_daemon(&mut a, "caller", &mut taken);
    add_daemon(&mut a, "testd", &mut taken);
    a.start("heartbeat");
    a.start("caller");
    let mut c = a.client("caller");
    ask(
        &mut c,
        "test.subscribe",
        json!({"endpoint": tcp(a.ports.heartbeat_pub), "prefix": "registry."}),
    );

    // PUB/SUB delivers nothing until the subscription has reached the publisher,
    // which has no signal of its own: (re)start the daemon until one start's
    // registry.up arrives.
    let up = eventually(Duration::from_secs(20), "registry.up for testd", || {
        a.kill9("testd");
        a.start("testd");
        let incarnation = a.client("testd").call("ping", json!({})).unwrap()["incarnation"]
            .as_str()
            .unwrap()
            .to_string();
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while std::time::Instant::now() < deadline {
            let v = ask(&mut c, "test.events", json!({}));
            let hit = v["events"].as_array().unwrap().iter().find(|e| {
                e["kind"] == "registry.up"
                    && e["body"]["daemon"] == "testd"
                    && e["body"]["incarnation"] == incarnation.as_str()
            });
            if let Some(e) = hit {
                return Some(e.clone());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    });
    assert_eq!(up["from"], "heartbeat@node-a", "{up}");
    assert_eq!(up["body"]["state"], "alive", "{up}");
    assert_eq!(up["body"]["node"], "node-a", "{up}");
}
