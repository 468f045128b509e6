//! Log lines a guest can cause, rate-limited: a guest that repeats a bad
//! access must not flood the VMM's log (or, with a FIFO log, the host). Each
//! source gets a [`LogLimiter`]: its first lines are logged, then one per
//! interval carrying how many were suppressed; what happened is counted in
//! the metrics, not the log. [`guest_log!`] takes a limiter (one per
//! device, say); [`guest_log_here!`] has one per call site.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lines logged before the limit applies.
const BURST: u32 = 10;
/// At most one line per interval once the burst is spent.
const INTERVAL: Duration = Duration::from_secs(5);

#[derive(Debug, Default)]
struct LimiterState {
    logged: u32,
    last_logged: Option<Instant>,
    suppressed: u64,
}

/// Decides which of a source's lines are logged.
#[derive(Debug, Default)]
pub struct LogLimiter {
    state: Mutex<LimiterState>,
}

impl LogLimiter {
    pub const fn new() -> Self {
        Self {
            state: Mutex::new(LimiterState {
                logged: 0,
                last_logged: None,
                suppressed: 0,
            }),
        }
    }

    /// Counts one line; `Some(n)` if it is to be logged, `n` being how many
    /// were suppressed since the last logged one.
    pub fn admit(&self) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let due = state.logged < BURST
            || state
                .last_logged
                .is_none_or(|last| now.duration_since(last) >= INTERVAL);
        if !due {
            state.suppressed += 1;
            return None;
        }
        state.logged = state.logged.saturating_add(1);
        state.last_logged = Some(now);
        Some(std::mem::take(&mut state.suppressed))
    }
}

/// Logs through a [`LogLimiter`]:
/// `guest_log!(limiter, log::Level::Warn, "bad {thing}")`.
#[macro_export]
macro_rules! guest_log {
    ($limiter:expr, $level:expr, $($arg:tt)+) => {
        match $limiter.admit() {
            Some(0) => log::log!($level, $($arg)+),
            Some(suppressed) => log::log!(
                $level,
                "{} ({suppressed} more suppressed)",
                format_args!($($arg)+)
            ),
            None => {}
        }
    };
}

/// Logs through a [`LogLimiter`] of the call site's own:
/// `guest_log_here!(log::Level::Warn, "bad {thing}")`.
#[macro_export]
macro_rules! guest_log_here {
    ($level:expr, $($arg:tt)+) => {{
        static LIMITER: $crate::guest_log::LogLimiter = $crate::guest_log::LogLimiter::new();
        $crate::guest_log!(LIMITER, $level, $($arg)+)
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_burst_is_logged_then_the_rest_is_suppressed() {
        let limiter = LogLimiter::new();
        for _ in 0..BURST {
            assert_eq!(limiter.admit(), Some(0));
        }
        assert!((0..1000).all(|_| limiter.admit().is_none()));
    }
}
