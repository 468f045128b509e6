//! The launcher's view of the host's files: a mount namespace of its own
//! in which every mount is read-only but the VM's instance directory
//! (`<base>/<vmm-exe>/<id>`, where the backends' jails are built) and the
//! cgroup hierarchies (where their cgroups are made). A compromised
//! launcher cannot change a host file outside those; it still reads what
//! it needs (the backend binaries and their libraries, `/dev/net/tun`).
//! Mount propagation is made slave first, so nothing done here reaches
//! the host; the backends' own namespaces are copies of this one.

use std::path::{Path, PathBuf};

use nix::mount::{mount, MsFlags};
use nix::sched::{unshare, CloneFlags};

use crate::chroot::ViewStep;

/// Errors confining the launcher's mounts.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("cannot unshare the launcher's mount namespace: {0}")]
    Unshare(nix::Error),
    #[error("cannot make the launcher's mounts slave: {0}")]
    Propagation(nix::Error),
    #[error("cannot read the launcher's mount table: {0}")]
    MountInfo(std::io::Error),
    #[error("cannot bind-mount {path} for the launcher: {errno}")]
    Bind { path: String, errno: nix::Error },
    #[error("cannot make {path} read-only for the launcher: {errno}")]
    ReadOnly { path: String, errno: nix::Error },
}

/// One line of `/proc/self/mountinfo`: where, its per-mount options, the
/// file system type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub point: PathBuf,
    pub options: String,
    pub fstype: String,
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut at = 0;
    while at < bytes.len() {
        let octal = bytes
            .get(at + 1..at + 4)
            .and_then(|digits| std::str::from_utf8(digits).ok())
            .and_then(|digits| u8::from_str_radix(digits, 8).ok());
        match (bytes[at], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                at += 4;
            }
            (byte, _) => {
                out.push(byte);
                at += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses `/proc/self/mountinfo` text.
pub fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let (mine, theirs) = line.split_once(" - ")?;
            let fields: Vec<&str> = mine.split(' ').collect();
            Some(Mount {
                point: PathBuf::from(unescape(fields.get(4)?)),
                options: fields.get(5)?.to_string(),
                fstype: theirs.split(' ').next()?.to_string(),
            })
        })
        .collect()
}

/// The flags a read-only remount keeps from `options`.
fn remount_flags(options: &str) -> MsFlags {
    let mut flags = MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY;
    for option in options.split(',') {
        flags |= match option {
            "nosuid" => MsFlags::MS_NOSUID,
            "nodev" => MsFlags::MS_NODEV,
            "noexec" => MsFlags::MS_NOEXEC,
            "noatime" => MsFlags::MS_NOATIME,
            "nodiratime" => MsFlags::MS_NODIRATIME,
            "relatime" => MsFlags::MS_RELATIME,
            "strictatime" => MsFlags::MS_STRICTATIME,
            _ => MsFlags::empty(),
        };
    }
    flags
}

/// Whether the launcher keeps `mount` writable.
fn stays_writable(mount: &Mount, writable: &Path) -> bool {
    mount.fstype == "cgroup" || mount.fstype == "cgroup2" || mount.point.starts_with(writable)
}

/// Moves the calling process into a mount namespace of its own where only
/// `writable` (a directory, bind-mounted on itself) and the cgroup
/// hierarchies can be written.
pub fn confine_mounts(writable: &Path) -> Result<(), MountError> {
    unshare(CloneFlags::CLONE_NEWNS).map_err(MountError::Unshare)?;
    crate::chroot::private_view_of(writable).map_err(|step| match step {
        ViewStep::Propagation(errno) => MountError::Propagation(errno),
        ViewStep::Bind(errno) => MountError::Bind {
            path: writable.display().to_string(),
            errno,
        },
    })?;
    let text = std::fs::read_to_string("/proc/self/mountinfo").map_err(MountError::MountInfo)?;
    for entry in parse_mountinfo(&text) {
        if stays_writable(&entry, writable) || entry.options.split(',').any(|o| o == "ro") {
            continue;
        }
        match mount(
            None::<&str>,
            &entry.point,
            None::<&str>,
            remount_flags(&entry.options),
            None::<&str>,
        ) {
            // A mount below one already gone, or hidden under another.
            Ok(()) | Err(nix::Error::ENOENT) => {}
            Err(errno) => {
                return Err(MountError::ReadOnly {
                    path: entry.point.display().to_string(),
                    errno,
                })
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
22 1 0:21 / / rw,relatime shared:1 - overlay overlay rw,lowerdir=/x
23 22 0:22 / /proc rw,nosuid,nodev,noexec,relatime shared:2 - proc proc rw
30 22 0:27 / /sys/fs/cgroup/cpu rw,nosuid,nodev,noexec,relatime - cgroup cgroup rw,cpu
31 22 0:28 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw
40 22 8:1 /dir /srv/with\\040space ro,relatime - ext4 /dev/sda1 rw
";

    #[test]
    fn mountinfo_lines() {
        let mounts = parse_mountinfo(MOUNTINFO);
        assert_eq!(mounts.len(), 5);
        assert_eq!(mounts[1].point, PathBuf::from("/proc"));
        assert_eq!(mounts[1].options, "rw,nosuid,nodev,noexec,relatime");
        assert_eq!(mounts[2].fstype, "cgroup");
        assert_eq!(mounts[4].point, PathBuf::from("/srv/with space"));
        let writable = Path::new("/srv/jailer/tessera/vm");
        let kept: Vec<bool> = mounts.iter().map(|m| stays_writable(m, writable)).collect();
        assert_eq!(kept, [false, false, true, true, false]);
        assert!(stays_writable(
            &Mount {
                point: writable.join("root"),
                options: "rw".into(),
                fstype: "ext4".into()
            },
            writable
        ));
        let flags = remount_flags(&mounts[1].options);
        assert!(flags.contains(
            MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC
        ));
    }
}
