//! Stepping over an element serde refused, by finding its end with the scanner: its bytes
//! (or their first `PREVIEW_BYTES`), its size and its eventID go to the error output.

use std::io::Read;

use super::scan;
use super::splitter::Splitter;
use super::{Item, PREVIEW_BYTES, RecordReason, Skipped, SplitError};

impl<R: Read> Splitter<R> {
    /// Steps over the element at `pos` by finding its end without parsing it. Its bytes are
    /// kept while they are within the size limit; past it only the first `PREVIEW_BYTES` are.
    /// When the end cannot be found, the rest of the file goes out raw.
    pub(super) fn step_over<F: FnMut(Item<'_>)>(
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
                // A work limit inside the element: what was read of it is accounted for.
                Err(e) if sk.preview.is_some() => {
                    let size = sk.dropped + scanned as u64;
                    let why = format!("{detail}; its first {size} bytes, then: {}", e.detail);
                    self.skipped += 1;
                    on_item(sk.item(size, &[], why));
                    self.win.pos = self.win.end;
                    return Err(e);
                }
                Err(e) => return Err(self.stopped_inside(e, on_item)),
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

    /// Steps over a top-level value other than `Records`, whatever its size: it is ignored
    /// anyway, so its bytes are let go of as they are scanned.
    pub(super) fn skip_value<F: FnMut(Item<'_>)>(
        &mut self,
        on_item: &mut F,
    ) -> Result<(), SplitError> {
        let mut scan = scan::Extent::default();
        loop {
            match scan.feed(self.win.pending()) {
                scan::Step::End(n) => {
                    self.win.pos += n;
                    return Ok(());
                }
                scan::Step::Broken(at) => {
                    self.win.pos += at;
                    let what = "a top-level value over the size limit has no end";
                    return Err(self.unsplit(what, on_item));
                }
                scan::Step::More => self.win.pos = self.win.end,
            }
            if !self.fill()? {
                if scan.ends_at_eof() {
                    return Ok(());
                }
                return Err(self.truncated("a top-level value over the size limit"));
            }
        }
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
    pub(super) fn keep_preview(&mut self, piece: &[u8]) {
        let p = self.preview.get_or_insert_with(Vec::new);
        let need = PREVIEW_BYTES.saturating_sub(p.len());
        p.extend_from_slice(piece.get(..need.min(piece.len())).unwrap_or_default());
    }

    /// Looks for the first eventID in the next piece of the element's bytes; one that runs
    /// across pieces is found in the seam, so the result does not depend on the pieces.
    pub(super) fn look_for_id(&mut self, piece: &[u8]) {
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
    pub(super) fn item<'a>(&'a mut self, size: u64, kept: &'a [u8], detail: String) -> Item<'a> {
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

/// The first short, plain eventID in an element's bytes.
pub(super) fn event_id_in(bytes: &[u8]) -> Option<String> {
    match find_event_id(bytes) {
        IdSearch::Found(id) => Some(id),
        IdSearch::Cut | IdSearch::Absent => None,
    }
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
