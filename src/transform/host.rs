//! The wasmtime side: one sandboxed instance of a module, and the calls into it under limits.
//!
//! A module gets no ambient authority. The linker holds only what a language runtime needs to
//! start (see [`Prepared::new`] and `wit/README.md`): stdout/stderr, captured into a small tail
//! so that a panicking guest's message reaches the error record; an empty environment; frozen
//! clocks that cannot sleep; a fixed "random" byte sequence; and a filesystem with no directory
//! in it. Anything else a module imports (sockets, name lookups) traps when called. Each call
//! runs with a fuel budget (instructions), an epoch deadline (wall time), a [`Limiter`] that sums
//! every linear memory and table of the instance, and a host-copy budget that stops the result
//! from being copied out of the module once it passes `max_output_bytes`.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use wasmtime::component::{Component, HasData, HasSelf, Linker, Resource, ResourceTable};
use wasmtime::{Engine, ResourceLimiter, Store, Trap};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream, WasiCli, WasiCliView};
use wasmtime_wasi::clocks::{WasiClocks, WasiClocksView};
use wasmtime_wasi::filesystem::{WasiFilesystem, WasiFilesystemView};
use wasmtime_wasi::p2::bindings::{cli, clocks, filesystem, random, sync};
use wasmtime_wasi::p2::{DynPollable, OutputStream, Pollable, StreamError};
use wasmtime_wasi::random::WasiRandom;
use wasmtime_wasi::{Deterministic, HostWallClock, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use super::Limits;
pub use super::{CallError, FailReason};
use crate::enrich::tables::stage::Lookups;
use crate::metrics::{self, GuestCounted, GuestLogged};

/// The current world, `trailhose:transform@0.2.0`: its exports are the same as 0.1.0's, so it
/// type-checks modules built against either version.
mod bindings {
    wasmtime::component::bindgen!({
        path: "wit",
        world: "transform",
        ownership: Borrowing { duplicate_if_necessary: true },
        imports: { "trailhose:transform/host.lookup": trappable },
    });
}

/// The 0.1.0 host interface (`log`, `count`), linked beside 0.2.0's so that modules built
/// against 0.1.0 keep working unchanged. Only its import side is used.
mod v0_1 {
    wasmtime::component::bindgen!({
        path: "wit/v0.1.0",
        world: "transform",
    });
}

pub use bindings::trailhose::transform::host::Level;
pub use bindings::{Event, Fields, Member, Outcome};
use bindings::{Transform, TransformPre};

/// How often the engine's epoch advances: the granularity of the per-call time limit.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// Bytes of one `lookup` key; a longer key traps (a table's keys are IDs, names, addresses).
pub const MAX_LOOKUP_KEY_BYTES: usize = 4096;
/// Fuel each `lookup` costs, besides what the module's own instructions cost: the host's work
/// (lower-casing, hashing, a prefix search, decoding an mmdb record) is charged as this much per
/// call plus [`LOOKUP_FUEL_PER_BYTE`] per byte of key and of result, so that a module cannot
/// make the host work past its fuel by looping over lookups.
pub const LOOKUP_FUEL_PER_CALL: u64 = 1_000;
pub const LOOKUP_FUEL_PER_BYTE: u64 = 4;
/// Bytes of a table name quoted in a trap message.
const TABLE_NAME_SHOWN: usize = 64;

/// Guest log lines accepted per call; more are counted but not logged, so a chatty module
/// cannot flood the logs.
const LOGS_PER_CALL: u32 = 20;
/// Distinct guest counter names per instance; further names are counted as `_other`.
const COUNTER_NAMES: usize = 64;
/// Bytes of guest stdout/stderr kept (the tail).
const OUTPUT_TAIL: usize = 4096;
/// Bytes of one guest log line that are logged; the rest is cut, marked with an ellipsis.
pub const LOG_LINE_BYTES: usize = 2048;
/// Linear memories, tables and core instances one instance of a module may create. A Rust
/// module has 1 memory and 2 tables; the componentize-py example too.
const MAX_MEMORIES: usize = 2;
const MAX_TABLES: usize = 16;
const MAX_CORE_INSTANCES: usize = 32;
/// Table elements of all tables together (a pointer each): a Rust module has 56, the
/// componentize-py example about 5 800.
const MAX_TABLE_ELEMENTS: usize = 65_536;
/// Bytes of host bookkeeping charged for each outcome copied out of a module, on top of
/// `max_output_bytes` (the copy budget is `max_output_bytes + events × this`).
const OUTCOME_OVERHEAD: usize = std::mem::size_of::<Outcome>();
/// What every `wasi:random` call returns, repeated: runtimes seed hash tables from it, and a
/// transform must be deterministic (the same input gives the same output on every instance).
const RANDOM_BYTES: &[u8] = b"trailhose: wasi:random is fixed";

/// The engine shared by every module: fuel metering when any module asks for it, epoch
/// interruption always.
pub fn engine(fuel: bool) -> wasmtime::Result<Engine> {
    let mut c = wasmtime::Config::new();
    c.wasm_component_model(true);
    c.consume_fuel(fuel);
    c.epoch_interruption(true);
    Engine::new(&c)
}

/// A component linked against the host and WASI, ready to instantiate many times.
#[derive(Clone)]
pub struct Prepared {
    pre: TransformPre<State>,
}

impl Prepared {
    pub fn new(engine: &Engine, component: &Component) -> wasmtime::Result<Prepared> {
        let mut linker = Linker::<State>::new(engine);
        link_wasi(&mut linker)?;
        link_host(&mut linker)?;
        v0_1::trailhose::transform::host::add_to_linker::<State, HasSelf<State>>(
            &mut linker,
            |s| s,
        )?;
        stub_unlinked(&mut linker, engine, component)?;
        let pre = TransformPre::new(linker.instantiate_pre(component)?)?;
        Ok(Prepared { pre })
    }
}

/// The 0.2.0 host interface, linked by hand rather than by the generated `add_to_linker`:
/// `lookup` charges fuel, which needs the store, not only its data.
fn link_host(l: &mut Linker<State>) -> wasmtime::Result<()> {
    use bindings::trailhose::transform::host::Host;
    let mut host = l.instance("trailhose:transform/host@0.2.0")?;
    host.func_wrap("log", |mut store, (level, message): (Level, String)| {
        Host::log(store.data_mut(), level, message);
        Ok(())
    })?;
    host.func_wrap("count", |mut store, (name, delta): (String, u64)| {
        Host::count(store.data_mut(), name, delta);
        Ok(())
    })?;
    host.func_wrap("lookup", |mut store, (table, key): (String, String)| {
        charged_lookup(&mut store, &table, &key).map(|found| (found,))
    })?;
    Ok(())
}

/// The WASI interfaces a transform gets: what Rust std and CPython import to start, with nothing
/// granted (see the module doc). Not linked: `wasi:sockets/*`.
fn link_wasi(l: &mut Linker<State>) -> wasmtime::Result<()> {
    wasmtime_wasi_io::bindings::wasi::io::error::add_to_linker::<State, Io>(l, |s| &mut s.table)?;
    sync::io::poll::add_to_linker::<State, Io>(l, |s| &mut s.table)?;
    sync::io::streams::add_to_linker::<State, Io>(l, |s| &mut s.table)?;
    cli::exit::add_to_linker::<State, WasiCli>(l, State::cli)?;
    cli::environment::add_to_linker::<State, WasiCli>(l, State::cli)?;
    cli::stdin::add_to_linker::<State, WasiCli>(l, State::cli)?;
    cli::stdout::add_to_linker::<State, WasiCli>(l, State::cli)?;
    cli::stderr::add_to_linker::<State, WasiCli>(l, State::cli)?;
    cli::terminal_input::add_to_linker::<State, WasiCli>(l, State::cli)?;
    cli::terminal_output::add_to_linker::<State, WasiCli>(l, State::cli)?;
    cli::terminal_stdin::add_to_linker::<State, WasiCli>(l, State::cli)?;
    cli::terminal_stdout::add_to_linker::<State, WasiCli>(l, State::cli)?;
    cli::terminal_stderr::add_to_linker::<State, WasiCli>(l, State::cli)?;
    clocks::wall_clock::add_to_linker::<State, WasiClocks>(l, State::clocks)?;
    clocks::monotonic_clock::add_to_linker::<State, HasSelf<State>>(l, |s| s)?;
    random::random::add_to_linker::<State, WasiRandom>(l, |s| s.wasi.random())?;
    random::insecure::add_to_linker::<State, WasiRandom>(l, |s| s.wasi.random())?;
    random::insecure_seed::add_to_linker::<State, WasiRandom>(l, |s| s.wasi.random())?;
    // No directory is preopened, so no path can be opened: std's file calls get an error.
    filesystem::preopens::add_to_linker::<State, WasiFilesystem>(l, State::filesystem)?;
    sync::filesystem::types::add_to_linker::<State, WasiFilesystem>(l, State::filesystem)?;
    Ok(())
}

/// Interfaces [`link_wasi`] and the host world provide; every other imported interface
/// (sockets, name lookups, anything else) is linked as functions that trap when called, so that
/// the module instantiates and fails only if it reaches for them.
const LINKED: &[&str] = &[
    "wasi:io/",
    "wasi:cli/",
    "wasi:clocks/",
    "wasi:random/",
    "wasi:filesystem/",
    "trailhose:transform/",
];

fn stub_unlinked(
    linker: &mut Linker<State>,
    engine: &Engine,
    component: &Component,
) -> wasmtime::Result<()> {
    use wasmtime::component::types::ComponentItem;
    let ty = component.component_type();
    for (name, import) in ty.imports(engine) {
        if LINKED.iter().any(|p| name.starts_with(p)) {
            continue;
        }
        let ComponentItem::ComponentInstance(instance) = import.ty else {
            continue;
        };
        let mut stubs = linker.instance(name)?;
        for (item, export) in instance.exports(engine) {
            match export.ty {
                ComponentItem::ComponentFunc(_) => {
                    let what = format!("{name}#{item}");
                    stubs.func_new(item, move |_, _, _, _| {
                        Err(wasmtime::format_err!(
                            "unknown import: `{what}` is not available to transforms"
                        ))
                    })?;
                }
                // Stubbed interfaces name resources of wasi:io (sockets use `pollable` and the
                // streams): those must be the linked types; their own are never created.
                ComponentItem::Resource(_) => {
                    use wasmtime::component::ResourceType;
                    use wasmtime_wasi_io::streams::{DynInputStream, DynOutputStream};
                    let ty = match item {
                        "pollable" => ResourceType::host::<DynPollable>(),
                        "input-stream" => ResourceType::host::<DynInputStream>(),
                        "output-stream" => ResourceType::host::<DynOutputStream>(),
                        _ => ResourceType::host::<()>(),
                    };
                    stubs.resource(item, ty, |_, _| Ok(()))?;
                }
                _ => {}
            }
        }
    }
    Ok(())
}

struct Io;

impl HasData for Io {
    type Data<'a> = &'a mut ResourceTable;
}

/// Per-store data: the WASI context (nothing granted), limits, and the host imports' state.
pub struct State {
    wasi: WasiCtx,
    table: ResourceTable,
    limits: Limiter,
    module: Arc<str>,
    logs_left: u32,
    counter_names: Vec<String>,
    output: Tail,
    /// Log lines and counter increments of the current call, held when the module's failure
    /// policy drops bodies (`None`: emitted as they come).
    held: Option<Vec<Said>>,
    /// The tables of the worker's current generation, and the names this module may read.
    tables: Option<Arc<Lookups>>,
    grants: Arc<[String]>,
}

/// One thing a module said through the host imports.
enum Said {
    Log(tracing::Level, String),
    Count(String, u64),
}

impl WasiView for State {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// The monotonic clock reads zero and cannot be waited on: a blocked host call would not be
/// interrupted by the epoch deadline, so sleeping traps instead.
impl clocks::monotonic_clock::Host for State {
    fn now(&mut self) -> wasmtime::Result<u64> {
        Ok(0)
    }
    fn resolution(&mut self) -> wasmtime::Result<u64> {
        Ok(1_000_000_000)
    }
    fn subscribe_instant(&mut self, _when: u64) -> wasmtime::Result<Resource<DynPollable>> {
        Err(wasmtime::format_err!(
            "timers are not available to transforms (wasi:clocks/monotonic-clock.subscribe-instant)"
        ))
    }
    fn subscribe_duration(&mut self, _d: u64) -> wasmtime::Result<Resource<DynPollable>> {
        Err(wasmtime::format_err!(
            "timers are not available to transforms (wasi:clocks/monotonic-clock.subscribe-duration)"
        ))
    }
}

/// Memory and table elements summed over every memory and table of one instance, and small
/// caps on how many it may create. Exceeding the memory or table budget traps.
struct Limiter {
    memory_left: usize,
    table_elements_left: usize,
}

/// The trap a [`Limiter`] raises, recognized by [`classify`].
#[derive(Debug, thiserror::Error)]
#[error("{what} limit reached: growing to {desired} would pass the instance's budget")]
struct LimitReached {
    what: &'static str,
    desired: usize,
}

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let more = desired.saturating_sub(current);
        match self.memory_left.checked_sub(more) {
            Some(left) => {
                self.memory_left = left;
                Ok(true)
            }
            None => Err(wasmtime::Error::new(LimitReached {
                what: "memory",
                desired,
            })),
        }
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let more = desired.saturating_sub(current);
        match self.table_elements_left.checked_sub(more) {
            Some(left) => {
                self.table_elements_left = left;
                Ok(true)
            }
            None => Err(wasmtime::Error::new(LimitReached {
                what: "table",
                desired,
            })),
        }
    }

    fn instances(&self) -> usize {
        MAX_CORE_INSTANCES
    }
    fn tables(&self) -> usize {
        MAX_TABLES
    }
    fn memories(&self) -> usize {
        MAX_MEMORIES
    }
}

impl bindings::trailhose::transform::host::Host for State {
    fn log(&mut self, level: Level, message: String) {
        if self.logs_left == 0 {
            return;
        }
        self.logs_left -= 1;
        let level = match level {
            Level::Debug => tracing::Level::DEBUG,
            Level::Info => tracing::Level::INFO,
            Level::Warn => tracing::Level::WARN,
            Level::Error => tracing::Level::ERROR,
        };
        if let Some(held) = &mut self.held {
            held.push(Said::Log(level, log_line(&message).into_owned()));
            return;
        }
        metrics::emit(GuestLogged {
            module: &self.module,
            level,
            message: &log_line(&message),
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
        if let Some(held) = &mut self.held {
            // One entry per name: a call that counts in a loop holds no more than its names.
            let same = held.iter_mut().find_map(|s| match s {
                Said::Count(n, d) if n == name => Some(d),
                _ => None,
            });
            match same {
                Some(d) => *d = d.saturating_add(delta),
                None => held.push(Said::Count(name.to_owned(), delta)),
            }
            return;
        }
        metrics::emit(GuestCounted {
            module: &self.module,
            name,
            delta,
        });
    }

    /// Linked in its place is [`charged_lookup`] (see [`link_host`]); this one, which the
    /// generated trait requires, charges nothing.
    fn lookup(
        &mut self,
        table: String,
        key: String,
    ) -> wasmtime::Result<Option<Vec<(String, String)>>> {
        self.lookup_in(&table, &key)
    }
}

impl State {
    /// `lookup` for the module: a table it is granted, a key within [`MAX_LOOKUP_KEY_BYTES`].
    fn lookup_in(&self, table: &str, key: &str) -> wasmtime::Result<Option<Vec<(String, String)>>> {
        if !self.grants.iter().any(|g| g == table) {
            return Err(wasmtime::format_err!(
                "lookup: table {:?} is not granted to this module (list it in the \
                 module's `tables`; granted: {})",
                clipped(table, TABLE_NAME_SHOWN),
                self.grants.join(", ")
            ));
        }
        if key.len() > MAX_LOOKUP_KEY_BYTES {
            return Err(wasmtime::format_err!(
                "lookup: a key of {} bytes is over the limit of {MAX_LOOKUP_KEY_BYTES} bytes",
                key.len()
            ));
        }
        Ok(self
            .tables
            .as_ref()
            .and_then(|t| t.table(table))
            .and_then(|t| t.pairs(key)))
    }
}

/// The `lookup` import: [`State::lookup_in`], charged to the module's fuel (the key before the
/// search, the result after it). Running out traps as fuel does.
fn charged_lookup(
    store: &mut wasmtime::StoreContextMut<'_, State>,
    table: &str,
    key: &str,
) -> wasmtime::Result<Option<Vec<(String, String)>>> {
    let bytes = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
    let key_cost =
        LOOKUP_FUEL_PER_BYTE.saturating_mul(bytes(key.len().min(MAX_LOOKUP_KEY_BYTES + 1)));
    charge(store, LOOKUP_FUEL_PER_CALL.saturating_add(key_cost))?;
    let found = store.data().lookup_in(table, key)?;
    if let Some(pairs) = &found {
        let size: usize = pairs.iter().map(|(k, v)| k.len() + v.len()).sum();
        charge(store, LOOKUP_FUEL_PER_BYTE.saturating_mul(bytes(size)))?;
    }
    Ok(found)
}

/// Takes `fuel` from the store's; when less is left, none is, and the call traps out of fuel.
/// Nothing to take when the engine does not meter fuel.
fn charge(store: &mut wasmtime::StoreContextMut<'_, State>, fuel: u64) -> wasmtime::Result<()> {
    let Ok(left) = store.get_fuel() else {
        return Ok(());
    };
    match left.checked_sub(fuel) {
        Some(rest) => store.set_fuel(rest),
        None => {
            store.set_fuel(0)?;
            Err(Trap::OutOfFuel.into())
        }
    }
}

/// `text` cut to at most `max` bytes (at a character boundary), marked when cut.
fn clipped(text: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if text.len() <= max {
        return text.into();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!(
        "{}… ({} bytes)",
        text.get(..end).unwrap_or_default(),
        text.len()
    )
    .into()
}

/// 0.1.0's host interface: the same `log` and `count`.
impl v0_1::trailhose::transform::host::Host for State {
    fn log(&mut self, level: v0_1::trailhose::transform::host::Level, message: String) {
        use v0_1::trailhose::transform::host::Level as L;
        let level = match level {
            L::Debug => Level::Debug,
            L::Info => Level::Info,
            L::Warn => Level::Warn,
            L::Error => Level::Error,
        };
        bindings::trailhose::transform::host::Host::log(self, level, message);
    }

    fn count(&mut self, name: String, delta: u64) {
        bindings::trailhose::transform::host::Host::count(self, name, delta);
    }
}

/// A guest log line cut to [`LOG_LINE_BYTES`] (at a character boundary), so that one line cannot
/// fill the logs.
fn log_line(message: &str) -> std::borrow::Cow<'_, str> {
    if message.len() <= LOG_LINE_BYTES {
        return message.into();
    }
    let mut end = LOG_LINE_BYTES;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    format!(
        "{}… ({} bytes, cut at {LOG_LINE_BYTES})",
        &message[..end],
        message.len()
    )
    .into()
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
        grants: &[String],
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
            .secure_random(Deterministic::new(RANDOM_BYTES.to_vec()))
            .insecure_random(Deterministic::new(RANDOM_BYTES.to_vec()))
            .insecure_random_seed(0)
            // The host builds the bytes before copying them in: a request may not make it
            // allocate more than the module's whole memory budget.
            .max_random_size(
                u64::try_from(limits.max_memory_bytes)
                    .unwrap_or(u64::MAX)
                    .min(wasmtime_wasi::random::DEFAULT_MAX_SIZE),
            )
            .build();
        let state = State {
            wasi,
            table: ResourceTable::new(),
            limits: Limiter {
                memory_left: limits.max_memory_bytes,
                table_elements_left: MAX_TABLE_ELEMENTS,
            },
            module: module.clone(),
            logs_left: LOGS_PER_CALL,
            counter_names: Vec::new(),
            output,
            held: None,
            tables: None,
            grants: grants.into(),
        };
        let mut store = Store::new(engine, state);
        store.limiter(|s| &mut s.limits);
        // The copy budget for `init`'s result (a refusal message); `process` sets its own.
        store.set_hostcall_fuel(limits.max_output_bytes);
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

    /// The tables `lookup` reads from the next call on (those the module is granted).
    pub fn set_tables(&mut self, tables: Option<&Arc<Lookups>>) {
        let state = self.store.data_mut();
        let same = match (&state.tables, tables) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        };
        if !same {
            state.tables = tables.cloned();
        }
    }

    /// Holds the module's log lines and counters of each call until [`Instance::release_held`].
    pub fn hold_output(&mut self, hold: bool) {
        self.store.data_mut().held = hold.then(Vec::new);
    }

    /// Emits what the module logged and counted during the last call (`emit`), or forgets it.
    pub fn release_held(&mut self, emit: bool) {
        let state = self.store.data_mut();
        let Some(held) = state.held.as_mut() else {
            return;
        };
        let said = std::mem::take(held);
        if !emit {
            return;
        }
        for s in said {
            match s {
                Said::Log(level, message) => metrics::emit(GuestLogged {
                    module: &state.module,
                    level,
                    message: &message,
                }),
                Said::Count(name, delta) => metrics::emit(GuestCounted {
                    module: &state.module,
                    name: &name,
                    delta,
                }),
            }
        }
    }

    /// Runs one batch. An error means the instance must be discarded.
    pub fn process(&mut self, events: &[Event<'_>]) -> Result<Called, CallError> {
        arm(&mut self.store, &self.limits, self.fuel);
        // Wasmtime counts the bytes it copies out of the module as it lifts the result and
        // stops at this budget, before allocating: the result is never copied whole first.
        self.store.set_hostcall_fuel(
            self.limits
                .max_output_bytes
                .saturating_add(events.len().saturating_mul(OUTCOME_OVERHEAD)),
        );
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
    if let Some(held) = &mut data.held {
        held.clear();
    }
}

fn classify(store: &Store<State>, limits: &Limits, e: &wasmtime::Error, during: &str) -> CallError {
    let output = store.data().output.text();
    let trap = e.downcast_ref::<Trap>().copied();
    let message = format!("{e:#}");
    let reason = match trap {
        Some(Trap::OutOfFuel) => FailReason::FuelExhausted,
        Some(Trap::Interrupt) => FailReason::Timeout,
        _ if e.downcast_ref::<LimitReached>().is_some() => FailReason::MemoryLimit,
        // Wasmtime's copy budget (set from max_output_bytes) ran out while lifting the result.
        // So did an import's argument (a log line, a lookup key) while the module ran.
        _ if message.contains("fuel allocated for hostcalls has been exhausted") => {
            FailReason::OutputTooLarge
        }
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
        FailReason::MemoryLimit => match e.downcast_ref::<LimitReached>() {
            Some(l) if l.what == "table" => format!(
                "{during} exceeded the table limit ({MAX_TABLE_ELEMENTS} elements in all tables)"
            ),
            _ => format!(
                "{during} exceeded the memory limit (max_memory_mb = {}, all linear memories together)",
                limits.max_memory_bytes >> 20
            ),
        },
        // With a wasm backtrace, the module was still running: it was an import's argument.
        FailReason::OutputTooLarge if e.downcast_ref::<wasmtime::WasmBacktrace>().is_some() => {
            format!(
                "{during} passed a host call more than max_output_bytes = {} (a log line, a \
                 counter name, or a lookup's table or key; a lookup key may be at most \
                 {MAX_LOOKUP_KEY_BYTES} bytes)",
                limits.max_output_bytes
            )
        }
        FailReason::OutputTooLarge => format!(
            "{during} returned more than max_output_bytes = {} (the copy out of the module stopped there)",
            limits.max_output_bytes
        ),
        FailReason::Panic => format!("{during} panicked: {output}"),
        _ => {
            let first = match trap {
                Some(t) => t.to_string(),
                // The cause, not the "error while executing at wasm backtrace" context.
                None => e.root_cause().to_string(),
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

/// The wall clock frozen at zero: a transform must not depend on time, and time is a side
/// channel.
struct Frozen;

impl HostWallClock for Frozen {
    fn resolution(&self) -> Duration {
        Duration::from_secs(1)
    }
    fn now(&self) -> Duration {
        Duration::ZERO
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

#[cfg(test)]
mod tests {
    use super::bindings::trailhose::transform::host::Host;
    use super::*;

    #[test]
    fn held_counts_stay_one_per_name_however_often_a_module_counts() {
        let mut state = State {
            wasi: WasiCtxBuilder::new().build(),
            table: ResourceTable::new(),
            limits: Limiter {
                memory_left: 0,
                table_elements_left: 0,
            },
            module: "m".into(),
            logs_left: LOGS_PER_CALL,
            counter_names: Vec::new(),
            output: Tail(Arc::default()),
            held: Some(Vec::new()),
            tables: None,
            grants: Arc::from([]),
        };
        for i in 0..100_000u64 {
            state.count(format!("c{}", i % 3), 2);
        }
        let held = state.held.unwrap_or_default();
        assert_eq!(held.len(), 3, "bounded by the names, not the calls");
        for s in held {
            assert!(matches!(s, Said::Count(_, d) if d == 2 * 100_000 / 3 || d == 2 * 33_334));
        }
    }
}
