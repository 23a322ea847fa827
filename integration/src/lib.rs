//! Test harness for cross-daemon tests: a temp dir that is kept (and printed) when a
//! test fails, a real PostgreSQL, real daemon processes on free ports, and clients.

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

pub mod api;
pub mod http;
pub mod netns;
pub mod sched;

use anyhow::Result;
use nix::sys::signal::Signal;
use paddock_config::ClusterFile;
use paddock_harness::shared_pg::{self, SharedPg};
use paddock_harness::{self as harness, ClusterCurve, NodePorts, PgCluster, PgOptions};
use paddock_wire::{Client, Credentials};

pub use paddock_harness::{free_port, tcp};

/// A directory for one test's files and logs; removed on success, kept and printed
/// when the test panics.
pub struct TestDir {
    dir: Option<tempfile::TempDir>,
}

impl TestDir {
    pub fn new(name: &str) -> TestDir {
        let dir = tempfile::Builder::new()
            .prefix(&format!("paddock-{name}-"))
            .tempdir()
            .expect("temp dir");
        TestDir { dir: Some(dir) }
    }

    pub fn path(&self) -> &Path {
        self.dir.as_ref().expect("dir").path()
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let keep = std::env::var_os("PADDOCK_KEEP_TEST_DIRS").is_some_and(|v| !v.is_empty());
        if keep && !std::thread::panicking() {
            if let Some(d) = self.dir.take() {
                eprintln!("test files and logs kept in {}", d.keep().display());
            }
            return;
        }
        if std::thread::panicking() {
            if let Some(d) = self.dir.take() {
                let p = d.keep();
                eprintln!(
                    "test failed; its files and logs are kept in {}",
                    p.display()
                );
                for e in fs::read_dir(p.join("logs")).into_iter().flatten().flatten() {
                    let text = fs::read_to_string(e.path()).unwrap_or_default();
                    let lines: Vec<&str> = text.lines().collect();
                    eprintln!("--- {} (last 30 lines)", e.path().display());
                    for l in &lines[lines.len().saturating_sub(30)..] {
                        eprintln!("{l}");
                    }
                }
            }
        }
    }
}

/// A PostgreSQL database for one test: by default a database of its own on the
/// run's shared server ([`Postgres::start`]); a whole server of its own for tests
/// that stop, crash, reconfigure or replicate it ([`Postgres::private`]).
pub struct Postgres {
    pub cluster: PgCluster,
    /// The test's main database (`paddock` on a private server).
    pub db: String,
    shared: Option<SharedPg>,
    /// Databases this test made on the shared server, dropped when it passes.
    made: std::sync::Mutex<Vec<String>>,
    child: Option<Child>,
}

impl Postgres {
    /// A fresh database on the run's shared PostgreSQL (started by the first test
    /// of the run). `dir` gets the usual `logs/` directory; the server's own log
    /// is shared and named when a test fails.
    pub fn start(dir: &Path) -> Postgres {
        fs::create_dir_all(dir.join("logs")).unwrap();
        let shared = shared_pg::server().expect("the shared PostgreSQL");
        let db = shared_pg::unique_db_name("paddock");
        shared.create_db(&db).expect("createdb");
        Postgres {
            cluster: shared.cluster.clone(),
            db: db.clone(),
            shared: Some(shared),
            made: std::sync::Mutex::new(vec![db]),
            child: None,
        }
    }

    /// A server of this test's own under `dir/pg` (initdb and start: seconds, not
    /// milliseconds), with database `paddock`. Use it only to stop, crash,
    /// reconfigure (ALTER SYSTEM) or replicate the server.
    pub fn private(dir: &Path) -> Postgres {
        fs::create_dir_all(dir.join("logs")).unwrap();
        let cluster = PgCluster::init(
            dir,
            &PgOptions {
                fast: true,
                port: None,
            },
        )
        .expect("initdb");
        let child = cluster
            .start(&dir.join("logs/postgres.log"))
            .expect("postgres starts");
        cluster.create_db("paddock").expect("createdb");
        Postgres {
            cluster,
            db: "paddock".into(),
            shared: None,
            made: std::sync::Mutex::new(Vec::new()),
            child: Some(child),
        }
    }

    pub fn url(&self) -> String {
        self.cluster.url(&self.db)
    }

    /// Stops a private server (a fast shutdown), as a database outage does.
    pub fn stop(&mut self) {
        assert!(
            self.shared.is_none(),
            "only a private server may be stopped"
        );
        if let Some(mut child) = self.child.take() {
            harness::stop_postgres(&mut child, Signal::SIGINT, Duration::from_secs(10));
        }
    }

    /// Starts a server stopped by `stop` again: the same data, the same port.
    pub fn restart(&mut self, log: &Path) {
        assert!(self.child.is_none(), "the server is running");
        self.child = Some(self.cluster.start(log).expect("postgres starts again"));
    }

    /// A fresh empty database on the same server (its name is made unique on the
    /// shared server; the URL names it).
    pub fn fresh_db(&self, name: &str) -> String {
        match &self.shared {
            Some(s) => {
                let db = shared_pg::unique_db_name(name);
                let url = s.create_db(&db).expect("createdb");
                self.made.lock().unwrap().push(db);
                url
            }
            None => {
                self.cluster.create_db(name).expect("createdb");
                self.cluster.url(name)
            }
        }
    }

    /// `kill -9` of a private server, its backends and WAL senders included (a
    /// crash: no shutdown checkpoint, nothing more sent to standbys).
    pub fn crash(&mut self) {
        let mut child = self
            .child
            .take()
            .expect("crash() is for a private server (Postgres::private)");
        harness::kill_server(&mut child);
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if let Some(s) = &self.shared {
            let made = std::mem::take(&mut *self.made.lock().unwrap());
            if std::thread::panicking() {
                eprintln!(
                    "test failed; its databases {made:?} stay on the shared PostgreSQL until the run ends (log: {})",
                    s.log.display()
                );
            } else {
                for db in made {
                    if let Err(e) = s.drop_db(&db) {
                        eprintln!("cannot drop test database {db}: {e:#}");
                    }
                }
            }
        }
        if let Some(mut child) = self.child.take() {
            harness::stop_postgres(&mut child, Signal::SIGINT, Duration::from_secs(10));
        }
    }
}

/// One node's cluster file and the daemons started from it.
pub struct Node {
    pub name: String,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub file: ClusterFile,
    pub ports: NodePorts,
    /// The node's keyring and CURVE client keys (it signs and verifies like a keyring).
    pub keys: Credentials,
    procs: Vec<(String, Child)>,
}

/// A test cluster's secrets, shared by the nodes built with it: the HMAC key id
/// (`.0`) and hex secret (`.1`), and the CURVE keys (`.2`; `None` runs the test
/// cluster in plaintext).
#[derive(Clone, Debug)]
pub struct TestKey(pub String, pub String, pub Option<ClusterCurve>);

/// Fresh secrets for a test cluster, CURVE included (as `paddock dev up` makes).
pub fn test_key() -> TestKey {
    TestKey(
        "cluster-1".into(),
        paddock_wire::keyring::generate_secret_hex(),
        Some(ClusterCurve::generate().expect("libzmq with CURVE")),
    )
}

/// Fresh secrets for a plaintext test cluster (no `[curve]` table).
pub fn plaintext_test_key() -> TestKey {
    TestKey(
        "cluster-1".into(),
        paddock_wire::keyring::generate_secret_hex(),
        None,
    )
}

impl Node {
    /// Writes `<base>/<name>/paddock.toml` with free ports. `heartbeats` empty means
    /// "this node's own heartbeat".
    pub fn new(
        base: &Path,
        name: &str,
        key: &TestKey,
        heartbeats: &[String],
        db: Option<String>,
    ) -> Node {
        let dir = base.join(name);
        fs::create_dir_all(base.join("logs")).unwrap();
        fs::create_dir_all(&dir).unwrap();
        let (mut file, ports) = harness::node_file(
            name,
            &dir.join("state"),
            (&key.0, &key.1),
            key.2.as_ref(),
            heartbeats,
            db,
        )
        .unwrap();
        // Fast beats keep liveness tests short.
        file.cluster.beat_interval_ms = 200;
        let config = dir.join("paddock.toml");
        file.write(&config).unwrap();
        let keys = harness::credentials(&file).unwrap();
        Node {
            name: name.into(),
            dir,
            config,
            file,
            ports,
            keys,
            procs: Vec::new(),
        }
    }

    /// Rewrites the cluster file after changing `file`.
    pub fn save(&mut self) {
        self.file.write(&self.config).unwrap();
        self.keys = harness::credentials(&self.file).unwrap();
    }

    pub fn log(&self, daemon: &str) -> PathBuf {
        self.dir
            .parent()
            .unwrap()
            .join("logs")
            .join(format!("{}-{daemon}.log", self.name))
    }

    /// Adds `[daemons.NAME]` with a free rpc port to the cluster file.
    pub fn add_daemon(&mut self, daemon: &str) {
        let section = paddock_config::DaemonSection {
            rpc: tcp(free_port().unwrap()),
            ..Default::default()
        };
        self.file.daemons.insert(daemon.to_string(), section);
        self.save();
    }

    pub fn rpc(&self, daemon: &str) -> String {
        self.file.daemons[daemon].rpc.clone()
    }

    /// Starts `daemon` and waits until it answers ping.
    pub fn start(&mut self, daemon: &str) {
        self.spawn(daemon);
        harness::wait_ping(
            &self.rpc(daemon),
            self.keys.clone(),
            Duration::from_secs(20),
        )
        .unwrap_or_else(|e| panic!("{daemon} on {} did not come up: {e}", self.name));
    }

    /// Starts `daemon` without waiting.
    pub fn spawn(&mut self, daemon: &str) {
        self.spawn_env(daemon, &[]);
    }

    /// Starts `daemon` with extra environment variables, without waiting.
    pub fn spawn_env(&mut self, daemon: &str, env: &[(&str, &str)]) {
        let child =
            harness::spawn_daemon_env(daemon, &self.config, &self.log(daemon), env).unwrap();
        self.procs.retain(|(d, _)| d != daemon);
        self.procs.push((daemon.to_string(), child));
    }

    /// Starts program `bin` (a test stand-in) as `daemon`, without waiting.
    pub fn spawn_bin(&mut self, daemon: &str, bin: &str, env: &[(&str, &str)]) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log(daemon))
            .unwrap();
        let child = std::process::Command::new(harness::bin(bin).unwrap())
            .envs(env.iter().copied())
            .arg("--config")
            .arg(&self.config)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .process_group(0)
            .spawn()
            .unwrap();
        self.procs.retain(|(d, _)| d != daemon);
        self.procs.push((daemon.to_string(), child));
    }

    pub fn pid(&self, daemon: &str) -> i32 {
        self.procs
            .iter()
            .find(|(d, _)| d == daemon)
            .map(|(_, c)| c.id() as i32)
            .unwrap_or_else(|| panic!("{daemon} not started"))
    }

    pub fn signal(&self, daemon: &str, sig: Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid(daemon)), sig).unwrap();
    }

    /// `kill -9`, and reap.
    pub fn kill9(&mut self, daemon: &str) {
        if let Some(i) = self.procs.iter().position(|(d, _)| d == daemon) {
            let (_, mut c) = self.procs.remove(i);
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits for `daemon` to exit by itself; returns its exit code.
    pub fn wait_exit(&mut self, daemon: &str, timeout: Duration) -> Option<i32> {
        let i = self.procs.iter().position(|(d, _)| d == daemon)?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.procs[i].1.try_wait().unwrap() {
                self.procs.remove(i);
                return st.code();
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A log sink for `daemon`: a PULL socket on a free port, a CURVE server with
    /// the cluster's server key as every Paddock socket is (a daemon's PUSH is a
    /// CURVE client and talks to nothing else), written into the cluster file as
    /// `[daemons.DAEMON] log_sink`. Restart the daemon to use it.
    pub fn log_sink(&mut self, daemon: &str) -> zmq::Socket {
        let port = free_port().unwrap();
        let pull = zmq::Context::new().socket(zmq::PULL).unwrap();
        let curve = self.file.curve.clone().expect("a CURVE cluster");
        pull.set_curve_server(true).unwrap();
        let secret =
            paddock_wire::curve::Key::from_z85(curve.server_secret.unwrap().expose()).unwrap();
        pull.set_curve_secretkey(secret.bytes()).unwrap();
        pull.bind(&tcp(port)).unwrap();
        self.file
            .daemons
            .get_mut(daemon)
            .unwrap()
            .other
            .insert("log_sink".into(), toml::Value::String(tcp(port)));
        self.save();
        pull
    }

    pub fn client(&self, daemon: &str) -> Client {
        Client::connect(&self.rpc(daemon), "user:test", self.keys.clone())
            .unwrap()
            .with_timeout(Duration::from_secs(5))
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        for (_, c) in self.procs.iter_mut() {
            harness::stop_child(c, Signal::SIGTERM, Duration::from_secs(3));
        }
        harness::stop_shims(&self.dir.join("state"));
    }
}

/// Reads a runner one-off's output (`run.output`, long-polled) until it ends:
/// (output, exit code); panics if it has not ended after 200 polls of 1 s.
pub fn run_to_end(c: &mut Client, id: &str) -> (String, i32) {
    use base64::Engine;
    let mut offset = 0u64;
    let mut out = Vec::new();
    for _ in 0..200 {
        let v = c
            .call(
                "run.output",
                serde_json::json!({"id": id, "offset": offset, "wait_ms": 1000}),
            )
            .unwrap();
        out.extend(
            base64::engine::general_purpose::STANDARD
                .decode(v["data"].as_str().unwrap())
                .unwrap(),
        );
        offset = v["next_offset"].as_u64().unwrap();
        if v["done"] == true {
            return (
                String::from_utf8_lossy(&out).to_string(),
                v["exit_code"].as_i64().unwrap() as i32,
            );
        }
    }
    panic!("run {id} did not end: {}", String::from_utf8_lossy(&out));
}

/// Polls `f` until it returns `Some`, or panics with `what` after `timeout`.
pub fn eventually<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs an async block on a fresh runtime (for direct SQL checks).
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

pub type TestResult = Result<()>;

/// An app's account (`pdk-APP`), made by the test before its runners start
/// (runners of tests running at once making accounts at the same moment have
/// raced in /etc/passwd) and removed when dropped: keep it a struct's last
/// field, so the daemons and the app's processes are gone by then. System
/// uids are few (100-999): a test that leaves its accounts behind exhausts
/// them after some hundred runs.
pub struct AppAccount(String);

impl AppAccount {
    pub fn make(app: &str) -> AppAccount {
        let name = format!("pdk-{app}");
        let st = std::process::Command::new("useradd")
            .args(["--system", "--user-group", "--no-create-home", "--home-dir"])
            .args(["/nonexistent", "--shell", "/usr/sbin/nologin"])
            .arg(&name)
            .status()
            .unwrap();
        assert!(st.success(), "useradd {name}");
        AppAccount(name)
    }
}

impl Drop for AppAccount {
    fn drop(&mut self) {
        // Refused (exit 8) while a process of the account is still exiting.
        for _ in 0..50 {
            let st = std::process::Command::new("userdel")
                .arg(&self.0)
                .stderr(std::process::Stdio::null())
                .status();
            if st.map_or(true, |s| s.success() || s.code() == Some(6)) {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}
