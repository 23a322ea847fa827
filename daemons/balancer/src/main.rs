//! paddock-balancer: flags, logging and config are BaseDaemon's; the rest is the lib.

// The proxy allocates per request (hyper's header maps, bodies); mimalloc's
// per-thread free lists cost less than glibc malloc's locks on that path
// (ops/bench/balancer, docs/BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    paddock_daemon::main_with(
        paddock_balancer::spec(),
        paddock_balancer::setup,
        paddock_balancer::hooks(),
    )
}
