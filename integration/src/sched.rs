//! What the scheduler's tests share: runner and scheduler settings short enough
//! for a test, and a slug of a tiny Python HTTP app made with the system tar.

use std::path::{Path, PathBuf};

use crate::{free_port, tcp, Node};

/// A stdlib HTTP app that answers `/app/version.txt` on every path, bound to
/// `/app/bind.txt`'s address on `$PORT`: 0.0.0.0 as apps are asked to (the
/// balancer may be on another node) inside a test's network namespace,
/// 127.0.0.1 on the host.
pub const VERSION_APP_PY: &str = r#"
import os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class H(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def do_GET(self):
        data = open("/app/version.txt").read().strip().encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

bind = open("/app/bind.txt").read().strip()
ThreadingHTTPServer((bind, int(os.environ["PORT"])), H).serve_forever()
"#;

/// A zstd tar of [`VERSION_APP_PY`] saying `version` and listening on `bind`,
/// under `dir`.
pub fn version_slug(dir: &Path, version: &str, bind: &str) -> PathBuf {
    let src = dir.join(format!("slug-{version}"));
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("app.py"), VERSION_APP_PY).unwrap();
    std::fs::write(src.join("Procfile"), "web: python3 -u app.py\n").unwrap();
    std::fs::write(src.join("version.txt"), version).unwrap();
    std::fs::write(src.join("bind.txt"), bind).unwrap();
    let out = dir.join(format!("slug-{version}.tar.zst"));
    let st = std::process::Command::new("tar")
        .arg("--zstd")
        .arg("-cf")
        .arg(&out)
        .arg("-C")
        .arg(&src)
        .arg(".")
        .status()
        .unwrap();
    assert!(st.success());
    out
}

/// A runner quick to restart and to see health, offering 4 GB.
pub fn tune_runner(node: &mut Node) {
    let r = node.file.daemons.get_mut("runner").unwrap();
    for (k, v) in [
        ("backoff_base_ms", 50),
        ("health_interval_ms", 300),
        ("stop_grace_ms", 2000),
        ("offer_memory_mb", 4096),
    ] {
        r.other.insert(k.into(), toml::Value::Integer(v));
    }
}

/// `[daemons.scheduler]` with short timings, `overrides` last; its pub endpoint.
pub fn add_scheduler(node: &mut Node, overrides: &[(&str, i64)]) -> String {
    node.add_daemon("scheduler");
    let publish = tcp(free_port().unwrap());
    let s = node.file.daemons.get_mut("scheduler").unwrap();
    s.other
        .insert("pub".into(), toml::Value::String(publish.clone()));
    let defaults: &[(&str, i64)] = &[
        ("min_healthy_ms", 1000),
        ("drain_ms", 1500),
        ("resync_ms", 500),
        ("lease_ttl_ms", 3000),
        ("node_settle_ms", 0),
        ("watch_window_ms", 1000),
        ("healthy_deadline_ms", 30_000),
    ];
    for (k, v) in defaults.iter().chain(overrides) {
        s.other.insert((*k).into(), toml::Value::Integer(*v));
    }
    node.save();
    publish
}
