//! The real binary, given a cluster file with a misspelt `[daemons.locker]` key,
//! exits 78 (EX_CONFIG) before binding anything and names the key on stderr.

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const KEY: &str = "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0";

/// Runs the daemon on `section` and returns its exit code and stderr. Its rpc
/// endpoint is in a directory that does not exist, so a daemon that wrongly accepted
/// the file fails at bind (71) instead of serving; a timeout guards the rest.
fn run(section: &str) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let file = format!(
        "node = \"a\"\nsigning_key = \"k1\"\nstate_dir = \"{state}\"\n[keys]\nk1 = \"{KEY}\"\n\
         [database]\nurl = \"host=127.0.0.1 port=1 user=paddock dbname=paddock\"\n\
         [daemons.locker]\nrpc = \"ipc://{ipc}/rpc\"\n{section}",
        state = dir.path().join("state").display(),
        ipc = dir.path().join("absent").display(),
    );
    let path = dir.path().join("paddock.toml");
    std::fs::write(&path, file).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let err = dir.path().join("stderr");
    let mut child = Command::new(env!("CARGO_BIN_EXE_paddock-locker"))
        .arg("--config")
        .arg(&path)
        .env_remove("PADDOCK_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            break child.wait().unwrap();
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (status.code(), std::fs::read_to_string(&err).unwrap())
}

#[test]
fn a_misspelt_key_exits_78_naming_it() {
    let (code, stderr) = run("pool_sise = 8\n");
    assert_eq!(code, Some(78), "{stderr}");
    assert!(
        stderr.contains("daemons.locker.pool_sise"),
        "stderr does not name the key: {stderr}"
    );
}

#[test]
fn a_pool_size_out_of_range_exits_78_naming_it() {
    let (code, stderr) = run("pool_size = 0\n");
    assert_eq!(code, Some(78), "{stderr}");
    assert!(stderr.contains("daemons.locker.pool_size"), "{stderr}");
}
