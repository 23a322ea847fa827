//! Transport security: CurveZMQ (RFC 26) on every socket, and a ZAP handler
//! (RFC 27) that admits only the client public keys a daemon knows, so a stranger
//! cannot complete a connection, let alone send a frame (docs/PROTOCOL.md,
//! "Transport"). HMAC signing of each message is independent of this layer.
//!
//! libzmq asks the ZAP handler bound at `inproc://zeromq.zap.01` of the socket's
//! context about every CURVE handshake. There is one context per process, so there
//! is one handler per process, started before the first CURVE server socket binds;
//! each server registers its own ZAP domain with its own admitted set, which SIGHUP
//! can replace while connections keep running.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use crate::zmq_context;

/// A 32-byte CURVE key, public or secret. `Debug` never shows a secret's bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Key([u8; 32]);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(***)")
    }
}

impl Key {
    /// Decodes a 40-character Z85 key (`zmq_curve_keypair`'s form).
    pub fn from_z85(z85: &str) -> Result<Key, CurveError> {
        let z85 = z85.trim();
        if z85.len() != 40 {
            return Err(CurveError::BadKey(format!(
                "is {} characters long; a CURVE key is 40 Z85 characters",
                z85.len()
            )));
        }
        const Z85: &[u8] =
            b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#";
        if !z85.bytes().all(|b| Z85.contains(&b)) {
            return Err(CurveError::BadKey("is not valid Z85".into()));
        }
        let bytes =
            zmq::z85_decode(z85).map_err(|_| CurveError::BadKey("is not valid Z85".into()))?;
        let arr: [u8; 32] = bytes
            .try_into()
            .map_err(|_| CurveError::BadKey("does not decode to 32 bytes".into()))?;
        Ok(Key(arr))
    }

    /// The Z85 text of a public key (never call it on a secret for printing).
    pub fn to_z85(&self) -> String {
        zmq::z85_encode(&self.0).expect("32 bytes encode")
    }

    pub fn bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CurveError {
    #[error("{0}")]
    BadKey(String),
    #[error("this libzmq has no CURVE support: link a libzmq built with libsodium (Debian's libzmq3-dev), as ops/install-deps.sh installs")]
    Unsupported,
    #[error("cannot start the ZAP handler: {0}")]
    Zap(zmq::Error),
}

/// Whether the linked libzmq can do CURVE.
pub fn available() -> bool {
    zmq::has("curve") == Some(true)
}

/// Fails clearly when CURVE is asked for and the library cannot do it.
pub fn require() -> Result<(), CurveError> {
    if available() {
        Ok(())
    } else {
        Err(CurveError::Unsupported)
    }
}

/// A new keypair as Z85 text: (public, secret).
pub fn generate() -> Result<(String, String), CurveError> {
    require()?;
    let pair = zmq::CurveKeyPair::new().map_err(CurveError::Zap)?;
    let public = zmq::z85_encode(&pair.public_key).expect("32 bytes encode");
    let secret = zmq::z85_encode(&pair.secret_key).expect("32 bytes encode");
    Ok((public, secret))
}

/// What a connecting socket needs: the server's public key and its own keypair.
#[derive(Clone, Debug)]
pub struct ClientKeys {
    pub server_public: Key,
    pub public: Key,
    pub secret: Key,
}

impl ClientKeys {
    pub fn from_z85(server_public: &str, public: &str, secret: &str) -> Result<Self, CurveError> {
        Ok(ClientKeys {
            server_public: Key::from_z85(server_public)?,
            public: Key::from_z85(public)?,
            secret: Key::from_z85(secret)?,
        })
    }

    /// Makes `s` a CURVE client of the cluster's server key. Call before connect.
    pub fn apply(&self, s: &zmq::Socket) -> Result<(), zmq::Error> {
        s.set_curve_serverkey(&self.server_public.0)?;
        s.set_curve_publickey(&self.public.0)?;
        s.set_curve_secretkey(&self.secret.0)
    }
}

/// Applies `keys` to a connecting socket when the cluster uses CURVE.
pub fn client_socket(s: &zmq::Socket, keys: Option<&ClientKeys>) -> Result<(), zmq::Error> {
    match keys {
        Some(k) => k.apply(s),
        None => Ok(()),
    }
}

/// The client public keys one server admits; replaceable while it runs. A view
/// may add a second set (`with_extra`): the api's rpc socket admits the cluster's
/// clients and, beside them, the keys it issued to users.
#[derive(Clone, Debug)]
pub struct Admitted {
    keys: Arc<RwLock<HashSet<Key>>>,
    extra: Option<Arc<RwLock<HashSet<Key>>>>,
    /// False until a set made with `pending` is first filled (`replace`): a key it
    /// does not admit yet may be one it will, so the ZAP handler holds the
    /// handshake (see `zap_loop`) rather than refusing it, which libzmq never
    /// retries. Of a view, the extra set's.
    loaded: Arc<std::sync::atomic::AtomicBool>,
}

impl Default for Admitted {
    fn default() -> Admitted {
        Admitted::new([])
    }
}

/// What the ZAP handler answers a client key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Admit,
    Refuse,
    /// Not admitted yet, but the set that could admit it is not loaded yet.
    Wait,
}

impl Admitted {
    pub fn new(keys: impl IntoIterator<Item = Key>) -> Admitted {
        Admitted {
            keys: Arc::new(RwLock::new(keys.into_iter().collect())),
            extra: None,
            loaded: Arc::new(std::sync::atomic::AtomicBool::new(true)),
        }
    }

    /// An empty set that will be filled once its keys are read (the api's users,
    /// from its database, after its sockets are bound).
    pub fn pending() -> Admitted {
        let a = Admitted::new([]);
        a.loaded.store(false, std::sync::atomic::Ordering::SeqCst);
        a
    }

    /// Replaces this set's own keys (never the extra set's); the set is loaded.
    pub fn replace(&self, keys: impl IntoIterator<Item = Key>) {
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = keys.into_iter().collect();
        self.loaded.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// A view that admits this set's keys and `extra`'s; both stay replaceable.
    pub fn with_extra(&self, extra: &Admitted) -> Admitted {
        Admitted {
            keys: self.keys.clone(),
            extra: Some(extra.keys.clone()),
            loaded: extra.loaded.clone(),
        }
    }

    fn verdict(&self, k: &Key) -> Verdict {
        if self.admits(k) {
            Verdict::Admit
        } else if self.loaded.load(std::sync::atomic::Ordering::SeqCst) {
            Verdict::Refuse
        } else {
            Verdict::Wait
        }
    }

    pub fn admits(&self, k: &Key) -> bool {
        self.keys
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains(k)
            || self
                .extra
                .as_ref()
                .is_some_and(|x| x.read().unwrap_or_else(|e| e.into_inner()).contains(k))
    }

    /// The number of this set's own keys.
    pub fn len(&self) -> usize {
        self.keys.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What a binding socket needs: the cluster's server secret key and who to admit.
#[derive(Clone, Debug)]
pub struct ServerKeys {
    pub secret: Key,
    pub admitted: Admitted,
}

/// A daemon's CURVE keys: the server side for what it binds, the client side for
/// what it connects (its PUSH sockets to heartbeats and log sinks).
#[derive(Clone, Debug)]
pub struct NodeKeys {
    pub server: ServerKeys,
    pub client: ClientKeys,
}

/// Makes `s` a CURVE server that asks the ZAP handler about each client (under a
/// ZAP domain of its own). Call before bind.
pub fn server_socket(s: &zmq::Socket, keys: Option<&ServerKeys>) -> Result<(), CurveError> {
    let Some(keys) = keys else { return Ok(()) };
    require()?;
    let domain = zap().register(keys.admitted.clone())?;
    s.set_curve_server(true).map_err(CurveError::Zap)?;
    s.set_curve_secretkey(&keys.secret.0)
        .map_err(CurveError::Zap)?;
    s.set_zap_domain(&domain).map_err(CurveError::Zap)?;
    Ok(())
}

/// The process's ZAP handler: domain → admitted client keys.
struct Zap {
    domains: RwLock<HashMap<String, Admitted>>,
    started: Mutex<bool>,
    next: std::sync::atomic::AtomicU64,
}

fn zap() -> &'static Zap {
    static ZAP: OnceLock<Zap> = OnceLock::new();
    ZAP.get_or_init(|| Zap {
        domains: RwLock::new(HashMap::new()),
        started: Mutex::new(false),
        next: std::sync::atomic::AtomicU64::new(0),
    })
}

impl Zap {
    /// Registers `admitted` under a new domain, starting the handler thread first
    /// if it is not running yet (it must be bound before any CURVE server binds,
    /// or libzmq would let every client in).
    fn register(&self, admitted: Admitted) -> Result<String, CurveError> {
        {
            let mut started = self.started.lock().unwrap_or_else(|e| e.into_inner());
            if !*started {
                // ROUTER, not REP: a request it cannot decide yet is held while
                // the next ones are answered (libzmq's ZAP client is a REQ).
                let rep = zmq_context().socket(zmq::ROUTER).map_err(CurveError::Zap)?;
                rep.set_linger(0).map_err(CurveError::Zap)?;
                rep.bind("inproc://zeromq.zap.01")
                    .map_err(CurveError::Zap)?;
                std::thread::Builder::new()
                    .name("zap".into())
                    .spawn(move || zap_loop(rep))
                    .map_err(|_| CurveError::Zap(zmq::Error::EMFILE))?;
                *started = true;
            }
        }
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let domain = format!("paddock-{n}");
        self.domains
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(domain.clone(), admitted);
        Ok(domain)
    }

    #[cfg(test)]
    fn decide(&self, domain: &[u8], mechanism: &[u8], credentials: &[Vec<u8>]) -> bool {
        self.verdict(domain, mechanism, credentials) == Verdict::Admit
    }

    fn verdict(&self, domain: &[u8], mechanism: &[u8], credentials: &[Vec<u8>]) -> Verdict {
        if mechanism != b"CURVE" {
            return Verdict::Refuse;
        }
        let Some(key) = credentials
            .first()
            .and_then(|k| <[u8; 32]>::try_from(&k[..]).ok())
        else {
            return Verdict::Refuse;
        };
        let domain = String::from_utf8_lossy(domain);
        self.domains
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(domain.as_ref())
            .map_or(Verdict::Refuse, |a| a.verdict(&Key(key)))
    }
}

/// How long a handshake is held for a key set that is not loaded yet; then it
/// is refused.
const ZAP_HOLD: std::time::Duration = std::time::Duration::from_secs(5);

/// Answers ZAP requests forever: `[routing id][empty][version][request id]
/// [domain][address][identity][mechanism][credentials…]` → `[routing id][empty]
/// [version][request id][status code][status text][user id][metadata]`. A
/// request whose key set is not loaded yet (`Verdict::Wait`) is held, up to
/// `ZAP_HOLD`, and decided again as the set fills, while others are answered.
fn zap_loop(rep: zmq::Socket) {
    let mut denied_logged = 0u32;
    let mut window = std::time::Instant::now();
    let mut held: Vec<(Vec<Vec<u8>>, std::time::Instant)> = Vec::new();
    let mut answer = |frames: &[Vec<u8>], ok: bool| {
        let (code, text): (&[u8], &[u8]) = if ok {
            (b"200", b"OK")
        } else {
            (b"400", b"client key not admitted")
        };
        if !ok {
            if window.elapsed() > std::time::Duration::from_secs(10) {
                window = std::time::Instant::now();
                denied_logged = 0;
            }
            if denied_logged < 10 {
                denied_logged += 1;
                let key = frames
                    .get(8)
                    .and_then(|k| <[u8; 32]>::try_from(&k[..]).ok())
                    .map(|k| Key(k).to_z85())
                    .unwrap_or_else(|| "(none)".into());
                tracing::warn!(
                    peer = %String::from_utf8_lossy(&frames[5]).escape_debug(),
                    client_key = %key,
                    "refused a connection: its CURVE client key is not admitted"
                );
            }
        }
        let user: &[u8] = b"";
        let reply = [
            &frames[0][..],
            b"",
            b"1.0",
            &frames[3],
            code,
            text,
            user,
            b"",
        ];
        if let Err(e) = rep.send_multipart(reply, 0) {
            tracing::warn!("ZAP reply not sent: {e}");
        }
    };
    loop {
        // Held requests: decided again now (their set may have filled).
        let now = std::time::Instant::now();
        held.retain(
            |(frames, since)| match zap().verdict(&frames[4], &frames[7], &frames[8..]) {
                Verdict::Wait if now.duration_since(*since) < ZAP_HOLD => true,
                v => {
                    answer(frames, v == Verdict::Admit);
                    false
                }
            },
        );
        let timeout = if held.is_empty() { -1 } else { 20 };
        match rep.poll(zmq::POLLIN, timeout) {
            Ok(0) => continue,
            Ok(_) => {}
            Err(zmq::Error::EINTR) => continue,
            Err(e) => {
                tracing::debug!("ZAP handler stops: {e}");
                return;
            }
        }
        let frames = match rep.recv_multipart(zmq::DONTWAIT) {
            Ok(f) => f,
            Err(zmq::Error::EINTR | zmq::Error::EAGAIN) => continue,
            Err(e) => {
                // The context is gone (process exit): nothing is left to guard.
                tracing::debug!("ZAP handler stops: {e}");
                return;
            }
        };
        if frames.len() < 8 || !frames[1].is_empty() {
            // Not a ZAP request; answer its sender something all the same.
            if let Some(id) = frames.first() {
                let _ = rep.send_multipart(
                    [
                        &id[..],
                        b"",
                        b"1.0",
                        b"",
                        b"500",
                        b"bad ZAP request",
                        b"",
                        b"",
                    ],
                    0,
                );
            }
            continue;
        }
        match zap().verdict(&frames[4], &frames[7], &frames[8..]) {
            Verdict::Wait => held.push((frames, std::time::Instant::now())),
            v => answer(&frames, v == Verdict::Admit),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_bad_keys_are_refused() {
        let (public, secret) = generate().expect("curve");
        assert_eq!(public.len(), 40);
        let k = Key::from_z85(&public).unwrap();
        assert_eq!(k.to_z85(), public);
        assert!(format!("{:?}", Key::from_z85(&secret).unwrap()).contains("***"));
        assert!(Key::from_z85("short").is_err());
        assert!(Key::from_z85(&"~".repeat(40)).is_err());
    }

    /// A client that connects before its key is loaded (the api just restarted,
    /// its users not read yet) is held, then let in once the set is filled:
    /// libzmq would never retry a refused handshake.
    #[test]
    fn a_handshake_waits_for_a_pending_set_then_is_admitted() {
        let (spub, ssec) = generate().unwrap();
        let (cpub, csec) = generate().unwrap();
        let server_key = Key::from_z85(&ssec).unwrap();
        let client_key = Key::from_z85(&cpub).unwrap();
        let cluster = Admitted::new([]);
        let users = Admitted::pending();
        let view = cluster.with_extra(&users);
        let ctx = zmq_context();
        let server = ctx.socket(zmq::ROUTER).unwrap();
        server_socket(
            &server,
            Some(&ServerKeys {
                secret: server_key,
                admitted: view,
            }),
        )
        .unwrap();
        server.bind("tcp://127.0.0.1:*").unwrap();
        let ep = server.get_last_endpoint().unwrap().unwrap();
        let client = ctx.socket(zmq::DEALER).unwrap();
        ClientKeys::from_z85(&spub, &cpub, &csec)
            .unwrap()
            .apply(&client)
            .unwrap();
        client.connect(&ep).unwrap();
        client.send("hello", 0).unwrap();
        // Held: nothing arrives while the set is not loaded...
        assert_eq!(server.poll(zmq::POLLIN, 300).unwrap(), 0);
        // ...and once it is, with the key, the handshake completes.
        users.replace([client_key]);
        assert_eq!(server.poll(zmq::POLLIN, 3000).unwrap(), 1, "never admitted");
        let m = server.recv_multipart(0).unwrap();
        assert_eq!(m.last().unwrap(), b"hello");
    }

    #[test]
    fn zap_admits_only_registered_keys_of_its_domain() {
        let (a, _) = generate().unwrap();
        let (b, _) = generate().unwrap();
        let ka = Key::from_z85(&a).unwrap();
        let kb = Key::from_z85(&b).unwrap();
        let admitted = Admitted::new([ka]);
        let d = zap().register(admitted.clone()).unwrap();
        let z = zap();
        assert!(z.decide(d.as_bytes(), b"CURVE", &[ka.0.to_vec()]));
        assert!(!z.decide(d.as_bytes(), b"CURVE", &[kb.0.to_vec()]));
        assert!(!z.decide(d.as_bytes(), b"NULL", &[ka.0.to_vec()]));
        assert!(!z.decide(b"other", b"CURVE", &[ka.0.to_vec()]));
        assert!(!z.decide(d.as_bytes(), b"CURVE", &[]));
        admitted.replace([kb]);
        // A view with an extra set admits both; the base alone does not see it.
        let (kc, _) = generate().unwrap();
        let kc = Key::from_z85(&kc).unwrap();
        let users = Admitted::new([kc]);
        let both = admitted.with_extra(&users);
        assert!(both.admits(&kc) && both.admits(&kb) && !admitted.admits(&kc));
        users.replace([]);
        assert!(!both.admits(&kc));
        assert!(z.decide(d.as_bytes(), b"CURVE", &[kb.0.to_vec()]));
        assert!(!z.decide(d.as_bytes(), b"CURVE", &[ka.0.to_vec()]));
    }
}
