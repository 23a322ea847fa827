//! Everything an instance needs before its shim starts: the request checked, the
//! app's user, its directories (root-owned record dir; home and tmp owned by the
//! app's user), its cgroups, the shim's spec and the first record.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use paddock_wire::kinds::InstanceStart;
use paddock_wire::{now_ms, WireError};

use crate::cgroup;
use crate::child::APP_ROOT;
use crate::settings::Settings;
use crate::shim_proto::{OverlaySpec, ShimSpec};
use crate::store::{self, AppSpec, Record, ReleaseSpec, RECORD_VERSION};
use crate::users;

/// A provisioned instance, ready for its shim.
pub struct Provisioned {
    pub rec: Record,
    pub dir: PathBuf,
    pub cgroup: cgroup::InstanceCgroup,
}

/// The instance's directory (record, spec, log, the shim's socket).
pub fn instance_dir(s: &Settings, id: &str) -> PathBuf {
    s.instances_dir.join("instances").join(id)
}

/// Parses a signal name (`TERM`, `SIGTERM`, `term`).
pub fn signal_named(name: &str) -> Result<i32, WireError> {
    let n = name.trim().to_ascii_uppercase();
    let full = if n.starts_with("SIG") {
        n
    } else {
        format!("SIG{n}")
    };
    full.parse::<nix::sys::signal::Signal>()
        .map(|s| s as i32)
        .map_err(|_| WireError::invalid(format!("`{name}` is not a signal name")))
}

/// A caller's instance id: 1-100 of `[a-z0-9.-]`, starting with a letter or
/// digit (it names a directory and a cgroup: never `.`, `..` or a hidden name).
pub fn valid_id(id: &str) -> bool {
    (1..=100).contains(&id.len())
        && id.as_bytes()[0].is_ascii_alphanumeric()
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
}

/// The longest path a unix socket can be bound at (`sun_path` less its NUL).
const SOCKET_PATH_MAX: usize = 107;

/// The request's fields that can be judged without touching the system.
pub fn check(req: &InstanceStart) -> Result<(), WireError> {
    if let Some(id) = &req.id {
        if !valid_id(id) {
            return Err(WireError::invalid(
                "`id` must be 1-100 characters of [a-z0-9.-], starting with a letter or digit",
            ));
        }
    }
    if !users::valid_app(&req.app) {
        return Err(WireError::invalid(
            "`app` must be 1-28 characters of [a-z0-9-], starting with a letter",
        ));
    }
    if !users::valid_proc(&req.proc) {
        return Err(WireError::invalid(
            "`proc` must be 1-30 characters of [a-z0-9_-]",
        ));
    }
    match (&req.argv, req.command.trim().is_empty()) {
        (Some(a), true) if !a.is_empty() && !a[0].is_empty() => {}
        (None, false) => {}
        _ => {
            return Err(WireError::invalid(
                "give either `command` (a Procfile line) or `argv` (a non-empty list)",
            ))
        }
    }
    // Both signal names must be valid now, not when they are needed.
    signal_named(req.stop_signal.as_deref().unwrap_or("TERM"))?;
    signal_named(req.reload_signal.as_deref().unwrap_or("HUP"))?;
    if !Path::new(&req.dir).is_absolute() {
        return Err(WireError::invalid("`dir` must be an absolute path"));
    }
    Ok(())
}

pub fn limits_of(s: &Settings, spec: &AppSpec) -> cgroup::Limits {
    cgroup::Limits {
        memory_mb: spec.limits.memory_mb.or(s.memory_mb),
        pids: Some(spec.limits.pids.unwrap_or(s.pids)),
        cpu_weight: spec.limits.cpu_weight,
    }
}

fn mkdir(d: &Path, owner: Option<(u32, u32)>) -> Result<(), WireError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(d)
        .map_err(|e| WireError::internal(format!("cannot create {}: {e}", d.display())))?;
    match owner {
        Some((u, g)) => std::os::unix::fs::chown(d, Some(u), Some(g))
            .map_err(|e| WireError::internal(format!("chown {}: {e}", d.display()))),
        None => std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| WireError::internal(format!("chmod {}: {e}", d.display()))),
    }
}

/// Whether an instance `id` fits this runner: its shim's socket path must be
/// short enough to bind.
pub fn check_id_fits(s: &Settings, id: &str) -> Result<(), WireError> {
    let sock = instance_dir(s, id).join("shim.sock");
    let len = sock.as_os_str().len();
    if len > SOCKET_PATH_MAX {
        return Err(WireError::invalid(format!(
            "`id` is too long for this runner: its socket path {} would be {len} bytes (at most {SOCKET_PATH_MAX}); use a shorter id",
            sock.display()
        )));
    }
    Ok(())
}

/// Makes everything for a new instance `id` of `req` on `port` (checked with
/// [`check`] first). With `release`, the instance runs that release's unpacked
/// slug at `/app` (`req.dir` is `/app`, its env already holds the release's config).
/// `request` is the start's [`store::fingerprint`].
pub fn provision(
    s: &Settings,
    hierarchy: &cgroup::Hierarchy,
    id: &str,
    req: InstanceStart,
    port: u16,
    release: Option<ReleaseSpec>,
    request: String,
) -> Result<Provisioned, WireError> {
    let dir = PathBuf::from(&req.dir);
    let (token, owner) = (req.token, req.owner);
    let (uid, gid) =
        users::ensure_user(&req.app).map_err(|e| WireError::internal(crate::chain(&e)))?;
    if release.is_none() {
        users::check_readable_dir(&dir, uid, gid).map_err(|e| WireError::invalid(e.to_string()))?;
    }
    let mut spec = AppSpec::from(req);
    spec.release = release;
    let idir = instance_dir(s, id);
    let base = s.apps_dir.join(id);
    let (home, tmp) = (base.join("home"), base.join("tmp"));
    mkdir(&idir, None)?;
    {
        // Root-owned, searchable: the app's user reaches only its own home and tmp.
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(&base)
            .and_then(|_| std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o711)))
            .map_err(|e| WireError::internal(format!("cannot create {}: {e}", base.display())))?;
    }
    mkdir(&home, Some((uid, gid)))?;
    mkdir(&tmp, Some((uid, gid)))?;
    // The app's user must reach its home through apps_dir.
    users::check_readable_dir(&home, uid, gid).map_err(|e| {
        WireError::internal(format!(
            "apps_dir {} is not usable: {e}",
            s.apps_dir.display()
        ))
    })?;
    let limits = limits_of(s, &spec);
    let cg = hierarchy
        .create(id, &limits)
        .map_err(|e| WireError::internal(format!("cannot create cgroups: {e}")))?;
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    env.insert("PATH".into(), "/usr/local/bin:/usr/bin:/bin".into());
    env.insert("LANG".into(), "C.UTF-8".into());
    env.extend(spec.env.clone());
    // A release's HOME is its `/app`, as on Heroku.
    let home_env = match spec.release {
        Some(_) => APP_ROOT.to_string(),
        None => home.display().to_string(),
    };
    env.insert("HOME".into(), home_env);
    env.insert("TMPDIR".into(), tmp.display().to_string());
    env.insert("PORT".into(), port.to_string());
    env.insert("PADDOCK_APP".into(), spec.app.clone());
    env.insert("PADDOCK_PROC".into(), spec.proc.clone());
    env.insert("PADDOCK_INSTANCE".into(), id.to_string());
    // A release sources its `.profile.d` first (then execs the command itself).
    let argv = match spec.release {
        Some(_) => Some(crate::release::profile_wrapped(
            &format!("exec {}", spec.command),
            spec.argv.as_deref(),
        )),
        None => spec.argv.clone(),
    };
    let shim_spec = ShimSpec {
        id: id.to_string(),
        command: spec.command.clone(),
        argv,
        dir,
        env,
        uid,
        gid,
        nofile: spec.limits.nofile.unwrap_or(s.nofile),
        // Per user, so across all of this app's instances on the node; the exact
        // per-instance bound is the pids cgroup.
        nproc: Some(limits.pids.unwrap_or(s.pids).saturating_mul(8)),
        cgroup_procs: cg.procs.clone(),
        shim_cgroup_procs: cg.shim_procs.clone(),
        late_cgroup_procs: cg.late_procs.clone(),
        cgroup_kill: cg.kill.clone(),
        oom_counter: cg.oom_counter.clone(),
        log_file: idir.join("app.log"),
        log_max_bytes: s.log_max_bytes,
        app_mount: spec.release.as_ref().map(|r| OverlaySpec {
            lower: r.lower.clone(),
            layers: idir.join("layers"),
        }),
    };
    store::write_json(&idir.join("spec.json"), &shim_spec)
        .map_err(|e| WireError::internal(format!("cannot write spec: {e}")))?;
    let rec = Record {
        version: RECORD_VERSION,
        id: id.to_string(),
        spec,
        port,
        uid,
        gid,
        created: now_ms(),
        running: true,
        restarts: 0,
        crashed: None,
        stopped_at: None,
        token,
        owner,
        request: Some(request),
    };
    store::save(&idir, &rec)
        .map_err(|e| WireError::internal(format!("cannot write the record: {e}")))?;
    Ok(Provisioned {
        rec,
        dir: idir,
        cgroup: cg,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caller_ids_are_plain_names() {
        for ok in ["shop.web.v2.t7.1", "a", "0-x", &"x".repeat(100)] {
            assert!(valid_id(ok), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            ".hidden",
            "-x",
            "Shop",
            "a/b",
            "a_b",
            "a b",
            &"x".repeat(101),
        ] {
            assert!(!valid_id(bad), "{bad:?}");
        }
    }
}
