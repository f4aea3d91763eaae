//! Which rules an event can match, from the `eventSource` and `eventName` the split already
//! read, and which of its members those rules read: most events then are not parsed again at
//! all, and the rest only for the members their candidate rules look at.
//!
//! Each compiled rule (after `[detect.fields]` and Sigma filters) is analysed into a necessary
//! condition: the folded values its `eventSource` and `eventName` may take. It is sound by
//! construction: anything the analysis does not understand (`not`, modifiers other than plain
//! equality, keywords, array scopes, a value that is not a plain string) leaves the field
//! unconstrained, so a rule is skipped only when it provably cannot match.

use std::collections::{BTreeSet, HashMap};

use rsigma_eval::compiler::{CompiledDetection, CompiledDetectionItem, CompiledRule};
use rsigma_eval::{CompiledMatcher, matcher::GroupMode};
use rsigma_parser::{ConditionExpr, Quantifier};
use serde_json::Value;

use crate::cloudtrail::Key;

/// The folded values a field may take for a rule to match; `None`: any value, or none.
type Values = Option<BTreeSet<String>>;

/// A rule's necessary condition on the two fields the split reads.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Need {
    source: Values,
    name: Values,
}

const SOURCE: &str = "eventSource";
const NAME: &str = "eventName";

fn both(a: Values, b: Values) -> Values {
    match (a, b) {
        (None, x) | (x, None) => x,
        (Some(a), Some(b)) => Some(a.intersection(&b).cloned().collect()),
    }
}

fn either(a: Values, b: Values) -> Values {
    match (a, b) {
        (Some(mut a), Some(b)) => {
            a.extend(b);
            Some(a)
        }
        _ => None,
    }
}

impl Need {
    fn and(self, o: Need) -> Need {
        Need {
            source: both(self.source, o.source),
            name: both(self.name, o.name),
        }
    }

    fn or(self, o: Need) -> Need {
        Need {
            source: either(self.source, o.source),
            name: either(self.name, o.name),
        }
    }

    /// All of `needs` (none: no condition).
    fn all(needs: impl IntoIterator<Item = Need>) -> Need {
        needs.into_iter().fold(Need::default(), Need::and)
    }

    /// Any of `needs` (none: no condition, though an empty `or` cannot match: sound).
    fn any(needs: impl IntoIterator<Item = Need>) -> Need {
        let mut it = needs.into_iter();
        match it.next() {
            Some(first) => it.fold(first, Need::or),
            None => Need::default(),
        }
    }
}

/// Sigma's default comparison, as rsigma-eval folds (`str::to_lowercase`).
fn fold(s: &str) -> std::borrow::Cow<'_, str> {
    if s.is_ascii() && !s.bytes().any(|b| b.is_ascii_uppercase()) {
        std::borrow::Cow::Borrowed(s)
    } else {
        std::borrow::Cow::Owned(s.to_lowercase())
    }
}

/// The strings a value, folded, must equal for `m` to match it. A case-insensitive equality
/// compares the folded value with its own (already folded) one; a case-sensitive one implies
/// the folded equality, so it narrows too.
fn literals(m: &CompiledMatcher) -> Values {
    match m {
        CompiledMatcher::Exact {
            value,
            case_insensitive: true,
        } => Some(BTreeSet::from([value.clone()])),
        CompiledMatcher::Exact {
            value,
            case_insensitive: false,
        } => Some(BTreeSet::from([fold(value).into_owned()])),
        CompiledMatcher::AnyOf(ms)
        | CompiledMatcher::CaseInsensitiveGroup {
            children: ms,
            mode: GroupMode::Any,
        } => ms.iter().map(literals).reduce(either).unwrap_or_default(),
        CompiledMatcher::AllOf(ms)
        | CompiledMatcher::CaseInsensitiveGroup {
            children: ms,
            mode: GroupMode::All,
        } => ms.iter().map(literals).reduce(both).unwrap_or_default(),
        _ => None,
    }
}

fn item_need(i: &CompiledDetectionItem) -> Need {
    if i.exists.is_some() {
        return Need::default();
    }
    match i.field.as_deref() {
        Some(SOURCE) => Need {
            source: literals(&i.matcher),
            name: None,
        },
        Some(NAME) => Need {
            source: None,
            name: literals(&i.matcher),
        },
        _ => Need::default(),
    }
}

fn detection_need(d: &CompiledDetection) -> Need {
    match d {
        CompiledDetection::AllOf(items) => Need::all(items.iter().map(item_need)),
        CompiledDetection::AnyOf(subs) => Need::any(subs.iter().map(detection_need)),
        CompiledDetection::And(subs) => Need::all(subs.iter().map(detection_need)),
        // Keywords, array scopes and element-scoped conditions: not analysed.
        _ => Need::default(),
    }
}

fn condition_need(e: &ConditionExpr, dets: &HashMap<String, CompiledDetection>) -> Need {
    match e {
        ConditionExpr::Identifier(name) => dets.get(name).map(detection_need).unwrap_or_default(),
        ConditionExpr::And(es) => Need::all(es.iter().map(|e| condition_need(e, dets))),
        ConditionExpr::Or(es) => Need::any(es.iter().map(|e| condition_need(e, dets))),
        ConditionExpr::Not(_) => Need::default(),
        ConditionExpr::Selector {
            quantifier,
            pattern,
        } => {
            // The same selection of detections the evaluator makes.
            let matching = dets
                .iter()
                .filter(|(n, _)| pattern.matches_detection_name(n))
                .map(|(_, d)| detection_need(d));
            match quantifier {
                // At least one matches (an empty `all of` is vacuously true: no condition).
                Quantifier::Any | Quantifier::Count(1..) => Need::any(matching),
                Quantifier::All => Need::all(matching),
                Quantifier::Count(0) => Need::default(),
            }
        }
    }
}

/// A rule matches when any of its conditions does.
fn rule_need(r: &CompiledRule) -> Need {
    Need::any(
        r.conditions
            .iter()
            .map(|c| condition_need(c, &r.detections)),
    )
}

/// The top-level members a field path can read: the path as one flat key and its first
/// segment. None for paths whose root is not plain (escapes, indexes).
fn roots_of(path: &str, out: &mut Vec<String>) -> bool {
    if path.is_empty() || path.starts_with('.') || path.contains(['\\', '[', ']']) {
        return false;
    }
    out.push(path.to_owned());
    if let Some((root, _)) = path.split_once('.') {
        out.push(root.to_owned());
    }
    true
}

fn matcher_roots(m: &CompiledMatcher, out: &mut Vec<String>) -> bool {
    match m {
        CompiledMatcher::FieldRef { field, .. } => roots_of(field, out),
        // Placeholders are read from any field of the event.
        CompiledMatcher::Expand { .. } => false,
        CompiledMatcher::Not(inner) | CompiledMatcher::TimestampPart { inner, .. } => {
            matcher_roots(inner, out)
        }
        CompiledMatcher::AnyOf(ms)
        | CompiledMatcher::AllOf(ms)
        | CompiledMatcher::CaseInsensitiveGroup { children: ms, .. } => {
            ms.iter().all(|m| matcher_roots(m, out))
        }
        _ => true,
    }
}

fn detection_roots(d: &CompiledDetection, out: &mut Vec<String>) -> bool {
    match d {
        CompiledDetection::AllOf(items) => items.iter().all(|i| match &i.field {
            Some(f) => roots_of(f, out) && matcher_roots(&i.matcher, out),
            // A keyword item reads every string of the event.
            None => false,
        }),
        CompiledDetection::AnyOf(subs) | CompiledDetection::And(subs) => {
            subs.iter().all(|s| detection_roots(s, out))
        }
        // Array scopes, keywords and element-scoped conditions: not analysed.
        _ => false,
    }
}

/// The top-level members rule `r` reads; None when it may read any (keywords, placeholders).
fn rule_roots(r: &CompiledRule) -> Option<Vec<String>> {
    let mut out = Vec::new();
    let plain = r.detections.values().all(|d| detection_roots(d, &mut out));
    out.sort();
    out.dedup();
    plain.then_some(out)
}

/// The rules an event can match, indexed by the literals they require.
#[derive(Debug, Default)]
pub struct Prefilter {
    needs: Vec<Need>,
    /// Rules requiring an `eventName` literal, by its folded value.
    by_name: HashMap<String, Vec<usize>>,
    /// Rules requiring an `eventSource` literal but no `eventName` one.
    by_source: HashMap<String, Vec<usize>>,
    /// Every rule of `by_name` / `by_source` once, for an event without a known value.
    named: Vec<usize>,
    sourced: Vec<usize>,
    /// Rules without either literal: evaluated on every event.
    always: Vec<usize>,
    /// Per rule, the top-level members it reads (None: possibly any).
    roots: Vec<Option<Vec<String>>>,
}

/// The `eventSource` and `eventName` of an event as the rules will see it, where known: None
/// when absent, not a string, or not read from the event itself (the rules may then match
/// any value).
#[derive(Debug, Clone, Copy, Default)]
pub struct Keys<'a> {
    pub source: Option<&'a str>,
    pub name: Option<&'a str>,
}

impl Prefilter {
    pub fn build(rules: &[CompiledRule]) -> Prefilter {
        let mut p = Prefilter::default();
        for (idx, r) in rules.iter().enumerate() {
            let need = rule_need(r);
            match (&need.name, &need.source) {
                (Some(names), _) => {
                    for n in names {
                        p.by_name.entry(n.clone()).or_default().push(idx);
                    }
                    p.named.push(idx);
                }
                (None, Some(sources)) => {
                    for s in sources {
                        p.by_source.entry(s.clone()).or_default().push(idx);
                    }
                    p.sourced.push(idx);
                }
                (None, None) => p.always.push(idx),
            }
            p.needs.push(need);
            p.roots.push(rule_roots(r));
        }
        p
    }

    /// The rules that may match an event with `keys`, ascending (the engine's rule order).
    pub fn candidates(&self, keys: Keys<'_>, out: &mut Vec<usize>) {
        out.clear();
        let source = keys.source.map(fold);
        let admits = |idx: &usize| match (&source, self.needs.get(*idx)) {
            (
                Some(s),
                Some(Need {
                    source: Some(set), ..
                }),
            ) => set.contains(&**s),
            _ => true,
        };
        match keys.name {
            Some(n) => out.extend(
                self.by_name
                    .get(&*fold(n))
                    .into_iter()
                    .flatten()
                    .filter(|i| admits(i)),
            ),
            None => out.extend(self.named.iter().filter(|i| admits(i))),
        }
        match &source {
            Some(s) => out.extend(self.by_source.get(&**s).into_iter().flatten()),
            None => out.extend(&self.sourced),
        }
        out.extend(&self.always);
        out.sort_unstable();
    }

    /// The top-level members `candidates` read; None when one may read any.
    pub fn members<'p>(&'p self, candidates: &[usize], out: &mut Vec<&'p str>) -> bool {
        out.clear();
        for idx in candidates {
            match self.roots.get(*idx) {
                Some(Some(roots)) => out.extend(roots.iter().map(String::as_str)),
                _ => return false,
            }
        }
        out.sort_unstable();
        out.dedup();
        true
    }

    /// Rules evaluated on every event.
    #[cfg(test)]
    pub fn always(&self) -> &[usize] {
        &self.always
    }
}

/// Reads the members of one JSON object whose keys are in `wanted`, skipping the others.
struct Members<'w>(&'w [&'w str]);

impl<'de> serde::de::DeserializeSeed<'de> for Members<'_> {
    type Value = serde_json::Map<String, Value>;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Members<'_> {
    type Value = serde_json::Map<String, Value>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut out = serde_json::Map::new();
        while let Some(Key(key)) = map.next_key::<Key<'de>>()? {
            if self.0.contains(&&*key) {
                // A repeated key: the last one wins, as when the whole event is parsed.
                out.insert(key.into_owned(), map.next_value::<Value>()?);
            } else {
                map.next_value::<serde::de::IgnoredAny>()?;
            }
        }
        Ok(out)
    }
}

/// The members of the event as written (`raw` with each addition merged in, as
/// `parse_written` merges them) whose keys are in `wanted`: what rules that read only those
/// members see of the whole event. None when `raw` is not a JSON object.
pub fn parse_members(raw: &[u8], additions: &[&[u8]], wanted: &[&str]) -> Option<Value> {
    let mut obj = match scan_members(raw, wanted) {
        Some(spans) => {
            let mut obj = serde_json::Map::new();
            for (key, value) in spans {
                // A repeated key: the last one wins, as when the whole event is parsed.
                obj.insert(key.to_owned(), serde_json::from_slice(value).ok()?);
            }
            obj
        }
        None => {
            use serde::de::DeserializeSeed;
            let mut de = serde_json::Deserializer::from_slice(raw);
            let obj = Members(wanted).deserialize(&mut de).ok()?;
            de.end().ok()?;
            obj
        }
    };
    for add in additions {
        // An addition (`"geo":{…}`) can only hold a wanted key if its name is in it, escaped
        // or not.
        let mentions = add.contains(&b'\\')
            || wanted
                .iter()
                .any(|k| memchr::memmem::find(add, k.as_bytes()).is_some());
        if !mentions {
            continue;
        }
        let mut wrapped = Vec::with_capacity(add.len() + 2);
        wrapped.push(b'{');
        wrapped.extend_from_slice(add);
        wrapped.push(b'}');
        if let Ok(Value::Object(m)) = serde_json::from_slice::<Value>(&wrapped) {
            obj.extend(m.into_iter().filter(|(k, _)| wanted.contains(&k.as_str())));
        }
    }
    Some(Value::Object(obj))
}

impl<'a> Keys<'a> {
    /// The keys of an event from its head: only when the head was read from the event itself
    /// (a module's output may inherit fields it lacks) and no addition may replace them.
    pub fn of(head: &'a crate::cloudtrail::Head<'a>, exact: bool, additions: &[&[u8]]) -> Keys<'a> {
        let replaced = additions.iter().any(|add| {
            add.contains(&b'\\')
                || memchr::memmem::find(add, SOURCE.as_bytes()).is_some()
                || memchr::memmem::find(add, NAME.as_bytes()).is_some()
        });
        if !exact || replaced {
            return Keys::default();
        }
        Keys {
            source: head.event_source.as_deref(),
            name: head.event_name.as_deref(),
        }
    }
}

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while b
        .get(i)
        .is_some_and(|c| matches!(c, b' ' | b'\t' | b'\n' | b'\r'))
    {
        i += 1;
    }
    i
}

/// Where the string whose opening quote is at `i` ends (one past its closing quote).
fn string_end(b: &[u8], i: usize) -> Option<usize> {
    let mut j = i + 1;
    loop {
        let at = j + memchr::memchr2(b'"', b'\\', b.get(j..)?)?;
        match b.get(at) {
            Some(b'"') => return Some(at + 1),
            _ => j = at + 2,
        }
    }
}

/// Where the value starting at `i` ends. Only strings and brackets are tracked: the bytes
/// are an event the split already read with serde, and the values kept are parsed by serde.
fn value_end(b: &[u8], i: usize) -> Option<usize> {
    match b.get(i)? {
        b'"' => string_end(b, i),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut j = i;
            loop {
                match b.get(j)? {
                    b'"' => {
                        j = string_end(b, j)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth = depth.checked_sub(1)?;
                        if depth == 0 {
                            return Some(j + 1);
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
        }
        _ => {
            let rest = b.get(i..)?;
            let len = rest
                .iter()
                .position(|c| matches!(c, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r'))
                .unwrap_or(rest.len());
            (len > 0).then_some(i + len)
        }
    }
}

/// The wanted top-level members of the JSON object `raw`, as (key, value bytes), found by a
/// scan that skips strings with memchr: far cheaper than serde stepping over every member.
/// None when a key holds an escape or the bytes are not laid out as an object (serde then
/// reads them).
fn scan_members<'r>(raw: &'r [u8], wanted: &[&str]) -> Option<Vec<(&'r str, &'r [u8])>> {
    let mut out = Vec::new();
    let mut i = skip_ws(raw, 0);
    if raw.get(i) != Some(&b'{') {
        return None;
    }
    i = skip_ws(raw, i + 1);
    if raw.get(i) == Some(&b'}') {
        i += 1;
    } else {
        loop {
            if raw.get(i) != Some(&b'"') {
                return None;
            }
            let end = string_end(raw, i)?;
            let key = raw.get(i + 1..end - 1)?;
            if key.contains(&b'\\') {
                return None;
            }
            let key = std::str::from_utf8(key).ok()?;
            i = skip_ws(raw, end);
            if raw.get(i) != Some(&b':') {
                return None;
            }
            let start = skip_ws(raw, i + 1);
            let stop = value_end(raw, start)?;
            if wanted.contains(&key) {
                out.push((key, raw.get(start..stop)?));
            }
            i = skip_ws(raw, stop);
            match raw.get(i) {
                Some(b',') => i = skip_ws(raw, i + 1),
                Some(b'}') => {
                    i += 1;
                    break;
                }
                _ => return None,
            }
        }
    }
    (skip_ws(raw, i) == raw.len()).then_some(out)
}
