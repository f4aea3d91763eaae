//! At-least-once bookkeeping. A notification (an SQS message) is acknowledged only when every
//! record of every file it names is durably written. Each piece of work that still owes it
//! something holds a `Hold`: the message handler while it dispatches files, each file while it
//! is split, each output buffer that holds some of its records. The last hold to go decides.
//!
//! A hold must be committed explicitly. One that is dropped uncommitted (an upload failed, a
//! buffer was discarded, a task panicked) marks the notification failed, so nothing that was
//! not written can ever cause a delete.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

struct Ack {
    pending: AtomicUsize,
    failed: AtomicBool,
    done: Mutex<Option<oneshot::Sender<bool>>>,
}

impl Ack {
    fn release(&self) {
        if self.pending.fetch_sub(1, Ordering::AcqRel) == 1 {
            let ok = !self.failed.load(Ordering::Acquire);
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
