//! Paddock's spine benchmarks, against real daemons started from the release build:
//!
//! - `rpc`:  signed `ping` round trip to paddock-heartbeat, side by side with an
//!   unsigned libzmq REQ/ROUTER echo in the same run; p50/p99 and their ratio.
//! - `curve`: the same signed `ping` to two paddock-heartbeats started side by side,
//!   one with CURVE on every socket and one in plaintext, rounds interleaved.
//! - `push`: signed PUSH messages per second into paddock-heartbeat's PULL socket,
//!   counted as verified by the daemon itself (`stats.pulled`).
//! - `lock`: `lock.acquire` + `lock.release` cycles per second against
//!   paddock-locker on a real PostgreSQL; acquire latency p50/p99.
//! - `api`: a customer's reads (`config.get`, `release.list`) and release-making
//!   writes (`config.set`) against one paddock-api on a real PostgreSQL (fsync on),
//!   signed with the user's own key over CURVE, as the CLI sends them.
//!
//! Run with `ops/bench/run.sh` (builds release first). Figures go to stdout.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use paddock_harness::{self as harness, PgCluster, PgOptions};
use paddock_wire::envelope::now_ms;
use paddock_wire::gate::{Admit, Gate};
use paddock_wire::{Client, Envelope, Keyring, Limits, Pusher};
use serde_json::json;

struct Summary {
    p50: Duration,
    p99: Duration,
    mean: Duration,
}

fn summarize(mut v: Vec<Duration>) -> Summary {
    v.sort();
    let pick = |q: f64| v[((v.len() as f64 * q) as usize).min(v.len() - 1)];
    let mean = v.iter().sum::<Duration>() / v.len() as u32;
    Summary {
        p50: pick(0.50),
        p99: pick(0.99),
        mean,
    }
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

struct Daemons {
    _dir: tempfile::TempDir,
    procs: Vec<std::process::Child>,
    pg: Option<std::process::Child>,
    file: paddock_config::ClusterFile,
}

impl Daemons {
    fn start(with_db: bool, daemons: &[&str]) -> Result<Daemons> {
        Self::start_with(with_db, daemons, false)
    }

    fn start_with(with_db: bool, daemons: &[&str], curve: bool) -> Result<Daemons> {
        let dir = tempfile::Builder::new()
            .prefix("paddock-bench-")
            .tempdir()?;
        std::fs::create_dir_all(dir.path().join("logs"))?;
        let (pg, url) = if with_db {
            // Durable settings (fsync on): the lock figures include real commits.
            let cluster = PgCluster::init(
                dir.path(),
                &PgOptions {
                    fast: false,
                    port: None,
                },
            )?;
            let child = cluster.start(&dir.path().join("logs/postgres.log"))?;
            cluster.create_db("paddock")?;
            (Some(child), Some(cluster.url("paddock")))
        } else {
            (None, None)
        };
        let secret = paddock_wire::keyring::generate_secret_hex();
        let curve = if curve {
            Some(harness::ClusterCurve::generate()?)
        } else {
            None
        };
        let (mut file, _) = harness::node_file(
            "bench",
            &dir.path().join("state"),
            ("cluster-1", &secret),
            curve.as_ref(),
            &[],
            url,
        )?;
        file.log.level = Some("warn".into());
        let cfg = dir.path().join("paddock.toml");
        file.write(&cfg)?;
        let keys = harness::credentials(&file)?;
        let mut procs = Vec::new();
        for d in daemons {
            procs.push(harness::spawn_daemon(
                d,
                &cfg,
                &dir.path().join(format!("logs/{d}.log")),
            )?);
            harness::wait_ping(&file.daemons[*d].rpc, keys.clone(), Duration::from_secs(20))?;
        }
        Ok(Daemons {
            _dir: dir,
            procs,
            pg,
            file,
        })
    }

    fn keys(&self) -> paddock_wire::Credentials {
        harness::credentials(&self.file).expect("keys")
    }
}

impl Drop for Daemons {
    fn drop(&mut self) {
        for c in &mut self.procs {
            harness::stop_child(c, nix::sys::signal::Signal::SIGTERM, Duration::from_secs(3));
        }
        harness::stop_shims(&self._dir.path().join("state"));
        if let Some(pg) = &mut self.pg {
            harness::stop_child(
                pg,
                nix::sys::signal::Signal::SIGINT,
                Duration::from_secs(10),
            );
        }
    }
}

/// An unsigned REQ/ROUTER echo on loopback: the floor a signed round trip is compared to.
fn raw_echo(n: usize) -> Result<Summary> {
    let ctx = zmq::Context::new();
    let port = harness::free_port()?;
    let ep = harness::tcp(port);
    let router = ctx.socket(zmq::ROUTER)?;
    router.bind(&ep)?;
    let server = std::thread::spawn(move || -> Result<()> {
        for _ in 0..n {
            let msg = router.recv_multipart(0)?;
            router.send_multipart(msg, 0)?;
        }
        Ok(())
    });
    let req = ctx.socket(zmq::REQ)?;
    req.connect(&ep)?;
    let payload = br#"{"v":1,"id":"01JCT6S3W4F8D9X2QZ7N5K0BVA","ts":1763900000123,"from":"user:bench","kind":"ping","body":{}}"#;
    let mut lat = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        req.send(&payload[..], 0)?;
        let _ = req.recv_bytes(0)?;
        lat.push(t.elapsed());
    }
    server.join().expect("echo thread")?;
    Ok(summarize(lat))
}

fn bench_rpc(n: usize) -> Result<()> {
    let d = Daemons::start(false, &["heartbeat"])?;
    let rpc = d.file.daemons["heartbeat"].rpc.clone();
    let mut c = Client::connect(&rpc, "user:bench", d.keys())?;
    for _ in 0..1000 {
        c.call("ping", json!({}))?; // warm-up
    }
    // Interleave rounds of each so machine noise hits both alike.
    let rounds = 5;
    let mut signed = Vec::with_capacity(n);
    let mut raw_all = Vec::new();
    for _ in 0..rounds {
        for _ in 0..n / rounds {
            let t = Instant::now();
            c.call("ping", json!({}))?;
            signed.push(t.elapsed());
        }
        let r = raw_echo(n / rounds)?;
        raw_all.push(r);
    }
    let s = summarize(signed);
    let raw_p50 = summarize(raw_all.iter().map(|r| r.p50).collect()).p50;
    let raw_p99 = summarize(raw_all.iter().map(|r| r.p99).collect()).p50;
    println!("rpc: {n} round trips each, tcp loopback");
    println!(
        "  signed ping  (paddock-heartbeat): p50 {:7.1} us  p99 {:7.1} us  mean {:7.1} us",
        us(s.p50),
        us(s.p99),
        us(s.mean)
    );
    println!(
        "  raw echo     (libzmq REQ/ROUTER): p50 {:7.1} us  p99 {:7.1} us  (median of {rounds} rounds)",
        us(raw_p50),
        us(raw_p99)
    );
    println!(
        "  ratio signed/raw: p50 {:.2}x  p99 {:.2}x   (goal: p50 < 150 us and within 2x)",
        us(s.p50) / us(raw_p50),
        us(s.p99) / us(raw_p99)
    );
    Ok(())
}

/// Signed ping with CURVE against the same without, in one run.
fn bench_curve(n: usize) -> Result<()> {
    let plain = Daemons::start_with(false, &["heartbeat"], false)?;
    let curve = Daemons::start_with(false, &["heartbeat"], true)?;
    let mut cp = Client::connect(
        &plain.file.daemons["heartbeat"].rpc,
        "user:bench",
        plain.keys(),
    )?;
    let mut cc = Client::connect(
        &curve.file.daemons["heartbeat"].rpc,
        "user:bench",
        curve.keys(),
    )?;
    for _ in 0..1000 {
        cp.call("ping", json!({}))?;
        cc.call("ping", json!({}))?;
    }
    let rounds = 10;
    let (mut lp, mut lc) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for _ in 0..rounds {
        for _ in 0..n / rounds {
            let t = Instant::now();
            cp.call("ping", json!({}))?;
            lp.push(t.elapsed());
        }
        for _ in 0..n / rounds {
            let t = Instant::now();
            cc.call("ping", json!({}))?;
            lc.push(t.elapsed());
        }
    }
    let (p, c) = (summarize(lp), summarize(lc));
    println!("curve: {n} signed pings each, tcp loopback, {rounds} interleaved rounds");
    println!(
        "  plaintext: p50 {:7.1} us  p99 {:7.1} us  mean {:7.1} us",
        us(p.p50),
        us(p.p99),
        us(p.mean)
    );
    println!(
        "  CURVE:     p50 {:7.1} us  p99 {:7.1} us  mean {:7.1} us",
        us(c.p50),
        us(c.p99),
        us(c.mean)
    );
    println!(
        "  ratio CURVE/plaintext: p50 {:.2}x  p99 {:.2}x   (goal: p50 within 1.2x)",
        us(c.p50) / us(p.p50),
        us(c.p99) / us(p.p99)
    );
    Ok(())
}

/// CPU cost of one request's wire work, in-process: build + sign on the client,
/// gate (HMAC verify, JSON parse, skew, replay) on the server, and the signed reply.
fn bench_codec(n: usize) -> Result<()> {
    let keys = Keyring::from_hex(
        [("k", paddock_wire::keyring::generate_secret_hex().as_str())],
        "k",
    )?;
    let mut gate = Gate::new(Limits::default());
    let t = Instant::now();
    for _ in 0..n {
        let env = Envelope::new("user:bench", "ping", json!({}));
        let (payload, sig) = env.sign(&keys);
        match gate.admit(&keys, &payload, sig.as_bytes(), now_ms()) {
            Admit::Fresh { env, .. } => {
                let reply = Envelope::reply_to(
                    "heartbeat@bench",
                    Some(&env.id),
                    &env.kind,
                    json!({"ok": true, "daemon": "heartbeat"}),
                );
                let (p, s) = reply.sign(&keys);
                keys.verify(&p, s.as_bytes())
                    .map_err(|c| anyhow::anyhow!("{c}"))?;
                paddock_wire::envelope::parse_payload(&p)?;
            }
            other => bail!("unexpected {other:?}"),
        }
    }
    let per = t.elapsed() / n as u32;
    println!("codec: {n} request+reply encodes, signs, verifies and parses in-process: {:.1} us each (one core)", us(per));
    Ok(())
}

fn bench_push(n: u64) -> Result<()> {
    let d = Daemons::start(false, &["heartbeat"])?;
    let pull = d.file.daemons["heartbeat"]
        .endpoint("pull")
        .context("pull")?
        .to_string();
    let rpc = d.file.daemons["heartbeat"].rpc.clone();
    let mut c = Client::connect(&rpc, "user:bench", d.keys())?;
    let pulled = |c: &mut Client| -> Result<u64> {
        Ok(c.call("stats", json!({}))?["pulled"].as_u64().unwrap_or(0))
    };
    let base = pulled(&mut c)?;
    let p = Pusher::connect(&pull, "bench@bench", d.keys())?;
    let beat = json!({"daemon": "bench", "node": "bench", "instance": "0123456789abcdefghij", "endpoints": {}, "interval_ms": 60000});
    let t = Instant::now();
    for _ in 0..n {
        p.push("heartbeat.beat", beat.clone())?;
    }
    let sent = t.elapsed();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut got = 0;
    while Instant::now() < deadline {
        got = pulled(&mut c)? - base;
        if got >= n {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let total = t.elapsed();
    let stats = c.call("stats", json!({}))?;
    println!("push: {n} signed heartbeat.beat messages, one PUSH socket -> paddock-heartbeat PULL");
    println!(
        "  sender signed+sent {:.0} msg/s; daemon verified {got} of {n} in {:.3} s = {:.0} msg/s   (goal: >= 50000/s)",
        n as f64 / sent.as_secs_f64(),
        total.as_secs_f64(),
        got as f64 / total.as_secs_f64()
    );
    println!("  daemon rejected: {}", stats["rejected"]);
    if got < n {
        bail!("only {got} of {n} messages were verified by the daemon");
    }
    Ok(())
}

fn bench_lock(n: usize, clients: usize) -> Result<()> {
    let d = Daemons::start(true, &["locker"])?;
    let rpc = d.file.daemons["locker"].rpc.clone();
    let keys = d.keys();
    {
        let mut c = Client::connect(&rpc, "user:bench", keys.clone())?
            .with_timeout(Duration::from_secs(20));
        // The locker migrates on start; wait until it serves locks.
        c.call("lock.list", json!({}))?;
    }
    let per = n / clients;
    let t = Instant::now();
    let threads: Vec<_> = (0..clients)
        .map(|i| {
            let (rpc, keys) = (rpc.clone(), keys.clone());
            std::thread::spawn(move || -> Result<Vec<Duration>> {
                let mut c = Client::connect(&rpc, "user:bench", keys)?;
                let mut lat = Vec::with_capacity(per);
                for j in 0..per {
                    let name = format!("bench-{i}-{}", j % 16);
                    let t = Instant::now();
                    let g = c.call(
                        "lock.acquire",
                        json!({"name": name, "owner": "bench", "ttl_ms": 10000}),
                    )?;
                    lat.push(t.elapsed());
                    c.call("lock.release", json!({"name": name, "token": g["token"]}))?;
                }
                Ok(lat)
            })
        })
        .collect();
    let mut all = Vec::new();
    for th in threads {
        all.extend(th.join().expect("bench thread")?);
    }
    let el = t.elapsed();
    let s = summarize(all);
    println!(
        "lock: {n} acquire+release cycles, {clients} concurrent clients, PostgreSQL with fsync on"
    );
    println!(
        "  {:.0} cycles/s; acquire p50 {:.2} ms  p99 {:.2} ms  mean {:.2} ms   (goal: p99 < 5 ms)",
        n as f64 / el.as_secs_f64(),
        s.p50.as_secs_f64() * 1e3,
        s.p99.as_secs_f64() * 1e3,
        s.mean.as_secs_f64() * 1e3
    );
    Ok(())
}

/// `n` calls of `kind` with `body` from `clients` threads, each its own user
/// (`users[i]`) on its own connection; latency per call and calls per second over
/// the whole run.
fn api_load(
    users: &[paddock_config::credentials::UserCredentials],
    kind: &'static str,
    body: serde_json::Value,
    n: usize,
    clients: usize,
) -> Result<(Summary, f64)> {
    let per = n / clients;
    let t = Instant::now();
    let threads: Vec<_> = users[..clients]
        .iter()
        .enumerate()
        .map(|(i, creds)| {
            let (creds, body) = (creds.clone(), body.clone());
            std::thread::spawn(move || -> Result<Vec<Duration>> {
                let keys = creds.credentials().map_err(anyhow::Error::msg)?;
                let mut c = Client::connect(&creds.api, &format!("user:{}", creds.user), keys)?
                    .with_timeout(Duration::from_secs(10));
                let mut lat = Vec::with_capacity(per);
                for j in 0..per {
                    let mut b = body.clone();
                    if kind == "config.set" {
                        // A new value each time, so every call makes a new release.
                        b["vars"] = json!({ format!("BENCH_{i}"): format!("{j}") });
                    }
                    let t = Instant::now();
                    c.call(kind, b).with_context(|| format!("{kind} #{j}"))?;
                    lat.push(t.elapsed());
                }
                Ok(lat)
            })
        })
        .collect();
    let mut all = Vec::new();
    for th in threads {
        all.extend(th.join().expect("bench thread")?);
    }
    let rate = all.len() as f64 / t.elapsed().as_secs_f64();
    Ok((summarize(all), rate))
}

fn bench_api(reads: usize, writes: usize) -> Result<()> {
    let d = Daemons::start_with(true, &["api"], true)?;
    let rpc = d.file.daemons["api"].rpc.clone();
    let mut admin = Client::connect(&rpc, "user:bench-operator", d.keys())?
        .with_timeout(Duration::from_secs(20));
    let curve = d.file.curve.clone().context("a CURVE cluster")?;
    let s = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_string();
    let mut made = 0;
    // `n` new people with access to the app: each client thread of each round is
    // its own customer, as an api serving many sees them (one key may hold only
    // a quarter of the replay cache, so one person cannot do every round).
    let mut people = |n: usize,
                      owner: Option<&mut Client>|
     -> Result<Vec<paddock_config::credentials::UserCredentials>> {
        let mut out = Vec::new();
        for _ in 0..n {
            let u = admin.call("user.create", json!({"name": format!("bench{made}")}))?;
            made += 1;
            out.push(paddock_config::credentials::UserCredentials {
                api: rpc.clone(),
                user: s(&u["user"]),
                key_id: s(&u["key_id"]),
                secret: paddock_config::Secret::new(s(&u["secret"])),
                curve: Some(paddock_config::credentials::UserCurve {
                    server_public: curve.server_public.clone(),
                    client_public: s(&u["curve"]["client_public"]),
                    client_secret: paddock_config::Secret::new(s(&u["curve"]["client_secret"])),
                }),
            });
        }
        if let Some(o) = owner {
            for u in &out {
                o.call(
                    "access.add",
                    json!({"app": "benchapp", "user": u.user, "role": "collaborator"}),
                )?;
            }
        }
        Ok(out)
    };
    let owner = people(1, None)?.remove(0);
    let keys = owner.credentials().map_err(anyhow::Error::msg)?;
    let mut c = Client::connect(&rpc, &format!("user:{}", owner.user), keys)?
        .with_timeout(Duration::from_secs(20));
    c.call("app.create", json!({"name": "benchapp"}))?;
    // An app with a realistic config (20 vars) and release history (21 releases).
    for i in 0..20 {
        c.call(
            "config.set",
            json!({"app": "benchapp", "vars": {format!("VAR_{i}"): "x".repeat(64)}}),
        )?;
    }
    println!("api: one paddock-api, PostgreSQL with fsync on, user keys over CURVE (one user per client), an app with 20 config vars and 21 releases");
    for clients in [1, 4] {
        for (kind, body) in [
            ("config.get", json!({"app": "benchapp"})),
            ("release.list", json!({"app": "benchapp"})),
        ] {
            let users = people(clients, Some(&mut c))?;
            // A short warm-up, unmeasured.
            api_load(&users, kind, body.clone(), 200, clients)?;
            let (sm, rate) = api_load(&users, kind, body, reads, clients)?;
            println!(
                "  {kind:<13} {clients} client(s): {rate:>6.0} req/s  p50 {:.2} ms  p99 {:.2} ms  mean {:.2} ms   (goal: p99 < 5 ms, >= 2000 req/s)",
                sm.p50.as_secs_f64() * 1e3,
                sm.p99.as_secs_f64() * 1e3,
                sm.mean.as_secs_f64() * 1e3
            );
        }
    }
    for clients in [1, 4] {
        let users = people(clients, Some(&mut c))?;
        let (sm, rate) = api_load(
            &users,
            "config.set",
            json!({"app": "benchapp"}),
            writes,
            clients,
        )?;
        println!(
            "  config.set    {clients} client(s): {rate:>6.0} req/s  p50 {:.2} ms  p99 {:.2} ms  mean {:.2} ms   (a new release each; goal: p99 < 25 ms)",
            sm.p50.as_secs_f64() * 1e3,
            sm.p99.as_secs_f64() * 1e3,
            sm.mean.as_secs_f64() * 1e3
        );
    }
    Ok(())
}

/// The last `(ns, pid)` line of a stamp file.
fn last_stamp(path: &std::path::Path) -> Option<(i128, i32)> {
    let text = std::fs::read_to_string(path).ok()?;
    let l = text.lines().last()?;
    let mut it = l.split_whitespace();
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

fn realtime_ns() -> i128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(0)
}

fn wait_accepting(port: u16, timeout: Duration) -> Option<Instant> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Some(Instant::now());
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    None
}

/// kill -9 the app `n` times, `spacing` apart; per kill: time until the port
/// accepts again, and time until the supervisor exec'd the replacement.
fn kill_loop(
    name: &str,
    stamps: &std::path::Path,
    port: u16,
    n: usize,
    spacing: Duration,
) -> Result<()> {
    wait_accepting(port, Duration::from_secs(30)).context("the app never accepted connections")?;
    let mut serve = Vec::with_capacity(n);
    let mut exec = Vec::with_capacity(n);
    for i in 0..n {
        let (_, pid) = last_stamp(stamps).context("no stamp")?;
        // A pidfd tells the moment the process is really gone (death), apart from
        // the moment the signal was sent.
        // SAFETY: pidfd_open(2) with a pid and no flags; the fd is closed below.
        let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as i32;
        let t0 = Instant::now();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )?;
        let mut pfd = libc::pollfd {
            fd: pidfd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd; then closing the fd we opened.
        unsafe {
            libc::poll(&mut pfd, 1, 10_000);
            libc::close(pidfd);
        }
        let t0_ns = realtime_ns();
        // Wait until the old listener is gone, then for the new one.
        let t1 = loop {
            match last_stamp(stamps) {
                Some((_, p)) if p != pid => break wait_accepting(port, Duration::from_secs(30)),
                _ => std::thread::sleep(Duration::from_micros(100)),
            }
            if t0.elapsed() > Duration::from_secs(30) {
                break None;
            }
        }
        .with_context(|| format!("{name}: kill {i}: the app did not come back within 30 s"))?;
        let (exec_ns, _) = last_stamp(stamps).context("no stamp")?;
        serve.push(t1 - t0);
        exec.push(Duration::from_nanos((exec_ns - t0_ns).max(0) as u64));
        // Spaced from the new process's start, so supervisord's startsecs (1 s) has
        // passed and no respawn limit or backoff of either supervisor trips.
        std::thread::sleep(spacing);
    }
    let s = summarize(serve);
    let e = summarize(exec);
    println!(
        "  {name:<22} kill -> serving: p50 {:8.2} ms  p99 {:8.2} ms | death -> exec: p50 {:7.3} ms  p99 {:7.3} ms",
        s.p50.as_secs_f64() * 1e3,
        s.p99.as_secs_f64() * 1e3,
        e.p50.as_secs_f64() * 1e3,
        e.p99.as_secs_f64() * 1e3
    );
    Ok(())
}

fn bench_runner(n: usize, spacing: Duration) -> Result<()> {
    let bin = harness::bin_dir()?;
    let stamp = bin.join("paddock-bench-stamp");
    let app_src =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../integration/fixtures/app.py");
    println!(
        "runner: {n} kill -9 of a Python stdlib HTTP app, {} ms apart, side by side",
        spacing.as_millis()
    );

    // Paddock.
    let d = Daemons::start(false, &["runner"])?;
    let work = d._dir.path().join("bench-app");
    std::fs::create_dir_all(&work)?;
    std::fs::copy(&app_src, work.join("app.py"))?;
    harness::allow_traverse(&work)?;
    harness::allow_traverse(&d._dir.path().join("apps"))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&work, std::fs::Permissions::from_mode(0o777))?;
    }
    let stamps = work.join("paddock.stamps");
    let rpc = d.file.daemons["runner"].rpc.clone();
    let mut c = Client::connect(&rpc, "user:bench", d.keys())?;
    let v = c.call(
        "instance.start",
        json!({"app": "bench", "proc": "web", "dir": work, "command": format!("{} {} python3 -u app.py", stamp.display(), stamps.display()),
               "health": {"tcp": true},
               "restart": {"limit": 100000, "window_ms": 1000, "reset_after_ms": 500}}),
    )?;
    let port = v["port"].as_u64().context("port")? as u16;
    kill_loop("paddock-runner", &stamps, port, n, spacing)?;
    drop(d);

    // supervisord with its defaults (autorestart=unexpected, startsecs=1).
    let tmp = tempfile::Builder::new()
        .prefix("paddock-bench-supervisord-")
        .tempdir()?;
    let port = harness::free_port()?;
    let stamps = tmp.path().join("supervisord.stamps");
    std::fs::copy(&app_src, tmp.path().join("app.py"))?;
    let conf = tmp.path().join("supervisord.conf");
    std::fs::write(
        &conf,
        format!(
            "[supervisord]\nnodaemon=true\nlogfile={d}/supervisord.log\npidfile={d}/supervisord.pid\n\n\
             [unix_http_server]\nfile={d}/supervisor.sock\n\n\
             [rpcinterface:supervisor]\nsupervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface\n\n\
             [program:app]\ncommand={stamp} {stamps} python3 -u app.py\ndirectory={d}\nenvironment=PORT=\"{port}\"\n\
             stdout_logfile={d}/app.log\nredirect_stderr=true\n",
            d = tmp.path().display(),
            stamp = stamp.display(),
            stamps = stamps.display(),
        ),
    )?;
    let mut sup = std::process::Command::new("supervisord")
        .args(["-c"])
        .arg(&conf)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("starting supervisord (apt-get install supervisor)")?;
    let r = kill_loop("supervisord (defaults)", &stamps, port, n, spacing);
    harness::stop_child(
        &mut sup,
        nix::sys::signal::Signal::SIGTERM,
        Duration::from_secs(10),
    );
    r
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let which: Vec<&str> = if args.is_empty() {
        vec!["codec", "rpc", "curve", "push", "lock", "api", "runner"]
    } else {
        args.iter().map(String::as_str).collect()
    };
    for w in which {
        match w {
            "codec" => bench_codec(100_000)?,
            "rpc" => bench_rpc(20_000)?,
            "curve" => bench_curve(20_000)?,
            "push" => bench_push(200_000)?,
            "lock" => {
                bench_lock(4_000, 1)?;
                bench_lock(4_000, 4)?;
            }
            "api" => bench_api(10_000, 1_000)?,
            "runner" => {
                let n = std::env::var("PADDOCK_BENCH_KILLS")
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(200);
                let spacing = std::env::var("PADDOCK_BENCH_SPACING_MS")
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(1200);
                bench_runner(n, Duration::from_millis(spacing))?
            }
            other => {
                bail!("unknown benchmark `{other}` (codec, rpc, curve, push, lock, api, runner)")
            }
        }
    }
    Ok(())
}
