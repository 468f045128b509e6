//! `mem_backend` `Uffd`, Firecracker's page-fault handler protocol: guest
//! RAM is new, empty memory registered with a userfaultfd for missing
//! pages; tessera connects to the handler's Unix socket (`backend_path`)
//! and sends it, in one message, the JSON list of its regions
//! (`base_host_virt_addr`, `size`, `offset` in the memory file, `page_size`
//! and the deprecated `page_size_kib`, both in bytes) with the userfaultfd
//! attached (SCM_RIGHTS). The handler then fills each page the first time
//! the guest or KVM touches it, so an existing Firecracker handler serves
//! a Tessera microVM unchanged.
//!
//! Tessera keeps its end of the userfaultfd and the connection for the
//! microVM's life, as Firecracker does: should the handler die, the guest
//! waits on its missing pages instead of finding zeros; when the microVM
//! ends, the handler sees the connection close.

use std::io::IoSlice;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;

use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use serde::Serialize;
use tessera_uffd::{Uffd, UffdError};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// One region as the handler is told it (Firecracker's
/// `GuestRegionUffdMapping`).
#[derive(Debug, Serialize)]
struct UffdMapping {
    base_host_virt_addr: u64,
    size: usize,
    offset: u64,
    page_size: usize,
    page_size_kib: usize,
}

/// Errors handing guest memory to the handler, in Firecracker's words.
#[derive(Debug, thiserror::Error)]
pub enum UffdHandshakeError {
    #[error("Failed to UFFD object: {0}")]
    Create(UffdError),
    #[error("Failed to register memory address range with the userfaultfd object: {0}")]
    Register(UffdError),
    #[error("Failed to connect to UDS Unix stream: {path}: {source}")]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("Failed to sends file descriptor: {0}")]
    Send(nix::Error),
    #[error("guest memory region at {0:#x} has no host address")]
    HostAddress(u64),
}

/// A page-fault handler serving guest memory: the userfaultfd and the
/// connection it came over, both kept open while the microVM lives.
#[derive(Debug)]
pub struct PageFaultHandler {
    _uffd: Uffd,
    _connection: UnixStream,
}

/// Registers every region of `mem` (pages of `page_size` bytes) with a
/// new userfaultfd and hands it to the handler listening on `socket`.
pub fn hand_to_handler(
    mem: &GuestMemoryMmap,
    page_size: usize,
    socket: &Path,
) -> Result<PageFaultHandler, UffdHandshakeError> {
    let uffd = Uffd::new().map_err(UffdHandshakeError::Create)?;
    let mut mappings = Vec::with_capacity(mem.num_regions());
    let mut offset = 0;
    for region in mem.iter() {
        let addr = mem
            .get_host_address(region.start_addr())
            .map_err(|_| UffdHandshakeError::HostAddress(region.start_addr().0))?
            as u64;
        uffd.register(addr, region.len())
            .map_err(UffdHandshakeError::Register)?;
        mappings.push(UffdMapping {
            base_host_virt_addr: addr,
            size: region.len() as usize,
            offset,
            page_size,
            page_size_kib: page_size,
        });
        offset += region.len();
    }
    let stream = UnixStream::connect(socket).map_err(|source| UffdHandshakeError::Connect {
        path: socket.display().to_string(),
        source,
    })?;
    let body = serde_json::to_vec(&mappings).expect("plain integers serialize");
    let fds = [uffd.as_raw_fd()];
    sendmsg::<()>(
        stream.as_raw_fd(),
        &[IoSlice::new(&body)],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )
    .map_err(UffdHandshakeError::Send)?;
    Ok(PageFaultHandler {
        _uffd: uffd,
        _connection: stream,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_regions_are_described_in_firecrackers_field_names() {
        let mapping = UffdMapping {
            base_host_virt_addr: 0x7f00_0000_0000,
            size: 1 << 20,
            offset: 4096,
            page_size: 4096,
            page_size_kib: 4096,
        };
        assert_eq!(
            serde_json::to_string(&[mapping]).unwrap(),
            r#"[{"base_host_virt_addr":139637976727552,"size":1048576,"offset":4096,"page_size":4096,"page_size_kib":4096}]"#
        );
    }
}
