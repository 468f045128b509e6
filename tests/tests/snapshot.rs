//! Snapshots through Firecracker's API: a paused probe guest is saved,
//! its process ends, and a fresh tessera loads it and the guest carries on
//! (its tick count goes on with no gap and no repeat, and its memory test
//! finds every page as it left it); and every bad input gets a 400 that
//! says what is wrong, with the process alive.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::json;
use tessera_tests::api::{ApiClient, ApiVm};
use tessera_tests::console::{numbers, whole_lines};
use tessera_tests::guest_artifacts;
use tessera_tests::journal::{first_bad_record, last_durable, SECTOR};

const DEADLINE: Duration = Duration::from_secs(60);
/// The probe's memory test (its fill takes about half a second per MiB
/// under kvm_pvm).
const MEMTEST_MIB: u64 = 4;

/// The guest address of the memory test's first page, from its console.
fn memtest_base(console: &str) -> u64 {
    let line = console
        .lines()
        .find_map(|l| l.strip_prefix("probe.memtest=filled,"))
        .unwrap_or_else(|| panic!("no memory test:\n{console}"));
    let base = line.split(',').nth(1).unwrap().trim();
    u64::from_str_radix(base.trim_start_matches("0x"), 16).unwrap()
}

/// The ticks the memory test passed on, in order; panics on a bad word.
fn memtest_ok(output: &str) -> Vec<u64> {
    assert!(!output.contains("probe.memtest=bad"), "{output}");
    whole_lines(output)
        .filter_map(|l| l.strip_prefix("probe.memtest=ok,"))
        .filter_map(|n| n.parse().ok())
        .collect()
}

/// The tick numbers in `output`, in order.
fn ticks(output: &str) -> Vec<u64> {
    numbers(output, "probe.tick=")
}

fn refused(c: &mut ApiClient, method: &str, path: &str, body: serde_json::Value, fault: &str) {
    let r = c.request(method, path, Some(&body.to_string()));
    assert_eq!(r.status, 400, "{method} {path} {body}: {}", r.body);
    assert!(
        r.fault().contains(fault),
        "{method} {path} {body}: {} lacks {fault:?}",
        r.body
    );
}

/// Pauses the microVM behind `c` and snapshots it to `dir`: the state
/// and memory files.
fn pause_and_snapshot(c: &mut ApiClient, dir: &Path) -> (PathBuf, PathBuf) {
    assert_eq!(c.patch("/vm", r#"{"state": "Paused"}"#).status, 204);
    let (state, memory) = (dir.join("vm.snap"), dir.join("vm.mem"));
    c.put_ok(
        "/snapshot/create",
        json!({"snapshot_path": state, "mem_file_path": memory}),
    );
    (state, memory)
}

/// Boots the probe ticking forever.
fn boot_ticking(extra: &[(&str, serde_json::Value)]) -> (ApiVm, ApiClient) {
    let api = ApiVm::start(&[]);
    let mut c = api.client();
    c.put_ok(
        "/boot-source",
        json!({"kernel_image_path": guest_artifacts().probe(),
               "boot_args": format!("console=ttyS0 probe.ticks=0 probe.memtest={MEMTEST_MIB}")}),
    );
    c.put_ok(
        "/machine-config",
        json!({"vcpu_count": 1, "mem_size_mib": 128}),
    );
    for (path, body) in extra {
        c.put_ok(path, body.clone());
    }
    c.put_ok("/actions", json!({"action_type": "InstanceStart"}));
    (api, c)
}

struct Snapshot {
    state: PathBuf,
    memory: PathBuf,
    /// The guest's console up to the snapshot.
    console: String,
    _dir: tempfile::TempDir,
}

/// Boots the probe, lets it tick a few times, pauses it and snapshots it;
/// its process then ends.
fn snapshot_of_a_ticking_probe() -> Snapshot {
    let (mut api, mut c) = boot_ticking(&[]);
    api.vm
        .wait_until(DEADLINE, |out, _| out.contains("probe.memtest=ok,4"));
    refused(
        &mut c,
        "PUT",
        "/snapshot/create",
        json!({"snapshot_path": api.dir().join("x"), "mem_file_path": api.dir().join("y")}),
        "save/restore unavailable while running",
    );
    assert_eq!(c.patch("/vm", r#"{"state": "Paused"}"#).status, 204);
    let dir = tempfile::tempdir().unwrap();
    let (state, memory) = (dir.path().join("vm.snap"), dir.path().join("vm.mem"));
    c.put_ok(
        "/snapshot/create",
        json!({"snapshot_path": state, "mem_file_path": memory}),
    );
    assert_eq!(
        std::fs::metadata(&memory).unwrap().len(),
        128 << 20,
        "the memory file holds all of guest RAM"
    );
    let run = api.vm.finish();
    Snapshot {
        state,
        memory,
        console: run.stdout,
        _dir: dir,
    }
}

fn load_body(snapshot: &Snapshot, resume: bool) -> serde_json::Value {
    json!({"snapshot_path": snapshot.state, "mem_backend":
           {"backend_type": "File", "backend_path": snapshot.memory}, "resume_vm": resume})
}

/// Asserts that the ticks of the two consoles, one after the other, count
/// up by one from 1 to at least `to`.
fn assert_ticks_go_on(before: &str, after: &str, to: u64) {
    let all = ticks(&format!("{before}{after}"));
    let expected: Vec<u64> = (1..=all.len() as u64).collect();
    assert_eq!(all, expected, "before:\n{before}\nafter:\n{after}");
    assert!(all.len() as u64 >= to, "{all:?}");
    assert!(!ticks(after).is_empty(), "no tick after the load:\n{after}");
    // The memory test checked every page after the load.
    let checked = memtest_ok(&format!("{before}{after}"));
    assert!(
        checked
            .iter()
            .any(|&t| t > *ticks(before).last().unwrap_or(&0)),
        "no memory check after the load:\n{after}"
    );
}

#[test]
fn a_loaded_snapshot_ticks_on_from_where_it_was_paused() {
    let snapshot = snapshot_of_a_ticking_probe();
    let last = *ticks(&snapshot.console).last().unwrap();
    let mut api = ApiVm::start(&[]);
    let mut c = api.client();
    c.put_ok("/snapshot/load", load_body(&snapshot, true));
    let want = format!("probe.tick={}\n", last + 5);
    api.vm.wait_until(DEADLINE, |out, _| out.contains(&want));
    let info = c.get("/").json();
    assert_eq!(info["state"], "Running", "{info}");
    let config = c.get("/vm/config").json();
    assert_eq!(config["machine-config"]["mem_size_mib"], 128, "{config}");
    assert_eq!(config["machine-config"]["vcpu_count"], 1, "{config}");
    refused(
        &mut c,
        "PUT",
        "/snapshot/load",
        load_body(&snapshot, true),
        "not supported after starting the microVM",
    );
    let run = api.vm.finish();
    assert_ticks_go_on(&snapshot.console, &run.stdout, last + 5);
}

#[test]
fn a_snapshot_loads_paused_and_runs_on_resume_and_loads_again() {
    let snapshot = snapshot_of_a_ticking_probe();
    let last = *ticks(&snapshot.console).last().unwrap();
    // The second time, the guest's clock is moved on by the time since
    // the snapshot (KVM_CLOCK_REALTIME, which this host's KVM records).
    for clock_realtime in [false, true] {
        let mut api = ApiVm::start(&[]);
        let mut c = api.client();
        let mut body = load_body(&snapshot, false);
        body["clock_realtime"] = json!(clock_realtime);
        c.put_ok("/snapshot/load", body);
        assert_eq!(c.get("/").json()["state"], "Paused");
        std::thread::sleep(Duration::from_millis(500));
        assert!(
            ticks(&api.vm.stdout()).is_empty(),
            "a paused guest ticked: {}",
            api.vm.stdout()
        );
        assert_eq!(c.patch("/vm", r#"{"state": "Resumed"}"#).status, 204);
        let want = format!("probe.tick={}\n", last + 3);
        api.vm.wait_until(DEADLINE, |out, _| out.contains(&want));
        let run = api.vm.finish();
        // Each load starts again from the same point.
        assert_ticks_go_on(&snapshot.console, &run.stdout, last + 3);
    }
}

/// Writes `bytes` to a new file in `dir`.
fn file_with(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

#[test]
fn bad_snapshots_are_refused_with_the_reason_and_a_good_one_loads_after() {
    let snapshot = snapshot_of_a_ticking_probe();
    let good = std::fs::read(&snapshot.state).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut corrupted = good.clone();
    let middle = corrupted.len() / 2;
    corrupted[middle] ^= 0x40;
    let mut newer = good.clone();
    newer[8..12].copy_from_slice(&2u32.to_le_bytes());
    let short_memory = dir.path().join("short.mem");
    tessera_tests::sparse_file(&short_memory, 64 << 20);
    let cases = [
        (
            dir.path().join("missing.snap"),
            snapshot.memory.clone(),
            "No such file",
        ),
        (
            file_with(dir.path(), "truncated.snap", &good[..good.len() / 3]),
            snapshot.memory.clone(),
            "truncated",
        ),
        (
            file_with(dir.path(), "corrupted.snap", &corrupted),
            snapshot.memory.clone(),
            "corrupted",
        ),
        (
            file_with(dir.path(), "newer.snap", &newer),
            snapshot.memory.clone(),
            "format version 2",
        ),
        (
            file_with(dir.path(), "elf.snap", b"\x7fELF\x02\x01\x01\0rest"),
            snapshot.memory.clone(),
            "is not a Tessera snapshot file",
        ),
        (
            snapshot.state.clone(),
            dir.path().join("missing.mem"),
            "No such file",
        ),
        (
            snapshot.state.clone(),
            short_memory,
            "exceeds largest possible file offset",
        ),
    ];
    let mut api = ApiVm::start(&[]);
    let mut c = api.client();
    refused(
        &mut c,
        "PUT",
        "/snapshot/create",
        json!({"snapshot_path": "s", "mem_file_path": "m"}),
        "not supported before starting the microVM",
    );
    for (state, memory, fault) in cases {
        refused(
            &mut c,
            "PUT",
            "/snapshot/load",
            json!({"snapshot_path": state, "mem_file_path": memory}),
            fault,
        );
    }
    refused(
        &mut c,
        "PUT",
        "/snapshot/load",
        json!({"snapshot_path": snapshot.state, "mem_file_path": snapshot.memory,
               "network_overrides": [{"iface_id": "eth0", "host_dev_name": "tap9"}]}),
        "Unknown Network Device",
    );
    refused(
        &mut c,
        "PUT",
        "/snapshot/load",
        json!({"snapshot_path": snapshot.state, "mem_file_path": snapshot.memory,
               "drive_overrides": [{"drive_id": "rootfs", "path_on_host": "/x.img"}]}),
        "drive_overrides names drive rootfs",
    );
    // Nothing was built: the same process loads the good snapshot.
    c.put_ok("/snapshot/load", load_body(&snapshot, true));
    let last = *ticks(&snapshot.console).last().unwrap();
    let want = format!("probe.tick={}\n", last + 2);
    api.vm.wait_until(DEADLINE, |out, _| out.contains(&want));
    let run = api.vm.finish();
    assert_ticks_go_on(&snapshot.console, &run.stdout, last + 2);
}

#[test]
fn a_configured_process_refuses_a_load_but_logger_and_metrics_do_not_count() {
    let api = ApiVm::start(&[]);
    let mut c = api.client();
    c.put_ok(
        "/logger",
        json!({"log_path": api.dir().join("log"), "level": "Info"}),
    );
    c.put_ok(
        "/metrics",
        json!({"metrics_path": api.dir().join("metrics")}),
    );
    // Refused configuration counts too, as in Firecracker.
    let r = c.put(
        "/machine-config",
        r#"{"vcpu_count": 0, "mem_size_mib": 128}"#,
    );
    assert_eq!(r.status, 400, "{}", r.body);
    refused(
        &mut c,
        "PUT",
        "/snapshot/load",
        json!({"snapshot_path": "s", "mem_file_path": "m"}),
        "Loading a microVM snapshot not allowed after configuring boot-specific resources.",
    );
}

/// The probe's journal seed.
const SEED: u64 = 0x5eed_cafe;
/// Records the probe journals: 2 MiB.
const JOURNAL_MIB: u64 = 2;

#[test]
fn a_drive_journal_paused_mid_run_completes_on_a_copy_after_a_load() {
    drive_journal_paused_mid_run(&[]);
}

/// The same on virtio-pci with MSI-X: the loading process, started
/// without `--enable-pci`, takes the transport from the snapshot, and the
/// drive's vectors are routed again.
#[test]
fn a_drive_journal_on_pci_paused_mid_run_completes_on_a_copy_after_a_load() {
    drive_journal_paused_mid_run(&["--enable-pci"]);
}

fn drive_journal_paused_mid_run(flags: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("journal.img");
    tessera_tests::sparse_file(&disk, JOURNAL_MIB << 20);
    let api = ApiVm::start(flags);
    let mut c = api.client();
    c.put_ok(
        "/boot-source",
        json!({"kernel_image_path": guest_artifacts().probe(),
               "boot_args": format!("console=ttyS0 probe.blk=journal probe.blk_mib={JOURNAL_MIB} \
                                     probe.seed={SEED:#x} probe.ticks=0 probe.memtest=1")}),
    );
    c.put_ok(
        "/machine-config",
        json!({"vcpu_count": 1, "mem_size_mib": 128}),
    );
    c.put_ok(
        "/drives/journal",
        json!({"drive_id": "journal", "path_on_host": disk, "is_root_device": false}),
    );
    c.put_ok("/actions", json!({"action_type": "InstanceStart"}));
    let mut api = api;
    api.vm
        .wait_until(DEADLINE, |out, _| out.contains("probe.journal="));
    let (state, memory) = pause_and_snapshot(&mut c, dir.path());
    let total = (JOURNAL_MIB << 20) / SECTOR as u64;
    let promised = last_durable(&api.vm.stdout());
    assert!(
        promised > 0 && promised < total,
        "the snapshot was not taken mid-journal ({promised} of {total}):\n{}",
        api.vm.stdout()
    );
    // The clone writes to a copy of the disk as it was at the snapshot.
    let copy = dir.path().join("clone.img");
    std::fs::copy(&disk, &copy).unwrap();
    // The original goes on too, its drive's backend taking its queues up again.
    assert_eq!(c.patch("/vm", r#"{"state": "Resumed"}"#).status, 204);
    // The whole line: the harness may see it in pieces.
    api.vm.wait_until(DEADLINE, |out, _| {
        out.split_once("probe.blk0=")
            .is_some_and(|(_, rest)| rest.contains('\n'))
    });
    let original = api.vm.finish().stdout;
    assert!(
        original.contains(&format!("probe.blk0=journaled sectors={total}")),
        "the original did not complete its journal after the snapshot:\n{original}"
    );
    assert_eq!(first_bad_record(&disk, total, SEED), None);
    let mut clone = ApiVm::start(&[]);
    let mut c = clone.client();
    c.put_ok(
        "/snapshot/load",
        json!({"snapshot_path": state, "mem_file_path": memory, "resume_vm": true,
               "drive_overrides": [{"drive_id": "journal", "path_on_host": copy}]}),
    );
    let config = c.get("/vm/config").json();
    assert_eq!(
        config["drives"][0]["path_on_host"],
        copy.display().to_string(),
        "{config}"
    );
    clone
        .vm
        .wait_until(DEADLINE, |out, _| out.contains("probe.memtest=ok,2"));
    let clone = clone.vm.finish();
    let transport = if flags.contains(&"--enable-pci") {
        "drive journal: virtio-pci at 00:01.0"
    } else {
        "drive journal: virtio-mmio at 0xd0001000"
    };
    assert!(clone.stderr.contains(transport), "{}", clone.stderr);
    let after = clone.stdout;
    assert!(
        after.contains(&format!("probe.blk0=journaled sectors={total}")),
        "the journal did not complete after the load:\n{after}"
    );
    assert_eq!(last_durable(&after), total, "{after}");
    assert_eq!(first_bad_record(&copy, total, SEED), None);
    memtest_ok(&after);
}

#[test]
fn a_page_changed_in_the_memory_file_is_found_by_the_guest() {
    let snapshot = snapshot_of_a_ticking_probe();
    let base = memtest_base(&snapshot.console);
    // Guest RAM below 3.25 GiB is the memory file's first region, at the
    // same offsets: flip a bit of the first page's stamp.
    let mut memory = std::fs::read(&snapshot.memory).unwrap();
    memory[base as usize] ^= 1;
    std::fs::write(&snapshot.memory, &memory).unwrap();
    let mut api = ApiVm::start(&[]);
    let mut c = api.client();
    c.put_ok("/snapshot/load", load_body(&snapshot, true));
    let bad = format!("probe.memtest=bad,{base:#x},");
    api.vm.wait_until(DEADLINE, |out, _| out.contains(&bad));
    let run = api.vm.finish();
    assert!(run.stdout.contains(&bad), "{}", run.stdout);
}

/// Clones loaded at once from one snapshot.
const CLONES: usize = 20;

#[test]
fn twenty_clones_load_from_one_snapshot_at_once_each_on_its_own_disk() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("golden.img");
    tessera_tests::sparse_file(&disk, 1 << 20);
    let (mut api, mut c) = boot_ticking(&[(
        "/drives/data",
        json!({"drive_id": "data", "path_on_host": disk, "is_root_device": false}),
    )]);
    api.vm
        .wait_until(DEADLINE, |out, _| out.contains("probe.memtest=ok,2"));
    let (state, memory) = pause_and_snapshot(&mut c, dir.path());
    let before = api.vm.finish().stdout;
    let last = *ticks(&before).last().unwrap();
    let clones: Vec<(ApiVm, PathBuf)> = (0..CLONES)
        .map(|i| {
            let copy = dir.path().join(format!("clone{i}.img"));
            std::fs::copy(&disk, &copy).unwrap();
            (ApiVm::start(&[]), copy)
        })
        .collect();
    std::thread::scope(|scope| {
        for (clone, copy) in &clones {
            let body = json!({"snapshot_path": state, "mem_file_path": memory, "resume_vm": true,
                              "drive_overrides": [{"drive_id": "data", "path_on_host": copy}]});
            let mut c = clone.client();
            scope.spawn(move || c.put_ok("/snapshot/load", body));
        }
    });
    let want = format!("probe.memtest=ok,{}", last + 3);
    for (mut clone, copy) in clones {
        clone.vm.wait_until(DEADLINE, |out, _| out.contains(&want));
        assert!(
            tessera_tests::descendant_pid(clone.vm.pid(), "--serial data").is_some_and(|backend| {
                std::fs::read_dir(format!("/proc/{backend}/fd"))
                    .into_iter()
                    .flatten()
                    .flatten()
                    .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|t| t == copy))
            }),
            "the clone's drive is not served from {}",
            copy.display()
        );
        // Guest memory is filled on demand, not copied in whole: the
        // clone maps what it touched of its 128 MiB.
        let shared_kib = status_kib(clone.vm.pid(), "RssShmem");
        assert!(
            shared_kib < 32.0 * 1024.0,
            "a clone maps {shared_kib} KiB of guest memory after a load"
        );
        let run = clone.vm.finish();
        assert_ticks_go_on(&before, &run.stdout, last + 3);
    }
}

/// KiB of `field` in `/proc/<pid>/status`.
fn status_kib(pid: u32, field: &str) -> f64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in\n{text}"))
}

#[test]
fn a_loaded_microvm_snapshots_onto_its_own_files_and_needs_no_kernel_file() {
    let dir = tempfile::tempdir().unwrap();
    // The kernel is gone by the time the snapshot loads, as on a host that
    // only receives snapshots.
    let kernel = dir.path().join("probe.elf");
    std::fs::copy(guest_artifacts().probe(), &kernel).unwrap();
    let (mut api, mut c) = {
        let api = ApiVm::start(&[]);
        let mut c = api.client();
        c.put_ok("/boot-source",
            json!({"kernel_image_path": kernel, "boot_args": "console=ttyS0 probe.ticks=0 probe.memtest=1"}),
        );
        c.put_ok("/actions", json!({"action_type": "InstanceStart"}));
        (api, c)
    };
    api.vm
        .wait_until(DEADLINE, |out, _| out.contains("probe.memtest=ok,2"));
    assert_eq!(c.patch("/vm", r#"{"state": "Paused"}"#).status, 204);
    let (state, memory) = (dir.path().join("vm.snap"), dir.path().join("vm.mem"));
    let create = json!({"snapshot_path": state, "mem_file_path": memory});
    c.put_ok("/snapshot/create", create.clone());
    let first = api.vm.finish().stdout;
    std::fs::remove_file(&kernel).unwrap();
    let mut loaded = ApiVm::start(&[]);
    let mut c = loaded.client();
    c.put_ok(
        "/snapshot/load",
        json!({"snapshot_path": state, "mem_file_path": memory, "resume_vm": true}),
    );
    let config = c.get("/vm/config").json();
    assert_eq!(
        config["boot-source"]["kernel_image_path"],
        kernel.display().to_string(),
        "{config}"
    );
    let last = *ticks(&first).last().unwrap();
    let want = format!("probe.memtest=ok,{}", last + 2);
    loaded.vm.wait_until(DEADLINE, |out, _| out.contains(&want));
    // Snapshotted onto the very files it runs from: it keeps running (its
    // memory maps the old file), and the new files load.
    assert_eq!(c.patch("/vm", r#"{"state": "Paused"}"#).status, 204);
    c.put_ok("/snapshot/create", create);
    assert_eq!(c.patch("/vm", r#"{"state": "Resumed"}"#).status, 204);
    let want = format!("probe.memtest=ok,{}", last + 4);
    loaded.vm.wait_until(DEADLINE, |out, _| out.contains(&want));
    let second = loaded.vm.finish().stdout;
    assert_ticks_go_on(&first, &second, last + 4);
    let mut again = ApiVm::start(&[]);
    let mut c = again.client();
    c.put_ok(
        "/snapshot/load",
        json!({"snapshot_path": state, "mem_file_path": memory, "resume_vm": true}),
    );
    let want = format!("probe.memtest=ok,{}", last + 6);
    again.vm.wait_until(DEADLINE, |out, _| out.contains(&want));
    let third = again.vm.finish().stdout;
    memtest_ok(&third);
    assert!(!ticks(&third).is_empty(), "{third}");
}

/// The probe's `verify` pattern for `sectors` sectors: sector `s` holds
/// the little-endian `s ^ seed`, 64 times.
fn verify_pattern(sectors: u64, seed: u64) -> Vec<u8> {
    (0..sectors)
        .flat_map(|s| (s ^ seed).to_le_bytes().repeat(SECTOR / 8))
        .collect()
}

/// How many 512-byte blocks of `bytes` (at 512-byte boundaries) are
/// sectors of the `verify` pattern below `sectors`.
fn pattern_sectors(bytes: &[u8], sectors: u64, seed: u64) -> usize {
    bytes
        .chunks_exact(SECTOR)
        .filter(|block| {
            let word = u64::from_le_bytes(block[..8].try_into().unwrap());
            (word ^ seed) < sectors && block.chunks_exact(8).all(|w| w == &block[..8])
        })
        .count()
}

/// Copies the data extents of the sparse file `diff` onto `base` (what
/// Firecracker's `rebase-snap` does).
fn apply_diff(diff: &Path, base: &Path) {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;
    let diff = std::fs::File::open(diff).unwrap();
    let base = std::fs::OpenOptions::new().write(true).open(base).unwrap();
    let len = diff.metadata().unwrap().len() as i64;
    let mut at = 0i64;
    let mut buf = vec![0u8; 1 << 20];
    while at < len {
        // SAFETY: lseek on an open file descriptor we own.
        let data = unsafe { libc::lseek(diff.as_raw_fd(), at, libc::SEEK_DATA) };
        if data < 0 {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(diff.as_raw_fd(), data, libc::SEEK_HOLE) };
        assert!(hole > data, "SEEK_HOLE after {data}: {hole}");
        let mut pos = data as u64;
        while pos < hole as u64 {
            let n = buf.len().min((hole as u64 - pos) as usize);
            diff.read_exact_at(&mut buf[..n], pos).unwrap();
            base.write_all_at(&buf[..n], pos).unwrap();
            pos += n as u64;
        }
        at = hole;
    }
}

/// Pages that are not all zeros in `base` and all zeros in `diff`: what a
/// Diff left out (a Diff of every resident page leaves out none).
fn pages_left_out(base: &[u8], diff: &[u8]) -> usize {
    base.chunks_exact(4096)
        .zip(diff.chunks_exact(4096))
        .filter(|(b, d)| b.iter().any(|&x| x != 0) && d.iter().all(|&x| x == 0))
        .count()
}

const DIFF_BLK_MIB: u64 = 4;
const DIFF_BLK_ROUNDS: usize = 6;

/// When dirty page tracking starts.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Tracking {
    /// `track_dirty_pages` in the machine configuration.
    FromBoot,
    /// A migration started (and cancelled) switches it on.
    FromMigration,
}

#[test]
fn a_diff_on_top_of_its_full_base_holds_what_the_vcpus_and_the_drive_wrote() {
    diff_holds_what_the_vcpus_and_the_drive_wrote(Tracking::FromBoot);
}

/// A migration switches tracking on: the Diff after it holds what was
/// written before (every resident page then) as well as after.
#[test]
fn a_diff_after_a_migration_switched_tracking_on_holds_what_was_written_before() {
    diff_holds_what_the_vcpus_and_the_drive_wrote(Tracking::FromMigration);
}

/// Starts a migration to a fresh destination at 1 MiB/s and cancels it.
fn start_and_cancel_a_migration(source: &mut ApiClient, dir: &Path) {
    let path = dir.join("migration.sock");
    let url = format!("unix:{}", path.display());
    let dst = ApiVm::start(&[]);
    let socket = dst.socket.clone();
    let body = json!({"listen": url}).to_string();
    let receiving = std::thread::spawn(move || {
        ApiClient::connect(&socket)
            .put("/migration/receive", &body)
            .status
    });
    assert!(
        tessera_tests::wait_for_path(&path, Duration::from_secs(10)),
        "the destination never listened"
    );
    source.put_ok(
        "/migration/send",
        json!({"destination": url, "max_bandwidth_mib_s": 1}),
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(source.put("/migration/cancel", "").status, 204);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while source.get("/migration").json()["phase"] != "cancelled" {
        assert!(std::time::Instant::now() < deadline, "never cancelled");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(receiving.join().unwrap(), 400);
    drop(dst.vm.finish());
}

fn diff_holds_what_the_vcpus_and_the_drive_wrote(tracking: Tracking) {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("data.img");
    let sectors = (DIFF_BLK_MIB << 20) / SECTOR as u64;
    std::fs::write(&disk, verify_pattern(sectors, SEED)).unwrap();
    let api = ApiVm::start(&[]);
    let mut c = api.client();
    c.put_ok(
        "/boot-source",
        json!({"kernel_image_path": guest_artifacts().probe(),
               "boot_args": format!("console=ttyS0 probe.blk=verify probe.blk_mib={DIFF_BLK_MIB} \
                                     probe.blk_rounds={DIFF_BLK_ROUNDS} probe.seed={SEED:#x} \
                                     probe.ticks=0 probe.memtest={MEMTEST_MIB}")}),
    );
    c.put_ok(
        "/machine-config",
        json!({"vcpu_count": 1, "mem_size_mib": 128,
               "track_dirty_pages": tracking == Tracking::FromBoot}),
    );
    c.put_ok(
        "/drives/data",
        json!({"drive_id": "data", "path_on_host": disk, "is_root_device": false}),
    );
    c.put_ok("/actions", json!({"action_type": "InstanceStart"}));
    let mut api = api;
    let rounds_done = |out: &str| {
        whole_lines(out)
            .filter(|l| l.starts_with("probe.blk0=ok"))
            .count()
    };
    api.vm.wait_until(DEADLINE, |out, _| rounds_done(out) >= 1);

    // The base: a Full snapshot while the drive still has rounds to read.
    assert_eq!(c.patch("/vm", r#"{"state": "Paused"}"#).status, 204);
    let (base_state, base_memory) = (dir.path().join("base.snap"), dir.path().join("base.mem"));
    c.put_ok(
        "/snapshot/create",
        json!({"snapshot_path": base_state, "mem_file_path": base_memory,
               "snapshot_type": "Full"}),
    );
    let at_base = rounds_done(&api.vm.stdout());
    assert!(
        at_base < DIFF_BLK_ROUNDS,
        "every round was read before the base snapshot:\n{}",
        api.vm.stdout()
    );
    assert_eq!(c.patch("/vm", r#"{"state": "Resumed"}"#).status, 204);
    api.vm
        .wait_until(DEADLINE, |out, _| out.contains("probe.memtest=ok,3"));
    assert_eq!(rounds_done(&api.vm.stdout()), DIFF_BLK_ROUNDS);
    if tracking == Tracking::FromMigration {
        // Every read is done: only a Diff that holds every page written
        // before tracking began holds the drive's.
        start_and_cancel_a_migration(&mut c, dir.path());
    }

    // The Diff: the drive's reads after the base and the memory test's
    // fill and stamps, and not the pages nobody wrote since.
    assert_eq!(c.patch("/vm", r#"{"state": "Paused"}"#).status, 204);
    let (diff_state, diff_memory) = (dir.path().join("diff.snap"), dir.path().join("diff.mem"));
    c.put_ok(
        "/snapshot/create",
        json!({"snapshot_path": diff_state, "mem_file_path": diff_memory,
               "snapshot_type": "Diff"}),
    );
    let before = api.vm.finish().stdout;
    let base_bytes = std::fs::read(&base_memory).unwrap();
    let diff_bytes = std::fs::read(&diff_memory).unwrap();
    assert_eq!(diff_bytes.len(), 128 << 20);
    let left_out = pages_left_out(&base_bytes, &diff_bytes);
    match tracking {
        Tracking::FromBoot => assert!(left_out > 0, "the Diff holds every page the base holds"),
        // The logs began after the base: the Diff holds every page then.
        Tracking::FromMigration => assert_eq!(
            left_out, 0,
            "the Diff leaves out pages written before tracking began"
        ),
    }
    let memtest = memtest_base(&before) as usize;
    assert!(
        diff_bytes[memtest..memtest + (MEMTEST_MIB as usize) * (1 << 20)]
            .chunks_exact(4096)
            .all(|page| page.iter().any(|&b| b != 0)),
        "the Diff lacks pages of the memory test"
    );

    // Restored from the base with the Diff on top, the guest goes on.
    let merged = dir.path().join("merged.mem");
    std::fs::copy(&base_memory, &merged).unwrap();
    apply_diff(&diff_memory, &merged);
    // Every round reads into the same buffers: each page holding disk data
    // at the Diff was written by the drive's backend since the base.
    let read = pattern_sectors(&std::fs::read(&merged).unwrap(), sectors, SEED);
    assert!(read >= 128, "only {read} disk sectors in guest memory");
    assert_eq!(
        pattern_sectors(&diff_bytes, sectors, SEED),
        read,
        "the Diff lacks pages the drive read into the guest"
    );
    let mut clone = ApiVm::start(&[]);
    let mut c = clone.client();
    c.put_ok(
        "/snapshot/load",
        json!({"snapshot_path": diff_state, "mem_backend":
               {"backend_type": "File", "backend_path": merged}, "resume_vm": true}),
    );
    let last = *ticks(&before).last().unwrap();
    clone.vm.wait_until(DEADLINE, |out, _| {
        ticks(out).last().is_some_and(|&t| t >= last + 2)
    });
    let after = clone.vm.finish().stdout;
    assert_ticks_go_on(&before, &after, last + 2);
}

/// The `uffd-handler` test binary, serving `memory` on `socket`.
fn uffd_handler(socket: &Path, memory: &Path) -> tessera_tests::Running {
    let mut command = std::process::Command::new(tessera_tests::workspace_bin("uffd-handler"));
    command.arg(socket).arg(memory);
    let handler = tessera_tests::Running::spawn(command);
    assert!(
        tessera_tests::wait_for_listener(socket, Duration::from_secs(10)),
        "the handler never listened: {}",
        handler.stderr()
    );
    handler
}

#[test]
fn a_page_fault_handler_fills_a_snapshot_loaded_with_the_uffd_backend() {
    let snapshot = snapshot_of_a_ticking_probe();
    let last = *ticks(&snapshot.console).last().unwrap();
    let dir = tempfile::tempdir().unwrap();

    // Nobody listening: the load names the step, and the process loads
    // again afterwards.
    let mut api = ApiVm::start(&[]);
    let mut c = api.client();
    let uffd_body = |socket: &Path| {
        json!({"snapshot_path": snapshot.state, "resume_vm": true,
               "mem_backend": {"backend_type": "Uffd", "backend_path": socket}})
    };
    refused(
        &mut c,
        "PUT",
        "/snapshot/load",
        uffd_body(&dir.path().join("nobody.sock")),
        "Error creating guest memory from uffd: Failed to connect to UDS Unix stream",
    );

    let socket = dir.path().join("uffd.sock");
    let handler = uffd_handler(&socket, &snapshot.memory);
    c.put_ok("/snapshot/load", uffd_body(&socket));
    let want = format!("probe.tick={}\n", last + 3);
    api.vm.wait_until(DEADLINE, |out, _| out.contains(&want));
    let run = api.vm.finish();
    assert_ticks_go_on(&snapshot.console, &run.stdout, last + 3);
    // Every page the guest touched came through the handler, which says
    // how many once the VMM's connection closes (a whole line).
    let mut handler = handler;
    handler.wait_until(DEADLINE, |_, err| {
        whole_lines(err).any(|l| l.starts_with("uffd-handler: 0: served "))
    });
    let handled = handler.finish().stderr;
    let served: u64 = handled
        .lines()
        .find_map(|l| l.strip_prefix("uffd-handler: 0: served "))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("the handler served nothing:\n{handled}"));
    let memtest_pages = (MEMTEST_MIB << 20) / 4096;
    assert!(
        served >= memtest_pages,
        "{served} faults served, fewer than the memory test's {memtest_pages} pages"
    );
}

#[test]
fn the_uffd_backend_is_refused_for_memory_that_backends_share() {
    let dir = tempfile::tempdir().unwrap();
    let disk = tessera_tests::sparse_file(&dir.path().join("disk.img"), 1 << 20);
    let (mut api, mut c) = boot_ticking(&[(
        "/drives/data",
        json!({"drive_id": "data", "path_on_host": disk, "is_root_device": false}),
    )]);
    api.vm
        .wait_until(DEADLINE, |out, _| out.contains("probe.tick=1\n"));
    let (state, _) = pause_and_snapshot(&mut c, dir.path());
    drop(api.vm.finish());
    let clone = ApiVm::start(&[]);
    let mut c = clone.client();
    refused(
        &mut c,
        "PUT",
        "/snapshot/load",
        json!({"snapshot_path": state,
               "mem_backend": {"backend_type": "Uffd", "backend_path": dir.path().join("u.sock")}}),
        "cannot serve guest memory that vhost-user backends share",
    );
    assert_eq!(c.get("/").json()["state"], "Not started");
    drop(clone.vm.finish());
}
