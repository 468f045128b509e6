//! A minimal TCP client connection (RFC 793/9293) for the MMDS client
//! (`mmds.rs`): active open only, one connection at a time, a small
//! request sent and a response received into one contiguous buffer.
//!
//! * The SYN carries only the MSS option (the MTU less 40, at most 1460):
//!   no window scaling, SACK or timestamps. The window advertised is the
//!   free space of the receive buffer (at most 65535).
//! * After the SYN-ACK a pure ACK goes out, then the request, in segments
//!   of at most the peer's MSS (536 without the option) that fit its
//!   window; the last one has PSH.
//! * Only in-order data is taken (a segment that overlaps what was
//!   received is trimmed); anything else is answered with an ACK of the
//!   next expected sequence number. Every batch of received segments is
//!   acknowledged once (by [`Conn::next_segment`], called after the batch).
//! * [`Conn::close`] sends a FIN (once all data is sent); the peer's FIN is
//!   acknowledged. With both FINs acknowledged the connection is in
//!   TIME-WAIT, where it still takes segments (a retransmitted FIN is
//!   acknowledged again, a RST ends it quietly).
//! * [`Conn::abort`] sends a RST (RST|ACK, `seq` = next to send). A
//!   closed connection still [owns](Conn::owns) its segments: they are
//!   ignored.
//! * A RST is accepted in SYN-SENT if it acknowledges the SYN, later if
//!   its sequence number is in the receive window (or is the next one
//!   expected when the window is closed).
//! * Retransmission is the caller's: [`Conn::retransmit`] goes back to the
//!   oldest unacknowledged byte (or SYN, or FIN).
//!
//! The caller owns the request and the receive buffer and passes them in;
//! the connection only keeps lengths and sequence numbers.

use crate::netproto::{self, Iface, TCP_IPV4_OVERHEAD, TcpIn, TcpOut, tcp_flags};

/// The MSS assumed when the peer's SYN-ACK has no MSS option (RFC 9293).
const DEFAULT_PEER_MSS: u16 = 536;
/// Largest MSS advertised (Ethernet's MTU less the headers).
pub const MAX_MSS: u16 = 1460;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// No connection (never opened, reset, aborted or timed out).
    Closed,
    /// SYN sent (or due), waiting for the SYN-ACK.
    SynSent,
    /// Both directions open, or one or both closing.
    Established,
    /// Both FINs sent and acknowledged.
    TimeWait,
}

/// `a < b` in sequence space.
fn seq_lt(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}

fn seq_le(a: u32, b: u32) -> bool {
    a == b || seq_lt(a, b)
}

/// What [`Conn::segment_in`] did with a segment.
#[derive(Clone, Copy, Debug, Default)]
pub struct Received {
    /// Bytes added to the receive buffer.
    pub data: usize,
}

/// Segment counters of one connection (for `probe.verbose`).
#[derive(Clone, Copy, Debug, Default)]
pub struct Counters {
    pub segments_in: u32,
    pub segments_out: u32,
    pub retransmits: u32,
    /// A RST was received (and accepted) or sent.
    pub rst_in: bool,
    pub rst_out: bool,
}

/// One TCP connection from `local_port` to `remote_ip:remote_port`.
#[derive(Clone, Copy, Debug)]
pub struct Conn {
    state: State,
    local_port: u16,
    remote_ip: [u8; 4],
    remote_port: u16,
    /// Our MSS (advertised in the SYN).
    mss: u16,
    /// Initial send sequence number (that of the SYN).
    iss: u32,
    /// Oldest unacknowledged and next sequence number to send.
    snd_una: u32,
    snd_nxt: u32,
    /// The peer's window edge: `ack + window` of the latest acceptable ACK.
    snd_wnd_edge: u32,
    peer_mss: u16,
    /// Length of the request (sequence numbers `iss + 1 ..`).
    data_len: u32,
    /// [`Conn::close`] was called: a FIN follows the data.
    fin_wanted: bool,
    fin_acked: bool,
    /// Next sequence number expected from the peer.
    rcv_nxt: u32,
    fin_received: bool,
    /// Bytes in the receive buffer, and its size.
    recv_len: usize,
    recv_cap: usize,
    syn_due: bool,
    /// A pure ACK must go before the first data (the handshake's).
    handshake_ack_due: bool,
    ack_pending: bool,
    rst_due: bool,
    counters: Counters,
}

impl Conn {
    /// No connection.
    pub const fn closed() -> Conn {
        Conn {
            state: State::Closed,
            local_port: 0,
            remote_ip: [0; 4],
            remote_port: 0,
            mss: MAX_MSS,
            iss: 0,
            snd_una: 0,
            snd_nxt: 0,
            snd_wnd_edge: 0,
            peer_mss: DEFAULT_PEER_MSS,
            data_len: 0,
            fin_wanted: false,
            fin_acked: false,
            rcv_nxt: 0,
            fin_received: false,
            recv_len: 0,
            recv_cap: 0,
            syn_due: false,
            handshake_ack_due: false,
            ack_pending: false,
            rst_due: false,
            counters: Counters {
                segments_in: 0,
                segments_out: 0,
                retransmits: 0,
                rst_in: false,
                rst_out: false,
            },
        }
    }

    /// Opens a connection (the SYN is due): `data_len` bytes of request
    /// will be sent, into a receive buffer of `recv_cap` bytes; `mtu` is
    /// the largest IPv4 packet we may send.
    pub fn open(
        local_port: u16,
        remote_ip: [u8; 4],
        remote_port: u16,
        iss: u32,
        data_len: u32,
        recv_cap: usize,
        mtu: u16,
    ) -> Conn {
        let mss = MAX_MSS.min(mtu.saturating_sub(TCP_IPV4_OVERHEAD as u16));
        Conn {
            state: State::SynSent,
            local_port,
            remote_ip,
            remote_port,
            mss,
            iss,
            snd_una: iss,
            snd_nxt: iss,
            snd_wnd_edge: iss,
            data_len,
            recv_cap,
            syn_due: true,
            ..Conn::closed()
        }
    }

    pub fn local_port(&self) -> u16 {
        self.local_port
    }

    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// Bytes received so far.
    pub fn received(&self) -> usize {
        self.recv_len
    }

    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    /// The SYN-ACK arrived (and the connection was not reset since).
    pub fn is_synchronized(&self) -> bool {
        matches!(self.state, State::Established | State::TimeWait)
    }

    /// Both FINs went through (or the connection ended otherwise).
    pub fn is_finished(&self) -> bool {
        matches!(self.state, State::TimeWait | State::Closed)
    }

    /// The peer closed its direction.
    pub fn fin_received(&self) -> bool {
        self.fin_received
    }

    /// The peer acknowledged our FIN.
    pub fn fin_acked(&self) -> bool {
        self.fin_acked
    }

    /// A segment belongs to this connection: from the peer's address and
    /// port to our port. A connection that was opened keeps its segments
    /// after it closed (late ones, after a RST, are taken and ignored).
    pub fn owns(&self, segment: &TcpIn<'_>) -> bool {
        self.local_port != 0
            && segment.src_ip == self.remote_ip
            && segment.src_port == self.remote_port
            && segment.dst_port == self.local_port
    }

    /// True if something sent is not acknowledged yet.
    pub fn unacknowledged(&self) -> bool {
        match self.state {
            State::SynSent => true,
            State::Established => self.snd_una != self.snd_nxt || self.data_unsent(),
            State::Closed | State::TimeWait => false,
        }
    }

    /// The end of the data (sequence number after the last request byte).
    fn data_end(&self) -> u32 {
        self.iss.wrapping_add(1).wrapping_add(self.data_len)
    }

    fn data_unsent(&self) -> bool {
        seq_lt(self.snd_nxt, self.data_end())
    }

    fn fin_unsent(&self) -> bool {
        self.fin_wanted && self.snd_nxt == self.data_end()
    }

    /// The window to advertise: the free space of the receive buffer.
    fn window(&self) -> u16 {
        let free = self.recv_cap.saturating_sub(self.recv_len);
        u16::try_from(free).unwrap_or(u16::MAX)
    }

    /// Sends a FIN once all data is sent.
    pub fn close(&mut self) {
        if self.state == State::Established {
            self.fin_wanted = true;
        }
    }

    /// Resets the connection: a RST goes out if the peer knows of it;
    /// in SYN-SENT it is just forgotten.
    pub fn abort(&mut self) {
        match self.state {
            State::SynSent => self.state = State::Closed,
            State::Established | State::TimeWait => self.rst_due = true,
            State::Closed => {}
        }
    }

    /// Goes back to the oldest unacknowledged byte: the SYN, the data or
    /// the FIN are sent again.
    pub fn retransmit(&mut self) {
        match self.state {
            State::SynSent => self.syn_due = true,
            State::Established if self.snd_nxt != self.snd_una => self.snd_nxt = self.snd_una,
            _ => return,
        }
        self.counters.retransmits += 1;
    }

    /// True if [`Conn::next_segment`] has a segment to write.
    pub fn wants_to_send(&self) -> bool {
        match self.state {
            State::Closed => false,
            State::SynSent => self.syn_due,
            State::Established | State::TimeWait => {
                self.rst_due
                    || self.ack_pending
                    || self.handshake_ack_due
                    || self.fin_unsent()
                    || (self.data_unsent() && seq_lt(self.snd_nxt, self.snd_wnd_edge))
            }
        }
    }

    /// Takes a segment this connection [owns](Conn::owns): data into
    /// `recv` (in order only), ACKs, FIN and RST.
    pub fn segment_in(&mut self, seg: &TcpIn<'_>, recv: &mut [u8]) -> Received {
        self.counters.segments_in = self.counters.segments_in.wrapping_add(1);
        let flags = seg.flags;
        let has = |f: u8| flags & f != 0;
        let mut received = Received::default();
        match self.state {
            State::Closed => {}
            State::SynSent => {
                let acks_syn = has(tcp_flags::ACK) && seg.ack == self.iss.wrapping_add(1);
                if has(tcp_flags::RST) {
                    if acks_syn {
                        self.reset_received();
                    }
                } else if has(tcp_flags::SYN) && acks_syn {
                    self.state = State::Established;
                    self.syn_due = false;
                    self.snd_una = seg.ack;
                    self.snd_nxt = seg.ack;
                    self.snd_wnd_edge = seg.ack.wrapping_add(u32::from(seg.window));
                    self.peer_mss = seg.mss.unwrap_or(DEFAULT_PEER_MSS).max(1);
                    self.rcv_nxt = seg.seq.wrapping_add(1);
                    self.handshake_ack_due = true;
                }
                // Anything else (a SYN-ACK for another SYN, ...) is
                // ignored: the SYN is retransmitted on time.
            }
            State::Established | State::TimeWait => {
                received = self.synchronized_in(seg, recv);
            }
        }
        received
    }

    fn reset_received(&mut self) {
        self.state = State::Closed;
        self.counters.rst_in = true;
        self.rst_due = false;
    }

    fn synchronized_in(&mut self, seg: &TcpIn<'_>, recv: &mut [u8]) -> Received {
        let flags = seg.flags;
        let has = |f: u8| flags & f != 0;
        let mut received = Received::default();
        if has(tcp_flags::RST) {
            let window = u32::from(self.window()).max(1);
            if seq_le(self.rcv_nxt, seg.seq) && seq_lt(seg.seq, self.rcv_nxt.wrapping_add(window)) {
                self.reset_received();
            }
            return received;
        }
        if has(tcp_flags::SYN) {
            // A retransmitted SYN-ACK: our ACK got lost.
            self.ack_pending = true;
            return received;
        }
        if !has(tcp_flags::ACK) {
            return received;
        }
        // An acceptable ACK moves snd_una and the peer's window.
        if seq_le(self.snd_una, seg.ack) && seq_le(seg.ack, self.snd_nxt) {
            self.snd_una = seg.ack;
            self.snd_wnd_edge = seg.ack.wrapping_add(u32::from(seg.window));
            if self.fin_wanted && seg.ack == self.data_end().wrapping_add(1) {
                self.fin_acked = true;
            }
        }
        let payload = seg.payload;
        // The sequence number after the payload (the FIN's, if any).
        let end = seg.seq.wrapping_add(payload.len() as u32);
        if !payload.is_empty() {
            if self.fin_received {
                // Data after the FIN: ignored (but acknowledged).
                self.ack_pending = true;
            } else if seq_le(seg.seq, self.rcv_nxt) && seq_lt(self.rcv_nxt, end) {
                // In order (possibly overlapping what we have): take what
                // fits the buffer.
                let skip = self.rcv_nxt.wrapping_sub(seg.seq) as usize;
                let fresh = payload.get(skip..).unwrap_or(&[]);
                let room = recv.len().min(self.recv_cap).saturating_sub(self.recv_len);
                let n = fresh.len().min(room);
                if let (Some(dst), Some(src)) = (
                    recv.get_mut(self.recv_len..self.recv_len + n),
                    fresh.get(..n),
                ) {
                    crate::mem::copy(dst, src);
                    self.recv_len += n;
                    self.rcv_nxt = self.rcv_nxt.wrapping_add(n as u32);
                    received.data = n;
                }
                self.ack_pending = true;
            } else {
                // Out of order or old: acknowledge what we expect.
                self.ack_pending = true;
            }
        }
        if has(tcp_flags::FIN) {
            if !self.fin_received && end == self.rcv_nxt {
                self.fin_received = true;
                self.rcv_nxt = self.rcv_nxt.wrapping_add(1);
            }
            // Also a retransmitted FIN gets an ACK.
            self.ack_pending = true;
        }
        if self.state == State::Established && self.fin_acked && self.fin_received {
            self.state = State::TimeWait;
        }
        received
    }

    /// Writes the next segment due into `out` (a frame buffer of at most
    /// `ETH_HLEN + mtu` bytes) for `dst_mac`; `data` is the request.
    /// Returns the frame length, or `None` if nothing is due (or it does
    /// not fit).
    pub fn next_segment(
        &mut self,
        iface: &Iface,
        dst_mac: [u8; 6],
        ip_id: u16,
        data: &[u8],
        out: &mut [u8],
    ) -> Option<usize> {
        let mut seg = TcpOut {
            dst_mac,
            dst_ip: self.remote_ip,
            ip_id,
            src_port: self.local_port,
            dst_port: self.remote_port,
            seq: self.snd_nxt,
            ack: self.rcv_nxt,
            flags: tcp_flags::ACK,
            window: self.window(),
            mss: None,
            payload: &[],
        };
        match self.state {
            State::Closed => return None,
            State::SynSent => {
                if !self.syn_due {
                    return None;
                }
                seg.seq = self.iss;
                seg.ack = 0;
                seg.flags = tcp_flags::SYN;
                seg.mss = Some(self.mss);
                let len = netproto::tcp_segment(iface, &seg, out)?;
                self.syn_due = false;
                self.snd_nxt = self.iss.wrapping_add(1);
                return Some(self.sent(len));
            }
            State::Established | State::TimeWait => {}
        }
        if self.rst_due {
            seg.flags = tcp_flags::RST | tcp_flags::ACK;
            seg.window = 0;
            let len = netproto::tcp_segment(iface, &seg, out)?;
            self.state = State::Closed;
            self.rst_due = false;
            self.counters.rst_out = true;
            return Some(self.sent(len));
        }
        if self.handshake_ack_due {
            let len = netproto::tcp_segment(iface, &seg, out)?;
            self.handshake_ack_due = false;
            self.ack_pending = false;
            return Some(self.sent(len));
        }
        let room = self.snd_wnd_edge.wrapping_sub(self.snd_nxt);
        if self.data_unsent() && seq_lt(self.snd_nxt, self.snd_wnd_edge) {
            let offset = self.snd_nxt.wrapping_sub(self.iss.wrapping_add(1)) as usize;
            let rest = data.get(offset..self.data_len as usize)?;
            let max_payload = out
                .len()
                .saturating_sub(netproto::ETH_HLEN + TCP_IPV4_OVERHEAD);
            let n = rest
                .len()
                .min(usize::from(self.peer_mss))
                .min(room as usize)
                .min(max_payload);
            if n == 0 {
                return None;
            }
            seg.payload = rest.get(..n)?;
            if n == rest.len() {
                seg.flags |= tcp_flags::PSH;
            }
            let len = netproto::tcp_segment(iface, &seg, out)?;
            self.snd_nxt = self.snd_nxt.wrapping_add(n as u32);
            self.ack_pending = false;
            return Some(self.sent(len));
        }
        if self.fin_unsent() {
            seg.flags |= tcp_flags::FIN;
            let len = netproto::tcp_segment(iface, &seg, out)?;
            self.snd_nxt = self.snd_nxt.wrapping_add(1);
            self.ack_pending = false;
            return Some(self.sent(len));
        }
        if self.ack_pending {
            let len = netproto::tcp_segment(iface, &seg, out)?;
            self.ack_pending = false;
            return Some(self.sent(len));
        }
        None
    }

    fn sent(&mut self, len: usize) -> usize {
        self.counters.segments_out = self.counters.segments_out.wrapping_add(1);
        len
    }
}
