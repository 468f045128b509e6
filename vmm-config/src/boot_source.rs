//! `boot-source`: the guest kernel, its command line and the initrd.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::host_file::{open_regular, HostFileError};

/// Firecracker's default command line, used when `boot_args` is absent.
pub const DEFAULT_KERNEL_CMDLINE: &str = "reboot=k panic=1 pci=off nomodule 8250.nr_uarts=0 \
     i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd";

/// Errors in `boot-source`.
#[derive(Debug, thiserror::Error)]
pub enum BootSourceError {
    #[error("the kernel image {path} {source}")]
    KernelImage { path: String, source: HostFileError },
    #[error("the initrd {path} {source}")]
    Initrd { path: String, source: HostFileError },
}

/// The `boot-source` resource.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BootSourceConfig {
    pub kernel_image_path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
}

impl BootSourceConfig {
    /// Checks that the kernel and initrd are regular files that can be
    /// opened, so that a bad path is reported when it is configured, not
    /// at boot.
    pub fn validate(&self) -> Result<(), BootSourceError> {
        open_regular(Path::new(&self.kernel_image_path)).map_err(|source| {
            BootSourceError::KernelImage {
                path: self.kernel_image_path.clone(),
                source,
            }
        })?;
        if let Some(initrd) = &self.initrd_path {
            open_regular(Path::new(initrd)).map_err(|source| BootSourceError::Initrd {
                path: initrd.clone(),
                source,
            })?;
        }
        Ok(())
    }

    /// The command line the guest gets before devices add theirs.
    pub fn cmdline(&self) -> &str {
        self.boot_args.as_deref().unwrap_or(DEFAULT_KERNEL_CMDLINE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_kernel_names_the_path() {
        let cfg = BootSourceConfig {
            kernel_image_path: "/nonexistent/vmlinux".into(),
            ..Default::default()
        };
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("/nonexistent/vmlinux"), "{err}");
    }

    #[test]
    fn directory_is_not_a_kernel() {
        let cfg = BootSourceConfig {
            kernel_image_path: "/".into(),
            ..Default::default()
        };
        assert!(cfg
            .validate()
            .unwrap_err()
            .to_string()
            .contains("directory"));
    }

    #[test]
    fn default_cmdline_when_no_boot_args() {
        let cfg = BootSourceConfig::default();
        assert_eq!(cfg.cmdline(), DEFAULT_KERNEL_CMDLINE);
    }
}
