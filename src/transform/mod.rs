//! The transform stage: teams' WASM components (the `trailhose:transform` world in `wit/`) run
//! in order over batches of events, between enrichment and the sink.
//!
//! [`Transforms`] is shared: the engine, each module compiled once (and cached on disk), and
//! hot reload. Each worker thread owns a [`Chain`]: one instance per module, built from the
//! module's pre-linked form and rebuilt after any failure or reload. A failed call sends that
//! batch's events to the error output with the module's name and the reason; the worker goes on.

pub mod batch;
pub mod cache;
pub mod host;
pub mod trial;

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use wasmtime::Engine;

pub use batch::{Batch, Counts, Reject, View};
use host::{CallError, Event, Fields, Instance, Prepared};

use crate::enrich::tables::stage::Lookups;
use crate::metrics::{self, TransformBatch, TransformFailed, TransformReloaded};
use crate::watch::{self, Stamp, stamp};

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
    pub path: PathBuf,
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

impl ModuleSpec {
    /// Whether the module's own log lines and counters are held until a call is known to
    /// have succeeded on every event: under `drop_body` they may quote the event.
    fn holds_output(&self) -> bool {
        self.on_failure == OnFailure::DropBody
            || (self.on_failure == OnFailure::Retry && self.retry_fallback == OnFailure::DropBody)
    }
}

/// Failed deliveries remembered under `on_failure = "retry"`; when full, the count restarts.
const ATTEMPTS_REMEMBERED: usize = 100_000;

#[derive(Debug, thiserror::Error)]
pub enum TransformError {
    #[error("transform {module:?}: cannot read {path}: {source}")]
    Read {
        module: String,
        path: String,
        #[source]
        source: std::io::Error,
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
}

/// A module's compiled, linked form.
struct Loaded {
    prepared: Prepared,
    digest: String,
}

struct Module {
    spec: ModuleSpec,
    name: Arc<str>,
    current: RwLock<Arc<Loaded>>,
    /// Bumped on every successful reload; workers rebuild their instance when it moves.
    generation: AtomicU64,
    stamp: Mutex<Option<Stamp>>,
}

/// Every configured module, shared by the workers.
pub struct Transforms {
    engine: Engine,
    fuel: bool,
    modules: Vec<Arc<Module>>,
    cache_dir: Option<PathBuf>,
    /// Failed deliveries per (module, source, first event index of the batch), for
    /// `max_attempts`. Per process: with several workers a batch may be tried up to
    /// `max_attempts` times on each.
    attempts: Mutex<HashMap<u64, u32>>,
}

impl Transforms {
    /// Compiles every module and checks that it instantiates and accepts its config: a module
    /// that fails here stops start-up.
    pub fn open(
        specs: &[ModuleSpec],
        cache_dir: Option<PathBuf>,
    ) -> Result<Arc<Transforms>, TransformError> {
        let fuel = specs.iter().any(|s| s.limits.fuel > 0);
        let engine = host::engine(fuel).map_err(|e| TransformError::Engine(e.to_string()))?;
        start_epoch_ticker(&engine);
        let mut t = Transforms {
            engine,
            fuel,
            modules: Vec::new(),
            cache_dir,
            attempts: Mutex::new(HashMap::new()),
        };
        for spec in specs {
            let name: Arc<str> = spec.name.as_str().into();
            let st = stamp(&spec.path);
            let loaded = t.load(spec, &name)?;
            t.modules.push(Arc::new(Module {
                spec: spec.clone(),
                name,
                current: RwLock::new(Arc::new(loaded)),
                generation: AtomicU64::new(0),
                stamp: Mutex::new(st),
            }));
        }
        Ok(Arc::new(t))
    }

    pub fn is_empty(&self) -> bool {
        self.modules.is_empty()
    }

    /// Reads, compiles (or loads from the cache), links, and test-instantiates one module.
    fn load(&self, spec: &ModuleSpec, name: &Arc<str>) -> Result<Loaded, TransformError> {
        let path = spec.path.display().to_string();
        let wasm = std::fs::read(&spec.path).map_err(|source| TransformError::Read {
            module: spec.name.clone(),
            path: path.clone(),
            source,
        })?;
        let compile_err = |e: wasmtime::Error| TransformError::Compile {
            module: spec.name.clone(),
            path: path.clone(),
            detail: format!("{e:#}"),
        };
        let (component, _, note) =
            cache::load(&self.engine, &wasm, self.cache_dir.as_deref()).map_err(compile_err)?;
        if let Some(note) = note {
            metrics::emit(metrics::TransformCacheUnusable { note: &note });
        }
        let prepared = Prepared::new(&self.engine, &component).map_err(compile_err)?;
        Instance::new(
            &self.engine,
            self.fuel,
            &prepared,
            name,
            &spec.config,
            &spec.tables,
            &spec.limits,
        )
        .map_err(|e| TransformError::Init {
            module: spec.name.clone(),
            detail: e.detail,
        })?;
        Ok(Loaded {
            prepared,
            digest: cache::digest(&wasm),
        })
    }

    /// Reloads modules whose file changed (`force`: re-reads every file, as on SIGHUP). A
    /// module that fails to load keeps its running version. Workers switch between batches, so
    /// no event is dropped.
    pub fn reload(&self, force: bool) {
        for m in &self.modules {
            let now = stamp(&m.spec.path);
            {
                let Ok(mut last) = m.stamp.lock() else {
                    continue;
                };
                if !force && *last == now {
                    continue;
                }
                *last = now;
            }
            let result = self.load(&m.spec, &m.name);
            let changed = match &result {
                Ok(loaded) => m
                    .current
                    .read()
                    .map(|c| c.digest != loaded.digest)
                    .unwrap_or(true),
                Err(_) => false,
            };
            match result {
                Ok(loaded) if changed => {
                    if let Ok(mut cur) = m.current.write() {
                        *cur = Arc::new(loaded);
                        m.generation.fetch_add(1, Ordering::SeqCst);
                    }
                    metrics::emit(TransformReloaded {
                        module: &m.name,
                        error: None,
                    });
                }
                Ok(_) => {}
                Err(e) => metrics::emit(TransformReloaded {
                    module: &m.name,
                    error: Some(&e.to_string()),
                }),
            }
        }
    }

    /// Checks the module files every `interval` until the `Transforms` is dropped.
    pub fn watch(self: &Arc<Self>, interval: Duration) {
        if let Err(e) = watch::poll("transform-watch", self, interval, |t| t.reload(false)) {
            metrics::emit(TransformReloaded {
                module: "*",
                error: Some(&format!("cannot start the file watcher: {e}")),
            });
        }
    }

    /// The policy for a batch of `source` (first event index `first`) that `spec`'s module
    /// did or did not fail: `retry` until `max_attempts` failed deliveries, then the fallback.
    fn policy_for(&self, spec: &ModuleSpec, source: &str, first: u64, failed: bool) -> OnFailure {
        if spec.on_failure != OnFailure::Retry {
            return spec.on_failure;
        }
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (spec.name.as_str(), source, first).hash(&mut h);
        let key = h.finish();
        let Ok(mut attempts) = self.attempts.lock() else {
            return OnFailure::Retry;
        };
        if !failed {
            attempts.remove(&key);
            return OnFailure::Retry;
        }
        if attempts.len() >= ATTEMPTS_REMEMBERED && !attempts.contains_key(&key) {
            attempts.clear();
        }
        let n = attempts.entry(key).or_insert(0);
        *n = n.saturating_add(1);
        if *n >= spec.max_attempts {
            attempts.remove(&key);
            spec.retry_fallback
        } else {
            OnFailure::Retry
        }
    }

    /// A worker's own chain of instances.
    pub fn chain(self: &Arc<Self>) -> Chain {
        Chain {
            transforms: self.clone(),
            stages: self
                .modules
                .iter()
                .map(|m| Stage {
                    module: m.clone(),
                    live: None,
                })
                .collect(),
            scratch: Batch::default(),
            tables: None,
        }
    }
}

/// Advances the engine's epoch every tick while the engine lives: the clock behind every
/// module's time limit.
fn start_epoch_ticker(engine: &Engine) {
    let weak = engine.weak();
    let _ = std::thread::Builder::new()
        .name("wasm-epoch".into())
        .spawn(move || {
            loop {
                std::thread::sleep(host::EPOCH_TICK);
                match weak.upgrade() {
                    Some(e) => e.increment_epoch(),
                    None => break,
                }
            }
        });
}

struct Stage {
    module: Arc<Module>,
    /// The instance and the module generation it was built from.
    live: Option<(u64, Instance)>,
}

/// One worker's instances of every module, in order.
pub struct Chain {
    transforms: Arc<Transforms>,
    stages: Vec<Stage>,
    scratch: Batch,
    /// The tables modules' `lookup` reads: the worker's generation, switched between files.
    tables: Option<Arc<Lookups>>,
}

impl Chain {
    /// The tables (of the worker's current generation) that modules read from the next batch.
    pub fn set_tables(&mut self, tables: Option<Arc<Lookups>>) {
        self.tables = tables;
    }

    /// Runs every module over `batch` (events of the file `source`) in order; on return
    /// `batch` holds the events to write and `rejects` the ones for the error output. Returns
    /// what each module call did.
    pub fn run(
        &mut self,
        source: &str,
        batch: &mut Batch,
        rejects: &mut Vec<Reject>,
    ) -> Vec<StageReport> {
        let mut reports = Vec::with_capacity(self.stages.len());
        for stage in &mut self.stages {
            if batch.is_empty() {
                break;
            }
            let name = stage.module.name.clone();
            let module = stage.module.clone();
            let spec = &module.spec;
            let policy;
            let first = batch.items().next().map_or(0, |v| v.index);
            let started = Instant::now();
            let first_reject = rejects.len();
            match stage.call(&self.transforms, self.tables.as_ref(), batch) {
                Ok(called) => {
                    let counts =
                        batch::apply(&name, batch, &called.outcomes, &mut self.scratch, rejects);
                    std::mem::swap(batch, &mut self.scratch);
                    self.scratch.clear();
                    let failed = rejects.len() > first_reject;
                    policy = self.transforms.policy_for(spec, source, first, failed);
                    // What the module said in a call that failed an event may quote it: muted
                    // on the retries before a `drop_body` fallback too, not only on the last.
                    stage.release(!(failed && spec.holds_output()));
                    let elapsed = started.elapsed();
                    metrics::emit(TransformBatch {
                        module: &name,
                        outcomes: [
                            ("kept", counts.kept),
                            ("annotated", counts.annotated),
                            ("replaced", counts.replaced),
                            ("split", counts.split),
                            ("split_into", counts.split_into),
                            ("dropped", counts.dropped),
                            ("failed", counts.failed),
                        ],
                        elapsed,
                        fuel: called.fuel_used,
                        on_failure: policy.as_str(),
                    });
                    reports.push(StageReport {
                        module: name,
                        counts,
                        elapsed,
                        fuel: called.fuel_used,
                        failure: None,
                    });
                }
                Err(mut e) => {
                    policy = self.transforms.policy_for(spec, source, first, true);
                    // The instance may be in any state after a trap: never reuse it (what it
                    // held of the module's log lines and counters goes with it).
                    stage.live = None;
                    if spec.holds_output() {
                        // The module's output (a panic message) may quote the event; it is
                        // logged below on each retry before a `drop_body` fallback as well.
                        e.detail = batch::dropped_detail(e.reason.as_str());
                    }
                    metrics::emit(TransformFailed {
                        module: &name,
                        reason: e.reason.as_str(),
                        events: batch.len() as u64,
                        detail: &e.detail,
                        on_failure: policy.as_str(),
                    });
                    batch.reject_all(&name, e.reason.as_str(), &e.detail, rejects);
                    batch.clear();
                    reports.push(StageReport {
                        module: name,
                        counts: Counts::default(),
                        elapsed: started.elapsed(),
                        fuel: 0,
                        failure: Some(e),
                    });
                }
            }
            if let Some(new) = rejects.get_mut(first_reject..) {
                new.iter_mut().for_each(|r| r.apply(policy));
            }
        }
        reports
    }
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

impl Stage {
    /// Emits (or forgets) the log lines and counters the instance held during the last call.
    fn release(&mut self, emit: bool) {
        if let Some((_, inst)) = &mut self.live {
            inst.release_held(emit);
        }
    }

    fn call(
        &mut self,
        t: &Transforms,
        tables: Option<&Arc<Lookups>>,
        batch: &Batch,
    ) -> Result<host::Called, CallError> {
        let generation = self.module.generation.load(Ordering::SeqCst);
        let inst = match &mut self.live {
            Some((g, inst)) if *g == generation => inst,
            slot => {
                *slot = None;
                let loaded =
                    self.module
                        .current
                        .read()
                        .map(|c| c.clone())
                        .map_err(|_| CallError {
                            reason: host::FailReason::InitFailed,
                            detail: "the module's state is poisoned".to_owned(),
                        })?;
                let spec = &self.module.spec;
                let inst = Instance::new(
                    &t.engine,
                    t.fuel,
                    &loaded.prepared,
                    &self.module.name,
                    &spec.config,
                    &spec.tables,
                    &spec.limits,
                )?;
                let inst = &mut slot.insert((generation, inst)).1;
                inst.hold_output(spec.holds_output());
                inst
            }
        };
        inst.set_tables(tables);
        let events: Vec<Event<'_>> = batch
            .items()
            .map(|v| Event {
                json: v.event,
                fields: Fields {
                    event_source: v.event_source,
                    event_name: v.event_name,
                    event_type: v.event_type,
                    source_ip_address: v.source_ip,
                    account: v.account,
                    region: v.region,
                    country: v.country,
                    read_only: v.read_only,
                },
            })
            .collect();
        inst.process(&events)
    }
}
