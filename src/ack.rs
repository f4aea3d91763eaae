//! At-least-once bookkeeping. A notification (an SQS message) is acknowledged only when every
//! record of every file it names is durably written. Each piece of work that still owes it
//! something holds a `Hold`: the message handler while it dispatches files, each file while it
//! is split, each output buffer that holds some of its records. The last hold to go decides.
//!
//! A hold must be committed explicitly. One that is dropped uncommitted (an upload failed, a
//! buffer was discarded, a task panicked) marks the notification failed, so nothing that was
//! not written can ever cause a delete. The first share to fail settles the unit at once (as
//! failed): its source can deliver it again without waiting for the other shares, which may
//! sit in buffers for up to `batch.max_age_secs`.
//!
//! A hold also carries its unit's side effects that may happen only once it is durable: the
//! eventIDs `[dedup]` is to remember. They are recorded when the last share commits, never
//! before, so a unit that fails and is delivered again is not mistaken for its own repeat.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use tokio::sync::oneshot;

use crate::dedup::Dedup;

/// How a unit ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Every share committed: every record is durable.
    Written,
    /// A share failed: deliver the unit again.
    Failed,
    /// The unit itself is refused (a message that cannot be parsed, a bucket outside the
    /// allowlist): left to come back after its visibility timeout and, in time, to the DLQ.
    Refused,
}

struct Ack {
    pending: AtomicUsize,
    failed: AtomicBool,
    refused: AtomicBool,
    done: Mutex<Option<oneshot::Sender<Outcome>>>,
    /// eventID hashes to remember once the unit is durable, and where.
    remember: Mutex<Option<(Arc<Dedup>, HashSet<u64>)>>,
}

impl Ack {
    fn settle(&self, outcome: Outcome) {
        if let Some(tx) = self.done.lock().ok().and_then(|mut d| d.take()) {
            let _ = tx.send(outcome);
        }
    }

    /// A share failed: the first failure settles the unit at once.
    fn fail(&self) {
        if !self.failed.swap(true, Ordering::AcqRel) {
            self.settle(if self.refused.load(Ordering::Acquire) {
                Outcome::Refused
            } else {
                Outcome::Failed
            });
        }
    }

    fn release(&self) {
        if self.pending.fetch_sub(1, Ordering::AcqRel) == 1 {
            let ok = !self.failed.load(Ordering::Acquire);
            let remember = self.remember.lock().ok().and_then(|mut r| r.take());
            if ok && let Some((dedup, ids)) = remember {
                dedup.record(ids, Instant::now());
            }
            // A failed unit has settled already.
            self.settle(Outcome::Written);
        }
    }
}

/// One share of a notification's acknowledgement.
pub struct Hold {
    ack: Arc<Ack>,
    committed: bool,
}

/// Resolves once every hold is committed (`Ok(true)`), or as soon as one fails (`Ok(false)`).
pub struct Settled(oneshot::Receiver<Outcome>);

impl Settled {
    /// A settlement passed on by hand: resolves with what is sent.
    pub fn relay() -> (oneshot::Sender<Outcome>, Settled) {
        let (tx, rx) = oneshot::channel();
        (tx, Settled(rx))
    }

    /// Whether the unit was written, if it has settled yet.
    pub fn try_recv(&mut self) -> Result<bool, oneshot::error::TryRecvError> {
        self.0.try_recv().map(|o| o == Outcome::Written)
    }

    /// How the unit ended (a unit whose holds vanished without a word failed).
    pub async fn outcome(self) -> Outcome {
        self.0.await.unwrap_or(Outcome::Failed)
    }
}

impl Future for Settled {
    type Output = Result<bool, oneshot::error::RecvError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0)
            .poll(cx)
            .map(|r| r.map(|o| o == Outcome::Written))
    }
}

impl Hold {
    /// A new notification's first hold and the receiver of its outcome.
    pub fn new() -> (Hold, Settled) {
        let (tx, rx) = oneshot::channel();
        let ack = Arc::new(Ack {
            pending: AtomicUsize::new(1),
            failed: AtomicBool::new(false),
            refused: AtomicBool::new(false),
            done: Mutex::new(Some(tx)),
            remember: Mutex::new(None),
        });
        (
            Hold {
                ack,
                committed: false,
            },
            Settled(rx),
        )
    }

    /// Another hold on the same notification.
    pub fn share(&self) -> Hold {
        self.ack.pending.fetch_add(1, Ordering::AcqRel);
        Hold {
            ack: self.ack.clone(),
            committed: false,
        }
    }

    /// Whether a share of this notification failed already: it will be delivered again, so
    /// work done for it now (beyond writing) is wasted.
    pub fn failed(&self) -> bool {
        self.ack.failed.load(Ordering::Acquire)
    }

    /// Whether two holds belong to the same notification.
    pub fn same(&self, other: &Hold) -> bool {
        Arc::ptr_eq(&self.ack, &other.ack)
    }

    /// True the first time any share of this unit meets eventID hash `h`, which `dedup` then
    /// remembers once every share is committed; false for a second copy in the same unit
    /// (another file of one message, another job of one Kinesis batch), whichever worker has
    /// it. Dropping that copy is safe: the unit is acknowledged, or delivered again, whole.
    pub fn first_copy(&self, dedup: &Arc<Dedup>, h: u64) -> bool {
        let Ok(mut r) = self.ack.remember.lock() else {
            // A worker panicked holding the lock: keep the event (at-least-once).
            return true;
        };
        let seen = &mut r.get_or_insert_with(|| (dedup.clone(), HashSet::new())).1;
        // Bounded by what `dedup` can hold (more would be evicted at once): past it, new ids
        // are kept unremembered, so a hostile unit of millions of ids costs no more memory.
        if seen.len() >= dedup.capacity() {
            return !seen.contains(&h);
        }
        seen.insert(h)
    }

    /// This share of the work is done and durable.
    pub fn commit(mut self) {
        self.committed = true;
    }

    /// This share failed; the notification must not be acknowledged.
    pub fn fail(self) {}

    /// The unit is refused for good: not acknowledged, and not handed back early either.
    pub fn refuse(self) {
        self.ack.refused.store(true, Ordering::Release);
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        if !self.committed {
            self.ack.fail();
        }
        self.ack.release();
    }
}

impl std::fmt::Debug for Hold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Hold({:p})", Arc::as_ptr(&self.ack))
    }
}

/// Holds carried by an output buffer: one per notification, however many records it gave.
#[derive(Debug, Default)]
pub struct Holds(Vec<Hold>);

impl Holds {
    /// Adds a share of `hold` unless this buffer already has one. Records of one file arrive
    /// together, so the last entry is checked first.
    pub fn add(&mut self, hold: &Hold) {
        if self.0.last().is_some_and(|h| h.same(hold)) || self.0.iter().any(|h| h.same(hold)) {
            return;
        }
        self.0.push(hold.share());
    }

    pub fn commit(self) {
        self.0.into_iter().for_each(Hold::commit);
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settled(rx: &mut Settled) -> Option<bool> {
        rx.0.try_recv().ok().map(|o| o == Outcome::Written)
    }

    #[test]
    fn settles_true_only_when_every_share_commits() {
        let (h, mut rx) = Hold::new();
        let mut buf_a = Holds::default();
        let mut buf_b = Holds::default();
        buf_a.add(&h);
        buf_a.add(&h);
        buf_b.add(&h);
        assert_eq!(buf_a.len(), 1, "one share per buffer");
        h.commit();
        assert_eq!(settled(&mut rx), None);
        buf_a.commit();
        assert_eq!(settled(&mut rx), None);
        buf_b.commit();
        assert_eq!(settled(&mut rx), Some(true));
    }

    #[test]
    fn a_dropped_or_failed_share_fails_the_notification() {
        let (h, mut rx) = Hold::new();
        let mut buf = Holds::default();
        buf.add(&h);
        h.commit();
        drop(buf);
        assert_eq!(settled(&mut rx), Some(false));

        let (h, mut rx) = Hold::new();
        let other = h.share();
        h.commit();
        other.fail();
        assert_eq!(settled(&mut rx), Some(false));
    }

    #[test]
    fn the_first_failed_share_settles_the_unit_at_once() {
        let (h, mut rx) = Hold::new();
        let mut buffered = Holds::default();
        buffered.add(&h);
        h.fail();
        assert_eq!(
            settled(&mut rx),
            Some(false),
            "failed while another share is still buffered"
        );
        buffered.commit();

        let (h, rx) = Hold::new();
        let other = h.share();
        h.refuse();
        other.commit();
        let outcome = rx.0.blocking_recv().expect("settled");
        assert_eq!(outcome, Outcome::Refused);
    }

    #[test]
    fn dedup_ids_are_remembered_only_when_the_unit_commits() {
        let dedup = Arc::new(Dedup::new(std::time::Duration::from_secs(60), 1000));
        let t = Instant::now();
        let (a, b) = (Dedup::hash("a"), Dedup::hash("b"));

        let (h, _rx) = Hold::new();
        let buffer = h.share();
        assert!(h.first_copy(&dedup, a));
        h.commit();
        assert!(!dedup.contains(a, t), "not before the buffer is written");
        drop(buffer); // the write failed
        assert!(!dedup.contains(a, t), "a failed unit remembers nothing");

        let (h, _rx) = Hold::new();
        let buffer = h.share();
        assert!(h.first_copy(&dedup, b));
        h.commit();
        buffer.commit();
        assert!(dedup.contains(b, t), "remembered once durable");
    }

    /// Two jobs of one Kinesis batch (or two files of one message) are shares of one unit: the
    /// second copy of an eventID is refused whichever share meets it, and a share of another
    /// unit keeps its own.
    #[test]
    fn a_second_copy_in_any_share_of_a_unit_is_not_a_first_copy() {
        let dedup = Arc::new(Dedup::new(std::time::Duration::from_secs(60), 1000));
        let (a, b) = (Dedup::hash("a"), Dedup::hash("b"));
        let (unit, _rx) = Hold::new();
        let (first_job, second_job) = (unit.share(), unit.share());
        assert!(first_job.first_copy(&dedup, a));
        assert!(second_job.first_copy(&dedup, b));
        assert!(!second_job.first_copy(&dedup, a), "a copy in another job");
        assert!(!first_job.first_copy(&dedup, a), "a copy in the same job");
        let (other, _rx) = Hold::new();
        assert!(
            other.first_copy(&dedup, a),
            "another unit keeps its own copy"
        );
        for h in [unit, first_job, second_job, other] {
            h.commit();
        }
        let t = Instant::now();
        assert!(dedup.contains(a, t) && dedup.contains(b, t));
    }

    #[test]
    fn a_units_seen_set_stops_growing_at_what_dedup_holds() {
        let dedup = Arc::new(Dedup::new(std::time::Duration::from_secs(60), 1000));
        let cap = dedup.capacity() as u64;
        let (unit, _rx) = Hold::new();
        assert!((0..cap).all(|h| unit.first_copy(&dedup, h)));
        assert!(
            !unit.first_copy(&dedup, 0),
            "a copy of a remembered id is dropped"
        );
        // Past the cap a new id is kept each time it comes (at-least-once), not remembered.
        assert!(unit.first_copy(&dedup, cap) && unit.first_copy(&dedup, cap));
        let held = unit
            .ack
            .remember
            .lock()
            .unwrap()
            .as_ref()
            .map(|(_, s)| s.len());
        assert_eq!(held, Some(cap as usize));
    }

    #[test]
    fn buffers_keep_one_share_per_notification() {
        let (a, _ra) = Hold::new();
        let (b, _rb) = Hold::new();
        let mut buf = Holds::default();
        for h in [&a, &b, &a, &b, &b] {
            buf.add(h);
        }
        assert_eq!(buf.len(), 2);
        buf.commit();
        a.commit();
        b.commit();
    }
}
