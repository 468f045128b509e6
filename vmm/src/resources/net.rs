//! Checks of a network interface against the host, made when it is
//! configured (so that a bad one is a 400, not a failed start): its TAP
//! exists in the VMM's network namespace and, for more than one queue
//! pair, was created multi-queue (`ip tuntap add ... multi_queue`), since
//! the backend opens one TAP queue per pair.

use std::path::Path;

use vmm_config::NetworkInterfaceConfig;

/// Where the kernel lists network devices; TAPs have a `tun_flags` file.
const SYSFS_NET: &str = "/sys/class/net";
/// IFF_MULTI_QUEUE in `/sys/class/net/<tap>/tun_flags`.
const IFF_MULTI_QUEUE: u32 = 0x100;

/// Errors checking an interface's TAP.
#[derive(Debug, thiserror::Error)]
pub enum TapCheckError {
    #[error("interface {id:?}: host_dev_name {name:?}: no such network device in the VMM's network namespace")]
    NoSuchTap { id: String, name: String },
    #[error("interface {id:?}: host_dev_name {name:?} is not a TAP device (no {path})")]
    NotATap {
        id: String,
        name: String,
        path: String,
    },
    #[error("interface {id:?}: num_queue_pairs is {pairs} but TAP {name:?} is not multi-queue (tun_flags {flags:#x}); create it with `ip tuntap add dev {name} mode tap multi_queue`")]
    NotMultiQueue {
        id: String,
        name: String,
        pairs: u16,
        flags: u32,
    },
}

/// Checks the TAP of a `host_dev_name` interface; nothing to check for an
/// external backend (`socket`), whose queues are negotiated at start.
pub fn check_host_tap(iface: &NetworkInterfaceConfig) -> Result<(), TapCheckError> {
    let Some(name) = &iface.host_dev_name else {
        return Ok(());
    };
    let id = || iface.iface_id.clone();
    if nix::net::if_::if_nametoindex(name.as_str()).is_err() {
        return Err(TapCheckError::NoSuchTap {
            id: id(),
            name: name.clone(),
        });
    }
    // A jailed VMM may not see sysfs; its TAP is then checked at start.
    if !Path::new(SYSFS_NET).is_dir() {
        return Ok(());
    }
    let pairs = iface.queue_pairs();
    let path = Path::new(SYSFS_NET).join(name).join("tun_flags");
    let flags = std::fs::read_to_string(&path)
        .ok()
        .and_then(|text| parse_tun_flags(&text))
        .ok_or_else(|| TapCheckError::NotATap {
            id: id(),
            name: name.clone(),
            path: path.display().to_string(),
        })?;
    if pairs > 1 && flags & IFF_MULTI_QUEUE == 0 {
        return Err(TapCheckError::NotMultiQueue {
            id: id(),
            name: name.clone(),
            pairs,
            flags,
        });
    }
    Ok(())
}

/// Parses sysfs's `0x1102\n`.
fn parse_tun_flags(text: &str) -> Option<u32> {
    let text = text.trim();
    let hex = text.strip_prefix("0x").unwrap_or(text);
    u32::from_str_radix(hex, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tun_flags_parse() {
        assert_eq!(parse_tun_flags("0x1102\n"), Some(0x1102));
        assert_eq!(parse_tun_flags("0x1002"), Some(0x1002));
        assert_eq!(parse_tun_flags("junk"), None);
    }

    #[test]
    fn lo_is_not_a_tap() {
        let iface: NetworkInterfaceConfig =
            serde_json::from_str(r#"{"iface_id": "eth0", "host_dev_name": "lo"}"#).unwrap();
        let err = check_host_tap(&iface).unwrap_err().to_string();
        assert_eq!(
            err,
            "interface \"eth0\": host_dev_name \"lo\" is not a TAP device (no /sys/class/net/lo/tun_flags)"
        );
    }
}
