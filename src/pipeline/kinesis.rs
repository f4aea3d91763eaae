//! `trailhose run` with `[source.kinesis]`: workers share a stream's shards through leases in
//! DynamoDB (`source::lease`), read them with GetRecords, hand each record's events to the
//! engine, and checkpoint a shard only up to the records that are durably written.
//!
//! Tasks:
//! * the coordinator syncs the shard list into the lease table, renews held leases, takes free
//!   and expired leases, asks busier workers to hand over a bounded number (and hands over what
//!   others ask for once drained), and starts or stops one reader per held shard;
//! * a shard reader polls GetRecords, hands each batch on with one `Hold`, and checkpoints the
//!   contiguous prefix of settled batches (`Progress`); a failed batch rewinds it to the
//!   checkpoint; at SHARD_END it waits for everything to settle and checkpoints SHARD_END.
//!
//! On shutdown readers stop, buffers are flushed, final checkpoints written and leases released.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::PipelineError;
use super::engine::{Engine, Input, Submitter};
use super::service::ServiceReport;
use crate::ack::Hold;
use crate::config::{Config, KinesisConfig};
use crate::fetch::{FetchError, S3Fetcher};
use crate::metrics::{self, *};
use crate::retry::Backoff;
use crate::server::{self, Check};
use crate::sink::write::Written;
use crate::source::kinesis::{
    self, Advance, Fetched, Kinesis, KinesisError, Progress, Shape, StartAt, seq_cmp,
};
use crate::source::lease::{self, Lease, LeaseError, LeaseTable, Observer, SHARD_END};
use crate::source::notification::{Notification, is_digest_key};

/// The shortest time between two GetRecords calls on one shard.
const MIN_CALL_INTERVAL: Duration = Duration::from_millis(200);

struct Ctx {
    cfg: KinesisConfig,
    kinesis: Kinesis,
    leases: LeaseTable,
    fetcher: S3Fetcher,
    /// Closed shards' last sequence numbers, from the latest shard list.
    closed: RwLock<HashMap<String, String>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    Run,
    /// Finish what is in flight, checkpoint, return.
    Drain,
    /// The lease is gone: return at once, write nothing more.
    Abandon,
}

/// How a reader ended.
#[derive(Debug, PartialEq, Eq)]
enum Ended {
    ShardEnd,
    Drained,
    LeaseLost,
}

struct Held {
    counter: u64,
    renewed: Instant,
    stop: watch::Sender<Stop>,
    task: JoinHandle<Ended>,
    /// Being handed over to (worker, since when): its reader drains first.
    handoff: Option<(String, Instant)>,
}

fn default_worker_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "worker".into());
    let id = uuid::Uuid::now_v7().simple().to_string();
    format!("{host}:{}:{}", std::process::id(), &id[id.len() - 6..])
}

fn worker_error(what: &str, e: impl std::fmt::Display) -> PipelineError {
    PipelineError::Worker(format!("{what}: {e}"))
}

pub async fn run(
    cfg: &Config,
    shutdown: impl Future<Output = ()>,
) -> Result<ServiceReport, PipelineError> {
    let Some(kcfg) = cfg.source.kinesis.clone() else {
        return Err(worker_error("kinesis", "no [source.kinesis] section"));
    };
    let engine = Engine::open(cfg, cfg.workers(), kcfg.max_files_in_flight).await?;
    let store = engine.store();
    let shared = kinesis::aws_config(&kcfg).await;
    let me = match kcfg.worker_id.as_str() {
        "" => default_worker_id(),
        id => id.to_owned(),
    };
    let ctx = Arc::new(Ctx {
        kinesis: Kinesis::new(&shared, &kcfg.stream),
        leases: LeaseTable::new(&shared, &kcfg.lease_table(), &me),
        fetcher: S3Fetcher::new(&cfg.source.buckets).await,
        closed: RwLock::new(HashMap::new()),
        cfg: kcfg,
    });
    ctx.leases
        .ensure()
        .await
        .map_err(|e| worker_error("lease table", e))?;
    metrics::emit(LeasesHeld(0));
    tracing::info!(
        worker = %me,
        stream = %ctx.cfg.stream,
        table = %ctx.leases.table,
        "reading Kinesis"
    );

    let listener = tokio::net::TcpListener::bind(&cfg.server.listen)
        .await
        .map_err(|e| worker_error(&format!("listening on {}", cfg.server.listen), e))?;
    let checks: Vec<(&'static str, Check)> = vec![
        ("stream", {
            let ctx = ctx.clone();
            Box::new(move || {
                let ctx = ctx.clone();
                Box::pin(async move { ctx.kinesis.check().await })
            })
        }),
        ("leases", {
            let ctx = ctx.clone();
            Box::new(move || {
                let ctx = ctx.clone();
                Box::pin(async move { ctx.leases.check().await })
            })
        }),
        ("output", {
            let store = store.clone();
            Box::new(move || {
                let store = store.clone();
                Box::pin(async move { store.check().await.map_err(|e| e.to_string()) })
            })
        }),
    ];
    let server = tokio::spawn(server::serve(listener, Arc::new(checks)));

    let files = engine.submitter();
    let mut held: HashMap<String, Held> = HashMap::new();
    let mut observer = Observer::default();
    let mut shards: HashSet<String> = HashSet::new();
    let mut last_sync: Option<Instant> = None;
    let renew_every = ctx.cfg.renew_interval();
    let lease_duration = Duration::from_millis(ctx.cfg.lease_duration_millis);
    let sync_every = Duration::from_millis(ctx.cfg.shard_sync_interval_millis);
    // A handoff waits for the reader's records to be written: up to a batch's age.
    let handoff_timeout = match ctx.cfg.handoff_timeout_millis {
        0 => Duration::from_secs(cfg.batch.max_age_secs) + lease_duration,
        n => Duration::from_millis(n),
    };
    let mut requested: HashSet<String> = HashSet::new();

    tokio::pin!(shutdown);
    loop {
        if last_sync.is_none_or(|t| t.elapsed() >= sync_every) {
            match sync_shards(&ctx).await {
                Ok(ids) => {
                    shards = ids;
                    last_sync = Some(Instant::now());
                }
                Err(e) => metrics::emit(KinesisCallFailed {
                    operation: "list_shards",
                    shard: "",
                    error: &e,
                }),
            }
        }
        coordinate(Round {
            ctx: &ctx,
            files: &files,
            held: &mut held,
            observer: &mut observer,
            shards: &shards,
            lease_duration,
            handoff_timeout,
            last_sync: &mut last_sync,
            requested: &mut requested,
        })
        .await;
        metrics::emit(LeasesHeld(held.len()));
        tokio::select! {
            _ = &mut shutdown => break,
            _ = tokio::time::sleep(renew_every) => {}
        }
    }

    // Shutdown: readers stop reading and drop their way into the engine; the engine flushes
    // every buffer; holds settle; readers write their last checkpoints; leases are released.
    tracing::info!("shutting down: flushing buffers");
    let grace = Duration::from_secs(cfg.server.shutdown_grace_secs);
    let stopping = Instant::now();
    for h in held.values() {
        let _ = h.stop.send(Stop::Drain);
    }
    drop(files);
    // Leases stay renewed while the buffers flush, so no one takes them over mid-drain.
    let renewing = tokio::spawn(keep_renewing(
        ctx.clone(),
        held.iter().map(|(k, h)| (k.clone(), h.counter)).collect(),
        renew_every,
    ));
    // The stop senders stay alive until the readers are done.
    let readers: Vec<Held> = held.drain().map(|(_, h)| h).collect();
    let drained = tokio::time::timeout(grace, async {
        let finished = engine.finish().await;
        for h in readers {
            let _ = h.task.await;
        }
        finished
    })
    .await;
    renewing.abort();
    // Whatever happened, give the leases up so that others need not wait for them to expire.
    if let Ok(all) = ctx.leases.scan().await {
        for l in all
            .iter()
            .filter(|l| l.owner.as_deref() == Some(ctx.leases.me.as_str()))
        {
            if let Err(e) = ctx.leases.release(&l.key).await {
                metrics::emit(KinesisCallFailed {
                    operation: "release_lease",
                    shard: &l.key,
                    error: &e.to_string(),
                });
            }
        }
    }
    metrics::emit(LeasesHeld(0));
    server.abort();
    match drained {
        Ok(Err(e)) => Err(e),
        Ok(Ok((tally, written))) => {
            tracing::info!(
                took_ms = stopping.elapsed().as_millis() as u64,
                "shutdown complete"
            );
            Ok(ServiceReport {
                tally,
                written,
                clean: true,
            })
        }
        Err(_) => {
            tracing::warn!(
                "grace period over: records after the last checkpoints will be read again"
            );
            Ok(ServiceReport {
                tally: super::Tally::default(),
                written: Written::default(),
                clean: false,
            })
        }
    }
}

/// Renews `leases` (shard, counter) every `every` until aborted; a lease taken meanwhile is
/// left alone.
async fn keep_renewing(ctx: Arc<Ctx>, mut leases: Vec<(String, u64)>, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        let mut kept = Vec::with_capacity(leases.len());
        for (shard, counter) in leases {
            match ctx.leases.renew(&shard, counter).await {
                Ok(c) => kept.push((shard, c)),
                Err(LeaseError::Conflict) => {}
                Err(e) => {
                    metrics::emit(KinesisCallFailed {
                        operation: "renew_lease",
                        shard: &shard,
                        error: &e.to_string(),
                    });
                    kept.push((shard, counter));
                }
            }
        }
        leases = kept;
    }
}

/// Lists the stream's shards and creates a lease for each new one. Returns the shard ids.
async fn sync_shards(ctx: &Ctx) -> Result<HashSet<String>, String> {
    let list = ctx.kinesis.list_shards().await.map_err(|e| e.to_string())?;
    let known: HashSet<String> = ctx
        .leases
        .scan()
        .await
        .map_err(|e| e.to_string())?
        .into_iter()
        .map(|l| l.key)
        .collect();
    for s in list.iter().filter(|s| !known.contains(&s.id)) {
        ctx.leases
            .create(&s.id, &s.parents)
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

/// The coordinator's view between rounds.
struct Round<'a> {
    ctx: &'a Arc<Ctx>,
    files: &'a Submitter,
    held: &'a mut HashMap<String, Held>,
    observer: &'a mut Observer,
    shards: &'a HashSet<String>,
    lease_duration: Duration,
    handoff_timeout: Duration,
    last_sync: &'a mut Option<Instant>,
    /// Leases this worker asked to be handed over, not yet received.
    requested: &'a mut HashSet<String>,
}

/// One round of lease work: renew what is held, drop what was lost, hand over what others
/// asked for, take what is due.
async fn coordinate(r: Round<'_>) {
    let Round {
        ctx,
        files,
        held,
        observer,
        shards,
        lease_duration,
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

    // Renew, and start handoffs others asked for.
    let keys: Vec<String> = held.keys().cloned().collect();
    for k in keys {
        let Some(h) = held.get_mut(&k) else { continue };
        let seen = by_key.get(k.as_str());
        let still_ours =
            seen.is_some_and(|l| l.owner.as_deref() == Some(me) && l.counter == h.counter);
        let outcome = if still_ours {
            ctx.leases.renew(&k, h.counter).await
        } else {
            Err(LeaseError::Conflict)
        };
        match outcome {
            Ok(c) => {
                h.counter = c;
                h.renewed = Instant::now();
                let asked = seen.and_then(|l| l.next_owner.clone());
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
    let ready: Vec<(String, String, u64, bool)> = held
        .iter()
        .filter_map(|(k, h)| {
            let (to, since) = h.handoff.as_ref()?;
            let timed_out = since.elapsed() >= handoff_timeout;
            (h.task.is_finished() || timed_out)
                .then(|| (k.clone(), to.clone(), h.counter, timed_out))
        })
        .collect();
    for (k, to, counter, timed_out) in ready {
        match ctx.leases.hand_over(&k, counter, &to).await {
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
    let start = match l.checkpoint.as_str() {
        "" => StartAt::initial(&ctx.cfg),
        seq => StartAt::After(seq.to_owned()),
    };
    let (stop, stop_rx) = watch::channel(Stop::Run);
    let task = tokio::spawn(read_shard(
        ctx.clone(),
        l.key.clone(),
        start,
        stop_rx,
        files.clone(),
    ));
    held.insert(
        l.key.clone(),
        Held {
            counter,
            renewed: Instant::now(),
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
        .filter(|(_, h)| h.renewed.elapsed() >= lease_duration)
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

/// Reads one shard until it ends, the lease is lost, or the worker drains.
async fn read_shard(
    ctx: Arc<Ctx>,
    shard: String,
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
    // The checkpoint as written, and where reading goes on from.
    let mut checkpointed = start.clone();
    let mut position = start;
    let mut iterator: Option<String> = None;
    let mut progress = Progress::default();
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
        if (draining || at_end) && progress.in_flight() == 0 {
            if draining && !at_end {
                return Ended::Drained;
            }
            // Everything up to the shard's end is written.
            return match ctx.leases.checkpoint(&shard, SHARD_END).await {
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
        if let Some(seq) = to {
            match ctx.leases.checkpoint(&shard, &seq).await {
                Ok(()) => {
                    checkpointed = StartAt::After(seq);
                    last_advance = Instant::now();
                }
                Err(LeaseError::Conflict) => return Ended::LeaseLost,
                // The next advance writes a later checkpoint.
                Err(e) => metrics::emit(KinesisCallFailed {
                    operation: "checkpoint",
                    shard: &shard,
                    error: &e.to_string(),
                }),
            }
        }
        if failed {
            let at = match &checkpointed {
                StartAt::After(s) => s.clone(),
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
            None => match ctx.kinesis.iterator(&shard, &position).await {
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
        let fetched = match ctx
            .kinesis
            .get_records(&it, ctx.cfg.max_records_per_call)
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
        metrics::emit(KinesisBehind {
            stream: &stream,
            shard: &shard,
            millis: Some(millis_behind),
        });
        let empty = records.is_empty();
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

/// Hands a batch of records to the engine under one hold; returns its outcome, or None when
/// the engine is gone.
async fn hand_on(
    ctx: &Ctx,
    shard: &str,
    records: Vec<kinesis::Record>,
    files: &Submitter,
) -> Option<crate::ack::Settled> {
    let (hold, settled) = Hold::new();
    let stream = &ctx.kinesis.stream;
    let mut counts: HashMap<&'static str, u64> = HashMap::new();
    for r in records {
        let source = format!("kinesis://{stream}/{shard}/{}", r.seq);
        let mut docs: Vec<Vec<u8>> = Vec::new();
        match kinesis::classify(&r.data) {
            Shape::Events {
                doc,
                events: _,
                bad,
                cwl,
            } => {
                *counts
                    .entry(if cwl { "cwl_data" } else { "event" })
                    .or_default() += 1;
                docs.push(doc);
                if !bad.is_empty() {
                    metrics::emit(KinesisRecordUnrecognized {
                        source: &source,
                        reason: "message_not_json_object",
                    });
                    docs.push(kinesis::error_document(&bad));
                }
            }
            Shape::Control => *counts.entry("cwl_control").or_default() += 1,
            Shape::Notification(n) => {
                *counts.entry("notification").or_default() += 1;
                if !notification(ctx, &source, n, &hold, files).await {
                    hold.fail();
                    return None;
                }
            }
            Shape::Unrecognized { reason, detail } => {
                metrics::emit(KinesisRecordUnrecognized {
                    source: &source,
                    reason,
                });
                docs.push(kinesis::error_document(&[
                    format!("{reason}: {detail}"),
                    kinesis::describe_data(&r.data),
                ]));
            }
        }
        for doc in docs {
            if !files
                .submit(
                    source.clone(),
                    Input::Bytes(Bytes::from(doc)),
                    Some(hold.share()),
                )
                .await
            {
                hold.fail();
                return None;
            }
        }
    }
    for (shape, count) in counts {
        metrics::emit(KinesisRecords { shape, count });
    }
    hold.commit();
    Some(settled)
}

/// A file notification read from the stream: fetched and split like one from SQS. A refused
/// one (bucket outside the allowlist) goes to the error output; a failed fetch fails the batch,
/// so the shard is read again from its checkpoint.
async fn notification(
    ctx: &Ctx,
    source: &str,
    n: Notification,
    hold: &Hold,
    files: &Submitter,
) -> bool {
    let objects = match n {
        Notification::Ignorable { shape, reason } => {
            metrics::emit(NotificationReceived {
                shape: shape.as_str(),
                result: reason,
            });
            return true;
        }
        Notification::Objects { shape, objects } => {
            if let Some(bad) = ctx.fetcher.allowlist().first_refused(&objects) {
                let detail = format!(
                    "s3://{}/{} is outside the allowed buckets and prefixes",
                    bad.bucket, bad.key
                );
                metrics::emit(KinesisRecordUnrecognized {
                    source,
                    reason: "bucket_not_allowed",
                });
                let doc = kinesis::error_document(&[format!("bucket_not_allowed: {detail}")]);
                return files
                    .submit(
                        source.to_owned(),
                        Input::Bytes(Bytes::from(doc)),
                        Some(hold.share()),
                    )
                    .await;
            }
            metrics::emit(NotificationReceived {
                shape: shape.as_str(),
                result: "files",
            });
            objects
        }
    };
    for obj in objects.iter().filter(|o| !is_digest_key(&o.key)) {
        let Some(permit) = files.permit().await else {
            return false;
        };
        match ctx.fetcher.get(obj).await {
            Ok(bytes) => {
                let file = format!("s3://{}/{}", obj.bucket, obj.key);
                if !files.submit_with(file, Input::Stream(bytes), Some(hold.share()), permit) {
                    return false;
                }
            }
            // Gone or forbidden: the record goes to the error output rather than stall the
            // shard (there is no dead-letter queue here).
            Err(
                e @ (FetchError::NotAllowed { .. }
                | FetchError::S3 {
                    retryable: false, ..
                }),
            ) => {
                metrics::emit(NotifiedFileUnreadable { source, error: &e });
                let doc = kinesis::error_document(&[format!("fetch_failed: {e}")]);
                if !files.submit_with(
                    source.to_owned(),
                    Input::Bytes(Bytes::from(doc)),
                    Some(hold.share()),
                    permit,
                ) {
                    return false;
                }
            }
            // Retried by the fetcher already: read the shard again from its checkpoint.
            Err(e) => {
                metrics::emit(FetchFailed {
                    message_id: source,
                    error: &e,
                });
                return false;
            }
        }
    }
    true
}
