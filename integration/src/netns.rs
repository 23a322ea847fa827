//! Nodes that can really be cut off: network namespaces joined by a bridge.
//!
//! `Net::new(tag, n)` makes a control namespace (`pdk-TAG-c`) holding a bridge
//! with 10.77.0.1/24 and `n` node namespaces (`pdk-TAG-K`), each joined to the
//! bridge by a veth pair and given 10.77.0.(10+K). Nothing listens outside
//! these namespaces: the test thread enters the control namespace
//! ([`Net::enter`]) before it starts anything, so PostgreSQL, the control
//! daemons and the test's own clients live there, and runners are started
//! inside their node's namespace ([`Net::within`]). [`Net::cut`] takes a node's
//! link down (its packets are dropped, as when a switch port dies or a cable
//! is pulled); [`Net::restore`] brings it back. Dropping `Net` deletes the
//! namespaces.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::process::Command;

use paddock_config::ClusterFile;

pub struct Net {
    tag: String,
    nodes: usize,
}

/// The control namespace's address on the bridge.
pub const CONTROL_IP: &str = "10.77.0.1";

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip runs");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Net {
    /// Makes the namespaces, the bridge and the links (root only).
    pub fn new(tag: &str, nodes: usize) -> Net {
        assert!(nodes <= 50);
        // Short, unique on this host: names of links are at most 15 bytes.
        let salt = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let tag = format!(
            "{}{:x}",
            &tag[..tag.len().min(4)],
            (std::process::id() ^ salt) % 0xf_ffff
        );
        let net = Net {
            tag: tag.clone(),
            nodes,
        };
        // A namespace of that name left by a test killed at its time limit.
        for k in 0..=nodes {
            let _ = Command::new("ip")
                .args(["netns", "del", &net.ns(k)])
                .output();
        }
        let c = net.ns(0);
        ip(&["netns", "add", &c]);
        ip(&["-n", &c, "link", "set", "lo", "up"]);
        ip(&["-n", &c, "link", "add", "br0", "type", "bridge"]);
        ip(&[
            "-n",
            &c,
            "addr",
            "add",
            &format!("{CONTROL_IP}/24"),
            "dev",
            "br0",
        ]);
        ip(&["-n", &c, "link", "set", "br0", "up"]);
        for k in 1..=nodes {
            let n = net.ns(k);
            ip(&["netns", "add", &n]);
            ip(&["-n", &n, "link", "set", "lo", "up"]);
            let (outer, inner) = (format!("v{k}"), "eth0".to_string());
            ip(&[
                "-n", &c, "link", "add", &outer, "type", "veth", "peer", "name", &inner, "netns",
                &n,
            ]);
            ip(&["-n", &c, "link", "set", &outer, "master", "br0"]);
            ip(&["-n", &c, "link", "set", &outer, "up"]);
            ip(&[
                "-n",
                &n,
                "addr",
                "add",
                &format!("{}/24", net.ip(k)),
                "dev",
                &inner,
            ]);
            ip(&["-n", &n, "link", "set", &inner, "up"]);
        }
        net
    }

    /// Namespace `k`'s name (0: the control namespace).
    pub fn ns(&self, k: usize) -> String {
        if k == 0 {
            format!("pdk-{}-c", self.tag)
        } else {
            format!("pdk-{}-{k}", self.tag)
        }
    }

    /// Node `k`'s address (1-based).
    pub fn ip(&self, k: usize) -> String {
        format!("10.77.0.{}", 10 + k)
    }

    fn setns(&self, k: usize) {
        let f = File::open(format!("/run/netns/{}", self.ns(k))).expect("the namespace exists");
        // SAFETY: setns with a namespace fd we hold open; it changes only the
        // calling thread's network namespace.
        let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
    }

    /// Moves the calling thread into the control namespace: what it starts
    /// (children inherit it) and connects from here on lives there.
    pub fn enter(&self) {
        self.setns(0);
    }

    /// Runs `f` with the calling thread in node `k`'s namespace (a runner
    /// started by `f` stays there), then returns it to the control namespace.
    pub fn within<T>(&self, k: usize, f: impl FnOnce() -> T) -> T {
        self.setns(k);
        let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
        self.setns(0);
        match out {
            Ok(v) => v,
            Err(p) => std::panic::resume_unwind(p),
        }
    }

    /// Node `k` loses the network: its link goes down.
    pub fn cut(&self, k: usize) {
        ip(&["-n", &self.ns(0), "link", "set", &format!("v{k}"), "down"]);
    }

    /// Node `k`'s link comes back.
    pub fn restore(&self, k: usize) {
        ip(&["-n", &self.ns(0), "link", "set", &format!("v{k}"), "up"]);
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for k in 0..=self.nodes {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.ns(k)])
                .output();
        }
    }
}

/// Every endpoint of `file` (its daemons' and its heartbeats') moved from
/// 127.0.0.1 to `addr`, for a node whose daemons must be reached from other
/// namespaces. The database URL is left as it is.
pub fn rehost(file: &mut ClusterFile, addr: &str) {
    let from = "tcp://127.0.0.1:";
    let to = format!("tcp://{addr}:");
    for h in file.cluster.heartbeats.iter_mut() {
        *h = h.replace(from, &to);
    }
    for r in file.cluster.registries.iter_mut() {
        *r = r.replace(from, &to);
    }
    for sec in file.daemons.values_mut() {
        sec.rpc = sec.rpc.replace(from, &to);
        for v in sec.other.values_mut() {
            if let toml::Value::String(s) = v {
                if s.starts_with(from) {
                    *s = s.replace(from, &to);
                }
            }
        }
    }
}
