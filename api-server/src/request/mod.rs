//! Routes an HTTP request (one `match` on method and path) to the parser of
//! its resource, which turns the body into a typed [`VmmAction`]. Only the
//! syntax is checked here; the VMM validates values when it applies them.

mod actions;
mod balloon;
mod boot_source;
mod drive;
mod entropy;
mod logger;
mod machine_config;
mod metrics;
mod migration;
mod mmds;
mod net;
mod serial;
mod snapshot;
mod unsupported;
mod vm;
mod vsock;

use serde::de::DeserializeOwned;

use crate::action::VmmAction;

/// A request the API understood.
#[derive(Debug, Clone, PartialEq)]
#[expect(
    clippy::large_enum_variant,
    reason = "one per request, moved once to the VMM thread: a box would cost more than it saves"
)]
pub enum ParsedRequest {
    /// An action for the VMM thread.
    Action(VmmAction),
    /// `GET /version`, answered by the API thread itself.
    GetVersion,
}

/// Why a request was refused before reaching the VMM (all answered 400).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    #[error("Invalid request method and/or path: {0} {1}.")]
    InvalidPathMethod(String, String),
    #[error("The request body is missing: {0} {1} needs a JSON body.")]
    EmptyBody(String, String),
    #[error("An error occurred when deserializing the json body of a request: {0}.")]
    InvalidJson(String),
    #[error("The id from the path [{path_id}] does not match the id from the body [{body_id}]!")]
    IdMismatch { path_id: String, body_id: String },
    #[error("Invalid ID {0:?}: use 1-64 characters of [A-Za-z0-9_-].")]
    InvalidId(String),
    #[error("PATCH {0} must change at least one field.")]
    EmptyPatch(String),
    #[error("{0} is not supported by Tessera yet.")]
    NotSupported(String),
    /// Firecracker's texts for `/mmds`.
    #[error("Empty {0} request.")]
    EmptyRequest(String),
    #[error("GET request cannot have a body.")]
    GetWithBody,
    #[error("DELETE request cannot have a body.")]
    DeleteWithBody,
    #[error("Unrecognized PUT request path `{0}`.")]
    UnrecognizedPutPath(String),
}

/// Parses a request; `body` is the raw request body, if any.
pub fn parse_request(
    method: &str,
    path: &str,
    body: Option<&[u8]>,
) -> Result<ParsedRequest, RequestError> {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let action = |a: VmmAction| Ok(ParsedRequest::Action(a));
    let body = Body {
        method,
        path,
        bytes: body.filter(|b| !b.is_empty()),
    };
    match (method, segments.as_slice()) {
        ("GET", []) => action(VmmAction::GetInstanceInfo),
        ("GET", ["version"]) => Ok(ParsedRequest::GetVersion),
        ("GET", ["vm", "config"]) => action(VmmAction::GetVmConfig),
        ("GET", ["machine-config"]) => action(VmmAction::GetMachineConfig),
        ("PUT", ["machine-config"]) => machine_config::parse_put(&body).and_then(action),
        ("PATCH", ["machine-config"]) => machine_config::parse_patch(&body).and_then(action),
        ("PUT", ["boot-source"]) => boot_source::parse_put(&body).and_then(action),
        ("PUT", ["drives", id]) => drive::parse_put(id, &body).and_then(action),
        ("PATCH", ["drives", id]) => drive::parse_patch(id, &body).and_then(action),
        ("DELETE", ["drives", id]) => drive::parse_delete(id, &body).and_then(action),
        ("PUT", ["network-interfaces", id]) => net::parse_put(id, &body).and_then(action),
        ("PATCH", ["network-interfaces", id]) => net::parse_patch(id, &body).and_then(action),
        ("DELETE", ["network-interfaces", id]) => net::parse_delete(id, &body).and_then(action),
        ("PUT", ["actions"]) => actions::parse_put(&body).and_then(action),
        ("PATCH", ["vm"]) => vm::parse_patch(&body).and_then(action),
        ("PUT", ["logger"]) => logger::parse_put(&body).and_then(action),
        ("PUT", ["metrics"]) => metrics::parse_put(&body).and_then(action),
        ("PUT", ["serial"]) => serial::parse_put(&body).and_then(action),
        ("PUT", ["vsock"] | ["vsock", _]) => vsock::parse_put(&body).and_then(action),
        ("PUT", ["entropy"]) => entropy::parse_put(&body).and_then(action),
        ("PUT", ["balloon"]) => balloon::parse_put(&body).and_then(action),
        ("PATCH", ["balloon"]) => balloon::parse_patch(&body).and_then(action),
        ("GET", ["balloon"]) => action(VmmAction::GetBalloon),
        ("PATCH", ["balloon", "statistics"]) => {
            balloon::parse_patch_statistics(&body).and_then(action)
        }
        ("GET", ["balloon", "statistics"]) => action(VmmAction::GetBalloonStatistics),
        ("PATCH", ["balloon", "hinting", "start"]) => {
            balloon::parse_start_hinting(&body).and_then(action)
        }
        ("PATCH", ["balloon", "hinting", "stop"]) => action(VmmAction::StopBalloonHinting),
        ("GET", ["balloon", "hinting", "status"]) => action(VmmAction::GetBalloonHintingStatus),
        ("PUT", ["snapshot", "create"]) => snapshot::parse_create(&body).and_then(action),
        ("PUT", ["snapshot", "load"]) => snapshot::parse_load(&body).and_then(action),
        ("GET", ["mmds", ..]) => mmds::parse_get(&body).and_then(action),
        ("PUT", ["mmds", rest @ ..]) => mmds::parse_put(&body, rest).and_then(action),
        ("PATCH", ["mmds", ..]) => mmds::parse_patch(&body).and_then(action),
        ("GET", ["migration"]) => action(VmmAction::GetMigration),
        ("PUT", ["migration", "send"]) => migration::parse_send(&body).and_then(action),
        ("PUT", ["migration", "receive"]) => migration::parse_receive(&body).and_then(action),
        ("PUT", ["migration", "cancel"]) => migration::parse_cancel(&body).and_then(action),
        (_, [resource, ..]) if unsupported::is_unsupported(resource) => {
            Err(unsupported::parse(&body, resource))
        }
        _ => Err(RequestError::InvalidPathMethod(
            method.to_string(),
            path.to_string(),
        )),
    }
}

/// A request body with what is needed to report errors about it.
pub(crate) struct Body<'a> {
    method: &'a str,
    path: &'a str,
    bytes: Option<&'a [u8]>,
}

impl Body<'_> {
    /// Refuses a body, for a DELETE.
    pub(crate) fn none(&self) -> Result<(), RequestError> {
        match self.bytes {
            Some(_) => Err(RequestError::DeleteWithBody),
            None => Ok(()),
        }
    }

    /// Deserializes the body, which must be present.
    pub(crate) fn json<T: DeserializeOwned>(&self) -> Result<T, RequestError> {
        let bytes = self.bytes.ok_or_else(|| {
            RequestError::EmptyBody(self.method.to_string(), self.path.to_string())
        })?;
        serde_json::from_slice(bytes).map_err(|err| RequestError::InvalidJson(err.to_string()))
    }
}

/// Checks a path id and that the body names the same resource.
pub(crate) fn check_ids(path_id: &str, body_id: &str) -> Result<(), RequestError> {
    if !vmm_config::is_valid_id(path_id) {
        return Err(RequestError::InvalidId(path_id.to_string()));
    }
    if path_id != body_id {
        return Err(RequestError::IdMismatch {
            path_id: path_id.to_string(),
            body_id: body_id.to_string(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(method: &str, path: &str, body: &str) -> Result<ParsedRequest, RequestError> {
        parse_request(method, path, Some(body.as_bytes()))
    }

    #[test]
    fn routes_known_paths() {
        assert_eq!(
            parse("GET", "/", ""),
            Ok(ParsedRequest::Action(VmmAction::GetInstanceInfo))
        );
        assert_eq!(parse("GET", "/version", ""), Ok(ParsedRequest::GetVersion));
        assert_eq!(
            parse("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#),
            Ok(ParsedRequest::Action(VmmAction::InstanceStart))
        );
        assert_eq!(
            parse("PATCH", "/vm", r#"{"state": "Paused"}"#),
            Ok(ParsedRequest::Action(VmmAction::Pause))
        );
    }

    #[test]
    fn unknown_paths_and_methods_are_400_not_404() {
        assert_eq!(
            parse("GET", "/nope", ""),
            Err(RequestError::InvalidPathMethod(
                "GET".into(),
                "/nope".into()
            ))
        );
        assert!(matches!(
            parse("DELETE", "/machine-config", ""),
            Err(RequestError::InvalidPathMethod(..))
        ));
    }

    #[test]
    fn bodies_are_required_and_strict() {
        assert!(matches!(
            parse_request("PUT", "/boot-source", None),
            Err(RequestError::EmptyBody(..))
        ));
        let err = parse(
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": 1, "mem_size_mib": 128, "x": 1}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("unknown field `x`"), "{err}");
        assert!(matches!(
            parse("PUT", "/machine-config", "{not json"),
            Err(RequestError::InvalidJson(_))
        ));
    }

    #[test]
    fn delete_unplugs_a_drive_or_an_interface_and_takes_no_body() {
        assert_eq!(
            parse("DELETE", "/drives/data", ""),
            Ok(ParsedRequest::Action(VmmAction::DeleteDrive("data".into())))
        );
        assert_eq!(
            parse("DELETE", "/network-interfaces/eth1", ""),
            Ok(ParsedRequest::Action(VmmAction::DeleteNetworkInterface(
                "eth1".into()
            )))
        );
        assert_eq!(
            parse("DELETE", "/drives/data", "{}"),
            Err(RequestError::DeleteWithBody)
        );
        assert!(matches!(
            parse("DELETE", "/drives/bad%20id", ""),
            Err(RequestError::InvalidId(_))
        ));
        assert!(
            parse("DELETE", "/vsock", "").is_err(),
            "only drives and interfaces"
        );
    }

    #[test]
    fn path_and_body_ids_must_match() {
        let err = parse(
            "PUT",
            "/drives/root",
            r#"{"drive_id": "other", "path_on_host": "/x", "is_root_device": true}"#,
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "The id from the path [root] does not match the id from the body [other]!"
        );
        assert!(matches!(
            parse(
                "PUT",
                "/network-interfaces/bad%20id",
                r#"{"iface_id": "bad%20id"}"#
            ),
            Err(RequestError::InvalidId(_))
        ));
    }

    #[test]
    fn vsock_is_put_with_or_without_a_path_segment() {
        let body = r#"{"guest_cid": 3, "uds_path": "/v.sock"}"#;
        for path in ["/vsock", "/vsock/vsock0", "/vsock/anything"] {
            let Ok(ParsedRequest::Action(VmmAction::PutVsock(config))) = parse("PUT", path, body)
            else {
                panic!("{path} is not a PutVsock");
            };
            assert_eq!(config.uds_path, "/v.sock");
        }
        assert!(matches!(
            parse("PUT", "/vsock/a/b", body),
            Err(RequestError::InvalidPathMethod(..))
        ));
        assert!(matches!(
            parse(
                "PUT",
                "/vsock",
                r#"{"guest_cid": 1, "uds_path": "/v.sock"}"#
            ),
            Err(RequestError::InvalidJson(_))
        ));
    }

    #[test]
    fn snapshots_are_created_and_loaded_with_firecrackers_bodies() {
        let Ok(ParsedRequest::Action(VmmAction::CreateSnapshot(create))) = parse(
            "PUT",
            "/snapshot/create",
            r#"{"mem_file_path": "m", "snapshot_path": "s"}"#,
        ) else {
            panic!("not a CreateSnapshot");
        };
        assert_eq!(create.snapshot_path.to_str(), Some("s"));
        let Ok(ParsedRequest::Action(VmmAction::LoadSnapshot(load))) = parse(
            "PUT",
            "/snapshot/load",
            r#"{"snapshot_path": "s", "mem_file_path": "m", "resume_vm": true}"#,
        ) else {
            panic!("not a LoadSnapshot");
        };
        assert!(load.resume_vm);
        let err = parse("PUT", "/snapshot/load", r#"{"snapshot_path": "s"}"#).unwrap_err();
        assert!(
            err.to_string().contains(vmm_config::LOAD_MISSING_FIELD),
            "{err}"
        );
        assert!(matches!(
            parse("GET", "/snapshot/create", ""),
            Err(RequestError::InvalidPathMethod(..))
        ));
    }

    #[test]
    fn unbuilt_features_answer_not_supported() {
        let err = parse("PUT", "/cpu-config", r#"{"kvm_capabilities": []}"#).unwrap_err();
        assert!(matches!(err, RequestError::NotSupported(_)), "{err}");
        // Their bodies are still parsed.
        assert!(matches!(
            parse("PUT", "/cpu-config", "{oops"),
            Err(RequestError::InvalidJson(_))
        ));
    }

    #[test]
    fn mmds_config_parses_with_firecrackers_defaults_and_refuses_unknown_fields() {
        let Ok(ParsedRequest::Action(VmmAction::PutMmdsConfig(config))) =
            parse("PUT", "/mmds/config", r#"{"network_interfaces": ["eth0"]}"#)
        else {
            panic!("not an MMDS config");
        };
        assert_eq!(config.version, vmm_config::MmdsVersion::V1);
        assert_eq!(config.ipv4(), vmm_config::DEFAULT_MMDS_IPV4);
        assert!(matches!(
            parse(
                "PUT",
                "/mmds/config",
                r#"{"network_interfaces": [], "v": 2}"#
            ),
            Err(RequestError::InvalidJson(_))
        ));
        assert!(matches!(
            parse(
                "PUT",
                "/mmds/config",
                r#"{"version": "V3", "network_interfaces": []}"#
            ),
            Err(RequestError::InvalidJson(_))
        ));
    }

    #[test]
    fn mmds_paths_parse_as_firecracker_routes_them() {
        assert_eq!(
            parse("PUT", "/mmds", r#"{"latest": {"a": 1}}"#),
            Ok(ParsedRequest::Action(VmmAction::PutMmds(
                serde_json::json!({"latest": {"a": 1}})
            )))
        );
        assert_eq!(
            parse("PATCH", "/mmds/ignored", r#"[1]"#),
            Ok(ParsedRequest::Action(VmmAction::PatchMmds(
                serde_json::json!([1])
            )))
        );
        assert_eq!(
            parse_request("GET", "/mmds/x", None),
            Ok(ParsedRequest::Action(VmmAction::GetMmds))
        );
        let err = |method, path, body: Option<&str>| {
            parse_request(method, path, body.map(str::as_bytes))
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            err("GET", "/mmds", Some("{}")),
            "GET request cannot have a body."
        );
        assert_eq!(err("PUT", "/mmds", None), "Empty PUT request.");
        assert_eq!(err("PATCH", "/mmds", None), "Empty PATCH request.");
        assert_eq!(
            err("PUT", "/mmds/other", Some("{}")),
            "Unrecognized PUT request path `other`."
        );
    }

    #[test]
    fn balloon_paths_parse_as_firecracker_routes_them() {
        let action = |method, path, body| match parse(method, path, body) {
            Ok(ParsedRequest::Action(action)) => action,
            other => panic!("{method} {path}: {other:?}"),
        };
        assert!(matches!(
            action(
                "PUT",
                "/balloon",
                r#"{"amount_mib": 0, "deflate_on_oom": true}"#
            ),
            VmmAction::PutBalloon(_)
        ));
        assert_eq!(
            action("PATCH", "/balloon", r#"{"amount_mib": 4}"#),
            VmmAction::PatchBalloon(vmm_config::BalloonUpdateConfig { amount_mib: 4 })
        );
        assert_eq!(action("GET", "/balloon", ""), VmmAction::GetBalloon);
        assert!(matches!(
            action(
                "PATCH",
                "/balloon/statistics",
                r#"{"stats_polling_interval_s": 2}"#
            ),
            VmmAction::PatchBalloonStatistics(_)
        ));
        assert_eq!(
            action("GET", "/balloon/statistics", ""),
            VmmAction::GetBalloonStatistics
        );
        assert_eq!(
            action("PATCH", "/balloon/hinting/start", ""),
            VmmAction::StartBalloonHinting(Default::default())
        );
        assert_eq!(
            action(
                "PATCH",
                "/balloon/hinting/start",
                r#"{"acknowledge_on_stop": false}"#
            ),
            VmmAction::StartBalloonHinting(vmm_config::StartHintingCmd {
                acknowledge_on_stop: false
            })
        );
        assert_eq!(
            action("PATCH", "/balloon/hinting/stop", ""),
            VmmAction::StopBalloonHinting
        );
        assert_eq!(
            action("GET", "/balloon/hinting/status", ""),
            VmmAction::GetBalloonHintingStatus
        );
        assert!(matches!(
            parse("PUT", "/balloon", "{oops"),
            Err(RequestError::InvalidJson(_))
        ));
        assert!(matches!(
            parse(
                "PATCH",
                "/balloon",
                r#"{"amount_mib": 4, "deflate_on_oom": true}"#
            ),
            Err(RequestError::InvalidJson(_))
        ));
        assert!(matches!(
            parse("GET", "/balloon/hinting", ""),
            Err(RequestError::InvalidPathMethod(..))
        ));
    }
}
