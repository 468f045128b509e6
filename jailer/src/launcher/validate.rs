//! The launcher's request checks. Everything in a [`LaunchRequest`] comes
//! from the untrusted VMM, so each field is held to a whitelist: the device
//! id to the instance id rule (it becomes a directory and a cgroup name),
//! `args` to a fixed set of flags per kind whose values are numbers, a MAC,
//! an enum or a short printable serial (never a path, never starting with
//! `-` so no value can pose as a flag), the TAP name to an interface name,
//! and the fds to exactly the expected count and types.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use jailer::id;
use jailer::launch::{BackendKind, LaunchRequest, MAX_TAP_QUEUE_PAIRS};
use nix::sys::socket::{getsockopt, sockopt};
use nix::sys::stat::{fstat, SFlag};

/// The longest serial number (virtio-blk's ID field).
pub const MAX_SERIAL_BYTES: usize = 20;
/// The most arguments a request may carry.
pub const MAX_ARGS: usize = 32;

/// What a flag's value must look like.
#[derive(Debug, Clone, Copy)]
enum Value {
    None,
    Number { min: u64, max: u64 },
    Serial,
    Mac,
    Engine,
}

const BLK_FLAGS: &[(&str, Value)] = &[
    ("--readonly", Value::None),
    ("--direct", Value::None),
    ("--queues", Value::Number { min: 1, max: 64 }),
    ("--queue-size", Value::Number { min: 1, max: 32768 }),
    ("--serial", Value::Serial),
    (
        "--poll-us",
        Value::Number {
            min: 0,
            max: 1_000_000,
        },
    ),
    ("--engine", Value::Engine),
    ("--io-engine", Value::Engine),
];

const NET_FLAGS: &[(&str, Value)] = &[
    ("--queues", Value::Number { min: 1, max: 64 }),
    ("--queue-size", Value::Number { min: 1, max: 32768 }),
    ("--mac", Value::Mac),
    (
        "--mtu",
        Value::Number {
            min: 68,
            max: 65535,
        },
    ),
    (
        "--poll-us",
        Value::Number {
            min: 0,
            max: 1_000_000,
        },
    ),
];

fn check_value(flag: &str, kind: Value, value: &str) -> Result<(), String> {
    let bad = |why: &str| Err(format!("invalid value {value:?} for {flag}: {why}"));
    match kind {
        Value::None => Ok(()),
        Value::Number { min, max } => {
            if value.is_empty() || value.len() > 10 || !value.bytes().all(|b| b.is_ascii_digit()) {
                return bad("expected a decimal number");
            }
            match value.parse::<u64>() {
                Ok(n) if (min..=max).contains(&n) => Ok(()),
                _ => bad(&format!("expected {min} to {max}")),
            }
        }
        Value::Serial => {
            if value.is_empty() || value.len() > MAX_SERIAL_BYTES {
                return bad("expected 1 to 20 bytes");
            }
            if value.starts_with('-') || !value.bytes().all(|b| (0x20..0x7f).contains(&b)) {
                return bad("expected printable ASCII not starting with '-'");
            }
            Ok(())
        }
        Value::Mac => {
            let parts: Vec<&str> = value.split(':').collect();
            let ok = parts.len() == 6
                && parts
                    .iter()
                    .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()));
            if ok {
                Ok(())
            } else {
                bad("expected xx:xx:xx:xx:xx:xx")
            }
        }
        Value::Engine => match value {
            "io_uring" | "sync" => Ok(()),
            _ => bad("expected io_uring or sync"),
        },
    }
}

/// Checks `args` against the whitelist of `kind`: known flags, each once,
/// values in their own argument.
pub fn check_args(kind: BackendKind, args: &[String]) -> Result<(), String> {
    if args.len() > MAX_ARGS {
        return Err(format!("{} arguments: at most {MAX_ARGS}", args.len()));
    }
    let table = match kind {
        BackendKind::Blk => BLK_FLAGS,
        BackendKind::Net => NET_FLAGS,
    };
    let mut seen: Vec<&str> = Vec::new();
    let mut iter = args.iter();
    while let Some(flag) = iter.next() {
        let Some((name, value_kind)) = table.iter().find(|(name, _)| name == flag) else {
            return Err(format!(
                "argument {flag:?} is not allowed for a {kind:?} backend"
            ));
        };
        if seen.contains(name) {
            return Err(format!("argument {flag} is given twice"));
        }
        seen.push(name);
        if !matches!(value_kind, Value::None) {
            let value = iter
                .next()
                .ok_or_else(|| format!("argument {flag} needs a value"))?;
            check_value(flag, *value_kind, value)?;
        }
    }
    if seen.contains(&"--engine") && seen.contains(&"--io-engine") {
        return Err("give --engine or --io-engine, not both".into());
    }
    Ok(())
}

/// Checks a TAP interface name: 1 to 15 bytes of `[A-Za-z0-9_.-]`, not
/// `.` or `..`.
pub fn check_tap_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() < libc::IFNAMSIZ
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid TAP name {name:?}: expected 1 to 15 of [A-Za-z0-9_.-]"
        ))
    }
}

/// How many fds a request of `kind` must carry.
pub fn expected_fds(kind: BackendKind) -> usize {
    match kind {
        BackendKind::Blk => 2,
        BackendKind::Net => 1,
    }
}

/// Checks everything in `request` but the fds.
pub fn check_request(request: &LaunchRequest) -> Result<(), String> {
    id::validate_device_id(&request.device_id)
        .map_err(|err| format!("invalid device id: {err}"))?;
    check_args(request.kind, &request.args)?;
    match request.kind {
        BackendKind::Blk => {
            if request.tap.is_some() || request.tap_queue_pairs != 0 {
                return Err("a blk request takes no tap and tap_queue_pairs 0".into());
            }
        }
        BackendKind::Net => {
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
        }
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

/// Checks the fds: the count, a listening unix stream socket first, and
/// for `Blk` a regular file or block device second.
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
    if kind == BackendKind::Blk && !is_disk(&fds[1]) {
        return Err("the second fd is not a regular file or block device".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(args: &[&str]) -> Vec<String> {
        args.iter().map(|s| s.to_string()).collect()
    }

    fn blk(args: &[&str]) -> Result<(), String> {
        check_args(BackendKind::Blk, &strings(args))
    }

    fn net(args: &[&str]) -> Result<(), String> {
        check_args(BackendKind::Net, &strings(args))
    }

    #[test]
    fn blk_whitelist() {
        blk(&[]).unwrap();
        blk(&[
            "--readonly",
            "--direct",
            "--queues",
            "4",
            "--queue-size",
            "256",
            "--serial",
            "drive 1",
            "--poll-us",
            "0",
            "--io-engine",
            "sync",
        ])
        .unwrap();
        blk(&["--engine", "io_uring"]).unwrap();
        for bad in [
            &["--path", "/etc/shadow"][..],
            &["--socket", "/tmp/x"],
            &["--fd", "5"],
            &["--disk-fd", "5"],
            &["--queues=4"],
            &["--queues"],
            &["--queues", "0"],
            &["--queues", "65"],
            &["--queues", "+4"],
            &["--queues", "4", "--queues", "4"],
            &["--serial", "--path=/etc/shadow"],
            &["--serial", "123456789012345678901"],
            &["--serial", "a\nb"],
            &["--serial", ""],
            &["--engine", "aio"],
            &["--engine", "sync", "--io-engine", "sync"],
            &["--mac", "02:00:00:00:00:01"],
            &["-r"],
            &["positional"],
        ] {
            assert!(blk(bad).is_err(), "{bad:?} should be refused");
        }
        let err = blk(&["--path", "/etc/shadow"]).unwrap_err();
        assert!(err.contains("--path"), "{err}");
    }

    #[test]
    fn net_whitelist() {
        net(&[
            "--queues",
            "2",
            "--queue-size",
            "1024",
            "--mac",
            "02:aA:00:00:00:01",
            "--mtu",
            "1500",
            "--poll-us",
            "50",
        ])
        .unwrap();
        for bad in [
            &["--tap", "tap0"][..],
            &["--tap-fd", "4"],
            &["--readonly"],
            &["--mac", "02:00:00:00:00"],
            &["--mac", "02:00:00:00:00:0g"],
            &["--mtu", "67"],
            &["--mtu", "65536"],
            &["--serial", "x"],
        ] {
            assert!(net(bad).is_err(), "{bad:?} should be refused");
        }
        let many: Vec<&str> = std::iter::repeat_n("--readonly", MAX_ARGS + 1).collect();
        assert!(blk(&many).unwrap_err().contains("at most"));
    }

    fn request(kind: BackendKind, id: &str, tap: Option<&str>, pairs: u16) -> LaunchRequest {
        LaunchRequest {
            kind,
            device_id: id.into(),
            args: vec![],
            tap: tap.map(String::from),
            tap_queue_pairs: pairs,
        }
    }

    #[test]
    fn requests() {
        check_request(&request(BackendKind::Blk, "rootfs", None, 0)).unwrap();
        check_request(&request(BackendKind::Net, "eth0", Some("tap0"), 1)).unwrap();
        check_request(&request(BackendKind::Blk, "drive_1", None, 0)).unwrap();
        check_request(&request(BackendKind::Net, "eth0", Some("tap-1.a_b"), 16)).unwrap();
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
        check_fds(BackendKind::Blk, &[sock(), file()]).unwrap();
        check_fds(BackendKind::Net, &[sock()]).unwrap();
        let err = check_fds(BackendKind::Blk, &[sock()]).unwrap_err();
        assert!(err.contains("exactly 2"), "{err}");
        assert!(check_fds(BackendKind::Net, &[sock(), file()])
            .unwrap_err()
            .contains("exactly 1"));
        assert!(check_fds(BackendKind::Net, &[]).is_err());
        assert!(check_fds(BackendKind::Net, &[file()])
            .unwrap_err()
            .contains("listening"));
        assert!(check_fds(BackendKind::Blk, &[sock(), sock()])
            .unwrap_err()
            .contains("regular file"));
        // A connected (not listening) socket is refused too.
        let stream = std::os::unix::net::UnixStream::connect(dir.join("s")).unwrap();
        assert!(check_fds(BackendKind::Net, &[OwnedFd::from(stream)]).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
