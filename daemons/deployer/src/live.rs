//! A build's log and state in memory, as `build.log` long-polls read them: the
//! limits on what is kept and the reply's rules, pure and unit-tested.

use std::rc::Rc;

use serde_json::{json, Value};
use tokio::sync::Notify;

/// Log lines and bytes kept per build; later lines are counted and dropped
/// (the build's outcome lines are always kept).
pub const MAX_LOG_LINES: usize = 50_000;
pub const MAX_LOG_BYTES: usize = 8 << 20;
/// Lines in one `build.log` reply at most.
pub const MAX_REPLY_LINES: usize = 2_000;

/// A build this deployer runs (or ran lately).
pub struct Live {
    pub app: String,
    pub lines: Vec<String>,
    pub dropped: usize,
    bytes: usize,
    /// Lines the database has.
    pub flushed: usize,
    pub step: &'static str,
    pub done: bool,
    pub status: &'static str,
    pub error: Option<Value>,
    pub release: Option<Value>,
    /// Each step's milliseconds, once the build ended.
    pub durations: Option<Value>,
    /// A flush is writing lines now.
    pub flushing: bool,
    /// The step the database has.
    pub saved_step: &'static str,
    /// Woken at every new line and when the build ends.
    pub changed: Rc<Notify>,
}

impl Live {
    pub fn new(app: &str) -> Live {
        Live {
            app: app.to_string(),
            lines: Vec::new(),
            dropped: 0,
            bytes: 0,
            flushed: 0,
            step: "source",
            done: false,
            status: "running",
            error: None,
            release: None,
            durations: None,
            flushing: false,
            saved_step: "source",
            changed: Rc::new(Notify::new()),
        }
    }

    /// Appends a line and wakes readers; past the limits the line is dropped,
    /// and the first drop says so in the log.
    pub fn push(&mut self, line: String) {
        if self.lines.len() >= MAX_LOG_LINES || self.bytes + line.len() > MAX_LOG_BYTES {
            self.dropped += 1;
            if self.dropped == 1 {
                self.lines.push(format!(
                    " !     The build's output is over the log's limit ({MAX_LOG_LINES} lines, {} MiB): the rest is not kept",
                    MAX_LOG_BYTES >> 20
                ));
                self.changed.notify_waiters();
            }
            return;
        }
        self.bytes += line.len() + 1;
        self.lines.push(line);
        self.changed.notify_waiters();
    }

    /// A line kept whatever the limits: the build's outcome.
    pub fn push_outcome(&mut self, line: String) {
        self.lines.push(line);
        self.changed.notify_waiters();
    }

    /// The `build.log` reply for lines after `after`: at most
    /// [`MAX_REPLY_LINES`]; `done` only once the build ended and every line
    /// was given.
    pub fn reply(&self, id: &str, after: usize) -> Value {
        let from = after.min(self.lines.len());
        let to = (from + MAX_REPLY_LINES).min(self.lines.len());
        let mut v = json!({
            "build": id,
            "app": self.app,
            "lines": self.lines[from..to],
            "next": to,
            "done": self.done && to == self.lines.len(),
            "status": self.status,
            "step": self.step,
        });
        if let Some(r) = &self.release {
            v["release"] = r.clone();
        }
        if let Some(e) = &self.error {
            v["error"] = e.clone();
        }
        if let Some(d) = &self.durations {
            v["durations"] = d.clone();
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_page_and_are_done_only_at_the_end() {
        let mut l = Live::new("shop");
        for i in 0..(MAX_REPLY_LINES + 5) {
            l.push(format!("line {i}"));
        }
        let r = l.reply("b1", 0);
        assert_eq!(r["lines"].as_array().unwrap().len(), MAX_REPLY_LINES);
        assert_eq!(r["next"], MAX_REPLY_LINES);
        assert_eq!(r["done"], false);
        assert_eq!(r["status"], "running");
        l.done = true;
        l.status = "succeeded";
        // Ended, but lines are still to come: not done yet.
        assert_eq!(l.reply("b1", 0)["done"], false);
        let r = l.reply("b1", MAX_REPLY_LINES);
        assert_eq!(r["lines"].as_array().unwrap().len(), 5);
        assert_eq!(r["done"], true);
        // Past the end (a resend): nothing, done.
        let r = l.reply("b1", 1_000_000);
        assert_eq!(r["lines"].as_array().unwrap().len(), 0);
        assert_eq!(r["next"], MAX_REPLY_LINES + 5);
        assert_eq!(r["done"], true);
        assert!(r.get("error").is_none());
    }

    #[test]
    fn the_log_is_cut_at_its_limits_but_the_outcome_kept() {
        let mut l = Live::new("shop");
        for i in 0..(MAX_LOG_LINES + 10) {
            l.push(format!("{i}"));
        }
        assert_eq!(l.lines.len(), MAX_LOG_LINES + 1, "the lines and one note");
        assert!(l.lines[MAX_LOG_LINES].contains("over the log's limit"));
        assert_eq!(l.dropped, 10);
        l.push_outcome("-----> Released v2".into());
        assert_eq!(l.lines.last().unwrap(), "-----> Released v2");

        let mut l = Live::new("shop");
        let big = "x".repeat(1 << 20);
        for _ in 0..10 {
            l.push(big.clone());
        }
        assert_eq!(l.lines.len(), 8, "seven MiB lines and the note");
        assert_eq!(l.dropped, 3);
    }
}
