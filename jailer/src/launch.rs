//! The backend-launch protocol between a jailed VMM and the jailer's
//! launcher.
//!
//! When the jailer starts `tessera`, it keeps a small root process (the
//! launcher) outside the VMM's jail and hands the VMM one end of a
//! `socketpair(AF_UNIX, SOCK_SEQPACKET)` as `--backend-launcher-fd N`. The
//! VMM can then no longer start processes itself in any useful way (it is
//! unprivileged and pivoted into an almost empty root), so it asks the
//! launcher: one SEQPACKET message per request, a JSON [`LaunchRequest`]
//! with the file descriptors the backend needs attached as `SCM_RIGHTS`,
//! answered by one JSON [`LaunchResponse`] message.
//!
//! | kind | fds sent with the request |
//! |---|---|
//! | [`BackendKind::Blk`] | `[listening unix socket, stats page, opened disk file]` |
//! | [`BackendKind::Net`] | `[listening unix socket, stats page]`; the launcher opens the TAP named `tap` |
//! | [`BackendKind::Vsock`] | `[listening unix socket, stats page, the host side's listening socket]` |
//!
//! The stats page is the device's sealed memfd of counters
//! (`backend_stats::StatsPage`), which the VMM reads for its metrics.
//! The launcher starts `vhost-user-blk --fd 3 --stats-fd 4 --disk-fd 5
//! <args>` or `vhost-user-net --fd 3 --stats-fd 4 --tap-fd 5 [--tap-fd 6
//! ...] <args>` in a jail of
//! its own and answers [`LaunchResponse::Started`] with its pid (in the
//! launcher's pid namespace). It accepts only a whitelist of `args` per
//! kind (no paths); see the jailer's `launcher` module for the rules.
//!
//! Requests are answered in order, one at a time: a VMM that sends from
//! several threads must serialize [`request_launch`] calls, or use
//! [`LaunchChannel`], which does.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Mutex;

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use serde::{Deserialize, Serialize};

/// The largest message either side sends or accepts, in bytes.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024;
/// The most file descriptors a request carries (`Blk` and `Vsock` carry three).
pub const MAX_REQUEST_FDS: usize = 3;
/// The most backends one VMM may have running at a time.
pub const MAX_BACKENDS: usize = 64;
/// The most backends one VMM may start in its life, running or not (each
/// start costs the host a jail and a cgroup for a while).
pub const MAX_BACKEND_STARTS: usize = 4 * MAX_BACKENDS;
/// The most TAP queue pairs (one TAP fd each) of a `Net` backend.
pub const MAX_TAP_QUEUE_PAIRS: u16 = 16;

/// Which backend to start.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum BackendKind {
    /// `vhost-user-blk`.
    Blk,
    /// `vhost-user-net`.
    Net,
    /// `vhost-user-vsock`.
    Vsock,
}

/// A request to start one backend.
#[derive(Serialize, Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct LaunchRequest {
    pub kind: BackendKind,
    /// The drive or interface id (the instance id rule: `[A-Za-z0-9-]{1,64}`).
    pub device_id: String,
    /// Backend flags from the launcher's whitelist for `kind`.
    pub args: Vec<String>,
    /// `Net` only: the TAP device, opened by the launcher in the VMM's netns.
    pub tap: Option<String>,
    /// `Net` only: how many TAP queues (fds) to open, 1 to 16; `Blk`: 0.
    pub tap_queue_pairs: u16,
    /// `Vsock` only: the host side's socket path (`--uds-path`), where
    /// guest-initiated connections go (`<uds_path>_<port>`); its listening
    /// socket is the request's third fd.
    #[serde(default)]
    pub uds_path: Option<String>,
}

/// The launcher's answer.
#[derive(Serialize, Deserialize, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LaunchResponse {
    Started { pid: u32 },
    Failed { error: String },
}

/// Errors on either side of the channel.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("cannot encode the launch request: {0}")]
    Encode(serde_json::Error),
    #[error("the launch message is {0} bytes, above the {MAX_MESSAGE_BYTES}-byte limit")]
    TooLarge(usize),
    #[error("{0} file descriptors is more than the {MAX_REQUEST_FDS} a request may carry")]
    TooManyFds(usize),
    #[error("cannot send to the backend launcher: {0}")]
    Send(nix::Error),
    #[error("cannot receive from the backend launcher channel: {0}")]
    Receive(nix::Error),
    #[error("the backend launcher channel is closed")]
    Closed,
    #[error("a message on the backend launcher channel was longer than {MAX_MESSAGE_BYTES} bytes")]
    Truncated,
    #[error("the backend launcher's answer is not valid: {0}")]
    BadResponse(String),
    #[error("the backend launcher refused: {0}")]
    Failed(String),
}

/// VMM side: sends `request` with `fds` (as `SCM_RIGHTS`) on `channel` and
/// waits for the answer; returns the backend's pid.
pub fn request_launch(
    channel: BorrowedFd<'_>,
    request: &LaunchRequest,
    fds: &[RawFd],
) -> Result<u32, LaunchError> {
    if fds.len() > MAX_REQUEST_FDS {
        return Err(LaunchError::TooManyFds(fds.len()));
    }
    let body = serde_json::to_vec(request).map_err(LaunchError::Encode)?;
    send_message(channel, &body, fds)?;
    let (reply, reply_fds) = receive_message(channel)?.ok_or(LaunchError::Closed)?;
    if !reply_fds.is_empty() {
        return Err(LaunchError::BadResponse(
            "it carried file descriptors".into(),
        ));
    }
    match serde_json::from_slice::<LaunchResponse>(&reply) {
        Ok(LaunchResponse::Started { pid }) => Ok(pid),
        Ok(LaunchResponse::Failed { error }) => Err(LaunchError::Failed(error)),
        Err(err) => Err(LaunchError::BadResponse(err.to_string())),
    }
}

/// The VMM's end of the channel, safe to share between threads: one
/// request is in flight at a time.
#[derive(Debug)]
pub struct LaunchChannel {
    fd: OwnedFd,
    lock: Mutex<()>,
}

impl LaunchChannel {
    /// Wraps the channel (the fd of `--backend-launcher-fd`).
    pub fn new(fd: OwnedFd) -> Self {
        Self {
            fd,
            lock: Mutex::new(()),
        }
    }

    /// [`request_launch`] under the channel's lock.
    pub fn launch(&self, request: &LaunchRequest, fds: &[RawFd]) -> Result<u32, LaunchError> {
        let _guard = self
            .lock
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        request_launch(std::os::fd::AsFd::as_fd(&self.fd), request, fds)
    }
}

/// Sends one message with `fds` attached.
pub fn send_message(
    channel: BorrowedFd<'_>,
    body: &[u8],
    fds: &[RawFd],
) -> Result<(), LaunchError> {
    if body.len() > MAX_MESSAGE_BYTES {
        return Err(LaunchError::TooLarge(body.len()));
    }
    let iov = [IoSlice::new(body)];
    let rights = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &rights };
    loop {
        match sendmsg::<()>(
            channel.as_raw_fd(),
            &iov,
            cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            None,
        ) {
            Ok(_) => return Ok(()),
            Err(nix::Error::EINTR) => continue,
            Err(nix::Error::EPIPE | nix::Error::ECONNRESET) => return Err(LaunchError::Closed),
            Err(err) => return Err(LaunchError::Send(err)),
        }
    }
}

/// One received message: its bytes and the fds that came with it.
pub type Message = (Vec<u8>, Vec<OwnedFd>);

/// The kernel's limit of fds in one message (`SCM_MAX_FD`): the receive
/// buffer has room for all of them, so that every fd that arrives can be
/// closed again when a message is refused.
const SCM_MAX_FD: usize = 253;

/// Receives one message and the fds attached to it (close-on-exec);
/// `None` at end of file. A message longer than [`MAX_MESSAGE_BYTES`] is
/// [`LaunchError::Truncated`] and one with more than [`MAX_REQUEST_FDS`]
/// fds is [`LaunchError::TooManyFds`]; the fds of a refused message are
/// closed.
pub fn receive_message(channel: BorrowedFd<'_>) -> Result<Option<Message>, LaunchError> {
    let mut buf = vec![0u8; MAX_MESSAGE_BYTES];
    let mut cmsg_space = nix::cmsg_space!([RawFd; SCM_MAX_FD]);
    loop {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = match recvmsg::<()>(
            channel.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg_space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(msg) => msg,
            Err(nix::Error::EINTR) => continue,
            Err(nix::Error::ECONNRESET) => return Ok(None),
            Err(err) => return Err(LaunchError::Receive(err)),
        };
        if msg.flags.contains(MsgFlags::MSG_CTRUNC) {
            // Cannot happen with room for SCM_MAX_FD fds.
            return Err(LaunchError::Truncated);
        }
        let mut fds = Vec::new();
        for cmsg in msg.cmsgs().map_err(LaunchError::Receive)? {
            if let ControlMessageOwned::ScmRights(raw) = cmsg {
                for fd in raw {
                    // SAFETY: SCM_RIGHTS just installed `fd` in this
                    // process and nothing else refers to it.
                    fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                }
            }
        }
        let len = msg.bytes;
        if msg.flags.contains(MsgFlags::MSG_TRUNC) {
            return Err(LaunchError::Truncated);
        }
        if fds.len() > MAX_REQUEST_FDS {
            return Err(LaunchError::TooManyFds(fds.len()));
        }
        if len == 0 && fds.is_empty() {
            return Ok(None);
        }
        buf.truncate(len);
        return Ok(Some((buf, fds)));
    }
}

/// Launcher side: sends `response`.
pub fn respond(channel: BorrowedFd<'_>, response: &LaunchResponse) -> Result<(), LaunchError> {
    let body = serde_json::to_vec(response).map_err(LaunchError::Encode)?;
    send_message(channel, &body, &[])
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
    use std::os::fd::AsFd;

    fn pair() -> (OwnedFd, OwnedFd) {
        socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .expect("socketpair")
    }

    fn blk_request() -> LaunchRequest {
        LaunchRequest {
            kind: BackendKind::Blk,
            device_id: "rootfs".into(),
            args: vec!["--readonly".into()],
            tap: None,
            tap_queue_pairs: 0,
            uds_path: None,
        }
    }

    #[test]
    fn wire_format_is_snake_case_json() {
        let json = serde_json::to_value(blk_request()).unwrap();
        assert_eq!(json["kind"], "blk");
        assert_eq!(
            serde_json::to_string(&LaunchResponse::Started { pid: 7 }).unwrap(),
            r#"{"started":{"pid":7}}"#
        );
        assert_eq!(
            serde_json::to_string(&LaunchResponse::Failed { error: "x".into() }).unwrap(),
            r#"{"failed":{"error":"x"}}"#
        );
    }

    #[test]
    fn request_round_trip_with_fds() {
        let (vmm, launcher) = pair();
        let file = std::fs::File::open("/proc/self/status").unwrap();
        let server = std::thread::spawn(move || {
            let (body, fds) = receive_message(launcher.as_fd()).unwrap().unwrap();
            let request: LaunchRequest = serde_json::from_slice(&body).unwrap();
            assert_eq!(request.device_id, "rootfs");
            assert_eq!(fds.len(), 1);
            respond(launcher.as_fd(), &LaunchResponse::Started { pid: 42 }).unwrap();
            let (body, _) = receive_message(launcher.as_fd()).unwrap().unwrap();
            assert!(serde_json::from_slice::<LaunchRequest>(&body).is_ok());
            respond(
                launcher.as_fd(),
                &LaunchResponse::Failed { error: "no".into() },
            )
            .unwrap();
            // EOF once the VMM side is gone.
            assert!(receive_message(launcher.as_fd()).unwrap().is_none());
        });
        let channel = LaunchChannel::new(vmm);
        assert_eq!(
            channel.launch(&blk_request(), &[file.as_raw_fd()]).unwrap(),
            42
        );
        match channel.launch(&blk_request(), &[]) {
            Err(LaunchError::Failed(error)) => assert_eq!(error, "no"),
            other => panic!("{other:?}"),
        }
        drop(channel);
        server.join().unwrap();
    }

    #[test]
    fn too_many_fds_are_refused_on_both_sides() {
        let (vmm, launcher) = pair();
        let marker = std::env::temp_dir().join(format!("launch-fds-{}", std::process::id()));
        std::fs::write(&marker, b"").unwrap();
        let f: Vec<std::fs::File> = (0..4)
            .map(|_| std::fs::File::open(&marker).unwrap())
            .collect();
        let raw: Vec<RawFd> = f.iter().map(|f| f.as_raw_fd()).collect();
        assert!(matches!(
            request_launch(vmm.as_fd(), &blk_request(), &raw),
            Err(LaunchError::TooManyFds(4))
        ));
        // A peer that sends four anyway is refused on the launcher side,
        // and the fds that arrived are closed again.
        let marker_fds = || {
            std::fs::read_dir("/proc/self/fd")
                .unwrap()
                .flatten()
                .filter(|e| std::fs::read_link(e.path()).ok().as_deref() == Some(marker.as_path()))
                .count()
        };
        send_message(vmm.as_fd(), b"{}", &raw).unwrap();
        let got = receive_message(launcher.as_fd());
        assert!(matches!(got, Err(LaunchError::TooManyFds(4))), "{got:?}");
        assert_eq!(marker_fds(), 4, "only the sender's own fds are left open");
        drop(f);
        std::fs::remove_file(&marker).unwrap();
        // An oversized message too, on both sides.
        let big = vec![b'x'; MAX_MESSAGE_BYTES + 1];
        assert!(matches!(
            send_message(vmm.as_fd(), &big, &[]),
            Err(LaunchError::TooLarge(_))
        ));
        nix::sys::socket::send(vmm.as_raw_fd(), &big, MsgFlags::empty()).unwrap();
        assert!(matches!(
            receive_message(launcher.as_fd()),
            Err(LaunchError::Truncated)
        ));
    }

    #[test]
    fn closed_launcher_is_an_error() {
        let (vmm, launcher) = pair();
        drop(launcher);
        assert!(matches!(
            request_launch(vmm.as_fd(), &blk_request(), &[]),
            Err(LaunchError::Closed)
        ));
    }
}
