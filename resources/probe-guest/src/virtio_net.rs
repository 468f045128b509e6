//! virtio network device (device id 1), driven through [`crate::virtio`]
//! by polling: it answers ARP requests and pings for one IPv4 address.
//!
//! With `probe.net=<a.b.c.d>/<prefix>` the first virtio-net device (in
//! command-line order) is set up right after its `probe.virtio=` line
//! ([`setup`], which prints `probe.net0=up ...` or `=error setup ...`);
//! later ones are only listed. The caller then calls [`Net::poll`] while
//! the probe ticks (or for `probe.net_serve_ms`), and [`Net::finish`],
//! which prints `probe.net0=stats ...` and resets the device.
//!
//! Features: `VIRTIO_F_VERSION_1` (required), `MAC`, `STATUS` and `MTU`
//! if offered (`MTU` only if a frame of that size fits a receive buffer);
//! `MQ` with `CTRL_VQ` only for `probe.net_queues` > 1, then the pairs
//! are enabled with `VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET` on the control
//! queue; `CTRL_VQ` and `GUEST_ANNOUNCE` (with `STATUS`) if offered, when
//! the device has one pair or the probe takes `MQ`. No offloads and
//! no `MRG_RXBUF`: every buffer starts with the 12-byte
//! `virtio_net_hdr_v1`, and a receive buffer holds a whole frame.
//!
//! With `GUEST_ANNOUNCE`, [`Net::check_announce`] (every 10 ms while the
//! probe ticks or serves) looks for a configuration change with
//! `VIRTIO_NET_S_ANNOUNCE`, as after a migration: it sends a gratuitous
//! ARP, acks with `VIRTIO_NET_CTRL_ANNOUNCE_ACK` and prints
//! `probe.net<i>=announced <n>`.
//!
//! Queue pair `k` is RX queue `2k` and TX queue `2k + 1`; a reply goes out
//! on the TX queue of the pair its request came in on. Each RX queue has
//! up to [`RX_BUFS`] single-descriptor buffers of [`BUF_SIZE`] bytes; each
//! consumed buffer is re-posted right after its frame was handled, and the
//! device is notified once per batch (and only if it has not suppressed
//! notifications). TX buffers are reclaimed on every poll.
//!
//! Nothing from the device is trusted: used ids and indices are checked
//! by [`Virtqueue::pop_used`] (a bad one stops the device:
//! `probe.net<i>=error ...`), a used length outside
//! `[header + Ethernet header, BUF_SIZE]` or a header announcing offloads
//! drops the frame, and [`netproto::answer`] checks every field it reads.
//!
//! With `probe.ping` ([`crate::ping`]), a [`Pinger`] set with
//! [`Net::set_pinger`] gets the ARP and echo replies addressed to us, and
//! [`Net::transmit`] sends its requests on the TX queue of pair 0.
//!
//! With `probe.mmds` ([`crate::mmds`]), [`Net::poll_client`] serves the
//! device like [`Net::poll`] and also hands a [`Client`] the ARP replies
//! and the TCP segments addressed to us that it takes, then sends the
//! frames it has ready on the TX queue of pair 0.

use core::cell::UnsafeCell;
use core::fmt;
use core::mem::MaybeUninit;
use core::sync::atomic::{AtomicBool, Ordering};

use crate::cmdline::{self, BadOption};
use crate::netproto::{self, Answer, ETH_HLEN, Iface, TcpIn};
use crate::ping::Pinger;
use crate::serial::outln;
use crate::timer;
use crate::virtio::{self, Buffer, Error, QUEUE_SIZE, Regs, Transport, Used, Virtqueue};

/// virtio device id of the network device.
pub const DEVICE_ID: u32 = 1;

/// Feature bits (virtio 1.x, section 5.1.3).
mod feature {
    pub const MTU: u64 = 1 << 3;
    pub const MAC: u64 = 1 << 5;
    pub const STATUS: u64 = 1 << 16;
    pub const CTRL_VQ: u64 = 1 << 17;
    pub const GUEST_ANNOUNCE: u64 = 1 << 21;
    pub const MQ: u64 = 1 << 22;
}

/// Offsets in `struct virtio_net_config`.
mod config {
    /// `u8 mac[6]` (`MAC`).
    pub const MAC: u64 = 0;
    /// `le16 status` (`STATUS`).
    pub const STATUS: u64 = 6;
    /// `le16 max_virtqueue_pairs` (`MQ`).
    pub const MAX_VIRTQUEUE_PAIRS: u64 = 8;
    /// `le16 mtu` (`MTU`).
    pub const MTU: u64 = 10;
}

/// `struct virtio_net_hdr_v1` (with `num_buffers`, as VERSION_1 wants).
const HDR_LEN: usize = 12;
/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`: only with `GUEST_CSUM`, never expected.
const HDR_F_NEEDS_CSUM: u8 = 1;
/// `VIRTIO_NET_HDR_GSO_NONE`.
const GSO_NONE: u8 = 0;

/// Bytes per RX and TX buffer, header included.
pub const BUF_SIZE: usize = 2048;
/// Receive buffers posted per RX queue (at most the queue size): more
/// than 64 KiB in all, which a device may want posted before it reads a
/// frame (Firecracker's reads none from its TAP with less).
pub const RX_BUFS: usize = 48;
/// Transmit buffers per TX queue (at most the queue size).
pub const TX_BUFS: usize = 16;
/// Most queue pairs used.
pub const MAX_PAIRS: usize = 4;

/// MAC used without `VIRTIO_NET_F_MAC`.
const DEFAULT_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
/// MTU reported without a negotiated `VIRTIO_NET_F_MTU`.
const DEFAULT_MTU: u16 = 1500;
/// Smallest MTU accepted (Linux's `MIN_MTU`, IPv4's minimum).
const MIN_MTU: u16 = 68;
/// Largest MTU whose frames fit a receive buffer.
const MAX_MTU: u16 = (BUF_SIZE - HDR_LEN - ETH_HLEN) as u16;
/// Largest `max_virtqueue_pairs` the spec allows.
const MAX_VIRTQUEUE_PAIRS: u16 = 0x8000;

/// Control queue: `VIRTIO_NET_CTRL_MQ`, `VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET`.
const CTRL_CLASS_MQ: u8 = 4;
const CTRL_MQ_VQ_PAIRS_SET: u8 = 0;
/// `VIRTIO_NET_CTRL_ANNOUNCE`, `VIRTIO_NET_CTRL_ANNOUNCE_ACK`.
const CTRL_CLASS_ANNOUNCE: u8 = 3;
const CTRL_ANNOUNCE_ACK: u8 = 0;
/// `VIRTIO_NET_S_ANNOUNCE` in the `status` field.
const STATUS_ANNOUNCE: u16 = 2;
/// InterruptStatus: the configuration changed.
const INT_CONFIG: u32 = 2;
const CTRL_OK: u8 = 0;
/// Written before the command; the device must overwrite it.
const CTRL_ACK_UNSET: u8 = 0xff;
const CTRL_TIMEOUT_MS: u32 = 2000;

/// How long [`Net::finish`] waits for transmits in flight.
const TX_DRAIN_MS: u32 = 100;

const QS: usize = QUEUE_SIZE as usize;

/// Network options from the command line.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// `probe.net`: our address. The prefix length is checked but not
    /// used: replies go to the requester's MAC address, on any subnet.
    pub ip: [u8; 4],
    /// `probe.net_queues` (>= 1; default 1).
    pub queues: u32,
    /// `probe.net_serve_ms` (default 0).
    pub serve_ms: u32,
}

/// Reads `probe.net`, `probe.net_queues` and `probe.net_serve_ms` (last
/// one wins; numbers are base 0 like `kstrtouint`). `Ok(None)` without
/// `probe.net`.
pub fn options(cmdline: &[u8]) -> Result<Option<Options>, BadOption<'_>> {
    let Some(value) = cmdline::last_value(cmdline, "probe.net") else {
        return Ok(None);
    };
    let (ip, _prefix) = value.and_then(netproto::parse_cidr).ok_or(BadOption {
        name: "probe.net",
        value,
    })?;
    let number = |name: &'static str, default: u32| match cmdline::last_value(cmdline, name) {
        None => Ok(default),
        Some(value) => value
            .and_then(|v| cmdline::kstrtouint(v, 0))
            .ok_or(BadOption { name, value }),
    };
    let queues = number("probe.net_queues", 1)?;
    if queues == 0 {
        return Err(BadOption {
            name: "probe.net_queues",
            value: cmdline::last_value(cmdline, "probe.net_queues").flatten(),
        });
    }
    let serve_ms = number("probe.net_serve_ms", 0)?;
    Ok(Some(Options {
        ip,
        queues,
        serve_ms,
    }))
}

/// Why setup failed (the text after `error setup `).
#[derive(Clone, Copy, Debug)]
enum SetupError {
    Transport(Error),
    /// `queue=<q> <reason>`.
    Queue(u32, Error),
    /// `<field>=<value>`: an unusable config value.
    Config(&'static str, u64),
    /// `mac=<mac>`: a multicast or all-zero MAC in config space.
    Mac([u8; 6]),
    /// `ctrl-mq <reason>`: the control command did not complete.
    Ctrl(Error),
    /// `ctrl-mq bad-used-len=<len>`.
    CtrlLen(u32),
    /// `ctrl-mq ack=<v>`: the device refused the queue pairs.
    CtrlAck(u8),
    /// Internal: the buffer pool is in use.
    DmaBusy,
}

impl fmt::Display for SetupError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            SetupError::Transport(e) => f.write_str(e.name()),
            SetupError::Queue(q, e) => write!(f, "queue={} {}", q, e.name()),
            SetupError::Config(field, value) => write!(f, "{}={}", field, value),
            SetupError::Mac(mac) => write!(f, "mac={}", MacAddr(mac)),
            SetupError::Ctrl(e) => write!(f, "ctrl-mq {}", e.name()),
            SetupError::CtrlLen(len) => write!(f, "ctrl-mq bad-used-len={}", len),
            SetupError::CtrlAck(ack) => write!(f, "ctrl-mq ack={}", ack),
            SetupError::DmaBusy => f.write_str("dma-busy"),
        }
    }
}

/// `aa:bb:cc:dd:ee:ff`.
struct MacAddr([u8; 6]);

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

/// A queue error while serving: `<reason>[=<value>] queue=<q>`.
struct ServeError {
    error: Error,
    queue: u32,
}

impl fmt::Display for ServeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.error.name())?;
        match self.error {
            Error::BadUsedId(v) => write!(f, "={}", v)?,
            Error::BadUsedIdx(v) => write!(f, "={}", v)?,
            _ => {}
        }
        write!(f, " queue={}", self.queue)
    }
}

/// The control command `VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET`.
#[repr(C)]
struct CtrlMem {
    /// `class`, `command` (device-readable).
    header: [u8; 2],
    /// `le16 virtqueue_pairs` (device-readable).
    pairs: [u8; 2],
    /// `ack` (device-writable).
    ack: u8,
}

/// Buffers of all queue pairs.
#[repr(C, align(4096))]
struct NetMem {
    rx: [[[u8; BUF_SIZE]; RX_BUFS]; MAX_PAIRS],
    tx: [[[u8; BUF_SIZE]; TX_BUFS]; MAX_PAIRS],
    ctrl: CtrlMem,
}

/// The static buffer pool, owned by at most one device at a time.
struct NetPool {
    mem: UnsafeCell<MaybeUninit<NetMem>>,
}

// SAFETY: the probe is single-threaded with interrupts disabled; the
// memory is only reached through the pointer handed out by `take`, and
// `NET_TAKEN` ensures a single owner at a time.
unsafe impl Sync for NetPool {}

/// Not zeroed at boot (`.probe_noinit`, see link.ld): the RX buffers of
/// the pairs in use are zeroed at setup, TX buffers and the control
/// command are written before the device may read them.
#[unsafe(link_section = ".probe_noinit.virtio_net")]
static NET_MEM: NetPool = NetPool {
    mem: UnsafeCell::new(MaybeUninit::uninit()),
};
static NET_TAKEN: AtomicBool = AtomicBool::new(false);

impl NetPool {
    fn take(&self) -> Option<*mut NetMem> {
        (!NET_TAKEN.swap(true, Ordering::Relaxed)).then(|| self.mem.get().cast::<NetMem>())
    }

    fn give_back(&self) {
        NET_TAKEN.store(false, Ordering::Relaxed);
    }
}

/// Frame counters (`probe.net<i>=stats`). Every received frame is
/// answered (`arp` or `icmp`), taken by the pinger (`ping_rx`) or the
/// MMDS client (`mmds_rx`) or `dropped`, so
/// `rx = arp + icmp + ping_rx + mmds_rx + dropped`, and every frame sent
/// is a reply, a frame of the pinger (`ping_tx`) or of the MMDS client
/// (`mmds_tx`) or a gratuitous ARP of an announcement, so
/// `tx = arp + icmp + ping_tx + mmds_tx + announced`.
#[derive(Clone, Copy, Debug, Default)]
struct Stats {
    rx: u64,
    tx: u64,
    arp: u64,
    icmp: u64,
    dropped: u64,
    ping_rx: u64,
    ping_tx: u64,
    mmds_rx: u64,
    mmds_tx: u64,
}

/// A client running over the device (the MMDS client): it takes the ARP
/// replies and TCP segments to us that are its own, and has frames to
/// send.
pub trait Client {
    /// An ARP reply to us from `ip` at `mac`: true if the client took it.
    fn arp_reply(&mut self, ip: [u8; 4], mac: [u8; 6]) -> bool;
    /// A TCP segment to us (checksums verified): true if the client took
    /// it.
    fn tcp(&mut self, segment: &TcpIn<'_>) -> bool;
    /// True if the client has a frame to send.
    fn wants_to_send(&self) -> bool;
    /// Writes the next frame into `out` (at most `ETH_HLEN + mtu` bytes)
    /// and returns its length, or `None` if there is none.
    fn next_frame(&mut self, iface: &Iface, ip_id: u16, out: &mut [u8]) -> Option<usize>;
}

/// One RX/TX queue pair with its buffers.
struct Pair {
    rx: Virtqueue,
    tx: Virtqueue,
    /// RX buffer (index into `NetMem::rx[pair]`) of each descriptor head
    /// the device owns.
    rx_buf: [u8; QS],
    /// TX buffer of each descriptor head the device owns.
    tx_buf: [u8; QS],
    /// Free TX buffers (a stack).
    tx_free: [u8; TX_BUFS],
    tx_free_len: usize,
    /// RX buffers in use on this queue.
    rx_bufs: usize,
    /// Frames received and sent on this pair (verbose output).
    rx_frames: u64,
    tx_frames: u64,
}

/// A set-up virtio-net device being served.
pub struct Net {
    index: u32,
    /// `None` once the device has been reset.
    transport: Option<Transport>,
    pairs: [Option<Pair>; MAX_PAIRS],
    /// Pairs set up (the first ones in `pairs`); 0 once stopped.
    active_pairs: usize,
    /// Frames received and sent per pair, saved when the device stops
    /// (verbose output).
    pair_frames: [(u64, u64); MAX_PAIRS],
    /// Pairs that were set up (for the verbose output).
    pairs_set_up: usize,
    ctrl: Option<Virtqueue>,
    /// `GUEST_ANNOUNCE` was negotiated.
    announces: bool,
    /// Announcements made.
    announced: u32,
    mem: *mut NetMem,
    iface: Iface,
    mtu: u16,
    ip_id: u16,
    stats: Stats,
    verbose: bool,
    /// The ping in progress (`probe.ping`).
    ping: Option<Pinger>,
    /// Whether a pinger was ever set: the stats line then has the
    /// `ping_rx` and `ping_tx` counters.
    pinged: bool,
    /// Whether [`Net::poll_client`] was ever called: the stats line then
    /// has the `mmds_rx` and `mmds_tx` counters.
    client_served: bool,
}

/// Sets up the virtio-net device behind `regs` as device `index` and
/// prints `probe.net<index>=up ...`, or `=error setup ...` (then `None`).
pub fn setup(index: u32, regs: Regs, options: &Options, verbose: bool) -> Option<Net> {
    let transport = match Transport::new(regs) {
        Ok(t) => t,
        Err(e) => {
            outln!("probe.net{}=error setup {}", index, e.name());
            return None;
        }
    };
    let Some(mem) = NET_MEM.take() else {
        outln!("probe.net{}=error setup {}", index, SetupError::DmaBusy);
        return None;
    };
    let mut net = Net {
        index,
        transport: Some(transport),
        pairs: [const { None }; MAX_PAIRS],
        active_pairs: 0,
        pair_frames: [(0, 0); MAX_PAIRS],
        pairs_set_up: 0,
        ctrl: None,
        announces: false,
        announced: 0,
        mem,
        iface: Iface {
            mac: DEFAULT_MAC,
            ip: options.ip,
        },
        mtu: DEFAULT_MTU,
        ip_id: 1,
        stats: Stats::default(),
        verbose,
        ping: None,
        pinged: false,
        client_served: false,
    };
    match net.init(options) {
        Ok(()) => {
            outln!(
                "probe.net{}=up mac={} queues={} mtu={}",
                index,
                MacAddr(net.iface.mac),
                net.active_pairs,
                net.mtu
            );
            Some(net)
        }
        Err(e) => {
            outln!("probe.net{}=error setup {}", index, e);
            // The device is reset; a reset timeout only marks it FAILED.
            let _ = net.stop();
            NET_MEM.give_back();
            None
        }
    }
}

/// Address of buffer `buf` of `pair` (`tx` selects the TX buffers).
fn buf_addr(mem: *mut NetMem, pair: usize, buf: usize, tx: bool) -> *mut u8 {
    let pair = pair.min(MAX_PAIRS - 1);
    // SAFETY: only computes an address inside the pool (indices clamped).
    unsafe {
        if tx {
            (&raw mut (*mem).tx[pair][buf.min(TX_BUFS - 1)]).cast::<u8>()
        } else {
            (&raw mut (*mem).rx[pair][buf.min(RX_BUFS - 1)]).cast::<u8>()
        }
    }
}

impl Net {
    /// Negotiates features, reads and checks the config fields, sets up
    /// the queues, posts the RX buffers, sets DRIVER_OK and enables the
    /// queue pairs.
    fn init(&mut self, options: &Options) -> Result<(), SetupError> {
        let Some(t) = self.transport.as_mut() else {
            return Err(SetupError::Transport(Error::ResetTimeout));
        };
        let offered = t.begin_negotiation().map_err(SetupError::Transport)?;
        if offered & virtio::F_VERSION_1 == 0 {
            t.fail();
            return Err(SetupError::Transport(Error::MissingFeatures(
                virtio::F_VERSION_1,
            )));
        }
        let mut wanted = virtio::F_VERSION_1 | feature::MAC | feature::STATUS;
        // Like Linux's `virtnet_validate`, look at config fields before
        // accepting the features they belong to.
        if offered & feature::MTU != 0 {
            let mtu = t.config_read16(config::MTU);
            if (MIN_MTU..=MAX_MTU).contains(&mtu) {
                wanted |= feature::MTU;
                self.mtu = mtu;
            }
        }
        let mut pairs = 1;
        let mut max_pairs = 1;
        let mq = feature::MQ | feature::CTRL_VQ;
        if options.queues > 1 && offered & mq == mq {
            max_pairs = t.config_read16(config::MAX_VIRTQUEUE_PAIRS);
            if !(1..=MAX_VIRTQUEUE_PAIRS).contains(&max_pairs) {
                t.fail();
                return Err(SetupError::Config(
                    "max_virtqueue_pairs",
                    u64::from(max_pairs),
                ));
            }
            pairs = usize::from(max_pairs)
                .min(MAX_PAIRS)
                .min(options.queues as usize);
            if pairs > 1 {
                wanted |= mq;
            }
        }
        // The control queue sits at 2 without MQ offered, and after all of
        // the device's pairs with it: a device offering MQ that the probe
        // does not take gets no control queue (the pairs in between would
        // not be set up, and the transport only sees the queues up to the
        // first one that is not).
        let announce = feature::CTRL_VQ | feature::GUEST_ANNOUNCE | feature::STATUS;
        if offered & announce == announce
            && (offered & feature::MQ == 0 || wanted & feature::MQ != 0)
        {
            wanted |= announce;
        }
        let features = t
            .accept_features(offered & wanted)
            .map_err(SetupError::Transport)?;
        if features & feature::MAC != 0 {
            let mac: [u8; 6] = t.config_bytes(config::MAC);
            if mac[0] & 1 != 0 || mac == [0; 6] {
                t.fail();
                return Err(SetupError::Mac(mac));
            }
            self.iface.mac = mac;
        }
        for p in 0..pairs {
            let rx_index = 2 * p as u32;
            let rx = t
                .setup_queue(rx_index)
                .map_err(|e| SetupError::Queue(rx_index, e))?;
            let tx = t
                .setup_queue(rx_index + 1)
                .map_err(|e| SetupError::Queue(rx_index + 1, e))?;
            self.pairs[p] = Some(Pair {
                rx,
                tx,
                rx_buf: [0; QS],
                tx_buf: [0; QS],
                tx_free: [0; TX_BUFS],
                tx_free_len: 0,
                rx_bufs: 0,
                rx_frames: 0,
                tx_frames: 0,
            });
            self.active_pairs = p + 1;
            self.pairs_set_up = p + 1;
        }
        if features & feature::CTRL_VQ != 0 {
            // After the data queues: all of them with MQ, one pair without.
            let index = if features & feature::MQ != 0 {
                2 * u32::from(max_pairs)
            } else {
                2
            };
            let ctrl = t
                .setup_queue(index)
                .map_err(|e| SetupError::Queue(index, e))?;
            self.ctrl = Some(ctrl);
            self.announces = features & feature::GUEST_ANNOUNCE != 0;
        }
        for (p, pair) in self.pairs.iter_mut().enumerate() {
            if let Some(pair) = pair {
                pair.fill(self.mem, p);
            }
        }
        t.driver_ok();
        if t.status() & virtio::status::DEVICE_NEEDS_RESET != 0 {
            return Err(SetupError::Transport(Error::DeviceNeedsReset));
        }
        for pair in self.pairs.iter().flatten() {
            t.notify(&pair.rx);
        }
        if pairs > 1 {
            self.set_pairs(pairs as u16)?;
        }
        Ok(())
    }

    /// Sends `VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET` and checks the ack.
    fn set_pairs(&mut self, pairs: u16) -> Result<(), SetupError> {
        self.ctrl_command([CTRL_CLASS_MQ, CTRL_MQ_VQ_PAIRS_SET], Some(pairs))
    }

    /// Sends one control command (with its 2-byte argument, if any) and
    /// checks the ack.
    fn ctrl_command(&mut self, header: [u8; 2], arg: Option<u16>) -> Result<(), SetupError> {
        let (Some(t), Some(ctrl)) = (self.transport.as_ref(), self.ctrl.as_mut()) else {
            return Err(SetupError::Ctrl(Error::QueueUnavailable));
        };
        let mem = self.mem;
        // SAFETY: the control buffers are only used by this one command,
        // which is not in flight yet; raw pointers only.
        let (header_addr, data, ack) = unsafe {
            let c = &raw mut (*mem).ctrl;
            (&raw mut (*c).header).write_volatile(header);
            (&raw mut (*c).pairs).write_volatile(arg.unwrap_or(0).to_le_bytes());
            (&raw mut (*c).ack).write_volatile(CTRL_ACK_UNSET);
            (
                &raw mut (*c).header as u64,
                &raw mut (*c).pairs as u64,
                &raw mut (*c).ack,
            )
        };
        let header_buf = Buffer {
            addr: header_addr,
            len: 2,
            device_writes: false,
        };
        let data_buf = Buffer {
            addr: data,
            len: 2,
            device_writes: false,
        };
        let ack_buf = Buffer {
            addr: ack as u64,
            len: 1,
            device_writes: true,
        };
        let with_arg = [header_buf, data_buf, ack_buf];
        let without_arg = [header_buf, ack_buf];
        let buffers: &[Buffer] = if arg.is_some() {
            &with_arg
        } else {
            &without_arg
        };
        // SAFETY: the buffers are in the static pool this driver owns and
        // are not touched until the chain comes back (or the device is
        // reset).
        unsafe { ctrl.add(buffers) }.map_err(SetupError::Ctrl)?;
        t.notify(ctrl);
        let used = ctrl
            .wait_used(t, CTRL_TIMEOUT_MS)
            .map_err(SetupError::Ctrl)?;
        if used.len > 1 {
            return Err(SetupError::CtrlLen(used.len));
        }
        // SAFETY: the command completed, so the device is done with the
        // ack byte; volatile because the device wrote it.
        match unsafe { ack.read_volatile() } {
            CTRL_OK => Ok(()),
            other => Err(SetupError::CtrlAck(other)),
        }
    }

    /// Serves the device once: handles every received frame on every
    /// queue pair (reclaiming sent frames first). Does nothing once the
    /// device was stopped. Cheap when nothing arrived: one read of each
    /// RX used index (sent frames are only reclaimed when a frame
    /// arrives, or by [`Net::finish`]).
    #[inline]
    pub fn poll(&mut self) {
        let active = self.pairs.get(..self.active_pairs).unwrap_or(&[]);
        if active.iter().flatten().any(|p| p.rx.has_used()) {
            self.poll_busy();
        }
    }

    #[inline(never)]
    fn poll_busy(&mut self) {
        self.serve_pairs(None);
    }

    /// [`Net::poll`] for a [`Client`]: the ARP replies and TCP segments
    /// to us that `client` takes go to it (after the pinger was offered
    /// the ARP replies); then the frames `client` has ready are sent on
    /// the TX queue of pair 0, as many as there are free transmit buffers.
    #[inline]
    pub fn poll_client(&mut self, client: &mut dyn Client) {
        self.client_served = true;
        let active = self.pairs.get(..self.active_pairs).unwrap_or(&[]);
        if active.iter().flatten().any(|p| p.rx.has_used()) {
            self.serve_pairs(Some(&mut *client));
        }
        if client.wants_to_send() {
            self.send_client_frames(client);
        }
    }

    #[inline(never)]
    fn send_client_frames(&mut self, client: &mut dyn Client) {
        for _ in 0..TX_BUFS {
            if !client.wants_to_send() {
                break;
            }
            if !self.send_frame(|iface, ip_id, out| client.next_frame(iface, ip_id, out)) {
                break;
            }
            self.stats.mmds_tx += 1;
        }
    }

    /// Serves every queue pair once (see [`Pair::serve`]).
    fn serve_pairs<'c>(&mut self, mut client: Option<&mut (dyn Client + 'c)>) {
        let Some(t) = self.transport.as_ref() else {
            return;
        };
        let mut failure = None;
        for (p, pair) in self.pairs.iter_mut().enumerate() {
            let Some(pair) = pair else {
                continue;
            };
            let ctx = Ctx {
                mem: self.mem,
                iface: &self.iface,
                mtu: usize::from(self.mtu),
                pair: p,
            };
            let state = ServeState {
                stats: &mut self.stats,
                ip_id: &mut self.ip_id,
                ping: &mut self.ping,
                client: client.as_deref_mut(),
            };
            if let Err(e) = pair.serve(t, &ctx, state) {
                failure = Some(e);
                break;
            }
        }
        if let Some(e) = failure {
            self.fail(e);
        }
    }

    /// Announces us if the device asks (`VIRTIO_NET_S_ANNOUNCE` with a
    /// configuration change): a gratuitous ARP, then the ack. Two register
    /// accesses when nothing changed.
    pub fn check_announce(&mut self) {
        if !self.announces {
            return;
        }
        let Some(t) = self.transport.as_ref() else {
            return;
        };
        if t.ack_interrupt() & INT_CONFIG == 0
            || t.config_read16(config::STATUS) & STATUS_ANNOUNCE == 0
        {
            return;
        }
        let arp = self.send_frame(|iface, _, out| netproto::arp_request(iface, &iface.ip, out));
        let acked = self.ctrl_command([CTRL_CLASS_ANNOUNCE, CTRL_ANNOUNCE_ACK], None);
        self.announced += 1;
        match acked {
            Ok(()) => outln!(
                "probe.net{}=announced {} arp={}",
                self.index,
                self.announced,
                u8::from(arp)
            ),
            Err(e) => outln!("probe.net{}=error announce {}", self.index, e),
        }
    }

    /// Stops serving after a corrupt used ring.
    fn fail(&mut self, e: ServeError) {
        outln!("probe.net{}=error {}", self.index, e);
        if self.stop().is_err() {
            outln!("probe.net{}=error reset-timeout", self.index);
        }
    }

    /// Sets (or clears) the ping in progress: ARP and echo replies to us
    /// then go to it.
    pub fn set_pinger(&mut self, ping: Option<Pinger>) {
        self.pinged |= ping.is_some();
        self.ping = ping;
    }

    pub fn pinger(&self) -> Option<&Pinger> {
        self.ping.as_ref()
    }

    pub fn pinger_mut(&mut self) -> Option<&mut Pinger> {
        self.ping.as_mut()
    }

    /// The MTU: the largest IPv4 packet sent.
    pub fn mtu(&self) -> u16 {
        self.mtu
    }

    /// Sends one frame on the TX queue of pair 0: `build(iface, ip_id,
    /// out)` writes it into `out` (at most `ETH_HLEN + mtu` bytes) and
    /// returns its length. The IPv4 identification moves on for every
    /// frame sent. False if the device was stopped, no transmit buffer is
    /// free, or `build` failed.
    pub fn transmit(
        &mut self,
        build: impl FnOnce(&Iface, u16, &mut [u8]) -> Option<usize>,
    ) -> bool {
        let sent = self.send_frame(build);
        if sent {
            self.stats.ping_tx += 1;
        }
        sent
    }

    /// [`Net::transmit`] without counting the frame as the pinger's.
    fn send_frame(&mut self, build: impl FnOnce(&Iface, u16, &mut [u8]) -> Option<usize>) -> bool {
        let (Some(t), Some(Some(pair))) = (self.transport.as_ref(), self.pairs.first_mut()) else {
            return false;
        };
        if let Err(e) = pair.reclaim() {
            self.fail(e);
            return false;
        }
        let mtu = usize::from(self.mtu);
        let Some((tx_buf, out)) = pair.free_tx_frame(self.mem, 0, mtu) else {
            return false;
        };
        let Some(len) = build(&self.iface, self.ip_id, out) else {
            return false;
        };
        if !pair.push_tx(self.mem, 0, tx_buf, len) {
            return false;
        }
        t.notify_if_needed(&pair.tx);
        self.ip_id = self.ip_id.wrapping_add(1);
        self.stats.tx += 1;
        true
    }

    /// Waits briefly for frames in flight to be sent, prints the stats
    /// line (and, verbose, one line per queue pair), resets the device and
    /// gives back the buffers.
    pub fn finish(mut self) {
        if self.transport.is_some() {
            let mut deadline = timer::Deadline::start(TX_DRAIN_MS, 1 << 16);
            'drain: for pair in self.pairs.iter_mut().flatten() {
                while pair.tx.in_flight() > 0 {
                    if pair.reclaim().is_err() || deadline.expired() {
                        break 'drain;
                    }
                    core::hint::spin_loop();
                }
            }
        }
        if self.verbose {
            self.save_pair_frames();
            let frames = self.pair_frames.iter().take(self.pairs_set_up);
            for (p, (rx, tx)) in frames.enumerate() {
                outln!("probe.net{}_pair={} rx={} tx={}", self.index, p, rx, tx);
            }
        }
        outln!("probe.net{}=stats {}", self.index, self.stats_text());
        if self.stop().is_err() {
            outln!("probe.net{}=error reset-timeout", self.index);
        }
        NET_MEM.give_back();
    }

    /// The counters of the stats line: the `ping_` ones after a ping, the
    /// `mmds_` ones after the MMDS client ran.
    fn stats_text(&self) -> StatsText {
        StatsText {
            stats: self.stats,
            ping: self.pinged,
            mmds: self.client_served,
        }
    }

    /// Copies the frame counters of the pairs still set up.
    fn save_pair_frames(&mut self) {
        for (saved, pair) in self.pair_frames.iter_mut().zip(&self.pairs) {
            if let Some(pair) = pair {
                *saved = (pair.rx_frames, pair.tx_frames);
            }
        }
    }

    /// Resets the device (if not done yet) and returns its queue memory
    /// when the reset is confirmed.
    fn stop(&mut self) -> Result<(), Error> {
        self.save_pair_frames();
        self.active_pairs = 0;
        let Some(transport) = self.transport.take() else {
            return Ok(());
        };
        let queues = self
            .pairs
            .iter_mut()
            .flat_map(|p| p.take().map(|p| [p.rx, p.tx]))
            .flatten()
            .chain(self.ctrl.take());
        transport.shutdown(queues)
    }
}

/// `rx=<n> tx=<n> arp=<n> icmp=<n> dropped=<n>[ ping_rx=<n> ping_tx=<n>][ mmds_rx=<n> mmds_tx=<n>]`.
struct StatsText {
    stats: Stats,
    ping: bool,
    mmds: bool,
}

impl fmt::Display for StatsText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.stats;
        write!(
            f,
            "rx={} tx={} arp={} icmp={} dropped={}",
            s.rx, s.tx, s.arp, s.icmp, s.dropped
        )?;
        if self.ping {
            write!(f, " ping_rx={} ping_tx={}", s.ping_rx, s.ping_tx)?;
        }
        if self.mmds {
            write!(f, " mmds_rx={} mmds_tx={}", s.mmds_rx, s.mmds_tx)?;
        }
        Ok(())
    }
}

/// The device state [`Pair::serve`] updates.
struct ServeState<'a, 'c> {
    stats: &'a mut Stats,
    /// IPv4 identification of the next frame sent.
    ip_id: &'a mut u16,
    ping: &'a mut Option<Pinger>,
    /// The client being served ([`Net::poll_client`]).
    client: Option<&'a mut (dyn Client + 'c)>,
}

/// What [`Pair::serve`] needs besides the pair.
struct Ctx<'a> {
    mem: *mut NetMem,
    iface: &'a Iface,
    /// Largest IPv4 packet sent.
    mtu: usize,
    /// Index of the pair.
    pair: usize,
}

impl Pair {
    /// Zeroes and posts the RX buffers, and fills the TX free list
    /// (before DRIVER_OK: no notification).
    fn fill(&mut self, mem: *mut NetMem, pair: usize) {
        self.rx.disable_interrupts();
        self.tx.disable_interrupts();
        self.rx_bufs = RX_BUFS.min(usize::from(self.rx.size()));
        // SAFETY: the pair's RX buffers are in the pool this driver owns,
        // the device does not know them yet, and they are 8-byte aligned.
        unsafe {
            zero_words(
                buf_addr(mem, pair, 0, false).cast::<u64>(),
                self.rx_bufs * BUF_SIZE / 8,
            )
        };
        for buf in 0..self.rx_bufs {
            self.post_rx(mem, pair, buf);
        }
        self.tx_free_len = TX_BUFS.min(usize::from(self.tx.size()));
        for (i, slot) in self.tx_free.iter_mut().enumerate() {
            *slot = i as u8;
        }
    }

    /// Makes RX buffer `buf` available (the caller notifies).
    fn post_rx(&mut self, mem: *mut NetMem, pair: usize, buf: usize) {
        let buffer = Buffer {
            addr: buf_addr(mem, pair, buf, false) as u64,
            len: BUF_SIZE as u32,
            device_writes: true,
        };
        // It cannot fail for lack of descriptors: each RX buffer is one
        // descriptor, and there are at most as many buffers as descriptors.
        // SAFETY: the buffer is in the static pool this driver owns; it is
        // not accessed until the device returns it through the used ring.
        if let Ok(head) = unsafe { self.rx.add(&[buffer]) } {
            self.rx_buf[usize::from(head)] = buf as u8;
        }
    }

    /// Takes every sent frame off the TX used ring.
    fn reclaim(&mut self) -> Result<(), ServeError> {
        while self.tx.in_flight() > 0 {
            let used = self.tx.pop_used().map_err(|error| ServeError {
                error,
                queue: self.tx.index(),
            })?;
            let Some(Used { head, .. }) = used else {
                break;
            };
            // The TX used length is ignored: nothing is read back.
            if self.tx_free_len < TX_BUFS {
                self.tx_free[self.tx_free_len] = self.tx_buf[usize::from(head)];
                self.tx_free_len += 1;
            }
        }
        Ok(())
    }

    /// Reclaims sent frames, then handles (at most one round of) received
    /// frames, re-posting each buffer; notifies each queue once.
    fn serve(
        &mut self,
        t: &Transport,
        ctx: &Ctx<'_>,
        mut state: ServeState<'_, '_>,
    ) -> Result<(), ServeError> {
        self.reclaim()?;
        let mut received = 0;
        let mut sent = 0;
        while received < self.rx_bufs {
            let used = self.rx.pop_used().map_err(|error| ServeError {
                error,
                queue: self.rx.index(),
            })?;
            let Some(used) = used else {
                break;
            };
            received += 1;
            state.stats.rx += 1;
            self.rx_frames += 1;
            let buf = usize::from(self.rx_buf[usize::from(used.head)]);
            if self.answer(ctx, buf, used.len, &mut state) {
                sent += 1;
            }
            self.post_rx(ctx.mem, ctx.pair, buf);
        }
        if received > 0 {
            t.notify_if_needed(&self.rx);
        }
        if sent > 0 {
            t.notify_if_needed(&self.tx);
        }
        Ok(())
    }

    /// Handles the frame in RX buffer `buf` (`len` bytes written by the
    /// device, header included); true if a reply was queued. Replies to
    /// the pinger's requests go to it (no transmit buffer needed).
    fn answer(
        &mut self,
        ctx: &Ctx<'_>,
        buf: usize,
        len: u32,
        state: &mut ServeState<'_, '_>,
    ) -> bool {
        let stats = &mut *state.stats;
        let len = len as usize;
        if !(HDR_LEN + ETH_HLEN..=BUF_SIZE).contains(&len) {
            stats.dropped += 1;
            return false;
        }
        let ptr = buf_addr(ctx.mem, ctx.pair, buf, false);
        // SAFETY: the device returned this buffer (it is no longer in
        // flight), `len` <= BUF_SIZE, and nothing else refers to it until
        // it is re-posted after this function.
        let data = unsafe { core::slice::from_raw_parts(ptr, len) };
        let Some((header, frame)) = data.split_first_chunk::<HDR_LEN>() else {
            stats.dropped += 1;
            return false;
        };
        if header[0] & HDR_F_NEEDS_CSUM != 0 || header[1] != GSO_NONE {
            stats.dropped += 1;
            return false;
        }
        // Without a free transmit buffer, only frames that need no reply
        // get through.
        let (tx_buf, tx_frame) = match self.free_tx_frame(ctx.mem, ctx.pair, ctx.mtu) {
            Some((tx_buf, out)) => (Some(tx_buf), out),
            None => (None, &mut [][..]),
        };
        let (frame_len, echo) = match netproto::answer(ctx.iface, frame, tx_frame, *state.ip_id) {
            Answer::Arp(n) => (n, false),
            Answer::Echo(n) => (n, true),
            Answer::ArpReply { ip, mac } => {
                if state.client.as_mut().is_some_and(|c| c.arp_reply(ip, mac)) {
                    stats.mmds_rx += 1;
                    return false;
                }
                let taken = state.ping.as_mut().is_some_and(|p| p.arp_reply(ip, mac));
                count_ping_reply(stats, taken);
                return false;
            }
            Answer::Tcp(segment) => {
                if state.client.as_mut().is_some_and(|c| c.tcp(&segment)) {
                    stats.mmds_rx += 1;
                } else {
                    stats.dropped += 1;
                }
                return false;
            }
            Answer::EchoReply {
                from,
                id,
                seq,
                data,
            } => {
                let taken = state
                    .ping
                    .as_mut()
                    .is_some_and(|p| p.echo_reply(from, id, seq, data));
                count_ping_reply(stats, taken);
                return false;
            }
            Answer::Drop => {
                stats.dropped += 1;
                return false;
            }
        };
        let Some(tx_buf) = tx_buf else {
            stats.dropped += 1;
            return false;
        };
        if !self.push_tx(ctx.mem, ctx.pair, tx_buf, frame_len) {
            stats.dropped += 1;
            return false;
        }
        stats.tx += 1;
        if echo {
            stats.icmp += 1;
            *state.ip_id = state.ip_id.wrapping_add(1);
        } else {
            stats.arp += 1;
        }
        true
    }

    /// The next free TX buffer (still on the free list) and its frame
    /// area after the header, at most `ETH_HLEN + mtu` bytes (replies
    /// longer than the MTU are not sent: no fragmentation).
    fn free_tx_frame(
        &mut self,
        mem: *mut NetMem,
        pair: usize,
        mtu: usize,
    ) -> Option<(usize, &mut [u8])> {
        let tx_buf = usize::from(*self.tx_free.get(self.tx_free_len.checked_sub(1)?)?);
        let tx_addr = buf_addr(mem, pair, tx_buf, true);
        // SAFETY: free TX buffers belong to no chain in flight; the
        // buffer is in the static pool and nothing else refers to it (the
        // slice borrows `self`, so it is gone before `push_tx`).
        let out = unsafe { core::slice::from_raw_parts_mut(tx_addr, BUF_SIZE) };
        let frame = out.get_mut(HDR_LEN..)?;
        let frame_len = frame.len().min(ETH_HLEN + mtu);
        Some((tx_buf, frame.get_mut(..frame_len)?))
    }

    /// Sends the `frame_len`-byte frame written into the frame area of
    /// free TX buffer `tx_buf` (from [`Pair::free_tx_frame`]): writes the
    /// header and makes the buffer available (the caller notifies).
    fn push_tx(&mut self, mem: *mut NetMem, pair: usize, tx_buf: usize, frame_len: usize) -> bool {
        if self.tx_free_len == 0 || frame_len > BUF_SIZE - HDR_LEN {
            return false;
        }
        let tx_addr = buf_addr(mem, pair, tx_buf, true);
        // No offloads: flags, gso_type and every other field are 0.
        // SAFETY: the buffer is free (no chain in flight uses it), in the
        // static pool, and no reference to it is alive.
        unsafe { tx_addr.cast::<[u8; HDR_LEN]>().write([0; HDR_LEN]) };
        let buffer = Buffer {
            addr: tx_addr as u64,
            len: (HDR_LEN + frame_len) as u32,
            device_writes: false,
        };
        // SAFETY: the TX buffer stays untouched (off the free list) until
        // the device returns it through the used ring.
        let Ok(head) = (unsafe { self.tx.add(&[buffer]) }) else {
            return false;
        };
        self.tx_buf[usize::from(head)] = tx_buf as u8;
        self.tx_free_len -= 1;
        self.tx_frames += 1;
        true
    }
}

/// Counts a reply to one of our requests: taken by the pinger, or not
/// ours (dropped).
fn count_ping_reply(stats: &mut Stats, taken: bool) {
    if taken {
        stats.ping_rx += 1;
    } else {
        stats.dropped += 1;
    }
}

/// Stores zero in `words` 64-bit words at `dst` with one `rep stosq`
/// (`write_bytes` becomes `rep stosb`: eight times the iterations, each
/// one emulated under kvm_pvm).
///
/// # Safety
/// `dst` must be 8-byte aligned and valid for writes of `words` words,
/// and no reference may cover that memory.
pub unsafe fn zero_words(dst: *mut u64, words: usize) {
    // SAFETY: the caller guarantees the memory is writable; the direction
    // flag is clear (Rust ABI), so `rep stosq` writes exactly `rcx` words
    // upwards from `dst`.
    unsafe {
        core::arch::asm!(
            "rep stosq",
            inout("rcx") words => _,
            inout("rdi") dst => _,
            in("rax") 0u64,
            options(nostack, preserves_flags)
        )
    };
}

/// One step of a loop that serves the device while it waits (`probe.ping`,
/// `probe.mmds`), in milliseconds.
pub const STEP_MS: u32 = 10;

/// Waits [`STEP_MS`] while serving the device: on the clock if there is
/// one, else by counting polls.
pub struct StepClock {
    clock: bool,
}

impl StepClock {
    pub fn new() -> StepClock {
        StepClock {
            clock: timer::present(),
        }
    }

    /// Waits one step, calling `poll` (which serves the device) all along.
    pub fn step(&mut self, mut poll: impl FnMut()) {
        if self.clock && timer::sleep_10ms_polling(&mut poll).is_ok() {
            return;
        }
        // No clock (or the PIT stopped working): count polls instead.
        self.clock = false;
        let spins = u64::from(STEP_MS) * SERVE_SPINS_PER_MS_WITHOUT_PIT;
        for _ in 0..spins {
            poll();
        }
    }
}

/// How [`serve_deadline`] times a serving period.
const SERVE_SPINS_PER_CHECK_WITH_PIT: u64 = 64;
/// Without a PIT (QEMU microvm) the number of polls is the only clock:
/// roughly what QEMU TCG manages per millisecond with an idle device.
/// Under an emulating KVM (kvm_pvm) a poll takes some 40 us instead of
/// 25 ns, so a millisecond lasts about 1.5 s there.
pub const SERVE_SPINS_PER_MS_WITHOUT_PIT: u64 = 40_000;

/// A deadline `ms` milliseconds from now for a loop that calls
/// [`Net::poll`] once per spin: PIT timed (in 50 ms steps) if there is a
/// PIT, else [`SERVE_SPINS_PER_MS_WITHOUT_PIT`] spins per millisecond.
pub fn serve_deadline(ms: u32) -> timer::Deadline {
    if timer::present() {
        timer::Deadline::start_with(ms, 0, SERVE_SPINS_PER_CHECK_WITH_PIT, u64::MAX)
    } else {
        let spins = u64::from(ms) * SERVE_SPINS_PER_MS_WITHOUT_PIT;
        timer::Deadline::start_with(ms, spins, 4096, u64::MAX)
    }
}
