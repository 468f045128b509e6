//! vCPUs: their boot configuration and the run loop each one executes on
//! its own thread. Port I/O and MMIO exits are dispatched straight to the
//! device buses from the vCPU thread; only a stop travels to the main thread.

use std::cell::Cell;
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devices::Bus;
use kvm_bindings::kvm_run;
use kvm_bindings::{
    CpuId, KVM_MAX_CPUID_ENTRIES, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET,
    KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::arch::cpu_features::CpuFeatures;
use crate::arch::cpuid::{self, CpuidError, Topology};
use crate::arch::msr::{self, MsrError};
use crate::arch::regs::{self, EntryPoint, RegsError};
use crate::metrics::metrics;
use crate::vstate::vcpu_state::{VcpuState, VcpuStateError};

/// Errors creating or configuring a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("cannot create vCPU {index}: {source}")]
    Create {
        index: u8,
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {index}: {source}")]
    Cpuid { index: u8, source: CpuidError },
    #[error("vCPU {index}: cannot set CPUID: {source}")]
    SetCpuid {
        index: u8,
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {index}: cannot read CPUID: {source}")]
    GetCpuid {
        index: u8,
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {index}: {source}")]
    Msrs { index: u8, source: MsrError },
    #[error("vCPU {index}: {source}")]
    Regs { index: u8, source: RegsError },
    #[error("vCPU {index}: cannot {op} the local APIC: {source}")]
    Lapic {
        index: u8,
        op: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("cannot start the thread of vCPU {index}: {source}")]
    Spawn { index: u8, source: std::io::Error },
    #[error("cannot install the vCPU kick signal handler: {0}")]
    SignalHandler(vmm_sys_util::errno::Error),
    #[error("vCPU {index} did not acknowledge {what} within {timeout:?}")]
    Unresponsive {
        index: u8,
        what: &'static str,
        timeout: Duration,
    },
    #[error("vCPU {0} has stopped")]
    Stopped(u8),
    #[error("vCPU {index}: {source}")]
    State { index: u8, source: VcpuStateError },
    #[error("vCPU {0} must be paused to save its state")]
    NotPaused(u8),
}

/// Requests the VMM thread sends to a running vCPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuEvent {
    Pause,
    Resume,
    /// Only while paused: report the vCPU's state.
    SaveState,
}

/// A vCPU's acknowledgement of a [`VcpuEvent`].
#[derive(Debug)]
pub enum VcpuResponse {
    Paused,
    Resumed,
    Saved(Box<Result<VcpuState, VcpuStateError>>),
    /// A save asked of a vCPU that is not paused.
    NotPaused,
}

thread_local! {
    /// This thread's kvm_run area, so that the kick signal can make a
    /// KVM_RUN that is about to start return at once.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = KVM_RUN.with(Cell::get);
    if !run.is_null() {
        // SAFETY: the pointer is this thread's own kvm_run mapping, set by
        // its vCPU loop and alive as long as the thread runs; a volatile
        // byte store is async-signal-safe.
        unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
    }
}

/// Installs the handler of the signal that kicks vCPUs out of KVM_RUN.
pub fn install_kick_handler() -> Result<(), VcpuError> {
    register_signal_handler(SIGRTMIN(), handle_kick).map_err(VcpuError::SignalHandler)
}

/// The VMM thread's handle on a running vCPU thread.
pub struct VcpuHandle {
    index: u8,
    thread: JoinHandle<()>,
    events: Sender<VcpuEvent>,
    responses: Receiver<VcpuResponse>,
}

impl VcpuHandle {
    /// Asks the vCPU to pause or resume and waits for it to do so.
    pub fn request(&self, event: VcpuEvent, timeout: Duration) -> Result<(), VcpuError> {
        self.ask(event, timeout).map(drop)
    }

    /// Reads the state of the paused vCPU.
    pub fn save_state(&self, timeout: Duration) -> Result<VcpuState, VcpuError> {
        let index = self.index;
        match self.ask(VcpuEvent::SaveState, timeout)? {
            VcpuResponse::Saved(state) => {
                (*state).map_err(|source| VcpuError::State { index, source })
            }
            _ => Err(VcpuError::NotPaused(index)),
        }
    }

    /// Sends `event` and waits for the vCPU's answer.
    fn ask(&self, event: VcpuEvent, timeout: Duration) -> Result<VcpuResponse, VcpuError> {
        let index = self.index;
        let what = match event {
            VcpuEvent::Pause => "a pause",
            VcpuEvent::Resume => "a resume",
            VcpuEvent::SaveState => "a state save",
        };
        // A reply that came after an earlier request timed out is not this
        // one's.
        while self.responses.try_recv().is_ok() {}
        self.events
            .send(event)
            .map_err(|_| VcpuError::Stopped(index))?;
        let deadline = Instant::now() + timeout;
        loop {
            // Kick again while waiting: a kick that lands between two
            // KVM_RUN calls is caught by immediate_exit, but a vCPU busy
            // handling an exit only looks at its events before the next run.
            if event == VcpuEvent::Pause {
                let _ = self.thread.kill(SIGRTMIN());
            }
            match self.responses.recv_timeout(Duration::from_millis(10)) {
                Ok(response) => return Ok(response),
                Err(RecvTimeoutError::Disconnected) => return Err(VcpuError::Stopped(index)),
                Err(RecvTimeoutError::Timeout) if Instant::now() >= deadline => {
                    return Err(VcpuError::Unresponsive {
                        index,
                        what,
                        timeout,
                    })
                }
                Err(RecvTimeoutError::Timeout) => {}
            }
        }
    }
}

impl VcpuHandle {
    /// Ends the vCPU and waits for its thread: it must be out of KVM_RUN
    /// for good before guest memory is unmapped, or it re-enters the guest
    /// and faults on the missing memory.
    pub fn stop(self, timeout: Duration) -> Result<(), VcpuError> {
        let Self {
            index,
            thread,
            events,
            responses,
        } = self;
        // A closed event channel is the vCPU's signal to end; its thread
        // ending closes the response channel.
        drop(events);
        let deadline = Instant::now() + timeout;
        loop {
            let _ = thread.kill(SIGRTMIN());
            match responses.recv_timeout(Duration::from_millis(1)) {
                Err(RecvTimeoutError::Disconnected) => break,
                _ if Instant::now() >= deadline => {
                    return Err(VcpuError::Unresponsive {
                        index,
                        what: "a stop",
                        timeout,
                    })
                }
                _ => {}
            }
        }
        let _ = thread.join();
        Ok(())
    }
}

/// Why a vCPU stopped running the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuStop {
    /// The guest asked to power off or reset: a normal end.
    GuestShutdown(&'static str),
    /// The guest crashed, or KVM could not run it.
    Failed(String),
}

/// What a vCPU thread reports when it stops.
#[derive(Debug)]
pub struct VcpuStopReport {
    pub index: u8,
    pub reason: VcpuStop,
}

/// A vCPU with the buses it dispatches exits to.
pub struct Vcpu {
    index: u8,
    fd: VcpuFd,
    pio_bus: Arc<Bus>,
    mmio_bus: Arc<Bus>,
    /// The MSRs a snapshot saves (KVM_GET_MSR_INDEX_LIST).
    msr_list: Arc<Vec<u32>>,
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

impl Vcpu {
    /// Creates vCPU `index` of `vm`; a snapshot saves the MSRs of
    /// `msr_list`.
    pub fn new(
        vm: &VmFd,
        index: u8,
        (pio_bus, mmio_bus): (Arc<Bus>, Arc<Bus>),
        msr_list: Arc<Vec<u32>>,
    ) -> Result<Self, VcpuError> {
        let fd = vm
            .create_vcpu(u64::from(index))
            .map_err(|source| VcpuError::Create { index, source })?;
        Ok(Self {
            index,
            fd,
            pio_bus,
            mmio_bus,
            msr_list,
        })
    }

    /// The CPU features its guest sees (its CPUID as KVM reports it).
    pub fn cpu_features(&self) -> Result<CpuFeatures, VcpuError> {
        let cpuid = self
            .fd
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(|source| VcpuError::GetCpuid {
                index: self.index,
                source,
            })?;
        Ok(CpuFeatures::of(cpuid.as_slice()))
    }

    /// Puts a snapshot's state into this new vCPU.
    pub fn restore(&self, state: &VcpuState) -> Result<(), VcpuError> {
        state.restore(&self.fd).map_err(|source| VcpuError::State {
            index: self.index,
            source,
        })
    }

    /// Sets CPUID, MSRs, registers, FPU and LAPIC for booting at `entry`.
    /// Only the boot vCPU starts at `entry`; the others wait for INIT/SIPI.
    pub fn configure(
        &self,
        supported_cpuid: &CpuId,
        topology: Topology,
        entry: EntryPoint,
    ) -> Result<(), VcpuError> {
        let index = self.index;
        let mut cpuid = supported_cpuid.clone();
        cpuid::normalize(&mut cpuid, topology)
            .map_err(|source| VcpuError::Cpuid { index, source })?;
        self.fd
            .set_cpuid2(&cpuid)
            .map_err(|source| VcpuError::SetCpuid { index, source })?;
        msr::setup_msrs(&self.fd).map_err(|source| VcpuError::Msrs { index, source })?;
        let regs_err = |source| VcpuError::Regs { index, source };
        regs::setup_fpu(&self.fd).map_err(regs_err)?;
        if index == 0 {
            regs::setup_regs(&self.fd, entry).map_err(regs_err)?;
            regs::setup_sregs(&self.fd, entry).map_err(regs_err)?;
        }
        self.setup_lapic()
    }

    /// Wires LINT0 to the PIC (ExtINT) and LINT1 to NMI, as on a PC.
    fn setup_lapic(&self) -> Result<(), VcpuError> {
        let index = self.index;
        let mut lapic = self.fd.get_lapic().map_err(|source| VcpuError::Lapic {
            index,
            op: "read",
            source,
        })?;
        for (reg, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
            let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[reg + i] as u8);
            let value = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
            for (i, byte) in value.to_le_bytes().into_iter().enumerate() {
                lapic.regs[reg + i] = byte as _;
            }
        }
        self.fd
            .set_lapic(&lapic)
            .map_err(|source| VcpuError::Lapic {
                index,
                op: "write",
                source,
            })
    }

    /// Starts the vCPU on its own thread. When it stops, it reports why on
    /// `stopped` and signals `stop_evt` to wake the main event loop.
    /// With `paused`, the vCPU waits for a resume before it first runs (a
    /// loaded snapshot without `resume_vm`).
    pub fn start(
        self,
        stopped: Sender<VcpuStopReport>,
        stop_evt: EventFd,
        seccomp: std::sync::Arc<tessera_seccomp::Filters>,
        paused: bool,
    ) -> Result<VcpuHandle, VcpuError> {
        let index = self.index;
        let (event_sender, events) = channel();
        let (responder, responses) = channel();
        let thread = std::thread::Builder::new()
            .name(format!("fc_vcpu {index}"))
            .spawn(move || {
                let mut vcpu = self;
                KVM_RUN.with(|run| run.set(vcpu.fd.get_kvm_run()));
                // The guest runs only once this thread is confined.
                let reason = match seccomp.apply("vcpu") {
                    Ok(()) => match paused.then(|| vcpu.wait_for_resume(&events, &responder)) {
                        Some(Some(stop)) => stop,
                        _ => vcpu.run_until_stop(&events, &responder),
                    },
                    Err(err) => VcpuStop::Failed(err.to_string()),
                };
                KVM_RUN.with(|run| run.set(std::ptr::null_mut()));
                match &reason {
                    VcpuStop::GuestShutdown(why) => log::info!("vCPU {index} stopped: {why}"),
                    VcpuStop::Failed(why) => {
                        metrics().vcpu.failures.inc();
                        log::error!("vCPU {index} failed: {why}")
                    }
                }
                // The main loop may already be gone when the VM is ending.
                let _ = stopped.send(VcpuStopReport { index, reason });
                let _ = stop_evt.write(1);
            })
            .map_err(|source| VcpuError::Spawn { index, source })?;
        Ok(VcpuHandle {
            index,
            thread,
            events: event_sender,
            responses,
        })
    }

    fn run_until_stop(
        &mut self,
        events: &Receiver<VcpuEvent>,
        responder: &Sender<VcpuResponse>,
    ) -> VcpuStop {
        loop {
            match events.try_recv() {
                Ok(VcpuEvent::Pause) => {
                    if let Some(stop) = self.paused(events, responder) {
                        return stop;
                    }
                }
                Ok(VcpuEvent::Resume) => {
                    let _ = responder.send(VcpuResponse::Resumed);
                }
                Ok(VcpuEvent::SaveState) => {
                    let _ = responder.send(VcpuResponse::NotPaused);
                }
                Err(TryRecvError::Empty) => {}
                Err(TryRecvError::Disconnected) => {
                    return VcpuStop::GuestShutdown("the VMM is ending")
                }
            }
            let result = self.fd.run();
            match result {
                Ok(VcpuExit::InternalError) => return VcpuStop::Failed(self.internal_error()),
                Ok(exit) => {
                    if let Some(stop) = handle_exit(exit, &self.pio_bus, &self.mmio_bus) {
                        return stop;
                    }
                }
                Err(err) if err.errno() == libc::EINTR || err.errno() == libc::EAGAIN => {
                    self.fd.set_kvm_immediate_exit(0);
                }
                Err(err) => return VcpuStop::Failed(format!("KVM_RUN failed: {err}")),
            }
        }
    }

    /// Stays out of the guest until a resume; returns `Some` if the VMM
    /// went away meanwhile.
    fn paused(
        &mut self,
        events: &Receiver<VcpuEvent>,
        responder: &Sender<VcpuResponse>,
    ) -> Option<VcpuStop> {
        let _ = responder.send(VcpuResponse::Paused);
        self.wait_for_resume(events, responder)
    }

    /// Answers requests out of the guest until a resume; returns `Some` if
    /// the VMM went away meanwhile.
    fn wait_for_resume(
        &mut self,
        events: &Receiver<VcpuEvent>,
        responder: &Sender<VcpuResponse>,
    ) -> Option<VcpuStop> {
        loop {
            match events.recv() {
                Ok(VcpuEvent::Resume) => {
                    let _ = responder.send(VcpuResponse::Resumed);
                    return None;
                }
                Ok(VcpuEvent::Pause) => {
                    let _ = responder.send(VcpuResponse::Paused);
                }
                Ok(VcpuEvent::SaveState) => {
                    self.finish_pending_io();
                    let state = VcpuState::save(&self.fd, &self.msr_list);
                    let _ = responder.send(VcpuResponse::Saved(Box::new(state)));
                }
                Err(_) => return Some(VcpuStop::GuestShutdown("the VMM is ending")),
            }
        }
    }

    /// Re-enters KVM_RUN with immediate_exit set: KVM completes the port
    /// or MMIO instruction whose exit this thread handled last (a read's
    /// value goes into its register) and returns at once, so that a saved
    /// state lies between two instructions and a load does not run one
    /// twice.
    fn finish_pending_io(&mut self) {
        self.fd.set_kvm_immediate_exit(1);
        match self.fd.run() {
            Err(err) if err.errno() == libc::EINTR || err.errno() == libc::EAGAIN => {}
            Ok(exit) => {
                let _ = handle_exit(exit, &self.pio_bus, &self.mmio_bus);
            }
            Err(err) => log::error!("vCPU {}: cannot finish its last I/O: {err}", self.index),
        }
        self.fd.set_kvm_immediate_exit(0);
    }

    /// Describes a KVM internal error from the details KVM left in kvm_run.
    fn internal_error(&mut self) -> String {
        let run = self.fd.get_kvm_run();
        // SAFETY: KVM filled the `internal` member of the exit union, as
        // the exit reason KVM_EXIT_INTERNAL_ERROR says; it is plain data.
        let internal = unsafe { run.__bindgen_anon_1.internal };
        let ndata = (internal.ndata as usize).min(internal.data.len());
        format!(
            "KVM internal error {} (1 = emulation failure): the host could not run a guest \
             instruction; data {:x?}",
            internal.suberror,
            &internal.data[..ndata]
        )
    }
}

/// Handles one VM exit; returns `Some` when the vCPU must stop.
fn handle_exit(exit: VcpuExit, pio: &Bus, mmio: &Bus) -> Option<VcpuStop> {
    match exit {
        VcpuExit::IoIn(port, data) => {
            metrics().vcpu.exit_io_in.inc();
            if !pio.read(u64::from(port), data) {
                // Nothing decodes the port: the bus floats high, as on a PC.
                data.fill(0xff);
                metrics().vcpu.unhandled_pio.inc();
                devices::guest_log_here!(log::Level::Debug, "unhandled port read {port:#x}");
            }
        }
        VcpuExit::IoOut(port, data) => {
            metrics().vcpu.exit_io_out.inc();
            if !pio.write(u64::from(port), data) {
                metrics().vcpu.unhandled_pio.inc();
                devices::guest_log_here!(
                    log::Level::Debug,
                    "unhandled port write {port:#x} <- {data:x?}"
                );
            }
        }
        VcpuExit::MmioRead(addr, data) => {
            metrics().vcpu.exit_mmio_read.inc();
            if !mmio.read(addr, data) {
                data.fill(0);
                metrics().vcpu.unhandled_mmio.inc();
                devices::guest_log_here!(log::Level::Debug, "unhandled MMIO read {addr:#x}");
            }
        }
        VcpuExit::MmioWrite(addr, data) => {
            metrics().vcpu.exit_mmio_write.inc();
            if !mmio.write(addr, data) {
                metrics().vcpu.unhandled_mmio.inc();
                devices::guest_log_here!(
                    log::Level::Debug,
                    "unhandled MMIO write {addr:#x} <- {data:x?}"
                );
            }
        }
        VcpuExit::Hlt => return Some(VcpuStop::GuestShutdown("the guest halted")),
        VcpuExit::Shutdown => return Some(VcpuStop::GuestShutdown("triple fault (guest reset)")),
        VcpuExit::SystemEvent(kind, _) => {
            return Some(match kind {
                KVM_SYSTEM_EVENT_SHUTDOWN => VcpuStop::GuestShutdown("guest power-off"),
                KVM_SYSTEM_EVENT_RESET => VcpuStop::GuestShutdown("guest reset"),
                KVM_SYSTEM_EVENT_CRASH => VcpuStop::Failed("the guest crashed".into()),
                other => VcpuStop::Failed(format!("unexpected system event {other}")),
            })
        }
        VcpuExit::FailEntry(reason, cpu) => {
            return Some(VcpuStop::Failed(format!(
                "KVM could not enter the guest on CPU {cpu}: hardware reason {reason:#x}"
            )))
        }
        VcpuExit::InternalError => {
            return Some(VcpuStop::Failed(
                "KVM internal error: the host could not emulate a guest instruction".into(),
            ))
        }
        other => return Some(VcpuStop::Failed(format!("unexpected VM exit {other:?}"))),
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_ports_read_as_all_ones_and_mmio_as_zero() {
        let bus = Bus::new();
        let mut port = [0u8; 2];
        assert_eq!(
            handle_exit(VcpuExit::IoIn(0x2f8, &mut port), &bus, &bus),
            None
        );
        assert_eq!(port, [0xff, 0xff]);
        let mut word = [0xaau8; 4];
        assert_eq!(
            handle_exit(VcpuExit::MmioRead(0xd000_1000, &mut word), &bus, &bus),
            None
        );
        assert_eq!(word, [0; 4]);
        assert_eq!(
            handle_exit(VcpuExit::MmioWrite(0xdead_0000, &[1]), &bus, &bus),
            None
        );
    }

    #[test]
    fn unhandled_accesses_are_counted() {
        let bus = Bus::new();
        let before = metrics().vcpu.unhandled_mmio.total();
        for _ in 0..100_000 {
            handle_exit(VcpuExit::MmioWrite(0xdead_0000, &[1]), &bus, &bus);
        }
        // Another test may add its own one or two meanwhile.
        let counted = metrics().vcpu.unhandled_mmio.total() - before;
        assert!((100_000..=100_002).contains(&counted), "{counted}");
    }

    #[test]
    fn guest_shutdown_and_failures_stop_the_vcpu() {
        let bus = Bus::new();
        assert!(matches!(
            handle_exit(VcpuExit::Shutdown, &bus, &bus),
            Some(VcpuStop::GuestShutdown(_))
        ));
        assert!(matches!(
            handle_exit(VcpuExit::InternalError, &bus, &bus),
            Some(VcpuStop::Failed(_))
        ));
        assert!(matches!(
            handle_exit(
                VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_CRASH, &[]),
                &bus,
                &bus
            ),
            Some(VcpuStop::Failed(_))
        ));
    }
}
