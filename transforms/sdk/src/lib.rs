//! The guest side of a trailhose transform module, without the bindings.
//!
//! A module is a type that implements [`Transform`]: `init` reads the module's config table
//! once per instance, `process` turns one event into an [`Outcome`]. [`export_transform!`]
//! wires it to the `trailhose:transform` world (see `wit/README.md`):
//!
//! ```ignore
//! use trailhose_transform::{Config, Event, Outcome, Transform, export_transform};
//!
//! struct Tag;
//!
//! impl Transform for Tag {
//!     fn init(_config: &Config) -> Result<Self, String> {
//!         Ok(Tag)
//!     }
//!     fn process(&mut self, event: &Event) -> Outcome {
//!         Outcome::annotate([("xteam", "security")])
//!     }
//! }
//!
//! export_transform!(Tag);
//! ```
//!
//! Build it with `cargo build --release --target wasm32-wasip2`: the `.wasm` file is the
//! component the pipeline loads. The SDK builds against `trailhose:transform@0.2.0`, which adds
//! [`lookup`] (enrichment tables) to 0.1.0; a module built with it needs a trailhose that
//! offers 0.2.0, and modules built against 0.1.0 keep working.

use std::any::Any;
use std::cell::RefCell;
use std::collections::BTreeMap;

#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../../wit",
        world: "transform",
        pub_export_macro: true,
        export_macro_name: "export_world",
        default_bindings_module: "trailhose_transform::bindings",
    });
}

use bindings::trailhose::transform::host;
pub use bindings::{Event, Fields, Member, Outcome};
pub use serde_json::{self, Value};

/// A transform module.
pub trait Transform: Sized + 'static {
    /// Reads the module's config table; an error refuses it and stops the pipeline's start-up.
    fn init(config: &Config) -> Result<Self, String>;

    /// The outcome for one event.
    fn process(&mut self, event: &Event) -> Outcome;
}

/// The module's `config` table from the pipeline config.
#[derive(Debug, Default, Clone)]
pub struct Config(BTreeMap<String, String>);

impl Config {
    pub fn new(pairs: impl IntoIterator<Item = (String, String)>) -> Config {
        Config(pairs.into_iter().collect())
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    /// A comma-separated list, trimmed, empty items removed; `default` when the key is absent.
    pub fn list(&self, key: &str, default: &[&str]) -> Vec<String> {
        match self.get(key) {
            Some(v) => v
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect(),
            None => default.iter().map(|s| (*s).to_owned()).collect(),
        }
    }

    /// `true`/`false`, `default` when absent.
    pub fn flag(&self, key: &str, default: bool) -> Result<bool, String> {
        match self.get(key) {
            None => Ok(default),
            Some("true") => Ok(true),
            Some("false") => Ok(false),
            Some(other) => Err(format!("{key}: expected true or false, got {other:?}")),
        }
    }

    /// Refuses keys the module does not know, so that a typo is not silently ignored.
    pub fn only(&self, known: &[&str]) -> Result<(), String> {
        match self.0.keys().find(|k| !known.contains(&k.as_str())) {
            Some(k) => Err(format!(
                "unknown config key {k:?} (known: {})",
                known.join(", ")
            )),
            None => Ok(()),
        }
    }
}

impl Event {
    /// The event as text (the host only sends UTF-8 JSON objects).
    pub fn text(&self) -> &str {
        std::str::from_utf8(&self.json).unwrap_or("")
    }

    /// The event parsed, key order kept.
    pub fn parse(&self) -> Result<Value, String> {
        serde_json::from_slice(&self.json).map_err(|e| format!("event is not JSON: {e}"))
    }

    /// True when `"key":` occurs in the event's bytes. A quoted key cannot appear inside a
    /// JSON string unescaped, so this finds members at any depth without a parse.
    pub fn has_key(&self, key: &str) -> bool {
        let needle = format!("\"{key}\"");
        self.json
            .windows(needle.len())
            .any(|w| w == needle.as_bytes())
    }
}

impl Outcome {
    /// Keep the event with these string members added at the top level.
    pub fn annotate<'a>(members: impl IntoIterator<Item = (&'a str, &'a str)>) -> Outcome {
        Outcome::Annotate(
            members
                .into_iter()
                .map(|(k, v)| Member {
                    key: k.to_owned(),
                    value: Value::from(v).to_string(),
                })
                .collect(),
        )
    }

    /// Keep the event rewritten as `value`.
    pub fn replace(value: &Value) -> Outcome {
        match serde_json::to_vec(value) {
            Ok(bytes) => Outcome::Replace(bytes),
            Err(e) => Outcome::Failed(format!("cannot serialize the event: {e}")),
        }
    }
}

/// A member whose value is any JSON value.
pub fn member(key: &str, value: &Value) -> Member {
    Member {
        key: key.to_owned(),
        value: value.to_string(),
    }
}

pub fn debug(message: &str) {
    host::log(host::Level::Debug, message);
}

pub fn info(message: &str) {
    host::log(host::Level::Info, message);
}

pub fn warn(message: &str) {
    host::log(host::Level::Warn, message);
}

pub fn error(message: &str) {
    host::log(host::Level::Error, message);
}

/// Adds `delta` to this module's counter `name` (a Prometheus metric on the host).
pub fn count(name: &str, delta: u64) {
    host::count(name, delta);
}

/// A row of an enrichment table: its non-empty cells as (column, value), in column order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Row(pub Vec<(String, String)>);

impl Row {
    /// The value of `column`, if the row has one.
    pub fn get(&self, column: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(c, _)| c == column)
            .map(|(_, v)| v.as_str())
    }
}

/// Looks `key` up in the enrichment table `table`, as the built-in lookups do (exact,
/// case-insensitive or longest-prefix match, by the table's `match`). None when the key is not
/// in the table. The table must be listed in the module's `tables` (in its `[[transforms]]`
/// entry, or `--table` for `trailhose transform test`): any other name traps. The host's tables
/// are those of the current input file (a reload applies from the next file); in `init`
/// every lookup returns None.
pub fn lookup(table: &str, key: &str) -> Option<Row> {
    host::lookup(table, key).map(Row)
}

thread_local! {
    static STATE: RefCell<Option<Box<dyn Any>>> = const { RefCell::new(None) };
}

#[doc(hidden)]
pub fn __init<T: Transform>(config: Vec<(String, String)>) -> Result<(), String> {
    let module = T::init(&Config::new(config))?;
    STATE.with(|s| *s.borrow_mut() = Some(Box::new(module)));
    Ok(())
}

#[doc(hidden)]
pub fn __process<T: Transform>(events: Vec<Event>) -> Vec<Outcome> {
    STATE.with(|s| {
        let mut state = s.borrow_mut();
        match state.as_mut().and_then(|m| m.downcast_mut::<T>()) {
            Some(module) => events.iter().map(|e| module.process(e)).collect(),
            None => events
                .iter()
                .map(|_| Outcome::Failed("the module was not initialized".to_owned()))
                .collect(),
        }
    })
}

/// Exports a [`Transform`] type as the module's `init` and `process`.
#[macro_export]
macro_rules! export_transform {
    ($t:ty) => {
        struct TrailhoseGuest;

        impl $crate::bindings::Guest for TrailhoseGuest {
            fn init(
                config: ::std::vec::Vec<(::std::string::String, ::std::string::String)>,
            ) -> ::std::result::Result<(), ::std::string::String> {
                $crate::__init::<$t>(config)
            }

            fn process(
                events: ::std::vec::Vec<$crate::Event>,
            ) -> ::std::vec::Vec<$crate::Outcome> {
                $crate::__process::<$t>(events)
            }
        }

        $crate::bindings::export_world!(TrailhoseGuest with_types_in $crate::bindings);
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_lists_flags_and_unknown_keys() {
        let c = Config::new([
            ("a".to_owned(), " US, ,DE ".to_owned()),
            ("f".to_owned(), "yes".to_owned()),
        ]);
        assert_eq!(c.list("a", &[]), ["US", "DE"]);
        assert_eq!(c.list("b", &["x"]), ["x"]);
        assert!(c.flag("f", false).is_err());
        assert_eq!(c.flag("g", true), Ok(true));
        assert!(c.only(&["a"]).unwrap_err().contains("\"f\""));
        assert!(c.only(&["a", "f"]).is_ok());
    }
}
