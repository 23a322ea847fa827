//! File-descriptor hygiene of the platform's own root processes: whatever a parent
//! leaves open (a supervisor's pipes, a shell's redirections) is marked
//! close-on-exec at start, so none of their children inherits it.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use paddock_integration::*;

/// The fds of `pid` that point at `target`, with whether each is close-on-exec.
fn held(pid: i32, target: &Path) -> Vec<bool> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter(|e| std::fs::read_link(e.path()).is_ok_and(|t| t == target))
        .map(|e| {
            let info = std::fs::read_to_string(format!(
                "/proc/{pid}/fdinfo/{}",
                e.file_name().to_string_lossy()
            ))
            .unwrap();
            let flags = info
                .lines()
                .find_map(|l| l.strip_prefix("flags:"))
                .map(|f| u32::from_str_radix(f.trim(), 8).unwrap())
                .unwrap();
            flags & libc::O_CLOEXEC as u32 != 0
        })
        .collect()
}

struct Kill(std::process::Child);

impl Drop for Kill {
    fn drop(&mut self) {
        paddock_harness::stop_child(
            &mut self.0,
            nix::sys::signal::Signal::SIGTERM,
            Duration::from_secs(3),
        );
    }
}

#[test]
fn a_daemon_marks_every_inherited_fd_close_on_exec() {
    let t = TestDir::new("fds");
    let key = test_key();
    let node = Node::new(t.path(), "node-a", &key, &[], None);
    let log = std::fs::File::create(node.log("heartbeat")).unwrap();
    // fd 7 open without close-on-exec, as `exec 7<` in a shell leaves it.
    let hb = Kill(
        Command::new("sh")
            .arg("-c")
            .arg("exec 7</etc/hostname; exec \"$0\" --config \"$1\"")
            .arg(paddock_harness::bin("paddock-heartbeat").unwrap())
            .arg(&node.config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    paddock_harness::wait_ping(
        &node.rpc("heartbeat"),
        node.keys.clone(),
        Duration::from_secs(20),
    )
    .unwrap();
    assert_eq!(
        held(hb.0.id() as i32, Path::new("/etc/hostname")),
        vec![true],
        "the inherited fd is held, close-on-exec"
    );
}
