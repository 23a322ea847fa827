//! The three programs sshd and git run as the `git` account, all in the
//! `paddock-gitserver` binary: `keys` (AuthorizedKeysCommand), `serve` (the
//! forced command) and `hook` (pre-receive). None can read the cluster file; each
//! asks the root daemon over its unix socket. They are small, blocking and exit
//! with a message for the pusher on any refusal.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::proto::{PushLine, PushRef, Reply, Request, ENV_TOKEN, MAX_LINE};
use crate::rules::{self, RefUpdate};

fn socket_arg(args: &mut Vec<String>) -> Result<PathBuf, String> {
    match args.iter().position(|a| a == "--socket") {
        Some(i) if i + 1 < args.len() => {
            let p = PathBuf::from(args.remove(i + 1));
            args.remove(i);
            Ok(p)
        }
        _ => Err("paddock-gitserver: --socket PATH is required".into()),
    }
}

fn connect(socket: &Path) -> Result<UnixStream, String> {
    UnixStream::connect(socket).map_err(|e| {
        format!(
            "Paddock's git service is not running on this node ({}: {e}); try again shortly",
            socket.display()
        )
    })
}

fn ask(socket: &Path, req: &Request) -> Result<Reply, String> {
    let mut s = connect(socket)?;
    let mut line = serde_json::to_vec(req).map_err(|e| e.to_string())?;
    line.push(b'\n');
    s.write_all(&line)
        .map_err(|e| format!("git service: {e}"))?;
    let mut r = BufReader::new(s.take(MAX_LINE as u64));
    let mut buf = String::new();
    r.read_line(&mut buf)
        .map_err(|e| format!("git service: {e}"))?;
    serde_json::from_str(&buf).map_err(|_| "the git service gave no answer; try again".into())
}

/// Runs a helper named by `argv[1]`; `None` when argv names none (the daemon runs).
pub fn dispatch() -> Option<i32> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let which = args.first()?.clone();
    if !["keys", "serve", "hook"].contains(&which.as_str()) {
        return None;
    }
    args.remove(0);
    let r = socket_arg(&mut args).and_then(|socket| match which.as_str() {
        "keys" => keys(&socket, &args),
        "serve" => serve(&socket, &args),
        _ => hook(&socket),
    });
    Some(match r {
        Ok(code) => code,
        Err(msg) => {
            eprintln!("{msg}");
            1
        }
    })
}

/// `keys FINGERPRINT`: prints the key's authorized_keys line, or nothing.
fn keys(socket: &Path, args: &[String]) -> Result<i32, String> {
    let [fp] = args else {
        return Err("usage: paddock-gitserver keys --socket PATH FINGERPRINT".into());
    };
    let reply = ask(
        socket,
        &Request::Keys {
            fingerprint: fp.clone(),
        },
    )?;
    if let (true, Some(line)) = (reply.ok, reply.line) {
        println!("{line}");
    }
    Ok(0)
}

/// `serve FINGERPRINT`: the forced command. Checks `SSH_ORIGINAL_COMMAND`, asks the
/// daemon, then becomes `git receive-pack`/`upload-pack` on the app's repository.
fn serve(socket: &Path, args: &[String]) -> Result<i32, String> {
    let [fp] = args else {
        return Err("usage: paddock-gitserver serve --socket PATH FINGERPRINT".into());
    };
    let original = std::env::var("SSH_ORIGINAL_COMMAND").ok();
    let (service, app) = rules::parse_command(original.as_deref())?;
    let reply = ask(
        socket,
        &Request::Authorize {
            fingerprint: fp.clone(),
            service: service.name().into(),
            app: app.clone(),
        },
    )?;
    if !reply.ok {
        return Err(reply
            .message
            .unwrap_or_else(|| format!("you may not push to {app}")));
    }
    let (Some(repo), Some(git), Some(token), Some(hooks)) =
        (reply.repo, reply.git, reply.token, reply.hooks)
    else {
        return Err("the git service gave an incomplete answer; try again".into());
    };
    // The hooks are root's, outside the repository (which `git` owns), and no
    // system-wide git config (filter drivers, hooks) applies to a push.
    let err = Command::new(&git)
        .arg("-c")
        .arg(format!("core.hooksPath={hooks}"))
        .arg(service.name())
        .arg(&repo)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env(ENV_TOKEN, token)
        .env("PADDOCK_GITSERVER_SOCKET", socket)
        .env("PADDOCK_GIT", &git)
        .exec();
    Err(format!("could not start git {}: {err}", service.name()))
}

/// Ends the hook as soon as git's end of its stderr is closed (the pusher is
/// gone): a pipe's write end polls POLLERR once no reader is left, even while
/// the hook is busy sending the tree or waiting for the build.
fn watch_stderr() {
    std::thread::spawn(|| loop {
        let mut p = libc::pollfd {
            fd: 2,
            events: 0,
            revents: 0,
        };
        // SAFETY: poll on one pollfd we own.
        let r = unsafe { libc::poll(&mut p, 1, -1) };
        if r == 1 && p.revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 {
            std::process::exit(1);
        }
        if r < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            return;
        }
    });
}

/// The pre-receive hook: which ref deploys, the pushed commit's tree to the
/// daemon, and the build's log back to the pusher as it comes.
fn hook(socket: &Path) -> Result<i32, String> {
    let mut updates = Vec::new();
    for line in std::io::stdin().lock().lines() {
        let line = line.map_err(|e| e.to_string())?;
        let u = RefUpdate::parse(&line)
            .ok_or_else(|| "git gave the hook a line it cannot read".to_string())?;
        updates.push(u);
    }
    let deploy = rules::deploy_ref(&updates)?.clone();
    let token = std::env::var(ENV_TOKEN)
        .map_err(|_| "this push did not come through Paddock's git service".to_string())?;
    let mut s = connect(socket)?;
    watch_stderr();
    let req = Request::Push {
        token,
        receive_pack: i32::try_from(std::os::unix::process::parent_id()).ok(),
        hook: i32::try_from(std::process::id()).ok(),
        quarantine: std::env::var("GIT_QUARANTINE_PATH").ok(),
        refs: vec![PushRef {
            old: deploy.old.clone(),
            new: deploy.new.clone(),
            name: deploy.name.clone(),
        }],
    };
    let mut line = serde_json::to_vec(&req).map_err(|e| e.to_string())?;
    line.push(b'\n');
    s.write_all(&line)
        .map_err(|e| format!("git service: {e}"))?;
    // The pushed objects are still in quarantine; git's environment (inherited
    // from receive-pack) lets `git archive` read them.
    let git = std::env::var_os("PADDOCK_GIT").unwrap_or_else(|| "git".into());
    let mut archive = Command::new(git)
        .args(["archive", "--format=tar", &deploy.new])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("could not run git archive: {e}"))?;
    let mut out = archive.stdout.take().expect("piped");
    // A daemon that refuses early closes its side: stop sending, read why.
    let _ = std::io::copy(&mut out, &mut s);
    drop(out);
    let archived = archive.wait().map_err(|e| e.to_string())?;
    let _ = s.shutdown(std::net::Shutdown::Write);
    if !archived.success() {
        return Err(format!("git archive of {} failed", deploy.new));
    }
    let reader = BufReader::new(s);
    let mut stderr = std::io::stderr().lock();
    // A pusher who is gone (git's side of stderr closed) ends the hook at once:
    // the daemon sees the socket close and builds nothing more for nobody.
    let mut say = |text: &str| {
        if writeln!(stderr, "{text}")
            .and_then(|()| stderr.flush())
            .is_err()
        {
            std::process::exit(1);
        }
    };
    for line in reader.lines() {
        let Ok(line) = line else { break };
        match serde_json::from_str::<PushLine>(&line) {
            Ok(PushLine::Log { line }) => say(&line),
            Ok(PushLine::Keepalive { .. }) => {}
            Ok(PushLine::Done { ok, message, .. }) => {
                say(&message);
                return Ok(if ok { 0 } else { 1 });
            }
            Err(_) => break,
        }
    }
    Err(
        "the git service stopped before the push finished: its build or rollout may go on \
         without you (see `paddock builds` and `paddock deploys`); the branch did not move"
            .into(),
    )
}
