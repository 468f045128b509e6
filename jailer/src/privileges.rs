//! Dropping to the jailed uid and gid with no capabilities left, for the
//! VMM and for each backend; and, for the launcher, which stays root,
//! keeping only the capabilities it uses ([`keep_only`]).
//!
//! Order: `no_new_privs`; empty the capability bounding set (so no later
//! exec can gain a capability, even as uid 0); clear the ambient set;
//! `setgroups([gid])`, `setresgid`, `setresuid`; then set the permitted,
//! effective and inheritable sets to empty (already so after a switch to a
//! non-zero uid, but not for uid 0) and read them back: anything left is
//! an error, not a warning.

use nix::unistd::{setgroups, setresgid, setresuid, Gid, Uid};

/// Errors dropping privileges.
#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    #[error("cannot set no_new_privs: {0}")]
    NoNewPrivs(std::io::Error),
    #[error("cannot drop capability {cap} from the bounding set: {source}")]
    Bounding { cap: u32, source: std::io::Error },
    #[error("cannot clear the ambient capabilities: {0}")]
    Ambient(std::io::Error),
    #[error("cannot set the supplementary groups to [{gid}]: {errno}")]
    Groups { gid: u32, errno: nix::Error },
    #[error("cannot switch to gid {gid}: {errno}")]
    Gid { gid: u32, errno: nix::Error },
    #[error("cannot switch to uid {uid}: {errno}")]
    Uid { uid: u32, errno: nix::Error },
    #[error("cannot clear the capability sets: {0}")]
    Capset(std::io::Error),
    #[error("cannot read the capability sets: {0}")]
    Capget(std::io::Error),
    #[error("capabilities are left after dropping privileges: effective {effective:#x}, permitted {permitted:#x}")]
    CapabilitiesLeft { effective: u64, permitted: u64 },
}

/// `_LINUX_CAPABILITY_VERSION_3`: 64-bit sets in two 32-bit halves.
const CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

fn prctl(option: libc::c_int, arg: libc::c_ulong) -> std::io::Result<()> {
    // SAFETY: the prctl options used here take integer arguments only and
    // touch no memory of ours.
    let rc = unsafe {
        libc::prctl(
            option,
            arg,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// The effective and permitted capability sets of the calling thread.
pub fn current_capabilities() -> Result<(u64, u64), PrivilegeError> {
    let mut header = CapHeader {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: capget writes two CapData (version 3) through the pointer we
    // own and reads the header.
    let rc = unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) };
    if rc < 0 {
        return Err(PrivilegeError::Capget(std::io::Error::last_os_error()));
    }
    let join = |lo: u32, hi: u32| (u64::from(hi) << 32) | u64::from(lo);
    Ok((
        join(data[0].effective, data[1].effective),
        join(data[0].permitted, data[1].permitted),
    ))
}

/// Sets the effective and permitted sets to `mask`, the inheritable set to
/// empty.
fn set_capabilities(mask: u64) -> Result<(), PrivilegeError> {
    let mut header = CapHeader {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    let half = |shift: u32| {
        let bits = (mask >> shift) as u32;
        CapData {
            effective: bits,
            permitted: bits,
            inheritable: 0,
        }
    };
    let data = [half(0), half(32)];
    // SAFETY: capset reads the header and two CapData we own.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) };
    if rc < 0 {
        return Err(PrivilegeError::Capset(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Drops every capability not in `keep` from the bounding set.
fn drop_bounding(keep: u64, last_cap: u32) -> Result<(), PrivilegeError> {
    for cap in (0..=last_cap.min(63)).filter(|cap| keep & (1 << cap) == 0) {
        match prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(cap)) {
            Ok(()) => {}
            // A capability the kernel does not know.
            Err(err) if err.raw_os_error() == Some(libc::EINVAL) => {}
            Err(source) => return Err(PrivilegeError::Bounding { cap, source }),
        }
    }
    Ok(())
}

/// The mask of capability numbers `caps`.
pub fn mask(caps: &[u32]) -> u64 {
    caps.iter().fold(0, |mask, cap| mask | (1u64 << cap))
}

/// Keeps only `keep` (a [`mask`]) of the calling process's capabilities,
/// in its bounding, effective and permitted sets, with no inheritable or
/// ambient ones, and no_new_privs; the uid stays what it is. For the
/// launcher, which stays root but needs only a few.
pub fn keep_only(keep: u64, last_cap: u32) -> Result<(), PrivilegeError> {
    prctl(libc::PR_SET_NO_NEW_PRIVS, 1).map_err(PrivilegeError::NoNewPrivs)?;
    drop_bounding(keep, last_cap)?;
    prctl(
        libc::PR_CAP_AMBIENT,
        libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
    )
    .map_err(PrivilegeError::Ambient)?;
    let (_, permitted) = current_capabilities()?;
    set_capabilities(keep & permitted)?;
    let (effective, permitted) = current_capabilities()?;
    if (effective | permitted) & !keep != 0 {
        return Err(PrivilegeError::CapabilitiesLeft {
            effective,
            permitted,
        });
    }
    Ok(())
}

/// The highest capability number the kernel knows.
fn last_capability() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(63)
}

/// Reads the highest capability number; call before pivoting (it reads
/// /proc).
pub fn prepare() -> u32 {
    last_capability()
}

/// Drops the calling process to `uid`:`gid` with no capabilities. Call
/// after everything that needs root; `last_cap` is [`prepare`]'s answer.
pub fn drop_to(uid: u32, gid: u32, last_cap: u32) -> Result<(), PrivilegeError> {
    prctl(libc::PR_SET_NO_NEW_PRIVS, 1).map_err(PrivilegeError::NoNewPrivs)?;
    drop_bounding(0, last_cap)?;
    prctl(
        libc::PR_CAP_AMBIENT,
        libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
    )
    .map_err(PrivilegeError::Ambient)?;
    let g = Gid::from_raw(gid);
    setgroups(&[g]).map_err(|errno| PrivilegeError::Groups { gid, errno })?;
    setresgid(g, g, g).map_err(|errno| PrivilegeError::Gid { gid, errno })?;
    let u = Uid::from_raw(uid);
    setresuid(u, u, u).map_err(|errno| PrivilegeError::Uid { uid, errno })?;
    set_capabilities(0)?;
    let (effective, permitted) = current_capabilities()?;
    if effective != 0 || permitted != 0 {
        return Err(PrivilegeError::CapabilitiesLeft {
            effective,
            permitted,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_in_a_child() {
        // Run in a forked child so the test process keeps its privileges.
        if !crate::test_support::runs_as_root() {
            return;
        }
        let last = prepare();
        // SAFETY: the child only calls drop_to and reads the result before
        // _exit; the test binary's other threads are not touched.
        match unsafe { nix::unistd::fork() }.unwrap() {
            nix::unistd::ForkResult::Child => {
                let ok = drop_to(4321, 4322, last).is_ok()
                    && current_capabilities().map(|c| c == (0, 0)).unwrap_or(false)
                    && nix::unistd::getuid().as_raw() == 4321
                    && nix::unistd::getegid().as_raw() == 4322;
                // SAFETY: _exit ends the child without running the parent's
                // destructors.
                unsafe { libc::_exit(if ok { 0 } else { 1 }) }
            }
            nix::unistd::ForkResult::Parent { child } => {
                let status = nix::sys::wait::waitpid(child, None).unwrap();
                assert_eq!(status, nix::sys::wait::WaitStatus::Exited(child, 0));
            }
        }
    }
}
