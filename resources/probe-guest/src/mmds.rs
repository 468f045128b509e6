//! `probe.mmds=<path>`: an HTTP client for the MicroVM Metadata Service
//! (MMDS) that Firecracker (and Tessera) answer from inside the
//! virtio-net device at 169.254.169.254:80.
//!
//! [`run`] runs after `probe.ping`, before the probe ticks or serves. Per
//! request: an ARP request for the MMDS address (every 100 ms, at most
//! 5 s; the MAC is then kept), a TCP connection from a fresh ephemeral
//! port (SYN every 500 ms, at most 3 s), the request, the whole response
//! (at most 5 s: status line, headers, `Content-Length` bytes of body),
//! then FIN (the server's FIN is acknowledged; a RST if the close does not
//! complete within 1 s). With `probe.mmds_token=<ttl>`, a
//! `PUT /latest/api/token` comes first, and its token goes with every
//! GET. The GET is made `probe.mmds_repeat` times, `probe.mmds_every_ms`
//! apart (start to start). Each response is printed as
//! `probe.mmds_header=<line>` lines and one `probe.mmds=<status> <body>`
//! line (the token's as `probe.mmds_token=<status> len=<n>`), a failure as
//! `probe.mmds=error <reason>`.
//!
//! Time is counted in 10 ms steps of [`StepClock`], whose wait serves the
//! device with [`Net::poll_client`]: the probe keeps answering ARP
//! requests and pings, and the client reacts to each segment as it
//! arrives (the whole exchange usually fits in one step); the steps only
//! time the retransmissions and timeouts.

use core::cell::UnsafeCell;
use core::fmt;
use core::mem::MaybeUninit;
use core::sync::atomic::{AtomicBool, Ordering};

use crate::cmdline::{self, BadOption};
use crate::netproto::{self, Iface, TcpIn};
use crate::serial::{Bytes, outln};
use crate::tcp::Conn;
use crate::virtio_net::{self, Net, StepClock};

/// The MMDS address without `probe.mmds_ip`.
const DEFAULT_IP: [u8; 4] = [169, 254, 169, 254];
const HTTP_PORT: u16 = 80;
/// Ephemeral ports (RFC 6335): the first connection takes one at random,
/// each next one the port after it.
const EPHEMERAL_FIRST: u16 = 49152;
const EPHEMERAL_COUNT: u16 = 16384;

/// `probe.mmds_repeat`: default and largest.
const DEFAULT_REPEAT: u32 = 1;
const MAX_REPEAT: u32 = 50;
/// `probe.mmds_every_ms` default.
const DEFAULT_EVERY_MS: u32 = 300;
/// Longest `probe.mmds` path and `probe.mmds_token` value.
const MAX_PATH: usize = 3072;
const MAX_TTL: usize = 256;

/// The receive buffer: a whole response (status line, headers, body).
pub const RESPONSE_CAP: usize = 64 * 1024;
/// The request buffer (a path of at most [`MAX_PATH`] bytes, a token of
/// at most [`TOKEN_CAP`] and the fixed lines fit).
const REQUEST_CAP: usize = 4096;
/// Longest token used.
const TOKEN_CAP: usize = 512;

/// Timers, in [`virtio_net::STEP_MS`] steps.
const ARP_RETRY_STEPS: u32 = 10;
const ARP_TIMEOUT_STEPS: u32 = 500;
/// The SYN, unacknowledged data and the FIN are sent again this often.
const RETRANSMIT_STEPS: u32 = 50;
const CONNECT_TIMEOUT_STEPS: u32 = 300;
const RESPONSE_TIMEOUT_STEPS: u32 = 500;
const CLOSE_TIMEOUT_STEPS: u32 = 100;

/// `probe.mmds` options.
#[derive(Clone, Copy, Debug)]
pub struct Options<'a> {
    /// The path of the GET (`probe.mmds`).
    pub path: &'a [u8],
    /// `probe.mmds_ip`.
    pub ip: [u8; 4],
    /// `probe.mmds_token`: the token's TTL, sent verbatim.
    pub token_ttl: Option<&'a [u8]>,
    /// `probe.mmds_accept`: the `Accept` header's value.
    pub accept: Option<&'static str>,
    /// `probe.mmds_repeat`.
    pub repeat: u32,
    /// `probe.mmds_every_ms`.
    pub every_ms: u32,
}

/// True for bytes that may go into a request line or header value as
/// they are: printable ASCII and space.
fn is_text(value: &[u8]) -> bool {
    value.iter().all(|&b| (0x20..0x7f).contains(&b))
}

/// Reads `probe.mmds`, `probe.mmds_ip`, `probe.mmds_token`,
/// `probe.mmds_accept`, `probe.mmds_repeat` and `probe.mmds_every_ms`
/// (last one wins; numbers are base 0 like `kstrtouint`). `Ok(None)`
/// without `probe.mmds` (the others are then ignored).
pub fn options(cmdline: &[u8]) -> Result<Option<Options<'_>>, BadOption<'_>> {
    let Some(value) = cmdline::last_value(cmdline, "probe.mmds") else {
        return Ok(None);
    };
    let path = value
        .filter(|v| !v.is_empty() && v.len() <= MAX_PATH && is_text(v))
        .ok_or(BadOption {
            name: "probe.mmds",
            value,
        })?;
    let ip = match cmdline::last_value(cmdline, "probe.mmds_ip") {
        None => DEFAULT_IP,
        Some(value) => value.and_then(netproto::parse_ipv4).ok_or(BadOption {
            name: "probe.mmds_ip",
            value,
        })?,
    };
    let token_ttl = match cmdline::last_value(cmdline, "probe.mmds_token") {
        None => None,
        Some(value) => Some(value.filter(|v| v.len() <= MAX_TTL && is_text(v)).ok_or(
            BadOption {
                name: "probe.mmds_token",
                value,
            },
        )?),
    };
    let accept = match cmdline::last_value(cmdline, "probe.mmds_accept") {
        None => None,
        Some(Some(b"json")) => Some("application/json"),
        Some(Some(b"text")) => Some("text/plain"),
        Some(value) => {
            return Err(BadOption {
                name: "probe.mmds_accept",
                value,
            });
        }
    };
    let number = |name: &'static str, default: u32, range: core::ops::RangeInclusive<u32>| {
        match cmdline::last_value(cmdline, name) {
            None => Ok(default),
            Some(value) => value
                .and_then(|v| cmdline::kstrtouint(v, 0))
                .filter(|n| range.contains(n))
                .ok_or(BadOption { name, value }),
        }
    };
    let repeat = number("probe.mmds_repeat", DEFAULT_REPEAT, 1..=MAX_REPEAT)?;
    let every_ms = number("probe.mmds_every_ms", DEFAULT_EVERY_MS, 0..=u32::MAX)?;
    Ok(Some(Options {
        path,
        ip,
        token_ttl,
        accept,
        repeat,
        every_ms,
    }))
}

/// Why a request failed (`probe.mmds=error <reason>`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// No ARP reply for the MMDS address within 5 s.
    ArpTimeout,
    /// No SYN-ACK within 3 s.
    ConnectTimeout,
    /// The server reset the connection before the whole response came.
    Reset,
    /// The whole response did not come within 5 s of the SYN-ACK.
    ResponseTimeout,
    /// An unparsable status line or header, no `Content-Length`, or a
    /// response larger than the buffer.
    BadResponse,
    /// The server closed (FIN) before the whole response came.
    Closed,
}

impl Error {
    pub fn name(self) -> &'static str {
        match self {
            Error::ArpTimeout => "arp-timeout",
            Error::ConnectTimeout => "connect-timeout",
            Error::Reset => "reset",
            Error::ResponseTimeout => "response-timeout",
            Error::BadResponse => "bad-response",
            Error::Closed => "closed",
        }
    }
}

/// The client's buffers.
#[repr(C, align(4096))]
struct MmdsMem {
    response: [u8; RESPONSE_CAP],
    request: [u8; REQUEST_CAP],
    token: [u8; TOKEN_CAP],
}

struct MmdsPool {
    mem: UnsafeCell<MaybeUninit<MmdsMem>>,
}

// SAFETY: the probe is single-threaded with interrupts disabled; the
// memory is only reached through the reference `take` hands out, once.
unsafe impl Sync for MmdsPool {}

/// Not zeroed at boot (`.probe_noinit`, see link.ld): [`MmdsPool::take`]
/// zeroes it.
#[unsafe(link_section = ".probe_noinit.mmds")]
static MMDS_MEM: MmdsPool = MmdsPool {
    mem: UnsafeCell::new(MaybeUninit::uninit()),
};
static MMDS_TAKEN: AtomicBool = AtomicBool::new(false);

impl MmdsPool {
    /// The buffers, zeroed; `None` after the first call.
    fn take(&self) -> Option<&'static mut MmdsMem> {
        if MMDS_TAKEN.swap(true, Ordering::Relaxed) {
            return None;
        }
        let mem = self.mem.get().cast::<MmdsMem>();
        // SAFETY: taken once (above), so nothing else refers to the pool;
        // it is 4096-aligned and a whole number of words long, and zero
        // bytes are a valid `MmdsMem`.
        unsafe {
            virtio_net::zero_words(mem.cast::<u64>(), size_of::<MmdsMem>() / 8);
            Some(&mut *mem)
        }
    }
}

/// Where an exchange is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// No exchange running.
    Idle,
    /// Waiting for the ARP reply.
    Arp,
    /// SYN sent, waiting for the SYN-ACK.
    Connecting,
    /// Request sent (or being sent), waiting for the whole response.
    Waiting,
    /// FIN sent (or due), waiting for the close to complete.
    Closing,
    /// The exchange is over: see `Client::outcome`.
    Done,
}

/// The parsed status line and headers of a response.
#[derive(Clone, Copy, Debug)]
struct Head {
    status: u16,
    /// Bytes of the status line, headers and blank line.
    len: usize,
    content_length: usize,
}

/// The MMDS client: one exchange at a time, over [`Net::poll_client`].
struct Client {
    mem: &'static mut MmdsMem,
    mmds_ip: [u8; 4],
    mtu: u16,
    /// The MMDS MAC, from the first ARP reply.
    mac: Option<[u8; 6]>,
    arp_due: bool,
    /// The connection of the current (or last) exchange.
    conn: Conn,
    /// The connection before it: it still takes its late segments (the
    /// server's RST for our last ACK, a retransmitted FIN).
    old: Conn,
    /// A connection was opened since the last verbose report.
    unreported: bool,
    next_port: u16,
    request_len: usize,
    phase: Phase,
    /// Steps so far, and the step the phase began at.
    now: u64,
    phase_start: u64,
    head: Option<Head>,
    /// Bytes of the response already searched for the end of the headers.
    scanned: usize,
    outcome: Option<Result<(), Error>>,
    token_len: usize,
}

fn rdtsc() -> u64 {
    // SAFETY: RDTSC only reads the time-stamp counter.
    unsafe { core::arch::x86_64::_rdtsc() }
}

impl Client {
    fn new(mem: &'static mut MmdsMem, mmds_ip: [u8; 4], mtu: u16) -> Client {
        let seed = rdtsc();
        Client {
            mem,
            mmds_ip,
            mtu,
            mac: None,
            arp_due: false,
            conn: Conn::closed(),
            old: Conn::closed(),
            unreported: false,
            next_port: EPHEMERAL_FIRST + (seed % u64::from(EPHEMERAL_COUNT)) as u16,
            request_len: 0,
            phase: Phase::Idle,
            now: 0,
            phase_start: 0,
            head: None,
            scanned: 0,
            outcome: None,
            token_len: 0,
        }
    }

    fn set_phase(&mut self, phase: Phase) {
        self.phase = phase;
        self.phase_start = self.now;
    }

    fn finish(&mut self, outcome: Result<(), Error>) {
        if self.outcome.is_none() {
            self.outcome = Some(outcome);
        }
        self.set_phase(Phase::Done);
    }

    /// Starts an exchange of the `request_len` bytes of request written.
    fn begin(&mut self, request_len: usize) {
        self.request_len = request_len;
        self.head = None;
        self.scanned = 0;
        self.outcome = None;
        if self.mac.is_some() {
            self.connect();
        } else {
            self.set_phase(Phase::Arp);
            self.arp_due = true;
        }
    }

    /// Opens the connection from the next ephemeral port.
    fn connect(&mut self) {
        let port = self.next_port;
        // The next one, wrapping within the range.
        self.next_port = EPHEMERAL_FIRST + (port - EPHEMERAL_FIRST + 1) % EPHEMERAL_COUNT;
        self.old = self.conn;
        self.conn = Conn::open(
            port,
            self.mmds_ip,
            HTTP_PORT,
            (rdtsc() >> 4) as u32,
            self.request_len as u32,
            RESPONSE_CAP,
            self.mtu,
        );
        self.unreported = true;
        self.set_phase(Phase::Connecting);
    }

    fn done(&self) -> bool {
        matches!(self.phase, Phase::Done | Phase::Idle)
    }

    /// One step passed: ARP and TCP retransmissions and timeouts.
    fn tick(&mut self) {
        self.now += 1;
        let t = self.now - self.phase_start;
        let every = |steps: u32| t.is_multiple_of(u64::from(steps));
        match self.phase {
            Phase::Idle | Phase::Done => {}
            Phase::Arp => {
                if t >= u64::from(ARP_TIMEOUT_STEPS) {
                    self.finish(Err(Error::ArpTimeout));
                } else if every(ARP_RETRY_STEPS) {
                    self.arp_due = true;
                }
            }
            Phase::Connecting => {
                if t >= u64::from(CONNECT_TIMEOUT_STEPS) {
                    self.conn.abort();
                    self.finish(Err(Error::ConnectTimeout));
                } else if every(RETRANSMIT_STEPS) {
                    self.conn.retransmit();
                }
            }
            Phase::Waiting => {
                if t >= u64::from(RESPONSE_TIMEOUT_STEPS) {
                    self.conn.abort();
                    self.finish(Err(Error::ResponseTimeout));
                } else if every(RETRANSMIT_STEPS) && self.conn.unacknowledged() {
                    self.conn.retransmit();
                }
            }
            Phase::Closing => {
                if self.conn.is_finished() {
                    self.finish(Ok(()));
                } else if t >= u64::from(CLOSE_TIMEOUT_STEPS) {
                    self.conn.abort();
                    self.finish(Ok(()));
                } else if every(RETRANSMIT_STEPS) && self.conn.unacknowledged() {
                    self.conn.retransmit();
                }
            }
        }
    }

    /// After a segment of the current connection: moves the exchange on.
    fn on_segment(&mut self, new_data: bool) {
        match self.phase {
            Phase::Connecting => {
                if self.conn.is_synchronized() {
                    self.set_phase(Phase::Waiting);
                } else if self.conn.is_closed() {
                    self.finish(Err(Error::Reset));
                }
            }
            Phase::Waiting => {
                if self.conn.is_closed() {
                    self.finish(Err(Error::Reset));
                    return;
                }
                if new_data {
                    match self.check_response() {
                        Some(Ok(())) => {
                            self.outcome = Some(Ok(()));
                            self.conn.close();
                            self.set_phase(Phase::Closing);
                            return;
                        }
                        Some(Err(e)) => {
                            self.conn.abort();
                            self.finish(Err(e));
                            return;
                        }
                        None => {}
                    }
                }
                if self.conn.fin_received() {
                    self.outcome = Some(Err(Error::Closed));
                    self.conn.close();
                    self.set_phase(Phase::Closing);
                }
            }
            Phase::Closing => {
                if self.conn.is_finished() {
                    self.finish(Ok(()));
                }
            }
            Phase::Idle | Phase::Arp | Phase::Done => {}
        }
    }

    /// Looks at the response received so far: `Some(Ok)` once it is
    /// whole, `Some(Err)` if it cannot be.
    fn check_response(&mut self) -> Option<Result<(), Error>> {
        let received = self.conn.received().min(RESPONSE_CAP);
        let data = self.mem.response.get(..received)?;
        let head = match self.head {
            Some(head) => head,
            None => {
                let Some(end) = head_end(data, self.scanned) else {
                    self.scanned = received;
                    return (received >= RESPONSE_CAP).then_some(Err(Error::BadResponse));
                };
                let Some(head) = parse_head(data.get(..end)?) else {
                    return Some(Err(Error::BadResponse));
                };
                if head.content_length > RESPONSE_CAP - head.len {
                    return Some(Err(Error::BadResponse));
                }
                self.head = Some(head);
                head
            }
        };
        (received - head.len >= head.content_length).then_some(Ok(()))
    }

    /// The status and body of the whole response of the last exchange.
    fn response(&self) -> Option<(u16, &[u8], &[u8])> {
        let head = self.head?;
        let head_bytes = self.mem.response.get(..head.len)?;
        let body = self
            .mem
            .response
            .get(head.len..head.len + head.content_length)?;
        Some((head.status, head_bytes, body))
    }

    /// The token to send, if one was kept.
    fn token(&self) -> Option<&[u8]> {
        (self.token_len > 0).then(|| self.mem.token.get(..self.token_len).unwrap_or(&[]))
    }

    /// Keeps `body` (the token PUT's) as the token if it fits and is
    /// printable ASCII.
    fn keep_token(&mut self, len: usize) {
        self.token_len = 0;
        let Some((_, head, _)) = self.response() else {
            return;
        };
        let start = head.len();
        let Some(body) = self.mem.response.get(start..start + len) else {
            return;
        };
        if len == 0 || len > TOKEN_CAP || !body.iter().all(|&b| (0x21..0x7f).contains(&b)) {
            return;
        }
        if let Some(dst) = self.mem.token.get_mut(..len) {
            dst.copy_from_slice(body);
            self.token_len = len;
        }
    }

    /// With `probe.verbose`: one line on the connection last opened.
    fn report_conn(&mut self) {
        if !self.unreported {
            return;
        }
        self.unreported = false;
        let c = self.conn.counters();
        outln!(
            "probe.mmds_conn=port={} segments_in={} segments_out={} retransmits={} fin_in={} fin_acked={} rst_in={} rst_out={}",
            self.conn.local_port(),
            c.segments_in,
            c.segments_out,
            c.retransmits,
            u8::from(self.conn.fin_received()),
            u8::from(self.conn.fin_acked()),
            u8::from(c.rst_in),
            u8::from(c.rst_out)
        );
    }
}

impl virtio_net::Client for Client {
    fn arp_reply(&mut self, ip: [u8; 4], mac: [u8; 6]) -> bool {
        if ip != self.mmds_ip {
            return false;
        }
        self.mac = Some(mac);
        if self.phase == Phase::Arp {
            self.arp_due = false;
            self.connect();
        }
        true
    }

    fn tcp(&mut self, segment: &TcpIn<'_>) -> bool {
        if self.conn.owns(segment) {
            let received = self.conn.segment_in(segment, &mut self.mem.response);
            self.on_segment(received.data > 0);
            return true;
        }
        if self.old.owns(segment) {
            self.old.segment_in(segment, &mut []);
            return true;
        }
        false
    }

    fn wants_to_send(&self) -> bool {
        self.arp_due || self.conn.wants_to_send() || self.old.wants_to_send()
    }

    fn next_frame(&mut self, iface: &Iface, ip_id: u16, out: &mut [u8]) -> Option<usize> {
        if self.arp_due {
            let len = netproto::arp_request_unpadded(iface, &self.mmds_ip, out)?;
            self.arp_due = false;
            return Some(len);
        }
        let mac = self.mac?;
        if self.conn.wants_to_send() {
            let request = self.mem.request.get(..self.request_len)?;
            return self.conn.next_segment(iface, mac, ip_id, request, out);
        }
        self.old.next_segment(iface, mac, ip_id, &[], out)
    }
}

/// The end of the status line and headers in `data` (after the blank
/// line): the first `\n\n` or `\n\r\n`. `scanned` bytes were searched
/// before.
fn head_end(data: &[u8], scanned: usize) -> Option<usize> {
    let from = scanned.saturating_sub(2);
    let rest = data.get(from..)?;
    for (i, &b) in rest.iter().enumerate() {
        if b != b'\n' {
            continue;
        }
        match (rest.get(i + 1), rest.get(i + 2)) {
            (Some(b'\n'), _) => return Some(from + i + 2),
            (Some(b'\r'), Some(b'\n')) => return Some(from + i + 3),
            _ => {}
        }
    }
    None
}

/// The lines of `head` (without their `\n` or `\r\n`), up to the blank
/// line.
fn head_lines(head: &[u8]) -> impl Iterator<Item = &[u8]> {
    head.split(|&b| b == b'\n')
        .map(|line| line.strip_suffix(b"\r").unwrap_or(line))
        .take_while(|line| !line.is_empty())
}

/// Parses the status line (`HTTP/<version> <3 digits>[ <reason>]`) and
/// the headers (each `<name>:<value>`, with exactly one `Content-Length`
/// value) of `head`, which ends with the blank line.
fn parse_head(head: &[u8]) -> Option<Head> {
    let mut lines = head_lines(head);
    let status_line = lines.next()?;
    let rest = status_line.strip_prefix(b"HTTP/")?;
    let space = rest.iter().position(|&b| b == b' ')?;
    if space == 0 {
        return None;
    }
    let code = rest.get(space + 1..)?;
    let digits = code.get(..3)?;
    if !digits.iter().all(u8::is_ascii_digit) || !matches!(code.get(3), None | Some(b' ')) {
        return None;
    }
    let status = digits
        .iter()
        .fold(0u16, |n, &d| n * 10 + u16::from(d - b'0'));
    let mut content_length = None;
    for line in lines {
        let colon = line.iter().position(|&b| b == b':')?;
        if colon == 0 {
            return None;
        }
        let (name, value) = (line.get(..colon)?, line.get(colon + 1..)?);
        if !name.eq_ignore_ascii_case(b"content-length") {
            continue;
        }
        let value = value.trim_ascii();
        if value.is_empty() || value.len() > 9 || !value.iter().all(u8::is_ascii_digit) {
            return None;
        }
        let n = value
            .iter()
            .fold(0usize, |n, &d| n * 10 + usize::from(d - b'0'));
        if content_length.is_some_and(|c| c != n) {
            return None;
        }
        content_length = Some(n);
    }
    Some(Head {
        status,
        len: head.len(),
        content_length: content_length?,
    })
}

/// Writes bytes into a buffer; `None` once it would overflow.
struct Writer<'a> {
    buf: &'a mut [u8],
    len: usize,
}

impl Writer<'_> {
    fn put(&mut self, bytes: &[u8]) -> Option<()> {
        let end = self.len.checked_add(bytes.len())?;
        self.buf.get_mut(self.len..end)?.copy_from_slice(bytes);
        self.len = end;
        Some(())
    }

    fn put_ip(&mut self, ip: [u8; 4]) -> Option<()> {
        for (i, part) in ip.iter().enumerate() {
            if i > 0 {
                self.put(b".")?;
            }
            let mut digits = [0u8; 3];
            let mut n = *part;
            let mut at = digits.len();
            loop {
                at -= 1;
                digits[at] = b'0' + n % 10;
                n /= 10;
                if n == 0 {
                    break;
                }
            }
            self.put(digits.get(at..)?)?;
        }
        Some(())
    }
}

/// The request of an exchange.
enum Request<'a> {
    /// `PUT /latest/api/token` with this TTL.
    Token(&'a [u8]),
    /// `GET <path>` with the options' `Accept` and the token kept.
    Get,
}

/// Writes `request` into the client's request buffer; its length.
fn write_request(
    client: &mut Client,
    options: &Options<'_>,
    request: &Request<'_>,
) -> Option<usize> {
    let mut token = [0u8; TOKEN_CAP];
    let token = match client.token() {
        Some(t) => {
            let dst = token.get_mut(..t.len())?;
            dst.copy_from_slice(t);
            Some(&*dst)
        }
        None => None,
    };
    let mut w = Writer {
        buf: &mut client.mem.request,
        len: 0,
    };
    match request {
        Request::Token(_) => w.put(b"PUT /latest/api/token")?,
        Request::Get => {
            w.put(b"GET ")?;
            w.put(options.path)?;
        }
    }
    w.put(b" HTTP/1.1\r\nHost: ")?;
    w.put_ip(options.ip)?;
    w.put(b"\r\n")?;
    match request {
        Request::Token(ttl) => {
            w.put(b"X-metadata-token-ttl-seconds: ")?;
            w.put(ttl)?;
            w.put(b"\r\n")?;
        }
        Request::Get => {
            if let Some(accept) = options.accept {
                w.put(b"Accept: ")?;
                w.put(accept.as_bytes())?;
                w.put(b"\r\n")?;
            }
            if let Some(token) = token {
                w.put(b"X-metadata-token: ")?;
                w.put(token)?;
                w.put(b"\r\n")?;
            }
        }
    }
    w.put(b"\r\n")?;
    Some(w.len)
}

/// A response body on one line: `\` as `\\`, LF as `\n`, CR as `\r`, other
/// control and non-ASCII bytes as `?`.
struct Escaped<'a>(&'a [u8]);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut plain = 0;
        for (i, &b) in self.0.iter().enumerate() {
            let escape = match b {
                b'\\' => "\\\\",
                b'\n' => "\\n",
                b'\r' => "\\r",
                0x20..0x7f => continue,
                _ => "?",
            };
            let run = self.0.get(plain..i).unwrap_or(&[]);
            f.write_str(core::str::from_utf8(run).map_err(|_| fmt::Error)?)?;
            f.write_str(escape)?;
            plain = i + 1;
        }
        let run = self.0.get(plain..).unwrap_or(&[]);
        f.write_str(core::str::from_utf8(run).map_err(|_| fmt::Error)?)
    }
}

/// Runs one exchange to its end, serving the device meanwhile.
fn exchange(net: &mut Net, client: &mut Client, clock: &mut StepClock, request_len: usize) {
    client.begin(request_len);
    net.poll_client(client);
    while !client.done() {
        clock.step(|| net.poll_client(&mut *client));
        client.tick();
    }
    // A RST of an abort goes out now.
    net.poll_client(client);
}

/// Waits until step `until` (at least one step), serving the device.
fn wait_until(net: &mut Net, client: &mut Client, clock: &mut StepClock, until: u64) {
    loop {
        clock.step(|| net.poll_client(&mut *client));
        client.tick();
        if client.now >= until {
            break;
        }
    }
}

/// `probe.mmds`: the token PUT if asked, then the GETs (see the module
/// documentation). `net` is `None` if no network device is served: then
/// `probe.mmds_error=no-net`.
pub fn run(options: &Options<'_>, net: Option<&mut Net>, verbose: bool) {
    let Some(net) = net else {
        outln!("probe.mmds_error=no-net");
        return;
    };
    let Some(mem) = MMDS_MEM.take() else {
        return;
    };
    let mut client = Client::new(mem, options.ip, net.mtu());
    let mut clock = StepClock::new();

    if let Some(ttl) = options.token_ttl {
        match write_request(&mut client, options, &Request::Token(ttl)) {
            Some(len) => {
                exchange(net, &mut client, &mut clock, len);
                match (client.outcome, client.response()) {
                    (Some(Ok(())), Some((status, _, body))) => {
                        let len = body.len();
                        outln!("probe.mmds_token={} len={}", status, len);
                        if status == 200 {
                            client.keep_token(len);
                        }
                    }
                    (Some(Err(e)), _) => outln!("probe.mmds_token=error {}", e.name()),
                    _ => outln!("probe.mmds_token=error {}", Error::BadResponse.name()),
                }
            }
            None => outln!("probe.mmds_token=error request-too-long"),
        }
    }

    let every_steps = u64::from(options.every_ms.div_ceil(virtio_net::STEP_MS));
    let mut next_start = client.now;
    for rep in 0..options.repeat {
        if rep > 0 || options.token_ttl.is_some() {
            if verbose {
                client.report_conn();
            }
            if client.now < next_start {
                wait_until(net, &mut client, &mut clock, next_start);
            }
        }
        next_start = client.now + every_steps;
        let Some(len) = write_request(&mut client, options, &Request::Get) else {
            outln!("probe.mmds=error request-too-long");
            continue;
        };
        exchange(net, &mut client, &mut clock, len);
        match (client.outcome, client.response()) {
            (Some(Ok(())), Some((status, head, body))) => {
                for line in head_lines(head).skip(1) {
                    outln!("probe.mmds_header={}", Bytes(line));
                }
                outln!("probe.mmds={} {}", status, Escaped(body));
            }
            (Some(Err(e)), _) => outln!("probe.mmds=error {}", e.name()),
            _ => outln!("probe.mmds=error {}", Error::BadResponse.name()),
        }
    }
    // One more step for the last connection's late segments (the server's
    // RST for our last ACK).
    let until = client.now + 1;
    wait_until(net, &mut client, &mut clock, until);
    if verbose {
        client.report_conn();
    }
}
