//! The balloon's operations on a running microVM (`PATCH /balloon`,
//! `/balloon/statistics`, `/balloon/hinting/*`), with Firecracker's rules
//! and error texts: a new target must fit in guest memory and waits for
//! the driver; statistics stay on or off as they booted.

use devices::virtio::balloon::{Balloon, HintCommandError};
use devices::virtio::VirtioTransport;
use vmm_config::{
    BalloonDeviceConfig, BalloonError, BalloonStats, HintingStatus, StartHintingCmd, PAGES_PER_MIB,
};

use crate::device_manager::raise_config_change;
use crate::runtime::Vmm;

/// Why a balloon operation was refused.
#[derive(Debug, thiserror::Error)]
pub enum BalloonActionError {
    #[error("No balloon device found.")]
    NotFound,
    #[error("Device not activated yet.")]
    NotActive,
    #[error(transparent)]
    Config(#[from] BalloonError),
    #[error("Received stats query when stats are disabled.")]
    StatisticsDisabled,
    #[error(transparent)]
    Hinting(#[from] HintCommandError),
}

impl Vmm {
    fn with_balloon<R>(
        &self,
        f: impl FnOnce(&mut VirtioTransport<Balloon>) -> Result<R, BalloonActionError>,
    ) -> Result<R, BalloonActionError> {
        let transport = self
            .devices
            .balloon
            .as_ref()
            .ok_or(BalloonActionError::NotFound)?;
        f(&mut transport.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// `GET /balloon`: the configuration with the current target and
    /// statistics interval.
    pub fn balloon_config(&self) -> Result<BalloonDeviceConfig, BalloonActionError> {
        let config = self
            .resources
            .balloon
            .clone()
            .ok_or(BalloonActionError::NotFound)?;
        self.with_balloon(|t| {
            Ok(BalloonDeviceConfig {
                amount_mib: t.device().target_pages() / PAGES_PER_MIB,
                stats_polling_interval_s: t.device().stats_polling_interval_s(),
                ..config
            })
        })
    }

    /// `PATCH /balloon`: a new target for the guest's driver.
    pub fn update_balloon(&mut self, amount_mib: u32) -> Result<(), BalloonActionError> {
        let mem_size_mib = self.resources.machine_config.mem_size_mib;
        let target = BalloonDeviceConfig {
            amount_mib,
            ..Default::default()
        }
        .target_pages(mem_size_mib)?;
        self.with_balloon(|t| {
            if !t.device().is_active() {
                return Err(BalloonActionError::NotActive);
            }
            t.device_mut().set_target_pages(target);
            raise_config_change(t);
            Ok(())
        })?;
        if let Some(config) = &mut self.resources.balloon {
            config.amount_mib = amount_mib;
        }
        log::info!("balloon: target {amount_mib} MiB");
        Ok(())
    }

    /// `PATCH /balloon/statistics`: a new interval, not on or off.
    pub fn update_balloon_statistics(&mut self, seconds: u16) -> Result<(), BalloonActionError> {
        self.with_balloon(|t| {
            let current = t.device().stats_polling_interval_s();
            if current == seconds {
                return Ok(());
            }
            if current == 0 || seconds == 0 {
                return Err(BalloonError::StatisticsStateChange.into());
            }
            t.device_mut().set_stats_polling_interval(seconds);
            Ok(())
        })?;
        if let Some(config) = &mut self.resources.balloon {
            config.stats_polling_interval_s = seconds;
        }
        Ok(())
    }

    /// `GET /balloon/statistics`: the target, the balloon's size and the
    /// guest's latest figures.
    pub fn balloon_statistics(&self) -> Result<BalloonStats, BalloonActionError> {
        self.with_balloon(|t| {
            let device = t.device();
            if device.stats_polling_interval_s() == 0 {
                return Err(BalloonActionError::StatisticsDisabled);
            }
            let (target, actual) = (device.target_pages(), device.actual_pages());
            Ok(BalloonStats {
                target_pages: target,
                actual_pages: actual,
                target_mib: target / PAGES_PER_MIB,
                actual_mib: actual / PAGES_PER_MIB,
                ..Default::default()
            }
            .with_tags(device.latest_stats()))
        })
    }

    /// `PATCH /balloon/hinting/start`.
    pub fn start_balloon_hinting(
        &mut self,
        cmd: StartHintingCmd,
    ) -> Result<(), BalloonActionError> {
        self.with_balloon(|t| {
            t.device_mut().start_hinting(cmd.acknowledge_on_stop)?;
            raise_config_change(t);
            Ok(())
        })
    }

    /// `PATCH /balloon/hinting/stop`.
    pub fn stop_balloon_hinting(&mut self) -> Result<(), BalloonActionError> {
        self.with_balloon(|t| {
            t.device_mut().stop_hinting()?;
            raise_config_change(t);
            Ok(())
        })
    }

    /// `GET /balloon/hinting/status`.
    pub fn balloon_hinting_status(&self) -> Result<HintingStatus, BalloonActionError> {
        self.with_balloon(|t| {
            let (host_cmd, guest_cmd) = t.device().hinting_status()?;
            Ok(HintingStatus {
                host_cmd,
                guest_cmd,
            })
        })
    }
}
