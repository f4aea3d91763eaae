//! Output upload metrics, registered in the one registry the first time one is used.

use std::sync::LazyLock;

use prometheus::IntCounter;

use super::{InternalEvent, METRICS, counter};

static ABORT_FAILURES: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        METRICS.registry(),
        "trailhose_output_multipart_abort_failures_total",
        "Failed multipart uploads that could not be aborted either: their parts stay in the bucket (and are billed) until a lifecycle rule removes them.",
    )
});

/// Registers the counters (at 0) if nothing has failed yet.
pub(super) fn register() {
    LazyLock::force(&ABORT_FAILURES);
    LazyLock::force(&ABANDONED);
}

/// A multipart upload failed and aborting it failed too: its uploaded parts stay in the bucket
/// until an `AbortIncompleteMultipartUpload` lifecycle rule removes them. The batch itself is
/// retried (or left unacknowledged) as any failed write is.
pub struct MultipartAbortFailed<'a> {
    pub bucket: &'a str,
    pub key: &'a str,
    pub upload_id: &'a str,
    pub error: &'a str,
}

impl InternalEvent for MultipartAbortFailed<'_> {
    fn emit(self) {
        tracing::warn!(
            bucket = self.bucket,
            key = self.key,
            upload_id = self.upload_id,
            "cannot abort the failed multipart upload: {}; its parts stay until a lifecycle rule (AbortIncompleteMultipartUpload) removes them",
            self.error
        );
        ABORT_FAILURES.inc();
    }
}

static ABANDONED: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        METRICS.registry(),
        "trailhose_output_multipart_abandoned_total",
        "Multipart uploads dropped before they completed (the end of the shutdown grace period, or a panic); each is aborted in the background (a failed or unanswered abort also counts in trailhose_output_multipart_abort_failures_total).",
    )
});

/// A multipart upload was dropped before it completed (the shutdown grace period ended, or its
/// task panicked): its batch comes again (unacknowledged), and the upload is aborted in the
/// background.
pub struct MultipartAbandoned<'a> {
    pub bucket: &'a str,
    pub key: &'a str,
    pub upload_id: &'a str,
}

impl InternalEvent for MultipartAbandoned<'_> {
    fn emit(self) {
        tracing::warn!(
            bucket = self.bucket,
            key = self.key,
            upload_id = self.upload_id,
            "multipart upload dropped before it completed (shutdown grace period over, or a panic): asking S3 to abort it"
        );
        ABANDONED.inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_abort_is_counted_and_exposed() {
        let before = ABORT_FAILURES.get();
        super::super::emit(MultipartAbortFailed {
            bucket: "b",
            key: "k",
            upload_id: "u",
            error: "AccessDenied (HTTP 403): denied",
        });
        assert_eq!(ABORT_FAILURES.get(), before + 1);
        let text = METRICS.render();
        assert!(
            text.contains("trailhose_output_multipart_abort_failures_total "),
            "{text}"
        );
    }
}
