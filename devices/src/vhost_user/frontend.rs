//! The vhost-user frontend: connection, feature and protocol negotiation,
//! and the per-activation setup of memory and queues (vhost crate).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;

use vhost::vhost_user::message::FrontendReq;
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserInflight, VhostUserProtocolFeatures,
    VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend as _};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use tessera_backend_control::CONTROL_OFFSET;

use super::{BackendRegion, DeviceName, DirtyLog, PageFaultServer};
use crate::virtio::QueueLayout;

/// vhost-user's own feature bit: the backend speaks protocol features.
pub const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;

/// Errors talking to a backend.
#[derive(Debug, thiserror::Error)]
pub enum FrontendError {
    #[error("cannot connect to the backend at {path}: {source}")]
    Connect { path: String, source: vhost::Error },
    #[error("the backend failed at {step}: {source}")]
    Protocol {
        step: &'static str,
        source: vhost::Error,
    },
    #[error("the backend lacks the {0} protocol feature")]
    MissingProtocolFeature(&'static str),
    #[error("guest memory region at {0:#x} is not shareable (not file-backed)")]
    Memory(u64),
    #[error("queue {0} lies outside guest memory")]
    QueueAddress(usize),
    #[error("cannot create an eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("cannot fill guest memory from the snapshot before the backend maps it: {0}")]
    FillMemory(std::io::Error),
    #[error("the backend did not say where it mapped guest memory (postcopy)")]
    NoBackendMappings,
    #[error("the backend cannot log the pages it writes (it lacks VHOST_F_LOG_ALL or the LOG_SHMFD protocol feature)")]
    CannotLog,
}

impl FrontendError {
    /// Whether the connection is gone (the backend died, hung up or stopped
    /// answering), rather than a request refused on a live connection.
    pub fn is_disconnect(&self) -> bool {
        match self {
            Self::Connect { .. } => true,
            Self::Protocol { source, .. } => is_transport_failure(source),
            _ => false,
        }
    }
}

/// The inflight region a frontend keeps across backends: its description
/// and the sealed memfd the first backend made.
pub type InflightRegion = (VhostUserInflight, File);

fn is_transport_failure(err: &vhost::Error) -> bool {
    use vhost::vhost_user::Error as E;
    matches!(
        err,
        vhost::Error::VhostUserProtocol(
            E::SocketError(_)
                | E::SocketBroken(_)
                | E::SocketRetry(_)
                | E::PartialMessage
                | E::Disconnected
                | E::InvalidMessage
        )
    )
}

fn step(step: &'static str) -> impl FnOnce(vhost::Error) -> FrontendError {
    move |source| FrontendError::Protocol { step, source }
}

/// What an activation hands the backend.
#[derive(Clone, Copy)]
pub struct QueueSetup<'a> {
    pub mem: &'a GuestMemoryMmap,
    pub acked_features: u64,
    pub queues: &'a [QueueLayout],
    pub queue_max_size: u16,
    pub kicks: &'a [EventFd],
    pub calls: &'a [EventFd],
    /// A new backend takes over running queues: each starts from its used
    /// index in guest memory, as QEMU restarts a crashed vhost-user
    /// backend, and one with the inflight region also resubmits what its
    /// predecessor left in flight. Otherwise the queues start at 0.
    pub resume: bool,
    /// With a backend that can, it marks in this log every page it writes.
    pub log: Option<&'a DirtyLog>,
    /// Guest memory a loaded snapshot fills on demand: the backend reports
    /// the faults of its mappings to this server, or, if it cannot, the
    /// server fills all of memory first.
    pub page_faults: Option<&'a dyn PageFaultServer>,
}

/// A negotiated connection to one backend.
pub struct VhostUserFrontend {
    frontend: Frontend,
    backend_features: u64,
    queue_num: usize,
    /// Whether the backend tracks requests in flight in a shared region.
    inflight_acked: bool,
    /// Whether the backend has a config space (the CONFIG protocol
    /// feature); Cloud Hypervisor's and DPDK's net backends do not.
    has_config: bool,
    /// Whether the backend can log the pages it writes into a shared
    /// bitmap (`VHOST_F_LOG_ALL` and the LOG_SHMFD protocol feature).
    can_log: bool,
    /// Whether the backend can report the faults of its mappings of guest
    /// memory (the PAGEFAULT protocol feature: vhost-user postcopy).
    can_postcopy: bool,
    /// Postcopy is listening on this connection: every SET_MEM_TABLE is
    /// answered with the backend's mappings, and acknowledged.
    postcopy_listening: bool,
    /// That region, kept from activation to the next driver reset, so that
    /// it outlives the backend (what a reconnect needs).
    inflight: Option<(VhostUserInflight, File)>,
}

impl VhostUserFrontend {
    /// Connects to a backend listening on `path`.
    pub fn connect(path: &Path, max_queues: u64) -> Result<Self, FrontendError> {
        let stream = UnixStream::connect(path).map_err(|err| FrontendError::Connect {
            path: path.display().to_string(),
            source: vhost::Error::VhostUserProtocol(vhost::vhost_user::Error::SocketConnect(err)),
        })?;
        Self::from_stream(stream, max_queues)
    }

    /// Negotiates over an already connected stream.
    pub fn from_stream(stream: UnixStream, max_queues: u64) -> Result<Self, FrontendError> {
        let _deadline = super::watchdog::arm(std::os::fd::AsRawFd::as_raw_fd(&stream));
        let mut frontend = Frontend::from_stream(stream, max_queues);
        frontend.set_owner().map_err(step("SET_OWNER"))?;
        let backend_features = frontend.get_features().map_err(step("GET_FEATURES"))?;
        if backend_features & VHOST_USER_F_PROTOCOL_FEATURES == 0 {
            return Err(FrontendError::MissingProtocolFeature("any"));
        }
        let offered = frontend
            .get_protocol_features()
            .map_err(step("GET_PROTOCOL_FEATURES"))?;
        let wanted = VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD
            | VhostUserProtocolFeatures::LOG_SHMFD
            | VhostUserProtocolFeatures::PAGEFAULT;
        let acked = offered & wanted;
        frontend
            .set_protocol_features(acked)
            .map_err(step("SET_PROTOCOL_FEATURES"))?;
        if acked.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        let queue_num = if acked.contains(VhostUserProtocolFeatures::MQ) {
            frontend.get_queue_num().map_err(step("GET_QUEUE_NUM"))? as usize
        } else {
            1
        };
        Ok(Self {
            frontend,
            backend_features,
            queue_num: queue_num.min(max_queues as usize).max(1),
            inflight_acked: acked.contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD),
            has_config: acked.contains(VhostUserProtocolFeatures::CONFIG),
            can_log: acked.contains(VhostUserProtocolFeatures::LOG_SHMFD)
                && backend_features & VhostUserVirtioFeatures::LOG_ALL.bits() != 0,
            can_postcopy: acked.contains(VhostUserProtocolFeatures::PAGEFAULT),
            postcopy_listening: false,
            inflight: None,
        })
    }

    /// The virtio features the backend offers (without vhost-user's own
    /// bits).
    pub fn backend_features(&self) -> u64 {
        self.backend_features
            & !(VHOST_USER_F_PROTOCOL_FEATURES | VhostUserVirtioFeatures::LOG_ALL.bits())
    }

    /// Whether the backend can log the pages it writes.
    pub fn can_log(&self) -> bool {
        self.can_log
    }

    /// How many queues the backend serves.
    pub fn queue_num(&self) -> usize {
        self.queue_num
    }

    /// Whether the backend has a config space to read and write.
    pub fn has_config(&self) -> bool {
        self.has_config
    }

    /// Reads the device configuration space.
    pub fn get_config(&mut self, offset: u32, len: u32) -> Result<Vec<u8>, FrontendError> {
        if !self.has_config {
            return Err(FrontendError::MissingProtocolFeature("CONFIG"));
        }
        let buf = vec![0u8; len as usize];
        let (_, payload) = self.transport("GET_CONFIG", |f| {
            f.get_config(offset, len, VhostUserConfigFlags::WRITABLE, &buf)
        })?;
        Ok(payload)
    }

    /// Writes the device configuration space.
    pub fn set_config(&mut self, offset: u32, data: &[u8]) -> Result<(), FrontendError> {
        if !self.has_config {
            return Err(FrontendError::MissingProtocolFeature("CONFIG"));
        }
        self.transport("SET_CONFIG", |f| {
            f.set_config(offset, VhostUserConfigFlags::WRITABLE, data)
        })
    }

    /// Shares guest memory and starts the queues `setup` describes.
    pub fn activate(
        &mut self,
        device: &DeviceName,
        setup: &QueueSetup<'_>,
    ) -> Result<(), FrontendError> {
        let QueueSetup {
            mem,
            acked_features,
            queues,
            queue_max_size,
            kicks,
            calls,
            resume,
            log,
            page_faults,
        } = *setup;
        let log = log.filter(|_| self.can_log);
        let log_all = if log.is_some() {
            VhostUserVirtioFeatures::LOG_ALL.bits()
        } else {
            0
        };
        self.transport("SET_FEATURES", |f| {
            f.set_features(acked_features | VHOST_USER_F_PROTOCOL_FEATURES | log_all)
        })?;
        let regions = mem
            .iter()
            .map(|region| {
                VhostUserMemoryRegionInfo::from_guest_region(region).map_err(|_| {
                    FrontendError::Memory(vm_memory::GuestMemoryRegion::start_addr(region).0)
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.share_memory(device, &regions, page_faults)?;
        if let Some(log) = log {
            // After SET_MEM_TABLE: a backend attaches the log to the
            // regions it has mapped.
            self.transport("SET_LOG_BASE", |f| f.set_log_base(0, Some(log.region())))?;
        }
        if self.inflight_acked {
            self.share_inflight_region(queue_max_size)?;
        }
        for (index, ((layout, kick), call)) in queues.iter().zip(kicks).zip(calls).enumerate() {
            let host = |addr| {
                mem.get_host_address(addr)
                    .map(|p| p as u64)
                    .map_err(|_| FrontendError::QueueAddress(index))
            };
            let config = VringConfigData {
                queue_max_size,
                queue_size: layout.size,
                flags: 0,
                desc_table_addr: host(layout.desc_table)?,
                used_ring_addr: host(layout.used_ring)?,
                avail_ring_addr: host(layout.avail_ring)?,
                log_addr: None,
            };
            self.transport("SET_VRING_NUM", |f| f.set_vring_num(index, layout.size))?;
            self.transport("SET_VRING_ADDR", |f| f.set_vring_addr(index, &config))?;
            let base = if resume {
                let used_idx = vm_memory::GuestAddress(layout.used_ring.0.wrapping_add(2));
                mem.read_obj::<u16>(used_idx)
                    .map_err(|_| FrontendError::QueueAddress(index))?
            } else {
                0
            };
            self.transport("SET_VRING_BASE", |f| {
                f.set_vring_base(index, u16::from_le(base))
            })?;
            self.transport("SET_VRING_CALL", |f| f.set_vring_call(index, call))?;
            self.transport("SET_VRING_KICK", |f| f.set_vring_kick(index, kick))?;
            self.transport("SET_VRING_ENABLE", |f| f.set_vring_enable(index, true))?;
        }
        Ok(())
    }

    /// SET_MEM_TABLE; while guest memory is filled on demand, with the
    /// backend's mappings registered for faults first (postcopy), or all of
    /// memory filled before a backend that cannot report them maps it.
    fn share_memory(
        &mut self,
        device: &DeviceName,
        regions: &[VhostUserMemoryRegionInfo],
        page_faults: Option<&dyn PageFaultServer>,
    ) -> Result<(), FrontendError> {
        let Some(server) = page_faults else {
            self.transport("SET_MEM_TABLE", |f| f.set_mem_table(regions))?;
            return Ok(());
        };
        if !self.can_postcopy {
            server.fill_all().map_err(FrontendError::FillMemory)?;
            self.transport("SET_MEM_TABLE", |f| f.set_mem_table(regions))?;
            return Ok(());
        }
        let uffd = if self.postcopy_listening {
            None
        } else {
            match self.transport("POSTCOPY_ADVISE", |f| f.postcopy_advise()) {
                Ok(uffd) => {
                    self.transport("POSTCOPY_LISTEN", |f| f.postcopy_listen())?;
                    self.postcopy_listening = true;
                    Some(uffd)
                }
                Err(err) if err.is_disconnect() => return Err(err),
                Err(err) => {
                    // A backend that may not create a userfaultfd (an
                    // unprivileged one, where vm.unprivileged_userfaultfd
                    // is 0) maps memory once it is all there.
                    log::info!("{device}: {err}; filling guest memory before it maps it");
                    self.can_postcopy = false;
                    server.fill_all().map_err(FrontendError::FillMemory)?;
                    self.transport("SET_MEM_TABLE", |f| f.set_mem_table(regions))?;
                    return Ok(());
                }
            }
        };
        let bases = self
            .transport("SET_MEM_TABLE", |f| f.set_mem_table(regions))?
            .ok_or(FrontendError::NoBackendMappings)?;
        let mapped = regions
            .iter()
            .zip(bases)
            .map(|(region, base)| BackendRegion {
                guest_addr: region.guest_phys_addr,
                backend_addr: base,
                len: region.memory_size,
            })
            .collect();
        match uffd {
            Some(uffd) => server.serve_backend(device, uffd, mapped),
            None => server.update_backend(device, mapped),
        }
        self.transport("POSTCOPY_ACK", |f| {
            f.postcopy_ack_mem_regions(FrontendReq::SET_MEM_TABLE)
        })
    }

    /// Has the backend track requests in flight in a region this side
    /// keeps (as QEMU does): made by the backend at the first activation
    /// after a reset (GET_INFLIGHT_FD), handed back at every activation
    /// (SET_INFLIGHT_FD).
    fn share_inflight_region(&mut self, queue_size: u16) -> Result<(), FrontendError> {
        if self.inflight.is_none() {
            let asked = VhostUserInflight {
                mmap_size: 0,
                mmap_offset: 0,
                num_queues: u16::try_from(self.queue_num).unwrap_or(u16::MAX),
                queue_size,
            };
            let region = self.transport("GET_INFLIGHT_FD", |f| f.get_inflight_fd(&asked))?;
            self.inflight = Some(region);
        }
        if let Some((region, file)) = &self.inflight {
            let (region, fd) = (*region, file.as_raw_fd());
            self.transport("SET_INFLIGHT_FD", |f| f.set_inflight_fd(&region, fd))?;
        }
        Ok(())
    }

    /// Gives up the inflight region, for the next backend.
    pub fn take_inflight(&mut self) -> Option<InflightRegion> {
        self.inflight.take()
    }

    /// Hands this backend the region an earlier one tracked requests in.
    pub fn keep_inflight(&mut self, region: Option<InflightRegion>) {
        if self.inflight_acked {
            self.inflight = region;
        }
    }

    /// Stops the first `queues` queues (a driver reset); the backend keeps
    /// its connection and can be activated again, with a fresh inflight
    /// region.
    pub fn deactivate(&mut self, queues: usize) -> Result<(), FrontendError> {
        self.inflight = None;
        for index in 0..queues {
            self.transport("SET_VRING_ENABLE", |f| f.set_vring_enable(index, false))?;
            self.transport("GET_VRING_BASE", |f| f.get_vring_base(index))?;
        }
        Ok(())
    }

    /// Sends the VMM's control message (see `tessera-backend-control`):
    /// SET_CONFIG at the control offset, answered through REPLY_ACK.
    pub fn control(&mut self, message: &[u8]) -> Result<(), FrontendError> {
        if !self.has_config {
            return Err(FrontendError::MissingProtocolFeature("CONFIG"));
        }
        self.transport("control message", |f| {
            f.set_config(CONTROL_OFFSET, VhostUserConfigFlags::WRITABLE, message)
        })
    }

    /// Has the backend serving the guest's queues (negotiated with
    /// `acked_features`) log the pages it writes in `log` from now on:
    /// SET_LOG_BASE, then SET_FEATURES with `VHOST_F_LOG_ALL`.
    pub fn start_logging(
        &mut self,
        log: &DirtyLog,
        acked_features: u64,
    ) -> Result<(), FrontendError> {
        if !self.can_log {
            return Err(FrontendError::CannotLog);
        }
        self.transport("SET_LOG_BASE", |f| f.set_log_base(0, Some(log.region())))?;
        self.transport("SET_FEATURES", |f| {
            f.set_features(
                acked_features
                    | VHOST_USER_F_PROTOCOL_FEATURES
                    | VhostUserVirtioFeatures::LOG_ALL.bits(),
            )
        })
    }

    /// Stops the first `queues` queues for a snapshot: the backend replies
    /// to GET_VRING_BASE once a queue's requests in flight are complete.
    /// The inflight region is kept.
    pub fn suspend(&mut self, queues: usize) -> Result<(), FrontendError> {
        for index in 0..queues {
            self.transport("SET_VRING_ENABLE", |f| f.set_vring_enable(index, false))?;
            self.transport("GET_VRING_BASE", |f| f.get_vring_base(index))?;
        }
        Ok(())
    }

    /// Runs one exchange with the backend, under the reply watchdog's
    /// deadline. A transport failure (no reply in time, a broken or garbled
    /// stream) leaves the connection out of step, so the VMM hangs up:
    /// later exchanges fail at once, and the backend monitor sees the
    /// hang-up, instead of each vCPU access waiting out the deadline again.
    fn transport<T>(
        &mut self,
        step: &'static str,
        exchange: impl FnOnce(&mut Frontend) -> Result<T, vhost::Error>,
    ) -> Result<T, FrontendError> {
        let deadline = super::watchdog::arm(self.socket_fd());
        let result = exchange(&mut self.frontend);
        drop(deadline);
        result.map_err(|source| {
            if is_transport_failure(&source) {
                log::error!("the backend failed at {step}: {source}; hanging up on it");
                self.hang_up();
            }
            FrontendError::Protocol { step, source }
        })
    }

    /// Ends the connection (the socket stays open until drop): the backend
    /// sees the frontend leave, and the VMM's backend monitor a hang-up.
    pub fn hang_up(&self) {
        // SAFETY: shutdown only changes the state of our own socket, which
        // stays open (and owned by `frontend`) until drop.
        unsafe { libc::shutdown(self.socket_fd(), libc::SHUT_RDWR) };
    }

    /// The socket, to watch for the backend hanging up.
    pub fn socket_fd(&self) -> std::os::fd::RawFd {
        self.frontend.as_raw_fd()
    }
}
