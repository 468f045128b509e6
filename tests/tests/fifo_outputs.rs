//! Log, metrics and boot paths that are FIFOs: one nobody reads is refused
//! at once, one whose reader stops reading drops what does not fit (and
//! counts it) instead of stalling the API, and a kernel must be a file.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};
use tessera_tests::api::{ApiClient, ApiVm};
use tessera_tests::{guest_artifacts, run_with_deadline, workspace_bin};

fn mkfifo(path: &Path) -> PathBuf {
    let c_path = CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: c_path is a valid NUL-terminated string.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
    path.to_path_buf()
}

/// Opens the read end without blocking and never reads it: a reader that
/// has stopped.
fn stalled_reader(fifo: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(fifo)
        .unwrap()
}

/// Everything in the pipe now.
fn drain(reader: &mut File) -> String {
    let mut text = Vec::new();
    let mut buf = [0; 65536];
    while let Ok(n @ 1..) = reader.read(&mut buf) {
        text.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&text).into_owned()
}

fn flush_metrics(c: &mut ApiClient) -> u16 {
    c.put("/actions", r#"{"action_type": "FlushMetrics"}"#)
        .status
}

#[test]
fn a_log_or_metrics_fifo_without_reader_is_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = mkfifo(&dir.path().join("log.fifo"));
    for flag in ["--log-path", "--metrics-path"] {
        let mut command = Command::new(workspace_bin("tessera"));
        command
            .arg("--api-sock")
            .arg(dir.path().join("api.sock"))
            .arg(flag)
            .arg(&fifo);
        let run = run_with_deadline(command, Duration::from_secs(10), |_, _| false);
        assert_ne!(run.code(), 0, "{flag}: {}", run.describe());
        assert!(
            run.stderr.contains(&fifo.display().to_string())
                && run.stderr.contains("no process has open for reading"),
            "{flag}: {}",
            run.describe()
        );
    }

    let api = ApiVm::start(&[]);
    let mut c = api.client();
    for (path, body) in [
        ("/metrics", json!({"metrics_path": fifo})),
        ("/logger", json!({"log_path": fifo})),
    ] {
        let r = c.put(path, &body.to_string());
        assert_eq!(r.status, 400, "{path}: {}", r.body);
        assert!(
            r.fault().contains("no process has open for reading"),
            "{path}: {}",
            r.body
        );
    }
}

#[test]
fn a_kernel_or_initrd_must_be_a_regular_file() {
    let api = ApiVm::start(&[]);
    let mut c = api.client();
    let fifo = mkfifo(&api.dir().join("kernel.fifo"));
    let r = c.put(
        "/boot-source",
        &json!({"kernel_image_path": fifo}).to_string(),
    );
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(
        r.fault(),
        format!(
            "the kernel image {} is a FIFO, not a regular file",
            fifo.display()
        )
    );
    let r = c.put(
        "/boot-source",
        &json!({"kernel_image_path": guest_artifacts().probe(), "initrd_path": fifo}).to_string(),
    );
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(
        r.fault(),
        format!(
            "the initrd {} is a FIFO, not a regular file",
            fifo.display()
        )
    );
}

#[test]
fn a_stalled_metrics_fifo_drops_flushes_and_counts_them() {
    let api = ApiVm::start(&[]);
    let mut c = api.client();
    let fifo = mkfifo(&api.dir().join("metrics.fifo"));
    let mut reader = stalled_reader(&fifo);
    let r = c.put("/metrics", &json!({"metrics_path": fifo}).to_string());
    assert_eq!(r.status, 204, "{}", r.body);
    // A flush is about 1.5 KiB; a pipe holds 64 KiB.
    for i in 0..200 {
        assert_eq!(flush_metrics(&mut c), 204, "flush {i}");
    }
    let written = drain(&mut reader);
    let flushes = written.lines().count();
    assert!(flushes < 200, "all {flushes} flushes fit in the pipe");
    assert_eq!(flush_metrics(&mut c), 204);
    let last: Value = serde_json::from_str(drain(&mut reader).trim()).unwrap();
    assert_eq!(
        last["logger"]["missed_metrics_count"],
        json!(200 - flushes),
        "{last}"
    );
}

#[test]
fn a_stalled_log_fifo_drops_lines_and_counts_them() {
    let api = ApiVm::start(&[]);
    let mut c = api.client();
    let fifo = mkfifo(&api.dir().join("log.fifo"));
    let mut reader = stalled_reader(&fifo);
    let metrics_path = api.dir().join("metrics.json");
    let r = c.put(
        "/logger",
        &json!({"log_path": fifo, "level": "Debug"}).to_string(),
    );
    assert_eq!(r.status, 204, "{}", r.body);
    assert_eq!(
        c.put(
            "/metrics",
            &json!({"metrics_path": metrics_path}).to_string()
        )
        .status,
        204
    );
    // Each request logs a line at Debug; 2,000 of them overflow the pipe.
    for i in 0..2000 {
        assert_eq!(c.get("/machine-config").status, 200, "request {i}");
    }
    let written = drain(&mut reader);
    assert!(
        written.contains("API request: GET /machine-config"),
        "{written}"
    );
    assert_eq!(flush_metrics(&mut c), 204);
    let metrics = std::fs::read_to_string(&metrics_path).unwrap();
    let last: Value = serde_json::from_str(metrics.lines().last().unwrap()).unwrap();
    assert!(
        last["logger"]["missed_log_count"].as_u64().unwrap() > 0,
        "{last}"
    );
}

#[test]
fn a_serial_fifo_without_reader_fails_the_start_at_once() {
    let api = ApiVm::start(&[]);
    let mut c = api.client();
    let fifo = mkfifo(&api.dir().join("console.fifo"));
    let boot = json!({"kernel_image_path": guest_artifacts().probe(),
                      "boot_args": "console=ttyS0 probe.ticks=0"});
    assert_eq!(c.put("/boot-source", &boot.to_string()).status, 204);
    let r = c.put("/serial", &json!({"serial_out_path": fifo}).to_string());
    assert_eq!(r.status, 204, "{}", r.body);
    let start = c.put("/actions", r#"{"action_type": "InstanceStart"}"#);
    assert_eq!(start.status, 400, "{}", start.body);
    assert!(
        start.fault().contains(&fifo.display().to_string())
            && start.fault().contains("no process has open for reading"),
        "{}",
        start.body
    );
    assert_eq!(c.get("/").json()["state"], "Not started");
}
