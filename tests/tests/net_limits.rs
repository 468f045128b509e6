//! An interface's RX and TX rate limiters, enforced by its
//! `vhost-user-net` backend. The host floods the probe guest with pings
//! (`ping -f -l 16 -s 1000` inside the test's network namespace, faster
//! than the limits); the backend's frame counters, read over three seconds
//! of flood, must grow at the configured rate within 10%.
//! `PATCH /network-interfaces/{id}` changes a running interface's limit.

use std::time::{Duration, Instant};

use serde_json::json;
use tessera_tests::api::{ApiClient, ApiVm};
use tessera_tests::guest_artifacts;
use tessera_tests::netns::Netns;

const DEADLINE: Duration = Duration::from_secs(120);
const GUEST_IP: &str = "10.78.0.2";
const GUEST_MAC: &str = "06:00:0a:4e:00:02";
/// ICMP data in each echo request.
const PING_DATA: u64 = 1000;
/// What the limiter charges for one echo request or reply: the frame
/// (Ethernet 14, IPv4 20, ICMP 8 and the data) and its virtio-net header.
const FRAME: u64 = 12 + 14 + 20 + 8 + PING_DATA;
/// How long a rate is measured.
const MEASURE: Duration = Duration::from_secs(3);

/// A bandwidth bucket of `frames` echo frames per 100 ms, starting full.
fn frames_per_100ms(frames: u64) -> serde_json::Value {
    json!({"bandwidth": {"size": frames * FRAME, "refill_time": 100}})
}

/// Boots the probe serving `tap0` of `netns`, with the interface's
/// `limits` (`rx_rate_limiter` and `tx_rate_limiter` fields), and waits
/// until its driver is up.
fn boot(netns: &Netns, limits: serde_json::Value) -> (ApiVm, ApiClient) {
    let mut api = ApiVm::start_in(netns, &[]);
    let mut c = api.client();
    c.put_ok(
        "/boot-source",
        json!({"kernel_image_path": guest_artifacts().probe(),
               "boot_args": format!("console=ttyS0 probe.net={GUEST_IP}/24 probe.net_serve_ms=100000")}),
    );
    let mut iface = json!({"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": GUEST_MAC});
    for (key, value) in limits.as_object().expect("an object") {
        iface[key] = value.clone();
    }
    c.put_ok("/network-interfaces/eth0", iface);
    c.put_ok(
        "/metrics",
        json!({"metrics_path": api.dir().join("metrics.json")}),
    );
    c.put_ok("/actions", json!({"action_type": "InstanceStart"}));
    api.vm.wait_until(DEADLINE, |out, _| {
        out.split_once("probe.net0=")
            .is_some_and(|(_, rest)| rest.contains('\n'))
    });
    assert!(
        api.vm.stdout().contains("probe.net0=up"),
        "{}\n{}",
        api.vm.stdout(),
        api.vm.stderr()
    );
    // The host learns the guest's MAC before the measured floods.
    let out = ping(netns, &["-c", "1", "-W", "5"]);
    assert!(out.contains("1 received"), "{out}\n{}", api.vm.stderr());
    (api, c)
}

fn ping(netns: &Netns, args: &[&str]) -> String {
    let out = netns
        .command("ping")
        .args(args)
        .arg(GUEST_IP)
        .output()
        .expect("run ping");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The rate, in frames per second, at which the backend's `counter`
/// (`rx_packets_count` or `tx_packets_count`) grows while the host floods
/// the guest: measured over [`MEASURE`], once a first second of flood has
/// spent what the limiter's bucket held.
fn flood_rate(netns: &Netns, api: &ApiVm, c: &mut ApiClient, counter: &str) -> f64 {
    let seconds = (MEASURE.as_secs() + 2).to_string();
    let data = PING_DATA.to_string();
    let mut flood = netns
        .command("ping")
        .args([
            "-q", "-f", "-l", "16", "-s", &data, "-w", &seconds, GUEST_IP,
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("run ping");
    std::thread::sleep(Duration::from_secs(1));
    let before = net_counter(api, c, counter);
    let start = Instant::now();
    std::thread::sleep(MEASURE);
    let after = net_counter(api, c, counter);
    let rate = (after - before) as f64 / start.elapsed().as_secs_f64();
    flood.wait().expect("ping ends");
    rate
}

/// Asserts that `rate` is `per_second` frames per second within 10%.
fn assert_rate(rate: f64, per_second: f64, what: &str) {
    eprintln!("{what}: {rate:.1} frames/s");
    assert!(
        (rate - per_second).abs() <= per_second / 10.0,
        "{what}: {rate:.1} frames/s where the limit is {per_second} (10%)"
    );
}

/// The interface's backend counter `counter`, summed over the metrics
/// lines so far (after a flush).
fn net_counter(api: &ApiVm, c: &mut ApiClient, counter: &str) -> u64 {
    api.flushed_counter(c, "net_eth0", counter)
}

#[test]
fn an_rx_bandwidth_limit_holds_the_frames_to_the_guest_to_its_rate() {
    let netns = Netns::with_tap("nlrx", "10.78.0.1/24");
    let (api, mut c) = boot(&netns, json!({"rx_rate_limiter": frames_per_100ms(5)}));
    let rate = flood_rate(&netns, &api, &mut c, "rx_packets_count");
    assert_rate(rate, 50.0, "RX at 50 frames/s");
    assert!(net_counter(&api, &mut c, "rx_rate_limiter_throttled") > 0);
    assert!(net_counter(&api, &mut c, "rx_event_rate_limiter_count") > 0);
    assert_eq!(net_counter(&api, &mut c, "tx_rate_limiter_throttled"), 0);
}

#[test]
fn a_tx_ops_limit_holds_the_frames_from_the_guest_to_its_rate() {
    let netns = Netns::with_tap("nltx", "10.78.0.1/24");
    let (api, mut c) = boot(
        &netns,
        json!({"tx_rate_limiter": {"ops": {"size": 5, "refill_time": 100}}}),
    );
    let rate = flood_rate(&netns, &api, &mut c, "tx_packets_count");
    assert_rate(rate, 50.0, "TX at 50 frames/s");
    assert!(net_counter(&api, &mut c, "tx_rate_limiter_throttled") > 0);
    assert_eq!(net_counter(&api, &mut c, "rx_rate_limiter_throttled"), 0);
}

#[test]
fn a_patch_raises_and_lifts_the_limit_of_a_running_interface() {
    let netns = Netns::with_tap("nlpatch", "10.78.0.1/24");
    let (api, mut c) = boot(&netns, json!({"tx_rate_limiter": frames_per_100ms(5)}));
    let rate = flood_rate(&netns, &api, &mut c, "tx_packets_count");
    assert_rate(rate, 50.0, "TX at 50 frames/s");
    let r = c.patch(
        "/network-interfaces/eth0",
        &json!({"iface_id": "eth0", "tx_rate_limiter": frames_per_100ms(15)}).to_string(),
    );
    assert_eq!(r.status, 204, "{}", r.body);
    let rate = flood_rate(&netns, &api, &mut c, "tx_packets_count");
    assert_rate(rate, 150.0, "TX raised to 150 frames/s");
    let config = c.get("/vm/config").json();
    assert_eq!(
        config["network-interfaces"][0]["tx_rate_limiter"],
        frames_per_100ms(15)
    );
    // A zero-sized bucket limits nothing.
    let r = c.patch(
        "/network-interfaces/eth0",
        r#"{"iface_id": "eth0", "tx_rate_limiter": {"bandwidth": {"size": 0, "refill_time": 0}}}"#,
    );
    assert_eq!(r.status, 204, "{}", r.body);
    let rate = flood_rate(&netns, &api, &mut c, "tx_packets_count");
    eprintln!("TX unlimited: {rate:.1} frames/s");
    assert!(rate > 300.0, "TX unlimited: {rate:.1} frames/s");
    // An unknown interface is refused.
    let r = c.patch(
        "/network-interfaces/eth9",
        &json!({"iface_id": "eth9", "tx_rate_limiter": frames_per_100ms(1)}).to_string(),
    );
    assert_eq!(r.status, 400, "{}", r.body);
}
