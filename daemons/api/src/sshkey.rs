//! Users' SSH public keys (for `git push`): parsed with the `ssh-key` crate,
//! checked (ed25519, ecdsa, rsa of 2048-16384 bits) and fingerprinted.

use paddock_wire::WireError;
use ssh_key::public::KeyData;
use ssh_key::{HashAlg, PublicKey};

/// A checked key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshKey {
    /// `SHA256:<base64>`, as `ssh-keygen -l` prints it.
    pub fingerprint: String,
    /// The algorithm's name, e.g. `ssh-ed25519`.
    pub algorithm: String,
    /// `<algorithm> <base64>` with no comment: what sshd is given.
    pub public_key: String,
    /// The comment, printable ASCII only, at most 100 characters.
    pub comment: String,
}

pub const MIN_RSA_BITS: usize = 2048;
/// OpenSSH's limit (`SSH_RSA_MAXIMUM_MODULUS_SIZE`): sshd refuses larger keys.
pub const MAX_RSA_BITS: usize = 16384;

/// Parses one OpenSSH public key line (`ssh-ed25519 AAAA… comment`).
pub fn parse(line: &str) -> Result<SshKey, WireError> {
    let line = line.trim();
    if line.is_empty() {
        return Err(WireError::invalid(
            "public_key is empty: pass the contents of a .pub file, like ~/.ssh/id_ed25519.pub",
        ));
    }
    if line.len() > 16 * 1024 {
        return Err(WireError::invalid(
            "public_key is longer than 16 KiB; that is not an SSH public key",
        ));
    }
    if line.contains("PRIVATE KEY") {
        return Err(WireError::invalid(
            "that is a private key: add the .pub file instead, and keep the private key to yourself",
        ));
    }
    if line.lines().count() > 1 {
        return Err(WireError::invalid(
            "public_key must be one line: add one key at a time",
        ));
    }
    let key = PublicKey::from_openssh(line).map_err(|e| {
        WireError::invalid(format!(
            "public_key is not an OpenSSH public key ({e}); pass a line like `ssh-ed25519 AAAA… you@host`"
        ))
    })?;
    match key.key_data() {
        KeyData::Ed25519(_) | KeyData::Ecdsa(_) => {}
        KeyData::Rsa(rsa) => {
            let bits = mpint_bits(rsa.n.as_bytes());
            if bits < MIN_RSA_BITS {
                return Err(WireError::invalid(format!(
                    "this RSA key has {bits} bits; at least {MIN_RSA_BITS} are required (or use `ssh-keygen -t ed25519`)"
                )));
            }
            if bits > MAX_RSA_BITS {
                return Err(WireError::invalid(format!(
                    "this RSA key has {bits} bits; at most {MAX_RSA_BITS} are accepted, as by OpenSSH (or use `ssh-keygen -t ed25519`)"
                )));
            }
        }
        other => {
            return Err(WireError::invalid(format!(
                "{} keys are not accepted; use ed25519, ecdsa or rsa (2048 bits or more)",
                other.algorithm()
            )))
        }
    }
    let algorithm = key.algorithm().as_str().to_string();
    let mut bare = key.clone();
    bare.set_comment("");
    let public_key = bare
        .to_openssh()
        .map_err(|e| WireError::internal(format!("cannot re-encode the key: {e}")))?
        .trim()
        .to_string();
    let comment: String = key
        .comment()
        .chars()
        .filter(|c| c.is_ascii_graphic() || *c == ' ')
        .take(100)
        .collect();
    Ok(SshKey {
        fingerprint: key.fingerprint(HashAlg::Sha256).to_string(),
        algorithm,
        public_key,
        comment,
    })
}

/// Bits of a big-endian unsigned integer (an mpint may have a leading zero byte).
fn mpint_bits(b: &[u8]) -> usize {
    let b = match b.iter().position(|x| *x != 0) {
        Some(i) => &b[i..],
        None => return 0,
    };
    b.len() * 8 - b[0].leading_zeros() as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    // Made with ssh-keygen for these tests; public keys only.
    const ED25519: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGSG+6itfRJG4qfl0JuqffEL/sitiBoh7NoFclw+aDHB alice@laptop";
    const RSA1024: &str = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAAAgQCy/BkZch9tDd0oCkp9B1Gw3Z+i6PT0F4zByjLlCzUiWXHWZMblVaC7nOlfiYZhjV+Oa60geczikE48Mh031kW7bYRMj6slsn05uITb2zxEOeP7Tzp1BglHgS3fgv0ylI5dDbwtIww6hlGdGge4Vg0Ik6IIgw5/+Q8r6vBFUcvaGQ==";
    const RSA2048: &str = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQCj0i4lP3xWS0fYj0c7NC0UTk9ioJNAJrhGnshPaqJtwb60hNmdfsDznlQIif712PureWE4IL1H5Fpk47ZmCLW0Y5Abqx4NbQ2YoTwZ2k0IYG8KJ43lkB5jylpQHNeV0FEVS0ha60JhkvZ8jG/i5w+Kdo728jYq/dIlYpLAhh2eX1lSGXOjTQGLqa4Da8UCuAIVRa/1zRdumCxi9L7nrrXNVzdEcjOlFDeyA65uYBixriYzULAmDA4gVT4wmmVMU6C2peBKe9/Wm8Kz+UKdZnbwiNsmlSEwBEKAfwoxVIgzp0HVCAM2VGLIGVWYbnddx13Gr+Jv35e0DdMgPZvUcxfd";
    const ECDSA: &str = "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBHD4khTmWqfSwA60Xs8/1+O+wPm2nPJDDSd2HJI5MDPqpFDYubzuf6uAvqZCGPuXBZfYDShoZOFegU8MXUnIbv8=";
    const DSA: &str = "ssh-dss AAAAB3NzaC1kc3MAAACBAMa7KaIVVdIsNUTNaco3aUxE3pk/36Qf2WB/vDc7cUHIC3AjT/I+kUlpeswispangLWEdUAQHe+q6CPiL+CZLgc8f9NP7jUWYAnsrQE+p0kpVEequofoD19WaFun6XawbEuk9G4/5qnH63EjOHHNGMToUMQdpJBgEZC6dSm4ecp1AAAAFQDPV65xRzSEDdpca2Kek4arBeYlZQAAAIAN6HKnWF54vgjh7nNj6S+1VV+pugpZMsAlb7i735ZmgwLQCf7/iQThEBrE12Ua3QeVMuHvwAqNxg/9KiPXybNiH/nh+kyk4Vzvu2VW/HCNSD/At2m05gfwRU2cn4YUCzyn6htBNRb2uIL3DamHxpbnuhOxD7r1vBQNLvHY2MWeAwAAAIBinX2VkJIgsTc8dNki9p4PS2sv8fiN/sLKeXyVoeALVKgibe61iLxVNF1z1lHepFjNMD1WvX0c9C9DLcO6yEMG40B3X6JWI+sJwMOp1FFvDhXC73gDRs3N85erzCofSkA3OYBWUqZiqoz6iv6vxVWMsRHKB11PxDGv6F0uHcNneg==";

    #[test]
    fn parses_and_fingerprints_ed25519() {
        let k = parse(ED25519).unwrap();
        assert_eq!(k.algorithm, "ssh-ed25519");
        assert!(k.fingerprint.starts_with("SHA256:"), "{}", k.fingerprint);
        assert_eq!(k.comment, "alice@laptop");
        assert!(!k.public_key.contains("alice"));
        // The same key with another comment has the same fingerprint.
        let again = parse(&ED25519.replace("alice@laptop", "other")).unwrap();
        assert_eq!(again.fingerprint, k.fingerprint);
        // What `ssh-keygen -lf` printed for this key.
        assert_eq!(
            k.fingerprint,
            "SHA256:sfmNJh56gp1+9cxRz8nFYHxmTs75xhgN7ielaptkmMQ"
        );
    }

    #[test]
    fn rsa_needs_2048_bits_and_dsa_is_refused() {
        let e = parse(RSA1024).unwrap_err();
        assert!(e.message.contains("1024 bits"), "{}", e.message);
        assert_eq!(parse(RSA2048).unwrap().algorithm, "ssh-rsa");
        assert!(parse(ECDSA)
            .unwrap()
            .algorithm
            .starts_with("ecdsa-sha2-nistp256"));
        assert!(parse(DSA).unwrap_err().message.contains("not accepted"));
    }

    #[test]
    fn refuses_junk_and_private_keys() {
        for bad in [
            "",
            "ssh-ed25519",
            "ssh-ed25519 AAAA",
            "hello world",
            "-----BEGIN OPENSSH PRIVATE KEY-----",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        let two = format!("{ED25519}\n{ED25519}");
        assert!(parse(&two).is_err());
    }

    #[test]
    fn mpint_bit_counts() {
        assert_eq!(mpint_bits(&[0x00, 0x80, 0x00]), 16);
        assert_eq!(mpint_bits(&[0x01]), 1);
        assert_eq!(mpint_bits(&[0; 3]), 0);
    }
}
