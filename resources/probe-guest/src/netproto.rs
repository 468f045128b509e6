//! Just enough Ethernet, ARP, IPv4 and ICMP to answer ARP requests and
//! pings for one IPv4 address, and to ping another one (used by
//! `virtio_net.rs` and `ping.rs`).
//!
//! [`answer`] looks at one received Ethernet frame (without FCS) and, if
//! it is an ARP request or an ICMP echo request for our address, writes
//! the reply frame; an ARP reply or an ICMP echo reply to us is handed
//! back parsed (for `probe.ping`). [`arp_request`] and [`echo_request`]
//! build the frames `probe.ping` sends. Everything is read from byte
//! slices with checked accesses (`first_chunk`, `get`), every header field
//! is checked before it is used, so a garbage frame is dropped and can
//! never panic.
//!
//! Cost matters (every guest instruction may be emulated): a frame is
//! parsed once, only the IPv4 header and the ICMP message are summed (the
//! ICMP sum is needed to drop corrupt requests), and the reply checksum is
//! derived from the request's (RFC 1624) instead of summing again. The
//! echoed data is copied with `rep movsq` (see [`crate::mem::copy`]).

/// Ethernet header length.
pub const ETH_HLEN: usize = 14;
/// Shortest Ethernet frame without FCS: shorter replies are zero-padded.
pub const ETH_ZLEN: usize = 60;

const ETHERTYPE_IPV4: [u8; 2] = [0x08, 0x00];
const ETHERTYPE_ARP: [u8; 2] = [0x08, 0x06];
const BROADCAST: [u8; 6] = [0xff; 6];

/// ARP for IPv4 over Ethernet: htype 1, ptype 0x0800, hlen 6, plen 4.
const ARP_ETH_IPV4: [u8; 6] = [0, 1, 0x08, 0x00, 6, 4];
const ARP_LEN: usize = 28;
const ARP_REQUEST: [u8; 2] = [0, 1];
const ARP_REPLY: [u8; 2] = [0, 2];

const IPV4_HLEN: usize = 20;
const IPPROTO_ICMP: u8 = 1;
/// `More fragments` flag and fragment offset bits of the IPv4 header.
const IPV4_FRAGMENT_MASK: u16 = 0x3fff;
const REPLY_TTL: u8 = 64;

const ICMP_HLEN: usize = 8;
const ICMP_ECHO_REQUEST: u8 = 8;
const ICMP_ECHO_REPLY: u8 = 0;

/// Our side of the link.
#[derive(Clone, Copy, Debug)]
pub struct Iface {
    pub mac: [u8; 6],
    pub ip: [u8; 4],
}

/// What to do with a received frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer<'a> {
    /// An ARP reply of this many bytes was written.
    Arp(usize),
    /// An ICMP echo reply of this many bytes was written.
    Echo(usize),
    /// An ARP reply to us (sender addresses checked to be unicast):
    /// nothing was written.
    ArpReply { ip: [u8; 4], mac: [u8; 6] },
    /// An ICMP echo reply to our address and MAC, with valid IPv4 and
    /// ICMP checksums: nothing was written.
    EchoReply {
        from: [u8; 4],
        id: u16,
        seq: u16,
        data: &'a [u8],
    },
    /// Not for us, not understood, or malformed: no reply.
    Drop,
}

/// Builds the reply to `frame` (an Ethernet frame without FCS) in `out`.
/// `ip_id` is the IPv4 identification of an echo reply. After
/// [`Answer::Drop`], `out` may hold parts of an unfinished reply. Replies
/// to our own requests need no room in `out` (it may be empty).
pub fn answer<'a>(iface: &Iface, frame: &'a [u8], out: &mut [u8], ip_id: u16) -> Answer<'a> {
    answer_frame(iface, frame, out, ip_id).unwrap_or(Answer::Drop)
}

fn answer_frame<'a>(
    iface: &Iface,
    frame: &'a [u8],
    out: &mut [u8],
    ip_id: u16,
) -> Option<Answer<'a>> {
    let (eth, payload) = frame.split_first_chunk::<ETH_HLEN>()?;
    let dst: &[u8; 6] = field(eth, 0)?;
    let src: &[u8; 6] = field(eth, 6)?;
    let ethertype: &[u8; 2] = field(eth, 12)?;
    // A multicast (or broadcast) source is invalid: never answer it.
    if src[0] & 1 != 0 {
        return None;
    }
    match *ethertype {
        ETHERTYPE_ARP if *dst == iface.mac || *dst == BROADCAST => arp(iface, payload, out),
        ETHERTYPE_IPV4 if *dst == iface.mac => ipv4(iface, src, payload, out, ip_id),
        _ => None,
    }
}

/// The `N` bytes of `s` at `at`. With a fixed-size `s` and constant
/// offsets (all callers) the optimiser removes the check.
fn field<const N: usize>(s: &[u8], at: usize) -> Option<&[u8; N]> {
    s.get(at..)?.first_chunk::<N>()
}

fn field_mut<const N: usize>(s: &mut [u8], at: usize) -> Option<&mut [u8; N]> {
    s.get_mut(at..)?.first_chunk_mut::<N>()
}

/// Writes the Ethernet header of a reply and zero-pads a frame of `len`
/// bytes to [`ETH_ZLEN`]; returns the frame length, or `None` if `out`
/// is too small.
fn finish_frame(
    iface: &Iface,
    dst: &[u8; 6],
    ethertype: [u8; 2],
    out: &mut [u8],
    len: usize,
) -> Option<usize> {
    let total = len.max(ETH_ZLEN);
    let out = out.get_mut(..total)?;
    if len < ETH_ZLEN {
        out.get_mut(len..)?.fill(0);
    }
    let eth = out.first_chunk_mut::<ETH_HLEN>()?;
    eth[..6].copy_from_slice(dst);
    eth[6..12].copy_from_slice(&iface.mac);
    eth[12..].copy_from_slice(&ethertype);
    Some(total)
}

/// ARP request for our address: reply (RFC 826), to the sender's address.
/// ARP reply to our address: its sender's addresses, for `probe.ping`.
fn arp<'a>(iface: &Iface, payload: &[u8], out: &mut [u8]) -> Option<Answer<'a>> {
    let req = payload.first_chunk::<ARP_LEN>()?;
    let fixed: &[u8; 6] = field(req, 0)?;
    let op: &[u8; 2] = field(req, 6)?;
    let sha: &[u8; 6] = field(req, 8)?;
    let spa: &[u8; 4] = field(req, 14)?;
    let tpa: &[u8; 4] = field(req, 24)?;
    if *fixed != ARP_ETH_IPV4 || *tpa != iface.ip || sha[0] & 1 != 0 {
        return None;
    }
    if *op == ARP_REPLY {
        if *sha == [0; 6] || bad_source(spa) {
            return None;
        }
        return Some(Answer::ArpReply {
            ip: *spa,
            mac: *sha,
        });
    }
    if *op != ARP_REQUEST {
        return None;
    }
    let reply = field_mut::<ARP_LEN>(out, ETH_HLEN)?;
    reply[..6].copy_from_slice(&ARP_ETH_IPV4);
    reply[6..8].copy_from_slice(&ARP_REPLY);
    reply[8..14].copy_from_slice(&iface.mac);
    reply[14..18].copy_from_slice(&iface.ip);
    reply[18..24].copy_from_slice(sha);
    reply[24..28].copy_from_slice(spa);
    finish_frame(iface, sha, ETHERTYPE_ARP, out, ETH_HLEN + ARP_LEN).map(Answer::Arp)
}

/// True for source addresses no reply may go to: 0.0.0.0/8, loopback,
/// multicast and the reserved/broadcast range.
fn bad_source(ip: &[u8; 4]) -> bool {
    matches!(ip[0], 0 | 127 | 224..=255)
}

/// IPv4 datagram to us: only unfragmented ICMP echo requests are answered;
/// unfragmented ICMP echo replies are handed back parsed.
fn ipv4<'a>(
    iface: &Iface,
    eth_src: &[u8; 6],
    payload: &'a [u8],
    out: &mut [u8],
    ip_id: u16,
) -> Option<Answer<'a>> {
    let header = payload.first_chunk::<IPV4_HLEN>()?;
    let version_ihl = header[0];
    let tos = header[1];
    let total_len = usize::from(u16::from_be_bytes(*field(header, 2)?));
    let fragment = u16::from_be_bytes(*field(header, 6)?);
    let protocol = header[9];
    let src: &[u8; 4] = field(header, 12)?;
    let dst: &[u8; 4] = field(header, 16)?;
    let ihl = usize::from(version_ihl & 0x0f) * 4;
    if version_ihl >> 4 != 4
        || ihl < IPV4_HLEN
        || total_len < ihl + ICMP_HLEN
        || total_len > payload.len()
        || fragment & IPV4_FRAGMENT_MASK != 0
        || protocol != IPPROTO_ICMP
        || *dst != iface.ip
        || bad_source(src)
    {
        return None;
    }
    // Frames may carry padding after the datagram: use total_len.
    let full_header = payload.get(..ihl)?;
    let icmp = payload.get(ihl..total_len)?;
    if checksum(full_header) != 0xffff {
        return None;
    }
    let icmp_header = icmp.first_chunk::<ICMP_HLEN>()?;
    let is_reply = icmp_header[0] == ICMP_ECHO_REPLY;
    if !(is_reply || icmp_header[0] == ICMP_ECHO_REQUEST) || checksum(icmp) != 0xffff {
        return None;
    }
    if is_reply {
        return Some(Answer::EchoReply {
            from: *src,
            id: u16::from_be_bytes(*field(icmp_header, 4)?),
            seq: u16::from_be_bytes(*field(icmp_header, 6)?),
            data: icmp.get(ICMP_HLEN..)?,
        });
    }
    let old_checksum = u16::from_be_bytes(*field(icmp_header, 2)?);
    let reply_len = IPV4_HLEN + icmp.len();
    let reply = out.get_mut(ETH_HLEN..)?.get_mut(..reply_len)?;
    let (ip, reply_icmp) = reply.split_at_mut(IPV4_HLEN);
    // `reply_len` fits in 16 bits: it is at most `total_len`.
    ip.copy_from_slice(&ipv4_header(tos, reply_len as u16, ip_id, &iface.ip, src));
    crate::mem::copy(reply_icmp, icmp);
    // Only the type changes (8 -> 0): RFC 1624 eqn. 3,
    // HC' = ~(~HC + ~m + m'), and ~m + m' = ~0x0800 for any code byte.
    let new_checksum = !ones_add(!old_checksum, !0x0800);
    *field_mut::<4>(reply_icmp, 0)? = {
        let [hi, lo] = new_checksum.to_be_bytes();
        [ICMP_ECHO_REPLY, icmp_header[1], hi, lo]
    };
    finish_frame(iface, eth_src, ETHERTYPE_IPV4, out, ETH_HLEN + reply_len).map(Answer::Echo)
}

/// A 20-byte IPv4 header (no options, not fragmented, TTL 64) of an ICMP
/// datagram of `len` bytes, with its checksum.
fn ipv4_header(tos: u8, len: u16, ip_id: u16, src: &[u8; 4], dst: &[u8; 4]) -> [u8; IPV4_HLEN] {
    let [len_hi, len_lo] = len.to_be_bytes();
    let [id_hi, id_lo] = ip_id.to_be_bytes();
    let mut h: [u8; IPV4_HLEN] = [
        0x45,
        tos,
        len_hi,
        len_lo,
        id_hi,
        id_lo,
        0,
        0,
        REPLY_TTL,
        IPPROTO_ICMP,
        0,
        0,
        src[0],
        src[1],
        src[2],
        src[3],
        dst[0],
        dst[1],
        dst[2],
        dst[3],
    ];
    let [c_hi, c_lo] = (!checksum(&h)).to_be_bytes();
    h[10] = c_hi;
    h[11] = c_lo;
    h
}

/// Writes into `out` a broadcast ARP request (RFC 826) from us for
/// `target`; returns the frame length, or `None` if `out` is too small.
pub fn arp_request(iface: &Iface, target: &[u8; 4], out: &mut [u8]) -> Option<usize> {
    let req = field_mut::<ARP_LEN>(out, ETH_HLEN)?;
    req[..6].copy_from_slice(&ARP_ETH_IPV4);
    req[6..8].copy_from_slice(&ARP_REQUEST);
    req[8..14].copy_from_slice(&iface.mac);
    req[14..18].copy_from_slice(&iface.ip);
    req[18..24].fill(0);
    req[24..28].copy_from_slice(target);
    finish_frame(iface, &BROADCAST, ETHERTYPE_ARP, out, ETH_HLEN + ARP_LEN)
}

/// Where an ICMP echo request is sent and what it carries.
#[derive(Clone, Copy, Debug)]
pub struct EchoRequest<'a> {
    pub dst_mac: [u8; 6],
    pub dst_ip: [u8; 4],
    /// IPv4 identification.
    pub ip_id: u16,
    /// ICMP identifier and sequence number.
    pub id: u16,
    pub seq: u16,
    pub data: &'a [u8],
}

/// Writes into `out` an ICMP echo request from us; returns the frame
/// length, or `None` if `out` is too small.
pub fn echo_request(iface: &Iface, request: &EchoRequest<'_>, out: &mut [u8]) -> Option<usize> {
    let icmp_len = ICMP_HLEN + request.data.len();
    let total = IPV4_HLEN + icmp_len;
    let len = u16::try_from(total).ok()?;
    let packet = out.get_mut(ETH_HLEN..)?.get_mut(..total)?;
    let (ip, icmp) = packet.split_at_mut(IPV4_HLEN);
    ip.copy_from_slice(&ipv4_header(
        0,
        len,
        request.ip_id,
        &iface.ip,
        &request.dst_ip,
    ));
    let (header, data) = icmp.split_first_chunk_mut::<ICMP_HLEN>()?;
    let [id_hi, id_lo] = request.id.to_be_bytes();
    let [seq_hi, seq_lo] = request.seq.to_be_bytes();
    *header = [ICMP_ECHO_REQUEST, 0, 0, 0, id_hi, id_lo, seq_hi, seq_lo];
    crate::mem::copy(data, request.data);
    let [c_hi, c_lo] = (!checksum(icmp)).to_be_bytes();
    *field_mut::<2>(icmp, 2)? = [c_hi, c_lo];
    finish_frame(
        iface,
        &request.dst_mac,
        ETHERTYPE_IPV4,
        out,
        ETH_HLEN + total,
    )
}

/// Ones'-complement addition of two 16-bit values.
fn ones_add(a: u16, b: u16) -> u16 {
    let sum = u32::from(a) + u32::from(b);
    ((sum & 0xffff) + (sum >> 16)) as u16
}

/// Internet checksum sum (RFC 1071) of `data` as big-endian 16-bit words
/// (an odd last byte is padded with zero), folded to 16 bits. A header or
/// message with a correct checksum field sums to `0xffff`.
///
/// Sums 8 bytes per step with an end-around carry; the sum is byte-order
/// independent, so little-endian loads are summed and the result swapped.
pub fn checksum(data: &[u8]) -> u16 {
    let (words, tail) = data.as_chunks::<8>();
    let mut acc: u64 = 0;
    for word in words {
        let (sum, carry) = acc.overflowing_add(u64::from_le_bytes(*word));
        acc = sum + u64::from(carry);
    }
    // The last 0 to 7 bytes as one zero-padded little-endian word.
    let mut last: u64 = 0;
    let mut shift = 0;
    let mut rest = tail;
    if let Some((word, r)) = rest.split_first_chunk::<4>() {
        last = u64::from(u32::from_le_bytes(*word));
        shift = 32;
        rest = r;
    }
    if let Some((word, r)) = rest.split_first_chunk::<2>() {
        last |= u64::from(u16::from_le_bytes(*word)) << shift;
        shift += 16;
        rest = r;
    }
    if let Some(&byte) = rest.first() {
        last |= u64::from(byte) << shift;
    }
    let (sum, carry) = acc.overflowing_add(last);
    acc = sum + u64::from(carry);
    // 2^16 = 1 modulo 0xffff, so folding keeps the value: 64 -> 33 ->
    // 18 -> 17 -> 16 bits.
    acc = (acc & 0xffff_ffff) + (acc >> 32);
    acc = (acc & 0xffff) + (acc >> 16);
    acc = (acc & 0xffff) + (acc >> 16);
    acc = (acc & 0xffff) + (acc >> 16);
    (acc as u16).swap_bytes()
}

/// Parses `a.b.c.d/prefix` (decimal, each part 0..=255, prefix 0..=32)
/// into the address and prefix length. The address may not be
/// 0.0.0.0/8, loopback, multicast or reserved.
pub fn parse_cidr(value: &[u8]) -> Option<([u8; 4], u8)> {
    let slash = value.iter().position(|&c| c == b'/')?;
    let (addr, prefix) = (value.get(..slash)?, value.get(slash + 1..)?);
    let prefix = parse_decimal(prefix, 32)?;
    Some((parse_ipv4(addr)?, prefix))
}

/// Parses `a.b.c.d` (decimal, each part 0..=255). The address may not be
/// 0.0.0.0/8, loopback, multicast or reserved.
pub fn parse_ipv4(addr: &[u8]) -> Option<[u8; 4]> {
    let mut ip = [0u8; 4];
    let mut parts = addr.split(|&c| c == b'.');
    for byte in &mut ip {
        *byte = parse_decimal(parts.next()?, 255)?;
    }
    if parts.next().is_some() || bad_source(&ip) {
        return None;
    }
    Some(ip)
}

/// 1 to 3 decimal digits with a value of at most `max`.
fn parse_decimal(s: &[u8], max: u8) -> Option<u8> {
    if s.is_empty() || s.len() > 3 {
        return None;
    }
    let mut value: u32 = 0;
    for &c in s {
        if !c.is_ascii_digit() {
            return None;
        }
        value = value * 10 + u32::from(c - b'0');
    }
    u8::try_from(value).ok().filter(|&v| v <= max)
}
