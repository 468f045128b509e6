//! Frame rates through our `vhost-user-net` with this process as the
//! guest: a load generator that drives the backend through the VMM's own
//! vhost-user frontend (`devices::vhost_user::VhostUserFrontend`), over a
//! TAP in a private namespace.
//!
//! The generator shares memfd-backed memory (vm-memory `GuestMemoryMmap`)
//! with the backend, lays out one split virtqueue per queue in it (queue
//! size 256) and plays the driver side itself: it posts buffers by writing
//! avail ring entries and publishing `avail.idx` with release ordering,
//! reads `used.idx` with acquire ordering before the used entries, and
//! kicks only when the device asked for it (a full fence between publishing
//! and reading `avail_event`, or `VRING_USED_F_NO_NOTIFY` without
//! EVENT_IDX). It polls its used rings, like a busy guest under NAPI or a
//! DPDK PMD, and turns interrupts off (`used_event` kept half a ring of
//! indices away, or `VRING_AVAIL_F_NO_INTERRUPT` without EVENT_IDX).
//!
//! Features acked: VERSION_1, MRG_RXBUF, CSUM, HOST_TSO4, GUEST_CSUM,
//! GUEST_TSO4 (what a Linux guest acks, and what 64 KiB frames need both
//! ways), EVENT_IDX (also without, for a comparison row), MQ for 2 pairs.
//! RX buffers are 4 KiB each (one descriptor; with MRG_RXBUF a 64 KiB frame
//! takes 16 of them, as in a Linux guest whose mergeable buffers have grown
//! to a page). Each TX frame is one descriptor holding the 12-byte
//! virtio-net header and the frame.
//!
//! - guest to TAP: the generator keeps every TX ring full of 64- or
//!   1500-byte UDP frames or 64 KiB TCP frames with the header's GSO fields
//!   set (TCPV4, MSS 1460, NEEDS_CSUM). The frames are addressed as in the
//!   DPDK bench (to a MAC that is not the TAP's, so the namespace's IP layer
//!   drops them at once). The rate is what the TAP received (its rx
//!   counters); a reader in the namespace (an AF_PACKET socket on `tap0`,
//!   drained by the generator's thread) counts what arrived on the host
//!   side.
//! - TAP to guest: the generator's thread also writes frames into `tap0`
//!   from the namespace (AF_PACKET, PACKET_VNET_HDR for the 64 KiB GSO
//!   frames, qdisc bypass, sendmmsg) over 16 flows (UDP or TCP source
//!   ports), so that a multi-queue TAP spreads them over both pairs; the
//!   generator counts the frames in its used RX entries (`num_buffers`).
//! - 1 pair: a plain TAP and `--queues 2`; 2 pairs: a multi-queue TAP and
//!   `--queues 4`, the generator driving both pairs.
//!
//! Cloud Hypervisor's `vhost_user_net` (from the peers' binaries, when
//! there) runs every cell beside ours, the two taking turns. It offers
//! neither MRG_RXBUF (so each of its RX entries is one frame, and it has
//! no 64 KiB TAP-to-guest row) nor EVENT_IDX (so it runs the EVENT_IDX
//! rows without it, as a guest would; `event_idx_negotiated` says so).
//!
//! The backend is pinned to CPU 1 and the generator (with the TAP reader
//! or writer in its thread) to CPU 0. Each run is a fresh backend, 1 s of
//! warm-up, then a window of `WINDOW` over which the TAP counters, the
//! generator's counters and the backend's CPU time (utime + stime from
//! /proc/PID/stat) are sampled.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{fence, AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use devices::vhost_user::{DeviceKind, DeviceName, QueueSetup, VhostUserFrontend};
use devices::virtio::QueueLayout;
use serde_json::{json, Value};
use tessera_tests::netns::Netns;
use virtio_bindings::{virtio_config, virtio_net, virtio_ring};
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::net_dpdk::{
    add_figures, finish_backend, load_average, start_backend, tap_counters, udp_frame, NetBackend,
    BACKEND_CPU, FRONTEND_CPU, TAP_TXQUEUELEN,
};
use super::{cpu_seconds, pin_this_thread, summary};

const WINDOW: Duration = Duration::from_secs(3);
const WARM_UP: Duration = Duration::from_secs(1);
const QUEUE_SIZE: u16 = 256;
/// The virtio-net header with VERSION_1 (`virtio_net_hdr_v1`).
const VNET_HDR_LEN: usize = 12;
/// The header AF_PACKET takes with PACKET_VNET_HDR (no `num_buffers`).
const PACKET_VNET_HDR_LEN: usize = 10;
const RX_BUFFER: u32 = 4096;
/// Guest memory: the rings in the first MiB, then one buffer area per queue.
const RING_AREA: u64 = 16 << 10;
const BUFFER_BASE: u64 = 1 << 20;
const QUEUE_BUFFERS: u64 = QUEUE_SIZE as u64 * (64 << 10);
/// A 64 KiB TSO frame: 44 segments of MSS 1460 behind one Ethernet, IPv4
/// and TCP header.
const TSO_MSS: usize = 1460;
const TSO_FRAME: usize = 14 + 20 + 20 + 44 * TSO_MSS;
/// Flows the TAP to guest writer spreads its frames over.
const FLOWS: usize = 16;

/// Feature masks from virtio-bindings' bit numbers.
const VIRTIO_F_VERSION_1: u64 = 1 << virtio_config::VIRTIO_F_VERSION_1;
const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << virtio_ring::VIRTIO_RING_F_EVENT_IDX;
const VIRTIO_NET_F_CSUM: u64 = 1 << virtio_net::VIRTIO_NET_F_CSUM;
const VIRTIO_NET_F_GUEST_CSUM: u64 = 1 << virtio_net::VIRTIO_NET_F_GUEST_CSUM;
const VIRTIO_NET_F_GUEST_TSO4: u64 = 1 << virtio_net::VIRTIO_NET_F_GUEST_TSO4;
const VIRTIO_NET_F_HOST_TSO4: u64 = 1 << virtio_net::VIRTIO_NET_F_HOST_TSO4;
const VIRTIO_NET_F_MRG_RXBUF: u64 = 1 << virtio_net::VIRTIO_NET_F_MRG_RXBUF;
const VIRTIO_NET_F_MQ: u64 = 1 << virtio_net::VIRTIO_NET_F_MQ;
const VRING_DESC_F_WRITE: u16 = virtio_ring::VRING_DESC_F_WRITE as u16;
const VRING_USED_F_NO_NOTIFY: u16 = virtio_ring::VRING_USED_F_NO_NOTIFY as u16;
const VRING_AVAIL_F_NO_INTERRUPT: u16 = virtio_ring::VRING_AVAIL_F_NO_INTERRUPT as u16;
const PACKET_VNET_HDR: libc::c_int = 15;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    /// Guest to TAP.
    Tx,
    /// TAP to guest.
    Rx,
}

/// One cell of the table.
#[derive(Debug, Clone, Copy)]
struct Case {
    direction: Direction,
    /// Ethernet frame length (no FCS, no virtio-net header).
    frame: usize,
    pairs: usize,
    event_idx: bool,
    /// Guest to TAP: whether the AF_PACKET reader runs.
    reader: bool,
}

impl Case {
    fn tso(&self) -> bool {
        self.frame == TSO_FRAME
    }

    fn name(&self) -> String {
        format!(
            "{} {} B {} pair(s){}{}",
            if self.direction == Direction::Tx {
                "guest-to-TAP"
            } else {
                "TAP-to-guest"
            },
            self.frame,
            self.pairs,
            if self.event_idx { "" } else { ", no EVENT_IDX" },
            if self.direction == Direction::Tx && !self.reader {
                ", no reader"
            } else {
                ""
            }
        )
    }
}

/// The 12-byte virtio-net header of a frame: all zero, or GSO TCPV4 with
/// a partial checksum for the 64 KiB frames.
fn vnet_header(tso: bool) -> [u8; VNET_HDR_LEN] {
    let mut h = [0u8; VNET_HDR_LEN];
    if tso {
        h[0] = 1; // VIRTIO_NET_HDR_F_NEEDS_CSUM
        h[1] = 1; // VIRTIO_NET_HDR_GSO_TCPV4
        h[2..4].copy_from_slice(&54u16.to_le_bytes()); // hdr_len
        h[4..6].copy_from_slice(&(TSO_MSS as u16).to_le_bytes()); // gso_size
        h[6..8].copy_from_slice(&34u16.to_le_bytes()); // csum_start
        h[8..10].copy_from_slice(&16u16.to_le_bytes()); // csum_offset
    }
    h
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// A TSO_FRAME-byte Ethernet/IPv4/TCP frame (the same addresses as
/// `udp_frame`), its TCP checksum field holding the pseudo-header sum as
/// CHECKSUM_PARTIAL wants.
fn tcp_frame(source_port: u16) -> Vec<u8> {
    let mut f = udp_frame(64);
    f.resize(TSO_FRAME, 0x5a);
    let ip_len = (TSO_FRAME - 14) as u16;
    f[16..18].copy_from_slice(&ip_len.to_be_bytes());
    f[23] = 6;
    f[24..26].copy_from_slice(&[0, 0]);
    let sum: u32 = f[14..34]
        .chunks(2)
        .map(|p| u32::from(u16::from_be_bytes([p[0], p[1]])))
        .sum();
    f[24..26].copy_from_slice(&(!fold(sum)).to_be_bytes());
    f[34..54].fill(0);
    f[34..36].copy_from_slice(&source_port.to_be_bytes());
    f[36..38].copy_from_slice(&9u16.to_be_bytes());
    f[38..42].copy_from_slice(&1u32.to_be_bytes()); // seq
    f[46] = 5 << 4; // data offset
    f[47] = 0x18; // PSH, ACK
    f[48..50].copy_from_slice(&0xffffu16.to_be_bytes());
    let tcp_len = u32::from(ip_len) - 20;
    let pseudo: u32 = f[26..34]
        .chunks(2)
        .map(|p| u32::from(u16::from_be_bytes([p[0], p[1]])))
        .sum::<u32>()
        + 6
        + tcp_len;
    f[50..52].copy_from_slice(&fold(pseudo).to_be_bytes());
    f
}

/// The frame of flow `flow` for `case`.
fn frame(case: &Case, flow: usize) -> Vec<u8> {
    let port = 1000 + flow as u16;
    if case.tso() {
        tcp_frame(port)
    } else {
        let mut f = udp_frame(case.frame);
        f[34..36].copy_from_slice(&port.to_be_bytes());
        f
    }
}

/// Guest memory of `size` bytes at guest address 0, backed by a memfd so
/// that the backend can map it.
fn guest_memory(size: usize) -> Result<GuestMemoryMmap, String> {
    // SAFETY: memfd_create with a NUL-terminated name; the fd is owned at once.
    let fd = unsafe { libc::memfd_create(c"tessera-bench-guest".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(format!("memfd_create: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a new fd nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size as u64).map_err(|e| e.to_string())?;
    GuestMemoryMmap::from_ranges_with_files([(
        GuestAddress(0),
        size,
        Some(FileOffset::new(file, 0)),
    )])
    .map_err(|e| format!("guest memory: {e}"))
}

/// Where queue `q`'s rings and buffers lie in guest memory.
fn desc_table(q: usize) -> u64 {
    q as u64 * RING_AREA
}
fn avail_ring(q: usize) -> u64 {
    desc_table(q) + 4096
}
fn used_ring(q: usize) -> u64 {
    desc_table(q) + 8192
}
fn buffer(q: usize, slot: u16) -> u64 {
    BUFFER_BASE + q as u64 * QUEUE_BUFFERS + u64::from(slot) * (64 << 10)
}

/// The driver side of one split virtqueue in guest memory.
struct Ring {
    size: u16,
    base: *mut u8,
    desc: u64,
    avail: u64,
    used: u64,
    event_idx: bool,
    /// The next avail index to publish, and the one the last kick check saw.
    next_avail: u16,
    checked_at: u16,
    last_used: u16,
    kick: EventFd,
    kicks: u64,
}

// SAFETY: the raw pointer is into guest memory that the generator keeps
// alive (it owns a clone of the `GuestMemoryMmap`) while it uses the ring;
// a ring is used by one thread at a time.
unsafe impl Send for Ring {}

impl Ring {
    /// A pointer to guest address `addr`, which lies inside the mapping
    /// (every address used here is a constant offset checked by `new`).
    fn at<T>(&self, addr: u64) -> *mut T {
        // SAFETY: see above; `base` maps the whole region.
        unsafe { self.base.add(addr as usize).cast() }
    }

    fn atomic(&self, addr: u64) -> &AtomicU16 {
        // SAFETY: a 2-aligned u16 inside the mapping, only accessed
        // atomically by both sides.
        unsafe { &*self.at::<AtomicU16>(addr) }
    }

    fn new(mem: &GuestMemoryMmap, q: usize, event_idx: bool, kick: EventFd) -> Self {
        let base = mem.get_host_address(GuestAddress(0)).expect("guest memory");
        let end = used_ring(q) + 6 + 8 * u64::from(QUEUE_SIZE);
        assert!(mem.get_host_address(GuestAddress(end)).is_ok());
        let ring = Self {
            size: QUEUE_SIZE,
            base,
            desc: desc_table(q),
            avail: avail_ring(q),
            used: used_ring(q),
            event_idx,
            next_avail: 0,
            checked_at: 0,
            last_used: 0,
            kick,
            kicks: 0,
        };
        // A polling driver: no interrupts.
        if event_idx {
            ring.set_used_event();
        } else {
            ring.atomic(ring.avail)
                .store(VRING_AVAIL_F_NO_INTERRUPT.to_le(), Ordering::Relaxed);
        }
        ring
    }

    /// Sets descriptor `i` (before the queue starts).
    fn set_desc(&self, i: u16, addr: u64, len: u32, flags: u16) {
        let at = self.desc + 16 * u64::from(i);
        // SAFETY: inside the descriptor table (see `at`); the device reads
        // it only after `avail.idx` is published with release ordering.
        unsafe {
            self.at::<u64>(at).write_volatile(addr.to_le());
            self.at::<u32>(at + 8).write_volatile(len.to_le());
            self.at::<u16>(at + 12).write_volatile(flags.to_le());
            self.at::<u16>(at + 14).write_volatile(0);
        }
    }

    /// Puts chain `head` in the next avail slot (published by `publish`).
    fn post(&mut self, head: u16) {
        let slot = u64::from(self.next_avail % self.size);
        // SAFETY: inside the avail ring; the device reads this slot only
        // after the index covering it is published.
        unsafe {
            self.at::<u16>(self.avail + 4 + 2 * slot)
                .write_volatile(head.to_le())
        };
        self.next_avail = self.next_avail.wrapping_add(1);
    }

    /// Publishes the posted chains, then kicks if the device wants it.
    fn publish(&mut self) {
        if self.next_avail == self.checked_at {
            return;
        }
        // Ring entries (and buffers) before the index.
        self.atomic(self.avail + 2)
            .store(self.next_avail.to_le(), Ordering::Release);
        // The index before reading the device's suppression state.
        fence(Ordering::SeqCst);
        let kick = if self.event_idx {
            let event = u16::from_le(
                self.atomic(self.used + 4 + 8 * u64::from(self.size))
                    .load(Ordering::Relaxed),
            );
            // vring_need_event(event, new, old)
            self.next_avail.wrapping_sub(event).wrapping_sub(1)
                < self.next_avail.wrapping_sub(self.checked_at)
        } else {
            u16::from_le(self.atomic(self.used).load(Ordering::Relaxed)) & VRING_USED_F_NO_NOTIFY
                == 0
        };
        self.checked_at = self.next_avail;
        if kick {
            let _ = self.kick.write(1);
            self.kicks += 1;
        }
    }

    /// Keeps the device from ever reaching `used_event` (EVENT_IDX).
    fn set_used_event(&self) {
        let at = self.avail + 4 + 2 * u64::from(self.size);
        self.atomic(at).store(
            self.last_used.wrapping_add(0x8000).to_le(),
            Ordering::Relaxed,
        );
    }

    /// Calls `each(id, len)` for every new used entry; returns how many.
    fn reap(&mut self, mut each: impl FnMut(u16, u32)) -> u16 {
        let used = u16::from_le(self.atomic(self.used + 2).load(Ordering::Acquire));
        let n = used.wrapping_sub(self.last_used);
        assert!(n <= self.size, "the device published {n} used entries");
        for _ in 0..n {
            let slot = u64::from(self.last_used % self.size);
            let at = self.used + 4 + 8 * slot;
            // SAFETY: inside the used ring, written before `used.idx`,
            // which was read with acquire ordering.
            let (id, len) = unsafe {
                (
                    u32::from_le(self.at::<u32>(at).read_volatile()),
                    u32::from_le(self.at::<u32>(at + 4).read_volatile()),
                )
            };
            assert!(id < u32::from(self.size), "used id {id} out of range");
            each(id as u16, len);
            self.last_used = self.last_used.wrapping_add(1);
        }
        if n > 0 && self.event_idx {
            self.set_used_event();
        }
        n
    }
}

/// A negotiated, running device: the frontend connection (which must
/// outlive the run), the guest memory and the rings (RX, TX per pair).
struct Device {
    /// VIRTIO_NET_F_MRG_RXBUF was negotiated (Cloud Hypervisor's backend
    /// does not offer it): without it every RX entry is one frame.
    mergeable: bool,
    /// VIRTIO_RING_F_EVENT_IDX was negotiated.
    event_idx: bool,
    _frontend: VhostUserFrontend,
    _mem: GuestMemoryMmap,
    rings: Vec<Ring>,
    /// The kick and call eventfds the backend holds too.
    _eventfds: (Vec<EventFd>, Vec<EventFd>),
}

fn connect(socket: &Path, case: &Case) -> Result<Device, String> {
    let queues = 2 * case.pairs;
    let mut frontend =
        VhostUserFrontend::connect(socket, queues as u64).map_err(|e| format!("connect: {e}"))?;
    let offered = frontend.backend_features();
    let mergeable = offered & VIRTIO_NET_F_MRG_RXBUF != 0;
    if !mergeable && case.tso() && case.direction == Direction::Rx {
        return Err("no MRG_RXBUF: 64 KiB frames do not fit the 4 KiB RX buffers".into());
    }
    let mut wanted = VIRTIO_F_VERSION_1
        | if mergeable { VIRTIO_NET_F_MRG_RXBUF } else { 0 }
        | VIRTIO_NET_F_CSUM
        | VIRTIO_NET_F_HOST_TSO4
        | VIRTIO_NET_F_GUEST_CSUM
        | VIRTIO_NET_F_GUEST_TSO4;
    // A backend that does not offer EVENT_IDX (Cloud Hypervisor's) runs
    // the EVENT_IDX rows without it, as a guest would; its figures say so.
    let event_idx = case.event_idx && offered & VIRTIO_RING_F_EVENT_IDX != 0;
    if event_idx {
        wanted |= VIRTIO_RING_F_EVENT_IDX;
    }
    if case.pairs > 1 {
        wanted |= VIRTIO_NET_F_MQ;
    }
    if offered & wanted != wanted {
        return Err(format!(
            "the backend lacks features {:#x}",
            wanted & !offered
        ));
    }
    if frontend.queue_num() < queues {
        return Err(format!(
            "the backend serves {} queues, not {queues}",
            frontend.queue_num()
        ));
    }

    let size = (BUFFER_BASE + queues as u64 * QUEUE_BUFFERS) as usize;
    let mem = guest_memory(size)?;
    let eventfd = || EventFd::new(libc::EFD_NONBLOCK).map_err(|e| e.to_string());
    let mut rings = Vec::new();
    let mut kicks = Vec::new();
    let mut calls = Vec::new();
    let mut layouts = Vec::new();
    for q in 0..queues {
        let kick = eventfd()?;
        let mut ring = Ring::new(
            &mem,
            q,
            event_idx,
            kick.try_clone().map_err(|e| e.to_string())?,
        );
        fill_ring(&mem, &mut ring, q, case)?;
        layouts.push(QueueLayout {
            size: QUEUE_SIZE,
            desc_table: GuestAddress(desc_table(q)),
            avail_ring: GuestAddress(avail_ring(q)),
            used_ring: GuestAddress(used_ring(q)),
        });
        rings.push(ring);
        kicks.push(kick);
        calls.push(eventfd()?);
    }
    let setup = QueueSetup {
        mem: &mem,
        acked_features: wanted,
        queues: &layouts,
        queue_max_size: QUEUE_SIZE,
        kicks: &kicks,
        calls: &calls,
        resume: false,
        log: None,
        page_faults: None,
    };
    frontend
        .activate(&DeviceName::new(DeviceKind::Interface, "bench"), &setup)
        .map_err(|e| format!("activate: {e}"))?;
    Ok(Device {
        mergeable,
        event_idx,
        _frontend: frontend,
        _mem: mem,
        rings,
        _eventfds: (kicks, calls),
    })
}

/// Lays out queue `q`'s buffers: 4 KiB device-writable ones on an RX
/// queue, all posted at once; on a TX queue, each a frame of the case
/// behind its virtio-net header, posted when the run starts.
fn fill_ring(mem: &GuestMemoryMmap, ring: &mut Ring, q: usize, case: &Case) -> Result<(), String> {
    let rx = q.is_multiple_of(2);
    let tx_frame = frame(case, 0);
    for i in 0..QUEUE_SIZE {
        let addr = buffer(q, i);
        if rx {
            ring.set_desc(i, addr, RX_BUFFER, VRING_DESC_F_WRITE);
        } else {
            let mut data = vnet_header(case.tso()).to_vec();
            data.extend_from_slice(&tx_frame);
            vm_memory::Bytes::write_slice(mem, &data, GuestAddress(addr))
                .map_err(|e| e.to_string())?;
            ring.set_desc(i, addr, data.len() as u32, 0);
        }
    }
    if rx {
        for i in 0..QUEUE_SIZE {
            ring.post(i);
        }
    }
    Ok(())
}

/// An AF_PACKET socket on `tap0` of the namespace at `/run/netns/NAME`,
/// made in the calling thread (which moves into the namespace).
fn packet_socket(netns: &str, vnet_hdr: bool) -> Result<OwnedFd, String> {
    let path = format!("/run/netns/{netns}");
    let ns = File::open(&path).map_err(|e| format!("{path}: {e}"))?;
    // SAFETY: setns on an open namespace fd moves only this thread.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(format!("setns: {}", std::io::Error::last_os_error()));
    }
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket creation; the fd is owned right away.
    let raw = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_NONBLOCK,
            i32::from(proto),
        )
    };
    if raw < 0 {
        return Err(format!("AF_PACKET: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: `raw` is a new fd nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };
    let set = |level, name, value: libc::c_int| {
        // SAFETY: these options read one int.
        unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                level,
                name,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as u32,
            )
        }
    };
    set(libc::SOL_PACKET, libc::PACKET_QDISC_BYPASS, 1);
    // Room for many frames in flight both ways (64 KiB ones included).
    set(libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, 64 << 20);
    set(libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, 64 << 20);
    if vnet_hdr && set(libc::SOL_PACKET, PACKET_VNET_HDR, 1) != 0 {
        return Err(format!(
            "PACKET_VNET_HDR: {}",
            std::io::Error::last_os_error()
        ));
    }
    crate::net_dpdk::bind_to_tap0(&sock, proto)?;
    Ok(sock)
}

/// Counters the generator publishes for the sampling thread.
#[derive(Default)]
struct Counters {
    /// Frames (TX: completed by the backend; RX: received) per pair.
    frames: [AtomicU64; 2],
    bytes: [AtomicU64; 2],
    /// Guest to TAP: frames and bytes the namespace's reader got.
    reader_frames: AtomicU64,
    reader_bytes: AtomicU64,
    kicks: AtomicU64,
    /// RX entries with a bad `num_buffers`.
    errors: AtomicU64,
    /// The generator thread's id, for its schedstat.
    tid: AtomicU64,
}

/// Seconds spent running and waiting on a run queue (runnable but not
/// running: CPU taken by others) by every thread of `pid`, or by thread
/// `tid` of this process.
fn schedstat(pid: u32, tid: Option<u64>) -> (f64, f64) {
    let paths: Vec<std::path::PathBuf> = match tid {
        Some(tid) => vec![format!("/proc/self/task/{tid}/schedstat").into()],
        None => std::fs::read_dir(format!("/proc/{pid}/task"))
            .map(|d| d.flatten().map(|e| e.path().join("schedstat")).collect())
            .unwrap_or_default(),
    };
    let (mut run, mut wait) = (0.0, 0.0);
    for path in paths {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let mut fields = text
            .split_whitespace()
            .map(|f| f.parse::<f64>().unwrap_or(0.0));
        run += fields.next().unwrap_or(0.0) / 1e9;
        wait += fields.next().unwrap_or(0.0) / 1e9;
    }
    (run, wait)
}

const BATCH: usize = 64;
/// Guest to TAP: below this many completions, pause TX_REAP_PAUSE.
const TX_REAP_BATCH: u16 = 32;
const TX_REAP_PAUSE: Duration = Duration::from_micros(20);

/// The generator's loop, on FRONTEND_CPU, until `stop`.
fn generate(
    case: Case,
    netns: String,
    mut device: Device,
    counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
) -> Result<Device, String> {
    pin_this_thread(FRONTEND_CPU);
    // SAFETY: gettid has no preconditions.
    counters
        .tid
        .store(unsafe { libc::gettid() } as u64, Ordering::Relaxed);
    let reader = (case.direction == Direction::Tx && case.reader)
        .then(|| packet_socket(&netns, false))
        .transpose()?;
    let writer = (case.direction == Direction::Rx)
        .then(|| packet_socket(&netns, true))
        .transpose()?;

    // The writer's frames, one per flow, each behind its AF_PACKET header.
    let frames: Vec<Vec<u8>> = (0..FLOWS)
        .map(|flow| {
            let mut f = vnet_header(case.tso())[..PACKET_VNET_HDR_LEN].to_vec();
            f.extend_from_slice(&frame(&case, flow));
            f
        })
        .collect();
    let batch = if case.tso() { 8 } else { BATCH };
    let mut iovs: Vec<libc::iovec> = (0..batch)
        .map(|i| libc::iovec {
            iov_base: frames[i % FLOWS].as_ptr() as *mut libc::c_void,
            iov_len: frames[i % FLOWS].len(),
        })
        .collect();
    // Each mmsghdr points at its own iovec, which outlives the loop and is
    // only read.
    let mut send_msgs: Vec<libc::mmsghdr> = iovs
        .iter_mut()
        .map(|iov| {
            // SAFETY: an all-zero mmsghdr is a valid, empty header.
            let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
            m.msg_hdr.msg_iov = iov;
            m.msg_hdr.msg_iovlen = 1;
            m
        })
        .collect();
    // The reader takes the first 64 bytes of each frame and its length.
    let mut read_bufs = vec![[0u8; 64]; BATCH];
    // SAFETY: all-zero sockaddr_lls are valid.
    let mut read_addrs: Vec<libc::sockaddr_ll> =
        (0..BATCH).map(|_| unsafe { std::mem::zeroed() }).collect();
    let mut read_iovs: Vec<libc::iovec> = read_bufs
        .iter_mut()
        .map(|b| libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: b.len(),
        })
        .collect();
    // Each header points at its own buffer and address.
    let mut read_msgs: Vec<libc::mmsghdr> = read_iovs
        .iter_mut()
        .zip(read_addrs.iter_mut())
        .map(|(iov, addr)| {
            // SAFETY: an all-zero mmsghdr is a valid, empty header.
            let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
            m.msg_hdr.msg_iov = iov;
            m.msg_hdr.msg_iovlen = 1;
            m.msg_hdr.msg_name = (addr as *mut libc::sockaddr_ll).cast();
            m.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_ll>() as u32;
            m
        })
        .collect();

    let frame_len = case.frame as u64;
    let mut frames_done = [0u64; 2];
    let mut bytes_done = [0u64; 2];
    // RX: buffers still to come of the current frame, per pair.
    let mut pending = [0u16; 2];
    let (mut reader_frames, mut reader_bytes, mut errors) = (0u64, 0u64, 0u64);
    // TX: fill every ring.
    if case.direction == Direction::Tx {
        for ring in device.rings.iter_mut().skip(1).step_by(2) {
            for i in 0..QUEUE_SIZE {
                ring.post(i);
            }
        }
    }
    for ring in &mut device.rings {
        ring.publish();
    }
    let base = device.rings[0].base;
    let mut done = Vec::<u16>::with_capacity(usize::from(QUEUE_SIZE));
    while !stop.load(Ordering::Relaxed) {
        if let Some(w) = &writer {
            // SAFETY: `send_msgs` holds valid headers (see above). A full
            // TAP queue fails the call; the frames are counted as dropped.
            unsafe {
                libc::sendmmsg(
                    w.as_raw_fd(),
                    send_msgs.as_mut_ptr(),
                    send_msgs.len() as u32,
                    libc::MSG_DONTWAIT,
                )
            };
        }
        let mut reaped = 0;
        for pair in 0..case.pairs {
            let q = 2 * pair + usize::from(case.direction == Direction::Tx);
            let ring = &mut device.rings[q];
            if case.direction == Direction::Tx {
                reaped += ring.reap(|id, _| done.push(id));
                frames_done[pair] += done.len() as u64;
                bytes_done[pair] += done.len() as u64 * frame_len;
            } else {
                let p = &mut pending[pair];
                let (f, b) = (&mut frames_done[pair], &mut bytes_done[pair]);
                let mergeable = device.mergeable;
                ring.reap(|id, len| {
                    if !mergeable {
                        *f += 1;
                        *b = b.wrapping_add(u64::from(len).saturating_sub(VNET_HDR_LEN as u64));
                        done.push(id);
                        return;
                    }
                    if *p == 0 {
                        // SAFETY: the header at the start of the buffer,
                        // written by the device before it published the
                        // entry (acquire-read of used.idx in `reap`).
                        let n = unsafe {
                            base.add(buffer(q, id) as usize + 10)
                                .cast::<u16>()
                                .read_volatile()
                        };
                        let n = u16::from_le(n);
                        if n == 0 || n > QUEUE_SIZE {
                            errors += 1;
                            *p = 1;
                        } else {
                            *p = n;
                        }
                        *f += 1;
                        *b = b.wrapping_sub(VNET_HDR_LEN as u64);
                    }
                    *p -= 1;
                    *b = b.wrapping_add(u64::from(len));
                    done.push(id);
                });
            }
            for id in done.drain(..) {
                ring.post(id);
            }
            ring.publish();
            counters.frames[pair].store(frames_done[pair], Ordering::Relaxed);
            counters.bytes[pair].store(bytes_done[pair], Ordering::Relaxed);
        }
        if let Some(r) = &reader {
            for _ in 0..4 {
                // SAFETY: `read_msgs` holds valid headers (see above).
                let n = unsafe {
                    libc::recvmmsg(
                        r.as_raw_fd(),
                        read_msgs.as_mut_ptr(),
                        BATCH as u32,
                        libc::MSG_DONTWAIT | libc::MSG_TRUNC,
                        std::ptr::null_mut(),
                    )
                };
                if n <= 0 {
                    break;
                }
                for (m, a) in read_msgs.iter().zip(&read_addrs).take(n as usize) {
                    if a.sll_pkttype != libc::PACKET_OUTGOING {
                        reader_frames += 1;
                        reader_bytes += u64::from(m.msg_len);
                    }
                }
                for m in &mut read_msgs {
                    m.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_ll>() as u32;
                }
                if (n as usize) < BATCH {
                    break;
                }
            }
            counters
                .reader_frames
                .store(reader_frames, Ordering::Relaxed);
            counters.reader_bytes.store(reader_bytes, Ordering::Relaxed);
        }
        counters.errors.store(errors, Ordering::Relaxed);
        counters.kicks.store(
            device.rings.iter().map(|r| r.kicks).sum(),
            Ordering::Relaxed,
        );
        // Guest to TAP: with few completions, wait a little before looking
        // again (the TX ring still holds over 200 frames of work), so that
        // polling `used.idx` does not pull its cache line away from the
        // backend at every frame it completes.
        if case.direction == Direction::Tx && reaped < TX_REAP_BATCH {
            let t = Instant::now();
            while t.elapsed() < TX_REAP_PAUSE {
                std::hint::spin_loop();
            }
        }
    }
    Ok(device)
}

/// The figures of one window.
struct Sample {
    pps: f64,
    gbit_per_s: f64,
    cpu_us_per_packet: f64,
    cpu_s_per_gib: f64,
    cpu_busy: f64,
    /// Guest to TAP: the reader's rate; TAP to guest: what the TAP dropped.
    reader_pps: f64,
    tap_tx_dropped_per_s: f64,
    /// The generator's count (TX: completions; RX: frames received).
    generator_pps: f64,
    /// The smaller pair's share of the generator's frames.
    min_pair_share: f64,
    kicks_per_s: f64,
    errors: f64,
    /// Fractions of the window the backend's threads waited for a CPU
    /// taken by others, and the generator did.
    backend_wait: f64,
    generator_wait: f64,
    generator_busy: f64,
    /// Whether EVENT_IDX was negotiated (the backend may not offer it).
    event_idx: bool,
}

struct Snapshot {
    at: Instant,
    tap: super::net_dpdk::TapCounters,
    cpu: f64,
    frames: [u64; 2],
    bytes: [u64; 2],
    reader_frames: u64,
    kicks: u64,
    backend_sched: (f64, f64),
    generator_sched: (f64, f64),
}

fn snapshot(netns: &Netns, pid: u32, c: &Counters) -> Snapshot {
    let tap = tap_counters(netns);
    let cpu = cpu_seconds(pid);
    Snapshot {
        at: Instant::now(),
        tap,
        cpu,
        frames: [0, 1].map(|p| c.frames[p].load(Ordering::Relaxed)),
        bytes: [0, 1].map(|p| c.bytes[p].load(Ordering::Relaxed)),
        reader_frames: c.reader_frames.load(Ordering::Relaxed),
        kicks: c.kicks.load(Ordering::Relaxed),
        backend_sched: schedstat(pid, None),
        generator_sched: schedstat(0, Some(c.tid.load(Ordering::Relaxed))),
    }
}

fn run_once(netns: &Netns, dir: &Path, case: &Case, kind: &NetBackend) -> Result<Sample, String> {
    let socket = dir.join("net-frontend.sock");
    let backend = start_backend(netns, &socket, 2 * case.pairs, u32::from(QUEUE_SIZE), kind)?;
    let pid = backend.pid();
    let device = match connect(&socket, case) {
        Ok(d) => d,
        Err(err) => {
            let out = finish_backend(backend)?;
            return Err(format!("{err}\n{}", out.describe()));
        }
    };
    let event_idx = device.event_idx;
    let counters = Arc::new(Counters::default());
    let stop = Arc::new(AtomicBool::new(false));
    let generator = {
        let (case, netns, counters, stop) = (
            *case,
            netns.name().to_string(),
            counters.clone(),
            stop.clone(),
        );
        std::thread::spawn(move || generate(case, netns, device, counters, stop))
    };
    std::thread::sleep(WARM_UP);
    let s0 = snapshot(netns, pid, &counters);
    std::thread::sleep(WINDOW);
    let s1 = snapshot(netns, pid, &counters);
    stop.store(true, Ordering::Relaxed);
    let device = generator
        .join()
        .unwrap_or_else(|_| Err("the generator panicked".into()));
    // Hanging up ends the backend.
    drop(device);
    let out = finish_backend(backend)?;
    if let Some(line) = out.stderr.lines().find(|l| l.contains(" frames (")) {
        eprintln!("  {line}");
    }
    let device_errors = out.stderr.lines().filter(|l| l.contains("rror")).count();
    if device_errors > 0 {
        eprintln!("  backend errors:\n{}", out.stderr);
    }

    let seconds = (s1.at - s0.at).as_secs_f64();
    let generated: Vec<f64> = (0..2)
        .map(|p| (s1.frames[p] - s0.frames[p]) as f64)
        .collect();
    let total: f64 = generated.iter().sum();
    let (packets, bytes) = if case.direction == Direction::Tx {
        (
            s1.tap.rx_packets - s0.tap.rx_packets,
            s1.tap.rx_bytes - s0.tap.rx_bytes,
        )
    } else {
        let b: u64 = (0..2).map(|p| s1.bytes[p].wrapping_sub(s0.bytes[p])).sum();
        (total, b as f64)
    };
    if packets <= 0.0 {
        return Err("no frames moved".into());
    }
    let cpu = s1.cpu - s0.cpu;
    let min_pair_share = if case.pairs > 1 {
        generated[0].min(generated[1]) / total.max(1.0)
    } else {
        1.0
    };
    Ok(Sample {
        pps: packets / seconds,
        gbit_per_s: bytes * 8.0 / seconds / 1e9,
        cpu_us_per_packet: cpu * 1e6 / packets,
        cpu_s_per_gib: cpu / (bytes / f64::from(1u32 << 30)),
        cpu_busy: cpu / seconds,
        reader_pps: (s1.reader_frames - s0.reader_frames) as f64 / seconds,
        tap_tx_dropped_per_s: (s1.tap.tx_dropped - s0.tap.tx_dropped) / seconds,
        generator_pps: total / seconds,
        min_pair_share,
        kicks_per_s: (s1.kicks - s0.kicks) as f64 / seconds,
        errors: counters.errors.load(Ordering::Relaxed) as f64,
        backend_wait: (s1.backend_sched.1 - s0.backend_sched.1) / seconds,
        generator_wait: (s1.generator_sched.1 - s0.generator_sched.1) / seconds,
        generator_busy: (s1.generator_sched.0 - s0.generator_sched.0) / seconds,
        event_idx,
    })
}

/// One cell: `runs` runs per backend, the backends taking turns.
/// Tessera's figures are at the top level; each other backend's are
/// under its name, with Tessera's medians over its.
fn cell(netns: &Netns, dir: &Path, case: &Case, runs: usize, backends: &[NetBackend]) -> Value {
    let mut samples: Vec<Vec<Sample>> = backends.iter().map(|_| Vec::new()).collect();
    let mut failures: Vec<Vec<String>> = backends.iter().map(|_| Vec::new()).collect();
    for i in 0..runs {
        for k in 0..backends.len() {
            let at = (i + k) % backends.len();
            let name = backends[at].name();
            match run_once(netns, dir, case, &backends[at]) {
                Ok(s) => {
                    eprintln!(
                        "{name} {} run {}/{runs}: {:.0} pps, {:.2} Gbit/s, {:.2} us CPU/packet, busy {:.2}, \
                         backend waited {:.2}, generator waited {:.2}",
                        case.name(),
                        i + 1,
                        s.pps,
                        s.gbit_per_s,
                        s.cpu_us_per_packet,
                        s.cpu_busy,
                        s.backend_wait,
                        s.generator_wait
                    );
                    samples[at].push(s);
                }
                Err(err) => {
                    eprintln!("{name} {} run {}/{runs} failed: {err}", case.name(), i + 1);
                    failures[at].push(err.lines().next().unwrap_or("").to_string());
                }
            }
        }
    }
    let tx = case.direction == Direction::Tx;
    let mut out = json!({
        "case": case.name(),
        "direction": if tx { "guest to TAP" } else { "TAP to guest" },
        "frame_bytes": case.frame,
        "tso": case.tso(),
        "queue_pairs": case.pairs,
        "event_idx": case.event_idx,
    });
    if tx {
        out["tap_reader"] = json!(case.reader);
    }
    for (at, kind) in backends.iter().enumerate() {
        add_figures(&mut out, kind, figures(case, &samples[at], &failures[at]));
    }
    out
}

/// One backend's figures in a cell.
fn figures(case: &Case, samples: &[Sample], failures: &[String]) -> Value {
    let tx = case.direction == Direction::Tx;
    let mut out = json!({
        "runs": samples.len(),
        "failed_runs": failures,
    });
    if samples.is_empty() {
        return out;
    }
    let pick = |f: fn(&Sample) -> f64| summary(samples.iter().map(f).collect());
    out["event_idx_negotiated"] = json!(samples.iter().all(|s| s.event_idx));
    out["packets_per_second"] = pick(|s| s.pps);
    out["gbit_per_second"] = pick(|s| s.gbit_per_s);
    out["backend_cpu_us_per_packet"] = pick(|s| s.cpu_us_per_packet);
    out["backend_cpu_seconds_per_gib"] = pick(|s| s.cpu_s_per_gib);
    out["backend_cpu_busy_fraction"] = pick(|s| s.cpu_busy);
    out["generator_packets_per_second"] = pick(|s| s.generator_pps);
    out["kicks_per_second"] = pick(|s| s.kicks_per_s);
    out["bad_rx_headers"] = pick(|s| s.errors);
    out["backend_runqueue_wait_fraction"] = pick(|s| s.backend_wait);
    out["generator_runqueue_wait_fraction"] = pick(|s| s.generator_wait);
    out["generator_busy_fraction"] = pick(|s| s.generator_busy);
    if case.pairs > 1 {
        out["smaller_pair_share"] = pick(|s| s.min_pair_share);
    }
    if tx && case.reader {
        out["reader_packets_per_second"] = pick(|s| s.reader_pps);
    }
    if !tx {
        out["tap_tx_dropped_per_second"] = pick(|s| s.tap_tx_dropped_per_s);
    }
    out
}

/// The whole report.
pub fn bench_net_frontend(runs: usize) -> Value {
    // Before pinning: it counts the CPUs this thread may use.
    let machine = super::machine();
    pin_this_thread(FRONTEND_CPU);
    let load_before = load_average();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cells = Vec::new();
    let backends = NetBackend::all();
    for pairs in [1, 2] {
        let netns = if pairs == 1 {
            Netns::with_tap("nfe", "10.82.0.1/24")
        } else {
            Netns::with_multi_queue_tap("nfe2", "10.83.0.1/24")
        };
        let txqueuelen = TAP_TXQUEUELEN.to_string();
        netns.ip(&["link", "set", "tap0", "txqueuelen", &txqueuelen]);
        let mut cases = Vec::new();
        for direction in [Direction::Tx, Direction::Rx] {
            for frame in [64, 1500, TSO_FRAME] {
                cases.push(Case {
                    direction,
                    frame,
                    pairs,
                    event_idx: true,
                    reader: true,
                });
            }
        }
        if pairs == 1 {
            // Comparable with the DPDK rows: no reader, no EVENT_IDX.
            for (frame, event_idx) in [(64, true), (64, false), (1500, false)] {
                cases.push(Case {
                    direction: Direction::Tx,
                    frame,
                    pairs,
                    event_idx,
                    reader: false,
                });
            }
            cases.push(Case {
                direction: Direction::Rx,
                frame: 64,
                pairs,
                event_idx: false,
                reader: false,
            });
        }
        // TESSERA_BENCH_CASES=text runs only the cases whose name has it.
        let only = std::env::var("TESSERA_BENCH_CASES").ok();
        cases.retain(|c| only.as_ref().is_none_or(|o| c.name().contains(o.as_str())));
        for case in &cases {
            let c = cell(&netns, dir.path(), case, runs, &backends);
            eprintln!("{c}");
            cells.push(c);
        }
    }
    json!({
        "machine": machine,
        "runs": runs,
        "window_seconds": WINDOW.as_secs(),
        "frontend": format!(
            "tessera-bench's own driver through the VMM's vhost-user frontend (devices::vhost_user), queue size {QUEUE_SIZE}, \
             polling, CPU {FRONTEND_CPU}; acked VERSION_1 MRG_RXBUF CSUM HOST_TSO4 GUEST_CSUM GUEST_TSO4 \
             (+EVENT_IDX, +MQ); RX buffers {RX_BUFFER} B; TX one descriptor per frame"
        ),
        "backend": format!(
            "vhost-user-net --queues 2|4 --queue-size {QUEUE_SIZE}, CPU {BACKEND_CPU}; beside it \
             Cloud Hypervisor's vhost_user_net num_queues=2|4,queue_size={QUEUE_SIZE} (no MRG_RXBUF: \
             one RX buffer per frame, no 64 KiB TAP-to-guest row)"
        ),
        "tso_frame": format!("{TSO_FRAME} B Ethernet/IPv4/TCP, GSO TCPV4, MSS {TSO_MSS}"),
        "tap_txqueuelen": TAP_TXQUEUELEN,
        "tap_reader": "AF_PACKET on tap0, recvmmsg of 64 with MSG_TRUNC, in the generator's thread",
        "tap_writer": format!("AF_PACKET on tap0, PACKET_VNET_HDR, qdisc bypass, sendmmsg of {BATCH} (8 for 64 KiB), {FLOWS} flows, in the generator's thread"),
        "load_average_before": load_before,
        "cells": cells,
        "load_average_after": load_average(),
    })
}
