//! The VMM's virtio-net control queue (served by the VMM itself, on its
//! event loop) on a queue a hostile guest laid out.
#![no_main]

use arbitrary::Arbitrary;
use devices::vhost_user::net::CtrlQueue;
use libfuzzer_sys::fuzz_target;
use tessera_fuzz::GuestRing;

#[derive(Arbitrary, Debug)]
struct Input {
    ring: GuestRing,
    max_pairs: u8,
    kicks: u8,
}

fuzz_target!(|input: Input| {
    let mem = input.ring.memory();
    let layout = input.ring.queue_layout();
    let max_pairs = u16::from(input.max_pairs % 8) + 1;
    let Ok(mut ctrl) = CtrlQueue::new("fuzz", &mem, &layout, 256, input.ring.event_idx, max_pairs)
    else {
        return;
    };
    for _ in 0..=input.kicks % 4 {
        ctrl.process(&mem, None);
    }
    assert!((1..=max_pairs).contains(&ctrl.pairs()));
});
