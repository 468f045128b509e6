//! `PUT`, `PATCH` and `DELETE /network-interfaces/{iface_id}`.

use super::{check_ids, Body, RequestError};
use crate::action::VmmAction;
use vmm_config::{NetworkInterfaceConfig, NetworkInterfaceUpdate};

pub(super) fn parse_put(id: &str, body: &Body) -> Result<VmmAction, RequestError> {
    let iface: NetworkInterfaceConfig = body.json()?;
    check_ids(id, &iface.iface_id)?;
    Ok(VmmAction::PutNetworkInterface(iface))
}

pub(super) fn parse_patch(id: &str, body: &Body) -> Result<VmmAction, RequestError> {
    let update: NetworkInterfaceUpdate = body.json()?;
    check_ids(id, &update.iface_id)?;
    if update.rx_rate_limiter.is_none() && update.tx_rate_limiter.is_none() {
        return Err(RequestError::EmptyPatch(format!(
            "/network-interfaces/{id}"
        )));
    }
    Ok(VmmAction::PatchNetworkInterface(update))
}

/// `DELETE`: hot-unplug, with no body.
pub(super) fn parse_delete(id: &str, body: &Body) -> Result<VmmAction, RequestError> {
    body.none()?;
    check_ids(id, id)?;
    Ok(VmmAction::DeleteNetworkInterface(id.to_string()))
}
