//! The client side of `lock.acquire`, for waits of any length (the CLI's `lock
//! acquire` uses it; so can any daemon that takes locks).
//!
//! A request's `ts` must stay inside the receiver's skew window for every copy of it
//! the client resends, so one request cannot wait longer than that window. A long
//! wait is therefore cut into slices: each slice is a fresh request (new id, new
//! `ts`) asking to wait the time left, at most one slice. That is safe because the
//! locker answers an acquire by the owner that already holds the lock with that
//! grant (same token): whatever happened to an earlier request (it timed out, its
//! reply was lost, its commit's fate is unknown), re-issuing it tells the truth.

use std::time::{Duration, Instant};

use paddock_wire::kinds::{self, LockAcquire, LockGrant};
use paddock_wire::{Client, ClientError, Code};

/// How a long acquire is cut into requests.
#[derive(Debug, Clone, Copy)]
pub struct AcquireOptions {
    /// How long a reply may take beyond the request's own wait (the network, a busy
    /// locker); the client's timeout for each request is this plus its wait.
    pub reply_timeout: Duration,
    /// The longest wait one request asks for.
    pub slice: Duration,
}

/// The longest slice: "every few seconds" a fresh request.
pub const MAX_SLICE: Duration = Duration::from_secs(5);

impl AcquireOptions {
    /// Slices of a third of the skew window (`wire.skew_ms`), between 100 ms and
    /// [`MAX_SLICE`], so each request and its resends stay well inside the window.
    pub fn new(reply_timeout: Duration, skew_ms: i64) -> AcquireOptions {
        let third = Duration::from_millis(u64::try_from(skew_ms / 3).unwrap_or(0));
        AcquireOptions {
            reply_timeout,
            slice: third.clamp(Duration::from_millis(100), MAX_SLICE),
        }
    }
}

/// Takes `req.name` for `req.owner`, waiting up to `req.wait_ms` however long that
/// is. Returns the grant, or the last error: `held` once the wait is over, or what
/// stopped it. After an uncertain failure (no reply, `unknown_outcome`) at the end
/// of the wait, one more request without waiting learns whether the lock was taken.
/// Leaves `client`'s timeout at `opts.reply_timeout`.
pub fn acquire(
    client: &mut Client,
    req: &LockAcquire,
    opts: &AcquireOptions,
) -> Result<LockGrant, ClientError> {
    let deadline = Instant::now() + Duration::from_millis(req.wait_ms);
    let mut resolved = false;
    loop {
        let wait = deadline
            .saturating_duration_since(Instant::now())
            .min(opts.slice);
        let body = LockAcquire {
            wait_ms: wait.as_millis() as u64,
            ..req.clone()
        };
        client.set_timeout(opts.reply_timeout + wait);
        let result = client.call(kinds::LOCK_ACQUIRE, kinds::to_body(&body));
        client.set_timeout(opts.reply_timeout);
        let err = match result {
            Ok(v) => {
                return serde_json::from_value(v).map_err(|e| ClientError::Protocol {
                    endpoint: client.endpoint().to_string(),
                    why: format!("lock.acquire reply: {e}"),
                })
            }
            Err(e) => e,
        };
        let unknown =
            matches!(err, ClientError::Timeout { .. }) || err.code() == Some(&Code::UnknownOutcome);
        // Nothing was done (`stale`: the request aged out before it was read;
        // `unavailable`: the locker's database is away), or not yet (`held`), or the
        // locker was not reachable: all worth another request while time is left.
        let nothing_done = matches!(err, ClientError::NotConnected { .. })
            || matches!(
                err.code(),
                Some(Code::Held | Code::Stale | Code::Unavailable)
            );
        if !(unknown || nothing_done) {
            return Err(err);
        }
        if Instant::now() < deadline {
            continue;
        }
        if unknown && !resolved {
            resolved = true;
            continue;
        }
        return Err(err);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_are_a_third_of_the_skew_window_within_bounds() {
        let t = Duration::from_secs(5);
        assert_eq!(
            AcquireOptions::new(t, 1000).slice,
            Duration::from_millis(333)
        );
        assert_eq!(AcquireOptions::new(t, 30_000).slice, MAX_SLICE);
        assert_eq!(AcquireOptions::new(t, 0).slice, Duration::from_millis(100));
        assert_eq!(AcquireOptions::new(t, -5).slice, Duration::from_millis(100));
    }
}
