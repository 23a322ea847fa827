//! paddock-bench-stamp FILE CMD [ARGS…]: appends "<CLOCK_REALTIME ns> <pid>" to FILE,
//! then execs CMD in the same process, so a supervisor's respawn can be timed at
//! exec (the pid the supervisor tracks stays the app's).
use std::io::Write;
use std::os::unix::process::CommandExt;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 2 {
        eprintln!("usage: paddock-bench-stamp FILE CMD [ARGS...]");
        std::process::exit(64);
    }
    let ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&args[0])
    {
        let _ = writeln!(f, "{ns} {}", std::process::id());
    }
    let err = std::process::Command::new(&args[1]).args(&args[2..]).exec();
    eprintln!("paddock-bench-stamp: cannot exec {}: {err}", args[1]);
    std::process::exit(127);
}
