//! The event as the rules read it, straight from the members the split listed: a path is
//! found in the event's bytes when a rule reads it, and a string without escapes is handed
//! over where it lies, so no JSON tree is built for the handful of fields a rule tests (most
//! candidate rules stop at their first field). What a read finds is what `View` finds in the
//! pruned event `Plan::parse_listed` builds; tested against it and against the whole event.

use std::borrow::Cow;
use std::cell::{Cell, OnceCell};

use rsigma_eval::{Event, EventValue};
use serde_json::{Map, Value};

use super::members::{MAX_DEPTH, Node, Plan, member_of, scan_array, value_end};
use super::view::{Found, View, follow};

pub struct Listed<'a> {
    raw: &'a [u8],
    /// Every top-level member of `raw`, in order (a repeated key: the last one counts).
    list: &'a [(Cow<'a, str>, &'a str)],
    additions: &'a [&'a [u8]],
    plan: &'a Plan,
    /// The additions' members the rules read (usually none): they stand in for the event's.
    added: Map<String, Value>,
    /// A value a read reached does not build (nested too deep, a lone surrogate): the rules'
    /// answers are not trusted, and the event is judged on the pruned tree instead.
    failed: Cell<bool>,
    /// The pruned tree, for what is not a plain dotted read (keywords, an indexed path).
    pruned: OnceCell<Option<Value>>,
}

enum Top<'a, 's> {
    Added(&'s Value),
    Raw(&'a str),
}

impl<'a> Listed<'a> {
    pub fn new(
        raw: &'a [u8],
        list: &'a [(Cow<'a, str>, &'a str)],
        additions: &'a [&'a [u8]],
        plan: &'a Plan,
    ) -> Listed<'a> {
        let mut added = Map::new();
        plan.merge(&mut added, additions);
        Listed {
            raw,
            list,
            additions,
            plan,
            added,
            failed: Cell::new(false),
            pruned: OnceCell::new(),
        }
    }

    /// Whether a read met a value that does not build: then what the rules answered is void.
    pub fn failed(&self) -> bool {
        self.failed.get()
    }

    /// The pruned tree, once built (for an alert or a correlation, when one was).
    pub fn into_pruned(self) -> Option<Value> {
        self.pruned.into_inner().flatten()
    }

    fn pruned(&self) -> Option<&Value> {
        let v = self
            .pruned
            .get_or_init(|| self.plan.parse_listed(self.raw, self.list, self.additions))
            .as_ref();
        if v.is_none() {
            self.failed.set(true);
        }
        v
    }

    /// The top-level member `key`, as the pruned tree holds it.
    fn top(&self, key: &str) -> Option<Top<'a, '_>> {
        if let Some(v) = self.added.get(key) {
            return Some(Top::Added(v));
        }
        self.list
            .iter()
            .rev()
            .find(|(k, _)| k.len() == key.len() && k.as_ref() == key)
            .map(|(_, text)| Top::Raw(text))
    }

    /// `get_field`, or None when a value it reached does not build.
    fn read(&self, path: &str) -> Option<Option<EventValue<'_>>> {
        let root = self.plan.root();
        // The flat key first, as the engine reads it: the pruned tree holds it when planned.
        if let Some((_, node)) = root.find(path.as_bytes()) {
            match (self.top(path), node) {
                (Some(Top::Added(v)), _) => return Some(Some(EventValue::from(v))),
                (Some(Top::Raw(text)), Node::Whole) => return leaf(text, 1).map(Some),
                (Some(Top::Raw(_)), Node::Sub(_)) => return self.in_pruned(path),
                (None, _) => {}
            }
        }
        if path.contains(['[', '\\']) {
            return self.in_pruned(path);
        }
        let mut segs = Dots(Some(path));
        let (Some(first), true) = (segs.next(), path.contains('.')) else {
            return Some(None);
        };
        let Some((_, node)) = root.find(first.as_bytes()) else {
            return Some(None);
        };
        let mut found = Found::None;
        match self.top(first) {
            None => {}
            // An addition's member is merged whole.
            Some(Top::Added(v)) => follow(v, segs, &mut found),
            Some(Top::Raw(text)) => match held(node, segs.clone()) {
                Held::Whole => self.follow(text, segs, 1, &mut found)?,
                Held::Absent => {}
                Held::Partly => return self.in_pruned(path),
            },
        }
        Some(found.value())
    }

    /// The read of `path` in the pruned tree (the view borrows it only for the call).
    fn in_pruned(&self, path: &str) -> Option<Option<EventValue<'_>>> {
        let view = View::new(self.pruned()?);
        Some(view.get_field(path).map(|v| owned(&v.to_json())))
    }

    /// Follows the keys `segs` from `text`, a value inside `depth` arrays and objects, as
    /// `view::follow` follows them in the pruned tree (and `prune` refuses what it refuses).
    /// An object stepped into is scanned for the one key read, keeping nothing: under
    /// callgrind nine in ten reads step into an object no earlier read had.
    fn follow<'s, 'o>(
        &self,
        text: &'a str,
        mut segs: impl Iterator<Item = &'s str> + Clone,
        depth: usize,
        out: &mut Found<'o>,
    ) -> Option<()>
    where
        'a: 'o,
    {
        let rest = segs.clone();
        let Some(key) = segs.next() else {
            out.push(leaf(text, depth)?);
            return Some(());
        };
        match text.as_bytes().first() {
            // One more array or object than serde_json builds.
            Some(b'{' | b'[') if depth >= MAX_DEPTH => None,
            Some(b'{') => match member_of(text.as_bytes(), 1, key.as_bytes())? {
                Some(m) => self.follow(text.get(m.start..m.stop)?, segs, depth + 1, out),
                None => Some(()),
            },
            // A key read through an array is read in each element.
            Some(b'[') => {
                let mut items = Vec::new();
                scan_array(text.as_bytes(), 1, |e| {
                    items.push(e);
                    Some(())
                })?;
                for e in items {
                    let item = text.get(e.start..e.stop)?;
                    self.follow(item, rest.clone(), depth + 1, out)?;
                }
                Some(())
            }
            // A key read in a string, number, bool or null finds nothing.
            _ => Some(()),
        }
    }
}

/// `str::split('.')` by a byte loop: the keys of a path are a few bytes each, shorter than a
/// `memchr` call pays off for (callgrind: half the cost per key).
#[derive(Clone)]
struct Dots<'a>(Option<&'a str>);

impl<'a> Iterator for Dots<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        let s = self.0?;
        match s.bytes().position(|c| c == b'.') {
            // `i` is a dot's, a char boundary.
            Some(i) => {
                self.0 = s.get(i + 1..);
                s.get(..i)
            }
            None => {
                self.0 = None;
                Some(s)
            }
        }
    }
}

/// How much of a value the pruned tree holds at the keys `segs` below it, where the plan
/// reads `node` of it.
enum Held {
    /// All of it: read in the bytes as they lie.
    Whole,
    /// Nothing: the plan does not name a key on the way, so `prune` left it out.
    Absent,
    /// Only the members the plan names: read in the pruned tree.
    Partly,
}

fn held<'s>(mut node: &Node, mut segs: impl Iterator<Item = &'s str>) -> Held {
    loop {
        let Node::Sub(level) = node else {
            return Held::Whole;
        };
        let Some(seg) = segs.next() else {
            return Held::Partly;
        };
        match level.find(seg.as_bytes()) {
            Some((_, next)) => node = next,
            None => return Held::Absent,
        }
    }
}

/// The value `text`, inside `depth` arrays and objects, as the engine sees it once serde has
/// built it. None when serde does not build it.
fn leaf(text: &str, depth: usize) -> Option<EventValue<'_>> {
    let b = text.as_bytes();
    match b.first()? {
        b'"' => {
            let inner = text.get(1..text.len().checked_sub(1)?)?;
            match memchr::memchr(b'\\', inner.as_bytes()) {
                None => Some(EventValue::Str(Cow::Borrowed(inner))),
                Some(_) => serde_json::from_str::<String>(text)
                    .ok()
                    .map(|s| EventValue::Str(Cow::Owned(s))),
            }
        }
        // The bytes are JSON already checked by the split.
        b't' => Some(EventValue::Bool(true)),
        b'f' => Some(EventValue::Bool(false)),
        b'n' => Some(EventValue::Null),
        b'{' | b'[' => {
            // A value nesting `n` containers is at least `2n` bytes: counted only when it
            // may reach the depth limit.
            if depth + text.len() / 2 > MAX_DEPTH && depth + value_end(b, 0)?.1 > MAX_DEPTH {
                return None;
            }
            serde_json::from_str::<Value>(text).ok().map(|v| owned(&v))
        }
        _ => serde_json::from_str::<Value>(text).ok().map(|v| owned(&v)),
    }
}

/// `EventValue::from`, owning its strings.
fn owned(v: &Value) -> EventValue<'static> {
    match v {
        Value::String(s) => EventValue::Str(Cow::Owned(s.clone())),
        Value::Number(n) => match n.as_i64() {
            Some(i) => EventValue::Int(i),
            None => EventValue::Float(n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::Bool(b) => EventValue::Bool(*b),
        Value::Null => EventValue::Null,
        Value::Array(items) => EventValue::Array(items.iter().map(owned).collect()),
        Value::Object(map) => EventValue::Map(
            map.iter()
                .map(|(k, v)| (Cow::Owned(k.clone()), owned(v)))
                .collect(),
        ),
    }
}

impl Event for Listed<'_> {
    fn get_field(&self, path: &str) -> Option<EventValue<'_>> {
        if self.failed.get() {
            return None;
        }
        match self.read(path) {
            Some(v) => v,
            None => {
                self.failed.set(true);
                None
            }
        }
    }

    fn any_string_value(&self, pred: &dyn Fn(&str) -> bool) -> bool {
        self.pruned()
            .is_some_and(|v| View::new(v).any_string_value(pred))
    }

    fn all_string_values(&self) -> Vec<Cow<'_, str>> {
        let Some(v) = self.pruned() else {
            return Vec::new();
        };
        let view = View::new(v);
        let all = view.all_string_values();
        all.into_iter()
            .map(|s| Cow::Owned(s.into_owned()))
            .collect()
    }

    fn visit_string_values(&self, visit: &mut dyn FnMut(&str)) {
        if let Some(v) = self.pruned() {
            View::new(v).visit_string_values(visit)
        }
    }

    fn to_json(&self) -> Value {
        self.pruned().cloned().unwrap_or_default()
    }

    fn field_keys(&self) -> Vec<Cow<'_, str>> {
        let Some(v) = self.pruned() else {
            return Vec::new();
        };
        let view = View::new(v);
        let keys = view.field_keys();
        keys.into_iter()
            .map(|s| Cow::Owned(s.into_owned()))
            .collect()
    }

    fn top_level_keys(&self) -> Option<Vec<Cow<'_, str>>> {
        let view = View::new(self.pruned()?);
        let keys = view.top_level_keys()?;
        Some(
            keys.into_iter()
                .map(|s| Cow::Owned(s.into_owned()))
                .collect(),
        )
    }

    fn visit_top_level_keys(&self, visit: &mut dyn FnMut(&str)) -> bool {
        self.pruned()
            .is_some_and(|v| View::new(v).visit_top_level_keys(visit))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every path read where it lies gives what the pruned tree gives.
    #[test]
    fn a_path_read_where_it_lies_is_what_the_pruned_tree_holds() {
        let events = [
            r#"{"a":{"b":[{"c":1},{"c":[2,3]},{"d":4},[{"c":5}]],"x.y":6},"a.b":"flat","n":null,"s":"t","e":{"":{"f":7}},"":{"g":8}}"#,
            r#"{"r":[{"ARN":"a"},{"ARN":"b"}],"one":[{"k":"v"}],"z":[[1],2],"r":[{"ARN":"last"}]}"#,
            "{ \"u\" : { \"t\" : \"T\\u0041\" , \"t\":\"again\", \"o\": [1, -1.5e3, true, false, null, 18446744073709551615] } ,\"q\":\"a}\\\"]\", \"big\": 18446744073709551615, \"neg\": -9223372036854775808}",
            r#"{"a":1,"geo":{"city":"x"},"s":"own"}"#,
            "{}",
        ];
        let plain = [
            "a",
            "a.b",
            "a.b.c",
            "a.b.d",
            "a.x.y",
            "a.x",
            "n",
            "n.x",
            "s",
            "s.x",
            "e..f",
            ".g",
            "e.",
            "r.ARN",
            "r",
            "one.k",
            "z",
            "z.x",
            "u",
            "u.t",
            "u.o",
            "q",
            "big",
            "neg",
            "geo.city",
            "geo",
            "missing",
            "missing.x",
            "a.b.c.d",
            "",
        ];
        let odd = ["a.b[0].c", "a\\.b", "u.o[1]"];
        // The rules' plan, and plans naming less than is read (a read outside the plan finds
        // what the pruned tree holds: nothing, or only the members planned).
        let plans = [
            Plan::of(plain),
            Plan::of([
                "a.b.c", "a.x.y", "u.t", "r", "s.x", "n.x", "geo.city", "e..f",
            ]),
            Plan::of(["a", "u.o", "z.x", "geo"]),
            Plan::of([]),
        ];
        let adds: &[&[u8]] = &[br#""geo":{"city":"added"},"s":"from an addition""#];
        for (ev, plan, adds) in events
            .iter()
            .flat_map(|e| plans.iter().map(move |p| (e, p)))
            .flat_map(|(e, p)| [(e, p, &[][..]), (e, p, adds)])
        {
            let head = crate::cloudtrail::listed_head_of(ev.as_bytes()).expect(ev);
            let list = head.members.as_ref().and_then(|m| m.of(ev.as_bytes()));
            let list = list.expect("listed");
            let listed = Listed::new(ev.as_bytes(), list, adds, plan);
            let pruned = plan.parse_listed(ev.as_bytes(), list, adds).expect(ev);
            let view = View::new(&pruned);
            for p in plain.iter().chain(&odd) {
                let (got, want) = (listed.get_field(p), view.get_field(p));
                assert_eq!(got, want, "{p} in {ev} with {:?}", plan.root());
            }
            assert!(!listed.failed(), "{ev}");
        }
    }

    #[test]
    fn a_path_is_split_at_its_dots_as_str_split_splits_it() {
        for p in [
            "",
            ".",
            "a",
            "a.b",
            "a..b",
            ".a",
            "a.",
            "é.ü.x",
            "userIdentity.arn",
        ] {
            let dots: Vec<&str> = Dots(Some(p)).collect();
            assert_eq!(dots, p.split('.').collect::<Vec<_>>(), "{p}");
        }
    }

    /// A read reaching a value serde will not build voids the answers; one that does not
    /// reach it reads on.
    #[test]
    fn a_value_that_does_not_build_fails_only_the_read_reaching_it() {
        let ev = r#"{"ok":"yes","bad":{"s":"\ud800"},"deep":[[[[[[1]]]]]],"huge":1e400}"#;
        let plan = Plan::of(["ok", "bad.s", "deep", "huge"]);
        let head = crate::cloudtrail::listed_head_of(ev.as_bytes()).expect("head");
        let list = head.members.as_ref().and_then(|m| m.of(ev.as_bytes()));
        let listed = Listed::new(ev.as_bytes(), list.expect("listed"), &[], &plan);
        assert_eq!(listed.get_field("ok"), Some(EventValue::Str("yes".into())));
        assert!(listed.get_field("deep").is_some());
        assert!(!listed.failed());
        assert_eq!(listed.get_field("bad.s"), None);
        assert!(listed.failed());
        // A number serde will not build (out of f64's range) fails the read as well.
        let listed = Listed::new(ev.as_bytes(), list.expect("listed"), &[], &plan);
        assert_eq!(listed.get_field("huge"), None);
        assert!(listed.failed());
        // Too deep for serde at this depth: refused as `prune` refuses it.
        assert!(leaf("[[1]]", MAX_DEPTH - 1).is_none());
        assert!(leaf("[[1]]", MAX_DEPTH - 2).is_some());
    }
}
