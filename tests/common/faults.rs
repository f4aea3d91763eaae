//! A fault-injecting HTTP proxy between trailhose and moto: it answers some requests itself with
//! S3's throttling error (503 SlowDown) or a 500, and delays others, so tests can show that S3
//! trouble costs retries, not events. One request per connection keeps it simple: every
//! forwarded request carries `Connection: close`. It also records every request it sees, so a
//! test can check what trailhose sent (an STS call's parameters) and where.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Debug, Clone, Copy)]
pub struct Plan {
    /// Every n-th request gets an error response (alternating 503 SlowDown and 500).
    pub fail_every: u64,
    /// Every n-th request is delayed by `delay`.
    pub slow_every: u64,
    pub delay: Duration,
}

/// Answers a request itself when it returns `(status line, S3 error code)` for the request's
/// first line (`PUT /bucket/key?partNumber=1&uploadId=… HTTP/1.1`); it may keep its own count.
pub type Refuse = fn(&str) -> Option<(&'static str, &'static str)>;

/// One request as the proxy received it: its head (request line and headers, as sent) and body.
#[derive(Debug, Clone)]
pub struct Seen {
    pub head: String,
    pub body: String,
}

pub struct FaultProxy {
    pub port: u16,
    pub requests: Arc<AtomicU64>,
    pub injected: Arc<AtomicU64>,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl FaultProxy {
    pub fn start(upstream_port: u16, plan: Plan) -> FaultProxy {
        FaultProxy::start_refusing(upstream_port, plan, None)
    }

    /// Passes everything on, recording it.
    pub fn recording(upstream_port: u16) -> FaultProxy {
        let plan = Plan {
            fail_every: 0,
            slow_every: 0,
            delay: Duration::ZERO,
        };
        FaultProxy::start(upstream_port, plan)
    }

    /// `start`, and the requests `refuse` picks are answered with its error.
    pub fn start_refusing(upstream_port: u16, plan: Plan, refuse: Option<Refuse>) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let port = listener.local_addr().expect("addr").port();
        let requests = Arc::new(AtomicU64::new(0));
        let injected = Arc::new(AtomicU64::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (r, i, s) = (requests.clone(), injected.clone(), seen.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let (r, i, s) = (r.clone(), i.clone(), s.clone());
                std::thread::spawn(move || {
                    let _ = handle(conn, upstream_port, (plan, refuse), &r, &i, &s);
                });
            }
        });
        FaultProxy {
            port,
            requests,
            injected,
            seen,
        }
    }

    /// Every request received so far, in order of arrival.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

fn handle(
    client: TcpStream,
    upstream: u16,
    (plan, refuse): (Plan, Option<Refuse>),
    requests: &AtomicU64,
    injected: &AtomicU64,
    seen: &Mutex<Vec<Seen>>,
) -> std::io::Result<()> {
    client.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut reader = BufReader::new(client.try_clone()?);
    let mut head = Vec::new();
    let mut content_length = 0usize;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let lower = line.to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("content-length:") {
            content_length = v.trim().parse().unwrap_or(0);
        }
        assert!(
            !lower.starts_with("transfer-encoding: chunked"),
            "the fault proxy does not relay chunked request bodies"
        );
        if line == "\r\n" {
            break;
        }
        if !lower.starts_with("connection:") {
            head.extend_from_slice(line.as_bytes());
        }
    }
    let mut body = vec![0; content_length];
    reader.read_exact(&mut body)?;
    seen.lock().unwrap_or_else(|e| e.into_inner()).push(Seen {
        head: String::from_utf8_lossy(&head).into_owned(),
        // Enough for an API call's parameters; an object's bytes need not be kept whole.
        body: String::from_utf8_lossy(&body[..body.len().min(64 << 10)]).into_owned(),
    });
    head.extend_from_slice(b"Connection: close\r\n\r\n");

    let n = requests.fetch_add(1, Ordering::SeqCst) + 1;
    let mut client = client;
    let request_line = String::from_utf8_lossy(&head);
    let request_line = request_line.lines().next().unwrap_or("");
    let refused = refuse.and_then(|r| r(request_line));
    if refused.is_some() || (plan.fail_every > 0 && n.is_multiple_of(plan.fail_every)) {
        injected.fetch_add(1, Ordering::SeqCst);
        let (status, code) = match refused {
            Some(r) => r,
            None if (n / plan.fail_every).is_multiple_of(2) => ("503 Slow Down", "SlowDown"),
            None => ("500 Internal Server Error", "InternalError"),
        };
        let xml = format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{code}</Code><Message>injected by the test proxy</Message><RequestId>proxy</RequestId></Error>"
        );
        write!(
            client,
            "HTTP/1.1 {status}\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{xml}",
            xml.len()
        )?;
        return client.flush();
    }
    if plan.slow_every > 0 && n.is_multiple_of(plan.slow_every) {
        injected.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(plan.delay);
    }
    let mut up = TcpStream::connect(("127.0.0.1", upstream))?;
    up.write_all(&head)?;
    up.write_all(&body)?;
    let mut response = Vec::new();
    up.read_to_end(&mut response)?;
    client.write_all(&response)?;
    client.flush()
}

/// A proxy in front of moto's Kinesis that turns every `every`-th PutRecords call into a
/// partial failure, as Kinesis does under throttling: every other entry of that call is held
/// back from moto and reported failed (`ProvisionedThroughputExceededException`), the others
/// are forwarded and reported as moto answered. Other calls pass through unchanged.
pub struct PartialPutProxy {
    pub port: u16,
    /// Entries reported failed so far.
    pub failed_entries: Arc<AtomicU64>,
}

impl PartialPutProxy {
    pub fn start(upstream_port: u16, every: u64) -> PartialPutProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let port = listener.local_addr().expect("addr").port();
        let failed_entries = Arc::new(AtomicU64::new(0));
        let puts = Arc::new(AtomicU64::new(0));
        let failed = failed_entries.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let (failed, puts) = (failed.clone(), puts.clone());
                std::thread::spawn(move || {
                    let _ = relay_put_records(conn, upstream_port, every, &puts, &failed);
                });
            }
        });
        PartialPutProxy {
            port,
            failed_entries,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

fn relay_put_records(
    client: TcpStream,
    upstream: u16,
    every: u64,
    puts: &AtomicU64,
    failed: &AtomicU64,
) -> std::io::Result<()> {
    client.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut reader = BufReader::new(client.try_clone()?);
    let mut head = Vec::new();
    let mut content_length = 0usize;
    let mut is_put_records = false;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let lower = line.to_ascii_lowercase();
        if line == "\r\n" {
            break;
        }
        if let Some(v) = lower.strip_prefix("content-length:") {
            content_length = v.trim().parse().unwrap_or(0);
            continue;
        }
        if lower.starts_with("x-amz-target:") && lower.contains("putrecords") {
            is_put_records = true;
        }
        if !lower.starts_with("connection:") {
            head.extend_from_slice(line.as_bytes());
        }
    }
    let mut body = vec![0; content_length];
    reader.read_exact(&mut body)?;

    let mut held_back: Vec<usize> = Vec::new();
    let mut total = 0;
    if is_put_records && (puts.fetch_add(1, Ordering::SeqCst) + 1).is_multiple_of(every) {
        let mut req: serde_json::Value = serde_json::from_slice(&body).expect("PutRecords JSON");
        let records = req["Records"].as_array().cloned().unwrap_or_default();
        total = records.len();
        if total > 1 {
            let kept: Vec<serde_json::Value> = records
                .into_iter()
                .enumerate()
                .filter_map(|(i, r)| {
                    if i % 2 == 1 {
                        held_back.push(i);
                        None
                    } else {
                        Some(r)
                    }
                })
                .collect();
            req["Records"] = serde_json::Value::Array(kept);
            body = serde_json::to_vec(&req).expect("json");
        }
    }
    head.extend_from_slice(
        format!(
            "Content-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    );
    // moto numbers a shard's records without a lock ("not safe for concurrency"): concurrent
    // puts can overwrite each other there, so the proxy forwards one PutRecords at a time.
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let guard = is_put_records.then(|| SERIAL.lock().unwrap_or_else(|e| e.into_inner()));
    let mut up = TcpStream::connect(("127.0.0.1", upstream))?;
    up.write_all(&head)?;
    up.write_all(&body)?;
    let mut response = Vec::new();
    up.read_to_end(&mut response)?;
    drop(guard);
    let mut client = client;
    if held_back.is_empty() {
        client.write_all(&response)?;
        return client.flush();
    }
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("HTTP response head")
        + 4;
    assert!(
        response.starts_with(b"HTTP/1.1 200") || response.starts_with(b"HTTP/1.0 200"),
        "moto accepted the forwarded entries: {}",
        String::from_utf8_lossy(&response[..split])
    );
    let answer: serde_json::Value =
        serde_json::from_slice(&response[split..]).expect("PutRecords answer");
    let mut forwarded = answer["Records"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter();
    let mut results = Vec::new();
    for i in 0..total {
        if held_back.contains(&i) {
            results.push(serde_json::json!({
                "ErrorCode": "ProvisionedThroughputExceededException",
                "ErrorMessage": "Rate exceeded for shard (injected by the test proxy)"
            }));
        } else {
            results.push(forwarded.next().expect("a result per forwarded entry"));
        }
    }
    failed.fetch_add(held_back.len() as u64, Ordering::SeqCst);
    let merged = serde_json::json!({
        "FailedRecordCount": held_back.len(),
        "Records": results,
    })
    .to_string();
    write!(
        client,
        "HTTP/1.1 200 OK\r\nContent-Type: application/x-amz-json-1.1\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{merged}",
        merged.len()
    )?;
    client.flush()
}

/// A proxy in front of moto's Kinesis (and DynamoDB, passed through) that answers some
/// GetRecords calls itself: every `throttle_every`-th with ProvisionedThroughputExceeded, every
/// `expire_every`-th with ExpiredIterator, as Kinesis does under load or after a pause.
pub struct GetRecordsFaultProxy {
    pub port: u16,
    pub throttled: Arc<AtomicU64>,
    pub expired: Arc<AtomicU64>,
}

impl GetRecordsFaultProxy {
    pub fn start(
        upstream_port: u16,
        throttle_every: u64,
        expire_every: u64,
    ) -> GetRecordsFaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let port = listener.local_addr().expect("addr").port();
        let throttled = Arc::new(AtomicU64::new(0));
        let expired = Arc::new(AtomicU64::new(0));
        let calls = Arc::new(AtomicU64::new(0));
        let (t, e) = (throttled.clone(), expired.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let (t, e, calls) = (t.clone(), e.clone(), calls.clone());
                std::thread::spawn(move || {
                    let _ = relay_get_records(
                        conn,
                        upstream_port,
                        (throttle_every, expire_every),
                        &calls,
                        (&t, &e),
                    );
                });
            }
        });
        GetRecordsFaultProxy {
            port,
            throttled,
            expired,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

fn relay_get_records(
    client: TcpStream,
    upstream: u16,
    (throttle_every, expire_every): (u64, u64),
    calls: &AtomicU64,
    (throttled, expired): (&AtomicU64, &AtomicU64),
) -> std::io::Result<()> {
    client.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut reader = BufReader::new(client.try_clone()?);
    let mut head = Vec::new();
    let mut content_length = 0usize;
    let mut is_get_records = false;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let lower = line.to_ascii_lowercase();
        if line == "\r\n" {
            break;
        }
        if let Some(v) = lower.strip_prefix("content-length:") {
            content_length = v.trim().parse().unwrap_or(0);
        }
        if lower.starts_with("x-amz-target:") && lower.contains(".getrecords") {
            is_get_records = true;
        }
        if !lower.starts_with("connection:") {
            head.extend_from_slice(line.as_bytes());
        }
    }
    head.extend_from_slice(b"Connection: close\r\n\r\n");
    let mut body = vec![0; content_length];
    reader.read_exact(&mut body)?;
    let mut client = client;
    if is_get_records {
        let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
        let fault = if throttle_every > 0 && n.is_multiple_of(throttle_every) {
            throttled.fetch_add(1, Ordering::SeqCst);
            Some("ProvisionedThroughputExceededException")
        } else if expire_every > 0 && n.is_multiple_of(expire_every) {
            expired.fetch_add(1, Ordering::SeqCst);
            Some("ExpiredIteratorException")
        } else {
            None
        };
        if let Some(code) = fault {
            let json = format!(r#"{{"__type":"{code}","message":"injected by the test proxy"}}"#);
            write!(
                client,
                "HTTP/1.1 400 Bad Request\r\nContent-Type: application/x-amz-json-1.1\r\nx-amzn-ErrorType: {code}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{json}",
                json.len()
            )?;
            return client.flush();
        }
    }
    let mut up = TcpStream::connect(("127.0.0.1", upstream))?;
    up.write_all(&head)?;
    up.write_all(&body)?;
    let mut response = Vec::new();
    up.read_to_end(&mut response)?;
    client.write_all(&response)?;
    client.flush()
}
