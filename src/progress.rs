//! A one-line progress display for long `process` and `backfill` runs, drawn on stderr only when
//! stderr is a terminal. It reads the metrics counters, so no stage reports to it; log lines
//! clear it first (see [`LogWriter`]) and it is redrawn on the next tick.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Whether a progress line may be on screen: log output must clear it before writing.
static ACTIVE: AtomicBool = AtomicBool::new(false);
/// The run's totals, set by the job once it has listed its inputs (`UNKNOWN` until then).
static TOTAL_FILES: AtomicU64 = AtomicU64::new(UNKNOWN);
static TOTAL_BYTES: AtomicU64 = AtomicU64::new(UNKNOWN);
const UNKNOWN: u64 = u64::MAX;
const CLEAR: &[u8] = b"\r\x1b[2K";
const TICK: Duration = Duration::from_millis(250);

/// What the run has done so far, from the metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Done {
    pub files: u64,
    pub events: u64,
    pub bytes: u64,
}

/// What the run will do in all, when known before it starts.
#[derive(Debug, Clone, Copy, Default)]
pub struct Total {
    pub files: Option<u64>,
    pub bytes: Option<u64>,
}

/// Whether a progress line is being drawn: totals that cost I/O are worth finding only then.
pub fn drawn() -> bool {
    ACTIVE.load(Ordering::SeqCst)
}

/// Called by a job once it knows how much it will do; the display picks it up on its next tick.
pub fn set_total(total: Total) {
    TOTAL_FILES.store(total.files.unwrap_or(UNKNOWN), Ordering::Relaxed);
    TOTAL_BYTES.store(total.bytes.unwrap_or(UNKNOWN), Ordering::Relaxed);
}

fn total() -> Total {
    let known = |v: u64| (v != UNKNOWN).then_some(v);
    Total {
        files: known(TOTAL_FILES.load(Ordering::Relaxed)),
        bytes: known(TOTAL_BYTES.load(Ordering::Relaxed)),
    }
}

/// The line for one moment of a run. ETA from bytes when the total is known (files vary in
/// size by orders of magnitude), else from files.
pub fn render(done: Done, total: Total, elapsed: Duration) -> String {
    let secs = elapsed.as_secs_f64();
    let rate = if secs > 0.0 {
        done.events as f64 / secs
    } else {
        0.0
    };
    let files = match total.files {
        Some(t) => format!("{}/{t} files", done.files),
        None => format!("{} files", done.files),
    };
    let fraction = match (total.bytes, total.files) {
        (Some(t), _) if t > 0 => Some(done.bytes as f64 / t as f64),
        (_, Some(t)) if t > 0 => Some(done.files as f64 / t as f64),
        _ => None,
    };
    let eta = match fraction {
        Some(f) if f > 0.0 && f < 1.0 && secs > 0.0 => {
            format!(", ETA {}", clock(secs * (1.0 - f) / f))
        }
        _ => String::new(),
    };
    format!(
        "{files}, {} events, {} events/s, {} elapsed{eta}",
        done.events,
        human(rate),
        clock(secs)
    )
}

fn human(x: f64) -> String {
    if x >= 1e6 {
        format!("{:.1}M", x / 1e6)
    } else if x >= 1e4 {
        format!("{:.0}k", x / 1e3)
    } else {
        format!("{x:.0}")
    }
}

fn clock(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, s % 3600 / 60)
    } else {
        format!("{}m{:02}s", s / 60, s % 60)
    }
}

/// The running display (none when not drawn); dropping it clears the line.
pub struct Progress(Option<(mpsc::Sender<()>, JoinHandle<()>)>);

impl Progress {
    /// Starts drawing when stderr is a terminal and `quiet` is off; otherwise does nothing.
    pub fn start(quiet: bool) -> Progress {
        if quiet || !std::io::stderr().is_terminal() {
            return Progress(None);
        }
        let (tx, rx) = mpsc::channel::<()>();
        let started = Instant::now();
        // Set before the thread runs, so a job that asks `drawn()` right after start sees it.
        ACTIVE.store(true, Ordering::SeqCst);
        let thread = std::thread::Builder::new()
            .name("progress".into())
            .spawn(move || {
                // Drawn at once, so even a short run shows the line, then every tick.
                loop {
                    let line = render(crate::metrics::progress(), total(), started.elapsed());
                    let mut err = std::io::stderr().lock();
                    let _ = err.write_all(CLEAR);
                    let _ = err.write_all(line.as_bytes());
                    let _ = err.flush();
                    drop(err);
                    if !matches!(rx.recv_timeout(TICK), Err(mpsc::RecvTimeoutError::Timeout)) {
                        break;
                    }
                }
                ACTIVE.store(false, Ordering::SeqCst);
                let _ = std::io::stderr().lock().write_all(CLEAR);
            })
            .ok();
        if thread.is_none() {
            ACTIVE.store(false, Ordering::SeqCst);
        }
        Progress(thread.map(|t| (tx, t)))
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some((stop, thread)) = self.0.take() {
            drop(stop);
            let _ = thread.join();
        }
    }
}

/// Stderr for the log subscriber: clears a drawn progress line before each log line.
pub struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut err = std::io::stderr().lock();
        if ACTIVE.load(Ordering::SeqCst) {
            err.write_all(CLEAR)?;
        }
        err.write_all(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_shows_files_rate_and_an_eta_from_bytes() {
        let done = Done {
            files: 3,
            events: 50_000,
            bytes: 250,
        };
        let total = Total {
            files: Some(10),
            bytes: Some(1000),
        };
        let line = render(done, total, Duration::from_secs(10));
        // A quarter of the bytes in 10 s: 30 s to go, though 30% of the files are done.
        assert_eq!(
            line,
            "3/10 files, 50000 events, 5000 events/s, 0m10s elapsed, ETA 0m30s"
        );
    }

    #[test]
    fn without_totals_there_is_no_eta_and_nothing_divides_by_zero() {
        let line = render(Done::default(), Total::default(), Duration::ZERO);
        assert_eq!(line, "0 files, 0 events, 0 events/s, 0m00s elapsed");
        let line = render(
            Done {
                files: 5,
                events: 2_500_000,
                bytes: 0,
            },
            Total {
                files: Some(0),
                bytes: Some(0),
            },
            Duration::from_secs(4000),
        );
        assert_eq!(
            line,
            "5/0 files, 2500000 events, 625 events/s, 1h06m elapsed"
        );
    }

    #[test]
    fn rates_are_short() {
        assert_eq!(human(12.4), "12");
        assert_eq!(human(45_300.0), "45k");
        assert_eq!(human(2_340_000.0), "2.3M");
    }
}
