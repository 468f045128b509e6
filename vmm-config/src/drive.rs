//! `drives`: block devices. They are validated and kept here; each is
//! served by a `vhost-user-blk` backend process once block support lands.

use std::path::Path;
use tessera_rate_limiter::RateLimiterConfig;

use serde::{Deserialize, Serialize};

use crate::host_file::{check_disk, HostFileError};
use crate::is_valid_id;

/// Errors in a drive.
#[derive(Debug, thiserror::Error)]
pub enum DriveError {
    #[error("drive_id {0:?} is invalid: use 1-64 characters of [A-Za-z0-9_-]")]
    InvalidId(String),
    #[error("drive {id:?}: give exactly one of path_on_host and socket")]
    Backing { id: String },
    #[error("drive {id:?}: path_on_host {path} {source}")]
    Path {
        id: String,
        path: String,
        source: HostFileError,
    },
    #[error("drive {id:?}: socket {path} cannot be used: {reason}")]
    Socket {
        id: String,
        path: String,
        reason: String,
    },
    #[error("drive {0:?} is already the root device")]
    SecondRootDevice(String),
}

/// Page-cache policy of a drive.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
pub enum CacheType {
    #[default]
    Unsafe,
    Writeback,
}

/// I/O engine of a drive.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
pub enum IoEngine {
    #[default]
    Sync,
    Async,
}

/// One entry of `drives`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BlockDeviceConfig {
    pub drive_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_on_host: Option<String>,
    pub is_root_device: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub is_read_only: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partuuid: Option<String>,
    #[serde(default)]
    pub cache_type: CacheType,
    #[serde(default)]
    pub io_engine: IoEngine,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiterConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<String>,
}

impl BlockDeviceConfig {
    /// Checks the id and that the backing file is a regular file or a
    /// block device that opens with the access the drive needs.
    pub fn validate(&self) -> Result<(), DriveError> {
        if !is_valid_id(&self.drive_id) {
            return Err(DriveError::InvalidId(self.drive_id.clone()));
        }
        match (&self.path_on_host, &self.socket) {
            (Some(path), None) => {
                let read_only = self.is_read_only.unwrap_or(false);
                check_disk(Path::new(path), read_only).map_err(|source| DriveError::Path {
                    id: self.drive_id.clone(),
                    path: path.clone(),
                    source,
                })?;
                Ok(())
            }
            (None, Some(socket)) => {
                use std::os::unix::fs::FileTypeExt;
                let meta = std::fs::metadata(socket).map_err(|source| DriveError::Socket {
                    id: self.drive_id.clone(),
                    path: socket.clone(),
                    reason: source.to_string(),
                })?;
                if !meta.file_type().is_socket() {
                    return Err(DriveError::Socket {
                        id: self.drive_id.clone(),
                        path: socket.clone(),
                        reason: "it is not a Unix socket".into(),
                    });
                }
                Ok(())
            }
            _ => Err(DriveError::Backing {
                id: self.drive_id.clone(),
            }),
        }
    }
}

/// `PATCH /drives/{id}`: a new backing file or rate limiter.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BlockDeviceUpdate {
    pub drive_id: String,
    #[serde(default)]
    pub path_on_host: Option<String>,
    #[serde(default)]
    pub rate_limiter: Option<RateLimiterConfig>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drive(id: &str, path: Option<&str>, socket: Option<&str>) -> BlockDeviceConfig {
        BlockDeviceConfig {
            drive_id: id.into(),
            path_on_host: path.map(Into::into),
            is_root_device: false,
            is_read_only: None,
            partuuid: None,
            cache_type: CacheType::Unsafe,
            io_engine: IoEngine::Sync,
            rate_limiter: None,
            socket: socket.map(Into::into),
        }
    }

    #[test]
    fn validation() {
        let dir = std::env::temp_dir().join(format!("tessera-drive-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let image = dir.join("disk.img");
        std::fs::write(&image, [0; 512]).unwrap();
        assert!(drive("root", image.to_str(), None).validate().is_ok());
        let sock = dir.join("blk.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        assert!(drive("root", None, sock.to_str()).validate().is_ok());
        for (path, kind) in [
            ("/dev/null", "a character device"),
            (dir.to_str().unwrap(), "a directory"),
            (sock.to_str().unwrap(), "a Unix socket"),
        ] {
            assert_eq!(
                drive("d", Some(path), None).validate().unwrap_err().to_string(),
                format!(
                    "drive \"d\": path_on_host {path} is {kind}, not a regular file or a block device"
                )
            );
        }
        assert!(matches!(
            drive("root", None, Some("/dev/null")).validate(),
            Err(DriveError::Socket { .. })
        ));
        assert!(matches!(
            drive("root", None, Some("/no/such.sock")).validate(),
            Err(DriveError::Socket { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(matches!(
            drive("bad id", Some("/dev/null"), None).validate(),
            Err(DriveError::InvalidId(_))
        ));
        assert!(matches!(
            drive("d", None, None).validate(),
            Err(DriveError::Backing { .. })
        ));
        let err = drive("d", Some("/no/such/file"), None)
            .validate()
            .unwrap_err()
            .to_string();
        assert!(err.contains("/no/such/file"), "{err}");
    }
}
