//! Guest memory that a loaded snapshot fills on demand while backends
//! share it: each backend reports the faults of its own mappings through
//! a userfaultfd it hands the VMM (vhost-user postcopy: `POSTCOPY_ADVISE`,
//! `POSTCOPY_LISTEN`, then `SET_MEM_TABLE` answered with the backend's
//! mapping of each region), so that no backend ever reads a page the
//! memory file has not filled yet, nor fills one with zeros.

use std::fs::File;

use super::DeviceName;

/// One region of guest memory as a backend maps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackendRegion {
    pub guest_addr: u64,
    /// Where the backend mapped it, in its own address space.
    pub backend_addr: u64,
    pub len: u64,
}

/// The VMM's side of memory filled on demand.
pub trait PageFaultServer: Send + Sync {
    /// Serves the faults of `device`'s backend from now on: its
    /// userfaultfd and its mappings (any earlier backend of the device is
    /// forgotten).
    fn serve_backend(&self, device: &DeviceName, uffd: File, regions: Vec<BackendRegion>);

    /// `device`'s backend mapped guest memory again (a new SET_MEM_TABLE
    /// on the same connection): its faults now come from `regions`.
    fn update_backend(&self, device: &DeviceName, regions: Vec<BackendRegion>);

    /// Fills every page not filled yet, for a backend that cannot report
    /// its faults: once this returns it may map guest memory as it is.
    fn fill_all(&self) -> std::io::Result<()>;
}
