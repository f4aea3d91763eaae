//! The SQS queue that announces delivery files: receive (long polling), and deletes and
//! visibility changes in batches of up to ten, with an outcome per entry.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_sdk_sqs::error::ProvideErrorMetadata;
use aws_sdk_sqs::types::{
    BatchResultErrorEntry, ChangeMessageVisibilityBatchRequestEntry,
    DeleteMessageBatchRequestEntry, MessageSystemAttributeName,
};

use crate::config::SqsConfig;
use crate::metrics::{self, MessageReceived};

/// One received message. The receipt handle is a credential for this message only; it is
/// never logged.
#[derive(Debug)]
pub struct Received {
    pub message_id: String,
    pub receipt: String,
    pub body: String,
}

/// SQS takes at most ten entries per batch call.
pub const BATCH: usize = 10;

/// What became of one entry of a batch call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryOutcome {
    Done,
    /// The receipt handle is no longer valid (the message was received again elsewhere, or it
    /// was deleted): nothing more can be done with it.
    Gone(String),
    /// Worth retrying (throttling, a server error, the whole call failed).
    Failed(String),
}

fn entry_outcome(e: &BatchResultErrorEntry) -> EntryOutcome {
    let detail = format!("{}: {}", e.code(), e.message().unwrap_or_default());
    if receipt_gone(e.code()) {
        EntryOutcome::Gone(detail)
    } else {
        EntryOutcome::Failed(detail)
    }
}

/// Error codes that mean the receipt handle cannot be used again.
fn receipt_gone(code: &str) -> bool {
    matches!(
        code,
        "ReceiptHandleIsInvalid"
            | "AWS.SimpleQueueService.ReceiptHandleIsInvalid"
            | "InvalidReceiptHandle"
            | "MessageNotInflight"
            | "AWS.SimpleQueueService.MessageNotInflight"
    )
}

/// Pairs each entry (by its index as batch id) with its outcome.
fn outcomes(
    n: usize,
    failed: &[BatchResultErrorEntry],
    call: Result<(), String>,
) -> Vec<EntryOutcome> {
    if let Err(e) = call {
        return vec![EntryOutcome::Failed(e); n];
    }
    let mut out = vec![EntryOutcome::Done; n];
    for f in failed {
        if let Some(slot) = f.id().parse::<usize>().ok().and_then(|i| out.get_mut(i)) {
            *slot = entry_outcome(f);
        }
    }
    out
}

/// How long one call may go unanswered before it counts as failed (a receive: this beyond its
/// long poll). The ledger's driver waits for its calls, and the SDK sets no read
/// timeout: a request sent into a half-open connection waits for TCP to give up, many minutes,
/// and would stop every heartbeat and delete meanwhile. Both batch calls are idempotent.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Sqs {
    client: aws_sdk_sqs::Client,
    queue_url: String,
    wait_time_secs: i32,
    max_messages: i32,
    pub visibility_timeout_secs: i32,
    call_timeout: Duration,
}

/// The error of a call that got no answer in time.
fn timed_out(limit: Duration) -> String {
    format!("no answer within {} ms", limit.as_millis())
}

fn describe<E: ProvideErrorMetadata + std::error::Error + 'static>(
    e: &aws_sdk_sqs::error::SdkError<E>,
) -> String {
    match (e.code(), e.message()) {
        (Some(c), Some(m)) => format!("{c}: {m}"),
        (Some(c), None) => c.to_owned(),
        _ => {
            let full = aws_sdk_sqs::error::DisplayErrorContext(e).to_string();
            full.chars().take(300).collect()
        }
    }
}

impl Sqs {
    pub async fn new(cfg: &SqsConfig) -> Sqs {
        let shared = crate::aws::config(cfg.region.as_deref(), cfg.endpoint_url.as_deref()).await;
        Sqs {
            client: aws_sdk_sqs::Client::new(&shared),
            queue_url: cfg.queue_url.clone(),
            wait_time_secs: cfg.wait_time_secs,
            max_messages: cfg.max_messages,
            visibility_timeout_secs: cfg.visibility_timeout_secs,
            call_timeout: CALL_TIMEOUT,
        }
    }

    /// Up to `max` messages (at most the configured batch), waiting up to the long-poll time.
    pub async fn receive(&self, max: i32) -> Result<Vec<Received>, String> {
        let limit = Duration::from_secs(self.wait_time_secs.max(0) as u64) + self.call_timeout;
        let out = tokio::time::timeout(
            limit,
            self.client
                .receive_message()
                .queue_url(&self.queue_url)
                .wait_time_seconds(self.wait_time_secs)
                .max_number_of_messages(max.clamp(1, self.max_messages))
                .visibility_timeout(self.visibility_timeout_secs)
                .message_system_attribute_names(MessageSystemAttributeName::SentTimestamp)
                .send(),
        )
        .await
        .map_err(|_| timed_out(limit))?
        .map_err(|e| describe(&e))?;
        let now = SystemTime::now();
        Ok(out
            .messages
            .unwrap_or_default()
            .into_iter()
            .filter_map(|m| {
                if let Some(age) = queue_age(m.attributes.as_ref(), now) {
                    metrics::emit(MessageReceived { age });
                }
                Some(Received {
                    message_id: m.message_id.unwrap_or_default(),
                    receipt: m.receipt_handle?,
                    body: m.body.unwrap_or_default(),
                })
            })
            .collect())
    }

    /// Deletes up to `BATCH` messages in one call; one outcome per receipt, in order.
    pub async fn delete_batch(&self, receipts: &[&str]) -> Vec<EntryOutcome> {
        let entries: Vec<DeleteMessageBatchRequestEntry> = receipts
            .iter()
            .take(BATCH)
            .enumerate()
            .filter_map(|(i, r)| {
                DeleteMessageBatchRequestEntry::builder()
                    .id(i.to_string())
                    .receipt_handle(*r)
                    .build()
                    .ok()
            })
            .collect();
        let n = entries.len();
        let call = self
            .client
            .delete_message_batch()
            .queue_url(&self.queue_url)
            .set_entries(Some(entries))
            .send();
        match tokio::time::timeout(self.call_timeout, call).await {
            Ok(Ok(r)) => outcomes(n, r.failed(), Ok(())),
            Ok(Err(e)) => outcomes(n, &[], Err(describe(&e))),
            Err(_) => outcomes(n, &[], Err(timed_out(self.call_timeout))),
        }
    }

    /// Sets the visibility timeout of up to `BATCH` messages in one call; one outcome per
    /// entry, in order.
    pub async fn set_visibility_batch(&self, entries: &[(&str, i32)]) -> Vec<EntryOutcome> {
        let entries: Vec<ChangeMessageVisibilityBatchRequestEntry> = entries
            .iter()
            .take(BATCH)
            .enumerate()
            .filter_map(|(i, (r, secs))| {
                ChangeMessageVisibilityBatchRequestEntry::builder()
                    .id(i.to_string())
                    .receipt_handle(*r)
                    .visibility_timeout(*secs)
                    .build()
                    .ok()
            })
            .collect();
        let n = entries.len();
        let call = self
            .client
            .change_message_visibility_batch()
            .queue_url(&self.queue_url)
            .set_entries(Some(entries))
            .send();
        match tokio::time::timeout(self.call_timeout, call).await {
            Ok(Ok(r)) => outcomes(n, r.failed(), Ok(())),
            Ok(Err(e)) => outcomes(n, &[], Err(describe(&e))),
            Err(_) => outcomes(n, &[], Err(timed_out(self.call_timeout))),
        }
    }

    /// Readiness: the queue exists and these credentials can see it.
    pub async fn check(&self) -> Result<(), String> {
        self.client
            .get_queue_attributes()
            .queue_url(&self.queue_url)
            .attribute_names(aws_sdk_sqs::types::QueueAttributeName::ApproximateNumberOfMessages)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| describe(&e))
    }
}

#[cfg(test)]
impl Sqs {
    /// A client of a test endpoint (fixed credentials, queue `q`), with its own call deadline.
    pub(crate) fn for_test(endpoint: &str, call_timeout: Duration) -> Sqs {
        use aws_sdk_sqs::config::{BehaviorVersion, Credentials, Region};
        let conf = aws_sdk_sqs::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .credentials_provider(Credentials::new("AKIDTEST", "secret", None, None, "test"))
            .endpoint_url(endpoint)
            .build();
        Sqs {
            client: aws_sdk_sqs::Client::from_conf(conf),
            queue_url: format!("{endpoint}/123456789012/q"),
            wait_time_secs: 0,
            max_messages: 10,
            visibility_timeout_secs: 30,
            call_timeout,
        }
    }
}

/// How long a message waited in the queue, from its SentTimestamp (epoch milliseconds); a clock
/// behind SQS's counts as no wait.
fn queue_age(
    attributes: Option<&std::collections::HashMap<MessageSystemAttributeName, String>>,
    now: SystemTime,
) -> Option<Duration> {
    let ms: u64 = attributes?
        .get(&MessageSystemAttributeName::SentTimestamp)?
        .parse()
        .ok()?;
    let sent = UNIX_EPOCH.checked_add(Duration::from_millis(ms))?;
    Some(now.duration_since(sent).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A queue endpoint that accepts connections and never answers (a half-open connection):
    /// every call must come back failed, so the ledger's driver goes on heartbeating.
    #[tokio::test]
    async fn calls_that_get_no_answer_fail_instead_of_hanging() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        std::thread::spawn(move || {
            let mut open = Vec::new();
            for conn in listener.incoming() {
                open.push(conn);
            }
        });
        let sqs = Sqs::for_test(&format!("http://{addr}"), Duration::from_millis(300));
        // Generous: only a call that never returns fails this.
        let deleted =
            tokio::time::timeout(Duration::from_secs(120), sqs.delete_batch(&["r1", "r2"]))
                .await
                .expect("delete_batch returns");
        assert!(matches!(
            deleted[..],
            [EntryOutcome::Failed(_), EntryOutcome::Failed(_)]
        ));
        let extended = tokio::time::timeout(
            Duration::from_secs(120),
            sqs.set_visibility_batch(&[("r1", 30)]),
        )
        .await
        .expect("set_visibility_batch returns");
        assert!(matches!(extended[..], [EntryOutcome::Failed(_)]));
        let received = tokio::time::timeout(Duration::from_secs(120), sqs.receive(1))
            .await
            .expect("receive returns");
        assert!(received.is_err());
    }

    #[test]
    fn batch_failures_map_to_their_entries() {
        let fail = |id: &str, code: &str| {
            BatchResultErrorEntry::builder()
                .id(id)
                .code(code)
                .sender_fault(true)
                .build()
                .unwrap()
        };
        let got = outcomes(
            4,
            &[
                fail("1", "ReceiptHandleIsInvalid"),
                fail("3", "InternalError"),
                fail("9", "InternalError"),
            ],
            Ok(()),
        );
        assert_eq!(got[0], EntryOutcome::Done);
        assert!(matches!(got[1], EntryOutcome::Gone(_)));
        assert_eq!(got[2], EntryOutcome::Done);
        assert!(matches!(got[3], EntryOutcome::Failed(_)));
        let all = outcomes(2, &[], Err("throttled".into()));
        assert_eq!(all, vec![EntryOutcome::Failed("throttled".into()); 2]);
    }

    #[test]
    fn queue_age_from_sent_timestamp() {
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_100);
        let attrs = |v: &str| {
            std::collections::HashMap::from([(
                MessageSystemAttributeName::SentTimestamp,
                v.to_owned(),
            )])
        };
        assert_eq!(
            queue_age(Some(&attrs("1700000040500")), now),
            Some(Duration::from_millis(59_500))
        );
        assert_eq!(
            queue_age(Some(&attrs("1700000200000")), now),
            Some(Duration::ZERO)
        );
        assert_eq!(queue_age(Some(&attrs("soon")), now), None);
        assert_eq!(queue_age(None, now), None);
    }
}
