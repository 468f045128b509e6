//! The API's rate limiter objects: `{"bandwidth": {...}, "ops": {...}}`,
//! each bucket `{"size", "one_time_burst", "refill_time"}` as Firecracker
//! takes them. A bucket whose `size` or `refill_time` is 0 limits nothing.

use serde::{Deserialize, Serialize};

/// One token bucket: `size` tokens (bytes or operations) refilled over
/// `refill_time` milliseconds, plus `one_time_burst` tokens at the start
/// that do not refill.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenBucketConfig {
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub one_time_burst: Option<u64>,
    pub refill_time: u64,
}

impl TokenBucketConfig {
    /// Whether the bucket limits anything (a zero size or refill time
    /// means unlimited, as in Firecracker).
    pub fn limits(&self) -> bool {
        self.size != 0 && self.refill_time != 0
    }
}

/// A device's limits: bytes per second, operations per second, or both.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimiterConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<TokenBucketConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ops: Option<TokenBucketConfig>,
}

impl RateLimiterConfig {
    /// Whether either bucket limits anything.
    pub fn limits_anything(&self) -> bool {
        self.bandwidth
            .iter()
            .chain(&self.ops)
            .any(TokenBucketConfig::limits)
    }

    /// These limits after Firecracker's update (`PATCH`): a bucket given
    /// replaces this one (one that limits nothing removes it), a bucket
    /// not given stays.
    pub fn updated(&self, update: &RateLimiterConfig) -> RateLimiterConfig {
        let pick = |now: Option<TokenBucketConfig>, new: Option<TokenBucketConfig>| match new {
            Some(bucket) => bucket.limits().then_some(bucket),
            None => now,
        };
        RateLimiterConfig {
            bandwidth: pick(self.bandwidth, update.bandwidth),
            ops: pick(self.ops, update.ops),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn firecrackers_bodies_parse_and_unknown_fields_are_refused() {
        let config: RateLimiterConfig = serde_json::from_str(
            r#"{"bandwidth": {"size": 1000, "one_time_burst": 500, "refill_time": 100},
                "ops": {"size": 10, "refill_time": 1000}}"#,
        )
        .unwrap();
        assert_eq!(
            config.bandwidth,
            Some(TokenBucketConfig {
                size: 1000,
                one_time_burst: Some(500),
                refill_time: 100
            })
        );
        assert!(config.limits_anything());
        assert!(serde_json::from_str::<RateLimiterConfig>(r#"{"bandwith": {}}"#).is_err());
        assert!(
            serde_json::from_str::<RateLimiterConfig>(r#"{"ops": {"size": 1}}"#).is_err(),
            "refill_time is required"
        );
        assert!(serde_json::from_str::<RateLimiterConfig>(
            r#"{"ops": {"size": -1, "refill_time": 1}}"#
        )
        .is_err());
    }

    #[test]
    fn an_update_replaces_the_buckets_it_names_and_keeps_the_others() {
        let now: RateLimiterConfig = serde_json::from_str(
            r#"{"bandwidth": {"size": 1000, "refill_time": 100},
                "ops": {"size": 10, "refill_time": 1000}}"#,
        )
        .unwrap();
        let update: RateLimiterConfig =
            serde_json::from_str(r#"{"ops": {"size": 0, "refill_time": 0}}"#).unwrap();
        let after = now.updated(&update);
        assert_eq!(after.bandwidth, now.bandwidth);
        assert_eq!(after.ops, None);
    }

    #[test]
    fn a_zero_size_or_refill_time_limits_nothing() {
        let config: RateLimiterConfig = serde_json::from_str(
            r#"{"bandwidth": {"size": 0, "refill_time": 100},
                "ops": {"size": 10, "refill_time": 0}}"#,
        )
        .unwrap();
        assert!(!config.limits_anything());
        assert!(!RateLimiterConfig::default().limits_anything());
    }
}
