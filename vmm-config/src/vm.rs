//! The VM-level resources: `GET /` (instance info), `PATCH /vm` (pause and
//! resume) and `PUT /actions`.

use serde::{Deserialize, Serialize};

/// The instance state reported by `GET /`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum VmState {
    #[serde(rename = "Not started")]
    NotStarted,
    Running,
    Paused,
}

/// `GET /`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InstanceInfo {
    pub id: String,
    pub state: VmState,
    pub vmm_version: String,
    pub app_name: String,
}

/// `PATCH /vm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmStateRequest {
    pub state: RequestedVmState,
}

/// The states a client may ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum RequestedVmState {
    Paused,
    Resumed,
}

/// `PUT /actions` action types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum ActionType {
    FlushMetrics,
    InstanceStart,
    SendCtrlAltDel,
}

/// The body of `PUT /actions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceActionInfo {
    pub action_type: ActionType,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_names_match_firecracker() {
        let info = InstanceInfo {
            id: "a".into(),
            state: VmState::NotStarted,
            vmm_version: "0.1.0".into(),
            app_name: "Tessera".into(),
        };
        let json = serde_json::to_string(&info).unwrap();
        assert!(json.contains(r#""state":"Not started""#), "{json}");
        let r: VmStateRequest = serde_json::from_str(r#"{"state": "Resumed"}"#).unwrap();
        assert_eq!(r.state, RequestedVmState::Resumed);
        assert!(serde_json::from_str::<VmStateRequest>(r#"{"state": "Running"}"#).is_err());
    }
}
