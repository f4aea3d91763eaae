//! Split a CloudTrail delivery file (`{"Records":[…]}`) into events, streaming.
//!
//! The decompressed file is never held whole: a window over the reader grows only to the largest
//! event, and each event is handed on as the original bytes plus the few top-level fields the later
//! stages need (`Head`). serde_json validates every event while extracting those fields, so nothing
//! that leaves this module is malformed JSON.

mod head;
mod scan;

use std::fmt;
use std::io::{self, Read};

use serde::de::{self, IgnoredAny};

pub use head::{Head, head_of};

/// How much is read from the decoder at a time.
const READ_CHUNK: usize = 256 * 1024;

/// Why a whole file (or what is left of it) could not be split. The names are metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileErrorReason {
    /// The source itself failed while reading (retriable, not the file's fault).
    Read,
    /// The gzip stream is corrupt.
    GzipCorrupt,
    /// The data ends early (gzip or JSON).
    Truncated,
    /// Zero bytes.
    Empty,
    /// Not JSON at all.
    NotJson,
    /// JSON, but no `Records` key (and not a digest file).
    NoRecords,
    /// `Records` is present but not an array.
    RecordsNotArray,
    /// A JSON syntax error after the start.
    Malformed,
    /// One event is larger than the configured limit.
    EventTooLarge,
    /// The file decompresses to more than `pipeline.max_decompressed_bytes`.
    InflationLimit,
    /// The stored file is larger than `pipeline.max_file_bytes`.
    FileTooLarge,
}

impl FileErrorReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Read => "read_error",
            Self::GzipCorrupt => "gzip_corrupt",
            Self::Truncated => "truncated",
            Self::Empty => "empty",
            Self::NotJson => "not_json",
            Self::NoRecords => "no_records",
            Self::RecordsNotArray => "records_not_array",
            Self::Malformed => "malformed_json",
            Self::EventTooLarge => "event_too_large",
            Self::InflationLimit => "inflation_limit",
            Self::FileTooLarge => "file_too_large",
        }
    }
}

impl fmt::Display for FileErrorReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("{reason}: {detail}")]
pub struct SplitError {
    pub reason: FileErrorReason,
    pub detail: String,
}

impl SplitError {
    fn new(reason: FileErrorReason, detail: impl Into<String>) -> Self {
        Self {
            reason,
            detail: detail.into(),
        }
    }
}

/// Why one `Records` element went to the error output while the rest of the file went on. The
/// names are metric labels and error-record reasons.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordReason {
    /// Valid JSON that is not an object (a string, number, null, array).
    NotAnObject,
    /// Larger than `pipeline.max_event_bytes`.
    TooLarge,
    /// A JSON syntax error inside the element.
    Malformed,
    /// Bytes that are not UTF-8.
    InvalidUtf8,
}

impl RecordReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NotAnObject => "not_an_object",
            Self::TooLarge => "event_too_large",
            Self::Malformed => "malformed_json",
            Self::InvalidUtf8 => "invalid_utf8",
        }
    }
}

/// How much of an element over the size limit is kept for its error record.
pub const PREVIEW_BYTES: usize = 1024;

/// The most raw bytes one `Item::Unsplit` carries: the rest of a file after a point where the
/// elements cannot be told apart comes in pieces of at most this size.
pub const UNSPLIT_CHUNK: usize = 1 << 20;

/// One element of the `Records` array, or what stands in its place.
#[derive(Debug)]
pub enum Item<'a> {
    /// A JSON object: the exact original bytes (no surrounding whitespace) and its head.
    Event { raw: &'a [u8], head: Head<'a> },
    /// Valid JSON that is not an object (a string, number, null, array).
    NotAnObject { index: u64, raw: &'a [u8] },
    /// An element stepped over: its end was found without parsing it, the next one follows.
    Skipped(Skipped<'a>),
    /// Raw bytes after a point where the elements could not be told apart, up to the end of
    /// the file (in pieces of at most `UNSPLIT_CHUNK`). `offset` is in the decompressed file.
    Unsplit { offset: u64, raw: &'a [u8] },
}

#[derive(Debug)]
pub struct Skipped<'a> {
    pub index: u64,
    pub reason: RecordReason,
    /// Where the element starts in the decompressed file, and its full size.
    pub offset: u64,
    pub size: u64,
    /// The whole element, or its first `PREVIEW_BYTES` when it is over the size limit.
    pub raw: &'a [u8],
    /// The eventID, when one was seen in the element's bytes.
    pub event_id: Option<String>,
    pub detail: String,
}

/// What a file turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A `Records` file; every element was handed on.
    Events,
    /// A CloudTrail digest file: not events, skipped.
    Digest,
}

/// The account of one split. Counts are valid even when `result` is an error: events handed on
/// before the error stay handed on.
#[derive(Debug)]
pub struct Report {
    pub result: Result<Kind, SplitError>,
    pub events: u64,
    pub not_objects: u64,
    /// Elements stepped over (`Item::Skipped`).
    pub skipped: u64,
    pub decompressed_bytes: u64,
}

/// Work limits for one file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The largest element kept; a larger one is stepped over.
    pub max_event_bytes: usize,
    /// The most decompressed bytes read; past it the file stops with `inflation_limit`.
    pub max_decompressed_bytes: u64,
}

impl Limits {
    /// Only an event-size limit.
    pub fn events(max_event_bytes: usize) -> Limits {
        Limits {
            max_event_bytes,
            max_decompressed_bytes: u64::MAX,
        }
    }
}

/// Reads a CloudTrail file from `reader` (already decompressed) and calls `on_item` for each
/// `Records` element, in order.
pub fn split<R, F>(reader: R, max_event_bytes: usize, on_item: F) -> Report
where
    R: Read,
    F: FnMut(Item<'_>),
{
    split_limited(reader, Limits::events(max_event_bytes), on_item)
}

/// `split` within `limits`.
pub fn split_limited<R, F>(reader: R, limits: Limits, on_item: F) -> Report
where
    R: Read,
    F: FnMut(Item<'_>),
{
    split_windowed(reader, limits, READ_CHUNK, on_item)
}

/// `split_limited` with the window's read size set: small sizes refill the window in the middle
/// of elements, which the property tests and the fuzz harness rely on. The items out do not
/// depend on it.
#[doc(hidden)]
pub fn split_windowed<R, F>(reader: R, limits: Limits, read_chunk: usize, on_item: F) -> Report
where
    R: Read,
    F: FnMut(Item<'_>),
{
    let mut s = Splitter {
        win: Window::new(reader, limits.max_decompressed_bytes, read_chunk.max(1)),
        max_event_bytes: limits.max_event_bytes,
        events: 0,
        not_objects: 0,
        skipped: 0,
    };
    let result = s.run(on_item);
    Report {
        result,
        events: s.events,
        not_objects: s.not_objects,
        skipped: s.skipped,
        decompressed_bytes: s.win.total,
    }
}

/// A sliding window over the reader: `buf[pos..end]` is read but not yet consumed. Offsets into
/// `buf` are only valid until the next fill, which moves the pending bytes to the front.
struct Window<R> {
    reader: R,
    buf: Vec<u8>,
    pos: usize,
    end: usize,
    eof: bool,
    total: u64,
    /// `pipeline.max_decompressed_bytes`.
    limit: u64,
    /// The least read at a time.
    chunk: usize,
    /// A read error that came after some bytes of the same fill: those bytes are split first
    /// (events before a truncation are kept), the error is reported on the next fill.
    deferred: Option<SplitError>,
}

impl<R: Read> Window<R> {
    fn new(reader: R, limit: u64, chunk: usize) -> Self {
        Self {
            reader,
            buf: Vec::new(),
            pos: 0,
            end: 0,
            eof: false,
            total: 0,
            limit,
            chunk,
            deferred: None,
        }
    }

    fn pending(&self) -> &[u8] {
        &self.buf[self.pos..self.end]
    }

    /// Reads more, at least as much again as is pending so that re-parsing a large partial
    /// event stays linear overall, and never past the decompressed limit. Returns false at end
    /// of input.
    fn fill(&mut self) -> Result<bool, SplitError> {
        if let Some(e) = self.deferred.take() {
            return Err(e);
        }
        if self.eof {
            return Ok(false);
        }
        if self.total >= self.limit {
            return self.probe_past_limit();
        }
        if self.pos > 0 {
            self.buf.copy_within(self.pos..self.end, 0);
            self.end -= self.pos;
            self.pos = 0;
        }
        let room = usize::try_from(self.limit - self.total).unwrap_or(usize::MAX);
        let want = self.end + self.end.max(self.chunk).min(room);
        if self.buf.len() < want {
            self.buf.resize(want, 0);
        }
        let before = self.end;
        while self.end < want {
            match self.reader.read(&mut self.buf[self.end..want]) {
                Ok(0) => {
                    self.eof = true;
                    break;
                }
                Ok(n) => {
                    self.end += n;
                    self.total += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if self.end > before => {
                    self.deferred = Some(read_error(&e));
                    break;
                }
                Err(e) => return Err(read_error(&e)),
            }
        }
        Ok(self.end > before)
    }

    /// At the limit: one more byte means the file inflates past it.
    fn probe_past_limit(&mut self) -> Result<bool, SplitError> {
        let mut one = [0u8; 1];
        loop {
            match self.reader.read(&mut one) {
                Ok(0) => {
                    self.eof = true;
                    return Ok(false);
                }
                Ok(_) => {
                    return Err(SplitError::new(
                        FileErrorReason::InflationLimit,
                        format!(
                            "the file decompresses to more than {} bytes (pipeline.max_decompressed_bytes)",
                            self.limit
                        ),
                    ));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(read_error(&e)),
            }
        }
    }
}

struct Splitter<R> {
    win: Window<R>,
    max_event_bytes: usize,
    events: u64,
    not_objects: u64,
    skipped: u64,
}

/// Why one element could not be taken as it is.
enum Bad {
    /// Over `max_event_bytes`: stepped over.
    TooLarge,
    /// serde refused it: stepped over when its end can be found.
    Syntax(String),
    InvalidUtf8,
    /// The file cannot go on (the source failed, the data ended, a limit).
    File(SplitError),
}

impl From<SplitError> for Bad {
    fn from(e: SplitError) -> Bad {
        Bad::File(e)
    }
}

/// Keys that only CloudTrail digest files carry.
const DIGEST_KEYS: &[&str] = &[
    "digestSignatureAlgorithm",
    "digestPublicKeyFingerprint",
    "logFiles",
];

impl<R: Read> Splitter<R> {
    fn run<F: FnMut(Item<'_>)>(&mut self, mut on_item: F) -> Result<Kind, SplitError> {
        match self.peek()? {
            None if self.win.total == 0 => {
                return Err(SplitError::new(FileErrorReason::Empty, "the file is empty"));
            }
            None => {
                return Err(SplitError::new(
                    FileErrorReason::NotJson,
                    "the file holds only whitespace",
                ));
            }
            Some(b'{') => self.win.pos += 1,
            Some(b) => {
                // Valid JSON of another shape is told apart from bytes that are not JSON at all.
                return Err(match self.parse_owned::<IgnoredAny>() {
                    Ok(_) => SplitError::new(
                        FileErrorReason::NoRecords,
                        "the top-level JSON value is not an object",
                    ),
                    Err(e) if e.reason == FileErrorReason::Malformed => SplitError::new(
                        FileErrorReason::NotJson,
                        format!("the file is not JSON (it starts with byte 0x{b:02x})"),
                    ),
                    Err(e) => e,
                });
            }
        }

        let mut saw_records = false;
        let mut digest_like = false;
        let mut first = true;
        loop {
            let mut b = self.expect_more("the top-level object")?;
            if b == b'}' {
                self.win.pos += 1;
                break;
            }
            if !first {
                if b != b',' {
                    return Err(
                        self.unsplit("expected ',' or '}' in the top-level object", &mut on_item)
                    );
                }
                self.win.pos += 1;
                b = self.expect_more("the top-level object")?;
            }
            first = false;
            if b != b'"' {
                return Err(self.unsplit("expected a key in the top-level object", &mut on_item));
            }
            let key = self.parse_owned::<String>();
            let (key, _) = self.or_unsplit(key, &mut on_item)?;
            if self.expect_more("the top-level object")? != b':' {
                return Err(self.unsplit("expected ':' after a top-level key", &mut on_item));
            }
            self.win.pos += 1;
            if key == "Records" {
                saw_records = true;
                if self.expect_more("the Records value")? != b'[' {
                    return Err(SplitError::new(
                        FileErrorReason::RecordsNotArray,
                        "the Records value is not an array",
                    ));
                }
                self.win.pos += 1;
                self.records(&mut on_item)?;
            } else {
                digest_like |= DIGEST_KEYS.contains(&key.as_str());
                let value = self.parse_owned::<IgnoredAny>();
                self.or_unsplit(value, &mut on_item)?;
            }
        }
        if self.peek()?.is_some() {
            return Err(self.unsplit("trailing data after the top-level object", &mut on_item));
        }
        match (saw_records, digest_like) {
            (true, _) => Ok(Kind::Events),
            (false, true) => Ok(Kind::Digest),
            (false, false) => Err(SplitError::new(
                FileErrorReason::NoRecords,
                "the top-level object has no Records key",
            )),
        }
    }

    /// The elements of the `Records` array, after its `[`.
    fn records<F: FnMut(Item<'_>)>(&mut self, on_item: &mut F) -> Result<(), SplitError> {
        let mut b = self.expect_more("the Records array")?;
        if b == b']' {
            self.win.pos += 1;
            return Ok(());
        }
        let mut index = 0u64;
        loop {
            self.element(b, index, on_item)?;
            index += 1;
            match self.expect_more("the Records array")? {
                b',' => {
                    self.win.pos += 1;
                    b = self.expect_more("the Records array")?;
                }
                b']' => {
                    self.win.pos += 1;
                    return Ok(());
                }
                _ => {
                    return Err(self.unsplit("expected ',' or ']' in the Records array", on_item));
                }
            }
        }
    }

    /// One element starting at `pos` (its first byte is `b`): handed on, or stepped over.
    fn element<F: FnMut(Item<'_>)>(
        &mut self,
        b: u8,
        index: u64,
        on_item: &mut F,
    ) -> Result<(), SplitError> {
        let taken = if b == b'{' {
            self.event(on_item)
        } else {
            self.not_object(index, on_item)
        };
        let (reason, detail) = match taken {
            Ok(()) => return Ok(()),
            Err(Bad::File(e)) => return Err(e),
            Err(Bad::TooLarge) => (
                RecordReason::TooLarge,
                format!(
                    "the element is over the {}-byte limit (pipeline.max_event_bytes)",
                    self.max_event_bytes
                ),
            ),
            Err(Bad::Syntax(e)) => (RecordReason::Malformed, e),
            Err(Bad::InvalidUtf8) => (
                RecordReason::InvalidUtf8,
                "the element holds bytes that are not UTF-8".to_owned(),
            ),
        };
        self.step_over(index, reason, detail, on_item)
    }

    /// One event object starting at `pos`.
    fn event<F: FnMut(Item<'_>)>(&mut self, on_item: &mut F) -> Result<(), Bad> {
        loop {
            // No further than the size limit: what lies beyond cannot change the outcome, and
            // the outcome does not depend on how much the window happens to hold.
            let end = self
                .win
                .end
                .min(self.win.pos.saturating_add(self.max_event_bytes + 1));
            let slice = &self.win.buf[self.win.pos..end];
            let mut stream = serde_json::Deserializer::from_slice(slice).into_iter::<Head<'_>>();
            match stream.next() {
                Some(Ok(_)) if stream.byte_offset() > self.max_event_bytes => {
                    return Err(Bad::TooLarge);
                }
                Some(Ok(head)) => {
                    let len = stream.byte_offset();
                    let raw = slice.get(..len).unwrap_or_default();
                    // serde checks UTF-8 only in the strings it reads; ignored values pass.
                    if std::str::from_utf8(raw).is_err() {
                        return Err(Bad::InvalidUtf8);
                    }
                    self.events += 1;
                    on_item(Item::Event { raw, head });
                    self.win.pos += len;
                    return Ok(());
                }
                Some(Err(e)) if e.is_eof() => self.more_for_value()?,
                // serde reports some values cut off by the end of the slice as bad syntax (an
                // ignored `1.` or `-`): a syntax error stands only once the slice reaches the
                // size limit or the end of the input, so it does not depend on the chunking.
                Some(Err(_)) if slice.len() <= self.max_event_bytes && !self.win.eof => {
                    self.fill()?;
                }
                Some(Err(e)) => return Err(Bad::Syntax(e.to_string())),
                None => return Err(Bad::File(self.truncated("an event"))),
            }
        }
    }

    /// One element that is not an object, starting at `pos`.
    fn not_object<F: FnMut(Item<'_>)>(&mut self, index: u64, on_item: &mut F) -> Result<(), Bad> {
        let (_, start) = self.parse_value::<IgnoredAny>()?;
        let raw = self.win.buf.get(start..self.win.pos).unwrap_or_default();
        if std::str::from_utf8(raw).is_err() {
            self.win.pos = start;
            return Err(Bad::InvalidUtf8);
        }
        self.not_objects += 1;
        on_item(Item::NotAnObject { index, raw });
        Ok(())
    }

    /// Steps over the element at `pos` by finding its end without parsing it. Its bytes are
    /// kept while they are within the size limit; past it only the first `PREVIEW_BYTES` are.
    /// When the end cannot be found, the rest of the file goes out raw.
    fn step_over<F: FnMut(Item<'_>)>(
        &mut self,
        index: u64,
        reason: RecordReason,
        detail: String,
        on_item: &mut F,
    ) -> Result<(), SplitError> {
        let mut sk = Stepping {
            index,
            reason,
            offset: self.offset(),
            preview: None,
            dropped: 0,
            event_id: None,
            carry: Vec::new(),
        };
        let mut scan = scan::Extent::default();
        // Bytes of the element already looked at, from `pos`.
        let mut scanned = 0usize;
        let len = loop {
            let pending = self.win.pending();
            let fresh = pending.get(scanned..).unwrap_or_default();
            match scan.feed(fresh) {
                scan::Step::End(n) => break scanned + n,
                // Over the size limit before the break: accounted for like any element over
                // it (whether its bytes were let go of yet depends only on the window).
                scan::Step::Broken(at)
                    if sk.preview.is_some() || scanned + at > self.max_event_bytes =>
                {
                    sk.reason = RecordReason::TooLarge;
                    // The part already let go of is accounted for before the raw rest.
                    let upto = scanned + at;
                    let part = pending.get(..upto).unwrap_or_default();
                    sk.keep_preview(part);
                    sk.look_for_id(part);
                    let size = sk.dropped + upto as u64;
                    let why = format!("{detail}; its first {size} bytes, then no end was found");
                    self.skipped += 1;
                    on_item(sk.item(size, &[], why));
                    self.win.pos += upto;
                    let what = format!("the end of Records element {index} was not found");
                    return Err(self.unsplit(&what, on_item));
                }
                scan::Step::Broken(_) => {
                    let what =
                        format!("{detail}; the end of Records element {index} was not found");
                    return Err(self.unsplit(&what, on_item));
                }
                scan::Step::More => scanned = pending.len(),
            }
            if sk.preview.is_some() || scanned > self.max_event_bytes {
                let pending = self.win.pending();
                sk.reason = RecordReason::TooLarge;
                sk.keep_preview(pending);
                sk.look_for_id(pending);
                sk.dropped += scanned as u64;
                self.win.pos = self.win.end;
                scanned = 0;
            }
            match self.fill() {
                Ok(true) => {}
                Ok(false) if scan.ends_at_eof() => break scanned,
                Ok(false) if sk.preview.is_some() => {
                    // Everything after the element's start was looked at and let go of.
                    let size = sk.dropped + scanned as u64;
                    self.skipped += 1;
                    on_item(sk.item(size, &[], format!("{detail}; the file ends inside it")));
                    self.win.pos = self.win.end;
                    return Err(self.truncated("an element over the size limit"));
                }
                Ok(false) => {
                    let what = format!("{detail}; the file ends inside Records element {index}");
                    return Err(self.unsplit(&what, on_item));
                }
                Err(e) => return Err(e),
            }
        };
        let pending = self.win.pending();
        let whole = pending.get(..len).unwrap_or(pending);
        if sk.preview.is_some() {
            sk.keep_preview(whole);
        }
        sk.look_for_id(whole);
        let size = sk.dropped + len as u64;
        if size > self.max_event_bytes as u64 {
            sk.reason = RecordReason::TooLarge;
        }
        if sk.reason == RecordReason::Malformed && std::str::from_utf8(whole).is_err() {
            sk.reason = RecordReason::InvalidUtf8;
        }
        let kept = match sk.reason {
            RecordReason::TooLarge => whole.get(..PREVIEW_BYTES).unwrap_or(whole),
            _ => whole,
        };
        self.skipped += 1;
        on_item(sk.item(size, kept, detail));
        self.win.pos += len;
        Ok(())
    }

    /// A syntax error in the top-level object: the rest of the file from `pos` goes out raw (it
    /// may hold the Records array), so none of it is dropped with only a file-level record.
    fn or_unsplit<T, F: FnMut(Item<'_>)>(
        &mut self,
        r: Result<T, SplitError>,
        on_item: &mut F,
    ) -> Result<T, SplitError> {
        match r {
            Err(e) if e.reason == FileErrorReason::Malformed => {
                Err(self.unsplit(&e.detail, on_item))
            }
            other => other,
        }
    }

    /// Hands on the rest of the file from `pos` as raw bytes, and says why the split stopped.
    fn unsplit<F: FnMut(Item<'_>)>(&mut self, what: &str, on_item: &mut F) -> SplitError {
        let from = self.offset();
        loop {
            while !self.win.pending().is_empty() {
                let offset = self.offset();
                let pending = self.win.pending();
                let n = pending.len().min(UNSPLIT_CHUNK);
                on_item(Item::Unsplit {
                    offset,
                    raw: pending.get(..n).unwrap_or(pending),
                });
                self.win.pos += n;
            }
            match self.fill() {
                Ok(true) => {}
                Ok(false) => break,
                Err(e) => {
                    return SplitError::new(
                        e.reason,
                        format!(
                            "{what} near byte {from}; the bytes from there up to byte {} are in the error output as raw bytes, then: {}",
                            self.win.total, e.detail
                        ),
                    );
                }
            }
        }
        SplitError::new(
            FileErrorReason::Malformed,
            format!(
                "{what} near byte {from}; the rest of the file ({} bytes) is in the error output as raw bytes",
                self.win.total - from
            ),
        )
    }

    /// Parses one value at `pos` into an owned `T`; returns it and the end offset in `buf`.
    fn parse_owned<T: de::DeserializeOwned>(&mut self) -> Result<(T, usize), SplitError> {
        match self.parse_value::<T>() {
            Ok((v, _)) => Ok((v, self.win.pos)),
            Err(Bad::File(e)) => Err(e),
            Err(Bad::TooLarge) => Err(self.too_large()),
            Err(Bad::Syntax(e)) => Err(SplitError::new(
                FileErrorReason::Malformed,
                format!("{e} (in the value starting near byte {})", self.offset()),
            )),
            Err(Bad::InvalidUtf8) => Err(self.malformed("bytes that are not UTF-8")),
        }
    }

    /// Parses one value at `pos` into an owned `T`, consuming it; returns it and its start
    /// offset in `buf` (valid until the next fill).
    fn parse_value<T: de::DeserializeOwned>(&mut self) -> Result<(T, usize), Bad> {
        loop {
            let pending = self.win.pending();
            let capped = pending.get(..self.max_event_bytes + 1).unwrap_or(pending);
            let mut stream = serde_json::Deserializer::from_slice(capped).into_iter::<T>();
            match stream.next() {
                // A number at the very end of what was read may continue in the next read.
                Some(Ok(_))
                    if self.win.pos + stream.byte_offset() == self.win.end && !self.win.eof =>
                {
                    if self.win.end - self.win.pos > self.max_event_bytes {
                        return Err(Bad::TooLarge);
                    }
                    // At the end of the input the number is complete: the next pass takes it.
                    self.fill()?;
                }
                Some(Ok(_)) if stream.byte_offset() > self.max_event_bytes => {
                    return Err(Bad::TooLarge);
                }
                Some(Ok(v)) => {
                    let start = self.win.pos;
                    self.win.pos += stream.byte_offset();
                    return Ok((v, start));
                }
                Some(Err(e)) if e.is_eof() => self.more_for_value()?,
                // As in `event`: a syntax error may only be where the read stopped.
                Some(Err(_)) if capped.len() <= self.max_event_bytes && !self.win.eof => {
                    self.fill()?;
                }
                Some(Err(e)) => return Err(Bad::Syntax(e.to_string())),
                // Nothing but whitespace (or nothing) read yet: the value is in the next read.
                None => self.more_for_value()?,
            }
        }
    }

    /// Reads more for a value that is incomplete in the window, within the size limit.
    fn more_for_value(&mut self) -> Result<(), Bad> {
        if self.win.end - self.win.pos > self.max_event_bytes {
            return Err(Bad::TooLarge);
        }
        if self.fill()? {
            Ok(())
        } else {
            Err(Bad::File(self.truncated("a value")))
        }
    }

    /// The next non-whitespace byte, reading as needed; None at end of input.
    fn peek(&mut self) -> Result<Option<u8>, SplitError> {
        loop {
            let pending = self.win.pending();
            if let Some(i) = pending
                .iter()
                .position(|b| !matches!(b, b' ' | b'\n' | b'\r' | b'\t'))
            {
                let b = pending[i];
                self.win.pos += i;
                return Ok(Some(b));
            }
            self.win.pos = self.win.end;
            if !self.fill()? {
                return Ok(None);
            }
        }
    }

    fn expect_more(&mut self, inside: &str) -> Result<u8, SplitError> {
        self.peek()?.ok_or_else(|| self.truncated(inside))
    }

    fn fill(&mut self) -> Result<bool, SplitError> {
        self.win.fill()
    }

    fn too_large(&self) -> SplitError {
        SplitError::new(
            FileErrorReason::EventTooLarge,
            format!(
                "the value after event {} is over the {}-byte limit (pipeline.max_event_bytes)",
                self.events, self.max_event_bytes
            ),
        )
    }

    fn truncated(&self, inside: &str) -> SplitError {
        SplitError::new(
            FileErrorReason::Truncated,
            format!(
                "the data ends inside {inside} after {} bytes and {} events",
                self.win.total, self.events
            ),
        )
    }

    fn malformed(&self, what: &str) -> SplitError {
        SplitError::new(
            FileErrorReason::Malformed,
            format!("{what} near byte {}", self.offset()),
        )
    }

    /// Offset of `pos` in the whole decompressed stream.
    fn offset(&self) -> u64 {
        self.win.total - (self.win.end - self.win.pos) as u64
    }
}

/// An element being stepped over.
struct Stepping {
    index: u64,
    reason: RecordReason,
    offset: u64,
    /// Set once the element is over the size limit and its bytes are let go of.
    preview: Option<Vec<u8>>,
    dropped: u64,
    event_id: Option<String>,
    /// The last bytes looked at for an eventID, so one across two pieces is found too.
    carry: Vec<u8>,
}

const EVENT_ID_KEY: &[u8] = b"\"eventID\":\"";
/// Longer eventIDs are not reported (CloudTrail's are 36 bytes).
const EVENT_ID_MAX: usize = 128;

impl Stepping {
    /// Adds the next bytes of the element to the preview, up to `PREVIEW_BYTES` in all, so the
    /// preview does not depend on where the window happened to end.
    fn keep_preview(&mut self, piece: &[u8]) {
        let p = self.preview.get_or_insert_with(Vec::new);
        let need = PREVIEW_BYTES.saturating_sub(p.len());
        p.extend_from_slice(piece.get(..need.min(piece.len())).unwrap_or_default());
    }

    /// Looks for the first eventID in the next piece of the element's bytes; one that runs
    /// across pieces is found in the seam, so the result does not depend on the pieces.
    fn look_for_id(&mut self, piece: &[u8]) {
        if self.event_id.is_some() {
            return;
        }
        let window = EVENT_ID_KEY.len() + EVENT_ID_MAX;
        let mut seam = std::mem::take(&mut self.carry);
        let head = piece.get(..window.min(piece.len())).unwrap_or_default();
        seam.extend_from_slice(head);
        let found = match find_event_id(&seam) {
            IdSearch::Absent | IdSearch::Cut if piece.len() > head.len() => find_event_id(piece),
            other => other,
        };
        match found {
            IdSearch::Found(id) => self.event_id = Some(id),
            // Keep the last bytes (a cut-off key is among them) for the next piece.
            _ if piece.len() > head.len() => {
                let tail = piece.len().saturating_sub(window);
                self.carry = piece.get(tail..).unwrap_or_default().to_vec();
            }
            _ => {
                let tail = seam.len().saturating_sub(window);
                self.carry = seam.get(tail..).unwrap_or_default().to_vec();
            }
        }
    }

    /// The item for the error output: the preview when the bytes were let go of, else `kept`.
    fn item<'a>(&'a mut self, size: u64, kept: &'a [u8], detail: String) -> Item<'a> {
        Item::Skipped(Skipped {
            index: self.index,
            reason: self.reason,
            offset: self.offset,
            size,
            raw: self.preview.as_deref().unwrap_or(kept),
            event_id: self.event_id.take(),
            detail,
        })
    }
}

enum IdSearch {
    Found(String),
    /// A key whose value runs past the end of the bytes: the next piece may complete it.
    Cut,
    Absent,
}

/// The value of the first `"eventID":"…"` in `bytes` that is short and plain.
fn find_event_id(bytes: &[u8]) -> IdSearch {
    let mut from = 0;
    while let Some(at) = bytes
        .get(from..)
        .and_then(|b| memchr::memmem::find(b, EVENT_ID_KEY))
    {
        let start = from + at + EVENT_ID_KEY.len();
        let rest = bytes.get(start..).unwrap_or_default();
        let look = rest
            .get(..rest.len().min(EVENT_ID_MAX + 1))
            .unwrap_or_default();
        match memchr::memchr(b'"', look) {
            Some(end) => {
                let id = rest.get(..end).and_then(|v| std::str::from_utf8(v).ok());
                if let Some(id) = id.filter(|id| !id.contains('\\')) {
                    return IdSearch::Found(id.to_owned());
                }
            }
            None if rest.len() <= EVENT_ID_MAX => return IdSearch::Cut,
            None => {}
        }
        from = start;
    }
    IdSearch::Absent
}

/// Maps a reader error: decoders report corrupt data as `InvalidInput`/`InvalidData` and a cut-off
/// stream as `UnexpectedEof`; anything else came from the source itself.
pub fn read_error(e: &io::Error) -> SplitError {
    let reason = match e.kind() {
        _ if crate::fetch::is_stored_limit(e) => FileErrorReason::FileTooLarge,
        io::ErrorKind::UnexpectedEof => FileErrorReason::Truncated,
        io::ErrorKind::InvalidInput | io::ErrorKind::InvalidData => FileErrorReason::GzipCorrupt,
        _ => FileErrorReason::Read,
    };
    SplitError::new(reason, e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::borrow::Cow;

    /// A reader that hands out at most `n` bytes per read, to exercise window refills.
    struct Trickle<'a>(&'a [u8], usize);
    impl Read for Trickle<'_> {
        fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
            let n = self.0.len().min(self.1).min(out.len());
            out[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    #[derive(Debug, PartialEq)]
    enum Got {
        Event(String, Option<String>, Option<String>),
        NotObject(u64, String),
    }

    fn run(input: &[u8], chunk: usize) -> (Vec<Got>, Report) {
        let mut got = Vec::new();
        let report = split(Trickle(input, chunk), 1 << 20, |item| match item {
            Item::Event { raw, head } => got.push(Got::Event(
                String::from_utf8_lossy(raw).into_owned(),
                head.event_id.map(Cow::into_owned),
                head.source_ip.map(Cow::into_owned),
            )),
            Item::NotAnObject { index, raw } => got.push(Got::NotObject(
                index,
                String::from_utf8_lossy(raw).into_owned(),
            )),
            Item::Skipped(_) | Item::Unsplit { .. } => {}
        });
        (got, report)
    }

    fn reason(input: &[u8]) -> FileErrorReason {
        match run(input, 7).1.result {
            Err(e) => e.reason,
            Ok(k) => panic!("expected an error, got {k:?}"),
        }
    }

    #[test]
    fn events_keep_their_exact_bytes_across_any_chunking() {
        let input = br#" {"Records": [ {"eventID":"a","sourceIPAddress":"1.2.3.4","x":{"deep":[1,2,{"y":"\u00e9\"}"}]}} ,
            {"eventID":"b\u0041", "sourceIPAddress": 5} ] } "#;
        for chunk in [1, 2, 3, 5, 64, 4096] {
            let (got, report) = run(input, chunk);
            assert_eq!(report.result.unwrap(), Kind::Events, "chunk {chunk}");
            assert_eq!(
                got,
                vec![
                    Got::Event(
                        r#"{"eventID":"a","sourceIPAddress":"1.2.3.4","x":{"deep":[1,2,{"y":"\u00e9\"}"}]}}"#.into(),
                        Some("a".into()),
                        Some("1.2.3.4".into())
                    ),
                    Got::Event(
                        r#"{"eventID":"b\u0041", "sourceIPAddress": 5}"#.into(),
                        Some("bA".into()),
                        None
                    ),
                ],
                "chunk {chunk}"
            );
            assert_eq!(report.events, 2);
            assert_eq!(report.decompressed_bytes, input.len() as u64);
        }
    }

    #[test]
    fn head_extracts_routing_fields_and_last_duplicate_wins() {
        let input = br#"{"Records":[{"eventTime":"2024-03-18T14:30:07Z","awsRegion":"us-east-1","recipientAccountId":"123456789012","eventSource":"s3.amazonaws.com","eventType":"AwsApiCall","eventID":"x","eventID":"y","eventName":"GetObject","readOnly":true},{"readOnly":"true","eventName":7}]}"#;
        let mut heads = Vec::new();
        let report = split(&input[..], 1 << 20, |item| {
            if let Item::Event { head, .. } = item {
                heads.push(format!("{head:?}"));
            }
        });
        assert_eq!(report.result.unwrap(), Kind::Events);
        assert_eq!(
            heads,
            vec![
                r#"Head { event_time: Some("2024-03-18T14:30:07Z"), source_ip: None, account: Some("123456789012"), region: Some("us-east-1"), event_source: Some("s3.amazonaws.com"), event_type: Some("AwsApiCall"), event_id: Some("y"), event_name: Some("GetObject"), read_only: Some(true) }"#,
                r#"Head { event_time: None, source_ip: None, account: None, region: None, event_source: None, event_type: None, event_id: None, event_name: None, read_only: None }"#
            ]
        );
    }

    #[test]
    fn non_objects_are_reported_beside_their_good_neighbours() {
        let input =
            br#"{"Records":[{"eventID":"a"},"a string",42,null,[1],{"eventID":"b"},12345]}"#;
        for chunk in [1, 3, 1000] {
            let (got, report) = run(input, chunk);
            assert_eq!(report.result.unwrap(), Kind::Events);
            assert_eq!(report.events, 2);
            assert_eq!(report.not_objects, 5);
            assert_eq!(
                got,
                vec![
                    Got::Event(r#"{"eventID":"a"}"#.into(), Some("a".into()), None),
                    Got::NotObject(1, r#""a string""#.into()),
                    Got::NotObject(2, "42".into()),
                    Got::NotObject(3, "null".into()),
                    Got::NotObject(4, "[1]".into()),
                    Got::Event(r#"{"eventID":"b"}"#.into(), Some("b".into()), None),
                    Got::NotObject(6, "12345".into()),
                ],
                "chunk {chunk}"
            );
        }
    }

    #[test]
    fn other_top_level_keys_are_skipped_and_empty_records_is_fine() {
        let (got, report) = run(br#"{"a":{"b":[1,2]},"Records":[],"z":"q"}"#, 2);
        assert_eq!(report.result.unwrap(), Kind::Events);
        assert!(got.is_empty());
    }

    #[test]
    fn digest_files_are_recognised_by_content() {
        let (_, report) = run(
            br#"{"awsAccountId":"1","digestSignatureAlgorithm":"SHA256withRSA","logFiles":[]}"#,
            4,
        );
        assert_eq!(report.result.unwrap(), Kind::Digest);
    }

    #[test]
    fn hostile_shapes_get_their_reasons() {
        assert_eq!(reason(b""), FileErrorReason::Empty);
        assert_eq!(reason(b"   \n"), FileErrorReason::NotJson);
        assert_eq!(reason(b"this is not json\n"), FileErrorReason::NotJson);
        assert_eq!(reason(b"{}"), FileErrorReason::NoRecords);
        assert_eq!(
            reason(br#"{"Events":[{"a":1}]}"#),
            FileErrorReason::NoRecords
        );
        assert_eq!(reason(br#"[{"a":1}]"#), FileErrorReason::NoRecords);
        assert_eq!(
            reason(br#"{"Records":{"eventID":"x"}}"#),
            FileErrorReason::RecordsNotArray
        );
        assert_eq!(
            reason(br#"{"Records":[{"a":1}"#),
            FileErrorReason::Truncated
        );
        assert_eq!(reason(br#"{"Records":[{"a":"#), FileErrorReason::Truncated);
        assert_eq!(
            reason(br#"{"Records":[{"a":1}]"#),
            FileErrorReason::Truncated
        );
        assert_eq!(
            reason(br#"{"Records":[{"a":1} {"b":2}]}"#),
            FileErrorReason::Malformed
        );
        assert_eq!(reason(br#"{"Records":[]} x"#), FileErrorReason::Malformed);
    }

    #[test]
    fn events_before_a_truncation_are_kept_and_counted() {
        let (got, report) = run(
            br#"{"Records":[{"eventID":"a"},{"eventID":"b"},{"eventID":"#,
            5,
        );
        assert_eq!(got.len(), 2);
        assert_eq!(report.events, 2);
        assert_eq!(
            report.result.unwrap_err().reason,
            FileErrorReason::Truncated
        );
    }

    /// Yields its bytes in one read, then fails like a decoder at a cut-off stream.
    struct ThenFail<'a>(&'a [u8]);
    impl Read for ThenFail<'_> {
        fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
            if self.0.is_empty() {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "cut"));
            }
            let n = self.0.len().min(out.len());
            out[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    #[test]
    fn events_read_before_a_decoder_error_are_kept() {
        let mut n = 0;
        let report = split(
            ThenFail(br#"{"Records":[{"eventID":"a"},{"eventID":"b"},{"ev"#),
            1 << 20,
            |_| n += 1,
        );
        assert_eq!(n, 2);
        let err = report.result.unwrap_err();
        assert_eq!(err.reason, FileErrorReason::Truncated);
    }

    /// Every item, owned, for comparisons across chunkings.
    #[derive(Debug, PartialEq, Clone)]
    enum Seen {
        Event(Vec<u8>, Option<String>),
        NotObject(u64, Vec<u8>),
        Skipped(u64, &'static str, u64, u64, Vec<u8>, Option<String>),
        Unsplit(u64, Vec<u8>),
    }

    fn seen_with(input: &[u8], chunk: usize, limits: Limits) -> (Vec<Seen>, Report) {
        let mut got = Vec::new();
        let report = split_limited(Trickle(input, chunk), limits, |item| {
            got.push(match item {
                Item::Event { raw, head } => {
                    Seen::Event(raw.to_vec(), head.event_id.map(Cow::into_owned))
                }
                Item::NotAnObject { index, raw } => Seen::NotObject(index, raw.to_vec()),
                Item::Skipped(s) => Seen::Skipped(
                    s.index,
                    s.reason.as_str(),
                    s.offset,
                    s.size,
                    s.raw.to_vec(),
                    s.event_id,
                ),
                Item::Unsplit { offset, raw } => Seen::Unsplit(offset, raw.to_vec()),
            })
        });
        (got, report)
    }

    fn seen(input: &[u8], chunk: usize, max_event_bytes: usize) -> (Vec<Seen>, Report) {
        seen_with(input, chunk, Limits::events(max_event_bytes))
    }

    fn ev(id: &str) -> Seen {
        Seen::Event(
            format!(r#"{{"eventID":"{id}"}}"#).into_bytes(),
            Some(id.into()),
        )
    }

    #[test]
    fn non_objects_straddling_the_window_keep_their_bytes() {
        // The regression: the start offset of a non-object was taken before the window was
        // refilled (and moved), so a large one across a refill sliced the wrong bytes or panicked.
        let mut input = String::from(r#"{"Records":["#);
        let mut want = Vec::new();
        for i in 0..40 {
            let text = format!(
                "\"{}\"",
                char::from(b'a' + (i % 26) as u8).to_string().repeat(10_000)
            );
            input.push_str(&format!(r#"{{"eventID":"e{i}"}},{text},"#));
            want.push(ev(&format!("e{i}")));
            want.push(Seen::NotObject(2 * i + 1, text.into_bytes()));
        }
        input.push_str(r#"{"eventID":"last"}]}"#);
        want.push(ev("last"));
        for chunk in [READ_CHUNK, 4096, 9_999, 100_003] {
            let (got, report) = seen(input.as_bytes(), chunk, 1 << 20);
            assert_eq!(
                report.result.as_ref().unwrap(),
                &Kind::Events,
                "chunk {chunk}"
            );
            assert_eq!(report.not_objects, 40);
            assert!(got == want, "chunk {chunk}");
        }
    }

    #[test]
    fn an_event_over_the_limit_is_stepped_over_and_its_neighbours_pass() {
        let big = format!(r#"{{"pad":"{}","eventID":"big"}}"#, "x".repeat(10_000));
        let input = format!(r#"{{"Records":[{{"eventID":"a"}},{big},{{"eventID":"b"}}]}}"#);
        for chunk in [100, 7, 1 << 20] {
            let (got, report) = seen(input.as_bytes(), chunk, 1000);
            assert_eq!(report.result.unwrap(), Kind::Events);
            assert_eq!(report.events, 2);
            assert_eq!(report.skipped, 1);
            let preview = big.as_bytes()[..PREVIEW_BYTES].to_vec();
            assert_eq!(
                got,
                vec![
                    ev("a"),
                    Seen::Skipped(
                        1,
                        "event_too_large",
                        28,
                        big.len() as u64,
                        preview,
                        Some("big".into())
                    ),
                    ev("b"),
                ],
                "chunk {chunk}"
            );
        }
    }

    #[test]
    fn a_syntax_error_skips_only_its_event() {
        let bad = r#"{"eventID":"bad","a":tru,"b":"}]"}"#;
        let input = format!(r#"{{"Records":[{{"eventID":"a"}}, {bad} ,{{"eventID":"b"}}]}}"#);
        for chunk in [1, 5, 1 << 20] {
            let (got, report) = seen(input.as_bytes(), chunk, 1 << 20);
            assert_eq!(report.result.unwrap(), Kind::Events);
            assert_eq!(
                got,
                vec![
                    ev("a"),
                    Seen::Skipped(
                        1,
                        "malformed_json",
                        29,
                        bad.len() as u64,
                        bad.into(),
                        Some("bad".into())
                    ),
                    ev("b"),
                ],
                "chunk {chunk}"
            );
        }
    }

    #[test]
    fn where_no_end_can_be_found_the_rest_goes_out_raw() {
        let head = r#"{"Records":[{"eventID":"a"},"#;
        let tail = r#"{"eventID":"bad","a":[1}, {"eventID":"b"}]}"#;
        let input = format!("{head}{tail}");
        for chunk in [3, 1 << 20] {
            let (got, report) = seen(input.as_bytes(), chunk, 1 << 20);
            let err = report.result.unwrap_err();
            assert_eq!(err.reason, FileErrorReason::Malformed);
            assert!(err.detail.contains("raw bytes"), "{}", err.detail);
            assert_eq!(got[0], ev("a"));
            let mut rest = Vec::new();
            for s in &got[1..] {
                match s {
                    Seen::Unsplit(off, raw) => {
                        assert_eq!(*off as usize, head.len() + rest.len());
                        rest.extend_from_slice(raw);
                    }
                    other => panic!("{other:?}"),
                }
            }
            assert_eq!(rest, tail.as_bytes(), "chunk {chunk}");
        }
        // Garbage between entries: the rest from the garbage on.
        let (got, report) = seen(
            br#"{"Records":[{"eventID":"a"} x {"eventID":"b"}]}"#,
            4,
            1 << 20,
        );
        assert_eq!(
            report.result.unwrap_err().reason,
            FileErrorReason::Malformed
        );
        assert_eq!(
            got,
            vec![
                ev("a"),
                Seen::Unsplit(28, br#"x {"eventID":"b"}]}"#.to_vec())
            ]
        );
    }

    #[test]
    fn invalid_utf8_in_one_event_skips_it_alone() {
        for bad in [
            &b"{\"eventID\":\"u\",\"x\":\"\xff\xfe\"}"[..],
            &b"{\"eventID\":\"u\xc3\"}"[..],
            &b"\"str\x80\""[..],
        ] {
            let mut input = br#"{"Records":[{"eventID":"a"},"#.to_vec();
            input.extend_from_slice(bad);
            input.extend_from_slice(br#",{"eventID":"b"}]}"#);
            for chunk in [2, 1 << 20] {
                let (got, report) = seen(&input, chunk, 1 << 20);
                assert_eq!(report.result.as_ref().unwrap(), &Kind::Events);
                assert_eq!(got.len(), 3, "{got:?}");
                assert_eq!(got[0], ev("a"));
                assert_eq!(got[2], ev("b"));
                match &got[1] {
                    Seen::Skipped(1, "invalid_utf8", 28, size, raw, _) => {
                        assert_eq!(raw.as_slice(), bad);
                        assert_eq!(*size, bad.len() as u64);
                    }
                    other => panic!("{other:?}"),
                }
            }
        }
    }

    #[test]
    fn the_decompressed_limit_stops_the_file_after_the_events_before_it() {
        let input = br#"{"Records":[{"eventID":"a"},{"eventID":"b"},{"eventID":"c"}]}"#;
        let at = |limit: u64| {
            let limits = Limits {
                max_event_bytes: 1 << 20,
                max_decompressed_bytes: limit,
            };
            seen_with(input, 5, limits)
        };
        let (got, report) = at(input.len() as u64);
        assert_eq!(report.result.unwrap(), Kind::Events);
        assert_eq!(got.len(), 3);
        let (got, report) = at(45);
        assert_eq!(got, vec![ev("a"), ev("b")]);
        assert_eq!(report.decompressed_bytes, 45);
        assert_eq!(
            report.result.unwrap_err().reason,
            FileErrorReason::InflationLimit
        );
    }

    /// A small seeded generator (xorshift): the property tests stay reproducible without a
    /// dependency.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n.max(1) as u64) as usize
        }
    }

    /// A reader that hands out pieces of random sizes.
    struct Chunked<'a>(&'a [u8], Rng, usize);
    impl Read for Chunked<'_> {
        fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
            let want = 1 + self.1.below(self.2);
            let n = self.0.len().min(want).min(out.len());
            out[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    fn items_of(reader: impl Read, max: usize, window: usize) -> (Vec<Seen>, String) {
        let mut got = Vec::new();
        let report = split_windowed(reader, Limits::events(max), window, |item| {
            got.push(match item {
                Item::Event { raw, head } => {
                    Seen::Event(raw.to_vec(), head.event_id.map(Cow::into_owned))
                }
                Item::NotAnObject { index, raw } => Seen::NotObject(index, raw.to_vec()),
                Item::Skipped(s) => Seen::Skipped(
                    s.index,
                    s.reason.as_str(),
                    s.offset,
                    s.size,
                    s.raw.to_vec(),
                    s.event_id,
                ),
                Item::Unsplit { offset, raw } => Seen::Unsplit(offset, raw.to_vec()),
            })
        });
        // Unsplit pieces depend on the window; their concatenation does not.
        let mut merged: Vec<Seen> = Vec::new();
        for s in got {
            match (merged.last_mut(), s) {
                (Some(Seen::Unsplit(_, acc)), Seen::Unsplit(_, raw)) => acc.extend(raw),
                (_, s) => merged.push(s),
            }
        }
        let result = match report.result {
            Ok(k) => format!("{k:?}"),
            Err(e) => e.reason.as_str().to_owned(),
        };
        (
            merged,
            format!(
                "{result} events={} skipped={}",
                report.events, report.skipped
            ),
        )
    }

    /// One generated element: good events, non-objects, and the hostile kinds.
    fn element(rng: &mut Rng, n: usize) -> Vec<u8> {
        let pad = "p".repeat(rng.below(3000));
        match rng.below(10) {
            0 => format!(r#""text {n} {pad}""#).into_bytes(),
            1 => format!("{n}").into_bytes(),
            2 => format!(r#"{{"eventID":"x{n}","a":tru,"pad":"{pad}"}}"#).into_bytes(),
            3 => {
                let mut v = format!(r#"{{"eventID":"u{n}","x":""#).into_bytes();
                v.extend_from_slice(b"\xff\xc3");
                v.extend_from_slice(br#""}"#);
                v
            }
            4 => format!(r#"{{"eventID":"big{n}","pad":"{}"}}"#, "b".repeat(5000)).into_bytes(),
            5 => format!(r#"[{n},{{"a":"]}}"}}]"#).into_bytes(),
            _ => format!(
                r#"{{"eventID":"e{n}","s":"q"}}\","n":[1,{{"d":"{pad}"}}],"eventTime":"2024-01-01T00:00:00Z"}}"#
            )
            .into_bytes(),
        }
    }

    #[test]
    fn any_chunking_gives_the_same_items_as_one_buffer() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for case in 0..60 {
            let mut input = br#"{"Records":["#.to_vec();
            for n in 0..(1 + rng.below(40)) {
                if n > 0 {
                    input.extend_from_slice(if rng.below(4) == 0 { b" ,\n " } else { b"," });
                }
                input.extend(element(&mut rng, n));
            }
            input.extend_from_slice(b"]}");
            if case % 7 == 6 {
                // Truncated, or broken beyond finding an end.
                let cut = rng.below(input.len());
                input.truncate(cut);
            } else if case % 7 == 5 {
                let at = rng.below(input.len());
                input.insert(at, b'}');
            }
            let max = 4096;
            let whole = items_of(&input[..], max, READ_CHUNK);
            for _ in 0..4 {
                let biggest = [1, 7, 300, 70_000][rng.below(4)];
                let window = [1, 2, 13, 512, 5000][rng.below(5)];
                let seed = rng.next() | 1;
                let got = items_of(Chunked(&input, Rng(seed), biggest), max, window);
                assert!(
                    got == whole,
                    "case {case}: reads of up to {biggest}, window {window} (seed {seed}) differ:\n{:?}\n{:?}",
                    got.1,
                    whole.1
                );
            }
        }
    }

    /// Every one-byte-read window size up to the input's length gives what one buffer gives.
    fn same_for_every_window(input: &[u8], max: usize) -> (Vec<Seen>, String) {
        let whole = items_of(input, max, READ_CHUNK);
        for window in 1..=input.len() {
            let got = items_of(Trickle(input, 1), max, window);
            assert_eq!(got, whole, "window {window}");
        }
        whole
    }

    #[test]
    fn a_number_cut_by_the_window_is_not_a_syntax_error() {
        // fuzz/corpus/split/number-cut-by-window.json: serde reads an ignored `11.` at the end of the
        // window as an invalid number, not as cut off, so the element was skipped as malformed
        // in small windows and taken as a non-object in one buffer.
        let (items, result) =
            same_for_every_window(br#"{"Records":[11.8 Linux,{"eventID":"a"}]}"#, 1000);
        assert_eq!(items.first(), Some(&Seen::NotObject(0, b"11.8".to_vec())));
        assert!(result.starts_with("malformed_json"), "{result}");
        // fuzz/corpus/split/minus-cut-by-window.json: `-` at the window's end, then `0{`.
        let (items, _) = same_for_every_window(
            br#"{"Records":[{"eventID":"a"},-0{"eventTime":"x"}]}"#,
            1000,
        );
        assert_eq!(items.get(1), Some(&Seen::NotObject(1, b"-0".to_vec())));
    }

    #[test]
    fn a_number_inside_an_event_cut_by_the_window_keeps_the_event() {
        // The same inside an object: `"n":1.` at the window's end is not a syntax error.
        let input = br#"{"Records":[{"eventID":"a","n":-1.5e+3,"m":[0.25]},{"eventID":"b"}]}"#;
        let (items, result) = same_for_every_window(input, 1000);
        assert_eq!(result, "Events events=2 skipped=0");
        assert_eq!(items.len(), 2);
    }

    #[test]
    fn a_syntax_error_outside_records_sends_the_rest_of_the_file_out_raw() {
        // Before: only a file-level record, and the Records array after the error was dropped.
        let input = br#"{"eventVersion":tru,"Records":[{"eventID":"a"}]}"#;
        let (items, result) = same_for_every_window(input, 1000);
        assert_eq!(result, "malformed_json events=0 skipped=0");
        assert_eq!(
            items,
            vec![Seen::Unsplit(
                16,
                br#"tru,"Records":[{"eventID":"a"}]}"#.to_vec()
            )]
        );
        let (items, result) = same_for_every_window(br#"{"Records":[{"eventID":"a"}]} junk"#, 1000);
        assert_eq!(result, "malformed_json events=1 skipped=0");
        assert_eq!(items, vec![ev("a"), Seen::Unsplit(30, b"junk".to_vec())]);
        let (items, _) = same_for_every_window(br#"{"Records":[] "x":1}"#, 1000);
        assert_eq!(items, vec![Seen::Unsplit(14, br#""x":1}"#.to_vec())]);
    }

    #[test]
    fn large_events_are_read_in_linear_time() {
        // One 8 MiB event fed one byte per read would take minutes if each refill re-parsed it
        // from a window grown by a fixed step; geometric growth keeps it to a few parses.
        let big = format!(r#"{{"Records":[{{"pad":"{}"}}]}}"#, "x".repeat(8 << 20));
        let mut n = 0;
        let report = split(Trickle(big.as_bytes(), 1 << 16), 16 << 20, |_| n += 1);
        assert_eq!(report.result.unwrap(), Kind::Events);
        assert_eq!(n, 1);
    }

    #[test]
    fn reader_errors_map_to_reasons() {
        let eof = io::Error::new(io::ErrorKind::UnexpectedEof, "cut");
        assert_eq!(read_error(&eof).reason, FileErrorReason::Truncated);
        let bad = io::Error::new(io::ErrorKind::InvalidInput, "corrupt deflate stream");
        assert_eq!(read_error(&bad).reason, FileErrorReason::GzipCorrupt);
        let net = io::Error::new(io::ErrorKind::ConnectionReset, "reset");
        assert_eq!(read_error(&net).reason, FileErrorReason::Read);
    }
}
