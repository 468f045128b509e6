//! Live migration, a Tessera extension: the source sends guest memory in
//! pre-copy rounds while the guest runs, then the device state (the same
//! state a snapshot holds) during a short pause; the destination builds the
//! microVM as a snapshot load does and runs it. See `stream.rs` for the
//! format, `send.rs` and `receive.rs` for each side.

mod control;
pub mod receive;
pub mod send;
pub mod stream;

pub use control::MigrationError;

use serde::{Deserialize, Serialize};

use crate::arch::cpu_features::CpuFeatures;

/// What the source says first: the configuration in the `--config-file`
/// schema, guest memory's layout and the CPU features the guest was shown.
#[derive(Debug, Serialize, Deserialize)]
pub struct Hello {
    pub config: serde_json::Value,
    /// (guest address, length) of each region.
    pub memory: Vec<(u64, u64)>,
    pub cpu: CpuFeatures,
}
