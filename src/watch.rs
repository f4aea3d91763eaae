//! Files that are swapped while the process runs (GeoIP databases, transform modules): what a
//! file looked like when last read, and a thread that checks on an interval.

use std::path::Path;
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

/// A file's modification time and length: when either moves, the file is read again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
}

/// The file's stamp now, None when it cannot be read.
pub fn stamp(path: &Path) -> Option<Stamp> {
    let m = std::fs::metadata(path).ok()?;
    Some(Stamp {
        modified: m.modified().ok(),
        len: m.len(),
    })
}

/// Calls `check` on `target` every `interval` until `target` is dropped. Returns the spawn
/// error, if the thread could not be started.
pub fn poll<T: Send + Sync + 'static>(
    name: &str,
    target: &Arc<T>,
    interval: Duration,
    check: fn(&T),
) -> std::io::Result<()> {
    let weak: Weak<T> = Arc::downgrade(target);
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            loop {
                std::thread::sleep(interval);
                match weak.upgrade() {
                    Some(t) => check(&t),
                    None => break,
                }
            }
        })
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rewritten_file_gets_a_new_stamp() {
        let p = std::env::temp_dir().join(format!("trailhose-stamp-{}", std::process::id()));
        std::fs::write(&p, b"one").unwrap();
        let a = stamp(&p);
        std::fs::write(&p, b"three").unwrap();
        assert_ne!(stamp(&p), a);
        std::fs::remove_file(&p).unwrap();
        assert_eq!(stamp(&p), None);
    }
}
