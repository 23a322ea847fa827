//! The api's part of git push → build → release (docs/design/PUSH.md): the
//! gitserver's `push.authorize`, the runner's `release.get`, the blobstore's
//! `blob.referenced`, the buildpack records, the customer's `build.list` /
//! `build.info` (authorized here, answered by a deployer: none runs in these
//! tests, so an authorized caller gets `unavailable`), `git_url` on apps, and the
//! CLI's `git remote`, `builds` and `apps create` around them.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use paddock_integration::api::*;
use paddock_integration::*;
use paddock_wire::{Client, Code};
use serde_json::{json, Value};

fn ok(c: &mut Client, kind: &str, body: Value) -> Value {
    c.call(kind, body.clone())
        .unwrap_or_else(|e| panic!("{kind} {body}: {e}"))
}

/// An SSH key of `user`'s, added with the cluster key; its fingerprint.
fn ssh_key(c: &mut Client, user: &str) -> String {
    let r = ok(
        c,
        "sshkey.add",
        json!({"user": user, "public_key": random_ed25519(&format!("{user}@laptop"))}),
    );
    r["fingerprint"].as_str().unwrap().to_string()
}

fn gitserver_ssh(node: &Node) -> String {
    node.file.daemons["gitserver"].other["ssh"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn push_authorize_admits_owners_collaborators_and_admins_only() {
    let mut w = ApiCluster::start("api-push-authorize", &[]);
    let mut cl = w.cluster();
    for (u, admin) in [
        ("owner", false),
        ("collab", false),
        ("stranger", false),
        ("boss", true),
        ("gone", false),
    ] {
        ok(&mut cl, "user.create", json!({"name": u, "admin": admin}));
    }
    ok(
        &mut cl,
        "app.create",
        json!({"name": "shop", "owner": "owner"}),
    );
    ok(
        &mut cl,
        "access.add",
        json!({"app": "shop", "user": "collab"}),
    );
    ok(
        &mut cl,
        "access.add",
        json!({"app": "shop", "user": "gone"}),
    );
    let keys: Vec<(&str, String)> = ["owner", "collab", "stranger", "boss", "gone"]
        .into_iter()
        .map(|u| (u, ssh_key(&mut cl, u)))
        .collect();
    let fp = |u: &str| keys.iter().find(|(n, _)| *n == u).unwrap().1.clone();

    let before = w.snapshot();
    for u in ["owner", "collab", "boss", "gone"] {
        let r = ok(
            &mut cl,
            "push.authorize",
            json!({"fingerprint": fp(u), "app": "shop"}),
        );
        assert_eq!(r["user"], u, "{r}");
        assert_eq!(r["app"], "shop", "{r}");
    }
    // A stranger's key: forbidden, naming the user and the app.
    let e = remote_err(cl.call(
        "push.authorize",
        json!({"fingerprint": fp("stranger"), "app": "shop"}),
    ));
    assert_eq!(e.code, Code::Forbidden, "{e:?}");
    assert!(
        e.message.contains("user stranger may not push to app shop"),
        "{}",
        e.message
    );
    // A key nobody has, an app that does not exist (for a key that could push
    // anywhere: the admin's), a malformed app name: not_found.
    let e = remote_err(cl.call(
        "push.authorize",
        json!({"fingerprint": "SHA256:nosuchkeyAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", "app": "shop"}),
    ));
    assert_eq!(e.code, Code::NotFound, "{e:?}");
    for app in ["nosuch", "Bad_Name", "../shop"] {
        let e = remote_err(cl.call(
            "push.authorize",
            json!({"fingerprint": fp("boss"), "app": app}),
        ));
        assert_eq!(e.code, Code::NotFound, "{app}: {e:?}");
    }
    for bad in [json!({"app": "shop"}), json!({"fingerprint": fp("owner")})] {
        assert_eq!(code(cl.call("push.authorize", bad)), Code::Invalid);
    }
    assert_eq!(w.snapshot(), before, "push.authorize changes nothing");

    // A disabled user's key no longer pushes, even to an app they had access to.
    ok(&mut cl, "user.revoke", json!({"name": "gone"}));
    let e = remote_err(cl.call(
        "push.authorize",
        json!({"fingerprint": fp("gone"), "app": "shop"}),
    ));
    assert_eq!(e.code, Code::NotFound, "{e:?}");
    // A collaborator removed: forbidden from then on.
    ok(
        &mut cl,
        "access.remove",
        json!({"app": "shop", "user": "collab"}),
    );
    assert_eq!(
        code(cl.call(
            "push.authorize",
            json!({"fingerprint": fp("collab"), "app": "shop"}),
        )),
        Code::Forbidden
    );
    // A removed SSH key: not_found.
    ok(
        &mut cl,
        "sshkey.remove",
        json!({"fingerprint": fp("owner")}),
    );
    assert_eq!(
        code(cl.call(
            "push.authorize",
            json!({"fingerprint": fp("owner"), "app": "shop"}),
        )),
        Code::NotFound
    );
    // A user key may not ask at all (it is the gitserver's).
    let owner = create_key(&w.node, "owner");
    assert_eq!(
        code(user_client(&owner).call(
            "push.authorize",
            json!({"fingerprint": fp("boss"), "app": "shop"}),
        )),
        Code::Forbidden
    );
}

#[test]
fn release_get_gives_the_runner_the_whole_release() {
    let w = ApiCluster::start("api-release-get", &[]);
    let mut cl = w.cluster();
    ok(&mut cl, "user.create", json!({"name": "owner"}));
    ok(
        &mut cl,
        "app.create",
        json!({"name": "shop", "owner": "owner"}),
    );
    ok(
        &mut cl,
        "config.set",
        json!({"app": "shop", "vars": {"DATABASE_URL": "postgres://db/shop", "A": "1"}}),
    );
    let r = ok(
        &mut cl,
        "release.create",
        json!({"app": "shop", "slug": "sha256:5106000000000000000000000000000000000000000000000000000000000000", "description": "Deploy 5106",
               "process_types": {"web": "python3 app.py", "worker": "python3 w.py"},
               "healthchecks": {"web": [{"type": "startup", "path": "/health"}]}}),
    );
    let v = r["release"]["version"].as_i64().unwrap();
    // One form of a slug's name everywhere (what the blobstore keeps and GC
    // spares): anything but 64 lowercase hex is refused, not stored as given.
    for bad in [
        format!("sha256:{}", "AB".repeat(32)),
        format!("SHA256:{}", "ab".repeat(32)),
        "ab".repeat(31),
        "slug-1".to_string(),
    ] {
        let e = cl
            .call(
                "release.create",
                json!({"app": "shop", "slug": bad, "description": "d", "process_types": {"web": "x"}}),
            )
            .unwrap_err();
        assert!(e.to_string().contains("64 lowercase hex"), "{bad}: {e}");
    }
    for version in [json!(v), json!(format!("v{v}"))] {
        let got = ok(
            &mut cl,
            "release.get",
            json!({"app": "shop", "version": version}),
        );
        let rel = &got["release"];
        assert_eq!(rel["version"], v, "{got}");
        assert_eq!(rel["app"], "shop", "{got}");
        assert_eq!(
            rel["config"],
            json!({"DATABASE_URL": "postgres://db/shop", "A": "1"}),
            "{got}"
        );
        assert_eq!(rel["slug"], format!("5106{}", "0".repeat(60)));
        assert_eq!(
            rel["process_types"],
            json!({"web": "python3 app.py", "worker": "python3 w.py"})
        );
        assert_eq!(
            rel["healthchecks"],
            json!({"web": [{"type": "startup", "path": "/health"}]})
        );
        assert_eq!(rel["status"], "pending");
    }
    // A config change after it: the older release keeps its own config.
    ok(
        &mut cl,
        "config.set",
        json!({"app": "shop", "vars": {"A": "2"}}),
    );
    let old = ok(&mut cl, "release.get", json!({"app": "shop", "version": v}));
    assert_eq!(old["release"]["config"]["A"], "1");
    let new = ok(
        &mut cl,
        "release.get",
        json!({"app": "shop", "version": v + 1}),
    );
    assert_eq!(new["release"]["config"]["A"], "2");
    assert_eq!(new["release"]["slug"], format!("5106{}", "0".repeat(60)));

    let e = remote_err(cl.call("release.get", json!({"app": "shop", "version": 99})));
    assert_eq!(e.code, Code::NotFound);
    assert!(e.message.contains("v99"), "{}", e.message);
    assert_eq!(
        code(cl.call("release.get", json!({"app": "nosuch", "version": 1}))),
        Code::NotFound
    );
    assert_eq!(
        code(cl.call("release.get", json!({"app": "shop"}))),
        Code::Invalid
    );
}

fn referenced(cl: &mut Client, keep: i64) -> BTreeSet<String> {
    let r = ok(cl, "blob.referenced", json!({ "keep": keep }));
    let list: Vec<String> = r["blobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b.as_str().unwrap().to_string())
        .collect();
    let set: BTreeSet<String> = list.iter().cloned().collect();
    assert_eq!(set.len(), list.len(), "blobs are distinct: {list:?}");
    set
}

/// A blob's sha256 of 64 hex digits: `pair` (two of them) repeated.
fn hx(pair: &str) -> String {
    pair.repeat(32)
}

/// The bare names, as `blob.referenced` gives them.
fn set(pairs: &[&str]) -> BTreeSet<String> {
    pairs.iter().map(|p| hx(p)).collect()
}

fn deploy(cl: &mut Client, app: &str, slug: &str) -> i64 {
    let r = ok(
        cl,
        "release.create",
        json!({"app": app, "slug": slug, "description": "Deploy",
               "process_types": {"web": "run"}}),
    );
    r["release"]["version"].as_i64().unwrap()
}

#[test]
fn blob_referenced_keeps_current_and_newest_releases_and_buildpacks() {
    let w = ApiCluster::start("api-blob-referenced", &[]);
    let mut cl = w.cluster();
    ok(&mut cl, "user.create", json!({"name": "owner"}));
    for app in ["shop", "blog"] {
        ok(
            &mut cl,
            "app.create",
            json!({"name": app, "owner": "owner"}),
        );
    }
    assert!(
        referenced(&mut cl, 2).is_empty(),
        "nothing is referenced yet"
    );

    // shop: v2 (aa) succeeds and is current; v3-v6 (bb, cc, dd, ee) are newer.
    // Slugs are recorded as sha256:<hex> or bare; the blobstore names them bare.
    let v2 = deploy(&mut cl, "shop", &format!("sha256:{}", hx("aa")));
    ok(
        &mut cl,
        "release.status",
        json!({"app": "shop", "version": v2, "status": "succeeded"}),
    );
    for slug in [
        hx("bb"),
        format!("sha256:{}", hx("cc")),
        hx("dd"),
        format!("sha256:{}", hx("ee")),
    ] {
        deploy(&mut cl, "shop", &slug);
    }
    // blog: one deploy, of the same blob as one of shop's, current.
    let b2 = deploy(&mut cl, "blog", &format!("sha256:{}", hx("dd")));
    ok(
        &mut cl,
        "release.status",
        json!({"app": "blog", "version": b2, "status": "succeeded"}),
    );

    // keep 2: shop's v6 (ee) and v5 (dd), its current v2 (aa) even though older;
    // blog's dd, once. Not bb or cc.
    assert_eq!(referenced(&mut cl, 2), set(&["aa", "dd", "ee"]));
    assert_eq!(referenced(&mut cl, 3), set(&["aa", "cc", "dd", "ee"]));
    assert_eq!(referenced(&mut cl, 1), set(&["aa", "dd", "ee"]));
    assert_eq!(referenced(&mut cl, 5), set(&["aa", "bb", "cc", "dd", "ee"]));
    // A config change makes a release of the newest slug: the window moves, but
    // the slug it carries is still referenced.
    ok(
        &mut cl,
        "config.set",
        json!({"app": "shop", "vars": {"A": "1"}}),
    );
    assert_eq!(referenced(&mut cl, 1), set(&["aa", "dd", "ee"]));

    // Buildpacks' blobs are referenced while they are recorded.
    ok(
        &mut cl,
        "buildpack.add",
        json!({"name": "python", "blob": format!("sha256:{}", hx("b0")),
               "url": "https://example.com/python.git"}),
    );
    ok(
        &mut cl,
        "buildpack.add",
        json!({"name": "node", "blob": hx("ee")}),
    );
    assert_eq!(referenced(&mut cl, 1), set(&["aa", "b0", "dd", "ee"]));

    // A destroyed app's slugs go with it (dd stays with keep 3: shop's v5).
    ok(
        &mut cl,
        "app.destroy",
        json!({"app": "blog", "confirm": "blog"}),
    );
    assert_eq!(referenced(&mut cl, 3), set(&["aa", "b0", "dd", "ee"]));
    assert_eq!(referenced(&mut cl, 1), set(&["aa", "b0", "ee"]));
    ok(&mut cl, "buildpack.remove", json!({"name": "python"}));
    assert_eq!(referenced(&mut cl, 1), set(&["aa", "ee"]));

    for bad in [
        json!({"keep": 0}),
        json!({"keep": -1}),
        json!({"keep": "2"}),
    ] {
        assert_eq!(code(cl.call("blob.referenced", bad)), Code::Invalid);
    }
    // Without keep: the default window (10), which here holds every slug of shop.
    let all = ok(&mut cl, "blob.referenced", json!({}));
    assert_eq!(all["keep"], 10);
    assert_eq!(all["blobs"].as_array().unwrap().len(), 5, "{all}");
}

#[test]
fn buildpack_records_are_added_replaced_listed_and_removed() {
    let mut w = ApiCluster::start("api-buildpacks", &[]);
    let mut cl = w.cluster();
    let r = ok(
        &mut cl,
        "buildpack.add",
        json!({"name": "python", "blob": format!("sha256:{}", hx("01")),
               "url": "https://github.com/heroku/heroku-buildpack-python"}),
    );
    // Kept by the blobstore's name for it: the bare sha256.
    assert_eq!(r["buildpack"]["name"], "python");
    assert_eq!(r["buildpack"]["blob"], hx("01"));
    assert_eq!(
        r["buildpack"]["url"],
        "https://github.com/heroku/heroku-buildpack-python"
    );
    assert_eq!(r["replaced"], Value::Null);
    let r = ok(
        &mut cl,
        "buildpack.add",
        json!({"name": "python", "blob": hx("02")}),
    );
    assert_eq!(r["replaced"], hx("01"));
    ok(
        &mut cl,
        "buildpack.add",
        json!({"name": "node-18", "blob": hx("03")}),
    );
    let list = ok(&mut cl, "buildpack.list", json!({}));
    let names: Vec<(String, String)> = list["buildpacks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["name"].as_str().unwrap().to_string(),
                b["blob"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        names,
        [
            ("node-18".to_string(), hx("03")),
            ("python".to_string(), hx("02"))
        ]
    );
    let one = ok(&mut cl, "buildpack.get", json!({"name": "python"}));
    assert_eq!(one["buildpack"]["blob"], hx("02"));
    assert_eq!(one["buildpack"]["created_by"], "cluster:user:test");

    let before = w.snapshot();
    for bad in [
        json!({"name": "Python", "blob": hx("01")}),
        json!({"name": "a/b", "blob": hx("01")}),
        json!({"name": "x".repeat(41), "blob": hx("01")}),
        json!({"name": "", "blob": hx("01")}),
        json!({"name": "ok", "blob": "sha256:0123abcd"}),
        json!({"name": "ok", "blob": hx("AB")}),
        json!({"name": "ok", "blob": "../../etc/passwd"}),
        json!({"name": "ok", "blob": ""}),
        json!({"name": "ok"}),
        json!({"name": "ok", "blob": hx("01"), "url": "a\u{1b}[2J"}),
    ] {
        assert_eq!(
            code(cl.call("buildpack.add", bad.clone())),
            Code::Invalid,
            "{bad}"
        );
    }
    assert_eq!(
        code(cl.call("buildpack.get", json!({"name": "nosuch"}))),
        Code::NotFound
    );
    assert_eq!(
        code(cl.call("buildpack.remove", json!({"name": "nosuch"}))),
        Code::NotFound
    );
    assert_eq!(w.snapshot(), before, "refusals change nothing");

    let r = ok(&mut cl, "buildpack.remove", json!({"name": "python"}));
    assert_eq!(r["blob"], hx("02"));
    assert_eq!(
        code(cl.call("buildpack.get", json!({"name": "python"}))),
        Code::NotFound
    );
    let audit: Vec<String> = w
        .sql("SELECT kind FROM api_audit ORDER BY id")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        audit,
        [
            "buildpack.add",
            "buildpack.add",
            "buildpack.add",
            "buildpack.remove"
        ]
    );
}

#[test]
fn builds_are_authorized_then_asked_of_a_deployer() {
    // A heartbeat, so finding the deployer says at once that none is alive.
    let mut w = ApiCluster::start("api-builds", &["heartbeat"]);
    let owner = create_user(&w.node, "owner", false);
    let collab = create_user(&w.node, "collab", false);
    let stranger = create_user(&w.node, "stranger", false);
    let mut cl = w.cluster();
    ok(
        &mut cl,
        "app.create",
        json!({"name": "shop", "owner": "owner"}),
    );
    ok(
        &mut cl,
        "access.add",
        json!({"app": "shop", "user": "collab"}),
    );
    // A client retries `unavailable` until its deadline: keep it short here.
    let short = |c: &paddock_config::credentials::UserCredentials| {
        user_client(c).with_timeout(Duration::from_millis(700))
    };
    cl.set_timeout(Duration::from_millis(700));
    let before = w.snapshot();
    let bodies = [
        ("build.list", json!({"app": "shop"})),
        ("build.list", json!({"app": "shop", "limit": 5})),
        (
            "build.info",
            json!({"app": "shop", "build": "01JCT6S3W4F8D9X2QZ7N5K0BVA"}),
        ),
    ];
    for (kind, body) in &bodies {
        // A stranger is refused before any deployer is asked.
        let e = remote_err(user_client(&stranger).call(kind, body.clone()));
        assert_eq!(e.code, Code::Forbidden, "{kind}: {e:?}");
        assert!(e.message.contains("shop"), "{}", e.message);
        // An app that does not exist: not_found, for anyone.
        let mut other = body.clone();
        other["app"] = json!("nosuch");
        assert_eq!(
            code(user_client(&owner).call(kind, other)),
            Code::NotFound,
            "{kind}"
        );
        // Those who may see the app reach for a deployer: none runs.
        for c in [&owner, &collab] {
            let e = remote_err(short(c).call(kind, body.clone()));
            assert_eq!(e.code, Code::Unavailable, "{kind}: {e:?}");
            assert!(e.message.contains("deployer"), "{}", e.message);
        }
        let e = remote_err(cl.call(kind, body.clone()));
        assert_eq!(e.code, Code::Unavailable, "{kind}: {e:?}");
    }
    // Bad input is refused before the deployer is asked.
    for (kind, body) in [
        ("build.list", json!({"app": "shop", "limit": 0})),
        ("build.list", json!({"app": "shop", "limit": "5"})),
        ("build.info", json!({"app": "shop"})),
        ("build.info", json!({"app": "shop", "build": "a b"})),
        ("build.info", json!({"app": "shop", "build": {"id": 1}})),
    ] {
        assert_eq!(
            code(user_client(&owner).call(kind, body.clone())),
            Code::Invalid,
            "{kind} {body}"
        );
    }
    assert_eq!(w.snapshot(), before, "reads change nothing");
}

#[test]
fn apps_carry_their_git_url() {
    let mut w = ApiCluster::start("api-git-url", &[]);
    let owner = create_user(&w.node, "owner", false);
    let mut c = user_client(&owner);
    let base = gitserver_ssh(&w.node);
    assert!(base.starts_with("ssh://git@127.0.0.1:"), "{base}");
    let made = ok(&mut c, "app.create", json!({"name": "shop"}));
    assert_eq!(made["app"]["git_url"], format!("{base}/shop.git"));
    let info = ok(&mut c, "app.info", json!({"app": "shop"}));
    assert_eq!(info["app"]["git_url"], format!("{base}/shop.git"));
    // A random name gets its own URL too.
    let made = ok(&mut c, "app.create", json!({}));
    let name = made["app"]["name"].as_str().unwrap();
    assert_eq!(made["app"]["git_url"], format!("{base}/{name}.git"));

    // A cluster file without [daemons.gitserver] ssh: git_url is null.
    w.node
        .file
        .daemons
        .get_mut("gitserver")
        .unwrap()
        .other
        .remove("ssh");
    w.node.save();
    w.restart_api_hard();
    wait_migrated(&w.node);
    let mut c = user_client(&owner);
    let info = ok(&mut c, "app.info", json!({"app": "shop"}));
    assert_eq!(info["app"]["git_url"], Value::Null, "{info}");
    assert_eq!(info["app"]["name"], "shop");
}

// ---- the CLI ------------------------------------------------------------------

fn bin() -> PathBuf {
    paddock_harness::bin("paddock").unwrap()
}

/// `paddock ARGS` in `dir` as a customer logged in with `home`'s credentials.
fn customer(home: &Path, dir: &Path, args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .current_dir(dir)
        .env_remove("PADDOCK_CONFIG")
        .env_remove("GIT_DIR")
        .env_remove("GIT_WORK_TREE")
        .env("HOME", home)
        .env("XDG_CONFIG_HOME", home.join("xdg"))
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn succeeded(args: &[&str], o: Output) -> String {
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        o.status.success(),
        "paddock {args:?} failed:\n{out}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    out
}

fn failed(args: &[&str], o: Output) -> String {
    assert!(
        !o.status.success(),
        "paddock {args:?} succeeded:\n{}",
        String::from_utf8_lossy(&o.stdout)
    );
    String::from_utf8_lossy(&o.stderr).to_string()
}

fn git(dir: &Path, args: &[&str]) -> Output {
    Command::new("git")
        .args(args)
        .current_dir(dir)
        .env_remove("GIT_DIR")
        .env_remove("GIT_WORK_TREE")
        .output()
        .unwrap()
}

#[test]
fn the_cli_adds_the_git_remote_and_asks_for_builds() {
    let t = TestDir::new("cli-git-remote");
    let pg = Postgres::start(t.path());
    let mut node = Node::new(t.path(), "node-a", &test_key(), &[], Some(pg.url()));
    node.start("heartbeat");
    node.start("api");
    wait_migrated(&node);
    let alice = create_user(&node, "alice", false);
    let home = t.path().join("home");
    let work = t.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let creds = t.path().join("alice.credentials");
    std::fs::write(&creds, alice.to_toml()).unwrap();
    let args = ["login", "--credentials", creds.to_str().unwrap()];
    succeeded(&args, customer(&home, &work, &args));
    let url = format!("{}/myapp.git", gitserver_ssh(&node));

    // apps create names the remote on stdout, and how to add it on stderr.
    let args = ["apps", "create", "myapp"];
    let o = customer(&home, &work, &args);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    let out = succeeded(&args, o);
    assert_eq!(
        out,
        format!("Creating myapp... done\nhttp://myapp.localhost/\nGit remote: {url}\n")
    );
    assert!(
        err.contains(&format!("git remote add paddock {url}")),
        "{err}"
    );
    let args = ["apps", "info", "-a", "myapp"];
    let out = succeeded(&args, customer(&home, &work, &args));
    assert!(out.contains("Git URL:") && out.contains(&url), "{out}");

    // Outside a git repository: a clear refusal, nothing run.
    let args = ["git", "remote", "-a", "myapp"];
    let err = failed(&args, customer(&home, &work, &args));
    assert!(err.contains("not in a git repository"), "{err}");

    // In a repository: the remote is added, then set again when it exists.
    let repo = work.join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    assert!(git(&repo, &["init", "-q"]).status.success());
    let out = succeeded(&args, customer(&home, &repo, &args));
    assert!(out.starts_with("Added git remote paddock"), "{out}");
    let got = git(&repo, &["remote", "get-url", "paddock"]);
    assert_eq!(String::from_utf8_lossy(&got.stdout).trim(), url);
    assert!(git(
        &repo,
        &["remote", "set-url", "paddock", "ssh://elsewhere/x.git"]
    )
    .status
    .success());
    let out = succeeded(&args, customer(&home, &repo, &args));
    assert!(out.starts_with("Set git remote paddock"), "{out}");
    let got = git(&repo, &["remote", "get-url", "paddock"]);
    assert_eq!(String::from_utf8_lossy(&got.stdout).trim(), url);
    // Another remote name, the app taken from the `paddock` remote.
    let args2 = ["git", "remote", "-r", "prod"];
    succeeded(&args2, customer(&home, &repo, &args2));
    let got = git(&repo, &["remote", "get-url", "prod"]);
    assert_eq!(String::from_utf8_lossy(&got.stdout).trim(), url);
    // An app alice cannot see: refused, no remote added.
    let args3 = ["git", "remote", "-a", "nosuch", "-r", "other"];
    failed(&args3, customer(&home, &repo, &args3));
    assert!(!git(&repo, &["remote", "get-url", "other"]).status.success());

    // builds: the app comes from the remote; with no deployer, a clear error.
    for args in [
        &["builds", "--timeout-ms", "700"][..],
        &[
            "builds",
            "info",
            "01JCT6S3W4F8D9X2QZ7N5K0BVA",
            "--timeout-ms",
            "700",
        ],
    ] {
        let err = failed(args, customer(&home, &repo, args));
        assert!(err.starts_with("error: "), "{err}");
        assert!(err.contains("deployer"), "{args:?}: {err}");
    }
    let args = ["builds", "-a", "nosuch"];
    let err = failed(&args, customer(&home, &repo, &args));
    assert!(
        err.contains("nosuch") && err.contains("does not exist"),
        "{err}"
    );
}

/// `paddock ARGS` as the operator, with the node's cluster file.
fn operator(node: &Node, dir: &Path, args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .current_dir(dir)
        .env("PADDOCK_CONFIG", &node.config)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn sha256_hex(bytes: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, bytes)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn the_operator_uploads_buildpacks_into_the_blobstore() {
    let t = TestDir::new("cli-buildpacks");
    let pg = Postgres::start(t.path());
    let mut node = Node::new(t.path(), "node-a", &test_key(), &[], Some(pg.url()));
    node.start("heartbeat");
    node.start("blobstore");
    node.start("api");
    wait_migrated(&node);
    let work = t.path().join("work");
    std::fs::create_dir_all(&work).unwrap();

    // A buildpack directory: packed into a tar.gz that holds its files.
    let bp = work.join("python-bp");
    std::fs::create_dir_all(bp.join("bin")).unwrap();
    for (f, text) in [
        ("bin/detect", "#!/bin/sh\necho Python\n"),
        ("bin/compile", "#!/bin/sh\necho compiled\n"),
    ] {
        std::fs::write(bp.join(f), text).unwrap();
    }
    let args = [
        "buildpacks",
        "add",
        "python",
        bp.to_str().unwrap(),
        "--url",
        "https://example.com/python.git",
    ];
    let out = succeeded(&args, operator(&node, &work, &args));
    assert!(
        out.starts_with("Adding buildpack python... done, "),
        "{out}"
    );
    assert!(out.contains("BUILDPACK_URL=paddock:python"), "{out}");
    let mut api = node.client("api");
    let got = api
        .call("buildpack.get", json!({"name": "python"}))
        .unwrap();
    let sha = got["buildpack"]["blob"].as_str().unwrap().to_string();
    assert_eq!(sha.len(), 64, "{got}");
    assert_eq!(got["buildpack"]["url"], "https://example.com/python.git");
    // The blob is the packed directory: fetch it back and list it with tar.
    let fetched = work.join("fetched.tgz");
    paddock_blob::get_file_blocking(&mut node.client("blobstore"), &sha, &fetched).unwrap();
    let listing = Command::new("tar")
        .arg("-tzf")
        .arg(&fetched)
        .output()
        .unwrap();
    let names = String::from_utf8_lossy(&listing.stdout).to_string();
    assert!(
        names.contains("bin/compile") && names.contains("bin/detect"),
        "{names}"
    );

    // A .tgz is stored as it is (the same bytes, so the same sha256), and adding
    // a name again replaces it.
    let tgz = work.join("node.tgz");
    std::fs::copy(&fetched, &tgz).unwrap();
    let bytes = std::fs::read(&tgz).unwrap();
    let args = ["buildpacks", "add", "python", tgz.to_str().unwrap()];
    let out = succeeded(&args, operator(&node, &work, &args));
    assert!(out.contains(&format!("(replaces {sha})")), "{out}");
    let got = api
        .call("buildpack.get", json!({"name": "python"}))
        .unwrap();
    assert_eq!(got["buildpack"]["blob"], sha256_hex(&bytes));

    // Listed, referenced for the blobstore's collection, then removed.
    let args = ["buildpacks"];
    let out = succeeded(&args, operator(&node, &work, &args));
    assert!(out.contains("python") && out.contains(&sha), "{out}");
    let r = api.call("blob.referenced", json!({"keep": 1})).unwrap();
    assert_eq!(r["blobs"], json!([sha]), "{r}");
    let args = ["buildpacks", "remove", "python"];
    succeeded(&args, operator(&node, &work, &args));
    let r = api.call("blob.referenced", json!({"keep": 1})).unwrap();
    assert_eq!(r["blobs"], json!([]), "{r}");

    // A directory that is no buildpack, and a bad name: refused, nothing recorded.
    let args = ["buildpacks", "add", "empty", work.to_str().unwrap()];
    let err = failed(&args, operator(&node, &work, &args));
    assert!(err.contains("bin/compile"), "{err}");
    let args = ["buildpacks", "add", "Bad_Name", tgz.to_str().unwrap()];
    let err = failed(&args, operator(&node, &work, &args));
    assert!(err.contains("buildpack name"), "{err}");
    let list = api.call("buildpack.list", json!({})).unwrap();
    assert_eq!(list["buildpacks"], json!([]), "{list}");
}

/// The happy path through the real deployer, with two builds written into its
/// table as a finished build leaves them: each app's owner sees their own build
/// and its log, never the other app's.
#[test]
fn builds_reach_a_running_deployer_and_show_each_app_its_own() {
    let mut w = ApiCluster::start("api-builds-deployer", &["heartbeat"]);
    w.node.start("deployer");
    let owner = create_user(&w.node, "owner", false);
    let other = create_user(&w.node, "other", false);
    let mut c = user_client(&owner).with_timeout(Duration::from_secs(10));
    let mut o = user_client(&other).with_timeout(Duration::from_secs(10));
    ok(&mut c, "app.create", json!({"name": "shop"}));
    ok(&mut o, "app.create", json!({"name": "blog"}));
    let r = eventually(Duration::from_secs(15), "build.list answered", || {
        c.call("build.list", json!({"app": "shop"})).ok()
    });
    assert_eq!(r["builds"], json!([]), "{r}");
    w.batch(
        "INSERT INTO deployer_builds (id, app, commit, source, pusher, node, status, step,
                                      release, durations, log, log_lines, finished_at)
         VALUES ('01shopbuild000000000000001', 'shop', '3f2a1c0d9e8b7a6f', 'src', 'user:owner',
                 'node-a', 'succeeded', NULL, '{\"version\": 2}', '{\"compile\": 1200}',
                 E'-----> Python app detected\n-----> Released v2\n', 2, now()),
                ('01blogbuild000000000000001', 'blog', 'aaaabbbbccccdddd', 'src', 'user:other',
                 'node-a', 'failed', 'compile', NULL, '{}', E'the secret of blog\n', 1, now())",
    );
    let r = ok(&mut c, "build.list", json!({"app": "shop"}));
    let ids: Vec<&str> = r["builds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["01shopbuild000000000000001"], "{r}");
    let r = ok(
        &mut c,
        "build.info",
        json!({"app": "shop", "build": "01shopbuild000000000000001"}),
    );
    assert_eq!(r["build"]["app"], "shop", "{r}");
    assert!(
        r["build"]["log"]
            .as_str()
            .unwrap()
            .contains("Python app detected"),
        "{r}"
    );
    // Another app's build, asked for under an app one may see: not_found, and
    // nothing of it shown.
    let e = remote_err(c.call(
        "build.info",
        json!({"app": "shop", "build": "01blogbuild000000000000001"}),
    ));
    assert_eq!(e.code, Code::NotFound, "{e:?}");
    assert!(!e.message.contains("secret"), "{}", e.message);
    // Under its own app, by someone without access: forbidden.
    assert_eq!(
        code(c.call(
            "build.info",
            json!({"app": "blog", "build": "01blogbuild000000000000001"}),
        )),
        Code::Forbidden
    );
    // Its owner sees it.
    let r = ok(
        &mut o,
        "build.info",
        json!({"app": "blog", "build": "01blogbuild000000000000001"}),
    );
    assert_eq!(r["build"]["status"], "failed", "{r}");
    // A build nobody has: the deployer's not_found, passed on.
    let e = remote_err(c.call(
        "build.info",
        json!({"app": "shop", "build": "01JCT6S3W4F8D9X2QZ7N5K0BVA"}),
    ));
    assert_eq!(e.code, Code::NotFound, "{e:?}");

    // The CLI shows the table and the build with its log.
    let home = w.t.path().join("home");
    let work = w.t.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let creds = w.t.path().join("owner.credentials");
    std::fs::write(&creds, owner.to_toml()).unwrap();
    let args = ["login", "--credentials", creds.to_str().unwrap()];
    succeeded(&args, customer(&home, &work, &args));
    let args = ["builds", "-a", "shop"];
    let out = succeeded(&args, customer(&home, &work, &args));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "=== shop Builds", "{out}");
    assert!(lines[1].starts_with("ID"), "{out}");
    let row: Vec<&str> = lines[2].split_whitespace().collect();
    assert_eq!(
        (row[0], row[1], row[2], row[3]),
        (
            "01shopbuild000000000000001",
            "succeeded",
            "3f2a1c0",
            "user:owner"
        ),
        "{out}"
    );
    assert_eq!(row.last(), Some(&"v2"), "{out}");
    let args = ["builds", "info", "01shopbuild000000000000001", "-a", "shop"];
    let out = succeeded(&args, customer(&home, &work, &args));
    assert!(
        out.starts_with("=== shop Build 01shopbuild000000000000001\n"),
        "{out}"
    );
    assert!(out.contains("compile 1.2s"), "{out}");
    assert!(
        out.ends_with("=== Log\n-----> Python app detected\n-----> Released v2\n"),
        "{out}"
    );
    let args = ["builds", "info", "01blogbuild000000000000001", "-a", "shop"];
    let err = failed(&args, customer(&home, &work, &args));
    assert!(
        err.contains("has no build") && !err.contains("secret"),
        "{err}"
    );
}
