//! `uffd-handler SOCKET MEMORY_FILE`: a page-fault handler for snapshots
//! loaded with `mem_backend` `Uffd`, speaking Firecracker's protocol, so
//! that it serves Tessera and Firecracker alike. It listens on SOCKET;
//! each VMM that connects sends the JSON list of its guest memory regions
//! with its userfaultfd attached, and from then on every page the guest
//! first touches is copied in from MEMORY_FILE (mapped once, shared by
//! every VMM served). A page given back (a balloon's `REMOVE`) comes back
//! as zeros, as in Firecracker's example handler. When a VMM is gone it
//! prints `uffd-handler: <pid or n>: served <pages> page faults` to stderr.

use std::collections::HashSet;
use std::io::IoSliceMut;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::ExitCode;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
use serde::Deserialize;
use tessera_uffd::{Event, Uffd};

/// One region as the VMM describes it.
#[derive(Debug, Deserialize)]
struct Mapping {
    base_host_virt_addr: u64,
    size: u64,
    offset: u64,
    page_size: u64,
}

/// The memory file, mapped read-only.
struct MemoryFile {
    ptr: *const u8,
    len: u64,
}

// SAFETY: a read-only mapping that lives for the whole process.
unsafe impl Send for MemoryFile {}
// SAFETY: as above; it is only read.
unsafe impl Sync for MemoryFile {}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [socket, memory] = args.as_slice() else {
        eprintln!("usage: uffd-handler SOCKET MEMORY_FILE");
        return ExitCode::from(2);
    };
    let file = match std::fs::File::open(memory) {
        Ok(f) => f,
        Err(err) => {
            eprintln!("uffd-handler: {memory}: {err}");
            return ExitCode::FAILURE;
        }
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let Some(length) = std::num::NonZeroUsize::new(len as usize) else {
        eprintln!("uffd-handler: {memory} is empty");
        return ExitCode::FAILURE;
    };
    // SAFETY: a new read-only private mapping of the whole file.
    let mapped = unsafe {
        nix::sys::mman::mmap(
            None,
            length,
            nix::sys::mman::ProtFlags::PROT_READ,
            nix::sys::mman::MapFlags::MAP_PRIVATE,
            file.as_fd(),
            0,
        )
    };
    let ptr = match mapped {
        Ok(p) => p.as_ptr().cast::<u8>().cast_const(),
        Err(err) => {
            eprintln!("uffd-handler: cannot map {memory}: {err}");
            return ExitCode::FAILURE;
        }
    };
    let memory: &'static MemoryFile = Box::leak(Box::new(MemoryFile { ptr, len }));
    let _ = std::fs::remove_file(socket);
    let listener = match UnixListener::bind(socket) {
        Ok(l) => l,
        Err(err) => {
            eprintln!("uffd-handler: cannot listen on {socket}: {err}");
            return ExitCode::FAILURE;
        }
    };
    for (n, stream) in listener.incoming().enumerate() {
        match stream {
            Ok(stream) => {
                std::thread::spawn(move || serve(n, stream, memory));
            }
            Err(err) => eprintln!("uffd-handler: accept: {err}"),
        }
    }
    ExitCode::SUCCESS
}

/// Takes one VMM's handshake and serves its faults until it is gone.
fn serve(n: usize, stream: UnixStream, memory: &MemoryFile) {
    let (mappings, uffd) = match handshake(&stream) {
        Ok(h) => h,
        Err(err) => {
            eprintln!("uffd-handler: {n}: bad handshake: {err}");
            return;
        }
    };
    let mut removed = HashSet::new();
    let mut served = 0u64;
    loop {
        // The VMM keeps the connection open while its microVM lives.
        let mut fds = [
            PollFd::new(uffd.as_fd(), PollFlags::POLLIN),
            PollFd::new(stream.as_fd(), PollFlags::POLLIN),
        ];
        if poll(&mut fds, PollTimeout::NONE).is_err() {
            break;
        }
        let gone = |fd: &PollFd| {
            fd.revents()
                .unwrap_or(PollFlags::empty())
                .intersects(PollFlags::POLLHUP | PollFlags::POLLERR | PollFlags::POLLIN)
        };
        if gone(&fds[1]) {
            break;
        }
        if !gone(&fds[0]) {
            continue;
        }
        match uffd.read_event() {
            Ok(Some(Event::PageFault { addr })) => {
                match fill(&uffd, &mappings, memory, &removed, addr) {
                    Ok(()) => served += 1,
                    Err(err) => {
                        eprintln!("uffd-handler: {n}: fault at {addr:#x}: {err}");
                        break;
                    }
                }
            }
            Ok(Some(Event::Remove { start, end })) => {
                let page = mappings.first().map_or(4096, |m| m.page_size);
                removed.extend((start..end).step_by(page as usize));
            }
            Ok(Some(_)) | Ok(None) => {}
            Err(err) => {
                eprintln!("uffd-handler: {n}: read: {err}");
                break;
            }
        }
    }
    eprintln!("uffd-handler: {n}: served {served} page faults");
}

/// The regions and the userfaultfd, from the VMM's one message.
fn handshake(stream: &UnixStream) -> Result<(Vec<Mapping>, Uffd), String> {
    let mut buf = vec![0u8; 64 << 10];
    let mut cmsg = nix::cmsg_space!(std::os::fd::RawFd);
    let (bytes, fd) = {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(|e| e.to_string())?;
        let fd = msg
            .cmsgs()
            .map_err(|e| e.to_string())?
            .find_map(|c| match c {
                ControlMessageOwned::ScmRights(fds) => fds.first().copied(),
                _ => None,
            })
            .ok_or("no userfaultfd attached")?;
        (msg.bytes, fd)
    };
    // SAFETY: the descriptor just arrived with the message; nothing else
    // owns it.
    let uffd = Uffd::from_fd(unsafe { OwnedFd::from_raw_fd(fd) });
    let mappings = serde_json::from_slice(&buf[..bytes]).map_err(|e| e.to_string())?;
    Ok((mappings, uffd))
}

/// Copies the page holding `addr` in from the memory file (zeros if it was
/// given back).
fn fill(
    uffd: &Uffd,
    mappings: &[Mapping],
    memory: &MemoryFile,
    removed: &HashSet<u64>,
    addr: u64,
) -> Result<(), String> {
    let mapping = mappings
        .iter()
        .find(|m| addr >= m.base_host_virt_addr && addr - m.base_host_virt_addr < m.size)
        .ok_or("outside every region")?;
    let page = addr & !(mapping.page_size - 1);
    if removed.contains(&page) {
        return uffd
            .zeropage(page, mapping.page_size)
            .map(drop)
            .map_err(|e| e.to_string());
    }
    let offset = mapping.offset + (page - mapping.base_host_virt_addr);
    if offset + mapping.page_size > memory.len {
        return Err(format!("offset {offset:#x} is past the memory file"));
    }
    // SAFETY: `offset + page_size` lies inside the read-only mapping of
    // the memory file, which lives for the whole process.
    unsafe { uffd.copy(page, memory.ptr.add(offset as usize), mapping.page_size) }
        .map(drop)
        .map_err(|e| e.to_string())
}
