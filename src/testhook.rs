//! Faults that end-to-end tests inject into the real binary, to prove that a panicking worker
//! or compression thread and a failed compression lose nothing. Not a feature: the hooks exist
//! only in debug builds (what `cargo test` runs); release builds compile every hook to nothing.
//!
//! `TRAILHOSE_TEST_FAULT` holds comma-separated `kind:needle` pairs, read once:
//! - `worker_panic:NEEDLE`: a worker panics on the first file whose source contains NEEDLE;
//! - `compress_panic:NEEDLE`: a compression thread panics on the first chunk containing NEEDLE;
//! - `compress_fail:NEEDLE`: compressing the first chunk containing NEEDLE fails;
//! - `rebuild_panic:NEEDLE`: rebuilding a worker after a panic on a file whose source contains
//!   NEEDLE panics too, so the worker is lost (`/healthz` then fails);
//! - `classify_panic:NEEDLE`: classifying a Kinesis record whose data contains NEEDLE panics,
//!   every time (a poison record).
//!
//! Each fault but `classify_panic` fires once per process, so the redelivered unit then passes.
//!
//! `TRAILHOSE_TEST_MAX_UNACKED` lowers the backfill and Kinesis ledgers' count caps, so a test
//! reaches them with a few files.

/// The text of a panic payload, for the log.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".to_owned()
    }
}

#[cfg(debug_assertions)]
mod hooks {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicBool, Ordering};

    pub struct Fault {
        kind: String,
        needle: String,
        fired: AtomicBool,
    }

    fn faults() -> &'static [Fault] {
        static FAULTS: OnceLock<Vec<Fault>> = OnceLock::new();
        FAULTS.get_or_init(|| {
            let spec = std::env::var("TRAILHOSE_TEST_FAULT").unwrap_or_default();
            spec.split(',')
                .filter_map(|f| f.split_once(':'))
                .map(|(kind, needle)| Fault {
                    kind: kind.to_owned(),
                    needle: needle.to_owned(),
                    fired: AtomicBool::new(false),
                })
                .collect()
        })
    }

    /// True the first time a fault of `kind` matches `haystack`.
    pub fn fires(kind: &str, haystack: &[u8]) -> bool {
        faults()
            .iter()
            .any(|f| matches(f, kind, haystack) && !f.fired.swap(true, Ordering::AcqRel))
    }

    /// True every time a fault of `kind` matches `haystack`.
    pub fn always(kind: &str, haystack: &[u8]) -> bool {
        faults().iter().any(|f| matches(f, kind, haystack))
    }

    fn matches(f: &Fault, kind: &str, haystack: &[u8]) -> bool {
        f.kind == kind
            && !f.needle.is_empty()
            && memchr::memmem::find(haystack, f.needle.as_bytes()).is_some()
    }
}

/// `worker_panic`: called by a worker before it processes `source`.
#[inline]
pub fn worker(source: &str) {
    #[cfg(debug_assertions)]
    if hooks::fires("worker_panic", source.as_bytes()) {
        panic!("test hook: worker_panic on {source}");
    }
    #[cfg(not(debug_assertions))]
    let _ = source;
}

/// `rebuild_panic`: called when a worker is rebuilt after a panic on `source`.
#[inline]
pub fn rebuild(source: &str) {
    #[cfg(debug_assertions)]
    if hooks::fires("rebuild_panic", source.as_bytes()) {
        panic!("test hook: rebuild_panic on {source}");
    }
    #[cfg(not(debug_assertions))]
    let _ = source;
}

/// `classify_panic`: called before a Kinesis record's `data` is classified.
#[inline]
pub fn classify(data: &[u8]) {
    #[cfg(debug_assertions)]
    if hooks::always("classify_panic", data) {
        panic!("test hook: classify_panic");
    }
    #[cfg(not(debug_assertions))]
    let _ = data;
}

/// `compress_panic`: called by whatever compresses `data`.
#[inline]
pub fn compress(data: &[u8]) {
    #[cfg(debug_assertions)]
    if hooks::fires("compress_panic", data) {
        panic!("test hook: compress_panic");
    }
    #[cfg(not(debug_assertions))]
    let _ = data;
}

/// `compress_fail`: an error in place of compressing `data`.
#[inline]
pub fn compress_error(data: &[u8]) -> Result<(), String> {
    #[cfg(debug_assertions)]
    if hooks::fires("compress_fail", data) {
        return Err("test hook: compress_fail".to_owned());
    }
    #[cfg(not(debug_assertions))]
    let _ = data;
    Ok(())
}

/// A ledger's count cap: `cap`, or in debug builds `TRAILHOSE_TEST_MAX_UNACKED` when set.
pub fn max_unacked(cap: usize) -> usize {
    #[cfg(debug_assertions)]
    if let Some(n) = std::env::var("TRAILHOSE_TEST_MAX_UNACKED")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        return n;
    }
    cap
}
