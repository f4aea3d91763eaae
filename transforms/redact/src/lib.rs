//! Masks the values at configured JSON paths, e.g. `requestParameters.password`. A path walks
//! objects by key and steps through arrays element by element, so
//! `requestParameters.items.secret` masks `secret` in every item. Events with nothing to mask
//! are kept untouched (no re-serialization).
//!
//! Config: `paths` (required, comma-separated dotted paths), `mask` (default `****`). Masked
//! values are counted as `redacted`.

use trailhose_transform::{Config, Event, Outcome, Transform, Value, count, export_transform};

struct Redact {
    paths: Vec<Vec<String>>,
    /// The first key of each path: events without any of them need no parse.
    roots: Vec<String>,
    mask: String,
}

impl Transform for Redact {
    fn init(config: &Config) -> Result<Self, String> {
        config.only(&["paths", "mask"])?;
        let paths: Vec<Vec<String>> = config
            .list("paths", &[])
            .iter()
            .map(|p| p.split('.').map(str::to_owned).collect())
            .collect();
        if paths.is_empty() {
            return Err("paths: list the dotted paths to mask, e.g. \
                        paths = \"requestParameters.password\""
                .to_owned());
        }
        if let Some(p) = paths.iter().find(|p| p.iter().any(String::is_empty)) {
            return Err(format!("paths: {:?} has an empty segment", p.join(".")));
        }
        let mut roots: Vec<String> = paths.iter().map(|p| p[0].clone()).collect();
        roots.dedup();
        Ok(Redact {
            paths,
            roots,
            mask: config.get("mask").unwrap_or("****").to_owned(),
        })
    }

    fn process(&mut self, event: &Event) -> Outcome {
        if !self.roots.iter().any(|r| event.has_key(r)) {
            return Outcome::Keep;
        }
        let mut value = match event.parse() {
            Ok(v) => v,
            Err(e) => return Outcome::Failed(e),
        };
        let masked: u64 = self
            .paths
            .iter()
            .map(|p| mask(&mut value, p, &self.mask))
            .sum();
        if masked == 0 {
            return Outcome::Keep;
        }
        count("redacted", masked);
        Outcome::replace(&value)
    }
}

fn mask(value: &mut Value, path: &[String], with: &str) -> u64 {
    match value {
        Value::Array(items) => items.iter_mut().map(|v| mask(v, path, with)).sum(),
        Value::Object(map) => {
            let Some((first, rest)) = path.split_first() else {
                return 0;
            };
            match map.get_mut(first) {
                Some(v) if rest.is_empty() => {
                    *v = Value::from(with);
                    1
                }
                Some(v) => mask(v, rest, with),
                None => 0,
            }
        }
        _ => 0,
    }
}

export_transform!(Redact);
