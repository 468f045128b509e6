//! The control virtqueue of a network device. A vhost-user backend serves
//! only the data queues; the VMM serves this one itself, on the main event
//! loop: it reads the guest's command from guest memory (a virtio-queue
//! [`Queue`]) and answers `VIRTIO_NET_OK` to `VIRTIO_NET_CTRL_MQ` /
//! `VQ_PAIRS_SET` when the number of pairs is one the device offered, and
//! to `VIRTIO_NET_CTRL_ANNOUNCE` / `ANNOUNCE_ACK` while an announcement is
//! pending (after a migration: the guest has sent its gratuitous ARPs);
//! `VIRTIO_NET_ERR` to every other command.
//!
//! Everything in the queue is guest-controlled: a chain that is malformed
//! (no ack byte, a header cut short, memory outside the guest's) is
//! returned to the used ring with length 0 (or an `ERR` ack when there is
//! somewhere to put it), counted and logged; nothing the guest writes can
//! stop the VMM.

use virtio_bindings::virtio_net::{
    VIRTIO_NET_CTRL_ANNOUNCE, VIRTIO_NET_CTRL_ANNOUNCE_ACK, VIRTIO_NET_CTRL_MQ,
    VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, VIRTIO_NET_ERR, VIRTIO_NET_OK,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::vhost_user::dirty_log::used_ring_len;
use crate::vhost_user::DirtyLog;
use crate::virtio::{queue_from_layout, take_over_at_used_index, QueueLayout, QueueLayoutError};

/// `VIRTIO_NET_OK` and `VIRTIO_NET_ERR`, the ack byte's two values.
const ACK_OK: u8 = VIRTIO_NET_OK as u8;
const ACK_ERR: u8 = VIRTIO_NET_ERR as u8;
/// The bytes of a command the VMM looks at: class, command, and the
/// `le16 virtqueue_pairs` of `VQ_PAIRS_SET`.
const COMMAND_BYTES: usize = 4;
/// Rounds of "process, then re-enable notifications" per kick, so that a
/// guest that keeps posting commands cannot hold the event loop forever
/// (its next command is picked up on its next kick).
const MAX_ROUNDS: usize = 16;

/// Errors setting up the control queue or in one of the guest's commands.
#[derive(Debug, thiserror::Error)]
pub enum CtrlQueueError {
    #[error("the control queue: {0}")]
    Queue(#[from] QueueLayoutError),
    #[error(
        "command at head {head}: cannot read {len} bytes of guest memory at {addr:#x}: {source}"
    )]
    Read {
        head: u16,
        addr: u64,
        len: usize,
        source: vm_memory::GuestMemoryError,
    },
    #[error("command at head {head}: cannot write its ack byte at {addr:#x}: {source}")]
    WriteAck {
        head: u16,
        addr: u64,
        source: vm_memory::GuestMemoryError,
    },
    #[error("command at head {head}: its last descriptor is not a device-writable ack byte")]
    NoAck { head: u16 },
    #[error("command at head {head}: a device-readable descriptor follows a device-writable one")]
    Misordered { head: u16 },
    #[error("command at head {head}: {len} readable byte(s), shorter than the {need} it needs")]
    Short { head: u16, len: usize, need: usize },
    #[error("cannot return command {head} to the used ring: {source}")]
    Used {
        head: u16,
        source: virtio_queue::Error,
    },
}

/// What the VMM has answered on one control queue.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CtrlStats {
    /// Commands acked with `VIRTIO_NET_OK`.
    pub ok: u64,
    /// Well-formed commands refused with `VIRTIO_NET_ERR` (an unsupported
    /// class or command, a number of pairs out of range).
    pub refused: u64,
    /// Malformed chains.
    pub bad: u64,
}

/// One command as read from its chain.
struct Request {
    head: u16,
    /// The first readable bytes (class, command, data).
    bytes: [u8; COMMAND_BYTES],
    /// How many of `bytes` the chain filled.
    len: usize,
    /// The last descriptor, if it is device-writable and holds a byte.
    ack: Option<GuestAddress>,
    /// A readable descriptor came after a writable one.
    misordered: bool,
}

/// The control queue of one interface, from activation to reset.
pub struct CtrlQueue {
    id: String,
    queue: Queue,
    /// `max_virtqueue_pairs`: the most the guest may ask for.
    max_pairs: u16,
    /// What the guest last set with `VQ_PAIRS_SET`.
    pairs: u16,
    /// `VIRTIO_NET_S_ANNOUNCE`: the guest was asked to announce itself and
    /// has not acked yet.
    announcing: bool,
    stats: CtrlStats,
}

impl CtrlQueue {
    /// A loaded snapshot's queue: the VMM answered every command before the
    /// snapshot, so the driver's used index is where the queue goes on.
    pub fn take_over(&mut self, mem: &GuestMemoryMmap) {
        take_over_at_used_index(&mut self.queue, mem);
    }

    /// Builds the queue the driver laid out (`layout`, of at most
    /// `max_size` entries) and checks that it lies in guest memory.
    pub fn new(
        id: &str,
        mem: &GuestMemoryMmap,
        layout: &QueueLayout,
        max_size: u16,
        event_idx: bool,
        max_pairs: u16,
    ) -> Result<Self, CtrlQueueError> {
        let queue = queue_from_layout(mem, layout, max_size, event_idx)?;
        Ok(Self {
            id: id.to_string(),
            queue,
            max_pairs,
            pairs: 1,
            announcing: false,
            stats: CtrlStats::default(),
        })
    }

    /// Asks the guest to announce itself: `VIRTIO_NET_S_ANNOUNCE` reads as
    /// set until it acks. The caller raises the configuration interrupt.
    pub fn announce(&mut self) {
        self.announcing = true;
    }

    /// Whether an announcement is pending.
    pub fn announcing(&self) -> bool {
        self.announcing
    }

    /// What was answered so far.
    pub fn stats(&self) -> CtrlStats {
        self.stats
    }

    /// The queue pairs the guest last asked for (1 until it asks).
    pub fn pairs(&self) -> u16 {
        self.pairs
    }

    /// Answers every command the guest posted. Returns whether the guest
    /// wants an interrupt for them. What it writes is marked in `log`.
    pub fn process(&mut self, mem: &GuestMemoryMmap, log: Option<&DirtyLog>) -> bool {
        let mut completed = false;
        for _ in 0..MAX_ROUNDS {
            while let Some(chain) = self.queue.pop_descriptor_chain(mem) {
                let head = chain.head_index();
                let len = match read_request(head, chain, mem) {
                    Ok(request) => self.answer(&request, mem, log),
                    Err(err) => {
                        self.bad(&err);
                        0
                    }
                };
                // A head outside the table cannot be returned; the
                // queue has moved past it, so carry on with the next one.
                match self.queue.add_used(mem, head, len) {
                    Ok(()) => completed = true,
                    Err(source) => self.bad(&CtrlQueueError::Used { head, source }),
                }
            }
            // With EVENT_IDX this also tells the driver to notify again.
            match self.queue.enable_notification(mem) {
                Ok(true) => continue,
                Ok(false) => break,
                Err(err) => {
                    crate::guest_log_here!(
                        log::Level::Warn,
                        "interface {}: control queue notifications: {err}",
                        self.id
                    );
                    break;
                }
            }
        }
        if let Some(log) = log {
            log.mark(
                GuestAddress(self.queue.used_ring()),
                used_ring_len(self.queue.size()),
            );
        }
        completed && self.queue.needs_notification(mem).unwrap_or(true)
    }

    /// Writes the ack of `request`; returns the used length.
    fn answer(&mut self, request: &Request, mem: &GuestMemoryMmap, log: Option<&DirtyLog>) -> u32 {
        let head = request.head;
        let Some(ack) = request.ack else {
            self.bad(&CtrlQueueError::NoAck { head });
            return 0;
        };
        let status = match self.command(request) {
            Ok(status) => status,
            Err(err) => {
                self.bad(&err);
                ACK_ERR
            }
        };
        match mem.write_obj(status, ack) {
            Ok(()) => {
                if let Some(log) = log {
                    log.mark(ack, 1);
                }
                1
            }
            Err(source) => {
                self.bad(&CtrlQueueError::WriteAck {
                    head,
                    addr: ack.0,
                    source,
                });
                0
            }
        }
    }

    /// Carries out a command; `Ok` holds the ack for a well-formed one.
    fn command(&mut self, request: &Request) -> Result<u8, CtrlQueueError> {
        let head = request.head;
        if request.misordered {
            return Err(CtrlQueueError::Misordered { head });
        }
        let short = |need| CtrlQueueError::Short {
            head,
            len: request.len,
            need,
        };
        if request.len < 2 {
            return Err(short(2));
        }
        let [class, command, lo, hi] = request.bytes;
        match (u32::from(class), u32::from(command)) {
            (VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET) => {
                if request.len < COMMAND_BYTES {
                    return Err(short(COMMAND_BYTES));
                }
                Ok(self.set_pairs(u16::from_le_bytes([lo, hi])))
            }
            (VIRTIO_NET_CTRL_ANNOUNCE, VIRTIO_NET_CTRL_ANNOUNCE_ACK) => Ok(self.ack_announce()),
            _ => {
                crate::guest_log_here!(
                    log::Level::Debug,
                    "interface {}: control command class {class} command {command} is not supported",
                    self.id
                );
                self.stats.refused += 1;
                Ok(ACK_ERR)
            }
        }
    }

    /// `VQ_PAIRS_SET`: the guest uses `pairs` queue pairs.
    fn set_pairs(&mut self, pairs: u16) -> u8 {
        if !(1..=self.max_pairs).contains(&pairs) {
            crate::guest_log_here!(
                log::Level::Warn,
                "interface {}: the guest asked for {pairs} queue pair(s); the device has 1 to {}",
                self.id,
                self.max_pairs
            );
            self.stats.refused += 1;
            return ACK_ERR;
        }
        if pairs != self.pairs {
            crate::guest_log_here!(
                log::Level::Info,
                "interface {}: the guest uses {pairs} queue pair(s)",
                self.id
            );
        }
        self.pairs = pairs;
        self.stats.ok += 1;
        ACK_OK
    }

    /// `ANNOUNCE_ACK`: the guest has announced itself (as QEMU, an ack
    /// with nothing pending is refused).
    fn ack_announce(&mut self) -> u8 {
        if !std::mem::take(&mut self.announcing) {
            self.stats.refused += 1;
            return ACK_ERR;
        }
        crate::guest_log_here!(
            log::Level::Info,
            "interface {}: the guest announced itself",
            self.id
        );
        self.stats.ok += 1;
        ACK_OK
    }

    /// Counts a malformed chain and logs it, rate-limited.
    fn bad(&mut self, err: &CtrlQueueError) {
        self.stats.bad += 1;
        crate::guest_log_here!(
            log::Level::Warn,
            "interface {}: bad control command ({} so far): {err}",
            self.id,
            self.stats.bad
        );
    }
}

/// Reads the first [`COMMAND_BYTES`] readable bytes of a chain and finds
/// its ack byte, without trusting any length or address in it.
fn read_request<M>(
    head: u16,
    chain: virtio_queue::DescriptorChain<M>,
    mem: &GuestMemoryMmap,
) -> Result<Request, CtrlQueueError>
where
    M: std::ops::Deref + Clone,
    M::Target: vm_memory::GuestMemory,
{
    let mut request = Request {
        head,
        bytes: [0; COMMAND_BYTES],
        len: 0,
        ack: None,
        misordered: false,
    };
    let mut seen_writable = false;
    for desc in chain {
        if desc.is_write_only() {
            seen_writable = true;
            request.ack = (desc.len() >= 1).then(|| desc.addr());
            continue;
        }
        request.ack = None;
        if seen_writable {
            request.misordered = true;
        }
        let room = COMMAND_BYTES - request.len;
        let want = usize::try_from(desc.len()).map_or(room, |len| len.min(room));
        if want == 0 {
            continue;
        }
        let end = request.len + want;
        mem.read_slice(&mut request.bytes[request.len..end], desc.addr())
            .map_err(|source| CtrlQueueError::Read {
                head,
                addr: desc.addr().0,
                len: want,
                source,
            })?;
        request.len = end;
    }
    Ok(request)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;
    const DATA: u64 = 0x4000;
    const SIZE: u16 = 16;
    const F_NEXT: u16 = 1;
    const F_WRITE: u16 = 2;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap()
    }

    fn layout() -> QueueLayout {
        QueueLayout {
            size: SIZE,
            desc_table: GuestAddress(DESC),
            avail_ring: GuestAddress(AVAIL),
            used_ring: GuestAddress(USED),
        }
    }

    /// Writes descriptor `index`.
    fn desc(mem: &GuestMemoryMmap, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = GuestAddress(DESC + 16 * u64::from(index));
        mem.write_obj(addr, at).unwrap();
        mem.write_obj(len, GuestAddress(at.0 + 8)).unwrap();
        mem.write_obj(flags, GuestAddress(at.0 + 12)).unwrap();
        mem.write_obj(next, GuestAddress(at.0 + 14)).unwrap();
    }

    /// Makes `heads` available (after `posted` earlier ones).
    fn post(mem: &GuestMemoryMmap, posted: u16, heads: &[u16]) {
        for (i, head) in heads.iter().enumerate() {
            let slot = (posted + i as u16) % SIZE;
            mem.write_obj(*head, GuestAddress(AVAIL + 4 + 2 * u64::from(slot)))
                .unwrap();
        }
        mem.write_obj(posted + heads.len() as u16, GuestAddress(AVAIL + 2))
            .unwrap();
    }

    /// (id, len) of used entry `n`.
    fn used(mem: &GuestMemoryMmap, n: u64) -> (u32, u32) {
        let at = GuestAddress(USED + 4 + 8 * n);
        (
            mem.read_obj(at).unwrap(),
            mem.read_obj(GuestAddress(at.0 + 4)).unwrap(),
        )
    }

    /// A well-formed VQ_PAIRS_SET at head `head` (descriptors head..head+3),
    /// with its buffers at DATA + 0x100 * head.
    fn pairs_set(mem: &GuestMemoryMmap, head: u16, pairs: u16, class: u8) -> GuestAddress {
        let base = DATA + 0x100 * u64::from(head);
        mem.write_slice(&[class, 0], GuestAddress(base)).unwrap();
        mem.write_obj(pairs, GuestAddress(base + 0x10)).unwrap();
        mem.write_obj(0xffu8, GuestAddress(base + 0x20)).unwrap();
        desc(mem, head, base, 2, F_NEXT, head + 1);
        desc(mem, head + 1, base + 0x10, 2, F_NEXT, head + 2);
        desc(mem, head + 2, base + 0x20, 1, F_WRITE, 0);
        GuestAddress(base + 0x20)
    }

    #[test]
    fn what_the_vmm_writes_is_marked_in_the_dirty_log() {
        let mem = memory();
        let log = DirtyLog::new(0x10_0000).unwrap();
        let mut ctrl = CtrlQueue::new("eth0", &mem, &layout(), 256, false, 2).unwrap();
        let ack = pairs_set(&mem, 0, 2, 4);
        post(&mem, 0, &[0]);
        assert!(!log.is_marked(ack));
        assert!(ctrl.process(&mem, Some(&log)));
        assert!(log.is_marked(ack));
        assert!(log.is_marked(GuestAddress(USED)));
    }

    #[test]
    fn pairs_set_is_acked_in_range_and_refused_outside() {
        let mem = memory();
        let mut ctrl = CtrlQueue::new("eth0", &mem, &layout(), 256, false, 2).unwrap();
        let ack_ok = pairs_set(&mem, 0, 2, 4);
        let ack_big = pairs_set(&mem, 3, 3, 4);
        let ack_zero = pairs_set(&mem, 6, 0, 4);
        let ack_class = pairs_set(&mem, 9, 1, 1);
        post(&mem, 0, &[0, 3, 6, 9]);
        assert!(ctrl.process(&mem, None));
        assert_eq!(mem.read_obj::<u8>(ack_ok).unwrap(), ACK_OK);
        assert_eq!(mem.read_obj::<u8>(ack_big).unwrap(), ACK_ERR);
        assert_eq!(mem.read_obj::<u8>(ack_zero).unwrap(), ACK_ERR);
        assert_eq!(mem.read_obj::<u8>(ack_class).unwrap(), ACK_ERR);
        for (n, head) in [0, 3, 6, 9].into_iter().enumerate() {
            assert_eq!(used(&mem, n as u64), (head, 1));
        }
        assert_eq!(ctrl.queue.used_idx(&mem, Ordering::Acquire).unwrap().0, 4);
        assert_eq!(ctrl.pairs(), 2);
        assert_eq!(
            ctrl.stats(),
            CtrlStats {
                ok: 1,
                refused: 3,
                bad: 0
            }
        );
        // Nothing new: no interrupt.
        assert!(!ctrl.process(&mem, None));
    }

    #[test]
    fn an_announce_ack_clears_a_pending_announcement_and_is_refused_otherwise() {
        let mem = memory();
        let mut ctrl = CtrlQueue::new("eth0", &mem, &layout(), 256, false, 1).unwrap();
        let announce_ack = |head| {
            let base = DATA + 0x100 * u64::from(head);
            mem.write_slice(&[3, 0], GuestAddress(base)).unwrap();
            desc(&mem, head, base, 2, F_NEXT, head + 1);
            desc(&mem, head + 1, base + 0x20, 1, F_WRITE, 0);
            GuestAddress(base + 0x20)
        };
        let early = announce_ack(0);
        post(&mem, 0, &[0]);
        assert!(ctrl.process(&mem, None));
        assert_eq!(mem.read_obj::<u8>(early).unwrap(), ACK_ERR);
        ctrl.announce();
        assert!(ctrl.announcing());
        let acked = announce_ack(2);
        post(&mem, 1, &[2]);
        assert!(ctrl.process(&mem, None));
        assert_eq!(mem.read_obj::<u8>(acked).unwrap(), ACK_OK);
        assert!(!ctrl.announcing());
        assert_eq!(ctrl.stats().ok, 1);
        assert_eq!(ctrl.stats().refused, 1);
    }

    #[test]
    fn malformed_chains_are_answered_without_panicking() {
        let mem = memory();
        let mut ctrl = CtrlQueue::new("eth0", &mem, &layout(), 256, false, 2).unwrap();
        // 0: no ack (all readable).
        desc(&mem, 0, DATA, 2, 0, 0);
        // 1: a header outside guest memory, then an ack.
        desc(&mem, 1, 0xffff_0000, 2, F_NEXT, 2);
        desc(&mem, 2, DATA + 0x20, 1, F_WRITE, 0);
        // 3: a one-byte header, then an ack.
        desc(&mem, 3, DATA, 1, F_NEXT, 4);
        desc(&mem, 4, DATA + 0x40, 1, F_WRITE, 0);
        // 5: an ack outside guest memory.
        mem.write_slice(&[4, 0, 1, 0], GuestAddress(DATA + 0x60))
            .unwrap();
        desc(&mem, 5, DATA + 0x60, 4, F_NEXT, 6);
        desc(&mem, 6, 0xffff_0000, 1, F_WRITE, 0);
        // 7: a loop (7 -> 8 -> 7).
        desc(&mem, 7, DATA, 2, F_NEXT, 8);
        desc(&mem, 8, DATA, 2, F_NEXT, 7);
        // And a head index out of the table (200).
        post(&mem, 0, &[0, 1, 3, 5, 7, 200]);
        mem.write_obj(0u8, GuestAddress(DATA + 0x40)).unwrap();
        assert!(ctrl.process(&mem, None));
        assert_eq!(used(&mem, 0), (0, 0));
        assert_eq!(used(&mem, 1), (1, 0));
        assert_eq!(used(&mem, 2), (3, 1));
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(DATA + 0x40)).unwrap(),
            ACK_ERR
        );
        assert_eq!(used(&mem, 3), (5, 0));
        assert_eq!(used(&mem, 4), (7, 0));
        assert!(ctrl.stats().bad >= 5, "{:?}", ctrl.stats());
        // Head 5's command was carried out; only its ack could not be
        // written.
        assert_eq!(ctrl.stats().ok, 1);

        // An avail index far ahead of the ring is refused as a whole.
        mem.write_obj(1000u16, GuestAddress(AVAIL + 2)).unwrap();
        ctrl.process(&mem, None);
    }

    #[test]
    fn a_layout_outside_guest_memory_is_refused() {
        let mem = memory();
        let mut bad = layout();
        bad.used_ring = GuestAddress(0xffff_f000);
        assert!(matches!(
            CtrlQueue::new("eth0", &mem, &bad, 256, false, 2),
            Err(CtrlQueueError::Queue(
                QueueLayoutError::OutsideMemory { .. }
            ))
        ));
        bad = layout();
        bad.desc_table = GuestAddress(DESC + 1);
        assert!(matches!(
            CtrlQueue::new("eth0", &mem, &bad, 256, false, 2),
            Err(CtrlQueueError::Queue(QueueLayoutError::Layout { .. }))
        ));
    }
}
