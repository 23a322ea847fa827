//! `app.logs`: an app's instances' lines, as each runner keeps them, merged in
//! time order, and the cursor that lets a follower ask for only what is new.
//! Pure: the api's glue asks the runners and hands their answers here.
//!
//! The cursor is `{"at", "seen": {instance: [ts, n]}}`: for each instance the
//! timestamp of the last line returned and how many lines with that timestamp
//! were returned (lines of one instance come in order, and several may share a
//! millisecond); `at` is when the reply was made, so an instance that was not
//! there yet shows its lines from then on. A client passes it back unchanged.

use std::collections::BTreeMap;

use paddock_wire::kinds::LogLine;
use paddock_wire::WireError;
use serde_json::{json, Value};

/// At most this many lines in one reply (`lines` may ask for fewer).
pub const MAX_LINES: i64 = 1000;
/// The default `lines`.
pub const DEFAULT_LINES: i64 = 100;
/// The lines' text in one reply at most: the newest are kept.
pub const MAX_BYTES: usize = 512 << 10;
/// Instances in a cursor at most (an app has at most 100 per process type).
pub const MAX_CURSOR_INSTANCES: usize = 2000;

/// One instance and the lines its runner returned (oldest first).
pub struct Source {
    pub instance: String,
    pub proc: String,
    pub node: String,
    pub lines: Vec<LogLine>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Cursor {
    pub at: i64,
    pub seen: BTreeMap<String, (i64, u64)>,
}

impl Cursor {
    pub fn to_json(&self) -> Value {
        let seen: serde_json::Map<String, Value> = self
            .seen
            .iter()
            .map(|(k, (ts, n))| (k.clone(), json!([ts, n])))
            .collect();
        json!({"at": self.at, "seen": seen})
    }

    /// A cursor as a client sent it back; anything else is `invalid`.
    pub fn parse(v: &Value) -> Result<Cursor, WireError> {
        let bad = || {
            WireError::invalid(
                "`cursor` must be the `cursor` of an earlier app.logs reply, passed back unchanged",
            )
        };
        let at = v.get("at").and_then(Value::as_i64).ok_or_else(bad)?;
        let seen = v.get("seen").and_then(Value::as_object).ok_or_else(bad)?;
        if seen.len() > MAX_CURSOR_INSTANCES {
            return Err(bad());
        }
        let mut c = Cursor {
            at,
            seen: BTreeMap::new(),
        };
        for (id, pos) in seen {
            let pair = pos.as_array().filter(|a| a.len() == 2).ok_or_else(bad)?;
            let ts = pair[0].as_i64().ok_or_else(bad)?;
            let n = pair[1].as_u64().ok_or_else(bad)?;
            if id.is_empty() || id.len() > 200 {
                return Err(bad());
            }
            c.seen.insert(id.clone(), (ts, n));
        }
        Ok(c)
    }
}

/// What a merge gives: the lines (oldest first), the cursor for the next ask,
/// and whether lines were left out (past `limit` or [`MAX_BYTES`]).
pub struct Merged {
    pub lines: Vec<Value>,
    pub cursor: Cursor,
    pub truncated: bool,
}

/// The lines of `sources` after `cursor` (all of them without one), the newest
/// `limit`, in time order (ties: by instance, then as the instance wrote them).
pub fn merge(sources: Vec<Source>, cursor: Option<&Cursor>, limit: usize, now: i64) -> Merged {
    let mut next = Cursor {
        at: now,
        seen: BTreeMap::new(),
    };
    // (ts, instance, index within the instance, line)
    let mut picked: Vec<(i64, usize, usize, &LogLine)> = Vec::new();
    for (si, s) in sources.iter().enumerate() {
        let before = cursor.and_then(|c| c.seen.get(&s.instance).copied());
        // Where this instance's new lines start.
        let start = match (cursor, before) {
            (None, _) => 0,
            (Some(_), Some((ts, n))) => {
                let mut same = 0u64;
                s.lines
                    .iter()
                    .position(|l| {
                        if l.ts == ts {
                            same += 1;
                            same > n
                        } else {
                            l.ts > ts
                        }
                    })
                    .unwrap_or(s.lines.len())
            }
            // An instance new since the cursor was made: its lines from then on.
            (Some(c), None) => s
                .lines
                .iter()
                .position(|l| l.ts >= c.at)
                .unwrap_or(s.lines.len()),
        };
        for (i, l) in s.lines.iter().enumerate().skip(start) {
            picked.push((l.ts, si, i, l));
        }
        // Where the next ask starts: after the last line we were given (returned
        // or left out), counting the lines that share its timestamp.
        match s.lines.last() {
            Some(last) => {
                let same_in_tail =
                    s.lines.iter().rev().take_while(|l| l.ts == last.ts).count() as u64;
                // Lines with that timestamp returned earlier and no longer in the
                // tail the runner gave (it returns the newest N) still count.
                let n = match before {
                    Some((ts, n)) if ts == last.ts => n.max(same_in_tail),
                    _ => same_in_tail,
                };
                next.seen.insert(s.instance.clone(), (last.ts, n));
            }
            None => {
                if let Some(b) = before {
                    next.seen.insert(s.instance.clone(), b);
                }
            }
        }
    }
    picked.sort_by(|a, b| {
        (a.0, &sources[a.1].instance, a.2).cmp(&(b.0, &sources[b.1].instance, b.2))
    });
    let mut truncated = picked.len() > limit;
    let from = picked.len().saturating_sub(limit);
    let mut kept: Vec<Value> = Vec::new();
    let mut bytes = 0usize;
    for (ts, si, _, l) in picked[from..].iter().rev() {
        let s = &sources[*si];
        bytes += l.line.len() + s.instance.len() + 64;
        if bytes > MAX_BYTES {
            truncated = true;
            break;
        }
        kept.push(
            json!({"ts": ts, "instance": s.instance, "type": s.proc, "node": s.node,
                         "stream": l.stream, "line": l.line}),
        );
    }
    kept.reverse();
    Merged {
        lines: kept,
        cursor: next,
        truncated,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(ts: i64, text: &str) -> LogLine {
        LogLine {
            ts,
            stream: "stdout".into(),
            line: text.into(),
        }
    }

    fn src(id: &str, proc: &str, lines: &[(i64, &str)]) -> Source {
        Source {
            instance: id.into(),
            proc: proc.into(),
            node: "node-a".into(),
            lines: lines.iter().map(|(t, s)| line(*t, s)).collect(),
        }
    }

    fn texts(m: &Merged) -> Vec<&str> {
        m.lines
            .iter()
            .map(|l| l["line"].as_str().unwrap())
            .collect()
    }

    #[test]
    fn lines_of_several_instances_merge_in_time_order_and_the_newest_are_kept() {
        let a = src(
            "a",
            "web",
            &[(10, "a1"), (30, "a2"), (30, "a3"), (50, "a4")],
        );
        let b = src("b", "worker", &[(20, "b1"), (30, "b2"), (60, "b3")]);
        let m = merge(vec![b, a], None, 100, 1000);
        assert_eq!(texts(&m), ["a1", "b1", "a2", "a3", "b2", "a4", "b3"]);
        assert!(!m.truncated);
        assert_eq!(m.lines[1]["type"], "worker");
        assert_eq!(m.lines[1]["instance"], "b");
        assert_eq!(m.lines[1]["node"], "node-a");

        let a = src(
            "a",
            "web",
            &[(10, "a1"), (30, "a2"), (30, "a3"), (50, "a4")],
        );
        let b = src("b", "worker", &[(20, "b1"), (30, "b2"), (60, "b3")]);
        let m = merge(vec![a, b], None, 3, 1000);
        assert_eq!(texts(&m), ["b2", "a4", "b3"]);
        assert!(m.truncated);
    }

    #[test]
    fn a_cursor_returns_only_new_lines_even_within_one_millisecond() {
        let m = merge(
            vec![src("a", "web", &[(10, "a1"), (30, "a2"), (30, "a3")])],
            None,
            100,
            40,
        );
        let c = m.cursor.clone();
        assert_eq!(c.seen["a"], (30, 2));
        assert_eq!(c.at, 40);
        // Round trip through JSON, as a client sends it back.
        let c = Cursor::parse(&c.to_json()).unwrap();
        assert_eq!(c, m.cursor);

        // The runner's tail now: one more line in the same millisecond, one later;
        // and instance b appeared (its lines from `at` on).
        let a = src(
            "a",
            "web",
            &[(10, "a1"), (30, "a2"), (30, "a3"), (30, "a4"), (70, "a5")],
        );
        let b = src("b", "web", &[(35, "b-old"), (45, "b1")]);
        let m2 = merge(vec![a, b], Some(&c), 100, 80);
        assert_eq!(texts(&m2), ["a4", "b1", "a5"]);
        // Nothing new: nothing returned, the cursor stays where it was.
        let a = src("a", "web", &[(30, "a4"), (70, "a5")]);
        let b = src("b", "web", &[(45, "b1")]);
        let m3 = merge(vec![a, b], Some(&m2.cursor), 100, 90);
        assert!(m3.lines.is_empty(), "{:?}", texts(&m3));
        assert_eq!(m3.cursor.seen, m2.cursor.seen);
        // An instance that returned nothing keeps its place; one gone is dropped.
        let a = src("a", "web", &[]);
        let m4 = merge(vec![a], Some(&m2.cursor), 100, 95);
        assert_eq!(m4.cursor.seen.get("a"), m2.cursor.seen.get("a"));
        assert!(!m4.cursor.seen.contains_key("b"));
    }

    #[test]
    fn a_reply_is_bounded_in_bytes_keeping_the_newest() {
        let big = "x".repeat(100 << 10);
        let lines: Vec<(i64, &str)> = (0..10).map(|i| (i, big.as_str())).collect();
        let m = merge(vec![src("a", "web", &lines)], None, 100, 100);
        assert!(m.truncated);
        assert!(m.lines.len() < 10 && !m.lines.is_empty());
        assert_eq!(m.lines.last().unwrap()["ts"], 9);
        let text: usize = m
            .lines
            .iter()
            .map(|l| l["line"].as_str().unwrap().len())
            .sum();
        assert!(text <= MAX_BYTES);
    }

    #[test]
    fn bad_cursors_are_refused() {
        for bad in [
            json!(null),
            json!("x"),
            json!({"at": 1}),
            json!({"at": "1", "seen": {}}),
            json!({"at": 1, "seen": {"a": [1]}}),
            json!({"at": 1, "seen": {"a": [1, -1]}}),
            json!({"at": 1, "seen": {"a": "1,2"}}),
        ] {
            let e = Cursor::parse(&bad).unwrap_err();
            assert!(e.message.contains("`cursor`"), "{bad}: {}", e.message);
        }
        let many: serde_json::Map<String, Value> = (0..=MAX_CURSOR_INSTANCES)
            .map(|i| (format!("i{i}"), json!([1, 1])))
            .collect();
        assert!(Cursor::parse(&json!({"at": 1, "seen": many})).is_err());
    }
}
