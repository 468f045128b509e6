//! The nested-virtualization harness, host side: builds the L1 kernel and
//! initramfs (`tests/nested/build-l1.sh`), boots them under QEMU's TCG
//! emulator with AMD SVM, and collects the `nested.<name>=...` lines that
//! the L1 scenario runner (`tests/nested/runner.sh`) prints.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::{guest_artifacts, run_build_script, run_with_deadline, workspace_bin, RunOutput};

/// The L1 kernel and initramfs.
#[derive(Debug, Clone)]
pub struct L1Artifacts {
    pub dir: PathBuf,
}

/// Builds (or reuses from the cache) the L1 artifacts, once per process.
pub fn l1_artifacts() -> &'static L1Artifacts {
    static L1: OnceLock<L1Artifacts> = OnceLock::new();
    L1.get_or_init(|| {
        let bin_dir = workspace_bin("tessera")
            .parent()
            .expect("binary dir")
            .to_path_buf();
        let dir = run_build_script(
            "tests/nested/build-l1.sh",
            &[
                ("TESSERA_BIN_DIR", &bin_dir),
                ("TESSERA_GUEST_DIR", &guest_artifacts().dir),
            ],
        );
        L1Artifacts { dir }
    })
}

/// What one L1 run reported.
#[derive(Debug)]
pub struct NestedRun {
    /// `nested.<name>=<result>` lines by name (gaps are `<name>.gap`, and
    /// repeated names keep every value).
    pub results: BTreeMap<String, Vec<String>>,
    pub output: RunOutput,
}

impl NestedRun {
    /// The first result line of `name`, if there is one.
    pub fn result(&self, name: &str) -> Option<&str> {
        self.results.get(name)?.first().map(String::as_str)
    }

    /// Whether L1 ran to the end of its scenario list.
    pub fn finished(&self) -> bool {
        self.output.stdout.contains("nested.end")
    }
}

/// How long L1 may print nothing before it counts as hung. Each scenario
/// kills its L2 after 120 s, and every scenario prints a result line, so a
/// longer silence means L1 itself stopped (seen once in CI: TCG's emulated
/// SVM froze L1 during a guest power-off).
pub const L1_SILENCE: Duration = Duration::from_secs(240);

/// A `stop_when` for [`run_with_deadline`] that holds once stdout has not
/// grown for `silence`.
fn silent_for(silence: Duration) -> impl Fn(&str, &str) -> bool {
    let last = Cell::new((0, Instant::now()));
    move |stdout, _| {
        let (len, since) = last.get();
        if stdout.len() != len {
            last.set((stdout.len(), Instant::now()));
            false
        } else {
            since.elapsed() > silence
        }
    }
}

/// Boots L1 under QEMU TCG and runs `scenarios` in it, stopping early if
/// L1 prints nothing for `silence` (for the test scenarios: [`L1_SILENCE`]).
pub fn run_l1(scenarios: &[&str], deadline: Duration, silence: Duration) -> NestedRun {
    let l1 = l1_artifacts();
    let mut command = Command::new("qemu-system-x86_64");
    command
        .args(["-accel", "tcg", "-cpu", "EPYC", "-machine", "q35"])
        .args(["-smp", "2", "-m", "2048"])
        .args([
            "-nographic",
            "-nodefaults",
            "-serial",
            "stdio",
            "-no-reboot",
        ])
        .arg("-kernel")
        .arg(l1.dir.join("vmlinuz"))
        .arg("-initrd")
        .arg(l1.dir.join("initramfs.cpio.gz"))
        .arg("-append")
        .arg(format!(
            "console=ttyS0 panic=-1 quiet nested.scenarios={}",
            scenarios.join(",")
        ));
    let output = run_with_deadline(command, deadline, silent_for(silence));
    let mut results: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in output.stdout.lines() {
        let line = line.trim_end_matches('\r');
        let Some(rest) = line.find("nested.").map(|at| &line[at + "nested.".len()..]) else {
            continue;
        };
        if let Some((name, value)) = rest.split_once('=') {
            results
                .entry(name.to_string())
                .or_default()
                .push(value.to_string());
        }
    }
    NestedRun { results, output }
}
