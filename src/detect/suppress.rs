//! `suppress_secs`: one alert per rule and key (e.g. the principal) per window, per output.
//! A suppressed match is counted, not sent. When the admitted alert then fails to deliver,
//! its admission is taken back, so that the notification's next delivery is not suppressed
//! by an alert that never arrived.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::Value;

/// Entries kept before expired ones are swept.
const SWEEP_AT: usize = 100_000;

pub struct Suppressor {
    window: Duration,
    admitted: Mutex<HashMap<u64, Instant>>,
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
        Suppressor {
            window,
            admitted: Mutex::new(HashMap::new()),
        }
    }

    /// Some when no alert with this key was admitted within the window.
    pub fn admit(&self, key: u64, now: Instant) -> Option<Ticket> {
        let mut m = self.admitted.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(at) = m.get(&key)
            && now.saturating_duration_since(*at) < self.window
        {
            return None;
        }
        if m.len() >= SWEEP_AT {
            let window = self.window;
            m.retain(|_, at| now.saturating_duration_since(*at) < window);
        }
        m.insert(key, now);
        Some(Ticket { key, at: now })
    }

    /// Takes an admission back (its alert was not delivered).
    pub fn forget(&self, t: Ticket) {
        let mut m = self.admitted.lock().unwrap_or_else(|p| p.into_inner());
        if m.get(&t.key) == Some(&t.at) {
            m.remove(&t.key);
        }
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
}
