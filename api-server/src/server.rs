//! The API thread: accepts HTTP/1.1 requests on the Unix socket (dbs-uhttp,
//! Firecracker's micro-http), parses them, hands each action to the VMM
//! thread and answers with its outcome.
//!
//! The server is non-blocking per connection: a client that sends half a
//! request and goes silent holds only its own connection, until the
//! request's 10 s deadline closes it. At most 256 connections are served;
//! a new one beyond that closes the longest-idle one (see the dbs-uhttp
//! patch in `third_party/`). The thread never touches VM state; it waits on
//! the VMM's reply, so the vCPUs never wait on it.

use std::io;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;

use dbs_uhttp::{Body, HttpServer, MediaType, Request, Response, StatusCode, Version};
use vmm_sys_util::eventfd::EventFd;

use crate::action::{ActionError, VmmAction, VmmData};
use crate::request::{parse_request, ParsedRequest};
use crate::{FaultBody, VMM_VERSION};

/// Firecracker's default limit for request bodies.
pub const DEFAULT_MAX_PAYLOAD_SIZE: usize = 51200;
/// The longest path a Unix socket address holds (`sun_path` less the NUL).
const MAX_SOCKET_PATH: usize = 107;

/// Errors starting the API server.
#[derive(Debug, thiserror::Error)]
pub enum ApiServerError {
    #[error("the API socket path {path} is {len} bytes long; a Unix socket path holds at most {MAX_SOCKET_PATH}")]
    PathTooLong { path: String, len: usize },
    #[error("cannot create the API socket {path}: the directory {dir} does not exist")]
    MissingDirectory { path: String, dir: String },
    #[error("cannot remove the stale API socket {path}: {source}")]
    RemoveStale { path: String, source: io::Error },
    #[error("cannot bind the API socket {path}: {source}")]
    Bind { path: String, source: io::Error },
    #[error("cannot start the API server: {0}")]
    Server(String),
    #[error("cannot start the API thread: {0}")]
    Spawn(io::Error),
    #[error("cannot confine the API thread: {0}")]
    Confine(String),
}

/// The API thread's link to the VMM thread: it sends an action, wakes the
/// VMM's event loop, and waits for the outcome.
pub struct VmmChannel {
    pub requests: Sender<VmmAction>,
    pub wake: EventFd,
    pub responses: Receiver<Result<VmmData, ActionError>>,
    /// Answers this thread has taken from `responses`, so that the VMM
    /// can tell that its last answer is on its way before the process
    /// ends (the source of a live migration).
    pub taken: Arc<AtomicU64>,
}

/// The bound, not yet running, API server.
pub struct ApiServer {
    http: HttpServer,
    vmm: VmmChannel,
}

/// Binds `path`, replacing a stale socket file left by an earlier run.
fn bind(path: &Path) -> Result<UnixListener, ApiServerError> {
    let display = || path.display().to_string();
    let len = path.as_os_str().len();
    if len > MAX_SOCKET_PATH {
        return Err(ApiServerError::PathTooLong {
            path: display(),
            len,
        });
    }
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !dir.is_dir() {
        return Err(ApiServerError::MissingDirectory {
            path: display(),
            dir: dir.display().to_string(),
        });
    }
    match std::fs::remove_file(path) {
        Ok(()) => log::info!("replaced the stale API socket {}", display()),
        Err(err) if err.kind() == io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(ApiServerError::RemoveStale {
                path: display(),
                source,
            })
        }
    }
    UnixListener::bind(path).map_err(|source| ApiServerError::Bind {
        path: display(),
        source,
    })
}

impl ApiServer {
    /// Binds the socket; requests larger than `max_payload` are refused.
    pub fn bind(path: &Path, max_payload: usize, vmm: VmmChannel) -> Result<Self, ApiServerError> {
        let listener = bind(path)?;
        let fd = std::os::fd::IntoRawFd::into_raw_fd(listener);
        let mut http = HttpServer::new_from_fd(fd)
            .map_err(|err| ApiServerError::Server(format!("{err:?}")))?;
        http.set_payload_max_size(max_payload);
        Ok(Self { http, vmm })
    }

    /// Runs the server on its own thread. The thread first runs `confine`
    /// (it installs the API thread's seccomp filter) and serves no request
    /// unless that succeeds; its error is returned here.
    pub fn spawn(
        self,
        confine: impl FnOnce() -> Result<(), String> + Send + 'static,
    ) -> Result<JoinHandle<()>, ApiServerError> {
        let (confined, outcome) = std::sync::mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name("fc_api".into())
            .spawn(move || {
                let result = confine();
                let ok = result.is_ok();
                let _ = confined.send(result);
                if ok {
                    self.run();
                }
            })
            .map_err(ApiServerError::Spawn)?;
        match outcome.recv() {
            Ok(Ok(())) => Ok(thread),
            Ok(Err(err)) => Err(ApiServerError::Confine(err)),
            Err(_) => Err(ApiServerError::Confine(
                "the API thread ended before it was confined".into(),
            )),
        }
    }

    fn run(mut self) {
        if let Err(err) = self.http.start_server() {
            log::error!("the API server cannot start: {err:?}");
            return;
        }
        loop {
            let requests = match self.http.requests() {
                Ok(requests) => requests,
                Err(err) => {
                    // One client's broken connection; the others carry on.
                    log::debug!("API server: {err:?}");
                    continue;
                }
            };
            // Responses are queued here and written when the connection
            // polls writable; flushing them eagerly would leave the
            // connection registered for writes only, breaking keep-alive.
            for request in requests {
                let response = request.process(|req| self.handle(req));
                if let Err(err) = self.http.respond(response) {
                    log::warn!("API server: cannot queue a response: {err:?}");
                }
            }
        }
    }

    fn handle(&self, request: &Request) -> Response {
        let method = request.method().to_str();
        let path = request.uri().get_abs_path();
        let body = request.body.as_ref().map(|b| b.raw());
        log::debug!("API request: {method} {path}");
        match parse_request(method, path, body) {
            Ok(ParsedRequest::GetVersion) => json_response(
                StatusCode::OK,
                serde_json::json!({ "firecracker_version": VMM_VERSION }).to_string(),
            ),
            Ok(ParsedRequest::Action(action)) => match self.ask_vmm(action) {
                Ok(data) => data_response(data),
                Err(err @ ActionError::TooLarge(_)) => fault(StatusCode::PayloadTooLarge, err),
                Err(err) => fault(StatusCode::BadRequest, err),
            },
            Err(err) => {
                log::info!("API request {method} {path} refused: {err}");
                fault(StatusCode::BadRequest, err)
            }
        }
    }

    fn ask_vmm(&self, action: VmmAction) -> Result<VmmData, ActionError> {
        let gone = || ActionError::failed("the VMM is not answering");
        self.vmm.requests.send(action).map_err(|_| gone())?;
        self.vmm.wake.write(1).map_err(|_| gone())?;
        let answer = self.vmm.responses.recv().map_err(|_| gone())?;
        self.vmm.taken.fetch_add(1, Ordering::Release);
        answer
    }
}

fn json_response(status: StatusCode, body: String) -> Response {
    let mut response = Response::new(Version::Http11, status);
    response.set_content_type(MediaType::ApplicationJson);
    response.set_body(Body::new(body));
    response
}

fn fault(status: StatusCode, message: impl std::fmt::Display) -> Response {
    json_response(status, FaultBody::new(message).to_json())
}

fn data_response(data: VmmData) -> Response {
    let to_json = |value: Result<String, serde_json::Error>| match value {
        Ok(text) => json_response(StatusCode::OK, text),
        Err(err) => fault(StatusCode::InternalServerError, err),
    };
    match data {
        VmmData::Empty => Response::new(Version::Http11, StatusCode::NoContent),
        VmmData::InstanceInfo(info) => to_json(serde_json::to_string(&info)),
        VmmData::MachineConfig(config) => to_json(serde_json::to_string(&config)),
        VmmData::VmConfig(value) => to_json(serde_json::to_string(&value)),
        VmmData::MigrationStatus(status) => to_json(serde_json::to_string(&status)),
        VmmData::BalloonConfig(config) => to_json(serde_json::to_string(&config)),
        VmmData::BalloonStats(stats) => to_json(serde_json::to_string(&stats)),
        VmmData::HintingStatus(status) => to_json(serde_json::to_string(&status)),
        VmmData::Mmds(value) => to_json(serde_json::to_string(&value)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_path_errors_are_clear() {
        let long = format!("/tmp/{}", "x".repeat(120));
        assert!(matches!(
            bind(Path::new(&long)),
            Err(ApiServerError::PathTooLong { .. })
        ));
        let err = bind(Path::new("/no/such/dir/api.sock")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "cannot create the API socket /no/such/dir/api.sock: the directory /no/such/dir does not exist"
        );
    }

    #[test]
    fn stale_sockets_are_replaced() {
        let dir = std::env::temp_dir().join(format!("tessera-api-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("api.sock");
        drop(bind(&path).unwrap());
        assert!(path.exists(), "the first bind leaves a stale socket file");
        assert!(bind(&path).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
