//! The blobstore against real processes: a multi-chunk put and get, a commit
//! whose sha256 or size is wrong stored nowhere, hostile names and offsets
//! refused, a pair where every put lands on both members and a lost or corrupt
//! copy is repaired from the other, the pair sync healing a member that was down,
//! idle uploads discarded, and garbage collection that removes only old
//! unreferenced blobs and nothing while the api cannot be asked.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use paddock_integration::*;
use paddock_wire::kinds::{ServiceList, ServiceState};
use paddock_wire::{Client, ClientError, Code};
use serde_json::{json, Value};

const CHUNK: usize = 512 * 1024;

fn b64(d: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(d)
}

fn sha(d: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, d).as_ref())
}

mod hex {
    pub fn encode(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }
}

/// `n` bytes that differ per `seed` (xorshift: no two tests share a blob).
fn data(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn code(r: Result<Value, ClientError>) -> Code {
    match r {
        Ok(v) => panic!("expected an error, got {v}"),
        Err(e) => e
            .code()
            .cloned()
            .unwrap_or_else(|| panic!("not remote: {e}")),
    }
}

fn begin(c: &mut Client) -> String {
    c.call("blob.put.begin", json!({})).unwrap()["upload"]
        .as_str()
        .unwrap()
        .to_string()
}

fn send_chunks(c: &mut Client, upload: &str, d: &[u8]) {
    let mut offset = 0;
    for part in d.chunks(CHUNK) {
        let r = c
            .call(
                "blob.put.chunk",
                json!({"upload": upload, "offset": offset, "data": b64(part)}),
            )
            .unwrap();
        offset += part.len();
        assert_eq!(r["received"], offset as u64);
    }
}

/// A whole put by hand; returns the commit's reply.
fn put(c: &mut Client, d: &[u8]) -> Value {
    let upload = begin(c);
    send_chunks(c, &upload, d);
    c.set_timeout(Duration::from_secs(60));
    let r = c
        .call(
            "blob.put.commit",
            json!({"upload": upload, "sha256": sha(d), "size": d.len()}),
        )
        .unwrap();
    c.set_timeout(Duration::from_secs(5));
    assert_eq!(r["sha256"], sha(d));
    assert_eq!(r["size"], d.len() as u64);
    r
}

/// A whole get by hand, chunk by chunk.
fn get(c: &mut Client, sha256: &str) -> Result<Vec<u8>, ClientError> {
    let mut out = Vec::new();
    c.set_timeout(Duration::from_secs(30));
    loop {
        let r = c.call("blob.get", json!({"sha256": sha256, "offset": out.len()}));
        let r = match r {
            Ok(r) => r,
            Err(e) => {
                c.set_timeout(Duration::from_secs(5));
                return Err(e);
            }
        };
        let part = base64::engine::general_purpose::STANDARD
            .decode(r["data"].as_str().unwrap())
            .unwrap();
        assert!(part.len() <= CHUNK, "a chunk of {} bytes", part.len());
        out.extend_from_slice(&part);
        assert_eq!(r["eof"], out.len() as u64 == r["size"].as_u64().unwrap());
        if r["eof"] == true {
            c.set_timeout(Duration::from_secs(5));
            return Ok(out);
        }
    }
}

fn blob_file(dir: &Path, sha256: &str) -> PathBuf {
    dir.join("blobs").join(&sha256[..2]).join(sha256)
}

fn set_blobstore(n: &mut Node, key: &str, value: toml::Value) {
    n.file
        .daemons
        .get_mut("blobstore")
        .unwrap()
        .other
        .insert(key.into(), value);
    n.save();
}

fn alive_blobstores(hb: &mut Client) -> usize {
    let v = hb.call("registry.list", json!({})).unwrap();
    serde_json::from_value::<ServiceList>(v)
        .unwrap()
        .services
        .iter()
        .filter(|s| s.daemon == "blobstore" && s.state == ServiceState::Alive)
        .count()
}

/// A second blobstore from the same cluster file, by environment overrides: its
/// own rpc port, state dir and blob dir, and its own node name (the registry
/// keeps one daemon of a kind per node: a second incarnation on the same node
/// would be taken for a restart of the first).
struct Second {
    rpc: String,
    dir: PathBuf,
    env: Vec<(String, String)>,
    log: PathBuf,
    child: Option<Child>,
}

impl Second {
    fn new(t: &TestDir, n: &Node) -> Second {
        let rpc = loop {
            let p = free_port().unwrap();
            if !n.file.daemons.values().any(|d| d.rpc == tcp(p)) {
                break tcp(p);
            }
        };
        let dir = t.path().join("blobs-b");
        let env = vec![
            ("PADDOCK__NODE".into(), "node-b".into()),
            ("PADDOCK__DAEMONS__BLOBSTORE__RPC".into(), rpc.clone()),
            (
                "PADDOCK__DAEMONS__BLOBSTORE__DIR".into(),
                dir.display().to_string(),
            ),
            (
                "PADDOCK__STATE_DIR".into(),
                t.path().join("state-b").display().to_string(),
            ),
        ];
        Second {
            rpc,
            dir,
            env,
            log: t.path().join("logs/node-a-blobstore-b.log"),
            child: None,
        }
    }

    fn start(&mut self, n: &Node) {
        let env: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        self.child = Some(
            paddock_harness::spawn_daemon_env("blobstore", &n.config, &self.log, &env).unwrap(),
        );
        paddock_harness::wait_ping(&self.rpc, n.keys.clone(), Duration::from_secs(20))
            .expect("the second blobstore answers ping");
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            paddock_harness::stop_child(
                &mut c,
                nix::sys::signal::Signal::SIGTERM,
                Duration::from_secs(3),
            );
        }
    }

    fn client(&self, n: &Node) -> Client {
        Client::connect(&self.rpc, "user:test", n.keys.clone())
            .unwrap()
            .with_timeout(Duration::from_secs(5))
    }
}

impl Drop for Second {
    fn drop(&mut self) {
        self.stop();
    }
}

#[test]
fn a_multi_chunk_blob_round_trips_and_a_wrong_commit_stores_nothing() {
    let t = TestDir::new("blob-roundtrip");
    let key = test_key();
    let mut n = Node::new(t.path(), "node-a", &key, &[], None);
    n.start("heartbeat");
    n.start("blobstore");
    let dir = n.dir.join("state/blobstore");
    let mut c = n.client("blobstore");

    // 3 MiB and a bit: seven chunks, the last one short.
    let d = data(3 * 1024 * 1024 + 123, 1);
    let r = put(&mut c, &d);
    assert_eq!(r["copies"], 1, "no peer is alive: one copy");
    let s = sha(&d);
    assert_eq!(fs::read(blob_file(&dir, &s)).unwrap(), d, "stored as sent");
    assert_eq!(get(&mut c, &s).unwrap(), d);
    assert_eq!(
        c.call("blob.stat", json!({"sha256": s})).unwrap(),
        json!({"ok": true, "present": true, "size": d.len()})
    );
    let l = c.call("blob.list", json!({})).unwrap();
    assert_eq!(l["blobs"], json!([{"sha256": s, "size": d.len()}]));
    assert_eq!(l["more"], false);
    let l = c.call("blob.list", json!({"after": s})).unwrap();
    assert_eq!(l["blobs"], json!([]));
    // A length asks for less; never more than a chunk.
    let r = c
        .call("blob.get", json!({"sha256": s, "offset": 10, "length": 5}))
        .unwrap();
    assert_eq!(r["data"], b64(&d[10..15]));
    assert_eq!(r["eof"], false);
    let r = c
        .call(
            "blob.get",
            json!({"sha256": s, "offset": 0, "length": 10_000_000}),
        )
        .unwrap();
    assert_eq!(r["data"].as_str().unwrap().len(), b64(&d[..CHUNK]).len());
    // An empty blob is a blob too.
    let r = put(&mut c, b"");
    assert_eq!(r["size"], 0);
    assert_eq!(get(&mut c, &sha(b"")).unwrap(), b"");
    // Committing a blob already here answers at once, whatever the upload holds.
    let again = begin(&mut c);
    let r = c
        .call(
            "blob.put.commit",
            json!({"upload": again, "sha256": s, "size": d.len()}),
        )
        .unwrap();
    assert_eq!(r["copies"], 1);

    // A commit naming another sha256: refused, nothing stored, the upload gone.
    let other = data(700_000, 2);
    let upload = begin(&mut c);
    send_chunks(&mut c, &upload, &other);
    let wrong = sha(b"something else");
    let e = c
        .call(
            "blob.put.commit",
            json!({"upload": upload, "sha256": wrong, "size": other.len()}),
        )
        .unwrap_err();
    assert_eq!(e.code(), Some(&Code::Invalid), "{e}");
    assert!(e.to_string().contains("nothing was stored"), "{e}");
    for x in [&wrong, &sha(&other)] {
        let st = c.call("blob.stat", json!({"sha256": x})).unwrap();
        assert_eq!(st["present"], false);
        assert!(!blob_file(&dir, x).exists());
    }
    assert_eq!(
        code(c.call(
            "blob.put.chunk",
            json!({"upload": upload, "offset": other.len(), "data": b64(b"x")}),
        )),
        Code::NotFound,
        "a refused commit discards its upload"
    );
    // A wrong size: refused the same way.
    let upload = begin(&mut c);
    send_chunks(&mut c, &upload, &other);
    assert_eq!(
        code(c.call(
            "blob.put.commit",
            json!({"upload": upload, "sha256": sha(&other), "size": other.len() - 1}),
        )),
        Code::Invalid
    );
    assert!(!blob_file(&dir, &sha(&other)).exists());
    assert_eq!(
        fs::read_dir(dir.join("uploads")).unwrap().count(),
        0,
        "no upload file is left behind"
    );

    // A copy that went bad on disk, with no peer to repair from: `corrupt` at a
    // get from offset 0; a lost one: `not_found`.
    let mut bytes = fs::read(blob_file(&dir, &s)).unwrap();
    bytes[1000] ^= 1;
    fs::write(blob_file(&dir, &s), &bytes).unwrap();
    let e = get(&mut c, &s).unwrap_err();
    assert_eq!(e.code(), Some(&Code::Other("corrupt".into())), "{e}");
    fs::remove_file(blob_file(&dir, &s)).unwrap();
    let e = get(&mut c, &s).unwrap_err();
    assert_eq!(e.code(), Some(&Code::NotFound), "{e}");
    assert!(e.to_string().contains("missing here"), "{e}");
}

#[test]
fn hostile_names_offsets_and_sizes_are_refused() {
    let t = TestDir::new("blob-hostile");
    let key = test_key();
    let mut n = Node::new(t.path(), "node-a", &key, &[], None);
    set_blobstore(&mut n, "max_blob_size", toml::Value::Integer(1_000_000));
    n.start("heartbeat");
    n.start("blobstore");
    let dir = n.dir.join("state/blobstore");
    let mut c = n.client("blobstore");
    let s = sha(b"x");
    let bad_names = [
        format!("../../../../etc/{}", &s[16..]),
        format!("{}/../{}", &s[..2], &s[5..]),
        s.to_uppercase(),
        s[..63].to_string(),
        String::new(),
    ];
    for bad in &bad_names {
        for (kind, body) in [
            ("blob.get", json!({"sha256": bad, "offset": 0})),
            ("blob.stat", json!({"sha256": bad})),
            ("blob.list", json!({"after": bad})),
        ] {
            let e = c.call(kind, body).unwrap_err();
            assert_eq!(e.code(), Some(&Code::Invalid), "{kind} {bad:?}: {e}");
            assert!(e.to_string().contains("sha256") || e.to_string().contains("after"));
        }
        let upload = begin(&mut c);
        assert_eq!(
            code(c.call(
                "blob.put.commit",
                json!({"upload": upload, "sha256": bad, "size": 0}),
            )),
            Code::Invalid,
            "{bad:?}"
        );
    }
    for bad in ["../../x", "up-../../../../../../../etc/pas", "", "up-0"] {
        assert_eq!(
            code(c.call(
                "blob.put.chunk",
                json!({"upload": bad, "offset": 0, "data": ""}),
            )),
            Code::Invalid,
            "{bad:?}"
        );
    }
    assert_eq!(
        code(c.call(
            "blob.put.chunk",
            json!({"upload": "up-00000000000000000000000000", "offset": 0, "data": ""}),
        )),
        Code::NotFound,
        "a well-formed id of no upload"
    );

    // A chunk at the wrong offset: conflict, saying how much was received.
    let upload = begin(&mut c);
    c.call(
        "blob.put.chunk",
        json!({"upload": upload, "offset": 0, "data": b64(b"hello")}),
    )
    .unwrap();
    for offset in [0u64, 4, 6, 1 << 40] {
        let e = c
            .call(
                "blob.put.chunk",
                json!({"upload": upload, "offset": offset, "data": b64(b"again")}),
            )
            .unwrap_err();
        match &e {
            ClientError::Remote(w) => {
                assert_eq!(w.code, Code::Conflict, "{offset}: {e}");
                assert_eq!(w.extra["received"], 5, "{offset}: {e}");
            }
            other => panic!("{other}"),
        }
    }
    // More than a chunk, and not base64: invalid, the upload untouched.
    let big = vec![7u8; CHUNK + 1];
    assert_eq!(
        code(c.call(
            "blob.put.chunk",
            json!({"upload": upload, "offset": 5, "data": b64(&big)}),
        )),
        Code::Invalid
    );
    assert_eq!(
        code(c.call(
            "blob.put.chunk",
            json!({"upload": upload, "offset": 5, "data": "%%%"}),
        )),
        Code::Invalid
    );
    let r = c
        .call(
            "blob.put.chunk",
            json!({"upload": upload, "offset": 5, "data": b64(b" world")}),
        )
        .unwrap();
    assert_eq!(r["received"], 11);
    // Past max_blob_size (1 MB here): refused and the upload discarded.
    let upload = begin(&mut c);
    send_chunks(&mut c, &upload, &vec![1u8; CHUNK]);
    assert_eq!(
        code(c.call(
            "blob.put.chunk",
            json!({"upload": upload, "offset": CHUNK, "data": b64(&vec![1u8; CHUNK])}),
        )),
        Code::Invalid
    );
    assert_eq!(
        code(c.call(
            "blob.put.chunk",
            json!({"upload": upload, "offset": CHUNK, "data": b64(b"x")}),
        )),
        Code::NotFound
    );
    // A get past the end of a blob is invalid; at the end it is empty and eof.
    let d = b"tiny blob".to_vec();
    put(&mut c, &d);
    assert_eq!(
        code(c.call("blob.get", json!({"sha256": sha(&d), "offset": 10}))),
        Code::Invalid
    );
    let r = c
        .call("blob.get", json!({"sha256": sha(&d), "offset": 9}))
        .unwrap();
    assert_eq!(
        (r["data"].as_str(), r["eof"].as_bool()),
        (Some(""), Some(true))
    );
    // Nothing escaped the blob directory.
    for e in fs::read_dir(dir.join("blobs")).unwrap() {
        let e = e.unwrap();
        assert_eq!(e.file_name().len(), 2, "{:?}", e.path());
    }
}

#[test]
fn a_pair_holds_every_put_twice_and_repairs_a_lost_or_corrupt_copy() {
    let t = TestDir::new("blob-pair");
    let key = test_key();
    let mut n = Node::new(t.path(), "node-a", &key, &[], None);
    set_blobstore(&mut n, "sync_interval_ms", toml::Value::Integer(300));
    n.start("heartbeat");
    n.start("blobstore");
    let dir_a = n.dir.join("state/blobstore");
    let mut b = Second::new(&t, &n);
    b.start(&n);
    let mut hb = n.client("heartbeat");
    eventually(Duration::from_secs(10), "two blobstores alive", || {
        (alive_blobstores(&mut hb) == 2).then_some(())
    });
    let mut a = n.client("blobstore");
    // The first put may come before A has seen B in the registry.
    let mut seed = 100;
    eventually(Duration::from_secs(10), "a put that lands on both", || {
        seed += 1;
        (put(&mut a, &data(1000, seed))["copies"] == 2).then_some(())
    });

    let d = data(2 * 1024 * 1024 + 5, 3);
    let s = sha(&d);
    assert_eq!(put(&mut a, &d)["copies"], 2);
    assert_eq!(fs::read(blob_file(&dir_a, &s)).unwrap(), d);
    assert_eq!(
        fs::read(blob_file(&b.dir, &s)).unwrap(),
        d,
        "the peer holds it before the commit is answered"
    );

    // Lost at B: a get from B fetches it from A first.
    fs::remove_file(blob_file(&b.dir, &s)).unwrap();
    let mut bc = b.client(&n);
    assert_eq!(get(&mut bc, &s).unwrap(), d);
    assert_eq!(
        fs::read(blob_file(&b.dir, &s)).unwrap(),
        d,
        "repaired on disk"
    );

    // One flipped byte at A (A had verified its copy before): repaired from B.
    assert_eq!(get(&mut a, &s).unwrap(), d);
    let mut bytes = fs::read(blob_file(&dir_a, &s)).unwrap();
    bytes[CHUNK + 7] ^= 0x40;
    fs::write(blob_file(&dir_a, &s), &bytes).unwrap();
    assert_eq!(get(&mut a, &s).unwrap(), d, "the get answers good bytes");
    assert_eq!(
        fs::read(blob_file(&dir_a, &s)).unwrap(),
        d,
        "repaired on disk"
    );

    // B down: a put is answered with one copy; B back: the pair sync fills it.
    b.stop();
    eventually(Duration::from_secs(10), "B no longer alive", || {
        (alive_blobstores(&mut hb) == 1).then_some(())
    });
    let d2 = data(600_000, 4);
    let r = eventually(Duration::from_secs(10), "a put with one copy", || {
        let r = put(&mut a, &d2);
        (r["copies"] == 1).then_some(r)
    });
    assert_eq!(r["copies"], 1);
    assert!(!blob_file(&b.dir, &sha(&d2)).exists());
    b.start(&n);
    eventually(Duration::from_secs(15), "B copied what it missed", || {
        (fs::read(blob_file(&b.dir, &sha(&d2))).ok()? == d2).then_some(())
    });
}

/// A stand-in api in this process: a real daemon (BaseDaemon) named "api" whose
/// only kind is `blob.referenced`, answering the blobs the test says.
fn fake_api(config: &Path, referenced: Arc<Mutex<Vec<String>>>, asked: Arc<Mutex<Vec<Value>>>) {
    let cfg = paddock_config::ClusterConfig::load(config).unwrap();
    std::thread::spawn(move || {
        let spec = paddock_daemon::Spec {
            name: "api",
            version: "0.0.0",
            pull: false,
            publish: false,
            user_keys: None,
            check: paddock_daemon::no_check,
            push_to: paddock_daemon::no_push_to,
        };
        paddock_daemon::run(spec, cfg, move |_ctx| async move {
            Ok(
                paddock_daemon::Routes::new().on("blob.referenced", move |env| {
                    asked.lock().unwrap().push(env.body.clone());
                    let blobs = referenced.lock().unwrap().clone();
                    async move { Ok(json!({ "blobs": blobs })) }
                }),
            )
        })
    });
}

#[test]
fn collection_removes_old_unreferenced_blobs_and_nothing_without_the_api() {
    let t = TestDir::new("blob-gc");
    let key = test_key();
    let mut n = Node::new(t.path(), "node-a", &key, &[], None);
    set_blobstore(&mut n, "keep_releases", toml::Value::Integer(3));
    n.start("heartbeat");
    n.start("blobstore");
    let dir = n.dir.join("state/blobstore");
    let mut c = n.client("blobstore");
    let old_referenced = data(1000, 10);
    let old_unreferenced = data(1000, 11);
    let young_unreferenced = data(1000, 12);
    // Put long ago, then put again just now (a push of a tree built before): in
    // use again, so young again.
    let put_again = data(1000, 13);
    for d in [
        &old_referenced,
        &old_unreferenced,
        &young_unreferenced,
        &put_again,
    ] {
        put(&mut c, d);
    }
    // Two of them two hours old (the grace period is the default hour).
    let two_hours_ago = SystemTime::now() - Duration::from_secs(7200);
    for d in [&old_referenced, &old_unreferenced, &put_again] {
        fs::File::options()
            .write(true)
            .open(blob_file(&dir, &sha(d)))
            .unwrap()
            .set_modified(two_hours_ago)
            .unwrap();
    }

    put(&mut c, &put_again);

    // No api: nothing is collected, and the caller is told why.
    let e = c.call("blob.gc", json!({})).unwrap_err();
    assert_eq!(e.code(), Some(&Code::Unavailable), "{e}");
    assert!(e.to_string().contains("nothing was collected"), "{e}");
    for d in [&old_referenced, &old_unreferenced, &young_unreferenced] {
        assert!(blob_file(&dir, &sha(d)).exists());
    }

    let referenced = Arc::new(Mutex::new(vec![sha(&old_referenced)]));
    let asked = Arc::new(Mutex::new(Vec::new()));
    fake_api(&n.config, referenced.clone(), asked.clone());
    paddock_harness::wait_ping(&n.rpc("api"), n.keys.clone(), Duration::from_secs(20)).unwrap();
    let r = eventually(Duration::from_secs(10), "a collection", || {
        c.call("blob.gc", json!({})).ok()
    });
    assert_eq!(r["removed"], json!([sha(&old_unreferenced)]));
    assert_eq!(r["kept"], 3);
    assert!(blob_file(&dir, &sha(&put_again)).exists());
    assert_eq!(asked.lock().unwrap()[0], json!({"keep": 3}));
    assert!(!blob_file(&dir, &sha(&old_unreferenced)).exists());
    assert!(blob_file(&dir, &sha(&old_referenced)).exists());
    assert!(blob_file(&dir, &sha(&young_unreferenced)).exists());
    assert_eq!(
        c.call("blob.stat", json!({"sha256": sha(&old_unreferenced)}))
            .unwrap()["present"],
        false
    );
    // The referenced one stays however old it is; the next run removes nothing.
    let r = c.call("blob.gc", json!({})).unwrap();
    assert_eq!(
        (r["removed"].clone(), r["kept"].clone()),
        (json!([]), json!(3))
    );
}

#[test]
fn an_idle_upload_is_discarded() {
    let t = TestDir::new("blob-idle");
    let key = test_key();
    let mut n = Node::new(t.path(), "node-a", &key, &[], None);
    set_blobstore(&mut n, "upload_idle_ms", toml::Value::Integer(1000));
    n.start("heartbeat");
    n.start("blobstore");
    let dir = n.dir.join("state/blobstore");
    let mut c = n.client("blobstore");
    let upload = begin(&mut c);
    send_chunks(&mut c, &upload, b"some bytes");
    assert_eq!(fs::read_dir(dir.join("uploads")).unwrap().count(), 1);
    // Polling the directory touches nothing: the upload stays idle.
    eventually(
        Duration::from_secs(5),
        "the idle upload's file removed",
        || (fs::read_dir(dir.join("uploads")).unwrap().count() == 0).then_some(()),
    );
    assert_eq!(
        code(c.call(
            "blob.put.chunk",
            json!({"upload": upload, "offset": 10, "data": b64(b"x")}),
        )),
        Code::NotFound
    );
}

/// The same collection with the real api: a release's slug and a buildpack's
/// blob are kept, a blob nothing records is removed.
#[test]
fn collection_keeps_what_the_real_api_references() {
    use paddock_integration::api::ApiCluster;
    let w = ApiCluster::start("blob-gc-api", &["heartbeat", "blobstore"]);
    let dir = w.node.dir.join("state/blobstore");
    let mut c = w.node.client("blobstore");
    let (slug, buildpack, stray) = (data(5000, 20), data(5000, 21), data(5000, 22));
    for d in [&slug, &buildpack, &stray] {
        put(&mut c, d);
        fs::File::options()
            .write(true)
            .open(blob_file(&dir, &sha(d)))
            .unwrap()
            .set_modified(SystemTime::now() - Duration::from_secs(7200))
            .unwrap();
    }
    let mut api = w.cluster();
    api.call("user.create", json!({"name": "owner"})).unwrap();
    api.call("app.create", json!({"name": "shop", "owner": "owner"}))
        .unwrap();
    api.call(
        "release.create",
        json!({"app": "shop", "slug": format!("sha256:{}", sha(&slug)),
               "description": "Deploy", "process_types": {"web": "sh app.sh"}}),
    )
    .unwrap();
    api.call(
        "buildpack.add",
        json!({"name": "shell", "blob": sha(&buildpack)}),
    )
    .unwrap();
    let r = eventually(Duration::from_secs(10), "a collection", || {
        c.call("blob.gc", json!({})).ok()
    });
    assert_eq!(r["removed"], json!([sha(&stray)]), "{r}");
    assert_eq!(r["kept"], 2);
    assert!(blob_file(&dir, &sha(&slug)).exists());
    assert!(blob_file(&dir, &sha(&buildpack)).exists());
    assert!(!blob_file(&dir, &sha(&stray)).exists());
}

#[test]
fn a_second_blobstore_in_the_same_dir_is_refused() {
    let t = TestDir::new("blob-same-dir");
    let key = test_key();
    let mut n = Node::new(t.path(), "node-a", &key, &[], None);
    n.start("heartbeat");
    n.start("blobstore");
    let mut b = Second::new(&t, &n);
    b.env[2].1 = n.dir.join("state/blobstore").display().to_string();
    assert_eq!(b.env[2].0, "PADDOCK__DAEMONS__BLOBSTORE__DIR");
    let env: Vec<(&str, &str)> = b
        .env
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let mut child =
        paddock_harness::spawn_daemon_env("blobstore", &n.config, &b.log, &env).unwrap();
    let status = eventually(
        Duration::from_secs(20),
        "the second blobstore exits",
        || child.try_wait().unwrap(),
    );
    assert_eq!(status.code(), Some(70), "setup failed");
    let log = fs::read_to_string(&b.log).unwrap();
    assert!(log.contains("another blobstore uses"), "{log}");
    // The first one serves on.
    let d = data(100, 30);
    put(&mut n.client("blobstore"), &d);
}
