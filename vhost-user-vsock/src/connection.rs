//! One stream between a guest port and a host Unix socket: its state, the
//! credit each side grants the other, and the guest's bytes the host
//! socket has not taken yet (never more than the credit this side
//! granted, so memory stays bounded however slow the host reader is).

use std::collections::VecDeque;
use std::io::{self, Write};
use std::num::Wrapping;
use std::os::unix::net::UnixStream;
use std::time::Instant;

use vm_memory::bitmap::BitmapSlice;
use vm_memory::{ReadVolatile, VolatileSlice, WriteVolatile};

use crate::packet::{op, shutdown, Header, HOST_CID, TYPE_STREAM};

/// The bytes of guest data this side holds for one connection: the
/// credit granted to the guest (`buf_alloc`).
pub const BUF_ALLOC: u32 = 256 * 1024;
/// Bytes written out to the host since the last credit update that make
/// the device tell the guest its new credit without being asked.
pub const CREDIT_UPDATE_THRESHOLD: u32 = BUF_ALLOC / 4;

/// A connection's two ends: host port (the listener side's number for
/// host-initiated connections, the port the guest dialled otherwise) and
/// the guest's port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnKey {
    pub local_port: u32,
    pub peer_port: u32,
}

impl ConnKey {
    /// The epoll data value of the connection's host socket.
    pub fn token(self) -> u64 {
        u64::from(self.local_port) << 32 | u64::from(self.peer_port)
    }

    pub fn from_token(token: u64) -> Self {
        Self {
            local_port: (token >> 32) as u32,
            peer_port: token as u32,
        }
    }
}

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Host-initiated: REQUEST sent (or to send), waiting for RESPONSE.
    Connecting,
    Established,
    /// The host closed its end: SHUTDOWN sent, waiting for the guest's RST.
    HostClosed,
    /// Over: a RST is due to the guest (unless it sent one), then the
    /// connection is dropped.
    Killed,
}

/// Control packets a connection owes the guest.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pending(u8);

impl Pending {
    pub const REQUEST: u8 = 1;
    pub const RESPONSE: u8 = 2;
    pub const RST: u8 = 4;
    pub const SHUTDOWN: u8 = 8;
    pub const CREDIT_UPDATE: u8 = 16;
    pub const CREDIT_REQUEST: u8 = 32;

    pub fn set(&mut self, op: u8) {
        self.0 |= op;
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The most urgent packet owed, removed from the set.
    fn take_next(&mut self) -> Option<u16> {
        const ORDER: [(u8, u16); 6] = [
            (Pending::RST, op::RST),
            (Pending::REQUEST, op::REQUEST),
            (Pending::RESPONSE, op::RESPONSE),
            (Pending::SHUTDOWN, op::SHUTDOWN),
            (Pending::CREDIT_UPDATE, op::CREDIT_UPDATE),
            (Pending::CREDIT_REQUEST, op::CREDIT_REQUEST),
        ];
        let (bit, code) = ORDER.into_iter().find(|(bit, _)| self.0 & bit != 0)?;
        self.0 &= !bit;
        Some(code)
    }
}

/// What the guest did wrong on a connection, which it pays with a reset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    #[error("sent {len} bytes with {free} bytes of credit left")]
    CreditExceeded { len: u32, free: u32 },
    #[error("sent data on a connection that is not established")]
    NotEstablished,
    #[error("sent data after shutting down its sending side")]
    SentAfterShutdown,
    #[error("answered a connection it did not ask for")]
    UnexpectedResponse,
    #[error("asked again for a connection that exists")]
    DuplicateRequest,
    #[error("sent unknown operation {0}")]
    UnknownOp(u16),
}

/// What reading the host socket into an RX packet gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostRead {
    /// `n` bytes for the guest.
    Data(u32),
    /// Nothing now (the socket would block, or no credit).
    Nothing,
    /// The host closed its sending side.
    Eof,
}

/// One connection.
#[derive(Debug)]
pub struct Connection {
    pub key: ConnKey,
    pub stream: UnixStream,
    pub state: State,
    pub guest_cid: u64,
    /// Control packets owed to the guest.
    pub pending: Pending,
    /// Whether it waits in the muxer's list of connections with packets
    /// for the guest.
    pub queued: bool,
    /// When a connection still in its handshake (or waiting for the
    /// guest's RST) is given up.
    pub deadline: Option<Instant>,
    /// The host socket has bytes (epoll said so; not read to EAGAIN yet).
    pub host_readable: bool,
    host_eof: bool,
    /// SHUTDOWN flags the guest sent.
    peer_shutdown: u32,
    /// Guest bytes the host socket has not taken yet.
    unsent: VecDeque<u8>,
    /// Bytes of the guest's forwarded to the host.
    fwd_cnt: Wrapping<u32>,
    /// `fwd_cnt` as last told to the guest.
    fwd_cnt_told: Wrapping<u32>,
    /// The guest's receive buffer and what it has consumed of our bytes.
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    /// Bytes sent to the guest.
    rx_cnt: Wrapping<u32>,
    /// A CREDIT_REQUEST went out and no update came since.
    credit_requested: bool,
}

impl Connection {
    /// A connection the host opened (`CONNECT <port>`): a REQUEST is due.
    pub fn host_initiated(key: ConnKey, stream: UnixStream, guest_cid: u64) -> Self {
        let mut conn = Self::new(key, stream, guest_cid, State::Connecting);
        conn.pending.set(Pending::REQUEST);
        conn
    }

    /// A connection the guest asked for (`hdr`, a REQUEST) and the host
    /// accepted: a RESPONSE is due.
    pub fn guest_initiated(hdr: &Header, stream: UnixStream) -> Self {
        let key = ConnKey {
            local_port: hdr.dst_port,
            peer_port: hdr.src_port,
        };
        let mut conn = Self::new(key, stream, hdr.src_cid, State::Established);
        conn.update_peer_credit(hdr);
        conn.pending.set(Pending::RESPONSE);
        conn
    }

    fn new(key: ConnKey, stream: UnixStream, guest_cid: u64, state: State) -> Self {
        Self {
            key,
            stream,
            state,
            guest_cid,
            pending: Pending::default(),
            queued: false,
            deadline: None,
            host_readable: false,
            host_eof: false,
            peer_shutdown: 0,
            unsent: VecDeque::new(),
            fwd_cnt: Wrapping(0),
            fwd_cnt_told: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            rx_cnt: Wrapping(0),
            credit_requested: false,
        }
    }

    fn wants_host_bytes(&self) -> bool {
        self.state == State::Established
            && !self.host_eof
            && self.peer_shutdown & shutdown::RCV == 0
    }

    /// Bytes the guest can take now.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Whether a packet for the guest is due (a control packet, or host
    /// bytes the guest has credit for).
    pub fn has_rx_work(&self) -> bool {
        !self.pending.is_empty()
            || (self.wants_host_bytes() && self.host_readable && self.peer_credit() > 0)
    }

    /// Takes the credit the guest announces in each of its packets.
    pub fn update_peer_credit(&mut self, hdr: &Header) {
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
        if self.peer_credit() > 0 {
            self.credit_requested = false;
        }
    }

    /// Ends the connection: a RST to the guest, then it is dropped.
    pub fn kill(&mut self) {
        self.state = State::Killed;
        self.pending = Pending::default();
        self.pending.set(Pending::RST);
        self.unsent.clear();
    }

    /// Handles one guest packet for this connection. `data` is the
    /// packet's payload (RW only). An error is the guest's fault: the
    /// caller resets the connection.
    pub fn on_guest_packet<B: BitmapSlice>(
        &mut self,
        hdr: &Header,
        data: Option<&VolatileSlice<B>>,
    ) -> Result<(), Violation> {
        self.update_peer_credit(hdr);
        match hdr.op {
            op::RESPONSE if self.state == State::Connecting => {
                self.state = State::Established;
                self.deadline = None;
                // The socket is empty: a few bytes always fit.
                let line = format!("OK {}\n", self.key.local_port);
                if self.stream.write_all(line.as_bytes()).is_err() {
                    self.kill();
                }
                Ok(())
            }
            op::RESPONSE => Err(Violation::UnexpectedResponse),
            op::REQUEST => Err(Violation::DuplicateRequest),
            op::RW => self.take_guest_bytes(hdr.len, data),
            op::CREDIT_UPDATE => Ok(()),
            op::CREDIT_REQUEST => {
                self.pending.set(Pending::CREDIT_UPDATE);
                Ok(())
            }
            op::SHUTDOWN => {
                self.peer_shutdown |= hdr.flags & shutdown::BOTH;
                self.after_shutdown_or_flush();
                Ok(())
            }
            other => Err(Violation::UnknownOp(other)),
        }
    }

    fn take_guest_bytes<B: BitmapSlice>(
        &mut self,
        len: u32,
        data: Option<&VolatileSlice<B>>,
    ) -> Result<(), Violation> {
        if self.state != State::Established {
            return Err(Violation::NotEstablished);
        }
        if self.peer_shutdown & shutdown::SEND != 0 {
            return Err(Violation::SentAfterShutdown);
        }
        let free = BUF_ALLOC - self.unsent.len() as u32;
        if len > free {
            return Err(Violation::CreditExceeded { len, free });
        }
        let Some(data) = data else {
            return Ok(());
        };
        let mut written = 0;
        if self.unsent.is_empty() {
            match self.stream.write_volatile(data) {
                Ok(n) => written = n,
                Err(vm_memory::VolatileMemoryError::IOError(err))
                    if err.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => {
                    self.kill();
                    return Ok(());
                }
            }
        }
        if written < data.len() {
            let rest = data.offset(written).expect("written <= len");
            let mut buf = vec![0u8; rest.len()];
            rest.copy_to(&mut buf[..]);
            self.unsent.extend(buf);
        }
        self.forwarded(written);
        Ok(())
    }

    /// Counts `n` guest bytes the host took, and owes the guest a credit
    /// update once enough of them went unannounced.
    fn forwarded(&mut self, n: usize) {
        self.fwd_cnt += n as u32;
        if (self.fwd_cnt - self.fwd_cnt_told).0 >= CREDIT_UPDATE_THRESHOLD {
            self.pending.set(Pending::CREDIT_UPDATE);
        }
    }

    /// Writes held guest bytes to the host socket as it takes them.
    pub fn flush_to_host(&mut self) {
        while !self.unsent.is_empty() {
            let (front, _) = self.unsent.as_slices();
            match self.stream.write(front) {
                Ok(0) => break,
                Ok(n) => {
                    self.unsent.drain(..n);
                    self.forwarded(n);
                }
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => return,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.kill();
                    return;
                }
            }
        }
        self.after_shutdown_or_flush();
    }

    /// Acts on the guest's SHUTDOWN once the host has every byte the
    /// guest sent before it: both directions end the connection (with a
    /// RST, as Firecracker does), the sending side alone half-closes the
    /// host socket.
    fn after_shutdown_or_flush(&mut self) {
        if !self.unsent.is_empty() || self.state == State::Killed {
            return;
        }
        if self.peer_shutdown == shutdown::BOTH {
            self.kill();
        } else if self.peer_shutdown & shutdown::SEND != 0 {
            let _ = self.stream.shutdown(std::net::Shutdown::Write);
        }
    }

    /// Fills `data` (an RX packet's payload) from the host socket, no
    /// further than the guest's credit.
    pub fn read_host<B: BitmapSlice>(&mut self, data: &mut VolatileSlice<B>) -> HostRead {
        let credit = self.peer_credit() as usize;
        if !self.wants_host_bytes() || !self.host_readable {
            return HostRead::Nothing;
        }
        if credit == 0 {
            if !self.credit_requested {
                self.credit_requested = true;
                self.pending.set(Pending::CREDIT_REQUEST);
            }
            return HostRead::Nothing;
        }
        let len = data.len().min(credit);
        let mut slice = data.subslice(0, len).expect("len <= data.len()");
        match self.stream.read_volatile(&mut slice) {
            Ok(0) if len > 0 => {
                self.host_eof = true;
                HostRead::Eof
            }
            Ok(n) => {
                self.rx_cnt += n as u32;
                HostRead::Data(n as u32)
            }
            Err(vm_memory::VolatileMemoryError::IOError(err))
                if err.kind() == io::ErrorKind::WouldBlock
                    || err.kind() == io::ErrorKind::Interrupted =>
            {
                self.host_readable = false;
                HostRead::Nothing
            }
            Err(_) => {
                self.host_eof = true;
                HostRead::Eof
            }
        }
    }

    /// The header of the next packet for the guest: a control packet due,
    /// or (`data_len` > 0) host bytes just read.
    pub fn header(&mut self, op: u16, data_len: u32) -> Header {
        self.fwd_cnt_told = self.fwd_cnt;
        let flags = if op == op::SHUTDOWN {
            shutdown::BOTH
        } else {
            0
        };
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: self.key.local_port,
            dst_port: self.key.peer_port,
            len: data_len,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: self.fwd_cnt.0,
        }
    }

    /// The next control packet owed to the guest, if any.
    pub fn take_control(&mut self) -> Option<u16> {
        self.pending.take_next()
    }

    /// The host socket's reading side ended: the guest is told (SHUTDOWN
    /// of both directions, as Firecracker does) and the connection waits
    /// for its RST.
    pub fn host_closed(&mut self, deadline: Instant) {
        if self.state == State::Established || self.state == State::Connecting {
            self.state = State::HostClosed;
            self.pending.set(Pending::SHUTDOWN);
            self.deadline = Some(deadline);
        }
    }

    /// Bytes held for the host.
    pub fn unsent_len(&self) -> usize {
        self.unsent.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn established() -> (Connection, UnixStream) {
        let (ours, host) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let request = Header {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: 1000,
            dst_port: 52,
            type_: TYPE_STREAM,
            op: op::REQUEST,
            buf_alloc: 4096,
            ..Header::default()
        };
        let mut conn = Connection::guest_initiated(&request, ours);
        assert_eq!(conn.take_control(), Some(op::RESPONSE));
        (conn, host)
    }

    fn rw(len: u32) -> Header {
        Header {
            op: op::RW,
            len,
            buf_alloc: 4096,
            ..Header::default()
        }
    }

    fn slice(bytes: &mut [u8]) -> VolatileSlice<'_, ()> {
        VolatileSlice::from(bytes)
    }

    #[test]
    fn guest_bytes_reach_the_host_in_order_and_the_rest_waits() {
        let (mut conn, mut host) = established();
        let mut payload = vec![7u8; 300_000];
        // More than the credit: refused, nothing held.
        let err = conn
            .on_guest_packet(&rw(300_000), Some(&slice(&mut payload)))
            .unwrap_err();
        assert!(matches!(err, Violation::CreditExceeded { .. }), "{err}");
        let mut first: Vec<u8> = (0..BUF_ALLOC).map(|i| i as u8).collect();
        conn.on_guest_packet(&rw(BUF_ALLOC), Some(&slice(&mut first)))
            .unwrap();
        // The socket buffer takes only part of 256 KiB: the rest is held
        // and no further byte fits in the credit.
        assert!(conn.unsent_len() > 0);
        let mut got = Vec::new();
        let mut buf = vec![0u8; 65536];
        while got.len() < first.len() {
            let n = host.read(&mut buf).unwrap();
            got.extend_from_slice(&buf[..n]);
            conn.flush_to_host();
        }
        assert_eq!(&got[..first.len()], &first[..]);
        assert_eq!(conn.unsent_len(), 0);
        assert_eq!(conn.take_control(), Some(op::CREDIT_UPDATE));
        assert_eq!(conn.header(op::CREDIT_UPDATE, 0).fwd_cnt, got.len() as u32);
    }

    #[test]
    fn host_bytes_go_no_further_than_the_guest_credit() {
        let (mut conn, mut host) = established();
        std::io::Write::write_all(&mut host, &[5u8; 10_000]).unwrap();
        conn.host_readable = true;
        let mut rx = vec![0u8; 65536];
        assert_eq!(conn.read_host(&mut slice(&mut rx)), HostRead::Data(4096));
        assert_eq!(conn.peer_credit(), 0);
        assert!(!conn.has_rx_work() || !conn.pending.is_empty());
        assert_eq!(conn.read_host(&mut slice(&mut rx)), HostRead::Nothing);
        assert_eq!(conn.take_control(), Some(op::CREDIT_REQUEST));
        // The guest consumed it all: 4096 more.
        let update = Header {
            op: op::CREDIT_UPDATE,
            buf_alloc: 4096,
            fwd_cnt: 4096,
            ..Header::default()
        };
        conn.on_guest_packet::<()>(&update, None).unwrap();
        assert_eq!(conn.read_host(&mut slice(&mut rx)), HostRead::Data(4096));
    }

    #[test]
    fn a_full_shutdown_waits_for_held_bytes_then_resets() {
        let (mut conn, mut host) = established();
        let mut data = vec![9u8; BUF_ALLOC as usize];
        conn.on_guest_packet(&rw(BUF_ALLOC), Some(&slice(&mut data)))
            .unwrap();
        let bye = Header {
            op: op::SHUTDOWN,
            flags: shutdown::BOTH,
            buf_alloc: 4096,
            ..Header::default()
        };
        conn.on_guest_packet::<()>(&bye, None).unwrap();
        assert_eq!(conn.state, State::Established, "bytes are still held");
        let mut got = 0;
        let mut buf = vec![0u8; 65536];
        while conn.state != State::Killed {
            got += host.read(&mut buf).unwrap();
            conn.flush_to_host();
        }
        drop(conn);
        while let Ok(n) = host.read(&mut buf) {
            if n == 0 {
                break;
            }
            got += n;
        }
        assert_eq!(got, BUF_ALLOC as usize);
    }

    #[test]
    fn the_host_closing_its_end_is_a_shutdown_for_the_guest() {
        let (mut conn, host) = established();
        drop(host);
        conn.host_readable = true;
        let mut rx = vec![0u8; 128];
        assert_eq!(conn.read_host(&mut slice(&mut rx)), HostRead::Eof);
        conn.host_closed(Instant::now());
        assert_eq!(conn.take_control(), Some(op::SHUTDOWN));
        assert_eq!(conn.header(op::SHUTDOWN, 0).flags, shutdown::BOTH);
    }

    #[test]
    fn tokens_name_their_connection() {
        let key = ConnKey {
            local_port: u32::MAX,
            peer_port: 7,
        };
        assert_eq!(ConnKey::from_token(key.token()), key);
    }
}
