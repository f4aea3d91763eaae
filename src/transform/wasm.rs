//! The transform stage with its WASM engine (the `transforms` feature): modules compiled,
//! followed for changes and run by each worker's [`Chain`].

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use wasmtime::Engine;

use super::host::{self, Event, Fields, Instance, Prepared};
use super::{
    Batch, CallError, Counts, MAX_MODULE_BYTES, ModuleSpec, OnFailure, Reject, StageReport,
    TransformError, batch, cache,
};
use crate::enrich::tables::stage::Lookups;
use crate::metrics::{self, TransformBatch, TransformFailed, TransformReloaded};
use crate::watch::{self, ReadError, Source, Version};

fn read_error(spec: &ModuleSpec, e: ReadError) -> TransformError {
    TransformError::Read {
        module: spec.name.clone(),
        path: spec.path.display().to_string(),
        detail: e.to_string(),
    }
}

/// A local module's bytes and stamp, read at start-up.
fn first_read(spec: &ModuleSpec, source: &Source) -> Result<(Vec<u8>, Version), TransformError> {
    first_of(
        spec,
        source.read_blocking(None, &Version::Unknown, MAX_MODULE_BYTES),
    )
}

/// A first read's bytes and version (there is no known version, so there is always data).
fn first_of(
    spec: &ModuleSpec,
    read: Result<Option<(Vec<u8>, Version)>, ReadError>,
) -> Result<(Vec<u8>, Version), TransformError> {
    read.map_err(|e| read_error(spec, e))?
        .ok_or_else(|| read_error(spec, ReadError::Failed("no data".into())))
}

/// Failed deliveries remembered under `on_failure = "retry"`; when full, the count restarts.
const ATTEMPTS_REMEMBERED: usize = 100_000;

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
    source: Source,
    /// What the source looked like when last read.
    version: Mutex<Version>,
    /// The last reload error, so that an S3 outage is reported when it starts (and when its
    /// error changes), not at every check.
    last_error: Mutex<Option<String>>,
}

impl Module {
    /// Records the outcome of a reload check; true when `error` is new and should be reported.
    fn report(&self, error: Option<&str>) -> bool {
        let Ok(mut last) = self.last_error.lock() else {
            return true;
        };
        if last.as_deref() == error {
            return false;
        }
        *last = error.map(str::to_owned);
        error.is_some()
    }
}

/// Every configured module, shared by the workers.
pub struct Transforms {
    engine: Engine,
    fuel: bool,
    modules: Vec<Arc<Module>>,
    cache_dir: Option<PathBuf>,
    /// Runs the S3 reads of `s3://` modules on reload; None without a runtime (`transform
    /// test`), where only local files are used.
    runtime: Option<tokio::runtime::Handle>,
    /// Failed deliveries per (module, source, first event index of the batch), for
    /// `max_attempts`. Per process: with several workers a batch may be tried up to
    /// `max_attempts` times on each.
    attempts: Mutex<HashMap<u64, u32>>,
}

impl Transforms {
    /// Compiles every module (local files only) and checks that it instantiates and accepts
    /// its config: a module that fails here stops start-up.
    pub fn open(
        specs: &[ModuleSpec],
        cache_dir: Option<PathBuf>,
    ) -> Result<Arc<Transforms>, TransformError> {
        let mut read = Vec::with_capacity(specs.len());
        for spec in specs {
            let source = Source::File(spec.path.clone());
            let first = first_read(spec, &source)?;
            read.push((source, first));
        }
        Self::build(specs, cache_dir, None, read)
    }

    /// As [`Transforms::open`], with `s3://` modules read from S3 (and followed there by
    /// their ETag on reload).
    pub async fn open_remote(
        specs: &[ModuleSpec],
        cache_dir: Option<PathBuf>,
    ) -> Result<Arc<Transforms>, TransformError> {
        let mut read = Vec::with_capacity(specs.len());
        for spec in specs {
            let source = Source::open(&spec.path.to_string_lossy(), spec.s3()).await;
            let first = first_of(spec, source.read(&Version::Unknown, MAX_MODULE_BYTES).await)?;
            read.push((source, first));
        }
        let runtime = tokio::runtime::Handle::current();
        Self::build(specs, cache_dir, Some(runtime), read)
    }

    fn build(
        specs: &[ModuleSpec],
        cache_dir: Option<PathBuf>,
        runtime: Option<tokio::runtime::Handle>,
        read: Vec<(Source, (Vec<u8>, Version))>,
    ) -> Result<Arc<Transforms>, TransformError> {
        let fuel = specs.iter().any(|s| s.limits.fuel > 0);
        let engine = host::engine(fuel).map_err(|e| TransformError::Engine(e.to_string()))?;
        start_epoch_ticker(&engine);
        let mut t = Transforms {
            engine,
            fuel,
            modules: Vec::new(),
            cache_dir,
            runtime,
            attempts: Mutex::new(HashMap::new()),
        };
        for (spec, (source, (wasm, version))) in specs.iter().zip(read) {
            let name: Arc<str> = spec.name.as_str().into();
            let loaded = t.load(spec, &name, &wasm)?;
            t.modules.push(Arc::new(Module {
                spec: spec.clone(),
                name,
                current: RwLock::new(Arc::new(loaded)),
                generation: AtomicU64::new(0),
                source,
                version: Mutex::new(version),
                last_error: Mutex::new(None),
            }));
        }
        Ok(Arc::new(t))
    }

    pub fn is_empty(&self) -> bool {
        self.modules.is_empty()
    }

    /// Compiles (or loads from the cache), links, and test-instantiates one module.
    fn load(
        &self,
        spec: &ModuleSpec,
        name: &Arc<str>,
        wasm: &[u8],
    ) -> Result<Loaded, TransformError> {
        let path = spec.path.display().to_string();
        let compile_err = |e: wasmtime::Error| TransformError::Compile {
            module: spec.name.clone(),
            path: path.clone(),
            detail: format!("{e:#}"),
        };
        let (component, _, note) =
            cache::load(&self.engine, wasm, self.cache_dir.as_deref()).map_err(compile_err)?;
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
            digest: cache::digest(wasm),
        })
    }

    /// Reloads modules whose file or S3 object changed (`force`: re-reads every one, as on
    /// SIGHUP). A module that fails to load keeps its running version, and is not read again
    /// until it changes. Workers switch between batches, so no event is dropped. Blocks: call
    /// it from a plain thread.
    pub fn reload(&self, force: bool) {
        for m in &self.modules {
            let wasm = {
                let Ok(mut last) = m.version.lock() else {
                    continue;
                };
                let known = if force {
                    Version::Unknown
                } else {
                    last.clone()
                };
                // Taken before the read: a file that reappears after a failed read is seen
                // as changed at the next check.
                let before = match &m.source {
                    Source::File(path) => Some(Version::File(watch::stamp(path))),
                    Source::S3 { .. } => None,
                };
                match m
                    .source
                    .read_blocking(self.runtime.as_ref(), &known, MAX_MODULE_BYTES)
                {
                    Ok(None) => continue,
                    Ok(Some((wasm, now))) => {
                        *last = now;
                        Ok(wasm)
                    }
                    // A file that is gone or unreadable is read again when it changes; an S3
                    // error at the next check.
                    Err(e) => {
                        if let Some(before) = before {
                            *last = before;
                        }
                        Err(read_error(&m.spec, e))
                    }
                }
            };
            // The same bytes (a touched file, an S3 object without an ETag) are not compiled
            // and initialized again.
            let wasm = match wasm {
                Ok(w)
                    if m.current
                        .read()
                        .is_ok_and(|c| c.digest == cache::digest(&w)) =>
                {
                    m.report(None);
                    continue;
                }
                other => other,
            };
            match wasm.and_then(|wasm| self.load(&m.spec, &m.name, &wasm)) {
                Ok(loaded) => {
                    if let Ok(mut cur) = m.current.write() {
                        *cur = Arc::new(loaded);
                        m.generation.fetch_add(1, Ordering::SeqCst);
                    }
                    m.report(None);
                    metrics::emit(TransformReloaded {
                        module: &m.name,
                        error: None,
                    });
                }
                Err(e) => {
                    let e = e.to_string();
                    if m.report(Some(&e)) {
                        metrics::emit(TransformReloaded {
                            module: &m.name,
                            error: Some(&e),
                        });
                    }
                }
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
