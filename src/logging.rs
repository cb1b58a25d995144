//! Log output (tracing) and throttling of repeated messages.
//!
//! Logs go to standard error. Under systemd (`JOURNAL_STREAM` set) lines carry
//! no timestamp of their own, since the journal adds one. Nothing on the data
//! path logs per packet; events that can repeat per connection go through a
//! [`Throttle`] so that a dead pool cannot flood the log.
//!
//! Lines are written by a thread of their own (tracing-appender): a reader
//! of standard error that stalls (a journal under pressure, a full pipe)
//! must not stall the control plane or a worker. Should it stall long
//! enough for 128 000 lines to queue up, further lines are dropped rather
//! than waited for. [`flush`] writes out what is queued before the process
//! ends.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use tracing_appender::non_blocking::{NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::filter::LevelFilter;

use crate::config::{LogFormat, LogLevel};

/// `log.connections`: one line per closed connection. Set once at start.
static CONNECTIONS: AtomicBool = AtomicBool::new(false);

pub fn log_connections() -> bool {
    CONNECTIONS.load(Ordering::Relaxed)
}

/// Keeps the log thread writing until [`flush`].
static WRITER: Mutex<Option<WorkerGuard>> = Mutex::new(None);

/// Installs the global subscriber. Called once, before any worker starts.
pub fn init(level: LogLevel, format: LogFormat, connections: bool) {
    CONNECTIONS.store(connections, Ordering::Relaxed);
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(true)
        .thread_name("sluice-log")
        .finish(std::io::stderr());
    *WRITER.lock().unwrap_or_else(|e| e.into_inner()) = Some(guard);
    let level = match level {
        LogLevel::Error => LevelFilter::ERROR,
        LogLevel::Warn => LevelFilter::WARN,
        LogLevel::Info => LevelFilter::INFO,
        LogLevel::Debug => LevelFilter::DEBUG,
        LogLevel::Trace => LevelFilter::TRACE,
    };
    let under_journal = std::env::var_os("JOURNAL_STREAM").is_some();
    let builder = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(writer)
        .with_ansi(std::io::stderr().is_terminal() && !under_journal)
        .with_target(false);
    match (format, under_journal) {
        (LogFormat::Text, false) => builder.init(),
        (LogFormat::Text, true) => builder.without_time().init(),
        (LogFormat::Json, false) => builder.json().init(),
        (LogFormat::Json, true) => builder.json().without_time().init(),
    }
}

/// Writes out the lines still queued; later lines are lost. Called as the
/// process ends (waits at most a second).
pub fn flush() {
    let guard = WRITER.lock().unwrap_or_else(|e| e.into_inner()).take();
    drop(guard);
}

/// How often a throttled message may be logged.
const THROTTLE_INTERVAL: Duration = Duration::from_secs(1);

/// Lets a message through at most once per second, and counts what it held
/// back so the next line can say how many were suppressed. Lock-free: any
/// worker may call it.
pub struct Throttle {
    /// Milliseconds since [`epoch`] of the last message let through, plus one
    /// (zero: never).
    last: AtomicU64,
    suppressed: AtomicU64,
}

impl Default for Throttle {
    fn default() -> Self {
        Throttle::new()
    }
}

impl Throttle {
    pub const fn new() -> Throttle {
        Throttle {
            last: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(n)` if the message should be logged now, `n` being how many were
    /// held back since the last one; `None` to stay quiet.
    pub fn allow(&self) -> Option<u64> {
        self.allow_at(epoch().elapsed().as_millis() as u64 + 1)
    }

    fn allow_at(&self, now: u64) -> Option<u64> {
        let last = self.last.load(Ordering::Relaxed);
        let due = last == 0 || now.saturating_sub(last) >= THROTTLE_INTERVAL.as_millis() as u64;
        if due
            && self
                .last
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            return Some(self.suppressed.swap(0, Ordering::Relaxed));
        }
        self.suppressed.fetch_add(1, Ordering::Relaxed);
        None
    }
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttle_lets_one_through_and_counts_the_rest() {
        let throttle = Throttle::new();
        assert_eq!(throttle.allow_at(1), Some(0));
        for ms in 2..7 {
            assert_eq!(throttle.allow_at(ms), None);
        }
        assert_eq!(throttle.allow_at(1000), None);
        assert_eq!(throttle.allow_at(1001), Some(6));
        assert_eq!(throttle.allow_at(1002), None);
    }
}
