//! Window arithmetic and state keys: pure functions, shared by both stores.
//!
//! Windows are tumbling and aligned to the Unix epoch: an event at `t` falls in
//! `[t - t mod span, t - t mod span + span)`. That is what atomic counters can keep (one
//! item per rule, group and window), and what the Sigma query backends produce
//! (`bin _time span=…` in Splunk). A burst across a boundary can be split between two windows.

use sha2::{Digest, Sha256};

/// One window: `[start, end)` in Unix seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub start: i64,
    pub end: i64,
}

/// The window of an event at `ts` for a timespan of `span` seconds (at least 1).
pub fn window(ts: i64, span: u64) -> Window {
    let span = i64::try_from(span.max(1)).unwrap_or(i64::MAX);
    let start = ts - ts.rem_euclid(span);
    Window {
        start,
        end: start.saturating_add(span),
    }
}

/// When a window's state may go (the TTL): `retention` after the window's end or after now
/// (its last update), whichever is later, so that a backfill of old events keeps its state.
/// A window in the future (an `eventTime` ahead of the clock, which CloudTrail does not write
/// but input may) counts as ending one span from now: no state outlives `retention` by more.
pub fn expires_at(w: Window, now: i64, retention: u64) -> i64 {
    let span = w.end.saturating_sub(w.start);
    w.end
        .min(now.saturating_add(span))
        .max(now)
        .saturating_add(i64::try_from(retention).unwrap_or(i64::MAX))
}

/// The longest member a state keeps as it is: eventIDs (36 characters), rule names and most
/// values fit. A longer one is kept as its hash, so that a member is at most
/// `MEMBER_MAX` bytes and a full set stays far below DynamoDB's 400 KB item limit.
pub const MEMBER_MAX: usize = 64;

/// Members a state may hold at most (a correlation's threshold must be below): 4,001 members
/// of at most 64 bytes are 256 KB, under DynamoDB's 400 KB item limit with the other attributes.
pub const MEMBERS_MAX: usize = 4_001;

/// A member as a state keeps it: itself when short, else `sha256:` and 32 hex digits (so is
/// any member that starts with `sha256:`, so that no value can pose as another's hash).
pub fn member(value: &str) -> String {
    const HASHED: &str = "sha256:";
    if !value.is_empty() && value.len() <= MEMBER_MAX && !value.starts_with(HASHED) {
        return value.to_owned();
    }
    let d = Sha256::digest(value.as_bytes());
    let hex: String = d.iter().take(16).map(|b| format!("{b:02x}")).collect();
    format!("{HASHED}{hex}")
}

/// The most bytes of the group kept beside a state, for people reading the table (the key
/// is a hash of the whole group): a group-by value is input and may be as long as an event.
pub const GROUP_TEXT_MAX: usize = 1_024;

/// `s` cut to at most `max` bytes on a character boundary.
pub fn clip(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.get(..end).unwrap_or_default()
}

/// The group-by values as one JSON array (`null` for an absent field): stored beside the
/// state for people, and hashed into its key.
pub fn group_json(values: &[Option<String>]) -> String {
    serde_json::to_string(values).unwrap_or_default()
}

/// The state's key: a hash of the correlation, the window and the group, so that any value
/// (long, or containing separators) gives a fixed-size, unambiguous key.
pub fn state_key(correlation: &str, w: Window, group: &str) -> String {
    let mut h = Sha256::new();
    for part in [
        correlation.as_bytes(),
        &w.start.to_be_bytes(),
        group.as_bytes(),
    ] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// The distinct value a `value_count` counts: the field's value, or the values of several
/// fields as one tuple. None when a field is absent (the event does not count, as in
/// rsigma-eval).
pub fn counted_value(values: &[Option<String>]) -> Option<String> {
    let present: Option<Vec<&str>> = values.iter().map(|v| v.as_deref()).collect();
    let present = present?;
    if let [one] = present.as_slice() {
        return Some((*one).to_owned());
    }
    Some(serde_json::to_string(&present).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_are_tumbling_and_aligned_to_the_epoch() {
        // 2024-03-18T14:05:00Z with a 10-minute span: 14:00–14:10.
        let t = 1_710_770_700;
        assert_eq!(
            window(t, 600),
            Window {
                start: 1_710_770_400,
                end: 1_710_771_000
            }
        );
        assert_eq!(
            window(1_710_770_400, 600).start,
            1_710_770_400,
            "start is in"
        );
        assert_eq!(window(1_710_770_999, 600).start, 1_710_770_400);
        assert_eq!(
            window(1_710_771_000, 600).start,
            1_710_771_000,
            "end is out"
        );
        assert_eq!(
            window(-1, 600),
            Window {
                start: -600,
                end: 0
            }
        );
        assert_eq!(
            window(7, 0),
            Window { start: 7, end: 8 },
            "a zero span is 1 s"
        );
        assert_eq!(window(i64::MAX, 600).end, i64::MAX, "no overflow");
    }

    #[test]
    fn state_lives_for_retention_after_the_window_or_the_last_update() {
        let w = window(1_000, 100);
        assert_eq!(expires_at(w, 1_050, 60), 1_160);
        assert_eq!(
            expires_at(w, 5_000, 60),
            5_060,
            "a backfill keeps its state"
        );
        // An eventTime in the year 9999 does not keep its state for millennia.
        let far = window(253_402_300_000, 100);
        assert_eq!(expires_at(far, 1_050, 60), 1_050 + 100 + 60);
        assert_eq!(expires_at(window(i64::MAX, 100), i64::MAX, 60), i64::MAX);
    }

    #[test]
    fn members_are_bounded_and_no_value_poses_as_a_hash() {
        let id = "3f2c1c57-0d7e-4c5b-9b63-5a3a0f1e2d11";
        assert_eq!(member(id), id);
        let long = "é".repeat(10_000);
        let h = member(&long);
        assert!(h.starts_with("sha256:") && h.len() == 39, "{h}");
        assert_eq!(h, member(&long), "stable");
        assert_ne!(h, member(&"é".repeat(10_001)));
        assert_eq!(member(&h).len(), 39);
        assert_ne!(member(&h), h, "a value that looks hashed is hashed again");
        assert!(
            member("").starts_with("sha256:"),
            "sets hold no empty string"
        );
        const { assert!(MEMBERS_MAX * (MEMBER_MAX + 1) + GROUP_TEXT_MAX < 350_000) };
        assert_eq!(clip("aé", 2), "a");
        assert_eq!(clip("abc", 10), "abc");
    }

    #[test]
    fn group_keys_are_fixed_size_and_unambiguous() {
        let w = window(1_000, 100);
        let k = |c: &str, g: &[Option<&str>]| {
            let g: Vec<Option<String>> = g.iter().map(|v| v.map(str::to_owned)).collect();
            state_key(c, w, &group_json(&g))
        };
        let a = k("r", &[Some("alice")]);
        assert_eq!(a.len(), 64);
        assert_eq!(a, k("r", &[Some("alice")]), "stable");
        assert_ne!(a, k("r", &[Some("bob")]));
        assert_ne!(a, k("r2", &[Some("alice")]));
        assert_ne!(k("r", &[Some("a"), Some("b")]), k("r", &[Some("a,b")]));
        assert_ne!(
            k("r", &[None]),
            k("r", &[Some("null")]),
            "absent is not \"null\""
        );
        assert_ne!(
            a,
            state_key("r", window(1_100, 100), "[\"alice\"]"),
            "window"
        );
        let long = "x".repeat(5_000);
        assert_eq!(k("r", &[Some(&long)]).len(), 64);
    }

    #[test]
    fn counted_values_are_single_or_tuples() {
        assert_eq!(counted_value(&[Some("a".into())]), Some("a".into()));
        assert_eq!(
            counted_value(&[Some("a".into()), Some("b".into())]),
            Some("[\"a\",\"b\"]".into())
        );
        assert_eq!(counted_value(&[Some("a".into()), None]), None);
    }
}
