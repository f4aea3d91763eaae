//! The event as rsigma-eval reads it, for the rules: `JsonEvent`'s reading of a field path,
//! without turning the path into a list of steps on every read. The paths rules name are
//! plain dotted keys; anything else is read by `JsonEvent` itself.

use std::borrow::Cow;

use rsigma_eval::{Event, EventValue, JsonEvent};
use serde_json::Value;

pub struct View<'a> {
    value: &'a Value,
    json: JsonEvent<'a>,
}

impl<'a> View<'a> {
    pub fn new(value: &'a Value) -> View<'a> {
        View {
            value,
            json: JsonEvent::borrow(value),
        }
    }
}

/// The values a path reaches: none, one, or several (through arrays).
pub(super) enum Found<'a> {
    None,
    One(EventValue<'a>),
    Many(Vec<EventValue<'a>>),
}

impl<'a> Found<'a> {
    /// What a read gives: nothing, the one value, or the values through arrays as one.
    pub(super) fn value(self) -> Option<EventValue<'a>> {
        match self {
            Found::None => None,
            Found::One(v) => Some(v),
            Found::Many(all) => Some(EventValue::Array(all)),
        }
    }

    pub(super) fn push(&mut self, v: EventValue<'a>) {
        *self = match std::mem::replace(self, Found::None) {
            Found::None => Found::One(v),
            Found::One(first) => Found::Many(vec![first, v]),
            Found::Many(mut all) => {
                all.push(v);
                Found::Many(all)
            }
        };
    }
}

/// Follows the keys `segs` from `v`, each key applied to every element of an array on the way
/// (`JsonEvent`'s `collect_by_ops` with only key steps).
pub(super) fn follow<'a, 's>(
    v: &'a Value,
    mut segs: impl Iterator<Item = &'s str> + Clone,
    out: &mut Found<'a>,
) {
    let rest = segs.clone();
    let Some(key) = segs.next() else {
        out.push(EventValue::from(v));
        return;
    };
    match v {
        Value::Object(map) => {
            if let Some(next) = map.get(key) {
                follow(next, segs, out);
            }
        }
        Value::Array(items) => {
            for item in items {
                follow(item, rest.clone(), out);
            }
        }
        _ => {}
    }
}

impl Event for View<'_> {
    fn get_field(&self, path: &str) -> Option<EventValue<'_>> {
        let Value::Object(obj) = self.value else {
            return self.json.get_field(path);
        };
        // The flat key first, as the engine reads it.
        if let Some(v) = obj.get(path) {
            return Some(EventValue::from(v));
        }
        if !path.contains('.') || path.contains(['[', '\\']) {
            return self.json.get_field(path);
        }
        let mut found = Found::None;
        follow(self.value, path.split('.'), &mut found);
        found.value()
    }

    fn any_string_value(&self, pred: &dyn Fn(&str) -> bool) -> bool {
        self.json.any_string_value(pred)
    }

    fn all_string_values(&self) -> Vec<Cow<'_, str>> {
        self.json.all_string_values()
    }

    fn visit_string_values(&self, visit: &mut dyn FnMut(&str)) {
        self.json.visit_string_values(visit)
    }

    fn to_json(&self) -> Value {
        self.json.to_json()
    }

    fn field_keys(&self) -> Vec<Cow<'_, str>> {
        self.json.field_keys()
    }

    fn top_level_keys(&self) -> Option<Vec<Cow<'_, str>>> {
        self.json.top_level_keys()
    }

    fn visit_top_level_keys(&self, visit: &mut dyn FnMut(&str)) -> bool {
        self.json.visit_top_level_keys(visit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Every path read as `JsonEvent` reads it.
    #[test]
    fn paths_are_read_as_the_engine_reads_them() {
        let events = [
            json!({"a": {"b": [{"c": 1}, {"c": [2, 3]}, {"d": 4}, [{"c": 5}]], "x.y": 6},
                   "a.b": "flat", "n": null, "s": "t", "e": {"": {"f": 7}}, "": {"g": 8}}),
            json!({"r": [{"ARN": "a"}, {"ARN": "b"}], "one": [{"k": "v"}], "z": [[1], 2]}),
            json!([1, {"a": 2}]),
            json!("text"),
        ];
        let paths = [
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
            "one.k",
            "z",
            "z.x",
            "missing",
            "missing.x",
            "a.b[0].c",
            "a\\.b",
            "a.b.c.d",
            "",
        ];
        for ev in &events {
            let (view, json) = (View::new(ev), JsonEvent::borrow(ev));
            for p in paths {
                assert_eq!(view.get_field(p), json.get_field(p), "{p} in {ev}");
            }
            assert_eq!(view.to_json(), json.to_json());
        }
    }
}
