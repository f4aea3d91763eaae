//! The window over the decompressed reader: refills that keep parsing linear, and the
//! per-file decompressed-bytes limit.

use std::io::{self, Read};

use super::{FileErrorReason, SplitError};

/// A sliding window over the reader: `buf[pos..end]` is read but not yet consumed. Offsets into
/// `buf` are only valid until the next fill, which moves the pending bytes to the front.
pub(super) struct Window<R> {
    pub(super) reader: R,
    pub(super) buf: Vec<u8>,
    pub(super) pos: usize,
    pub(super) end: usize,
    pub(super) eof: bool,
    pub(super) total: u64,
    /// `pipeline.max_decompressed_bytes`.
    pub(super) limit: u64,
    /// The least read at a time.
    pub(super) chunk: usize,
    /// A read error that came after some bytes of the same fill: those bytes are split first
    /// (events before a truncation are kept), the error is reported on the next fill.
    pub(super) deferred: Option<SplitError>,
}

impl<R: Read> Window<R> {
    pub(super) fn new(reader: R, limit: u64, chunk: usize) -> Self {
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

    pub(super) fn pending(&self) -> &[u8] {
        &self.buf[self.pos..self.end]
    }

    /// Reads more, at least as much again as is pending so that re-parsing a large partial
    /// event stays linear overall, and never past the decompressed limit. Returns false at end
    /// of input.
    pub(super) fn fill(&mut self) -> Result<bool, SplitError> {
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
    pub(super) fn probe_past_limit(&mut self) -> Result<bool, SplitError> {
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
