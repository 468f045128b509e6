//! A token bucket as Firecracker defines one: it starts full, holds at most
//! `size` tokens, refills at `size` per `refill_time` ms, and spends its
//! `one_time_burst` first. A request larger than the bucket goes through
//! once, emptying it, and the tokens it borrowed are waited out after.
//!
//! Unlike Firecracker's, a refill keeps the fraction of a token that the
//! time since the last one was worth, so that a device consuming in small
//! steps gets its configured rate rather than less.

use std::time::{Duration, Instant};

use crate::TokenBucketConfig;

const NS_PER_MS: u128 = 1_000_000;

/// What [`TokenBucket::reduce`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reduction {
    /// The tokens were there and are spent.
    Done,
    /// Not enough tokens: nothing was spent; they will be there after
    /// `wait`.
    NotEnough { wait: Duration },
    /// More tokens than the bucket holds: it is empty now, and the rest
    /// were borrowed, to be paid back over `wait`.
    Borrowed { wait: Duration },
}

/// A bucket of bytes or operations.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    size: u64,
    one_time_burst: u64,
    refill_time_ms: u64,
    budget: u64,
    /// Tokens spent beyond the budget: the next refills pay them back
    /// before the budget grows.
    debt: u64,
    /// Elapsed nanoseconds times `size` not yet turned into a whole token.
    carried: u128,
    last_update: Instant,
}

impl TokenBucket {
    /// A full bucket, or `None` for one that limits nothing.
    pub fn new(config: &TokenBucketConfig, now: Instant) -> Option<Self> {
        config.limits().then(|| TokenBucket {
            size: config.size,
            one_time_burst: config.one_time_burst.unwrap_or(0),
            refill_time_ms: config.refill_time,
            budget: config.size,
            debt: 0,
            carried: 0,
            last_update: now,
        })
    }

    fn refill_ns(&self) -> u128 {
        u128::from(self.refill_time_ms) * NS_PER_MS
    }

    /// Adds the tokens the time since the last update is worth.
    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last_update).as_nanos();
        self.last_update = now;
        let earned = self.carried + elapsed * u128::from(self.size);
        let mut tokens = earned / self.refill_ns();
        self.carried = earned % self.refill_ns();
        let paid = tokens.min(u128::from(self.debt));
        self.debt -= paid as u64;
        tokens -= paid;
        let budget = u128::from(self.budget) + tokens;
        if budget >= u128::from(self.size) {
            self.budget = self.size;
            self.carried = 0;
        } else {
            self.budget = budget as u64;
        }
    }

    /// How long until the bucket holds `tokens` (at most `size`), its
    /// debt paid.
    fn time_until(&self, tokens: u64) -> Duration {
        let missing = u128::from(tokens.saturating_sub(self.budget)) + u128::from(self.debt);
        let owed = (missing * self.refill_ns()).saturating_sub(self.carried);
        nanos(owed.div_ceil(u128::from(self.size)))
    }

    /// Spends `tokens` if the bucket has them (the one-time burst first).
    pub fn reduce(&mut self, tokens: u64, now: Instant) -> Reduction {
        let from_burst = tokens.min(self.one_time_burst);
        self.one_time_burst -= from_burst;
        let tokens = tokens - from_burst;
        self.refill(now);
        if tokens <= self.budget {
            self.budget -= tokens;
            return Reduction::Done;
        }
        if tokens > self.size {
            return Reduction::Borrowed {
                wait: self.owe(tokens),
            };
        }
        // Nothing is spent: give the burst back.
        self.one_time_burst += from_burst;
        Reduction::NotEnough {
            wait: self.time_until(tokens),
        }
    }

    /// Spends `tokens` whatever the bucket holds (the one-time burst
    /// first): what it lacks is owed, and the time the debt takes to refill
    /// is returned. For devices that let a request through and hold the
    /// next ones back (the back-pressure the guest sees).
    pub fn charge(&mut self, tokens: u64, now: Instant) -> Option<Duration> {
        let from_burst = tokens.min(self.one_time_burst);
        self.one_time_burst -= from_burst;
        let tokens = tokens - from_burst;
        self.refill(now);
        if tokens <= self.budget && self.debt == 0 {
            self.budget -= tokens;
            return None;
        }
        Some(self.owe(tokens))
    }

    /// Empties the budget into `tokens` and owes the rest; returns the time
    /// until the debt is paid.
    fn owe(&mut self, tokens: u64) -> Duration {
        self.debt = self.debt.saturating_add(tokens.saturating_sub(self.budget));
        self.budget = 0;
        self.time_until(0)
    }

    /// Gives back tokens spent for a request that did not go ahead.
    pub fn replenish(&mut self, tokens: u64) {
        if self.one_time_burst > 0 {
            self.one_time_burst += tokens;
        } else {
            self.budget = self.budget.saturating_add(tokens).min(self.size);
        }
    }

    /// Tokens in the bucket now (the one-time burst aside).
    pub fn budget(&self) -> u64 {
        self.budget
    }

    /// The one-time burst left.
    pub fn one_time_burst(&self) -> u64 {
        self.one_time_burst
    }
}

fn nanos(ns: u128) -> Duration {
    Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bucket(size: u64, burst: u64, refill_time: u64, now: Instant) -> TokenBucket {
        let config = TokenBucketConfig {
            size,
            one_time_burst: Some(burst),
            refill_time,
        };
        TokenBucket::new(&config, now).unwrap()
    }

    #[test]
    fn a_zero_size_or_refill_time_is_no_bucket() {
        let now = Instant::now();
        for (size, refill_time) in [(0, 100), (100, 0)] {
            let config = TokenBucketConfig {
                size,
                one_time_burst: None,
                refill_time,
            };
            assert!(TokenBucket::new(&config, now).is_none());
        }
    }

    #[test]
    fn it_starts_full_and_refills_at_size_per_refill_time() {
        let t0 = Instant::now();
        let mut b = bucket(1000, 0, 100, t0);
        assert_eq!(b.reduce(1000, t0), Reduction::Done);
        assert_eq!(
            b.reduce(1, t0),
            Reduction::NotEnough {
                wait: Duration::from_micros(100)
            }
        );
        // 50 ms later half the bucket is back.
        let t1 = t0 + Duration::from_millis(50);
        assert_eq!(b.reduce(500, t1), Reduction::Done);
        assert_eq!(b.budget(), 0);
        // Never more than the size.
        let t2 = t1 + Duration::from_secs(10);
        assert_eq!(b.reduce(0, t2), Reduction::Done);
        assert_eq!(b.budget(), 1000);
    }

    #[test]
    fn small_steps_lose_no_fraction_of_a_token() {
        let t0 = Instant::now();
        // 1000 tokens per second: one per millisecond.
        let mut b = bucket(1000, 0, 1000, t0);
        assert_eq!(b.reduce(1000, t0), Reduction::Done);
        let mut spent = 0;
        for step in 1..=10_000u64 {
            // Every 0.3 ms, one token if there is one.
            let now = t0 + Duration::from_micros(300 * step);
            if b.reduce(1, now) == Reduction::Done {
                spent += 1;
            }
        }
        // 3 s at 1000 per second.
        assert_eq!(spent, 3000);
    }

    #[test]
    fn the_one_time_burst_goes_first_and_does_not_refill() {
        let t0 = Instant::now();
        let mut b = bucket(100, 250, 1000, t0);
        assert_eq!(b.reduce(200, t0), Reduction::Done);
        assert_eq!((b.one_time_burst(), b.budget()), (50, 100));
        assert_eq!(b.reduce(120, t0), Reduction::Done);
        assert_eq!((b.one_time_burst(), b.budget()), (0, 30));
        // Not enough: nothing spent.
        assert!(matches!(b.reduce(50, t0), Reduction::NotEnough { .. }));
        assert_eq!(b.budget(), 30);
        let later = t0 + Duration::from_secs(60);
        assert_eq!(b.reduce(0, later), Reduction::Done);
        assert_eq!((b.one_time_burst(), b.budget()), (0, 100));
    }

    #[test]
    fn a_request_larger_than_the_bucket_goes_through_and_is_waited_out() {
        let t0 = Instant::now();
        let mut b = bucket(1000, 0, 100, t0);
        assert_eq!(
            b.reduce(3000, t0),
            Reduction::Borrowed {
                wait: Duration::from_millis(200)
            }
        );
        assert_eq!(b.budget(), 0);
    }

    #[test]
    fn a_debt_is_paid_before_the_budget_grows() {
        let t0 = Instant::now();
        let mut b = bucket(1000, 0, 100, t0);
        assert_eq!(b.charge(3000, t0), Some(Duration::from_millis(200)));
        // 200 ms later the debt is paid and nothing more.
        let t1 = t0 + Duration::from_millis(200);
        assert!(matches!(b.reduce(1, t1), Reduction::NotEnough { .. }));
        let t2 = t1 + Duration::from_millis(50);
        assert_eq!(b.charge(500, t2), None);
        // A charge within the budget owes nothing; past it, the time left.
        assert_eq!(b.charge(100, t2), Some(Duration::from_millis(10)));
    }

    #[test]
    fn replenish_gives_back_up_to_the_size() {
        let t0 = Instant::now();
        let mut b = bucket(10, 0, 1000, t0);
        assert_eq!(b.reduce(8, t0), Reduction::Done);
        b.replenish(5);
        assert_eq!(b.budget(), 7);
        b.replenish(100);
        assert_eq!(b.budget(), 10);
    }
}
