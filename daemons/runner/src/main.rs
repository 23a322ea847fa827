//! paddock-runner: flags, logging and config are BaseDaemon's; the rest is the lib.
fn main() {
    paddock_daemon::main(paddock_runner::spec(), paddock_runner::setup)
}
