//! paddock-api against a real PostgreSQL and real daemon processes: user keys,
//! the authorization matrix, releases under concurrency, audit, crash safety.

use paddock_integration::api::*;
use paddock_integration::*;
use paddock_wire::{ClientError, Code};
use serde_json::{json, Value};

fn code(r: Result<Value, ClientError>) -> Code {
    match r {
        Ok(v) => panic!("expected an error, got {v}"),
        Err(e) => e
            .code()
            .cloned()
            .unwrap_or_else(|| panic!("not a remote error: {e}")),
    }
}

fn api_node(t: &TestDir, pg: &Postgres) -> Node {
    let key = test_key();
    let mut n = Node::new(t.path(), "node-a", &key, &[], Some(pg.url()));
    n.start("api");
    n
}

#[test]
fn a_user_key_works_end_to_end() {
    let t = TestDir::new("api-smoke");
    let pg = Postgres::start(t.path());
    let n = api_node(&t, &pg);
    let alice = create_user(&n, "alice", false);
    let mut c = user_client(&alice);
    let me = c.call("whoami", json!({})).unwrap();
    assert_eq!(me["user"], "alice");
    let app = c.call("app.create", json!({"name": "myapp"})).unwrap();
    assert_eq!(app["app"]["domains"], json!(["myapp.localhost"]));
    let r = c
        .call("config.set", json!({"app": "myapp", "vars": {"A": "1"}}))
        .unwrap();
    assert_eq!(r["release"]["version"], 2);
    let bob = create_user(&n, "bob", false);
    let r = user_client(&bob).call("app.info", json!({"app": "myapp"}));
    assert_eq!(code(r), Code::Forbidden);
}
