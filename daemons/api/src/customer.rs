//! The customers' verbs that other daemons carry out: `app.instances` and
//! `app.logs` (every alive runner asked with `instance.list` / `instance.logs`,
//! the app's instances kept), the `run.*` one-offs (proxied to a runner, see
//! `runs`), `ps.restart` and the placement check of `formation.scale` (asked of
//! the leading scheduler). Each first authorizes the caller on the app, as
//! `build.list` does, and shows nothing of another app. Other daemons are
//! reached with the cluster key, through `ctx.calls()`.

use std::time::{Duration, Instant};

use paddock_daemon::calls::FindError;
use paddock_wire::kinds::{self, InstanceInfo, InstanceList, LogLines};
use paddock_wire::{now_ms, ClientError, Code, WireError};
use rand::seq::SliceRandom;
use serde_json::{json, Value};

use crate::body::Body;
use crate::store::Reply;
use crate::{logs, runs, Api, Who};

/// How long a runner gets to list its instances or return an instance's lines.
const LIST_TIMEOUT: Duration = Duration::from_secs(5);
/// A one-off's start: the first one of a slug on a node fetches and unpacks it.
const START_TIMEOUT: Duration = Duration::from_secs(120);
/// `run.output`'s long poll, at most.
const MAX_WAIT_MS: i64 = 20_000;
/// `run.input`'s `data` (base64) at most: 48 KiB of keystrokes or pasted text.
const MAX_INPUT_B64: usize = 64 << 10;
/// A one-off's command line, or its argv's total, at most.
const MAX_COMMAND: usize = 16 << 10;
/// Instances whose lines one `app.logs` reads at most (a formation has at most
/// 100 per type).
const MAX_LOG_INSTANCES: usize = 200;
/// Lines asked of each instance when following (a poll a second or so).
const FOLLOW_LINES: usize = 500;
/// How long the leading scheduler gets for `formation.check` and `app.restart`,
/// and one that does not lead (it answers `unavailable`, which is retried).
const LEADER_TIMEOUT: Duration = Duration::from_secs(5);
const FOLLOWER_TIMEOUT: Duration = Duration::from_secs(2);

/// An app's instance and where it runs.
struct Placed {
    endpoint: String,
    node: String,
    info: InstanceInfo,
}

/// A process type's name as the runner takes it: 1-30 of `[a-z0-9_-]`.
fn valid_type(t: &str) -> bool {
    (1..=30).contains(&t.len())
        && t.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_' || c == b'-')
}

fn opt_type<'a>(b: &Body<'a>) -> Result<Option<&'a str>, WireError> {
    match b.opt_str("type")? {
        Some(t) if !valid_type(t) => Err(WireError::invalid(
            "`type` must be a process type: 1-30 of a-z, 0-9, _ and -",
        )),
        t => Ok(t),
    }
}

/// `field` as an integer in `lo..=hi`, `def` when absent.
fn ranged(b: &Body, field: &str, lo: i64, hi: i64, def: i64) -> Result<i64, WireError> {
    match b.opt_i64(field)? {
        None => Ok(def),
        Some(n) if (lo..=hi).contains(&n) => Ok(n),
        Some(n) => Err(WireError::invalid(format!(
            "`{field}` must be {lo}-{hi}, not {n}"
        ))),
    }
}

/// One instance as the app's users see it: no pid, port, address or token.
/// `since`: when it came up (`up`), started (`starting`), or last ended.
pub fn instance_view(i: &InstanceInfo, now: i64) -> Value {
    let started = (i.uptime_ms > 0).then(|| now.saturating_sub(i.uptime_ms as i64));
    let since = match i.state.as_str() {
        "up" => i.up_at.or(started),
        "starting" => started,
        _ => i.last_exit.as_ref().map(|e| e.at),
    };
    let last_exit = i.last_exit.as_ref().map(|e| {
        json!({"code": e.code, "signal": e.signal, "oom": e.oom, "at": e.at, "reason": e.reason})
    });
    json!({"id": i.id, "type": i.proc, "release": i.release, "node": i.node, "state": i.state,
           "since": since, "restarts": i.restarts, "reason": i.reason, "last_exit": last_exit,
           "memory_mb": i.memory_mb})
}

/// Whether a scheduler's `formation.check` answer says the formation fits:
/// `{"placeable": false, …}` or `{"placed": N, "wanted": M}` with N < M do not
/// (a reply body's own `ok` cannot say so: the wire sets it on every answer).
pub fn placeable(reply: &Value) -> bool {
    match (reply["placed"].as_u64(), reply["wanted"].as_u64()) {
        (Some(placed), Some(wanted)) if placed < wanted => false,
        _ => reply["placeable"] != false,
    }
}

/// A call to another daemon failed: its own refusal as it wrote it; not reaching
/// it is `unavailable` (nothing was done that the caller can see).
fn reach_error(what: &str, e: ClientError) -> WireError {
    match e {
        ClientError::Remote(w) => w,
        other => {
            tracing::debug!("{what}: {other}");
            WireError::unavailable(format!("{what} did not answer in time; retry shortly"))
        }
    }
}

impl Api {
    /// Every alive runner's instances of `app`, by type then id; and the runners
    /// that could not be asked (`{"node", "error"}`; `node` null when no
    /// registry answered, so no runner could be found: a partial answer at
    /// once rather than an error to retry).
    async fn instances_of(&self, app: &str) -> (Vec<Placed>, Vec<Value>) {
        let calls = self.ctx.calls();
        let runners = match calls.services("runner").await {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!("finding the runners: {e}");
                let why = "no registry answered, so the runners could not be found";
                return (vec![], vec![json!({"node": null, "error": why})]);
            }
        };
        // Queued together, so the runners are asked at once.
        let pending: Vec<_> = runners
            .iter()
            .filter_map(|s| {
                let ep = s.endpoints.get("rpc")?.clone();
                let p = calls.call(&ep, kinds::INSTANCE_LIST, json!({}), LIST_TIMEOUT);
                Some((s.node.clone(), ep, p))
            })
            .collect();
        let (mut found, mut unreachable) = (vec![], vec![]);
        for (node, endpoint, p) in pending {
            let listed = p
                .await
                .map_err(|e| e.to_string())
                .and_then(|v| serde_json::from_value::<InstanceList>(v).map_err(|e| e.to_string()));
            match listed {
                Ok(l) => found.extend(l.instances.into_iter().filter(|i| i.app == app).map(
                    |info| Placed {
                        endpoint: endpoint.clone(),
                        node: node.clone(),
                        info,
                    },
                )),
                Err(e) => {
                    tracing::debug!(%node, "instance.list: {e}");
                    unreachable.push(json!({"node": node, "error": "the runner did not answer"}));
                }
            }
        }
        found.sort_by(|a, b| (&a.info.proc, &a.info.id).cmp(&(&b.info.proc, &b.info.id)));
        (found, unreachable)
    }

    /// `app.instances {"app"}`.
    pub(crate) async fn app_instances(&self, who: &Who, b: &Value) -> Result<Reply, WireError> {
        let app = self
            .store
            .authorize_app(who, b, "see its instances")
            .await?;
        let (found, unreachable) = self.instances_of(&app).await;
        let now = now_ms();
        let list: Vec<Value> = found.iter().map(|p| instance_view(&p.info, now)).collect();
        Ok((
            json!({"app": app, "instances": list, "unreachable": unreachable}),
            vec![],
        ))
    }

    /// `app.logs {"app", "lines"?, "type"?, "cursor"?}`.
    pub(crate) async fn app_logs(&self, who: &Who, b: &Value) -> Result<Reply, WireError> {
        let app = self.store.authorize_app(who, b, "read its logs").await?;
        let body = Body::of(b)?;
        let limit = ranged(&body, "lines", 1, logs::MAX_LINES, logs::DEFAULT_LINES)? as usize;
        let only = opt_type(&body)?;
        let cursor = body.opt("cursor").map(logs::Cursor::parse).transpose()?;
        let (mut found, unreachable) = self.instances_of(&app).await;
        found.retain(|p| only.is_none_or(|t| p.info.proc == t));
        let mut truncated = false;
        if found.len() > MAX_LOG_INSTANCES {
            // The ones running now first, then the most recently ended.
            found.sort_by_key(|p| (p.info.state != "up", -(p.info.uptime_ms as i64)));
            found.truncate(MAX_LOG_INSTANCES);
            truncated = true;
        }
        let per = if cursor.is_some() {
            FOLLOW_LINES
        } else {
            limit
        };
        let calls = self.ctx.calls();
        let pending: Vec<_> = found
            .into_iter()
            .map(|p| {
                let r = calls.call(
                    &p.endpoint,
                    kinds::INSTANCE_LOGS,
                    json!({"id": p.info.id, "lines": per}),
                    LIST_TIMEOUT,
                );
                (p, r)
            })
            .collect();
        let mut sources = vec![];
        for (p, r) in pending {
            match r.await.map(serde_json::from_value::<LogLines>) {
                Ok(Ok(l)) => sources.push(logs::Source {
                    instance: p.info.id,
                    proc: p.info.proc,
                    node: p.node,
                    lines: l.lines,
                }),
                // Gone meanwhile (removed after it stopped), or its runner did not
                // answer: its lines are missing from this reply, said by `unreachable`
                // for the second.
                Ok(Err(e)) => tracing::debug!(instance = %p.info.id, "instance.logs: {e}"),
                Err(ClientError::Remote(w)) if w.code == Code::NotFound => {}
                Err(e) => {
                    tracing::debug!(instance = %p.info.id, "instance.logs: {e}");
                    truncated = true;
                }
            }
        }
        let m = logs::merge(sources, cursor.as_ref(), limit, now_ms());
        Ok((
            json!({"app": app, "lines": m.lines, "cursor": m.cursor.to_json(),
                   "truncated": truncated || m.truncated, "unreachable": unreachable}),
            vec![],
        ))
    }

    /// `run.start {"app", "command" | "argv", "pty"?, "cols"?, "rows"?}`: a one-off
    /// of the app's current release on a runner.
    pub(crate) async fn run_start(&self, who: &Who, b: &Value) -> Result<Reply, WireError> {
        let body = Body::of(b)?;
        let command = body.opt_str("command")?.filter(|c| !c.trim().is_empty());
        let argv: Option<Vec<String>> = match body.opt("argv") {
            None => None,
            Some(v) => Some(
                serde_json::from_value(v.clone())
                    .ok()
                    .filter(|a: &Vec<String>| !a.is_empty() && a.len() <= 1024)
                    .ok_or_else(|| WireError::invalid("`argv` must be a list of 1-1024 strings"))?,
            ),
        };
        let size = match (&command, &argv) {
            (Some(c), None) => c.len(),
            (None, Some(a)) => a.iter().map(|s| s.len() + 1).sum(),
            _ => {
                return Err(WireError::invalid(
                    "give the command to run: `command` (a shell command line) or `argv` (a program and its arguments), one of them",
                ))
            }
        };
        if size > MAX_COMMAND || command.is_some_and(|c| c.contains('\0')) {
            return Err(WireError::invalid(format!(
                "the command must be at most {} KiB, without NUL bytes",
                MAX_COMMAND >> 10
            )));
        }
        let pty = body.opt_bool("pty")?.unwrap_or(true);
        let cols = ranged(&body, "cols", 1, 1000, 80)?;
        let rows = ranged(&body, "rows", 1, 1000, 24)?;
        let (app, version, slug) = self.store.run_target(who, b).await?;
        let owner = who.actor();
        let id = self
            .runs
            .borrow_mut()
            .reserve(&owner, &app, Instant::now())?;
        match self
            .start_one_off(&app, version, &slug, command, argv, pty, cols, rows)
            .await
        {
            Ok((endpoint, node, remote)) => {
                self.runs
                    .borrow_mut()
                    .started(&id, &endpoint, &node, &remote, Instant::now());
                // The command is not recorded: it may hold a secret.
                let detail = json!({"run": id, "release": version, "pty": pty, "node": node});
                if let Err(e) = self.store.audit_on(who, &app, "run.start", detail).await {
                    self.runs.borrow_mut().forget(&id);
                    self.kill_remote(&endpoint, &remote).await;
                    return Err(e);
                }
                tracing::info!(run = %id, app = %app, %node, by = %owner, "one-off started");
                Ok((
                    json!({"id": id, "app": app, "release": version, "node": node, "pty": pty}),
                    vec![],
                ))
            }
            Err(e) => {
                self.runs.borrow_mut().cancel(&id);
                Err(e)
            }
        }
    }

    /// Starts the one-off on an alive runner (any: one picked at random);
    /// (its endpoint, its node, the runner's id for it).
    #[allow(clippy::too_many_arguments)]
    async fn start_one_off(
        &self,
        app: &str,
        version: i32,
        slug: &str,
        command: Option<&str>,
        argv: Option<Vec<String>>,
        pty: bool,
        cols: i64,
        rows: i64,
    ) -> Result<(String, String, String), WireError> {
        let calls = self.ctx.calls();
        let runners = calls.services("runner").await.map_err(|e| {
            tracing::debug!("finding the runners: {e}");
            WireError::unavailable(
                "the api cannot reach the cluster's registry to find a runner; retry shortly",
            )
        })?;
        let choices: Vec<(String, String)> = runners
            .iter()
            .filter_map(|s| Some((s.node.clone(), s.endpoints.get("rpc")?.clone())))
            .collect();
        let Some((node, endpoint)) = choices.choose(&mut rand::thread_rng()).cloned() else {
            return Err(WireError::unavailable(
                "no runner is alive to run the command on; retry once one runs",
            ));
        };
        let slug = slug.strip_prefix("sha256:").unwrap_or(slug);
        let mut fwd = json!({"app": app, "release": {"slug": slug, "version": version},
                             "pty": pty, "cols": cols, "rows": rows});
        match (command, argv) {
            (Some(c), _) => fwd["command"] = json!(c),
            (None, Some(a)) => fwd["argv"] = json!(a),
            (None, None) => unreachable!("checked by run_start"),
        }
        let v = calls
            .call(&endpoint, kinds::RUN_START, fwd, START_TIMEOUT)
            .await
            .map_err(|e| reach_error(&format!("the runner on {node}"), e))?;
        let remote = v["id"]
            .as_str()
            .filter(|s| !s.is_empty())
            .ok_or_else(|| WireError::internal("the runner's run.start reply has no id"))?;
        Ok((endpoint, node, remote.to_string()))
    }

    /// Best effort: the run's processes killed on its runner.
    async fn kill_remote(&self, endpoint: &str, remote: &str) {
        let r = self
            .ctx
            .calls()
            .call(
                endpoint,
                kinds::RUN_KILL,
                json!({ "id": remote }),
                LIST_TIMEOUT,
            )
            .await;
        if let Err(e) = r {
            tracing::debug!(run = %remote, "run.kill: {e}");
        }
    }

    /// `run.input`, `run.resize`, `run.output`, `run.kill` on a one-off the caller
    /// started through this api.
    pub(crate) async fn run_op(
        &self,
        who: &Who,
        kind: &str,
        b: &Value,
    ) -> Result<Reply, WireError> {
        let body = Body::of(b)?;
        let id = body.str("id")?;
        if !runs::valid_id(id) {
            return Err(WireError::invalid(
                "`id` must be a one-off's id as run.start returned it (run-…)",
            ));
        }
        // The body's own checks first: a bad request reaches no runner.
        let (mut fwd, timeout) = match kind {
            kinds::RUN_INPUT => {
                let data = body.str("data")?;
                if data.len() > MAX_INPUT_B64 {
                    return Err(WireError::invalid(format!(
                        "`data` must be at most {} KiB of base64; send long input in pieces",
                        MAX_INPUT_B64 >> 10
                    )));
                }
                (json!({ "data": data }), Duration::from_secs(10))
            }
            kinds::RUN_RESIZE => (
                json!({"cols": ranged(&body, "cols", 1, 1000, 80)?, "rows": ranged(&body, "rows", 1, 1000, 24)?}),
                LIST_TIMEOUT,
            ),
            kinds::RUN_OUTPUT => {
                let offset = match body.opt("offset") {
                    None => 0,
                    Some(v) => v.as_u64().ok_or_else(|| {
                        WireError::invalid(
                            "`offset` must be an integer ≥ 0 (the last reply's next_offset)",
                        )
                    })?,
                };
                let wait = ranged(&body, "wait_ms", 0, MAX_WAIT_MS, 0)?;
                (
                    json!({"offset": offset, "wait_ms": wait}),
                    Duration::from_millis(wait as u64) + Duration::from_secs(10),
                )
            }
            _ => (json!({}), LIST_TIMEOUT),
        };
        let now = Instant::now();
        let run = self.runs.borrow_mut().get(id, &who.actor(), now)?;
        if now.saturating_duration_since(run.checked) >= runs::RECHECK {
            match self
                .store
                .authorize_app(who, &json!({"app": run.app}), "run commands in it")
                .await
            {
                Ok(_) => self.runs.borrow_mut().checked(id, now),
                Err(e) => {
                    // No longer theirs to use: the run goes.
                    self.runs.borrow_mut().forget(id);
                    self.kill_remote(&run.runner, &run.remote).await;
                    return Err(e);
                }
            }
        }
        fwd["id"] = json!(run.remote);
        let r = self
            .ctx
            .calls()
            .call(&run.runner, kind, fwd, timeout)
            .await
            .map_err(|e| match e {
                // The runner's words name its own id for the run: say ours.
                ClientError::Remote(mut w) => {
                    w.message = w.message.replace(&run.remote, id);
                    if w.code == Code::NotFound {
                        self.runs.borrow_mut().forget(id);
                    }
                    w
                }
                other => reach_error(
                    &format!("the runner on {} (holding one-off {id})", run.node),
                    other,
                ),
            })?;
        let reply = match kind {
            kinds::RUN_INPUT => json!({"written": r["written"]}),
            kinds::RUN_OUTPUT => {
                if r["done"] == true {
                    self.runs.borrow_mut().ended(id, Instant::now());
                }
                json!({"data": r["data"], "next_offset": r["next_offset"], "done": r["done"],
                       "exit_code": r["exit_code"]})
            }
            _ => json!({}),
        };
        Ok((reply, vec![]))
    }

    /// Forgets the one-offs nobody used for a while, killing those still running.
    pub(crate) async fn sweep_runs(&self) {
        let idle = self.runs.borrow_mut().sweep(Instant::now());
        for r in idle {
            tracing::info!(app = %r.app, node = %r.node, "a one-off nobody attached to for 10 minutes was killed");
            self.kill_remote(&r.runner, &r.remote).await;
        }
    }

    /// Calls `kind` on the leading scheduler (the registry's schedulers asked
    /// `scheduler.status` first; a follower answers `unavailable`). None: no
    /// scheduler is alive, or (unless `need_registry`) no registry answered.
    async fn scheduler_call(
        &self,
        kind: &str,
        body: Value,
        need_registry: bool,
    ) -> Result<Option<Value>, WireError> {
        let calls = self.ctx.calls();
        let endpoints = match calls.find("scheduler").await {
            Ok(e) => e,
            Err(FindError::NoneAlive { .. }) => return Ok(None),
            Err(e) if !need_registry => {
                tracing::debug!("finding the schedulers: {e}");
                return Ok(None);
            }
            Err(e) => {
                tracing::debug!("finding the schedulers: {e}");
                return Err(WireError::unavailable(
                    "the api cannot reach the cluster's registry to find the scheduler; nothing was done, retry shortly",
                ));
            }
        };
        let status: Vec<_> = endpoints
            .iter()
            .map(|ep| {
                let p = calls.call(ep, kinds::SCHEDULER_STATUS, json!({}), FOLLOWER_TIMEOUT);
                (ep.clone(), p)
            })
            .collect();
        let mut order = vec![];
        for (ep, p) in status {
            let leads = matches!(p.await, Ok(v) if v["leader"] == true);
            order.push((!leads, ep));
        }
        // Leaders first (there is one, but for a moment two may think so).
        order.sort_by_key(|(follower, _)| *follower);
        let mut last = String::from("no scheduler leads right now");
        for (follower, ep) in order {
            let t = if follower {
                FOLLOWER_TIMEOUT
            } else {
                LEADER_TIMEOUT
            };
            match calls.call(&ep, kind, body.clone(), t).await {
                Ok(v) => return Ok(Some(v)),
                Err(ClientError::Remote(w)) if w.code == Code::Unavailable => last = w.message,
                Err(ClientError::Remote(w)) => return Err(w),
                Err(e) => {
                    tracing::debug!("{kind} to a scheduler: {e}");
                    last = "a scheduler did not answer".into();
                }
            }
        }
        Err(WireError::unavailable(format!(
            "no scheduler could answer {kind} ({last}); nothing was done, retry shortly"
        )))
    }

    /// `ps.restart {"app", "type"?}`: a rolling restart by the scheduler.
    pub(crate) async fn ps_restart(&self, who: &Who, b: &Value) -> Result<Reply, WireError> {
        let (app, formation) = self.store.app_formation(who, b, "restart it").await?;
        let body = Body::of(b)?;
        let only = opt_type(&body)?;
        if let Some(t) = only {
            if !formation.iter().any(|f| f["type"] == t) {
                let have: Vec<&str> = formation
                    .iter()
                    .filter_map(|f| f["type"].as_str())
                    .collect();
                return Err(WireError::invalid(if have.is_empty() {
                    format!("{app} has no process types yet: push a build first")
                } else {
                    format!(
                        "{app} has no process type {t:?}; its types are {}",
                        have.join(", ")
                    )
                }));
            }
        }
        let mut fwd = json!({ "app": app });
        if let Some(t) = only {
            fwd["type"] = json!(t);
        }
        let r = self
            .scheduler_call(kinds::APP_RESTART, fwd, true)
            .await?
            .ok_or_else(|| {
                WireError::unavailable(
                    "no scheduler is running, so nothing restarts instances: ask your operator to start paddock-scheduler",
                )
            })?;
        let version = r["version"].clone();
        self.store
            .audit_on(
                who,
                &app,
                "ps.restart",
                json!({"type": only, "version": version}),
            )
            .await?;
        Ok((
            json!({"app": app, "type": only, "version": version}),
            vec![],
        ))
    }

    /// `formation.scale`'s placement check, asked while the change is not yet
    /// committed: `{"checked": false}` with no scheduler alive (nothing would
    /// place it yet) or no registry to find one in (the check is advice: the
    /// scheduler places what it can); a formation the scheduler cannot place is
    /// refused with its words ("2 of 4 web placed: …") and the change is
    /// rolled back.
    pub(crate) async fn check_placement(
        &self,
        app: String,
        formation: Vec<Value>,
    ) -> Result<Value, WireError> {
        let f: Vec<Value> = formation
            .iter()
            .map(|x| json!({"type": x["type"], "quantity": x["quantity"], "memory_mb": x["memory_mb"]}))
            .collect();
        let r = match self
            .scheduler_call(
                kinds::FORMATION_CHECK,
                json!({"app": app, "formation": f}),
                false,
            )
            .await
        {
            Ok(None) => return Ok(json!({ "checked": false })),
            // A scheduler from before the check existed places what it can.
            Err(e) if e.code == Code::UnknownKind => return Ok(json!({ "checked": false })),
            Err(e) => return Err(e),
            Ok(Some(r)) => r,
        };
        let message = r["message"].as_str().unwrap_or_default().to_string();
        if placeable(&r) {
            return Ok(json!({"checked": true, "message": message}));
        }
        let why = if message.is_empty() {
            "the cluster has no room for this formation".to_string()
        } else {
            message
        };
        Err(WireError::new(
            Code::Conflict,
            format!("cannot scale {app}: {why}; nothing was changed"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use paddock_wire::kinds::{LastExit, Owner};

    fn info(state: &str) -> InstanceInfo {
        InstanceInfo {
            id: "shop.web.v3.t9.1".into(),
            app: "shop".into(),
            proc: "web".into(),
            pid: Some(4242),
            port: 20001,
            state: state.into(),
            restarts: 2,
            uptime_ms: 5000,
            last_exit: Some(LastExit {
                code: Some(1),
                signal: None,
                oom: false,
                at: 900,
                reason: "exited with status 1".into(),
            }),
            node: "node-b".into(),
            reason: None,
            addr: Some("10.0.0.5:20001".into()),
            release: Some(3),
            token: Some(9),
            up_at: Some(7000),
            owner: Owner::Scheduler,
            memory_mb: Some(512),
        }
    }

    #[test]
    fn an_instance_shows_its_state_since_when_and_nothing_of_the_node() {
        let v = instance_view(&info("up"), 10_000);
        assert_eq!(v["since"], 7000, "up: since its first passing check");
        assert_eq!(
            (&v["type"], &v["release"], &v["node"], &v["state"]),
            (&json!("web"), &json!(3), &json!("node-b"), &json!("up"))
        );
        for hidden in ["pid", "port", "addr", "token", "owner"] {
            assert!(v.get(hidden).is_none(), "{hidden} shown: {v}");
        }
        let mut i = info("up");
        i.up_at = None;
        assert_eq!(instance_view(&i, 10_000)["since"], 5000);
        assert_eq!(instance_view(&info("starting"), 10_000)["since"], 5000);
        let v = instance_view(&info("crashed"), 10_000);
        assert_eq!(v["since"], 900, "ended: since it last exited");
        assert_eq!(v["last_exit"]["reason"], "exited with status 1");
        let mut i = info("stopped");
        i.last_exit = None;
        assert_eq!(instance_view(&i, 10_000)["since"], Value::Null);
    }

    #[test]
    fn a_placement_answer_fits_unless_it_says_fewer_were_placed() {
        assert!(placeable(&json!({"ok": true})));
        assert!(placeable(&json!({"ok": true, "message": "fits"})));
        assert!(placeable(
            &json!({"placeable": true, "placed": 4, "wanted": 4})
        ));
        assert!(!placeable(&json!({"placeable": false, "message": "no"})));
        // The wire sets `ok: true` on every answer, whatever the body said.
        assert!(!placeable(
            &json!({"ok": true, "placed": 2, "wanted": 4, "message": "2 of 4 web placed"})
        ));
    }

    #[test]
    fn process_type_names_follow_the_runners_rule() {
        for ok in ["web", "worker_2", "a-b", &"x".repeat(30)] {
            assert!(valid_type(ok), "{ok}");
        }
        for bad in ["", "Web", "web.1", "a b", &"x".repeat(31), "../x"] {
            assert!(!valid_type(bad), "{bad}");
        }
    }
}
