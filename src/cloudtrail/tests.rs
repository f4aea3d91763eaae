use super::*;
use std::borrow::Cow;
use std::io::{self, Read};

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
        Item::Skipped(_) | Item::Unsplit { .. } => {}
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
            r#"Head { event_time: Some("2024-03-18T14:30:07Z"), source_ip: None, account: Some("123456789012"), region: Some("us-east-1"), event_source: Some("s3.amazonaws.com"), event_type: Some("AwsApiCall"), event_id: Some("y"), event_name: Some("GetObject"), read_only: Some(true), other_members: false, members: None }"#,
            r#"Head { event_time: None, source_ip: None, account: None, region: None, event_source: None, event_type: None, event_id: None, event_name: None, read_only: None, other_members: false, members: None }"#
        ]
    );
}

#[test]
fn non_objects_are_reported_beside_their_good_neighbours() {
    let input = br#"{"Records":[{"eventID":"a"},"a string",42,null,[1],{"eventID":"b"},12345]}"#;
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
    assert_eq!(reason(br#"{"Records":[]} x"#), FileErrorReason::Malformed);
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

/// Every item, owned, for comparisons across chunkings.
#[derive(Debug, PartialEq, Clone)]
enum Seen {
    Event(Vec<u8>, Option<String>),
    NotObject(u64, Vec<u8>),
    Skipped(u64, &'static str, u64, u64, Vec<u8>, Option<String>),
    Unsplit(u64, Vec<u8>),
}

fn seen_with(input: &[u8], chunk: usize, limits: Limits) -> (Vec<Seen>, Report) {
    let mut got = Vec::new();
    let report = split_limited(Trickle(input, chunk), limits, |item| {
        got.push(match item {
            Item::Event { raw, head } => {
                Seen::Event(raw.to_vec(), head.event_id.map(Cow::into_owned))
            }
            Item::NotAnObject { index, raw } => Seen::NotObject(index, raw.to_vec()),
            Item::Skipped(s) => Seen::Skipped(
                s.index,
                s.reason.as_str(),
                s.offset,
                s.size,
                s.raw.to_vec(),
                s.event_id,
            ),
            Item::Unsplit { offset, raw } => Seen::Unsplit(offset, raw.to_vec()),
        })
    });
    (got, report)
}

fn seen(input: &[u8], chunk: usize, max_event_bytes: usize) -> (Vec<Seen>, Report) {
    seen_with(input, chunk, Limits::events(max_event_bytes))
}

fn ev(id: &str) -> Seen {
    Seen::Event(
        format!(r#"{{"eventID":"{id}"}}"#).into_bytes(),
        Some(id.into()),
    )
}

#[test]
fn non_objects_straddling_the_window_keep_their_bytes() {
    // The regression: the start offset of a non-object was taken before the window was
    // refilled (and moved), so a large one across a refill sliced the wrong bytes or panicked.
    let mut input = String::from(r#"{"Records":["#);
    let mut want = Vec::new();
    for i in 0..40 {
        let text = format!(
            "\"{}\"",
            char::from(b'a' + (i % 26) as u8).to_string().repeat(10_000)
        );
        input.push_str(&format!(r#"{{"eventID":"e{i}"}},{text},"#));
        want.push(ev(&format!("e{i}")));
        want.push(Seen::NotObject(2 * i + 1, text.into_bytes()));
    }
    input.push_str(r#"{"eventID":"last"}]}"#);
    want.push(ev("last"));
    for chunk in [READ_CHUNK, 4096, 9_999, 100_003] {
        let (got, report) = seen(input.as_bytes(), chunk, 1 << 20);
        assert_eq!(
            report.result.as_ref().unwrap(),
            &Kind::Events,
            "chunk {chunk}"
        );
        assert_eq!(report.not_objects, 40);
        assert!(got == want, "chunk {chunk}");
    }
}

#[test]
fn an_event_over_the_limit_is_stepped_over_and_its_neighbours_pass() {
    let big = format!(r#"{{"pad":"{}","eventID":"big"}}"#, "x".repeat(10_000));
    let input = format!(r#"{{"Records":[{{"eventID":"a"}},{big},{{"eventID":"b"}}]}}"#);
    for chunk in [100, 7, 1 << 20] {
        let (got, report) = seen(input.as_bytes(), chunk, 1000);
        assert_eq!(report.result.unwrap(), Kind::Events);
        assert_eq!(report.events, 2);
        assert_eq!(report.skipped, 1);
        let preview = big.as_bytes()[..PREVIEW_BYTES].to_vec();
        assert_eq!(
            got,
            vec![
                ev("a"),
                Seen::Skipped(
                    1,
                    "event_too_large",
                    28,
                    big.len() as u64,
                    preview,
                    Some("big".into())
                ),
                ev("b"),
            ],
            "chunk {chunk}"
        );
    }
}

#[test]
fn a_syntax_error_skips_only_its_event() {
    let bad = r#"{"eventID":"bad","a":tru,"b":"}]"}"#;
    let input = format!(r#"{{"Records":[{{"eventID":"a"}}, {bad} ,{{"eventID":"b"}}]}}"#);
    for chunk in [1, 5, 1 << 20] {
        let (got, report) = seen(input.as_bytes(), chunk, 1 << 20);
        assert_eq!(report.result.unwrap(), Kind::Events);
        assert_eq!(
            got,
            vec![
                ev("a"),
                Seen::Skipped(
                    1,
                    "malformed_json",
                    29,
                    bad.len() as u64,
                    bad.into(),
                    Some("bad".into())
                ),
                ev("b"),
            ],
            "chunk {chunk}"
        );
    }
}

#[test]
fn where_no_end_can_be_found_the_rest_goes_out_raw() {
    let head = r#"{"Records":[{"eventID":"a"},"#;
    let tail = r#"{"eventID":"bad","a":[1}, {"eventID":"b"}]}"#;
    let input = format!("{head}{tail}");
    for chunk in [3, 1 << 20] {
        let (got, report) = seen(input.as_bytes(), chunk, 1 << 20);
        let err = report.result.unwrap_err();
        assert_eq!(err.reason, FileErrorReason::Malformed);
        assert!(err.detail.contains("raw bytes"), "{}", err.detail);
        assert_eq!(got[0], ev("a"));
        let mut rest = Vec::new();
        for s in &got[1..] {
            match s {
                Seen::Unsplit(off, raw) => {
                    assert_eq!(*off as usize, head.len() + rest.len());
                    rest.extend_from_slice(raw);
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(rest, tail.as_bytes(), "chunk {chunk}");
    }
    // Garbage between entries: the rest from the garbage on.
    let (got, report) = seen(
        br#"{"Records":[{"eventID":"a"} x {"eventID":"b"}]}"#,
        4,
        1 << 20,
    );
    assert_eq!(
        report.result.unwrap_err().reason,
        FileErrorReason::Malformed
    );
    assert_eq!(
        got,
        vec![
            ev("a"),
            Seen::Unsplit(28, br#"x {"eventID":"b"}]}"#.to_vec())
        ]
    );
}

#[test]
fn invalid_utf8_in_one_event_skips_it_alone() {
    for bad in [
        &b"{\"eventID\":\"u\",\"x\":\"\xff\xfe\"}"[..],
        &b"{\"eventID\":\"u\xc3\"}"[..],
        &b"\"str\x80\""[..],
    ] {
        let mut input = br#"{"Records":[{"eventID":"a"},"#.to_vec();
        input.extend_from_slice(bad);
        input.extend_from_slice(br#",{"eventID":"b"}]}"#);
        for chunk in [2, 1 << 20] {
            let (got, report) = seen(&input, chunk, 1 << 20);
            assert_eq!(report.result.as_ref().unwrap(), &Kind::Events);
            assert_eq!(got.len(), 3, "{got:?}");
            assert_eq!(got[0], ev("a"));
            assert_eq!(got[2], ev("b"));
            match &got[1] {
                Seen::Skipped(1, "invalid_utf8", 28, size, raw, _) => {
                    assert_eq!(raw.as_slice(), bad);
                    assert_eq!(*size, bad.len() as u64);
                }
                other => panic!("{other:?}"),
            }
        }
    }
}

#[test]
fn the_decompressed_limit_stops_the_file_after_the_events_before_it() {
    let input = br#"{"Records":[{"eventID":"a"},{"eventID":"b"},{"eventID":"c"}]}"#;
    let at = |limit: u64| {
        let limits = Limits {
            max_event_bytes: 1 << 20,
            max_decompressed_bytes: limit,
            members: false,
        };
        seen_with(input, 5, limits)
    };
    let (got, report) = at(input.len() as u64);
    assert_eq!(report.result.unwrap(), Kind::Events);
    assert_eq!(got.len(), 3);
    let (got, report) = at(45);
    // The first byte of the element the limit fell in goes out raw.
    assert_eq!(
        got,
        vec![ev("a"), ev("b"), Seen::Unsplit(44, b"{".to_vec())]
    );
    assert_eq!(report.decompressed_bytes, 45);
    assert_eq!(
        report.result.unwrap_err().reason,
        FileErrorReason::InflationLimit
    );
}

/// A small seeded generator (xorshift): the property tests stay reproducible without a
/// dependency.
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

/// A reader that hands out pieces of random sizes.
struct Chunked<'a>(&'a [u8], Rng, usize);
impl Read for Chunked<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let want = 1 + self.1.below(self.2);
        let n = self.0.len().min(want).min(out.len());
        out[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        Ok(n)
    }
}

fn items_of(reader: impl Read, max: usize, window: usize) -> (Vec<Seen>, String) {
    items_within(reader, Limits::events(max), window)
}

fn items_within(reader: impl Read, limits: Limits, window: usize) -> (Vec<Seen>, String) {
    let mut got = Vec::new();
    let report = split_windowed(reader, limits, window, |item| {
        got.push(match item {
            Item::Event { raw, head } => {
                assert_eq!(head.members.is_some(), limits.members);
                if let Some(m) = &head.members {
                    members_are_the_events(raw, m);
                }
                Seen::Event(raw.to_vec(), head.event_id.map(Cow::into_owned))
            }
            Item::NotAnObject { index, raw } => Seen::NotObject(index, raw.to_vec()),
            Item::Skipped(s) => Seen::Skipped(
                s.index,
                s.reason.as_str(),
                s.offset,
                s.size,
                s.raw.to_vec(),
                s.event_id,
            ),
            Item::Unsplit { offset, raw } => Seen::Unsplit(offset, raw.to_vec()),
        })
    });
    // Unsplit pieces depend on the window; their concatenation does not.
    let mut merged: Vec<Seen> = Vec::new();
    for s in got {
        match (merged.last_mut(), s) {
            (Some(Seen::Unsplit(_, acc)), Seen::Unsplit(_, raw)) => acc.extend(raw),
            (_, s) => merged.push(s),
        }
    }
    let result = match report.result {
        Ok(k) => format!("{k:?}"),
        Err(e) => e.reason.as_str().to_owned(),
    };
    (
        merged,
        format!(
            "{result} events={} skipped={}",
            report.events, report.skipped
        ),
    )
}

/// A head's member list describes exactly its event: every member in order, each value's
/// bytes the event's own, read by serde as the whole event reads them.
fn members_are_the_events(raw: &[u8], m: &Members<'_>) {
    let list = m.of(raw).expect("the list is of these bytes");
    let mut rebuilt = String::from("{");
    for (i, (k, v)) in list.iter().enumerate() {
        let at = v.as_ptr() as usize - raw.as_ptr() as usize;
        assert_eq!(raw.get(at..at + v.len()), Some(v.as_bytes()));
        if i > 0 {
            rebuilt.push(',');
        }
        rebuilt.push_str(&serde_json::to_string(k).unwrap());
        rebuilt.push(':');
        rebuilt.push_str(v);
    }
    rebuilt.push('}');
    // An event serde steps over but does not build (a number out of range in a member the
    // head does not read) has its members' places checked only.
    if let Ok(want) = serde_json::from_slice::<serde_json::Value>(raw) {
        let got: serde_json::Value = serde_json::from_str(&rebuilt).unwrap();
        assert_eq!(got, want, "{}", String::from_utf8_lossy(raw));
    }
}

/// One generated element: good events, non-objects, and the hostile kinds.
fn element(rng: &mut Rng, n: usize) -> Vec<u8> {
    let pad = "p".repeat(rng.below(3000));
    match rng.below(10) {
            0 => format!(r#""text {n} {pad}""#).into_bytes(),
            1 => format!("{n}").into_bytes(),
            2 => format!(r#"{{"eventID":"x{n}","a":tru,"pad":"{pad}"}}"#).into_bytes(),
            3 => {
                let mut v = format!(r#"{{"eventID":"u{n}","x":""#).into_bytes();
                v.extend_from_slice(b"\xff\xc3");
                v.extend_from_slice(br#""}"#);
                v
            }
            4 => format!(r#"{{"eventID":"big{n}","pad":"{}"}}"#, "b".repeat(5000)).into_bytes(),
            5 => format!(r#"[{n},{{"a":"]}}"}}]"#).into_bytes(),
            _ => format!(
                r#"{{"eventID":"e{n}","s":"q"}}\","n":[1,{{"d":"{pad}"}}],"eventTime":"2024-01-01T00:00:00Z"}}"#
            )
            .into_bytes(),
        }
}

#[test]
fn any_chunking_gives_the_same_items_as_one_buffer() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for case in 0..60 {
        let mut input = br#"{"Records":["#.to_vec();
        for n in 0..(1 + rng.below(40)) {
            if n > 0 {
                input.extend_from_slice(if rng.below(4) == 0 { b" ,\n " } else { b"," });
            }
            input.extend(element(&mut rng, n));
        }
        input.extend_from_slice(b"]}");
        if case % 7 == 6 {
            // Truncated, or broken beyond finding an end.
            let cut = rng.below(input.len());
            input.truncate(cut);
        } else if case % 7 == 5 {
            let at = rng.below(input.len());
            input.insert(at, b'}');
        }
        let max = 4096;
        let whole = items_of(&input[..], max, READ_CHUNK);
        // With the members listed (detection on), the same items, whatever the chunking.
        let listed = Limits {
            members: true,
            ..Limits::events(max)
        };
        assert!(
            items_within(&input[..], listed, READ_CHUNK) == whole,
            "case {case}"
        );
        let seed = rng.next() | 1;
        let got = items_within(Chunked(&input, Rng(seed), 300), listed, 13);
        assert!(got == whole, "case {case}: listed, seed {seed}");
        for _ in 0..4 {
            let biggest = [1, 7, 300, 70_000][rng.below(4)];
            let window = [1, 2, 13, 512, 5000][rng.below(5)];
            let seed = rng.next() | 1;
            let got = items_of(Chunked(&input, Rng(seed), biggest), max, window);
            assert!(
                got == whole,
                "case {case}: reads of up to {biggest}, window {window} (seed {seed}) differ:\n{:?}\n{:?}",
                got.1,
                whole.1
            );
        }
    }
}

/// Every one-byte-read window size up to the input's length gives what one buffer gives.
fn same_for_every_window(input: &[u8], max: usize) -> (Vec<Seen>, String) {
    same_within_every_window(input, Limits::events(max))
}

fn same_within_every_window(input: &[u8], limits: Limits) -> (Vec<Seen>, String) {
    let whole = items_within(input, limits, READ_CHUNK);
    for window in 1..=input.len() {
        let got = items_within(Trickle(input, 1), limits, window);
        assert_eq!(got, whole, "window {window}");
    }
    whole
}

#[test]
fn an_element_cut_by_the_decompressed_limit_goes_out_raw() {
    // Before: the bytes of the element the limit fell in were dropped behind the file-level
    // record, whether or not the limit was hit during a refill.
    let input = br#"{"Records":[{"eventID":"a"},{"eventID":"b","pad":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"},{"eventID":"c"}]}"#;
    let within = |max_event_bytes, limit| Limits {
        max_event_bytes,
        max_decompressed_bytes: limit,
        members: false,
    };
    let (items, result) = same_within_every_window(input, within(1000, 50));
    assert_eq!(result, "inflation_limit events=1 skipped=0");
    assert_eq!(
        items,
        vec![ev("a"), Seen::Unsplit(28, input[28..50].to_vec())]
    );
    // Over the event limit too: the element is accounted for as stepped over.
    let (items, result) = same_within_every_window(input, within(30, 73));
    assert_eq!(result, "inflation_limit events=1 skipped=1");
    assert_eq!(
        items,
        vec![
            ev("a"),
            Seen::Skipped(
                1,
                "event_too_large",
                28,
                45,
                input[28..73].to_vec(),
                Some("b".into())
            )
        ]
    );
    // A limit right after a complete element loses nothing either.
    let (items, result) = same_within_every_window(input, within(1000, 28));
    assert_eq!(result, "inflation_limit events=1 skipped=0");
    assert_eq!(items, vec![ev("a")]);
}

#[test]
fn a_top_level_value_over_the_size_limit_is_stepped_over() {
    // Before: one file-level event_too_large record, and the Records after it were dropped.
    let pad = "x".repeat(200);
    let input = format!(
        r#"{{"eventVersion":"{pad}","meta":{{"a":["{pad}"]}},"Records":[{{"eventID":"a"}}],"tail":{pad:?}}}"#
    );
    let (items, result) = same_for_every_window(input.as_bytes(), 100);
    assert_eq!(result, "Events events=1 skipped=0");
    assert_eq!(items, vec![ev("a")]);
    // One that never ends is the rest of the file, raw.
    let input = format!(r#"{{"x":["{pad}"}},"Records":[{{"eventID":"a"}}]}}"#);
    let (items, result) = same_for_every_window(input.as_bytes(), 100);
    assert_eq!(result, "malformed_json events=0 skipped=0");
    assert_eq!(
        items,
        vec![Seen::Unsplit(208, input.as_bytes()[208..].to_vec())]
    );
}

#[test]
fn records_that_are_not_an_array_go_out_raw() {
    // Before: only a file-level record.
    let input = br#"{"Records":{"eventID":"a","x":1}}"#;
    let (items, result) = same_for_every_window(input, 1000);
    assert_eq!(result, "records_not_array events=0 skipped=0");
    assert_eq!(items, vec![Seen::Unsplit(11, input[11..].to_vec())]);
}

#[test]
fn a_number_cut_by_the_window_is_not_a_syntax_error() {
    // fuzz/corpus/split/number-cut-by-window.json: serde reads an ignored `11.` at the end of the
    // window as an invalid number, not as cut off, so the element was skipped as malformed
    // in small windows and taken as a non-object in one buffer.
    let (items, result) =
        same_for_every_window(br#"{"Records":[11.8 Linux,{"eventID":"a"}]}"#, 1000);
    assert_eq!(items.first(), Some(&Seen::NotObject(0, b"11.8".to_vec())));
    assert!(result.starts_with("malformed_json"), "{result}");
    // fuzz/corpus/split/minus-cut-by-window.json: `-` at the window's end, then `0{`.
    let (items, _) = same_for_every_window(
        br#"{"Records":[{"eventID":"a"},-0{"eventTime":"x"}]}"#,
        1000,
    );
    assert_eq!(items.get(1), Some(&Seen::NotObject(1, b"-0".to_vec())));
}

#[test]
fn a_number_inside_an_event_cut_by_the_window_keeps_the_event() {
    // The same inside an object: `"n":1.` at the window's end is not a syntax error.
    let input = br#"{"Records":[{"eventID":"a","n":-1.5e+3,"m":[0.25]},{"eventID":"b"}]}"#;
    let (items, result) = same_for_every_window(input, 1000);
    assert_eq!(result, "Events events=2 skipped=0");
    assert_eq!(items.len(), 2);
}

#[test]
fn a_syntax_error_outside_records_sends_the_rest_of_the_file_out_raw() {
    // Before: only a file-level record, and the Records array after the error was dropped.
    let input = br#"{"eventVersion":tru,"Records":[{"eventID":"a"}]}"#;
    let (items, result) = same_for_every_window(input, 1000);
    assert_eq!(result, "malformed_json events=0 skipped=0");
    assert_eq!(
        items,
        vec![Seen::Unsplit(
            16,
            br#"tru,"Records":[{"eventID":"a"}]}"#.to_vec()
        )]
    );
    let (items, result) = same_for_every_window(br#"{"Records":[{"eventID":"a"}]} junk"#, 1000);
    assert_eq!(result, "malformed_json events=1 skipped=0");
    assert_eq!(items, vec![ev("a"), Seen::Unsplit(30, b"junk".to_vec())]);
    let (items, _) = same_for_every_window(br#"{"Records":[] "x":1}"#, 1000);
    assert_eq!(items, vec![Seen::Unsplit(14, br#""x":1}"#.to_vec())]);
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

#[test]
fn listing_the_members_never_changes_what_the_split_takes() {
    // Values that stepping over accepts but reading refuses, in a head field and elsewhere.
    let inputs: [&[u8]; 6] = [
        br#"{"Records":[{"eventID":"a"},{"eventName":1e400},{"eventID":"b"}]}"#,
        br#"{"Records":[{"eventID":"\ud800"},{"eventID":"c"}]}"#,
        br#"{"Records":[{"readOnly":-1e999,"eventID":"d"},{"eventID":"e"}]}"#,
        br#"{"Records":[{"awsRegion":{"\udc00":1}},{"x":1e400,"y":"\ud800","eventID":"f"}]}"#,
        b"{\"Records\":[{\"eventID\":\"g\",\"x\":\"\xff\"},{\"eventID\":\"h\"}]}",
        br#"{"Records":[{"eventID":"i","x":tru},{"eventID":"j"}]}"#,
    ];
    for input in inputs {
        let plain = items_within(input, Limits::events(1 << 20), READ_CHUNK);
        let listed = Limits {
            members: true,
            ..Limits::events(1 << 20)
        };
        for window in [1, 7, READ_CHUNK] {
            let got = items_within(Trickle(input, 3), listed, window);
            assert!(got == plain, "{}: {got:?}", String::from_utf8_lossy(input));
        }
    }
}
