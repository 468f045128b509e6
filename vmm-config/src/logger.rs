//! `PUT /logger` and the `logger` config-file section.

use serde::{Deserialize, Serialize};

/// Errors in a logger configuration.
#[derive(Debug, thiserror::Error)]
pub enum LoggerError {
    #[error("invalid log level {0:?}: use Off, Error, Warning, Info, Debug or Trace")]
    Level(String),
}

/// A log level name, as Firecracker spells them (case-insensitive).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum LoggerLevel {
    Off,
    Error,
    Warning,
    Info,
    Debug,
    Trace,
}

impl std::str::FromStr for LoggerLevel {
    type Err = LoggerError;

    fn from_str(level: &str) -> Result<Self, LoggerError> {
        Ok(match level.to_ascii_lowercase().as_str() {
            "off" => Self::Off,
            "error" => Self::Error,
            "warn" | "warning" => Self::Warning,
            "info" => Self::Info,
            "debug" => Self::Debug,
            "trace" => Self::Trace,
            _ => return Err(LoggerError::Level(level.to_string())),
        })
    }
}

impl<'de> Deserialize<'de> for LoggerLevel {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// The `logger` resource.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LoggerConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<LoggerLevel>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_level: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_log_origin: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_are_case_insensitive_and_checked() {
        let c: LoggerConfig = serde_json::from_str(r#"{"level": "warning"}"#).unwrap();
        assert_eq!(c.level, Some(LoggerLevel::Warning));
        let err = serde_json::from_str::<LoggerConfig>(r#"{"level": "loud"}"#).unwrap_err();
        assert!(
            err.to_string().contains("invalid log level \"loud\""),
            "{err}"
        );
    }
}
