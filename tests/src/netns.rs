//! Private network namespaces for tests and benchmarks: traffic between
//! the host side and a guest never leaves the machine.

use std::process::Command;

/// A network namespace of the caller's own; deleted on drop.
pub struct Netns {
    name: String,
}

impl Netns {
    /// An empty namespace with `lo` up, named after `tag` and this process.
    pub fn new(tag: &str) -> Self {
        let netns = Self {
            name: format!("tessera-{tag}-{}", std::process::id()),
        };
        run_ip(&["netns", "add", &netns.name]);
        netns.ip(&["link", "set", "lo", "up"]);
        netns
    }

    /// A namespace holding `tap0` at `cidr` (e.g. `10.77.0.1/24`), up.
    pub fn with_tap(tag: &str, cidr: &str) -> Self {
        Self::with_tap_args(tag, cidr, &[])
    }

    /// As [`Netns::with_tap`], with a multi-queue `tap0` (one queue per
    /// queue pair of the guest's interface).
    pub fn with_multi_queue_tap(tag: &str, cidr: &str) -> Self {
        Self::with_tap_args(tag, cidr, &["multi_queue"])
    }

    fn with_tap_args(tag: &str, cidr: &str, extra: &[&str]) -> Self {
        let netns = Self::new(tag);
        netns.ip(&[&["tuntap", "add", "dev", "tap0", "mode", "tap"][..], extra].concat());
        netns.ip(&["addr", "add", cidr, "dev", "tap0"]);
        netns.ip(&["link", "set", "tap0", "up"]);
        netns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip ARGS` inside the namespace; panics if it fails.
    pub fn ip(&self, args: &[&str]) {
        run_ip(&[&["-n", &self.name][..], args].concat());
    }

    /// `program` run inside the namespace (add its arguments).
    pub fn command(&self, program: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name, program]);
        command
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn run_ip(args: &[&str]) {
    let status = Command::new("ip").args(args).status().expect("run ip");
    assert!(status.success(), "ip {args:?} failed");
}

/// Bridges: several TAPs on one Linux bridge, so that guests reach each
/// other (and, with an address on the bridge, the host side).
impl Netns {
    /// A namespace holding bridge `br0` with `taps` (e.g. `["tap0",
    /// "tap1"]`) as its ports, all up. STP is off, so the ports forward as
    /// soon as a backend opens their TAP. `br0` gets no address.
    pub fn with_bridge(tag: &str, taps: &[&str]) -> Self {
        let netns = Self::new(tag);
        netns.ip(&["link", "add", "br0", "type", "bridge", "stp_state", "0"]);
        netns.ip(&["link", "set", "br0", "up"]);
        for tap in taps {
            netns.ip(&["tuntap", "add", "dev", tap, "mode", "tap"]);
            netns.ip(&["link", "set", tap, "master", "br0"]);
            netns.ip(&["link", "set", tap, "up"]);
        }
        netns
    }
}

/// Fleets: one TAP per microVM, each on a subnet of its own.
impl Netns {
    /// A namespace holding `tap0` .. `tap<count-1>`, up, owned by `uid` (so
    /// that an unprivileged VMM may attach them), `tap<i>` at
    /// `<prefix>.<i>.1/24` (`prefix` such as "10.82"): the guest of VM `i`
    /// is `<prefix>.<i>.2`.
    pub fn with_tap_fleet(tag: &str, count: usize, uid: u32, prefix: &str) -> Self {
        let netns = Self::new(tag);
        let uid = uid.to_string();
        for index in 0..count {
            let tap = format!("tap{index}");
            netns.ip(&[
                "tuntap", "add", "dev", &tap, "mode", "tap", "user", &uid, "group", &uid,
            ]);
            netns.ip(&[
                "addr",
                "add",
                &format!("{prefix}.{index}.1/24"),
                "dev",
                &tap,
            ]);
            netns.ip(&["link", "set", &tap, "up"]);
        }
        netns
    }

    /// The path `--netns` takes.
    pub fn path(&self) -> String {
        format!("/var/run/netns/{}", self.name)
    }
}
