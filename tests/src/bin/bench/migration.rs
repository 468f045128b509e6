//! Live migration: the probe guest (1 vCPU, ticking every 100 ms) moves
//! from one process to a fresh one, for 128 MiB and 1 GiB guests, idle and
//! with `probe.dirty` at 16 and 64 MiB/s, over a Unix socket and TCP on
//! loopback. Per run:
//! - `downtime_ms`: the guest's pause as the guest's console shows it:
//!   the gap between the last tick line the source printed and the first
//!   the destination printed, less the 100 ms tick (guest time stands
//!   still while paused, so the gap is one tick plus the pause); the
//!   harness polls both consoles every millisecond;
//! - `total_ms`: the send call until the destination runs the guest (its
//!   receive call returns);
//! - `mib_sent` and `rounds` (Tessera: the source's log lines).
//!
//! Tessera is asked for `max_downtime_ms: 50`.
//!
//! Cloud Hypervisor (`vm.send-migration` / `vm.receive-migration`) is
//! tried beside it in every cell; on this host its source fails to save
//! the vCPU state (KVM_GET_NESTED_STATE is refused under kvm_pvm), and the
//! error is recorded in place of figures.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tessera_tests::api::ApiClient;
use tessera_tests::{guest_artifacts, Running};

use crate::peers::{peer_bin, Vmm};
use crate::{machine, summary};

/// The guest sizes measured; `TESSERA_BENCH_MIGRATION_SIZES` (MiB, comma
/// separated) picks others (the nested run takes 128 only: L1 has 2 GiB).
const SIZES_MIB: [usize; 2] = [128, 1024];
const DIRTY_MIB_S: [u32; 3] = [0, 16, 64];
const DEADLINE: Duration = Duration::from_secs(90);
const TICK: Duration = Duration::from_millis(100);
/// Tessera's `max_downtime_ms` here (its default is 300, QEMU's too).
const MAX_DOWNTIME_MS: u64 = 50;

/// One migration's figures.
struct Moved {
    downtime_ms: f64,
    total_ms: f64,
    mib_sent: Option<f64>,
    rounds: Option<f64>,
}

pub(crate) fn bench_migration(runs: usize) -> Value {
    let mut vmms = vec![Vmm::Tessera];
    vmms.extend(peer_bin("cloud-hypervisor").map(Vmm::CloudHypervisor));
    let mut cells = serde_json::Map::new();
    let sizes: Vec<usize> = match std::env::var("TESSERA_BENCH_MIGRATION_SIZES") {
        Ok(list) => list
            .split(',')
            .map(|s| {
                s.trim()
                    .parse()
                    .expect("TESSERA_BENCH_MIGRATION_SIZES: MiB, comma separated")
            })
            .collect(),
        Err(_) => SIZES_MIB.to_vec(),
    };
    for mem in sizes {
        for dirty in DIRTY_MIB_S {
            for transport in ["unix", "tcp"] {
                let name = format!("{mem}_mib_dirty_{dirty}_{transport}");
                let mut per_vmm = serde_json::Map::new();
                for vmm in &vmms {
                    per_vmm.insert(vmm.name().into(), cell(vmm, mem, dirty, transport, runs));
                }
                eprintln!("migration {name}: {}", Value::Object(per_vmm.clone()));
                cells.insert(name, Value::Object(per_vmm));
            }
        }
    }
    json!({
        "machine": machine(),
        "runs": runs,
        "guest": "probe guest, 1 vCPU, ticking (probe.ticks=0), probe.dirty=<MiB/s>",
        "cells": cells,
    })
}

/// `runs` migrations of one kind, or the first failure.
fn cell(vmm: &Vmm, mem: usize, dirty: u32, transport: &str, runs: usize) -> Value {
    let mut downtime = Vec::new();
    let mut total = Vec::new();
    let mut sent = Vec::new();
    let mut rounds = Vec::new();
    for run in 0..runs {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = 30000 + (std::process::id() as usize % 10000) + run;
        let url = match transport {
            "unix" => format!("unix:{}", dir.path().join("migration.sock").display()),
            _ => format!("tcp:127.0.0.1:{port}"),
        };
        match migrate(vmm, mem, dirty, &url, dir.path()) {
            Ok(moved) => {
                downtime.push(moved.downtime_ms);
                total.push(moved.total_ms);
                sent.extend(moved.mib_sent);
                rounds.extend(moved.rounds);
            }
            Err(err) => return json!({ "error": err }),
        }
    }
    let mut figures = json!({
        "downtime_ms": summary(downtime),
        "total_ms": summary(total),
    });
    if !sent.is_empty() {
        figures["mib_sent"] = summary(sent);
        figures["rounds"] = summary(rounds);
    }
    figures
}

fn boot_args(dirty: u32) -> String {
    match dirty {
        0 => "console=ttyS0 probe.ticks=0".into(),
        rate => format!("console=ttyS0 probe.ticks=0 probe.dirty={rate}"),
    }
}

/// Starts the source, running the probe.
fn start_source(vmm: &Vmm, mem: usize, dirty: u32, dir: &Path) -> Result<Running, String> {
    let socket = dir.join("source.sock");
    match vmm {
        Vmm::CloudHypervisor(bin) => {
            let mut command = Command::new(bin);
            command
                .args(["--seccomp", "false", "--api-socket"])
                .arg(format!("path={}", socket.display()))
                .arg("--kernel")
                .arg(guest_artifacts().probe())
                .args(["--cmdline", &boot_args(dirty)])
                .args(["--memory", &format!("size={mem}M")])
                .args(["--cpus", "boot=1,nested=off"])
                .args(["--serial", "tty", "--console", "off"]);
            Ok(Running::spawn(command))
        }
        _ => {
            let vm = Running::spawn(vmm.api_command(&socket));
            let mut c = ApiClient::connect(&socket);
            for (path, body) in [
                (
                    "/boot-source",
                    json!({"kernel_image_path": guest_artifacts().probe(),
                           "boot_args": boot_args(dirty)}),
                ),
                (
                    "/machine-config",
                    json!({"vcpu_count": 1, "mem_size_mib": mem}),
                ),
                ("/actions", json!({"action_type": "InstanceStart"})),
            ] {
                let r = c.put(path, &body.to_string());
                if r.status != 204 {
                    return Err(format!("PUT {path}: {}", r.body));
                }
            }
            Ok(vm)
        }
    }
}

/// The two calls of a migration, for `vmm`: (receive path, body), (send
/// path, body).
fn calls(vmm: &Vmm, url: &str) -> ((&'static str, Value), (&'static str, Value)) {
    match vmm {
        Vmm::CloudHypervisor(_) => (
            ("/api/v1/vm.receive-migration", json!({"receiver_url": url})),
            ("/api/v1/vm.send-migration", json!({"destination_url": url})),
        ),
        _ => (
            ("/migration/receive", json!({"listen": url})),
            (
                "/migration/send",
                json!({"destination": url, "max_downtime_ms": MAX_DOWNTIME_MS}),
            ),
        ),
    }
}

/// Tick lines seen so far and when each arrived.
#[derive(Default)]
struct TickTimes {
    seen: usize,
    last: Option<Instant>,
    first: Option<Instant>,
}

impl TickTimes {
    fn watch(&mut self, out: &str) {
        let ticks = out
            .split_inclusive('\n')
            .filter(|l| l.ends_with('\n') && l.starts_with("probe.tick="))
            .count();
        if ticks > self.seen {
            self.seen = ticks;
            let now = Instant::now();
            self.last = Some(now);
            self.first.get_or_insert(now);
        }
    }
}

fn migrate(vmm: &Vmm, mem: usize, dirty: u32, url: &str, dir: &Path) -> Result<Moved, String> {
    let mut source = start_source(vmm, mem, dirty, dir)?;
    if source.wait_until(DEADLINE, |out, _| out.contains("probe.tick=3\n")) {
        return Err(format!("the source ended: {}", source.stderr()));
    }
    let dest_socket = dir.join("destination.sock");
    let destination = Running::spawn(vmm.api_command(&dest_socket));
    let mut ping = ApiClient::connect(&dest_socket);
    drop(ping.get(vmm.ping_path()));
    let ((receive_path, receive_body), (send_path, send_body)) = calls(vmm, url);
    let receiving = std::thread::spawn({
        let socket = dest_socket.clone();
        move || {
            let r = ApiClient::connect(&socket).put(receive_path, &receive_body.to_string());
            (r.status, r.body)
        }
    });
    match url.strip_prefix("unix:") {
        Some(path) => {
            if !tessera_tests::wait_for_path(Path::new(path), Duration::from_secs(10)) {
                return Err("the destination never listened".into());
            }
        }
        None => std::thread::sleep(Duration::from_millis(300)),
    }
    let mut before = TickTimes::default();
    before.watch(&source.stdout());
    let started = Instant::now();
    let r = ApiClient::connect(&dir.join("source.sock")).put(send_path, &send_body.to_string());
    if r.status != 204 {
        return Err(format!("send: {}", r.body));
    }
    let mut after = TickTimes::default();
    let deadline = Instant::now() + DEADLINE;
    let mut received_at = None;
    loop {
        before.watch(&source.stdout());
        after.watch(&destination.stdout());
        if receiving.is_finished() {
            received_at.get_or_insert_with(Instant::now);
        }
        let failed = received_at.is_some_and(|t| after.seen == 0 && t.elapsed() > TICK * 30);
        if after.seen >= 2 || failed || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let total_ms = received_at.map_or(f64::NAN, |t| (t - started).as_secs_f64() * 1e3);
    let (status, body) = receiving
        .join()
        .map_err(|_| "the receive thread panicked")?;
    let src_log = source.stderr();
    drop(source.finish());
    drop(destination.finish());
    if !(200..300).contains(&status) {
        let why = src_log
            .lines()
            .find(|l| l.contains("Migration failed") || l.contains("migration failed"))
            .unwrap_or(body.as_str());
        return Err(format!("receive answered {status}: {}", why.trim()));
    }
    let (Some(last), Some(first)) = (before.last, after.first) else {
        return Err("no tick on one side".into());
    };
    let gap = first.saturating_duration_since(last);
    let (mib_sent, rounds) = round_lines(&src_log);
    Ok(Moved {
        downtime_ms: gap.saturating_sub(TICK).as_secs_f64() * 1e3,
        total_ms,
        mib_sent,
        rounds,
    })
}

/// MiB sent and rounds, from Tessera's last log line of a migration
/// ("migration done: <MiB> MiB in <n> rounds, ...").
fn round_lines(log: &str) -> (Option<f64>, Option<f64>) {
    let Some(done) = log.lines().find_map(|l| l.split_once("migration done: ")) else {
        return (None, None);
    };
    let mut words = done.1.split_whitespace();
    let mib = words.next().and_then(|w| w.parse().ok());
    let rounds = words.nth(2).and_then(|w| w.parse().ok());
    (mib, rounds)
}
