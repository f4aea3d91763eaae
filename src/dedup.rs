//! De-duplication by eventID within a time window, with bounded memory.
//!
//! Each eventID is remembered as a 64-bit hash in time buckets (the window split in `BUCKETS`
//! slices of processing time); a bucket older than the window is dropped whole. When more than
//! `max_events` hashes are held, the oldest bucket is dropped early, which shortens the window
//! rather than growing memory (about 20 bytes per remembered event). Two different eventIDs
//! share a hash with probability about n / 2^64 per lookup (n remembered events): about 1e-13
//! at the default 2 million, so a distinct event is practically never dropped. The set is shared
//! by all workers (sharded locks): a repeat is caught whichever worker sees it.
//!
//! An eventID is remembered only once the unit that carried it (message, batch, file) is
//! durably written (`Hold::first_copy` collects them, the last commit records them): a unit
//! that fails and comes back is not its own repeat.
//! A second copy within one unit is dropped at once (`Hold::first_copy`); copies of one event
//! in two units in flight at the same time are both kept (at-least-once).

use std::collections::{HashSet, VecDeque};
use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const BUCKETS: u64 = 8;
const SHARDS: usize = 16;

#[derive(Default)]
struct Shard {
    /// (bucket number, hashes), oldest first.
    buckets: VecDeque<(u64, HashSet<u64>)>,
    len: usize,
}

pub struct Dedup {
    shards: Vec<Mutex<Shard>>,
    span: Duration,
    max_per_shard: usize,
    epoch: Instant,
}

impl Dedup {
    pub fn new(window: Duration, max_events: usize) -> Dedup {
        Dedup {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            span: (window / BUCKETS as u32).max(Duration::from_millis(1)),
            max_per_shard: (max_events / SHARDS).max(1),
            epoch: Instant::now(),
        }
    }

    /// The most hashes it holds (`dedup.max_events`, rounded to its shards).
    pub fn capacity(&self) -> usize {
        self.max_per_shard.saturating_mul(SHARDS)
    }

    /// The 64-bit key an eventID is remembered by. A fixed-key hasher: the same id hashes the
    /// same in every worker.
    pub fn hash(event_id: &str) -> u64 {
        BuildHasherDefault::<DefaultHasher>::default().hash_one(event_id)
    }

    fn bucket(&self, now: Instant) -> u64 {
        (now.saturating_duration_since(self.epoch).as_nanos() / self.span.as_nanos().max(1)) as u64
    }

    fn shard(&self, h: u64, bucket: u64) -> Option<std::sync::MutexGuard<'_, Shard>> {
        // A worker panicked holding the lock: the caller keeps the event (at-least-once).
        let mut shard = self.shards[(h as usize) % SHARDS].lock().ok()?;
        while let Some((b, set)) = shard.buckets.front() {
            if b + BUCKETS > bucket && shard.len < self.max_per_shard {
                break;
            }
            let n = set.len();
            shard.buckets.pop_front();
            shard.len -= n;
        }
        Some(shard)
    }

    /// True when the event with this hash was remembered within the window (it is a repeat of
    /// an event already written).
    pub fn contains(&self, h: u64, now: Instant) -> bool {
        self.shard(h, self.bucket(now))
            .is_some_and(|s| s.buckets.iter().any(|(_, set)| set.contains(&h)))
    }

    /// Remembers events that are now durably written.
    pub fn record(&self, hashes: impl IntoIterator<Item = u64>, now: Instant) {
        let bucket = self.bucket(now);
        for h in hashes {
            let Some(mut shard) = self.shard(h, bucket) else {
                continue;
            };
            if shard.buckets.back().is_none_or(|(b, _)| *b != bucket) {
                shard.buckets.push_back((bucket, HashSet::new()));
            }
            if let Some((_, set)) = shard.buckets.back_mut()
                && set.insert(h)
            {
                shard.len += 1;
            }
        }
    }

    /// True when `event_id` was seen within the window (the event is a repeat); otherwise
    /// remembers it at once (for runs without acknowledgement, such as tests).
    pub fn seen(&self, event_id: &str, now: Instant) -> bool {
        let h = Dedup::hash(event_id);
        if self.contains(h, now) {
            return true;
        }
        self.record([h], now);
        false
    }

    /// Forgets `event_id`: its event was not written after all (its file comes again), so the
    /// next delivery must not drop it as a repeat.
    pub fn forget(&self, event_id: &str) {
        let h = BuildHasherDefault::<DefaultHasher>::default().hash_one(event_id);
        let Ok(mut shard) = self.shards[(h as usize) % SHARDS].lock() else {
            return;
        };
        let removed = shard
            .buckets
            .iter_mut()
            .map(|(_, set)| usize::from(set.remove(&h)))
            .sum::<usize>();
        shard.len -= removed;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_forgotten_id_is_new_again() {
        let d = Dedup::new(Duration::from_secs(60), 1000);
        let now = Instant::now();
        assert!(!d.seen("a", now));
        assert!(d.seen("a", now));
        d.forget("a");
        assert!(!d.seen("a", now), "forgotten");
        assert!(d.seen("a", now));
        d.forget("never-seen");
    }

    #[test]
    fn repeats_within_the_window_are_seen() {
        let d = Dedup::new(Duration::from_secs(80), 100_000);
        let t0 = Instant::now();
        assert!(!d.seen("a", t0));
        assert!(!d.seen("b", t0));
        assert!(d.seen("a", t0 + Duration::from_secs(30)));
        assert!(d.seen("b", t0 + Duration::from_secs(69)));
        // Past the window (plus one bucket of slack) it is new again.
        assert!(!d.seen("a", t0 + Duration::from_secs(95)));
    }

    #[test]
    fn memory_stays_bounded_by_dropping_the_oldest_bucket() {
        let d = Dedup::new(Duration::from_secs(800), 16 * 50);
        let t0 = Instant::now();
        for i in 0..5000u64 {
            let t = t0 + Duration::from_secs(i / 100);
            assert!(!d.seen(&format!("id-{i}"), t));
        }
        for s in &d.shards {
            let s = s.lock().unwrap();
            let held: usize = s.buckets.iter().map(|(_, b)| b.len()).sum();
            assert_eq!(held, s.len);
            // At most one bucket's worth above the cap: the current bucket is never dropped.
            assert!(s.len <= 50 + 100, "{}", s.len);
        }
        // The most recent ids are still remembered.
        assert!(d.seen("id-4999", t0 + Duration::from_secs(50)));
    }
}
