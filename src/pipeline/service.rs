//! `trailhose run`: workers share CloudTrail notifications from one SQS queue, fetch the files
//! from allowed buckets, and acknowledge (delete) a message only when every record of every
//! file it names is durably written.
//!
//! Tasks and threads:
//! * the receive loop long-polls SQS while the ledger has room (`ledger`);
//! * every received message goes into the ledger at once (heartbeated from then on, also while
//!   it waits for a dispatch slot); one short task per message then parses it and hands its
//!   files on (`dispatch`); its slot is free as soon as its files are handed on, not when they
//!   are written, so throughput does not depend on `batch.max_age_secs`;
//! * worker threads split, enrich and buffer files (`FileWorker`), sealing buffers by size and
//!   age; the uploader writes sealed batches and commits their holds;
//! * the ledger's driver heartbeats waiting messages and deletes settled ones, ten per call.
//!
//! Memory is bounded by configuration: at most `max_files_in_flight` fetched files wait or are
//! being split, at most `max_unacked_messages` messages are tracked, and buffers are bounded by
//! the batch limits, whatever the queue's depth.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::dispatch;
use super::engine::{Engine, Submitter};
use super::ledger::{Effects, Ledger, Pressure};
use super::{PipelineError, Tally};
use crate::ack::Hold;
use crate::config::Config;
use crate::fetch::S3Fetcher;
use crate::metrics::{self, *};
use crate::server;
use crate::sink::write::Written;
use crate::source::notification::{self, Notification};
use crate::source::sqs::{Received, Sqs};

/// What a service run did, for its last log line.
#[derive(Debug)]
pub struct ServiceReport {
    pub tally: Tally,
    pub written: Written,
    pub clean: bool,
}

struct Shared {
    sqs: Arc<Sqs>,
    fetcher: S3Fetcher,
}

/// Runs until `shutdown` resolves, then stops receiving, flushes every buffer, deletes what is
/// committed and returns, within the configured grace period. Receiving also pauses while the
/// engine's buffered-bytes budget is reached (its workers seal the oldest buffers to make room).
pub async fn run(
    cfg: &Config,
    shutdown: impl Future<Output = ()>,
) -> Result<ServiceReport, PipelineError> {
    let sqs_cfg = cfg.sqs()?.clone();
    let engine = Engine::open(cfg, cfg.workers(), sqs_cfg.max_files_in_flight).await?;
    let budget = engine.budget();
    let pressure: Pressure = Arc::new(move || budget.over());
    let store = engine.store();

    let shared = Arc::new(Shared {
        sqs: Arc::new(Sqs::new(&sqs_cfg).await),
        fetcher: S3Fetcher::new(&cfg.source.buckets).await,
    });
    let effects = Effects {
        sqs: Some(shared.sqs.clone()),
        store: None,
    };
    let (ledger, driver) = Ledger::start(effects, sqs_cfg.max_unacked_messages, pressure);
    // Messages settle only once their buffers are written: at `max_unacked_messages` the
    // oldest buffers are sealed early, so receiving goes on without waiting for `max_age`.
    let ledger = ledger.seal_early_when_full(engine.budget());
    let listener = tokio::net::TcpListener::bind(&cfg.server.listen)
        .await
        .map_err(|e| PipelineError::Worker(format!("listening on {}: {e}", cfg.server.listen)))?;
    tracing::info!(listen = %cfg.server.listen, "serving /metrics, /healthz, /readyz");
    let workers = engine.workers();
    let checks = vec![
        server::check(
            "queue",
            shared.clone(),
            |s| async move { s.sqs.check().await },
        ),
        server::check("output", store.clone(), |s| async move {
            s.check().await.map_err(|e| e.to_string())
        }),
        server::check("workers", workers.clone(), |w| async move { w.check() }),
    ];
    let server = tokio::spawn(server::serve(listener, Arc::new(checks)));

    let files = engine.submitter();

    let mut messages = JoinSet::new();
    // Messages parsed and fetched at once; each slot is free once its files are handed on.
    let slots = Arc::new(Semaphore::new(
        sqs_cfg
            .max_files_in_flight
            .max(sqs_cfg.max_messages as usize),
    ));

    tokio::pin!(shutdown);
    let mut ledger_lost = false;
    loop {
        if driver.stopped() {
            // Receiving on would write every message and delete none, again and again: stop,
            // so the process exits with an error and is restarted.
            ledger_lost = true;
            break;
        }
        if workers.all_lost() {
            // Nothing received could be split: leave the queue to the other pods. `/readyz`
            // and `/healthz` fail, so Kubernetes stops routing here and restarts the pod.
            metrics::emit(ReceivingStopped {
                reason: "every worker thread is lost",
            });
            (&mut shutdown).await;
            break;
        }
        // Receive only when the ledger has room, so memory never follows the queue's depth.
        let mut rooms = tokio::select! {
            _ = &mut shutdown => break,
            r = ledger.reserve(sqs_cfg.max_messages as usize) => r,
        };
        if rooms.is_empty() {
            break;
        }
        let received_at = Instant::now();
        let received = tokio::select! {
            _ = &mut shutdown => break,
            r = shared.sqs.receive(rooms.len() as i32) => r,
        };
        match received {
            Ok(batch) => {
                // In the ledger at once: heartbeated while they wait for a slot below.
                let mut held = Vec::with_capacity(batch.len());
                for msg in batch {
                    let Some(room) = rooms.pop() else {
                        break;
                    };
                    let (hold, settled) = Hold::new();
                    ledger.track(&msg, received_at, settled, room);
                    held.push((msg, hold));
                }
                for (msg, hold) in held {
                    // A message left without a slot drops its hold: it is handed back.
                    let Ok(slot) = slots.clone().acquire_owned().await else {
                        break;
                    };
                    let task = handle_message(shared.clone(), msg, hold, files.clone());
                    messages.spawn(async move {
                        task.await;
                        drop(slot);
                    });
                }
            }
            Err(e) => {
                metrics::emit(SqsCallFailed {
                    operation: "receive_message",
                    error: &e,
                });
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
        while messages.try_join_next().is_some() {}
    }

    // Shutdown: stop receiving (done), let in-flight messages hand on their files, then close
    // the workers' input so they seal every buffer; the uploader writes them, holds settle,
    // and the ledger deletes what is committed. All within the grace period.
    tracing::info!("shutting down: flushing buffers");
    let grace = Duration::from_secs(cfg.server.shutdown_grace_secs);
    let stopping = Instant::now();
    drop(files);
    let driver_abort = driver.abort_handle();
    let uploader_abort = engine.uploader_abort();
    let drained = tokio::time::timeout(grace, async {
        while messages.join_next().await.is_some() {}
        drop(ledger);
        let finished = engine.finish().await;
        // Every hold has settled: the ledger deletes what is written and stops.
        driver.finish().await;
        finished
    })
    .await;
    driver_abort.abort();
    server.abort();
    if ledger_lost {
        return Err(PipelineError::Worker(
            "the acknowledgement ledger stopped unexpectedly".into(),
        ));
    }
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
                "grace period over: unfinished messages stay on the queue and will be redelivered"
            );
            // Uploads cut off mid-way are aborted, so their parts do not stay in the bucket.
            uploader_abort.abort();
            crate::sink::write::settle_abandoned(Duration::from_secs(5)).await;
            Ok(ServiceReport {
                tally: Tally::default(),
                written: Written::default(),
                clean: false,
            })
        }
    }
}

/// Parses a tracked message and hands its files on under `hold`, which settles it.
async fn handle_message(shared: Arc<Shared>, msg: Received, hold: Hold, files: Submitter) {
    let id = msg.message_id.clone();
    let objects = match notification::parse(&msg.body) {
        Err(e) => {
            // Left undeleted: it comes back after its visibility timeout and, after the queue's
            // maxReceiveCount, lands in the DLQ. Never retried in a hot loop.
            metrics::emit(MessageRefused {
                message_id: &id,
                reason: e.reason(),
                detail: &e.to_string(),
            });
            hold.refuse();
            return;
        }
        Ok(Notification::Ignorable { shape, reason }) => {
            metrics::emit(NotificationReceived {
                shape: shape.as_str(),
                result: reason,
            });
            // Nothing to write: acknowledged at once (in the ledger's next delete batch).
            hold.commit();
            return;
        }
        Ok(Notification::Objects { shape, objects }) => {
            if let Some(bad) = shared.fetcher.allowlist().first_refused(&objects) {
                metrics::emit(MessageRefused {
                    message_id: &id,
                    reason: "bucket_not_allowed",
                    detail: &format!(
                        "s3://{}/{} is outside the allowed buckets and prefixes",
                        bad.bucket, bad.key
                    ),
                });
                hold.refuse();
                return;
            }
            metrics::emit(NotificationReceived {
                shape: shape.as_str(),
                result: "files",
            });
            objects
        }
    };

    // A failure has failed the hold (and said why); the ledger hands the message back.
    let _ = dispatch::fetch_and_submit(&shared.fetcher, &files, &id, &objects, hold).await;
}
