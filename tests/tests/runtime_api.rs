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

fn disk(api: &ApiVm, name: &str, mib: u64) -> std::path::PathBuf {
    let path = api.dir().join(name);
    tessera_tests::sparse_file(&path, mib << 20);
    path
}

/// Whether a backend of the VMM serves drive `id` from `disk`.
fn served_from(api: &ApiVm, id: &str, disk: &std::path::Path) -> bool {
    let Some(backend) = tessera_tests::descendant_pid(api.vm.pid(), &format!("--serial {id}"))
    else {
        return false;
    };
    std::fs::read_dir(format!("/proc/{backend}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|target| target == disk))
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

/// The calls that touch host files before boot, made on a running VM;
/// the drive moves to `next_disk`.
fn runtime_calls(c: &mut ApiClient, api: &mut ApiVm, next_disk: &std::path::Path) {
    let other_disk = next_disk.to_path_buf();
    for (bad, fault) in [
        (
            std::path::PathBuf::from("/dev/null"),
            "/dev/null is not a regular file or a block device",
        ),
        (api.dir().to_path_buf(), "Is a directory"),
        (api.dir().join("missing.img"), "No such file"),
    ] {
        assert_answer(
            c,
            "PATCH",
            "/drives/data",
            &json!({"drive_id": "data", "path_on_host": bad}).to_string(),
            400,
            fault,
        );
    }
    let replaced = api
        .vm
        .stderr()
        .matches("drive data: a new backend took over")
        .count();
    assert_answer(
        c,
        "PATCH",
        "/drives/data",
        &json!({"drive_id": "data", "path_on_host": other_disk}).to_string(),
        204,
        "",
    );
    api.vm.wait_until(DEADLINE, |_, err| {
        err.matches("drive data: a new backend took over").count() > replaced
    });
    assert!(
        served_from(api, "data", &other_disk),
        "the drive's backend does not serve {}\n{}",
        other_disk.display(),
        api.vm.stderr()
    );
    assert_eq!(
        c.get("/vm/config").json()["drives"][0]["path_on_host"],
        other_disk.to_str().unwrap()
    );
    assert_answer(
        c,
        "PATCH",
        "/drives/data",
        r#"{"drive_id": "data", "rate_limiter": {"ops": {"size": 10, "refill_time": 100}}}"#,
        204,
        "",
    );
    assert_eq!(
        c.get("/vm/config").json()["drives"][0]["rate_limiter"],
        json!({"ops": {"size": 10, "refill_time": 100}})
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
    let data = disk(&api, "data.img", 4);
    let bigger = disk(&api, "bigger.img", 8);
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

    runtime_calls(&mut c, &mut api, &bigger);
    assert!(
        api.vm
            .stderr()
            .contains("drive data: its configuration changed; telling the guest"),
        "{}",
        api.vm.stderr()
    );
    assert_eq!(c.patch("/vm", r#"{"state": "Paused"}"#).status, 204);
    runtime_calls(&mut c, &mut api, &data);
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
