//! The virtio-vsock packet header (virtio 1.2, 5.10.6) as plain values:
//! what the muxer reads from a guest's TX packet and writes into an RX
//! packet. The guest memory side is virtio-vsock's `VsockPacket`.

use virtio_vsock::packet::VsockPacket;
use vm_memory::bitmap::BitmapSlice;

/// The host's CID: where the guest's connections to the host go.
pub const HOST_CID: u64 = 2;
/// The only socket type the device offers.
pub const TYPE_STREAM: u16 = 1;

/// The operations of a packet.
pub mod op {
    pub const REQUEST: u16 = 1;
    pub const RESPONSE: u16 = 2;
    pub const RST: u16 = 3;
    pub const SHUTDOWN: u16 = 4;
    pub const RW: u16 = 5;
    pub const CREDIT_UPDATE: u16 = 6;
    pub const CREDIT_REQUEST: u16 = 7;
}

/// The flags of a SHUTDOWN packet.
pub mod shutdown {
    /// The sender will receive no more data.
    pub const RCV: u32 = 1;
    /// The sender will send no more data.
    pub const SEND: u32 = 2;
    pub const BOTH: u32 = RCV | SEND;
}

/// The header fields of one packet.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl Header {
    /// The header of a packet the guest posted.
    pub fn of<B: BitmapSlice>(packet: &VsockPacket<B>) -> Self {
        Self {
            src_cid: packet.src_cid(),
            dst_cid: packet.dst_cid(),
            src_port: packet.src_port(),
            dst_port: packet.dst_port(),
            len: packet.len(),
            type_: packet.type_(),
            op: packet.op(),
            flags: packet.flags(),
            buf_alloc: packet.buf_alloc(),
            fwd_cnt: packet.fwd_cnt(),
        }
    }

    /// Writes every field into an RX packet for the guest.
    pub fn write_to<B: BitmapSlice>(&self, packet: &mut VsockPacket<B>) {
        packet
            .set_src_cid(self.src_cid)
            .set_dst_cid(self.dst_cid)
            .set_src_port(self.src_port)
            .set_dst_port(self.dst_port)
            .set_len(self.len)
            .set_type(self.type_)
            .set_op(self.op)
            .set_flags(self.flags)
            .set_buf_alloc(self.buf_alloc)
            .set_fwd_cnt(self.fwd_cnt);
    }

    /// The reset a packet that belongs to no connection gets: addressed
    /// back to its sender.
    pub fn reset_for(&self) -> Self {
        Self {
            src_cid: self.dst_cid,
            dst_cid: self.src_cid,
            src_port: self.dst_port,
            dst_port: self.src_port,
            type_: TYPE_STREAM,
            op: op::RST,
            ..Self::default()
        }
    }
}
