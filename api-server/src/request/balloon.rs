//! `/balloon`, `/balloon/statistics` and `/balloon/hinting/*`, with
//! Firecracker's paths and bodies.

use super::{Body, RequestError};
use crate::action::VmmAction;

pub(super) fn parse_put(body: &Body) -> Result<VmmAction, RequestError> {
    Ok(VmmAction::PutBalloon(body.json()?))
}

pub(super) fn parse_patch(body: &Body) -> Result<VmmAction, RequestError> {
    Ok(VmmAction::PatchBalloon(body.json()?))
}

pub(super) fn parse_patch_statistics(body: &Body) -> Result<VmmAction, RequestError> {
    Ok(VmmAction::PatchBalloonStatistics(body.json()?))
}

/// `start` takes an optional body (`acknowledge_on_stop`, default true).
pub(super) fn parse_start_hinting(body: &Body) -> Result<VmmAction, RequestError> {
    let cmd = match body.bytes {
        None => Default::default(),
        Some(_) => body.json()?,
    };
    Ok(VmmAction::StartBalloonHinting(cmd))
}
