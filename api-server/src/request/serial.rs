//! `PUT /serial`.

use super::{Body, RequestError};
use crate::action::VmmAction;

pub(super) fn parse_put(body: &Body) -> Result<VmmAction, RequestError> {
    Ok(VmmAction::PutSerial(body.json()?))
}
