//! Bad configuration must fail with a clear message naming the bad value and
//! a non-zero exit status, before any guest runs.

use std::process::Command;
use std::time::Duration;

use tessera_tests::{guest_artifacts, run_with_deadline, workspace_bin, RunOutput, VmConfig};

const BAD_CONFIGURATION: i32 = 152;
const ARG_PARSING: i32 = 153;

fn run_config_text(text: &str, extra: &[&str]) -> RunOutput {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.json");
    std::fs::write(&path, text).unwrap();
    let mut command = Command::new(workspace_bin("tessera"));
    command
        .arg("--no-api")
        .arg("--config-file")
        .arg(&path)
        .args(extra);
    run_with_deadline(command, Duration::from_secs(30), |_, _| false)
}

fn run_config(config: &VmConfig) -> RunOutput {
    run_config_text(&config.to_json().to_string(), &[])
}

fn assert_fails(run: &RunOutput, code: i32, message: &str) {
    assert_eq!(run.code(), code, "{}", run.describe());
    assert!(
        run.stderr.contains(message),
        "expected {message:?} in stderr\n{}",
        run.describe()
    );
}

#[test]
fn missing_kernel_file() {
    let run = run_config(&VmConfig::new("/nonexistent/vmlinux", "console=ttyS0"));
    assert_fails(&run, BAD_CONFIGURATION, "/nonexistent/vmlinux");
}

#[test]
fn file_that_is_not_a_kernel() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.bin");
    std::fs::write(&junk, vec![0x5a; 64 * 1024]).unwrap();
    let run = run_config(&VmConfig::new(&junk, "console=ttyS0"));
    assert_fails(&run, BAD_CONFIGURATION, "is not a kernel Tessera can boot");
}

#[test]
fn malformed_json() {
    let run = run_config_text("{\"boot-source\": ", &[]);
    assert_fails(&run, BAD_CONFIGURATION, "invalid configuration JSON");
}

#[test]
fn unknown_field() {
    let mut json = VmConfig::new(guest_artifacts().probe(), "").to_json();
    json["machine-config"]["vcpus"] = 2.into();
    let run = run_config_text(&json.to_string(), &[]);
    assert_fails(&run, BAD_CONFIGURATION, "unknown field `vcpus`");
}

#[test]
fn vcpu_count_zero_or_too_many() {
    for count in [0, 33] {
        let run = run_config(&VmConfig::new(guest_artifacts().probe(), "").vcpus(count));
        assert_fails(
            &run,
            BAD_CONFIGURATION,
            &format!("vcpu_count must be between 1 and 32, got {count}"),
        );
    }
}

#[test]
fn memory_that_cannot_be_had() {
    let config = VmConfig::new(guest_artifacts().probe(), "").mem_mib(1 << 20);
    let run = run_config(&config);
    assert_fails(&run, BAD_CONFIGURATION, "more than this host's memory");
    let config = VmConfig::new(guest_artifacts().probe(), "").mem_mib(8);
    let run = run_config(&config);
    assert_fails(&run, BAD_CONFIGURATION, "mem_size_mib must be between 32");
}

#[test]
fn drive_the_backend_cannot_serve() {
    let probe = guest_artifacts().probe();
    let mut json = VmConfig::new(&probe, "").to_json();
    json["drives"] = serde_json::json!([{
        "drive_id": "data", "socket": "/no/such/backend.sock", "is_root_device": false
    }]);
    let run = run_config_text(&json.to_string(), &[]);
    assert_fails(
        &run,
        BAD_CONFIGURATION,
        "socket /no/such/backend.sock cannot be used",
    );
}

#[test]
fn missing_config_file_and_bad_flags() {
    let mut command = Command::new(workspace_bin("tessera"));
    command.arg("--no-api");
    let run = run_with_deadline(command, Duration::from_secs(10), |_, _| false);
    assert_fails(&run, ARG_PARSING, "--no-api needs --config-file");

    let mut command = Command::new(workspace_bin("tessera"));
    command.arg("--no-such-flag");
    let run = run_with_deadline(command, Duration::from_secs(10), |_, _| false);
    assert_fails(&run, ARG_PARSING, "--no-such-flag");

    let run = run_config_text("{}", &["--level", "loud"]);
    assert_fails(&run, ARG_PARSING, "invalid log level \"loud\"");
}

#[test]
fn no_dev_kvm() {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !tessera_tests::can_run(root, "hiding /dev/kvm needs root to mount a private /dev") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("config.json");
    let config = VmConfig::new(guest_artifacts().probe(), "console=ttyS0");
    std::fs::write(&config_path, config.to_json().to_string()).unwrap();
    let mut command = Command::new("unshare");
    command.args(["--mount", "--propagation", "private", "sh", "-c"]);
    command.arg(format!(
        "mount -t tmpfs none /dev && exec {} --no-api --config-file {}",
        workspace_bin("tessera").display(),
        config_path.display()
    ));
    let run = run_with_deadline(command, Duration::from_secs(30), |_, _| false);
    assert_fails(&run, 2, "cannot open /dev/kvm");
}
