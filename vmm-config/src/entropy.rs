//! `PUT /entropy`: the guest's virtio-rng device and its optional rate
//! limiter, as Firecracker takes it.

use serde::{Deserialize, Serialize};
use tessera_rate_limiter::RateLimiterConfig;

/// The `entropy` resource.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EntropyDeviceConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiterConfig>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn firecrackers_bodies_parse() {
        let plain: EntropyDeviceConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(plain, EntropyDeviceConfig::default());
        let limited: EntropyDeviceConfig = serde_json::from_str(
            r#"{"rate_limiter": {"bandwidth": {"size": 1000, "refill_time": 100}}}"#,
        )
        .unwrap();
        assert!(limited.rate_limiter.unwrap().limits_anything());
        assert!(serde_json::from_str::<EntropyDeviceConfig>(r#"{"rate": {}}"#).is_err());
    }
}
