//! The balancer's desired state: apps with their domains and backends, and the TLS
//! certificates, each with its owner. Pure data and rules (validation, ownership,
//! fencing); persisted whole in `<dir>/routes.json` after every change, so a
//! restart keeps it. The proxy never reads this: `table` builds its snapshot from it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;

use paddock_wire::{Code, WireError};
use serde::{Deserialize, Serialize};

/// Who set an app's route: an operator by rpc, or the leading scheduler's table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Owner {
    Operator,
    Scheduler,
}

impl Owner {
    pub fn as_str(self) -> &'static str {
        match self {
            Owner::Operator => "operator",
            Owner::Scheduler => "scheduler",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendSpec {
    pub id: String,
    pub addr: SocketAddr,
    #[serde(default = "one")]
    pub weight: u32,
    #[serde(default)]
    pub draining: bool,
}

/// A weight's default (serde).
pub(crate) fn one() -> u32 {
    1
}

/// An app's active health check: an HTTP GET of `path` (2xx/3xx passes), or a TCP
/// connect when no path is given.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppSpec {
    pub domains: Vec<String>,
    pub owner: Owner,
    #[serde(default)]
    pub backends: Vec<BackendSpec>,
    #[serde(default)]
    pub health: HealthSpec,
}

#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertSpec {
    pub domains: Vec<String>,
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for CertSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertSpec")
            .field("domains", &self.domains)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Model {
    #[serde(default)]
    pub apps: BTreeMap<String, AppSpec>,
    #[serde(default)]
    pub certs: Vec<CertSpec>,
    /// The largest scheduler fencing token applied.
    #[serde(default)]
    pub token: u64,
}

/// One app in a scheduler's `routes.table`. Unknown fields are ignored (the
/// protocol grows by adding fields: a newer scheduler's table must still apply).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
pub struct TableApp {
    pub app: String,
    pub domains: Vec<String>,
    #[serde(default)]
    pub backends: Vec<TableBackend>,
    #[serde(default)]
    pub health: HealthSpec,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
pub struct TableBackend {
    pub id: String,
    pub addr: String,
    #[serde(default = "one")]
    pub weight: u32,
    #[serde(default)]
    pub draining: bool,
}

fn invalid(msg: impl Into<String>) -> WireError {
    WireError::new(Code::Invalid, msg.into())
}

/// An app name as the runner and api accept it: `[a-z][a-z0-9-]{0,62}`.
pub fn check_app(app: &str) -> Result<(), WireError> {
    let mut c = app.chars();
    let ok = c.next().is_some_and(|f| f.is_ascii_lowercase())
        && c.all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || ch == '-')
        && app.len() <= 63;
    if ok {
        Ok(())
    } else {
        Err(invalid(format!(
            "app {app:?} is not a valid name ([a-z][a-z0-9-]*, at most 63 characters)"
        )))
    }
}

/// A domain as routes and certificates hold it: lowercase, no port, no trailing
/// dot, DNS labels, optionally `*.` in front (a wildcard).
pub fn normalize_domain(d: &str) -> Result<String, WireError> {
    let d = d.trim_end_matches('.').to_ascii_lowercase();
    let (wild, rest) = match d.strip_prefix("*.") {
        Some(r) => (true, r),
        None => (false, d.as_str()),
    };
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
    };
    if d.len() > 253 || rest.is_empty() || !rest.split('.').all(label_ok) {
        return Err(invalid(format!(
            "{d:?} is not a domain (DNS labels, optionally `*.` in front; no port)"
        )));
    }
    if wild && !rest.contains('.') {
        return Err(invalid(format!(
            "{d:?}: a wildcard needs at least two labels after `*.`"
        )));
    }
    Ok(d)
}

fn normalize_domains(ds: &[String]) -> Result<Vec<String>, WireError> {
    let mut out = Vec::with_capacity(ds.len());
    for d in ds {
        let n = normalize_domain(d)?;
        if !out.contains(&n) {
            out.push(n);
        }
    }
    Ok(out)
}

fn check_id(id: &str) -> Result<(), WireError> {
    if id.is_empty()
        || id.len() > 128
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:@".contains(&b))
    {
        return Err(invalid(format!(
            "backend id {id:?} must be 1-128 characters of [A-Za-z0-9-_.:@]"
        )));
    }
    Ok(())
}

/// `host:port` with a literal IP (the balancer never resolves names per request).
pub fn parse_addr(a: &str) -> Result<SocketAddr, WireError> {
    a.parse()
        .map_err(|_| invalid(format!("addr {a:?} is not IP:port")))
}

fn check_weight(w: u32) -> Result<(), WireError> {
    if !(1..=1000).contains(&w) {
        return Err(invalid(format!("weight {w} must lie between 1 and 1000")));
    }
    Ok(())
}

fn check_health(h: &HealthSpec) -> Result<(), WireError> {
    if let Some(p) = &h.path {
        if !p.starts_with('/') || p.len() > 1024 || p.bytes().any(|b| b <= b' ' || b == 0x7f) {
            return Err(invalid(format!(
                "health path {p:?} must start with / and hold no spaces or control characters"
            )));
        }
    }
    Ok(())
}

impl Model {
    /// Reads `<dir>/routes.json`; a missing file is an empty model.
    /// Reads `routes.json`; when it cannot be read as one (a disk fault, a hand
    /// edit), the copy of the one before the last save (`routes.json.prev`), so
    /// a balancer with a damaged file still comes back with its routes. The bad
    /// file is kept aside as `routes.json.bad` for the operator.
    pub fn load(dir: &Path) -> anyhow::Result<Model> {
        let p = dir.join("routes.json");
        let read = |p: &Path| -> anyhow::Result<Option<Model>> {
            match std::fs::read(p) {
                Ok(b) => serde_json::from_slice(&b)
                    .map(Some)
                    .map_err(|e| anyhow::anyhow!("{}: not a routes file: {e}", p.display())),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(anyhow::anyhow!("cannot read {}: {e}", p.display())),
            }
        };
        match read(&p) {
            Ok(m) => Ok(m.unwrap_or_default()),
            Err(bad) => {
                let prev = dir.join("routes.json.prev");
                match read(&prev) {
                    Ok(Some(m)) => {
                        let aside = dir.join("routes.json.bad");
                        let _ = std::fs::rename(&p, &aside);
                        tracing::error!(
                            "{bad:#}; started from {} (the routes before the last change) and moved the bad file to {}",
                            prev.display(),
                            aside.display()
                        );
                        Ok(m)
                    }
                    _ => Err(bad),
                }
            }
        }
    }

    /// Writes the model whole: temp file (0600, it holds TLS keys), fsync, rename,
    /// fsync of the directory. A crash leaves the old file or the new, never half.
    pub fn save(&self, dir: &Path) -> std::io::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let tmp = dir.join("routes.json.tmp");
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)?;
        f.write_all(&serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?)?;
        f.sync_all()?;
        // The file being replaced stays as routes.json.prev (a hard link: same
        // inode, same 0600), what `load` falls back to if the new one is damaged.
        let cur = dir.join("routes.json");
        let prev = dir.join("routes.json.prev");
        let _ = std::fs::remove_file(&prev);
        let _ = std::fs::hard_link(&cur, &prev);
        std::fs::rename(&tmp, cur)?;
        std::fs::File::open(dir)?.sync_all()
    }

    /// Which app holds `domain`, if any.
    fn domain_owner(&self, domain: &str) -> Option<&str> {
        self.apps
            .iter()
            .find(|(_, a)| a.domains.iter().any(|d| d == domain))
            .map(|(n, _)| n.as_str())
    }

    fn operator_app(&mut self, app: &str) -> Result<&mut AppSpec, WireError> {
        match self.apps.get_mut(app) {
            None => Err(WireError::new(
                Code::NotFound,
                format!("no route for app {app:?}: route.set it first"),
            )),
            Some(a) if a.owner == Owner::Scheduler => Err(scheduler_owns(app)),
            Some(a) => Ok(a),
        }
    }

    /// `route.set`: the app's domains (its backends are kept).
    pub fn set_route(
        &mut self,
        app: &str,
        domains: &[String],
        health: Option<HealthSpec>,
    ) -> Result<(), WireError> {
        check_app(app)?;
        let domains = normalize_domains(domains)?;
        if let Some(h) = &health {
            check_health(h)?;
        }
        if let Some(a) = self.apps.get(app) {
            if a.owner == Owner::Scheduler {
                return Err(scheduler_owns(app));
            }
        }
        for d in &domains {
            if let Some(other) = self.domain_owner(d).filter(|o| *o != app) {
                return Err(WireError::new(
                    Code::Conflict,
                    format!("domain {d} is routed to app {other:?}; route.remove it there first"),
                ));
            }
        }
        let entry = self.apps.entry(app.to_string()).or_insert(AppSpec {
            domains: Vec::new(),
            owner: Owner::Operator,
            backends: Vec::new(),
            health: HealthSpec::default(),
        });
        entry.domains = domains;
        if let Some(h) = health {
            entry.health = h;
        }
        Ok(())
    }

    pub fn remove_route(&mut self, app: &str) -> Result<(), WireError> {
        self.operator_app(app)?;
        self.apps.remove(app);
        Ok(())
    }

    /// `backend.add`: adds the backend, or replaces one with the same id (which ends
    /// a drain of it).
    pub fn add_backend(
        &mut self,
        app: &str,
        id: &str,
        addr: &str,
        weight: u32,
    ) -> Result<(), WireError> {
        check_id(id)?;
        let addr = parse_addr(addr)?;
        check_weight(weight)?;
        let a = self.operator_app(app)?;
        let b = BackendSpec {
            id: id.to_string(),
            addr,
            weight,
            draining: false,
        };
        match a.backends.iter_mut().find(|b| b.id == id) {
            Some(old) => *old = b,
            None => a.backends.push(b),
        }
        Ok(())
    }

    fn operator_backend(&mut self, app: &str, id: &str) -> Result<&mut BackendSpec, WireError> {
        let a = self.operator_app(app)?;
        a.backends.iter_mut().find(|b| b.id == id).ok_or_else(|| {
            WireError::new(Code::NotFound, format!("app {app:?} has no backend {id:?}"))
        })
    }

    /// `backend.drain`: no new requests; returns whether it was already draining.
    pub fn drain_backend(&mut self, app: &str, id: &str) -> Result<bool, WireError> {
        let b = self.operator_backend(app, id)?;
        let was = b.draining;
        b.draining = true;
        Ok(was)
    }

    pub fn remove_backend(&mut self, app: &str, id: &str) -> Result<(), WireError> {
        self.operator_backend(app, id)?;
        if let Some(a) = self.apps.get_mut(app) {
            a.backends.retain(|b| b.id != id);
        }
        Ok(())
    }

    /// `cert.set`: a certificate for `domains` (replacing any cert that had exactly
    /// those domains). The PEMs are checked by the caller (`tls::certified_key`).
    pub fn set_cert(
        &mut self,
        domains: &[String],
        cert_pem: String,
        key_pem: String,
    ) -> Result<Vec<String>, WireError> {
        let domains = normalize_domains(domains)?;
        if domains.is_empty() {
            return Err(invalid("cert.set needs at least one domain"));
        }
        self.certs.retain(|c| c.domains != domains);
        self.certs.push(CertSpec {
            domains: domains.clone(),
            cert_pem,
            key_pem,
        });
        Ok(domains)
    }

    pub fn remove_cert(&mut self, domains: &[String]) -> Result<(), WireError> {
        let domains = normalize_domains(domains)?;
        let before = self.certs.len();
        self.certs.retain(|c| c.domains != domains);
        if self.certs.len() == before {
            return Err(WireError::new(
                Code::NotFound,
                format!("no certificate for exactly {domains:?}"),
            ));
        }
        Ok(())
    }

    /// A scheduler's whole table, fenced: refused (`stale_token`) when `token` is
    /// smaller than the largest seen. The scheduler's apps replace what was there
    /// (an operator route of the same app included); scheduler apps absent from the
    /// table are removed; operator apps stay, but lose any domain the table gives
    /// to one of its apps. Returns whether anything changed.
    pub fn apply_table(&mut self, token: u64, apps: &[TableApp]) -> Result<bool, WireError> {
        if token < self.token {
            return Err(WireError::new(
                Code::StaleToken,
                format!(
                    "routes.table token {token} is smaller than {} already applied",
                    self.token
                ),
            ));
        }
        let mut next: BTreeMap<String, AppSpec> = BTreeMap::new();
        for t in apps {
            check_app(&t.app)?;
            check_health(&t.health)?;
            let mut backends = Vec::with_capacity(t.backends.len());
            for b in &t.backends {
                check_id(&b.id)?;
                check_weight(b.weight)?;
                backends.push(BackendSpec {
                    id: b.id.clone(),
                    addr: parse_addr(&b.addr)?,
                    weight: b.weight,
                    draining: b.draining,
                });
            }
            let spec = AppSpec {
                domains: normalize_domains(&t.domains)?,
                owner: Owner::Scheduler,
                backends,
                health: t.health.clone(),
            };
            if next.insert(t.app.clone(), spec).is_some() {
                return Err(invalid(format!("app {:?} is in the table twice", t.app)));
            }
        }
        let before = self.clone();
        self.token = token;
        self.apps.retain(|_, a| a.owner == Owner::Operator);
        let taken: Vec<String> = next.values().flat_map(|a| a.domains.clone()).collect();
        for (name, a) in self.apps.iter_mut() {
            let had = a.domains.len();
            a.domains.retain(|d| !taken.contains(d));
            if a.domains.len() != had {
                tracing::warn!(app = %name, "the scheduler's table routes some of this operator route's domains elsewhere; they were taken from it");
            }
        }
        for (name, spec) in next {
            self.apps.insert(name, spec);
        }
        Ok(*self != before)
    }

    /// The table as `routes.list` shows it (no key material).
    pub fn listing(&self) -> serde_json::Value {
        serde_json::json!({
            "token": self.token,
            "apps": self.apps.iter().map(|(n, a)| serde_json::json!({
                "app": n, "owner": a.owner.as_str(), "domains": a.domains,
                "health": a.health, "backends": a.backends,
            })).collect::<Vec<_>>(),
        })
    }
}

fn scheduler_owns(app: &str) -> WireError {
    WireError::new(
        Code::Conflict,
        format!("app {app:?} is managed by the scheduler (owner scheduler); change it through the scheduler, not by rpc"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn domains(d: &[&str]) -> Vec<String> {
        d.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn domains_are_normalized_and_bad_ones_refused() {
        assert_eq!(normalize_domain("A.Example.COM.").unwrap(), "a.example.com");
        assert_eq!(
            normalize_domain("*.Apps.example.com").unwrap(),
            "*.apps.example.com"
        );
        for bad in [
            "",
            "a..b",
            "a.example.com:80",
            "*.com",
            "-a.b",
            "a b.c",
            "*.*.a.b",
            "ä.com",
        ] {
            assert!(normalize_domain(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn a_domain_belongs_to_one_app() {
        let mut m = Model::default();
        m.set_route("a", &domains(&["a.example.com"]), None)
            .unwrap();
        let e = m
            .set_route("b", &domains(&["A.example.com"]), None)
            .unwrap_err();
        assert_eq!(e.code, Code::Conflict);
        assert!(e.message.contains("\"a\""), "{}", e.message);
        assert!(!m.apps.contains_key("b"), "a refused write changes nothing");
    }

    #[test]
    fn backends_need_a_route_and_valid_fields() {
        let mut m = Model::default();
        assert_eq!(
            m.add_backend("a", "x", "127.0.0.1:1", 1).unwrap_err().code,
            Code::NotFound
        );
        m.set_route("a", &domains(&["a.example.com"]), None)
            .unwrap();
        assert_eq!(
            m.add_backend("a", "x", "localhost:1", 1).unwrap_err().code,
            Code::Invalid
        );
        assert_eq!(
            m.add_backend("a", "x", "127.0.0.1:1", 0).unwrap_err().code,
            Code::Invalid
        );
        assert_eq!(
            m.add_backend("a", "x y", "127.0.0.1:1", 1)
                .unwrap_err()
                .code,
            Code::Invalid
        );
        m.add_backend("a", "x", "127.0.0.1:1", 1).unwrap();
        assert!(!m.drain_backend("a", "x").unwrap());
        assert!(m.drain_backend("a", "x").unwrap(), "a second drain says so");
        m.add_backend("a", "x", "127.0.0.1:2", 3).unwrap();
        let b = &m.apps["a"].backends;
        assert_eq!(b.len(), 1);
        assert!(!b[0].draining, "re-adding ends the drain");
        assert_eq!(b[0].weight, 3);
        m.remove_backend("a", "x").unwrap();
        assert_eq!(m.remove_backend("a", "x").unwrap_err().code, Code::NotFound);
    }

    fn table_app(app: &str, d: &str) -> TableApp {
        TableApp {
            app: app.into(),
            domains: vec![d.into()],
            backends: vec![TableBackend {
                id: "w1".into(),
                addr: "127.0.0.1:9".into(),
                weight: 1,
                draining: false,
            }],
            health: HealthSpec::default(),
        }
    }

    #[test]
    fn the_schedulers_table_is_fenced_and_leaves_operator_routes() {
        let mut m = Model::default();
        m.set_route("op", &domains(&["op.example.com"]), None)
            .unwrap();
        assert!(m
            .apply_table(5, &[table_app("s", "s.example.com")])
            .unwrap());
        assert_eq!(m.apps["s"].owner, Owner::Scheduler);
        assert!(m.apps.contains_key("op"));
        // An rpc write to the scheduler's app: conflict, saying who owns it.
        let e = m.add_backend("s", "x", "127.0.0.1:1", 1).unwrap_err();
        assert_eq!(e.code, Code::Conflict);
        assert!(e.message.contains("scheduler"), "{}", e.message);
        // A smaller token: refused, nothing changes.
        let before = m.clone();
        let e = m.apply_table(4, &[]).unwrap_err();
        assert_eq!(e.code, Code::StaleToken);
        assert_eq!(m, before);
        // The same token again is applied (a resync); an equal table changes nothing.
        assert!(!m
            .apply_table(5, &[table_app("s", "s.example.com")])
            .unwrap());
        // A newer table without `s` removes it; `op` stays.
        assert!(m.apply_table(6, &[]).unwrap());
        assert!(!m.apps.contains_key("s"));
        assert!(m.apps.contains_key("op"));
        assert_eq!(m.token, 6);
    }

    #[test]
    fn a_bad_table_changes_nothing() {
        let mut m = Model::default();
        m.apply_table(1, &[table_app("s", "s.example.com")])
            .unwrap();
        let before = m.clone();
        let mut bad = table_app("t", "t.example.com");
        bad.backends[0].addr = "nowhere".into();
        assert_eq!(m.apply_table(2, &[bad]).unwrap_err().code, Code::Invalid);
        assert_eq!(m, before);
    }

    #[test]
    fn saved_and_loaded_whole_and_keys_stay_out_of_debug() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = Model::default();
        m.set_route("a", &domains(&["a.example.com"]), None)
            .unwrap();
        m.set_cert(
            &domains(&["a.example.com"]),
            "CERT".into(),
            "SECRETKEY".into(),
        )
        .unwrap();
        m.save(dir.path()).unwrap();
        assert_eq!(Model::load(dir.path()).unwrap(), m);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("routes.json"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(!format!("{m:?}").contains("SECRETKEY"));
        assert!(!m.listing().to_string().contains("SECRETKEY"));
    }

    #[test]
    fn a_newer_schedulers_table_with_fields_unknown_here_still_applies() {
        let t: TableApp = serde_json::from_value(serde_json::json!({
            "app": "a", "domains": ["a.example.com"], "canary": {"share": 5},
            "backends": [{"id": "w1", "addr": "127.0.0.1:1", "zone": "eu-1"}],
        }))
        .unwrap();
        let mut m = Model::default();
        assert!(m.apply_table(1, &[t]).unwrap());
        assert_eq!(m.apps["a"].backends.len(), 1);
    }

    #[test]
    fn a_damaged_routes_file_falls_back_to_the_one_before_the_last_change() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = Model::default();
        m.set_route("a", &domains(&["a.example.com"]), None)
            .unwrap();
        m.save(dir.path()).unwrap();
        let first = m.clone();
        m.set_route("b", &domains(&["b.example.com"]), None)
            .unwrap();
        m.save(dir.path()).unwrap();
        assert_eq!(Model::load(dir.path()).unwrap(), m);
        std::fs::write(dir.path().join("routes.json"), b"{\"apps\": {tru").unwrap();
        assert_eq!(Model::load(dir.path()).unwrap(), first);
        assert!(dir.path().join("routes.json.bad").exists());
        // With neither file readable, the start fails and says which file.
        std::fs::write(dir.path().join("routes.json"), b"junk").unwrap();
        std::fs::write(dir.path().join("routes.json.prev"), b"junk").unwrap();
        let e = Model::load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("routes.json: not a routes file"), "{e}");
    }
}
