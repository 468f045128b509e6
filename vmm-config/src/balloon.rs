//! `/balloon`: the virtio-balloon device's configuration and the updates
//! Firecracker takes at run time, with its field names and defaults.

use serde::{Deserialize, Serialize};

/// 4 KiB pages in a MiB: the balloon counts in 4 KiB pages.
pub const PAGES_PER_MIB: u32 = 256;

/// Why a balloon configuration was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BalloonError {
    /// Firecracker's text for a target above guest memory.
    #[error("Amount of pages requested is too large.")]
    TooManyPagesRequested,
    #[error("Statistics cannot be enabled/disabled after activation.")]
    StatisticsStateChange,
}

/// `PUT /balloon` (and the config file's `balloon`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonDeviceConfig {
    /// The target size of the balloon.
    pub amount_mib: u32,
    /// Whether the guest may take pages back when it runs out of memory.
    pub deflate_on_oom: bool,
    /// Seconds between statistics requests; 0 leaves statistics off.
    #[serde(default)]
    pub stats_polling_interval_s: u16,
    /// The host asks the guest for its free pages (`/balloon/hinting/*`).
    #[serde(default)]
    pub free_page_hinting: bool,
    /// The guest reports the pages it frees as it goes.
    #[serde(default)]
    pub free_page_reporting: bool,
}

impl BalloonDeviceConfig {
    /// The target in 4 KiB pages; a target above guest memory is refused.
    pub fn target_pages(&self, mem_size_mib: usize) -> Result<u32, BalloonError> {
        if self.amount_mib as usize > mem_size_mib {
            return Err(BalloonError::TooManyPagesRequested);
        }
        self.amount_mib
            .checked_mul(PAGES_PER_MIB)
            .ok_or(BalloonError::TooManyPagesRequested)
    }
}

/// `PATCH /balloon`: a new target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonUpdateConfig {
    pub amount_mib: u32,
}

/// `PATCH /balloon/statistics`: a new polling interval (statistics cannot
/// be switched on or off after boot).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonUpdateStatsConfig {
    pub stats_polling_interval_s: u16,
}

/// `PATCH /balloon/hinting/start`: whether the run ends by itself once the
/// guest says it is done (Firecracker's default) or waits for `stop`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StartHintingCmd {
    #[serde(default = "acknowledge_on_stop")]
    pub acknowledge_on_stop: bool,
}

fn acknowledge_on_stop() -> bool {
    true
}

impl Default for StartHintingCmd {
    fn default() -> Self {
        Self {
            acknowledge_on_stop: true,
        }
    }
}

/// `GET /balloon/statistics`: the target and the balloon's size, and the
/// guest's latest figures (each only once the guest reported it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct BalloonStats {
    pub target_pages: u32,
    pub actual_pages: u32,
    pub target_mib: u32,
    pub actual_mib: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub swap_in: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub swap_out: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub major_faults: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minor_faults: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub free_memory: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_memory: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub available_memory: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_caches: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hugetlb_allocations: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hugetlb_failures: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oom_kill: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alloc_stall: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub async_scan: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direct_scan: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub async_reclaim: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direct_reclaim: Option<u64>,
}

impl BalloonStats {
    /// The figures of virtio-balloon's statistics tags 0 to 15, in tag
    /// order.
    pub fn with_tags(mut self, values: &[Option<u64>; 16]) -> Self {
        let fields = [
            &mut self.swap_in,
            &mut self.swap_out,
            &mut self.major_faults,
            &mut self.minor_faults,
            &mut self.free_memory,
            &mut self.total_memory,
            &mut self.available_memory,
            &mut self.disk_caches,
            &mut self.hugetlb_allocations,
            &mut self.hugetlb_failures,
            &mut self.oom_kill,
            &mut self.alloc_stall,
            &mut self.async_scan,
            &mut self.direct_scan,
            &mut self.async_reclaim,
            &mut self.direct_reclaim,
        ];
        for (field, value) in fields.into_iter().zip(values) {
            *field = *value;
        }
        self
    }
}

/// `GET /balloon/hinting/status`: the command id the host last set and
/// the one the guest last sent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct HintingStatus {
    pub host_cmd: u32,
    pub guest_cmd: Option<u32>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn firecrackers_bodies_parse_and_unknown_fields_are_refused() {
        let config: BalloonDeviceConfig =
            serde_json::from_str(r#"{"amount_mib": 64, "deflate_on_oom": true}"#).unwrap();
        assert_eq!(config.stats_polling_interval_s, 0);
        assert!(!config.free_page_hinting && !config.free_page_reporting);
        assert!(serde_json::from_str::<BalloonDeviceConfig>(r#"{"amount_mib": 1}"#).is_err());
        assert!(serde_json::from_str::<BalloonDeviceConfig>(
            r#"{"amount_mib": 1, "deflate_on_oom": false, "size": 2}"#
        )
        .is_err());
        let start: StartHintingCmd = serde_json::from_str("{}").unwrap();
        assert!(start.acknowledge_on_stop);
    }

    #[test]
    fn the_target_is_in_pages_and_no_larger_than_memory() {
        let config = |amount_mib| BalloonDeviceConfig {
            amount_mib,
            ..Default::default()
        };
        assert_eq!(config(64).target_pages(128), Ok(64 * 256));
        assert_eq!(
            config(129).target_pages(128),
            Err(BalloonError::TooManyPagesRequested)
        );
        assert_eq!(
            config(u32::MAX).target_pages(usize::MAX),
            Err(BalloonError::TooManyPagesRequested)
        );
    }
}
