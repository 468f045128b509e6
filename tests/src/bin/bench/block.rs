//! The block benchmark: libblkio drives our `vhost-user-blk` and QEMU's
//! `qemu-storage-daemon` side by side on the same file, page-cached and with
//! O_DIRECT, beside fio with io_uring on the host file. The frontend runs
//! on CPU 0 and the backend on CPU 1, as in the reference figures.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};
use tessera_tests::blkio_client::BlkioDisk;
use tessera_tests::{workspace_bin, Running};

use super::summary;

const IMAGE_MIB: u64 = 256;
const SECONDS: u64 = 1;

/// One workload: name, block size, queue depth, writes, random.
struct Workload {
    name: &'static str,
    block: usize,
    depth: usize,
    write: bool,
    random: bool,
}

const WORKLOADS: &[Workload] = &[
    Workload {
        name: "randread-4k-qd1",
        block: 4096,
        depth: 1,
        write: false,
        random: true,
    },
    Workload {
        name: "randread-4k-qd32",
        block: 4096,
        depth: 32,
        write: false,
        random: true,
    },
    Workload {
        name: "randwrite-4k-qd1",
        block: 4096,
        depth: 1,
        write: true,
        random: true,
    },
    Workload {
        name: "randwrite-4k-qd32",
        block: 4096,
        depth: 32,
        write: true,
        random: true,
    },
    Workload {
        name: "read-1m-qd4",
        block: 1 << 20,
        depth: 4,
        write: false,
        random: false,
    },
    Workload {
        name: "write-1m-qd4",
        block: 1 << 20,
        depth: 4,
        write: true,
        random: false,
    },
];

fn pin_to_cpu(pid: u32, cpu: usize) {
    // SAFETY: a zeroed cpu_set_t with one bit set is a valid mask for
    // sched_setaffinity on a live pid (0 = this thread).
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(pid as i32, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// utime + stime of `pid` in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks: f64 = fields.get(11..13).map_or(0.0, |f| {
        f.iter().filter_map(|v| v.parse::<f64>().ok()).sum()
    });
    // SAFETY: sysconf has no preconditions.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// A backend under test, serving `image` on `socket`.
fn start_backend(kind: &str, image: &Path, socket: &Path, direct: bool) -> Running {
    let mut command = match kind {
        "tessera" => {
            let mut c = Command::new(workspace_bin("vhost-user-blk"));
            c.arg("--socket").arg(socket).arg("--path").arg(image);
            if direct {
                c.arg("--direct");
            }
            c
        }
        _ => {
            let mut c = Command::new("qemu-storage-daemon");
            c.arg("--blockdev").arg(format!(
                "driver=file,node-name=disk,filename={},cache.direct={},aio=io_uring",
                image.display(),
                if direct { "on" } else { "off" }
            ));
            c.arg("--export").arg(format!(
                "type=vhost-user-blk,id=export,node-name=disk,addr.type=unix,addr.path={},writable=on",
                socket.display()
            ));
            c
        }
    };
    command.stdout(std::process::Stdio::null());
    let running = Running::spawn(command);
    assert!(
        tessera_tests::wait_for_path(socket, Duration::from_secs(10)),
        "{} never appeared",
        socket.display()
    );
    pin_to_cpu(running.pid(), 1);
    running
}

/// IOPS and backend CPU seconds per GiB for one workload on one backend.
fn run_backend(kind: &str, image: &Path, direct: bool, w: &Workload) -> (f64, f64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("blk.sock");
    let backend = start_backend(kind, image, &socket, direct);
    let pid = backend.pid();
    let mut disk = BlkioDisk::connect(&socket, w.depth * w.block).expect("libblkio connect");
    pin_to_cpu(0, 0);
    let blocks = (IMAGE_MIB << 20) / w.block as u64;
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let cpu_before = cpu_seconds(pid);
    let ops = disk.run_for(w.depth, w.block, Duration::from_secs(SECONDS), |i| {
        let block = if w.random {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % blocks
        } else {
            i as u64 % blocks
        };
        (w.write, block * w.block as u64)
    });
    let cpu = cpu_seconds(pid) - cpu_before;
    drop(disk);
    drop(backend.finish());
    let gib = (ops * w.block) as f64 / (1u64 << 30) as f64;
    (ops as f64 / SECONDS as f64, cpu / gib)
}

/// fio with io_uring on the host file: IOPS.
fn run_fio(image: &Path, direct: bool, w: &Workload) -> Option<f64> {
    let rw = match (w.write, w.random) {
        (false, true) => "randread",
        (true, true) => "randwrite",
        (false, false) => "read",
        (true, false) => "write",
    };
    let output = Command::new("taskset")
        .args([
            "-c",
            "0",
            "fio",
            "--name=host",
            "--ioengine=io_uring",
            "--output-format=json",
        ])
        .arg(format!("--filename={}", image.display()))
        .arg(format!("--rw={rw}"))
        .arg(format!("--bs={}", w.block))
        .arg(format!("--iodepth={}", w.depth))
        .arg(format!("--direct={}", u8::from(direct)))
        .arg(format!("--runtime={SECONDS}"))
        .args(["--time_based", "--norandommap", "--randrepeat=0"])
        .output()
        .ok()?;
    let report: Value = serde_json::from_slice(&output.stdout).ok()?;
    let job = &report["jobs"][0];
    let side = if w.write { "write" } else { "read" };
    job[side]["iops"].as_f64()
}

/// MiB/s of the probe guest's sequential write and verify of `mib` MiB
/// through tessera and our backend: the time from the probe naming the
/// device to its result line. Under kvm_pvm this measures the emulated
/// guest as much as the I/O path.
fn through_tessera(runs: usize, mib: u64) -> Value {
    let probe = tessera_tests::guest_artifacts().probe();
    let mut out = json!({"probe_mib": mib});
    for mode in ["write", "verify"] {
        let mut rates = Vec::new();
        for _ in 0..runs {
            let dir = tempfile::tempdir().expect("tempdir");
            let disk = dir.path().join("disk.img");
            std::fs::File::create(&disk)
                .and_then(|f| f.set_len((2 * mib) << 20))
                .expect("disk");
            if mode == "verify" {
                // Verify reads what a write run left.
                let mut config = tessera_tests::VmConfig::new(
                    &probe,
                    &format!("console=ttyS0 probe.blk=write probe.blk_mib={mib}"),
                )
                .to_json();
                config["drives"] =
                    json!([{"drive_id": "d", "path_on_host": disk, "is_root_device": false}]);
                let path = dir.path().join("prep.json");
                std::fs::write(&path, config.to_string()).expect("config");
                let mut c = Command::new(workspace_bin("tessera"));
                c.arg("--no-api").arg("--config-file").arg(&path);
                let _ = tessera_tests::run_with_deadline(c, Duration::from_secs(120), |_, _| false);
            }
            let mut config = tessera_tests::VmConfig::new(
                &probe,
                &format!("console=ttyS0 probe.blk={mode} probe.blk_mib={mib}"),
            )
            .to_json();
            config["drives"] =
                json!([{"drive_id": "d", "path_on_host": disk, "is_root_device": false}]);
            let path = dir.path().join("vm.json");
            std::fs::write(&path, config.to_string()).expect("config");
            let mut c = Command::new(workspace_bin("tessera"));
            c.arg("--no-api").arg("--config-file").arg(&path);
            let mut vm = Running::spawn(c);
            vm.wait_until(Duration::from_secs(120), |o, _| {
                o.contains("probe.virtio=0,2,")
            });
            let start = vm.elapsed();
            vm.wait_until(Duration::from_secs(120), |o, _| o.contains("probe.blk0="));
            let seconds = (vm.elapsed() - start).as_secs_f64();
            let run = vm.finish();
            assert!(run.stdout.contains("probe.blk0=ok"), "{}", run.describe());
            rates.push(mib as f64 / seconds);
        }
        out[mode] = json!({"mib_per_s": summary(rates)});
    }
    out
}

/// The whole block report.
pub fn bench_block(runs: usize) -> Value {
    let dir = tempfile::tempdir().expect("tempdir");
    let image: PathBuf = dir.path().join("bench.img");
    std::fs::write(&image, vec![0x5au8; (IMAGE_MIB << 20) as usize]).expect("image");
    let have_qsd = Command::new("qemu-storage-daemon")
        .arg("--version")
        .output()
        .is_ok();
    let have_fio = Command::new("fio").arg("--version").output().is_ok();
    let mut rows = Vec::new();
    for direct in [false, true] {
        for w in WORKLOADS {
            let mut cell = json!({"workload": w.name, "o_direct": direct, "block_bytes": w.block, "queue_depth": w.depth});
            let mut ours_median = 0.0;
            for kind in ["tessera", "qemu-storage-daemon"] {
                if kind != "tessera" && !have_qsd {
                    continue;
                }
                let (mut iops, mut cpu) = (Vec::new(), Vec::new());
                for _ in 0..runs {
                    let (i, c) = run_backend(kind, &image, direct, w);
                    iops.push(i);
                    cpu.push(c);
                }
                let s = summary(iops);
                if kind == "tessera" {
                    ours_median = s["median"].as_f64().unwrap_or(0.0);
                }
                cell[kind] = json!({"iops": s, "backend_cpu_seconds_per_gib": summary(cpu)});
            }
            if have_fio {
                let host: Vec<f64> = (0..runs)
                    .filter_map(|_| run_fio(&image, direct, w))
                    .collect();
                if !host.is_empty() {
                    let s = summary(host);
                    let host_median = s["median"].as_f64().unwrap_or(1.0);
                    cell["host_fio_io_uring"] = json!({"iops": s});
                    cell["tessera_vs_host"] = json!(ours_median / host_median);
                }
            }
            eprintln!("{}", cell);
            rows.push(cell);
        }
    }
    json!({
        "image_mib": IMAGE_MIB,
        "seconds_per_run": SECONDS,
        "runs": runs,
        "frontend": "libblkio virtio-blk-vhost-user, 1 queue, CPU 0; backend on CPU 1",
        "rows": rows,
        "through_tessera_probe_kvm_pvm": through_tessera(runs, 8),
    })
}
