//! The values that cross Tessera's process boundaries (API body, config
//! file, launch request, backend command line) and must mean the same on
//! each side: each rule exists once, as a type with one `FromStr`, and
//! every crate parses through it. A value that passes the API therefore
//! also passes the launcher and the backend.
//!
//! Each type serializes as its text, so it can stand in a serde struct in
//! place of the `String` it replaces.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A value that breaks its type's rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TypeError {
    #[error("invalid MAC address {0:?}: expected six pairs of hex digits separated by ':'")]
    Mac(String),
    #[error("invalid TAP name {0:?}: expected 1 to 15 characters of [A-Za-z0-9_.-], not . or ..")]
    TapName(String),
    #[error("invalid device id {0:?}: expected 1 to 64 characters of [A-Za-z0-9_-]")]
    DeviceId(String),
    #[error("invalid instance id {0:?}: expected 1 to 64 characters of [A-Za-z0-9-]")]
    InstanceId(String),
    #[error("invalid inherited fd {0:?}: expected a number above 2 (0 to 2 are stdio)")]
    InheritedFd(String),
    #[error("invalid queue size {0:?}: expected {expected}", expected = QueueSize::EXPECTED)]
    QueueSize(String),
    #[error("invalid guest CID {0:?}: expected a number from 3 to 4294967295 (0 to 2 are reserved; 2 is the host)")]
    GuestCid(String),
}

/// Implements `Display`, `Serialize` and `Deserialize` through the text
/// form, and `as_str`/`Deref` for the string-backed types.
macro_rules! text_serde {
    ($type:ty) => {
        impl Serialize for $type {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.collect_str(self)
            }
        }

        impl<'de> Deserialize<'de> for $type {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let text = String::deserialize(deserializer)?;
                text.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

macro_rules! string_type {
    ($(#[$doc:meta])* $name:ident, $error:ident, $valid:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl FromStr for $name {
            type Err = TypeError;

            fn from_str(text: &str) -> Result<Self, TypeError> {
                let valid: fn(&str) -> bool = $valid;
                if valid(text) {
                    Ok(Self(text.to_string()))
                } else {
                    Err(TypeError::$error(text.to_string()))
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl std::ops::Deref for $name {
            type Target = str;

            fn deref(&self) -> &str {
                &self.0
            }
        }

        text_serde!($name);
    };
}

fn id_chars(text: &str, extra: &[u8]) -> bool {
    (1..=64).contains(&text.len())
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || extra.contains(&b))
}

string_type!(
    /// A drive or network interface id: Firecracker's rule for resource
    /// ids, 1 to 64 characters of `[A-Za-z0-9_-]`.
    DeviceId,
    DeviceId,
    |text| id_chars(text, b"_-")
);

string_type!(
    /// A microVM's instance id (`--id`): Firecracker's jailer rule, 1 to
    /// 64 characters of `[A-Za-z0-9-]`; it names a directory and a cgroup.
    InstanceId,
    InstanceId,
    |text| id_chars(text, b"-")
);

string_type!(
    /// A TAP device name: what the kernel takes (under `IFNAMSIZ`, 15
    /// bytes) restricted to `[A-Za-z0-9_.-]`, so that it is safe in a path
    /// and a log line, and never `.` or `..`.
    TapName,
    TapName,
    |text| {
        (1..16).contains(&text.len())
            && text != "."
            && text != ".."
            && text
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
    }
);

/// A MAC address, written `aa:bb:cc:dd:ee:ff` (hex digits only: no sign,
/// no shorter groups).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    pub fn bytes(&self) -> [u8; 6] {
        self.0
    }
}

impl FromStr for MacAddr {
    type Err = TypeError;

    fn from_str(text: &str) -> Result<Self, TypeError> {
        let bad = || TypeError::Mac(text.to_string());
        let mut mac = [0u8; 6];
        let mut parts = text.split(':');
        for byte in &mut mac {
            let part = parts.next().ok_or_else(bad)?;
            if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
        }
        match parts.next() {
            None => Ok(Self(mac)),
            Some(_) => Err(bad()),
        }
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

text_serde!(MacAddr);

/// The number of a file descriptor inherited from the process that started
/// this one (the jailer's launcher or the VMM hands backends their socket,
/// disk or TAP this way, and the jailer the VMM its launcher socket): a
/// number above 2, since 0 to 2 are stdio. [`InheritedFd::take`] then
/// checks that it is open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InheritedFd(i32);

impl InheritedFd {
    pub fn raw(self) -> i32 {
        self.0
    }

    /// Takes ownership of the descriptor, once it is known to be open.
    pub fn take(self) -> std::io::Result<std::os::fd::OwnedFd> {
        // SAFETY: F_GETFD only reads the flags of the fd, if it is open.
        if unsafe { libc::fcntl(self.0, libc::F_GETFD) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: the fd is open (checked above), above stdio, and was
        // inherited for this purpose; the caller takes it over once.
        Ok(unsafe { std::os::fd::FromRawFd::from_raw_fd(self.0) })
    }
}

impl FromStr for InheritedFd {
    type Err = TypeError;

    fn from_str(text: &str) -> Result<Self, TypeError> {
        match text.parse::<i32>() {
            Ok(fd) if fd > 2 => Ok(Self(fd)),
            _ => Err(TypeError::InheritedFd(text.to_string())),
        }
    }
}

impl fmt::Display for InheritedFd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A virtqueue size a vhost-user backend offers: a power of two from 1 to
/// 32768 (a split virtqueue's limit), in decimal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueSize(u16);

impl QueueSize {
    pub const MAX: u16 = 32768;
    /// What a queue size looks like, for error messages.
    pub const EXPECTED: &'static str = "a power of two up to 32768";

    pub fn get(self) -> u16 {
        self.0
    }
}

impl FromStr for QueueSize {
    type Err = TypeError;

    fn from_str(text: &str) -> Result<Self, TypeError> {
        let digits =
            !text.is_empty() && text.len() <= 5 && text.bytes().all(|b| b.is_ascii_digit());
        match text.parse::<u16>() {
            Ok(size) if digits && size.is_power_of_two() && size <= Self::MAX => Ok(Self(size)),
            _ => Err(TypeError::QueueSize(text.to_string())),
        }
    }
}

impl fmt::Display for QueueSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A guest's vsock context id: 3 to `u32::MAX` (0 and 1 are reserved, 2
/// is the host). Firecracker's API takes it as a JSON number; the config
/// space holds it as 64 bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct GuestCid(u32);

impl GuestCid {
    pub const MIN: u32 = 3;

    pub fn new(cid: u64) -> Result<Self, TypeError> {
        match u32::try_from(cid) {
            Ok(cid) if cid >= Self::MIN => Ok(Self(cid)),
            _ => Err(TypeError::GuestCid(cid.to_string())),
        }
    }

    pub fn get(self) -> u64 {
        u64::from(self.0)
    }
}

impl FromStr for GuestCid {
    type Err = TypeError;

    fn from_str(text: &str) -> Result<Self, TypeError> {
        let digits = !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit());
        match text.parse::<u64>() {
            Ok(cid) if digits => Self::new(cid).map_err(|_| TypeError::GuestCid(text.into())),
            _ => Err(TypeError::GuestCid(text.to_string())),
        }
    }
}

impl<'de> Deserialize<'de> for GuestCid {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Self::new(u64::deserialize(deserializer)?).map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for GuestCid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_cids_start_at_3_and_fit_32_bits() {
        for good in ["3", "4294967295"] {
            assert_eq!(good.parse::<GuestCid>().unwrap().to_string(), good);
        }
        for bad in ["0", "1", "2", "4294967296", "-3", "+3", "x", ""] {
            assert!(bad.parse::<GuestCid>().is_err(), "{bad}");
        }
        assert_eq!(serde_json::from_str::<GuestCid>("52").unwrap().get(), 52);
        let err = serde_json::from_str::<GuestCid>("2")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("invalid guest CID \"2\""), "{err}");
        assert!(serde_json::from_str::<GuestCid>("\"3\"").is_err());
        assert_eq!(
            serde_json::to_string(&GuestCid::new(3).unwrap()).unwrap(),
            "3"
        );
    }

    #[test]
    fn queue_sizes_are_powers_of_two_up_to_32768() {
        for good in ["1", "256", "1024", "32768"] {
            assert_eq!(good.parse::<QueueSize>().unwrap().to_string(), good);
        }
        for bad in ["0", "3", "1000", "65536", "-1", "+4", "x", ""] {
            assert!(bad.parse::<QueueSize>().is_err(), "{bad}");
        }
    }

    #[test]
    fn inherited_fds_are_above_stdio_and_must_be_open() {
        for bad in ["0", "2", "-1", "x", ""] {
            assert!(bad.parse::<InheritedFd>().is_err(), "{bad}");
        }
        let fd: InheritedFd = "1000".parse().unwrap();
        assert_eq!(fd.raw(), 1000);
        assert_eq!(
            fd.take().unwrap_err().raw_os_error(),
            Some(libc::EBADF),
            "fd 1000 is not open in the test"
        );
    }

    #[test]
    fn mac_addresses_take_exactly_six_hex_pairs() {
        let mac: MacAddr = "06:00:AC:10:00:02".parse().unwrap();
        assert_eq!(mac.bytes(), [6, 0, 0xac, 0x10, 0, 2]);
        assert_eq!(mac.to_string(), "06:00:ac:10:00:02");
        for bad in [
            "+6:00:ac:10:00:02",
            "06:00:ac:10:00",
            "06:00:ac:10:00:02:03",
            "6:00:ac:10:00:02",
            "06-00-ac-10-00-02",
            "0x:00:ac:10:00:02",
            "",
        ] {
            assert_eq!(
                bad.parse::<MacAddr>(),
                Err(TypeError::Mac(bad.into())),
                "{bad}"
            );
        }
    }

    #[test]
    fn tap_names_fit_ifnamsiz_and_paths() {
        for good in ["tap0", "fc-tap_1", "veth.1", "a", "abcdefghijklmno"] {
            assert_eq!(good.parse::<TapName>().unwrap().as_str(), good);
        }
        for bad in [
            "",
            ".",
            "..",
            "abcdefghijklmnop",
            "tap/0",
            "tap 0",
            "tap\0",
            "täp",
        ] {
            assert!(bad.parse::<TapName>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn device_and_instance_ids_follow_firecracker() {
        assert!("drive_1-a".parse::<DeviceId>().is_ok());
        assert!("drive_1".parse::<InstanceId>().is_err());
        assert!("551e7604-e35c-42b3".parse::<InstanceId>().is_ok());
        assert!("a".repeat(64).parse::<DeviceId>().is_ok());
        assert!("a".repeat(65).parse::<DeviceId>().is_err());
        assert!("".parse::<InstanceId>().is_err());
        let err = "a/b".parse::<DeviceId>().unwrap_err().to_string();
        assert!(err.contains("\"a/b\""), "{err}");
    }

    #[test]
    fn serde_goes_through_the_same_rule() {
        #[derive(Serialize, Deserialize)]
        struct Nic {
            mac: MacAddr,
            tap: TapName,
        }
        let nic: Nic =
            serde_json::from_str(r#"{"mac": "06:00:ac:10:00:02", "tap": "tap0"}"#).unwrap();
        assert_eq!(
            serde_json::to_string(&nic).unwrap(),
            r#"{"mac":"06:00:ac:10:00:02","tap":"tap0"}"#
        );
        let err = serde_json::from_str::<Nic>(r#"{"mac": "+6:00:ac:10:00:02", "tap": "tap0"}"#)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("invalid MAC address"), "{err}");
    }
}
