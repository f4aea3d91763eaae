//! Records into the engine: a batch classified (CloudWatch Logs batches, plain events, file
//! notifications, unrecognised records) and its events submitted as jobs, all under the
//! batch's hold.

use bytes::Bytes;
use tokio::sync::OwnedSemaphorePermit as Permit;

use super::Ctx;
use crate::ack::Hold;
use crate::metrics::{self, *};
use crate::pipeline::engine::{Input, Submitter};
use crate::source::kinesis;
use crate::source::notification::{Notification, is_digest_key};

/// Hands a batch of records to the engine under one hold, as a unit of the ledger (first
/// waiting, like every source, while the buffer budget is reached); returns its outcome, or
/// None when the engine is gone. Classification (the gunzip and the one read of each CloudWatch
/// Logs batch) runs on the blocking pool, off the runtime that renews leases, and hands its
/// events on as it goes, in jobs of about `JOB_MESSAGE_BYTES` of messages, each under one
/// worker-queue permit (taken before the job is decoded) and a share of the hold: the batch is checkpointed only once every job
/// of it is durable, and what is decoded ahead of the workers stays bounded.
pub(super) async fn hand_on(
    ctx: &Ctx,
    shard: &str,
    records: Vec<kinesis::Record>,
    files: &Submitter,
) -> Option<crate::ack::Settled> {
    let room = ctx.ledger.reserve_one().await?;
    let (hold, settled) = Hold::new();
    let (stream, owned_shard) = (ctx.kinesis.stream.clone(), shard.to_owned());
    let span = match (records.first(), records.last()) {
        (Some(a), Some(b)) => format!("kinesis://{stream}/{shard}/{}..{}", a.seq, b.seq),
        _ => format!("kinesis://{stream}/{shard}"),
    };
    // The classifier takes each job's permit itself before decoding its first record, and
    // hands the job on with it: what waits here is already under a permit. It stops when this
    // side is gone (a lost lease aborts the reader), its channel then closed.
    let (jobs_tx, mut jobs_rx) = tokio::sync::mpsc::channel::<(kinesis::Batch, Permit)>(1);
    let (runtime, engine) = (tokio::runtime::Handle::current(), files.clone());
    let classified = tokio::task::spawn_blocking(move || {
        let permit_for_job = |_: &kinesis::Classifier| {
            runtime.block_on(async {
                tokio::select! {
                    p = engine.permit() => p,
                    () = jobs_tx.closed() => None,
                }
            })
        };
        kinesis::classify_jobs(
            &stream,
            &owned_shard,
            records,
            kinesis::JOB_MESSAGE_BYTES,
            permit_for_job,
            |job, permit| jobs_tx.blocking_send((job, permit)).is_ok(),
        )
    });
    while let Some((job, permit)) = jobs_rx.recv().await {
        let input = Input::Records(Box::new(job));
        if !files.submit_with(span.clone(), input, Some(hold.share()), permit) {
            // The classifier stops at its next job (its channel is closed).
            drop(jobs_rx);
            let _ = classified.await;
            hold.fail();
            return None;
        }
    }
    let Ok(classified) = classified.await else {
        // A panic while classifying: the batch fails and is read again.
        hold.fail();
        return None;
    };
    let kinesis::Classified {
        notifications,
        counts,
        stopped,
        ..
    } = classified;
    if stopped {
        // No room: the engine is closing. The batch is read again.
        hold.fail();
        return None;
    }
    for (source, n) in notifications {
        if !notification(ctx, &source, n, &hold, files).await {
            hold.fail();
            return None;
        }
    }
    for (shape, count) in counts {
        metrics::emit(KinesisRecords { shape, count });
    }
    hold.commit();
    Some(ctx.ledger.track_batch(settled, room))
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
            // Gone for good (deleted, or outside the allowlist): the record goes to the error
            // output rather than stall the shard. A forbidden file is not gone (an expired
            // credential, a key policy): it rewinds the shard like any other failure.
            Err(e) if crate::pipeline::dispatch::is_permanent(&e) => {
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
