//! Verbs for the balancer: routes, balancer (stats, upgrade), certs.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::Subcommand;
use paddock_wire::{kinds, Client};
use serde_json::{json, Value};

use crate::cluster::{client, find, load, table, Opts};

#[derive(Debug, Subcommand)]
pub enum RoutesCmd {
    /// Route DOMAINs to APP (replaces its domains; its backends are kept).
    Set {
        app: String,
        /// Exact names or wildcards (`*.apps.example.com`).
        #[arg(required = true)]
        domains: Vec<String>,
        /// Health check: HTTP GET of this path must answer 2xx/3xx (else a TCP connect).
        #[arg(long)]
        health_path: Option<String>,
    },
    /// Remove APP's route and its backends (requests in flight finish).
    Remove { app: String },
    /// Add backend ID at ADDR (IP:port) to APP; the same ID again replaces it.
    AddBackend {
        app: String,
        id: String,
        addr: String,
        #[arg(long, default_value_t = 1)]
        weight: u32,
    },
    /// Take backend ID of APP out of rotation; requests in flight finish.
    Drain {
        app: String,
        id: String,
        /// Wait until nothing is in flight (or the drain deadline closed what was left).
        #[arg(long)]
        wait: bool,
    },
    /// Remove backend ID from APP (requests in flight to it finish).
    RemoveBackend { app: String, id: String },
}

#[derive(Debug, Subcommand)]
pub enum BalancerCmd {
    /// Requests, status classes, latency and state per app and backend.
    Stats,
    /// Start the installed binary with the listening sockets; this process drains.
    Upgrade,
}

#[derive(Debug, Subcommand)]
pub enum CertsCmd {
    /// Install a certificate for DOMAINs (replaces one with exactly those domains).
    Set {
        /// The certificate chain, PEM.
        #[arg(long)]
        cert: PathBuf,
        /// Its private key, PEM.
        #[arg(long)]
        key: PathBuf,
        #[arg(required = true)]
        domains: Vec<String>,
    },
    /// Remove the certificate for DOMAINs.
    Remove {
        #[arg(required = true)]
        domains: Vec<String>,
    },
}

/// The balancer's rpc endpoint: this node's from the cluster file, else the
/// registry's (on `node`, when given).
fn connect(opts: &Opts, node: Option<&str>) -> Result<Client> {
    let cfg = load(opts)?;
    let ep = find(&cfg, "balancer", node, opts.timeout)?;
    client(&cfg, &ep, opts.timeout)
}

/// One call; a refusal reads `KIND: CODE: MESSAGE`.
fn call(c: &mut Client, kind: &str, body: Value) -> Result<Value> {
    c.call(kind, body).with_context(|| kind.to_string())
}

fn print_json(v: &Value) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn strs(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// A `routes.list` backend as `id=addr(wN)` with `[draining]` when it is.
fn backend_cell(b: &Value) -> String {
    format!(
        "{}={}(w{}){}",
        b["id"].as_str().unwrap_or("?"),
        b["addr"].as_str().unwrap_or("?"),
        b["weight"].as_u64().unwrap_or(1),
        if b["draining"] == true {
            "[draining]"
        } else {
            ""
        }
    )
}

pub fn routes(opts: &Opts, node: Option<&str>, cmd: Option<RoutesCmd>) -> Result<()> {
    let mut c = connect(opts, node)?;
    let Some(cmd) = cmd else {
        let v = call(&mut c, kinds::ROUTES_LIST, json!({}))?;
        if opts.json {
            return print_json(&v);
        }
        let mut t = table(&["APP", "OWNER", "DOMAINS", "BACKENDS"]);
        for a in v["apps"].as_array().into_iter().flatten() {
            let backends: Vec<String> = a["backends"]
                .as_array()
                .into_iter()
                .flatten()
                .map(backend_cell)
                .collect();
            t.add_row(vec![
                a["app"].as_str().unwrap_or("?").to_string(),
                a["owner"].as_str().unwrap_or("?").to_string(),
                strs(&a["domains"]).join(", "),
                backends.join(", "),
            ]);
        }
        println!("{t}");
        return Ok(());
    };
    match cmd {
        RoutesCmd::Set {
            app,
            domains,
            health_path,
        } => {
            let mut body = json!({"app": app, "domains": domains});
            if let Some(path) = health_path {
                body["health"] = json!({"path": path});
            }
            let v = call(&mut c, kinds::ROUTE_SET, body)?;
            if opts.json {
                return print_json(&v);
            }
            println!("{app} → {}", strs(&v["domains"]).join(", "));
        }
        RoutesCmd::Remove { app } => {
            let v = call(&mut c, kinds::ROUTE_REMOVE, json!({"app": app}))?;
            if opts.json {
                return print_json(&v);
            }
            println!("removed the route of {app}");
        }
        RoutesCmd::AddBackend {
            app,
            id,
            addr,
            weight,
        } => {
            let v = call(
                &mut c,
                kinds::BACKEND_ADD,
                json!({"app": app, "id": id, "addr": addr, "weight": weight}),
            )?;
            if opts.json {
                return print_json(&v);
            }
            println!("added backend {app}/{id} at {addr} (weight {weight})");
        }
        RoutesCmd::Drain { app, id, wait } => {
            let v = call(&mut c, kinds::BACKEND_DRAIN, json!({"app": app, "id": id}))?;
            let deadline_ms = v["deadline_ms"].as_u64().unwrap_or(30_000);
            if opts.json {
                print_json(&v)?;
            } else {
                let already = if v["already_draining"] == true {
                    " (it already was)"
                } else {
                    ""
                };
                println!(
                    "draining {app}/{id}{already}: no new requests; what is in flight is closed after {deadline_ms} ms"
                );
            }
            if wait {
                wait_drained(&mut c, opts, &app, &id, deadline_ms)?;
            }
        }
        RoutesCmd::RemoveBackend { app, id } => {
            let v = call(&mut c, kinds::BACKEND_REMOVE, json!({"app": app, "id": id}))?;
            if opts.json {
                return print_json(&v);
            }
            println!("removed backend {app}/{id}");
        }
    }
    Ok(())
}

/// `(state, active)` of backend `id` of `app` in a `balancer.stats` reply.
fn backend_state(stats: &Value, app: &str, id: &str) -> Option<(String, u64)> {
    let a = stats["apps"].as_array()?.iter().find(|a| a["app"] == app)?;
    let b = a["backends"].as_array()?.iter().find(|b| b["id"] == id)?;
    Some((
        b["state"].as_str().unwrap_or("?").to_string(),
        b["active"].as_u64().unwrap_or(0),
    ))
}

/// Polls `balancer.stats` until the backend is `drained`: the balancer closes what
/// is left at its drain deadline, so this waits at most that plus 5 s.
fn wait_drained(c: &mut Client, opts: &Opts, app: &str, id: &str, deadline_ms: u64) -> Result<()> {
    let until = Instant::now() + Duration::from_millis(deadline_ms) + Duration::from_secs(5);
    let mut last: Option<u64> = None;
    loop {
        let stats = call(c, kinds::BALANCER_STATS, json!({}))?;
        let (state, active) = backend_state(&stats, app, id).ok_or_else(|| {
            anyhow!("{app}/{id} is no longer in the balancer's table (removed or replaced?)")
        })?;
        match &state[..] {
            "drained" => {
                if opts.json {
                    eprintln!("drained {app}/{id}");
                } else {
                    println!("drained {app}/{id}");
                }
                return Ok(());
            }
            "draining" => {}
            other => bail!("{app}/{id} is {other}, not draining (added again?)"),
        }
        if last != Some(active) {
            last = Some(active);
            let line = format!("draining {app}/{id}: {active} in flight");
            if opts.json {
                eprintln!("{line}");
            } else {
                println!("{line}");
            }
        }
        if Instant::now() >= until {
            bail!(
                "{app}/{id} still draining ({active} in flight) 5 s after its drain deadline of {deadline_ms} ms"
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A latency quantile cell: bucket upper bound in ms; a value beyond the last
/// bucket arrives as `"+Inf"` (JSON has no infinity), shown as `>LAST`.
fn quantile(stats: &Value, q: &str) -> String {
    let l = &stats["latency_ms"];
    match l[q].as_f64() {
        Some(x) => format!("{x}"),
        None if l[q].as_str() == Some("+Inf") => l["buckets_le_ms"]
            .as_array()
            .and_then(|b| b.last())
            .and_then(Value::as_f64)
            .map(|x| format!(">{x}"))
            .unwrap_or_else(|| "-".into()),
        None => "-".into(),
    }
}

fn counter_cells(stats: &Value) -> Vec<String> {
    let n = |v: &Value| v.as_u64().unwrap_or(0).to_string();
    vec![
        n(&stats["requests"]),
        n(&stats["status"]["2xx"]),
        n(&stats["status"]["4xx"]),
        n(&stats["status"]["5xx"]),
        quantile(stats, "p50"),
        quantile(stats, "p99"),
    ]
}

/// The balancer-wide counters as one `key=value …` line, the known ones first.
fn global_line(g: &Value) -> String {
    const ORDER: [&str; 8] = [
        "connections_active",
        "connections_total",
        "tls_handshake_failures",
        "unknown_host",
        "bad_requests",
        "retries",
        "router_log_dropped",
        "stale_tables",
    ];
    let Some(m) = g.as_object() else {
        return "balancer: -".into();
    };
    let mut parts: Vec<String> = ORDER
        .iter()
        .filter_map(|k| m.get(*k).map(|v| format!("{k}={v}")))
        .collect();
    parts.extend(
        m.iter()
            .filter(|(k, _)| !ORDER.contains(&k.as_str()))
            .map(|(k, v)| format!("{k}={v}")),
    );
    format!("balancer: {}", parts.join(" "))
}

fn stats_table(v: &Value) -> comfy_table::Table {
    let mut t = table(&[
        "APP / BACKEND",
        "STATE",
        "ACTIVE",
        "REQUESTS",
        "2XX",
        "4XX",
        "5XX",
        "P50 MS",
        "P99 MS",
    ]);
    for a in v["apps"].as_array().into_iter().flatten() {
        let app = a["app"].as_str().unwrap_or("?");
        let backends: Vec<&Value> = a["backends"].as_array().into_iter().flatten().collect();
        let active: u64 = backends.iter().filter_map(|b| b["active"].as_u64()).sum();
        let mut row = vec![app.to_string(), String::new(), active.to_string()];
        row.extend(counter_cells(&a["stats"]));
        t.add_row(row);
        for b in backends {
            let mut row = vec![
                format!(
                    "{app}/{} ({})",
                    b["id"].as_str().unwrap_or("?"),
                    b["addr"].as_str().unwrap_or("?")
                ),
                b["state"].as_str().unwrap_or("?").to_string(),
                b["active"].as_u64().unwrap_or(0).to_string(),
            ];
            row.extend(counter_cells(&b["stats"]));
            t.add_row(row);
        }
    }
    t
}

pub fn balancer(opts: &Opts, node: Option<&str>, cmd: BalancerCmd) -> Result<()> {
    let mut c = connect(opts, node)?;
    match cmd {
        BalancerCmd::Stats => {
            let v = call(&mut c, kinds::BALANCER_STATS, json!({}))?;
            if opts.json {
                return print_json(&v);
            }
            println!("{}", stats_table(&v));
            println!("{}", global_line(&v["balancer"]));
        }
        BalancerCmd::Upgrade => {
            // The balancer waits up to 30 s for its successor to serve the listeners.
            c.set_timeout(opts.timeout.max(Duration::from_secs(40)));
            let v = call(&mut c, kinds::BALANCER_UPGRADE, json!({}))?;
            if opts.json {
                return print_json(&v);
            }
            println!(
                "upgrade: successor pid {} serves the listeners; the old process is draining",
                v["successor_pid"]
            );
        }
    }
    Ok(())
}

/// A PEM file's text (never echoed: a key's contents stay out of every message).
fn read_pem(path: &Path, what: &str) -> Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the {what} file {}", path.display()))?;
    if !text.contains("-----BEGIN ") {
        bail!("{} is not PEM (no -----BEGIN line)", path.display());
    }
    Ok(text)
}

pub fn certs(opts: &Opts, node: Option<&str>, cmd: Option<CertsCmd>) -> Result<()> {
    // Read the files before connecting: a wrong path fails fast.
    let cmd = match cmd {
        Some(CertsCmd::Set { cert, key, domains }) => Some(Certs::Set {
            cert_pem: read_pem(&cert, "certificate")?,
            key_pem: read_pem(&key, "key")?,
            domains,
        }),
        Some(CertsCmd::Remove { domains }) => Some(Certs::Remove(domains)),
        None => None,
    };
    let mut c = connect(opts, node)?;
    match cmd {
        None => {
            let v = call(&mut c, kinds::CERT_LIST, json!({}))?;
            if opts.json {
                return print_json(&v);
            }
            let mut t = table(&["#", "DOMAINS"]);
            for (i, cert) in v["certs"].as_array().into_iter().flatten().enumerate() {
                t.add_row(vec![(i + 1).to_string(), strs(&cert["domains"]).join(", ")]);
            }
            println!("{t}");
        }
        Some(Certs::Set {
            cert_pem,
            key_pem,
            domains,
        }) => {
            let v = call(
                &mut c,
                kinds::CERT_SET,
                json!({"domains": domains, "cert_pem": cert_pem, "key_pem": key_pem}),
            )?;
            if opts.json {
                return print_json(&v);
            }
            println!(
                "installed the certificate for {}",
                strs(&v["domains"]).join(", ")
            );
        }
        Some(Certs::Remove(domains)) => {
            let v = call(&mut c, kinds::CERT_REMOVE, json!({"domains": domains}))?;
            if opts.json {
                return print_json(&v);
            }
            println!(
                "removed the certificate for {}",
                strs(&v["domains"]).join(", ")
            );
        }
    }
    Ok(())
}

/// A `certs` verb with its files read.
enum Certs {
    Set {
        cert_pem: String,
        key_pem: String,
        domains: Vec<String>,
    },
    Remove(Vec<String>),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backends_read_id_addr_weight_draining() {
        let b = json!({"id": "web-1", "addr": "10.0.0.5:8080", "weight": 3, "draining": false});
        assert_eq!(backend_cell(&b), "web-1=10.0.0.5:8080(w3)");
        let b = json!({"id": "web-2", "addr": "10.0.0.6:8080", "weight": 1, "draining": true});
        assert_eq!(backend_cell(&b), "web-2=10.0.0.6:8080(w1)[draining]");
    }

    fn stats(requests: u64, p99: Value) -> Value {
        json!({"requests": requests, "status": {"2xx": requests, "4xx": 0, "5xx": 0},
               "latency_ms": {"p50": 0.5, "p99": p99, "buckets_le_ms": [0.5, 1.0, 10000.0]}})
    }

    #[test]
    fn quantiles_beyond_the_last_bucket_are_not_dashes() {
        assert_eq!(quantile(&stats(3, json!(50.0)), "p99"), "50");
        assert_eq!(quantile(&stats(3, json!(0.5)), "p50"), "0.5");
        assert_eq!(quantile(&stats(3, json!("+Inf")), "p99"), ">10000");
        assert_eq!(quantile(&stats(3, Value::Null), "p99"), "-");
        assert_eq!(quantile(&stats(0, Value::Null), "p99"), "-");
        assert_eq!(
            counter_cells(&stats(3, json!(1.0))),
            ["3", "3", "0", "0", "0.5", "1"]
        );
    }

    #[test]
    fn a_backend_is_found_in_the_stats() {
        let v = json!({"apps": [{"app": "shop", "backends": [
            {"id": "a", "state": "up", "active": 0},
            {"id": "b", "state": "draining", "active": 2}]}]});
        assert_eq!(backend_state(&v, "shop", "b"), Some(("draining".into(), 2)));
        assert_eq!(backend_state(&v, "shop", "c"), None);
        assert_eq!(backend_state(&v, "other", "a"), None);
    }

    #[test]
    fn the_global_line_puts_known_counters_first() {
        let g = json!({"retries": 2, "connections_active": 1, "zz_new": 7});
        assert_eq!(
            global_line(&g),
            "balancer: connections_active=1 retries=2 zz_new=7"
        );
    }

    #[test]
    fn a_file_without_pem_is_refused_without_echoing_it() {
        let dir = std::env::temp_dir().join(format!("paddock-cli-pem-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("key.pem");
        std::fs::write(&p, "secret-bytes").unwrap();
        let e = read_pem(&p, "key").unwrap_err().to_string();
        assert!(!e.contains("secret-bytes"), "{e}");
        std::fs::write(
            &p,
            "-----BEGIN PRIVATE KEY-----\nx\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        assert!(read_pem(&p, "key").is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
