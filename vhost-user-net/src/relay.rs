//! `--defer-early-vring-enable`: a relay between the frontend and the vhost
//! crate's request handler, for frontends that send
//! `VHOST_USER_SET_VRING_ENABLE` before `VHOST_USER_SET_FEATURES`.
//!
//! QEMU's vhost-user netdev does: virtio-net enables the rings when the
//! guest acks its features (`peer_attach`), but the features reach the
//! backend only when the driver is ready (`vhost_dev_start`). The vhost
//! crate refuses SET_VRING_ENABLE until VHOST_USER_F_PROTOCOL_FEATURES is
//! acked and ends the connection. Not offering that bit does not help
//! either: QEMU then fails `vhost_net_start` with EINVAL ("falling back on
//! userspace virtio") when it restores the enable state.
//!
//! The relay passes every message through unchanged (with its fds), except
//! a SET_VRING_ENABLE before SET_FEATURES for one of the device's rings:
//! that one is acked when the frontend asked for an ack, kept (the last one
//! per ring, without fds, which it never carries), and sent on right after
//! a SET_FEATURES that acks protocol features. One for a ring the device
//! does not have goes through, for the handler to refuse: the relay keeps
//! at most one small message per ring.

use std::collections::BTreeMap;
use std::io::{self, IoSlice, IoSliceMut};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};

const HEADER_LEN: usize = 12;
/// The vhost crate's MAX_MSG_SIZE: no request body is larger.
const MAX_BODY: usize = 0x1000;
/// The vhost crate's MAX_ATTACHED_FD_ENTRIES.
const MAX_FDS: usize = 32;

const SET_FEATURES: u32 = 2;
const RESET_OWNER: u32 = 4;
const SET_PROTOCOL_FEATURES: u32 = 16;
const SET_VRING_ENABLE: u32 = 18;

const FLAG_VERSION: u32 = 0x1;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;
const F_PROTOCOL_FEATURES: u64 = 1 << 30;
const PROTOCOL_F_REPLY_ACK: u64 = 1 << 3;

/// One vhost-user message: the header, the body and the fds sent with it.
#[derive(Debug)]
struct Message {
    header: [u8; HEADER_LEN],
    body: Vec<u8>,
    fds: Vec<OwnedFd>,
}

impl Message {
    fn word(&self, at: usize) -> u32 {
        u32::from_le_bytes(self.header[at..at + 4].try_into().unwrap())
    }

    fn request(&self) -> u32 {
        self.word(0)
    }

    fn flags(&self) -> u32 {
        self.word(4)
    }

    fn set_flags(&mut self, flags: u32) {
        self.header[4..8].copy_from_slice(&flags.to_le_bytes());
    }

    /// The body as a u64 (SET_FEATURES, SET_PROTOCOL_FEATURES).
    fn body_u64(&self) -> Option<u64> {
        Some(u64::from_le_bytes(self.body.as_slice().try_into().ok()?))
    }

    /// The ring of a SET_VRING_ENABLE (a vring state: index, num).
    fn vring_index(&self) -> Option<u32> {
        (self.body.len() == 8).then(|| u32::from_le_bytes(self.body[..4].try_into().unwrap()))
    }

    /// The REPLY_ACK answer "success" to this request.
    fn ack(&self) -> Message {
        let mut header = [0u8; HEADER_LEN];
        header[0..4].copy_from_slice(&self.request().to_le_bytes());
        header[4..8].copy_from_slice(&(FLAG_VERSION | FLAG_REPLY).to_le_bytes());
        header[8..12].copy_from_slice(&8u32.to_le_bytes());
        Message {
            header,
            body: 0u64.to_le_bytes().to_vec(),
            fds: Vec::new(),
        }
    }
}

/// Reads one message; `None` at a clean end of stream.
fn read_message(stream: &UnixStream) -> io::Result<Option<Message>> {
    let mut header = [0u8; HEADER_LEN];
    let mut fds = Vec::new();
    let mut got = 0;
    while got < HEADER_LEN {
        let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS]);
        let mut iov = [IoSliceMut::new(&mut header[got..])];
        let msg = match recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(msg) => msg,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(err) => return Err(err.into()),
        };
        for control in msg.cmsgs().map_err(io::Error::from)? {
            if let ControlMessageOwned::ScmRights(raw) = control {
                // SAFETY: the kernel just installed these fds for us.
                fds.extend(
                    raw.into_iter()
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                );
            }
        }
        if msg.flags.contains(MsgFlags::MSG_CTRUNC) {
            return Err(io::Error::other(
                "more fds than a vhost-user message may carry",
            ));
        }
        match msg.bytes {
            0 if got == 0 => return Ok(None),
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            n => got += n,
        }
    }
    let size = u32::from_le_bytes(header[8..12].try_into().unwrap()) as usize;
    if size > MAX_BODY {
        return Err(io::Error::other(format!("a {size}-byte message body")));
    }
    let mut body = vec![0u8; size];
    let mut got = 0;
    while got < size {
        // read(2), not std's recv (recvfrom), which the filters forbid.
        match nix::unistd::read(stream.as_raw_fd(), &mut body[got..]) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(err) => return Err(err.into()),
        }
    }
    Ok(Some(Message { header, body, fds }))
}

/// Writes one message, its fds with the first byte.
fn write_message(stream: &UnixStream, message: &Message) -> io::Result<()> {
    let iov = [IoSlice::new(&message.header), IoSlice::new(&message.body)];
    let raw: Vec<RawFd> = message.fds.iter().map(AsRawFd::as_raw_fd).collect();
    let rights = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage] = if raw.is_empty() { &[] } else { &rights };
    let sent = loop {
        match sendmsg::<()>(
            stream.as_raw_fd(),
            &iov,
            cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            None,
        ) {
            Ok(sent) => break sent,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(err) => return Err(err.into()),
        }
    };
    let all = [&message.header[..], &message.body[..]].concat();
    let mut done = sent;
    while done < all.len() {
        match nix::unistd::write(stream, &all[done..]) {
            Ok(n) => done += n,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(err) => return Err(err.into()),
        }
    }
    Ok(())
}

/// The frontend-to-backend direction and its state.
struct Requests {
    frontend: UnixStream,
    backend: UnixStream,
    to_frontend: Arc<Mutex<UnixStream>>,
    features_set: bool,
    reply_ack: bool,
    /// The device's rings: only these have a deferred enable.
    rings: u32,
    deferred: BTreeMap<u32, Message>,
    /// Whether the log line about deferring was printed.
    deferred_any: bool,
}

impl Requests {
    fn run(&mut self) -> io::Result<()> {
        while let Some(message) = read_message(&self.frontend)? {
            self.pass(message)?;
        }
        Ok(())
    }

    fn pass(&mut self, mut message: Message) -> io::Result<()> {
        match message.request() {
            SET_VRING_ENABLE if !self.features_set => {
                let Some(index) = message.vring_index().filter(|i| *i < self.rings) else {
                    // Malformed, or not a ring of the device: the handler
                    // refuses it.
                    return write_message(&self.backend, &message);
                };
                message.fds.clear();
                if self.reply_ack && message.flags() & FLAG_NEED_REPLY != 0 {
                    write_message(&self.to_frontend.lock().unwrap(), &message.ack())?;
                }
                if !self.deferred_any {
                    self.deferred_any = true;
                    log::info!(
                        "SET_VRING_ENABLE (ring {index}) before SET_FEATURES: \
                         deferring such requests until SET_FEATURES"
                    );
                }
                message.set_flags(message.flags() & !FLAG_NEED_REPLY);
                self.deferred.insert(index, message);
                Ok(())
            }
            SET_FEATURES => {
                let features = message.body_u64();
                write_message(&self.backend, &message)?;
                self.features_set = true;
                let deferred = std::mem::take(&mut self.deferred);
                if features.is_some_and(|f| f & F_PROTOCOL_FEATURES != 0) {
                    for message in deferred.values() {
                        write_message(&self.backend, message)?;
                    }
                }
                Ok(())
            }
            request => {
                if request == RESET_OWNER {
                    self.features_set = false;
                }
                if request == SET_PROTOCOL_FEATURES {
                    self.reply_ack = message
                        .body_u64()
                        .is_some_and(|f| f & PROTOCOL_F_REPLY_ACK != 0);
                }
                write_message(&self.backend, &message)
            }
        }
    }
}

/// Relays between `frontend` (the frontend's connection) and `backend`
/// (the vhost crate's side of a device with `rings` rings) on two threads.
/// When either side hangs up, the other is shut down, so the handler sees
/// the frontend leave.
pub fn spawn(frontend: UnixStream, backend: UnixStream, rings: u32) -> io::Result<()> {
    let to_frontend = Arc::new(Mutex::new(frontend.try_clone()?));
    let replies_from = backend.try_clone()?;
    let replies_to = to_frontend.clone();
    let frontend_end = frontend.try_clone()?;
    std::thread::Builder::new()
        .name("relay-replies".into())
        .spawn(move || {
            while let Ok(Some(message)) = read_message(&replies_from) {
                if write_message(&replies_to.lock().unwrap(), &message).is_err() {
                    break;
                }
            }
            let _ = frontend_end.shutdown(Shutdown::Both);
        })?;
    let mut requests = Requests {
        frontend,
        backend,
        to_frontend,
        features_set: false,
        reply_ack: false,
        rings,
        deferred: BTreeMap::new(),
        deferred_any: false,
    };
    std::thread::Builder::new()
        .name("relay-requests".into())
        .spawn(move || {
            if let Err(err) = requests.run() {
                log::error!("relaying the frontend's requests: {err}");
            }
            let _ = requests.backend.shutdown(Shutdown::Both);
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    const GET_FEATURES: u32 = 1;
    const RINGS: u32 = 2;
    const SET_VRING_KICK: u32 = 12;

    fn message(request: u32, flags: u32, body: &[u8]) -> Message {
        let mut header = [0u8; HEADER_LEN];
        header[0..4].copy_from_slice(&request.to_le_bytes());
        header[4..8].copy_from_slice(&(FLAG_VERSION | flags).to_le_bytes());
        header[8..12].copy_from_slice(&(body.len() as u32).to_le_bytes());
        Message {
            header,
            body: body.to_vec(),
            fds: Vec::new(),
        }
    }

    fn vring_state(index: u32, num: u32) -> Vec<u8> {
        [index.to_le_bytes(), num.to_le_bytes()].concat()
    }

    /// A relay between two socket pairs: (the frontend's end, the
    /// handler's end).
    fn relay() -> (UnixStream, UnixStream) {
        let (frontend, frontend_relay) = UnixStream::pair().unwrap();
        let (backend_relay, backend) = UnixStream::pair().unwrap();
        spawn(frontend_relay, backend_relay, RINGS).unwrap();
        // A message that never comes fails the test rather than hang it.
        let timeout = Some(std::time::Duration::from_secs(5));
        frontend.set_read_timeout(timeout).unwrap();
        backend.set_read_timeout(timeout).unwrap();
        (frontend, backend)
    }

    fn next(stream: &UnixStream) -> Message {
        read_message(stream).unwrap().expect("a message")
    }

    #[test]
    fn an_early_vring_enable_is_deferred_until_set_features() {
        let (frontend, backend) = relay();
        write_message(&frontend, &message(SET_VRING_ENABLE, 0, &vring_state(0, 1))).unwrap();
        write_message(&frontend, &message(SET_VRING_ENABLE, 0, &vring_state(1, 1))).unwrap();
        write_message(&frontend, &message(GET_FEATURES, 0, &[])).unwrap();
        // The handler sees GET_FEATURES first; its reply goes back as is.
        assert_eq!(next(&backend).request(), GET_FEATURES);
        let reply = message(GET_FEATURES, FLAG_REPLY, &F_PROTOCOL_FEATURES.to_le_bytes());
        write_message(&backend, &reply).unwrap();
        let got = next(&frontend);
        assert_eq!((got.header, got.body), (reply.header, reply.body));

        let features = F_PROTOCOL_FEATURES | 1 << 32;
        write_message(
            &frontend,
            &message(SET_FEATURES, 0, &features.to_le_bytes()),
        )
        .unwrap();
        let got = next(&backend);
        assert_eq!(got.request(), SET_FEATURES);
        assert_eq!(got.body_u64(), Some(features));
        for ring in 0..2 {
            let got = next(&backend);
            assert_eq!(got.request(), SET_VRING_ENABLE);
            assert_eq!(got.flags(), FLAG_VERSION);
            assert_eq!(got.body, vring_state(ring, 1));
        }
        // After SET_FEATURES, SET_VRING_ENABLE goes straight through.
        write_message(&frontend, &message(SET_VRING_ENABLE, 0, &vring_state(0, 0))).unwrap();
        assert_eq!(next(&backend).body, vring_state(0, 0));

        // The frontend leaves: the handler's end sees the end of stream.
        drop(frontend);
        assert!(read_message(&backend).unwrap().is_none());
    }

    #[test]
    fn fds_cross_and_a_deferred_enable_is_acked_when_asked() {
        let (frontend, backend) = relay();
        write_message(
            &frontend,
            &message(
                SET_PROTOCOL_FEATURES,
                0,
                &PROTOCOL_F_REPLY_ACK.to_le_bytes(),
            ),
        )
        .unwrap();
        assert_eq!(next(&backend).request(), SET_PROTOCOL_FEATURES);
        write_message(
            &frontend,
            &message(SET_VRING_ENABLE, FLAG_NEED_REPLY, &vring_state(1, 1)),
        )
        .unwrap();
        let ack = next(&frontend);
        assert_eq!(ack.request(), SET_VRING_ENABLE);
        assert_eq!(ack.flags(), FLAG_VERSION | FLAG_REPLY);
        assert_eq!(ack.body_u64(), Some(0));

        // A kick fd reaches the handler: what is written to the relayed fd
        // comes out of ours.
        let (ours, theirs) = UnixStream::pair().unwrap();
        let mut kick = message(SET_VRING_KICK, 0, &1u64.to_le_bytes());
        kick.fds.push(OwnedFd::from(theirs));
        write_message(&frontend, &kick).unwrap();
        let got = next(&backend);
        assert_eq!(got.request(), SET_VRING_KICK);
        assert_eq!(got.fds.len(), 1);
        let mut relayed = UnixStream::from(got.fds.into_iter().next().unwrap());
        relayed.write_all(b"kick").unwrap();
        let mut buf = [0u8; 4];
        (&ours).read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"kick");

        // SET_FEATURES without protocol features: the deferred enable is
        // dropped (the rings start enabled); the next message is the
        // handler's next one.
        write_message(&frontend, &message(SET_FEATURES, 0, &0u64.to_le_bytes())).unwrap();
        assert_eq!(next(&backend).request(), SET_FEATURES);
        write_message(&frontend, &message(GET_FEATURES, 0, &[])).unwrap();
        let got = next(&backend);
        assert_eq!(got.request(), GET_FEATURES);
        drop(backend);
        assert!(read_message(&frontend).unwrap().is_none());
    }

    #[test]
    fn only_the_devices_rings_are_deferred_and_each_once() {
        let (frontend, backend) = relay();
        // Any number of early enables of the device's rings: the last one
        // per ring is kept.
        for round in 0..1000 {
            for ring in 0..RINGS {
                let enable = message(SET_VRING_ENABLE, 0, &vring_state(ring, round % 2));
                write_message(&frontend, &enable).unwrap();
            }
        }
        // Enables of rings the device does not have are not kept: they go
        // to the handler, which refuses them.
        for ring in [RINGS, 7, u32::MAX] {
            write_message(
                &frontend,
                &message(SET_VRING_ENABLE, 0, &vring_state(ring, 1)),
            )
            .unwrap();
            let got = next(&backend);
            assert_eq!(got.request(), SET_VRING_ENABLE);
            assert_eq!(got.body, vring_state(ring, 1));
        }
        let features = F_PROTOCOL_FEATURES;
        write_message(
            &frontend,
            &message(SET_FEATURES, 0, &features.to_le_bytes()),
        )
        .unwrap();
        assert_eq!(next(&backend).request(), SET_FEATURES);
        for ring in 0..RINGS {
            assert_eq!(next(&backend).body, vring_state(ring, 1));
        }
        write_message(&frontend, &message(GET_FEATURES, 0, &[])).unwrap();
        assert_eq!(
            next(&backend).request(),
            GET_FEATURES,
            "nothing else was kept"
        );
    }
}
