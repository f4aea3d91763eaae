//! Members an enrichment owns. `geo` and each lookup's field are trailhose's to write: when an
//! event already holds a top-level member of that name (an event re-read from trailhose's own
//! output, or written by another enricher or a producer), the enrichment replaces it. The old
//! member is removed and counted, and the fresh one, if any, is spliced in. Leaving the old member
//! would write the key twice, which Athena's JSON reader and other strict readers refuse; keeping
//! it instead of the fresh value would let stale (or forged) `account.env` or `geo` values pass
//! as the current table's answer.
//!
//! The splitter flags events with a top-level member that is not a CloudTrail field
//! (`Head::other_members`); only those are parsed again here, so CloudTrail's own events cost
//! nothing.

use std::fmt;

use serde::de::{self, Deserializer as _, MapAccess, Visitor};
use serde_json::value::RawValue;

/// Writes `raw` (a JSON object) without its top-level members whose (decoded) name `owned`
/// accepts, into `out`; the other members' bytes are copied as they are. Returns the names
/// removed, or None (and writes nothing) when there are none.
pub fn without_owned(
    raw: &[u8],
    owned: impl Fn(&str) -> bool,
    out: &mut Vec<u8>,
) -> Option<Vec<String>> {
    let members = member_ends(raw, &owned)?;
    if members.iter().all(|(name, _)| name.is_none()) {
        return None;
    }
    out.clear();
    out.push(b'{');
    // After the opening brace (the splitter hands on objects with no surrounding whitespace).
    let mut prev = raw.iter().position(|&b| b == b'{')? + 1;
    let mut removed = Vec::new();
    let mut first = true;
    for (name, end) in members {
        // A member's bytes run from the previous value's end to its own: whitespace, the comma
        // before it, its key, the colon and its value.
        let text = raw.get(prev..end)?;
        prev = end;
        match name {
            Some(n) => removed.push(n),
            None => {
                let start = text
                    .iter()
                    .position(|b| !matches!(b, b' ' | b'\n' | b'\r' | b'\t' | b','))?;
                if !first {
                    out.push(b',');
                }
                out.extend_from_slice(text.get(start..)?);
                first = false;
            }
        }
    }
    out.push(b'}');
    Some(removed)
}

/// Each top-level member's value end (a byte offset into `raw`), with its name when `owned`
/// accepts it. None when `raw` is not a JSON object.
fn member_ends(raw: &[u8], owned: &dyn Fn(&str) -> bool) -> Option<Vec<(Option<String>, usize)>> {
    let mut de = serde_json::Deserializer::from_slice(raw);
    let ends = (&mut de)
        .deserialize_map(Ends {
            base: raw.as_ptr() as usize,
            len: raw.len(),
            owned,
        })
        .ok()?;
    de.end().ok()?;
    Some(ends)
}

struct Ends<'o> {
    base: usize,
    len: usize,
    owned: &'o dyn Fn(&str) -> bool,
}

impl<'de> Visitor<'de> for Ends<'_> {
    type Value = Vec<(Option<String>, usize)>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut ends = Vec::new();
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            let value: &'de RawValue = map.next_value()?;
            let text = value.get();
            // The raw value borrows from `raw`: its end is an offset into it.
            let end = (text.as_ptr() as usize)
                .checked_sub(self.base)
                .and_then(|at| at.checked_add(text.len()))
                .filter(|&end| end <= self.len)
                .ok_or_else(|| de::Error::custom("a value outside the event"))?;
            let name = (self.owned)(&key).then(|| key.into_owned());
            ends.push((name, end));
        }
        Ok(ends)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strip(raw: &str, names: &[&str]) -> Option<(String, Vec<String>)> {
        let mut out = Vec::new();
        let removed = without_owned(raw.as_bytes(), |k| names.contains(&k), &mut out)?;
        Some((String::from_utf8(out).unwrap(), removed))
    }

    #[test]
    fn owned_members_are_removed_anywhere_and_the_rest_kept_byte_for_byte() {
        let (out, removed) = strip(
            r#"{"geo":{"a":1}, "eventID" : "x","account":"forged",  "n":[1, 2]}"#,
            &["geo", "account"],
        )
        .unwrap();
        assert_eq!(out, r#"{"eventID" : "x","n":[1, 2]}"#);
        assert_eq!(removed, ["geo", "account"]);
        // Last, twice, escaped, and every member.
        let (out, removed) = strip("{\"a\":1,\n \"geo\":2,\"ge\\u006f\":3}", &["geo"]).unwrap();
        assert_eq!(out, r#"{"a":1}"#);
        assert_eq!(removed, ["geo", "geo"]);
        assert_eq!(strip(r#"{"geo":1}"#, &["geo"]).unwrap().0, "{}");
        // Nested members of that name are the event's own.
        assert_eq!(strip(r#"{"x":{"geo":1}}"#, &["geo"]), None);
        assert_eq!(strip("{}", &["geo"]), None);
        assert_eq!(strip("[1]", &["geo"]), None);
    }
}
