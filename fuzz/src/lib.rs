//! What the fuzz targets share.
//!
//! - [`GuestRing`]: guest memory holding a split virtqueue that the input
//!   lays out, as a hostile guest would: descriptors (direct, chained,
//!   indirect, pointing anywhere), the avail ring and its index, and bytes
//!   written anywhere in RAM. Addresses are mostly small offsets so that
//!   they land in RAM, but any 64-bit value can be drawn.
//! - [`vhost_user_messages`]: a fuzzed vhost-user byte stream cut into
//!   messages, each with the file descriptors its request carries (memfds
//!   sized as the regions say, eventfds), as a frontend would send them.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixDatagram, UnixStream};

use arbitrary::Arbitrary;
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use virtio_queue::{Queue, QueueT};
use vm_memory::mmap::NewBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// The first RAM region: small, so that drawn offsets land in it.
pub const LOW_RAM_BYTES: usize = 64 * 1024;
/// A second region past a hole, so that buffers can straddle a region's
/// end or fall in the hole.
pub const HIGH_RAM: (u64, usize) = (0x2_0000, 16 * 1024);
/// Where the fixed layout puts the descriptor table, avail and used rings.
const DESC_TABLE: u64 = 0x0;
const AVAIL_RING: u64 = 0x1000;
const USED_RING: u64 = 0x2000;

/// A guest address: usually an offset into RAM, sometimes anything.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Addr {
    Low(u16),
    High(u16),
    Any(u64),
}

impl Addr {
    pub fn get(self) -> u64 {
        match self {
            Addr::Low(offset) => u64::from(offset),
            Addr::High(offset) => HIGH_RAM.0 + u64::from(offset),
            Addr::Any(addr) => addr,
        }
    }
}

/// One descriptor table entry.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub struct Desc {
    pub addr: Addr,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

/// Where the driver put the queue.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Layout {
    Fixed,
    At { desc: Addr, avail: Addr, used: Addr },
}

/// A queue as a hostile driver sets it up.
#[derive(Arbitrary, Debug)]
pub struct GuestRing {
    /// The queue size is `1 << (size_log2 % 9)`: 1 to 256.
    pub size_log2: u8,
    pub layout: Layout,
    pub event_idx: bool,
    pub next_avail: u16,
    pub next_used: u16,
    pub descriptors: Vec<Desc>,
    pub avail_flags: u16,
    pub avail_idx: u16,
    pub avail_ring: Vec<u16>,
    pub used_event: u16,
    /// Bytes written anywhere in RAM after the rings (request headers,
    /// indirect tables, frames).
    pub writes: Vec<(Addr, Vec<u8>)>,
}

/// The addresses of a queue in guest memory.
#[derive(Debug, Clone, Copy)]
pub struct RingAddrs {
    pub size: u16,
    pub desc: GuestAddress,
    pub avail: GuestAddress,
    pub used: GuestAddress,
}

impl GuestRing {
    pub fn size(&self) -> u16 {
        1 << (self.size_log2 % 9)
    }

    /// The ring as a device the VMM serves gets it from its transport.
    pub fn queue_layout(&self) -> devices::virtio::QueueLayout {
        let addrs = self.addrs();
        devices::virtio::QueueLayout {
            size: addrs.size,
            desc_table: addrs.desc,
            avail_ring: addrs.avail,
            used_ring: addrs.used,
        }
    }

    pub fn addrs(&self) -> RingAddrs {
        let (desc, avail, used) = match self.layout {
            Layout::Fixed => (DESC_TABLE, AVAIL_RING, USED_RING),
            Layout::At { desc, avail, used } => (desc.get(), avail.get(), used.get()),
        };
        RingAddrs {
            size: self.size(),
            desc: GuestAddress(desc),
            avail: GuestAddress(avail),
            used: GuestAddress(used),
        }
    }

    /// Guest RAM with the rings and the other writes in place. Writes that
    /// fall outside RAM are dropped, as a guest could not make them.
    pub fn memory<B: NewBitmap>(&self) -> GuestMemoryMmap<B> {
        let mem = GuestMemoryMmap::<B>::from_ranges(&[
            (GuestAddress(0), LOW_RAM_BYTES),
            (GuestAddress(HIGH_RAM.0), HIGH_RAM.1),
        ])
        .expect("fuzz guest memory");
        let addrs = self.addrs();
        for (i, desc) in self.descriptors.iter().take(256).enumerate() {
            let at = addrs.desc.0.wrapping_add(16 * i as u64);
            let mut entry = [0u8; 16];
            entry[0..8].copy_from_slice(&desc.addr.get().to_le_bytes());
            entry[8..12].copy_from_slice(&desc.len.to_le_bytes());
            entry[12..14].copy_from_slice(&desc.flags.to_le_bytes());
            entry[14..16].copy_from_slice(&desc.next.to_le_bytes());
            let _ = mem.write_slice(&entry, GuestAddress(at));
        }
        let avail = addrs.avail.0;
        let _ = mem.write_obj(self.avail_flags, GuestAddress(avail));
        let _ = mem.write_obj(self.avail_idx, GuestAddress(avail.wrapping_add(2)));
        for (i, head) in self.avail_ring.iter().take(256).enumerate() {
            let _ = mem.write_obj(*head, GuestAddress(avail.wrapping_add(4 + 2 * i as u64)));
        }
        let used_event_at = avail.wrapping_add(4 + 2 * u64::from(addrs.size));
        let _ = mem.write_obj(self.used_event, GuestAddress(used_event_at));
        for (addr, bytes) in self.writes.iter().take(64) {
            let _ = mem.write_slice(bytes, GuestAddress(addr.get()));
        }
        mem
    }

    /// A virtio-queue [`Queue`] as the driver set it up, or `None` when the
    /// device would refuse the layout (as the VMM does).
    pub fn queue<B: NewBitmap>(&self, mem: &GuestMemoryMmap<B>) -> Option<Queue> {
        let addrs = self.addrs();
        let mut queue = Queue::new(256).ok()?;
        queue.try_set_size(addrs.size).ok()?;
        queue.try_set_desc_table_address(addrs.desc).ok()?;
        queue.try_set_avail_ring_address(addrs.avail).ok()?;
        queue.try_set_used_ring_address(addrs.used).ok()?;
        queue.set_event_idx(self.event_idx);
        queue.set_next_avail(self.next_avail);
        queue.set_next_used(self.next_used);
        queue.set_ready(true);
        queue.is_valid(mem).then_some(queue)
    }
}

/// vhost-user requests whose file descriptors the stream splitter makes
/// up (the protocol's numbering).
mod request {
    pub const SET_MEM_TABLE: u32 = 5;
    pub const SET_LOG_BASE: u32 = 6;
    pub const SET_LOG_FD: u32 = 7;
    pub const SET_VRING_KICK: u32 = 12;
    pub const SET_VRING_CALL: u32 = 13;
    pub const SET_VRING_ERR: u32 = 14;
    pub const SET_BACKEND_REQ_FD: u32 = 21;
    pub const SET_INFLIGHT_FD: u32 = 32;
    pub const ADD_MEM_REG: u32 = 37;
}
/// The `VHOST_USER_VRING_NOFD_MASK` bit of a vring fd message's payload.
const VRING_NOFD: u64 = 0x100;
/// The header: request, flags, payload size (each a native u32).
pub const HEADER_LEN: usize = 12;
/// The largest memfd the splitter makes for a region or inflight area.
const MAX_MEMFD: u64 = 1 << 20;
/// Flag bit 31 of a header, which no real frontend sets: with it, the
/// splitter leaves a memfd unsealed (a frontend that does not seal its
/// inflight area, which the backend must refuse or survive).
const UNSEALED: u32 = 1 << 31;

/// One message of a vhost-user stream with the fds a frontend would attach.
pub struct Message {
    pub bytes: Vec<u8>,
    pub fds: Vec<OwnedFd>,
}

/// Splits a fuzzed byte stream into vhost-user messages (header, then
/// `size` payload bytes, cut short at the end of the input) and makes up the
/// fds each request carries: a memfd as large as each memory region
/// describes (capped at 1 MiB), an eventfd for a vring's kick, call or err
/// (unless the payload says "no fd"), a memfd for the inflight area and the
/// dirty log, a socket for the backend request channel.
pub fn vhost_user_messages(mut bytes: &[u8]) -> Vec<Message> {
    let mut messages = Vec::new();
    while bytes.len() >= HEADER_LEN && messages.len() < 64 {
        let word = |at: usize| {
            u32::from_ne_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
        };
        let (request, flags, size) = (word(0), word(4), word(8) as usize);
        let end = HEADER_LEN + size.min(bytes.len() - HEADER_LEN);
        let payload = &bytes[HEADER_LEN..end];
        let fds = fds_for(request, flags, payload);
        messages.push(Message {
            bytes: bytes[..end].to_vec(),
            fds,
        });
        bytes = &bytes[end..];
    }
    messages
}

fn u64_at(payload: &[u8], at: usize) -> u64 {
    payload
        .get(at..at + 8)
        .map(|b| u64::from_ne_bytes(b.try_into().unwrap_or_default()))
        .unwrap_or(0)
}

fn fds_for(request: u32, flags: u32, payload: &[u8]) -> Vec<OwnedFd> {
    let sealed = flags & UNSEALED == 0;
    let region_file = |at: usize| {
        memfd(
            u64_at(payload, at + 8).saturating_add(u64_at(payload, at + 24)),
            true,
        )
    };
    match request {
        request::SET_MEM_TABLE => {
            let regions = payload
                .get(0..4)
                .map_or(0, |n| u32::from_ne_bytes(n.try_into().unwrap_or_default()));
            (0..regions.min(8) as usize)
                .filter_map(|i| region_file(8 + 32 * i))
                .collect()
        }
        request::ADD_MEM_REG => region_file(8).into_iter().collect(),
        request::SET_VRING_KICK | request::SET_VRING_CALL | request::SET_VRING_ERR => {
            if u64_at(payload, 0) & VRING_NOFD != 0 {
                Vec::new()
            } else {
                eventfd().into_iter().collect()
            }
        }
        request::SET_INFLIGHT_FD => memfd(
            u64_at(payload, 0).saturating_add(u64_at(payload, 8)),
            sealed,
        )
        .into_iter()
        .collect(),
        request::SET_LOG_BASE => memfd(u64_at(payload, 0).saturating_add(u64_at(payload, 8)), true)
            .into_iter()
            .collect(),
        request::SET_LOG_FD => eventfd().into_iter().collect(),
        request::SET_BACKEND_REQ_FD => UnixStream::pair()
            .ok()
            .map(|(a, _)| OwnedFd::from(a))
            .into_iter()
            .collect(),
        _ => Vec::new(),
    }
}

/// A memfd of `len` bytes (at most 1 MiB), sealed against shrinking and
/// growing when `sealed`.
pub fn memfd(len: u64, sealed: bool) -> Option<OwnedFd> {
    let flags = libc::MFD_ALLOW_SEALING | libc::MFD_CLOEXEC;
    // SAFETY: a plain syscall with a NUL-terminated name.
    let fd = unsafe { libc::memfd_create(c"fuzz".as_ptr(), flags) };
    if fd < 0 {
        return None;
    }
    // SAFETY: `fd` was just created and is owned here.
    let fd: OwnedFd = unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) };
    // SAFETY: resizes the memfd owned here.
    if unsafe { libc::ftruncate(fd.as_raw_fd(), len.min(MAX_MEMFD) as i64) } != 0 {
        return None;
    }
    if sealed {
        // SAFETY: adds seals to the memfd owned here.
        unsafe {
            libc::fcntl(
                fd.as_raw_fd(),
                libc::F_ADD_SEALS,
                libc::F_SEAL_SHRINK | libc::F_SEAL_GROW,
            )
        };
    }
    Some(fd)
}

fn eventfd() -> Option<OwnedFd> {
    // SAFETY: a plain syscall.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    // SAFETY: `fd` was just created and is owned here.
    (fd >= 0).then(|| unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) })
}

/// Sends one message on the socket `fd` with `fds` as `SCM_RIGHTS`; false
/// when the send failed (the reader hung up).
pub fn send_with_fds(fd: RawFd, bytes: &[u8], fds: &[OwnedFd]) -> bool {
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let iov = [std::io::IoSlice::new(bytes)];
    let cmsgs: Vec<ControlMessage<'_>> = if raw.is_empty() {
        Vec::new()
    } else {
        vec![ControlMessage::ScmRights(&raw)]
    };
    sendmsg::<()>(fd, &iov, &cmsgs, MsgFlags::MSG_NOSIGNAL, None).is_ok()
}

/// Sends a fuzzed vhost-user stream on `stream` (see
/// [`vhost_user_messages`]), then shuts its write side so that the backend
/// sees the frontend hang up.
pub fn send_vhost_user_stream(stream: &UnixStream, bytes: &[u8]) {
    for message in vhost_user_messages(bytes) {
        if !send_with_fds(stream.as_raw_fd(), &message.bytes, &message.fds) {
            break;
        }
    }
    let _ = stream.shutdown(std::net::Shutdown::Write);
}

/// Sends one datagram carrying `fd_count` placeholder fds (eventfds), as a
/// SEQPACKET message with `SCM_RIGHTS` would arrive.
pub fn send_datagram(socket: &UnixDatagram, bytes: &[u8], fd_count: usize) -> bool {
    let fds: Vec<OwnedFd> = (0..fd_count).filter_map(|_| eventfd()).collect();
    send_with_fds(socket.as_raw_fd(), bytes, &fds)
}
