//! Retries with exponential backoff and full jitter, for whole-object work on top of the SDK's
//! own per-request retries (a body read that breaks half-way is not retried by the SDK).

use std::future::Future;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub attempts: u32,
    pub base: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            attempts: 4,
            base: Duration::from_millis(200),
            max: Duration::from_secs(5),
        }
    }
}

impl Backoff {
    /// The wait before retry `n` (1-based): uniform in [0, min(max, base·2ⁿ⁻¹)].
    pub fn delay(&self, n: u32) -> Duration {
        let cap = self
            .base
            .saturating_mul(1u32 << n.saturating_sub(1).min(16))
            .min(self.max);
        cap.mul_f64(jitter())
    }

    /// Runs `op` until it succeeds, fails with an error `retryable` rejects, or the attempts
    /// are used up. The last error is returned.
    pub async fn run<T, E, Fut>(
        &self,
        mut op: impl FnMut() -> Fut,
        retryable: impl Fn(&E) -> bool,
    ) -> Result<T, E>
    where
        Fut: Future<Output = Result<T, E>>,
    {
        let mut n = 0;
        loop {
            n += 1;
            match op().await {
                Ok(v) => return Ok(v),
                Err(e) if n < self.attempts && retryable(&e) => {
                    tokio::time::sleep(self.delay(n)).await
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// A number in [0, 1): jitter only needs to spread workers apart, not to be unpredictable.
fn jitter() -> f64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static STATE: AtomicU64 = AtomicU64::new(0);
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut x = STATE.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed) ^ seed;
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    (x >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[test]
    fn delays_grow_and_stay_capped() {
        let b = Backoff {
            attempts: 10,
            base: Duration::from_millis(100),
            max: Duration::from_secs(1),
        };
        for n in 1..12 {
            let cap =
                Duration::from_millis(100 * (1 << (n - 1).min(16))).min(Duration::from_secs(1));
            assert!(b.delay(n) <= cap);
        }
    }

    #[tokio::test]
    async fn retries_only_retryable_errors_up_to_the_limit() {
        let b = Backoff {
            attempts: 3,
            base: Duration::from_millis(1),
            max: Duration::from_millis(2),
        };
        let calls = AtomicU32::new(0);
        let r: Result<(), &str> = b
            .run(
                || async {
                    calls.fetch_add(1, Ordering::SeqCst);
                    Err("busy")
                },
                |_| true,
            )
            .await;
        assert_eq!((r, calls.load(Ordering::SeqCst)), (Err("busy"), 3));

        calls.store(0, Ordering::SeqCst);
        let r: Result<(), &str> = b
            .run(
                || async {
                    calls.fetch_add(1, Ordering::SeqCst);
                    Err("denied")
                },
                |_| false,
            )
            .await;
        assert_eq!((r, calls.load(Ordering::SeqCst)), (Err("denied"), 1));

        calls.store(0, Ordering::SeqCst);
        let r = b
            .run(
                || async {
                    if calls.fetch_add(1, Ordering::SeqCst) < 1 {
                        Err("busy")
                    } else {
                        Ok(7)
                    }
                },
                |_| true,
            )
            .await;
        assert_eq!(r, Ok(7));
    }
}
