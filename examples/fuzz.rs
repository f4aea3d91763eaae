//! A fuzz driver that runs on the stable toolchain: `cargo run --example fuzz -- TARGET SECONDS`
//! (see `scripts/fuzz.sh`). `cargo fuzz` needs nightly, which is not available everywhere this
//! project is built, so this is a structured mutation fuzzer: inputs come from a corpus seeded
//! with the project's own fixtures (`examples/data`, `fuzz/corpus/TARGET`), are mutated with
//! byte-level and JSON-aware edits, and an input that makes a target show new behaviour (a new
//! outcome signature) joins the corpus. Each target checks more than "no panic":
//!
//! * `split`: any bytes, read through random read sizes and window sizes (so the window refills
//!   in the middle of elements); the items must equal those of one whole buffer, every event
//!   must be a JSON object in valid UTF-8, and every byte must be accounted for.
//! * `notification`: the SQS body parser on any text.
//! * `cwlogs`: the Kinesis record classifier (CloudWatch Logs gzip batches and the rest); the
//!   documents it builds must split.
//! * `template`: key template parsing and rendering with any field values; keys stay relative
//!   and free of `..` segments.
//!
//! A panic or a broken property saves the input under `fuzz/crashes/TARGET/` and exits 1.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use trailhose::cloudtrail::{self, Head, Item, Limits, scrub};
use trailhose::sink::partition::{KeyTemplate, Partitioner};
use trailhose::source::kinesis::{self, Shape};
use trailhose::source::notification;

const TARGETS: &[&str] = &["split", "notification", "cwlogs", "template"];
/// Inputs larger than this are cut back: big inputs are slow and rarely find more.
const MAX_INPUT: usize = 64 * 1024;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(target), Some(secs)) = (args.first(), args.get(1)) else {
        eprintln!(
            "usage: fuzz TARGET SECONDS [SEED]   targets: {}",
            TARGETS.join(", ")
        );
        std::process::exit(2);
    };
    if !TARGETS.contains(&target.as_str()) {
        eprintln!("unknown target {target}; targets: {}", TARGETS.join(", "));
        std::process::exit(2);
    }
    let Ok(secs) = secs.parse::<f64>() else {
        eprintln!("SECONDS must be a number");
        std::process::exit(2);
    };
    let seed = args.get(2).and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    if let Ok(path) = std::env::var("FUZZ_REPLAY") {
        // Runs one saved input and says what it did (for a crash under fuzz/crashes/).
        let input = std::fs::read(&path).unwrap_or_default();
        for i in 0..200u64 {
            let mut rng = Rng((seed + i) | 1);
            match run_caught(target, &input, &mut rng) {
                Ok(sig) => println!("ok: {sig}"),
                Err(why) => println!("FAILED: {why}"),
            }
        }
        return;
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut corpus = seeds(&root, target);
    if corpus.is_empty() {
        corpus.push(Vec::new());
    }
    let dict = dictionary(target);
    let mut rng = Rng(seed | 1);
    let mut seen: HashSet<String> = HashSet::new();
    // The seeds' own signatures are not news.
    for input in &corpus {
        if let Ok(sig) = run_caught(target, input, &mut Rng(7)) {
            seen.insert(sig);
        }
    }
    // Quiet panics: each one is reported once, with its input saved.
    panic::set_hook(Box::new(|_| {}));
    let started = Instant::now();
    let budget = Duration::from_secs_f64(secs);
    let mut execs = 0u64;
    let mut last_report = Instant::now();
    while started.elapsed() < budget {
        let parent = &corpus[rng.below(corpus.len())];
        let other = &corpus[rng.below(corpus.len())];
        let input = mutate(&mut rng, parent, other, &dict);
        execs += 1;
        match run_caught(target, &input, &mut rng) {
            Ok(sig) => {
                if seen.insert(sig) && corpus.len() < 4096 {
                    corpus.push(input);
                }
            }
            Err(why) => {
                let path = save_crash(&root, target, &input);
                eprintln!(
                    "fuzz {target}: FAILED after {execs} executions: {why}\n  input saved to {} (seed {seed})",
                    path.display()
                );
                std::process::exit(1);
            }
        }
        if last_report.elapsed() > Duration::from_secs(60) {
            last_report = Instant::now();
            eprintln!(
                "fuzz {target}: {execs} executions, corpus {}, {:.0}s",
                corpus.len(),
                started.elapsed().as_secs_f64()
            );
        }
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "fuzz {target}: ok, {execs} executions in {secs:.1}s ({:.0}/s), corpus {} (seed {seed})",
        execs as f64 / secs.max(1e-9),
        corpus.len()
    );
}

/// Runs one input; a panic or a broken property is an `Err`.
fn run_caught(target: &str, input: &[u8], rng: &mut Rng) -> Result<String, String> {
    let mut local = Rng(rng.next() | 1);
    match panic::catch_unwind(AssertUnwindSafe(|| run(target, input, &mut local))) {
        Ok(r) => r,
        Err(p) => Err(format!(
            "panic: {}",
            p.downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| p.downcast_ref::<&str>().copied())
                .unwrap_or("(no message)")
        )),
    }
}

fn run(target: &str, input: &[u8], rng: &mut Rng) -> Result<String, String> {
    match target {
        "split" => split_target(input, rng),
        "notification" => Ok(notification_target(input)),
        "cwlogs" => cwlogs_target(input),
        _ => template_target(input),
    }
}

/// What one split produced, independent of how the input was read.
#[derive(Debug, PartialEq)]
struct Split {
    items: Vec<String>,
    result: String,
}

fn split_once(reader: impl Read, limits: Limits, window: usize) -> Result<Split, String> {
    let max_event = limits.max_event_bytes;
    let keys = scrub::Keys::new(scrub::DEFAULT_KEYS);
    let mut items: Vec<String> = Vec::new();
    let mut bad: Option<String> = None;
    let mut unsplit: Option<(u64, Vec<u8>)> = None;
    // The error output scrubs the raw pieces as a stream: the result must not depend on them.
    let mut scrubber = scrub::Scrubber::new(&keys);
    let mut scrubbed = Vec::new();
    let report = cloudtrail::split_windowed(reader, limits, window, |item| match item {
        Item::Event { raw, head } => {
            // The grammar (a lone surrogate escape such as \ud800 is grammatical JSON).
            if !raw.starts_with(b"{")
                || serde_json::from_slice::<serde::de::IgnoredAny>(raw).is_err()
            {
                bad = Some(format!("an event that is not a JSON object: {raw:?}"));
            }
            if std::str::from_utf8(raw).is_err() {
                bad = Some("an event that is not UTF-8".into());
            }
            if raw.len() > max_event {
                bad = Some("an event over the size limit".into());
            }
            items.push(format!("E{:?}{:?}", raw, head.event_id));
        }
        Item::NotAnObject { index, raw } => items.push(format!("N{index}{raw:?}")),
        Item::Skipped(s) => {
            let _ = scrub::Scrubber::scrub(&keys, s.raw);
            items.push(format!(
                "S{} {} {} {} {:?} {:?}",
                s.index,
                s.reason.as_str(),
                s.offset,
                s.size,
                s.raw,
                s.event_id
            ))
        }
        Item::Unsplit { offset, raw } => {
            // Pieces depend on the window; their concatenation does not. Nothing follows them.
            let (_, bytes) = unsplit.get_or_insert_with(|| (offset, Vec::new()));
            bytes.extend_from_slice(raw);
            scrubbed.extend(scrubber.feed(raw));
        }
    });
    if let Some((offset, bytes)) = unsplit {
        if scrub::Scrubber::scrub(&keys, &bytes).as_ref() != scrubbed.as_slice() {
            bad = Some("raw pieces scrubbed one by one differ from their concatenation".into());
        }
        items.push(format!("U{offset} {bytes:?}"));
    }
    if let Some(b) = bad {
        return Err(b);
    }
    let result = match &report.result {
        Ok(k) => format!("{k:?}"),
        Err(e) if std::env::var_os("FUZZ_REPLAY").is_some() => format!("{e}"),
        Err(e) => e.reason.as_str().to_owned(),
    };
    Ok(Split {
        items,
        result: format!("{result} {} {}", report.events, report.skipped),
    })
}

fn split_target(input: &[u8], rng: &mut Rng) -> Result<String, String> {
    let max_event = [64, 1000, 1 << 20][rng.below(3)];
    // Mostly no decompressed limit; sometimes one that falls anywhere in the input.
    let max_decompressed_bytes = match rng.below(4) {
        0 => rng.below(input.len() + 1) as u64,
        _ => 1 << 20,
    };
    let limits = Limits {
        max_event_bytes: max_event,
        max_decompressed_bytes,
        // Half the time as with detection on: each event's members listed.
        members: rng.below(2) == 0,
    };
    let whole = split_once(input, limits, 256 * 1024)?;
    // Listing the members (detection on) never changes what the split takes.
    let other = Limits {
        members: !limits.members,
        ..limits
    };
    if split_once(input, other, 256 * 1024)? != whole {
        return Err("the split takes other items with the members listed".into());
    }
    // FUZZ_SPLIT_CHUNKING=off keeps every other check (to look at one property at a time).
    if std::env::var("FUZZ_SPLIT_CHUNKING").is_ok_and(|v| v == "off") {
        return Ok(whole.result);
    }
    let biggest = [1, 3, 64, 4096][rng.below(4)];
    let window = [1, 2, 7, 100, 3000][rng.below(5)];
    let chunked = split_once(Chunked(input, Rng(rng.next() | 1), biggest), limits, window)?;
    if chunked != whole {
        let at = (0..chunked.items.len().max(whole.items.len()))
            .find(|&i| chunked.items.get(i) != whole.items.get(i))
            .unwrap_or(0);
        let show = |s: &Split| {
            let item = s.items.get(at).map_or("(none)".to_owned(), |i| {
                let tail: String = i
                    .chars()
                    .rev()
                    .take(200)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect();
                format!("{}… …{tail}", i.chars().take(100).collect::<String>())
            });
            format!(
                "{} items, result {}; item {at}: {item}",
                s.items.len(),
                s.result
            )
        };
        return Err(format!(
            "reads of up to {biggest} bytes with a {window}-byte window differ from one buffer:\n  {}\n  {}",
            show(&chunked),
            show(&whole)
        ));
    }
    let kinds: Vec<char> = whole
        .items
        .iter()
        .filter_map(|i| i.chars().next())
        .collect();
    let reasons: Vec<&str> = whole
        .items
        .iter()
        .filter(|i| i.starts_with('S'))
        .filter_map(|i| i.split(' ').nth(1))
        .collect();
    Ok(format!(
        "{} {:?} {:?}",
        whole.result,
        dedup(&kinds),
        reasons
    ))
}

fn notification_target(input: &[u8]) -> String {
    let text = String::from_utf8_lossy(input);
    match notification::parse(&text) {
        Ok(n) => format!("ok {:?}", n.shape()),
        Err(e) => format!("err {}", e.reason()),
    }
}

fn cwlogs_target(input: &[u8]) -> Result<String, String> {
    // Half the time the input is the decoded JSON, gzipped as CloudWatch Logs sends it.
    let gz = {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        let _ = enc.write_all(input);
        enc.finish().unwrap_or_default()
    };
    let mut sig = String::new();
    for data in [input, &gz[..]] {
        let mut classifier = kinesis::Classifier::default();
        let shape = classifier.classify(data);
        let label = match &shape {
            Shape::Events { spans, .. } => {
                // What the classifier keeps must split in place, every element accounted for.
                let elements = classifier.messages.elements(spans.clone());
                let n = elements.clone().count() as u64;
                let mut items = 0u64;
                let r = cloudtrail::split_elements(elements, 1 << 20, |_| items += 1);
                if r.events + r.skipped + r.not_objects != n || items != n {
                    return Err(format!(
                        "{n} elements, {items} items, report {} {} {}",
                        r.events, r.skipped, r.not_objects
                    ));
                }
                format!("events {:?}", r.result)
            }
            other => format!("{other:?}").chars().take(24).collect(),
        };
        sig.push_str(&label);
        sig.push('|');
    }
    Ok(sig)
}

fn template_target(input: &[u8]) -> Result<String, String> {
    let text = String::from_utf8_lossy(input);
    let (template, values) = text.split_once('\n').unwrap_or((&text, ""));
    let t = match KeyTemplate::parse(template) {
        Ok(t) => t,
        Err(e) => return Ok(format!("bad {e}").chars().take(40).collect()),
    };
    let mut v = values.split('\n').map(std::borrow::Cow::Borrowed);
    let head = Head {
        event_time: v.next(),
        account: v.next(),
        region: v.next(),
        event_source: v.next(),
        event_type: v.next(),
        ..Head::default()
    };
    let p = Partitioner::new(t, trailhose::sink::partition::DEFAULT_FALLBACK);
    let mut key = String::new();
    let routed = p.key_for(
        &head,
        trailhose::clock::Utc::from_unix(1_764_580_000),
        &mut key,
    );
    if key.starts_with('/')
        || !key.ends_with('/')
        || key
            .trim_end_matches('/')
            .split('/')
            .any(|seg| matches!(seg, "" | "." | ".."))
    {
        return Err(format!("unsafe key {key:?} from template {template:?}"));
    }
    Ok(format!("ok {}", routed.fallback))
}

fn dedup(v: &[char]) -> String {
    let mut out = String::new();
    for c in v {
        if !out.ends_with(*c) {
            out.push(*c);
        }
    }
    out
}

/// The seed corpus: `fuzz/corpus/TARGET/*`, and for the splitter the project's example
/// delivery files (decompressed).
fn seeds(root: &Path, target: &str) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut dirs = vec![root.join("fuzz/corpus").join(target)];
    if target == "split" {
        dirs.push(root.join("examples/data"));
    }
    for dir in dirs {
        for entry in walkdir::WalkDir::new(&dir).sort_by_file_name() {
            let Ok(entry) = entry else { continue };
            if !entry.file_type().is_file() {
                continue;
            }
            let Ok(bytes) = std::fs::read(entry.path()) else {
                continue;
            };
            let mut decoded = Vec::new();
            let bytes =
                match flate2::read::MultiGzDecoder::new(&bytes[..]).read_to_end(&mut decoded) {
                    Ok(_) if bytes.starts_with(&[0x1f, 0x8b]) && target != "cwlogs" => decoded,
                    _ => bytes,
                };
            out.push(bytes.into_iter().take(MAX_INPUT).collect());
        }
    }
    out
}

/// Tokens worth splicing in: what the parsers branch on.
fn dictionary(target: &str) -> Vec<&'static [u8]> {
    let mut d: Vec<&'static [u8]> = vec![
        b"{", b"}", b"[", b"]", b"\"", b"\\", b",", b":", b"\\u0000", b"\\ud800", b"\xff", b"\xc3",
        b"null", b"true", b"1e999", b"-0", b" ", b"\n",
    ];
    d.extend_from_slice(match target {
        "split" => &[
            b"\"Records\":[" as &[u8],
            b"\"eventID\":\"",
            b"\"eventTime\":\"2024-03-18T14:05:00Z\"",
            b"\"sourceIPAddress\":\"",
            b"\"digestSignatureAlgorithm\"",
            b"{\"Records\":[]}",
            b"\"sessionToken\":\"",
            b"\"Password\"",
        ],
        "notification" => &[
            b"\"Records\":[" as &[u8],
            b"\"Message\":\"",
            b"\"Type\":\"Notification\"",
            b"\"s3Bucket\":\"",
            b"\"s3ObjectKey\":[",
            b"\"detail-type\":\"Object Created\"",
            b"\"key\":\"",
            b"%2F",
            b"..",
        ],
        "cwlogs" => &[
            b"\"messageType\":\"DATA_MESSAGE\"" as &[u8],
            b"\"messageType\":\"CONTROL_MESSAGE\"",
            b"\"logEvents\":[",
            b"\"message\":\"",
            b"\"eventVersion\":\"1.09\"",
            b"\"eventID\":\"",
        ],
        _ => &[
            b"{year}" as &[u8],
            b"{month}",
            b"{day}",
            b"{hour}",
            b"{account}",
            b"{region}",
            b"{event_source}",
            b"{event_type}",
            b"/",
            b"..",
            b"\n",
            b"2024-03-18T14:05:00Z",
        ],
    });
    d
}

fn mutate(rng: &mut Rng, parent: &[u8], other: &[u8], dict: &[&[u8]]) -> Vec<u8> {
    let mut v = parent.to_vec();
    for _ in 0..1 + rng.below(6) {
        let at = rng.below(v.len() + 1);
        match rng.below(9) {
            0 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] ^= 1 << rng.below(8);
            }
            1 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] = rng.next() as u8;
            }
            2 if !v.is_empty() => {
                let n = 1 + rng.below(16.min(v.len() - at.min(v.len())).max(1));
                let end = (at + n).min(v.len());
                v.drain(at.min(end)..end);
            }
            3 | 4 => {
                let tok = dict[rng.below(dict.len())];
                v.splice(at..at, tok.iter().copied());
            }
            5 if !other.is_empty() => {
                // Splice a piece of another input.
                let from = rng.below(other.len());
                let n = 1 + rng.below((other.len() - from).min(4096));
                v.splice(at..at, other[from..from + n].iter().copied());
            }
            6 if !v.is_empty() => {
                // Repeat a piece (long strings, deep nesting, many elements).
                let from = rng.below(v.len());
                let n = 1 + rng.below((v.len() - from).min(64));
                let piece = v[from..from + n].to_vec();
                for _ in 0..1 + rng.below(64) {
                    v.splice(at..at, piece.iter().copied());
                }
            }
            7 if !v.is_empty() => v.truncate(at),
            _ => {
                let n = 1 + rng.below(8);
                for _ in 0..n {
                    v.insert(at.min(v.len()), rng.next() as u8);
                }
            }
        }
    }
    v.truncate(MAX_INPUT);
    v
}

fn save_crash(root: &Path, target: &str, input: &[u8]) -> PathBuf {
    let dir = root.join("fuzz/crashes").join(target);
    let _ = std::fs::create_dir_all(&dir);
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in input {
        h = (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3);
    }
    let path = dir.join(format!("crash-{h:016x}"));
    let _ = std::fs::write(&path, input);
    path
}

/// xorshift64: fast, seeded, reproducible.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// A reader that hands out pieces of random sizes up to a bound.
struct Chunked<'a>(&'a [u8], Rng, usize);

impl Read for Chunked<'_> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        let want = 1 + self.1.below(self.2);
        let n = self.0.len().min(want).min(out.len());
        out[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        Ok(n)
    }
}
