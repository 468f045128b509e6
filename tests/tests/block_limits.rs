//! A drive's rate limiter, enforced by its `vhost-user-blk` backend: the
//! probe's write-and-read-back moves at the configured rate (within 10%,
//! from the guest's clock and the backend's byte counters), the backend
//! counts the times it held the queue back, and `PATCH /drives/{id}` on a
//! running microVM changes the limit while the guest's I/O runs.

use std::time::{Duration, Instant};

use serde_json::json;
use tessera_tests::api::{ApiClient, ApiVm};
use tessera_tests::console::whole_lines;
use tessera_tests::guest_artifacts;

const DEADLINE: Duration = Duration::from_secs(120);
const MIB: u64 = 1 << 20;

/// Boots the probe writing and reading back `mib` MiB on drive `data`,
/// limited by `limiter`; the guest then ticks on, so that the microVM (and
/// its API) outlive the test's reads of the backend's counters.
fn boot(limiter: serde_json::Value, mib: u64) -> (ApiVm, ApiClient) {
    let api = ApiVm::start(&[]);
    let mut c = api.client();
    let disk = api.dir().join("data.img");
    tessera_tests::sparse_file(&disk, mib * MIB);
    c.put_ok(
        "/boot-source",
        json!({"kernel_image_path": guest_artifacts().probe(),
               "boot_args": format!("console=ttyS0 probe.blk=write probe.blk_mib={mib} probe.seed=0x5eed probe.ticks=0")}),
    );
    c.put_ok(
        "/drives/data",
        json!({"drive_id": "data", "path_on_host": disk, "is_root_device": false,
               "rate_limiter": limiter}),
    );
    c.put_ok(
        "/metrics",
        json!({"metrics_path": api.dir().join("metrics.json")}),
    );
    c.put_ok("/actions", json!({"action_type": "InstanceStart"}));
    (api, c)
}

/// The guest's `probe.blk0_ms` once the test is done (and its outcome was
/// ok).
fn blk_ms(api: &mut ApiVm) -> u64 {
    device_ms(api, 0)
}

/// The guest's `probe.blk<index>_ms` once that device's test is done (and
/// its outcome was ok).
fn device_ms(api: &mut ApiVm, index: u32) -> u64 {
    let ms_prefix = format!("probe.blk{index}_ms=");
    api.vm.wait_until(DEADLINE, |out, _| {
        whole_lines(out).any(|l| l.starts_with(&ms_prefix))
    });
    let out = api.vm.stdout();
    assert!(
        whole_lines(&out).any(|l| l.starts_with(&format!("probe.blk{index}=ok"))),
        "{out}\n{}",
        api.vm.stderr()
    );
    let ms = whole_lines(&out)
        .find_map(|l| l.strip_prefix(&ms_prefix))
        .and_then(|ms| ms.trim().parse().ok());
    ms.unwrap_or_else(|| panic!("no {ms_prefix} line:\n{out}"))
}

/// The drive's backend counter summed over the metrics lines so far
/// (after a flush).
fn drive_counter(api: &ApiVm, c: &mut ApiClient, counter: &str) -> u64 {
    api.flushed_counter(c, "block_data", counter)
}

#[test]
fn a_bandwidth_limit_holds_the_drive_to_its_rate() {
    // 1 MiB/s (256 KiB per 250 ms), starting full.
    const SIZE: u64 = 256 << 10;
    let limiter = json!({"bandwidth": {"size": SIZE, "refill_time": 250}});
    let (mut api, mut c) = boot(limiter, 2);
    let ms = blk_ms(&mut api);
    let bytes =
        drive_counter(&api, &mut c, "read_bytes") + drive_counter(&api, &mut c, "write_bytes");
    assert_eq!(bytes, 4 * MIB, "2 MiB written and read back");
    let expected_ms = (bytes - SIZE) * 1000 / MIB;
    let (low, high) = (expected_ms * 9 / 10, expected_ms * 11 / 10);
    assert!(
        (low..=high).contains(&ms),
        "{bytes} bytes in {ms} ms, where the limit allows {expected_ms} ms (10%: {low} to {high})"
    );
    for counter in ["rate_limiter_throttled_events", "rate_limiter_event_count"] {
        assert!(
            drive_counter(&api, &mut c, counter) > 0,
            "{counter}: {}",
            std::fs::read_to_string(api.dir().join("metrics.json")).unwrap()
        );
    }
    drop(api.vm.finish());
}

#[test]
fn a_patch_lifts_and_sets_the_limit_of_a_running_drive() {
    // 64 KiB/s: 4 MiB would take a minute.
    let slow = json!({"bandwidth": {"size": 16384, "refill_time": 250}});
    let (mut api, mut c) = boot(slow.clone(), 2);
    api.vm
        .wait_until(DEADLINE, |out, _| out.contains("probe.virtio="));
    std::thread::sleep(Duration::from_secs(1));
    let lifted = Instant::now();
    let r = c.patch(
        "/drives/data",
        r#"{"drive_id": "data", "rate_limiter": {"bandwidth": {"size": 0, "refill_time": 0}}}"#,
    );
    assert_eq!(r.status, 204, "{}", r.body);
    let ms = blk_ms(&mut api);
    assert!(
        lifted.elapsed() < Duration::from_secs(20),
        "the guest's I/O still crawled after the limit was lifted ({ms} ms in all)"
    );
    assert_eq!(
        c.get("/vm/config").json()["drives"][0]["rate_limiter"],
        json!({}),
        "the lifted limit is not what GET /vm/config shows"
    );
    // And set again: the backend takes it (a malformed one is refused).
    let r = c.patch(
        "/drives/data",
        &json!({"drive_id": "data", "rate_limiter": slow}).to_string(),
    );
    assert_eq!(r.status, 204, "{}", r.body);
    assert_eq!(
        c.get("/vm/config").json()["drives"][0]["rate_limiter"],
        slow
    );
    let r = c.patch(
        "/drives/data",
        r#"{"drive_id": "data", "rate_limiter": {"ops": {"size": 1}}}"#,
    );
    assert_eq!(r.status, 400, "{}", r.body);
    drop(api.vm.finish());
}

#[test]
fn a_limit_on_one_drive_leaves_the_other_at_full_speed() {
    const MIB_EACH: u64 = 2;
    let api = ApiVm::start(&[]);
    let mut c = api.client();
    c.put_ok(
        "/boot-source",
        json!({"kernel_image_path": guest_artifacts().probe(),
               "boot_args": format!("console=ttyS0 probe.blk=write probe.blk_mib={MIB_EACH} probe.seed=0x5eed")}),
    );
    // API order: the limited drive is vda (probe.blk0), the free one vdb.
    for (id, limiter) in [
        (
            "limited",
            json!({"bandwidth": {"size": 131072, "refill_time": 250}}),
        ),
        ("free", json!({})),
    ] {
        let disk = api.dir().join(format!("{id}.img"));
        tessera_tests::sparse_file(&disk, MIB_EACH * MIB);
        c.put_ok(
            &format!("/drives/{id}"),
            json!({"drive_id": id, "path_on_host": disk, "is_root_device": false,
                   "rate_limiter": limiter}),
        );
    }
    c.put_ok("/actions", json!({"action_type": "InstanceStart"}));
    let mut api = api;
    let limited = device_ms(&mut api, 0);
    let free = device_ms(&mut api, 1);
    // 4 MiB at 512 KiB/s after the first 128 KiB.
    let expected = (4 * MIB - 131072) * 1000 / (512 << 10);
    assert!(
        limited >= expected * 9 / 10,
        "the limited drive took {limited} ms, under the {expected} ms its limit allows"
    );
    assert!(
        free * 3 < limited,
        "the free drive took {free} ms beside the limited one's {limited} ms"
    );
    drop(api.vm.finish());
}
