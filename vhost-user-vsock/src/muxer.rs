//! Firecracker's hybrid vsock, host side: the Unix socket at `uds_path`
//! where host processes connect and ask for a guest port (`CONNECT
//! <port>\n`, answered `OK <host port>\n`), the connections the guest
//! opens to `<uds_path>_<port>`, and the packets each owes the guest. One
//! epoll set holds every host socket; the worker thread watches its fd.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use backend_stats::{Stats, VsockCounter};
use nix::sys::socket::{self, AddressFamily, SockFlag, SockType, UnixAddr};
use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};
use vhost_user_common::guest_log;
use vhost_user_common::ratelimit::{self, RateLimit};
use vm_memory::bitmap::BitmapSlice;
use vm_memory::VolatileSlice;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use crate::connection::{ConnKey, Connection, HostRead, State};
use crate::packet::{op, Header, HOST_CID, TYPE_STREAM};

/// How long a host client may take to send its `CONNECT` line.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the guest may take to answer a host's connection request,
/// and to answer with a RST after the host closed (Firecracker's 2 s).
pub const GUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// The longest `CONNECT` line taken (`CONNECT 4294967295\n` is 19 bytes).
const MAX_LINE: usize = 32;
/// Resets for packets that belong to no connection, waiting for RX
/// buffers; more are dropped (the guest's own timeouts cover them).
const MAX_STRAY_RESETS: usize = 1024;
/// Epoll events taken per call; the rest wait for the next one.
const EVENTS_PER_CALL: usize = 256;
/// Where host-initiated connections' ports start (Firecracker's range).
const FIRST_LOCAL_PORT: u32 = 1 << 30;

const LISTENER_TOKEN: u64 = 0;
const TIMER_TOKEN: u64 = 1;

/// Guest packets refused, logged at debug level.
static REFUSED: RateLimit = RateLimit::new(ratelimit::BURST, ratelimit::INTERVAL);
/// Host connections refused.
static HOST: RateLimit = RateLimit::new(ratelimit::BURST, ratelimit::INTERVAL);

/// Settings of the host side.
#[derive(Debug, Clone)]
pub struct MuxerConfig {
    pub guest_cid: u64,
    /// Where guest-initiated connections go: `<uds_path>_<port>`.
    pub uds_path: PathBuf,
    /// Connections (and host clients still sending `CONNECT`) at once.
    pub max_connections: usize,
    /// The counters the VMM's metrics report.
    pub stats: Stats<VsockCounter>,
}

/// Errors setting up the host side.
#[derive(Debug, thiserror::Error)]
pub enum MuxerError {
    #[error("cannot set up the event set: {0}")]
    Epoll(io::Error),
    #[error("cannot set up the timer: {0}")]
    Timer(nix::Error),
    #[error("cannot watch the listening socket: {0}")]
    Listener(io::Error),
}

/// A host client that has not finished its `CONNECT` line.
#[derive(Debug)]
struct Handshake {
    stream: UnixStream,
    line: Vec<u8>,
    deadline: Instant,
}

/// What a `CONNECT` line read so far says.
#[derive(Debug, PartialEq, Eq)]
enum Line {
    Incomplete,
    Connect(u32),
    Bad,
}

/// Parses a whole `CONNECT <port>` line as Firecracker does: the word in
/// any case, then the port in decimal.
fn parse_connect(line: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(line).ok()?;
    let mut words = text.split_whitespace();
    match (words.next(), words.next()) {
        (Some(word), Some(port)) if word.eq_ignore_ascii_case("connect") => port.parse().ok(),
        _ => None,
    }
}

/// Who an epoll token belongs to.
#[derive(Debug, Clone, Copy)]
enum Owner {
    Handshake,
    Connection(ConnKey),
}

/// The host side of one vsock device.
pub struct Muxer {
    config: MuxerConfig,
    listener: UnixListener,
    epoll: Epoll,
    timer: TimerFd,
    timer_armed: bool,
    conns: HashMap<ConnKey, Connection>,
    /// Each connection's epoll token.
    tokens: HashMap<ConnKey, u64>,
    owners: HashMap<u64, Owner>,
    handshakes: HashMap<u64, Handshake>,
    next_token: u64,
    next_local_port: u32,
    /// Connections with a packet for the guest, in turn.
    rx_ready: VecDeque<ConnKey>,
    stray_resets: VecDeque<Header>,
    /// What one `epoll_wait` of the host side returns, kept between calls.
    events: Vec<EpollEvent>,
}

impl Muxer {
    /// The counters the VMM's metrics report.
    pub fn stats(&self) -> &Stats<VsockCounter> {
        &self.config.stats
    }

    /// Serves `listener` (bound at `config.uds_path`).
    pub fn new(config: MuxerConfig, listener: UnixListener) -> Result<Self, MuxerError> {
        listener
            .set_nonblocking(true)
            .map_err(MuxerError::Listener)?;
        let epoll = Epoll::new().map_err(MuxerError::Epoll)?;
        let timer = TimerFd::new(
            ClockId::CLOCK_MONOTONIC,
            TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC,
        )
        .map_err(MuxerError::Timer)?;
        epoll
            .ctl(
                ControlOperation::Add,
                listener.as_raw_fd(),
                EpollEvent::new(EventSet::IN, LISTENER_TOKEN),
            )
            .map_err(MuxerError::Listener)?;
        epoll
            .ctl(
                ControlOperation::Add,
                timer.as_fd().as_raw_fd(),
                EpollEvent::new(EventSet::IN, TIMER_TOKEN),
            )
            .map_err(MuxerError::Listener)?;
        Ok(Self {
            config,
            listener,
            epoll,
            timer,
            timer_armed: false,
            conns: HashMap::new(),
            tokens: HashMap::new(),
            owners: HashMap::new(),
            handshakes: HashMap::new(),
            next_token: TIMER_TOKEN + 1,
            next_local_port: FIRST_LOCAL_PORT,
            rx_ready: VecDeque::new(),
            stray_resets: VecDeque::new(),
            events: vec![EpollEvent::default(); EVENTS_PER_CALL],
        })
    }

    /// The fd the worker watches: readable when a host socket has news.
    pub fn epoll_fd(&self) -> i32 {
        self.epoll.as_raw_fd()
    }

    pub fn guest_cid(&self) -> u64 {
        self.config.guest_cid
    }

    /// Open connections.
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// Whether a packet for the guest is due.
    pub fn has_rx_work(&self) -> bool {
        !self.stray_resets.is_empty() || !self.rx_ready.is_empty()
    }

    /// The guest reset its device: every connection ends (the guest
    /// forgot them); host clients still sending `CONNECT` stay.
    pub fn reset(&mut self) {
        let keys: Vec<ConnKey> = self.conns.keys().copied().collect();
        for key in keys {
            self.remove(key);
        }
        self.rx_ready.clear();
        self.stray_resets.clear();
    }

    /// Handles one packet the guest sent (`data`: an RW packet's payload).
    pub fn on_guest_packet<B: BitmapSlice>(
        &mut self,
        hdr: &Header,
        data: Option<&VolatileSlice<B>>,
    ) {
        if hdr.src_cid != self.config.guest_cid || hdr.dst_cid != HOST_CID {
            self.config.stats.inc(VsockCounter::DroppedPackets);
            guest_log!(
                &REFUSED,
                log::Level::Debug,
                "packet from CID {} to CID {} dropped: the guest is CID {}",
                hdr.src_cid,
                hdr.dst_cid,
                self.config.guest_cid
            );
            return;
        }
        if hdr.type_ != TYPE_STREAM {
            if hdr.op != op::RST {
                self.stray_reset(hdr);
            }
            return;
        }
        let key = ConnKey {
            local_port: hdr.dst_port,
            peer_port: hdr.src_port,
        };
        let Some(conn) = self.conns.get_mut(&key) else {
            match hdr.op {
                op::REQUEST => self.connect_to_host(hdr),
                op::RST => {}
                _ => self.stray_reset(hdr),
            }
            return;
        };
        if hdr.op == op::RST {
            self.remove(key);
            return;
        }
        if hdr.op == op::RW {
            self.config
                .stats
                .add(VsockCounter::TxBytesCount, u64::from(hdr.len));
        }
        if let Err(violation) = conn.on_guest_packet(hdr, data) {
            guest_log!(
                &REFUSED,
                log::Level::Debug,
                "connection {}:{} reset: the guest {violation}",
                key.peer_port,
                key.local_port
            );
            conn.kill();
        }
        self.refresh(key);
    }

    /// Fills one RX packet for the guest: its header and, for data, its
    /// payload. Returns the payload's length, or `None` with nothing due.
    pub fn fill_rx(
        &mut self,
        header: &mut Header,
        data: Option<&VolatileSlice<impl BitmapSlice>>,
    ) -> Option<u32> {
        if let Some(reset) = self.stray_resets.pop_front() {
            self.config.stats.inc(VsockCounter::ConnsKilled);
            *header = reset;
            return Some(0);
        }
        while let Some(key) = self.rx_ready.pop_front() {
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            conn.queued = false;
            let next = self.next_packet_of(key, data);
            self.refresh(key);
            if let Some(next) = next {
                if next.op == op::RST {
                    self.config.stats.inc(VsockCounter::ConnsKilled);
                    self.remove(key);
                }
                *header = next;
                return Some(next.len);
            }
        }
        None
    }

    fn next_packet_of(
        &mut self,
        key: ConnKey,
        data: Option<&VolatileSlice<impl BitmapSlice>>,
    ) -> Option<Header> {
        let conn = self.conns.get_mut(&key)?;
        if let Some(code) = conn.take_control() {
            return Some(conn.header(code, 0));
        }
        let mut data = data?.clone();
        match conn.read_host(&mut data) {
            HostRead::Data(n) => {
                self.config
                    .stats
                    .add(VsockCounter::RxBytesCount, u64::from(n));
                if conn.peer_credit() == 0 && conn.host_readable {
                    self.config.stats.inc(VsockCounter::CreditStalls);
                }
                Some(conn.header(op::RW, n))
            }
            HostRead::Eof => {
                conn.host_closed(Instant::now() + GUEST_TIMEOUT);
                let code = conn.take_control()?;
                Some(conn.header(code, 0))
            }
            HostRead::Nothing => {
                let code = conn.take_control()?;
                Some(conn.header(code, 0))
            }
        }
    }

    /// Handles what the host sockets have to say: new clients, `CONNECT`
    /// lines, bytes to send or room to write, timeouts. Takes at most
    /// [`EVENTS_PER_CALL`] events; the epoll fd stays readable for more.
    pub fn on_host_events(&mut self) -> io::Result<()> {
        let mut events = std::mem::take(&mut self.events);
        let waited = self.epoll.wait(0, &mut events);
        for event in &events[..*waited.as_ref().unwrap_or(&0)] {
            let set = EventSet::from_bits_truncate(event.events());
            match event.data() {
                LISTENER_TOKEN => self.accept_clients(),
                TIMER_TOKEN => self.expire(),
                token => match self.owners.get(&token).copied() {
                    Some(Owner::Handshake) => self.read_connect_line(token),
                    Some(Owner::Connection(key)) => self.on_connection_event(key, set),
                    None => {}
                },
            }
        }
        self.events = events;
        waited.map(drop)
    }

    fn accept_clients(&mut self) {
        for _ in 0..EVENTS_PER_CALL {
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => return,
                Err(err) => {
                    guest_log!(
                        &HOST,
                        log::Level::Warn,
                        "cannot accept a host client: {err}"
                    );
                    return;
                }
            };
            if self.conns.len() + self.handshakes.len() >= self.config.max_connections {
                self.config.stats.inc(VsockCounter::RefusedHostClients);
                guest_log!(
                    &HOST,
                    log::Level::Warn,
                    "host client refused: {} connections already",
                    self.config.max_connections
                );
                continue;
            }
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            let token = self.new_token();
            if self.watch(&stream, token, EventSet::IN).is_err() {
                continue;
            }
            self.owners.insert(token, Owner::Handshake);
            self.handshakes.insert(
                token,
                Handshake {
                    stream,
                    line: Vec::new(),
                    deadline: Instant::now() + HANDSHAKE_TIMEOUT,
                },
            );
            self.arm_timer();
        }
    }

    /// Reads the client's line a byte at a time, so that bytes after it
    /// stay in the socket for the guest.
    fn read_connect_line(&mut self, token: u64) {
        let Some(handshake) = self.handshakes.get_mut(&token) else {
            return;
        };
        let line = loop {
            let mut byte = [0u8];
            match handshake.stream.read(&mut byte) {
                Ok(0) => break Line::Bad,
                Ok(_) if byte[0] == b'\n' => {
                    break parse_connect(&handshake.line).map_or(Line::Bad, Line::Connect)
                }
                Ok(_) if handshake.line.len() + 1 >= MAX_LINE => break Line::Bad,
                Ok(_) => handshake.line.push(byte[0]),
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => break Line::Incomplete,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break Line::Bad,
            }
        };
        match line {
            Line::Incomplete => {}
            Line::Bad => {
                self.config.stats.inc(VsockCounter::RefusedHostClients);
                guest_log!(
                    &HOST,
                    log::Level::Debug,
                    "host client dropped: no valid CONNECT line"
                );
                self.drop_handshake(token);
            }
            Line::Connect(port) => {
                if let Some(handshake) = self.drop_handshake(token) {
                    self.connect_to_guest(handshake.stream, port);
                }
            }
        }
    }

    fn drop_handshake(&mut self, token: u64) -> Option<Handshake> {
        let handshake = self.handshakes.remove(&token)?;
        self.owners.remove(&token);
        let _ = self.unwatch(&handshake.stream);
        Some(handshake)
    }

    /// A host client asked for guest port `port`: a REQUEST goes to the
    /// guest, and the client hears `OK` when the guest accepts.
    fn connect_to_guest(&mut self, stream: UnixStream, port: u32) {
        let Some(local_port) = self.free_local_port(port) else {
            return;
        };
        let key = ConnKey {
            local_port,
            peer_port: port,
        };
        let mut conn = Connection::host_initiated(key, stream, self.config.guest_cid);
        conn.deadline = Some(Instant::now() + GUEST_TIMEOUT);
        self.config.stats.inc(VsockCounter::HostConnsAdded);
        self.add(conn);
        self.arm_timer();
    }

    fn free_local_port(&mut self, peer_port: u32) -> Option<u32> {
        for _ in 0..=self.conns.len() {
            let port = self.next_local_port;
            self.next_local_port = port.checked_add(1).unwrap_or(FIRST_LOCAL_PORT);
            let key = ConnKey {
                local_port: port,
                peer_port,
            };
            if !self.conns.contains_key(&key) {
                return Some(port);
            }
        }
        None
    }

    /// The guest asked for host port `hdr.dst_port`: a connection to
    /// `<uds_path>_<port>`, or a reset if nothing listens there.
    fn connect_to_host(&mut self, hdr: &Header) {
        if self.conns.len() + self.handshakes.len() >= self.config.max_connections {
            self.stray_reset(hdr);
            return;
        }
        let path = format!("{}_{}", self.config.uds_path.display(), hdr.dst_port);
        match connect_nonblocking(&path) {
            Ok(stream) => {
                self.config.stats.inc(VsockCounter::GuestConnsAdded);
                self.add(Connection::guest_initiated(hdr, stream));
            }
            Err(err) => {
                guest_log!(
                    &REFUSED,
                    log::Level::Debug,
                    "guest connection to port {} refused: {path}: {err}",
                    hdr.dst_port
                );
                self.stray_reset(hdr);
            }
        }
    }

    fn on_connection_event(&mut self, key: ConnKey, set: EventSet) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if set.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR) {
            // Read once the connection is established (bytes a client sent
            // before its OK wait in the socket).
            conn.host_readable = true;
        }
        if conn.state == State::Connecting && set.intersects(EventSet::HANG_UP | EventSet::ERROR) {
            // The client left before the guest answered.
            conn.kill();
        }
        if set.contains(EventSet::OUT) {
            conn.flush_to_host();
        }
        self.refresh(key);
    }

    /// Gives up handshakes and connections whose time is over.
    fn expire(&mut self) {
        let _ = self.timer.wait();
        let now = Instant::now();
        let late: Vec<u64> = self
            .handshakes
            .iter()
            .filter(|(_, h)| h.deadline <= now)
            .map(|(token, _)| *token)
            .collect();
        for token in late {
            self.config.stats.inc(VsockCounter::RefusedHostClients);
            self.drop_handshake(token);
        }
        let late: Vec<ConnKey> = self
            .conns
            .values()
            .filter(|c| c.deadline.is_some_and(|d| d <= now) && c.state != State::Killed)
            .map(|c| c.key)
            .collect();
        for key in late {
            if let Some(conn) = self.conns.get_mut(&key) {
                conn.deadline = None;
                conn.kill();
            }
            self.refresh(key);
        }
        let waiting =
            !self.handshakes.is_empty() || self.conns.values().any(|c| c.deadline.is_some());
        if !waiting {
            let _ = self.timer.unset();
            self.timer_armed = false;
        }
    }

    fn arm_timer(&mut self) {
        if self.timer_armed {
            return;
        }
        let tick = TimeSpec::from_duration(Duration::from_millis(250));
        let every = Expiration::Interval(tick);
        if self.timer.set(every, TimerSetTimeFlags::empty()).is_ok() {
            self.timer_armed = true;
        }
    }

    fn stray_reset(&mut self, hdr: &Header) {
        if self.stray_resets.len() < MAX_STRAY_RESETS {
            self.stray_resets.push_back(hdr.reset_for());
        }
    }

    fn new_token(&mut self) -> u64 {
        let token = self.next_token;
        self.next_token += 1;
        token
    }

    /// Takes `conn` in, its host socket watched edge-triggered for the
    /// whole of its life: a new byte (or room to write, or the end) is
    /// one event, and the connection remembers what it has not drained,
    /// so no epoll call is needed as its state changes.
    fn add(&mut self, mut conn: Connection) {
        let key = conn.key;
        let token = self.new_token();
        let events = EventSet::IN | EventSet::OUT | EventSet::EDGE_TRIGGERED;
        if self.watch(&conn.stream, token, events).is_err() {
            conn.kill();
        }
        self.tokens.insert(key, token);
        self.owners.insert(token, Owner::Connection(key));
        self.conns.insert(key, conn);
        self.refresh(key);
    }

    /// Drops a connection (closing its host socket takes it out of the
    /// epoll set).
    fn remove(&mut self, key: ConnKey) {
        self.conns.remove(&key);
        if let Some(token) = self.tokens.remove(&key) {
            self.owners.remove(&token);
        }
    }

    /// After anything happened to a connection: its turn for the guest
    /// taken if a packet is due, its deadline watched.
    fn refresh(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if conn.has_rx_work() && !conn.queued {
            conn.queued = true;
            self.rx_ready.push_back(key);
        }
        if conn.deadline.is_some() {
            self.arm_timer();
        }
    }

    fn watch(&self, stream: &UnixStream, token: u64, events: EventSet) -> io::Result<()> {
        self.epoll.ctl(
            ControlOperation::Add,
            stream.as_raw_fd(),
            EpollEvent::new(events, token),
        )
    }

    fn unwatch(&self, stream: &UnixStream) -> io::Result<()> {
        self.epoll.ctl(
            ControlOperation::Delete,
            stream.as_raw_fd(),
            EpollEvent::default(),
        )
    }
}

/// Connects to a host listener without waiting: a full backlog is a
/// refusal (the guest gets a reset), never a blocked worker.
fn connect_nonblocking(path: &str) -> io::Result<UnixStream> {
    let fd: OwnedFd = socket::socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let addr = UnixAddr::new(path)?;
    socket::connect(fd.as_raw_fd(), &addr)?;
    Ok(UnixStream::from(fd))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A guest packet to the host from guest port `src_port`.
    fn from_guest(op: u16, src_port: u32, dst_port: u32, len: u32) -> Header {
        Header {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            len,
            type_: TYPE_STREAM,
            op,
            buf_alloc: 64 * 1024,
            ..Header::default()
        }
    }

    /// Drains what the muxer owes the guest, each packet with up to 4 KiB
    /// of payload: (header, payload).
    fn drain_rx(muxer: &mut Muxer) -> Vec<(Header, Vec<u8>)> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 4096];
        loop {
            let mut header = Header::default();
            let slice = VolatileSlice::from(&mut buf[..]);
            let Some(len) = muxer.fill_rx(&mut header, Some(&slice)) else {
                return out;
            };
            out.push((header, buf[..len as usize].to_vec()));
        }
    }

    #[test]
    fn a_thousand_host_connections_at_once() {
        const CLIENTS: usize = 1000;
        let dir = std::env::temp_dir().join(format!("tessera-muxer-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("v.sock");
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        let config = MuxerConfig {
            guest_cid: 3,
            uds_path: path.clone(),
            max_connections: 4096,
            stats: Stats::private(),
        };
        let mut muxer = Muxer::new(config, listener).unwrap();
        let mut clients: Vec<UnixStream> = (0..CLIENTS)
            .map(|_| {
                let mut client = UnixStream::connect(&path).unwrap();
                client.write_all(b"CONNECT 52\n").unwrap();
                client
            })
            .collect();
        // Every line read, a REQUEST owed to the guest per client.
        let mut requests = Vec::new();
        for _ in 0..10_000 {
            if requests.len() >= CLIENTS {
                break;
            }
            muxer.on_host_events().unwrap();
            requests.extend(drain_rx(&mut muxer));
        }
        assert_eq!(requests.len(), CLIENTS, "REQUESTs owed to the guest");
        assert!(requests
            .iter()
            .all(|(h, _)| h.op == op::REQUEST && h.dst_port == 52));
        let mut ports: Vec<u32> = requests.iter().map(|(h, _)| h.src_port).collect();
        ports.sort_unstable();
        ports.dedup();
        assert_eq!(
            ports.len(),
            CLIENTS,
            "each connection has its own host port"
        );
        assert_eq!(muxer.connections(), CLIENTS);
        assert_eq!(
            muxer.stats().get(VsockCounter::HostConnsAdded),
            CLIENTS as u64
        );
        // The guest accepts them all; each client hears OK and sends.
        for (h, _) in &requests {
            let response = from_guest(op::RESPONSE, 52, h.src_port, 0);
            muxer.on_guest_packet::<()>(&response, None);
        }
        for (i, client) in clients.iter_mut().enumerate() {
            let mut ok = [0u8; 3];
            std::io::Read::read_exact(client, &mut ok).unwrap();
            assert_eq!(&ok, b"OK ");
            let mut line = Vec::new();
            let mut byte = [0u8];
            while std::io::Read::read(client, &mut byte).unwrap() == 1 && byte[0] != b'\n' {
                line.push(byte[0]);
            }
            client.write_all(format!("client {i}").as_bytes()).unwrap();
        }
        // Every client's bytes reach the guest on its own connection.
        let mut got = std::collections::HashMap::new();
        for _ in 0..10_000 {
            if got.len() >= CLIENTS {
                break;
            }
            muxer.on_host_events().unwrap();
            for (h, data) in drain_rx(&mut muxer) {
                assert_eq!(h.op, op::RW);
                got.entry(h.src_port).or_insert_with(Vec::new).extend(data);
            }
        }
        assert_eq!(got.len(), CLIENTS, "connections that carried bytes");
        let mut texts: Vec<String> = got
            .values()
            .map(|d| String::from_utf8(d.clone()).unwrap())
            .collect();
        texts.sort();
        let mut want: Vec<String> = (0..CLIENTS).map(|i| format!("client {i}")).collect();
        want.sort();
        assert_eq!(texts, want);
        drop(clients);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn connect_lines_are_read_as_firecracker_reads_them() {
        assert_eq!(parse_connect(b"CONNECT 52"), Some(52));
        assert_eq!(parse_connect(b"connect 4294967295"), Some(u32::MAX));
        assert_eq!(parse_connect(b"  Connect   7 "), Some(7));
        assert_eq!(parse_connect(b"CONNECT 4294967296"), None);
        assert_eq!(parse_connect(b"CONNECT -1"), None);
        assert_eq!(parse_connect(b"CONNECT"), None);
        assert_eq!(parse_connect(b"LISTEN 52"), None);
        assert_eq!(parse_connect(&[0xff, 0xfe]), None);
    }
}
