//! The customer's verbs (and the operator's `users`), in Heroku's shape: each
//! is one or two api kinds (docs/PROTOCOL.md, "api"), signed with the identity
//! `identity::resolve` finds. `--json` prints the api's reply as it came.

use std::io::{IsTerminal, Read};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::Subcommand;
use paddock_config::credentials::{UserCredentials, UserCurve};
use paddock_config::Secret;
use paddock_wire::{Client, ClientError, Code};
use serde_json::{json, Value};

use crate::cluster::{self, Opts};
use crate::identity::{self, Identity, Source};
use crate::out::{self, Table};
use crate::tty::{self, RunConn};

/// How many entries a list shows unless `-n` says otherwise.
pub const LIST_DEFAULT: u32 = 15;

#[derive(Debug, Subcommand)]
pub enum AuthCmd {
    /// Replace your user key with a fresh one (stored in your credentials file);
    /// the old key is revoked at once.
    Rotate,
}

#[derive(Debug, Subcommand)]
pub enum AppsCmd {
    /// Create an app; with no NAME, a random one (adjective-noun-1234).
    Create { name: Option<String> },
    /// An app's owner, releases, domains, formation and collaborators.
    Info,
    /// Destroy an app and everything it has (instances, routes, domains, releases).
    Destroy {
        /// The app's name again, to confirm.
        #[arg(long)]
        confirm: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum ConfigCmd {
    /// Print one config var's value, bare (nothing else, for scripts).
    Get { name: String },
    /// Set config vars: KEY=VALUE…; makes a new release. KEY=@FILE takes the
    /// value from FILE and KEY=- from stdin (byte for byte, a trailing newline
    /// included), keeping secrets out of the process list and shell history;
    /// KEY=@@… is a value starting with a literal @.
    Set {
        #[arg(required = true, value_name = "KEY=VALUE|KEY=@FILE|KEY=-")]
        vars: Vec<String>,
    },
    /// Remove config vars; makes a new release.
    Unset {
        #[arg(required = true, value_name = "KEY")]
        names: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum ReleasesCmd {
    /// One release: who made it, why, its process types and config.
    Info {
        /// vN (or N).
        version: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum PsCmd {
    /// Change process quantities (and sizes): web=2 worker=1, or web=2:512 for
    /// 512 MB each. All or nothing; a formation the cluster has no room for is
    /// refused. Then waits (up to 30 s) until that many are up.
    Scale {
        #[arg(required = true, value_name = "TYPE=QTY[:MB]")]
        changes: Vec<String>,
        /// Do not wait for the instances to be up.
        #[arg(long)]
        no_wait: bool,
    },
    /// Restart the app's processes (one TYPE's, or all), one at a time, as a
    /// deploy of the current release does.
    Restart {
        #[arg(value_name = "TYPE")]
        process_type: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum DeploysCmd {
    /// One deploy's trail: each step, alert and its outcome, in order.
    Info {
        /// vN (or N).
        version: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum DomainsCmd {
    /// Route a host name to the app.
    Add { domain: String },
    /// Stop routing a host name to the app (not its default domain).
    Remove { domain: String },
}

#[derive(Debug, Subcommand)]
pub enum AccessCmd {
    /// Give USER access to the app as a collaborator.
    Add {
        user: String,
        #[arg(long, default_value = "collaborator")]
        role: String,
    },
    /// Take USER's access away.
    Remove { user: String },
}

#[derive(Debug, Subcommand)]
pub enum KeysCmd {
    /// Add an SSH public key (for git push); default ~/.ssh/id_ed25519.pub.
    Add { file: Option<PathBuf> },
    /// Remove an SSH key by its fingerprint (SHA256:…, as `paddock keys` shows).
    Remove { fingerprint: String },
}

#[derive(Debug, Subcommand)]
pub enum UsersCmd {
    /// Create a user; prints their credentials document (shown this once).
    Create {
        name: String,
        #[arg(long)]
        admin: bool,
        /// The api endpoint to write into the document (default: the one this
        /// command talked to); for users who reach the api by another address.
        #[arg(long, value_name = "tcp://HOST:PORT")]
        api: Option<String>,
    },
    /// Revoke every key of a user and disable them.
    Revoke { name: String },
}

#[derive(Debug, Subcommand)]
pub enum GitCmd {
    /// Point a git remote of the repository you are in at the app (`git remote
    /// add`, or `set-url` when it exists), so `git push paddock main` deploys.
    Remote {
        /// The remote's name.
        #[arg(short = 'r', long, default_value = "paddock")]
        remote: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum BuildsCmd {
    /// One build: its steps, how long each took, the release it made, and its log.
    Info {
        /// The build's id, as `paddock builds` shows it.
        id: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum BuildpacksCmd {
    /// Upload a buildpack (a directory, packed as a tar.gz, or a .tgz / .tar.gz
    /// file) to the blobstore and record it as NAME: apps use it with
    /// BUILDPACK_URL=paddock:NAME or a line NAME in their .buildpacks.
    Add {
        /// 1-40 characters of a-z, 0-9 and '-'.
        name: String,
        /// A buildpack directory (with bin/detect, bin/compile…) or a .tgz of one.
        path: PathBuf,
        /// Where the buildpack came from, for the record (e.g. its git URL).
        #[arg(long)]
        url: Option<String>,
    },
    /// Forget a buildpack (its blob goes at the blobstore's next collection).
    Remove { name: String },
}

/// A connection to the api as the resolved identity.
pub struct Api {
    c: Client,
    pub id: Identity,
    pub endpoint: String,
}

/// A user's client to the api of their credentials.
fn user_client(creds: &UserCredentials, path: &Path, timeout: Duration) -> Result<Client> {
    let keys = creds
        .credentials()
        .map_err(|e| anyhow!("credentials {}: {e}", path.display()))?;
    Ok(
        Client::connect(&creds.api, &format!("user:{}", creds.user), keys)?
            .with_timeout(timeout)
            .with_resend_every(Duration::from_millis(500).min(timeout)),
    )
}

impl Api {
    pub fn connect(opts: &Opts) -> Result<Api> {
        let id = identity::resolve(opts)?;
        let (c, endpoint) = match &id {
            Identity::User { creds, path, .. } => {
                (user_client(creds, path, opts.timeout)?, creds.api.clone())
            }
            Identity::Cluster { cfg, .. } => {
                let ep = cluster::find(cfg, "api", None, opts.timeout)
                    .context("finding the api (its [daemons.api] rpc in the cluster file, else the registry)")?;
                (cluster::client(cfg, &ep, opts.timeout)?, ep)
            }
        };
        Ok(Api { c, id, endpoint })
    }

    pub fn call(&mut self, kind: &str, body: Value) -> Result<Value> {
        self.c.call(kind, body).map_err(|e| self.explain(e))
    }

    pub fn set_timeout(&mut self, timeout: Duration) {
        self.c.set_timeout(timeout);
    }

    /// Makes more connections to the same api as the same identity, for other
    /// threads (a one-off's input and window size).
    fn connector(&self, timeout: Duration) -> tty::Connect {
        let endpoint = self.endpoint.clone();
        match &self.id {
            Identity::User { creds, path, .. } => {
                let (creds, path) = (creds.clone(), path.clone());
                Box::new(move || {
                    let c = user_client(&creds, &path, timeout)?;
                    Ok(Box::new(Conn(c)) as Box<dyn RunConn>)
                })
            }
            Identity::Cluster { cfg, .. } => {
                let cfg = cfg.clone();
                Box::new(move || {
                    let c = cluster::client(&cfg, &endpoint, timeout)?;
                    Ok(Box::new(Conn(c)) as Box<dyn RunConn>)
                })
            }
        }
    }

    /// A refusal's message as the api wrote it (it names what was refused and
    /// what to do); a transport failure with what it may mean for this identity.
    fn explain(&self, e: ClientError) -> anyhow::Error {
        let user = matches!(self.id, Identity::User { .. });
        match e {
            ClientError::Remote(w) if w.code == Code::UnknownKey && user => anyhow!(
                "{}: the api does not know your key (revoked, or rotated elsewhere); log in again with a current credentials file",
                w.message
            ),
            ClientError::Remote(w)
                if w.code == Code::Forbidden && self.id.source() == Source::Credentials =>
            {
                match identity::cluster_file_nearby() {
                    // An operator who is also logged in as a user signs as that
                    // user by default: tell them how to use the cluster key.
                    Some(f) => anyhow!(
                        "{}\n(you are signing as your user from {}; to use the cluster key of {}, pass --config {})",
                        w.message,
                        self.id.path().display(),
                        f.display(),
                        f.display()
                    ),
                    None => anyhow!("{}", w.message),
                }
            }
            ClientError::Remote(w) => anyhow!("{}", w.message),
            ClientError::NotConnected { .. } | ClientError::Timeout { .. } if user => anyhow!(
                "{e}\n(the api refuses connections from a revoked key: if your key was rotated or revoked, log in again with a current credentials file)"
            ),
            other => anyhow!(other),
        }
    }
}

impl RunConn for Api {
    fn call(&mut self, kind: &str, body: Value) -> Result<Value> {
        Api::call(self, kind, body)
    }
}

/// A further connection to the api (a one-off's input and resize threads).
struct Conn(Client);

impl RunConn for Conn {
    fn call(&mut self, kind: &str, body: Value) -> Result<Value> {
        self.0.call(kind, body).map_err(|e| match e {
            ClientError::Remote(w) => anyhow!("{}", w.message),
            other => anyhow!(other),
        })
    }
}

fn json_out(v: &Value) -> Result<()> {
    println!("{}", json_text(v)?);
    Ok(())
}

/// Pretty JSON, DEL and C1 controls escaped (`out::safe_json`).
fn json_text(v: &Value) -> Result<String> {
    Ok(out::safe_json(serde_json::to_string_pretty(v)?))
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn version_arg(v: &str) -> Result<i64> {
    v.strip_prefix('v')
        .unwrap_or(v)
        .parse::<i64>()
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| {
            anyhow!("`{v}` is not a release version: write vN, as `paddock releases` shows")
        })
}

// ---- identity ---------------------------------------------------------------

pub fn login(opts: &Opts, file: Option<PathBuf>) -> Result<()> {
    let (text, name) = match &file {
        Some(f) => (
            std::fs::read_to_string(f).with_context(|| format!("cannot read {}", f.display()))?,
            f.clone(),
        ),
        None => {
            let stdin = std::io::stdin();
            if stdin.is_terminal() {
                eprintln!(
                    "Paste the credentials document your operator gave you, then press Ctrl-D:"
                );
            }
            let mut t = String::new();
            stdin
                .lock()
                .read_to_string(&mut t)
                .context("reading stdin")?;
            (t, PathBuf::from("<stdin>"))
        }
    };
    let creds = UserCredentials::parse(&text, &name)?;
    // Check the key works before storing it.
    let keys = creds.credentials().map_err(|e| anyhow!(e))?;
    let mut c = Client::connect(&creds.api, &format!("user:{}", creds.user), keys)?
        .with_timeout(opts.timeout);
    let me = c.call("whoami", json!({})).map_err(|e| match e {
        ClientError::Remote(w) if w.code == Code::UnknownKey => anyhow!(
            "the api at {} does not know key {} (revoked or rotated?): ask your operator for a new credentials document",
            creds.api,
            creds.key_id
        ),
        ClientError::Remote(w) => anyhow!("{}", w.message),
        other => anyhow!(
            "{other}\n(nothing was stored; check the api address, or the key was revoked: a revoked key cannot connect)"
        ),
    })?;
    if me["user"].as_str() != Some(creds.user.as_str()) {
        bail!(
            "the api says this key belongs to {}, not {}: the document was edited; ask your operator for a new one",
            s(&me["user"]),
            creds.user
        );
    }
    let dest = identity::credentials_path()?;
    creds.write(&dest)?;
    identity::warn_folder(&dest);
    if opts.json {
        return json_out(
            &json!({"user": creds.user, "key_id": creds.key_id, "api": creds.api, "file": dest}),
        );
    }
    out::say(&format!(
        "Logged in as {} (api {}); credentials stored in {}",
        creds.user,
        creds.api,
        dest.display()
    ));
    if opts.config.is_some()
        || std::env::var_os(paddock_config::ENV_PATH).is_some_and(|v| !v.is_empty())
    {
        eprintln!(
            "note: --config or $PADDOCK_CONFIG is set and comes before your credentials; unset it to act as {}",
            creds.user
        );
    }
    Ok(())
}

pub fn logout(opts: &Opts) -> Result<()> {
    let path = identity::credentials_path()?;
    let existed = match std::fs::remove_file(&path) {
        Ok(()) => true,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => return Err(anyhow!("cannot remove {}: {e}", path.display())),
    };
    if opts.json {
        return json_out(&json!({"removed": existed, "file": path}));
    }
    if existed {
        println!(
            "Logged out: removed {} (the key itself stays valid; `paddock auth rotate` first if the file may have been copied)",
            path.display()
        );
    } else {
        println!("Not logged in ({} does not exist)", path.display());
    }
    Ok(())
}

pub fn whoami(opts: &Opts) -> Result<()> {
    let mut api = Api::connect(opts)?;
    let mut v = api.call("whoami", json!({}))?;
    if opts.json {
        v["file"] = json!(api.id.path());
        return json_out(&v);
    }
    if v["cluster"] == true {
        out::say(&format!("the cluster key {}", s(&v["key_id"])));
    } else if v["admin"] == true {
        out::say(&format!("{} (admin)", s(&v["user"])));
    } else {
        out::say(&s(&v["user"]));
    }
    out::say_err(&format!(
        "signed with key {} from {}",
        s(&v["key_id"]),
        api.id.path().display()
    ));
    Ok(())
}

pub fn auth(opts: &Opts, cmd: AuthCmd) -> Result<()> {
    let AuthCmd::Rotate = cmd;
    let mut api = Api::connect(opts)?;
    let (old, path) = match &api.id {
        Identity::User { creds, path, .. } => (creds.clone(), path.clone()),
        Identity::Cluster { cfg, .. } => bail!(
            "`paddock auth rotate` replaces a user key, but this command signs with the cluster key of {} (log in, or leave out --config / unset PADDOCK_CONFIG)",
            cfg.path.display()
        ),
    };
    let v = api.call("key.rotate", json!({}))?;
    let new = creds_from_reply(
        &v,
        &old.api,
        old.curve.as_ref().map(|c| c.server_public.as_str()),
    )?;
    // (Its folder was checked when the file was loaded.)
    if let Err(e) = new.write(&path) {
        // The old key is gone already: the new one must not be lost with the file.
        out::say(new.to_toml().trim_end());
        bail!(
            "{e}\nthe new key {} is active and {} is revoked: save the document above and run `paddock login` with it",
            new.key_id,
            old.key_id
        );
    }
    if opts.json {
        return json_out(
            &json!({"user": new.user, "key_id": new.key_id, "revoked": old.key_id, "file": path}),
        );
    }
    out::say(&format!(
        "Rotated {}'s key: {} is stored in {}; {} is revoked",
        new.user,
        new.key_id,
        path.display(),
        old.key_id
    ));
    Ok(())
}

/// The credentials document for the key in a `user.create` / `key.rotate` reply.
fn creds_from_reply(v: &Value, api: &str, server_public: Option<&str>) -> Result<UserCredentials> {
    let f = |k: &str| -> Result<String> {
        v[k].as_str()
            .map(str::to_string)
            .ok_or_else(|| anyhow!("the api's reply has no {k}"))
    };
    let curve = match (server_public, v["curve"]["client_public"].as_str()) {
        (Some(sp), Some(cp)) => Some(UserCurve {
            server_public: sp.to_string(),
            client_public: cp.to_string(),
            client_secret: Secret::new(
                v["curve"]["client_secret"]
                    .as_str()
                    .ok_or_else(|| anyhow!("the api's reply has no curve.client_secret"))?,
            ),
        }),
        _ => None,
    };
    Ok(UserCredentials {
        api: api.to_string(),
        user: f("user")?,
        key_id: f("key_id")?,
        secret: Secret::new(f("secret")?),
        curve,
    })
}

/// The newest `num` entries of a list (by `created_at`, newest first), and how
/// many there were in all.
fn newest(list: Vec<Value>, num: u32) -> (Vec<Value>, usize) {
    let total = list.len();
    let mut list = list;
    list.sort_by_key(|v| std::cmp::Reverse(v["created_at"].as_i64().unwrap_or(0)));
    list.truncate(num as usize);
    (list, total)
}

/// Says on stderr that a list was cut to `shown` of `total`.
fn cut_note(shown: usize, total: usize) {
    if shown < total {
        eprintln!("(the newest {shown} of {total}; -n N for more)");
    }
}

pub fn users(opts: &Opts, cmd: Option<UsersCmd>, num: u32) -> Result<()> {
    let mut api = Api::connect(opts)?;
    match cmd {
        None => {
            let v = api.call("user.list", json!({}))?;
            if opts.json {
                return json_out(&v);
            }
            let (mut list, total) = newest(v["users"].as_array().cloned().unwrap_or_default(), num);
            list.sort_by(|a, b| s(&a["name"]).cmp(&s(&b["name"])));
            let mut t = Table::new(&["NAME", "ADMIN", "DISABLED", "KEYS", "CREATED"]);
            for u in &list {
                t.row(vec![
                    s(&u["name"]),
                    yes(&u["admin"]),
                    yes(&u["disabled"]),
                    s(&u["keys"]),
                    u["created_at"].as_i64().map(out::time).unwrap_or_default(),
                ]);
            }
            t.print();
            cut_note(list.len(), total);
        }
        Some(UsersCmd::Create {
            name,
            admin,
            api: endpoint,
        }) => {
            let v = api.call("user.create", json!({"name": name, "admin": admin}))?;
            let server_public = match &api.id {
                Identity::Cluster { cfg, .. } => {
                    cfg.file.curve.as_ref().map(|c| c.server_public.clone())
                }
                Identity::User { creds, .. } => {
                    creds.curve.as_ref().map(|c| c.server_public.clone())
                }
            };
            let endpoint = endpoint.unwrap_or_else(|| api.endpoint.clone());
            if endpoint.contains("://*:") || endpoint.contains("://0.0.0.0:") {
                eprintln!("warning: the api endpoint {endpoint} is a bind address; pass --api tcp://HOST:PORT with the address users reach it by");
            }
            let creds = creds_from_reply(&v, &endpoint, server_public.as_deref())?;
            if opts.json {
                json_out(&serde_json::to_value(&creds)?)?;
            } else {
                out::say(creds.to_toml().trim_end());
            }
            eprintln!(
                "Created user {name}{}. Above are their credentials, shown this once: hand them over privately; they run `paddock login --credentials FILE`.",
                if admin { " (admin)" } else { "" }
            );
        }
        Some(UsersCmd::Revoke { name }) => {
            let v = api.call("user.revoke", json!({"name": name}))?;
            if opts.json {
                return json_out(&v);
            }
            out::say(&format!(
                "Revoked {name}: {} key(s) revoked, the user is disabled",
                s(&v["revoked_keys"])
            ));
        }
    }
    Ok(())
}

fn yes(v: &Value) -> String {
    if v == &Value::Bool(true) { "yes" } else { "no" }.into()
}

// ---- apps -------------------------------------------------------------------

pub fn apps(opts: &Opts, cmd: Option<AppsCmd>, all: bool, num: u32) -> Result<()> {
    match cmd {
        None => {
            let mut api = Api::connect(opts)?;
            let v = api.call("app.list", json!({"all": all}))?;
            if opts.json {
                return json_out(&v);
            }
            let list = v["apps"].as_array().cloned().unwrap_or_default();
            if list.is_empty() {
                println!("You have no apps (create one: paddock apps create NAME)");
                return Ok(());
            }
            let (mut list, total) = newest(list, num);
            list.sort_by(|a, b| s(&a["name"]).cmp(&s(&b["name"])));
            let mut t = Table::new(&["NAME", "OWNER", "ROLE", "RELEASE"]);
            for a in &list {
                t.row(vec![
                    s(&a["name"]),
                    s(&a["owner"]),
                    s(&a["role"]),
                    release_cell(&a["current_release"], &a["latest_release"]),
                ]);
            }
            t.print();
            cut_note(list.len(), total);
        }
        Some(AppsCmd::Create { name }) => {
            let mut api = Api::connect(opts)?;
            let name = name.or_else(|| opts.app.clone());
            let body = match &name {
                Some(n) => json!({"name": n}),
                None => json!({}),
            };
            let v = api.call("app.create", body)?;
            if opts.json {
                return json_out(&v);
            }
            let app = &v["app"];
            let name = s(&app["name"]);
            out::say(&format!("Creating {name}... done"));
            for d in app["domains"].as_array().into_iter().flatten() {
                out::say(&format!("http://{}/", s(d)));
            }
            if let Some(url) = app["git_url"].as_str() {
                out::say(&format!("Git remote: {url}"));
                out::say_err(&format!(
                    "Deploy with git: `git remote add paddock {url}` (or `paddock git remote -a {name}` in your repo), then `git push paddock main`"
                ));
            }
        }
        Some(AppsCmd::Info) => {
            let app = identity::app(opts)?;
            let mut api = Api::connect(opts)?;
            let v = api.call("app.info", json!({"app": app}))?;
            if opts.json {
                return json_out(&v);
            }
            let a = &v["app"];
            out::heading(&s(&a["name"]));
            let list = |k: &str, f: &dyn Fn(&Value) -> String| {
                let items: Vec<String> = a[k].as_array().into_iter().flatten().map(f).collect();
                if items.is_empty() {
                    "-".to_string()
                } else {
                    items.join(", ")
                }
            };
            out::fields(&[
                ("Owner", s(&a["owner"])),
                ("Your role", s(&a["role"])),
                ("Current release", vname(&a["current_release"])),
                ("Latest release", vname(&a["latest_release"])),
                ("Domains", list("domains", &s)),
                ("Git URL", s(&a["git_url"])),
                (
                    "Formation",
                    list("formation", &|f| {
                        format!("{}={}", s(&f["type"]), s(&f["quantity"]))
                    }),
                ),
                (
                    "Collaborators",
                    list("collaborators", &|c| {
                        format!("{} ({})", s(&c["user"]), s(&c["role"]))
                    }),
                ),
                (
                    "Created",
                    a["created_at"].as_i64().map(out::time).unwrap_or_default(),
                ),
            ]);
        }
        Some(AppsCmd::Destroy { confirm }) => {
            let app = match (&opts.app, identity::remote_app()?, &confirm) {
                (Some(a), _, _) => a.clone(),
                (None, Some(a), _) => a,
                (None, None, Some(c)) => c.clone(),
                (None, None, None) => bail!(
                    "no app given: pass -a APP or run inside a git repo with a `paddock` remote"
                ),
            };
            match &confirm {
                Some(c) if *c == app => {}
                Some(c) => bail!(
                    "--confirm {c} does not match the app {app}: nothing was destroyed"
                ),
                None => bail!(
                    "this destroys {app} and everything it has (releases, config, domains, instances) and cannot be undone; to proceed, run: paddock apps destroy -a {app} --confirm {app}"
                ),
            }
            let mut api = Api::connect(opts)?;
            let v = api.call("app.destroy", json!({"app": app, "confirm": app}))?;
            if opts.json {
                return json_out(&v);
            }
            out::say(&format!("Destroying {app}... done"));
        }
    }
    Ok(())
}

fn vname(v: &Value) -> String {
    match v.as_i64() {
        Some(n) => format!("v{n}"),
        None => "-".into(),
    }
}

fn release_cell(current: &Value, latest: &Value) -> String {
    if current == latest {
        vname(current)
    } else {
        format!("{} (latest {})", vname(current), vname(latest))
    }
}

// ---- config, releases, rollback ---------------------------------------------

pub fn config(opts: &Opts, cmd: Option<ConfigCmd>) -> Result<()> {
    let app = identity::app(opts)?;
    let mut api = Api::connect(opts)?;
    match cmd {
        None => {
            let v = api.call("config.get", json!({"app": app}))?;
            if opts.json {
                return json_out(&v);
            }
            out::heading(&format!("{app} Config Vars"));
            out::vars(&v["config"].as_object().cloned().unwrap_or_default());
        }
        Some(ConfigCmd::Get { name }) => {
            let v = api.call("config.get", json!({"app": app, "name": name}))?;
            if opts.json {
                return json_out(&v);
            }
            out::value(v["value"].as_str().unwrap_or_default());
        }
        Some(ConfigCmd::Set { vars }) => {
            let (names, map) = config_vars(&vars, read_stdin_value)?;
            let v = api.call("config.set", json!({"app": app, "vars": map}))?;
            if opts.json {
                return json_out(&v);
            }
            out::say(&format!(
                "Setting {} on {app}... done, {}",
                names.join(", "),
                vname(&v["release"]["version"])
            ));
        }
        Some(ConfigCmd::Unset { names }) => {
            let v = api.call("config.unset", json!({"app": app, "names": names}))?;
            if opts.json {
                return json_out(&v);
            }
            out::say(&format!(
                "Unsetting {} on {app}... done, {}",
                names.join(", "),
                vname(&v["release"]["version"])
            ));
        }
    }
    Ok(())
}

/// `config set`'s arguments as names and a `config.set` vars map: `K=V` is V;
/// `K=@FILE` is FILE's contents and `K=-` stdin's (`read_stdin`), exactly, a
/// trailing newline included; `K=@@…` is `@…` (a value starting with a literal @).
fn config_vars(
    vars: &[String],
    mut read_stdin: impl FnMut(&str) -> Result<String>,
) -> Result<(Vec<String>, serde_json::Map<String, Value>)> {
    let mut map = serde_json::Map::new();
    let mut names = Vec::new();
    let mut stdin_for: Option<&str> = None;
    for kv in vars {
        let (k, val) = kv.split_once('=').ok_or_else(|| {
            anyhow!("`{kv}` is not KEY=VALUE (or KEY=@FILE, KEY=-): nothing was set")
        })?;
        let value = if val == "-" {
            if let Some(first) = stdin_for {
                bail!("both {first}=- and {k}=- read stdin: only one value can come from stdin; use KEY=@FILE for the others (nothing was set)");
            }
            stdin_for = Some(k);
            read_stdin(k)?
        } else if let Some(lit) = val.strip_prefix("@@") {
            format!("@{lit}")
        } else if let Some(file) = val.strip_prefix('@') {
            if file.is_empty() {
                bail!("`{kv}`: name the file after @ (KEY=@FILE), or write KEY=@@ for the value `@` (nothing was set)");
            }
            let bytes = std::fs::read(file)
                .with_context(|| format!("{k}=@{file}: cannot read {file} (nothing was set; a value starting with @ is written @@…)"))?;
            String::from_utf8(bytes).map_err(|_| {
                anyhow!("{k}=@{file}: {file} is not UTF-8 text; config values are text (nothing was set)")
            })?
        } else {
            val.to_string()
        };
        names.push(k.to_string());
        map.insert(k.to_string(), json!(value));
    }
    Ok((names, map))
}

/// The value of `KEY=-`: all of stdin, byte for byte.
fn read_stdin_value(key: &str) -> Result<String> {
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        eprintln!("Type or paste the value of {key}, then press Ctrl-D (twice if it does not end with a newline):");
    }
    let mut bytes = Vec::new();
    stdin
        .lock()
        .read_to_end(&mut bytes)
        .with_context(|| format!("{key}=-: reading stdin"))?;
    String::from_utf8(bytes).map_err(|_| {
        anyhow!("{key}=-: stdin is not UTF-8 text; config values are text (nothing was set)")
    })
}

fn status_cell(r: &Value) -> String {
    let mut st = s(&r["status"]);
    if r["current"] == true {
        st.push_str(", current");
    }
    st
}

pub fn releases(opts: &Opts, cmd: Option<ReleasesCmd>, num: u32) -> Result<()> {
    let app = identity::app(opts)?;
    let mut api = Api::connect(opts)?;
    match cmd {
        None => {
            let v = api.call("release.list", json!({"app": app, "limit": num}))?;
            if opts.json {
                return json_out(&v);
            }
            let list = v["releases"].as_array().cloned().unwrap_or_default();
            let current = list.iter().find(|r| r["current"] == true);
            out::heading(&format!(
                "{app} Releases{}",
                current
                    .map(|r| format!(" - Current: {}", vname(&r["version"])))
                    .unwrap_or_default()
            ));
            let mut t = Table::new(&["VERSION", "DESCRIPTION", "BY", "WHEN", "STATUS"]);
            for r in &list {
                t.row(vec![
                    vname(&r["version"]),
                    s(&r["description"]),
                    s(&r["created_by"]),
                    r["created_at"].as_i64().map(out::time).unwrap_or_default(),
                    status_cell(r),
                ]);
            }
            t.print();
            if list.len() as u32 == num {
                eprintln!("(the latest {num}; -n N for more)");
            }
        }
        Some(ReleasesCmd::Info { version }) => {
            let n = version_arg(&version)?;
            let v = api.call("release.info", json!({"app": app, "version": n}))?;
            if opts.json {
                return json_out(&v);
            }
            let r = &v["release"];
            out::heading(&format!("{app} Release {}", vname(&r["version"])));
            let types = r["process_types"]
                .as_object()
                .map(|m| {
                    m.iter()
                        .map(|(k, c)| format!("{k}: {}", s(c)))
                        .collect::<Vec<_>>()
                        .join("; ")
                })
                .unwrap_or_default();
            out::fields(&[
                ("Description", s(&r["description"])),
                ("By", s(&r["created_by"])),
                (
                    "When",
                    r["created_at"].as_i64().map(out::time).unwrap_or_default(),
                ),
                ("Status", status_cell(r)),
                ("Message", s(&r["status_message"])),
                ("Slug", s(&r["slug"])),
                ("Process types", types),
            ]);
            if let Some(cfg) = r["config"].as_object() {
                out::heading(&format!("{} Config Vars", vname(&r["version"])));
                out::vars(cfg);
            }
        }
    }
    Ok(())
}

pub fn rollback(opts: &Opts, version: Option<String>) -> Result<()> {
    let app = identity::app(opts)?;
    let mut body = json!({"app": app});
    if let Some(v) = &version {
        body["version"] = json!(version_arg(v)?);
    }
    let mut api = Api::connect(opts)?;
    let v = api.call("rollback", body)?;
    if opts.json {
        return json_out(&v);
    }
    let r = &v["release"];
    match version {
        Some(to) => out::say(&format!(
            "Rolling back {app} to v{}... done, {}",
            to.trim_start_matches('v'),
            vname(&r["version"])
        )),
        None => out::say(&format!(
            "Rolling back {app}... done, {} ({})",
            vname(&r["version"]),
            s(&r["description"])
        )),
    }
    Ok(())
}

// ---- formation --------------------------------------------------------------

fn formation_table(list: &Value) {
    let mut t = Table::new(&["TYPE", "QUANTITY", "MEMORY", "PIDS", "COMMAND"]);
    for f in list.as_array().into_iter().flatten() {
        t.row(vec![
            s(&f["type"]),
            s(&f["quantity"]),
            format!("{} MB", s(&f["memory_mb"])),
            s(&f["pids"]),
            s(&f["command"]),
        ]);
    }
    t.print();
}

/// `web=2`, `worker=1:512` → a `formation.scale` change.
fn scale_change(arg: &str) -> Result<Value> {
    let bad = || {
        anyhow!("`{arg}` is not TYPE=QUANTITY or TYPE=QUANTITY:MEMORY_MB (web=2, worker=1:512): nothing was changed")
    };
    let (t, rest) = arg.split_once('=').ok_or_else(bad)?;
    let (qty, mem) = match rest.split_once(':') {
        Some((q, m)) => (q, Some(m)),
        None => (rest, None),
    };
    let mut c = json!({"type": t});
    if !qty.is_empty() {
        c["quantity"] = json!(qty.parse::<u32>().map_err(|_| bad())?);
    }
    if let Some(m) = mem {
        let m = m.trim_end_matches(['M', 'B', 'm', 'b']);
        c["memory_mb"] = json!(m.parse::<u32>().map_err(|_| bad())?);
    }
    if t.is_empty() || c.as_object().is_some_and(|o| o.len() == 1) {
        return Err(bad());
    }
    Ok(c)
}

pub fn ps(opts: &Opts, cmd: Option<PsCmd>) -> Result<()> {
    // `paddock ps` was the operator's list of instances before it moved.
    let app = identity::app(opts).map_err(|e| {
        anyhow!("{e}\n(every instance on every runner, for operators: `paddock instance ps`)")
    })?;
    match cmd {
        None => {
            let mut api = Api::connect(opts)?;
            let v = api.call("formation.get", json!({"app": app}))?;
            let inst = api.call("app.instances", json!({"app": app}));
            if opts.json {
                let mut all = json!({"formation": v["formation"]});
                match &inst {
                    Ok(i) => {
                        all["instances"] = i["instances"].clone();
                        all["unreachable"] = i["unreachable"].clone();
                    }
                    Err(e) => all["instances_error"] = json!(format!("{e:#}")),
                }
                return json_out(&all);
            }
            out::heading(&format!("{app} Formation"));
            let formation = v["formation"].as_array().cloned().unwrap_or_default();
            if formation.is_empty() {
                println!("No process types yet: they come with the first build");
            } else {
                formation_table(&v["formation"]);
            }
            match inst {
                Ok(i) => {
                    let list = i["instances"].as_array().cloned().unwrap_or_default();
                    if !list.is_empty() {
                        println!();
                        out::heading(&format!("{app} Instances"));
                        instances_table(&list, paddock_wire::now_ms());
                    } else if formation.iter().any(|f| f["quantity"].as_i64() > Some(0)) {
                        eprintln!("(no instance of {app} is running)");
                    }
                    unreachable_note(&i["unreachable"]);
                }
                Err(e) => out::say_err(&format!("warning: the instances cannot be listed: {e:#}")),
            }
        }
        Some(PsCmd::Scale { changes, no_wait }) => {
            let list = changes
                .iter()
                .map(|c| scale_change(c))
                .collect::<Result<Vec<_>>>()?;
            let mut api = Api::connect(opts)?;
            let v = api.call("formation.scale", json!({"app": app, "changes": list}))?;
            let now: Vec<String> = v["formation"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|f| {
                    format!(
                        "{} at {}:{}MB",
                        s(&f["type"]),
                        s(&f["quantity"]),
                        s(&f["memory_mb"])
                    )
                })
                .collect();
            // Without a scheduler nothing starts instances: nothing to wait for.
            if v["placement"]["checked"] != true || no_wait {
                if opts.json {
                    return json_out(&v);
                }
                out::say(&format!(
                    "Scaling {app}... done, now running {}",
                    now.join(", ")
                ));
                if v["placement"]["checked"] != true {
                    eprintln!(
                        "(no scheduler is running: nothing starts the instances until one does)"
                    );
                }
                return Ok(());
            }
            let want: Vec<(String, i64)> = list
                .iter()
                .filter_map(|c| c["type"].as_str())
                .filter_map(|t| {
                    let f = v["formation"].as_array()?.iter().find(|f| f["type"] == t)?;
                    Some((t.to_string(), f["quantity"].as_i64()?))
                })
                .collect();
            let done = wait_up(&mut api, &app, &want, Duration::from_secs(30))?;
            if opts.json {
                return json_out(&v);
            }
            out::say(&format!("Scaling {app}... done, {done} up"));
        }
        Some(PsCmd::Restart { process_type }) => {
            let mut body = json!({"app": app});
            if let Some(t) = &process_type {
                body["type"] = json!(t);
            }
            let mut api = Api::connect(opts)?;
            let v = api.call("ps.restart", body)?;
            if opts.json {
                return json_out(&v);
            }
            let what = match &process_type {
                Some(t) => format!("{t} processes"),
                None => "all processes".into(),
            };
            out::say(&format!(
                "Restarting {what} of {app}... done, v{} is redeployed one instance at a time (`paddock deploys info v{}` follows it)",
                s(&v["version"]),
                s(&v["version"])
            ));
        }
    }
    Ok(())
}

/// How many instances of each type are `up`, as `web=2 worker=1`.
fn up_counts(instances: &Value, want: &[(String, i64)]) -> Vec<(String, i64, i64)> {
    want.iter()
        .map(|(t, q)| {
            let up = instances
                .as_array()
                .into_iter()
                .flatten()
                .filter(|i| i["type"] == t.as_str() && i["state"] == "up")
                .count() as i64;
            (t.clone(), up, *q)
        })
        .collect()
}

/// Waits until each type in `want` has exactly its quantity `up`, saying the
/// counts on stderr as they change; `web=4 worker=1` when they do.
fn wait_up(api: &mut Api, app: &str, want: &[(String, i64)], limit: Duration) -> Result<String> {
    let deadline = std::time::Instant::now() + limit;
    let mut said = String::new();
    loop {
        let counts = match api.call("app.instances", json!({"app": app})) {
            Ok(v) => up_counts(&v["instances"], want),
            Err(e) => {
                out::say_err(&format!("warning: {e:#}"));
                vec![]
            }
        };
        let line = counts
            .iter()
            .map(|(t, up, q)| format!("{t}: {up} of {q} up"))
            .collect::<Vec<_>>()
            .join(", ");
        if !counts.is_empty() && counts.iter().all(|(_, up, q)| up == q) {
            return Ok(counts
                .iter()
                .map(|(t, up, _)| format!("{t}={up}"))
                .collect::<Vec<_>>()
                .join(" "));
        }
        if line != said && !line.is_empty() {
            eprintln!("Scaling {app}... {line}");
            said = line;
        }
        if std::time::Instant::now() >= deadline {
            bail!(
                "the new formation of {app} is saved, but after {} s not every instance is up ({said}): `paddock ps` shows them, `paddock logs` what they print",
                limit.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// `3m ago`, `2h ago`…
fn ago(ms: i64, now: i64) -> String {
    let secs = (now - ms).max(0) / 1000;
    match secs {
        s if s < 60 => format!("{s}s ago"),
        s if s < 3600 => format!("{}m ago", s / 60),
        s if s < 86_400 => format!("{}h ago", s / 3600),
        s => format!("{}d ago", s / 86_400),
    }
}

fn instances_table(list: &[Value], now: i64) {
    let mut t = Table::new(&["ID", "TYPE", "RELEASE", "NODE", "STATE", "SINCE"]);
    for i in list {
        let state = match (i["state"].as_str(), i["reason"].as_str()) {
            (Some("crashed"), Some(r)) => format!("crashed: {r}"),
            (Some(st @ ("crashed" | "backoff")), None) => match i["last_exit"]["reason"].as_str() {
                Some(r) => format!("{st}: {r}"),
                None => st.to_string(),
            },
            _ => s(&i["state"]),
        };
        t.row(vec![
            s(&i["id"]),
            s(&i["type"]),
            if i["release"].is_null() {
                "-".into()
            } else {
                vname(&i["release"])
            },
            s(&i["node"]),
            state,
            i["since"]
                .as_i64()
                .map(|t| format!("{} ({})", out::time(t), ago(t, now)))
                .unwrap_or_else(|| "-".into()),
        ]);
    }
    t.print();
}

/// Runners that did not answer: their instances are missing from what was shown.
fn unreachable_note(list: &Value) {
    for u in list.as_array().into_iter().flatten() {
        match u["node"].as_str() {
            Some(node) => out::say_err(&format!(
                "warning: the runner on {node} did not answer: its instances are not shown"
            )),
            None => out::say_err(&format!(
                "warning: {}: no instance is shown",
                s(&u["error"])
            )),
        }
    }
}

// ---- logs, run, open, deploys -------------------------------------------------

/// `2026-12-06 06:10:29.123`
fn log_time(ms: i64) -> String {
    format!("{}.{:03}", &out::time(ms)[..19], ms.rem_euclid(1000))
}

fn print_log_lines(lines: &Value, json: bool) -> Result<()> {
    let tty = out::is_tty();
    for l in lines.as_array().into_iter().flatten() {
        if json {
            println!("{}", out::safe_json(serde_json::to_string(l)?));
        } else {
            let who = format!("{}:", s(&l["instance"]));
            println!(
                "{}",
                out::log_line(
                    &log_time(l["ts"].as_i64().unwrap_or(0)),
                    &who,
                    l["line"].as_str().unwrap_or(""),
                    tty
                )
            );
        }
    }
    Ok(())
}

/// `paddock logs`: the app's instances' lines, merged in time order; with
/// `tail`, then every second what is new, until interrupted.
pub fn logs(opts: &Opts, num: u32, tail: bool, process_type: Option<String>) -> Result<()> {
    let app = identity::app(opts)?;
    let mut api = Api::connect(opts)?;
    let mut body = json!({"app": app, "lines": num});
    if let Some(t) = &process_type {
        body["type"] = json!(t);
    }
    let v = api.call("app.logs", body.clone())?;
    print_log_lines(&v["lines"], opts.json)?;
    unreachable_note(&v["unreachable"]);
    if !tail {
        return Ok(());
    }
    let mut cursor = v["cursor"].clone();
    let mut failing_since: Option<std::time::Instant> = None;
    loop {
        std::thread::sleep(Duration::from_secs(1));
        body["cursor"] = cursor.clone();
        body["lines"] = json!(1000);
        match api.call("app.logs", body.clone()) {
            Ok(v) => {
                failing_since = None;
                print_log_lines(&v["lines"], opts.json)?;
                if v["truncated"] == true {
                    eprintln!(
                        "(some lines came faster than they could be shown and were left out)"
                    );
                }
                cursor = v["cursor"].clone();
            }
            // A moment without the api (a restart) is waited out.
            Err(e) => match failing_since {
                Some(t) if t.elapsed() > Duration::from_secs(30) => return Err(e),
                Some(_) => {}
                None => {
                    out::say_err(&format!("warning: {e:#}; still trying"));
                    failing_since = Some(std::time::Instant::now());
                }
            },
        }
    }
}

/// `paddock run`: a one-off command on the app's current release, on a
/// terminal (`--no-tty`: none); returns its exit status.
pub fn run(opts: &Opts, no_tty: bool, command: Vec<String>) -> Result<i32> {
    let app = identity::app(opts)?;
    tty::catch_stop();
    let mut api = Api::connect(opts)?;
    let (cols, rows) = tty::term_size();
    let (line, argv) = tty::command_fields(&command);
    let mut body = json!({"app": app, "pty": !no_tty, "cols": cols, "rows": rows});
    match argv {
        Some(a) => body["argv"] = json!(a),
        None => body["command"] = json!(line),
    }
    // The first one-off of a release on a node waits for its slug.
    api.set_timeout(opts.timeout.max(Duration::from_secs(130)));
    let v = api.call("run.start", body)?;
    let id = v["id"]
        .as_str()
        .context("the api's run.start reply has no id")?
        .to_string();
    out::say_err(&format!(
        "Running `{}` on {app}... up, {id} (v{} on {})",
        command.join(" "),
        s(&v["release"]),
        s(&v["node"])
    ));
    // Each run.output waits up to OUTPUT_WAIT_MS at the runner.
    api.set_timeout(
        opts.timeout + Duration::from_millis(tty::OUTPUT_WAIT_MS) + Duration::from_secs(3),
    );
    let connect = api.connector(opts.timeout);
    tty::attach(Box::new(api), &id, !no_tty, connect)
}

/// `paddock open`: the app's web address.
pub fn open(opts: &Opts) -> Result<()> {
    let app = identity::app(opts)?;
    let mut api = Api::connect(opts)?;
    let v = api.call("app.info", json!({"app": app}))?;
    let Some(url) = v["app"]["web_url"].as_str() else {
        bail!("{app} has no domain to open: add one with `paddock domains add HOST -a {app}`");
    };
    if opts.json {
        return json_out(&json!({ "url": url }));
    }
    out::say(url);
    Ok(())
}

fn outcome_cell(d: &Value) -> String {
    match d["outcome"].as_str() {
        Some("rolled_back") => "rolled back".into(),
        Some(o) => o.into(),
        None => "running".into(),
    }
}

fn deploy_duration(d: &Value) -> String {
    match (d["started_at"].as_i64(), d["finished_at"].as_i64()) {
        (Some(a), Some(b)) => duration((b - a).max(0)),
        _ => "-".into(),
    }
}

/// `paddock deploys`: each deploy's outcome and times; `deploys info vN`: its trail.
pub fn deploys(opts: &Opts, cmd: Option<DeploysCmd>, num: u32) -> Result<()> {
    let app = identity::app(opts)?;
    let mut api = Api::connect(opts)?;
    match cmd {
        None => {
            let v = api.call(
                "deploy.list",
                json!({"app": app, "limit": num.clamp(1, 100)}),
            )?;
            if opts.json {
                return json_out(&v);
            }
            let list = v["deploys"].as_array().cloned().unwrap_or_default();
            out::heading(&format!("{app} Deploys"));
            if list.is_empty() {
                println!("No deploys yet: a push, a config change or a rollback makes one");
                return Ok(());
            }
            let mut t = Table::new(&["RELEASE", "OUTCOME", "STARTED", "DURATION", "ALERTS"]);
            for d in &list {
                t.row(vec![
                    vname(&d["version"]),
                    outcome_cell(d),
                    d["started_at"].as_i64().map(out::time).unwrap_or_default(),
                    deploy_duration(d),
                    s(&d["alerts"]),
                ]);
            }
            t.print();
            if list.len() as u32 == num {
                eprintln!("(the latest {num}; -n N for more)");
            }
        }
        Some(DeploysCmd::Info { version }) => {
            let n = version_arg(&version)?;
            let v = api.call("deploy.info", json!({"app": app, "version": n}))?;
            if opts.json {
                return json_out(&v);
            }
            let d = &v["deploy"];
            out::heading(&format!("{app} Deploy v{n}"));
            out::fields(&[
                ("Outcome", outcome_cell(d)),
                (
                    "Started",
                    d["started_at"].as_i64().map(out::time).unwrap_or_default(),
                ),
                (
                    "Finished",
                    d["finished_at"]
                        .as_i64()
                        .map(out::time)
                        .unwrap_or_else(|| "-".into()),
                ),
                ("Duration", deploy_duration(d)),
                ("Runs", s(&d["runs"])),
            ]);
            out::heading("Trail");
            for l in d["lines"].as_array().into_iter().flatten() {
                let mark = if l["kind"] == "alert" { "ALERT " } else { "" };
                out::say(&format!(
                    "{} {mark}{}",
                    log_time(l["at"].as_i64().unwrap_or(0)),
                    out::escape(l["line"].as_str().unwrap_or(""), false)
                ));
            }
        }
    }
    Ok(())
}

// ---- domains, access --------------------------------------------------------

pub fn domains(opts: &Opts, cmd: Option<DomainsCmd>) -> Result<()> {
    let app = identity::app(opts)?;
    let mut api = Api::connect(opts)?;
    match cmd {
        None => {
            let v = api.call("domain.list", json!({"app": app}))?;
            if opts.json {
                return json_out(&v);
            }
            out::heading(&format!("{app} Domains"));
            for d in v["domains"].as_array().into_iter().flatten() {
                if d["default"] == true {
                    out::say(&format!("{} (default)", s(&d["domain"])));
                } else {
                    out::say(&s(&d["domain"]));
                }
            }
        }
        Some(DomainsCmd::Add { domain }) => {
            let v = api.call("domain.add", json!({"app": app, "domain": domain}))?;
            if opts.json {
                return json_out(&v);
            }
            out::say(&format!("Adding {domain} to {app}... done"));
        }
        Some(DomainsCmd::Remove { domain }) => {
            let v = api.call("domain.remove", json!({"app": app, "domain": domain}))?;
            if opts.json {
                return json_out(&v);
            }
            out::say(&format!("Removing {domain} from {app}... done"));
        }
    }
    Ok(())
}

pub fn access(opts: &Opts, cmd: Option<AccessCmd>) -> Result<()> {
    let app = identity::app(opts)?;
    let mut api = Api::connect(opts)?;
    match cmd {
        None => {
            let v = api.call("access.list", json!({"app": app}))?;
            if opts.json {
                return json_out(&v);
            }
            out::heading(&format!("{app} Access List"));
            let mut t = Table::new(&["USER", "ROLE"]);
            for a in v["access"].as_array().into_iter().flatten() {
                t.row(vec![s(&a["user"]), s(&a["role"])]);
            }
            t.print();
        }
        Some(AccessCmd::Add { user, role }) => {
            let v = api.call(
                "access.add",
                json!({"app": app, "user": user, "role": role}),
            )?;
            if opts.json {
                return json_out(&v);
            }
            out::say(&format!("Adding {user} to {app} as {role}... done"));
        }
        Some(AccessCmd::Remove { user }) => {
            let v = api.call("access.remove", json!({"app": app, "user": user}))?;
            if opts.json {
                return json_out(&v);
            }
            out::say(&format!("Removing {user} from {app}... done"));
        }
    }
    Ok(())
}

// ---- SSH keys -----------------------------------------------------------------

fn default_ssh_key() -> Result<PathBuf> {
    let home = std::env::var_os("HOME")
        .ok_or_else(|| anyhow!("$HOME is not set: name the key file, paddock keys add FILE"))?;
    Ok(Path::new(&home).join(".ssh/id_ed25519.pub"))
}

pub fn keys(opts: &Opts, cmd: Option<KeysCmd>, num: u32) -> Result<()> {
    match cmd {
        None => {
            let mut api = Api::connect(opts)?;
            let v = api.call("sshkey.list", json!({}))?;
            if opts.json {
                return json_out(&v);
            }
            let list = v["keys"].as_array().cloned().unwrap_or_default();
            if list.is_empty() {
                println!("You have no SSH keys (add one: paddock keys add ~/.ssh/id_ed25519.pub)");
                return Ok(());
            }
            let (list, total) = newest(list, num);
            let mut t = Table::new(&["FINGERPRINT", "ALGORITHM", "COMMENT", "ADDED"]);
            for k in &list {
                t.row(vec![
                    s(&k["fingerprint"]),
                    s(&k["algorithm"]),
                    s(&k["comment"]),
                    k["created_at"].as_i64().map(out::time).unwrap_or_default(),
                ]);
            }
            t.print();
            cut_note(list.len(), total);
        }
        Some(KeysCmd::Add { file }) => {
            let file = match file {
                Some(f) => f,
                None => default_ssh_key()?,
            };
            let text = std::fs::read_to_string(&file).map_err(|e| {
                anyhow!("cannot read {}: {e} (make a key with `ssh-keygen -t ed25519`, or name the public key file)", file.display())
            })?;
            if text.contains("PRIVATE KEY") {
                bail!(
                    "{} is a private key: add the public half ({}.pub); never hand out the private key",
                    file.display(),
                    file.display()
                );
            }
            let mut api = Api::connect(opts)?;
            let v = api.call("sshkey.add", json!({"public_key": text.trim()}))?;
            if opts.json {
                return json_out(&v);
            }
            out::say(&format!(
                "Uploading SSH key {}... done, {} ({})",
                file.display(),
                s(&v["fingerprint"]),
                s(&v["algorithm"])
            ));
        }
        Some(KeysCmd::Remove { fingerprint }) => {
            let mut api = Api::connect(opts)?;
            let v = api.call("sshkey.remove", json!({"fingerprint": fingerprint}))?;
            if opts.json {
                return json_out(&v);
            }
            out::say(&format!("Removing SSH key {fingerprint}... done"));
        }
    }
    Ok(())
}

// ---- git, builds ------------------------------------------------------------

/// `git ARGS` in the current directory; its stdout, or an error with its stderr.
fn git(args: &[&str]) -> Result<std::process::Output> {
    std::process::Command::new("git")
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| anyhow!("cannot run git ({e}): is git installed?"))
}

pub fn git_remote(opts: &Opts, cmd: GitCmd) -> Result<()> {
    let GitCmd::Remote { remote } = cmd;
    let app = identity::app(opts)?;
    let inside = git(&["rev-parse", "--git-dir"])?;
    if !inside.status.success() {
        bail!("this directory is not in a git repository: run `paddock git remote` inside your app's repository (or `git init` first)");
    }
    let mut api = Api::connect(opts)?;
    let v = api.call("app.info", json!({"app": app}))?;
    let Some(url) = v["app"]["git_url"].as_str() else {
        bail!("the cluster names no git server for its apps ([daemons.gitserver] ssh in the api's cluster file): ask your operator");
    };
    let exists = git(&["remote", "get-url", &remote])?.status.success();
    let verb = if exists { "set-url" } else { "add" };
    let o = git(&["remote", verb, &remote, url])?;
    if !o.status.success() {
        bail!(
            "git remote {verb} {remote} {url} failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    if opts.json {
        return json_out(&json!({"app": app, "remote": remote, "url": url, "updated": exists}));
    }
    out::say(&format!(
        "{} git remote {remote} to {url}: deploy {app} with `git push {remote} main`",
        if exists { "Set" } else { "Added" }
    ));
    Ok(())
}

/// `1m 05s`, `12.3s`, `450ms` for a duration in milliseconds.
fn duration(ms: i64) -> String {
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        format!("{:.1}s", ms as f64 / 1000.0)
    } else {
        format!("{}m {:02}s", ms / 60_000, ms % 60_000 / 1000)
    }
}

/// A build's duration: finished − started, or `running` while it runs.
fn build_duration(b: &Value) -> String {
    match (b["started_at"].as_i64(), b["finished_at"].as_i64()) {
        (Some(st), Some(fin)) => duration((fin - st).max(0)),
        (Some(_), None) => "running".into(),
        _ => "-".into(),
    }
}

/// The first 7 characters of a commit id.
fn short_commit(v: &Value) -> String {
    match v.as_str() {
        Some(c) => c.chars().take(7).collect(),
        None => "-".into(),
    }
}

/// The release a build made: a version, or the release itself (`{"version", …}`).
fn build_release(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::Number(_) => vname(v),
        Value::Object(m) => m.get("version").map(vname).unwrap_or_else(|| "-".into()),
        other => s(other),
    }
}

/// A failed build's error: its message (the deployer writes `{"step", "message"}`).
fn build_error(v: &Value) -> String {
    match v {
        Value::Object(m) => m.get("message").map(s).unwrap_or_else(|| v.to_string()),
        other => s(other),
    }
}

/// `durations` as `fetch 1.2s, compile 30.0s`: an object of step → ms, or a
/// list of `{"step", "ms"}`.
fn step_durations(v: &Value) -> String {
    let parts: Vec<String> = match v {
        Value::Object(m) => m
            .iter()
            .map(|(k, ms)| match ms.as_i64() {
                Some(n) => format!("{k} {}", duration(n)),
                None => format!("{k} {}", s(ms)),
            })
            .collect(),
        Value::Array(a) => a
            .iter()
            .map(|d| {
                let step = d["step"].as_str().or(d["name"].as_str()).unwrap_or("?");
                match d["ms"].as_i64().or(d["duration_ms"].as_i64()) {
                    Some(n) => format!("{step} {}", duration(n)),
                    None => step.to_string(),
                }
            })
            .collect(),
        _ => vec![],
    };
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(", ")
    }
}

fn build_status(b: &Value) -> String {
    let st = s(&b["status"]);
    match b["step"].as_str() {
        Some(step) if !step.is_empty() && b["finished_at"].is_null() => format!("{st} ({step})"),
        _ => st,
    }
}

pub fn builds(opts: &Opts, cmd: Option<BuildsCmd>, num: u32) -> Result<()> {
    let app = identity::app(opts)?;
    let mut api = Api::connect(opts)?;
    match cmd {
        None => {
            let v = api.call("build.list", json!({"app": app, "limit": num}))?;
            if opts.json {
                return json_out(&v);
            }
            let list = v["builds"].as_array().cloned().unwrap_or_default();
            out::heading(&format!("{app} Builds"));
            if list.is_empty() {
                println!("No builds yet: push your code with `git push paddock main` (`paddock git remote` adds the remote)");
                return Ok(());
            }
            let mut t = Table::new(&[
                "ID", "STATUS", "COMMIT", "PUSHER", "STARTED", "DURATION", "RELEASE",
            ]);
            for b in &list {
                t.row(vec![
                    s(&b["id"]),
                    build_status(b),
                    short_commit(&b["commit"]),
                    s(&b["pusher"]),
                    b["started_at"].as_i64().map(out::time).unwrap_or_default(),
                    build_duration(b),
                    build_release(&b["release"]),
                ]);
            }
            t.print();
            if list.len() as u32 == num {
                eprintln!("(the latest {num}; -n N for more)");
            }
        }
        Some(BuildsCmd::Info { id }) => {
            let v = api.call("build.info", json!({"app": app, "build": id}))?;
            if opts.json {
                return json_out(&v);
            }
            let b = &v["build"];
            out::heading(&format!("{app} Build {}", s(&b["id"])));
            out::fields(&[
                ("Status", s(&b["status"])),
                ("Step", s(&b["step"])),
                ("Commit", s(&b["commit"])),
                ("Pusher", s(&b["pusher"])),
                (
                    "Started",
                    b["started_at"].as_i64().map(out::time).unwrap_or_default(),
                ),
                (
                    "Finished",
                    b["finished_at"]
                        .as_i64()
                        .map(out::time)
                        .unwrap_or_else(|| "-".into()),
                ),
                ("Duration", build_duration(b)),
                ("Steps", step_durations(&b["durations"])),
                ("Release", build_release(&b["release"])),
                ("Error", build_error(&b["error"])),
            ]);
            let log = if b.get("log").is_some() {
                &b["log"]
            } else {
                &v["log"]
            };
            out::heading("Log");
            print_log(log);
        }
    }
    Ok(())
}

/// A build's log (text, or a list of lines or `{"line"}` objects); escaped on a
/// terminal like all of the api's text, line by line.
fn print_log(log: &Value) {
    match log {
        Value::String(text) => {
            for line in text.lines() {
                println!("{}", out::term(line));
            }
        }
        Value::Array(lines) => {
            for l in lines {
                let line = match l {
                    Value::String(t) => t.clone(),
                    other => other["line"]
                        .as_str()
                        .or(other["text"].as_str())
                        .map(str::to_string)
                        .unwrap_or_else(|| other.to_string()),
                };
                for part in line.lines() {
                    println!("{}", out::term(part));
                }
            }
        }
        _ => println!("(no log)"),
    }
}

// ---- buildpacks (operator) ----------------------------------------------------

/// The api, with the cluster file's key: buildpack kinds are the cluster's.
fn cluster_api(opts: &Opts) -> Result<(paddock_config::ClusterConfig, Client)> {
    let cfg = identity::cluster(opts)?;
    let ep = cluster::find(&cfg, "api", None, opts.timeout).context(
        "finding the api (its [daemons.api] rpc in the cluster file, else the registry)",
    )?;
    let c = cluster::client(&cfg, &ep, opts.timeout)?;
    Ok((cfg, c))
}

fn cluster_call(c: &mut Client, kind: &str, body: Value) -> Result<Value> {
    c.call(kind, body).map_err(|e| match e {
        ClientError::Remote(w) => anyhow!("{}", w.message),
        other => anyhow!(other),
    })
}

/// A buildpack as a tar.gz file: PATH itself when it is a file, else the
/// directory packed (by the system's tar) into a temp file that `TempFile` removes.
fn packed(path: &Path) -> Result<(PathBuf, Option<TempFile>)> {
    let meta =
        std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    if meta.is_file() {
        return Ok((path.to_path_buf(), None));
    }
    if !path.join("bin/compile").exists() {
        bail!(
            "{} has no bin/compile: a buildpack directory has bin/detect, bin/compile (and bin/release)",
            path.display()
        );
    }
    let tmp = TempFile(std::env::temp_dir().join(format!(
        "paddock-buildpack-{}-{}.tgz",
        std::process::id(),
        paddock_wire::now_ms()
    )));
    let o = std::process::Command::new("tar")
        .arg("--numeric-owner")
        .args(["--owner=0", "--group=0", "-czf"])
        .arg(&tmp.0)
        .arg("-C")
        .arg(path)
        .arg(".")
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| anyhow!("cannot run tar to pack {} ({e})", path.display()))?;
    if !o.status.success() {
        bail!(
            "tar could not pack {}: {}",
            path.display(),
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    Ok((tmp.0.clone(), Some(tmp)))
}

/// A file removed when dropped.
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

pub fn buildpacks(opts: &Opts, cmd: Option<BuildpacksCmd>) -> Result<()> {
    let (cfg, mut c) = cluster_api(opts)?;
    match cmd {
        None => {
            let v = cluster_call(&mut c, "buildpack.list", json!({}))?;
            if opts.json {
                return json_out(&v);
            }
            let list = v["buildpacks"].as_array().cloned().unwrap_or_default();
            if list.is_empty() {
                println!("No buildpacks recorded (add one: paddock buildpacks add NAME DIR)");
                return Ok(());
            }
            let mut t = Table::new(&["NAME", "BLOB", "URL", "BY", "ADDED"]);
            for b in &list {
                t.row(vec![
                    s(&b["name"]),
                    s(&b["blob"]),
                    s(&b["url"]),
                    s(&b["created_by"]),
                    b["created_at"].as_i64().map(out::time).unwrap_or_default(),
                ]);
            }
            t.print();
        }
        Some(BuildpacksCmd::Add { name, path, url }) => {
            // Checked before the upload, so a refused name leaves no blob behind.
            if !(1..=40).contains(&name.len())
                || !name
                    .bytes()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
            {
                bail!("buildpack name {name:?} is not valid: use 1-40 characters of a-z, 0-9 and '-' (nothing was uploaded)");
            }
            let (file, _tmp) = packed(&path)?;
            let blob = upload_blob(&cfg, &file, opts.timeout)?;
            let mut body = json!({"name": name, "blob": blob});
            if let Some(u) = &url {
                body["url"] = json!(u);
            }
            let v = cluster_call(&mut c, "buildpack.add", body)?;
            if opts.json {
                return json_out(&v);
            }
            out::say(&format!(
                "Adding buildpack {name}... done, {blob}{}; apps use it with BUILDPACK_URL=paddock:{name}",
                match v["replaced"].as_str() {
                    Some(old) => format!(" (replaces {old})"),
                    None => String::new(),
                }
            ));
        }
        Some(BuildpacksCmd::Remove { name }) => {
            let v = cluster_call(&mut c, "buildpack.remove", json!({ "name": name }))?;
            if opts.json {
                return json_out(&v);
            }
            out::say(&format!("Removing buildpack {name}... done"));
        }
    }
    Ok(())
}

/// Puts `file` into a blobstore (this node's, else the registry's newest alive
/// one; a pair copies it to its peer before answering); its sha256.
fn upload_blob(
    cfg: &paddock_config::ClusterConfig,
    file: &Path,
    timeout: Duration,
) -> Result<String> {
    let ep = cluster::find(cfg, "blobstore", None, timeout).context(
        "finding a blobstore (its [daemons.blobstore] rpc in the cluster file, else the registry)",
    )?;
    let mut c = cluster::client(cfg, &ep, timeout)?;
    let stored = paddock_blob::put_file_blocking(&mut c, file)
        .map_err(|e| anyhow!(e))
        .with_context(|| format!("uploading {} to the blobstore at {ep}", file.display()))?;
    Ok(stored.sha256)
}

// ---- audit ------------------------------------------------------------------

pub fn audit(opts: &Opts, num: u32, user: Option<String>) -> Result<()> {
    // The app when one is named or the repo has a `paddock` remote; else the
    // caller's own entries (an admin's: everyone's).
    let app = match &opts.app {
        Some(a) => Some(a.clone()),
        None => identity::remote_app()?,
    };
    let mut body = json!({"limit": num});
    if let Some(a) = &app {
        body["app"] = json!(a);
    }
    if let Some(u) = &user {
        body["user"] = json!(u);
    }
    let mut api = Api::connect(opts)?;
    let v = api.call("audit.list", body)?;
    if opts.json {
        return json_out(&v);
    }
    let list = v["entries"].as_array().cloned().unwrap_or_default();
    out::heading(&match &app {
        Some(a) => format!("{a} Audit Log"),
        None => "Audit Log".into(),
    });
    let mut t = Table::new(&["WHEN", "ACTOR", "KIND", "APP", "DETAIL"]);
    for e in &list {
        t.row(vec![
            e["at"].as_i64().map(out::time).unwrap_or_default(),
            s(&e["actor"]),
            s(&e["kind"]),
            s(&e["app"]),
            match &e["detail"] {
                Value::Object(m) if m.is_empty() => String::new(),
                d => d.to_string(),
            },
        ]);
    }
    t.print();
    if list.len() as u32 == num {
        eprintln!("(the latest {num}; -n N for more)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scale_arguments() {
        assert_eq!(
            scale_change("web=2").unwrap(),
            json!({"type": "web", "quantity": 2})
        );
        assert_eq!(
            scale_change("worker=1:512").unwrap(),
            json!({"type": "worker", "quantity": 1, "memory_mb": 512})
        );
        assert_eq!(
            scale_change("web=:1024MB").unwrap(),
            json!({"type": "web", "memory_mb": 1024})
        );
        for bad in ["web", "web=", "=2", "web=two", "web=2:big"] {
            assert!(scale_change(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn config_values_from_files_stdin_and_literal_at() {
        let dir = std::env::temp_dir().join(format!("paddock-config-vars-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("secret");
        std::fs::write(&f, "s3cret\n").unwrap();
        let args: Vec<String> = [
            "A=1".to_string(),
            format!("B=@{}", f.display()),
            "C=-".into(),
            "D=@@handle".into(),
            "E=@@".into(),
            "F=x=y".into(),
        ]
        .into();
        let mut asked = Vec::new();
        let (names, map) = config_vars(&args, |k| {
            asked.push(k.to_string());
            Ok("from\nstdin".into())
        })
        .unwrap();
        assert_eq!(names, ["A", "B", "C", "D", "E", "F"]);
        assert_eq!(
            Value::Object(map),
            json!({"A": "1", "B": "s3cret\n", "C": "from\nstdin", "D": "@handle", "E": "@", "F": "x=y"})
        );
        assert_eq!(asked, ["C"]);

        let stdin = |_: &str| Ok(String::new());
        let e = config_vars(&["A=-".into(), "B=-".into()], stdin).unwrap_err();
        assert!(
            e.to_string().contains("only one value can come from stdin"),
            "{e}"
        );
        let e = config_vars(&["A=@".into()], stdin).unwrap_err();
        assert!(e.to_string().contains("KEY=@FILE"), "{e}");
        let missing = format!("A=@{}", dir.join("nope").display());
        let e = config_vars(&[missing], stdin).unwrap_err();
        assert!(format!("{e:#}").contains("cannot read"), "{e:#}");
        std::fs::write(&f, b"\xff\xfe").unwrap();
        let e = config_vars(&[format!("A=@{}", f.display())], stdin).unwrap_err();
        assert!(e.to_string().contains("not UTF-8"), "{e}");
        assert!(config_vars(&["NOEQUALS".into()], stdin).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn json_output_escapes_del_and_c1() {
        let v = json!({"d": "a\u{1b}[2J\u{7f}\u{9b}31m\u{85}\tz", "n": 1});
        let text = json_text(&v).unwrap();
        assert!(!text.chars().any(|c| c.is_control() && c != '\n'), "{text}");
        assert!(
            text.contains(r#""a\u001b[2J\u007f\u009b31m\u0085\tz""#),
            "{text}"
        );
        assert_eq!(serde_json::from_str::<Value>(&text).unwrap(), v);
    }

    #[test]
    fn build_cells() {
        assert_eq!(duration(450), "450ms");
        assert_eq!(duration(12_345), "12.3s");
        assert_eq!(duration(65_000), "1m 05s");
        let done = json!({"status": "succeeded", "step": "release", "started_at": 1000,
                          "finished_at": 43_000, "commit": "3f2a1c0d9e8b", "release": 7});
        assert_eq!(build_duration(&done), "42.0s");
        assert_eq!(build_status(&done), "succeeded");
        assert_eq!(short_commit(&done["commit"]), "3f2a1c0");
        assert_eq!(build_release(&done["release"]), "v7");
        let running = json!({"status": "running", "step": "compile", "started_at": 1000});
        assert_eq!(build_duration(&running), "running");
        assert_eq!(build_status(&running), "running (compile)");
        assert_eq!(build_release(&running["release"]), "-");
        assert_eq!(build_release(&json!({"version": 9, "slug": "x"})), "v9");
        assert_eq!(
            build_error(&json!({"step": "compile", "message": "pip failed"})),
            "pip failed"
        );
        assert_eq!(build_error(&Value::Null), "-");
        assert_eq!(
            step_durations(&json!({"source": 300, "compile": 30_000})),
            "compile 30.0s, source 300ms"
        );
        assert_eq!(
            step_durations(&json!([{"step": "detect", "ms": 20}])),
            "detect 20ms"
        );
        assert_eq!(step_durations(&Value::Null), "-");
    }

    #[test]
    fn versions() {
        assert_eq!(version_arg("v7").unwrap(), 7);
        assert_eq!(version_arg("7").unwrap(), 7);
        assert!(version_arg("v0").is_err());
        assert!(version_arg("latest").is_err());
    }
}
