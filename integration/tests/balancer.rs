//! paddock-balancer, really started: real sockets, real backend processes
//! (`paddock-test-backend`), real signals. "0 failed" counts every request the
//! load loop sends (see `paddock_integration::http`).

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nix::sys::signal::Signal;
use paddock_integration::http::{self, Conn, Load};
use paddock_integration::{eventually, free_port, tcp, test_key, Node, TestDir};
use paddock_wire::{kinds, Subscriber};
use serde_json::{json, Value};

struct Backend {
    child: Child,
    addr: SocketAddr,
}

impl Backend {
    fn start(id: &str) -> Backend {
        Backend::start_on(id, free_port().unwrap(), &[])
    }

    fn start_on(id: &str, port: u16, env: &[(&str, &str)]) -> Backend {
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let child = Command::new(paddock_harness::bin("paddock-test-backend").unwrap())
            .arg(id)
            .arg(addr.to_string())
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        eventually(Duration::from_secs(10), "the backend listening", || {
            std::net::TcpStream::connect(addr).ok()
        });
        Backend { child, addr }
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A child process killed and reaped however the test ends.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A process the test did not start (an upgrade's successor): stopped through a
/// pidfd however the test ends.
struct Stopped(Option<paddock_harness::pidfile::Proc>);

impl Drop for Stopped {
    fn drop(&mut self) {
        if let Some(p) = &self.0 {
            p.stop(Signal::SIGTERM, Duration::from_secs(5));
        }
    }
}

struct Bal {
    node: Node,
    http: SocketAddr,
    https: SocketAddr,
    admin: SocketAddr,
    _dir: TestDir,
}

fn addr_of(ep: &str) -> SocketAddr {
    ep.trim_start_matches("tcp://").parse().unwrap()
}

/// A node whose cluster file has a balancer (with `settings` added), not started.
fn balancer_node(name: &str, settings: &[(&str, toml::Value)]) -> Bal {
    let dir = TestDir::new(name);
    let mut node = Node::new(dir.path(), "n1", &test_key(), &[], None);
    let sec = node.file.daemons.get_mut("balancer").unwrap();
    // Fast checks keep the tests short.
    sec.other
        .insert("health_interval_ms".into(), toml::Value::Integer(200));
    sec.other
        .insert("health_timeout_ms".into(), toml::Value::Integer(200));
    for (k, v) in settings {
        sec.other.insert(k.to_string(), v.clone());
    }
    let ep = |k: &str| addr_of(sec.other[k].as_str().unwrap());
    let (http, https, admin) = (ep("http"), ep("https"), ep("admin"));
    node.save();
    Bal {
        node,
        http,
        https,
        admin,
        _dir: dir,
    }
}

fn balancer(name: &str, settings: &[(&str, toml::Value)]) -> Bal {
    let mut b = balancer_node(name, settings);
    b.node.start("balancer");
    b
}

impl Bal {
    fn call(&self, kind: &str, body: Value) -> Result<Value, paddock_wire::ClientError> {
        self.node.client("balancer").call(kind, body)
    }

    fn ok(&self, kind: &str, body: Value) -> Value {
        self.call(kind, body.clone())
            .unwrap_or_else(|e| panic!("{kind} {body}: {e}"))
    }

    fn err_code(&self, kind: &str, body: Value) -> (String, String) {
        match self.call(kind, body) {
            Ok(v) => panic!("{kind} succeeded: {v}"),
            Err(paddock_wire::ClientError::Remote(e)) => (e.code.as_str().to_string(), e.message),
            Err(e) => panic!("{kind}: not a remote error: {e}"),
        }
    }

    fn route(&self, app: &str, domains: &[&str], backends: &[(&str, &Backend)]) {
        self.ok(kinds::ROUTE_SET, json!({"app": app, "domains": domains}));
        for (id, b) in backends {
            self.ok(
                kinds::BACKEND_ADD,
                json!({"app": app, "id": id, "addr": b.addr.to_string()}),
            );
        }
    }

    fn get(&self, host: &str, path: &str) -> http::Resp {
        http::get(self.http, host, path).unwrap()
    }

    /// The balancer that holds the pid file once it is not `old` (an upgrade's
    /// successor), and the guard that stops it.
    fn successor(&self, old: i32) -> (i32, Stopped) {
        let pidfile = self.node.dir.join("state/balancer.pid");
        let new = eventually(
            Duration::from_secs(10),
            "the successor holding the pid file",
            || paddock_harness::pidfile::read_pid(&pidfile).filter(|p| *p != old),
        );
        (new, Stopped(paddock_harness::pidfile::Proc::open(new)))
    }

    /// Adds `[daemons.scheduler]` (rpc and pub) to the cluster file, for the
    /// stand-in scheduler.
    fn add_test_scheduler(&mut self) {
        self.node.add_daemon("scheduler");
        let sched_pub = tcp(free_port().unwrap());
        self.node
            .file
            .daemons
            .get_mut("scheduler")
            .unwrap()
            .other
            .insert("pub".into(), toml::Value::String(sched_pub));
        self.node.save();
    }

    /// Starts `paddock-testsched` serving the table in `table`.
    fn spawn_test_scheduler(&mut self, table: &std::path::Path, silent: bool) {
        let tf = table.display().to_string();
        let mut env = vec![("PADDOCK_TESTSCHED_TABLE", tf.as_str())];
        if silent {
            env.push(("PADDOCK_TESTSCHED_SILENT", "1"));
        }
        self.node.spawn_bin("scheduler", "paddock-testsched", &env);
    }

    /// Backend `id` of `app` as `balancer.stats` shows it (null if absent).
    fn backend(&self, app: &str, id: &str) -> Value {
        let s = self.ok(kinds::BALANCER_STATS, json!({}));
        s["apps"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["app"] == app)
            .and_then(|a| {
                a["backends"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|b| b["id"] == id)
                    .cloned()
            })
            .unwrap_or_default()
    }

    fn backend_state(&self, app: &str, id: &str) -> String {
        self.backend(app, id)["state"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// `GET /hold<release>` to `host` on a thread of its own, returned once it is
    /// in flight to backend `id` of `app` (the test backend answers it when the
    /// file `release` exists).
    fn held_request(
        &self,
        app: &str,
        id: &str,
        host: &'static str,
        release: &std::path::Path,
    ) -> std::thread::JoinHandle<http::Resp> {
        let (addr, hold) = (self.http, format!("/hold{}", release.display()));
        let req = std::thread::spawn(move || http::get(addr, host, &hold).unwrap());
        eventually(Duration::from_secs(5), "the request in flight", || {
            (self.backend(app, id)["active"] == 1).then_some(())
        });
        req
    }
}

#[test]
fn routes_by_host_and_wildcard_with_clear_404_503_and_forwarded_headers() {
    let bal = balancer("bal-route", &[]);
    let (b1, b2) = (Backend::start("b1"), Backend::start("b2"));
    bal.route("a", &["a.example.com"], &[("b1", &b1)]);
    bal.route("w", &["*.apps.example.com"], &[("b2", &b2)]);
    bal.route("empty", &["empty.example.com"], &[]);

    let r = bal.get("a.example.com", "/x?y=1");
    assert_eq!((r.status, r.text().as_str()), (200, "b1 /x\n"));
    let r = bal.get("A.Example.COM:8080", "/");
    assert_eq!(
        r.header("x-backend"),
        Some("b1"),
        "case and port are ignored"
    );
    assert_eq!(
        bal.get("foo.apps.example.com", "/").header("x-backend"),
        Some("b2")
    );
    assert_eq!(
        bal.get("a.b.APPS.example.com", "/").header("x-backend"),
        Some("b2")
    );

    let r = bal.get("nowhere.example.com", "/");
    assert_eq!(r.status, 404);
    assert!(
        r.text().contains("No app is routed for the host"),
        "{}",
        r.text()
    );
    assert!(r.text().contains("nowhere.example.com"));
    assert!(r.header("x-request-id").is_some());
    // A hostile Host is refused, and not echoed into the page.
    let r = bal.get("<script>.example.com", "/");
    assert_eq!(r.status, 400);
    assert!(!r.text().contains("<script>"), "{}", r.text());

    let r = bal.get("empty.example.com", "/");
    assert_eq!(r.status, 503);
    assert_eq!(r.header("retry-after"), Some("5"));
    assert!(r.text().contains("no backend in rotation"), "{}", r.text());

    // Forwarded headers, a request id made, Via.
    let r = bal.get("a.example.com", "/headers");
    let h: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["x-forwarded-port"], bal.http.port().to_string());
    assert_eq!(h["x-forwarded-host"], "a.example.com");
    assert_eq!(h["via"], "1.1 paddock");
    let rid = h["x-request-id"].as_str().unwrap();
    assert_eq!(rid.len(), 32, "{rid}");
    assert_eq!(
        r.header("x-request-id"),
        None,
        "the backend did not echo it; we add none to responses"
    );
    // A request id is kept; X-Forwarded-For is appended to; a client's
    // X-Forwarded-Proto is not believed; hop-by-hop headers do not pass.
    let r = http::raw(
        bal.http,
        b"GET /headers HTTP/1.1\r\nHost: a.example.com\r\nX-Request-Id: abc-123\r\nX-Forwarded-For: 10.0.0.9\r\nX-Forwarded-Proto: https\r\nConnection: keep-alive, X-Secret\r\nX-Secret: 1\r\nKeep-Alive: timeout=5\r\n\r\n",
    )
    .unwrap();
    let h: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(h["x-request-id"], "abc-123");
    assert_eq!(h["x-forwarded-for"], "10.0.0.9, 127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert!(
        h.get("x-secret").is_none() && h.get("keep-alive").is_none(),
        "{h}"
    );

    // Bad rpc writes: a clear error, nothing changed, still serving.
    let (code, msg) = bal.err_code(
        kinds::ROUTE_SET,
        json!({"app": "b", "domains": ["a.example.com"]}),
    );
    assert_eq!(code, "conflict");
    assert!(msg.contains("\"a\""), "{msg}");
    let (code, msg) = bal.err_code(
        kinds::ROUTE_SET,
        json!({"app": "b", "domains": ["bad domain"]}),
    );
    assert_eq!(code, "invalid", "{msg}");
    let (code, _) = bal.err_code(
        kinds::BACKEND_ADD,
        json!({"app": "zz", "id": "1", "addr": "127.0.0.1:1"}),
    );
    assert_eq!(code, "not_found");
    let (code, msg) = bal.err_code(
        kinds::BACKEND_ADD,
        json!({"app": "a", "id": "1", "addr": "example.com:80"}),
    );
    assert_eq!(code, "invalid");
    assert!(msg.contains("IP:port"), "{msg}");
    let (code, _) = bal.err_code(
        kinds::ROUTE_SET,
        json!({"app": "b", "domain": ["x.example.com"]}),
    );
    assert_eq!(code, "invalid");
    let list = bal.ok(kinds::ROUTES_LIST, json!({}));
    assert_eq!(list["apps"].as_array().unwrap().len(), 3, "{list}");
    assert_eq!(bal.get("a.example.com", "/").status, 200);
}

#[test]
fn backend_connections_are_pooled_and_reused() {
    // One proxy thread: each thread has its own pool (its connections' tasks run
    // on it), so with one, every request must reuse the same backend connection.
    let bal = balancer("bal-pool", &[("threads", toml::Value::Integer(1))]);
    let b1 = Backend::start("b1");
    bal.route("a", &["a.example.com"], &[("b1", &b1)]);
    let mut conns = std::collections::BTreeSet::new();
    for i in 0..20 {
        // New client connections each time, a HEAD among them (an empty body
        // hyper never polls must still give the connection back).
        let req = if i % 3 == 0 { "HEAD" } else { "GET" };
        let r = http::raw(
            bal.http,
            format!("{req} /big/100 HTTP/1.1\r\nHost: a.example.com\r\n\r\n").as_bytes(),
        )
        .unwrap();
        assert_eq!(r.status, 200);
        conns.insert(r.header("x-conn").unwrap().to_string());
    }
    assert_eq!(
        conns.len(),
        1,
        "sequential requests reuse one backend connection: {conns:?}"
    );
    let s = bal.ok(kinds::BALANCER_STATS, json!({}));
    assert_eq!(s["apps"][0]["backends"][0]["pooled_idle"], 1);
}

#[test]
fn routes_and_certificates_survive_a_restart() {
    let mut bal = balancer("bal-persist", &[]);
    let b1 = Backend::start("b1");
    bal.route("a", &["a.example.com"], &[("b1", &b1)]);
    let (cert, key) = self_signed(&["a.example.com"]);
    bal.ok(
        kinds::CERT_SET,
        json!({"domains": ["a.example.com"], "cert_pem": cert, "key_pem": key}),
    );
    bal.node.signal("balancer", Signal::SIGTERM);
    assert_eq!(
        bal.node.wait_exit("balancer", Duration::from_secs(20)),
        Some(0)
    );
    bal.node.start("balancer");
    assert_eq!(
        bal.get("a.example.com", "/").header("x-backend"),
        Some("b1")
    );
    let certs = bal.ok(kinds::CERT_LIST, json!({}));
    assert_eq!(certs["certs"][0]["domains"][0], "a.example.com");
    let file = bal.node.dir.join("state/balancer/routes.json");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // The key is in the file (0600) but in no listing and no log.
    assert!(!certs.to_string().contains("PRIVATE KEY"));
    let log = std::fs::read_to_string(bal.node.log("balancer")).unwrap();
    assert!(!log.contains("PRIVATE KEY"));
}

fn self_signed(names: &[&str]) -> (String, String) {
    let c =
        rcgen::generate_simple_self_signed(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .unwrap();
    (c.cert.pem(), c.key_pair.serialize_pem())
}

/// A TLS connection with `sni`, trusting only `roots`; returns the server's leaf
/// certificate and the response to a GET.
fn tls_get(addr: SocketAddr, sni: &str, roots: &[&str]) -> Result<(Vec<u8>, String), String> {
    use std::io::{Read, Write};
    let mut store = rustls::RootCertStore::empty();
    for pem in roots {
        for c in rustls_pemfile_certs(pem) {
            store.add(c).unwrap();
        }
    }
    let cfg = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(store)
    .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from(sni.to_string()).unwrap();
    let mut conn = rustls::ClientConnection::new(std::sync::Arc::new(cfg), name).unwrap();
    let mut sock = std::net::TcpStream::connect(addr).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut tls = rustls::Stream::new(&mut conn, &mut sock);
    tls.write_all(
        format!("GET /headers HTTP/1.1\r\nHost: {sni}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    let _ = tls.read_to_end(&mut out);
    let leaf = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.as_ref().to_vec())
        .ok_or("no certificate")?;
    Ok((leaf, String::from_utf8_lossy(&out).into_owned()))
}

fn rustls_pemfile_certs(pem: &str) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
        .map(|c| c.unwrap())
        .collect()
}

#[test]
fn https_picks_the_certificate_by_sni_and_refuses_an_unknown_name() {
    let bal = balancer("bal-tls", &[]);
    let b1 = Backend::start("b1");
    bal.route(
        "a",
        &["a.example.com", "b.example.com", "c.example.com"],
        &[("b1", &b1)],
    );
    let (ca, ka) = self_signed(&["a.example.com"]);
    let (cb, kb) = self_signed(&["b.example.com"]);
    bal.ok(
        kinds::CERT_SET,
        json!({"domains": ["a.example.com"], "cert_pem": ca, "key_pem": ka}),
    );
    bal.ok(
        kinds::CERT_SET,
        json!({"domains": ["B.example.com"], "cert_pem": cb, "key_pem": kb}),
    );
    // A key that is not the certificate's: refused, saying so.
    let (code, msg) = bal.err_code(
        kinds::CERT_SET,
        json!({"domains": ["c.example.com"], "cert_pem": ca, "key_pem": kb}),
    );
    assert_eq!(code, "invalid");
    assert!(msg.contains("does not belong"), "{msg}");
    let (code, _) = bal.err_code(
        kinds::CERT_SET,
        json!({"domains": ["c.example.com"], "cert_pem": "junk", "key_pem": kb}),
    );
    assert_eq!(code, "invalid");
    // a's certificate set for c, a name it does not cover: refused, so c can
    // never be served a's certificate.
    let (code, msg) = bal.err_code(
        kinds::CERT_SET,
        json!({"domains": ["c.example.com"], "cert_pem": ca, "key_pem": ka}),
    );
    assert_eq!(code, "invalid");
    assert!(msg.contains("does not cover \"c.example.com\""), "{msg}");

    let (leaf_a, resp) = tls_get(bal.https, "a.example.com", &[&ca]).unwrap();
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.contains("\"x-forwarded-proto\":\"https\""), "{resp}");
    assert!(
        resp.contains(&format!("\"x-forwarded-port\":\"{}\"", bal.https.port())),
        "{resp}"
    );
    let (leaf_b, resp) = tls_get(bal.https, "b.example.com", &[&cb]).unwrap();
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert_ne!(leaf_a, leaf_b);
    // c has a route but no certificate: a handshake failure, not a's or b's cert.
    let e = tls_get(bal.https, "c.example.com", &[&ca, &cb]).unwrap_err();
    assert!(
        e.to_lowercase().contains("handshake") || e.contains("alert") || e.contains("Unrecognised"),
        "{e}"
    );
    let stats = bal.ok(kinds::BALANCER_STATS, json!({}));
    assert!(
        stats["balancer"]["tls_handshake_failures"]
            .as_u64()
            .unwrap()
            >= 1,
        "{stats}"
    );
    // Removing a certificate takes it out of service.
    bal.ok(kinds::CERT_REMOVE, json!({"domains": ["b.example.com"]}));
    assert!(tls_get(bal.https, "b.example.com", &[&cb]).is_err());
    assert!(tls_get(bal.https, "a.example.com", &[&ca]).is_ok());
    // A connection that leaves before any handshake is not a failure.
    let before = bal.ok(kinds::BALANCER_STATS, json!({}))["balancer"].clone();
    drop(std::net::TcpStream::connect(bal.https).unwrap());
    let after = eventually(
        Duration::from_secs(5),
        "the abandoned connection counted",
        || {
            let b = bal.ok(kinds::BALANCER_STATS, json!({}))["balancer"].clone();
            (b["tls_abandoned"].as_u64()? > before["tls_abandoned"].as_u64()?).then_some(b)
        },
    );
    assert_eq!(
        after["tls_handshake_failures"],
        before["tls_handshake_failures"]
    );
}

#[test]
fn kill_9_of_one_of_two_backends_under_load_fails_no_request() {
    let bal = balancer("bal-kill", &[]);
    let (mut b1, b2) = (Backend::start("b1"), Backend::start("b2"));
    bal.route("a", &["a.example.com"], &[("b1", &b1), ("b2", &b2)]);
    let load = Load::start(bal.http, "a.example.com", "/", 4);
    std::thread::sleep(Duration::from_millis(800));
    b1.kill9();
    std::thread::sleep(Duration::from_millis(1500));
    let r = load.finish();
    assert_eq!(r.failed, 0, "{r:?}");
    assert!(r.ok > 200, "{r:?}");
    assert!(
        r.by_backend.get("b1").copied().unwrap_or(0) > 0,
        "b1 served before it died: {r:?}"
    );
    assert_eq!(bal.backend_state("a", "b1"), "ejected");
    // Re-admitted by health checks once it is back on its port.
    let _b1 = Backend::start_on("b1-again", b1.addr.port(), &[]);
    eventually(Duration::from_secs(10), "b1 re-admitted", || {
        (bal.backend_state("a", "b1") == "up").then_some(())
    });
    eventually(Duration::from_secs(10), "b1 serving again", || {
        (bal.get("a.example.com", "/").header("x-backend") == Some("b1-again")).then_some(())
    });
}

#[test]
fn a_request_a_backend_took_is_resent_only_when_bodiless_and_idempotent() {
    let bal = balancer("bal-retry", &[]);
    // `a` weighs 100 against `b`'s 1, so it is always picked first.
    let route = |a: &Backend, b: &Backend| {
        bal.ok(
            kinds::ROUTE_SET,
            json!({"app": "r", "domains": ["r.example.com"]}),
        );
        for (id, be, w) in [("a", a, 100), ("b", b, 1)] {
            bal.ok(
                kinds::BACKEND_ADD,
                json!({"app": "r", "id": id, "addr": be.addr.to_string(), "weight": w}),
            );
        }
    };
    let (a, b) = (Backend::start("a"), Backend::start("b"));
    route(&a, &b);
    assert_eq!(bal.get("r.example.com", "/").header("x-backend"), Some("a"));
    // A GET that `a` read and died holding: sent again, to `b`.
    let r = bal.get("r.example.com", "/vanish/a");
    assert_eq!(
        (r.status, r.header("x-backend")),
        (200, Some("b")),
        "{}",
        r.text()
    );
    // A POST that a backend read and died holding is never sent again: 502.
    bal.ok(kinds::ROUTE_REMOVE, json!({"app": "r"}));
    let (a, b2) = (Backend::start("a2"), Backend::start("b2"));
    route(&a, &b2);
    let post = b"POST /vanish/a2 HTTP/1.1\r\nHost: r.example.com\r\nContent-Length: 5\r\n\r\nhello";
    let r = http::raw(bal.http, post).unwrap();
    assert_eq!(r.status, 502, "{}", r.text());
    assert!(
        r.text().contains("closed the connection without answering"),
        "{}",
        r.text()
    );
    let stats = bal.ok(kinds::BALANCER_STATS, json!({}));
    let app = stats["apps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["app"] == "r")
        .unwrap();
    let b2_requests = app["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["id"] == "b")
        .map(|x| x["stats"]["requests"].as_u64().unwrap())
        .unwrap();
    assert_eq!(
        b2_requests, 0,
        "the POST reached the second backend: {stats}"
    );
    // A POST that nothing was sent of (the first backend refuses connections)
    // goes to the other backend.
    drop(a);
    let post = b"POST / HTTP/1.1\r\nHost: r.example.com\r\nContent-Length: 5\r\n\r\nhello";
    let r = http::raw(bal.http, post).unwrap();
    assert_eq!(
        (r.status, r.header("x-backend")),
        (200, Some("b2")),
        "{}",
        r.text()
    );
    assert_eq!(r.text(), "b2 got 5 bytes\n");
    drop(b);
}

#[test]
fn when_every_backend_is_ejected_they_are_tried_anyway() {
    // Health checks too slow to matter here: only panic mode can serve.
    let bal = balancer(
        "bal-panic",
        &[("health_interval_ms", toml::Value::Integer(60_000))],
    );
    let mut b1 = Backend::start("b1");
    bal.route("a", &["a.example.com"], &[("b1", &b1)]);
    assert_eq!(bal.get("a.example.com", "/").status, 200);
    let port = b1.addr.port();
    b1.kill9();
    // Failures in a row eject it (502s: it was healthy until then) ...
    let mut statuses = vec![];
    while bal.backend_state("a", "b1") != "ejected" {
        statuses.push(bal.get("a.example.com", "/").status);
        assert!(statuses.len() <= 10, "never ejected: {statuses:?}");
    }
    assert!(statuses.iter().all(|s| *s == 502), "{statuses:?}");
    // ... and then, tried anyway and failing, the app has no healthy backend: a
    // 503 with Retry-After, not a 502.
    let r = bal.get("a.example.com", "/");
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.header("retry-after"), Some("5"));
    assert!(
        r.text().contains("No backend of the app is healthy"),
        "{}",
        r.text()
    );
    // The app is back at once (as a runner restarts it): served at once, still ejected.
    let _b1 = Backend::start_on("b1-back", port, &[]);
    let r = bal.get("a.example.com", "/");
    assert_eq!((r.status, r.header("x-backend")), (200, Some("b1-back")));
}

#[test]
fn a_drain_under_load_fails_nothing_lets_in_flight_finish_then_says_so() {
    let bal = balancer(
        "bal-drain",
        &[("drain_timeout_ms", toml::Value::Integer(1500))],
    );
    let (b1, b2) = (Backend::start("b1"), Backend::start("b2"));
    bal.route("a", &["a.example.com"], &[("b1", &b1), ("b2", &b2)]);
    let mut sub = Subscriber::connect(
        &[tcp(bal.node.ports.balancer_pub)],
        &[kinds::BACKEND_DRAINED],
        bal.node.keys.clone(),
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let load = Load::start(bal.http, "a.example.com", "/", 4);
    std::thread::sleep(Duration::from_millis(500));
    let reply = bal.ok(kinds::BACKEND_DRAIN, json!({"app": "a", "id": "b1"}));
    assert_eq!(reply["already_draining"], false);
    let ev = sub
        .next(Duration::from_secs(5))
        .unwrap()
        .expect("backend.drained");
    assert_eq!(ev.body["id"], "b1");
    assert_eq!(ev.body["closed"], 0);
    let before = load_counts(&bal, "b1");
    std::thread::sleep(Duration::from_millis(700));
    let r = load.finish();
    assert_eq!(r.failed, 0, "{r:?}");
    assert_eq!(
        load_counts(&bal, "b1"),
        before,
        "a drained backend got new requests"
    );
    assert_eq!(bal.backend_state("a", "b1"), "drained");

    // One backend, a slow request in flight: the drain waits for it.
    let slow = Backend::start("slow");
    bal.route("s", &["s.example.com"], &[("slow", &slow)]);
    let release = bal.node.dir.join("release");
    let req = bal.held_request("s", "slow", "s.example.com", &release);
    bal.ok(kinds::BACKEND_DRAIN, json!({"app": "s", "id": "slow"}));
    assert_eq!(
        bal.get("s.example.com", "/").status,
        503,
        "nothing new reaches a draining backend"
    );
    assert!(
        sub.next(Duration::from_millis(500)).unwrap().is_none(),
        "drained while a request was in flight"
    );
    std::fs::write(&release, "").unwrap();
    let resp = req.join().unwrap();
    assert_eq!(resp.status, 200, "the request in flight finished");
    let ev = sub
        .next(Duration::from_secs(5))
        .unwrap()
        .expect("backend.drained");
    assert_eq!(ev.body["id"], "slow");
    assert_eq!(ev.body["closed"], 0);

    // A websocket outlives the drain: the deadline closes it, and the event says so.
    bal.route("ws", &["ws.example.com"], &[("w", &b2)]);
    let mut ws = websocket(bal.http, "ws.example.com");
    bal.ok(kinds::BACKEND_DRAIN, json!({"app": "ws", "id": "w"}));
    let ev = sub
        .next(Duration::from_secs(5))
        .unwrap()
        .expect("backend.drained at the deadline");
    assert_eq!(ev.body["id"], "w");
    assert_eq!(ev.body["closed"], 1);
    ws.send(b"after").ok();
    let mut buf = [0u8; 16];
    use std::io::Read;
    let n = ws_stream(&mut ws).read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "the tunnel was closed at the deadline");
}

#[test]
fn a_backend_stalled_mid_body_is_cut_off_and_a_drain_deadline_ends_a_request_awaiting_its_head() {
    use std::io::{Read, Write};
    let bal = balancer(
        "bal-stall",
        &[
            ("request_timeout_ms", toml::Value::Integer(2000)),
            ("drain_timeout_ms", toml::Value::Integer(600)),
        ],
    );
    let (b1, b2) = (Backend::start("b1"), Backend::start("b2"));
    bal.route("st", &["st.example.com"], &[("b1", &b1)]);
    bal.route("hd", &["hd.example.com"], &[("b2", &b2)]);

    // A backend that sends 10 of the 100 bytes it promised, then nothing: the
    // client's connection is closed (after request_timeout), not held for ever.
    let mut c = std::net::TcpStream::connect(bal.http).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    c.write_all(b"GET /stall HTTP/1.1\r\nHost: st.example.com\r\n\r\n")
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match c.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => panic!(
                "still open after 20 s ({e}); got {:?}",
                String::from_utf8_lossy(&got)
            ),
        }
    }
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        text.ends_with("0123456789"),
        "only what the backend sent: {text}"
    );
    eventually(Duration::from_secs(5), "nothing in flight to b1", || {
        (bal.backend("st", "b1")["active"] == 0).then_some(())
    });

    // A request still waiting for its response head when the drain deadline
    // passes is ended then (a 502 saying so), not left to request_timeout.
    let mut sub = Subscriber::connect(
        &[tcp(bal.node.ports.balancer_pub)],
        &[kinds::BACKEND_DRAINED],
        bal.node.keys.clone(),
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let never = bal.node.dir.join("never-released");
    let req = bal.held_request("hd", "b2", "hd.example.com", &never);
    bal.ok(kinds::BACKEND_DRAIN, json!({"app": "hd", "id": "b2"}));
    let r = req.join().unwrap();
    assert_eq!(r.status, 502, "{}", r.text());
    assert!(
        r.text().contains("drained and had not answered"),
        "{}",
        r.text()
    );
    let ev = sub
        .next(Duration::from_secs(5))
        .unwrap()
        .expect("backend.drained");
    assert_eq!(ev.body["id"], "b2");
    assert_eq!(ev.body["closed"], 1, "{}", ev.body);
}

fn load_counts(bal: &Bal, id: &str) -> u64 {
    let s = bal.ok(kinds::BALANCER_STATS, json!({}));
    s["apps"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["id"] == id)
        .map(|b| b["stats"]["requests"].as_u64().unwrap())
        .unwrap()
}

fn ws_stream(c: &mut Conn) -> &mut std::net::TcpStream {
    c.stream()
}

/// A websocket handshake through the balancer; returns the open connection.
fn websocket(addr: SocketAddr, host: &str) -> Conn {
    let mut c = Conn::connect(addr).unwrap();
    let key = "dGhlIHNhbXBsZSBub25jZQ==";
    let r = c
        .request(format!("GET /ws HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").as_bytes())
        .unwrap()
        .unwrap();
    assert_eq!(r.status, 101, "{r:?}");
    assert_eq!(
        r.header("sec-websocket-accept"),
        Some("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
    );
    c
}

fn ws_echo(c: &mut Conn, msg: &[u8]) -> Vec<u8> {
    use std::io::Read;
    c.send(msg).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    while got.len() < msg.len() {
        let n = ws_stream(c).read(&mut buf).unwrap();
        assert!(n > 0, "the tunnel closed");
        got.extend_from_slice(&buf[..n]);
    }
    got
}

#[test]
fn route_updates_under_load_fail_nothing_and_a_websocket_survives_them() {
    let bal = balancer("bal-updates", &[]);
    let (b1, b2, b3) = (
        Backend::start("b1"),
        Backend::start("b2"),
        Backend::start("b3"),
    );
    bal.route("a", &["a.example.com"], &[("b1", &b1), ("b2", &b2)]);
    let mut ws = websocket(bal.http, "a.example.com");
    assert_eq!(ws_echo(&mut ws, b"hello"), b"hello");
    let load = Load::start(bal.http, "a.example.com", "/", 4);
    for i in 0..25 {
        let extra = format!("x{i}.example.com");
        bal.ok(
            kinds::ROUTE_SET,
            json!({"app": "a", "domains": ["a.example.com", extra]}),
        );
        bal.ok(
            kinds::BACKEND_ADD,
            json!({"app": "a", "id": "b3", "addr": b3.addr.to_string(), "weight": 1 + i % 3}),
        );
        bal.ok(
            kinds::ROUTE_SET,
            json!({"app": format!("other{i}"), "domains": [format!("o{i}.example.com")]}),
        );
        std::thread::sleep(Duration::from_millis(40));
        bal.ok(kinds::BACKEND_REMOVE, json!({"app": "a", "id": "b3"}));
        bal.ok(kinds::ROUTE_REMOVE, json!({"app": format!("other{i}")}));
        assert_eq!(
            ws_echo(&mut ws, format!("m{i}").as_bytes()),
            format!("m{i}").as_bytes()
        );
    }
    let r = load.finish();
    assert_eq!(r.failed, 0, "{r:?}");
    assert!(
        r.by_backend.contains_key("b3"),
        "the added backend took traffic: {r:?}"
    );
    assert_eq!(ws_echo(&mut ws, b"still here"), b"still here");
}

#[test]
fn slowloris_clients_hold_nothing_up_and_are_cut_off() {
    let bal = balancer(
        "bal-slow",
        &[
            ("header_timeout_ms", toml::Value::Integer(1000)),
            ("max_connections", toml::Value::Integer(10)),
        ],
    );
    let b1 = Backend::start("b1");
    bal.route("a", &["a.example.com"], &[("b1", &b1)]);
    // Twice as many slow clients as there are slots.
    let mut slow: Vec<std::net::TcpStream> = (0..20)
        .map(|_| {
            let mut s = std::net::TcpStream::connect(bal.http).unwrap();
            use std::io::Write;
            s.write_all(b"GET / HTTP/1.1\r\nHost: a.exa").unwrap();
            s
        })
        .collect();
    // Others are still served: the header deadline frees the slots they took.
    for _ in 0..5 {
        assert_eq!(bal.get("a.example.com", "/").status, 200);
    }
    // Each slow client trickles a byte every 200 ms; all are closed by the deadline.
    eventually(Duration::from_secs(15), "slow clients cut off", || {
        use std::io::{Read, Write};
        let mut open = 0;
        for s in slow.iter_mut() {
            s.set_read_timeout(Some(Duration::from_millis(1))).unwrap();
            let _ = s.write_all(b"m");
            let mut b = [0u8; 64];
            match s.read(&mut b) {
                Ok(0) => {}
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => open += 1,
                Err(_) => {}
            }
        }
        std::thread::sleep(Duration::from_millis(200));
        (open == 0).then_some(())
    });
    assert_eq!(bal.get("a.example.com", "/").status, 200);
}

#[test]
fn hostile_and_oversize_requests_get_their_status_and_a_clear_body() {
    let mut bal = balancer(
        "bal-hostile",
        &[
            ("max_body_bytes", toml::Value::Integer(1000)),
            ("request_timeout_ms", toml::Value::Integer(500)),
            ("max_header_bytes", toml::Value::Integer(8192)),
            // Active checks far apart: the dead backend is still in rotation
            // when it is asked (a 502); once checks eject it, it is a 503.
            ("health_interval_ms", toml::Value::Integer(60_000)),
        ],
    );
    let b1 = Backend::start("b1");
    bal.route("a", &["a.example.com"], &[("b1", &b1)]);
    bal.route("dead", &["dead.example.com"], &[]);
    bal.ok(
        kinds::BACKEND_ADD,
        json!({"app": "dead", "id": "gone", "addr": format!("127.0.0.1:{}", free_port().unwrap())}),
    );

    let st = |raw: &[u8]| http::raw(bal.http, raw).map(|r| r.status).unwrap_or(0);
    // What hyper's parser refuses gets a page that says what was wrong too.
    for (raw, status, says) in [
        (&b"GARBAGE\r\n\r\n"[..], 400, "not valid HTTP/1.1"),
        (
            b"GET / HTTP/1.1\r\nHost: a.example.com\r\nBad Header\r\n\r\n",
            400,
            "not valid HTTP/1.1",
        ),
        (
            b"POST / HTTP/1.1\r\nHost: a.example.com\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
            400,
            "Content-Length",
        ),
    ] {
        let r = http::raw(bal.http, raw).unwrap();
        assert_eq!(r.status, status, "{}", String::from_utf8_lossy(raw));
        assert!(r.text().contains(says), "{}", r.text());
    }
    assert_eq!(st(b"GET / HTTP/1.1\r\n\r\n"), 400, "no Host");
    // A Host that is not a host name is refused, not routed on its prefix.
    for raw in [
        &b"GET / HTTP/1.1\r\nHost: a.example.com:x@evil.com\r\n\r\n"[..],
        b"GET / HTTP/1.1\r\nHost: a.example.com:99999\r\n\r\n",
        b"GET http://u@a.example.com/ HTTP/1.1\r\nHost: a.example.com\r\n\r\n",
    ] {
        let r = http::raw(bal.http, raw).unwrap();
        assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(raw));
        assert!(r.text().contains("not a valid host name"), "{}", r.text());
    }
    let big = format!(
        "GET / HTTP/1.1\r\nHost: a.example.com\r\nX-Big: {}\r\n\r\n",
        "y".repeat(20_000)
    );
    let r = http::raw(bal.http, big.as_bytes()).unwrap();
    assert_eq!(r.status, 431);
    assert!(
        r.text().contains("header section is larger"),
        "{}",
        r.text()
    );
    let many: String = (0..200).map(|i| format!("X-H{i}: v\r\n")).collect();
    assert_eq!(
        st(format!("GET / HTTP/1.1\r\nHost: a.example.com\r\n{many}\r\n").as_bytes()),
        431
    );
    let r = http::raw(
        bal.http,
        format!(
            "POST / HTTP/1.1\r\nHost: a.example.com\r\nContent-Length: 5000\r\n\r\n{}",
            "z".repeat(5000)
        )
        .as_bytes(),
    )
    .unwrap();
    assert_eq!(r.status, 413);
    assert!(r.text().contains("larger than 1000 bytes"), "{}", r.text());
    let chunk = "z".repeat(3000);
    let r = http::raw(bal.http, format!("POST / HTTP/1.1\r\nHost: a.example.com\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{chunk}\r\n0\r\n\r\n", chunk.len()).as_bytes()).unwrap();
    assert_eq!(r.status, 413, "{}", r.text());
    let r = http::raw(
        bal.http,
        b"POST / HTTP/1.1\r\nHost: a.example.com\r\nContent-Length: 11\r\n\r\nhello world",
    )
    .unwrap();
    assert_eq!((r.status, r.text().as_str()), (200, "b1 got 11 bytes\n"));
    let r = bal.get("a.example.com", "/sleep/2000");
    assert_eq!(r.status, 504);
    assert!(r.text().contains("did not answer within"), "{}", r.text());
    let r = bal.get("dead.example.com", "/");
    assert_eq!(r.status, 502);
    assert!(r.text().contains("could not be reached"), "{}", r.text());
    // After all of it the balancer is whole.
    assert_eq!(bal.get("a.example.com", "/").status, 200);
    assert!(
        bal.node
            .wait_exit("balancer", Duration::from_millis(10))
            .is_none(),
        "still running"
    );
}

#[test]
fn after_an_upgrade_drained_waits_for_the_predecessors_requests() {
    let mut bal = balancer("bal-drain-up", &[]);
    let slow = Backend::start("slow");
    bal.route("s", &["s.example.com"], &[("slow", &slow)]);
    let old = bal.node.pid("balancer");
    // A request in flight on the old process when it hands over.
    let release = bal.node.dir.join("release");
    let req = bal.held_request("s", "slow", "s.example.com", &release);
    bal.node.signal("balancer", Signal::SIGUSR2);
    let (new, _successor) = bal.successor(old);
    eventually(Duration::from_secs(10), "the successor's rpc", || {
        bal.call(kinds::ROUTES_LIST, json!({})).ok()
    });
    let mut sub = Subscriber::connect(
        &[tcp(bal.node.ports.balancer_pub)],
        &[kinds::BACKEND_DRAINED],
        bal.node.keys.clone(),
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    // The successor has nothing in flight to `slow`; the old process has.
    bal.ok(kinds::BACKEND_DRAIN, json!({"app": "s", "id": "slow"}));
    assert!(
        sub.next(Duration::from_millis(1000)).unwrap().is_none(),
        "drained while the predecessor still had a request in flight"
    );
    assert!(
        paddock_harness::process_alive(old),
        "the old process still drains"
    );
    std::fs::write(&release, "").unwrap();
    assert_eq!(
        req.join().unwrap().status,
        200,
        "the request in flight finished"
    );
    let ev = sub
        .next(Duration::from_secs(10))
        .unwrap()
        .expect("backend.drained once the predecessor is gone");
    assert_eq!(ev.body["id"], "slow");
    assert_eq!(
        bal.node.wait_exit("balancer", Duration::from_secs(10)),
        Some(0),
        "the old process exited"
    );
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(new), Signal::SIGTERM);
    eventually(Duration::from_secs(20), "the successor stopped", || {
        (!paddock_harness::process_alive(new)).then_some(())
    });
}

#[test]
fn an_upgrade_hands_the_listeners_over_under_load_without_a_failed_request() {
    let mut bal = balancer("bal-handoff", &[]);
    let (b1, b2) = (Backend::start("b1"), Backend::start("b2"));
    bal.route("a", &["a.example.com"], &[("b1", &b1), ("b2", &b2)]);
    let old = bal.node.pid("balancer");
    let load = Load::start(bal.http, "a.example.com", "/sleep/5", 4);
    let fresh = Load::start_with(
        bal.http,
        b"GET / HTTP/1.1\r\nHost: a.example.com\r\nConnection: close\r\n\r\n".to_vec(),
        2,
        true,
    );
    std::thread::sleep(Duration::from_millis(500));
    bal.node.signal("balancer", Signal::SIGUSR2);
    assert_eq!(
        bal.node.wait_exit("balancer", Duration::from_secs(30)),
        Some(0),
        "the old process drained and exited"
    );
    let (new, _successor) = bal.successor(old);
    assert!(paddock_harness::process_alive(new));
    // rpc is the successor's now, with the same routes.
    eventually(Duration::from_secs(10), "the successor's rpc", || {
        bal.call(kinds::ROUTES_LIST, json!({})).ok()
    });
    std::thread::sleep(Duration::from_millis(500));
    let (r, f) = (load.finish(), fresh.finish());
    assert_eq!(r.failed, 0, "keep-alive: {r:?}");
    assert_eq!(f.failed, 0, "new connections: {f:?}");
    assert_eq!(f.refused, 0);
    assert!(r.ok > 50 && f.ok > 50, "{r:?} {f:?}");
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(new), Signal::SIGTERM);
    eventually(Duration::from_secs(20), "the successor stopped", || {
        (!paddock_harness::process_alive(new)).then_some(())
    });
}

#[test]
fn with_the_supervisor_holding_the_sockets_kill_9_of_the_balancer_refuses_no_connection() {
    let bal = balancer_node("bal-kill9", &[]);
    let (b1, b2) = (Backend::start("b1"), Backend::start("b2"));
    // The supervisor's part: it binds the listener once and hands it to each start.
    let listener = std::net::TcpListener::bind(bal.http).unwrap();
    let fd = listener.as_raw_fd();
    let start = || -> Reaped {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(bal.node.log("balancer"))
            .unwrap();
        let mut cmd = Command::new(paddock_harness::bin("paddock-balancer").unwrap());
        cmd.arg("--config")
            .arg(&bal.node.config)
            .env("LISTEN_FDS", "1")
            .env("LISTEN_FDNAMES", "http")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        paddock_daemon::pass_fds(&mut cmd, &[fd]);
        Reaped(cmd.spawn().unwrap())
    };
    let mut child = start();
    paddock_harness::wait_ping(
        &bal.node.rpc("balancer"),
        bal.node.keys.clone(),
        Duration::from_secs(20),
    )
    .unwrap();
    bal.route("a", &["a.example.com"], &[("b1", &b1), ("b2", &b2)]);
    let fresh = Load::start_with(
        bal.http,
        b"GET / HTTP/1.1\r\nHost: a.example.com\r\nConnection: close\r\n\r\n".to_vec(),
        4,
        true,
    );
    std::thread::sleep(Duration::from_millis(300));
    // A second balancer handed the same sockets (a supervisor's mistake) stops
    // before it accepts anything: exit 69, no connection taken and dropped.
    for _ in 0..3 {
        let mut doomed = start();
        assert_eq!(doomed.0.wait().unwrap().code(), Some(69));
    }
    let before = fresh.finish();
    assert_eq!((before.failed, before.refused), (0, 0), "{before:?}");
    let fresh = Load::start_with(
        bal.http,
        b"GET / HTTP/1.1\r\nHost: a.example.com\r\nConnection: close\r\n\r\n".to_vec(),
        4,
        true,
    );
    std::thread::sleep(Duration::from_millis(500));
    for _ in 0..2 {
        child.0.kill().unwrap();
        child.0.wait().unwrap();
        std::thread::sleep(Duration::from_millis(300));
        child = start();
        std::thread::sleep(Duration::from_millis(800));
    }
    let r = fresh.finish();
    drop(child);
    assert_eq!(r.refused, 0, "{r:?}");
    assert!(r.ok > 50, "{r:?}");
    // Requests cut by the kill itself are the only failures: a handful at most.
    assert!(r.failed <= 16, "{r:?}");
}

#[test]
fn the_schedulers_fenced_table_routes_its_apps_and_leaves_operator_routes() {
    // A resync far away: after the first snapshot, only published tables apply.
    let mut bal = balancer_node("bal-sched", &[("resync_ms", toml::Value::Integer(600_000))]);
    let (b1, b2, b3) = (
        Backend::start("b1"),
        Backend::start("b2"),
        Backend::start("b3"),
    );
    let table_file = bal.node.dir.join("table.json");
    let write_table = |token: u64, app_backend: &Backend, domain: &str| {
        let t = json!({"token": token, "apps": [{"app": "s", "domains": [domain],
            "backends": [{"id": "w1", "addr": app_backend.addr.to_string()}]}]});
        std::fs::write(&table_file, t.to_string()).unwrap();
    };
    write_table(5, &b1, "s.example.com");
    bal.add_test_scheduler();
    bal.node.start("heartbeat");
    bal.node.start("balancer");
    bal.route("op", &["op.example.com"], &[("o1", &b3)]);
    bal.spawn_test_scheduler(&table_file, false);
    eventually(
        Duration::from_secs(15),
        "the scheduler's app routed",
        || {
            (http::get(bal.http, "s.example.com", "/")
                .ok()?
                .header("x-backend")?
                == "b1")
                .then_some(())
        },
    );
    assert_eq!(
        bal.get("op.example.com", "/").header("x-backend"),
        Some("b3"),
        "the operator's route stays"
    );
    let (code, msg) = bal.err_code(
        kinds::BACKEND_ADD,
        json!({"app": "s", "id": "x", "addr": b2.addr.to_string()}),
    );
    assert_eq!(code, "conflict");
    assert!(msg.contains("scheduler"), "{msg}");
    let list = bal.ok(kinds::ROUTES_LIST, json!({}));
    assert_eq!(list["token"], 5);
    // A smaller token is ignored (stale); a larger one applies.
    write_table(4, &b2, "s.example.com");
    eventually(
        Duration::from_secs(10),
        "the stale table seen and counted",
        || {
            let stats = bal.ok(kinds::BALANCER_STATS, json!({}));
            (stats["balancer"]["stale_tables"].as_u64()? >= 1).then_some(())
        },
    );
    assert_eq!(
        bal.get("s.example.com", "/").header("x-backend"),
        Some("b1"),
        "a stale table was applied"
    );
    write_table(6, &b2, "s.example.com");
    eventually(Duration::from_secs(10), "token 6 applied", || {
        (http::get(bal.http, "s.example.com", "/")
            .ok()?
            .header("x-backend")?
            == "b2")
            .then_some(())
    });
}

#[test]
fn a_missed_table_event_heals_by_snapshot() {
    let mut bal = balancer_node("bal-resync", &[("resync_ms", toml::Value::Integer(300))]);
    let (b1, b2) = (Backend::start("b1"), Backend::start("b2"));
    let table_file = bal.node.dir.join("table.json");
    std::fs::write(&table_file, json!({"token": 1, "apps": [{"app": "s", "domains": ["s.example.com"], "backends": [{"id": "w1", "addr": b1.addr.to_string()}]}]}).to_string()).unwrap();
    bal.add_test_scheduler();
    bal.node.start("heartbeat");
    bal.node.start("balancer");
    // Silent: it never publishes, only answers routes.snapshot.
    bal.spawn_test_scheduler(&table_file, true);
    let routed_to = |want: &'static str| {
        move || {
            (http::get(bal.http, "s.example.com", "/")
                .ok()?
                .header("x-backend")?
                == want)
                .then_some(())
        }
    };
    eventually(
        Duration::from_secs(15),
        "the table fetched by snapshot",
        routed_to("b1"),
    );
    // A change the scheduler never publishes (a missed event): only the periodic
    // resync can bring it, after the first snapshot was taken.
    std::fs::write(&table_file, json!({"token": 2, "apps": [{"app": "s", "domains": ["s.example.com"], "backends": [{"id": "w2", "addr": b2.addr.to_string()}]}]}).to_string()).unwrap();
    eventually(
        Duration::from_secs(15),
        "the changed table healed by resync",
        routed_to("b2"),
    );
    assert_eq!(bal.ok(kinds::ROUTES_LIST, json!({}))["token"], 2);
}

#[test]
fn stats_prometheus_page_and_router_log_lines() {
    let bal = balancer("bal-stats", &[("router_log", toml::Value::Boolean(true))]);
    let b1 = Backend::start("b1");
    bal.route("a", &["a.example.com"], &[("b1", &b1)]);
    for _ in 0..5 {
        assert_eq!(bal.get("a.example.com", "/hello").status, 200);
    }
    assert_eq!(bal.get("nope.example.com", "/").status, 404);
    let s = bal.ok(kinds::BALANCER_STATS, json!({}));
    let a = &s["apps"][0];
    assert_eq!(a["app"], "a");
    assert_eq!(a["stats"]["requests"], 5);
    assert_eq!(a["stats"]["status"]["2xx"], 5);
    assert_eq!(a["backends"][0]["state"], "up");
    assert!(a["stats"]["latency_ms"]["p99"].as_f64().is_some());
    assert_eq!(s["balancer"]["unknown_host"], 1);
    let m = http::get(bal.admin, "admin", "/metrics").unwrap();
    assert_eq!(m.status, 200);
    // Prometheus text format: one group per family, after its TYPE line.
    assert_eq!(
        m.text()
            .matches("# TYPE paddock_balancer_requests_total counter")
            .count(),
        1,
        "{}",
        m.text()
    );
    assert!(
        m.text()
            .contains("paddock_balancer_requests_total{app=\"a\"} 5"),
        "{}",
        m.text()
    );
    assert!(
        m.text()
            .contains("paddock_balancer_backend_up{app=\"a\",backend=\"b1\"} 1"),
        "{}",
        m.text()
    );
    let page = http::get(bal.admin, "admin", "/").unwrap();
    assert!(page.text().contains("<td>up</td>"), "{}", page.text());
    let line = eventually(Duration::from_secs(5), "a router line", || {
        std::fs::read_to_string(bal.node.log("balancer"))
            .ok()?
            .lines()
            .find(|l| l.contains("path=\"/hello\""))
            .map(str::to_string)
    });
    for part in [
        "at=info",
        "method=GET",
        "host=\"a.example.com\"",
        "backend=\"b1\"",
        "status=200",
        "request_id=",
        "fwd=\"127.0.0.1\"",
        "connect=",
        "service=",
        "bytes=10",
    ] {
        assert!(line.contains(part), "{part} missing from {line}");
    }
}

#[test]
fn router_lines_are_pushed_to_the_log_sink_signed() {
    let mut bal = balancer_node("bal-sink", &[]);
    let pull = bal.node.log_sink("balancer");
    bal.node.start("balancer");
    let b1 = Backend::start("b1");
    bal.route("a", &["a.example.com"], &[("b1", &b1)]);
    pull.set_rcvtimeo(5000).unwrap();
    // The PUSH connects lazily: send until a line arrives.
    let env = eventually(Duration::from_secs(10), "a router line at the sink", || {
        assert_eq!(bal.get("a.example.com", "/sunk").status, 200);
        let frames = pull.recv_multipart(zmq::DONTWAIT).ok()?;
        bal.node
            .keys
            .verify(&frames[0], &frames[1])
            .expect("signed");
        let env: paddock_wire::Envelope = serde_json::from_slice(&frames[0]).unwrap();
        Some(env)
    });
    assert_eq!(env.kind, "log.line");
    assert_eq!(env.body["app"], "a");
    assert_eq!(env.body["proc"], "router");
    let line = env.body["line"].as_str().unwrap();
    assert!(
        line.contains("path=\"/sunk\"") && line.contains("status=200"),
        "{line}"
    );
    // Not in the balancer's own log: router_log is off.
    let log = std::fs::read_to_string(bal.node.log("balancer")).unwrap();
    assert!(!log.contains("path=\"/sunk\""));
}

#[test]
fn beyond_max_connections_clients_wait_and_are_served_when_one_closes() {
    let bal = balancer(
        "bal-maxconn",
        &[("max_connections", toml::Value::Integer(3))],
    );
    let b1 = Backend::start("b1");
    bal.route("a", &["a.example.com"], &[("b1", &b1)]);
    let mut held: Vec<Conn> = (0..3)
        .map(|_| {
            let mut c = Conn::connect(bal.http).unwrap();
            assert_eq!(
                c.request(&http::get_req("a.example.com", "/"))
                    .unwrap()
                    .unwrap()
                    .status,
                200
            );
            c
        })
        .collect();
    // The fourth is accepted by the kernel but not served while three are open.
    let mut fourth = Conn::connect(bal.http).unwrap();
    fourth
        .send(&http::get_req("a.example.com", "/fourth"))
        .unwrap();
    fourth
        .stream()
        .set_read_timeout(Some(Duration::from_millis(700)))
        .unwrap();
    let mut b = [0u8; 200];
    let e = std::io::Read::read(fourth.stream(), &mut b)
        .map(|n| String::from_utf8_lossy(&b[..n]).into_owned())
        .unwrap_err();
    assert!(
        matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
        "{e}"
    );
    // One closes: the fourth is served.
    drop(held.pop());
    fourth
        .stream()
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let r = fourth.read(false).unwrap().unwrap();
    assert_eq!((r.status, r.text().as_str()), (200, "b1 /fourth\n"));
}

fn paddock(bal: &Bal, args: &[&str]) -> std::process::Output {
    Command::new(paddock_harness::bin("paddock").unwrap())
        .args(args)
        .env("PADDOCK_CONFIG", &bal.node.config)
        .output()
        .unwrap()
}

#[test]
fn the_cli_sets_lists_drains_and_shows_stats() {
    let bal = balancer("bal-cli", &[]);
    let b1 = Backend::start("b1");
    let out = |args: &[&str]| {
        let o = paddock(&bal, args);
        assert!(
            o.status.success(),
            "paddock {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap()
    };
    out(&[
        "routes",
        "set",
        "shop",
        "Shop.example.com",
        "*.shop.example.com",
    ]);
    out(&[
        "routes",
        "add-backend",
        "shop",
        "w1",
        &b1.addr.to_string(),
        "--weight",
        "2",
    ]);
    assert_eq!(
        bal.get("x.shop.example.com", "/").header("x-backend"),
        Some("b1")
    );
    let list = out(&["routes"]);
    assert!(
        list.contains("shop.example.com") && list.contains(&format!("w1={}(w2)", b1.addr)),
        "{list}"
    );
    let stats = out(&["balancer", "stats"]);
    assert!(stats.contains("shop/w1") && stats.contains("up"), "{stats}");
    let j: Value = serde_json::from_str(&out(&["--json", "balancer", "stats"])).unwrap();
    assert_eq!(j["apps"][0]["stats"]["requests"], 1);
    // A refused change: the code and message, exit 1.
    let o = paddock(&bal, &["routes", "set", "other", "shop.example.com"]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("conflict") && err.contains("\"shop\""),
        "{err}"
    );
    // Certificates from files; the key is never printed.
    let (cert, key) = self_signed(&["shop.example.com"]);
    let dir = bal.node.dir.clone();
    std::fs::write(dir.join("c.pem"), &cert).unwrap();
    std::fs::write(dir.join("k.pem"), &key).unwrap();
    let set = out(&[
        "certs",
        "set",
        "--cert",
        dir.join("c.pem").to_str().unwrap(),
        "--key",
        dir.join("k.pem").to_str().unwrap(),
        "shop.example.com",
    ]);
    assert!(!set.contains("PRIVATE"), "{set}");
    assert!(out(&["certs"]).contains("shop.example.com"));
    let (leaf, resp) = tls_get(bal.https, "shop.example.com", &[&cert]).unwrap();
    assert!(
        !leaf.is_empty() && resp.starts_with("HTTP/1.1 200"),
        "{resp}"
    );
    // A drain that waits until the backend is drained.
    let drained = out(&["routes", "drain", "shop", "w1", "--wait"]);
    assert!(drained.contains("drained shop/w1"), "{drained}");
    assert_eq!(bal.get("shop.example.com", "/").status, 503);
}

#[test]
fn a_client_that_goes_away_mid_request_leaves_nothing_counted_in_flight() {
    let bal = balancer("bal-abort", &[]);
    let b1 = Backend::start("b1");
    bal.route("a", &["a.example.com"], &[("b1", &b1)]);
    for _ in 0..3 {
        let mut c = Conn::connect(bal.http).unwrap();
        c.send(&http::get_req("a.example.com", "/sleep/1000"))
            .unwrap();
        std::thread::sleep(Duration::from_millis(100));
        drop(c);
    }
    let active = |bal: &Bal| {
        let s = bal.ok(kinds::BALANCER_STATS, json!({}));
        s["apps"][0]["backends"][0]["active"].as_u64().unwrap()
    };
    eventually(Duration::from_secs(10), "nothing in flight", || {
        (active(&bal) == 0).then_some(())
    });
    // So a drain ends at once, with nothing cut.
    let mut sub = Subscriber::connect(
        &[tcp(bal.node.ports.balancer_pub)],
        &[kinds::BACKEND_DRAINED],
        bal.node.keys.clone(),
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    bal.ok(kinds::BACKEND_DRAIN, json!({"app": "a", "id": "b1"}));
    let ev = sub
        .next(Duration::from_secs(3))
        .unwrap()
        .expect("drained at once");
    assert_eq!(ev.body["closed"], 0);
}

#[test]
fn a_connection_whose_request_body_was_not_sent_whole_is_never_reused() {
    // One thread, so the victim would get the attacker's pooled connection.
    let bal = balancer("bal-early", &[("threads", toml::Value::Integer(1))]);
    let b1 = Backend::start("b1");
    bal.route("a", &["a.example.com"], &[("b1", &b1)]);
    let mut attacker = Conn::connect(bal.http).unwrap();
    attacker
        .send(b"POST /early HTTP/1.1\r\nHost: a.example.com\r\nContent-Length: 1000000\r\n\r\n0123456789")
        .unwrap();
    let r = attacker.read(false).unwrap().unwrap();
    assert_eq!(r.status, 401);
    // The attacker keeps its connection open and sends nothing more.
    let mut victim = Conn::connect(bal.http).unwrap();
    victim
        .stream()
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let r = victim
        .request(&http::get_req("a.example.com", "/"))
        .unwrap()
        .unwrap();
    assert_eq!((r.status, r.text().as_str()), (200, "b1 /\n"));
    drop(attacker);
}

#[test]
fn websockets_hold_their_connection_slot_and_outlive_a_handoff() {
    let mut bal = balancer(
        "bal-wsslot",
        &[("max_connections", toml::Value::Integer(2))],
    );
    let b1 = Backend::start("b1");
    bal.route("a", &["a.example.com"], &[("b1", &b1)]);
    let mut ws1 = websocket(bal.http, "a.example.com");
    let mut ws2 = websocket(bal.http, "a.example.com");
    // Two tunnels take both slots: a third connection waits.
    let mut third = Conn::connect(bal.http).unwrap();
    third.send(&http::get_req("a.example.com", "/")).unwrap();
    third
        .stream()
        .set_read_timeout(Some(Duration::from_millis(700)))
        .unwrap();
    let mut b = [0u8; 64];
    assert!(
        std::io::Read::read(third.stream(), &mut b).is_err(),
        "served beyond max_connections"
    );
    drop(ws2.stream().shutdown(std::net::Shutdown::Both));
    drop(ws2);
    third
        .stream()
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    assert_eq!(third.read(false).unwrap().unwrap().status, 200);
    drop(third);
    // An upgrade: the old process keeps the open tunnel until it closes.
    let old = bal.node.pid("balancer");
    bal.node.signal("balancer", Signal::SIGUSR2);
    let (_, _successor) = bal.successor(old);
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        paddock_harness::process_alive(old),
        "the old process drains while a tunnel is open"
    );
    assert_eq!(
        ws_echo(&mut ws1, b"across the handoff"),
        b"across the handoff"
    );
    drop(ws1);
    assert_eq!(
        bal.node.wait_exit("balancer", Duration::from_secs(10)),
        Some(0)
    );
}

#[test]
fn rpc_writes_around_an_upgrade_are_kept_or_refused_never_lost() {
    let mut bal = balancer("bal-writes", &[]);
    let old = bal.node.pid("balancer");
    let mut acked = Vec::new();
    let mut signalled = false;
    for i in 0..80 {
        if i == 20 {
            bal.node.signal("balancer", Signal::SIGUSR2);
            signalled = true;
        }
        let app = format!("c{i}");
        match bal.call(
            kinds::ROUTE_SET,
            json!({"app": app, "domains": [format!("{app}.example.com")]}),
        ) {
            Ok(_) => acked.push(app),
            Err(e) => assert!(signalled, "refused before the upgrade: {e}"),
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let (_, _successor) = bal.successor(old);
    assert_eq!(
        bal.node.wait_exit("balancer", Duration::from_secs(20)),
        Some(0)
    );
    let list = eventually(Duration::from_secs(10), "the successor's rpc", || {
        bal.call(kinds::ROUTES_LIST, json!({})).ok()
    });
    let have: Vec<&str> = list["apps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["app"].as_str().unwrap())
        .collect();
    for a in &acked {
        assert!(
            have.contains(&a.as_str()),
            "{a} was acknowledged and lost: {have:?}"
        );
    }
    assert!(acked.len() >= 20, "{acked:?}");
}

#[test]
fn an_upgrade_onto_a_broken_cluster_file_is_refused_and_the_old_one_serves_on() {
    let mut bal = balancer("bal-badup", &[]);
    let b1 = Backend::start("b1");
    bal.route("a", &["a.example.com"], &[("b1", &b1)]);
    let old = bal.node.pid("balancer");
    // The file is edited into one the successor cannot start with (a misspelt
    // key in the balancer's own table).
    bal.node
        .file
        .daemons
        .get_mut("balancer")
        .unwrap()
        .other
        .insert("max_conections".into(), toml::Value::Integer(5));
    bal.node.save();
    let (code, msg) = bal.err_code(kinds::BALANCER_UPGRADE, json!({}));
    assert_eq!(code, "internal", "{msg}");
    assert!(msg.contains("upgrade failed"), "{msg}");
    // The old process still holds everything and serves.
    assert!(paddock_harness::process_alive(old));
    assert_eq!(bal.node.pid("balancer"), old);
    assert_eq!(bal.get("a.example.com", "/").status, 200);
    bal.ok(kinds::ROUTES_LIST, json!({}));
}

#[test]
fn an_upgrade_runs_the_binary_installed_since_the_start() {
    let bal = balancer_node("bal-newbin", &[]);
    let bin_dir = bal.node.dir.join("bin");
    std::fs::create_dir_all(&bin_dir).unwrap();
    let installed = bin_dir.join("paddock-balancer");
    std::fs::copy(
        paddock_harness::bin("paddock-balancer").unwrap(),
        &installed,
    )
    .unwrap();
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(bal.node.log("balancer"))
        .unwrap();
    let child = Reaped(
        Command::new(&installed)
            .arg("--config")
            .arg(&bal.node.config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    paddock_harness::wait_ping(
        &bal.node.rpc("balancer"),
        bal.node.keys.clone(),
        Duration::from_secs(20),
    )
    .unwrap();
    // A package upgrade: the new binary is renamed over the running one.
    let staged = bin_dir.join(".paddock-balancer.new");
    std::fs::copy(paddock_harness::bin("paddock-balancer").unwrap(), &staged).unwrap();
    std::fs::rename(&staged, &installed).unwrap();
    let reply = bal.ok(kinds::BALANCER_UPGRADE, json!({}));
    let new = reply["successor_pid"].as_i64().unwrap() as i32;
    let exe = std::fs::read_link(format!("/proc/{new}/exe")).unwrap();
    assert_eq!(exe, installed, "the successor runs the installed binary");
    let p = paddock_harness::pidfile::Proc::open(new).unwrap();
    drop(child);
    p.stop(Signal::SIGTERM, Duration::from_secs(5));
}

#[test]
fn the_backend_sees_the_host_that_was_routed_and_ambiguous_requests_are_refused() {
    let bal = balancer("bal-host", &[]);
    let (b1, b2) = (Backend::start("b1"), Backend::start("b2"));
    bal.route("a", &["a.example.com"], &[("b1", &b1)]);
    bal.route("b", &["b.example.com"], &[("b2", &b2)]);
    // Absolute form wins over Host (RFC 9112), and the backend is told so.
    let r = http::raw(
        bal.http,
        b"GET http://a.example.com/headers HTTP/1.1\r\nHost: b.example.com\r\n\r\n",
    )
    .unwrap();
    assert_eq!(r.header("x-backend"), Some("b1"));
    let h: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(h["host"], "a.example.com");
    // Two Host headers: 400.
    let r = http::raw(
        bal.http,
        b"GET / HTTP/1.1\r\nHost: a.example.com\r\nHost: b.example.com\r\n\r\n",
    )
    .unwrap();
    assert_eq!(r.status, 400);
    assert!(r.text().contains("more than one Host"), "{}", r.text());
    // A client cannot strip Host or framing headers by nominating them, and a
    // second Connection header's names are honoured too; client forwarding
    // headers are not passed on.
    let r = http::raw(bal.http, b"GET /headers HTTP/1.1\r\nHost: a.example.com\r\nConnection: host, content-length\r\nConnection: x-secret\r\nX-Secret: 1\r\nForwarded: for=6.6.6.6\r\nX-Forwarded-Ssl: on\r\nX-Real-Ip: 6.6.6.6\r\n\r\n").unwrap();
    let h: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(h["host"], "a.example.com");
    assert!(
        h.get("x-secret").is_none()
            && h.get("forwarded").is_none()
            && h.get("x-forwarded-ssl").is_none(),
        "{h}"
    );
    assert_eq!(h["x-real-ip"], "127.0.0.1");
    // CONNECT is not proxied.
    let r = http::raw(
        bal.http,
        b"CONNECT a.example.com:443 HTTP/1.1\r\nHost: a.example.com:443\r\n\r\n",
    )
    .unwrap();
    assert_eq!(r.status, 405);
    // A malformed chunked body is the client's fault: 400, the backend stays up.
    for _ in 0..4 {
        let r = http::raw(bal.http, b"POST / HTTP/1.1\r\nHost: a.example.com\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n").unwrap();
        assert_eq!(r.status, 400, "{}", r.text());
    }
    assert_eq!(bal.backend_state("a", "b1"), "up");
}

#[test]
fn a_client_that_stops_reading_is_cut_off_at_the_send_timeout() {
    let bal = balancer(
        "bal-slowread",
        &[("send_timeout_ms", toml::Value::Integer(1000))],
    );
    let b1 = Backend::start("b1");
    bal.route("a", &["a.example.com"], &[("b1", &b1)]);
    // 64 MiB asked for, none of it read.
    let mut c = Conn::connect(bal.http).unwrap();
    c.send(&http::get_req("a.example.com", "/big/67108864"))
        .unwrap();
    let active = |bal: &Bal| {
        bal.ok(kinds::BALANCER_STATS, json!({}))["balancer"]["connections_active"]
            .as_u64()
            .unwrap()
    };
    eventually(Duration::from_secs(5), "the response under way", || {
        (active(&bal) == 1).then_some(())
    });
    eventually(Duration::from_secs(15), "the slow reader cut off", || {
        (active(&bal) == 0).then_some(())
    });
    let s = bal.ok(kinds::BALANCER_STATS, json!({}));
    assert_eq!(s["apps"][0]["backends"][0]["active"], 0);
    drop(c);
    assert_eq!(bal.get("a.example.com", "/").status, 200);
}

#[test]
fn an_http_health_check_ejects_a_sick_backend_and_readmits_it() {
    let bal = balancer("bal-health", &[]);
    let sick = bal.node.dir.join("sick");
    let b1 = Backend::start_on(
        "b1",
        free_port().unwrap(),
        &[("PADDOCK_TEST_BACKEND_SICK", sick.to_str().unwrap())],
    );
    let b2 = Backend::start("b2");
    bal.ok(
        kinds::ROUTE_SET,
        json!({"app": "a", "domains": ["a.example.com"], "health": {"path": "/health"}}),
    );
    for (id, b) in [("b1", &b1), ("b2", &b2)] {
        bal.ok(
            kinds::BACKEND_ADD,
            json!({"app": "a", "id": id, "addr": b.addr.to_string()}),
        );
    }
    // Sick: it still accepts connections (a TCP check would pass), but /health says 503.
    std::fs::write(&sick, "").unwrap();
    eventually(Duration::from_secs(10), "b1 ejected by its checks", || {
        (bal.backend_state("a", "b1") == "ejected").then_some(())
    });
    for _ in 0..20 {
        assert_eq!(
            bal.get("a.example.com", "/").header("x-backend"),
            Some("b2")
        );
    }
    std::fs::remove_file(&sick).unwrap();
    eventually(Duration::from_secs(10), "b1 re-admitted", || {
        (bal.backend_state("a", "b1") == "up").then_some(())
    });
}
