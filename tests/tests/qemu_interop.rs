//! Our `vhost-user-blk` backend under a real Linux virtio-blk driver, with
//! QEMU as the frontend (TCG, since KVM here cannot run Linux): the guest's
//! root fs lives on one backend, and it fills a second, two-queue drive with
//! `dd`; the bytes are checked on the host.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

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
        tessera_tests::wait_for_path(socket, Duration::from_secs(10)),
        "{} never appeared",
        socket.display()
    );
    running
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
    std::fs::File::create(&data)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let root_sock = dir.path().join("root.sock");
    let data_sock = dir.path().join("data.sock");
    let mut root_backend = backend(&root_sock, &root, 1);
    let mut data_backend = backend(&data_sock, &data, 2);

    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args(["-accel", "tcg", "-M", "microvm,acpi=off,memory-backend=mem"])
        .args(["-object", "memory-backend-memfd,id=mem,size=256M,share=on"])
        .args(["-m", "256", "-cpu", "max", "-smp", "2"])
        .args([
            "-nographic",
            "-nodefaults",
            "-serial",
            "stdio",
            "-no-reboot",
        ])
        .args(["-device", "i8042"])
        .arg("-chardev")
        .arg(format!("socket,id=root,path={}", root_sock.display()))
        .args(["-device", "vhost-user-blk,chardev=root,num-queues=1"])
        .arg("-chardev")
        .arg(format!("socket,id=data,path={}", data_sock.display()))
        .args(["-device", "vhost-user-blk,chardev=data,num-queues=2"])
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
        assert!(
            backend.stderr.contains("the frontend disconnected"),
            "{}",
            backend.describe()
        );
    }
}
