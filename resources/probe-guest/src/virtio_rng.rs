//! virtio entropy device (device id 4): reads `probe.rng_bytes` random
//! bytes (16 by default) through the generic driver in [`crate::virtio`],
//! in requests of up to [`CHUNK`] bytes, and prints
//! `probe.virtio_rng=<index>,ok` (or `,error=<reason>`), then
//! `probe.rng=<n> bytes distinct=<d> ms=<t>`: how many bytes came, how many
//! of the 256 byte values among them, and how long it took (0 without a
//! clock), which shows a rate limiter at work.

use crate::cmdline::{self, BadOption};
use crate::serial::outln;
use crate::timer;
use crate::virtio::{Buffer, Error, Regs, Transport};

/// virtio device id of the entropy device.
pub const DEVICE_ID: u32 = 4;
/// Bytes read without `probe.rng_bytes`.
const DEFAULT_BYTES: u32 = 16;
/// The most bytes one request asks for.
const CHUNK: usize = 1024;
/// Time allowed per request (a rate limiter may hold one back).
const REQUEST_TIMEOUT_MS: u32 = 5000;
/// Short answers allowed in a row before giving up.
const MAX_SHORT: u32 = 8;

/// `probe.rng_bytes` (base 0, like `kstrtouint`).
pub fn options(cmdline: &[u8]) -> Result<u32, BadOption<'_>> {
    match cmdline::last_value(cmdline, "probe.rng_bytes") {
        None => Ok(DEFAULT_BYTES),
        Some(value) => value
            .and_then(|v| cmdline::kstrtouint(v, 0))
            .ok_or(BadOption {
                name: "probe.rng_bytes",
                value,
            }),
    }
}

/// What came from the device.
struct Read {
    bytes: u64,
    /// Which byte values were seen.
    seen: [bool; 256],
}

impl Read {
    fn distinct(&self) -> usize {
        self.seen.iter().filter(|&&s| s).count()
    }
}

fn read_entropy(regs: Regs, wanted: u32) -> Result<Read, Error> {
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
    if let Some(target) = transport.msix_target() {
        // One byte per request; the bytes are not counted.
        let mut byte = 0u8;
        crate::msix::check(&target, || {
            let buffer = Buffer {
                addr: (&raw mut byte) as u64,
                len: 1,
                device_writes: true,
            };
            // SAFETY: `byte` outlives the request (we wait for it, or
            // reset the device before returning) and is not read.
            unsafe { queue.add(&[buffer]) }.is_ok() && {
                transport.notify(&queue);
                queue.wait_used(&transport, REQUEST_TIMEOUT_MS).is_ok()
            }
        });
    }

    let mut read = Read {
        bytes: 0,
        seen: [false; 256],
    };
    let mut scratch = [0u8; CHUNK];
    let mut short = 0;
    let mut result = Ok(());
    while read.bytes < u64::from(wanted) {
        let ask = (u64::from(wanted) - read.bytes).min(CHUNK as u64) as u32;
        let buffer = Buffer {
            addr: scratch.as_mut_ptr() as u64,
            len: ask,
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
                let got = (used.len as usize).min(ask as usize);
                for i in 0..got {
                    // SAFETY: in bounds; volatile because the device wrote
                    // the bytes behind the compiler's back.
                    let byte = unsafe { core::ptr::read_volatile(scratch.as_ptr().add(i)) };
                    read.seen[usize::from(byte)] = true;
                }
                read.bytes += got as u64;
                short = if got < ask as usize { short + 1 } else { 0 };
                if short > MAX_SHORT {
                    result = Err(Error::Timeout);
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
    result.map(|()| read)
}

/// Exercises the entropy device behind `regs` and prints the result lines.
pub fn probe(index: i64, regs: Regs, wanted: u32) {
    let start = timer::now_ns();
    match read_entropy(regs, wanted) {
        // 16 zero bytes from a working RNG would be a 2^-128 event.
        Ok(read) if read.bytes > 0 && read.seen[0] && read.distinct() == 1 => {
            outln!("probe.virtio_rng={},error=all-zero", index)
        }
        Ok(read) => {
            let ms = match (start, timer::now_ns()) {
                (Some(start), Some(end)) => {
                    end.saturating_sub(start)
                        .saturating_sub(crate::msix::take_elapsed_ns())
                        / 1_000_000
                }
                _ => 0,
            };
            outln!("probe.virtio_rng={},ok", index);
            outln!(
                "probe.rng={} bytes distinct={} ms={}",
                read.bytes,
                read.distinct(),
                ms
            );
        }
        Err(e) => outln!("probe.virtio_rng={},error={}", index, e.name()),
    }
}
