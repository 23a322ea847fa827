//! Keys and HMAC-SHA256 signatures (`sig` = `<key-id>:<hex>`).

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use ring::hmac;

use crate::error::Code;

/// Minimum secret length the protocol allows.
pub const MIN_KEY_BYTES: usize = 32;

/// The `sig` frame of a message that could not be authenticated.
pub const UNSIGNED: &str = "none";

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum KeyError {
    #[error("key `{0}` is not hex")]
    NotHex(String),
    #[error("key `{id}` has {len} bytes; at least {MIN_KEY_BYTES} are required")]
    TooShort { id: String, len: usize },
    #[error("key id `{0}` must be 1-64 characters of [A-Za-z0-9_.-]")]
    BadId(String),
    #[error("signing_key `{0}` is not in the keyring")]
    NoSigningKey(String),
}

/// Key ids of user keys start with this; the api derives their secrets.
pub const USER_KEY_PREFIX: &str = "user.";

/// HKDF's salt for user keys: fixed, so every api derives the same secret from the
/// same cluster-held secret and key id.
const USER_KEY_SALT: &[u8] = b"paddock user key v1";

/// The api's user keys: each key's secret is HKDF-SHA256(api secret, key id), so
/// the database never holds a secret that verifies a user's request (it keeps only
/// which key ids exist and are not revoked). docs/PROTOCOL.md, "User keys".
#[derive(Clone)]
pub struct UserKeys {
    prk: ring::hkdf::Prk,
}

impl std::fmt::Debug for UserKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UserKeys(***)")
    }
}

struct Len32;

impl ring::hkdf::KeyType for Len32 {
    fn len(&self) -> usize {
        32
    }
}

impl UserKeys {
    /// From the api's secret (hex, at least 32 bytes).
    pub fn from_hex(secret_hex: &str) -> Result<UserKeys, KeyError> {
        let secret = hex::decode(secret_hex.trim())
            .map_err(|_| KeyError::NotHex("user_key_secret".into()))?;
        if secret.len() < MIN_KEY_BYTES {
            return Err(KeyError::TooShort {
                id: "user_key_secret".into(),
                len: secret.len(),
            });
        }
        let salt = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, USER_KEY_SALT);
        Ok(UserKeys {
            prk: salt.extract(&secret),
        })
    }

    /// Whether `id` has the form of a user key id (`user.` + 1-59 id characters).
    pub fn is_user_key_id(id: &str) -> bool {
        id.len() > USER_KEY_PREFIX.len() && id.starts_with(USER_KEY_PREFIX) && valid_key_id(id)
    }

    /// The secret of user key `id`; `None` for an id that is not a user key id.
    pub fn secret(&self, id: &str) -> Option<[u8; 32]> {
        if !Self::is_user_key_id(id) {
            return None;
        }
        let info = [id.as_bytes()];
        let okm = self.prk.expand(&info, Len32).ok()?;
        let mut out = [0u8; 32];
        okm.fill(&mut out).ok()?;
        Some(out)
    }

    fn hmac_key(&self, id: &str) -> Option<hmac::Key> {
        self.secret(id)
            .map(|s| hmac::Key::new(hmac::HMAC_SHA256, &s))
    }
}

/// Every key a process accepts, and the one it signs with.
#[derive(Clone)]
pub struct Keyring {
    keys: BTreeMap<String, hmac::Key>,
    signing: String,
    /// The api's derived user keys (only the api has them).
    users: Option<UserKeys>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print secrets.
        f.debug_struct("Keyring")
            .field("ids", &self.keys.keys().collect::<Vec<_>>())
            .field("signing", &self.signing)
            .field("user_keys", &self.users.is_some())
            .finish()
    }
}

fn valid_key_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
}

impl Keyring {
    /// Builds a keyring from `key id -> hex secret` pairs.
    pub fn from_hex<'a>(
        keys: impl IntoIterator<Item = (&'a str, &'a str)>,
        signing: &str,
    ) -> Result<Keyring, KeyError> {
        let mut map = BTreeMap::new();
        for (id, secret_hex) in keys {
            if !valid_key_id(id) {
                return Err(KeyError::BadId(id.to_string()));
            }
            let secret = hex::decode(secret_hex.trim()).map_err(|_| KeyError::NotHex(id.into()))?;
            if secret.len() < MIN_KEY_BYTES {
                return Err(KeyError::TooShort {
                    id: id.to_string(),
                    len: secret.len(),
                });
            }
            map.insert(id.to_string(), hmac::Key::new(hmac::HMAC_SHA256, &secret));
        }
        if !map.contains_key(signing) {
            return Err(KeyError::NoSigningKey(signing.to_string()));
        }
        Ok(Keyring {
            keys: map,
            signing: signing.to_string(),
            users: None,
        })
    }

    /// Also accepts every user key `users` derives (the api). A cluster key id
    /// that looks like a user key id would be ambiguous, so it is refused.
    pub fn with_user_keys(mut self, users: UserKeys) -> Result<Keyring, KeyError> {
        if let Some(id) = self.keys.keys().find(|id| UserKeys::is_user_key_id(id)) {
            return Err(KeyError::BadId(format!(
                "{id}` starts with `{USER_KEY_PREFIX}`, which names user keys; rename it"
            )));
        }
        self.users = Some(users);
        Ok(self)
    }

    /// Whether `id` is a user key this keyring derives (not a cluster key).
    pub fn is_user_key(&self, id: &str) -> bool {
        self.users.is_some() && !self.keys.contains_key(id) && UserKeys::is_user_key_id(id)
    }

    /// Signs a reply to a request verified under `key_id`: a user key's reply is
    /// signed with that user's key (the only key the user has), any other with the
    /// signing key.
    pub fn sign_reply(&self, key_id: &str, payload: &[u8]) -> String {
        match self.users.as_ref().filter(|_| self.is_user_key(key_id)) {
            Some(u) => match u.hmac_key(key_id) {
                Some(key) => {
                    let tag = hmac::sign(&key, payload);
                    format!("{key_id}:{}", hex::encode(tag.as_ref()))
                }
                None => self.sign(payload),
            },
            None => self.sign(payload),
        }
    }

    pub fn signing_key_id(&self) -> &str {
        &self.signing
    }

    pub fn key_ids(&self) -> impl Iterator<Item = &str> {
        self.keys.keys().map(|k| k.as_str())
    }

    /// Signs `payload` with the signing key: `<key-id>:<hex>`.
    pub fn sign(&self, payload: &[u8]) -> String {
        let key = &self.keys[&self.signing];
        let tag = hmac::sign(key, payload);
        let mut out = String::with_capacity(self.signing.len() + 1 + 64);
        out.push_str(&self.signing);
        out.push(':');
        out.push_str(&hex::encode(tag.as_ref()));
        out
    }

    /// Verifies `sig` over the exact `payload` bytes, in constant time. Returns the key id.
    pub fn verify<'s>(&self, payload: &[u8], sig: &'s [u8]) -> Result<&'s str, Code> {
        let sig = std::str::from_utf8(sig).map_err(|_| Code::Malformed)?;
        let (id, hex_tag) = sig.split_once(':').ok_or(Code::Malformed)?;
        let tag = hex::decode(hex_tag).map_err(|_| Code::BadSignature)?;
        match self.keys.get(id) {
            Some(key) => hmac::verify(key, payload, &tag).map_err(|_| Code::BadSignature)?,
            None => {
                let key = self
                    .users
                    .as_ref()
                    .and_then(|u| u.hmac_key(id))
                    .ok_or(Code::UnknownKey)?;
                hmac::verify(&key, payload, &tag).map_err(|_| Code::BadSignature)?
            }
        }
        Ok(id)
    }
}

/// A keyring that SIGHUP can replace while sockets keep running.
#[derive(Clone, Debug)]
pub struct SharedKeyring(Arc<RwLock<Arc<Keyring>>>);

impl SharedKeyring {
    pub fn new(k: Keyring) -> Self {
        SharedKeyring(Arc::new(RwLock::new(Arc::new(k))))
    }

    pub fn get(&self) -> Arc<Keyring> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn replace(&self, k: Keyring) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(k);
    }
}

/// A fresh random secret of `MIN_KEY_BYTES` bytes, hex encoded.
pub fn generate_secret_hex() -> String {
    use rand::RngCore;
    let mut b = [0u8; MIN_KEY_BYTES];
    rand::rngs::OsRng.fill_bytes(&mut b);
    hex::encode(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    const VECTOR_SECRET: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
    const VECTOR_PAYLOAD: &str = r#"{"v":1,"id":"01JCT6S3W4F8D9X2QZ7N5K0BVA","ts":1763900000123,"from":"user:alice","kind":"ping","body":{}}"#;
    const VECTOR_HMAC: &str = "8e209e3f8aa64dee41d26af14f51d11ce19a7f67cc9d82ed74073ce7e5a864b2";

    #[test]
    fn protocol_test_vector() {
        let k = Keyring::from_hex([("k1", VECTOR_SECRET)], "k1").unwrap();
        let sig = k.sign(VECTOR_PAYLOAD.as_bytes());
        assert_eq!(sig, format!("k1:{VECTOR_HMAC}"));
        assert_eq!(
            k.verify(VECTOR_PAYLOAD.as_bytes(), sig.as_bytes()),
            Ok("k1")
        );
    }

    #[test]
    fn verify_rejects_tampering_unknown_keys_and_junk() {
        let k = Keyring::from_hex([("k1", VECTOR_SECRET)], "k1").unwrap();
        let sig = k.sign(b"hello");
        assert_eq!(k.verify(b"hellp", sig.as_bytes()), Err(Code::BadSignature));
        let other = sig.replacen("k1:", "k2:", 1);
        assert_eq!(k.verify(b"hello", other.as_bytes()), Err(Code::UnknownKey));
        assert_eq!(k.verify(b"hello", b"nocolon"), Err(Code::Malformed));
        assert_eq!(k.verify(b"hello", b"k1:zz"), Err(Code::BadSignature));
        assert_eq!(k.verify(b"hello", &[0xff, 0xfe]), Err(Code::Malformed));
    }

    #[test]
    fn rotation_accepts_every_key_and_signs_with_one() {
        let old = generate_secret_hex();
        let new = generate_secret_hex();
        let before = Keyring::from_hex([("old", old.as_str())], "old").unwrap();
        let during =
            Keyring::from_hex([("old", old.as_str()), ("new", new.as_str())], "new").unwrap();
        let sig_old = before.sign(b"x");
        let sig_new = during.sign(b"x");
        assert!(sig_new.starts_with("new:"));
        assert_eq!(during.verify(b"x", sig_old.as_bytes()), Ok("old"));
        assert_eq!(
            before.verify(b"x", sig_new.as_bytes()),
            Err(Code::UnknownKey)
        );
    }

    #[test]
    fn user_keys_are_derived_and_replies_signed_with_them() {
        let users = UserKeys::from_hex(VECTOR_SECRET).unwrap();
        let api = Keyring::from_hex([("cluster", VECTOR_SECRET)], "cluster")
            .unwrap()
            .with_user_keys(users.clone())
            .unwrap();
        let id = "user.01JCT6S3W4F8D9X2QZ7N5K0BVA";
        let secret = hex::encode(users.secret(id).unwrap());
        // The same secret every time, and another for another id.
        assert_eq!(secret, hex::encode(users.secret(id).unwrap()));
        assert_ne!(secret, hex::encode(users.secret("user.other").unwrap()));
        assert_ne!(secret, VECTOR_SECRET);
        // The user's own keyring, as the CLI builds it from the credentials.
        let user = Keyring::from_hex([(id, secret.as_str())], id).unwrap();
        let sig = user.sign(b"hello");
        assert_eq!(api.verify(b"hello", sig.as_bytes()), Ok(id));
        assert!(api.is_user_key(id));
        assert!(!api.is_user_key("cluster"));
        // A reply to the user is signed with the user's key, so the user can check it.
        let reply = api.sign_reply(id, b"answer");
        assert_eq!(user.verify(b"answer", reply.as_bytes()), Ok(id));
        assert!(api.sign_reply("cluster", b"x").starts_with("cluster:"));
        // A forged secret does not verify; ids that are not user ids are unknown.
        let forged = Keyring::from_hex([(id, VECTOR_SECRET)], id).unwrap();
        assert_eq!(
            api.verify(b"hello", forged.sign(b"hello").as_bytes()),
            Err(Code::BadSignature)
        );
        let stranger = Keyring::from_hex([("other", VECTOR_SECRET)], "other").unwrap();
        assert_eq!(
            api.verify(b"x", stranger.sign(b"x").as_bytes()),
            Err(Code::UnknownKey)
        );
        // A keyring without user keys (every daemon but the api) knows none of them.
        let locker = Keyring::from_hex([("cluster", VECTOR_SECRET)], "cluster").unwrap();
        assert_eq!(
            locker.verify(b"hello", sig.as_bytes()),
            Err(Code::UnknownKey)
        );
        assert!(!locker.is_user_key(id));
        // A cluster key id that looks like a user key id is refused.
        assert!(Keyring::from_hex([("user.x", VECTOR_SECRET)], "user.x")
            .unwrap()
            .with_user_keys(users)
            .is_err());
        assert!(UserKeys::from_hex("00ff").is_err());
    }

    #[test]
    fn short_or_bad_keys_are_refused() {
        assert!(matches!(
            Keyring::from_hex([("k", "00ff")], "k"),
            Err(KeyError::TooShort { len: 2, .. })
        ));
        assert!(matches!(
            Keyring::from_hex([("k", "xyz")], "k"),
            Err(KeyError::NotHex(_))
        ));
        assert!(matches!(
            Keyring::from_hex([("k", VECTOR_SECRET)], "j"),
            Err(KeyError::NoSigningKey(_))
        ));
        assert!(matches!(
            Keyring::from_hex([("bad id", VECTOR_SECRET)], "bad id"),
            Err(KeyError::BadId(_))
        ));
    }
}
