//! paddock-deployer with real daemons (heartbeat, api on PostgreSQL, blobstore):
//! buildpack builds of stdlib Python, Flask (PyPI; the second build reuses the
//! cached virtualenv without running pip), Node.js and static apps; failures
//! named by step with no release made; builds confined by their cgroups; and a
//! build that cannot read another app's files or the cluster file.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use paddock_integration::api::*;
use paddock_integration::*;
use paddock_wire::{Client, Code};
use serde_json::{json, Value};

struct World {
    node: Node,
    owner: Client,
    _pg: Postgres,
    t: TestDir,
}

/// A node with heartbeat, api, blobstore and deployer; `deployer` adds keys to
/// `[daemons.deployer]`. Local buildpacks are allowed in the test dir unless
/// `deployer` says otherwise.
fn world(name: &str, deployer: &[(&str, toml::Value)]) -> World {
    let t = TestDir::new(name);
    // Local buildpacks in the test dir must be reachable by the apps' users.
    std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let pg = Postgres::start(t.path());
    let mut node = Node::new(t.path(), "node-a", &test_key(), &[], Some(pg.url()));
    {
        let d = node.file.daemons.get_mut("deployer").unwrap();
        d.other.insert(
            "local_buildpacks".to_string(),
            toml::Value::Array(vec![toml::Value::String(t.path().display().to_string())]),
        );
        for (k, v) in deployer {
            d.other.insert(k.to_string(), v.clone());
        }
    }
    node.save();
    node.start("heartbeat");
    node.start("api");
    wait_migrated(&node);
    node.start("blobstore");
    node.start("deployer");
    let alice = create_user(&node, "alice", false);
    let owner = user_client(&alice);
    World {
        node,
        owner,
        _pg: pg,
        t,
    }
}

/// What a finished build said.
struct Built {
    id: String,
    lines: Vec<String>,
    last: Value,
    took: Duration,
}

impl Built {
    fn log(&self) -> String {
        self.lines.join("\n")
    }
    fn has(&self, s: &str) -> bool {
        self.lines.iter().any(|l| l.contains(s))
    }
}

impl World {
    fn app(&mut self, name: &str) {
        self.owner
            .call("app.create", json!({ "name": name }))
            .unwrap();
    }

    fn config(&mut self, app: &str, vars: Value) {
        self.owner
            .call("config.set", json!({"app": app, "vars": vars}))
            .unwrap();
    }

    /// `files` as a tar in the blobstore (as the gitserver puts `git archive`).
    fn source(&self, files: &[(&str, &str)]) -> String {
        let dir = self.t.path().join(format!("src-{}", ulid::Ulid::new()));
        for (p, text) in files {
            let f = dir.join(p);
            std::fs::create_dir_all(f.parent().unwrap()).unwrap();
            std::fs::write(&f, text).unwrap();
        }
        let tar = dir.with_extension("tar");
        let st = Command::new("tar")
            .arg("-C")
            .arg(&dir)
            .arg("-cf")
            .arg(&tar)
            .arg(".")
            .status()
            .unwrap();
        assert!(st.success());
        let mut c = self.node.client("blobstore");
        paddock_blob::put_file_blocking(&mut c, &tar)
            .unwrap()
            .sha256
    }

    fn deployer(&self) -> Client {
        self.node
            .client("deployer")
            .with_timeout(Duration::from_secs(30))
    }

    fn start(&self, app: &str, source: &str) -> String {
        let r = self
            .deployer()
            .call(
                "build.start",
                json!({"app": app, "commit": "0123456789abcdef", "source": source,
                       "ref": "refs/heads/main", "pusher": "alice"}),
            )
            .unwrap();
        r["build"].as_str().unwrap().to_string()
    }

    /// Follows `build.log` to the end, as the gitserver does.
    fn follow(&self, id: &str) -> Built {
        let began = Instant::now();
        let mut c = self.deployer();
        let mut lines = Vec::new();
        let mut next = 0;
        loop {
            assert!(
                began.elapsed() < Duration::from_secs(600),
                "build {id} did not end"
            );
            let r = c
                .call(
                    "build.log",
                    json!({"build": id, "after": next, "wait_ms": 20000}),
                )
                .unwrap();
            for l in r["lines"].as_array().unwrap() {
                let l = l.as_str().unwrap().to_string();
                println!("remote: {l}");
                lines.push(l);
            }
            next = r["next"].as_u64().unwrap();
            if r["done"] == true {
                return Built {
                    id: id.to_string(),
                    lines,
                    last: r,
                    took: began.elapsed(),
                };
            }
        }
    }

    fn build(&self, app: &str, files: &[(&str, &str)]) -> Built {
        let src = self.source(files);
        let id = self.start(app, &src);
        self.follow(&id)
    }

    fn releases(&mut self, app: &str) -> Vec<Value> {
        self.owner
            .call("release.list", json!({ "app": app }))
            .unwrap()["releases"]
            .as_array()
            .unwrap()
            .clone()
    }

    /// The slug's member names.
    fn slug_files(&self, release: &Value) -> Vec<String> {
        let sha = release["slug"].as_str().unwrap();
        let sha = sha.strip_prefix("sha256:").unwrap_or(sha);
        let dest = self.t.path().join(format!("slug-{sha}.tar.zst"));
        let mut c = self.node.client("blobstore");
        paddock_blob::get_file_blocking(&mut c, sha, &dest).unwrap();
        let out = Command::new("tar")
            .arg("--zstd")
            .arg("-tf")
            .arg(&dest)
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| l.trim_start_matches("./").to_string())
            .collect()
    }

    /// A buildpack at `<test dir>/<name>` whose scripts are these bash bodies.
    fn buildpack(&self, name: &str, detect: &str, compile: &str, release: &str) -> PathBuf {
        let bp = self.t.path().join(name);
        std::fs::create_dir_all(bp.join("bin")).unwrap();
        for (s, body) in [
            ("detect", detect),
            ("compile", compile),
            ("release", release),
        ] {
            let f = bp.join("bin").join(s);
            std::fs::write(&f, format!("#!/usr/bin/env bash\n{body}\n")).unwrap();
            std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        std::fs::set_permissions(&bp, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(bp.join("bin"), std::fs::Permissions::from_mode(0o755)).unwrap();
        bp
    }

    /// The release's slug unpacked into `<test dir>/<name>`.
    fn unpack_slug(&self, release: &Value, name: &str) -> PathBuf {
        let sha = release["slug"]
            .as_str()
            .unwrap()
            .trim_start_matches("sha256:");
        let dest = self.t.path().join(name);
        std::fs::create_dir_all(&dest).unwrap();
        let slug = self.t.path().join(format!("{name}.tar.zst"));
        let mut c = self.node.client("blobstore");
        paddock_blob::get_file_blocking(&mut c, sha, &slug).unwrap();
        assert!(Command::new("tar")
            .args(["--zstd", "-xf"])
            .arg(&slug)
            .arg("-C")
            .arg(&dest)
            .status()
            .unwrap()
            .success());
        dest
    }

    fn deployer_dir(&self) -> PathBuf {
        self.node.dir.join("state").join("deployer")
    }
}

/// `GET /` on 127.0.0.1:`port`, the whole answer, or `None` while it is not up.
fn http_get(port: u16) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

fn succeeded(b: &Built) -> Value {
    assert_eq!(
        b.last["status"],
        "succeeded",
        "build {} failed: {}\n{}",
        b.id,
        b.last["error"],
        b.log()
    );
    b.last["release"].clone()
}

#[test]
fn a_stdlib_app_with_a_procfile_is_released_and_its_build_kept() {
    let mut w = world("deployer-stdlib", &[]);
    w.app("plain");
    let files = [
        (
            "Procfile",
            "web: python3 app.py\nworker: python3 worker.py\n",
        ),
        ("app.py", "print('hello')\n"),
        ("worker.py", "print('work')\n"),
        (".slugignore", "/docs\n*.psd\n"),
        ("docs/big.txt", "not shipped\n"),
        ("art.psd", "not shipped\n"),
        (
            "app.json",
            r#"{"healthchecks": {"web": [{"type": "startup", "path": "/health", "timeout": 5, "attempts": 3}]}}"#,
        ),
    ];
    let b = w.build("plain", &files);
    let release = succeeded(&b);
    assert!(b.has("-----> Procfile app detected"), "{}", b.log());
    assert!(
        b.has("Procfile declares types     -> web, worker"),
        "{}",
        b.log()
    );
    assert!(b.has("-----> Released v2"), "{}", b.log());
    assert_eq!(release["version"], 2);
    assert_eq!(release["status"], "succeeded");
    assert_eq!(
        release["process_types"],
        json!({"web": "python3 app.py", "worker": "python3 worker.py"})
    );
    let rels = w.releases("plain");
    let v2 = rels.iter().find(|r| r["version"] == 2).unwrap();
    assert_eq!(v2["status"], "succeeded");
    let files = w.slug_files(&release);
    assert!(files.iter().any(|f| f == "app.py"), "{files:?}");
    assert!(
        !files
            .iter()
            .any(|f| f.starts_with("docs/") || f.ends_with(".psd")),
        "{files:?}"
    );
    // Health checks from app.json went into the release.
    let info = w
        .owner
        .call("release.info", json!({"app": "plain", "version": 2}))
        .unwrap();
    assert_eq!(
        info["release"]["healthchecks"]["web"][0]["path"], "/health",
        "{info}"
    );

    // The build's record: list and info (with the log), durations per step.
    let mut d = w.deployer();
    let list = d.call("build.list", json!({"app": "plain"})).unwrap();
    let first = &list["builds"][0];
    assert_eq!(first["id"], b.id.as_str());
    assert_eq!(first["status"], "succeeded");
    assert_eq!(first["pusher"], "alice");
    assert_eq!(first["release"]["version"], 2);
    for step in [
        "source",
        "detect",
        "compile",
        "process-types",
        "slug",
        "release",
        "total",
    ] {
        assert!(first["durations"][step].is_u64(), "{step}: {first}");
    }
    let info = d.call("build.info", json!({"build": b.id})).unwrap();
    let log = info["build"]["log"].as_str().unwrap();
    assert!(log.contains("-----> Procfile app detected"), "{log}");
    assert!(log.contains("-----> Released v2"), "{log}");

    // A warm push of the same kind of app: the figure is printed, not asserted.
    let b2 = w.build(
        "plain",
        &[
            ("Procfile", "web: python3 app.py\n"),
            ("app.py", "print(2)\n"),
        ],
    );
    succeeded(&b2);
    println!("warm stdlib push to a new release: {:?}", b2.took);
    assert_eq!(b2.last["release"]["version"], 3);
}

#[test]
fn a_flask_app_is_built_with_pip_then_from_the_cached_virtualenv() {
    let mut w = world("deployer-flask", &[]);
    w.app("flask");
    let app_py = "from flask import Flask\napp = Flask(__name__)\n\n@app.route('/')\ndef hi():\n    return 'hi'\n";
    let files = [
        ("requirements.txt", "flask==3.0.3\n"),
        ("app.py", app_py),
        ("Procfile", "wsgi: app:app\n"),
    ];
    let b = w.build("flask", &files);
    let release = succeeded(&b);
    assert!(b.has("-----> Python app detected"), "{}", b.log());
    assert!(
        b.has("-----> Installing requirements with pip"),
        "{}",
        b.log()
    );
    assert!(b.has("Successfully installed"), "{}", b.log());
    let web = release["process_types"]["web"].as_str().unwrap();
    assert!(web.contains("/app/.paddock/wsgi.py app:app"), "{release}");
    let slug = w.slug_files(&release);
    assert!(
        slug.iter().any(|f| f == ".venv/bin/python"),
        "the venv is in the slug"
    );
    assert!(slug
        .iter()
        .any(|f| f.starts_with(".venv/lib/python3") && f.contains("site-packages/flask/")));
    assert!(slug.iter().any(|f| f == ".profile.d/python.sh"));
    println!("cold Flask push: {:?}", b.took);

    // The slug serves: its venv's python runs the WSGI server on $PORT (here
    // from where the test unpacks it; instances see it at /app).
    let dest = w.unpack_slug(&release, "flask-slug");
    let port = free_port().unwrap();
    let mut server = Command::new(dest.join(".venv/bin/python"))
        .arg(dest.join(".paddock/wsgi.py"))
        .arg("app:app")
        .current_dir(&dest)
        .env("PORT", port.to_string())
        .spawn()
        .unwrap();
    let body = eventually(Duration::from_secs(20), "the WSGI server answers", || {
        http_get(port)
    });
    let _ = server.kill();
    let _ = server.wait();
    assert!(
        body.starts_with("HTTP/1.0 200") || body.starts_with("HTTP/1.1 200"),
        "{body}"
    );
    assert!(body.ends_with("hi"), "{body}");

    // Unchanged requirements: the cached venv, and pip never runs.
    let changed = [
        ("requirements.txt", "flask==3.0.3\n"),
        ("app.py", &*format!("{app_py}# changed\n")),
        ("Procfile", "wsgi: app:app\n"),
    ];
    let b2 = w.build("flask", &changed);
    succeeded(&b2);
    assert!(
        b2.has("-----> Reusing the cached virtualenv"),
        "{}",
        b2.log()
    );
    assert!(!b2.has("Installing requirements with pip"), "{}", b2.log());
    assert!(
        !b2.has("Collecting") && !b2.has("Successfully installed"),
        "pip ran:\n{}",
        b2.log()
    );
    println!(
        "warm Flask push (requirements unchanged): {:?}, steps {}",
        b2.took, b2.last["durations"]
    );

    // The venv works where every node puts the app: /app, as the app's user.
    let slug2 = w.slug_files(&b2.last["release"]);
    assert!(slug2.iter().any(|f| f == ".venv/bin/python"));
}

#[test]
fn a_node_app_defaults_to_npm_start() {
    let mut w = world("deployer-node", &[]);
    w.app("nodeapp");
    let b = w.build(
        "nodeapp",
        &[
            (
                "package.json",
                r#"{"name": "nodeapp", "version": "1.0.0", "scripts": {"start": "node server.js", "build": "node build.js"}}"#,
            ),
            ("build.js", "require('fs').writeFileSync('built.txt', 'yes'); console.log('built it');\n"),
            ("server.js", "require('http').createServer((q, s) => s.end('hi')).listen(process.env.PORT);\n"),
        ],
    );
    let release = succeeded(&b);
    assert!(b.has("-----> Node.js app detected"), "{}", b.log());
    assert!(b.has("-----> Running npm run build"), "{}", b.log());
    assert!(
        b.has("built it"),
        "the build's own output is relayed:\n{}",
        b.log()
    );
    assert!(b.has("Default types for buildpack -> web"), "{}", b.log());
    assert_eq!(release["process_types"], json!({"web": "npm start"}));
    let slug = w.slug_files(&release);
    assert!(slug.iter().any(|f| f == "built.txt"), "{slug:?}");
}

#[test]
fn a_node_app_with_a_lockfile_uses_npm_ci_then_the_cached_node_modules() {
    let mut w = world("deployer-node-ci", &[]);
    w.app("locked");
    let pkg = r#"{"name": "locked", "version": "1.0.0", "dependencies": {"is-number": "7.0.0"}, "scripts": {"start": "node -e \"console.log(require('is-number')(5))\""}}"#;
    // The lockfile, made the way a developer makes it (npm reaches its registry).
    let gen = w.t.path().join("lockgen");
    std::fs::create_dir_all(&gen).unwrap();
    std::fs::write(gen.join("package.json"), pkg).unwrap();
    let out = Command::new("npm")
        .args([
            "install",
            "--package-lock-only",
            "--ignore-scripts",
            "--no-audit",
            "--no-fund",
        ])
        .current_dir(&gen)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lock = std::fs::read_to_string(gen.join("package-lock.json")).unwrap();
    let files = [
        ("package.json", pkg),
        ("package-lock.json", &*lock),
        ("index.js", ""),
    ];
    let b = w.build("locked", &files);
    let release = succeeded(&b);
    assert!(
        b.has("-----> Installing dependencies with npm ci"),
        "{}",
        b.log()
    );
    let slug = w.slug_files(&release);
    assert!(
        slug.iter()
            .any(|f| f == "node_modules/is-number/package.json"),
        "{slug:?}"
    );
    let files2 = [
        ("package.json", pkg),
        ("package-lock.json", &*lock),
        ("index.js", "// changed\n"),
    ];
    let b2 = w.build("locked", &files2);
    let release2 = succeeded(&b2);
    assert!(
        b2.has("-----> Reusing the cached node_modules"),
        "{}",
        b2.log()
    );
    assert!(
        !b2.has("Installing dependencies") && !b2.has("added 1 package"),
        "npm ran:\n{}",
        b2.log()
    );
    let slug2 = w.slug_files(&release2);
    assert!(slug2
        .iter()
        .any(|f| f == "node_modules/is-number/package.json"));
}

#[test]
fn a_static_site_carries_its_file_server() {
    let mut w = world("deployer-static", &[]);
    w.app("site");
    let b = w.build(
        "site",
        &[
            ("public/index.html", "<h1>hi</h1>\n"),
            ("public/style.css", "h1{}\n"),
        ],
    );
    let release = succeeded(&b);
    assert!(b.has("-----> Static app detected"), "{}", b.log());
    assert_eq!(
        release["process_types"],
        json!({"web": "/app/.paddock/bin/paddock-static"})
    );
    // The slug serves by itself: unpack it and run its server.
    let dest = w.unpack_slug(&release, "site");
    let port = free_port().unwrap();
    let mut server = Command::new(dest.join(".paddock/bin/paddock-static"))
        .current_dir(&dest)
        .env("PORT", port.to_string())
        .spawn()
        .unwrap();
    let body = eventually(Duration::from_secs(10), "paddock-static serves", || {
        http_get(port)
    });
    let _ = server.kill();
    let _ = server.wait();
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    assert!(body.contains("text/html"), "{body}");
    assert!(body.ends_with("<h1>hi</h1>\n"), "{body}");
}

#[test]
fn failures_name_their_step_and_make_no_release() {
    let mut w = world("deployer-fail", &[]);
    w.app("broken");
    let bp = w.buildpack(
        "failing-bp",
        "echo Failing",
        "echo '-----> Compiling'; echo 'about to fail' >&2; exit 3",
        "echo ---",
    );
    w.config("broken", json!({"BUILDPACK_URL": bp.display().to_string()}));
    let before = w.releases("broken").len();
    let b = w.build("broken", &[("Procfile", "web: true\n")]);
    assert_eq!(b.last["status"], "failed");
    assert_eq!(b.last["error"]["step"], "compile", "{}", b.last);
    assert!(
        b.last["error"]["message"]
            .as_str()
            .unwrap()
            .contains("exited with status 3"),
        "{}",
        b.last
    );
    assert!(b.has("about to fail"), "{}", b.log());
    assert!(b.has(" !     Build failed at step compile"), "{}", b.log());
    assert_eq!(w.releases("broken").len(), before, "no release was made");
    let info = w
        .deployer()
        .call("build.info", json!({"build": b.id}))
        .unwrap();
    assert_eq!(info["build"]["status"], "failed");
    assert_eq!(info["build"]["error"]["step"], "compile");
    assert!(info["build"]["log"]
        .as_str()
        .unwrap()
        .contains("about to fail"));

    // No Procfile and no default process type.
    let bp = w.buildpack("quiet-bp", "echo Quiet", "true", "echo ---");
    w.config("broken", json!({"BUILDPACK_URL": bp.display().to_string()}));
    let b = w.build("broken", &[("README", "nothing to run\n")]);
    assert_eq!(b.last["error"]["step"], "process-types", "{}", b.last);
    assert!(b.last["error"]["message"]
        .as_str()
        .unwrap()
        .contains("no Procfile"));

    // Nothing detects it.
    w.config("broken", json!({"BUILDPACK_URL": ""}));
    let b = w.build("broken", &[("README", "nothing\n")]);
    assert_eq!(b.last["error"]["step"], "detect", "{}", b.last);
    assert_eq!(
        w.releases("broken").len(),
        before + 2,
        "only the config releases"
    );

    // One build per app at a time.
    // One build per app at a time; and its lines arrive while it runs.
    let slow = w.buildpack(
        "slow-bp",
        "echo Slow",
        "echo 'compiling slowly'; sleep 3; echo 'done compiling'",
        "echo ---",
    );
    w.config(
        "broken",
        json!({"BUILDPACK_URL": slow.display().to_string()}),
    );
    let src = w.source(&[("Procfile", "web: true\n")]);
    let first = w.start("broken", &src);
    let second = w.deployer().call(
        "build.start",
        json!({"app": "broken", "commit": "abc", "source": src}),
    );
    assert_eq!(code(second), Code::Conflict);
    // A build id given twice is refused too.
    let again = w.deployer().call(
        "build.start",
        json!({"app": "elsewhere", "commit": "abc", "source": src, "build": first}),
    );
    let e = remote_err(again);
    assert_eq!(e.code, Code::Conflict);
    assert!(e.message.contains("exists already"), "{}", e.message);
    let mut c = w.deployer();
    let mut next = 0;
    let seen = loop {
        let r = c
            .call(
                "build.log",
                json!({"build": first, "after": next, "wait_ms": 5000}),
            )
            .unwrap();
        let lines: Vec<&str> = r["lines"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l.as_str().unwrap())
            .collect();
        if lines.contains(&"compiling slowly") {
            break r;
        }
        assert_ne!(
            r["done"], true,
            "the build ended before its first line was seen"
        );
        next = r["next"].as_u64().unwrap();
    };
    assert_eq!(seen["status"], "running", "{seen}");
    assert_eq!(seen["step"], "compile", "{seen}");
    assert_eq!(seen["done"], false);
    let list = c.call("build.list", json!({"app": "broken"})).unwrap();
    assert_eq!(list["builds"][0]["status"], "running");
    assert_eq!(list["builds"][0]["step"], "compile");
    let b = w.follow(&first);
    assert_eq!(b.last["status"], "succeeded");
    assert!(b.has("done compiling"));
}

#[test]
fn builds_are_confined_by_their_cgroups() {
    let mut w = world(
        "deployer-cgroup",
        &[
            ("build_memory_mb", toml::Value::Integer(128)),
            ("build_pids", toml::Value::Integer(64)),
            ("build_timeout_ms", toml::Value::Integer(12_000)),
        ],
    );
    for app in ["hog", "bomb", "calm"] {
        w.app(app);
    }
    let hog = w.buildpack(
        "hog-bp",
        "echo Hog",
        "echo eating; /usr/bin/python3 -c \"b = b'x' * (1024 << 20); print(len(b))\"",
        "echo ---",
    );
    let bomb = w.buildpack(
        "bomb-bp",
        "echo Bomb",
        "echo forking; f() { f | f & }; f; sleep 60",
        "echo ---",
    );
    w.config("hog", json!({"BUILDPACK_URL": hog.display().to_string()}));
    w.config("bomb", json!({"BUILDPACK_URL": bomb.display().to_string()}));
    let src = w.source(&[("Procfile", "web: true\n"), ("app.py", "")]);
    let hog_id = w.start("hog", &src);
    let bomb_id = w.start("bomb", &src);
    // Another app builds meanwhile, unharmed.
    let calm = w.build(
        "calm",
        &[("Procfile", "web: python3 app.py\n"), ("app.py", "")],
    );
    succeeded(&calm);

    let h = w.follow(&hog_id);
    assert_eq!(h.last["status"], "failed");
    assert_eq!(h.last["error"]["step"], "compile");
    assert!(
        h.last["error"]["message"]
            .as_str()
            .unwrap()
            .contains("ran out of memory"),
        "{}",
        h.last
    );
    let b = w.follow(&bomb_id);
    assert_eq!(b.last["status"], "failed");
    assert_eq!(b.last["error"]["step"], "compile");
    assert!(
        b.last["error"]["message"]
            .as_str()
            .unwrap()
            .contains("time limit"),
        "{}",
        b.last
    );
    // Nothing of the bomb is left running.
    let left = Command::new("pgrep")
        .args(["-u", "pdk-bomb"])
        .output()
        .unwrap();
    // Killed processes whose parent (the bomb) died are reaped by pid 1, which
    // may take its time: zombies are dead already.
    let left: Vec<String> = String::from_utf8_lossy(&left.stdout)
        .lines()
        .filter(|p| {
            let st = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
            let state = st
                .rsplit_once(')')
                .map(|(_, r)| r.trim_start())
                .unwrap_or("");
            !state.is_empty() && !state.starts_with('Z')
        })
        .map(|p| {
            let cg = std::fs::read_to_string(format!("/proc/{p}/cgroup")).unwrap_or_default();
            let st = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
            format!("{p}: {st}\n{cg}")
        })
        .collect();
    assert!(left.is_empty(), "left running: {left:#?}");
}

/// Removes a directory when dropped (a test's files outside its test dir).
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn a_build_cannot_read_other_apps_or_the_platform() {
    let mut w = world("deployer-isolation", &[]);
    w.app("victim");
    w.app("snoop");
    // The victim's build leaves its cache behind (and the victim's app files
    // pass through the deployer's directories).
    succeeded(&w.build(
        "victim",
        &[
            ("Procfile", "web: python3 app.py\n"),
            ("app.py", "SECRET = 1\n"),
        ],
    ));
    // The test's own dir is under /tmp, which a build sees as its own: the
    // platform's files there read as missing. Protected copies outside /tmp and
    // /var/tmp (a build's are private too) must read as denied, by permissions.
    let outside = RemoveOnDrop(PathBuf::from(format!(
        "/run/paddock-isolation-{}",
        ulid::Ulid::new()
    )));
    let state = outside.0.join("state");
    std::fs::create_dir_all(state.join("deployer/cache/victim")).unwrap();
    std::fs::copy(&w.node.config, outside.0.join("paddock.toml")).unwrap();
    std::fs::write(state.join("deployer/cache/victim/secret"), "SECRET").unwrap();
    for (p, mode) in [
        (outside.0.clone(), 0o755),
        (outside.0.join("paddock.toml"), 0o600),
        (state.clone(), 0o700),
    ] {
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    let dir = w.deployer_dir();
    let denied = [
        (outside.0.join("paddock.toml").display().to_string(), false),
        (state.display().to_string(), true),
        (
            state
                .join("deployer/cache/victim/secret")
                .display()
                .to_string(),
            false,
        ),
        ("/root".to_string(), true),
        ("/etc/shadow".to_string(), false),
    ];
    let hidden = [
        w.node.config.display().to_string(),
        dir.join("cache/victim").display().to_string(),
        dir.join("builds").display().to_string(),
        w.node.dir.join("state").display().to_string(),
    ];
    let mut compile = String::from("echo \"uid=$(id -u) user=$(id -un)\"\n");
    for (t, is_dir) in &denied {
        let cmd = if *is_dir { "ls" } else { "cat" };
        let arg = if *is_dir { format!("{t}/") } else { t.clone() };
        compile.push_str(&format!(
            "if err=$({cmd} '{arg}' 2>&1 >/dev/null); then echo 'READ {t}'; else echo \"DENIED {t}: $err\"; fi\n"
        ));
    }
    for t in &hidden {
        compile.push_str(&format!(
            "if cat '{t}' >/dev/null 2>&1 || ls '{t}/' >/dev/null 2>&1; then echo 'READ {t}'; else echo 'HIDDEN {t}'; fi\n"
        ));
    }
    compile.push_str("echo \"tmp: $(ls -A /tmp | tr '\\n' ' ')\"\n");
    compile.push_str("echo \"home=$HOME pwd=$(pwd)\"\n");
    compile.push_str("echo \"fds: $(ls /proc/self/fd | tr '\\n' ' ')\"\n");
    compile.push_str("env | grep -Ei 'secret|key|paddock_config' | sed 's/^/ENV /' || true\n");
    let bp = w.buildpack("snoop-bp", "echo Snoop", &compile, "echo ---");
    w.config("snoop", json!({"BUILDPACK_URL": bp.display().to_string()}));
    let b = w.build("snoop", &[("Procfile", "web: true\n")]);
    succeeded(&b);
    let log = b.log();
    assert!(b.has("user=pdk-snoop"), "{log}");
    assert!(!b.has("uid=0 "), "{log}");
    for (t, _) in &denied {
        let line = b
            .lines
            .iter()
            .find(|l| l.starts_with(&format!("DENIED {t}: ")))
            .unwrap_or_else(|| panic!("{t} was readable:\n{log}"));
        assert!(
            line.contains("Permission denied"),
            "{t} was not refused by its permissions: {line}\n{log}"
        );
    }
    for t in &hidden {
        assert!(b.has(&format!("HIDDEN {t}")), "{t} was readable:\n{log}");
    }
    assert!(!b.has("READ "), "{log}");
    assert!(b.has("home=/app pwd=/app"), "{log}");
    // Only stdio (and the directory ls itself reads) reaches build code.
    let fds = b.lines.iter().find(|l| l.starts_with("fds: ")).unwrap();
    assert_eq!(fds.trim(), "fds: 0 1 2 3", "{log}");
    // Its /tmp is its own: cache, env, work, buildpacks, nothing of the host's.
    let tmp = b.lines.iter().find(|l| l.starts_with("tmp: ")).unwrap();
    for own in ["cache", "env", "work", "buildpacks"] {
        assert!(tmp.contains(own), "{tmp}");
    }
    assert!(!tmp.contains("paddock-"), "the host's /tmp shows: {tmp}");
    assert!(
        !b.has("ENV "),
        "platform secrets in the build's env:\n{log}"
    );
}

#[test]
fn the_release_command_runs_once_before_the_release_goes_live() {
    let mut w = world("deployer-release-phase", &[]);
    w.node.start("runner");
    w.app("relphase");
    let b = w.build(
        "relphase",
        &[
            (
                "Procfile",
                "web: python3 -m http.server $PORT\nrelease: sh -c 'echo \"migrating in $(pwd) as $(id -un)\"; ls /app; printf \"rel:\\033[1mbold\\0x\\n%010000d\\n\" 0'\n",
            ),
            ("marker.txt", "x\n"),
        ],
    );
    let release = succeeded(&b);
    assert!(b.has("-----> Running the release command"), "{}", b.log());
    assert!(b.has("migrating in /app as pdk-relphase"), "{}", b.log());
    // The release phase's output is cut and escaped as the build's is.
    assert!(b.has("       rel:\\x1b[1mbold\\x00x"), "{}", b.log());
    assert!(
        b.has(&format!("       {}…", "0".repeat(4096))),
        "{}",
        b.log()
    );
    assert!(
        b.has("marker.txt"),
        "the release command sees the slug:\n{}",
        b.log()
    );
    assert_eq!(release["status"], "succeeded");

    // A failing release command fails the release and the build, with its output.
    let before = w.releases("relphase").len();
    let b = w.build(
        "relphase",
        &[("Procfile", "web: python3 -m http.server $PORT\nrelease: sh -c \"echo 'migration broke' >&2; exit 4\"\n")],
    );
    assert_eq!(b.last["status"], "failed", "{}", b.log());
    assert_eq!(b.last["error"]["step"], "release-phase", "{}", b.last);
    assert!(b.has("migration broke"), "{}", b.log());
    let rels = w.releases("relphase");
    assert_eq!(rels.len(), before + 1, "the release was made, then failed");
    let newest = rels.iter().max_by_key(|r| r["version"].as_i64()).unwrap();
    assert_eq!(newest["status"], "failed", "{newest}");
    assert_eq!(b.last["release"]["version"], newest["version"]);
}

#[test]
fn an_uploaded_buildpack_is_used_by_name() {
    let mut w = world("deployer-uploaded-bp", &[]);
    w.app("custom");
    let bp = w.buildpack(
        "uploaded-bp",
        "echo Custom",
        "echo '-----> Custom compile'; echo built > /app/built.txt",
        "echo '---'; echo 'default_process_types:'; echo '  web: cat built.txt'",
    );
    let tgz = w.t.path().join("uploaded-bp.tgz");
    assert!(Command::new("tar")
        .arg("-czf")
        .arg(&tgz)
        .arg("-C")
        .arg(&bp)
        .arg(".")
        .status()
        .unwrap()
        .success());
    let mut c = w.node.client("blobstore");
    let blob = paddock_blob::put_file_blocking(&mut c, &tgz)
        .unwrap()
        .sha256;
    w.node
        .client("api")
        .call("buildpack.add", json!({"name": "mine", "blob": blob}))
        .unwrap();
    w.config("custom", json!({"BUILDPACK_URL": "paddock:mine"}));
    let b = w.build("custom", &[("README", "x\n")]);
    let release = succeeded(&b);
    assert!(b.has("Using the uploaded buildpack mine"), "{}", b.log());
    assert!(b.has("-----> Custom compile"), "{}", b.log());
    assert_eq!(release["process_types"], json!({"web": "cat built.txt"}));
    assert!(w.slug_files(&release).iter().any(|f| f == "built.txt"));

    // By its blob's sha256 too, since it is recorded as a buildpack.
    w.config("custom", json!({"BUILDPACK_URL": format!("sha256:{blob}")}));
    let b = w.build("custom", &[("README", "x\n")]);
    succeeded(&b);
    assert!(b.has("Using the uploaded buildpack mine"), "{}", b.log());
    // Any other blob (here a tar that would work as a buildpack, as another
    // app's source or slug may) is not run.
    let stolen = w.buildpack("stolen-bp", "echo Stolen", "true", "echo ---");
    let stolen_tar = w.t.path().join("stolen.tar");
    assert!(Command::new("tar")
        .arg("-cf")
        .arg(&stolen_tar)
        .arg("-C")
        .arg(&stolen)
        .arg(".")
        .status()
        .unwrap()
        .success());
    let mut c = w.node.client("blobstore");
    let other = paddock_blob::put_file_blocking(&mut c, &stolen_tar)
        .unwrap()
        .sha256;
    w.config(
        "custom",
        json!({"BUILDPACK_URL": format!("sha256:{other}")}),
    );
    let b = w.build("custom", &[("README", "x\n")]);
    assert_eq!(b.last["status"], "failed", "{}", b.log());
    assert_eq!(b.last["error"]["step"], "detect", "{}", b.last);
    assert!(
        b.last["error"]["message"]
            .as_str()
            .unwrap()
            .contains("is not an uploaded buildpack"),
        "{}",
        b.last
    );
    assert!(!b.has("Stolen"), "{}", b.log());
}

#[test]
fn a_hostile_source_tar_writes_nothing_outside_app() {
    let mut w = world("deployer-hostile-tar", &[]);
    w.app("evil");
    // A directory the app's user could write to, outside the build.
    let outside = PathBuf::from(format!("/var/tmp/paddock-hostile-{}", ulid::Ulid::new()));
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::set_permissions(&outside, std::fs::Permissions::from_mode(0o777)).unwrap();
    let tar = w.t.path().join("evil.tar");
    let script = format!(
        r#"
import io, tarfile
t = tarfile.open({tar:?}, "w")
def add(name, data=b"x", **kw):
    i = tarfile.TarInfo(name)
    for k, v in kw.items():
        setattr(i, k, v)
    i.size = len(data) if i.type == tarfile.REGTYPE else 0
    t.addfile(i, io.BytesIO(data) if i.type == tarfile.REGTYPE else None)
add("Procfile", b"web: true\n")
add("../escaped.txt")
add({abs:?})
add("link", type=tarfile.SYMTYPE, linkname={outside:?})
add("link/through-link.txt")
add("dev", type=tarfile.CHRTYPE, devmajor=1, devminor=3)
t.close()
"#,
        tar = tar.display().to_string(),
        abs = outside.join("absolute.txt").display().to_string(),
        outside = outside.display().to_string(),
    );
    assert!(Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(&script)
        .status()
        .unwrap()
        .success());
    let mut c = w.node.client("blobstore");
    let sha = paddock_blob::put_file_blocking(&mut c, &tar)
        .unwrap()
        .sha256;
    let id = w.start("evil", &sha);
    let b = w.follow(&id);
    let written: Vec<_> = std::fs::read_dir(&outside)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    let _ = std::fs::remove_dir_all(&outside);
    assert!(
        written.is_empty(),
        "written outside /app: {written:?}\n{}",
        b.log()
    );
    assert!(!w.t.path().join("node-a/state/escaped.txt").exists());
    // GNU tar refuses such members; the build fails while unpacking, saying why.
    assert_eq!(b.last["status"], "failed", "{}", b.log());
    assert_eq!(b.last["error"]["step"], "source", "{}", b.last);
}

#[test]
fn a_build_cut_off_by_a_deployer_crash_is_failed_and_killed_at_restart() {
    let mut w = world("deployer-crash", &[]);
    w.app("cut");
    let slow = w.buildpack(
        "slow-bp",
        "echo Slow",
        "echo 'compiling for a long time'; sleep 120",
        "echo ---",
    );
    w.config("cut", json!({"BUILDPACK_URL": slow.display().to_string()}));
    let src = w.source(&[("Procfile", "web: true\n")]);
    let id = w.start("cut", &src);
    let mut c = w.deployer();
    eventually(Duration::from_secs(20), "the build compiles", || {
        let r = c
            .call(
                "build.log",
                json!({"build": id, "after": 0, "wait_ms": 1000}),
            )
            .ok()?;
        r["lines"]
            .as_array()?
            .iter()
            .any(|l| l == "compiling for a long time")
            .then_some(())
    });
    w.node.kill9("deployer");
    w.node.start("deployer");
    let info = eventually(Duration::from_secs(20), "the build is failed", || {
        let r = w.deployer().call("build.info", json!({"build": id})).ok()?;
        (r["build"]["status"] == "failed").then_some(r)
    });
    let msg = info["build"]["error"]["message"].as_str().unwrap();
    assert!(msg.contains("deployer stopped"), "{info}");
    assert_eq!(info["build"]["error"]["step"], "compile", "{info}");
    // Its processes were killed and its tree removed; the app builds again.
    let alive = || {
        let out = Command::new("pgrep")
            .args(["-u", "pdk-cut"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|p| {
                let st = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
                let state = st
                    .rsplit_once(')')
                    .map(|(_, r)| r.trim_start())
                    .unwrap_or("");
                !state.is_empty() && !state.starts_with('Z')
            })
            .count()
    };
    assert_eq!(alive(), 0, "the cut-off build's processes still run");
    assert!(!w.deployer_dir().join("builds").join(&id).exists());
    w.config("cut", json!({"BUILDPACK_URL": "procfile"}));
    succeeded(&w.build("cut", &[("Procfile", "web: true\n")]));
}

#[test]
fn a_pyproject_app_is_installed_into_its_virtualenv() {
    let mut w = world("deployer-pyproject", &[]);
    w.app("proj");
    let pyproject = r#"[build-system]
requires = ["setuptools>=64"]
build-backend = "setuptools.build_meta"

[project]
name = "proj"
version = "0.1.0"
dependencies = ["itsdangerous==2.2.0"]

[tool.setuptools]
py-modules = ["proj"]
"#;
    let b = w.build(
        "proj",
        &[
            ("pyproject.toml", pyproject),
            ("proj.py", "import itsdangerous\n"),
            ("Procfile", "web: python -c 'import proj'\n"),
        ],
    );
    let release = succeeded(&b);
    assert!(b.has("-----> Python app detected"), "{}", b.log());
    assert!(b.has("Successfully installed"), "{}", b.log());
    let slug = w.slug_files(&release);
    assert!(
        slug.iter().any(
            |f| f.starts_with(".venv/lib/python3") && f.contains("site-packages/itsdangerous/")
        ),
        "{slug:?}"
    );
}

#[test]
fn a_flood_of_output_is_cut_at_the_logs_limit_and_the_outcome_kept() {
    let mut w = world("deployer-flood", &[]);
    w.app("loud");
    let bp = w.buildpack("loud-bp", "echo Loud", "seq 1 60000", "echo ---");
    w.config("loud", json!({"BUILDPACK_URL": bp.display().to_string()}));
    let b = w.build("loud", &[("Procfile", "web: true\n")]);
    succeeded(&b);
    assert!(b.has("over the log's limit"), "no note of the cut");
    assert!(!b.has("60000"), "lines past the limit were kept");
    assert!(b.lines.len() < 50_100, "{} lines", b.lines.len());
    assert!(
        b.lines.last().unwrap().contains("succeeded"),
        "{:?}",
        b.lines.last()
    );
    let info = w
        .deployer()
        .call("build.info", json!({"build": b.id}))
        .unwrap();
    let log = info["build"]["log"].as_str().unwrap();
    assert_eq!(
        log.lines().count(),
        b.lines.len(),
        "the saved log is the one streamed"
    );
}

#[test]
fn an_app_made_again_under_an_old_name_does_not_get_the_old_cache() {
    let mut w = world("deployer-cache-identity", &[]);
    w.app("reborn");
    let bp = w.buildpack(
        "cache-bp",
        "echo Cache",
        "if [ -f \"$2/planted\" ]; then echo 'cache: found planted'; else echo 'cache: empty'; fi; echo x > \"$2/planted\"",
        "echo ---",
    );
    let url = json!({"BUILDPACK_URL": bp.display().to_string()});
    w.config("reborn", url.clone());
    let files = [("Procfile", "web: true\n")];
    assert!(w.build("reborn", &files).has("cache: empty"));
    assert!(w.build("reborn", &files).has("cache: found planted"));
    // Destroyed, then made again by someone else: a new app, an empty cache.
    w.owner
        .call("app.destroy", json!({"app": "reborn", "confirm": "reborn"}))
        .unwrap();
    // Made again at once, the deployer not restarted: its hourly sweep has not
    // run, the old cache is still there, and only the identity check keeps it
    // from the new app.
    let cache = w.deployer_dir().join("cache/reborn");
    assert!(cache.exists());
    let bob = create_user(&w.node, "bob", false);
    let mut bob = user_client(&bob);
    bob.call("app.create", json!({"name": "reborn"})).unwrap();
    bob.call("config.set", json!({"app": "reborn", "vars": url}))
        .unwrap();
    let b = w.build("reborn", &files);
    succeeded(&b);
    assert!(b.has("cache: empty"), "{}", b.log());
    assert!(w.build("reborn", &files).has("cache: found planted"));
}

#[test]
fn builds_past_max_builds_wait_for_a_slot() {
    let mut w = world("deployer-slots", &[("max_builds", toml::Value::Integer(1))]);
    let slow = w.buildpack(
        "slow-bp",
        "echo Slow",
        "echo compiling; sleep 2",
        "echo ---",
    );
    for app in ["first", "second"] {
        w.app(app);
        w.config(app, json!({"BUILDPACK_URL": slow.display().to_string()}));
    }
    let src = w.source(&[("Procfile", "web: true\n")]);
    let one = w.start("first", &src);
    let two = w.start("second", &src);
    let b2 = w.follow(&two);
    let b1 = w.follow(&one);
    succeeded(&b1);
    succeeded(&b2);
    assert!(b2.has("-----> Waiting for a build slot"), "{}", b2.log());
    assert!(!b1.has("Waiting for a build slot"), "{}", b1.log());
}

/// The build's failure message (the build must have failed at `step`).
fn failed_at(b: &Built, step: &str) -> String {
    assert_eq!(b.last["status"], "failed", "{}", b.log());
    assert_eq!(b.last["error"]["step"], step, "{}\n{}", b.last, b.log());
    b.last["error"]["message"].as_str().unwrap().to_string()
}

#[test]
fn build_code_cannot_make_the_deployer_chmod_a_host_file() {
    let mut w = world("deployer-plant", &[]);
    w.app("planter");
    // A root-only file the app's user cannot touch.
    let victim = w.t.path().join("victim");
    std::fs::write(&victim, "secret\n").unwrap();
    std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o600)).unwrap();
    // The first buildpack's detect plants the second's mount point (and the
    // others) as symlinks to it, before the deployer makes them.
    let plant = format!(
        "for m in buildpack-local-1 cache buildpacks .app work/x; do ln -s {v} /tmp/$m 2>&1 | sed 's/^/plant: /' >&2; done; echo Planter",
        v = victim.display()
    );
    let a = w.buildpack("planter-bp", &plant, "true", "echo ---");
    let b = w.buildpack("plain-bp", "echo Plain", "true", "echo ---");
    let list = format!("{}\n{}\n", a.display(), b.display());
    let built = w.build(
        "planter",
        &[(".buildpacks", &list), ("Procfile", "web: true\n")],
    );
    let mode = std::fs::metadata(&victim).unwrap().permissions().mode() & 0o7777;
    assert_eq!(
        mode,
        0o600,
        "the deployer changed a host file's mode:\n{}",
        built.log()
    );
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "secret\n");
    // /tmp is root's: nothing could be planted there.
    succeeded(&built);
    assert!(
        built.has("plant: ln: failed to create symbolic link '/tmp/buildpack-local-1'"),
        "{}",
        built.log()
    );
}

#[test]
fn local_buildpacks_come_only_from_safe_directories_the_operator_allows() {
    let mut w = world("deployer-local-bp", &[]);
    w.app("local");
    let files = [("Procfile", "web: true\n")];
    let refused = |w: &mut World, path: &str, says: &str| {
        w.config("local", json!({ "BUILDPACK_URL": path }));
        let b = w.build("local", &files);
        let m = failed_at(&b, "detect");
        assert!(m.contains(says), "{path}: {m}");
        assert!(!b.has("Ran the buildpack"), "{}", b.log());
    };
    let ok = w.buildpack("ok-bp", "echo Ran the buildpack", "true", "echo ---");
    w.config(
        "local",
        json!({ "BUILDPACK_URL": ok.display().to_string() }),
    );
    succeeded(&w.build("local", &files));

    // Writable by others, or not root's.
    let open = w.buildpack("open-bp", "echo Ran the buildpack", "true", "echo ---");
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    refused(
        &mut w,
        &open.display().to_string(),
        "writable by its group or others",
    );
    let theirs = w.buildpack("theirs-bp", "echo Ran the buildpack", "true", "echo ---");
    std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
    refused(&mut w, &theirs.display().to_string(), "not root");

    // Outside the allowed directory, directly or through a symlink (a build
    // could swap one; it is resolved once and judged by where it leads).
    let elsewhere = RemoveOnDrop(PathBuf::from(format!(
        "/run/paddock-bp-{}",
        ulid::Ulid::new()
    )));
    std::fs::create_dir_all(elsewhere.0.join("bin")).unwrap();
    std::fs::write(
        elsewhere.0.join("bin/detect"),
        "#!/bin/sh\necho Ran the buildpack\n",
    )
    .unwrap();
    for p in [
        elsewhere.0.clone(),
        elsewhere.0.join("bin"),
        elsewhere.0.join("bin/detect"),
    ] {
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    refused(
        &mut w,
        &elsewhere.0.display().to_string(),
        "is not under a directory this deployer allows",
    );
    let link = w.t.path().join("link-bp");
    std::os::unix::fs::symlink(&elsewhere.0, &link).unwrap();
    refused(
        &mut w,
        &link.display().to_string(),
        "is not under a directory this deployer allows",
    );
    let dotdot = format!("{}/../../run", w.t.path().display());
    refused(&mut w, &dotdot, "may not contain `..`");

    // Where the operator allows none (the default), none is used.
    let mut w2 = world(
        "deployer-no-local-bp",
        &[("local_buildpacks", toml::Value::Array(vec![]))],
    );
    w2.app("local");
    let ok2 = w2.buildpack("ok-bp", "echo Ran the buildpack", "true", "echo ---");
    refused(
        &mut w2,
        &ok2.display().to_string(),
        "local buildpack paths are not allowed on this deployer",
    );
    // Nor from .buildpacks.
    let list = format!("{}\n", ok2.display());
    w2.config("local", json!({ "BUILDPACK_URL": "" }));
    let b = w2.build(
        "local",
        &[(".buildpacks", &list), ("Procfile", "web: true\n")],
    );
    assert!(
        failed_at(&b, "detect").contains("not allowed"),
        "{}",
        b.last
    );
}

#[test]
fn a_long_line_without_a_newline_is_cut_in_bounded_memory() {
    let mut w = world("deployer-long-line", &[]);
    w.app("long");
    // 300 MB on one line, then a normal one.
    let bp = w.buildpack(
        "long-bp",
        "echo Long",
        "head -c 300000000 /dev/zero | tr '\\0' a; echo; echo after-the-long-line",
        "echo ---",
    );
    w.config("long", json!({"BUILDPACK_URL": bp.display().to_string()}));
    let b = w.build("long", &[("Procfile", "web: true\n")]);
    succeeded(&b);
    let long = b
        .lines
        .iter()
        .find(|l| l.starts_with("aaaa"))
        .unwrap_or_else(|| panic!("no long line:\n{}", b.log()));
    assert_eq!(long, &format!("{}…", "a".repeat(4096)));
    assert!(b.has("after-the-long-line"), "{}", b.log());
    // The deployer never held the line: its peak memory stayed far below it.
    let status =
        std::fs::read_to_string(format!("/proc/{}/status", w.node.pid("deployer"))).unwrap();
    let hwm_kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    println!("deployer peak RSS: {} MB", hwm_kb / 1024);
    assert!(
        hwm_kb < 150 * 1024,
        "the deployer's peak RSS was {} MB",
        hwm_kb / 1024
    );
}

#[test]
fn nul_and_terminal_escapes_in_output_are_saved_and_shown_escaped() {
    let mut w = world("deployer-escapes", &[]);
    w.app("escapes");
    let bp = w.buildpack(
        "esc-bp",
        "echo Escapes",
        "printf 'nul:\\0:end\\n'; printf 'esc:\\033[31mred\\033[0m bel:\\a cr:a\\rb\\ttab\\n' >&2; printf 'osc:\\033]0;title\\007\\n'",
        "echo ---",
    );
    w.config(
        "escapes",
        json!({"BUILDPACK_URL": bp.display().to_string()}),
    );
    let b = w.build("escapes", &[("Procfile", "web: true\n")]);
    succeeded(&b);
    let want = [
        "nul:\\x00:end",
        "esc:\\x1b[31mred\\x1b[0m bel:\\x07 cr:a\\x0db\ttab",
        "osc:\\x1b]0;title\\x07",
    ];
    for l in want {
        assert!(b.has(l), "{l}:\n{}", b.log());
    }
    let controls = |s: &str| s.chars().any(|c| c != '\t' && c != '\n' && c.is_control());
    assert!(!controls(&b.log()), "{:?}", b.log());
    // The log was saved (PostgreSQL refuses NUL in text).
    let info = w
        .deployer()
        .call("build.info", json!({"build": b.id}))
        .unwrap();
    let log = info["build"]["log"].as_str().unwrap();
    for l in want {
        assert!(log.contains(l), "{l} is not in the saved log:\n{log}");
    }
    assert!(!controls(log), "{log:?}");
    assert_eq!(
        log.lines().count(),
        b.lines.len(),
        "the saved log is the one streamed"
    );
}

#[test]
fn files_and_slugs_over_their_limits_fail_the_build() {
    let mut w = world(
        "deployer-disk",
        &[
            ("build_disk_mb", toml::Value::Integer(64)),
            ("max_slug_mb", toml::Value::Integer(1)),
            ("build_inodes", toml::Value::Integer(10000)),
            ("cache_mb", toml::Value::Integer(1)),
        ],
    );
    w.app("big");
    let files = [("Procfile", "web: true\n")];
    let with = |w: &mut World, compile: &str| {
        let bp = w.buildpack(
            &format!("bp-{}", ulid::Ulid::new()),
            "echo Big",
            compile,
            "echo ---",
        );
        w.config("big", json!({"BUILDPACK_URL": bp.display().to_string()}));
        w.build("big", &files)
    };
    // One file past build_disk_mb (RLIMIT_FSIZE).
    let b = with(
        &mut w,
        "set -e; head -c 100000000 /dev/zero > /app/big; echo wrote-it",
    );
    let m = failed_at(&b, "compile");
    assert!(m.contains("disk limit (64 MB"), "{m}");
    assert!(!b.has("wrote-it"), "{}", b.log());
    // Files under it each, but together over it: the watchdog stops the
    // build while it runs (it would sleep on).
    let b = with(
        &mut w,
        "set -e; for i in 1 2 3; do head -c 33554432 /dev/zero > /app/part$i; done; \
         echo wrote-all; sleep 20; echo still-running",
    );
    let m = failed_at(&b, "compile");
    assert!(m.contains("the build used more than 64 MB of disk"), "{m}");
    assert!(b.has("wrote-all") && !b.has("still-running"), "{}", b.log());
    assert!(b.took < Duration::from_secs(18), "{:?}", b.took);
    // Split between /tmp/work and the cache, the same.
    let b = with(
        &mut w,
        "set -e; head -c 34000000 /dev/zero > /tmp/work/a; head -c 34000000 /dev/zero > $2/b",
    );
    let m = failed_at(&b, "compile");
    assert!(m.contains("the build used more than 64 MB of disk"), "{m}");
    // Many empty files: over build_inodes.
    let b = with(
        &mut w,
        "set -e; mkdir /tmp/work/many; cd /tmp/work/many; seq 1 100000 | xargs touch; \
         echo made-them; sleep 20; echo still-running",
    );
    let m = failed_at(&b, "compile");
    assert!(m.contains("more than 10000 files (build_inodes)"), "{m}");
    assert!(!b.has("still-running"), "{}", b.log());
    // A cache over cache_mb is dropped at the end of the build, saying so.
    let cache = w.deployer_dir().join("cache").join("big");
    let b = with(&mut w, "head -c 2000000 /dev/urandom > $2/blob");
    succeeded(&b);
    assert!(
        b.has("The build cache held more than 1 MB (cache_mb): it was dropped"),
        "{}",
        b.log()
    );
    assert!(!cache.join("blob").exists());
    // Under it, kept.
    let b = with(&mut w, "head -c 100000 /dev/urandom > $2/small");
    succeeded(&b);
    assert!(!b.has("cache_mb"), "{}", b.log());
    assert!(cache.join("small").exists());
    // A compressed slug over max_slug_mb.
    let b = with(&mut w, "head -c 3000000 /dev/urandom > /app/noise");
    let m = failed_at(&b, "slug");
    assert!(m.contains("larger than 1 MB (max_slug_mb)"), "{m}");
    // Under the limits, it builds.
    succeeded(&with(&mut w, "head -c 100000 /dev/urandom > /app/noise"));
}

#[test]
fn build_code_gains_no_privileges_and_gets_private_tmpfs() {
    let mut w = world("deployer-hardening", &[]);
    w.app("hard");
    let bp = w.buildpack(
        "hard-bp",
        "echo Hard",
        "grep NoNewPrivs /proc/self/status\n\
         awk '$2 == \"/app\" || $2 == \"/tmp\" || $2 == \"/tmp/cache\" || $2 == \"/tmp/buildpacks\" { print \"mount\", $2, $4 }' /proc/self/mounts\n\
         echo \"vartmp=$(stat -f -c %T /var/tmp) shm=$(stat -f -c %T /dev/shm) vartmp-files=$(ls -A /var/tmp | wc -l)\"\n\
         touch /tmp/planted 2>/dev/null && echo tmp-writable || echo tmp-read-only\n\
         touch \"$TMPDIR/x\" && echo \"tmpdir-writable $TMPDIR\"\n\
         [ -e /proc/1 ] && echo sees-pid-1 || echo pid-1-hidden\n\
         [ -e /proc/self/status ] && echo sees-itself",
        "echo ---",
    );
    w.config("hard", json!({"BUILDPACK_URL": bp.display().to_string()}));
    let b = w.build("hard", &[("Procfile", "web: true\n")]);
    succeeded(&b);
    let log = b.log();
    assert!(b.has("NoNewPrivs:\t1"), "{log}");
    let mounts: Vec<&String> = b.lines.iter().filter(|l| l.starts_with("mount ")).collect();
    assert_eq!(mounts.len(), 4, "{log}");
    for m in mounts {
        assert!(m.contains("nosuid") && m.contains("nodev"), "{m}");
    }
    assert!(b.has("vartmp=tmpfs shm=tmpfs vartmp-files=0"), "{log}");
    assert!(b.has("tmp-read-only"), "{log}");
    assert!(b.has("tmpdir-writable /tmp/work"), "{log}");
    // Other users' processes (init, the deployer, other apps' builds) are hidden.
    assert!(b.has("pid-1-hidden"), "{log}");
    assert!(b.has("sees-itself"), "{log}");
}

#[test]
fn builds_are_refused_without_memory_and_pids_cgroups_unless_allowed() {
    let mut w = world("deployer-unconfined", &[]);
    let none = w.t.path().join("no-cgroups");
    std::fs::create_dir_all(&none).unwrap();
    let set = |w: &mut World, k: &str, v: toml::Value| {
        let d = w.node.file.daemons.get_mut("deployer").unwrap();
        d.other.insert(k.to_string(), v);
        w.node.save();
        w.node.kill9("deployer");
        w.node.start("deployer");
    };
    set(
        &mut w,
        "cgroup_root",
        toml::Value::String(none.display().to_string()),
    );
    w.app("loose");
    let src = w.source(&[("Procfile", "web: true\n")]);
    let start = |w: &World| {
        eventually(Duration::from_secs(20), "the deployer takes builds", || {
            w.deployer()
                .call(
                    "build.start",
                    json!({"app": "loose", "commit": "abc", "source": src}),
                )
                .ok()
                .map(|r| r["build"].as_str().unwrap().to_string())
        })
    };
    let id = start(&w);
    let b = w.follow(&id);
    let m = failed_at(&b, "source");
    assert!(
        m.contains("no usable memory and pids cgroup controller(s)"),
        "{m}"
    );
    assert!(m.contains("allow_unconfined_builds"), "{m}");
    set(
        &mut w,
        "allow_unconfined_builds",
        toml::Value::Boolean(true),
    );
    let id = start(&w);
    succeeded(&w.follow(&id));
}

#[test]
fn builds_of_different_apps_share_no_ipc_or_lock_files() {
    let mut w = world("deployer-ipc", &[]);
    w.app("ipc-a");
    w.app("ipc-b");
    const KEY: &str = "0x005add0c";
    let lock = PathBuf::from("/run/lock/paddock-ipc-test");
    let _ = std::fs::remove_file(&lock);
    let shm = "import ctypes; l = ctypes.CDLL(None, use_errno=True); \
               print('shmget', l.shmget(0x5add0c, 4096, FLAGS))";
    // A: a shm segment with a fixed key (0666) and a lock file, then it waits
    // for the test while B builds.
    let a = w.buildpack(
        "ipc-a-bp",
        "echo A",
        &format!(
            "python3 -c \"{}\"\n\
             ipcs -m | grep -c {KEY} | sed 's/^/a-segments=/'\n\
             echo mine > /run/lock/paddock-ipc-test && echo a-locked\n\
             touch /app/ready\n\
             for i in $(seq 600); do [ -e /app/done ] && break; sleep 0.1; done\n\
             rm -f /app/done /app/ready",
            shm.replace("FLAGS", "0o1666")
        ),
        "echo ---",
    );
    let b = w.buildpack(
        "ipc-b-bp",
        "echo B",
        &format!(
            "python3 -c \"{}\"\n\
             ipcs -m | grep -c {KEY} | sed 's/^/b-segments=/'\n\
             [ -e /run/lock/paddock-ipc-test ] && echo b-sees-lock || echo b-no-lock\n\
             echo b-lock-files=$(ls -A /run/lock | wc -l)",
            shm.replace("FLAGS", "0")
        ),
        "echo ---",
    );
    w.config("ipc-a", json!({"BUILDPACK_URL": a.display().to_string()}));
    w.config("ipc-b", json!({"BUILDPACK_URL": b.display().to_string()}));
    let src = w.source(&[("Procfile", "web: true\n")]);
    let id_a = w.start("ipc-a", &src);
    let app_a = w.deployer_dir().join("builds").join(&id_a).join("app");
    eventually(Duration::from_secs(60), "build A made its segment", || {
        app_a.join("ready").exists().then_some(())
    });
    let host_ipcs = || {
        let out = Command::new("ipcs").arg("-m").output().unwrap();
        String::from_utf8(out.stdout).unwrap()
    };
    // Not on the host while A runs, nor its lock file.
    assert!(!host_ipcs().contains(KEY), "{}", host_ipcs());
    assert!(!lock.exists());
    let built_b = w.build("ipc-b", &[("Procfile", "web: true\n")]);
    std::fs::write(app_a.join("done"), "").unwrap();
    let built_a = w.follow(&id_a);
    succeeded(&built_a);
    succeeded(&built_b);
    let (la, lb) = (built_a.log(), built_b.log());
    assert!(built_a.has("a-segments=1"), "{la}");
    assert!(built_a.has("a-locked"), "{la}");
    assert!(!built_a.has("shmget -1"), "{la}");
    // B sees neither.
    assert!(built_b.has("b-segments=0"), "{lb}");
    assert!(built_b.has("shmget -1"), "{lb}");
    assert!(built_b.has("b-no-lock"), "{lb}");
    assert!(built_b.has("b-lock-files=0"), "{lb}");
    // Nothing of A's is left on the host.
    assert!(!host_ipcs().contains(KEY), "{}", host_ipcs());
    assert!(!lock.exists());
}

#[test]
fn tree_files_must_be_the_apps_own_with_one_link_and_buildpacks_are_capped() {
    let mut w = world("deployer-tree-files", &[]);
    w.app("links");
    let with = |w: &mut World, compile: &str| {
        let bp = w.buildpack(
            &format!("bp-{}", ulid::Ulid::new()),
            "echo Links",
            compile,
            "echo ---",
        );
        w.config("links", json!({"BUILDPACK_URL": bp.display().to_string()}));
        w.build("links", &[("Procfile", "web: true\n")])
    };
    // A second link to the Procfile (on a host with fs.protected_hardlinks=0
    // it could have been a link to /etc/shadow).
    let b = with(&mut w, "ln /app/Procfile /app/Procfile2");
    let m = failed_at(&b, "process-types");
    assert!(
        m.contains("Procfile is refused: it has 2 hard links"),
        "{m}"
    );
    // A symlink, even to the app's own file.
    let b = with(
        &mut w,
        "mv /app/Procfile /app/Procfile.real; ln -s Procfile.real /app/Procfile",
    );
    let m = failed_at(&b, "process-types");
    assert!(m.contains("Procfile is refused: it is a symlink"), "{m}");
    // app.json likewise.
    let b = with(
        &mut w,
        "echo '{}' > /app/x.json; ln /app/x.json /app/app.json",
    );
    let m = failed_at(&b, "process-types");
    assert!(
        m.contains("app.json is refused: it has 2 hard links"),
        "{m}"
    );
    // A plain one builds.
    succeeded(&with(&mut w, "true"));
    // At most 16 buildpacks.
    let bp = w.buildpack("plain-bp", "echo Plain", "true", "echo ---");
    let list = format!("{}\n", bp.display()).repeat(17);
    let b = w.build(
        "links",
        &[(".buildpacks", &list), ("Procfile", "web: true\n")],
    );
    let m = failed_at(&b, "detect");
    assert!(
        m.contains(".buildpacks names 17 buildpacks; at most 16 are allowed"),
        "{m}"
    );
}
