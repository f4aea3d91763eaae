//! The acknowledgement ledger: every source unit that is not yet acknowledged (an SQS
//! message, a backfill file, a Kinesis batch), what it waits for (its `Hold`), and the side
//! effects that may happen only once it settles: an SQS delete or hand-back, a backfill marker,
//! the word to a shard reader that checkpoints its settled prefix (in order, under its lease),
//! and (through the hold) the eventIDs `[dedup]` remembers. Every source takes room here before
//! it reads, so all of them pause on the same two budgets.
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
//! * a message whose hold failed is made visible again soon (not in a hot loop), as soon as
//!   any share of it fails, not when its last share is released;
//! * batch calls go out `CALLS_AT_ONCE` at a time, each under its own deadline: 5,000 waiting
//!   messages are 500 heartbeat calls a round.
//!
//! A message is in the ledger from its receipt, also while it waits for a dispatch slot, so it
//! is heartbeated however long the wait.
//!
//! Receiving pauses only when the ledger is full: `source.sqs.max_unacked_messages` entries,
//! or the process-wide buffered-bytes budget (`Pressure`) reached.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError, mpsc, oneshot};
use tokio::task::JoinSet;

use crate::ack::{Outcome, Settled};
use crate::metrics::{self, *};
use crate::sink::budget::Budget;
use crate::sink::write::Store;
use crate::source::sqs::{BATCH, EntryOutcome, Received, Sqs};

/// How many batch calls (heartbeats, deletes, hand-backs) are in flight at once.
const CALLS_AT_ONCE: usize = 8;

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

/// Room for one more unacknowledged unit, taken before it is read.
pub struct Room {
    _permit: OwnedSemaphorePermit,
}

/// A unit, and what the ledger does once it settles.
enum Unit {
    /// Deleted once written, handed back when a share fails, left when refused.
    Message {
        message_id: String,
        receipt: String,
        received: Instant,
    },
    /// A backfill file: its marker is written once its records are.
    File { marker: String },
    /// A Kinesis batch: its outcome goes to the shard's reader.
    Batch { tell: oneshot::Sender<Outcome> },
}

struct Track {
    unit: Unit,
    settled: Settled,
    room: Room,
}

/// Where the side effects go: the queue (SQS messages) and the output (backfill markers).
#[derive(Clone, Default)]
pub struct Effects {
    pub sqs: Option<Arc<Sqs>>,
    pub store: Option<Arc<Store>>,
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

/// The clonable way to put units in the ledger.
#[derive(Clone)]
pub struct Ledger {
    tracks: mpsc::UnboundedSender<Track>,
    room: Arc<Semaphore>,
    pressure: Pressure,
    /// Told while a reserve waits on the count cap, so that buffers are sealed early.
    crowd: Option<Arc<Budget>>,
}

/// The driver task, awaited at shutdown once every hold has settled.
pub struct Driver(
    tokio::task::JoinHandle<()>,
    /// File units that settled unwritten (no marker): a backfill's failures.
    Arc<std::sync::atomic::AtomicUsize>,
);

impl Driver {
    /// Waits until every tracked message is deleted or handed back. Every `Ledger` clone must
    /// be dropped first.
    /// Returns how many file units settled unwritten (their markers not written).
    pub async fn finish(self) -> usize {
        let _ = self.0.await;
        self.1.load(std::sync::atomic::Ordering::SeqCst)
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
    pub fn start(effects: Effects, max_unacked: usize, pressure: Pressure) -> (Ledger, Driver) {
        let (tracks, rx) = mpsc::unbounded_channel();
        let files_failed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let driver = tokio::spawn(drive(effects, rx, files_failed.clone()));
        (
            Ledger {
                tracks,
                room: Arc::new(Semaphore::new(max_unacked.max(1))),
                pressure,
                crowd: None,
            },
            Driver(driver, files_failed),
        )
    }

    /// Makes a reserve that waits on the count cap seal the oldest buffers early (through
    /// `budget`), for units that settle only once their buffers are sealed and written
    /// (backfill files, Kinesis batches): without it, a full ledger of small units would wait
    /// for `max_age` before any room came back.
    pub fn seal_early_when_full(mut self, budget: Arc<Budget>) -> Ledger {
        self.crowd = Some(budget);
        self
    }

    /// Waits for room for one unit (none once the ledger is closed).
    pub async fn reserve_one(&self) -> Option<Room> {
        self.reserve(1).await.pop()
    }

    /// Waits for room for at least one unit and takes room for up to `max`.
    pub async fn reserve(&self, max: usize) -> Vec<Room> {
        while (self.pressure)() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let first = match self.room.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(TryAcquireError::Closed) => return Vec::new(),
            Err(TryAcquireError::NoPermits) => {
                let _crowd = self.crowd.as_ref().map(Budget::crowd);
                let Ok(p) = self.room.clone().acquire_owned().await else {
                    return Vec::new();
                };
                p
            }
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
    /// deleted (written), handed back (failed) or left to its timeout (refused). `received` is
    /// when the receive call was made.
    pub fn track(&self, msg: &Received, received: Instant, settled: Settled, room: Room) {
        metrics::emit(MessagesInFlight(1));
        let unit = Unit::Message {
            message_id: msg.message_id.clone(),
            receipt: msg.receipt.clone(),
            received,
        };
        if let Err(mpsc::error::SendError(t)) = self.tracks.send(Track {
            unit,
            settled,
            room,
        }) && let Unit::Message { message_id, .. } = t.unit
        {
            // The driver is gone (shutdown over): the message comes back after its timeout.
            metrics::emit(MessageAbandoned {
                message_id: &message_id,
            });
            metrics::emit(MessagesInFlight(-1));
        }
    }

    /// Puts a backfill file in the ledger: `marker` is written once every record is. A file
    /// not tracked (the driver gone) gets no marker and is processed again by a re-run.
    pub fn track_file(&self, marker: String, settled: Settled, room: Room) {
        let _ = self.tracks.send(Track {
            unit: Unit::File { marker },
            settled,
            room,
        });
    }

    /// Puts a Kinesis batch in the ledger; what it returns resolves with the batch's outcome,
    /// for the reader to checkpoint the settled prefix or rewind.
    pub fn track_batch(&self, settled: Settled, room: Room) -> Settled {
        let (tell, told) = Settled::relay();
        // The driver gone: `told` resolves as failed, so the batch is read again.
        let _ = self.tracks.send(Track {
            unit: Unit::Batch { tell },
            settled,
            room,
        });
        told
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
    /// Failed (handed back) or refused (left to its timeout).
    release: Vec<(u64, Outcome)>,
    linger_since: Option<Instant>,
}

/// How long to wait before the next attempt of a delete that failed `attempts` times.
fn delete_backoff(attempts: u32) -> Duration {
    (DELETE_LINGER * 2u32.pow(attempts.min(10))).min(DELETE_BACKOFF_MAX)
}

async fn drive(
    effects: Effects,
    mut tracks: mpsc::UnboundedReceiver<Track>,
    files_failed: Arc<std::sync::atomic::AtomicUsize>,
) {
    let vis_secs = effects
        .sqs
        .as_ref()
        .map_or(300, |s| s.visibility_timeout_secs);
    let vis = Duration::from_secs(vis_secs.max(1) as u64);
    // Extend at a third of the timeout; check twice as often so a retry comes soon.
    let extend_after = vis / 3;
    let mut tick = tokio::time::interval((vis / 6).max(Duration::from_millis(500)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let retry_in = vis_secs.min(30);
    // Backfill files and Kinesis batches: one task each until settled and seen to.
    let mut others: JoinSet<()> = JoinSet::new();

    let mut entries: HashMap<u64, Entry> = HashMap::new();
    let mut settles: JoinSet<(u64, Outcome)> = JoinSet::new();
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
                Some(Track { unit: Unit::Message { message_id, receipt, received }, settled, room })
                    if effects.sqs.is_some() =>
                {
                    let key = next_key;
                    next_key += 1;
                    settles.spawn(async move { (key, settled.outcome().await) });
                    entries.insert(key, Entry {
                        message_id,
                        receipt,
                        received,
                        extended: received,
                        heartbeat: true,
                        _room: room,
                    });
                }
                Some(Track { unit: Unit::File { marker }, settled, room }) => {
                    let (store, failed) = (effects.store.clone(), files_failed.clone());
                    others.spawn(async move {
                        if settled.outcome().await != Outcome::Written {
                            failed.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        } else if let Some(store) = store {
                            write_marker(&store, &marker).await;
                        }
                        drop(room);
                    });
                }
                Some(Track { unit: Unit::Batch { tell }, settled, room }) => {
                    others.spawn(async move {
                        let _ = tell.send(settled.outcome().await);
                        drop(room);
                    });
                }
                // A message without a queue to answer to: it comes back after its timeout.
                Some(Track { unit: Unit::Message { .. }, .. }) => metrics::emit(MessagesInFlight(-1)),
                None => open = false,
            },
            Some(_) = others.join_next(), if !others.is_empty() => {},
            Some(done) = settles.join_next(), if !settles.is_empty() => {
                // A settle watcher cannot panic; a cancelled one is shutdown.
                if let Ok((key, outcome)) = done {
                    if outcome == Outcome::Written {
                        queues.delete.push((key, 0));
                        queues.linger_since.get_or_insert_with(Instant::now);
                    } else {
                        queues.release.push((key, outcome));
                    }
                }
            },
            _ = tick.tick() => if let Some(sqs) = &effects.sqs {
                heartbeat(sqs, &mut entries, extend_after, vis).await;
            },
            _ = tokio::time::sleep_until(linger.into()), if queues.linger_since.is_some() => {
                if let Some(sqs) = &effects.sqs {
                    flush_deletes(sqs, &mut entries, &mut queues, true).await;
                }
            },
            _ = tokio::time::sleep_until(queues.retry_at.unwrap_or(linger).into()),
                if queues.retry_at.is_some() => {
                queues.retry_at = None;
                let due = std::mem::take(&mut queues.retry);
                queues.delete.extend(due);
                if let Some(sqs) = &effects.sqs {
                    flush_deletes(sqs, &mut entries, &mut queues, true).await;
                }
            },
        }
        if let Some(sqs) = &effects.sqs {
            if queues.delete.len() >= BATCH {
                flush_deletes(sqs, &mut entries, &mut queues, false).await;
            }
            if !queues.release.is_empty() {
                release(sqs, &mut entries, &mut queues.release, retry_in).await;
            }
        }
        if !open
            && settles.is_empty()
            && others.is_empty()
            && queues.delete.is_empty()
            && queues.retry.is_empty()
        {
            break;
        }
    }
}

/// Writes a backfill file's marker (its records are durable); a failed write only means a
/// re-run processes the file again.
async fn write_marker(store: &Store, key: &str) {
    if let Err(e) = store
        .put(key, bytes::Bytes::new(), "application/octet-stream")
        .await
    {
        metrics::emit(MarkerWriteFailed { key, error: &e });
    }
}

/// Keeps waiting messages invisible: every entry extended more than `extend_after` ago is set
/// to `vis` again (less near SQS's 12-hour limit), ten per call, several calls at once.
async fn heartbeat(
    sqs: &Arc<Sqs>,
    entries: &mut HashMap<u64, Entry>,
    extend_after: Duration,
    vis: Duration,
) {
    let now = Instant::now();
    let mut due: Vec<(u64, (String, i32))> = Vec::new();
    for (key, e) in entries.iter_mut() {
        if !e.heartbeat || now.duration_since(e.extended) < extend_after {
            continue;
        }
        match visibility_for(now.duration_since(e.received), vis) {
            Some(secs) => due.push((*key, (e.receipt.clone(), secs))),
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
    for (key, outcome) in set_visibility_all(sqs, due).await {
        let Some(e) = entries.get_mut(&key) else {
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
    sqs: &Arc<Sqs>,
    entries: &mut HashMap<u64, Entry>,
    queues: &mut Queues,
    all: bool,
) {
    let mut waiting = std::mem::take(&mut queues.delete);
    let n = if all {
        waiting.len()
    } else {
        waiting.len() / BATCH * BATCH
    };
    let going: HashMap<u64, u32> = waiting.drain(..n).collect();
    // Keys go with their receipts, so an outcome always meets its own entry.
    let calls: Vec<(u64, String)> = going
        .keys()
        .filter_map(|k| entries.get(k).map(|e| (*k, e.receipt.clone())))
        .collect();
    let sqs = sqs.clone();
    let outcomes = batched(calls, move |receipts: Vec<String>| {
        let sqs = sqs.clone();
        async move {
            let refs: Vec<&str> = receipts.iter().map(String::as_str).collect();
            sqs.delete_batch(&refs).await
        }
    })
    .await;
    for (key, outcome) in outcomes {
        let attempts = going.get(&key).copied().unwrap_or(0);
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
    queues.linger_since = (!waiting.is_empty()).then(Instant::now);
    queues.delete = waiting;
}

/// Hands failed messages back: visible again in `retry_in` seconds rather than after the
/// full timeout, but not in a hot loop. A refused message is only forgotten: it comes back
/// after its timeout (and, after the queue's `maxReceiveCount`, goes to the DLQ).
async fn release(
    sqs: &Arc<Sqs>,
    entries: &mut HashMap<u64, Entry>,
    keys: &mut Vec<(u64, Outcome)>,
    retry_in: i32,
) {
    let mut back = Vec::new();
    for (key, outcome) in std::mem::take(keys) {
        let Some(e) = entries.remove(&key) else {
            continue;
        };
        metrics::emit(MessagesInFlight(-1));
        if outcome == Outcome::Refused {
            continue;
        }
        metrics::emit(MessageAbandoned {
            message_id: &e.message_id,
        });
        if e.heartbeat {
            back.push((key, (e.receipt, retry_in)));
        }
    }
    for (_, outcome) in set_visibility_all(sqs, back).await {
        if let EntryOutcome::Failed(detail) | EntryOutcome::Gone(detail) = outcome {
            // It comes back after its current timeout instead.
            metrics::emit(SqsCallFailed {
                operation: "change_message_visibility",
                error: &detail,
            });
        }
    }
}

/// Sets the visibility of every (receipt, seconds) entry, ten per call, `CALLS_AT_ONCE` calls
/// at a time.
async fn set_visibility_all(
    sqs: &Arc<Sqs>,
    entries: Vec<(u64, (String, i32))>,
) -> Vec<(u64, EntryOutcome)> {
    let sqs = sqs.clone();
    batched(entries, move |batch: Vec<(String, i32)>| {
        let sqs = sqs.clone();
        async move {
            let refs: Vec<(&str, i32)> = batch.iter().map(|(r, s)| (r.as_str(), *s)).collect();
            sqs.set_visibility_batch(&refs).await
        }
    })
    .await
}

/// Makes one batch call per `BATCH` entries with `call`, at most `CALLS_AT_ONCE` in flight (a
/// slow call holds up only its own entries; each call keeps its own deadline and retries).
/// Returns each entry's key with its outcome.
async fn batched<A, F, Fut>(entries: Vec<(u64, A)>, call: F) -> Vec<(u64, EntryOutcome)>
where
    A: Send + 'static,
    F: Fn(Vec<A>) -> Fut,
    Fut: std::future::Future<Output = Vec<EntryOutcome>> + Send + 'static,
{
    let mut calls: JoinSet<Vec<(u64, EntryOutcome)>> = JoinSet::new();
    let mut out = Vec::with_capacity(entries.len());
    let mut rest = entries.into_iter().peekable();
    while rest.peek().is_some() {
        if calls.len() >= CALLS_AT_ONCE
            && let Some(Ok(done)) = calls.join_next().await
        {
            out.extend(done);
        }
        let (keys, args): (Vec<u64>, Vec<A>) = rest.by_ref().take(BATCH).unzip();
        let call = call(args);
        calls.spawn(async move { keys.into_iter().zip(call.await).collect() });
    }
    // A call cannot panic; were one to, its entries stay in the ledger and come back after
    // their timeout.
    while let Some(done) = calls.join_next().await {
        out.extend(done.unwrap_or_default());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// 120 entries are twelve calls: against an endpoint that never answers, eight are open at
    /// once (not one after another), and never more than eight.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn batch_calls_go_out_eight_at_a_time() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let open = Arc::new(AtomicUsize::new(0));
        let counted = open.clone();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for conn in listener.incoming() {
                counted.fetch_add(1, Ordering::SeqCst);
                held.push(conn);
            }
        });
        // Calls outlive the test: only concurrency can open a second connection.
        let sqs = Arc::new(Sqs::for_test(
            &format!("http://{addr}"),
            Duration::from_secs(3600),
        ));
        let entries: Vec<(u64, (String, i32))> =
            (0..120).map(|i| (i, (format!("r{i}"), 30))).collect();
        let calls = tokio::spawn(async move { set_visibility_all(&sqs, entries).await });
        let deadline = Instant::now() + Duration::from_secs(60);
        while open.load(Ordering::SeqCst) < CALLS_AT_ONCE {
            assert!(
                Instant::now() < deadline,
                "{} calls in flight, want {CALLS_AT_ONCE}",
                open.load(Ordering::SeqCst)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(open.load(Ordering::SeqCst), CALLS_AT_ONCE, "bounded");
        calls.abort();
    }

    /// Every source reserves room before it reads: none while the buffer budget is reached.
    #[tokio::test]
    async fn room_waits_while_the_buffer_budget_is_reached() {
        use std::sync::atomic::AtomicBool;
        let full = Arc::new(AtomicBool::new(true));
        let f = full.clone();
        let (ledger, driver) = Ledger::start(
            Effects::default(),
            10,
            Arc::new(move || f.load(Ordering::SeqCst)),
        );
        let waiting = {
            let ledger = ledger.clone();
            tokio::spawn(async move { ledger.reserve_one().await.is_some() })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !waiting.is_finished(),
            "no room while the budget is reached"
        );
        full.store(false, Ordering::SeqCst);
        let got = tokio::time::timeout(Duration::from_secs(30), waiting)
            .await
            .expect("room once relieved")
            .expect("join");
        assert!(got);

        // A batch's outcome reaches its reader through the ledger.
        let room = ledger.reserve_one().await.expect("room");
        let (hold, settled) = crate::ack::Hold::new();
        let told = ledger.track_batch(settled, room);
        hold.commit();
        assert_eq!(told.outcome().await, Outcome::Written);
        drop(ledger);
        tokio::time::timeout(Duration::from_secs(30), driver.finish())
            .await
            .expect("the driver ends once every unit has settled");
    }

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
