//! Live migration between two tessera processes, through the API: the
//! probe guest keeps ticking on the destination with no tick lost or
//! repeated, its memory test finds every page as it left it, a drive's
//! journal running across the move completes, and the source exits 0. A
//! destination that refuses, dies or is cancelled leaves the guest running
//! on the source.

use std::path::Path;
use std::time::Duration;

use serde_json::json;
use tessera_tests::api::{ApiClient, ApiVm};
use tessera_tests::console::numbers;
use tessera_tests::guest_artifacts;
use tessera_tests::journal::{first_bad_record, last_durable, SECTOR};

const DEADLINE: Duration = Duration::from_secs(90);
const MEMTEST_MIB: u64 = 4;
const SEED: u64 = 0x6d16_7a7e;

/// A source ticking with its memory test, plus `extra` resources.
fn source(boot_args: &str, extra: &[(&str, serde_json::Value)], track: bool) -> ApiVm {
    let api = ApiVm::start(&[]);
    let mut c = api.client();
    c.put_ok("/boot-source",
        json!({"kernel_image_path": guest_artifacts().probe(),
               "boot_args": format!("console=ttyS0 probe.ticks=0 probe.memtest={MEMTEST_MIB} {boot_args}")}),
    );
    c.put_ok(
        "/machine-config",
        json!({"vcpu_count": 1, "mem_size_mib": 128, "track_dirty_pages": track}),
    );
    for (path, body) in extra {
        c.put_ok(path, body.clone());
    }
    c.put_ok("/actions", json!({"action_type": "InstanceStart"}));
    api
}

/// Starts `PUT /migration/receive` on `destination` in a thread (the call
/// returns once the microVM runs there); returns the thread.
fn receive(destination: &ApiVm, body: serde_json::Value) -> std::thread::JoinHandle<(u16, String)> {
    let socket = destination.socket.clone();
    std::thread::spawn(move || {
        let r = ApiClient::connect(&socket).put("/migration/receive", &body.to_string());
        (r.status, r.body)
    })
}

/// Waits for `path` to be a listening socket.
fn listening(path: &Path) {
    assert!(
        tessera_tests::wait_for_path(path, Duration::from_secs(10)),
        "{} never appeared",
        path.display()
    );
}

/// The ticks of both consoles count up by one with neither gap nor
/// repeat, and the memory test checked every page after the move.
fn assert_guest_went_on(before: &str, after: &str) {
    let all = numbers(&format!("{before}{after}"), "probe.tick=");
    let expected: Vec<u64> = (1..=all.len() as u64).collect();
    assert_eq!(all, expected, "source:\n{before}\ndestination:\n{after}");
    assert!(!numbers(after, "probe.tick=").is_empty(), "{after}");
    assert!(!after.contains("probe.memtest=bad"), "{after}");
    let last_before = numbers(before, "probe.tick=").last().copied().unwrap_or(0);
    assert!(
        numbers(after, "probe.memtest=ok,")
            .iter()
            .any(|&t| t > last_before),
        "no memory check after the move:\n{after}"
    );
}

/// Moves a ticking source to a fresh destination through `url` (its
/// listener is `listen`), then checks the guest went on.
fn migrate_and_check(url: &str, listen: Option<&Path>) {
    let mut src = source("", &[], false);
    src.vm
        .wait_until(DEADLINE, |out, _| out.contains("probe.memtest=ok,3\n"));
    let mut dst = ApiVm::start(&[]);
    let receiving = receive(&dst, json!({"listen": url}));
    if let Some(path) = listen {
        listening(path);
    } else {
        std::thread::sleep(Duration::from_millis(300));
    }
    let mut c = src.client();
    c.put_ok("/migration/send", json!({"destination": url}));
    assert!(
        src.vm.wait_until(DEADLINE, |_, _| false),
        "the source did not end after the move"
    );
    let (status, body) = receiving.join().unwrap();
    assert_eq!(status, 204, "{body}");
    let before = src.vm.finish();
    assert_eq!(before.code(), 0, "{}", before.describe());
    let mut c = dst.client();
    assert_eq!(c.get("/migration").json()["phase"], "completed");
    assert_eq!(c.get("/").json()["state"], "Running");
    let last = numbers(&before.stdout, "probe.tick=")
        .last()
        .copied()
        .unwrap_or(0);
    let want = format!("probe.memtest=ok,{}\n", last + 3);
    dst.vm.wait_until(DEADLINE, |out, _| out.contains(&want));
    let after = dst.vm.finish().stdout;
    assert_guest_went_on(&before.stdout, &after);
}

#[test]
fn a_ticking_guest_moves_over_a_unix_socket_with_its_memory_intact() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("migration.sock");
    migrate_and_check(&format!("unix:{}", path.display()), Some(&path));
}

#[test]
fn a_ticking_guest_moves_over_tcp_on_loopback() {
    let port = 20000 + (std::process::id() % 20000) as u16;
    migrate_and_check(&format!("tcp:127.0.0.1:{port}"), None);
}

const JOURNAL_MIB: u64 = 2;

#[test]
fn a_drive_journal_running_across_the_move_completes_with_every_record() {
    let dir = tempfile::tempdir().unwrap();
    let disk = tessera_tests::sparse_file(&dir.path().join("journal.img"), JOURNAL_MIB << 20);
    let drive = json!({"drive_id": "journal", "path_on_host": disk, "is_root_device": false});
    let mut src = source(
        &format!("probe.blk=journal probe.blk_mib={JOURNAL_MIB} probe.seed={SEED:#x}"),
        &[("/drives/journal", drive)],
        true,
    );
    src.vm
        .wait_until(DEADLINE, |out, _| out.contains("probe.journal="));
    let path = dir.path().join("migration.sock");
    let url = format!("unix:{}", path.display());
    let mut dst = ApiVm::start(&[]);
    let receiving = receive(&dst, json!({"listen": url}));
    listening(&path);
    src.client()
        .put_ok("/migration/send", json!({"destination": url}));
    assert!(src.vm.wait_until(DEADLINE, |_, _| false));
    let (status, body) = receiving.join().unwrap();
    assert_eq!(status, 204, "{body}");
    let before = src.vm.finish();
    assert_eq!(before.code(), 0, "{}", before.describe());
    let total = (JOURNAL_MIB << 20) / SECTOR as u64;
    assert!(
        last_durable(&before.stdout) < total,
        "the journal was done before the move:\n{}",
        before.stdout
    );
    dst.vm.wait_until(DEADLINE, |out, _| {
        out.split_once("probe.blk0=")
            .is_some_and(|(_, rest)| rest.contains('\n'))
    });
    let after = dst.vm.finish().stdout;
    assert!(
        after.contains(&format!("probe.blk0=journaled sectors={total}")),
        "the journal did not complete after the move:\n{after}"
    );
    assert_eq!(first_bad_record(&disk, total, SEED), None);
}

/// A ticking source moving slowly (1 MiB/s) to a fresh destination over
/// a Unix socket, so that a test can interfere mid-stream.
struct SlowMove {
    src: ApiVm,
    dst: ApiVm,
    receiving: std::thread::JoinHandle<(u16, String)>,
    _dir: tempfile::TempDir,
}

fn start_slow_move() -> SlowMove {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("migration.sock");
    let url = format!("unix:{}", path.display());
    let mut src = source("", &[], false);
    src.vm
        .wait_until(DEADLINE, |out, _| out.contains("probe.memtest=ok,2\n"));
    let dst = ApiVm::start(&[]);
    let receiving = receive(&dst, json!({"listen": url}));
    listening(&path);
    src.client().put_ok(
        "/migration/send",
        json!({"destination": url, "max_bandwidth_mib_s": 1}),
    );
    SlowMove {
        src,
        dst,
        receiving,
        _dir: dir,
    }
}

/// The source ran on: its GET /migration says `phase`, and it ticks and
/// verifies its memory three more times.
fn assert_source_runs_on(src: &mut ApiVm, phase: &str) {
    let mut c = src.client();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        let status = c.get("/migration").json();
        if status["phase"] == phase || std::time::Instant::now() > deadline {
            break status;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status["phase"], phase, "{status}");
    assert_eq!(c.get("/").json()["state"], "Running");
    let last = numbers(&src.vm.stdout(), "probe.tick=")
        .last()
        .copied()
        .unwrap_or(0);
    let want = format!("probe.memtest=ok,{}\n", last + 3);
    assert!(
        !src.vm.wait_until(DEADLINE, |out, _| out.contains(&want)),
        "the source ended"
    );
    assert!(
        src.vm.stdout().contains(&want),
        "the source stopped ticking:\n{}",
        src.vm.stdout()
    );
    assert!(!src.vm.stdout().contains("probe.memtest=bad"));
}

#[test]
fn a_destination_killed_mid_stream_leaves_the_guest_running_on_the_source() {
    let SlowMove {
        mut src,
        dst,
        receiving,
        _dir,
    } = start_slow_move();
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(src.client().get("/migration").json()["phase"], "pre_copy");
    drop(dst.vm.finish());
    let _ = receiving.join();
    assert_source_runs_on(&mut src, "failed");
    let status = src.client().get("/migration").json();
    assert!(
        status["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{status}"
    );
    drop(src.vm.finish());
}

#[test]
fn a_cancelled_migration_leaves_the_guest_running_on_the_source() {
    let SlowMove {
        mut src,
        dst,
        receiving,
        _dir,
    } = start_slow_move();
    std::thread::sleep(Duration::from_millis(500));
    let r = src.client().put("/migration/cancel", "");
    assert_eq!(r.status, 204, "{}", r.body);
    assert_source_runs_on(&mut src, "cancelled");
    // The destination saw its source go and is still a fresh process.
    let (status, body) = receiving.join().unwrap();
    assert_eq!(status, 400, "{body}");
    drop(dst.vm.finish());
    drop(src.vm.finish());
}

#[test]
fn a_destination_that_refuses_says_why_and_the_source_runs_on() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("migration.sock");
    let url = format!("unix:{}", path.display());
    let mut src = source("", &[], false);
    src.vm
        .wait_until(DEADLINE, |out, _| out.contains("probe.memtest=ok,2\n"));
    let dst = ApiVm::start(&[]);
    let receiving = receive(
        &dst,
        json!({"listen": url,
               "drive_overrides": [{"drive_id": "nosuch", "path_on_host": "/x.img"}]}),
    );
    listening(&path);
    src.client()
        .put_ok("/migration/send", json!({"destination": url}));
    assert_source_runs_on(&mut src, "failed");
    let status = src.client().get("/migration").json();
    assert!(
        status["error"]
            .as_str()
            .is_some_and(|e| e.contains("refused") && e.contains("nosuch")),
        "{status}"
    );
    let (code, body) = receiving.join().unwrap();
    assert_eq!(code, 400);
    assert!(body.contains("nosuch"), "{body}");
    // Bad bodies and wrong phases are refused with the reason.
    let mut c = src.client();
    let r = c.put("/migration/send", r#"{"destination": "ftp:x"}"#);
    assert_eq!(r.status, 400);
    assert!(r.fault().contains("ftp:x"), "{}", r.body);
    let r = c.put("/migration/receive", r#"{"listen": "unix:/tmp/x"}"#);
    assert_eq!(r.status, 400);
    drop(dst.vm.finish());
    drop(src.vm.finish());
}

#[test]
fn a_guest_moves_back_and_forth_twenty_times_without_losing_a_tick() {
    let dir = tempfile::tempdir().unwrap();
    let mut current = source("", &[], false);
    current
        .vm
        .wait_until(DEADLINE, |out, _| out.contains("probe.memtest=ok,2\n"));
    let mut consoles = String::new();
    for hop in 0..20 {
        let path = dir.path().join(format!("hop{hop}.sock"));
        let url = format!("unix:{}", path.display());
        let mut next = ApiVm::start(&[]);
        let receiving = receive(&next, json!({"listen": url}));
        listening(&path);
        current
            .client()
            .put_ok("/migration/send", json!({"destination": url}));
        assert!(
            current.vm.wait_until(DEADLINE, |_, _| false),
            "hop {hop}: the source did not end"
        );
        let (status, body) = receiving.join().unwrap();
        assert_eq!(status, 204, "hop {hop}: {body}");
        let left = current.vm.finish();
        assert_eq!(left.code(), 0, "hop {hop}: {}", left.describe());
        consoles.push_str(&left.stdout);
        // The guest ticks on the new side before it moves again.
        next.vm
            .wait_until(DEADLINE, |out, _| !numbers(out, "probe.tick=").is_empty());
        current = next;
    }
    let last = numbers(&consoles, "probe.tick=")
        .last()
        .copied()
        .unwrap_or(0);
    let want = format!("probe.memtest=ok,{}\n", last + 2);
    current
        .vm
        .wait_until(DEADLINE, |out, _| out.contains(&want));
    let after = current.vm.finish().stdout;
    assert_guest_went_on(&consoles, &after);
}

#[test]
fn a_snapshot_loaded_paused_moves_with_the_memory_its_file_holds() {
    let dir = tempfile::tempdir().unwrap();
    // A snapshot of a ticking guest whose memory test filled 4 MiB.
    let mut original = source("", &[], false);
    original
        .vm
        .wait_until(DEADLINE, |out, _| out.contains("probe.memtest=ok,2\n"));
    let mut c = original.client();
    assert_eq!(c.patch("/vm", r#"{"state": "Paused"}"#).status, 204);
    let (state, memory) = (dir.path().join("vm.snap"), dir.path().join("vm.mem"));
    c.put_ok(
        "/snapshot/create",
        json!({"snapshot_path": state, "mem_file_path": memory}),
    );
    let before = original.vm.finish().stdout;
    // Loaded paused, nothing of guest memory is in this process yet: the
    // move must read it from the file, not take it for zeros.
    let mut loaded = ApiVm::start(&[]);
    loaded.client().put_ok(
        "/snapshot/load",
        json!({"snapshot_path": state, "mem_file_path": memory, "resume_vm": false}),
    );
    let path = dir.path().join("migration.sock");
    let url = format!("unix:{}", path.display());
    let mut dst = ApiVm::start(&[]);
    let receiving = receive(&dst, json!({"listen": url}));
    listening(&path);
    loaded
        .client()
        .put_ok("/migration/send", json!({"destination": url}));
    assert!(loaded.vm.wait_until(DEADLINE, |_, _| false));
    let (status, body) = receiving.join().unwrap();
    assert_eq!(status, 204, "{body}");
    let last = numbers(&before, "probe.tick=").last().copied().unwrap_or(0);
    let want = format!("probe.memtest=ok,{}\n", last + 2);
    dst.vm.wait_until(DEADLINE, |out, _| out.contains(&want));
    let after = dst.vm.finish().stdout;
    assert_guest_went_on(&before, &after);
}
