//! The metadata store's API (`/mmds`, `/mmds/config`), with Firecracker's
//! rules and texts: any JSON value is PUT, a PATCH merges (RFC 7396) into a
//! store a PUT initialized, a store over `--mmds-size-limit` is a 413,
//! `--metadata` fills it at start; `/mmds/config` names the interfaces
//! whose backends answer the guest (the guest's side is in
//! `mmds_guest.rs`). After boot the store is "not initialized" unless an
//! interface serves it, as with Firecracker.

use serde_json::json;
use tessera_tests::api::ApiVm;
use tessera_tests::guest_artifacts;
use tessera_tests::netns::Netns;

#[test]
fn the_store_takes_puts_and_merge_patches_before_boot() {
    let api = ApiVm::start(&[]);
    let mut c = api.client();
    assert_eq!(c.get("/mmds").json(), json!({}));
    let r = c.patch("/mmds", r#"{"a": 1}"#);
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(
        r.fault(),
        "MMDS error: The MMDS data store is not initialized."
    );
    let r = c.put(
        "/mmds",
        r#"{"latest": {"meta-data": {"ami-id": "ami-1", "reservation-id": "r-1"}}}"#,
    );
    assert_eq!(r.status, 204, "{}", r.body);
    let r = c.patch(
        "/mmds",
        r#"{"latest": {"meta-data": {"ami-id": "ami-2", "reservation-id": null}}}"#,
    );
    assert_eq!(r.status, 204, "{}", r.body);
    assert_eq!(
        c.get("/mmds").json(),
        json!({"latest": {"meta-data": {"ami-id": "ami-2"}}})
    );
    let empty = c.request("PUT", "/mmds", None);
    assert_eq!(empty.status, 400);
    assert_eq!(empty.fault(), "Empty PUT request.");
}

/// `PUT /mmds/config` checks, in Firecracker's order and with its texts
/// (and its "MMMDS" prefix), the address, the list, and that each
/// interface exists; `GET /vm/config` shows what is in force.
#[test]
fn mmds_config_is_checked_as_firecracker_checks_it() {
    let netns = Netns::with_tap("mmdscfg", "10.79.0.1/24");
    let api = ApiVm::start_in(&netns, &[]);
    let mut c = api.client();
    let refused = |c: &mut tessera_tests::api::ApiClient, body: serde_json::Value| {
        let r = c.put("/mmds/config", &body.to_string());
        assert_eq!(r.status, 400, "{body}: {}", r.body);
        r.fault()
    };
    assert_eq!(
        refused(&mut c, json!({"network_interfaces": ["eth0"]})),
        "MMMDS config error: The list of network interface IDs provided contains at least one \
         ID that does not correspond to any existing network interface."
    );
    c.put_ok(
        "/network-interfaces/eth0",
        json!({"iface_id": "eth0", "host_dev_name": "tap0"}),
    );
    assert_eq!(
        refused(
            &mut c,
            json!({"network_interfaces": ["eth0"], "ipv4_address": "169.254.0.9"})
        ),
        "MMMDS config error: The MMDS IPv4 address is not link local."
    );
    assert_eq!(
        refused(&mut c, json!({"network_interfaces": []})),
        "MMMDS config error: The list of network interface IDs that allow forwarding MMDS \
         requests is empty."
    );
    let unknown = c.put(
        "/mmds/config",
        r#"{"network_interfaces": ["eth0"], "x": 1}"#,
    );
    assert_eq!(unknown.status, 400, "{}", unknown.body);
    assert_eq!(c.get("/vm/config").json()["mmds-config"], json!(null));
    c.put_ok(
        "/mmds/config",
        json!({"network_interfaces": ["eth0"], "version": "V2"}),
    );
    assert_eq!(
        c.get("/vm/config").json()["mmds-config"],
        json!({"version": "V2", "network_interfaces": ["eth0"],
               "ipv4_address": "169.254.169.254", "imds_compat": false})
    );
    // As with Firecracker, an interface put again is a new device without
    // MMDS.
    c.put_ok(
        "/network-interfaces/eth0",
        json!({"iface_id": "eth0", "host_dev_name": "tap0"}),
    );
    assert_eq!(c.get("/vm/config").json()["mmds-config"], json!(null));
}

/// With an interface serving MMDS, the store takes PUTs, PATCHes and GETs
/// after boot; `/mmds/config` does not; a configuration file's
/// `mmds-config` does the same as the API's.
#[test]
fn a_running_microvm_with_an_mmds_interface_takes_store_changes() {
    let netns = Netns::with_tap("mmdsrun", "10.79.1.1/24");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("vm.json");
    std::fs::write(
        &config,
        json!({
            "boot-source": {"kernel_image_path": guest_artifacts().probe(),
                            "boot_args": "console=ttyS0 probe.ticks=100"},
            "network-interfaces": [{"iface_id": "eth0", "host_dev_name": "tap0"}],
            "mmds-config": {"network_interfaces": ["eth0"], "ipv4_address": "169.254.170.2"},
        })
        .to_string(),
    )
    .unwrap();
    let mut api = ApiVm::start_in(&netns, &["--config-file", config.to_str().unwrap()]);
    let mut c = api.client();
    api.vm
        .wait_until(std::time::Duration::from_secs(60), |out, _| {
            out.contains("probe.tick=1")
        });
    assert_eq!(
        c.get("/vm/config").json()["mmds-config"]["ipv4_address"],
        json!("169.254.170.2")
    );
    assert_eq!(c.get("/mmds").json(), json!({}));
    c.put_ok("/mmds", json!({"a": {"b": "c"}}));
    let r = c.patch("/mmds", r#"{"a": {"d": "e"}}"#);
    assert_eq!(r.status, 204, "{}", r.body);
    assert_eq!(c.get("/mmds").json(), json!({"a": {"b": "c", "d": "e"}}));
    let r = c.put("/mmds/config", r#"{"network_interfaces": ["eth0"]}"#);
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(
        r.fault(),
        "The requested operation is not supported after starting the microVM."
    );
}

#[test]
fn a_store_over_its_limit_is_a_413_and_metadata_fills_it_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let metadata = dir.path().join("metadata.json");
    std::fs::write(&metadata, r#"{"k": "v"}"#).unwrap();
    let api = ApiVm::start(&[
        "--mmds-size-limit",
        "40",
        "--metadata",
        metadata.to_str().unwrap(),
    ]);
    let mut c = api.client();
    assert_eq!(c.get("/mmds").json(), json!({"k": "v"}));
    let r = c.patch("/mmds", r#"{"more": "0123456789012345678901234567890"}"#);
    assert_eq!(r.status, 413, "{}", r.body);
    assert_eq!(
        r.fault(),
        "MMDS limit exceeded error: The MMDS patch request doesn't fit."
    );
    assert_eq!(
        c.get("/mmds").json(),
        json!({"k": "v"}),
        "a refused patch changed it"
    );
    let r = c.put("/mmds", &json!({"x": "y".repeat(64)}).to_string());
    assert_eq!(r.status, 413, "{}", r.body);
}

#[test]
fn after_boot_the_store_is_not_initialized_without_an_mmds_interface() {
    let api = ApiVm::start(&[]);
    let mut c = api.client();
    c.put_ok("/mmds", json!({"a": "b"}));
    c.put_ok(
        "/boot-source",
        json!({"kernel_image_path": guest_artifacts().probe(),
               "boot_args": "console=ttyS0 probe.ticks=0"}),
    );
    c.put_ok("/actions", json!({"action_type": "InstanceStart"}));
    for (method, body) in [("GET", None), ("PUT", Some("{}")), ("PATCH", Some("{}"))] {
        let r = c.request(method, "/mmds", body);
        assert_eq!(r.status, 400, "{method}: {}", r.body);
        assert_eq!(
            r.fault(),
            "MMDS error: The MMDS data store is not initialized."
        );
    }
    drop(api);
}
