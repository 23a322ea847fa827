//! The runner with real processes, real users and real cgroups, around a Python
//! stdlib HTTP app (integration/fixtures/app.py).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use paddock_integration::*;
use paddock_wire::kinds::{InstanceInfo, InstanceList, LogLines};
use paddock_wire::{Client, Subscriber};
use serde_json::{json, Value};

/// Fields drop in order: the node (its daemons and shims) before the directory.
struct Runner {
    node: Node,
    app_dir: PathBuf,
    c: Client,
    _t: TestDir,
}

fn runner(name: &str) -> Runner {
    runner_with(name, &[])
}

/// A runner with these `[daemons.runner]` settings on top of the fast test policy.
fn runner_with(name: &str, settings: &[(&str, i64)]) -> Runner {
    let t = TestDir::new(name);
    let key = test_key();
    let mut node = Node::new(t.path(), "node-a", &key, &[], None);
    {
        let r = node.file.daemons.get_mut("runner").unwrap();
        // Fast policy for tests.
        for (k, v) in [
            ("backoff_base_ms", 50),
            ("backoff_cap_ms", 400),
            ("health_interval_ms", 300),
            ("stop_grace_ms", 2000),
        ]
        .into_iter()
        .chain(settings.iter().copied())
        {
            r.other.insert(k.into(), toml::Value::Integer(v));
        }
    }
    node.save();
    let app_dir = t.path().join("app");
    std::fs::create_dir_all(&app_dir).unwrap();
    use std::os::unix::fs::PermissionsExt;
    for f in ["app.py", "bomb.py", "hog.py"] {
        std::fs::copy(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("fixtures")
                .join(f),
            app_dir.join(f),
        )
        .unwrap();
        std::fs::set_permissions(app_dir.join(f), std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    std::fs::set_permissions(&app_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    paddock_harness::allow_traverse(&app_dir).unwrap();
    paddock_harness::allow_traverse(&t.path().join("node-a")).unwrap();
    node.start("runner");
    let c = node.client("runner");
    Runner {
        _t: t,
        node,
        app_dir,
        c,
    }
}

impl Runner {
    fn start(&mut self, app: &str, extra: Value) -> (String, u16) {
        let mut body = json!({
            "app": app, "proc": "web", "dir": self.app_dir, "command": "python3 -u app.py",
            "health": {"http": "/"}, "limits": {"memory_mb": 256, "pids": 64},
        });
        if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                b.insert(k.clone(), v.clone());
            }
        }
        let v = self.c.call("instance.start", body).expect("instance.start");
        (
            v["id"].as_str().unwrap().to_string(),
            v["port"].as_u64().unwrap() as u16,
        )
    }

    fn info(&mut self, id: &str) -> InstanceInfo {
        let l: InstanceList =
            serde_json::from_value(self.c.call("instance.list", json!({})).unwrap()).unwrap();
        l.instances
            .into_iter()
            .find(|i| i.id == id)
            .expect("instance listed")
    }

    fn wait_state(&mut self, id: &str, state: &str, timeout: Duration) -> InstanceInfo {
        let mut last = None;
        let r = (|| {
            let deadline = std::time::Instant::now() + timeout;
            while std::time::Instant::now() < deadline {
                let i = self.info(id);
                if i.state == state {
                    return Some(i);
                }
                last = Some(i);
                std::thread::sleep(Duration::from_millis(20));
            }
            None
        })();
        r.unwrap_or_else(|| panic!("{id} not {state} within {timeout:?}; last: {last:?}"))
    }

    fn logs(&mut self, id: &str) -> Vec<String> {
        let l: LogLines = serde_json::from_value(
            self.c
                .call("instance.logs", json!({"id": id, "lines": 1000}))
                .unwrap(),
        )
        .unwrap();
        l.lines.into_iter().map(|l| l.line).collect()
    }
}

fn get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let code = out.split_whitespace().nth(1)?.parse().ok()?;
    let body = out.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    Some((code, body))
}

use paddock_harness::process_alive as pid_alive;

/// The instance's directory on the runner.
fn inst_dir(r: &Runner, id: &str) -> PathBuf {
    r.node.dir.join("state/runner/instances").join(id)
}

/// Live (not zombie) processes of an instance, by scanning /proc: its shims
/// (`paddock-shim <its dir>`) and its app processes (PADDOCK_INSTANCE=<id>). A
/// shim's child between fork and exec still shows the shim's command line: it is
/// counted with the apps (it is about to be one), not as a second shim.
fn processes_of(r: &Runner, id: &str) -> (Vec<i32>, Vec<i32>) {
    let (shims, mut apps) = processes_of_raw(r, id);
    let ppid = |p: i32| -> Option<i32> {
        let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
        stat.rsplit(") ").next()?.split(' ').nth(1)?.parse().ok()
    };
    // A shim's child between fork and exec still looks like the shim: it counts
    // as the app. One that is gone by now (killed before its exec, as a stop
    // right after a start does) counts as neither.
    let parents: Vec<(i32, Option<i32>)> = shims.iter().map(|p| (*p, ppid(*p))).collect();
    let mut real = Vec::new();
    for (p, pp) in parents {
        match pp {
            Some(pp) if shims.contains(&pp) => apps.push(p),
            Some(_) => real.push(p),
            None => {}
        }
    }
    (real, apps)
}

fn processes_of_raw(r: &Runner, id: &str) -> (Vec<i32>, Vec<i32>) {
    let dir = inst_dir(r, id).display().to_string();
    let marker = format!("PADDOCK_INSTANCE={id}");
    let (mut shims, mut apps) = (vec![], vec![]);
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        if stat.is_empty() || stat.contains(") Z ") {
            continue;
        }
        let cmdline =
            String::from_utf8_lossy(&std::fs::read(e.path().join("cmdline")).unwrap_or_default())
                .replace('\0', " ");
        if cmdline.contains("paddock-shim") && cmdline.contains(&dir) {
            shims.push(pid);
            continue;
        }
        let environ = std::fs::read(e.path().join("environ")).unwrap_or_default();
        if environ.split(|b| *b == 0).any(|v| v == marker.as_bytes()) {
            apps.push(pid);
        }
    }
    (shims, apps)
}

/// The fd numbers a process holds.
fn fds(pid: i32) -> Vec<i32> {
    let mut v: Vec<i32> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse().ok())
        .collect();
    v.sort();
    v
}

/// A line's value from /proc/PID/status.
fn status(pid: i32, field: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix(&format!("{field}:"))
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

fn proc_uid(pid: i32) -> u32 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find(|l| l.starts_with("Uid:"))
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn killed_app_is_restarted_at_once_and_serves_again() {
    let mut r = runner("rkill");
    let sub_ep = tcp(r.node.ports.runner_pub);
    let mut sub = Subscriber::connect(&[sub_ep], &["instance."], r.node.keys.clone()).unwrap();
    let (id, port) = r.start("hello", json!({}));
    let up = r.wait_state(&id, "up", Duration::from_secs(20));
    let (code, body) = get(port, "/").unwrap();
    assert_eq!(code, 200);
    assert!(body.contains(&id), "{body}");
    let pid = up.pid.unwrap();
    // The tracked pid is the app's own (python), not a shell.
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap();
    assert!(comm.starts_with("python3"), "{comm}");
    assert_ne!(proc_uid(pid), 0, "never root");

    assert_eq!(get(port, "/kill").unwrap().0, 200);
    let after = eventually(Duration::from_secs(20), "a new process serving", || {
        let i = r.info(&id);
        (i.state == "up" && i.pid != Some(pid) && get(port, "/").map(|g| g.0) == Some(200))
            .then_some(i)
    });
    assert_eq!(after.restarts, 1);
    let e = after.last_exit.unwrap();
    assert_eq!(e.signal, Some(9), "{e:?}");
    assert!(!e.oom);
    // Events: up, down, up.
    let mut kinds = Vec::new();
    while let Some(ev) = sub.next(Duration::from_millis(300)).unwrap() {
        kinds.push(ev.kind);
    }
    assert_eq!(kinds, ["instance.up", "instance.down", "instance.up"]);
    // Logs: captured line by line from the app itself, timestamped.
    let logs = r.logs(&id);
    assert!(
        logs.iter()
            .filter(|l| l.starts_with("app starting"))
            .count()
            >= 2,
        "{logs:?}"
    );
    assert!(logs.iter().any(|l| l.contains("GET /kill")), "{logs:?}");
}

#[test]
fn crash_loop_backs_off_then_is_crashed_and_normal_exit_is_not_restarted() {
    let mut r = runner("rloop");
    let (id, _) = r.start(
        "looper",
        json!({"env": {"APP_EXIT_CODE": "3"}, "health": {"none": true},
               "restart": {"limit": 4, "window_ms": 60000, "backoff_base_ms": 200, "backoff_cap_ms": 800}}),
    );
    let crashed = r.wait_state(&id, "crashed", Duration::from_secs(20));
    assert_eq!(crashed.restarts, 4);
    // Backoff: the first restart at once, then 200, 400, 800 ms (capped) between
    // an exit and the next start. The starts' log times show the gaps.
    let starts: Vec<i64> = {
        let l: LogLines = serde_json::from_value(
            r.c.call("instance.logs", json!({"id": id, "lines": 1000}))
                .unwrap(),
        )
        .unwrap();
        l.lines
            .iter()
            .filter(|l| l.line.starts_with("app starting"))
            .map(|l| l.ts)
            .collect()
    };
    assert_eq!(starts.len(), 5, "{starts:?}");
    let gaps: Vec<i64> = starts.windows(2).map(|w| w[1] - w[0]).collect();
    for (i, min) in [(1, 200), (2, 400), (3, 800)] {
        assert!(
            gaps[i] >= min,
            "gap {i} is {} ms < {min}: {gaps:?}",
            gaps[i]
        );
    }
    assert_eq!(crashed.last_exit.as_ref().unwrap().code, Some(3));
    assert!(
        crashed
            .reason
            .as_deref()
            .unwrap_or("")
            .contains("4 restarts"),
        "{crashed:?}"
    );
    // Normal exit codes end the instance without a restart.
    let (id2, _) = r.start(
        "normal",
        json!({"env": {"APP_EXIT_CODE": "0", "APP_EXIT_AFTER": "0.3"}, "health": {"none": true},
               "restart": {"normal_exit": [0]}}),
    );
    let stopped = r.wait_state(&id2, "stopped", Duration::from_secs(20));
    assert_eq!(stopped.restarts, 0);
    assert_eq!(stopped.last_exit.unwrap().code, Some(0));
}

#[test]
fn stop_kills_grandchildren_and_term_ignorers() {
    let mut r = runner("rstop");
    // The app ignores TERM, so only the kill at the end of the grace period ends it.
    let (id, port) = r.start(
        "stopper",
        json!({"stop_grace_ms": 1000, "env": {"APP_IGNORE_TERM": "1"}}),
    );
    let up = r.wait_state(&id, "up", Duration::from_secs(20));
    let sleeper: i32 = get(port, "/spawn").unwrap().1.trim().parse().unwrap();
    assert!(pid_alive(sleeper));
    // The double-forked, setsid'd sleeper ignores TERM.
    let asked = paddock_wire::now_ms();
    r.c.call("instance.stop", json!({"id": id})).unwrap();
    let stopped = r.wait_state(&id, "stopped", Duration::from_secs(10));
    let e = stopped.last_exit.unwrap();
    assert_eq!(e.signal, Some(9), "killed, not ended by TERM: {e:?}");
    assert!(
        e.at - asked >= 1000,
        "killed only after the grace period: {} ms",
        e.at - asked
    );
    for p in [up.pid.unwrap(), sleeper] {
        assert!(!pid_alive(p), "pid {p} survived the stop");
    }
}

#[test]
fn apps_run_as_their_own_users_and_cannot_read_each_other() {
    let mut r = runner("rusers");
    let (a, pa) = r.start("alpha", json!({}));
    let (b, pb) = r.start("beta", json!({}));
    r.wait_state(&a, "up", Duration::from_secs(20));
    r.wait_state(&b, "up", Duration::from_secs(20));
    let ida: Value = serde_json::from_str(&get(pa, "/id").unwrap().1).unwrap();
    let idb: Value = serde_json::from_str(&get(pb, "/id").unwrap().1).unwrap();
    assert_ne!(ida["uid"], 0);
    assert_ne!(ida["uid"], idb["uid"], "different apps, different users");
    assert_eq!(ida["umask"], 0o077);
    // alpha's private file (written by alpha into its HOME, mode 0600 by umask).
    let env_a: Value = serde_json::from_str(&get(pa, "/env").unwrap().1).unwrap();
    let secret = PathBuf::from(env_a["HOME"].as_str().unwrap()).join("secret");
    std::fs::write(&secret, "s3cret").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::chown(
        &secret,
        Some(ida["uid"].as_u64().unwrap() as u32),
        Some(ida["gid"].as_u64().unwrap() as u32),
    )
    .unwrap();
    let q = format!("/read?p={}", secret.display());
    assert_eq!(get(pa, &q).unwrap().0, 200, "alpha reads its own file");
    let (code, why) = get(pb, &q).unwrap();
    assert_eq!(code, 403, "beta must not read alpha's file: {why}");
    // The cluster file (the cluster key) is unreadable to apps.
    let (code, _) = get(pa, &format!("/read?p={}", r.node.config.display())).unwrap();
    assert_eq!(code, 403);
    // A clean environment: nothing of the runner's leaks in.
    let env_b: Value = serde_json::from_str(&get(pb, "/env").unwrap().1).unwrap();
    let keys: Vec<&String> = env_b.as_object().unwrap().keys().collect();
    for k in [
        "PATH",
        "LANG",
        "HOME",
        "TMPDIR",
        "PORT",
        "PADDOCK_APP",
        "PADDOCK_PROC",
        "PADDOCK_INSTANCE",
    ] {
        assert!(env_b.get(k).is_some(), "{k} missing: {keys:?}");
    }
    assert!(
        env_b.get("PADDOCK_CONFIG").is_none() && env_b.get("CARGO").is_none(),
        "{keys:?}"
    );
    assert_eq!(env_b["PORT"], pb.to_string());
    assert_eq!(env_b["PATH"], "/usr/local/bin:/usr/bin:/bin");
}

#[test]
fn an_unreadable_dir_is_a_clear_error_and_changes_nothing() {
    let mut r = runner("rdir");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&r.app_dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    let err =
        r.c.call(
            "instance.start",
            json!({"app": "nope", "proc": "web", "dir": r.app_dir, "command": "python3 app.py"}),
        )
        .unwrap_err();
    assert_eq!(err.code(), Some(&paddock_wire::Code::Invalid), "{err}");
    assert!(err.to_string().contains("not readable"), "{err}");
    let l: InstanceList =
        serde_json::from_value(r.c.call("instance.list", json!({})).unwrap()).unwrap();
    assert!(l.instances.is_empty());
    let err =
        r.c.call(
            "instance.start",
            json!({"app": "Bad Name", "proc": "web", "dir": "/", "command": "x"}),
        )
        .unwrap_err();
    assert!(err.to_string().contains("`app`"), "{err}");
}

#[test]
fn memory_hog_is_limited_and_reported_as_oom() {
    let mut r = runner("room");
    let (id, port) = r.start(
        "hog",
        json!({"limits": {"memory_mb": 64, "pids": 64}, "restart": {"limit": 0}}),
    );
    r.wait_state(&id, "up", Duration::from_secs(20));
    let _ = get(port, "/hog");
    let i = r.wait_state(&id, "crashed", Duration::from_secs(30));
    let e = i.last_exit.unwrap();
    assert!(e.oom, "{e:?}");
    assert!(e.reason.contains("OOM"), "{e:?}");
}

#[test]
fn a_fork_bomb_is_contained() {
    let mut r = runner("rbomb");
    let (good, gport) = r.start("calm", json!({}));
    let (bomb, bport) = r.start("bomb", json!({"limits": {"memory_mb": 256, "pids": 40}}));
    r.wait_state(&good, "up", Duration::from_secs(20));
    r.wait_state(&bomb, "up", Duration::from_secs(20));
    let _ = get(bport, "/bomb");
    eventually(
        Duration::from_secs(10),
        "the bomb to hit its pids limit",
        || {
            r.logs(&bomb)
                .into_iter()
                .find(|l| l.contains("fork failed") || l.contains("forked"))
        },
    );
    // The pids cgroup stopped it (40), not RLIMIT_NPROC (8 x 40 per user).
    let line = r
        .logs(&bomb)
        .into_iter()
        .find(|l| l.contains("fork failed") || l.contains("forked"))
        .unwrap();
    let n: u32 = line
        .strip_prefix("fork failed after ")
        .and_then(|t| t.split(':').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("not stopped by a limit: {line}"));
    assert!(n < 40, "{line}");
    let events = Path::new("/sys/fs/cgroup/pids/paddock")
        .join(&bomb)
        .join("pids.events");
    if let Ok(ev) = std::fs::read_to_string(&events) {
        assert!(!ev.contains("max 0"), "the pids limit was hit: {ev}");
    }
    // The runner and the other app are fine.
    assert_eq!(get(gport, "/").unwrap().0, 200);
    r.c.call("ping", json!({})).unwrap();
    // And stopping the bomb takes every one of its processes.
    r.c.call("instance.stop", json!({"id": bomb})).unwrap();
    r.wait_state(&bomb, "stopped", Duration::from_secs(15));
    assert_eq!(get(gport, "/").unwrap().0, 200);
}

#[test]
fn runner_kill_9_keeps_instances_and_their_logs() {
    let mut r = runner("radopt");
    let (id, port) = r.start("keeper", json!({}));
    let up = r.wait_state(&id, "up", Duration::from_secs(20));
    r.node.kill9("runner");
    // The app keeps serving with no runner at all.
    assert_eq!(get(port, "/").unwrap().0, 200);
    r.node.start("runner");
    r.c = r.node.client("runner");
    let again = r.wait_state(&id, "up", Duration::from_secs(20));
    assert_eq!(again.pid, up.pid, "the same process, re-adopted");
    // Logs keep flowing: a request after the restart shows up.
    get(port, "/after-restart").unwrap();
    eventually(Duration::from_secs(5), "the new log line", || {
        r.logs(&id)
            .iter()
            .any(|l| l.contains("/after-restart"))
            .then_some(())
    });
    // And it is still supervised: a kill is restarted by the new runner.
    get(port, "/kill");
    eventually(Duration::from_secs(20), "restart after re-adoption", || {
        let i = r.info(&id);
        (i.state == "up" && i.pid != up.pid).then_some(())
    });
}

#[test]
fn one_off_commands_run_on_a_pty_as_the_app_user() {
    let mut r = runner("rpty");
    let dir = r.app_dir.clone();
    let start = |c: &mut Client, cmd: &str| -> String {
        let v = c
            .call(
                "run.start",
                json!({"app": "ptyapp", "dir": dir, "command": cmd, "cols": 100, "rows": 30}),
            )
            .unwrap();
        v["id"].as_str().unwrap().to_string()
    };
    let id = start(&mut r.c, "tty");
    let (out, code) = run_to_end(&mut r.c, &id);
    assert!(out.trim().starts_with("/dev/pts/"), "{out:?}");
    assert_eq!(code, 0);
    let id = start(&mut r.c, "python3 -c \"import sys,os;print(sys.stdin.isatty(), os.getuid()!=0, os.get_terminal_size())\"");
    let (out, _) = run_to_end(&mut r.c, &id);
    assert!(
        out.contains("True True os.terminal_size(columns=100, lines=30)"),
        "{out:?}"
    );
    let id = start(&mut r.c, "sh -c 'exit 7'");
    assert_eq!(run_to_end(&mut r.c, &id).1, 7, "exit codes propagate");

    // Input, line editing and Ctrl-C reach the remote process through the PTY.
    use base64::Engine;
    let b64 = |s: &[u8]| base64::engine::general_purpose::STANDARD.encode(s);
    let id = start(
        &mut r.c,
        "python3 -c \"import sys; l=input('name? '); print('hi', l); input()\"",
    );
    r.c.call("run.input", json!({"id": id, "data": b64(b"bobx\x7f\r")}))
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    r.c.call("run.resize", json!({"id": id, "cols": 120, "rows": 40}))
        .unwrap();
    r.c.call("run.input", json!({"id": id, "data": b64(b"\x03")}))
        .unwrap();
    let (out, code) = run_to_end(&mut r.c, &id);
    assert!(
        out.contains("hi bob\r\n"),
        "the backspace was edited away: {out:?}"
    );
    assert!(
        out.contains("KeyboardInterrupt"),
        "Ctrl-C became SIGINT: {out:?}"
    );
    assert_ne!(code, 0);
}

#[test]
fn reload_signals_the_app_and_failed_health_restarts_it_and_logs_reach_the_sink() {
    let mut r = runner("rreload");
    let pull = r.node.log_sink("runner");
    r.node.kill9("runner");
    r.node.start("runner");
    r.c = r.node.client("runner");
    let (id, port) = r.start(
        "reloader",
        json!({"reload_signal": "USR1", "health": {"http": "/"}, "health_interval_ms": 200}),
    );
    let up = r.wait_state(&id, "up", Duration::from_secs(20));
    // A log line arrives at the sink, signed.
    pull.set_rcvtimeo(5000).unwrap();
    let frames = pull.recv_multipart(0).expect("a log line at the sink");
    r.node.keys.verify(&frames[0], &frames[1]).expect("signed");
    let env: paddock_wire::Envelope = serde_json::from_slice(&frames[0]).unwrap();
    assert_eq!(env.kind, "log.line");
    assert_eq!(env.body["instance"], id.as_str());
    // USR1's default action ends python: the reload signal was delivered.
    r.c.call("instance.reload", json!({"id": id})).unwrap();
    let after = eventually(
        Duration::from_secs(20),
        "the reloaded app to be back",
        || {
            let i = r.info(&id);
            (i.state == "up" && i.pid != up.pid).then_some(i)
        },
    );
    assert_eq!(after.last_exit.unwrap().signal, Some(10));
    // A hung app (SIGSTOP) fails its liveness checks and is restarted.
    let pid = after.pid.unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGSTOP,
    )
    .unwrap();
    eventually(
        Duration::from_secs(30),
        "the hung app to be replaced",
        || {
            let i = r.info(&id);
            (i.state == "up" && i.pid != Some(pid) && get(port, "/").is_some()).then_some(())
        },
    );
    assert!(!pid_alive(pid));
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
fn the_cli_starts_lists_logs_stops_and_runs() {
    let mut r = runner("rcli");
    r.node.start("heartbeat");
    let dir = r.app_dir.display().to_string();
    let out = paddock(
        &r.node,
        &[
            "instance",
            "start",
            "--app",
            "cliapp",
            "--dir",
            &dir,
            "--health-http",
            "/",
            "--",
            "python3",
            "-u",
            "app.py",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let id = text.split_whitespace().nth(1).unwrap().to_string();
    r.wait_state(&id, "up", Duration::from_secs(20));
    let ps = String::from_utf8_lossy(&paddock(&r.node, &["instance", "ps"]).stdout).to_string();
    assert!(
        ps.contains(&id) && ps.contains("cliapp") && ps.contains("up"),
        "{ps}"
    );
    let logs =
        String::from_utf8_lossy(&paddock(&r.node, &["instance", "logs", &id]).stdout).to_string();
    assert!(logs.contains("app starting"), "{logs}");

    // paddock instance run: the remote side has a PTY even when ours is a pipe; exit codes propagate.
    let out = paddock(
        &r.node,
        &[
            "instance", "run", "-a", "cliapp", "--dir", &dir, "--", "tty",
        ],
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("/dev/pts/"),
        "{out:?}"
    );
    assert_eq!(out.status.code(), Some(0));
    let out = paddock(
        &r.node,
        &[
            "instance", "run", "--app", "cliapp", "--dir", &dir, "--", "sh", "-c", "exit 5",
        ],
    );
    assert_eq!(out.status.code(), Some(5), "{out:?}");
    // Several words are an argument list, passed as they are: no joining with
    // spaces, no re-splitting, no expansion by a shell.
    let out = paddock(
        &r.node,
        &[
            "instance", "run", "--app", "cliapp", "--dir", &dir, "--", "printf", "%s|", "a  b",
            "$HOME", "x;y",
        ],
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "a  b|$HOME|x;y|",
        "{out:?}"
    );

    // On a real terminal (script(1) gives one): raw mode while running, restored after.
    let bin = paddock_harness::bin("paddock").unwrap();
    let inner = format!(
        "{} instance run --app cliapp --dir {dir} -- 'python3 -c \"import sys;print(sys.stdin.isatty())\"'; stty -a",
        bin.display()
    );
    let out = std::process::Command::new("script")
        .args(["-q", "-e", "-c", &inner, "/dev/null"])
        .env("PADDOCK_CONFIG", &r.node.config)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(text.contains("True"), "{text}");
    assert!(
        text.contains(" icanon") && !text.contains("-icanon"),
        "the terminal was restored: {text}"
    );

    let out = paddock(&r.node, &["instance", "stop", &id]);
    assert!(out.status.success(), "{out:?}");
    r.wait_state(&id, "stopped", Duration::from_secs(10));
}

fn shim_pid(r: &Runner, id: &str) -> i32 {
    let p = r
        .node
        .dir
        .join("state/runner/instances")
        .join(id)
        .join("shim.pid");
    std::fs::read_to_string(p).unwrap().trim().parse().unwrap()
}

#[test]
fn a_dead_shim_crashes_only_its_own_instance_which_can_then_be_stopped_or_restarted() {
    let mut r = runner("rshim");
    let (a, _) = r.start("one", json!({}));
    let (b, pb) = r.start("two", json!({}));
    let a_up = r.wait_state(&a, "up", Duration::from_secs(20));
    let b_up = r.wait_state(&b, "up", Duration::from_secs(20));
    let a_pid = a_up.pid.unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(shim_pid(&r, &a)),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let crashed = r.wait_state(&a, "crashed", Duration::from_secs(10));
    assert!(crashed.reason.unwrap().contains("shim"));
    // Its app went with it.
    eventually(
        Duration::from_secs(5),
        "the orphaned app to be gone",
        || (!pid_alive(a_pid)).then_some(()),
    );
    assert!(processes_of(&r, &a).1.is_empty());
    // The other instance (and its shim) are untouched.
    std::thread::sleep(Duration::from_millis(300));
    let b_now = r.info(&b);
    assert_eq!((b_now.state.as_str(), b_now.pid), ("up", b_up.pid));
    assert_eq!(get(pb, "/").unwrap().0, 200);
    // A restart brings the crashed one back with a fresh shim; a stop ends it.
    r.c.call("instance.restart", json!({"id": a})).unwrap();
    r.wait_state(&a, "up", Duration::from_secs(20));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(shim_pid(&r, &a)),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    r.wait_state(&a, "crashed", Duration::from_secs(10));
    r.c.call("instance.stop", json!({"id": a})).unwrap();
    r.wait_state(&a, "stopped", Duration::from_secs(5));
}

#[test]
fn never_healthy_counts_against_the_respawn_limit() {
    let mut r = runner("rhealth");
    let (id, _) = r.start(
        "sick",
        json!({"health": {"http": "/nope"}, "start_timeout_ms": 500, "restart": {"limit": 2, "window_ms": 60000}}),
    );
    let i = r.wait_state(&id, "crashed", Duration::from_secs(20));
    assert_eq!(i.restarts, 2, "{i:?}");
    let reason = i.reason.unwrap();
    assert!(
        reason.contains("2 restarts") && reason.contains("404"),
        "{reason}"
    );
    assert_eq!(i.pid, None);
}

#[test]
fn backoff_grows_then_resets_after_a_stable_run_and_limits_are_applied() {
    let mut r = runner("rbackoff");
    let (id, port) = r.start(
        "bouncy",
        json!({"restart": {"backoff_base_ms": 3000, "backoff_cap_ms": 3000, "reset_after_ms": 800, "limit": 10},
               "limits": {"nofile": 777, "pids": 50}}),
    );
    let first = r.wait_state(&id, "up", Duration::from_secs(20));
    let pid = first.pid.unwrap();
    // Its own session and process group, and its rlimits.
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat.rsplit(") ").next().unwrap().split(' ').collect();
    assert_eq!(
        (fields[2], fields[3]),
        (pid.to_string().as_str(), pid.to_string().as_str()),
        "pgrp and session"
    );
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = |name: &str| {
        limits
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap()
            .split_whitespace()
            .rev()
            .nth(1)
            .unwrap()
            .to_string()
    };
    assert!(
        limits
            .lines()
            .any(|l| l.starts_with("Max open files") && l.contains("777")),
        "{limits}"
    );
    assert!(
        limits.lines().any(
            |l| l.starts_with("Max core file size") && l.split_whitespace().nth(4) == Some("0")
        ),
        "{limits}"
    );
    assert_eq!(line("Max processes"), "400", "{limits}");

    // First crash: restarted at once. Second crash right after: backoff (3 s).
    get(port, "/kill");
    let second = eventually(Duration::from_secs(10), "the immediate restart", || {
        let i = r.info(&id);
        (i.state == "up" && i.pid != Some(pid)).then_some(i)
    });
    get(port, "/kill");
    let waiting = eventually(Duration::from_secs(3), "the backoff state", || {
        let i = r.info(&id);
        (i.state == "backoff").then_some(i)
    });
    assert!(waiting.reason.unwrap().contains("restarting in"));
    let third = r.wait_state(&id, "up", Duration::from_secs(20));
    assert_ne!(third.pid, second.pid);
    // A stable run (> reset_after) resets the backoff: the next crash restarts at once.
    std::thread::sleep(Duration::from_millis(1200));
    get(port, "/kill");
    std::thread::sleep(Duration::from_millis(100));
    let mut saw_backoff = false;
    let fourth = eventually(Duration::from_secs(10), "the reset restart", || {
        let i = r.info(&id);
        saw_backoff |= i.state == "backoff";
        (i.state == "up" && i.pid != third.pid).then_some(i)
    });
    assert!(!saw_backoff, "the backoff was reset by the stable run");
    assert_eq!(fourth.restarts, 3);
}

#[test]
fn an_armed_shim_restarts_its_app_even_with_no_runner() {
    let mut r = runner("rarmed");
    let (id, port) = r.start("lonely", json!({}));
    let up = r.wait_state(&id, "up", Duration::from_secs(20));
    r.node.kill9("runner");
    get(port, "/kill");
    // No runner exists, yet the app is back: its shim restarted it at once.
    eventually(Duration::from_secs(10), "the app serving again", || {
        let (code, body) = get(port, "/")?;
        (code == 200 && body.contains(&id)).then_some(())
    });
    r.node.start("runner");
    r.c = r.node.client("runner");
    let i = r.wait_state(&id, "up", Duration::from_secs(20));
    assert_ne!(i.pid, up.pid);
    assert!(
        i.last_exit.is_some_and(|e| e.signal == Some(9)),
        "the new runner learned of the exit"
    );
}

#[test]
fn signals_reach_apps_term_stops_them_gracefully_and_hup_reloads() {
    let mut r = runner("rsignals");
    // A plain program: nothing blocked, nothing ignored (python ignores SIGPIPE
    // itself, so `sleep` shows what the runner hands every app).
    let (sleeper, _) = r.start(
        "sleepy",
        json!({"command": "", "argv": ["sleep", "1000"], "health": {"none": true}}),
    );
    let (id, port) = r.start(
        "graceful",
        json!({"env": {"APP_ON_HUP": "1"}, "stop_grace_ms": 30000}),
    );
    let up = r.wait_state(&id, "up", Duration::from_secs(20));
    let s = r.wait_state(&sleeper, "up", Duration::from_secs(20));
    let spid = s.pid.unwrap();
    assert_eq!(
        status(spid, "SigBlk"),
        "0000000000000000",
        "nothing blocked"
    );
    assert_eq!(
        status(spid, "SigIgn"),
        "0000000000000000",
        "nothing ignored"
    );
    // HUP reaches an app that handles it (and it keeps running).
    r.c.call("instance.reload", json!({"id": id})).unwrap();
    eventually(Duration::from_secs(10), "the HUP handler's line", || {
        r.logs(&id)
            .iter()
            .any(|l| l.contains("reloaded on HUP"))
            .then_some(())
    });
    assert_eq!(r.info(&id).pid, up.pid);
    // An app that SIGTERMs itself ends by TERM and is restarted.
    assert_eq!(get(port, "/term").unwrap().0, 200);
    let again = eventually(Duration::from_secs(20), "the restart after TERM", || {
        let i = r.info(&id);
        (i.state == "up" && i.pid != up.pid).then_some(i)
    });
    assert_eq!(again.last_exit.unwrap().signal, Some(15));
    // A stop ends it by TERM, not by the SIGKILL after the (30 s) grace period.
    r.c.call("instance.stop", json!({"id": id})).unwrap();
    let stopped = r.wait_state(&id, "stopped", Duration::from_secs(20));
    let e = stopped.last_exit.unwrap();
    assert_eq!(e.signal, Some(15), "{e:?}");
    r.c.call("instance.stop", json!({"id": sleeper})).unwrap();
    r.wait_state(&sleeper, "stopped", Duration::from_secs(20));
}

#[test]
fn an_open_run_session_leaks_no_fd_into_apps_started_meanwhile() {
    let mut r = runner("rfds");
    let dir = r.app_dir.clone();
    let v =
        r.c.call(
            "run.start",
            json!({"app": "tenanta", "dir": dir, "argv": ["sleep", "1000"]}),
        )
        .unwrap();
    let run = v["id"].as_str().unwrap().to_string();
    let (b, _) = r.start(
        "tenantb",
        json!({"command": "", "argv": ["sleep", "1000"], "health": {"none": true}}),
    );
    let bi = r.wait_state(&b, "up", Duration::from_secs(20));
    let pid = bi.pid.unwrap();
    assert_eq!(fds(pid), vec![0, 1, 2], "the app holds only its stdio");
    // Its shim (root) holds no terminal either.
    let (shims, _) = processes_of(&r, &b);
    for s in shims {
        for fd in fds(s) {
            let target = std::fs::read_link(format!("/proc/{s}/fd/{fd}")).unwrap_or_default();
            let t = target.display().to_string();
            assert!(
                !t.contains("pts") && !t.contains("ptmx"),
                "shim fd {fd} -> {t}"
            );
        }
    }
    r.c.call("run.kill", json!({"id": run})).unwrap();
    r.c.call("instance.stop", json!({"id": b})).unwrap();
    r.wait_state(&b, "stopped", Duration::from_secs(20));
}

#[test]
fn stop_or_restart_right_after_start_never_leaves_two_apps() {
    let mut r = runner("rrace");
    for round in 0..20 {
        let restart = round % 2 == 1;
        let (id, _) = r.start(&format!("race{round}"), json!({"health": {"tcp": true}}));
        let kind = if restart {
            "instance.restart"
        } else {
            "instance.stop"
        };
        r.c.call(kind, json!({"id": id})).unwrap();
        let state = if restart { "up" } else { "stopped" };
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let (shims, apps) = processes_of(&r, &id);
            assert!(
                shims.len() <= 1 && apps.len() <= 1,
                "round {round}: shims {shims:?}, apps {apps:?}"
            );
            let i = r.info(&id);
            if i.state == state && (restart || shims.is_empty()) {
                if restart {
                    assert_eq!((shims.len(), apps.len()), (1, 1), "round {round}");
                    assert_eq!(Some(apps[0]), i.pid);
                } else {
                    assert!(apps.is_empty(), "round {round}: stopped, yet {apps:?}");
                }
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "round {round}: not {state}: {i:?}, shims {shims:?}, apps {apps:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        if restart {
            r.c.call("instance.stop", json!({"id": id})).unwrap();
            r.wait_state(&id, "stopped", Duration::from_secs(20));
        }
    }
}

fn run_start(r: &mut Runner, app: &str, argv: &[&str], limits: Value) -> String {
    let v =
        r.c.call(
            "run.start",
            json!({"app": app, "dir": r.app_dir, "argv": argv, "limits": limits}),
        )
        .unwrap();
    v["id"].as_str().unwrap().to_string()
}

#[test]
fn one_offs_get_their_own_cgroup_and_limits() {
    let mut r = runner("rrunlimits");
    let (calm, port) = r.start("steady", json!({}));
    r.wait_state(&calm, "up", Duration::from_secs(20));
    // A one-off lives in a cgroup of its own, with the app's rlimits.
    let v =
        r.c.call(
            "run.start",
            json!({"app": "confined", "dir": r.app_dir, "argv": ["sleep", "1000"],
                   "limits": {"pids": 30, "nofile": 333}}),
        )
        .unwrap();
    let (run, pid) = (
        v["id"].as_str().unwrap().to_string(),
        v["pid"].as_i64().unwrap() as i32,
    );
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    assert!(
        cgroups
            .lines()
            .any(|l| l.contains(":pids:") && l.ends_with(&format!("/paddock/{run}"))),
        "{cgroups}"
    );
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    assert!(
        limits
            .lines()
            .any(|l| l.starts_with("Max open files") && l.contains("333")),
        "{limits}"
    );
    r.c.call("run.kill", json!({"id": run})).unwrap();
    assert_eq!(run_to_end(&mut r.c, &run).1, 137);
    // A fork bomb stops at the pids limit (RLIMIT_NPROC would allow 8x more).
    let run = run_start(
        &mut r,
        "bomber",
        &["python3", "bomb.py"],
        json!({"pids": 30}),
    );
    let (out, _) = run_to_end(&mut r.c, &run);
    let n: u32 = out
        .split("fork failed after ")
        .nth(1)
        .and_then(|t| t.split(':').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("the bomb was not stopped: {out:?}"));
    assert!(n < 30, "{out:?}");
    // A memory hog is ended by the memory limit.
    let run = run_start(
        &mut r,
        "hoggy",
        &["python3", "hog.py"],
        json!({"memory_mb": 64}),
    );
    let (out, code) = run_to_end(&mut r.c, &run);
    assert!(!out.contains("survived"), "{out:?}");
    assert_eq!(code, 137, "{out:?}");
    // The runner and the other app are fine.
    r.c.call("ping", json!({})).unwrap();
    assert_eq!(get(port, "/").unwrap().0, 200);
    r.c.call("instance.stop", json!({"id": calm})).unwrap();
    r.wait_state(&calm, "stopped", Duration::from_secs(20));
}

#[test]
fn run_kill_takes_a_setsid_child_of_the_one_off() {
    let mut r = runner("rrunkill");
    let run = run_start(
        &mut r,
        "escaper",
        &[
            "python3",
            "-c",
            "import os,time\nif os.fork()==0:\n  os.setsid(); time.sleep(1000)\nprint('ready', flush=True); time.sleep(1000)",
        ],
        json!({}),
    );
    eventually(Duration::from_secs(10), "the one-off to be ready", || {
        let v =
            r.c.call(
                "run.output",
                json!({"id": run, "offset": 0, "wait_ms": 200}),
            )
            .unwrap();
        use base64::Engine;
        let out = base64::engine::general_purpose::STANDARD
            .decode(v["data"].as_str().unwrap())
            .unwrap();
        String::from_utf8_lossy(&out)
            .contains("ready")
            .then_some(())
    });
    // The setsid'd child: a python whose session is its own pid.
    let user = nix::unistd::User::from_name("pdk-escaper")
        .unwrap()
        .unwrap();
    let escaped: Vec<i32> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<i32>().ok())
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/status"))
                .map(|s| {
                    s.lines().any(|l| {
                        l.starts_with("Uid:")
                            && l.split_whitespace().nth(1) == Some(&user.uid.to_string())
                    })
                })
                .unwrap_or(false)
        })
        .filter(|p| {
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
            let f: Vec<&str> = stat.rsplit(") ").next().unwrap_or("").split(' ').collect();
            f.get(3) == Some(&p.to_string().as_str())
        })
        .collect();
    assert!(!escaped.is_empty(), "the setsid'd child runs");
    r.c.call("run.kill", json!({"id": run})).unwrap();
    assert_eq!(run_to_end(&mut r.c, &run).1, 137);
    for p in escaped {
        eventually(
            Duration::from_secs(5),
            "the setsid'd child to be gone",
            || (!pid_alive(p)).then_some(()),
        );
    }
}

#[test]
fn the_apps_dir_is_entered_as_the_app_user() {
    let mut r = runner("rchdir");
    let (id, _) = r.start(
        "walker",
        json!({"command": "", "argv": ["sleep", "1000"], "health": {"none": true},
               "restart": {"limit": 1}}),
    );
    let up = r.wait_state(&id, "up", Duration::from_secs(20));
    // The dir becomes root-only after the start-time check: root could still
    // enter it, the app's user cannot, so the next start must fail.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&r.app_dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(up.pid.unwrap()),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let i = r.wait_state(&id, "crashed", Duration::from_secs(20));
    assert_eq!(i.last_exit.unwrap().code, Some(127));
    let logs = r.logs(&id);
    assert!(
        logs.iter().any(|l| l.contains("Permission denied")),
        "{logs:?}"
    );
    std::fs::set_permissions(&r.app_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    r.c.call("instance.stop", json!({"id": id})).unwrap();
    r.wait_state(&id, "stopped", Duration::from_secs(20));
}

#[test]
fn stopped_instances_are_removed_after_the_keep_time() {
    let mut r = runner_with("rclean", &[("stopped_keep_ms", 1500)]);
    let (id, _) = r.start("shortlived", json!({}));
    r.wait_state(&id, "up", Duration::from_secs(20));
    let dir = inst_dir(&r, &id);
    let home = r.node.dir.join("apps").join(&id);
    assert!(dir.exists() && home.exists());
    r.c.call("instance.stop", json!({"id": id})).unwrap();
    r.wait_state(&id, "stopped", Duration::from_secs(20));
    // Still there for a while after the stop (logs stay readable)...
    assert!(!r.logs(&id).is_empty());
    // ...then gone, with its directories.
    eventually(
        Duration::from_secs(20),
        "the stopped instance to go",
        || {
            let l: InstanceList =
                serde_json::from_value(r.c.call("instance.list", json!({})).unwrap()).unwrap();
            l.instances.iter().all(|i| i.id != id).then_some(())
        },
    );
    assert!(!dir.exists(), "{}", dir.display());
    assert!(!home.exists(), "{}", home.display());
}

#[test]
fn app_purge_stops_forgets_and_removes_the_apps_account() {
    let mut r = runner("rpurge");
    // Unique per run: the account is system-wide.
    let app = format!(
        "purge{}",
        &ulid::Ulid::new().to_string().to_lowercase()[20..]
    );
    let (id, _) = r.start(&app, json!({}));
    r.wait_state(&id, "up", Duration::from_secs(20));
    let (other, _) = r.start("purgekeep", json!({}));
    r.wait_state(&other, "up", Duration::from_secs(20));
    let dir = inst_dir(&r, &id);
    let home = r.node.dir.join("apps").join(&id);
    let account = |a: &str| nix::unistd::User::from_name(&format!("pdk-{a}")).unwrap();
    assert!(account(&app).is_some() && dir.exists() && home.exists());
    let e =
        r.c.call("app.purge", json!({"app": "Not An App"}))
            .unwrap_err();
    assert!(e.to_string().contains("not an app name"), "{e}");
    // Running: it is stopped first, and purged once stopped.
    let v = r.c.call("app.purge", json!({"app": app})).unwrap();
    assert_eq!(
        (v["purged"].clone(), v["stopping"].clone()),
        (json!(false), json!([id])),
        "{v}"
    );
    eventually(Duration::from_secs(30), "the app purged", || {
        let l: InstanceList =
            serde_json::from_value(r.c.call("instance.list", json!({})).unwrap()).unwrap();
        (l.instances.iter().all(|i| i.id != id) && account(&app).is_none()).then_some(())
    });
    assert!(!dir.exists(), "{}", dir.display());
    assert!(!home.exists(), "{}", home.display());
    // Another app is untouched; a second purge finds nothing left to do.
    r.wait_state(&other, "up", Duration::from_secs(5));
    let v = r.c.call("app.purge", json!({"app": app})).unwrap();
    assert_eq!(v["purged"], true, "{v}");
    assert_eq!(v["user_removed"], false, "{v}");
    r.c.call("instance.stop", json!({"id": other})).unwrap();
}

/// A new runner finds what the first runner and shim left: a version-less record
/// (the spec under `req`, no `version`) and a shim whose Hello has no `proto`. It
/// adopts the running app as it is (same pid, no restart), stops it through the old
/// shim, rewrites the record in the current version, and says at ERROR which
/// directory it could not read instead of skipping it silently.
#[test]
fn a_new_runner_adopts_an_old_shim_and_an_old_record() {
    let mut r = runner("rold");
    r.node.kill9("runner");
    // Unique per run, so nothing a failed earlier run left is counted.
    let id = &format!(
        "oldapp-web-{}",
        &ulid::Ulid::new().to_string().to_lowercase()[16..]
    );
    let dir = inst_dir(&r, id);
    std::fs::create_dir_all(&dir).unwrap();
    let port = free_port().unwrap();
    std::fs::write(
        dir.join("instance.json"),
        json!({"id": id, "req": {"app": "oldapp", "proc": "web", "dir": r.app_dir,
               "command": "python3 -u app.py", "env": {}, "health": {}, "limits": {}, "restart": {}},
               "port": port, "uid": 65534, "gid": 65534, "created": 1, "running": true, "restarts": 0})
        .to_string(),
    )
    .unwrap();
    let broken = inst_dir(&r, "broken-web-1");
    std::fs::create_dir_all(&broken).unwrap();
    std::fs::write(broken.join("instance.json"), "{not json").unwrap();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/old-paddock-shim.py");
    /// The old shim and its app go with the test, whatever happens to it.
    struct OldShim(std::process::Child, std::path::PathBuf);
    impl Drop for OldShim {
        fn drop(&mut self) {
            if let Ok(None) = self.0.try_wait() {
                let _ = self.0.kill();
                let _ = self.0.wait();
            }
            let id = self.1.file_name().unwrap().to_string_lossy().to_string();
            let marker = format!("PADDOCK_INSTANCE={id}");
            for e in std::fs::read_dir("/proc").unwrap().flatten() {
                let environ = std::fs::read(e.path().join("environ")).unwrap_or_default();
                if environ.split(|b| *b == 0).any(|v| v == marker.as_bytes()) {
                    if let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() {
                        let _ = nix::sys::signal::kill(
                            nix::unistd::Pid::from_raw(pid),
                            nix::sys::signal::Signal::SIGKILL,
                        );
                    }
                }
            }
        }
    }
    let mut old_shim = OldShim(
        std::process::Command::new("python3")
            .arg(&fixture)
            .arg(&dir)
            .arg(&r.app_dir)
            .arg(port.to_string())
            .stdin(std::process::Stdio::null())
            .spawn()
            .unwrap(),
        dir.clone(),
    );
    eventually(
        Duration::from_secs(20),
        "the old shim's app to serve",
        || get(port, "/").filter(|_| dir.join("shim.pid").exists()),
    );
    let (_, apps) = processes_of(&r, id);
    assert_eq!(apps.len(), 1, "{apps:?}");
    r.node.start("runner");
    r.c = r.node.client("runner");
    let up = r.wait_state(id, "up", Duration::from_secs(20));
    assert_eq!(up.pid, Some(apps[0]), "adopted as it runs");
    assert_eq!(up.restarts, 0);
    let log = std::fs::read_to_string(r.node.log("runner")).unwrap();
    assert!(log.contains("version-less protocol"), "{log}");
    assert!(
        log.lines().any(|l| l.contains("ERROR")
            && l.contains("broken-web-1")
            && l.contains("not an instance record")),
        "{log}"
    );
    r.c.call("instance.stop", json!({"id": id})).unwrap();
    let stopped = r.wait_state(id, "stopped", Duration::from_secs(20));
    assert_eq!(stopped.last_exit.unwrap().signal, Some(15));
    assert!(!pid_alive(apps[0]));
    let exited = eventually(Duration::from_secs(10), "the old shim to exit", || {
        old_shim.0.try_wait().unwrap()
    });
    assert!(exited.success(), "{exited:?}");
    let rec = std::fs::read_to_string(dir.join("instance.json")).unwrap();
    assert!(
        rec.contains("\"version\": 1") && rec.contains("\"spec\""),
        "{rec}"
    );
    std::fs::remove_dir_all(&broken).unwrap();
}

/// A misspelt key in `[daemons.runner]` stops the start with exit 78, naming the
/// key, before anything is bound.
#[test]
fn a_misspelt_runner_setting_fails_the_start_with_exit_78_naming_it() {
    let t = TestDir::new("rtypo");
    let key = test_key();
    let mut node = Node::new(t.path(), "node-a", &key, &[], None);
    node.file
        .daemons
        .get_mut("runner")
        .unwrap()
        .other
        .insert("backof_base_ms".into(), toml::Value::Integer(5));
    node.save();
    // Its rpc and pub ports are held: a runner that bound before checking its
    // config would fail to bind (exit 71), not exit 78.
    let _held = [node.ports.runner_rpc, node.ports.runner_pub]
        .map(|p| std::net::TcpListener::bind(("127.0.0.1", p)).unwrap());
    let out = std::process::Command::new(paddock_harness::bin("paddock-runner").unwrap())
        .arg("--config")
        .arg(&node.config)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{err}");
    assert!(err.contains("daemons.runner.backof_base_ms"), "{err}");
}

/// The shim is killed and the instance restarted at once, round after round: each
/// round ends with one shim and the app up again, and no reconnect storm. (The
/// race a review found, a dead shim's late end-of-connection handled after the
/// restart, needs the runner's thread busy at that moment; this test does not
/// force it, the connection numbers in `actor.rs` rule it out.)
#[test]
fn a_restart_right_after_the_shim_died_settles_on_one_shim() {
    let mut r = runner("rshimrace");
    let (id, _) = r.start(
        "phoenix",
        json!({"command": "", "argv": ["sleep", "1000"], "health": {"none": true}}),
    );
    r.wait_state(&id, "up", Duration::from_secs(20));
    for round in 0..6 {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(shim_pid(&r, &id)),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        let _ = r.c.call("instance.restart", json!({"id": id}));
        let up = eventually(Duration::from_secs(20), "up again", || {
            let i = r.info(&id);
            if i.state == "crashed" {
                let _ = r.c.call("instance.restart", json!({"id": id}));
            }
            (i.state == "up").then_some(i)
        });
        let (shims, apps) = processes_of(&r, &id);
        assert_eq!((shims.len(), apps.len()), (1, 1), "round {round}");
        assert_eq!(up.pid, Some(apps[0]), "round {round}");
    }
    let log = std::fs::read_to_string(r.node.log("runner")).unwrap();
    let storms = log.matches("lost the shim's socket").count();
    assert!(storms <= 12, "{storms} reconnects in 6 rounds");
    r.c.call("instance.stop", json!({"id": id})).unwrap();
    r.wait_state(&id, "stopped", Duration::from_secs(20));
}

/// A one-off that floods its terminal, and one that never reads its input: the
/// runner keeps answering, output replies stay bounded (the client asks again),
/// and input that does not fit is answered with what was written.
#[test]
fn a_flooding_or_deaf_one_off_does_not_hold_the_runner() {
    use base64::Engine;
    let mut r = runner("rflood");
    let flood = run_start(
        &mut r,
        "flooder",
        &["sh", "-c", "yes aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"],
        json!({}),
    );
    let mut offset = 0u64;
    let mut biggest = 0usize;
    for _ in 0..20 {
        let v =
            r.c.call(
                "run.output",
                json!({"id": flood, "offset": offset, "wait_ms": 200}),
            )
            .unwrap();
        let n = base64::engine::general_purpose::STANDARD
            .decode(v["data"].as_str().unwrap())
            .unwrap()
            .len();
        biggest = biggest.max(n);
        offset = v["next_offset"].as_u64().unwrap();
        r.c.call("ping", json!({})).unwrap();
    }
    assert!(
        biggest > 0 && biggest <= 256 << 10,
        "{biggest} bytes in one reply"
    );
    r.c.call("run.kill", json!({"id": flood})).unwrap();
    // Raw mode and never reading: the terminal takes a few KiB, then no more.
    let deaf = run_start(
        &mut r,
        "deaf",
        &[
            "python3",
            "-c",
            "import tty,time\ntty.setraw(0)\nprint('raw',flush=True)\ntime.sleep(1000)",
        ],
        json!({}),
    );
    eventually(Duration::from_secs(10), "raw mode", || {
        let v =
            r.c.call(
                "run.output",
                json!({"id": deaf, "offset": 0, "wait_ms": 200}),
            )
            .unwrap();
        let out = base64::engine::general_purpose::STANDARD
            .decode(v["data"].as_str().unwrap())
            .unwrap();
        String::from_utf8_lossy(&out).contains("raw").then_some(())
    });
    let data = base64::engine::general_purpose::STANDARD.encode(vec![b'a'; 600_000]);
    let v =
        r.c.call("run.input", json!({"id": deaf, "data": data}))
            .unwrap();
    let written = v["written"].as_u64().unwrap();
    assert!(written > 0 && written < 600_000, "written {written}");
    r.c.call("ping", json!({})).unwrap();
    r.c.call("run.kill", json!({"id": deaf})).unwrap();
}

/// A runner whose parent left an fd open without close-on-exec (as a careless
/// supervisor might): its shims, root processes that fork apps, must not hold it.
#[test]
fn a_shim_inherits_no_fd_the_runner_was_handed() {
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            paddock_harness::stop_child(
                &mut self.0,
                nix::sys::signal::Signal::SIGTERM,
                Duration::from_secs(3),
            );
        }
    }
    let mut r = runner("rinherit");
    r.node.kill9("runner");
    let log = std::fs::File::create(r.node.log("runner")).unwrap();
    let runner = Kill(
        std::process::Command::new("sh")
            .arg("-c")
            .arg("exec 7</etc/hostname; exec \"$0\" --config \"$1\"")
            .arg(paddock_harness::bin("paddock-runner").unwrap())
            .arg(&r.node.config)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    paddock_harness::wait_ping(
        &r.node.rpc("runner"),
        r.node.keys.clone(),
        Duration::from_secs(20),
    )
    .unwrap();
    let held = |pid: i32| {
        fds(pid)
            .into_iter()
            .filter(|fd| {
                std::fs::read_link(format!("/proc/{pid}/fd/{fd}"))
                    .is_ok_and(|t| t == Path::new("/etc/hostname"))
            })
            .count()
    };
    assert_eq!(
        held(runner.0.id() as i32),
        1,
        "the runner was handed the fd"
    );
    let (id, _) = r.start(
        "inheritor",
        json!({"command": "", "argv": ["sleep", "1000"], "health": {"none": true}}),
    );
    let up = r.wait_state(&id, "up", Duration::from_secs(20));
    let (shims, _) = processes_of(&r, &id);
    assert_eq!(shims.len(), 1);
    assert_eq!(
        held(shims[0]),
        0,
        "the shim holds the runner's inherited fd"
    );
    assert_eq!(fds(up.pid.unwrap()), vec![0, 1, 2]);
    r.c.call("instance.stop", json!({"id": id})).unwrap();
    r.wait_state(&id, "stopped", Duration::from_secs(20));
}
