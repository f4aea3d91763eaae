//! A module that misbehaves on purpose, for the host's containment tests. `mode` picks how:
//! - `loop`: spins forever (fuel or the time limit must stop it)
//! - `alloc`: allocates until memory runs out (the memory limit must stop it)
//! - `trap`: aborts (the `unreachable` instruction)
//! - `panic`: panics with a message (the host reports the message from stderr)
//! - `wrong_length`: returns one outcome fewer than events
//! - `huge`: returns a 1 MiB replacement per event (the output limit must stop it)
//! - `bad_json`: replaces each event with bytes that are not JSON
//! - `probe`: tries to read a file, list `/`, read the environment and the clocks, and
//!   annotates each event with what happened
//! - `connect`: opens a TCP connection to `connect` (`host:port`); sockets are not linked
//! - `random`: annotates each event with 16 bytes from `wasi:random` and a `HashMap` seed
//! - `random_huge`: asks `wasi:random` for `len` bytes at once (the host must refuse to
//!   allocate more than the module's memory budget)
//! - `sleep`: sleeps for an hour (timers are not linked: it must trap, not block the worker)
//! - `panic_echo`: panics with the event in the message, as a careless module might
//! - `log_long`: logs one warning of 100 000 bytes, then keeps every event
//! - `log_echo`: logs each event and counts it, then fails it (a `failed` outcome)
//! - `refuse`: refuses its config in `init`
//! - `panic_after`: panics on the batch after `n` events were seen (to test rebuilds)
//! - `lookup_loop`: looks a key of `key_len` bytes up in table `table`, `lookups` times per
//!   batch, then keeps every event (the host charges each lookup to the module's fuel)
//! - `annotate`: adds the member `key` with the JSON text `value` to every event

use std::cell::RefCell;

use trailhose_transform::bindings::{Event, Guest, Member, Outcome, export_world};
use trailhose_transform::{Config, Value};

thread_local! {
    static CONFIG: RefCell<Config> = RefCell::new(Config::default());
    static SEEN: RefCell<u64> = const { RefCell::new(0) };
}

struct Hostile;

impl Guest for Hostile {
    fn init(config: Vec<(String, String)>) -> Result<(), String> {
        let config = Config::new(config);
        if config.get("mode") == Some("refuse") {
            return Err("hostile module refuses every config".to_owned());
        }
        CONFIG.with(|c| *c.borrow_mut() = config);
        Ok(())
    }

    fn process(events: Vec<Event>) -> Vec<Outcome> {
        let config = CONFIG.with(|c| c.borrow().clone());
        match config.get("mode").unwrap_or("") {
            "loop" => {
                let mut n: u64 = 0;
                loop {
                    n = std::hint::black_box(n.wrapping_add(1));
                }
            }
            "alloc" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![1u8; 1 << 20]);
                    std::hint::black_box(&hoard);
                }
            }
            // Aborting is the `unreachable` instruction on wasm: a trap with no message.
            "trap" => std::process::abort(),
            "panic" => panic!("hostile module panicked on purpose"),
            "panic_echo" => {
                let first = events
                    .first()
                    .map(|e| String::from_utf8_lossy(&e.json).into_owned());
                eprintln!("about to fail on {first:?}");
                panic!("cannot handle {first:?}")
            }
            "connect" => {
                let addr = config.get("connect").unwrap_or("127.0.0.1:9");
                let said = match std::net::TcpStream::connect(addr) {
                    Ok(_) => "connected".to_owned(),
                    Err(e) => format!("denied: {e}"),
                };
                events
                    .iter()
                    .map(|_| Outcome::Failed(said.clone()))
                    .collect()
            }
            "log_long" => {
                trailhose_transform::warn(&"y".repeat(100_000));
                events.iter().map(|_| Outcome::Keep).collect()
            }
            "log_echo" => events
                .iter()
                .map(|e| {
                    trailhose_transform::warn(&format!(
                        "failing {}",
                        String::from_utf8_lossy(&e.json)
                    ));
                    trailhose_transform::count("echoed", 1);
                    Outcome::Failed("log_echo fails every event".to_owned())
                })
                .collect(),
            "sleep" => {
                std::thread::sleep(std::time::Duration::from_secs(3600));
                events.iter().map(|_| Outcome::Keep).collect()
            }
            "random" => {
                let bytes = wasi::random::random::get_random_bytes(16);
                let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
                let seed = {
                    use std::hash::BuildHasher;
                    std::collections::hash_map::RandomState::new().hash_one("x")
                };
                let value = serde_json::json!({ "bytes": hex, "hash_seed": seed.to_string() });
                events
                    .iter()
                    .map(|_| {
                        Outcome::Annotate(vec![Member {
                            key: "xrandom".to_owned(),
                            value: value.to_string(),
                        }])
                    })
                    .collect()
            }
            "random_huge" => {
                let len = config.get("len").and_then(|l| l.parse().ok()).unwrap_or(0);
                let bytes = wasi::random::random::get_random_bytes(len);
                std::hint::black_box(&bytes);
                events.iter().map(|_| Outcome::Keep).collect()
            }
            "panic_after" => {
                let limit: u64 = config.get("n").and_then(|n| n.parse().ok()).unwrap_or(0);
                let seen = SEEN.with(|s| {
                    *s.borrow_mut() += events.len() as u64;
                    *s.borrow()
                });
                if seen > limit {
                    panic!("panicking after {limit} events");
                }
                events.iter().map(|_| Outcome::Keep).collect()
            }
            "lookup_loop" => {
                let number = |k: &str| config.get(k).and_then(|n| n.parse().ok()).unwrap_or(0);
                let key = "K".repeat(number("key_len"));
                let table = config.get("table").unwrap_or("t");
                for _ in 0..number("lookups") {
                    std::hint::black_box(trailhose_transform::lookup(table, &key));
                }
                events.iter().map(|_| Outcome::Keep).collect()
            }
            "annotate" => {
                let member = Member {
                    key: config.get("key").unwrap_or("x").to_owned(),
                    value: config.get("value").unwrap_or("null").to_owned(),
                };
                events
                    .iter()
                    .map(|_| Outcome::Annotate(vec![member.clone()]))
                    .collect()
            }
            "wrong_length" => events.iter().skip(1).map(|_| Outcome::Keep).collect(),
            "huge" => {
                let pad = "x".repeat(1 << 20);
                let big = format!("{{\"pad\":\"{pad}\"}}").into_bytes();
                events
                    .iter()
                    .map(|_| Outcome::Replace(big.clone()))
                    .collect()
            }
            "bad_json" => events
                .iter()
                .map(|_| Outcome::Replace(b"{not json".to_vec()))
                .collect(),
            "probe" => {
                let report = probe();
                events
                    .iter()
                    .map(|_| {
                        Outcome::Annotate(vec![Member {
                            key: "xprobe".to_owned(),
                            value: report.to_string(),
                        }])
                    })
                    .collect()
            }
            other => events
                .iter()
                .map(|_| Outcome::Failed(format!("unknown mode {other:?}")))
                .collect(),
        }
    }
}

fn probe() -> Value {
    let read = match std::fs::read("/etc/passwd") {
        Ok(b) => format!("read {} bytes", b.len()),
        Err(e) => format!("denied: {e}"),
    };
    let write = match std::fs::write("/tmp/trailhose-probe", b"x") {
        Ok(()) => "wrote".to_owned(),
        Err(e) => format!("denied: {e}"),
    };
    let list = match std::fs::read_dir("/") {
        Ok(d) => format!("listed {} entries", d.count()),
        Err(e) => format!("denied: {e}"),
    };
    let env = std::env::vars().count();
    let clock = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let started = std::time::Instant::now();
    let mut spin: u64 = 0;
    for i in 0..1_000_000u64 {
        spin = std::hint::black_box(spin.wrapping_add(i));
    }
    let monotonic_nanos = started.elapsed().as_nanos() as u64;
    serde_json::json!({
        "read": read, "write": write, "list": list,
        "env_vars": env, "clock_secs": clock, "monotonic_nanos": monotonic_nanos,
    })
}

export_world!(Hostile with_types_in trailhose_transform::bindings);

/// `wasi:random`, imported directly (std reads it only for hash seeds).
mod wasi {
    wit_bindgen::generate!({
        inline: "
            package wasi:random@0.2.0;
            interface random {
                get-random-bytes: func(len: u64) -> list<u8>;
                get-random-u64: func() -> u64;
            }
            world probe {
                import random;
            }
        ",
        world: "probe",
    });
    pub use self::wasi::*;
}
