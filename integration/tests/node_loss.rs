//! Node loss for real: three runner nodes in network namespaces of their own,
//! the control daemons (heartbeat, locker, api, blobstore, balancer, scheduler)
//! in another, joined by a bridge (`paddock_integration::netns`). A node is cut
//! off by taking its link down, so its runner and its instances keep running,
//! unreachable, exactly as when a switch port or a cable dies.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use paddock_integration::api::{create_user, wait_migrated};
use paddock_integration::netns::{rehost, Net, CONTROL_IP};
use paddock_integration::sched::{add_scheduler, tune_runner, version_slug};
use paddock_integration::*;
use serde_json::{json, Value};

/// Fields drop in order: the daemons first, the namespaces last.
struct World {
    ctl: Node,
    nodes: Vec<Node>,
    app: String,
    balancer: SocketAddr,
    t: TestDir,
    _pg: Postgres,
    account: Option<AppAccount>,
    net: Net,
}

impl World {
    /// The cluster, with `web=3` of a succeeded release placed one per node.
    fn start(name: &str, scheduler: &[(&str, i64)], scheduling: Value) -> World {
        let net = Net::new(name, 3);
        net.enter();
        let t = TestDir::new(name);
        let pg = Postgres::private(t.path());
        let key = test_key();
        let mut ctl = Node::new(t.path(), "ctl", &key, &[], Some(pg.url()));
        add_scheduler(&mut ctl, scheduler);
        // A request in flight to a node that is cut off gets its 504 in 5 s,
        // not the default 30.
        ctl.file
            .daemons
            .get_mut("balancer")
            .unwrap()
            .other
            .insert("request_timeout_ms".into(), toml::Value::Integer(5000));
        rehost(&mut ctl.file, CONTROL_IP);
        ctl.save();
        paddock_harness::allow_traverse(&ctl.dir).unwrap();
        for d in ["heartbeat", "locker", "api", "blobstore", "balancer"] {
            ctl.start(d);
        }
        wait_migrated(&ctl);
        let mut nodes = Vec::new();
        for k in 1..=3 {
            let mut n = Node::new(t.path(), &format!("node-{k}"), &key, &[], None);
            tune_runner(&mut n);
            rehost(&mut n.file, &net.ip(k));
            n.file.cluster.heartbeats = ctl.file.cluster.heartbeats.clone();
            n.file.cluster.registries = vec![ctl.rpc("heartbeat")];
            n.file
                .daemons
                .get_mut("runner")
                .unwrap()
                .other
                .insert("advertise".into(), toml::Value::String(net.ip(k)));
            n.save();
            paddock_harness::allow_traverse(&n.dir).unwrap();
            net.within(k, || n.start("runner"));
            nodes.push(n);
        }
        let mut w = World {
            balancer: ctl.file.daemons["balancer"]
                .endpoint("http")
                .unwrap()
                .trim_start_matches("tcp://")
                .parse()
                .unwrap(),
            net,
            ctl,
            nodes,
            app: format!(
                "loss{}",
                &ulid::Ulid::new().to_string().to_lowercase()[20..]
            ),
            t,
            _pg: pg,
            account: None,
        };
        w.wait_runners_alive(&[1, 2, 3]);
        create_user(&w.ctl, "alice", false);
        let mut api = w.ctl.client("api");
        api.call("app.create", json!({"name": w.app, "owner": "alice"}))
            .expect("app.create");
        w.account = Some(AppAccount::make(&w.app));
        let slug = version_slug(w.t.path(), "v1", "0.0.0.0");
        let mut blob = w.ctl.client("blobstore");
        let stored = paddock_blob::put_file_blocking(&mut blob, &slug).expect("blob put");
        let r = api
            .call(
                "release.create",
                json!({"app": w.app, "slug": format!("sha256:{}", stored.sha256),
                       "process_types": {"web": "python3 -u app.py"},
                       "scheduling": scheduling,
                       "description": "node loss", "created_by": "user:alice"}),
            )
            .expect("release.create");
        let v = r["release"]["version"].as_u64().unwrap();
        api.call(
            "release.status",
            json!({"app": w.app, "version": v, "status": "succeeded"}),
        )
        .expect("release.status");
        api.call(
            "formation.scale",
            json!({"app": w.app, "changes": [{"type": "web", "quantity": 3, "memory_mb": 128}]}),
        )
        .expect("formation.scale");
        w.ctl.start("scheduler");
        eventually(Duration::from_secs(30), "web=3 up, one per node", || {
            let up = w.up();
            let nodes: std::collections::BTreeSet<&String> = up.values().collect();
            (up.len() == 3 && nodes.len() == 3).then_some(())
        });
        eventually(Duration::from_secs(10), "the app served", || {
            http::get(w.balancer, &w.host(), "/")
                .ok()
                .filter(|r| r.status == 200)
        });
        w
    }

    fn host(&self) -> String {
        format!("{}.localhost", self.app)
    }

    fn wait_runners_alive(&self, ks: &[usize]) {
        let mut hb = self.ctl.client("heartbeat");
        eventually(Duration::from_secs(20), "runners alive", || {
            let l = hb.call("registry.list", json!({})).ok()?;
            ks.iter()
                .all(|k| {
                    l["services"].as_array().is_some_and(|s| {
                        s.iter().any(|e| {
                            e["daemon"] == "runner"
                                && e["node"] == format!("node-{k}")
                                && e["state"] == "alive"
                        })
                    })
                })
                .then_some(())
        });
    }

    /// The runner's state on the heartbeat's view of node `k`.
    fn runner_state(&self, k: usize) -> String {
        let mut hb = self.ctl.client("heartbeat");
        let l = hb.call("registry.list", json!({})).unwrap();
        l["services"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["daemon"] == "runner" && e["node"] == format!("node-{k}"))
            .map(|e| e["state"].as_str().unwrap_or("").to_string())
            .max_by_key(|s| match s.as_str() {
                "alive" => 2,
                "suspect" => 1,
                _ => 0,
            })
            .unwrap_or_default()
    }

    /// The app's instances on node `k` (asked from the control namespace; an
    /// unreachable node answers nothing).
    fn on_node(&self, k: usize) -> Option<Vec<Value>> {
        let mut c = self.nodes[k - 1]
            .client("runner")
            .with_timeout(Duration::from_millis(800));
        let v = c.call("instance.list", json!({})).ok()?;
        Some(
            v["instances"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|i| i["app"] == self.app.as_str())
                .cloned()
                .collect(),
        )
    }

    /// Up instances of the app on reachable nodes: id → node.
    fn up(&self) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        for k in 1..=3 {
            for i in self.on_node(k).unwrap_or_default() {
                if i["state"] == "up" {
                    out.insert(i["id"].as_str().unwrap().to_string(), format!("node-{k}"));
                }
            }
        }
        out
    }

    /// The leader's route table entry for the app: backend addresses.
    fn routed(&self) -> Option<Vec<String>> {
        let mut c = self.ctl.client("scheduler");
        let t = c.call("routes.snapshot", json!({})).ok()?;
        let e = t["apps"]
            .as_array()?
            .iter()
            .find(|e| e["app"] == self.app.as_str())?
            .clone();
        Some(
            e["backends"]
                .as_array()?
                .iter()
                .filter(|b| b["draining"] != true)
                .map(|b| b["addr"].as_str().unwrap_or("").to_string())
                .collect(),
        )
    }
}

#[test]
fn a_node_cut_off_serves_elsewhere_and_when_back_runs_nothing_twice() {
    let w = World::start(
        "loss",
        &[("node_settle_ms", 3000), ("drain_ms", 1000)],
        json!({}),
    );
    let cut_ip = w.net.ip(2);
    let before = w.on_node(2).unwrap();
    assert_eq!(before.len(), 1, "{before:?}");
    let lost_id = before[0]["id"].as_str().unwrap().to_string();

    let load = http::Load::start(w.balancer, &w.host(), "/", 2);
    let cut_at = Instant::now();
    w.net.cut(2);
    // The heartbeat declares it dead (it cannot beat any more)…
    eventually(Duration::from_secs(10), "node-2 declared dead", || {
        (w.runner_state(2) == "dead").then_some(())
    });
    let dead_at = Instant::now();
    // …and its instance is replaced on the others and routed there only.
    eventually(
        Duration::from_secs(20),
        "3 up on nodes 1 and 3, node-2 out of the routes",
        || {
            let up: BTreeMap<String, String> = [1, 3]
                .iter()
                .flat_map(|k| {
                    w.on_node(*k)
                        .unwrap_or_default()
                        .into_iter()
                        .filter(|i| i["state"] == "up")
                        .map(move |i| (i["id"].as_str().unwrap().to_string(), format!("node-{k}")))
                })
                .collect();
            let routed = w.routed()?;
            let ok = up.len() == 3
                && routed.len() == 3
                && routed.iter().all(|a| !a.starts_with(&format!("{cut_ip}:")));
            ok.then_some(())
        },
    );
    let served_at = Instant::now();
    eprintln!(
        "node-2 cut: declared dead after {:.1} s, serving elsewhere {:.1} s after that",
        (dead_at - cut_at).as_secs_f64(),
        (served_at - dead_at).as_secs_f64()
    );
    // The cut node's runner never heard of it and still runs its instance.
    // Requests after the move all succeed.
    let after = http::Load::start(w.balancer, &w.host(), "/", 2);
    std::thread::sleep(Duration::from_secs(2));
    let report = after.finish();
    assert!(report.ok > 0, "{report:?}");
    assert_eq!(report.failed, 0, "requests failed once moved: {report:?}");
    let during = load.finish();
    eprintln!("during the loss: {during:?}");

    // The node comes back: its old instance is stopped (fenced by the newer
    // placement), nothing new goes there before it has settled, and the app
    // runs exactly 3.
    w.net.restore(2);
    w.wait_runners_alive(&[2]);
    eventually(
        Duration::from_secs(20),
        "the returned node's instance stopped",
        || {
            let on2 = w.on_node(2)?;
            let old_live = on2.iter().any(|i| {
                i["id"] == lost_id.as_str()
                    && !matches!(i["state"].as_str(), Some("stopped" | "stopping"))
            });
            (!old_live).then_some(())
        },
    );
    // Counts equal the formation exactly, and stay so.
    let deadline = Instant::now() + Duration::from_secs(4);
    while Instant::now() < deadline {
        let live: usize = (1..=3)
            .map(|k| {
                w.on_node(k)
                    .unwrap_or_default()
                    .iter()
                    .filter(|i| !matches!(i["state"].as_str(), Some("stopped" | "stopping")))
                    .count()
            })
            .sum();
        assert!(live <= 3, "more than the formation runs: {live}");
        std::thread::sleep(Duration::from_millis(200));
    }
    eventually(Duration::from_secs(10), "3 up", || {
        (w.up().len() == 3).then_some(())
    });
}

/// `stop_after_disconnect`: an instance that asked for it is stopped by its own
/// runner once no scheduler has reached the node for that long (so a worker
/// that must never run twice does not, once it is placed elsewhere); while the
/// scheduler reaches the node, it keeps running however long that is.
#[test]
fn stop_after_disconnect_stops_a_cut_off_nodes_instance_by_itself() {
    let w = World::start(
        "sad",
        &[("node_settle_ms", 3000), ("drain_ms", 1000)],
        json!({"web": {"stop_after_disconnect": 2}}),
    );
    let on2 = w.on_node(2).unwrap();
    assert_eq!(on2.len(), 1, "{on2:?}");
    let id = on2[0]["id"].as_str().unwrap().to_string();
    let record = w.nodes[1]
        .dir
        .join("state/runner/instances")
        .join(&id)
        .join("instance.json");
    let running = || -> bool {
        let r: Value = serde_json::from_str(&std::fs::read_to_string(&record).unwrap()).unwrap();
        r["running"] == true
    };
    // Asked for 2 s; the scheduler gives at least two passes and a leader's
    // failover: 2 × resync_ms (500) + lease_ttl_ms (3000).
    let spec: Value = serde_json::from_str(&std::fs::read_to_string(&record).unwrap()).unwrap();
    assert_eq!(spec["spec"]["stop_after_disconnect_ms"], 4000, "{spec}");
    // Connected for twice the limit: it keeps running.
    std::thread::sleep(Duration::from_secs(8));
    assert!(running(), "stopped while the scheduler reached its node");
    assert_eq!(w.on_node(2).unwrap()[0]["state"], "up");
    let kept: Vec<(usize, String, Value)> = [1, 3]
        .iter()
        .map(|k| {
            let i = w.on_node(*k).unwrap().remove(0);
            (*k, i["id"].as_str().unwrap().to_string(), i["pid"].clone())
        })
        .collect();

    let cut_at = Instant::now();
    w.net.cut(2);
    eventually(
        Duration::from_secs(15),
        "the cut-off node's runner stopped its instance",
        || (!running()).then_some(()),
    );
    // Counted from the scheduler's last contact, at most a resync (500 ms)
    // before the cut.
    let stopped_after = cut_at.elapsed();
    assert!(
        stopped_after >= Duration::from_millis(3400),
        "stopped {stopped_after:?} after the cut, well before its 4 s"
    );
    // The nodes the scheduler still reaches kept theirs, untouched.
    for (k, id, pid) in &kept {
        let now = w.on_node(*k).unwrap();
        assert!(
            now.iter()
                .any(|i| i["id"] == id.as_str() && i["pid"] == *pid && i["state"] == "up"),
            "node-{k}'s {id} was stopped or restarted: {now:?}"
        );
    }
    // Meanwhile the scheduler placed it elsewhere.
    eventually(Duration::from_secs(20), "3 up on nodes 1 and 3", || {
        let n: usize = [1, 3]
            .iter()
            .map(|k| {
                w.on_node(*k)
                    .unwrap_or_default()
                    .iter()
                    .filter(|i| i["state"] == "up")
                    .count()
            })
            .sum();
        (n == 3).then_some(())
    });
    w.net.restore(2);
    w.wait_runners_alive(&[2]);
    let live2 = w
        .on_node(2)
        .unwrap()
        .into_iter()
        .filter(|i| !matches!(i["state"].as_str(), Some("stopped" | "stopping")))
        .count();
    assert_eq!(live2, 0, "the returned node runs its old instance again");
}
