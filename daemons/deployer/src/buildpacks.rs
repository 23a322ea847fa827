//! The built-in buildpacks, shipped in the binary and installed root-owned into
//! `<dir>/buildpacks/` at every start (a build sees them read-only at
//! `/tmp/buildpacks`), with the helpers the deployer runs in the sandbox and
//! the static buildpack's file server.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// (path under `<dir>/buildpacks`, contents); every file is installed 0755.
const FILES: &[(&str, &str)] = &[
    (
        "python/bin/detect",
        include_str!("../buildpacks/python/bin/detect"),
    ),
    (
        "python/bin/compile",
        include_str!("../buildpacks/python/bin/compile"),
    ),
    (
        "python/bin/release",
        include_str!("../buildpacks/python/bin/release"),
    ),
    (
        "python/lib/wsgi.py",
        include_str!("../buildpacks/python/lib/wsgi.py"),
    ),
    (
        "node/bin/detect",
        include_str!("../buildpacks/node/bin/detect"),
    ),
    (
        "node/bin/compile",
        include_str!("../buildpacks/node/bin/compile"),
    ),
    (
        "node/bin/release",
        include_str!("../buildpacks/node/bin/release"),
    ),
    (
        "static/bin/detect",
        include_str!("../buildpacks/static/bin/detect"),
    ),
    (
        "static/bin/compile",
        include_str!("../buildpacks/static/bin/compile"),
    ),
    (
        "static/bin/release",
        include_str!("../buildpacks/static/bin/release"),
    ),
    (
        "procfile/bin/detect",
        include_str!("../buildpacks/procfile/bin/detect"),
    ),
    (
        "procfile/bin/compile",
        include_str!("../buildpacks/procfile/bin/compile"),
    ),
    (
        "procfile/bin/release",
        include_str!("../buildpacks/procfile/bin/release"),
    ),
    (
        "_paddock/unpack",
        include_str!("../buildpacks/paddock/unpack"),
    ),
    ("_paddock/slug", include_str!("../buildpacks/paddock/slug")),
];

/// Where the sandbox sees the installed buildpacks.
pub const MOUNTED: &str = "/tmp/buildpacks";

/// The `paddock-static` binary: beside the deployer's own executable (cargo and
/// packages install them together), or `PADDOCK_STATIC_BIN`.
pub fn static_server() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("PADDOCK_STATIC_BIN") {
        return Some(PathBuf::from(p));
    }
    let exe = std::env::current_exe().ok()?;
    let p = exe.parent()?.join("paddock-static");
    p.is_file().then_some(p)
}

/// Writes every built-in buildpack into `dir` (root-owned, dirs and files 0755),
/// replacing what was there, and copies the static file server in.
pub fn install(dir: &Path) -> std::io::Result<()> {
    let mk = |d: &Path| -> std::io::Result<()> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(d)?;
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755))
    };
    mk(dir)?;
    for (rel, text) in FILES {
        let p = dir.join(rel);
        mk(p.parent().expect("a file in a dir"))?;
        write_0755(&p, text.as_bytes())?;
    }
    let vendor = dir.join("static/vendor");
    mk(&vendor)?;
    match static_server() {
        Some(bin) => {
            let bytes = std::fs::read(&bin)?;
            write_0755(&vendor.join("paddock-static"), &bytes)?;
        }
        None => tracing::warn!(
            "paddock-static is not beside the deployer ({}); static sites will fail to build",
            std::env::current_exe()
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        ),
    }
    Ok(())
}

fn write_0755(p: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = p.with_extension("paddock-new");
    std::fs::write(&tmp, bytes)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))?;
    std::fs::rename(&tmp, p)
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_builtin_has_its_three_scripts() {
        for bp in crate::procfile::BUILTINS {
            for s in ["detect", "compile", "release"] {
                let want = format!("{bp}/bin/{s}");
                let text = super::FILES
                    .iter()
                    .find(|(p, _)| *p == want)
                    .unwrap_or_else(|| panic!("{want} is not shipped"))
                    .1;
                assert!(text.starts_with("#!/usr/bin/env bash\n"), "{want}");
            }
        }
    }
}
