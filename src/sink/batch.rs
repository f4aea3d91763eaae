//! Per-partition buffers that flush by record count, uncompressed bytes or age, like Firehose's
//! buffering hints. A buffer compresses as it fills (chunk by chunk on the encoder pool), so an
//! open buffer holds at most one uncompressed chunk. Buffers allocate on their first record and
//! are charged against the process-wide budget (`budget`); when it is reached, the oldest
//! buffers are sealed early. Age deadlines come from a heap, so sealing by age costs
//! O(log n) per sealed buffer, not a scan of every buffer.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::budget::{BUFFER_OVERHEAD, Budget, Share};
use super::encode::{Encoder, Part};
use crate::ack::{Hold, Holds};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_records: u64,
    pub max_bytes: u64,
    pub max_age: Duration,
    /// Uncompressed bytes per compressed member.
    pub chunk_bytes: usize,
    /// Most buffers open at once: opening one more first seals the oldest. Bounds what events
    /// spread over many partitions (hours, accounts) hold open, whatever they weigh.
    pub max_open: usize,
}

/// What an object holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Events,
    Errors,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Events => "events",
            Kind::Errors => "errors",
        }
    }
}

/// A closed batch on its way to the store: its partition (key prefix relative to the output
/// root) and compressed parts in order.
#[derive(Debug)]
pub struct Sealed {
    pub kind: Kind,
    pub partition: String,
    pub parts: Vec<Part>,
    pub records: u64,
    pub bytes: u64,
    /// The notifications whose records this batch holds; committed once it is written.
    pub holds: Holds,
    /// The object name's extension (`.json.gz`, `.parquet`, ...) and its content type.
    pub extension: &'static str,
    pub content_type: &'static str,
    /// With a Kinesis output: the batch's lines, uncompressed, with their partition keys.
    pub lines: Option<Vec<LineChunk>>,
}

/// The Kinesis output's view of one chunk of a buffer: the uncompressed JSON lines as they
/// were staged (shared with the compressor, not copied) and, recorded as each line was
/// appended, where it ends and its partition key.
#[derive(Debug, Default)]
pub struct LineChunk {
    data: Bytes,
    /// Per line: its end in `data` (past its newline) and the end of its key in `keys`.
    ends: Vec<(usize, usize)>,
    keys: String,
}

impl LineChunk {
    /// Each line (without its newline) and its key, if the event has one.
    pub fn lines(&self) -> impl Iterator<Item = (&[u8], Option<&str>)> {
        let (mut line, mut key) = (0, 0);
        self.ends.iter().map(move |&(l, k)| {
            let bytes = self.data.get(line..l).unwrap_or_default();
            let bytes = bytes.strip_suffix(b"\n").unwrap_or(bytes);
            let k_str = self.keys.get(key..k).filter(|k| !k.is_empty());
            (line, key) = (l, k);
            (bytes, k_str)
        })
    }

    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }
}

/// What an events batcher records for the Kinesis output (`[output.kinesis]`).
#[derive(Debug, Clone)]
pub struct Forward {
    /// `partition_key`: the event field whose value is each record's key.
    pub key_field: String,
    /// `write_objects`: false = events go to the stream only, so they are not compressed.
    pub objects: bool,
}

/// A staged chunk's lines, while it fills.
#[derive(Debug, Default)]
struct Staged {
    ends: Vec<(usize, usize)>,
    keys: String,
    /// Chunks already handed to the compressor.
    done: Vec<LineChunk>,
    /// What the line index holds, for the budget.
    bytes: u64,
}

struct Buffer {
    staging: Vec<u8>,
    parts: Vec<Part>,
    /// Set when the batcher forwards (`Batcher::forwarding`).
    lines: Option<Staged>,
    records: u64,
    bytes: u64,
    holds: Holds,
    /// Tells this buffer's deadline entry from a stale one of an earlier buffer.
    seq: u64,
    /// What the buffer is charged against the budget.
    charged: u64,
}

impl Buffer {
    /// What the buffer holds: its staging allocation, its compressed parts (at their
    /// uncompressed size, an upper bound) and a fixed overhead.
    fn cost(&self, partition: &str) -> u64 {
        BUFFER_OVERHEAD
            + partition.len() as u64
            + self.staging.capacity() as u64
            + (self.bytes - self.staging.len() as u64)
            + self.lines.as_ref().map_or(0, |l| l.bytes)
    }

    /// Takes the staged bytes as a chunk: compressed (unless events go to the stream only)
    /// and, when forwarding, kept with its lines.
    fn take_chunk(&mut self, encoder: &Encoder, forward: Option<&Forward>, next: usize) {
        let chunk = Bytes::from(std::mem::replace(
            &mut self.staging,
            Vec::with_capacity(next),
        ));
        if forward.is_none_or(|f| f.objects) {
            self.parts.push(encoder.submit_shared(chunk.clone()));
        }
        if let Some(l) = self.lines.as_mut() {
            l.done.push(LineChunk {
                data: chunk,
                ends: std::mem::take(&mut l.ends),
                keys: std::mem::take(&mut l.keys),
            });
        }
    }
}

/// The first `MAX_KEY_CHARS` characters of a partition key.
fn clip(key: &str) -> &str {
    match key.char_indices().nth(crate::sink::kinesis::MAX_KEY_CHARS) {
        Some((at, _)) => key.get(..at).unwrap_or(key),
        None => key,
    }
}

/// Truncates `staging` back to `len` unless disarmed: a record whose encoding panicked is
/// never left half-written in a buffer that will still be sealed and written.
struct Whole<'a> {
    staging: &'a mut Vec<u8>,
    len: usize,
    done: bool,
}

impl Drop for Whole<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.staging.truncate(self.len);
        }
    }
}

pub struct Batcher {
    kind: Kind,
    limits: Limits,
    encoder: Encoder,
    buffers: HashMap<String, Buffer>,
    /// Age deadlines, oldest first; entries of buffers sealed earlier are skipped when met.
    deadlines: BinaryHeap<Reverse<(Instant, u64, String)>>,
    next_seq: u64,
    /// Uncompressed bytes in open buffers.
    bytes: u64,
    share: Share,
    forward: Option<Forward>,
}

impl Batcher {
    pub fn new(kind: Kind, limits: Limits, encoder: Encoder, budget: Arc<Budget>) -> Batcher {
        Batcher {
            kind,
            limits,
            encoder,
            buffers: HashMap::new(),
            deadlines: BinaryHeap::new(),
            next_seq: 0,
            bytes: 0,
            share: Share::new(budget),
            forward: None,
        }
    }

    /// Records every line's end and partition key for the Kinesis output.
    pub fn forwarding(mut self, forward: Option<Forward>) -> Batcher {
        self.forward = forward;
        self
    }

    /// The field partition keys come from, when forwarding.
    pub fn key_field(&self) -> Option<&str> {
        self.forward.as_ref().map(|f| f.key_field.as_str())
    }

    /// Appends one record to `partition`'s buffer: `write` appends the record's bytes, `hold`
    /// is the notification it came from, if any. Batches sealed because this record filled
    /// its buffer, or because the budget is reached, go to `out`.
    pub fn append(
        &mut self,
        partition: &str,
        hold: Option<&Hold>,
        write: impl FnOnce(&mut Vec<u8>),
        out: &mut impl FnMut(Sealed),
    ) {
        self.append_event(partition, hold, None, write, out);
    }

    /// `append` for an event whose partition key the caller already knows (the `Head` field
    /// named by `key_field`); when forwarding without one, it is read from the line written.
    pub fn append_event(
        &mut self,
        partition: &str,
        hold: Option<&Hold>,
        key: Option<&str>,
        write: impl FnOnce(&mut Vec<u8>),
        out: &mut impl FnMut(Sealed),
    ) {
        let limits = self.limits;
        // One lookup per record on the hot path (the buffer is open); two when it opens.
        let buf = match self.buffers.get_mut(partition) {
            Some(b) => b,
            None => {
                if self.buffers.len() >= limits.max_open {
                    self.seal_oldest(
                        1 + (self.buffers.len() - limits.max_open) as u64,
                        crate::metrics::SealReason::MaxOpenPartitions,
                        out,
                    );
                }
                self.open(partition);
                let Some(b) = self.buffers.get_mut(partition) else {
                    return;
                };
                b
            }
        };
        if let Some(h) = hold {
            buf.holds.add(h);
        }
        let before = buf.staging.len();
        let mut whole = Whole {
            staging: &mut buf.staging,
            len: before,
            done: false,
        };
        write(&mut *whole.staging);
        whole.done = true;
        drop(whole);
        if let (Some(f), Some(l)) = (&self.forward, buf.lines.as_mut()) {
            let line = buf.staging.get(before..).unwrap_or_default();
            let read;
            let key = match key.filter(|k| !k.is_empty()) {
                Some(k) => Some(k),
                None => {
                    let line = line.strip_suffix(b"\n").unwrap_or(line);
                    read = crate::sink::kinesis::partition_key(line, &f.key_field);
                    read.as_deref()
                }
            };
            let kept = l.keys.len();
            l.keys.push_str(key.map(clip).unwrap_or_default());
            l.ends.push((buf.staging.len(), l.keys.len()));
            l.bytes += (l.keys.len() - kept + 16) as u64;
        }
        let added = (buf.staging.len() - before) as u64;
        buf.records += 1;
        buf.bytes += added;
        self.bytes += added;
        let full = buf.records >= limits.max_records || buf.bytes >= limits.max_bytes;
        if !full && buf.staging.len() >= limits.chunk_bytes && self.encoder.chunked() {
            // This buffer has proven large: its next chunk gets its whole room at once.
            buf.take_chunk(&self.encoder, self.forward.as_ref(), limits.chunk_bytes);
        }
        let cost = buf.cost(partition);
        if cost >= buf.charged {
            self.share.charge(cost - buf.charged);
        } else {
            self.share.release(buf.charged - cost);
        }
        buf.charged = cost;
        if full && let Some(s) = self.seal(partition) {
            out(s);
        }
        if self.share.over() {
            self.seal_early(out);
        }
    }

    /// A new, empty buffer: nothing is allocated until its first record.
    fn open(&mut self, partition: &str) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let buf = Buffer {
            staging: Vec::new(),
            parts: Vec::new(),
            lines: self.forward.as_ref().map(|_| Staged::default()),
            records: 0,
            bytes: 0,
            holds: Holds::default(),
            seq,
            charged: 0,
        };
        self.buffers.insert(partition.to_owned(), buf);
        let now = Instant::now();
        // A max_age past what an Instant can hold means "never by age", not a panic.
        let deadline = now
            .checked_add(self.limits.max_age)
            .unwrap_or(now + Duration::from_secs(100 * 365 * 86_400));
        self.deadlines
            .push(Reverse((deadline, seq, partition.to_owned())));
        // Buffers sealed by size leave their entries behind until those reach the top, one
        // per buffer opened within max_age (every record, with max_records = 1): drop them
        // once they outnumber the live ones, so the heap stays proportional to open buffers.
        if self.deadlines.len() > 2 * self.buffers.len() + 64 {
            let buffers = &self.buffers;
            self.deadlines
                .retain(|Reverse((_, seq, p))| buffers.get(p).is_some_and(|b| b.seq == *seq));
        }
    }

    /// The budget is reached: seals this batcher's oldest buffers until an eighth of the
    /// budget is free again or none is left open.
    fn seal_early(&mut self, out: &mut impl FnMut(Sealed)) {
        let mut sealed = 0;
        while !self.share.relieved() {
            let Some(partition) = self.pop_oldest() else {
                break;
            };
            if let Some(s) = self.seal(&partition) {
                out(s);
                sealed += 1;
            }
        }
        self.share.publish();
        crate::metrics::emit(crate::metrics::BuffersSealedEarly {
            buffers: sealed,
            reason: crate::metrics::SealReason::Budget,
        });
    }

    /// Seals buffers early while the process-wide budget is nearly full (another batcher may
    /// have filled it, and is then sealing each of its records alone): called between files
    /// and when idle, so that the oldest buffers of every batcher make the room.
    /// Also seals the oldest half of its buffers (at least one) while a source waits for room
    /// in a ledger whose count cap is reached: the units it waits on are in open buffers, and
    /// otherwise settle only at `max_age`. Repeated while the wait lasts, this seals them all.
    pub fn relieve(&mut self, out: &mut impl FnMut(Sealed)) {
        self.share.publish();
        if !self.share.relieved() {
            self.seal_early(out);
        } else if self.share.crowded() && !self.buffers.is_empty() {
            self.seal_oldest(
                self.buffers.len().div_ceil(2) as u64,
                crate::metrics::SealReason::Ledger,
                out,
            );
        }
    }

    /// Seals up to `n` of the oldest open buffers; `reason` labels the count.
    fn seal_oldest(
        &mut self,
        n: u64,
        reason: crate::metrics::SealReason,
        out: &mut impl FnMut(Sealed),
    ) {
        let mut sealed = 0;
        while sealed < n {
            let Some(partition) = self.pop_oldest() else {
                break;
            };
            if let Some(s) = self.seal(&partition) {
                out(s);
                sealed += 1;
            }
        }
        self.share.publish();
        crate::metrics::emit(crate::metrics::BuffersSealedEarly {
            buffers: sealed,
            reason,
        });
    }

    /// Drops deadline entries of buffers that are gone.
    fn prune(&mut self) {
        while let Some(Reverse((_, seq, partition))) = self.deadlines.peek() {
            if self.buffers.get(partition).is_some_and(|b| b.seq == *seq) {
                return;
            }
            self.deadlines.pop();
        }
    }

    /// The oldest open buffer's partition, taken off the deadline heap.
    fn pop_oldest(&mut self) -> Option<String> {
        self.prune();
        self.deadlines.pop().map(|Reverse((_, _, p))| p)
    }

    /// Seals every buffer older than the age limit.
    pub fn seal_expired(&mut self, now: Instant) -> Vec<Sealed> {
        let mut out = Vec::new();
        loop {
            self.prune();
            match self.deadlines.peek() {
                Some(Reverse((deadline, _, _))) if *deadline <= now => {}
                _ => break,
            }
            if let Some(partition) = self.pop_oldest()
                && let Some(s) = self.seal(&partition)
            {
                out.push(s);
            }
        }
        out
    }

    /// Seals everything (shutdown, end of input).
    pub fn seal_all(&mut self) -> Vec<Sealed> {
        self.deadlines.clear();
        let keys: Vec<String> = self.buffers.keys().cloned().collect();
        let sealed = keys.iter().filter_map(|k| self.seal(k)).collect();
        self.share.publish();
        sealed
    }

    /// When the oldest open buffer reaches the age limit, if any is open.
    pub fn next_deadline(&mut self) -> Option<Instant> {
        self.prune();
        self.deadlines.peek().map(|Reverse((d, _, _))| *d)
    }

    pub fn open_buffers(&self) -> usize {
        self.buffers.len()
    }

    /// Uncompressed bytes held by open buffers (compressed parts included at their input size).
    pub fn buffered_bytes(&self) -> u64 {
        self.bytes
    }

    /// What this batcher's open buffers are charged against the budget.
    pub fn charged(&self) -> u64 {
        self.share.local()
    }

    /// Publishes this batcher's charge to the process-wide budget.
    pub fn publish(&mut self) {
        self.share.publish();
    }

    fn seal(&mut self, partition: &str) -> Option<Sealed> {
        let mut buf = self.buffers.remove(partition)?;
        self.share.release(buf.charged);
        self.bytes -= buf.bytes;
        if !buf.staging.is_empty() {
            buf.take_chunk(&self.encoder, self.forward.as_ref(), 0);
        }
        let (extension, content_type) = self.encoder.object_type();
        Some(Sealed {
            extension,
            content_type,
            kind: self.kind,
            partition: partition.to_owned(),
            parts: buf.parts,
            records: buf.records,
            bytes: buf.bytes,
            holds: buf.holds,
            lines: buf.lines.map(|l| l.done),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::encode::{Codec, Compression};

    fn limits(max_records: u64, max_bytes: u64, chunk_bytes: usize) -> Limits {
        Limits {
            max_records,
            max_bytes,
            max_age: Duration::from_secs(60),
            chunk_bytes,
            max_open: 10_000,
        }
    }

    fn encoder() -> Encoder {
        Encoder::new(
            Codec {
                kind: Compression::None,
                level: 0,
            },
            1,
        )
    }

    fn batcher(max_records: u64, max_bytes: u64, chunk_bytes: usize) -> Batcher {
        let limits = limits(max_records, max_bytes, chunk_bytes);
        Batcher::new(Kind::Events, limits, encoder(), Budget::unlimited())
    }

    /// Appends and returns what sealed.
    fn put(b: &mut Batcher, partition: &str, hold: Option<&Hold>, rec: &[u8]) -> Vec<Sealed> {
        let mut out = Vec::new();
        b.append(partition, hold, |o| o.extend_from_slice(rec), &mut |s| {
            out.push(s)
        });
        out
    }

    fn text(s: Sealed) -> String {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let mut out = Vec::new();
        for p in s.parts {
            out.extend_from_slice(&rt.block_on(p.bytes()).unwrap());
        }
        String::from_utf8(out).unwrap()
    }

    fn forwarding(objects: bool) -> Batcher {
        batcher(1000, 1 << 20, 40).forwarding(Some(Forward {
            key_field: "k".into(),
            objects,
        }))
    }

    fn put_keyed(b: &mut Batcher, key: Option<&str>, rec: &str) -> Vec<Sealed> {
        let mut out = Vec::new();
        let write = |o: &mut Vec<u8>| {
            o.extend_from_slice(rec.as_bytes());
            o.push(b'\n');
        };
        b.append_event("p/", None, key, write, &mut |s| out.push(s));
        out
    }

    fn lines_of(chunks: &[LineChunk]) -> Vec<(String, Option<String>)> {
        chunks
            .iter()
            .flat_map(LineChunk::lines)
            .map(|(l, k)| {
                (
                    String::from_utf8_lossy(l).into_owned(),
                    k.map(str::to_owned),
                )
            })
            .collect()
    }

    #[test]
    fn a_forwarding_batcher_records_each_lines_end_and_key_across_chunks() {
        let mut b = forwarding(true);
        let long = format!(r#"{{"k":"{}"}}"#, "é".repeat(300));
        for (key, rec) in [
            (Some("from-the-head"), r#"{"k":"not read"}"#),
            (None, r#"{"x":{"k":"inner"},"k":"read","n":1}"#),
            (None, r#"{"x":1}"#),
            (Some(""), r#"{"k":42}"#),
            (None, long.as_str()),
        ] {
            assert!(put_keyed(&mut b, key, rec).is_empty());
        }
        let mut s = b.seal_all().pop().unwrap();
        let chunks = s.lines.take().unwrap();
        assert!(
            chunks.len() >= 2,
            "lines kept chunk by chunk: {}",
            chunks.len()
        );
        let lines = lines_of(&chunks);
        let keys: Vec<Option<String>> = lines.iter().map(|(_, k)| k.clone()).collect();
        assert_eq!(
            keys,
            [
                Some("from-the-head".to_owned()),
                Some("read".to_owned()),
                None,
                Some("42".to_owned()),
                Some("é".repeat(256)),
            ]
        );
        let staged: String = lines.iter().map(|(l, _)| format!("{l}\n")).collect();
        assert_eq!(text(s), staged, "the lines are the object's bytes");
    }

    #[test]
    fn events_for_the_stream_only_are_not_compressed() {
        let mut b = forwarding(false);
        put_keyed(&mut b, Some("a"), r#"{"k":"a"}"#);
        let s = b.seal_all().pop().unwrap();
        assert!(s.parts.is_empty());
        assert_eq!(
            lines_of(&s.lines.unwrap()),
            [(r#"{"k":"a"}"#.to_owned(), Some("a".to_owned()))]
        );
        assert!(batcher(10, 1 << 20, 40).seal_all().is_empty());
    }

    #[test]
    fn opening_a_partition_past_the_cap_seals_the_oldest_open_one() {
        let mut b = Batcher::new(
            Kind::Events,
            Limits {
                max_open: 3,
                ..limits(1000, 1 << 20, 1 << 20)
            },
            encoder(),
            Budget::unlimited(),
        );
        // Events spread over many hours: one buffer per hour.
        let mut sealed = Vec::new();
        for h in 0..6 {
            let p = format!("hour={h:02}/");
            sealed.extend(put(&mut b, &p, None, format!("{h}\n").as_bytes()));
            // An open partition takes more records without sealing anything.
            sealed.extend(put(&mut b, &p, None, format!("{h}\n").as_bytes()));
            assert!(b.open_buffers() <= 3, "{}", b.open_buffers());
        }
        let got: Vec<(String, u64)> = sealed
            .into_iter()
            .map(|s| (s.partition, s.records))
            .collect();
        assert_eq!(
            got,
            [
                ("hour=00/".to_owned(), 2),
                ("hour=01/".to_owned(), 2),
                ("hour=02/".to_owned(), 2)
            ]
        );
        let mut rest: Vec<String> = b.seal_all().into_iter().map(|s| s.partition).collect();
        rest.sort();
        assert_eq!(rest, ["hour=03/", "hour=04/", "hour=05/"]);
    }

    #[test]
    fn seals_at_the_record_limit_per_partition() {
        let mut b = batcher(2, 1 << 20, 1 << 20);
        assert!(put(&mut b, "p1/", None, b"a\n").is_empty());
        assert!(put(&mut b, "p2/", None, b"x\n").is_empty());
        let s = put(&mut b, "p1/", None, b"b\n").pop().unwrap();
        assert_eq!((s.partition.as_str(), s.records, s.bytes), ("p1/", 2, 4));
        assert_eq!(text(s), "a\nb\n");
        assert_eq!(b.open_buffers(), 1);
        assert_eq!(b.buffered_bytes(), 2);
        let rest = b.seal_all();
        assert_eq!(rest.len(), 1);
        assert_eq!(text(rest.into_iter().next().unwrap()), "x\n");
        assert_eq!((b.buffered_bytes(), b.charged()), (0, 0));
    }

    #[test]
    fn seals_at_the_byte_limit_and_chunks_in_between() {
        let mut b = batcher(1000, 10, 4);
        assert!(put(&mut b, "p/", None, b"aaaa\n").is_empty());
        let s = put(&mut b, "p/", None, b"bbbbb\n").pop().unwrap();
        assert_eq!(
            s.parts.len(),
            2,
            "the first record filled a chunk of its own"
        );
        assert_eq!(text(s), "aaaa\nbbbbb\n");
    }

    #[test]
    fn sealed_batches_carry_one_hold_per_notification() {
        let mut b = batcher(3, 1 << 20, 1 << 20);
        let (h1, mut r1) = Hold::new();
        let (h2, mut r2) = Hold::new();
        put(&mut b, "p/", Some(&h1), b"a");
        put(&mut b, "p/", Some(&h1), b"b");
        let s = put(&mut b, "p/", Some(&h2), b"c").pop().unwrap();
        assert_eq!(s.holds.len(), 2);
        h1.commit();
        h2.commit();
        assert!(
            r1.try_recv().is_err(),
            "not settled before the batch is written"
        );
        s.holds.commit();
        assert_eq!(r1.try_recv(), Ok(true));
        assert_eq!(r2.try_recv(), Ok(true));
    }

    #[test]
    fn seals_by_age_from_the_deadline_heap() {
        let mut b = batcher(2, 1 << 20, 1 << 20);
        put(&mut b, "p/", None, b"a");
        let now = Instant::now();
        put(&mut b, "q/", None, b"a");
        // p/ seals by size and opens again: its first deadline entry is stale.
        put(&mut b, "p/", None, b"b");
        put(&mut b, "p/", None, b"c");
        assert!(b.seal_expired(now).is_empty());
        let first = b.next_deadline().unwrap();
        assert!(first > now);
        let sealed = b.seal_expired(first);
        assert_eq!(sealed.len(), 1);
        assert_eq!(sealed[0].partition, "q/");
        assert_eq!(b.seal_expired(now + Duration::from_secs(61)).len(), 1);
        assert_eq!(b.open_buffers(), 0);
        assert!(b.next_deadline().is_none());
    }

    #[test]
    fn buffers_sealed_by_size_leave_no_deadline_entries_behind() {
        let mut b = batcher(2, 1 << 20, 1 << 20);
        put(&mut b, "q/", None, b"q\n");
        let mut sealed = 0;
        for _ in 0..10_000 {
            put(&mut b, "p/", None, b"a\n");
            sealed += put(&mut b, "p/", None, b"b\n").len();
        }
        assert_eq!((sealed, b.open_buffers()), (10_000, 1));
        assert!(
            b.deadlines.len() <= 2 * b.open_buffers() + 65,
            "{}",
            b.deadlines.len()
        );
        // The live entries survive the compaction: q/ still seals by age.
        let late = Instant::now() + Duration::from_secs(61);
        assert_eq!(b.seal_expired(late).len(), 1);
        assert!(b.next_deadline().is_none());
    }

    #[test]
    fn an_age_limit_beyond_what_an_instant_holds_does_not_panic() {
        let mut lim = limits(10, 1 << 20, 1 << 20);
        lim.max_age = Duration::from_secs(u64::MAX);
        let mut b = Batcher::new(Kind::Events, lim, encoder(), Budget::unlimited());
        put(&mut b, "p/", None, b"a\n");
        assert!(b.seal_expired(Instant::now()).is_empty());
        assert!(b.next_deadline().unwrap() > Instant::now());
    }

    #[test]
    fn a_record_whose_encoding_panics_leaves_no_bytes_behind() {
        let mut b = batcher(100, 1 << 20, 1 << 20);
        put(&mut b, "p/", None, b"a\n");
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            b.append(
                "p/",
                None,
                |o| {
                    o.extend_from_slice(b"half");
                    panic!("encoding failed");
                },
                &mut |_| {},
            )
        }));
        assert!(r.is_err());
        put(&mut b, "p/", None, b"b\n");
        let s = b.seal_all().pop().unwrap();
        assert_eq!(s.records, 2);
        assert_eq!(text(s), "a\nb\n");
    }

    /// One file whose 20,000 events fall in 20,000 different hours: buffers are allocated on
    /// their first record and the budget seals the oldest ones early, so what is open stays
    /// under the budget and every record comes out exactly once.
    #[test]
    fn twenty_thousand_partitions_stay_under_the_budget_and_lose_nothing() {
        let budget = Budget::new(1 << 20);
        let lim = limits(10_000, 64 << 20, 4 << 20);
        let mut b = Batcher::new(Kind::Events, lim, encoder(), budget.clone());
        let mut sealed = Vec::new();
        let mut peak = 0;
        for i in 0..20_000 {
            let partition = format!("year=2024/month=01/day=01/hour={i:05}/");
            let record = format!("{{\"n\":{i},\"pad\":\"{}\"}}\n", "x".repeat(200));
            b.append(
                &partition,
                None,
                |o| o.extend_from_slice(record.as_bytes()),
                &mut |s| sealed.push(s),
            );
            peak = peak.max(b.charged());
            assert!(budget.used() <= budget.limit(), "{}", budget.used());
        }
        assert!(peak <= budget.limit(), "peak {peak}");
        assert!(b.open_buffers() > 100, "{}", b.open_buffers());
        assert!(b.open_buffers() < 20_000, "the budget sealed buffers early");
        sealed.extend(b.seal_all());
        assert_eq!(b.charged(), 0);
        assert_eq!(budget.used(), 0);
        let mut seen: Vec<u64> = sealed
            .into_iter()
            .flat_map(|s| {
                text(s)
                    .lines()
                    .map(|l| {
                        serde_json::from_str::<serde_json::Value>(l).unwrap()["n"]
                            .as_u64()
                            .unwrap()
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..20_000).collect::<Vec<_>>());
    }

    #[test]
    fn a_full_budget_is_relieved_by_a_batcher_that_did_not_fill_it() {
        let budget = Budget::new(64 << 10);
        let lim = limits(10_000, 64 << 20, 4 << 20);
        let mut idle = Batcher::new(Kind::Events, lim, encoder(), budget.clone());
        let mut busy = Batcher::new(Kind::Events, lim, encoder(), budget.clone());
        for i in 0..40 {
            put(&mut idle, &format!("p{i}/"), None, &[b'x'; 1000]);
        }
        idle.publish();
        let before = budget.used();
        // The busy batcher hits the limit: it seals its own buffers only.
        let mut early = 0;
        for i in 0..40 {
            early += put(&mut busy, &format!("q{i}/"), None, &[b'y'; 1000]).len();
        }
        assert!(early > 0);
        assert!(budget.used() >= before);
        let mut relieved = Vec::new();
        idle.relieve(&mut |s| relieved.push(s));
        assert!(!relieved.is_empty());
        assert!(budget.used() <= budget.limit() - budget.limit() / 8);
    }

    #[test]
    fn a_crowded_ledger_seals_the_oldest_half_and_then_the_rest() {
        let budget = Budget::unlimited();
        let lim = limits(10_000, 64 << 20, 4 << 20);
        let mut b = Batcher::new(Kind::Events, lim, encoder(), budget.clone());
        for i in 0..5 {
            put(&mut b, &format!("p{i}/"), None, b"x");
        }
        let mut sealed: Vec<String> = Vec::new();
        b.relieve(&mut |s| sealed.push(s.partition));
        assert!(
            sealed.is_empty(),
            "nothing is sealed early while no ledger is full"
        );
        let crowd = budget.crowd();
        b.relieve(&mut |s| sealed.push(s.partition));
        assert_eq!(sealed, ["p0/", "p1/", "p2/"], "the oldest half, rounded up");
        b.relieve(&mut |s| sealed.push(s.partition));
        b.relieve(&mut |s| sealed.push(s.partition));
        assert_eq!(sealed.len(), 5, "repeated, every buffer is sealed");
        assert_eq!(b.open_buffers(), 0);
        drop(crowd);
    }
}
