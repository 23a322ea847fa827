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

    // The operator makes alice; from then on she has only her credentials.
    let creds = t.path().join("alice.credentials");
    std::fs::write(&creds, ok(paddock(&dir, &["users", "create", "alice"]))).unwrap();
    let home = t.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    let alice = |cwd: &Path, args: &[&str]| -> Output {
        Command::new(paddock_harness::bin("paddock").unwrap())
            .args(args)
            .current_dir(cwd)
            .env_remove("PADDOCK_CONFIG")
            .env("HOME", &home)
            .env("XDG_CONFIG_HOME", home.join("xdg"))
            .output()
            .unwrap()
    };
    ok(alice(
        &home,
        &["login", "--credentials", creds.to_str().unwrap()],
    ));
    let key = home.join("id");
    let st = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&key)
        .status()
        .unwrap();
    assert!(st.success());
    ok(alice(
        &home,
        &["keys", "add", key.with_extension("pub").to_str().unwrap()],
    ));
    let app = home.join("shop");
    std::fs::create_dir_all(&app).unwrap();
    std::fs::write(app.join("Procfile"), "web: python3 -m http.server $PORT\n").unwrap();
    std::fs::write(app.join("index.html"), "hi\n").unwrap();
    let git = |args: &[&str]| -> Output {
        Command::new("git")
            .args(args)
            .current_dir(&app)
            .env("HOME", &home)
            .env(
                "GIT_SSH_COMMAND",
                format!(
                    "ssh -i {} -o IdentitiesOnly=yes -o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null",
                    key.display()
                ),
            )
            .output()
            .unwrap()
    };
    for args in [
        &["init", "-q", "-b", "main"][..],
        &[
            "-c",
            "user.name=a",
            "-c",
            "user.email=a@example.com",
            "add",
            "-A",
        ],
        &[
            "-c",
            "user.name=a",
            "-c",
            "user.email=a@example.com",
            "commit",
            "-qm",
            "first",
        ],
    ] {
        let o = git(args);
        assert!(o.status.success(), "git {args:?}: {o:?}");
    }
    let created = ok(alice(&app, &["apps", "create", "shop"]));
    assert!(
        created.contains("Git remote: ssh://git@127.0.0.1:"),
        "{created}"
    );
    ok(alice(&app, &["git", "remote", "-a", "shop"]));
    let pushed = git(&["push", "paddock", "main"]);
    let log = String::from_utf8_lossy(&pushed.stderr).to_string();
    assert!(pushed.status.success(), "{log}");
    assert!(
        log.contains("remote: -----> Procfile app detected"),
        "{log}"
    );
    assert!(log.contains("Done: shop v2"), "{log}");

    let builds = ok(alice(&app, &["builds"]));
    assert!(
        builds.contains("succeeded") && builds.contains("v2"),
        "{builds}"
    );
    let rel: serde_json::Value =
        serde_json::from_str(&ok(alice(&app, &["--json", "releases"]))).unwrap();
    let slug = rel["releases"][0]["slug"].as_str().unwrap().to_string();
    for store in ["state/blobstore", "state/blobstore-2/blobstore"] {
        let p = dir.join(store).join("blobs").join(&slug[..2]).join(&slug);
        assert!(p.exists(), "the slug is not in {store}");
    }
    ok(paddock(&dir, &["dev", "down", "--dir", d]));
    assert!(!alive(second), "dev down left the second blobstore running");
}
