//! `network-interfaces`: virtio-net devices, each served by a
//! `vhost-user-net` process. They are validated and kept here, including
//! Tessera's `num_queue_pairs` (multi-queue, 1 to [`MAX_QUEUE_PAIRS`]).

use serde::{Deserialize, Serialize};
use tessera_rate_limiter::RateLimiterConfig;

use crate::is_valid_id;

/// Errors in a network interface.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("iface_id {0:?} is invalid: use 1-64 characters of [A-Za-z0-9_-]")]
    InvalidId(String),
    #[error("interface {id:?}: guest_mac {mac:?} is not a MAC address like 06:00:ac:10:00:02")]
    InvalidMac { id: String, mac: String },
    #[error("interface {id:?}: host_dev_name {name:?} is not a valid interface name")]
    InvalidTapName { id: String, name: String },
    #[error("interface {id:?}: give exactly one of host_dev_name and socket")]
    Backing { id: String },
    #[error("guest_mac {0} is already used by interface {1:?}")]
    DuplicateMac(String, String),
    #[error("interface {id:?}: mtu must be between 68 and 65535, got {mtu}")]
    InvalidMtu { id: String, mtu: u32 },
    #[error(
        "interface {id:?}: num_queue_pairs must be between 1 and {MAX_QUEUE_PAIRS}, got {pairs}"
    )]
    InvalidQueuePairs { id: String, pairs: u32 },
}

/// The most queue pairs an interface may have.
pub const MAX_QUEUE_PAIRS: u32 = 8;

/// One entry of `network-interfaces`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterfaceConfig {
    pub iface_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_dev_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_mac: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<RateLimiterConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<RateLimiterConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// Tessera addition: an external vhost-user-net backend's socket,
    /// instead of a TAP device served by a backend that Tessera starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<String>,
    /// Tessera addition: RX/TX queue pairs offered to the guest (default 1).
    /// Above 1, a `host_dev_name` TAP must be multi-queue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_queue_pairs: Option<u32>,
}

/// `PATCH /network-interfaces/{id}`: new rate limiters.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterfaceUpdate {
    pub iface_id: String,
    #[serde(default)]
    pub rx_rate_limiter: Option<RateLimiterConfig>,
    #[serde(default)]
    pub tx_rate_limiter: Option<RateLimiterConfig>,
}

impl NetworkInterfaceConfig {
    /// The queue pairs asked for (`num_queue_pairs`, default 1); in
    /// 1..=[`MAX_QUEUE_PAIRS`] once [`Self::validate`] passed.
    pub fn queue_pairs(&self) -> u16 {
        self.num_queue_pairs
            .and_then(|p| u16::try_from(p).ok())
            .unwrap_or(1)
    }

    /// Checks the id, the TAP name, the MTU, the queue pairs and the MAC
    /// address.
    pub fn validate(&self) -> Result<(), NetError> {
        let id = || self.iface_id.clone();
        if !is_valid_id(&self.iface_id) {
            return Err(NetError::InvalidId(id()));
        }
        match (&self.host_dev_name, &self.socket) {
            (Some(name), None) => {
                if name.parse::<tessera_types::TapName>().is_err() {
                    return Err(NetError::InvalidTapName {
                        id: id(),
                        name: name.clone(),
                    });
                }
            }
            (None, Some(_)) => {}
            _ => return Err(NetError::Backing { id: id() }),
        }
        if let Some(mtu) = self.mtu.filter(|m| !(68..=65535).contains(m)) {
            return Err(NetError::InvalidMtu { id: id(), mtu });
        }
        let pairs = self.num_queue_pairs.unwrap_or(1);
        if !(1..=MAX_QUEUE_PAIRS).contains(&pairs) {
            return Err(NetError::InvalidQueuePairs { id: id(), pairs });
        }
        if let Some(mac) = &self.guest_mac {
            if parse_mac(mac).is_none() {
                return Err(NetError::InvalidMac {
                    id: id(),
                    mac: mac.clone(),
                });
            }
        }
        Ok(())
    }
}

/// Parses `aa:bb:cc:dd:ee:ff` ([`tessera_types::MacAddr`]).
pub fn parse_mac(mac: &str) -> Option<[u8; 6]> {
    mac.parse::<tessera_types::MacAddr>()
        .ok()
        .map(|mac| mac.bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_parsing() {
        assert_eq!(
            parse_mac("06:00:AC:10:00:02"),
            Some([6, 0, 0xac, 0x10, 0, 2])
        );
        assert_eq!(parse_mac("06:00:ac:10:00"), None);
        assert_eq!(parse_mac("06:00:ac:10:00:02:03"), None);
        assert_eq!(parse_mac("6:00:ac:10:00:02"), None);
        assert_eq!(parse_mac("zz:00:ac:10:00:02"), None);
        // u8::from_str_radix takes a sign; a MAC does not.
        assert_eq!(parse_mac("+6:00:ac:10:00:02"), None);
    }

    #[test]
    fn validation() {
        let iface = |tap: &str, mac: &str| NetworkInterfaceConfig {
            iface_id: "eth0".into(),
            host_dev_name: Some(tap.into()),
            guest_mac: Some(mac.into()),
            rx_rate_limiter: None,
            tx_rate_limiter: None,
            mtu: None,
            socket: None,
            num_queue_pairs: None,
        };
        assert!(iface("tap0", "06:00:00:00:00:01").validate().is_ok());
        assert!(matches!(
            iface("tap0", "bad").validate(),
            Err(NetError::InvalidMac { .. })
        ));
        assert!(matches!(
            iface("a-name-that-is-too-long", "06:00:00:00:00:01").validate(),
            Err(NetError::InvalidTapName { .. })
        ));
        let pairs = |n| NetworkInterfaceConfig {
            num_queue_pairs: Some(n),
            ..iface("tap0", "06:00:00:00:00:01")
        };
        assert!(pairs(1).validate().is_ok());
        assert_eq!(pairs(8).queue_pairs(), 8);
        for bad in [0, 9] {
            let err = pairs(bad).validate().unwrap_err().to_string();
            assert_eq!(
                err,
                format!("interface \"eth0\": num_queue_pairs must be between 1 and 8, got {bad}")
            );
        }
    }
}
