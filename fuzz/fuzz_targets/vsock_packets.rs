//! vhost-user-vsock's packet path on chains a hostile guest laid out: a
//! host client (optionally) connects through the hybrid socket and sends
//! a `CONNECT` line and bytes; then TX chains are parsed as packets
//! (virtio-vsock's parser, at most `MAX_PACKETS_PER_EVENT` as a worker per
//! event) and handed to the muxer; then the host side's events are taken
//! and the rest of the ring's chains are filled as RX buffers with what
//! the muxer owes the guest. Nothing may panic, and every packet filled
//! must fit its buffer.
#![no_main]

use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicU64, Ordering};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use tessera_fuzz::GuestRing;
use vhost_user_vsock::backend::{MAX_PACKETS_PER_EVENT, MAX_PACKET_DATA};
use vhost_user_vsock::muxer::{Muxer, MuxerConfig};
use vhost_user_vsock::packet::Header;
use virtio_queue::QueueT;
use virtio_vsock::packet::VsockPacket;

#[derive(Arbitrary, Debug)]
struct Input {
    ring: GuestRing,
    /// Packets parsed from the ring as TX before the rest serve as RX.
    tx_packets: u8,
    /// A host client's first bytes (a `CONNECT` line, or not) and more.
    host: Option<Vec<u8>>,
}

fn socket_path() -> std::path::PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir().join(format!(
        "tessera-fuzz-vsock-{}-{n}.sock",
        std::process::id()
    ))
}

fuzz_target!(|input: Input| {
    let mem: vhost_user_common::BackendMemory = input.ring.memory();
    let Some(mut queue) = input.ring.queue(&mem) else {
        return;
    };
    let path = socket_path();
    let Ok(listener) = UnixListener::bind(&path) else {
        return;
    };
    let config = MuxerConfig {
        guest_cid: 3,
        uds_path: path.clone(),
        max_connections: 16,
        stats: backend_stats::Stats::private(),
    };
    let muxer = Muxer::new(config, listener);
    let _ = std::fs::remove_file(&path);
    let Ok(mut muxer) = muxer else {
        return;
    };
    let _client = input.host.as_ref().and_then(|bytes| {
        let mut client = UnixStream::connect(&path).ok()?;
        client.set_nonblocking(true).ok()?;
        let _ = client.write(bytes);
        Some(client)
    });
    let _ = muxer.on_host_events();
    let _ = muxer.on_host_events();
    let tx = usize::from(input.tx_packets).min(MAX_PACKETS_PER_EVENT);
    for _ in 0..tx {
        let Some(mut chain) = queue.pop_descriptor_chain(&mem) else {
            break;
        };
        let head = chain.head_index();
        if let Ok(packet) = VsockPacket::from_tx_virtq_chain(&mem, &mut chain, MAX_PACKET_DATA) {
            muxer.on_guest_packet(&Header::of(&packet), packet.data_slice());
        }
        let _ = queue.add_used(&mem, head, 0);
    }
    let _ = muxer.on_host_events();
    for _ in 0..MAX_PACKETS_PER_EVENT {
        if !muxer.has_rx_work() {
            break;
        }
        let Some(mut chain) = queue.pop_descriptor_chain(&mem) else {
            break;
        };
        let head = chain.head_index();
        let Ok(mut packet) = VsockPacket::from_rx_virtq_chain(&mem, &mut chain, MAX_PACKET_DATA)
        else {
            let _ = queue.add_used(&mem, head, 0);
            continue;
        };
        let room = packet.data_slice().map_or(0, |d| d.len());
        let mut header = Header::default();
        let Some(len) = muxer.fill_rx(&mut header, packet.data_slice()) else {
            break;
        };
        assert!(len as usize <= room, "{len} bytes filled into {room}");
        header.write_to(&mut packet);
        let _ = queue.add_used(&mem, head, len);
    }
});
