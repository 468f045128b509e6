//! Rate limiters with Firecracker's semantics, for every device that has
//! one (the entropy device in the VMM, drives and interfaces in their
//! backends): the configuration the API takes ([`RateLimiterConfig`]), the
//! token bucket ([`TokenBucket`]) and the limiter a device consumes from
//! ([`RateLimiter`], shared by a backend's workers as [`SharedLimiter`]), whose timerfd wakes the device's event loop once the
//! tokens it lacked have come, so that a throttled queue sleeps instead of
//! spinning.

mod bucket;
mod config;
mod limiter;
mod shared;

pub use bucket::{Reduction, TokenBucket};
pub use config::{RateLimiterConfig, TokenBucketConfig};
pub use limiter::{RateLimiter, TokenType};
pub use shared::{Charged, SharedLimiter};
