//! `/mmds`: the metadata store (Firecracker's paths and texts), and
//! `/mmds/config`, where the guest reaches it. Later path segments of a GET
//! or PATCH are ignored as Firecracker ignores them.

use super::{Body, RequestError};
use crate::action::VmmAction;

pub(super) fn parse_get(body: &Body) -> Result<VmmAction, RequestError> {
    if body.bytes.is_some() {
        return Err(RequestError::GetWithBody);
    }
    Ok(VmmAction::GetMmds)
}

pub(super) fn parse_put(body: &Body, rest: &[&str]) -> Result<VmmAction, RequestError> {
    match rest {
        [] => Ok(VmmAction::PutMmds(store_body(body)?)),
        ["config"] => Ok(VmmAction::PutMmdsConfig(body.json()?)),
        [other, ..] => Err(RequestError::UnrecognizedPutPath(other.to_string())),
    }
}

pub(super) fn parse_patch(body: &Body) -> Result<VmmAction, RequestError> {
    Ok(VmmAction::PatchMmds(store_body(body)?))
}

/// Any JSON value; an empty body gets Firecracker's text.
fn store_body(body: &Body) -> Result<serde_json::Value, RequestError> {
    if body.bytes.is_none() {
        return Err(RequestError::EmptyRequest(body.method.to_string()));
    }
    body.json()
}
