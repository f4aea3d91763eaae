//! The state machine over the top-level object and the `Records` array.

use std::io::Read;

use serde::de::{self, IgnoredAny};

use super::head::Listed;
use super::window::Window;
use super::{FileErrorReason, Head, Item, Kind, RecordReason, SplitError, UNSPLIT_CHUNK};

pub(super) struct Splitter<R> {
    pub(super) win: Window<R>,
    pub(super) max_event_bytes: usize,
    pub(super) events: u64,
    pub(super) not_objects: u64,
    pub(super) skipped: u64,
    /// Keep each event's top-level members in its head (`Head::members`).
    pub(super) members: bool,
}

/// Why one element could not be taken as it is.
pub(super) enum Bad {
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
    pub(super) fn run<F: FnMut(Item<'_>)>(&mut self, mut on_item: F) -> Result<Kind, SplitError> {
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
                    // Whatever it holds goes out raw, like an element whose end is not found.
                    return Err(self.unsplit_as(
                        FileErrorReason::RecordsNotArray,
                        "the Records value is not an array",
                        &mut on_item,
                    ));
                }
                self.win.pos += 1;
                self.records(&mut on_item)?;
            } else {
                digest_like |= DIGEST_KEYS.contains(&key.as_str());
                self.ignore_value(&mut on_item)?;
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

    /// A top-level value other than `Records`: parsed (so a syntax error is found) while it is
    /// within the size limit, stepped over with the scanner when it is larger, so that the
    /// `Records` after it are still read.
    fn ignore_value<F: FnMut(Item<'_>)>(&mut self, on_item: &mut F) -> Result<(), SplitError> {
        match self.parse_value::<IgnoredAny>() {
            Ok(_) => Ok(()),
            Err(Bad::TooLarge) => self.skip_value(on_item),
            Err(bad) => {
                let e = self.parse_error(bad);
                self.or_unsplit(Err::<(), _>(e), on_item)
            }
        }
    }

    /// The elements of the `Records` array, after its `[`.
    pub(super) fn records<F: FnMut(Item<'_>)>(
        &mut self,
        on_item: &mut F,
    ) -> Result<(), SplitError> {
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
    pub(super) fn element<F: FnMut(Item<'_>)>(
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
            Err(Bad::File(e)) => return Err(self.stopped_inside(e, on_item)),
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
    pub(super) fn event<F: FnMut(Item<'_>)>(&mut self, on_item: &mut F) -> Result<(), Bad> {
        loop {
            // No further than the size limit: what lies beyond cannot change the outcome, and
            // the outcome does not depend on how much the window happens to hold.
            let end = self
                .win
                .end
                .min(self.win.pos.saturating_add(self.max_event_bytes + 1));
            let slice = &self.win.buf[self.win.pos..end];
            if self.members
                && let (Some(Ok(Listed(mut head))), len) = first::<Listed<'_>>(slice)
                && len <= self.max_event_bytes
            {
                let raw = slice.get(..len).unwrap_or_default();
                // No UTF-8 check of its own: serde checked every key and every value's bytes
                // (a raw value is checked whole), and the rest is JSON's ASCII punctuation.
                debug_assert!(std::str::from_utf8(raw).is_ok());
                if let Some(m) = head.members.as_mut() {
                    m.raw = raw;
                }
                self.events += 1;
                on_item(Item::Event { raw, head });
                self.win.pos += len;
                return Ok(());
            }
            // Without the list, or when it was not read whole: decided as always (an error is
            // classified the same with or without it).
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
    pub(super) fn not_object<F: FnMut(Item<'_>)>(
        &mut self,
        index: u64,
        on_item: &mut F,
    ) -> Result<(), Bad> {
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

    /// A syntax error in the top-level object: the rest of the file from `pos` goes out raw (it
    /// may hold the Records array), so none of it is dropped with only a file-level record.
    pub(super) fn or_unsplit<T, F: FnMut(Item<'_>)>(
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

    /// A work limit (`max_decompressed_bytes`, `max_file_bytes`) stopped the file inside the
    /// element at `pos`: the bytes of it read before the limit go out raw, so they are not
    /// dropped behind a file-level record. Other file errors pass as they are.
    pub(super) fn stopped_inside<F: FnMut(Item<'_>)>(
        &mut self,
        e: SplitError,
        on_item: &mut F,
    ) -> SplitError {
        if !matches!(
            e.reason,
            FileErrorReason::InflationLimit | FileErrorReason::FileTooLarge
        ) || self.win.pending().is_empty()
        {
            return e;
        }
        let from = self.offset();
        self.emit_pending(on_item);
        SplitError::new(
            e.reason,
            format!(
                "{}; the {} bytes read of the element at byte {from} are in the error output as raw bytes",
                e.detail,
                self.win.total - from
            ),
        )
    }

    /// Hands on what the window holds from `pos` as `Unsplit` pieces.
    fn emit_pending<F: FnMut(Item<'_>)>(&mut self, on_item: &mut F) {
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
    }

    /// Hands on the rest of the file from `pos` as raw bytes, and says why the split stopped.
    pub(super) fn unsplit<F: FnMut(Item<'_>)>(
        &mut self,
        what: &str,
        on_item: &mut F,
    ) -> SplitError {
        self.unsplit_as(FileErrorReason::Malformed, what, on_item)
    }

    /// `unsplit`, with the reason the file-level record gives.
    pub(super) fn unsplit_as<F: FnMut(Item<'_>)>(
        &mut self,
        reason: FileErrorReason,
        what: &str,
        on_item: &mut F,
    ) -> SplitError {
        let from = self.offset();
        loop {
            self.emit_pending(on_item);
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
            reason,
            format!(
                "{what} near byte {from}; the rest of the file ({} bytes) is in the error output as raw bytes",
                self.win.total - from
            ),
        )
    }

    /// Parses one value at `pos` into an owned `T`; returns it and the end offset in `buf`.
    pub(super) fn parse_owned<T: de::DeserializeOwned>(
        &mut self,
    ) -> Result<(T, usize), SplitError> {
        match self.parse_value::<T>() {
            Ok((v, _)) => Ok((v, self.win.pos)),
            Err(bad) => Err(self.parse_error(bad)),
        }
    }

    /// The file-level error for a value outside `Records` that could not be parsed.
    fn parse_error(&self, bad: Bad) -> SplitError {
        match bad {
            Bad::File(e) => e,
            Bad::TooLarge => self.too_large(),
            Bad::Syntax(e) => SplitError::new(
                FileErrorReason::Malformed,
                format!("{e} (in the value starting near byte {})", self.offset()),
            ),
            Bad::InvalidUtf8 => self.malformed("bytes that are not UTF-8"),
        }
    }

    /// Parses one value at `pos` into an owned `T`, consuming it; returns it and its start
    /// offset in `buf` (valid until the next fill).
    pub(super) fn parse_value<T: de::DeserializeOwned>(&mut self) -> Result<(T, usize), Bad> {
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
    pub(super) fn more_for_value(&mut self) -> Result<(), Bad> {
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
    pub(super) fn peek(&mut self) -> Result<Option<u8>, SplitError> {
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

    pub(super) fn expect_more(&mut self, inside: &str) -> Result<u8, SplitError> {
        self.peek()?.ok_or_else(|| self.truncated(inside))
    }

    pub(super) fn fill(&mut self) -> Result<bool, SplitError> {
        self.win.fill()
    }

    pub(super) fn too_large(&self) -> SplitError {
        SplitError::new(
            FileErrorReason::EventTooLarge,
            format!(
                "the value after event {} is over the {}-byte limit (pipeline.max_event_bytes)",
                self.events, self.max_event_bytes
            ),
        )
    }

    pub(super) fn truncated(&self, inside: &str) -> SplitError {
        SplitError::new(
            FileErrorReason::Truncated,
            format!(
                "the data ends inside {inside} after {} bytes and {} events",
                self.win.total, self.events
            ),
        )
    }

    pub(super) fn malformed(&self, what: &str) -> SplitError {
        SplitError::new(
            FileErrorReason::Malformed,
            format!("{what} near byte {}", self.offset()),
        )
    }

    /// Offset of `pos` in the whole decompressed stream.
    pub(super) fn offset(&self) -> u64 {
        self.win.total - (self.win.end - self.win.pos) as u64
    }
}

/// The first value of `slice` read as `T`, and the offset where serde stopped.
fn first<'s, T: de::Deserialize<'s>>(slice: &'s [u8]) -> (Option<serde_json::Result<T>>, usize) {
    let mut stream = serde_json::Deserializer::from_slice(slice).into_iter::<T>();
    let next = stream.next();
    (next, stream.byte_offset())
}
