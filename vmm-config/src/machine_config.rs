//! `machine-config`: vCPU count, memory size and SMT.

use serde::{Deserialize, Serialize};

/// The most vCPUs a Tessera guest can have (Firecracker's limit too).
pub const MAX_SUPPORTED_VCPUS: u8 = 32;
/// The smallest guest memory that the boot layout fits in.
pub const MIN_MEM_SIZE_MIB: usize = 32;
/// The largest guest memory: the MMIO hole and 64-bit guest-physical
/// addressing stay far away at this size.
pub const MAX_MEM_SIZE_MIB: usize = 1 << 20;

/// Errors in `machine-config`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MachineConfigError {
    #[error("vcpu_count must be between 1 and {MAX_SUPPORTED_VCPUS}, got {0}")]
    InvalidVcpuCount(u8),
    #[error("vcpu_count must be 1 or even when smt is enabled, got {0}")]
    OddVcpuCountWithSmt(u8),
    #[error("mem_size_mib must be between {MIN_MEM_SIZE_MIB} and {MAX_MEM_SIZE_MIB}, got {0}")]
    InvalidMemSize(usize),
    #[error("cpu_template {0:?} is not supported by Tessera")]
    CpuTemplate(String),
    #[error("mem_size_mib must be a multiple of 2 with 2M huge pages, got {0}")]
    HugePageMultiple(usize),
}

/// Backing page size for guest memory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
pub enum HugePageConfig {
    #[default]
    None,
    /// Transparent huge pages (`madvise(MADV_HUGEPAGE)`).
    Transparent,
    #[serde(rename = "2M")]
    Hugetlbfs2M,
}

impl HugePageConfig {
    /// The size of the pages guest RAM is mapped with, in bytes
    /// (transparent huge pages may be split: 4 KiB).
    pub fn page_size(self) -> usize {
        match self {
            Self::None | Self::Transparent => 4096,
            Self::Hugetlbfs2M => 2 << 20,
        }
    }
}

/// The `machine-config` resource.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    pub vcpu_count: u8,
    pub mem_size_mib: usize,
    #[serde(default)]
    pub smt: bool,
    #[serde(default)]
    pub track_dirty_pages: bool,
    #[serde(default)]
    pub huge_pages: HugePageConfig,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_template: Option<String>,
}

impl Default for MachineConfig {
    fn default() -> Self {
        Self {
            vcpu_count: 1,
            mem_size_mib: 128,
            smt: false,
            track_dirty_pages: false,
            huge_pages: HugePageConfig::None,
            cpu_template: None,
        }
    }
}

/// `PATCH /machine-config`: the fields to change.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfigUpdate {
    #[serde(default)]
    pub vcpu_count: Option<u8>,
    #[serde(default)]
    pub mem_size_mib: Option<usize>,
    #[serde(default)]
    pub smt: Option<bool>,
    #[serde(default)]
    pub track_dirty_pages: Option<bool>,
    #[serde(default)]
    pub huge_pages: Option<HugePageConfig>,
    #[serde(default)]
    pub cpu_template: Option<String>,
}

impl MachineConfigUpdate {
    /// Whether the update changes nothing (Firecracker rejects that).
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

impl MachineConfig {
    /// The configuration with `update` applied, validated as a whole.
    pub fn updated(&self, update: &MachineConfigUpdate) -> Result<Self, MachineConfigError> {
        let mut next = self.clone();
        if let Some(v) = update.vcpu_count {
            next.vcpu_count = v;
        }
        if let Some(v) = update.mem_size_mib {
            next.mem_size_mib = v;
        }
        if let Some(v) = update.smt {
            next.smt = v;
        }
        if let Some(v) = update.track_dirty_pages {
            next.track_dirty_pages = v;
        }
        if let Some(v) = update.huge_pages {
            next.huge_pages = v;
        }
        if let Some(v) = &update.cpu_template {
            next.cpu_template = Some(v.clone());
        }
        next.validate()?;
        Ok(next)
    }

    /// Checks the values against Tessera's limits; the host's own limits
    /// (KVM's vCPU maximum, host memory) are checked when the VM is built.
    pub fn validate(&self) -> Result<(), MachineConfigError> {
        if self.vcpu_count == 0 || self.vcpu_count > MAX_SUPPORTED_VCPUS {
            return Err(MachineConfigError::InvalidVcpuCount(self.vcpu_count));
        }
        if self.smt && self.vcpu_count > 1 && !self.vcpu_count.is_multiple_of(2) {
            return Err(MachineConfigError::OddVcpuCountWithSmt(self.vcpu_count));
        }
        if !(MIN_MEM_SIZE_MIB..=MAX_MEM_SIZE_MIB).contains(&self.mem_size_mib) {
            return Err(MachineConfigError::InvalidMemSize(self.mem_size_mib));
        }
        if self.huge_pages == HugePageConfig::Hugetlbfs2M && !self.mem_size_mib.is_multiple_of(2) {
            return Err(MachineConfigError::HugePageMultiple(self.mem_size_mib));
        }
        match self.cpu_template.as_deref() {
            None | Some("None") => Ok(()),
            Some(other) => Err(MachineConfigError::CpuTemplate(other.to_string())),
        }
    }

    /// Threads per core that the guest topology shows.
    pub fn threads_per_core(&self) -> u8 {
        if self.smt && self.vcpu_count > 1 {
            2
        } else {
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(vcpu_count: u8, mem_size_mib: usize, smt: bool) -> MachineConfig {
        MachineConfig {
            vcpu_count,
            mem_size_mib,
            smt,
            ..Default::default()
        }
    }

    #[test]
    fn limits() {
        assert_eq!(
            cfg(0, 128, false).validate(),
            Err(MachineConfigError::InvalidVcpuCount(0))
        );
        assert_eq!(
            cfg(33, 128, false).validate(),
            Err(MachineConfigError::InvalidVcpuCount(33))
        );
        assert_eq!(
            cfg(3, 128, true).validate(),
            Err(MachineConfigError::OddVcpuCountWithSmt(3))
        );
        assert_eq!(
            cfg(1, 16, false).validate(),
            Err(MachineConfigError::InvalidMemSize(16))
        );
        assert!(cfg(32, 32, false).validate().is_ok());
        assert!(cfg(2, 8192, true).validate().is_ok());
    }

    #[test]
    fn patch_applies_and_validates_as_a_whole() {
        let base = MachineConfig::default();
        let update = MachineConfigUpdate {
            vcpu_count: Some(4),
            ..Default::default()
        };
        assert_eq!(base.updated(&update).unwrap().vcpu_count, 4);
        let bad = MachineConfigUpdate {
            mem_size_mib: Some(1),
            ..Default::default()
        };
        assert_eq!(
            base.updated(&bad),
            Err(MachineConfigError::InvalidMemSize(1))
        );
        assert!(MachineConfigUpdate::default().is_empty());
    }

    #[test]
    fn parses_huge_pages_and_rejects_templates() {
        let c: MachineConfig = serde_json::from_str(
            r#"{"vcpu_count": 1, "mem_size_mib": 64, "huge_pages": "2M", "cpu_template": "None"}"#,
        )
        .unwrap();
        assert_eq!(c.huge_pages, HugePageConfig::Hugetlbfs2M);
        assert!(c.validate().is_ok());
        let c: MachineConfig =
            serde_json::from_str(r#"{"vcpu_count": 1, "mem_size_mib": 64, "cpu_template": "T2"}"#)
                .unwrap();
        assert_eq!(
            c.validate(),
            Err(MachineConfigError::CpuTemplate("T2".into()))
        );
    }
}
