//! `PUT /vsock`: the guest's vsock device and the host's Unix socket
//! (Firecracker's hybrid vsock).

use serde::{Deserialize, Serialize};
use tessera_types::GuestCid;

/// The longest `uds_path`: a socket address holds 107 bytes, and guest
/// connections go to `<uds_path>_<port>` (up to 11 more).
pub const MAX_UDS_PATH_LEN: usize = 107 - 11;

/// Errors in `vsock`.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("uds_path {0:?} is empty or longer than {MAX_UDS_PATH_LEN} bytes")]
    PathLength(String),
    #[error("uds_path {path}: the directory {dir} does not exist")]
    MissingDirectory { path: String, dir: String },
}

/// The `vsock` resource.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct VsockDeviceConfig {
    /// Deprecated by Firecracker; accepted and shown back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_id: Option<String>,
    pub guest_cid: GuestCid,
    /// Where host processes connect (`CONNECT <port>`); guest connections
    /// to host port P go to `<uds_path>_P`.
    pub uds_path: String,
    /// Tessera addition: an external vhost-user-vsock backend's socket.
    /// That backend serves `uds_path` itself (it was started with it), so
    /// the VMM neither binds nor checks it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<String>,
}

impl VsockDeviceConfig {
    /// Checks that the socket can be created: a short enough path in a
    /// directory that exists.
    pub fn validate(&self) -> Result<(), VsockError> {
        if self.socket.is_some() {
            return Ok(());
        }
        let path = &self.uds_path;
        if path.is_empty() || path.len() > MAX_UDS_PATH_LEN {
            return Err(VsockError::PathLength(path.clone()));
        }
        let dir = match std::path::Path::new(path).parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => std::path::Path::new("."),
        };
        if !dir.is_dir() {
            return Err(VsockError::MissingDirectory {
                path: path.clone(),
                dir: dir.display().to_string(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<VsockDeviceConfig, String> {
        serde_json::from_str(json).map_err(|e| e.to_string())
    }

    #[test]
    fn firecracker_bodies_parse() {
        let config =
            parse(r#"{"vsock_id": "vsock0", "guest_cid": 3, "uds_path": "/tmp/v.sock"}"#).unwrap();
        assert_eq!(config.guest_cid.get(), 3);
        config.validate().unwrap();
        let config = parse(r#"{"guest_cid": 52, "uds_path": "v.sock"}"#).unwrap();
        assert_eq!(config.vsock_id, None);
        config.validate().unwrap();
    }

    #[test]
    fn bad_bodies_name_the_value() {
        let err = parse(r#"{"guest_cid": 2, "uds_path": "/tmp/v.sock"}"#).unwrap_err();
        assert!(err.starts_with("invalid guest CID \"2\""), "{err}");
        assert!(parse(r#"{"guest_cid": 3}"#)
            .unwrap_err()
            .contains("uds_path"));
        assert!(parse(r#"{"guest_cid": 3, "uds_path": "/v", "x": 1}"#)
            .unwrap_err()
            .contains("unknown field `x`"));
        let long = format!(
            r#"{{"guest_cid": 3, "uds_path": "/tmp/{}"}}"#,
            "a".repeat(100)
        );
        assert!(parse(&long).unwrap().validate().is_err());
        let missing = parse(r#"{"guest_cid": 3, "uds_path": "/no/such/dir/v.sock"}"#).unwrap();
        assert_eq!(
            missing.validate().unwrap_err().to_string(),
            "uds_path /no/such/dir/v.sock: the directory /no/such/dir does not exist"
        );
    }
}
