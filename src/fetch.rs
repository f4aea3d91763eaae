//! Turns the bytes of one delivery file into a decoded stream: gzip is detected by its magic
//! bytes, never by the file name.

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Read};
use std::time::Instant;

use bytes::Bytes;
use flate2::bufread::MultiGzDecoder;

use crate::config::BucketConfig;
use crate::metrics::{self, S3Request};
use crate::retry::Backoff;
use crate::source::notification::{Allowlist, ObjectRef};

/// How the file's bytes were encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Gzip,
    Plain,
    /// No bytes at all.
    Empty,
}

const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// True when a name says gzip (CloudTrail names its files `….json.gz`).
pub fn named_gzip(name: &str) -> bool {
    name.ends_with(".gz")
}

/// Wraps `source` in a decoder chosen by its first bytes. Errors of the source itself are
/// re-kinded as `Other` so that `cloudtrail::read_error` tells them from corrupt data.
pub fn decode<'a, R: Read + 'a>(source: R) -> io::Result<(Encoding, Box<dyn Read + 'a>)> {
    let mut buffered = BufReader::with_capacity(128 * 1024, SourceReader(source));
    let head = loop {
        match buffered.fill_buf() {
            Ok(head) => break head,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    };
    if head.is_empty() {
        Ok((Encoding::Empty, Box::new(buffered)))
    } else if head.starts_with(&GZIP_MAGIC) {
        Ok((Encoding::Gzip, Box::new(MultiGzDecoder::new(buffered))))
    } else {
        Ok((Encoding::Plain, Box::new(buffered)))
    }
}

/// The stored bytes of a file went past `pipeline.max_file_bytes` while it was read (the size
/// was not declared up front, or the declaration was wrong). Carried inside an `io::Error`.
#[derive(Debug, thiserror::Error)]
#[error("the stored file is larger than {limit} bytes (pipeline.max_file_bytes)")]
pub struct StoredLimit {
    pub limit: u64,
}

/// True when a read failed because of `StoredLimit`.
pub fn is_stored_limit(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<StoredLimit>())
}

/// How far a download reads ahead of the worker splitting it. Most delivery files are smaller,
/// so they are downloaded at once as before (a connection is not held open while the file
/// waits for a worker); larger ones stream with memory bounded by this, not by their size.
pub const READ_AHEAD_BYTES: usize = 16 << 20;

enum Chunk {
    Data(Bytes),
    End,
    Failed(io::Error),
}

/// The stored bytes of one S3 object, as a blocking `Read` fed by a download task: the object
/// is never collected whole. Read it on a worker thread, never on the async runtime.
pub struct Body {
    /// The size the notification or the response declared, when either did.
    declared: Option<u64>,
    rx: Option<crossbeam_channel::Receiver<Chunk>>,
    room: Option<std::sync::Arc<tokio::sync::Semaphore>>,
    chunk: Bytes,
    /// Bytes of `chunk` still counted against the read-ahead.
    held: usize,
}

impl Body {
    /// Bytes already in memory.
    pub fn from_bytes(bytes: Bytes) -> Body {
        Body {
            declared: Some(bytes.len() as u64),
            rx: None,
            room: None,
            chunk: bytes,
            held: 0,
        }
    }

    /// An object not downloaded because its declared size is over the limit: no bytes.
    fn refused(declared: u64) -> Body {
        let mut body = Body::from_bytes(Bytes::new());
        body.declared = Some(declared);
        body
    }

    /// The size the notification or the response declared (the worker refuses a file whose
    /// declared size is over `pipeline.max_file_bytes` before reading any of it).
    pub fn declared_size(&self) -> Option<u64> {
        self.declared
    }

    /// Streams `stream` through a download task on the current runtime.
    fn stream(declared: Option<u64>, mut stream: aws_sdk_s3::primitives::ByteStream) -> Body {
        let (tx, rx) = crossbeam_channel::unbounded();
        let room = std::sync::Arc::new(tokio::sync::Semaphore::new(READ_AHEAD_BYTES));
        let task_room = room.clone();
        tokio::spawn(async move {
            let mut received = 0u64;
            loop {
                let msg = match stream.next().await {
                    Some(Ok(b)) => {
                        received += b.len() as u64;
                        let need = b.len().min(READ_AHEAD_BYTES) as u32;
                        // Waits while the worker is that far behind; gone when the body is.
                        match task_room.acquire_many(need).await {
                            Ok(p) => p.forget(),
                            Err(_) => return,
                        }
                        Chunk::Data(b)
                    }
                    Some(Err(e)) => {
                        Chunk::Failed(io::Error::other(format!("reading the body: {e}")))
                    }
                    None => match declared {
                        Some(n) if n != received => Chunk::Failed(io::Error::other(format!(
                            "the body ended after {received} of {n} bytes"
                        ))),
                        _ => Chunk::End,
                    },
                };
                let last = !matches!(msg, Chunk::Data(_));
                if tx.send(msg).is_err() || last {
                    return;
                }
            }
        });
        Body {
            declared,
            rx: Some(rx),
            room: Some(room),
            chunk: Bytes::new(),
            held: 0,
        }
    }

    fn release(&mut self) {
        if let Some(room) = &self.room {
            room.add_permits(std::mem::take(&mut self.held));
        }
    }
}

impl Read for Body {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.chunk.is_empty() {
            self.release();
            let Some(rx) = &self.rx else {
                return Ok(0);
            };
            match rx.recv() {
                Ok(Chunk::Data(b)) => {
                    self.held = b.len().min(READ_AHEAD_BYTES);
                    self.chunk = b;
                }
                Ok(Chunk::End) => {
                    self.rx = None;
                    return Ok(0);
                }
                Ok(Chunk::Failed(e)) => {
                    self.rx = None;
                    return Err(e);
                }
                // The download task went away without an end: not a complete file.
                Err(_) => {
                    self.rx = None;
                    return Err(io::Error::other("the download stopped before the end"));
                }
            }
        }
        let n = self.chunk.len().min(out.len());
        out[..n].copy_from_slice(&self.chunk[..n]);
        bytes::Buf::advance(&mut self.chunk, n);
        Ok(n)
    }
}

impl Drop for Body {
    fn drop(&mut self) {
        // Wakes a download task waiting for room so that it sees the channel is gone.
        if let Some(room) = &self.room {
            room.close();
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("s3://{bucket}/{key} is outside the allowed buckets and prefixes")]
    NotAllowed { bucket: String, key: String },
    #[error("fetching s3://{bucket}/{key}: {message}")]
    S3 {
        bucket: String,
        key: String,
        message: String,
        retryable: bool,
        /// S3 said the object does not exist (404 `NoSuchKey`): no retry brings it back.
        gone: bool,
    },
}

/// Reads delivery files from the allowed buckets only, each bucket with its own region and
/// optional role, separate from the credentials used for the queue and the output.
pub struct S3Fetcher {
    clients: HashMap<String, aws_sdk_s3::Client>,
    allow: Allowlist,
    backoff: Backoff,
    /// `pipeline.max_file_bytes`: an object declared larger is not downloaded.
    max_file_bytes: u64,
}

impl S3Fetcher {
    pub async fn new(buckets: &[BucketConfig]) -> S3Fetcher {
        let mut clients = HashMap::new();
        for b in buckets {
            if clients.contains_key(&b.name) {
                continue;
            }
            let client = bucket_client(b).await;
            clients.insert(b.name.clone(), client);
        }
        let allow = Allowlist::new(buckets.iter().map(|b| (b.name.clone(), b.prefixes.clone())));
        S3Fetcher {
            clients,
            allow,
            backoff: Backoff::default(),
            max_file_bytes: u64::MAX,
        }
    }

    /// Objects whose notification declares a larger size are not requested, and a response
    /// whose Content-Length is larger is dropped before its body is read; the worker then
    /// records the file as `file_too_large`.
    pub fn with_max_file_bytes(mut self, limit: u64) -> S3Fetcher {
        self.max_file_bytes = limit;
        self
    }

    pub fn allowlist(&self) -> &Allowlist {
        &self.allow
    }

    /// The stored object as a stream. Only the request is retried here: a failure while the
    /// body is read surfaces as a source error on the worker, which has the file tried again.
    pub async fn get(&self, obj: &ObjectRef) -> Result<Body, FetchError> {
        let client = match self.clients.get(&obj.bucket) {
            Some(c) if self.allow.allows(obj) => c,
            _ => {
                return Err(FetchError::NotAllowed {
                    bucket: obj.bucket.clone(),
                    key: obj.key.clone(),
                });
            }
        };
        if let Some(size) = obj.size.filter(|&n| n > self.max_file_bytes) {
            return Ok(Body::refused(size));
        }
        let limit = self.max_file_bytes;
        self.backoff
            .run(
                || get_once(client, obj, limit),
                |e| {
                    matches!(
                        e,
                        FetchError::S3 {
                            retryable: true,
                            ..
                        }
                    )
                },
            )
            .await
    }
}

/// Lists a source bucket for a backfill, level by level.
pub struct S3Lister<'a> {
    pub fetcher: &'a S3Fetcher,
    pub bucket: &'a str,
}

impl S3Lister<'_> {
    async fn list(&self, prefix: &str, delimiter: bool) -> Result<Vec<String>, String> {
        let client = self
            .fetcher
            .clients
            .get(self.bucket)
            .ok_or_else(|| format!("bucket {} is not configured", self.bucket))?;
        let mut req = client.list_objects_v2().bucket(self.bucket).prefix(prefix);
        if delimiter {
            req = req.delimiter("/");
        }
        let mut pages = req.into_paginator().send();
        let mut out = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| crate::sink::write::failure(&e).0)?;
            if delimiter {
                out.extend(
                    page.common_prefixes()
                        .iter()
                        .filter_map(|p| p.prefix().map(str::to_owned)),
                );
            } else {
                out.extend(
                    page.contents()
                        .iter()
                        .filter_map(|o| o.key().map(str::to_owned)),
                );
            }
        }
        Ok(out)
    }
}

impl crate::source::backfill::Lister for S3Lister<'_> {
    async fn folders(&self, prefix: &str) -> Result<Vec<String>, String> {
        self.list(prefix, true).await
    }
    async fn keys(&self, prefix: &str) -> Result<Vec<String>, String> {
        self.list(prefix, false).await
    }
}

async fn get_once(
    client: &aws_sdk_s3::Client,
    obj: &ObjectRef,
    max_file_bytes: u64,
) -> Result<Body, FetchError> {
    let started = Instant::now();
    let fail = |message: String, retryable: bool, gone: bool| FetchError::S3 {
        bucket: obj.bucket.clone(),
        key: obj.key.clone(),
        message,
        retryable,
        gone,
    };
    let resp = client
        .get_object()
        .bucket(&obj.bucket)
        .key(&obj.key)
        .send()
        .await;
    metrics::emit(S3Request {
        operation: "get_object",
        ok: resp.is_ok(),
        elapsed: started.elapsed(),
    });
    let resp = resp.map_err(|e| {
        let (message, retryable) = crate::sink::write::failure(&e);
        let status = e.raw_response().map(|r| r.status().as_u16());
        let gone = is_gone(status, aws_sdk_s3::error::ProvideErrorMetadata::code(&e));
        fail(message, retryable, gone)
    })?;
    let declared = resp
        .content_length()
        .and_then(|n| u64::try_from(n).ok())
        .or(obj.size);
    match declared {
        // Dropping the response closes the connection before the body is read.
        Some(n) if n > max_file_bytes => Ok(Body::refused(n)),
        _ => Ok(Body::stream(declared, resp.body)),
    }
}

/// Whether a GET's failure means the object no longer exists. Only a 404 `NoSuchKey`: S3 reads
/// are strongly consistent, so a notified key that is missing was deleted and cannot come back.
/// A 403 is not "gone": an expired or rotated credential, a role or KMS key policy, a skewed
/// clock or an archived object (`InvalidObjectState`) all answer 403 for a file that exists and
/// can be read once fixed; nor is any other 4xx (`ExpiredToken`, a wrong-region
/// `AuthorizationHeaderMalformed`) or a 301 redirect.
pub fn is_gone(status: Option<u16>, code: Option<&str>) -> bool {
    status == Some(404) && code == Some("NoSuchKey")
}

/// Until a GET's answer begins (its headers).
const FETCH_ATTEMPT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

async fn bucket_client(b: &BucketConfig) -> aws_sdk_s3::Client {
    let mut shared = crate::aws::config(b.region.as_deref(), b.endpoint_url.as_deref()).await;
    if let Some(role) = &b.role_arn {
        // STS in the bucket's region, never at the bucket's S3 endpoint (an S3-compatible
        // store or an S3 VPC endpoint does not answer AssumeRole).
        let sts = crate::aws::config(b.region.as_deref(), None).await;
        let provider = aws_config::sts::AssumeRoleProvider::builder(role.clone())
            .session_name("trailhose")
            .configure(&sts)
            .build()
            .await;
        shared = shared
            .into_builder()
            .credentials_provider(aws_sdk_s3::config::SharedCredentialsProvider::new(provider))
            .build();
    }
    // A GET that never answers would hold its fetch slot for ever; the body, once it
    // streams, is watched by the SDK's stalled-stream protection.
    let conf = aws_sdk_s3::config::Builder::from(&shared)
        .force_path_style(b.force_path_style)
        .retry_config(aws_config::retry::RetryConfig::standard().with_max_attempts(4))
        .timeout_config(crate::aws::timeouts(FETCH_ATTEMPT_TIMEOUT))
        .build();
    aws_sdk_s3::Client::from_conf(conf)
}

struct SourceReader<R>(R);

impl<R: Read> Read for SourceReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf).map_err(|e| match e.kind() {
            io::ErrorKind::Interrupted => e,
            _ if is_stored_limit(&e) => e,
            _ => io::Error::other(format!("reading the source: {e}")),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::Compression;
    use flate2::write::GzEncoder;
    use std::io::Write;

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut enc = GzEncoder::new(Vec::new(), Compression::default());
        enc.write_all(data).unwrap();
        enc.finish().unwrap()
    }

    fn read_all(bytes: &[u8]) -> (Encoding, io::Result<Vec<u8>>) {
        let (enc, mut r) = decode(bytes).unwrap();
        let mut out = Vec::new();
        let res = r.read_to_end(&mut out).map(|_| out);
        (enc, res)
    }

    #[test]
    fn gzip_is_detected_by_magic_not_name() {
        let (enc, out) = read_all(&gzip(b"{\"Records\":[]}"));
        assert_eq!(enc, Encoding::Gzip);
        assert_eq!(out.unwrap(), b"{\"Records\":[]}");
        let (enc, out) = read_all(b"{\"Records\":[]}");
        assert_eq!(enc, Encoding::Plain);
        assert_eq!(read_all(b"").0, Encoding::Empty);
        assert_eq!(out.unwrap(), b"{\"Records\":[]}");
    }

    #[test]
    fn concatenated_gzip_members_read_as_one_stream() {
        let mut two = gzip(b"{\"Records\":");
        two.extend(gzip(b"[]}"));
        assert_eq!(read_all(&two).1.unwrap(), b"{\"Records\":[]}");
    }

    #[test]
    fn truncated_and_corrupt_gzip_are_told_apart_from_source_errors() {
        use crate::cloudtrail::{FileErrorReason, read_error};
        let whole = gzip(&b"{\"Records\":[{\"a\":1}]}".repeat(100));
        let err = read_all(&whole[..whole.len() / 2]).1.unwrap_err();
        assert_eq!(read_error(&err).reason, FileErrorReason::Truncated);
        let mut corrupt = whole.clone();
        for b in &mut corrupt[12..40] {
            *b ^= 0x5a;
        }
        let err = read_all(&corrupt).1.unwrap_err();
        assert_eq!(read_error(&err).reason, FileErrorReason::GzipCorrupt);

        struct Failing;
        impl Read for Failing {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "socket closed",
                ))
            }
        }
        let err = decode(Failing).err().unwrap();
        assert_eq!(read_error(&err).reason, FileErrorReason::Read);
    }

    #[test]
    fn a_streamed_body_reads_whole_and_a_short_one_fails_as_a_source_error() {
        use aws_sdk_s3::primitives::ByteStream;
        let rt = tokio::runtime::Runtime::new().unwrap();
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let _guard = rt.enter();
        let mut body = Body::stream(Some(data.len() as u64), ByteStream::from(data.clone()));
        let mut got = Vec::new();
        body.read_to_end(&mut got).unwrap();
        assert_eq!(got, data);

        // Fewer bytes than declared: not a complete file, so the file is tried again.
        let mut short = Body::stream(Some(10), ByteStream::from(vec![1u8; 4]));
        let err = short.read_to_end(&mut Vec::new()).unwrap_err();
        let reason = crate::cloudtrail::read_error(&err).reason;
        assert_eq!(reason, crate::cloudtrail::FileErrorReason::Read);

        // Dropped unread: the download task ends instead of waiting for room forever (it
        // lets go of its handle on the read-ahead room when it ends).
        let path = std::env::temp_dir().join(format!("trailhose-body-{}", std::process::id()));
        std::fs::write(&path, vec![0u8; READ_AHEAD_BYTES * 2]).unwrap();
        let stream = rt.block_on(
            ByteStream::read_from()
                .path(&path)
                .buffer_size(1 << 20)
                .build(),
        );
        let body = Body::stream(None, stream.unwrap());
        let room = body.room.clone().unwrap();
        // The task fills the read-ahead and waits for room (the pause lets it get there).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while room.available_permits() >= 1 << 20 {
            assert!(
                std::time::Instant::now() < deadline,
                "the task never read ahead"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
        drop(body);
        while std::sync::Arc::strong_count(&room) > 1 {
            assert!(
                std::time::Instant::now() < deadline,
                "the download task is still waiting"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(Body::refused(5).declared_size(), Some(5));
    }

    #[test]
    fn the_stored_limit_is_told_apart_from_source_errors() {
        use crate::cloudtrail::{FileErrorReason, read_error};
        let e = io::Error::other(StoredLimit { limit: 9 });
        assert_eq!(read_error(&e).reason, FileErrorReason::FileTooLarge);
        let mut r = SourceReader(LimitAfter);
        let err = r.read(&mut [0u8; 4]).unwrap_err();
        assert_eq!(read_error(&err).reason, FileErrorReason::FileTooLarge);

        struct LimitAfter;
        impl Read for LimitAfter {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::Error::other(StoredLimit { limit: 1 }))
            }
        }
    }

    #[test]
    fn names() {
        assert!(named_gzip("a/b.json.gz"));
        assert!(!named_gzip("a/b.json"));
    }
}
