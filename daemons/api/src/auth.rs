//! Who is asking, and what they may touch (the protocol's check 7 for user keys).

use paddock_wire::{Code, WireError};

/// The signer of a request, resolved against the database.
#[derive(Debug, Clone)]
pub enum Who {
    /// A cluster key: full control. `from` is the envelope's sender.
    Cluster { from: String, key_id: String },
    /// A user key that exists, is not revoked, and whose user is not disabled.
    User {
        id: i64,
        name: String,
        admin: bool,
        key_id: String,
    },
}

impl Who {
    /// Cluster keys and admins may do everything.
    pub fn is_admin(&self) -> bool {
        match self {
            Who::Cluster { .. } => true,
            Who::User { admin, .. } => *admin,
        }
    }

    /// What the audit log records as the actor.
    pub fn actor(&self) -> String {
        match self {
            Who::Cluster { from, .. } => format!("cluster:{from}"),
            Who::User { name, .. } => format!("user:{name}"),
        }
    }

    pub fn key_id(&self) -> &str {
        match self {
            Who::Cluster { key_id, .. } | Who::User { key_id, .. } => key_id,
        }
    }

    pub fn user_id(&self) -> Option<i64> {
        match self {
            Who::User { id, .. } => Some(*id),
            Who::Cluster { .. } => None,
        }
    }

    pub fn user_name(&self) -> Option<&str> {
        match self {
            Who::User { name, .. } => Some(name),
            Who::Cluster { .. } => None,
        }
    }

    /// Refuses unless the caller is an admin or the cluster.
    pub fn require_admin(&self, what: &str) -> Result<(), WireError> {
        if self.is_admin() {
            Ok(())
        } else {
            Err(forbidden(format!(
                "only an admin may {what}; ask your operator"
            )))
        }
    }
}

/// What an app-level kind needs of the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// The owner or a collaborator.
    Access,
    /// The owner.
    Owner,
}

/// The caller's role on an app, from `api_access`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Owner,
    Collaborator,
}

impl Role {
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "owner" => Some(Role::Owner),
            "collaborator" => Some(Role::Collaborator),
            _ => None,
        }
    }
}

/// Decides whether `who` (with `role` on the app, if any) may do `what` needing
/// `need` on app `app`.
pub fn check_app(
    who: &Who,
    role: Option<Role>,
    need: Need,
    app: &str,
    what: &str,
) -> Result<(), WireError> {
    if who.is_admin() {
        return Ok(());
    }
    match (need, role) {
        (_, Some(Role::Owner)) => Ok(()),
        (Need::Access, Some(Role::Collaborator)) => Ok(()),
        (Need::Owner, Some(Role::Collaborator)) => Err(forbidden(format!(
            "only the owner of app {app} may {what}; you are a collaborator"
        ))),
        (_, None) => Err(forbidden(format!(
            "you have no access to app {app}, so you may not {what}; its owner can add you with `paddock access add`"
        ))),
    }
}

/// Whether `who` may act for user `target` (self, or an admin for anyone).
pub fn check_self(who: &Who, target: &str, what: &str) -> Result<(), WireError> {
    if who.is_admin() || who.user_name() == Some(target) {
        Ok(())
    } else {
        Err(forbidden(format!(
            "you may not {what} of user {target}: only your own (or an admin)"
        )))
    }
}

pub fn forbidden(msg: impl Into<String>) -> WireError {
    WireError::new(Code::Forbidden, msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(admin: bool) -> Who {
        Who::User {
            id: 1,
            name: "alice".into(),
            admin,
            key_id: "user.x".into(),
        }
    }

    #[test]
    fn the_matrix() {
        let cluster = Who::Cluster {
            from: "t".into(),
            key_id: "k".into(),
        };
        let (o, c) = (Some(Role::Owner), Some(Role::Collaborator));
        let cases = [
            (user(false), o, Need::Owner, true),
            (user(false), o, Need::Access, true),
            (user(false), c, Need::Access, true),
            (user(false), c, Need::Owner, false),
            (user(false), None, Need::Access, false),
            (user(false), None, Need::Owner, false),
            (user(true), None, Need::Owner, true),
            (cluster.clone(), None, Need::Owner, true),
        ];
        for (who, role, need, ok) in cases {
            let r = check_app(&who, role, need, "app", "do it");
            assert_eq!(r.is_ok(), ok, "{who:?} {role:?} {need:?}");
            if let Err(e) = r {
                assert_eq!(e.code, Code::Forbidden);
                assert!(e.message.contains("app"));
            }
        }
        assert!(check_self(&user(false), "alice", "x").is_ok());
        assert!(check_self(&user(false), "bob", "x").is_err());
        assert!(check_self(&user(true), "bob", "x").is_ok());
        assert!(check_self(&cluster, "bob", "x").is_ok());
        assert!(user(false).require_admin("x").is_err());
        assert!(cluster.require_admin("x").is_ok());
    }
}
