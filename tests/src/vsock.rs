//! The host side of Firecracker's hybrid vsock, as a client sees it:
//! `CONNECT <port>` on the device's Unix socket, answered `OK <host
//! port>`, then a byte stream to the guest's listener.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::thread;
use std::time::Duration;

use crate::{wait_for_listener, workspace_bin, Running};

/// Connects through the host socket `uds` to guest port `port`: the
/// stream after `OK <host port>`, or the line that came instead (empty
/// if the connection just ended).
pub fn connect(uds: &Path, port: u32) -> Result<UnixStream, String> {
    let mut stream = UnixStream::connect(uds).map_err(|err| err.to_string())?;
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(|err| err.to_string())?;
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .map_err(|err| err.to_string())?;
    let line = read_line(&mut stream);
    match line.strip_prefix("OK ") {
        Some(host_port) if host_port.trim().parse::<u32>().is_ok() => Ok(stream),
        _ => Err(line),
    }
}

/// Reads up to a newline, a byte at a time (what follows is the stream's).
pub fn read_line(stream: &mut UnixStream) -> String {
    let mut line = Vec::new();
    let mut byte = [0u8];
    while line.len() < 64 {
        match stream.read(&mut byte) {
            Ok(1) if byte[0] == b'\n' => break,
            Ok(1) => line.push(byte[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&line).into_owned()
}

/// `len` bytes that differ from one `seed` to the next.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[3] ^ seed)
        .collect()
}

/// Whether `bytes` are the guest tools' pattern `i % 251` from 0.
pub fn is_guest_pattern(bytes: &[u8]) -> bool {
    bytes.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8)
}

/// Sends `data` on `stream` from a thread while reading the echo here;
/// returns what came back.
pub fn echo_through(stream: UnixStream, data: Vec<u8>) -> Vec<u8> {
    let mut writer = stream.try_clone().expect("clone the stream");
    let len = data.len();
    let sender = thread::spawn(move || writer.write_all(&data).expect("send"));
    let mut reader = stream;
    let mut got = vec![0u8; len];
    reader.read_exact(&mut got).expect("read the echo");
    sender.join().expect("the sender");
    got
}

/// Starts `vhost-user-vsock` on its own (guest CID 3): its vhost-user
/// socket at `socket`, its host side at `uds`; returns once it listens.
pub fn spawn_backend(socket: &Path, uds: &Path) -> Running {
    let mut command = std::process::Command::new(workspace_bin("vhost-user-vsock"));
    command
        .arg("--socket")
        .arg(socket)
        .args(["--guest-cid", "3"])
        .arg("--uds-path")
        .arg(uds);
    let backend = Running::spawn(command);
    assert!(
        wait_for_listener(socket, Duration::from_secs(10)),
        "{}",
        backend.stderr()
    );
    backend
}
