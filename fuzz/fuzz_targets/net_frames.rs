//! vhost-user-net's frame path on chains a hostile guest laid out: TX
//! chains are sent (gathered straight from guest memory) to a socket that
//! stands in for the TAP, and RX chains are checked and filled from it,
//! with and without mergeable buffers, as the backend's workers do (a
//! frame is delivered whole or refused, never cut short): at
//! most `MAX_TX_PER_EVENT` chains per run, as a worker per event (a used
//! ring laid over the avail index posts a chain per completion), each read
//! no further than `MAX_DESCRIPTORS` + 1 descriptors, as the workers do.
#![no_main]

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use tessera_fuzz::GuestRing;
use vhost_user_common::ring;
use vhost_user_net::backend::MAX_TX_PER_EVENT;
use vhost_user_net::frame::{check_rx_chain, receive_into, transmit, Received, MAX_DESCRIPTORS};
use virtio_queue::QueueT;

#[derive(Arbitrary, Debug)]
struct Input {
    ring: GuestRing,
    rx: bool,
    mergeable: bool,
    frame: Vec<u8>,
}

fuzz_target!(|input: Input| {
    let mem = input.ring.memory();
    let Some(mut queue) = input.ring.queue(&mem) else {
        return;
    };
    let Ok((tap, peer)) = UnixDatagram::pair() else {
        return;
    };
    let _ = tap.set_nonblocking(true);
    let _ = peer.set_nonblocking(true);
    if !input.rx {
        for _ in 0..MAX_TX_PER_EVENT {
            let Some(chain) = queue.pop_descriptor_chain(&mem) else {
                break;
            };
            let head = chain.head_index();
            let descriptors = ring::descriptors_up_to(chain, MAX_DESCRIPTORS);
            let _ = transmit(&descriptors, &mem, tap.as_raw_fd());
            let _ = queue.add_used(&mem, head, 0);
        }
        return;
    }
    let mut chains = Vec::new();
    for _ in 0..MAX_TX_PER_EVENT {
        let Some(chain) = queue.pop_descriptor_chain(&mem) else {
            break;
        };
        let head = chain.head_index();
        let descriptors = ring::descriptors_up_to(chain, MAX_DESCRIPTORS);
        match check_rx_chain(head, &descriptors, &mem) {
            Ok(chain) => chains.push(chain),
            Err(_) => {
                let _ = queue.add_used(&mem, head, 0);
            }
        }
    }
    let _ = peer.send(&input.frame);
    let mut scratch = Vec::new();
    if let Ok(Received::Frame { len, used }) = receive_into(
        &chains,
        &mut scratch,
        &mem,
        tap.as_raw_fd(),
        input.mergeable,
    ) {
        // A frame reaches the guest whole or not at all (one too long for
        // the chains is refused, never cut short).
        assert_eq!(len, input.frame.len());
        assert!(used.len() <= chains.len());
        assert_eq!(used.iter().map(|&b| b as usize).sum::<usize>(), len);
        for (chain, bytes) in chains.iter().zip(&used) {
            assert!(*bytes as usize <= chain.capacity);
            let _ = queue.add_used(&mem, chain.head, *bytes);
        }
    }
});
