//! Encoding: events become JSON lines (original bytes, additions spliced in), and lines are
//! compressed in independent chunks on a pool of threads. Each chunk is one gzip member or zstd
//! frame; their concatenation is one valid file for every reader (gzip, Athena, zcat), which lets
//! a fast whole-buffer compressor and every core work on one object.

use std::cell::RefCell;
use std::sync::Arc;
use std::thread;

use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender, bounded};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use super::format::Converter;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    Gzip,
    Zstd,
    /// Parquet only (inside the file).
    Snappy,
    None,
}

impl Compression {
    pub fn extension(self) -> &'static str {
        match self {
            Compression::Gzip => ".json.gz",
            Compression::Zstd => ".json.zst",
            Compression::None | Compression::Snappy => ".json",
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Compression::Gzip => "application/gzip",
            Compression::Zstd => "application/zstd",
            Compression::None | Compression::Snappy => "application/x-ndjson",
        }
    }
}

/// A compression setting that has been checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Codec {
    pub kind: Compression,
    pub level: i32,
}

/// Appends one JSON line: the event's original bytes with each addition (`"key":value`) spliced
/// in before the closing brace. `raw` is a complete JSON object as the splitter hands it on.
pub fn encode_event(out: &mut Vec<u8>, raw: &[u8], additions: &[&[u8]]) {
    let start = out.len();
    splice(out, raw, additions);
    one_line(&mut out[start..]);
    out.push(b'\n');
}

/// Appends `raw` (a JSON object) with `additions` inserted before its closing brace. Bytes that
/// are not an object (never from the splitter) are kept as they are rather than lost.
pub fn splice(out: &mut Vec<u8>, raw: &[u8], additions: &[&[u8]]) {
    let Some((&b'}', body)) = raw.split_last() else {
        out.extend_from_slice(raw);
        return;
    };
    out.extend_from_slice(body);
    let mut has_members = body
        .iter()
        .skip(1)
        .any(|b| !matches!(b, b' ' | b'\n' | b'\r' | b'\t'));
    for add in additions {
        if has_members {
            out.push(b',');
        }
        out.extend_from_slice(add);
        has_members = true;
    }
    out.push(b'}');
}

/// Keeps JSON bytes on one line. Raw CR/LF can only be insignificant whitespace in valid JSON
/// (strings must escape them), so replacing them by spaces changes no value.
fn one_line(bytes: &mut [u8]) {
    if memchr::memchr2(b'\n', b'\r', bytes).is_some() {
        for b in bytes {
            if matches!(*b, b'\n' | b'\r') {
                *b = b' ';
            }
        }
    }
}

/// One compressed piece of an object, possibly still being compressed.
#[derive(Debug)]
pub enum Part {
    Ready(Bytes),
    Pending(oneshot::Receiver<Vec<u8>>),
    /// Conversion failed (already reported).
    Lost,
}

impl Part {
    /// Waits for the compressed bytes. None if the pool went away before compressing it.
    pub async fn bytes(self) -> Option<Bytes> {
        match self {
            Part::Ready(b) => Some(b),
            Part::Pending(rx) => rx.await.ok().map(Bytes::from),
            Part::Lost => None,
        }
    }
}

struct Job {
    data: Bytes,
    done: oneshot::Sender<Vec<u8>>,
    convert: Option<Arc<Converter>>,
}

/// Handle to the compression pool. Cloning shares the pool; it stops when every handle is gone.
#[derive(Clone)]
pub struct Encoder {
    codec: Codec,
    jobs: Option<Sender<Job>>,
    /// Set for formats other than JSON lines: sealed batches are converted whole.
    convert: Option<Arc<Converter>>,
}

/// Why a chunk could not be compressed. The part is then lost: the batch is not written and
/// its notifications are delivered again (never an empty or short object).
#[derive(Debug, thiserror::Error)]
pub enum CompressError {
    #[error("gzip: {0}")]
    Gzip(String),
    #[error("zstd: {0}")]
    Zstd(String),
    /// Only from `crate::testhook` (debug builds, set by a test).
    #[error("{0}")]
    Injected(String),
}

/// Compresses a chunk, or converts a whole batch. A failure (reported here) yields nothing:
/// the part is then lost, the batch is not written and its notifications are delivered again.
fn run(codec: Codec, convert: Option<&Converter>, data: &[u8]) -> Option<Vec<u8>> {
    crate::testhook::compress(data);
    match convert {
        None => match compress(codec, data) {
            Ok(b) => Some(b),
            Err(e) => {
                crate::metrics::emit(crate::metrics::CompressFailed { error: &e });
                None
            }
        },
        Some(c) => match c.encode(codec, data) {
            Ok(b) => Some(b),
            Err(e) => {
                crate::metrics::emit(crate::metrics::ConvertFailed { error: &e });
                None
            }
        },
    }
}

/// One compression thread: a job that panics is lost (its part then fails the batch), is
/// counted, and the thread goes on with fresh compressor state.
fn compress_thread(codec: Codec, rx: Receiver<Job>) {
    for job in rx {
        let Job {
            data,
            done,
            convert,
        } = job;
        let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            run(codec, convert.as_deref(), &data)
        }));
        match ran {
            Ok(Some(out)) => {
                let _ = done.send(out);
            }
            // Dropping `done` loses the part: the batch is not written.
            Ok(None) => {}
            Err(panic) => {
                crate::metrics::emit(crate::metrics::ThreadPanicked {
                    thread: "compress",
                    source: "",
                    message: &crate::testhook::panic_message(&*panic),
                });
                reset_compressors();
            }
        }
    }
}

impl Encoder {
    /// Starts `threads` compression threads. The job queue is short so that a producer faster
    /// than the compressors waits instead of piling up uncompressed chunks in memory.
    pub fn new(codec: Codec, threads: usize) -> Encoder {
        Encoder::with_format(codec, None, threads)
    }

    /// Like `new`; with a converter, sealed batches become objects of its format.
    pub fn with_format(codec: Codec, convert: Option<Converter>, threads: usize) -> Encoder {
        let convert = convert.map(Arc::new);
        if codec.kind == Compression::None && convert.is_none() {
            return Encoder {
                codec,
                jobs: None,
                convert,
            };
        }
        let threads = threads.max(1);
        let (tx, rx) = bounded::<Job>(threads);
        for i in 0..threads {
            let rx: Receiver<Job> = rx.clone();
            let spawned = thread::Builder::new()
                .name(format!("compress-{i}"))
                .spawn(move || compress_thread(codec, rx));
            if spawned.is_err() {
                // Without threads, compress on the caller's thread (see `submit`).
                return Encoder {
                    codec,
                    jobs: None,
                    convert,
                };
            }
        }
        Encoder {
            codec,
            jobs: Some(tx),
            convert,
        }
    }

    pub fn codec(&self) -> Codec {
        self.codec
    }

    /// The same pool writing JSON lines (error records keep that format whatever the events').
    pub fn json_lines(&self) -> Encoder {
        Encoder {
            convert: None,
            ..self.clone()
        }
    }

    /// Whether buffers may be compressed chunk by chunk as they fill; converted formats need
    /// the whole batch at once.
    pub fn chunked(&self) -> bool {
        self.convert.is_none()
    }

    /// The object name's extension and content type.
    pub fn object_type(&self) -> (&'static str, &'static str) {
        match &self.convert {
            None => (self.codec.kind.extension(), self.codec.kind.content_type()),
            Some(c) => (c.extension(self.codec), c.content_type(self.codec)),
        }
    }

    /// Queues a chunk of JSON lines for compression (or a whole batch for conversion); blocks
    /// while the queue is full.
    pub fn submit(&self, data: Vec<u8>) -> Part {
        self.submit_shared(Bytes::from(data))
    }

    /// `submit` for a chunk the caller keeps too (the Kinesis output forwards its lines).
    pub fn submit_shared(&self, data: Bytes) -> Part {
        // On the caller's thread a panic must not escape either: the caller is a worker in the
        // middle of `Batcher::append`, which has already taken the chunk out of its buffer, so
        // an escaping panic would leave the buffer to be written without it.
        let inline = |data: &[u8]| {
            let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                run(self.codec, self.convert.as_deref(), data)
            }));
            match ran {
                Ok(Some(b)) => Part::Ready(Bytes::from(b)),
                Ok(None) => Part::Lost,
                Err(panic) => {
                    crate::metrics::emit(crate::metrics::ThreadPanicked {
                        thread: "compress",
                        source: "",
                        message: &crate::testhook::panic_message(&*panic),
                    });
                    reset_compressors();
                    Part::Lost
                }
            }
        };
        match &self.jobs {
            Some(jobs) => {
                let (done, rx) = oneshot::channel();
                let convert = self.convert.clone();
                match jobs.send(Job {
                    data,
                    done,
                    convert,
                }) {
                    Ok(()) => Part::Pending(rx),
                    Err(e) => inline(&e.into_inner().data),
                }
            }
            None => inline(&data),
        }
    }
}

thread_local! {
    static GZIP: RefCell<Option<(i32, libdeflater::Compressor)>> = const { RefCell::new(None) };
    static ZSTD: RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> = const { RefCell::new(None) };
}

/// Drops this thread's compressors (after a panic their state is unknown).
fn reset_compressors() {
    let _ = GZIP.try_with(|c| c.try_borrow_mut().map(|mut c| *c = None));
    let _ = ZSTD.try_with(|c| c.try_borrow_mut().map(|mut c| *c = None));
}

/// Compresses one chunk into one self-contained member/frame.
pub fn compress(codec: Codec, data: &[u8]) -> Result<Vec<u8>, CompressError> {
    crate::testhook::compress_error(data).map_err(CompressError::Injected)?;
    match codec.kind {
        // Snappy is Parquet's own codec, refused by the config for text formats.
        Compression::None | Compression::Snappy => Ok(data.to_vec()),
        Compression::Gzip => GZIP.with(|cell| {
            let mut slot = cell.borrow_mut();
            if slot.as_ref().is_none_or(|(l, _)| *l != codec.level) {
                let lvl = libdeflater::CompressionLvl::new(codec.level).unwrap_or_default();
                *slot = Some((codec.level, libdeflater::Compressor::new(lvl)));
            }
            let Some((_, c)) = slot.as_mut() else {
                return Err(CompressError::Gzip("no compressor".into()));
            };
            let mut out = vec![0; c.gzip_compress_bound(data.len())];
            let n = c
                .gzip_compress(data, &mut out)
                .map_err(|e| CompressError::Gzip(e.to_string()))?;
            out.truncate(n);
            Ok(out)
        }),
        Compression::Zstd => ZSTD.with(|cell| {
            let mut slot = cell.borrow_mut();
            if slot.as_ref().is_none_or(|(l, _)| *l != codec.level) {
                let c = zstd::bulk::Compressor::new(codec.level)
                    .map_err(|e| CompressError::Zstd(e.to_string()))?;
                *slot = Some((codec.level, c));
            }
            match slot.as_mut() {
                Some((_, c)) => c
                    .compress(data)
                    .map_err(|e| CompressError::Zstd(e.to_string())),
                None => Err(CompressError::Zstd("no compressor".into())),
            }
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn line(raw: &str, adds: &[&str]) -> String {
        let mut out = Vec::new();
        let adds: Vec<&[u8]> = adds.iter().map(|a| a.as_bytes()).collect();
        encode_event(&mut out, raw.as_bytes(), &adds);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn additions_are_spliced_before_the_closing_brace() {
        assert_eq!(
            line(r#"{"a":1}"#, &[r#""geo":{"x":1}"#]),
            "{\"a\":1,\"geo\":{\"x\":1}}\n"
        );
        assert_eq!(line(r#"{"a":1}"#, &[]), "{\"a\":1}\n");
        assert_eq!(
            line("{ }", &[r#""g":1"#, r#""h":2"#]),
            "{ \"g\":1,\"h\":2}\n"
        );
        assert_eq!(
            line(r#"{"z":"é\"}","a":[1,{"b":null}]}"#, &[r#""g":1"#]),
            "{\"z\":\"é\\\"}\",\"a\":[1,{\"b\":null}],\"g\":1}\n"
        );
    }

    #[test]
    fn pretty_printed_events_become_one_line_with_equal_values() {
        let raw = "{\r\n  \"a\": \"x\\ny\",\n  \"b\": [1,\n 2]\n}";
        let out = line(raw, &[r#""g":1"#]);
        assert_eq!(out.matches('\n').count(), 1);
        let v: serde_json::Value = serde_json::from_str(out.trim_end()).unwrap();
        assert_eq!(v, serde_json::json!({"a": "x\ny", "b": [1, 2], "g": 1}));
    }

    #[test]
    fn concatenated_members_decode_as_one_stream() {
        for kind in [Compression::Gzip, Compression::Zstd, Compression::None] {
            let enc = Encoder::new(Codec { kind, level: 3 }, 2);
            let parts: Vec<Part> = ["{\"a\":1}\n", "{\"b\":2}\n", "{\"c\":3}\n"]
                .iter()
                .map(|s| enc.submit(s.as_bytes().to_vec()))
                .collect();
            let rt = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap();
            let mut whole = Vec::new();
            for p in parts {
                whole.extend_from_slice(&rt.block_on(p.bytes()).unwrap());
            }
            let mut text = String::new();
            match kind {
                Compression::Gzip => {
                    flate2::read::MultiGzDecoder::new(&whole[..])
                        .read_to_string(&mut text)
                        .unwrap();
                }
                Compression::Zstd => {
                    text =
                        String::from_utf8(zstd::stream::decode_all(&whole[..]).unwrap()).unwrap();
                }
                Compression::None | Compression::Snappy => text = String::from_utf8(whole).unwrap(),
            }
            assert_eq!(text, "{\"a\":1}\n{\"b\":2}\n{\"c\":3}\n", "{kind:?}");
        }
    }
}
