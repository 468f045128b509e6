//! Every API call on a running (and a paused) microVM gets an answer under
//! the default seccomp filters: a filter must never be the way an
//! unanticipated API path fails.

use std::time::Duration;

use serde_json::json;
use tessera_tests::api::{ApiClient, ApiVm};
use tessera_tests::guest_artifacts;

const DEADLINE: Duration = Duration::from_secs(60);

fn count_ticks(stdout: &str) -> usize {
    stdout
        .lines()
        .filter(|l| l.starts_with("probe.tick="))
        .count()
}

fn disk(api: &ApiVm, name: &str) -> std::path::PathBuf {
    let path = api.dir().join(name);
    std::fs::File::create(&path)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    path
}

fn assert_answer(
    c: &mut ApiClient,
    method: &str,
    path: &str,
    body: &str,
    status: u16,
    fault: &str,
) {
    let r = c.request(method, path, Some(body));
    assert_eq!(r.status, status, "{method} {path} {body}: {}", r.body);
    if status != 204 {
        assert!(
            r.fault().contains(fault),
            "{method} {path} {body}: {}",
            r.body
        );
    }
}

/// The calls that touch host files before boot, made on a running VM.
fn runtime_calls(c: &mut ApiClient, api: &ApiVm) {
    let other_disk = disk(api, "other.img");
    assert_answer(
        c,
        "PATCH",
        "/drives/data",
        &json!({"drive_id": "data", "path_on_host": other_disk}).to_string(),
        400,
        &format!(
            "drive \"data\": changing path_on_host (to {}) on a running microVM is not supported",
            other_disk.display()
        ),
    );
    assert_answer(
        c,
        "PATCH",
        "/drives/data",
        r#"{"drive_id": "data", "rate_limiter": {"ops": {"size": 10, "refill_time": 100}}}"#,
        400,
        "rate limiters are not supported by Tessera yet (drive \"data\")",
    );
    assert_answer(
        c,
        "PATCH",
        "/drives/data",
        r#"{"drive_id": "data", "rate_limiter": {"bandwidth": null}}"#,
        204,
        "",
    );
    assert_answer(
        c,
        "PATCH",
        "/drives/nope",
        &json!({"drive_id": "nope", "path_on_host": other_disk}).to_string(),
        400,
        "no drive with id \"nope\"",
    );
    let post_boot = "after starting the microVM";
    let drive = json!({"drive_id": "data", "path_on_host": other_disk, "is_root_device": false});
    for (path, body) in [
        ("/drives/data", drive.to_string()),
        (
            "/boot-source",
            json!({"kernel_image_path": guest_artifacts().probe()}).to_string(),
        ),
        (
            "/machine-config",
            r#"{"vcpu_count": 1, "mem_size_mib": 128}"#.into(),
        ),
        (
            "/logger",
            json!({"log_path": api.dir().join("late.log")}).to_string(),
        ),
        (
            "/metrics",
            json!({"metrics_path": api.dir().join("late.json")}).to_string(),
        ),
        (
            "/serial",
            json!({"serial_out_path": api.dir().join("late.out")}).to_string(),
        ),
        (
            "/network-interfaces/eth0",
            r#"{"iface_id": "eth0", "host_dev_name": "tap0"}"#.into(),
        ),
    ] {
        assert_answer(c, "PUT", path, &body, 400, post_boot);
    }
    assert_answer(
        c,
        "PUT",
        "/actions",
        r#"{"action_type": "FlushMetrics"}"#,
        204,
        "",
    );
}

#[test]
fn runtime_calls_that_touch_host_files_get_answers_and_the_vmm_lives() {
    let mut api = ApiVm::start(&[]);
    let mut c = api.client();
    let boot = json!({"kernel_image_path": guest_artifacts().probe(),
                      "boot_args": "console=ttyS0 probe.ticks=0"});
    assert_eq!(c.put("/boot-source", &boot.to_string()).status, 204);
    let data = disk(&api, "data.img");
    let r = c.put(
        "/drives/data",
        &json!({"drive_id": "data", "path_on_host": data, "is_root_device": false}).to_string(),
    );
    assert_eq!(r.status, 204, "{}", r.body);
    let metrics = api.dir().join("metrics.json");
    assert_eq!(
        c.put("/metrics", &json!({"metrics_path": metrics}).to_string())
            .status,
        204
    );
    let start = c.put("/actions", r#"{"action_type": "InstanceStart"}"#);
    assert_eq!(start.status, 204, "{}", start.body);
    api.vm
        .wait_until(DEADLINE, |out, _| out.contains("probe.tick=2"));

    runtime_calls(&mut c, &api);
    assert_eq!(c.patch("/vm", r#"{"state": "Paused"}"#).status, 204);
    runtime_calls(&mut c, &api);
    assert_eq!(c.patch("/vm", r#"{"state": "Resumed"}"#).status, 204);

    assert_eq!(c.get("/").json()["state"], "Running");
    let ticks = count_ticks(&api.vm.stdout());
    api.vm
        .wait_until(DEADLINE, |out, _| count_ticks(out) >= ticks + 2);
    assert!(
        count_ticks(&api.vm.stdout()) >= ticks + 2,
        "the guest stopped ticking"
    );
    let run = api.vm.finish();
    assert!(
        run.status.is_none(),
        "the VMM exited during the test: {:?}\n{}",
        run.status,
        run.describe()
    );
}
