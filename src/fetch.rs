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
        }
    }

    pub fn allowlist(&self) -> &Allowlist {
        &self.allow
    }

    /// The whole stored object. Compressed delivery files are small (CloudTrail caps them at a
    /// few tens of MB), and a complete download separates network failures (retried) from bad
    /// content (sent to the error output).
    pub async fn get(&self, obj: &ObjectRef) -> Result<Bytes, FetchError> {
        let client = match self.clients.get(&obj.bucket) {
            Some(c) if self.allow.allows(obj) => c,
            _ => {
                return Err(FetchError::NotAllowed {
                    bucket: obj.bucket.clone(),
                    key: obj.key.clone(),
                });
            }
        };
        self.backoff
            .run(
                || get_once(client, obj),
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

async fn get_once(client: &aws_sdk_s3::Client, obj: &ObjectRef) -> Result<Bytes, FetchError> {
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
    let body = resp
        .body
        .collect()
        .await
        .map_err(|e| fail(format!("reading the body: {e}"), true, false))?;
    Ok(body.into_bytes())
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

async fn bucket_client(b: &BucketConfig) -> aws_sdk_s3::Client {
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
    if let Some(r) = &b.region {
        loader = loader.region(aws_config::Region::new(r.clone()));
    }
    if let Some(e) = &b.endpoint_url {
        loader = loader.endpoint_url(e);
    }
    let mut shared = loader.load().await;
    if let Some(role) = &b.role_arn {
        let provider = aws_config::sts::AssumeRoleProvider::builder(role.clone())
            .session_name("trailhose")
            .configure(&shared)
            .build()
            .await;
        shared = shared
            .into_builder()
            .credentials_provider(aws_sdk_s3::config::SharedCredentialsProvider::new(provider))
            .build();
    }
    let conf = aws_sdk_s3::config::Builder::from(&shared)
        .force_path_style(b.force_path_style)
        .retry_config(aws_config::retry::RetryConfig::standard().with_max_attempts(4))
        .build();
    aws_sdk_s3::Client::from_conf(conf)
}

struct SourceReader<R>(R);

impl<R: Read> Read for SourceReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf).map_err(|e| match e.kind() {
            io::ErrorKind::Interrupted => e,
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
    fn names() {
        assert!(named_gzip("a/b.json.gz"));
        assert!(!named_gzip("a/b.json"));
    }
}
