//! The acknowledgement ledger for SQS: every received message that is not yet acknowledged,
//! what it waits for (its `Hold`), and what happens once it settles.
//!
//! A message enters the ledger when it is received and leaves it when it is deleted (every
//! record durable) or handed back (a part failed). In between it costs nothing but an entry:
//! its receive slot is free as soon as its files are split and buffered, so throughput does
//! not depend on `batch.max_age_secs`; acknowledgement latency does (about `max_age`).
//!
//! One driver task owns every entry, so no per-message task outlives its message:
//! * heartbeats: every message still waiting is kept invisible with
//!   ChangeMessageVisibilityBatch (ten per call), never past SQS's 12-hour limit from receipt;
//!   a failed entry is retried at the next round; ReceiptHandleIsInvalid ends its heartbeat;
//! * acknowledgement: settled messages are deleted with DeleteMessageBatch (ten per call, or
//!   what is waiting after a short linger); failed entries are retried, a few times;
//! * a message whose hold failed is made visible again soon (not in a hot loop).
//!
//! Receiving pauses only when the ledger is full: `source.sqs.max_unacked_messages` entries,
//! or the process-wide buffered-bytes budget (`Pressure`) reached.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::JoinSet;

use crate::ack::Settled;
use crate::metrics::{self, *};
use crate::source::sqs::{BATCH, EntryOutcome, Received, Sqs};

/// SQS's limit on a message's total invisibility from its receipt.
pub const SQS_MAX_VISIBILITY: Duration = Duration::from_secs(12 * 3600);
/// How far before that limit heartbeats stop asking for more.
const LIMIT_MARGIN: Duration = Duration::from_secs(120);
/// How long a settled message may wait for nine others before its delete call goes out.
const DELETE_LINGER: Duration = Duration::from_millis(200);
/// Attempts of one delete before the message is left to come back (at-least-once). With
/// `delete_backoff` between them they span about half a minute: a brief SQS brownout (5xx,
/// throttling, a timed-out call) must not make every written message come back. The message
/// stays heartbeated meanwhile, so waiting costs nothing.
const DELETE_ATTEMPTS: u32 = 8;
/// The longest wait between two attempts of a delete.
const DELETE_BACKOFF_MAX: Duration = Duration::from_secs(10);

/// True while the process-wide buffered-bytes budget is reached: receiving waits (buffers are
/// sealed early by the engine to make room).
pub type Pressure = Arc<dyn Fn() -> bool + Send + Sync>;

/// Room for one more unacknowledged message, taken before it is received.
pub struct Room {
    _permit: OwnedSemaphorePermit,
}

struct Track {
    msg: Received,
    received: Instant,
    settled: Settled,
    room: Room,
}

struct Entry {
    message_id: String,
    receipt: String,
    received: Instant,
    /// When the message's visibility was last set (at receipt: the receive call).
    extended: Instant,
    heartbeat: bool,
    _room: Room,
}

/// The clonable way to put received messages in the ledger.
#[derive(Clone)]
pub struct Ledger {
    tracks: mpsc::UnboundedSender<Track>,
    room: Arc<Semaphore>,
    pressure: Pressure,
}

/// The driver task, awaited at shutdown once every hold has settled.
pub struct Driver(tokio::task::JoinHandle<()>);

impl Driver {
    /// Waits until every tracked message is deleted or handed back. Every `Ledger` clone must
    /// be dropped first.
    pub async fn finish(self) {
        let _ = self.0.await;
    }

    /// True once the driver has ended. Before shutdown only a bug does that; without it
    /// nothing is ever acknowledged.
    pub fn stopped(&self) -> bool {
        self.0.is_finished()
    }

    /// Stops the driver when the grace period is over: what it still tracks comes back after
    /// its visibility timeout.
    pub fn abort_handle(&self) -> tokio::task::AbortHandle {
        self.0.abort_handle()
    }
}

impl Ledger {
    pub fn start(sqs: Arc<Sqs>, max_unacked: usize, pressure: Pressure) -> (Ledger, Driver) {
        let (tracks, rx) = mpsc::unbounded_channel();
        let driver = tokio::spawn(drive(sqs, rx));
        (
            Ledger {
                tracks,
                room: Arc::new(Semaphore::new(max_unacked.max(1))),
                pressure,
            },
            Driver(driver),
        )
    }

    /// Waits for room for at least one message and takes room for up to `max`.
    pub async fn reserve(&self, max: usize) -> Vec<Room> {
        while (self.pressure)() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let Ok(first) = self.room.clone().acquire_owned().await else {
            return Vec::new();
        };
        let mut rooms = vec![Room { _permit: first }];
        while rooms.len() < max {
            match self.room.clone().try_acquire_owned() {
                Ok(p) => rooms.push(Room { _permit: p }),
                Err(_) => break,
            }
        }
        rooms
    }

    /// Puts a received message in the ledger: heartbeated until `settled` resolves, then
    /// deleted (true) or handed back (false). `received` is when the receive call was made.
    pub fn track(&self, msg: Received, received: Instant, settled: Settled, room: Room) {
        metrics::emit(MessagesInFlight(1));
        if let Err(mpsc::error::SendError(t)) = self.tracks.send(Track {
            msg,
            received,
            settled,
            room,
        }) {
            // The driver is gone (shutdown over): the message comes back after its timeout.
            metrics::emit(MessageAbandoned {
                message_id: &t.msg.message_id,
            });
            metrics::emit(MessagesInFlight(-1));
        }
    }
}

/// What the driver does with a message once its hold has settled.
#[derive(Default)]
struct Queues {
    /// (key, attempts so far)
    delete: Vec<(u64, u32)>,
    /// Deletes that failed, waiting for `retry_at` to go out again.
    retry: Vec<(u64, u32)>,
    retry_at: Option<Instant>,
    release: Vec<u64>,
    linger_since: Option<Instant>,
}

/// How long to wait before the next attempt of a delete that failed `attempts` times.
fn delete_backoff(attempts: u32) -> Duration {
    (DELETE_LINGER * 2u32.pow(attempts.min(10))).min(DELETE_BACKOFF_MAX)
}

async fn drive(sqs: Arc<Sqs>, mut tracks: mpsc::UnboundedReceiver<Track>) {
    let vis = Duration::from_secs(sqs.visibility_timeout_secs.max(1) as u64);
    // Extend at a third of the timeout; check twice as often so a retry comes soon.
    let extend_after = vis / 3;
    let mut tick = tokio::time::interval((vis / 6).max(Duration::from_millis(500)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let retry_in = sqs.visibility_timeout_secs.min(30);

    let mut entries: HashMap<u64, Entry> = HashMap::new();
    let mut settles: JoinSet<(u64, bool)> = JoinSet::new();
    let mut queues = Queues::default();
    let mut next_key = 0u64;
    let mut open = true;
    loop {
        let linger = queues
            .linger_since
            .map(|t| t + DELETE_LINGER)
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            t = tracks.recv(), if open => match t {
                Some(t) => {
                    let key = next_key;
                    next_key += 1;
                    let settled = t.settled;
                    settles.spawn(async move { (key, settled.await.unwrap_or(false)) });
                    entries.insert(key, Entry {
                        message_id: t.msg.message_id,
                        receipt: t.msg.receipt,
                        received: t.received,
                        extended: t.received,
                        heartbeat: true,
                        _room: t.room,
                    });
                }
                None => open = false,
            },
            Some(done) = settles.join_next(), if !settles.is_empty() => {
                // A settle watcher cannot panic; a cancelled one is shutdown.
                if let Ok((key, ok)) = done {
                    if ok {
                        queues.delete.push((key, 0));
                        queues.linger_since.get_or_insert_with(Instant::now);
                    } else {
                        queues.release.push(key);
                    }
                }
            },
            _ = tick.tick() => heartbeat(&sqs, &mut entries, extend_after, vis).await,
            _ = tokio::time::sleep_until(linger.into()), if queues.linger_since.is_some() => {
                flush_deletes(&sqs, &mut entries, &mut queues, true).await;
            },
            _ = tokio::time::sleep_until(queues.retry_at.unwrap_or(linger).into()),
                if queues.retry_at.is_some() => {
                queues.retry_at = None;
                let due = std::mem::take(&mut queues.retry);
                queues.delete.extend(due);
                flush_deletes(&sqs, &mut entries, &mut queues, true).await;
            },
        }
        if queues.delete.len() >= BATCH {
            flush_deletes(&sqs, &mut entries, &mut queues, false).await;
        }
        if !queues.release.is_empty() {
            release(&sqs, &mut entries, &mut queues.release, retry_in).await;
        }
        if !open && settles.is_empty() && queues.delete.is_empty() && queues.retry.is_empty() {
            break;
        }
    }
}

/// Keeps waiting messages invisible: every entry extended more than `extend_after` ago is set
/// to `vis` again (less near SQS's 12-hour limit), ten per call.
async fn heartbeat(
    sqs: &Sqs,
    entries: &mut HashMap<u64, Entry>,
    extend_after: Duration,
    vis: Duration,
) {
    let now = Instant::now();
    let mut due: Vec<(u64, i32)> = Vec::new();
    for (key, e) in entries.iter_mut() {
        if !e.heartbeat || now.duration_since(e.extended) < extend_after {
            continue;
        }
        match visibility_for(now.duration_since(e.received), vis) {
            Some(secs) => due.push((*key, secs)),
            None => {
                // Buffers seal long before this (max_age is validated below it); only an
                // output that keeps failing gets here. The message comes back: at-least-once.
                e.heartbeat = false;
                metrics::emit(VisibilityLimitReached {
                    message_id: &e.message_id,
                });
            }
        }
    }
    for chunk in due.chunks(BATCH) {
        let batch: Vec<(&str, i32)> = chunk
            .iter()
            .filter_map(|(k, secs)| entries.get(k).map(|e| (e.receipt.as_str(), *secs)))
            .collect();
        let outcomes = sqs.set_visibility_batch(&batch).await;
        for ((key, _), outcome) in chunk.iter().zip(outcomes) {
            let Some(e) = entries.get_mut(key) else {
                continue;
            };
            match outcome {
                EntryOutcome::Done => {
                    e.extended = now;
                    metrics::emit(VisibilityExtended);
                }
                EntryOutcome::Gone(detail) => {
                    // Received again elsewhere or deleted: a heartbeat can do nothing more.
                    e.heartbeat = false;
                    metrics::emit(SqsCallFailed {
                        operation: "change_message_visibility",
                        error: &detail,
                    });
                }
                // Retried at the next round (the message stays due).
                EntryOutcome::Failed(detail) => metrics::emit(SqsCallFailed {
                    operation: "change_message_visibility",
                    error: &detail,
                }),
            }
        }
    }
}

/// The visibility timeout to ask for a message received `age` ago: `vis`, capped so that the
/// total stays inside SQS's 12-hour limit; None when too close to it.
fn visibility_for(age: Duration, vis: Duration) -> Option<i32> {
    let left = SQS_MAX_VISIBILITY
        .checked_sub(age)?
        .checked_sub(LIMIT_MARGIN)?;
    let secs = left.min(vis).as_secs();
    (secs >= 1).then_some(secs as i32)
}

/// Deletes settled messages: full batches, or everything when `all` (the linger passed).
async fn flush_deletes(
    sqs: &Sqs,
    entries: &mut HashMap<u64, Entry>,
    queues: &mut Queues,
    all: bool,
) {
    let mut waiting = std::mem::take(&mut queues.delete);
    while waiting.len() >= BATCH || (all && !waiting.is_empty()) {
        let chunk: Vec<(u64, u32)> = waiting.drain(..waiting.len().min(BATCH)).collect();
        // Keys and receipts side by side, so an outcome always meets its own entry.
        let (chunk, receipts): (Vec<(u64, u32)>, Vec<&str>) = chunk
            .into_iter()
            .filter_map(|(k, a)| entries.get(&k).map(|e| ((k, a), e.receipt.as_str())))
            .unzip();
        let outcomes = sqs.delete_batch(&receipts).await;
        for ((key, attempts), outcome) in chunk.into_iter().zip(outcomes) {
            match outcome {
                EntryOutcome::Done => {
                    if let Some(e) = entries.remove(&key) {
                        metrics::emit(MessageDeleted {
                            latency: e.received.elapsed(),
                        });
                        metrics::emit(MessagesInFlight(-1));
                    }
                }
                EntryOutcome::Failed(detail) if attempts + 1 < DELETE_ATTEMPTS => {
                    metrics::emit(SqsCallFailed {
                        operation: "delete_message",
                        error: &detail,
                    });
                    let at = Instant::now() + delete_backoff(attempts + 1);
                    queues.retry_at = Some(queues.retry_at.map_or(at, |t| t.min(at)));
                    queues.retry.push((key, attempts + 1));
                }
                EntryOutcome::Failed(detail) | EntryOutcome::Gone(detail) => {
                    // Written already: a redelivery repeats its events (counted by [dedup]).
                    metrics::emit(SqsCallFailed {
                        operation: "delete_message",
                        error: &detail,
                    });
                    if entries.remove(&key).is_some() {
                        metrics::emit(MessagesInFlight(-1));
                    }
                }
            }
        }
    }
    queues.linger_since = (!waiting.is_empty()).then(Instant::now);
    queues.delete = waiting;
}

/// Hands failed messages back: visible again in `retry_in` seconds rather than after the
/// full timeout, but not in a hot loop.
async fn release(sqs: &Sqs, entries: &mut HashMap<u64, Entry>, keys: &mut Vec<u64>, retry_in: i32) {
    for chunk in std::mem::take(keys).chunks(BATCH) {
        let gone: Vec<Entry> = chunk.iter().filter_map(|k| entries.remove(k)).collect();
        for e in &gone {
            metrics::emit(MessageAbandoned {
                message_id: &e.message_id,
            });
            metrics::emit(MessagesInFlight(-1));
        }
        let batch: Vec<(&str, i32)> = gone
            .iter()
            .filter(|e| e.heartbeat)
            .map(|e| (e.receipt.as_str(), retry_in))
            .collect();
        if batch.is_empty() {
            continue;
        }
        for outcome in sqs.set_visibility_batch(&batch).await {
            if let EntryOutcome::Failed(detail) | EntryOutcome::Gone(detail) = outcome {
                // It comes back after its current timeout instead.
                metrics::emit(SqsCallFailed {
                    operation: "change_message_visibility",
                    error: &detail,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delete_retries_outlast_a_brief_sqs_outage() {
        let waits: Vec<Duration> = (1..DELETE_ATTEMPTS).map(delete_backoff).collect();
        assert!(waits.windows(2).all(|w| w[0] <= w[1]), "{waits:?}");
        assert!(waits.iter().all(|w| *w <= DELETE_BACKOFF_MAX));
        let span: Duration = waits.iter().sum();
        assert!(span >= Duration::from_secs(30), "retries span {span:?}");
        // Shorter than the default visibility timeout: a message that cannot be deleted
        // comes back within minutes, not never.
        assert!(span < Duration::from_secs(300), "retries span {span:?}");
    }

    #[test]
    fn visibility_stays_inside_the_twelve_hour_limit() {
        let vis = Duration::from_secs(300);
        assert_eq!(visibility_for(Duration::ZERO, vis), Some(300));
        assert_eq!(
            visibility_for(Duration::from_secs(11 * 3600), vis),
            Some(300)
        );
        let near = SQS_MAX_VISIBILITY - LIMIT_MARGIN - Duration::from_secs(100);
        assert_eq!(visibility_for(near, vis), Some(100));
        assert_eq!(visibility_for(SQS_MAX_VISIBILITY - LIMIT_MARGIN, vis), None);
        assert_eq!(visibility_for(SQS_MAX_VISIBILITY * 2, vis), None);
    }
}
