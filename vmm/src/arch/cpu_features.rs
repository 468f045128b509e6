//! The CPU features a guest sees: its vendor and the CPUID words that hold
//! feature flags. A migration's destination compares the source guest's
//! with what its own KVM offers before it accepts, because the guest keeps
//! its CPUID across the move and may be using any feature it was shown:
//! one the new host lacks would fault (or silently misbehave) there.

use kvm_bindings::kvm_cpuid_entry2;
use serde::{Deserialize, Serialize};

/// A CPUID output register.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Register {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

impl Register {
    fn of(self, entry: &kvm_cpuid_entry2) -> u32 {
        match self {
            Register::Eax => entry.eax,
            Register::Ebx => entry.ebx,
            Register::Ecx => entry.ecx,
            Register::Edx => entry.edx,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Register::Eax => "EAX",
            Register::Ebx => "EBX",
            Register::Ecx => "ECX",
            Register::Edx => "EDX",
        }
    }
}

/// One CPUID word of feature flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeatureWord {
    pub leaf: u32,
    pub subleaf: u32,
    pub register: Register,
    pub bits: u32,
}

/// CPUID.1:ECX.OSXSAVE mirrors the guest's CR4.OSXSAVE: KVM sets it in a
/// running vCPU's CPUID, never in its supported set.
const LEAF1_ECX_OSXSAVE: u32 = 1 << 27;
/// CPUID.7.0:ECX.OSPKE mirrors CR4.PKE in the same way.
const LEAF7_ECX_OSPKE: u32 = 1 << 4;

/// The feature words compared, each with the bits that reflect guest
/// state rather than a capability.
const WORDS: &[(u32, u32, Register, u32)] = &[
    (0x1, 0, Register::Ecx, LEAF1_ECX_OSXSAVE),
    (0x1, 0, Register::Edx, 0),
    (0x7, 0, Register::Ebx, 0),
    (0x7, 0, Register::Ecx, LEAF7_ECX_OSPKE),
    (0x7, 0, Register::Edx, 0),
    (0x7, 1, Register::Eax, 0),
    // XSAVE state components (XCR0's allowed bits) and XSAVE variants.
    (0xd, 0, Register::Eax, 0),
    (0xd, 1, Register::Eax, 0),
    // KVM's paravirtual features (kvm-clock, PV EOI, ...).
    (0x4000_0001, 0, Register::Eax, 0),
    (0x8000_0001, 0, Register::Ecx, 0),
    (0x8000_0001, 0, Register::Edx, 0),
    (0x8000_0007, 0, Register::Edx, 0),
    (0x8000_0008, 0, Register::Ebx, 0),
];

/// A guest's CPU vendor and feature words.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuFeatures {
    /// CPUID leaf 0's vendor string, e.g. `AuthenticAMD`.
    pub vendor: String,
    pub words: Vec<FeatureWord>,
}

/// Feature bits a guest has and a host lacks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MissingBits {
    pub leaf: u32,
    pub subleaf: u32,
    pub register: Register,
    pub bits: u32,
}

impl std::fmt::Display for MissingBits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "CPUID {:#x}.{} {} bits {:#010x}",
            self.leaf,
            self.subleaf,
            self.register.name(),
            self.bits
        )
    }
}

/// Why a guest cannot run on this host.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CpuFeatureError {
    #[error("the guest's CPU vendor is {guest:?} and this host's is {host:?}")]
    Vendor { guest: String, host: String },
    #[error("this host lacks CPU features the guest has: {}", list(.0))]
    Missing(Vec<MissingBits>),
}

fn list(missing: &[MissingBits]) -> String {
    missing
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

fn find(entries: &[kvm_cpuid_entry2], leaf: u32, subleaf: u32) -> Option<&kvm_cpuid_entry2> {
    entries
        .iter()
        .find(|e| e.function == leaf && e.index == subleaf)
}

fn vendor(entries: &[kvm_cpuid_entry2]) -> String {
    let Some(leaf0) = find(entries, 0, 0) else {
        return String::new();
    };
    let bytes: Vec<u8> = [leaf0.ebx, leaf0.edx, leaf0.ecx]
        .iter()
        .flat_map(|r| r.to_le_bytes())
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

impl CpuFeatures {
    /// The features of a vCPU's CPUID (a leaf it lacks has no features).
    pub fn of(entries: &[kvm_cpuid_entry2]) -> Self {
        let words = WORDS
            .iter()
            .map(|&(leaf, subleaf, register, dynamic)| FeatureWord {
                leaf,
                subleaf,
                register,
                bits: find(entries, leaf, subleaf).map_or(0, |e| register.of(e)) & !dynamic,
            })
            .collect();
        CpuFeatures {
            vendor: vendor(entries),
            words,
        }
    }

    /// Checks that a guest with these features can run where `host` are
    /// offered: the same vendor, and no feature bit `host` lacks. A word
    /// `host` does not know is taken as all zeros.
    pub fn check_runs_on(&self, host: &CpuFeatures) -> Result<(), CpuFeatureError> {
        if self.vendor != host.vendor {
            return Err(CpuFeatureError::Vendor {
                guest: self.vendor.clone(),
                host: host.vendor.clone(),
            });
        }
        let missing: Vec<MissingBits> = self
            .words
            .iter()
            .filter_map(|word| {
                let offered = host
                    .words
                    .iter()
                    .find(|h| {
                        (h.leaf, h.subleaf, h.register) == (word.leaf, word.subleaf, word.register)
                    })
                    .map_or(0, |h| h.bits);
                let bits = word.bits & !offered;
                (bits != 0).then_some(MissingBits {
                    leaf: word.leaf,
                    subleaf: word.subleaf,
                    register: word.register,
                    bits,
                })
            })
            .collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(CpuFeatureError::Missing(missing))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: regs[0],
            ebx: regs[1],
            ecx: regs[2],
            edx: regs[3],
            ..Default::default()
        }
    }

    /// "AuthenticAMD" in EBX, EDX, ECX.
    const AMD: [u32; 4] = [0x10, 0x6874_7541, 0x444d_4163, 0x6974_6e65];

    fn amd_with(leaf7_ebx: u32, leaf1_ecx: u32) -> Vec<kvm_cpuid_entry2> {
        vec![
            entry(0, 0, AMD),
            entry(1, 0, [0, 0, leaf1_ecx, 0x0178_bfbf]),
            entry(7, 0, [0, leaf7_ebx, 0, 0]),
        ]
    }

    #[test]
    fn the_vendor_is_read_from_leaf_0() {
        assert_eq!(CpuFeatures::of(&amd_with(0, 0)).vendor, "AuthenticAMD");
    }

    #[test]
    fn a_host_with_the_same_or_more_features_takes_the_guest() {
        let guest = CpuFeatures::of(&amd_with(0b1011, 1));
        assert_eq!(guest.check_runs_on(&guest), Ok(()));
        let bigger = CpuFeatures::of(&amd_with(0b1111, 3));
        assert_eq!(guest.check_runs_on(&bigger), Ok(()));
    }

    #[test]
    fn a_missing_feature_is_named_by_leaf_register_and_bits() {
        let guest = CpuFeatures::of(&amd_with(1 << 16 | 1, 0));
        let host = CpuFeatures::of(&amd_with(1, 0));
        let err = guest.check_runs_on(&host).unwrap_err();
        assert_eq!(
            err.to_string(),
            "this host lacks CPU features the guest has: CPUID 0x7.0 EBX bits 0x00010000"
        );
    }

    #[test]
    fn a_leaf_the_host_does_not_have_counts_as_no_features() {
        let mut guest = amd_with(0, 0);
        guest.push(entry(0x8000_0001, 0, [0, 0, 1 << 5, 0]));
        let err = CpuFeatures::of(&guest)
            .check_runs_on(&CpuFeatures::of(&amd_with(0, 0)))
            .unwrap_err();
        assert!(err.to_string().contains("CPUID 0x80000001.0 ECX"), "{err}");
    }

    #[test]
    fn bits_that_mirror_guest_state_are_not_features() {
        // A snapshot's CPUID, read from a running vCPU, has OSXSAVE set.
        let guest = CpuFeatures::of(&amd_with(0, LEAF1_ECX_OSXSAVE | 1));
        let host = CpuFeatures::of(&amd_with(0, 1));
        assert_eq!(guest.check_runs_on(&host), Ok(()));
    }

    #[test]
    fn another_vendor_is_refused() {
        let guest = CpuFeatures::of(&amd_with(0, 0));
        let mut intel = amd_with(0, 0);
        // "GenuineIntel".
        intel[0] = entry(0, 0, [0x10, 0x756e_6547, 0x6c65_746e, 0x4965_6e69]);
        let err = guest.check_runs_on(&CpuFeatures::of(&intel)).unwrap_err();
        assert_eq!(
            err,
            CpuFeatureError::Vendor {
                guest: "AuthenticAMD".into(),
                host: "GenuineIntel".into()
            }
        );
    }
}
