//! `PUT /snapshot/create` and `PUT /snapshot/load`: Firecracker's bodies,
//! plus Tessera's `drive_overrides` on a load.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// What a snapshot holds of guest memory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotType {
    /// Every page.
    #[default]
    Full,
    /// The pages written since the last snapshot.
    Diff,
}

/// `PUT /snapshot/create`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateSnapshotParams {
    #[serde(default)]
    pub snapshot_type: SnapshotType,
    pub snapshot_path: PathBuf,
    pub mem_file_path: PathBuf,
}

/// How a load finds guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemBackendType {
    /// A memory file a snapshot wrote.
    File,
    /// A page-fault handler listening on a Unix socket.
    Uffd,
}

/// `mem_backend` of a load.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemBackendConfig {
    pub backend_type: MemBackendType,
    pub backend_path: PathBuf,
}

/// A network interface of a snapshot that gets another TAP.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct NetworkOverride {
    pub iface_id: String,
    pub host_dev_name: String,
}

/// The vsock device of a snapshot with another host socket.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct VsockOverride {
    pub uds_path: String,
}

/// Tessera's extension: a drive of a snapshot served from another file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriveOverride {
    pub drive_id: String,
    pub path_on_host: String,
}

/// `PUT /snapshot/load` as sent.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
struct LoadSnapshotBody {
    snapshot_path: PathBuf,
    #[serde(default)]
    mem_file_path: Option<PathBuf>,
    #[serde(default)]
    mem_backend: Option<MemBackendConfig>,
    #[serde(default)]
    enable_diff_snapshots: bool,
    #[serde(default)]
    track_dirty_pages: bool,
    #[serde(default)]
    resume_vm: bool,
    #[serde(default)]
    network_overrides: Vec<NetworkOverride>,
    #[serde(default)]
    vsock_override: Option<VsockOverride>,
    #[serde(default)]
    clock_realtime: bool,
    #[serde(default)]
    drive_overrides: Vec<DriveOverride>,
}

/// `PUT /snapshot/load`, with exactly one memory backend.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "LoadSnapshotBody")]
pub struct LoadSnapshotParams {
    pub snapshot_path: PathBuf,
    pub mem_backend: MemBackendConfig,
    /// `track_dirty_pages`, or the deprecated `enable_diff_snapshots`.
    pub track_dirty_pages: bool,
    pub resume_vm: bool,
    pub network_overrides: Vec<NetworkOverride>,
    pub vsock_override: Option<VsockOverride>,
    pub clock_realtime: bool,
    pub drive_overrides: Vec<DriveOverride>,
}

/// Firecracker's texts for a load body with both or neither memory field.
pub const LOAD_TOO_MANY_FIELDS: &str =
    "too many fields: either `mem_backend` or `mem_file_path` exclusively is required";
pub const LOAD_MISSING_FIELD: &str =
    "missing field: either `mem_backend` or `mem_file_path` is required";

impl TryFrom<LoadSnapshotBody> for LoadSnapshotParams {
    type Error = &'static str;

    fn try_from(body: LoadSnapshotBody) -> Result<Self, Self::Error> {
        let mem_backend = match (body.mem_backend, body.mem_file_path) {
            (Some(_), Some(_)) => return Err(LOAD_TOO_MANY_FIELDS),
            (None, None) => return Err(LOAD_MISSING_FIELD),
            (Some(backend), None) => backend,
            (None, Some(path)) => MemBackendConfig {
                backend_type: MemBackendType::File,
                backend_path: path,
            },
        };
        Ok(Self {
            snapshot_path: body.snapshot_path,
            mem_backend,
            track_dirty_pages: body.track_dirty_pages || body.enable_diff_snapshots,
            resume_vm: body.resume_vm,
            network_overrides: body.network_overrides,
            vsock_override: body.vsock_override,
            clock_realtime: body.clock_realtime,
            drive_overrides: body.drive_overrides,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(body: &str) -> Result<LoadSnapshotParams, String> {
        serde_json::from_str(body).map_err(|e| e.to_string())
    }

    #[test]
    fn a_create_is_full_unless_it_says_diff() {
        let full: CreateSnapshotParams =
            serde_json::from_str(r#"{"snapshot_path": "s", "mem_file_path": "m"}"#).unwrap();
        assert_eq!(full.snapshot_type, SnapshotType::Full);
        let diff: CreateSnapshotParams = serde_json::from_str(
            r#"{"snapshot_type": "Diff", "snapshot_path": "s", "mem_file_path": "m"}"#,
        )
        .unwrap();
        assert_eq!(diff.snapshot_type, SnapshotType::Diff);
        // Firecracker dropped `version` in 1.6 and refuses it since.
        assert!(serde_json::from_str::<CreateSnapshotParams>(
            r#"{"snapshot_path": "s", "mem_file_path": "m", "version": "1.0.0"}"#
        )
        .is_err());
    }

    #[test]
    fn a_load_takes_exactly_one_memory_backend() {
        let by_path = load(r#"{"snapshot_path": "s", "mem_file_path": "m"}"#).unwrap();
        assert_eq!(by_path.mem_backend.backend_type, MemBackendType::File);
        assert_eq!(by_path.mem_backend.backend_path, PathBuf::from("m"));
        let uffd = load(
            r#"{"snapshot_path": "s", "mem_backend": {"backend_type": "Uffd", "backend_path": "u"},
                "resume_vm": true, "enable_diff_snapshots": true}"#,
        )
        .unwrap();
        assert_eq!(uffd.mem_backend.backend_type, MemBackendType::Uffd);
        assert!(uffd.resume_vm && uffd.track_dirty_pages);
        let both = load(
            r#"{"snapshot_path": "s", "mem_file_path": "m",
                "mem_backend": {"backend_type": "File", "backend_path": "m"}}"#,
        )
        .unwrap_err();
        assert!(both.contains(LOAD_TOO_MANY_FIELDS), "{both}");
        let neither = load(r#"{"snapshot_path": "s"}"#).unwrap_err();
        assert!(neither.contains(LOAD_MISSING_FIELD), "{neither}");
    }

    #[test]
    fn a_load_takes_overrides() {
        let params = load(
            r#"{"snapshot_path": "s", "mem_file_path": "m",
                "network_overrides": [{"iface_id": "eth0", "host_dev_name": "tap7"}],
                "vsock_override": {"uds_path": "/v.sock"},
                "drive_overrides": [{"drive_id": "rootfs", "path_on_host": "/clone.ext4"}]}"#,
        )
        .unwrap();
        assert_eq!(params.network_overrides[0].host_dev_name, "tap7");
        assert_eq!(params.vsock_override.unwrap().uds_path, "/v.sock");
        assert_eq!(params.drive_overrides[0].path_on_host, "/clone.ext4");
    }
}
