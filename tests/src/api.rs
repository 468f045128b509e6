//! A minimal HTTP/1.1 client over a Unix socket, for driving `tessera`'s API
//! the way Firecracker clients do (raw requests, keep-alive).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::{workspace_bin, Running};

/// One HTTP response.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub body: String,
}

impl HttpResponse {
    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|err| panic!("not JSON ({err}): {:?}", self.body))
    }

    /// The `fault_message` of an error body.
    pub fn fault(&self) -> String {
        self.json()["fault_message"]
            .as_str()
            .unwrap_or_else(|| panic!("no fault_message in {:?}", self.body))
            .to_string()
    }
}

/// A keep-alive connection to the API socket.
pub struct ApiClient {
    reader: BufReader<UnixStream>,
}

impl ApiClient {
    /// Connects, retrying while the socket is being created.
    pub fn connect(socket: &Path) -> Self {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match UnixStream::connect(socket) {
                Ok(stream) => return Self::from_stream(stream),
                Err(err) if Instant::now() > deadline => {
                    panic!("cannot connect to {}: {err}", socket.display())
                }
                Err(_) => std::thread::sleep(Duration::from_micros(100)),
            }
        }
    }

    /// Wraps a connection made by the caller.
    pub fn from_stream(stream: UnixStream) -> Self {
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        Self {
            reader: BufReader::new(stream),
        }
    }

    /// Sends raw bytes and reads one response.
    pub fn raw(&mut self, bytes: &[u8]) -> HttpResponse {
        self.reader.get_mut().write_all(bytes).expect("send");
        self.read_response()
    }

    /// Sends a request with an optional JSON body and reads the response.
    pub fn request(&mut self, method: &str, path: &str, body: Option<&str>) -> HttpResponse {
        let body = body.unwrap_or("");
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        self.raw(request.as_bytes())
    }

    pub fn get(&mut self, path: &str) -> HttpResponse {
        self.request("GET", path, None)
    }

    pub fn put(&mut self, path: &str, body: &str) -> HttpResponse {
        self.request("PUT", path, Some(body))
    }

    /// `PUT path` with `body`, which must be answered 204.
    pub fn put_ok(&mut self, path: &str, body: serde_json::Value) {
        let r = self.put(path, &body.to_string());
        assert_eq!(r.status, 204, "PUT {path} {body}: {}", r.body);
    }

    pub fn patch(&mut self, path: &str, body: &str) -> HttpResponse {
        self.request("PATCH", path, Some(body))
    }

    /// Reads one response.
    pub fn read_response(&mut self) -> HttpResponse {
        let mut status_line = String::new();
        self.reader
            .read_line(&mut status_line)
            .expect("status line");
        let status = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
        let mut length = 0;
        loop {
            let mut line = String::new();
            self.reader.read_line(&mut line).expect("header");
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse().expect("content length");
                }
            }
        }
        let mut body = vec![0u8; length];
        self.reader.read_exact(&mut body).expect("body");
        HttpResponse {
            status,
            body: String::from_utf8_lossy(&body).into_owned(),
        }
    }
}

/// A `tessera --api-sock` process and its socket.
pub struct ApiVm {
    pub vm: Running,
    pub socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl ApiVm {
    /// Starts tessera with an API socket in a fresh directory.
    pub fn start(extra_args: &[&str]) -> Self {
        Self::spawn(Command::new(workspace_bin("tessera")), extra_args)
    }

    /// As [`ApiVm::start`], inside `netns` (whose TAPs the guest gets).
    pub fn start_in(netns: &crate::netns::Netns, extra_args: &[&str]) -> Self {
        let tessera = workspace_bin("tessera");
        Self::spawn(
            netns.command(tessera.to_str().expect("a UTF-8 path")),
            extra_args,
        )
    }

    /// Runs `command` (tessera, or what starts it) with an API socket in a
    /// fresh directory and `extra_args`.
    fn spawn(mut command: Command, extra_args: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("api.sock");
        command.arg("--api-sock").arg(&socket).args(extra_args);
        let vm = Running::spawn(command);
        Self {
            vm,
            socket,
            _dir: dir,
        }
    }

    pub fn client(&self) -> ApiClient {
        ApiClient::connect(&self.socket)
    }

    pub fn dir(&self) -> &Path {
        self._dir.path()
    }
}

impl ApiVm {
    /// Flushes the metrics (`metrics.json` in the VM's directory, which
    /// the test configured) and sums `section.counter` over every line:
    /// each flush reports the increments since the last.
    pub fn flushed_counter(&self, c: &mut ApiClient, section: &str, counter: &str) -> u64 {
        let r = c.put("/actions", r#"{"action_type": "FlushMetrics"}"#);
        assert_eq!(r.status, 204, "{}", r.body);
        std::fs::read_to_string(self.dir().join("metrics.json"))
            .expect("the metrics file")
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter_map(|line| line[section][counter].as_u64())
            .sum()
    }
}
