//! `PATCH /vm`: pause and resume.

use super::{Body, RequestError};
use crate::action::VmmAction;
use vmm_config::{RequestedVmState, VmStateRequest};

pub(super) fn parse_patch(body: &Body) -> Result<VmmAction, RequestError> {
    let request: VmStateRequest = body.json()?;
    Ok(match request.state {
        RequestedVmState::Paused => VmmAction::Pause,
        RequestedVmState::Resumed => VmmAction::Resume,
    })
}
