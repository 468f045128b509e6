//! The VMM's logger: one line per record, to stderr or a file, in the
//! shape `<time> [<instance>:<thread>:<LEVEL>] <message>`.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::{Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use log::{Level, LevelFilter, Log, Metadata, Record};

/// Errors setting up logging.
#[derive(Debug, thiserror::Error)]
pub enum LoggerError {
    #[error("invalid log level {0:?}: use Off, Error, Warning, Info, Debug or Trace")]
    Level(String),
    #[error("cannot open the log file {path}: {source}")]
    Open {
        path: String,
        source: std::io::Error,
    },
    #[error("the logger is already initialised")]
    AlreadySet,
}

enum Sink {
    Stderr,
    File(File),
}

struct Logger {
    instance_id: String,
    sink: Mutex<Sink>,
}

static LOGGER: OnceLock<Logger> = OnceLock::new();

/// Parses a Firecracker log level name (case-insensitive).
pub fn parse_level(level: &str) -> Result<LevelFilter, LoggerError> {
    match level.to_ascii_lowercase().as_str() {
        "off" => Ok(LevelFilter::Off),
        "error" => Ok(LevelFilter::Error),
        "warn" | "warning" => Ok(LevelFilter::Warn),
        "info" => Ok(LevelFilter::Info),
        "debug" => Ok(LevelFilter::Debug),
        "trace" => Ok(LevelFilter::Trace),
        _ => Err(LoggerError::Level(level.to_string())),
    }
}

/// Installs the logger. `path` is a file or FIFO to append to; stderr otherwise.
pub fn init(instance_id: &str, level: LevelFilter, path: Option<&Path>) -> Result<(), LoggerError> {
    let sink = match path {
        Some(path) => Sink::File(
            OpenOptions::new()
                .append(true)
                .create(true)
                .open(path)
                .map_err(|source| LoggerError::Open {
                    path: path.display().to_string(),
                    source,
                })?,
        ),
        None => Sink::Stderr,
    };
    let logger = LOGGER.get_or_init(|| Logger {
        instance_id: instance_id.to_string(),
        sink: Mutex::new(sink),
    });
    log::set_logger(logger).map_err(|_| LoggerError::AlreadySet)?;
    log::set_max_level(level);
    Ok(())
}

impl Log for Logger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let thread = std::thread::current();
        let level = match record.level() {
            Level::Warn => "WARN",
            other => other.as_str(),
        };
        let line = format!(
            "{}.{:09} [{}:{}:{}] {}\n",
            now.as_secs(),
            now.subsec_nanos(),
            self.instance_id,
            thread.name().unwrap_or("unnamed"),
            level,
            record.args()
        );
        let mut sink = self.sink.lock().unwrap_or_else(|p| p.into_inner());
        // A logger has nowhere to report its own write failures.
        let _ = match &mut *sink {
            Sink::Stderr => std::io::stderr().write_all(line.as_bytes()),
            Sink::File(file) => file.write_all(line.as_bytes()),
        };
    }

    fn flush(&self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_parse_like_firecracker() {
        assert_eq!(parse_level("Warning").unwrap(), LevelFilter::Warn);
        assert_eq!(parse_level("DEBUG").unwrap(), LevelFilter::Debug);
        assert!(parse_level("loud").is_err());
    }
}
