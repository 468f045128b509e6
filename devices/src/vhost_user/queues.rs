//! What every vhost-user device shares: one kick and one call eventfd per
//! queue (for the VMM to register as ioeventfds and irqfds), and the
//! frontend calls that start the queues on activation and stop them on a
//! driver reset.

use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::{FrontendError, VhostUserFrontend};
use crate::virtio::QueueLayout;

/// A negotiated backend connection with the eventfds of `count` queues.
pub struct VhostUserQueues {
    frontend: VhostUserFrontend,
    mem: GuestMemoryMmap,
    kicks: Vec<EventFd>,
    calls: Vec<EventFd>,
    /// Queues started by the last activation.
    active: usize,
}

impl VhostUserQueues {
    /// Wraps `frontend` and creates the eventfds of `count` queues.
    pub fn new(
        frontend: VhostUserFrontend,
        mem: GuestMemoryMmap,
        count: usize,
    ) -> std::io::Result<Self> {
        let eventfds = || {
            (0..count)
                .map(|_| EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC))
                .collect::<std::io::Result<Vec<_>>>()
        };
        Ok(Self {
            frontend,
            mem,
            kicks: eventfds()?,
            calls: eventfds()?,
            active: 0,
        })
    }

    pub fn frontend_mut(&mut self) -> &mut VhostUserFrontend {
        &mut self.frontend
    }

    pub fn mem(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Each queue's kick eventfd, for ioeventfd registration.
    pub fn kick_fds(&self) -> &[EventFd] {
        &self.kicks
    }

    /// Each queue's call eventfd, for irqfd registration.
    pub fn call_fds(&self) -> &[EventFd] {
        &self.calls
    }

    /// The backend socket, to watch for hang-ups.
    pub fn backend_fd(&self) -> std::os::fd::RawFd {
        self.frontend.socket_fd()
    }

    /// Answers a guest read of `data` at `offset` from the backend's
    /// configuration space of `len` bytes. The whole space is fetched so
    /// that `fix_up` can overwrite the fields the VMM owns whatever the
    /// width and offset of the guest's access; reads outside the space, or
    /// a space of the wrong size, give zeros.
    pub fn read_config(
        &mut self,
        len: usize,
        offset: u64,
        data: &mut [u8],
        fix_up: impl FnOnce(&mut [u8]),
    ) -> Result<(), FrontendError> {
        data.fill(0);
        let Some(start) = usize::try_from(offset).ok().filter(|o| *o <= len) else {
            return Ok(());
        };
        let Some(window) = start.checked_add(data.len()).map(|end| start..end) else {
            return Ok(());
        };
        if window.end > len {
            return Ok(());
        }
        let mut space = self.frontend.get_config(0, len as u32)?;
        if space.len() != len {
            log::warn!(
                "the backend's config space is {} bytes, not {len}",
                space.len()
            );
            return Ok(());
        }
        fix_up(&mut space);
        data.copy_from_slice(&space[window]);
        Ok(())
    }

    /// Shares guest memory with the backend and starts `layouts`.
    pub fn start(
        &mut self,
        acked_features: u64,
        layouts: &[QueueLayout],
        queue_max_size: u16,
    ) -> Result<(), FrontendError> {
        self.frontend.activate(
            &self.mem,
            acked_features,
            layouts,
            queue_max_size,
            &self.kicks,
            &self.calls,
        )?;
        self.active = layouts.len();
        Ok(())
    }

    /// Stops the queues the last activation started (a driver reset).
    pub fn stop(&mut self) -> Result<(), FrontendError> {
        let active = std::mem::take(&mut self.active);
        self.frontend.deactivate(active)
    }
}
