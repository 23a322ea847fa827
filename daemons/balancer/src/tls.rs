//! HTTPS: TLS 1.2 and 1.3 by rustls (ring), the certificate chosen by SNI among
//! those set with `cert.set`. A name with no certificate (or no SNI at all) gets
//! a handshake failure, never another name's certificate.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::model::CertSpec;

#[derive(Default)]
struct Certs {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// `*.example.com` kept as `example.com`.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
}

/// The SNI resolver; its certificates are swapped whole when they change.
#[derive(Default)]
pub struct Resolver(ArcSwap<Certs>);

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let c = self.0.load();
        f.debug_struct("Resolver")
            .field("names", &(c.exact.len() + c.wildcard.len()))
            .finish()
    }
}

impl Resolver {
    /// Replaces the certificates with `certs` (already checked by `certified_key`;
    /// one that fails now is skipped and logged).
    pub fn set(&self, certs: &[CertSpec]) {
        let mut next = Certs::default();
        for c in certs {
            let key = match certified_key(&c.cert_pem, &c.key_pem) {
                Ok(k) => Arc::new(k),
                Err(e) => {
                    tracing::warn!(domains = ?c.domains, "a stored certificate is unusable: {e}");
                    continue;
                }
            };
            for d in &c.domains {
                match d.strip_prefix("*.") {
                    Some(s) => next.wildcard.insert(s.to_string(), key.clone()),
                    None => next.exact.insert(d.clone(), key.clone()),
                };
            }
        }
        self.0.store(Arc::new(next));
    }

    pub fn lookup(&self, name: &str) -> Option<Arc<CertifiedKey>> {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        let c = self.0.load();
        if let Some(k) = c.exact.get(&name) {
            return Some(k.clone());
        }
        // A wildcard covers exactly one label, as in certificates.
        let (_, parent) = name.split_once('.')?;
        c.wildcard.get(parent).cloned()
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.lookup(hello.server_name()?)
    }
}

/// A certificate chain and its private key from PEM, checked to belong together.
pub fn certified_key(cert_pem: &str, key_pem: &str) -> Result<CertifiedKey, String> {
    let certs: Vec<_> = rustls_pemfile::certs(&mut cert_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("cert_pem is not PEM: {e}"))?;
    if certs.is_empty() {
        return Err("cert_pem holds no CERTIFICATE block".into());
    }
    let key = rustls_pemfile::private_key(&mut key_pem.as_bytes())
        .map_err(|e| format!("key_pem is not PEM: {e}"))?
        .ok_or("key_pem holds no private key block")?;
    let provider = rustls::crypto::ring::default_provider();
    let signer = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| format!("key_pem: unsupported private key: {e}"))?;
    let ck = CertifiedKey::new(certs, signer);
    ck.keys_match()
        .map_err(|e| format!("the key does not belong to the certificate: {e}"))?;
    Ok(ck)
}

/// Checks that the leaf certificate of `cert_pem` is valid for every domain in
/// `domains` (a wildcard domain `*.a.example.com` needs a wildcard certificate
/// for it), so a certificate can never be set for a name it does not cover.
pub fn covers(cert_pem: &str, domains: &[String]) -> Result<(), String> {
    let leaf = rustls_pemfile::certs(&mut cert_pem.as_bytes())
        .next()
        .ok_or("cert_pem holds no CERTIFICATE block")?
        .map_err(|e| format!("cert_pem is not PEM: {e}"))?;
    let cert = webpki::EndEntityCert::try_from(&leaf)
        .map_err(|e| format!("cert_pem's first certificate cannot be read: {e:?}"))?;
    for d in domains {
        // A name only a wildcard certificate for `d` covers.
        let name = match d.strip_prefix("*.") {
            Some(parent) => format!("paddock-check-0.{parent}"),
            None => d.clone(),
        };
        let server_name = rustls::pki_types::ServerName::try_from(name.as_str())
            .map_err(|_| format!("{d:?} is not a DNS name"))?;
        cert.verify_is_valid_for_subject_name(&server_name)
            .map_err(|_| format!("the certificate does not cover {d:?} (its subject alternative names do not name it)"))?;
    }
    Ok(())
}

/// The server side of TLS: 1.2 and 1.3 only, HTTP/1.1 by ALPN.
pub fn server_config(resolver: Arc<Resolver>) -> anyhow::Result<rustls::ServerConfig> {
    let mut c = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
    .with_no_client_auth()
    .with_cert_resolver(resolver);
    c.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(c)
}
