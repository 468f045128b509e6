//! Serving the balloon's queues. Everything in them is the guest's: a
//! malformed chain is returned unread and counted, a page outside guest
//! memory is not discarded, and a turn of the event loop takes at most
//! [`MAX_CHAINS_PER_TURN`] chains of a queue (then the device notifies
//! itself for the rest), so nothing a guest posts can make the VMM panic,
//! spin or flood its log.
//!
//! - Inflate: each chain's device-readable descriptors hold 32-bit page
//!   frame numbers; their pages are discarded, in ranges.
//! - Deflate: the guest takes pages back; nothing to do but return them.
//! - Statistics: the driver posts a buffer of `{u16 tag, u64 value}`
//!   entries; the device reads it and holds it until it wants new figures
//!   (its timer), then returns it.
//! - Free page hinting: a 4-byte command id, then free ranges reported
//!   under it; ranges of the run the host started are discarded.
//! - Free page reporting: every descriptor is a free range to discard.

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::device::{Balloon, Role};
use super::pages::{page_ranges, PAGE_SHIFT};
use super::{HINT_CMD_DONE, HINT_CMD_STOP};

/// Statistics tags virtio defines (0 to 15); others are counted as
/// failed updates.
pub const STATS_TAGS: usize = 16;
/// Chains of one queue served per turn of the event loop.
const MAX_CHAINS_PER_TURN: usize = 256;
/// Page frame numbers read from one inflate chain (Linux sends 256).
pub const MAX_PFNS_PER_TURN: usize = 1024;
/// A statistics entry: a u16 tag and a u64 value, packed.
const STAT_LEN: u32 = 10;
/// Statistics entries read from one buffer.
const MAX_STATS: u32 = 256;

type Chain<'a> = DescriptorChain<&'a GuestMemoryMmap>;

impl Balloon {
    /// The guest notified queue `index`: reads the notification and serves
    /// it.
    pub fn on_kick(&mut self, index: usize) {
        if let Some(kick) = self.kicks.get(index) {
            // Non-blocking: a spurious wake-up reads nothing.
            let _ = kick.read();
        }
        self.process_queue(index);
    }

    /// The statistics timer fired: returns the held buffer, which asks the
    /// driver for new figures.
    pub fn on_stats_timer(&mut self) {
        let _ = self.stats_timer.wait();
        self.request_stats();
    }

    /// Returns the statistics buffer the device holds, if any.
    pub(super) fn request_stats(&mut self) {
        let Some(head) = self.stats_head.take() else {
            return;
        };
        let Some(index) = self.queues.iter().position(|(r, _)| *r == Role::Stats) else {
            return;
        };
        self.return_chains(index, &[head]);
    }

    /// Serves the chains posted on queue `index` (at most a turn's worth)
    /// and interrupts the guest for those it returns.
    pub(super) fn process_queue(&mut self, index: usize) {
        let Some((role, mut queue)) = self.take_queue(index) else {
            return;
        };
        // The chains borrow guest memory while the device changes.
        let mem = self.mem.clone();
        let mut done = Vec::new();
        loop {
            if done.len() == MAX_CHAINS_PER_TURN {
                self.notify_self(index);
                break;
            }
            let next = match queue.iter(&mem) {
                Ok(mut chains) => chains.next(),
                Err(err) => {
                    // An avail index far ahead of the ring: nothing more is
                    // served until the driver resets the device.
                    self.bad(&format!("{role:?} queue: the available ring: {err}"));
                    None
                }
            };
            let Some(chain) = next else {
                break;
            };
            let head = chain.head_index();
            match role {
                Role::Inflate => self.inflate(chain),
                Role::Deflate => self.counters.deflate_count += 1,
                Role::Stats => {
                    self.read_stats(chain);
                    // A second buffer is not the protocol: give back the
                    // one held before.
                    if let Some(held) = self.stats_head.replace(head) {
                        done.push(held);
                    }
                    continue;
                }
                Role::FreePageHint => self.hint(chain),
                Role::Reporting => self.report(chain),
            }
            done.push(head);
        }
        self.put_queue(index, role, queue);
        self.return_chains(index, &done);
    }

    fn take_queue(&mut self, index: usize) -> Option<(Role, Queue)> {
        let (role, queue) = self.queues.get_mut(index)?;
        Some((*role, std::mem::replace(queue, Queue::new(1).ok()?)))
    }

    fn put_queue(&mut self, index: usize, role: Role, queue: Queue) {
        if let Some(slot) = self.queues.get_mut(index) {
            *slot = (role, queue);
        }
    }

    /// Puts `heads` in queue `index`'s used ring (written length 0) and
    /// interrupts the guest.
    fn return_chains(&mut self, index: usize, heads: &[u16]) {
        let Some((_, queue)) = self.queues.get_mut(index) else {
            return;
        };
        let mut returned = false;
        let mut failed = None;
        for &head in heads {
            match queue.add_used(&self.mem, head, 0) {
                Ok(()) => returned = true,
                Err(err) => failed = Some(format!("cannot return chain {head}: {err}")),
            }
        }
        if let Some(log) = &self.dirty_log {
            log.mark(
                GuestAddress(queue.used_ring()),
                crate::vhost_user::dirty_log::used_ring_len(queue.size()),
            );
        }
        if let Some(what) = failed {
            self.bad(&what);
        }
        if returned {
            if let Err(err) = self.call.write(1) {
                crate::guest_log_here!(
                    log::Level::Error,
                    "balloon: cannot interrupt the guest: {err}"
                );
            }
        }
    }

    fn notify_self(&mut self, index: usize) {
        if let Some(kick) = self.kicks.get(index) {
            if let Err(err) = kick.write(1) {
                crate::guest_log_here!(log::Level::Error, "balloon: cannot notify itself: {err}");
            }
        }
    }

    /// Discards the pages whose frame numbers the chain holds.
    fn inflate(&mut self, chain: Chain<'_>) {
        self.counters.inflate_count += 1;
        let mut pfns = Vec::new();
        for desc in chain {
            if desc.is_write_only() || desc.len() % 4 != 0 {
                self.bad("an inflate descriptor is device-writable or not whole frame numbers");
                continue;
            }
            let count = (desc.len() / 4) as usize;
            if pfns.len() + count > MAX_PFNS_PER_TURN {
                self.bad(&format!(
                    "an inflate chain holds more than {MAX_PFNS_PER_TURN} frame numbers"
                ));
                break;
            }
            let mut bytes = vec![0u8; desc.len() as usize];
            if self.mem.read_slice(&mut bytes, desc.addr()).is_err() {
                self.bad("an inflate descriptor lies outside guest memory");
                continue;
            }
            pfns.extend(
                bytes
                    .chunks_exact(4)
                    .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            );
        }
        for (first, pages) in page_ranges(&mut pfns) {
            let addr = GuestAddress(u64::from(first) << PAGE_SHIFT);
            let len = u64::from(pages) << PAGE_SHIFT;
            match (self.discard)(addr, len) {
                Ok(()) => self.counters.inflated_bytes += len,
                Err(err) => self.bad(&format!("inflate: {err}")),
            }
        }
    }

    /// Reads the statistics the driver wrote in the chain's first
    /// descriptor.
    fn read_stats(&mut self, chain: Chain<'_>) {
        self.counters.stats_updates_count += 1;
        let Some(desc) = chain.into_iter().next() else {
            return;
        };
        if desc.is_write_only() {
            self.counters.stats_update_fails += 1;
            return;
        }
        let entries = (desc.len() / STAT_LEN).min(MAX_STATS);
        for entry in 0..entries {
            let at = desc.addr().0.checked_add(u64::from(entry * STAT_LEN));
            let mut stat = [0u8; STAT_LEN as usize];
            if at.is_none_or(|at| self.mem.read_slice(&mut stat, GuestAddress(at)).is_err()) {
                self.counters.stats_update_fails += 1;
                return;
            }
            let tag = usize::from(u16::from_le_bytes([stat[0], stat[1]]));
            let mut value = [0u8; 8];
            value.copy_from_slice(&stat[2..]);
            match self.latest_stats.get_mut(tag) {
                Some(slot) => *slot = Some(u64::from_le_bytes(value)),
                None => self.counters.stats_update_fails += 1,
            }
        }
    }

    /// A chain of the free page hinting queue: command ids and ranges.
    fn hint(&mut self, chain: Chain<'_>) {
        let mut stopped = false;
        for desc in chain {
            if desc.len() == 4 && !desc.is_write_only() {
                let Ok(cmd) = self.mem.read_obj::<u32>(desc.addr()) else {
                    self.bad("a hinting command id lies outside guest memory");
                    continue;
                };
                let cmd = u32::from_le(cmd);
                self.hinting.guest_cmd = Some(cmd);
                stopped = cmd == HINT_CMD_STOP || cmd == HINT_CMD_DONE;
                continue;
            }
            let host_cmd = self.hinting.host_cmd;
            // Ranges of an ended run, or of another run, are the guest's.
            if host_cmd == HINT_CMD_STOP
                || host_cmd == HINT_CMD_DONE
                || self.hinting.guest_cmd != Some(host_cmd)
            {
                continue;
            }
            self.counters.free_page_hint_count += 1;
            match (self.discard)(desc.addr(), u64::from(desc.len())) {
                Ok(()) => self.counters.free_page_hint_freed += u64::from(desc.len()),
                Err(err) => {
                    self.counters.free_page_hint_fails += 1;
                    self.bad(&format!("hinting: {err}"));
                }
            }
        }
        if stopped && self.hinting.acknowledge_on_stop && self.hinting.host_cmd > HINT_CMD_DONE {
            self.hinting.host_cmd = HINT_CMD_DONE;
            self.config_changed = true;
        }
    }

    /// A chain of the free page reporting queue: free ranges.
    fn report(&mut self, chain: Chain<'_>) {
        for desc in chain {
            self.counters.free_page_report_count += 1;
            match (self.discard)(desc.addr(), u64::from(desc.len())) {
                Ok(()) => self.counters.free_page_report_freed += u64::from(desc.len()),
                Err(err) => {
                    self.counters.free_page_report_fails += 1;
                    self.bad(&format!("reporting: {err}"));
                }
            }
        }
    }

    fn bad(&mut self, what: &str) {
        self.counters.event_fails += 1;
        crate::guest_log_here!(
            log::Level::Warn,
            "balloon: {what} ({} so far)",
            self.counters.event_fails
        );
    }
}
