//! The real heartbeat, fed signed beats with absurd intervals by a key holder:
//! they are refused, never listed, and the daemon keeps sweeping and serving (an
//! interval of u64::MAX used to overflow the threshold arithmetic on the next
//! sweep, a panic that ends the daemon).

use std::time::{Duration, Instant};

use paddock_harness::ClusterCurve;
use paddock_wire::kinds::{Service, ServiceList, ServiceState};
use paddock_wire::{Client, Pusher};
use serde_json::json;

struct Daemon {
    child: std::process::Child,
    dir: tempfile::TempDir,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        paddock_harness::stop_child(
            &mut self.child,
            nix::sys::signal::Signal::SIGTERM,
            Duration::from_secs(5),
        );
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self.dir.path().join("heartbeat.log"));
            eprintln!("heartbeat log:\n{}", log.unwrap_or_default());
        }
    }
}

fn eventually<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn list(c: &mut Client) -> Vec<Service> {
    let v = c.call("registry.list", json!({})).expect("registry.list");
    serde_json::from_value::<ServiceList>(v).unwrap().services
}

#[test]
fn absurd_intervals_are_refused_and_the_heartbeat_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let secret = paddock_wire::keyring::generate_secret_hex();
    let curve = ClusterCurve::generate().expect("libzmq with CURVE");
    let (file, ports) = paddock_harness::node_file(
        "node-a",
        &dir.path().join("state"),
        ("cluster-1", &secret),
        Some(&curve),
        &[],
        None,
    )
    .unwrap();
    let config = dir.path().join("paddock.toml");
    file.write(&config).unwrap();
    let creds = paddock_harness::credentials(&file).unwrap();
    let child =
        paddock_harness::spawn_daemon("heartbeat", &config, &dir.path().join("heartbeat.log"))
            .unwrap();
    let mut d = Daemon { child, dir };
    let rpc = paddock_harness::tcp(ports.heartbeat_rpc);
    paddock_harness::wait_ping(&rpc, creds.clone(), Duration::from_secs(20)).unwrap();

    let pull = paddock_harness::tcp(ports.heartbeat_pull);
    let p = Pusher::connect(&pull, "test@node-a", creds.clone()).unwrap();
    let beat = |daemon: &str, interval_ms: u64| {
        json!({"daemon": daemon, "node": "node-a", "incarnation": format!("{daemon}-1"),
               "endpoints": {}, "interval_ms": interval_ms})
    };
    let mut c = Client::connect(&rpc, "user:test", creds).unwrap();
    // One pusher, so the probe arrives after the hostile beats; pushed again until
    // the probe is listed, since a PUSH may drop what it sends before it connects.
    eventually(Duration::from_secs(10), "the probe to be listed", || {
        for (daemon, iv) in [
            ("huge", u64::MAX),
            ("half", u64::MAX / 2),
            ("hour-and-a-bit", 3_600_001),
            ("zero", 0),
        ] {
            p.push("heartbeat.beat", beat(daemon, iv)).unwrap();
        }
        p.push("heartbeat.beat", beat("probe", 10)).unwrap();
        list(&mut c)
            .iter()
            .any(|s| s.daemon == "probe")
            .then_some(())
    });
    // The probe beats every 10 ms and has stopped: only sweeps, which judge every
    // entry, can make it dead.
    eventually(
        Duration::from_secs(10),
        "sweeps to mark the probe dead",
        || {
            list(&mut c)
                .iter()
                .any(|s| s.daemon == "probe" && s.state == ServiceState::Dead)
                .then_some(())
        },
    );
    // The heartbeat beats to itself too.
    let listed: Vec<String> = list(&mut c)
        .into_iter()
        .map(|s| s.daemon)
        .filter(|d| d != "heartbeat")
        .collect();
    assert_eq!(
        listed,
        vec!["probe".to_string()],
        "only the probe is listed"
    );
    assert!(
        d.child.try_wait().unwrap().is_none(),
        "the heartbeat exited"
    );
    let log = std::fs::read_to_string(d.dir.path().join("heartbeat.log")).unwrap();
    assert!(
        log.contains("ignored a beat: interval_ms"),
        "refusals are logged: {log}"
    );
    assert!(!log.contains("ERROR"), "{log}");
}
