//! Reading request bodies: each accessor names the field it found wrong.

use paddock_wire::WireError;
use serde_json::{Map, Value};

pub struct Body<'a>(pub &'a Map<String, Value>);

impl<'a> Body<'a> {
    pub fn of(v: &'a Value) -> Result<Body<'a>, WireError> {
        v.as_object()
            .map(Body)
            .ok_or_else(|| WireError::invalid("body must be a JSON object"))
    }

    pub fn str(&self, field: &str) -> Result<&'a str, WireError> {
        match self.0.get(field) {
            Some(Value::String(s)) => Ok(s),
            Some(_) => Err(WireError::invalid(format!("`{field}` must be a string"))),
            None => Err(WireError::invalid(format!("`{field}` is required"))),
        }
    }

    pub fn opt_str(&self, field: &str) -> Result<Option<&'a str>, WireError> {
        match self.0.get(field) {
            Some(Value::String(s)) => Ok(Some(s)),
            None | Some(Value::Null) => Ok(None),
            Some(_) => Err(WireError::invalid(format!("`{field}` must be a string"))),
        }
    }

    pub fn opt_bool(&self, field: &str) -> Result<Option<bool>, WireError> {
        match self.0.get(field) {
            Some(Value::Bool(b)) => Ok(Some(*b)),
            None | Some(Value::Null) => Ok(None),
            Some(_) => Err(WireError::invalid(format!(
                "`{field}` must be true or false"
            ))),
        }
    }

    pub fn opt_i64(&self, field: &str) -> Result<Option<i64>, WireError> {
        match self.0.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_i64()
                .map(Some)
                .ok_or_else(|| WireError::invalid(format!("`{field}` must be an integer"))),
        }
    }

    pub fn opt(&self, field: &str) -> Option<&'a Value> {
        self.0.get(field).filter(|v| !v.is_null())
    }

    /// A release version: `7` or `"v7"`.
    pub fn version(&self, field: &str) -> Result<Option<i32>, WireError> {
        let bad = || {
            WireError::invalid(format!(
                "`{field}` must be a release version like 7 or \"v7\""
            ))
        };
        match self.0.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) => n
                .as_i64()
                .and_then(|v| i32::try_from(v).ok())
                .filter(|v| *v > 0)
                .map(Some)
                .ok_or_else(bad),
            Some(Value::String(s)) => s
                .strip_prefix('v')
                .unwrap_or(s)
                .parse::<i32>()
                .ok()
                .filter(|v| *v > 0)
                .map(Some)
                .ok_or_else(bad),
            Some(_) => Err(bad()),
        }
    }
}

/// At most `max` (default `def`), at least 1.
pub fn limit(b: &Body, def: i64, max: i64) -> Result<i64, WireError> {
    match b.opt_i64("limit")? {
        None => Ok(def),
        Some(n) if (1..=max).contains(&n) => Ok(n),
        Some(n) => Err(WireError::invalid(format!(
            "`limit` must be 1-{max}, not {n}"
        ))),
    }
}
