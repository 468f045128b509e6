//! Guest CPUID: KVM's supported set, filtered to what the host CPU really
//! has, with the topology of this VM written into the leaves that describe
//! it (0x1, 0x4, 0xB, 0x1F and AMD's 0x8000_0008, 0x8000_001D, 0x8000_001E).

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

/// The topology a vCPU reports.
#[derive(Debug, Clone, Copy)]
pub struct Topology {
    pub cpu_index: u8,
    pub cpu_count: u8,
    pub threads_per_core: u8,
}

/// Errors normalising CPUID.
#[derive(Debug, thiserror::Error)]
pub enum CpuidError {
    #[error("cannot add CPUID leaf {leaf:#x} subleaf {subleaf}: {source:?}")]
    AddLeaf {
        leaf: u32,
        subleaf: u32,
        source: vmm_sys_util::fam::Error,
    },
}

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_EXT_FEATURES: u32 = 0x7;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_V2_EXT_TOPOLOGY: u32 = 0x1f;
const LEAF_AMD_EXT_FEATURES: u32 = 0x8000_0001;
const LEAF_AMD_SIZES: u32 = 0x8000_0008;
const LEAF_AMD_CACHE_TOPOLOGY: u32 = 0x8000_001d;
const LEAF_AMD_EXT_APIC_ID: u32 = 0x8000_001e;
/// The processor brand string, 16 bytes per leaf.
const LEAVES_BRAND_STRING: std::ops::RangeInclusive<u32> = 0x8000_0002..=0x8000_0004;

const ECX_X2APIC: u32 = 1 << 21;
const ECX_TSC_DEADLINE: u32 = 1 << 24;
const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;

/// Bits KVM emulates itself, so the guest may have them without the host.
const LEAF1_ECX_EMULATED: u32 = ECX_X2APIC | ECX_TSC_DEADLINE | ECX_HYPERVISOR;

/// Level types of leaves 0xB and 0x1F.
const LEVEL_TYPE_INVALID: u32 = 0;
const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;

/// Number of bits needed to hold `count` distinct ids.
fn id_bits(count: u8) -> u32 {
    let count = u32::from(count.max(1));
    u32::BITS - (count - 1).leading_zeros()
}

/// Reads the host's CPUID leaf.
fn host_cpuid(leaf: u32, subleaf: u32) -> core::arch::x86_64::CpuidResult {
    core::arch::x86_64::__cpuid_count(leaf, subleaf)
}

/// Tells the guest it has a TSC-deadline timer (CPUID.1:ECX bit 24), which
/// KVM emulates when it has `KVM_CAP_TSC_DEADLINE_TIMER` but leaves out of
/// `KVM_GET_SUPPORTED_CPUID`, as Firecracker does. Without it Linux keeps
/// the PIT and calibrates the APIC timer against it at every boot.
pub fn announce_tsc_deadline(cpuid: &mut CpuId) {
    for entry in cpuid.as_mut_slice() {
        if entry.function == LEAF_FEATURES {
            entry.ecx |= ECX_TSC_DEADLINE;
        }
    }
}

/// Adjusts KVM's supported CPUID for one vCPU of this VM.
pub fn normalize(cpuid: &mut CpuId, topo: Topology) -> Result<(), CpuidError> {
    let is_amd = {
        let vendor = host_cpuid(0, 0);
        (vendor.ebx, vendor.edx, vendor.ecx) == (0x6874_7541, 0x6974_6e65, 0x444d_4163)
    };
    let max_basic_leaf = cpuid
        .as_slice()
        .iter()
        .find(|e| e.function == 0)
        .map_or(0, |e| e.eax);
    let apic_id = u32::from(topo.cpu_index);
    let cpu_count = u32::from(topo.cpu_count);
    let threads = u32::from(topo.threads_per_core.max(1));
    let cores = (cpu_count / threads).max(1);

    for entry in cpuid.as_mut_slice().iter_mut() {
        match entry.function {
            LEAF_FEATURES => {
                let host = host_cpuid(LEAF_FEATURES, 0);
                entry.ecx &= host.ecx | LEAF1_ECX_EMULATED;
                entry.edx &= host.edx | EDX_HTT;
                entry.ecx |= ECX_HYPERVISOR;
                // EBX: initial APIC id, logical processors, CLFLUSH size (8 * 8 bytes).
                entry.ebx = (apic_id << 24) | (cpu_count << 16) | (8 << 8);
                if cpu_count > 1 {
                    entry.edx |= EDX_HTT;
                } else {
                    entry.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE_PARAMS if !is_amd => {
                let cache_level = (entry.eax >> 5) & 0x7;
                let sharing = if cache_level >= 3 { cpu_count } else { threads };
                entry.eax &= 0x3fff;
                entry.eax |= ((cores - 1) << 26) | ((sharing - 1) << 14);
            }
            LEAF_EXT_FEATURES if entry.index == 0 => {
                let host = host_cpuid(LEAF_EXT_FEATURES, 0);
                entry.ebx &= host.ebx;
                entry.ecx &= host.ecx;
            }
            LEAF_AMD_EXT_FEATURES => {
                let host = host_cpuid(LEAF_AMD_EXT_FEATURES, 0);
                entry.ecx &= host.ecx;
                entry.edx &= host.edx;
            }
            LEAF_AMD_SIZES if is_amd => {
                // ECX: ApicIdSize in bits 15:12, number of threads - 1 in 7:0.
                entry.ecx = (id_bits(topo.cpu_count) << 12) | (cpu_count - 1);
            }
            LEAF_AMD_CACHE_TOPOLOGY if is_amd => {
                let cache_level = (entry.eax >> 5) & 0x7;
                let sharing = if cache_level >= 3 { cpu_count } else { threads };
                entry.eax = (entry.eax & !(0xfff << 14)) | ((sharing - 1) << 14);
            }
            // KVM reports these as zeros: the guest would see no model
            // name (Firecracker passes the host's on too).
            leaf if LEAVES_BRAND_STRING.contains(&leaf) => {
                let host = host_cpuid(leaf, 0);
                (entry.eax, entry.ebx, entry.ecx, entry.edx) =
                    (host.eax, host.ebx, host.ecx, host.edx);
            }
            LEAF_AMD_EXT_APIC_ID if is_amd => {
                entry.eax = apic_id;
                entry.ebx = ((threads - 1) << 8) | (apic_id / threads);
                entry.ecx = 0;
            }
            _ => {}
        }
    }

    let mut topology_leaves = vec![LEAF_EXT_TOPOLOGY];
    if max_basic_leaf >= LEAF_V2_EXT_TOPOLOGY {
        topology_leaves.push(LEAF_V2_EXT_TOPOLOGY);
    }
    for leaf in topology_leaves {
        set_topology_leaf(cpuid, leaf, topo)?;
    }
    Ok(())
}

/// Writes the three subleaves of an extended topology leaf: SMT, core, end.
fn set_topology_leaf(cpuid: &mut CpuId, leaf: u32, topo: Topology) -> Result<(), CpuidError> {
    let apic_id = u32::from(topo.cpu_index);
    let smt_shift = id_bits(topo.threads_per_core);
    let package_shift = id_bits(topo.cpu_count).max(smt_shift);
    let levels = [
        (
            smt_shift,
            u32::from(topo.threads_per_core.max(1)),
            LEVEL_TYPE_SMT,
        ),
        (package_shift, u32::from(topo.cpu_count), LEVEL_TYPE_CORE),
        (0, 0, LEVEL_TYPE_INVALID),
    ];
    for (subleaf, (shift, count, level_type)) in levels.into_iter().enumerate() {
        let subleaf = subleaf as u32;
        let value = kvm_cpuid_entry2 {
            function: leaf,
            index: subleaf,
            flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
            eax: shift,
            ebx: count,
            ecx: (level_type << 8) | subleaf,
            edx: apic_id,
            ..Default::default()
        };
        let existing = cpuid
            .as_mut_slice()
            .iter_mut()
            .find(|e| e.function == leaf && e.index == subleaf);
        match existing {
            Some(entry) => *entry = value,
            None => cpuid.push(value).map_err(|source| CpuidError::AddLeaf {
                leaf,
                subleaf,
                source,
            })?,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ..Default::default()
        }
    }

    fn find(cpuid: &CpuId, function: u32, index: u32) -> kvm_cpuid_entry2 {
        *cpuid
            .as_slice()
            .iter()
            .find(|e| e.function == function && e.index == index)
            .unwrap()
    }

    #[test]
    fn topology_leaves_describe_the_vm() {
        let mut base = entry(0, 0);
        base.eax = 0x1f;
        let mut cpuid = CpuId::from_entries(&[base, entry(1, 0)]).unwrap();
        let topo = Topology {
            cpu_index: 3,
            cpu_count: 4,
            threads_per_core: 2,
        };
        normalize(&mut cpuid, topo).unwrap();

        let leaf1 = find(&cpuid, 1, 0);
        assert_eq!(leaf1.ebx >> 24, 3, "APIC id");
        assert_eq!((leaf1.ebx >> 16) & 0xff, 4, "logical processors");
        assert_ne!(leaf1.ecx & ECX_HYPERVISOR, 0);
        assert_ne!(leaf1.edx & EDX_HTT, 0);

        for leaf in [LEAF_EXT_TOPOLOGY, LEAF_V2_EXT_TOPOLOGY] {
            let smt = find(&cpuid, leaf, 0);
            assert_eq!((smt.eax, smt.ebx, smt.ecx >> 8, smt.edx), (1, 2, 1, 3));
            let core = find(&cpuid, leaf, 1);
            assert_eq!((core.eax, core.ebx, core.ecx >> 8), (2, 4, 2));
            assert_eq!(find(&cpuid, leaf, 2).ecx >> 8, LEVEL_TYPE_INVALID);
        }
    }

    #[test]
    fn single_cpu_has_no_htt_and_no_v2_leaf_below_max() {
        let mut base = entry(0, 0);
        base.eax = 0xd;
        let mut leaf1 = entry(1, 0);
        leaf1.edx = EDX_HTT;
        let mut cpuid = CpuId::from_entries(&[base, leaf1]).unwrap();
        let topo = Topology {
            cpu_index: 0,
            cpu_count: 1,
            threads_per_core: 1,
        };
        normalize(&mut cpuid, topo).unwrap();
        assert_eq!(find(&cpuid, 1, 0).edx & EDX_HTT, 0);
        assert!(cpuid.as_slice().iter().all(|e| e.function != 0x1f));
        let core = find(&cpuid, LEAF_EXT_TOPOLOGY, 1);
        assert_eq!((core.eax, core.ebx), (0, 1));
    }

    #[test]
    fn the_brand_string_is_the_hosts() {
        let leaves: Vec<_> = LEAVES_BRAND_STRING.map(|leaf| entry(leaf, 0)).collect();
        let mut cpuid = CpuId::from_entries(&leaves).unwrap();
        let topo = Topology {
            cpu_index: 0,
            cpu_count: 1,
            threads_per_core: 1,
        };
        normalize(&mut cpuid, topo).unwrap();
        for leaf in LEAVES_BRAND_STRING {
            let host = host_cpuid(leaf, 0);
            let guest = find(&cpuid, leaf, 0);
            assert_eq!(
                (guest.eax, guest.ebx, guest.ecx, guest.edx),
                (host.eax, host.ebx, host.ecx, host.edx)
            );
        }
    }

    #[test]
    fn the_tsc_deadline_timer_is_announced_and_kept() {
        let mut cpuid = CpuId::from_entries(&[entry(0, 0), entry(LEAF_FEATURES, 0)]).unwrap();
        announce_tsc_deadline(&mut cpuid);
        let topo = Topology {
            cpu_index: 0,
            cpu_count: 1,
            threads_per_core: 1,
        };
        normalize(&mut cpuid, topo).unwrap();
        assert_ne!(find(&cpuid, LEAF_FEATURES, 0).ecx & ECX_TSC_DEADLINE, 0);
    }

    #[test]
    fn id_bits_rounds_up() {
        assert_eq!([1, 2, 3, 4, 5, 32].map(id_bits), [0, 1, 2, 2, 3, 5]);
    }
}
