//! paddock-deployer: flags, logging and config are BaseDaemon's; the rest is the lib.
fn main() {
    paddock_daemon::main(paddock_deployer::spec(), paddock_deployer::setup)
}
