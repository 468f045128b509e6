//! `PUT /actions`: InstanceStart, SendCtrlAltDel and FlushMetrics.

use super::{Body, RequestError};
use crate::action::VmmAction;
use vmm_config::{ActionType, InstanceActionInfo};

pub(super) fn parse_put(body: &Body) -> Result<VmmAction, RequestError> {
    let info: InstanceActionInfo = body.json()?;
    Ok(match info.action_type {
        ActionType::InstanceStart => VmmAction::InstanceStart,
        ActionType::SendCtrlAltDel => VmmAction::SendCtrlAltDel,
        ActionType::FlushMetrics => VmmAction::FlushMetrics,
    })
}
