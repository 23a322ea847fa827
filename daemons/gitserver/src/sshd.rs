//! OpenSSH as Paddock runs it: the `git` account, a config of our own (never the
//! system's sshd), its host key, a copy of our binary where sshd accepts an
//! AuthorizedKeysCommand, and the sshd process itself.

use std::io::Read;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{anyhow, bail, Context, Result};

use crate::settings::{plain_path, Settings};

/// The comment that marks the account as Paddock's.
pub const ACCOUNT_COMMENT: &str = "Paddock git pushes";

/// The `git` account: made when missing, with `*` as its password field (no
/// password; `!`, a locked account, makes sshd without PAM refuse every key).
/// An account of that name that Paddock did not make (a host's own git user,
/// gitolite's) is never taken over or unlocked: the start fails, saying so.
pub fn ensure_account(user: &str) -> Result<(u32, u32)> {
    for attempt in 0..20 {
        if let Some(u) = nix::unistd::User::from_name(user)? {
            if u.gecos.to_str().ok() != Some(ACCOUNT_COMMENT) {
                bail!(
                    "an account named {user} exists and Paddock did not make it (its comment is not \
                     {ACCOUNT_COMMENT:?}); set [daemons.gitserver] user to a name of its own"
                );
            }
            unlock(user)?;
            return Ok((u.uid.as_raw(), u.gid.as_raw()));
        }
        let out = Command::new("useradd")
            .args(["--system", "--user-group", "--no-create-home"])
            .args(["--comment", ACCOUNT_COMMENT])
            .args(["--home-dir", "/", "--shell", "/bin/sh", user])
            .output()
            .context("running useradd")?;
        if !out.status.success() && attempt == 19 {
            bail!(
                "useradd {user} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        // Another gitserver on this host may be adding it (or holds the lock).
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    Err(anyhow!("could not make the {user} account"))
}

fn unlock(user: &str) -> Result<()> {
    let shadow = std::fs::read_to_string("/etc/shadow").unwrap_or_default();
    let locked = shadow.lines().any(|l| {
        let mut f = l.split(':');
        f.next() == Some(user) && f.next().is_some_and(|p| p.starts_with('!'))
    });
    if locked {
        let st = Command::new("usermod").args(["-p", "*", user]).status()?;
        if !st.success() {
            bail!("usermod -p '*' {user} failed ({st}); sshd refuses a locked account");
        }
    }
    Ok(())
}

/// Whether sshd accepts `path` as an AuthorizedKeysCommand: it and every parent
/// owned by root and writable by nobody else.
pub fn root_safe(path: &Path) -> bool {
    let mut p = Some(path);
    while let Some(d) = p {
        match std::fs::metadata(d) {
            Ok(m) if m.uid() == 0 && m.mode() & 0o022 == 0 => {}
            _ => return false,
        }
        p = d.parent();
    }
    true
}

/// Where the helpers' binary lives for sshd: this binary if its path is safe and
/// plain, else a copy under `/var/lib/paddock/bin/` named by its content's hash.
pub fn helper_binary() -> Result<PathBuf> {
    let me = std::env::current_exe().context("finding our own binary")?;
    if root_safe(&me) && plain_path(&me) {
        return Ok(me);
    }
    let mut bytes = Vec::new();
    std::fs::File::open(&me)?.read_to_end(&mut bytes)?;
    let digest = ring::digest::digest(&ring::digest::SHA256, &bytes);
    let dir = PathBuf::from("/var/lib/paddock/bin");
    for d in ["/var/lib/paddock", "/var/lib/paddock/bin"] {
        match std::fs::DirBuilder::new().mode(0o755).create(d) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e).with_context(|| format!("creating {d}")),
        }
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755))?;
    }
    let dest = dir.join(format!(
        "paddock-gitserver-{}",
        &hex::encode(digest.as_ref())[..16]
    ));
    if !dest.exists() {
        let tmp = dir.join(format!(".tmp-{}-{}", std::process::id(), ulid::Ulid::new()));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o755)
            .open(&tmp)?;
        std::io::Write::write_all(&mut f, &bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &dest)?;
    }
    if !root_safe(&dest) {
        bail!(
            "{} is not root-owned and private; sshd would refuse it",
            dest.display()
        );
    }
    Ok(dest)
}

/// A host key of our own (ed25519), made once.
pub fn host_key(dir: &Path) -> Result<PathBuf> {
    let key = dir.join("ssh_host_ed25519_key");
    if !key.exists() {
        let st = Command::new("ssh-keygen")
            .args([
                "-q",
                "-t",
                "ed25519",
                "-N",
                "",
                "-C",
                "paddock-gitserver",
                "-f",
            ])
            .arg(&key)
            .status()
            .context("running ssh-keygen (is openssh-client installed?)")?;
        if !st.success() {
            bail!("ssh-keygen failed ({st})");
        }
    }
    Ok(key)
}

/// sshd's config: keys only, one account, no shell, no forwarding of any kind,
/// every key looked up by the helper, every session forced into `serve`.
pub fn config_text(
    s: &Settings,
    listen: std::net::SocketAddr,
    host_key: &Path,
    helper: &Path,
) -> String {
    format!(
        "# Written by paddock-gitserver at every start; edits are lost.\n\
         ListenAddress {listen}\n\
         HostKey {hk}\n\
         PidFile none\n\
         AllowUsers {user}\n\
         AuthorizedKeysFile none\n\
         AuthorizedKeysCommand {helper} keys --socket {sock} %f\n\
         AuthorizedKeysCommandUser {user}\n\
         PubkeyAuthentication yes\n\
         PasswordAuthentication no\n\
         KbdInteractiveAuthentication no\n\
         HostbasedAuthentication no\n\
         PermitRootLogin no\n\
         PermitEmptyPasswords no\n\
         UsePAM no\n\
         StrictModes yes\n\
         PermitUserEnvironment no\n\
         PermitTTY no\n\
         PermitTunnel no\n\
         AllowTcpForwarding no\n\
         AllowStreamLocalForwarding no\n\
         AllowAgentForwarding no\n\
         X11Forwarding no\n\
         GatewayPorts no\n\
         PrintMotd no\n\
         PrintLastLog no\n\
         Banner none\n\
         ClientAliveInterval 30\n\
         LoginGraceTime 30\n\
         MaxAuthTries 6\n\
         MaxStartups 20:30:100\n\
         LogLevel INFO\n",
        hk = host_key.display(),
        user = s.user,
        helper = helper.display(),
        sock = s.socket().display(),
    )
}

/// Writes the config (0600) and checks it with `sshd -t`.
pub fn prepare(s: &Settings, listen: std::net::SocketAddr, helper: &Path) -> Result<PathBuf> {
    let dir = s.sshd_dir();
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
    // sshd's privilege-separation directory.
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create("/run/sshd")?;
    let key = host_key(&dir)?;
    let cfg = dir.join("sshd_config");
    paddock_config::write_private(&cfg, config_text(s, listen, &key, helper).as_bytes())
        .with_context(|| format!("writing {}", cfg.display()))?;
    let out = Command::new(&s.sshd)
        .arg("-t")
        .arg("-f")
        .arg(&cfg)
        .output()
        .with_context(|| format!("running {} (install openssh-server)", s.sshd.display()))?;
    if !out.status.success() {
        bail!(
            "sshd refuses the config {}: {}",
            cfg.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(cfg)
}

/// Runs sshd in the foreground until it ends (the loop around restarts it). It
/// dies with us (PR_SET_PDEATHSIG) so a restarted gitserver finds its port free;
/// its log lines (which quote what clients sent) are logged escaped.
pub async fn run(bin: &Path, config: &Path) -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt as _;
    use tokio::io::AsyncBufReadExt;
    let mut cmd = std::process::Command::new(bin);
    cmd.arg("-D").arg("-e").arg("-f").arg(config);
    cmd.stdin(std::process::Stdio::null());
    cmd.stdout(std::process::Stdio::null());
    cmd.stderr(std::process::Stdio::piped());
    // SAFETY: prctl only sets a flag of the child.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut cmd = tokio::process::Command::from(cmd);
    cmd.kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let stderr = child.stderr.take().expect("piped");
    let mut lines = tokio::io::BufReader::new(stderr).lines();
    while let Some(line) = lines.next_line().await? {
        tracing::info!(target: "sshd", "{}", line.escape_debug());
    }
    let st = child.wait().await?;
    bail!("sshd ended ({st})")
}
