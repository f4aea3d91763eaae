//! `suppress_secs`: one alert per rule and key (e.g. the principal) per window, per output.
//! A suppressed match is counted, not sent. When the admitted alert then fails to deliver,
//! its admission is taken back, so that the notification's next delivery is not suppressed
//! by an alert that never arrived.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::Value;

/// The first sweep of expired entries; later ones wait until the table has doubled.
const SWEEP_MIN: usize = 1024;
/// Keys tracked per output at most (about 40 bytes each): beyond it, with every key still in
/// its window, a new key is alerted on without being tracked (more alerts, never fewer).
const MAX_KEYS: usize = 250_000;

pub struct Suppressor {
    window: Duration,
    cap: usize,
    table: Mutex<Table>,
}

struct Table {
    admitted: HashMap<u64, Instant>,
    /// Sweep when the table reaches this size, and not before `next_sweep`.
    sweep_at: usize,
    next_sweep: Option<Instant>,
}

/// An admission, to take back if its alert is not delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    key: u64,
    at: Instant,
}

/// The suppression key of a match: the rule and the values of `fields` in the event.
pub fn key(rule: &str, fields: &[String], event: &Value) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    rule.hash(&mut h);
    for f in fields {
        let mut v = Some(event);
        for part in f.split('.') {
            v = v.and_then(|x| x.get(part));
        }
        match v {
            Some(Value::String(s)) => s.hash(&mut h),
            Some(other) => other.to_string().hash(&mut h),
            None => 0u8.hash(&mut h),
        }
        0xffu8.hash(&mut h);
    }
    h.finish()
}

impl Suppressor {
    pub fn new(window: Duration) -> Suppressor {
        Suppressor::with_cap(window, MAX_KEYS)
    }

    fn with_cap(window: Duration, cap: usize) -> Suppressor {
        Suppressor {
            window,
            cap,
            table: Mutex::new(Table {
                admitted: HashMap::new(),
                sweep_at: SWEEP_MIN.min(cap),
                next_sweep: None,
            }),
        }
    }

    /// Some when no alert with this key was admitted within the window.
    pub fn admit(&self, key: u64, now: Instant) -> Option<Ticket> {
        let mut guard = self.table.lock().unwrap_or_else(|p| p.into_inner());
        let t = &mut *guard;
        if let Some(at) = t.admitted.get(&key)
            && now.saturating_duration_since(*at) < self.window
        {
            return None;
        }
        if t.admitted.len() >= t.sweep_at && t.next_sweep.is_none_or(|n| now >= n) {
            let window = self.window;
            let mut oldest = now;
            t.admitted.retain(|_, at| {
                let live = now.saturating_duration_since(*at) < window;
                if live {
                    oldest = oldest.min(*at);
                }
                live
            });
            // Amortised: the next sweep waits until the live entries have doubled and the
            // oldest can have expired (at most one a second), so a table of live keys is not
            // walked on every admission.
            t.sweep_at = (t.admitted.len() * 2).clamp(SWEEP_MIN.min(self.cap), self.cap);
            t.next_sweep = Some((oldest + window).max(now + Duration::from_secs(1)));
        }
        if t.admitted.len() >= self.cap && !t.admitted.contains_key(&key) {
            // Full of keys still in their window: alert, untracked (forget finds nothing).
            return Some(Ticket { key, at: now });
        }
        t.admitted.insert(key, now);
        Some(Ticket { key, at: now })
    }

    /// Takes an admission back (its alert was not delivered).
    pub fn forget(&self, ticket: Ticket) {
        let mut t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        if t.admitted.get(&ticket.key) == Some(&ticket.at) {
            t.admitted.remove(&ticket.key);
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.table
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .admitted
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_alert_per_rule_and_key_per_window_and_a_failed_one_is_taken_back() {
        let s = Suppressor::new(Duration::from_secs(60));
        let fields = vec!["userIdentity.arn".to_owned()];
        let alice = serde_json::json!({"userIdentity": {"arn": "alice"}});
        let bob = serde_json::json!({"userIdentity": {"arn": "bob"}});
        let t0 = Instant::now();
        let a = s.admit(key("r", &fields, &alice), t0).expect("first");
        assert!(
            s.admit(key("r", &fields, &alice), t0 + Duration::from_secs(59))
                .is_none()
        );
        assert!(
            s.admit(key("r", &fields, &bob), t0).is_some(),
            "another key"
        );
        assert!(
            s.admit(key("other", &fields, &alice), t0).is_some(),
            "another rule"
        );
        assert!(
            s.admit(key("r", &fields, &alice), t0 + Duration::from_secs(60))
                .is_some()
        );
        let s = Suppressor::new(Duration::from_secs(60));
        let t = s.admit(key("r", &fields, &alice), t0).expect("first");
        s.forget(t);
        assert!(
            s.admit(key("r", &fields, &alice), t0).is_some(),
            "taken back"
        );
        let _ = a;
    }

    #[test]
    fn the_table_stays_bounded_when_every_key_is_fresh() {
        let s = Suppressor::with_cap(Duration::from_secs(60), 2048);
        let t0 = Instant::now();
        for k in 0..10_000u64 {
            assert!(s.admit(k, t0).is_some(), "a new key alerts");
            assert!(s.len() <= 2048, "{} keys tracked", s.len());
        }
        assert!(
            s.admit(5, t0).is_none(),
            "a tracked key is still suppressed"
        );
        // A window later every entry has expired: the next sweep empties the table.
        let later = t0 + Duration::from_secs(61);
        assert!(s.admit(20_000, later).is_some());
        assert_eq!(s.len(), 1);
        assert!(s.admit(20_000, later).is_none());
    }
}
