//! A backend process inherits only the fds the VMM means to hand it: none
//! of the VMM's eventfds (the i8042 reset line, irqfds, ioeventfds), which a
//! backend could otherwise write to.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::json;
use tessera_tests::{guest_artifacts, workspace_bin, Running, VmConfig};

const DEADLINE: Duration = Duration::from_secs(60);

/// A stand-in backend binary: it writes "<fd> <target>" for every fd it
/// was started with to `report`, then becomes the real backend.
fn recording_backend(dir: &Path, report: &Path) -> std::path::PathBuf {
    let script = dir.join("record-fds-then-blk.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nfor fd in /proc/$$/fd/*; do echo \"${{fd##*/}} $(readlink \"$fd\")\"; done > {report}.tmp\n\
             mv {report}.tmp {report}\nexec {real} \"$@\"\n",
            report = report.display(),
            real = workspace_bin("vhost-user-blk").display(),
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    script
}

#[test]
fn a_drive_backend_inherits_no_eventfd_or_socket_but_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    tessera_tests::sparse_file(&disk, 8 << 20);
    let report = dir.path().join("fds.txt");
    let backend = recording_backend(dir.path(), &report);
    let mut config = VmConfig::new(
        guest_artifacts().probe(),
        "console=ttyS0 probe.blk=write probe.blk_mib=2",
    )
    .mem_mib(256)
    .to_json();
    config["drives"] = json!([{"drive_id": "data", "path_on_host": disk,
                               "is_root_device": false, "is_read_only": false}]);
    let config_path = dir.path().join("vm.json");
    std::fs::write(&config_path, config.to_string()).unwrap();

    let mut command = Command::new(workspace_bin("tessera"));
    command
        .arg("--api-sock")
        .arg(dir.path().join("api.sock"))
        .arg("--config-file")
        .arg(&config_path)
        .arg("--vhost-user-blk-bin")
        .arg(&backend)
        // The recording wrapper is a shell script, which the backend
        // starter's filter (made for the backends) does not allow; fds
        // are what this test looks at.
        .arg("--no-seccomp");
    let mut vm = Running::spawn(command);
    vm.wait_until(DEADLINE, |out, _| {
        tessera_tests::has_line(out, "probe.blk0=")
    });
    let stdout = vm.stdout();
    assert!(
        stdout.contains("probe.blk0=ok"),
        "{stdout}\n{}",
        vm.stderr()
    );

    let fds = std::fs::read_to_string(&report).expect("the backend's fd report");
    let leaked: Vec<&str> = fds
        .lines()
        .filter(|line| {
            let (fd, target) = line.split_once(' ').unwrap_or((line, ""));
            target.starts_with("anon_inode:") || (target.starts_with("socket:") && fd != "3")
        })
        .collect();
    assert!(
        leaked.is_empty(),
        "the backend inherited {leaked:?}; all its fds:\n{fds}"
    );
    drop(vm.finish());
}
