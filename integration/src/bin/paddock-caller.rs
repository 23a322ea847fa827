//! A test-only daemon that drives the BaseDaemon's outgoing client end to end, so
//! integration tests can prove daemon-to-daemon calls through a real process:
//!
//! - `test.call {endpoint, kind, body, timeout_ms}`: `ctx.calls().call(…)`
//! - `test.call_daemon {daemon, kind, body, timeout_ms}`: found through the registry
//! - `test.find {daemon}`: the endpoints `find` returns
//! - `test.subscribe {endpoint, prefix}` then `test.events {}`: what arrived so far
//!
//! Outcomes of the outgoing call are reported inside an `ok: true` reply
//! (`{"reply": …}` or `{"error": {"variant", "message"}}`), so the test's own client
//! never mistakes a forwarded `timeout` for one of its own to retry. Never installed.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

use paddock_daemon::calls::CallError;
use paddock_daemon::{body, Ctx, Routes, Spec};
use paddock_wire::ClientError;
use serde::Deserialize;
use serde_json::{json, Value};

#[derive(Deserialize)]
struct Call {
    endpoint: String,
    kind: String,
    #[serde(default = "empty")]
    body: Value,
    timeout_ms: u64,
}

#[derive(Deserialize)]
struct CallDaemon {
    daemon: String,
    kind: String,
    #[serde(default = "empty")]
    body: Value,
    timeout_ms: u64,
}

#[derive(Deserialize)]
struct Find {
    daemon: String,
}

#[derive(Deserialize)]
struct Subscribe {
    endpoint: String,
    #[serde(default)]
    prefix: String,
}

fn empty() -> Value {
    json!({})
}

fn client_variant(e: &ClientError) -> String {
    match e {
        ClientError::Remote(w) => format!("remote:{}", w.code),
        ClientError::NotConnected { .. } => "not_connected".into(),
        ClientError::Timeout { .. } => "timeout".into(),
        ClientError::Protocol { .. } => "protocol".into(),
        ClientError::Zmq { .. } => "zmq".into(),
        ClientError::TooManyCalls { .. } => "too_many_calls".into(),
        ClientError::Stopped => "stopped".into(),
        ClientError::BadEndpoint { .. } => "bad_endpoint".into(),
    }
}

fn outcome(r: Result<Value, CallError>) -> Value {
    match r {
        Ok(v) => json!({"reply": v}),
        Err(e) => {
            let variant = match &e {
                CallError::Call(c) => client_variant(c),
                CallError::Find(_) => "find".into(),
            };
            json!({"error": {"variant": variant, "message": e.to_string()}})
        }
    }
}

async fn setup(ctx: Ctx) -> anyhow::Result<Routes> {
    let events: Rc<RefCell<Vec<Value>>> = Rc::new(RefCell::new(Vec::new()));
    let (c1, c2, c3, c4) = (ctx.clone(), ctx.clone(), ctx.clone(), ctx.clone());
    let ev = events.clone();
    Ok(Routes::new()
        .on("test.call", move |env| {
            let ctx = c1.clone();
            async move {
                let c: Call = body(&env)?;
                // Logged inside the dispatcher's span: the line carries kind and from.
                tracing::info!(endpoint = %c.endpoint, "forwarding {}", c.kind);
                let r = ctx
                    .calls()
                    .call(
                        &c.endpoint,
                        &c.kind,
                        c.body,
                        Duration::from_millis(c.timeout_ms),
                    )
                    .await;
                Ok(outcome(r.map_err(CallError::from)))
            }
        })
        .on("test.call_daemon", move |env| {
            let ctx = c2.clone();
            async move {
                let c: CallDaemon = body(&env)?;
                let r = ctx
                    .calls()
                    .call_daemon_timeout(
                        &c.daemon,
                        &c.kind,
                        c.body,
                        Duration::from_millis(c.timeout_ms),
                    )
                    .await;
                Ok(outcome(r))
            }
        })
        .on("test.find", move |env| {
            let ctx = c3.clone();
            async move {
                let f: Find = body(&env)?;
                Ok(match ctx.calls().find(&f.daemon).await {
                    Ok(eps) => json!({"endpoints": eps}),
                    Err(e) => json!({"error": {"variant": "find", "message": e.to_string()}}),
                })
            }
        })
        .on("test.subscribe", move |env| {
            let ctx = c4.clone();
            let events = ev.clone();
            async move {
                let s: Subscribe = body(&env)?;
                let mut rx = ctx
                    .calls()
                    .subscribe(&s.endpoint, &s.prefix)
                    .map_err(|e| paddock_wire::WireError::invalid(e.to_string()))?;
                tokio::task::spawn_local(async move {
                    while let Some(e) = rx.recv().await {
                        events.borrow_mut().push(json!({
                            "kind": e.kind,
                            "from": e.from,
                            "body": e.body,
                        }));
                    }
                });
                Ok(json!({}))
            }
        })
        .on("test.events", move |_| {
            let events = events.clone();
            async move { Ok(json!({"events": events.borrow().clone()})) }
        }))
}

fn main() {
    paddock_daemon::main(
        Spec {
            name: "caller",
            version: env!("CARGO_PKG_VERSION"),
            pull: false,
            publish: false,
            check: paddock_daemon::no_check,
            push_to: paddock_daemon::no_push_to,
            user_keys: None,
        },
        setup,
    )
}
