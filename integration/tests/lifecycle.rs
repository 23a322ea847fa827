//! What every daemon inherits from BaseDaemon, proved on the test daemon
//! (`paddock-testd`): crash-only panics and critical loops, resilient loops restarted
//! and counted, drain on SIGTERM, JSON logs, syslog, and `READY=1` to systemd.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use nix::sys::signal::Signal;
use paddock_integration::*;
use serde_json::json;

fn testd(t: &TestDir) -> Node {
    let key = test_key();
    let mut n = Node::new(t.path(), "node-a", &key, &[], None);
    n.add_daemon("testd");
    n
}

#[test]
fn a_panicking_actor_ends_the_process_never_half_alive() {
    let t = TestDir::new("panic");
    let mut n = testd(&t);
    n.start("testd");
    let mut c = n.client("testd");
    c.set_timeout(Duration::from_secs(2));
    let _ = c.call("test.panic", json!({}));
    assert_eq!(
        n.wait_exit("testd", Duration::from_secs(5)),
        Some(70),
        "EX_SOFTWARE after a panic"
    );
    let log = std::fs::read_to_string(n.log("testd")).unwrap();
    assert!(
        log.contains("panic") && log.contains("test.panic asked this actor to panic"),
        "{log}"
    );
}

#[test]
fn the_io_thread_stopping_ends_the_process_never_half_alive() {
    let t = TestDir::new("io-dies");
    let mut n = testd(&t);
    n.start("testd");
    let mut c = n.client("testd");
    c.set_timeout(Duration::from_secs(2));
    let _ = c.call("test.stop_io", json!({}));
    assert_eq!(
        n.wait_exit("testd", Duration::from_secs(5)),
        Some(70),
        "EX_SOFTWARE once the I/O thread is gone"
    );
    let log = std::fs::read_to_string(n.log("testd")).unwrap();
    assert!(log.contains("I/O thread stopped"), "{log}");
}

#[test]
fn a_critical_loop_that_ends_ends_the_process() {
    let t = TestDir::new("critical");
    let mut n = testd(&t);
    n.spawn_env("testd", &[("PADDOCK_TESTD_CRITICAL_AFTER_MS", "500")]);
    let code = n.wait_exit("testd", Duration::from_secs(10));
    assert_eq!(code, Some(1));
    let log = std::fs::read_to_string(n.log("testd")).unwrap();
    assert!(
        log.contains("critical loop ended") && log.contains("doomed"),
        "{log}"
    );
}

#[test]
fn a_failing_resilient_loop_is_restarted_with_backoff_and_counted() {
    let t = TestDir::new("resilient");
    let mut n = testd(&t);
    n.spawn_env("testd", &[("PADDOCK_TESTD_RESILIENT_FAILS", "3")]);
    let mut c = n.client("testd");
    let stats = eventually(
        Duration::from_secs(10),
        "three restarts of the flaky loop",
        || {
            let s = c.call("stats", json!({})).ok()?;
            (s["loop_restarts"]["flaky"].as_u64() == Some(3)).then_some(s)
        },
    );
    assert_eq!(stats["daemon"], "testd");
    // Still serving, and the failures were logged (WARN) with their cause.
    c.call("ping", json!({})).unwrap();
    let log = std::fs::read_to_string(n.log("testd")).unwrap();
    assert_eq!(log.matches("flaky failure").count(), 3, "{log}");
    assert!(!log.contains("ERROR"), "{log}");
}

#[test]
fn sigterm_lets_a_request_in_flight_finish_then_exits_zero() {
    let t = TestDir::new("drain");
    let mut n = testd(&t);
    n.start("testd");
    let (rpc, keys) = (n.rpc("testd"), n.keys.clone());
    let slow = std::thread::spawn(move || {
        let mut c = paddock_wire::Client::connect(&rpc, "user:test", keys)
            .unwrap()
            .with_timeout(Duration::from_secs(5));
        c.call("test.sleep", json!({"ms": 800}))
    });
    std::thread::sleep(Duration::from_millis(300));
    n.signal("testd", Signal::SIGTERM);
    let reply = slow
        .join()
        .unwrap()
        .expect("the request in flight was answered");
    assert_eq!(reply["slept_ms"], 800);
    assert_eq!(n.wait_exit("testd", Duration::from_secs(10)), Some(0));
}

#[test]
fn json_logs_syslog_and_ready_to_systemd() {
    let t = TestDir::new("logs");
    let mut n = testd(&t);
    let syslog_path = t.path().join("syslog.sock");
    let syslog = UnixDatagram::bind(&syslog_path).unwrap();
    syslog
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    n.file.log.json = true;
    n.file.log.syslog = true;
    n.file.log.syslog_socket = Some(syslog_path);
    n.save();
    let notify_path = t.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    n.spawn_env("testd", &[("NOTIFY_SOCKET", notify_path.to_str().unwrap())]);

    let mut buf = [0u8; 4096];
    let len = notify.recv(&mut buf).expect("a notification");
    let msg = String::from_utf8_lossy(&buf[..len]).to_string();
    assert!(msg.contains("READY=1"), "{msg}");
    // READY comes after the sockets are bound: ping answers at once.
    n.client("testd").call("ping", json!({})).unwrap();

    let len = syslog.recv(&mut buf).expect("a syslog datagram");
    let line = String::from_utf8_lossy(&buf[..len]).to_string();
    assert!(
        line.starts_with("<30>paddock-testd["),
        "facility daemon, severity info: {line}"
    );

    n.signal("testd", Signal::SIGTERM);
    assert_eq!(n.wait_exit("testd", Duration::from_secs(10)), Some(0));
    let len = notify.recv(&mut buf).expect("STOPPING");
    assert!(String::from_utf8_lossy(&buf[..len]).contains("STOPPING=1"));
    let log = std::fs::read_to_string(n.log("testd")).unwrap();
    let mut lines = 0;
    for l in log.lines() {
        let v: serde_json::Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        assert!(v.get("level").is_some() && v.get("fields").is_some(), "{l}");
        lines += 1;
    }
    assert!(lines >= 2, "{log}");
}
