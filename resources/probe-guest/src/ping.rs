//! `probe.ping=<a.b.c.d>[:<count>]`: the probe pings another host through
//! the network device it serves (`probe.net`), for example a second probe
//! guest on the same bridge.
//!
//! [`run`] runs after the `probe.virtio=` lines, before the probe ticks or
//! serves: it broadcasts an ARP request for the address every 100 ms until
//! an ARP reply names it (at most 5 s, then `probe.ping <addr>
//! arp=timeout`), then sends `count` (default 5, at most 64) ICMP echo
//! requests 100 ms apart to the MAC that reply gave, and waits up to 2 s
//! after the last one for the replies. It ends with one line
//! `probe.ping <addr> sent=<n> received=<m>`. A reply counts if it comes
//! from the address, to our address and MAC, with valid checksums, our
//! identifier, the sequence number of a request sent, and exactly the
//! data of that request; each sequence number counts once.
//!
//! Time is measured in 10 ms steps of the clock whose wait polls the
//! device ([`crate::virtio_net::StepClock`]), so the probe keeps
//! answering ARP requests and pings from others while it pings; without
//! a clock, in [`crate::virtio_net::SERVE_SPINS_PER_MS_WITHOUT_PIT`]
//! polls per millisecond.

use crate::cmdline::{self, BadOption};
use crate::netproto::{self, EchoRequest};
use crate::serial::outln;
use crate::virtio_net::{Net, StepClock};

/// Default number of echo requests.
const DEFAULT_COUNT: u32 = 5;
/// Most echo requests (one bit each in [`Pinger::replied`]).
pub const MAX_COUNT: u32 = 64;
/// Bytes of data in each echo request (as Linux's `ping`).
pub const DATA_LEN: usize = 56;
/// ICMP identifier of our echo requests ("pb").
pub const ECHO_ID: u16 = 0x7062;

/// ARP requests are sent this many steps apart (100 ms)...
const ARP_RETRY_STEPS: u32 = 10;
/// ...for at most this many steps (5 s).
const ARP_TIMEOUT_STEPS: u32 = 500;
/// Echo requests are sent this many steps apart (100 ms).
const ECHO_INTERVAL_STEPS: u32 = 10;
/// Replies are awaited this many steps after the last request (2 s).
const REPLY_WAIT_STEPS: u32 = 200;

/// `probe.ping` options.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    pub ip: [u8; 4],
    pub count: u32,
}

/// Reads `probe.ping=<a.b.c.d>[:<count>]` (last one wins): a decimal
/// dotted-quad address (not in 0.0.0.0/8, 127.0.0.0/8 or 224.0.0.0/3) and
/// a count of 1 to [`MAX_COUNT`] (base 0 like `kstrtouint`). `Ok(None)`
/// without `probe.ping`.
pub fn options(cmdline: &[u8]) -> Result<Option<Options>, BadOption<'_>> {
    let Some(value) = cmdline::last_value(cmdline, "probe.ping") else {
        return Ok(None);
    };
    let bad = BadOption {
        name: "probe.ping",
        value,
    };
    let value = value.ok_or(bad)?;
    let (addr, count) = match value.iter().position(|&c| c == b':') {
        Some(colon) => {
            let count = value
                .get(colon + 1..)
                .and_then(|v| cmdline::kstrtouint(v, 0))
                .filter(|n| (1..=MAX_COUNT).contains(n))
                .ok_or(bad)?;
            (value.get(..colon).ok_or(bad)?, count)
        }
        None => (value, DEFAULT_COUNT),
    };
    let ip = netproto::parse_ipv4(addr).ok_or(bad)?;
    Ok(Some(Options { ip, count }))
}

/// The data of echo request `seq`: a pattern that differs per sequence
/// number, so that a reply with another request's data does not count.
fn data(seq: u16) -> [u8; DATA_LEN] {
    let mut data = [0u8; DATA_LEN];
    let [hi, lo] = seq.to_be_bytes();
    for (i, byte) in data.iter_mut().enumerate() {
        *byte = (i as u8).wrapping_mul(7) ^ lo ^ hi.rotate_left(3) ^ 0xa5;
    }
    data
}

/// The state of a ping in progress, kept by the [`Net`] device so that
/// replies reach it while it serves.
#[derive(Clone, Copy, Debug)]
pub struct Pinger {
    target: [u8; 4],
    /// The target's MAC, from the first ARP reply that named it.
    mac: Option<[u8; 6]>,
    /// Echo requests sent (sequence numbers 0 to `sent - 1`).
    sent: u32,
    /// Bit `seq` is set once a good reply to request `seq` arrived.
    replied: u64,
    /// Set bits in `replied`.
    received: u32,
}

impl Pinger {
    fn new(target: [u8; 4]) -> Pinger {
        Pinger {
            target,
            mac: None,
            sent: 0,
            replied: 0,
            received: 0,
        }
    }

    /// An ARP reply from `ip` at `mac` arrived; true if it was ours.
    pub fn arp_reply(&mut self, ip: [u8; 4], mac: [u8; 6]) -> bool {
        if ip != self.target {
            return false;
        }
        if self.mac.is_none() {
            self.mac = Some(mac);
        }
        true
    }

    /// An ICMP echo reply arrived; true if it answers one of our requests
    /// (a duplicate is accepted but not counted twice).
    pub fn echo_reply(&mut self, from: [u8; 4], id: u16, seq: u16, data: &[u8]) -> bool {
        if from != self.target || id != ECHO_ID || u32::from(seq) >= self.sent {
            return false;
        }
        if data != self::data(seq) {
            return false;
        }
        let bit = 1u64.checked_shl(u32::from(seq)).unwrap_or(0);
        if self.replied & bit == 0 {
            self.replied |= bit;
            self.received += 1;
        }
        true
    }
}

/// `probe.ping`: pings `options.ip` through `net` (see the module
/// documentation) and prints the result. `net` is `None` if no network
/// device is served: then `probe.ping_error=no-net`.
pub fn run(options: &Options, net: Option<&mut Net>) {
    let Some(net) = net else {
        outln!("probe.ping_error=no-net");
        return;
    };
    let target = options.ip;
    let addr = Ipv4(target);
    net.set_pinger(Some(Pinger::new(target)));
    let mut clock = StepClock::new();

    let mut step = 0;
    let mac = loop {
        if let Some(mac) = net.pinger().and_then(|p| p.mac) {
            break Some(mac);
        }
        if step >= ARP_TIMEOUT_STEPS {
            break None;
        }
        if step.is_multiple_of(ARP_RETRY_STEPS) {
            net.transmit(|iface, _, out| netproto::arp_request(iface, &target, out));
        }
        clock.step(|| net.poll());
        step += 1;
    };
    let Some(mac) = mac else {
        outln!("probe.ping {} arp=timeout", addr);
        outln!("probe.ping {} sent=0 received=0", addr);
        net.set_pinger(None);
        return;
    };

    // Sends request `sent` every ECHO_INTERVAL_STEPS (retrying each step
    // while no transmit buffer is free), until all went out and came back
    // or REPLY_WAIT_STEPS after the time the last one was due.
    let count = options.count;
    let limit = count * ECHO_INTERVAL_STEPS + REPLY_WAIT_STEPS;
    let mut next_send = 0;
    for step in 0..limit {
        let Some(state) = net.pinger() else {
            break;
        };
        if state.received == count {
            break;
        }
        if state.sent < count && step >= next_send {
            let seq = state.sent as u16;
            let data = data(seq);
            let sent = net.transmit(|iface, ip_id, out| {
                let request = EchoRequest {
                    dst_mac: mac,
                    dst_ip: target,
                    ip_id,
                    id: ECHO_ID,
                    seq,
                    data: &data,
                };
                netproto::echo_request(iface, &request, out)
            });
            if sent {
                if let Some(p) = net.pinger_mut() {
                    p.sent += 1;
                }
                next_send = step + ECHO_INTERVAL_STEPS;
            }
        }
        clock.step(|| net.poll());
    }
    let (sent, received) = net.pinger().map_or((0, 0), |p| (p.sent, p.received));
    outln!("probe.ping {} sent={} received={}", addr, sent, received);
    net.set_pinger(None);
}

/// `a.b.c.d`.
struct Ipv4([u8; 4]);

impl core::fmt::Display for Ipv4 {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let [a, b, c, d] = self.0;
        write!(f, "{}.{}.{}.{}", a, b, c, d)
    }
}
