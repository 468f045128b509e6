//! Seccomp: every thread of `tessera` and of its backends runs under its
//! filter (checked in /proc while a probe guest does block and network
//! I/O), and a syscall left out of a thread kind's filter kills the process
//! with SIGSYS. The second part runs the real binaries with
//! `--seccomp-filter`: the built-in JSON with one syscall removed from one
//! thread kind, as Firecracker's seccomp tests do. The third installs each
//! thread kind's built-in filter in a forked child and shows that an
//! allowed call goes through and a forbidden one (`socket`) gets SIGSYS.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};
use tessera_tests::netns::Netns;
use tessera_tests::{guest_artifacts, repo_root, workspace_bin, Running, VmConfig};

const DEADLINE: Duration = Duration::from_secs(60);
const GUEST_IP: &str = "10.79.0.2";
const HOST_CIDR: &str = "10.79.0.1/24";

/// The built-in filter JSON of `binary`.
fn builtin_filters(binary: &str) -> Value {
    let path = repo_root().join(format!("resources/seccomp/{binary}.json"));
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// `binary`'s built-in filters with `syscalls` removed from thread kind
/// `kind`, written to `dir`.
fn filters_without(dir: &Path, binary: &str, kind: &str, syscalls: &[&str]) -> PathBuf {
    let mut filters = builtin_filters(binary);
    let rules = filters[kind]["filter"].as_array_mut().unwrap();
    let before = rules.len();
    rules.retain(|rule| !syscalls.contains(&rule["syscall"].as_str().unwrap()));
    assert!(
        rules.len() < before,
        "{kind} of {binary} allows none of {syscalls:?}"
    );
    let path = dir.join(format!("{binary}-{kind}.json"));
    std::fs::write(&path, filters.to_string()).unwrap();
    path
}

fn probe_config(dir: &Path, args: &str, devices: &[(&str, Value)]) -> PathBuf {
    let mut config = VmConfig::new(guest_artifacts().probe(), &format!("console=ttyS0 {args}"))
        .mem_mib(256)
        .to_json();
    for (key, value) in devices {
        config[*key] = value.clone();
    }
    let path = dir.join("vm.json");
    std::fs::write(&path, config.to_string()).unwrap();
    path
}

fn disk(dir: &Path) -> PathBuf {
    let path = dir.join("disk.img");
    tessera_tests::sparse_file(&path, 8 << 20);
    path
}

/// (thread name, Seccomp mode, number of filters) for every thread of `pid`.
fn thread_confinement(pid: u32) -> Vec<(String, u32, u32)> {
    let mut threads = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse::<u32>().ok())
                .unwrap_or(0)
        };
        threads.push((
            comm.trim().to_string(),
            field("Seccomp:"),
            field("Seccomp_filters:"),
        ));
    }
    threads.sort();
    threads
}

fn assert_all_confined(what: &str, threads: &[(String, u32, u32)]) {
    assert!(!threads.is_empty(), "{what}: no threads");
    for (name, mode, _) in threads {
        assert_eq!(
            *mode, 2,
            "{what} thread {name:?} is not confined: {threads:?}"
        );
    }
}

#[test]
fn every_thread_of_the_vmm_and_its_backends_is_confined() {
    let dir = tempfile::tempdir().unwrap();
    let netns = Netns::with_tap("seccomp", HOST_CIDR);
    let drive = json!([{"drive_id": "data", "path_on_host": disk(dir.path()),
                        "is_root_device": false, "is_read_only": false}]);
    let iface = json!([{"iface_id": "eth0", "host_dev_name": "tap0"}]);
    let config = probe_config(
        dir.path(),
        &format!(
            "probe.blk=write probe.blk_mib=2 probe.net={GUEST_IP}/24 probe.net_serve_ms=30000"
        ),
        &[("drives", drive), ("network-interfaces", iface)],
    );
    let sock = dir.path().join("api.sock");
    let mut command = netns.command(workspace_bin("tessera").to_str().unwrap());
    command
        .arg("--api-sock")
        .arg(&sock)
        .arg("--config-file")
        .arg(&config);
    let mut vm = Running::spawn(command);
    vm.wait_until(DEADLINE, |out, _| {
        tessera_tests::has_line(out, "probe.net0=")
    });
    assert!(
        vm.stdout().contains("probe.blk0=ok") && vm.stdout().contains("probe.net0=up"),
        "stdout:\n{}\nstderr:\n{}",
        vm.stdout(),
        vm.stderr()
    );
    // Traffic through the net backend's worker, and an API round trip.
    let ping = netns
        .command("ping")
        .args(["-c", "3", "-i", "0.2", "-W", "2", GUEST_IP])
        .output()
        .unwrap();
    assert!(
        ping.status.success(),
        "{}",
        String::from_utf8_lossy(&ping.stdout)
    );
    let mut api = tessera_tests::api::ApiClient::connect(&sock);
    assert_eq!(api.get("/").status, 200);

    let vmm = thread_confinement(vm.pid());
    assert_all_confined("tessera", &vmm);
    for name in ["fc_api", "fc_vcpu 0", "vu_watchdog"] {
        assert!(
            vmm.iter().any(|(n, ..)| n == name),
            "no {name} thread: {vmm:?}"
        );
    }
    // The backend starters (one per backend binary) have their filter,
    // and each backend runs under its starter's and its own.
    for binary in ["vhost-user-blk", "vhost-user-net"] {
        let starter =
            std::fs::read_to_string(format!("/proc/{}/task/{}/children", vm.pid(), vm.pid()))
                .unwrap_or_default()
                .split_whitespace()
                .filter_map(|pid| pid.parse::<u32>().ok())
                .find(|pid| {
                    std::fs::read(format!("/proc/{pid}/cmdline"))
                        .map(|c| {
                            String::from_utf8_lossy(&c).contains(&format!(
                                "--backend-starter\0{}",
                                workspace_bin(binary).display()
                            ))
                        })
                        .unwrap_or(false)
                })
                .unwrap_or_else(|| panic!("no backend starter for {binary}"));
        let threads = thread_confinement(starter);
        assert_all_confined(&format!("the backend starter of {binary}"), &threads);
        let pid = tessera_tests::descendant_pid(vm.pid(), binary)
            .unwrap_or_else(|| panic!("no {binary}"));
        let threads = thread_confinement(pid);
        assert_all_confined(binary, &threads);
        // Workers that served requests stacked their own filter on main's,
        // on the starter's one program (each kind a stack of programs: its
        // errno programs, then its own).
        let path = repo_root().join(format!("resources/seccomp/{binary}.json"));
        let builtin = tessera_seccomp::Filters::from_json_file(&path).unwrap();
        let stacked =
            1 + builtin.stack("main").unwrap().len() + builtin.stack("worker").unwrap().len();
        let workers: Vec<_> = threads
            .iter()
            .filter(|(n, ..)| n == "vring_worker")
            .collect();
        assert!(!workers.is_empty(), "{binary}: no worker: {threads:?}");
        assert!(
            workers
                .iter()
                .any(|(_, _, filters)| *filters as usize == stacked),
            "{binary}: no worker with its own filter ({stacked} programs): {threads:?}"
        );
    }
    assert!(vm.wait_until(DEADLINE, |_, _| false) || vm.stdout().contains("probe.done"));
}

/// Boots the probe under `tessera` with `args`, with the drive of `dir`;
/// returns the finished run.
fn run_tessera(dir: &Path, extra: &[&str], probe_args: &str) -> tessera_tests::RunOutput {
    let drive = json!([{"drive_id": "data", "path_on_host": disk(dir),
                        "is_root_device": false, "is_read_only": false}]);
    let config = probe_config(dir, probe_args, &[("drives", drive)]);
    let mut command = Command::new(workspace_bin("tessera"));
    command.arg("--config-file").arg(&config).args(extra);
    let mut vm = Running::spawn(command);
    vm.wait_until(DEADLINE, |_, _| false);
    vm.finish()
}

fn assert_sigsys(what: &str, run: &tessera_tests::RunOutput) {
    assert_eq!(
        run.status.and_then(|s| s.signal()),
        Some(libc::SIGSYS),
        "{what}: status {:?}\n{}",
        run.status,
        run.describe()
    );
}

#[test]
fn a_vcpu_thread_without_kvm_run_dies_with_sigsys() {
    let dir = tempfile::tempdir().unwrap();
    let filter = filters_without(dir.path(), "tessera", "vcpu", &["ioctl"]);
    let run = run_tessera(
        dir.path(),
        &["--no-api", "--seccomp-filter", filter.to_str().unwrap()],
        "probe.ticks=0",
    );
    assert_sigsys("vcpu", &run);
    assert!(
        !run.stdout.contains("probe."),
        "the guest ran:\n{}",
        run.stdout
    );
}

#[test]
fn the_vmm_thread_without_its_event_loop_dies_with_sigsys() {
    let dir = tempfile::tempdir().unwrap();
    let filter = filters_without(dir.path(), "tessera", "vmm", &["epoll_wait", "epoll_pwait"]);
    let run = run_tessera(
        dir.path(),
        &["--no-api", "--seccomp-filter", filter.to_str().unwrap()],
        "probe.ticks=0",
    );
    assert_sigsys("vmm", &run);
}

#[test]
fn the_api_thread_without_accept_dies_with_sigsys_on_the_first_client() {
    let dir = tempfile::tempdir().unwrap();
    let filter = filters_without(dir.path(), "tessera", "api", &["accept4"]);
    let sock = dir.path().join("api.sock");
    let mut command = Command::new(workspace_bin("tessera"));
    command
        .arg("--api-sock")
        .arg(&sock)
        .arg("--seccomp-filter")
        .arg(&filter);
    let mut vm = Running::spawn(command);
    assert!(tessera_tests::wait_for_path(&sock, DEADLINE));
    // Alive and listening until a client comes.
    std::thread::sleep(Duration::from_millis(200));
    assert!(!vm.wait_until(Duration::ZERO, |_, _| false));
    let _client = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    vm.wait_until(DEADLINE, |_, _| false);
    assert_sigsys("api", &vm.finish());
}

/// Starts `vhost-user-blk` on `socket` with a custom filter file.
fn blk_backend(dir: &Path, filter: &Path) -> (Running, PathBuf) {
    let socket = dir.join("blk.sock");
    let mut command = Command::new(workspace_bin("vhost-user-blk"));
    command
        .arg("--socket")
        .arg(&socket)
        .arg("--path")
        .arg(disk(dir))
        .arg("--seccomp-filter")
        .arg(filter);
    let backend = Running::spawn(command);
    assert!(tessera_tests::wait_for_path(&socket, DEADLINE));
    (backend, socket)
}

fn run_with_socket_drive(dir: &Path, socket: &Path) -> tessera_tests::RunOutput {
    let drive = json!([{"drive_id": "data", "socket": socket, "is_root_device": false}]);
    let config = probe_config(dir, "probe.blk=write probe.blk_mib=1", &[("drives", drive)]);
    let mut command = Command::new(workspace_bin("tessera"));
    command.arg("--no-api").arg("--config-file").arg(&config);
    let mut vm = Running::spawn(command);
    vm.wait_until(DEADLINE, |_, _| false);
    vm.finish()
}

#[test]
fn a_blk_backend_main_thread_without_recvmsg_dies_with_sigsys() {
    let dir = tempfile::tempdir().unwrap();
    let filter = filters_without(dir.path(), "vhost-user-blk", "main", &["recvmsg"]);
    let (mut backend, socket) = blk_backend(dir.path(), &filter);
    let vm = run_with_socket_drive(dir.path(), &socket);
    backend.wait_until(DEADLINE, |_, _| false);
    assert_sigsys("vhost-user-blk main", &backend.finish());
    // The VMM reports the broken backend instead of crashing.
    assert!(
        vm.status.and_then(|s| s.code()).is_some(),
        "{}",
        vm.describe()
    );
}

#[test]
fn a_blk_worker_without_its_io_syscalls_dies_with_sigsys_and_the_vmm_lives() {
    let dir = tempfile::tempdir().unwrap();
    let filter = filters_without(
        dir.path(),
        "vhost-user-blk",
        "worker",
        &["io_uring_enter", "pread64", "pwrite64", "preadv", "pwritev"],
    );
    let (mut backend, socket) = blk_backend(dir.path(), &filter);
    let vm = run_with_socket_drive(dir.path(), &socket);
    backend.wait_until(DEADLINE, |_, _| false);
    assert_sigsys("vhost-user-blk worker", &backend.finish());
    // The guest saw the drive fail, and the VMM ran the guest to its end.
    assert_eq!(vm.code(), 0, "{}", vm.describe());
    assert!(
        vm.stdout.contains("probe.blk0=") && !vm.stdout.contains("probe.blk0=ok"),
        "{}",
        vm.describe()
    );
}

#[test]
fn a_net_worker_without_writev_dies_with_sigsys_and_the_vmm_lives() {
    let dir = tempfile::tempdir().unwrap();
    let netns = Netns::with_tap("seccomp-net", HOST_CIDR);
    let filter = filters_without(dir.path(), "vhost-user-net", "worker", &["writev"]);
    let socket = dir.path().join("net.sock");
    let mut command = netns.command(workspace_bin("vhost-user-net").to_str().unwrap());
    command
        .arg("--socket")
        .arg(&socket)
        .args(["--tap", "tap0", "--seccomp-filter"])
        .arg(&filter);
    let mut backend = Running::spawn(command);
    assert!(tessera_tests::wait_for_path(&socket, DEADLINE));
    let iface = json!([{"iface_id": "eth0", "socket": socket}]);
    // The guest's first frame (its ARP for the host) goes through writev.
    let config = probe_config(
        dir.path(),
        &format!("probe.net={GUEST_IP}/24 probe.ping=10.79.0.1:1 probe.ticks=2"),
        &[("network-interfaces", iface)],
    );
    let mut command = Command::new(workspace_bin("tessera"));
    command.arg("--no-api").arg("--config-file").arg(&config);
    let mut vm = Running::spawn(command);
    backend.wait_until(DEADLINE, |_, _| false);
    assert_sigsys("vhost-user-net worker", &backend.finish());
    vm.wait_until(DEADLINE, |_, _| false);
    let vm = vm.finish();
    assert_eq!(vm.code(), 0, "{}", vm.describe());
    assert!(vm.stdout.contains("probe.net0=up"), "{}", vm.describe());
}

/// Forks; the child installs `kinds` of `binary`'s built-in filters (in
/// order, as a backend worker stacks `worker` on `main`) and runs `call`.
/// Returns how the child ended.
fn in_confined_child(binary: &str, kinds: &[&str], call: fn()) -> std::process::ExitStatus {
    let path = repo_root().join(format!("resources/seccomp/{binary}.json"));
    let filters = tessera_seccomp::Filters::from_json_file(&path).unwrap();
    let programs: Vec<_> = kinds
        .iter()
        .flat_map(|kind| filters.stack(kind).unwrap().to_vec())
        .collect();
    // SAFETY: the child only installs the prepared filters (prctl and
    // seccomp), makes one syscall and exits; it touches no lock.
    match unsafe { libc::fork() } {
        0 => {
            for program in &programs {
                if seccompiler::apply_filter(program).is_err() {
                    // SAFETY: ends the child at once.
                    unsafe { libc::_exit(3) };
                }
            }
            call();
            // SAFETY: as above.
            unsafe { libc::_exit(0) }
        }
        pid => {
            assert!(pid > 0, "fork failed");
            let mut status = 0;
            // SAFETY: waits for the child just forked.
            assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
            std::process::ExitStatus::from_raw(status)
        }
    }
}

fn open_a_socket() {
    // SAFETY: a plain syscall; its result does not matter.
    unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
}

fn write_nothing() {
    // SAFETY: a zero-length write to stderr.
    unsafe { libc::write(2, std::ptr::null(), 0) };
}

#[test]
fn the_built_in_filters_kill_a_forbidden_syscall_on_every_thread_kind() {
    let kinds: [(&str, &[&str]); 7] = [
        ("tessera", &["vmm"]),
        ("tessera", &["api"]),
        ("tessera", &["vcpu"]),
        ("vhost-user-blk", &["main"]),
        ("vhost-user-blk", &["main", "worker"]),
        ("vhost-user-net", &["main"]),
        ("vhost-user-net", &["main", "worker"]),
    ];
    for (binary, kinds) in kinds {
        // An allowed call goes through: the filter is not deny-all.
        let allowed = in_confined_child(binary, kinds, write_nothing);
        assert_eq!(allowed.code(), Some(0), "{binary} {kinds:?}: {allowed:?}");
        // No thread of any Tessera process may open a socket.
        let forbidden = in_confined_child(binary, kinds, open_a_socket);
        assert_eq!(
            forbidden.signal(),
            Some(libc::SIGSYS),
            "{binary} {kinds:?}: {forbidden:?}"
        );
    }
}
