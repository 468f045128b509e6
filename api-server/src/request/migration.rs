//! Tessera's live migration: `PUT /migration/send`, `/migration/receive`
//! and `/migration/cancel` (`GET /migration` has no body).

use super::{Body, RequestError};
use crate::action::VmmAction;

pub(super) fn parse_send(body: &Body) -> Result<VmmAction, RequestError> {
    Ok(VmmAction::SendMigration(body.json()?))
}

pub(super) fn parse_receive(body: &Body) -> Result<VmmAction, RequestError> {
    Ok(VmmAction::ReceiveMigration(body.json()?))
}

/// The body, if any, must be an empty JSON object.
pub(super) fn parse_cancel(body: &Body) -> Result<VmmAction, RequestError> {
    if body.bytes.is_some() {
        body.json::<Empty>()?;
    }
    Ok(VmmAction::CancelMigration)
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Empty {}
