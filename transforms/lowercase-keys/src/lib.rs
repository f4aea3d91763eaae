//! Lowercases every object key, at every depth, so that Glue and Athena (case-insensitive
//! column names) see one spelling. When two keys of one object differ only in case, the later
//! one wins, as JSON readers do for duplicate keys; each such collision is counted
//! (`key_collisions`).

use trailhose_transform::{Config, Event, Outcome, Transform, Value, count, export_transform};

struct LowercaseKeys;

impl Transform for LowercaseKeys {
    fn init(config: &Config) -> Result<Self, String> {
        config.only(&[])?;
        Ok(LowercaseKeys)
    }

    fn process(&mut self, event: &Event) -> Outcome {
        let mut value = match event.parse() {
            Ok(v) => v,
            Err(e) => return Outcome::Failed(e),
        };
        let collisions = lowercase(&mut value);
        if collisions > 0 {
            count("key_collisions", collisions);
        }
        Outcome::replace(&value)
    }
}

fn lowercase(value: &mut Value) -> u64 {
    match value {
        Value::Object(map) => {
            let mut collisions = 0;
            let old = std::mem::take(map);
            for (k, mut v) in old {
                collisions += lowercase(&mut v);
                if map.insert(k.to_lowercase(), v).is_some() {
                    collisions += 1;
                }
            }
            collisions
        }
        Value::Array(items) => items.iter_mut().map(lowercase).sum(),
        _ => 0,
    }
}

export_transform!(LowercaseKeys);
