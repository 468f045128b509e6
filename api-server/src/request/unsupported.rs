//! Firecracker resources Tessera has not built yet: CPU templates, pmem
//! and memory hotplug. Their bodies
//! are still parsed, so a malformed body gets the JSON error, and a
//! well-formed one a clear "not supported yet", never a 404.

use super::{Body, RequestError};

const UNSUPPORTED: &[&str] = &["cpu-config", "pmem", "hotplug"];

pub(super) fn is_unsupported(resource: &str) -> bool {
    UNSUPPORTED.contains(&resource)
}

pub(super) fn parse(body: &Body, resource: &str) -> RequestError {
    if body.bytes.is_some() {
        if let Err(err) = body.json::<serde_json::Map<String, serde_json::Value>>() {
            return err;
        }
    }
    RequestError::NotSupported(format!("/{resource}"))
}
