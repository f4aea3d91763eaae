//! The SQS queue that announces delivery files: receive (long polling), delete, extend.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_sdk_sqs::error::ProvideErrorMetadata;
use aws_sdk_sqs::types::MessageSystemAttributeName;

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

pub struct Sqs {
    client: aws_sdk_sqs::Client,
    queue_url: String,
    wait_time_secs: i32,
    max_messages: i32,
    pub visibility_timeout_secs: i32,
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
        }
    }

    /// Up to `max` messages (at most the configured batch), waiting up to the long-poll time.
    pub async fn receive(&self, max: i32) -> Result<Vec<Received>, String> {
        let out = self
            .client
            .receive_message()
            .queue_url(&self.queue_url)
            .wait_time_seconds(self.wait_time_secs)
            .max_number_of_messages(max.clamp(1, self.max_messages))
            .visibility_timeout(self.visibility_timeout_secs)
            .message_system_attribute_names(MessageSystemAttributeName::SentTimestamp)
            .send()
            .await
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

    pub async fn delete(&self, receipt: &str) -> Result<(), String> {
        self.client
            .delete_message()
            .queue_url(&self.queue_url)
            .receipt_handle(receipt)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| describe(&e))
    }

    pub async fn set_visibility(&self, receipt: &str, secs: i32) -> Result<(), String> {
        self.client
            .change_message_visibility()
            .queue_url(&self.queue_url)
            .receipt_handle(receipt)
            .visibility_timeout(secs)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| describe(&e))
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
