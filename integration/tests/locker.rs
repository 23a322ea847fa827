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

/// Five lockers on an empty database, lined up so their migration runs overlap: the
/// test holds the migration lock until all five wait for it. Each migration must then
/// be applied by exactly one of them (counted in their logs, which primary keys in
/// the database could not show), and no migration run may fail and restart.
#[test]
fn five_lockers_starting_together_migrate_once() {
    let t = TestDir::new("migrate");
    let pg = Postgres::start(t.path());
    let url = pg.fresh_db("empty");
    let key = test_key();
    let mut nodes: Vec<Node> = (0..5)
        .map(|i| Node::new(t.path(), &format!("node-{i}"), &key, &[], Some(url.clone())))
        .collect();
    let (holder, rt) = {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let c = rt.block_on(paddock_db::connect(&url)).unwrap();
        rt.block_on(c.execute(
            "SELECT pg_advisory_lock($1)",
            &[&paddock_db::MIGRATION_LOCK_KEY],
        ))
        .unwrap();
        (c, rt)
    };
    for n in nodes.iter_mut() {
        n.spawn("locker");
    }
    eventually(
        Duration::from_secs(20),
        "all five lockers to wait for the migration lock",
        || {
            let waiting: i64 = rt
                .block_on(holder.query_one(
                    "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database \
                     WHERE l.locktype = 'advisory' AND NOT l.granted AND d.datname = current_database()",
                    &[],
                ))
                .unwrap()
                .get(0);
            (waiting == 5).then_some(())
        },
    );
    rt.block_on(holder.execute(
        "SELECT pg_advisory_unlock($1)",
        &[&paddock_db::MIGRATION_LOCK_KEY],
    ))
    .unwrap();
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
        let stats = c.call("stats", json!({})).unwrap();
        assert_eq!(
            stats["loop_restarts"]["migrate"].as_u64().unwrap_or(0),
            0,
            "{}: a migration run failed: {stats}",
            n.name
        );
    }
    let logs: Vec<String> = nodes
        .iter()
        .map(|n| std::fs::read_to_string(n.log("locker")).unwrap())
        .collect();
    for m in paddock_db::embedded_migrations() {
        let applied = logs
            .iter()
            .flat_map(|l| l.lines())
            .filter(|l| l.contains("applied") && l.contains(&m))
            .count();
        assert_eq!(
            applied,
            1,
            "{m} applied {applied} times:\n{}",
            logs.join("\n")
        );
    }
    let rows = rt.block_on(async {
        holder
            .query(
                "SELECT version FROM refinery_schema_history ORDER BY version",
                &[],
            )
            .await
            .unwrap()
            .len()
    });
    assert_eq!(rows, paddock_db::embedded_migrations().len());
    for (n, log) in nodes.iter().zip(&logs) {
        assert!(!log.contains("ERROR"), "{}:\n{log}", n.name);
    }
}

#[test]
fn locker_serves_unavailable_while_the_database_is_down_and_recovers() {
    let t = TestDir::new("dbdown");
    let pg_dir = t.path().join("db");
    std::fs::create_dir_all(&pg_dir).unwrap();
    let mut pg = Postgres::private(&pg_dir);
    let key = test_key();
    let mut n = Node::new(t.path(), "node-a", &key, &[], Some(pg.url()));
    n.start("locker");
    let mut c = n.client("locker");
    acquire(&mut c, "before", "a", 60_000, 0).unwrap();
    pg.stop();
    // The client retries `unavailable` until its deadline, then reports it.
    c.set_timeout(Duration::from_secs(2));
    let err = c.call("lock.list", json!({})).unwrap_err();
    assert_eq!(err.code(), Some(&Code::Unavailable), "{err}");
    // The daemon still answers ping while its database is gone.
    c.call("ping", json!({})).unwrap();
    pg.restart(&t.path().join("logs/postgres2.log"));
    let l: LockList = eventually(Duration::from_secs(15), "the locker to reconnect", || {
        c.call("lock.list", json!({}))
            .ok()
            .map(|v| serde_json::from_value(v).unwrap())
    });
    assert_eq!(l.locks.len(), 1, "the acknowledged grant survived: {l:?}");
    assert_eq!(l.locks[0].name, "before");
}

/// Renews sent right at a lease's expiry race acquires by someone else, many
/// times: a renew and a competing acquire may never both succeed (the renewed lease
/// runs 10 s more, so a granted acquire would be a second holder).
#[test]
fn a_renew_at_expiry_and_a_competing_acquire_never_both_win() {
    let t = TestDir::new("renewrace");
    let pg = Postgres::start(t.path());
    let key = test_key();
    let mut n = Node::new(t.path(), "node-a", &key, &[], Some(pg.url()));
    n.start("locker");
    let mut a = n.client("locker");
    let (mut renews, mut takeovers, mut neither) = (0, 0, 0);
    for i in 0..40 {
        let name = format!("race-{i}");
        let g = acquire(&mut a, &name, "a", 150, 0).unwrap();
        // Both requests leave together, aimed at the lease's last millisecond
        // (the database's clock is this machine's).
        // Aimed around the last millisecond, a little earlier or later each round.
        let at = g.expires + (i % 7) - 4;
        let sleep_until = move || {
            let wait = at - paddock_wire::now_ms();
            if wait > 0 {
                std::thread::sleep(Duration::from_millis(wait as u64));
            }
        };
        let barrier = Arc::new(std::sync::Barrier::new(2));
        let contender = {
            let (rpc, keys, name, barrier) = (
                n.rpc("locker"),
                n.keys.clone(),
                name.clone(),
                barrier.clone(),
            );
            std::thread::spawn(move || {
                let mut b = Client::connect(&rpc, "user:test", keys)
                    .unwrap()
                    .with_timeout(Duration::from_secs(5));
                barrier.wait();
                sleep_until();
                acquire(&mut b, &name, "b", 10_000, 0)
            })
        };
        barrier.wait();
        sleep_until();
        let renewed = a.call(
            "lock.renew",
            json!({"name": name, "token": g.token, "ttl_ms": 10_000}),
        );
        let taken = contender.join().unwrap();
        match (&renewed, &taken) {
            (Ok(r), Ok(t)) => panic!("round {i}: two holders: renewed {r} and granted {t:?}"),
            (Ok(_), Err(e)) => {
                assert_eq!(e.code(), Some(&Code::Held), "round {i}: {e}");
                renews += 1;
            }
            (Err(e), Ok(_)) => {
                assert_eq!(e.code(), Some(&Code::StaleToken), "round {i}: {e}");
                takeovers += 1;
            }
            // The acquire came while the lease was live, the renew after it ended.
            (Err(r), Err(t)) => {
                assert_eq!(r.code(), Some(&Code::StaleToken), "round {i}: {r}");
                assert_eq!(t.code(), Some(&Code::Held), "round {i}: {t}");
                neither += 1;
            }
        }
    }
    eprintln!("{renews} renews won, {takeovers} acquires won, {neither} neither");
}

/// A wait longer than the skew window (shortened to its minimum, 1 s): the CLI
/// re-issues fresh requests, so it is granted when the holder's lease ends instead
/// of failing `stale`; and an acquire by the holder's owner returns its grant.
#[test]
fn a_wait_longer_than_the_skew_window_is_granted() {
    let t = TestDir::new("longwait");
    let pg = Postgres::start(t.path());
    let key = test_key();
    let mut n = Node::new(t.path(), "node-a", &key, &[], Some(pg.url()));
    n.file.wire.skew_ms = 1000;
    n.save();
    n.start("locker");
    let mut a = n.client("locker");
    let ga = acquire(&mut a, "long", "a", 3000, 0).unwrap();
    let out = std::process::Command::new(paddock_harness::bin("paddock").unwrap())
        .args(["--json", "lock", "acquire", "long", "--owner", "b"])
        .args(["--ttl-ms", "60000", "--wait-ms", "10000"])
        .env("PADDOCK_CONFIG", &n.config)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let gb: LockGrant = serde_json::from_slice(&out.stdout).unwrap();
    assert!(gb.token > ga.token, "{gb:?} after {ga:?}");
    // The holder's owner re-issuing its acquire learns its grant, not `held`.
    let again = acquire(&mut a, "long", "b", 60_000, 0).unwrap();
    assert_eq!(again, gb);
    assert_eq!(
        acquire(&mut a, "long", "a", 60_000, 0).unwrap_err().code(),
        Some(&Code::Held)
    );
}

/// A commit whose connection is lost while PostgreSQL waits for a synchronous
/// standby is already durable locally: the locker must answer `unknown_outcome`
/// (never `unavailable`, which promises nothing was done), and re-issuing the
/// acquire with the same owner learns that the grant was made.
#[test]
fn a_commit_lost_in_flight_is_an_unknown_outcome_and_a_reissue_learns_it() {
    let t = TestDir::new("unknown");
    // ALTER SYSTEM below: a server of its own.
    let pg = Postgres::private(t.path());
    let sql = |q: &str| {
        block_on(async {
            let c = paddock_db::connect(&pg.url()).await.unwrap();
            // One statement per call: ALTER SYSTEM refuses a (implicit) transaction.
            for stmt in q.split(';') {
                c.batch_execute(stmt).await.unwrap();
            }
        })
    };
    // The harness runs PostgreSQL with synchronous_commit off (speed); sessions of
    // this database commit synchronously, as a real deployment does.
    sql("ALTER DATABASE paddock SET synchronous_commit = on");
    let key = test_key();
    let mut n = Node::new(t.path(), "node-a", &key, &[], Some(pg.url()));
    n.start("locker");
    let mut a = n.client("locker");
    eventually(Duration::from_secs(20), "the locker to serve locks", || {
        a.call("lock.list", json!({})).ok()
    });
    // A synchronous standby that never comes: every commit waits for it.
    sql("ALTER SYSTEM SET synchronous_standby_names = 'ghost'; SELECT pg_reload_conf()");
    let pending = {
        let (rpc, keys) = (n.rpc("locker"), n.keys.clone());
        std::thread::spawn(move || {
            let mut c = Client::connect(&rpc, "user:test", keys)
                .unwrap()
                .with_timeout(Duration::from_secs(30));
            c.call(
                "lock.acquire",
                json!({"name": "x", "owner": "a", "ttl_ms": 60_000}),
            )
        })
    };
    let pid: i32 = eventually(
        Duration::from_secs(20),
        "the grant's commit to wait for the standby",
        || {
            block_on(async {
                let c = paddock_db::connect(&pg.url()).await.ok()?;
                c.query_opt(
                    "SELECT pid FROM pg_stat_activity WHERE wait_event = 'SyncRep'",
                    &[],
                )
                .await
                .ok()?
                .map(|r| r.get(0))
            })
        },
    );
    sql(&format!("SELECT pg_terminate_backend({pid})"));
    let err = pending.join().unwrap().unwrap_err();
    assert_eq!(err.code(), Some(&Code::UnknownOutcome), "{err}");
    sql("ALTER SYSTEM RESET synchronous_standby_names; SELECT pg_reload_conf()");
    // The grant was made: the same owner re-issuing learns it; another is held.
    let g = eventually(Duration::from_secs(20), "the re-issued acquire", || {
        acquire(&mut a, "x", "a", 60_000, 0).ok()
    });
    let l: LockList = serde_json::from_value(a.call("lock.list", json!({})).unwrap()).unwrap();
    assert_eq!(l.locks.len(), 1, "{l:?}");
    assert_eq!(
        (l.locks[0].owner.as_str(), l.locks[0].token),
        ("a", g.token)
    );
    assert_eq!(
        acquire(&mut a, "x", "b", 60_000, 0).unwrap_err().code(),
        Some(&Code::Held)
    );
}
