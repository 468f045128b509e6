//! Tessera's REST API: HTTP/1.1 over a Unix socket, wire-compatible with
//! Firecracker's API (same paths, bodies, status codes and error body).
//!
//! The configuration schema it parses bodies into (shared with the VMM's
//! `--config-file`) is the `vmm-config` crate.
//!
//! - [`request`]: routes a request (one `match` on method and path) and
//!   parses its body into a typed [`VmmAction`].
//! - [`server`]: the API thread; it hands each action to the VMM thread and
//!   waits for the outcome, so it never touches VM state itself.
//!
//! `openapi.yaml` beside this crate documents the API.

pub mod action;
pub mod request;
pub mod server;

pub use action::{ActionError, VmmAction, VmmData};
pub use server::{ApiServer, ApiServerError, VmmChannel};

use serde::{Deserialize, Serialize};

/// The application name `GET /` reports.
pub const APP_NAME: &str = "Tessera";
/// Tessera's version, reported by `GET /` and `GET /version`.
pub const VMM_VERSION: &str = env!("CARGO_PKG_VERSION");

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
        serde_json::json!({ "fault_message": self.fault_message }).to_string()
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
