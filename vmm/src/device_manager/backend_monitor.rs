//! Watches each block device's backend from the main event loop (see
//! [`BackendWatch`]). A disk given up is answered by the VMM: every request
//! on it completes with an I/O error, so the guest sees failures on that
//! disk only, never a request that waits forever, and the VMM keeps
//! running.

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::backend_watch::{BackendWatch, Connector, Watched};
use super::block::BlockTransport;
use devices::vhost_user::blk::VhostUserBlock;
use devices::vhost_user::VhostUserDevice;

/// Event-loop subscriber for one block device's backend.
pub struct BackendMonitor {
    watch: BackendWatch<VhostUserBlock>,
    kicks: Vec<EventFd>,
}

impl BackendMonitor {
    /// Watches the backend of `transport`; `connect` brings a new one.
    pub fn new(transport: BlockTransport, connect: Connector) -> std::io::Result<Self> {
        let kicks = transport
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .device()
            .queues()
            .kick_fds()
            .iter()
            .map(EventFd::try_clone)
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(Self {
            watch: BackendWatch::new(transport, "drive", connect)?,
            kicks,
        })
    }
}

impl MutEventSubscriber for BackendMonitor {
    fn init(&mut self, ops: &mut EventOps) {
        self.watch.init(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match self.watch.process(&events, ops) {
            Watched::Handled => return,
            Watched::GaveUp => {
                for kick in &self.kicks {
                    if let Err(err) = ops.add(Events::new(kick, EventSet::IN)) {
                        log::error!("cannot watch a failed disk's queue: {err:?}");
                    }
                }
            }
            Watched::NotOurs => {
                if let Some(kick) = self
                    .kicks
                    .iter()
                    .find(|k| std::os::fd::AsRawFd::as_raw_fd(*k) == events.fd())
                {
                    let _ = kick.read();
                }
            }
        }
        self.watch
            .transport()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .device_mut()
            .fail_pending_requests();
    }
}
