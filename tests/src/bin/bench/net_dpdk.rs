//! Network frame rates through our `vhost-user-net` with an independent
//! frontend: DPDK's virtio-user PMD in `dpdk-testpmd`, 1 queue pair, over a
//! TAP in a private namespace. The backend runs on CPU 1 and testpmd on
//! CPU 0 (its main and forwarding lcores both there).
//!
//! - guest to TAP: `--forward-mode=txonly` with 64- and 1500-byte frames;
//!   the rate is what the TAP received (its rx_packets counter);
//! - TAP to guest: `--forward-mode=rxonly` while a sender in this process
//!   (AF_PACKET, sendmmsg, qdisc bypass, on CPU 0 beside testpmd) writes
//!   frames into the TAP; the rate is what the backend read from the TAP
//!   (its tx_packets counter, which the TAP counts when a frame is read),
//!   and the TAP's tx_dropped says whether the sender outran the backend.
//!
//! Cloud Hypervisor's `vhost_user_net` (from the peers' binaries, when
//! there) runs every cell beside ours, the two taking turns; its figures
//! sit under `cloud-hypervisor` in each cell, with Tessera's medians over
//! its in `tessera_over_cloud_hypervisor`.
//!
//! Each run is a fresh backend and testpmd, 1 s of warm-up, then one
//! window of `WINDOW` over which the TAP counters and the backend's CPU
//! time (utime + stime from /proc/PID/stat) are sampled.
//!
//! The host baseline is iperf3 between two namespaces over a veth pair
//! (client on CPU 0, server on CPU 1): TCP, and UDP with 64- and 1500-byte
//! frames (22- and 1472-byte payloads), received packets per second.
//!
//! Prerequisites (Debian): `apt-get install dpdk iperf3`. Without
//! `dpdk-testpmd` (or iperf3) that part is skipped with the reason printed.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tessera_tests::netns::Netns;
use tessera_tests::{workspace_bin, Running};

use super::{cpu_seconds, pin_this_thread, summary};

const WINDOW: Duration = Duration::from_secs(5);
const WARM_UP: Duration = Duration::from_secs(1);
const QUEUE_SIZE: u32 = 256;
const FRAME_LENS: [usize; 2] = [64, 1500];
pub(crate) const BACKEND_CPU: usize = 1;
pub(crate) const FRONTEND_CPU: usize = 0;
/// The TAP's queue towards the backend, in frames (Linux's default: 1000).
pub(crate) const TAP_TXQUEUELEN: u32 = 10_000;

pub(crate) fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

pub(crate) fn load_average() -> Vec<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .filter_map(|v| v.parse().ok())
        .collect()
}

/// The TAP's counters: (rx packets, rx bytes, tx packets, tx bytes, tx dropped).
#[derive(Debug, Clone, Copy)]
pub(crate) struct TapCounters {
    pub(crate) rx_packets: f64,
    pub(crate) rx_bytes: f64,
    pub(crate) tx_packets: f64,
    pub(crate) tx_bytes: f64,
    pub(crate) tx_dropped: f64,
}

pub(crate) fn tap_counters(netns: &Netns) -> TapCounters {
    let out = Command::new("ip")
        .args(["-n", netns.name(), "-s", "-j", "link", "show", "tap0"])
        .output()
        .expect("ip link show");
    let v: Value = serde_json::from_slice(&out.stdout).expect("ip -j output");
    let s = &v[0]["stats64"];
    let n = |dir: &str, key: &str| s[dir][key].as_f64().unwrap_or(0.0);
    TapCounters {
        rx_packets: n("rx", "packets"),
        rx_bytes: n("rx", "bytes"),
        tx_packets: n("tx", "packets"),
        tx_bytes: n("tx", "bytes"),
        tx_dropped: n("tx", "dropped"),
    }
}

/// One Ethernet/IPv4/UDP frame of `len` bytes (no FCS), to a locally
/// administered unicast MAC (testpmd's port is promiscuous).
pub(crate) fn udp_frame(len: usize) -> Vec<u8> {
    let mut f = vec![0u8; len];
    f[0..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x02]);
    f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    f[12..14].copy_from_slice(&[0x08, 0x00]);
    let ip_len = (len - 14) as u16;
    f[14] = 0x45;
    f[16..18].copy_from_slice(&ip_len.to_be_bytes());
    f[22] = 64;
    f[23] = 17;
    f[26..30].copy_from_slice(&[198, 18, 0, 1]);
    f[30..34].copy_from_slice(&[198, 18, 0, 2]);
    let mut sum = 0u32;
    for pair in f[14..34].chunks(2) {
        sum += u32::from(u16::from_be_bytes([pair[0], pair[1]]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    f[24..26].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    f[34..36].copy_from_slice(&9u16.to_be_bytes());
    f[36..38].copy_from_slice(&9u16.to_be_bytes());
    f[38..40].copy_from_slice(&(ip_len - 20).to_be_bytes());
    f
}

/// Writes `len`-byte frames into `tap0` of `netns` from the host side
/// until `stop`, on `cpu`, in batches of sendmmsg. Frames the TAP cannot
/// queue are dropped there (its tx_dropped counter).
fn sender(
    netns: &str,
    len: usize,
    cpu: usize,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Result<(), String>> {
    let netns = format!("/run/netns/{netns}");
    std::thread::spawn(move || {
        pin_this_thread(cpu);
        let ns = std::fs::File::open(&netns).map_err(|e| format!("{netns}: {e}"))?;
        // SAFETY: setns on an open namespace fd moves only this thread.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(format!("setns: {}", std::io::Error::last_os_error()));
        }
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket creation; the fd is owned right away.
        let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
        if raw < 0 {
            return Err(format!("AF_PACKET: {}", std::io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a new fd nothing else owns.
        let sock = unsafe { OwnedFd::from_raw_fd(raw) };
        let one: libc::c_int = 1;
        // SAFETY: PACKET_QDISC_BYPASS reads one int.
        unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_QDISC_BYPASS,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as u32,
            );
        }
        bind_to_tap0(&sock, proto)?;
        const BATCH: usize = 64;
        let frame = udp_frame(len);
        let mut iov = libc::iovec {
            iov_base: frame.as_ptr() as *mut libc::c_void,
            iov_len: frame.len(),
        };
        // Each mmsghdr points at the one iovec, which outlives the loop and
        // is only read.
        let mut msgs: Vec<libc::mmsghdr> = (0..BATCH)
            .map(|_| {
                // SAFETY: an all-zero mmsghdr is a valid, empty header.
                let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
                m.msg_hdr.msg_iov = &mut iov;
                m.msg_hdr.msg_iovlen = 1;
                m
            })
            .collect();
        while !stop.load(Ordering::Relaxed) {
            // SAFETY: `msgs` holds BATCH valid headers (see above).
            unsafe { libc::sendmmsg(sock.as_raw_fd(), msgs.as_mut_ptr(), BATCH as u32, 0) };
        }
        Ok(())
    })
}

/// Starts `vhost-user-net` on `tap0` of `netns`, pinned to `BACKEND_CPU`,
/// listening on `socket`, and waits until it listens.
/// A vhost-user-net backend under test.
#[derive(Clone, Debug)]
pub(crate) enum NetBackend {
    Tessera,
    /// Cloud Hypervisor's `vhost_user_net`, among the peers' binaries.
    CloudHypervisor(PathBuf),
}

impl NetBackend {
    /// Ours, and Cloud Hypervisor's when its binary is there.
    pub(crate) fn all() -> Vec<NetBackend> {
        let mut all = vec![NetBackend::Tessera];
        match crate::peers::peer_bin("vhost_user_net") {
            Some(bin) => all.push(NetBackend::CloudHypervisor(bin)),
            None => eprintln!(
                "Cloud Hypervisor's vhost_user_net not measured: not in {}",
                crate::peers::peers_dir().display()
            ),
        }
        all
    }

    pub(crate) fn name(&self) -> &'static str {
        match self {
            NetBackend::Tessera => "tessera",
            NetBackend::CloudHypervisor(_) => "cloud-hypervisor",
        }
    }
}

/// The IPv4 address and netmask `tap0` has in `netns` (Cloud Hypervisor's
/// backend sets both on the TAP it opens: it gets the ones already there).
fn tap_address(netns: &Netns) -> Result<(String, String), String> {
    let out = Command::new("ip")
        .args(["-n", netns.name(), "-j", "-4", "addr", "show", "tap0"])
        .output()
        .map_err(|e| format!("ip addr show: {e}"))?;
    let v: Value = serde_json::from_slice(&out.stdout).map_err(|e| format!("ip -j: {e}"))?;
    let info = &v[0]["addr_info"][0];
    let (Some(ip), Some(prefix)) = (info["local"].as_str(), info["prefixlen"].as_u64()) else {
        return Err(format!("tap0 in {} has no IPv4 address", netns.name()));
    };
    let mask = u32::MAX.checked_shl(32 - prefix as u32).unwrap_or(0);
    Ok((ip.to_string(), std::net::Ipv4Addr::from(mask).to_string()))
}

pub(crate) fn start_backend(
    netns: &Netns,
    socket: &Path,
    queues: usize,
    queue_size: u32,
    kind: &NetBackend,
) -> Result<Running, String> {
    let _ = std::fs::remove_file(socket);
    let mut backend = netns.command("taskset");
    backend.args(["-c", &BACKEND_CPU.to_string()]);
    match kind {
        NetBackend::Tessera => backend
            .arg(workspace_bin("vhost-user-net"))
            .arg("--socket")
            .arg(socket)
            .args(["--tap", "tap0", "--queues", &queues.to_string()])
            .args(["--queue-size", &queue_size.to_string()]),
        NetBackend::CloudHypervisor(bin) => {
            let (ip, mask) = tap_address(netns)?;
            backend.arg(bin).arg("--net-backend").arg(format!(
                "ip={ip},mask={mask},socket={},num_queues={queues},queue_size={queue_size},tap=tap0",
                socket.display()
            ))
        }
    };
    let backend = Running::spawn(backend);
    if !tessera_tests::wait_for_path(socket, Duration::from_secs(10)) {
        return Err(format!(
            "the backend never listened\n{}",
            backend.finish().describe()
        ));
    }
    Ok(backend)
}

/// Waits up to 5 s for the backend to exit (its frontend has hung up) and
/// fails if seccomp killed it.
pub(crate) fn finish_backend(mut backend: Running) -> Result<tessera_tests::RunOutput, String> {
    backend.wait_until(Duration::from_secs(5), |_, _| false);
    let backend = backend.finish();
    let signal = backend.status.and_then(|s| s.signal());
    if signal == Some(libc::SIGSYS) {
        return Err(format!(
            "the backend died of SIGSYS (see dmesg | grep type=1326)\n{}",
            backend.describe()
        ));
    }
    Ok(backend)
}

/// The figures of one window.
struct Sample {
    pps: f64,
    gbit_per_s: f64,
    cpu_us_per_packet: f64,
    cpu_s_per_gib: f64,
    /// Backend CPU seconds per second: near 1, the backend is the bottleneck.
    cpu_busy: f64,
    tap_tx_dropped_per_s: f64,
    offered_pps: f64,
}

/// One run: a fresh backend and testpmd in `mode` ("txonly": guest to
/// TAP; "rxonly": TAP to guest) with `len`-byte frames.
fn run_once(
    netns: &Netns,
    dir: &Path,
    mode: &str,
    len: usize,
    kind: &NetBackend,
) -> Result<Sample, String> {
    let socket = dir.join(format!("net-{mode}-{len}.sock"));
    let backend = start_backend(netns, &socket, 2, QUEUE_SIZE, kind)?;
    // `ip netns exec` and `taskset` exec, so this is the backend's pid.
    let pid = backend.pid();

    let mut testpmd = Command::new("dpdk-testpmd");
    testpmd
        .arg(format!("--lcores=0@{FRONTEND_CPU},1@{FRONTEND_CPU}"))
        .args([
            "--no-huge",
            "-m",
            "512",
            "--no-pci",
            "--single-file-segments",
        ])
        .arg(format!(
            "--file-prefix=tessera-bench-{}",
            std::process::id()
        ))
        .arg(format!(
            "--vdev=net_virtio_user0,path={},queues=1,queue_size={QUEUE_SIZE}",
            socket.display()
        ))
        .arg("--")
        .args([
            "--total-num-mbufs=16384",
            "--auto-start",
            "--stats-period=1",
        ])
        .arg(format!("--forward-mode={mode}"))
        .arg(format!("--txpkts={len}"));
    let mut testpmd = Running::spawn(testpmd);
    let exited = testpmd.wait_until(Duration::from_secs(30), |out, _| {
        out.contains("Port statistics")
    });
    if exited {
        return Err(format!(
            "testpmd exited\n{}\n{}",
            testpmd.finish().describe(),
            backend.finish().describe()
        ));
    }

    let stop = Arc::new(AtomicBool::new(false));
    let sending = (mode == "rxonly").then(|| sender(netns.name(), len, FRONTEND_CPU, stop.clone()));
    std::thread::sleep(WARM_UP);

    let (t0, c0, cpu0) = (Instant::now(), tap_counters(netns), cpu_seconds(pid));
    std::thread::sleep(WINDOW);
    let (c1, cpu1, t1) = (tap_counters(netns), cpu_seconds(pid), Instant::now());
    let seconds = (t1 - t0).as_secs_f64();

    stop.store(true, Ordering::Relaxed);
    let sender_result = sending.map(|h| h.join().unwrap_or_else(|_| Err("panicked".into())));
    // SIGINT lets testpmd stop its port and remove its runtime files.
    // SAFETY: kill on a child we spawned and have not reaped.
    unsafe { libc::kill(testpmd.pid() as i32, libc::SIGINT) };
    testpmd.wait_until(Duration::from_secs(15), |_, _| false);
    let testpmd = testpmd.finish();
    let backend = finish_backend(backend)?;
    if let Some(Err(err)) = sender_result {
        return Err(format!("the sender failed: {err}"));
    }

    let (packets, bytes) = if mode == "txonly" {
        (c1.rx_packets - c0.rx_packets, c1.rx_bytes - c0.rx_bytes)
    } else {
        (c1.tx_packets - c0.tx_packets, c1.tx_bytes - c0.tx_bytes)
    };
    if packets <= 0.0 {
        return Err(format!(
            "no frames moved\n{}\n{}",
            testpmd.describe(),
            backend.describe()
        ));
    }
    let cpu = cpu1 - cpu0;
    Ok(Sample {
        pps: packets / seconds,
        gbit_per_s: bytes * 8.0 / seconds / 1e9,
        cpu_us_per_packet: cpu * 1e6 / packets,
        cpu_s_per_gib: cpu / (bytes / f64::from(1u32 << 30)),
        cpu_busy: cpu / seconds,
        tap_tx_dropped_per_s: (c1.tx_dropped - c0.tx_dropped) / seconds,
        offered_pps: (c1.tx_packets + c1.tx_dropped - c0.tx_packets - c0.tx_dropped) / seconds,
    })
}

/// One cell: `runs` runs per backend, the backends taking turns.
/// Tessera's figures are at the top level; each other backend's are
/// under its name, with Tessera's medians over its.
fn cell(
    netns: &Netns,
    dir: &Path,
    mode: &str,
    len: usize,
    runs: usize,
    backends: &[NetBackend],
) -> Value {
    let mut samples: Vec<Vec<Sample>> = backends.iter().map(|_| Vec::new()).collect();
    let mut failures: Vec<Vec<String>> = backends.iter().map(|_| Vec::new()).collect();
    for i in 0..runs {
        for k in 0..backends.len() {
            let at = (i + k) % backends.len();
            let name = backends[at].name();
            match run_once(netns, dir, mode, len, &backends[at]) {
                Ok(s) => {
                    eprintln!(
                        "{name} {mode} {len} B run {}/{runs}: {:.0} pps, {:.2} Gbit/s, {:.2} us CPU/packet",
                        i + 1,
                        s.pps,
                        s.gbit_per_s,
                        s.cpu_us_per_packet
                    );
                    samples[at].push(s);
                }
                Err(err) => {
                    eprintln!("{name} {mode} {len} B run {}/{runs} failed: {err}", i + 1);
                    failures[at].push(err.lines().next().unwrap_or("").to_string());
                }
            }
        }
    }
    let mut out = json!({
        "direction": if mode == "txonly" { "guest to TAP" } else { "TAP to guest" },
        "testpmd_forward_mode": mode,
        "frame_bytes": len,
    });
    for (at, kind) in backends.iter().enumerate() {
        add_figures(&mut out, kind, figures(mode, &samples[at], &failures[at]));
    }
    out
}

/// Puts one backend's figures into a cell: Tessera's at the top level,
/// another backend's under its name, with Tessera's medians over its.
pub(crate) fn add_figures(cell: &mut Value, kind: &NetBackend, figures: Value) {
    match kind {
        NetBackend::Tessera => {
            if let (Some(cell), Value::Object(figures)) = (cell.as_object_mut(), figures) {
                cell.extend(figures);
            }
        }
        _ => {
            cell[format!("tessera_over_{}", kind.name().replace('-', "_"))] =
                ratios(cell, &figures);
            cell[kind.name()] = figures;
        }
    }
}

/// Tessera's medians over a peer's: packets per second (above 1: ours is
/// faster) and backend CPU per packet (below 1: ours uses less).
fn ratios(ours: &Value, theirs: &Value) -> Value {
    let ratio = |key: &str| median(&ours[key]) / median(&theirs[key]);
    json!({
        "packets_per_second": ratio("packets_per_second"),
        "backend_cpu_us_per_packet": ratio("backend_cpu_us_per_packet"),
    })
}

/// One backend's figures in a cell.
fn figures(mode: &str, samples: &[Sample], failures: &[String]) -> Value {
    let mut out = json!({
        "runs": samples.len(),
        "failed_runs": failures,
    });
    if samples.is_empty() {
        return out;
    }
    let pick = |f: fn(&Sample) -> f64| summary(samples.iter().map(f).collect());
    out["packets_per_second"] = pick(|s| s.pps);
    out["gbit_per_second"] = pick(|s| s.gbit_per_s);
    out["backend_cpu_us_per_packet"] = pick(|s| s.cpu_us_per_packet);
    out["backend_cpu_seconds_per_gib"] = pick(|s| s.cpu_s_per_gib);
    out["backend_cpu_busy_fraction"] = pick(|s| s.cpu_busy);
    if mode == "rxonly" {
        out["offered_packets_per_second"] = pick(|s| s.offered_pps);
        out["tap_tx_dropped_per_second"] = pick(|s| s.tap_tx_dropped_per_s);
    }
    out
}

/// iperf3 from namespace `a` to `b` (client on CPU 0, server on CPU 1).
fn iperf3(a: &Netns, b: &Netns, args: &[&str]) -> Option<Value> {
    let mut server = b.command("taskset");
    server.args(["-c", "1", "iperf3", "-s", "-1", "-B", "10.80.0.2"]);
    let server = Running::spawn(server);
    std::thread::sleep(Duration::from_millis(300));
    let out = a
        .command("taskset")
        .args(["-c", "0", "iperf3", "-J", "-c", "10.80.0.2", "-t"])
        .arg(WINDOW.as_secs().to_string())
        .args(args)
        .output()
        .ok()?;
    drop(server.finish());
    serde_json::from_slice(&out.stdout).ok()
}

fn host_baseline(runs: usize) -> Value {
    if !on_path("iperf3") {
        eprintln!("host baseline skipped: iperf3 is not installed (apt-get install iperf3)");
        return json!({"skipped": "iperf3 is not installed"});
    }
    let a = Netns::new("dpdk-a");
    let b = Netns::new("dpdk-b");
    a.ip(&[
        "link", "add", "veth0", "type", "veth", "peer", "name", "veth1",
    ]);
    a.ip(&["link", "set", "veth1", "netns", b.name()]);
    a.ip(&["addr", "add", "10.80.0.1/24", "dev", "veth0"]);
    b.ip(&["addr", "add", "10.80.0.2/24", "dev", "veth1"]);
    a.ip(&["link", "set", "veth0", "up"]);
    b.ip(&["link", "set", "veth1", "up"]);
    std::thread::sleep(Duration::from_millis(500));

    let mut tcp = Vec::new();
    for _ in 0..runs {
        if let Some(r) = iperf3(&a, &b, &[]) {
            if let Some(bps) = r["end"]["sum_received"]["bits_per_second"].as_f64() {
                tcp.push(bps / 1e9);
            }
        }
    }
    let mut out = json!({
        "setup": "iperf3 over a veth pair between two namespaces, client CPU 0, server CPU 1",
        "tcp_gbit_per_second": summary(tcp),
    });
    for len in FRAME_LENS {
        let payload = (len - 14 - 20 - 8).to_string();
        let (mut pps, mut gbit) = (Vec::new(), Vec::new());
        for _ in 0..runs {
            let Some(r) = iperf3(&a, &b, &["-u", "-b", "0", "-l", &payload]) else {
                continue;
            };
            let sum = &r["end"]["sum"];
            let (Some(p), Some(lost), Some(s)) = (
                sum["packets"].as_f64(),
                sum["lost_packets"].as_f64(),
                sum["seconds"].as_f64(),
            ) else {
                continue;
            };
            let received = (p - lost) / s;
            pps.push(received);
            gbit.push(received * len as f64 * 8.0 / 1e9);
        }
        out[format!("udp_{len}_byte_frames")] = json!({
            "received_packets_per_second": summary(pps),
            "gbit_per_second": summary(gbit),
        });
    }
    out
}

fn median(v: &Value) -> f64 {
    v["median"].as_f64().unwrap_or(f64::NAN)
}

/// The whole DPDK virtio-user report.
pub fn bench_net_dpdk(runs: usize) -> Value {
    let load_before = load_average();
    let mut report = json!({
        "machine": super::machine(),
        "runs": runs,
        "window_seconds": WINDOW.as_secs(),
        "frontend": format!(
            "dpdk-testpmd, virtio-user PMD, 1 queue pair, queue size {QUEUE_SIZE}, --no-huge, CPU {FRONTEND_CPU}"
        ),
        "backend": format!("vhost-user-net --queues 2 --queue-size {QUEUE_SIZE}, CPU {BACKEND_CPU}"),
        "tap_txqueuelen": TAP_TXQUEUELEN,
        "rx_sender": format!(
            "AF_PACKET sendmmsg of 64 frames, qdisc bypass, CPU {FRONTEND_CPU} (shared with testpmd)"
        ),
        "load_average_before": load_before,
    });
    if on_path("dpdk-testpmd") {
        let netns = Netns::with_tap("dpdk", "10.81.0.1/24");
        // The sender and testpmd share CPU 0 and run in turns: the TAP must
        // hold what the sender writes while testpmd is off the CPU.
        let txqueuelen = TAP_TXQUEUELEN.to_string();
        netns.ip(&["link", "set", "tap0", "txqueuelen", &txqueuelen]);
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cells = Vec::new();
        let backends = NetBackend::all();
        // TESSERA_BENCH_CASES=text runs only the cells ("rxonly-64", ...)
        // whose name has it.
        let only = std::env::var("TESSERA_BENCH_CASES").ok();
        for mode in ["txonly", "rxonly"] {
            for len in FRAME_LENS {
                let name = format!("{mode}-{len}");
                if only.as_ref().is_some_and(|o| !name.contains(o.as_str())) {
                    continue;
                }
                let c = cell(&netns, dir.path(), mode, len, runs, &backends);
                eprintln!("{c}");
                cells.push(c);
            }
        }
        report["tessera_dpdk_virtio_user"] = json!(cells);
        // testpmd leaves its runtime directory behind.
        let _ = std::fs::remove_dir_all(format!(
            "/var/run/dpdk/tessera-bench-{}",
            std::process::id()
        ));
    } else {
        eprintln!(
            "DPDK virtio-user part skipped: dpdk-testpmd is not installed (apt-get install dpdk)"
        );
        report["tessera_dpdk_virtio_user"] = json!({"skipped": "dpdk-testpmd is not installed"});
    }
    let host = host_baseline(runs);
    if let Some(cells) = report["tessera_dpdk_virtio_user"].as_array() {
        let mut ratios = serde_json::Map::new();
        for c in cells {
            let (Some(mode), Some(len)) = (
                c["testpmd_forward_mode"].as_str(),
                c["frame_bytes"].as_u64(),
            ) else {
                continue;
            };
            let ours = median(&c["packets_per_second"]);
            let base =
                median(&host[format!("udp_{len}_byte_frames")]["received_packets_per_second"]);
            ratios.insert(format!("{mode}_{len}"), json!(ours / base));
        }
        report["tessera_pps_vs_host_udp_pps"] = Value::Object(ratios);
    }
    report["host_veth_iperf3_baseline"] = host;
    report["load_average_after"] = json!(load_average());
    report
}

/// Binds the AF_PACKET socket `sock` to `tap0` of the calling thread's
/// network namespace, for protocol `proto` (network byte order).
pub(crate) fn bind_to_tap0(sock: &impl AsRawFd, proto: u16) -> Result<(), String> {
    // SAFETY: a NUL-terminated name.
    let ifindex = unsafe { libc::if_nametoindex(c"tap0".as_ptr()) };
    if ifindex == 0 {
        return Err("no tap0 in the namespace".into());
    }
    // SAFETY: an all-zero sockaddr_ll is valid; the fields are set below.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = proto;
    addr.sll_ifindex = ifindex as i32;
    // SAFETY: bind reads one sockaddr_ll of the given size.
    let rc = unsafe {
        libc::bind(
            sock.as_raw_fd(),
            (&addr as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if rc != 0 {
        return Err(format!("bind: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}
