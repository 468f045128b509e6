//! virtio entropy device (device id 4): reads 16 random bytes through the
//! generic driver in [`crate::virtio`] and prints
//! `probe.virtio_rng=<index>,ok` (or `,error=<reason>`).

use crate::serial::outln;
use crate::virtio::{Buffer, Error, Mmio, Transport};

/// virtio device id of the entropy device.
pub const DEVICE_ID: u32 = 4;
/// Bytes requested from the device.
const WANTED: usize = 16;
/// Requests before giving up (the device may return short reads).
const MAX_REQUESTS: usize = 8;
/// Time allowed per request.
const REQUEST_TIMEOUT_MS: u32 = 2000;

fn read_entropy(regs: Mmio) -> Result<[u8; WANTED], Error> {
    let mut transport = Transport::new(regs)?;
    transport.negotiate(0, 0)?;
    let mut queue = match transport.setup_queue(0) {
        Ok(q) => q,
        Err(e) => {
            transport.fail();
            return Err(e);
        }
    };
    transport.driver_ok();

    let mut out = [0u8; WANTED];
    let mut filled = 0;
    let mut scratch = [0u8; WANTED];
    let mut result = Err(Error::Timeout);
    for _ in 0..MAX_REQUESTS {
        let buffer = Buffer {
            addr: scratch.as_mut_ptr() as u64,
            len: WANTED as u32,
            device_writes: true,
        };
        // SAFETY: `scratch` is identity-mapped stack memory that outlives
        // the request (we wait for it, or reset the device on error before
        // returning), and it is not accessed until the chain completes.
        if let Err(e) = unsafe { queue.add(&[buffer]) } {
            result = Err(e);
            break;
        }
        transport.notify(&queue);
        match queue.wait_used(&transport, REQUEST_TIMEOUT_MS) {
            Ok(used) => {
                let got = (used.len as usize).min(WANTED);
                for i in 0..got.min(WANTED - filled) {
                    // SAFETY: in bounds; volatile because the device wrote
                    // the bytes behind the compiler's back.
                    out[filled] = unsafe { core::ptr::read_volatile(scratch.as_ptr().add(i)) };
                    filled += 1;
                }
                if filled == WANTED {
                    result = Ok(out);
                    break;
                }
            }
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    // Stop the device from touching `scratch` or the queue memory again
    // (`shutdown` marks it FAILED if the reset is not confirmed).
    let _ = transport.shutdown([queue]);
    result
}

/// Exercises the entropy device behind `regs` and prints the result line.
pub fn probe(index: i64, regs: Mmio) {
    match read_entropy(regs) {
        // 16 zero bytes from a working RNG would be a 2^-128 event.
        Ok(bytes) if bytes.iter().all(|&b| b == 0) => {
            outln!("probe.virtio_rng={},error=all-zero", index)
        }
        Ok(_) => outln!("probe.virtio_rng={},ok", index),
        Err(e) => outln!("probe.virtio_rng={},error={}", index, e.name()),
    }
}
