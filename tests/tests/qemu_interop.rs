//! Our backends under real Linux virtio drivers, with QEMU as the frontend
//! (TCG, since KVM here cannot run Linux).
//!
//! - `vhost-user-blk` under `-device vhost-user-blk-pci` on a PC: the
//!   guest's root fs lives on one backend, and it fills a second drive
//!   (offered with two queues) with `dd`; the bytes are checked on the
//!   host.
//! - `vhost-user-net --defer-early-vring-enable` on a TAP in a network
//!   namespace of the test's own: pings and 16 MiB over HTTP each way.
//! - `vhost-user-vsock` under `-device vhost-user-vsock-pci`: a host
//!   client echoes 4 MiB through Linux's virtio-vsock driver and the
//!   guest's `vsock-tool`, and the guest sends 1 MiB to `<uds_path>_5001`.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tessera_tests::netns::Netns;
use tessera_tests::{guest_artifacts, run_with_deadline, workspace_bin, Running};

fn backend(socket: &Path, image: &Path, queues: u16) -> Running {
    let mut command = Command::new(workspace_bin("vhost-user-blk"));
    command
        .arg("--socket")
        .arg(socket)
        .arg("--path")
        .arg(image)
        .arg("--queues")
        .arg(queues.to_string());
    let running = Running::spawn(command);
    assert!(
        tessera_tests::wait_for_listener(socket, Duration::from_secs(10)),
        "{} never appeared",
        socket.display()
    );
    running
}

/// The machine QEMU emulates: `Microvm` puts devices on virtio-mmio,
/// `Pc` (i440FX) on PCI.
#[derive(Clone, Copy)]
enum Machine {
    Microvm,
    Pc,
}

/// QEMU (TCG) with `vcpus` vCPUs and 256 MiB of shareable memfd memory, the
/// console on stdio; devices and kernel are added by the caller.
fn qemu(machine: Machine, vcpus: u8) -> Command {
    let mut qemu = Command::new("qemu-system-x86_64");
    let machine_arg = match machine {
        Machine::Microvm => "microvm,acpi=off,memory-backend=mem",
        Machine::Pc => "pc,memory-backend=mem",
    };
    qemu.args(["-accel", "tcg", "-M", machine_arg])
        .args(["-object", "memory-backend-memfd,id=mem,size=256M,share=on"])
        .args(["-m", "256", "-cpu", "max", "-smp", &vcpus.to_string()])
        .args([
            "-nographic",
            "-nodefaults",
            "-serial",
            "stdio",
            "-no-reboot",
        ]);
    // The PC has its own keyboard controller (reboot=k ends the VM).
    if matches!(machine, Machine::Microvm) {
        qemu.args(["-device", "i8042"]);
    }
    qemu
}

#[test]
fn linux_under_qemu_runs_its_root_fs_and_a_data_disk_on_our_backend() {
    if Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_err()
    {
        panic!("qemu-system-x86_64 is missing: apt-get install qemu-system-x86");
    }
    let guest = guest_artifacts();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root.ext4");
    std::fs::copy(guest.rootfs(), &root).unwrap();
    let data = dir.path().join("data.img");
    tessera_tests::sparse_file(&data, 8 << 20);
    let root_sock = dir.path().join("root.sock");
    let data_sock = dir.path().join("data.sock");
    let mut root_backend = backend(&root_sock, &root, 1);
    let mut data_backend = backend(&data_sock, &data, 2);

    let mut qemu = qemu(Machine::Pc, 1);
    qemu.arg("-chardev")
        .arg(format!("socket,id=root,path={}", root_sock.display()))
        .args(["-device", "vhost-user-blk-pci,chardev=root,num-queues=1"])
        .arg("-chardev")
        .arg(format!("socket,id=data,path={}", data_sock.display()))
        .args(["-device", "vhost-user-blk-pci,chardev=data,num-queues=2"])
        .arg("-kernel")
        .arg(guest.vmlinux())
        .arg("-append")
        .arg(
            "console=ttyS0 reboot=k panic=-1 root=/dev/vda rw tessera.dd=/dev/vdb:4 tessera.halt=1",
        );
    let run = run_with_deadline(qemu, Duration::from_secs(300), |_, _| false);
    // The backends exit on their own once QEMU hangs up (after a flush).
    root_backend.wait_until(Duration::from_secs(10), |_, _| false);
    data_backend.wait_until(Duration::from_secs(10), |_, _| false);
    let root_run = root_backend.finish();
    let data_run = data_backend.finish();

    assert_eq!(run.code(), 0, "{}", run.describe());
    assert!(
        run.stdout.contains("TESSERA-GUEST-UP"),
        "{}",
        run.describe()
    );
    assert!(
        run.stdout.contains("tessera.root_writable=yes"),
        "{}",
        run.describe()
    );
    assert!(
        run.stdout.contains("tessera.dd=ok /dev/vdb 4"),
        "{}",
        run.describe()
    );
    let bytes = std::fs::read(&data).unwrap();
    let pattern = b"TESSERA\n";
    for (i, chunk) in bytes[..4 << 20].chunks(pattern.len()).enumerate() {
        assert_eq!(chunk, pattern, "data drive bytes at {}", i * pattern.len());
    }
    assert!(bytes[4 << 20..].iter().all(|b| *b == 0));
    for backend in [root_run, data_run] {
        assert_eq!(backend.code(), 0, "{}", backend.describe());
        // QEMU negotiated INFLIGHT_SHMFD: it took a region from the backend
        // (GET_INFLIGHT_FD) and handed it back (SET_INFLIGHT_FD).
        assert!(
            backend.stderr.contains("tracking in-flight requests of"),
            "{}",
            backend.describe()
        );
        assert!(
            backend.stderr.contains("the frontend disconnected"),
            "{}",
            backend.describe()
        );
    }
}

const HOST_IP: &str = "10.81.0.1";
const GUEST_IP: &str = "10.81.0.2";
const GUEST_MAC: &str = "06:00:0a:51:00:02";
/// What the guest's init serves and expects: 16 MiB of "TESSERA\n".
const BLOB_LEN: usize = 16 << 20;

fn blob() -> Vec<u8> {
    b"TESSERA\n".repeat(BLOB_LEN / 8)
}

fn md5(bytes: &[u8]) -> String {
    let mut md5sum = Command::new("md5sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run md5sum");
    md5sum.stdin.take().unwrap().write_all(bytes).unwrap();
    let out = md5sum.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// The handle of `netns`, for `enter`.
fn open_netns(netns: &Netns) -> std::fs::File {
    std::fs::File::open(format!("/run/netns/{}", netns.name())).unwrap()
}

/// Moves the calling thread into the network namespace `ns` (network
/// namespaces are per thread).
fn enter(ns: &std::fs::File) -> std::io::Result<()> {
    // SAFETY: setns on an open namespace fd; it changes only this thread's
    // network namespace.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Serves `body` to every HTTP GET on HOST_IP:8080 inside `netns` until
/// `stop`; returns how many requests it answered.
fn serve_http(
    netns: &Netns,
    body: Arc<Vec<u8>>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<usize> {
    let ns = open_netns(netns);
    std::thread::spawn(move || {
        enter(&ns).expect("enter the namespace");
        let listener = TcpListener::bind((HOST_IP, 8080)).unwrap();
        listener.set_nonblocking(true).unwrap();
        let mut served = 0;
        while !stop.load(Ordering::Relaxed) {
            let Ok((mut stream, _)) = listener.accept() else {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            };
            stream.set_nonblocking(false).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(30)))
                .unwrap();
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
            }
            let header = format!(
                "HTTP/1.0 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
                body.len()
            );
            if stream.write_all(header.as_bytes()).is_ok() && stream.write_all(&body).is_ok() {
                served += 1;
            }
        }
        served
    })
}

/// GETs http://GUEST_IP:8080/blob from inside `netns`: (status line, body).
fn fetch_from_guest(netns: &Netns) -> std::io::Result<(String, Vec<u8>)> {
    let ns = open_netns(netns);
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                enter(&ns)?;
                let address = (GUEST_IP.parse::<std::net::Ipv4Addr>().unwrap(), 8080).into();
                let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(10))?;
                stream.set_read_timeout(Some(Duration::from_secs(60)))?;
                stream.write_all(
                    format!("GET /blob HTTP/1.0\r\nHost: {GUEST_IP}\r\n\r\n").as_bytes(),
                )?;
                let mut response = Vec::new();
                stream.read_to_end(&mut response)?;
                let split = response
                    .windows(4)
                    .position(|w| w == b"\r\n\r\n")
                    .ok_or_else(|| std::io::Error::other("no end of the HTTP header"))?;
                let status = String::from_utf8_lossy(&response[..split])
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .to_string();
                Ok((status, response[split + 4..].to_vec()))
            })
            .join()
            .unwrap()
    })
}

/// The value of the guest's `tessera.<key>=` line.
fn guest_value(stdout: &str, key: &str) -> Option<String> {
    stdout.lines().find_map(|l| {
        l.trim_end_matches('\r')
            .strip_prefix(&format!("tessera.{key}="))
            .map(str::to_string)
    })
}

#[test]
fn linux_under_qemu_pings_and_moves_16_mib_each_way_through_our_net_backend() {
    let installed = Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_ok();
    if !tessera_tests::can_run(
        installed,
        "qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)",
    ) {
        return;
    }
    let guest = guest_artifacts();
    let netns = Netns::with_tap("qemu-net", &format!("{HOST_IP}/24"));
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("net.sock");

    let blob = Arc::new(blob());
    let want = md5(&blob);
    let stop = Arc::new(AtomicBool::new(false));
    let server = serve_http(&netns, blob.clone(), stop.clone());

    let mut command = netns.command(workspace_bin("vhost-user-net").to_str().unwrap());
    command
        .arg("--socket")
        .arg(&socket)
        .args(["--tap", "tap0", "--defer-early-vring-enable"]);
    let mut backend = Running::spawn(command);
    assert!(
        tessera_tests::wait_for_path(&socket, Duration::from_secs(10)),
        "{}",
        backend.stderr()
    );

    // The guest halts `tessera.wait` seconds after its own fetch: time for
    // the host's pings and fetch.
    let mut qemu = qemu(Machine::Microvm, 1);
    qemu.arg("-chardev")
        .arg(format!("socket,id=n0,path={}", socket.display()))
        .args(["-netdev", "vhost-user,id=net0,chardev=n0"])
        .arg("-device")
        .arg(format!("virtio-net-device,netdev=net0,mac={GUEST_MAC}"))
        .arg("-kernel")
        .arg(guest.vmlinux())
        .arg("-initrd")
        .arg(guest.initramfs())
        .arg("-append")
        .arg(format!(
            "console=ttyS0 reboot=k panic=-1 \
             ip={GUEST_IP}::{HOST_IP}:255.255.255.0::eth0:off \
             tessera.ping={HOST_IP} tessera.transfer={HOST_IP} tessera.wait=30 tessera.halt=1"
        ));
    let start = Instant::now();
    let mut vm = Running::spawn(qemu);
    vm.wait_until(Duration::from_secs(150), |out, _| {
        out.split_once("tessera.fetch=")
            .is_some_and(|(_, rest)| rest.contains('\n'))
    });
    let guest_done = start.elapsed();

    // Host -> guest: ping, then the guest's httpd, while it waits.
    let ping = netns
        .command("ping")
        .args(["-c", "5", "-W", "2", "-s", "1400", GUEST_IP])
        .output()
        .expect("run ping");
    let ping = String::from_utf8_lossy(&ping.stdout).into_owned();
    let fetched = fetch_from_guest(&netns);
    let host_done = start.elapsed();

    let exited = vm.wait_until(Duration::from_secs(200), |_, _| false);
    let run = vm.finish();
    stop.store(true, Ordering::Relaxed);
    let served = server.join().unwrap();
    // The backend exits on its own once QEMU hangs up.
    backend.wait_until(Duration::from_secs(10), |_, _| false);
    let backend = backend.finish();
    eprintln!(
        "QEMU run: guest fetch done at {:.1} s, host ping and fetch at {:.1} s, QEMU exited at {:.1} s",
        guest_done.as_secs_f64(),
        host_done.as_secs_f64(),
        run.elapsed.as_secs_f64()
    );
    let describe = || format!("{}\n--- backend ---\n{}", run.describe(), backend.stderr);

    assert!(exited, "QEMU did not exit\n{}", describe());
    assert_eq!(run.code(), 0, "{}", describe());
    assert!(run.stdout.contains("TESSERA-GUEST-UP"), "{}", describe());
    // QEMU really used our backend (it falls back on userspace virtio,
    // with no data path, when it cannot start vhost).
    assert!(
        !run.stderr.contains("unable to start vhost net"),
        "{}",
        describe()
    );
    assert_eq!(
        guest_value(&run.stdout, "eth0").as_deref(),
        Some(format!("{GUEST_IP}/24").as_str()),
        "{}",
        describe()
    );
    assert_eq!(
        guest_value(&run.stdout, "ping").as_deref(),
        Some("ok 5/5"),
        "guest -> host ping\n{}",
        describe()
    );
    assert!(
        ping.contains("5 packets transmitted, 5 received"),
        "host -> guest ping: {ping}\n{}",
        describe()
    );
    assert_eq!(served, 1, "the guest's fetch\n{}", describe());
    assert_eq!(
        guest_value(&run.stdout, "fetch").as_deref(),
        Some(want.as_str()),
        "16 MiB host -> guest\n{}",
        describe()
    );
    let (status, body) =
        fetched.unwrap_or_else(|err| panic!("fetch from the guest: {err}\n{}", describe()));
    assert!(status.contains(" 200 "), "{status}\n{}", describe());
    assert_eq!(body.len(), BLOB_LEN, "16 MiB guest -> host\n{}", describe());
    assert_eq!(md5(&body), want, "16 MiB guest -> host\n{}", describe());

    assert_eq!(backend.code(), 0, "{}", describe());
    for line in [
        "deferring such requests until SET_FEATURES",
        "the frontend disconnected; exiting",
    ] {
        assert!(backend.stderr.contains(line), "{line}\n{}", describe());
    }
}

#[test]
fn linux_under_qemu_echoes_and_sends_through_our_vsock_backend() {
    use std::os::unix::net::UnixListener;
    use tessera_tests::vsock::{connect, echo_through, is_guest_pattern, pattern};
    const SEND: usize = 1 << 20;
    let guest = guest_artifacts();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("vsock.sock");
    let uds = dir.path().join("v.sock");
    // Where the guest's connection to host port 5001 goes.
    let listener = UnixListener::bind(dir.path().join("v.sock_5001")).unwrap();
    let mut backend = tessera_tests::vsock::spawn_backend(&socket, &uds);

    let mut qemu = qemu(Machine::Pc, 1);
    qemu.arg("-chardev")
        .arg(format!("socket,id=vs,path={}", socket.display()))
        .args(["-device", "vhost-user-vsock-pci,chardev=vs"])
        .arg("-kernel")
        .arg(guest.vmlinux())
        .arg("-initrd")
        .arg(guest.initramfs())
        .arg("-append")
        .arg(format!(
            "console=ttyS0 reboot=k panic=-1 tessera.vsock_echo=52 \
             tessera.vsock_send=5001:{SEND} tessera.halt=1"
        ));
    let mut vm = Running::spawn(qemu);
    vm.wait_until(Duration::from_secs(300), |out, _| {
        out.contains("vsock-tool: listening on 52")
    });
    assert!(
        vm.stdout().contains("vsock-tool: listening on 52"),
        "stdout:\n{}\nbackend:\n{}",
        vm.stdout(),
        backend.stderr()
    );
    // Host to guest and back, through Linux's virtio-vsock driver.
    let stream = connect(&uds, 52).expect("the guest accepts");
    let data = pattern(4 << 20, 3);
    assert!(
        echo_through(stream, data.clone()) == data,
        "the echo differs"
    );
    // Guest to host: a connection to <uds_path>_5001.
    let (mut from_guest, _) = listener.accept().unwrap();
    let mut got = Vec::new();
    from_guest.read_to_end(&mut got).unwrap();
    assert_eq!(got.len(), SEND);
    assert!(is_guest_pattern(&got), "the guest's bytes differ");
    drop(from_guest);

    vm.wait_until(Duration::from_secs(300), |_, _| false);
    let run = vm.finish();
    backend.wait_until(Duration::from_secs(10), |_, _| false);
    let backend = backend.finish();
    assert_eq!(run.code(), 0, "{}", run.describe());
    for line in [
        "tessera.vsock_echo=done",
        &format!("tessera.vsock_send=ok {SEND}"),
    ] {
        assert!(run.stdout.contains(line), "{}", run.describe());
    }
    assert!(
        backend.stderr.contains("1 from the host, 1 from the guest"),
        "{}",
        backend.describe()
    );
}
