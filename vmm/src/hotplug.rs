//! Device hot-plug on the PCI root bus (`--enable-pci`), as Firecracker's
//! developer preview defines it: `PUT /drives/{id}` and
//! `PUT /network-interfaces/{id}` after boot attach a new device, and
//! `DELETE` of either detaches one. Tessera also tells the guest: the ACPI
//! GED interrupt makes a guest with ACPI scan the new slot (no manual
//! rescan), and a `DELETE` of a device the guest drives asks it to let go
//! (an eject request) and waits for its `_EJ0`, so the device is never
//! pulled from under a driver. A guest without ACPI removes the device
//! itself first (`echo 1 > /sys/bus/pci/devices/<bdf>/remove`).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::vhost_user::{DeviceKind, DeviceName, VhostUserDevice};
use devices::virtio::{QueueEventfds, VirtioTransport};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_config::{BlockDeviceConfig, NetworkInterfaceConfig};

use crate::device_manager::{self, AttachError, PciBus};
use crate::runtime::{Subscriber, Vmm};
use event_manager::SubscriberOps;

/// How long a `DELETE` waits for the guest to let go of a device.
const EJECT_TIMEOUT: Duration = Duration::from_secs(15);
/// How often it looks.
const EJECT_POLL: Duration = Duration::from_millis(10);

/// Errors plugging or unplugging a device.
#[derive(Debug, thiserror::Error)]
pub enum HotplugError {
    #[error("PCI is not enabled: start with --enable-pci to hot-plug devices")]
    PciDisabled,
    #[error("Device ID in use: {0}")]
    IdInUse(DeviceName),
    #[error("Device not found: {0}")]
    NotFound(DeviceName),
    #[error("Cannot hot-plug a root device: {0}")]
    Root(String),
    #[error("Cannot unplug root device: {0}")]
    UnplugRoot(String),
    #[error("devices cannot be plugged or unplugged during a live migration")]
    Migrating,
    #[error(
        "guest memory is not shared with backends (no vhost-user device at load): {0} cannot be plugged"
    )]
    PrivateMemory(DeviceName),
    #[error("{0}: no backend starter for its kind")]
    NoSpawner(DeviceName),
    #[error(transparent)]
    Attach(#[from] AttachError),
    #[error(transparent)]
    Resources(#[from] crate::resources::ResourcesError),
    #[error("{0}: the guest did not release it within {1:?}; it stays")]
    NotReleased(DeviceName, Duration),
    #[error("{0}: cannot watch its backend: {1}")]
    Monitor(DeviceName, std::io::Error),
}

fn lock<T: ?Sized>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl Vmm {
    fn pci_for_hotplug(&self, name: &DeviceName) -> Result<PciBus, HotplugError> {
        let pci = self.devices.pci.clone().ok_or(HotplugError::PciDisabled)?;
        if self.is_migrating() {
            return Err(HotplugError::Migrating);
        }
        let shared = self
            ._guest_memory
            .iter()
            .all(|region| region.file_offset().is_some());
        if !shared {
            return Err(HotplugError::PrivateMemory(name.clone()));
        }
        Ok(pci)
    }

    /// Whether hot-plug is possible at all (`--enable-pci`): without it a
    /// `PUT` after boot gets Firecracker's usual refusal.
    pub(crate) fn can_hotplug(&self) -> bool {
        self.devices.pci.is_some()
    }

    /// `PUT /drives/{id}` after boot: a new drive in the lowest free slot.
    pub(crate) fn hotplug_drive(&mut self, drive: BlockDeviceConfig) -> Result<(), HotplugError> {
        let name = DeviceName::new(DeviceKind::Drive, &drive.drive_id);
        let pci = self.pci_for_hotplug(&name)?;
        if self
            .resources
            .drives
            .iter()
            .any(|d| d.drive_id == drive.drive_id)
        {
            return Err(HotplugError::IdInUse(name));
        }
        if drive.is_root_device {
            return Err(HotplugError::Root(drive.drive_id));
        }
        drive
            .validate()
            .map_err(crate::resources::ResourcesError::from)?;
        let spawner = self
            .devices
            .block_spawner
            .clone()
            .ok_or_else(|| HotplugError::NoSpawner(name.clone()))?;
        let queues = u64::from(self.resources.machine_config.vcpu_count);
        let (transport, connect) =
            device_manager::hotplug_placement(&self._vm, &pci, |placement| {
                device_manager::attach_block_device(
                    &self._guest_memory,
                    &drive,
                    &spawner,
                    queues,
                    placement,
                )
            })?;
        let monitor = device_manager::BackendMonitor::new(transport.clone(), connect);
        self.watch_plugged(&name, &transport, monitor)?;
        self.devices.block.push(transport.clone());
        self.resources.insert_drive(drive)?;
        announce(&pci, &transport, &name);
        Ok(())
    }

    /// `PUT /network-interfaces/{id}` after boot: a new interface in the
    /// lowest free slot.
    pub(crate) fn hotplug_interface(
        &mut self,
        iface: NetworkInterfaceConfig,
    ) -> Result<(), HotplugError> {
        let name = DeviceName::new(DeviceKind::Interface, &iface.iface_id);
        let pci = self.pci_for_hotplug(&name)?;
        let known = self.resources.network_interfaces.iter();
        if known.clone().any(|i| i.iface_id == iface.iface_id) {
            return Err(HotplugError::IdInUse(name));
        }
        // The checks made before boot (MAC and TAP clashes), on a copy; the
        // backend checks the TAP itself.
        let mut checked = self.resources.clone();
        checked.insert_network_interface_for_backend(iface.clone())?;
        let spawner = self
            .devices
            .net_spawner
            .clone()
            .ok_or_else(|| HotplugError::NoSpawner(name.clone()))?;
        let mmds_messages = self.devices.mmds.as_mut().map(|service| {
            let store = service.store_messages(&self.resources.mmds);
            (service.config_message(), store)
        });
        let mmds = self.devices.mmds.as_ref().zip(mmds_messages.as_ref());
        let (transport, connect) =
            device_manager::hotplug_placement(&self._vm, &pci, |placement| {
                device_manager::attach_net_device(
                    &self._guest_memory,
                    &iface,
                    mmds.map(|(service, (_, store))| (service, store.as_slice())),
                    &spawner,
                    placement,
                )
            })?;
        let monitor = device_manager::NetBackendMonitor::new(transport.clone(), connect);
        self.watch_plugged(&name, &transport, monitor)?;
        self.devices.net.push(transport.clone());
        self.resources = checked;
        announce(&pci, &transport, &name);
        Ok(())
    }

    /// Watches a plugged device's backend from the event loop, and gives
    /// it the dirty-page log if the microVM tracks dirty pages.
    fn watch_plugged<D: VhostUserDevice, M>(
        &mut self,
        name: &DeviceName,
        transport: &Mutex<VirtioTransport<D>>,
        monitor: std::io::Result<M>,
    ) -> Result<(), HotplugError>
    where
        M: event_manager::MutEventSubscriber + Send + 'static,
    {
        let monitor = monitor.map_err(|err| HotplugError::Monitor(name.clone(), err))?;
        if let (Some(log), true) = (
            &self.dirty_log,
            self.resources.machine_config.track_dirty_pages,
        ) {
            lock(transport)
                .device_mut()
                .queues_mut()
                .set_dirty_log(log.clone());
        }
        let subscriber: Subscriber = Arc::new(Mutex::new(monitor));
        let id = self.event_manager.add_subscriber(subscriber);
        self.devices.monitors.insert(name.clone(), id);
        Ok(())
    }

    /// `DELETE /drives/{id}`.
    pub(crate) fn unplug_drive(&mut self, id: &str) -> Result<(), HotplugError> {
        let root = self
            .resources
            .drives
            .iter()
            .any(|d| d.drive_id == id && d.is_root_device);
        if root && self.devices.pci.is_some() {
            return Err(HotplugError::UnplugRoot(id.to_string()));
        }
        self.unplug(DeviceName::new(DeviceKind::Drive, id), |d| &mut d.block)?;
        self.resources.drives.retain(|d| d.drive_id != id);
        Ok(())
    }

    /// `DELETE /network-interfaces/{id}`.
    pub(crate) fn unplug_interface(&mut self, id: &str) -> Result<(), HotplugError> {
        self.unplug(DeviceName::new(DeviceKind::Interface, id), |d| &mut d.net)?;
        self.resources
            .network_interfaces
            .retain(|i| i.iface_id != id);
        Ok(())
    }

    /// Takes device `name` out of the list `of` picks in the devices, once
    /// the guest let go of it (see [`release`]).
    fn unplug<D: VhostUserDevice + QueueEventfds>(
        &mut self,
        name: DeviceName,
        of: impl Fn(&mut crate::runtime::Devices) -> &mut Vec<Arc<Mutex<VirtioTransport<D>>>>,
    ) -> Result<(), HotplugError> {
        let pci = self.pci_for_hotplug(&name)?;
        let index = of(&mut self.devices)
            .iter()
            .position(|t| lock(t).device().queues().device() == &name)
            .ok_or_else(|| HotplugError::NotFound(name.clone()))?;
        let transport = of(&mut self.devices)[index].clone();
        release(&pci, &transport, &name, || self.serve_ctrl_queues())?;
        self.detach(&pci, &name, &transport);
        of(&mut self.devices).remove(index);
        Ok(())
    }

    /// Answers the network devices' control queues, which the event loop
    /// serves: a guest letting go of a NIC waits for their answers.
    fn serve_ctrl_queues(&self) {
        for transport in &self.devices.net {
            lock(transport).device_mut().process_ctrl_queue();
        }
    }

    /// Takes a released device off the bus and stops watching its backend,
    /// which hangs up when the last handle on the device goes.
    fn detach<D: VhostUserDevice + QueueEventfds>(
        &mut self,
        pci: &PciBus,
        name: &DeviceName,
        transport: &Arc<Mutex<VirtioTransport<D>>>,
    ) {
        device_manager::remove_from_pci(&self._vm, pci, transport);
        if let Some(id) = self.devices.monitors.remove(name) {
            if let Err(err) = self.event_manager.remove_subscriber(id) {
                log::warn!("{name}: cannot stop watching its backend: {err:?}");
            }
        }
        lock(transport).device().queues().hang_up();
        log::info!("{name}: unplugged");
    }
}

/// Tells the guest about the device in its new slot.
fn announce<D: VhostUserDevice>(
    pci: &PciBus,
    transport: &Mutex<VirtioTransport<D>>,
    name: &DeviceName,
) {
    if let Some(slot) = lock(transport).pci_slot() {
        log::info!("{name}: hot-plugged in PCI slot {slot}");
        pci.hotplug.announce_added(slot);
    }
}

/// Makes sure the guest no longer drives the device: at once if no driver
/// holds it (never bound, or a sysfs `remove`); otherwise
/// the guest is asked to eject it and has [`EJECT_TIMEOUT`] to do so.
/// Meanwhile `serve` answers what the guest may wait for.
fn release<D: VhostUserDevice>(
    pci: &PciBus,
    transport: &Mutex<VirtioTransport<D>>,
    name: &DeviceName,
    mut serve: impl FnMut(),
) -> Result<(), HotplugError> {
    let slot = {
        let transport = lock(transport);
        // No driver: never bound, or unbound (Linux's virtio core leaves
        // ACKNOWLEDGE set when its driver goes).
        if transport.core().status() & devices::virtio::status::DRIVER == 0 {
            return Ok(());
        }
        match transport.pci_slot() {
            Some(slot) => slot,
            None => return Ok(()),
        }
    };
    pci.hotplug.request_removal(slot);
    let deadline = Instant::now() + EJECT_TIMEOUT;
    loop {
        if pci.hotplug.take_ejected().contains(&slot) {
            return Ok(());
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            pci.hotplug.cancel_removal(slot);
            return Err(HotplugError::NotReleased(name.clone(), EJECT_TIMEOUT));
        }
        serve();
        std::thread::sleep(left.min(EJECT_POLL));
    }
}
