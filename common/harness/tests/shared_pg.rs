//! The run's shared PostgreSQL: one keeper and one server for every test of a run,
//! a database per test, and nothing left once the watched process (nextest) ends.
//! Needs the workspace binaries (`cargo build --workspace --bins`).

use std::process::Command;
use std::time::{Duration, Instant};

use paddock_harness::pidfile::{self, Proc};
use paddock_harness::shared_pg;

fn eventually(timeout: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn one_server_serves_the_run_and_is_gone_when_the_runner_ends() {
    let base = tempfile::tempdir().unwrap();
    let dir = base.path().join("paddock-pg-run-test");
    // Stands in for nextest: the process whose end ends the run.
    let mut runner = Command::new("sleep").arg("600").spawn().unwrap();
    let first = shared_pg::attach_or_start(&dir, runner.id() as i32).unwrap();
    let keeper = pidfile::lock_holder(&dir.join("keeper.pid"))
        .unwrap()
        .expect("a keeper holds its pid file");
    // A later test of the run attaches to the same server; no second keeper.
    let second = shared_pg::attach_or_start(&dir, runner.id() as i32).unwrap();
    assert_eq!(first.cluster.port, second.cluster.port);
    let again = pidfile::lock_holder(&dir.join("keeper.pid"))
        .unwrap()
        .unwrap();
    assert_eq!(again.pid(), keeper.pid());
    // Each test gets a database of its own; a name is never reused silently.
    let a = shared_pg::unique_db_name("paddock");
    first.create_db(&a).unwrap();
    assert!(second.create_db(&a).is_err(), "a taken name is an error");
    second.drop_db(&a).unwrap();

    let postmaster = pidfile::read_pid(&dir.join("pg/data/postmaster.pid"))
        .and_then(Proc::open)
        .expect("the postmaster");
    runner.kill().unwrap();
    runner.wait().unwrap();
    assert!(
        postmaster.wait_exit(Duration::from_secs(30)),
        "PostgreSQL stops when the run ends"
    );
    assert!(keeper.wait_exit(Duration::from_secs(30)), "the keeper ends");
    eventually(Duration::from_secs(10), "the run's dir removed", || {
        !dir.exists()
    });
}
