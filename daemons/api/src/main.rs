//! paddock-api: flags, logging and config are BaseDaemon's; the rest is the lib.
fn main() {
    paddock_daemon::main(paddock_api::spec(), paddock_api::setup)
}
