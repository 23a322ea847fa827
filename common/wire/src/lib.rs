//! Paddock's wire protocol (docs/PROTOCOL.md): the envelope, HMAC signing, the
//! receiver's checks, the libzmq transport and the message bodies.
//!
//! Architecture invariant: this is the only crate that knows the envelope and the
//! frame layout. Daemons hand it bodies and get bodies back; they never build or
//! parse frames themselves.

pub mod client;
pub mod curve;
pub mod envelope;
pub mod error;
pub mod gate;
pub mod keyring;
pub mod kinds;
pub mod outgoing;
pub mod server;

use std::sync::OnceLock;

pub use client::{Client, ClientError, Credentials, Pusher, Subscriber};
pub use envelope::{now_ms, Envelope};
pub use error::{Code, WireError};
pub use gate::Limits;
pub use keyring::{Keyring, SharedKeyring};
pub use outgoing::{Calls, Pending};
pub use server::{Inbound, Request, Server, ServerHandle, ServerSpec};

/// The process's one libzmq context (it is thread-safe; sockets are not).
pub fn zmq_context() -> &'static zmq::Context {
    static CTX: OnceLock<zmq::Context> = OnceLock::new();
    CTX.get_or_init(zmq::Context::new)
}
