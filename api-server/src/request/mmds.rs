//! `/mmds`: the metadata store (Firecracker's paths and texts). Later path
//! segments are ignored as Firecracker ignores them; `/mmds/config` is
//! parsed and refused until the guest can reach the store.

use super::{unsupported, Body, RequestError};
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
        ["config"] => Err(unsupported::parse(body, "mmds/config")),
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
