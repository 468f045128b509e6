//! The vhost-user device: features, config space and queue processing.
//! One worker thread per queue (vhost-user-backend runs them), or fewer
//! when the process may use fewer CPUs than it has queues; then each worker
//! serves several queues on one io_uring. A worker fills as many requests
//! as the guest posted per kick, completes them in one batch, and then
//! polls the avail rings for a short window before going back to waiting
//! on the kick eventfds.

use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserInflight, VhostUserProtocolFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX,
    VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::disk::{Disk, SECTOR_SIZE};
use crate::engine::{Done, Engine, Op, Ticket};
use crate::inflight::InflightRegion;
use crate::request::{self, Plan, MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, SEG_MAX};

/// Requests one worker keeps in flight.
const MAX_IN_FLIGHT: u32 = 256;

/// vhost-user's own feature bit: the frontend may use protocol features.
const VHOST_USER_F_PROTOCOL_FEATURES: u32 = 30;
/// The largest data descriptor we accept, in bytes (`size_max`).
const SIZE_MAX: u32 = 1 << 20;
const CONFIG_LEN: usize = 60;

/// Settings of the backend.
#[derive(Debug, Clone)]
pub struct BackendConfig {
    pub queues: usize,
    /// Worker threads (1..=queues); queue `q` is served by `q % threads`.
    pub threads: usize,
    pub queue_size: usize,
    /// How long a worker keeps polling its queue after the last request.
    pub poll: Duration,
    pub serial: Vec<u8>,
    /// Use io_uring where the kernel has it.
    pub io_uring: bool,
    /// The seccomp filters; each worker installs "worker" at its first event.
    pub seccomp: tessera_seccomp::Filters,
}

/// A virtio-blk device served over vhost-user.
pub struct BlockBackend {
    disk: Disk,
    config: BackendConfig,
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
    event_idx: AtomicBool,
    exits: Vec<(EventConsumer, EventNotifier)>,
    /// One I/O engine per worker thread.
    engines: Vec<Mutex<Engine>>,
    /// The inflight region the frontend set, if any.
    inflight: RwLock<Option<Arc<InflightRegion>>>,
}

impl BlockBackend {
    /// Creates the device; `mem` is the guest memory the daemon maps.
    pub fn new(
        disk: Disk,
        config: BackendConfig,
        mem: GuestMemoryAtomic<GuestMemoryMmap>,
    ) -> io::Result<Self> {
        let threads = queue_masks(config.queues, config.threads).len();
        let exits = (0..threads)
            .map(|_| new_event_consumer_and_notifier(EventFlag::NONBLOCK))
            .collect::<io::Result<Vec<_>>>()?;
        let engines = (0..threads)
            .map(|_| Mutex::new(Engine::new(MAX_IN_FLIGHT, config.io_uring, disk.direct())))
            .collect::<Vec<_>>();
        if let Some(engine) = engines.first() {
            let uring = engine.lock().map(|e| e.is_uring()).unwrap_or(false);
            log::info!(
                "I/O engine: {}",
                if uring { "io_uring" } else { "synchronous" }
            );
        }
        Ok(Self {
            disk,
            config,
            mem,
            event_idx: AtomicBool::new(false),
            exits,
            engines,
            inflight: RwLock::new(None),
        })
    }

    /// Makes completed writes durable.
    pub fn flush(&self) -> io::Result<()> {
        self.disk.flush()
    }

    /// Wakes every worker thread so that it exits.
    pub fn stop_workers(&self) {
        for (_, notifier) in &self.exits {
            let _ = notifier.notify();
        }
    }

    /// The device's virtio-blk configuration space.
    pub fn config_space(&self) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        let mut put = |at: usize, bytes: &[u8]| c[at..at + bytes.len()].copy_from_slice(bytes);
        put(0, &self.disk.sectors().to_le_bytes()); // capacity
        put(8, &SIZE_MAX.to_le_bytes()); // size_max
        put(12, &SEG_MAX.to_le_bytes()); // seg_max
        put(20, &(SECTOR_SIZE as u32).to_le_bytes()); // blk_size
        put(32, &[1]); // wce: writeback, so FLUSH matters
        put(34, &(self.config.queues as u16).to_le_bytes()); // num_queues
        put(36, &MAX_DISCARD_SECTORS.to_le_bytes());
        put(40, &MAX_DISCARD_SEG.to_le_bytes());
        put(44, &1u32.to_le_bytes()); // discard_sector_alignment
        put(48, &MAX_DISCARD_SECTORS.to_le_bytes()); // max_write_zeroes_sectors
        put(52, &MAX_DISCARD_SEG.to_le_bytes()); // max_write_zeroes_seg
        put(56, &[1]); // write_zeroes_may_unmap
        c
    }

    /// Serves the worker's `vrings` until none has anything posted or in
    /// flight: takes every request the guest posted on any of them, keeps
    /// their I/O in flight together on the worker's one engine, completes
    /// them as they finish, and signals each queue once per batch of its
    /// completions.
    fn process_queues(&self, vrings: &[VringRwLock], thread: usize) -> io::Result<()> {
        let event_idx = self.event_idx.load(Ordering::Relaxed);
        let mut mem = self.mem.memory().into_inner();
        // Snapshots replaced while this call runs: their mappings must stay
        // while requests that point into them are in flight, and this call
        // returns only once nothing is.
        let mut replaced: Vec<Arc<GuestMemoryMmap>> = Vec::new();
        let engine = self
            .engines
            .get(thread)
            .ok_or_else(|| io::Error::other(format!("no engine for worker {thread}")))?;
        let mut engine = engine.lock().unwrap_or_else(|p| p.into_inner());
        // The guest may leave queues unset or disabled: those are not
        // touched, not even their notification flags.
        let live: Vec<(usize, &VringRwLock)> = vrings
            .iter()
            .enumerate()
            .filter(|(_, vring)| {
                let state = vring.get_ref();
                state.is_enabled() && state.get_queue().ready()
            })
            .collect();
        let completer = Completer {
            vrings,
            inflight: self
                .inflight
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            thread,
            threads: self.exits.len(),
        };
        let mut done: Vec<Done> = Vec::new();
        let mut completed = vec![false; vrings.len()];
        loop {
            if event_idx {
                for (_, vring) in &live {
                    vring.disable_notification().map_err(io::Error::other)?;
                }
            }
            let mut completed_any = false;
            loop {
                completed.fill(false);
                // The frontend may have added memory while this worker was
                // busy (or preempted) and then posted requests that use it.
                let latest = self.mem.memory().into_inner();
                if !Arc::ptr_eq(&latest, &mem) {
                    replaced.push(std::mem::replace(&mut mem, latest));
                }
                for &(position, vring) in &live {
                    while engine.has_room() {
                        let chain = vring
                            .get_mut()
                            .get_queue_mut()
                            .pop_descriptor_chain(mem.clone());
                        let Some(chain) = chain else { break };
                        let head = chain.head_index();
                        completer.taken(position, head);
                        let descriptors: Vec<Descriptor> = chain.collect();
                        let plan =
                            request::plan(&descriptors, &mem, &self.disk, &self.config.serial);
                        let (status, op) = match plan {
                            Plan::Done(completion) => {
                                completer.complete(position, head, completion)?;
                                completed[position] = true;
                                continue;
                            }
                            Plan::Io { io, status } => (status, Op::Io(io)),
                            Plan::Flush { status } => (status, Op::Flush),
                        };
                        let ticket = Ticket {
                            position,
                            head,
                            status,
                        };
                        // The synchronous engine (or a failed submission)
                        // finishes at once.
                        if let Some((ticket, result)) = engine.start(&self.disk, ticket, op) {
                            let completion = request::finish(&mem, ticket.status, result);
                            completer.complete(position, ticket.head, completion)?;
                            completed[position] = true;
                        }
                    }
                }
                engine.reap(&self.disk, !completed.contains(&true), &mut done)?;
                for (ticket, result) in done.drain(..) {
                    let completion = request::finish(&mem, ticket.status, result);
                    completer.complete(ticket.position, ticket.head, completion)?;
                    if let Some(flag) = completed.get_mut(ticket.position) {
                        *flag = true;
                    }
                }
                if completed.contains(&true) {
                    completed_any = true;
                    for &(position, vring) in &live {
                        if !completed[position] {
                            continue;
                        }
                        let notify =
                            !event_idx || vring.needs_notification().map_err(io::Error::other)?;
                        if notify {
                            vring.signal_used_queue()?;
                        }
                    }
                } else if engine.in_flight() == 0 {
                    break;
                }
            }
            if completed_any && self.poll_for_more(&live, &mem) {
                continue;
            }
            if !event_idx {
                return Ok(());
            }
            // More requests may have arrived while notifications were off.
            let mut posted = false;
            for (_, vring) in &live {
                posted |= vring.enable_notification().map_err(io::Error::other)?;
            }
            if !posted {
                return Ok(());
            }
        }
    }

    /// Spins for the polling window; true if the guest posted a request on
    /// any of `vrings`.
    fn poll_for_more(&self, vrings: &[(usize, &VringRwLock)], mem: &GuestMemoryMmap) -> bool {
        if self.config.poll.is_zero() {
            return false;
        }
        let deadline = Instant::now() + self.config.poll;
        while Instant::now() < deadline {
            for (_, vring) in vrings {
                let state = vring.get_ref();
                let queue = state.get_queue();
                if let Ok(avail) = queue.avail_idx(mem, Ordering::Acquire) {
                    if avail.0 != queue.next_avail() {
                        return true;
                    }
                }
            }
            std::hint::spin_loop();
        }
        false
    }
}

/// Where one worker's requests are completed: its vrings (by position),
/// and the inflight region, if the frontend set one, where each vring has
/// its device-wide queue index.
struct Completer<'a> {
    vrings: &'a [VringRwLock],
    inflight: Option<Arc<InflightRegion>>,
    thread: usize,
    threads: usize,
}

impl Completer<'_> {
    /// The device-wide index of the worker's vring at `position` (queue
    /// `q` is served by worker `q % threads`).
    fn queue_index(&self, position: usize) -> usize {
        self.thread + position * self.threads
    }

    /// Marks request `head` of the vring at `position` as taken.
    fn taken(&self, position: usize, head: u16) {
        if let Some(region) = &self.inflight {
            region.taken(self.queue_index(position), head);
        }
    }

    /// Puts request `head` into the used ring of the vring at `position`.
    fn complete(
        &self,
        position: usize,
        head: u16,
        completion: request::Completion,
    ) -> io::Result<()> {
        if let Err(err) = &completion.result {
            log::debug!("request {head} failed: {err}");
        }
        let vring = self
            .vrings
            .get(position)
            .ok_or_else(|| io::Error::other(format!("no queue at {position} in this worker")))?;
        let queue = self.queue_index(position);
        if let Some(region) = &self.inflight {
            region.completing(queue, head);
        }
        vring
            .add_used(head, completion.used_len)
            .map_err(io::Error::other)?;
        if let Some(region) = &self.inflight {
            let used = vring.get_ref().get_queue().next_used();
            region.completed(queue, head, used);
        }
        Ok(())
    }
}

impl VhostUserBackend for BlockBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        self.config.queues
    }

    fn max_queue_size(&self) -> usize {
        self.config.queue_size
    }

    fn features(&self) -> u64 {
        let mut features = 1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | 1 << VHOST_USER_F_PROTOCOL_FEATURES
            | 1 << VIRTIO_BLK_F_SIZE_MAX
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_BLK_F_FLUSH
            | 1 << VIRTIO_BLK_F_CONFIG_WCE
            | 1 << VIRTIO_BLK_F_MQ;
        if self.disk.read_only() {
            features |= 1 << VIRTIO_BLK_F_RO;
        } else {
            features |= 1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES;
        }
        features
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        // CONFIGURE_MEM_SLOTS (memory added region by region) is what
        // libblkio requires.
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD
    }

    fn get_inflight_fd(&self, asked: &VhostUserInflight) -> io::Result<(VhostUserInflight, File)> {
        Ok(InflightRegion::create(
            asked,
            self.config.queues,
            self.config.queue_size,
        )?)
    }

    fn set_inflight_fd(&self, given: &VhostUserInflight, file: File) -> io::Result<()> {
        let region = InflightRegion::open(given, file, self.config.queues, self.config.queue_size)?;
        for queue in 0..usize::from(given.num_queues) {
            let left = region.start_queue(queue);
            if left > 0 {
                // Resubmitting them is part of reconnecting, which this
                // backend does not do yet.
                log::warn!(
                    "queue {queue}: {left} request(s) an earlier backend left in flight are not resubmitted"
                );
            }
        }
        *self.inflight.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(region));
        eprintln!(
            "vhost-user-blk: tracking in-flight requests of {} queue(s) of {} entries in the frontend's region",
            given.num_queues, given.queue_size
        );
        Ok(())
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let space = self.config_space();
        let start = (offset as usize).min(CONFIG_LEN);
        let end = start.saturating_add(size as usize).min(CONFIG_LEN);
        let mut out = space[start..end].to_vec();
        out.resize(size as usize, 0);
        out
    }

    fn update_memory(&self, _mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        // The daemon updates the shared GuestMemoryAtomic this backend holds.
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        queue_masks(self.config.queues, self.config.threads)
    }

    fn exit_event(&self, thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        let (consumer, notifier) = self.exits.get(thread_index)?;
        Some((consumer.try_clone().ok()?, notifier.try_clone().ok()?))
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        thread_id: usize,
    ) -> io::Result<()> {
        // The library starts the workers; each confines itself before it
        // touches its first guest request.
        if let Err(err) = self.config.seccomp.apply_once_per_thread("worker") {
            eprintln!("vhost-user-blk: {err}; exiting rather than serve unconfined");
            std::process::exit(1);
        }
        if evset != EventSet::IN {
            return Err(io::Error::other(format!("unexpected event set {evset:?}")));
        }
        if usize::from(device_event) >= vrings.len() {
            return Err(io::Error::other(format!("no queue {device_event}")));
        }
        self.process_queues(vrings, thread_id)
    }
}

/// The queues each worker serves, as vhost-user-backend's bitmasks: queue
/// `q` goes to worker `q % threads`.
fn queue_masks(queues: usize, threads: usize) -> Vec<u64> {
    let threads = threads.clamp(1, queues.max(1));
    (0..threads)
        .map(|thread| {
            (thread..queues)
                .step_by(threads)
                .fold(0u64, |mask, queue| mask | 1 << queue)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::queue_masks;

    #[test]
    fn queues_are_dealt_round_robin_to_the_workers() {
        assert_eq!(queue_masks(4, 4), [0b0001, 0b0010, 0b0100, 0b1000]);
        assert_eq!(queue_masks(4, 1), [0b1111]);
        assert_eq!(queue_masks(5, 2), [0b10101, 0b01010]);
        assert_eq!(queue_masks(2, 8), [0b01, 0b10]);
        assert_eq!(queue_masks(1, 0), [0b1]);
    }
}
