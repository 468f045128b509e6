//! `/mmds`: the metadata store, with Firecracker's rules: any JSON value
//! is PUT, a PATCH is a JSON merge patch (RFC 7396) onto a store a PUT
//! initialized, and the store, as compact JSON, stays within its limit
//! (`--mmds-size-limit`, by default the API's payload limit); and
//! `/mmds/config`, which interfaces serve the store to the guest, at which
//! address, in which version.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Why the store refused a change (Firecracker's texts).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MmdsError {
    #[error("MMDS error: The MMDS data store is not initialized.")]
    NotInitialized,
    /// Answered 413.
    #[error("MMDS limit exceeded error: The MMDS patch request doesn't fit.")]
    TooLarge,
}

/// Why `PUT /mmds/config` was refused (Firecracker's texts).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MmdsConfigError {
    #[error("The MMDS IPv4 address is not link local.")]
    InvalidIpv4Addr,
    #[error("The list of network interface IDs that allow forwarding MMDS requests is empty.")]
    EmptyNetworkIfaceList,
    #[error(
        "The list of network interface IDs provided contains at least one ID that does not \
         correspond to any existing network interface."
    )]
    InvalidNetworkInterfaceId,
}

/// The MMDS version a guest is served.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum MmdsVersion {
    /// Plain GETs (deprecated by Firecracker, still its default).
    #[default]
    V1,
    /// GETs need a session token from `PUT /latest/api/token`.
    V2,
}

/// The address MMDS answers on unless configured otherwise.
pub const DEFAULT_MMDS_IPV4: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);

/// `PUT /mmds/config` and the config file's `mmds-config`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MmdsConfig {
    #[serde(default)]
    pub version: MmdsVersion,
    /// The interfaces whose guest frames to the address reach MMDS.
    pub network_interfaces: Vec<String>,
    /// A link-local address (169.254.0.0/16, not in its first or last
    /// /24); 169.254.169.254 when absent.
    #[serde(default)]
    pub ipv4_address: Option<Ipv4Addr>,
    /// Answer every GET in the IMDS format, whatever its `Accept`.
    #[serde(default)]
    pub imds_compat: bool,
}

impl MmdsConfig {
    /// Checks the address and that some interface is named, in
    /// Firecracker's order (the names are checked against the interfaces
    /// by whoever holds them).
    pub fn validate(&self) -> Result<(), MmdsConfigError> {
        if !self.ipv4_address.is_none_or(is_valid_link_local) {
            return Err(MmdsConfigError::InvalidIpv4Addr);
        }
        if self.network_interfaces.is_empty() {
            return Err(MmdsConfigError::EmptyNetworkIfaceList);
        }
        Ok(())
    }

    /// The address MMDS answers on.
    pub fn ipv4(&self) -> Ipv4Addr {
        self.ipv4_address.unwrap_or(DEFAULT_MMDS_IPV4)
    }
}

/// RFC 3927: 169.254/16 except its first and last 256 addresses.
fn is_valid_link_local(addr: Ipv4Addr) -> bool {
    let [a, b, c, _] = addr.octets();
    a == 169 && b == 254 && c != 0 && c != 255
}

/// The store's limit without `--mmds-size-limit`: Firecracker's default
/// API payload limit.
pub const DEFAULT_MMDS_SIZE_LIMIT: usize = 51200;

/// The metadata store.
#[derive(Debug, Clone, PartialEq)]
pub struct MmdsStore {
    /// None until the first PUT.
    data: Option<Value>,
    /// The most bytes its compact JSON may take.
    limit: usize,
}

impl Default for MmdsStore {
    fn default() -> Self {
        Self::new(DEFAULT_MMDS_SIZE_LIMIT)
    }
}

impl MmdsStore {
    /// An empty store of at most `limit` bytes.
    pub fn new(limit: usize) -> Self {
        Self { data: None, limit }
    }

    /// Replaces the store with `value`.
    pub fn put(&mut self, value: Value) -> Result<(), MmdsError> {
        self.check_size(&value)?;
        self.data = Some(value);
        Ok(())
    }

    /// Merges `patch` into the store; the store is unchanged if the result
    /// would not fit.
    pub fn patch(&mut self, patch: &Value) -> Result<(), MmdsError> {
        let mut next = self.data.clone().ok_or(MmdsError::NotInitialized)?;
        merge_patch(&mut next, patch);
        self.check_size(&next)?;
        self.data = Some(next);
        Ok(())
    }

    /// The store as the guest sees it: its compact JSON, empty before the
    /// first PUT (the guest then finds nothing).
    pub fn guest_json(&self) -> Vec<u8> {
        match &self.data {
            None => Vec::new(),
            Some(value) => serde_json::to_vec(value).unwrap_or_default(),
        }
    }

    /// Forgets the data (a loaded microVM starts so, as in Firecracker),
    /// keeping the limit.
    pub fn clear(&mut self) {
        self.data = None;
    }

    /// The store (`{}` before the first PUT, or after a PUT of null).
    pub fn get(&self) -> Value {
        match &self.data {
            None | Some(Value::Null) => Value::Object(Default::default()),
            Some(value) => value.clone(),
        }
    }

    fn check_size(&self, value: &Value) -> Result<(), MmdsError> {
        let len = serde_json::to_vec(value).map_or(usize::MAX, |bytes| bytes.len());
        if len > self.limit {
            return Err(MmdsError::TooLarge);
        }
        Ok(())
    }
}

/// RFC 7396: an object patch merges key by key (null removes a key), any
/// other patch replaces the target.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Default::default());
    }
    let Value::Object(target) = target else {
        return;
    };
    for (key, value) in patch {
        if value.is_null() {
            target.remove(key);
        } else {
            merge_patch(target.entry(key.clone()).or_insert(Value::Null), value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_patch_merges_as_rfc_7396_says() {
        let mut store = MmdsStore::new(1 << 20);
        assert_eq!(store.get(), json!({}));
        assert_eq!(
            store.patch(&json!({"a": 1})),
            Err(MmdsError::NotInitialized)
        );
        store
            .put(json!({"a": "b", "c": {"d": "e", "f": "g"}, "list": [1]}))
            .unwrap();
        store
            .patch(&json!({"a": "z", "c": {"f": null}, "list": [2, 3], "new": {"x": 1}}))
            .unwrap();
        assert_eq!(
            store.get(),
            json!({"a": "z", "c": {"d": "e"}, "list": [2, 3], "new": {"x": 1}})
        );
        store.patch(&json!("scalar")).unwrap();
        assert_eq!(store.get(), json!("scalar"));
        store.patch(&json!({"back": true})).unwrap();
        assert_eq!(store.get(), json!({"back": true}));
    }

    #[test]
    fn an_mmds_config_is_checked_in_firecrackers_order() {
        let config = |ip: Option<[u8; 4]>, ifaces: &[&str]| MmdsConfig {
            version: MmdsVersion::V2,
            network_interfaces: ifaces.iter().map(|s| s.to_string()).collect(),
            ipv4_address: ip.map(Ipv4Addr::from),
            imds_compat: false,
        };
        assert_eq!(config(None, &["eth0"]).validate(), Ok(()));
        assert_eq!(config(None, &["eth0"]).ipv4(), DEFAULT_MMDS_IPV4);
        assert_eq!(config(Some([169, 254, 1, 1]), &["eth0"]).validate(), Ok(()));
        for bad in [[169, 254, 0, 1], [169, 254, 255, 1], [10, 0, 0, 1]] {
            assert_eq!(
                config(Some(bad), &[]).validate(),
                Err(MmdsConfigError::InvalidIpv4Addr),
                "{bad:?}"
            );
        }
        assert_eq!(
            config(None, &[]).validate(),
            Err(MmdsConfigError::EmptyNetworkIfaceList)
        );
        let parsed: Result<MmdsConfig, _> =
            serde_json::from_str(r#"{"network_interfaces": ["a"], "other": 1}"#);
        assert!(parsed.is_err(), "unknown fields are refused");
        let parsed: MmdsConfig = serde_json::from_str(r#"{"network_interfaces": ["a"]}"#).unwrap();
        assert_eq!(parsed.version, MmdsVersion::V1);
    }

    #[test]
    fn the_store_stays_within_its_limit() {
        let mut store = MmdsStore::new(20);
        store.put(json!({"k": "0123456789"})).unwrap();
        assert_eq!(store.patch(&json!({"more": "x"})), Err(MmdsError::TooLarge));
        assert_eq!(
            store.get(),
            json!({"k": "0123456789"}),
            "a refused patch changed it"
        );
        assert_eq!(
            store.put(json!("a string longer than twenty")),
            Err(MmdsError::TooLarge)
        );
    }
}
