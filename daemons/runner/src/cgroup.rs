//! Per-instance cgroups on v1 or v2, whichever the host has, written as plain files.
//! Tested against a fake cgroupfs (a temp dir) for the layout the host does not have.

use std::path::{Path, PathBuf};

use crate::shim_proto::CgroupKill;

/// Which hierarchy a host has, and where.
#[derive(Debug, Clone, PartialEq)]
pub enum Hierarchy {
    /// Unified: one directory with `cgroup.controllers`.
    V2 { root: PathBuf },
    /// One mount per controller; any may be missing.
    V1 {
        memory: Option<PathBuf>,
        pids: Option<PathBuf>,
        cpu: Option<PathBuf>,
        freezer: Option<PathBuf>,
    },
    /// No writable cgroups: rlimits and the shim's process tree still apply.
    None,
}

/// Limits for one instance.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    pub memory_mb: Option<u64>,
    pub pids: Option<u64>,
    /// Relative CPU weight, 1-10000 (v2 scale; 100 is the default).
    pub cpu_weight: Option<u64>,
}

/// One instance's cgroups, created under `<hierarchy>/paddock/<id>`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct InstanceCgroup {
    pub dirs: Vec<PathBuf>,
    /// Joined by the app between fork and exec.
    pub procs: Vec<PathBuf>,
    /// Joined by the shim once (v1 memory, pids, cpu); its children inherit them.
    pub shim_procs: Vec<PathBuf>,
    /// The app is moved here by the shim right after exec (v1 freezer).
    pub late_procs: Vec<PathBuf>,
    pub kill: Option<CgroupKill>,
    pub oom_counter: Option<PathBuf>,
}

fn writable(dir: &Path) -> bool {
    nix::unistd::access(dir, nix::unistd::AccessFlags::W_OK).is_ok()
}

impl Hierarchy {
    /// Looks at `root` (normally /sys/fs/cgroup).
    pub fn detect(root: &Path) -> Hierarchy {
        if root.join("cgroup.controllers").exists() {
            if writable(root) {
                return Hierarchy::V2 {
                    root: root.to_path_buf(),
                };
            }
            return Hierarchy::None;
        }
        let sub = |name: &str| {
            let p = root.join(name);
            (p.join("cgroup.procs").exists() && writable(&p)).then_some(p)
        };
        let h = Hierarchy::V1 {
            memory: sub("memory"),
            pids: sub("pids"),
            cpu: sub("cpu").or_else(|| sub("cpu,cpuacct")),
            freezer: sub("freezer"),
        };
        match &h {
            Hierarchy::V1 {
                memory: None,
                pids: None,
                cpu: None,
                freezer: None,
            } => Hierarchy::None,
            _ => h,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Hierarchy::V2 { .. } => "v2",
            Hierarchy::V1 { .. } => "v1",
            Hierarchy::None => "none",
        }
    }

    /// Creates the instance's cgroups and writes its limits.
    pub fn create(&self, id: &str, limits: &Limits) -> std::io::Result<InstanceCgroup> {
        match self {
            Hierarchy::None => Ok(InstanceCgroup::default()),
            Hierarchy::V2 { root } => {
                let parent = root.join("paddock");
                std::fs::create_dir_all(&parent)?;
                let enabled = enable_v2_controllers(root, &parent);
                let dir = parent.join(id);
                std::fs::create_dir_all(&dir)?;
                // A controller the host lacks (or refuses to delegate) costs that
                // limit only, with a warning; the instance still starts.
                let set = |ctl: &str, file: &str, value: String| {
                    if !enabled.iter().any(|c| c == ctl) {
                        tracing::warn!(
                            instance = %id,
                            "cgroup v2 controller `{ctl}` is not available under {}; {file} not set",
                            root.display()
                        );
                        return;
                    }
                    if let Err(e) = std::fs::write(dir.join(file), value) {
                        tracing::warn!(instance = %id, "cannot set {}: {e}", dir.join(file).display());
                    }
                };
                if let Some(mb) = limits.memory_mb {
                    set(
                        "memory",
                        "memory.max",
                        mb.saturating_mul(1 << 20).to_string(),
                    );
                    // Swap is capped with memory: no swapping around the limit.
                    if enabled.iter().any(|c| c == "memory") {
                        let _ = std::fs::write(dir.join("memory.swap.max"), "0");
                    }
                }
                if let Some(p) = limits.pids {
                    set("pids", "pids.max", p.to_string());
                }
                if let Some(w) = limits.cpu_weight {
                    set("cpu", "cpu.weight", w.clamp(1, 10_000).to_string());
                }
                Ok(InstanceCgroup {
                    procs: vec![dir.join("cgroup.procs")],
                    shim_procs: vec![],
                    late_procs: vec![],
                    kill: Some(CgroupKill::V2 {
                        kill_file: dir.join("cgroup.kill"),
                    }),
                    oom_counter: Some(dir.join("memory.events")),
                    dirs: vec![dir],
                })
            }
            Hierarchy::V1 {
                memory,
                pids,
                cpu,
                freezer,
            } => {
                let mut cg = InstanceCgroup::default();
                // The shim joins memory, pids and cpu; only the freezer is joined by
                // the app itself (a frozen shim could not finish the kill).
                let mut mk = |base: &Path, by_shim: bool| -> std::io::Result<PathBuf> {
                    let d = base.join("paddock").join(id);
                    std::fs::create_dir_all(&d)?;
                    if by_shim {
                        cg.shim_procs.push(d.join("cgroup.procs"));
                    } else {
                        cg.late_procs.push(d.join("cgroup.procs"));
                    }
                    cg.dirs.push(d.clone());
                    Ok(d)
                };
                if let Some(m) = memory {
                    let d = mk(m, true)?;
                    if let Some(mb) = limits.memory_mb {
                        let bytes = mb.saturating_mul(1 << 20).to_string();
                        std::fs::write(d.join("memory.limit_in_bytes"), &bytes)?;
                        // memsw exists only with swap accounting; cap swap when it does.
                        let _ = std::fs::write(d.join("memory.memsw.limit_in_bytes"), &bytes);
                    }
                    let counter = d.join("memory.oom_control");
                    if counter.exists() {
                        cg.oom_counter = Some(counter);
                    }
                }
                if let Some(p) = pids {
                    let d = mk(p, true)?;
                    if let Some(n) = limits.pids {
                        std::fs::write(d.join("pids.max"), n.to_string())?;
                    }
                }
                if let Some(c) = cpu {
                    let d = mk(c, true)?;
                    if let Some(w) = limits.cpu_weight {
                        // v1 shares: 1024 is the default, as weight 100 is on v2.
                        let shares = (w.clamp(1, 10_000) * 1024 / 100).max(2);
                        std::fs::write(d.join("cpu.shares"), shares.to_string())?;
                    }
                }
                if let Some(f) = freezer {
                    let d = mk(f, false)?;
                    cg.kill = Some(CgroupKill::V1 {
                        freezer_state: d.join("freezer.state"),
                        procs: d.join("cgroup.procs"),
                    });
                }
                Ok(cg)
            }
        }
    }
}

/// The controllers Paddock sets limits with.
const V2_CONTROLLERS: [&str; 3] = ["memory", "pids", "cpu"];

/// Delegates each controller the host has to `parent`'s children, one at a time
/// (one write with all of them fails as a whole when any is missing); returns the
/// ones that are enabled there.
fn enable_v2_controllers(root: &Path, parent: &Path) -> Vec<String> {
    let listed = |dir: &Path, file: &str| -> Vec<String> {
        std::fs::read_to_string(dir.join(file))
            .unwrap_or_default()
            .split_whitespace()
            .map(str::to_string)
            .collect()
    };
    let available = listed(root, "cgroup.controllers");
    let mut enabled = Vec::new();
    for ctl in V2_CONTROLLERS {
        if !available.iter().any(|c| c == ctl) {
            continue;
        }
        let mut ok = true;
        for dir in [root, parent] {
            if listed(dir, "cgroup.subtree_control")
                .iter()
                .any(|c| c == ctl)
            {
                continue;
            }
            if let Err(e) = std::fs::write(dir.join("cgroup.subtree_control"), format!("+{ctl}")) {
                tracing::warn!(
                    "cannot enable the cgroup v2 `{ctl}` controller in {}: {e}",
                    dir.display()
                );
                ok = false;
                break;
            }
        }
        if ok {
            enabled.push(ctl.to_string());
        }
    }
    enabled
}

impl InstanceCgroup {
    /// Removes the (empty) cgroup directories; errors are ignored (a cgroup with
    /// processes left cannot be removed and is retried at the next start).
    pub fn remove(&self) {
        for d in &self.dirs {
            let _ = std::fs::remove_dir(d);
        }
    }

    /// Pids currently in the instance (from the first hierarchy that has them).
    pub fn pids(&self) -> Vec<i32> {
        let mut v: Vec<i32> = self
            .procs
            .iter()
            .chain(self.shim_procs.iter())
            .chain(self.late_procs.iter())
            .flat_map(|p| {
                std::fs::read_to_string(p)
                    .unwrap_or_default()
                    .split_whitespace()
                    .filter_map(|x| x.parse().ok())
                    .collect::<Vec<i32>>()
            })
            .collect();
        v.sort();
        v.dedup();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch(p: &Path) {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, "").unwrap();
    }

    #[test]
    fn v2_layout_on_a_fake_cgroupfs() {
        let t = tempfile::tempdir().unwrap();
        std::fs::write(
            t.path().join("cgroup.controllers"),
            "cpuset cpu io memory hugetlb pids rdma misc\n",
        )
        .unwrap();
        let h = Hierarchy::detect(t.path());
        assert_eq!(h.name(), "v2");
        let cg = h
            .create(
                "i1",
                &Limits {
                    memory_mb: Some(64),
                    pids: Some(50),
                    cpu_weight: Some(200),
                },
            )
            .unwrap();
        let d = t.path().join("paddock/i1");
        assert_eq!(
            std::fs::read_to_string(d.join("memory.max")).unwrap(),
            (64u64 << 20).to_string()
        );
        assert_eq!(
            std::fs::read_to_string(d.join("memory.swap.max")).unwrap(),
            "0"
        );
        assert_eq!(std::fs::read_to_string(d.join("pids.max")).unwrap(), "50");
        assert_eq!(
            std::fs::read_to_string(d.join("cpu.weight")).unwrap(),
            "200"
        );
        // Enabled one at a time (the fake file keeps only the last write).
        assert_eq!(
            std::fs::read_to_string(t.path().join("paddock/cgroup.subtree_control")).unwrap(),
            "+cpu"
        );
        assert_eq!(cg.procs, vec![d.join("cgroup.procs")]);
        assert!(
            cg.shim_procs.is_empty(),
            "on v2 the shim stays out (cgroup.kill)"
        );
        assert_eq!(
            cg.kill,
            Some(CgroupKill::V2 {
                kill_file: d.join("cgroup.kill")
            })
        );
        assert_eq!(cg.oom_counter, Some(d.join("memory.events")));
        // The shim's exact kill on v2 is one write.
        crate::shim::kill_everything(cg.kill.as_ref());
        assert_eq!(std::fs::read_to_string(d.join("cgroup.kill")).unwrap(), "1");
        std::fs::write(
            d.join("memory.events"),
            "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n",
        )
        .unwrap();
        assert_eq!(crate::shim::oom_kills(&d.join("memory.events")), 1);
    }

    #[test]
    fn a_v2_host_missing_a_controller_still_starts_instances() {
        let t = tempfile::tempdir().unwrap();
        // No cpu controller on this host: writing cpu.weight would fail (a
        // directory stands in for the file the kernel would not have).
        std::fs::write(t.path().join("cgroup.controllers"), "memory pids\n").unwrap();
        std::fs::create_dir_all(t.path().join("paddock/i3/cpu.weight")).unwrap();
        let h = Hierarchy::detect(t.path());
        let cg = h
            .create(
                "i3",
                &Limits {
                    memory_mb: Some(16),
                    pids: Some(10),
                    cpu_weight: Some(300),
                },
            )
            .expect("a missing controller degrades, it does not fail the start");
        let d = t.path().join("paddock/i3");
        assert_eq!(std::fs::read_to_string(d.join("pids.max")).unwrap(), "10");
        assert_eq!(
            std::fs::read_to_string(d.join("memory.max")).unwrap(),
            (16u64 << 20).to_string()
        );
        let sub = std::fs::read_to_string(t.path().join("cgroup.subtree_control")).unwrap();
        assert!(!sub.contains("cpu"), "{sub}");
        assert!(cg.kill.is_some());
    }

    #[test]
    fn v1_layout_on_a_fake_cgroupfs() {
        let t = tempfile::tempdir().unwrap();
        for c in ["memory", "pids", "cpu", "freezer"] {
            touch(&t.path().join(c).join("cgroup.procs"));
        }
        let h = Hierarchy::detect(t.path());
        assert_eq!(h.name(), "v1");
        // A real memory cgroup has memory.oom_control; the fake one gets it too.
        touch(&t.path().join("memory/paddock/i2/memory.oom_control"));
        let cg = h
            .create(
                "i2",
                &Limits {
                    memory_mb: Some(32),
                    pids: Some(20),
                    cpu_weight: Some(50),
                },
            )
            .unwrap();
        let r = |p: &str| std::fs::read_to_string(t.path().join(p)).unwrap();
        assert_eq!(
            r("memory/paddock/i2/memory.limit_in_bytes"),
            (32u64 << 20).to_string()
        );
        assert_eq!(r("pids/paddock/i2/pids.max"), "20");
        assert_eq!(r("cpu/paddock/i2/cpu.shares"), "512");
        assert!(
            cg.procs.is_empty(),
            "no migration between fork and exec on v1"
        );
        assert_eq!(cg.shim_procs.len(), 3, "the shim joins memory, pids, cpu");
        assert_eq!(
            cg.late_procs.len(),
            1,
            "the app joins the freezer after exec"
        );
        assert!(cg.late_procs[0].starts_with(t.path().join("freezer")));
        assert!(matches!(cg.kill, Some(CgroupKill::V1 { .. })));
        assert!(cg.oom_counter.is_some());
    }

    #[test]
    fn nothing_writable_is_none() {
        let t = tempfile::tempdir().unwrap();
        assert_eq!(Hierarchy::detect(t.path()), Hierarchy::None);
        let cg = Hierarchy::None
            .create(
                "x",
                &Limits {
                    memory_mb: Some(1),
                    pids: None,
                    cpu_weight: None,
                },
            )
            .unwrap();
        assert!(cg.procs.is_empty() && cg.kill.is_none());
    }
}
