//! `PUT /serial`: where the guest console goes.

use std::os::unix::fs::FileTypeExt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::host_file::kind_of;

/// Errors in `serial`.
#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    #[error("serial_out_path {path}: the directory {dir} does not exist")]
    MissingDirectory { path: String, dir: String },
    #[error("serial_out_path {path} is {kind}; use a regular file, a FIFO or a character device")]
    Kind { path: String, kind: &'static str },
}

/// The `serial` resource.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SerialConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial_out_path: Option<String>,
    /// Refused unless it limits nothing: output rate limiting is not built
    /// yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<serde_json::Value>,
}

impl SerialConfig {
    /// Checks that the output path can be created or written: its
    /// directory exists and it is not a directory or a socket. The file is
    /// opened at start, when a FIFO's reader is expected to be there.
    pub fn validate(&self) -> Result<(), SerialError> {
        let Some(path) = &self.serial_out_path else {
            return Ok(());
        };
        let dir = match Path::new(path).parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        if !dir.is_dir() {
            return Err(SerialError::MissingDirectory {
                path: path.clone(),
                dir: dir.display().to_string(),
            });
        }
        if let Ok(metadata) = std::fs::metadata(path) {
            let file_type = metadata.file_type();
            if !(file_type.is_file() || file_type.is_fifo() || file_type.is_char_device()) {
                return Err(SerialError::Kind {
                    path: path.clone(),
                    kind: kind_of(file_type),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serial(path: &str) -> SerialConfig {
        SerialConfig {
            serial_out_path: Some(path.into()),
            rate_limiter: None,
        }
    }

    #[test]
    fn output_paths_are_checked_when_set() {
        assert!(serial("/dev/null").validate().is_ok());
        assert!(serial("/tmp/tessera-serial-out.log").validate().is_ok());
        assert_eq!(
            serial("/no/such/dir/out.log")
                .validate()
                .unwrap_err()
                .to_string(),
            "serial_out_path /no/such/dir/out.log: the directory /no/such/dir does not exist"
        );
        assert_eq!(
            serial("/tmp").validate().unwrap_err().to_string(),
            "serial_out_path /tmp is a directory; use a regular file, a FIFO or a character device"
        );
    }
}
