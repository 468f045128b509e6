//! Values the host cannot honour are refused when they are set (400 naming
//! the value), not accepted and then failing at `InstanceStart`.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixListener;
use std::path::Path;

use serde_json::json;
use tessera_tests::api::{ApiClient, ApiVm};
use tessera_tests::netns::Netns;
use tessera_tests::{workspace_bin, Running};

fn mkfifo(path: &Path) {
    let c_path = CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: c_path is a valid NUL-terminated string.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
}

fn assert_refused(c: &mut ApiClient, path: &str, body: serde_json::Value, message: &str) {
    let r = c.put(path, &body.to_string());
    assert_eq!(r.status, 400, "PUT {path} {body}: {}", r.body);
    assert_eq!(r.fault(), message, "PUT {path} {body}");
}

fn drive(path: &Path) -> serde_json::Value {
    json!({"drive_id": "data", "path_on_host": path, "is_root_device": false,
           "is_read_only": false})
}

#[test]
fn a_drive_that_is_not_a_file_or_block_device_is_refused() {
    let api = ApiVm::start(&[]);
    let mut c = api.client();
    let fifo = api.dir().join("disk.fifo");
    mkfifo(&fifo);
    let socket = api.dir().join("disk.sock");
    let _listener = UnixListener::bind(&socket).unwrap();
    for (path, kind) in [
        (api.dir(), "a directory"),
        (socket.as_path(), "a Unix socket"),
        (Path::new("/dev/null"), "a character device"),
        (fifo.as_path(), "a FIFO"),
    ] {
        assert_refused(
            &mut c,
            "/drives/data",
            drive(path),
            &format!(
                "drive \"data\": path_on_host {} is {kind}, not a regular file or a block device",
                path.display()
            ),
        );
    }
}

#[test]
fn a_drive_rate_limiter_is_taken_and_a_malformed_one_refused() {
    let api = ApiVm::start(&[]);
    let mut c = api.client();
    let disk = api.dir().join("disk.img");
    tessera_tests::sparse_file(&disk, 1 << 20);
    let mut body = drive(&disk);
    body["rate_limiter"] = json!({"bandwidth": {"size": 1048576}});
    let r = c.put("/drives/data", &body.to_string());
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.fault().contains("refill_time"), "{}", r.body);
    body["rate_limiter"] = json!({"bandwidth": {"size": 1048576, "refill_time": 100}});
    let r = c.put("/drives/data", &body.to_string());
    assert_eq!(r.status, 204, "{}", r.body);
    assert_eq!(
        c.get("/vm/config").json()["drives"][0]["rate_limiter"],
        json!({"bandwidth": {"size": 1048576, "refill_time": 100}})
    );
}

#[test]
fn serial_output_in_a_missing_directory_is_refused() {
    let api = ApiVm::start(&[]);
    let mut c = api.client();
    assert_refused(
        &mut c,
        "/serial",
        json!({"serial_out_path": "/no/such/dir/console.log"}),
        "serial_out_path /no/such/dir/console.log: the directory /no/such/dir does not exist",
    );
}

#[test]
fn memory_or_huge_pages_the_host_lacks_are_refused() {
    let api = ApiVm::start(&[]);
    let mut c = api.client();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
    let kib = |name: &str| -> u64 {
        meminfo
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .map_or(0, |v| v.parse().unwrap())
    };
    let host_mib = (kib("MemTotal:") + kib("SwapTotal:")) >> 10;
    let too_much = host_mib + 1024;
    assert_refused(
        &mut c,
        "/machine-config",
        json!({"vcpu_count": 1, "mem_size_mib": too_much}),
        &format!(
            "mem_size_mib {too_much} is more than this host's memory ({host_mib} MiB of RAM and swap)"
        ),
    );

    let free: u64 =
        std::fs::read_to_string("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages")
            .map_or(0, |text| text.trim().parse().unwrap());
    let mem = 2 * (free + 64);
    assert_refused(
        &mut c,
        "/machine-config",
        json!({"vcpu_count": 1, "mem_size_mib": mem, "huge_pages": "2M"}),
        &format!(
            "huge_pages \"2M\" needs {} free 2 MiB huge pages for mem_size_mib {mem}, and this host has {free} (see /proc/sys/vm/nr_hugepages)",
            free + 64
        ),
    );
}

#[test]
fn an_interface_needs_a_tap_of_its_own() {
    let netns = Netns::with_tap("tapcheck", "10.78.0.1/24");
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("api.sock");
    let mut command = netns.command(workspace_bin("tessera").to_str().unwrap());
    command.arg("--api-sock").arg(&socket);
    let _vm = Running::spawn(command);
    let mut c = ApiClient::connect(&socket);

    assert_refused(
        &mut c,
        "/network-interfaces/eth0",
        json!({"iface_id": "eth0", "host_dev_name": "lo"}),
        "interface \"eth0\": host_dev_name \"lo\" is not a TAP device (no /sys/class/net/lo/tun_flags)",
    );
    let r = c.put(
        "/network-interfaces/eth0",
        &json!({"iface_id": "eth0", "host_dev_name": "tap0"}).to_string(),
    );
    assert_eq!(r.status, 204, "{}", r.body);
    assert_refused(
        &mut c,
        "/network-interfaces/eth1",
        json!({"iface_id": "eth1", "host_dev_name": "tap0"}),
        "interface \"eth1\": host_dev_name \"tap0\" is already used by interface \"eth0\"",
    );
}
