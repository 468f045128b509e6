//! Decides when the VM is over: on an i8042 reset, or when a vCPU stops.

use std::sync::mpsc::Receiver;

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::vstate::vcpu::{VcpuStop, VcpuStopReport};
use crate::ExitCode;

/// Event-loop subscriber that records why and how the VM ends.
pub struct ExitHandler {
    reset_evt: EventFd,
    vcpu_stop_evt: EventFd,
    vcpu_stops: Receiver<VcpuStopReport>,
    exit_code: Option<ExitCode>,
}

impl ExitHandler {
    pub fn new(
        reset_evt: EventFd,
        vcpu_stop_evt: EventFd,
        vcpu_stops: Receiver<VcpuStopReport>,
    ) -> Self {
        Self {
            reset_evt,
            vcpu_stop_evt,
            vcpu_stops,
            exit_code: None,
        }
    }

    /// The exit code, once the VM has ended.
    pub fn exit_code(&self) -> Option<ExitCode> {
        self.exit_code
    }

    fn end(&mut self, code: ExitCode) {
        // The first reason wins: later vCPU stops are consequences.
        self.exit_code.get_or_insert(code);
    }
}

impl MutEventSubscriber for ExitHandler {
    fn init(&mut self, ops: &mut EventOps) {
        let registered = [&self.reset_evt, &self.vcpu_stop_evt]
            .into_iter()
            .try_for_each(|evt| ops.add(Events::new(evt, EventSet::IN)));
        if let Err(err) = registered {
            log::error!("cannot watch the VM exit events: {err:?}");
            self.end(ExitCode::UnexpectedError);
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.fd() == std::os::fd::AsRawFd::as_raw_fd(&self.reset_evt) {
            let _ = self.reset_evt.read();
            log::info!("the guest reset the CPU through the i8042; the VM is over");
            self.end(ExitCode::Ok);
            return;
        }
        let _ = self.vcpu_stop_evt.read();
        while let Ok(report) = self.vcpu_stops.try_recv() {
            match report.reason {
                VcpuStop::GuestShutdown(_) => self.end(ExitCode::Ok),
                VcpuStop::Failed(_) => self.end(ExitCode::GenericError),
            }
        }
    }
}
