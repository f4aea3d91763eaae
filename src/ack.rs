//! At-least-once bookkeeping. A notification (an SQS message) is acknowledged only when every
//! record of every file it names is durably written. Each piece of work that still owes it
//! something holds a `Hold`: the message handler while it dispatches files, each file while it
//! is split, each output buffer that holds some of its records. The last hold to go decides.
//!
//! A hold must be committed explicitly. One that is dropped uncommitted (an upload failed, a
//! buffer was discarded, a task panicked) marks the notification failed, so nothing that was
//! not written can ever cause a delete.
//!
//! A hold also carries its unit's side effects that may happen only once it is durable: the
//! eventIDs `[dedup]` is to remember. They are recorded when the last share commits, never
//! before, so a unit that fails and is delivered again is not mistaken for its own repeat.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::oneshot;

use crate::dedup::Dedup;

struct Ack {
    pending: AtomicUsize,
    failed: AtomicBool,
    done: Mutex<Option<oneshot::Sender<bool>>>,
    /// eventID hashes to remember once the unit is durable, and where.
    remember: Mutex<Option<(Arc<Dedup>, Vec<u64>)>>,
}

impl Ack {
    fn release(&self) {
        if self.pending.fetch_sub(1, Ordering::AcqRel) == 1 {
            let ok = !self.failed.load(Ordering::Acquire);
            let remember = self.remember.lock().ok().and_then(|mut r| r.take());
            if ok && let Some((dedup, ids)) = remember {
                dedup.record(&ids, Instant::now());
            }
            if let Some(tx) = self.done.lock().ok().and_then(|mut d| d.take()) {
                let _ = tx.send(ok);
            }
        }
    }
}

/// One share of a notification's acknowledgement.
pub struct Hold {
    ack: Arc<Ack>,
    committed: bool,
}

/// Resolves once every hold is gone: true when all were committed.
pub type Settled = oneshot::Receiver<bool>;

impl Hold {
    /// A new notification's first hold and the receiver of its outcome.
    pub fn new() -> (Hold, Settled) {
        let (tx, rx) = oneshot::channel();
        let ack = Arc::new(Ack {
            pending: AtomicUsize::new(1),
            failed: AtomicBool::new(false),
            done: Mutex::new(Some(tx)),
            remember: Mutex::new(None),
        });
        (
            Hold {
                ack,
                committed: false,
            },
            rx,
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

    /// Whether two holds belong to the same notification.
    pub fn same(&self, other: &Hold) -> bool {
        Arc::ptr_eq(&self.ack, &other.ack)
    }

    /// eventIDs (hashed) `dedup` is to remember once every share of this unit is committed;
    /// forgotten if any share fails.
    pub fn remember(&self, dedup: &Arc<Dedup>, ids: impl IntoIterator<Item = u64>) {
        let Ok(mut r) = self.ack.remember.lock() else {
            return;
        };
        r.get_or_insert_with(|| (dedup.clone(), Vec::new()))
            .1
            .extend(ids);
    }

    /// This share of the work is done and durable.
    pub fn commit(mut self) {
        self.committed = true;
    }

    /// This share failed; the notification must not be acknowledged.
    pub fn fail(self) {}
}

impl Drop for Hold {
    fn drop(&mut self) {
        if !self.committed {
            self.ack.failed.store(true, Ordering::Release);
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
        rx.try_recv().ok()
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
    fn dedup_ids_are_remembered_only_when_the_unit_commits() {
        let dedup = Arc::new(Dedup::new(std::time::Duration::from_secs(60), 1000));
        let t = Instant::now();
        let (a, b) = (Dedup::hash("a"), Dedup::hash("b"));

        let (h, _rx) = Hold::new();
        let buffer = h.share();
        h.remember(&dedup, [a]);
        h.commit();
        assert!(!dedup.contains(a, t), "not before the buffer is written");
        drop(buffer); // the write failed
        assert!(!dedup.contains(a, t), "a failed unit remembers nothing");

        let (h, _rx) = Hold::new();
        let buffer = h.share();
        h.remember(&dedup, [b]);
        h.commit();
        buffer.commit();
        assert!(dedup.contains(b, t), "remembered once durable");
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
