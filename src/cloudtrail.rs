//! Split a CloudTrail delivery file (`{"Records":[…]}`) into events, streaming.
//!
//! The decompressed file is never held whole: a window over the reader grows only to the largest
//! event, and each event is handed on as the original bytes plus the few top-level fields the later
//! stages need (`Head`). serde_json validates every event while extracting those fields, so nothing
//! that leaves this module is malformed JSON.

use std::borrow::Cow;
use std::fmt;
use std::io::{self, Read};

use serde::Deserialize;
use serde::de::{self, IgnoredAny, MapAccess, Visitor};

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

/// Top-level event fields the pipeline routes and enriches on. Borrowed from the event bytes
/// unless the JSON string held escapes.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Head<'a> {
    pub event_time: Option<Cow<'a, str>>,
    pub source_ip: Option<Cow<'a, str>>,
    pub account: Option<Cow<'a, str>>,
    pub region: Option<Cow<'a, str>>,
    pub event_source: Option<Cow<'a, str>>,
    pub event_type: Option<Cow<'a, str>>,
    pub event_id: Option<Cow<'a, str>>,
    pub event_name: Option<Cow<'a, str>>,
    pub read_only: Option<bool>,
}

impl Head<'_> {
    /// The same fields, owned: transforms hold events across a batch.
    pub fn into_owned(self) -> Head<'static> {
        let own = |c: Option<Cow<'_, str>>| c.map(|c| Cow::Owned(c.into_owned()));
        Head {
            event_time: own(self.event_time),
            source_ip: own(self.source_ip),
            account: own(self.account),
            region: own(self.region),
            event_source: own(self.event_source),
            event_type: own(self.event_type),
            event_id: own(self.event_id),
            event_name: own(self.event_name),
            read_only: self.read_only,
        }
    }
}

/// The head of one event that must be a JSON object (a transform's output).
pub fn head_of(event: &[u8]) -> Result<Head<'_>, serde_json::Error> {
    serde_json::from_slice(event)
}

/// One element of the `Records` array.
#[derive(Debug)]
pub enum Item<'a> {
    /// A JSON object: the exact original bytes (no surrounding whitespace) and its head.
    Event { raw: &'a [u8], head: Head<'a> },
    /// Valid JSON that is not an object (a string, number, null, array).
    NotAnObject { index: u64, raw: &'a [u8] },
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
    pub decompressed_bytes: u64,
}

/// Reads a CloudTrail file from `reader` (already decompressed) and calls `on_item` for each
/// `Records` element, in order.
pub fn split<R, F>(reader: R, max_event_bytes: usize, on_item: F) -> Report
where
    R: Read,
    F: FnMut(Item<'_>),
{
    let mut s = Splitter {
        win: Window::new(reader),
        max_event_bytes,
        events: 0,
        not_objects: 0,
    };
    let result = s.run(on_item);
    Report {
        result,
        events: s.events,
        not_objects: s.not_objects,
        decompressed_bytes: s.win.total,
    }
}

/// A sliding window over the reader: `buf[pos..end]` is read but not yet consumed.
struct Window<R> {
    reader: R,
    buf: Vec<u8>,
    pos: usize,
    end: usize,
    eof: bool,
    total: u64,
    /// A read error that came after some bytes of the same fill: those bytes are split first
    /// (events before a truncation are kept), the error is reported on the next fill.
    deferred: Option<io::Error>,
}

impl<R: Read> Window<R> {
    fn new(reader: R) -> Self {
        Self {
            reader,
            buf: Vec::new(),
            pos: 0,
            end: 0,
            eof: false,
            total: 0,
            deferred: None,
        }
    }

    fn pending(&self) -> &[u8] {
        &self.buf[self.pos..self.end]
    }

    /// Reads more, at least as much again as is pending so that re-parsing a large partial
    /// event stays linear overall. Returns false at end of input.
    fn fill(&mut self) -> Result<bool, io::Error> {
        if let Some(e) = self.deferred.take() {
            return Err(e);
        }
        if self.eof {
            return Ok(false);
        }
        if self.pos > 0 {
            self.buf.copy_within(self.pos..self.end, 0);
            self.end -= self.pos;
            self.pos = 0;
        }
        let want = self.end + self.end.max(READ_CHUNK);
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
                    self.deferred = Some(e);
                    break;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(self.end > before)
    }
}

struct Splitter<R> {
    win: Window<R>,
    max_event_bytes: usize,
    events: u64,
    not_objects: u64,
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
                    Err(_) => SplitError::new(
                        FileErrorReason::NotJson,
                        format!("the file is not JSON (it starts with byte 0x{b:02x})"),
                    ),
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
                    return Err(self.malformed("expected ',' or '}' in the top-level object"));
                }
                self.win.pos += 1;
                b = self.expect_more("the top-level object")?;
            }
            first = false;
            if b != b'"' {
                return Err(self.malformed("expected a key in the top-level object"));
            }
            let (key, _) = self.parse_owned::<String>()?;
            if self.expect_more("the top-level object")? != b':' {
                return Err(self.malformed("expected ':' after a top-level key"));
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
                self.parse_owned::<IgnoredAny>()?;
            }
        }
        if self.peek()?.is_some() {
            return Err(self.malformed("trailing data after the top-level object"));
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
            if b == b'{' {
                self.event(on_item)?;
            } else {
                let start = self.win.pos;
                let (_, end) = self.parse_owned::<IgnoredAny>()?;
                self.not_objects += 1;
                on_item(Item::NotAnObject {
                    index,
                    raw: &self.win.buf[start..end],
                });
            }
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
                _ => return Err(self.malformed("expected ',' or ']' in the Records array")),
            }
        }
    }

    /// One event object starting at `pos`.
    fn event<F: FnMut(Item<'_>)>(&mut self, on_item: &mut F) -> Result<(), SplitError> {
        loop {
            let slice = &self.win.buf[self.win.pos..self.win.end];
            let mut stream = serde_json::Deserializer::from_slice(slice).into_iter::<Head<'_>>();
            match stream.next() {
                Some(Ok(_)) if stream.byte_offset() > self.max_event_bytes => {
                    return Err(self.too_large());
                }
                Some(Ok(head)) => {
                    let len = stream.byte_offset();
                    self.events += 1;
                    on_item(Item::Event {
                        raw: &slice[..len],
                        head,
                    });
                    self.win.pos += len;
                    return Ok(());
                }
                Some(Err(e)) if e.is_eof() => self.more_for_value()?,
                Some(Err(e)) => return Err(self.json_error(&e)),
                None => return Err(self.truncated("an event")),
            }
        }
    }

    /// Parses one value at `pos` into an owned `T`; returns it and the end offset in `buf`.
    fn parse_owned<T: de::DeserializeOwned>(&mut self) -> Result<(T, usize), SplitError> {
        loop {
            let mut stream =
                serde_json::Deserializer::from_slice(self.win.pending()).into_iter::<T>();
            match stream.next() {
                // A number at the very end of what was read may continue in the next read.
                Some(Ok(_))
                    if self.win.pos + stream.byte_offset() == self.win.end && !self.win.eof =>
                {
                    self.more_for_value()?;
                }
                Some(Ok(v)) => {
                    self.win.pos += stream.byte_offset();
                    return Ok((v, self.win.pos));
                }
                Some(Err(e)) if e.is_eof() => self.more_for_value()?,
                Some(Err(e)) => return Err(self.json_error(&e)),
                None => return Err(self.truncated("a value")),
            }
        }
    }

    /// Reads more for a value that is incomplete in the window, within the size limit.
    fn more_for_value(&mut self) -> Result<(), SplitError> {
        if self.win.end - self.win.pos > self.max_event_bytes {
            return Err(self.too_large());
        }
        if self.fill()? {
            Ok(())
        } else {
            Err(self.truncated("a value"))
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
        self.win.fill().map_err(|e| read_error(&e))
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

    fn json_error(&self, e: &serde_json::Error) -> SplitError {
        SplitError::new(
            FileErrorReason::Malformed,
            format!("{e} (in the value starting near byte {})", self.offset()),
        )
    }

    /// Offset of `pos` in the whole decompressed stream.
    fn offset(&self) -> u64 {
        self.win.total - (self.win.end - self.win.pos) as u64
    }
}

/// Maps a reader error: decoders report corrupt data as `InvalidInput`/`InvalidData` and a cut-off
/// stream as `UnexpectedEof`; anything else came from the source itself.
pub fn read_error(e: &io::Error) -> SplitError {
    let reason = match e.kind() {
        io::ErrorKind::UnexpectedEof => FileErrorReason::Truncated,
        io::ErrorKind::InvalidInput | io::ErrorKind::InvalidData => FileErrorReason::GzipCorrupt,
        _ => FileErrorReason::Read,
    };
    SplitError::new(reason, e.to_string())
}

/// CloudTrail's own field names for the `Head` fields.
fn head_slot<'h, 'a>(head: &'h mut Head<'a>, key: &str) -> Option<&'h mut Option<Cow<'a, str>>> {
    Some(match key {
        "eventTime" => &mut head.event_time,
        "sourceIPAddress" => &mut head.source_ip,
        "recipientAccountId" => &mut head.account,
        "awsRegion" => &mut head.region,
        "eventSource" => &mut head.event_source,
        "eventType" => &mut head.event_type,
        "eventID" => &mut head.event_id,
        "eventName" => &mut head.event_name,
        _ => return None,
    })
}

impl<'de> Deserialize<'de> for Head<'de> {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(HeadVisitor)
    }
}

struct HeadVisitor;

impl<'de> Visitor<'de> for HeadVisitor {
    type Value = Head<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a CloudTrail event object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Head<'de>, A::Error> {
        let mut head = Head::default();
        // Duplicate keys are valid JSON: the last one wins, as in most readers.
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            if key == "readOnly" {
                head.read_only = match map.next_value::<Lenient<'de>>()? {
                    Lenient::Bool(b) => Some(b),
                    _ => None,
                };
                continue;
            }
            match head_slot(&mut head, &key) {
                Some(slot) => {
                    *slot = match map.next_value::<Lenient<'de>>()? {
                        Lenient::Str(s) => Some(s),
                        _ => None,
                    }
                }
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(head)
    }
}

/// A string, a bool, or any other JSON value: a field of the wrong type is not routed on, but
/// the event itself is still good.
enum Lenient<'a> {
    Str(Cow<'a, str>),
    Bool(bool),
    Other,
}

impl<'de> Deserialize<'de> for Lenient<'de> {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(LenientVisitor)
    }
}

struct LenientVisitor;

impl<'de> Visitor<'de> for LenientVisitor {
    type Value = Lenient<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Lenient::Str(Cow::Borrowed(v)))
    }
    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Lenient::Str(Cow::Owned(v.to_owned())))
    }
    fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
        Ok(Lenient::Str(Cow::Owned(v)))
    }
    fn visit_bool<E>(self, v: bool) -> Result<Self::Value, E> {
        Ok(Lenient::Bool(v))
    }
    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(Lenient::Other)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(Lenient::Other)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(Lenient::Other)
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(Lenient::Other)
    }
    fn visit_none<E>(self) -> Result<Self::Value, E> {
        Ok(Lenient::Other)
    }
    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Lenient::Other)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Lenient::Other)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(
            reason(br#"{"Records":[{"a":tru}]}"#),
            FileErrorReason::Malformed
        );
        assert_eq!(reason(br#"{"Records":[]} x"#), FileErrorReason::Malformed);
        assert_eq!(
            reason(b"{\"Records\":[{\"a\":\"\x01\"}]}"),
            FileErrorReason::Malformed
        );
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

    #[test]
    fn an_event_over_the_limit_stops_the_file() {
        let big = format!(
            r#"{{"Records":[{{"eventID":"a"}},{{"pad":"{}"}}]}}"#,
            "x".repeat(10_000)
        );
        let mut n = 0;
        let report = split(Trickle(big.as_bytes(), 100), 1000, |_| n += 1);
        assert_eq!(n, 1);
        assert_eq!(
            report.result.unwrap_err().reason,
            FileErrorReason::EventTooLarge
        );
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
