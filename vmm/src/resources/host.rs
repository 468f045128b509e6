//! Checks of a machine configuration against this host, made when it is
//! set (so that a value the host cannot honour is a 400, not a failed
//! start): KVM's vCPU limit, the host's memory and its free 2 MiB huge
//! pages. What the VMM cannot see (a jail without /proc or /sys) is left to
//! the start.

use std::path::Path;

use vmm_config::{HugePageConfig, MachineConfig};

/// Where the kernel counts free 2 MiB huge pages.
const FREE_2M_HUGE_PAGES: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages";

/// A machine configuration this host cannot honour.
#[derive(Debug, thiserror::Error)]
pub enum HostLimitError {
    #[error("vcpu_count {wanted} is more than KVM allows on this host ({max})")]
    Vcpus { wanted: u8, max: usize },
    #[error("mem_size_mib {wanted} is more than this host's memory ({host} MiB of RAM and swap)")]
    Memory { wanted: usize, host: u64 },
    #[error("huge_pages \"2M\" needs {needed} free 2 MiB huge pages for mem_size_mib {mem_size_mib}, and this host has {free} (see /proc/sys/vm/nr_hugepages)")]
    HugePages {
        mem_size_mib: usize,
        needed: u64,
        free: u64,
    },
}

/// Checks `config` against this host.
pub fn check_machine_config(config: &MachineConfig) -> Result<(), HostLimitError> {
    if let Ok(kvm) = kvm_ioctls::Kvm::new() {
        let max = kvm.get_max_vcpus();
        if usize::from(config.vcpu_count) > max {
            return Err(HostLimitError::Vcpus {
                wanted: config.vcpu_count,
                max,
            });
        }
    }
    if let Some(host) = crate::memory::host_memory_mib() {
        if config.mem_size_mib as u64 > host {
            return Err(HostLimitError::Memory {
                wanted: config.mem_size_mib,
                host,
            });
        }
    }
    if config.huge_pages == HugePageConfig::Hugetlbfs2M {
        let needed = config.mem_size_mib.div_ceil(2) as u64;
        if let Some(free) = free_2m_huge_pages() {
            if free < needed {
                return Err(HostLimitError::HugePages {
                    mem_size_mib: config.mem_size_mib,
                    needed,
                    free,
                });
            }
        }
    }
    Ok(())
}

/// Free 2 MiB huge pages; none when the kernel has no such pool; `None`
/// when sysfs is not visible.
fn free_2m_huge_pages() -> Option<u64> {
    if !Path::new("/sys/kernel/mm").is_dir() {
        return None;
    }
    let text = std::fs::read_to_string(FREE_2M_HUGE_PAGES).unwrap_or_default();
    Some(text.trim().parse().unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_beyond_the_host_is_refused() {
        let config = MachineConfig {
            mem_size_mib: vmm_config::MAX_MEM_SIZE_MIB,
            ..Default::default()
        };
        let err = check_machine_config(&config).unwrap_err().to_string();
        assert!(
            err.starts_with("mem_size_mib 1048576 is more than this host's memory"),
            "{err}"
        );
    }

    #[test]
    fn huge_pages_beyond_the_pool_are_refused() {
        let Some(free) = free_2m_huge_pages() else {
            return;
        };
        let config = MachineConfig {
            mem_size_mib: 2 * (free as usize + 1),
            huge_pages: HugePageConfig::Hugetlbfs2M,
            ..Default::default()
        };
        match check_machine_config(&config) {
            Err(HostLimitError::HugePages { needed, .. }) => assert_eq!(needed, free + 1),
            // A host with less memory than the pool would need.
            Err(HostLimitError::Memory { .. }) => {}
            other => panic!("{other:?}"),
        }
    }
}
