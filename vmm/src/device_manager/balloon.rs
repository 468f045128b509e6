//! The balloon device: a virtio device the VMM serves itself (no backend
//! process), in the slot after the entropy device's. Its queues'
//! notifications are ioeventfds and its interrupt an irqfd, as for the
//! others; the main event loop serves the queues and the statistics timer
//! ([`BalloonMonitor`]). Pages the guest gives back are discarded from
//! guest memory ([`crate::memory::discard_range`]): shared memory loses
//! them from its file, so no backend's mapping keeps them either.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use devices::virtio::balloon::{Balloon, BalloonOptions};
use devices::virtio::VirtioTransport;
use event_manager::{EventOps, Events, MutEventSubscriber};
use vm_memory::GuestMemoryMmap;
use vmm_config::BalloonDeviceConfig;
use vmm_sys_util::epoll::EventSet;

use super::placement::{PlaceError, Placement};

/// The balloon device on its transport.
pub type BalloonTransport = Arc<Mutex<VirtioTransport<Balloon>>>;

/// Errors attaching the balloon device.
#[derive(Debug, thiserror::Error)]
pub enum BalloonAttachError {
    #[error("balloon: {0}")]
    Config(#[from] vmm_config::BalloonError),
    #[error("balloon: cannot create its eventfds or timer: {0}")]
    Create(std::io::Error),
    #[error("balloon: {0}")]
    Place(#[from] PlaceError),
}

/// The device's options from its configuration.
pub fn balloon_options(config: &BalloonDeviceConfig) -> BalloonOptions {
    BalloonOptions {
        deflate_on_oom: config.deflate_on_oom,
        stats_polling_interval_s: config.stats_polling_interval_s,
        free_page_hinting: config.free_page_hinting,
        free_page_reporting: config.free_page_reporting,
    }
}

/// Creates the device with `config`'s target and places it (see
/// [`Placement`]).
pub fn attach_balloon_device(
    mem: &GuestMemoryMmap,
    config: &BalloonDeviceConfig,
    mem_size_mib: usize,
    placement: &mut Placement,
) -> Result<BalloonTransport, BalloonAttachError> {
    placement.check_room()?;
    let target = config.target_pages(mem_size_mib)?;
    let discard_mem = mem.clone();
    let discard = Box::new(move |addr, len| {
        crate::memory::discard_range(&discard_mem, addr, len).map_err(|err| err.to_string())
    });
    let device = Balloon::new(mem.clone(), balloon_options(config), target, discard)
        .map_err(BalloonAttachError::Create)?;
    let (transport, location) = placement.place(device)?;
    log::info!("balloon: {location}, target {target} pages");
    Ok(transport)
}

/// Serves the balloon's queues and statistics timer from the main event
/// loop.
pub struct BalloonMonitor {
    transport: BalloonTransport,
    kick_fds: Vec<RawFd>,
    timer_fd: RawFd,
}

impl BalloonMonitor {
    pub fn new(transport: BalloonTransport) -> Self {
        let (kick_fds, timer_fd) = {
            let t = transport.lock().unwrap_or_else(|p| p.into_inner());
            let kicks = t.device().kick_fds().iter().map(|k| k.as_raw_fd());
            (kicks.collect(), t.device().stats_timer_fd())
        };
        BalloonMonitor {
            transport,
            kick_fds,
            timer_fd,
        }
    }
}

impl MutEventSubscriber for BalloonMonitor {
    fn init(&mut self, ops: &mut EventOps) {
        for &fd in self.kick_fds.iter().chain([&self.timer_fd]) {
            if let Err(err) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                log::error!("balloon: cannot watch its queues or timer: {err:?}");
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let mut transport = self.transport.lock().unwrap_or_else(|p| p.into_inner());
        if events.fd() == self.timer_fd {
            transport.device_mut().on_stats_timer();
        } else if let Some(index) = self.kick_fds.iter().position(|&fd| fd == events.fd()) {
            transport.device_mut().on_kick(index);
        }
        // A hinting run the guest ended: the driver reads the new command.
        if transport.device_mut().take_config_change() {
            raise_config_change(&mut transport);
        }
    }
}

/// Tells the driver the balloon's config space changed.
pub fn raise_config_change(transport: &mut VirtioTransport<Balloon>) {
    transport.notify_config_change();
}
