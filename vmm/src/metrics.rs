//! Metrics in Firecracker's style: counters that threads bump lock-free,
//! written as one JSON line per flush to the file or FIFO `PUT /metrics`
//! names. Each flush writes what happened since the previous one. Flushes
//! happen on `FlushMetrics` and every 60 s while the VM runs. The file or
//! FIFO is written without blocking: a flush a slow FIFO reader has no
//! room for is dropped and counted (`logger.missed_metrics_count`).

use std::fs::File;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};

use crate::output_file::{open_nonblocking_append, write_or_drop, WriteOutcome};

/// How often metrics are flushed while the VM runs.
pub const FLUSH_INTERVAL_SECS: u64 = 60;

/// Errors writing metrics.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot open the metrics file {path}: {source}")]
    Open {
        path: String,
        source: std::io::Error,
    },
    #[error("metrics are already configured (to {0})")]
    AlreadyConfigured(String),
    #[error("cannot write metrics: {0}")]
    Write(std::io::Error),
}

/// A counter whose flushes report the increase since the last flush.
#[derive(Debug, Default)]
pub struct Counter {
    total: AtomicU64,
    flushed: AtomicU64,
}

impl Counter {
    pub const fn new() -> Self {
        Self {
            total: AtomicU64::new(0),
            flushed: AtomicU64::new(0),
        }
    }

    pub fn inc(&self) {
        self.add(1);
    }

    pub fn add(&self, n: u64) {
        self.total.fetch_add(n, Ordering::Relaxed);
    }

    /// Everything counted so far.
    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    /// The increase since the previous call.
    fn delta(&self) -> u64 {
        let total = self.total.load(Ordering::Relaxed);
        total - self.flushed.swap(total, Ordering::Relaxed)
    }
}

/// Counters of one API resource.
#[derive(Debug, Default)]
pub struct RequestCounters {
    pub count: Counter,
    pub fails: Counter,
}

/// vCPU exits.
#[derive(Debug, Default)]
pub struct VcpuMetrics {
    pub exit_io_in: Counter,
    pub exit_io_out: Counter,
    pub exit_mmio_read: Counter,
    pub exit_mmio_write: Counter,
    /// Port and MMIO accesses no device decodes.
    pub unhandled_pio: Counter,
    pub unhandled_mmio: Counter,
    pub failures: Counter,
}

/// What the log and metrics writers could not write (Firecracker's
/// `logger` section).
#[derive(Debug, Default)]
pub struct LoggerMetrics {
    /// Flushes dropped because the metrics FIFO was full.
    pub missed_metrics_count: Counter,
    pub metrics_fails: Counter,
    /// Lines dropped because the log FIFO was full.
    pub missed_log_count: Counter,
    pub log_fails: Counter,
}

/// Every metric of the process.
#[derive(Debug, Default)]
pub struct Metrics {
    pub vcpu: VcpuMetrics,
    pub logger_output: LoggerMetrics,
    pub instance_info: RequestCounters,
    pub vm_config: RequestCounters,
    pub machine_config_get: RequestCounters,
    pub machine_config_put: RequestCounters,
    pub machine_config_patch: RequestCounters,
    pub boot_source: RequestCounters,
    pub drive_put: RequestCounters,
    pub drive_patch: RequestCounters,
    pub network_put: RequestCounters,
    pub network_patch: RequestCounters,
    pub actions: RequestCounters,
    pub vm_state: RequestCounters,
    pub logger: RequestCounters,
    pub metrics: RequestCounters,
    pub serial: RequestCounters,
    pub vsock: RequestCounters,
    pub entropy: RequestCounters,
    pub balloon_get: RequestCounters,
    pub balloon_put: RequestCounters,
    pub balloon_patch: RequestCounters,
    pub mmds_get: RequestCounters,
    pub mmds_put: RequestCounters,
    pub mmds_patch: RequestCounters,
    pub snapshot_create: RequestCounters,
    pub snapshot_load: RequestCounters,
    /// Process start to the API socket answering, and its CPU time.
    pub startup_time_us: AtomicU64,
    pub startup_time_cpu_us: AtomicU64,
}

/// The process-wide metrics.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::default)
}

/// Per-device counters, keyed `<kind>_<id>` in the output (for example
/// `i8042` or `block_rootfs`), supplied by the device owners at flush time
/// (a vhost-user device's include what its backend counted in its stats
/// page, see `backend_stats`).
pub type DeviceCounters = Vec<(String, Value)>;

struct Destination {
    path: String,
    file: File,
}

static DESTINATION: Mutex<Option<Destination>> = Mutex::new(None);

/// Applies `PUT /metrics`; metrics can be configured once.
pub fn configure(path: &Path) -> Result<(), MetricsError> {
    let mut destination = DESTINATION.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(existing) = destination.as_ref() {
        return Err(MetricsError::AlreadyConfigured(existing.path.clone()));
    }
    let file = open_nonblocking_append(path).map_err(|source| MetricsError::Open {
        path: path.display().to_string(),
        source,
    })?;
    *destination = Some(Destination {
        path: path.display().to_string(),
        file,
    });
    Ok(())
}

fn requests(pairs: &[(&str, &RequestCounters)]) -> Value {
    let mut map = Map::new();
    for (name, counters) in pairs {
        map.insert(format!("{name}_count"), counters.count.delta().into());
        map.insert(format!("{name}_fails"), counters.fails.delta().into());
    }
    Value::Object(map)
}

/// The JSON line of one flush.
fn snapshot(devices: DeviceCounters) -> Value {
    let m = metrics();
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64;
    let mut line = json!({
        "utc_timestamp_ms": now_ms,
        "api_server": {
            "process_startup_time_us": m.startup_time_us.load(Ordering::Relaxed),
            "process_startup_time_cpu_us": m.startup_time_cpu_us.load(Ordering::Relaxed),
        },
        "get_api_requests": requests(&[
            ("instance_info", &m.instance_info),
            ("vm_config", &m.vm_config),
            ("machine_cfg", &m.machine_config_get),
            ("balloon", &m.balloon_get),
            ("mmds", &m.mmds_get),
        ]),
        "put_api_requests": requests(&[
            ("actions", &m.actions),
            ("balloon", &m.balloon_put),
            ("boot_source", &m.boot_source),
            ("drive", &m.drive_put),
            ("entropy", &m.entropy),
            ("logger", &m.logger),
            ("machine_cfg", &m.machine_config_put),
            ("metrics", &m.metrics),
            ("mmds", &m.mmds_put),
            ("network", &m.network_put),
            ("serial", &m.serial),
            ("snapshot_create", &m.snapshot_create),
            ("snapshot_load", &m.snapshot_load),
            ("vsock", &m.vsock),
        ]),
        "patch_api_requests": requests(&[
            ("balloon", &m.balloon_patch),
            ("drive", &m.drive_patch),
            ("machine_cfg", &m.machine_config_patch),
            ("mmds", &m.mmds_patch),
            ("network", &m.network_patch),
            ("vm", &m.vm_state),
        ]),
        "logger": {
            "missed_metrics_count": m.logger_output.missed_metrics_count.delta(),
            "metrics_fails": m.logger_output.metrics_fails.delta(),
            "missed_log_count": m.logger_output.missed_log_count.delta(),
            "log_fails": m.logger_output.log_fails.delta(),
        },
        "vcpu": {
            "exit_io_in": m.vcpu.exit_io_in.delta(),
            "exit_io_out": m.vcpu.exit_io_out.delta(),
            "exit_mmio_read": m.vcpu.exit_mmio_read.delta(),
            "exit_mmio_write": m.vcpu.exit_mmio_write.delta(),
            "unhandled_pio": m.vcpu.unhandled_pio.delta(),
            "unhandled_mmio": m.vcpu.unhandled_mmio.delta(),
            "failures": m.vcpu.failures.delta(),
        },
    });
    if let Value::Object(map) = &mut line {
        for (key, value) in devices {
            map.insert(key, value);
        }
    }
    line
}

/// Writes one JSON line with what changed since the last flush. Without a
/// configured destination there is nothing to do. A full FIFO drops the
/// line (counted, not an error); the thread never waits for the reader.
pub fn flush(devices: DeviceCounters) -> Result<(), MetricsError> {
    let mut destination = DESTINATION.lock().unwrap_or_else(|p| p.into_inner());
    let Some(destination) = destination.as_mut() else {
        return Ok(());
    };
    let line = snapshot(devices);
    let text = format!("{line}\n");
    match write_or_drop(&mut destination.file, text.as_bytes()) {
        WriteOutcome::Written => Ok(()),
        WriteOutcome::Dropped => {
            // The next line that gets through reports every dropped one.
            let earlier = line["logger"]["missed_metrics_count"].as_u64().unwrap_or(0);
            metrics()
                .logger_output
                .missed_metrics_count
                .add(earlier + 1);
            Ok(())
        }
        WriteOutcome::Failed(err) => {
            metrics().logger_output.metrics_fails.inc();
            Err(MetricsError::Write(err))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_report_the_increase_since_the_last_flush() {
        let c = Counter::new();
        c.add(5);
        assert_eq!(c.delta(), 5);
        assert_eq!(c.delta(), 0);
        c.inc();
        assert_eq!(c.delta(), 1);
    }

    #[test]
    fn snapshot_has_firecracker_sections_and_device_entries() {
        metrics().vcpu.exit_io_out.add(3);
        let line = snapshot(vec![("i8042".into(), json!({"reset_count": 1}))]);
        for key in [
            "utc_timestamp_ms",
            "api_server",
            "put_api_requests",
            "vcpu",
            "i8042",
        ] {
            assert!(line.get(key).is_some(), "{key} missing in {line}");
        }
        assert!(line["vcpu"]["exit_io_out"].as_u64().unwrap() >= 3);
    }
}
