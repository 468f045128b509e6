//! Backend reconnect: `kill -9` a drive's backend again and again while the
//! probe guest writes a range, flushes, reads it back and compares
//! (`probe.blk=write`). Each time the VMM brings in a new backend, which
//! resubmits what the old one left in flight; the guest must see no error
//! and no lost or torn write, and the host file must hold every byte. The
//! stall per restart (kill to the VMM's "took over" line) is printed as
//! `reconnect-stall-ms` for BENCHMARKS.md.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;
use tessera_tests::{descendant_pid, guest_artifacts, workspace_bin, Running, VmConfig};

const DEADLINE: Duration = Duration::from_secs(300);
const SEED: u64 = 0x5eed_0b0e;
/// Kills per run (TESSERA_RECONNECT_KILLS overrides).
const KILLS: usize = 20;
/// The range the probe writes and reads back: long enough for every kill
/// to land while it runs.
const MIB: u64 = 96;

fn kills() -> usize {
    std::env::var("TESSERA_RECONNECT_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(KILLS)
}

/// Checks that the first `mib` MiB of `path` hold the probe's pattern.
fn assert_pattern(path: &Path, mib: u64) {
    let bytes = std::fs::read(path).unwrap();
    for sector in 0..(mib << 20) / 512 {
        let want = (sector ^ SEED).to_le_bytes();
        let at = (sector * 512) as usize;
        for word in bytes[at..at + 512].chunks(8) {
            assert_eq!(word, want, "sector {sector} of {}", path.display());
        }
    }
}

/// Spins (up to a second) until backend `pid` marks a request in flight
/// in its inflight region, so that the kill that follows most likely
/// leaves one for the next backend: a backend completes a request in
/// microseconds, and a kill at a random moment almost never finds one.
fn wait_for_a_request_in_flight(pid: u32) {
    use std::os::unix::fs::FileExt;
    let region = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .find(|fd| {
            std::fs::read_link(fd.path())
                .is_ok_and(|target| target.to_string_lossy().contains("inflight"))
        })
        .and_then(|fd| std::fs::File::open(fd.path()).ok());
    let Some(region) = region else {
        return;
    };
    // Queue 0: a 16-byte header, then 16 bytes per descriptor, whose first
    // byte is its mark.
    let mut states = vec![0u8; 16 + 256 * 16];
    let deadline = Instant::now() + Duration::from_secs(1);
    while Instant::now() < deadline {
        if region.read_exact_at(&mut states, 0).is_err() {
            return;
        }
        if states[16..].chunks(16).any(|state| state[0] == 1) {
            return;
        }
    }
}

fn took_over_count(stderr: &str, id: &str) -> usize {
    stderr
        .matches(&format!("drive {id}: a new backend took over"))
        .count()
}

fn stalls_ms(stderr: &str, id: &str) -> Vec<u64> {
    let marker = format!("drive {id}: a new backend took over after ");
    stderr
        .lines()
        .filter_map(|line| line.split_once(&marker))
        .filter_map(|(_, rest)| rest.split_whitespace().next()?.parse().ok())
        .collect()
}

/// A pseudo-random pause of 30 to 250 ms (xorshift, seeded per run).
struct Pauses(u64);

impl Pauses {
    fn next(&mut self) -> Duration {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        Duration::from_millis(30 + self.0 % 220)
    }
}

/// Boots the probe on one drive whose backend `find_backend` finds, kills
/// that backend `kills()` times while the probe runs (`restart` then
/// brings a new one if the VMM does not, and returns the old one's log),
/// and checks the outcome.
fn writes_survive_killed_backends(
    config: serde_json::Value,
    disk: &Path,
    find_backend: impl Fn(&Running) -> u32,
    mut restart: impl FnMut() -> String,
) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vm.json");
    let metrics = dir.path().join("metrics.json");
    let started_by_the_vmm = config["drives"][0]["path_on_host"].is_string();
    let mut config = config;
    config["metrics"] = serde_json::json!({"metrics_path": metrics});
    std::fs::write(&path, config.to_string()).unwrap();
    let mut command = Command::new(workspace_bin("tessera"));
    command.arg("--no-api").arg("--config-file").arg(&path);
    let mut vm = Running::spawn(command);
    vm.wait_until(DEADLINE, |_, err| err.contains("drive d: active with"));

    let mut pauses = Pauses(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
            | 1,
    );
    let wanted = kills();
    let mut landed = 0;
    let mut backend_logs = String::new();
    let mut previous = None;
    for _ in 0..wanted {
        std::thread::sleep(pauses.next());
        if vm.stdout().contains("probe.blk0=") {
            break;
        }
        let backend = find_backend(&vm);
        assert_ne!(Some(backend), previous, "the old backend is still there");
        previous = Some(backend);
        wait_for_a_request_in_flight(backend);
        // SAFETY: kill sends SIGKILL to a backend of the test's VMM.
        assert_eq!(unsafe { libc::kill(backend as i32, libc::SIGKILL) }, 0);
        let killed_at = Instant::now();
        backend_logs.push_str(&restart());
        landed += 1;
        let exited = vm.wait_until(DEADLINE, |_, err| took_over_count(err, "d") >= landed);
        assert!(!exited, "the VMM died\n{}", vm.stderr());
        eprintln!(
            "kill {landed}: the new backend took over {} ms after the kill",
            killed_at.elapsed().as_millis()
        );
    }
    vm.wait_until(DEADLINE, |_, _| false);
    let run = vm.finish();
    assert_eq!(run.code(), 0, "{}", run.describe());
    let result = run
        .stdout
        .lines()
        .find_map(|l| l.trim_end().strip_prefix("probe.blk0="))
        .unwrap_or_else(|| panic!("no probe.blk0 line\n{}", run.describe()));
    let sectors = (MIB << 20) / 512;
    assert_eq!(
        result,
        format!("ok sectors={sectors} queues=1"),
        "{}",
        run.describe()
    );
    assert_eq!(
        landed,
        wanted,
        "the probe finished after {landed} of {wanted} kills: make its range larger\n{}",
        run.describe()
    );
    assert_pattern(disk, MIB);
    // The drive's metrics count each lost backend and each that took over
    // (flushes report increments: they add up over the lines).
    let drive_total = |counter: &str| -> u64 {
        std::fs::read_to_string(&metrics)
            .unwrap_or_default()
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter_map(|line| line["block_d"][counter].as_u64())
            .sum()
    };
    assert_eq!(
        drive_total("backend_lost_count"),
        wanted as u64,
        "{}",
        run.describe()
    );
    assert_eq!(
        drive_total("backend_reconnect_count"),
        wanted as u64,
        "{}",
        run.describe()
    );
    assert_eq!(drive_total("activate_fails"), 0, "{}", run.describe());
    if started_by_the_vmm {
        // Every backend the VMM started counted on in the drive's one
        // stats page: the writes add up to the whole range at least
        // (requests resubmitted after a kill count again).
        let written = drive_total("write_bytes");
        assert!(written >= MIB << 20, "{written} bytes\n{}", run.describe());
        assert_eq!(drive_total("event_fails"), 0, "{}", run.describe());
    }
    let resubmitted: usize = run
        .stderr
        .lines()
        .chain(backend_logs.lines())
        .filter_map(|line| line.split_once("resubmitting "))
        .filter_map(|(_, rest)| rest.split_whitespace().next()?.parse::<usize>().ok())
        .sum();
    println!("resubmitted {resubmitted} request(s) in all");
    assert!(
        resubmitted > 0,
        "no kill left a request in flight: the resubmission was not exercised\n{}",
        run.describe()
    );
    let mut stalls = stalls_ms(&run.stderr, "d");
    stalls.sort_unstable();
    println!(
        "reconnect-stall-ms min {} median {} max {} over {} restarts",
        stalls[0],
        stalls[stalls.len() / 2],
        stalls[stalls.len() - 1],
        stalls.len()
    );
}

fn probe_config(drive: serde_json::Value) -> serde_json::Value {
    let mut config = VmConfig::new(
        guest_artifacts().probe(),
        &format!("console=ttyS0 probe.blk=write probe.blk_mib={MIB} probe.seed={SEED:#x}"),
    )
    .mem_mib(256)
    .to_json();
    config["drives"] = json!([drive]);
    config
}

fn disk(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("disk.img");
    tessera_tests::sparse_file(&path, MIB << 20);
    path
}

#[test]
fn a_drive_whose_backend_is_killed_again_and_again_loses_no_write() {
    let dir = tempfile::tempdir().unwrap();
    let image = disk(dir.path());
    let config =
        probe_config(json!({"drive_id": "d", "path_on_host": image, "is_root_device": false}));
    writes_survive_killed_backends(
        config,
        &image,
        |vm| descendant_pid(vm.pid(), "--serial d").expect("the drive's backend"),
        String::new,
    );
}

#[test]
fn a_socket_drive_reconnects_to_its_restarted_backend_and_loses_no_write() {
    let dir = tempfile::tempdir().unwrap();
    let image = disk(dir.path());
    let socket = dir.path().join("blk.sock");
    let start = || {
        let _ = std::fs::remove_file(&socket);
        let mut command = Command::new(workspace_bin("vhost-user-blk"));
        command
            .arg("--socket")
            .arg(&socket)
            .arg("--path")
            .arg(&image);
        let backend = Running::spawn(command);
        assert!(tessera_tests::wait_for_path(&socket, DEADLINE));
        backend
    };
    let backend = std::cell::RefCell::new(start());
    let config = probe_config(json!({"drive_id": "d", "socket": socket, "is_root_device": false}));
    writes_survive_killed_backends(
        config,
        &image,
        |_| backend.borrow().pid(),
        || backend.replace(start()).finish().stderr,
    );
}
