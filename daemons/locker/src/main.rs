//! paddock-locker: flags, logging and config are BaseDaemon's; the rest is the lib.
fn main() {
    paddock_daemon::main(paddock_locker::spec(), paddock_locker::setup)
}
