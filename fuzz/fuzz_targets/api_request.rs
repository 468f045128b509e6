//! The HTTP API up to the typed action: a request's bytes through the
//! HTTP parser (dbs-uhttp's, the server's own) and then the router and the
//! body parser of its resource. Every endpoint of Firecracker's API is in
//! the corpus.
#![no_main]

use api_server::request::parse_request;
use dbs_uhttp::Request;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    let Ok(request) = Request::try_from(bytes, Some(api_server::server::DEFAULT_MAX_PAYLOAD_SIZE))
    else {
        return;
    };
    let method = request.method().to_str();
    let path = request.uri().get_abs_path();
    let body = request.body.as_ref().map(|b| b.raw());
    let _ = parse_request(method, path, body);
});
