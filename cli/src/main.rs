//! `paddock`: the operator's command line.

mod balancer;
mod cluster;
mod dev;
mod runner;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "paddock", version, about = "Drive a Paddock cluster")]
struct Cli {
    /// The cluster file (else $PADDOCK_CONFIG, else /etc/paddock/paddock.toml).
    #[arg(long, short = 'c', global = true)]
    config: Option<PathBuf>,
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
    /// Every app instance on every runner.
    Ps,
    /// Start, stop, restart, reload an app instance, or read its logs.
    Instance {
        #[command(subcommand)]
        cmd: runner::InstanceCmd,
    },
    /// Run a one-off command in an app's environment on a PTY (an operator's tool).
    Run(runner::RunArgs),
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
            };
            match other {
                Cmd::Status => cluster::status(&opts),
                Cmd::Ping { daemon, node } => cluster::ping(&opts, &daemon, node.as_deref()),
                Cmd::Lock { cmd } => cluster::lock(&opts, cmd),
                Cmd::Ps => runner::ps(&opts),
                Cmd::Instance { cmd } => runner::instance(&opts, cmd),
                Cmd::Run(a) => match runner::run(&opts, a) {
                    Ok(code) => std::process::exit(code),
                    Err(e) => Err(e),
                },
                Cmd::Routes { node, cmd } => balancer::routes(&opts, node.as_deref(), cmd),
                Cmd::Balancer { node, cmd } => balancer::balancer(&opts, node.as_deref(), cmd),
                Cmd::Certs { node, cmd } => balancer::certs(&opts, node.as_deref(), cmd),
                Cmd::Dev { .. } | Cmd::Key { .. } => unreachable!(),
            }
        }
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
