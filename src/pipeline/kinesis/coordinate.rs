//! Lease coordination: the shard list synced into the lease table, held leases renewed, free
//! and expired ones taken, handoffs asked for and given, one reader started per held shard.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::reader::read_shard;
use super::{Ctx, Ended, Held, Stop};
use crate::metrics::{self, *};
use crate::pipeline::engine::Submitter;
use crate::source::kinesis::{ShardInfo, StartAt};
use crate::source::lease::{self, Claim, Lease, LeaseError, Observer, SHARD_END, TRIM_HORIZON};

/// Lists the stream's shards and creates a lease for each new one (see `new_leases`).
/// Returns the shard ids.
pub(super) async fn sync_shards(ctx: &Ctx) -> Result<HashSet<String>, String> {
    let list = ctx.kinesis.list_shards().await.map_err(|e| e.to_string())?;
    let known: HashSet<String> = ctx
        .leases
        .scan()
        .await
        .map_err(|e| e.to_string())?
        .into_iter()
        .map(|l| l.key)
        .collect();
    let latest = StartAt::initial(&ctx.cfg) == StartAt::Latest;
    for (s, how) in new_leases(&list, &known, latest) {
        let (start, checkpoint) = match how {
            NewLease::Configured => ("", ""),
            NewLease::TrimHorizon => (TRIM_HORIZON, ""),
            NewLease::Ended => ("", SHARD_END),
        };
        ctx.leases
            .create(&s.id, &s.parents, start, checkpoint)
            .await
            .map_err(|e| e.to_string())?;
    }
    if let Ok(mut closed) = ctx.closed.write() {
        closed.clear();
        closed.extend(
            list.iter()
                .filter_map(|s| Some((s.id.clone(), s.ending_seq.clone()?))),
        );
    }
    Ok(list.into_iter().map(|s| s.id).collect())
}

/// How a new shard's lease starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum NewLease {
    /// At the configured position.
    Configured,
    /// At TRIM_HORIZON: a descendant of a shard this stream's workers read (the KCL's rule), so
    /// nothing written to it while its parents drained is skipped.
    TrimHorizon,
    /// Already at SHARD_END: a shard closed before reading began at LATEST has nothing after
    /// LATEST, and its children must not wait for it (they would skip what arrives meanwhile).
    Ended,
}

/// The leases to create for the shards in `list` not in `known`. Descent is followed through
/// shards new in the same list (a reshard of a reshard between two syncs), in any list order.
pub(super) fn new_leases<'a>(
    list: &'a [ShardInfo],
    known: &HashSet<String>,
    latest: bool,
) -> Vec<(&'a ShardInfo, NewLease)> {
    let fresh: Vec<&ShardInfo> = list.iter().filter(|s| !known.contains(&s.id)).collect();
    let mut descendants: HashSet<&str> = HashSet::new();
    // Each pass adds at least one shard or ends: at most `fresh.len()` passes.
    loop {
        let before = descendants.len();
        for s in &fresh {
            if s.parents
                .iter()
                .any(|p| known.contains(p) || descendants.contains(p.as_str()))
            {
                descendants.insert(s.id.as_str());
            }
        }
        if descendants.len() == before {
            break;
        }
    }
    fresh
        .into_iter()
        .map(|s| {
            let how = if descendants.contains(s.id.as_str()) {
                NewLease::TrimHorizon
            } else if latest && s.ending_seq.is_some() {
                NewLease::Ended
            } else {
                NewLease::Configured
            };
            (s, how)
        })
        .collect()
}

/// The coordinator's view between rounds.
pub(super) struct Round<'a> {
    pub(super) ctx: &'a Arc<Ctx>,
    pub(super) files: &'a Submitter,
    pub(super) held: &'a mut HashMap<String, Held>,
    pub(super) observer: &'a mut Observer,
    pub(super) shards: &'a HashSet<String>,
    pub(super) lease_duration: Duration,
    /// How long the round waits for its renewals (they run concurrently).
    pub(super) renew_deadline: Duration,
    pub(super) handoff_timeout: Duration,
    pub(super) last_sync: &'a mut Option<Instant>,
    /// Leases this worker asked to be handed over, not yet received.
    pub(super) requested: &'a mut HashSet<String>,
}

/// One round of lease work: renew what is held, drop what was lost, hand over what others
/// asked for, take what is due.
pub(super) async fn coordinate(r: Round<'_>) {
    let Round {
        ctx,
        files,
        held,
        observer,
        shards,
        lease_duration,
        renew_deadline,
        handoff_timeout,
        last_sync,
        requested,
    } = r;
    // Readers that ended on their own (a reader draining for a handoff is dealt with below).
    let done: Vec<String> = held
        .iter()
        .filter(|(_, h)| h.task.is_finished() && h.handoff.is_none())
        .map(|(k, _)| k.clone())
        .collect();
    for k in done {
        if let Some(h) = held.remove(&k) {
            let ended = h.task.await.unwrap_or(Ended::LeaseLost);
            forget_shard(ctx, &k);
            if ended == Ended::ShardEnd {
                // Its children may start now: look for them at once.
                *last_sync = None;
                let _ = ctx.leases.release(&k).await;
            }
        }
    }

    let all = match ctx.leases.scan().await {
        Ok(l) => l,
        Err(e) => {
            metrics::emit(KinesisCallFailed {
                operation: "scan_leases",
                shard: "",
                error: &e.to_string(),
            });
            // Without the table, a lease not renewed for its whole duration may be another's.
            drop_stale(ctx, held, lease_duration);
            return;
        }
    };
    let now = Instant::now();
    observer.observe(&all, now);
    let by_key: HashMap<&str, &Lease> = all.iter().map(|l| (l.key.as_str(), l)).collect();
    let me = ctx.leases.me.as_str();

    // Renew, all at once and under a deadline, and start handoffs others asked for. A renewal
    // still unanswered at the deadline goes on in its task and updates the claim when it ends.
    let mut renewals = Vec::with_capacity(held.len());
    let mut gone = Vec::new();
    for (k, h) in held.iter() {
        if by_key
            .get(k.as_str())
            .is_some_and(|l| l.owner.as_deref() == Some(me))
        {
            let (ctx, key, claim) = (ctx.clone(), k.clone(), h.claim.clone());
            let task = tokio::spawn(async move { ctx.leases.renew(&key, &claim).await });
            renewals.push((k.clone(), task));
        } else {
            gone.push(k.clone());
        }
    }
    let until = tokio::time::Instant::now() + renew_deadline;
    let mut outcomes: Vec<(String, Result<(), LeaseError>)> = gone
        .into_iter()
        .map(|k| (k, Err(LeaseError::Conflict)))
        .collect();
    for (k, task) in renewals {
        match tokio::time::timeout_at(until, task).await {
            Ok(Ok(r)) => outcomes.push((k, r)),
            Ok(Err(e)) => outcomes.push((k, Err(LeaseError::Call(e.to_string())))),
            Err(_) => outcomes.push((
                k,
                Err(LeaseError::Call(
                    "no answer within the renewal deadline".into(),
                )),
            )),
        }
    }
    for (k, outcome) in outcomes {
        let Some(h) = held.get_mut(&k) else { continue };
        match outcome {
            Ok(()) => {
                let asked = by_key.get(k.as_str()).and_then(|l| l.next_owner.clone());
                if let (Some(to), None) = (asked, &h.handoff) {
                    // Stop reading; what was read gets written and checkpointed first.
                    let _ = h.stop.send(Stop::Drain);
                    metrics::emit(LeaseHandoff {
                        shard: &k,
                        to: &to,
                        stage: "draining",
                    });
                    h.handoff = Some((to, Instant::now()));
                }
            }
            Err(LeaseError::Conflict) => {
                metrics::emit(LeaseLost {
                    shard: &k,
                    reason: "taken by another worker",
                });
                lose(ctx, held, &k);
            }
            Err(e) => {
                metrics::emit(KinesisCallFailed {
                    operation: "renew_lease",
                    shard: &k,
                    error: &e.to_string(),
                });
            }
        }
    }
    drop_stale(ctx, held, lease_duration);

    // Hand over leases whose readers are drained (or that waited too long).
    let ready: Vec<(String, String, Arc<Claim>, bool)> = held
        .iter()
        .filter_map(|(k, h)| {
            let (to, since) = h.handoff.as_ref()?;
            let timed_out = since.elapsed() >= handoff_timeout;
            (h.task.is_finished() || timed_out)
                .then(|| (k.clone(), to.clone(), h.claim.clone(), timed_out))
        })
        .collect();
    for (k, to, claim, timed_out) in ready {
        match ctx.leases.hand_over(&k, &claim, &to).await {
            Ok(()) => {
                metrics::emit(LeaseHandoff {
                    shard: &k,
                    to: &to,
                    stage: if timed_out {
                        "timed_out"
                    } else {
                        "handed_over"
                    },
                });
                lose(ctx, held, &k);
            }
            Err(LeaseError::Conflict) => {
                metrics::emit(LeaseLost {
                    shard: &k,
                    reason: "changed during the handoff",
                });
                lose(ctx, held, &k);
            }
            Err(e) => metrics::emit(KinesisCallFailed {
                operation: "hand_over_lease",
                shard: &k,
                error: &e.to_string(),
            }),
        }
    }

    // Leases handed to this worker (or left to it by an earlier run under the same name).
    let adopt: Vec<&Lease> = all
        .iter()
        .filter(|l| {
            l.owner.as_deref() == Some(me)
                && !l.finished()
                && !held.contains_key(&l.key)
                && lease::parents_done(l, &by_key, shards)
        })
        .collect();
    for l in adopt {
        let how = if requested.remove(&l.key) {
            "handoff"
        } else {
            "adopted"
        };
        metrics::emit(LeaseTaken {
            shard: &l.key,
            how,
            previous_owner: "",
        });
        start_reader(ctx, files, held, l, l.counter);
    }
    requested.retain(|k| {
        by_key
            .get(k.as_str())
            .is_some_and(|l| l.next_owner.as_deref() == Some(me))
    });

    // Take.
    let takeable: Vec<(&Lease, bool)> = all
        .iter()
        .filter(|l| !l.finished() && lease::parents_done(l, &by_key, shards))
        .filter(|l| shards.is_empty() || shards.contains(&l.key))
        .map(|l| (l, observer.expired(l, now, lease_duration)))
        .collect();
    let plan = lease::plan(me, &takeable, ctx.cfg.max_leases_to_steal);
    for (key, how) in plan {
        let Some(l) = by_key.get(key.as_str()) else {
            continue;
        };
        if how == lease::How::Stolen {
            match ctx.leases.request_handoff(&key, l.counter).await {
                Ok(()) => {
                    requested.insert(key.clone());
                    metrics::emit(LeaseHandoff {
                        shard: &key,
                        to: me,
                        stage: "requested",
                    });
                }
                Err(LeaseError::Conflict) => {}
                Err(e) => metrics::emit(KinesisCallFailed {
                    operation: "request_handoff",
                    shard: &key,
                    error: &e.to_string(),
                }),
            }
            continue;
        }
        match ctx.leases.take(&key, l.counter).await {
            Ok(counter) => {
                requested.remove(&key);
                metrics::emit(LeaseTaken {
                    shard: &key,
                    how: how.as_str(),
                    previous_owner: l.owner.as_deref().unwrap_or(""),
                });
                start_reader(ctx, files, held, l, counter);
            }
            Err(LeaseError::Conflict) => {} // another worker was quicker
            Err(e) => metrics::emit(KinesisCallFailed {
                operation: "take_lease",
                shard: &key,
                error: &e.to_string(),
            }),
        }
    }
}

/// Starts reading a shard whose lease this worker now holds at `counter`.
fn start_reader(
    ctx: &Arc<Ctx>,
    files: &Submitter,
    held: &mut HashMap<String, Held>,
    l: &Lease,
    counter: u64,
) {
    let start = l.start_at(StartAt::initial(&ctx.cfg));
    let claim = Arc::new(Claim::new(counter));
    let (stop, stop_rx) = watch::channel(Stop::Run);
    let task = tokio::spawn(read_shard(
        ctx.clone(),
        l.key.clone(),
        claim.clone(),
        start,
        stop_rx,
        files.clone(),
    ));
    held.insert(
        l.key.clone(),
        Held {
            claim,
            stop,
            task,
            handoff: None,
        },
    );
}

/// Drops a shard's per-shard metric series (its lease went elsewhere or ended).
fn forget_shard(ctx: &Ctx, shard: &str) {
    metrics::emit(KinesisBehind {
        stream: &ctx.kinesis.stream,
        shard,
        millis: None,
    });
    metrics::emit(CheckpointAge {
        shard,
        seconds: None,
    });
}

fn lose(ctx: &Ctx, held: &mut HashMap<String, Held>, key: &str) {
    if let Some(h) = held.remove(key) {
        let _ = h.stop.send(Stop::Abandon);
        forget_shard(ctx, key);
    }
}

/// Leases not renewed for a whole lease duration may already be someone else's: stop reading.
fn drop_stale(ctx: &Ctx, held: &mut HashMap<String, Held>, lease_duration: Duration) {
    let stale: Vec<String> = held
        .iter()
        .filter(|(_, h)| h.claim.renewed().elapsed() >= lease_duration)
        .map(|(k, _)| k.clone())
        .collect();
    for k in stale {
        metrics::emit(LeaseLost {
            shard: &k,
            reason: "not renewed within the lease duration",
        });
        lose(ctx, held, &k);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shard(id: &str, parents: &[&str], closed: bool) -> ShardInfo {
        ShardInfo {
            id: id.into(),
            parents: parents.iter().map(|p| (*p).to_owned()).collect(),
            ending_seq: closed.then(|| "99".to_owned()),
        }
    }

    fn plan(list: &[ShardInfo], known: &[&str], latest: bool) -> Vec<(String, NewLease)> {
        let known: HashSet<String> = known.iter().map(|k| (*k).to_owned()).collect();
        new_leases(list, &known, latest)
            .into_iter()
            .map(|(s, h)| (s.id.clone(), h))
            .collect()
    }

    #[test]
    fn children_of_a_known_shard_start_at_trim_horizon_through_reshards_new_in_the_same_list() {
        // 0 is known; 1 and 2 split from it; 3 and 4 split from 1 before the next sync; the
        // list names the grandchildren first.
        let list = [
            shard("3", &["1"], false),
            shard("4", &["1"], false),
            shard("0", &[], true),
            shard("1", &["0"], true),
            shard("2", &["0"], false),
        ];
        for latest in [true, false] {
            assert_eq!(
                plan(&list, &["0"], latest),
                vec![
                    ("3".into(), NewLease::TrimHorizon),
                    ("4".into(), NewLease::TrimHorizon),
                    ("1".into(), NewLease::TrimHorizon),
                    ("2".into(), NewLease::TrimHorizon),
                ]
            );
        }
    }

    #[test]
    fn at_latest_a_shard_closed_before_reading_began_is_ended_so_its_children_start_at_once() {
        let list = [
            shard("0", &[], true),
            shard("1", &["0"], false),
            shard("2", &["0"], false),
        ];
        assert_eq!(
            plan(&list, &[], true),
            vec![
                ("0".into(), NewLease::Ended),
                ("1".into(), NewLease::Configured),
                ("2".into(), NewLease::Configured),
            ]
        );
        // From TRIM_HORIZON or a timestamp the parent is read first, its children at the same
        // configured position (nothing in them precedes it).
        assert!(
            plan(&list, &[], false)
                .iter()
                .all(|(_, h)| *h == NewLease::Configured)
        );
    }
}
