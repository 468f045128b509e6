//! `PUT /entropy`: the virtio-rng device, before boot.

use super::{Body, RequestError};
use crate::action::VmmAction;

pub(super) fn parse_put(body: &Body) -> Result<VmmAction, RequestError> {
    Ok(VmmAction::PutEntropy(body.json()?))
}
