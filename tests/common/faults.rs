//! A fault-injecting HTTP proxy between trailhose and moto: it answers some requests itself with
//! S3's throttling error (503 SlowDown) or a 500, and delays others, so tests can show that S3
//! trouble costs retries, not events. One request per connection keeps it simple: every
//! forwarded request carries `Connection: close`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

#[derive(Debug, Clone, Copy)]
pub struct Plan {
    /// Every n-th request gets an error response (alternating 503 SlowDown and 500).
    pub fail_every: u64,
    /// Every n-th request is delayed by `delay`.
    pub slow_every: u64,
    pub delay: Duration,
}

pub struct FaultProxy {
    pub port: u16,
    pub requests: Arc<AtomicU64>,
    pub injected: Arc<AtomicU64>,
}

impl FaultProxy {
    pub fn start(upstream_port: u16, plan: Plan) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let port = listener.local_addr().expect("addr").port();
        let requests = Arc::new(AtomicU64::new(0));
        let injected = Arc::new(AtomicU64::new(0));
        let (r, i) = (requests.clone(), injected.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let (r, i) = (r.clone(), i.clone());
                std::thread::spawn(move || {
                    let _ = handle(conn, upstream_port, plan, &r, &i);
                });
            }
        });
        FaultProxy {
            port,
            requests,
            injected,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

fn handle(
    client: TcpStream,
    upstream: u16,
    plan: Plan,
    requests: &AtomicU64,
    injected: &AtomicU64,
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
    head.extend_from_slice(b"Connection: close\r\n\r\n");
    let mut body = vec![0; content_length];
    reader.read_exact(&mut body)?;

    let n = requests.fetch_add(1, Ordering::SeqCst) + 1;
    let mut client = client;
    if plan.fail_every > 0 && n.is_multiple_of(plan.fail_every) {
        injected.fetch_add(1, Ordering::SeqCst);
        let (status, code) = if (n / plan.fail_every).is_multiple_of(2) {
            ("503 Slow Down", "SlowDown")
        } else {
            ("500 Internal Server Error", "InternalError")
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
