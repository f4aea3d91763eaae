//! Necessary literals: for a rule that names no `eventSource` or `eventName` (evaluated on
//! every event otherwise), the ASCII strings one of which must occur in the event for the rule
//! to match, e.g. `root` for `userIdentity.type: Root`. An event whose bytes hold none of
//! them is not evaluated against the rule.
//!
//! Sound only where the bytes cannot hide a value: the gate applies to an event (with its
//! additions) that is pure ASCII and holds no `\` at all. Then every JSON string's value is
//! exactly its bytes between the quotes, and Unicode lowercasing of the event's values is ASCII
//! lowercasing, so a value matching the rule has the literal, lowercased, in the lowercased
//! bytes. Any other event (an escape, a non-ASCII byte: `K` folds to `k`) is evaluated as
//! before. A literal must also survive the value coercions the matchers make: numbers are
//! compared through their decimal form (`1e2` as `100`), so a literal a number could print as
//! (digits, `.`, `-` only) is not used.
//!
//! The analysis mirrors `prefilter`'s: whatever it does not understand (`not`, `|exists`,
//! `|cidr`, numbers, field references, placeholders, keywords, array scopes) gives no literal,
//! which leaves the rule evaluated on every event.

use rsigma_eval::compiler::{CompiledDetection, CompiledDetectionItem, CompiledRule};
use rsigma_eval::{CompiledMatcher, matcher::GroupMode};
use rsigma_parser::{ConditionExpr, Quantifier};

/// One of these lowercased literals must occur; None: no such set is known.
type Lits = Option<Vec<String>>;

/// More literals than this make the search cost more than the evaluation it saves.
const MAX_LITS: usize = 16;

/// The literal `s` stands for in lowercased event bytes, if it can stand for one.
fn literal(s: &[u8]) -> Option<String> {
    let printable = |b: &u8| (0x20..0x7f).contains(b) && *b != b'"' && *b != b'\\';
    let numeric = |b: &u8| b.is_ascii_digit() || *b == b'.' || *b == b'-';
    if s.is_empty() || !s.iter().all(printable) || s.iter().all(numeric) {
        return None;
    }
    Some(s.to_ascii_lowercase().into_iter().map(char::from).collect())
}

fn one(s: &[u8]) -> Lits {
    literal(s).map(|l| vec![l])
}

/// Either set is necessary: the one that skips more (longer shortest literal, then fewer).
fn both(a: Lits, b: Lits) -> Lits {
    match (a, b) {
        (None, x) | (x, None) => x,
        (Some(a), Some(b)) => {
            let rank = |s: &Vec<String>| {
                let shortest = s.iter().map(String::len).min().unwrap_or(0);
                (shortest, std::cmp::Reverse(s.len()))
            };
            Some(if rank(&b) > rank(&a) { b } else { a })
        }
    }
}

fn either(a: Lits, b: Lits) -> Lits {
    match (a, b) {
        (Some(mut a), Some(b)) => {
            a.extend(b);
            a.sort();
            a.dedup();
            (a.len() <= MAX_LITS).then_some(a)
        }
        _ => None,
    }
}

fn all(ls: impl IntoIterator<Item = Lits>) -> Lits {
    ls.into_iter().fold(None, both)
}

/// Any of `ls`; none at all: nothing is known (an empty `or` cannot match, but say nothing).
fn any(ls: impl IntoIterator<Item = Lits>) -> Lits {
    let mut it = ls.into_iter();
    let first = it.next()?;
    it.fold(first, either)
}

fn matcher_lits(m: &CompiledMatcher) -> Lits {
    match m {
        // Values are stored as compared: lowercased when case-insensitive, as written when not;
        // either way the match holds the value, and lowercased bytes hold it lowercased.
        CompiledMatcher::Exact { value, .. }
        | CompiledMatcher::Contains { value, .. }
        | CompiledMatcher::StartsWith { value, .. }
        | CompiledMatcher::EndsWith { value, .. } => one(value.as_bytes()),
        CompiledMatcher::Regex(re) => regex_lits(re.as_str()),
        CompiledMatcher::AhoCorasickSet { needles, .. } => {
            any(needles.iter().map(|n| one(n.as_bytes())))
        }
        CompiledMatcher::RegexSetMatch { set, mode } => {
            let each = set.patterns().iter().map(|p| regex_lits(p));
            match mode {
                GroupMode::Any => any(each),
                GroupMode::All => all(each),
            }
        }
        CompiledMatcher::AnyOf(ms)
        | CompiledMatcher::CaseInsensitiveGroup {
            children: ms,
            mode: GroupMode::Any,
        } => any(ms.iter().map(matcher_lits)),
        CompiledMatcher::AllOf(ms)
        | CompiledMatcher::CaseInsensitiveGroup {
            children: ms,
            mode: GroupMode::All,
        } => all(ms.iter().map(matcher_lits)),
        _ => None,
    }
}

fn item_lits(i: &CompiledDetectionItem) -> Lits {
    // `|exists` and keywords (no field) say nothing about a value.
    if i.exists.is_some() || i.field.is_none() {
        return None;
    }
    matcher_lits(&i.matcher)
}

fn detection_lits(d: &CompiledDetection) -> Lits {
    match d {
        CompiledDetection::AllOf(items) => all(items.iter().map(item_lits)),
        CompiledDetection::AnyOf(subs) => any(subs.iter().map(detection_lits)),
        CompiledDetection::And(subs) => all(subs.iter().map(detection_lits)),
        _ => None,
    }
}

fn condition_lits(
    e: &ConditionExpr,
    dets: &std::collections::HashMap<String, CompiledDetection>,
) -> Lits {
    match e {
        ConditionExpr::Identifier(name) => dets.get(name).and_then(detection_lits),
        ConditionExpr::And(es) => all(es.iter().map(|e| condition_lits(e, dets))),
        ConditionExpr::Or(es) => any(es.iter().map(|e| condition_lits(e, dets))),
        ConditionExpr::Not(_) => None,
        ConditionExpr::Selector {
            quantifier,
            pattern,
        } => {
            // The same selection of detections the evaluator makes.
            let matching = dets
                .iter()
                .filter(|(n, _)| pattern.matches_detection_name(n))
                .map(|(_, d)| detection_lits(d));
            match quantifier {
                Quantifier::Any | Quantifier::Count(1..) => any(matching),
                Quantifier::All => all(matching),
                Quantifier::Count(0) => None,
            }
        }
    }
}

/// The literals rule `r` needs, one of which any event it matches holds.
pub(super) fn rule_lits(r: &CompiledRule) -> Option<Vec<String>> {
    any(r
        .conditions
        .iter()
        .map(|c| condition_lits(c, &r.detections)))
}

/// The literals a match of `pattern` holds. A run of literal characters in a sequence every
/// match goes through is one; a class that, on ASCII, is one letter in either case (what
/// `(?i)` makes of a letter) continues a run.
fn regex_lits(pattern: &str) -> Lits {
    let hir = regex_syntax::Parser::new().parse(pattern).ok()?;
    hir_lits(&hir)
}

/// The one lowercased ASCII byte a class matches on ASCII text, if it is one.
fn class_byte(c: &regex_syntax::hir::Class) -> Option<u8> {
    use regex_syntax::hir::Class;
    let mut found: Option<u8> = None;
    let mut add = |lo: u32, hi: u32| -> bool {
        for c in lo..=hi.min(0x7f) {
            // `c` is at most 0x7f: one byte.
            let b = u8::try_from(c).unwrap_or(0).to_ascii_lowercase();
            match found {
                Some(f) if f != b => return false,
                _ => found = Some(b),
            }
        }
        true
    };
    let single = match c {
        Class::Unicode(u) => u
            .ranges()
            .iter()
            .all(|r| add(u32::from(r.start()), u32::from(r.end()))),
        Class::Bytes(b) => b
            .ranges()
            .iter()
            .all(|r| add(u32::from(r.start()), u32::from(r.end()))),
    };
    single.then_some(found).flatten()
}

fn hir_lits(h: &regex_syntax::hir::Hir) -> Lits {
    use regex_syntax::hir::HirKind;
    match h.kind() {
        HirKind::Literal(l) => one(&l.0),
        HirKind::Class(c) => class_byte(c).and_then(|b| one(&[b])),
        HirKind::Capture(c) => hir_lits(&c.sub),
        HirKind::Repetition(r) if r.min >= 1 => hir_lits(&r.sub),
        HirKind::Alternation(hs) => any(hs.iter().map(hir_lits)),
        HirKind::Concat(hs) => {
            let mut best: Lits = None;
            let mut run: Vec<u8> = Vec::new();
            for sub in hs {
                let piece = match sub.kind() {
                    HirKind::Literal(l) => Some(l.0.to_vec()),
                    HirKind::Class(c) => class_byte(c).map(|b| vec![b]),
                    _ => None,
                };
                match piece {
                    Some(p) => run.extend(p),
                    None => {
                        best = both(best, one(&run));
                        run.clear();
                        best = both(best, hir_lits(sub));
                    }
                }
            }
            both(best, one(&run))
        }
        _ => None,
    }
}

/// The event's bytes as the gate reads them: lowercased, or None when the gate may not apply
/// (an escape or a non-ASCII byte anywhere).
pub(super) fn lowered<'b>(
    raw: &[u8],
    additions: &[&[u8]],
    buf: &'b mut Vec<u8>,
) -> Option<&'b [u8]> {
    lowered_parts(std::iter::once(raw).chain(additions.iter().copied()), buf)
}

/// `lowered` of the bytes of some parts of an event (the members gated rules read, and the
/// additions), each apart from the next.
pub(super) fn lowered_parts<'p, 'b>(
    parts: impl Iterator<Item = &'p [u8]>,
    buf: &'b mut Vec<u8>,
) -> Option<&'b [u8]> {
    buf.clear();
    for part in parts {
        if !part.is_ascii() || memchr::memchr(b'\\', part).is_some() {
            return None;
        }
        push_lowered(part, buf);
        // Literals hold no control character: none spans two parts.
        buf.push(b'\n');
    }
    Some(buf.as_slice())
}

/// Appends `ascii` (checked ASCII) lowercased, eight bytes at a time: a byte below 0x80 plus
/// 0x3f reaches 0x80 from `A` up, plus 0x25 from past `Z` up, and no sum carries into the next
/// byte. A per-byte loop cost about three times as much in the gate (callgrind).
fn push_lowered(ascii: &[u8], buf: &mut Vec<u8>) {
    const ONES: u64 = 0x0101_0101_0101_0101;
    let at = buf.len();
    buf.extend_from_slice(ascii);
    let Some(added) = buf.get_mut(at..) else {
        return;
    };
    let mut words = added.chunks_exact_mut(8);
    for w in words.by_ref() {
        let mut b = [0u8; 8];
        b.copy_from_slice(w);
        let x = u64::from_le_bytes(b);
        let upper = (x + 0x3f * ONES) & !(x + 0x25 * ONES) & (0x80 * ONES);
        w.copy_from_slice(&(x | (upper >> 2)).to_le_bytes());
    }
    words.into_remainder().make_ascii_lowercase();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ascii_is_lowered_eight_bytes_at_a_time_as_byte_by_byte() {
        let all: Vec<u8> = (0u8..0x80).collect();
        for start in 0..all.len() {
            for len in [0, 1, 7, 8, 9, 16, 23, 64] {
                let part = all.get(start..(start + len).min(all.len())).unwrap();
                let mut got = b"x".to_vec();
                push_lowered(part, &mut got);
                let mut want = b"x".to_vec();
                want.extend(part.iter().map(u8::to_ascii_lowercase));
                assert_eq!(got, want, "{part:?}");
            }
        }
    }

    #[test]
    fn regexes_give_the_literals_every_match_holds() {
        let lits = |p: &str| regex_lits(p);
        assert_eq!(
            lits(".+:assumed-role/aws:.+"),
            Some(vec![":assumed-role/aws:".to_owned()])
        );
        assert_eq!(lits("(?i)^TruffleHog"), Some(vec!["trufflehog".to_owned()]));
        assert_eq!(
            lits("^(abc|xyz)d?$"),
            Some(vec!["abc".to_owned(), "xyz".to_owned()])
        );
        // Nothing every match must hold, or only what a number could print as.
        assert_eq!(lits("a?b*"), None);
        assert_eq!(lits("ab|.*"), None);
        assert_eq!(lits("^[0-9]+\\.5$"), None);
        assert_eq!(lits("12\\.5"), None);
        // `(?i)k` also matches the Kelvin sign: on ASCII text, only k or K.
        assert_eq!(lits("(?i)kms"), Some(vec!["kms".to_owned()]));
        assert_eq!(lits("[ab]c"), Some(vec!["c".to_owned()]));
    }

    #[test]
    fn only_plain_ascii_events_are_gated() {
        let mut buf = Vec::new();
        assert_eq!(
            lowered(br#"{"a":"RooT"}"#, &[br#""g":1"#], &mut buf),
            Some(&b"{\"a\":\"root\"}\n\"g\":1\n"[..])
        );
        assert!(lowered(br#"{"a":"R\u006fot"}"#, &[], &mut buf).is_none());
        assert!(lowered("{\"a\":\"é\"}".as_bytes(), &[], &mut buf).is_none());
        assert!(lowered(b"{}", &["\"g\":\"\u{212a}\"".as_bytes()], &mut buf).is_none());
        assert_eq!(literal(b"1.5"), None);
        assert_eq!(literal(b""), None);
        assert_eq!(literal(b"a\"b"), None);
        assert_eq!(literal(b"-1e5"), Some("-1e5".to_owned()));
    }
}
