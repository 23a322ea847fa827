//! The database layer across a failover: a synchronous streaming standby made
//! with pg_basebackup, a multi-host URL with target_session_attrs=read-write, the
//! primary crashed and the standby promoted at once; the locker reconnects, loses
//! no acknowledged lease, and its fencing tokens keep growing.

use std::time::Duration;

use nix::sys::signal::Signal;
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
    let primary_sql = |q: &str| {
        block_on(async {
            let c = paddock_db::connect(&primary.url()).await.unwrap();
            // One statement per call: ALTER SYSTEM refuses a (implicit) transaction.
            for stmt in q.split(';') {
                c.batch_execute(stmt).await.unwrap();
            }
        })
    };
    // Synchronous replication, as a deployment that promises no lost grant runs
    // it: a commit is acknowledged once the standby has flushed it. (The harness
    // server runs with synchronous_commit off for speed; this database's sessions
    // commit synchronously. Set after the base backup, so the promoted standby
    // does not wait for a standby of its own.)
    primary_sql("ALTER DATABASE paddock SET synchronous_commit = on");
    primary_sql("ALTER SYSTEM SET synchronous_standby_names = '*'; SELECT pg_reload_conf()");
    eventually(
        Duration::from_secs(20),
        "the standby to stream synchronously",
        || {
            block_on(async {
                let c = paddock_db::connect(&primary.url()).await.ok()?;
                let r = c
                    .query_opt(
                        "SELECT 1 FROM pg_stat_replication WHERE sync_state = 'sync'",
                        &[],
                    )
                    .await
                    .ok()?;
                r.map(|_| ())
            })
        },
    );

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
    eventually(Duration::from_secs(20), "the locker to serve locks", || {
        c.call("lock.list", json!({})).ok()
    });

    // The primary's WAL sender is frozen while the grant is made, so nothing of it
    // leaves the primary (freezing the standby's receiver would not do: the kernel
    // still buffers what arrives on its socket). An acknowledgement can then only
    // come from a commit that did not wait for the standby, and such a grant is
    // lost when the primary crashes below.
    let sender: i32 = eventually(Duration::from_secs(10), "the WAL sender", || {
        block_on(async {
            let p = paddock_db::connect(&primary.url()).await.ok()?;
            p.query_opt(
                "SELECT pid FROM pg_stat_replication WHERE state = 'streaming'",
                &[],
            )
            .await
            .ok()?
            .map(|r| r.get(0))
        })
    });
    // Signalled through a pidfd: it cannot reach a later process with its pid.
    let sender = Thaw(paddock_harness::pidfile::Proc::open(sender).expect("the sender"));
    sender.0.signal(Signal::SIGSTOP).unwrap();
    let pending = {
        let (rpc, keys) = (n.rpc("locker"), n.keys.clone());
        std::thread::spawn(move || {
            let mut c = paddock_wire::Client::connect(&rpc, "user:test", keys)
                .unwrap()
                .with_timeout(Duration::from_secs(30));
            c.call(
                "lock.acquire",
                json!({"name": "leader", "owner": "a", "ttl_ms": 120_000}),
            )
        })
    };
    // Either the grant's commit waits for the standby (synchronous), or the grant
    // is acknowledged with the standby frozen (it would be lost).
    let waits_for_standby = eventually(
        Duration::from_secs(20),
        "the grant's commit to wait for the standby, or its answer",
        || {
            if pending.is_finished() {
                return Some(false);
            }
            block_on(async {
                let p = paddock_db::connect(&primary.url()).await.ok()?;
                p.query_opt(
                    "SELECT 1 FROM pg_stat_activity WHERE wait_event = 'SyncRep' AND datname = 'paddock'",
                    &[],
                )
                .await
                .ok()?
                .map(|_| true)
            })
        },
    );
    if waits_for_standby {
        sender.0.signal(Signal::SIGCONT).unwrap();
    }
    let g1: LockGrant = serde_json::from_value(pending.join().unwrap().unwrap()).unwrap();

    // The primary crashes the moment the grant is acknowledged (kill -9 of its
    // whole group, the frozen sender included: no shutdown checkpoint, nothing
    // more streamed), and the standby is promoted without waiting for anything.
    let mut primary = primary;
    primary.crash();
    drop(sender);
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
    assert_eq!(
        l.locks.len(),
        1,
        "an acknowledged grant was lost in the failover: {l:?}"
    );
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

/// Resumes a SIGSTOPped process however the test ends.
struct Thaw(paddock_harness::pidfile::Proc);

impl Drop for Thaw {
    fn drop(&mut self) {
        let _ = self.0.signal(Signal::SIGCONT);
    }
}

/// Stops the standby however the test ends (a failed assertion included).
struct Stop(std::process::Child);

impl Drop for Stop {
    fn drop(&mut self) {
        paddock_harness::stop_child(&mut self.0, Signal::SIGINT, Duration::from_secs(10));
    }
}
