//! `PUT /vsock` (and `PUT /vsock/<anything>`, whose path segment
//! Firecracker ignores).

use super::{Body, RequestError};
use crate::action::VmmAction;

pub(super) fn parse_put(body: &Body) -> Result<VmmAction, RequestError> {
    Ok(VmmAction::PutVsock(body.json()?))
}
