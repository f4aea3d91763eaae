//! Alert outputs: one task per `[[detect.alerts]]` entry delivers what the workers queue.
//! An alert is retried with backoff up to `max_attempts`; delivered, its share of the
//! notification's hold is committed; given up, the share fails, so the notification is handed
//! back and its alerts come again (at-least-once).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use tokio::sync::mpsc;

use super::config::{AlertConfig, AlertKind, s3_target};
use super::suppress::{Suppressor, Ticket};
use crate::ack::Hold;
use crate::metrics::{self, AlertDeliveryFailed, AlertsDelivered};

#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error("detect.alerts: webhook TLS setup: {0}")]
    Tls(String),
}

/// One alert, waiting for its output.
pub struct Pending {
    pub body: Vec<u8>,
    /// The event's partition (S3 alert objects are partitioned the same way).
    pub partition: String,
    /// Kinesis partition key: the rule and the eventID.
    pub partition_key: String,
    pub hold: Option<Hold>,
    pub ticket: Option<(Arc<Suppressor>, Ticket)>,
}

type Https = hyper_rustls::HttpsConnector<HttpConnector>;

enum Dest {
    Sqs(aws_sdk_sqs::Client),
    Sns(aws_sdk_sns::Client),
    Kinesis(aws_sdk_kinesis::Client),
    S3 {
        client: aws_sdk_s3::Client,
        bucket: String,
        prefix: String,
    },
    /// Boxed: the client is several times the size of the others (built once per output).
    Webhook(Box<Client<Https, Full<Bytes>>>),
}

pub struct Output {
    label: String,
    target: String,
    max_attempts: u32,
    client: Dest,
}

/// Alerts taken from the queue per delivery round (S3 writes them as one object per
/// partition).
const ROUND: usize = 500;
const WEBHOOK_TIMEOUT: Duration = Duration::from_secs(10);

impl Output {
    pub async fn open(cfg: &AlertConfig) -> Result<Output, OutputError> {
        let shared = crate::aws::config(cfg.region.as_deref(), cfg.endpoint_url.as_deref()).await;
        let client = match cfg.kind {
            AlertKind::Sqs => Dest::Sqs(aws_sdk_sqs::Client::new(&shared)),
            AlertKind::Sns => Dest::Sns(aws_sdk_sns::Client::new(&shared)),
            AlertKind::Kinesis => Dest::Kinesis(aws_sdk_kinesis::Client::new(&shared)),
            AlertKind::S3 => {
                let conf = aws_sdk_s3::config::Builder::from(&shared)
                    .force_path_style(cfg.force_path_style)
                    .build();
                let (bucket, prefix) = s3_target(&cfg.target);
                Dest::S3 {
                    client: aws_sdk_s3::Client::from_conf(conf),
                    bucket,
                    prefix,
                }
            }
            AlertKind::Webhook => {
                let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
                let b = hyper_rustls::HttpsConnectorBuilder::new()
                    .with_provider_and_native_roots(provider)
                    .map_err(|e| OutputError::Tls(e.to_string()))?;
                let b = if cfg.tls_only {
                    b.https_only()
                } else {
                    b.https_or_http()
                };
                let conn = b.enable_http1().build();
                Dest::Webhook(Box::new(
                    Client::builder(hyper_util::rt::TokioExecutor::new()).build(conn),
                ))
            }
        };
        Ok(Output {
            label: cfg.label(),
            target: cfg.target.clone(),
            max_attempts: cfg.max_attempts,
            client,
        })
    }

    /// One attempt at delivering `batch` (all of it, or an error).
    async fn send(&self, batch: &[Pending]) -> Result<(), String> {
        let err =
            |e: &dyn std::error::Error| aws_sdk_sqs::error::DisplayErrorContext(e).to_string();
        match &self.client {
            Dest::Sqs(c) => {
                for p in batch {
                    c.send_message()
                        .queue_url(&self.target)
                        .message_body(String::from_utf8_lossy(&p.body))
                        .send()
                        .await
                        .map_err(|e| err(&e))?;
                }
            }
            Dest::Sns(c) => {
                for p in batch {
                    c.publish()
                        .topic_arn(&self.target)
                        .message(String::from_utf8_lossy(&p.body))
                        .send()
                        .await
                        .map_err(|e| err(&e))?;
                }
            }
            Dest::Kinesis(c) => {
                for p in batch {
                    let mut put = c
                        .put_record()
                        .data(aws_sdk_kinesis::primitives::Blob::new(p.body.clone()))
                        .partition_key(&p.partition_key);
                    put = if self.target.starts_with("arn:") {
                        put.stream_arn(&self.target)
                    } else {
                        put.stream_name(&self.target)
                    };
                    put.send().await.map_err(|e| err(&e))?;
                }
            }
            Dest::S3 {
                client,
                bucket,
                prefix,
            } => {
                let mut by_partition: std::collections::BTreeMap<&str, Vec<u8>> =
                    Default::default();
                for p in batch {
                    let buf = by_partition.entry(p.partition.as_str()).or_default();
                    buf.extend_from_slice(&p.body);
                    buf.push(b'\n');
                }
                for (partition, body) in by_partition {
                    let key = format!(
                        "{prefix}{partition}alerts-{}.json",
                        uuid::Uuid::now_v7().simple()
                    );
                    client
                        .put_object()
                        .bucket(bucket)
                        .key(key)
                        .content_type("application/x-ndjson")
                        .body(body.into())
                        .send()
                        .await
                        .map_err(|e| err(&e))?;
                }
            }
            Dest::Webhook(c) => {
                for p in batch {
                    let req = hyper::Request::post(&self.target)
                        .header("content-type", "application/json")
                        .body(Full::new(Bytes::from(p.body.clone())))
                        .map_err(|e| format!("request: {e}"))?;
                    // The URL is a secret (Slack's carry a token): errors never name it.
                    let resp = tokio::time::timeout(WEBHOOK_TIMEOUT, c.request(req))
                        .await
                        .map_err(|_| "timed out".to_owned())?
                        .map_err(|e| format!("request failed: {}", error_chain(&e)))?;
                    let status = resp.status();
                    if !status.is_success() {
                        return Err(format!("HTTP status {}", status.as_u16()));
                    }
                }
            }
        }
        Ok(())
    }
}

/// An error and its causes, without the URL (hyper-util's connect errors carry no URL).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// The wait before attempt `n + 1` (n ≥ 1): 200 ms doubling, at most 10 s.
fn backoff(n: u32) -> Duration {
    let doublings = n.clamp(1, 7) - 1;
    Duration::from_millis(200u64 << doublings).min(Duration::from_secs(10))
}

/// Delivers the queue until every sender is gone and it is empty.
pub async fn run(out: Output, mut rx: mpsc::Receiver<Pending>) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < ROUND {
            match rx.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        deliver(&out, batch).await;
    }
}

async fn deliver(out: &Output, batch: Vec<Pending>) {
    let started = Instant::now();
    let mut attempt = 1;
    loop {
        match out.send(&batch).await {
            Ok(()) => {
                metrics::emit(AlertsDelivered {
                    output: &out.label,
                    alerts: batch.len() as u64,
                    elapsed: started.elapsed(),
                });
                for p in batch {
                    if let Some(h) = p.hold {
                        h.commit();
                    }
                }
                return;
            }
            Err(error) => {
                let last = attempt >= out.max_attempts;
                metrics::emit(AlertDeliveryFailed {
                    output: &out.label,
                    alerts: batch.len() as u64,
                    attempt,
                    given_up: last,
                    error: &error,
                });
                if last {
                    // The holds drop uncommitted: the notifications come again, and with
                    // them these alerts (a partial delivery repeats some: at-least-once).
                    for p in batch {
                        if let Some((s, t)) = p.ticket {
                            s.forget(t);
                        }
                    }
                    return;
                }
                tokio::time::sleep(backoff(attempt)).await;
                attempt += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn backoff_doubles_up_to_ten_seconds() {
        let b: Vec<u64> = (1..9)
            .map(|n| super::backoff(n).as_millis() as u64)
            .collect();
        assert_eq!(b, [200, 400, 800, 1600, 3200, 6400, 10000, 10000]);
    }
}
