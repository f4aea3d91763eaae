//! The members of an event that rules read, taken from its bytes: a scan that steps over
//! strings with memchr finds them, and only they are built as JSON values, pruned to the
//! paths the rules read (`userIdentity.type` builds `{"userIdentity":{"type":…}}`, not the
//! whole identity). What the rules see of the pruned event is what they see of the whole:
//! rsigma-eval reads a path as the flat top-level key, else key by key, each key applied to
//! every element of an array on the way; the pruned event keeps every value such a read
//! reaches.
//!
//! The scan trusts the bytes to be JSON (the split and the transform host checked them) and
//! leaves the values it keeps to serde. A member that does not build (nested too deep, a lone
//! surrogate) fails the event only when a rule reads it.

use std::borrow::Cow;

use memchr::memmem::Finder;
use serde_json::{Map, Value};

/// The most arrays and objects, one in another, serde_json builds (the event's own object
/// counted): a member read is refused exactly where parsing the whole event would be.
pub(super) const MAX_DEPTH: usize = 127;

/// What a set of rules reads of one object: per key, the whole value or some of its members.
#[derive(Debug, Default, PartialEq)]
pub struct Level(Vec<(String, Node)>);

#[derive(Debug, PartialEq)]
pub(super) enum Node {
    Whole,
    Sub(Level),
}

impl Level {
    pub(super) fn find(&self, key: &[u8]) -> Option<(&str, &Node)> {
        self.0
            .iter()
            .find(|(k, _)| k.len() == key.len() && k.as_bytes() == key)
            .map(|(k, n)| (k.as_str(), n))
    }

    /// Adds the path `segs` (all of it from this level down).
    fn add(&mut self, segs: &[&str]) {
        let Some((first, rest)) = segs.split_first() else {
            return;
        };
        let at = match self.0.iter().position(|(k, _)| k == first) {
            Some(at) => at,
            None => {
                let node = match rest.is_empty() {
                    true => Node::Whole,
                    false => Node::Sub(Level::default()),
                };
                self.0.push(((*first).to_owned(), node));
                self.0.len() - 1
            }
        };
        if let Some((_, node)) = self.0.get_mut(at) {
            match (rest.is_empty(), &mut *node) {
                (_, Node::Whole) => {}
                (true, n) => *n = Node::Whole,
                (false, Node::Sub(l)) => l.add(rest),
            }
        }
    }
}

/// The members of an event a set of rules reads.
#[derive(Debug, Default)]
pub struct Plan {
    root: Level,
    /// A searcher for each top-level key, built once: an addition none of them occurs in
    /// (and without an escape) holds no member read.
    finders: Vec<Finder<'static>>,
}

impl PartialEq for Plan {
    fn eq(&self, o: &Plan) -> bool {
        self.root == o.root
    }
}

impl Plan {
    /// What the rules read of the event's own object.
    pub(super) fn root(&self) -> &Level {
        &self.root
    }

    /// The plan for rules reading `paths` (plain dotted paths: no escapes or indexes).
    pub fn of<'a>(paths: impl IntoIterator<Item = &'a str>) -> Plan {
        let mut root = Level::default();
        for p in paths {
            // The flat key first: rsigma-eval reads it before following the dots.
            root.add(&[p]);
            if p.contains('.') {
                let segs: Vec<&str> = p.split('.').collect();
                root.add(&segs);
            }
        }
        let finders = root
            .0
            .iter()
            .map(|(k, _)| Finder::new(k.as_bytes()).into_owned())
            .collect();
        Plan { root, finders }
    }

    /// The event as these rules see it: the members of `raw` they read, pruned, with each
    /// addition merged in as `parse_written` merges it. None when the bytes are not laid out
    /// as an object, or a member a rule reads does not build.
    pub fn parse(&self, raw: &[u8], additions: &[&[u8]]) -> Option<Value> {
        let start = skip_ws(raw, 0);
        if raw.get(start) != Some(&b'{') {
            return None;
        }
        let mut obj = Map::new();
        let end = scan_object(raw, start + 1, true, |key, v| {
            if let Some((name, node)) = self.root.find(&key) {
                // A repeated key: the last one wins, as when the whole event is parsed.
                obj.insert(name.to_owned(), prune(raw, v, node, 1)?);
            }
            Some(())
        })?;
        if skip_ws(raw, end) != raw.len() {
            return None;
        }
        self.merge(&mut obj, additions);
        Some(Value::Object(obj))
    }

    /// `parse`, from the members the split listed (`cloudtrail::Members`) instead of a scan
    /// of the event's top level: `list` holds every member of `raw`, in order.
    pub fn parse_listed(
        &self,
        raw: &[u8],
        list: &[(Cow<'_, str>, &str)],
        additions: &[&[u8]],
    ) -> Option<Value> {
        let mut obj = Map::new();
        for (key, text) in list {
            if let Some((name, node)) = self.root.find(key.as_bytes()) {
                obj.insert(name.to_owned(), prune(raw, span_in(raw, text)?, node, 1)?);
            }
        }
        self.merge(&mut obj, additions);
        Some(Value::Object(obj))
    }

    /// Merges the members of `additions` these rules read into `obj`, as `parse_written`
    /// merges them.
    pub(super) fn merge(&self, obj: &mut Map<String, Value>, additions: &[&[u8]]) {
        for add in additions {
            if !may_hold(add, &self.finders) {
                continue;
            }
            let mut wanted = false;
            let laid_out = scan_object(add, 0, false, |key, _| {
                wanted |= self.root.find(&key).is_some();
                Some(())
            });
            if laid_out.is_some() && !wanted {
                continue;
            }
            // Rare: parsed as `parse_written` parses it (one that does not parse is not
            // merged), its wanted members kept whole.
            if let Some(m) = parse_addition(add) {
                obj.extend(
                    m.into_iter()
                        .filter(|(k, _)| self.root.find(k.as_bytes()).is_some()),
                );
            }
        }
    }
}

/// Where `text`, a value's bytes lying within `raw`, is in `raw`. Its nesting is counted only
/// when it may reach the depth limit: a value nesting `n` containers is at least `2n` bytes.
fn span_in(raw: &[u8], text: &str) -> Option<Span> {
    let start = (text.as_ptr() as usize).checked_sub(raw.as_ptr() as usize)?;
    let stop = start.checked_add(text.len())?;
    if stop > raw.len() {
        return None;
    }
    let nesting = match text.len() < 2 * MAX_DEPTH {
        true => 0,
        false => value_end(raw, start)?.1,
    };
    Some(Span {
        start,
        stop,
        nesting,
    })
}

/// An addition (`"key":value,…`) as an object, as `parse_written` reads it.
fn parse_addition(add: &[u8]) -> Option<Map<String, Value>> {
    let mut wrapped = Vec::with_capacity(add.len() + 2);
    wrapped.push(b'{');
    wrapped.extend_from_slice(add);
    wrapped.push(b'}');
    match serde_json::from_slice::<Value>(&wrapped) {
        Ok(Value::Object(m)) => Some(m),
        _ => None,
    }
}

/// False when `add` cannot hold a member named one of `keys`: it has no escape, so each of
/// its keys is its bytes, and none of theirs occurs in it. Cheaper than scanning it.
fn may_hold(add: &[u8], keys: &[Finder<'_>]) -> bool {
    memchr::memchr(b'\\', add).is_some() || keys.iter().any(|k| k.find(add).is_some())
}

/// True when an addition may hold one of `keys` (a key that does not scan may be any).
pub fn addition_has(add: &[u8], keys: &[Finder<'_>]) -> bool {
    if !may_hold(add, keys) {
        return false;
    }
    let mut has = false;
    let laid_out = scan_object(add, 0, false, |key, _| {
        has |= keys.iter().any(|k| k.needle() == &*key);
        Some(())
    });
    has || laid_out.is_none()
}

/// The value `v`, inside `depth` arrays and objects, as far as `node` reads it.
fn prune(b: &[u8], v: Span, node: &Node, depth: usize) -> Option<Value> {
    let bytes = b.get(v.start..v.stop)?;
    let Node::Sub(level) = node else {
        return match depth + v.nesting <= MAX_DEPTH {
            true => serde_json::from_slice(bytes).ok(),
            false => None,
        };
    };
    match bytes.first() {
        // One more array or object than serde_json builds.
        Some(b'{' | b'[') if depth >= MAX_DEPTH => None,
        Some(b'{') => {
            let mut map = Map::new();
            scan_object(b, v.start + 1, true, |key, m| {
                if let Some((name, node)) = level.find(&key) {
                    map.insert(name.to_owned(), prune(b, m, node, depth + 1)?);
                }
                Some(())
            })?;
            Some(Value::Object(map))
        }
        // A key read through an array is read in each element.
        Some(b'[') => {
            let mut items = Vec::new();
            scan_array(b, v.start + 1, |e| {
                items.push(prune(b, e, node, depth + 1)?);
                Some(())
            })?;
            Some(Value::Array(items))
        }
        // A key read in a string, number, bool or null finds nothing: whatever it is.
        _ => Some(Value::Null),
    }
}

/// The event with every part that builds (for an alert's body when the whole event does
/// not): a value serde will not build (nested too deep, a lone surrogate) is left out, and
/// the object or array holding it keeps its other members, so a member a rule matched stays
/// beside one nested too deep. None when the bytes are not an object.
pub fn readable(raw: &[u8], additions: &[&[u8]]) -> Option<Value> {
    let start = skip_ws(raw, 0);
    if raw.get(start) != Some(&b'{') {
        return None;
    }
    let mut obj = members_built(raw, start + 1, 1)?;
    for add in additions {
        obj.extend(parse_addition(add).unwrap_or_default());
    }
    Some(Value::Object(obj))
}

/// The members that build of the object whose members start at `i` (after its `{`), they
/// inside `depth` arrays and objects (this one counted).
fn members_built(b: &[u8], i: usize, depth: usize) -> Option<Map<String, Value>> {
    let mut map = Map::new();
    scan_object(b, i, true, |key, v| {
        // A key still holding an escape is one that did not unescape (`key_of` keeps its
        // bytes): its text is unknown, so it is left out.
        let name = match key {
            Cow::Borrowed(k) if memchr::memchr(b'\\', k).is_some() => None,
            k => String::from_utf8(k.into_owned()).ok(),
        };
        if let Some(name) = name {
            // A repeated key: the last copy, as serde takes it, or none when it does not
            // build (never the earlier copy in its place).
            match built(b, v, depth) {
                Some(value) => map.insert(name, value),
                None => map.remove(&name),
            };
        }
        Some(())
    })?;
    Some(map)
}

/// The value `v`, inside `depth` arrays and objects, with every part that builds; None when
/// nothing of it does (an array or object all of whose members fail).
fn built(b: &[u8], v: Span, depth: usize) -> Option<Value> {
    let bytes = b.get(v.start..v.stop)?;
    if depth + v.nesting <= MAX_DEPTH
        && let Ok(value) = serde_json::from_slice(bytes)
    {
        return Some(value);
    }
    match bytes.first() {
        // One more array or object than serde_json builds.
        Some(b'{' | b'[') if depth >= MAX_DEPTH => None,
        Some(b'{') => {
            let map = members_built(b, v.start + 1, depth + 1)?;
            (!map.is_empty()).then_some(Value::Object(map))
        }
        Some(b'[') => {
            let mut items = Vec::new();
            scan_array(b, v.start + 1, |e| {
                items.extend(built(b, e, depth + 1));
                Some(())
            })?;
            (!items.is_empty()).then_some(Value::Array(items))
        }
        _ => None,
    }
}

pub(super) fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while b
        .get(i)
        .is_some_and(|c| matches!(c, b' ' | b'\t' | b'\n' | b'\r'))
    {
        i += 1;
    }
    i
}

/// Where the string whose opening quote is at `i` ends (one past its closing quote).
/// Measured under callgrind on `trailhose bench`: a byte loop over the first 32 bytes, and
/// serde stepping over unread members (`IgnoredAny`), both cost more than this.
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

/// Where the value starting at `i` ends, and how many arrays and objects it nests. Only
/// strings and brackets are tracked: the bytes are JSON already checked, and the values kept
/// are parsed by serde.
pub(super) fn value_end(b: &[u8], i: usize) -> Option<(usize, usize)> {
    match b.get(i)? {
        b'"' => string_end(b, i).map(|e| (e, 0)),
        b'{' | b'[' => {
            let (mut depth, mut deepest) = (0usize, 0usize);
            let mut j = i;
            loop {
                match b.get(j)? {
                    b'"' => {
                        j = string_end(b, j)?;
                        continue;
                    }
                    b'{' | b'[' => {
                        depth += 1;
                        deepest = deepest.max(depth);
                    }
                    b'}' | b']' => {
                        depth = depth.checked_sub(1)?;
                        if depth == 0 {
                            return Some((j + 1, deepest));
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
            (len > 0).then_some((i + len, 0))
        }
    }
}

/// A member's key as the rules name it, from its quoted bytes `q`: unescaped when it holds an
/// escape (one that does not unescape stays as it is, which names no rule's field: those hold
/// no `\`).
fn key_of(q: &[u8]) -> Cow<'_, [u8]> {
    let inner = inner_of(q);
    if memchr::memchr(b'\\', inner).is_none() {
        return Cow::Borrowed(inner);
    }
    match serde_json::from_slice::<String>(q) {
        Ok(s) => Cow::Owned(s.into_bytes()),
        Err(_) => Cow::Borrowed(inner),
    }
}

/// The bytes between a string's quotes.
fn inner_of(q: &[u8]) -> &[u8] {
    q.len()
        .checked_sub(1)
        .and_then(|e| q.get(1..e))
        .unwrap_or_default()
}

/// Whether the quoted key `q` names `key` (which holds no escape), as `key_of` reads it:
/// only a longer key can hold an escape that unescapes to it, so most are compared only.
#[inline]
fn names(q: &[u8], key: &[u8]) -> bool {
    let inner = inner_of(q);
    inner == key
        || (inner.len() > key.len()
            && memchr::memchr(b'\\', inner).is_some()
            && key_of(q).as_ref() == key)
}

/// The last member named `key` (no escapes) of the object whose members start at `i`,
/// after its `{`: Some(None) when it has none, None when it is not laid out as an object.
/// Nothing is kept of the other members (a read by `detect::listed`).
pub(super) fn member_of(b: &[u8], i: usize, key: &[u8]) -> Option<Option<Span>> {
    let mut last = None;
    scan_members(b, i, true, |q, span| {
        if names(q, key) {
            last = Some(span);
        }
        Some(())
    })?;
    Some(last)
}

/// A member's value: where it starts and ends, and how many arrays and objects it nests.
#[derive(Clone, Copy)]
pub(super) struct Span {
    pub(super) start: usize,
    pub(super) stop: usize,
    pub(super) nesting: usize,
}

/// Calls `each(key, value)` for every member of the object whose members start at `i`
/// (after its `{` when `braced`, else a bare `"k":v,…` list running to the end of `b`);
/// returns where the object ends. None when the bytes are not laid out so, or `each` says.
pub(super) fn scan_object<'b>(
    b: &'b [u8],
    i: usize,
    braced: bool,
    mut each: impl FnMut(Cow<'b, [u8]>, Span) -> Option<()>,
) -> Option<usize> {
    scan_members(b, i, braced, |q, span| each(key_of(q), span))
}

/// `scan_object`, each key handed over as its quoted bytes.
fn scan_members<'b>(
    b: &'b [u8],
    i: usize,
    braced: bool,
    mut each: impl FnMut(&'b [u8], Span) -> Option<()>,
) -> Option<usize> {
    let mut i = skip_ws(b, i);
    match b.get(i) {
        Some(b'}') if braced => return Some(i + 1),
        None if !braced => return Some(i),
        _ => {}
    }
    loop {
        if b.get(i) != Some(&b'"') {
            return None;
        }
        let end = string_end(b, i)?;
        let key = b.get(i..end)?;
        i = skip_ws(b, end);
        if b.get(i) != Some(&b':') {
            return None;
        }
        let start = skip_ws(b, i + 1);
        let (stop, nesting) = value_end(b, start)?;
        each(
            key,
            Span {
                start,
                stop,
                nesting,
            },
        )?;
        i = skip_ws(b, stop);
        match b.get(i) {
            Some(b',') => i = skip_ws(b, i + 1),
            Some(b'}') if braced => return Some(i + 1),
            None if !braced => return Some(i),
            _ => return None,
        }
    }
}

/// Calls `each(value)` for every element of the array whose elements start at `i` (after
/// its `[`); returns where it ends.
pub(super) fn scan_array(
    b: &[u8],
    i: usize,
    mut each: impl FnMut(Span) -> Option<()>,
) -> Option<usize> {
    let mut i = skip_ws(b, i);
    if b.get(i) == Some(&b']') {
        return Some(i + 1);
    }
    loop {
        let (stop, nesting) = value_end(b, i)?;
        each(Span {
            start: i,
            stop,
            nesting,
        })?;
        i = skip_ws(b, stop);
        match b.get(i) {
            Some(b',') => i = skip_ws(b, i + 1),
            Some(b']') => return Some(i + 1),
            _ => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_members_rules_read_are_all_they_see_of_the_event() {
        let plan = Plan::of(["a", "b", "x.y", "u.t", "r.k.v"]);
        let raw = br#"{"a":1,"b":{"c":[1,{"d":2}]},"a":"last","x.y":3,"u":{"t":"T","o":[1]},"deep":[[[[1]]]],"r":[{"k":{"v":1,"w":2}},"s",[{"k":[{"v":2}]}],{"q":1}]}"#;
        let v = plan
            .parse(raw, &[br#""geo":{"a":1},"b":null"#])
            .expect("object");
        assert_eq!(
            v,
            json!({
                "a": "last", "b": null, "x.y": 3, "u": {"t": "T"},
                "r": [{"k": {"v": 1}}, null, [{"k": [{"v": 2}]}], {}]
            }),
            "the last of a repeated key, an addition replacing a member, flat dotted keys, \
             arrays followed, what is not read left out"
        );
        // Laid out as people write it, strings holding brackets and quotes.
        let pretty =
            b"{\n  \"s\" : \"a}\\\"]\" ,\n\t\"a\": [ {\"x\": \"]}\"}, -1.5e3 ] ,\"n\":null\r\n}\n";
        assert_eq!(
            Plan::of(["a", "n"]).parse(pretty, &[]),
            Some(json!({"a":[{"x":"]}"},-1.5e3],"n":null}))
        );
        // Escaped keys are read as their text.
        assert_eq!(
            Plan::of(["a", "u.t"]).parse(br#"{"\u0061":1,"u":{"\u0074":2},"b":[2]}"#, &[]),
            Some(json!({"a":1,"u":{"t":2}}))
        );
        assert_eq!(Plan::of(["a"]).parse(b" {} ", &[]), Some(json!({})));
        assert!(Plan::of(["a"]).parse(b"[1]", &[]).is_none());
        assert!(Plan::of(["a"]).parse(br#"{"a":1} x"#, &[]).is_none());
        assert!(Plan::of(["a"]).parse(br#"{"a":1"#, &[]).is_none());
    }

    #[test]
    fn a_member_read_is_refused_exactly_where_the_whole_event_is() {
        let nest = |n: usize| format!("{}1{}", "[".repeat(n), "]".repeat(n));
        let event = |n: usize| format!(r#"{{"a":{},"b":{}}}"#, nest(n), nest(500));
        let whole =
            |n: usize| serde_json::from_str::<Value>(&format!(r#"{{"a":{}}}"#, nest(n))).is_ok();
        // Whole (`a`), or followed through its arrays (`a.b`): the same bound, however deep an
        // unread member is.
        for plan in [Plan::of(["a"]), Plan::of(["a.b"])] {
            for n in [1, 125, 126, 127, 128, 100_000] {
                let ev = event(n);
                let read = plan.parse(ev.as_bytes(), &[]).is_some();
                assert_eq!(read, whole(n), "{plan:?} {n}");
                // And from the split's list (which steps over any depth, as the split does).
                let head = crate::cloudtrail::listed_head_of(ev.as_bytes()).expect("listed");
                let list = head.members.as_ref().and_then(|m| m.of(ev.as_bytes()));
                let listed = plan.parse_listed(ev.as_bytes(), list.expect("list"), &[]);
                assert_eq!(listed.is_some(), whole(n), "listed {plan:?} {n}");
            }
        }
        assert!(whole(126) && !whole(127), "serde's bound");
    }

    #[test]
    fn an_alert_body_keeps_every_part_that_builds() {
        let deep = |n: usize| format!("{}1{}", "[".repeat(n), "]".repeat(n));
        let raw = format!(
            r#"{{"eventID":"e","requestParameters":{{"bucketName":"b","x":{}}},"deep":{},"x":[1]}}"#,
            deep(200),
            deep(200)
        );
        assert_eq!(
            readable(raw.as_bytes(), &[br#""geo":{"c":"GB"}"#]),
            Some(
                json!({"eventID":"e","requestParameters":{"bucketName":"b"},"x":[1],"geo":{"c":"GB"}})
            ),
            "a member beside one nested too deep kept, one all of whose parts fail left out"
        );
        // An array keeps the elements that build.
        let raw = format!(
            r#"{{"r":[{{"ARN":"a"}},{},2,{{"ARN":"\ud800"}}]}}"#,
            deep(200)
        );
        assert_eq!(
            readable(raw.as_bytes(), &[]),
            Some(json!({"r":[{"ARN":"a"},2]}))
        );
        // A repeated key: the later copy, or none; never the earlier one in its place.
        let raw = format!(
            r#"{{"a":1,"a":{},"b":1,"b":{{"c":2,"d":{}}}}}"#,
            deep(200),
            deep(200)
        );
        assert_eq!(readable(raw.as_bytes(), &[]), Some(json!({"b":{"c":2}})));
        // A lone surrogate, in a value or a key, is left out.
        assert_eq!(
            readable(br#"{"s":"\ud800","\udc00":1,"t":"\u0074"}"#, &[]),
            Some(json!({"t":"t"}))
        );
        assert!(readable(b"[]", &[]).is_none());
    }

    #[test]
    fn an_alert_body_is_no_deeper_than_serde_builds() {
        // Objects in objects, a scalar beside each: kept down to the deepest level serde
        // builds, so the body itself parses whole.
        let mut raw = String::new();
        for _ in 0..300 {
            raw.push_str(r#"{"v":0,"a":"#);
        }
        raw.push('1');
        raw.push_str(&"}".repeat(300));
        let body = readable(raw.as_bytes(), &[]).expect("object");
        let (mut nesting, mut at) = (1, &body);
        while let Some(inner) = at.get("a") {
            nesting += 1;
            at = inner;
        }
        assert_eq!(nesting, MAX_DEPTH);
        let text = serde_json::to_string(&body).expect("text");
        assert_eq!(serde_json::from_str::<Value>(&text).ok(), Some(body));
    }

    #[test]
    fn additions_are_scanned_for_keys_once() {
        let name = [Finder::new("eventName")];
        let addition_has = |add: &[u8], _: &[&str]| addition_has(add, &name);
        assert!(addition_has(
            br#""geo":{"eventName":1},"eventName":"x""#,
            &["eventName"]
        ));
        assert!(!addition_has(br#""geo":{"eventName":"x"}"#, &["eventName"]));
        assert!(addition_has(br#""event\u004eame":"x""#, &["eventName"]));
        assert!(
            addition_has(br#""geo":{"eventName""#, &["eventName"]),
            "not laid out: may be"
        );
        // Neither the name nor an escape in it: it cannot hold the key, laid out or not.
        assert!(!addition_has(br#""geo":{"a":1}"#, &["eventName"]));
        assert!(!addition_has(br#""geo":{"#, &["eventName"]));
        assert!(addition_has(
            br#""geo":{"a":"
"},"eventName":1"#,
            &["eventName"]
        ));
    }

    #[test]
    fn listed_members_read_as_the_scan_reads_them() {
        let events = [
            r#"{"a":1,"b":{"c":[1,{"d":2}]},"a":"last","x.y":3,"u":{"t":"T","o":[1]},"deep":[[[[1]]]],"r":[{"k":{"v":1,"w":2}},"s",[{"k":[{"v":2}]}],{"q":1}]}"#,
            "{\n  \"s\" : \"a}\\\"]\" ,\n\t\"a\": [ {\"x\": \"]}\"}, -1.5e3 ] ,\"n\":null\r\n}",
            r#"{"\u0061":1,"u":{"\u0074":2},"b":[2]}"#,
            "{}",
        ];
        let plan = Plan::of(["a", "b", "n", "x.y", "u.t", "r.k.v"]);
        let adds: &[&[u8]] = &[br#""geo":{"a":1},"b":null"#, br#""geo":{"x":1}"#];
        for ev in events {
            let head = crate::cloudtrail::listed_head_of(ev.as_bytes()).expect(ev);
            let list = head.members.as_ref().and_then(|m| m.of(ev.as_bytes()));
            let listed = plan.parse_listed(ev.as_bytes(), list.expect("listed"), adds);
            assert_eq!(listed, plan.parse(ev.as_bytes(), adds), "{ev}");
            assert!(listed.is_some(), "{ev}");
        }
        // A list not of these bytes is refused, not read at another place.
        let (one, other) = (r#"{"a":1}"#, r#"{"a":2}"#);
        let head = crate::cloudtrail::listed_head_of(one.as_bytes()).unwrap();
        let list = head.members.as_ref().unwrap().list.as_slice();
        assert!(plan.parse_listed(other.as_bytes(), list, &[]).is_none());
    }
}
