//! The vsock device's host socket, bound when the device is configured
//! (`PUT /vsock` or the config file) as Firecracker binds it: host clients
//! may connect as soon as the request returns, before the guest boots;
//! their `CONNECT` waits in the backlog until the backend serves it.

use std::fmt;
use std::os::unix::net::UnixListener;
use std::sync::Arc;

use vmm_config::VsockDeviceConfig;

/// Errors binding the host socket, worded as Firecracker's.
#[derive(Debug, thiserror::Error)]
pub enum VsockSocketError {
    #[error("Cannot create backend for vsock device: Error binding to the host-side Unix socket {path}: {source}")]
    Bind {
        path: String,
        source: std::io::Error,
    },
}

/// The configured device and its listening host socket (none with an
/// external backend, which has its own).
#[derive(Clone)]
pub struct VsockResource {
    pub config: VsockDeviceConfig,
    pub listener: Option<Arc<UnixListener>>,
}

impl VsockResource {
    /// Binds `config.uds_path`; `previous` (the device configured before)
    /// keeps its socket if the path is the same.
    pub fn bind(
        config: VsockDeviceConfig,
        previous: Option<&VsockResource>,
    ) -> Result<Self, VsockSocketError> {
        if config.socket.is_some() {
            return Ok(Self {
                config,
                listener: None,
            });
        }
        let same_path = |p: &&VsockResource| p.config.uds_path == config.uds_path;
        if let Some(previous) = previous.filter(same_path).filter(|p| p.listener.is_some()) {
            return Ok(Self {
                config,
                listener: previous.listener.clone(),
            });
        }
        let listener =
            UnixListener::bind(&config.uds_path).map_err(|source| VsockSocketError::Bind {
                path: config.uds_path.clone(),
                source,
            })?;
        if let Some(previous) = previous.filter(|p| p.listener.is_some()) {
            // Its socket was ours: nobody will serve it now.
            let _ = std::fs::remove_file(&previous.config.uds_path);
        }
        Ok(Self {
            config,
            listener: Some(Arc::new(listener)),
        })
    }
}

impl PartialEq for VsockResource {
    fn eq(&self, other: &Self) -> bool {
        let same_listener = match (&self.listener, &other.listener) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (a, b) => a.is_none() && b.is_none(),
        };
        self.config == other.config && same_listener
    }
}

impl fmt::Debug for VsockResource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VsockResource")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    fn config(path: &std::path::Path) -> VsockDeviceConfig {
        serde_json::from_value(serde_json::json!({
            "guest_cid": 3,
            "uds_path": path.display().to_string(),
        }))
        .unwrap()
    }

    #[test]
    fn the_socket_exists_once_configured_and_a_taken_path_is_refused() {
        let dir = std::env::temp_dir().join(format!("tessera-vsock-res-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("v.sock");
        let _ = std::fs::remove_file(&path);
        let first = VsockResource::bind(config(&path), None).unwrap();
        UnixStream::connect(&path).expect("clients can connect before boot");
        let err = VsockResource::bind(config(&path), None)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("Cannot create backend for vsock device: Error binding to the host-side Unix socket"), "{err}");
        assert!(err.contains("in use"), "{err}");
        // The same path again keeps the socket; a new path moves it.
        let again = VsockResource::bind(config(&path), Some(&first)).unwrap();
        assert!(Arc::ptr_eq(
            again.listener.as_ref().unwrap(),
            first.listener.as_ref().unwrap()
        ));
        let moved = dir.join("w.sock");
        let _ = std::fs::remove_file(&moved);
        let _moved_socket = VsockResource::bind(config(&moved), Some(&again)).unwrap();
        assert!(!path.exists());
        UnixStream::connect(&moved).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
