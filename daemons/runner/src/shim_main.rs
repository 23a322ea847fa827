//! paddock-shim <instance dir>: started by paddock-runner, one per instance.
fn main() {
    let Some(dir) = std::env::args_os().nth(1) else {
        eprintln!("usage: paddock-shim <instance dir>");
        std::process::exit(64);
    };
    std::process::exit(paddock_runner::shim::run(std::path::Path::new(&dir)))
}
