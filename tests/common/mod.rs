//! Shared test harness: a real `moto_server` on a free loopback port, the real AWS SDK against
//! it, the real `trailhose` binary, and the project's own fixture data.
#![allow(dead_code)]

pub mod checks;
pub mod faults;
pub mod fixtures;
pub mod mmdb;
pub mod observed;
pub mod prometheus;
pub mod sqs;

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use aws_sdk_s3::config::{Credentials, Region};

/// A moto_server process, killed on drop.
pub struct Moto {
    child: Child,
    pub endpoint: String,
    pub port: u16,
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

impl Moto {
    pub fn start() -> Moto {
        let port = free_port();
        let port_s = port.to_string();
        let args = ["-H", "127.0.0.1", "-p", port_s.as_str()];
        // `python3 -m moto.server` works where a fresh pip install left no shim on PATH yet.
        let child = Command::new("moto_server")
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .or_else(|_| {
                Command::new("python3")
                    .args(["-m", "moto.server"])
                    .args(args)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
            })
            .expect("moto_server (PyPI moto[server]; scripts/test.sh installs it)");
        Moto::wait_for(child, port)
    }

    /// moto_server with `prelude` (Python) run first, to correct an emulation gap for one test.
    pub fn start_patched(prelude: &str) -> Moto {
        let port = free_port();
        let script = format!(
            "{prelude}\nfrom moto.server import main\nmain(['-H', '127.0.0.1', '-p', '{port}'])\n"
        );
        let child = Command::new("python3")
            .args(["-c", &script])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 with moto (scripts/test.sh installs it)");
        Moto::wait_for(child, port)
    }

    fn wait_for(child: Child, port: u16) -> Moto {
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "moto_server did not start on port {port}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Moto {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
            port,
        }
    }

    pub fn s3(&self) -> aws_sdk_s3::Client {
        let conf = aws_sdk_s3::Config::builder()
            .behavior_version_latest()
            .region(Region::new("us-east-1"))
            .endpoint_url(&self.endpoint)
            .force_path_style(true)
            .credentials_provider(Credentials::new("testing", "testing", None, None, "test"))
            .build();
        aws_sdk_s3::Client::from_conf(conf)
    }

    pub fn sqs(&self) -> aws_sdk_sqs::Client {
        let conf = aws_sdk_sqs::Config::builder()
            .behavior_version_latest()
            .region(aws_sdk_sqs::config::Region::new("us-east-1"))
            .endpoint_url(&self.endpoint)
            .credentials_provider(aws_sdk_sqs::config::Credentials::new(
                "testing", "testing", None, None, "test",
            ))
            .build();
        aws_sdk_sqs::Client::from_conf(conf)
    }

    /// Environment for a trailhose child process talking to this moto.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID", "testing".into()),
            ("AWS_SECRET_ACCESS_KEY", "testing".into()),
            ("AWS_REGION", "us-east-1".into()),
            ("AWS_EC2_METADATA_DISABLED", "true".into()),
            ("AWS_ENDPOINT_URL", self.endpoint.clone()),
        ]
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A fresh temp directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!(
            "trailhose-test-{name}-{}-{}",
            std::process::id(),
            uuid_ish()
        ));
        std::fs::create_dir_all(&p).expect("temp dir");
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn uuid_ish() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// Runs the trailhose binary.
pub fn trailhose(args: &[&str], env: &[(&str, String)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_trailhose"));
    cmd.args(args).env("TRAILHOSE_LOG", "warn");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run trailhose")
}

/// Decodes an output object (gzip members, zstd frames or plain) to text.
pub fn decode(name: &str, bytes: &[u8]) -> String {
    let mut out = String::new();
    if name.ends_with(".gz") {
        flate2::read::MultiGzDecoder::new(bytes)
            .read_to_string(&mut out)
            .expect("valid gzip");
    } else if name.ends_with(".zst") {
        out =
            String::from_utf8(zstd::stream::decode_all(bytes).expect("valid zstd")).expect("utf-8");
    } else {
        out = String::from_utf8(bytes.to_vec()).expect("utf-8");
    }
    out
}

/// Every object under a local output directory: (relative key, decoded text). Objects still
/// being written (dot-named temp files, renamed into place when complete) are not objects yet,
/// so a test may poll this while trailhose writes.
pub fn local_objects(root: &Path) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for entry in walkdir::WalkDir::new(root).sort_by_file_name() {
        let entry = entry.expect("walk output");
        if entry.file_type().is_file() && !entry.file_name().to_string_lossy().starts_with('.') {
            let key = entry
                .path()
                .strip_prefix(root)
                .expect("under root")
                .to_string_lossy()
                .into_owned();
            let bytes = match std::fs::read(entry.path()) {
                Ok(b) => b,
                // A temp file renamed away between the walk and the read.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => panic!("read object {key}: {e}"),
            };
            out.push((key.clone(), decode(&key, &bytes)));
        }
    }
    out
}

/// Every object under `prefix` in a bucket: (key without prefix, decoded text).
pub async fn s3_objects(
    s3: &aws_sdk_s3::Client,
    bucket: &str,
    prefix: &str,
) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut pages = s3
        .list_objects_v2()
        .bucket(bucket)
        .prefix(prefix)
        .into_paginator()
        .send();
    while let Some(page) = pages.next().await {
        for obj in page.expect("list objects").contents() {
            let key = obj.key().expect("key").to_owned();
            let body = s3
                .get_object()
                .bucket(bucket)
                .key(&key)
                .send()
                .await
                .expect("get object")
                .body
                .collect()
                .await
                .expect("read body")
                .into_bytes();
            let rel = key.strip_prefix(prefix).unwrap_or(&key).to_owned();
            out.push((rel.clone(), decode(&rel, &body)));
        }
    }
    out.sort();
    out
}

/// Uploads every file under `dir` to `bucket`, keyed by its path relative to `dir`.
pub async fn upload_tree(s3: &aws_sdk_s3::Client, bucket: &str, dir: &Path) -> Vec<String> {
    let mut keys = Vec::new();
    for entry in walkdir::WalkDir::new(dir).sort_by_file_name() {
        let entry = entry.expect("walk");
        if !entry.file_type().is_file() {
            continue;
        }
        let key = entry
            .path()
            .strip_prefix(dir)
            .expect("under dir")
            .to_string_lossy()
            .into_owned();
        let body = std::fs::read(entry.path()).expect("read");
        s3.put_object()
            .bucket(bucket)
            .key(&key)
            .body(body.into())
            .send()
            .await
            .expect("upload");
        keys.push(key);
    }
    keys
}

/// A plain HTTP/1.0 GET on loopback: (status, body).
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::Write;
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).ok()?;
    let status = resp.split_whitespace().nth(1)?.parse().ok()?;
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Some((status, body))
}

/// Waits for `cond`, polling, up to `secs`.
pub async fn eventually<F, Fut>(secs: u64, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !cond().await {
        assert!(
            Instant::now() < deadline,
            "timed out after {secs}s waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
