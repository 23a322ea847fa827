//! The runner runs releases: a slug made here (a zstd tar of a tiny Python HTTP
//! app with a `.profile.d` script), put in the real blobstore, a release made on
//! the real api (PostgreSQL behind it), then `instance.start` and `run.start` in
//! the release form on the real runner.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine;
use paddock_integration::api::{create_user, remote_err, wait_migrated};
use paddock_integration::*;
use paddock_wire::kinds::InstanceList;
use paddock_wire::{Client, Code};
use serde_json::{json, Value};

/// The app in the slug: `/env`, `/id`, `/write?p=F` (writes F), `/read?p=F`.
const APP_PY: &str = r#"
import json, os
from http.server import BaseHTTPRequestHandler, HTTPServer
from urllib.parse import parse_qs, urlparse

class H(BaseHTTPRequestHandler):
    def reply(self, code, body):
        data = body.encode()
        self.send_response(code)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *a):
        pass

    def do_GET(self):
        u = urlparse(self.path)
        q = parse_qs(u.query)
        if u.path == "/env":
            self.reply(200, json.dumps(dict(os.environ)))
        elif u.path == "/id":
            self.reply(200, json.dumps({"uid": os.getuid(), "gid": os.getgid(), "cwd": os.getcwd(), "pid": os.getpid()}))
        elif u.path == "/write":
            try:
                with open(q["p"][0], "w") as f:
                    f.write("written by the app")
                self.reply(200, "ok")
            except OSError as e:
                self.reply(403, str(e))
        elif u.path == "/read":
            try:
                with open(q["p"][0]) as f:
                    self.reply(200, f.read())
            except OSError as e:
                self.reply(404, str(e))
        else:
            self.reply(200, "hello from a release")

HTTPServer(("127.0.0.1", int(os.environ["PORT"])), H).serve_forever()
"#;

struct World {
    node: Node,
    runner: Client,
    api: Client,
    app: String,
    _pg: Postgres,
    t: TestDir,
}

fn world(name: &str) -> World {
    let t = TestDir::new(name);
    let pg = Postgres::start(t.path());
    let mut node = Node::new(t.path(), "node-a", &test_key(), &[], Some(pg.url()));
    {
        let r = node.file.daemons.get_mut("runner").unwrap();
        for (k, v) in [
            ("backoff_base_ms", 50),
            ("health_interval_ms", 300),
            ("stop_grace_ms", 2000),
        ] {
            r.other.insert(k.into(), toml::Value::Integer(v));
        }
    }
    node.save();
    paddock_harness::allow_traverse(&t.path().join("node-a")).unwrap();
    for d in ["heartbeat", "api", "blobstore", "runner"] {
        node.start(d);
    }
    wait_migrated(&node);
    // The runner finds the api and the blobstore through the registry.
    let mut hb = node.client("heartbeat");
    eventually(
        Duration::from_secs(10),
        "api and blobstore registered",
        || {
            let l = hb.call("registry.list", json!({})).ok()?;
            let alive = |d: &str| {
                l["services"]
                    .as_array()
                    .is_some_and(|s| s.iter().any(|e| e["daemon"] == d && e["state"] == "alive"))
            };
            (alive("api") && alive("blobstore")).then_some(())
        },
    );
    let mut api = node.client("api");
    create_user(&node, "alice", false);
    let app = format!("rel{}", &ulid::Ulid::new().to_string().to_lowercase()[20..]);
    api.call("app.create", json!({"name": app, "owner": "alice"}))
        .expect("app.create");
    api.call(
        "config.set",
        json!({"app": app, "vars": {"GREETING": "from-config", "OTHER": "config-only"}}),
    )
    .expect("config.set");
    let runner = node.client("runner").with_timeout(Duration::from_secs(30));
    World {
        node,
        runner,
        api,
        app,
        _pg: pg,
        t,
    }
}

/// A zstd tar of `files` (path, contents, mode) made by the system's tar.
fn slug(dir: &Path, name: &str, files: &[(&str, &str, u32)]) -> PathBuf {
    let src = dir.join(format!("{name}-src"));
    for (p, text, mode) in files {
        let path = src.join(p);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, text).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(*mode)).unwrap();
    }
    let out = dir.join(format!("{name}.tar.zst"));
    let st = std::process::Command::new("tar")
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

/// A tar.zst holding `../NAME` (system tar refuses to make one; Python's does).
fn hostile_slug(dir: &Path, escape_name: &str) -> PathBuf {
    let tar = dir.join("hostile.tar");
    let py = format!(
        "import io, tarfile\n\
         t = tarfile.open({tar:?}, 'w', format=tarfile.GNU_FORMAT)\n\
         for name in ['Procfile', '../{escape_name}']:\n\
         \x20   data = b'web: evil'\n\
         \x20   i = tarfile.TarInfo(name); i.size = len(data)\n\
         \x20   t.addfile(i, io.BytesIO(data))\n\
         t.close()\n",
        tar = tar.display().to_string()
    );
    let st = std::process::Command::new("python3")
        .args(["-c", &py])
        .status()
        .unwrap();
    assert!(st.success());
    let out = dir.join("hostile.tar.zst");
    let st = std::process::Command::new("zstd")
        .args(["-q", "-f", "-o"])
        .arg(&out)
        .arg(&tar)
        .status()
        .unwrap();
    assert!(st.success());
    out
}

impl World {
    /// Puts the slug in the blobstore and makes a release of it; (sha256, version).
    fn release(&mut self, slug: &Path, types: Value) -> (String, i64) {
        let mut blob = self.node.client("blobstore");
        let stored = paddock_blob::put_file_blocking(&mut blob, slug).expect("blob put");
        let sha = stored.sha256.clone();
        let r = self
            .api
            .call(
                "release.create",
                json!({"app": self.app, "slug": format!("sha256:{sha}"), "process_types": types,
                       "description": "Deploy test", "created_by": "user:alice"}),
            )
            .expect("release.create");
        (sha, r["release"]["version"].as_i64().unwrap())
    }

    fn instances(&mut self) -> InstanceList {
        serde_json::from_value(self.runner.call("instance.list", json!({})).unwrap()).unwrap()
    }

    fn wait_up(&mut self, id: &str, not_pid: Option<i32>) -> i32 {
        let mut last = None;
        for _ in 0..1000 {
            let l = self.instances();
            let i = l.instances.into_iter().find(|i| i.id == id).unwrap();
            if let Some(pid) = i.pid.filter(|p| i.state == "up" && Some(*p) != not_pid) {
                return pid;
            }
            last = Some(i);
            std::thread::sleep(Duration::from_millis(20));
        }
        let log = std::fs::read_to_string(self.node.log("runner")).unwrap_or_default();
        panic!("{id} not up: {last:?}\n{log}");
    }

    fn slugs_dir(&self) -> PathBuf {
        self.node.dir.join("state/runner/slugs").join(&self.app)
    }

    /// Runs a one-off to its end: (output, exit code).
    fn run(&mut self, body: Value) -> (String, i64) {
        let v = self.runner.call("run.start", body).expect("run.start");
        let id = v["id"].as_str().unwrap().to_string();
        let (out, code) = run_to_end(&mut self.runner, &id);
        (out, i64::from(code))
    }
}

fn get(port: u16, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let code = out.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = out.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (code, body)
}

fn app_files() -> Vec<(&'static str, &'static str, u32)> {
    vec![
        ("app.py", APP_PY, 0o644),
        ("Procfile", "web: python3 -u app.py\n", 0o644),
        (
            ".profile.d/x.sh",
            "export PROFILE_VAR=from-profile\nexport PATH=\"$HOME/bin:$PATH\"\n",
            0o644,
        ),
        ("bin/hello", "#!/bin/sh\necho hello from bin\n", 0o755),
    ]
}

#[test]
fn a_release_instance_runs_at_app_with_its_config_and_a_fresh_app_at_every_start() {
    let mut w = world("runner-release");
    let slug = slug(w.t.path(), "good", &app_files());
    let (sha, version) = w.release(&slug, json!({"web": "python3 -u app.py"}));

    // Two starts at once of a slug the node does not have: one fetch.
    let body = json!({"app": w.app, "proc": "web", "release": {"slug": sha, "version": version},
                      "health": {"http": "/"}, "env": {"GREETING": "from-request"}});
    let other = {
        let (ep, keys, body) = (w.node.rpc("runner"), w.node.keys.clone(), body.clone());
        std::thread::spawn(move || {
            Client::connect(&ep, "user:test", keys)
                .unwrap()
                .with_timeout(Duration::from_secs(30))
                .call("instance.start", body)
        })
    };
    let v = w
        .runner
        .call("instance.start", body)
        .expect("instance.start");
    let v2 = other
        .join()
        .unwrap()
        .expect("the concurrent instance.start");
    let (id, port) = (
        v["id"].as_str().unwrap().to_string(),
        v["port"].as_u64().unwrap() as u16,
    );
    let pid = w.wait_up(&id, None);
    w.wait_up(v2["id"].as_str().unwrap(), None);
    let log = std::fs::read_to_string(w.node.log("runner")).unwrap();
    assert_eq!(
        log.matches("slug fetched and unpacked").count(),
        1,
        "one fetch for two starts:\n{log}"
    );

    // Its environment: HOME=/app, the config under the request's env, the
    // .profile.d script's export.
    let (_, env) = get(port, "/env");
    let env: Value = serde_json::from_str(&env).unwrap();
    assert_eq!(env["HOME"], "/app");
    assert_eq!(env["GREETING"], "from-request", "the request wins");
    assert_eq!(env["OTHER"], "config-only");
    assert_eq!(env["PROFILE_VAR"], "from-profile");
    assert_eq!(env["PORT"], port.to_string());
    assert!(
        env["PATH"].as_str().unwrap().starts_with("/app/bin:"),
        "{env}"
    );

    // As pdk-<app>, at /app, and the tracked pid is the app's own (not a shell).
    let user = nix::unistd::User::from_name(&format!("pdk-{}", w.app))
        .unwrap()
        .expect("the app's user");
    let (_, ids) = get(port, "/id");
    let ids: Value = serde_json::from_str(&ids).unwrap();
    assert_eq!(ids["uid"], user.uid.as_raw());
    assert_ne!(ids["uid"], 0);
    assert_eq!(ids["cwd"], "/app");
    assert_eq!(ids["pid"], pid);

    // The cache: owned by the app's user, nothing for group or others, below
    // root-only directories.
    let lower = w.slugs_dir().join(&sha);
    let m = std::fs::metadata(lower.join("app.py")).unwrap();
    assert_eq!((m.uid(), m.mode() & 0o077), (user.uid.as_raw(), 0));
    assert_eq!(
        std::fs::metadata(lower.join("bin/hello")).unwrap().mode() & 0o777,
        0o700
    );
    let slugs_root = w.node.dir.join("state/runner/slugs");
    assert_eq!(
        std::fs::metadata(&slugs_root).unwrap().mode() & 0o777,
        0o700
    );

    // /app is writable by the instance; the slug underneath is not changed.
    let (code, _) = get(port, "/write?p=/app/scratch.txt");
    assert_eq!(code, 200);
    let (code, _) = get(port, "/write?p=/app/Procfile");
    assert_eq!(code, 200);
    assert_eq!(get(port, "/read?p=/app/Procfile").1, "written by the app");
    assert!(!lower.join("scratch.txt").exists());
    assert_eq!(
        std::fs::read_to_string(lower.join("Procfile")).unwrap(),
        "web: python3 -u app.py\n"
    );
    // The unpacked slug itself is out of the app's reach.
    let direct = lower.join("direct.txt");
    let (code, body) = get(port, &format!("/write?p={}", direct.display()));
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("Permission denied"), "{body}");
    let (code, _) = get(port, &format!("/read?p={}", lower.join("app.py").display()));
    assert_eq!(code, 404);

    // A restart starts from the slug again: what the app wrote is gone.
    w.runner
        .call("instance.restart", json!({"id": id}))
        .unwrap();
    w.wait_up(&id, Some(pid));
    let (code, _) = get(port, "/read?p=/app/scratch.txt");
    assert_eq!(code, 404);
    assert_eq!(
        get(port, "/read?p=/app/Procfile").1,
        "web: python3 -u app.py\n"
    );

    // A crash restarted by the shim on its own gets a fresh /app too.
    get(port, "/write?p=/app/scratch.txt");
    let pid2 = w.wait_up(&id, None);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid2),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    w.wait_up(&id, Some(pid2));
    assert_eq!(get(port, "/read?p=/app/scratch.txt").0, 404);

    // Without a command the release's command for the process type runs; a type
    // the release does not have is refused.
    let e = remote_err(w.runner.call(
        "instance.start",
        json!({"app": w.app, "proc": "worker", "release": {"slug": sha, "version": version}}),
    ));
    assert_eq!(e.code, Code::Invalid);
    assert!(e.message.contains("no process type `worker`"), "{e}");
    // A slug that is not the release's, a bad version, both forms at once.
    for (release, extra, want) in [
        (
            json!({"slug": "ab".repeat(32), "version": version}),
            json!({}),
            "is not release",
        ),
        (
            json!({"slug": sha, "version": 0}),
            json!({}),
            "release.version",
        ),
        (
            json!({"slug": "xyz", "version": version}),
            json!({}),
            "release.slug",
        ),
        (
            json!({"slug": sha, "version": version}),
            json!({"dir": "/tmp"}),
            "not both",
        ),
    ] {
        let mut body = json!({"app": w.app, "proc": "web", "release": release});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let e = remote_err(w.runner.call("instance.start", body));
        assert_eq!(e.code, Code::Invalid, "{e}");
        assert!(e.message.contains(want), "{want}: {e}");
    }
    let e = remote_err(w.runner.call(
        "instance.start",
        json!({"app": w.app, "proc": "web", "release": {"slug": sha, "version": 999}}),
    ));
    assert_eq!(e.code, Code::NotFound, "{e}");
}

#[test]
fn a_release_one_off_without_a_pty_gives_its_output_and_exit_code() {
    let mut w = world("runner-release-run");
    let slug = slug(w.t.path(), "good", &app_files());
    let (sha, version) = w.release(&slug, json!({"web": "python3 -u app.py"}));
    let (out, code) = w.run(json!({
        "app": w.app, "release": {"slug": sha, "version": version}, "pty": false,
        "argv": ["sh", "-c", "echo \"out $PROFILE_VAR $GREETING $HOME $(pwd) $(id -u)\"; echo err >&2; hello; touch /app/made; exit 3"],
    }));
    let user = nix::unistd::User::from_name(&format!("pdk-{}", w.app))
        .unwrap()
        .unwrap();
    assert_eq!(code, 3, "{out}");
    assert!(
        out.contains(&format!(
            "out from-profile from-config /app /app {}",
            user.uid
        )),
        "{out}"
    );
    assert!(out.contains("err\n"), "{out}");
    assert!(out.contains("hello from bin"), "{out}");
    assert!(!out.contains('\r'), "no terminal: {out:?}");
    assert!(!w.slugs_dir().join(&sha).join("made").exists());
    // No terminal, so no input.
    let v = w
        .runner
        .call(
            "run.start",
            json!({"app": w.app, "release": {"slug": sha, "version": version}, "pty": false,
                   "command": "sleep 5"}),
        )
        .unwrap();
    let e = remote_err(w.runner.call(
        "run.input",
        json!({"id": v["id"], "data": base64::engine::general_purpose::STANDARD.encode("x")}),
    ));
    assert_eq!(e.code, Code::Conflict, "{e}");
    w.runner.call("run.kill", json!({"id": v["id"]})).unwrap();
    // A command line of several commands runs them all (no `exec` before it).
    let (out, code) = w.run(json!({
        "app": w.app, "release": {"slug": sha, "version": version}, "pty": false,
        "command": "echo one && echo two; exit 5",
    }));
    assert_eq!((out.as_str(), code), ("one\ntwo\n", 5));
    // A command line (run as `exec COMMAND` after the sourcing): the app's PATH.
    let (out, code) = w.run(json!({
        "app": w.app, "release": {"slug": sha, "version": version}, "pty": false,
        "command": "hello",
    }));
    assert_eq!((out.as_str(), code), ("hello from bin\n", 0));
    // On a terminal (the default) too.
    let (out, code) = w.run(json!({
        "app": w.app, "release": {"slug": sha, "version": version},
        "command": "sh -c 'echo tty $PROFILE_VAR; test -t 0'",
    }));
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("tty from-profile\r\n"), "{out:?}");
}

fn paddock(node: &Node, args: &[&str]) -> std::process::Output {
    std::process::Command::new(paddock_harness::bin("paddock").unwrap())
        .args(args)
        .env("PADDOCK_CONFIG", &node.config)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap()
}

#[test]
fn the_cli_starts_and_runs_releases() {
    let mut w = world("runner-release-cli");
    let slug = slug(w.t.path(), "good", &app_files());
    let (sha, version) = w.release(&slug, json!({"web": "python3 -u app.py"}));
    let v = version.to_string();
    // An instance of the release's own command for --proc web.
    let out = paddock(
        &w.node,
        &[
            "instance",
            "start",
            "-a",
            &w.app,
            "--release",
            &sha,
            "--version",
            &v,
            "--health-http",
            "/",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let id = text.split_whitespace().nth(1).unwrap().to_string();
    let port: u16 = text.split_whitespace().last().unwrap().parse().unwrap();
    w.wait_up(&id, None);
    assert_eq!(get(port, "/").1, "hello from a release");
    // A one-off without a terminal: its output and its exit code.
    let out = paddock(
        &w.node,
        &[
            "instance",
            "run",
            "-a",
            &w.app,
            "--release",
            &sha,
            "--version",
            &v,
            "--no-pty",
            "--",
            "sh",
            "-c",
            "echo $PROFILE_VAR; exit 7",
        ],
    );
    assert_eq!(
        out.status.code(),
        Some(7),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "from-profile\n");
    // --dir and --release together, or --release without --version: refused by the CLI.
    for args in [
        &[
            "instance",
            "run",
            "-a",
            &w.app,
            "--release",
            &sha,
            "--",
            "true",
        ][..],
        &[
            "instance",
            "run",
            "-a",
            &w.app,
            "--release",
            &sha,
            "--version",
            &v,
            "--dir",
            "/tmp",
            "--",
            "true",
        ][..],
    ] {
        let out = paddock(&w.node, args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
    }
}

#[test]
fn a_hostile_slug_is_refused_and_writes_nothing_outside() {
    let mut w = world("runner-release-hostile");
    let escape = format!("escaped-{}", ulid::Ulid::new());
    let slug = hostile_slug(w.t.path(), &escape);
    let (sha, version) = w.release(&slug, json!({"web": "python3 app.py"}));
    let e = remote_err(w.runner.call(
        "instance.start",
        json!({"app": w.app, "proc": "web", "release": {"slug": sha, "version": version}}),
    ));
    assert_eq!(e.code, Code::Invalid, "{e}");
    assert!(
        e.message.contains("`..`") && e.message.contains("refused"),
        "{e}"
    );
    let e = remote_err(w.runner.call(
        "run.start",
        json!({"app": w.app, "release": {"slug": sha, "version": version}, "pty": false,
               "command": "true"}),
    ));
    assert_eq!(e.code, Code::Invalid, "{e}");
    // Nothing anywhere under the node's directories, nothing left in the cache.
    let found = std::process::Command::new("find")
        .arg(w.t.path())
        .args(["-name", &escape])
        .output()
        .unwrap();
    assert!(
        found.stdout.is_empty(),
        "{:?}",
        String::from_utf8_lossy(&found.stdout)
    );
    let left: Vec<_> = std::fs::read_dir(w.slugs_dir())
        .map(|rd| rd.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");
    let l = w.instances();
    assert!(l.instances.is_empty(), "{:?}", l.instances);
}
