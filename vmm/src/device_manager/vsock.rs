//! The vsock device: one virtio device served by a `vhost-user-vsock`
//! process the VMM starts with the host socket bound at configuration
//! time. It takes the slot after the interfaces'.

use std::sync::{Arc, Mutex};

use devices::vhost_user::vsock::VhostUserVsock;
use devices::vhost_user::VhostUserFrontend;
use devices::virtio::VirtioTransport;
use event_manager::{EventOps, Events, MutEventSubscriber};
use vm_memory::GuestMemoryMmap;

use super::backend_process::{BackendSpawner, BackendTarget};
use super::backend_watch::{BackendWatch, Connector};
use super::placement::Placement;
use super::vhost_user::{self, AttachError, BackendSource, DeviceKind};
use crate::resources::VsockResource;

/// The vsock device on its transport.
pub type VsockTransport = Arc<Mutex<VirtioTransport<VhostUserVsock>>>;

/// The id the device goes by in logs and backend names (Firecracker's
/// `vsock_id` is deprecated and optional).
const VSOCK_ID: &str = "vsock";
/// RX, TX, event.
const QUEUES: u64 = 3;

fn connect(
    vsock: &VsockResource,
    spawner: &BackendSpawner,
) -> Result<VhostUserFrontend, AttachError> {
    // The backend, started elsewhere (jailed or not), needs the path whole:
    // a relative one is relative to this process's directory, as bound.
    let uds_path = std::path::absolute(&vsock.config.uds_path)
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| vsock.config.uds_path.clone());
    let source = BackendSource {
        socket: vsock.config.socket.as_deref(),
        target: BackendTarget::VsockHost {
            uds_path: &uds_path,
            listener: vsock.listener.as_deref(),
        },
        args: vec![
            "--guest-cid".to_string(),
            vsock.config.guest_cid.to_string(),
        ],
        max_queues: QUEUES,
    };
    vhost_user::connect(DeviceKind::Vsock, VSOCK_ID, source, spawner)
}

/// Creates the device and places it (see [`Placement`]).
pub fn attach_vsock_device(
    mem: &GuestMemoryMmap,
    vsock: &VsockResource,
    spawner: &BackendSpawner,
    placement: &mut Placement,
) -> Result<(VsockTransport, Connector), AttachError> {
    vhost_user::check_room(placement, DeviceKind::Vsock, VSOCK_ID)?;
    let frontend = connect(vsock, spawner)?;
    let cid = vsock.config.guest_cid.get();
    let device = VhostUserVsock::new(VSOCK_ID, cid, frontend, mem.clone())?;
    let transport = vhost_user::attach(device, spawner, placement)?;
    log::info!(
        "vsock: guest CID {cid}, host socket {}",
        vsock.config.uds_path
    );
    let (vsock, spawner) = (vsock.clone(), spawner.clone());
    let connector: Connector =
        Box::new(move || connect(&vsock, &spawner).map_err(|err| err.to_string()));
    Ok((transport, connector))
}

/// Watches the vsock device's backend from the main event loop (see
/// [`BackendWatch`]): a new backend is brought in when it is gone; the
/// host's connections ended with the old one, and the guest's get resets.
pub struct VsockBackendMonitor {
    watch: BackendWatch<VhostUserVsock>,
}

impl VsockBackendMonitor {
    pub fn new(transport: VsockTransport, connect: Connector) -> std::io::Result<Self> {
        Ok(Self {
            watch: BackendWatch::new(transport, "vsock", connect)?,
        })
    }
}

impl MutEventSubscriber for VsockBackendMonitor {
    fn init(&mut self, ops: &mut EventOps) {
        self.watch.init(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        self.watch.process(&events, ops);
    }
}
