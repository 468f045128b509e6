//! `PUT /snapshot/create` and `PUT /snapshot/load`.

use super::{Body, RequestError};
use crate::action::VmmAction;

pub(super) fn parse_create(body: &Body) -> Result<VmmAction, RequestError> {
    Ok(VmmAction::CreateSnapshot(body.json()?))
}

pub(super) fn parse_load(body: &Body) -> Result<VmmAction, RequestError> {
    Ok(VmmAction::LoadSnapshot(body.json()?))
}
