//! The `paddock` CLI end to end as a customer who has only a credentials file: the
//! operator makes the user with the cluster file (`paddock users create`), then
//! every customer verb runs with HOME and XDG_CONFIG_HOME in a temp dir, no
//! PADDOCK_CONFIG, no cluster file anywhere it could be found, and a working
//! directory without `.paddock-dev`.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use paddock_config::credentials::UserCredentials;
use paddock_integration::api::*;
use paddock_integration::*;
use serde_json::{json, Value};

fn bin() -> PathBuf {
    paddock_harness::bin("paddock").unwrap()
}

/// `paddock ARGS` as the operator, with the node's cluster file.
fn operator(node: &Node, args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .env("PADDOCK_CONFIG", &node.config)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// A customer's machine: a home of their own and a working directory.
struct Customer {
    home: PathBuf,
    cwd: PathBuf,
}

impl Customer {
    fn new(base: &Path) -> Customer {
        let home = base.join("home");
        let cwd = base.join("work");
        std::fs::create_dir_all(&home).unwrap();
        std::fs::create_dir_all(&cwd).unwrap();
        Customer { home, cwd }
    }

    fn xdg(&self) -> PathBuf {
        self.home.join("xdg")
    }

    fn credentials(&self) -> PathBuf {
        self.xdg().join("paddock/credentials")
    }

    fn cmd_in(&self, dir: &Path, args: &[&str]) -> Command {
        let mut c = Command::new(bin());
        c.args(args)
            .current_dir(dir)
            .env_remove("PADDOCK_CONFIG")
            .env_remove("GIT_DIR")
            .env_remove("GIT_WORK_TREE")
            .env("HOME", &self.home)
            .env("XDG_CONFIG_HOME", self.xdg())
            .stdin(Stdio::null());
        c
    }

    fn run_in(&self, dir: &Path, args: &[&str]) -> Output {
        self.cmd_in(dir, args).output().unwrap()
    }

    fn run(&self, args: &[&str]) -> Output {
        self.run_in(&self.cwd, args)
    }

    /// Runs, asserts success and that nothing named a cluster file; returns stdout.
    fn ok(&self, args: &[&str]) -> String {
        ok(args, self.run(args))
    }

    /// Runs, asserts failure; returns stderr.
    fn err(&self, args: &[&str]) -> String {
        err(args, self.run(args))
    }

    fn json(&self, args: &[&str]) -> Value {
        let text = self.ok(args);
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}):\n{text}"))
    }
}

fn ok(args: &[&str], o: Output) -> String {
    let (out, errs) = (
        String::from_utf8_lossy(&o.stdout).to_string(),
        String::from_utf8_lossy(&o.stderr).to_string(),
    );
    assert!(
        o.status.success(),
        "paddock {args:?} failed ({}):\n{out}\n{errs}",
        o.status
    );
    assert!(
        !errs.contains("paddock: using"),
        "paddock {args:?} used a cluster file:\n{errs}"
    );
    out
}

fn err(args: &[&str], o: Output) -> String {
    assert!(
        !o.status.success(),
        "paddock {args:?} succeeded:\n{}",
        String::from_utf8_lossy(&o.stdout)
    );
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// A node with an api, and the credentials document `paddock users create NAME`
/// printed for a user (written to a file as the customer would keep it).
struct Cluster {
    node: Node,
    _pg: Postgres,
    t: TestDir,
}

fn cluster(name: &str) -> Cluster {
    let t = TestDir::new(name);
    let pg = Postgres::start(t.path());
    let mut node = Node::new(t.path(), "node-a", &test_key(), &[], Some(pg.url()));
    node.start("api");
    Cluster { node, _pg: pg, t }
}

impl Cluster {
    fn user(&self, name: &str) -> (UserCredentials, PathBuf) {
        let args = ["users", "create", name];
        let doc = ok(&args, operator(&self.node, &args));
        let path = self.t.path().join(format!("{name}.credentials"));
        std::fs::write(&path, &doc).unwrap();
        let c = UserCredentials::parse(&doc, &path)
            .unwrap_or_else(|e| panic!("users create printed no credentials document: {e}\n{doc}"));
        (c, path)
    }
}

fn logged_in(cl: &Cluster, name: &str) -> (Customer, UserCredentials, PathBuf) {
    let (creds, file) = cl.user(name);
    let cu = Customer::new(&cl.t.path().join(name));
    cu.ok(&["login", "--credentials", file.to_str().unwrap()]);
    (cu, creds, file)
}

#[test]
fn a_customer_with_only_a_credentials_file_drives_every_verb() {
    let cl = cluster("cli-customer");
    let n = &cl.node;

    // The operator's document: the api, the user, the key and the CURVE keys.
    let (alice, file) = cl.user("alice");
    assert_eq!(alice.user, "alice");
    assert_eq!(alice.api, n.rpc("api"));
    let curve = alice.curve.as_ref().expect("a [curve] table");
    assert_eq!(
        curve.server_public,
        n.file.curve.as_ref().unwrap().server_public
    );
    let (bob, _) = cl.user("bob");
    let users = ok(&["users"], operator(n, &["users"]));
    assert!(users.contains("alice") && users.contains("bob"), "{users}");

    // Login validates and stores the document: 0600 in a 0700 folder.
    let cu = Customer::new(&cl.t.path().join("alice"));
    let out = cu.ok(&["login", "--credentials", file.to_str().unwrap()]);
    assert!(out.starts_with("Logged in as alice"), "{out}");
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&cu.credentials()), 0o600);
    assert_eq!(mode(cu.credentials().parent().unwrap()), 0o700);
    assert_eq!(UserCredentials::load(&cu.credentials()).unwrap(), alice);
    assert_eq!(cu.ok(&["whoami"]), "alice\n");

    // Apps (`apps create` also names the git remote: api_push.rs checks that).
    let created = cu.ok(&["apps", "create", "myapp"]);
    assert!(
        created.starts_with("Creating myapp... done\nhttp://myapp.localhost/\nGit remote: "),
        "{created}"
    );
    let apps = cu.json(&["apps", "--json"]);
    assert_eq!(apps["apps"][0]["name"], "myapp", "{apps}");
    assert_eq!(apps["apps"][0]["owner"], "alice", "{apps}");
    let info = cu.ok(&["apps", "info", "-a", "myapp"]);
    assert!(info.starts_with("=== myapp\n"), "{info}");
    assert!(info.contains("Owner:") && info.contains("alice"), "{info}");

    // Config vars, each change a release.
    assert_eq!(
        cu.ok(&["config", "set", "A=1", "B=two words", "-a", "myapp"]),
        "Setting A, B on myapp... done, v2\n"
    );
    assert_eq!(cu.ok(&["config", "get", "B", "-a", "myapp"]), "two words\n");
    let all = cu.ok(&["-a", "myapp", "config"]);
    assert_eq!(all, "=== myapp Config Vars\nA: 1\nB: two words\n");
    assert_eq!(
        cu.ok(&["config", "unset", "B", "-a", "myapp"]),
        "Unsetting B on myapp... done, v3\n"
    );
    let e = cu.err(&["config", "get", "B", "-a", "myapp"]);
    assert!(e.contains("B is not set on myapp"), "{e}");
    let e = cu.err(&["config", "set", "NOEQUALS", "-a", "myapp"]);
    assert!(e.contains("not KEY=VALUE"), "{e}");

    // Releases, newest first; plain when piped; -n.
    let rel = cu.ok(&["releases", "-a", "myapp"]);
    assert!(
        rel.starts_with("=== myapp Releases - Current: v3\n"),
        "{rel}"
    );
    let order: Vec<usize> = ["v3 ", "v2 ", "v1 "]
        .iter()
        .map(|v| rel.find(v).unwrap_or_else(|| panic!("{v} missing:\n{rel}")))
        .collect();
    assert!(order[0] < order[1] && order[1] < order[2], "{rel}");
    assert!(
        !rel.contains('─') && !rel.contains('\x1b') && !rel.contains('|'),
        "{rel}"
    );
    let one = cu.json(&["releases", "-n", "1", "--json", "-a", "myapp"]);
    assert_eq!(one["releases"].as_array().unwrap().len(), 1, "{one}");
    assert_eq!(one["releases"][0]["version"], 3);
    let v2 = cu.ok(&["releases", "info", "v2", "-a", "myapp"]);
    assert!(
        v2.contains("=== myapp Release v2") && v2.contains("B: two words"),
        "{v2}"
    );

    // Rollback to v2 brings B back in a new release.
    assert_eq!(
        cu.ok(&["rollback", "v2", "-a", "myapp"]),
        "Rolling back myapp to v2... done, v4\n"
    );
    assert_eq!(cu.ok(&["config", "get", "B", "-a", "myapp"]), "two words\n");
    let e = cu.err(&["rollback", "v99", "-a", "myapp"]);
    assert!(e.contains("v99"), "{e}");

    // A build's release (made with the cluster key, as the deployer will) brings
    // process types; the first with `web` runs web=1 (scaling: its own test).
    build_release(n, "myapp");
    assert_eq!(
        cu.ok(&["ps", "-a", "myapp"]),
        "=== myapp Formation\nTYPE    QUANTITY  MEMORY  PIDS  COMMAND\n\
         web     1         512 MB  256   python3 app.py\n\
         worker  0         512 MB  256   python3 worker.py\n"
    );
    let e = cu.err(&["ps", "scale", "clock=1", "-a", "myapp"]);
    assert!(e.contains("clock") && e.contains("web, worker"), "{e}");
    let e = cu.err(&["ps", "scale", "web", "-a", "myapp"]);
    assert!(e.contains("TYPE=QUANTITY"), "{e}");

    // Domains.
    assert_eq!(
        cu.ok(&["domains", "add", "www.example.com", "-a", "myapp"]),
        "Adding www.example.com to myapp... done\n"
    );
    assert_eq!(
        cu.ok(&["domains", "-a", "myapp"]),
        "=== myapp Domains\nmyapp.localhost (default)\nwww.example.com\n"
    );
    cu.ok(&["domains", "remove", "www.example.com", "-a", "myapp"]);
    assert!(!cu
        .ok(&["domains", "-a", "myapp"])
        .contains("www.example.com"));

    // Access: bob in, then out.
    assert_eq!(
        cu.ok(&["access", "add", "bob", "-a", "myapp"]),
        "Adding bob to myapp as collaborator... done\n"
    );
    let acl = cu.ok(&["access", "-a", "myapp"]);
    assert!(
        acl.lines()
            .any(|l| l.split_whitespace().eq(["bob", "collaborator"])),
        "{acl}"
    );
    assert!(user_client(&bob)
        .call("app.info", json!({"app": "myapp"}))
        .is_ok());
    cu.ok(&["access", "remove", "bob", "-a", "myapp"]);
    assert!(!cu.ok(&["access", "-a", "myapp"]).contains("bob"));
    assert!(user_client(&bob)
        .call("app.info", json!({"app": "myapp"}))
        .is_err());

    // SSH keys: the default file is ~/.ssh/id_ed25519.pub.
    let ssh = cu.home.join(".ssh");
    std::fs::create_dir_all(&ssh).unwrap();
    let st = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "alice@laptop", "-f"])
        .arg(ssh.join("id_ed25519"))
        .status()
        .unwrap();
    assert!(st.success());
    let fp = String::from_utf8(
        Command::new("ssh-keygen")
            .arg("-lf")
            .arg(ssh.join("id_ed25519.pub"))
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap()
    .split_whitespace()
    .nth(1)
    .unwrap()
    .to_string();
    assert!(fp.starts_with("SHA256:"), "{fp}");
    let out = cu.ok(&["keys", "add"]);
    assert!(out.contains(&fp) && out.contains("ed25519"), "{out}");
    let e = cu.err(&["keys", "add", ssh.join("id_ed25519").to_str().unwrap()]);
    assert!(e.contains("private key"), "{e}");
    let keys = cu.ok(&["keys"]);
    assert!(
        keys.contains(&fp) && keys.contains("alice@laptop"),
        "{keys}"
    );
    assert_eq!(
        cu.ok(&["keys", "remove", &fp]),
        format!("Removing SSH key {fp}... done\n")
    );
    assert!(!cu.ok(&["keys"]).contains(&fp));

    // The audit log has what alice did, newest first.
    let log = cu.json(&["audit", "-a", "myapp", "-n", "100", "--json"]);
    let kinds: Vec<&str> = log["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    for k in [
        "access.remove",
        "access.add",
        "domain.remove",
        "domain.add",
        "release.create",
        "rollback",
        "config.unset",
        "config.set",
        "app.create",
    ] {
        assert!(kinds.contains(&k), "{k} not in {kinds:?}");
    }
    assert_eq!(kinds[0], "access.remove", "{kinds:?}");
    let text = cu.ok(&["audit", "-a", "myapp"]);
    assert!(
        text.starts_with("=== myapp Audit Log\n") && text.contains("user:alice"),
        "{text}"
    );
    let two = cu.json(&["audit", "-a", "myapp", "-n", "2", "--json"]);
    assert_eq!(two["entries"].as_array().unwrap().len(), 2);

    // Destroy: refused without the confirmation, or with the wrong one.
    let e = cu.err(&["apps", "destroy", "-a", "myapp"]);
    assert!(e.contains("--confirm myapp"), "{e}");
    let e = cu.err(&["apps", "destroy", "-a", "myapp", "--confirm", "other"]);
    assert!(e.contains("does not match"), "{e}");
    assert_eq!(
        cu.json(&["apps", "--json"])["apps"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        cu.ok(&["apps", "destroy", "--confirm", "myapp"]),
        "Destroying myapp... done\n"
    );
    assert_eq!(cu.json(&["apps", "--json"])["apps"], json!([]));
    let e = cu.err(&["config", "-a", "myapp"]);
    assert!(e.contains("myapp"), "{e}");

    // Logout forgets the credentials; nothing else signs for the customer.
    let out = cu.ok(&["logout"]);
    assert!(out.starts_with("Logged out"), "{out}");
    assert!(!cu.credentials().exists());
    let e = cu.err(&["whoami"]);
    assert!(e.contains("paddock login"), "{e}");

    // Login also reads the document from stdin.
    let mut child = cu
        .cmd_in(&cu.cwd, &["login"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(
        child.stdin.as_mut().unwrap(),
        std::fs::read(&file).unwrap().as_slice(),
    )
    .unwrap();
    drop(child.stdin.take());
    ok(&["login"], child.wait_with_output().unwrap());
    assert_eq!(cu.ok(&["whoami"]), "alice\n");
}

/// A release with process types, as a build makes one.
fn build_release(n: &Node, app: &str) {
    n.client("api")
        .call(
            "release.create",
            json!({"app": app, "slug": "sha256:0123abcd00000000000000000000000000000000000000000000000000000000", "description": "Deploy 0123abcd",
                   "process_types": {"web": "python3 app.py", "worker": "python3 worker.py"},
                   "created_by": "user:alice"}),
        )
        .unwrap();
}

#[test]
fn ps_scale_changes_quantities_and_sizes() {
    let cl = cluster("cli-scale");
    let (cu, _, _) = logged_in(&cl, "alice");
    cu.ok(&["apps", "create", "myapp"]);
    build_release(&cl.node, "myapp");
    let out = cu.ok(&["ps", "scale", "web=2", "worker=1:1024", "-a", "myapp"]);
    assert_eq!(
        out,
        "Scaling myapp... done, now running web at 2:512MB, worker at 1:1024MB\n"
    );
    let f = cu.json(&["ps", "-a", "myapp", "--json"]);
    let row = |t: &str| {
        f["formation"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["type"] == t)
            .map(|x| (x["quantity"].clone(), x["memory_mb"].clone()))
    };
    assert_eq!(row("web"), Some((json!(2), json!(512))), "{f}");
    assert_eq!(row("worker"), Some((json!(1), json!(1024))), "{f}");
    // All or nothing: a bad change leaves the others as they were.
    cu.err(&["ps", "scale", "web=3", "worker=101", "-a", "myapp"]);
    let f = cu.json(&["ps", "-a", "myapp", "--json"]);
    assert!(f.to_string().contains("\"quantity\":2"), "{f}");
}

#[test]
fn the_app_comes_from_the_paddock_git_remote_and_errors_say_what_to_do() {
    let cl = cluster("cli-remote");
    let (cu, alice, _) = logged_in(&cl, "alice");
    cu.ok(&["apps", "create", "myapp"]);
    cu.ok(&["config", "set", "GREETING=hi", "-a", "myapp"]);

    // A repo whose `paddock` remote names the app: no -a needed, in any subdir.
    let repo = cu.cwd.join("repo");
    std::fs::create_dir_all(repo.join("src/deep")).unwrap();
    let git = |args: &[&str]| {
        let st = Command::new("git")
            .args(args)
            .current_dir(&repo)
            .env("HOME", &cu.home)
            .env_remove("GIT_DIR")
            .status()
            .unwrap();
        assert!(st.success(), "git {args:?}");
    };
    git(&["init", "-q"]);
    git(&[
        "remote",
        "add",
        "paddock",
        "ssh://git@localhost:2222/myapp.git",
    ]);
    let get = ["config", "get", "GREETING"];
    assert_eq!(ok(&get, cu.run_in(&repo, &get)), "hi\n");
    assert_eq!(ok(&get, cu.run_in(&repo.join("src/deep"), &get)), "hi\n");
    // -a wins over the remote.
    let other = ["config", "get", "GREETING", "-a", "nosuchapp"];
    let e = err(&other, cu.run_in(&repo, &other));
    assert!(e.contains("nosuchapp"), "{e}");
    // --json anywhere on the line.
    for args in [
        &["--json", "config"][..],
        &["config", "--json"][..],
        &["config", "get", "GREETING", "--json"][..],
    ] {
        let v: Value = serde_json::from_str(&ok(args, cu.run_in(&repo, args)))
            .unwrap_or_else(|e| panic!("{args:?}: {e}"));
        assert!(v.to_string().contains("\"hi\""), "{v}");
    }

    // Outside a repo, and with no -a: say how to name the app.
    let e = cu.err(&["config"]);
    assert_eq!(
        e,
        "error: no app given: pass -a APP or run inside a git repo with a `paddock` remote\n"
    );
    // A remote that names no app.
    git(&["remote", "set-url", "paddock", "ssh://git@localhost:2222/"]);
    let e = err(&get, cu.run_in(&repo, &get));
    assert!(
        e.contains("cannot tell the app") && e.contains("-a APP"),
        "{e}"
    );

    // Someone else's app: the api's refusal, word for word.
    let (bob, _) = cl.user("bob");
    user_client(&bob)
        .call("app.create", json!({"name": "bobapp"}))
        .unwrap();
    let refusal = match user_client(&alice).call("config.get", json!({"app": "bobapp"})) {
        Err(paddock_wire::ClientError::Remote(w)) => w,
        other => panic!("expected a refusal, got {other:?}"),
    };
    assert_eq!(refusal.code, paddock_wire::Code::Forbidden);
    let e = cu.err(&["config", "-a", "bobapp"]);
    assert_eq!(e, format!("error: {}\n", refusal.message));
    assert!(cu
        .err(&["config", "set", "X=1", "-a", "bobapp"])
        .contains("bobapp"));
    // An app that does not exist.
    let e = cu.err(&["releases", "-a", "nosuchapp"]);
    assert!(
        e.contains("nosuchapp") && e.contains("does not exist"),
        "{e}"
    );
    // Operator verbs need the cluster file, and say so.
    let e = cu.err(&["status"]);
    assert!(e.contains("--config"), "{e}");
}

#[test]
fn auth_rotate_stores_a_fresh_key_and_the_old_one_is_refused() {
    let cl = cluster("cli-rotate");
    let (cu, alice, old_file) = logged_in(&cl, "alice");
    let out = cu.ok(&["auth", "rotate"]);
    let now = UserCredentials::load(&cu.credentials()).unwrap();
    assert_ne!(now.key_id, alice.key_id);
    assert_eq!(now.user, "alice");
    assert_eq!(
        out,
        format!(
            "Rotated alice's key: {} is stored in {}; {} is revoked\n",
            now.key_id,
            cu.credentials().display(),
            alice.key_id
        )
    );
    assert_eq!(
        std::fs::metadata(cu.credentials())
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    // The new key works; the old document does not (named with --config).
    assert_eq!(cu.ok(&["whoami"]), "alice\n");
    let old = [
        "whoami",
        "--config",
        old_file.to_str().unwrap(),
        "--timeout-ms",
        "1500",
    ];
    let e = cu.err(&old);
    assert!(e.contains("log in again"), "{e}");
    // Logging in with the revoked document is refused and stores nothing.
    let login = [
        "login",
        "--credentials",
        old_file.to_str().unwrap(),
        "--timeout-ms",
        "1500",
    ];
    cu.err(&login);
    assert_eq!(
        UserCredentials::load(&cu.credentials()).unwrap().key_id,
        now.key_id
    );
    // The operator revokes the user: the stored key stops working too.
    let args = ["users", "revoke", "alice"];
    let out = ok(&args, operator(&cl.node, &args));
    assert!(out.starts_with("Revoked alice"), "{out}");
    cu.err(&["whoami", "--timeout-ms", "1500"]);
}

#[test]
fn who_signs_follows_the_documented_order() {
    let cl = cluster("cli-identity");
    // An operator's checkout right after ops/dev-up.sh: ./.paddock-dev/paddock.toml.
    let op = Customer::new(&cl.t.path().join("operator"));
    std::fs::create_dir_all(op.cwd.join(".paddock-dev")).unwrap();
    let dev_file = op.cwd.join(".paddock-dev/paddock.toml");
    std::fs::copy(&cl.node.config, &dev_file).unwrap();
    let text = |o: &Output| {
        (
            String::from_utf8_lossy(&o.stdout).to_string(),
            String::from_utf8_lossy(&o.stderr).to_string(),
        )
    };

    // Not logged in: the dev cluster's file signs, and the CLI says so.
    let o = op.run(&["whoami"]);
    let (out, errs) = text(&o);
    assert!(o.status.success(), "{errs}");
    assert_eq!(out, "the cluster key cluster-1\n");
    assert!(
        errs.contains(&format!("paddock: using {}", dev_file.display())),
        "{errs}"
    );
    let o = op.run(&["users", "create", "carol"]);
    let (doc, errs) = text(&o);
    assert!(o.status.success(), "{errs}");
    let carol_file = cl.t.path().join("carol.credentials");
    std::fs::write(&carol_file, &doc).unwrap();

    // Logged in: the credentials come before the dev cluster's file.
    op.ok(&["login", "--credentials", carol_file.to_str().unwrap()]);
    assert_eq!(op.ok(&["whoami"]), "carol\n");
    // ... so an operator's verb on the api is refused, with how to use the cluster key.
    let e = op.err(&["users"]);
    assert!(
        e.contains("only an admin may list users")
            && e.contains(&format!("pass --config {}", ".paddock-dev/paddock.toml")),
        "{e}"
    );
    // --config and $PADDOCK_CONFIG come first, and name either kind of file.
    let cfg = cl.node.config.to_str().unwrap();
    assert_eq!(
        op.ok(&["whoami", "--config", cfg]),
        "the cluster key cluster-1\n"
    );
    let o = op
        .cmd_in(&op.cwd, &["whoami"])
        .env("PADDOCK_CONFIG", &carol_file)
        .output()
        .unwrap();
    assert_eq!(ok(&["whoami"], o), "carol\n");
    // Verbs for other daemons skip the credentials file and use the cluster file.
    let o = op.run(&["ping", "api"]);
    let (out, errs) = text(&o);
    assert!(
        o.status.success() && out.starts_with("api@node-a answered"),
        "{out}{errs}"
    );
    assert!(errs.contains("paddock: using"), "{errs}");
    let e = op.err(&["ping", "api", "--config", carol_file.to_str().unwrap()]);
    assert!(e.contains("needs the cluster file"), "{e}");

    // A credentials file others can read still works, with a warning.
    std::fs::set_permissions(op.credentials(), std::fs::Permissions::from_mode(0o644)).unwrap();
    let o = op.run(&["whoami"]);
    let (out, errs) = text(&o);
    assert_eq!(out, "carol\n");
    assert!(errs.contains("can be read by others"), "{errs}");
}

/// `paddock ARGS` under a pseudo-terminal (util-linux `script`), as a person at a
/// terminal runs it: stdout and stderr both go to the terminal; returns what it
/// showed (with `\r\n` line ends turned back to `\n`).
fn on_a_terminal(cu: &Customer, args: &[&str]) -> String {
    let mut line = String::from("exec \"$PADDOCK_BIN\"");
    let mut c = Command::new("script");
    for (i, a) in args.iter().enumerate() {
        line.push_str(&format!(" \"$ARG{i}\""));
        c.env(format!("ARG{i}"), a);
    }
    let o = c
        .args(["-qec", &line, "/dev/null"])
        .current_dir(&cu.cwd)
        .env("SHELL", "/bin/sh")
        .env("PADDOCK_BIN", bin())
        .env_remove("PADDOCK_CONFIG")
        .env("HOME", &cu.home)
        .env("XDG_CONFIG_HOME", cu.xdg())
        .stdin(Stdio::null())
        .output()
        .expect("util-linux `script` runs a command under a pseudo-terminal");
    String::from_utf8_lossy(&o.stdout).replace("\r\n", "\n")
}

/// `paddock ARGS` with `input` on its stdin.
fn with_stdin(cu: &Customer, args: &[&str], input: &[u8]) -> Output {
    let mut child = cu
        .cmd_in(&cu.cwd, args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), input).unwrap();
    drop(child.stdin.take());
    child.wait_with_output().unwrap()
}

#[test]
fn config_values_come_from_files_or_stdin_and_control_characters_reach_no_terminal() {
    let cl = cluster("cli-values");
    let (cu, _, _) = logged_in(&cl, "alice");
    cu.ok(&["apps", "create", "myapp"]);

    // KEY=@FILE: the file's contents exactly, trailing newline and all; the
    // value holds what a collaborator could use against a terminal (ESC, BEL,
    // DEL, CSI as the C1 character U+009B).
    let hostile = "line one\n\x1b]0;pwned\x07\x1b[2J\x7f\u{9b}31mred\n";
    let file = cu.cwd.join("token.txt");
    std::fs::write(&file, hostile).unwrap();
    let arg = format!("TOKEN=@{}", file.display());
    assert_eq!(
        cu.ok(&["config", "set", &arg, "-a", "myapp"]),
        "Setting TOKEN on myapp... done, v2\n"
    );
    // Piped, `config get` is the value byte for byte (and println's newline).
    assert_eq!(
        cu.ok(&["config", "get", "TOKEN", "-a", "myapp"]),
        format!("{hostile}\n")
    );

    // KEY=-: stdin, exactly (no trailing newline here).
    let secret = "p@ss word\t\u{85}=x";
    let args = ["config", "set", "PASSWORD=-", "PLAIN=1", "-a", "myapp"];
    let out = ok(&args, with_stdin(&cu, &args, secret.as_bytes()));
    assert_eq!(out, "Setting PASSWORD, PLAIN on myapp... done, v3\n");
    assert_eq!(
        cu.ok(&["config", "get", "PASSWORD", "-a", "myapp"]),
        format!("{secret}\n")
    );
    // Only one value may come from stdin; nothing is set then.
    let args = ["config", "set", "A=-", "B=-", "-a", "myapp"];
    let e = err(&args, with_stdin(&cu, &args, b"x"));
    assert!(e.contains("only one value can come from stdin"), "{e}");
    // @@ is a literal @; a missing file sets nothing.
    cu.ok(&["config", "set", "HANDLE=@@alice", "-a", "myapp"]);
    assert_eq!(
        cu.ok(&["config", "get", "HANDLE", "-a", "myapp"]),
        "@alice\n"
    );
    let e = cu.err(&["config", "set", "X=@/nonexistent/file", "-a", "myapp"]);
    assert!(e.contains("cannot read /nonexistent/file"), "{e}");
    let names = cu.json(&["config", "-a", "myapp", "--json"]);
    assert_eq!(
        names["config"]
            .as_object()
            .unwrap()
            .keys()
            .collect::<Vec<_>>(),
        ["HANDLE", "PASSWORD", "PLAIN", "TOKEN"],
        "{names}"
    );

    // On a terminal nothing reaches it raw: `config get` keeps the value's
    // lines but escapes the rest; `config` and `releases` escape newlines too.
    let shown = on_a_terminal(&cu, &["config", "get", "TOKEN", "-a", "myapp"]);
    assert_eq!(
        shown,
        "line one\n\\u{1b}]0;pwned\\u{7}\\u{1b}[2J\\u{7f}\\u{9b}31mred\n\n"
    );
    let shown = on_a_terminal(&cu, &["config", "-a", "myapp"]);
    assert!(
        shown.contains(
            "TOKEN:    line one\\u{a}\\u{1b}]0;pwned\\u{7}\\u{1b}[2J\\u{7f}\\u{9b}31mred\\u{a}\n"
        ),
        "{shown}"
    );
    let shown = on_a_terminal(&cu, &["releases", "info", "v2", "-a", "myapp"]);
    assert!(shown.contains("TOKEN: line one\\u{a}\\u{1b}]0;"), "{shown}");
    for args in [
        &["config", "-a", "myapp"][..],
        &["config", "get", "PASSWORD", "-a", "myapp"][..],
        &["releases", "info", "v2", "-a", "myapp"][..],
        &["config", "--json", "-a", "myapp"][..],
    ] {
        let shown = on_a_terminal(&cu, args);
        assert!(
            !shown
                .chars()
                .any(|c| c.is_control() && c != '\n' && c != '\t'),
            "{args:?} sent control characters to the terminal: {shown:?}"
        );
    }
    // The api's error messages too (it repeats the name it refused).
    let shown = on_a_terminal(&cu, &["config", "get", "NO\x1b[2JPE", "-a", "myapp"]);
    assert!(
        shown.starts_with("error: ") && shown.contains("NO"),
        "{shown}"
    );
    assert!(
        !shown.chars().any(|c| c.is_control() && c != '\n'),
        "{shown:?}"
    );
}

#[test]
fn a_credentials_folder_others_may_write_to_is_warned_about() {
    let cl = cluster("cli-folder");
    let (_, file) = cl.user("alice");
    let cu = Customer::new(&cl.t.path().join("alice"));
    // A folder that existed before, open to everyone (as a shared or careless
    // $XDG_CONFIG_HOME may be): used as it is, with a warning each time.
    let folder = cu.credentials().parent().unwrap().to_path_buf();
    std::fs::create_dir_all(&folder).unwrap();
    std::fs::set_permissions(&folder, std::fs::Permissions::from_mode(0o777)).unwrap();
    // A symlink planted where the old code wrote its temp file.
    let theirs = cl.t.path().join("theirs");
    std::fs::write(&theirs, "untouched").unwrap();
    std::os::unix::fs::symlink(&theirs, folder.join("credentials.tmp")).unwrap();

    let args = ["login", "--credentials", file.to_str().unwrap()];
    let o = cu.run(&args);
    let errs = String::from_utf8_lossy(&o.stderr).to_string();
    ok(&args, o);
    assert!(
        errs.contains(&format!(
            "warning: {} can be written by anyone (mode 777)",
            folder.display()
        )) && errs.contains("chmod 700"),
        "{errs}"
    );
    assert_eq!(std::fs::read_to_string(&theirs).unwrap(), "untouched");
    let meta = std::fs::symlink_metadata(cu.credentials()).unwrap();
    assert!(meta.file_type().is_file());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    // Every command that uses the file says so too, until the folder is fixed.
    let o = cu.run(&["whoami"]);
    assert_eq!(String::from_utf8_lossy(&o.stdout), "alice\n");
    assert!(String::from_utf8_lossy(&o.stderr).contains("can be written by anyone"));
    std::fs::set_permissions(&folder, std::fs::Permissions::from_mode(0o700)).unwrap();
    let o = cu.run(&["whoami"]);
    assert!(!String::from_utf8_lossy(&o.stderr).contains("warning"));
}

#[test]
fn lists_show_the_newest_fifteen_unless_n_says_otherwise() {
    let cl = cluster("cli-lists");
    let (cu, _, _) = logged_in(&cl, "dave");
    for app in ["alpha", "bravo", "charlie"] {
        cu.ok(&["apps", "create", app]);
    }
    // The newest two, by name, and a note on stderr saying some were left out.
    let o = cu.run(&["apps", "-n", "2"]);
    assert!(o.status.success());
    let out = String::from_utf8_lossy(&o.stdout);
    let names: Vec<&str> = out
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(names, ["bravo", "charlie"], "{out}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("(the newest 2 of 3; -n N for more)"),
        "{o:?}"
    );
    // By default (15) all three, and no note.
    let o = cu.run(&["apps"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(out.lines().count(), 4, "{out}");
    assert!(
        !String::from_utf8_lossy(&o.stderr).contains("newest"),
        "{o:?}"
    );
}
