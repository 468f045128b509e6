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
        self.ensure_stats_timer();
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
        if let (true, Some(call)) = (returned, self.calls.get(index)) {
            if let Err(err) = call.write(1) {
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

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use vm_memory::GuestMemoryMmap;

    use super::*;
    use crate::virtio::balloon::device::{
        F_FREE_PAGE_HINT as F_HINT, F_PAGE_REPORTING, F_STATS_VQ as F_STATS,
    };
    use crate::virtio::balloon::{BalloonOptions, HINT_CMD_DONE};
    use crate::virtio::{QueueLayout, VirtioDevice};

    const SIZE: u16 = 16;
    const DATA: u64 = 0x20000;
    const F_NEXT: u16 = 1;
    const F_WRITE: u16 = 2;
    const VERSION_1: u64 = 1 << 32;

    type Discarded = Arc<Mutex<Vec<(u64, u64)>>>;

    /// Queue `index`'s rings, 0x1000 apart per queue.
    fn layout(index: u64) -> QueueLayout {
        let base = 0x1000 + index * 0x3000;
        QueueLayout {
            size: SIZE,
            desc_table: GuestAddress(base),
            avail_ring: GuestAddress(base + 0x1000),
            used_ring: GuestAddress(base + 0x2000),
        }
    }

    /// A device with every feature, activated with `acked` features, and
    /// what it discarded.
    fn device(acked: u64) -> (Balloon, Discarded) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x80000)]).unwrap();
        let discarded: Discarded = Arc::default();
        let record = discarded.clone();
        let options = BalloonOptions {
            deflate_on_oom: true,
            stats_polling_interval_s: 1,
            free_page_hinting: true,
            free_page_reporting: true,
        };
        let discard = Box::new(move |addr: GuestAddress, len| {
            record.lock().unwrap().push((addr.0, len));
            Ok(())
        });
        let mut device = Balloon::new(mem, options, 512, discard).unwrap();
        let layouts: Vec<_> = (0..5).map(layout).collect();
        device.activate(VERSION_1 | acked, &layouts).unwrap();
        (device, discarded)
    }

    fn desc(d: &Balloon, queue: u64, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = GuestAddress(layout(queue).desc_table.0 + 16 * u64::from(index));
        d.mem.write_obj(addr, at).unwrap();
        d.mem.write_obj(len, GuestAddress(at.0 + 8)).unwrap();
        d.mem.write_obj(flags, GuestAddress(at.0 + 12)).unwrap();
        d.mem.write_obj(next, GuestAddress(at.0 + 14)).unwrap();
    }

    /// Makes `heads` available on `queue` after `posted` earlier ones and
    /// kicks it.
    fn post(d: &mut Balloon, queue: u64, posted: u16, heads: &[u16]) {
        let avail = layout(queue).avail_ring.0;
        for (i, head) in heads.iter().enumerate() {
            let slot = (posted + i as u16) % SIZE;
            d.mem
                .write_obj(*head, GuestAddress(avail + 4 + 2 * u64::from(slot)))
                .unwrap();
        }
        d.mem
            .write_obj(posted + heads.len() as u16, GuestAddress(avail + 2))
            .unwrap();
        d.on_kick(queue as usize);
    }

    fn used_idx(d: &Balloon, queue: u64) -> u16 {
        d.mem
            .read_obj(GuestAddress(layout(queue).used_ring.0 + 2))
            .unwrap()
    }

    #[test]
    fn inflated_frames_are_discarded_as_ranges_and_the_chain_returned() {
        let (mut d, discarded) = device(0);
        let pfns: [u32; 5] = [0x41, 0x40, 0x42, 0x50, 0x41];
        for (i, pfn) in pfns.iter().enumerate() {
            d.mem
                .write_obj(*pfn, GuestAddress(DATA + 4 * i as u64))
                .unwrap();
        }
        desc(&d, 0, 0, DATA, 12, F_NEXT, 1);
        desc(&d, 0, 1, DATA + 12, 8, 0, 0);
        post(&mut d, 0, 0, &[0]);
        assert_eq!(
            *discarded.lock().unwrap(),
            vec![(0x40000, 3 << 12), (0x50000, 1 << 12)]
        );
        assert_eq!(used_idx(&d, 0), 1);
        assert!(d.calls[0].read().is_ok(), "no interrupt");
        assert_eq!(d.counters().inflated_bytes, 4 << 12);
    }

    #[test]
    fn malformed_inflate_chains_are_returned_and_counted() {
        let (mut d, discarded) = device(0);
        // 0: device-writable; 1: not whole frame numbers; 2: outside
        // memory; 3: too many frame numbers.
        desc(&d, 0, 0, DATA, 8, F_WRITE, 0);
        desc(&d, 0, 1, DATA, 6, 0, 0);
        desc(&d, 0, 2, 0xffff_0000, 8, 0, 0);
        desc(&d, 0, 3, DATA, 8192, 0, 0);
        post(&mut d, 0, 0, &[0, 1, 2, 3]);
        assert_eq!(used_idx(&d, 0), 4);
        assert!(discarded.lock().unwrap().is_empty());
        assert_eq!(d.counters().event_fails, 4);
        // An avail index far ahead is refused, and not looked at forever.
        d.mem
            .write_obj(1000u16, GuestAddress(layout(0).avail_ring.0 + 2))
            .unwrap();
        d.on_kick(0);
        assert!(d.kicks[0].read().is_err(), "the device keeps coming back");
    }

    #[test]
    fn the_statistics_buffer_is_held_until_the_device_wants_figures() {
        let (mut d, _) = device(1 << F_STATS);
        // Tag 4 (free memory) and an unknown tag 99.
        let mut entries = Vec::new();
        for (tag, value) in [(4u16, 1234u64), (99, 1)] {
            entries.extend(tag.to_le_bytes());
            entries.extend(value.to_le_bytes());
        }
        d.mem.write_slice(&entries, GuestAddress(DATA)).unwrap();
        desc(&d, 2, 0, DATA, 20, 0, 0);
        post(&mut d, 2, 0, &[0]);
        assert_eq!(d.latest_stats()[4], Some(1234));
        assert_eq!(d.counters().stats_update_fails, 1);
        assert_eq!(used_idx(&d, 2), 0, "the buffer is held");
        d.request_stats();
        assert_eq!(used_idx(&d, 2), 1);
        d.request_stats();
        assert_eq!(used_idx(&d, 2), 1, "nothing more to return");
    }

    #[test]
    fn hinted_ranges_of_the_run_are_discarded_and_a_stop_ends_it() {
        let (mut d, discarded) = device(1 << F_HINT);
        assert_eq!(
            d.roles_of_queues(),
            [Role::Inflate, Role::Deflate, Role::FreePageHint]
        );
        d.start_hinting(true).unwrap();
        let (cmd, _) = d.hinting_status().unwrap();
        assert!(cmd > HINT_CMD_DONE);
        // An old run's ranges, then this run's.
        d.mem.write_obj(cmd + 7, GuestAddress(DATA)).unwrap();
        d.mem.write_obj(cmd, GuestAddress(DATA + 4)).unwrap();
        d.mem
            .write_obj(HINT_CMD_STOP, GuestAddress(DATA + 8))
            .unwrap();
        desc(&d, 2, 0, DATA, 4, F_NEXT, 1);
        desc(&d, 2, 1, 0x30000, 0x2000, F_WRITE, 0);
        desc(&d, 2, 2, DATA + 4, 4, F_NEXT, 3);
        desc(&d, 2, 3, 0x40000, 0x1000, F_WRITE, 0);
        desc(&d, 2, 4, DATA + 8, 4, 0, 0);
        post(&mut d, 2, 0, &[0, 2, 4]);
        assert_eq!(*discarded.lock().unwrap(), vec![(0x40000, 0x1000)]);
        assert_eq!(
            d.hinting_status().unwrap(),
            (HINT_CMD_DONE, Some(HINT_CMD_STOP))
        );
        assert!(
            d.take_config_change(),
            "the driver is not told the run ended"
        );
    }

    #[test]
    fn reported_ranges_are_discarded() {
        let (mut d, discarded) = device(1 << F_PAGE_REPORTING);
        desc(&d, 2, 0, 0x30000, 0x4000, F_WRITE | F_NEXT, 1);
        desc(&d, 2, 1, 0x38000, 0x1000, F_WRITE, 0);
        post(&mut d, 2, 0, &[0]);
        assert_eq!(
            *discarded.lock().unwrap(),
            vec![(0x30000, 0x4000), (0x38000, 0x1000)]
        );
        assert_eq!(d.counters().free_page_report_freed, 0x5000);
        assert_eq!(used_idx(&d, 2), 1);
    }

    #[test]
    fn the_config_space_holds_the_target_and_takes_only_actual() {
        let (mut d, _) = device(0);
        let mut space = [0u8; 12];
        d.read_config(0, &mut space);
        assert_eq!(&space[0..4], &512u32.to_le_bytes());
        d.write_config(4, &300u32.to_le_bytes());
        d.write_config(0, &7u32.to_le_bytes());
        d.write_config(4, &[1, 2]);
        assert_eq!(d.actual_pages(), 300);
        assert_eq!(d.target_pages(), 512);
        let mut past = [0xffu8; 4];
        d.read_config(u64::MAX, &mut past);
        assert_eq!(past, [0; 4]);
    }
}
