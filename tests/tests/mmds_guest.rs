//! MMDS as the guest sees it: the probe guest speaks to 169.254.169.254
//! through its virtio-net device (ARP, a TCP handshake, HTTP/1.1, FIN) and
//! prints each answer (`probe.mmds=<status> <body>`). The interface's
//! `vhost-user-net` backend answers with the VMM's store; nothing the
//! guest sends there reaches the TAP. The probe's client was checked
//! against Firecracker's MMDS first (resources/probe-guest/README.md).

use std::time::Duration;

use serde_json::json;
use tessera_tests::api::{ApiClient, ApiVm};
use tessera_tests::console::whole_lines;
use tessera_tests::guest_artifacts;
use tessera_tests::netns::Netns;

const DEADLINE: Duration = Duration::from_secs(60);
const STORE: &str =
    r#"{"latest": {"meta-data": {"ami-id": "ami-1", "list": {"a": "1", "b": "2"}}}}"#;

/// Boots the probe on `tap0` of `netns` with MMDS `version` on its
/// interface, `STORE` in the store, and `probe_args` (its `probe.mmds*`
/// options).
fn boot(netns: &Netns, version: &str, probe_args: &str) -> (ApiVm, ApiClient) {
    let api = ApiVm::start_in(netns, &[]);
    let mut c = api.client();
    c.put_ok(
        "/boot-source",
        json!({"kernel_image_path": guest_artifacts().probe(),
               "boot_args": format!("console=ttyS0 probe.net=10.81.0.2/24 {probe_args}")}),
    );
    c.put_ok(
        "/network-interfaces/eth0",
        json!({"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:0a:51:00:02"}),
    );
    c.put_ok(
        "/mmds/config",
        json!({"network_interfaces": ["eth0"], "version": version}),
    );
    let r = c.put("/mmds", STORE);
    assert_eq!(r.status, 204, "{}", r.body);
    c.put_ok(
        "/metrics",
        json!({"metrics_path": api.dir().join("metrics.json")}),
    );
    c.put_ok("/actions", json!({"action_type": "InstanceStart"}));
    (api, c)
}

/// Waits for a console line that starts with `prefix` and returns the
/// first such line.
fn line(api: &mut ApiVm, prefix: &str) -> String {
    api.vm.wait_until(DEADLINE, |out, _| {
        whole_lines(out).any(|l| l.starts_with(prefix))
    });
    let out = api.vm.stdout();
    let found = whole_lines(&out)
        .find(|l| l.starts_with(prefix))
        .map(str::to_string);
    found.unwrap_or_else(|| panic!("no {prefix} line:\n{out}\n{}", api.vm.stderr()))
}

/// The frames that reached the host's end of the TAP.
fn tap_rx_packets(netns: &Netns) -> u64 {
    let out = netns
        .command("cat")
        .arg("/sys/class/net/tap0/statistics/rx_packets")
        .output()
        .expect("read the TAP's counter");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("a number")
}

#[test]
fn the_guest_reads_v1_metadata_and_a_patch_shows_on_its_next_read() {
    let netns = Netns::with_tap("mmdsv1", "10.81.0.1/24");
    let (mut api, mut c) = boot(
        &netns,
        "V1",
        "probe.mmds=/latest/meta-data/ami-id probe.mmds_repeat=20 probe.mmds_every_ms=300 \
         probe.ticks=600",
    );
    assert_eq!(line(&mut api, "probe.mmds="), "probe.mmds=200 ami-1");
    let out = api.vm.stdout();
    let headers: Vec<&str> = out
        .lines()
        .map(str::trim_end)
        .filter_map(|l| l.strip_prefix("probe.mmds_header="))
        .take(4)
        .collect();
    assert_eq!(
        headers,
        [
            "Server: Firecracker API",
            "Connection: keep-alive",
            "Content-Type: text/plain",
            "Content-Length: 5"
        ]
    );
    let r = c.patch("/mmds", r#"{"latest": {"meta-data": {"ami-id": "ami-2"}}}"#);
    assert_eq!(r.status, 204, "{}", r.body);
    assert_eq!(
        line(&mut api, "probe.mmds=200 ami-2"),
        "probe.mmds=200 ami-2"
    );
    // The probe ticks once its requests are done.
    line(&mut api, "probe.tick=1");
    let out = api.vm.stdout();
    let answers: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("probe.mmds="))
        .collect();
    assert_eq!(answers.len(), 20, "{out}");
    assert!(
        answers.iter().all(|a| a.starts_with("probe.mmds=200 ami-")),
        "{answers:?}"
    );
    assert_eq!(tap_rx_packets(&netns), 0, "MMDS frames reached the TAP");
    let created = api.flushed_counter(&mut c, "mmds", "connections_created");
    assert_eq!(created, 20, "one connection per request");
    let destroyed = api.flushed_counter(&mut c, "mmds", "connections_destroyed");
    assert_eq!(destroyed, 20, "each closed by the guest's FIN");
}

#[test]
fn v2_answers_only_a_guest_with_a_session_token() {
    let netns = Netns::with_tap("mmdsv2", "10.81.0.1/24");
    let (mut api, _c) = boot(&netns, "V2", "probe.mmds=/latest/meta-data/ami-id");
    assert_eq!(
        line(&mut api, "probe.mmds="),
        "probe.mmds=401 No MMDS token provided. Use `X-metadata-token` or \
         `X-aws-ec2-metadata-token` header to specify the session token."
    );
    drop(api);

    let (mut api, _c) = boot(
        &netns,
        "V2",
        "probe.mmds=/latest/meta-data/ami-id probe.mmds_token=0",
    );
    assert_eq!(
        line(&mut api, "probe.mmds_token="),
        "probe.mmds_token=400 len=93"
    );
    drop(api);

    let (mut api, _c) = boot(
        &netns,
        "V2",
        "probe.mmds=/latest/meta-data/ probe.mmds_token=60 probe.mmds_repeat=2",
    );
    assert_eq!(
        line(&mut api, "probe.mmds_token="),
        "probe.mmds_token=200 len=48"
    );
    api.vm
        .wait_until(DEADLINE, |out, _| out.contains("probe.done"));
    let out = api.vm.stdout();
    let answers: Vec<&str> = out
        .lines()
        .map(str::trim_end)
        .filter(|l| l.starts_with("probe.mmds="))
        .collect();
    assert_eq!(answers, ["probe.mmds=200 ami-id\\nlist/"; 2], "{out}");
    drop(api);

    let (mut api, _c) = boot(
        &netns,
        "V2",
        "probe.mmds=/latest/meta-data/list probe.mmds_token=60 probe.mmds_accept=json",
    );
    assert_eq!(
        line(&mut api, "probe.mmds="),
        r#"probe.mmds=200 {"a":"1","b":"2"}"#
    );
}

/// An answer larger than the guest's window and the MSS crosses in many
/// segments, whole.
#[test]
fn a_large_value_reaches_the_guest_whole() {
    let netns = Netns::with_tap("mmdsbig", "10.81.0.1/24");
    let mut api = ApiVm::start_in(&netns, &["--mmds-size-limit", "100000"]);
    let mut c = api.client();
    c.put_ok(
        "/boot-source",
        json!({"kernel_image_path": guest_artifacts().probe(),
               "boot_args": "console=ttyS0 probe.net=10.81.0.2/24 probe.mmds=/big"}),
    );
    c.put_ok(
        "/network-interfaces/eth0",
        json!({"iface_id": "eth0", "host_dev_name": "tap0"}),
    );
    c.put_ok("/mmds/config", json!({"network_interfaces": ["eth0"]}));
    let big = "x".repeat(50_000);
    c.put_ok("/mmds", json!({"big": big}));
    c.put_ok("/actions", json!({"action_type": "InstanceStart"}));
    let answer = line(&mut api, "probe.mmds=");
    assert_eq!(answer, format!("probe.mmds=200 {big}"));
}

/// A snapshot keeps the interface's MMDS configuration: the loaded
/// microVM's new backend answers the guest's next requests, from the
/// loading process's store (as with Firecracker, the store is not in the
/// snapshot).
#[test]
fn a_loaded_microvm_answers_from_the_loading_process_store() {
    let netns = Netns::with_tap("mmdssnap", "10.81.0.1/24");
    let (mut api, mut c) = boot(
        &netns,
        "V1",
        "probe.mmds=/latest/meta-data/ami-id probe.mmds_repeat=50 probe.mmds_every_ms=200",
    );
    line(&mut api, "probe.mmds=200 ami-1");
    assert_eq!(c.patch("/vm", r#"{"state": "Paused"}"#).status, 204);
    let dir = tempfile::tempdir().unwrap();
    let (state, memory) = (dir.path().join("vm.snap"), dir.path().join("vm.mem"));
    c.put_ok(
        "/snapshot/create",
        json!({"snapshot_path": state, "mem_file_path": memory}),
    );
    drop(api.vm.finish());
    let metadata = dir.path().join("metadata.json");
    std::fs::write(
        &metadata,
        r#"{"latest": {"meta-data": {"ami-id": "ami-loaded"}}}"#,
    )
    .unwrap();
    let mut loaded = ApiVm::start_in(&netns, &["--metadata", metadata.to_str().unwrap()]);
    let mut c = loaded.client();
    c.put_ok(
        "/snapshot/load",
        json!({"snapshot_path": state, "mem_file_path": memory, "resume_vm": true}),
    );
    assert_eq!(
        c.get("/vm/config").json()["mmds-config"]["network_interfaces"],
        json!(["eth0"])
    );
    assert_eq!(
        line(&mut loaded, "probe.mmds=200 ami-loaded"),
        "probe.mmds=200 ami-loaded"
    );
    let r = c.patch("/mmds", r#"{"latest": {"meta-data": {"ami-id": "ami-3"}}}"#);
    assert_eq!(r.status, 204, "{}", r.body);
    assert_eq!(
        line(&mut loaded, "probe.mmds=200 ami-3"),
        "probe.mmds=200 ami-3"
    );
}
