//! `PUT /metrics` and the `metrics` config-file section.

use serde::{Deserialize, Serialize};

/// The `metrics` resource: where metrics are flushed as JSON lines.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    pub metrics_path: String,
}
