//! Network devices: one virtio device per interface, served by a
//! `vhost-user-net` process: an external one (`socket`) or one the VMM
//! starts for the interface's TAP (`host_dev_name`, with `--queues` twice
//! `num_queue_pairs`). They take the slots after the drives'.
//!
//! An interface's RX and TX rate limits, and its MMDS settings and store,
//! go to its backend as control messages, before the guest starts the
//! device, and again to every backend that takes over.
//!
//! The control queue stays in the VMM: its notification is an ioeventfd
//! of its own that [`NetBackendMonitor`] watches on the main event loop,
//! and its interrupt an irqfd like the backend's queues'.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use devices::vhost_user::net::VhostUserNet;
use devices::vhost_user::{VhostUserDevice as _, VhostUserFrontend};
use devices::virtio::VirtioTransport;
use event_manager::{EventOps, Events, MutEventSubscriber};
use tessera_backend_control::{ControlMessage, LimitTarget};
use tessera_rate_limiter::RateLimiterConfig;
use vm_memory::GuestMemoryMmap;
use vmm_config::{parse_mac, NetworkInterfaceConfig};
use vmm_sys_util::epoll::EventSet;

use super::backend_process::{BackendSpawner, BackendTarget};
use super::backend_watch::{BackendWatch, Connector};
use super::placement::Placement;
use super::vhost_user::{self, AttachError, BackendSource, DeviceKind};
use crate::mmds::MmdsService;

/// RX and TX: the queues of one pair.
const QUEUES_PER_PAIR: u64 = 2;

/// A network device on its transport.
pub type NetTransport = Arc<Mutex<VirtioTransport<VhostUserNet>>>;

/// Connects to the interface's backend, or starts one for its TAP with
/// a queue pair per `num_queue_pairs`. At most that many pairs are used.
fn connect(
    iface: &NetworkInterfaceConfig,
    spawner: &BackendSpawner,
) -> Result<VhostUserFrontend, AttachError> {
    let mut args = Vec::new();
    if let Some(mac) = &iface.guest_mac {
        args.extend(["--mac".to_string(), mac.clone()]);
    }
    if let Some(mtu) = iface.mtu {
        args.extend(["--mtu".to_string(), mtu.to_string()]);
    }
    let source = BackendSource {
        socket: iface.socket.as_deref(),
        target: BackendTarget::Tap {
            name: iface.host_dev_name.as_deref().unwrap_or_default(),
            queue_pairs: iface.queue_pairs(),
        },
        args,
        max_queues: QUEUES_PER_PAIR * u64::from(iface.queue_pairs()),
    };
    vhost_user::connect(DeviceKind::Interface, &iface.iface_id, source, spawner)
}

/// The control messages that give an interface's backend the limits of
/// `rx` and `tx` (those that limit something, or all given when `all`:
/// an update that lifts a limit must reach the backend).
pub fn interface_limits_messages(
    rx: Option<RateLimiterConfig>,
    tx: Option<RateLimiterConfig>,
    all: bool,
) -> Vec<ControlMessage> {
    [(LimitTarget::Rx, rx), (LimitTarget::Tx, tx)]
        .into_iter()
        .filter_map(|(target, limits)| {
            let limits = limits.filter(|l| all || l.limits_anything())?;
            Some(ControlMessage::RateLimits { target, limits })
        })
        .collect()
}

/// The limits an interface starts with.
fn interface_limits(iface: &NetworkInterfaceConfig) -> Vec<ControlMessage> {
    interface_limits_messages(iface.rx_rate_limiter, iface.tx_rate_limiter, false)
}

/// The interfaces to attach, and how those that serve MMDS do: the
/// service and the messages that carry the store.
#[derive(Clone, Copy)]
pub struct Interfaces<'a> {
    pub configs: &'a [NetworkInterfaceConfig],
    pub mmds: Option<(&'a MmdsService, &'a [ControlMessage])>,
}

/// Creates a device per interface and places it (see [`Placement`]).
pub fn attach_net_devices(
    mem: &GuestMemoryMmap,
    interfaces: Interfaces<'_>,
    spawner: &BackendSpawner,
    placement: &mut Placement,
) -> Result<Vec<(NetTransport, Connector)>, AttachError> {
    interfaces
        .configs
        .iter()
        .map(|iface| attach_net_device(mem, iface, interfaces.mmds, spawner, placement))
        .collect()
}

/// Creates the device of `iface` and places it; `mmds` is how interfaces
/// serve MMDS, if any does.
pub fn attach_net_device(
    mem: &GuestMemoryMmap,
    iface: &NetworkInterfaceConfig,
    mmds: Option<(&MmdsService, &[ControlMessage])>,
    spawner: &BackendSpawner,
    placement: &mut Placement,
) -> Result<(NetTransport, Connector), AttachError> {
    let id = iface.iface_id.clone();
    vhost_user::check_room(placement, DeviceKind::Interface, &id)?;
    let frontend = connect(iface, spawner)?;
    let mac = iface.guest_mac.as_deref().and_then(parse_mac);
    let mut device = VhostUserNet::new(&id, frontend, mem.clone(), mac, iface.queue_pairs())?;
    let mut groups: Vec<Vec<ControlMessage>> = interface_limits(iface)
        .into_iter()
        .map(|m| vec![m])
        .collect();
    if let Some((service, store)) = mmds.filter(|(s, _)| s.serves(&id)) {
        groups.push(vec![service.config_message()]);
        groups.push(store.to_vec());
    }
    for group in groups {
        device
            .queues_mut()
            .send_controls(&group)
            .map_err(|source| AttachError::Frontend {
                kind: DeviceKind::Interface,
                id: id.clone(),
                source,
            })?;
    }
    let pairs = device.queue_pairs();
    let transport = vhost_user::attach(device, spawner, placement)?;
    log::info!("interface {id}: {pairs} queue pair(s)");
    let (iface, spawner) = (iface.clone(), spawner.clone());
    let connector: Connector =
        Box::new(move || connect(&iface, &spawner).map_err(|err| err.to_string()));
    Ok((transport, connector))
}

/// Watches one network device from the main event loop: its backend (see
/// [`BackendWatch`]: a new one is brought in when it is gone; frames in
/// flight are lost, the link comes back), and the notifications of its
/// control queue (with several queue pairs), which the VMM answers.
pub struct NetBackendMonitor {
    watch: BackendWatch<VhostUserNet>,
    /// The control queue's kick eventfd (owned by the device, which the
    /// transport keeps alive).
    ctrl_kick_fd: RawFd,
}

impl NetBackendMonitor {
    /// Watches the backend and the control queue of `transport`; `connect`
    /// brings a new backend.
    pub fn new(transport: NetTransport, connect: Connector) -> std::io::Result<Self> {
        let ctrl_kick_fd = transport
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .device()
            .ctrl_eventfds()
            .1
            .as_raw_fd();
        Ok(Self {
            watch: BackendWatch::new(transport, "interface", connect)?,
            ctrl_kick_fd,
        })
    }
}

impl MutEventSubscriber for NetBackendMonitor {
    fn init(&mut self, ops: &mut EventOps) {
        self.watch.init(ops);
        if let Err(err) = ops.add(Events::new_raw(self.ctrl_kick_fd, EventSet::IN)) {
            log::error!("cannot watch a network control queue: {err:?}");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.fd() == self.ctrl_kick_fd {
            self.watch
                .transport()
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .device_mut()
                .process_ctrl_queue();
            return;
        }
        self.watch.process(&events, ops);
    }
}
