//! paddock-api: flags, logging and config are BaseDaemon's; the rest is the lib.

// Every request builds and parses JSON trees (rows to `Value`s, replies):
// glibc malloc and free were ~20% of the api's samples under the api benchmark,
// mimalloc costs less there (ops/bench, docs/BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    paddock_daemon::main(paddock_api::spec(), paddock_api::setup)
}
