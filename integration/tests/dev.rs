//! `paddock dev up --detach`, the CLI against it, a daemon killed and restarted by
//! the supervisor, and `paddock dev down` leaving no process behind.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use paddock_integration::*;
use paddock_wire::kinds::{Service, ServiceState};

fn paddock(dir: &Path, args: &[&str]) -> Output {
    Command::new(paddock_harness::bin("paddock").unwrap())
        .args(args)
        .env("PADDOCK_CONFIG", dir.join("paddock.toml"))
        .output()
        .unwrap()
}

fn ok(o: Output) -> String {
    assert!(
        o.status.success(),
        "paddock failed ({}):\n{}\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

/// Runs `paddock dev down` however the test ends, so a failure leaves nothing running.
struct Down(std::path::PathBuf);

impl Drop for Down {
    fn drop(&mut self) {
        if self.0.join("paddock.toml").exists() {
            let _ = paddock(&self.0, &["dev", "down", "--dir", self.0.to_str().unwrap()]);
        }
    }
}

use paddock_harness::process_alive as alive;

/// The live process holding `DIR/state/NAME.pid` once it is not `old`.
fn replaced(dir: &Path, name: &str, old: i32, what: &str, within: Duration) -> i32 {
    let path = dir.join("state").join(format!("{name}.pid"));
    eventually(within, what, || {
        paddock_harness::pidfile::read_pid(&path).filter(|p| *p != old && alive(*p))
    })
}

/// A process of the dev cluster, from the file that proves it: a daemon's flock'd
/// pid file, PostgreSQL's postmaster.pid, the supervisor's dev.lock.
fn pid_of(dir: &Path, name: &str) -> i32 {
    let path = match name {
        "postgres" => dir.join("pg/data/postmaster.pid"),
        "supervisor" => dir.join("dev.lock"),
        daemon => dir.join("state").join(format!("{daemon}.pid")),
    };
    paddock_harness::pidfile::read_pid(&path)
        .unwrap_or_else(|| panic!("no pid in {}", path.display()))
}

#[test]
fn dev_up_status_lock_restart_and_down() {
    let t = TestDir::new("dev");
    let dir = t.path().join("cluster");
    let d = dir.to_str().unwrap();
    let _down = Down(dir.clone());
    let out = ok(paddock(&dir, &["dev", "up", "--dir", d, "--detach"]));
    assert!(out.contains("PADDOCK_CONFIG="), "{out}");
    let mode = std::fs::metadata(dir.join("paddock.toml")).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
        0o600
    );

    let services: Vec<Service> = eventually(
        Duration::from_secs(10),
        "both daemons alive in status",
        || {
            let s: Vec<Service> =
                serde_json::from_str(&ok(paddock(&dir, &["status", "--json"]))).ok()?;
            (s.iter().filter(|s| s.state == ServiceState::Alive).count()
                == paddock_harness::DAEMONS.len())
            .then_some(s)
        },
    );
    let table = ok(paddock(&dir, &["status"]));
    assert!(
        table.contains("heartbeat") && table.contains("locker") && table.contains("alive"),
        "{table}"
    );

    // Every daemon was started with --config DIR/paddock.toml on its command line.
    for name in paddock_harness::DAEMONS {
        let cmdline = std::fs::read(format!("/proc/{}/cmdline", pid_of(&dir, name))).unwrap();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        assert!(
            cmdline.contains(&format!("--config {}", dir.join("paddock.toml").display())),
            "{cmdline}"
        );
    }

    let pong = ok(paddock(&dir, &["ping", "locker"]));
    assert!(pong.contains("locker@dev answered"), "{pong}");

    // The dev cluster is encrypted: its file has [curve], the CLI connects with it,
    // and a client without CURVE keys cannot reach a daemon at all.
    let cfg = paddock_config::ClusterConfig::load(&dir.join("paddock.toml")).unwrap();
    assert!(cfg.curve.is_some(), "dev up writes a [curve] table");
    let plain = paddock_wire::Credentials::new(std::sync::Arc::new(cfg.keyring.clone()), None);
    let err = paddock_wire::Client::connect(&cfg.file.daemons["locker"].rpc, "user:test", plain)
        .unwrap()
        .with_timeout(Duration::from_millis(700))
        .call("ping", serde_json::json!({}))
        .unwrap_err();
    assert!(
        matches!(err, paddock_wire::ClientError::NotConnected { .. }),
        "{err}"
    );
    let pair = ok(paddock(&dir, &["key", "generate", "--curve"]));
    let keys: Vec<&str> = pair
        .lines()
        .map(|l| l.split('"').nth(1).expect("a quoted key"))
        .collect();
    assert_eq!(keys.len(), 2, "{pair}");
    for k in keys {
        paddock_wire::curve::Key::from_z85(k).expect("a Z85 CURVE key");
    }
    let got = ok(paddock(
        &dir,
        &[
            "lock", "acquire", "deploy", "--owner", "me", "--ttl-ms", "60000",
        ],
    ));
    assert!(got.contains("token"), "{got}");
    let held = paddock(&dir, &["lock", "acquire", "deploy", "--owner", "you"]);
    assert!(!held.status.success());
    assert!(String::from_utf8_lossy(&held.stderr).contains("held by `me`"));
    let list = ok(paddock(&dir, &["lock", "list"]));
    assert!(list.contains("deploy") && list.contains("me"), "{list}");

    // kill -9 a daemon: the supervisor restarts it and the registry shows it alive.
    let old = services
        .iter()
        .find(|s| s.daemon == "locker")
        .unwrap()
        .incarnation
        .clone();
    let locker_pid = pid_of(&dir, "locker");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(locker_pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    eventually(Duration::from_secs(10), "a new locker alive", || {
        let s: Vec<Service> =
            serde_json::from_str(&ok(paddock(&dir, &["status", "--json"]))).ok()?;
        s.iter()
            .any(|s| s.daemon == "locker" && s.state == ServiceState::Alive && s.incarnation != old)
            .then_some(())
    });
    // The lease survived the locker's death (it lives in PostgreSQL).
    let list = ok(paddock(&dir, &["lock", "list"]));
    assert!(list.contains("deploy"), "{list}");

    let logs = ok(paddock(&dir, &["dev", "logs", "--dir", d, "locker"]));
    assert!(logs.contains("paddock-locker"), "{logs}");

    // Everything started, postgres and its backends included.
    let mut pids: Vec<i32> = paddock_harness::DAEMONS
        .iter()
        .map(|n| pid_of(&dir, n))
        .collect();
    pids.push(pid_of(&dir, "postgres"));
    pids.push(pid_of(&dir, "supervisor"));
    let pg_pid = pid_of(&dir, "postgres");
    let pg_children: Vec<i32> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|s| {
                    s.rsplit(") ")
                        .next()
                        .map(|r| r.split(' ').nth(1) == Some(&pg_pid.to_string()))
                })
                .unwrap_or(false)
        })
        .collect();
    assert!(
        !pg_children.is_empty(),
        "postgres has its background processes"
    );
    pids.extend(pg_children);

    let down = ok(paddock(&dir, &["dev", "down", "--dir", d]));
    assert!(down.contains("stopped"), "{down}");
    let left: Vec<i32> = pids.iter().copied().filter(|p| alive(*p)).collect();
    assert!(left.is_empty(), "processes left behind: {left:?}");
    assert!(paddock_harness::pidfile::lock_holder(&dir.join("dev.lock"))
        .unwrap()
        .is_none());

    // A second `up` on the same dir keeps its key and data.
    let key_before = std::fs::read_to_string(dir.join("paddock.toml")).unwrap();
    ok(paddock(&dir, &["dev", "up", "--dir", d, "--detach"]));
    let key_after = std::fs::read_to_string(dir.join("paddock.toml")).unwrap();
    let key_line = |s: &str| {
        s.lines()
            .find(|l| l.starts_with("cluster-1"))
            .map(str::to_string)
    };
    assert_eq!(key_line(&key_before), key_line(&key_after));
    let again = paddock(&dir, &["dev", "up", "--dir", d, "--detach"]);
    assert!(
        !again.status.success(),
        "a second up on a running dir is refused"
    );
    ok(paddock(&dir, &["dev", "down", "--dir", d]));
}

#[test]
fn dev_up_in_the_foreground_stops_everything_on_ctrl_c() {
    let t = TestDir::new("devfg");
    let dir = t.path().join("cluster");
    let _down = Down(dir.clone());
    let mut child = Command::new(paddock_harness::bin("paddock").unwrap())
        .args(["dev", "up", "--dir", dir.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    eventually(
        Duration::from_secs(60),
        "the foreground cluster to be ready",
        || dir.join("dev.ready").exists().then_some(()),
    );
    let mut pids: Vec<i32> = paddock_harness::DAEMONS
        .iter()
        .map(|n| pid_of(&dir, n))
        .collect();
    pids.push(pid_of(&dir, "postgres"));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let out = {
        let st = child.wait().unwrap();
        assert!(st.success(), "{st}");
        let mut s = String::new();
        std::io::Read::read_to_string(child.stdout.as_mut().unwrap(), &mut s).unwrap();
        s
    };
    assert!(out.contains("Paddock dev cluster is up"), "{out}");
    let left: Vec<i32> = pids.into_iter().filter(|p| alive(*p)).collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// What a killed supervisor leaves behind is stopped, found through the daemons'
/// flock'd pid files and PostgreSQL's own postmaster.pid; pid files that prove
/// nothing (no lock held, no matching command line) name a live stranger here, and
/// the stranger must not be signalled.
#[test]
fn dev_down_after_a_killed_supervisor_stops_its_leftovers_and_no_stranger() {
    let t = TestDir::new("devstale");
    let dir = t.path().join("cluster");
    let d = dir.to_str().unwrap();
    let _down = Down(dir.clone());
    ok(paddock(&dir, &["dev", "up", "--dir", d, "--detach"]));
    let mut ours: Vec<i32> = paddock_harness::DAEMONS
        .iter()
        .map(|n| pid_of(&dir, n))
        .collect();
    ours.push(pid_of(&dir, "postgres"));
    // The supervisor dies without cleaning up: daemons and PostgreSQL run on.
    let supervisor = pid_of(&dir, "supervisor");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(supervisor),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    eventually(Duration::from_secs(10), "the supervisor gone", || {
        (!alive(supervisor)).then_some(())
    });
    assert!(
        ours.iter().all(|p| alive(*p)),
        "leftovers to stop: {ours:?}"
    );

    // A live process that is none of ours, named by every kind of stale pid file.
    let mut stranger = Command::new("sleep").arg("120").spawn().unwrap();
    let s = stranger.id().to_string();
    std::fs::write(dir.join("dev.lock"), &s).unwrap(); // nobody holds it now
    std::fs::write(dir.join("state/ghost.pid"), &s).unwrap(); // no daemon holds it
    let shim_dir = dir.join("state/runner/instances/stale");
    std::fs::create_dir_all(&shim_dir).unwrap();
    std::fs::write(shim_dir.join("shim.pid"), &s).unwrap(); // not a paddock-shim
    std::fs::create_dir_all(dir.join("run")).unwrap();
    std::fs::write(dir.join("run/postgres.pid"), &s).unwrap(); // an older dev's file
    std::fs::write(dir.join("dev.pid"), &s).unwrap();

    let down = ok(paddock(&dir, &["dev", "down", "--dir", d]));
    assert!(down.contains("stopped"), "{down}");
    assert!(
        stranger.try_wait().unwrap().is_none(),
        "dev down signalled a process named only by a stale pid file"
    );
    let left: Vec<i32> = ours.iter().copied().filter(|p| alive(*p)).collect();
    assert!(left.is_empty(), "leftovers still running: {left:?}");
    for stale in [
        dir.join("dev.lock"),
        dir.join("state/ghost.pid"),
        shim_dir.join("shim.pid"),
        dir.join("run/postgres.pid"),
        dir.join("dev.pid"),
    ] {
        assert!(!stale.exists(), "{} is removed", stale.display());
    }
    let _ = stranger.kill();
    let _ = stranger.wait();
}

/// A dev dir someone else owns (or can write to) is refused before anything in it
/// is read, written or trusted.
#[test]
fn dev_up_refuses_a_dir_owned_by_someone_else() {
    let t = TestDir::new("devowner");
    let dir = t.path().join("planted");
    std::fs::create_dir(&dir).unwrap();
    std::os::unix::fs::chown(&dir, Some(65534), Some(65534)).unwrap();
    let out = paddock(
        &dir,
        &["dev", "up", "--dir", dir.to_str().unwrap(), "--detach"],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("owned by you"), "{err}");
    assert!(
        !dir.join("logs").exists()
            || std::fs::read_dir(dir.join("logs"))
                .unwrap()
                .next()
                .is_none()
    );
    assert!(
        !dir.join("dev.lock").exists(),
        "nothing was written into it"
    );
}

/// The balancer under `paddock dev`: its listening sockets are held by the
/// supervisor, so `kill -9` refuses no connection; an upgrade (SIGUSR2) hands
/// over to a successor the supervisor then watches and restarts in turn.
#[test]
fn dev_holds_the_balancers_sockets_across_kill_9_and_adopts_an_upgrade() {
    let t = TestDir::new("dev-bal");
    let dir = t.path().join("cluster");
    let d = dir.to_str().unwrap();
    let _down = Down(dir.clone());
    ok(paddock(&dir, &["dev", "up", "--dir", d, "--detach"]));
    let cfg = paddock_config::ClusterConfig::load(&dir.join("paddock.toml")).unwrap();
    let http: std::net::SocketAddr = cfg.file.daemons["balancer"]
        .endpoint("http")
        .unwrap()
        .trim_start_matches("tcp://")
        .parse()
        .unwrap();
    let supervisor = pid_of(&dir, "supervisor");
    // Connections keep being accepted (by the kernel) while the balancer is dead.
    let prober = std::thread::spawn(move || {
        let (mut ok, mut refused) = (0, 0);
        let until = std::time::Instant::now() + Duration::from_secs(4);
        // Every request is answered (404: no route), the one cut by the kill
        // aside: a connection made while no balancer runs waits in the held
        // socket's queue and is served by the next one.
        while std::time::Instant::now() < until {
            match paddock_integration::http::get(http, "nowhere.localhost", "/") {
                Ok(r) if r.status == 404 => ok += 1,
                _ => refused += 1,
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        (ok, refused)
    });
    std::thread::sleep(Duration::from_millis(300));
    let first = pid_of(&dir, "balancer");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(first),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let second = replaced(
        &dir,
        "balancer",
        first,
        "a new balancer",
        Duration::from_secs(10),
    );
    let (connected, refused) = prober.join().unwrap();
    assert!(refused <= 1, "{refused} not answered, {connected} answered");
    let r = paddock_integration::http::get(http, "nowhere.localhost", "/").unwrap();
    assert_eq!(r.status, 404, "the restarted balancer answers");

    // Upgrade: the successor holds the pid lock; the supervisor adopts it.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(second),
        nix::sys::signal::Signal::SIGUSR2,
    )
    .unwrap();
    let third = replaced(
        &dir,
        "balancer",
        second,
        "the successor",
        Duration::from_secs(15),
    );
    eventually(Duration::from_secs(10), "the old balancer gone", || {
        (!alive(second)).then_some(())
    });
    let ppid = std::fs::read_to_string(format!("/proc/{third}/stat")).unwrap();
    let ppid: i32 = ppid
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(
        ppid, supervisor,
        "the supervisor (a subreaper) is the successor's parent"
    );
    std::thread::sleep(Duration::from_millis(300));
    let log = std::fs::read_to_string(dir.join("logs/supervisor.log")).unwrap_or_default();
    assert!(
        log.contains(&format!("handed over to pid {third}")),
        "{log}"
    );
    // Upgraded again, from the adopted one: followed too, nothing restarted beside it.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(third),
        nix::sys::signal::Signal::SIGUSR2,
    )
    .unwrap();
    let fourth = replaced(
        &dir,
        "balancer",
        third,
        "the second successor",
        Duration::from_secs(15),
    );
    eventually(Duration::from_secs(10), "the adopted balancer gone", || {
        (!alive(third)).then_some(())
    });
    std::thread::sleep(Duration::from_millis(1500));
    let log = std::fs::read_to_string(dir.join("logs/supervisor.log")).unwrap_or_default();
    assert!(
        log.contains(&format!("pid {third} handed over to pid {fourth}")),
        "{log}"
    );
    assert!(
        !log.contains("exit status: 69"),
        "a second balancer was started beside the successor:\n{log}"
    );
    let third = fourth;
    // And when the adopted one dies, it is restarted like any other.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(third),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    replaced(
        &dir,
        "balancer",
        third,
        "a balancer after the adopted one died",
        Duration::from_secs(10),
    );
    assert_eq!(
        paddock_integration::http::get(http, "nowhere.localhost", "/")
            .unwrap()
            .status,
        404
    );
    ok(paddock(&dir, &["dev", "down", "--dir", d]));
    assert!(!alive(third));
}

/// `paddock dev` is a subreaper (to watch an upgraded balancer), so a shim whose
/// runner was killed becomes its child: when that shim ends, the supervisor reaps
/// it, leaving no zombie.
#[test]
fn shims_orphaned_by_a_killed_runner_are_reaped_by_the_supervisor() {
    let t = TestDir::new("dev-reap");
    let dir = t.path().join("cluster");
    let d = dir.to_str().unwrap();
    let _down = Down(dir.clone());
    ok(paddock(&dir, &["dev", "up", "--dir", d, "--detach"]));
    let app_dir = t.path().join("app");
    std::fs::create_dir_all(&app_dir).unwrap();
    std::fs::copy(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/app.py"),
        app_dir.join("app.py"),
    )
    .unwrap();
    paddock_harness::allow_traverse(&app_dir).unwrap();
    let out = ok(paddock(
        &dir,
        &[
            "instance",
            "start",
            "--app",
            "reap",
            "--dir",
            app_dir.to_str().unwrap(),
            "--",
            "/usr/bin/python3",
            "-u",
            "app.py",
        ],
    ));
    let id = out.split_whitespace().nth(1).unwrap().to_string();
    let supervisor = pid_of(&dir, "supervisor");
    let runner = pid_of(&dir, "runner");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(runner),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    replaced(
        &dir,
        "runner",
        runner,
        "a new runner",
        Duration::from_secs(15),
    );
    // Its shim now has the supervisor as parent; stopping the instance ends it.
    eventually(Duration::from_secs(20), "the instance stopped", || {
        paddock(&dir, &["instance", "stop", &id])
            .status
            .success()
            .then_some(())
    });
    let zombies = || -> Vec<i32> {
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .filter(|pid| {
                let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                    return false;
                };
                let mut r = s.rsplit(')').next().unwrap_or("").split_whitespace();
                r.next() == Some("Z")
                    && r.next().and_then(|p| p.parse::<i32>().ok()) == Some(supervisor)
            })
            .collect()
    };
    std::thread::sleep(Duration::from_secs(3));
    eventually(
        Duration::from_secs(10),
        "no zombie under the supervisor",
        || zombies().is_empty().then_some(()),
    );
}

/// A customer of a dev cluster, made the README's way: the operator creates the
/// user; from then on they have only their credentials file, a HOME of their
/// own and an SSH key they add with `paddock keys add`.
struct Customer {
    home: std::path::PathBuf,
    key: std::path::PathBuf,
}

impl Customer {
    fn new(t: &TestDir, dir: &Path, name: &str) -> Customer {
        let creds = t.path().join(format!("{name}.credentials"));
        std::fs::write(&creds, ok(paddock(dir, &["users", "create", name]))).unwrap();
        let home = t.path().join(format!("home-{name}"));
        std::fs::create_dir_all(&home).unwrap();
        let c = Customer {
            key: home.join("id"),
            home,
        };
        ok(c.paddock(
            &c.home,
            &["login", "--credentials", creds.to_str().unwrap()],
        ));
        let st = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(&c.key)
            .status()
            .unwrap();
        assert!(st.success());
        ok(c.paddock(
            &c.home,
            &["keys", "add", c.key.with_extension("pub").to_str().unwrap()],
        ));
        c
    }

    /// The CLI as the customer runs it: no cluster file, their own HOME.
    fn paddock(&self, cwd: &Path, args: &[&str]) -> Output {
        Command::new(paddock_harness::bin("paddock").unwrap())
            .args(args)
            .current_dir(cwd)
            .env_remove("PADDOCK_CONFIG")
            .env("HOME", &self.home)
            .env("XDG_CONFIG_HOME", self.home.join("xdg"))
            .output()
            .unwrap()
    }

    fn git(&self, repo: &Path, args: &[&str]) -> Output {
        Command::new("git")
            .args(["-c", "user.name=a", "-c", "user.email=a@example.com"])
            .args(args)
            .current_dir(repo)
            .env("HOME", &self.home)
            .env(
                "GIT_SSH_COMMAND",
                format!(
                    "ssh -i {} -o IdentitiesOnly=yes -o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null",
                    self.key.display()
                ),
            )
            .output()
            .unwrap()
    }

    /// A repository of `files` committed on `main`, at HOME/NAME.
    fn repo(&self, name: &str, files: &[(&str, &str)]) -> std::path::PathBuf {
        let repo = self.home.join(name);
        std::fs::create_dir_all(&repo).unwrap();
        for (f, text) in files {
            std::fs::write(repo.join(f), text).unwrap();
        }
        for args in [
            &["init", "-q", "-b", "main"][..],
            &["add", "-A"],
            &["commit", "-qm", "first"],
        ] {
            let o = self.git(&repo, args);
            assert!(o.status.success(), "git {args:?}: {o:?}");
        }
        repo
    }

    /// `git push paddock main`: whether it succeeded, and what it printed.
    fn push(&self, repo: &Path) -> (bool, String) {
        let o = self.git(repo, &["push", "paddock", "main"]);
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stderr).to_string(),
        )
    }
}

/// The README's walk-through on a dev cluster with a blobstore pair: a customer
/// with only their credentials adds a key, creates an app, adds its remote and
/// pushes; the build streams back, the release's slug is on both blobstores,
/// `paddock builds` lists it, and `dev down` stops the pair's second member too.
#[test]
fn a_push_to_a_dev_cluster_lands_on_both_blobstores() {
    let t = TestDir::new("devpush");
    let dir = t.path().join("cluster");
    let d = dir.to_str().unwrap();
    let _down = Down(dir.clone());
    let out = ok(paddock(
        &dir,
        &["dev", "up", "--dir", d, "--detach", "--blobstores", "2"],
    ));
    assert!(out.contains("git push   ssh://git@127.0.0.1:"), "{out}");
    let second = paddock_harness::pidfile::read_pid(&dir.join("state/blobstore-2/blobstore.pid"))
        .expect("the second blobstore's pid file");
    assert!(alive(second));

    let alice = Customer::new(&t, &dir, "alice");
    let app = alice.repo(
        "shop",
        &[
            ("Procfile", "web: python3 -m http.server $PORT\n"),
            ("index.html", "hi\n"),
        ],
    );
    let created = ok(alice.paddock(&app, &["apps", "create", "shop"]));
    assert!(
        created.contains("Git remote: ssh://git@127.0.0.1:"),
        "{created}"
    );
    ok(alice.paddock(&app, &["git", "remote", "-a", "shop"]));
    let (pushed, log) = alice.push(&app);
    assert!(pushed, "{log}");
    assert!(
        log.contains("remote: -----> Procfile app detected"),
        "{log}"
    );
    assert!(log.contains("Done: shop v2"), "{log}");

    let builds = ok(alice.paddock(&app, &["builds"]));
    assert!(
        builds.contains("succeeded") && builds.contains("v2"),
        "{builds}"
    );
    let rel: serde_json::Value =
        serde_json::from_str(&ok(alice.paddock(&app, &["--json", "releases"]))).unwrap();
    let slug = rel["releases"][0]["slug"].as_str().unwrap().to_string();
    for store in ["state/blobstore", "state/blobstore-2/blobstore"] {
        let p = dir.join(store).join("blobs").join(&slug[..2]).join(&slug);
        assert!(p.exists(), "the slug is not in {store}");
    }
    ok(paddock(&dir, &["dev", "down", "--dir", d]));
    assert!(!alive(second), "dev down left the second blobstore running");
}

/// The README's end-to-end walk-through, as a newcomer on a fresh machine does
/// it: `dev up --runners 2`; the operator creates a user; the user logs in, adds
/// an SSH key, creates an app and pushes the Flask app from docs/examples; the
/// push returns only once the release serves, and `http://APP.<apps_domain>:PORT/`
/// answers 200 through the balancer. A second push rolls out on the other
/// runner while the first keeps serving, and `/kill` is survived.
#[test]
fn readme_walkthrough_push_flask_and_get_200_through_the_balancer() {
    let t = TestDir::new("devflask");
    let dir = t.path().join("cluster");
    let d = dir.to_str().unwrap();
    let _down = Down(dir.clone());
    let out = ok(paddock(
        &dir,
        &["dev", "up", "--dir", d, "--detach", "--runners", "2"],
    ));
    let cfg = paddock_config::ClusterConfig::load(&dir.join("paddock.toml")).unwrap();
    let http = cfg.file.daemons["balancer"]
        .endpoint("http")
        .unwrap()
        .trim_start_matches("tcp://")
        .to_string();
    assert!(out.contains(&format!("http://{http}/")), "{out}");
    let status = ok(paddock(&dir, &["status"]));
    assert!(
        status.contains("dev-2") && status.contains("scheduler"),
        "{status}"
    );

    let bob = Customer::new(&t, &dir, "bob");
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/examples/flask-hello");
    let files: Vec<(String, String)> = std::fs::read_dir(&example)
        .unwrap()
        .flatten()
        .map(|e| {
            (
                e.file_name().to_string_lossy().to_string(),
                std::fs::read_to_string(e.path()).unwrap(),
            )
        })
        .collect();
    assert!(files.iter().any(|(f, _)| f == "Procfile"));
    let files: Vec<(&str, &str)> = files
        .iter()
        .map(|(f, t)| (f.as_str(), t.as_str()))
        .collect();
    let repo = bob.repo("hello", &files);
    let created = ok(bob.paddock(&repo, &["apps", "create", "hello"]));
    assert!(created.contains("http://hello.localhost"), "{created}");
    ok(bob.paddock(&repo, &["git", "remote", "-a", "hello"]));
    let (pushed, log) = bob.push(&repo);
    assert!(pushed, "{log}");
    assert!(log.contains("remote: -----> Python app detected"), "{log}");
    assert!(log.contains("Rolling out v2"), "{log}");
    assert!(log.contains("up on dev"), "{log}");
    assert!(log.contains("Done: hello v2 is serving"), "{log}");

    // Served the moment the push returned: no wait, no retry.
    let addr: std::net::SocketAddr = http.parse().unwrap();
    let r = http::get(addr, "hello.localhost", "/").unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.text(), "Hello from Paddock!\n");

    // /kill ends the process; the runner starts it again and it serves.
    let _ = http::get(addr, "hello.localhost", "/kill");
    eventually(Duration::from_secs(20), "hello serving after /kill", || {
        http::get(addr, "hello.localhost", "/")
            .ok()
            .filter(|r| r.status == 200)
    });

    // A second push rolls v3 out beside v2 (web=1: surge 1 means the other
    // runner gets it, both nodes being free) while requests keep succeeding.
    std::fs::write(repo.join("NEWS"), "v3\n").unwrap();
    for args in [&["add", "-A"][..], &["commit", "-qm", "v3"]] {
        let o = bob.git(&repo, args);
        assert!(o.status.success(), "git {args:?}: {o:?}");
    }
    let load = http::Load::start(addr, "hello.localhost", "/", 2);
    let (pushed, log) = bob.push(&repo);
    let report = load.finish();
    assert!(pushed, "{log}");
    assert!(log.contains("Done: hello v3 is serving"), "{log}");
    assert!(log.contains("draining"), "{log}");
    assert!(report.ok > 0, "{report:?}");
    assert_eq!(
        report.failed, 0,
        "requests failed during the rollout: {report:?}"
    );
    let ps: serde_json::Value =
        serde_json::from_str(&ok(paddock(&dir, &["--json", "instance", "ps"]))).unwrap();
    let live: Vec<&serde_json::Value> = ps
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["app"] == "hello" && i["state"] == "up")
        .collect();
    assert_eq!(live.len(), 1, "{ps}");
    assert_eq!(live[0]["release"], 3, "{ps}");
    // `dev down` stops the second runner and every app process too.
    let runner2 = paddock_harness::pidfile::read_pid(&dir.join("state/runner-2/runner.pid"))
        .expect("the second runner's pid file");
    assert!(alive(runner2));
    let app_pid = live[0]["pid"].as_i64().expect("the instance's pid") as i32;
    assert!(alive(app_pid));
    ok(paddock(&dir, &["dev", "down", "--dir", d]));
    assert!(!alive(runner2), "dev down left the second runner running");
    assert!(!alive(app_pid), "dev down left the app running");
}
