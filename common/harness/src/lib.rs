//! Real components, really started: a throwaway PostgreSQL made with the installed
//! server binaries, cluster files with free ports, and daemons as child processes.
//! `paddock dev up` and the integration tests both stand on this.
//!
//! Architecture invariant: the harness starts and stops processes and writes files;
//! it never speaks to a daemon except through `paddock-wire`'s client.

use std::fs;
use std::io;
use std::net::TcpListener;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use paddock_config::{ClusterFile, CurveSection, DaemonSection, DatabaseSection, Secret};
use paddock_wire::{Client, Credentials, Keyring};

pub mod pidfile;
pub mod shared_pg;

/// The daemons that exist, in start order. Later issues add theirs here.
pub const DAEMONS: &[&str] = &[
    "heartbeat",
    "locker",
    "runner",
    "balancer",
    "api",
    "blobstore",
    "deployer",
    "gitserver",
    "scheduler",
];

/// A port free right now on 127.0.0.1, from 10000–19999: below the kernel's
/// ephemeral range (32768–60999), where the source ports of outgoing connections
/// come from (a load test opens thousands; one took a port chosen for a daemon
/// before the daemon bound it), and below the runner's app ports (20000–29999).
pub fn free_port() -> Result<u16> {
    Ok(bind_free()?.local_addr()?.port())
}

/// A listener on a free port of that range (held, so the port stays taken).
fn bind_free() -> io::Result<TcpListener> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
        ^ ((std::process::id() as u64) << 32)
        ^ SEQ.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed);
    let mut x = seed | 1;
    for _ in 0..500 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let port = 10_000 + (x % 10_000) as u16;
        if let Ok(l) = TcpListener::bind(("127.0.0.1", port)) {
            return Ok(l);
        }
    }
    TcpListener::bind("127.0.0.1:0")
}

pub fn tcp(port: u16) -> String {
    format!("tcp://127.0.0.1:{port}")
}

/// The directory holding the paddock binaries: `$PADDOCK_BIN_DIR`, else next to the
/// running executable (or its parent, for test binaries under `target/*/deps`).
pub fn bin_dir() -> Result<PathBuf> {
    if let Some(d) = std::env::var_os("PADDOCK_BIN_DIR") {
        return Ok(PathBuf::from(d));
    }
    let exe = std::env::current_exe()?;
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    for _ in 0..2 {
        if dir.join("paddock-heartbeat").exists() {
            return Ok(dir);
        }
        dir = match dir.parent() {
            Some(p) => p.to_path_buf(),
            None => break,
        };
    }
    bail!(
        "cannot find the paddock daemon binaries near {}: run `cargo build --workspace --bins` first, or set PADDOCK_BIN_DIR",
        exe.display()
    )
}

pub fn bin(name: &str) -> Result<PathBuf> {
    let p = bin_dir()?.join(name);
    if !p.exists() {
        bail!(
            "{} is missing: run `cargo build --workspace --bins`",
            p.display()
        );
    }
    Ok(p)
}

/// The PostgreSQL server binaries: `pg_config --bindir`, else the newest
/// /usr/lib/postgresql/*/bin that has `initdb`.
pub fn pg_bindir() -> Result<PathBuf> {
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        if out.status.success() {
            let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            if p.join("initdb").exists() {
                return Ok(p);
            }
        }
    }
    let mut found: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            let b = e.path().join("bin");
            b.join("initdb").exists().then_some((v, b))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, p)| p).ok_or_else(|| {
        anyhow!("PostgreSQL server binaries not found (install the `postgresql` package)")
    })
}

/// The unprivileged account PostgreSQL runs as when we are root (it refuses root):
/// `postgres` if the package made it, else `paddock-pg`, created on first use.
fn pg_account() -> Result<Option<(u32, u32)>> {
    if !nix::unistd::Uid::effective().is_root() {
        return Ok(None);
    }
    for name in ["postgres", "paddock-pg"] {
        if let Some(u) = nix::unistd::User::from_name(name)? {
            return Ok(Some((u.uid.as_raw(), u.gid.as_raw())));
        }
    }
    let st = Command::new("useradd")
        .args([
            "--system",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
            "paddock-pg",
        ])
        .status()
        .context("useradd paddock-pg")?;
    if !st.success() {
        bail!("useradd paddock-pg failed ({st})");
    }
    let u = nix::unistd::User::from_name("paddock-pg")?
        .ok_or_else(|| anyhow!("paddock-pg missing after useradd"))?;
    Ok(Some((u.uid.as_raw(), u.gid.as_raw())))
}

fn chown(path: &Path, owner: Option<(u32, u32)>) -> Result<()> {
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(path, Some(uid), Some(gid))
            .with_context(|| format!("chown {}", path.display()))?;
    }
    Ok(())
}

/// Makes `dir` and its parents traversable by other accounts (PostgreSQL's, apps').
pub fn allow_traverse(dir: &Path) -> Result<()> {
    let mut p = Some(dir);
    while let Some(d) = p {
        if let Ok(m) = fs::metadata(d) {
            let mode = m.permissions().mode();
            if mode & 0o001 == 0 {
                fs::set_permissions(d, fs::Permissions::from_mode(mode | 0o711))
                    .with_context(|| format!("chmod o+x {}", d.display()))?;
            }
        }
        p = d.parent();
    }
    Ok(())
}

/// Settings for a PostgreSQL made under a directory.
#[derive(Debug, Clone)]
pub struct PgOptions {
    /// Trade durability for speed (tests only): fsync and synchronous_commit off.
    pub fast: bool,
    pub port: Option<u16>,
}

/// A PostgreSQL data directory under `<dir>/pg`, made with initdb on first use.
#[derive(Debug, Clone)]
pub struct PgCluster {
    pub dir: PathBuf,
    pub bindir: PathBuf,
    pub port: u16,
    pub password: String,
    owner: Option<(u32, u32)>,
    fast: bool,
}

impl PgCluster {
    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn sockdir(&self) -> PathBuf {
        self.dir.join("run")
    }

    /// initdb into `<dir>/pg` (once), as a non-root account when we are root.
    pub fn init(base: &Path, opts: &PgOptions) -> Result<PgCluster> {
        let pg = Self::prepare(base, opts, None)?;
        if !pg.data().join("PG_VERSION").exists() {
            let pwfile = pg.dir.join("password");
            let out = pg
                .command("initdb")
                .arg("-D")
                .arg(pg.data())
                .args(["-U", "paddock", "-E", "UTF8", "--no-locale"])
                .args(["--auth-local=scram-sha-256", "--auth-host=scram-sha-256"])
                .arg(format!("--pwfile={}", pwfile.display()))
                .output()
                .context("running initdb")?;
            check_output("initdb", &out)?;
        }
        Ok(pg)
    }

    /// A streaming standby of `primary` in `<base>/pg`, cloned with pg_basebackup
    /// (`-R` writes standby.signal and primary_conninfo).
    pub fn init_standby(base: &Path, primary: &PgCluster, opts: &PgOptions) -> Result<PgCluster> {
        let pg = Self::prepare(base, opts, Some(&primary.password))?;
        if !pg.data().join("PG_VERSION").exists() {
            let out = pg
                .command("pg_basebackup")
                .arg("-D")
                .arg(pg.data())
                .args([
                    "-h",
                    "127.0.0.1",
                    "-U",
                    "paddock",
                    "-R",
                    "-X",
                    "stream",
                    "--checkpoint=fast",
                ])
                .arg("-p")
                .arg(primary.port.to_string())
                .env("PGPASSWORD", &primary.password)
                .output()
                .context("running pg_basebackup")?;
            check_output("pg_basebackup", &out)?;
        }
        Ok(pg)
    }

    /// Promotes a standby to primary (`pg_ctl promote`, waits until done).
    pub fn promote(&self) -> Result<()> {
        let out = self
            .command("pg_ctl")
            .args(["promote", "-w", "-D"])
            .arg(self.data())
            .output()
            .context("running pg_ctl promote")?;
        check_output("pg_ctl promote", &out)
    }

    /// The directory, password file, port and socket dir, owned by the account
    /// PostgreSQL runs as; no data yet.
    fn prepare(base: &Path, opts: &PgOptions, password: Option<&str>) -> Result<PgCluster> {
        let bindir = pg_bindir()?;
        let owner = pg_account()?;
        let dir = base.join("pg");
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)?;
        allow_traverse(base)?;
        chown(&dir, owner)?;
        let pwfile = dir.join("password");
        let password = match fs::read_to_string(&pwfile) {
            Ok(p) => p.trim().to_string(),
            Err(_) => {
                let p = password.map(str::to_string).unwrap_or_else(|| {
                    paddock_wire::keyring::generate_secret_hex()[..32].to_string()
                });
                fs::write(&pwfile, &p)?;
                fs::set_permissions(&pwfile, fs::Permissions::from_mode(0o600))?;
                chown(&pwfile, owner)?;
                p
            }
        };
        let port = match opts.port {
            Some(p) => p,
            None => free_port()?,
        };
        let pg = PgCluster {
            dir,
            bindir,
            port,
            password,
            owner,
            fast: opts.fast,
        };
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(pg.sockdir())?;
        chown(&pg.sockdir(), owner)?;
        Ok(pg)
    }

    fn command(&self, bin: &str) -> Command {
        let mut c = Command::new(self.bindir.join(bin));
        if let Some((uid, gid)) = self.owner {
            // std drops root's supplementary groups when it sets the uid.
            c.uid(uid).gid(gid);
        }
        c.env("LC_ALL", "C").current_dir(&self.dir);
        c
    }

    /// Starts `postgres` as a child in its own process group, logging to `log`, and
    /// waits until it accepts connections.
    pub fn start(&self, log: &Path) -> Result<Child> {
        let logf = fs::OpenOptions::new().create(true).append(true).open(log)?;
        let mut cmd = self.command("postgres");
        cmd.arg("-D")
            .arg(self.data())
            .arg("-c")
            .arg(format!("port={}", self.port))
            .args(["-c", "listen_addresses=127.0.0.1"])
            .arg("-c")
            .arg(format!(
                "unix_socket_directories={}",
                self.sockdir().display()
            ))
            .args(["-c", "max_connections=200"]);
        if self.fast {
            cmd.args([
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
            ]);
        }
        cmd.stdin(Stdio::null())
            .stdout(logf.try_clone()?)
            .stderr(logf)
            .process_group(0);
        let mut child = cmd.spawn().context("starting postgres")?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = child.try_wait()? {
                bail!("postgres exited during start ({st}); see {}", log.display());
            }
            if self.is_ready() {
                return Ok(child);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!(
                    "postgres did not accept connections within 30 s; see {}",
                    log.display()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn is_ready(&self) -> bool {
        self.command("pg_isready")
            .args(["-q", "-h", "127.0.0.1", "-U", "paddock", "-d", "postgres"])
            .arg("-p")
            .arg(self.port.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    }

    /// Creates database `name` if it does not exist.
    pub fn create_db(&self, name: &str) -> Result<()> {
        let out = self
            .command("createdb")
            .args(["-h", "127.0.0.1", "-U", "paddock"])
            .arg("-p")
            .arg(self.port.to_string())
            .arg(name)
            .env("PGPASSWORD", &self.password)
            .output()?;
        let err = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() && !err.contains("already exists") {
            bail!("createdb {name} failed: {err}");
        }
        Ok(())
    }

    /// The libpq-style URL daemons use.
    pub fn url(&self, db: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user=paddock password={} dbname={db} target_session_attrs=read-write",
            self.port, self.password
        )
    }
}

fn check_output(what: &str, out: &std::process::Output) -> Result<()> {
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Stops a child: `sig`, then SIGKILL after `grace`. Returns once it is reaped.
pub fn stop_child(child: &mut Child, sig: nix::sys::signal::Signal, grace: Duration) {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    if child.try_wait().ok().flatten().is_some() {
        return;
    }
    let _ = nix::sys::signal::kill(pid, sig);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if child.try_wait().ok().flatten().is_some() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Stops a PostgreSQL server we started: `sig` to the postmaster (SIGINT: fast
/// shutdown, which ends every backend first), and after `grace` a crash
/// ([`kill_server`]). Returns once the postmaster is reaped. (Its children call
/// setsid, so no process-group signal would reach them.)
pub fn stop_postgres(child: &mut Child, sig: nix::sys::signal::Signal, grace: Duration) {
    if child.try_wait().ok().flatten().is_some() {
        return;
    }
    if let Some(p) = pidfile::Proc::open(child.id() as i32) {
        let _ = p.signal(sig);
        if !p.wait_exit(grace) {
            kill_server(child);
        }
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// `kill -9` of a PostgreSQL server we started, as a machine loss would end it:
/// the postmaster is stopped (it forks nothing more), each of its children is
/// SIGKILLed, then the postmaster; it is reaped. Nothing more is written or sent.
pub fn kill_server(child: &mut Child) {
    use nix::sys::signal::Signal;
    let ppid = child.id() as i32;
    if let Some(pm) = pidfile::Proc::open(ppid) {
        let _ = pm.signal(Signal::SIGSTOP);
        let kids: Vec<pidfile::Proc> = children_of(ppid)
            .into_iter()
            .filter_map(pidfile::Proc::open)
            // Still its child once the pidfd is held: not a recycled pid.
            .filter(|k| parent_of(k.pid()) == Some(ppid))
            .collect();
        for k in &kids {
            let _ = k.signal(Signal::SIGKILL);
        }
        let _ = pm.signal(Signal::SIGKILL);
        for k in &kids {
            k.wait_exit(Duration::from_secs(5));
        }
    }
    let _ = child.wait();
}

/// The pids whose parent is `ppid`.
fn children_of(ppid: i32) -> Vec<i32> {
    fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|p| parent_of(*p) == Some(ppid))
        .collect()
}

/// A process's parent pid, from /proc/PID/stat (after the parenthesised name).
fn parent_of(pid: i32) -> Option<i32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(") ")?.1.split(' ').nth(1)?.parse().ok()
}

/// A CURVE keypair as Z85 text.
#[derive(Clone)]
pub struct CurvePair {
    pub public: String,
    pub secret: String,
}

impl std::fmt::Debug for CurvePair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CurvePair")
            .field("public", &self.public)
            .finish_non_exhaustive()
    }
}

impl CurvePair {
    pub fn generate() -> Result<CurvePair> {
        let (public, secret) = paddock_wire::curve::generate()?;
        Ok(CurvePair { public, secret })
    }
}

/// The CURVE keys of a local cluster: the cluster's server keypair, and the client
/// keypair its nodes connect with (one node locally; tests share it across nodes).
#[derive(Clone, Debug)]
pub struct ClusterCurve {
    pub server: CurvePair,
    pub client: CurvePair,
}

impl ClusterCurve {
    pub fn generate() -> Result<ClusterCurve> {
        Ok(ClusterCurve {
            server: CurvePair::generate()?,
            client: CurvePair::generate()?,
        })
    }

    /// The `[curve]` table of a node of this cluster.
    pub fn section(&self) -> CurveSection {
        CurveSection {
            server_public: self.server.public.clone(),
            server_secret: Some(Secret::new(self.server.secret.clone())),
            client_public: self.client.public.clone(),
            client_secret: Secret::new(self.client.secret.clone()),
            clients: Default::default(),
        }
    }
}

/// Endpoints of one node's daemons, chosen from free ports. With `curve`, every
/// socket is encrypted (the default for `paddock dev up` and the tests).
pub fn node_file(
    node: &str,
    state_dir: &Path,
    key: (&str, &str),
    curve: Option<&ClusterCurve>,
    heartbeats: &[String],
    database_url: Option<String>,
) -> Result<(ClusterFile, NodePorts)> {
    let ports = NodePorts::pick()?;
    let mut f = ClusterFile {
        node: node.to_string(),
        signing_key: key.0.to_string(),
        state_dir: Some(state_dir.to_path_buf()),
        curve: curve.map(ClusterCurve::section),
        ..Default::default()
    };
    f.keys
        .insert(key.0.to_string(), Secret::new(key.1.to_string()));
    f.cluster.beat_interval_ms = 1000;
    f.cluster.heartbeats = if heartbeats.is_empty() {
        vec![tcp(ports.heartbeat_pull)]
    } else {
        heartbeats.to_vec()
    };
    let mut hb = DaemonSection {
        rpc: tcp(ports.heartbeat_rpc),
        ..Default::default()
    };
    hb.other.insert(
        "pull".into(),
        toml::Value::String(tcp(ports.heartbeat_pull)),
    );
    hb.other
        .insert("pub".into(), toml::Value::String(tcp(ports.heartbeat_pub)));
    f.daemons.insert("heartbeat".into(), hb);
    f.daemons.insert(
        "locker".into(),
        DaemonSection {
            rpc: tcp(ports.locker_rpc),
            ..Default::default()
        },
    );
    let mut runner = DaemonSection {
        rpc: tcp(ports.runner_rpc),
        ..Default::default()
    };
    runner
        .other
        .insert("pub".into(), toml::Value::String(tcp(ports.runner_pub)));
    let apps = state_dir.with_file_name("apps");
    runner.other.insert(
        "apps_dir".into(),
        toml::Value::String(apps.display().to_string()),
    );
    f.daemons.insert("runner".into(), runner);
    let mut balancer = DaemonSection {
        rpc: tcp(ports.balancer_rpc),
        ..Default::default()
    };
    for (k, p) in [
        ("pub", ports.balancer_pub),
        ("http", ports.balancer_http),
        ("https", ports.balancer_https),
        ("admin", ports.balancer_admin),
    ] {
        balancer.other.insert(k.into(), toml::Value::String(tcp(p)));
    }
    f.daemons.insert("balancer".into(), balancer);
    let mut api = DaemonSection {
        rpc: tcp(ports.api_rpc),
        ..Default::default()
    };
    api.other
        .insert("pub".into(), toml::Value::String(tcp(ports.api_pub)));
    // Every api of a cluster derives user keys from the same secret: one per
    // cluster, like the cluster key (here: from it, so a node's files agree).
    api.other.insert(
        "user_key_secret".into(),
        toml::Value::String(user_key_secret(key.1)),
    );
    f.daemons.insert("api".into(), api);
    for (name, port) in [
        ("blobstore", ports.blobstore_rpc),
        ("deployer", ports.deployer_rpc),
    ] {
        f.daemons.insert(
            name.into(),
            DaemonSection {
                rpc: tcp(port),
                ..Default::default()
            },
        );
    }
    // The gitserver runs its own sshd on a loopback port; `ssh` is the URL users see.
    let mut git = DaemonSection {
        rpc: tcp(ports.gitserver_rpc),
        ..Default::default()
    };
    git.other.insert(
        "ssh_listen".into(),
        toml::Value::String(format!("127.0.0.1:{}", ports.gitserver_ssh)),
    );
    git.other.insert(
        "ssh".into(),
        toml::Value::String(format!("ssh://git@127.0.0.1:{}", ports.gitserver_ssh)),
    );
    f.daemons.insert("gitserver".into(), git);
    f.cluster.apps_domain = Some("localhost".into());
    f.database = database_url.map(|url| DatabaseSection { url });
    Ok((f, ports))
}

#[derive(Debug, Clone, Copy)]
pub struct NodePorts {
    pub heartbeat_rpc: u16,
    pub heartbeat_pull: u16,
    pub heartbeat_pub: u16,
    pub locker_rpc: u16,
    pub runner_rpc: u16,
    pub runner_pub: u16,
    pub balancer_rpc: u16,
    pub balancer_pub: u16,
    pub balancer_http: u16,
    pub balancer_https: u16,
    pub balancer_admin: u16,
    pub api_rpc: u16,
    pub api_pub: u16,
    pub blobstore_rpc: u16,
    pub deployer_rpc: u16,
    pub gitserver_rpc: u16,
    pub gitserver_ssh: u16,
}

/// The api's `user_key_secret` for a cluster whose key is `cluster_key` (hex): a
/// separate secret, HMAC-derived so that every node file written for one cluster
/// has the same one.
pub fn user_key_secret(cluster_key: &str) -> String {
    let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, cluster_key.as_bytes());
    hex::encode(ring::hmac::sign(&k, b"paddock api user_key_secret").as_ref())
}

impl NodePorts {
    pub fn pick() -> Result<NodePorts> {
        // Hold all listeners until every port is chosen, so none repeats.
        let ls: Vec<TcpListener> = (0..17).map(|_| bind_free()).collect::<io::Result<_>>()?;
        let p = |i: usize| ls[i].local_addr().map(|a| a.port());
        Ok(NodePorts {
            heartbeat_rpc: p(0)?,
            heartbeat_pull: p(1)?,
            heartbeat_pub: p(2)?,
            locker_rpc: p(3)?,
            runner_rpc: p(4)?,
            runner_pub: p(5)?,
            balancer_rpc: p(6)?,
            balancer_pub: p(7)?,
            balancer_http: p(8)?,
            balancer_https: p(9)?,
            balancer_admin: p(10)?,
            api_rpc: p(11)?,
            api_pub: p(12)?,
            blobstore_rpc: p(13)?,
            deployer_rpc: p(14)?,
            gitserver_rpc: p(15)?,
            gitserver_ssh: p(16)?,
        })
    }
}

/// Stops every instance shim under a runner's state (`<state_dir>/runner`): each
/// SIGTERM'd shim kills its app and everything the app started, then exits.
/// Returns how many were running. A `shim.pid` that does not name the live
/// `paddock-shim` of its own directory is stale: removed, never signalled.
pub fn stop_shims(state_dir: &Path) -> usize {
    let dirs: Vec<PathBuf> = fs::read_dir(state_dir.join("runner/instances"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .collect();
    let n = stop_shim_pids(&dirs);
    // Their cgroups are empty now: remove them (v1: one per controller; v2: one).
    for d in &dirs {
        let Some(id) = d.file_name() else { continue };
        for ctl in fs::read_dir("/sys/fs/cgroup")
            .into_iter()
            .flatten()
            .flatten()
        {
            let _ = fs::remove_dir(ctl.path().join("paddock").join(id));
        }
        let _ = fs::remove_dir(Path::new("/sys/fs/cgroup/paddock").join(id));
    }
    n
}

fn stop_shim_pids(dirs: &[PathBuf]) -> usize {
    // A shim holds no lock on shim.pid, so the number is trusted only while it
    // names a live `paddock-shim` serving that very directory.
    let shims: Vec<pidfile::Proc> = dirs
        .iter()
        .filter_map(|d| pidfile::matching(&d.join("shim.pid"), |argv| is_shim_for(argv, d)))
        .collect();
    pidfile::stop_all(
        &shims,
        nix::sys::signal::Signal::SIGTERM,
        Duration::from_secs(5),
    );
    shims.len()
}

/// Whether `argv` is `paddock-shim DIR` for instance directory `dir`.
pub fn is_shim_for(argv: &[String], dir: &Path) -> bool {
    let [bin, arg, ..] = argv else { return false };
    Path::new(bin)
        .file_name()
        .is_some_and(|n| n == "paddock-shim")
        && (Path::new(arg) == dir
            || matches!(
                (fs::canonicalize(arg), fs::canonicalize(dir)),
                (Ok(a), Ok(b)) if a == b
            ))
}

/// Whether `pid` is a running process (a zombie, dead but not reaped, is not).
pub fn process_alive(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false)
}

/// Starts `paddock-<daemon> --config <config>` with its output appended to `log`.
pub fn spawn_daemon(daemon: &str, config: &Path, log: &Path) -> Result<Child> {
    spawn_daemon_env(daemon, config, log, &[])
}

/// `spawn_daemon` with extra environment variables.
pub fn spawn_daemon_env(
    daemon: &str,
    config: &Path,
    log: &Path,
    env: &[(&str, &str)],
) -> Result<Child> {
    let logf = fs::OpenOptions::new().create(true).append(true).open(log)?;
    Command::new(bin(&format!("paddock-{daemon}"))?)
        .envs(env.iter().copied())
        .arg("--config")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(logf.try_clone()?)
        .stderr(logf)
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting paddock-{daemon}"))
}

/// Polls `ping` on `endpoint` until it answers or `timeout` passes.
pub fn wait_ping(
    endpoint: &str,
    keys: impl Into<Credentials>,
    timeout: Duration,
) -> Result<serde_json::Value> {
    let mut c = Client::connect(endpoint, "user:harness", keys)?
        .with_timeout(Duration::from_millis(500))
        .with_resend_every(Duration::from_millis(250));
    let deadline = Instant::now() + timeout;
    loop {
        match c.call("ping", serde_json::json!({})) {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() > deadline => {
                return Err(anyhow!(
                    "{endpoint} did not answer ping within {timeout:?}: {e}"
                ))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// The keyring a cluster file describes.
pub fn keyring(f: &ClusterFile) -> Result<Arc<Keyring>> {
    Ok(Arc::new(Keyring::from_hex(
        f.keys.iter().map(|(k, v)| (k.as_str(), v.expose())),
        &f.signing_key,
    )?))
}

/// What a client of the cluster a file describes connects with: its keyring, and
/// its CURVE client keys when it has a `[curve]` table.
pub fn credentials(f: &ClusterFile) -> Result<Credentials> {
    let curve = match &f.curve {
        Some(c) => Some(paddock_wire::curve::ClientKeys::from_z85(
            &c.server_public,
            &c.client_public,
            c.client_secret.expose(),
        )?),
        None => None,
    };
    Ok(Credentials::new(keyring(f)?, curve))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_shims_leaves_a_stranger_named_by_a_stale_shim_pid_alone() {
        let state = tempfile::tempdir().unwrap();
        let inst = state.path().join("runner/instances/i-1");
        fs::create_dir_all(&inst).unwrap();
        let mut stranger = Command::new("sleep").arg("60").spawn().unwrap();
        fs::write(inst.join("shim.pid"), stranger.id().to_string()).unwrap();
        assert_eq!(stop_shims(state.path()), 0);
        assert!(
            stranger.try_wait().unwrap().is_none(),
            "a stale shim.pid got its stranger signalled"
        );
        assert!(!inst.join("shim.pid").exists(), "the stale file is removed");
        let _ = stranger.kill();
        let _ = stranger.wait();
    }

    #[test]
    fn a_shim_is_recognised_by_its_binary_and_its_own_dir() {
        let dir = Path::new("/var/lib/paddock/runner/instances/i-1");
        let argv = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(is_shim_for(
            &argv(&[
                "/usr/bin/paddock-shim",
                "/var/lib/paddock/runner/instances/i-1"
            ]),
            dir
        ));
        assert!(!is_shim_for(
            &argv(&[
                "/usr/bin/paddock-shim",
                "/var/lib/paddock/runner/instances/i-2"
            ]),
            dir
        ));
        assert!(!is_shim_for(
            &argv(&["/bin/sleep", "/var/lib/paddock/runner/instances/i-1"]),
            dir
        ));
        assert!(!is_shim_for(&argv(&["/usr/bin/paddock-shim"]), dir));
    }
}
