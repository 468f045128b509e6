//! vhost-user-net's MMDS on a hostile guest's frames: any bytes as frames
//! to the MMDS address (ARP, IPv4, TCP segments, HTTP requests), V1 and V2,
//! with the answers drained between frames as the RX path does. Checks that
//! the stack stays bounded: every frame it makes parses as Ethernet and is
//! no longer than a 1500-byte MTU allows, and it never keeps sending.
#![no_main]

use std::net::Ipv4Addr;

use arbitrary::Arbitrary;
use backend_stats::Stats;
use libfuzzer_sys::fuzz_target;
use tessera_backend_control::{mmds_store, ControlMessage, MmdsSettings, MmdsVersion};
use vhost_user_net::mmds::Mmds;

const MMDS_IP: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);

#[derive(Arbitrary, Debug)]
enum Step {
    /// A frame as the guest wrote it, from its Ethernet header on.
    Raw(Vec<u8>),
    /// A TCP segment to port 80 built around fuzzed fields and payload.
    Segment {
        src_port: u16,
        seq: u32,
        ack: u32,
        flags: u8,
        window: u16,
        payload: Vec<u8>,
    },
    /// Up to this many frames taken by the guest.
    Drain(u8),
}

#[derive(Arbitrary, Debug)]
struct Input {
    v2: bool,
    imds_compat: bool,
    steps: Vec<Step>,
}

/// An Ethernet, IPv4 and TCP frame to MMDS (checksums left zero: MMDS
/// does not check them).
fn segment(src_port: u16, seq: u32, ack: u32, flags: u8, window: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0x06, 1, 0x23, 0x45, 0x67, 1, 2, 0, 0, 0, 0, 2, 8, 0];
    let total = (40 + payload.len()) as u16;
    f.extend([0x45, 0]);
    f.extend(total.to_be_bytes());
    f.extend([0, 0, 0, 0, 64, 6, 0, 0, 10, 0, 0, 2]);
    f.extend(MMDS_IP.octets());
    f.extend(src_port.to_be_bytes());
    f.extend(80u16.to_be_bytes());
    f.extend(seq.to_be_bytes());
    f.extend(ack.to_be_bytes());
    f.extend([0x50, flags]);
    f.extend(window.to_be_bytes());
    f.extend([0, 0, 0, 0]);
    f.extend(payload);
    f
}

fn drain(mmds: &Mmds, most: usize) {
    let mut out = Vec::new();
    for _ in 0..most {
        if !mmds.next_frame(&mut out) {
            return;
        }
        assert!(out.len() >= 14, "a frame without its Ethernet header");
        assert!(out.len() <= 14 + 1500, "a frame of {} bytes", out.len());
    }
}

fuzz_target!(|input: Input| {
    let mmds = Mmds::new(Stats::private());
    let settings = MmdsSettings {
        version: if input.v2 { MmdsVersion::V2 } else { MmdsVersion::V1 },
        imds_compat: input.imds_compat,
        ipv4_address: MMDS_IP,
        token_key: [9; 32],
        instance_id: "fuzz".into(),
    };
    mmds.control(ControlMessage::MmdsConfig(settings)).unwrap();
    let store = br#"{"latest":{"meta-data":{"ami-id":"ami-1","list":{"a":"1"},"n":1}}}"#;
    for message in mmds_store(1, store) {
        mmds.control(message).unwrap();
    }
    for step in input.steps.iter().take(256) {
        match step {
            Step::Raw(frame) => {
                if vhost_user_net::mmds::is_for_mmds(frame, MMDS_IP) {
                    mmds.receive(frame);
                }
            }
            Step::Segment {
                src_port,
                seq,
                ack,
                flags,
                window,
                payload,
            } => mmds.receive(&segment(*src_port, *seq, *ack, *flags, *window, payload)),
            Step::Drain(n) => drain(&mmds, usize::from(*n)),
        }
    }
    // Whatever is left goes, and then the stack has nothing more to say
    // until the guest speaks again.
    drain(&mmds, 100_000);
    let mut out = Vec::new();
    assert!(!mmds.next_frame(&mut out), "the stack keeps sending");
});
