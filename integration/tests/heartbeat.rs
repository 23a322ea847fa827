//! The heartbeat registry against real processes: liveness of a stopped or killed
//! daemon, events on the PUB socket, two heartbeats agreeing, rebuilding after restart.

use std::time::Duration;

use nix::sys::signal::Signal;
use paddock_integration::*;
use paddock_wire::kinds::{Service, ServiceList, ServiceState};
use paddock_wire::{Client, Subscriber};
use serde_json::json;

fn list(c: &mut Client) -> Vec<Service> {
    let v = c.call("registry.list", json!({})).expect("registry.list");
    serde_json::from_value::<ServiceList>(v).unwrap().services
}

/// The newest entry for `daemon` on `node`.
fn state_of(c: &mut Client, daemon: &str, node: &str) -> Option<(String, ServiceState)> {
    list(c)
        .into_iter()
        .filter(|s| s.daemon == daemon && s.node == node)
        .max_by_key(|s| s.last_seen)
        .map(|s| (s.incarnation, s.state))
}

#[test]
fn stopped_and_killed_daemons_go_suspect_then_dead_and_come_back() {
    let t = TestDir::new("liveness");
    let pg = Postgres::start(t.path());
    let key = test_key();
    let mut n = Node::new(t.path(), "node-a", &key, &[], Some(pg.url()));
    n.start("heartbeat");
    let pub_ep = tcp(n.ports.heartbeat_pub);
    let mut sub = Subscriber::connect(&[pub_ep], &["registry."], n.keys.clone()).unwrap();
    n.start("locker");
    let mut hb = n.client("heartbeat");
    let (inst, _) = eventually(Duration::from_secs(5), "locker alive", || {
        state_of(&mut hb, "locker", "node-a").filter(|(_, s)| *s == ServiceState::Alive)
    });

    // SIGSTOP: no beats. Interval 200 ms: suspect after 400 ms, dead after 600 ms.
    n.signal("locker", Signal::SIGSTOP);
    eventually(Duration::from_secs(3), "locker suspect", || {
        state_of(&mut hb, "locker", "node-a").filter(|(_, s)| *s == ServiceState::Suspect)
    });
    eventually(Duration::from_secs(3), "locker dead", || {
        state_of(&mut hb, "locker", "node-a").filter(|(_, s)| *s == ServiceState::Dead)
    });
    n.signal("locker", Signal::SIGCONT);
    let (again, _) = eventually(Duration::from_secs(3), "locker alive again", || {
        state_of(&mut hb, "locker", "node-a").filter(|(_, s)| *s == ServiceState::Alive)
    });
    assert_eq!(again, inst, "the same process came back");

    // The PUB socket told the story, signed, topic = kind.
    let mut seen = Vec::new();
    while let Some(ev) = sub.next(Duration::from_millis(300)).unwrap() {
        let s: Service = serde_json::from_value(ev.body.clone()).unwrap();
        if s.daemon == "locker" {
            seen.push((ev.kind.clone(), s.state));
        }
    }
    let want = [
        ("registry.up".to_string(), ServiceState::Alive),
        ("registry.down".to_string(), ServiceState::Suspect),
        ("registry.down".to_string(), ServiceState::Dead),
        ("registry.up".to_string(), ServiceState::Alive),
    ];
    assert_eq!(seen, want);

    // kill -9: dead within its timeout; a restart is alive under a new incarnation.
    n.kill9("locker");
    eventually(Duration::from_secs(3), "killed locker dead", || {
        state_of(&mut hb, "locker", "node-a").filter(|(_, s)| *s == ServiceState::Dead)
    });
    n.start("locker");
    let (fresh, _) = eventually(Duration::from_secs(3), "restarted locker alive", || {
        state_of(&mut hb, "locker", "node-a")
            .filter(|(i, s)| *s == ServiceState::Alive && *i != inst)
    });
    assert_ne!(fresh, inst);
}

#[test]
fn two_heartbeats_agree_and_a_restarted_one_rebuilds_its_view() {
    let t = TestDir::new("pair");
    let key = test_key();
    // Two nodes, each with a heartbeat; every daemon beats to both.
    let mut a = Node::new(t.path(), "node-a", &key, &[], None);
    let mut b = Node::new(t.path(), "node-b", &key, &[], None);
    let both = vec![tcp(a.ports.heartbeat_pull), tcp(b.ports.heartbeat_pull)];
    a.file.cluster.heartbeats = both.clone();
    b.file.cluster.heartbeats = both.clone();
    a.save();
    b.save();
    a.start("heartbeat");
    b.start("heartbeat");
    let mut ca = a.client("heartbeat");
    let mut cb = b.client("heartbeat");
    let view = |c: &mut Client| {
        let mut v: Vec<(String, String, String, ServiceState)> = list(c)
            .into_iter()
            .map(|s| (s.daemon, s.node, s.incarnation, s.state))
            .collect();
        v.sort();
        v
    };
    let agreed = eventually(Duration::from_secs(5), "both heartbeats see both", || {
        let (va, vb) = (view(&mut ca), view(&mut cb));
        (va.len() == 2 && va == vb && va.iter().all(|e| e.3 == ServiceState::Alive)).then_some(va)
    });
    assert_eq!(
        agreed.iter().map(|e| e.1.as_str()).collect::<Vec<_>>(),
        ["node-a", "node-b"]
    );

    // Restart b's heartbeat: its new view is rebuilt from beats alone and matches a's
    // (a sees the old b incarnation dead and the new one alive, and so does b).
    b.kill9("heartbeat");
    b.start("heartbeat");
    eventually(
        Duration::from_secs(5),
        "the restarted heartbeat to agree again",
        || {
            let va: Vec<_> = view(&mut ca)
                .into_iter()
                .filter(|e| e.3 == ServiceState::Alive)
                .collect();
            let vb: Vec<_> = view(&mut cb)
                .into_iter()
                .filter(|e| e.3 == ServiceState::Alive)
                .collect();
            (va.len() == 2 && va == vb).then_some(())
        },
    );
}

#[test]
fn forged_beats_are_ignored() {
    let t = TestDir::new("forged");
    let key = test_key();
    let mut n = Node::new(t.path(), "node-a", &key, &[], None);
    n.start("heartbeat");
    let pull = tcp(n.ports.heartbeat_pull);
    let stranger = std::sync::Arc::new(
        paddock_wire::Keyring::from_hex(
            [("x", paddock_wire::keyring::generate_secret_hex().as_str())],
            "x",
        )
        .unwrap(),
    );
    // A peer the transport admits (it has the node's CURVE keys) but without the
    // cluster's HMAC key: every message is refused at the signature check.
    let stranger = paddock_wire::Credentials::new(stranger, n.keys.curve.clone());
    let p = paddock_wire::Pusher::connect(&pull, "evil@x", stranger).unwrap();
    let beat = json!({"daemon": "evil", "node": "x", "incarnation": "0123456789abcdef", "endpoints": {}, "interval_ms": 100});
    for _ in 0..5 {
        p.push("heartbeat.beat", beat.clone()).unwrap();
    }
    p.push_frames(&[b"garbage"]).unwrap();
    let good = paddock_wire::Pusher::connect(&pull, "ok@y", n.keys.clone()).unwrap();
    let mut ok = beat.clone();
    ok["daemon"] = json!("probe");
    good.push("heartbeat.beat", ok).unwrap();
    let mut c = n.client("heartbeat");
    eventually(
        Duration::from_secs(5),
        "the signed beat to register",
        || {
            list(&mut c)
                .iter()
                .any(|s| s.daemon == "probe")
                .then_some(())
        },
    );
    assert!(
        !list(&mut c).iter().any(|s| s.daemon == "evil"),
        "forged beats must not register"
    );
    let stats = c.call("stats", json!({})).unwrap();
    assert!(
        stats["rejected"]["unknown_key"].as_u64().unwrap_or(0) >= 5,
        "{stats}"
    );
    assert!(
        stats["rejected"]["malformed"].as_u64().unwrap_or(0) >= 1,
        "{stats}"
    );
}
