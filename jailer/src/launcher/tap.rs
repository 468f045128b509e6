//! Opening the queues of an existing TAP for a `vhost-user-net` backend:
//! the launcher does it as root in the VMM's network namespace, so the
//! backend's jail needs no `/dev/net/tun` and the backend no
//! CAP_NET_ADMIN. Only an existing TAP is opened (TUNSETIFF would create
//! a missing one); any TAP in the VMM's network namespace is the VMM's to
//! use, which is what `--netns` means. Flags: `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, plus
//! `IFF_MULTI_QUEUE` for more than one queue pair or a multi-queue TAP.

use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_MULTI_QUEUE: libc::c_short = 0x0100;
const IFF_VNET_HDR: libc::c_short = 0x4000;
/// `_IOW('T', 202, int)`.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Opens `pairs` queues of the TAP `name` (already validated).
pub fn open_tap(name: &str, pairs: u16) -> Result<Vec<OwnedFd>, String> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(format!("invalid TAP name {name:?}"));
    }
    // TUNSETIFF would create a missing TAP: only existing ones are opened.
    if nix::net::if_::if_nametoindex(name).is_err() {
        return Err(format!(
            "the TAP {name:?} does not exist in the VMM's network namespace"
        ));
    }
    let attach_err = |err: std::io::Error| format!("cannot attach to TAP {name:?}: {err}");
    if pairs == 1 {
        // A TAP made multi-queue must be attached as such even for one
        // queue; the kernel says EINVAL otherwise.
        return match attach(name, false) {
            Err(err) if err.raw_os_error() == Some(libc::EINVAL) => {
                attach(name, true).map(|fd| vec![fd]).map_err(attach_err)
            }
            other => other.map(|fd| vec![fd]).map_err(attach_err),
        };
    }
    (0..pairs)
        .map(|_| attach(name, true).map_err(attach_err))
        .collect()
}

/// One queue of the TAP `name`.
fn attach(name: &str, multi_queue: bool) -> std::io::Result<OwnedFd> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/dev/net/tun")?;
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | if multi_queue { IFF_MULTI_QUEUE } else { 0 },
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads (and may update) one ifreq we own.
    if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(OwnedFd::from(file))
}
