//! A vCPU's state as KVM holds it: what a snapshot saves and a load puts
//! back, each in the order KVM needs (Firecracker's order).

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
    KVM_MAX_MSR_ENTRIES,
};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};

/// Errors saving or restoring a vCPU's state; each names the KVM call.
#[derive(Debug, thiserror::Error)]
pub enum VcpuStateError {
    #[error("cannot {op}: {source}")]
    Kvm {
        op: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("cannot hold {0} MSRs in one KVM call")]
    TooManyMsrs(usize),
    #[error("KVM took {set} of the {saved} saved MSRs; MSR {next:#x} was refused")]
    MsrRefused { saved: usize, set: usize, next: u32 },
    #[error("cannot hold {0} CPUID entries")]
    TooManyCpuidEntries(usize),
}

fn kvm_err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuStateError {
    move |source| VcpuStateError::Kvm { op, source }
}

/// MSR_IA32_TSC_DEADLINE: must be set after the TSC, or KVM arms the
/// timer against the old TSC.
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
/// MSR_IA32_TSC, the guest's time stamp counter.
const MSR_IA32_TSC: u32 = 0x10;

/// Everything KVM keeps about one vCPU.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub msrs: Vec<kvm_msr_entry>,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debugregs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub mp_state: kvm_mp_state,
    pub vcpu_events: kvm_vcpu_events,
    /// The guest's TSC frequency, if KVM reports it.
    pub tsc_khz: Option<u32>,
}

impl VcpuState {
    /// Reads the state of a vCPU that is out of KVM_RUN. `msr_list` is
    /// every MSR KVM can save (KVM_GET_MSR_INDEX_LIST).
    pub fn save(fd: &VcpuFd, msr_list: &[u32]) -> Result<Self, VcpuStateError> {
        // KVM_GET_MP_STATE first: it makes the LAPIC take pending INIT and
        // SIPI events, which changes what the other calls return.
        let mp_state = fd.get_mp_state().map_err(kvm_err("read the MP state"))?;
        let regs = fd.get_regs().map_err(kvm_err("read the registers"))?;
        let sregs = fd
            .get_sregs()
            .map_err(kvm_err("read the special registers"))?;
        let xsave = fd.get_xsave().map_err(kvm_err("read the XSAVE area"))?;
        let xcrs = fd.get_xcrs().map_err(kvm_err("read the XCRs"))?;
        let debugregs = fd
            .get_debug_regs()
            .map_err(kvm_err("read the debug registers"))?;
        let lapic = fd.get_lapic().map_err(kvm_err("read the local APIC"))?;
        let tsc_khz = fd.get_tsc_khz().ok();
        let cpuid = fd
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("read CPUID"))?
            .as_slice()
            .to_vec();
        let msrs = save_msrs(fd, msr_list)?;
        let vcpu_events = fd
            .get_vcpu_events()
            .map_err(kvm_err("read the pending events"))?;
        Ok(Self {
            cpuid,
            msrs,
            regs,
            sregs,
            xsave,
            xcrs,
            debugregs,
            lapic,
            mp_state,
            vcpu_events,
            tsc_khz,
        })
    }

    /// Puts the state back into a new vCPU, before it first runs.
    pub fn restore(&self, fd: &VcpuFd) -> Result<(), VcpuStateError> {
        if let Some(khz) = self.tsc_khz {
            // A host whose TSC runs at another frequency (beyond the 250 ppm
            // NTP corrects, as Firecracker allows) scales the guest's.
            let here = fd.get_tsc_khz().unwrap_or(0);
            if u64::from(here.abs_diff(khz)) * 1_000_000 > u64::from(khz) * 250 {
                fd.set_tsc_khz(khz)
                    .map_err(kvm_err("set the guest's TSC frequency"))?;
            }
        }
        let cpuid = CpuId::from_entries(&self.cpuid)
            .map_err(|_| VcpuStateError::TooManyCpuidEntries(self.cpuid.len()))?;
        fd.set_cpuid2(&cpuid).map_err(kvm_err("set CPUID"))?;
        fd.set_mp_state(self.mp_state)
            .map_err(kvm_err("set the MP state"))?;
        fd.set_regs(&self.regs)
            .map_err(kvm_err("set the registers"))?;
        fd.set_sregs(&self.sregs)
            .map_err(kvm_err("set the special registers"))?;
        // SAFETY: the area is one KVM returned by KVM_GET_XSAVE for a vCPU
        // with the same CPUID, so its size is what KVM expects.
        unsafe { fd.set_xsave(&self.xsave) }.map_err(kvm_err("set the XSAVE area"))?;
        fd.set_xcrs(&self.xcrs).map_err(kvm_err("set the XCRs"))?;
        fd.set_debug_regs(&self.debugregs)
            .map_err(kvm_err("set the debug registers"))?;
        fd.set_lapic(&self.lapic)
            .map_err(kvm_err("set the local APIC"))?;
        restore_msrs(fd, &self.msrs)?;
        fd.set_vcpu_events(&self.vcpu_events)
            .map_err(kvm_err("set the pending events"))
    }
}

/// Reads every MSR of `list` that KVM gives; one it refuses is left out
/// (KVM lists some that a vCPU without the feature has not).
fn save_msrs(fd: &VcpuFd, list: &[u32]) -> Result<Vec<kvm_msr_entry>, VcpuStateError> {
    let mut saved = Vec::with_capacity(list.len());
    let mut rest = list;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(KVM_MAX_MSR_ENTRIES)];
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs =
            Msrs::from_entries(&entries).map_err(|_| VcpuStateError::TooManyMsrs(entries.len()))?;
        let read = fd.get_msrs(&mut msrs).map_err(kvm_err("read the MSRs"))?;
        saved.extend_from_slice(&msrs.as_slice()[..read]);
        // KVM stops at the first MSR it cannot read: skip that one.
        let next = if read < chunk.len() { read + 1 } else { read };
        rest = &rest[next..];
    }
    // The TSC deadline goes last, after the TSC it is relative to.
    saved.sort_by_key(|entry| entry.index == MSR_IA32_TSC_DEADLINE);
    keep_the_deadline_timer_armed(&mut saved);
    Ok(saved)
}

/// A TSC deadline of 0 means the timer fired, but when the vCPU stopped
/// between KVM clearing the deadline and the guest taking the interrupt,
/// the loaded guest waits forever for a timer it believes armed (a loaded
/// multi-vCPU guest with one vCPU stalled; Firecracker PR 4618). A deadline
/// at the saved TSC fires at once on load, and a guest takes a spare timer
/// interrupt in its stride.
fn keep_the_deadline_timer_armed(msrs: &mut [kvm_msr_entry]) {
    let Some(tsc) = msrs
        .iter()
        .find(|m| m.index == MSR_IA32_TSC)
        .map(|m| m.data)
    else {
        return;
    };
    for deadline in msrs.iter_mut().filter(|m| m.index == MSR_IA32_TSC_DEADLINE) {
        if deadline.data == 0 {
            deadline.data = tsc;
        }
    }
}

fn restore_msrs(fd: &VcpuFd, saved: &[kvm_msr_entry]) -> Result<(), VcpuStateError> {
    for (at, chunk) in saved.chunks(KVM_MAX_MSR_ENTRIES).enumerate() {
        let msrs =
            Msrs::from_entries(chunk).map_err(|_| VcpuStateError::TooManyMsrs(chunk.len()))?;
        let set = fd.set_msrs(&msrs).map_err(kvm_err("set the MSRs"))?;
        if set != chunk.len() {
            return Err(VcpuStateError::MsrRefused {
                saved: saved.len(),
                set: at * KVM_MAX_MSR_ENTRIES + set,
                next: chunk[set].index,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msr(index: u32, data: u64) -> kvm_msr_entry {
        kvm_msr_entry {
            index,
            data,
            ..Default::default()
        }
    }

    #[test]
    fn a_cleared_deadline_is_saved_as_the_tsc() {
        let mut msrs = [msr(MSR_IA32_TSC, 123_456), msr(MSR_IA32_TSC_DEADLINE, 0)];
        keep_the_deadline_timer_armed(&mut msrs);
        assert_eq!(msrs[1].data, 123_456);
    }

    #[test]
    fn an_armed_deadline_and_a_state_without_a_tsc_are_kept() {
        let mut msrs = [msr(MSR_IA32_TSC, 10), msr(MSR_IA32_TSC_DEADLINE, 99)];
        keep_the_deadline_timer_armed(&mut msrs);
        assert_eq!(msrs[1].data, 99);
        let mut msrs = [msr(MSR_IA32_TSC_DEADLINE, 0)];
        keep_the_deadline_timer_armed(&mut msrs);
        assert_eq!(msrs[0].data, 0);
    }

    #[test]
    fn kvm_saves_a_fired_deadline_timer_as_armed_and_after_the_tsc() {
        if !std::path::Path::new("/dev/kvm").exists() {
            assert!(
                std::env::var_os("TESSERA_STRICT").is_none(),
                "/dev/kvm is needed under TESSERA_STRICT"
            );
            return;
        }
        let kvm = kvm_ioctls::Kvm::new().unwrap();
        let vm = kvm.create_vm().unwrap();
        vm.create_irq_chip().unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        let msr_list = kvm.get_msr_index_list().unwrap();
        // A guest that ran its TSC-deadline timer out: deadline 0.
        let zero = Msrs::from_entries(&[msr(MSR_IA32_TSC_DEADLINE, 0)]).unwrap();
        vcpu.set_msrs(&zero).unwrap();
        let state = VcpuState::save(&vcpu, msr_list.as_slice()).unwrap();
        let find = |index| state.msrs.iter().position(|m| m.index == index).unwrap();
        let (tsc, deadline) = (find(MSR_IA32_TSC), find(MSR_IA32_TSC_DEADLINE));
        assert!(tsc < deadline, "the deadline is restored after the TSC");
        assert_eq!(deadline, state.msrs.len() - 1);
        assert_ne!(state.msrs[deadline].data, 0);
        assert_eq!(state.msrs[deadline].data, state.msrs[tsc].data);
    }
}
