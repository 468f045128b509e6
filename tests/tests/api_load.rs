//! The API under load and against slow clients, with the default seccomp
//! filters: many idle connections, and requests whose bytes arrive apart.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use serde_json::json;
use tessera_tests::api::{ApiClient, ApiVm};
use tessera_tests::guest_artifacts;

const DEADLINE: Duration = Duration::from_secs(60);
/// What the API thread serves at once (dbs-uhttp's cap).
const MAX_API_CONNECTIONS: usize = 256;

fn count_ticks(stdout: &str) -> usize {
    stdout
        .lines()
        .filter(|l| l.starts_with("probe.tick="))
        .count()
}

fn start_probe_guest(c: &mut ApiClient) {
    let boot = json!({
        "kernel_image_path": guest_artifacts().probe(),
        "boot_args": "console=ttyS0 probe.ticks=0",
    });
    assert_eq!(c.put("/boot-source", &boot.to_string()).status, 204);
    let start = c.put("/actions", r#"{"action_type": "InstanceStart"}"#);
    assert_eq!(start.status, 204, "{}", start.body);
}

/// `true` if the server has closed `stream` (it reads end-of-file).
fn closed_by_server(mut stream: &UnixStream) -> bool {
    stream.set_nonblocking(true).expect("nonblocking");
    matches!(stream.read(&mut [0; 64]), Ok(0))
}

/// Lets this process hold `fds` files (the soft limit is often 1024).
fn allow_open_files(fds: u64) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes only the struct it is given.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    assert_eq!(rc, 0);
    if limit.rlim_cur < fds {
        limit.rlim_cur = fds.min(limit.rlim_max);
        // SAFETY: setrlimit only reads the struct it is given.
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) }, 0);
    }
}

#[test]
fn a_thousand_idle_connections_leave_the_api_and_the_guest_running() {
    allow_open_files(4096);
    let mut api = ApiVm::start(&[]);
    let mut c = api.client();
    start_probe_guest(&mut c);
    api.vm
        .wait_until(DEADLINE, |out, _| out.contains("probe.tick=2"));

    let idle: Vec<UnixStream> = (0..1000)
        .map(|i| {
            UnixStream::connect(&api.socket)
                .unwrap_or_else(|err| panic!("connection {i} to the API socket: {err}"))
        })
        .collect();

    let mut fresh = api.client();
    let info = fresh.get("/");
    assert_eq!(info.status, 200, "{}", info.body);
    assert_eq!(info.json()["state"], "Running");
    // The server made room by closing the longest-idle connections.
    let held = idle
        .iter()
        .filter(|stream| !closed_by_server(stream))
        .count();
    assert!(
        held < MAX_API_CONNECTIONS,
        "the server holds {held} of the idle connections"
    );
    assert!(held > 0, "the most recent idle connections stay open");
    eprintln!("the server still holds {held} of the 1,000 idle connections");

    let ticks = count_ticks(&api.vm.stdout());
    api.vm
        .wait_until(DEADLINE, |out, _| count_ticks(out) >= ticks + 2);
    assert!(
        count_ticks(&api.vm.stdout()) >= ticks + 2,
        "the guest stopped ticking"
    );
    assert_eq!(fresh.get("/").json()["state"], "Running");
    let run = api.vm.finish();
    assert!(
        run.status.is_none(),
        "the VMM exited during the test: {:?}\n{}",
        run.status,
        run.describe()
    );
}

#[test]
fn a_request_sent_a_byte_at_a_time_gets_one_answer_and_holds_up_nobody() {
    let api = ApiVm::start(&[]);
    let mut fast = api.client();
    let socket = api.socket.clone();
    let body = r#"{"vcpu_count": 1, "mem_size_mib": 200}"#;
    let request = format!(
        "PUT /machine-config HTTP/1.1\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let slow_sender = std::thread::spawn({
        let mut stream = UnixStream::connect(&socket).expect("connect");
        move || {
            for byte in request.as_bytes() {
                stream.write_all(&[*byte]).expect("send a byte");
                std::thread::sleep(Duration::from_millis(3));
            }
            stream
        }
    });

    let mut slowest = Duration::ZERO;
    while !slow_sender.is_finished() {
        let asked = Instant::now();
        assert_eq!(fast.get("/machine-config").status, 200);
        slowest = slowest.max(asked.elapsed());
    }
    eprintln!("the fast client's slowest answer took {slowest:?}");
    assert!(
        slowest < Duration::from_secs(1),
        "the fast client waited {slowest:?} beside the slow one"
    );

    let mut slow = ApiClient::from_stream(slow_sender.join().expect("slow sender"));
    // One answer, the request's own; the next request gets the next one.
    let answer = slow.read_response();
    assert_eq!(answer.status, 204, "{}", answer.body);
    let config = slow.get("/machine-config");
    assert_eq!(config.status, 200, "{}", config.body);
    assert_eq!(config.json()["mem_size_mib"], 200);
}

#[test]
fn a_partial_request_times_out_and_closes_only_its_connection() {
    let api = ApiVm::start(&[]);
    let mut c = api.client();
    let mut partial = UnixStream::connect(&api.socket).expect("connect");
    partial
        .write_all(b"GET /machine-config HTTP/1.1\r\n")
        .unwrap();
    partial
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let sent = Instant::now();
    let mut buf = [0; 64];
    let read = partial.read(&mut buf).expect("the server closes it");
    assert_eq!(read, 0, "{:?}", String::from_utf8_lossy(&buf[..read]));
    assert!(
        sent.elapsed() >= Duration::from_secs(5),
        "closed after {:?}",
        sent.elapsed()
    );
    assert_eq!(c.get("/machine-config").status, 200);
}
