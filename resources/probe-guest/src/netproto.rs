//! Just enough Ethernet, ARP, IPv4, ICMP and TCP to answer ARP requests
//! and pings for one IPv4 address, to ping another one, and to carry the
//! MMDS client's TCP segments (used by `virtio_net.rs`, `ping.rs` and
//! `tcp.rs`).
//!
//! [`answer`] looks at one received Ethernet frame (without FCS) and, if
//! it is an ARP request or an ICMP echo request for our address, writes
//! the reply frame; an ARP reply or an ICMP echo reply to us is handed
//! back parsed (for `probe.ping`), and so is a TCP segment to us with
//! valid IPv4 and TCP checksums (for `probe.mmds`). [`arp_request`],
//! [`echo_request`] and [`tcp_segment`] build the frames `probe.ping` and
//! `probe.mmds` send. Everything is read from byte
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

/// IPv4 header length without options.
pub const IPV4_HLEN: usize = 20;
const IPPROTO_ICMP: u8 = 1;
const IPPROTO_TCP: u8 = 6;
/// `More fragments` flag and fragment offset bits of the IPv4 header.
const IPV4_FRAGMENT_MASK: u16 = 0x3fff;
/// `Don't fragment` flag of the IPv4 header (set on TCP segments).
const IPV4_DF: u16 = 0x4000;
const REPLY_TTL: u8 = 64;

/// TCP header length without options.
pub const TCP_HLEN: usize = 20;
/// TCP option kinds: end of list, no-operation, maximum segment size.
const TCPOPT_EOL: u8 = 0;
const TCPOPT_NOP: u8 = 1;
const TCPOPT_MSS: u8 = 2;
const TCPOLEN_MSS: u8 = 4;

/// TCP header flags (the low byte of the flags field).
pub mod tcp_flags {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const PSH: u8 = 0x08;
    pub const ACK: u8 = 0x10;
}

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
    /// An unfragmented TCP segment to our address and MAC, with valid
    /// IPv4 and TCP checksums: nothing was written.
    Tcp(TcpIn<'a>),
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
    finish_frame_padded_to(iface, dst, ethertype, out, len, ETH_ZLEN)
}

/// [`finish_frame`] with padding to `min_len` bytes (`len` or less: no
/// padding).
fn finish_frame_padded_to(
    iface: &Iface,
    dst: &[u8; 6],
    ethertype: [u8; 2],
    out: &mut [u8],
    len: usize,
    min_len: usize,
) -> Option<usize> {
    let total = len.max(min_len);
    let out = out.get_mut(..total)?;
    if len < total {
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
/// unfragmented ICMP echo replies and TCP segments are handed back parsed.
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
    let min_len = match protocol {
        IPPROTO_ICMP => ICMP_HLEN,
        IPPROTO_TCP => TCP_HLEN,
        _ => return None,
    };
    if version_ihl >> 4 != 4
        || ihl < IPV4_HLEN
        || total_len < ihl + min_len
        || total_len > payload.len()
        || fragment & IPV4_FRAGMENT_MASK != 0
        || *dst != iface.ip
        || bad_source(src)
    {
        return None;
    }
    // Frames may carry padding after the datagram: use total_len.
    let full_header = payload.get(..ihl)?;
    let data = payload.get(ihl..total_len)?;
    if checksum(full_header) != 0xffff {
        return None;
    }
    if protocol == IPPROTO_TCP {
        return tcp(src, dst, data).map(Answer::Tcp);
    }
    icmp(iface, eth_src, tos, src, data, out, ip_id)
}

/// ICMP message `icmp` from `src` to us: an echo request is answered, an
/// echo reply is handed back parsed.
fn icmp<'a>(
    iface: &Iface,
    eth_src: &[u8; 6],
    tos: u8,
    src: &[u8; 4],
    icmp: &'a [u8],
    out: &mut [u8],
    ip_id: u16,
) -> Option<Answer<'a>> {
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
    // `reply_len` fits in 16 bits: it is at most the request's total length.
    let len = reply_len as u16;
    ip.copy_from_slice(&ipv4_header(tos, len, ip_id, IPPROTO_ICMP, &iface.ip, src));
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

/// A 20-byte IPv4 header (no options, not fragmented, TTL 64) of a
/// `protocol` datagram of `len` bytes, with its checksum. TCP segments
/// carry `Don't fragment`, ICMP messages do not.
fn ipv4_header(
    tos: u8,
    len: u16,
    ip_id: u16,
    protocol: u8,
    src: &[u8; 4],
    dst: &[u8; 4],
) -> [u8; IPV4_HLEN] {
    let [len_hi, len_lo] = len.to_be_bytes();
    let [id_hi, id_lo] = ip_id.to_be_bytes();
    let flags = if protocol == IPPROTO_TCP { IPV4_DF } else { 0 };
    let [flags_hi, flags_lo] = flags.to_be_bytes();
    let mut h: [u8; IPV4_HLEN] = [
        0x45, tos, len_hi, len_lo, id_hi, id_lo, flags_hi, flags_lo, REPLY_TTL, protocol, 0, 0,
        src[0], src[1], src[2], src[3], dst[0], dst[1], dst[2], dst[3],
    ];
    let [c_hi, c_lo] = (!checksum(&h)).to_be_bytes();
    h[10] = c_hi;
    h[11] = c_lo;
    h
}

/// Writes into `out` a broadcast ARP request (RFC 826) from us for
/// `target`; returns the frame length, or `None` if `out` is too small.
pub fn arp_request(iface: &Iface, target: &[u8; 4], out: &mut [u8]) -> Option<usize> {
    arp_request_padded_to(iface, target, out, ETH_ZLEN)
}

/// [`arp_request`] without padding: a 42-byte frame. Firecracker's MMDS
/// only takes an ARP request whose Ethernet payload is exactly 28 bytes
/// (as a guest's virtio-net driver sends it: padding is for the wire).
pub fn arp_request_unpadded(iface: &Iface, target: &[u8; 4], out: &mut [u8]) -> Option<usize> {
    arp_request_padded_to(iface, target, out, 0)
}

fn arp_request_padded_to(
    iface: &Iface,
    target: &[u8; 4],
    out: &mut [u8],
    min_len: usize,
) -> Option<usize> {
    let req = field_mut::<ARP_LEN>(out, ETH_HLEN)?;
    req[..6].copy_from_slice(&ARP_ETH_IPV4);
    req[6..8].copy_from_slice(&ARP_REQUEST);
    req[8..14].copy_from_slice(&iface.mac);
    req[14..18].copy_from_slice(&iface.ip);
    req[18..24].fill(0);
    req[24..28].copy_from_slice(target);
    let len = ETH_HLEN + ARP_LEN;
    finish_frame_padded_to(iface, &BROADCAST, ETHERTYPE_ARP, out, len, min_len)
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
        IPPROTO_ICMP,
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

/// A TCP segment to us, as [`answer`] hands it back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpIn<'a> {
    pub src_ip: [u8; 4],
    pub src_port: u16,
    pub dst_port: u16,
    pub seq: u32,
    pub ack: u32,
    /// The low byte of the flags field ([`tcp_flags`]).
    pub flags: u8,
    pub window: u16,
    /// The maximum segment size option, if the segment has a well-formed
    /// one.
    pub mss: Option<u16>,
    pub payload: &'a [u8],
}

/// The sum of the TCP pseudo-header (RFC 793) for a segment of `len`
/// bytes from `src` to `dst`, folded like [`checksum`].
fn tcp_pseudo_sum(src: &[u8; 4], dst: &[u8; 4], len: u16) -> u16 {
    let [len_hi, len_lo] = len.to_be_bytes();
    checksum(&[
        src[0],
        src[1],
        src[2],
        src[3],
        dst[0],
        dst[1],
        dst[2],
        dst[3],
        0,
        IPPROTO_TCP,
        len_hi,
        len_lo,
    ])
}

/// TCP segment `segment` from `src` to `dst` (us): parsed if its header
/// is well-formed and its checksum (over the pseudo-header) is right.
fn tcp<'a>(src: &[u8; 4], dst: &[u8; 4], segment: &'a [u8]) -> Option<TcpIn<'a>> {
    let header = segment.first_chunk::<TCP_HLEN>()?;
    let data_offset = usize::from(header[12] >> 4) * 4;
    if data_offset < TCP_HLEN || data_offset > segment.len() {
        return None;
    }
    let len = u16::try_from(segment.len()).ok()?;
    if ones_add(tcp_pseudo_sum(src, dst, len), checksum(segment)) != 0xffff {
        return None;
    }
    let options = segment.get(TCP_HLEN..data_offset)?;
    Some(TcpIn {
        src_ip: *src,
        src_port: u16::from_be_bytes(*field(header, 0)?),
        dst_port: u16::from_be_bytes(*field(header, 2)?),
        seq: u32::from_be_bytes(*field(header, 4)?),
        ack: u32::from_be_bytes(*field(header, 8)?),
        flags: header[13],
        window: u16::from_be_bytes(*field(header, 14)?),
        mss: mss_option(options),
        payload: segment.get(data_offset..)?,
    })
}

/// The value of the first MSS option in `options`, if it is well-formed
/// (kind 2, length 4); `None` without one or at a malformed option.
fn mss_option(mut options: &[u8]) -> Option<u16> {
    loop {
        match *options.first()? {
            TCPOPT_EOL => return None,
            TCPOPT_NOP => options = options.get(1..)?,
            kind => {
                let len = usize::from(*options.get(1)?);
                if kind == TCPOPT_MSS {
                    let value: &[u8; 2] = field(options, 2)?;
                    return (len == usize::from(TCPOLEN_MSS)).then(|| u16::from_be_bytes(*value));
                }
                if len < 2 {
                    return None;
                }
                options = options.get(len..)?;
            }
        }
    }
}

/// A TCP segment to send.
#[derive(Clone, Copy, Debug)]
pub struct TcpOut<'a> {
    pub dst_mac: [u8; 6],
    pub dst_ip: [u8; 4],
    /// IPv4 identification.
    pub ip_id: u16,
    pub src_port: u16,
    pub dst_port: u16,
    pub seq: u32,
    pub ack: u32,
    /// [`tcp_flags`].
    pub flags: u8,
    pub window: u16,
    /// A maximum segment size option to add (on a SYN).
    pub mss: Option<u16>,
    pub payload: &'a [u8],
}

/// Bytes of IPv4 and TCP headers in front of a segment's payload (without
/// options): the maximum segment size is the MTU less this.
pub const TCP_IPV4_OVERHEAD: usize = IPV4_HLEN + TCP_HLEN;

/// Writes into `out` a TCP segment from us (20-byte IPv4 header with `Don't
/// fragment`, TTL 64; the TCP header with at most the MSS option; both
/// checksums); returns the frame length, or `None` if `out` is too small.
/// The frame is not padded (a pure ACK is 54 bytes): Firecracker's MMDS
/// drops an IPv4 packet whose total length is not the whole Ethernet
/// payload.
pub fn tcp_segment(iface: &Iface, seg: &TcpOut<'_>, out: &mut [u8]) -> Option<usize> {
    let options_len = if seg.mss.is_some() {
        usize::from(TCPOLEN_MSS)
    } else {
        0
    };
    let header_len = TCP_HLEN + options_len;
    let tcp_len = header_len + seg.payload.len();
    let total = IPV4_HLEN + tcp_len;
    let total16 = u16::try_from(total).ok()?;
    let packet = out.get_mut(ETH_HLEN..)?.get_mut(..total)?;
    let (ip, tcp) = packet.split_at_mut(IPV4_HLEN);
    ip.copy_from_slice(&ipv4_header(
        0,
        total16,
        seg.ip_id,
        IPPROTO_TCP,
        &iface.ip,
        &seg.dst_ip,
    ));
    let (header, rest) = tcp.split_first_chunk_mut::<TCP_HLEN>()?;
    let [sp_hi, sp_lo] = seg.src_port.to_be_bytes();
    let [dp_hi, dp_lo] = seg.dst_port.to_be_bytes();
    let [s0, s1, s2, s3] = seg.seq.to_be_bytes();
    let [a0, a1, a2, a3] = seg.ack.to_be_bytes();
    let [w_hi, w_lo] = seg.window.to_be_bytes();
    // The data offset counts 32-bit words: 5, or 6 with the MSS option.
    let offset = (header_len / 4) as u8;
    *header = [
        sp_hi,
        sp_lo,
        dp_hi,
        dp_lo,
        s0,
        s1,
        s2,
        s3,
        a0,
        a1,
        a2,
        a3,
        offset << 4,
        seg.flags,
        w_hi,
        w_lo,
        0,
        0,
        0,
        0,
    ];
    let (options, payload) = rest.split_at_mut(options_len);
    if let Some(mss) = seg.mss {
        let [m_hi, m_lo] = mss.to_be_bytes();
        options.copy_from_slice(&[TCPOPT_MSS, TCPOLEN_MSS, m_hi, m_lo]);
    }
    crate::mem::copy(payload, seg.payload);
    // `tcp_len` fits in 16 bits: it is less than `total`.
    let sum = ones_add(
        tcp_pseudo_sum(&iface.ip, &seg.dst_ip, tcp_len as u16),
        checksum(tcp),
    );
    let [c_hi, c_lo] = (!sum).to_be_bytes();
    *field_mut::<2>(tcp, 16)? = [c_hi, c_lo];
    finish_frame_padded_to(
        iface,
        &seg.dst_mac,
        ETHERTYPE_IPV4,
        out,
        ETH_HLEN + total,
        0,
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
