//! Which rules an event can match, from the `eventSource` and `eventName` the split already
//! read, and which of its members those rules read: most events then are not parsed again at
//! all, and the rest only for the members their candidate rules look at.
//!
//! Each compiled rule (after `[detect.fields]` and Sigma filters) is analysed into a necessary
//! condition: the folded values its `eventSource` and `eventName` may take. It is sound by
//! construction: anything the analysis does not understand (`not`, modifiers other than plain
//! equality, keywords, array scopes, a value that is not a plain string) leaves the field
//! unconstrained, so a rule is skipped only when it provably cannot match. A rule naming
//! neither is gated by the literals it needs (`literals`) instead, where that is sound.
//!
//! The members are read by `members::Plan`, one per set of candidate rules (cached per
//! thread): only the field paths those rules read are built.

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap};
use std::hash::{BuildHasherDefault, Hasher};
use std::rc::Rc;
use std::sync::LazyLock;
use std::sync::atomic::{AtomicU64, Ordering};

use memchr::memmem::Finder;
use rsigma_eval::compiler::{CompiledDetection, CompiledDetectionItem, CompiledRule};
use rsigma_eval::{CompiledMatcher, matcher::GroupMode};
use rsigma_parser::{ConditionExpr, Quantifier};

use super::literals;
use super::members::{self, Plan};

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

/// `fold(s)` into `buf` (no allocation once `buf` has grown).
fn fold_into<'b>(s: &str, buf: &'b mut String) -> &'b str {
    buf.clear();
    if s.is_ascii() {
        buf.push_str(s);
        buf.make_ascii_lowercase();
    } else {
        buf.push_str(&s.to_lowercase());
    }
    buf
}

/// The strings a value, folded, must equal for `m` to match it. A case-insensitive equality
/// compares the folded value with its own (already folded) one; a case-sensitive one implies
/// the folded equality, so it narrows too.
fn equal_to(m: &CompiledMatcher) -> Values {
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
        } => ms.iter().map(equal_to).reduce(either).unwrap_or_default(),
        CompiledMatcher::AllOf(ms)
        | CompiledMatcher::CaseInsensitiveGroup {
            children: ms,
            mode: GroupMode::All,
        } => ms.iter().map(equal_to).reduce(both).unwrap_or_default(),
        _ => None,
    }
}

fn item_need(i: &CompiledDetectionItem) -> Need {
    if i.exists.is_some() {
        return Need::default();
    }
    match i.field.as_deref() {
        Some(SOURCE) => Need {
            source: equal_to(&i.matcher),
            name: None,
        },
        Some(NAME) => Need {
            source: None,
            name: equal_to(&i.matcher),
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

/// The field paths a rule reads, when plain (dotted keys, no escapes or indexes): the
/// members `members::Plan` keeps.
fn plain(path: &str, out: &mut Vec<String>) -> bool {
    let ok = !path.is_empty()
        && !path.starts_with('.')
        && !path.ends_with('.')
        && !path.contains("..")
        && !path.contains(['\\', '[', ']']);
    if ok {
        out.push(path.to_owned());
    }
    ok
}

fn matcher_paths(m: &CompiledMatcher, out: &mut Vec<String>) -> bool {
    match m {
        CompiledMatcher::FieldRef { field, .. } => plain(field, out),
        // Placeholders are read from any field of the event.
        CompiledMatcher::Expand { .. } => false,
        CompiledMatcher::Not(inner) | CompiledMatcher::TimestampPart { inner, .. } => {
            matcher_paths(inner, out)
        }
        CompiledMatcher::AnyOf(ms)
        | CompiledMatcher::AllOf(ms)
        | CompiledMatcher::CaseInsensitiveGroup { children: ms, .. } => {
            ms.iter().all(|m| matcher_paths(m, out))
        }
        _ => true,
    }
}

fn detection_paths(d: &CompiledDetection, out: &mut Vec<String>) -> bool {
    match d {
        CompiledDetection::AllOf(items) => items.iter().all(|i| match &i.field {
            Some(f) => plain(f, out) && matcher_paths(&i.matcher, out),
            // A keyword item reads every string of the event.
            None => false,
        }),
        CompiledDetection::AnyOf(subs) | CompiledDetection::And(subs) => {
            subs.iter().all(|s| detection_paths(s, out))
        }
        // Array scopes, keywords and element-scoped conditions: not analysed.
        _ => false,
    }
}

/// The field paths rule `r` reads; None when it may read any member (keywords,
/// placeholders, paths that are not plain).
fn rule_paths(r: &CompiledRule) -> Option<Vec<String>> {
    let mut out = Vec::new();
    let plain = r.detections.values().all(|d| detection_paths(d, &mut out));
    out.sort();
    out.dedup();
    plain.then_some(out)
}

/// A few keys, told apart from most others by their length and first byte before any is
/// compared (an event's members are checked against them one by one).
#[derive(Debug)]
struct KeySet {
    keys: Vec<String>,
    /// Bit `first byte % 64` of entry `length % 64`: set for each key.
    seen: [u64; 64],
}

impl KeySet {
    fn new(mut keys: Vec<String>) -> KeySet {
        keys.sort();
        keys.dedup();
        let mut seen = [0u64; 64];
        for k in &keys {
            let first = k.bytes().next().unwrap_or(0);
            if let Some(slot) = seen.get_mut(k.len() % 64) {
                *slot |= 1 << (first % 64);
            }
        }
        KeySet { keys, seen }
    }

    fn holds(&self, key: &str) -> bool {
        let first = key.bytes().next().unwrap_or(0);
        self.seen
            .get(key.len() % 64)
            .is_some_and(|bits| bits & (1 << (first % 64)) != 0)
            && self.keys.iter().any(|k| k == key)
    }
}

/// The top-level members paths read: each path's first key, and the path as a flat key.
fn tops(paths: &[String]) -> impl Iterator<Item = String> + '_ {
    paths.iter().flat_map(|p| {
        let first = p.split('.').next().unwrap_or_default();
        [p.clone(), first.to_owned()]
    })
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
    /// Rules without either literal: evaluated on every event (that holds a literal they
    /// need, when they need one: `gates`).
    always: Vec<usize>,
    /// Per rule, the field paths it reads (None: possibly any member).
    paths: Vec<Option<Vec<String>>>,
    /// Per rule of `always`, the literals one of which an event it matches holds
    /// (`literals`), as searchers; None: no literal known.
    gates: Vec<Option<Vec<Finder<'static>>>>,
    /// Some rule is gated.
    gated: bool,
    /// The top-level members the gated rules read (the first key of each path, and the path
    /// as a flat key): the only bytes their literals are looked for in, with the additions,
    /// when the split listed the members. None when one may read any member.
    gate_members: Option<KeySet>,
    /// Tells one rule set's cached plans from another's.
    id: u64,
}

/// Per worker thread, the buffers one event's candidates are found with.
#[derive(Debug, Default)]
pub struct Scratch {
    pub candidates: Vec<usize>,
    lowered: Vec<u8>,
    name: String,
    source: String,
}

/// Each rule set's id (its plans are cached per thread under it).
static IDS: AtomicU64 = AtomicU64::new(0);

/// Most candidate sets whose plans a thread keeps (a few dozen occur).
const PLANS: usize = 4096;

/// A thread's plans: the rule set's id, and the plan of each candidate set seen.
type PlanCache = (
    u64,
    HashMap<Vec<usize>, Option<Rc<Plan>>, BuildHasherDefault<Mix>>,
);

/// A hasher for the candidate sets (a few small indexes, from the rules, not from input): a
/// multiply and rotate per word, where SipHash cost more than the lookup it serves.
#[derive(Default)]
struct Mix(u64);

impl Hasher for Mix {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // A slice of indexes arrives as its bytes: a word at a time.
        let mut words = bytes.chunks_exact(8);
        for w in words.by_ref() {
            let mut b = [0u8; 8];
            b.copy_from_slice(w);
            self.write_u64(u64::from_le_bytes(b));
        }
        for b in words.remainder() {
            self.write_u64(u64::from(*b));
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }
}

thread_local! {
    /// The member plan of each candidate set seen, for one rule set.
    static PLAN_CACHE: RefCell<PlanCache> = RefCell::new((u64::MAX, HashMap::default()));
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
        let mut p = Prefilter {
            id: IDS.fetch_add(1, Ordering::Relaxed),
            ..Prefilter::default()
        };
        let mut gate_members: Option<Vec<String>> = None;
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
            let gate = match (&need.name, &need.source) {
                (None, None) => literals::rule_lits(r)
                    .map(|ls| ls.iter().map(|l| Finder::new(l).into_owned()).collect()),
                _ => None,
            };
            let paths = rule_paths(r);
            if gate.is_some() {
                gate_members = match (p.gated, gate_members.take(), &paths) {
                    (false, _, Some(ps)) => Some(tops(ps).collect()),
                    (true, Some(mut keys), Some(ps)) => {
                        keys.extend(tops(ps));
                        Some(keys)
                    }
                    _ => None,
                };
                p.gated = true;
            }
            p.gates.push(gate);
            p.needs.push(need);
            p.paths.push(paths);
        }
        p.gate_members = gate_members.map(KeySet::new);
        p
    }

    /// The rules that may match an event with `keys` (and bytes `raw` and `additions`), into
    /// `s.candidates`, ascending (the engine's rule order).
    /// `listed`: the event's top-level members, when the split listed them.
    pub fn candidates(
        &self,
        keys: Keys<'_>,
        raw: &[u8],
        additions: &[&[u8]],
        listed: Option<&[(Cow<'_, str>, &str)]>,
        s: &mut Scratch,
    ) {
        let Scratch {
            candidates: out,
            lowered,
            name: name_buf,
            source: source_buf,
        } = s;
        out.clear();
        let source = keys.source.map(|v| fold_into(v, source_buf));
        let admits = |idx: &usize| match (&source, self.needs.get(*idx)) {
            (
                Some(s),
                Some(Need {
                    source: Some(set), ..
                }),
            ) => set.contains(*s),
            _ => true,
        };
        match keys.name {
            Some(n) => out.extend(
                self.by_name
                    .get(fold_into(n, name_buf))
                    .into_iter()
                    .flatten()
                    .filter(|i| admits(i)),
            ),
            None => out.extend(self.named.iter().filter(|i| admits(i))),
        }
        match source {
            Some(s) => out.extend(self.by_source.get(s).into_iter().flatten()),
            None => out.extend(&self.sourced),
        }
        // The bytes the gated rules read lowercased (None: the gates may not apply): only
        // the members they read when those are known, else the whole event.
        let hay = match (self.gated, listed, &self.gate_members) {
            (false, _, _) => None,
            (true, Some(list), Some(wanted)) => literals::lowered_parts(
                list.iter()
                    .filter(|(k, _)| wanted.holds(k))
                    .map(|(_, text)| text.as_bytes())
                    .chain(additions.iter().copied()),
                lowered,
            ),
            (true, _, _) => literals::lowered(raw, additions, lowered),
        };
        for &idx in &self.always {
            let admitted = match (self.gates.get(idx), hay) {
                (Some(Some(finders)), Some(h)) => finders.iter().any(|f| f.find(h).is_some()),
                _ => true,
            };
            if admitted {
                out.push(idx);
            }
        }
        out.sort_unstable();
    }

    /// What `candidates` read of an event; None when one may read any member. Built once per
    /// candidate set and thread.
    pub fn plan(&self, candidates: &[usize]) -> Option<Rc<Plan>> {
        PLAN_CACHE.with_borrow_mut(|(owner, plans)| {
            if *owner != self.id {
                plans.clear();
                *owner = self.id;
            }
            if let Some(p) = plans.get(candidates) {
                return p.clone();
            }
            let mut paths: Vec<&str> = Vec::new();
            let mut any = false;
            for idx in candidates {
                match self.paths.get(*idx) {
                    Some(Some(ps)) => paths.extend(ps.iter().map(String::as_str)),
                    _ => any = true,
                }
            }
            let plan = (!any).then(|| Rc::new(Plan::of(paths)));
            if plans.len() >= PLANS {
                plans.clear();
            }
            plans.insert(candidates.to_vec(), plan.clone());
            plan
        })
    }

    /// Rules evaluated on every event.
    #[cfg(test)]
    pub fn always(&self) -> &[usize] {
        &self.always
    }

    /// The gated rules and their literals.
    #[cfg(test)]
    pub fn gates(&self) -> Vec<(usize, Vec<String>)> {
        let text = |f: &Finder<'_>| String::from_utf8_lossy(f.needle()).into_owned();
        self.gates
            .iter()
            .enumerate()
            .filter_map(|(i, g)| g.as_ref().map(|fs| (i, fs.iter().map(text).collect())))
            .collect()
    }
}

impl<'a> Keys<'a> {
    /// The keys of an event from its head: only when the head was read from the event itself
    /// (a module's output may inherit fields it lacks) and no addition may replace them.
    pub fn of(head: &'a crate::cloudtrail::Head<'a>, exact: bool, additions: &[&[u8]]) -> Keys<'a> {
        static KEYS: LazyLock<[Finder<'static>; 2]> =
            LazyLock::new(|| [Finder::new(SOURCE), Finder::new(NAME)]);
        let replaced = additions
            .iter()
            .any(|add| members::addition_has(add, &*KEYS));
        if !exact || replaced {
            return Keys::default();
        }
        Keys {
            source: head.event_source.as_deref(),
            name: head.event_name.as_deref(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::BuildHasher;

    #[test]
    fn a_key_set_holds_exactly_its_keys() {
        let set = KeySet::new(
            [
                "userIdentity",
                "userIdentity.type",
                "a",
                "",
                "userAgent",
                "a",
            ]
            .map(String::from)
            .to_vec(),
        );
        for k in ["userIdentity", "userIdentity.type", "a", "", "userAgent"] {
            assert!(set.holds(k), "{k}");
        }
        // Same length and first byte, or neither: compared or rejected, never held.
        for k in [
            "userIdentitx",
            "b",
            "userAgenT",
            "eventName",
            "userIdentity.typ",
            "é",
        ] {
            assert!(!set.holds(k), "{k}");
        }
        let long = "k".repeat(64 + 12);
        assert!(
            !set.holds(&long),
            "a length past 64 wraps around, then compares"
        );
        assert!(!KeySet::new(Vec::new()).holds(""));
    }

    #[test]
    fn candidate_sets_hash_apart() {
        let hash = |v: &[usize]| BuildHasherDefault::<Mix>::default().hash_one(v);
        assert_ne!(hash(&[1, 2]), hash(&[2, 1]));
        assert_ne!(hash(&[0]), hash(&[0, 0]));
        assert_eq!(hash(&[3, 7]), hash(&[3, 7]));
    }
}
