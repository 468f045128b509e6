//! The jailer, as root: a jailed `tessera` boots the probe guest from a
//! config inside its jail and runs as uid/gid 1234 with no capabilities,
//! pivoted into the jail, in its own mount namespace and cgroups, with the
//! guest console reaching the caller; the cgroups are gone after it exits.
//! And each refused command line says what was wrong, exits nonzero and
//! leaves no cgroup behind.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use tessera_tests::jail::{
    cgroup_dir, jailer_command, remove_parent_cgroups, status_field, unique_id, wait_gone, JailBase,
};
use tessera_tests::{child_pid, probe_cmdline, workspace_bin, RunOutput, Running};

const CONTROLLERS: [&str; 2] = ["cpuset", "cpu"];

fn is_root() -> bool {
    status_field(std::process::id(), "Uid").is_some_and(|uid| uid.starts_with("0 "))
}

/// The jailer arguments for a jailed tessera booting `vm.json` in its jail.
fn tessera_args(base: &JailBase, id: &str, parent: &str) -> Vec<String> {
    [
        "--id",
        id,
        "--exec-file",
        workspace_bin("tessera").to_str().unwrap(),
        "--uid",
        "1234",
        "--gid",
        "1234",
        "--chroot-base-dir",
        base.path().to_str().unwrap(),
        "--parent-cgroup",
        parent,
        "--cgroup",
        "cpuset.cpus=0",
        "--cgroup",
        "cpu.shares=512",
        "--",
        "--no-api",
        "--config-file",
        "vm.json",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn cgroup_dirs(parent: &str, id: &str) -> Vec<PathBuf> {
    CONTROLLERS
        .iter()
        .map(|c| cgroup_dir(c, parent, id))
        .collect()
}

#[test]
fn jailed_tessera_boots_the_probe_confined_and_cleans_up() {
    if !tessera_tests::can_run(is_root(), "the jailer tests need root") {
        return;
    }
    let base = JailBase::new();
    let id = unique_id("jailed");
    let parent = unique_id("tessera-test");
    let root = base.prepare_probe(&id, &probe_cmdline("probe.ticks=30"));
    let args = tessera_args(&base, &id, &parent);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();

    let mut vm = Running::spawn(jailer_command(&args));
    let pid = vm.pid();
    let exited = vm.wait_until(Duration::from_secs(60), |out, _| {
        out.contains("probe.tick=1")
    });
    assert!(!exited, "tessera exited early\n{}", vm.stderr());
    let booted_after = vm.elapsed();

    // The jailer exec'd tessera in place: same pid, the jail's copy.
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let cmdline: Vec<String> = cmdline
        .split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    assert_eq!(cmdline[0], "/tessera", "{cmdline:?}");
    assert_eq!(&cmdline[1..3], ["--id", id.as_str()], "{cmdline:?}");
    for flag in [
        "--start-time-us",
        "--start-time-cpu-us",
        "--parent-cpu-time-us",
        "--backend-launcher-fd",
    ] {
        assert!(cmdline.iter().any(|a| a == flag), "{flag} in {cmdline:?}");
    }
    assert!(
        cmdline.ends_with(&["--no-api".into(), "--config-file".into(), "vm.json".into()]),
        "{cmdline:?}"
    );

    // Dropped to 1234:1234 with no capabilities at all.
    assert_eq!(status_field(pid, "Uid").unwrap(), "1234 1234 1234 1234");
    assert_eq!(status_field(pid, "Gid").unwrap(), "1234 1234 1234 1234");
    assert_eq!(status_field(pid, "Groups").unwrap(), "1234");
    for caps in ["CapEff", "CapPrm", "CapInh", "CapBnd", "CapAmb"] {
        assert_eq!(
            status_field(pid, caps).unwrap(),
            "0000000000000000",
            "{caps}"
        );
    }
    assert_eq!(status_field(pid, "NoNewPrivs").unwrap(), "1");

    // Pivoted into the jail, in a mount namespace of its own.
    let ns = |p: &str| std::fs::read_link(format!("/proc/{p}/ns/mnt")).unwrap();
    assert_ne!(ns(&pid.to_string()), ns("self"));
    assert_eq!(
        std::fs::read_link(format!("/proc/{pid}/root")).unwrap(),
        PathBuf::from("/")
    );
    let mountinfo = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    let root_mount = mountinfo
        .lines()
        .find(|l| l.split_whitespace().nth(4) == Some("/"))
        .expect("a root mount");
    assert_eq!(
        root_mount.split_whitespace().nth(3),
        Some(root.to_str().unwrap()),
        "{mountinfo}"
    );
    assert!(
        !mountinfo.lines().any(|l| l.contains("/proc ")),
        "no /proc in the jail\n{mountinfo}"
    );
    let mut entries: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/root"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    entries.sort();
    for expected in ["dev", "kernel", "run", "tessera", "vm.json"] {
        assert!(
            entries.iter().any(|e| e == expected),
            "{expected} in {entries:?}"
        );
    }
    assert!(!entries
        .iter()
        .any(|e| e == "etc" || e == "proc" || e == "old_root"));
    let kvm = std::fs::metadata(root.join("dev/kvm")).unwrap();
    assert_eq!(std::os::unix::fs::MetadataExt::uid(&kvm), 1234);
    // The jail is root's: the VMM cannot remove its exec file (or anything
    // else) to defeat the id check of a later run; it writes only in /run.
    for path in ["", "dev", "dev/net", "tessera", "vm.json"] {
        let meta = std::fs::metadata(root.join(path)).unwrap();
        let mode = std::os::unix::fs::MetadataExt::mode(&meta);
        assert_eq!(
            std::os::unix::fs::MetadataExt::uid(&meta),
            0,
            "/{path} belongs to root"
        );
        assert_eq!(mode & 0o022, 0, "/{path} mode {mode:o}: only root writes");
    }
    let run_dir = std::fs::metadata(root.join("run")).unwrap();
    assert_eq!(std::os::unix::fs::MetadataExt::uid(&run_dir), 1234);
    // As the VMM's uid, removing /tessera fails.
    let unlink = Command::new("rm")
        .arg("-f")
        .arg(root.join("tessera"))
        .uid(1234)
        .gid(1234)
        .output()
        .unwrap();
    assert!(!unlink.status.success(), "uid 1234 removed /tessera");
    assert!(root.join("tessera").exists());

    // In its cgroups, with the values written.
    let own_cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    for controller in CONTROLLERS {
        assert!(
            own_cgroups
                .lines()
                .any(|l| l.ends_with(&format!(":{controller}:/{parent}/{id}"))),
            "{controller}\n{own_cgroups}"
        );
    }
    let dirs = cgroup_dirs(&parent, &id);
    assert_eq!(
        std::fs::read_to_string(dirs[0].join("cpuset.cpus"))
            .unwrap()
            .trim(),
        "0"
    );
    assert_eq!(
        std::fs::read_to_string(dirs[1].join("cpu.shares"))
            .unwrap()
            .trim(),
        "512"
    );

    // The backend launcher: a root child, outside the VMM's cgroups.
    let launcher = child_pid(pid, "jailer").expect("the backend launcher");
    assert_eq!(status_field(launcher, "Uid").unwrap(), "0 0 0 0");
    let launcher_cgroups = std::fs::read_to_string(format!("/proc/{launcher}/cgroup")).unwrap();
    assert!(!launcher_cgroups.contains(&id), "{launcher_cgroups}");
    // In a mount namespace of its own where it can write only the
    // instance directory (the backends' jails) and the cgroups.
    assert_ne!(
        std::fs::read_link(format!("/proc/{launcher}/ns/mnt")).unwrap(),
        ns("self"),
        "the launcher's mount namespace"
    );
    let instance_dir = base.path().join("tessera").join(&id);
    let launcher_mounts = std::fs::read_to_string(format!("/proc/{launcher}/mountinfo")).unwrap();
    let visible: Vec<(&str, &str, &str)> = launcher_mounts
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let fstype = line.split_once(" - ")?.1.split(' ').next()?;
            Some((*fields.get(4)?, *fields.get(5)?, fstype))
        })
        .collect();
    for (at, (point, options, fstype)) in visible.iter().enumerate() {
        let hidden = visible[at + 1..].iter().any(|(p, _, _)| p == point);
        let may_write =
            std::path::Path::new(point).starts_with(&instance_dir) || fstype.starts_with("cgroup");
        assert!(
            hidden || may_write || options.split(',').any(|o| o == "ro"),
            "the launcher may write {point} ({fstype}, {options})"
        );
    }
    // Confined too: its own seccomp filter and only the capabilities it
    // uses (SYS_ADMIN, SETUID, SETGID, SETPCAP, SYS_RESOURCE, NET_ADMIN,
    // KILL), in its bounding set as well.
    assert_eq!(status_field(launcher, "Seccomp").unwrap(), "2");
    assert_eq!(status_field(launcher, "NoNewPrivs").unwrap(), "1");
    const LAUNCHER_CAPS: u64 = 0x0120_11e0;
    for caps in ["CapEff", "CapPrm", "CapBnd"] {
        let value = u64::from_str_radix(&status_field(launcher, caps).unwrap(), 16).unwrap();
        assert_eq!(value & !LAUNCHER_CAPS, 0, "launcher {caps} {value:#x}");
        assert_ne!(value, 0, "launcher {caps}");
    }

    // The guest runs to the end and its console reaches us.
    let exited = vm.wait_until(Duration::from_secs(60), |_, _| false);
    assert!(exited, "tessera did not exit\n{}", vm.stderr());
    let run: RunOutput = vm.finish();
    assert_eq!(run.code(), 0, "{}", run.describe());
    let ticks = run
        .stdout
        .lines()
        .filter(|l| l.trim_end().starts_with("probe.tick="))
        .count();
    assert_eq!(ticks, 30, "{}", run.describe());
    assert!(
        run.probe_report().contains_key("done"),
        "{}",
        run.describe()
    );
    assert!(
        run.stderr.contains(&format!("[{id}:")),
        "logs carry the id\n{}",
        run.stderr
    );

    // The launcher removes the cgroups once the VMM is gone.
    assert!(
        wait_gone(&dirs, Duration::from_secs(10)),
        "cgroups left behind: {dirs:?}"
    );
    remove_parent_cgroups(&CONTROLLERS, &parent);
    eprintln!(
        "jailed tessera: first probe tick after {booted_after:?}, whole run {:?}",
        run.elapsed
    );
}

/// Runs the jailer to its exit.
fn jailer_fails(args: &[&str]) -> (i32, String) {
    let output = jailer_command(args).output().expect("run the jailer");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    (output.status.code().unwrap_or(-1), stderr)
}

#[test]
fn refused_command_lines_name_the_bad_value_and_leave_nothing() {
    if !tessera_tests::can_run(is_root(), "the jailer tests need root") {
        return;
    }
    let base = JailBase::new();
    let parent = unique_id("tessera-test");
    let tessera = workspace_bin("tessera");
    let tessera = tessera.to_str().unwrap();
    let base_dir = base.path().to_str().unwrap();
    let long_id = "a".repeat(65);
    let taken = unique_id("taken");
    let taken_root = base.prepare_probe(&taken, "console=ttyS0");
    std::fs::write(taken_root.join("tessera"), b"an earlier instance").unwrap();

    let cases: Vec<(String, Vec<String>, String)> = {
        let args = |id: &str, exec: &str, uid: &str, cgroups: &[&str]| {
            let mut v: Vec<String> = [
                "--id",
                id,
                "--exec-file",
                exec,
                "--uid",
                uid,
                "--gid",
                "1234",
                "--chroot-base-dir",
                base_dir,
                "--parent-cgroup",
                &parent,
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            for c in cgroups {
                v.push("--cgroup".into());
                v.push(c.to_string());
            }
            v.extend(["--".into(), "--no-api".into()]);
            v
        };
        let bad_value = unique_id("badvalue");
        let unknown_file = unique_id("unknownfile");
        let missing = unique_id("missing");
        let baduid = unique_id("baduid");
        vec![
            (
                long_id.clone(),
                args(&long_id, tessera, "1234", &["cpuset.cpus=0"]),
                format!("invalid instance id \"{long_id}\": it must be 1 to 64 characters long"),
            ),
            (
                missing.clone(),
                args(&missing, "/nonexistent/tessera", "1234", &["cpuset.cpus=0"]),
                "invalid exec file /nonexistent/tessera: No such file or directory".into(),
            ),
            (
                bad_value.clone(),
                args(&bad_value, tessera, "1234", &["cpuset.cpus=abc"]),
                "cannot write \"abc\" to ".into(),
            ),
            (
                unknown_file.clone(),
                args(
                    &unknown_file,
                    tessera,
                    "1234",
                    &["cpuset.cpus=0", "cpu.no_such_file=1"],
                ),
                "unknown cgroup file \"cpu.no_such_file\"".into(),
            ),
            (
                taken.clone(),
                args(&taken, tessera, "1234", &["cpuset.cpus=0"]),
                format!("the jail {} already exists", taken_root.display()),
            ),
            (
                baduid.clone(),
                args(&baduid, tessera, "abc", &["cpuset.cpus=0"]),
                "invalid uid \"abc\"".into(),
            ),
        ]
    };
    for (id, args, expected) in &cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, stderr) = jailer_fails(&args);
        assert_ne!(code, 0, "{id}: {stderr}");
        assert!(
            stderr.contains(expected.as_str()),
            "{id}: expected {expected:?} in {stderr:?}"
        );
        assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr:?}");
        assert!(stderr.starts_with("jailer: "), "{stderr:?}");
        for dir in cgroup_dirs(&parent, id) {
            assert!(!dir.exists(), "{id}: {} left behind", dir.display());
        }
        if id != &taken {
            let copy = base.root("tessera", id).join("tessera");
            assert!(!copy.exists(), "{id}: {} left behind", copy.display());
        }
    }
    // The cgroup errors name the file too.
    let bad_value = &cases[2];
    let (_, stderr) = jailer_fails(&bad_value.1.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(stderr.contains("cpuset.cpus"), "{stderr}");
    // The taken jail was not touched.
    assert_eq!(
        std::fs::read(taken_root.join("tessera")).unwrap(),
        b"an earlier instance"
    );
    remove_parent_cgroups(&CONTROLLERS, &parent);
}

#[test]
fn jailed_and_unjailed_start_times() {
    if !tessera_tests::can_run(is_root(), "the jailer tests need root") {
        return;
    }
    // Not a pass/fail bound: the time to the guest's first output, for the
    // record (printed with --nocapture).
    let first_output = |mut command: Command| {
        let start = Instant::now();
        let mut vm = Running::spawn({
            command.current_dir("/");
            command
        });
        vm.wait_until(Duration::from_secs(60), |out, _| {
            out.contains("probe.cmdline")
        });
        let took = start.elapsed();
        let run = vm.finish();
        assert!(run.stdout.contains("probe.cmdline"), "{}", run.describe());
        took
    };
    let base = JailBase::new();
    let parent = unique_id("tessera-test");
    let id = unique_id("timed");
    let root = base.prepare_probe(&id, &probe_cmdline("probe.ticks=0"));
    let args = tessera_args(&base, &id, &parent);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let jailed = first_output(jailer_command(&args));
    let mut unjailed = Command::new(workspace_bin("tessera"));
    unjailed.args([
        "--no-api",
        "--config-file",
        root.join("vm.json").to_str().unwrap(),
    ]);
    unjailed.current_dir(&root);
    let unjailed = {
        let start = Instant::now();
        let mut vm = Running::spawn(unjailed);
        vm.wait_until(Duration::from_secs(60), |out, _| {
            out.contains("probe.cmdline")
        });
        let took = start.elapsed();
        let run = vm.finish();
        assert!(run.stdout.contains("probe.cmdline"), "{}", run.describe());
        took
    };
    eprintln!("time to the probe's first output: jailed {jailed:?}, unjailed {unjailed:?}");
    assert!(wait_gone(
        &cgroup_dirs(&parent, &id),
        Duration::from_secs(10)
    ));
    remove_parent_cgroups(&CONTROLLERS, &parent);
}

/// Replaces `range` of the jailer arguments `args` with `with`.
fn splice(args: &mut Vec<String>, range: std::ops::Range<usize>, with: &[&str]) {
    args.splice(range, with.iter().map(|s| s.to_string()));
}

/// The mount namespace of `pid`.
fn mount_ns(pid: &str) -> PathBuf {
    std::fs::read_link(format!("/proc/{pid}/ns/mnt")).unwrap()
}

/// The source path of `pid`'s root mount, from its mountinfo.
fn root_mount_source(pid: u32) -> String {
    let mountinfo = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    mountinfo
        .lines()
        .find(|l| l.split_whitespace().nth(4) == Some("/"))
        .and_then(|l| l.split_whitespace().nth(3))
        .unwrap_or_default()
        .to_string()
}

/// Asserts that `pid` runs as `uid` with no capabilities, under seccomp,
/// in a mount namespace of its own rooted at `jail`.
fn assert_confined(what: &str, pid: u32, uid: &str, jail: &std::path::Path) {
    assert_eq!(
        status_field(pid, "Uid").unwrap(),
        [uid; 4].join(" "),
        "{what} uid"
    );
    assert_eq!(
        status_field(pid, "CapEff").unwrap(),
        "0000000000000000",
        "{what} capabilities"
    );
    assert_eq!(status_field(pid, "Seccomp").unwrap(), "2", "{what} seccomp");
    assert_ne!(
        mount_ns(&pid.to_string()),
        mount_ns("self"),
        "{what} mount namespace"
    );
    assert_eq!(
        root_mount_source(pid),
        jail.to_str().unwrap(),
        "{what} root"
    );
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        assert!(
            status
                .lines()
                .any(|l| l.split_whitespace().eq(["Seccomp:", "2"])),
            "{what}: thread {:?} is not under seccomp",
            task.file_name()
        );
    }
}

#[test]
fn a_jailed_vmm_gets_jailed_backends_for_its_drive_and_interface() {
    if !tessera_tests::can_run(is_root(), "the jailer tests need root") {
        return;
    }
    const SEED: u64 = 0x5eed;
    let netns = tessera_tests::netns::Netns::with_tap("jail", "10.80.0.1/24");
    let base = JailBase::new();
    let id = unique_id("devices");
    let parent = unique_id("tessera-test");
    let root = base.prepare_probe(
        &id,
        &probe_cmdline(&format!(
            "probe.blk=write probe.blk_mib=2 probe.seed={SEED:#x} \
             probe.net=10.80.0.2/24 probe.net_serve_ms=8000"
        )),
    );
    // The drive lives in the VMM's jail, as with Firecracker, and belongs
    // to the VMM's uid: the VMM opens it and hands the launcher the fd.
    let disk = root.join("data.img");
    tessera_tests::sparse_file(&disk, 8 << 20);
    std::os::unix::fs::chown(&disk, Some(1234), Some(1234)).unwrap();
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("vm.json")).unwrap()).unwrap();
    config["drives"] = serde_json::json!([{"drive_id": "data_1", "path_on_host": "data.img",
        "is_root_device": false, "is_read_only": false}]);
    config["network-interfaces"] = serde_json::json!([{"iface_id": "eth0",
        "host_dev_name": "tap0", "guest_mac": "06:00:0a:50:00:02"}]);
    std::fs::write(root.join("vm.json"), config.to_string()).unwrap();

    let netns_path = format!("/var/run/netns/{}", netns.name());
    let mut args = tessera_args(&base, &id, &parent);
    let at = args.iter().position(|a| a == "--").unwrap();
    splice(
        &mut args,
        at..at,
        &[
            "--netns",
            &netns_path,
            "--backend-uid",
            "1235",
            "--backend-gid",
            "1235",
        ],
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut vm = Running::spawn(jailer_command(&args));
    let pid = vm.pid();
    vm.wait_until(Duration::from_secs(60), |out, _| {
        tessera_tests::has_line(out, "probe.net0=")
    });
    assert!(
        vm.stdout().contains("probe.blk0=ok") && vm.stdout().contains("probe.net0=up"),
        "stdout:\n{}\nstderr:\n{}",
        vm.stdout(),
        vm.stderr()
    );
    let ping = netns
        .command("ping")
        .args(["-c", "3", "-i", "0.2", "-W", "2", "10.80.0.2"])
        .output()
        .unwrap();
    assert!(
        ping.status.success(),
        "{}",
        String::from_utf8_lossy(&ping.stdout)
    );

    assert_confined("tessera", pid, "1234", &root);
    let launcher = child_pid(pid, "jailer").expect("the backend launcher");
    let mut backend_cgroups = Vec::new();
    let mut backend_jails = Vec::new();
    for (exe, device) in [("vhost-user-blk", "data_1"), ("vhost-user-net", "eth0")] {
        let backend = child_pid(launcher, exe).unwrap_or_else(|| panic!("no {exe}"));
        let jail = base.backend_root(&id, exe, device);
        assert_confined(exe, backend, "1235", &jail);
        assert_ne!(mount_ns(&backend.to_string()), mount_ns(&pid.to_string()));
        backend_jails.push(jail.parent().unwrap().to_path_buf());
        // Its jail holds the binary (and its libraries), not the disk or a
        // device node: the disk and the TAP came as fds.
        let entries: Vec<String> = std::fs::read_dir(&jail)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(entries.iter().any(|e| e == exe), "{entries:?}");
        assert!(
            !entries.iter().any(|e| e.ends_with(".img") || e == "dev"),
            "{entries:?}"
        );
        // A child of the VM's cgroups, under the VM's values.
        let leaf = format!("{id}/{device}");
        let own = std::fs::read_to_string(format!("/proc/{backend}/cgroup")).unwrap();
        for controller in CONTROLLERS {
            assert!(
                own.lines()
                    .any(|l| l.ends_with(&format!(":{controller}:/{parent}/{leaf}"))),
                "{exe}: {controller}\n{own}"
            );
        }
        backend_cgroups.extend(cgroup_dirs(&parent, &leaf));
        // The blk backend has an empty network namespace, only `lo`; the
        // net backend has the VMM's, where its TAP is.
        let backend_net = net_ns(&backend.to_string());
        if exe == "vhost-user-blk" {
            assert_ne!(backend_net, net_ns(&pid.to_string()), "{exe} netns");
            assert_ne!(backend_net, net_ns("self"), "{exe} netns");
            assert_eq!(interfaces(backend), ["lo"], "{exe} interfaces");
        } else {
            assert_eq!(backend_net, net_ns(&pid.to_string()), "{exe} netns");
        }
    }

    // A killed backend is replaced through the launcher, jailed the same
    // way (the old one's jail is gone, its device's jail rebuilt).
    let old = child_pid(launcher, "vhost-user-blk").expect("the blk backend");
    // SAFETY: kill sends SIGKILL to a backend the test's jailer started.
    assert_eq!(unsafe { libc::kill(old as i32, libc::SIGKILL) }, 0);
    vm.wait_until(Duration::from_secs(60), |_, err| {
        err.contains("drive data_1: a new backend took over")
    });
    let new = child_pid(launcher, "vhost-user-blk").expect("a new blk backend");
    assert_ne!(new, old);
    assert_confined(
        "vhost-user-blk",
        new,
        "1235",
        &base.backend_root(&id, "vhost-user-blk", "data_1"),
    );

    let exited = vm.wait_until(Duration::from_secs(60), |_, _| false);
    assert!(exited, "tessera did not exit\n{}", vm.stderr());
    let run = vm.finish();
    assert_eq!(run.code(), 0, "{}", run.describe());
    // The guest's writes reached the disk in the jail.
    let bytes = std::fs::read(&disk).unwrap();
    for sector in 0..(2u64 << 20) / 512 {
        let want = (sector ^ SEED).to_le_bytes();
        let at = (sector * 512) as usize;
        assert!(
            bytes[at..at + 512].chunks(8).all(|w| w == want),
            "sector {sector}"
        );
    }
    // Everything is cleaned up: the VMM's and the backends' cgroups, and
    // the backends themselves.
    let mut dirs = cgroup_dirs(&parent, &id);
    dirs.extend(backend_cgroups);
    assert!(
        wait_gone(&dirs, Duration::from_secs(15)),
        "cgroups left behind: {dirs:?}"
    );
    assert!(child_pid(launcher, "vhost-user").is_none());
    // And their jails: nothing but the VMM's own is left.
    assert!(
        wait_gone(&backend_jails, Duration::from_secs(15)),
        "backend jails left behind: {backend_jails:?}"
    );
    remove_parent_cgroups(&CONTROLLERS, &parent);
}

#[test]
fn a_jailed_vmm_serves_vsock_from_a_jailed_backend_that_sees_only_the_socket_dir() {
    use tessera_tests::vsock::{connect, echo_through, pattern};
    if !tessera_tests::can_run(is_root(), "the jailer tests need root") {
        return;
    }
    let base = JailBase::new();
    let id = unique_id("vsock");
    let parent = unique_id("tessera-test");
    let root = base.prepare_probe(
        &id,
        &probe_cmdline("probe.vsock=echo:52 probe.vsock_timeout_ms=60000"),
    );
    // uds_path as Firecracker's users give it, in the jail, in a
    // directory the VMM's uid may create the socket in.
    let run_dir = root.join("run");
    std::fs::create_dir(&run_dir).unwrap();
    std::os::unix::fs::chown(&run_dir, Some(1234), Some(1234)).unwrap();
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("vm.json")).unwrap()).unwrap();
    config["vsock"] = serde_json::json!({"guest_cid": 3, "uds_path": "/run/v.sock"});
    std::fs::write(root.join("vm.json"), config.to_string()).unwrap();
    let args = tessera_args(&base, &id, &parent);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut vm = Running::spawn(jailer_command(&args));
    let pid = vm.pid();
    vm.wait_until(Duration::from_secs(60), |out, _| {
        tessera_tests::has_line(out, "probe.vsock=listening")
            || tessera_tests::has_line(out, "probe.vsock=error")
    });
    assert!(
        vm.stdout().contains("probe.vsock=listening 52"),
        "stdout:\n{}\nstderr:\n{}",
        vm.stdout(),
        vm.stderr()
    );
    // The host side is the socket in the VMM's jail.
    let stream = connect(&run_dir.join("v.sock"), 52).expect("the guest accepts");
    let data = pattern(1 << 20, 5);
    assert!(
        echo_through(stream, data.clone()) == data,
        "the echo differs"
    );

    let launcher = child_pid(pid, "jailer").expect("the backend launcher");
    let backend = child_pid(launcher, "vhost-user-vsock").expect("the vsock backend");
    let jail = base.backend_root(&id, "vhost-user-vsock", "vsock");
    assert_confined("vhost-user-vsock", backend, "1234", &jail);
    // Its whole view: its jail, and the socket's directory of the VMM's
    // jail at /vsock (where guest connections to <uds_path>_<port> go).
    let mounts: Vec<String> = std::fs::read_to_string(format!("/proc/{backend}/mountinfo"))
        .unwrap()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4).map(str::to_string))
        .collect();
    assert_eq!(mounts, ["/", "/vsock"], "the backend's mounts");
    assert!(
        std::fs::symlink_metadata(format!("/proc/{backend}/root/vsock/v.sock")).is_ok(),
        "the socket's directory is not at /vsock in the backend's jail"
    );

    let exited = vm.wait_until(Duration::from_secs(60), |_, _| false);
    assert!(exited, "tessera did not exit\n{}", vm.stderr());
    let run = vm.finish();
    assert_eq!(run.code(), 0, "{}", run.describe());
    assert!(
        run.stdout.contains("probe.vsock=echoed 1048576 bytes"),
        "{}",
        run.describe()
    );
    remove_parent_cgroups(&CONTROLLERS, &parent);
}

/// The network namespace of `pid`.
fn net_ns(pid: &str) -> PathBuf {
    std::fs::read_link(format!("/proc/{pid}/ns/net")).unwrap()
}

/// The interfaces in `pid`'s network namespace.
fn interfaces(pid: u32) -> Vec<String> {
    let dev = std::fs::read_to_string(format!("/proc/{pid}/net/dev")).unwrap();
    dev.lines()
        .skip(2)
        .filter_map(|l| l.split(':').next())
        .map(|name| name.trim().to_string())
        .collect()
}

#[test]
fn the_launcher_refuses_a_tap_the_vmm_does_not_own() {
    if !tessera_tests::can_run(is_root(), "the jailer tests need root") {
        return;
    }
    // In the VMM's network namespace, a TAP that uid 4321 owns (another
    // VM's): root could attach it, the VMM (uid 1234) could not.
    let netns = tessera_tests::netns::Netns::new("notmine");
    netns.ip(&[
        "tuntap", "add", "dev", "tap0", "mode", "tap", "user", "4321",
    ]);
    let base = JailBase::new();
    let id = unique_id("nottap");
    let parent = unique_id("tessera-test");
    let root = base.prepare_probe(&id, &probe_cmdline("probe.ticks=0"));
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("vm.json")).unwrap()).unwrap();
    config["network-interfaces"] = serde_json::json!([{"iface_id": "eth0",
        "host_dev_name": "tap0", "guest_mac": "06:00:0a:50:00:02"}]);
    std::fs::write(root.join("vm.json"), config.to_string()).unwrap();
    let netns_path = format!("/var/run/netns/{}", netns.name());
    let mut args = tessera_args(&base, &id, &parent);
    let at = args.iter().position(|a| a == "--").unwrap();
    splice(&mut args, at..at, &["--netns", &netns_path]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut vm = Running::spawn(jailer_command(&args));
    let exited = vm.wait_until(Duration::from_secs(60), |_, _| false);
    assert!(exited, "tessera did not exit\n{}", vm.stderr());
    let run = vm.finish();
    assert_ne!(run.code(), 0, "{}", run.describe());
    assert!(
        run.stderr
            .contains("the TAP \"tap0\" belongs to uid 4321, not the VMM's uid 1234"),
        "{}",
        run.describe()
    );
    assert!(
        !base
            .path()
            .join("tessera")
            .join(&id)
            .join("vhost-user-net")
            .exists(),
        "a jail was built for the refused backend"
    );
    assert!(wait_gone(
        &cgroup_dirs(&parent, &id),
        Duration::from_secs(15)
    ));
    remove_parent_cgroups(&CONTROLLERS, &parent);
}

#[test]
fn a_daemonized_tessera_in_a_new_pid_namespace_serves_its_api() {
    if !tessera_tests::can_run(is_root(), "the jailer tests need root") {
        return;
    }
    let base = JailBase::new();
    let id = unique_id("daemon");
    let parent = unique_id("tessera-test");
    let root = base.prepare_probe(&id, &probe_cmdline("probe.ticks=0"));
    let mut args = tessera_args(&base, &id, &parent);
    let at = args.iter().position(|a| a == "--").unwrap();
    args.insert(at, "--daemonize".into());
    args.insert(at, "--new-pid-ns".into());
    args.retain(|a| a != "--no-api");
    args.extend(["--api-sock".into(), "/run/api.sock".into()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();

    // The jailer returns at once; the VMM lives on as a daemon.
    let status = jailer_command(&args).status().unwrap();
    assert!(status.success(), "{status:?}");
    let pid_file = root.join("tessera.pid");
    assert!(wait_gone_or_there(&pid_file), "no {}", pid_file.display());
    let pid: u32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let _daemon = KillOnDrop(pid);
    let sock = root.join("run/api.sock");
    assert!(tessera_tests::wait_for_path(&sock, Duration::from_secs(30)));

    // pid 1 of its own pid namespace, in a session of its own, stdio on
    // /dev/null, confined as usual.
    assert_eq!(
        status_field(pid, "NSpid").unwrap(),
        format!("{pid} 1"),
        "pid namespace"
    );
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    let own_session = std::fs::read_to_string("/proc/self/stat").unwrap();
    let own_session = own_session
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .nth(3);
    assert_ne!(Some(fields[3]), own_session, "a session of its own");
    assert_eq!(
        std::fs::read_link(format!("/proc/{pid}/fd/1")).unwrap(),
        PathBuf::from("/dev/null")
    );
    assert_eq!(status_field(pid, "Uid").unwrap(), "1234 1234 1234 1234");
    let mut api = tessera_tests::api::ApiClient::connect(&sock);
    let info = api.get("/");
    assert_eq!(info.status, 200, "{}", info.body);
    assert!(
        info.body.contains(&format!("\"id\":\"{id}\"")),
        "{}",
        info.body
    );
    assert!(info.body.contains("Running"), "{}", info.body);
    // The VMM thread confines itself once the guest runs.
    assert_eq!(status_field(pid, "Seccomp").unwrap(), "2");

    // Ending the VMM ends its launcher, which removes the cgroups.
    // SAFETY: kill sends a signal to the daemon this test started.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
    assert!(
        wait_gone(&cgroup_dirs(&parent, &id), Duration::from_secs(15)),
        "cgroups left behind"
    );
    remove_parent_cgroups(&CONTROLLERS, &parent);
}

/// Kills a daemon the test started, even when an assertion fails first.
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // SAFETY: kill sends a signal; a pid that is gone makes it fail.
        unsafe { libc::kill(self.0 as i32, libc::SIGKILL) };
    }
}

/// Waits up to 10 s for `path` to appear.
fn wait_gone_or_there(path: &std::path::Path) -> bool {
    tessera_tests::wait_for_path(path, Duration::from_secs(10))
}

/// Where the cgroup v2 hierarchy is mounted, if it is.
fn cgroup2_mount() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
    mounts.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        (fields.len() > 2 && fields[2] == "cgroup2").then(|| PathBuf::from(fields[1]))
    })
}

#[test]
fn a_jailed_tessera_under_cgroup_v2_gets_its_values_and_leaves_no_cgroup() {
    if !tessera_tests::can_run(is_root(), "the jailer tests need root") {
        return;
    }
    let mount = cgroup2_mount();
    if !tessera_tests::can_run(mount.is_some(), "no cgroup2 hierarchy is mounted") {
        return;
    }
    let mount = mount.unwrap();
    let controllers = std::fs::read_to_string(mount.join("cgroup.controllers")).unwrap();
    let hugetlb = controllers.split_whitespace().any(|c| c == "hugetlb");
    if !tessera_tests::can_run(
        hugetlb,
        &format!("the cgroup2 hierarchy has no hugetlb controller ({controllers})"),
    ) {
        return;
    }
    let base = JailBase::new();
    let id = unique_id("v2");
    let parent = unique_id("tessera-test");
    base.prepare_probe(&id, &probe_cmdline("probe.ticks=20"));
    let mut args = tessera_args(&base, &id, &parent);
    // Replace the v1 values with a v2 one.
    let at = args.iter().position(|a| a == "--cgroup").unwrap();
    splice(
        &mut args,
        at..at + 4,
        &[
            "--cgroup-version",
            "2",
            "--cgroup",
            "hugetlb.2MB.max=1073741824",
        ],
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut vm = Running::spawn(jailer_command(&args));
    let pid = vm.pid();
    let exited = vm.wait_until(Duration::from_secs(60), |out, _| {
        out.contains("probe.tick=1")
    });
    assert!(!exited, "tessera exited early\n{}", vm.stderr());

    let leaf = mount.join(&parent).join(&id);
    let own = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    assert!(
        own.lines().any(|l| l == format!("0::/{parent}/{id}")),
        "{own}"
    );
    assert_eq!(
        std::fs::read_to_string(leaf.join("hugetlb.2MB.max"))
            .unwrap()
            .trim(),
        "1073741824"
    );
    vm.wait_until(Duration::from_secs(60), |_, _| false);
    let run = vm.finish();
    assert_eq!(run.code(), 0, "{}", run.describe());
    assert!(
        wait_gone(&[leaf], Duration::from_secs(15)),
        "cgroup left behind"
    );
    let _ = std::fs::remove_dir(mount.join(&parent));
}

#[test]
fn every_flag_the_launcher_passes_on_is_one_its_backend_takes() {
    use jailer::backend_flags::{net_queues, samples};
    use jailer::launch::BackendKind;
    // Each backend runs with the sample and fds that are not open: it gets
    // through its own flag checks (clap's and its own) to the first fd.
    for (kind, exe) in [
        (BackendKind::Blk, "vhost-user-blk"),
        (BackendKind::Net, "vhost-user-net"),
        (BackendKind::Vsock, "vhost-user-vsock"),
    ] {
        for sample in samples(kind) {
            let mut args: Vec<String> = vec!["--fd".into(), "998".into()];
            let fd_flags = match kind {
                BackendKind::Blk => 1,
                BackendKind::Net => usize::from(net_queues(&sample) / 2),
                BackendKind::Vsock => 1,
            };
            let fd_flag = match kind {
                BackendKind::Blk => "--disk-fd",
                BackendKind::Net => "--tap-fd",
                BackendKind::Vsock => "--uds-fd",
            };
            if kind == BackendKind::Vsock {
                // What the launch request carries beside the flags.
                args.extend(["--uds-path".into(), "/nonexistent/v.sock".into()]);
                if !sample.contains(&"--guest-cid".to_string()) {
                    args.extend(["--guest-cid".into(), "3".into()]);
                }
            }
            for _ in 0..fd_flags {
                args.extend([fd_flag.to_string(), "999".to_string()]);
            }
            args.extend(sample.iter().cloned());
            let output = Command::new(workspace_bin(exe))
                .args(&args)
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert!(
                stderr.contains(&format!("{fd_flag} 999: Bad file descriptor")),
                "{exe} refused {sample:?}: {stderr}"
            );
        }
    }
}
