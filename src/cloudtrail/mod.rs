//! Split a CloudTrail delivery file (`{"Records":[…]}`) into events, streaming.
//!
//! The decompressed file is never held whole: a window over the reader grows only to the largest
//! event, and each event is handed on as the original bytes plus the few top-level fields the later
//! stages need (`Head`). serde_json validates every event while extracting those fields, so nothing
//! that leaves this module is malformed JSON.

mod elements;
pub mod fields;
mod head;
mod scan;
pub mod scrub;
mod splitter;
mod step;
mod window;

use std::fmt;
use std::io::Read;

pub use elements::{Element, split_elements};
pub use head::{Head, Key, Members, head_of, listed_head_of};
pub use window::read_error;

use splitter::Splitter;
use window::Window;

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
    /// Keep each event's top-level members in its head (for detection: `Head::members`).
    pub members: bool,
}

impl Limits {
    /// Only an event-size limit.
    pub fn events(max_event_bytes: usize) -> Limits {
        Limits {
            max_event_bytes,
            max_decompressed_bytes: u64::MAX,
            members: false,
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
        members: limits.members,
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

#[cfg(test)]
mod tests;
