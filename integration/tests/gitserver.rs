//! `git push` over the gitserver's own sshd, with real OpenSSH, real git and real
//! daemons: who may push, what they may ask for, and what a push builds.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use paddock_integration::api::*;
use paddock_integration::eventually;

use serde_json::{json, Value};

/// A node with everything a push needs, plus a user `alice` who owns app `shop`.
struct Git {
    c: ApiCluster,
    alice: paddock_config::credentials::UserCredentials,
    alice_key: PathBuf,
}

fn keygen(dir: &Path, name: &str) -> (PathBuf, String) {
    let key = dir.join(name);
    let st = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
        .arg(&key)
        .status()
        .unwrap();
    assert!(st.success());
    let public = std::fs::read_to_string(key.with_extension("pub")).unwrap();
    (key, public.trim().to_string())
}

impl Git {
    fn start(name: &str) -> Git {
        Git::start_with(name, &[])
    }

    /// With more daemons (a runner, for the release phase).
    fn start_with(name: &str, more: &[&str]) -> Git {
        let mut c = ApiCluster::start(name, &["heartbeat", "locker", "blobstore"]);
        // Local buildpacks (the tests' waiters) only from root's dirs under /var/tmp.
        c.node
            .file
            .daemons
            .get_mut("deployer")
            .unwrap()
            .other
            .insert(
                "local_buildpacks".into(),
                toml::Value::Array(vec!["/var/tmp".into()]),
            );
        c.node.save();
        for d in ["deployer", "gitserver"].iter().chain(more) {
            c.node.start(d);
        }
        let alice = create_user(&c.node, "alice", false);
        let (alice_key, public) = keygen(c.t.path(), "alice");
        let mut a = user_client(&alice);
        a.call("sshkey.add", json!({ "public_key": public }))
            .unwrap();
        a.call("app.create", json!({ "name": "shop" })).unwrap();
        Git {
            c,
            alice,
            alice_key,
        }
    }

    fn url(&self, repo: &str) -> String {
        format!(
            "ssh://git@127.0.0.1:{}/{repo}",
            self.c.node.ports.gitserver_ssh
        )
    }

    fn ssh_command(key: &Path) -> String {
        format!(
            "ssh -i {} -o IdentitiesOnly=yes -o BatchMode=yes -o StrictHostKeyChecking=no \
             -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR",
            key.display()
        )
    }

    /// `ssh git@host [COMMAND]` with `key` (ssh sends COMMAND as one string).
    fn ssh(&self, key: &Path, command: Option<&str>) -> Output {
        let mut c = Command::new("ssh");
        c.args(Self::ssh_command(key).split_whitespace().skip(1))
            .args([
                "-p",
                &self.c.node.ports.gitserver_ssh.to_string(),
                "git@127.0.0.1",
            ])
            .args(command)
            .stdin(Stdio::null());
        c.output().unwrap()
    }

    /// `git ARGS` in `dir` with `key` for ssh.
    fn git(&self, dir: &Path, key: &Path, args: &[&str]) -> Output {
        Command::new("git")
            .args(args)
            .current_dir(dir)
            .env("GIT_SSH_COMMAND", Self::ssh_command(key))
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("HOME", dir)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    fn repo_head(&self, app: &str, branch: &str) -> Option<String> {
        let repo = self
            .c
            .node
            .dir
            .join(format!("state/gitserver/repos/{app}.git"));
        let out = Command::new("git")
            .args(["--git-dir"])
            .arg(&repo)
            .args(["rev-parse", "--verify", "-q", branch])
            .output()
            .unwrap();
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    }
}

/// A git work tree with `files` committed on `main`.
fn work_tree(base: &Path, name: &str, files: &[(&str, &str)]) -> PathBuf {
    let dir = base.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let run = |args: &[&str]| {
        let out = Command::new("git")
            .args(args)
            .current_dir(&dir)
            .env("HOME", &dir)
            .output()
            .unwrap();
        assert!(out.status.success(), "git {args:?}: {}", text(&out));
    };
    run(&["init", "-q", "-b", "main"]);
    run(&["config", "user.email", "t@example.com"]);
    run(&["config", "user.name", "t"]);
    for (f, body) in files {
        let p = dir.join(f);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, body).unwrap();
    }
    run(&["add", "-A"]);
    run(&["commit", "-q", "-m", "first"]);
    dir
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn head(dir: &Path) -> String {
    let o = Command::new("git")
        .args(["rev-parse", "HEAD"])
        .current_dir(dir)
        .output()
        .unwrap();
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

const HELLO: &[(&str, &str)] = &[
    ("Procfile", "web: python3 server.py\n"),
    (
        "server.py",
        "import http.server, os\n\
         class H(http.server.BaseHTTPRequestHandler):\n\
         \x20   def do_GET(self):\n\
         \x20       self.send_response(200); self.end_headers(); self.wfile.write(b'hello')\n\
         http.server.HTTPServer(('0.0.0.0', int(os.environ['PORT'])), H).serve_forever()\n",
    ),
];

#[test]
fn only_known_keys_with_access_get_git_and_nothing_else() {
    let g = Git::start("git-refusals");
    let base = g.c.t.path().to_path_buf();

    // An unknown key: sshd finds no authorized key at all.
    let (stranger_key, _) = keygen(&base, "nobody");
    let o = g.ssh(&stranger_key, Some("git-receive-pack 'shop.git'"));
    assert!(!o.status.success());
    assert!(text(&o).contains("Permission denied"), "{}", text(&o));

    // A known user's key without access to the app.
    let bob = create_user(&g.c.node, "bob", false);
    let (bob_key, bob_pub) = keygen(&base, "bob");
    let mut b = user_client(&bob);
    b.call("sshkey.add", json!({ "public_key": bob_pub }))
        .unwrap();
    let o = g.ssh(&bob_key, Some("git-receive-pack 'shop.git'"));
    assert!(!o.status.success());
    assert!(text(&o).contains("may not push"), "{}", text(&o));

    // Alice may push, but gets no shell and no other command or path.
    for cmd in [
        None,
        Some("id"),
        Some("sh -c id"),
        Some("git-receive-pack '../shop.git'"),
        Some("git-receive-pack 'shop.git' 'x'"),
        Some("git-upload-archive 'shop.git'"),
    ] {
        let o = g.ssh(&g.alice_key, cmd);
        assert!(!o.status.success(), "{cmd:?} succeeded: {}", text(&o));
        let t = text(&o);
        assert!(
            t.contains("no shell")
                || t.contains("not an app's repository")
                || t.contains("one quoted repository"),
            "{cmd:?}: {t}"
        );
        assert!(!t.contains("uid="), "{cmd:?} ran a command: {t}");
    }
    // Repositories follow apps: made at app.create (before any push), removed at
    // app.destroy.
    let repos = g.c.node.dir.join("state/gitserver/repos");
    let mut a = user_client(&g.alice);
    a.call("app.create", json!({ "name": "brief" })).unwrap();
    eventually(Duration::from_secs(10), "brief.git made", || {
        repos.join("brief.git/HEAD").exists().then_some(())
    });
    // No hooks in a repository (the git account owns those): git is pointed at
    // root's hooks directory outside them.
    assert!(!repos.join("brief.git/hooks").exists());
    let hook = repos.parent().unwrap().join("hooks/pre-receive");
    let m = std::fs::metadata(&hook).unwrap();
    assert_eq!(
        (m.uid(), m.mode() & 0o7777),
        (0, 0o755),
        "the hook is root's"
    );
    let m = std::fs::metadata(hook.parent().unwrap()).unwrap();
    assert_eq!((m.uid(), m.mode() & 0o7777), (0, 0o755));
    a.call("app.destroy", json!({ "app": "brief", "confirm": "brief" }))
        .unwrap();
    eventually(Duration::from_secs(10), "brief.git removed", || {
        (!repos.join("brief.git").exists()).then_some(())
    });

    // An app that does not exist.
    let o = g.ssh(&g.alice_key, Some("git-receive-pack 'nope.git'"));
    assert!(!o.status.success());

    // A branch other than main/master is refused and moves no ref.
    let w = work_tree(&base, "w1", HELLO);
    let o = g.git(
        &w,
        &g.alice_key,
        &["push", &g.url("shop.git"), "main:feature"],
    );
    assert!(!o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("deploys only the main or master"),
        "{}",
        text(&o)
    );
    assert_eq!(g.repo_head("shop", "refs/heads/feature"), None);
}

/// Waits for the build records: the release the push made.
fn release(g: &Git, app: &str) -> Value {
    g.c.cluster()
        .call("app.state", json!({ "app": app }))
        .unwrap()["app"]["current"]
        .clone()
}

#[test]
fn a_push_builds_a_release_and_a_failed_build_moves_no_ref() {
    let g = Git::start("git-push");
    let base = g.c.t.path().to_path_buf();
    let w = work_tree(&base, "hello", HELLO);
    let o = g.git(&w, &g.alice_key, &["push", &g.url("shop.git"), "main"]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(t.contains("remote: -----> "), "no build log relayed: {t}");
    assert!(t.contains("Done: shop v2"), "{t}");
    assert_eq!(g.repo_head("shop", "refs/heads/main"), Some(head(&w)));
    let r = release(&g, "shop");
    assert_eq!(r["version"], 2, "{r}");
    assert_eq!(r["process_types"]["web"], "python3 server.py", "{r}");
    assert!(r["slug"].as_str().is_some_and(|s| s.len() == 64), "{r}");

    // A compile that fails (pip cannot install what requirements.txt names): the
    // push is rejected saying so, the ref stays, no new release.
    let before = head(&w);
    std::fs::write(
        w.join("requirements.txt"),
        "paddock-no-such-package-4a7c1==0.0.1\n",
    )
    .unwrap();
    for args in [&["add", "-A"][..], &["commit", "-qm", "break it"]] {
        let o = Command::new("git")
            .args(args)
            .current_dir(&w)
            .env("HOME", &w)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", text(&o));
    }
    let o = g.git(&w, &g.alice_key, &["push", &g.url("shop.git"), "main"]);
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(t.contains("Push rejected: compile failed"), "{t}");
    assert!(t.contains("pre-receive hook declined"), "{t}");
    assert_eq!(g.repo_head("shop", "refs/heads/main"), Some(before));
    assert_eq!(release(&g, "shop")["version"], 2);

    // Deleting the deploy branch is refused.
    let o = g.git(&w, &g.alice_key, &["push", &g.url("shop.git"), ":main"]);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(g.repo_head("shop", "refs/heads/main").is_some());
}

/// A buildpack (root's, under /var/tmp, which the test cluster's deployer allows
/// for local buildpacks) whose compile says it waits, then waits until `go` (in
/// the buildpack's own directory) exists, then prints `lines` lines of 100 bytes:
/// the test sees the first line before the build can end.
fn noisy_buildpack(base: &Path, go: &Path, lines: usize) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let bp = base.join("waiter-bp");
    // Builds see only their own /tmp and /var/tmp: the signal is a file in the
    // buildpack itself, which is bound (read-only) into the build.
    assert_eq!(go, bp.join("go"));
    std::fs::create_dir_all(bp.join("bin")).unwrap();
    let scripts = [
        ("detect", "#!/bin/sh\necho Waiter\n".to_string()),
        (
            "compile",
            format!(
                "#!/bin/sh\necho '-----> compile is waiting for the test'\n\
                 while [ ! -e \"$(dirname \"$0\")/../go\" ]; do sleep 0.05; done\n\
                 echo '-----> compile saw it'\n\
                 yes 'noise noise noise noise noise noise noise noise noise noise noise noise noise noise noise nois' | head -n {lines}\n"
            ),
        ),
        ("release", "#!/bin/sh\necho '--- {}'\n".to_string()),
    ];
    for (name, body) in scripts {
        let p = bp.join("bin").join(name);
        std::fs::write(&p, body).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    for d in [base, &bp, &bp.join("bin")] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    bp
}

/// A work tree of the hello app whose build waits for the test (see
/// [`noisy_buildpack`]), with the signal's directory kept for the test's life.
struct SlowTree {
    _signal: tempfile::TempDir,
    go: PathBuf,
    tree: PathBuf,
}

fn slow_tree(g: &Git, name: &str, lines: usize) -> SlowTree {
    let signal = tempfile::Builder::new()
        .prefix("paddock-git-test-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let go = signal.path().join("waiter-bp").join("go");
    let bp = noisy_buildpack(signal.path(), &go, lines);
    let mut files = HELLO.to_vec();
    let buildpacks = format!("{}\n", bp.display());
    files.push((".buildpacks", &buildpacks));
    let tree = work_tree(g.c.t.path(), name, &files);
    SlowTree {
        _signal: signal,
        go,
        tree,
    }
}

/// `git push` running in the background, its stderr read line by line.
struct Pushing {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Pushing {
    fn start(g: &Git, dir: &Path, refspec: &str) -> Pushing {
        let mut child = Command::new("git")
            .args(["push", "--progress", &g.url("shop.git"), refspec])
            .current_dir(dir)
            .env("GIT_SSH_COMMAND", Git::ssh_command(&g.alice_key))
            .env("HOME", dir)
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

    /// Waits for a line containing `what`; panics with what was seen.
    fn wait_for(&mut self, what: &str) {
        let deadline = std::time::Instant::now() + Duration::from_secs(25);
        while std::time::Instant::now() < deadline {
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

    fn finish(mut self) -> (bool, String) {
        let st = self.child.wait().unwrap();
        while let Ok(l) = self.lines.recv_timeout(Duration::from_secs(5)) {
            self.seen.push(l);
        }
        (st.success(), self.seen.join("\n"))
    }
}

#[test]
fn the_log_streams_while_building_and_pushes_to_one_app_build_one_at_a_time() {
    let g = Git::start("git-stream");
    let base = g.c.t.path().to_path_buf();
    let slow = slow_tree(&g, "slow", 0);
    let (go, w) = (&slow.go, &slow.tree);

    // The compile's first line reaches the pusher while the compile still waits.
    let mut first = Pushing::start(&g, w, "main");
    first.wait_for("compile is waiting for the test");
    assert!(
        first.child.try_wait().unwrap().is_none(),
        "the push ended already"
    );

    // A second push to the same app (its master branch, which deploys too) waits
    // for the first's build and says so, then builds after it.
    let other = work_tree(&base, "other", HELLO);
    let mut second = Pushing::start(&g, &other, "main:master");
    second.wait_for("Another push to shop is building");
    std::fs::write(go, "").unwrap();
    first.wait_for("compile saw it");
    let (ok1, log1) = first.finish();
    assert!(ok1, "{log1}");
    let (ok2, log2) = second.finish();
    assert!(ok2, "{log2}");
    assert!(log1.contains("Done: shop v2"), "{log1}");
    assert!(log2.contains("Done: shop v3"), "{log2}");
    assert_eq!(g.repo_head("shop", "refs/heads/main"), Some(head(w)));
    assert_eq!(g.repo_head("shop", "refs/heads/master"), Some(head(&other)));
}

#[test]
fn a_push_whose_branch_moved_while_it_waited_is_refused_before_building() {
    let g = Git::start("git-stale");
    let base = g.c.t.path().to_path_buf();
    let slow = slow_tree(&g, "slow", 0);
    let (go, w) = (&slow.go, &slow.tree);
    let mut first = Pushing::start(&g, w, "main");
    first.wait_for("compile is waiting for the test");
    // Another history for the same branch, pushed while the first builds.
    let other = work_tree(&base, "other", HELLO);
    let mut second = Pushing::start(&g, &other, "main");
    second.wait_for("Another push to shop is building");
    std::fs::write(go, "").unwrap();
    let (ok1, log1) = first.finish();
    assert!(ok1, "{log1}");
    let (ok2, log2) = second.finish();
    assert!(!ok2, "{log2}");
    assert!(log2.contains("moved while this push waited"), "{log2}");
    assert_eq!(g.repo_head("shop", "refs/heads/main"), Some(head(w)));
    // Only the first push made a release.
    assert_eq!(release(&g, "shop")["version"], 2);
    let builds =
        g.c.node
            .client("deployer")
            .call("build.list", json!({ "app": "shop" }))
            .unwrap();
    assert_eq!(
        builds["builds"].as_array().map(Vec::len),
        Some(1),
        "{builds}"
    );
}

/// A work tree for `app` pushed to its own repository: the push's output.
fn push_app(g: &Git, app: &str, files: &[(&str, &str)]) -> (bool, String) {
    let mut a = user_client(&g.alice);
    if a.call("app.info", json!({ "app": app })).is_err() {
        a.call("app.create", json!({ "name": app })).unwrap();
    }
    let base = g.c.t.path();
    let dir = base.join(format!("tree-{app}"));
    if dir.exists() {
        std::fs::remove_dir_all(&dir).unwrap();
    }
    let w = work_tree(base, &format!("tree-{app}"), files);
    assert_eq!(w, dir);
    let o = g.git(
        &w,
        &g.alice_key,
        &["push", "--force", &g.url(&format!("{app}.git")), "main"],
    );
    (o.status.success(), text(&o))
}

#[test]
fn flask_node_and_static_pushes_become_releases_and_a_failing_release_command_rejects_the_push() {
    let g = Git::start_with("git-kinds", &["runner"]);
    let flask: &[(&str, &str)] = &[
        ("requirements.txt", "flask\n"),
        ("Procfile", "wsgi: app:app\n"),
        (
            "app.py",
            "from flask import Flask\napp = Flask(__name__)\n\
             @app.route('/')\ndef hello():\n    return 'hello'\n",
        ),
    ];
    let (ok, log) = push_app(&g, "flasky", flask);
    assert!(ok, "{log}");
    assert!(log.contains("remote: -----> Python app detected"), "{log}");
    assert!(!log.contains("Reusing the cached virtualenv"), "{log}");
    let r = release(&g, "flasky");
    assert!(r["process_types"]["web"].is_string(), "{r}");
    // The same requirements again: the cache, and no pip.
    let mut again = flask.to_vec();
    again.push(("README", "second push\n"));
    let (ok, log) = push_app(&g, "flasky", &again);
    assert!(ok, "{log}");
    assert!(log.contains("Reusing the cached virtualenv"), "{log}");
    assert_eq!(release(&g, "flasky")["version"], 3);

    let (ok, log) = push_app(
        &g,
        "nodey",
        &[
            (
                "package.json",
                r#"{"name": "nodey", "version": "1.0.0", "scripts": {"start": "node server.js"}}"#,
            ),
            (
                "server.js",
                "require('http').createServer((q, s) => s.end('hi')).listen(process.env.PORT)\n",
            ),
        ],
    );
    assert!(ok, "{log}");
    assert_eq!(
        release(&g, "nodey")["process_types"]["web"],
        "npm start",
        "{log}"
    );

    let (ok, log) = push_app(&g, "site", &[("public/index.html", "<h1>hi</h1>\n")]);
    assert!(ok, "{log}");
    let web = release(&g, "site")["process_types"]["web"].clone();
    assert!(
        web.as_str().is_some_and(|w| w.contains("paddock-static")),
        "{web}\n{log}"
    );

    // A release command that fails rejects the push and moves no ref.
    let (ok, log) = push_app(
        &g,
        "migrates",
        &[(
            "Procfile",
            "web: python3 -m http.server $PORT\nrelease: sh -c 'echo migration broke; exit 4'\n",
        )],
    );
    assert!(!ok, "{log}");
    assert!(log.contains("migration broke"), "{log}");
    assert!(log.contains("pre-receive hook declined"), "{log}");
    assert_eq!(g.repo_head("migrates", "refs/heads/main"), None);
    assert_eq!(
        release(&g, "migrates")["version"],
        1,
        "v1, the app's first, stays current"
    );
}

#[test]
fn a_pusher_who_stops_reading_does_not_hold_up_the_next_push() {
    let g = Git::start("git-stalled");
    let base = g.c.t.path().to_path_buf();
    // 4 MB of log: more than every buffer between the gitserver and the pusher.
    let slow = slow_tree(&g, "noisy", 40_000);
    let (go, w) = (&slow.go, &slow.tree);
    let mut first = Pushing::start(&g, w, "main");
    first.wait_for("compile is waiting for the test");
    // The first pusher stops reading (its terminal is suspended, say).
    let pid = nix::unistd::Pid::from_raw(first.child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    std::fs::write(go, "").unwrap();

    // A second push to the app builds anyway, soon after the first build ends.
    let other = work_tree(&base, "other", HELLO);
    let second = Pushing::start(&g, &other, "main:master");
    let (ok2, log2) = second.finish();
    assert!(ok2, "{log2}");
    assert_eq!(g.repo_head("shop", "refs/heads/master"), Some(head(&other)));

    // The first push, resumed, ends failed: its hook was ended, no ref moved.
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    let (ok1, log1) = first.finish();
    assert!(!ok1, "{log1}");
    assert_eq!(g.repo_head("shop", "refs/heads/main"), None);
}
