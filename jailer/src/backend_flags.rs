//! The backend flags a VMM may ask the launcher for, per kind: flags of the
//! backends' own command lines (`vhost-user-blk`, `vhost-user-net`) that
//! take no path and no fd, each with values that backend accepts: numbers
//! in its ranges, powers of two, a MAC, an enum or a short printable serial
//! (never a path, never starting with `-`, so that no value can pose as a
//! flag). [`samples`] lists values at the edges of each, which the jailer's
//! integration tests hand to the real binaries.

use crate::launch::BackendKind;

/// The longest serial number (virtio-blk's ID field).
pub const MAX_SERIAL_BYTES: usize = 20;
/// The most arguments a request may carry.
pub const MAX_ARGS: usize = 32;
/// A net backend's `--queues` when none is given.
pub const DEFAULT_NET_QUEUES: u16 = 2;

/// A refused backend argument.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FlagError {
    #[error("{0} arguments: at most {MAX_ARGS}")]
    TooMany(usize),
    #[error("argument {flag:?} is not allowed for a {kind:?} backend")]
    NotAllowed { flag: String, kind: BackendKind },
    #[error("argument {0} is given twice")]
    Twice(String),
    #[error("argument {0} needs a value")]
    NeedsValue(String),
    #[error("invalid value {value:?} for {flag}: expected {expected}")]
    Value {
        flag: String,
        value: String,
        expected: String,
    },
}

/// What a flag's value must look like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Value {
    None,
    Number { min: u64, max: u64 },
    Even { min: u64, max: u64 },
    QueueSize,
    Serial,
    Mac,
    IoEngine,
}

/// `vhost-user-blk`'s flags (less `--socket`, `--fd`, `--path`,
/// `--disk-fd`, `--seccomp-filter`, `--no-seccomp`, and `--threads`, which
/// must not exceed `--queues` and which the VMM leaves to the backend).
pub const BLK_FLAGS: &[(&str, Value)] = &[
    ("--readonly", Value::None),
    ("--direct", Value::None),
    ("--queues", Value::Number { min: 1, max: 64 }),
    ("--queue-size", Value::QueueSize),
    ("--serial", Value::Serial),
    (
        "--poll-us",
        Value::Number {
            min: 0,
            max: 1_000_000,
        },
    ),
    ("--io-engine", Value::IoEngine),
];

/// `vhost-user-net`'s flags (less `--socket`, `--fd`, `--tap`, `--tap-fd`,
/// `--seccomp-filter`, `--no-seccomp` and `--defer-early-vring-enable`,
/// which only QEMU needs).
pub const NET_FLAGS: &[(&str, Value)] = &[
    ("--queues", Value::Even { min: 2, max: 32 }),
    ("--queue-size", Value::QueueSize),
    ("--mac", Value::Mac),
    (
        "--mtu",
        Value::Number {
            min: 68,
            max: 65535,
        },
    ),
];

/// `vhost-user-vsock`'s flags (less `--socket`, `--fd`, `--uds-path`,
/// `--uds-fd`, `--seccomp-filter` and `--no-seccomp`).
pub const VSOCK_FLAGS: &[(&str, Value)] = &[
    (
        "--guest-cid",
        Value::Number {
            min: tessera_types::GuestCid::MIN as u64,
            max: u32::MAX as u64,
        },
    ),
    ("--queue-size", Value::QueueSize),
    ("--max-connections", Value::Number { min: 1, max: 65536 }),
];

/// The flags of `kind`.
pub fn flags(kind: BackendKind) -> &'static [(&'static str, Value)] {
    match kind {
        BackendKind::Blk => BLK_FLAGS,
        BackendKind::Net => NET_FLAGS,
        BackendKind::Vsock => VSOCK_FLAGS,
    }
}

fn number(value: &str) -> Option<u64> {
    if value.is_empty() || value.len() > 10 || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    value.parse().ok()
}

/// What `kind` expects, if `value` is not it.
fn value_error(kind: Value, value: &str) -> Option<String> {
    let expected = match kind {
        Value::None => return None,
        Value::Number { min, max } => match number(value) {
            Some(n) if (min..=max).contains(&n) => return None,
            _ => format!("{min} to {max}"),
        },
        Value::Even { min, max } => match number(value) {
            Some(n) if (min..=max).contains(&n) && n % 2 == 0 => return None,
            _ => format!("an even number from {min} to {max}"),
        },
        Value::QueueSize => match value.parse::<tessera_types::QueueSize>() {
            Ok(_) => return None,
            Err(_) => tessera_types::QueueSize::EXPECTED.to_string(),
        },
        Value::Serial => {
            let printable = value.bytes().all(|b| (0x20..0x7f).contains(&b));
            if (1..=MAX_SERIAL_BYTES).contains(&value.len()) && printable && !value.starts_with('-')
            {
                return None;
            }
            format!("1 to {MAX_SERIAL_BYTES} bytes of printable ASCII not starting with '-'")
        }
        Value::Mac => {
            if value.parse::<tessera_types::MacAddr>().is_ok() {
                return None;
            }
            "xx:xx:xx:xx:xx:xx".to_string()
        }
        Value::IoEngine => match value {
            "io_uring" | "sync" => return None,
            _ => "io_uring or sync".to_string(),
        },
    };
    Some(expected)
}

/// Checks `args` against the flags of `kind`: known flags, each once,
/// values in their own argument.
pub fn check_args(kind: BackendKind, args: &[String]) -> Result<(), FlagError> {
    if args.len() > MAX_ARGS {
        return Err(FlagError::TooMany(args.len()));
    }
    let table = flags(kind);
    let mut seen: Vec<&str> = Vec::new();
    let mut iter = args.iter();
    while let Some(flag) = iter.next() {
        let Some((name, value_kind)) = table.iter().find(|(name, _)| name == flag) else {
            return Err(FlagError::NotAllowed {
                flag: flag.clone(),
                kind,
            });
        };
        if seen.contains(name) {
            return Err(FlagError::Twice(flag.clone()));
        }
        seen.push(name);
        if *value_kind != Value::None {
            let value = iter
                .next()
                .ok_or_else(|| FlagError::NeedsValue(flag.clone()))?;
            if let Some(expected) = value_error(*value_kind, value) {
                return Err(FlagError::Value {
                    flag: flag.clone(),
                    value: value.clone(),
                    expected,
                });
            }
        }
    }
    Ok(())
}

/// A net backend's `--queues` in `args` (checked), or its default.
pub fn net_queues(args: &[String]) -> u16 {
    args.iter()
        .position(|a| a == "--queues")
        .and_then(|at| args.get(at + 1))
        .and_then(|value| value.parse().ok())
        .unwrap_or(DEFAULT_NET_QUEUES)
}

/// Values at the edges of what [`check_args`] accepts for each flag of
/// `kind`: one `[flag]` or `[flag, value]` each.
pub fn samples(kind: BackendKind) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for (flag, value) in flags(kind) {
        let values: Vec<String> = match *value {
            Value::None => Vec::new(),
            Value::Number { min, max } | Value::Even { min, max } => {
                vec![min.to_string(), max.to_string()]
            }
            Value::QueueSize => vec!["1".into(), tessera_types::QueueSize::MAX.to_string()],
            Value::Serial => vec!["a".into(), "x".repeat(MAX_SERIAL_BYTES), "drive 1~".into()],
            Value::Mac => vec!["06:00:0a:50:00:02".into(), "FF:fe:00:00:00:00".into()],
            Value::IoEngine => vec!["io_uring".into(), "sync".into()],
        };
        if values.is_empty() {
            out.push(vec![flag.to_string()]);
        }
        for v in values {
            out.push(vec![flag.to_string(), v]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(args: &[&str]) -> Vec<String> {
        args.iter().map(|s| s.to_string()).collect()
    }

    fn blk(args: &[&str]) -> Result<(), FlagError> {
        check_args(BackendKind::Blk, &strings(args))
    }

    fn net(args: &[&str]) -> Result<(), FlagError> {
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
        for bad in [
            &["--path", "/etc/shadow"][..],
            &["--socket", "/tmp/x"],
            &["--fd", "5"],
            &["--disk-fd", "5"],
            &["--seccomp-filter", "x"],
            &["--no-seccomp"],
            &["--threads", "2"],
            &["--engine", "sync"],
            &["--queues=4"],
            &["--queues"],
            &["--queues", "0"],
            &["--queues", "65"],
            &["--queues", "+4"],
            &["--queues", "4", "--queues", "4"],
            &["--queue-size", "0"],
            &["--queue-size", "100"],
            &["--queue-size", "65536"],
            &["--serial", "--path=/etc/shadow"],
            &["--serial", "123456789012345678901"],
            &["--serial", "a\nb"],
            &["--serial", ""],
            &["--io-engine", "aio"],
            &["--mac", "02:00:00:00:00:01"],
            &["-r"],
            &["positional"],
        ] {
            assert!(blk(bad).is_err(), "{bad:?} should be refused");
        }
        let err = blk(&["--path", "/etc/shadow"]).unwrap_err().to_string();
        assert!(err.contains("--path"), "{err}");
        let err = blk(&["--queue-size", "100"]).unwrap_err().to_string();
        assert_eq!(
            err,
            "invalid value \"100\" for --queue-size: expected a power of two up to 32768"
        );
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
        ])
        .unwrap();
        for bad in [
            &["--tap", "tap0"][..],
            &["--tap-fd", "4"],
            &["--defer-early-vring-enable"],
            &["--readonly"],
            &["--poll-us", "50"],
            &["--queues", "1"],
            &["--queues", "3"],
            &["--queues", "34"],
            &["--queues", "64"],
            &["--queue-size", "1000"],
            &["--mac", "02:00:00:00:00"],
            &["--mac", "02:00:00:00:00:0g"],
            &["--mac", "+2:00:00:00:00:01"],
            &["--mtu", "67"],
            &["--mtu", "65536"],
            &["--serial", "x"],
        ] {
            assert!(net(bad).is_err(), "{bad:?} should be refused");
        }
        let many: Vec<&str> = std::iter::repeat_n("--readonly", MAX_ARGS + 1).collect();
        assert_eq!(blk(&many), Err(FlagError::TooMany(MAX_ARGS + 1)));
        assert_eq!(net_queues(&strings(&["--mtu", "1500"])), 2);
        assert_eq!(net_queues(&strings(&["--queues", "8"])), 8);
    }

    #[test]
    fn samples_pass_the_whitelist() {
        for kind in [BackendKind::Blk, BackendKind::Net, BackendKind::Vsock] {
            let samples = samples(kind);
            assert!(samples.len() >= flags(kind).len());
            for sample in samples {
                check_args(kind, &sample).unwrap_or_else(|err| panic!("{sample:?}: {err}"));
            }
        }
    }
}
