//! paddock-blobstore: flags, logging and config are BaseDaemon's; the rest is the lib.
fn main() {
    paddock_daemon::main(paddock_blobstore::spec(), paddock_blobstore::setup)
}
