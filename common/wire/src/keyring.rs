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

/// Every key a process accepts, and the one it signs with.
#[derive(Clone)]
pub struct Keyring {
    keys: BTreeMap<String, hmac::Key>,
    signing: String,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print secrets.
        f.debug_struct("Keyring")
            .field("ids", &self.keys.keys().collect::<Vec<_>>())
            .field("signing", &self.signing)
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
        })
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
        let key = self.keys.get(id).ok_or(Code::UnknownKey)?;
        let tag = hex::decode(hex_tag).map_err(|_| Code::BadSignature)?;
        hmac::verify(key, payload, &tag).map_err(|_| Code::BadSignature)?;
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
