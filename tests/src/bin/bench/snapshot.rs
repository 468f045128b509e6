//! Snapshots beside Firecracker: the probe guest (1 vCPU, ticking) under
//! Tessera and Firecracker in turn, through each one's API, for 128 MiB
//! and 1 GiB guests. Per run and VMM:
//! - `create_ms`: `PUT /snapshot/create` of the paused guest, call to 204;
//! - `load_ms`: `PUT /snapshot/load` with `resume_vm` in a fresh process,
//!   call to 204;
//! - `load_to_tick_ms`: the same call until the guest's next tick line on
//!   the console (the probe ticks every 100 ms of guest time, so this
//!   includes what was left of the tick it was paused in);
//! - `mem_file_mib` / `mem_file_allocated_mib`: the memory file's size and
//!   what the file system holds of it;
//! - `uffd_load_ms` / `uffd_load_to_tick_ms`: the same load with the
//!   `Uffd` memory backend, the `uffd-handler` test binary serving the
//!   memory file (Firecracker's protocol, so the same handler for both);
//! - `diff_create_ms` / `diff_allocated_kib`: after the Full snapshot the
//!   guest runs two more ticks and a Diff is taken (`track_dirty_pages`):
//!   call to 204, and what its new, sparse memory file holds.
//!
//! Then 20 clones are loaded from one snapshot at once (one thread per
//! clone, each a fresh process): `clones_per_s` (first call to last 204)
//! and, once every clone ticks, each one's RSS and PSS (its share of pages
//! shared with the others: guest RAM read from one memory file).

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tessera_tests::api::ApiClient;
use tessera_tests::{guest_artifacts, probe_cmdline, Running};

use crate::peers::{peer_bin, Vmm};
use crate::{machine, summary};

const SIZES_MIB: [usize; 2] = [128, 1024];
const CLONES: usize = 20;
const DEADLINE: Duration = Duration::from_secs(60);

/// One VMM's samples at one size.
#[derive(Default)]
struct Samples {
    create_ms: Vec<f64>,
    load_ms: Vec<f64>,
    load_to_tick_ms: Vec<f64>,
    mem_file_mib: Vec<f64>,
    mem_file_allocated_mib: Vec<f64>,
    diff_create_ms: Vec<f64>,
    diff_allocated_kib: Vec<f64>,
    uffd_load_ms: Vec<f64>,
    uffd_load_to_tick_ms: Vec<f64>,
}

/// What one snapshot cycle measured.
struct Created {
    create_ms: f64,
    mem_file_mib: f64,
    allocated_mib: f64,
    diff_create_ms: f64,
    diff_allocated_kib: f64,
}

pub(crate) fn bench_snapshot(runs: usize) -> Value {
    let mut vmms = vec![Vmm::Tessera];
    vmms.extend(peer_bin("firecracker").map(Vmm::Firecracker));
    let mut sizes = serde_json::Map::new();
    for mem in SIZES_MIB {
        let mut samples: Vec<Samples> = vmms.iter().map(|_| Samples::default()).collect();
        for run in 0..runs {
            for k in 0..vmms.len() {
                let at = (run + k) % vmms.len();
                let dir = tempfile::tempdir().expect("tempdir");
                let s = &mut samples[at];
                let created = snapshot(&vmms[at], mem, dir.path());
                let create_ms = created.create_ms;
                s.create_ms.push(create_ms);
                s.mem_file_mib.push(created.mem_file_mib);
                s.mem_file_allocated_mib.push(created.allocated_mib);
                s.diff_create_ms.push(created.diff_create_ms);
                s.diff_allocated_kib.push(created.diff_allocated_kib);
                let (load_ms, to_tick_ms) = load(&vmms[at], dir.path());
                s.load_ms.push(load_ms);
                s.load_to_tick_ms.push(to_tick_ms);
                let (uffd_ms, uffd_to_tick_ms) = load_uffd(&vmms[at], dir.path());
                s.uffd_load_ms.push(uffd_ms);
                s.uffd_load_to_tick_ms.push(uffd_to_tick_ms);
                eprintln!(
                    "{mem} MiB run {}/{runs}: {} create {create_ms:.1} ms, load {load_ms:.1} ms",
                    run + 1,
                    vmms[at].name()
                );
            }
        }
        let mut per_vmm = serde_json::Map::new();
        for (vmm, s) in vmms.iter().zip(samples) {
            let dir = tempfile::tempdir().expect("tempdir");
            snapshot(vmm, mem, dir.path());
            per_vmm.insert(
                vmm.name().into(),
                json!({
                    "create_ms": summary(s.create_ms),
                    "load_ms": summary(s.load_ms),
                    "load_to_tick_ms": summary(s.load_to_tick_ms),
                    "mem_file_mib": summary(s.mem_file_mib),
                    "mem_file_allocated_mib": summary(s.mem_file_allocated_mib),
                    "diff_create_ms": summary(s.diff_create_ms),
                    "diff_allocated_kib": summary(s.diff_allocated_kib),
                    "uffd_load_ms": summary(s.uffd_load_ms),
                    "uffd_load_to_tick_ms": summary(s.uffd_load_to_tick_ms),
                    "clones": clones(vmm, dir.path()),
                }),
            );
        }
        per_vmm.insert("tessera_with_a_drive".into(), with_a_drive(mem, runs));
        sizes.insert(format!("{mem}_mib"), Value::Object(per_vmm));
    }
    json!({
        "machine": machine(),
        "runs": runs,
        "guest": "probe guest, 1 vCPU, ticking (probe.ticks=0), track_dirty_pages; a Full snapshot, two ticks, a Diff",
        "clones": CLONES,
        "sizes": sizes,
    })
}

/// Tessera alone (Firecracker cannot snapshot a vhost-user device): the
/// same cycle with a drive, whose backend shares guest memory, so a load
/// fills a memfd from the memory file (an eager copy) and starts the
/// drive's backend on a copy of the disk. Call to 204, in ms.
fn with_a_drive(mem: usize, runs: usize) -> Value {
    let mut create_ms = Vec::new();
    let mut load_ms = Vec::new();
    for _ in 0..runs {
        let dir = tempfile::tempdir().expect("tempdir");
        let disk = tessera_tests::sparse_file(&dir.path().join("disk.img"), 1 << 20);
        let drive = json!({"drive_id": "data", "path_on_host": disk, "is_root_device": false});
        let created = snapshot_with(&Vmm::Tessera, mem, dir.path(), Some(drive));
        create_ms.push(created.create_ms);
        let copy = dir.path().join("clone.img");
        std::fs::copy(&disk, &copy).expect("copy the disk");
        let (mut vm, mut c) = start(&Vmm::Tessera, dir.path(), "clone");
        let mut body = load_body(dir.path());
        body["drive_overrides"] = json!([{"drive_id": "data", "path_on_host": copy}]);
        let started = Instant::now();
        put(&mut c, &Vmm::Tessera, "/snapshot/load", body);
        load_ms.push(started.elapsed().as_secs_f64() * 1e3);
        vm.wait_until(DEADLINE, |out, _| out.contains("probe.tick="));
        drop(vm.finish());
    }
    json!({"create_ms": summary(create_ms), "load_ms": summary(load_ms)})
}

/// The API socket of a VMM run in `dir`.
fn start(vmm: &Vmm, dir: &Path, name: &str) -> (Running, ApiClient) {
    let socket = dir.join(format!("{name}.sock"));
    let vm = Running::spawn(vmm.api_command(&socket));
    let client = ApiClient::connect(&socket);
    (vm, client)
}

fn put(c: &mut ApiClient, vmm: &Vmm, path: &str, body: Value) {
    let r = c.put(path, &body.to_string());
    assert_eq!(
        r.status,
        204,
        "{}: PUT {path} {body}: {}",
        vmm.name(),
        r.body
    );
}

/// Boots the probe with `mem` MiB, pauses it once it ticks and snapshots it
/// to `dir`/vm.snap and vm.mem; lets it tick twice more and takes a Diff
/// to vm.diff.snap and vm.diff.mem.
fn snapshot(vmm: &Vmm, mem: usize, dir: &Path) -> Created {
    snapshot_with(vmm, mem, dir, None)
}

/// [`snapshot`], with a drive if `drive` is its body.
fn snapshot_with(vmm: &Vmm, mem: usize, dir: &Path, drive: Option<Value>) -> Created {
    let (mut vm, mut c) = start(vmm, dir, "source");
    if let Some(drive) = drive {
        put(&mut c, vmm, "/drives/data", drive);
    }
    put(
        &mut c,
        vmm,
        "/boot-source",
        json!({"kernel_image_path": guest_artifacts().probe(),
               "boot_args": probe_cmdline("probe.ticks=0")}),
    );
    put(
        &mut c,
        vmm,
        "/machine-config",
        json!({"vcpu_count": 1, "mem_size_mib": mem, "track_dirty_pages": true}),
    );
    put(
        &mut c,
        vmm,
        "/actions",
        json!({"action_type": "InstanceStart"}),
    );
    vm.wait_until(DEADLINE, |out, _| out.contains("probe.tick=2\n"));
    assert_eq!(c.patch("/vm", r#"{"state": "Paused"}"#).status, 204);
    let started = Instant::now();
    put(
        &mut c,
        vmm,
        "/snapshot/create",
        json!({"snapshot_path": dir.join("vm.snap"), "mem_file_path": dir.join("vm.mem")}),
    );
    let create_ms = started.elapsed().as_secs_f64() * 1e3;
    assert_eq!(c.patch("/vm", r#"{"state": "Resumed"}"#).status, 204);
    vm.wait_until(DEADLINE, |out, _| out.contains("probe.tick=4\n"));
    assert_eq!(c.patch("/vm", r#"{"state": "Paused"}"#).status, 204);
    let started = Instant::now();
    put(
        &mut c,
        vmm,
        "/snapshot/create",
        json!({"snapshot_path": dir.join("vm.diff.snap"),
               "mem_file_path": dir.join("vm.diff.mem"), "snapshot_type": "Diff"}),
    );
    let diff_create_ms = started.elapsed().as_secs_f64() * 1e3;
    drop(vm.finish());
    use std::os::unix::fs::MetadataExt;
    let mib = |bytes: u64| bytes as f64 / f64::from(1 << 20);
    let meta = std::fs::metadata(dir.join("vm.mem")).expect("memory file");
    let diff = std::fs::metadata(dir.join("vm.diff.mem")).expect("Diff memory file");
    Created {
        create_ms,
        mem_file_mib: mib(meta.len()),
        allocated_mib: mib(meta.blocks() * 512),
        diff_create_ms,
        diff_allocated_kib: diff.blocks() as f64 / 2.0,
    }
}

fn load_body(dir: &Path) -> Value {
    json!({"snapshot_path": dir.join("vm.snap"),
           "mem_backend": {"backend_type": "File", "backend_path": dir.join("vm.mem")},
           "resume_vm": true})
}

/// The load body with the `Uffd` memory backend on `socket`.
fn uffd_load_body(dir: &Path, socket: &Path) -> Value {
    json!({"snapshot_path": dir.join("vm.snap"),
           "mem_backend": {"backend_type": "Uffd", "backend_path": socket},
           "resume_vm": true})
}

/// Loads the snapshot in `dir` in a fresh process: (call to 204, call to
/// the next tick), in ms.
fn load(vmm: &Vmm, dir: &Path) -> (f64, f64) {
    load_with(vmm, dir, "clone", load_body(dir))
}

/// [`load`] with the `Uffd` memory backend: the `uffd-handler` test binary
/// (Firecracker's protocol) serves the memory file to either VMM.
fn load_uffd(vmm: &Vmm, dir: &Path) -> (f64, f64) {
    let socket = dir.join("uffd.sock");
    let mut command = std::process::Command::new(tessera_tests::workspace_bin("uffd-handler"));
    command.arg(&socket).arg(dir.join("vm.mem"));
    let handler = Running::spawn(command);
    assert!(
        tessera_tests::wait_for_listener(&socket, Duration::from_secs(10)),
        "uffd-handler: {}",
        handler.stderr()
    );
    let measured = load_with(vmm, dir, "uffd-clone", uffd_load_body(dir, &socket));
    drop(handler.finish());
    measured
}

/// Loads with `body` in a fresh process named `name`.
fn load_with(vmm: &Vmm, dir: &Path, name: &str, body: Value) -> (f64, f64) {
    let (mut vm, mut c) = start(vmm, dir, name);
    let started = Instant::now();
    put(&mut c, vmm, "/snapshot/load", body);
    let load_ms = started.elapsed().as_secs_f64() * 1e3;
    vm.wait_until(DEADLINE, |out, _| out.contains("probe.tick="));
    let to_tick_ms = started.elapsed().as_secs_f64() * 1e3;
    let run = vm.finish();
    assert!(
        run.stdout.contains("probe.tick="),
        "{}: no tick after the load\n{}",
        vmm.name(),
        run.describe()
    );
    (load_ms, to_tick_ms)
}

/// KiB of `field` (`Rss`, `Pss`) in `/proc/<pid>/smaps_rollup`.
fn rollup_kib(pid: u32, field: &str) -> f64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0.0)
}

/// Loads [`CLONES`] clones of the snapshot in `dir` at once.
fn clones(vmm: &Vmm, dir: &Path) -> Value {
    let started: Vec<(Running, ApiClient)> = (0..CLONES)
        .map(|i| start(vmm, dir, &format!("clone{i}")))
        .collect();
    let (mut vms, clients): (Vec<Running>, Vec<ApiClient>) = started.into_iter().unzip();
    let began = Instant::now();
    std::thread::scope(|scope| {
        for mut c in clients {
            scope.spawn(move || put(&mut c, vmm, "/snapshot/load", load_body(dir)));
        }
    });
    let per_s = CLONES as f64 / began.elapsed().as_secs_f64();
    for vm in &mut vms {
        vm.wait_until(DEADLINE, |out, _| out.contains("probe.tick="));
    }
    let rss: Vec<f64> = vms.iter().map(|vm| rollup_kib(vm.pid(), "Rss")).collect();
    let pss: Vec<f64> = vms.iter().map(|vm| rollup_kib(vm.pid(), "Pss")).collect();
    for vm in vms {
        drop(vm.finish());
    }
    json!({
        "clones_per_s": per_s,
        "rss_kib": summary(rss),
        "pss_kib": summary(pss),
    })
}
