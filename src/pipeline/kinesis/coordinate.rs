//! Lease coordination: the shard list synced into the lease table, free and expired leases
//! taken, handoffs asked for and given, one reader and one renewer started per held shard, and
//! a shard's reader stopped (and returned) before another of it starts.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::reader::read_shard;
use super::{Ctx, Ended, Held, Stop};
use crate::metrics::{self, *};
use crate::pipeline::engine::Submitter;
use crate::source::kinesis::{ShardInfo, StartAt};
use crate::source::lease::{self, Claim, Lease, LeaseError, Observer, SHARD_END, TRIM_HORIZON};

/// How long any one call of the coordinator (or a reader's lease write) may take: a lease
/// duration. Past it the world may have moved on (the lease expired, the shard list changed),
/// so the call counts as failed and is tried again later; a hung DynamoDB or Kinesis call can
/// then neither stall the coordinator nor, holding a claim, its lease's renewals.
pub(super) fn call_deadline(ctx: &Ctx) -> Duration {
    Duration::from_millis(ctx.cfg.lease_duration_millis)
}

/// `call` under `deadline`; a call still unanswered at the deadline is dropped.
pub(super) async fn within<T, E: std::fmt::Display>(
    deadline: Duration,
    call: impl Future<Output = Result<T, E>>,
) -> Result<T, String> {
    match tokio::time::timeout(deadline, call).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err(format!(
            "no answer within the {} ms deadline",
            deadline.as_millis()
        )),
    }
}

/// `within` for lease-table calls, keeping `Conflict` apart.
pub(super) async fn lease_call<T>(
    deadline: Duration,
    call: impl Future<Output = Result<T, LeaseError>>,
) -> Result<T, LeaseError> {
    match tokio::time::timeout(deadline, call).await {
        Ok(r) => r,
        Err(_) => Err(LeaseError::Call(format!(
            "no answer within the {} ms deadline",
            deadline.as_millis()
        ))),
    }
}

/// Lists the stream's shards and creates a lease for each new one (see `new_leases`), every
/// call under the deadline. Returns the shard ids.
pub(super) async fn sync_shards(ctx: &Ctx) -> Result<HashSet<String>, String> {
    let deadline = call_deadline(ctx);
    let list = within(deadline, ctx.kinesis.list_shards()).await?;
    let known: HashSet<String> = within(deadline, ctx.leases.scan())
        .await?
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
        within(
            deadline,
            ctx.leases.create(&s.id, &s.parents, start, checkpoint),
        )
        .await?;
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
    /// Readers of leases given up, stopped but perhaps not yet returned: no new reader of the
    /// shard starts until its old one has, so two never read one shard.
    pub(super) stopping: &'a mut HashMap<String, JoinHandle<Ended>>,
    pub(super) observer: &'a mut Observer,
    pub(super) shards: &'a HashSet<String>,
    pub(super) lease_duration: Duration,
    /// How often each held lease is renewed (by its own task, so nothing else in the round can
    /// delay it).
    pub(super) renew_deadline: Duration,
    pub(super) handoff_timeout: Duration,
    pub(super) last_sync: &'a mut Option<Instant>,
    /// Leases this worker asked to be handed over, not yet received.
    pub(super) requested: &'a mut HashSet<String>,
}

/// One round of lease work: drop what was lost, hand over what others asked for, take what is
/// due. Renewals are not part of it: each holding renews itself (`keep_renewed`).
pub(super) async fn coordinate(r: Round<'_>) {
    let Round {
        ctx,
        files,
        held,
        stopping,
        observer,
        shards,
        lease_duration,
        renew_deadline,
        handoff_timeout,
        last_sync,
        requested,
    } = r;
    let deadline = call_deadline(ctx);
    stopping.retain(|_, t| !t.is_finished());
    // Readers that ended on their own (a reader draining for a handoff is dealt with below).
    let done: Vec<String> = held
        .iter()
        .filter(|(_, h)| h.task.is_finished() && h.handoff.is_none())
        .map(|(k, _)| k.clone())
        .collect();
    for k in done {
        if let Some(h) = held.remove(&k) {
            h.claim.revoke();
            let ended = h.task.await.unwrap_or(Ended::LeaseLost);
            forget_shard(ctx, &k);
            if ended == Ended::ShardEnd {
                // Its children may start now: look for them at once.
                *last_sync = None;
                let _ = lease_call(deadline, ctx.leases.release(&k)).await;
            }
        }
    }

    let all = match lease_call(deadline, ctx.leases.scan()).await {
        Ok(l) => l,
        Err(e) => {
            metrics::emit(KinesisCallFailed {
                operation: "scan_leases",
                shard: "",
                error: &e.to_string(),
            });
            lose_lost(ctx, held, stopping, &HashMap::new());
            // Without the table, a lease not renewed for its whole duration may be another's.
            drop_stale(ctx, held, stopping, lease_duration);
            return;
        }
    };
    let now = Instant::now();
    observer.observe(&all, now);
    let by_key: HashMap<&str, &Lease> = all.iter().map(|l| (l.key.as_str(), l)).collect();
    let me = ctx.leases.me.as_str();

    // Leases lost (a write found them changed, or the table shows another owner or holding),
    // then handoffs others asked for.
    lose_lost(ctx, held, stopping, &by_key);
    for (k, h) in held.iter_mut() {
        let asked = by_key.get(k.as_str()).and_then(|l| l.next_owner.clone());
        if let (Some(to), None) = (asked, &h.handoff) {
            // Stop reading; what was read gets written and checkpointed first.
            let _ = h.stop.send(Stop::Drain);
            metrics::emit(LeaseHandoff {
                shard: k,
                to: &to,
                stage: "draining",
            });
            h.handoff = Some((to, Instant::now()));
        }
    }
    drop_stale(ctx, held, stopping, lease_duration);

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
        match lease_call(deadline, ctx.leases.hand_over(&k, &claim, &to)).await {
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
                lose(ctx, held, stopping, &k);
            }
            Err(LeaseError::Conflict) => {
                metrics::emit(LeaseLost {
                    shard: &k,
                    reason: "changed during the handoff",
                });
                lose(ctx, held, stopping, &k);
            }
            Err(e) => metrics::emit(KinesisCallFailed {
                operation: "hand_over_lease",
                shard: &k,
                error: &e.to_string(),
            }),
        }
    }

    // A shard whose old reader has not returned yet waits for the next round.
    let startable =
        |key: &str, held: &HashMap<String, Held>, stopping: &HashMap<String, JoinHandle<Ended>>| {
            !held.contains_key(key) && !stopping.contains_key(key)
        };
    // Leases handed to this worker, or left to it by an earlier holding under the same name
    // (a restart, or one given up as stale): taken again, so the new holding has its own token
    // and counter and anything the old one still sends fails.
    let adopt: Vec<&Lease> = all
        .iter()
        .filter(|l| {
            l.owner.as_deref() == Some(me)
                && !l.finished()
                && startable(&l.key, &*held, &*stopping)
                && lease::parents_done(l, &by_key, shards)
        })
        .collect();
    for l in adopt {
        match lease_call(deadline, ctx.leases.take(&l.key, l.counter)).await {
            Ok(claim) => {
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
                start_reader(ctx, files, held, l, claim, renew_deadline);
            }
            Err(LeaseError::Conflict) => {}
            Err(e) => metrics::emit(KinesisCallFailed {
                operation: "take_lease",
                shard: &l.key,
                error: &e.to_string(),
            }),
        }
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
            match lease_call(deadline, ctx.leases.request_handoff(&key, l.counter)).await {
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
        if !startable(&key, &*held, &*stopping) {
            continue;
        }
        match lease_call(deadline, ctx.leases.take(&key, l.counter)).await {
            Ok(claim) => {
                requested.remove(&key);
                metrics::emit(LeaseTaken {
                    shard: &key,
                    how: how.as_str(),
                    previous_owner: l.owner.as_deref().unwrap_or(""),
                });
                start_reader(ctx, files, held, l, claim, renew_deadline);
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

/// Starts reading a shard whose lease this worker now holds (`claim`), and renewing it.
fn start_reader(
    ctx: &Arc<Ctx>,
    files: &Submitter,
    held: &mut HashMap<String, Held>,
    l: &Lease,
    claim: Claim,
    renew_every: Duration,
) {
    let start = l.start_at(StartAt::initial(&ctx.cfg));
    let claim = Arc::new(claim);
    let (stop, stop_rx) = watch::channel(Stop::Run);
    tokio::spawn(keep_renewed(
        ctx.clone(),
        l.key.clone(),
        claim.clone(),
        renew_every,
    ));
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

/// Renews one holding every `every`, each renewal under the call deadline, until the holding
/// ends (revoked) or a renewal finds the lease changed (the claim is then `lost`, which the
/// next round acts on). On its own task, so that nothing the coordinator waits for (a scan, a
/// take, the shard list) can delay it.
async fn keep_renewed(ctx: Arc<Ctx>, shard: String, claim: Arc<Claim>, every: Duration) {
    let deadline = call_deadline(&ctx);
    loop {
        tokio::time::sleep(every).await;
        if claim.revoked() {
            return;
        }
        match lease_call(deadline, ctx.leases.renew(&shard, &claim)).await {
            Ok(()) => {}
            Err(LeaseError::Conflict) => return,
            Err(e) => metrics::emit(KinesisCallFailed {
                operation: "renew_lease",
                shard: &shard,
                error: &e.to_string(),
            }),
        }
    }
}

/// Gives up the leases a write found changed, or that the table (`by_key`, when scanned)
/// shows with another owner or holding.
fn lose_lost(
    ctx: &Ctx,
    held: &mut HashMap<String, Held>,
    stopping: &mut HashMap<String, JoinHandle<Ended>>,
    by_key: &HashMap<&str, &Lease>,
) {
    let me = ctx.leases.me.as_str();
    let lost: Vec<String> = held
        .iter()
        .filter(|(k, h)| {
            h.claim.lost()
                || by_key
                    .get(k.as_str())
                    .is_some_and(|l| l.owner.as_deref() != Some(me) || l.token != h.claim.token())
        })
        .map(|(k, _)| k.clone())
        .collect();
    for k in lost {
        metrics::emit(LeaseLost {
            shard: &k,
            reason: "taken by another worker",
        });
        lose(ctx, held, stopping, &k);
    }
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

/// Ends a holding: its claim is revoked first (nothing more of it reaches the table; whatever
/// it sent already is fenced by the next holding's counter), its reader stopped at its next
/// await, and kept in `stopping` until it has returned.
fn lose(
    ctx: &Ctx,
    held: &mut HashMap<String, Held>,
    stopping: &mut HashMap<String, JoinHandle<Ended>>,
    key: &str,
) {
    if let Some(h) = held.remove(key) {
        h.claim.revoke();
        let _ = h.stop.send(Stop::Abandon);
        h.task.abort();
        stopping.insert(key.to_owned(), h.task);
        forget_shard(ctx, key);
    }
}

/// Leases not renewed for a whole lease duration may already be someone else's: stop reading.
fn drop_stale(
    ctx: &Ctx,
    held: &mut HashMap<String, Held>,
    stopping: &mut HashMap<String, JoinHandle<Ended>>,
    lease_duration: Duration,
) {
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
        lose(ctx, held, stopping, &k);
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
