//! Attaches devices to the VM: the legacy devices on the port I/O bus, and
//! the virtio devices (vhost-user block, net and vsock; the VMM's own
//! entropy and balloon devices) on virtio-mmio or, with `--enable-pci`, on
//! the PCI root bus, each with its ioeventfds and irqfds ([`Placement`]).

mod backend_monitor;
mod backend_process;
pub mod backend_starter;
mod backend_watch;
mod balloon;
mod block;
mod entropy;
mod legacy;
mod net;
mod placement;
mod vhost_user;
mod vsock;

pub use backend_monitor::BackendMonitor;
pub use backend_process::{BackendProcessError, BackendSpawner};
pub use backend_watch::Connector;
pub use balloon::{
    attach_balloon_device, balloon_options, raise_config_change, BalloonAttachError,
    BalloonMonitor, BalloonTransport,
};
pub use block::{
    attach_block_device, attach_block_devices, device_order, drive_limits_message, BlockTransport,
};
pub use entropy::{attach_entropy_device, EntropyAttachError, EntropyMonitor, EntropyTransport};
pub use legacy::{attach_legacy_devices, DeviceError, LegacyDevices};
pub use net::{
    attach_net_device, attach_net_devices, interface_limits_messages, Interfaces,
    NetBackendMonitor, NetTransport,
};
pub use placement::{
    attach_pci_root, hotplug_placement, place_on_pci, remove_from_pci, virtio_mmio_slot, Location,
    PciBus, PlaceError, Placement,
};
pub use vhost_user::{spawner, AttachError, DeviceKind};
pub use vsock::{attach_vsock_device, VsockBackendMonitor, VsockTransport};
