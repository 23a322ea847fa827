//! `paddock-test-pg --dir DIR --watch PID`: the keeper of a test run's shared
//! PostgreSQL (see `paddock_harness::shared_pg`). Started by the first test of a
//! run; stops the server and removes DIR when process PID (the test runner) ends.

use std::path::PathBuf;

fn main() {
    let mut dir: Option<PathBuf> = None;
    let mut watch: Option<i32> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--dir" => dir = args.next().map(PathBuf::from),
            "--watch" => watch = args.next().and_then(|p| p.parse().ok()),
            other => {
                eprintln!("paddock-test-pg: unknown argument {other:?}");
                std::process::exit(64);
            }
        }
    }
    let (Some(dir), Some(watch)) = (dir, watch) else {
        eprintln!("usage: paddock-test-pg --dir DIR --watch PID");
        std::process::exit(64);
    };
    match paddock_harness::shared_pg::keep(&dir, watch) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("paddock-test-pg: {e:#}");
            std::process::exit(1);
        }
    }
}
