//! The real binary, given a cluster file with a misspelt `[daemons.heartbeat]` key,
//! exits 78 (EX_CONFIG) before binding anything and names the key on stderr.

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const KEY: &str = "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0";

/// Runs the daemon on `section` and returns its exit code and stderr. Its endpoints
/// are in a directory that does not exist, so a daemon that wrongly accepted the
/// file fails at bind (71) instead of serving; a timeout guards the rest.
fn run(section: &str) -> (Option<i32>, String) {
    run_with_env(section, &[])
}

/// As `run`, with `PADDOCK__…` overrides in the daemon's environment.
fn run_with_env(section: &str, env: &[(&str, &str)]) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let ipc = dir.path().join("absent");
    let file = format!(
        "node = \"a\"\nsigning_key = \"k1\"\nstate_dir = \"{state}\"\n[keys]\nk1 = \"{KEY}\"\n\
         [daemons.heartbeat]\nrpc = \"ipc://{ipc}/rpc\"\npull = \"ipc://{ipc}/pull\"\n\
         pub = \"ipc://{ipc}/pub\"\n{section}",
        state = dir.path().join("state").display(),
        ipc = ipc.display(),
    );
    let path = dir.path().join("paddock.toml");
    std::fs::write(&path, file).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let err = dir.path().join("stderr");
    let mut child = Command::new(env!("CARGO_BIN_EXE_paddock-heartbeat"))
        .arg("--config")
        .arg(&path)
        .env_remove("PADDOCK_LOG")
        .envs(env.iter().copied())
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
    let (code, stderr) = run("suspect_afer = 2\n");
    assert_eq!(code, Some(78), "{stderr}");
    assert!(
        stderr.contains("daemons.heartbeat.suspect_afer"),
        "stderr does not name the key: {stderr}"
    );
}

#[test]
fn a_bad_threshold_exits_78_naming_it() {
    let (code, stderr) = run("suspect_after = 3\ndead_after = 2\n");
    assert_eq!(code, Some(78), "{stderr}");
    assert!(stderr.contains("daemons.heartbeat.dead_after"), "{stderr}");
}

/// Overrides from the environment go through the same typed section: their values
/// are read as numbers, and a misspelt one is refused the same way.
#[test]
fn environment_overrides_are_typed_too() {
    let (code, stderr) = run_with_env(
        "",
        &[
            ("PADDOCK__DAEMONS__HEARTBEAT__SUSPECT_AFTER", "5"),
            ("PADDOCK__DAEMONS__HEARTBEAT__DEAD_AFTER", "4"),
        ],
    );
    assert_eq!(code, Some(78), "{stderr}");
    assert!(
        stderr.contains("daemons.heartbeat.dead_after") && stderr.contains("(5), not 4"),
        "{stderr}"
    );
    let (code, stderr) = run_with_env("", &[("PADDOCK__DAEMONS__HEARTBEAT__DEAD_AFER", "4")]);
    assert_eq!(code, Some(78), "{stderr}");
    assert!(stderr.contains("daemons.heartbeat.dead_afer"), "{stderr}");
}
