//! One unprivileged Unix account per app, created on first use, and the checks
//! that an app's user can read what it is given.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

/// Why an app's account could not be had.
#[derive(Debug, thiserror::Error)]
pub enum UserError {
    #[error("account {0} has uid or gid 0; refusing to run an app as root")]
    Root(String),
    #[error("cannot run useradd")]
    Useradd(#[source] std::io::Error),
    #[error("useradd {name} failed: {stderr}")]
    UseraddFailed { name: String, stderr: String },
    #[error("account {0} is missing after useradd")]
    Missing(String),
    #[error("cannot run userdel")]
    Userdel(#[source] std::io::Error),
    #[error("userdel {name} failed: {stderr}")]
    UserdelFailed { name: String, stderr: String },
}

/// Why the app's user cannot use a directory; the message names the directory
/// that stops it and what to do.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct DirError(String);

/// App names: what can become part of a user name and a cgroup name.
pub fn valid_app(name: &str) -> bool {
    (1..=28).contains(&name.len())
        && name.as_bytes()[0].is_ascii_lowercase()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

pub fn valid_proc(name: &str) -> bool {
    (1..=30).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

/// The account an app runs as.
pub fn user_name(app: &str) -> String {
    format!("pdk-{app}")
}

/// The uid and gid of the app's account, creating it (and its group) if needed.
pub fn ensure_user(app: &str) -> Result<(u32, u32), UserError> {
    let name = user_name(app);
    if let Ok(Some(u)) = nix::unistd::User::from_name(&name) {
        if u.uid.is_root() || u.gid.as_raw() == 0 {
            return Err(UserError::Root(name));
        }
        return Ok((u.uid.as_raw(), u.gid.as_raw()));
    }
    let out = Command::new("useradd")
        .args([
            "--system",
            "--user-group",
            "--no-create-home",
            "--home-dir",
            "/nonexistent",
            "--shell",
            "/usr/sbin/nologin",
        ])
        .arg(&name)
        .output()
        .map_err(UserError::Useradd)?;
    // Another runner may have created it at the same moment (exit 9: exists).
    if !out.status.success() && out.status.code() != Some(9) {
        return Err(UserError::UseraddFailed {
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            name,
        });
    }
    match nix::unistd::User::from_name(&name) {
        Ok(Some(u)) if u.uid.as_raw() != 0 => Ok((u.uid.as_raw(), u.gid.as_raw())),
        _ => Err(UserError::Missing(name)),
    }
}

/// Removes the app's account and its group; `false` when there was none.
/// userdel refuses while a process of the account runs (a one-off, say).
pub fn remove_user(app: &str) -> Result<bool, UserError> {
    let name = user_name(app);
    match nix::unistd::User::from_name(&name) {
        Ok(Some(u)) if u.uid.is_root() => return Err(UserError::Root(name)),
        Ok(Some(_)) => {}
        _ => return Ok(false),
    }
    let out = Command::new("userdel")
        .arg(&name)
        .output()
        .map_err(UserError::Userdel)?;
    // 6: no such user (another runner on this node, or by hand, was first).
    if !out.status.success() && out.status.code() != Some(6) {
        return Err(UserError::UserdelFailed {
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            name,
        });
    }
    Ok(out.status.success())
}

fn allows(meta: &std::fs::Metadata, uid: u32, gid: u32, bits: u32) -> bool {
    let mode = meta.mode();
    if meta.uid() == uid {
        return mode & (bits << 6) == bits << 6;
    }
    if meta.gid() == gid {
        return mode & (bits << 3) == bits << 3;
    }
    mode & bits == bits
}

/// Whether `uid`/`gid` (with no supplementary groups) can list and enter `dir`,
/// which needs search permission on every parent too. The error names the first
/// directory that stops it.
pub fn check_readable_dir(dir: &Path, uid: u32, gid: u32) -> Result<(), DirError> {
    let meta =
        std::fs::metadata(dir).map_err(|e| DirError(format!("`dir` {}: {e}", dir.display())))?;
    if !meta.is_dir() {
        return Err(DirError(format!(
            "`dir` {} is not a directory",
            dir.display()
        )));
    }
    if !allows(&meta, uid, gid, 0o5) {
        return Err(DirError(format!(
            "`dir` {} is not readable by the app's user (uid {uid}); make it readable (e.g. chmod o+rx) — the runner never changes its ownership",
            dir.display()
        )));
    }
    let mut p = dir.parent();
    while let Some(d) = p {
        let m = std::fs::metadata(d).map_err(|e| DirError(format!("{}: {e}", d.display())))?;
        if !allows(&m, uid, gid, 0o1) {
            return Err(DirError(format!(
                "the app's user (uid {uid}) cannot reach `dir` {}: {} is not searchable (chmod o+x)",
                dir.display(),
                d.display()
            )));
        }
        p = d.parent();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn names() {
        assert!(valid_app("web-shop2"));
        assert!(!valid_app("Web"));
        assert!(!valid_app("-x"));
        assert!(!valid_app(&"a".repeat(29)));
        assert!(valid_proc("web_worker"));
        assert!(!valid_proc("a b"));
        assert_eq!(user_name("shop"), "pdk-shop");
    }

    #[test]
    fn readable_dir_checks_the_dir_and_its_parents() {
        let t = tempfile::tempdir().unwrap();
        let code = t.path().join("code");
        std::fs::create_dir(&code).unwrap();
        std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&code, std::fs::Permissions::from_mode(0o755)).unwrap();
        let stranger = 54321;
        check_readable_dir(&code, stranger, stranger).unwrap();
        std::fs::set_permissions(&code, std::fs::Permissions::from_mode(0o700)).unwrap();
        let e = check_readable_dir(&code, stranger, stranger)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not readable"), "{e}");
        std::fs::set_permissions(&code, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let e = check_readable_dir(&code, stranger, stranger)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not searchable"), "{e}");
        assert!(check_readable_dir(&t.path().join("nope"), stranger, stranger).is_err());
    }
}
