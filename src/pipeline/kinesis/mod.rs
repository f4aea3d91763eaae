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

use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::PipelineError;
use super::engine::Engine;
use super::ledger::{Effects, Ledger, Pressure};
use super::service::ServiceReport;
use crate::config::{Config, KinesisConfig};
use crate::fetch::S3Fetcher;
use crate::metrics::{self, *};
use crate::server;
use crate::sink::write::Written;
use crate::source::kinesis::{self, Kinesis};
use crate::source::lease::{Claim, LeaseTable, Observer};
use coordinate::{Round, call_deadline, coordinate, lease_call, sync_shards};

mod coordinate;
mod hand_on;
mod reader;

/// Batches handed on whose records are not all written yet (their records are bounded by the
/// buffer budget).
const MAX_UNACKED_BATCHES: usize = 10_000;

struct Ctx {
    cfg: KinesisConfig,
    kinesis: Kinesis,
    leases: LeaseTable,
    fetcher: S3Fetcher,
    /// Every batch handed on is a unit here: reading pauses on the buffer budget.
    ledger: Ledger,
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
    claim: Arc<Claim>,
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
    let budget = engine.budget();
    let over = budget.clone();
    let pressure: Pressure = Arc::new(move || over.over());
    let cap = crate::testhook::max_unacked(MAX_UNACKED_BATCHES);
    let (ledger, ledger_driver) = Ledger::start(Effects::default(), cap, pressure);
    // Batches settle only once their buffers are written: a full ledger seals buffers early.
    let ledger = ledger.seal_early_when_full(budget);
    let ctx = Arc::new(Ctx {
        ledger,
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
    let checks = vec![
        server::check(
            "stream",
            ctx.clone(),
            |c| async move { c.kinesis.check().await },
        ),
        server::check(
            "leases",
            ctx.clone(),
            |c| async move { c.leases.check().await },
        ),
        server::check("output", store.clone(), |s| async move {
            s.check().await.map_err(|e| e.to_string())
        }),
        server::check("workers", engine.workers(), |w| async move { w.check() }),
    ];
    let server = tokio::spawn(server::serve(listener, Arc::new(checks)));

    let files = engine.submitter();
    let mut held: HashMap<String, Held> = HashMap::new();
    let mut stopping: HashMap<String, JoinHandle<Ended>> = HashMap::new();
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
            stopping: &mut stopping,
            observer: &mut observer,
            shards: &shards,
            lease_duration,
            renew_deadline: renew_every,
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
    // Leases stay renewed (each by its own renewer) while the buffers flush, so no one takes
    // them over mid-drain; once the readers are done, the renewers stop and the leases go.
    let claims: Vec<(String, Arc<Claim>)> = held
        .iter()
        .map(|(k, h)| (k.clone(), h.claim.clone()))
        .collect();
    // The stop senders stay alive until the readers are done.
    let readers: Vec<Held> = held.drain().map(|(_, h)| h).collect();
    let uploader_abort = engine.uploader_abort();
    let drained = tokio::time::timeout(grace, async {
        let finished = engine.finish().await;
        for h in readers {
            let _ = h.task.await;
        }
        finished
    })
    .await;
    if drained.is_err() {
        // Uploads cut off mid-way are aborted, so their parts do not stay in the bucket.
        uploader_abort.abort();
        crate::sink::write::settle_abandoned(Duration::from_secs(5)).await;
    }
    // Every reader is done: nothing more to tell them.
    ledger_driver.abort_handle().abort();
    for (_, claim) in &claims {
        claim.revoke();
    }
    // Whatever happened, give the leases up so that others need not wait for them to expire:
    // every one this worker's name holds, or (the table not answering in time) those it read.
    let deadline = call_deadline(&ctx);
    let mine: Vec<String> = match lease_call(deadline, ctx.leases.scan()).await {
        Ok(all) => all
            .into_iter()
            .filter(|l| l.owner.as_deref() == Some(ctx.leases.me.as_str()))
            .map(|l| l.key)
            .collect(),
        Err(e) => {
            metrics::emit(KinesisCallFailed {
                operation: "scan_leases",
                shard: "",
                error: &e.to_string(),
            });
            claims.into_iter().map(|(k, _)| k).collect()
        }
    };
    for key in mine {
        if let Err(e) = lease_call(deadline, ctx.leases.release(&key)).await {
            metrics::emit(KinesisCallFailed {
                operation: "release_lease",
                shard: &key,
                error: &e.to_string(),
            });
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
