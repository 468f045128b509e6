//! Block devices through `tessera` and our `vhost-user-blk` backend, driven by
//! the probe guest's virtio-blk driver: data written by the guest checked
//! byte for byte on the host, read-only drives, multiple queues, discard,
//! a backend killed under a running guest, and QEMU's qemu-storage-daemon
//! as a third-party backend behind our frontend.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::json;
use tessera_tests::api::ApiVm;
use tessera_tests::{guest_artifacts, run_with_deadline, Running, VmConfig};

const DEADLINE: Duration = Duration::from_secs(120);
const SEED: u64 = 0x1234_5678;

fn probe_config(cmdline: &str, vcpus: u8, drives: serde_json::Value) -> serde_json::Value {
    let mut json = VmConfig::new(
        guest_artifacts().probe(),
        &format!("console=ttyS0 {cmdline}"),
    )
    .vcpus(vcpus)
    .mem_mib(256)
    .to_json();
    json["drives"] = drives;
    json
}

fn drive(id: &str, path: &Path, read_only: bool) -> serde_json::Value {
    json!({"drive_id": id, "path_on_host": path, "is_root_device": false, "is_read_only": read_only})
}

fn boot(config: &serde_json::Value) -> tessera_tests::RunOutput {
    boot_with_metrics(config).0
}

/// Boots `config` with metrics on; returns the run and the sum of every
/// flush's counters, by section (`block_<id>`) and counter.
fn boot_with_metrics(config: &serde_json::Value) -> (tessera_tests::RunOutput, serde_json::Value) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vm.json");
    let metrics = dir.path().join("metrics.json");
    let mut config = config.clone();
    config["metrics"] = json!({ "metrics_path": metrics });
    std::fs::write(&path, config.to_string()).unwrap();
    let mut command = Command::new(tessera_tests::workspace_bin("tessera"));
    command.arg("--no-api").arg("--config-file").arg(&path);
    let run = run_with_deadline(command, DEADLINE, |_, _| false);
    let mut totals = serde_json::Map::new();
    for line in std::fs::read_to_string(&metrics)
        .unwrap_or_default()
        .lines()
    {
        let Ok(serde_json::Value::Object(flush)) = serde_json::from_str(line) else {
            continue;
        };
        for (section, counters) in flush {
            let Some(counters) = counters.as_object() else {
                continue;
            };
            let sum = totals.entry(section).or_insert_with(|| json!({}));
            for (name, value) in counters {
                let before = sum[name].as_u64().unwrap_or(0);
                sum[name] = json!(before + value.as_u64().unwrap_or(0));
            }
        }
    }
    (run, serde_json::Value::Object(totals))
}

fn disk(dir: &Path, name: &str, mib: u64) -> PathBuf {
    let path = dir.join(name);
    let file = std::fs::File::create(&path).unwrap();
    file.set_len(mib << 20).unwrap();
    path
}

/// Checks that the first `mib` MiB of `path` hold the probe's pattern.
fn assert_pattern(path: &Path, mib: u64, seed: u64) {
    let bytes = std::fs::read(path).unwrap();
    for sector in 0..(mib << 20) / 512 {
        let want = (sector ^ seed).to_le_bytes();
        let at = (sector * 512) as usize;
        for word in bytes[at..at + 512].chunks(8) {
            assert_eq!(word, want, "sector {sector} of {}", path.display());
        }
    }
}

/// Asserts that the probe's line for block device `index` starts with `prefix`.
fn assert_blk(run: &tessera_tests::RunOutput, index: usize, prefix: &str) {
    let result = line(&run.stdout, &format!("probe.blk{index}"));
    assert!(
        result.starts_with(prefix),
        "probe.blk{index}={result}\n{}",
        run.describe()
    );
}

fn line<'a>(stdout: &'a str, key: &str) -> &'a str {
    stdout
        .lines()
        .find_map(|l| l.trim_end().strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key} line in:\n{stdout}"))
}

#[test]
fn guest_writes_reach_the_host_file_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let a = disk(dir.path(), "a.img", 16);
    let b = disk(dir.path(), "b.img", 8);
    let config = probe_config(
        &format!("probe.blk=write probe.blk_mib=4 probe.seed={SEED:#x}"),
        1,
        json!([drive("a", &a, false), drive("b", &b, false)]),
    );
    let (run, metrics) = boot_with_metrics(&config);
    assert_eq!(run.code(), 0, "{}", run.describe());
    assert_blk(&run, 0, "ok");
    assert_blk(&run, 1, "ok");
    // Each drive's backend counted what the probe asked of it, and the
    // VMM reported it: 4 MiB written, flushed and read back.
    for drive in ["block_a", "block_b"] {
        let counters = &metrics[drive];
        assert_eq!(
            counters["write_bytes"],
            json!(4 << 20),
            "{drive}: {counters}"
        );
        assert!(
            counters["read_bytes"].as_u64() >= Some(4 << 20),
            "{drive}: {counters}"
        );
        assert!(
            counters["write_count"].as_u64() >= Some(64),
            "{drive}: {counters}"
        );
        assert!(
            counters["flush_count"].as_u64() >= Some(1),
            "{drive}: {counters}"
        );
        assert!(
            counters["queue_event_count"].as_u64() >= Some(1),
            "{drive}: {counters}"
        );
        for failure in ["invalid_reqs_count", "execute_fails", "event_fails"] {
            assert_eq!(counters[failure], json!(0), "{drive}: {counters}");
        }
    }
    // Each backend tracked the requests in flight in a region the VMM
    // took from it and handed back (INFLIGHT_SHMFD).
    assert_eq!(
        run.stderr
            .matches("vhost-user-blk: tracking in-flight requests of 1 queue(s)")
            .count(),
        2,
        "{}",
        run.describe()
    );
    assert_pattern(&a, 4, SEED);
    assert_pattern(&b, 4, SEED);
    // The rest of the disk is untouched.
    let bytes = std::fs::read(&a).unwrap();
    assert!(bytes[4 << 20..].iter().all(|b| *b == 0));

    // A second boot reads the data back.
    let config = probe_config(
        &format!("probe.blk=verify probe.blk_mib=4 probe.seed={SEED:#x}"),
        1,
        json!([drive("a", &a, true)]),
    );
    let run = boot(&config);
    assert_blk(&run, 0, "ok");
}

#[test]
fn read_only_drives_refuse_writes() {
    let dir = tempfile::tempdir().unwrap();
    let a = disk(dir.path(), "ro.img", 8);
    std::fs::write(&a, vec![0x5a; 8 << 20]).unwrap();
    let config = probe_config(
        "probe.blk=write probe.blk_mib=1",
        1,
        json!([drive("ro", &a, true)]),
    );
    let (run, metrics) = boot_with_metrics(&config);
    assert_eq!(run.code(), 0, "{}", run.describe());
    assert_blk(&run, 0, "ro-write-rejected");
    assert_eq!(
        metrics["block_ro"]["invalid_reqs_count"],
        json!(1),
        "{metrics}"
    );
    assert_eq!(metrics["block_ro"]["write_count"], json!(0), "{metrics}");
    assert!(
        std::fs::read(&a).unwrap().iter().all(|b| *b == 0x5a),
        "the read-only file changed"
    );
}

#[test]
fn four_queues_are_negotiated_and_used() {
    let dir = tempfile::tempdir().unwrap();
    let a = disk(dir.path(), "mq.img", 16);
    let config = probe_config(
        &format!("probe.blk=write probe.blk_mib=8 probe.seed={SEED:#x}"),
        4,
        json!([drive("mq", &a, false)]),
    );
    let run = boot(&config);
    assert_eq!(run.code(), 0, "{}", run.describe());
    let result = line(&run.stdout, "probe.blk0");
    assert!(
        result.starts_with("ok") && result.contains("queues=4"),
        "{}",
        run.describe()
    );
    assert!(
        run.stderr.contains("drive mq: active with 4 queue(s)"),
        "{}",
        run.describe()
    );
    assert_pattern(&a, 8, SEED);
}

#[test]
fn a_drive_whose_size_is_not_whole_sectors_shows_its_whole_sectors() {
    // As Firecracker: the size is rounded down, the tail left alone.
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("odd.img");
    std::fs::write(&a, vec![0x33; (1 << 20) + 100]).unwrap();
    let config = probe_config(
        &format!("probe.blk=write probe.blk_mib=4 probe.seed={SEED:#x}"),
        1,
        json!([drive("odd", &a, false)]),
    );
    let run = boot(&config);
    assert_eq!(run.code(), 0, "{}", run.describe());
    assert_blk(&run, 0, "ok sectors=2048");
    assert_pattern(&a, 1, SEED);
    let bytes = std::fs::read(&a).unwrap();
    assert_eq!(bytes.len(), (1 << 20) + 100);
    assert!(bytes[1 << 20..].iter().all(|b| *b == 0x33));
}

#[test]
fn discard_frees_space_in_the_host_file() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("discard.img");
    std::fs::write(&a, vec![0x77; 16 << 20]).unwrap();
    let before = std::fs::metadata(&a).unwrap().blocks();
    let config = probe_config(
        "probe.blk=discard probe.blk_mib=8",
        1,
        json!([drive("d", &a, false)]),
    );
    let run = boot(&config);
    assert_eq!(run.code(), 0, "{}", run.describe());
    assert_blk(&run, 0, "discarded");
    let after = std::fs::metadata(&a).unwrap().blocks();
    // 8 MiB is 16384 512-byte blocks.
    assert!(before - after >= 16384, "blocks {before} -> {after}");
    let bytes = std::fs::read(&a).unwrap();
    assert!(bytes[..8 << 20].iter().all(|b| *b == 0));
    assert!(bytes[8 << 20..].iter().all(|b| *b == 0x77));
}

/// Boots the probe on two drives, stops the guest, sends `signal` to the
/// first drive's backend, and resumes: a new backend takes over that disk
/// (the VMM logs `gone` and the take-over), the guest sees no error on
/// either disk, and every byte it wrote is on both host files.
fn a_failed_backend_is_replaced_under_a_running_guest(signal: libc::c_int, gone: &str) {
    let dir = tempfile::tempdir().unwrap();
    let a = disk(dir.path(), "replaced.img", 8);
    let b = disk(dir.path(), "healthy.img", 8);
    let mut api = ApiVm::start(&[]);
    let mut c = api.client();
    let boot = json!({
        "kernel_image_path": guest_artifacts().probe(),
        "boot_args": format!("console=ttyS0 probe.blk=write probe.blk_mib=2 probe.seed={SEED:#x}"),
    });
    assert_eq!(c.put("/boot-source", &boot.to_string()).status, 204);
    for (id, path) in [("replaced", &a), ("healthy", &b)] {
        let r = c.put(
            &format!("/drives/{id}"),
            &drive(id, path, false).to_string(),
        );
        assert_eq!(r.status, 204, "{}", r.body);
    }
    assert_eq!(
        c.put("/actions", r#"{"action_type": "InstanceStart"}"#)
            .status,
        204
    );
    // Hold the guest while the backend fails.
    assert_eq!(c.patch("/vm", r#"{"state": "Paused"}"#).status, 204);
    let old = tessera_tests::descendant_pid(api.vm.pid(), "--serial replaced")
        .expect("the drive's backend");
    // SAFETY: kill sends a signal to a backend of the test's VMM.
    assert_eq!(unsafe { libc::kill(old as i32, signal) }, 0);
    if signal == libc::SIGKILL {
        api.vm.wait_until(DEADLINE, |_, err| {
            err.contains("drive replaced: a new backend took over")
        });
    }
    assert_eq!(c.patch("/vm", r#"{"state": "Resumed"}"#).status, 204);
    api.vm.wait_until(DEADLINE, |_, _| false);
    // SAFETY: as above; a stopped backend was replaced (and killed) by the
    // starter, so this finds nothing or a zombie.
    unsafe { libc::kill(old as i32, libc::SIGKILL) };
    let run = api.vm.finish();
    assert_eq!(run.code(), 0, "the VMM must live on\n{}", run.describe());
    assert_blk(&run, 0, "ok sectors=4096");
    assert_blk(&run, 1, "ok sectors=4096");
    assert_pattern(&a, 2, SEED);
    assert_pattern(&b, 2, SEED);
    assert!(run.stderr.contains(gone), "{}", run.describe());
    assert!(
        run.stderr
            .contains("drive replaced: a new backend took over"),
        "{}",
        run.describe()
    );
}

#[test]
fn a_killed_backend_is_replaced_and_the_guest_sees_no_error() {
    a_failed_backend_is_replaced_under_a_running_guest(
        libc::SIGKILL,
        "drive replaced: the backend is gone",
    );
}

#[test]
fn a_stopped_backend_is_replaced_after_the_reply_timeout() {
    // The vCPU that reads the stopped backend's config space waits out
    // BACKEND_REPLY_TIMEOUT, the VMM hangs up and brings a new backend in,
    // and the guest carries on.
    a_failed_backend_is_replaced_under_a_running_guest(libc::SIGSTOP, "hanging up on it");
}

#[test]
fn qemu_storage_daemon_serves_our_frontend() {
    let installed = Command::new("qemu-storage-daemon")
        .arg("--version")
        .output()
        .is_ok();
    if !tessera_tests::can_run(
        installed,
        "qemu-storage-daemon is not installed (Debian's qemu-system-common)",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = disk(dir.path(), "qsd.img", 16);
    let socket = dir.path().join("qsd.sock");
    let mut qsd = Command::new("qemu-storage-daemon");
    qsd.arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=disk,filename={}",
            image.display()
        ))
        .arg("--export")
        .arg(format!(
            "type=vhost-user-blk,id=export,node-name=disk,addr.type=unix,addr.path={},writable=on",
            socket.display()
        ))
        .stdout(Stdio::null());
    let daemon = Running::spawn(qsd);
    assert!(
        tessera_tests::wait_for_listener(&socket, Duration::from_secs(10)),
        "{} never appeared",
        socket.display()
    );
    let config = probe_config(
        &format!("probe.blk=write probe.blk_mib=4 probe.seed={SEED:#x}"),
        1,
        json!([{"drive_id": "qsd", "socket": socket, "is_root_device": false}]),
    );
    let run = boot(&config);
    drop(daemon.finish());
    assert_eq!(run.code(), 0, "{}", run.describe());
    assert_blk(&run, 0, "ok");
    assert_pattern(&image, 4, SEED);
}
