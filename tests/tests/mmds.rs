//! The metadata store's API (`/mmds`), with Firecracker's rules and texts:
//! any JSON value is PUT, a PATCH merges (RFC 7396) into a store a PUT
//! initialized, a store over `--mmds-size-limit` is a 413, `--metadata`
//! fills it at start. The guest cannot reach it yet (`/mmds/config` is
//! refused), so after boot the store is "not initialized", as
//! Firecracker's is without an MMDS-enabled interface.

use serde_json::json;
use tessera_tests::api::ApiVm;
use tessera_tests::guest_artifacts;

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
    let config = c.put("/mmds/config", r#"{"network_interfaces": ["eth0"]}"#);
    assert_eq!(config.status, 400);
    assert!(config.fault().contains("not supported"), "{}", config.body);
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
