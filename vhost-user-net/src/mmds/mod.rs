//! MMDS on the guest's side of an interface: frames the guest sends to the
//! MMDS address (ARP for it, IPv4 to it) are taken here and never reach
//! the TAP; the answers (ARP replies, TCP segments with HTTP) go to the
//! guest ahead of the TAP's frames. The VMM sends the settings and the
//! store over the control channel; the store is read-only here.
//!
//! One [`Mmds`] per backend, shared by its queue pairs behind a lock that
//! only MMDS frames take (a frame's first bytes are checked against an
//! atomic copy of the address).

mod http;
mod store;
mod tcp;
mod token;
mod wire;

use std::io;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Mutex;

use backend_stats::{NetCounter, Stats};
use tessera_backend_control::{ControlMessage, MmdsSettings};
use vhost_user_common::guest_log;
use vhost_user_common::ratelimit::{self, RateLimit};

use store::Store;
use tcp::Stack;
use token::Tokens;
use wire::{ArpRequest, Incoming};

pub use wire::is_for_mmds;

/// Guest frames MMDS could not use, logged at debug level: the guest
/// controls how many.
static DROPPED: RateLimit = RateLimit::new(ratelimit::BURST, ratelimit::INTERVAL);

/// The first bytes of a frame that tell whether it is for MMDS.
pub const PEEK_LEN: usize = 42;

struct Service {
    settings: MmdsSettings,
    tokens: Tokens,
    stack: Stack,
    arp_request: Option<ArpRequest>,
    /// Where answers go: the source of the last frame taken.
    guest_mac: [u8; 6],
    counted: tcp::Events,
}

#[derive(Default)]
struct Inner {
    store: Store,
    service: Option<Service>,
}

/// An interface's MMDS.
pub struct Mmds {
    /// The address as a big-endian u32; 0 while MMDS is off.
    address: AtomicU32,
    /// Frames are waiting for the guest.
    pending: AtomicBool,
    inner: Mutex<Inner>,
    stats: Stats<NetCounter>,
}

impl Mmds {
    pub fn new(stats: Stats<NetCounter>) -> Self {
        Self {
            address: AtomicU32::new(0),
            pending: AtomicBool::new(false),
            inner: Mutex::default(),
            stats,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The VMM's MMDS messages: the settings, or a piece of the store.
    pub fn control(&self, message: ControlMessage) -> io::Result<()> {
        let mut inner = self.lock();
        match message {
            ControlMessage::MmdsConfig(settings) => {
                log::info!("MMDS: {settings:?}");
                let ip = settings.ipv4_address;
                inner.service = Some(Service {
                    tokens: Tokens::new(&settings.token_key, &settings.instance_id),
                    settings,
                    stack: Stack::default(),
                    arp_request: None,
                    guest_mac: [0; 6],
                    counted: tcp::Events::default(),
                });
                self.address.store(u32::from(ip), Ordering::Release);
                Ok(())
            }
            ControlMessage::MmdsData(piece) => {
                let generation = piece.generation;
                match inner.store.piece(piece) {
                    Ok(true) => log::info!("MMDS: store generation {generation} in force"),
                    Ok(false) => {}
                    Err(err) => {
                        return Err(io::Error::new(io::ErrorKind::InvalidInput, err));
                    }
                }
                Ok(())
            }
            other => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("not an MMDS message: {other:?}"),
            )),
        }
    }

    /// The address MMDS answers on, if it is on.
    pub fn address(&self) -> Option<Ipv4Addr> {
        match self.address.load(Ordering::Acquire) {
            0 => None,
            ip => Some(Ipv4Addr::from(ip)),
        }
    }

    /// Takes a guest frame (from its Ethernet header on) that
    /// [`is_for_mmds`] picked.
    pub fn receive(&self, frame: &[u8]) {
        self.stats.inc(NetCounter::MmdsRxAccepted);
        let mut inner = self.lock();
        let Inner { store, service } = &mut *inner;
        let Some(service) = service else {
            return;
        };
        match wire::parse(frame) {
            Ok(Incoming::Arp(request)) => {
                service.guest_mac = request.sender_mac;
                service.arp_request = Some(request);
            }
            Ok(Incoming::Tcp(segment)) if segment.dst_port != wire::MMDS_PORT => {
                self.stats.inc(NetCounter::MmdsRxAcceptedErr);
            }
            Ok(Incoming::Tcp(segment)) => {
                service.guest_mac = segment.src_mac;
                let ctx = http::Context {
                    version: service.settings.version,
                    imds_compat: service.settings.imds_compat,
                    store,
                    tokens: &service.tokens,
                };
                service.stack.segment(&segment, |request| {
                    let (response, outcome) = http::respond(request, &ctx);
                    (response.to_bytes(), outcome)
                });
                self.count(service);
            }
            Err(wire::WireError::NotTcp(_)) => self.stats.inc(NetCounter::MmdsRxAcceptedUnusual),
            Err(err) => {
                guest_log!(&DROPPED, log::Level::Debug, "MMDS: frame dropped: {err}");
                self.stats.inc(NetCounter::MmdsRxAcceptedErr);
            }
        }
        self.pending.store(
            service.arp_request.is_some() || service.stack.has_output(),
            Ordering::Release,
        );
    }

    /// Adds what the stack counted since the last call to the counters.
    fn count(&self, service: &mut Service) {
        let now = service.stack.events;
        let was = std::mem::replace(&mut service.counted, now);
        for (counter, now, was) in [
            (NetCounter::MmdsConnectionsCreated, now.created, was.created),
            (
                NetCounter::MmdsConnectionsDestroyed,
                now.destroyed,
                was.destroyed,
            ),
            (NetCounter::MmdsRxCount, now.requests, was.requests),
            (NetCounter::MmdsTxCount, now.requests, was.requests),
            (NetCounter::MmdsRxNoToken, now.no_token, was.no_token),
            (
                NetCounter::MmdsRxInvalidToken,
                now.invalid_token,
                was.invalid_token,
            ),
        ] {
            self.stats.add(counter, now - was);
        }
    }

    /// Whether frames are waiting for the guest.
    pub fn has_output(&self) -> bool {
        self.pending.load(Ordering::Acquire)
    }

    /// The next frame for the guest (from its Ethernet header on) into
    /// `out`; false if there is none.
    pub fn next_frame(&self, out: &mut Vec<u8>) -> bool {
        if !self.has_output() {
            return false;
        }
        let mut inner = self.lock();
        let Some(service) = &mut inner.service else {
            return false;
        };
        let ip = service.settings.ipv4_address;
        let made = match service.arp_request.take() {
            Some(request) => {
                wire::arp_reply(&request, ip, out);
                true
            }
            None => service.stack.next_frame(ip, service.guest_mac, out),
        };
        self.pending.store(
            service.arp_request.is_some() || service.stack.has_output(),
            Ordering::Release,
        );
        if made {
            self.stats.inc(NetCounter::MmdsTxFrames);
            self.stats.add(NetCounter::MmdsTxBytes, out.len() as u64);
        }
        made
    }
}
