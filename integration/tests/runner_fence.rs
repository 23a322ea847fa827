//! The runner's side of the scheduler (issue 10), with a real runner: callers'
//! instance ids (a resent start answers as the first did, another start under a
//! live id is `conflict`), fencing tokens (a smaller one is `stale_token` and
//! changes nothing; the largest is remembered across a `kill -9`), the fields a
//! scheduler reads (`addr`, `owner`, `token`, `release`, `up_at`), and
//! `runner.info`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use paddock_integration::api::{code, remote_err};
use paddock_integration::*;
use paddock_wire::kinds::{InstanceInfo, InstanceList, Owner, RunnerInfo};
use paddock_wire::{Client, Code, Subscriber};
use serde_json::{json, Value};

/// Fields drop in order: the node (its daemons and shims) before the directory.
struct Runner {
    node: Node,
    app_dir: PathBuf,
    c: Client,
    _t: TestDir,
}

/// A runner with these `[daemons.runner]` settings on top of a fast test policy.
fn runner(name: &str, settings: &[(&str, toml::Value)]) -> Runner {
    let t = TestDir::new(name);
    let mut node = Node::new(t.path(), "node-a", &test_key(), &[], None);
    {
        let r = node.file.daemons.get_mut("runner").unwrap();
        for (k, v) in [
            ("backoff_base_ms", 50),
            ("backoff_cap_ms", 400),
            ("health_interval_ms", 300),
            ("stop_grace_ms", 2000),
        ] {
            r.other.insert(k.into(), toml::Value::Integer(v));
        }
        for (k, v) in settings {
            r.other.insert(k.to_string(), v.clone());
        }
    }
    node.save();
    let app_dir = t.path().join("app");
    std::fs::create_dir_all(&app_dir).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/app.py"),
        app_dir.join("app.py"),
    )
    .unwrap();
    std::fs::set_permissions(
        app_dir.join("app.py"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    std::fs::set_permissions(&app_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    paddock_harness::allow_traverse(&app_dir).unwrap();
    paddock_harness::allow_traverse(&t.path().join("node-a")).unwrap();
    node.start("runner");
    let c = node.client("runner");
    Runner {
        node,
        app_dir,
        c,
        _t: t,
    }
}

impl Runner {
    /// The body of a start of the test app, with `extra` fields on top.
    fn body(&self, app: &str, extra: Value) -> Value {
        let mut body = json!({
            "app": app, "proc": "web", "dir": self.app_dir, "command": "python3 -u app.py",
            "health": {"http": "/"}, "limits": {"memory_mb": 256, "pids": 64},
        });
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    }

    fn list(&mut self) -> Vec<InstanceInfo> {
        let l: InstanceList =
            serde_json::from_value(self.c.call("instance.list", json!({})).unwrap()).unwrap();
        l.instances
    }

    fn info(&mut self, id: &str) -> InstanceInfo {
        self.list()
            .into_iter()
            .find(|i| i.id == id)
            .unwrap_or_else(|| panic!("{id} not listed"))
    }

    fn wait_state(&mut self, id: &str, state: &str) -> InstanceInfo {
        eventually(Duration::from_secs(20), &format!("{id} {state}"), || {
            Some(self.info(id)).filter(|i| i.state == state)
        })
    }

    fn runner_info(&mut self) -> RunnerInfo {
        serde_json::from_value(self.c.call("runner.info", json!({})).unwrap()).unwrap()
    }

    fn restart_runner(&mut self) {
        self.node.kill9("runner");
        self.node.start("runner");
        self.c = self.node.client("runner");
    }
}

fn serves(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = write!(s, "GET / HTTP/1.0\r\nHost: x\r\n\r\n");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.starts_with("HTTP/1.0 200")
}

#[test]
fn a_scheduler_start_is_listed_with_its_id_token_owner_and_address() {
    let mut r = runner(
        "rfence-list",
        &[("advertise", toml::Value::String("10.1.2.3".into()))],
    );
    r.node.start("heartbeat");
    let mut sub = Subscriber::connect(
        &[tcp(r.node.ports.runner_pub)],
        &["instance."],
        r.node.keys.clone(),
    )
    .unwrap();
    let id = "fxshop.web.v3.t5.1";
    let body = r.body(
        "fxshop",
        json!({"id": id, "token": 5, "owner": "scheduler", "limits": {"memory_mb": 200}}),
    );
    let v = r.c.call("instance.start", body).unwrap();
    assert_eq!(v["id"], id, "{v}");
    let port = v["port"].as_u64().unwrap() as u16;
    assert_eq!(v["addr"], format!("10.1.2.3:{port}"), "{v}");

    let i = r.wait_state(id, "up");
    assert_eq!(i.owner, Owner::Scheduler);
    assert_eq!(i.token, Some(5));
    assert_eq!(i.addr.as_deref(), Some(&*format!("10.1.2.3:{port}")));
    assert_eq!(i.release, None, "a dir-form instance runs no release");
    assert_eq!(i.memory_mb, Some(200));
    assert!(serves(port));

    // The up event carries the same fields.
    let up = eventually(Duration::from_secs(5), "instance.up", || {
        let ev = sub.next(Duration::from_millis(200)).unwrap()?;
        (ev.kind == "instance.up").then_some(ev.body)
    });
    assert_eq!(up["id"], id);
    assert_eq!(up["owner"], "scheduler");
    assert_eq!(up["token"], 5);
    assert_eq!(up["addr"], format!("10.1.2.3:{port}"));
    assert_eq!(up["release"], Value::Null);
    assert!(up["up_at"].as_i64().is_some(), "{up}");

    // An operator's start (no id, token or owner) is the operator's, unfenced.
    let v =
        r.c.call("instance.start", r.body("fxtools", json!({})))
            .unwrap();
    let op = v["id"].as_str().unwrap().to_string();
    assert!(op.starts_with("fxtools-web-"), "{op}");
    let i = r.info(&op);
    assert_eq!((i.owner, i.token), (Owner::Operator, None));

    // `paddock instance ps` shows who placed each, and the release column.
    let out = std::process::Command::new(paddock_harness::bin("paddock").unwrap())
        .args(["instance", "ps"])
        .env("PADDOCK_CONFIG", &r.node.config)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let ps = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(ps.contains("OWNER") && ps.contains("RELEASE"), "{ps}");
    let line = |id: &str| {
        ps.lines()
            .find(|l| l.contains(id))
            .unwrap_or("")
            .to_string()
    };
    assert!(line(id).contains("scheduler"), "{ps}");
    assert!(line(&op).contains("operator"), "{ps}");

    // Ids are checked: never a path of their own, never upper case.
    for bad in ["..", ".hidden", "Fxshop.web", "a/b", ""] {
        let e = remote_err(r.c.call(
            "instance.start",
            r.body("fxshop", json!({"id": bad, "token": 5})),
        ));
        assert_eq!(e.code, Code::Invalid, "{bad:?}: {e:?}");
    }
    let long = "x".repeat(101);
    assert_eq!(
        code(r.c.call("instance.start", r.body("fxshop", json!({"id": long})))),
        Code::Invalid
    );
}

#[test]
fn a_smaller_token_changes_nothing_and_the_largest_survives_a_kill_9() {
    let mut r = runner("rfence-token", &[]);
    assert_eq!(r.runner_info().max_token, None);
    let a = "fxshop.web.v1.t5.1";
    let v =
        r.c.call(
            "instance.start",
            r.body("fxshop", json!({"id": a, "token": 5, "owner": "scheduler"})),
        )
        .unwrap();
    let port = v["port"].as_u64().unwrap() as u16;
    let up = r.wait_state(a, "up");
    assert_eq!(r.runner_info().max_token, Some(5));

    // An older leader's stop, restart, reload and start: refused, nothing done.
    let e = remote_err(r.c.call("instance.stop", json!({"id": a, "token": 4})));
    assert_eq!(e.code, Code::StaleToken, "{e:?}");
    assert!(
        e.message.contains("a newer scheduler leads: token 4 < 5"),
        "{e:?}"
    );
    for kind in ["instance.restart", "instance.reload"] {
        assert_eq!(
            code(r.c.call(kind, json!({"id": a, "token": 4}))),
            Code::StaleToken,
            "{kind}"
        );
    }
    let b = "fxshop.web.v1.t4.1";
    assert_eq!(
        code(r.c.call(
            "instance.start",
            r.body("fxshop", json!({"id": b, "token": 4, "owner": "scheduler"}))
        )),
        Code::StaleToken
    );
    std::thread::sleep(Duration::from_millis(500));
    let i = r.info(a);
    assert_eq!((i.state.as_str(), i.pid), ("up", up.pid), "untouched");
    assert!(serves(port));
    assert!(r.list().iter().all(|i| i.id != b), "no instance {b}");
    assert_eq!(r.runner_info().max_token, Some(5));

    // A newer leader's stop is carried out, and its token recorded.
    let v =
        r.c.call("instance.stop", json!({"id": a, "token": 7}))
            .unwrap();
    assert_eq!(v["state"], "stopping");
    r.wait_state(a, "stopped");
    assert_eq!(r.runner_info().max_token, Some(7));

    // Remembered across a kill -9: token 6 is still stale, 7 is not.
    r.restart_runner();
    assert_eq!(r.runner_info().max_token, Some(7));
    let c = "fxshop.web.v1.t6.1";
    let e = remote_err(r.c.call(
        "instance.start",
        r.body("fxshop", json!({"id": c, "token": 6, "owner": "scheduler"})),
    ));
    assert_eq!(e.code, Code::StaleToken, "{e:?}");
    assert!(e.message.contains("token 6 < 7"), "{e:?}");
    assert!(r.list().iter().all(|i| i.id != c));
    let d = "fxshop.web.v1.t7.1";
    r.c.call(
        "instance.start",
        r.body("fxshop", json!({"id": d, "token": 7, "owner": "scheduler"})),
    )
    .unwrap();
    r.wait_state(d, "up");
    // An operator (no token) is not fenced.
    let v =
        r.c.call("instance.start", r.body("fxops", json!({})))
            .unwrap();
    let op = v["id"].as_str().unwrap().to_string();
    r.c.call("instance.stop", json!({"id": op})).unwrap();
    r.wait_state(&op, "stopped");
    assert_eq!(r.runner_info().max_token, Some(7));
}

#[test]
fn a_resent_start_answers_the_same_and_another_start_under_a_live_id_is_a_conflict() {
    let mut r = runner("rfence-idem", &[]);
    let id = "fxshop.web.v2.t3.1";
    let body = r.body(
        "fxshop",
        json!({"id": id, "token": 3, "owner": "scheduler", "env": {"A": "1"}}),
    );
    let first = r.c.call("instance.start", body.clone()).unwrap();
    let up = r.wait_state(id, "up");
    // A resend (a new message: the reply cache does not answer it) answers the
    // same and starts nothing.
    let again = r.c.call("instance.start", body.clone()).unwrap();
    assert_eq!(again, first);
    // The same start from a newer leader too (the token is not the request).
    let mut newer = body.clone();
    newer["token"] = json!(4);
    assert_eq!(r.c.call("instance.start", newer).unwrap(), first);
    assert_eq!(r.runner_info().max_token, Some(4));
    // Another start under the live id: conflict, and the instance is untouched.
    let mut other = body.clone();
    other["env"] = json!({"A": "2"});
    other["token"] = json!(4);
    let e = remote_err(r.c.call("instance.start", other.clone()));
    assert_eq!(e.code, Code::Conflict, "{e:?}");
    assert!(e.message.contains(id), "{e:?}");
    let mut operator = r.body("fxshop", json!({"id": id}));
    operator["env"] = json!({"A": "1"});
    assert_eq!(
        code(r.c.call("instance.start", operator)),
        Code::Conflict,
        "the same id without token and owner is another start"
    );
    std::thread::sleep(Duration::from_millis(300));
    let i = r.info(id);
    assert_eq!((i.state.as_str(), i.pid, i.restarts), ("up", up.pid, 0));
    assert_eq!(r.list().iter().filter(|i| i.id == id).count(), 1);

    // After a kill -9 the resend still answers the same (the record keeps it).
    r.restart_runner();
    let mut resend = body.clone();
    resend["token"] = json!(4);
    assert_eq!(r.c.call("instance.start", resend).unwrap(), first);
    assert_eq!(code(r.c.call("instance.start", other)), Code::Conflict);
    let i = r.wait_state(id, "up");
    assert_eq!(i.pid, up.pid, "the same process, re-adopted, not a second");
}

#[test]
fn up_at_is_the_first_passing_health_check_and_null_before() {
    let mut r = runner("rfence-upat", &[]);
    // The app listens only after 1.5 s: health fails until then.
    let id = "fxslow.web.v1.t1.1";
    let mut body = r.body(
        "fxslow",
        json!({"id": id, "token": 1, "owner": "scheduler"}),
    );
    body.as_object_mut().unwrap().remove("command");
    body["argv"] = json!(["sh", "-c", "sleep 1.5; exec python3 -u app.py"]);
    let asked = paddock_wire::now_ms();
    r.c.call("instance.start", body).unwrap();
    let mut last_starting = None;
    let deadline = Instant::now() + Duration::from_secs(20);
    let up = loop {
        assert!(Instant::now() < deadline, "never up");
        let before = paddock_wire::now_ms();
        let i = r.info(id);
        match i.state.as_str() {
            "up" => break i,
            _ => {
                assert_eq!(i.up_at, None, "up_at before health passed: {i:?}");
                last_starting = Some(before);
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let up_at = up.up_at.expect("up_at once up");
    assert!(
        up_at >= asked + 1500,
        "up_at {up_at} before the app listened"
    );
    let seen_starting = last_starting.expect("it was seen starting");
    assert!(up_at > seen_starting, "up_at {up_at} <= {seen_starting}");
    assert!(up_at <= paddock_wire::now_ms());
    // It stays the first pass while the instance stays up.
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(r.info(id).up_at, Some(up_at));
    // A restart starts a new run: null until its own first pass, then later.
    r.c.call("instance.restart", json!({"id": id, "token": 1}))
        .unwrap();
    let i = eventually(Duration::from_secs(10), "the restart under way", || {
        Some(r.info(id)).filter(|i| i.state != "up")
    });
    assert_eq!(i.up_at, None, "{i:?}");
    let again = r.wait_state(id, "up");
    assert!(again.up_at.unwrap() >= up_at + 1500, "{again:?}");
}

#[test]
fn runner_info_offers_the_configured_memory_and_sums_what_is_not_stopped() {
    let mut r = runner(
        "rfence-info",
        &[
            ("offer_memory_mb", toml::Value::Integer(1000)),
            ("memory_mb", toml::Value::Integer(64)),
        ],
    );
    let i = r.runner_info();
    assert_eq!(
        (
            i.node.as_str(),
            i.offer_memory_mb,
            i.used_memory_mb,
            i.instances
        ),
        ("node-a", 1000, 0, 0)
    );
    let a =
        r.c.call("instance.start", r.body("fxone", json!({})))
            .unwrap();
    let a = a["id"].as_str().unwrap().to_string();
    let mut body = r.body("fxtwo", json!({"limits": {"memory_mb": 128}}));
    let b = r.c.call("instance.start", body.clone()).unwrap();
    let b = b["id"].as_str().unwrap().to_string();
    // No limit given: the runner's default (memory_mb = 64) counts.
    body["limits"] = json!({});
    let c = r.c.call("instance.start", body).unwrap();
    let c = c["id"].as_str().unwrap().to_string();
    let i = r.runner_info();
    assert_eq!((i.used_memory_mb, i.instances), (256 + 128 + 64, 3));
    assert_eq!(r.info(&c).memory_mb, Some(64));
    r.c.call("instance.stop", json!({"id": b})).unwrap();
    r.wait_state(&b, "stopped");
    let i = r.runner_info();
    assert_eq!((i.used_memory_mb, i.instances), (256 + 64, 2));
    r.wait_state(&a, "up");
    drop(r);

    // Without the setting it offers 80% of the node's memory.
    let mut r = runner("rfence-info-default", &[]);
    let total_kb: u64 = std::fs::read_to_string("/proc/meminfo")
        .unwrap()
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap();
    assert_eq!(r.runner_info().offer_memory_mb, total_kb / 1024 * 8 / 10);
}
