//! The launcher's request checks. Everything in a [`LaunchRequest`] comes
//! from the untrusted VMM, so each field is held to a whitelist: the device
//! id to the instance id rule (it becomes a directory and a cgroup name),
//! `args` to the backend's own flags and values that take no path or fd
//! ([`jailer::backend_flags`]), a net backend's `--queues` to its TAP
//! queue pairs, the TAP name to an interface name, and the fds to exactly
//! the expected count and types.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use backend_stats::StatsPage;
use jailer::backend_flags::check_args;
use jailer::id;
use jailer::launch::{BackendKind, LaunchRequest, MAX_TAP_QUEUE_PAIRS};
use nix::sys::socket::{getsockopt, sockopt};
use nix::sys::stat::{fstat, SFlag};

/// Checks a TAP interface name ([`tessera_types::TapName`]).
pub fn check_tap_name(name: &str) -> Result<(), String> {
    name.parse::<tessera_types::TapName>()
        .map(drop)
        .map_err(|err| err.to_string())
}

/// How many fds a request of `kind` must carry.
pub fn expected_fds(kind: BackendKind) -> usize {
    match kind {
        BackendKind::Blk => 3,
        BackendKind::Net => 2,
        BackendKind::Vsock => 3,
    }
}

/// Checks everything in `request` but the fds.
pub fn check_request(request: &LaunchRequest) -> Result<(), String> {
    id::validate_device_id(&request.device_id)
        .map_err(|err| format!("invalid device id: {err}"))?;
    check_args(request.kind, &request.args).map_err(|err| err.to_string())?;
    match request.kind {
        BackendKind::Blk => {
            if request.tap.is_some() || request.tap_queue_pairs != 0 || request.uds_path.is_some() {
                return Err("a blk request takes no tap, no uds_path and tap_queue_pairs 0".into());
            }
        }
        BackendKind::Vsock => {
            if request.tap.is_some() || request.tap_queue_pairs != 0 {
                return Err("a vsock request takes no tap and tap_queue_pairs 0".into());
            }
            let path = request
                .uds_path
                .as_deref()
                .ok_or_else(|| "a vsock request needs a uds_path".to_string())?;
            check_uds_path(path)?;
        }
        BackendKind::Net => {
            if request.uds_path.is_some() {
                return Err("a net request takes no uds_path".into());
            }
            let tap = request
                .tap
                .as_deref()
                .ok_or_else(|| "a net request needs a tap".to_string())?;
            check_tap_name(tap)?;
            if request.tap_queue_pairs == 0 || request.tap_queue_pairs > MAX_TAP_QUEUE_PAIRS {
                return Err(format!(
                    "tap_queue_pairs {} is out of range: expected 1 to {MAX_TAP_QUEUE_PAIRS}",
                    request.tap_queue_pairs
                ));
            }
            let queues = jailer::backend_flags::net_queues(&request.args);
            if queues != 2 * request.tap_queue_pairs {
                return Err(format!(
                    "--queues {queues} does not match tap_queue_pairs {}: the backend serves 2 queues per TAP queue",
                    request.tap_queue_pairs
                ));
            }
        }
    }
    Ok(())
}

/// Checks a vsock device's host socket path: absolute, without `..`, and
/// short enough for a socket address with `_<port>` after it.
pub fn check_uds_path(path: &str) -> Result<(), String> {
    /// `sun_path` holds 108 bytes with its NUL; `_4294967295` takes 11.
    const MAX_LEN: usize = 107 - 11;
    let parent_dir = path.split('/').any(|part| part == "..");
    if !path.starts_with('/') || parent_dir || path.len() > MAX_LEN || path.contains('\0') {
        return Err(format!(
            "invalid uds_path {path:?}: expected an absolute path of at most {MAX_LEN} bytes without '..'"
        ));
    }
    Ok(())
}

fn is_listening_unix_socket(fd: &OwnedFd) -> bool {
    let is_socket = fstat(fd.as_raw_fd())
        .map(|st| SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFSOCK)
        .unwrap_or(false);
    is_socket
        && getsockopt(&fd.as_fd(), sockopt::AcceptConn).unwrap_or(false)
        && getsockopt(&fd.as_fd(), sockopt::SockType)
            .map(|t| t == nix::sys::socket::SockType::Stream)
            .unwrap_or(false)
        && domain_is_unix(fd)
}

fn domain_is_unix(fd: &OwnedFd) -> bool {
    let mut domain: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: SO_DOMAIN writes one int into `domain`, whose size `len` gives.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_DOMAIN,
            (&mut domain as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    rc == 0 && domain == libc::AF_UNIX
}

fn is_disk(fd: &OwnedFd) -> bool {
    fstat(fd.as_raw_fd())
        .map(|st| {
            let kind = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT;
            kind == SFlag::S_IFREG || kind == SFlag::S_IFBLK
        })
        .unwrap_or(false)
}

/// Checks the fds: the count, a listening unix stream socket first, a
/// stats page second, and for `Blk` a regular file or block device third
/// (for `Vsock`, another listening socket).
pub fn check_fds(kind: BackendKind, fds: &[OwnedFd]) -> Result<(), String> {
    let expected = expected_fds(kind);
    if fds.len() != expected {
        return Err(format!(
            "a {kind:?} request carries exactly {expected} fds, not {}",
            fds.len()
        ));
    }
    if !is_listening_unix_socket(&fds[0]) {
        return Err("the first fd is not a listening unix stream socket".into());
    }
    StatsPage::check_fd(fds[1].as_fd()).map_err(|err| format!("the second fd: {err}"))?;
    if kind == BackendKind::Vsock && !is_listening_unix_socket(&fds[2]) {
        return Err("the third fd is not a listening unix stream socket".into());
    }
    if kind == BackendKind::Blk && !is_disk(&fds[2]) {
        return Err("the third fd is not a regular file or block device".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(kind: BackendKind, id: &str, tap: Option<&str>, pairs: u16) -> LaunchRequest {
        LaunchRequest {
            kind,
            device_id: id.into(),
            args: vec![],
            tap: tap.map(String::from),
            tap_queue_pairs: pairs,
            uds_path: None,
        }
    }

    #[test]
    fn requests() {
        check_request(&request(BackendKind::Blk, "rootfs", None, 0)).unwrap();
        check_request(&request(BackendKind::Net, "eth0", Some("tap0"), 1)).unwrap();
        check_request(&request(BackendKind::Blk, "drive_1", None, 0)).unwrap();
        let mut sixteen = request(BackendKind::Net, "eth0", Some("tap-1.a_b"), 16);
        sixteen.args = vec!["--queues".into(), "32".into()];
        check_request(&sixteen).unwrap();
        sixteen.tap_queue_pairs = 15;
        let err = check_request(&sixteen).unwrap_err();
        assert!(err.contains("--queues 32 does not match"), "{err}");
        for (req, what) in [
            (request(BackendKind::Blk, "../x", None, 0), "device id"),
            (request(BackendKind::Blk, "", None, 0), "device id"),
            (
                request(BackendKind::Blk, &"a".repeat(65), None, 0),
                "device id",
            ),
            (request(BackendKind::Blk, "a.b", None, 0), "device id"),
            (request(BackendKind::Blk, "d", Some("tap0"), 0), "no tap"),
            (request(BackendKind::Blk, "d", None, 1), "no tap"),
            (request(BackendKind::Net, "d", None, 1), "needs a tap"),
            (request(BackendKind::Net, "d", Some("tap/0"), 1), "TAP name"),
            (request(BackendKind::Net, "d", Some(".."), 1), "TAP name"),
            (
                request(BackendKind::Net, "d", Some("a-very-long-tap-name"), 1),
                "TAP name",
            ),
            (
                request(BackendKind::Net, "d", Some("tap0"), 0),
                "out of range",
            ),
            (
                request(BackendKind::Net, "d", Some("tap0"), 17),
                "out of range",
            ),
        ] {
            let err = check_request(&req).unwrap_err();
            assert!(err.contains(what), "{req:?}: {err}");
        }
    }

    #[test]
    fn fd_counts_and_types() {
        use std::os::unix::net::UnixListener;
        let dir = std::env::temp_dir().join(format!("jailer-fds-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let listener = UnixListener::bind(dir.join("s")).unwrap();
        let sock = || OwnedFd::from(listener.try_clone().unwrap());
        let file = || OwnedFd::from(std::fs::File::open("/proc/self/exe").unwrap());
        let page = StatsPage::create().unwrap();
        let stats = || page.fd().unwrap().try_clone_to_owned().unwrap();
        check_fds(BackendKind::Blk, &[sock(), stats(), file()]).unwrap();
        check_fds(BackendKind::Net, &[sock(), stats()]).unwrap();
        check_fds(BackendKind::Vsock, &[sock(), stats(), sock()]).unwrap();
        let err = check_fds(BackendKind::Blk, &[sock(), stats()]).unwrap_err();
        assert!(err.contains("exactly 3"), "{err}");
        assert!(check_fds(BackendKind::Net, &[sock(), stats(), file()])
            .unwrap_err()
            .contains("exactly 2"));
        assert!(check_fds(BackendKind::Net, &[]).is_err());
        assert!(check_fds(BackendKind::Net, &[file(), stats()])
            .unwrap_err()
            .contains("listening"));
        assert!(check_fds(BackendKind::Blk, &[sock(), stats(), sock()])
            .unwrap_err()
            .contains("regular file"));
        // A stats page that could shrink under the backend is refused.
        let err = check_fds(BackendKind::Net, &[sock(), file()]).unwrap_err();
        assert!(err.contains("sealed"), "{err}");
        // A connected (not listening) socket is refused too.
        let stream = std::os::unix::net::UnixStream::connect(dir.join("s")).unwrap();
        assert!(check_fds(BackendKind::Net, &[OwnedFd::from(stream), stats()]).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
