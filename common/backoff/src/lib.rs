//! The one backoff helper every retry in Paddock uses: exponential with jitter, a cap,
//! and a caller-supplied test for errors that retrying cannot fix.
//!
//! Architecture invariant: no I/O of its own; it only decides how long to wait.

use std::future::Future;
use std::time::{Duration, Instant};

/// Exponential backoff state: `base`, doubled each failure up to `cap`, with up to
/// 25 % random jitter so a fleet restarting together does not retry in lock-step.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    next: Duration,
    failures: u32,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Backoff {
        Backoff {
            base,
            cap,
            next: base,
            failures: 0,
        }
    }

    /// The delay before the next try; grows each call.
    pub fn next_delay(&mut self) -> Duration {
        use rand::Rng;
        let d = self.next;
        self.next = (self.next * 2).min(self.cap);
        self.failures += 1;
        let jitter = rand::thread_rng().gen_range(0.0..0.25);
        d.mul_f64(1.0 + jitter).min(self.cap)
    }

    pub fn failures(&self) -> u32 {
        self.failures
    }

    pub fn reset(&mut self) {
        self.next = self.base;
        self.failures = 0;
    }
}

/// Retries `op` until it succeeds, `permanent(&err)` says retrying is pointless, or
/// `give_up_after` has passed; returns the last error then.
pub async fn retry<T, E, F, Fut>(
    mut backoff: Backoff,
    give_up_after: Option<Duration>,
    permanent: impl Fn(&E) -> bool,
    mut op: F,
) -> Result<T, E>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let start = Instant::now();
    loop {
        match op().await {
            Ok(v) => return Ok(v),
            Err(e) => {
                if permanent(&e) {
                    return Err(e);
                }
                let delay = backoff.next_delay();
                if let Some(limit) = give_up_after {
                    if start.elapsed() + delay > limit {
                        return Err(e);
                    }
                }
                tokio::time::sleep(delay).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(10), Duration::from_millis(50));
        let d: Vec<_> = (0..5).map(|_| b.next_delay()).collect();
        assert!(d[0] >= Duration::from_millis(10) && d[0] < Duration::from_millis(13));
        assert!(d[1] >= Duration::from_millis(20));
        assert!(d.iter().all(|x| *x <= Duration::from_millis(50)));
        assert_eq!(d[4], Duration::from_millis(50));
        b.reset();
        assert!(b.next_delay() < Duration::from_millis(13));
    }

    #[tokio::test]
    async fn retry_stops_on_permanent_errors_and_on_success() {
        let mut calls = 0;
        let r: Result<(), &str> = retry(
            Backoff::new(Duration::from_millis(1), Duration::from_millis(2)),
            None,
            |e| *e == "permanent",
            || {
                calls += 1;
                let c = calls;
                async move {
                    if c < 3 {
                        Err("transient")
                    } else {
                        Err("permanent")
                    }
                }
            },
        )
        .await;
        assert_eq!(r, Err("permanent"));
        assert_eq!(calls, 3);

        let mut calls = 0;
        let r: Result<u32, &str> = retry(
            Backoff::new(Duration::from_millis(1), Duration::from_millis(2)),
            None,
            |_| false,
            || {
                calls += 1;
                let c = calls;
                async move {
                    if c < 4 {
                        Err("transient")
                    } else {
                        Ok(c)
                    }
                }
            },
        )
        .await;
        assert_eq!(r, Ok(4));
    }
}
