//! The entropy device: a virtio device the VMM serves itself (no backend
//! process), in the slot after the vsock device's. Its queue's
//! notification is an ioeventfd and its interrupt an irqfd, as for the
//! others; the main event loop serves the queue ([`EntropyMonitor`]) when
//! the guest notifies it or the rate limiter's timer fires.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use devices::virtio::entropy::Entropy;
use devices::virtio::VirtioTransport;
use event_manager::{EventOps, Events, MutEventSubscriber};
use vm_memory::GuestMemoryMmap;
use vmm_config::EntropyDeviceConfig;
use vmm_sys_util::epoll::EventSet;

use super::placement::{PlaceError, Placement};

/// The entropy device on its transport.
pub type EntropyTransport = Arc<Mutex<VirtioTransport<Entropy>>>;

/// Errors attaching the entropy device.
#[derive(Debug, thiserror::Error)]
pub enum EntropyAttachError {
    #[error("entropy: cannot create its eventfds or rate limiter: {0}")]
    Create(std::io::Error),
    #[error("entropy: {0}")]
    Place(#[from] PlaceError),
}

/// Creates the device and places it (see [`Placement`]).
pub fn attach_entropy_device(
    mem: &GuestMemoryMmap,
    config: &EntropyDeviceConfig,
    placement: &mut Placement,
) -> Result<EntropyTransport, EntropyAttachError> {
    placement.check_room()?;
    let device = Entropy::new(mem.clone(), &config.rate_limiter.unwrap_or_default())
        .map_err(EntropyAttachError::Create)?;
    let (transport, location) = placement.place(device)?;
    log::info!("entropy: {location}");
    Ok(transport)
}

/// Serves the entropy device's queue from the main event loop.
pub struct EntropyMonitor {
    transport: EntropyTransport,
    kick_fd: RawFd,
    limiter_fd: RawFd,
}

impl EntropyMonitor {
    pub fn new(transport: EntropyTransport) -> Self {
        let (kick_fd, limiter_fd) = {
            let t = transport.lock().unwrap_or_else(|p| p.into_inner());
            (t.device().kick_fd().as_raw_fd(), t.device().limiter_fd())
        };
        EntropyMonitor {
            transport,
            kick_fd,
            limiter_fd,
        }
    }
}

impl MutEventSubscriber for EntropyMonitor {
    fn init(&mut self, ops: &mut EventOps) {
        for fd in [self.kick_fd, self.limiter_fd] {
            if let Err(err) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                log::error!("entropy: cannot watch its queue or rate limiter: {err:?}");
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let mut transport = self.transport.lock().unwrap_or_else(|p| p.into_inner());
        if events.fd() == self.kick_fd {
            transport.device_mut().on_kick();
        } else if events.fd() == self.limiter_fd {
            transport.device_mut().on_limiter_timer();
        }
    }
}
