//! The wasmtime side: one sandboxed instance of a module, and the calls into it under limits.
//!
//! A module gets no ambient authority: no preopened directories, no sockets or name lookups, no
//! environment or arguments, and frozen clocks. Only stdout/stderr exist, captured into a small
//! tail so that a panicking guest's message reaches the error record. Each call runs with a fuel
//! budget (instructions), an epoch deadline (wall time) and `StoreLimits` (memory, tables,
//! instances).

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{Engine, Store, StoreLimits, StoreLimitsBuilder, Trap};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError};
use wasmtime_wasi::{
    HostMonotonicClock, HostWallClock, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView,
};

use super::Limits;
use crate::metrics::{self, GuestCounted, GuestLogged};

mod bindings {
    wasmtime::component::bindgen!({
        path: "wit",
        world: "transform",
        ownership: Borrowing { duplicate_if_necessary: true },
    });
}

pub use bindings::trailhose::transform::host::Level;
pub use bindings::{Event, Fields, Member, Outcome};
use bindings::{Transform, TransformPre};

/// How often the engine's epoch advances: the granularity of the per-call time limit.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// Guest log lines accepted per call; more are counted but not logged, so a chatty module
/// cannot flood the logs.
const LOGS_PER_CALL: u32 = 20;
/// Distinct guest counter names per instance; further names are counted as `_other`.
const COUNTER_NAMES: usize = 64;
/// Bytes of guest stdout/stderr kept (the tail).
const OUTPUT_TAIL: usize = 4096;

/// The engine shared by every module: fuel metering when any module asks for it, epoch
/// interruption always.
pub fn engine(fuel: bool) -> wasmtime::Result<Engine> {
    let mut c = wasmtime::Config::new();
    c.wasm_component_model(true);
    c.consume_fuel(fuel);
    c.epoch_interruption(true);
    Engine::new(&c)
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

/// A component linked against the host and WASI, ready to instantiate many times.
#[derive(Clone)]
pub struct Prepared {
    pre: TransformPre<State>,
}

impl Prepared {
    pub fn new(engine: &Engine, component: &Component) -> wasmtime::Result<Prepared> {
        let mut linker = Linker::<State>::new(engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker)?;
        Transform::add_to_linker::<State, wasmtime::component::HasSelf<State>>(&mut linker, |s| s)?;
        let pre = TransformPre::new(linker.instantiate_pre(component)?)?;
        Ok(Prepared { pre })
    }
}

/// Per-store data: the WASI context (nothing granted), limits, and the host imports' state.
pub struct State {
    wasi: WasiCtx,
    table: ResourceTable,
    limits: StoreLimits,
    module: Arc<str>,
    logs_left: u32,
    counter_names: Vec<String>,
    output: Tail,
}

impl WasiView for State {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl bindings::trailhose::transform::host::Host for State {
    fn log(&mut self, level: Level, message: String) {
        if self.logs_left == 0 {
            return;
        }
        self.logs_left -= 1;
        metrics::emit(GuestLogged {
            module: &self.module,
            level: match level {
                Level::Debug => tracing::Level::DEBUG,
                Level::Info => tracing::Level::INFO,
                Level::Warn => tracing::Level::WARN,
                Level::Error => tracing::Level::ERROR,
            },
            message: &message,
        });
    }

    fn count(&mut self, name: String, delta: u64) {
        let name = if self.counter_names.contains(&name) {
            name.as_str()
        } else if self.counter_names.len() < COUNTER_NAMES && valid_counter_name(&name) {
            self.counter_names.push(name.clone());
            name.as_str()
        } else {
            "_other"
        };
        metrics::emit(GuestCounted {
            module: &self.module,
            name,
            delta,
        });
    }
}

fn valid_counter_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
}

/// One live instance of a module, in its own store.
pub struct Instance {
    store: Store<State>,
    bindings: Transform,
    limits: Limits,
    fuel: bool,
}

/// What one `process` call returned, with what it cost.
pub struct Called {
    pub outcomes: Vec<Outcome>,
    pub fuel_used: u64,
}

impl Instance {
    /// Instantiates and runs `init` with the module's config. `fuel`: whether the engine
    /// meters fuel.
    pub fn new(
        engine: &Engine,
        fuel: bool,
        prepared: &Prepared,
        module: &Arc<str>,
        config: &[(String, String)],
        limits: &Limits,
    ) -> Result<Instance, CallError> {
        let output = Tail::default();
        let wasi = WasiCtxBuilder::new()
            .stdout(output.clone())
            .stderr(output.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .wall_clock(Frozen)
            .monotonic_clock(Frozen)
            .build();
        let state = State {
            wasi,
            table: ResourceTable::new(),
            limits: StoreLimitsBuilder::new()
                .memory_size(limits.max_memory_bytes)
                .memories(16)
                .tables(64)
                .table_elements(1 << 20)
                .instances(64)
                .trap_on_grow_failure(true)
                .build(),
            module: module.clone(),
            logs_left: LOGS_PER_CALL,
            counter_names: Vec::new(),
            output,
        };
        let mut store = Store::new(engine, state);
        store.limiter(|s| &mut s.limits);
        store.epoch_deadline_trap();
        arm(&mut store, limits, fuel);
        let bindings = prepared
            .pre
            .instantiate(&mut store)
            .map_err(|e| classify(&store, limits, &e, "instantiating"))?;
        arm(&mut store, limits, fuel);
        let config: Vec<(&str, &str)> = config
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        match bindings.call_init(&mut store, &config) {
            Ok(Ok(())) => Ok(Instance {
                store,
                bindings,
                limits: limits.clone(),
                fuel,
            }),
            Ok(Err(message)) => Err(CallError {
                reason: FailReason::InitFailed,
                detail: format!("init refused the config: {message}"),
            }),
            Err(e) => Err(classify(&store, limits, &e, "init")),
        }
    }

    /// Runs one batch. An error means the instance must be discarded.
    pub fn process(&mut self, events: &[Event<'_>]) -> Result<Called, CallError> {
        arm(&mut self.store, &self.limits, self.fuel);
        let outcomes = self
            .bindings
            .call_process(&mut self.store, events)
            .map_err(|e| classify(&self.store, &self.limits, &e, "process"))?;
        let fuel_used = if self.fuel && self.limits.fuel > 0 {
            self.limits
                .fuel
                .saturating_sub(self.store.get_fuel().unwrap_or(0))
        } else {
            0
        };
        if outcomes.len() != events.len() {
            return Err(CallError {
                reason: FailReason::MalformedOutput,
                detail: format!(
                    "returned {} outcomes for {} events",
                    outcomes.len(),
                    events.len()
                ),
            });
        }
        let size: usize = outcomes.iter().map(outcome_bytes).sum();
        if size > self.limits.max_output_bytes {
            return Err(CallError {
                reason: FailReason::OutputTooLarge,
                detail: format!(
                    "returned {size} bytes for {} events, more than max_output_bytes = {}",
                    events.len(),
                    self.limits.max_output_bytes
                ),
            });
        }
        Ok(Called {
            outcomes,
            fuel_used,
        })
    }
}

/// Sets the per-call budgets (fuel, wall time, log lines) and clears the output tail.
fn arm(store: &mut Store<State>, limits: &Limits, fuel: bool) {
    if fuel {
        let budget = if limits.fuel == 0 {
            u64::MAX
        } else {
            limits.fuel
        };
        // Cannot fail: fuel is enabled on this engine.
        let _ = store.set_fuel(budget);
    }
    let ticks = limits.timeout.as_millis() / EPOCH_TICK.as_millis() + 1;
    store.set_epoch_deadline(u64::try_from(ticks).unwrap_or(u64::MAX));
    let data = store.data_mut();
    data.logs_left = LOGS_PER_CALL;
    data.output.clear();
}

fn classify(store: &Store<State>, limits: &Limits, e: &wasmtime::Error, during: &str) -> CallError {
    let output = store.data().output.text();
    let trap = e.downcast_ref::<Trap>().copied();
    let message = format!("{e:#}");
    let reason = match trap {
        Some(Trap::OutOfFuel) => FailReason::FuelExhausted,
        Some(Trap::Interrupt) => FailReason::Timeout,
        _ if message.contains("forcing trap when growing memory") => FailReason::MemoryLimit,
        _ if output.contains("panicked at") => FailReason::Panic,
        _ => FailReason::Trap,
    };
    let output = output.trim();
    let detail = match reason {
        FailReason::FuelExhausted => {
            format!(
                "{during} ran out of fuel (fuel = {} per batch)",
                limits.fuel
            )
        }
        FailReason::Timeout => format!(
            "{during} exceeded the time limit (timeout_ms = {})",
            limits.timeout.as_millis()
        ),
        FailReason::MemoryLimit => format!(
            "{during} exceeded the memory limit (max_memory_mb = {})",
            limits.max_memory_bytes >> 20
        ),
        FailReason::Panic => format!("{during} panicked: {output}"),
        _ => {
            let first = match trap {
                Some(t) => t.to_string(),
                None => message.lines().next().unwrap_or("").to_owned(),
            };
            if output.is_empty() {
                format!("{during} trapped: {first}")
            } else {
                format!("{during} trapped: {first}; module output: {output}")
            }
        }
    };
    CallError { reason, detail }
}

fn outcome_bytes(o: &Outcome) -> usize {
    match o {
        Outcome::Keep | Outcome::Drop => 0,
        Outcome::Annotate(members) => members.iter().map(|m| m.key.len() + m.value.len()).sum(),
        Outcome::Replace(b) => b.len(),
        Outcome::Split(parts) => parts.iter().map(Vec::len).sum(),
        Outcome::Failed(m) => m.len(),
    }
}

/// Clocks frozen at zero: a transform must not depend on time, and time is a side channel.
struct Frozen;

impl HostWallClock for Frozen {
    fn resolution(&self) -> Duration {
        Duration::from_secs(1)
    }
    fn now(&self) -> Duration {
        Duration::ZERO
    }
}

impl HostMonotonicClock for Frozen {
    fn resolution(&self) -> u64 {
        1_000_000_000
    }
    fn now(&self) -> u64 {
        0
    }
}

/// The last bytes a guest wrote to stdout or stderr.
#[derive(Clone, Default)]
struct Tail(Arc<Mutex<VecDeque<u8>>>);

impl Tail {
    fn push(&self, bytes: &[u8]) {
        let Ok(mut buf) = self.0.lock() else { return };
        buf.extend(bytes);
        let excess = buf.len().saturating_sub(OUTPUT_TAIL);
        buf.drain(..excess);
    }

    fn clear(&self) {
        if let Ok(mut buf) = self.0.lock() {
            buf.clear();
        }
    }

    fn text(&self) -> String {
        match self.0.lock() {
            Ok(buf) => {
                String::from_utf8_lossy(&buf.iter().copied().collect::<Vec<u8>>()).into_owned()
            }
            Err(_) => String::new(),
        }
    }
}

impl IsTerminal for Tail {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for Tail {
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }

    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }
}

impl OutputStream for Tail {
    fn write(&mut self, bytes: Bytes) -> Result<(), StreamError> {
        self.push(&bytes);
        Ok(())
    }
    fn flush(&mut self) -> Result<(), StreamError> {
        Ok(())
    }
    fn check_write(&mut self) -> Result<usize, StreamError> {
        Ok(OUTPUT_TAIL)
    }
}

#[async_trait::async_trait]
impl Pollable for Tail {
    async fn ready(&mut self) {}
}

impl tokio::io::AsyncWrite for Tail {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.push(buf);
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
