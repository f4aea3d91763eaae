//! The transform stage in a build without the `transforms` feature (no WASM engine): there
//! is never a module to run, and start-up refuses any that is configured.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::{Batch, ModuleSpec, Reject, StageReport, TransformError};
use crate::enrich::tables::stage::Lookups;

/// No modules: every configured one was refused at start-up.
pub struct Transforms;

fn refuse(specs: &[ModuleSpec]) -> Result<Arc<Transforms>, TransformError> {
    match specs.first() {
        Some(spec) => Err(TransformError::NotBuilt {
            module: spec.name.clone(),
        }),
        None => Ok(Arc::new(Transforms)),
    }
}

impl Transforms {
    pub fn open(
        specs: &[ModuleSpec],
        _cache_dir: Option<PathBuf>,
    ) -> Result<Arc<Transforms>, TransformError> {
        refuse(specs)
    }

    pub async fn open_remote(
        specs: &[ModuleSpec],
        _cache_dir: Option<PathBuf>,
    ) -> Result<Arc<Transforms>, TransformError> {
        refuse(specs)
    }

    pub fn is_empty(&self) -> bool {
        true
    }

    pub fn reload(&self, _force: bool) {}

    pub fn watch(self: &Arc<Self>, _interval: Duration) {}

    pub fn chain(self: &Arc<Self>) -> Chain {
        Chain
    }
}

/// A worker's chain: empty.
pub struct Chain;

impl Chain {
    pub fn set_tables(&mut self, _tables: Option<Arc<Lookups>>) {}

    /// Leaves `batch` as it is.
    pub fn run(
        &mut self,
        _source: &str,
        _batch: &mut Batch,
        _rejects: &mut Vec<Reject>,
    ) -> Vec<StageReport> {
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transform::{Limits, OnFailure};

    #[test]
    fn a_configured_module_is_refused_naming_it() {
        let spec = ModuleSpec {
            name: "enrich-owner".into(),
            path: "m.wasm".into(),
            region: None,
            endpoint_url: None,
            force_path_style: false,
            config: Vec::new(),
            tables: Vec::new(),
            limits: Limits {
                fuel: 0,
                timeout: Duration::from_secs(1),
                max_memory_bytes: 1 << 20,
                max_output_bytes: 1 << 20,
            },
            on_failure: OnFailure::ErrorOutput,
            max_attempts: 3,
            retry_fallback: OnFailure::DropBody,
        };
        let e = Transforms::open(std::slice::from_ref(&spec), None)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            e.contains("enrich-owner") && e.contains("transforms"),
            "{e}"
        );
        assert!(Transforms::open(&[], None).is_ok_and(|t| t.is_empty()));
    }
}
