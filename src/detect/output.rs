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
/// Per call (one alert, or one S3 object).
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

impl Output {
    pub async fn open(cfg: &AlertConfig) -> Result<Output, OutputError> {
        let aws = || crate::aws::config(cfg.region.as_deref(), cfg.endpoint_url.as_deref());
        let client = match cfg.kind {
            AlertKind::Sqs => Dest::Sqs(aws_sdk_sqs::Client::new(&aws().await)),
            AlertKind::Sns => Dest::Sns(aws_sdk_sns::Client::new(&aws().await)),
            AlertKind::Kinesis => Dest::Kinesis(aws_sdk_kinesis::Client::new(&aws().await)),
            AlertKind::S3 => {
                let conf = aws_sdk_s3::config::Builder::from(&aws().await)
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

    /// One attempt at delivering `batch`, in order: all of it, or how many came through
    /// before the error (those are not sent again).
    async fn send(&self, batch: &[Pending]) -> Result<(), Failed> {
        let mut delivered = 0;
        match &self.client {
            Dest::Sqs(c) => {
                for p in batch {
                    let body = sqs_text(&p.body);
                    let put = c.send_message().queue_url(&self.target).message_body(body);
                    within(put.send())
                        .await
                        .map_err(|error| Failed { delivered, error })?;
                    delivered += 1;
                }
            }
            Dest::Sns(c) => {
                for p in batch {
                    let put = c
                        .publish()
                        .topic_arn(&self.target)
                        .message(String::from_utf8_lossy(&p.body));
                    within(put.send())
                        .await
                        .map_err(|error| Failed { delivered, error })?;
                    delivered += 1;
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
                    within(put.send())
                        .await
                        .map_err(|error| Failed { delivered, error })?;
                    delivered += 1;
                }
            }
            Dest::S3 {
                client,
                bucket,
                prefix,
            } => {
                // `deliver` sorted the round by partition: one object per run.
                let mut rest = batch;
                while let Some(first) = rest.first() {
                    let run = rest
                        .iter()
                        .take_while(|p| p.partition == first.partition)
                        .count();
                    let (this, next) = rest.split_at(run);
                    let mut body = Vec::new();
                    for p in this {
                        body.extend_from_slice(&p.body);
                        body.push(b'\n');
                    }
                    let key = format!(
                        "{prefix}{}alerts-{}.json",
                        first.partition,
                        uuid::Uuid::now_v7().simple()
                    );
                    let put = client
                        .put_object()
                        .bucket(bucket)
                        .key(key)
                        .content_type("application/x-ndjson")
                        .body(body.into());
                    within(put.send())
                        .await
                        .map_err(|error| Failed { delivered, error })?;
                    delivered += run;
                    rest = next;
                }
            }
            Dest::Webhook(c) => {
                for p in batch {
                    let req = hyper::Request::post(&self.target)
                        .header("content-type", "application/json")
                        .body(Full::new(Bytes::from(p.body.clone())))
                        .map_err(|e| Failed {
                            delivered,
                            error: format!("request: {e}"),
                        })?;
                    // The URL is a secret (Slack's carry a token): errors never name it.
                    let resp = tokio::time::timeout(CALL_TIMEOUT, c.request(req))
                        .await
                        .map_err(|_| "timed out".to_owned())
                        .and_then(|r| r.map_err(|e| format!("request failed: {}", error_chain(&e))))
                        .map_err(|error| Failed { delivered, error })?;
                    let status = resp.status();
                    if !status.is_success() {
                        let error = format!("HTTP status {}", status.as_u16());
                        return Err(Failed { delivered, error });
                    }
                    delivered += 1;
                }
            }
        }
        Ok(())
    }
}

/// An attempt that failed after `delivered` alerts of its batch came through.
struct Failed {
    delivered: usize,
    error: String,
}

/// One AWS call, bounded: the SDK sets no overall timeout, and a hung endpoint must fail the
/// attempt (and free the workers waiting on this queue) rather than hold it forever.
async fn within<T, E>(call: impl std::future::Future<Output = Result<T, E>>) -> Result<T, String>
where
    E: std::error::Error + 'static,
{
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(aws_sdk_sqs::error::DisplayErrorContext(&e).to_string()),
        Err(_) => Err(format!("timed out after {} s", CALL_TIMEOUT.as_secs())),
    }
}

/// An SQS message body: SQS refuses U+FFFE and U+FFFF, which are valid in JSON strings (and
/// so may come from an event): written as escapes, the document is the same JSON.
fn sqs_text(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    if !text.contains(['\u{fffe}', '\u{ffff}']) {
        return text.into_owned();
    }
    text.replace('\u{fffe}', "\\ufffe")
        .replace('\u{ffff}', "\\uffff")
}

/// The largest alert document an output takes: SNS messages (and SQS queues created before
/// 2025, whose `MaximumMessageSize` stays 256 KiB) 256 KiB, a Kinesis record 1 MiB with its
/// key; webhooks get the SNS limit. A larger one is sent without its event.
pub fn max_body(kind: AlertKind) -> usize {
    match kind {
        AlertKind::Sqs | AlertKind::Sns | AlertKind::Webhook => 256 * 1024,
        AlertKind::Kinesis => 1_000_000,
        AlertKind::S3 => usize::MAX,
    }
}

/// A Kinesis partition key, `rule/eventID`, within Kinesis's 256 characters (a longer key is
/// refused on every attempt).
pub fn partition_key(rule: &str, event_id: &str) -> String {
    format!("{rule}/{event_id}").chars().take(256).collect()
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

/// Delivers the queue until every sender is gone and it is empty. Returns how many alerts
/// were given up that no notification brings back (local files have no hold): the run
/// that made them must say it failed.
pub async fn run(out: Output, mut rx: mpsc::Receiver<Pending>) -> Undelivered {
    let mut lost = 0;
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < ROUND {
            match rx.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        lost += deliver(&out, batch).await;
    }
    Undelivered {
        output: out.label,
        alerts: lost,
    }
}

/// Alerts an output gave up on without a notification to deliver them again.
pub struct Undelivered {
    pub output: String,
    pub alerts: u64,
}

/// Returns the given-up alerts without a hold.
async fn deliver(out: &Output, mut batch: Vec<Pending>) -> u64 {
    if matches!(out.client, Dest::S3 { .. }) {
        batch.sort_by(|a, b| a.partition.cmp(&b.partition));
    }
    let started = Instant::now();
    // Alerts at the front of `batch` already delivered: a retry sends only the rest.
    let mut done = 0;
    let mut attempt = 1;
    loop {
        let rest = batch.get(done..).unwrap_or_default();
        if rest.is_empty() {
            break;
        }
        match out.send(rest).await {
            Ok(()) => done = batch.len(),
            Err(Failed { delivered, error }) => {
                done = (done + delivered).min(batch.len());
                let last = attempt >= out.max_attempts;
                metrics::emit(AlertDeliveryFailed {
                    output: &out.label,
                    alerts: (batch.len() - done) as u64,
                    attempt,
                    given_up: last,
                    error: &error,
                });
                if last {
                    break;
                }
                tokio::time::sleep(backoff(attempt)).await;
                attempt += 1;
            }
        }
    }
    if done > 0 {
        metrics::emit(AlertsDelivered {
            output: &out.label,
            alerts: done as u64,
            elapsed: started.elapsed(),
        });
    }
    let mut lost = 0;
    for (i, p) in batch.into_iter().enumerate() {
        if i < done {
            if let Some(h) = p.hold {
                h.commit();
            }
            continue;
        }
        // Given up: the hold drops uncommitted, so the notification comes again, and with it
        // this alert, which must not then be suppressed by itself.
        if let Some((s, t)) = p.ticket {
            s.forget(t);
        }
        lost += u64::from(p.hold.is_none());
    }
    lost
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Read, Write};

    /// A webhook receiver on a real socket: answers 503 to the requests numbered in `fail`
    /// (from 1), 200 to the others; returns the port and every body it was sent, in order.
    fn hook(fail: &'static [usize]) -> (u16, Arc<std::sync::Mutex<Vec<String>>>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let bodies = Arc::new(std::sync::Mutex::new(Vec::new()));
        let keep = bodies.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let keep = keep.clone();
                std::thread::spawn(move || serve(conn, &keep, fail));
            }
        });
        (port, bodies)
    }

    fn serve(conn: std::net::TcpStream, keep: &std::sync::Mutex<Vec<String>>, fail: &[usize]) {
        let mut r = BufReader::new(conn.try_clone().expect("clone"));
        let mut w = conn;
        loop {
            let mut line = String::new();
            let mut len = 0;
            if r.read_line(&mut line).unwrap_or(0) == 0 {
                break;
            }
            loop {
                line.clear();
                if r.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some((k, v)) = line.split_once(':')
                    && k.eq_ignore_ascii_case("content-length")
                {
                    len = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0; len];
            if r.read_exact(&mut body).is_err() {
                break;
            }
            let n = {
                let mut b = keep.lock().expect("lock");
                b.push(String::from_utf8_lossy(&body).into_owned());
                b.len()
            };
            let status = if fail.contains(&n) {
                "503 No"
            } else {
                "200 OK"
            };
            let resp = format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n");
            if w.write_all(resp.as_bytes()).is_err() {
                break;
            }
        }
    }

    #[tokio::test]
    async fn a_retry_sends_only_what_was_not_delivered_and_commits_what_was() {
        let (port, bodies) = hook(&[2]);
        let cfg: AlertConfig = toml::from_str(&format!(
            "kind = \"webhook\"\ntarget = \"http://127.0.0.1:{port}/hook\"\nmax_attempts = 3"
        ))
        .expect("config");
        let out = Output::open(&cfg).await.expect("open");
        let mut settled = Vec::new();
        let batch = ["a", "b", "c"]
            .iter()
            .map(|b| {
                let (hold, s) = Hold::new();
                settled.push(s);
                Pending {
                    body: b.as_bytes().to_vec(),
                    partition: String::new(),
                    partition_key: String::new(),
                    hold: Some(hold),
                    ticket: None,
                }
            })
            .collect();
        deliver(&out, batch).await;
        assert_eq!(
            *bodies.lock().expect("lock"),
            ["a", "b", "b", "c"],
            "a is not sent again"
        );
        for s in settled {
            assert_eq!(s.await, Ok(true), "every alert delivered");
        }
    }

    #[tokio::test]
    async fn given_up_alerts_hand_their_notification_back_and_delivered_ones_do_not() {
        let (port, bodies) = hook(&[2, 3]);
        let cfg: AlertConfig = toml::from_str(&format!(
            "kind = \"webhook\"\ntarget = \"http://127.0.0.1:{port}/hook\"\nmax_attempts = 2"
        ))
        .expect("config");
        let out = Output::open(&cfg).await.expect("open");
        let (first, first_settled) = Hold::new();
        let (second, second_settled) = Hold::new();
        let pending = |body: &str, hold| Pending {
            body: body.as_bytes().to_vec(),
            partition: String::new(),
            partition_key: String::new(),
            hold: Some(hold),
            ticket: None,
        };
        deliver(&out, vec![pending("a", first), pending("b", second)]).await;
        assert_eq!(*bodies.lock().expect("lock"), ["a", "b", "b"]);
        assert_eq!(first_settled.await, Ok(true));
        assert_eq!(second_settled.await, Ok(false), "handed back");
    }

    #[test]
    fn kinesis_keys_fit_and_sqs_bodies_carry_no_character_sqs_refuses() {
        let long = "x".repeat(1000);
        assert_eq!(partition_key("rule", &long).chars().count(), 256);
        assert_eq!(partition_key("rule", "e1"), "rule/e1");
        let doc = serde_json::json!({"userAgent": "a\u{fffe}b\u{ffff}c"}).to_string();
        let text = sqs_text(doc.as_bytes());
        assert!(!text.contains(['\u{fffe}', '\u{ffff}']), "{text}");
        let back: serde_json::Value = serde_json::from_str(&text).expect("still JSON");
        assert_eq!(
            back["userAgent"], "a\u{fffe}b\u{ffff}c",
            "the same document"
        );
    }

    #[test]
    fn backoff_doubles_up_to_ten_seconds() {
        let b: Vec<u64> = (1..9)
            .map(|n| super::backoff(n).as_millis() as u64)
            .collect();
        assert_eq!(b, [200, 400, 800, 1600, 3200, 6400, 10000, 10000]);
    }
}
