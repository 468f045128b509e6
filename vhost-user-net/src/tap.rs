//! The host TAP device: opened by name (the orchestrator creates it, as
//! with Firecracker), with a virtio-net header on every frame and one file
//! descriptor per queue pair when there are several (IFF_MULTI_QUEUE).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_MULTI_QUEUE: libc::c_short = 0x0100;
const IFF_VNET_HDR: libc::c_short = 0x4000;
// ioctl numbers from <linux/if_tun.h>.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const TUNSETQUEUE: libc::c_ulong = 0x4004_54d9;
const IFF_ATTACH_QUEUE: libc::c_short = 0x0200;
const IFF_DETACH_QUEUE: libc::c_short = 0x0400;

/// Offload flags for TUNSETOFFLOAD.
pub const TUN_F_CSUM: u32 = 0x01;
pub const TUN_F_TSO4: u32 = 0x02;
pub const TUN_F_TSO6: u32 = 0x04;

/// Errors opening or configuring the TAP.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("TAP name {0:?} is not a valid interface name")]
    Name(String),
    #[error("cannot open /dev/net/tun: {0}")]
    OpenTun(io::Error),
    #[error("cannot attach to TAP {name}: {source} (does it exist, and is it a TAP with matching queue settings?)")]
    Attach { name: String, source: io::Error },
    #[error("cannot configure TAP {name}: {what}: {source}")]
    Configure {
        name: String,
        what: &'static str,
        source: io::Error,
    },
}

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// One queue of a TAP device.
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Attaches `queues` file descriptors to the existing TAP `name`.
    pub fn open_queues(name: &str, queues: usize, vnet_hdr_len: i32) -> Result<Vec<Tap>, TapError> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('/') {
            return Err(TapError::Name(name.into()));
        }
        if queues == 1 {
            // A TAP made multi-queue (`ip tuntap add ... multi_queue`) must
            // be attached as such even for one queue; the kernel says EINVAL.
            return match Self::open_one(name, false, vnet_hdr_len) {
                Err(TapError::Attach { source, .. })
                    if source.raw_os_error() == Some(libc::EINVAL) =>
                {
                    Self::open_one(name, true, vnet_hdr_len).map(|tap| vec![tap])
                }
                other => other.map(|tap| vec![tap]),
            };
        }
        (0..queues)
            .map(|_| Self::open_one(name, true, vnet_hdr_len))
            .collect()
    }

    /// Takes over TAP queues opened by someone else (the jailer's launcher,
    /// with IFF_VNET_HDR), so that the backend's jail needs no /dev/net/tun.
    pub fn from_fds(
        fds: Vec<std::os::fd::OwnedFd>,
        vnet_hdr_len: i32,
    ) -> Result<Vec<Tap>, TapError> {
        fds.into_iter()
            .map(|fd| {
                let tap = Tap {
                    name: format!("--tap-fd {}", fd.as_raw_fd()),
                    file: File::from(fd),
                };
                tap.ioctl_int(TUNSETVNETHDRSZ, vnet_hdr_len, "set the vnet header size")?;
                Ok(tap)
            })
            .collect()
    }

    /// A stand-in over any file, for tests that never reach the TAP.
    #[cfg(test)]
    pub(crate) fn stand_in(file: File) -> Tap {
        Tap {
            name: "stand-in".into(),
            file,
        }
    }

    fn open_one(name: &str, multi_queue: bool, vnet_hdr_len: i32) -> Result<Tap, TapError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::OpenTun)?;
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: IFF_TAP
                | IFF_NO_PI
                | IFF_VNET_HDR
                | if multi_queue { IFF_MULTI_QUEUE } else { 0 },
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads (and may update) one ifreq we own.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
            return Err(TapError::Attach {
                name: name.into(),
                source: io::Error::last_os_error(),
            });
        }
        let tap = Tap {
            file,
            name: name.into(),
        };
        tap.ioctl_int(TUNSETVNETHDRSZ, vnet_hdr_len, "set the vnet header size")?;
        Ok(tap)
    }

    fn ioctl_int(
        &self,
        request: libc::c_ulong,
        value: libc::c_int,
        what: &'static str,
    ) -> Result<(), TapError> {
        // SAFETY: these TUN ioctls read one int through the pointer.
        let rc = unsafe { libc::ioctl(self.file.as_raw_fd(), request, &value) };
        if rc < 0 {
            return Err(TapError::Configure {
                name: self.name.clone(),
                what,
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Attaches this queue to its multi-queue TAP, or detaches it: the TAP
    /// steers flows only to attached queues, so a queue pair the guest
    /// does not use must not hold one.
    pub fn set_queue_attached(&self, attached: bool) -> Result<(), TapError> {
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: if attached {
                IFF_ATTACH_QUEUE
            } else {
                IFF_DETACH_QUEUE
            },
            _pad: [0; 22],
        };
        // SAFETY: TUNSETQUEUE reads the flags of one ifreq we own.
        if unsafe { libc::ioctl(self.file.as_raw_fd(), TUNSETQUEUE, &mut req) } < 0 {
            return Err(TapError::Configure {
                name: self.name.clone(),
                what: if attached {
                    "attach a queue"
                } else {
                    "detach a queue"
                },
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Tells the TAP which offloads the guest accepts in frames it receives.
    pub fn set_offload(&self, flags: u32) -> Result<(), TapError> {
        // SAFETY: TUNSETOFFLOAD takes the flags as the ioctl argument itself.
        let rc =
            unsafe { libc::ioctl(self.file.as_raw_fd(), TUNSETOFFLOAD, flags as libc::c_ulong) };
        if rc < 0 {
            return Err(TapError::Configure {
                name: self.name.clone(),
                what: "set offloads",
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}
