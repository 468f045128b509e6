//! The entropy device's request queue (served by the VMM itself, on its
//! event loop) on a queue a hostile guest laid out, with and without a
//! rate limiter.
#![no_main]

use arbitrary::Arbitrary;
use devices::virtio::entropy::Entropy;
use devices::virtio::VirtioDevice;
use libfuzzer_sys::fuzz_target;
use tessera_fuzz::GuestRing;
use tessera_rate_limiter::{RateLimiterConfig, TokenBucketConfig};

#[derive(Arbitrary, Debug)]
struct Input {
    ring: GuestRing,
    limited: bool,
    kicks: u8,
}

fuzz_target!(|input: Input| {
    let mem = input.ring.memory();
    let layout = input.ring.queue_layout();
    let limits = RateLimiterConfig {
        bandwidth: input.limited.then_some(TokenBucketConfig {
            size: 4096,
            one_time_burst: None,
            refill_time: 1000,
        }),
        ops: None,
    };
    let Ok(mut device) = Entropy::new(mem, &limits) else {
        return;
    };
    if device.activate(1 << 32, &[layout]).is_err() {
        return;
    }
    for _ in 0..=input.kicks % 4 {
        device.on_kick();
    }
    let c = device.counters();
    assert!(c.entropy_bytes <= c.entropy_event_count * u64::from(devices::virtio::entropy::MAX_REQUEST_BYTES));
});
