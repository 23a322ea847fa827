//! The small text formats a build reads: the Procfile, `bin/release`'s YAML
//! (only `default_process_types` matters, so a few lines of parsing replace a
//! YAML library) and `.buildpacks`. Pure functions, unit-tested.

use std::collections::BTreeMap;

/// Process type names as the api takes them.
pub fn valid_type(name: &str) -> bool {
    (1..=30).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

/// `type: command` lines; blank lines and `#` comments are skipped. A line that
/// is not of that form, or a bad name, is an error naming the line.
pub fn parse_procfile(text: &str) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let t = line.trim();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        let Some((name, cmd)) = t.split_once(':') else {
            return Err(format!(
                "Procfile line {} is not `type: command`: {t}",
                n + 1
            ));
        };
        let (name, cmd) = (name.trim(), cmd.trim());
        if !valid_type(name) {
            return Err(format!(
                "Procfile line {}: `{name}` is not a process type name (1-30 of a-z 0-9 - _)",
                n + 1
            ));
        }
        if cmd.is_empty() {
            return Err(format!(
                "Procfile line {}: process type {name} has no command",
                n + 1
            ));
        }
        out.insert(name.to_string(), cmd.to_string());
    }
    Ok(out)
}

/// `default_process_types` from `bin/release`'s YAML:
///
/// ```yaml
/// ---
/// addons: []
/// default_process_types:
///   web: npm start
/// ```
///
/// Values may be quoted ('…' or "…" with \" and \\ escapes). `{}` or a missing
/// key is none.
pub fn parse_release_yaml(text: &str) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    let mut inside = false;
    for line in text.lines() {
        if line.trim().is_empty() || line.trim_start().starts_with('#') || line.trim() == "---" {
            continue;
        }
        let indented = line.starts_with(' ') || line.starts_with('\t');
        if !indented {
            inside = false;
            if let Some(rest) = line.strip_prefix("default_process_types:") {
                let rest = rest.trim();
                if !(rest.is_empty() || rest == "{}" || rest == "~" || rest == "null") {
                    return Err(format!(
                        "bin/release: default_process_types must be a mapping, not `{rest}`"
                    ));
                }
                inside = rest.is_empty();
            }
            continue;
        }
        if !inside {
            continue;
        }
        let t = line.trim();
        let Some((name, value)) = t.split_once(':') else {
            return Err(format!("bin/release: not `type: command`: {t}"));
        };
        let name = unquote(name.trim())?;
        if !valid_type(&name) {
            return Err(format!("bin/release: `{name}` is not a process type name"));
        }
        let cmd = unquote(value.trim())?;
        if !cmd.trim().is_empty() {
            out.insert(name, cmd);
        }
    }
    Ok(out)
}

fn unquote(s: &str) -> Result<String, String> {
    if s.len() >= 2 && s.starts_with('\'') && s.ends_with('\'') {
        return Ok(s[1..s.len() - 1].replace("''", "'"));
    }
    if s.len() >= 2 && s.starts_with('"') && s.ends_with('"') {
        let mut out = String::new();
        let mut chars = s[1..s.len() - 1].chars();
        while let Some(c) = chars.next() {
            if c == '\\' {
                match chars.next() {
                    Some('n') => out.push('\n'),
                    Some('t') => out.push('\t'),
                    Some(c) => out.push(c),
                    None => return Err(format!("bin/release: bad escape in {s}")),
                }
            } else {
                out.push(c);
            }
        }
        return Ok(out);
    }
    Ok(s.to_string())
}

/// Where the buildpacks a repo names come from: `.buildpacks` (one per line) or
/// the `BUILDPACK_URL` config var; `None` means "detect among the built-ins".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BuildpackRef {
    /// One of the built-ins (`python`, `node`, `static`, `procfile`; also
    /// `paddock/python` …).
    Builtin(String),
    /// A directory on the node (readable by the app's user).
    Local(String),
    /// A buildpack uploaded through the api: the blob (a tar) with this sha256.
    Blob(String),
    /// A buildpack uploaded through the api under this name (`paddock:NAME`, or
    /// a bare name that is not a built-in's): the api's `buildpack.get` says its blob.
    Named(String),
}

fn valid_name(n: &str) -> bool {
    (1..=40).contains(&n.len())
        && n.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

pub const BUILTINS: [&str; 4] = ["python", "node", "static", "procfile"];

/// One `.buildpacks` line or `BUILDPACK_URL` value.
pub fn parse_buildpack_ref(s: &str) -> Result<BuildpackRef, String> {
    let s = s.trim();
    let name = s.strip_prefix("paddock/").unwrap_or(s);
    if BUILTINS.contains(&name) {
        return Ok(BuildpackRef::Builtin(name.to_string()));
    }
    if let Some(n) = s.strip_prefix("paddock:") {
        if valid_name(n) {
            return Ok(BuildpackRef::Named(n.to_string()));
        }
        return Err(format!(
            "`{s}`: an uploaded buildpack's name is 1-40 of a-z 0-9 -"
        ));
    }
    if valid_name(s) {
        return Ok(BuildpackRef::Named(s.to_string()));
    }
    for prefix in ["sha256:", "blob:"] {
        if let Some(hex) = s.strip_prefix(prefix) {
            if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Ok(BuildpackRef::Blob(hex.to_ascii_lowercase()));
            }
            return Err(format!(
                "`{s}`: a buildpack blob is sha256: and 64 hex digits"
            ));
        }
    }
    if let Some(p) = s
        .strip_prefix("file://")
        .or(Some(s))
        .filter(|p| p.starts_with('/'))
    {
        if p.split('/').any(|c| c == "..") {
            return Err(format!("`{s}`: a buildpack path may not contain `..`"));
        }
        return Ok(BuildpackRef::Local(p.to_string()));
    }
    Err(format!(
        "`{s}` is not a buildpack this deployer can use: give a built-in ({}), \
         the name of one uploaded with `paddock buildpacks add` (paddock:NAME), \
         an absolute path on the node, or sha256:<hex> of an uploaded buildpack \
         (git and https URLs are not fetched)",
        BUILTINS.join(", ")
    ))
}

/// `.buildpacks`: one reference per line, `#` comments.
pub fn parse_buildpacks_file(text: &str) -> Result<Vec<BuildpackRef>, String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(parse_buildpack_ref)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn procfiles() {
        let p = parse_procfile("# hi\nweb: python app.py --port $PORT\n\nworker:  celery a:b\n")
            .unwrap();
        assert_eq!(p["web"], "python app.py --port $PORT");
        assert_eq!(p["worker"], "celery a:b");
        assert!(parse_procfile("web python").unwrap_err().contains("line 1"));
        assert!(parse_procfile("Web: x").is_err());
        assert!(parse_procfile("web:").is_err());
        assert!(parse_procfile("").unwrap().is_empty());
    }

    #[test]
    fn release_yaml() {
        let y = "---\naddons: []\nconfig_vars:\n  A: b\ndefault_process_types:\n  web: npm start\n  worker: \"node w.js --x \\\"y\\\"\"\n";
        let p = parse_release_yaml(y).unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(p["web"], "npm start");
        assert_eq!(p["worker"], "node w.js --x \"y\"");
        assert!(parse_release_yaml("---\ndefault_process_types: {}\n")
            .unwrap()
            .is_empty());
        assert!(parse_release_yaml("").unwrap().is_empty());
        assert!(parse_release_yaml("default_process_types: web\n").is_err());
        assert_eq!(
            parse_release_yaml("default_process_types:\n  'web': 'a '' b'\nother: 1\n  x: y\n")
                .unwrap()["web"],
            "a ' b"
        );
    }

    #[test]
    fn buildpack_refs() {
        assert_eq!(
            parse_buildpack_ref("python").unwrap(),
            BuildpackRef::Builtin("python".into())
        );
        assert_eq!(
            parse_buildpack_ref("paddock/node").unwrap(),
            BuildpackRef::Builtin("node".into())
        );
        assert_eq!(
            parse_buildpack_ref("/opt/bp").unwrap(),
            BuildpackRef::Local("/opt/bp".into())
        );
        assert_eq!(
            parse_buildpack_ref("file:///opt/bp").unwrap(),
            BuildpackRef::Local("/opt/bp".into())
        );
        assert!(parse_buildpack_ref("/opt/../etc").is_err());
        assert_eq!(
            parse_buildpack_ref("paddock:my-pack").unwrap(),
            BuildpackRef::Named("my-pack".into())
        );
        assert_eq!(
            parse_buildpack_ref("my-pack").unwrap(),
            BuildpackRef::Named("my-pack".into())
        );
        assert_eq!(
            parse_buildpack_ref("paddock:python").unwrap(),
            BuildpackRef::Named("python".into())
        );
        assert!(parse_buildpack_ref("paddock:Bad").is_err());
        let h = "ab".repeat(32);
        assert_eq!(
            parse_buildpack_ref(&format!("sha256:{h}")).unwrap(),
            BuildpackRef::Blob(h)
        );
        assert!(
            parse_buildpack_ref("https://github.com/heroku/heroku-buildpack-python")
                .unwrap_err()
                .contains("not fetched")
        );
        assert_eq!(
            parse_buildpacks_file("# x\npython\n\nnode\n")
                .unwrap()
                .len(),
            2
        );
    }
}
