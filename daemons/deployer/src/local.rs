//! Local buildpacks: a directory on the deployer's node named by an absolute
//! path in `.buildpacks` or `BUILDPACK_URL`. The customer chooses the path, so
//! it is taken only under a directory the operator listed
//! (`[daemons.deployer] local_buildpacks`), resolved once, checked on the
//! resolved path (every directory root's and writable by no one else, or
//! sticky and root's like /tmp, so no other account can swap any part of it),
//! and opened `O_PATH`: the sandbox binds that fd, never the path again.

use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// The buildpack directory, opened, and its resolved path; or why not, for the
/// person who pushed.
pub fn open(typed: &str, allowed: &[PathBuf]) -> Result<(std::fs::File, PathBuf), String> {
    if allowed.is_empty() {
        return Err(
            "local buildpack paths are not allowed on this deployer; use a built-in buildpack \
             (python, node, static, procfile) or an uploaded one (paddock:NAME), or ask the \
             operator to list a directory in [daemons.deployer] local_buildpacks"
                .into(),
        );
    }
    let not_under = || {
        format!(
            "{typed} is not under a directory this deployer allows local buildpacks in ({})",
            allowed
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    // The path as typed first, so nothing outside the allowed directories is
    // even looked up (the answers would tell which root-only paths exist),
    // then where it leads; messages name only what was typed.
    let typed_path = Path::new(typed);
    if typed_path
        .components()
        .any(|c| c == std::path::Component::ParentDir)
        || !allowed.iter().any(|p| typed_path.starts_with(p))
    {
        return Err(not_under());
    }
    let resolved = std::fs::canonicalize(typed).map_err(|e| format!("cannot resolve it: {e}"))?;
    let under = allowed.iter().any(|prefix| {
        std::fs::canonicalize(prefix).is_ok_and(|p| resolved.starts_with(&p) && resolved != p)
    });
    if !under {
        return Err(not_under());
    }
    let dir = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&resolved)
        .map_err(|e| format!("cannot open {}: {e}", resolved.display()))?;
    let meta = dir
        .metadata()
        .map_err(|e| format!("cannot read {}: {e}", resolved.display()))?;
    safe(&resolved, &meta, false)?;
    still_names(&dir, &resolved)?;
    Ok((dir, resolved))
}

/// Whether `resolved` still names the directory `dir` was opened on, with no
/// symlink and every part still safe (only root could have changed it).
pub fn still_names(dir: &std::fs::File, resolved: &Path) -> Result<(), String> {
    let meta = dir
        .metadata()
        .map_err(|e| format!("cannot read {}: {e}", resolved.display()))?;
    let now = std::fs::symlink_metadata(resolved)
        .map_err(|e| format!("cannot read {}: {e}", resolved.display()))?;
    safe(resolved, &now, false)?;
    for a in resolved.ancestors().skip(1) {
        let m = std::fs::symlink_metadata(a).map_err(|e| format!("{}: {e}", a.display()))?;
        safe(a, &m, true)?;
    }
    if (now.dev(), now.ino()) != (meta.dev(), meta.ino()) {
        return Err(format!(
            "{} is no longer the directory that was checked",
            resolved.display()
        ));
    }
    Ok(())
}

/// Root's, a real directory, and writable by no one else (an ancestor may be
/// sticky instead, as /tmp is: no one else can rename or remove root's entries).
fn safe(p: &Path, m: &std::fs::Metadata, ancestor: bool) -> Result<(), String> {
    if !m.file_type().is_dir() {
        return Err(format!("{} is not a directory", p.display()));
    }
    if m.uid() != 0 {
        return Err(format!(
            "{} is owned by uid {}, not root: a local buildpack and every directory above it must be root's",
            p.display(),
            m.uid()
        ));
    }
    let sticky = m.mode() & 0o1000 != 0;
    if m.mode() & 0o022 != 0 && !(ancestor && sticky) {
        return Err(format!(
            "{} is writable by its group or others (mode {:o}): a local buildpack and every directory above it must be writable by root only",
            p.display(),
            m.mode() & 0o7777
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn chmod(p: &Path, mode: u32) {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn only_safe_directories_under_an_allowed_prefix() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root (ownership checks)");
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let allowed = t.path().join("allowed");
        let bp = allowed.join("bp");
        let outside = t.path().join("outside");
        for d in [&bp, &outside] {
            std::fs::create_dir_all(d).unwrap();
        }
        for d in [t.path(), &allowed, &bp, &outside] {
            chmod(d, 0o755);
        }
        let list = [allowed.clone()];
        let e = open(bp.to_str().unwrap(), &[]).unwrap_err();
        assert!(e.contains("not allowed"), "{e}");
        let (_, resolved) = open(bp.to_str().unwrap(), &list).unwrap();
        assert_eq!(resolved, std::fs::canonicalize(&bp).unwrap());
        // The prefix itself is not a buildpack.
        assert!(open(allowed.to_str().unwrap(), &list).is_err());
        let e = open(outside.to_str().unwrap(), &list).unwrap_err();
        assert!(e.contains("is not under"), "{e}");
        // Nothing outside is even looked up: a missing path says the same.
        let e = open("/root/no-such-buildpack", &list).unwrap_err();
        assert!(e.contains("is not under"), "{e}");
        assert!(!e.contains("resolve"), "{e}");
        // A symlink inside the prefix is judged by where it leads.
        let lnk = allowed.join("lnk");
        std::os::unix::fs::symlink(&outside, &lnk).unwrap();
        let e = open(lnk.to_str().unwrap(), &list).unwrap_err();
        assert!(e.contains("is not under"), "{e}");
        // `..` leads out too.
        let dotdot = format!("{}/../outside", bp.display());
        assert!(open(&format!("{}/..", dotdot), &list).is_err());
        chmod(&bp, 0o777);
        let e = open(bp.to_str().unwrap(), &list).unwrap_err();
        assert!(e.contains("writable"), "{e}");
        chmod(&bp, 0o755);
        chmod(&allowed, 0o775);
        let e = open(bp.to_str().unwrap(), &list).unwrap_err();
        assert!(e.contains("writable"), "{e}");
        chmod(&allowed, 0o755);
        std::os::unix::fs::chown(&bp, Some(65534), None).unwrap();
        let e = open(bp.to_str().unwrap(), &list).unwrap_err();
        assert!(e.contains("not root"), "{e}");
    }
}
