//! paddock-gitserver: the daemon (flags, logging and config are BaseDaemon's), or,
//! as `keys`, `serve` or `hook`, one of the helpers sshd and git run as `git`.
fn main() {
    if let Some(code) = paddock_gitserver::helpers::dispatch() {
        std::process::exit(code);
    }
    paddock_daemon::main(paddock_gitserver::spec(), paddock_gitserver::setup)
}
