//! Turns the bytes of one delivery file into a decoded stream: gzip is detected by its magic
//! bytes, never by the file name.

use std::io::{self, BufRead, BufReader, Read};

use flate2::bufread::MultiGzDecoder;

/// How the file's bytes were encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Gzip,
    Plain,
    /// No bytes at all.
    Empty,
}

const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// True when a name says gzip (CloudTrail names its files `….json.gz`).
pub fn named_gzip(name: &str) -> bool {
    name.ends_with(".gz")
}

/// Wraps `source` in a decoder chosen by its first bytes. Errors of the source itself are
/// re-kinded as `Other` so that `cloudtrail::read_error` tells them from corrupt data.
pub fn decode<'a, R: Read + 'a>(source: R) -> io::Result<(Encoding, Box<dyn Read + 'a>)> {
    let mut buffered = BufReader::with_capacity(128 * 1024, SourceReader(source));
    let head = loop {
        match buffered.fill_buf() {
            Ok(head) => break head,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    };
    if head.is_empty() {
        Ok((Encoding::Empty, Box::new(buffered)))
    } else if head.starts_with(&GZIP_MAGIC) {
        Ok((Encoding::Gzip, Box::new(MultiGzDecoder::new(buffered))))
    } else {
        Ok((Encoding::Plain, Box::new(buffered)))
    }
}

struct SourceReader<R>(R);

impl<R: Read> Read for SourceReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf).map_err(|e| match e.kind() {
            io::ErrorKind::Interrupted => e,
            _ => io::Error::other(format!("reading the source: {e}")),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::Compression;
    use flate2::write::GzEncoder;
    use std::io::Write;

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut enc = GzEncoder::new(Vec::new(), Compression::default());
        enc.write_all(data).unwrap();
        enc.finish().unwrap()
    }

    fn read_all(bytes: &[u8]) -> (Encoding, io::Result<Vec<u8>>) {
        let (enc, mut r) = decode(bytes).unwrap();
        let mut out = Vec::new();
        let res = r.read_to_end(&mut out).map(|_| out);
        (enc, res)
    }

    #[test]
    fn gzip_is_detected_by_magic_not_name() {
        let (enc, out) = read_all(&gzip(b"{\"Records\":[]}"));
        assert_eq!(enc, Encoding::Gzip);
        assert_eq!(out.unwrap(), b"{\"Records\":[]}");
        let (enc, out) = read_all(b"{\"Records\":[]}");
        assert_eq!(enc, Encoding::Plain);
        assert_eq!(read_all(b"").0, Encoding::Empty);
        assert_eq!(out.unwrap(), b"{\"Records\":[]}");
    }

    #[test]
    fn concatenated_gzip_members_read_as_one_stream() {
        let mut two = gzip(b"{\"Records\":");
        two.extend(gzip(b"[]}"));
        assert_eq!(read_all(&two).1.unwrap(), b"{\"Records\":[]}");
    }

    #[test]
    fn truncated_and_corrupt_gzip_are_told_apart_from_source_errors() {
        use crate::cloudtrail::{FileErrorReason, read_error};
        let whole = gzip(&b"{\"Records\":[{\"a\":1}]}".repeat(100));
        let err = read_all(&whole[..whole.len() / 2]).1.unwrap_err();
        assert_eq!(read_error(&err).reason, FileErrorReason::Truncated);
        let mut corrupt = whole.clone();
        for b in &mut corrupt[12..40] {
            *b ^= 0x5a;
        }
        let err = read_all(&corrupt).1.unwrap_err();
        assert_eq!(read_error(&err).reason, FileErrorReason::GzipCorrupt);

        struct Failing;
        impl Read for Failing {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "socket closed",
                ))
            }
        }
        let err = decode(Failing).err().unwrap();
        assert_eq!(read_error(&err).reason, FileErrorReason::Read);
    }

    #[test]
    fn names() {
        assert!(named_gzip("a/b.json.gz"));
        assert!(!named_gzip("a/b.json"));
    }
}
