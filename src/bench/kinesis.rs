//! The Kinesis rows of `trailhose bench`: the benchmark's events as CloudWatch Logs subscription
//! records fed straight to the record classifier and the engine (no stream, no lease table),
//! and the Kinesis output putting every event to a local stand-in for PutRecords.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::time::Instant;

use serde::Deserialize;
use serde_json::value::RawValue;

use super::{BenchError, Row, cpu_seconds, io};
use crate::config::Config;
use crate::pipeline::engine::{Engine, Input};
use crate::source::kinesis::{self, Record};

/// Log events per subscription record and records per GetRecords call.
const EVENTS_PER_RECORD: usize = 100;
const RECORDS_PER_CALL: usize = 100;

/// The benchmark's events as GetRecords batches of gzipped `DATA_MESSAGE` records.
pub(super) struct Records {
    pub batches: Vec<Vec<Record>>,
    pub events: u64,
}

#[derive(Deserialize)]
struct DeliveryFile<'a> {
    #[serde(rename = "Records", borrow)]
    records: Vec<&'a RawValue>,
}

/// Packs the events of the delivery files into subscription records as CloudWatch Logs writes
/// them (one JSON string message per event), untimed.
pub(super) fn cwl_records(files: &[PathBuf]) -> Result<Records, BenchError> {
    let mut out = Records {
        batches: Vec::new(),
        events: 0,
    };
    let mut batch = Vec::new();
    let mut seq = 0u64;
    let mut plain = Vec::new();
    for f in files {
        let gz = io("reading input", std::fs::read(f))?;
        plain.clear();
        io(
            "gunzip",
            flate2::read::MultiGzDecoder::new(&gz[..]).read_to_end(&mut plain),
        )?;
        let file: DeliveryFile = serde_json::from_slice(&plain)
            .map_err(|e| BenchError::Io("input".into(), std::io::Error::other(e)))?;
        for events in file.records.chunks(EVENTS_PER_RECORD) {
            let mut doc = String::from(
                r#"{"messageType":"DATA_MESSAGE","owner":"123456789012","logGroup":"aws-cloudtrail-logs-123456789012","logStream":"123456789012_CloudTrail_us-east-1","subscriptionFilters":["all"],"logEvents":["#,
            );
            for (i, ev) in events.iter().enumerate() {
                if i > 0 {
                    doc.push(',');
                }
                let message = serde_json::to_string(ev.get()).unwrap_or_default();
                doc.push_str(&format!(
                    r#"{{"id":"{:056}","timestamp":1710770400000,"message":{message}}}"#,
                    seq * 1000 + i as u64
                ));
            }
            doc.push_str("]}");
            let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
            io("gzip", enc.write_all(doc.as_bytes()))?;
            let data = io("gzip", enc.finish())?;
            out.events += events.len() as u64;
            seq += 1;
            batch.push(Record {
                seq: format!("{seq:056}"),
                data,
            });
            if batch.len() == RECORDS_PER_CALL {
                out.batches.push(std::mem::take(&mut batch));
            }
        }
    }
    if !batch.is_empty() {
        out.batches.push(batch);
    }
    Ok(out)
}

/// Classifies every batch off the runtime and hands its events to the engine, as a shard
/// reader does (without the ledger's holds: nothing is acknowledged).
pub(super) async fn source_run(
    cfg: &Config,
    records: &Records,
    workers: usize,
) -> Result<(Row, u64), BenchError> {
    let kcfg = crate::config::KinesisConfig::default();
    let batches = records.batches.clone();
    let cpu0 = cpu_seconds();
    let t0 = Instant::now();
    let engine = Engine::open(cfg, workers, kcfg.max_files_in_flight).await?;
    let files = engine.submitter();
    for batch in batches {
        let classified = tokio::task::spawn_blocking(move || {
            kinesis::classify_batch("bench", "shardId-000000000000", batch)
        })
        .await
        .map_err(|e| BenchError::Io("classify".into(), std::io::Error::other(e)))?;
        if !classified.notifications.is_empty() || classified.jobs.is_empty() {
            return Err(BenchError::Io(
                "classify".into(),
                std::io::Error::other("a generated record is not a CloudWatch Logs batch"),
            ));
        }
        for job in classified.jobs {
            let job = Input::Records(Box::new(job));
            if !files.submit("kinesis://bench".into(), job, None).await {
                return Err(BenchError::Io(
                    "engine".into(),
                    std::io::Error::other("the workers stopped"),
                ));
            }
        }
    }
    drop(files);
    let (_, written) = engine.finish().await?;
    let row = Row {
        name: super::KINESIS_IN.to_owned(),
        wall: t0.elapsed(),
        cpu: cpu_seconds() - cpu0,
    };
    Ok((row, written.event_records))
}

/// A stand-in for Kinesis on a local port: answers DescribeStreamSummary and PutRecords (every
/// entry accepted) with as little work as the protocol allows, so that the CPU measured is the
/// output's, not the server's. Runs until the process ends.
pub(super) fn stand_in() -> Result<String, BenchError> {
    let listener = io("stand-in", TcpListener::bind("127.0.0.1:0"))?;
    let port = io("stand-in", listener.local_addr())?.port();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let _ = serve(conn);
            });
        }
    });
    Ok(format!("http://127.0.0.1:{port}"))
}

fn serve(conn: TcpStream) -> std::io::Result<()> {
    let mut writer = conn.try_clone()?;
    let mut reader = BufReader::new(conn);
    let mut body = Vec::new();
    let mut answer = String::new();
    loop {
        let mut length = 0usize;
        let mut target = String::new();
        let mut line = String::new();
        loop {
            line.clear();
            if reader.read_line(&mut line)? == 0 {
                return Ok(());
            }
            if line == "\r\n" {
                break;
            }
            let lower = line.to_ascii_lowercase();
            if let Some(v) = lower.strip_prefix("content-length:") {
                length = v.trim().parse().unwrap_or(0);
            } else if let Some(v) = lower.strip_prefix("x-amz-target:") {
                target = v.trim().to_owned();
            }
        }
        body.resize(length, 0);
        reader.read_exact(&mut body)?;
        answer.clear();
        if target.ends_with("putrecords") {
            let n = memchr::memmem::find_iter(&body, b"\"PartitionKey\"").count();
            answer.push_str(r#"{"FailedRecordCount":0,"Records":["#);
            for i in 0..n {
                if i > 0 {
                    answer.push(',');
                }
                answer.push_str(r#"{"SequenceNumber":"1","ShardId":"shardId-000000000000"}"#);
            }
            answer.push_str("]}");
        } else {
            answer.push_str(
                r#"{"StreamDescriptionSummary":{"StreamName":"bench","StreamARN":"arn:aws:kinesis:us-east-1:123456789012:stream/bench","StreamStatus":"ACTIVE","RetentionPeriodHours":24,"StreamCreationTimestamp":1710770400,"EnhancedMonitoring":[],"OpenShardCount":1}}"#,
            );
        }
        write!(
            writer,
            "HTTP/1.1 200 OK\r\nContent-Type: application/x-amz-json-1.1\r\nContent-Length: {}\r\n\r\n{answer}",
            answer.len()
        )?;
        writer.flush()?;
    }
}
