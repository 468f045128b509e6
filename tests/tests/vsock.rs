//! vsock through `tessera` and our `vhost-user-vsock` backend, with the
//! host side of Firecracker's hybrid vsock (`CONNECT <port>` on
//! `uds_path`, guest connections to `<uds_path>_<port>`), driven by the
//! probe guest's virtio-vsock driver (`probe.vsock=echo:...`,
//! `probe.vsock_connect=...`).

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::json;
use tessera_tests::api::ApiVm;
use tessera_tests::vsock::{self, echo_through, is_guest_pattern, pattern};
use tessera_tests::{descendant_pid, guest_artifacts, workspace_bin, Running, VmConfig};

const DEADLINE: Duration = Duration::from_secs(180);
const PORT: u32 = 52;

/// A booted probe with a vsock device whose host socket is `uds`.
struct VsockVm {
    vm: Running,
    uds: PathBuf,
    dir: tempfile::TempDir,
}

impl VsockVm {
    /// Boots the probe with `probe_args` and waits for its vsock line
    /// `ready` (`listening` for echo; `up` otherwise).
    fn boot(probe_args: &str, ready: &str) -> Self {
        Self::boot_with(probe_args, ready, |_| {})
    }

    /// [`VsockVm::boot`], calling `before` with the host socket's path
    /// before the VM starts.
    fn boot_with(probe_args: &str, ready: &str, before: impl FnOnce(&Path)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("v.sock");
        before(&uds);
        let mut config = VmConfig::new(
            guest_artifacts().probe(),
            &format!("console=ttyS0 {probe_args}"),
        )
        .to_json();
        config["vsock"] = json!({"guest_cid": 3, "uds_path": uds});
        config["metrics"] = json!({"metrics_path": dir.path().join("metrics.json")});
        let path = dir.path().join("vm.json");
        std::fs::write(&path, config.to_string()).unwrap();
        let mut command = std::process::Command::new(workspace_bin("tessera"));
        command.arg("--no-api").arg("--config-file").arg(&path);
        let mut vm = Running::spawn(command);
        vm.wait_until(DEADLINE, |out, _| {
            out.contains(ready) || out.contains("probe.vsock=error")
        });
        assert!(vm.stdout().contains(ready), "{}", describe(&vm));
        Self { vm, uds, dir }
    }

    fn echo(connections: u32) -> Self {
        Self::boot(
            &format!("probe.vsock=echo:{PORT}:{connections}"),
            &format!("probe.vsock=listening {PORT}"),
        )
    }

    /// Connects through the host socket to guest port `port`.
    fn connect(&self, port: u32) -> Result<UnixStream, String> {
        vsock::connect(&self.uds, port)
    }

    /// Waits for the probe to print `what` and the VM to exit.
    fn finish(self, what: &str) -> String {
        self.finish_with_metrics(what).0
    }

    /// [`VsockVm::finish`], also returning the device's counters summed
    /// over the metrics flushes.
    fn finish_with_metrics(mut self, what: &str) -> (String, serde_json::Value) {
        // The probe resets the machine after `probe.done`: tessera exits.
        self.vm.wait_until(DEADLINE, |_, _| false);
        let out = self.vm.stdout();
        assert!(out.contains(what), "{}", describe(&self.vm));
        let run = self.vm.finish();
        assert_eq!(run.code(), 0, "{}", run.describe());
        let metrics = std::fs::read_to_string(self.dir.path().join("metrics.json")).unwrap();
        let mut totals = serde_json::Map::new();
        for line in metrics.lines() {
            let line: serde_json::Value = serde_json::from_str(line).unwrap();
            for (name, value) in line["vsock"].as_object().into_iter().flatten() {
                let sum = totals.get(name).and_then(|v| v.as_u64()).unwrap_or(0);
                totals.insert(name.clone(), json!(sum + value.as_u64().unwrap_or(0)));
            }
        }
        (run.stderr, serde_json::Value::Object(totals))
    }
}

fn describe(vm: &Running) -> String {
    format!("stdout:\n{}\nstderr:\n{}", vm.stdout(), vm.stderr())
}

#[test]
fn a_host_connection_echoes_a_64_mib_pattern() {
    let vm = VsockVm::echo(1);
    let stream = vm.connect(PORT).expect("the guest accepts");
    let data = pattern(64 << 20, 1);
    let started = Instant::now();
    let got = echo_through(stream, data.clone());
    let took = started.elapsed();
    assert!(got == data, "the echo differs from what was sent");
    eprintln!(
        "64 MiB echoed in {took:?} ({:.1} MiB/s each way)",
        64.0 / took.as_secs_f64()
    );
    let (stderr, metrics) =
        vm.finish_with_metrics("probe.vsock=echoed 67108864 bytes over 1 connection(s)");
    assert!(
        stderr.contains("67108864 bytes to the guest, 67108864 from it"),
        "{stderr}"
    );
    // The VMM's metrics carry the backend's counters.
    assert_eq!(metrics["rx_bytes_count"], json!(64 << 20), "{metrics}");
    assert_eq!(metrics["tx_bytes_count"], json!(64 << 20), "{metrics}");
    assert_eq!(metrics["host_conns_added"], json!(1), "{metrics}");
    assert!(metrics["tx_packets_count"].as_u64() > Some(1), "{metrics}");
    assert_eq!(metrics["event_fails"], json!(0), "{metrics}");
}

#[test]
fn a_hundred_concurrent_connections_each_get_their_own_bytes_back() {
    const CONNECTIONS: u32 = 100;
    let vm = VsockVm::echo(CONNECTIONS);
    let streams: Vec<UnixStream> = (0..CONNECTIONS)
        .map(|i| {
            vm.connect(PORT)
                .unwrap_or_else(|line| panic!("connection {i}: {line}"))
        })
        .collect();
    let workers: Vec<_> = streams
        .into_iter()
        .enumerate()
        .map(|(i, stream)| {
            thread::spawn(move || {
                let data = pattern(32 * 1024, i as u8);
                echo_through(stream, data.clone()) == data
            })
        })
        .collect();
    for (i, worker) in workers.into_iter().enumerate() {
        assert!(
            worker.join().unwrap(),
            "connection {i} got other bytes back"
        );
    }
    vm.finish("over 100 connection(s)");
}

#[test]
fn a_port_nobody_listens_on_closes_the_host_connection() {
    let vm = VsockVm::echo(1);
    let refused = vm.connect(PORT + 1).expect_err("no listener there");
    assert_eq!(refused, "", "the connection ends without an answer");
    // The device carries on: a good connection still works.
    let stream = vm.connect(PORT).expect("the guest accepts");
    assert_eq!(echo_through(stream, b"still here".to_vec()), b"still here");
    vm.finish("probe.vsock=echoed 10 bytes");
}

#[test]
fn bad_and_late_connect_lines_close_the_host_connection() {
    let vm = VsockVm::echo(1);
    for line in [
        &b"HELLO 52\n"[..],
        b"CONNECT\n",
        b"CONNECT 4294967296\n",
        b"CONNECT 52 and a great deal more than a line may hold\n",
    ] {
        let mut stream = UnixStream::connect(&vm.uds).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        stream.write_all(line).unwrap();
        let mut rest = Vec::new();
        // Closed with bytes unread, the socket may end with a reset.
        match stream.read_to_end(&mut rest) {
            Ok(_) => assert!(rest.is_empty(), "{line:?} got {rest:?}"),
            Err(err) => assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{line:?}"),
        }
    }
    // A line that never ends is dropped after the timeout (2 s).
    let mut slow = UnixStream::connect(&vm.uds).unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    slow.write_all(b"CONNECT 5").unwrap();
    let started = Instant::now();
    let mut rest = Vec::new();
    slow.read_to_end(&mut rest).unwrap();
    let waited = started.elapsed();
    assert!(rest.is_empty());
    assert!(
        waited >= Duration::from_millis(1500) && waited < Duration::from_secs(8),
        "dropped after {waited:?}"
    );
    let stream = vm.connect(PORT).expect("the guest accepts");
    assert_eq!(echo_through(stream, b"ok".to_vec()), b"ok");
    vm.finish("probe.vsock=echoed 2 bytes");
}

/// Resident memory of process `pid`.
fn rss_kib(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

#[test]
fn a_host_reader_that_stops_holds_the_writer_back_and_memory_stays_bounded() {
    let vm = VsockVm::echo(1);
    let stream = vm.connect(PORT).expect("the guest accepts");
    let mut writer = stream.try_clone().unwrap();
    writer
        .set_write_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let data = pattern(32 << 20, 7);
    let total = data.len();
    let sender = thread::spawn(move || {
        let mut sent = 0;
        for chunk in data.chunks(64 * 1024) {
            match writer.write_all(chunk) {
                Ok(()) => sent += chunk.len(),
                Err(_) => break,
            }
        }
        sent
    });
    // Nobody reads the echo: the guest runs out of credit toward the
    // host, then the host runs out of credit toward the guest.
    thread::sleep(Duration::from_secs(5));
    let backend = descendant_pid(vm.vm.pid(), "vhost-user-vsock").expect("the backend runs");
    let before = rss_kib(backend).expect("the backend runs");
    thread::sleep(Duration::from_secs(3));
    let after = rss_kib(backend).expect("the backend runs");
    assert!(
        !sender.is_finished(),
        "32 MiB went through with nobody reading"
    );
    assert!(
        after < before + 1024 && after < 64 * 1024,
        "backend RSS {before} KiB, then {after} KiB"
    );
    // Reading again lets everything through, in order.
    let mut reader = stream;
    let mut got = vec![0u8; total];
    reader.read_exact(&mut got).unwrap();
    assert_eq!(sender.join().unwrap(), total);
    assert!(
        got == pattern(total, 7),
        "the echo differs from what was sent"
    );
    drop(reader);
    let stderr = vm.finish("probe.vsock=echoed 33554432 bytes");
    let stalls = stderr
        .split_once(" credit stalls")
        .and_then(|(before, _)| before.rsplit(' ').next())
        .and_then(|n| n.parse::<u64>().ok());
    assert!(
        stalls.is_some_and(|n| n > 0),
        "no credit stall counted: {stderr}"
    );
}

#[test]
fn a_guest_connection_reaches_the_listener_at_uds_path_and_port() {
    const BYTES: usize = 1 << 20;
    let mut listener = None;
    let vm = VsockVm::boot_with(
        &format!("probe.vsock_connect=5000:{BYTES} probe.vsock_timeout_ms=120000"),
        "probe.vsock=up",
        |uds| listener = Some(UnixListener::bind(format!("{}_5000", uds.display())).unwrap()),
    );
    let (mut stream, _) = listener.unwrap().accept().unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut got = Vec::new();
    stream.read_to_end(&mut got).unwrap();
    assert_eq!(got.len(), BYTES);
    assert!(
        is_guest_pattern(&got),
        "the bytes are not the probe's pattern"
    );
    vm.finish(&format!("probe.vsock=sent {BYTES}"));
}

#[test]
fn a_guest_connection_to_a_port_without_a_listener_is_reset() {
    let vm = VsockVm::boot(
        "probe.vsock_connect=5001:10 probe.vsock_timeout_ms=20000",
        "probe.vsock=",
    );
    vm.finish("probe.vsock=error reset");
}

#[test]
fn put_vsock_binds_the_host_socket_before_the_guest_starts() {
    let api = ApiVm::start(&[]);
    let mut c = api.client();
    let uds = api.dir().join("v.sock");
    for path in ["/vsock", "/vsock/vsock0"] {
        let body = json!({"vsock_id": "vsock0", "guest_cid": 3, "uds_path": uds});
        let r = c.put(path, &body.to_string());
        assert_eq!(r.status, 204, "{path}: {}", r.body);
    }
    UnixStream::connect(&uds).expect("the socket exists before InstanceStart");
    let config = c.get("/vm/config").json();
    assert_eq!(
        config["vsock"],
        json!({"vsock_id": "vsock0", "guest_cid": 3, "uds_path": uds})
    );
    let taken = json!({"guest_cid": 3, "uds_path": api.dir().join("api.sock")});
    let r = c.put("/vsock", &taken.to_string());
    assert_eq!(r.status, 400);
    assert!(
        r.fault()
            .contains("Error binding to the host-side Unix socket"),
        "{}",
        r.body
    );
}

#[test]
fn a_backend_that_dies_ends_its_host_connections_and_a_new_one_serves() {
    let vm = VsockVm::echo(3);
    let mut first = vm.connect(PORT).expect("the guest accepts");
    std::io::Write::write_all(&mut first, b"before").unwrap();
    let mut back = [0u8; 6];
    first.read_exact(&mut back).unwrap();
    let old = descendant_pid(vm.vm.pid(), "vhost-user-vsock").expect("the backend runs");
    // SAFETY: kill sends SIGKILL to the backend this test's VMM started.
    assert_eq!(unsafe { libc::kill(old as i32, libc::SIGKILL) }, 0);
    // The host connection ends with the backend.
    let mut rest = Vec::new();
    match first.read_to_end(&mut rest) {
        Ok(_) => assert!(rest.is_empty(), "{rest:?}"),
        Err(err) => assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset),
    }
    // The VMM carries on with a new backend on the same host socket.
    let deadline = Instant::now() + Duration::from_secs(30);
    let second = loop {
        let replaced = descendant_pid(vm.vm.pid(), "vhost-user-vsock").is_some_and(|p| p != old);
        if replaced {
            if let Ok(stream) = vm.connect(PORT) {
                break stream;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no new backend: {}",
            describe(&vm.vm)
        );
        thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(echo_through(second, b"after".to_vec()), b"after");
    assert!(
        vm.vm
            .stderr()
            .contains("vsock vsock: a new backend took over"),
        "{}",
        describe(&vm.vm)
    );
}

#[test]
fn an_external_backend_serves_the_device_through_its_socket() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("vsock.sock");
    let uds = dir.path().join("v.sock");
    let mut backend = tessera_tests::vsock::spawn_backend(&socket, &uds);
    let mut config = VmConfig::new(
        guest_artifacts().probe(),
        &format!("console=ttyS0 probe.vsock=echo:{PORT}"),
    )
    .to_json();
    config["vsock"] = json!({"guest_cid": 3, "uds_path": uds, "socket": socket});
    let path = dir.path().join("vm.json");
    std::fs::write(&path, config.to_string()).unwrap();
    let mut command = std::process::Command::new(workspace_bin("tessera"));
    command.arg("--no-api").arg("--config-file").arg(&path);
    let mut vm = Running::spawn(command);
    vm.wait_until(DEADLINE, |out, _| out.contains("probe.vsock=listening"));
    assert!(
        vm.stdout().contains("probe.vsock=listening"),
        "{}",
        describe(&vm)
    );
    let stream = vsock::connect(&uds, PORT).expect("the guest accepts");
    assert_eq!(echo_through(stream, b"external".to_vec()), b"external");
    vm.wait_until(DEADLINE, |_, _| false);
    let run = vm.finish();
    assert_eq!(run.code(), 0, "{}", run.describe());
    assert!(
        run.stdout.contains("probe.vsock=echoed 8 bytes"),
        "{}",
        run.describe()
    );
    backend.wait_until(Duration::from_secs(10), |_, _| false);
    let backend = backend.finish();
    assert!(
        backend.stderr.contains("1 from the host"),
        "{}",
        backend.describe()
    );
}

#[test]
fn a_snapshot_with_vsock_resets_the_guests_connections_and_serves_a_new_socket() {
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("v.sock");
    let api = tessera_tests::api::ApiVm::start(&[]);
    let mut c = api.client();
    let put = |c: &mut tessera_tests::api::ApiClient, path: &str, body: serde_json::Value| {
        let r = c.put(path, &body.to_string());
        assert_eq!(r.status, 204, "PUT {path}: {}", r.body);
    };
    put(
        &mut c,
        "/boot-source",
        json!({"kernel_image_path": guest_artifacts().probe(),
               "boot_args": format!("console=ttyS0 probe.vsock=echo:{PORT}:3 probe.vsock_timeout_ms=120000")}),
    );
    put(&mut c, "/vsock", json!({"guest_cid": 3, "uds_path": uds}));
    put(&mut c, "/actions", json!({"action_type": "InstanceStart"}));
    let mut api = api;
    api.vm.wait_until(DEADLINE, |out, _| {
        out.contains(&format!("probe.vsock=listening {PORT}"))
    });
    let first = vsock::connect(&uds, PORT).unwrap();
    assert_eq!(echo_through(first, b"one".to_vec()), b"one");
    // The second connection is open, echoing, when the guest is paused.
    let second = vsock::connect(&uds, PORT).unwrap();
    let second_reader = second.try_clone().unwrap();
    assert_eq!(echo_through(second_reader, b"two".to_vec()), b"two");
    assert_eq!(c.patch("/vm", r#"{"state": "Paused"}"#).status, 204);
    let (state, memory) = (dir.path().join("vm.snap"), dir.path().join("vm.mem"));
    put(
        &mut c,
        "/snapshot/create",
        json!({"snapshot_path": state, "mem_file_path": memory}),
    );
    drop(api.vm.finish());
    drop(second);
    let moved = dir.path().join("clone.sock");
    let mut clone = tessera_tests::api::ApiVm::start(&[]);
    let mut c = clone.client();
    // A load that fails after binding the new socket leaves no socket
    // behind: the same path loads next.
    let short = dir.path().join("short.mem");
    tessera_tests::sparse_file(&short, 1 << 20);
    let r = c.put(
        "/snapshot/load",
        &json!({"snapshot_path": state, "mem_file_path": short,
                "vsock_override": {"uds_path": moved}})
        .to_string(),
    );
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(
        r.fault().contains("exceeds largest possible file offset"),
        "{}",
        r.body
    );
    assert!(
        !moved.exists(),
        "a failed load left {} behind",
        moved.display()
    );
    put(
        &mut c,
        "/snapshot/load",
        json!({"snapshot_path": state, "mem_file_path": memory, "resume_vm": true,
               "vsock_override": {"uds_path": moved}}),
    );
    // The guest dropped the second connection on TRANSPORT_RESET (else it
    // would wait for it to end forever); the third goes through the new
    // socket, and then the probe is done with its three.
    let third = vsock::connect(&moved, PORT).unwrap();
    assert_eq!(echo_through(third, b"three".to_vec()), b"three");
    // The whole line: the harness may see it in pieces.
    clone.vm.wait_until(DEADLINE, |out, _| {
        out.split_once("probe.vsock=echoed")
            .is_some_and(|(_, rest)| rest.contains('\n'))
    });
    let out = clone.vm.finish().stdout;
    assert!(
        out.contains("over 3 connection(s)"),
        "the guest did not count three connections:\n{out}"
    );
}
