//! `PUT` and `PATCH /machine-config`.

use super::{Body, RequestError};
use crate::action::VmmAction;
use vmm_config::{MachineConfig, MachineConfigUpdate};

pub(super) fn parse_put(body: &Body) -> Result<VmmAction, RequestError> {
    Ok(VmmAction::PutMachineConfig(body.json::<MachineConfig>()?))
}

pub(super) fn parse_patch(body: &Body) -> Result<VmmAction, RequestError> {
    let update: MachineConfigUpdate = body.json()?;
    if update.is_empty() {
        return Err(RequestError::EmptyPatch("/machine-config".into()));
    }
    Ok(VmmAction::PatchMachineConfig(update))
}
