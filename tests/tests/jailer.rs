//! The jailer, as root: a jailed `tessera` boots the probe guest from a
//! config inside its jail and runs as uid/gid 1234 with no capabilities,
//! pivoted into the jail, in its own mount namespace and cgroups, with the
//! guest console reaching the caller; the cgroups are gone after it exits.
//! And each refused command line says what was wrong, exits nonzero and
//! leaves no cgroup behind.

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
    if !is_root() {
        eprintln!("skipped: the jailer tests need root");
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
    assert_eq!(
        std::fs::read_link(format!("/proc/{launcher}/ns/mnt")).unwrap(),
        ns("self"),
        "the launcher stays in the host's mount namespace"
    );

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
    if !is_root() {
        eprintln!("skipped: the jailer tests need root");
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
    if !is_root() {
        eprintln!("skipped: the jailer tests need root");
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
