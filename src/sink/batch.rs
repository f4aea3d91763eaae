//! Per-partition buffers that flush by record count, uncompressed bytes or age, like Firehose's
//! buffering hints. A buffer compresses as it fills (chunk by chunk on the encoder pool), so an
//! open buffer holds at most one uncompressed chunk.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::encode::{Encoder, Part};
use crate::ack::{Hold, Holds};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_records: u64,
    pub max_bytes: u64,
    pub max_age: Duration,
    /// Uncompressed bytes per compressed member.
    pub chunk_bytes: usize,
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
}

struct Buffer {
    staging: Vec<u8>,
    parts: Vec<Part>,
    records: u64,
    bytes: u64,
    opened: Instant,
    holds: Holds,
}

pub struct Batcher {
    kind: Kind,
    limits: Limits,
    encoder: Encoder,
    buffers: HashMap<String, Buffer>,
}

impl Batcher {
    pub fn new(kind: Kind, limits: Limits, encoder: Encoder) -> Batcher {
        Batcher {
            kind,
            limits,
            encoder,
            buffers: HashMap::new(),
        }
    }

    /// Appends one record to `partition`'s buffer: `write` appends the record's bytes, `hold`
    /// is the notification it came from, if any. Returns the sealed batch when this record
    /// filled the buffer.
    pub fn append(
        &mut self,
        partition: &str,
        hold: Option<&Hold>,
        write: impl FnOnce(&mut Vec<u8>),
    ) -> Option<Sealed> {
        let limits = self.limits;
        let buf = match self.buffers.get_mut(partition) {
            Some(b) => b,
            None => self
                .buffers
                .entry(partition.to_owned())
                .or_insert_with(|| Buffer {
                    staging: Vec::with_capacity(limits.chunk_bytes.min(1 << 20)),
                    parts: Vec::new(),
                    records: 0,
                    bytes: 0,
                    opened: Instant::now(),
                    holds: Holds::default(),
                }),
        };
        if let Some(h) = hold {
            buf.holds.add(h);
        }
        let before = buf.staging.len();
        write(&mut buf.staging);
        buf.records += 1;
        buf.bytes += (buf.staging.len() - before) as u64;
        if buf.records >= limits.max_records || buf.bytes >= limits.max_bytes {
            return self.seal(partition);
        }
        if buf.staging.len() >= limits.chunk_bytes && self.encoder.chunked() {
            let chunk = std::mem::replace(&mut buf.staging, Vec::with_capacity(limits.chunk_bytes));
            buf.parts.push(self.encoder.submit(chunk));
        }
        None
    }

    /// Seals every buffer older than the age limit.
    pub fn seal_expired(&mut self, now: Instant) -> Vec<Sealed> {
        let old: Vec<String> = self
            .buffers
            .iter()
            .filter(|(_, b)| now.duration_since(b.opened) >= self.limits.max_age)
            .map(|(k, _)| k.clone())
            .collect();
        old.iter().filter_map(|k| self.seal(k)).collect()
    }

    /// Seals everything (shutdown, end of input).
    pub fn seal_all(&mut self) -> Vec<Sealed> {
        let keys: Vec<String> = self.buffers.keys().cloned().collect();
        keys.iter().filter_map(|k| self.seal(k)).collect()
    }

    /// When the oldest open buffer reaches the age limit, if any is open.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.buffers
            .values()
            .map(|b| b.opened + self.limits.max_age)
            .min()
    }

    pub fn open_buffers(&self) -> usize {
        self.buffers.len()
    }

    /// Uncompressed bytes held by open buffers (compressed parts included at their input size).
    pub fn buffered_bytes(&self) -> u64 {
        self.buffers.values().map(|b| b.bytes).sum()
    }

    fn seal(&mut self, partition: &str) -> Option<Sealed> {
        let mut buf = self.buffers.remove(partition)?;
        if !buf.staging.is_empty() {
            buf.parts.push(self.encoder.submit(buf.staging));
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
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::encode::{Codec, Compression};

    fn batcher(max_records: u64, max_bytes: u64, chunk_bytes: usize) -> Batcher {
        let limits = Limits {
            max_records,
            max_bytes,
            max_age: Duration::from_secs(60),
            chunk_bytes,
        };
        let enc = Encoder::new(
            Codec {
                kind: Compression::None,
                level: 0,
            },
            1,
        );
        Batcher::new(Kind::Events, limits, enc)
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

    #[test]
    fn seals_at_the_record_limit_per_partition() {
        let mut b = batcher(2, 1 << 20, 1 << 20);
        assert!(
            b.append("p1/", None, |o| o.extend_from_slice(b"a\n"))
                .is_none()
        );
        assert!(
            b.append("p2/", None, |o| o.extend_from_slice(b"x\n"))
                .is_none()
        );
        let s = b
            .append("p1/", None, |o| o.extend_from_slice(b"b\n"))
            .unwrap();
        assert_eq!((s.partition.as_str(), s.records, s.bytes), ("p1/", 2, 4));
        assert_eq!(text(s), "a\nb\n");
        assert_eq!(b.open_buffers(), 1);
        let rest = b.seal_all();
        assert_eq!(rest.len(), 1);
        assert_eq!(text(rest.into_iter().next().unwrap()), "x\n");
    }

    #[test]
    fn seals_at_the_byte_limit_and_chunks_in_between() {
        let mut b = batcher(1000, 10, 4);
        assert!(
            b.append("p/", None, |o| o.extend_from_slice(b"aaaa\n"))
                .is_none()
        );
        let s = b
            .append("p/", None, |o| o.extend_from_slice(b"bbbbb\n"))
            .unwrap();
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
        b.append("p/", Some(&h1), |o| o.push(b'a'));
        b.append("p/", Some(&h1), |o| o.push(b'b'));
        let s = b.append("p/", Some(&h2), |o| o.push(b'c')).unwrap();
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
    fn seals_by_age() {
        let mut b = batcher(1000, 1 << 20, 1 << 20);
        b.append("p/", None, |o| o.push(b'a'));
        let now = Instant::now();
        assert!(b.seal_expired(now).is_empty());
        assert!(b.next_deadline().unwrap() > now);
        assert_eq!(b.seal_expired(now + Duration::from_secs(61)).len(), 1);
        assert_eq!(b.open_buffers(), 0);
        assert!(b.next_deadline().is_none());
    }
}
