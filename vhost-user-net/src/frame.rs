//! Frames between a guest's descriptor chains and the TAP: every
//! guest-controlled value is checked (directions, lengths, addresses) before
//! the data moves with one readv/writev straight to or from guest memory.

use std::io;
use std::os::fd::RawFd;

use vhost_user_common::BackendMemory;
use virtio_queue::desc::split::Descriptor;
use vm_memory::bitmap::Bitmap;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

/// The virtio-net header with VIRTIO_F_VERSION_1 (`virtio_net_hdr_v1`).
pub const VNET_HDR_LEN: usize = 12;
/// Offset of `num_buffers` in that header.
const NUM_BUFFERS_OFFSET: u64 = 10;
/// The largest frame: a 64 KiB GSO packet with its Ethernet header.
pub const MAX_FRAME_LEN: usize = 65_535 + 14;
/// The Ethernet header and one 802.1Q tag, in front of an MTU of payload.
const ETH_VLAN_HLEN: usize = 14 + 4;
/// The most descriptors one frame may use.
pub const MAX_DESCRIPTORS: usize = 256;
/// The most iovecs one readv takes (IOV_MAX).
const IOV_MAX: usize = 1024;

/// Why a frame was dropped.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("a {0} chain has a descriptor with the wrong direction")]
    WrongDirection(&'static str),
    #[error("a {0} chain of {1} bytes is shorter than the virtio-net header")]
    TooShort(&'static str, usize),
    #[error("a TX frame of {0} bytes is larger than {MAX_FRAME_LEN} plus the header")]
    TooLong(usize),
    #[error("a chain has more than {MAX_DESCRIPTORS} descriptors")]
    TooManyDescriptors,
    #[error("guest memory at {addr:#x} (+{len}) is not mapped")]
    BadAddress { addr: u64, len: u32 },
    #[error("a frame of more than {0} bytes did not fit in the RX buffers")]
    Truncated(usize),
    #[error("TAP I/O failed: {0}")]
    Io(io::Error),
}

/// The most bytes (virtio-net header included) one frame from the TAP can
/// take: a 64 KiB GSO packet when the TAP may pass those to the guest,
/// else one MTU of payload behind Ethernet and VLAN headers.
pub fn largest_rx_frame(gso: bool, mtu: u16) -> usize {
    if gso {
        MAX_FRAME_LEN + VNET_HDR_LEN
    } else {
        (usize::from(mtu) + ETH_VLAN_HLEN + VNET_HDR_LEN).min(MAX_FRAME_LEN + VNET_HDR_LEN)
    }
}

/// The iovecs of a chain's buffers, all of one direction.
fn iovecs(
    descriptors: &[Descriptor],
    mem: &BackendMemory,
    writable: bool,
    what: &'static str,
    out: &mut Vec<libc::iovec>,
) -> Result<usize, FrameError> {
    if descriptors.len() > MAX_DESCRIPTORS {
        return Err(FrameError::TooManyDescriptors);
    }
    let mut total = 0;
    for desc in descriptors {
        if desc.is_write_only() != writable {
            return Err(FrameError::WrongDirection(what));
        }
        let bad = || FrameError::BadAddress {
            addr: desc.addr().0,
            len: desc.len(),
        };
        let slice = mem
            .get_slice(desc.addr(), desc.len() as usize)
            .map_err(|_| bad())?;
        if writable {
            // The TAP read fills it behind vm-memory's back.
            slice.bitmap().mark_dirty(0, slice.len());
        }
        out.push(libc::iovec {
            iov_base: slice.ptr_guard_mut().as_ptr().cast(),
            iov_len: desc.len() as usize,
        });
        total += desc.len() as usize;
    }
    Ok(total)
}

/// Sends the frame in one TX chain (header and data, device-readable) to
/// `fd`. Returns the bytes sent.
pub fn transmit(
    descriptors: &[Descriptor],
    mem: &BackendMemory,
    fd: RawFd,
) -> Result<usize, FrameError> {
    let mut iov = Vec::with_capacity(descriptors.len());
    let total = iovecs(descriptors, mem, false, "TX", &mut iov)?;
    if total < VNET_HDR_LEN {
        return Err(FrameError::TooShort("TX", total));
    }
    if total > MAX_FRAME_LEN + VNET_HDR_LEN {
        return Err(FrameError::TooLong(total));
    }
    // SAFETY: every iovec addresses mapped guest memory checked above, and
    // writev only reads it.
    let n = unsafe { libc::writev(fd, iov.as_ptr(), iov.len() as libc::c_int) };
    if n < 0 {
        return Err(FrameError::Io(io::Error::last_os_error()));
    }
    Ok(n as usize)
}

/// Reads up to `limit` bytes of a TX chain (header included), through
/// vm-memory: for frames the backend looks at rather than forwards.
pub fn read_chain(
    descriptors: &[Descriptor],
    mem: &BackendMemory,
    limit: usize,
) -> Result<Vec<u8>, FrameError> {
    if descriptors.len() > MAX_DESCRIPTORS {
        return Err(FrameError::TooManyDescriptors);
    }
    let mut out = Vec::new();
    for desc in descriptors {
        if desc.is_write_only() {
            return Err(FrameError::WrongDirection("TX"));
        }
        let take = (desc.len() as usize).min(limit - out.len());
        let start = out.len();
        out.resize(start + take, 0);
        mem.read_slice(&mut out[start..], desc.addr())
            .map_err(|_| FrameError::BadAddress {
                addr: desc.addr().0,
                len: desc.len(),
            })?;
        if out.len() == limit {
            break;
        }
    }
    Ok(out)
}

/// Writes `frame` (from its Ethernet header on) behind a zeroed
/// virtio-net header into the first chains, as [`receive_into`] does with
/// a frame from the TAP. A frame the chains cannot hold is refused.
pub fn deliver_into(
    chains: &[RxChain],
    frame: &[u8],
    mem: &BackendMemory,
    mergeable: bool,
) -> Result<Received, FrameError> {
    let len = VNET_HDR_LEN + frame.len();
    let usable = usable_chains(chains.len(), mergeable);
    let capacity: usize = chains[..usable].iter().map(|c| c.capacity).sum();
    if len > capacity {
        return Err(FrameError::TooLong(len));
    }
    let header = [0u8; VNET_HDR_LEN];
    let mut bytes = header.iter().chain(frame).copied();
    let mut used = Vec::new();
    let mut left = len;
    for chain in &chains[..usable] {
        let take = left.min(chain.capacity);
        let mut to_copy = take;
        for iov in &chain.iov {
            if to_copy == 0 {
                break;
            }
            let n = to_copy.min(iov.iov_len);
            let piece: Vec<u8> = bytes.by_ref().take(n).collect();
            // SAFETY: check_rx_chain mapped this device-writable iovec (at
            // least n bytes) in the memory snapshot the caller still holds;
            // `piece` is a separate buffer of n bytes.
            unsafe { std::ptr::copy_nonoverlapping(piece.as_ptr(), iov.iov_base.cast(), n) };
            to_copy -= n;
        }
        used.push(take as u32);
        left -= take;
        if left == 0 {
            break;
        }
    }
    if mergeable {
        write_num_buffers(&chains[0], used.len(), mem)?;
    }
    Ok(Received::Frame { len, used })
}

/// The outcome of reading one frame into RX chains.
#[derive(Debug, PartialEq, Eq)]
pub enum Received {
    /// Nothing to read.
    Empty,
    /// A frame of `len` bytes (header included) filled the first chains;
    /// `used` says how many bytes each consumed chain got.
    Frame { len: usize, used: Vec<u32> },
}

/// One RX chain, checked once when popped: its head, the iovecs of its
/// buffers (device-writable, mapped) and where its `num_buffers` lies.
/// The iovecs point into guest memory: use them only while the memory
/// snapshot they were checked against is held.
pub struct RxChain {
    pub head: u16,
    pub capacity: usize,
    iov: Vec<libc::iovec>,
    num_buffers: Option<GuestAddress>,
}

/// Checks an RX chain (directions, addresses, room for the header).
pub fn check_rx_chain(
    head: u16,
    descriptors: &[Descriptor],
    mem: &BackendMemory,
) -> Result<RxChain, FrameError> {
    let mut iov = Vec::with_capacity(descriptors.len());
    let capacity = iovecs(descriptors, mem, true, "RX", &mut iov)?;
    if capacity < VNET_HDR_LEN {
        return Err(FrameError::TooShort("RX", capacity));
    }
    Ok(RxChain {
        head,
        capacity,
        iov,
        num_buffers: header_byte(descriptors, NUM_BUFFERS_OFFSET),
    })
}

/// Reads one frame from `fd` into `chains` (device-writable buffers). With
/// `mergeable` (VIRTIO_NET_F_MRG_RXBUF) a frame may span several chains and
/// `num_buffers` in its header says how many; otherwise only the first
/// chain is used. (The backend keeps checked chains across frames and
/// calls [`receive_into`].)
#[cfg(test)]
pub fn receive(
    chains: &[Vec<Descriptor>],
    mem: &BackendMemory,
    fd: RawFd,
    mergeable: bool,
) -> Result<Received, FrameError> {
    let usable = usable_chains(chains.len(), mergeable);
    let checked = chains[..usable]
        .iter()
        .map(|chain| check_rx_chain(0, chain, mem))
        .collect::<Result<Vec<_>, _>>()?;
    receive_into(&checked, &mut Vec::new(), mem, fd, mergeable)
}

/// As [`receive`], into chains checked by [`check_rx_chain`] (in their
/// order in the ring); `scratch` holds the iovecs between calls.
pub fn receive_into(
    chains: &[RxChain],
    scratch: &mut Vec<libc::iovec>,
    mem: &BackendMemory,
    fd: RawFd,
    mergeable: bool,
) -> Result<Received, FrameError> {
    let wanted = usable_chains(chains.len(), mergeable);
    // Whole chains only, and no more iovecs than readv takes, with room
    // for one byte past them: a frame that reaches it did not fit (the
    // TAP returns only what it copied).
    scratch.clear();
    let mut usable = 0;
    let mut capacity = 0;
    for chain in &chains[..wanted] {
        if scratch.len() + chain.iov.len() >= IOV_MAX {
            break;
        }
        scratch.extend_from_slice(&chain.iov);
        capacity += chain.capacity;
        usable += 1;
    }
    if usable == 0 {
        return Ok(Received::Empty);
    }
    let mut overflow = 0u8;
    scratch.push(libc::iovec {
        iov_base: (&raw mut overflow).cast(),
        iov_len: 1,
    });
    // SAFETY: the iovecs address device-writable guest memory mapped in the
    // caller's snapshot (check_rx_chain), then `overflow`, alive past readv.
    let n = unsafe { libc::readv(fd, scratch.as_ptr(), scratch.len() as libc::c_int) };
    if n < 0 {
        let err = io::Error::last_os_error();
        if err.kind() == io::ErrorKind::WouldBlock {
            return Ok(Received::Empty);
        }
        return Err(FrameError::Io(err));
    }
    if n as usize > capacity {
        return Err(FrameError::Truncated(capacity));
    }
    let len = n as usize;
    let mut used = Vec::new();
    let mut left = len;
    for chain in &chains[..usable] {
        let take = left.min(chain.capacity);
        used.push(take as u32);
        left -= take;
        if left == 0 {
            break;
        }
    }
    if mergeable {
        write_num_buffers(&chains[0], used.len(), mem)?;
    }
    Ok(Received::Frame { len, used })
}

/// How many of `chains` one frame may use: all with mergeable buffers,
/// else the first.
fn usable_chains(chains: usize, mergeable: bool) -> usize {
    if mergeable {
        chains
    } else {
        chains.min(1)
    }
}

/// With mergeable buffers: how many chains a frame took, in its first
/// chain's header.
fn write_num_buffers(
    first: &RxChain,
    chains: usize,
    mem: &BackendMemory,
) -> Result<(), FrameError> {
    let Some(addr) = first.num_buffers else {
        return Ok(());
    };
    mem.write_obj((chains as u16).to_le(), addr)
        .map_err(|_| FrameError::BadAddress {
            addr: addr.0,
            len: 2,
        })
}

/// The guest address of byte `offset` of a chain, if the two bytes there
/// lie in one descriptor.
fn header_byte(chain: &[Descriptor], mut offset: u64) -> Option<GuestAddress> {
    for desc in chain {
        let len = u64::from(desc.len());
        if offset + 2 <= len {
            return desc.addr().checked_add(offset);
        }
        if offset < len {
            return None;
        }
        offset -= len;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixDatagram;
    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;

    fn memory() -> BackendMemory {
        BackendMemory::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    fn chain(mem: &BackendMemory, descs: &[(u64, u32, bool)]) -> Vec<Descriptor> {
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .map(|(addr, len, write)| {
                let flags = if *write { VRING_DESC_F_WRITE as u16 } else { 0 };
                RawDescriptor::from(Descriptor::new(*addr, *len, flags, 0))
            })
            .collect();
        let queue = MockSplitQueue::create(mem, GuestAddress(0x8_0000), 256);
        queue.build_desc_chain(&raw).unwrap().collect()
    }

    #[test]
    fn transmit_sends_header_and_frame_from_several_descriptors() {
        let mem = memory();
        let (tap, peer) = UnixDatagram::pair().unwrap();
        mem.write_slice(&[0u8; 12], GuestAddress(0x1000)).unwrap();
        mem.write_slice(&[0xab; 60], GuestAddress(0x2000)).unwrap();
        let c = chain(&mem, &[(0x1000, 12, false), (0x2000, 60, false)]);
        assert_eq!(transmit(&c, &mem, tap.as_raw_fd()).unwrap(), 72);
        let mut buf = [0u8; 100];
        assert_eq!(peer.recv(&mut buf).unwrap(), 72);
        assert_eq!(&buf[12..72], &[0xab; 60][..]);
    }

    #[test]
    fn bad_tx_chains_are_refused() {
        let mem = memory();
        let (tap, _peer) = UnixDatagram::pair().unwrap();
        let fd = tap.as_raw_fd();
        let writable = chain(&mem, &[(0x1000, 64, true)]);
        assert!(matches!(
            transmit(&writable, &mem, fd),
            Err(FrameError::WrongDirection("TX"))
        ));
        let short = chain(&mem, &[(0x1000, 8, false)]);
        assert!(matches!(
            transmit(&short, &mem, fd),
            Err(FrameError::TooShort("TX", 8))
        ));
        let huge = chain(&mem, &[(0x1000, 0x2_0000, false)]);
        assert!(matches!(
            transmit(&huge, &mem, fd),
            Err(FrameError::TooLong(_))
        ));
        let outside = chain(&mem, &[(0xf_ff00, 0x1000, false)]);
        assert!(matches!(
            transmit(&outside, &mem, fd),
            Err(FrameError::BadAddress { .. })
        ));
    }

    #[test]
    fn receive_merges_chains_and_sets_num_buffers() {
        let mem = memory();
        let (tap, peer) = UnixDatagram::pair().unwrap();
        tap.set_nonblocking(true).unwrap();
        let frame: Vec<u8> = (0..3000u32).map(|i| i as u8).collect();
        peer.send(&frame).unwrap();
        let chains = vec![
            chain(&mem, &[(0x1000, 1500, true)]),
            chain(&mem, &[(0x4000, 1500, true)]),
            chain(&mem, &[(0x7000, 1500, true)]),
        ];
        let got = receive(&chains, &mem, tap.as_raw_fd(), true).unwrap();
        assert_eq!(
            got,
            Received::Frame {
                len: 3000,
                used: vec![1500, 1500]
            }
        );
        let num_buffers: u16 = mem.read_obj(GuestAddress(0x1000 + 10)).unwrap();
        assert_eq!(num_buffers, 2);
        let mut second = [0u8; 1500];
        mem.read_slice(&mut second, GuestAddress(0x4000)).unwrap();
        assert_eq!(&second[..], &frame[1500..]);
        // Nothing more to read.
        assert_eq!(
            receive(&chains, &mem, tap.as_raw_fd(), true).unwrap(),
            Received::Empty
        );
    }

    #[test]
    fn checked_chains_serve_several_frames_in_order() {
        let mem = memory();
        let (tap, peer) = UnixDatagram::pair().unwrap();
        tap.set_nonblocking(true).unwrap();
        peer.send(&[1u8; 100]).unwrap();
        peer.send(&[2u8; 2000]).unwrap();
        let mut ready: Vec<RxChain> = [0x1000u64, 0x4000, 0x7000]
            .iter()
            .enumerate()
            .map(|(i, addr)| {
                let c = chain(&mem, &[(*addr, 1500, true)]);
                check_rx_chain(i as u16, &c, &mem).unwrap()
            })
            .collect();
        let mut scratch = Vec::new();
        let fd = tap.as_raw_fd();
        let first = receive_into(&ready, &mut scratch, &mem, fd, true).unwrap();
        assert_eq!(
            first,
            Received::Frame {
                len: 100,
                used: vec![100]
            }
        );
        ready.remove(0);
        let second = receive_into(&ready, &mut scratch, &mem, fd, true).unwrap();
        assert_eq!(
            second,
            Received::Frame {
                len: 2000,
                used: vec![1500, 500]
            }
        );
        let num_buffers: u16 = mem.read_obj(GuestAddress(0x4000 + 10)).unwrap();
        assert_eq!(num_buffers, 2);
        assert_eq!(
            receive_into(&ready, &mut scratch, &mem, fd, true).unwrap(),
            Received::Empty
        );
        // Without mergeable buffers only the first chain takes a frame:
        // one larger than it is dropped, not passed on cut short.
        peer.send(&[3u8; 2000]).unwrap();
        assert!(matches!(
            receive_into(&ready, &mut scratch, &mem, fd, false),
            Err(FrameError::Truncated(1500))
        ));
        peer.send(&[4u8; 1500]).unwrap();
        let got = receive_into(&ready, &mut scratch, &mem, fd, false).unwrap();
        assert_eq!(
            got,
            Received::Frame {
                len: 1500,
                used: vec![1500]
            }
        );
        let tiny = chain(&mem, &[(0x1000, 4, true)]);
        assert!(matches!(
            check_rx_chain(0, &tiny, &mem),
            Err(FrameError::TooShort("RX", 4))
        ));
    }

    #[test]
    fn bad_rx_chains_are_refused() {
        let mem = memory();
        let (tap, _peer) = UnixDatagram::pair().unwrap();
        let readable = vec![chain(&mem, &[(0x1000, 1500, false)])];
        assert!(matches!(
            receive(&readable, &mem, tap.as_raw_fd(), false),
            Err(FrameError::WrongDirection("RX"))
        ));
        let tiny = vec![chain(&mem, &[(0x1000, 4, true)])];
        assert!(matches!(
            receive(&tiny, &mem, tap.as_raw_fd(), false),
            Err(FrameError::TooShort("RX", 4))
        ));
    }
}
