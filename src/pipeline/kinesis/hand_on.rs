//! Records into the engine: each record classified (CloudWatch Logs batch, plain event, file
//! notification, or unrecognised) and submitted under the batch's hold.

use std::collections::HashMap;

use bytes::Bytes;

use super::Ctx;
use crate::ack::Hold;
use crate::metrics::{self, *};
use crate::pipeline::engine::{Input, Submitter};
use crate::source::kinesis::{self, Shape};
use crate::source::notification::{Notification, is_digest_key};

/// Hands a batch of records to the engine under one hold, as a unit of the ledger (first
/// waiting, like every source, while the buffer budget is reached); returns its outcome, or
/// None when the engine is gone. Classification (the gunzip and parse of CloudWatch Logs
/// batches) runs on the blocking pool, off the runtime that renews leases.
pub(super) async fn hand_on(
    ctx: &Ctx,
    shard: &str,
    records: Vec<kinesis::Record>,
    files: &Submitter,
) -> Option<crate::ack::Settled> {
    let room = ctx.ledger.reserve_one().await?;
    let (hold, settled) = Hold::new();
    let stream = &ctx.kinesis.stream;
    let mut counts: HashMap<&'static str, u64> = HashMap::new();
    let classified = tokio::task::spawn_blocking(move || {
        records
            .into_iter()
            .map(|r| {
                let shape = kinesis::classify(&r.data);
                let data = match shape {
                    Shape::Unrecognized { .. } => kinesis::describe_data(&r.data),
                    _ => String::new(),
                };
                (r.seq, shape, data)
            })
            .collect::<Vec<_>>()
    })
    .await;
    let Ok(classified) = classified else {
        // A panic while classifying: the batch fails and is read again.
        hold.fail();
        return None;
    };
    for (seq, shape, data) in classified {
        let source = format!("kinesis://{stream}/{shard}/{seq}");
        let mut docs: Vec<Vec<u8>> = Vec::new();
        match shape {
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
                    data,
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
