//! `trailhose run`: workers share CloudTrail notifications from one SQS queue, fetch the files
//! from allowed buckets, and acknowledge (delete) a message only when every record of every
//! file it names is durably written.
//!
//! Tasks and threads:
//! * the receive loop long-polls SQS while there is room for more messages;
//! * one task per message parses it, keeps it invisible (heartbeat), fetches its files and hands
//!   them to the workers, then waits for its `Hold` to settle and deletes or abandons it;
//! * worker threads split, enrich and buffer files (`FileWorker`), sealing buffers by size and
//!   age; the uploader writes sealed batches and commits their holds.
//!
//! Memory is bounded by configuration: at most `max_files_in_flight` fetched files wait or are
//! being split, and buffers are bounded by the batch limits, whatever the queue's depth.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;

use super::engine::{Engine, Input, Submitter};
use super::{PipelineError, Tally};
use crate::ack::Hold;
use crate::config::Config;
use crate::fetch::S3Fetcher;
use crate::metrics::{self, *};
use crate::server::{self, Check};
use crate::sink::write::Written;
use crate::source::notification::{self, Notification, is_digest_key};
use crate::source::sqs::{Received, Sqs};

/// What a service run did, for its last log line.
#[derive(Debug)]
pub struct ServiceReport {
    pub tally: Tally,
    pub written: Written,
    pub clean: bool,
}

struct Shared {
    sqs: Sqs,
    fetcher: S3Fetcher,
}

/// Runs until `shutdown` resolves, then stops receiving, flushes every buffer, deletes what is
/// committed and returns, within the configured grace period.
pub async fn run(
    cfg: &Config,
    shutdown: impl Future<Output = ()>,
) -> Result<ServiceReport, PipelineError> {
    let sqs_cfg = cfg.sqs()?.clone();
    let engine = Engine::open(cfg, cfg.workers(), sqs_cfg.max_files_in_flight).await?;
    let store = engine.store();

    let shared = Arc::new(Shared {
        sqs: Sqs::new(&sqs_cfg).await,
        fetcher: S3Fetcher::new(&cfg.source.buckets).await,
    });

    let listener = tokio::net::TcpListener::bind(&cfg.server.listen)
        .await
        .map_err(|e| PipelineError::Worker(format!("listening on {}: {e}", cfg.server.listen)))?;
    tracing::info!(listen = %cfg.server.listen, "serving /metrics, /healthz, /readyz");
    let checks: Vec<(&'static str, Check)> = vec![
        ("queue", {
            let shared = shared.clone();
            Box::new(move || {
                let shared = shared.clone();
                Box::pin(async move { shared.sqs.check().await })
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

    // Every message task holds a clone of `dispatching` until it has handed on all its files.
    let (dispatching, mut dispatched) = mpsc::channel::<()>(1);
    let mut messages = JoinSet::new();
    let max_in_flight = sqs_cfg
        .max_files_in_flight
        .max(sqs_cfg.max_messages as usize);
    let message_slots = Arc::new(Semaphore::new(max_in_flight));

    tokio::pin!(shutdown);
    loop {
        // Receive only when there is room, so memory never follows the queue's depth.
        let room = tokio::select! {
            _ = &mut shutdown => break,
            p = message_slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
        };
        let want = (message_slots.available_permits() + 1).min(10) as i32;
        let received = tokio::select! {
            _ = &mut shutdown => break,
            r = shared.sqs.receive(want) => r,
        };
        drop(room);
        match received {
            Ok(batch) => {
                for msg in batch {
                    let Ok(slot) = message_slots.clone().acquire_owned().await else {
                        break;
                    };
                    let task =
                        handle_message(shared.clone(), msg, files.clone(), dispatching.clone());
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
    // and message tasks delete what is committed. All within the grace period.
    tracing::info!("shutting down: flushing buffers");
    let grace = Duration::from_secs(cfg.server.shutdown_grace_secs);
    let stopping = Instant::now();
    drop(dispatching);
    drop(files);
    let drained = tokio::time::timeout(grace, async {
        while dispatched.recv().await.is_some() {}
        let finished = engine.finish().await;
        while messages.join_next().await.is_some() {}
        finished
    })
    .await;
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
                "grace period over: unfinished messages stay on the queue and will be redelivered"
            );
            Ok(ServiceReport {
                tally: Tally::default(),
                written: Written::default(),
                clean: false,
            })
        }
    }
}

async fn handle_message(
    shared: Arc<Shared>,
    msg: Received,
    files: Submitter,
    dispatching: mpsc::Sender<()>,
) {
    metrics::emit(MessagesInFlight(1));
    let id = msg.message_id.as_str();
    let objects = match notification::parse(&msg.body) {
        Err(e) => {
            // Left undeleted: it comes back after its visibility timeout and, after the queue's
            // maxReceiveCount, lands in the DLQ. Never retried in a hot loop.
            metrics::emit(MessageRefused {
                message_id: id,
                reason: e.reason(),
                detail: &e.to_string(),
            });
            metrics::emit(MessagesInFlight(-1));
            return;
        }
        Ok(Notification::Ignorable { shape, reason }) => {
            metrics::emit(NotificationReceived {
                shape: shape.as_str(),
                result: reason,
            });
            delete(&shared, &msg).await;
            metrics::emit(MessagesInFlight(-1));
            return;
        }
        Ok(Notification::Objects { shape, objects }) => {
            if let Some(bad) = shared.fetcher.allowlist().first_refused(&objects) {
                metrics::emit(MessageRefused {
                    message_id: id,
                    reason: "bucket_not_allowed",
                    detail: &format!(
                        "s3://{}/{} is outside the allowed buckets and prefixes",
                        bad.bucket, bad.key
                    ),
                });
                metrics::emit(MessagesInFlight(-1));
                return;
            }
            metrics::emit(NotificationReceived {
                shape: shape.as_str(),
                result: "files",
            });
            objects
        }
    };

    let (hold, settled) = Hold::new();
    let heartbeat = tokio::spawn(heartbeat(shared.clone(), msg.receipt.clone()));
    for obj in objects.iter().filter(|o| !is_digest_key(&o.key)) {
        let Some(permit) = files.permit().await else {
            break;
        };
        match shared.fetcher.get(obj).await {
            Ok(bytes) => {
                let source = format!("s3://{}/{}", obj.bucket, obj.key);
                if !files.submit_with(source, Input::Stream(bytes), Some(hold.share()), permit) {
                    break;
                }
            }
            Err(e) => {
                metrics::emit(FetchFailed {
                    message_id: id,
                    error: &e,
                });
                hold.share().fail();
                break;
            }
        }
    }
    drop(files);
    drop(dispatching);
    hold.commit();

    let ok = settled.await.unwrap_or(false);
    heartbeat.abort();
    if ok {
        delete(&shared, &msg).await;
    } else {
        metrics::emit(MessageAbandoned { message_id: id });
        // Come back soon rather than after the full timeout, but not in a hot loop.
        let retry_in = shared.sqs.visibility_timeout_secs.min(30);
        if let Err(e) = shared.sqs.set_visibility(&msg.receipt, retry_in).await {
            metrics::emit(SqsCallFailed {
                operation: "change_message_visibility",
                error: &e,
            });
        }
    }
    metrics::emit(MessagesInFlight(-1));
}

async fn delete(shared: &Shared, msg: &Received) {
    match shared.sqs.delete(&msg.receipt).await {
        Ok(()) => metrics::emit(MessageDeleted),
        Err(e) => metrics::emit(SqsCallFailed {
            operation: "delete_message",
            error: &e,
        }),
    }
}

/// Keeps a message invisible while it is worked on: extends its visibility timeout at a third
/// of the timeout, until aborted.
async fn heartbeat(shared: Arc<Shared>, receipt: String) {
    let vis = shared.sqs.visibility_timeout_secs;
    let period = Duration::from_secs((vis as u64 / 3).max(1));
    loop {
        tokio::time::sleep(period).await;
        match shared.sqs.set_visibility(&receipt, vis).await {
            Ok(()) => metrics::emit(VisibilityExtended),
            Err(e) => metrics::emit(SqsCallFailed {
                operation: "change_message_visibility",
                error: &e,
            }),
        }
    }
}
