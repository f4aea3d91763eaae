//! The one routine that turns a unit's notified files into work: fetch each from its allowed
//! bucket and hand it to the workers under a share of the unit's hold. SQS messages and
//! backfill files use it; the Kinesis reader's notifications can (same policy).
//!
//! Policy for a notified file that cannot be read:
//! * gone (404 `NoSuchKey`), or outside the allowed buckets: the data no longer exists or must
//!   not be read, so no retry can help. The file goes to the error output (`stage = "fetch"`,
//!   `reason = "object_unreadable"`, named so it can be replayed), a metric counts it, and the
//!   unit goes on and is acknowledged;
//! * any other failure, after the fetcher's own retries: the unit fails and is delivered again
//!   (after the queue's `maxReceiveCount`, to its DLQ). That includes every 403 and other 4xx:
//!   the file exists, and what refuses it (an expired credential, a role, bucket or KMS key
//!   policy, a skewed clock, a wrong region, an archived object) is fixed outside; acknowledging
//!   it would turn a fixable outage into a stream of error records and lose the events.
//!
//! The hold is taken by value and settled here on every path: committed only when every file
//! was handed on, failed on any early exit (a failed fetch, the engine closing), so that no
//! unit is acknowledged for files never fetched.

use super::engine::{Input, Submitter};
use crate::ack::Hold;
use crate::fetch::{FetchError, S3Fetcher};
use crate::metrics::{self, FetchFailed, NotifiedFileUnreadable};
use crate::source::notification::{ObjectRef, is_digest_key};

/// Why a unit's files were not all handed on (its hold has failed).
#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    #[error(transparent)]
    Fetch(#[from] FetchError),
    #[error("the workers stopped")]
    Stopped,
}

/// What a dispatch handed on.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Dispatched {
    pub files: usize,
    /// Files that went to the error output because they cannot be read (gone, forbidden).
    pub unreadable: usize,
}

/// Whether a fetch failure is for good (the file goes to the error output) or worth another
/// delivery of the unit.
pub fn is_permanent(e: &FetchError) -> bool {
    matches!(
        e,
        FetchError::NotAllowed { .. } | FetchError::S3 { gone: true, .. }
    )
}

/// Fetches and submits every object of `objects` but digest files, under shares of `hold`.
/// `unit` names the unit in logs (a message id, a file).
pub async fn fetch_and_submit(
    fetcher: &S3Fetcher,
    files: &Submitter,
    unit: &str,
    objects: &[ObjectRef],
    hold: Hold,
) -> Result<Dispatched, DispatchError> {
    let mut done = Dispatched::default();
    for obj in objects.iter().filter(|o| !is_digest_key(&o.key)) {
        // An early return drops `hold` uncommitted: the unit fails.
        let permit = files.permit().await.ok_or(DispatchError::Stopped)?;
        let source = format!("s3://{}/{}", obj.bucket, obj.key);
        let input = match fetcher.get(obj).await {
            Ok(body) => {
                done.files += 1;
                Input::Stream(body)
            }
            Err(e) if is_permanent(&e) => {
                metrics::emit(NotifiedFileUnreadable {
                    source: &source,
                    error: &e,
                });
                done.unreadable += 1;
                Input::Unreadable(e.to_string())
            }
            Err(e) => {
                metrics::emit(FetchFailed {
                    message_id: unit,
                    error: &e,
                });
                return Err(e.into());
            }
        };
        if !files.submit_with(source, input, Some(hold.share()), permit) {
            return Err(DispatchError::Stopped);
        }
    }
    hold.commit();
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_gone_and_refused_are_permanent_forbidden_and_others_are_delivered_again() {
        let s3 = |retryable, gone| FetchError::S3 {
            bucket: "b".into(),
            key: "k".into(),
            message: "x".into(),
            retryable,
            gone,
        };
        assert!(is_permanent(&s3(false, true)));
        assert!(!is_permanent(&s3(false, false)), "a 403 or other 4xx");
        assert!(!is_permanent(&s3(true, false)));
        assert!(is_permanent(&FetchError::NotAllowed {
            bucket: "b".into(),
            key: "k".into()
        }));
        use crate::fetch::is_gone;
        assert!(is_gone(Some(404), Some("NoSuchKey")));
        for (status, code) in [
            (Some(403), Some("AccessDenied")),
            (Some(403), Some("InvalidObjectState")),
            (Some(403), Some("RequestTimeTooSkewed")),
            (Some(400), Some("ExpiredToken")),
            (Some(400), Some("AuthorizationHeaderMalformed")),
            (Some(301), Some("PermanentRedirect")),
            (Some(404), Some("NoSuchBucket")),
            (None, None),
        ] {
            assert!(!is_gone(status, code), "{status:?} {code:?}");
        }
    }
}
