//! The balloon device, driven by the probe guest's virtio-balloon driver
//! (`probe.balloon=<MiB>`: a pool of that much RAM, filled so it is
//! resident, that the driver gives to the balloon and takes back). The
//! host sets the target with `PATCH /balloon`; the pages the guest gives
//! must leave the host: the guest memory file (a memfd, since a drive's
//! backend maps it too) loses them, so the VMM's resident memory and
//! every mapping of the file shrink by the balloon, and they come back
//! when the guest takes the pages back and writes them. (The drive's
//! backend touches no guest page here; a mapping the test makes of the
//! file and reads through stands for one that touched them all.) The memory the
//! guest kept must be intact throughout (the probe checks its pool and
//! its memtest region).

use std::time::Duration;

use serde_json::json;
use tessera_tests::api::{ApiClient, ApiVm};
use tessera_tests::console::whole_lines;
use tessera_tests::guest_artifacts;

const DEADLINE: Duration = Duration::from_secs(120);
const MIB: u64 = 1 << 20;
/// The probe's pool, and the balloon the test inflates in it.
const POOL_MIB: u64 = 160;
const BALLOON_MIB: u64 = 128;

/// Boots the probe with 256 MiB, a balloon pool of [`POOL_MIB`], a
/// memtest region and a drive (so that a backend maps guest memory), and
/// the balloon `balloon`; waits until the pool is filled.
fn boot(balloon: serde_json::Value) -> (ApiVm, ApiClient) {
    let mut api = ApiVm::start(&[]);
    let mut c = api.client();
    let disk = api.dir().join("disk.img");
    tessera_tests::sparse_file(&disk, MIB);
    c.put_ok(
        "/boot-source",
        json!({"kernel_image_path": guest_artifacts().probe(),
               "boot_args": format!("console=ttyS0 probe.balloon={POOL_MIB} probe.memtest=16 probe.ticks=0")}),
    );
    c.put_ok(
        "/machine-config",
        json!({"vcpu_count": 1, "mem_size_mib": 256}),
    );
    c.put_ok(
        "/drives/data",
        json!({"drive_id": "data", "path_on_host": disk, "is_root_device": false}),
    );
    c.put_ok("/balloon", balloon);
    c.put_ok(
        "/metrics",
        json!({"metrics_path": api.dir().join("metrics.json")}),
    );
    c.put_ok("/actions", json!({"action_type": "InstanceStart"}));
    api.vm.wait_until(DEADLINE, |out, _| {
        whole_lines(out).any(|l| l.starts_with("probe.memtest=ok"))
            && whole_lines(out).any(|l| l.starts_with("probe.balloon=up"))
    });
    (api, c)
}

/// Waits until the probe says the balloon holds `pages`.
fn wait_for_balloon(api: &mut ApiVm, pages: u64) {
    let line = format!("probe.balloon={pages} pages");
    api.vm.wait_until(DEADLINE, |out, _| {
        let lines: Vec<_> = whole_lines(out).collect();
        lines.iter().rev().find(|l| l.starts_with("probe.balloon=")) == Some(&line.as_str())
            || lines.iter().any(|l| l.starts_with("probe.balloon=bad"))
    });
    let out = api.vm.stdout();
    assert!(
        !whole_lines(&out).any(|l| l.starts_with("probe.balloon=bad")),
        "the guest's kept memory changed:\n{out}"
    );
}

/// Bytes of the guest memory file (the VMM's memfd) that hold pages.
fn guest_file_bytes(vmm: u32) -> u64 {
    let metadata = std::fs::metadata(guest_file(vmm)).unwrap();
    std::os::unix::fs::MetadataExt::blocks(&metadata) * 512
}

/// The guest memory file of the VMM `vmm`, as /proc shows it.
fn guest_file(vmm: u32) -> std::path::PathBuf {
    let fds = std::fs::read_dir(format!("/proc/{vmm}/fd")).unwrap();
    fds.filter_map(Result::ok)
        .find(|fd| {
            std::fs::read_link(fd.path())
                .is_ok_and(|target| target.to_string_lossy().contains("tessera-guest-ram"))
        })
        .map(|fd| fd.path())
        .expect("the VMM holds its guest memory file")
}

/// A mapping of the guest memory file in this process, as a backend has
/// one: it stands for a backend that touched every page of the pool.
struct OtherMapping {
    at: std::ptr::NonNull<libc::c_void>,
    len: usize,
}

impl OtherMapping {
    /// Maps `len` bytes of the VMM's guest memory from `offset` and reads
    /// every page, so that they are all in this process's page tables.
    fn touching(vmm: u32, offset: u64, len: usize) -> Self {
        let file = std::fs::File::open(guest_file(vmm)).unwrap();
        // SAFETY: a new shared read-only mapping of a file this test opened;
        // nothing else in the process uses the range.
        let at = unsafe {
            nix::sys::mman::mmap(
                None,
                std::num::NonZeroUsize::new(len).unwrap(),
                nix::sys::mman::ProtFlags::PROT_READ,
                nix::sys::mman::MapFlags::MAP_SHARED,
                &file,
                offset as i64,
            )
        }
        .unwrap();
        for page in (0..len).step_by(4096) {
            // SAFETY: inside the mapping made above, which is readable.
            unsafe { std::ptr::read_volatile(at.as_ptr().cast::<u8>().add(page)) };
        }
        OtherMapping { at, len }
    }

    /// Its resident bytes, from /proc/self/smaps.
    fn resident(&self) -> u64 {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let start = format!("{:x}-", self.at.as_ptr() as usize);
        let kib: Option<u64> = smaps
            .split_once(&start)
            .and_then(|(_, rest)| rest.lines().find_map(|l| l.strip_prefix("Rss:")))
            .and_then(|v| v.split_whitespace().next()?.parse().ok());
        kib.expect("the mapping is in smaps") * 1024
    }
}

impl Drop for OtherMapping {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `touching`, used by nothing else.
        let _ = unsafe { nix::sys::mman::munmap(self.at, self.len) };
    }
}

/// The guest address of the probe's balloon pool.
fn pool_base(out: &str) -> u64 {
    let base = whole_lines(out)
        .find_map(|l| l.strip_prefix("probe.balloon=pool "))
        .and_then(|rest| rest.rsplit(' ').next())
        .and_then(|hex| u64::from_str_radix(hex.trim_start_matches("0x"), 16).ok());
    base.unwrap_or_else(|| panic!("no pool line:\n{out}"))
}

/// A field of /proc/<pid>/status, in bytes.
fn status_bytes(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: Option<u64> = status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| {
            v.trim_start_matches(':')
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        });
    kib.unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status")) * 1024
}

/// What the host holds of guest memory: the file's pages, the VMM's and
/// the drive backend's resident shared memory, and another mapping's.
#[derive(Debug, Clone, Copy)]
struct Resident {
    file: u64,
    vmm: u64,
    backend: u64,
    other: u64,
}

fn resident(vmm: u32, backend: u32, other: &OtherMapping) -> Resident {
    Resident {
        file: guest_file_bytes(vmm),
        vmm: status_bytes(vmm, "RssShmem"),
        backend: status_bytes(backend, "RssShmem"),
        other: other.resident(),
    }
}

/// Whether `less` is `amount` below `more` within 5%.
fn dropped_by(more: u64, less: u64, amount: u64) -> bool {
    let dropped = more.saturating_sub(less);
    dropped.abs_diff(amount) <= amount / 20
}

#[test]
fn an_inflated_balloon_leaves_the_host_and_comes_back_on_deflate() {
    let (mut api, mut c) = boot(json!({"amount_mib": 0, "deflate_on_oom": false,
                                       "stats_polling_interval_s": 1}));
    let vmm = api.vm.pid();
    let backend = tessera_tests::descendant_pid(vmm, "--serial data").unwrap_or_else(|| {
        panic!(
            "no backend for the drive:\n{}\n{}",
            api.vm.stdout(),
            api.vm.stderr()
        )
    });
    let pool = pool_base(&api.vm.stdout());
    let other = OtherMapping::touching(vmm, pool, (POOL_MIB * MIB) as usize);
    let full = resident(vmm, backend, &other);
    assert!(
        full.file >= POOL_MIB * MIB,
        "the guest filled its pool, yet the file holds {full:?}"
    );
    let r = c.patch("/balloon", &json!({"amount_mib": BALLOON_MIB}).to_string());
    assert_eq!(r.status, 204, "{}", r.body);
    wait_for_balloon(&mut api, BALLOON_MIB * 256);
    let inflated = resident(vmm, backend, &other);
    eprintln!("full {full:?}, inflated {inflated:?}");
    assert!(
        dropped_by(full.file, inflated.file, BALLOON_MIB * MIB),
        "the file went from {} to {} bytes for a {BALLOON_MIB} MiB balloon",
        full.file,
        inflated.file
    );
    assert!(
        dropped_by(full.vmm, inflated.vmm, BALLOON_MIB * MIB),
        "the VMM's resident shared memory went from {} to {} bytes",
        full.vmm,
        inflated.vmm
    );
    assert!(
        dropped_by(full.other, inflated.other, BALLOON_MIB * MIB),
        "another process's mapping of guest memory went from {} to {} bytes",
        full.other,
        inflated.other
    );
    assert!(inflated.backend <= full.backend, "{full:?} {inflated:?}");
    // The guest's figures and the device's.
    std::thread::sleep(Duration::from_millis(2500));
    let stats = c.get("/balloon/statistics").json();
    assert_eq!(stats["target_mib"], BALLOON_MIB, "{stats}");
    assert_eq!(stats["actual_mib"], BALLOON_MIB, "{stats}");
    assert_eq!(stats["actual_pages"], BALLOON_MIB * 256, "{stats}");
    assert_eq!(
        stats["free_memory"],
        (POOL_MIB - BALLOON_MIB) * MIB,
        "{stats}"
    );
    assert!(stats["total_memory"].as_u64() > Some(250 * MIB), "{stats}");
    assert_eq!(c.get("/balloon").json()["amount_mib"], BALLOON_MIB);

    let r = c.patch("/balloon", r#"{"amount_mib": 0}"#);
    assert_eq!(r.status, 204, "{}", r.body);
    wait_for_balloon(&mut api, 0);
    let deflated = resident(vmm, backend, &other);
    eprintln!("deflated {deflated:?}");
    assert!(
        dropped_by(deflated.file, inflated.file, BALLOON_MIB * MIB),
        "the file went from {} to {} bytes when the guest took the pages back",
        inflated.file,
        deflated.file
    );
    let inflated = api.flushed_counter(&mut c, "balloon", "inflated_bytes");
    assert_eq!(inflated, BALLOON_MIB * MIB);
    let out = api.vm.finish().stdout;
    assert!(
        whole_lines(&out).any(|l| l.starts_with("probe.memtest=ok"))
            && !whole_lines(&out).any(|l| l.starts_with("probe.memtest=bad")),
        "{out}"
    );
}

#[test]
fn the_api_follows_firecrackers_rules() {
    let api = ApiVm::start(&[]);
    let mut c = api.client();
    c.put_ok(
        "/boot-source",
        json!({"kernel_image_path": guest_artifacts().probe(),
               "boot_args": "console=ttyS0 probe.ticks=0"}),
    );
    c.put_ok(
        "/machine-config",
        json!({"vcpu_count": 1, "mem_size_mib": 128}),
    );
    let fault = |r: tessera_tests::api::HttpResponse| {
        assert_eq!(r.status, 400, "{}", r.body);
        r.fault()
    };
    assert!(fault(c.get("/balloon")).contains("No balloon device found."));
    assert!(fault(c.patch("/balloon", r#"{"amount_mib": 1}"#))
        .contains("not supported before starting the microVM"));
    assert!(fault(c.put(
        "/balloon",
        r#"{"amount_mib": 129, "deflate_on_oom": false}"#
    ))
    .contains("Amount of pages requested is too large."));
    c.put_ok("/balloon", json!({"amount_mib": 1, "deflate_on_oom": true}));
    c.put_ok(
        "/balloon",
        json!({"amount_mib": 0, "deflate_on_oom": false, "stats_polling_interval_s": 5}),
    );
    let config = c.get("/balloon").json();
    assert_eq!(config["amount_mib"], 0);
    assert_eq!(config["deflate_on_oom"], false);
    assert_eq!(config["stats_polling_interval_s"], 5);
    assert!(fault(c.put(
        "/machine-config",
        r#"{"vcpu_count": 1, "mem_size_mib": 128, "huge_pages": "2M"}"#
    ))
    .contains("huge_pages"));
    c.put_ok("/actions", json!({"action_type": "InstanceStart"}));
    // The probe lists the device without driving it.
    let mut api = api;
    api.vm
        .wait_until(DEADLINE, |out, _| out.contains("probe.virtio="));
    assert!(
        fault(c.patch("/balloon", r#"{"amount_mib": 1}"#)).contains("Device not activated yet.")
    );
    assert!(
        fault(c.patch("/balloon/statistics", r#"{"stats_polling_interval_s": 0}"#))
            .contains("Statistics cannot be enabled/disabled after activation.")
    );
    let r = c.patch("/balloon/statistics", r#"{"stats_polling_interval_s": 2}"#);
    assert_eq!(r.status, 204, "{}", r.body);
    assert_eq!(c.get("/balloon").json()["stats_polling_interval_s"], 2);
    assert!(fault(c.patch("/balloon/hinting/start", ""))
        .contains("Attempting to use hinting when not enabled"));
    assert!(
        fault(c.put("/balloon", r#"{"amount_mib": 0, "deflate_on_oom": false}"#))
            .contains("not supported after starting the microVM")
    );
    assert_eq!(
        c.get("/vm/config").json()["balloon"]["deflate_on_oom"],
        false
    );
    drop(api.vm.finish());
}

#[test]
fn a_snapshot_keeps_the_balloon_and_the_loaded_guest_deflates_it() {
    let (mut api, mut c) = boot(json!({"amount_mib": 0, "deflate_on_oom": false,
                                       "stats_polling_interval_s": 1}));
    let r = c.patch("/balloon", r#"{"amount_mib": 64}"#);
    assert_eq!(r.status, 204, "{}", r.body);
    wait_for_balloon(&mut api, 64 * 256);
    assert_eq!(c.patch("/vm", r#"{"state": "Paused"}"#).status, 204);
    let dir = tempfile::tempdir().unwrap();
    let (state, memory) = (dir.path().join("vm.snap"), dir.path().join("vm.mem"));
    c.put_ok(
        "/snapshot/create",
        json!({"snapshot_path": state, "mem_file_path": memory}),
    );
    drop(api.vm.finish());
    let mut loaded = ApiVm::start(&[]);
    let mut c = loaded.client();
    c.put_ok(
        "/snapshot/load",
        json!({"snapshot_path": state, "mem_file_path": memory, "resume_vm": true}),
    );
    assert_eq!(c.get("/balloon").json()["amount_mib"], 64);
    let stats = c.get("/balloon/statistics").json();
    assert_eq!(stats["actual_mib"], 64, "{stats}");
    let r = c.patch("/balloon", r#"{"amount_mib": 0}"#);
    assert_eq!(r.status, 204, "{}", r.body);
    let before = loaded.vm.stdout();
    loaded.vm.wait_until(DEADLINE, |out, _| {
        out.len() > before.len() && out[before.len()..].contains("probe.balloon=0 pages\n")
    });
    let out = loaded.vm.finish().stdout;
    assert!(out.contains("probe.balloon=0 pages\n"), "{out}");
    assert!(
        !whole_lines(&out).any(|l| l.starts_with("probe.balloon=bad")
            || l.starts_with("probe.memtest=bad")
            || l.starts_with("probe.balloon=error")),
        "{out}"
    );
}
