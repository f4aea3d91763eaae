//! One process-wide memory budget for open buffers (`batch.max_buffered_bytes`). Every batcher
//! charges what its open buffers hold; when the total reaches the limit, batchers seal their
//! oldest buffers early (so progress never stops). Sealed batches leave the budget when they
//! are sealed, not when they are written; the SQS receive loop pauses while it is reached.
//!
//! A source waiting for room in a ledger whose count cap is reached (`Budget::crowd`) makes
//! batchers seal their oldest buffers early too: the units it waits on sit in open buffers, and
//! would otherwise wait for `max_age`.
//!
//! A batcher publishes its charge to the shared counter in steps of `slack` bytes, so the hot
//! path touches a shared cache line rarely; the shared figure lags each batcher by less than
//! one step.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// What one open buffer costs beyond its bytes: its map entry, key, heap entry and holds.
pub const BUFFER_OVERHEAD: u64 = 512;

#[derive(Debug)]
pub struct Budget {
    limit: u64,
    used: AtomicU64,
    /// How far a batcher's charge may drift from what it published.
    slack: u64,
    /// Sources waiting for room in a full ledger (see `Crowd`).
    crowded: AtomicUsize,
}

impl Budget {
    pub fn new(limit: u64) -> Arc<Budget> {
        Arc::new(Budget {
            limit,
            used: AtomicU64::new(0),
            slack: (limit / 256).clamp(4 << 10, 1 << 20),
            crowded: AtomicUsize::new(0),
        })
    }

    /// A budget nothing reaches (unit tests, tools).
    pub fn unlimited() -> Arc<Budget> {
        Budget::new(u64::MAX)
    }

    /// Bytes charged by open buffers across the process (published figures).
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// True while open buffers hold the whole budget: receive no more until it drops.
    pub fn over(&self) -> bool {
        self.used() >= self.limit
    }

    /// Marks a source waiting for room in a ledger whose count cap is reached, until the guard
    /// drops: batchers meanwhile seal their oldest buffers early, so the ledger drains.
    pub fn crowd(self: &Arc<Budget>) -> Crowd {
        self.crowded.fetch_add(1, Ordering::AcqRel);
        Crowd(self.clone())
    }

    /// True while some source waits for room in a full ledger.
    pub fn crowded(&self) -> bool {
        self.crowded.load(Ordering::Acquire) > 0
    }
}

/// A source waiting for room in a full ledger; see `Budget::crowd`.
#[derive(Debug)]
pub struct Crowd(Arc<Budget>);

impl Drop for Crowd {
    fn drop(&mut self) {
        self.0.crowded.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One batcher's charge against the budget. Dropping it returns the charge.
#[derive(Debug)]
pub struct Share {
    budget: Arc<Budget>,
    /// What this batcher's buffers hold now.
    local: u64,
    /// What the shared counter has of it.
    published: u64,
}

impl Share {
    pub fn new(budget: Arc<Budget>) -> Share {
        Share {
            budget,
            local: 0,
            published: 0,
        }
    }

    pub fn charge(&mut self, bytes: u64) {
        self.local += bytes;
        if self.local - self.published.min(self.local) >= self.budget.slack {
            self.publish();
        }
    }

    pub fn release(&mut self, bytes: u64) {
        self.local = self.local.saturating_sub(bytes);
        if self.published.saturating_sub(self.local) >= self.budget.slack {
            self.publish();
        }
    }

    /// Brings the shared counter up to date (after a file, after seals).
    pub fn publish(&mut self) {
        let (local, published) = (self.local, self.published);
        if local > published {
            self.budget
                .used
                .fetch_add(local - published, Ordering::Relaxed);
        } else if published > local {
            self.budget
                .used
                .fetch_sub(published - local, Ordering::Relaxed);
        }
        self.published = local;
    }

    /// The process-wide figure as this batcher sees it (its own drift included).
    fn estimate(&self) -> u64 {
        (self.budget.used() + self.local).saturating_sub(self.published)
    }

    /// True when the budget is reached: seal buffers early.
    pub fn over(&self) -> bool {
        self.estimate() >= self.budget.limit
    }

    /// True once early seals have made enough room (an eighth of the budget), so that a full
    /// budget does not seal one buffer per record.
    pub fn relieved(&self) -> bool {
        self.estimate() <= self.budget.limit - self.budget.limit / 8
    }

    /// True while a source waits for room in a full ledger: seal the oldest buffers early.
    pub fn crowded(&self) -> bool {
        self.budget.crowded()
    }

    /// This batcher's own charge.
    pub fn local(&self) -> u64 {
        self.local
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        self.local = 0;
        self.publish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_publish_in_steps_and_return_their_charge() {
        let b = Budget::new(1 << 20);
        assert_eq!(b.slack, 4 << 10);
        let mut a = Share::new(b.clone());
        let mut c = Share::new(b.clone());
        a.charge(100);
        assert_eq!(b.used(), 0, "below one step, nothing is published");
        assert_eq!(a.estimate(), 100);
        a.charge(5000);
        assert_eq!(b.used(), 5100);
        c.charge(1 << 20);
        assert!(b.over() && a.over() && c.over());
        c.release(1 << 20);
        assert!(!b.over());
        assert!(a.relieved());
        assert!(!b.crowded());
        let crowd = b.crowd();
        assert!(b.crowded() && c.crowded());
        drop(crowd);
        assert!(!b.crowded());
        drop(a);
        drop(c);
        assert_eq!(b.used(), 0);
    }
}
