//! `git push` to a rollout, end to end, with real daemons: node-a runs the
//! heartbeat, locker, api, blobstore, deployer, gitserver (its own sshd), a
//! balancer, the scheduler and a runner; node-b runs a second runner. A user
//! with an SSH key pushes a small stdlib Python app whose behaviour is chosen by
//! files in the pushed tree (`marker`: what it answers with, also as its
//! `X-Backend` header; `knobs`: never listen, wait before binding, exit after a
//! while), while requests go through the balancer to `APP.localhost`.
//!
//! - a push under load: rolled out surge 1 with the progress lines relayed, no
//!   failed request, never fewer routed or up instances than the formation;
//! - a release that never binds: never routed, the push rejected, the release
//!   failed at the api, an `alert` published and audited, the old one serving;
//! - a release that passes its first health check and then exits: rolled back;
//! - a newer push cancels an older push's rollout: only the newer one runs;
//! - `config.set`: a rolling restart with the new environment, no failed request;
//! - an unplaceable formation: the scheduler's `formation.check` says "N of M
//!   placed" (and the api refuses the scale, when it asks the scheduler).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use paddock_config::credentials::UserCredentials;
use paddock_integration::api::{create_user, user_client, wait_migrated};
use paddock_integration::http::{Load, Report};
use paddock_integration::*;
use paddock_wire::client::Subscriber;
use paddock_wire::{Client, Credentials};
use serde_json::{json, Value};

/// The test app. `marker` is what it answers (with `$GREETING`) and its
/// `X-Backend` header, so a load loop can tell which code answered; `knobs`
/// (`name=value` lines) change how it behaves.
const APP_PY: &str = r#"
import os, sys, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HERE = os.path.dirname(os.path.abspath(__file__))

def knob(name, default=None):
    try:
        with open(os.path.join(HERE, "knobs")) as f:
            for line in f:
                k, _, v = line.strip().partition("=")
                if k == name:
                    return v
    except FileNotFoundError:
        pass
    return default

MARKER = open(os.path.join(HERE, "marker")).read().strip()
GREETING = os.environ.get("GREETING", "")
print("app %s starting, GREETING=%s" % (MARKER, GREETING), flush=True)

if knob("never_listen"):
    # Alive, but never binds its port: its health check never passes.
    while True:
        time.sleep(3600)
time.sleep(float(knob("bind_delay", "0")))

class H(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def do_GET(self):
        body = ("%s %s" % (MARKER, GREETING)).strip().encode()
        self.send_response(int(knob("status", "200")))
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Backend", MARKER)
        self.end_headers()
        self.wfile.write(body)

server = ThreadingHTTPServer(("0.0.0.0", int(os.environ["PORT"])), H)
exit_after = knob("exit_after")
if exit_after:
    threading.Timer(float(exit_after), lambda: os._exit(3)).start()
print("app %s listening on %s" % (MARKER, os.environ["PORT"]), flush=True)
server.serve_forever()
"#;

/// The scheduler's and runners' timings for one test.
#[derive(Clone, Copy, Debug)]
struct Timings {
    min_healthy_ms: i64,
    healthy_deadline_ms: i64,
    drain_ms: i64,
    watch_window_ms: i64,
    offer_memory_mb: i64,
}

impl Default for Timings {
    fn default() -> Self {
        Timings {
            min_healthy_ms: 1000,
            healthy_deadline_ms: 10_000,
            drain_ms: 1000,
            watch_window_ms: 3000,
            offer_memory_mb: 4096,
        }
    }
}

/// The shared short runner settings, offering `t.offer_memory_mb`; the
/// scheduler's section with `t`'s timings. Its pub endpoint.
fn configure(a: &mut Node, b: &mut Node, t: &Timings) -> String {
    for n in [&mut *a, &mut *b] {
        sched::tune_runner(n);
        let r = n.file.daemons.get_mut("runner").unwrap();
        for (k, v) in [
            ("health_interval_ms", 200),
            ("offer_memory_mb", t.offer_memory_mb),
        ] {
            r.other.insert(k.into(), toml::Value::Integer(v));
        }
        n.save();
    }
    sched::add_scheduler(
        a,
        &[
            ("min_healthy_ms", t.min_healthy_ms),
            ("healthy_deadline_ms", t.healthy_deadline_ms),
            ("drain_ms", t.drain_ms),
            ("watch_window_ms", t.watch_window_ms),
            ("progress_deadline_ms", 45_000),
        ],
    )
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn ssh_command(key: &Path) -> String {
    format!(
        "ssh -i {} -o IdentitiesOnly=yes -o BatchMode=yes -o StrictHostKeyChecking=no \
         -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR",
        key.display()
    )
}

/// The app's work tree: one commit per version of it.
struct Tree {
    dir: PathBuf,
}

impl Tree {
    fn new(base: &Path) -> Tree {
        let dir = base.join("tree");
        std::fs::create_dir_all(&dir).unwrap();
        let t = Tree { dir };
        t.git(&["init", "-q", "-b", "main"]);
        t.git(&["config", "user.email", "t@example.com"]);
        t.git(&["config", "user.name", "t"]);
        t
    }

    fn git(&self, args: &[&str]) {
        let o = Command::new("git")
            .args(args)
            .current_dir(&self.dir)
            .env("HOME", &self.dir)
            .output()
            .unwrap();
        assert!(o.status.success(), "git {args:?}: {}", text(&o));
    }

    /// Commits the app answering `marker`, with `knobs`.
    fn commit(&self, marker: &str, knobs: &str) {
        for (f, body) in [
            ("Procfile", "web: python3 -u app.py\n"),
            ("app.py", APP_PY),
            ("marker", marker),
            ("knobs", knobs),
        ] {
            std::fs::write(self.dir.join(f), body).unwrap();
        }
        self.git(&["add", "-A"]);
        self.git(&["commit", "-q", "--allow-empty", "-m", marker]);
    }

    fn head(&self) -> String {
        let o = Command::new("git")
            .args(["rev-parse", "HEAD"])
            .current_dir(&self.dir)
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    }
}

/// `git push` running in the background, its stderr read line by line.
struct Pushing {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Pushing {
    /// Waits for a line containing `what`; panics with what was seen.
    fn wait_for(&mut self, what: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(l) = self.lines.recv_timeout(Duration::from_millis(100)) {
                let hit = l.contains(what);
                self.seen.push(l);
                if hit {
                    return;
                }
            }
        }
        panic!("no line with {what:?} in: {:#?}", self.seen);
    }

    /// Whether it succeeded, and everything it printed; Err with what it
    /// printed when it has not ended within `timeout` (it is then killed: a
    /// push waits up to 30 minutes for a rollout, far past a test's limit).
    fn finish_within(mut self, timeout: Duration) -> Result<(bool, String), String> {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                break Some(st);
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break None;
            }
            if let Ok(l) = self.lines.recv_timeout(Duration::from_millis(100)) {
                self.seen.push(l);
            }
        };
        while let Ok(l) = self.lines.recv_timeout(Duration::from_secs(2)) {
            self.seen.push(l);
        }
        let log = self.seen.join("\n");
        match status {
            Some(st) => Ok((st.success(), log)),
            None => Err(log),
        }
    }

    /// As `finish_within`, panicking when it does not end in 40 s.
    fn finish(self) -> (bool, String) {
        self.finish_within(PUSH_TIMEOUT)
            .unwrap_or_else(|log| panic!("the push did not end within {PUSH_TIMEOUT:?}:\n{log}"))
    }
}

/// The longest a push may take here (its build is a second or two; its
/// rollout a few seconds, or a deadline of at most 25 s).
const PUSH_TIMEOUT: Duration = Duration::from_secs(40);

/// The version a push rolled out (`-----> Rolling out vN`).
fn rolled_out(log: &str) -> u64 {
    log.split("Rolling out v")
        .nth(1)
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no `Rolling out vN` in:\n{log}"))
}

/// The cluster, its user `alice` (with an SSH key) and her app. Fields drop in
/// order: the daemons stop before the database goes, the directory last.
struct Cluster {
    a: Node,
    b: Node,
    /// The api with the cluster key.
    api: Client,
    alice: UserCredentials,
    alice_key: PathBuf,
    app: String,
    domain: String,
    front: SocketAddr,
    sched_pub: String,
    tree: Tree,
    _pg: Postgres,
    _t: TestDir,
    /// Last: removed once the daemons and the app's processes are gone.
    _account: AppAccount,
}

impl Cluster {
    fn start(name: &str, timings: Timings) -> Cluster {
        let t = TestDir::new(name);
        let pg = Postgres::start(t.path());
        let key = test_key();
        let mut a = Node::new(t.path(), "node-a", &key, &[], Some(pg.url()));
        let mut b = Node::new(
            t.path(),
            "node-b",
            &key,
            &[tcp(a.ports.heartbeat_pull)],
            Some(pg.url()),
        );
        b.file.cluster.registries = vec![a.rpc("heartbeat")];
        let sched_pub = configure(&mut a, &mut b, &timings);
        paddock_harness::allow_traverse(&a.dir).unwrap();
        paddock_harness::allow_traverse(&b.dir).unwrap();
        for d in ["heartbeat", "locker", "api"] {
            a.start(d);
        }
        wait_migrated(&a);
        for d in [
            "blobstore",
            "runner",
            "balancer",
            "deployer",
            "gitserver",
            "scheduler",
        ] {
            a.start(d);
        }
        b.start("runner");
        let mut hb = a.client("heartbeat");
        eventually(Duration::from_secs(20), "every daemon registered", || {
            let l = hb.call("registry.list", json!({})).ok()?;
            let alive = |d: &str, n: &str| {
                l["services"].as_array().is_some_and(|s| {
                    s.iter()
                        .any(|e| e["daemon"] == d && e["node"] == n && e["state"] == "alive")
                })
            };
            let all = [
                "api",
                "blobstore",
                "locker",
                "runner",
                "deployer",
                "gitserver",
                "balancer",
                "scheduler",
            ]
            .iter()
            .all(|d| alive(d, "node-a"))
                && alive("runner", "node-b");
            all.then_some(())
        });
        let mut sched = a.client("scheduler");
        eventually(Duration::from_secs(20), "the scheduler leads", || {
            let s = sched.call("scheduler.status", json!({})).ok()?;
            (s["leader"] == true).then_some(())
        });

        let alice = create_user(&a, "alice", false);
        let alice_key = t.path().join("alice");
        let st = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", "alice", "-f"])
            .arg(&alice_key)
            .status()
            .unwrap();
        assert!(st.success());
        let public = std::fs::read_to_string(alice_key.with_extension("pub")).unwrap();
        let mut me = user_client(&alice);
        me.call("sshkey.add", json!({ "public_key": public.trim() }))
            .expect("sshkey.add");
        let app = format!("ro{}", &ulid::Ulid::new().to_string().to_lowercase()[20..]);
        me.call("app.create", json!({ "name": app }))
            .expect("app.create");
        // The app's account made once, here (see scheduler.rs: two runners of one
        // host making it at the same moment once left one with another's uid).
        let account = AppAccount::make(&app);
        let mut api = a.client("api");
        let state = api.call("app.state", json!({ "app": app })).unwrap();
        let domain = state["app"]["domains"][0]
            .as_str()
            .unwrap_or_else(|| panic!("no domain: {state}"))
            .to_string();
        let front: SocketAddr = format!("127.0.0.1:{}", a.ports.balancer_http)
            .parse()
            .unwrap();
        let tree = Tree::new(t.path());
        Cluster {
            a,
            b,
            api,
            alice,
            alice_key,
            app,
            domain,
            front,
            sched_pub,
            tree,
            _pg: pg,
            _t: t,
            _account: account,
        }
    }

    fn url(&self) -> String {
        format!(
            "ssh://git@127.0.0.1:{}/{}.git",
            self.a.ports.gitserver_ssh, self.app
        )
    }

    /// `git push URL main` of the tree, in the background.
    fn push_start(&self) -> Pushing {
        let mut child = Command::new("git")
            .args(["push", "--progress", &self.url(), "main"])
            .current_dir(&self.tree.dir)
            .env("GIT_SSH_COMMAND", ssh_command(&self.alice_key))
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("HOME", &self.tree.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let err = child.stderr.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for l in std::io::BufReader::new(err).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        Pushing {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Commits `marker` with `knobs` and pushes it: whether the push succeeded
    /// and what it printed.
    fn push(&self, marker: &str, knobs: &str) -> (bool, String) {
        self.tree.commit(marker, knobs);
        self.push_start().finish()
    }

    /// The ref the gitserver's repository has for `main`.
    fn repo_main(&self) -> Option<String> {
        let repo = self
            .a
            .dir
            .join(format!("state/gitserver/repos/{}.git", self.app));
        let out = Command::new("git")
            .arg("--git-dir")
            .arg(&repo)
            .args(["rev-parse", "--verify", "-q", "refs/heads/main"])
            .output()
            .unwrap();
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// The first push (answering `marker`) and a scale to web=2: the release
    /// serving through the balancer on both nodes; its version.
    fn deploy_base(&mut self, marker: &str) -> u64 {
        let (ok, log) = self.push(marker, "");
        assert!(ok, "the first push failed:\n{log}{}", self.logs());
        let v = rolled_out(&log);
        assert!(
            log.contains(&format!("Done: {} v{v} is serving", self.app)),
            "{log}"
        );
        self.api
            .call(
                "formation.scale",
                json!({"app": self.app, "changes": [{"type": "web", "quantity": 2}]}),
            )
            .expect("formation.scale");
        eventually(Duration::from_secs(30), "two instances up", || {
            let l = self.instances();
            let up: BTreeSet<&str> = live(&l)
                .iter()
                .filter(|i| i["state"] == "up" && i["release"].as_u64() == Some(v))
                .map(|i| i["node"].as_str().unwrap())
                .collect();
            (up.len() == 2 && live(&l).len() == 2).then_some(())
        });
        eventually(Duration::from_secs(15), "both through the balancer", || {
            let ids = self.routed_ids()?;
            (ids.len() == 2 && self.get_text().as_deref() == Some(marker)).then_some(())
        });
        v
    }

    /// GET / through the balancer: the body of a 200.
    fn get_text(&self) -> Option<String> {
        let r = http::get(self.front, &self.domain, "/").ok()?;
        (r.status == 200).then(|| r.text())
    }

    fn load(&self) -> Load {
        Load::start(self.front, &self.domain, "/", 2)
    }

    /// The app's instances on both nodes: id → item (with "node").
    fn instances(&self) -> BTreeMap<String, Value> {
        instances_on(
            &[
                (self.a.name.clone(), self.a.rpc("runner")),
                (self.b.name.clone(), self.b.rpc("runner")),
            ],
            &self.a.keys,
            &self.app,
        )
        .expect("instance.list")
    }

    /// The scheduler's routed backends of the app (not draining).
    fn routed_ids(&self) -> Option<BTreeSet<String>> {
        let snap = self
            .a
            .client("scheduler")
            .call("routes.snapshot", json!({}))
            .ok()?;
        Some(backends(&snap, &self.app).0)
    }

    fn release(&self, version: u64) -> Value {
        user_client(&self.alice)
            .call("release.info", json!({"app": self.app, "version": version}))
            .expect("release.info")["release"]
            .clone()
    }

    fn app_state(&mut self) -> Value {
        self.api
            .call("app.state", json!({ "app": self.app }))
            .expect("app.state")["app"]
            .clone()
    }

    fn audit(&self) -> Vec<Value> {
        user_client(&self.alice)
            .call("audit.list", json!({"app": self.app, "limit": 500}))
            .expect("audit.list")["entries"]
            .as_array()
            .unwrap()
            .clone()
    }

    fn subscribe(&self, prefix: &str) -> Subscriber {
        Subscriber::connect(
            std::slice::from_ref(&self.sched_pub),
            &[prefix],
            self.a.keys.clone(),
        )
        .unwrap()
    }

    /// Polls the scheduler's table and the runners until stopped.
    fn watch(&self) -> Watch {
        let stop = Arc::new(AtomicBool::new(false));
        let (sched, keys, app) = (
            self.a.rpc("scheduler"),
            self.a.keys.clone(),
            self.app.clone(),
        );
        let runners = vec![
            (self.a.name.clone(), self.a.rpc("runner")),
            (self.b.name.clone(), self.b.rpc("runner")),
        ];
        let halt = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut seen = Seen {
                min_routed: usize::MAX,
                min_up: usize::MAX,
                ..Default::default()
            };
            let mut c = Client::connect(&sched, "user:test", keys.clone())
                .unwrap()
                .with_timeout(Duration::from_secs(5));
            let mut last_live = 0;
            while !halt.load(Ordering::SeqCst) {
                if let Ok(snap) = c.call("routes.snapshot", json!({})) {
                    let (routed, all) = backends(&snap, &app);
                    seen.min_routed = seen.min_routed.min(routed.len());
                    seen.backends.extend(all);
                    seen.table_polls += 1;
                }
                if let Ok(l) = instances_on(&runners, &keys, &app) {
                    let up: Vec<&Value> = live(&l)
                        .into_iter()
                        .filter(|i| i["state"] == "up")
                        .collect();
                    seen.min_up = seen.min_up.min(up.len());
                    // Held for two looks in a row: the runners are asked one
                    // after the other, so a start and a stop sent together may
                    // show both for one look.
                    let now_live = live(&l).len();
                    seen.max_live = seen.max_live.max(now_live.min(last_live));
                    last_live = now_live;
                    seen.up_ids
                        .extend(up.iter().map(|i| i["id"].as_str().unwrap().to_string()));
                    seen.runner_polls += 1;
                }
                std::thread::sleep(Duration::from_millis(30));
            }
            seen
        });
        Watch { stop, handle }
    }

    fn logs(&self) -> String {
        let mut s = String::new();
        for (n, d) in [
            (&self.a, "scheduler"),
            (&self.a, "gitserver"),
            (&self.a, "deployer"),
            (&self.a, "runner"),
            (&self.b, "runner"),
        ] {
            let text = std::fs::read_to_string(n.log(d)).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            s += &format!("\n--- {} {d} (last 60 lines)\n", n.name);
            s += &lines[lines.len().saturating_sub(60)..].join("\n");
        }
        s
    }
}

/// What a [`Watch`] saw.
#[derive(Debug, Default)]
struct Seen {
    table_polls: u32,
    runner_polls: u32,
    /// The fewest backends of the app routed (not draining) in one table.
    min_routed: usize,
    /// The fewest instances of the app up on the runners at one look.
    min_up: usize,
    /// The most instances of the app not stopping or stopped at two looks in
    /// a row.
    max_live: usize,
    /// Every backend id the table had.
    backends: BTreeSet<String>,
    /// Every instance id seen up.
    up_ids: BTreeSet<String>,
}

struct Watch {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<Seen>,
}

impl Watch {
    fn finish(self) -> Seen {
        self.stop.store(true, Ordering::SeqCst);
        let seen = self.handle.join().expect("watch thread");
        assert!(
            seen.table_polls > 10 && seen.runner_polls > 10,
            "the watch hardly looked: {seen:?}"
        );
        seen
    }
}

/// The app's backends in a `routes.snapshot`: (not draining, all).
fn backends(snap: &Value, app: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let entry = snap["apps"]
        .as_array()
        .and_then(|a| a.iter().find(|e| e["app"] == app).cloned())
        .unwrap_or(Value::Null);
    let mut routed = BTreeSet::new();
    let mut all = BTreeSet::new();
    for b in entry["backends"].as_array().into_iter().flatten() {
        let id = b["id"].as_str().unwrap_or_default().to_string();
        if b["draining"] != true {
            routed.insert(id.clone());
        }
        all.insert(id);
    }
    (routed, all)
}

fn instances_on(
    runners: &[(String, String)],
    keys: &Credentials,
    app: &str,
) -> Result<BTreeMap<String, Value>, paddock_wire::ClientError> {
    let mut out = BTreeMap::new();
    for (node, rpc) in runners {
        let mut c = Client::connect(rpc, "user:test", keys.clone())
            .unwrap()
            .with_timeout(Duration::from_secs(5));
        let v = c.call("instance.list", json!({}))?;
        for i in v["instances"].as_array().into_iter().flatten() {
            if i["app"] == app {
                let mut i = i.clone();
                i["node"] = json!(node);
                out.insert(i["id"].as_str().unwrap().to_string(), i);
            }
        }
    }
    Ok(out)
}

/// Instances not stopping or stopped.
fn live(list: &BTreeMap<String, Value>) -> Vec<&Value> {
    list.values()
        .filter(|i| !matches!(i["state"].as_str(), Some("stopping" | "stopped")))
        .collect()
}

/// Whether `id` is an instance of release `v` (`APP.web.vN.tT.K`).
fn of_version(id: &str, v: u64) -> bool {
    id.contains(&format!(".v{v}."))
}

/// Ends the load once the runners and the table have only release `v`
/// (`quantity` of it, up, routed): no request is left in flight to an old one.
fn finish_load_on(c: &Cluster, load: Load, v: u64, quantity: usize) -> Report {
    eventually(Duration::from_secs(20), "only the new release left", || {
        let l = c.instances();
        let live = live(&l);
        let all_new = live.len() == quantity
            && live
                .iter()
                .all(|i| i["state"] == "up" && i["release"].as_u64() == Some(v));
        let snap =
            c.a.client("scheduler")
                .call("routes.snapshot", json!({}))
                .ok()?;
        let (routed, all) = backends(&snap, &c.app);
        let table_new =
            routed.len() == quantity && routed == all && all.iter().all(|id| of_version(id, v));
        (all_new && table_new).then_some(())
    });
    load.finish()
}

/// web=2 serving "one"; "two" pushed while two clients send requests through
/// the balancer: the push relays the rollout (a start, its health check, a
/// drain, live) and returns once "two" serves; no request failed, the table
/// never had fewer than 2 routed backends nor the runners fewer than 2 up
/// instances, and never more than 3 ran (surge 1).
#[test]
fn a_push_under_load_rolls_out_surge_one_with_no_failed_request() {
    let mut c = Cluster::start("rollout-push", Timings::default());
    let old = c.deploy_base("one");
    let watch = c.watch();
    let load = c.load();
    let began = Instant::now();
    let (ok, log) = c.push("two", "");
    let pushed_in = began.elapsed();
    assert!(ok, "the push failed:\n{log}{}", c.logs());
    let v = rolled_out(&log);
    assert_eq!(v, old + 1);
    // Served the moment the push returned.
    assert_eq!(c.get_text().as_deref(), Some("two"), "{log}");
    // The rollout's trail, relayed to the pusher in order.
    let app = c.app.clone();
    let trail = [
        format!("Rolling out v{v}"),
        format!("starting web.v{v}."),
        "(health check passed)".to_string(),
        format!("draining web.v{old}."),
        format!("v{v} is live"),
        format!("Done: {app} v{v} is serving"),
    ];
    let mut at = 0;
    for step in &trail {
        let i = log[at..]
            .find(step.as_str())
            .unwrap_or_else(|| panic!("no {step:?} after byte {at} of:\n{log}"));
        at += i;
    }
    assert!(log.contains(" up on node-"), "{log}");
    assert_eq!(c.repo_main(), Some(c.tree.head()));
    let report = finish_load_on(&c, load, v, 2);
    let seen = watch.finish();
    assert_eq!(
        report.failed,
        0,
        "requests failed during the rollout: {report:?}{}",
        c.logs()
    );
    assert!(
        report.by_backend.get("one").is_some_and(|n| *n > 0)
            && report.by_backend.get("two").is_some_and(|n| *n > 0),
        "both releases answered: {report:?}"
    );
    assert!(
        seen.min_routed >= 2,
        "fewer than 2 routed backends at one time: {seen:?}"
    );
    assert!(seen.min_up >= 2, "fewer than 2 up at one time: {seen:?}");
    assert!(seen.max_live <= 3, "surge 1: at most 3 at once: {seen:?}");
    assert_eq!(
        seen.backends.iter().filter(|id| of_version(id, v)).count(),
        2,
        "two new backends were routed: {seen:?}"
    );
    assert_eq!(c.release(v)["status"], "succeeded");
    let state = c.app_state();
    assert_eq!(state["current"]["version"].as_u64(), Some(v), "{state}");
    assert!(state["pending"].is_null(), "{state}");
    eprintln!(
        "v{v} pushed and rolled out in {pushed_in:?}; never fewer than {} routed / {} up, at most {} at once; \
         through the balancer {} ok, {} failed, {} retried, by backend {:?}",
        seen.min_routed, seen.min_up, seen.max_live, report.ok, report.failed, report.retried, report.by_backend
    );
}

#[test]
fn a_release_that_never_binds_is_never_routed_and_its_push_is_rejected() {
    let mut c = Cluster::start(
        "rollout-nobind",
        Timings {
            healthy_deadline_ms: 5000,
            ..Timings::default()
        },
    );
    let old = c.deploy_base("one");
    let base_head = c.repo_main();
    let serving: BTreeSet<String> = live(&c.instances())
        .iter()
        .map(|i| i["id"].as_str().unwrap().to_string())
        .collect();
    let mut alerts = c.subscribe("alert");
    let watch = c.watch();
    let load = c.load();
    let began = Instant::now();
    let (ok, log) = c.push("never", "never_listen=1\n");
    let rejected_in = began.elapsed();
    assert!(
        !ok,
        "the push of a release that never binds succeeded:\n{log}"
    );
    let v = rolled_out(&log);
    assert!(log.contains(&format!("starting web.v{v}.")), "{log}");
    assert!(
        log.contains(&format!("Push rejected: v{v} did not go live: ")),
        "{log}"
    );
    assert!(log.contains("was not up within 5s"), "{log}");
    assert!(log.contains("The previous release keeps serving"), "{log}");
    assert!(log.contains("pre-receive hook declined"), "{log}");
    assert!(!log.contains(" up on node-"), "{log}");
    // git moved no ref.
    assert_eq!(c.repo_main(), base_head);

    // The new instance is stopped; the old ones, never touched, serve.
    eventually(
        Duration::from_secs(10),
        "only the old instances left",
        || {
            let l = c.instances();
            let now: BTreeSet<String> = live(&l)
                .iter()
                .map(|i| i["id"].as_str().unwrap().to_string())
                .collect();
            (now == serving).then_some(())
        },
    );
    assert_eq!(c.get_text().as_deref(), Some("one"));
    let report = load.finish();
    let seen = watch.finish();
    assert_eq!(report.failed, 0, "requests failed: {report:?}{}", c.logs());
    assert_eq!(
        report.by_backend.keys().collect::<Vec<_>>(),
        vec!["one"],
        "only the old release answered: {report:?}"
    );
    assert!(
        !seen.backends.iter().any(|id| of_version(id, v)),
        "an instance of v{v} was routed: {seen:?}"
    );
    assert!(
        !seen.up_ids.iter().any(|id| of_version(id, v)),
        "an instance of v{v} was up: {seen:?}"
    );
    assert!(seen.min_routed >= 2, "{seen:?}");
    let tried: Vec<String> = c
        .instances()
        .into_keys()
        .filter(|id| of_version(id, v))
        .collect();
    assert_eq!(tried.len(), 1, "one surge instance tried: {tried:?}");

    // The api: the release failed with the reason; the old one is current.
    let r = c.release(v);
    assert_eq!(r["status"], "failed", "{r}");
    let message = r["status_message"].as_str().unwrap_or_default().to_string();
    assert!(
        message.contains("was not up within 5s")
            && message.contains(&format!("rolling back to v{old}")),
        "{r}"
    );
    let state = c.app_state();
    assert_eq!(state["current"]["version"].as_u64(), Some(old), "{state}");
    assert!(state["pending"].is_null(), "{state}");

    // The scheduler's alert, published and in the app's audit log.
    let alert = alerts
        .next(Duration::from_secs(5))
        .unwrap()
        .expect("an alert was published");
    assert_eq!(alert.body["app"], c.app.as_str(), "{:?}", alert.body);
    let reason = alert.body["reason"].as_str().unwrap().to_string();
    // The release's failure message is the alert's reason.
    assert_eq!(reason, message);
    assert!(reason.starts_with(&format!("{} v{v}: ", c.app)), "{reason}");
    let audit = c.audit();
    let alerted = audit
        .iter()
        .find(|e| e["kind"] == "scheduler.alert")
        .unwrap_or_else(|| panic!("no scheduler.alert in the audit log: {audit:#?}"));
    assert_eq!(alerted["detail"]["reason"], reason.as_str());
    assert_eq!(alerted["actor"], "scheduler@node-a");
    let ended = audit
        .iter()
        .find(|e| e["kind"] == "scheduler.deploy" && e["detail"]["version"] == v)
        .unwrap_or_else(|| panic!("no deploy outcome in the audit log: {audit:#?}"));
    assert_eq!(ended["detail"]["outcome"], "rolled_back", "{ended}");
    eprintln!(
        "v{v} (never binds) rejected {rejected_in:?} after the push began: {message}; \
         alert: {reason}; through the balancer {} ok, {} failed, by backend {:?}",
        report.ok, report.failed, report.by_backend
    );
}

/// A release that passes its health check and exits a second later, again and
/// again: the crash loop is caught (while rolling out, or in the watch window
/// if it went live first) and the previous code serves again.
#[test]
fn a_release_that_exits_after_its_first_health_check_is_rolled_back() {
    let mut c = Cluster::start("rollout-flap", Timings::default());
    let old = c.deploy_base("one");
    let old_slug = c.app_state()["current"]["slug"].clone();
    let mut alerts = c.subscribe("alert");
    let load = c.load();
    let began = Instant::now();
    let (ok, log) = c.push("flaps", "exit_after=1\n");
    let v = rolled_out(&log);
    assert!(log.contains(&format!("starting web.v{v}.")), "{log}");
    assert!(
        log.contains(&format!("web.v{v}.t1.")) && log.contains("(health check passed)"),
        "its health check passed first:\n{log}"
    );
    // Rejected when caught while rolling out; else it went live and the watch
    // window catches it.
    if ok {
        assert!(
            log.contains(&format!("Done: {} v{v} is serving", c.app)),
            "{log}"
        );
    } else {
        assert!(
            log.contains(&format!("Push rejected: v{v} did not go live: ")),
            "{log}"
        );
    }
    let alert = alerts
        .next(Duration::from_secs(20))
        .unwrap()
        .unwrap_or_else(|| panic!("no alert:{}", c.logs()));
    let alerted_in = began.elapsed();
    let reason = alert.body["reason"].as_str().unwrap().to_string();
    assert_eq!(alert.body["app"], c.app.as_str());
    assert!(
        reason.starts_with(&format!("{} v{v}: ", c.app))
            && reason.contains("restarted")
            && reason.contains(&format!("rolling back to v{old}")),
        "{reason}"
    );
    // The previous code serves again (a pending release failed leaves the
    // current one; a live one is rolled back at the api: a new release of the
    // old code), on two instances, none of the flapping release left.
    let state = eventually(Duration::from_secs(30), "the old code serving", || {
        let s = c.app_state();
        let l = c.instances();
        let current = s["current"]["version"].as_u64()?;
        let live = live(&l);
        let back = current != v
            && s["current"]["slug"] == old_slug
            && live.len() == 2
            && live
                .iter()
                .all(|i| i["state"] == "up" && i["release"].as_u64() == Some(current))
            && s["pending"].is_null();
        back.then_some(s)
    });
    assert_eq!(c.get_text().as_deref(), Some("one"));
    assert!(
        !live(&c.instances())
            .iter()
            .any(|i| i["release"].as_u64() == Some(v)),
        "an instance of v{v} is left"
    );
    let outcome = c
        .audit()
        .into_iter()
        .find(|e| e["kind"] == "scheduler.deploy" && e["detail"]["version"] == v)
        .unwrap_or_else(|| panic!("no deploy outcome for v{v}"));
    assert_eq!(outcome["detail"]["outcome"], "rolled_back", "{outcome}");
    let report = load.finish();
    eprintln!(
        "v{v} (exits 1 s after binding): push {} ; alert {alerted_in:?} after the push began: {reason}; \
         now v{} (old code) serves; through the balancer {} ok, {} failed, by backend {:?}",
        if ok { "succeeded (caught in the watch window)" } else { "rejected" },
        state["current"]["version"], report.ok, report.failed, report.by_backend
    );
}

/// Push A's release is slow to come up (it waits 20 s before binding); while
/// its rollout runs, push B lands (the build lease went when A's build ended):
/// A's deploy is cancelled and A's push rejected, B rolls out, and none of A's
/// instances is left or was ever routed.
#[test]
fn a_newer_push_cancels_the_rollout_of_an_older_one() {
    let mut c = Cluster::start(
        "rollout-newer",
        Timings {
            healthy_deadline_ms: 25_000,
            ..Timings::default()
        },
    );
    let old = c.deploy_base("one");
    let watch = c.watch();
    let load = c.load();
    c.tree.commit("slow", "bind_delay=20\n");
    let mut first = c.push_start();
    first.wait_for("Rolling out v", Duration::from_secs(30));
    let va = old + 1;
    first.wait_for(&format!("starting web.v{va}."), Duration::from_secs(10));
    // B: a commit on top of A's (A's has not landed: its push still waits).
    c.tree.commit("three", "");
    let b_head = c.tree.head();
    let began = Instant::now();
    let (ok_b, log_b) = c.push_start().finish();
    let b_in = began.elapsed();
    assert!(ok_b, "push B failed:\n{log_b}{}", c.logs());
    let vb = rolled_out(&log_b);
    assert_eq!(vb, va + 1, "{log_b}");
    assert!(
        log_b.contains(&format!(
            "deploying v{vb} (it replaces the deploy of v{va})"
        )),
        "{log_b}"
    );
    assert!(
        log_b.contains(&format!("Done: {} v{vb} is serving", c.app)),
        "{log_b}"
    );
    // A's deploy was cancelled before B's went live: its release is marked
    // failed, and A's push, which waits for that, ends.
    let deadline = Instant::now() + Duration::from_secs(10);
    let a_release = loop {
        let r = c.release(va);
        if r["status"] != "pending" || Instant::now() > deadline {
            break r;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let scheduler_log = std::fs::read_to_string(c.a.log("scheduler")).unwrap_or_default();
    let cancelled_at = scheduler_log
        .lines()
        .find(|l| l.contains(&format!("the deploy of v{va} ended: Cancelled")))
        .unwrap_or("(no cancel in the scheduler's log)")
        .to_string();
    let (ok_a, log_a) = first
        .finish_within(Duration::from_secs(5))
        .unwrap_or_else(|log| {
            panic!(
                "push A still waited for its rollout 15 s after push B was done. The scheduler's \
                 log: {cancelled_at:?}; v{va} at the api: {a_release}. A's push so far:\n{log}"
            )
        });
    assert_eq!(a_release["status"], "failed", "{a_release}");
    assert!(!ok_a, "push A succeeded:\n{log_a}");
    assert!(
        log_a.contains(&format!(
            "the deploy of v{va} was cancelled by a newer release"
        )),
        "{log_a}"
    );
    assert!(
        log_a.contains(&format!(
            "Push rejected: v{va} did not go live: replaced by a newer release"
        )),
        "{log_a}"
    );
    assert_eq!(c.repo_main(), Some(b_head), "B's commit is main");

    let report = finish_load_on(&c, load, vb, 2);
    let seen = watch.finish();
    assert_eq!(c.get_text().as_deref(), Some("three"));
    let l = c.instances();
    let of_a: Vec<&Value> = l
        .values()
        .filter(|i| i["release"].as_u64() == Some(va))
        .collect();
    assert!(!of_a.is_empty(), "A's rollout started an instance: {l:#?}");
    assert!(
        of_a.iter().all(|i| i["state"] == "stopped"),
        "an instance of A survived: {of_a:#?}"
    );
    assert!(
        !seen.backends.iter().any(|id| of_version(id, va)),
        "an instance of v{va} was routed: {seen:?}"
    );
    assert!(
        !seen.up_ids.iter().any(|id| of_version(id, va)),
        "an instance of v{va} was up: {seen:?}"
    );
    assert_eq!(report.failed, 0, "requests failed: {report:?}{}", c.logs());
    assert!(!report.by_backend.contains_key("slow"), "{report:?}");
    assert!(seen.min_routed >= 2, "{seen:?}");
    let r = c.release(va);
    assert_eq!(r["status"], "failed", "{r}");
    assert!(
        r["status_message"]
            .as_str()
            .is_some_and(|m| m.contains("replaced by a newer release")),
        "{r}"
    );
    assert_eq!(c.release(vb)["status"], "succeeded");
    let state = c.app_state();
    assert_eq!(state["current"]["version"].as_u64(), Some(vb), "{state}");
    let cancelled = c
        .audit()
        .into_iter()
        .find(|e| e["kind"] == "scheduler.deploy" && e["detail"]["version"] == va)
        .unwrap_or_else(|| panic!("no deploy outcome for v{va}"));
    assert_eq!(cancelled["detail"]["outcome"], "cancelled", "{cancelled}");
    eprintln!(
        "v{va} (slow) cancelled by v{vb}, pushed {b_in:?} after it; through the balancer {} ok, {} failed, by backend {:?}; \
         never fewer than {} routed",
        report.ok, report.failed, report.by_backend, seen.min_routed
    );
}

/// `config.set` makes a release of the same code with the new environment:
/// rolled out surge 1 under load, every instance then answering with it.
#[test]
fn a_config_change_restarts_every_instance_with_the_new_env_under_load() {
    let mut c = Cluster::start("rollout-config", Timings::default());
    let old = c.deploy_base("one");
    let watch = c.watch();
    let load = c.load();
    let began = Instant::now();
    let set = user_client(&c.alice)
        .call(
            "config.set",
            json!({"app": c.app, "vars": {"GREETING": "bonjour"}}),
        )
        .expect("config.set");
    let v = set["release"]["version"].as_u64().unwrap();
    assert_eq!(v, old + 1, "{set}");
    eventually(Duration::from_secs(30), "the config release live", || {
        (c.release(v)["status"] == "succeeded").then_some(())
    });
    let live_in = began.elapsed();
    let report = finish_load_on(&c, load, v, 2);
    let seen = watch.finish();
    assert_eq!(c.get_text().as_deref(), Some("one bonjour"));
    let l = c.instances();
    for i in live(&l) {
        let addr: SocketAddr = i["addr"].as_str().unwrap().parse().unwrap();
        let r = http::get(addr, "x", "/").unwrap();
        assert_eq!(r.text(), "one bonjour", "{i}");
    }
    let nodes: BTreeSet<&str> = live(&l)
        .iter()
        .map(|i| i["node"].as_str().unwrap())
        .collect();
    assert_eq!(nodes.len(), 2, "one per node: {l:#?}");
    assert_eq!(report.failed, 0, "requests failed: {report:?}{}", c.logs());
    assert!(report.ok > 0);
    assert!(seen.min_routed >= 2, "{seen:?}");
    assert!(seen.min_up >= 2, "{seen:?}");
    assert!(seen.max_live <= 3, "surge 1: {seen:?}");
    let state = c.app_state();
    assert_eq!(state["current"]["version"].as_u64(), Some(v), "{state}");
    assert_eq!(state["current"]["config"]["GREETING"], "bonjour", "{state}");
    let trail: Vec<String> = c
        .audit()
        .into_iter()
        .filter(|e| e["kind"] == "scheduler.progress" && e["detail"]["version"] == v)
        .filter_map(|e| e["detail"]["line"].as_str().map(str::to_string))
        .collect();
    assert!(
        trail
            .iter()
            .any(|l| l.starts_with(&format!("deploying v{v} (from v{old})"))),
        "{trail:#?}"
    );
    assert!(
        trail
            .iter()
            .any(|l| l.starts_with(&format!("draining web.v{old}."))),
        "{trail:#?}"
    );
    eprintln!(
        "config.set: v{v} live {live_in:?} later; never fewer than {} routed / {} up; through the balancer {} ok, {} failed",
        seen.min_routed, seen.min_up, report.ok, report.failed
    );
}

/// Runners offering 1 GB each, web=2 of 512 MB running: the scheduler's
/// `formation.check` says a formation fits or "N of M placed", and the api's
/// `formation.scale` asks it and refuses an unplaceable scale whole, at once.
#[test]
fn an_unplaceable_formation_is_refused_fast_and_clearly() {
    let mut c = Cluster::start(
        "rollout-unplaceable",
        Timings {
            offer_memory_mb: 1024,
            ..Timings::default()
        },
    );
    c.deploy_base("one");
    let running = c.instances();
    let mut sched = c.a.client("scheduler");
    let check = |sched: &mut Client, quantity: u64, memory_mb: u64| {
        sched
            .call(
                "formation.check",
                json!({"app": c.app, "formation": [{"type": "web", "quantity": quantity, "memory_mb": memory_mb}]}),
            )
            .expect("formation.check")
    };
    // Two more of 512 MB fit (one per node); three do not.
    let fits = check(&mut sched, 4, 512);
    assert!(
        fits["placed"].is_null() && fits["message"].is_null(),
        "{fits}"
    );
    let short = check(&mut sched, 5, 512);
    let want = format!(
        "4 of 5 web instances of {} placed: not enough runner memory on settled nodes",
        c.app
    );
    assert_eq!(short["message"], want.as_str(), "{short}");
    assert_eq!(
        (&short["type"], &short["placed"], &short["wanted"]),
        (&json!("web"), &json!(4), &json!(5)),
        "{short}"
    );
    let big = check(&mut sched, 1, 2048);
    assert_eq!(big["placed"], 0, "{big}");
    assert_eq!(big["wanted"], 1, "{big}");

    // Through the api: refused whole, with the scheduler's reason, at once.
    let mut alice = user_client(&c.alice);
    let began = Instant::now();
    let refused = paddock_integration::api::remote_err(alice.call(
        "formation.scale",
        json!({"app": c.app, "changes": [{"type": "web", "quantity": 5}]}),
    ));
    let refused_in = began.elapsed();
    assert_eq!(refused.code, paddock_wire::Code::Conflict, "{refused:?}");
    assert!(
        refused.message.contains(&want) && refused.message.contains("nothing was changed"),
        "{refused:?}"
    );
    let formation = alice
        .call("formation.get", json!({ "app": c.app }))
        .expect("formation.get");
    let web = formation["formation"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["type"] == "web")
        .cloned()
        .unwrap();
    assert_eq!(web["quantity"], 2, "{formation}");
    assert!(
        !c.audit()
            .iter()
            .any(|e| e["kind"] == "formation.scale" && e["detail"]["changes"][0]["quantity"] == 5),
        "a refused scale is not in the audit log"
    );
    // A scale that fits is taken and placed.
    let scaled = alice
        .call(
            "formation.scale",
            json!({"app": c.app, "changes": [{"type": "web", "quantity": 4}]}),
        )
        .expect("a scale that fits");
    assert_eq!(scaled["placement"]["checked"], true, "{scaled}");
    eventually(Duration::from_secs(30), "four instances up", || {
        let l = c.instances();
        let up = live(&l).iter().filter(|i| i["state"] == "up").count();
        (up == 4 && live(&l).len() == 4).then_some(())
    });
    let l = c.instances();
    for id in running.keys() {
        assert_eq!(l[id]["state"], "up", "the two running were kept: {l:#?}");
    }
    eprintln!(
        "formation.check of web=5: {short}; formation.scale web=5 refused in {refused_in:?}: {}",
        refused.message
    );
}

/// A push to a branch whose previous push is still rolling out must contain
/// that push's commit: one that does not (its author had not fetched it) is
/// refused before anything is built, and the first push goes live with the
/// branch moved to its commit. Without the check the second push's release
/// would replace the first's code while git, at the end, moved the branch to
/// the first's commit.
#[test]
fn a_push_that_does_not_contain_the_one_rolling_out_is_refused() {
    let mut c = Cluster::start("rollout-diverge", Timings::default());
    let old = c.deploy_base("one");
    let base = c.tree.head();
    c.tree.commit("slow", "bind_delay=4\n");
    let a_head = c.tree.head();
    let mut first = c.push_start();
    first.wait_for("Rolling out v", Duration::from_secs(30));
    // B: another commit on the old base, not containing A's.
    c.tree.git(&["reset", "-q", "--hard", &base]);
    c.tree.commit("other", "");
    let (ok_b, log_b) = c.push_start().finish();
    assert!(
        !ok_b,
        "a push not containing the one rolling out went through:\n{log_b}"
    );
    assert!(
        log_b.contains("is still rolling out and yours does not contain it"),
        "{log_b}"
    );
    assert!(
        !log_b.contains("Python app detected") && !log_b.contains("-----> Released"),
        "it was built:\n{log_b}"
    );
    let (ok_a, log_a) = first.finish();
    assert!(ok_a, "{log_a}{}", c.logs());
    assert!(
        log_a.contains(&format!("Done: {} v{} is serving", c.app, old + 1)),
        "{log_a}"
    );
    assert_eq!(c.repo_main(), Some(a_head), "A's commit is main");
    assert_eq!(c.get_text().as_deref(), Some("slow"));
}
