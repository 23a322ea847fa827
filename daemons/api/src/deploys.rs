//! `deploy.list` / `deploy.info`: each deploy's trail, read from the app's audit
//! log, where the scheduler writes it (`audit.append`, cluster key only):
//! `scheduler.progress {"version", "line"}`, `scheduler.deploy {"version",
//! "outcome"}` and `scheduler.alert {"reason", "version"?}`. Pure: the store
//! reads the rows, this groups them.
//!
//! A deploy is a version's events. An alert without a version belongs to the
//! deploy that had most recently begun when it was written. A version deployed
//! again (a restart of the same release) has several runs, each ended by an
//! outcome: the summary is its latest run's, and `runs` says how many.

use std::collections::BTreeMap;

use serde_json::{json, Value};

pub const PROGRESS: &str = "scheduler.progress";
pub const OUTCOME: &str = "scheduler.deploy";
pub const ALERT: &str = "scheduler.alert";
/// The audit kinds a deploy's trail is made of.
pub const KINDS: [&str; 3] = [PROGRESS, OUTCOME, ALERT];

/// One audit row of the scheduler's.
#[derive(Debug, Clone)]
pub struct Event {
    pub id: i64,
    pub at: i64,
    pub kind: String,
    pub detail: Value,
}

/// One line of a trail: `kind` is `progress` or `alert`.
#[derive(Debug, Clone, PartialEq)]
pub struct Line {
    pub at: i64,
    pub kind: &'static str,
    pub line: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Deploy {
    pub version: i64,
    /// The latest run's outcome; None while it runs.
    pub outcome: Option<String>,
    /// The latest run's first event and its outcome's.
    pub started_at: i64,
    pub finished_at: Option<i64>,
    pub runs: u32,
    pub alerts: u32,
    /// Every line of every run, oldest first.
    pub lines: Vec<Line>,
    /// The id of its first event (which deploy an alert belongs to).
    first_id: i64,
}

impl Deploy {
    pub fn summary(&self) -> Value {
        json!({"version": self.version, "outcome": self.outcome, "started_at": self.started_at,
               "finished_at": self.finished_at, "runs": self.runs, "alerts": self.alerts,
               "lines": self.lines.len()})
    }

    pub fn with_lines(&self) -> Value {
        let mut v = self.summary();
        v["lines"] = self
            .lines
            .iter()
            .map(|l| json!({"at": l.at, "kind": l.kind, "line": l.line}))
            .collect();
        v
    }
}

/// A detail's `version`: a positive integer, else none.
pub fn version_of(detail: &Value) -> Option<i64> {
    detail
        .get("version")
        .and_then(Value::as_i64)
        .filter(|v| (1..=i64::from(i32::MAX)).contains(v))
}

/// Text from the scheduler, bounded for the reply.
fn text(v: &Value, field: &str) -> String {
    let s = v.get(field).and_then(Value::as_str).unwrap_or("");
    let mut s: String = s.chars().take(2000).collect();
    if s.is_empty() {
        s = "(no text)".into();
    }
    s
}

/// A progress line this long after a version's outcome begins another run of
/// it (a restart of the same release). The scheduler writes each line in the
/// background, so the lines that close a run may arrive just after its outcome.
pub const RUN_GAP_MS: i64 = 5000;

/// The deploys `events` (in any order) make, newest version first.
pub fn trail(events: &[Event]) -> Vec<Deploy> {
    let mut events: Vec<&Event> = events.iter().collect();
    events.sort_by_key(|e| e.id);
    let mut by_version: BTreeMap<i64, Deploy> = BTreeMap::new();
    for e in events {
        if !KINDS.contains(&e.kind.as_str()) {
            continue;
        }
        let version = match version_of(&e.detail) {
            Some(v) => v,
            // An alert without a version: the deploy begun most recently.
            None if e.kind == ALERT => match by_version
                .values()
                .filter(|d| d.first_id < e.id)
                .max_by_key(|d| d.first_id)
            {
                Some(d) => d.version,
                None => continue,
            },
            None => continue,
        };
        let d = by_version.entry(version).or_insert_with(|| Deploy {
            version,
            outcome: None,
            started_at: e.at,
            finished_at: None,
            runs: 1,
            alerts: 0,
            lines: vec![],
            first_id: e.id,
        });
        match e.kind.as_str() {
            PROGRESS => {
                if d.finished_at.is_some_and(|f| e.at - f > RUN_GAP_MS) {
                    d.runs += 1;
                    d.outcome = None;
                    d.finished_at = None;
                    d.started_at = e.at;
                }
                let line = text(&e.detail, "line");
                // The scheduler says an alert's reason as a progress line too.
                if !d.lines.iter().any(|l| l.kind == "alert" && l.line == line) {
                    d.lines.push(Line {
                        at: e.at,
                        kind: "progress",
                        line,
                    });
                }
            }
            ALERT => {
                d.alerts += 1;
                let line = text(&e.detail, "reason");
                match d
                    .lines
                    .iter_mut()
                    .find(|l| l.kind == "progress" && l.line == line)
                {
                    Some(l) => l.kind = "alert",
                    None => d.lines.push(Line {
                        at: e.at,
                        kind: "alert",
                        line,
                    }),
                }
            }
            // The outcome is the summary's; the scheduler's own line says it.
            _ => {
                d.outcome = Some(text(&e.detail, "outcome"));
                d.finished_at = Some(e.at);
            }
        }
    }
    by_version.into_values().rev().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(id: i64, kind: &str, detail: Value) -> Event {
        Event {
            id,
            at: 1000 + id,
            kind: kind.into(),
            detail,
        }
    }

    fn lines(d: &Deploy) -> Vec<(&str, &str)> {
        d.lines.iter().map(|l| (l.kind, l.line.as_str())).collect()
    }

    #[test]
    fn events_group_into_deploys_newest_first_with_alerts_attached() {
        let events = vec![
            ev(1, PROGRESS, json!({"version": 2, "line": "web.1 up"})),
            ev(2, PROGRESS, json!({"version": 2, "line": "web.2 up"})),
            ev(3, OUTCOME, json!({"version": 2, "outcome": "succeeded"})),
            // The scheduler's closing line may come just after the outcome.
            ev(
                4,
                PROGRESS,
                json!({"version": 2, "line": "the deploy of v2 succeeded"}),
            ),
            ev(5, PROGRESS, json!({"version": 3, "line": "web.1 starting"})),
            ev(6, ALERT, json!({"reason": "web.1 of v3 crashed 3 times"})),
            // The same reason as a progress line: one line, an alert.
            ev(
                7,
                PROGRESS,
                json!({"version": 3, "line": "web.1 of v3 crashed 3 times"}),
            ),
            ev(9, OUTCOME, json!({"version": 3, "outcome": "rolled_back"})),
            ev(
                8,
                PROGRESS,
                json!({"version": 3, "line": "rolling back to v2"}),
            ),
            // Junk: no version, a version that is not a number, an unknown kind.
            ev(10, PROGRESS, json!({"line": "?"})),
            ev(11, PROGRESS, json!({"version": "4", "line": "?"})),
            ev(12, "scheduler.other", json!({"version": 3})),
        ];
        let d = trail(&events);
        assert_eq!(d.len(), 2);
        assert_eq!(d[0].version, 3);
        assert_eq!(d[0].outcome.as_deref(), Some("rolled_back"));
        assert_eq!((d[0].started_at, d[0].finished_at), (1005, Some(1009)));
        assert_eq!(d[0].alerts, 1);
        assert_eq!(
            lines(&d[0]),
            [
                ("progress", "web.1 starting"),
                ("alert", "web.1 of v3 crashed 3 times"),
                ("progress", "rolling back to v2"),
            ]
        );
        assert_eq!(d[1].version, 2);
        assert_eq!(d[1].outcome.as_deref(), Some("succeeded"));
        assert_eq!(d[1].runs, 1, "a line right after the outcome is that run's");
        assert_eq!(d[1].lines.len(), 3);
        assert_eq!(
            d[1].summary(),
            json!({"version": 2, "outcome": "succeeded", "started_at": 1001, "finished_at": 1003,
                   "runs": 1, "alerts": 0, "lines": 3})
        );
        // A progress line first, then the alert of the same reason: one line.
        let d = trail(&[
            ev(1, PROGRESS, json!({"version": 1, "line": "boom"})),
            ev(2, ALERT, json!({"reason": "boom"})),
        ]);
        assert_eq!(lines(&d[0]), [("alert", "boom")]);
        assert_eq!(d[0].alerts, 1);
    }

    #[test]
    fn a_running_deploy_has_no_outcome_and_a_later_redeploy_is_a_second_run() {
        let mut late = ev(
            3,
            PROGRESS,
            json!({"version": 5, "line": "restarting web of v5"}),
        );
        late.at += RUN_GAP_MS + 1;
        let events = vec![
            ev(1, PROGRESS, json!({"version": 5, "line": "web.1 up"})),
            ev(2, OUTCOME, json!({"version": 5, "outcome": "succeeded"})),
            late.clone(),
        ];
        let d = trail(&events);
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].outcome, None);
        assert_eq!(d[0].finished_at, None);
        assert_eq!((d[0].runs, d[0].started_at), (2, late.at));
        assert_eq!(d[0].lines.len(), 2);
        // An alert before any deploy belongs to none.
        let d = trail(&[ev(1, ALERT, json!({"reason": "x"}))]);
        assert!(d.is_empty());
        // An alert that names its version goes there.
        let d = trail(&[
            ev(1, PROGRESS, json!({"version": 1, "line": "a"})),
            ev(2, PROGRESS, json!({"version": 2, "line": "b"})),
            ev(3, ALERT, json!({"version": 1, "reason": "r"})),
        ]);
        assert_eq!((d[1].version, d[1].alerts), (1, 1));
        assert_eq!(d[0].alerts, 0);
    }
}
