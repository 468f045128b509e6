//! The launcher's side of the launch protocol: one SEQPACKET message from a
//! (possibly compromised) jailed VMM, with file descriptors attached, read
//! by the launcher's receiver, decoded as a `LaunchRequest` and checked
//! by the launcher's rules (device id, the backend flag whitelist).
#![no_main]

use std::os::fd::AsFd;
use std::os::unix::net::UnixDatagram;

use jailer::launch::{receive_message, LaunchRequest};
use libfuzzer_sys::fuzz_target;

// The input's first byte says how many fds ride along (0 to 3); the rest
// is the message.
fuzz_target!(|bytes: &[u8]| {
    let Some((&fd_count, body)) = bytes.split_first() else {
        return;
    };
    // A datagram pair keeps message boundaries, as SEQPACKET does.
    let Ok((vmm, launcher)) = UnixDatagram::pair() else {
        return;
    };
    tessera_fuzz::send_datagram(&vmm, body, usize::from(fd_count % 4));
    drop(vmm);
    if let Ok(Some((body, _fds))) = receive_message(launcher.as_fd()) {
        if let Ok(request) = serde_json::from_slice::<LaunchRequest>(&body) {
            let _ = jailer::id::validate_device_id(&request.device_id);
            if jailer::backend_flags::check_args(request.kind, &request.args).is_ok() {
                let _ = jailer::backend_flags::net_queues(&request.args);
            }
        }
    }
});
