//! What attaching any vhost-user device takes, whatever its kind: a
//! backend (an external socket, or a process the VMM starts for the
//! device's file or TAP), a slot wired straight to the backend, and errors
//! that name the device by kind and id.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

pub use devices::vhost_user::DeviceKind;
use devices::vhost_user::{
    DeviceModel, FrontendError, VhostUser, VhostUserDevice, VhostUserDeviceError, VhostUserFrontend,
};
use devices::virtio::VirtioTransport;

use super::backend_process::{BackendProcessError, BackendSpawner, BackendTarget};
use super::placement::{Location, PlaceError, Placement};
use crate::builder::BootOptions;

/// The backend binary the VMM starts for a kind of device.
fn backend_binary(kind: DeviceKind) -> &'static str {
    match kind {
        DeviceKind::Drive => "vhost-user-blk",
        DeviceKind::Interface => "vhost-user-net",
        DeviceKind::Vsock => "vhost-user-vsock",
    }
}

/// Errors attaching a vhost-user device.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("too many virtio devices: {kind} {id}: {source}")]
    NoSlot {
        kind: DeviceKind,
        id: String,
        source: PlaceError,
    },
    #[error("{kind} {id}: {source}")]
    Backend {
        kind: DeviceKind,
        id: String,
        source: BackendProcessError,
    },
    #[error("{kind} {id}: {source}")]
    Frontend {
        kind: DeviceKind,
        id: String,
        source: FrontendError,
    },
    #[error(transparent)]
    Device(#[from] VhostUserDeviceError),
    #[error("{kind} {id}: {source}")]
    Attach {
        kind: DeviceKind,
        id: String,
        source: PlaceError,
    },
    #[error("{kind} {id}: cannot add it to the kernel command line: {source}")]
    Cmdline {
        kind: DeviceKind,
        id: String,
        source: linux_loader::cmdline::Error,
    },
}

/// Where one device's backend comes from.
pub struct BackendSource<'a> {
    /// An external backend's socket; otherwise the VMM starts one.
    pub socket: Option<&'a str>,
    /// What a started backend serves.
    pub target: BackendTarget<'a>,
    /// A started backend's own flags.
    pub args: Vec<String>,
    /// The most queues the device may use.
    pub max_queues: u64,
}

/// Connects to the device's backend: its socket, or a backend the VMM
/// starts for it.
pub fn connect(
    kind: DeviceKind,
    id: &str,
    source: BackendSource,
    spawner: &BackendSpawner,
) -> Result<VhostUserFrontend, AttachError> {
    let frontend_err = |source| AttachError::Frontend {
        kind,
        id: id.to_string(),
        source,
    };
    if let Some(socket) = source.socket {
        return VhostUserFrontend::connect(Path::new(socket), source.max_queues)
            .map_err(frontend_err);
    }
    let stream = spawner
        .spawn(id, source.target, &source.args)
        .map_err(|err| AttachError::Backend {
            kind,
            id: id.to_string(),
            source: err,
        })?;
    VhostUserFrontend::from_stream(stream, source.max_queues).map_err(frontend_err)
}

/// A vhost-user device on its transport.
pub type Transport<M> = Arc<Mutex<VirtioTransport<VhostUser<M>>>>;

/// Checks that device `id` of `kind` has a slot, before its backend is
/// started.
pub fn check_room(placement: &Placement, kind: DeviceKind, id: &str) -> Result<(), AttachError> {
    placement
        .check_room()
        .map_err(|source| AttachError::NoSlot {
            kind,
            id: id.to_string(),
            source,
        })
}

/// Puts `device` in its slot: it reads its backend's counters (when the
/// VMM started the backend), the guest's notifications of each queue go to
/// the backend's kick eventfd (an ioeventfd) and the backend's call
/// eventfds interrupt the guest (irqfds).
pub fn attach<M: DeviceModel + 'static>(
    mut device: VhostUser<M>,
    spawner: &BackendSpawner,
    placement: &mut Placement,
) -> Result<Transport<M>, AttachError> {
    let name = device.queues().device().clone();
    if let Some(page) = spawner.stats(&name.id) {
        device.queues_mut().read_backend_stats(page);
    }
    let (transport, location): (Transport<M>, Location) =
        placement
            .place(device)
            .map_err(|source| AttachError::Attach {
                kind: name.kind,
                id: name.id.clone(),
                source,
            })?;
    log::info!("{name}: {location}");
    Ok(transport)
}

/// What starts `kind`'s backends: `binary` (from the command line) or the
/// one next to tessera, through the jailer's launcher or the VMM's
/// backend starter.
pub fn spawner(
    kind: DeviceKind,
    binary: Option<&PathBuf>,
    options: &BootOptions,
) -> Result<BackendSpawner, AttachError> {
    BackendSpawner::new(
        binary
            .cloned()
            .unwrap_or_else(|| BackendSpawner::default_binary(backend_binary(kind))),
        options.backend_launcher.clone(),
        options.backend_run_dir.clone(),
        kind.as_str(),
        options.seccomp.clone(),
    )
    .map_err(|source| AttachError::Backend {
        kind,
        id: "(all)".into(),
        source,
    })
}
