//! The block benchmark: libblkio drives our `vhost-user-blk`, Cloud
//! Hypervisor's `vhost_user_block` (from `../shared/peers/`, when there)
//! and QEMU's `qemu-storage-daemon` side by side on the same file: on ext4
//! page-cached and with O_DIRECT, and on tmpfs; beside fio with io_uring on
//! the host file. The frontend runs
//! on CPU 0 and every backend thread on CPU 1, as in the reference
//! figures. The `-4q` cells use 4 queues (`--queues 4`, qemu-storage-daemon's
//! `num-queues=4`) with one frontend thread per queue, and fio `numjobs=4`.
//! The `-polled` cells use libblkio's poll queues: the frontend turns
//! interrupts off and busy-polls the used ring, so a QD1 round trip no
//! longer includes waking the frontend's thread.
//!
//! For comparisons while working on the backend: `TESSERA_BENCH_BLOCK_ONLY`
//! (a substring of `<workload>-cached` or `<workload>-direct`),
//! `TESSERA_BENCH_BLOCK_KINDS` (`tessera`, `cloud-hypervisor`,
//! `qemu-storage-daemon`; skips fio),
//! `TESSERA_BENCH_BLK_BIN` (another `vhost-user-blk` build),
//! `TESSERA_BENCH_BLK_ARGS` (extra backend arguments) and
//! `TESSERA_BENCH_BLOCK_SETTLE_MS` (time every backend is left idle between
//! its start and the frontend's connection, as a VMM starts its backends
//! ahead of the guest; 0 by default).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};
use tessera_tests::blkio_client::{BlkioDisk, BlkioQueues, Completions};
use tessera_tests::{workspace_bin, Running};

use super::{cpu_seconds, pin_this_thread, summary};

const IMAGE_MIB: u64 = 256;
const SECONDS: u64 = 1;

/// One workload: name, block size, queue depth (in total, over all
/// queues), writes, random, the number of queues (with more than one,
/// one frontend thread per queue keeps `depth / queues` requests in flight
/// on its own queue, as fio's `numjobs` with `iodepth`), and how the
/// frontend waits for completions.
struct Workload {
    name: &'static str,
    block: usize,
    depth: usize,
    write: bool,
    random: bool,
    queues: usize,
    completions: Completions,
}

const WORKLOADS: &[Workload] = &[
    Workload {
        name: "randread-4k-qd1",
        block: 4096,
        depth: 1,
        write: false,
        random: true,
        queues: 1,
        completions: Completions::Interrupt,
    },
    Workload {
        name: "randread-4k-qd32",
        block: 4096,
        depth: 32,
        write: false,
        random: true,
        queues: 1,
        completions: Completions::Interrupt,
    },
    Workload {
        name: "randwrite-4k-qd1",
        block: 4096,
        depth: 1,
        write: true,
        random: true,
        queues: 1,
        completions: Completions::Interrupt,
    },
    Workload {
        name: "randwrite-4k-qd32",
        block: 4096,
        depth: 32,
        write: true,
        random: true,
        queues: 1,
        completions: Completions::Interrupt,
    },
    Workload {
        name: "read-1m-qd4",
        block: 1 << 20,
        depth: 4,
        write: false,
        random: false,
        queues: 1,
        completions: Completions::Interrupt,
    },
    Workload {
        name: "write-1m-qd4",
        block: 1 << 20,
        depth: 4,
        write: true,
        random: false,
        queues: 1,
        completions: Completions::Interrupt,
    },
    Workload {
        name: "randread-4k-qd32-4q",
        block: 4096,
        depth: 32,
        write: false,
        random: true,
        queues: 4,
        completions: Completions::Interrupt,
    },
    Workload {
        name: "randwrite-4k-qd32-4q",
        block: 4096,
        depth: 32,
        write: true,
        random: true,
        queues: 4,
        completions: Completions::Interrupt,
    },
    // QD1 with an interrupt-driven frontend measures the frontend's wake-up
    // more than the backend; a polling frontend (a guest's virtio-blk
    // `poll_queues`, SPDK) leaves the backend's own latency.
    Workload {
        name: "randread-4k-qd1-polled",
        block: 4096,
        depth: 1,
        write: false,
        random: true,
        queues: 1,
        completions: Completions::Polled,
    },
    Workload {
        name: "randwrite-4k-qd1-polled",
        block: 4096,
        depth: 1,
        write: true,
        random: true,
        queues: 1,
        completions: Completions::Polled,
    },
];

/// Writes back and drops the image's page cache, so that every O_DIRECT
/// run starts from the same state: an O_DIRECT write over a cached page
/// must invalidate it, which io_uring cannot do without blocking, and a run
/// that follows another would find fewer cached pages than the first.
fn drop_file_cache(image: &Path) {
    if let Ok(file) = std::fs::File::open(image) {
        let _ = file.sync_all();
        use std::os::fd::AsRawFd;
        // SAFETY: advice on an fd this function owns; no memory is involved.
        unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    }
}

/// `program` started on CPU 1 only, as `taskset -c 1` does: every thread
/// it starts inherits the mask, and a backend that sizes its thread pool by
/// the CPUs it may use sees one.
fn on_backend_cpu(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut command = Command::new("taskset");
    command.args(["-c", "1"]).arg(program);
    command
}

/// Cloud Hypervisor's vhost-user-blk backend among the peers' binaries.
fn ch_block_backend() -> PathBuf {
    crate::peers::peers_dir().join("vhost_user_block")
}

/// A backend under test, serving `image` on `socket`.
fn start_backend(kind: &str, image: &Path, socket: &Path, direct: bool, queues: usize) -> Running {
    let mut command = match kind {
        "tessera" => {
            // TESSERA_BENCH_BLK_BIN: another build to compare (before/after).
            let bin = std::env::var_os("TESSERA_BENCH_BLK_BIN")
                .map(PathBuf::from)
                .unwrap_or_else(|| workspace_bin("vhost-user-blk"));
            let mut c = on_backend_cpu(bin);
            c.arg("--socket").arg(socket).arg("--path").arg(image);
            c.arg("--queues").arg(queues.to_string());
            if let Ok(extra) = std::env::var("TESSERA_BENCH_BLK_ARGS") {
                c.args(extra.split_whitespace());
            }
            if direct {
                c.arg("--direct");
            }
            c
        }
        "cloud-hypervisor" => {
            let mut c = on_backend_cpu(ch_block_backend());
            c.arg("--block-backend").arg(format!(
                "path={},socket={},num_queues={queues},queue_size=256,direct={direct}",
                image.display(),
                socket.display()
            ));
            c
        }
        _ => {
            let mut c = on_backend_cpu("qemu-storage-daemon");
            c.arg("--blockdev").arg(format!(
                "driver=file,node-name=disk,filename={},cache.direct={},aio=io_uring",
                image.display(),
                if direct { "on" } else { "off" }
            ));
            c.arg("--export").arg(format!(
                "type=vhost-user-blk,id=export,node-name=disk,addr.type=unix,addr.path={},writable=on,num-queues={queues}",
                socket.display()
            ));
            c
        }
    };
    command.stdout(std::process::Stdio::null());
    let running = Running::spawn(command);
    assert!(
        tessera_tests::wait_for_listener(socket, Duration::from_secs(10)),
        "{} never appeared",
        socket.display()
    );
    running
}

/// The next offset of a workload: xorshift over the blocks when random.
fn next_offset(w: &Workload, state: &mut u64, i: usize) -> u64 {
    let blocks = (IMAGE_MIB << 20) / w.block as u64;
    let block = if w.random {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *state % blocks
    } else {
        i as u64 % blocks
    };
    block * w.block as u64
}

/// Drives `w` over `w.queues` libblkio queues of the backend at `socket`,
/// one thread per queue on CPU 0, each keeping `w.depth / w.queues`
/// requests in flight for `duration`; returns the requests completed.
/// Also returns the CPU seconds `pid` used meanwhile.
fn run_queues(
    socket: &Path,
    pid: u32,
    w: &Workload,
    duration: Duration,
) -> Result<(usize, f64), String> {
    use std::mem::MaybeUninit;
    let per_queue = (w.depth / w.queues).max(1);
    let mut client = BlkioQueues::connect_with(
        socket,
        w.queues,
        w.queues * per_queue * w.block,
        w.completions,
    )?;
    let cpu_before = cpu_seconds(pid);
    let deadline = std::time::Instant::now() + duration;
    let base = client.region.addr;
    let done = std::thread::scope(|s| {
        let threads: Vec<_> = std::mem::take(&mut client.queues)
            .into_iter()
            .enumerate()
            .map(|(q, mut queue)| {
                s.spawn(move || {
                    pin_this_thread(0);
                    let mut state = 0x9e37_79b9_7f4a_7c15u64 ^ ((q as u64 + 1) << 32);
                    let base = base + q * per_queue * w.block;
                    let mut completions: Vec<MaybeUninit<blkio::Completion>> =
                        (0..per_queue).map(|_| MaybeUninit::uninit()).collect();
                    let (mut submitted, mut done) = (0usize, 0usize);
                    loop {
                        let stop = std::time::Instant::now() >= deadline;
                        while !stop && submitted - done < per_queue {
                            let buf = base + (submitted % per_queue) * w.block;
                            let offset = next_offset(w, &mut state, submitted);
                            let flags = blkio::ReqFlags::empty();
                            if w.write {
                                queue.write(offset, buf as *const u8, w.block, 0, flags);
                            } else {
                                queue.read(offset, buf as *mut u8, w.block, 0, flags);
                            }
                            submitted += 1;
                        }
                        if stop && done == submitted {
                            return done;
                        }
                        let n = queue.do_io(&mut completions, 1, None, None).unwrap_or(0);
                        for completion in &completions[..n] {
                            // SAFETY: do_io initialised the first `n` completions.
                            let ret = unsafe { completion.assume_init_read() }.ret;
                            assert_eq!(ret, 0, "a benchmark request failed");
                        }
                        done += n;
                    }
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|t| t.join().expect("frontend thread"))
            .sum::<usize>()
    });
    Ok((done, cpu_seconds(pid) - cpu_before))
}

/// `TESSERA_BENCH_BLOCK_SETTLE_MS`: how long a backend is left idle before
/// the frontend connects.
fn settle_time() -> Duration {
    let ms = std::env::var("TESSERA_BENCH_BLOCK_SETTLE_MS")
        .ok()
        .and_then(|ms| ms.parse().ok())
        .unwrap_or(0);
    Duration::from_millis(ms)
}

/// IOPS and backend CPU seconds per GiB for one workload on one backend.
fn run_backend(kind: &str, image: &Path, direct: bool, w: &Workload) -> (f64, f64) {
    if direct {
        drop_file_cache(image);
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("blk.sock");
    let backend = start_backend(kind, image, &socket, direct, w.queues);
    std::thread::sleep(settle_time());
    let pid = backend.pid();
    let duration = Duration::from_secs(SECONDS);
    let (ops, cpu) = if w.queues > 1 || w.completions == Completions::Polled {
        run_queues(&socket, pid, w, duration).expect("libblkio queues")
    } else {
        let mut disk = BlkioDisk::connect(&socket, w.depth * w.block).expect("libblkio connect");
        pin_this_thread(0);
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let cpu_before = cpu_seconds(pid);
        let ops = disk.run_for(w.depth, w.block, duration, |i| {
            (w.write, next_offset(w, &mut state, i))
        });
        let cpu = cpu_seconds(pid) - cpu_before;
        drop(disk);
        (ops, cpu)
    };
    drop(backend.finish());
    let gib = (ops * w.block) as f64 / (1u64 << 30) as f64;
    (ops as f64 / SECONDS as f64, cpu / gib)
}

/// fio with io_uring on the host file: IOPS.
fn run_fio(image: &Path, direct: bool, w: &Workload) -> Option<f64> {
    if direct {
        drop_file_cache(image);
    }
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
        .arg(format!("--iodepth={}", (w.depth / w.queues).max(1)))
        .arg(format!("--numjobs={}", w.queues))
        .arg("--group_reporting")
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
            vm.wait_until(Duration::from_secs(120), |o, _| {
                tessera_tests::has_line(o, "probe.blk0=")
            });
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
    let ext4 = tempfile::tempdir().expect("tempdir");
    let tmpfs = tempfile::tempdir_in("/dev/shm").ok();
    let mut images = vec![("ext4", ext4.path().join("bench.img"))];
    if let Some(dir) = &tmpfs {
        images.push(("tmpfs", dir.path().join("bench.img")));
    }
    for (_, image) in &images {
        std::fs::write(image, vec![0x5au8; (IMAGE_MIB << 20) as usize]).expect("image");
    }
    let have_qsd = Command::new("qemu-storage-daemon")
        .arg("--version")
        .output()
        .is_ok();
    let have_ch = ch_block_backend().is_file();
    let have_fio = Command::new("fio").arg("--version").output().is_ok();
    // TESSERA_BENCH_BLOCK_ONLY=substring keeps the cells whose name
    // (workload, then "-direct" or "-cached") contains it.
    let only = std::env::var("TESSERA_BENCH_BLOCK_ONLY").unwrap_or_default();
    let mut rows = Vec::new();
    // tmpfs has no O_DIRECT.
    let cases = images
        .iter()
        .flat_map(|(fs, image)| [(fs, image, false), (fs, image, true)])
        .filter(|(fs, _, direct)| !(*direct && **fs == "tmpfs"));
    for (fs, image, direct) in cases {
        let image = image.as_path();
        for w in WORKLOADS {
            let label = format!(
                "{}-{}-{fs}",
                w.name,
                if direct { "direct" } else { "cached" }
            );
            if !label.contains(only.as_str()) {
                continue;
            }
            let mut cell = json!({"workload": w.name, "filesystem": fs, "o_direct": direct, "block_bytes": w.block, "queue_depth": w.depth, "queues": w.queues});
            let kinds: Vec<&str> = ["tessera", "cloud-hypervisor", "qemu-storage-daemon"]
                .into_iter()
                .filter(|k| match *k {
                    "tessera" => true,
                    "cloud-hypervisor" => have_ch,
                    _ => have_qsd,
                })
                .filter(|k| {
                    std::env::var("TESSERA_BENCH_BLOCK_KINDS").map_or(true, |v| v.contains(k))
                })
                .collect();
            // Runs alternate between the backends (ours first, then theirs
            // first), so that drift on this shared machine and the state a
            // run leaves behind weigh on both alike.
            let mut samples = vec![(Vec::new(), Vec::new()); kinds.len()];
            for run in 0..runs {
                for i in 0..kinds.len() {
                    let k = if run % 2 == 0 { i } else { kinds.len() - 1 - i };
                    let (iops, cpu) = run_backend(kinds[k], image, direct, w);
                    samples[k].0.push(iops);
                    samples[k].1.push(cpu);
                }
            }
            let mut ours_median = 0.0;
            let mut medians = Vec::new();
            for (kind, (iops, cpu)) in kinds.iter().zip(samples) {
                let s = summary(iops);
                let median = s["median"].as_f64().unwrap_or(0.0);
                if *kind == "tessera" {
                    ours_median = median;
                }
                medians.push((*kind, median));
                cell[*kind] = json!({"iops": s, "backend_cpu_seconds_per_gib": summary(cpu)});
            }
            for (kind, median) in medians {
                if kind != "tessera" && median > 0.0 {
                    cell[format!("tessera_vs_{kind}")] = json!(ours_median / median);
                }
            }
            if have_fio && std::env::var_os("TESSERA_BENCH_BLOCK_KINDS").is_none() {
                let host: Vec<f64> = (0..runs)
                    .filter_map(|_| run_fio(image, direct, w))
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
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    json!({
        "image_mib": IMAGE_MIB,
        "seconds_per_run": SECONDS,
        "runs": runs,
        "frontend": "libblkio virtio-blk-vhost-user, 1 queue (4 queues with one thread each for the -4q cells), waiting for the call eventfd (busy-polling the used ring with interrupts off in the -polled cells, libblkio's poll queues), CPU 0; each backend started under taskset -c 1 (all its threads on CPU 1)",
        "backends": "tessera's vhost-user-blk (default engine), Cloud Hypervisor's vhost_user_block (queue_size=256), qemu-storage-daemon (aio=io_uring)",
        "filesystems": "ext4 (this host's root file system, page-cached or O_DIRECT) and tmpfs (/dev/shm)",
        "order": "runs alternate between the backends; O_DIRECT runs start with the image's page cache written back and dropped",
        "backend_idle_before_connect_ms": settle_time().as_millis() as u64,
        "load_average_after": load.trim(),
        "rows": rows,
        "through_tessera_probe_kvm_pvm": if only.is_empty() {
            through_tessera(runs, 8)
        } else {
            Value::Null
        },
    })
}
