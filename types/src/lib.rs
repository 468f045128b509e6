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

#[cfg(test)]
mod tests {
    use super::*;

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
