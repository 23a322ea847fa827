//! paddock-scheduler: flags, logging and config are BaseDaemon's; the rest is the lib.
fn main() {
    paddock_daemon::main(paddock_scheduler::spec(), paddock_scheduler::setup)
}
