//! One shard's reader: GetRecords polling, batches handed on, the settled prefix checkpointed,
//! a rewind to the checkpoint on failure, SHARD_END once everything read is written. A shard
//! without a checkpoint is pinned at its first record read before that record is handed on, so
//! the rewind point (here, and for whoever takes the lease over) is never the configured LATEST.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};

use super::coordinate::{call_deadline, lease_call};
use super::hand_on::hand_on;
use super::{Ctx, Ended, Stop};
use crate::metrics::{self, *};
use crate::pipeline::engine::Submitter;
use crate::retry::Backoff;
use crate::source::kinesis::{Advance, Fetched, KinesisError, Progress, StartAt, seq_cmp};
use crate::source::lease::{Claim, LeaseError, SHARD_END};

/// The shortest time between two GetRecords calls on one shard.
const MIN_CALL_INTERVAL: Duration = Duration::from_millis(200);

/// Reads one shard until it ends, the lease is lost, or the worker drains.
pub(super) async fn read_shard(
    ctx: Arc<Ctx>,
    shard: String,
    claim: Arc<Claim>,
    start: StartAt,
    mut stop: watch::Receiver<Stop>,
    files: Submitter,
) -> Ended {
    let mut files = Some(files);
    let stream = ctx.kinesis.stream.clone();
    let backoff = Backoff {
        attempts: u32::MAX,
        base: Duration::from_millis(200),
        max: Duration::from_secs(5),
    };
    let poll = Duration::from_millis(ctx.cfg.poll_interval_millis);
    let deadline = call_deadline(&ctx);
    // The checkpoint as written (or the pinned first record), and where reading goes on from.
    let mut pinned = matches!(start, StartAt::After(_) | StartAt::At(_));
    let mut checkpointed = start.clone();
    let mut position = start;
    let mut iterator: Option<String> = None;
    let mut progress = Progress::default();
    // An advance whose checkpoint write failed: written again before the shard is handed on.
    let mut owed: Option<String> = None;
    let (mut settled_tx, mut settled_rx) = mpsc::unbounded_channel::<(u64, bool)>();
    let mut failures = 0u32;
    let mut at_end = false;
    let mut last_advance = Instant::now();
    let mut last_call: Option<Instant> = None;

    loop {
        metrics::emit(CheckpointAge {
            shard: &shard,
            seconds: Some(last_advance.elapsed().as_secs_f64()),
        });
        let state = *stop.borrow();
        if state == Stop::Abandon {
            return Ended::LeaseLost;
        }
        let draining = state == Stop::Drain;
        if draining {
            files = None;
        }
        // Drained, unless a checkpoint is still owed: it is retried below first.
        if draining && !at_end && progress.in_flight() == 0 && owed.is_none() {
            return Ended::Drained;
        }
        if at_end && progress.in_flight() == 0 {
            // Everything up to the shard's end is written.
            return match lease_call(deadline, ctx.leases.checkpoint(&shard, &claim, SHARD_END))
                .await
            {
                Ok(()) => {
                    metrics::emit(ShardEnded { shard: &shard });
                    Ended::ShardEnd
                }
                Err(LeaseError::Conflict) => Ended::LeaseLost,
                Err(e) => {
                    metrics::emit(KinesisCallFailed {
                        operation: "checkpoint",
                        shard: &shard,
                        error: &e.to_string(),
                    });
                    tokio::time::sleep(backoff.delay(3)).await;
                    continue;
                }
            };
        }

        // Apply settlements: wait for one when there is nothing else to do.
        let mut outcomes = Vec::new();
        if draining || at_end {
            tokio::select! {
                r = settled_rx.recv() => outcomes.extend(r),
                _ = stop.changed() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
        while let Ok(o) = settled_rx.try_recv() {
            outcomes.push(o);
        }
        // How far the checkpoint may go, and whether a batch failed after that point.
        let mut to = None;
        let mut failed = false;
        for (ticket, ok) in outcomes {
            match progress.settle(ticket, ok) {
                Advance::None => {}
                Advance::To(seq) => to = Some(seq),
                Advance::Failed => {
                    failed = true;
                    break;
                }
            }
        }
        if let Some(seq) = furthest(to, owed.take()) {
            match lease_call(deadline, ctx.leases.checkpoint(&shard, &claim, &seq)).await {
                Ok(()) => {
                    checkpointed = StartAt::After(seq);
                    last_advance = Instant::now();
                }
                Err(LeaseError::Conflict) => return Ended::LeaseLost,
                // Written again with the next advance, or on its own before draining ends.
                Err(e) => {
                    metrics::emit(KinesisCallFailed {
                        operation: "checkpoint",
                        shard: &shard,
                        error: &e.to_string(),
                    });
                    owed = Some(seq);
                }
            }
        }
        if failed {
            let at = match &checkpointed {
                StartAt::After(s) => s.clone(),
                StartAt::At(s) => format!("(the first record read, {s})"),
                _ => "(initial position)".into(),
            };
            metrics::emit(ShardRewound {
                shard: &shard,
                checkpoint: &at,
            });
            position = checkpointed.clone();
            iterator = None;
            at_end = false;
            progress = Progress::default();
            (settled_tx, settled_rx) = mpsc::unbounded_channel();
            failures += 1;
            wait(&mut stop, backoff.delay(failures.min(6))).await;
            continue;
        }
        if draining || at_end {
            continue;
        }

        let Some(files_now) = files.as_ref() else {
            continue;
        };

        // Read.
        let it = match &iterator {
            Some(it) => it.clone(),
            None => match kinesis_call(deadline, ctx.kinesis.iterator(&shard, &position)).await {
                Ok(it) => {
                    iterator = Some(it.clone());
                    it
                }
                Err(e) => {
                    failures += 1;
                    metrics::emit(KinesisCallFailed {
                        operation: "get_shard_iterator",
                        shard: &shard,
                        error: &e.to_string(),
                    });
                    wait(&mut stop, backoff.delay(failures.min(6))).await;
                    continue;
                }
            },
        };
        // Kinesis allows five GetRecords calls per second per shard.
        if let Some(t) = last_call {
            let since = t.elapsed();
            if since < MIN_CALL_INTERVAL {
                tokio::time::sleep(MIN_CALL_INTERVAL - since).await;
            }
        }
        last_call = Some(Instant::now());
        let fetched = match kinesis_call(
            deadline,
            ctx.kinesis.get_records(&it, ctx.cfg.max_records_per_call),
        )
        .await
        {
            Ok(f) => {
                failures = 0;
                f
            }
            Err(e) => {
                failures += 1;
                if let KinesisError::ExpiredIterator(_) = e {
                    // Renewed where reading stopped (never behind the checkpoint).
                    iterator = None;
                    continue;
                }
                metrics::emit(KinesisCallFailed {
                    operation: "get_records",
                    shard: &shard,
                    error: &e.to_string(),
                });
                wait(&mut stop, backoff.delay(failures.min(6))).await;
                continue;
            }
        };
        let Fetched {
            records,
            next,
            millis_behind,
        } = fetched;
        metrics::emit(KinesisRecordsFetched);
        metrics::emit(KinesisBehind {
            stream: &stream,
            shard: &shard,
            millis: Some(millis_behind),
        });
        let empty = records.is_empty();
        if let (false, Some(first)) = (pinned, records.first()) {
            // Pinned before anything is handed on: a rewind or a takeover comes back here.
            let seq = first.seq.clone();
            let first = StartAt::At(seq.clone());
            match lease_call(deadline, ctx.leases.pin(&shard, &claim, &seq)).await {
                Ok(()) => {
                    pinned = true;
                    checkpointed = first;
                }
                Err(LeaseError::Conflict) => return Ended::LeaseLost,
                Err(e) => {
                    metrics::emit(KinesisCallFailed {
                        operation: "pin_start",
                        shard: &shard,
                        error: &e.to_string(),
                    });
                    // Read these records again once the pin is written.
                    position = first.clone();
                    checkpointed = first;
                    iterator = None;
                    failures += 1;
                    wait(&mut stop, backoff.delay(failures.min(6))).await;
                    continue;
                }
            }
        }
        if let Some(last) = records.last() {
            let last_seq = last.seq.clone();
            let ticket = progress.push(last_seq.clone());
            let hold = hand_on(&ctx, &shard, records, files_now).await;
            let tx = settled_tx.clone();
            match hold {
                Some(settled) => {
                    tokio::spawn(async move {
                        let ok = settled.await.unwrap_or(false);
                        let _ = tx.send((ticket, ok));
                    });
                }
                None => {
                    let _ = tx.send((ticket, false));
                }
            }
            position = StartAt::After(last_seq);
        }
        iterator = next;
        if iterator.is_none() || closed_and_read(&ctx, &shard, &position, empty, millis_behind) {
            at_end = true;
            continue;
        }
        if empty && progress.in_flight() == 0 {
            // Caught up with nothing owed: the checkpoint is as fresh as it can be.
            last_advance = Instant::now();
        }
        if empty || millis_behind == 0 {
            wait(&mut stop, poll).await;
        }
    }
}

/// A Kinesis call under `deadline` (an iterator outlives a dropped GetRecords call).
async fn kinesis_call<T>(
    deadline: Duration,
    call: impl std::future::Future<Output = Result<T, KinesisError>>,
) -> Result<T, KinesisError> {
    tokio::time::timeout(deadline, call)
        .await
        .unwrap_or_else(|_| {
            Err(KinesisError::Other(format!(
                "no answer within the {} ms deadline",
                deadline.as_millis()
            )))
        })
}

/// The later of two checkpoints (every one of them is a settled prefix).
fn furthest(a: Option<String>, b: Option<String>) -> Option<String> {
    match (a, b) {
        (Some(a), Some(b)) if seq_cmp(&a, &b) == std::cmp::Ordering::Less => Some(b),
        (a, b) => a.or(b),
    }
}

/// A closed shard (split or merged) whose last record has been read. Kinesis says so with a
/// missing NextShardIterator; some emulators never do, so the shard list's ending sequence
/// number is checked too.
fn closed_and_read(
    ctx: &Ctx,
    shard: &str,
    position: &StartAt,
    empty: bool,
    millis_behind: i64,
) -> bool {
    if !empty || millis_behind != 0 {
        return false;
    }
    let Some(ending) = ctx.closed.read().ok().and_then(|c| c.get(shard).cloned()) else {
        return false;
    };
    match position {
        StartAt::After(seq) => seq_cmp(seq, &ending) != std::cmp::Ordering::Less,
        // Nothing read yet: only Kinesis's missing iterator can tell the end.
        _ => false,
    }
}

async fn wait(stop: &mut watch::Receiver<Stop>, d: Duration) {
    tokio::select! {
        _ = stop.changed() => {}
        _ = tokio::time::sleep(d) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::furthest;

    #[test]
    fn an_owed_checkpoint_is_written_unless_a_later_one_supersedes_it() {
        let s = |v: &str| Some(v.to_owned());
        assert_eq!(furthest(s("9"), s("10")), s("10"));
        assert_eq!(furthest(s("11"), s("10")), s("11"));
        assert_eq!(furthest(None, s("10")), s("10"));
        assert_eq!(furthest(s("9"), None), s("9"));
        assert_eq!(furthest(None, None), None);
    }
}
