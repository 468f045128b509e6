//! Rate-limited logging for what a guest can trigger (a refused request, a
//! dropped frame, a broken ring): the first few lines of each
//! [`RateLimit`] go out, then at most one per interval, carrying how many
//! were suppressed since the last one. The backends count every event in
//! their stats; the log only samples them.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lines a limit lets through before it starts suppressing.
pub const BURST: u32 = 10;
/// Once suppressing, one line per this interval.
pub const INTERVAL: Duration = Duration::from_secs(5);

/// One rate limit, shared by the threads that log one kind of event.
#[derive(Debug)]
pub struct RateLimit {
    burst: u32,
    interval: Duration,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    logged: u32,
    last: Option<Instant>,
    suppressed: u64,
}

impl Default for RateLimit {
    fn default() -> Self {
        Self::new(BURST, INTERVAL)
    }
}

impl RateLimit {
    /// A limit letting `burst` lines through, then one per `interval`.
    pub const fn new(burst: u32, interval: Duration) -> Self {
        Self {
            burst,
            interval,
            state: Mutex::new(State {
                logged: 0,
                last: None,
                suppressed: 0,
            }),
        }
    }

    /// Whether a line may go out now; if so, how many were suppressed
    /// before it. Use [`guest_log!`](crate::guest_log) rather than this.
    pub fn admit(&self) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let due = state.logged < self.burst
            || state
                .last
                .is_none_or(|last| now.duration_since(last) >= self.interval);
        if !due {
            state.suppressed += 1;
            return None;
        }
        state.logged = state.logged.saturating_add(1);
        state.last = Some(now);
        Some(std::mem::take(&mut state.suppressed))
    }
}

/// Logs like `log::log!` through a [`RateLimit`]:
/// `guest_log!(&LIMIT, log::Level::Warn, "request {head} refused: {err}")`.
#[macro_export]
macro_rules! guest_log {
    ($limit:expr, $level:expr, $($arg:tt)+) => {
        if let Some(suppressed) = $crate::ratelimit::RateLimit::admit($limit) {
            if suppressed > 0 {
                log::log!($level, "({suppressed} similar lines suppressed)");
            }
            log::log!($level, $($arg)+);
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_goes_out_then_one_line_per_interval_with_the_count() {
        let limit = RateLimit::new(3, Duration::from_millis(200));
        let admitted: Vec<_> = (0..1000).filter_map(|_| limit.admit()).collect();
        assert_eq!(admitted, [0, 0, 0]);
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(limit.admit(), Some(997));
        assert_eq!(limit.admit(), None);
    }
}
