//! The scheduler with real daemons: two runner nodes (node-a with heartbeat,
//! locker, api, blobstore, runner and the scheduler; node-b with only a runner),
//! a real slug of a tiny Python HTTP app, releases made on the api.
//! (a) web=2 of a succeeded release → one instance per node, the scheduler's,
//!     fenced with its token, up, and a `routes.table` with both backends;
//! (b) kill -9 of the scheduler restarts no app process; a new scheduler
//!     adopts what runs (no new instances) under a newer token;
//! (c) a new (pending) release is rolled out: a new instance up before an old
//!     one goes, never fewer than 2 up, ending with 2 of the new version and the
//!     release marked succeeded.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use paddock_integration::api::{create_user, wait_migrated};
use paddock_integration::sched::{add_scheduler as add_scheduler_with, tune_runner};
use paddock_integration::*;
use paddock_wire::client::Subscriber;
use paddock_wire::Client;
use serde_json::{json, Value};

/// A slug of the version app (`paddock_integration::sched`).
fn slug(dir: &Path, version: &str) -> PathBuf {
    paddock_integration::sched::version_slug(dir, version, "127.0.0.1")
}

fn add_scheduler(node: &mut Node) -> String {
    add_scheduler_with(node, &[])
}

fn get(addr: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET / HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.split("\r\n\r\n").nth(1).unwrap_or("").to_string()
}

struct Cluster {
    a: Node,
    b: Node,
    api: Client,
    app: String,
    sched_pub: String,
    t: TestDir,
    _pg: Postgres,
    /// Last: removed once the daemons and the app's processes are gone.
    _account: AppAccount,
}

impl Cluster {
    fn start(name: &str) -> Cluster {
        let t = TestDir::new(name);
        let pg = Postgres::start(t.path());
        let key = test_key();
        let mut a = Node::new(t.path(), "node-a", &key, &[], Some(pg.url()));
        tune_runner(&mut a);
        let sched_pub = add_scheduler(&mut a);
        a.save();
        paddock_harness::allow_traverse(&a.dir).unwrap();
        for d in [
            "heartbeat",
            "locker",
            "api",
            "blobstore",
            "runner",
            "balancer",
        ] {
            a.start(d);
        }
        wait_migrated(&a);
        let mut b = Node::new(
            t.path(),
            "node-b",
            &key,
            &[tcp(a.ports.heartbeat_pull)],
            Some(pg.url()),
        );
        b.file.cluster.registries = vec![a.rpc("heartbeat")];
        tune_runner(&mut b);
        b.save();
        paddock_harness::allow_traverse(&b.dir).unwrap();
        b.start("runner");
        let mut hb = a.client("heartbeat");
        eventually(Duration::from_secs(15), "daemons registered", || {
            let l = hb.call("registry.list", json!({})).ok()?;
            let alive = |d: &str, n: &str| {
                l["services"].as_array().is_some_and(|s| {
                    s.iter()
                        .any(|e| e["daemon"] == d && e["node"] == n && e["state"] == "alive")
                })
            };
            let all = ["api", "blobstore", "locker", "runner"]
                .iter()
                .all(|d| alive(d, "node-a"))
                && alive("runner", "node-b");
            all.then_some(())
        });
        let mut api = a.client("api");
        create_user(&a, "alice", false);
        let app = format!("sch{}", &ulid::Ulid::new().to_string().to_lowercase()[20..]);
        api.call("app.create", json!({"name": app, "owner": "alice"}))
            .expect("app.create");
        // The app's account made once, here: two runners on one host making it
        // at the same moment (with other tests' runners busy at /etc/passwd too)
        // once left one of them with another app's uid.
        let account = AppAccount::make(&app);
        Cluster {
            a,
            b,
            api,
            app,
            sched_pub,
            t,
            _pg: pg,
            _account: account,
        }
    }

    /// Puts a slug saying `version` and makes a pending release of it.
    fn release(&mut self, version: &str) -> u64 {
        self.release_running(version, "python3 -u app.py")
    }

    /// Marks release `version` succeeded (so current), as the deployer does today.
    fn succeed(&mut self, version: u64) {
        self.api
            .call(
                "release.status",
                json!({"app": self.app, "version": version, "status": "succeeded"}),
            )
            .expect("release.status");
    }

    /// Scales `web` to `quantity` instances of 128 MB.
    fn scale_web(&mut self, quantity: u32) {
        self.api
            .call(
                "formation.scale",
                json!({"app": self.app, "changes": [{"type": "web", "quantity": quantity, "memory_mb": 128}]}),
            )
            .expect("formation.scale");
    }

    /// As `release`, with `web` running `command`.
    fn release_running(&mut self, version: &str, command: &str) -> u64 {
        let slug = slug(self.t.path(), version);
        let mut blob = self.a.client("blobstore");
        let stored = paddock_blob::put_file_blocking(&mut blob, &slug).expect("blob put");
        let r = self
            .api
            .call(
                "release.create",
                json!({"app": self.app, "slug": format!("sha256:{}", stored.sha256),
                       "process_types": {"web": command},
                       "description": "Deploy test", "created_by": "user:alice"}),
            )
            .expect("release.create");
        r["release"]["version"].as_u64().unwrap()
    }

    /// The app's instances on both nodes: id → item (with "node").
    fn instances(&self) -> BTreeMap<String, Value> {
        let mut out = BTreeMap::new();
        for n in [&self.a, &self.b] {
            let mut c = n.client("runner");
            let v = c.call("instance.list", json!({})).expect("instance.list");
            for i in v["instances"].as_array().unwrap() {
                if i["app"] == self.app.as_str() {
                    let mut i = i.clone();
                    i["node"] = json!(n.name);
                    out.insert(i["id"].as_str().unwrap().to_string(), i);
                }
            }
        }
        out
    }

    /// Waits (up to a minute) until exactly `n` of the app's live instances are
    /// up; those `n`.
    fn wait_up(&self, n: usize) -> Vec<Value> {
        eventually(
            Duration::from_secs(60),
            &format!("{n} instances up"),
            || {
                let l = self.instances();
                let up: Vec<Value> = live(&l)
                    .into_iter()
                    .filter(|i| i["state"] == "up")
                    .cloned()
                    .collect();
                (up.len() == n).then_some(up)
            },
        )
    }

    fn scheduler_status(&self) -> Option<Value> {
        let mut c = self.a.client("scheduler");
        c.call("scheduler.status", json!({})).ok()
    }

    fn logs(&self) -> String {
        let mut s = String::new();
        for (n, d) in [
            (&self.a, "scheduler"),
            (&self.a, "runner"),
            (&self.b, "runner"),
        ] {
            s += &format!(
                "\n--- {} {d}\n{}",
                n.name,
                std::fs::read_to_string(n.log(d)).unwrap_or_default()
            );
        }
        s
    }
}

/// Instances not stopping or stopped.
fn live(list: &BTreeMap<String, Value>) -> Vec<&Value> {
    list.values()
        .filter(|i| !matches!(i["state"].as_str(), Some("stopping" | "stopped")))
        .collect()
}

/// The next `routes.table` whose entry for `app` satisfies `ok`.
fn table_where(
    sub: &mut Subscriber,
    app: &str,
    timeout: Duration,
    mut ok: impl FnMut(&Value, &Value) -> bool,
) -> Option<Value> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        let Some(ev) = sub.next(Duration::from_millis(500)).unwrap() else {
            continue;
        };
        let table = ev.body;
        let entry = table["apps"]
            .as_array()
            .and_then(|a| a.iter().find(|e| e["app"] == app).cloned());
        if let Some(e) = entry {
            if ok(&table, &e) {
                return Some(table);
            }
        }
    }
    None
}

fn backend_ids(entry: &Value) -> BTreeSet<String> {
    entry["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn places_one_per_node_survives_its_own_kill_and_rolls_out_a_new_release() {
    let mut c = Cluster::start("scheduler");
    let v1 = c.release("v1");
    c.succeed(v1);
    c.scale_web(2);

    let mut sub = Subscriber::connect(
        std::slice::from_ref(&c.sched_pub),
        &["routes.table"],
        c.a.keys.clone(),
    )
    .unwrap();
    let began = Instant::now();
    c.a.start("scheduler");

    // (a) One per node, the scheduler's, fenced, up.
    let up = c.wait_up(2);
    let placed_in = began.elapsed();
    let nodes: BTreeSet<&str> = up.iter().map(|i| i["node"].as_str().unwrap()).collect();
    assert_eq!(nodes.len(), 2, "one per node: {up:?}");
    let token1 = c.scheduler_status().unwrap()["token"].as_u64().unwrap();
    for i in &up {
        assert_eq!(i["owner"], "scheduler", "{i}");
        assert_eq!(i["token"].as_u64(), Some(token1), "{i}");
        assert_eq!(i["release"].as_u64(), Some(v1), "{i}");
        assert_eq!(i["memory_mb"].as_u64(), Some(128), "{i}");
        assert!(i["up_at"].as_i64().is_some(), "{i}");
        assert_eq!(get(i["addr"].as_str().unwrap()), "v1");
    }
    assert_eq!(live(&c.instances()).len(), 2, "{}", c.logs());
    let ids: BTreeSet<String> = up
        .iter()
        .map(|i| i["id"].as_str().unwrap().to_string())
        .collect();
    let table = table_where(&mut sub, &c.app, Duration::from_secs(10), |_, e| {
        backend_ids(e) == ids
    })
    .unwrap_or_else(|| panic!("no routes.table with both backends{}", c.logs()));
    assert_eq!(table["token"].as_u64(), Some(token1));
    let entry = table["apps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["app"] == c.app.as_str())
        .unwrap();
    assert!(!entry["domains"].as_array().unwrap().is_empty(), "{entry}");
    for b in entry["backends"].as_array().unwrap() {
        assert_eq!(b["draining"], false);
        let i = up.iter().find(|i| i["id"] == b["id"]).unwrap();
        assert_eq!(b["addr"], i["addr"]);
    }
    let snap =
        c.a.client("scheduler")
            .call("routes.snapshot", json!({}))
            .expect("routes.snapshot");
    assert_eq!(snap["apps"], table["apps"]);
    // A real balancer follows the scheduler's table.
    let domain = entry["domains"][0].as_str().unwrap().to_string();
    let front: std::net::SocketAddr = format!("127.0.0.1:{}", c.a.ports.balancer_http)
        .parse()
        .unwrap();
    eventually(Duration::from_secs(15), "v1 through the balancer", || {
        let r = paddock_integration::http::get(front, &domain, "/").ok()?;
        (r.status == 200 && r.text() == "v1").then_some(())
    });
    eprintln!(
        "(a) 2 instances up on 2 nodes {placed_in:?} after the scheduler started; token {token1}"
    );

    // (b) kill -9: nothing restarted; a new scheduler adopts what runs.
    let pids: BTreeMap<String, i64> = up
        .iter()
        .map(|i| {
            (
                i["id"].as_str().unwrap().to_string(),
                i["pid"].as_i64().unwrap(),
            )
        })
        .collect();
    c.a.kill9("scheduler");
    let killed = Instant::now();
    c.a.start("scheduler");
    let token2 = eventually(Duration::from_secs(20), "a new leader", || {
        let s = c.scheduler_status()?;
        s["token"].as_u64().filter(|t| *t > token1)
    });
    let led_in = killed.elapsed();
    let table = table_where(&mut sub, &c.app, Duration::from_secs(10), |t, e| {
        t["token"].as_u64() == Some(token2) && backend_ids(e) == ids
    })
    .unwrap_or_else(|| {
        panic!(
            "no table from the new leader with the same backends{}",
            c.logs()
        )
    });
    assert_eq!(table["token"].as_u64(), Some(token2));
    // A few passes of the new leader: still the same two processes.
    std::thread::sleep(Duration::from_secs(2));
    let l = c.instances();
    assert_eq!(
        l.keys().cloned().collect::<BTreeSet<_>>(),
        ids,
        "no new instances{}",
        c.logs()
    );
    for (id, pid) in &pids {
        assert_eq!(l[id]["state"], "up", "{}", l[id]);
        assert_eq!(l[id]["pid"].as_i64(), Some(*pid), "{id} not restarted");
    }
    eprintln!("(b) new leader (token {token2}) {led_in:?} after kill -9; pids unchanged, no new instances");

    // (c) A new release, rolled out surge 1 behind health.
    let load = paddock_integration::http::Load::start(front, &domain, "/", 2);
    let v2 = c.release("v2");
    let began = Instant::now();
    let mut min_up = usize::MAX;
    let mut first_old_gone: Option<Duration> = None;
    let mut first_new_up: Option<Duration> = None;
    let mut max_live = 0;
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let l = c.instances();
        let up_new = live(&l)
            .iter()
            .filter(|i| i["state"] == "up" && i["release"].as_u64() == Some(v2))
            .count();
        let up = live(&l).iter().filter(|i| i["state"] == "up").count();
        let old_live = live(&l)
            .iter()
            .filter(|i| i["release"].as_u64() == Some(v1))
            .count();
        min_up = min_up.min(up);
        max_live = max_live.max(live(&l).len());
        if up_new > 0 && first_new_up.is_none() {
            first_new_up = Some(began.elapsed());
        }
        if old_live < 2 && first_old_gone.is_none() {
            first_old_gone = Some(began.elapsed());
            assert!(
                up_new >= 1,
                "an old instance went before a new one was up: {l:?}"
            );
        }
        if up_new == 2 && old_live == 0 && live(&l).len() == 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not rolled out: {l:#?}{}",
            c.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let rolled_in = began.elapsed();
    // The last old backend's drain and stop have just been sent: let the
    // balancer see the table without it before the load ends.
    table_where(&mut sub, &c.app, Duration::from_secs(10), |_, e| {
        backend_ids(e)
            .iter()
            .all(|id| id.contains(&format!(".v{v2}.")))
    })
    .unwrap_or_else(|| panic!("no table with only new backends{}", c.logs()));
    std::thread::sleep(Duration::from_millis(500));
    let report = load.finish();
    assert_eq!(
        report.failed,
        0,
        "requests failed during the rollout: {report:?}{}",
        c.logs()
    );
    assert_eq!(
        paddock_integration::http::get(front, &domain, "/")
            .unwrap()
            .text(),
        "v2"
    );
    assert!(min_up >= 2, "fewer than 2 up during the rollout ({min_up})");
    assert!(max_live <= 3, "surge 1: at most 3 at once, saw {max_live}");
    let l = c.instances();
    for i in live(&l) {
        assert_eq!(get(i["addr"].as_str().unwrap()), "v2");
        assert_eq!(i["token"].as_u64(), Some(token2));
    }
    let new_ids: BTreeSet<String> = live(&l)
        .iter()
        .map(|i| i["id"].as_str().unwrap().to_string())
        .collect();
    let nodes: BTreeSet<&str> = live(&l)
        .iter()
        .map(|i| i["node"].as_str().unwrap())
        .collect();
    assert_eq!(nodes.len(), 2, "still one per node");
    table_where(&mut sub, &c.app, Duration::from_secs(10), |_, e| {
        backend_ids(e) == new_ids
    })
    .unwrap_or_else(|| panic!("no table with the new backends{}", c.logs()));
    let state = eventually(Duration::from_secs(10), "v2 succeeded", || {
        let s = c.api.call("app.state", json!({"app": c.app})).ok()?;
        (s["app"]["current"]["version"].as_u64() == Some(v2)).then_some(s)
    });
    assert!(state["app"]["pending"].is_null(), "{state}");
    eprintln!(
        "(c) v{v2} rolled out in {rolled_in:?}: first new up at {first_new_up:?}, first old gone at {first_old_gone:?}, never fewer than {min_up} up, at most {max_live} at once; through the balancer meanwhile: {} ok, {} failed, {} retried, statuses {:?}",
        report.ok, report.failed, report.retried, report.statuses
    );
}

fn status(node: &Node) -> Option<Value> {
    node.client("scheduler")
        .call("scheduler.status", json!({}))
        .ok()
}

/// Two schedulers: the follower answers `routes.snapshot` with `unavailable`
/// and publishes nothing; when the leader is frozen past its lease, the other
/// takes over under a larger token and adopts what runs; the old one, thawed,
/// acts on nothing (no start, no stop, no table) and says it no longer leads.
#[test]
fn one_leads_a_frozen_leader_is_replaced_and_once_thawed_does_nothing() {
    let mut c = Cluster::start("scheduler-leader");
    let b_pub = add_scheduler(&mut c.b);
    let v = c.release("v1");
    c.succeed(v);
    c.scale_web(2);
    c.a.start("scheduler");
    let token1 = eventually(Duration::from_secs(10), "a leads", || {
        status(&c.a)?["token"].as_u64()
    });
    let mut b_sub = Subscriber::connect(
        std::slice::from_ref(&b_pub),
        &["routes.table"],
        c.b.keys.clone(),
    )
    .unwrap();
    c.b.start("scheduler");
    let up: BTreeMap<String, i64> = c
        .wait_up(2)
        .iter()
        .map(|i| {
            (
                i["id"].as_str().unwrap().to_string(),
                i["pid"].as_i64().unwrap(),
            )
        })
        .collect();
    // The follower: not leading, no snapshot, no table.
    let sb = status(&c.b).expect("b's status");
    assert_eq!(sb["leader"], false, "{sb}");
    let err = paddock_integration::api::remote_err(
        c.b.client("scheduler").call("routes.snapshot", json!({})),
    );
    assert_eq!(err.code, paddock_wire::Code::Unavailable, "{err:?}");
    assert!(
        b_sub.next(Duration::from_secs(2)).unwrap().is_none(),
        "a follower published a table"
    );

    // Freeze the leader past its lease (3 s): b takes over and adopts.
    c.a.signal("scheduler", nix::sys::signal::Signal::SIGSTOP);
    let frozen = Instant::now();
    let token2 = eventually(Duration::from_secs(20), "b leads", || {
        status(&c.b)?["token"].as_u64()
    });
    let took_over = frozen.elapsed();
    assert!(token2 > token1);
    let t = b_sub
        .next(Duration::from_secs(5))
        .unwrap()
        .expect("b publishes once it leads");
    assert_eq!(t.body["token"].as_u64(), Some(token2));
    std::thread::sleep(Duration::from_secs(1));
    let l = c.instances();
    let now: BTreeMap<String, i64> = live(&l)
        .into_iter()
        .map(|i| {
            (
                i["id"].as_str().unwrap().to_string(),
                i["pid"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(now, up, "b adopted what ran, restarting nothing");

    // b acts: a third instance, under its token.
    c.api
        .call(
            "formation.scale",
            json!({"app": c.app, "changes": [{"type": "web", "quantity": 3}]}),
        )
        .expect("formation.scale");
    let third = eventually(Duration::from_secs(30), "a third instance up", || {
        let l = c.instances();
        let ups: Vec<Value> = live(&l)
            .into_iter()
            .filter(|i| i["state"] == "up")
            .cloned()
            .collect();
        if ups.len() != 3 {
            return None;
        }
        ups.into_iter()
            .find(|i| !up.contains_key(i["id"].as_str().unwrap()))
    });
    assert_eq!(third["token"].as_u64(), Some(token2), "{third}");

    // Thaw a: it must notice it lost and do nothing.
    let mut a_sub = Subscriber::connect(
        std::slice::from_ref(&c.sched_pub),
        &["routes.table"],
        c.a.keys.clone(),
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    c.a.signal("scheduler", nix::sys::signal::Signal::SIGCONT);
    eventually(Duration::from_secs(10), "a says it no longer leads", || {
        (status(&c.a)?["leader"] == false).then_some(())
    });
    assert!(
        a_sub.next(Duration::from_secs(2)).unwrap().is_none(),
        "the thawed old leader published a table"
    );
    let before: BTreeSet<String> = live(&c.instances())
        .iter()
        .map(|i| i["id"].as_str().unwrap().to_string())
        .collect();
    std::thread::sleep(Duration::from_secs(2));
    let l = c.instances();
    let after: BTreeSet<String> = live(&l)
        .iter()
        .map(|i| i["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(before, after, "nothing started or stopped{}", c.logs());
    assert_eq!(after.len(), 3);
    let log = std::fs::read_to_string(c.a.log("scheduler")).unwrap();
    assert!(log.contains("no longer leading"), "{log}");
    let mut runner = c.a.client("runner");
    let info = runner.call("runner.info", json!({})).unwrap();
    assert_eq!(info["max_token"].as_u64(), Some(token2), "{info}");
    eprintln!(
        "leader frozen: the follower led {took_over:?} later with token {token2} (was {token1}); the thawed one stood down and sent nothing"
    );
}

/// A release whose web process exits at once: the deploy sees the crash loop,
/// alerts, stops the new instance and ends rolled back; the release is marked
/// failed, the old instances serve throughout (same pids, no failed request)
/// and the failed release is not tried again.
#[test]
fn a_crashing_release_is_rolled_back_and_marked_failed() {
    let mut c = Cluster::start("scheduler-rollback");
    let good = c.release("good");
    c.succeed(good);
    c.scale_web(2);
    let mut alerts = Subscriber::connect(
        std::slice::from_ref(&c.sched_pub),
        &["alert"],
        c.a.keys.clone(),
    )
    .unwrap();
    c.a.start("scheduler");
    let up: BTreeMap<String, i64> = c
        .wait_up(2)
        .iter()
        .map(|i| {
            (
                i["id"].as_str().unwrap().to_string(),
                i["pid"].as_i64().unwrap(),
            )
        })
        .collect();
    let domain = {
        let s = c.api.call("app.state", json!({"app": c.app})).unwrap();
        s["app"]["domains"][0].as_str().unwrap().to_string()
    };
    let front: std::net::SocketAddr = format!("127.0.0.1:{}", c.a.ports.balancer_http)
        .parse()
        .unwrap();
    eventually(Duration::from_secs(15), "good through the balancer", || {
        let r = paddock_integration::http::get(front, &domain, "/").ok()?;
        (r.status == 200 && r.text() == "good").then_some(())
    });
    let load = paddock_integration::http::Load::start(front, &domain, "/", 2);

    let bad = c.release_running("bad", "false");
    let began = Instant::now();
    let state = eventually(Duration::from_secs(60), "the bad release failed", || {
        let r = c
            .api
            .call("release.info", json!({"app": c.app, "version": bad}))
            .ok()?;
        (r["release"]["status"] == "failed").then_some(r)
    });
    let failed_in = began.elapsed();
    let message = state["release"]["status_message"].as_str().unwrap_or("");
    // The crash-loop rule (crash_restarts = 3) fired: the message gives the
    // restarts the pass saw, which may already be one more than the threshold.
    let restarts: u32 = message
        .split(" restarted ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no restart count in {state}"));
    assert!(
        restarts >= 3 && message.contains("times; rolling back to v"),
        "{state}"
    );
    let alert = alerts
        .next(Duration::from_secs(5))
        .unwrap()
        .expect("an alert was published");
    assert_eq!(alert.body["app"], c.app.as_str());
    let reason = alert.body["reason"].as_str().unwrap().to_string();
    assert!(reason.contains(&format!("v{bad}")), "{reason}");
    assert!(
        reason.contains(&format!("rolling back to v{good}")),
        "{reason}"
    );
    let s = c.api.call("app.state", json!({"app": c.app})).unwrap();
    assert_eq!(s["app"]["current"]["version"].as_u64(), Some(good), "{s}");
    assert!(s["app"]["pending"].is_null(), "{s}");
    // The bad instance is stopped; the good ones never changed.
    eventually(
        Duration::from_secs(10),
        "only the good instances left",
        || {
            let l = c.instances();
            let now: BTreeMap<String, i64> = live(&l)
                .into_iter()
                .map(|i| {
                    (
                        i["id"].as_str().unwrap().to_string(),
                        i["pid"].as_i64().unwrap_or(0),
                    )
                })
                .collect();
            (now == up).then_some(())
        },
    );
    let tried: Vec<String> = c
        .instances()
        .into_keys()
        .filter(|id| id.contains(&format!(".v{bad}.")))
        .collect();
    assert_eq!(tried.len(), 1, "one surge instance tried: {tried:?}");
    // Not tried again.
    std::thread::sleep(Duration::from_secs(2));
    let again: Vec<String> = c
        .instances()
        .into_keys()
        .filter(|id| id.contains(&format!(".v{bad}.")))
        .collect();
    assert_eq!(again, tried, "the failed release was tried again");
    let report = load.finish();
    assert_eq!(report.failed, 0, "requests failed: {report:?}");
    // Both in the app's audit log, by the scheduler.
    let entries = c
        .api
        .call("audit.list", json!({"app": c.app, "limit": 50}))
        .unwrap()["entries"]
        .as_array()
        .unwrap()
        .clone();
    let alerted = entries
        .iter()
        .find(|e| e["kind"] == "scheduler.alert")
        .unwrap_or_else(|| panic!("no alert in the audit log: {entries:#?}"));
    assert_eq!(alerted["detail"]["reason"], reason.as_str());
    assert_eq!(alerted["actor"], "scheduler@node-a");
    let ended = entries
        .iter()
        .find(|e| e["kind"] == "scheduler.deploy")
        .unwrap_or_else(|| panic!("no deploy outcome in the audit log: {entries:#?}"));
    assert_eq!(
        ended["detail"],
        json!({"version": bad, "outcome": "rolled_back"})
    );
    eprintln!(
        "v{bad} failed and rolled back {failed_in:?} after its release ({}); alert: {reason}; through the balancer meanwhile {} ok, {} failed",
        state["release"]["status_message"], report.ok, report.failed
    );
}

/// Node loss and return: node-b's runner killed (its app process lives on
/// under its shim) is dead to the registry; its instance is re-placed on
/// node-a and leaves the table. When the runner comes back (node-b unsettled),
/// its old instance is the extra one: drained and stopped, two left.
#[test]
fn a_lost_node_is_replaced_and_its_instance_retired_when_it_returns() {
    let mut c = Cluster::start("scheduler-node-loss");
    {
        let s = c.a.file.daemons.get_mut("scheduler").unwrap();
        s.other
            .insert("node_settle_ms".into(), toml::Value::Integer(5000));
    }
    c.a.save();
    let v = c.release("v1");
    c.succeed(v);
    c.scale_web(2);
    let mut sub = Subscriber::connect(
        std::slice::from_ref(&c.sched_pub),
        &["routes.table"],
        c.a.keys.clone(),
    )
    .unwrap();
    c.a.start("scheduler");
    let up = c.wait_up(2);
    let on_b = up
        .iter()
        .find(|i| i["node"] == "node-b")
        .expect("one on node-b")["id"]
        .as_str()
        .unwrap()
        .to_string();
    let on_a = up
        .iter()
        .find(|i| i["node"] == "node-a")
        .expect("one on node-a")["id"]
        .as_str()
        .unwrap()
        .to_string();

    c.b.kill9("runner");
    let lost = Instant::now();
    let replaced = eventually(
        Duration::from_secs(30),
        "a replacement up on node-a",
        || {
            let mut r = c.a.client("runner");
            let v = r.call("instance.list", json!({})).ok()?;
            let ups: Vec<String> = v["instances"]
                .as_array()?
                .iter()
                .filter(|i| i["app"] == c.app.as_str() && i["state"] == "up")
                .map(|i| i["id"].as_str().unwrap().to_string())
                .collect();
            (ups.len() == 2).then_some(ups)
        },
    );
    let replaced_in = lost.elapsed();
    assert!(replaced.contains(&on_a));
    let new_id = replaced.iter().find(|id| **id != on_a).unwrap().clone();
    assert_ne!(new_id, on_b);
    let want: BTreeSet<String> = replaced.iter().cloned().collect();
    table_where(&mut sub, &c.app, Duration::from_secs(10), |_, e| {
        backend_ids(e) == want
    })
    .unwrap_or_else(|| panic!("no table without node-b's backend{}", c.logs()));

    // node-b's runner returns: it adopts its instance, which is now one too many.
    c.b.start("runner");
    let back = Instant::now();
    eventually(
        Duration::from_secs(30),
        "node-b's old instance stopped",
        || {
            let l = c.instances();
            let gone = matches!(l.get(&on_b)?["state"].as_str(), Some("stopped"));
            (gone && live(&l).len() == 2).then_some(())
        },
    );
    let retired_in = back.elapsed();
    let l = c.instances();
    let left: BTreeSet<String> = live(&l)
        .iter()
        .map(|i| i["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(left, want, "the two on node-a stay");
    eprintln!(
        "node-b lost: replaced on node-a {replaced_in:?} later; back: its old instance retired {retired_in:?} later"
    );
}

/// As the deployer does today: the crashing release is made current before
/// its deploy. The deploy rolls back, the api is rolled back too (a new release
/// of the good code), and that release is then rolled out: two instances of it,
/// saying "good", with no failed request on the way, the failed one never
/// tried again.
#[test]
fn a_crashing_current_release_is_rolled_back_at_the_api() {
    let mut c = Cluster::start("sched-rb-cur");
    let good = c.release("good");
    c.succeed(good);
    c.scale_web(2);
    let mut alerts = Subscriber::connect(
        std::slice::from_ref(&c.sched_pub),
        &["alert"],
        c.a.keys.clone(),
    )
    .unwrap();
    c.a.start("scheduler");
    c.wait_up(2);
    let domain = {
        let s = c.api.call("app.state", json!({"app": c.app})).unwrap();
        s["app"]["domains"][0].as_str().unwrap().to_string()
    };
    let front: std::net::SocketAddr = format!("127.0.0.1:{}", c.a.ports.balancer_http)
        .parse()
        .unwrap();
    eventually(Duration::from_secs(15), "good through the balancer", || {
        let r = paddock_integration::http::get(front, &domain, "/").ok()?;
        (r.status == 200 && r.text() == "good").then_some(())
    });
    let load = paddock_integration::http::Load::start(front, &domain, "/", 2);
    let began = Instant::now();
    let bad = c.release_running("bad", "false");
    c.succeed(bad);
    let restored = eventually(Duration::from_secs(60), "a new current release", || {
        let s = c.api.call("app.state", json!({"app": c.app})).ok()?;
        s["app"]["current"]["version"].as_u64().filter(|v| *v > bad)
    });
    let l = eventually(
        Duration::from_secs(60),
        "two of the restored release",
        || {
            let l = c.instances();
            let ours = live(&l)
                .iter()
                .filter(|i| i["state"] == "up" && i["release"].as_u64() == Some(restored))
                .count();
            (ours == 2 && live(&l).len() == 2).then_some(l)
        },
    );
    let done_in = began.elapsed();
    for i in live(&l) {
        assert_eq!(get(i["addr"].as_str().unwrap()), "good");
    }
    let tried = l
        .keys()
        .filter(|id| id.contains(&format!(".v{bad}.")))
        .count();
    assert_eq!(tried, 1, "one surge instance of the bad release: {l:#?}");
    let report = load.finish();
    assert_eq!(report.failed, 0, "requests failed: {report:?}{}", c.logs());
    let alert = alerts
        .next(Duration::from_secs(1))
        .unwrap()
        .expect("an alert was published");
    eprintln!(
        "current v{bad} crashed: the api rolled back to v{restored} (v{good}'s code), rolled out {done_in:?} after v{bad} was made; alert: {}; through the balancer {} ok, {} failed",
        alert.body["reason"], report.ok, report.failed
    );
}

/// A start the runner refuses is not sent again every pass: it backs off, and
/// its failure is logged once. Here the runner refuses it at once as `invalid`:
/// the test's directory is named long enough that the instance's shim socket
/// path would pass 107 bytes. (A slug in no blobstore is not refused but waited
/// for, up to the start's timeout; the scheduler's pass does not wait for it.)
#[test]
fn a_failing_start_backs_off_and_is_logged_once() {
    let mut c = Cluster::start("sched-start-refused-as-its-socket-path-is-long");
    let v = c.release("v1");
    c.succeed(v);
    c.scale_web(1);
    c.a.start("scheduler");
    let log = || std::fs::read_to_string(c.a.log("scheduler")).unwrap_or_default();
    eventually(Duration::from_secs(20), "a failed start", || {
        log().contains("failed:").then_some(())
    });
    // 4 s: 8 passes at resync_ms 500; starts at 0, 1, 3 s at most.
    std::thread::sleep(Duration::from_secs(4));
    let text = log();
    let tried = text
        .matches("INFO paddock_scheduler::actor: starting")
        .count();
    let said = text
        .matches("WARN paddock_scheduler::actor: start ")
        .count();
    assert!((2..=4).contains(&tried), "tried {tried} times:\n{text}");
    assert_eq!(said, 1, "said {said} times:\n{text}");
    eprintln!("a start refused by the runner: tried {tried} times in about 4 s, said once");
}

/// kill -9 of the scheduler in the middle of a rollout: a new leader resumes
/// the deploy from what runs and completes it; the kill restarts no app
/// process (the old release's keep their pids until retired, the new release's
/// instance started before the kill is adopted, not replaced).
#[test]
fn a_scheduler_killed_mid_deploy_is_replaced_and_the_deploy_completes() {
    let mut c = Cluster::start("sched-mid");
    let v1 = c.release("v1");
    c.succeed(v1);
    c.scale_web(2);
    c.a.start("scheduler");
    c.wait_up(2);
    let token1 = c.scheduler_status().unwrap()["token"].as_u64().unwrap();

    let v2 = c.release("v2");
    // Mid-deploy: the first v2 instance exists (its old ones all still run).
    let (first_new, before) = eventually(Duration::from_secs(30), "a v2 instance started", || {
        let l = c.instances();
        let new: Vec<&Value> = live(&l)
            .into_iter()
            .filter(|i| i["release"].as_u64() == Some(v2))
            .collect();
        let old = live(&l)
            .iter()
            .filter(|i| i["release"].as_u64() == Some(v1) && i["state"] == "up")
            .count();
        (new.len() == 1 && old == 2)
            .then(|| (new[0]["id"].as_str().unwrap().to_string(), l.clone()))
    });
    c.a.kill9("scheduler");
    c.a.start("scheduler");
    eventually(Duration::from_secs(20), "a new leader", || {
        c.scheduler_status()?["token"]
            .as_u64()
            .filter(|t| *t > token1)
    });
    // Nothing the kill touched: every process listed before runs on with the
    // same pid and restart count until the deploy retires it.
    let after = c.instances();
    for (id, i) in &before {
        let Some(now) = after.get(id) else { continue };
        if matches!(now["state"].as_str(), Some("stopping" | "stopped")) {
            continue; // retired by the new leader's deploy
        }
        if i["pid"].is_i64() && now["pid"].is_i64() {
            assert_eq!(now["pid"], i["pid"], "{id} restarted{}", c.logs());
        }
        assert_eq!(now["restarts"], i["restarts"], "{id} restarted{}", c.logs());
    }
    // The deploy completes: two of v2, none of v1, v2 current.
    eventually(Duration::from_secs(60), "v2 rolled out", || {
        let l = c.instances();
        let live = live(&l);
        let done = live.len() == 2
            && live
                .iter()
                .all(|i| i["release"].as_u64() == Some(v2) && i["state"] == "up");
        done.then_some(())
    });
    let l = c.instances();
    assert!(
        live(&l).iter().any(|i| i["id"] == first_new.as_str()),
        "the v2 instance started before the kill was replaced, not adopted: {l:#?}"
    );
    eventually(Duration::from_secs(15), "v2 succeeded", || {
        let s = c.api.call("app.state", json!({"app": c.app})).ok()?;
        (s["app"]["current"]["version"].as_u64() == Some(v2)).then_some(())
    });
}

/// A restart that fails (here: no room for its surge instance) leaves the app
/// to reconcile as before: a scale afterwards is carried out, the app is not
/// frozen on a release marked failed.
#[test]
fn a_failed_restart_leaves_the_app_reconciled() {
    let mut c = Cluster::start("sched-restart");
    let v1 = c.release("v1");
    c.succeed(v1);
    // Each runner offers 4096 MB: one 3000 MB instance per node, no room for
    // a third (the restart's surge).
    c.api
        .call(
            "formation.scale",
            json!({"app": c.app, "changes": [{"type": "web", "quantity": 2, "memory_mb": 3000}]}),
        )
        .expect("formation.scale");
    c.a.start("scheduler");
    c.wait_up(2);
    let r = eventually(Duration::from_secs(10), "the restart accepted", || {
        c.a.client("scheduler")
            .call("app.restart", json!({"app": c.app}))
            .ok()
    });
    assert_eq!(r["version"].as_u64(), Some(v1), "{r}");
    eventually(Duration::from_secs(30), "the restart failed", || {
        let log = std::fs::read_to_string(c.a.log("scheduler")).unwrap_or_default();
        log.contains(&format!("the deploy of v{v1} ended: Failed"))
            .then_some(())
    });
    // The app is still the scheduler's to reconcile: a scale down happens.
    c.api
        .call(
            "formation.scale",
            json!({"app": c.app, "changes": [{"type": "web", "quantity": 1}]}),
        )
        .expect("formation.scale");
    eventually(Duration::from_secs(20), "one instance left", || {
        (live(&c.instances()).len() == 1).then_some(())
    });
}
