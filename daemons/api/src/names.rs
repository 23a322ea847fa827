//! What a name may be: users, apps, config vars, domains, process types. Pure
//! rules; each error says what was wrong and what would be accepted.

use std::collections::BTreeMap;

use paddock_wire::WireError;
use rand::Rng;

/// Words an app may not be called: they name the platform's own hosts and paths.
pub const RESERVED_APPS: &[&str] = &[
    "api",
    "www",
    "git",
    "admin",
    "paddock",
    "root",
    "system",
    "app",
    "apps",
    "status",
    "help",
    "new",
    "default",
    "localhost",
];

/// Heroku's limits: one value at most 32 KiB, an app's names and values 64 KiB.
pub const MAX_VALUE_BYTES: usize = 32 * 1024;
pub const MAX_CONFIG_BYTES: usize = 64 * 1024;

/// `[a-z][a-z0-9-]{0,27}`, not ending in `-`, not reserved. 28 characters, so the
/// runner's `pdk-<app>` user fits Linux's 32.
pub fn app(name: &str) -> Result<(), WireError> {
    let b = name.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 28
        && b[0].is_ascii_lowercase()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && !name.ends_with('-');
    if !ok {
        return Err(WireError::invalid(format!(
            "app name {name:?} is not valid: use 1-28 characters of a-z, 0-9 and '-', starting with a letter and not ending with '-'"
        )));
    }
    if RESERVED_APPS.contains(&name) {
        return Err(WireError::invalid(format!(
            "app name {name:?} is reserved; choose another"
        )));
    }
    Ok(())
}

/// `[a-z][a-z0-9_-]{0,31}`.
pub fn user(name: &str) -> Result<(), WireError> {
    let b = name.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 32
        && b[0].is_ascii_lowercase()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-' || *c == b'_');
    if ok {
        Ok(())
    } else {
        Err(WireError::invalid(format!(
            "user name {name:?} is not valid: use 1-32 characters of a-z, 0-9, '-' and '_', starting with a letter"
        )))
    }
}

/// `^[A-Za-z_][A-Za-z0-9_]*$`, at most 256 bytes; `PORT` and `PADDOCK_*` are the
/// platform's.
pub fn config_name(name: &str) -> Result<(), WireError> {
    let b = name.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 256
        && (b[0].is_ascii_alphabetic() || b[0] == b'_')
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'_');
    if !ok {
        return Err(WireError::invalid(format!(
            "config var name {:?} is not valid: use letters, digits and '_', not starting with a digit",
            truncate(name, 64)
        )));
    }
    if name == "PORT" || name.starts_with("PADDOCK_") {
        return Err(WireError::invalid(format!(
            "config var {name} is set by the platform (PORT and PADDOCK_* are reserved)"
        )));
    }
    Ok(())
}

/// Checks one value and the whole config after a change.
pub fn config_sizes(config: &BTreeMap<String, String>) -> Result<(), WireError> {
    for (k, v) in config {
        if v.len() > MAX_VALUE_BYTES {
            return Err(WireError::invalid(format!(
                "config var {k} is {} bytes; a value may be at most {MAX_VALUE_BYTES} bytes (32 KiB)",
                v.len()
            )));
        }
        if v.contains('\0') {
            return Err(WireError::invalid(format!(
                "config var {k} contains a NUL byte, which no environment can hold"
            )));
        }
    }
    let total: usize = config.iter().map(|(k, v)| k.len() + v.len()).sum();
    if total > MAX_CONFIG_BYTES {
        return Err(WireError::invalid(format!(
            "the app's config would be {total} bytes; names and values may be at most {MAX_CONFIG_BYTES} bytes (64 KiB) together"
        )));
    }
    Ok(())
}

/// A process type from a Procfile: `[a-z0-9][a-z0-9_-]{0,29}`.
pub fn process_type(t: &str) -> Result<(), WireError> {
    let b = t.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 30
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-' || *c == b'_');
    if ok {
        Ok(())
    } else {
        Err(WireError::invalid(format!(
            "process type {:?} is not valid: use 1-30 characters of a-z, 0-9, '-' and '_'",
            truncate(t, 64)
        )))
    }
}

/// A buildpack's name: `[a-z0-9-]{1,40}`.
pub fn buildpack(name: &str) -> Result<(), WireError> {
    let ok = (1..=40).contains(&name.len())
        && name
            .bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-');
    if ok {
        Ok(())
    } else {
        Err(WireError::invalid(format!(
            "buildpack name {:?} is not valid: use 1-40 characters of a-z, 0-9 and '-'",
            truncate(name, 64)
        )))
    }
}

/// A blob's name as the blobstore has it (its sha256: 64 lowercase hex digits),
/// given bare or as `sha256:<hex>`; the bare name.
pub fn blob_sha256<'a>(field: &str, id: &'a str) -> Result<&'a str, WireError> {
    let hex = id.strip_prefix("sha256:").unwrap_or(id);
    if hex.len() == 64 && hex.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')) {
        Ok(hex)
    } else {
        Err(WireError::invalid(format!(
            "`{field}` must be a blob's sha256: 64 lowercase hex digits (or sha256:<hex>), not {:?}",
            truncate(id, 80)
        )))
    }
}

/// A lowercase host name (RFC 1123 labels), at most 253 characters. A wildcard
/// `*.rest` is allowed only when `wildcard` (admins).
pub fn domain(d: &str, wildcard: bool) -> Result<(), WireError> {
    let bad = |why: &str| {
        Err(WireError::invalid(format!(
            "domain {:?} is not valid: {why}",
            truncate(d, 64)
        )))
    };
    if d.is_empty() || d.len() > 253 {
        return bad("a host name has 1-253 characters");
    }
    let rest = match d.strip_prefix("*.") {
        Some(r) if wildcard => r,
        Some(_) => {
            return Err(WireError::new(
                paddock_wire::Code::Forbidden,
                format!("only an admin may add the wildcard domain {d}"),
            ))
        }
        None => d,
    };
    let labels: Vec<&str> = rest.split('.').collect();
    if labels.len() < 2 {
        return bad("it needs at least two labels, like example.com");
    }
    // No top-level domain is all digits: `10.0.0.1` is an IP address, not a name.
    if labels
        .last()
        .is_some_and(|l| !l.is_empty() && l.bytes().all(|c| c.is_ascii_digit()))
    {
        return bad("its last label is all digits (an IP address is not a domain)");
    }
    for l in labels {
        let b = l.as_bytes();
        if b.is_empty() || b.len() > 63 {
            return bad("each label has 1-63 characters");
        }
        if !b
            .iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        {
            return bad("use lowercase letters, digits, '-' and dots");
        }
        if l.starts_with('-') || l.ends_with('-') {
            return bad("a label may not start or end with '-'");
        }
    }
    Ok(())
}

/// A domain as users type it, made canonical: lowercase, no trailing dot.
pub fn canonical_domain(d: &str) -> String {
    d.trim().trim_end_matches('.').to_ascii_lowercase()
}

const ADJECTIVES: &[&str] = &[
    "autumn",
    "billowing",
    "bold",
    "brave",
    "calm",
    "cool",
    "crimson",
    "damp",
    "dawn",
    "desert",
    "divine",
    "dry",
    "empty",
    "falling",
    "floral",
    "fragrant",
    "frosty",
    "gentle",
    "golden",
    "green",
    "hidden",
    "holy",
    "icy",
    "lively",
    "long",
    "misty",
    "morning",
    "muddy",
    "nameless",
    "noble",
    "old",
    "patient",
    "polished",
    "proud",
    "quiet",
    "rapid",
    "red",
    "restless",
    "rough",
    "shiny",
    "shy",
    "silent",
    "small",
    "snowy",
    "solitary",
    "sparkling",
    "spring",
    "still",
    "summer",
    "sweet",
    "throbbing",
    "tiny",
    "twilight",
    "wandering",
    "weathered",
    "white",
    "wild",
    "winter",
    "wispy",
    "withered",
    "young",
];

const NOUNS: &[&str] = &[
    "bird",
    "breeze",
    "brook",
    "bush",
    "butterfly",
    "cherry",
    "cloud",
    "darkness",
    "dawn",
    "dew",
    "dream",
    "dust",
    "feather",
    "field",
    "fire",
    "firefly",
    "flower",
    "fog",
    "forest",
    "frog",
    "frost",
    "glade",
    "glitter",
    "grass",
    "haze",
    "hill",
    "lake",
    "leaf",
    "meadow",
    "moon",
    "morning",
    "mountain",
    "night",
    "paper",
    "pine",
    "pond",
    "rain",
    "resonance",
    "river",
    "sea",
    "shadow",
    "shape",
    "silence",
    "sky",
    "smoke",
    "snow",
    "snowflake",
    "sound",
    "star",
    "sun",
    "sunset",
    "surf",
    "thunder",
    "tree",
    "violet",
    "voice",
    "water",
    "waterfall",
    "wave",
    "wildflower",
    "wind",
    "wood",
];

/// A Heroku-style name: `adjective-noun-1234` (at most 28 characters).
pub fn random_app_name() -> String {
    let mut r = rand::thread_rng();
    loop {
        let name = format!(
            "{}-{}-{:04}",
            ADJECTIVES[r.gen_range(0..ADJECTIVES.len())],
            NOUNS[r.gen_range(0..NOUNS.len())],
            r.gen_range(0..10_000)
        );
        if app(&name).is_ok() {
            return name;
        }
    }
}

fn truncate(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buildpack_names_and_blob_ids() {
        for ok in ["python", "node-18", "a", &"x".repeat(40)] {
            assert!(buildpack(ok).is_ok(), "{ok}");
        }
        for bad in ["", "Python", "py_thon", "a/b", "../x", &"x".repeat(41)] {
            assert!(buildpack(bad).is_err(), "{bad}");
        }
        let h = "0123456789abcdef".repeat(4);
        assert_eq!(blob_sha256("blob", &h).unwrap(), h);
        assert_eq!(blob_sha256("blob", &format!("sha256:{h}")).unwrap(), h);
        for bad in [
            String::new(),
            "sha256:".into(),
            "sha256:0123abcd".into(),
            h.to_uppercase(),
            format!("{h}0"),
            format!("sha512:{h}"),
            "../../etc/passwd".into(),
        ] {
            assert!(blob_sha256("blob", &bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn app_names() {
        for ok in ["a", "myapp", "my-app-2", &"a".repeat(28)] {
            assert!(app(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "1app",
            "My",
            "a_b",
            "app-",
            &"a".repeat(29),
            "a.b",
            "api",
            "www",
            "-a",
        ] {
            assert!(app(bad).is_err(), "{bad}");
        }
        for _ in 0..200 {
            let n = random_app_name();
            assert!(app(&n).is_ok() && n.len() <= 28, "{n}");
        }
    }

    #[test]
    fn config_rules() {
        assert!(config_name("DATABASE_URL").is_ok());
        assert!(config_name("_x1").is_ok());
        for bad in ["", "1A", "A-B", "A B", "PORT", "PADDOCK_X", "é"] {
            assert!(config_name(bad).is_err(), "{bad}");
        }
        let mut c = BTreeMap::new();
        c.insert("A".to_string(), "x".repeat(MAX_VALUE_BYTES));
        assert!(config_sizes(&c).is_ok());
        c.insert("B".to_string(), "x".repeat(MAX_VALUE_BYTES + 1));
        assert!(config_sizes(&c).is_err());
        c.insert("B".to_string(), "x".repeat(MAX_VALUE_BYTES));
        // Two full values and their names exceed 64 KiB together.
        assert!(config_sizes(&c).unwrap_err().message.contains("64 KiB"));
    }

    #[test]
    fn domains() {
        assert!(domain("myapp.localhost", false).is_ok());
        assert!(domain("a.example.com", false).is_ok());
        assert!(domain("*.example.com", true).is_ok());
        assert!(domain("1.2.example.com", false).is_ok());
        assert!(domain("a.b2", false).is_ok());
        let e = domain("*.example.com", false).unwrap_err();
        assert_eq!(e.code, paddock_wire::Code::Forbidden);
        for bad in [
            "",
            "localhost",
            "A.com",
            "a..com",
            "-a.com",
            "a_b.com",
            "a.com/x",
            "10.0.0.1",
            "*.10.0.0",
            "example.123",
        ] {
            assert!(domain(bad, true).is_err(), "{bad}");
        }
        assert_eq!(canonical_domain(" A.Example.COM. "), "a.example.com");
    }
}
