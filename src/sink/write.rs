//! Write: sealed batches become objects in a local directory or on S3.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{
    CompletedMultipartUpload, CompletedPart, ServerSideEncryption, StorageClass,
};
use bytes::{Bytes, BytesMut};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;

use super::batch::{Kind, Sealed};
use super::kinesis::{ForwardTo, Forwarder};
use crate::clock::Utc;
use crate::metrics::{
    self, KinesisSinkFailed, MultipartAbandoned, MultipartAbortFailed, ObjectWriteFailed,
    ObjectWritten,
};
use crate::retry::Backoff;

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("writing {path}: {source}")]
    Local {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("putting s3://{bucket}/{key}: {message}")]
    S3 {
        bucket: String,
        key: String,
        message: String,
        retryable: bool,
    },
    #[error("object {0}: a part could not be compressed or converted (or the encoder stopped)")]
    PartLost(String),
    #[error("written, but not to the Kinesis output: {0}")]
    Forward(String),
}

/// S3 output settings beyond the bucket and prefix.
#[derive(Debug, Clone)]
pub struct S3Options {
    pub sse_kms_key_id: Option<String>,
    pub storage_class: Option<StorageClass>,
    pub multipart_threshold: u64,
    pub part_size: u64,
    /// `output.s3.attempt_timeout_secs`: an attempt's time beyond what its body takes.
    pub attempt_timeout: std::time::Duration,
}

/// The slowest a body may go up and still count as progress: an attempt may take
/// `attempt_timeout` plus its size at this rate (64 MiB: 256 s more).
const SLOWEST_UPLOAD_BYTES_PER_SEC: u64 = 256 << 10;

/// One request's timeouts: its attempt bounded by `base` plus its body at the slowest rate,
/// so a large PUT on a slow link is not cut off on every attempt.
fn upload_timeouts(base: std::time::Duration, body: usize) -> aws_sdk_s3::config::Builder {
    let body = u64::try_from(body).unwrap_or(u64::MAX);
    let extra = std::time::Duration::from_secs(body / SLOWEST_UPLOAD_BYTES_PER_SEC);
    aws_sdk_s3::config::Builder::default()
        .timeout_config(crate::aws::timeouts(base.saturating_add(extra)))
}

pub enum Store {
    Local {
        root: PathBuf,
    },
    S3 {
        client: aws_sdk_s3::Client,
        bucket: String,
        /// Empty or ending in `/`.
        prefix: String,
        options: S3Options,
    },
}

impl Store {
    /// Where a key lands, for logs and summaries.
    pub fn describe(&self, key: &str) -> String {
        match self {
            Store::Local { root } => root.join(key).display().to_string(),
            Store::S3 { bucket, prefix, .. } => format!("s3://{bucket}/{prefix}{key}"),
        }
    }

    /// Fails early with a clear message when the output cannot be written at all.
    pub async fn check(&self) -> Result<(), WriteError> {
        match self {
            Store::Local { root } => {
                let root = root.clone();
                tokio::task::spawn_blocking(move || {
                    create_root(&root, &SYNCED)?;
                    let probe = root.join(format!(".trailhose-probe-{}", uuid::Uuid::now_v7()));
                    std::fs::write(&probe, b"")?;
                    std::fs::remove_file(&probe)
                })
                .await
                .map_err(std::io::Error::other)
                .and_then(|r| r)
                .map_err(|source| WriteError::Local {
                    path: self.describe(""),
                    source,
                })
            }
            Store::S3 { client, bucket, .. } => client
                .head_bucket()
                .bucket(bucket)
                .send()
                .await
                .map(|_| ())
                .map_err(|e| WriteError::S3 {
                    bucket: bucket.clone(),
                    key: String::new(),
                    message: format!("the output bucket is not reachable: {}", sdk_message(&e)),
                    retryable: false,
                }),
        }
    }

    /// Every key under `prefix` (relative to the output root), e.g. backfill markers.
    pub async fn list(&self, prefix: &str) -> Result<Vec<String>, WriteError> {
        match self {
            Store::Local { root } => {
                let root = root.clone();
                let dir = root.join(prefix);
                let walked = tokio::task::spawn_blocking(move || {
                    let mut out = Vec::new();
                    if dir.exists() {
                        for entry in walkdir::WalkDir::new(&dir) {
                            let entry = entry.map_err(std::io::Error::other)?;
                            if entry.file_type().is_file()
                                && let Ok(rel) = entry.path().strip_prefix(&root)
                            {
                                out.push(rel.to_string_lossy().into_owned());
                            }
                        }
                    }
                    Ok(out)
                })
                .await
                .map_err(std::io::Error::other)
                .and_then(|r| r);
                walked.map_err(|source| WriteError::Local {
                    path: self.describe(prefix),
                    source,
                })
            }
            Store::S3 {
                client,
                bucket,
                prefix: root,
                ..
            } => {
                let full = format!("{root}{prefix}");
                let mut out = Vec::new();
                let mut pages = client
                    .list_objects_v2()
                    .bucket(bucket)
                    .prefix(&full)
                    .into_paginator()
                    .send();
                while let Some(page) = pages.next().await {
                    let page = page.map_err(|e| {
                        let (message, retryable) = failure(&e);
                        WriteError::S3 {
                            bucket: bucket.clone(),
                            key: full.clone(),
                            message,
                            retryable,
                        }
                    })?;
                    for obj in page.contents() {
                        if let Some(k) = obj.key().and_then(|k| k.strip_prefix(root.as_str())) {
                            out.push(k.to_owned());
                        }
                    }
                }
                Ok(out)
            }
        }
    }

    /// Reads one whole object (`trailhose query`).
    pub async fn get(&self, key: &str) -> Result<Bytes, WriteError> {
        match self {
            Store::Local { root } => {
                let path = root.join(key);
                tokio::fs::read(&path)
                    .await
                    .map(Bytes::from)
                    .map_err(|source| WriteError::Local {
                        path: path.display().to_string(),
                        source,
                    })
            }
            Store::S3 {
                client,
                bucket,
                prefix,
                ..
            } => {
                let full = format!("{prefix}{key}");
                let fail = |message: String, retryable: bool| WriteError::S3 {
                    bucket: bucket.clone(),
                    key: full.clone(),
                    message,
                    retryable,
                };
                let got = client
                    .get_object()
                    .bucket(bucket)
                    .key(&full)
                    .send()
                    .await
                    .map_err(|e| {
                        let (m, r) = failure(&e);
                        fail(m, r)
                    })?;
                got.body
                    .collect()
                    .await
                    .map(|b| b.into_bytes())
                    .map_err(|e| fail(e.to_string(), true))
            }
        }
    }

    /// Writes one whole object durably: a local file is synced, renamed into place and its
    /// directory synced; an S3 object exists once the call returns.
    pub async fn put(&self, key: &str, body: Bytes, content_type: &str) -> Result<(), WriteError> {
        match self {
            Store::Local { root } => {
                let path = root.join(key);
                let root = root.clone();
                tokio::task::spawn_blocking(move || {
                    write_local(&root, &path, &body).map_err(|e| (path, e))
                })
                .await
                .map_err(|e| WriteError::Local {
                    path: key.to_owned(),
                    source: std::io::Error::other(e),
                })?
                .map_err(|(path, source)| WriteError::Local {
                    path: path.display().to_string(),
                    source,
                })
            }
            Store::S3 {
                client,
                bucket,
                prefix,
                options,
            } => {
                let full = format!("{prefix}{key}");
                let res = if body.len() as u64 >= options.multipart_threshold {
                    put_multipart(client, bucket, &full, body, content_type, options).await
                } else {
                    put_single(client, bucket, &full, body, content_type, options).await
                };
                res.map_err(|(message, retryable)| WriteError::S3 {
                    bucket: bucket.clone(),
                    key: full,
                    message,
                    retryable,
                })
            }
        }
    }
}

fn write_local(root: &Path, path: &Path, body: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    make_path(root, dir, &SYNCED)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // A dot name is skipped by readers (Hive, Athena, Spark) until the rename makes it whole.
    let tmp = dir.join(format!(".{name}.tmp"));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(body)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result?;
    // The rename lives in the directory: until the directory is synced, a crash may lose the
    // name (and so the object) after its messages were acknowledged.
    sync_dir(dir)
}

/// Directories under an output root whose own entries this process has synced. Forgotten
/// wholesale past `SYNCED_MAX` (partition directories accrue by the hour): a forgotten one
/// costs one more sync.
const SYNCED_MAX: usize = 100_000;
static SYNCED: std::sync::LazyLock<std::sync::Mutex<std::collections::HashSet<PathBuf>>> =
    std::sync::LazyLock::new(Default::default);

/// Creates the output root if it is missing, syncing the parent of every directory made (the
/// root's own path is as much a part of every object as the partitions below it), and
/// remembers them as synced.
fn create_root(
    root: &Path,
    synced: &std::sync::Mutex<std::collections::HashSet<PathBuf>>,
) -> std::io::Result<usize> {
    let missing: Vec<PathBuf> = root
        .ancestors()
        .take_while(|d| !d.as_os_str().is_empty() && !d.is_dir())
        .map(Path::to_path_buf)
        .collect();
    std::fs::create_dir_all(root)?;
    for made in missing.iter().rev() {
        if let Some(parent) = made.parent().filter(|p| !p.as_os_str().is_empty()) {
            sync_dir(parent)?;
        }
        if let Ok(mut s) = synced.lock() {
            s.insert(made.clone());
        }
    }
    Ok(missing.len())
}

/// Creates `dir` if it is missing and makes its path durable (`sync_path`). A missing
/// directory may have been synced before and then deleted (an operator clearing a partition):
/// what this process remembers of it and of its missing parents is forgotten before they are
/// made again, so the new entries are synced too.
fn make_path(
    root: &Path,
    dir: &Path,
    synced: &std::sync::Mutex<std::collections::HashSet<PathBuf>>,
) -> std::io::Result<usize> {
    if !dir.is_dir() {
        if let Ok(mut s) = synced.lock() {
            for gone in dir.ancestors().take_while(|d| !d.is_dir()) {
                s.remove(gone);
            }
        }
        std::fs::create_dir_all(dir)?;
    }
    sync_path(root, dir, synced)
}

/// Makes the path of `dir` below `root` durable: syncs the parent of every directory on it that
/// this process has not synced yet, top down, then remembers them. Existing is not enough: a
/// directory another worker created a moment ago may not be synced yet, and an object is only
/// as durable as its path. Returns how many directories were synced (tests).
fn sync_path(
    root: &Path,
    dir: &Path,
    synced: &std::sync::Mutex<std::collections::HashSet<PathBuf>>,
) -> std::io::Result<usize> {
    let known = |d: &Path| synced.lock().map(|s| s.contains(d)).unwrap_or(false);
    if known(dir) || !dir.starts_with(root) {
        return Ok(0);
    }
    // The root itself was there (or made) at start-up; its entry is the operator's.
    let todo: Vec<&Path> = dir
        .ancestors()
        .take_while(|d| *d != root && !known(d))
        .collect();
    for d in todo.iter().rev() {
        if let Some(parent) = d.parent() {
            sync_dir(parent)?;
        }
        if let Ok(mut s) = synced.lock() {
            if s.len() >= SYNCED_MAX {
                s.clear();
            }
            s.insert(d.to_path_buf());
        }
    }
    Ok(todo.len())
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// A one-line description of an SDK error: the service's code and message when it sent one,
/// else the error chain, cut short (an unparsable response would otherwise be dumped whole).
/// The SDK never puts credentials in errors.
pub fn sdk_message<E>(e: &aws_sdk_s3::error::SdkError<E>) -> String
where
    E: std::error::Error + aws_sdk_s3::error::ProvideErrorMetadata + 'static,
{
    use aws_sdk_s3::error::ProvideErrorMetadata;
    let status = e.raw_response().map(|r| r.status().as_u16());
    match (e.code(), status) {
        (Some(code), Some(status)) => {
            format!("{code} (HTTP {status}): {}", e.message().unwrap_or(""))
        }
        (Some(code), None) => format!("{code}: {}", e.message().unwrap_or("")),
        (None, Some(status)) => format!(
            "HTTP {status}: {}",
            short(&aws_sdk_s3::error::DisplayErrorContext(e).to_string())
        ),
        (None, None) => short(&aws_sdk_s3::error::DisplayErrorContext(e).to_string()),
    }
}

fn short(s: &str) -> String {
    match s.char_indices().nth(300) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

async fn put_single(
    client: &aws_sdk_s3::Client,
    bucket: &str,
    key: &str,
    body: Bytes,
    content_type: &str,
    o: &S3Options,
) -> Result<(), (String, bool)> {
    let len = body.len();
    let mut req = client
        .put_object()
        .bucket(bucket)
        .key(key)
        .content_type(content_type)
        .body(ByteStream::from(body));
    if let Some(kms) = &o.sse_kms_key_id {
        req = req
            .server_side_encryption(ServerSideEncryption::AwsKms)
            .ssekms_key_id(kms);
    }
    if let Some(class) = &o.storage_class {
        req = req.storage_class(class.clone());
    }
    req.customize()
        .config_override(upload_timeouts(o.attempt_timeout, len))
        .send()
        .await
        .map(|_| ())
        .map_err(|e| failure(&e))
}

/// The message and whether asking again may help: throttling, 5xx and transport failures may
/// pass; a missing bucket or denied access will not.
pub fn failure<E>(e: &aws_sdk_s3::error::SdkError<E>) -> (String, bool)
where
    E: std::error::Error + aws_sdk_s3::error::ProvideErrorMetadata + 'static,
{
    let status = e.raw_response().map(|r| r.status().as_u16());
    (
        sdk_message(e),
        !matches!(status, Some(400..=499)) || status == Some(429),
    )
}

async fn put_multipart(
    client: &aws_sdk_s3::Client,
    bucket: &str,
    key: &str,
    body: Bytes,
    content_type: &str,
    o: &S3Options,
) -> Result<(), (String, bool)> {
    let mut req = client
        .create_multipart_upload()
        .bucket(bucket)
        .key(key)
        .content_type(content_type);
    if let Some(kms) = &o.sse_kms_key_id {
        req = req
            .server_side_encryption(ServerSideEncryption::AwsKms)
            .ssekms_key_id(kms);
    }
    if let Some(class) = &o.storage_class {
        req = req.storage_class(class.clone());
    }
    let created = req.send().await.map_err(|e| failure(&e))?;
    let upload_id = created
        .upload_id()
        .ok_or_else(|| ("S3 returned no upload id".to_owned(), true))?
        .to_owned();
    let mut open = OpenUpload::new(client, bucket, key, &upload_id);
    let result = async {
        let mut parts = Vec::new();
        let size = o.part_size.max(5 << 20) as usize;
        for (i, chunk) in body.chunks(size).enumerate() {
            let n = i as i32 + 1;
            let part = client
                .upload_part()
                .bucket(bucket)
                .key(key)
                .upload_id(&upload_id)
                .part_number(n)
                .body(ByteStream::from(body.slice_ref(chunk)))
                .customize()
                .config_override(upload_timeouts(o.attempt_timeout, chunk.len()))
                .send()
                .await
                .map_err(|e| failure(&e))?;
            parts.push(
                CompletedPart::builder()
                    .part_number(n)
                    .set_e_tag(part.e_tag().map(str::to_owned))
                    .build(),
            );
        }
        client
            .complete_multipart_upload()
            .bucket(bucket)
            .key(key)
            .upload_id(&upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            )
            .send()
            .await
            .map_err(|e| failure(&e))?;
        Ok::<(), (String, bool)>(())
    }
    .await;
    if result.is_err() {
        abort(client, bucket, key, &upload_id).await;
    }
    // After the abort: cut off during it, the guard asks again.
    open.settled();
    result
}

/// Aborts an upload that failed; reports one that cannot be aborted (its parts stay).
async fn abort(client: &aws_sdk_s3::Client, bucket: &str, key: &str, upload_id: &str) {
    if let Err(e) = client
        .abort_multipart_upload()
        .bucket(bucket)
        .key(key)
        .upload_id(upload_id)
        .send()
        .await
        // Gone: aborted already, or completed (its Complete answer lost, the SDK's retry
        // answered NoSuchUpload); either way no parts are left to report.
        && !e
            .as_service_error()
            .is_some_and(|s| s.is_no_such_upload())
    {
        metrics::emit(MultipartAbortFailed {
            bucket,
            key,
            upload_id,
            error: &sdk_message(&e),
        });
    }
}

/// Uploads begun and not yet settled, and the aborts asked for uploads dropped mid-way.
static OPEN_UPLOADS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
type Abort = (tokio::task::JoinHandle<()>, [String; 3]);
static ABANDONED: std::sync::Mutex<Vec<Abort>> = std::sync::Mutex::new(Vec::new());

/// A multipart upload between its creation and its completion or abort. Dropped before that
/// (the shutdown's grace period ended mid-upload), it asks S3 to abort it in the background,
/// so its parts are not left in the bucket; [`settle_abandoned`] waits for those asks.
struct OpenUpload {
    abort: Option<(aws_sdk_s3::Client, String, String, String)>,
}

impl OpenUpload {
    fn new(client: &aws_sdk_s3::Client, bucket: &str, key: &str, upload_id: &str) -> OpenUpload {
        OPEN_UPLOADS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let ids = (bucket.to_owned(), key.to_owned(), upload_id.to_owned());
        OpenUpload {
            abort: Some((client.clone(), ids.0, ids.1, ids.2)),
        }
    }

    /// Completed or failed: the caller aborts a failed one itself.
    fn settled(&mut self) {
        if self.abort.take().is_some() {
            OPEN_UPLOADS.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

impl Drop for OpenUpload {
    fn drop(&mut self) {
        let Some((client, bucket, key, upload_id)) = self.abort.take() else {
            return;
        };
        metrics::emit(MultipartAbandoned {
            bucket: &bucket,
            key: &key,
            upload_id: &upload_id,
        });
        let ids = [bucket.clone(), key.clone(), upload_id.clone()];
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                let task = runtime.spawn(async move {
                    abort(&client, &bucket, &key, &upload_id).await;
                });
                let mut asked = ABANDONED.lock().unwrap_or_else(|e| e.into_inner());
                asked.retain(|(t, _)| !t.is_finished());
                asked.push((task, ids));
            }
            Err(_) => unanswered(&ids, "no runtime to ask S3 from"),
        }
        OPEN_UPLOADS.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// An abort asked for and not answered: its parts may stay, so it counts as a failed abort.
fn unanswered([bucket, key, upload_id]: &[String; 3], why: &str) {
    metrics::emit(MultipartAbortFailed {
        bucket,
        key,
        upload_id,
        error: why,
    });
}

/// After a shutdown cut uploads off: waits, up to `within`, until every cancelled upload has
/// been dropped and its abort has been answered; an abort still unanswered then is reported.
/// Uploads are cancelled as their tasks are dropped, which the runtime does after the cut,
/// hence the wait for the open count.
pub async fn settle_abandoned(within: std::time::Duration) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let asked = std::mem::take(&mut *ABANDONED.lock().unwrap_or_else(|e| e.into_inner()));
        let mut late = Vec::new();
        for (task, ids) in asked {
            if task.is_finished() {
                continue;
            }
            match tokio::time::timeout_at(deadline, task).await {
                Ok(_) => {}
                Err(_) => late.push(ids),
            }
        }
        let past = tokio::time::Instant::now() >= deadline;
        if past {
            let more = std::mem::take(&mut *ABANDONED.lock().unwrap_or_else(|e| e.into_inner()));
            late.extend(
                more.into_iter()
                    .filter(|(t, _)| !t.is_finished())
                    .map(|(_, ids)| ids),
            );
        }
        for ids in &late {
            unanswered(ids, "the abort was not answered before the process exited");
        }
        let open = OPEN_UPLOADS.load(std::sync::atomic::Ordering::SeqCst);
        let none_asked = ABANDONED.lock().map(|a| a.is_empty()).unwrap_or(true);
        if (open == 0 && none_asked) || past || !late.is_empty() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// A unique object name that sorts by time: the write time, then a time-ordered UUID so names
/// from many workers and runs never collide.
/// `extension` names the format and compression (`.json.gz`, `.parquet`).
pub fn object_name_with(now: Utc, extension: &str) -> String {
    format!("{}-{}{}", now.compact(), uuid::Uuid::now_v7(), extension)
}

/// What the uploader did, for the run summary.
#[derive(Debug, Default, Clone)]
pub struct Written {
    pub objects: u64,
    pub event_records: u64,
    pub error_records: u64,
    pub bytes: u64,
    pub failures: Vec<String>,
}

/// Writes sealed batches as they arrive, `concurrency` at a time, until the channel closes.
pub async fn run_uploader(
    store: Arc<Store>,
    mut rx: mpsc::Receiver<Sealed>,
    concurrency: usize,
    forward: Option<ForwardTo>,
) -> Written {
    let forwarder = match forward {
        Some(f) => Some(Arc::new(f.open().await)),
        None => None,
    };
    let permits = Arc::new(Semaphore::new(concurrency.max(1)));
    let mut tasks = JoinSet::new();
    let mut written = Written::default();
    let absorb = |w: &mut Written, r: Result<(Kind, u64, u64), String>| match r {
        Ok((kind, records, bytes)) => {
            w.objects += 1;
            w.bytes += bytes;
            match kind {
                Kind::Events => w.event_records += records,
                Kind::Errors => w.error_records += records,
            }
        }
        Err(e) => w.failures.push(e),
    };
    while let Some(sealed) = rx.recv().await {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            break;
        };
        let store = store.clone();
        let forwarder = forwarder.clone();
        tasks.spawn(async move {
            let r = write_sealed(&store, sealed, forwarder.as_deref()).await;
            drop(permit);
            r
        });
        while let Some(done) = tasks.try_join_next() {
            absorb(
                &mut written,
                done.map_err(|e| e.to_string()).and_then(|r| r),
            );
        }
    }
    while let Some(done) = tasks.join_next().await {
        absorb(
            &mut written,
            done.map_err(|e| e.to_string()).and_then(|r| r),
        );
    }
    written
}

async fn write_sealed(
    store: &Store,
    sealed: Sealed,
    forwarder: Option<&Forwarder>,
) -> Result<(Kind, u64, u64), String> {
    let key = format!(
        "{}{}",
        sealed.partition,
        object_name_with(Utc::now(), sealed.extension)
    );
    let lines = sealed.lines;
    let mut body = BytesMut::new();
    for part in sealed.parts {
        match part.bytes().await {
            Some(b) => body.extend_from_slice(&b),
            None => {
                let e = WriteError::PartLost(store.describe(&key));
                metrics::emit(ObjectWriteFailed {
                    target: &store.describe(&key),
                    error: &e,
                });
                return Err(e.to_string());
            }
        }
    }
    let body = body.freeze();
    let len = body.len() as u64;
    let started = Instant::now();
    // With `output.kinesis.write_objects = false`, events go to the stream only.
    let objects = !(sealed.kind == Kind::Events && forwarder.is_some_and(|f| !f.write_objects));
    let put = if objects {
        Backoff::default()
            .run(
                || store.put(&key, body.clone(), sealed.content_type),
                |e| {
                    matches!(
                        e,
                        WriteError::S3 {
                            retryable: true,
                            ..
                        }
                    )
                },
            )
            .await
    } else {
        Ok(())
    };
    // With a Kinesis output, the batch is acknowledged once its events are there too.
    let put = match (put, forwarder) {
        (Ok(()), Some(f)) if sealed.kind == Kind::Events => {
            f.forward(store, lines, body.clone()).await.map_err(|e| {
                metrics::emit(KinesisSinkFailed {
                    stream: &f.sink.stream,
                    error: &e,
                });
                WriteError::Forward(e)
            })
        }
        (put, _) => put,
    };
    match put {
        Ok(()) if !objects => {
            sealed.holds.commit();
            Ok((sealed.kind, sealed.records, 0))
        }
        Ok(()) => {
            sealed.holds.commit();
            metrics::emit(ObjectWritten {
                target: &store.describe(&key),
                kind: sealed.kind.as_str(),
                records: sealed.records,
                uncompressed_bytes: sealed.bytes,
                bytes: len,
                elapsed: started.elapsed(),
            });
            Ok((sealed.kind, sealed.records, len))
        }
        // Reported as KinesisSinkFailed; the holds drop uncommitted.
        Err(e @ WriteError::Forward(_)) => Err(e.to_string()),
        Err(e) => {
            metrics::emit(ObjectWriteFailed {
                target: &store.describe(&key),
                error: &e,
            });
            Err(e.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_directory_on_an_objects_path_is_synced_once_even_one_another_worker_made() {
        let root = std::env::temp_dir().join(format!("trailhose-sync-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir_all(&root).expect("root");
        let synced = std::sync::Mutex::new(std::collections::HashSet::new());
        // Another worker has just created the partition and not synced it yet: that it
        // exists proves nothing.
        let dir = root.join("ct/2024/03/18");
        std::fs::create_dir_all(&dir).expect("made elsewhere");
        assert_eq!(sync_path(&root, &dir, &synced).expect("sync"), 4);
        assert_eq!(sync_path(&root, &dir, &synced).expect("sync"), 0, "once");
        let next = root.join("ct/2024/03/19");
        std::fs::create_dir_all(&next).expect("next day");
        assert_eq!(sync_path(&root, &next, &synced).expect("sync"), 1);
        assert_eq!(sync_path(&root, &root, &synced).expect("sync"), 0);

        // A partition deleted and made again is a new entry in its parent: synced again.
        assert_eq!(make_path(&root, &dir, &synced).expect("sync"), 0, "known");
        std::fs::remove_dir_all(root.join("ct/2024")).expect("cleared");
        assert_eq!(
            make_path(&root, &dir, &synced).expect("sync"),
            3,
            "2024, 03 and 18 are new entries"
        );
        assert!(dir.is_dir());

        write_local(&root, &root.join("ct/2024/03/20/a.json"), b"{}").expect("write");
        assert!(
            SYNCED
                .lock()
                .expect("lock")
                .contains(&root.join("ct/2024/03/20"))
        );
        let _ = std::fs::remove_dir_all(&root);
    }

    /// An output root that does not exist yet is made at start-up (`check`): its new
    /// directories are synced into their parents too, not only the partitions below it.
    #[tokio::test]
    async fn an_output_root_made_at_start_up_is_synced_into_its_parents() {
        let base = std::env::temp_dir().join(format!("trailhose-root-{}", uuid::Uuid::now_v7()));
        let root = base.join("data/out");
        let store = Store::Local { root: root.clone() };
        store.check().await.expect("check");
        assert!(root.is_dir());
        {
            let synced = SYNCED.lock().expect("lock");
            for made in [&base, &base.join("data"), &root] {
                assert!(synced.contains(made), "{} synced", made.display());
            }
        }
        let again = std::sync::Mutex::new(std::collections::HashSet::new());
        assert_eq!(create_root(&root, &again).expect("again"), 0, "made once");
        let _ = std::fs::remove_dir_all(&base);
    }
}
