//! Files that are swapped while the process runs (GeoIP databases, transform modules,
//! enrichment tables): what a file or S3 object looked like when last read, reading it again
//! only when that moved, and a thread that checks on an interval.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

/// A file's modification time and length: when either moves, the file is read again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
}

/// The file's stamp now, None when it cannot be read.
pub fn stamp(path: &Path) -> Option<Stamp> {
    let m = std::fs::metadata(path).ok()?;
    Some(Stamp {
        modified: m.modified().ok(),
        len: m.len(),
    })
}

/// Where a swappable file comes from: a local path or an `s3://bucket/key` object.
pub enum Source {
    File(PathBuf),
    S3 {
        client: aws_sdk_s3::Client,
        bucket: String,
        key: String,
    },
}

/// What a source looked like when last read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Version {
    Unknown,
    File(Option<Stamp>),
    ETag(Option<String>),
}

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("{size} bytes, over max_bytes = {max}; not read")]
    TooLarge { size: u64, max: u64 },
    #[error("{0}")]
    Failed(String),
}

/// `(bucket, key)` of an `s3://bucket/key` location; None for anything else.
pub fn s3_location(location: &str) -> Option<(&str, &str)> {
    let rest = location.strip_prefix("s3://")?;
    let (bucket, key) = rest.split_once('/')?;
    (!bucket.is_empty() && !key.is_empty()).then_some((bucket, key))
}

/// The S3 client settings of a source (unused for a local path).
#[derive(Debug, Clone, Copy, Default)]
pub struct S3Settings<'a> {
    pub region: Option<&'a str>,
    pub endpoint_url: Option<&'a str>,
    pub force_path_style: bool,
}

impl Source {
    /// The source for `location`: an S3 object for `s3://bucket/key`, else a local path.
    pub async fn open(location: &str, s3: S3Settings<'_>) -> Source {
        match s3_location(location) {
            Some((bucket, key)) => Source::S3 {
                client: crate::pipeline::s3_client(s3.region, s3.endpoint_url, s3.force_path_style)
                    .await,
                bucket: bucket.to_owned(),
                key: key.to_owned(),
            },
            None => Source::File(PathBuf::from(location)),
        }
    }

    pub fn is_s3(&self) -> bool {
        matches!(self, Source::S3 { .. })
    }

    /// The bytes and version, or None when the version is still `known` (an S3 object is
    /// checked with a HEAD first). Over `max` bytes is refused unread when the size is known up
    /// front, and refused when a file grows past it while read.
    pub async fn read(
        &self,
        known: &Version,
        max: u64,
    ) -> Result<Option<(Vec<u8>, Version)>, ReadError> {
        match self {
            Source::File(path) => {
                let now = Version::File(stamp(path));
                if *known == now {
                    return Ok(None);
                }
                Ok(Some((read_file(path, max)?, now)))
            }
            Source::S3 {
                client,
                bucket,
                key,
            } => {
                let failed = |e: &dyn std::fmt::Display| ReadError::Failed(e.to_string());
                if let Version::ETag(Some(etag)) = known {
                    let head = client.head_object().bucket(bucket).key(key).send().await;
                    let head =
                        head.map_err(|e| failed(&aws_sdk_s3::error::DisplayErrorContext(e)))?;
                    if head.e_tag() == Some(etag.as_str()) {
                        return Ok(None);
                    }
                }
                let resp = client.get_object().bucket(bucket).key(key).send().await;
                let resp = resp.map_err(|e| failed(&aws_sdk_s3::error::DisplayErrorContext(e)))?;
                if let Some(size) = resp.content_length().and_then(|n| u64::try_from(n).ok())
                    && size > max
                {
                    return Err(ReadError::TooLarge { size, max });
                }
                let etag = resp.e_tag().map(str::to_owned);
                let body = resp.body.collect().await.map_err(|e| failed(&e))?;
                let bytes = body.into_bytes().to_vec();
                if bytes.len() as u64 > max {
                    return Err(ReadError::TooLarge {
                        size: bytes.len() as u64,
                        max,
                    });
                }
                Ok(Some((bytes, Version::ETag(etag))))
            }
        }
    }

    /// [`Source::read`] from a plain thread: a file without any runtime (it works after the
    /// runtime is gone too), an S3 object on `runtime`. Never call it from async code.
    pub fn read_blocking(
        &self,
        runtime: Option<&tokio::runtime::Handle>,
        known: &Version,
        max: u64,
    ) -> Result<Option<(Vec<u8>, Version)>, ReadError> {
        match (self, runtime) {
            (Source::S3 { .. }, Some(rt)) => rt.block_on(self.read(known, max)),
            (Source::S3 { .. }, None) => Err(ReadError::Failed(
                "an S3 source needs the runtime, which is gone".into(),
            )),
            (Source::File(_), _) => poll_ready(self.read(known, max)),
        }
    }
}

/// The file's bytes, refused unread when its size is over `max` and cut at one byte over it
/// when it grows while read.
fn read_file(path: &Path, max: u64) -> Result<Vec<u8>, ReadError> {
    use std::io::Read;
    let failed = |e: std::io::Error| ReadError::Failed(e.to_string());
    let file = std::fs::File::open(path).map_err(failed)?;
    let size = file.metadata().map(|m| m.len()).unwrap_or(0);
    if size > max {
        return Err(ReadError::TooLarge { size, max });
    }
    let mut bytes = Vec::new();
    file.take(max.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(failed)?;
    if bytes.len() as u64 > max {
        return Err(ReadError::TooLarge {
            size: bytes.len() as u64,
            max,
        });
    }
    Ok(bytes)
}

/// Runs a future that never waits (a file read) to completion on this thread.
pub fn poll_ready<F: std::future::Future>(f: F) -> F::Output {
    use std::task::{Context, Poll, Waker};
    let mut f = std::pin::pin!(f);
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::yield_now();
    }
}

/// Calls `check` on `target` every `interval` until `target` is dropped. Returns the spawn
/// error, if the thread could not be started.
pub fn poll<T: Send + Sync + 'static>(
    name: &str,
    target: &Arc<T>,
    interval: Duration,
    check: fn(&T),
) -> std::io::Result<()> {
    let weak: Weak<T> = Arc::downgrade(target);
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            loop {
                std::thread::sleep(interval);
                match weak.upgrade() {
                    Some(t) => check(&t),
                    None => break,
                }
            }
        })
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rewritten_file_gets_a_new_stamp() {
        let p = std::env::temp_dir().join(format!("trailhose-stamp-{}", std::process::id()));
        std::fs::write(&p, b"one").unwrap();
        let a = stamp(&p);
        std::fs::write(&p, b"three").unwrap();
        assert_ne!(stamp(&p), a);
        std::fs::remove_file(&p).unwrap();
        assert_eq!(stamp(&p), None);
    }
}
