//! `paddock`: the customer's and the operator's command line.

mod api;
mod balancer;
mod cluster;
mod dev;
mod identity;
mod out;
mod runner;
mod tty;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "paddock",
    version,
    about = "Drive a Paddock cluster: your apps (as a customer) or the cluster (as its operator)",
    after_help = "Who signs: --config FILE, else $PADDOCK_CONFIG, else your credentials file \
                  ($XDG_CONFIG_HOME/paddock/credentials, written by `paddock login`), else \
                  /etc/paddock/paddock.toml, else ./.paddock-dev/paddock.toml. \
                  The app: -a APP, else the app of the git remote named `paddock`."
)]
struct Cli {
    /// A cluster file (the operator's) or a credentials file (a user's); see below
    /// for what is used without it.
    #[arg(long, short = 'c', global = true)]
    config: Option<PathBuf>,
    /// The app (default: the app of the git remote named `paddock` in this repo).
    #[arg(
        short = 'a',
        long = "app",
        id = "global_app",
        value_name = "APP",
        global = true
    )]
    app: Option<String>,
    /// Print JSON instead of tables and sentences.
    #[arg(long, global = true)]
    json: bool,
    /// How long to wait for a daemon's reply, in milliseconds.
    #[arg(long, global = true, default_value_t = 5000)]
    timeout_ms: u64,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Store your credentials (the document your operator gave you) for later commands.
    Login {
        /// The credentials document (default: read it from stdin).
        #[arg(long, value_name = "FILE")]
        credentials: Option<PathBuf>,
    },
    /// Forget your stored credentials.
    Logout,
    /// Who this command signs as.
    Whoami,
    /// Your user key.
    Auth {
        #[command(subcommand)]
        cmd: api::AuthCmd,
    },
    /// Your apps (no verb), or create, show, destroy one.
    Apps {
        /// Every app in the cluster (admins).
        #[arg(long)]
        all: bool,
        /// How many to show (the newest first).
        #[arg(short = 'n', long = "num", default_value_t = api::LIST_DEFAULT)]
        num: u32,
        #[command(subcommand)]
        cmd: Option<api::AppsCmd>,
    },
    /// The app's config vars (no verb), or get, set, unset them.
    Config {
        #[command(subcommand)]
        cmd: Option<api::ConfigCmd>,
    },
    /// The app's releases, newest first (no verb), or one release.
    Releases {
        /// How many to show.
        #[arg(short = 'n', long = "num", default_value_t = api::LIST_DEFAULT)]
        num: u32,
        #[command(subcommand)]
        cmd: Option<api::ReleasesCmd>,
    },
    /// Make a new release from vN's code and config (default: the one before the current).
    Rollback {
        /// vN
        version: Option<String>,
    },
    /// The app's formation and its instances (no verb), or scale or restart them.
    Ps {
        #[command(subcommand)]
        cmd: Option<api::PsCmd>,
    },
    /// The output of the app's instances, merged in time order (-t: keep following).
    Logs {
        /// How many of the latest lines to show.
        #[arg(short = 'n', long = "num", default_value_t = 100)]
        num: u32,
        /// Keep printing new lines, until interrupted.
        #[arg(short = 't', long = "tail")]
        tail: bool,
        /// Only this process type's instances (web, worker…).
        #[arg(long = "ps", value_name = "TYPE")]
        process_type: Option<String>,
    },
    /// Run a one-off command on the app's current release, on a terminal;
    /// exits with the command's status. Options go before the command.
    Run {
        /// No terminal: stdin is not read, output is passed through as it comes
        /// (for scripts).
        #[arg(long)]
        no_tty: bool,
        /// One word: a shell command line ('rake db:migrate && echo ok'). Several:
        /// the program and its arguments, exec'd as given.
        #[arg(
            required = true,
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "COMMAND"
        )]
        command: Vec<String>,
    },
    /// Print the app's web address.
    Open,
    /// The app's deploys, newest first (no verb), or one deploy's trail.
    Deploys {
        /// How many to show.
        #[arg(short = 'n', long = "num", default_value_t = api::LIST_DEFAULT)]
        num: u32,
        #[command(subcommand)]
        cmd: Option<api::DeploysCmd>,
    },
    /// The app's domains (no verb), or add, remove one.
    Domains {
        #[command(subcommand)]
        cmd: Option<api::DomainsCmd>,
    },
    /// Who may use the app (no verb), or add, remove a collaborator.
    Access {
        #[command(subcommand)]
        cmd: Option<api::AccessCmd>,
    },
    /// Your SSH public keys, for git push (no verb), or add, remove one.
    Keys {
        /// How many to show (the newest first).
        #[arg(short = 'n', long = "num", default_value_t = api::LIST_DEFAULT)]
        num: u32,
        #[command(subcommand)]
        cmd: Option<api::KeysCmd>,
    },
    /// The audit log: the app's (-a or the git remote), else your own entries.
    Audit {
        /// How many entries to show.
        #[arg(short = 'n', long = "num", default_value_t = api::LIST_DEFAULT)]
        num: u32,
        /// Only this user's entries.
        #[arg(long)]
        user: Option<String>,
    },
    /// Git: point a remote of this repository at the app (`git remote`).
    Git {
        #[command(subcommand)]
        cmd: api::GitCmd,
    },
    /// The app's builds, newest first (no verb), or one build with its log.
    Builds {
        /// How many to show.
        #[arg(short = 'n', long = "num", default_value_t = api::LIST_DEFAULT)]
        num: u32,
        #[command(subcommand)]
        cmd: Option<api::BuildsCmd>,
    },
    /// Buildpacks in the blobstore (operator): list them (no verb), add, remove one.
    Buildpacks {
        #[command(subcommand)]
        cmd: Option<api::BuildpacksCmd>,
    },
    /// Users (operator): list them (no verb), create one, revoke one.
    Users {
        /// How many to show (the newest first).
        #[arg(short = 'n', long = "num", default_value_t = api::LIST_DEFAULT)]
        num: u32,
        #[command(subcommand)]
        cmd: Option<api::UsersCmd>,
    },
    /// App instances on runners (operator): ps, run, start, stop, restart, reload, logs.
    Instance {
        #[command(subcommand)]
        cmd: runner::InstanceCmd,
    },
    /// A local cluster on this machine, for development.
    Dev {
        #[command(subcommand)]
        cmd: dev::DevCmd,
    },
    /// Every daemon the heartbeat registry knows, with its state.
    Status,
    /// Ping a daemon (by name; this node's, else the first alive in the registry).
    Ping {
        daemon: String,
        /// Ping the daemon on this node.
        #[arg(long)]
        node: Option<String>,
    },
    /// Named leases held by the locker.
    Lock {
        #[command(subcommand)]
        cmd: cluster::LockCmd,
    },
    /// The balancer's routes: list them (no verb), set, remove, add/drain/remove backends.
    Routes {
        /// The balancer on this node (default: this node's, else the newest alive one).
        #[arg(long, global = true)]
        node: Option<String>,
        #[command(subcommand)]
        cmd: Option<balancer::RoutesCmd>,
    },
    /// The balancer itself: stats, upgrade in place.
    Balancer {
        /// The balancer on this node (default: this node's, else the newest alive one).
        #[arg(long, global = true)]
        node: Option<String>,
        #[command(subcommand)]
        cmd: balancer::BalancerCmd,
    },
    /// The balancer's TLS certificates: list them (no verb), set, remove.
    Certs {
        /// The balancer on this node (default: this node's, else the newest alive one).
        #[arg(long, global = true)]
        node: Option<String>,
        #[command(subcommand)]
        cmd: Option<balancer::CertsCmd>,
    },
    /// Key material.
    Key {
        #[command(subcommand)]
        cmd: KeyCmd,
    },
}

#[derive(Debug, Subcommand)]
enum KeyCmd {
    /// Print a new random 32-byte secret, hex encoded, for the cluster file's [keys];
    /// with --curve, a new CURVE keypair (Z85) for the cluster file's [curve] table.
    Generate {
        /// Make a CURVE keypair instead of an HMAC secret.
        #[arg(long)]
        curve: bool,
    },
}

fn main() {
    // `paddock dev supervise` is a root process that starts every daemon: what it
    // inherited stays with it.
    paddock_daemon::cloexec_inherited();
    let cli = Cli::parse();
    let quiet = matches!(cli.cmd, Cmd::Dev { .. });
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(std::env::var("PADDOCK_LOG").unwrap_or_else(|_| {
            if quiet {
                "info".into()
            } else {
                "warn".into()
            }
        }))
        .try_init();
    let result = match cli.cmd {
        Cmd::Dev { cmd } => dev::run(cmd),
        Cmd::Key {
            cmd: KeyCmd::Generate { curve: false },
        } => {
            println!("{}", paddock_wire::keyring::generate_secret_hex());
            Ok(())
        }
        Cmd::Key {
            cmd: KeyCmd::Generate { curve: true },
        } => paddock_wire::curve::generate()
            .map(|(public, secret)| {
                // TOML lines to paste: the public key goes to every node that should
                // admit this client (or is the server key); the secret stays here.
                println!("public = \"{public}\"");
                println!("secret = \"{secret}\"");
            })
            .map_err(anyhow::Error::from),
        other => {
            let opts = cluster::Opts {
                config: cli.config,
                json: cli.json,
                timeout: std::time::Duration::from_millis(cli.timeout_ms),
                app: cli.app,
            };
            match other {
                Cmd::Login { credentials } => api::login(&opts, credentials),
                Cmd::Logout => api::logout(&opts),
                Cmd::Whoami => api::whoami(&opts),
                Cmd::Auth { cmd } => api::auth(&opts, cmd),
                Cmd::Apps { all, num, cmd } => api::apps(&opts, cmd, all, num),
                Cmd::Config { cmd } => api::config(&opts, cmd),
                Cmd::Releases { num, cmd } => api::releases(&opts, cmd, num),
                Cmd::Rollback { version } => api::rollback(&opts, version),
                Cmd::Ps { cmd } => api::ps(&opts, cmd),
                Cmd::Logs {
                    num,
                    tail,
                    process_type,
                } => api::logs(&opts, num, tail, process_type),
                Cmd::Run { no_tty, command } => {
                    api::run(&opts, no_tty, command).map(|code| std::process::exit(code))
                }
                Cmd::Open => api::open(&opts),
                Cmd::Deploys { num, cmd } => api::deploys(&opts, cmd, num),
                Cmd::Domains { cmd } => api::domains(&opts, cmd),
                Cmd::Access { cmd } => api::access(&opts, cmd),
                Cmd::Keys { num, cmd } => api::keys(&opts, cmd, num),
                Cmd::Audit { num, user } => api::audit(&opts, num, user),
                Cmd::Users { num, cmd } => api::users(&opts, cmd, num),
                Cmd::Git { cmd } => api::git_remote(&opts, cmd),
                Cmd::Builds { num, cmd } => api::builds(&opts, cmd, num),
                Cmd::Buildpacks { cmd } => api::buildpacks(&opts, cmd),
                Cmd::Status => cluster::status(&opts),
                Cmd::Ping { daemon, node } => cluster::ping(&opts, &daemon, node.as_deref()),
                Cmd::Lock { cmd } => cluster::lock(&opts, cmd),
                Cmd::Instance { cmd } => runner::instance(&opts, cmd),
                Cmd::Routes { node, cmd } => balancer::routes(&opts, node.as_deref(), cmd),
                Cmd::Balancer { node, cmd } => balancer::balancer(&opts, node.as_deref(), cmd),
                Cmd::Certs { node, cmd } => balancer::certs(&opts, node.as_deref(), cmd),
                Cmd::Dev { .. } | Cmd::Key { .. } => unreachable!(),
            }
        }
    };
    if let Err(e) = result {
        // The api's messages are shown as it wrote them, escaped on a terminal.
        out::say_err(&format!("error: {e:#}"));
        std::process::exit(1);
    }
}
