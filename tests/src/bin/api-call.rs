//! `api-call SOCKET METHOD PATH [BODY]`: sends one request to a tessera API
//! socket and prints the status and body. It exits 0 on a 2xx answer. The
//! nested suite uses it inside L1, where there is no curl.

use std::path::Path;
use std::process::ExitCode;

use tessera_tests::api::ApiClient;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (socket, method, path) = match args.as_slice() {
        [socket, method, path, ..] => (socket, method, path),
        _ => {
            eprintln!("usage: api-call SOCKET METHOD PATH [BODY]");
            return ExitCode::from(2);
        }
    };
    let mut client = ApiClient::connect(Path::new(socket));
    let response = client.request(method, path, args.get(3).map(String::as_str));
    println!("{} {}", response.status, response.body);
    if (200..300).contains(&response.status) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
