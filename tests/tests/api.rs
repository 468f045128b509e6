//! The Firecracker-compatible API, driven over its Unix socket with raw
//! HTTP while tessera boots the probe guest.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use serde_json::json;
use tessera_tests::api::{ApiClient, ApiVm};
use tessera_tests::guest_artifacts;

const DEADLINE: Duration = Duration::from_secs(60);

fn boot_source(extra: &str) -> String {
    json!({
        "kernel_image_path": guest_artifacts().probe(),
        "boot_args": format!("console=ttyS0 {extra}"),
    })
    .to_string()
}

fn count_ticks(stdout: &str) -> usize {
    stdout
        .lines()
        .filter(|l| l.starts_with("probe.tick="))
        .count()
}

#[test]
fn configure_start_inspect_and_ctrl_alt_del() {
    let mut api = ApiVm::start(&[]);
    let mut c = api.client();

    let info = c.get("/");
    assert_eq!(info.status, 200, "{}", info.body);
    assert_eq!(
        info.json(),
        json!({"id": "anonymous-instance", "state": "Not started",
               "vmm_version": env!("CARGO_PKG_VERSION"), "app_name": "Tessera"})
    );
    assert_eq!(
        c.get("/version").json()["firecracker_version"],
        env!("CARGO_PKG_VERSION")
    );

    // Runtime-only calls are refused before boot, naming the phase.
    let early = c.patch("/vm", r#"{"state": "Paused"}"#);
    assert_eq!(early.status, 400);
    assert!(
        early.fault().contains("before starting the microVM"),
        "{}",
        early.body
    );

    assert_eq!(
        c.put("/boot-source", &boot_source("probe.ticks=0")).status,
        204
    );
    let r = c.put(
        "/machine-config",
        r#"{"vcpu_count": 2, "mem_size_mib": 256}"#,
    );
    assert_eq!(r.status, 204, "{}", r.body);
    let r = c.patch("/machine-config", r#"{"mem_size_mib": 192}"#);
    assert_eq!(r.status, 204, "{}", r.body);
    let config = c.get("/machine-config").json();
    assert_eq!(
        (config["vcpu_count"].clone(), config["mem_size_mib"].clone()),
        (json!(2), json!(192))
    );
    let full = c.get("/vm/config").json();
    assert_eq!(full["machine-config"]["mem_size_mib"], 192);
    assert_eq!(
        full["boot-source"]["boot_args"],
        "console=ttyS0 probe.ticks=0"
    );

    let start = c.put("/actions", r#"{"action_type": "InstanceStart"}"#);
    assert_eq!(start.status, 204, "{}", start.body);
    api.vm
        .wait_until(DEADLINE, |out, _| out.contains("probe.tick=1"));
    let stdout = api.vm.stdout();
    assert!(stdout.contains("probe.cpus=2\n"), "{stdout}");
    assert!(stdout.contains("probe.mem_mib=192\n"), "{stdout}");
    assert_eq!(c.get("/").json()["state"], "Running");

    // Pre-boot-only calls are refused after boot, naming the phase.
    let late = c.put(
        "/machine-config",
        r#"{"vcpu_count": 1, "mem_size_mib": 128}"#,
    );
    assert_eq!(late.status, 400);
    assert!(
        late.fault().contains("after starting the microVM"),
        "{}",
        late.body
    );
    let again = c.put("/actions", r#"{"action_type": "InstanceStart"}"#);
    assert!(again.fault().contains("after starting the microVM"));

    let cad = c.put("/actions", r#"{"action_type": "SendCtrlAltDel"}"#);
    assert_eq!(cad.status, 204, "{}", cad.body);
    api.vm.wait_until(DEADLINE, |_, _| false);
    let run = api.vm.finish();
    assert_eq!(run.code(), 0, "{}", run.describe());
    assert!(
        run.stdout.contains("probe.ctrl_alt_del"),
        "{}",
        run.describe()
    );
}

#[test]
fn pause_stops_the_vcpus_and_resume_restarts_them() {
    let mut api = ApiVm::start(&[]);
    let mut c = api.client();
    assert_eq!(
        c.put("/boot-source", &boot_source("probe.ticks=0")).status,
        204
    );
    assert_eq!(
        c.put("/actions", r#"{"action_type": "InstanceStart"}"#)
            .status,
        204
    );
    api.vm
        .wait_until(DEADLINE, |out, _| out.contains("probe.tick=2"));

    assert_eq!(c.patch("/vm", r#"{"state": "Paused"}"#).status, 204);
    assert_eq!(c.get("/").json()["state"], "Paused");
    let paused_at = count_ticks(&api.vm.stdout());
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(
        count_ticks(&api.vm.stdout()),
        paused_at,
        "the guest ticked while paused"
    );
    let twice = c.patch("/vm", r#"{"state": "Paused"}"#);
    assert_eq!(twice.status, 400);
    assert!(twice.fault().contains("already paused"), "{}", twice.body);

    assert_eq!(c.patch("/vm", r#"{"state": "Resumed"}"#).status, 204);
    assert_eq!(c.get("/").json()["state"], "Running");
    api.vm
        .wait_until(DEADLINE, |out, _| count_ticks(out) >= paused_at + 3);
    assert!(
        count_ticks(&api.vm.stdout()) >= paused_at + 3,
        "no ticks after resume"
    );
    drop(api.vm.finish());
}

#[test]
fn invalid_requests_get_400_with_a_clear_message() {
    let api = ApiVm::start(&[]);
    let mut c = api.client();
    let probe = guest_artifacts().probe();
    let cases: Vec<(&str, &str, String, &str)> = vec![
        (
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": 2, "mem_size_mib": 256, "extra": 1}"#.into(),
            "unknown field `extra`",
        ),
        (
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": 0, "mem_size_mib": 256}"#.into(),
            "vcpu_count must be between 1 and 32, got 0",
        ),
        (
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": 33, "mem_size_mib": 256}"#.into(),
            "got 33",
        ),
        (
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": 3, "mem_size_mib": 256, "smt": true}"#.into(),
            "1 or even",
        ),
        (
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": 1, "mem_size_mib": 8}"#.into(),
            "mem_size_mib must be between",
        ),
        (
            "PATCH",
            "/machine-config",
            "{}".into(),
            "must change at least one field",
        ),
        (
            "PUT",
            "/boot-source",
            r#"{"kernel_image_path": "/no/such/vmlinux"}"#.into(),
            "/no/such/vmlinux",
        ),
        (
            "PUT",
            "/drives/rootfs",
            json!({"drive_id": "other", "path_on_host": probe, "is_root_device": true}).to_string(),
            "does not match the id from the body",
        ),
        (
            "PUT",
            "/drives/rootfs",
            json!({"drive_id": "rootfs", "path_on_host": "/no/such/disk", "is_root_device": true})
                .to_string(),
            "/no/such/disk",
        ),
        (
            "PUT",
            "/network-interfaces/eth0",
            r#"{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "zz"}"#.into(),
            "is not a MAC address",
        ),
        (
            // The launcher and the backend refuse it too (one MacAddr rule).
            "PUT",
            "/network-interfaces/eth0",
            r#"{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "+6:00:ac:10:00:02"}"#
                .into(),
            "is not a MAC address",
        ),
        (
            "PUT",
            "/network-interfaces/eth0",
            r#"{"iface_id": "eth0", "host_dev_name": "tessera-none0"}"#.into(),
            "no such network device",
        ),
        (
            "PUT",
            "/network-interfaces/eth0",
            r#"{"iface_id": "eth0", "host_dev_name": "lo",
                "rx_rate_limiter": {"bandwidth": {"size": 1000, "refill_time": 100, "burst": 1}}}"#
                .into(),
            "unknown field `burst`",
        ),
        (
            "PUT",
            "/actions",
            r#"{"action_type": "Reboot"}"#.into(),
            "unknown variant `Reboot`",
        ),
        (
            "PUT",
            "/boot-source",
            "{not json".into(),
            "deserializing the json body",
        ),
        (
            "GET",
            "/does/not/exist",
            "".into(),
            "Invalid request method and/or path",
        ),
        (
            "PUT",
            "/vsock",
            r#"{"guest_cid": 2, "uds_path": "/tmp/v.sock"}"#.into(),
            "invalid guest CID \"2\"",
        ),
        (
            "PUT",
            "/balloon",
            r#"{"amount_mib": 100000, "deflate_on_oom": false}"#.into(),
            "Amount of pages requested is too large.",
        ),
        (
            "PUT",
            "/mmds/other",
            r#"{"latest": {}}"#.into(),
            "Unrecognized PUT request path `other`.",
        ),
        (
            "PUT",
            "/mmds/config",
            r#"{"network_interfaces": ["eth0"]}"#.into(),
            "MMMDS config error: The list of network interface IDs provided contains at least \
             one ID that does not correspond to any existing network interface.",
        ),
        (
            "PUT",
            "/entropy",
            r#"{"rate": {}}"#.into(),
            "unknown field `rate`",
        ),
        (
            "PUT",
            "/snapshot/create",
            r#"{"mem_file_path": "m", "snapshot_path": "s"}"#.into(),
            "not supported before starting the microVM",
        ),
        (
            "PUT",
            "/snapshot/load",
            r#"{"snapshot_path": "s"}"#.into(),
            "missing field: either `mem_backend` or `mem_file_path` is required",
        ),
    ];
    for (method, path, body, expected) in cases {
        let body = (!body.is_empty()).then_some(body.as_str());
        let r = c.request(method, path, body);
        assert_eq!(r.status, 400, "{method} {path}: {}", r.body);
        assert!(
            r.fault().contains(expected),
            "{method} {path}: expected {expected:?} in {:?}",
            r.body
        );
    }

    // A socket that is not there is refused when set, not at start.
    let r = c.put(
        "/drives/data",
        r#"{"drive_id": "data", "socket": "/no/such/backend.sock", "is_root_device": false}"#,
    );
    assert_eq!(r.status, 400);
    assert!(r.fault().contains("/no/such/backend.sock"), "{}", r.body);
    // A good drive is stored and shows in the configuration.
    let drive = json!({"drive_id": "rootfs", "path_on_host": probe, "is_root_device": true, "is_read_only": true});
    assert_eq!(c.put("/drives/rootfs", &drive.to_string()).status, 204);
    assert_eq!(
        c.get("/vm/config").json()["drives"][0]["drive_id"],
        "rootfs"
    );
    assert_eq!(c.get("/").json()["state"], "Not started");
}

#[test]
fn http_robustness() {
    let api = ApiVm::start(&[]);
    let mut c = api.client();

    // Keep-alive: many requests on one connection.
    for _ in 0..20 {
        assert_eq!(c.get("/").status, 200);
    }

    // A malformed request line and a malformed header.
    let mut bad = api.client();
    let r = bad.raw(b"GARBAGE\r\n\r\n");
    assert_eq!(r.status, 400, "{}", r.body);
    let mut bad = api.client();
    let r = bad.raw(b"GET / HTTP/1.1\r\nContent-Length: lots\r\n\r\n");
    assert_eq!(r.status, 400, "{}", r.body);

    // A body above the default 51200-byte limit.
    let big = format!(r#"{{"kernel_image_path": "{}"}}"#, "x".repeat(60_000));
    let r = api.client().put("/boot-source", &big);
    assert!(
        r.status == 400 || r.status == 413,
        "{}: {}",
        r.status,
        r.body
    );
    assert!(r.body.contains("51200"), "{}", r.body);

    // A client that sends half a request and goes silent blocks nobody.
    let mut stalled = UnixStream::connect(&api.socket).unwrap();
    stalled
        .write_all(b"PUT /machine-config HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"vcpu")
        .unwrap();
    let started = Instant::now();
    assert_eq!(api.client().get("/").status, 200);
    assert!(started.elapsed() < Duration::from_secs(2));

    // Many clients in a row are all answered.
    for i in 0..200 {
        let r = api.client().get("/");
        assert_eq!(r.status, 200, "client {i}");
    }
    drop(stalled);
    assert_eq!(c.get("/machine-config").status, 200);
}

#[test]
fn payload_limit_flag_and_socket_errors() {
    let api = ApiVm::start(&["--http-api-max-payload-size", "64"]);
    let r = api.client().put(
        "/boot-source",
        &boot_source("a-long-command-line-that-is-over-64-bytes"),
    );
    assert!(r.status == 400 || r.status == 413, "{}", r.body);

    let long = format!("/tmp/{}/api.sock", "d".repeat(120));
    let run = tessera_tests::run_with_deadline(
        {
            let mut c = std::process::Command::new(tessera_tests::workspace_bin("tessera"));
            c.args(["--api-sock", &long]);
            c
        },
        DEADLINE,
        |_, _| false,
    );
    assert_ne!(run.code(), 0);
    assert!(
        run.stderr.contains("a Unix socket path holds at most 107"),
        "{}",
        run.describe()
    );

    let run = tessera_tests::run_with_deadline(
        {
            let mut c = std::process::Command::new(tessera_tests::workspace_bin("tessera"));
            c.args(["--api-sock", "/no/such/dir/api.sock"]);
            c
        },
        DEADLINE,
        |_, _| false,
    );
    assert_ne!(run.code(), 0);
    assert!(
        run.stderr
            .contains("the directory /no/such/dir does not exist"),
        "{}",
        run.describe()
    );
}

#[test]
fn stale_socket_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("api.sock");
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    assert!(socket.exists());
    let mut command = std::process::Command::new(tessera_tests::workspace_bin("tessera"));
    command.arg("--api-sock").arg(&socket);
    let vm = tessera_tests::Running::spawn(command);
    let r = ApiClient::connect(&socket).get("/");
    assert_eq!(r.status, 200);
    drop(vm.finish());
}

#[test]
fn metrics_and_logger_are_configurable() {
    let api = ApiVm::start(&[]);
    let mut c = api.client();
    let metrics_path = api.dir().join("metrics.json");
    let log_path = api.dir().join("tessera.log");
    let r = c.put(
        "/metrics",
        &json!({"metrics_path": metrics_path}).to_string(),
    );
    assert_eq!(r.status, 204, "{}", r.body);
    let r = c.put(
        "/logger",
        &json!({"log_path": log_path, "level": "Debug", "show_level": true, "show_log_origin": true})
            .to_string(),
    );
    assert_eq!(r.status, 204, "{}", r.body);
    c.put(
        "/machine-config",
        r#"{"vcpu_count": 0, "mem_size_mib": 128}"#,
    );
    assert_eq!(
        c.put("/actions", r#"{"action_type": "FlushMetrics"}"#)
            .status,
        204
    );

    let text = std::fs::read_to_string(&metrics_path).unwrap();
    let line: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert_eq!(line["put_api_requests"]["machine_cfg_fails"], 1, "{line}");
    assert!(line["utc_timestamp_ms"].as_u64().unwrap() > 0);

    // The next flush reports only what happened since.
    assert_eq!(
        c.put("/actions", r#"{"action_type": "FlushMetrics"}"#)
            .status,
        204
    );
    let text = std::fs::read_to_string(&metrics_path).unwrap();
    let line: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert_eq!(line["put_api_requests"]["machine_cfg_fails"], 0, "{line}");

    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(log.contains(":DEBUG:") && log.contains(".rs:"), "{log}");
    assert!(log.contains("API request: PUT /machine-config"), "{log}");
}
