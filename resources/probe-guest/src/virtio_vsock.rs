//! virtio-vsock device (device id 19): a polling stream driver with two
//! modes, for the host side of Firecracker's hybrid vsock to talk to.
//!
//! * `probe.vsock=echo:<port>[:<connections>]` listens on `<port>` and
//!   sends every byte of each connection back on it, until `<connections>`
//!   (default 1) connections have ended; then prints
//!   `probe.vsock=echoed <bytes> bytes over <n> connection(s)`.
//! * `probe.vsock_connect=<port>:<bytes>` connects to the host (CID 2) on
//!   `<port>`, sends `<bytes>` bytes of the pattern `i % 251`, shuts the
//!   connection down and prints `probe.vsock=sent <bytes>`; a refused
//!   connection prints `probe.vsock=error reset`.
//!
//! `probe.vsock_timeout_ms` (default 60000) bounds either mode
//! (`probe.vsock=error timeout ...`). Setup prints `probe.vsock=up
//! cid=<cid>` or `probe.vsock=error setup <reason>`.
//!
//! Flow control is virtio's credit: each connection holds at most
//! [`HOLD`] bytes of the host's that it has not sent back, and announces
//! that as its `buf_alloc`; it sends the host no more than the host's
//! credit allows.

use core::cell::UnsafeCell;
use core::mem::MaybeUninit;
use core::sync::atomic::{AtomicBool, Ordering};

use crate::cmdline::{self, BadOption};
use crate::mem::copy;
use crate::serial::outln;
use crate::timer;
use crate::virtio::{self, Buffer, Error, Regs, Transport, Virtqueue};

/// virtio device id of the socket device.
pub const DEVICE_ID: u32 = 19;
const HOST_CID: u64 = 2;
const HDR_LEN: usize = 44;
const TYPE_STREAM: u16 = 1;
const OP_REQUEST: u16 = 1;
const OP_RESPONSE: u16 = 2;
const OP_RST: u16 = 3;
const OP_SHUTDOWN: u16 = 4;
const OP_RW: u16 = 5;
const OP_CREDIT_UPDATE: u16 = 6;
const OP_CREDIT_REQUEST: u16 = 7;
const SHUTDOWN_BOTH: u32 = 3;
/// The event queue's TRANSPORT_RESET: every connection is gone.
const EVENT_TRANSPORT_RESET: u32 = 0;

/// Bytes of payload per RX or TX buffer.
const DATA_LEN: usize = 4096;
/// RX buffers posted (two descriptors each: header, data).
const RX_BUFFERS: usize = 16;
/// TX slots (two descriptors each).
const TX_SLOTS: usize = 16;
const EVENT_BUFFERS: usize = 4;
/// Connections at once.
const MAX_CONNS: usize = 128;
/// Bytes of the host's a connection holds until it sends them back: its
/// `buf_alloc`.
const HOLD: usize = 64 * 1024;
/// The period of the connect mode's pattern, and a copy long enough to
/// take a whole packet from any phase.
const PATTERN_PERIOD: u32 = 251;
const PATTERN_LEN: usize = PATTERN_PERIOD as usize + DATA_LEN;

/// Copies `data` into the ring `ring` from `at` (wrapping): at most two
/// word copies (every instruction counts when the guest is emulated, see
/// [`copy`]).
fn ring_write(ring: &mut [u8; HOLD], at: usize, data: &[u8]) {
    let first = data.len().min(HOLD - at);
    copy(&mut ring[at..at + first], &data[..first]);
    copy(&mut ring[..data.len() - first], &data[first..]);
}

/// Copies `out.len()` bytes of the ring `ring` from `at` (wrapping).
fn ring_read(ring: &[u8; HOLD], at: usize, out: &mut [u8]) {
    let first = out.len().min(HOLD - at);
    copy(&mut out[..first], &ring[at..at + first]);
    let rest = out.len() - first;
    copy(&mut out[first..], &ring[..rest]);
}

/// Writes the connect mode's pattern: one period by hand, the rest by
/// doubling copies.
fn fill_pattern(pattern: &mut [u8; PATTERN_LEN]) {
    for (i, byte) in pattern[..PATTERN_PERIOD as usize].iter_mut().enumerate() {
        *byte = i as u8;
    }
    let mut filled = PATTERN_PERIOD as usize;
    while filled < PATTERN_LEN {
        let n = filled.min(PATTERN_LEN - filled);
        pattern.copy_within(..n, filled);
        filled += n;
    }
}

/// The first local port of connections the probe opens.
const FIRST_LOCAL_PORT: u32 = 1 << 20;
const DEFAULT_TIMEOUT_MS: u32 = 60_000;
/// Polls between deadline checks.
const SPINS_PER_CHECK: u64 = 4096;

/// What the probe does with the device.
#[derive(Clone, Copy, Debug)]
pub enum Mode {
    Echo { port: u32, connections: u32 },
    Connect { port: u32, bytes: u64 },
}

/// `probe.vsock`, `probe.vsock_connect`, `probe.vsock_timeout_ms`.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    mode: Mode,
    timeout_ms: u32,
}

fn number(value: &[u8]) -> Option<u64> {
    cmdline::kstrtoull(value, 0)
}

/// Splits `a:b[:c]` into at most three numbers.
fn fields(value: &[u8]) -> Option<([u64; 3], usize)> {
    let mut out = [0u64; 3];
    let mut count = 0;
    for part in value.split(|&b| b == b':') {
        if count == 3 {
            return None;
        }
        out[count] = number(part)?;
        count += 1;
    }
    Some((out, count))
}

/// Reads the vsock options; `None` if the device is only listed.
pub fn options(cmdline: &[u8]) -> Result<Option<Options>, BadOption<'_>> {
    let timeout_ms = match cmdline::last_value(cmdline, "probe.vsock_timeout_ms") {
        None => DEFAULT_TIMEOUT_MS,
        Some(value) => value
            .and_then(|v| cmdline::kstrtouint(v, 0))
            .ok_or(BadOption {
                name: "probe.vsock_timeout_ms",
                value,
            })?,
    };
    if let Some(value) = cmdline::last_value(cmdline, "probe.vsock_connect") {
        let bad = BadOption {
            name: "probe.vsock_connect",
            value,
        };
        let (f, count) = value.and_then(fields).ok_or(bad)?;
        let port = u32::try_from(f[0]).map_err(|_| bad)?;
        if count != 2 {
            return Err(bad);
        }
        let mode = Mode::Connect { port, bytes: f[1] };
        return Ok(Some(Options { mode, timeout_ms }));
    }
    let Some(value) = cmdline::last_value(cmdline, "probe.vsock") else {
        return Ok(None);
    };
    let bad = BadOption {
        name: "probe.vsock",
        value,
    };
    let rest = value.and_then(|v| v.strip_prefix(b"echo:")).ok_or(bad)?;
    let (f, count) = fields(rest).ok_or(bad)?;
    let port = u32::try_from(f[0]).map_err(|_| bad)?;
    let connections = match count {
        1 => 1,
        2 => u32::try_from(f[1]).ok().filter(|&n| n > 0).ok_or(bad)?,
        _ => return Err(bad),
    };
    let mode = Mode::Echo { port, connections };
    Ok(Some(Options { mode, timeout_ms }))
}

/// A packet header (virtio 1.2, 5.10.6), little-endian in memory.
#[derive(Clone, Copy, Debug, Default)]
struct Header {
    src_cid: u64,
    dst_cid: u64,
    src_port: u32,
    dst_port: u32,
    len: u32,
    type_: u16,
    op: u16,
    flags: u32,
    buf_alloc: u32,
    fwd_cnt: u32,
}

impl Header {
    fn read(bytes: &[u8; HDR_LEN]) -> Header {
        let u64_at = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&bytes[at..at + 8]);
            u64::from_le_bytes(b)
        };
        let u32_at = |at: usize| {
            let mut b = [0u8; 4];
            b.copy_from_slice(&bytes[at..at + 4]);
            u32::from_le_bytes(b)
        };
        let u16_at = |at: usize| u16::from_le_bytes([bytes[at], bytes[at + 1]]);
        Header {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    fn write(&self, bytes: &mut [u8; HDR_LEN]) {
        bytes[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        bytes[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        bytes[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        bytes[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        bytes[24..28].copy_from_slice(&self.len.to_le_bytes());
        bytes[28..30].copy_from_slice(&self.type_.to_le_bytes());
        bytes[30..32].copy_from_slice(&self.op.to_le_bytes());
        bytes[32..36].copy_from_slice(&self.flags.to_le_bytes());
        bytes[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        bytes[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
    }
}

/// One packet buffer: header and payload, each its own descriptor.
#[repr(C, align(64))]
struct Slot {
    hdr: [u8; HDR_LEN],
    data: [u8; DATA_LEN],
}

/// A connection's held bytes: a ring of [`HOLD`] bytes.
#[derive(Clone, Copy)]
struct Hold {
    bytes: [u8; HOLD],
}

struct VsockMem {
    /// `i % 251` from 0, long enough for a packet from any phase.
    pattern: [u8; PATTERN_LEN],
    rx: [Slot; RX_BUFFERS],
    tx: [Slot; TX_SLOTS],
    events: [[u8; 8]; EVENT_BUFFERS],
    holds: [Hold; MAX_CONNS],
}

struct VsockPool {
    mem: UnsafeCell<MaybeUninit<VsockMem>>,
}

// SAFETY: the probe is single-threaded with interrupts disabled; the
// memory is only reached through the pointer `take` hands out, and
// `VSOCK_TAKEN` ensures a single owner.
unsafe impl Sync for VsockPool {}

/// Not zeroed at boot (`.probe_noinit`, see link.ld): every buffer is
/// written before it is read.
#[unsafe(link_section = ".probe_noinit.virtio_vsock")]
static VSOCK_MEM: VsockPool = VsockPool {
    mem: UnsafeCell::new(MaybeUninit::uninit()),
};
static VSOCK_TAKEN: AtomicBool = AtomicBool::new(false);

/// Pending control packets of a connection.
const PENDING_RESPONSE: u8 = 1;
const PENDING_REQUEST: u8 = 2;
const PENDING_CREDIT_UPDATE: u8 = 4;
const PENDING_RST: u8 = 8;
const PENDING_SHUTDOWN: u8 = 16;

#[derive(Clone, Copy, Default, PartialEq, Eq)]
enum ConnState {
    #[default]
    Free,
    /// The probe asked (REQUEST sent or due); waiting for RESPONSE.
    Connecting,
    Established,
    /// SHUTDOWN sent; waiting for the host's RST.
    Closing,
}

#[derive(Clone, Copy, Default)]
struct Conn {
    state: ConnState,
    local_port: u32,
    peer_port: u32,
    pending: u8,
    /// Held bytes: `[start, start + len)` of the hold ring.
    start: usize,
    len: usize,
    /// Bytes taken from the host (credit returned) and sent to it.
    fwd_cnt: u32,
    tx_cnt: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Connect mode: pattern bytes still to send, and sent.
    to_send: u64,
    sent: u64,
}

impl Conn {
    fn peer_credit(&self) -> u32 {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }
}

/// Why the probe stopped early.
#[derive(Clone, Copy, Debug)]
enum Failure {
    Queue(Error),
    Timeout,
    Reset,
    BadPacket,
}

struct Driver {
    transport: Transport,
    rx: Virtqueue,
    tx: Virtqueue,
    event: Virtqueue,
    mem: *mut VsockMem,
    cid: u64,
    conns: [Conn; MAX_CONNS],
    /// Which RX slot, and which TX slot, each head carries.
    rx_slot_of: [u8; virtio::QUEUE_SIZE as usize],
    tx_slot_of: [u8; virtio::QUEUE_SIZE as usize],
    event_slot_of: [u8; virtio::QUEUE_SIZE as usize],
    tx_free: [bool; TX_SLOTS],
    /// Resets owed to packets of no connection (source port, destination
    /// port), at most one at a time.
    stray_reset: Option<(u32, u32)>,
    echoed: u64,
    ended: u32,
    next_local_port: u32,
}

impl Driver {
    fn setup(regs: Regs, mem: *mut VsockMem) -> Result<Driver, Error> {
        let mut transport = Transport::new(regs)?;
        transport.negotiate(0, 0)?;
        let cid = transport.config_read64(0);
        let rx = transport.setup_queue(0)?;
        let tx = transport.setup_queue(1)?;
        let event = transport.setup_queue(2)?;
        let mut driver = Driver {
            transport,
            rx,
            tx,
            event,
            mem,
            cid,
            conns: [Conn::default(); MAX_CONNS],
            rx_slot_of: [0; virtio::QUEUE_SIZE as usize],
            tx_slot_of: [0; virtio::QUEUE_SIZE as usize],
            event_slot_of: [0; virtio::QUEUE_SIZE as usize],
            tx_free: [true; TX_SLOTS],
            stray_reset: None,
            echoed: 0,
            ended: 0,
            next_local_port: FIRST_LOCAL_PORT,
        };
        // SAFETY: the pool is this driver's; the device does not know it yet.
        fill_pattern(unsafe { &mut (*mem).pattern });
        for slot in 0..RX_BUFFERS {
            driver.post_rx(slot)?;
        }
        for index in 0..EVENT_BUFFERS {
            driver.post_event(index)?;
        }
        driver.transport.driver_ok();
        driver.transport.notify(&driver.rx);
        driver.transport.notify(&driver.event);
        Ok(driver)
    }

    fn post_rx(&mut self, slot: usize) -> Result<(), Error> {
        // SAFETY: the slot is in the pool this driver owns; only addresses
        // are taken here.
        let (hdr, data) = unsafe {
            let s = &raw mut (*self.mem).rx[slot];
            ((&raw mut (*s).hdr) as u64, (&raw mut (*s).data) as u64)
        };
        let buffers = [
            Buffer {
                addr: hdr,
                len: HDR_LEN as u32,
                device_writes: true,
            },
            Buffer {
                addr: data,
                len: DATA_LEN as u32,
                device_writes: true,
            },
        ];
        // SAFETY: both buffers are in the never-freed static pool and are
        // not read until the chain comes back.
        let head = unsafe { self.rx.add(&buffers) }?;
        self.rx_slot_of[usize::from(head)] = slot as u8;
        Ok(())
    }

    fn post_event(&mut self, index: usize) -> Result<(), Error> {
        // SAFETY: the buffer is in the pool this driver owns.
        let addr = unsafe { (&raw mut (*self.mem).events[index]) as u64 };
        let buffer = Buffer {
            addr,
            len: 8,
            device_writes: true,
        };
        // SAFETY: as for `post_rx`.
        let head = unsafe { self.event.add(&[buffer]) }?;
        self.event_slot_of[usize::from(head)] = index as u8;
        Ok(())
    }

    /// Sends a packet from a free TX slot: `hdr`, and `data` bytes copied
    /// from the connection's hold ring (or the pattern) by `fill`.
    fn send(&mut self, hdr: &Header, fill: impl FnOnce(&mut [u8])) -> Result<bool, Error> {
        let Some(slot) = self.tx_free.iter().position(|&free| free) else {
            return Ok(false);
        };
        // SAFETY: the slot is free (the device does not own it) and in
        // the pool this driver owns.
        let s = unsafe { &mut (*self.mem).tx[slot] };
        hdr.write(&mut s.hdr);
        let len = hdr.len as usize;
        fill(&mut s.data[..len]);
        let (hdr_addr, data_addr) = (s.hdr.as_ptr() as u64, s.data.as_ptr() as u64);
        let header = Buffer {
            addr: hdr_addr,
            len: HDR_LEN as u32,
            device_writes: false,
        };
        let data = Buffer {
            addr: data_addr,
            len: hdr.len,
            device_writes: false,
        };
        let buffers = [header, data];
        let chain = if len == 0 {
            &buffers[..1]
        } else {
            &buffers[..]
        };
        // SAFETY: the slot stays untouched until its chain comes back.
        let head = unsafe { self.tx.add(chain) }?;
        self.tx_slot_of[usize::from(head)] = slot as u8;
        self.tx_free[slot] = false;
        Ok(true)
    }

    fn header_for(&self, conn: &Conn, op: u16, len: u32) -> Header {
        Header {
            src_cid: self.cid,
            dst_cid: HOST_CID,
            src_port: conn.local_port,
            dst_port: conn.peer_port,
            len,
            type_: TYPE_STREAM,
            op,
            flags: if op == OP_SHUTDOWN { SHUTDOWN_BOTH } else { 0 },
            buf_alloc: HOLD as u32,
            fwd_cnt: conn.fwd_cnt,
        }
    }

    fn find(&self, local_port: u32, peer_port: u32) -> Option<usize> {
        self.conns.iter().position(|c| {
            c.state != ConnState::Free && c.local_port == local_port && c.peer_port == peer_port
        })
    }

    fn end(&mut self, index: usize) {
        self.conns[index] = Conn::default();
        self.ended += 1;
    }

    /// Handles one packet from the host.
    fn on_packet(&mut self, hdr: &Header, data: &[u8], listen: Option<u32>) -> Result<(), Failure> {
        if hdr.dst_cid != self.cid || hdr.src_cid != HOST_CID || hdr.type_ != TYPE_STREAM {
            return Ok(());
        }
        let Some(index) = self.find(hdr.dst_port, hdr.src_port) else {
            match hdr.op {
                OP_REQUEST if Some(hdr.dst_port) == listen => {
                    match self.conns.iter().position(|c| c.state == ConnState::Free) {
                        Some(free) => {
                            self.conns[free] = Conn {
                                state: ConnState::Established,
                                local_port: hdr.dst_port,
                                peer_port: hdr.src_port,
                                pending: PENDING_RESPONSE,
                                peer_buf_alloc: hdr.buf_alloc,
                                peer_fwd_cnt: hdr.fwd_cnt,
                                ..Conn::default()
                            };
                        }
                        None => self.stray_reset = Some((hdr.dst_port, hdr.src_port)),
                    }
                }
                OP_RST => {}
                _ => self.stray_reset = Some((hdr.dst_port, hdr.src_port)),
            }
            return Ok(());
        };
        let conn = &mut self.conns[index];
        conn.peer_buf_alloc = hdr.buf_alloc;
        conn.peer_fwd_cnt = hdr.fwd_cnt;
        match hdr.op {
            OP_RESPONSE if conn.state == ConnState::Connecting => {
                conn.state = ConnState::Established;
            }
            OP_RST if conn.state == ConnState::Connecting => return Err(Failure::Reset),
            OP_RST => self.end(index),
            OP_SHUTDOWN => {
                // The host is done: drop what is held and end with a RST.
                conn.len = 0;
                conn.pending = PENDING_RST;
            }
            OP_RW => {
                let len = data.len();
                if conn.len + len > HOLD {
                    return Err(Failure::BadPacket);
                }
                // SAFETY: the hold ring of this connection is in the pool
                // this driver owns; the device never touches it.
                let hold = unsafe { &mut (*self.mem).holds[index].bytes };
                ring_write(hold, (conn.start + conn.len) % HOLD, data);
                conn.len += len;
            }
            OP_CREDIT_REQUEST => conn.pending |= PENDING_CREDIT_UPDATE,
            _ => {}
        }
        Ok(())
    }

    /// Takes the device's events and puts their buffers back. A
    /// TRANSPORT_RESET (a loaded snapshot) ends every connection.
    fn take_events(&mut self) -> Result<(), Failure> {
        while let Some(used) = self.event.pop_used().map_err(Failure::Queue)? {
            let index = usize::from(self.event_slot_of[usize::from(used.head)]);
            // SAFETY: the buffer came back; the device wrote it.
            let id = unsafe { core::ptr::read_volatile(&raw const (*self.mem).events[index]) };
            if u32::from_le_bytes([id[0], id[1], id[2], id[3]]) == EVENT_TRANSPORT_RESET {
                for index in 0..MAX_CONNS {
                    if self.conns[index].state != ConnState::Free {
                        self.end(index);
                    }
                }
            }
            self.post_event(index).map_err(Failure::Queue)?;
        }
        Ok(())
    }

    /// Takes every packet the host sent and puts the buffers back. The
    /// events are taken after each packet is popped and before it is
    /// handled: a TRANSPORT_RESET was posted before the loaded guest ran,
    /// so it is seen before any packet that came after it, even when the
    /// snapshot paused the guest between two looks at its queues (it then
    /// ends the connections of before, not one a host client opened
    /// through the new device since).
    fn poll_rx(&mut self, listen: Option<u32>) -> Result<(), Failure> {
        self.take_events()?;
        let mut reposted = false;
        while let Some(used) = self.rx.pop_used().map_err(Failure::Queue)? {
            self.take_events()?;
            let slot = usize::from(self.rx_slot_of[usize::from(used.head)]);
            // SAFETY: the chain came back, so the device is done with the
            // slot; volatile copies because the device wrote it.
            let (hdr_bytes, data) = unsafe {
                let s = &raw const (*self.mem).rx[slot];
                (core::ptr::read_volatile(&raw const (*s).hdr), &(*s).data)
            };
            let hdr = Header::read(&hdr_bytes);
            let len = (hdr.len as usize).min(DATA_LEN);
            let written = (used.len as usize).saturating_sub(HDR_LEN);
            if hdr.op == OP_RW && written < len {
                return Err(Failure::BadPacket);
            }
            self.on_packet(&hdr, &data[..len], listen)?;
            self.post_rx(slot).map_err(Failure::Queue)?;
            reposted = true;
        }
        if reposted {
            self.transport.notify_if_needed(&self.rx);
        }
        Ok(())
    }

    fn reclaim_tx(&mut self) -> Result<(), Failure> {
        while let Some(used) = self.tx.pop_used().map_err(Failure::Queue)? {
            let slot = usize::from(self.tx_slot_of[usize::from(used.head)]);
            self.tx_free[slot] = true;
        }
        Ok(())
    }

    /// Sends what each connection owes the host while TX slots last.
    fn pump(&mut self) -> Result<(), Failure> {
        let mut sent = false;
        if let Some((local, peer)) = self.stray_reset {
            let conn = Conn {
                local_port: local,
                peer_port: peer,
                ..Conn::default()
            };
            let hdr = self.header_for(&conn, OP_RST, 0);
            if self.send(&hdr, |_| {}).map_err(Failure::Queue)? {
                self.stray_reset = None;
                sent = true;
            }
        }
        for index in 0..MAX_CONNS {
            if self.conns[index].state == ConnState::Free {
                continue;
            }
            while let Some(more) = self.pump_one(index)? {
                sent = true;
                if !more {
                    break;
                }
            }
        }
        if sent {
            self.transport.notify_if_needed(&self.tx);
        }
        Ok(())
    }

    /// Sends one packet of connection `index`, if it owes one and a slot
    /// is free: `Some(true)` if it may owe more.
    fn pump_one(&mut self, index: usize) -> Result<Option<bool>, Failure> {
        let conn = self.conns[index];
        let control = [
            (PENDING_RST, OP_RST),
            (PENDING_REQUEST, OP_REQUEST),
            (PENDING_RESPONSE, OP_RESPONSE),
            (PENDING_SHUTDOWN, OP_SHUTDOWN),
            (PENDING_CREDIT_UPDATE, OP_CREDIT_UPDATE),
        ]
        .into_iter()
        .find(|(bit, _)| conn.pending & bit != 0);
        if let Some((bit, op)) = control {
            let hdr = self.header_for(&conn, op, 0);
            if !self.send(&hdr, |_| {}).map_err(Failure::Queue)? {
                return Ok(None);
            }
            self.conns[index].pending &= !bit;
            if op == OP_RST {
                self.end(index);
                return Ok(Some(false));
            }
            if op == OP_SHUTDOWN {
                self.conns[index].state = ConnState::Closing;
            }
            return Ok(Some(true));
        }
        if conn.state != ConnState::Established {
            return Ok(None);
        }
        let credit = conn.peer_credit() as usize;
        let (len, from_hold) = if conn.len > 0 {
            (conn.len.min(DATA_LEN).min(credit), true)
        } else if conn.to_send > 0 {
            (
                (conn.to_send.min(DATA_LEN as u64) as usize).min(credit),
                false,
            )
        } else {
            return Ok(None);
        };
        if len == 0 {
            return Ok(None);
        }
        let hdr = self.header_for(&conn, OP_RW, len as u32);
        let mem = self.mem;
        let fill = |out: &mut [u8]| {
            if from_hold {
                // SAFETY: the hold ring is in the pool; the device never
                // touches it.
                let hold = unsafe { &(*mem).holds[index].bytes };
                ring_read(hold, conn.start, out);
            } else {
                // SAFETY: the pattern is in the pool, written at setup.
                let pattern = unsafe { &(*mem).pattern };
                let at = (conn.sent % u64::from(PATTERN_PERIOD)) as usize;
                copy(out, &pattern[at..at + out.len()]);
            }
        };
        if !self.send(&hdr, fill).map_err(Failure::Queue)? {
            return Ok(None);
        }
        let conn = &mut self.conns[index];
        conn.tx_cnt = conn.tx_cnt.wrapping_add(len as u32);
        if from_hold {
            conn.start = (conn.start + len) % HOLD;
            conn.len -= len;
            conn.fwd_cnt = conn.fwd_cnt.wrapping_add(len as u32);
            self.echoed += len as u64;
        } else {
            conn.to_send -= len as u64;
            conn.sent += len as u64;
            if conn.to_send == 0 {
                conn.pending |= PENDING_SHUTDOWN;
            }
        }
        Ok(Some(true))
    }

    fn poll(&mut self, listen: Option<u32>) -> Result<(), Failure> {
        self.poll_rx(listen)?;
        self.reclaim_tx()?;
        self.pump()
    }
}

fn echo(driver: &mut Driver, port: u32, connections: u32, timeout_ms: u32) -> Result<(), Failure> {
    outln!("probe.vsock=listening {}", port);
    let mut deadline = timer::Deadline::start_with(timeout_ms, 0, SPINS_PER_CHECK, u64::MAX);
    while driver.ended < connections {
        driver.poll(Some(port))?;
        if deadline.expired() {
            return Err(Failure::Timeout);
        }
    }
    Ok(())
}

fn connect(driver: &mut Driver, port: u32, bytes: u64, timeout_ms: u32) -> Result<(), Failure> {
    driver.conns[0] = Conn {
        state: ConnState::Connecting,
        local_port: driver.next_local_port,
        peer_port: port,
        pending: PENDING_REQUEST,
        to_send: bytes,
        ..Conn::default()
    };
    driver.next_local_port += 1;
    let mut deadline = timer::Deadline::start_with(timeout_ms, 0, SPINS_PER_CHECK, u64::MAX);
    while driver.ended == 0 {
        driver.poll(None)?;
        if deadline.expired() {
            return Err(Failure::Timeout);
        }
    }
    Ok(())
}

/// Sets the device up and runs `options`' mode: the driver, with how
/// the mode ended, or why setup failed.
fn run(
    regs: Regs,
    options: &Options,
    mem: *mut VsockMem,
) -> Result<(Driver, Result<(), Failure>), Error> {
    let mut driver = Driver::setup(regs, mem)?;
    outln!("probe.vsock=up cid={}", driver.cid);
    let outcome = match options.mode {
        Mode::Echo { port, connections } => {
            echo(&mut driver, port, connections, options.timeout_ms)
        }
        Mode::Connect { port, bytes } => connect(&mut driver, port, bytes, options.timeout_ms),
    };
    Ok((driver, outcome))
}

fn report(driver: &Driver, options: &Options, outcome: Result<(), Failure>) {
    match (outcome, options.mode) {
        (Ok(()), Mode::Echo { .. }) => outln!(
            "probe.vsock=echoed {} bytes over {} connection(s)",
            driver.echoed,
            driver.ended
        ),
        (Ok(()), Mode::Connect { bytes, .. }) => outln!("probe.vsock=sent {}", bytes),
        (Err(Failure::Queue(e)), _) => outln!("probe.vsock=error queue {}", e.name()),
        (Err(Failure::Timeout), _) => outln!(
            "probe.vsock=error timeout echoed={} ended={}",
            driver.echoed,
            driver.ended
        ),
        (Err(Failure::Reset), _) => outln!("probe.vsock=error reset"),
        (Err(Failure::BadPacket), _) => outln!("probe.vsock=error bad-packet"),
    }
}

/// Drives the socket device behind `regs` as `options` say.
pub fn probe(regs: Regs, options: &Options) {
    let Some(mem) = (!VSOCK_TAKEN.swap(true, Ordering::Relaxed))
        .then(|| VSOCK_MEM.mem.get().cast::<VsockMem>())
    else {
        outln!("probe.vsock=error setup busy");
        return;
    };
    match run(regs, options, mem) {
        Ok((driver, outcome)) => {
            report(&driver, options, outcome);
            // The device must stop touching the pool before it is reused.
            let queues = [driver.rx, driver.tx, driver.event];
            if driver.transport.shutdown(queues).is_ok() {
                VSOCK_TAKEN.store(false, Ordering::Relaxed);
            }
        }
        Err(e) => outln!("probe.vsock=error setup {}", e.name()),
    }
}
