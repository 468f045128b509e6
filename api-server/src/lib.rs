//! Tessera's REST API: HTTP/1.1 over a Unix socket, wire-compatible with
//! Firecracker's API.
//!
//! This crate is filled in by the API work; for now it holds the error body
//! every failed request answers with, so that the VMM and its tests agree on
//! it from the start.

use serde::{Deserialize, Serialize};

/// The body of every error response: `{"fault_message": "..."}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultBody {
    pub fault_message: String,
}

impl FaultBody {
    /// Wraps an error message.
    pub fn new(message: impl std::fmt::Display) -> Self {
        Self {
            fault_message: message.to_string(),
        }
    }

    /// The JSON text of the body.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| String::from("{\"fault_message\":\"\"}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_body_matches_firecracker() {
        let body = FaultBody::new("The requested operation is not supported \"x\"");
        assert_eq!(
            body.to_json(),
            r#"{"fault_message":"The requested operation is not supported \"x\""}"#
        );
    }
}
