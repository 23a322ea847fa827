//! `paddock-test-pg --dir DIR --watch PID`: the keeper of a test run's shared
//! PostgreSQL (see `paddock_harness::shared_pg`). Started by the first test of a
//! run; stops the server and removes DIR when process PID (the test runner) ends.
//!
//! `paddock-test-pg --stop-all BASE`: stops every keeper still serving under BASE
//! (ops/test.sh's safety net after a run; each keeper normally stops by itself).

use std::path::PathBuf;

fn main() {
    let mut dir: Option<PathBuf> = None;
    let mut watch: Option<i32> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--stop-all" => {
                let Some(base) = args.next().map(PathBuf::from) else {
                    eprintln!("usage: paddock-test-pg --stop-all BASE");
                    std::process::exit(64);
                };
                match paddock_harness::shared_pg::stop_keepers(&base) {
                    Ok(0) => std::process::exit(0),
                    Ok(n) => {
                        eprintln!(
                            "paddock-test-pg: stopped {n} keeper(s) left under {}",
                            base.display()
                        );
                        std::process::exit(1);
                    }
                    Err(e) => {
                        eprintln!("paddock-test-pg: {e:#}");
                        std::process::exit(1);
                    }
                }
            }
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
