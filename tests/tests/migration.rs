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
use tessera_tests::netns::Netns;
use tessera_tests::vsock::{self, echo_through};

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

/// Sends `src` to `url`, where `receiving` waits: the source ends, the
/// destination's receive call answers 204, and the source exits 0.
/// Returns how the source ended.
fn complete_move(
    mut src: ApiVm,
    receiving: std::thread::JoinHandle<(u16, String)>,
    url: &str,
) -> tessera_tests::RunOutput {
    src.client()
        .put_ok("/migration/send", json!({"destination": url}));
    assert!(
        src.vm.wait_until(DEADLINE, |_, _| false),
        "the source did not end after the move"
    );
    let (status, body) = receiving.join().unwrap();
    assert_eq!(status, 204, "{body}");
    let before = src.vm.finish();
    assert_eq!(before.code(), 0, "{}", before.describe());
    before
}

/// The pause the source's log reports ("... <n> ms from the pause to the
/// destination's word").
fn logged_downtime_ms(stderr: &str) -> u64 {
    stderr
        .lines()
        .find_map(|l| l.split_once("migration done: "))
        .and_then(|(_, done)| done.split(" ms from the pause").next())
        .and_then(|head| head.rsplit(' ').next())
        .and_then(|ms| ms.parse().ok())
        .unwrap_or_else(|| panic!("no downtime in the source's log:\n{stderr}"))
}

/// (transmitted, received) from `ping -q`'s summary.
fn ping_summary(out: &str) -> (u64, u64) {
    let line = out
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .unwrap_or_else(|| panic!("no ping summary:\n{out}"));
    let mut numbers = line
        .split(|c: char| !c.is_ascii_digit())
        .filter(|w| !w.is_empty())
        .map(|w| w.parse::<u64>().unwrap());
    (numbers.next().unwrap(), numbers.next().unwrap())
}

/// A guest pinged every 10 ms through a bridge moves from one of its TAPs
/// to another. The destination asks it to announce itself
/// (VIRTIO_NET_S_ANNOUNCE); its gratuitous ARP from the new TAP moves the
/// bridge's forwarding entry there, so the pings follow it and only those
/// of the pause (and a few in flight) are lost.
#[test]
fn a_guest_pinged_every_10_ms_moves_to_another_tap_and_loses_only_the_pause() {
    const GUEST_IP: &str = "10.79.0.2";
    const GUEST_MAC: &str = "06:00:0a:4f:00:02";
    const PINGS: u64 = 800;
    const INTERVAL_MS: u64 = 10;
    let netns = Netns::with_bridge("migping", &["tap0", "tap1"]);
    netns.ip(&["addr", "add", "10.79.0.1/24", "dev", "br0"]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("migration.sock");
    let url = format!("unix:{}", path.display());
    let mut src = ApiVm::start_in(&netns, &[]);
    let mut c = src.client();
    c.put_ok(
        "/boot-source",
        json!({"kernel_image_path": guest_artifacts().probe(),
               "boot_args": format!("console=ttyS0 probe.ticks=0 probe.net={GUEST_IP}/24")}),
    );
    c.put_ok(
        "/machine-config",
        json!({"vcpu_count": 1, "mem_size_mib": 128, "track_dirty_pages": true}),
    );
    c.put_ok(
        "/network-interfaces/eth0",
        json!({"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": GUEST_MAC}),
    );
    c.put_ok("/actions", json!({"action_type": "InstanceStart"}));
    src.vm
        .wait_until(DEADLINE, |out, _| out.contains("probe.tick=5\n"));
    let mut dst = ApiVm::start_in(&netns, &[]);
    let receiving = receive(
        &dst,
        json!({"listen": url,
               "network_overrides": [{"iface_id": "eth0", "host_dev_name": "tap1"}]}),
    );
    listening(&path);
    let ping = netns
        .command("ping")
        .args(["-n", "-q", "-W", "1"])
        .args(["-i", &format!("0.{INTERVAL_MS:03}")])
        .args(["-c", &PINGS.to_string(), GUEST_IP])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let before = complete_move(src, receiving, &url);
    let downtime_ms = logged_downtime_ms(&before.stderr);
    let summary = String::from_utf8(ping.wait_with_output().unwrap().stdout).unwrap();
    let (sent, received) = ping_summary(&summary);
    dst.vm.wait_until(DEADLINE, |out, _| {
        out.contains("probe.net0=announced 1 arp=1\n")
    });
    let fdb = netns
        .command("bridge")
        .args(["fdb", "show", "br", "br0"])
        .output()
        .unwrap();
    let fdb = String::from_utf8_lossy(&fdb.stdout).into_owned();
    let after = dst.vm.finish();
    assert!(
        after.stdout.contains("probe.net0=announced 1 arp=1\n"),
        "the guest did not announce itself:\n{}",
        after.describe()
    );
    assert!(
        fdb.lines()
            .any(|l| l.starts_with(GUEST_MAC) && l.contains("dev tap1")),
        "the bridge does not send to the guest's new TAP:\n{fdb}"
    );
    // Pings of the pause, plus a margin for the replies in flight and the
    // loaded machine's scheduling.
    let allowed = downtime_ms / INTERVAL_MS + 25;
    eprintln!(
        "{} of {sent} pings lost across a {downtime_ms} ms pause",
        sent - received
    );
    assert!(
        sent - received <= allowed,
        "{} of {sent} pings lost with a {downtime_ms} ms pause (at most {allowed}):\n{summary}",
        sent - received
    );
}

/// On one host the destination's vsock device listens on its own socket
/// (`vsock_override`) while the source still holds the guest's: a
/// connection echoes through the source's before the move and a new one
/// through the destination's after it.
#[test]
fn a_guest_with_vsock_moves_on_one_host_to_a_socket_of_its_own() {
    const PORT: u32 = 52;
    let dir = tempfile::tempdir().unwrap();
    let (uds, moved) = (dir.path().join("v.sock"), dir.path().join("moved.sock"));
    let path = dir.path().join("migration.sock");
    let url = format!("unix:{}", path.display());
    let mut src = source(
        &format!("probe.vsock=echo:{PORT}:2 probe.vsock_timeout_ms=120000"),
        &[("/vsock", json!({"guest_cid": 3, "uds_path": uds}))],
        true,
    );
    src.vm.wait_until(DEADLINE, |out, _| {
        out.contains(&format!("probe.vsock=listening {PORT}"))
    });
    let first = vsock::connect(&uds, PORT).unwrap();
    assert_eq!(echo_through(first, b"one".to_vec()), b"one");
    let mut dst = ApiVm::start(&[]);
    let receiving = receive(
        &dst,
        json!({"listen": url, "vsock_override": {"uds_path": moved}}),
    );
    listening(&path);
    let before = complete_move(src, receiving, &url);
    let second = vsock::connect(&moved, PORT).unwrap();
    assert_eq!(echo_through(second, b"two".to_vec()), b"two");
    dst.vm.wait_until(DEADLINE, |out, _| {
        out.split_once("probe.vsock=echoed")
            .is_some_and(|(_, rest)| rest.contains('\n'))
    });
    let out = dst.vm.finish().stdout;
    assert!(
        out.contains("over 2 connection(s)"),
        "the guest did not count two connections:\n{}{out}",
        before.stdout
    );
}

/// The host's CPU vendor string (CPUID leaf 0: EBX, EDX, ECX).
fn host_cpu_vendor() -> String {
    let leaf0 = core::arch::x86_64::__cpuid(0);
    let bytes: Vec<u8> = [leaf0.ebx, leaf0.edx, leaf0.ecx]
        .iter()
        .flat_map(|r| r.to_le_bytes())
        .collect();
    String::from_utf8(bytes).unwrap()
}

/// A source (played by the test, speaking the stream itself) whose guest
/// was shown every CPUID.7.0:EBX feature is refused before a page moves,
/// with the missing bits named on both sides.
#[test]
fn a_destination_refuses_a_guest_shown_cpu_features_this_host_lacks() {
    use std::io::{Read, Write};

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("migration.sock");
    let dst = ApiVm::start(&[]);
    let receiving = receive(&dst, json!({"listen": format!("unix:{}", path.display())}));
    listening(&path);
    let hello = json!({
        "config": {
            "boot-source": {"kernel_image_path": guest_artifacts().probe(),
                            "boot_args": "console=ttyS0"},
            "machine-config": {"vcpu_count": 1, "mem_size_mib": 128},
        },
        "memory": [[0, 128u64 << 20]],
        "cpu": {"vendor": host_cpu_vendor(),
                "words": [{"leaf": 7, "subleaf": 0, "register": "ebx", "bits": u32::MAX}]},
    })
    .to_string();
    let mut source = std::os::unix::net::UnixStream::connect(&path).unwrap();
    let mut out = b"TESSMIG\0".to_vec();
    out.extend(2u32.to_le_bytes());
    out.extend([1, 0, 0, 0]);
    out.extend(u32::try_from(hello.len()).unwrap().to_le_bytes());
    out.extend(hello.as_bytes());
    source.write_all(&out).unwrap();
    let mut header = [0u8; 8];
    source.read_exact(&mut header).unwrap();
    assert_eq!(header[0], 3, "not a Refuse: {header:?}");
    let mut reason = vec![0u8; u32::from_le_bytes(header[4..].try_into().unwrap()) as usize];
    source.read_exact(&mut reason).unwrap();
    let reason = String::from_utf8(reason).unwrap();
    assert!(
        reason.contains("lacks CPU features") && reason.contains("CPUID 0x7.0 EBX bits"),
        "{reason}"
    );
    let (code, body) = receiving.join().unwrap();
    assert_eq!(code, 400);
    assert!(body.contains("CPUID 0x7.0 EBX bits"), "{body}");
    drop(dst.vm.finish());
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
    assert!(
        loaded.vm.wait_until(DEADLINE, |_, _| false),
        "the source did not end: {}",
        loaded.client().get("/migration").body
    );
    let (status, body) = receiving.join().unwrap();
    assert_eq!(status, 204, "{body}");
    let last = numbers(&before, "probe.tick=").last().copied().unwrap_or(0);
    let want = format!("probe.memtest=ok,{}\n", last + 2);
    dst.vm.wait_until(DEADLINE, |out, _| out.contains(&want));
    let after = dst.vm.finish().stdout;
    assert_guest_went_on(&before, &after);
}
