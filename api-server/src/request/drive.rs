//! `PUT`, `PATCH` and `DELETE /drives/{drive_id}`.

use super::{check_ids, Body, RequestError};
use crate::action::VmmAction;
use vmm_config::{BlockDeviceConfig, BlockDeviceUpdate};

pub(super) fn parse_put(id: &str, body: &Body) -> Result<VmmAction, RequestError> {
    let drive: BlockDeviceConfig = body.json()?;
    check_ids(id, &drive.drive_id)?;
    Ok(VmmAction::PutDrive(drive))
}

pub(super) fn parse_patch(id: &str, body: &Body) -> Result<VmmAction, RequestError> {
    let update: BlockDeviceUpdate = body.json()?;
    check_ids(id, &update.drive_id)?;
    if update.path_on_host.is_none() && update.rate_limiter.is_none() {
        return Err(RequestError::EmptyPatch(format!("/drives/{id}")));
    }
    Ok(VmmAction::PatchDrive(update))
}

/// `DELETE`: hot-unplug, with no body.
pub(super) fn parse_delete(id: &str, body: &Body) -> Result<VmmAction, RequestError> {
    body.none()?;
    check_ids(id, id)?;
    Ok(VmmAction::DeleteDrive(id.to_string()))
}
