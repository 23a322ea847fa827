//! paddock-heartbeat: flags, logging and config are BaseDaemon's; the rest is the lib.
fn main() {
    paddock_daemon::main(paddock_heartbeat::spec(), paddock_heartbeat::setup)
}
