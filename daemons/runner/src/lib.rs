//! paddock-runner: the node agent. It runs app instances as supervised processes,
//! each under its own `paddock-shim` (the app's parent, holder of its pipes and exit
//! status), as the app's own unprivileged user, with rlimits and cgroup limits;
//! restarts what dies (first at once, then with backoff, up to a respawn limit);
//! checks health; captures logs; and runs one-off commands on a PTY.
//!
//! The crate's parts: [`settings`] (`[daemons.runner]`), [`store`] (the on-disk
//! record), [`provision`] (user, directories, cgroups, spec for a new instance),
//! [`machine`] (an instance's rules as a pure state machine), [`link`] (the
//! runner's end of a shim's socket), `actor` (the glue), [`shim`] and
//! [`shim_proto`] (the per-instance shim and what it says), [`child`] (what every
//! app process goes through before exec), [`pty`] (one-offs), [`cgroup`],
//! [`health`] and [`users`].
//!
//! Architecture invariant: the runner's memory is never the only record of an
//! instance. Each instance has a directory (spec, record, log, the shim's socket);
//! a restarted runner re-adopts running instances from there, and the shims keep
//! the apps alive while no runner exists. Only `machine::Machine::step` changes an
//! instance's state.

mod actor;
pub mod cgroup;
pub mod child;
pub mod health;
pub mod link;
pub mod machine;
pub mod provision;
pub mod pty;
pub mod release;
pub mod settings;
pub mod shim;
pub mod shim_proto;
pub mod store;
pub mod users;

use actix::prelude::*;
use paddock_daemon::{Ctx, Routes, Spec};
use paddock_wire::{kinds, WireError};

pub use settings::{RunnerSection, Settings};

pub fn spec() -> Spec {
    Spec {
        name: "runner",
        version: env!("CARGO_PKG_VERSION"),
        pull: false,
        publish: true,
        user_keys: None,
        check: |cfg| Settings::from_config(cfg).map(|_| ()),
        push_to: |cfg| {
            Settings::from_config(cfg)
                .ok()
                .and_then(|s| s.log_sink)
                .map(|e| vec![("logs".to_string(), e)])
                .unwrap_or_default()
        },
    }
}

pub(crate) use paddock_daemon::chain;

pub async fn setup(ctx: Ctx) -> anyhow::Result<Routes> {
    let cfg = ctx.config();
    let settings = Settings::from_config(&cfg)?;
    for d in [&settings.instances_dir, &settings.apps_dir] {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o711)
            .create(d)?;
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o711))?;
    }
    std::fs::create_dir_all(settings.instances_dir.join("instances"))?;
    // Where release instances and one-offs see their app, in mount namespaces of
    // their own.
    if let Err(e) = child::ensure_app_root() {
        // Only releases need it: directory-form instances run without.
        tracing::warn!(
            "cannot create {}: {e}; instances and one-offs of releases will not start",
            child::APP_ROOT
        );
    }
    let releases = release::Releases::new(ctx.calls().clone(), &settings.instances_dir);
    let hierarchy = cgroup::Hierarchy::detect(&settings.cgroup_root);
    tracing::info!(
        cgroups = hierarchy.name(),
        "runner ready to place instances"
    );
    let shim_bin = std::env::current_exe()?
        .parent()
        .map(|p| p.join("paddock-shim"))
        .filter(|p| p.exists())
        .ok_or_else(|| anyhow::anyhow!("paddock-shim not found next to paddock-runner"))?;
    let pty = pty::Runs::new(
        settings.apps_dir.clone(),
        settings.instances_dir.join("runs"),
        hierarchy.clone(),
        pty::Defaults {
            nofile: settings.nofile,
            pids: settings.pids,
            memory_mb: settings.memory_mb,
        },
    );
    let runner = actor::Runner::new(
        settings,
        cfg.node().to_string(),
        ctx.server().clone(),
        hierarchy,
        shim_bin,
    )
    .start();
    let kinds = [
        kinds::INSTANCE_STOP,
        kinds::INSTANCE_RESTART,
        kinds::INSTANCE_RELOAD,
        kinds::INSTANCE_LOGS,
        kinds::INSTANCE_LIST,
        kinds::APP_PURGE,
        kinds::RUNNER_INFO,
    ];
    // `instance.start`: the `dir` form goes straight to the actor; the release
    // form is first admitted by the actor (a stale token or a taken id is refused
    // and a resend answered before anything is fetched), then reads its release
    // and has its slug on this node (waiting here, never in the actor), then goes
    // to the actor completed.
    let (start_to, start_releases) = (runner.clone(), releases.clone());
    let routes = Routes::new()
        .on(kinds::INSTANCE_START, move |env| {
            let (runner, releases) = (start_to.clone(), start_releases.clone());
            async move {
                let sent = match env.body.get("release") {
                    None | Some(serde_json::Value::Null) => runner.send(actor::Call(env)).await,
                    Some(_) => {
                        let admitted = runner
                            .send(actor::Admit {
                                body: env.body.clone(),
                            })
                            .await
                            .map_err(|e| {
                                WireError::internal(format!("actor mailbox closed: {e}"))
                            })??;
                        if let Some(answer) = admitted {
                            return Ok(answer);
                        }
                        let request = store::fingerprint(&env.body);
                        let (req, release) = releases.instance_start(&env.body).await?;
                        runner
                            .send(actor::StartRelease {
                                req,
                                release,
                                request,
                            })
                            .await
                    }
                };
                sent.map_err(|e| WireError::internal(format!("actor mailbox closed: {e}")))?
            }
        })
        .forward(&kinds, runner, actor::Call);
    pty::routes(routes, pty, releases)
}

#[cfg(test)]
mod tests {
    use super::*;
    use paddock_config::ClusterConfig;

    fn config_with(
        runner: &[(&str, toml::Value)],
    ) -> (
        tempfile::TempDir,
        Result<ClusterConfig, paddock_config::ConfigError>,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let secret = "00".repeat(32);
        let mut text = format!(
            "node = \"n\"\nsigning_key = \"k\"\n[keys]\nk = \"{secret}\"\n[cluster]\nheartbeats = [\"tcp://127.0.0.1:7111\"]\n[daemons.runner]\nrpc = \"tcp://127.0.0.1:7105\"\n"
        );
        for (k, v) in runner {
            text.push_str(&format!("{k} = {v}\n"));
        }
        let p = dir.path().join("paddock.toml");
        std::fs::write(&p, text).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        let c = ClusterConfig::load(&p);
        (dir, c)
    }

    #[test]
    fn the_section_is_typed_and_a_misspelt_key_is_named() {
        let (_d, c) = config_with(&[
            ("backoff_base_ms", toml::Value::Integer(250)),
            (
                "log_sink",
                toml::Value::String("tcp://127.0.0.1:7999".into()),
            ),
        ]);
        let s = Settings::from_config(&c.unwrap()).unwrap();
        assert_eq!(s.backoff_base, std::time::Duration::from_millis(250));
        assert_eq!(s.log_sink.as_deref(), Some("tcp://127.0.0.1:7999"));
        assert_eq!(s.restart_limit, 10, "the default");

        let (_d, c) = config_with(&[("backof_base_ms", toml::Value::Integer(250))]);
        let e = Settings::from_config(&c.unwrap()).unwrap_err().to_string();
        assert!(e.contains("daemons.runner.backof_base_ms"), "{e}");

        let (_d, c) = config_with(&[("stop_grace_ms", toml::Value::String("soon".into()))]);
        let e = Settings::from_config(&c.unwrap()).unwrap_err().to_string();
        assert!(e.contains("daemons.runner.stop_grace_ms"), "{e}");

        let (_d, c) = config_with(&[
            ("port_min", toml::Value::Integer(3000)),
            ("port_max", toml::Value::Integer(2000)),
        ]);
        let e = Settings::from_config(&c.unwrap()).unwrap_err().to_string();
        assert!(e.contains("port range"), "{e}");

        let (_d, c) = config_with(&[("log_sink", toml::Value::String("localhost:1".into()))]);
        let e = Settings::from_config(&c.unwrap()).unwrap_err().to_string();
        assert!(e.contains("daemons.runner.log_sink"), "{e}");

        let (_d, c) = config_with(&[
            ("advertise", toml::Value::String("10.0.0.7".into())),
            ("offer_memory_mb", toml::Value::Integer(3000)),
        ]);
        let s = Settings::from_config(&c.unwrap()).unwrap();
        assert_eq!(s.advertise.to_string(), "10.0.0.7");
        assert_eq!(s.offer_memory_mb, 3000);
        let (_d, c) = config_with(&[]);
        let s = Settings::from_config(&c.unwrap()).unwrap();
        assert_eq!(s.advertise.to_string(), "127.0.0.1", "the default");
        assert!(s.offer_memory_mb > 0, "80% of MemTotal");
        let (_d, c) = config_with(&[("advertise", toml::Value::String("node-a.lan".into()))]);
        let e = Settings::from_config(&c.unwrap()).unwrap_err().to_string();
        assert!(e.contains("daemons.runner.advertise"), "{e}");
    }
}
