//! Durability under `kill -9`: the probe guest journals numbered,
//! checksummed records to a drive (`probe.blk=journal`), flushing after
//! each round and printing `probe.journal=<n>` once records `0..n` are
//! flushed. At a random moment the VMM and the drive's backend are killed
//! with SIGKILL, in a random order; every record the last printed line
//! promised must then be in the host file, intact.
//!
//! Two backends: the page-cache one tessera starts for `path_on_host`, and
//! an external `vhost-user-blk --direct` (O_DIRECT) on a `socket` drive.
//! `TESSERA_DURABILITY_TRIALS` sets the trials per backend (default 100).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use serde_json::json;
use tessera_tests::journal::{first_bad_record, last_durable, SECTOR};
use tessera_tests::{guest_artifacts, workspace_bin, Running, VmConfig};

/// Records (sectors) the guest journals: 1 MiB, 128 rounds of 16.
const JOURNAL_MIB: u64 = 1;
/// Kills land uniformly in this window after tessera starts: from before
/// the guest boots to well into the journal.
const KILL_WINDOW_MS: u64 = 1500;

/// A small xorshift generator: the trials need varied timings, not
/// cryptographic quality; the seed is printed so a failure can be rerun.
struct Rng(u64);

impl Rng {
    fn from_clock() -> Self {
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
        Self(nanos | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[derive(Clone, Copy, Debug)]
enum Backend {
    /// Started by tessera for `path_on_host`; writes through the page cache.
    PageCache,
    /// An external `vhost-user-blk --direct` on a `socket` drive.
    Direct,
}

struct Trial {
    vm: Running,
    /// The external backend, when the test started it.
    external: Option<Running>,
    backend_pid: u32,
    disk: PathBuf,
    seed: u64,
}

fn start_trial(dir: &Path, kind: Backend, seed: u64) -> Trial {
    let disk = dir.join("journal.img");
    tessera_tests::sparse_file(&disk, JOURNAL_MIB << 20);
    let boot_args =
        format!("console=ttyS0 probe.blk=journal probe.blk_mib={JOURNAL_MIB} probe.seed={seed:#x}");
    let mut config = VmConfig::new(guest_artifacts().probe(), &boot_args)
        .mem_mib(128)
        .to_json();
    let socket = dir.join("blk.sock");
    let external = match kind {
        Backend::PageCache => {
            config["drives"] = json!([{"drive_id": "journal", "path_on_host": disk,
                                       "is_root_device": false, "is_read_only": false}]);
            None
        }
        Backend::Direct => {
            let mut command = Command::new(workspace_bin("vhost-user-blk"));
            command
                .arg("--socket")
                .arg(&socket)
                .arg("--path")
                .arg(&disk)
                .arg("--direct");
            let backend = Running::spawn(command);
            assert!(
                tessera_tests::wait_for_listener(&socket, Duration::from_secs(10)),
                "the O_DIRECT backend does not listen:\n{}",
                backend.stderr()
            );
            config["drives"] = json!([{"drive_id": "journal", "socket": socket,
                                       "is_root_device": false}]);
            Some(backend)
        }
    };
    let path = dir.join("vm.json");
    std::fs::write(&path, config.to_string()).unwrap();
    let mut command = Command::new(workspace_bin("tessera"));
    command.arg("--no-api").arg("--config-file").arg(&path);
    let vm = Running::spawn(command);
    let backend_pid = match &external {
        Some(backend) => backend.pid(),
        // A backend that replaces this one after its kill never writes:
        // it would first need the (killed) VMM's guest memory and rings.
        None => tessera_tests::descendant_pid(vm.pid(), "--serial journal")
            .expect("tessera starts the drive's backend"),
    };
    Trial {
        vm,
        external,
        backend_pid,
        disk,
        seed,
    }
}

/// Waits until process `pid` is gone (reaped), so that none of its I/O
/// can still land in the file.
fn wait_gone(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Path::new(&format!("/proc/{pid}")).exists() {
        assert!(
            Instant::now() < deadline,
            "process {pid} outlived SIGKILL by 10 s"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn kill(pid: u32) {
    // SAFETY: sends SIGKILL to a process this test started (or its VMM
    // did); a process that already ended is harmless to signal.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
}

fn journal_survives_kill_9(kind: Backend) {
    let trials: usize = std::env::var("TESSERA_DURABILITY_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let mut rng = Rng::from_clock();
    eprintln!("{kind:?}: {trials} trials, rng seed {:#x}", rng.0);
    let mut promised = Vec::new();
    for trial in 0..trials {
        let dir = tempfile::tempdir_in(std::env::temp_dir()).unwrap();
        let seed = rng.next();
        let mut run = start_trial(dir.path(), kind, seed);
        let delay = Duration::from_millis(rng.next() % KILL_WINDOW_MS);
        let started = Instant::now();
        run.vm.wait_until(delay, |_, _| false);
        let (first, second) = if rng.next().is_multiple_of(2) {
            (run.vm.pid(), run.backend_pid)
        } else {
            (run.backend_pid, run.vm.pid())
        };
        kill(first);
        kill(second);
        let backend = run.external.map(Running::finish);
        let vm = run.vm.finish();
        wait_gone(run.backend_pid);
        let durable = last_durable(&vm.stdout);
        if let Some((record, why)) = first_bad_record(&run.disk, durable, run.seed) {
            panic!(
                "{kind:?} trial {trial} (killed {:?} after start): record {record} of the {durable} \
                 promised durable is damaged: {why}\nVMM:\n{}\nbackend:\n{}",
                started.elapsed(),
                vm.describe(),
                backend.map(|b| b.describe()).unwrap_or_default()
            );
        }
        promised.push(durable);
    }
    promised.sort_unstable();
    let total = (JOURNAL_MIB << 20) / SECTOR as u64;
    let mid_journal = promised.iter().filter(|n| **n > 0 && **n < total).count();
    eprintln!(
        "{kind:?}: {trials} trials, every promised record intact; records promised per trial: \
         min {} median {} max {} of {total}; {mid_journal} kills landed mid-journal",
        promised[0],
        promised[promised.len() / 2],
        promised[promised.len() - 1]
    );
    assert!(
        mid_journal * 2 >= trials,
        "fewer than half the kills landed mid-journal ({mid_journal} of {trials}): the test \
         would prove little; widen or move KILL_WINDOW_MS"
    );
}

#[test]
fn page_cache_backend_keeps_every_flushed_record_across_kill_9() {
    journal_survives_kill_9(Backend::PageCache);
}

#[test]
fn o_direct_backend_keeps_every_flushed_record_across_kill_9() {
    journal_survives_kill_9(Backend::Direct);
}
