//! The database layer across a failover: a streaming standby made with
//! pg_basebackup, a multi-host URL with target_session_attrs=read-write, the
//! primary stopped and the standby promoted; the locker reconnects, loses no
//! acknowledged lease, and its fencing tokens keep growing.

use std::time::Duration;

use paddock_harness::{PgCluster, PgOptions};
use paddock_integration::*;
use paddock_wire::kinds::{LockGrant, LockList};
use serde_json::json;

#[test]
fn locker_follows_a_promoted_standby_and_tokens_keep_growing() {
    let t = TestDir::new("failover");
    let pdir = t.path().join("primary");
    let sdir = t.path().join("standby");
    std::fs::create_dir_all(&sdir).unwrap();
    std::fs::create_dir_all(t.path().join("logs")).unwrap();
    let primary = Postgres::private(&pdir);
    let standby = PgCluster::init_standby(
        &sdir,
        &primary.cluster,
        &PgOptions {
            fast: true,
            port: None,
        },
    )
    .unwrap();
    let _standby_proc = Stop(standby.start(&t.path().join("logs/standby.log")).unwrap());

    // target_session_attrs=read-write refuses a standby at connect time, and the
    // pool's recycle check raises on a server in recovery, not on a primary.
    let standby_any = standby
        .url("paddock")
        .replace(" target_session_attrs=read-write", "");
    block_on(async {
        let refused = paddock_db::connect(&standby.url("paddock"))
            .await
            .map(|_| ())
            .unwrap_err();
        let why = paddock_db::chain(&refused);
        assert!(why.contains("does not allow writes"), "{why}");
        let s = paddock_db::connect(&standby_any).await.unwrap();
        let err = paddock_db::check_writable(&s).await.unwrap_err();
        let why = paddock_db::chain(&err);
        assert!(why.contains("recovery"), "{why}");
        let p = paddock_db::connect(&primary.url()).await.unwrap();
        paddock_db::check_writable(&p).await.unwrap();
    });

    // The standby listed first: target_session_attrs=read-write skips it.
    let url = format!(
        "host=127.0.0.1,127.0.0.1 port={},{} user=paddock password={} dbname=paddock target_session_attrs=read-write",
        standby.port, primary.cluster.port, primary.cluster.password
    );
    let key = test_key();
    let mut n = Node::new(t.path(), "node-a", &key, &[], Some(url));
    n.start("locker");
    let mut c = n.client("locker");
    c.set_timeout(Duration::from_secs(20));
    let g1: LockGrant = serde_json::from_value(
        c.call(
            "lock.acquire",
            json!({"name": "leader", "owner": "a", "ttl_ms": 120_000}),
        )
        .unwrap(),
    )
    .unwrap();

    // Let the standby replay the grant, then lose the primary and promote.
    eventually(
        Duration::from_secs(10),
        "the grant to reach the standby",
        || {
            block_on(async {
                let s = paddock_db::connect(&standby_any).await.ok()?;
                let n: i64 = s
                    .query_one("SELECT count(*) FROM locks", &[])
                    .await
                    .ok()?
                    .get(0);
                (n == 1).then_some(())
            })
        },
    );
    drop(primary);
    standby.promote().unwrap();

    let l: LockList = eventually(
        Duration::from_secs(20),
        "the locker on the new primary",
        || {
            c.call("lock.list", json!({}))
                .ok()
                .map(|v| serde_json::from_value(v).unwrap())
        },
    );
    assert_eq!(l.locks.len(), 1, "{l:?}");
    assert_eq!(
        (l.locks[0].name.as_str(), l.locks[0].token),
        ("leader", g1.token)
    );
    let g2: LockGrant = serde_json::from_value(
        c.call(
            "lock.acquire",
            json!({"name": "other", "owner": "b", "ttl_ms": 1000}),
        )
        .unwrap(),
    )
    .unwrap();
    assert!(g2.token > g1.token, "{} after {}", g2.token, g1.token);
    assert_eq!(
        c.call("lock.check", json!({"name": "leader", "token": g1.token}))
            .unwrap()["valid"],
        true
    );
}

/// Stops the standby however the test ends (a failed assertion included).
struct Stop(std::process::Child);

impl Drop for Stop {
    fn drop(&mut self) {
        paddock_harness::stop_child(
            &mut self.0,
            nix::sys::signal::Signal::SIGINT,
            Duration::from_secs(10),
        );
    }
}
