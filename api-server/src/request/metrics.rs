//! `PUT /metrics`.

use super::{Body, RequestError};
use crate::action::VmmAction;

pub(super) fn parse_put(body: &Body) -> Result<VmmAction, RequestError> {
    Ok(VmmAction::PutMetrics(body.json()?))
}
