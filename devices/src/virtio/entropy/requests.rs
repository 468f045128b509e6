//! Serving the request queue: each chain is one request, its
//! device-writable descriptors the buffer to fill (at most
//! [`MAX_REQUEST_BYTES`]). A request the rate limiter refuses goes back to
//! the available ring and waits for the limiter's timer; a malformed one (a
//! device-readable descriptor, no room, memory outside the guest's) is
//! answered with 0 bytes and counted. Everything in the queue is the
//! guest's: nothing in it can make the VMM panic, spin or flood its log.

use virtio_queue::{DescriptorChain, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::Entropy;

/// The most bytes one request gets (Firecracker's device has no bound; a
/// guest could otherwise make one request cost the VMM as much memory as
/// its descriptors claim).
pub const MAX_REQUEST_BYTES: u32 = 64 << 10;
/// Requests and bytes served per turn of the event loop, so that a guest
/// posting without end cannot hold it: the device then notifies itself
/// and serves the rest at its next turn, after the other events.
const MAX_REQUESTS_PER_TURN: usize = 256;
const MAX_BYTES_PER_TURN: u64 = 1 << 20;
/// Times a turn looks again after turning notifications back on: an avail
/// index the queue refuses (far ahead of the ring) always says "more", and
/// must not hold the loop.
const MAX_RECHECKS_PER_TURN: usize = 4;

/// One request's buffer: (guest address, length) of each writable part.
struct Request {
    head: u16,
    parts: Vec<(GuestAddress, u32)>,
    len: u32,
    malformed: bool,
}

fn read_request<M>(chain: DescriptorChain<M>) -> Request
where
    M: std::ops::Deref + Clone,
    M::Target: vm_memory::GuestMemory,
{
    let mut request = Request {
        head: chain.head_index(),
        parts: Vec::new(),
        len: 0,
        malformed: false,
    };
    for desc in chain {
        if !desc.is_write_only() {
            request.malformed = true;
            continue;
        }
        let room = MAX_REQUEST_BYTES - request.len;
        let take = desc.len().min(room);
        if take > 0 {
            request.parts.push((desc.addr(), take));
            request.len += take;
        }
    }
    request.malformed |= request.len == 0;
    request
}

impl Entropy {
    /// The guest notified the queue (or the limiter's timer fired): serves
    /// what it can, and interrupts the guest if it wants.
    pub fn process_queue_and_notify(&mut self) {
        if self.process_queue() {
            if let Err(err) = self.call.write(1) {
                crate::guest_log_here!(
                    log::Level::Error,
                    "entropy: cannot interrupt the guest: {err}"
                );
            }
        }
    }

    /// The guest notified the queue: reads the notification and serves it.
    pub fn on_kick(&mut self) {
        // Non-blocking: a spurious wake-up reads nothing.
        let _ = self.kick.read();
        self.process_queue_and_notify();
    }

    /// The limiter's timer fired: the throttled requests go on.
    pub fn on_limiter_timer(&mut self) {
        self.limiter.on_timer();
        self.process_queue_and_notify();
    }

    /// Serves the requests posted; returns whether the guest wants an
    /// interrupt for those answered.
    fn process_queue(&mut self) -> bool {
        let Some(mut queue) = self.queue.take() else {
            return false;
        };
        let mut answered = false;
        let (mut served, mut bytes, mut rechecks) = (0, 0u64, 0);
        while !self.limiter.is_blocked() {
            if served == MAX_REQUESTS_PER_TURN || bytes >= MAX_BYTES_PER_TURN {
                self.notify_self();
                break;
            }
            let next = match queue.iter(&self.mem) {
                Ok(mut chains) => chains.next(),
                Err(err) => {
                    // An avail index far ahead of the ring: nothing in it
                    // is served until the driver resets the device.
                    self.bad(&format!("the available ring: {err}"));
                    break;
                }
            };
            let Some(chain) = next else {
                // With notifications on again, anything posted meanwhile is
                // served now rather than at a kick that will not come.
                match queue.enable_notification(&self.mem) {
                    Ok(true) if rechecks < MAX_RECHECKS_PER_TURN => {
                        rechecks += 1;
                        continue;
                    }
                    Ok(true) => {
                        self.notify_self();
                        break;
                    }
                    Ok(false) => break,
                    Err(err) => {
                        self.bad(&format!("notifications: {err}"));
                        break;
                    }
                }
            };
            let request = read_request(chain);
            if !request.malformed && !self.limiter.consume_request(u64::from(request.len)) {
                // Back to the ring: served when the limiter's timer fires.
                queue.go_to_previous_position();
                break;
            }
            let written = self.answer(&request);
            served += 1;
            bytes += u64::from(written);
            match queue.add_used(&self.mem, request.head, written) {
                Ok(()) => answered = true,
                Err(err) => self.bad(&format!("cannot return request {}: {err}", request.head)),
            }
        }
        if let Some(log) = &self.dirty_log {
            log.mark(
                GuestAddress(queue.used_ring()),
                crate::vhost_user::dirty_log::used_ring_len(queue.size()),
            );
        }
        let notify = answered && queue.needs_notification(&self.mem).unwrap_or(true);
        self.queue = Some(queue);
        notify
    }

    /// More may be posted: the rest at the event loop's next turn, after
    /// its other events.
    fn notify_self(&mut self) {
        if let Err(err) = self.kick.write(1) {
            self.bad(&format!("cannot notify itself: {err}"));
        }
    }

    /// Fills the request's buffer; returns the bytes written.
    fn answer(&mut self, request: &Request) -> u32 {
        if request.malformed {
            self.bad(&format!(
                "request {} has a device-readable descriptor or no room",
                request.head
            ));
            return 0;
        }
        let mut random = vec![0u8; request.len as usize];
        if let Err(err) = getrandom::fill(&mut random) {
            self.counters.host_rng_fails += 1;
            crate::guest_log_here!(log::Level::Error, "entropy: getrandom failed: {err}");
            return 0;
        }
        let mut written = 0u32;
        for &(addr, len) in &request.parts {
            let bytes = &random[written as usize..(written + len) as usize];
            if self.mem.write_slice(bytes, addr).is_err() {
                self.bad(&format!(
                    "request {}: {len} bytes at {:#x} are outside guest memory",
                    request.head, addr.0
                ));
                break;
            }
            if let Some(log) = &self.dirty_log {
                log.mark(addr, len as usize);
            }
            written += len;
        }
        self.counters.entropy_event_count += 1;
        self.counters.entropy_bytes += u64::from(written);
        written
    }

    fn bad(&mut self, what: &str) {
        self.counters.entropy_event_fails += 1;
        crate::guest_log_here!(
            log::Level::Warn,
            "entropy: bad request ({} so far): {what}",
            self.counters.entropy_event_fails
        );
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use tessera_rate_limiter::RateLimiterConfig;
    use vm_memory::GuestMemoryMmap;

    use super::*;
    use crate::virtio::{QueueLayout, VirtioDevice};

    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;
    const DATA: u64 = 0x10000;
    const SIZE: u16 = 16;
    const F_NEXT: u16 = 1;
    const F_WRITE: u16 = 2;

    fn device(limits: &str) -> Entropy {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40000)]).unwrap();
        let limits: RateLimiterConfig = serde_json::from_str(limits).unwrap();
        let mut device = Entropy::new(mem, &limits).unwrap();
        let layout = QueueLayout {
            size: SIZE,
            desc_table: GuestAddress(DESC),
            avail_ring: GuestAddress(AVAIL),
            used_ring: GuestAddress(USED),
        };
        device.activate(1 << 32, &[layout]).unwrap();
        device
    }

    fn desc(d: &Entropy, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = GuestAddress(DESC + 16 * u64::from(index));
        d.mem.write_obj(addr, at).unwrap();
        d.mem.write_obj(len, GuestAddress(at.0 + 8)).unwrap();
        d.mem.write_obj(flags, GuestAddress(at.0 + 12)).unwrap();
        d.mem.write_obj(next, GuestAddress(at.0 + 14)).unwrap();
    }

    /// Makes `heads` available after `posted` earlier ones and kicks.
    fn post(d: &mut Entropy, posted: u16, heads: &[u16]) {
        for (i, head) in heads.iter().enumerate() {
            let slot = (posted + i as u16) % SIZE;
            d.mem
                .write_obj(*head, GuestAddress(AVAIL + 4 + 2 * u64::from(slot)))
                .unwrap();
        }
        d.mem
            .write_obj(posted + heads.len() as u16, GuestAddress(AVAIL + 2))
            .unwrap();
        d.kick.write(1).unwrap();
        d.on_kick();
    }

    fn used_idx(d: &Entropy) -> u16 {
        d.mem
            .load::<u16>(GuestAddress(USED + 2), Ordering::Acquire)
            .unwrap()
    }

    /// (id, len) of used entry `n`.
    fn used(d: &Entropy, n: u64) -> (u32, u32) {
        let at = GuestAddress(USED + 4 + 8 * n);
        (
            d.mem.read_obj(at).unwrap(),
            d.mem.read_obj(GuestAddress(at.0 + 4)).unwrap(),
        )
    }

    #[test]
    fn a_request_gets_its_buffer_filled_with_random_bytes() {
        let mut d = device("{}");
        desc(&d, 0, DATA, 512, F_WRITE | F_NEXT, 1);
        desc(&d, 1, DATA + 0x1000, 512, F_WRITE, 0);
        post(&mut d, 0, &[0]);
        assert_eq!(used(&d, 0), (0, 1024));
        let mut bytes = [0u8; 512];
        d.mem.read_slice(&mut bytes, GuestAddress(DATA)).unwrap();
        let distinct: std::collections::HashSet<u8> = bytes.iter().copied().collect();
        assert!(distinct.len() > 64, "{distinct:?}");
        assert_eq!(d.counters().entropy_bytes, 1024);
        assert!(d.call.read().is_ok(), "no interrupt");
    }

    #[test]
    fn malformed_requests_get_no_bytes_and_nothing_stops() {
        let mut d = device("{}");
        // 0: device-readable; 1: a zero-length buffer; 2: outside memory;
        // 3: huge, capped; 200: a head out of the table.
        desc(&d, 0, DATA, 16, 0, 0);
        desc(&d, 1, DATA, 0, F_WRITE, 0);
        desc(&d, 2, 0xffff_0000, 16, F_WRITE, 0);
        desc(&d, 3, DATA, u32::MAX, F_WRITE, 0);
        post(&mut d, 0, &[0, 1, 2, 3, 200]);
        assert_eq!(used(&d, 0), (0, 0));
        assert_eq!(used(&d, 1), (1, 0));
        assert_eq!(used(&d, 2), (2, 0));
        // Capped, and then outside the 256 KiB of memory: partly written.
        assert_eq!(used(&d, 3).0, 3);
        assert!(used(&d, 3).1 <= MAX_REQUEST_BYTES);
        assert!(d.counters().entropy_event_fails >= 3);
        // An avail index far ahead is refused as a whole, and the device
        // does not come back to it by itself.
        d.mem.write_obj(1000u16, GuestAddress(AVAIL + 2)).unwrap();
        d.kick.write(1).unwrap();
        d.on_kick();
        assert!(d.kick.read().is_err(), "the device keeps coming back");
    }

    #[test]
    fn a_turn_that_spends_its_budget_notifies_the_device_again() {
        let mut d = device("{}");
        // 16 requests of 128 KiB, capped at 64 KiB each: 1 MiB, one
        // turn's budget.
        for head in 0..SIZE {
            desc(&d, head, DATA, 128 << 10, F_WRITE, 0);
        }
        post(&mut d, 0, &(0..SIZE).collect::<Vec<_>>());
        assert_eq!(used_idx(&d), SIZE);
        assert_eq!(d.counters().entropy_bytes, 1 << 20);
        assert!(
            d.kick.read().is_ok(),
            "the device did not notify itself for what may be left"
        );
    }

    #[test]
    fn a_throttled_request_waits_in_the_ring_for_the_limiters_timer() {
        let mut d = device(r#"{"ops": {"size": 1, "refill_time": 100}}"#);
        desc(&d, 0, DATA, 64, F_WRITE, 0);
        desc(&d, 1, DATA + 0x100, 64, F_WRITE, 0);
        post(&mut d, 0, &[0, 1]);
        assert_eq!(used_idx(&d), 1, "the second must wait");
        assert_eq!(d.counters().entropy_rate_limiter_throttled, 1);
        // Another kick does not get it through before the timer.
        d.on_kick();
        assert_eq!(used_idx(&d), 1);
        std::thread::sleep(std::time::Duration::from_millis(150));
        d.on_limiter_timer();
        assert_eq!(used_idx(&d), 2);
        assert_eq!(used(&d, 1), (1, 64));
    }
}
