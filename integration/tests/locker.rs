//! The locker against a real PostgreSQL: mutual exclusion, expiry hand-over, stale
//! tokens, fencing across restarts and across two lockers, migrations applied once.

use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use paddock_integration::*;
use paddock_wire::kinds::{LockGrant, LockList};
use paddock_wire::{Client, ClientError, Code};
use serde_json::json;

fn acquire(
    c: &mut Client,
    name: &str,
    owner: &str,
    ttl_ms: u64,
    wait_ms: u64,
) -> Result<LockGrant, ClientError> {
    c.set_timeout(Duration::from_millis(wait_ms + 5000));
    c.call(
        "lock.acquire",
        json!({"name": name, "owner": owner, "ttl_ms": ttl_ms, "wait_ms": wait_ms}),
    )
    .map(|v| serde_json::from_value(v).unwrap())
}

fn code(r: Result<serde_json::Value, ClientError>) -> Code {
    r.unwrap_err().code().cloned().expect("a remote error")
}

#[test]
fn eight_contenders_never_overlap_and_tokens_increase() {
    let t = TestDir::new("mutex");
    let pg = Postgres::start(t.path());
    let key = test_key();
    let mut n = Node::new(t.path(), "node-a", &key, &[], Some(pg.url()));
    n.start("locker");
    let holders = Arc::new(AtomicUsize::new(0));
    let overlaps = Arc::new(AtomicUsize::new(0));
    let last_token = Arc::new(AtomicI64::new(0));
    let grants = Arc::new(Mutex::new(Vec::new()));
    let threads: Vec<_> = (0..8)
        .map(|i| {
            let (rpc, keys) = (n.rpc("locker"), n.keys.clone());
            let (holders, overlaps, last_token, grants) = (
                holders.clone(),
                overlaps.clone(),
                last_token.clone(),
                grants.clone(),
            );
            std::thread::spawn(move || {
                let mut c = Client::connect(&rpc, "user:test", keys).unwrap();
                for _ in 0..5 {
                    let g = acquire(&mut c, "shared", &format!("worker-{i}"), 10_000, 20_000)
                        .expect("acquired");
                    if holders.fetch_add(1, Ordering::SeqCst) != 0 {
                        overlaps.fetch_add(1, Ordering::SeqCst);
                    }
                    // Each grant's token is larger than every earlier grant's.
                    let prev = last_token.swap(g.token, Ordering::SeqCst);
                    assert!(g.token > prev, "token {} after {prev}", g.token);
                    grants.lock().unwrap().push(g.token);
                    std::thread::sleep(Duration::from_millis(5));
                    holders.fetch_sub(1, Ordering::SeqCst);
                    c.call("lock.release", json!({"name": "shared", "token": g.token}))
                        .expect("released");
                }
            })
        })
        .collect();
    for th in threads {
        th.join().expect("contender thread");
    }
    assert_eq!(overlaps.load(Ordering::SeqCst), 0, "two holders at once");
    let g = grants.lock().unwrap();
    assert_eq!(g.len(), 40);
    let mut sorted = g.clone();
    sorted.dedup();
    assert_eq!(sorted.len(), 40, "every grant has its own token");
}

#[test]
fn expiry_hands_over_and_the_old_token_goes_stale() {
    let t = TestDir::new("expiry");
    let pg = Postgres::start(t.path());
    let key = test_key();
    let mut n = Node::new(t.path(), "node-a", &key, &[], Some(pg.url()));
    n.start("locker");
    let mut a = n.client("locker");
    let mut b = n.client("locker");
    let ga = acquire(&mut a, "job", "a", 400, 0).unwrap();
    // Held: B without waiting gets `held` with the holder named.
    let err = acquire(&mut b, "job", "b", 1000, 0).unwrap_err();
    match &err {
        ClientError::Remote(e) => {
            assert_eq!(e.code, Code::Held);
            assert_eq!(e.extra["holder"], "a");
        }
        other => panic!("{other}"),
    }
    assert_eq!(
        a.call("lock.check", json!({"name": "job", "token": ga.token}))
            .unwrap()["valid"],
        true
    );
    let renewed: LockGrant = serde_json::from_value(
        a.call(
            "lock.renew",
            json!({"name": "job", "token": ga.token, "ttl_ms": 400}),
        )
        .unwrap(),
    )
    .unwrap();
    assert!(renewed.expires >= ga.expires);
    // B waits; A stops renewing; B gets it after expiry with a larger token.
    let gb = acquire(&mut b, "job", "b", 5000, 3000).unwrap();
    assert!(gb.token > ga.token);
    assert_eq!(
        code(a.call(
            "lock.renew",
            json!({"name": "job", "token": ga.token, "ttl_ms": 400})
        )),
        Code::StaleToken
    );
    assert_eq!(
        code(a.call("lock.release", json!({"name": "job", "token": ga.token}))),
        Code::StaleToken
    );
    assert_eq!(
        a.call("lock.check", json!({"name": "job", "token": ga.token}))
            .unwrap()["valid"],
        false
    );
    let l: LockList = serde_json::from_value(a.call("lock.list", json!({})).unwrap()).unwrap();
    assert_eq!(l.locks.len(), 1);
    assert_eq!(
        (l.locks[0].owner.as_str(), l.locks[0].token),
        ("b", gb.token)
    );
    // Bad input is `invalid` and changes nothing.
    assert_eq!(
        code(a.call(
            "lock.acquire",
            json!({"name": "", "owner": "a", "ttl_ms": 10})
        )),
        Code::Invalid
    );
    assert_eq!(
        code(a.call("lock.acquire", json!({"name": "x", "owner": "a"}))),
        Code::Invalid
    );
    assert_eq!(
        code(a.call(
            "lock.acquire",
            json!({"name": "x", "owner": "a", "ttl_ms": 0})
        )),
        Code::Invalid
    );
    let l2: LockList = serde_json::from_value(a.call("lock.list", json!({})).unwrap()).unwrap();
    assert_eq!(l2.locks.len(), 1);
    // Release works with the current token; then the lock is free.
    b.call("lock.release", json!({"name": "job", "token": gb.token}))
        .unwrap();
    acquire(&mut a, "job", "a", 1000, 0).unwrap();
}

#[test]
fn fencing_tokens_increase_across_kill_9_and_two_lockers() {
    let t = TestDir::new("fencing");
    let pg = Postgres::start(t.path());
    let key = test_key();
    let mut a = Node::new(t.path(), "node-a", &key, &[], Some(pg.url()));
    let mut b = Node::new(t.path(), "node-b", &key, &[], Some(pg.url()));
    a.start("locker");
    b.start("locker");
    let mut ca = a.client("locker");
    let mut cb = b.client("locker");
    let mut last = 0;
    for round in 0..6 {
        // Alternate lockers; kill -9 and restart locker A in the middle.
        if round == 3 {
            a.kill9("locker");
            a.start("locker");
        }
        let c = if round % 2 == 0 { &mut ca } else { &mut cb };
        c.set_timeout(Duration::from_secs(10));
        let g = acquire(c, &format!("l{}", round % 2), "x", 100, 2000).unwrap();
        assert!(
            g.token > last,
            "round {round}: token {} after {last}",
            g.token
        );
        last = g.token;
        c.call(
            "lock.release",
            json!({"name": format!("l{}", round % 2), "token": g.token}),
        )
        .unwrap();
    }
    // Two lockers, one lock: still one holder.
    let g = acquire(&mut ca, "one", "a", 60_000, 0).unwrap();
    assert_eq!(
        acquire(&mut cb, "one", "b", 1000, 0).unwrap_err().code(),
        Some(&Code::Held)
    );
    assert_eq!(
        cb.call("lock.check", json!({"name": "one", "token": g.token}))
            .unwrap()["valid"],
        true
    );
}

#[test]
fn five_lockers_starting_together_migrate_once() {
    let t = TestDir::new("migrate");
    let pg = Postgres::start(t.path());
    let url = pg.fresh_db("empty");
    let key = test_key();
    let mut nodes: Vec<Node> = (0..5)
        .map(|i| Node::new(t.path(), &format!("node-{i}"), &key, &[], Some(url.clone())))
        .collect();
    for n in nodes.iter_mut() {
        n.spawn("locker");
    }
    for n in nodes.iter_mut() {
        // Each answers locks once its migration step is done.
        let mut c = n.client("locker");
        let name = format!("m-{}", n.name);
        eventually(Duration::from_secs(20), "locker to serve locks", || {
            c.set_timeout(Duration::from_millis(1000));
            c.call(
                "lock.acquire",
                json!({"name": name, "owner": "t", "ttl_ms": 1000}),
            )
            .ok()
        });
    }
    let rows = block_on(async {
        let c = paddock_db::connect(&url).await.unwrap();
        c.query("SELECT version, count(*) FROM refinery_schema_history GROUP BY version ORDER BY version", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get::<_, i32>(0), r.get::<_, i64>(1)))
            .collect::<Vec<_>>()
    });
    let expected = paddock_db::embedded_migrations().len();
    assert_eq!(rows.len(), expected, "{rows:?}");
    assert!(
        rows.iter().all(|(_, n)| *n == 1),
        "each migration applied exactly once: {rows:?}"
    );
    let counter = block_on(async {
        let c = paddock_db::connect(&url).await.unwrap();
        c.query_one("SELECT count(*) FROM lock_fencing", &[])
            .await
            .unwrap()
            .get::<_, i64>(0)
    });
    assert_eq!(counter, 1, "V1's seed row inserted once");
    for n in nodes.iter() {
        let log = std::fs::read_to_string(n.log("locker")).unwrap();
        assert!(!log.contains("ERROR"), "{}:\n{log}", n.name);
    }
}

#[test]
fn locker_serves_unavailable_while_the_database_is_down_and_recovers() {
    let t = TestDir::new("dbdown");
    let pg_dir = t.path().join("db");
    std::fs::create_dir_all(&pg_dir).unwrap();
    let pg = Postgres::start(&pg_dir);
    let key = test_key();
    let mut n = Node::new(t.path(), "node-a", &key, &[], Some(pg.url()));
    n.start("locker");
    let mut c = n.client("locker");
    acquire(&mut c, "before", "a", 60_000, 0).unwrap();
    let port = pg.cluster.port;
    drop(pg); // fast shutdown
              // The client retries `unavailable` until its deadline, then reports it.
    c.set_timeout(Duration::from_secs(2));
    let err = c.call("lock.list", json!({})).unwrap_err();
    assert_eq!(err.code(), Some(&Code::Unavailable), "{err}");
    // The daemon still answers ping while its database is gone.
    c.call("ping", json!({})).unwrap();
    let pg = paddock_harness::PgCluster::init(
        &pg_dir,
        &paddock_harness::PgOptions {
            fast: true,
            port: Some(port),
        },
    )
    .unwrap();
    let mut child = pg.start(&t.path().join("logs/postgres2.log")).unwrap();
    let l: LockList = eventually(Duration::from_secs(15), "the locker to reconnect", || {
        c.call("lock.list", json!({}))
            .ok()
            .map(|v| serde_json::from_value(v).unwrap())
    });
    assert_eq!(l.locks.len(), 1, "the acknowledged grant survived: {l:?}");
    assert_eq!(l.locks[0].name, "before");
    paddock_harness::stop_child(
        &mut child,
        nix::sys::signal::Signal::SIGINT,
        Duration::from_secs(10),
    );
}
