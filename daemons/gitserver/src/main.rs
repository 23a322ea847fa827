//! paddock-gitserver: flags, logging and config are BaseDaemon's; the rest is the lib.
fn main() {
    paddock_daemon::main(paddock_gitserver::spec(), paddock_gitserver::setup)
}
