//! The entropy device (`PUT /entropy`): the probe reads random bytes from
//! it, as fast as it asks without a rate limiter and at the configured
//! rate with one; the device's counters reach the metrics; a snapshot with
//! it loads and the guest goes on; the API refuses what Firecracker
//! refuses.

use std::time::Duration;

use serde_json::json;
use tessera_tests::api::{ApiClient, ApiVm};
use tessera_tests::console::{numbers, whole_lines};
use tessera_tests::guest_artifacts;

const DEADLINE: Duration = Duration::from_secs(90);

/// Boots the probe with the entropy device (`entropy` is the PUT body) and
/// `probe.rng_bytes=<bytes>`, plus `extra` on its command line (a test
/// that asks the API after the probe's read keeps it alive with
/// `probe.ticks=0`: without it the probe ends right after, and the VMM
/// with it).
fn boot(entropy: serde_json::Value, bytes: u64, extra: &str) -> (ApiVm, ApiClient) {
    let api = ApiVm::start(&[]);
    let mut c = api.client();
    c.put_ok(
        "/boot-source",
        json!({"kernel_image_path": guest_artifacts().probe(),
               "boot_args": format!("console=ttyS0 probe.rng_bytes={bytes} {extra}")}),
    );
    c.put_ok("/entropy", entropy);
    c.put_ok(
        "/metrics",
        json!({"metrics_path": api.dir().join("metrics.json")}),
    );
    c.put_ok("/actions", json!({"action_type": "InstanceStart"}));
    (api, c)
}

/// (bytes, distinct values, ms) from the probe's `probe.rng=` line.
fn rng_line(api: &mut ApiVm) -> (u64, u64, u64) {
    api.vm.wait_until(DEADLINE, |out, _| {
        whole_lines(out).any(|l| l.starts_with("probe.rng="))
    });
    let out = api.vm.stdout();
    let line = whole_lines(&out)
        .find(|l| l.starts_with("probe.rng="))
        .unwrap_or_else(|| panic!("no probe.rng line:\n{out}\n{}", api.vm.stderr()))
        .to_string();
    eprintln!("{line}");
    let field = |name: &str| -> u64 {
        line.split([' ', '='])
            .skip_while(|w| *w != name)
            .nth(1)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {line:?}"))
    };
    (field("probe.rng"), field("distinct"), field("ms"))
}

#[test]
fn the_guest_reads_random_bytes_and_the_metrics_count_them() {
    const BYTES: u64 = 64 << 10;
    let (mut api, mut c) = boot(json!({}), BYTES, "probe.ticks=0");
    let (bytes, distinct, _) = rng_line(&mut api);
    assert_eq!(bytes, BYTES);
    assert_eq!(distinct, 256, "64 KiB of random bytes hold every value");
    let config = c.get("/vm/config").json();
    assert_eq!(config["entropy"], json!({}), "{config}");
    let total = flushed_entropy_metrics(&api, &mut c);
    assert_eq!(total("entropy_bytes"), BYTES);
    assert_eq!(total("entropy_event_count"), BYTES / 1024);
    assert_eq!(total("entropy_event_fails"), 0);
    drop(api.vm.finish());
}

/// Flushes the metrics; returns each `entropy` counter's sum over the
/// lines written so far.
fn flushed_entropy_metrics(api: &ApiVm, c: &mut ApiClient) -> impl Fn(&str) -> u64 {
    assert_eq!(
        c.put("/actions", r#"{"action_type": "FlushMetrics"}"#)
            .status,
        204
    );
    let metrics = std::fs::read_to_string(api.dir().join("metrics.json")).unwrap();
    move |counter: &str| -> u64 {
        metrics
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter_map(|line| line["entropy"][counter].as_u64())
            .sum()
    }
}

/// The time the probe took against what the limiter allows, within 10%.
fn assert_rate(ms: u64, expected_ms: u64) {
    let (low, high) = (expected_ms * 9 / 10, expected_ms * 11 / 10);
    assert!(
        (low..=high).contains(&ms),
        "{ms} ms, where the limiter allows {expected_ms} ms (10%: {low} to {high})"
    );
}

#[test]
fn a_bandwidth_limit_holds_the_guest_to_its_rate() {
    // 8 KiB per 100 ms, starting full: 128 KiB take (128 - 8) / 80 s.
    const BYTES: u64 = 128 << 10;
    let limiter = json!({"rate_limiter": {"bandwidth": {"size": 8192, "refill_time": 100}}});
    let (mut api, mut c) = boot(limiter.clone(), BYTES, "probe.ticks=0");
    let (bytes, _, ms) = rng_line(&mut api);
    assert_eq!(bytes, BYTES);
    assert_rate(ms, (BYTES - 8192) * 100 / 8192);
    assert_eq!(c.get("/vm/config").json()["entropy"], limiter);
    drop(api.vm.finish());
}

#[test]
fn an_ops_limit_holds_the_guest_to_its_rate() {
    // 1 KiB requests, 5 per 100 ms starting full: 64 requests take
    // (64 - 5) / 50 s. A request costs the guest about 3 ms of its own
    // here (every instruction may be emulated): 20 ms apart, the limiter
    // and not the guest sets the pace, also on a loaded host.
    let limiter = json!({"rate_limiter": {"ops": {"size": 5, "refill_time": 100}}});
    let (mut api, mut c) = boot(limiter, 64 << 10, "probe.ticks=0");
    let (bytes, _, ms) = rng_line(&mut api);
    assert_eq!(bytes, 64 << 10);
    assert_rate(ms, 1180);
    let total = flushed_entropy_metrics(&api, &mut c);
    // Requests past the first ten waited (how many depends on how fast
    // the guest asks again: the rate above is the check).
    assert!(total("entropy_rate_limiter_throttled") > 0);
    drop(api.vm.finish());
}

#[test]
fn the_api_takes_firecrackers_bodies_and_refuses_the_rest() {
    let api = ApiVm::start(&[]);
    let mut c = api.client();
    for body in [
        r#"{"rate": {}}"#,
        r#"{"rate_limiter": {"bandwidth": {"size": 1}}}"#,
        r#"{"rate_limiter": {"ops": {"size": 1, "refill_time": 1, "extra": 2}}}"#,
    ] {
        let r = c.put("/entropy", body);
        assert_eq!(r.status, 400, "{body}: {}", r.body);
    }
    c.put_ok("/entropy", json!({}));
    c.put_ok(
        "/boot-source",
        json!({"kernel_image_path": guest_artifacts().probe(),
               "boot_args": "console=ttyS0 probe.ticks=0"}),
    );
    c.put_ok("/actions", json!({"action_type": "InstanceStart"}));
    let r = c.put("/entropy", "{}");
    assert_eq!(r.status, 400);
    assert!(
        r.fault().contains("after starting the microVM"),
        "{}",
        r.body
    );
    drop(api);
}

#[test]
fn a_snapshot_with_the_entropy_device_loads_and_the_guest_ticks_on() {
    let (mut api, mut c) = boot(json!({}), 4096, "probe.ticks=0");
    rng_line(&mut api);
    api.vm
        .wait_until(DEADLINE, |out, _| out.contains("probe.tick=3\n"));
    assert_eq!(c.patch("/vm", r#"{"state": "Paused"}"#).status, 204);
    let dir = tempfile::tempdir().unwrap();
    let (state, memory) = (dir.path().join("vm.snap"), dir.path().join("vm.mem"));
    c.put_ok(
        "/snapshot/create",
        json!({"snapshot_path": state, "mem_file_path": memory}),
    );
    let before = api.vm.finish().stdout;
    let last = *numbers(&before, "probe.tick=").last().unwrap();
    let mut loaded = ApiVm::start(&[]);
    loaded.client().put_ok(
        "/snapshot/load",
        json!({"snapshot_path": state, "mem_file_path": memory, "resume_vm": true}),
    );
    let want = format!("probe.tick={}\n", last + 3);
    loaded.vm.wait_until(DEADLINE, |out, _| out.contains(&want));
    let after = loaded.vm.finish();
    assert!(after.stdout.contains(&want), "{}", after.describe());
    assert!(
        after.stderr.contains("entropy: virtio-mmio at"),
        "the loaded microVM has no entropy device:\n{}",
        after.stderr
    );
}
