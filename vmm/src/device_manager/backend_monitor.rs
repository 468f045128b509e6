//! Watches each block backend's vhost-user socket from the main event loop.
//! When a backend hangs up (it crashed, was killed, or exited), the VMM takes
//! over that disk's queues and completes every request with an I/O error:
//! the guest sees failures on that disk only, and the VMM keeps running.

use std::os::fd::RawFd;

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::block::BlockTransport;

/// Event-loop subscriber for one block device's backend.
pub struct BackendMonitor {
    transport: BlockTransport,
    socket_fd: RawFd,
    kicks: Vec<EventFd>,
}

impl BackendMonitor {
    /// Watches the backend of `transport`.
    pub fn new(transport: BlockTransport) -> std::io::Result<Self> {
        let guard = transport.lock().unwrap_or_else(|p| p.into_inner());
        let device = guard.device();
        let socket_fd = device.queues().backend_fd();
        let kicks = device
            .queues()
            .kick_fds()
            .iter()
            .map(EventFd::try_clone)
            .collect::<std::io::Result<Vec<_>>>()?;
        drop(guard);
        Ok(Self {
            transport,
            socket_fd,
            kicks,
        })
    }

    fn hang_up_events(&self) -> Events {
        Events::new_raw(
            self.socket_fd,
            EventSet::READ_HANG_UP | EventSet::HANG_UP | EventSet::ERROR,
        )
    }
}

impl MutEventSubscriber for BackendMonitor {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(err) = ops.add(self.hang_up_events()) {
            log::error!("cannot watch a block backend's socket: {err:?}");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let mut transport = self.transport.lock().unwrap_or_else(|p| p.into_inner());
        if events.fd() == self.socket_fd {
            let _ = ops.remove(self.hang_up_events());
            transport.device_mut().take_over_queues();
            for kick in &self.kicks {
                if let Err(err) = ops.add(Events::new(kick, EventSet::IN)) {
                    log::error!("cannot watch a failed disk's queue: {err:?}");
                }
            }
            return;
        }
        if let Some(kick) = self
            .kicks
            .iter()
            .find(|k| std::os::fd::AsRawFd::as_raw_fd(*k) == events.fd())
        {
            let _ = kick.read();
        }
        transport.device_mut().fail_pending_requests();
    }
}
