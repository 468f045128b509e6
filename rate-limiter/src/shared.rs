//! A limiter that several worker threads of one backend charge (a drive's
//! queues, or the queue pairs of an interface): the limiter behind a lock,
//! and a flag that spares the lock while nothing is limited. Every
//! worker's epoll waits on its timer; the first woken unblocks it.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};

use crate::{RateLimiter, RateLimiterConfig};

/// What a charge did to the limiter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Charged {
    /// Requests go on.
    Free,
    /// This request left a debt: the next wait for the timer.
    Throttled,
    /// Already blocked: the request must wait (nothing was spent).
    Blocked,
}

/// One limiter shared by a backend's workers.
pub struct SharedLimiter {
    limiter: Mutex<RateLimiter>,
    /// Whether the limiter limits or is blocked; false spares the lock.
    limited: AtomicBool,
}

impl SharedLimiter {
    /// A limiter that limits nothing until [`SharedLimiter::replace`].
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            limiter: Mutex::new(RateLimiter::new(&RateLimiterConfig::default())?),
            limited: AtomicBool::new(false),
        })
    }

    fn lock(&self) -> MutexGuard<'_, RateLimiter> {
        self.limiter.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether requests wait for the timer now.
    pub fn is_blocked(&self) -> bool {
        self.limited.load(Ordering::Acquire) && self.lock().is_blocked()
    }

    /// Charges a request of `bytes` that goes ahead unless the limiter is
    /// blocked (see [`RateLimiter::charge_request`]).
    pub fn charge(&self, bytes: u64) -> Charged {
        if !self.limited.load(Ordering::Acquire) {
            return Charged::Free;
        }
        let mut limiter = self.lock();
        let before = limiter.throttled();
        if !limiter.charge_request(bytes) {
            return Charged::Blocked;
        }
        if limiter.throttled() > before {
            Charged::Throttled
        } else {
            Charged::Free
        }
    }

    /// The limits now in force (a bucket `limits` lacks limits nothing).
    /// A blocked limiter stays so until its timer, which the workers wait
    /// for rather than lose the wake-up.
    pub fn replace(&self, limits: &RateLimiterConfig) {
        let mut limiter = self.lock();
        limiter.replace(limits);
        self.limited.store(
            limits.limits_anything() || limiter.is_blocked(),
            Ordering::Release,
        );
    }

    /// The timer woke a worker: requests go on if it read the expiration.
    pub fn on_timer(&self) {
        let mut limiter = self.lock();
        limiter.on_timer();
        if !limiter.limits_anything() && !limiter.is_blocked() {
            self.limited.store(false, Ordering::Release);
        }
    }
}

impl AsRawFd for SharedLimiter {
    /// The timerfd, for each worker's epoll (edge-triggered: each worker
    /// is woken once per expiration).
    fn as_raw_fd(&self) -> RawFd {
        self.lock().as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_is_charged_until_limits_come_and_a_debt_blocks_the_next() {
        let shared = SharedLimiter::new().unwrap();
        assert_eq!(shared.charge(1 << 40), Charged::Free);
        shared.replace(
            &serde_json::from_str(r#"{"bandwidth": {"size": 1000, "refill_time": 100000}}"#)
                .unwrap(),
        );
        assert_eq!(shared.charge(600), Charged::Free);
        assert_eq!(shared.charge(600), Charged::Throttled);
        assert!(shared.is_blocked());
        assert_eq!(shared.charge(1), Charged::Blocked);
        shared.replace(&RateLimiterConfig::default());
        // The wake-up the workers wait for comes at the next timer.
        assert!(shared.is_blocked());
        std::thread::sleep(std::time::Duration::from_millis(20));
        shared.on_timer();
        assert!(!shared.is_blocked());
        assert_eq!(shared.charge(1 << 40), Charged::Free);
    }
}
