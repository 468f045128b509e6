//! The frames MMDS reads and writes: Ethernet, ARP and IPv4 with TCP, each
//! field checked before it is used. Checksums of guest frames are not
//! verified (a guest with checksum offload leaves them partial, and
//! Firecracker does not check them either); every frame built here carries
//! correct ones.

use std::net::Ipv4Addr;

/// The hardware address MMDS answers from (Firecracker's).
pub const MMDS_MAC: [u8; 6] = [0x06, 0x01, 0x23, 0x45, 0x67, 0x01];
/// The port MMDS listens on.
pub const MMDS_PORT: u16 = 80;

const ETH_HDR: usize = 14;
const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_ARP: u16 = 0x0806;
const ARP_LEN: usize = 28;
const IPV4_HDR: usize = 20;
const TCP_HDR: usize = 20;
const PROTO_TCP: u8 = 6;
/// Firecracker's TTL for MMDS's packets: they never leave the link.
const TTL: u8 = 1;

pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const ACK: u8 = 0x10;
pub const ECE: u8 = 0x40;
pub const CWR: u8 = 0x80;

/// Why a frame for MMDS was not used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("a frame of {0} bytes is too short for its headers")]
    Short(usize),
    #[error("not an ARP request for IPv4 over Ethernet")]
    NotArpRequest,
    #[error(
        "IPv4 header: version {version}, IHL {ihl}, total length {total} in {available} bytes"
    )]
    BadIpv4 {
        version: u8,
        ihl: u8,
        total: usize,
        available: usize,
    },
    #[error("IPv4 protocol {0} (MMDS speaks TCP)")]
    NotTcp(u8),
    #[error("TCP data offset {0} words")]
    BadTcpOffset(u8),
}

fn be16(bytes: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([bytes[at], bytes[at + 1]])
}

fn be32(bytes: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

fn ipv4_at(bytes: &[u8], at: usize) -> Ipv4Addr {
    Ipv4Addr::new(bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3])
}

/// Whether a guest frame (from its Ethernet header on; at least its first
/// 42 bytes, or all of it) is for MMDS at `ip`: ARP whose target is `ip`,
/// or IPv4 to `ip`. Such a frame never reaches the host.
pub fn is_for_mmds(frame: &[u8], ip: Ipv4Addr) -> bool {
    if frame.len() < ETH_HDR {
        return false;
    }
    match be16(frame, 12) {
        ETHERTYPE_ARP => frame.len() >= ETH_HDR + ARP_LEN && ipv4_at(frame, ETH_HDR + 24) == ip,
        ETHERTYPE_IPV4 => frame.len() >= ETH_HDR + IPV4_HDR && ipv4_at(frame, ETH_HDR + 16) == ip,
        _ => false,
    }
}

/// An ARP request's sender.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArpRequest {
    pub sender_mac: [u8; 6],
    pub sender_ip: Ipv4Addr,
}

/// A TCP segment from the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment<'a> {
    pub src_mac: [u8; 6],
    pub src_ip: Ipv4Addr,
    pub src_port: u16,
    pub dst_port: u16,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    pub window: u16,
    /// The MSS option, if the segment carries one.
    pub mss: Option<u16>,
    pub payload: &'a [u8],
}

impl Segment<'_> {
    /// The sequence space it takes: its payload, and one for SYN and FIN.
    pub fn seq_len(&self) -> u32 {
        self.payload.len() as u32
            + u32::from(self.flags & SYN != 0)
            + u32::from(self.flags & FIN != 0)
    }
}

/// A frame for MMDS, read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming<'a> {
    Arp(ArpRequest),
    Tcp(Segment<'a>),
}

fn mac_at(bytes: &[u8], at: usize) -> [u8; 6] {
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&bytes[at..at + 6]);
    mac
}

/// Reads a frame [`is_for_mmds`] picked.
pub fn parse(frame: &[u8]) -> Result<Incoming<'_>, WireError> {
    if frame.len() < ETH_HDR {
        return Err(WireError::Short(frame.len()));
    }
    let src_mac = mac_at(frame, 6);
    let payload = &frame[ETH_HDR..];
    if be16(frame, 12) == ETHERTYPE_ARP {
        return parse_arp(payload).map(Incoming::Arp);
    }
    if payload.len() < IPV4_HDR {
        return Err(WireError::Short(frame.len()));
    }
    let version = payload[0] >> 4;
    let ihl = payload[0] & 0xf;
    let header = usize::from(ihl) * 4;
    let total = usize::from(be16(payload, 2));
    // A frame may be padded past the packet, never cut short of it.
    if version != 4 || ihl < 5 || total < header || total > payload.len() {
        return Err(WireError::BadIpv4 {
            version,
            ihl,
            total,
            available: payload.len(),
        });
    }
    if payload[9] != PROTO_TCP {
        return Err(WireError::NotTcp(payload[9]));
    }
    let src_ip = ipv4_at(payload, 12);
    parse_tcp(&payload[header..total], src_mac, src_ip).map(Incoming::Tcp)
}

fn parse_arp(arp: &[u8]) -> Result<ArpRequest, WireError> {
    if arp.len() < ARP_LEN {
        return Err(WireError::Short(arp.len() + ETH_HDR));
    }
    let request = be16(arp, 0) == 1
        && be16(arp, 2) == ETHERTYPE_IPV4
        && arp[4] == 6
        && arp[5] == 4
        && be16(arp, 6) == 1;
    if !request {
        return Err(WireError::NotArpRequest);
    }
    Ok(ArpRequest {
        sender_mac: mac_at(arp, 8),
        sender_ip: ipv4_at(arp, 14),
    })
}

fn parse_tcp(tcp: &[u8], src_mac: [u8; 6], src_ip: Ipv4Addr) -> Result<Segment<'_>, WireError> {
    if tcp.len() < TCP_HDR {
        return Err(WireError::Short(tcp.len()));
    }
    let offset = tcp[12] >> 4;
    let header = usize::from(offset) * 4;
    if offset < 5 || header > tcp.len() {
        return Err(WireError::BadTcpOffset(offset));
    }
    Ok(Segment {
        src_mac,
        src_ip,
        src_port: be16(tcp, 0),
        dst_port: be16(tcp, 2),
        seq: be32(tcp, 4),
        ack: be32(tcp, 8),
        flags: tcp[13],
        window: be16(tcp, 14),
        mss: mss_option(&tcp[TCP_HDR..header]),
        payload: &tcp[header..],
    })
}

/// The MSS option among TCP options, if well-formed.
fn mss_option(mut options: &[u8]) -> Option<u16> {
    while let Some(&kind) = options.first() {
        match kind {
            0 => return None,
            1 => options = &options[1..],
            _ => {
                let len = usize::from(*options.get(1)?);
                if len < 2 || len > options.len() {
                    return None;
                }
                if kind == 2 && len == 4 {
                    return Some(be16(options, 2));
                }
                options = &options[len..];
            }
        }
    }
    None
}

fn ethernet(out: &mut Vec<u8>, dst: [u8; 6], ethertype: u16) {
    out.extend(dst);
    out.extend(MMDS_MAC);
    out.extend(ethertype.to_be_bytes());
}

/// MMDS's answer to an ARP request for `ip`.
pub fn arp_reply(request: &ArpRequest, ip: Ipv4Addr, out: &mut Vec<u8>) {
    out.clear();
    ethernet(out, request.sender_mac, ETHERTYPE_ARP);
    out.extend([0, 1, 8, 0, 6, 4, 0, 2]);
    out.extend(MMDS_MAC);
    out.extend(ip.octets());
    out.extend(request.sender_mac);
    out.extend(request.sender_ip.octets());
}

/// The ones' complement sum of `bytes`, folded later.
fn sum(bytes: &[u8]) -> u32 {
    bytes
        .chunks(2)
        .map(|pair| u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)])))
        .sum()
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A TCP segment from MMDS to the guest.
#[derive(Debug, Clone, Copy)]
pub struct Outgoing<'a> {
    pub dst_mac: [u8; 6],
    pub src_ip: Ipv4Addr,
    pub dst_ip: Ipv4Addr,
    pub dst_port: u16,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    pub window: u16,
    pub mss: Option<u16>,
    pub payload: &'a [u8],
}

/// Builds `segment` into `out` (Ethernet, IPv4, TCP), checksums included.
pub fn tcp_frame(segment: &Outgoing<'_>, out: &mut Vec<u8>) {
    out.clear();
    ethernet(out, segment.dst_mac, ETHERTYPE_IPV4);
    let options = if segment.mss.is_some() { 4 } else { 0 };
    let tcp_len = TCP_HDR + options + segment.payload.len();
    let total = (IPV4_HDR + tcp_len) as u16;
    let ip_start = out.len();
    out.extend([0x45, 0]);
    out.extend(total.to_be_bytes());
    out.extend([0, 0, 0, 0, TTL, PROTO_TCP, 0, 0]);
    out.extend(segment.src_ip.octets());
    out.extend(segment.dst_ip.octets());
    let ip_sum = fold(sum(&out[ip_start..]));
    out[ip_start + 10..ip_start + 12].copy_from_slice(&ip_sum.to_be_bytes());
    let tcp_start = out.len();
    out.extend(MMDS_PORT.to_be_bytes());
    out.extend(segment.dst_port.to_be_bytes());
    out.extend(segment.seq.to_be_bytes());
    out.extend(segment.ack.to_be_bytes());
    out.push((((TCP_HDR + options) / 4) as u8) << 4);
    out.push(segment.flags);
    out.extend(segment.window.to_be_bytes());
    out.extend([0, 0, 0, 0]);
    if let Some(mss) = segment.mss {
        out.extend([2, 4]);
        out.extend(mss.to_be_bytes());
    }
    out.extend(segment.payload);
    let mut pseudo = [0u8; 12];
    pseudo[..4].copy_from_slice(&segment.src_ip.octets());
    pseudo[4..8].copy_from_slice(&segment.dst_ip.octets());
    pseudo[9] = PROTO_TCP;
    pseudo[10..].copy_from_slice(&(tcp_len as u16).to_be_bytes());
    let tcp_sum = fold(sum(&pseudo) + sum(&out[tcp_start..]));
    out[tcp_start + 16..tcp_start + 18].copy_from_slice(&tcp_sum.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
    const MMDS_IP: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
    const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);

    fn arp_request(target: Ipv4Addr) -> Vec<u8> {
        let mut f = vec![0xff; 6];
        f.extend(GUEST_MAC);
        f.extend([8, 6, 0, 1, 8, 0, 6, 4, 0, 1]);
        f.extend(GUEST_MAC);
        f.extend(GUEST_IP.octets());
        f.extend([0; 6]);
        f.extend(target.octets());
        f
    }

    #[test]
    fn an_arp_request_for_the_address_is_answered_from_mmds_mac() {
        let request = arp_request(MMDS_IP);
        assert!(is_for_mmds(&request, MMDS_IP));
        assert!(!is_for_mmds(&arp_request(GUEST_IP), MMDS_IP));
        let Ok(Incoming::Arp(parsed)) = parse(&request) else {
            panic!("not an ARP request");
        };
        let mut reply = Vec::new();
        arp_reply(&parsed, MMDS_IP, &mut reply);
        assert_eq!(reply.len(), 42);
        assert_eq!(&reply[0..6], &GUEST_MAC);
        assert_eq!(&reply[22..28], &MMDS_MAC);
        assert_eq!(&reply[28..32], &MMDS_IP.octets());
        assert_eq!(&reply[38..42], &GUEST_IP.octets());
        let mut reply_op = request.clone();
        reply_op[21] = 2;
        assert_eq!(parse(&reply_op), Err(WireError::NotArpRequest));
    }

    #[test]
    fn a_built_segment_parses_back_with_valid_checksums() {
        let payload = b"HTTP/1.1 200 \r\n\r\nodd";
        let mut frame = Vec::new();
        tcp_frame(
            &Outgoing {
                dst_mac: GUEST_MAC,
                src_ip: MMDS_IP,
                dst_ip: GUEST_IP,
                dst_port: 40000,
                seq: 7,
                ack: 9,
                flags: SYN | ACK,
                window: 2500,
                mss: Some(1460),
                payload,
            },
            &mut frame,
        );
        // Both checksums verify to zero.
        assert_eq!(fold(sum(&frame[14..34])), 0);
        let tcp = &frame[34..];
        let mut pseudo = Vec::from(MMDS_IP.octets());
        pseudo.extend(GUEST_IP.octets());
        pseudo.extend([0, 6]);
        pseudo.extend((tcp.len() as u16).to_be_bytes());
        assert_eq!(fold(sum(&pseudo) + sum(tcp)), 0);
        // A segment from the guest looks the same from the other side.
        let mut from_guest = frame.clone();
        from_guest[26..30].copy_from_slice(&GUEST_IP.octets());
        from_guest[30..34].copy_from_slice(&MMDS_IP.octets());
        assert!(is_for_mmds(&from_guest, MMDS_IP));
        let Ok(Incoming::Tcp(seg)) = parse(&from_guest) else {
            panic!("not TCP");
        };
        assert_eq!(
            (seg.src_port, seg.dst_port, seg.seq, seg.ack),
            (80, 40000, 7, 9)
        );
        assert_eq!(
            (seg.flags, seg.mss, seg.payload),
            (SYN | ACK, Some(1460), &payload[..])
        );
        assert_eq!(seg.seq_len(), payload.len() as u32 + 1);
    }

    #[test]
    fn malformed_headers_are_named() {
        let mut frame = vec![0; 14];
        frame[12] = 8;
        frame.extend([0x45, 0, 0, 200, 0, 0, 0, 0, 1, 6, 0, 0]);
        frame.extend(GUEST_IP.octets());
        frame.extend(MMDS_IP.octets());
        assert!(matches!(
            parse(&frame),
            Err(WireError::BadIpv4 { total: 200, .. })
        ));
        frame[17] = 40;
        frame.extend([0; 20]);
        frame[23] = 17;
        assert_eq!(parse(&frame), Err(WireError::NotTcp(17)));
        frame[23] = 6;
        frame[14 + 20 + 12] = 0xf0;
        assert_eq!(parse(&frame), Err(WireError::BadTcpOffset(15)));
        assert_eq!(parse(&frame[..10]), Err(WireError::Short(10)));
        assert_eq!(mss_option(&[1, 1, 2, 4, 5, 0xb4]), Some(1460));
        assert_eq!(mss_option(&[3, 9, 0]), None);
        assert_eq!(mss_option(&[3, 0]), None);
    }
}
