//! Taking descriptor chains from a guest's split virtqueue with every ring
//! value the guest wrote checked first. virtio-queue's
//! `pop_descriptor_chain` answers "nothing" both for an empty ring and for a
//! broken one (an avail index more than the queue size ahead, an avail
//! entry outside guest memory), logging an error each time, while
//! `enable_notification` keeps saying there is more: a worker that trusts
//! both spins. [`next_chain`] tells the two apart, so that a worker can mark
//! the queue broken (virtio's NEEDS_RESET) and stop serving it. It also
//! refuses a head the used ring could not take. virtio-queue logs an error
//! on the way to some of these answers; the backends turn its logging off.

use std::num::Wrapping;
use std::ops::Deref;
use std::sync::atomic::Ordering;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory};

/// Bytes before the first entry of the avail ring (`flags`, `idx`).
const AVAIL_RING_HEADER_LEN: u64 = 4;
/// Bytes of one avail ring entry.
const AVAIL_ENTRY_LEN: u64 = 2;

/// How the guest broke a queue. Nothing more is taken from it until the
/// frontend sets it up again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    #[error(
        "the avail index {avail} is {ahead} entries past the next one to take ({next}), more \
         than the queue's {size}"
    )]
    AvailIndexTooFar {
        avail: u16,
        next: u16,
        ahead: u16,
        size: u16,
    },
    #[error("the avail ring at {addr:#x} is not in guest memory")]
    AvailRingUnmapped { addr: u64 },
    #[error("the avail ring is at guest address 0, which virtio-queue takes as not set up")]
    NotReady,
    #[error("avail entry {position} names descriptor {head}; the queue has {size}")]
    HeadOutOfRange { position: u16, head: u16, size: u16 },
}

/// The next chain the guest posted on `queue`, `None` when it posted
/// nothing more, or why the queue is broken. A broken queue is left as it
/// was: the caller stops taking from it. Costs what `pop_descriptor_chain`
/// does: the checks that need more reads run only when it takes nothing.
pub fn next_chain<M>(queue: &mut Queue, mem: M) -> Result<Option<DescriptorChain<M>>, RingError>
where
    M: Clone + Deref,
    M::Target: GuestMemory,
{
    let size = queue.size();
    let next = queue.next_avail();
    let avail_ring = queue.avail_ring();
    let unmapped = RingError::AvailRingUnmapped { addr: avail_ring };
    let chain = match queue.iter(mem.clone()) {
        Ok(mut iter) => iter.next(),
        Err(virtio_queue::Error::InvalidAvailRingIndex) => {
            let avail = queue
                .avail_idx(mem.deref(), Ordering::Acquire)
                .map_err(|_| unmapped)?
                .0;
            return Err(RingError::AvailIndexTooFar {
                avail,
                next,
                ahead: (Wrapping(avail) - Wrapping(next)).0,
                size,
            });
        }
        Err(virtio_queue::Error::QueueNotReady) => return Err(RingError::NotReady),
        Err(_) => return Err(unmapped),
    };
    let Some(chain) = chain else {
        // Nothing posted, or the entry to read is outside guest memory
        // (the snapshot `mem` cannot change in between).
        let entry = AVAIL_RING_HEADER_LEN + u64::from(next % size.max(1)) * AVAIL_ENTRY_LEN;
        let readable = GuestAddress(avail_ring)
            .checked_add(entry)
            .is_some_and(|addr| mem.load::<u16>(addr, Ordering::Relaxed).is_ok());
        return if readable { Ok(None) } else { Err(unmapped) };
    };
    let head = chain.head_index();
    if head >= size {
        queue.go_to_previous_position();
        return Err(RingError::HeadOutOfRange {
            position: next,
            head,
            size,
        });
    }
    Ok(Some(chain))
}

/// Makes a queue's kick eventfd readable again, so that the worker's event
/// loop calls it back after it has looked at its other events (its exit
/// event among them): how a worker that has taken its budget of requests
/// for one event yields without leaving the rest unserved.
pub fn kick_again(kick: &impl std::os::fd::AsRawFd) {
    // SAFETY: the caller's `kick` keeps the fd open for this call.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(kick.as_raw_fd()) };
    // A full eventfd counter (EAGAIN) already means "readable".
    let _ = nix::unistd::write(fd, &1u64.to_ne_bytes());
}

/// The descriptors of `chain`, but no more than `max + 1` of them: enough
/// for the device to see that a chain is longer than it takes. A guest's
/// chain can be an indirect table of thousands of entries, and reading all
/// of them for each of the chains a worker takes per event would let a
/// guest buy a backend's CPU time cheaply.
pub fn descriptors_up_to<M>(chain: DescriptorChain<M>, max: usize) -> Vec<Descriptor>
where
    M: Deref,
    M::Target: GuestMemory,
{
    chain.take(max.saturating_add(1)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    const SIZE: u16 = 16;

    fn setup() -> (GuestMemoryMmap, Queue) {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let mock = MockSplitQueue::new(&mem, SIZE);
        let descs: Vec<RawDescriptor> = (0..2)
            .map(|i| RawDescriptor::from(SplitDescriptor::new(0x8000 + i * 0x100, 0x100, 0, 0)))
            .collect();
        mock.add_desc_chains(&descs, 0).unwrap();
        let queue: Queue = mock.create_queue().unwrap();
        (mem, queue)
    }

    fn set_avail_idx(mem: &GuestMemoryMmap, queue: &Queue, idx: u16) {
        mem.write_obj(idx.to_le(), GuestAddress(queue.avail_ring() + 2))
            .unwrap();
    }

    #[test]
    fn posted_chains_are_taken_then_none() {
        let (mem, mut queue) = setup();
        assert_eq!(
            next_chain(&mut queue, &mem).unwrap().unwrap().head_index(),
            0
        );
        assert_eq!(
            next_chain(&mut queue, &mem).unwrap().unwrap().head_index(),
            1
        );
        assert!(next_chain(&mut queue, &mem).unwrap().is_none());
    }

    #[test]
    fn an_avail_index_more_than_the_size_ahead_breaks_the_queue() {
        let (mem, mut queue) = setup();
        set_avail_idx(&mem, &queue, SIZE + 1);
        assert_eq!(
            next_chain(&mut queue, &mem).err(),
            Some(RingError::AvailIndexTooFar {
                avail: SIZE + 1,
                next: 0,
                ahead: SIZE + 1,
                size: SIZE
            })
        );
        // Exactly a full ring is fine.
        set_avail_idx(&mem, &queue, SIZE);
        assert!(next_chain(&mut queue, &mem).unwrap().is_some());
    }

    #[test]
    fn a_head_past_the_queue_breaks_it_and_is_not_taken() {
        let (mem, mut queue) = setup();
        mem.write_obj(SIZE.to_le(), GuestAddress(queue.avail_ring() + 4))
            .unwrap();
        assert_eq!(
            next_chain(&mut queue, &mem).err(),
            Some(RingError::HeadOutOfRange {
                position: 0,
                head: SIZE,
                size: SIZE
            })
        );
        assert_eq!(queue.next_avail(), 0);
    }

    #[test]
    fn an_avail_ring_at_address_0_breaks_the_queue() {
        let (mem, mut queue) = setup();
        queue.set_avail_ring_address(Some(0), None);
        assert_eq!(
            next_chain(&mut queue, &mem).err(),
            Some(RingError::NotReady)
        );
    }

    #[test]
    fn an_unmapped_avail_ring_breaks_the_queue() {
        let (mem, mut queue) = setup();
        queue.set_avail_ring_address(Some(0x20_0000), None);
        assert_eq!(
            next_chain(&mut queue, &mem).err(),
            Some(RingError::AvailRingUnmapped { addr: 0x20_0000 })
        );
    }

    #[test]
    fn a_long_chain_is_read_only_past_the_limit() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let mock = MockSplitQueue::new(&mem, SIZE);
        let descs: Vec<RawDescriptor> = (0..SIZE)
            .map(|i| {
                let next = if i + 1 < SIZE { 1 } else { 0 };
                RawDescriptor::from(SplitDescriptor::new(
                    0x8000 + u64::from(i) * 0x100,
                    0x100,
                    next,
                    i + 1,
                ))
            })
            .collect();
        mock.add_desc_chains(&descs, 0).unwrap();
        let mut queue: Queue = mock.create_queue().unwrap();
        let chain = next_chain(&mut queue, &mem).unwrap().unwrap();
        assert_eq!(descriptors_up_to(chain, 4).len(), 5);
    }
}
