//! The balancers' route table as a pure function of the scheduler's view: the
//! actor turns [`RouteTable`] into the wire's `routes.table` body
//! (`{"token", "apps": [{"app", "domains", "backends": [{"id", "addr",
//! "draining"}]}]}`) and publishes it, on every change and periodically.

use std::collections::BTreeSet;

use crate::model::{
    is_routed, DesiredApp, Instance, InstanceId, InstanceState, Liveness, Owner, Registry, Token,
};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteTable {
    pub token: Token,
    pub apps: Vec<AppRoutes>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppRoutes {
    pub app: String,
    pub domains: Vec<String>,
    pub backends: Vec<Backend>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    pub id: InstanceId,
    pub addr: String,
    pub draining: bool,
}

/// Every desired app with domains, in name order, with its backends in id
/// order: the scheduler's `web` instances that are `up` (health passed), have
/// an address and are on a node not dead; those being drained stay, marked
/// `draining`, until their stop. Operator instances are not the scheduler's to
/// route.
pub fn table(
    token: Token,
    apps: &[DesiredApp],
    instances: &[Instance],
    registry: &Registry,
    draining: &BTreeSet<InstanceId>,
) -> RouteTable {
    let mut apps: Vec<AppRoutes> = apps
        .iter()
        .filter(|a| !a.domains.is_empty())
        .map(|a| AppRoutes {
            app: a.name.clone(),
            domains: a.domains.clone(),
            backends: backends(&a.name, instances, registry, draining),
        })
        .collect();
    apps.sort_by(|a, b| a.app.cmp(&b.app));
    RouteTable { token, apps }
}

fn backends(
    app: &str,
    instances: &[Instance],
    registry: &Registry,
    draining: &BTreeSet<InstanceId>,
) -> Vec<Backend> {
    let mut out: Vec<Backend> = instances
        .iter()
        .filter(|i| i.app == app && i.owner == Owner::Scheduler && is_routed(&i.proc))
        .filter(|i| i.state == InstanceState::Up)
        .filter(|i| {
            registry
                .get(&i.node)
                .is_some_and(|n| n.liveness != Liveness::Dead)
        })
        .filter_map(|i| {
            Some(Backend {
                id: i.id.clone(),
                addr: i.addr.clone()?,
                draining: draining.contains(&i.id),
            })
        })
        .collect();
    out.sort_by(|a, b| a.id.cmp(&b.id));
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Instant;

    use super::*;
    use crate::placement::tests::{inst, nodes};

    fn app(name: &str, domains: &[&str]) -> DesiredApp {
        DesiredApp {
            name: name.into(),
            release: None,
            pending: None,
            formation: BTreeMap::new(),
            domains: domains.iter().map(|d| d.to_string()).collect(),
            health: BTreeMap::new(),
        }
    }

    /// Table: how the instance differs from an up scheduler web instance on an
    /// alive node → routed? (and draining?)
    #[test]
    fn which_instances_are_backends() {
        type Tweak = fn(&mut Instance, &mut Registry, &mut BTreeSet<InstanceId>);
        let cases: &[(&str, Tweak, Option<bool>)] = &[
            ("as is", |_, _, _| {}, Some(false)),
            (
                "starting",
                |i, _, _| i.state = InstanceState::Starting,
                None,
            ),
            ("backoff", |i, _, _| i.state = InstanceState::Backoff, None),
            ("crashed", |i, _, _| i.state = InstanceState::Crashed, None),
            (
                "stopping",
                |i, _, _| i.state = InstanceState::Stopping,
                None,
            ),
            ("worker", |i, _, _| i.proc = "worker".into(), None),
            ("no address", |i, _, _| i.addr = None, None),
            ("operator's", |i, _, _| i.owner = Owner::Operator, None),
            ("other app", |i, _, _| i.app = "other".into(), None),
            (
                "node dead",
                |_, r, _| r.get_mut("a").unwrap().liveness = Liveness::Dead,
                None,
            ),
            (
                "node suspect",
                |_, r, _| r.get_mut("a").unwrap().liveness = Liveness::Suspect,
                Some(false),
            ),
            ("node unknown", |_, r, _| r.clear(), None),
            (
                "draining",
                |i, _, d| {
                    d.insert(i.id.clone());
                },
                Some(true),
            ),
        ];
        for (name, tweak, want) in cases {
            let mut i = inst("shop.web.1", "shop", "web", "a", 256);
            let mut reg = nodes(Instant::now(), &["a"], 1024);
            let mut draining = BTreeSet::new();
            tweak(&mut i, &mut reg, &mut draining);
            let t = table(9, &[app("shop", &["shop.example"])], &[i], &reg, &draining);
            let got = t.apps[0].backends.first().map(|b| b.draining);
            assert_eq!(got, *want, "{name}");
            assert_eq!(t.token, 9);
        }
    }

    #[test]
    fn apps_without_domains_are_left_out_and_the_rest_are_sorted() {
        let reg = nodes(Instant::now(), &["a"], 1024);
        let ins = vec![
            inst("z.web.2", "z", "web", "a", 1),
            inst("z.web.1", "z", "web", "a", 1),
        ];
        let apps = [
            app("z", &["z.example"]),
            app("hidden", &[]),
            app("b", &["b.example"]),
        ];
        let t = table(1, &apps, &ins, &reg, &BTreeSet::new());
        let names: Vec<&str> = t.apps.iter().map(|a| a.app.as_str()).collect();
        assert_eq!(names, ["b", "z"]);
        let ids: Vec<&str> = t.apps[1].backends.iter().map(|b| b.id.as_str()).collect();
        assert_eq!(ids, ["z.web.1", "z.web.2"]);
        assert!(t.apps[0].backends.is_empty());
    }
}
