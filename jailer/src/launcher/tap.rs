//! Opening the queues of an existing TAP for a `vhost-user-net` backend:
//! the launcher does it as root in the VMM's network namespace, so the
//! backend's jail needs no `/dev/net/tun` and the backend no
//! CAP_NET_ADMIN.
//!
//! Root would bypass the kernel's TUN owner and group checks, so the
//! launcher makes them itself, on the VMM's behalf, from what rtnetlink
//! says about the TAP (`IFLA_TUN_*`, read in the launcher's own network
//! namespace, which is the VMM's):
//!
//! - it must exist (TUNSETIFF would create a missing one) and be a TAP;
//! - an owner or group, where set, must be the VMM's uid or gid (the
//!   kernel's own rule for an unprivileged opener);
//! - a TAP with neither is open to anyone in its namespace: it is accepted
//!   only when the VMM has a network namespace of its own (`--netns`),
//!   never in the host's;
//! - it must have no queue attached, in use or disabled, so that no other
//!   VM's multi-queue TAP is shared; the count is checked again after
//!   attaching, and the queues are dropped if anyone else joined meanwhile.
//!
//! Flags: `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, plus `IFF_MULTI_QUEUE` for
//! a multi-queue TAP.

use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

use nix::sys::socket::{
    recv, send, socket, AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType,
};

const IFF_TAP: libc::c_short = libc::IFF_TAP as libc::c_short;
const IFF_NO_PI: libc::c_short = libc::IFF_NO_PI as libc::c_short;
const IFF_MULTI_QUEUE: libc::c_short = libc::IFF_MULTI_QUEUE as libc::c_short;
const IFF_VNET_HDR: libc::c_short = libc::IFF_VNET_HDR as libc::c_short;

const NLMSG_HEADER_LEN: usize = 16;
const IFINFOMSG_LEN: usize = 16;
const NLA_HEADER_LEN: usize = 4;
const NLA_TYPE_MASK: u16 = 0x3fff;
const RTM_NEWLINK: u16 = libc::RTM_NEWLINK;
const NLMSG_ERROR: u16 = libc::NLMSG_ERROR as u16;
const IFLA_IFNAME: u16 = 3;
const IFLA_LINKINFO: u16 = 18;
const IFLA_INFO_KIND: u16 = 1;
const IFLA_INFO_DATA: u16 = 2;
const IFLA_TUN_OWNER: u16 = 1;
const IFLA_TUN_GROUP: u16 = 2;
const IFLA_TUN_TYPE: u16 = 3;
const IFLA_TUN_MULTI_QUEUE: u16 = 7;
const IFLA_TUN_NUM_QUEUES: u16 = 8;
const IFLA_TUN_NUM_DISABLED_QUEUES: u16 = 9;

/// Errors checking or opening a TAP.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TapError {
    #[error("invalid TAP name {0:?}")]
    Name(String),
    #[error("cannot ask rtnetlink about TAP {name:?}: {errno}")]
    Netlink { name: String, errno: nix::Error },
    #[error("rtnetlink's answer about TAP {0:?} is malformed")]
    Malformed(String),
    #[error("the TAP {0:?} does not exist in the VMM's network namespace")]
    Missing(String),
    #[error("{0:?} is not a TAP device")]
    NotATap(String),
    #[error("the TAP {name:?} belongs to uid {owner}, not the VMM's uid {uid}")]
    Owner { name: String, owner: u32, uid: u32 },
    #[error("the TAP {name:?} belongs to group {group}, not the VMM's gid {gid}")]
    Group { name: String, group: u32, gid: u32 },
    #[error("the TAP {0:?} has no owner or group: outside a network namespace of the VMM's own (--netns), only a TAP owned by the VMM's uid or gid may be attached")]
    Unowned(String),
    #[error("the TAP {name:?} is in use: {queues} queues are attached already")]
    InUse { name: String, queues: u32 },
    #[error("the TAP {name:?} is not multi-queue: it cannot serve {pairs} queue pairs")]
    NotMultiQueue { name: String, pairs: u16 },
    #[error("cannot attach to TAP {name:?}: {errno}")]
    Attach { name: String, errno: nix::Error },
}

/// Whose TAPs the VMM may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TapPolicy {
    /// The VMM's uid and gid.
    pub uid: u32,
    pub gid: u32,
    /// The VMM has a network namespace of its own (`--netns`).
    pub private_netns: bool,
}

/// What rtnetlink says about a TUN/TAP device.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TapInfo {
    pub is_tap: bool,
    pub owner: Option<u32>,
    pub group: Option<u32>,
    pub multi_queue: bool,
    /// Attached queues of a multi-queue TAP, in use plus disabled
    /// (IFF_DETACH_QUEUE); the kernel reports none for a single-queue TAP,
    /// which refuses a second opener itself (EBUSY).
    pub queues: u32,
}

impl TapPolicy {
    /// Whether the VMM may attach `info`'s TAP `name` (before attaching).
    pub fn check(&self, name: &str, info: &TapInfo) -> Result<(), TapError> {
        if !info.is_tap {
            return Err(TapError::NotATap(name.to_string()));
        }
        if let Some(owner) = info.owner.filter(|owner| *owner != self.uid) {
            return Err(TapError::Owner {
                name: name.to_string(),
                owner,
                uid: self.uid,
            });
        }
        if let Some(group) = info.group.filter(|group| *group != self.gid) {
            return Err(TapError::Group {
                name: name.to_string(),
                group,
                gid: self.gid,
            });
        }
        if info.owner.is_none() && info.group.is_none() && !self.private_netns {
            return Err(TapError::Unowned(name.to_string()));
        }
        if info.queues > 0 {
            return Err(TapError::InUse {
                name: name.to_string(),
                queues: info.queues,
            });
        }
        Ok(())
    }
}

/// Opens `pairs` queues of the TAP `name` (already validated) if `policy`
/// lets the VMM have it.
pub fn open_tap(name: &str, pairs: u16, policy: &TapPolicy) -> Result<Vec<OwnedFd>, TapError> {
    let info = query(name)?;
    policy.check(name, &info)?;
    if pairs > 1 && !info.multi_queue {
        return Err(TapError::NotMultiQueue {
            name: name.to_string(),
            pairs,
        });
    }
    let queues = (0..pairs)
        .map(|_| attach(name, info.multi_queue))
        .collect::<Result<Vec<_>, _>>()?;
    // Someone who attached between the check and here shares the TAP (a
    // single-queue TAP takes one opener: the kernel says EBUSY instead).
    let after = query(name)?;
    let shared = info.multi_queue && after.queues != u32::from(pairs);
    if shared || after.owner != info.owner || after.group != info.group {
        return Err(TapError::InUse {
            name: name.to_string(),
            queues: after.queues.saturating_sub(u32::from(pairs)),
        });
    }
    Ok(queues)
}

/// One queue of the TAP `name`.
fn attach(name: &str, multi_queue: bool) -> Result<OwnedFd, TapError> {
    let attach_err = |err: std::io::Error| TapError::Attach {
        name: name.to_string(),
        errno: nix::Error::from_raw(err.raw_os_error().unwrap_or(libc::EIO)),
    };
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .map_err(attach_err)?;
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | if multi_queue { IFF_MULTI_QUEUE } else { 0 },
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads (and may update) one ifreq we own.
    if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) } < 0 {
        return Err(attach_err(std::io::Error::last_os_error()));
    }
    Ok(OwnedFd::from(file))
}

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Asks rtnetlink (in the caller's network namespace) about `name`.
pub fn query(name: &str) -> Result<TapInfo, TapError> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('\0') {
        return Err(TapError::Name(name.to_string()));
    }
    let netlink_err = |errno| TapError::Netlink {
        name: name.to_string(),
        errno,
    };
    let sock = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkRoute,
    )
    .map_err(netlink_err)?;
    send(sock.as_raw_fd(), &getlink_request(name), MsgFlags::empty()).map_err(netlink_err)?;
    let mut buf = vec![0u8; 32 * 1024];
    let len = loop {
        match recv(sock.as_raw_fd(), &mut buf, MsgFlags::empty()) {
            Err(nix::Error::EINTR) => continue,
            other => break other.map_err(netlink_err)?,
        }
    };
    parse_getlink_reply(name, &buf[..len])
}

/// `RTM_GETLINK` for the interface `name`.
fn getlink_request(name: &str) -> Vec<u8> {
    let name_attr_len = NLA_HEADER_LEN + name.len() + 1;
    let total = NLMSG_HEADER_LEN + IFINFOMSG_LEN + align4(name_attr_len);
    let mut msg = Vec::with_capacity(total);
    msg.extend((total as u32).to_ne_bytes());
    msg.extend(libc::RTM_GETLINK.to_ne_bytes());
    msg.extend((libc::NLM_F_REQUEST as u16).to_ne_bytes());
    msg.extend(1u32.to_ne_bytes());
    msg.extend(0u32.to_ne_bytes());
    msg.extend([0u8; IFINFOMSG_LEN]);
    msg.extend((name_attr_len as u16).to_ne_bytes());
    msg.extend(IFLA_IFNAME.to_ne_bytes());
    msg.extend(name.as_bytes());
    msg.resize(total, 0);
    msg
}

fn align4(len: usize) -> usize {
    (len + 3) & !3
}

fn u16_at(data: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(data.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(data: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(data.get(at..at + 4)?.try_into().ok()?))
}

/// The attributes in `data`: (type, payload), bounds-checked.
fn attributes(data: &[u8]) -> Option<Vec<(u16, &[u8])>> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + NLA_HEADER_LEN <= data.len() {
        let len = usize::from(u16_at(data, at)?);
        let kind = u16_at(data, at + 2)? & NLA_TYPE_MASK;
        if len < NLA_HEADER_LEN {
            return None;
        }
        out.push((kind, data.get(at + NLA_HEADER_LEN..at + len)?));
        at += align4(len);
    }
    Some(out)
}

fn parse_getlink_reply(name: &str, reply: &[u8]) -> Result<TapInfo, TapError> {
    let malformed = || TapError::Malformed(name.to_string());
    let len = u32_at(reply, 0).ok_or_else(malformed)? as usize;
    let kind = u16_at(reply, 4).ok_or_else(malformed)?;
    let message = reply.get(..len).ok_or_else(malformed)?;
    if kind == NLMSG_ERROR {
        let errno = u32_at(message, NLMSG_HEADER_LEN).ok_or_else(malformed)? as i32;
        return Err(match -errno {
            libc::ENODEV => TapError::Missing(name.to_string()),
            errno => TapError::Netlink {
                name: name.to_string(),
                errno: nix::Error::from_raw(errno),
            },
        });
    }
    if kind != RTM_NEWLINK {
        return Err(malformed());
    }
    let attrs = message
        .get(NLMSG_HEADER_LEN + IFINFOMSG_LEN..)
        .and_then(attributes)
        .ok_or_else(malformed)?;
    let Some((_, link_info)) = attrs.iter().find(|(kind, _)| *kind == IFLA_LINKINFO) else {
        return Err(TapError::NotATap(name.to_string()));
    };
    let link_info = attributes(link_info).ok_or_else(malformed)?;
    let is_tun = link_info
        .iter()
        .any(|(kind, value)| *kind == IFLA_INFO_KIND && value.starts_with(b"tun\0"));
    let data = link_info
        .iter()
        .find(|(kind, _)| *kind == IFLA_INFO_DATA)
        .map(|(_, data)| attributes(data).ok_or_else(malformed))
        .transpose()?;
    let (true, Some(data)) = (is_tun, data) else {
        return Err(TapError::NotATap(name.to_string()));
    };
    let mut info = TapInfo::default();
    for (kind, value) in data {
        let byte = || value.first().copied().unwrap_or(0);
        let word = || u32_at(value, 0).ok_or_else(malformed);
        match kind {
            IFLA_TUN_TYPE => info.is_tap = byte() == IFF_TAP as u8,
            IFLA_TUN_OWNER => info.owner = Some(word()?),
            IFLA_TUN_GROUP => info.group = Some(word()?),
            IFLA_TUN_MULTI_QUEUE => info.multi_queue = byte() != 0,
            IFLA_TUN_NUM_QUEUES | IFLA_TUN_NUM_DISABLED_QUEUES => {
                info.queues = info.queues.saturating_add(word()?)
            }
            _ => {}
        }
    }
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sched::{unshare, CloneFlags};

    /// Creates a persistent TAP `name` in the calling thread's network
    /// namespace with `owner`/`group` (as `ip tuntap add user/group`).
    fn make_tap(name: &str, multi_queue: bool, owner: Option<u32>, group: Option<u32>) {
        let fd = attach(name, multi_queue).expect("create the TAP");
        for (request, value) in [
            (libc::TUNSETOWNER, owner),
            (libc::TUNSETGROUP, group),
            (libc::TUNSETPERSIST, Some(1)),
        ] {
            if let Some(value) = value {
                // SAFETY: these TUN ioctls take an integer argument.
                let rc = unsafe { libc::ioctl(fd.as_raw_fd(), request, value as libc::c_ulong) };
                assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
            }
        }
        drop(fd);
        // A child another test forks at this moment holds a copy of the
        // creating descriptor until its exec: the TAP is free only when
        // no queue is attached any more.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while query(name).expect("query the new TAP").queues != 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "{name} still attached"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    /// Runs `body` on a thread in a new, empty network namespace (the
    /// namespace is per thread), if this test runs as root.
    fn in_new_netns(body: impl FnOnce() + Send + 'static) {
        if !crate::test_support::runs_as_root() {
            return;
        }
        std::thread::spawn(move || {
            unshare(CloneFlags::CLONE_NEWNET).expect("unshare the network namespace");
            body();
        })
        .join()
        .expect("the test thread");
    }

    const VMM: TapPolicy = TapPolicy {
        uid: 1234,
        gid: 1234,
        private_netns: false,
    };

    #[test]
    fn request_shape() {
        let msg = getlink_request("tap0");
        assert_eq!(msg.len(), 16 + 16 + 12);
        assert_eq!(u32_at(&msg, 0), Some(44));
        assert_eq!(&msg[36..41], b"tap0\0");
        assert!(
            attributes(&[5, 0, 1, 0]).is_none(),
            "an attribute past the end"
        );
        assert!(parse_getlink_reply("x", &[1, 2]).is_err());
    }

    #[test]
    fn a_tap_owned_by_someone_else_is_refused() {
        in_new_netns(|| {
            make_tap("other-uid", false, Some(4321), None);
            make_tap("other-gid", false, None, Some(4321));
            make_tap("vmm-uid", false, Some(1234), None);
            make_tap("vmm-gid", false, None, Some(1234));
            make_tap("unowned", false, None, None);
            let err = open_tap("other-uid", 1, &VMM).unwrap_err();
            assert!(matches!(err, TapError::Owner { owner: 4321, .. }), "{err}");
            let err = open_tap("other-gid", 1, &VMM).unwrap_err();
            assert!(matches!(err, TapError::Group { group: 4321, .. }), "{err}");
            assert_eq!(open_tap("vmm-uid", 1, &VMM).unwrap().len(), 1);
            assert_eq!(open_tap("vmm-gid", 1, &VMM).unwrap().len(), 1);
            // Open to anyone: only in a namespace of the VMM's own.
            let err = open_tap("unowned", 1, &VMM).unwrap_err();
            assert!(matches!(err, TapError::Unowned(_)), "{err}");
            let private = TapPolicy {
                private_netns: true,
                ..VMM
            };
            assert_eq!(open_tap("unowned", 1, &private).unwrap().len(), 1);
            let err = open_tap("other-uid", 1, &private).unwrap_err();
            assert!(matches!(err, TapError::Owner { .. }), "{err}");
            assert_eq!(
                open_tap("nosuch", 1, &private).unwrap_err(),
                TapError::Missing("nosuch".into())
            );
            assert_eq!(
                open_tap("lo", 1, &private).unwrap_err(),
                TapError::NotATap("lo".into())
            );
        });
    }

    #[test]
    fn a_tap_in_use_is_not_shared() {
        in_new_netns(|| {
            make_tap("mq", true, Some(1234), None);
            // Another VM's backend holds two queues of it.
            let other = open_tap("mq", 2, &VMM).unwrap();
            let info = query("mq").unwrap();
            assert!(info.multi_queue && info.queues == 2, "{info:?}");
            let err = open_tap("mq", 1, &VMM).unwrap_err();
            assert!(matches!(err, TapError::InUse { queues: 2, .. }), "{err}");
            assert_eq!(query("mq").unwrap().queues, 2, "nothing left attached");
            drop(other);
            assert_eq!(open_tap("mq", 4, &VMM).unwrap().len(), 4);
            // A single-queue TAP cannot serve more than one pair.
            make_tap("sq", false, Some(1234), None);
            let err = open_tap("sq", 2, &VMM).unwrap_err();
            assert!(matches!(err, TapError::NotMultiQueue { .. }), "{err}");
            let held = open_tap("sq", 1, &VMM).unwrap();
            let err = open_tap("sq", 1, &VMM).unwrap_err();
            assert!(
                matches!(
                    err,
                    TapError::Attach {
                        errno: nix::Error::EBUSY,
                        ..
                    }
                ),
                "{err}"
            );
            drop(held);
        });
    }
}
