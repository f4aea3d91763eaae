//! The transform stage: teams' WASM components (the `trailhose:transform` world in `wit/`) run
//! in order over batches of events, between enrichment and the sink.
//!
//! [`Transforms`] is shared: the engine, each module compiled once (and cached on disk), and
//! hot reload. Each worker thread owns a [`Chain`]: one instance per module, built from the
//! module's pre-linked form and rebuilt after any failure or reload. A failed call sends that
//! batch's events to the error output with the module's name and the reason; the worker goes on.
//!
//! The WASM engine is the `transforms` cargo feature (on by default). Without it
//! (`absent.rs`) no module can be configured: start-up refuses any, naming it.

// Built in test builds with the engine too, so the default test run checks the refusal.
#[cfg(any(not(feature = "transforms"), test))]
#[cfg_attr(feature = "transforms", allow(dead_code))]
mod absent;
pub mod batch;
#[cfg(feature = "transforms")]
pub mod cache;
#[cfg(feature = "transforms")]
pub mod host;
pub mod trial;
#[cfg(feature = "transforms")]
mod wasm;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[cfg(not(feature = "transforms"))]
pub use absent::{Chain, Transforms};
pub use batch::{Batch, Counts, Reject, View};
#[cfg(feature = "transforms")]
pub use wasm::{Chain, Transforms};

use crate::watch::S3Settings;

/// Per-call limits of one module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Fuel (roughly, wasm instructions) per batch; 0 = not metered.
    pub fuel: u64,
    /// Wall time per batch.
    pub timeout: Duration,
    pub max_memory_bytes: usize,
    /// Bytes a batch's outcomes may carry in all.
    pub max_output_bytes: usize,
}

/// What happens to the events of a module call that failed (a trap, a limit, malformed output,
/// or a `failed` outcome).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OnFailure {
    /// Each event goes to the error output whole, with the module, reason and detail.
    #[default]
    ErrorOutput,
    /// Nothing is written: the file is not acknowledged, so it is delivered and read again.
    Retry,
    /// The error record keeps the source, eventID, module and reason, but neither the event
    /// nor anything the module said (its panic message or `failed` text may quote the event).
    DropBody,
}

impl OnFailure {
    pub fn as_str(self) -> &'static str {
        match self {
            OnFailure::ErrorOutput => "error_output",
            OnFailure::Retry => "retry",
            OnFailure::DropBody => "drop_body",
        }
    }
}

/// One configured module.
#[derive(Debug, Clone)]
pub struct ModuleSpec {
    pub name: String,
    /// A local path or `s3://bucket/key`.
    pub path: PathBuf,
    /// For an `s3://` path: the S3 client's region, endpoint and addressing.
    pub region: Option<String>,
    pub endpoint_url: Option<String>,
    pub force_path_style: bool,
    pub config: Vec<(String, String)>,
    /// The `[[enrich.tables]]` the module may read through `lookup`.
    pub tables: Vec<String>,
    pub limits: Limits,
    pub on_failure: OnFailure,
    /// With `on_failure = Retry`: failed deliveries of one batch before `retry_fallback`.
    pub max_attempts: u32,
    /// With `on_failure = Retry`: the policy once `max_attempts` are used up.
    pub retry_fallback: OnFailure,
}

#[cfg_attr(not(feature = "transforms"), allow(dead_code))]
impl ModuleSpec {
    fn s3(&self) -> S3Settings<'_> {
        S3Settings {
            region: self.region.as_deref(),
            endpoint_url: self.endpoint_url.as_deref(),
            force_path_style: self.force_path_style,
        }
    }

    /// Whether the module's own log lines and counters are held until a call is known to
    /// have succeeded on every event: under `drop_body` they may quote the event.
    fn holds_output(&self) -> bool {
        self.on_failure == OnFailure::DropBody
            || (self.on_failure == OnFailure::Retry && self.retry_fallback == OnFailure::DropBody)
    }
}

/// A larger module file or object is refused (the largest example, a JavaScript module with
/// its engine, is 12 MB).
pub const MAX_MODULE_BYTES: u64 = 256 << 20;

/// Why a build without the `transforms` feature refuses a module (config, start-up, CLI).
pub const NOT_BUILT: &str = "this trailhose was built without WASM transforms (the `transforms` feature); build it with the default features";

#[derive(Debug, thiserror::Error)]
pub enum TransformError {
    #[error("transform {module:?}: cannot read {path}: {detail}")]
    Read {
        module: String,
        path: String,
        detail: String,
    },
    #[error("transform {module:?}: {path} is not a usable trailhose:transform component: {detail}")]
    Compile {
        module: String,
        path: String,
        detail: String,
    },
    #[error("transform {module:?}: {detail}")]
    Init { module: String, detail: String },
    #[error("cannot start the WASM engine: {0}")]
    Engine(String),
    #[error("transform {module:?}: {NOT_BUILT}")]
    NotBuilt { module: String },
}

/// Why a call into a module failed: the label of `trailhose_transform_failures_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailReason {
    FuelExhausted,
    Timeout,
    MemoryLimit,
    Panic,
    Trap,
    MalformedOutput,
    OutputTooLarge,
    InitFailed,
}

impl FailReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FailReason::FuelExhausted => "fuel_exhausted",
            FailReason::Timeout => "timeout",
            FailReason::MemoryLimit => "memory_limit",
            FailReason::Panic => "panic",
            FailReason::Trap => "trap",
            FailReason::MalformedOutput => "malformed_output",
            FailReason::OutputTooLarge => "output_too_large",
            FailReason::InitFailed => "init_failed",
        }
    }
}

#[derive(Debug, Clone)]
pub struct CallError {
    pub reason: FailReason,
    pub detail: String,
}

/// What one module call did.
#[derive(Debug)]
pub struct StageReport {
    pub module: Arc<str>,
    pub counts: Counts,
    pub elapsed: Duration,
    pub fuel: u64,
    pub failure: Option<CallError>,
}
