//! What a push may ask for, as pure functions: the forced command's one git
//! command, and the refs a push may move. Everything here reads hostile input
//! (the pusher writes both), so each rule refuses with a message for the pusher.

/// The git services a key may run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    /// `git push`.
    ReceivePack,
    /// `git fetch` / `git clone`.
    UploadPack,
}

impl Service {
    pub fn name(self) -> &'static str {
        match self {
            Service::ReceivePack => "receive-pack",
            Service::UploadPack => "upload-pack",
        }
    }

    pub fn from_name(s: &str) -> Option<Service> {
        match s {
            "receive-pack" => Some(Service::ReceivePack),
            "upload-pack" => Some(Service::UploadPack),
            _ => None,
        }
    }
}

/// An app's name as the api allows it: 1-28 of `[a-z0-9-]`, starting with a letter.
pub fn valid_app(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 28
        && b[0].is_ascii_lowercase()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
}

const NO_SHELL: &str = "Paddock gives no shell. Push your app with git: \
     git remote add paddock <the app's git URL> && git push paddock main";

/// Reads `SSH_ORIGINAL_COMMAND`: exactly `git-receive-pack 'APP.git'` or
/// `git-upload-pack 'APP.git'` (also `'/APP.git'`, `'APP'`). Anything else —
/// a shell, other commands, extra arguments, paths, quotes inside — is refused.
pub fn parse_command(cmd: Option<&str>) -> Result<(Service, String), String> {
    let Some(cmd) = cmd.map(str::trim).filter(|c| !c.is_empty()) else {
        return Err(NO_SHELL.to_string());
    };
    let Some((verb, arg)) = cmd.split_once(' ') else {
        return Err(NO_SHELL.to_string());
    };
    let service = match verb {
        "git-receive-pack" => Service::ReceivePack,
        "git-upload-pack" => Service::UploadPack,
        _ => return Err(NO_SHELL.to_string()),
    };
    let arg = arg.trim_start_matches(' ');
    let inner = arg
        .strip_prefix('\'')
        .and_then(|a| a.strip_suffix('\''))
        .filter(|a| !a.contains('\''))
        .ok_or_else(|| {
            "git asked for something Paddock does not serve: one quoted repository \
             name, like 'myapp.git', is all it takes"
                .to_string()
        })?;
    let name = inner.strip_prefix('/').unwrap_or(inner);
    let name = name.strip_suffix(".git").unwrap_or(name);
    if !valid_app(name) {
        return Err(format!(
            "'{}' is not an app's repository: use APP.git, where APP is the name \
             of one of your apps (1-28 of a-z, 0-9 and -, starting with a letter)",
            inner.escape_debug()
        ));
    }
    Ok((service, name.to_string()))
}

/// One line of pre-receive's input: `OLD NEW REF`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefUpdate {
    pub old: String,
    pub new: String,
    pub name: String,
}

const ZERO: &str = "0000000000000000000000000000000000000000";

fn object_id(s: &str) -> bool {
    (s.len() == 40 || s.len() == 64) && s.bytes().all(|b| b.is_ascii_hexdigit())
}

impl RefUpdate {
    pub fn parse(line: &str) -> Option<RefUpdate> {
        let mut it = line.split(' ');
        let (old, new, name) = (it.next()?, it.next()?, it.next()?);
        if it.next().is_some() || !object_id(old) || !object_id(new) || name.is_empty() {
            return None;
        }
        Some(RefUpdate {
            old: old.to_string(),
            new: new.to_string(),
            name: name.to_string(),
        })
    }

    fn deletes(&self) -> bool {
        self.new.bytes().all(|b| b == b'0')
    }
}

pub const DEPLOY_BRANCHES: [&str; 2] = ["refs/heads/main", "refs/heads/master"];

/// The one update a push deploys, or why the whole push is refused: only `main` or
/// `master` deploy, never both at once, and the deploy branch is never deleted.
pub fn deploy_ref(updates: &[RefUpdate]) -> Result<&RefUpdate, String> {
    if updates.is_empty() {
        return Err("nothing to push".into());
    }
    for u in updates {
        if !DEPLOY_BRANCHES.contains(&u.name.as_str()) {
            let short = u.name.strip_prefix("refs/heads/").unwrap_or(&u.name);
            return Err(format!(
                "Paddock deploys only the main or master branch; {} was refused. \
                 Deploy another branch with: git push paddock {}:main",
                u.name.escape_debug(),
                short.escape_debug()
            ));
        }
        if u.deletes() {
            return Err(format!(
                "deleting the deploy branch {} is refused: the app's releases are built from it",
                u.name
            ));
        }
    }
    if updates.len() > 1 {
        return Err("push main or master, not both in one push".into());
    }
    Ok(&updates[0])
}

/// Whether `old` is the all-zero id (a branch's first push).
pub fn is_new_branch(old: &str) -> bool {
    old == ZERO || (old.len() == 64 && old.bytes().all(|b| b == b'0'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_one_quoted_repository_for_one_git_service() {
        let ok = [
            ("git-receive-pack 'shop.git'", Service::ReceivePack),
            ("git-receive-pack '/shop.git'", Service::ReceivePack),
            ("git-upload-pack 'shop'", Service::UploadPack),
        ];
        for (c, s) in ok {
            assert_eq!(parse_command(Some(c)), Ok((s, "shop".to_string())), "{c}");
        }
        let refused = [
            None,
            Some(""),
            Some("bash"),
            Some("sh -c id"),
            Some("git-receive-pack"),
            Some("git-receive-pack shop.git"),
            Some("git-receive-pack '../shop.git'"),
            Some("git-receive-pack '/srv/x/shop.git'"),
            Some("git-receive-pack 'sh'op.git'"),
            Some("git-receive-pack 'shop.git' 'other.git'"),
            Some("git-receive-pack 'shop.git'; id"),
            Some("git-upload-archive 'shop.git'"),
            Some("scp -t /tmp"),
            Some("git-receive-pack 'Shop.git'"),
            Some("git-receive-pack ''"),
            Some("git-receive-pack '.git'"),
        ];
        for c in refused {
            assert!(parse_command(c).is_err(), "{c:?} was accepted");
        }
        assert!(parse_command(None).unwrap_err().contains("no shell"));
    }

    fn up(name: &str, new: &str) -> RefUpdate {
        RefUpdate::parse(&format!("{ZERO} {new} {name}")).unwrap()
    }

    #[test]
    fn only_main_or_master_deploy_and_never_by_deletion() {
        let a = "a".repeat(40);
        assert_eq!(
            deploy_ref(&[up("refs/heads/main", &a)]).unwrap().name,
            "refs/heads/main"
        );
        assert!(deploy_ref(&[up("refs/heads/master", &a)]).is_ok());
        let e = deploy_ref(&[up("refs/heads/feature", &a)]).unwrap_err();
        assert!(e.contains("git push paddock feature:main"), "{e}");
        assert!(deploy_ref(&[up("refs/tags/v1", &a)]).is_err());
        assert!(deploy_ref(&[up("refs/heads/main", ZERO)])
            .unwrap_err()
            .contains("deleting"));
        assert!(deploy_ref(&[up("refs/heads/main", &a), up("refs/heads/master", &a)]).is_err());
        assert!(deploy_ref(&[up("refs/heads/main", &a), up("refs/heads/x", &a)]).is_err());
        assert!(deploy_ref(&[]).is_err());
        assert!(RefUpdate::parse("x y refs/heads/main").is_none());
        assert!(RefUpdate::parse(&format!("{ZERO} {a} refs/heads/main extra")).is_none());
        assert!(is_new_branch(ZERO));
    }
}
