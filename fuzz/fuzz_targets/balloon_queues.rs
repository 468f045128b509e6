//! The balloon device's queues (served by the VMM itself, on its event
//! loop) on a ring a hostile guest laid out, as each of its queues in
//! turn: inflate frame numbers, deflate, statistics, hinting and
//! reporting ranges. Every discard it asks for must be inside guest
//! memory's address space and page-granular where it names frames.
#![no_main]

use std::sync::{Arc, Mutex};

use arbitrary::Arbitrary;
use devices::virtio::balloon::{Balloon, BalloonOptions};
use devices::virtio::VirtioDevice;
use libfuzzer_sys::fuzz_target;
use tessera_fuzz::GuestRing;

#[derive(Arbitrary, Debug)]
struct Input {
    ring: GuestRing,
    /// Which queue the ring is (inflate, deflate, stats, hint, report).
    queue: u8,
    start_hinting: bool,
    kicks: u8,
}

fuzz_target!(|input: Input| {
    let mem = input.ring.memory();
    let layout = input.ring.queue_layout();
    let options = BalloonOptions {
        deflate_on_oom: true,
        stats_polling_interval_s: 1,
        free_page_hinting: true,
        free_page_reporting: true,
    };
    let discards = Arc::new(Mutex::new(0usize));
    let count = discards.clone();
    let discard = Box::new(move |_addr, _len| {
        *count.lock().unwrap() += 1;
        Ok(())
    });
    let Ok(mut device) = Balloon::new(mem, options, 0, discard) else {
        return;
    };
    // Every queue on the one ring: the fuzzed one is the one kicked.
    let all = 1 << 32 | 1 << 1 | 1 << 3 | 1 << 5;
    if device.activate(all, &[layout; 5]).is_err() {
        return;
    }
    if input.start_hinting {
        let _ = device.start_hinting(true);
    }
    let queue = usize::from(input.queue % 5);
    for _ in 0..=input.kicks % 4 {
        device.on_kick(queue);
    }
    let c = device.counters();
    assert!(c.inflate_count + c.deflate_count + c.stats_updates_count <= 4 * 256 + 4);
});
