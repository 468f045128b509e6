//! What a backend's `VhostUserBackend` impl repeats for every device: the
//! eventfd pair that tells each worker thread to exit, the slice of the
//! config space a frontend reads, the worker's own seccomp filter, taking
//! what the guest posted on a device-bound queue, and how a worker stops
//! serving a queue the guest broke.

use std::io;
use std::ops::Deref;
use std::sync::atomic::{AtomicBool, Ordering};

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::VringT;
use virtio_queue::DescriptorChain;
use vm_memory::GuestMemory;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::BackendVring;

/// The vhost-user protocol features every backend offers: several queues,
/// the config space, acknowledged requests, and memory added region by
/// region (CONFIGURE_MEM_SLOTS, which libblkio requires), and a dirty
/// log in shared memory (LOG_SHMFD, for the frontend's Diff snapshots),
/// and faults on guest memory reported to the frontend (PAGEFAULT: vhost-user
/// postcopy, for a snapshot loaded without copying its memory first).
pub const PROTOCOL_FEATURES: VhostUserProtocolFeatures = VhostUserProtocolFeatures::MQ
    .union(VhostUserProtocolFeatures::CONFIG)
    .union(VhostUserProtocolFeatures::REPLY_ACK)
    .union(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS)
    .union(VhostUserProtocolFeatures::LOG_SHMFD)
    .union(VhostUserProtocolFeatures::PAGEFAULT);

/// One exit event per worker thread: vhost-user-backend's worker waits on
/// the consumer (`exit_event`), and [`WorkerExits::stop_all`] signals each.
#[derive(Debug)]
pub struct WorkerExits(Vec<(EventConsumer, EventNotifier)>);

impl WorkerExits {
    pub fn new(threads: usize) -> io::Result<Self> {
        (0..threads)
            .map(|_| new_event_consumer_and_notifier(EventFlag::NONBLOCK))
            .collect::<io::Result<Vec<_>>>()
            .map(Self)
    }

    pub fn threads(&self) -> usize {
        self.0.len()
    }

    /// The exit event of worker `thread`, for `VhostUserBackend::exit_event`.
    pub fn exit_event(&self, thread: usize) -> Option<(EventConsumer, EventNotifier)> {
        let (consumer, notifier) = self.0.get(thread)?;
        Some((consumer.try_clone().ok()?, notifier.try_clone().ok()?))
    }

    /// Wakes every worker thread so that it exits.
    pub fn stop_all(&self) {
        for (_, notifier) in &self.0 {
            let _ = notifier.notify();
        }
    }
}

/// Confines the calling worker thread with the "worker" filter the first
/// time it handles an event (vhost-user-backend starts the workers, so
/// each confines itself before it touches a guest request). A worker that
/// cannot be confined ends the process rather than serve unconfined.
pub fn confine_worker(seccomp: &tessera_seccomp::Filters) {
    if let Err(err) = seccomp.apply_once_per_thread("worker") {
        log::error!("{err}; exiting rather than serve unconfined");
        std::process::exit(1);
    }
}

/// Why a worker stopped serving a queue: the queue is then broken
/// (virtio's NEEDS_RESET) until the frontend stops and restarts it.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error(transparent)]
    Broken(#[from] crate::ring::RingError),
    #[error("its rings cannot be updated: {0}")]
    Ring(#[from] virtio_queue::Error),
    #[error("the guest cannot be signalled: {0}")]
    Signal(#[from] io::Error),
}

/// Queues the guest broke (virtio's NEEDS_RESET): not served until the
/// frontend stops them (GET_VRING_BASE) and sets them up again.
#[derive(Debug)]
pub struct BrokenQueues(Vec<AtomicBool>);

/// Broken queues, logged at error level.
static BROKEN: crate::ratelimit::RateLimit =
    crate::ratelimit::RateLimit::new(crate::ratelimit::BURST, crate::ratelimit::INTERVAL);

impl BrokenQueues {
    /// `queues` queues, none broken.
    pub fn new(queues: usize) -> Self {
        Self((0..queues).map(|_| AtomicBool::new(false)).collect())
    }

    pub fn is_broken(&self, queue: usize) -> bool {
        self.0
            .get(queue)
            .is_some_and(|broken| broken.load(Ordering::Acquire))
    }

    /// Stops serving `queue`: what the guest wrote there cannot be served.
    pub fn mark(&self, queue: usize, err: &QueueError) {
        if let Some(broken) = self.0.get(queue) {
            broken.store(true, Ordering::Release);
        }
        crate::guest_log!(
            &BROKEN,
            log::Level::Error,
            "queue {queue} is broken and no longer served: {err}"
        );
    }

    /// The frontend stopped `queue`: it is served again once set up.
    pub fn clear(&self, queue: usize) {
        if let Some(broken) = self.0.get(queue) {
            broken.store(false, Ordering::Release);
        }
    }
}

/// A device-bound queue (TX): takes the chains the guest posted on
/// `vring`, at most `budget` of them, hands each to `handle` (with the
/// memory it was read from) and gives it back with used length 0; after
/// each pass that took any, `signal`s the guest. The guest's kicks are off
/// during a pass and back on once the ring is empty. Each pass reads the
/// ring through the latest guest memory (`memory`): the frontend may
/// change the memory table meanwhile, and a ring read through an old table
/// can look empty while the new one says otherwise, which would spin the
/// worker. `handle` says whether to go on: a rate limiter that ran dry
/// holds the rest in the ring, and its timer brings the worker back.
pub fn take_posted<M>(
    vring: &BackendVring,
    memory: impl Fn() -> M,
    budget: usize,
    mut handle: impl FnMut(DescriptorChain<M>, &M) -> bool,
    signal: impl Fn(&BackendVring) -> Result<(), QueueError>,
) -> Result<Taken, QueueError>
where
    M: Clone + Deref,
    M::Target: GuestMemory,
{
    let mut taken = 0;
    loop {
        let mem = memory();
        vring.disable_notification()?;
        let mut used = 0;
        let mut held = false;
        while taken < budget && !held {
            // Pop in its own statement: a `while let` would hold the
            // vring lock through the body, and `add_used` takes it too.
            let next = crate::ring::next_chain(vring.get_mut().get_queue_mut(), mem.clone())?;
            let Some(chain) = next else {
                break;
            };
            let head = chain.head_index();
            held = !handle(chain, &mem);
            vring.add_used(head, 0)?;
            used += 1;
            taken += 1;
        }
        if used > 0 {
            signal(vring)?;
        }
        if held {
            return Ok(Taken::Held);
        }
        if taken == budget {
            return Ok(Taken::BudgetSpent);
        }
        if !vring.enable_notification()? {
            return Ok(Taken::Drained);
        }
    }
}

/// How [`take_posted`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Taken {
    /// The ring is empty and the guest's kicks are back on.
    Drained,
    /// The budget ran out first: the caller kicks the queue again, so
    /// that the worker serves its other events before it comes back.
    BudgetSpent,
    /// The handler held the rest back (kicks stay off).
    Held,
}

/// `size` bytes of `space` from `offset`, zero past its end: what
/// `VhostUserBackend::get_config` answers, whatever the frontend asks.
pub fn config_slice(space: &[u8], offset: u32, size: u32) -> Vec<u8> {
    let start = (offset as usize).min(space.len());
    let end = start.saturating_add(size as usize).min(space.len());
    let mut out = space[start..end].to_vec();
    out.resize(size as usize, 0);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_reads_past_the_end_read_zeros() {
        let space = [1u8, 2, 3, 4];
        assert_eq!(config_slice(&space, 1, 2), [2, 3]);
        assert_eq!(config_slice(&space, 3, 3), [4, 0, 0]);
        assert_eq!(config_slice(&space, 9, 2), [0, 0]);
        assert_eq!(config_slice(&space, u32::MAX, 1), [0]);
    }

    /// The frontend replaces the memory table while a TX pass runs: the
    /// ring read through the old table is empty, through the new one it
    /// holds a chain. The pass must take it from the new one, not spin.
    #[test]
    fn a_tx_pass_follows_a_new_memory_table_instead_of_spinning() {
        use std::cell::Cell;
        use virtio_queue::desc::{split::Descriptor, RawDescriptor};
        use virtio_queue::mock::MockSplitQueue;
        use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemoryAtomic};

        let region = [(GuestAddress(0), 0x2_0000)];
        let old = crate::BackendMemory::from_ranges(&region).unwrap();
        let new = crate::BackendMemory::from_ranges(&region).unwrap();
        MockSplitQueue::create(&old, GuestAddress(0), 16);
        let ring = MockSplitQueue::create(&new, GuestAddress(0), 16);
        let frame = RawDescriptor::from(Descriptor::new(0x1_0000, 64, 0, 0));
        ring.add_desc_chains(&[frame], 0).unwrap();
        let addrs = (
            ring.desc_table_addr().0,
            ring.avail_addr().0,
            ring.used_addr().0,
        );
        let (old, new) = (
            GuestMemoryAtomic::new(old.clone()),
            GuestMemoryAtomic::new(new.clone()),
        );
        let vring = BackendVring::new(new.clone(), 16).unwrap();
        vring.set_queue_size(16);
        vring.set_queue_info(addrs.0, addrs.1, addrs.2).unwrap();
        vring.set_queue_ready(true);
        vring.set_enabled(true);

        let (sender, receiver) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let passes = Cell::new(0);
            let memory = || {
                passes.set(passes.get() + 1);
                if passes.get() == 1 {
                    old.memory()
                } else {
                    new.memory()
                }
            };
            let mut taken = 0;
            let result = take_posted(
                &vring,
                memory,
                8,
                |_, _| {
                    taken += 1;
                    true
                },
                |_| Ok(()),
            );
            let _ = sender.send((result.map_err(|e| e.to_string()), taken));
        });
        let (result, taken) = receiver
            .recv_timeout(std::time::Duration::from_secs(5))
            .expect("the pass spins on a ring it reads through an old memory table");
        assert_eq!(result, Ok(Taken::Drained));
        assert_eq!(taken, 1);
    }

    #[test]
    fn each_worker_gets_its_own_exit_event() {
        let exits = WorkerExits::new(2).unwrap();
        assert_eq!(exits.threads(), 2);
        let (first, _) = exits.exit_event(0).unwrap();
        let (second, _) = exits.exit_event(1).unwrap();
        assert!(exits.exit_event(2).is_none());
        exits.stop_all();
        assert!(first.consume().is_ok());
        assert!(second.consume().is_ok());
    }
}
