//! paddock-balancer: flags, logging and config are BaseDaemon's; the rest is the lib.
fn main() {
    paddock_daemon::main_with(
        paddock_balancer::spec(),
        paddock_balancer::setup,
        paddock_balancer::hooks(),
    )
}
