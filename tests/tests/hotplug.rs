//! Hot-plug over the API (`--enable-pci`), under this host's KVM with the
//! probe guest, which does not bind the new devices (it never rescans):
//! a drive and an interface plugged after boot get their backends and
//! show in the configuration, and `DELETE` of a device no driver holds
//! removes it at once, its backend ending. The refusals are Firecracker's:
//! before boot, without PCI, a duplicate id, a root drive, an unknown id.
//! Nested Linux (`tests/nested/runner.sh`, scenario hotplug) shows the
//! guest's side: the ACPI notification, the rescan and the eject.

use std::time::Duration;

use serde_json::json;
use tessera_tests::api::{ApiClient, ApiVm};
use tessera_tests::{descendant_pid, guest_artifacts, netns::Netns};

const DEADLINE: Duration = Duration::from_secs(60);

fn start(extra_args: &[&str]) -> (ApiVm, ApiClient) {
    let api = ApiVm::start(extra_args);
    let mut c = api.client();
    let boot = json!({"kernel_image_path": guest_artifacts().probe(),
                      "boot_args": "console=ttyS0 probe.ticks=0"});
    assert_eq!(c.put("/boot-source", &boot.to_string()).status, 204);
    (api, c)
}

fn instance_start(api: &mut ApiVm, c: &mut ApiClient) {
    let r = c.put("/actions", r#"{"action_type": "InstanceStart"}"#);
    assert_eq!(r.status, 204, "{}", r.body);
    api.vm
        .wait_until(DEADLINE, |out, _| out.contains("probe.tick=1"));
    assert!(
        api.vm.stdout().contains("probe.tick=1"),
        "{}",
        api.vm.stderr()
    );
}

fn refused(c: &mut ApiClient, method: &str, path: &str, body: Option<&str>, fault: &str) {
    let r = c.request(method, path, body);
    assert_eq!(r.status, 400, "{method} {path}: {}", r.body);
    assert!(r.fault().contains(fault), "{method} {path}: {}", r.body);
}

fn drive_ids(c: &mut ApiClient) -> Vec<String> {
    let config = c.get("/vm/config").json();
    config["drives"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["drive_id"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn a_drive_plugged_after_boot_gets_a_backend_and_leaves_with_delete() {
    let (mut api, mut c) = start(&["--enable-pci"]);
    refused(
        &mut c,
        "DELETE",
        "/drives/late",
        None,
        "not supported before starting",
    );
    instance_start(&mut api, &mut c);
    let disk = tessera_tests::sparse_file(&api.dir().join("late.img"), 4 << 20);
    let late = json!({"drive_id": "late", "path_on_host": disk, "is_root_device": false});
    let r = c.put("/drives/late", &late.to_string());
    assert_eq!(r.status, 204, "{}", r.body);
    assert_eq!(drive_ids(&mut c), ["late"]);
    let backend = descendant_pid(api.vm.pid(), "--serial late").expect("a backend for late");
    let plugged = |times: usize| {
        move |_: &str, err: &str| {
            err.matches("drive late: hot-plugged in PCI slot 1").count() == times
        }
    };
    api.vm.wait_until(DEADLINE, plugged(1));
    assert!(plugged(1)("", &api.vm.stderr()), "{}", api.vm.stderr());

    refused(
        &mut c,
        "PUT",
        "/drives/late",
        Some(&late.to_string()),
        "Device ID in use",
    );
    let root = json!({"drive_id": "root2", "path_on_host": disk, "is_root_device": true});
    refused(
        &mut c,
        "PUT",
        "/drives/root2",
        Some(&root.to_string()),
        "root device",
    );
    refused(
        &mut c,
        "DELETE",
        "/drives/nope",
        None,
        "Device not found: drive nope",
    );
    refused(
        &mut c,
        "DELETE",
        "/drives/late",
        Some("{}"),
        "cannot have a body",
    );

    // The probe never bound it: DELETE removes it at once.
    let r = c.request("DELETE", "/drives/late", None);
    assert_eq!(r.status, 204, "{}", r.body);
    assert!(drive_ids(&mut c).is_empty());
    let gone = (0..200).any(|_| {
        std::thread::sleep(Duration::from_millis(25));
        !std::path::Path::new(&format!("/proc/{backend}")).exists()
            || std::fs::read_to_string(format!("/proc/{backend}/stat"))
                .is_ok_and(|s| s.contains(") Z "))
    });
    assert!(gone, "the backend of an unplugged drive must end");
    // Its slot is free again, and the guest still runs.
    let r = c.put("/drives/late", &late.to_string());
    assert_eq!(r.status, 204, "{}", r.body);
    api.vm.wait_until(DEADLINE, plugged(2));
    assert!(plugged(2)("", &api.vm.stderr()), "{}", api.vm.stderr());
    let ticks = api.vm.stdout().matches("probe.tick=").count();
    let ticking = move |out: &str, _: &str| out.matches("probe.tick=").count() > ticks;
    api.vm.wait_until(DEADLINE, ticking);
    assert!(ticking(&api.vm.stdout(), ""), "the guest stopped ticking");
}

#[test]
fn an_interface_plugged_after_boot_gets_a_backend_and_leaves_with_delete() {
    let netns = Netns::with_tap("hotplug", "10.83.0.1/24");
    let mut api = ApiVm::start_in(&netns, &["--enable-pci"]);
    let mut c = api.client();
    let boot = json!({"kernel_image_path": guest_artifacts().probe(),
                      "boot_args": "console=ttyS0 probe.ticks=0"});
    assert_eq!(c.put("/boot-source", &boot.to_string()).status, 204);
    instance_start(&mut api, &mut c);
    let iface = json!({"iface_id": "late", "host_dev_name": "tap0",
                       "guest_mac": "06:00:00:00:00:09"});
    let r = c.put("/network-interfaces/late", &iface.to_string());
    assert_eq!(r.status, 204, "{}", r.body);
    let plugged = |_: &str, err: &str| err.contains("interface late: hot-plugged in PCI slot 1");
    api.vm.wait_until(DEADLINE, plugged);
    assert!(plugged("", &api.vm.stderr()), "{}", api.vm.stderr());
    let config = c.get("/vm/config").json();
    assert_eq!(config["network-interfaces"][0]["iface_id"], "late");
    refused(
        &mut c,
        "PUT",
        "/network-interfaces/late",
        Some(&iface.to_string()),
        "Device ID in use",
    );
    let r = c.request("DELETE", "/network-interfaces/late", None);
    assert_eq!(r.status, 204, "{}", r.body);
    let config = c.get("/vm/config").json();
    assert!(config["network-interfaces"]
        .as_array()
        .is_none_or(|a| a.is_empty()));
}

#[test]
fn without_pci_devices_cannot_be_plugged_after_boot() {
    let (mut api, mut c) = start(&[]);
    instance_start(&mut api, &mut c);
    let disk = tessera_tests::sparse_file(&api.dir().join("late.img"), 1 << 20);
    let late = json!({"drive_id": "late", "path_on_host": disk, "is_root_device": false});
    refused(
        &mut c,
        "PUT",
        "/drives/late",
        Some(&late.to_string()),
        "not supported after starting",
    );
    refused(&mut c, "DELETE", "/drives/late", None, "PCI is not enabled");
}

/// A drive plugged into the hole another left keeps its slot across a
/// snapshot: the loading process puts every device back where it was.
#[test]
fn a_snapshot_after_hot_plug_loads_every_device_in_its_slot() {
    let (mut api, mut c) = start(&["--enable-pci"]);
    let disk = |name: &str| tessera_tests::sparse_file(&api.dir().join(name), 1 << 20);
    let (a, b, late) = (disk("a.img"), disk("b.img"), disk("c.img"));
    for (id, path) in [("a", &a), ("b", &b)] {
        let body = json!({"drive_id": id, "path_on_host": path, "is_root_device": false});
        assert_eq!(
            c.put(&format!("/drives/{id}"), &body.to_string()).status,
            204
        );
    }
    instance_start(&mut api, &mut c);
    assert_eq!(c.request("DELETE", "/drives/a", None).status, 204);
    let body = json!({"drive_id": "c", "path_on_host": late, "is_root_device": false});
    let r = c.put("/drives/c", &body.to_string());
    assert_eq!(r.status, 204, "{}", r.body);
    let plugged = |_: &str, err: &str| err.contains("drive c: hot-plugged in PCI slot 1");
    api.vm.wait_until(DEADLINE, plugged);
    assert!(plugged("", &api.vm.stderr()), "{}", api.vm.stderr());
    assert_eq!(c.patch("/vm", r#"{"state": "Paused"}"#).status, 204);
    let (state, memory) = (api.dir().join("vm.snap"), api.dir().join("vm.mem"));
    let r = c.put(
        "/snapshot/create",
        &json!({"snapshot_path": state, "mem_file_path": memory}).to_string(),
    );
    assert_eq!(r.status, 204, "{}", r.body);
    drop(api.vm.finish());

    let mut loaded = ApiVm::start(&[]);
    let mut c = loaded.client();
    let r = c.put(
        "/snapshot/load",
        &json!({"snapshot_path": state, "mem_file_path": memory, "resume_vm": true}).to_string(),
    );
    assert_eq!(r.status, 204, "{}", r.body);
    assert_eq!(drive_ids(&mut c), ["b", "c"]);
    let ticks = loaded.vm.stdout().matches("probe.tick=").count();
    let ticking = move |out: &str, _: &str| out.matches("probe.tick=").count() > ticks + 1;
    loaded.vm.wait_until(DEADLINE, ticking);
    let run = loaded.vm.finish();
    assert!(ticking(&run.stdout, ""), "{}", run.describe());
    for line in [
        "drive b: virtio-pci at 00:02.0",
        "drive c: virtio-pci at 00:01.0",
    ] {
        assert!(run.stderr.contains(line), "no {line:?}:\n{}", run.stderr);
    }
}
