//! A device's limiter: a bandwidth bucket and an operations bucket, and a
//! timerfd. When a request finds a bucket short, the limiter blocks and
//! arms the timer for the moment the tokens will be there; the device
//! stops taking requests and waits for the timer in its event loop (never
//! spinning), then calls [`RateLimiter::on_timer`] and goes on.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use vmm_sys_util::timerfd::TimerFd;

use crate::{RateLimiterConfig, Reduction, TokenBucket, TokenBucketConfig};

/// The shortest wait armed: shorter ones cost more wake-ups than they
/// gain in accuracy.
const MIN_WAIT: Duration = Duration::from_millis(1);

/// What a request spends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenType {
    Bytes,
    Ops,
}

/// The limiter of one device (or queue).
pub struct RateLimiter {
    bandwidth: Option<TokenBucket>,
    ops: Option<TokenBucket>,
    timer: TimerFd,
    blocked: bool,
    /// Requests that found a bucket short.
    throttled: u64,
}

impl std::fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimiter")
            .field("bandwidth", &self.bandwidth)
            .field("ops", &self.ops)
            .field("blocked", &self.blocked)
            .finish()
    }
}

impl RateLimiter {
    /// A limiter with `config`'s buckets. The timerfd is made even if
    /// nothing is limited, so that an update can limit later without a
    /// syscall the device's seccomp filter may not allow.
    pub fn new(config: &RateLimiterConfig) -> io::Result<Self> {
        let now = Instant::now();
        let bucket =
            |c: &Option<TokenBucketConfig>| c.as_ref().and_then(|c| TokenBucket::new(c, now));
        let timer = TimerFd::new()?;
        set_nonblocking(&timer)?;
        Ok(RateLimiter {
            bandwidth: bucket(&config.bandwidth),
            ops: bucket(&config.ops),
            timer,
            blocked: false,
            throttled: 0,
        })
    }

    fn bucket(&mut self, kind: TokenType) -> Option<&mut TokenBucket> {
        match kind {
            TokenType::Bytes => self.bandwidth.as_mut(),
            TokenType::Ops => self.ops.as_mut(),
        }
    }

    fn block_for(&mut self, wait: Duration) {
        // A timer that cannot be armed would leave the device stopped for
        // good: rather let the request through.
        if self.timer.reset(wait.max(MIN_WAIT), None).is_ok() {
            self.blocked = true;
        }
    }

    /// Spends `tokens` of `kind` if the limiter is not blocked and the
    /// bucket has them; otherwise blocks (if it was not) and says no.
    pub fn consume(&mut self, tokens: u64, kind: TokenType) -> bool {
        if self.blocked {
            return false;
        }
        let now = Instant::now();
        let Some(bucket) = self.bucket(kind) else {
            return true;
        };
        match bucket.reduce(tokens, now) {
            Reduction::Done => true,
            Reduction::NotEnough { wait } => {
                self.throttled += 1;
                self.block_for(wait);
                false
            }
            Reduction::Borrowed { wait } => {
                self.block_for(wait);
                true
            }
        }
    }

    /// One request of `bytes`: an operation and its bytes, or neither.
    pub fn consume_request(&mut self, bytes: u64) -> bool {
        if !self.consume(1, TokenType::Ops) {
            return false;
        }
        if !self.consume(bytes, TokenType::Bytes) {
            self.replenish(1, TokenType::Ops);
            return false;
        }
        true
    }

    /// Lets a request of `bytes` go ahead unless the limiter is blocked:
    /// an op and its bytes are spent whatever the buckets hold, and a debt
    /// blocks the next requests until it is paid. Returns false, spending
    /// nothing, while blocked.
    pub fn charge_request(&mut self, bytes: u64) -> bool {
        if self.blocked {
            return false;
        }
        let now = Instant::now();
        let waits = [
            self.ops.as_mut().and_then(|b| b.charge(1, now)),
            self.bandwidth.as_mut().and_then(|b| b.charge(bytes, now)),
        ];
        if let Some(wait) = waits.into_iter().flatten().max() {
            self.throttled += 1;
            self.block_for(wait);
        }
        true
    }

    /// Gives back tokens of a request that did not go ahead.
    pub fn replenish(&mut self, tokens: u64, kind: TokenType) {
        if let Some(bucket) = self.bucket(kind) {
            bucket.replenish(tokens);
        }
    }

    /// Whether requests wait for the timer.
    pub fn is_blocked(&self) -> bool {
        self.blocked
    }

    /// The timer fired (the event loop saw its fd readable): requests go
    /// on.
    pub fn on_timer(&mut self) {
        // Non-blocking: of the threads woken, the one that reads the
        // expiration unblocks; the others find nothing (and the limiter
        // may be blocked anew by then).
        if self.timer.wait().is_ok() {
            self.blocked = false;
        }
    }

    /// Requests that found a bucket short so far.
    pub fn throttled(&self) -> u64 {
        self.throttled
    }

    /// Replaces both buckets with `config`'s (a bucket it lacks limits
    /// nothing): the limits in force, as the VMM tells a backend. A
    /// limiter blocked goes on at its next timer.
    pub fn replace(&mut self, config: &RateLimiterConfig) {
        let now = Instant::now();
        let bucket =
            |c: &Option<TokenBucketConfig>| c.as_ref().and_then(|c| TokenBucket::new(c, now));
        self.bandwidth = bucket(&config.bandwidth);
        self.ops = bucket(&config.ops);
        if self.blocked {
            self.block_for(MIN_WAIT);
        }
    }

    /// Whether any bucket limits.
    pub fn limits_anything(&self) -> bool {
        self.bandwidth.is_some() || self.ops.is_some()
    }
}

/// Several threads may wait on one limiter's timer (a backend's workers):
/// each reads it when woken, and only one finds the expiration; the others
/// must not block.
fn set_nonblocking(timer: &TimerFd) -> io::Result<()> {
    let fd = timer.as_raw_fd();
    // SAFETY: F_GETFL and F_SETFL on a timerfd this limiter owns change only
    // its file status flags.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl AsRawFd for RateLimiter {
    /// The timerfd: readable when a blocked limiter may go on.
    fn as_raw_fd(&self) -> RawFd {
        self.timer.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(json: &str) -> RateLimiter {
        RateLimiter::new(&serde_json::from_str(json).unwrap()).unwrap()
    }

    /// Whether `fd` becomes readable within `timeout_ms`.
    fn readable(fd: RawFd, timeout_ms: i32) -> bool {
        let mut pollfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll on one valid pollfd we own, for at most `timeout_ms`.
        unsafe { libc::poll(&mut pollfd, 1, timeout_ms) == 1 }
    }

    /// Takes `requests` of `bytes` as fast as `l` allows, sleeping on its
    /// timer as a device's event loop does; returns the time taken.
    fn serve_flat_out(l: &mut RateLimiter, requests: u32, bytes: u64) -> Duration {
        let start = Instant::now();
        let mut served = 0;
        while served < requests {
            if l.consume_request(bytes) {
                served += 1;
            } else {
                assert!(readable(l.as_raw_fd(), 5000), "the timer never fired");
                l.on_timer();
            }
        }
        start.elapsed()
    }

    #[test]
    fn a_device_served_flat_out_gets_the_configured_rate() {
        // 8 KiB per 100 ms, starting full: 128 requests of 1 KiB take
        // (128 - 8) * 12.5 ms.
        let mut l = limiter(r#"{"bandwidth": {"size": 8192, "refill_time": 100}}"#);
        let took = serve_flat_out(&mut l, 128, 1024);
        assert!(
            took >= Duration::from_millis(1450) && took <= Duration::from_millis(2000),
            "{took:?}"
        );
        // 10 ops per 100 ms: 64 requests take (64 - 10) * 10 ms.
        let mut l = limiter(r#"{"ops": {"size": 10, "refill_time": 100}}"#);
        let took = serve_flat_out(&mut l, 64, 1024);
        assert!(
            took >= Duration::from_millis(520) && took <= Duration::from_millis(800),
            "{took:?}"
        );
        assert!(l.throttled() >= 54, "{}", l.throttled());
    }

    #[test]
    fn charged_requests_go_through_and_their_debt_holds_the_next_back() {
        let mut l = limiter(r#"{"bandwidth": {"size": 8192, "refill_time": 100}}"#);
        // 128 requests of 1 KiB charged as fast as allowed: the first 8
        // from the full bucket, the rest at 80 KiB/s.
        let start = Instant::now();
        let mut served = 0;
        while served < 128 {
            if l.charge_request(1024) {
                served += 1;
            } else {
                assert!(readable(l.as_raw_fd(), 5000), "the timer never fired");
                l.on_timer();
            }
        }
        // The last request's debt is still being paid when it is taken.
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(1430) && took <= Duration::from_millis(2000),
            "{took:?}"
        );
        assert!(l.is_blocked());
    }

    #[test]
    fn a_replacement_lifts_the_buckets_it_lacks() {
        let mut l = limiter(r#"{"bandwidth": {"size": 100, "refill_time": 1000000}}"#);
        assert!(l.charge_request(1000));
        assert!(l.is_blocked());
        l.replace(&RateLimiterConfig::default());
        assert!(
            readable(l.as_raw_fd(), 1000),
            "a replacement wakes the device"
        );
        l.on_timer();
        assert!(!l.limits_anything());
        assert!(l.charge_request(1 << 30));
        assert!(!l.is_blocked());
    }

    #[test]
    fn nothing_limited_lets_everything_through() {
        let mut l = limiter("{}");
        assert!(!l.limits_anything());
        for _ in 0..1000 {
            assert!(l.consume_request(1 << 20));
        }
        assert!(!l.is_blocked());
    }

    #[test]
    fn a_short_bucket_blocks_until_its_timer_fires() {
        let mut l = limiter(r#"{"ops": {"size": 2, "refill_time": 100}}"#);
        assert!(l.consume_request(4096));
        assert!(l.consume_request(4096));
        let start = Instant::now();
        assert!(!l.consume_request(4096));
        assert!(l.is_blocked());
        assert_eq!(l.throttled(), 1);
        // Blocked: nothing goes through until the timer fires.
        assert!(!l.consume(0, TokenType::Bytes));
        assert!(readable(l.as_raw_fd(), 1000), "the timer never fired");
        let waited = start.elapsed();
        assert!(
            waited >= Duration::from_millis(45) && waited < Duration::from_millis(500),
            "{waited:?} for one op at 2 per 100 ms"
        );
        l.on_timer();
        assert!(!l.is_blocked());
        assert!(l.consume_request(4096));
    }

    #[test]
    fn a_request_short_of_bytes_gives_its_op_back() {
        let mut l = limiter(
            r#"{"bandwidth": {"size": 1000, "refill_time": 1000000},
                "ops": {"size": 2, "refill_time": 1000000}}"#,
        );
        assert!(l.consume_request(800));
        assert!(!l.consume_request(800), "only 200 bytes are left");
        // The refused request's op came back: one of two is left.
        assert_eq!(l.ops.as_ref().map(TokenBucket::budget), Some(1));
    }
}
