//! Network figures: ICMP echo through `tessera`, our `vhost-user-net` and a
//! TAP to the probe guest (which answers from a polling loop), against the
//! same flood over a veth pair between two namespaces on the host.
//!
//! Each run is one `ping -f -c PINGS -s 56`: packets per second counts
//! echo round trips (a request to the guest and a reply back), and the
//! backend's CPU time per round trip comes from /proc/PID/stat.

use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};
use tessera_tests::netns::Netns;
use tessera_tests::{guest_artifacts, workspace_bin, Running, VmConfig};

use super::summary;

const PINGS: u32 = 5000;
const GUEST_IP: &str = "10.78.0.2";

/// (round trips per second, average RTT us) of one flood from `netns`.
fn flood(netns: &Netns, target: &str) -> Option<(f64, f64)> {
    flood_of(netns, target, PINGS)
}

/// (round trips per second, average RTT us) of a flood of `pings` echo
/// requests from `netns`; none if any went unanswered.
pub(crate) fn flood_of(netns: &Netns, target: &str, pings: u32) -> Option<(f64, f64)> {
    let out = netns
        .command("ping")
        .args(["-q", "-f", "-W", "1", "-c", &pings.to_string(), target])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    // "5000 packets transmitted, 5000 received, 0% packet loss, time 2087ms"
    let stats = text.lines().find(|l| l.contains("packets transmitted"))?;
    let received: f64 = stats.split(", ").nth(1)?.split(' ').next()?.parse().ok()?;
    let ms: f64 = stats
        .rsplit("time ")
        .next()?
        .trim_end_matches("ms")
        .parse()
        .ok()?;
    // "rtt min/avg/max/mdev = 0.011/0.013/0.086/0.003 ms, ipg/ewma ..."
    let rtt = text.lines().find(|l| l.starts_with("rtt"))?;
    let avg_ms: f64 = rtt.split(" = ").nth(1)?.split('/').nth(1)?.parse().ok()?;
    (received == f64::from(pings)).then_some((received / (ms / 1000.0), avg_ms * 1000.0))
}

/// utime + stime of `pid`, in microseconds.
fn cpu_us(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i)?.parse::<f64>().ok())
        .sum();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks * 1e6 / hz
}

fn through_tessera(runs: usize) -> Value {
    let netns = Netns::with_tap("bench", "10.78.0.1/24");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = VmConfig::new(
        guest_artifacts().probe(),
        &format!("console=ttyS0 probe.net={GUEST_IP}/24 probe.net_serve_ms=600000"),
    )
    .mem_mib(256)
    .to_json();
    config["network-interfaces"] =
        json!([{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:0a:4e:00:02"}]);
    let path = dir.path().join("vm.json");
    std::fs::write(&path, config.to_string()).expect("config");
    let mut command = netns.command(workspace_bin("tessera").to_str().expect("path"));
    command.arg("--no-api").arg("--config-file").arg(&path);
    let mut vm = Running::spawn(command);
    vm.wait_until(Duration::from_secs(60), |out, _| {
        out.contains("probe.net0=up")
    });
    let backend = tessera_tests::descendant_pid(vm.pid(), "vhost-user-net").expect("the backend");
    let (mut rate, mut rtt, mut cpu) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        let before = cpu_us(backend);
        let Some((r, t)) = flood(&netns, GUEST_IP) else {
            eprintln!("a flood through tessera lost replies; run skipped");
            continue;
        };
        cpu.push((cpu_us(backend) - before) / f64::from(PINGS));
        rate.push(r);
        rtt.push(t);
    }
    drop(vm.finish());
    json!({
        "round_trips_per_second": summary(rate),
        "avg_rtt_us": summary(rtt),
        "backend_cpu_us_per_round_trip": summary(cpu),
    })
}

fn host_veth(runs: usize) -> Value {
    let a = Netns::new("veth-a");
    let b = Netns::new("veth-b");
    a.ip(&[
        "link", "add", "veth0", "type", "veth", "peer", "name", "veth1",
    ]);
    a.ip(&["link", "set", "veth1", "netns", b.name()]);
    a.ip(&["addr", "add", "10.79.0.1/24", "dev", "veth0"]);
    b.ip(&["addr", "add", "10.79.0.2/24", "dev", "veth1"]);
    a.ip(&["link", "set", "veth0", "up"]);
    b.ip(&["link", "set", "veth1", "up"]);
    let (mut rate, mut rtt) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        if let Some((r, t)) = flood(&a, "10.79.0.2") {
            rate.push(r);
            rtt.push(t);
        }
    }
    json!({"round_trips_per_second": summary(rate), "avg_rtt_us": summary(rtt)})
}

/// The whole network report.
pub fn bench_net(runs: usize) -> Value {
    if Command::new("ping").arg("-V").output().is_err() {
        return json!({"skipped": "ping (iputils-ping) is not installed"});
    }
    let ours = through_tessera(runs);
    let host = host_veth(runs);
    let ratio = ours["round_trips_per_second"]["median"]
        .as_f64()
        .unwrap_or(0.0)
        / host["round_trips_per_second"]["median"]
            .as_f64()
            .unwrap_or(1.0);
    json!({
        "pings_per_run": PINGS,
        "runs": runs,
        "tessera_probe_kvm_pvm": ours,
        "host_veth_baseline": host,
        "tessera_vs_host": ratio,
    })
}
