//! MMDS's TCP: a passive endpoint on port 80 that takes one request at a
//! time per connection and answers it, with Firecracker's limits (30
//! connections, a 2500-byte receive buffer, 100 resets queued). It never
//! closes first; a guest's FIN is answered with its own once everything
//! was sent. Nothing is timed: frames are made when the guest has RX
//! buffers for them, so none is lost on the way, and what the guest lost
//! itself it asks for again with a duplicate ACK.

use std::collections::{BTreeMap, VecDeque};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use super::http;
use super::wire::{self, Outgoing, Segment, ACK, CWR, ECE, FIN, RST, SYN};

/// The most connections at once.
pub const MAX_CONNECTIONS: usize = 30;
/// The receive buffer, and the most a request may take.
pub const RECEIVE_BUFFER: usize = http::MAX_REQUEST + 1;
/// The most resets waiting to go.
const MAX_RESETS: usize = 100;
/// Without an MSS option (RFC 9293's default).
const DEFAULT_MSS: u16 = 536;
/// The MSS MMDS offers: a 1500-byte MTU's.
const OUR_MSS: u16 = 1460;
/// Answers waiting for the guest's ACKs beyond this hold back the next
/// requests (a guest that pipelines requests and never reads cannot make
/// the backend grow).
const MAX_UNACKED_ANSWERS: usize = 256 << 10;
/// A full table gives up a connection idle this long for a new one.
const EVICT_IDLE: Duration = Duration::from_secs(2);

type Key = (Ipv4Addr, u16);

#[derive(Debug)]
struct Connection {
    iss: u32,
    syn_acked: bool,
    syn_ack_due: bool,
    /// The sequence number of `out[0]`.
    una: u32,
    /// Bytes of `out` sent (from its start).
    sent: usize,
    out: Vec<u8>,
    rcv_nxt: u32,
    input: Vec<u8>,
    mss: u16,
    peer_window: u16,
    ack_due: bool,
    fin_received: bool,
    fin_sent: bool,
    last_active: Instant,
}

impl Connection {
    fn next_seq(&self) -> u32 {
        if !self.syn_acked {
            return self.iss.wrapping_add(1);
        }
        self.una
            .wrapping_add(self.sent as u32)
            .wrapping_add(u32::from(self.fin_sent))
    }

    fn window(&self) -> u16 {
        (RECEIVE_BUFFER - self.input.len()) as u16
    }
}

/// A reset waiting to go.
#[derive(Debug, Clone, Copy)]
struct Reset {
    to: Key,
    seq: u32,
    ack: u32,
    flags: u8,
}

/// What the stack counted, for the metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Events {
    pub created: u64,
    pub destroyed: u64,
    pub requests: u64,
    pub no_token: u64,
    pub invalid_token: u64,
}

/// The TCP endpoint of one interface's MMDS.
#[derive(Debug, Default)]
pub struct Stack {
    connections: BTreeMap<Key, Connection>,
    resets: VecDeque<Reset>,
    next_iss: u32,
    pub events: Events,
}

impl Stack {
    /// Takes a segment for port 80; `answer` answers each whole request.
    pub fn segment(
        &mut self,
        seg: &Segment<'_>,
        mut answer: impl FnMut(&[u8]) -> (Vec<u8>, http::Outcome),
    ) {
        let key = (seg.src_ip, seg.src_port);
        if seg.flags & RST != 0 {
            if self.connections.remove(&key).is_some() {
                self.events.destroyed += 1;
            }
            return;
        }
        let Some(conn) = self.connections.get_mut(&key) else {
            self.open(key, seg);
            return;
        };
        conn.last_active = Instant::now();
        if seg.flags & SYN != 0 {
            // The guest did not hear our SYN-ACK: say it again.
            if !conn.syn_acked && seg.seq.wrapping_add(1) == conn.rcv_nxt {
                conn.syn_ack_due = true;
            } else {
                self.reset_and_forget(key, seg);
            }
            return;
        }
        if seg.flags & ACK == 0 {
            return;
        }
        if !Self::take_ack(conn, seg) {
            return;
        }
        if conn.fin_sent
            && conn.fin_received
            && conn.next_seq() == seg.ack
            && conn.sent == conn.out.len()
        {
            self.connections.remove(&key);
            self.events.destroyed += 1;
            return;
        }
        Self::take_data(conn, seg);
        Self::serve_requests(conn, &mut answer, &mut self.events);
        if conn.input.len() == RECEIVE_BUFFER && http::request_end(&conn.input).is_none() {
            self.reset_and_forget(key, seg);
        }
    }

    /// A segment for no connection: a SYN opens one, anything else is reset.
    fn open(&mut self, key: Key, seg: &Segment<'_>) {
        let plain_syn = seg.flags & (SYN | ACK | FIN | ECE | CWR) == SYN;
        if !plain_syn || !seg.payload.is_empty() {
            self.reset(key, seg);
            return;
        }
        if self.connections.len() >= MAX_CONNECTIONS && !self.evict_idle() {
            self.reset(key, seg);
            return;
        }
        self.next_iss = self
            .next_iss
            .wrapping_add(0x0001_0000)
            .wrapping_add(seg.seq & 0xffff);
        let iss = self.next_iss;
        self.connections.insert(
            key,
            Connection {
                iss,
                syn_acked: false,
                syn_ack_due: true,
                una: iss.wrapping_add(1),
                sent: 0,
                out: Vec::new(),
                rcv_nxt: seg.seq.wrapping_add(1),
                input: Vec::new(),
                mss: seg.mss.unwrap_or(DEFAULT_MSS).clamp(64, OUR_MSS),
                peer_window: seg.window,
                ack_due: false,
                fin_received: false,
                fin_sent: false,
                last_active: Instant::now(),
            },
        );
        self.events.created += 1;
    }

    fn evict_idle(&mut self) -> bool {
        let oldest = self
            .connections
            .iter()
            .min_by_key(|(_, c)| c.last_active)
            .filter(|(_, c)| c.last_active.elapsed() >= EVICT_IDLE)
            .map(|(key, _)| *key);
        match oldest {
            Some(key) => {
                self.connections.remove(&key);
                self.events.destroyed += 1;
                true
            }
            None => false,
        }
    }

    /// Moves what the guest acknowledged out of the send buffer; a
    /// duplicate ACK has everything unacknowledged sent again. False if
    /// the ACK is not for this connection's state.
    fn take_ack(conn: &mut Connection, seg: &Segment<'_>) -> bool {
        if !conn.syn_acked {
            if seg.ack != conn.iss.wrapping_add(1) {
                return false;
            }
            conn.syn_acked = true;
            conn.syn_ack_due = false;
        }
        let acked = seg.ack.wrapping_sub(conn.una) as usize;
        let in_flight = conn.sent + usize::from(conn.fin_sent);
        if acked > in_flight {
            // An ACK of what was never sent: answer with where we are.
            conn.ack_due = true;
            return false;
        }
        let data_acked = acked.min(conn.sent);
        let duplicate = acked == 0
            && seg.payload.is_empty()
            && seg.flags & FIN == 0
            && conn.sent > 0
            && seg.window == conn.peer_window;
        conn.out.drain(..data_acked);
        conn.una = conn.una.wrapping_add(data_acked as u32);
        conn.sent -= data_acked;
        conn.peer_window = seg.window;
        if duplicate {
            conn.sent = 0;
        }
        true
    }

    /// Takes in-order data and a FIN.
    fn take_data(conn: &mut Connection, seg: &Segment<'_>) {
        let mut taken_all = true;
        if !seg.payload.is_empty() {
            conn.ack_due = true;
            if seg.seq != conn.rcv_nxt || conn.fin_received {
                return;
            }
            let room = RECEIVE_BUFFER - conn.input.len();
            let take = seg.payload.len().min(room);
            conn.input.extend(&seg.payload[..take]);
            conn.rcv_nxt = conn.rcv_nxt.wrapping_add(take as u32);
            taken_all = take == seg.payload.len();
        }
        if seg.flags & FIN != 0 && taken_all && !conn.fin_received {
            let fin_seq = seg.seq.wrapping_add(seg.payload.len() as u32);
            if fin_seq == conn.rcv_nxt {
                conn.rcv_nxt = conn.rcv_nxt.wrapping_add(1);
                conn.fin_received = true;
                conn.ack_due = true;
            }
        }
    }

    /// Answers each whole request in the receive buffer, while the answers
    /// not yet acknowledged stay within [`MAX_UNACKED_ANSWERS`].
    fn serve_requests(
        conn: &mut Connection,
        answer: &mut impl FnMut(&[u8]) -> (Vec<u8>, http::Outcome),
        events: &mut Events,
    ) {
        while conn.out.len() < MAX_UNACKED_ANSWERS {
            let Some(end) = http::request_end(&conn.input) else {
                return;
            };
            let (response, outcome) = answer(&conn.input[..end]);
            conn.input.drain(..end);
            conn.out.extend(response);
            conn.ack_due = true;
            events.requests += 1;
            events.no_token += u64::from(outcome.no_token);
            events.invalid_token += u64::from(outcome.invalid_token);
        }
    }

    /// RFC 9293's reset for a segment that belongs to nothing.
    fn reset(&mut self, to: Key, seg: &Segment<'_>) {
        if self.resets.len() >= MAX_RESETS {
            return;
        }
        let reset = if seg.flags & ACK != 0 {
            Reset {
                to,
                seq: seg.ack,
                ack: 0,
                flags: RST,
            }
        } else {
            Reset {
                to,
                seq: 0,
                ack: seg.seq.wrapping_add(seg.seq_len()),
                flags: RST | ACK,
            }
        };
        self.resets.push_back(reset);
    }

    fn reset_and_forget(&mut self, key: Key, seg: &Segment<'_>) {
        if let Some(conn) = self.connections.remove(&key) {
            self.events.destroyed += 1;
            if self.resets.len() < MAX_RESETS {
                self.resets.push_back(Reset {
                    to: key,
                    seq: conn.next_seq(),
                    ack: 0,
                    flags: RST,
                });
            }
            return;
        }
        self.reset(key, seg);
    }

    /// Whether a frame is waiting to go.
    pub fn has_output(&self) -> bool {
        !self.resets.is_empty() || self.connections.values().any(Self::wants_to_send)
    }

    fn wants_to_send(c: &Connection) -> bool {
        c.syn_ack_due
            || c.ack_due
            || (c.syn_acked && c.sent < c.out.len() && c.sent < usize::from(c.peer_window))
            || (c.fin_received && !c.fin_sent && c.sent == c.out.len())
    }

    /// The next frame to the guest (resets first), from `mmds_ip` to
    /// `guest_mac`, into `out`.
    pub fn next_frame(&mut self, mmds_ip: Ipv4Addr, guest_mac: [u8; 6], out: &mut Vec<u8>) -> bool {
        let frame = |to: Key, seq, ack, flags, window, mss, payload: &[u8], out: &mut Vec<u8>| {
            wire::tcp_frame(
                &Outgoing {
                    dst_mac: guest_mac,
                    src_ip: mmds_ip,
                    dst_ip: to.0,
                    dst_port: to.1,
                    seq,
                    ack,
                    flags,
                    window,
                    mss,
                    payload,
                },
                out,
            )
        };
        if let Some(r) = self.resets.pop_front() {
            frame(r.to, r.seq, r.ack, r.flags, 0, None, &[], out);
            return true;
        }
        let Some((&key, conn)) = self
            .connections
            .iter_mut()
            .find(|(_, c)| Self::wants_to_send(c))
        else {
            return false;
        };
        let window = conn.window();
        if conn.syn_ack_due {
            conn.syn_ack_due = false;
            conn.ack_due = false;
            let mss = Some(OUR_MSS);
            frame(
                key,
                conn.iss,
                conn.rcv_nxt,
                SYN | ACK,
                window,
                mss,
                &[],
                out,
            );
            return true;
        }
        let room = usize::from(conn.peer_window).saturating_sub(conn.sent);
        let unsent = conn.out.len() - conn.sent;
        if conn.syn_acked && unsent > 0 && room > 0 {
            let len = unsent.min(room).min(usize::from(conn.mss));
            let seq = conn.next_seq();
            let payload = &conn.out[conn.sent..conn.sent + len];
            frame(key, seq, conn.rcv_nxt, ACK, window, None, payload, out);
            conn.sent += len;
            conn.ack_due = false;
            return true;
        }
        if conn.fin_received && !conn.fin_sent && unsent == 0 {
            let seq = conn.next_seq();
            conn.fin_sent = true;
            conn.ack_due = false;
            frame(key, seq, conn.rcv_nxt, FIN | ACK, window, None, &[], out);
            return true;
        }
        conn.ack_due = false;
        frame(
            key,
            conn.next_seq(),
            conn.rcv_nxt,
            ACK,
            window,
            None,
            &[],
            out,
        );
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mmds::wire::{parse, Incoming};

    const GUEST: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
    const MMDS: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);

    fn seg(seq: u32, ack: u32, flags: u8, payload: &[u8]) -> Segment<'_> {
        Segment {
            src_mac: [2; 6],
            src_ip: GUEST,
            src_port: 40000,
            dst_port: 80,
            seq,
            ack,
            flags,
            window: 8192,
            mss: (flags & SYN != 0).then_some(1460),
            payload,
        }
    }

    fn echo(request: &[u8]) -> (Vec<u8>, http::Outcome) {
        let mut reply = b"answer:".to_vec();
        reply.extend(request);
        (reply, http::Outcome::default())
    }

    /// Every frame waiting, as (seq, ack, flags, payload).
    fn drain(stack: &mut Stack) -> Vec<(u32, u32, u8, Vec<u8>)> {
        let mut frames = Vec::new();
        let mut out = Vec::new();
        while stack.next_frame(MMDS, [2; 6], &mut out) {
            let Ok(Incoming::Tcp(s)) = parse(&out) else {
                panic!("not TCP");
            };
            frames.push((s.seq, s.ack, s.flags, s.payload.to_vec()));
            assert!(frames.len() < 100, "the stack keeps sending");
        }
        frames
    }

    #[test]
    fn a_request_is_answered_and_the_guest_closes() {
        let mut stack = Stack::default();
        stack.segment(&seg(100, 0, SYN, &[]), echo);
        let synack = drain(&mut stack);
        assert_eq!(synack.len(), 1);
        let (iss, ack, flags, _) = synack[0].clone();
        assert_eq!((ack, flags), (101, SYN | ACK));
        let request = b"GET / HTTP/1.1\r\n\r\n";
        stack.segment(&seg(101, iss + 1, ACK, &[]), echo);
        stack.segment(&seg(101, iss + 1, ACK, request), echo);
        let frames = drain(&mut stack);
        assert_eq!(frames.len(), 1, "{frames:?}");
        let (seq, ack, flags, payload) = frames[0].clone();
        assert_eq!(
            (seq, ack, flags),
            (iss + 1, 101 + request.len() as u32, ACK)
        );
        assert_eq!(&payload[..7], b"answer:");
        let end = iss + 1 + payload.len() as u32;
        stack.segment(&seg(ack, end, FIN | ACK, &[]), echo);
        let fin = drain(&mut stack);
        assert_eq!(fin, vec![(end, ack + 1, FIN | ACK, vec![])]);
        stack.segment(&seg(ack + 1, end + 1, ACK, &[]), echo);
        assert!(stack.connections.is_empty());
        assert_eq!(
            (
                stack.events.created,
                stack.events.destroyed,
                stack.events.requests
            ),
            (1, 1, 1)
        );
    }

    #[test]
    fn a_large_answer_goes_in_mss_segments_within_the_window_and_again_on_a_duplicate_ack() {
        let mut stack = Stack::default();
        let big = |_: &[u8]| (vec![b'x'; 5000], http::Outcome::default());
        let mut syn = seg(0, 0, SYN, &[]);
        syn.mss = Some(1000);
        stack.segment(&syn, big);
        let iss = drain(&mut stack)[0].0;
        let mut get = seg(1, iss + 1, ACK, b"GET / HTTP/1.1\r\n\r\n");
        get.window = 2500;
        stack.segment(&get, big);
        let frames = drain(&mut stack);
        let lens: Vec<usize> = frames.iter().map(|f| f.3.len()).collect();
        assert_eq!(lens, vec![1000, 1000, 500], "the window holds 2500");
        let mut dup = seg(19, iss + 1, ACK, &[]);
        dup.window = 2500;
        stack.segment(&dup, big);
        assert_eq!(
            drain(&mut stack)[0].0,
            iss + 1,
            "a duplicate ACK sends again"
        );
    }

    #[test]
    fn strangers_get_resets_and_the_table_stays_bounded() {
        let mut stack = Stack::default();
        stack.segment(&seg(5, 77, ACK, b"data"), echo);
        assert_eq!(drain(&mut stack), vec![(77, 0, RST, vec![])]);
        stack.segment(&seg(5, 0, FIN, &[]), echo);
        assert_eq!(drain(&mut stack), vec![(0, 6, RST | ACK, vec![])]);
        for port in 0..(MAX_CONNECTIONS as u16 + 5) {
            let mut syn = seg(1, 0, SYN, &[]);
            syn.src_port = port;
            stack.segment(&syn, echo);
        }
        assert_eq!(stack.connections.len(), MAX_CONNECTIONS);
        let frames = drain(&mut stack);
        assert_eq!(frames.iter().filter(|f| f.2 & RST != 0).count(), 5);
        for _ in 0..500 {
            stack.segment(&seg(5, 77, ACK, b"data"), echo);
        }
        assert_eq!(stack.resets.len(), MAX_RESETS);
    }

    #[test]
    fn a_guest_that_pipelines_requests_and_never_reads_does_not_grow_the_backend() {
        let mut stack = Stack::default();
        let big = |_: &[u8]| (vec![b'x'; 10_000], http::Outcome::default());
        stack.segment(&seg(0, 0, SYN, &[]), big);
        let iss = drain(&mut stack)[0].0;
        let requests = b"GET / HTTP/1.1\r\n\r\n".repeat(100);
        let mut seq = 1;
        for chunk in requests.chunks(1000) {
            stack.segment(&seg(seq, iss + 1, ACK, chunk), big);
            seq += chunk.len() as u32;
        }
        let conn = stack.connections.values().next().unwrap();
        assert!(conn.out.len() < MAX_UNACKED_ANSWERS + 10_000);
        assert!(stack.events.requests < 100);
    }

    #[test]
    fn a_buffer_filled_without_a_request_end_is_reset() {
        let mut stack = Stack::default();
        stack.segment(&seg(0, 0, SYN, &[]), echo);
        let iss = drain(&mut stack)[0].0;
        let junk = vec![b'a'; RECEIVE_BUFFER];
        stack.segment(&seg(1, iss + 1, ACK, &junk), echo);
        assert!(stack.connections.is_empty());
        assert!(drain(&mut stack).iter().any(|f| f.2 & RST != 0));
    }
}
