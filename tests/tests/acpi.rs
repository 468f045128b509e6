//! The ACPI tables as a distribution kernel reads them, under this host's
//! KVM: Debian's cloud kernel (fetched by `tests/nested/build-l1.sh
//! --stock-kernel`; it has no MP-table parser and no command-line
//! virtio-mmio devices) boots far enough to print (`earlyprintk`) what it
//! found: the RSDP where Tessera put it, each table, the IOAPIC from the
//! MADT. Under kvm_pvm an unmodified kernel runs about 100 times slower
//! and dies soon after (an instruction kvm_pvm cannot emulate), so only
//! early boot is checked here; the nested suite takes the same kernel to
//! userspace with both CPUs and its virtio device (`stock_kernel`).

use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::json;
use tessera_tests::{repo_root, workspace_bin, Running};

fn stock_kernel() -> String {
    let out = Command::new(repo_root().join("tests/nested/build-l1.sh"))
        .arg("--stock-kernel")
        .stderr(Stdio::inherit())
        .output()
        .expect("run build-l1.sh --stock-kernel");
    assert!(out.status.success(), "build-l1.sh --stock-kernel failed");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn a_stock_kernel_reads_the_acpi_tables() {
    stock_kernel_reads_the_tables(false);
}

/// With `--enable-pci` the XSDT lists the MCFG too, and the kernel reserves
/// its ECAM window.
#[test]
fn with_pci_a_stock_kernel_reads_the_mcfg_too() {
    stock_kernel_reads_the_tables(true);
}

fn stock_kernel_reads_the_tables(pci: bool) {
    let dir = tempfile::tempdir().unwrap();
    let disk = tessera_tests::sparse_file(&dir.path().join("disk"), 1 << 20);
    let config = dir.path().join("vm.json");
    std::fs::write(
        &config,
        json!({
            "boot-source": {"kernel_image_path": stock_kernel(),
                            "boot_args": "console=ttyS0 earlyprintk=serial,ttyS0,115200 reboot=k panic=-1"},
            "machine-config": {"vcpu_count": 2, "mem_size_mib": 512},
            "drives": [{"drive_id": "data", "path_on_host": disk,
                        "is_root_device": false, "is_read_only": true}],
        })
        .to_string(),
    )
    .unwrap();
    let mut command = Command::new(workspace_bin("tessera"));
    command.args(["--no-api", "--config-file"]).arg(&config);
    if pci {
        command.arg("--enable-pci");
    }
    let mut vm = Running::spawn(command);
    let last = "IOAPIC[0]: apic_id 0, version 17, address 0xfec00000, GSI 0-23";
    vm.wait_until(Duration::from_secs(300), |out, _| out.contains(last));
    let out = vm.finish().stdout;
    for line in [
        "ACPI: RSDP 0x00000000000E0000 000024 (v02 TESSRA)",
        "ACPI: XSDT 0x",
        "ACPI: FACP 0x",
        "ACPI: DSDT 0x",
        "ACPI: APIC 0x",
        last,
    ] {
        assert!(out.contains(line), "no {line:?} in:\n{out}");
    }
    assert_eq!(out.contains("ACPI: MCFG 0x"), pci, "{out}");
}
