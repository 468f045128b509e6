//! Live migration, a Tessera extension: `PUT /migration/receive` on a
//! fresh destination, `PUT /migration/send` on the running source,
//! `GET /migration` on either side, `PUT /migration/cancel` on the source.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::snapshot::{DriveOverride, NetworkOverride, VsockOverride};

/// How long the guest may stand still at the end, unless the body says.
pub const DEFAULT_MAX_DOWNTIME_MS: u64 = 300;

/// Where a migration stream goes: `unix:<path>` or `tcp:<address>:<port>`.
/// A TCP peer is named by its IP address: the VMM looks up no names (a
/// jailed one has no `/etc/hosts` or `resolv.conf`, and the resolver would
/// add glibc's NSS code to every VMM's memory).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MigrationUrl {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

/// Errors in a migration body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MigrationUrlError {
    #[error("{0:?} is not unix:<path> or tcp:<IP address>:<port>")]
    Scheme(String),
    #[error("{0:?} has an empty path")]
    EmptyPath(String),
    #[error("{0:?} is not tcp:<IP address>:<port> with a port from 1 to 65535")]
    TcpAddress(String),
}

impl FromStr for MigrationUrl {
    type Err = MigrationUrlError;

    fn from_str(url: &str) -> Result<Self, Self::Err> {
        if let Some(path) = url.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(MigrationUrlError::EmptyPath(url.to_string()));
            }
            return Ok(Self::Unix(PathBuf::from(path)));
        }
        if let Some(addr) = url.strip_prefix("tcp:") {
            return addr
                .parse::<SocketAddr>()
                .ok()
                .filter(|addr| addr.port() != 0)
                .map(Self::Tcp)
                .ok_or_else(|| MigrationUrlError::TcpAddress(url.to_string()));
        }
        Err(MigrationUrlError::Scheme(url.to_string()))
    }
}

impl fmt::Display for MigrationUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unix(path) => write!(f, "unix:{}", path.display()),
            Self::Tcp(addr) => write!(f, "tcp:{addr}"),
        }
    }
}

impl<'de> Deserialize<'de> for MigrationUrl {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let url = String::deserialize(d)?;
        url.parse().map_err(serde::de::Error::custom)
    }
}

/// `PUT /migration/send`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrationSendParams {
    pub destination: MigrationUrl,
    /// The longest the guest may stand still at the end: pre-copy rounds
    /// go on until what is left fits it at the measured bandwidth.
    #[serde(default = "default_max_downtime_ms")]
    pub max_downtime_ms: u64,
    /// Caps the stream's bandwidth (none by default).
    #[serde(default)]
    pub max_bandwidth_mib_s: Option<u64>,
}

fn default_max_downtime_ms() -> u64 {
    DEFAULT_MAX_DOWNTIME_MS
}

/// `PUT /migration/receive`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrationReceiveParams {
    pub listen: MigrationUrl,
    #[serde(default)]
    pub network_overrides: Vec<NetworkOverride>,
    #[serde(default)]
    pub drive_overrides: Vec<DriveOverride>,
    /// The vsock device's host socket here: on the same host the source
    /// still holds its own `uds_path` until the guest runs here.
    #[serde(default)]
    pub vsock_override: Option<VsockOverride>,
}

/// Where a migration is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MigrationPhase {
    /// None has started.
    #[default]
    Idle,
    /// The destination waits for the source, or the source connects.
    Connecting,
    /// Guest memory goes over while the guest runs.
    PreCopy,
    /// The guest is paused: the last pages and the device state go over.
    Downtime,
    /// The guest runs on the destination.
    Completed,
    /// It failed: the source runs the guest on (see `error`).
    Failed,
    /// `PUT /migration/cancel`: the source runs the guest on.
    Cancelled,
}

/// `GET /migration`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct MigrationStatus {
    pub phase: MigrationPhase,
    /// Pre-copy rounds so far (the first sends all of memory).
    pub round: u32,
    pub bytes_sent: u64,
    /// Pages dirtied since they were last sent.
    pub pages_left: u64,
    /// Pages the guest dirtied per second in the last round.
    pub dirty_pages_per_s: u64,
    /// What the pause would take at the measured bandwidth.
    pub expected_downtime_ms: u64,
    /// How long the guest stood still: from the source's pause to the
    /// destination's word that it runs (once completed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub downtime_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_unix_paths_or_tcp_host_and_port() {
        assert_eq!(
            "unix:/run/m.sock".parse(),
            Ok(MigrationUrl::Unix("/run/m.sock".into()))
        );
        assert_eq!(
            "tcp:127.0.0.1:7000".parse(),
            Ok(MigrationUrl::Tcp(([127, 0, 0, 1], 7000).into()))
        );
        assert_eq!(
            "tcp:[::1]:7000".parse(),
            Ok(MigrationUrl::Tcp("[::1]:7000".parse().unwrap()))
        );
        for bad in [
            "unix:",
            "tcp:host",
            "tcp:localhost:7000",
            "tcp::7000",
            "tcp:h:0",
            "tcp:h:70000",
            "http://x",
        ] {
            assert!(bad.parse::<MigrationUrl>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_send_body_has_defaults_and_no_unknown_fields() {
        let send: MigrationSendParams =
            serde_json::from_str(r#"{"destination": "unix:/m.sock"}"#).unwrap();
        assert_eq!(send.max_downtime_ms, DEFAULT_MAX_DOWNTIME_MS);
        assert_eq!(send.max_bandwidth_mib_s, None);
        let err = serde_json::from_str::<MigrationSendParams>(
            r#"{"destination": "unix:/m.sock", "speed": 1}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("speed"), "{err}");
        let err =
            serde_json::from_str::<MigrationSendParams>(r#"{"destination": "ftp:x"}"#).unwrap_err();
        assert!(err.to_string().contains("ftp:x"), "{err}");
    }

    #[test]
    fn a_receive_body_takes_overrides_as_a_load_does() {
        let receive: MigrationReceiveParams = serde_json::from_str(
            r#"{"listen": "tcp:0.0.0.0:7000",
                "network_overrides": [{"iface_id": "eth0", "host_dev_name": "tap1"}],
                "drive_overrides": [{"drive_id": "root", "path_on_host": "/r.img"}],
                "vsock_override": {"uds_path": "/v2.sock"}}"#,
        )
        .unwrap();
        assert_eq!(receive.network_overrides.len(), 1);
        assert_eq!(receive.drive_overrides[0].drive_id, "root");
        assert_eq!(receive.vsock_override.unwrap().uds_path, "/v2.sock");
    }
}
