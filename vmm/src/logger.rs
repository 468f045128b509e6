//! The VMM's logger: one line per record, to stderr or a file or FIFO, in
//! the shape `<time> [<instance>:<thread>(:<LEVEL>)(:<file>:<line>)] <message>`.
//! `PUT /logger` reconfigures it before boot. A file or FIFO is written
//! without blocking: lines a slow FIFO reader has no room for are dropped
//! and counted (`logger.missed_log_count` in the metrics).

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::{Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use log::{Level, LevelFilter, Log, Metadata, Record};
use vmm_config::{LoggerConfig, LoggerLevel};

use crate::metrics::metrics;
use crate::output_file::{open_nonblocking_append, write_or_drop, WriteOutcome};

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

struct Settings {
    sink: Sink,
    show_level: bool,
    show_origin: bool,
    module: Option<String>,
}

struct Logger {
    instance_id: String,
    settings: Mutex<Settings>,
}

static LOGGER: OnceLock<Logger> = OnceLock::new();

/// Parses a Firecracker log level name (case-insensitive).
pub fn parse_level(level: &str) -> Result<LevelFilter, LoggerError> {
    level
        .parse::<LoggerLevel>()
        .map(level_filter)
        .map_err(|_| LoggerError::Level(level.to_string()))
}

fn level_filter(level: LoggerLevel) -> LevelFilter {
    match level {
        LoggerLevel::Off => LevelFilter::Off,
        LoggerLevel::Error => LevelFilter::Error,
        LoggerLevel::Warning => LevelFilter::Warn,
        LoggerLevel::Info => LevelFilter::Info,
        LoggerLevel::Debug => LevelFilter::Debug,
        LoggerLevel::Trace => LevelFilter::Trace,
    }
}

fn open_sink(path: Option<&Path>) -> Result<Sink, LoggerError> {
    match path {
        Some(path) => open_nonblocking_append(path)
            .map(Sink::File)
            .map_err(|source| LoggerError::Open {
                path: path.display().to_string(),
                source,
            }),
        None => Ok(Sink::Stderr),
    }
}

/// Installs the logger. `path` is a file or FIFO to append to; stderr otherwise.
pub fn init(instance_id: &str, level: LevelFilter, path: Option<&Path>) -> Result<(), LoggerError> {
    let sink = open_sink(path)?;
    let logger = LOGGER.get_or_init(|| Logger {
        instance_id: instance_id.to_string(),
        settings: Mutex::new(Settings {
            sink,
            show_level: true,
            show_origin: false,
            module: None,
        }),
    });
    log::set_logger(logger).map_err(|_| LoggerError::AlreadySet)?;
    log::set_max_level(level);
    Ok(())
}

/// Applies `PUT /logger`: a new destination, level, decorations and filter.
pub fn configure(config: &LoggerConfig) -> Result<(), LoggerError> {
    let logger = LOGGER.get().ok_or(LoggerError::AlreadySet)?;
    let new_sink = config
        .log_path
        .as_deref()
        .map(|p| open_sink(Some(Path::new(p))))
        .transpose()?;
    let mut settings = logger.settings.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(sink) = new_sink {
        settings.sink = sink;
    }
    if let Some(show) = config.show_level {
        settings.show_level = show;
    }
    if let Some(show) = config.show_log_origin {
        settings.show_origin = show;
    }
    if config.module.is_some() {
        settings.module = config.module.clone();
    }
    if let Some(level) = config.level {
        log::set_max_level(level_filter(level));
    }
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
        let mut settings = self.settings.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(module) = &settings.module {
            if !record
                .module_path()
                .unwrap_or("")
                .starts_with(module.as_str())
            {
                return;
            }
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let thread = std::thread::current();
        let mut prefix = format!(
            "{}:{}",
            self.instance_id,
            thread.name().unwrap_or("unnamed")
        );
        if settings.show_level {
            prefix.push(':');
            prefix.push_str(match record.level() {
                Level::Warn => "WARN",
                other => other.as_str(),
            });
        }
        if settings.show_origin {
            prefix.push_str(&format!(
                ":{}:{}",
                record.file().unwrap_or("?"),
                record.line().unwrap_or(0)
            ));
        }
        let line = format!(
            "{}.{:09} [{prefix}] {}\n",
            now.as_secs(),
            now.subsec_nanos(),
            record.args()
        );
        // A logger has nowhere to report its own write failures but the
        // metrics.
        let outcome = match &mut settings.sink {
            Sink::Stderr => match std::io::stderr().write_all(line.as_bytes()) {
                Ok(()) => WriteOutcome::Written,
                Err(err) => WriteOutcome::Failed(err),
            },
            Sink::File(file) => write_or_drop(file, line.as_bytes()),
        };
        match outcome {
            WriteOutcome::Written => {}
            WriteOutcome::Dropped => metrics().logger_output.missed_log_count.inc(),
            WriteOutcome::Failed(_) => metrics().logger_output.log_fails.inc(),
        }
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
