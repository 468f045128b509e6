//! The jailer's command line: Firecracker's jailer flags, plus Tessera's
//! backend flags. Parsing only checks shapes; [`crate::env::Env::new`]
//! validates the values (ids, paths, cgroups, limits) with errors that name
//! the bad value.

use std::path::PathBuf;

use clap::Parser;

/// Firecracker's default chroot base.
pub const DEFAULT_CHROOT_BASE: &str = "/srv/jailer";

/// Tessera's jailer: runs the VMM (and, for `tessera`, its device
/// backends) in a chroot, namespaces and cgroups with a dropped uid, with
/// Firecracker's jailer command line.
#[derive(Debug, Clone, Parser)]
#[command(name = "jailer", version, about)]
pub struct Cli {
    /// The instance id: 1 to 64 letters, digits and '-'.
    #[arg(long)]
    pub id: String,
    /// The binary to jail and exec (copied into the jail).
    #[arg(long, value_name = "BIN")]
    pub exec_file: PathBuf,
    /// The uid the binary runs as.
    #[arg(long, value_name = "N", allow_hyphen_values = true)]
    pub uid: String,
    /// The gid the binary runs as.
    #[arg(long, value_name = "N", allow_hyphen_values = true)]
    pub gid: String,
    /// The base folder where chroot jails are built.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_CHROOT_BASE)]
    pub chroot_base_dir: PathBuf,
    /// The network namespace (a path such as /var/run/netns/NAME) to join.
    #[arg(long, value_name = "PATH")]
    pub netns: Option<PathBuf>,
    /// The cgroup version: 1 or 2.
    #[arg(long, value_name = "1|2", default_value = "1")]
    pub cgroup_version: String,
    /// A cgroup file and the value to write in it, e.g. cpuset.cpus=0-1;
    /// may be repeated.
    #[arg(long, value_name = "FILE=VALUE")]
    pub cgroup: Vec<String>,
    /// The cgroup the instance's cgroup is created in (default: the exec
    /// file's name, e.g. "tessera").
    #[arg(long, value_name = "PATH")]
    pub parent_cgroup: Option<String>,
    /// A resource limit, fsize=BYTES or no-file=N; may be repeated.
    #[arg(long, value_name = "RES=VAL")]
    pub resource_limit: Vec<String>,
    /// Detach: setsid, and stdin, stdout and stderr to /dev/null.
    #[arg(long)]
    pub daemonize: bool,
    /// Exec the binary in a new pid namespace.
    #[arg(long)]
    pub new_pid_ns: bool,
    /// Tessera: the uid device backends run as (default: --uid).
    #[arg(long, value_name = "N", allow_hyphen_values = true)]
    pub backend_uid: Option<String>,
    /// Tessera: the gid device backends run as (default: --gid).
    #[arg(long, value_name = "N", allow_hyphen_values = true)]
    pub backend_gid: Option<String>,
    /// Tessera: the vhost-user-blk binary (default: the one next to
    /// --exec-file).
    #[arg(long, value_name = "PATH")]
    pub vhost_user_blk_bin: Option<PathBuf>,
    /// Tessera: the vhost-user-net binary (default: the one next to
    /// --exec-file).
    #[arg(long, value_name = "PATH")]
    pub vhost_user_net_bin: Option<PathBuf>,
    /// Tessera: the vhost-user-vsock binary (default: the one next to
    /// --exec-file).
    #[arg(long, value_name = "PATH")]
    pub vhost_user_vsock_bin: Option<PathBuf>,
    /// Arguments for the binary, after `--`.
    #[arg(last = true, value_name = "ARGS")]
    pub exec_args: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("jailer").chain(args.iter().copied()))
    }

    const BASE: [&str; 8] = [
        "--id",
        "vm1",
        "--exec-file",
        "/bin/true",
        "--uid",
        "1234",
        "--gid",
        "1235",
    ];

    #[test]
    fn defaults_follow_firecracker() {
        let cli = parse(&BASE).unwrap();
        assert_eq!(cli.id, "vm1");
        assert_eq!(cli.chroot_base_dir, PathBuf::from("/srv/jailer"));
        assert_eq!(cli.cgroup_version, "1");
        assert!(cli.cgroup.is_empty() && cli.resource_limit.is_empty());
        assert!(!cli.daemonize && !cli.new_pid_ns);
        assert!(cli.netns.is_none() && cli.parent_cgroup.is_none());
        assert!(cli.backend_uid.is_none() && cli.vhost_user_blk_bin.is_none());
        assert!(cli.exec_args.is_empty());
    }

    #[test]
    fn repeated_flags_and_exec_args() {
        let mut args = BASE.to_vec();
        args.extend([
            "--cgroup",
            "cpuset.cpus=0",
            "--cgroup",
            "cpu.shares=100",
            "--resource-limit",
            "no-file=100",
            "--cgroup-version",
            "2",
            "--daemonize",
            "--new-pid-ns",
            "--backend-uid",
            "2000",
            "--",
            "--config-file",
            "vm.json",
            "--id",
            "ignored-by-jailer",
        ]);
        let cli = parse(&args).unwrap();
        assert_eq!(cli.cgroup, ["cpuset.cpus=0", "cpu.shares=100"]);
        assert_eq!(cli.resource_limit, ["no-file=100"]);
        assert_eq!(cli.cgroup_version, "2");
        assert!(cli.daemonize && cli.new_pid_ns);
        assert_eq!(cli.backend_uid.as_deref(), Some("2000"));
        assert_eq!(
            cli.exec_args,
            ["--config-file", "vm.json", "--id", "ignored-by-jailer"]
        );
    }

    #[test]
    fn vmm_flags_such_as_enable_pci_pass_through_after_the_separator() {
        let mut args = BASE.to_vec();
        args.extend(["--", "--enable-pci", "--api-sock", "/run/api.sock"]);
        assert_eq!(
            parse(&args).unwrap().exec_args,
            ["--enable-pci", "--api-sock", "/run/api.sock"]
        );
        // Before `--` it is not the jailer's, as with Firecracker's jailer.
        let mut args = BASE.to_vec();
        args.push("--enable-pci");
        assert!(parse(&args).is_err());
    }

    #[test]
    fn required_flags() {
        for skip in [0, 2, 4, 6] {
            let mut args = BASE.to_vec();
            args.drain(skip..skip + 2);
            assert!(parse(&args).is_err(), "without {}", BASE[skip]);
        }
        let mut args = BASE.to_vec();
        args.push("--bogus");
        assert!(parse(&args).is_err());
    }
}
