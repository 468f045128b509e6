//! The guest's HTTP requests to MMDS and their answers, with Firecracker's
//! rules, status codes and texts (its micro-http, and its MMDS dispatch):
//! GET reads the store (V2 wants a session token), PUT
//! `/latest/api/token` makes a token, anything else is refused.

use tessera_backend_control::MmdsVersion;

use super::store::{collapse_slashes, Format, GetError, Store};
use super::token::{Tokens, TTL_RANGE};

/// The longest request taken (Firecracker's receive buffer, less one).
pub const MAX_REQUEST: usize = 2499;

const TOKEN_PATH: &str = "/latest/api/token";
const TOKEN_HEADERS: [&str; 2] = ["X-metadata-token", "X-aws-ec2-metadata-token"];
const TTL_HEADERS: [&str; 2] = [
    "X-metadata-token-ttl-seconds",
    "X-aws-ec2-metadata-token-ttl-seconds",
];
const FORWARDED_FOR: &str = "X-Forwarded-For";

/// Where a request ends in `buf` (just past its blank line), if it has.
pub fn request_end(buf: &[u8]) -> Option<usize> {
    buf.windows(2)
        .enumerate()
        .find_map(|(at, pair)| match pair {
            [b'\n', b'\n'] => Some(at + 2),
            [b'\n', b'\r'] if buf.get(at + 2) == Some(&b'\n') => Some(at + 3),
            _ => None,
        })
}

/// An answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub version: &'static str,
    pub status: u16,
    pub json: bool,
    pub allow: bool,
    pub custom: Option<(String, String)>,
    pub body: String,
}

impl Response {
    fn text(version: &'static str, status: u16, body: impl Into<String>) -> Self {
        Self {
            version,
            status,
            json: false,
            allow: false,
            custom: None,
            body: body.into(),
        }
    }

    /// The bytes on the wire, in micro-http's order.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = format!(
            "{} {} \r\nServer: Firecracker API\r\nConnection: keep-alive\r\n",
            self.version, self.status
        );
        if self.allow {
            out.push_str("Allow: GET, PUT\r\n");
        }
        if let Some((name, value)) = &self.custom {
            out.push_str(&format!("{name}: {value}\r\n"));
        }
        let content_type = if self.json {
            "application/json"
        } else {
            "text/plain"
        };
        out.push_str(&format!(
            "Content-Type: {content_type}\r\nContent-Length: {}\r\n\r\n{}",
            self.body.len(),
            self.body
        ));
        out.into_bytes()
    }
}

/// What the guest's requests are answered from.
pub struct Context<'a> {
    pub version: MmdsVersion,
    pub imds_compat: bool,
    pub store: &'a Store,
    pub tokens: &'a Tokens,
}

/// What a request did, for the metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub no_token: bool,
    pub invalid_token: bool,
}

struct Request<'a> {
    method: &'a str,
    path: String,
    version: &'static str,
    headers: Vec<(&'a str, &'a str)>,
}

impl Request<'_> {
    fn header(&self, names: &[&str]) -> Option<(&str, &str)> {
        self.headers
            .iter()
            .find(|(name, _)| names.iter().any(|n| n.eq_ignore_ascii_case(name)))
            .copied()
    }
}

fn parse(bytes: &[u8]) -> Result<Request<'_>, Response> {
    const V11: &str = "HTTP/1.1";
    let invalid = || Response::text(V11, 400, "Invalid request.");
    if bytes.len() > MAX_REQUEST {
        return Err(invalid());
    }
    let text = std::str::from_utf8(bytes).map_err(|_| invalid())?;
    let (line, rest) = text.split_once("\r\n").ok_or_else(invalid)?;
    let mut parts = line.splitn(3, ' ');
    let (Some(method), Some(uri), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(invalid());
    };
    if !["GET", "PUT", "PATCH", "DELETE"].contains(&method) {
        return Err(Response::text(V11, 501, "Unsupported HTTP method."));
    }
    let version = match version {
        "HTTP/1.0" => "HTTP/1.0",
        "HTTP/1.1" => V11,
        _ => return Err(Response::text(V11, 501, "Unsupported HTTP version.")),
    };
    if uri.is_empty() {
        return Err(Response::text(version, 400, "Empty URI not allowed."));
    }
    let mut headers = Vec::new();
    for line in rest.split("\r\n").map(|l| l.trim_end_matches(['\r', '\n'])) {
        if line.is_empty() {
            continue;
        }
        let Some((name, value)) = line.split_once(':') else {
            let text = format!("Header is incorrectly formatted. Key: {line}");
            return Err(Response::text(version, 400, text));
        };
        let (name, value) = (name.trim(), value.trim());
        if name.eq_ignore_ascii_case("Content-Length") && value != "0" {
            return Err(Response::text(version, 400, "Invalid request."));
        }
        headers.push((name, value));
    }
    Ok(Request {
        method,
        path: abs_path(uri),
        version,
        headers,
    })
}

/// `http://host/path` means `/path`.
fn abs_path(uri: &str) -> String {
    match uri.strip_prefix("http://") {
        Some(rest) => rest.find('/').map_or(String::new(), |at| rest[at..].into()),
        None => uri.to_string(),
    }
}

/// Answers one whole request.
pub fn respond(bytes: &[u8], ctx: &Context<'_>) -> (Response, Outcome) {
    let mut outcome = Outcome::default();
    let request = match parse(bytes) {
        Ok(request) => request,
        Err(response) => return (response, outcome),
    };
    let version = request.version;
    if request.path.is_empty() {
        return (Response::text(version, 400, "Invalid URI."), outcome);
    }
    let response = match request.method {
        "GET" => get(&request, ctx, &mut outcome),
        "PUT" => put(&request, ctx),
        _ => Response {
            allow: true,
            ..Response::text(version, 405, "Not allowed HTTP method.")
        },
    };
    (response, outcome)
}

fn get(request: &Request<'_>, ctx: &Context<'_>, outcome: &mut Outcome) -> Response {
    let version = request.version;
    match (request.header(&TOKEN_HEADERS), ctx.version) {
        (None, MmdsVersion::V2) => {
            outcome.no_token = true;
            return Response::text(
                version,
                401,
                "No MMDS token provided. Use `X-metadata-token` or `X-aws-ec2-metadata-token` \
                 header to specify the session token.",
            );
        }
        (None, MmdsVersion::V1) => outcome.no_token = true,
        (Some((_, token)), _) if !ctx.tokens.is_valid(token) => {
            outcome.invalid_token = true;
            if ctx.version == MmdsVersion::V2 {
                return Response::text(version, 401, "MMDS token not valid.");
            }
        }
        (Some(_), _) => {}
    }
    let json = request
        .header(&["Accept"])
        .is_some_and(|(_, v)| v == "application/json");
    let format = if json && !ctx.imds_compat {
        Format::Json
    } else {
        Format::Imds
    };
    match ctx.store.get(&request.path, format) {
        Ok(body) => Response {
            json,
            ..Response::text(version, 200, body)
        },
        Err(GetError::NotFound) => Response::text(
            version,
            404,
            format!("Resource not found: {}.", request.path),
        ),
        Err(GetError::UnsupportedType) => Response::text(
            version,
            501,
            "Cannot retrieve value. The value has an unsupported type.",
        ),
    }
}

fn put(request: &Request<'_>, ctx: &Context<'_>) -> Response {
    let version = request.version;
    if let Some((name, _)) = request.header(&[FORWARDED_FOR]) {
        let text = format!("Invalid header. Reason: Unsupported header name. Key: {name}");
        return Response::text(version, 400, text);
    }
    if collapse_slashes(&request.path) != TOKEN_PATH {
        let text = format!("Resource not found: {}.", request.path);
        return Response::text(version, 404, text);
    }
    let Some((name, value)) = request.header(&TTL_HEADERS) else {
        return Response::text(
            version,
            400,
            "Token time to live value not found. Use `X-metadata-token-ttl-seconds` or \
             `X-aws-ec2-metadata-token-ttl-seconds` header to specify the token's lifetime.",
        );
    };
    let Ok(ttl) = value.parse::<u32>() else {
        let text = format!("Invalid header. Reason: Invalid value. Key:{name}; Value:{value}");
        return Response::text(version, 400, text);
    };
    if !TTL_RANGE.contains(&ttl) {
        let text = format!(
            "Invalid time to live value provided for token: {ttl}. Please provide a value \
             between {} and {}.",
            TTL_RANGE.start(),
            TTL_RANGE.end()
        );
        return Response::text(version, 400, text);
    }
    match ctx.tokens.generate(ttl) {
        Some(token) => Response {
            custom: Some((canonical_ttl_header(name), ttl.to_string())),
            ..Response::text(version, 200, token)
        },
        None => Response::text(version, 500, "Token generation failed."),
    }
}

/// The TTL header as Firecracker names it in its answer.
fn canonical_ttl_header(name: &str) -> String {
    TTL_HEADERS
        .iter()
        .find(|h| h.eq_ignore_ascii_case(name))
        .map_or_else(|| name.to_string(), |h| h.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_backend_control::{mmds_store, ControlMessage, TOKEN_KEY_LEN};

    fn store() -> Store {
        let mut store = Store::default();
        for m in mmds_store(1, br#"{"latest":{"meta-data":{"ami-id":"ami-1","n":1}}}"#) {
            let ControlMessage::MmdsData(piece) = m else {
                panic!()
            };
            store.piece(piece).unwrap();
        }
        store
    }

    fn ask(version: MmdsVersion, request: &str) -> Response {
        let store = store();
        let tokens = Tokens::new(&[3; TOKEN_KEY_LEN], "vm");
        let ctx = Context {
            version,
            imds_compat: false,
            store: &store,
            tokens: &tokens,
        };
        respond(request.as_bytes(), &ctx).0
    }

    #[test]
    fn a_request_ends_at_its_blank_line() {
        assert_eq!(request_end(b"GET / HTTP/1.1\r\n\r\nmore"), Some(18));
        assert_eq!(request_end(b"GET / HTTP/1.1\n\n"), Some(16));
        assert_eq!(request_end(b"GET / HTTP/1.1\r\nA: b\r\n"), None);
    }

    #[test]
    fn v1_gets_are_answered_in_both_formats() {
        let r = ask(MmdsVersion::V1, "GET /latest/meta-data/ HTTP/1.1\r\n\r\n");
        assert_eq!((r.status, r.body.as_str()), (200, "ami-id\nn"));
        assert_eq!(
            String::from_utf8(r.to_bytes()).unwrap(),
            "HTTP/1.1 200 \r\nServer: Firecracker API\r\nConnection: keep-alive\r\n\
             Content-Type: text/plain\r\nContent-Length: 8\r\n\r\nami-id\nn"
        );
        let r = ask(
            MmdsVersion::V1,
            "GET http://169.254.169.254/latest/meta-data HTTP/1.0\r\nAccept: application/json\r\n\r\n",
        );
        assert_eq!((r.status, r.json, r.version), (200, true, "HTTP/1.0"));
        assert_eq!(r.body, r#"{"ami-id":"ami-1","n":1}"#);
        let r = ask(MmdsVersion::V1, "GET /latest/nothing HTTP/1.1\r\n\r\n");
        assert_eq!(
            (r.status, r.body.as_str()),
            (404, "Resource not found: /latest/nothing.")
        );
        let r = ask(MmdsVersion::V1, "GET /latest/meta-data/n HTTP/1.1\r\n\r\n");
        assert_eq!(r.status, 501);
    }

    #[test]
    fn v2_wants_a_token_from_a_put() {
        let store = store();
        let tokens = Tokens::new(&[3; TOKEN_KEY_LEN], "vm");
        let ctx = Context {
            version: MmdsVersion::V2,
            imds_compat: false,
            store: &store,
            tokens: &tokens,
        };
        let (r, outcome) = respond(b"GET /latest HTTP/1.1\r\n\r\n", &ctx);
        assert_eq!((r.status, outcome.no_token), (401, true));
        let (r, _) = respond(
            b"PUT /latest/api/token HTTP/1.1\r\nx-metadata-token-ttl-seconds: 60\r\n\r\n",
            &ctx,
        );
        assert_eq!(r.status, 200);
        assert_eq!(
            r.custom,
            Some(("X-metadata-token-ttl-seconds".into(), "60".into()))
        );
        let get = format!(
            "GET /latest/meta-data/ami-id HTTP/1.1\r\nX-metadata-token: {}\r\n\r\n",
            r.body
        );
        let (r, _) = respond(get.as_bytes(), &ctx);
        assert_eq!((r.status, r.body.as_str()), (200, "ami-1"));
        let (r, outcome) = respond(
            b"GET /latest HTTP/1.1\r\nX-aws-ec2-metadata-token: bogus\r\n\r\n",
            &ctx,
        );
        assert_eq!(
            (r.status, r.body.as_str(), outcome.invalid_token),
            (401, "MMDS token not valid.", true)
        );
    }

    #[test]
    fn bad_requests_get_firecrackers_answers() {
        let v1 = MmdsVersion::V1;
        let put = |headers: &str| {
            ask(
                v1,
                &format!("PUT /latest/api/token HTTP/1.1\r\n{headers}\r\n"),
            )
        };
        assert_eq!(put("").status, 400);
        assert!(put("")
            .body
            .starts_with("Token time to live value not found."));
        assert_eq!(
            put("X-metadata-token-ttl-seconds: 0\r\n").body,
            "Invalid time to live value provided for token: 0. Please provide a value between 1 and 21600."
        );
        assert_eq!(
            put("X-metadata-token-ttl-seconds: -1\r\n").body,
            "Invalid header. Reason: Invalid value. Key:X-metadata-token-ttl-seconds; Value:-1"
        );
        assert_eq!(
            put("X-Forwarded-For: 1.2.3.4\r\n").body,
            "Invalid header. Reason: Unsupported header name. Key: X-Forwarded-For"
        );
        assert_eq!(ask(v1, "PUT /x HTTP/1.1\r\n\r\n").status, 404);
        let r = ask(v1, "DELETE / HTTP/1.1\r\n\r\n");
        assert_eq!((r.status, r.allow), (405, true));
        assert_eq!(ask(v1, "POST / HTTP/1.1\r\n\r\n").status, 501);
        assert_eq!(ask(v1, "GET / HTTP/2.0\r\n\r\n").status, 501);
        assert_eq!(
            ask(v1, "GET http://host HTTP/1.1\r\n\r\n").body,
            "Invalid URI."
        );
        assert_eq!(
            ask(v1, "GET / HTTP/1.1\r\nbroken\r\n\r\n").body,
            "Header is incorrectly formatted. Key: broken"
        );
        assert_eq!(
            ask(v1, "GET / HTTP/1.1\r\nContent-Length: 5\r\n\r\n").status,
            400
        );
        assert_eq!(ask(v1, "garbage\n\n").status, 400);
    }
}
