//! The lease store against a real PostgreSQL, with transactions held open by the
//! test so races are driven exactly, not hoped for.

use std::time::{Duration, Instant};

use paddock_db::Db;
use paddock_harness::{PgCluster, PgOptions};
use paddock_locker::{Attempt, Store};

struct Pg {
    cluster: PgCluster,
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl Pg {
    fn start() -> Pg {
        let dir = tempfile::Builder::new()
            .prefix("paddock-locker-store-")
            .tempdir()
            .unwrap();
        let cluster = PgCluster::init(
            dir.path(),
            &PgOptions {
                fast: true,
                port: None,
            },
        )
        .expect("initdb");
        let child = cluster
            .start(&dir.path().join("postgres.log"))
            .expect("postgres starts");
        cluster.create_db("paddock").expect("createdb");
        Pg {
            cluster,
            child,
            _dir: dir,
        }
    }
}

impl Drop for Pg {
    fn drop(&mut self) {
        paddock_harness::stop_child(
            &mut self.child,
            nix::sys::signal::Signal::SIGINT,
            Duration::from_secs(10),
        );
    }
}

/// Polls `f` every 10 ms until it is true; panics after 10 s.
async fn until(what: &str, mut f: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A renew that has updated the lease row but not yet committed when the lease's
/// old expiry passes, and an acquire by someone else at that moment: the acquire
/// must wait for the renew and then see the lock held. (It used to skip the row,
/// whose committed version had expired, and overwrite the renewed lease.)
#[tokio::test(flavor = "current_thread")]
async fn an_acquire_never_overwrites_a_renew_that_is_committing() {
    let pg = Pg::start();
    let url = pg.cluster.url("paddock");
    paddock_db::migrate(&url).await.unwrap();
    let store = Store::new(Db::new(&url, 4).unwrap());
    let probe = paddock_db::connect(&url).await.unwrap();
    for round in 0..3 {
        let name = format!("race-{round}");
        let Attempt::Granted(first) = store.try_acquire(&name, "a", 300).await.unwrap() else {
            panic!("the free lock is granted");
        };
        // The renew, exactly as `lock.renew` runs it, inside a transaction we hold.
        let mut renewer = paddock_db::connect(&url).await.unwrap();
        let tx = renewer.transaction().await.unwrap();
        let renewed = Store::renew_in(&tx, &name, first.token, 60_000)
            .await
            .unwrap()
            .expect("the unexpired lease renews");
        // Let the old expiry pass (by the database's clock).
        until("the old lease to expire", async || {
            probe
                .query_one(
                    "SELECT clock_timestamp() > to_timestamp($1::float8 / 1000)",
                    &[&(first.expires as f64)],
                )
                .await
                .unwrap()
                .get(0)
        })
        .await;
        // A competing acquire, started now; it must block on the renew's row lock.
        let competing = store.try_acquire(&name, "b", 60_000);
        tokio::pin!(competing);
        let blocked = async {
            until("the acquire to wait for the renew's row lock", async || {
                probe
                    .query_one(
                        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'",
                        &[],
                    )
                    .await
                    .unwrap()
                    .get::<_, i64>(0)
                    == 1
            })
            .await
        };
        tokio::select! {
            r = &mut competing => panic!("round {round}: the acquire did not wait for the committing renew: {r:?}"),
            () = blocked => {}
        }
        tx.commit().await.unwrap();
        match competing.await.unwrap() {
            Attempt::Held { owner, expires } => {
                assert_eq!(owner, "a", "round {round}");
                assert_eq!(expires, renewed.expires, "round {round}");
            }
            other => panic!(
                "round {round}: two holders: a renewed until {} and b got {other:?}",
                renewed.expires
            ),
        }
        // The renewed token is still the grant.
        let row = probe
            .query_one("SELECT owner, token FROM locks WHERE name = $1", &[&name])
            .await
            .unwrap();
        assert_eq!(
            (row.get::<_, String>(0), row.get::<_, i64>(1)),
            ("a".to_string(), first.token)
        );
    }
}

/// An acquire by the owner that holds the lock (a re-issued request) returns the
/// current grant, same token and expiry, instead of `held`; another owner is held.
#[tokio::test(flavor = "current_thread")]
async fn an_acquire_by_the_holder_returns_its_grant() {
    let pg = Pg::start();
    let url = pg.cluster.url("paddock");
    paddock_db::migrate(&url).await.unwrap();
    let store = Store::new(Db::new(&url, 4).unwrap());
    let Attempt::Granted(g) = store.try_acquire("job", "a", 60_000).await.unwrap() else {
        panic!("granted");
    };
    assert_eq!(
        store.try_acquire("job", "a", 60_000).await.unwrap(),
        Attempt::AlreadyHeld(g.clone())
    );
    assert!(matches!(
        store.try_acquire("job", "b", 60_000).await.unwrap(),
        Attempt::Held { owner, .. } if owner == "a"
    ));
}
