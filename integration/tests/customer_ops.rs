//! The customer's operations of issue 10 (point 10) end to end: real daemons on
//! one node (heartbeat, api, blobstore, runner; the scheduler and the locker
//! for `ps scale` and `ps restart`), a real slug of a tiny Python app, and the
//! `paddock` CLI signing with a user's credentials file.
//!
//! - `ps` / `app.instances` and `logs` / `app.logs`: the app's own instances
//!   only, their lines merged in time order, a follow cursor with no gap and
//!   no repeat; strangers refused;
//! - `run` / `run.*`: a one-off on the current release through the api, its
//!   exit status; nobody but its starter reaches it;
//! - `open`: the app's URL;
//! - `deploys`: the trail of each deploy from the app's audit log;
//! - `ps scale` and `ps restart` through the real scheduler: the wait for the
//!   instances, an unplaceable formation refused whole, a rolling restart.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use paddock_config::credentials::UserCredentials;
use paddock_integration::api::{code, create_user, remote_err, user_client, wait_migrated};
use paddock_integration::*;
use paddock_wire::{Client, Code};
use serde_json::{json, Value};

/// The web process: says it started (stdout and stderr), then ticks ten times
/// a second, numbered, and answers HTTP.
const APP_PY: &str = r#"
import os, sys, threading, time
from http.server import BaseHTTPRequestHandler, HTTPServer

me = os.environ["PADDOCK_INSTANCE"]
print("started %s greeting=%s" % (me, os.environ.get("GREETING")), flush=True)
print("to stderr from %s" % me, file=sys.stderr, flush=True)

def tick():
    i = 0
    while True:
        print("tick %d from %s" % (i, me), flush=True)
        i += 1
        time.sleep(0.1)

threading.Thread(target=tick, daemon=True).start()

class H(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

HTTPServer(("127.0.0.1", int(os.environ["PORT"])), H).serve_forever()
"#;

/// The worker process: no port, ticks.
const WORKER_PY: &str = r#"
import os, time
me = os.environ["PADDOCK_INSTANCE"]
i = 0
while True:
    print("work %d from %s" % (i, me), flush=True)
    i += 1
    time.sleep(0.1)
"#;

/// A zstd tar of the app (system tar).
fn slug(dir: &Path, name: &str) -> PathBuf {
    let src = dir.join(format!("{name}-src"));
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("app.py"), APP_PY).unwrap();
    std::fs::write(src.join("worker.py"), WORKER_PY).unwrap();
    std::fs::write(src.join("version.txt"), format!("code of {name}\n")).unwrap();
    let out = dir.join(format!("{name}.tar.zst"));
    let st = Command::new("tar")
        .arg("--zstd")
        .arg("-cf")
        .arg(&out)
        .arg("-C")
        .arg(&src)
        .arg(".")
        .status()
        .unwrap();
    assert!(st.success());
    out
}

/// A fresh app name (apps are cluster-wide, and their `pdk-` accounts host-wide).
fn app_name(prefix: &str) -> String {
    format!(
        "{prefix}{}",
        &ulid::Ulid::new().to_string().to_lowercase()[18..]
    )
}

/// Makes the app's account once, here: runners of tests running at the same
/// time making accounts at once have raced in /etc/passwd before.
fn make_account(app: &str) {
    let st = Command::new("useradd")
        .args(["--system", "--user-group", "--no-create-home", "--home-dir"])
        .args(["/nonexistent", "--shell", "/usr/sbin/nologin"])
        .arg(format!("pdk-{app}"))
        .status()
        .unwrap();
    assert!(st.success(), "useradd pdk-{app}");
}

/// The apps' accounts, removed when the test is over (after the node's daemons
/// and apps stopped: this is the world's last field). Kept when it failed.
struct Accounts(Vec<String>);

impl Drop for Accounts {
    fn drop(&mut self) {
        if std::thread::panicking() {
            return;
        }
        for app in &self.0 {
            // Refused while a process of the account is still exiting.
            for _ in 0..50 {
                let st = Command::new("userdel")
                    .arg(format!("pdk-{app}"))
                    .stderr(Stdio::null())
                    .status();
                if st.map_or(true, |s| s.success() || s.code() == Some(6)) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// A user as a customer's machine has them: credentials in a file of their own.
struct User {
    creds: UserCredentials,
    file: PathBuf,
}

struct World {
    node: Node,
    api: Client,
    alice: User,
    bob: User,
    carol: User,
    /// alice's app (carol collaborates on it) and bob's.
    app: String,
    other: String,
    home: PathBuf,
    _pg: Postgres,
    t: TestDir,
    _accounts: Accounts,
}

fn tune_runner(node: &mut Node) {
    let r = node.file.daemons.get_mut("runner").unwrap();
    for (k, v) in [
        ("backoff_base_ms", 50),
        ("health_interval_ms", 300),
        ("stop_grace_ms", 2000),
        ("offer_memory_mb", 4096),
    ] {
        r.other.insert(k.into(), toml::Value::Integer(v));
    }
}

/// `[daemons.scheduler]` with short timings (as the scheduler's own tests).
fn add_scheduler(node: &mut Node) {
    node.add_daemon("scheduler");
    let publish = tcp(free_port().unwrap());
    let s = node.file.daemons.get_mut("scheduler").unwrap();
    s.other.insert("pub".into(), toml::Value::String(publish));
    for (k, v) in [
        ("min_healthy_ms", 1000),
        ("drain_ms", 1000),
        ("resync_ms", 500),
        ("lease_ttl_ms", 3000),
        ("node_settle_ms", 0),
        ("watch_window_ms", 1000),
        ("healthy_deadline_ms", 30_000),
    ] {
        s.other.insert(k.into(), toml::Value::Integer(v));
    }
}

impl World {
    /// One node; with `scheduler`, a locker and a scheduler too (started by the
    /// test, once the app has a release).
    fn start(name: &str, scheduler: bool) -> World {
        let t = TestDir::new(name);
        let pg = Postgres::start(t.path());
        let mut node = Node::new(t.path(), "node-a", &test_key(), &[], Some(pg.url()));
        tune_runner(&mut node);
        if scheduler {
            add_scheduler(&mut node);
        }
        node.save();
        paddock_harness::allow_traverse(&node.dir).unwrap();
        let mut daemons = vec!["heartbeat", "api", "blobstore", "runner"];
        if scheduler {
            daemons.push("locker");
        }
        for d in &daemons {
            node.start(d);
        }
        wait_migrated(&node);
        let mut hb = node.client("heartbeat");
        eventually(Duration::from_secs(15), "daemons registered", || {
            let l = hb.call("registry.list", json!({})).ok()?;
            let alive = |d: &str| {
                l["services"]
                    .as_array()
                    .is_some_and(|s| s.iter().any(|e| e["daemon"] == d && e["state"] == "alive"))
            };
            daemons.iter().all(|d| alive(d)).then_some(())
        });
        let home = t.path().join("home");
        std::fs::create_dir_all(&home).unwrap();
        let user = |name: &str| {
            let creds = create_user(&node, name, false);
            let file = home.join(format!("{name}.credentials"));
            creds.write(&file).unwrap();
            User { creds, file }
        };
        let (alice, bob, carol) = (user("alice"), user("bob"), user("carol"));
        let mut api = node.client("api");
        let app = app_name("ops");
        let other = app_name("oth");
        let accounts = Accounts(vec![app.clone(), other.clone()]);
        for (a, owner) in [(&app, "alice"), (&other, "bob")] {
            api.call("app.create", json!({"name": a, "owner": owner}))
                .expect("app.create");
            api.call(
                "config.set",
                json!({"app": a, "vars": {"GREETING": format!("hello-{a}")}}),
            )
            .expect("config.set");
            make_account(a);
        }
        api.call(
            "access.add",
            json!({"app": app, "user": "carol", "role": "collaborator"}),
        )
        .expect("access.add");
        World {
            node,
            api,
            alice,
            bob,
            carol,
            app,
            other,
            home,
            _pg: pg,
            _accounts: accounts,
            t,
        }
    }

    /// A release of `app` with the slug, made current as a finished deploy
    /// would; (sha256, version).
    fn release(&mut self, app: &str) -> (String, i64) {
        let slug = slug(self.t.path(), app);
        let mut blob = self.node.client("blobstore");
        let stored = paddock_blob::put_file_blocking(&mut blob, &slug).expect("blob put");
        let r = self
            .api
            .call(
                "release.create",
                json!({"app": app, "slug": format!("sha256:{}", stored.sha256),
                       "process_types": {"web": "python3 -u app.py", "worker": "python3 -u worker.py"},
                       "description": "Deploy test", "created_by": "user:alice"}),
            )
            .expect("release.create");
        let v = r["release"]["version"].as_i64().unwrap();
        self.api
            .call(
                "release.status",
                json!({"app": app, "version": v, "status": "succeeded"}),
            )
            .expect("release.status");
        (stored.sha256, v)
    }

    /// An operator's instance of the release on the runner; its id.
    fn start_instance(&self, app: &str, proc: &str, sha: &str, version: i64) -> String {
        let health = if proc == "web" {
            json!({"tcp": true})
        } else {
            json!({"none": true})
        };
        let v = self
            .node
            .client("runner")
            .with_timeout(Duration::from_secs(60))
            .call(
                "instance.start",
                json!({"app": app, "proc": proc, "release": {"slug": sha, "version": version},
                       "health": health}),
            )
            .expect("instance.start");
        v["id"].as_str().unwrap().to_string()
    }

    fn wait_up(&self, ids: &[&str]) {
        let mut r = self.node.client("runner");
        eventually(Duration::from_secs(30), "instances up", || {
            let l = r.call("instance.list", json!({})).ok()?;
            let up = l["instances"]
                .as_array()?
                .iter()
                .filter(|i| i["state"] == "up" && ids.contains(&i["id"].as_str().unwrap_or("")))
                .count();
            (up == ids.len()).then_some(())
        });
    }

    /// `paddock ARGS` signing with `user`'s credentials file, in a home of its
    /// own (no cluster file to be found).
    fn cli(&self, user: &User, args: &[&str]) -> Command {
        let mut c = Command::new(paddock_harness::bin("paddock").unwrap());
        self.as_user(&mut c, user, args);
        c
    }

    /// As `cli`, killed after 45 s (a verb that hangs fails its test, saying so).
    fn cli_limited(&self, user: &User, args: &[&str]) -> Command {
        let mut c = Command::new("timeout");
        c.args(["-s", "KILL", "45"])
            .arg(paddock_harness::bin("paddock").unwrap());
        self.as_user(&mut c, user, args);
        c
    }

    fn as_user(&self, c: &mut Command, user: &User, args: &[&str]) {
        c.arg("--config")
            .arg(&user.file)
            .args(args)
            .current_dir(&self.home)
            .env_remove("PADDOCK_CONFIG")
            .env("HOME", &self.home)
            .env("XDG_CONFIG_HOME", self.home.join("xdg"))
            .stdin(Stdio::null());
    }

    fn run_cli(&self, user: &User, args: &[&str]) -> Output {
        self.cli_limited(user, args).output().unwrap()
    }

    /// Runs; asserts success; stdout.
    fn ok(&self, user: &User, args: &[&str]) -> String {
        let o = self.run_cli(user, args);
        let (out, err) = (
            String::from_utf8_lossy(&o.stdout).to_string(),
            String::from_utf8_lossy(&o.stderr).to_string(),
        );
        assert!(
            o.status.success(),
            "paddock {args:?} failed ({}):\n{out}\n{err}",
            o.status
        );
        out
    }

    /// Runs; asserts failure; stderr.
    fn err(&self, user: &User, args: &[&str]) -> String {
        let o = self.run_cli(user, args);
        assert!(
            !o.status.success(),
            "paddock {args:?} succeeded:\n{}",
            String::from_utf8_lossy(&o.stdout)
        );
        String::from_utf8_lossy(&o.stderr).to_string()
    }
}

/// `tick N from ID` → (ID, N).
fn tick(line: &str) -> Option<(String, u64)> {
    let rest = line.strip_prefix("tick ")?;
    let (n, id) = rest.split_once(" from ")?;
    Some((id.to_string(), n.parse().ok()?))
}

/// Each instance's tick numbers in `lines` (of `app.logs` replies).
fn ticks(lines: &[Value]) -> BTreeMap<String, Vec<u64>> {
    let mut m: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for l in lines {
        if let Some((id, n)) = tick(l["line"].as_str().unwrap()) {
            assert_eq!(l["instance"].as_str(), Some(id.as_str()), "{l}");
            m.entry(id).or_default().push(n);
        }
    }
    m
}

#[test]
fn ps_and_logs_show_the_apps_own_instances_merged_in_time_order() {
    let began = paddock_wire::now_ms();
    let mut w = World::start("ops-ps-logs", false);
    let (app, other) = (w.app.clone(), w.other.clone());
    let (sha, v) = w.release(&app);
    let web1 = w.start_instance(&app, "web", &sha, v);
    let web2 = w.start_instance(&app, "web", &sha, v);
    let worker = w.start_instance(&app, "worker", &sha, v);
    let (osha, ov) = w.release(&other);
    let theirs = w.start_instance(&other, "web", &osha, ov);
    w.wait_up(&[&web1, &web2, &worker, &theirs]);
    let mine: BTreeSet<String> = [&web1, &web2, &worker].into_iter().cloned().collect();

    // app.instances: the app's instances, as its users may see them.
    let mut alice = user_client(&w.alice.creds);
    let r = alice
        .call("app.instances", json!({ "app": app }))
        .expect("app.instances");
    let list = r["instances"].as_array().unwrap();
    let ids: BTreeSet<String> = list
        .iter()
        .map(|i| i["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, mine, "{r}");
    assert_eq!(r["unreachable"], json!([]));
    let now = paddock_wire::now_ms();
    for i in list {
        let want = if i["id"] == worker.as_str() {
            "worker"
        } else {
            "web"
        };
        assert_eq!(i["type"], want, "{i}");
        assert_eq!(i["release"], v, "{i}");
        assert_eq!(i["node"], "node-a", "{i}");
        assert_eq!(i["state"], "up", "{i}");
        let since = i["since"].as_i64().unwrap();
        assert!((began..=now).contains(&since), "{i}");
        for hidden in ["pid", "port", "addr", "token"] {
            assert!(i.get(hidden).is_none(), "{hidden} shown: {i}");
        }
    }
    // A collaborator sees them; a stranger and an unknown app are refused.
    let carol_sees = user_client(&w.carol.creds)
        .call("app.instances", json!({ "app": app }))
        .unwrap();
    assert_eq!(carol_sees["instances"].as_array().unwrap().len(), 3);
    let mut bob = user_client(&w.bob.creds);
    let e = remote_err(bob.call("app.instances", json!({ "app": app })));
    assert_eq!(e.code, Code::Forbidden, "{}", e.message);
    assert!(!e.message.contains(&web1), "{}", e.message);
    assert_eq!(
        code(alice.call("app.instances", json!({"app": "nosuchapp"}))),
        Code::NotFound
    );
    assert_eq!(
        code(alice.call("app.instances", json!({ "app": other }))),
        Code::Forbidden
    );

    // app.logs: the app's lines only, in time order, the newest N.
    eventually(Duration::from_secs(10), "ticks of every instance", || {
        let l = alice
            .call("app.logs", json!({"app": app, "lines": 1000}))
            .ok()?;
        let t = ticks(l["lines"].as_array()?);
        (t.len() == 2 && t.values().all(|n| n.len() >= 3)).then_some(())
    });
    let l = alice
        .call("app.logs", json!({"app": app, "lines": 1000}))
        .unwrap();
    let lines = l["lines"].as_array().unwrap();
    let ts: Vec<i64> = lines.iter().map(|x| x["ts"].as_i64().unwrap()).collect();
    assert!(ts.windows(2).all(|p| p[0] <= p[1]), "time order: {ts:?}");
    for x in lines {
        assert!(mine.contains(x["instance"].as_str().unwrap()), "{x}");
        assert!(!x["line"].as_str().unwrap().contains(&other), "{x}");
        assert_eq!(x["node"], "node-a");
    }
    let text: Vec<&str> = lines.iter().map(|x| x["line"].as_str().unwrap()).collect();
    assert!(
        text.contains(&format!("started {web1} greeting=hello-{app}").as_str()),
        "{text:?}"
    );
    assert!(
        lines
            .iter()
            .any(|x| x["stream"] == "stderr"
                && x["line"] == format!("to stderr from {web2}").as_str()),
        "{text:?}"
    );
    let five = alice
        .call("app.logs", json!({"app": app, "lines": 5}))
        .unwrap();
    assert_eq!(five["lines"].as_array().unwrap().len(), 5);
    assert_eq!(five["truncated"], true);
    let work = alice
        .call(
            "app.logs",
            json!({"app": app, "lines": 50, "type": "worker"}),
        )
        .unwrap();
    let work = work["lines"].as_array().unwrap();
    assert!(!work.is_empty());
    assert!(
        work.iter()
            .all(|x| x["instance"] == worker.as_str() && x["type"] == "worker"),
        "{work:?}"
    );

    // Following: what is new since the cursor, nothing twice, nothing missed.
    let first = alice
        .call("app.logs", json!({"app": app, "lines": 1000}))
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let second = alice
        .call(
            "app.logs",
            json!({"app": app, "lines": 1000, "cursor": first["cursor"]}),
        )
        .unwrap();
    assert_eq!(second["truncated"], false, "{}", second["cursor"]);
    let mut both: Vec<Value> = first["lines"].as_array().unwrap().clone();
    let new = second["lines"].as_array().unwrap();
    assert!(new.len() >= 10, "1.5 s of 2 tickers: {new:?}");
    both.extend(new.iter().cloned());
    for (id, mut n) in ticks(&both) {
        let count = n.len();
        n.sort();
        n.dedup();
        assert_eq!(n.len(), count, "{id}: a line twice");
        assert_eq!(
            n.last().unwrap() - n.first().unwrap() + 1,
            count as u64,
            "{id}: a gap in {n:?}"
        );
    }
    // Bad input is refused and names the field.
    for (body, field) in [
        (json!({"app": app, "lines": 0}), "lines"),
        (json!({"app": app, "lines": 1001}), "lines"),
        (json!({"app": app, "type": "Web!"}), "type"),
        (json!({"app": app, "cursor": "x"}), "cursor"),
    ] {
        let e = remote_err(alice.call("app.logs", body.clone()));
        assert_eq!(e.code, Code::Invalid, "{body}");
        assert!(e.message.contains(field), "{body}: {}", e.message);
    }
    assert_eq!(
        code(bob.call("app.logs", json!({ "app": app }))),
        Code::Forbidden
    );

    // The CLI.
    let ps = w.ok(&w.alice, &["ps", "-a", &app]);
    assert!(ps.contains(&format!("=== {app} Formation")), "{ps}");
    assert!(ps.contains(&format!("=== {app} Instances")), "{ps}");
    for id in &mine {
        let row = ps
            .lines()
            .find(|l| l.starts_with(id.as_str()))
            .unwrap_or_else(|| panic!("{id}: {ps}"));
        assert!(
            row.contains(&format!(" v{v} ")) && row.contains("node-a") && row.contains(" up "),
            "{row}"
        );
    }
    assert!(!ps.contains(&theirs), "{ps}");
    let j: Value = serde_json::from_str(&w.ok(&w.alice, &["ps", "-a", &app, "--json"])).unwrap();
    assert_eq!(j["instances"].as_array().unwrap().len(), 3, "{j}");
    let e = w.err(&w.bob, &["ps", "-a", &app]);
    assert!(e.contains("bob") || e.contains("may not"), "{e}");

    let out = w.ok(&w.alice, &["logs", "-a", &app, "-n", "5"]);
    assert_eq!(out.lines().count(), 5, "{out}");
    assert!(
        out.lines()
            .all(|l| mine.iter().any(|id| l.contains(&format!("{id}: ")))),
        "{out}"
    );
    let out = w.ok(&w.alice, &["logs", "-a", &app, "--ps", "worker", "-n", "3"]);
    assert_eq!(out.lines().count(), 3, "{out}");
    assert!(
        out.lines().all(|l| l.contains(&format!("{worker}: work "))),
        "{out}"
    );

    // -t follows: later ticks of the same instance keep coming, in order.
    let mut child = w
        .cli(
            &w.alice,
            &["logs", "-a", &app, "-t", "-n", "1", "--ps", "web"],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for l in BufReader::new(stdout).lines() {
            let Ok(l) = l else { return };
            if tx.send(l).is_err() {
                return;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(4);
    let mut followed = vec![];
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(l) => followed.push(l),
            Err(_) => break,
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let mut seen: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for l in &followed {
        let text = l.split_once(": ").map(|(_, t)| t).unwrap_or("");
        if let Some((id, n)) = tick(text) {
            seen.entry(id).or_default().push(n);
        }
    }
    assert!(
        seen.get(&web1).is_some_and(|n| n.len() >= 10) && seen.contains_key(&web2),
        "-t printed: {followed:?}"
    );
    for n in seen.values() {
        assert!(
            n.windows(2).all(|p| p[1] == p[0] + 1),
            "in order, no gap: {n:?}"
        );
    }
    assert!(!seen.contains_key(&worker), "--ps web: {followed:?}");

    // open: the app's URL at the balancer's port.
    let url = w.ok(&w.alice, &["open", "-a", &app]);
    assert_eq!(
        url,
        format!("http://{app}.localhost:{}/\n", w.node.ports.balancer_http)
    );
    let e = w.err(&w.bob, &["open", "-a", &app]);
    assert!(!e.contains("http://"), "{e}");
}

/// Reads a one-off's output through the api until it ends: (output, status).
fn run_output(c: &mut Client, id: &str) -> (String, i64) {
    let mut offset = 0u64;
    let mut out = Vec::new();
    for _ in 0..60 {
        let v = c
            .call(
                "run.output",
                json!({"id": id, "offset": offset, "wait_ms": 1000}),
            )
            .expect("run.output");
        out.extend(
            base64::engine::general_purpose::STANDARD
                .decode(v["data"].as_str().unwrap())
                .unwrap(),
        );
        offset = v["next_offset"].as_u64().unwrap();
        if v["done"] == true {
            return (
                String::from_utf8_lossy(&out).to_string(),
                v["exit_code"].as_i64().unwrap(),
            );
        }
    }
    panic!(
        "one-off {id} did not end: {}",
        String::from_utf8_lossy(&out)
    );
}

#[test]
fn a_one_off_runs_on_the_current_release_and_only_its_starter_reaches_it() {
    let mut w = World::start("ops-run", false);
    let app = w.app.clone();
    let mut alice = user_client(&w.alice.creds).with_timeout(Duration::from_secs(60));
    let mut bob = user_client(&w.bob.creds);
    let mut carol = user_client(&w.carol.creds);

    // No code yet: nothing to run, said so.
    let e = remote_err(alice.call("run.start", json!({"app": app, "command": "true"})));
    assert_eq!(e.code, Code::Conflict, "{}", e.message);
    assert!(e.message.contains("push"), "{}", e.message);

    let (_, v) = w.release(&app);
    // Without a terminal: the release's code and config, the exit status.
    let r = alice
        .call(
            "run.start",
            json!({"app": app, "pty": false,
                   "command": "echo greeting=$GREETING; cat /app/version.txt; id -un; exit 3"}),
        )
        .expect("run.start");
    let id = r["id"].as_str().unwrap().to_string();
    assert!(
        id.starts_with("run-") && id.len() == 36,
        "the api's own id: {r}"
    );
    assert_eq!(r["release"], v);
    assert_eq!(r["node"], "node-a");
    // Nobody else reaches it: not a stranger, not a collaborator on the same app.
    for (who, c) in [("bob", &mut bob), ("carol", &mut carol)] {
        for (kind, body) in [
            ("run.output", json!({"id": id, "offset": 0})),
            ("run.input", json!({"id": id, "data": "eA=="})),
            ("run.resize", json!({"id": id, "cols": 100, "rows": 40})),
            ("run.kill", json!({"id": id})),
        ] {
            let e = remote_err(c.call(kind, body));
            assert_eq!(e.code, Code::NotFound, "{who} {kind}: {}", e.message);
        }
    }
    let (out, status) = run_output(&mut alice, &id);
    assert_eq!(status, 3, "{out}");
    assert!(out.contains(&format!("greeting=hello-{app}")), "{out}");
    assert!(out.contains(&format!("code of {app}")), "{out}");
    assert!(out.contains(&format!("pdk-{app}")), "{out}");
    // A stranger cannot start one; bad input is refused before any runner.
    assert_eq!(
        code(bob.call("run.start", json!({"app": app, "command": "true"}))),
        Code::Forbidden
    );
    for (kind, body, field) in [
        ("run.start", json!({ "app": app }), "command"),
        (
            "run.start",
            json!({"app": app, "command": "x", "argv": ["y"]}),
            "command",
        ),
        ("run.start", json!({"app": app, "argv": []}), "argv"),
        (
            "run.start",
            json!({"app": app, "command": "x", "cols": 0}),
            "cols",
        ),
        ("run.output", json!({"id": "run-xyz"}), "id"),
        (
            "run.output",
            json!({"id": id, "wait_ms": 99_999}),
            "wait_ms",
        ),
        (
            "run.input",
            json!({"id": id, "data": "A".repeat(100_000)}),
            "data",
        ),
    ] {
        let e = remote_err(alice.call(kind, body.clone()));
        assert_eq!(e.code, Code::Invalid, "{kind} {body}: {}", e.message);
        assert!(e.message.contains(field), "{kind}: {}", e.message);
    }

    // On a terminal: input reaches the command, which sees a TTY.
    let r = alice
        .call(
            "run.start",
            json!({"app": app, "argv": ["python3", "-u", "-c",
                   "import sys; print('tty', sys.stdin.isatty()); print('got', sys.stdin.readline().strip())"]}),
        )
        .unwrap();
    let tid = r["id"].as_str().unwrap().to_string();
    let data = base64::engine::general_purpose::STANDARD.encode("hello there\n");
    alice
        .call("run.input", json!({"id": tid, "data": data}))
        .expect("run.input");
    alice
        .call("run.resize", json!({"id": tid, "cols": 120, "rows": 40}))
        .expect("run.resize");
    let (out, status) = run_output(&mut alice, &tid);
    assert_eq!(status, 0, "{out}");
    assert!(out.contains("tty True"), "{out}");
    assert!(out.contains("got hello there"), "{out}");
    // run.kill ends it: 128 + SIGKILL.
    let r = alice
        .call("run.start", json!({"app": app, "command": "sleep 60"}))
        .unwrap();
    let kid = r["id"].as_str().unwrap().to_string();
    alice
        .call("run.kill", json!({ "id": kid }))
        .expect("run.kill");
    let (_, status) = run_output(&mut alice, &kid);
    assert_eq!(status, 137);

    // Audited, without the command (it may hold a secret).
    let a = alice
        .call("audit.list", json!({"app": app, "limit": 50}))
        .unwrap();
    let runs: Vec<&Value> = a["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "run.start")
        .collect();
    assert_eq!(runs.len(), 3, "{a}");
    assert!(runs.iter().any(|e| e["detail"]["run"] == id.as_str()));
    let shown = serde_json::to_string(&runs).unwrap();
    for command in ["echo", "sleep", "python3"] {
        assert!(!shown.contains(command), "{shown}");
    }
    assert!(runs.iter().all(|e| e["actor"] == "user:alice"));

    // The CLI: the exit status is the command's; a pipe on stdin is typed into
    // the terminal, its end is ^D (so a program reading a line at a time ends;
    // one that changes the terminal's modes, as a REPL does, may start after
    // the ^D came and miss it).
    let o = w.run_cli(
        &w.alice,
        &[
            "run",
            "-a",
            &app,
            "--no-tty",
            "sh",
            "-c",
            "echo out-$GREETING; exit 7",
        ],
    );
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert_eq!(
        o.status.code(),
        Some(7),
        "{stdout}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(stdout, format!("out-hello-{app}\n"));
    let mut child = w
        .cli_limited(
            &w.alice,
            &[
                "run",
                "-a",
                &app,
                "python3",
                "-c",
                "import sys; print(sys.stdin.isatty(), sys.stdin.read().upper())",
            ],
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"hello there\n")
        .unwrap();
    let o = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{stdout}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(stdout.contains("True HELLO THERE"), "{stdout}");
    // Interrupting the CLI kills the command too.
    let secs = (600 + std::process::id() % 1000).to_string();
    let cmdline = format!("sleep\0{secs}\0").into_bytes();
    let sleeping = || {
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
            .any(|c| c == cmdline)
    };
    assert!(!sleeping(), "a `sleep {secs}` runs already");
    let child = w
        .cli(&w.alice, &["run", "-a", &app, "--no-tty", "sleep", &secs])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    eventually(Duration::from_secs(20), "the one-off running", || {
        sleeping().then_some(())
    });
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let o = child.wait_with_output().unwrap();
    assert_eq!(
        o.status.code(),
        Some(130),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("interrupted"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    eventually(Duration::from_secs(10), "the one-off killed", || {
        (!sleeping()).then_some(())
    });

    let e = w.err(&w.bob, &["run", "-a", &app, "--no-tty", "true"]);
    assert!(e.contains("may not"), "{e}");
}

#[test]
fn deploys_show_each_deploys_trail_from_the_audit_log() {
    let w = World::start("ops-deploys", false);
    let (app, other) = (w.app.clone(), w.other.clone());
    let mut api = w.node.client("api");
    let mut alice = user_client(&w.alice.creds);
    assert_eq!(
        alice.call("deploy.list", json!({ "app": app })).unwrap()["deploys"],
        json!([])
    );
    // What the scheduler writes (audit.append, cluster key), for two apps.
    let append = |api: &mut Client, app: &str, kind: &str, detail: Value| {
        api.call(
            "audit.append",
            json!({"actor": "scheduler@node-a", "kind": kind, "app": app, "detail": detail}),
        )
        .expect("audit.append");
    };
    // In the order the scheduler's background calls may land (an alert's reason
    // is a progress line too, and a deploy's last line may follow its outcome).
    for (a, kind, detail) in [
        (
            &app,
            "scheduler.progress",
            json!({"version": 3, "line": "web.1 up (v3)"}),
        ),
        (
            &app,
            "scheduler.progress",
            json!({"version": 3, "line": "old instances drained"}),
        ),
        (
            &app,
            "scheduler.deploy",
            json!({"version": 3, "outcome": "succeeded"}),
        ),
        (
            &app,
            "scheduler.progress",
            json!({"version": 3, "line": "the deploy of v3 succeeded"}),
        ),
        (
            &other,
            "scheduler.progress",
            json!({"version": 4, "line": "secret of the other app"}),
        ),
        (
            &app,
            "scheduler.progress",
            json!({"version": 4, "line": "web.1 starting (v4)"}),
        ),
        (
            &app,
            "scheduler.alert",
            json!({"reason": "web of v4 crashed 3 times: exit 1"}),
        ),
        (
            &app,
            "scheduler.progress",
            json!({"version": 4, "line": "web of v4 crashed 3 times: exit 1"}),
        ),
        (
            &app,
            "scheduler.progress",
            json!({"version": 4, "line": "rolling back to v3"}),
        ),
        (
            &app,
            "scheduler.progress",
            json!({"version": 4, "line": "the deploy of v4 was rolled back"}),
        ),
        (
            &app,
            "scheduler.deploy",
            json!({"version": 4, "outcome": "rolled_back"}),
        ),
        (
            &app,
            "scheduler.progress",
            json!({"version": 5, "line": "web.1 starting (v5)"}),
        ),
    ] {
        append(&mut api, a, kind, detail);
    }

    let l = alice
        .call("deploy.list", json!({ "app": app }))
        .expect("deploy.list");
    let d = l["deploys"].as_array().unwrap();
    let rows: Vec<(i64, Value, i64)> = d
        .iter()
        .map(|x| {
            (
                x["version"].as_i64().unwrap(),
                x["outcome"].clone(),
                x["alerts"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        rows,
        [
            (5, Value::Null, 0),
            (4, json!("rolled_back"), 1),
            (3, json!("succeeded"), 0)
        ],
        "{l}"
    );
    assert!(d[1]["finished_at"].as_i64() >= d[1]["started_at"].as_i64());
    assert!(d[0]["finished_at"].is_null());
    let one = alice
        .call("deploy.list", json!({"app": app, "limit": 1}))
        .unwrap();
    assert_eq!(one["deploys"].as_array().unwrap().len(), 1);
    let i = alice
        .call("deploy.info", json!({"app": app, "version": "v4"}))
        .expect("deploy.info");
    let lines: Vec<(&str, &str)> = i["deploy"]["lines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| (l["kind"].as_str().unwrap(), l["line"].as_str().unwrap()))
        .collect();
    assert_eq!(
        lines,
        [
            ("progress", "web.1 starting (v4)"),
            ("alert", "web of v4 crashed 3 times: exit 1"),
            ("progress", "rolling back to v3"),
            ("progress", "the deploy of v4 was rolled back"),
        ]
    );
    assert!(!i.to_string().contains("secret"), "{i}");
    let e = remote_err(alice.call("deploy.info", json!({"app": app, "version": 9})));
    assert_eq!(e.code, Code::NotFound);
    assert!(e.message.contains("v9"), "{}", e.message);
    assert_eq!(
        code(alice.call("deploy.info", json!({"app": app, "version": "nine"}))),
        Code::Invalid
    );
    assert_eq!(
        code(alice.call("deploy.list", json!({"app": app, "limit": 0}))),
        Code::Invalid
    );
    let mut bob = user_client(&w.bob.creds);
    assert_eq!(
        code(bob.call("deploy.list", json!({ "app": app }))),
        Code::Forbidden
    );
    assert_eq!(
        code(bob.call("deploy.info", json!({"app": app, "version": 4}))),
        Code::Forbidden
    );
    // bob's own app shows only its own deploy.
    let theirs = bob.call("deploy.list", json!({ "app": other })).unwrap();
    assert_eq!(theirs["deploys"].as_array().unwrap().len(), 1, "{theirs}");

    // The CLI.
    let out = w.ok(&w.carol, &["deploys", "-a", &app]);
    let rows: Vec<&str> = out.lines().skip(2).collect();
    assert!(out.starts_with(&format!("=== {app} Deploys\n")), "{out}");
    assert!(
        rows[0].starts_with("v5") && rows[0].contains("running"),
        "{out}"
    );
    assert!(
        rows[1].starts_with("v4") && rows[1].contains("rolled back"),
        "{out}"
    );
    assert!(
        rows[2].starts_with("v3") && rows[2].contains("succeeded"),
        "{out}"
    );
    let out = w.ok(&w.alice, &["deploys", "info", "v4", "-a", &app]);
    assert!(
        out.contains("Outcome:") && out.contains("rolled back"),
        "{out}"
    );
    let trail: Vec<&str> = out
        .lines()
        .skip_while(|l| *l != "=== Trail")
        .skip(1)
        .collect();
    assert_eq!(trail.len(), 4, "{out}");
    assert!(trail[0].ends_with(" web.1 starting (v4)"), "{out}");
    assert!(
        trail[1].ends_with(" ALERT web of v4 crashed 3 times: exit 1"),
        "{out}"
    );
    assert!(
        trail[3].ends_with(" the deploy of v4 was rolled back"),
        "{out}"
    );
    let e = w.err(&w.alice, &["deploys", "info", "v9", "-a", &app]);
    assert!(e.contains("v9"), "{e}");
}

#[test]
fn ps_scale_waits_for_the_scheduler_refuses_what_cannot_be_placed_and_ps_restart_rolls() {
    let mut w = World::start("ops-scheduler", true);
    let app = w.app.clone();
    let (_, v) = w.release(&app);
    let mut api = w.node.client("api");
    api.call(
        "formation.scale",
        json!({"app": app, "changes": [{"type": "web", "quantity": 1, "memory_mb": 128},
                                        {"type": "worker", "quantity": 0, "memory_mb": 128}]}),
    )
    .expect("formation.scale");
    // No scheduler yet: a restart says so, and changes nothing.
    let e = w.err(
        &w.alice,
        &["ps", "restart", "-a", &app, "--timeout-ms", "1500"],
    );
    assert!(e.contains("no scheduler is running"), "{e}");
    w.node.start("scheduler");
    let mut sched = w.node.client("scheduler");
    // The scheduler leads, has placed web=1 and has no deploy under way.
    let idle = |sched: &mut Client| {
        eventually(Duration::from_secs(45), "the scheduler idle", || {
            let s = sched.call("scheduler.status", json!({})).ok()?;
            (s["leader"] == true && s["deploys"].as_array()?.is_empty()).then_some(())
        })
    };
    idle(&mut sched);
    eventually(Duration::from_secs(45), "web=1 up", || {
        let r = user_client(&w.alice.creds)
            .call("app.instances", json!({ "app": app }))
            .ok()?;
        let up = r["instances"]
            .as_array()?
            .iter()
            .filter(|i| i["state"] == "up")
            .count();
        (up == 1).then_some(())
    });

    // Scaling up waits until the instances are up, then says so.
    let out = w.ok(&w.alice, &["ps", "scale", "web=2", "-a", &app]);
    assert_eq!(out, format!("Scaling {app}... done, web=2 up\n"));
    let mut alice = user_client(&w.alice.creds).with_timeout(Duration::from_secs(15));
    let up = |c: &mut Client| -> BTreeSet<String> {
        let r = c.call("app.instances", json!({ "app": app })).unwrap();
        r["instances"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|i| i["state"] == "up" && i["type"] == "web")
            .map(|i| i["id"].as_str().unwrap().to_string())
            .collect()
    };
    let before = up(&mut alice);
    assert_eq!(before.len(), 2, "{before:?}");

    // A formation the node has no room for (4096 MB offered) is refused whole,
    // with the scheduler's words, and leaves no trace.
    let audit_before = alice
        .call("audit.list", json!({"app": app, "limit": 100}))
        .unwrap();
    let e = remote_err(alice.call(
        "formation.scale",
        json!({"app": app, "changes": [{"type": "web", "quantity": 3, "memory_mb": 4096},
                                        {"type": "worker", "quantity": 1}]}),
    ));
    assert_eq!(e.code, Code::Conflict, "{}", e.message);
    assert!(
        e.message.contains("placed") && e.message.contains("nothing was changed"),
        "{}",
        e.message
    );
    let f = alice.call("formation.get", json!({ "app": app })).unwrap();
    let web = f["formation"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["type"] == "web")
        .unwrap()
        .clone();
    assert_eq!(
        (web["quantity"].as_i64(), web["memory_mb"].as_i64()),
        (Some(2), Some(128))
    );
    let worker = f["formation"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["type"] == "worker")
        .unwrap()
        .clone();
    assert_eq!(worker["quantity"], 0, "all or nothing: {f}");
    let audit_after = alice
        .call("audit.list", json!({"app": app, "limit": 100}))
        .unwrap();
    assert_eq!(
        audit_before["entries"], audit_after["entries"],
        "a refused scale writes no audit row"
    );
    let e = w.err(&w.alice, &["ps", "scale", "web=40:1024", "-a", &app]);
    assert!(
        e.contains("placed") && e.contains("nothing was changed"),
        "{e}"
    );
    assert_eq!(up(&mut alice), before, "nothing moved");

    // A rolling restart of web: new instances replace the old ones, and the
    // deploy's trail is in `deploys`.
    assert_eq!(
        code(alice.call("ps.restart", json!({"app": app, "type": "clock"}))),
        Code::Invalid
    );
    let mut bob = user_client(&w.bob.creds);
    assert_eq!(
        code(bob.call("ps.restart", json!({ "app": app }))),
        Code::Forbidden
    );
    idle(&mut sched);
    let out = w.ok(&w.alice, &["ps", "restart", "web", "-a", &app]);
    assert!(
        out.starts_with(&format!("Restarting web processes of {app}... done, v{v} ")),
        "{out}"
    );
    eventually(Duration::from_secs(45), "two new web instances up", || {
        let now = up(&mut alice);
        (now.len() == 2 && now.is_disjoint(&before)).then_some(())
    });
    let trail = eventually(Duration::from_secs(30), "the restart's trail", || {
        let l = alice
            .call("deploy.info", json!({"app": app, "version": v}))
            .ok()?;
        (l["deploy"]["outcome"] == "succeeded").then_some(l)
    });
    let lines = trail["deploy"]["lines"].as_array().unwrap();
    assert!(
        lines.iter().any(|l| l["line"]
            .as_str()
            .unwrap()
            .starts_with(&format!("restarting web of v{v}"))),
        "{trail}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l["line"] == format!("the deploy of v{v} succeeded").as_str()),
        "{trail}"
    );
    let out = w.ok(&w.alice, &["deploys", "-a", &app]);
    assert!(
        out.lines()
            .any(|l| l.starts_with(&format!("v{v} ")) && l.contains("succeeded")),
        "{out}"
    );
    // Scaling down waits too.
    let out = w.ok(&w.alice, &["ps", "scale", "web=1", "-a", &app]);
    assert_eq!(out, format!("Scaling {app}... done, web=1 up\n"));
}
