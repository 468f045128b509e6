//! The vhost-user device: features, config space and queue processing.
//! One worker thread per queue (vhost-user-backend runs them), or fewer
//! when the process may use fewer CPUs than it has queues; then each worker
//! serves several queues on one io_uring. A worker fills as many requests
//! as the guest posted per kick, completes them in one batch, and then
//! polls the avail rings for a short window before going back to waiting
//! on the kick eventfds.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use backend_stats::{BlockCounter, Stats};
use tessera_backend_control::{ControlMessage, LimitTarget};
use tessera_rate_limiter::{Charged, SharedLimiter};
use vhost::vhost_user::message::{
    VhostUserInflight, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost_user_backend::VringT;
use vhost_user_common::device::{Device, WorkerCommon, WorkerEvent};
use vhost_user_common::guest_log;
use vhost_user_common::ratelimit::{self, RateLimit};
use vhost_user_common::ring::{self, RingError};
use vhost_user_common::worker;
use vhost_user_common::{BackendMemory, BackendVring};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX,
    VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
use virtio_queue::{DescriptorChain, QueueT};
use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::disk::{Disk, SECTOR_SIZE};
use crate::engine::{Done, Engine, Op, Ticket};
use crate::inflight::InflightRegion;
use crate::request::{
    self, Plan, RequestError, Work, MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, SEG_MAX, SIZE_MAX,
};

/// Requests one worker keeps in flight.
const MAX_IN_FLIGHT: u32 = 256;
/// Requests one `handle_event` takes before it lets the worker's event
/// loop look at its other events (its exit event among them) and kicks
/// itself to come back: a guest that keeps posting (or whose used ring
/// overlaps its avail index, so that each completion posts a request)
/// must not keep a worker from ever stopping.
const MAX_TAKEN_PER_EVENT: usize = 4 * MAX_IN_FLIGHT as usize;
/// Requests left to take on a queue when its worker signals what it
/// completed so far (see [`ask_refill`]): about what it gets through while
/// the frontend's thread wakes up (tmpfs, 4 KiB at QD32: writes 462k to
/// 473k IOPS with it, 397k to 400k without).
const REFILL_MARK: u16 = 8;

const CONFIG_LEN: usize = 60;
/// The config space's `writeback` byte: 0 write-through, 1 write-back.
const WRITEBACK_OFFSET: u32 = 32;

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
    /// The counters the VMM's metrics report.
    pub stats: Stats<BlockCounter>,
}

/// Why a worker stopped serving. Each one breaks the device: see
/// [`BlockBackend::broken_event`].
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("queue {queue} is broken: {source}")]
    Broken { queue: usize, source: RingError },
    #[error("queue {queue}: {source}")]
    Queue {
        queue: usize,
        source: virtio_queue::Error,
    },
    #[error("cannot signal queue {queue}: {source}")]
    Signal { queue: usize, source: io::Error },
    #[error("the I/O engine of worker {thread} failed: {source}")]
    Engine { thread: usize, source: io::Error },
    #[error("unexpected event set {0:?} on a kick")]
    EventSet(EventSet),
    #[error("no I/O engine for worker {0}")]
    NoEngine(usize),
    #[error("no queue at position {0} in this worker")]
    NoQueue(usize),
}

/// Refused or failed requests, logged at debug level.
static REFUSED_REQUESTS: RateLimit = RateLimit::new(ratelimit::BURST, ratelimit::INTERVAL);
/// The guest's config writes.
static CONFIG_WRITES: RateLimit = RateLimit::new(ratelimit::BURST, ratelimit::INTERVAL);
/// Inflight regions set, once per activation of the device by the guest.
static ACTIVATIONS: RateLimit = RateLimit::new(ratelimit::BURST, ratelimit::INTERVAL);

/// A virtio-blk device served over vhost-user.
pub struct BlockBackend {
    disk: Disk,
    config: BackendConfig,
    mem: GuestMemoryAtomic<BackendMemory>,
    common: WorkerCommon,
    acked_features: AtomicU64,
    /// One I/O engine per worker thread.
    engines: Vec<Mutex<Engine>>,
    /// The inflight region the frontend set, if any.
    inflight: RwLock<Option<Arc<InflightRegion>>>,
    /// Per queue: an earlier backend left requests in flight in the region
    /// just set; they are looked up when the queue next runs, once its
    /// ring is known.
    recovering: Vec<AtomicBool>,
    /// Per queue: those requests, oldest first, served before new ones.
    resubmit: Vec<Mutex<VecDeque<u16>>>,
    /// Set once a worker failed; then nothing more is served.
    broken: AtomicBool,
    broken_event: (EventConsumer, EventNotifier),
    /// The drive's rate limiter (none until the VMM sends limits): every
    /// worker charges its requests to it, and every worker's epoll waits
    /// on its timer.
    limiter: SharedLimiter,
}

impl BlockBackend {
    /// Creates the device; `mem` is the guest memory the daemon maps.
    pub fn new(
        disk: Disk,
        config: BackendConfig,
        mem: GuestMemoryAtomic<BackendMemory>,
    ) -> io::Result<Self> {
        let threads = queue_masks(config.queues, config.threads).len();
        let common = WorkerCommon::new(config.queue_size, threads, config.seccomp.clone())?;
        let engines = (0..threads)
            .map(|_| Mutex::new(Engine::new(MAX_IN_FLIGHT, config.io_uring, &disk)))
            .collect::<Vec<_>>();
        if let Some(engine) = engines.first() {
            let uring = engine.lock().map(|e| e.is_uring()).unwrap_or(false);
            log::info!(
                "I/O engine: {}",
                if uring { "io_uring" } else { "synchronous" }
            );
        }
        let recovering = (0..config.queues).map(|_| AtomicBool::new(false)).collect();
        let resubmit = (0..config.queues).map(|_| Mutex::default()).collect();
        Ok(Self {
            disk,
            config,
            mem,
            common,
            acked_features: AtomicU64::new(0),
            engines,
            inflight: RwLock::new(None),
            recovering,
            resubmit,
            broken: AtomicBool::new(false),
            broken_event: new_event_consumer_and_notifier(EventFlag::empty())?,
            limiter: SharedLimiter::new()?,
        })
    }

    /// The epoll value of the rate limiter's timer in every worker (after
    /// the queues and the exit event).
    pub fn limiter_event(&self) -> u64 {
        (self.config.queues + 1) as u64
    }

    /// The rate limiter's timerfd, for each worker's epoll.
    pub fn limiter_fd(&self) -> RawFd {
        self.limiter.as_raw_fd()
    }

    /// Whether the rate limiter holds the queues back now.
    fn throttled(&self) -> bool {
        self.limiter.is_blocked()
    }

    /// Charges a request that goes ahead; a debt holds the next back.
    fn charge(&self, bytes: u32) {
        if self.limiter.charge(u64::from(bytes)) == Charged::Throttled {
            self.stats().inc(BlockCounter::RateLimiterThrottledEvents);
        }
    }

    /// The counters the VMM's metrics report.
    pub fn stats(&self) -> &Stats<BlockCounter> {
        &self.config.stats
    }

    /// Makes completed writes durable.
    pub fn flush(&self) -> io::Result<()> {
        self.disk.flush()
    }

    /// Prefaults the image's mapping, if it has one, in the background.
    pub fn prefault_image(&self) -> io::Result<()> {
        self.disk.prefault_in_background()
    }

    /// Whether a worker failed (the guest broke a queue, or the engine
    /// failed): nothing is served any more.
    pub fn is_broken(&self) -> bool {
        self.broken.load(Ordering::Acquire)
    }

    /// An event that becomes readable (a blocking read returns) once the
    /// device is broken. The binary then ends the process, which closes the
    /// vhost-user connection: the VMM treats that as a dead backend and
    /// fails the disk's requests, as libvhost-user backends do on a broken
    /// ring (`vu_panic`).
    pub fn broken_event(&self) -> io::Result<EventConsumer> {
        self.broken_event.0.try_clone()
    }

    /// Marks the device broken; the first failure is logged and announced.
    fn break_device(&self, err: &WorkerError) {
        if matches!(err, WorkerError::Broken { .. }) {
            self.stats().inc(BlockCounter::EventFails);
        }
        if !self.broken.swap(true, Ordering::AcqRel) {
            log::error!("{err}; the device stops");
            if let Err(err) = self.broken_event.1.notify() {
                log::error!("cannot announce the broken device: {err}");
            }
        }
    }

    /// Wakes every worker thread so that it exits.
    pub fn stop_workers(&self) {
        self.common.stop_workers();
    }

    /// The device's virtio-blk configuration space.
    pub fn config_space(&self) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        let mut put = |at: usize, bytes: &[u8]| c[at..at + bytes.len()].copy_from_slice(bytes);
        put(0, &self.disk.sectors().to_le_bytes()); // capacity
        put(8, &SIZE_MAX.to_le_bytes()); // size_max
        put(12, &SEG_MAX.to_le_bytes()); // seg_max
        put(20, &(SECTOR_SIZE as u32).to_le_bytes()); // blk_size
        put(32, &[u8::from(!self.disk.write_through())]); // writeback
        put(34, &(self.config.queues as u16).to_le_bytes()); // num_queues
        put(36, &MAX_DISCARD_SECTORS.to_le_bytes());
        put(40, &MAX_DISCARD_SEG.to_le_bytes());
        put(44, &1u32.to_le_bytes()); // discard_sector_alignment
        put(48, &MAX_DISCARD_SECTORS.to_le_bytes()); // max_write_zeroes_sectors
        put(52, &MAX_DISCARD_SEG.to_le_bytes()); // max_write_zeroes_seg
        put(56, &[1]); // write_zeroes_may_unmap
        c
    }

    /// Serves the worker's `vrings` (see [`Self::serve`]). On an error it
    /// first waits for the worker's I/O in flight, whose buffers lie in the
    /// memory snapshots it holds.
    fn process_queues(&self, vrings: &[BackendVring], thread: usize) -> Result<(), WorkerError> {
        let engine = self
            .engines
            .get(thread)
            .ok_or(WorkerError::NoEngine(thread))?;
        let mut engine = engine.lock().unwrap_or_else(|p| p.into_inner());
        let mut mem = self.mem.memory().into_inner();
        // Snapshots replaced while this call runs: their mappings must stay
        // while requests that point into them are in flight.
        let mut replaced: Vec<Arc<BackendMemory>> = Vec::new();
        let result = self.serve(vrings, thread, &mut engine, &mut mem, &mut replaced);
        if result.is_err() {
            if let Err(err) = engine.drain() {
                // The kernel may still write into these mappings: keep them
                // until the process ends.
                log::error!("worker {thread}: cannot wait for its I/O in flight: {err}");
                std::mem::forget(mem);
                std::mem::forget(replaced);
            }
        }
        result
    }

    /// Serves `vrings` until none has anything posted or in flight: takes
    /// every request the guest posted on any of them, keeps their I/O in
    /// flight together on the worker's one engine, completes them as they
    /// finish, and signals each queue once per batch of its completions.
    /// Returns only once nothing is in flight, unless it fails.
    fn serve(
        &self,
        vrings: &[BackendVring],
        thread: usize,
        engine: &mut Engine,
        mem: &mut Arc<BackendMemory>,
        replaced: &mut Vec<Arc<BackendMemory>>,
    ) -> Result<(), WorkerError> {
        let event_idx = self.common.event_idx();
        let completer = Completer {
            vrings,
            inflight: self
                .inflight
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            thread,
            threads: self.common.threads(),
            stats: self.stats(),
        };
        let queue_error = |position: usize| {
            let queue = completer.queue_index(position);
            move |source| WorkerError::Queue { queue, source }
        };
        // The guest may leave queues unset or disabled: those are not
        // touched, not even their notification flags.
        let live: Vec<(usize, &BackendVring)> = vrings
            .iter()
            .enumerate()
            .filter(|(_, vring)| {
                let state = vring.get_ref();
                state.is_enabled() && state.get_queue().ready()
            })
            .collect();
        if let Some(region) = &completer.inflight {
            for &(position, vring) in &live {
                self.recover(region, completer.queue_index(position), vring, mem)?;
            }
        }
        let mut batch = Batch {
            event_idx,
            taken: 0,
            completed: vec![false; vrings.len()],
            refill_asked: vec![false; vrings.len()],
            done: Vec::new(),
        };
        loop {
            if event_idx {
                for &(position, vring) in &live {
                    vring
                        .disable_notification()
                        .map_err(queue_error(position))?;
                }
            }
            let mut completed_any = false;
            loop {
                batch.completed.fill(false);
                batch.refill_asked.fill(false);
                // The frontend may have added memory while this worker was
                // busy (or preempted) and then posted requests that use it.
                let latest = self.mem.memory().into_inner();
                if !Arc::ptr_eq(&latest, mem) {
                    replaced.push(std::mem::replace(mem, latest));
                }
                for &(position, vring) in &live {
                    self.take_requests(&completer, &mut batch, position, vring, engine, mem)?;
                }
                let idle = !batch.completed.contains(&true);
                engine
                    .reap(&self.disk, idle, &mut batch.done)
                    .map_err(|source| WorkerError::Engine { thread, source })?;
                for (ticket, result) in batch.done.drain(..) {
                    let completion = request::finish(mem, ticket.status, ticket.work, result);
                    completer.complete(ticket.position, ticket.head, completion)?;
                    if let Some(flag) = batch.completed.get_mut(ticket.position) {
                        *flag = true;
                    }
                }
                if batch.completed.contains(&true) {
                    completed_any = true;
                    signal_completed(&completer, &live, &batch.completed, event_idx)?;
                } else if engine.in_flight() == 0 {
                    break;
                }
            }
            // Held back by the rate limiter: its timer wakes every worker
            // once the debt is paid (and the requests posted meanwhile
            // wait in the rings, the back-pressure the guest sees).
            if self.throttled() {
                return Ok(());
            }
            if batch.taken >= MAX_TAKEN_PER_EVENT {
                for &(_, vring) in &live {
                    if let Some(kick) = vring.get_ref().get_kick() {
                        ring::kick_again(kick);
                    }
                }
                return Ok(());
            }
            if completed_any && self.poll_for_more(&live, mem) {
                continue;
            }
            if !event_idx {
                return Ok(());
            }
            // More requests may have arrived while notifications were off.
            // A queue the frontend stopped meanwhile takes none (below), so
            // it must not say "more" either: the pass would spin with the
            // engine held, and the frontend's GET_VRING_BASE would wait
            // for it forever.
            let mut posted = false;
            for &(position, vring) in &live {
                if is_started(vring) {
                    posted |= vring.enable_notification().map_err(queue_error(position))?;
                }
            }
            if !posted {
                return Ok(());
            }
        }
    }

    /// Takes the requests posted on the vring at `position` while the
    /// engine has room and the event's budget lasts: those that need no
    /// I/O (or whose I/O the engine did in place) complete at once, the
    /// others are started.
    fn take_requests(
        &self,
        completer: &Completer,
        batch: &mut Batch,
        position: usize,
        vring: &BackendVring,
        engine: &mut Engine,
        mem: &Arc<BackendMemory>,
    ) -> Result<(), WorkerError> {
        let queue = completer.queue_index(position);
        // A queue the frontend stopped (GET_VRING_BASE) during this pass
        // takes no more requests; those in flight still complete.
        let started = is_started(vring);
        while started && engine.has_room() && batch.taken < MAX_TAKEN_PER_EVENT && !self.throttled()
        {
            batch.taken += 1;
            let chain = match self.next_resubmitted(queue, vring, mem) {
                Some(chain) => chain,
                None => {
                    let chain = ring::next_chain(vring.get_mut().get_queue_mut(), mem.clone())
                        .map_err(|source| WorkerError::Broken { queue, source })?;
                    let Some(chain) = chain else { break };
                    completer.taken(position, chain.head_index());
                    chain
                }
            };
            let head = chain.head_index();
            let descriptors = ring::descriptors_up_to(chain, request::MAX_DESCRIPTORS);
            let plan = request::plan(&descriptors, mem, &self.disk, &self.config.serial);
            let (status, work, op) = match plan {
                Plan::Done(completion) => {
                    completer.complete(position, head, completion)?;
                    batch.completed[position] = true;
                    continue;
                }
                Plan::Io { io, status } => {
                    self.charge(io.len);
                    (status, io.work(), Op::Io(io))
                }
                Plan::Flush { status } => {
                    self.charge(0);
                    (status, Work::Flush, Op::Flush)
                }
            };
            let ticket = Ticket {
                position,
                head,
                status,
                work,
            };
            let more = || more_posted(vring, mem);
            // The synchronous engine (or a failed submission) finishes at
            // once.
            if let Some((ticket, result)) = engine.start(&self.disk, ticket, op, more) {
                let completion = request::finish(mem, ticket.status, ticket.work, result);
                completer.complete(position, ticket.head, completion)?;
                batch.completed[position] = true;
                ask_refill(completer, batch, position, vring, mem)?;
            }
        }
        Ok(())
    }

    /// Once after the frontend set a region in which an earlier backend
    /// left requests of `queue` in flight: queues them for resubmission,
    /// and takes new requests from the avail ring after them, as
    /// libvhost-user does (every request the earlier backend took is
    /// either in the used ring or still marked).
    fn recover(
        &self,
        region: &InflightRegion,
        queue: usize,
        vring: &BackendVring,
        mem: &BackendMemory,
    ) -> Result<(), WorkerError> {
        let Some(recovering) = self.recovering.get(queue) else {
            return Ok(());
        };
        if !recovering.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        let mut state = vring.get_mut();
        let ring = state.get_queue_mut();
        let used = ring
            .used_idx(mem, Ordering::Acquire)
            .map_err(|source| WorkerError::Queue { queue, source })?
            .0;
        let left = region.left_in_flight(queue, used, ring.size());
        ring.set_next_used(used);
        ring.set_next_avail(used.wrapping_add(left.len() as u16));
        // Once per queue per new backend: the VMM bounds how often that is.
        log::info!(
            "queue {queue}: resubmitting {} request(s) an earlier backend left in flight",
            left.len()
        );
        if let Some(list) = self.resubmit.get(queue) {
            *list.lock().unwrap_or_else(|p| p.into_inner()) = left.into();
        }
        Ok(())
    }

    /// The next request of `queue` an earlier backend left in flight, if
    /// any is left to resubmit. It stays marked in the region until done.
    fn next_resubmitted(
        &self,
        queue: usize,
        vring: &BackendVring,
        mem: &Arc<BackendMemory>,
    ) -> Option<DescriptorChain<Arc<BackendMemory>>> {
        let head = self
            .resubmit
            .get(queue)?
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop_front()?;
        let state = vring.get_ref();
        let ring = state.get_queue();
        Some(DescriptorChain::new(
            mem.clone(),
            GuestAddress(ring.desc_table()),
            ring.size(),
            head,
        ))
    }

    /// Spins for the polling window; true if the guest posted a request on
    /// any of `vrings`.
    fn poll_for_more(&self, vrings: &[(usize, &BackendVring)], mem: &BackendMemory) -> bool {
        if self.config.poll.is_zero() {
            return false;
        }
        let deadline = Instant::now() + self.config.poll;
        while Instant::now() < deadline {
            for (_, vring) in vrings {
                if more_posted(vring, mem) {
                    return true;
                }
            }
            std::hint::spin_loop();
        }
        false
    }
}

/// Whether the guest has posted requests on `vring` that are not taken yet.
fn more_posted(vring: &BackendVring, mem: &BackendMemory) -> bool {
    posted_left(vring, mem) != 0
}

/// The requests the guest has posted on `vring` that are not taken yet.
fn posted_left(vring: &BackendVring, mem: &BackendMemory) -> u16 {
    let state = vring.get_ref();
    let queue = state.get_queue();
    queue
        .avail_idx(mem, Ordering::Acquire)
        .map_or(0, |avail| avail.0.wrapping_sub(queue.next_avail()))
}

/// Once per round, signals what the queue at `position` completed so far
/// when no more than [`REFILL_MARK`] requests are left to take, rather than
/// only at the round's end: the frontend's thread wakes up and posts more
/// while the worker is still busy, instead of after the queue ran dry. With
/// none left the round is about to end and signal anyway. Only with
/// EVENT_IDX, where the signal at the round's end is then skipped unless
/// the frontend asked for it again.
fn ask_refill(
    completer: &Completer,
    batch: &mut Batch,
    position: usize,
    vring: &BackendVring,
    mem: &BackendMemory,
) -> Result<(), WorkerError> {
    if !batch.event_idx || batch.refill_asked[position] {
        return Ok(());
    }
    if !(1..=REFILL_MARK).contains(&posted_left(vring, mem)) {
        return Ok(());
    }
    batch.refill_asked[position] = true;
    signal_queue(completer, position, vring, true)
}

/// Whether the frontend has the queue running (enabled and ready); one it
/// stopped (GET_VRING_BASE) takes no more requests.
fn is_started(vring: &BackendVring) -> bool {
    let state = vring.get_ref();
    state.is_enabled() && state.get_queue().ready()
}

/// One event's progress on a worker's queues.
struct Batch {
    /// The frontend asked for EVENT_IDX.
    event_idx: bool,
    /// Requests taken from the rings (at most [`MAX_TAKEN_PER_EVENT`]).
    taken: usize,
    /// Per vring position: requests completed in this round.
    completed: Vec<bool>,
    /// Per vring position: signalled ahead of the round's end.
    refill_asked: Vec<bool>,
    /// The engine's finished I/O, to complete.
    done: Vec<Done>,
}

/// Signals each live queue that completed requests this round, unless the
/// driver said (EVENT_IDX) it need not be.
fn signal_completed(
    completer: &Completer,
    live: &[(usize, &BackendVring)],
    completed: &[bool],
    event_idx: bool,
) -> Result<(), WorkerError> {
    for &(position, vring) in live {
        if completed[position] {
            signal_queue(completer, position, vring, event_idx)?;
        }
    }
    Ok(())
}

/// Signals the queue at `position`, unless the driver said (EVENT_IDX) it
/// need not be.
fn signal_queue(
    completer: &Completer,
    position: usize,
    vring: &BackendVring,
    event_idx: bool,
) -> Result<(), WorkerError> {
    let queue = completer.queue_index(position);
    let notify = !event_idx
        || vring
            .needs_notification()
            .map_err(|source| WorkerError::Queue { queue, source })?;
    if notify {
        vring
            .signal_used_queue()
            .map_err(|source| WorkerError::Signal { queue, source })?;
    }
    Ok(())
}

/// Where one worker's requests are completed: its vrings (by position),
/// and the inflight region, if the frontend set one, where each vring has
/// its device-wide queue index.
struct Completer<'a> {
    vrings: &'a [BackendVring],
    inflight: Option<Arc<InflightRegion>>,
    thread: usize,
    threads: usize,
    stats: &'a Stats<BlockCounter>,
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

    /// Counts what a request did, or how it failed.
    fn count(&self, completion: &request::Completion) {
        let stats = self.stats;
        match (&completion.result, completion.work) {
            (Err(RequestError::Io(_)), _) => stats.inc(BlockCounter::ExecuteFails),
            (Err(_), _) => stats.inc(BlockCounter::InvalidReqsCount),
            (Ok(()), Work::Read(bytes)) => {
                stats.inc(BlockCounter::ReadCount);
                stats.add(BlockCounter::ReadBytes, u64::from(bytes));
            }
            (Ok(()), Work::Write(bytes)) => {
                stats.inc(BlockCounter::WriteCount);
                stats.add(BlockCounter::WriteBytes, u64::from(bytes));
            }
            (Ok(()), Work::Flush) => stats.inc(BlockCounter::FlushCount),
            (Ok(()), Work::Discard) => stats.inc(BlockCounter::DiscardCount),
            (Ok(()), Work::Other) => {}
        }
    }

    /// Puts request `head` into the used ring of the vring at `position`.
    fn complete(
        &self,
        position: usize,
        head: u16,
        completion: request::Completion,
    ) -> Result<(), WorkerError> {
        let queue = self.queue_index(position);
        self.count(&completion);
        if let Err(err) = &completion.result {
            guest_log!(
                &REFUSED_REQUESTS,
                log::Level::Debug,
                "queue {queue}: request {head} failed: {err}"
            );
        }
        let vring = self
            .vrings
            .get(position)
            .ok_or(WorkerError::NoQueue(position))?;
        if let Some(region) = &self.inflight {
            region.completing(queue, head);
        }
        vring
            .add_used(head, completion.used_len)
            .map_err(|source| WorkerError::Queue { queue, source })?;
        if let Some(region) = &self.inflight {
            let used = vring.get_ref().get_queue().next_used();
            region.completed(queue, head, used);
        }
        Ok(())
    }
}

impl Device for BlockBackend {
    fn common(&self) -> &WorkerCommon {
        &self.common
    }

    fn num_queues(&self) -> usize {
        self.config.queues
    }

    fn device_features(&self) -> u64 {
        let mut features = 1 << VIRTIO_RING_F_INDIRECT_DESC
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
        // INFLIGHT_SHMFD: a restarted backend resubmits what its
        // predecessor left in flight.
        worker::PROTOCOL_FEATURES | VhostUserProtocolFeatures::INFLIGHT_SHMFD
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
            if let Some(list) = self.resubmit.get(queue) {
                list.lock().unwrap_or_else(|p| p.into_inner()).clear();
            }
            if let Some(recovering) = self.recovering.get(queue) {
                recovering.store(left > 0, Ordering::Release);
            }
        }
        *self.inflight.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(region));
        // Once per activation: a guest resetting its driver in a loop must
        // not flood the log.
        if let Some(suppressed) = ACTIVATIONS.admit() {
            log::info!(
                "tracking in-flight requests of {} queue(s) of {} entries in the frontend's region{}",
                given.num_queues,
                given.queue_size,
                if suppressed > 0 { format!(" ({suppressed} such lines suppressed)") } else { String::new() }
            );
        }
        Ok(())
    }

    /// The device starts write-back only if the driver can flush (virtio
    /// 1.2, 5.2.5.2); with CONFIG_WCE it may switch through `writeback`.
    /// `VHOST_F_LOG_ALL` switched on or off on a running device (a
    /// migration starting) leaves the cache mode the guest chose.
    fn acked_features(&self, features: u64) {
        let before = self.acked_features.swap(features, Ordering::Relaxed);
        if before ^ features == VhostUserVirtioFeatures::LOG_ALL.bits() {
            return;
        }
        self.disk
            .set_write_through(features & (1 << VIRTIO_BLK_F_FLUSH) == 0);
    }

    /// Only `writeback` is writable, and only with CONFIG_WCE; other
    /// writes are ignored, as QEMU does (the VMM fails a disk whose
    /// backend refuses a config write).
    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        let wce = self.acked_features.load(Ordering::Relaxed) & (1 << VIRTIO_BLK_F_CONFIG_WCE) != 0;
        match (offset, buf) {
            (WRITEBACK_OFFSET, &[writeback]) if wce => {
                self.disk.set_write_through(writeback == 0);
                guest_log!(
                    &CONFIG_WRITES,
                    log::Level::Info,
                    "the guest set the cache mode to {}",
                    if writeback == 0 {
                        "write-through"
                    } else {
                        "write-back"
                    }
                );
            }
            _ => guest_log!(
                &CONFIG_WRITES,
                log::Level::Debug,
                "config write of {} byte(s) at {offset} ignored",
                buf.len()
            ),
        }
        Ok(())
    }

    fn config_space(&self) -> Vec<u8> {
        self.config_space().to_vec()
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        queue_masks(self.config.queues, self.config.threads)
    }

    /// The drive's limits in force (at start, and after each
    /// `PATCH /drives/{id}`, which the VMM merges).
    fn control(&self, message: ControlMessage) -> io::Result<()> {
        match message {
            ControlMessage::RateLimits {
                target: LimitTarget::Device,
                limits,
            } => {
                self.limiter.replace(&limits);
                log::info!("rate limits: {limits:?}");
                Ok(())
            }
            other => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("a drive has one rate limiter: {other:?}"),
            )),
        }
    }

    /// GET_VRING_BASE returns once the queue's requests in flight are
    /// complete, as the vhost-user specification asks (a snapshot relies
    /// on it): a worker holds its engine until nothing is in flight, and
    /// takes no more from a queue marked not ready (each pass checks).
    fn stop_vring(&self, queue: u32) -> io::Result<()> {
        let thread = queue as usize % self.common.threads();
        if let Some(engine) = self.engines.get(thread) {
            drop(engine.lock().unwrap_or_else(|p| p.into_inner()));
        }
        Ok(())
    }

    fn serve(&self, event: WorkerEvent<'_>) -> io::Result<()> {
        let WorkerEvent {
            device_event,
            evset,
            vrings,
            thread,
        } = event;
        if self.is_broken() {
            return Ok(());
        }
        let result = if evset != EventSet::IN {
            Err(WorkerError::EventSet(evset))
        } else if u64::from(device_event) == self.limiter_event() {
            // The debt is paid: take what the guest posted meanwhile.
            self.stats().inc(BlockCounter::RateLimiterEventCount);
            self.limiter.on_timer();
            self.process_queues(vrings, thread)
        } else if usize::from(device_event) >= vrings.len() {
            Err(WorkerError::NoQueue(usize::from(device_event)))
        } else {
            self.stats().inc(BlockCounter::QueueEventCount);
            self.process_queues(vrings, thread)
        };
        // The library ends the worker on an error, and nothing else would
        // notice: the device breaks, which the VMM does see.
        result.map_err(|err| {
            self.break_device(&err);
            io::Error::other(err)
        })
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
    use super::*;
    use std::io::Write;
    use std::sync::mpsc;
    use vhost_user_backend::{VhostUserBackend, VringT};
    use vhost_user_common::device::Served;
    use vhost_user_common::testing::ready_vring;
    use virtio_bindings::virtio_blk::VIRTIO_BLK_T_IN;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::split::Descriptor;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    const QUEUE_SIZE: u16 = 16;
    const HEADER: u64 = 0x8000;
    const DATA: u64 = 0x9000;
    const STATUS: u64 = 0xa000;

    #[test]
    fn queues_are_dealt_round_robin_to_the_workers() {
        assert_eq!(queue_masks(4, 4), [0b0001, 0b0010, 0b0100, 0b1000]);
        assert_eq!(queue_masks(4, 1), [0b1111]);
        assert_eq!(queue_masks(5, 2), [0b10101, 0b01010]);
        assert_eq!(queue_masks(2, 8), [0b01, 0b10]);
        assert_eq!(queue_masks(1, 0), [0b1]);
    }

    /// A one-queue device with event_idx on a 64-sector disk, its vring set
    /// up on rings laid out by virtio-queue's mock in guest memory.
    struct TestDevice {
        backend: Arc<BlockBackend>,
        vrings: Arc<Vec<BackendVring>>,
        mem: BackendMemory,
        _disk: tempfile::NamedTempFile,
    }

    fn device() -> TestDevice {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(&[0x5a; 64 * 512]).unwrap();
        let disk = Disk::open(file.path(), false, false).unwrap();
        let mem = BackendMemory::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let atomic = GuestMemoryAtomic::new(mem.clone());
        let config = BackendConfig {
            queues: 1,
            threads: 1,
            queue_size: usize::from(QUEUE_SIZE),
            poll: Duration::ZERO,
            serial: Vec::new(),
            io_uring: true,
            seccomp: tessera_seccomp::Filters::disabled(),
            stats: backend_stats::Stats::private(),
        };
        let backend = Arc::new(BlockBackend::new(disk, config, atomic.clone()).unwrap());
        Served(backend.clone()).set_event_idx(true);
        let mock = MockSplitQueue::new(&mem, QUEUE_SIZE);
        let vring = ready_vring(&atomic, &mock, QUEUE_SIZE);
        TestDevice {
            backend,
            vrings: Arc::new(vec![vring]),
            mem,
            _disk: file,
        }
    }

    impl TestDevice {
        fn avail_ring(&self) -> u64 {
            self.vrings[0].get_ref().get_queue().avail_ring()
        }

        /// Posts a one-sector read of sector 0 as the chain at descriptor
        /// `head`, in avail entry `position`.
        fn post_read(&self, position: u16, head: u16) {
            let mut header = [0u8; 16];
            header[..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
            self.mem.write_slice(&header, GuestAddress(HEADER)).unwrap();
            let table = self.vrings[0].get_ref().get_queue().desc_table();
            let descriptors = [
                (HEADER, 16, VRING_DESC_F_NEXT),
                (DATA, 512, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE),
                (STATUS, 1, VRING_DESC_F_WRITE),
            ];
            for (i, (addr, len, flags)) in descriptors.into_iter().enumerate() {
                let index = head + i as u16;
                let desc =
                    virtio_queue::desc::split::Descriptor::new(addr, len, flags as u16, index + 1);
                self.mem
                    .write_obj(
                        RawDescriptor::from(desc),
                        GuestAddress(table + u64::from(index) * 16),
                    )
                    .unwrap();
            }
            self.put_avail_entry(position, head);
        }

        fn put_avail_entry(&self, position: u16, head: u16) {
            let entry = self.avail_ring() + 4 + u64::from(position % QUEUE_SIZE) * 2;
            self.mem
                .write_obj(head.to_le(), GuestAddress(entry))
                .unwrap();
        }

        fn set_avail_idx(&self, idx: u16) {
            self.mem
                .write_obj(idx.to_le(), GuestAddress(self.avail_ring() + 2))
                .unwrap();
        }

        /// Runs the worker for one kick of queue 0, as vhost-user-backend
        /// does; `None` if it has not returned within five seconds.
        fn kick(&self) -> Option<io::Result<()>> {
            let (sender, receiver) = mpsc::channel();
            let backend = self.backend.clone();
            let vrings = self.vrings.clone();
            std::thread::spawn(move || {
                let _ = sender.send(Served(backend).handle_event(0, EventSet::IN, &vrings, 0));
            });
            receiver.recv_timeout(Duration::from_secs(5)).ok()
        }
    }

    #[test]
    fn the_cache_mode_follows_flush_and_the_guests_writeback_field() {
        let device = device();
        let backend = &device.backend;
        let writeback = || backend.config_space()[WRITEBACK_OFFSET as usize];
        let features = Served(backend.clone()).features();
        // Without FLUSH the device is write-through, and says so.
        backend.acked_features(features & !(1 << VIRTIO_BLK_F_FLUSH));
        assert_eq!(writeback(), 0);
        assert!(backend.disk.write_through());
        // With FLUSH it starts write-back; CONFIG_WCE lets the guest switch.
        backend.acked_features(features);
        assert_eq!(writeback(), 1);
        backend.set_config(WRITEBACK_OFFSET, &[0]).unwrap();
        assert_eq!(writeback(), 0);
        assert!(backend.disk.write_through());
        let mut header = [0u8; 16];
        header[..4].copy_from_slice(&virtio_bindings::virtio_blk::VIRTIO_BLK_T_OUT.to_le_bytes());
        device
            .mem
            .write_slice(&header, GuestAddress(HEADER))
            .unwrap();
        let write = [
            Descriptor::new(HEADER, 16, 0, 0),
            Descriptor::new(DATA, 512, 0, 0),
            Descriptor::new(STATUS, 1, VRING_DESC_F_WRITE as u16, 0),
        ];
        let durable = || match request::plan(&write, &device.mem, &backend.disk, b"") {
            Plan::Io { io, .. } => io.durable,
            _ => panic!("a valid write was not planned"),
        };
        assert!(
            durable(),
            "a write-through write must be durable when it completes"
        );
        backend.set_config(WRITEBACK_OFFSET, &[1]).unwrap();
        assert_eq!(writeback(), 1);
        assert!(!durable());
        // Nothing else is writable, nor writeback without CONFIG_WCE: such
        // writes are ignored.
        let before = backend.config_space();
        backend.set_config(0, &[0; 8]).unwrap();
        assert_eq!(backend.config_space(), before);
        backend.acked_features(features & !(1 << VIRTIO_BLK_F_CONFIG_WCE));
        backend.set_config(WRITEBACK_OFFSET, &[0]).unwrap();
        assert_eq!(writeback(), 1);
    }

    #[test]
    fn dirty_logging_switched_on_keeps_the_cache_mode_the_guest_chose() {
        let device = device();
        let backend = &device.backend;
        let features =
            Served(backend.clone()).features() & !VhostUserVirtioFeatures::LOG_ALL.bits();
        backend.acked_features(features);
        backend.set_config(WRITEBACK_OFFSET, &[0]).unwrap();
        assert!(backend.disk.write_through());
        backend.acked_features(features | VhostUserVirtioFeatures::LOG_ALL.bits());
        assert!(backend.disk.write_through(), "the guest's choice was lost");
        // A driver that negotiates again starts from the default.
        backend.acked_features(features);
        backend.acked_features(features);
        assert!(!backend.disk.write_through());
    }

    #[test]
    fn requests_an_earlier_backend_left_in_flight_are_resubmitted_first() {
        let device = device();
        let asked = VhostUserInflight {
            mmap_size: 0,
            mmap_offset: 0,
            num_queues: 1,
            queue_size: QUEUE_SIZE,
        };
        let (region, file) = device.backend.get_inflight_fd(&asked).unwrap();
        // The earlier backend took the reads at heads 3 and 0 (positions
        // 0 and 1) and died; the guest then posted head 6 (position 2).
        let earlier = InflightRegion::open(&region, file.try_clone().unwrap(), 1, 64).unwrap();
        earlier.start_queue(0);
        earlier.taken(0, 3);
        earlier.taken(0, 0);
        drop(earlier);
        device.post_read(0, 3);
        device.post_read(1, 0);
        device.post_read(2, 6);
        device.set_avail_idx(3);
        // The frontend restarts the ring from the guest's used index.
        device.vrings[0].set_queue_next_avail(0);
        device.backend.set_inflight_fd(&region, file).unwrap();

        let result = device.kick().expect("the worker returns");
        assert!(result.is_ok(), "{result:?}");
        let state = device.vrings[0].get_ref();
        let queue = state.get_queue();
        let used = queue.used_idx(&device.mem, Ordering::Acquire).unwrap().0;
        assert_eq!(used, 3, "each request completes exactly once");
        let used_ring = queue.used_ring();
        let heads: Vec<u32> = (0..3u64)
            .map(|i| {
                device
                    .mem
                    .read_obj(GuestAddress(used_ring + 4 + i * 8))
                    .unwrap()
            })
            .collect();
        assert_eq!(heads, [3, 0, 6], "left-over requests first, in order");
        assert_eq!(queue.next_avail(), 3);
        let status: u8 = device.mem.read_obj(GuestAddress(STATUS)).unwrap();
        assert_eq!(status, 0);
        let mut data = [0u8; 512];
        device
            .mem
            .read_slice(&mut data, GuestAddress(DATA))
            .unwrap();
        assert_eq!(data, [0x5a; 512]);
    }

    /// The used ring's index.
    fn used_idx(device: &TestDevice) -> u16 {
        let used_ring = device.vrings[0].get_ref().get_queue().used_ring();
        device
            .mem
            .read_obj::<u16>(GuestAddress(used_ring + 2))
            .unwrap()
    }

    #[test]
    fn requests_past_the_drives_limit_wait_in_the_ring_for_its_timer() {
        let device = device();
        let limits = |json: &str| ControlMessage::RateLimits {
            target: LimitTarget::Device,
            limits: serde_json::from_str(json).unwrap(),
        };
        // Two ops, refilled over 100 s: the third request goes through
        // on credit, the fourth waits.
        Served(device.backend.clone())
            .set_config(
                tessera_backend_control::CONTROL_OFFSET,
                &limits(r#"{"ops": {"size": 2, "refill_time": 100000}}"#).encode(),
            )
            .unwrap();
        for i in 0..4 {
            device.post_read(i, 3 * i);
        }
        device.set_avail_idx(4);
        device.kick().unwrap().unwrap();
        assert_eq!(used_idx(&device), 3);
        let stats = device.backend.stats();
        assert_eq!(stats.get(BlockCounter::RateLimiterThrottledEvents), 1);
        // A kick does not get it through; lifting the limit does, at the
        // limiter's timer.
        device.kick().unwrap().unwrap();
        assert_eq!(used_idx(&device), 3);
        device
            .backend
            .control(limits(r#"{"ops": {"size": 0, "refill_time": 0}}"#))
            .unwrap();
        std::thread::sleep(Duration::from_millis(20));
        let timer = WorkerEvent {
            device_event: device.backend.limiter_event() as u16,
            evset: EventSet::IN,
            vrings: &device.vrings,
            thread: 0,
        };
        vhost_user_common::device::Device::serve(&*device.backend, timer).unwrap();
        assert_eq!(used_idx(&device), 4);
        // Another kind of limit is refused with the reason.
        let err = device
            .backend
            .control(ControlMessage::RateLimits {
                target: LimitTarget::Rx,
                limits: tessera_rate_limiter::RateLimiterConfig::default(),
            })
            .unwrap_err();
        assert!(err.to_string().contains("one rate limiter"), "{err}");
    }

    #[test]
    fn the_counters_say_what_the_guest_asked_for() {
        let device = device();
        device.post_read(0, 0);
        device.post_read(1, 3);
        device.set_avail_idx(2);
        device.kick().unwrap().unwrap();
        let stats = device.backend.stats();
        assert_eq!(stats.get(BlockCounter::QueueEventCount), 1);
        assert_eq!(stats.get(BlockCounter::ReadCount), 2);
        assert_eq!(stats.get(BlockCounter::ReadBytes), 1024);
        assert_eq!(stats.get(BlockCounter::InvalidReqsCount), 0);

        device.post_read(2, 6);
        let unsupported = 99u32.to_le_bytes();
        device
            .mem
            .write_slice(&unsupported, GuestAddress(HEADER))
            .unwrap();
        device.set_avail_idx(3);
        device.kick().unwrap().unwrap();
        assert_eq!(stats.get(BlockCounter::ReadCount), 2);
        assert_eq!(stats.get(BlockCounter::InvalidReqsCount), 1);
        assert_eq!(stats.get(BlockCounter::WriteCount), 0);
        assert_eq!(stats.get(BlockCounter::ExecuteFails), 0);
    }

    #[test]
    fn an_avail_index_too_far_ahead_breaks_the_device_instead_of_spinning() {
        let device = device();
        device.set_avail_idx(QUEUE_SIZE + 1);
        let result = device.kick().expect("the worker spins on a broken ring");
        assert!(result.is_err(), "the worker must report the broken queue");
        assert!(device.backend.is_broken());
        assert_eq!(device.backend.stats().get(BlockCounter::EventFails), 1);
        assert_eq!(device.vrings[0].get_ref().get_queue().next_avail(), 0);
        // Nothing more is served, and each kick returns at once.
        device.post_read(0, 0);
        device.set_avail_idx(1);
        assert!(device
            .kick()
            .expect("a kick of a broken device returns")
            .is_ok());
        assert_eq!(device.vrings[0].get_ref().get_queue().next_avail(), 0);
    }

    #[test]
    fn a_used_ring_over_the_avail_index_cannot_hold_a_worker_forever() {
        let device = device();
        let (desc, avail) = {
            let state = device.vrings[0].get_ref();
            (
                state.get_queue().desc_table(),
                state.get_queue().avail_ring(),
            )
        };
        // The used ring laid over the avail ring: each completion bumps
        // avail.idx, so the guest seems to post a request per completion.
        device.vrings[0].set_queue_info(desc, avail, avail).unwrap();
        // One ahead: each completion then makes the next request visible.
        device.vrings[0].set_queue_next_used(1);
        // Descriptor 0 is a chain no request fits: it completes at once
        // with length 0, so the used entries keep naming head 0.
        let desc0 = virtio_queue::desc::split::Descriptor::new(HEADER, 0, 0, 0);
        device
            .mem
            .write_obj(RawDescriptor::from(desc0), GuestAddress(desc))
            .unwrap();
        device.set_avail_idx(1);
        let result = device
            .kick()
            .expect("the worker must get back to its event loop");
        assert!(result.is_ok(), "{result:?}");
        assert!(!device.backend.is_broken());
        assert_eq!(
            device.vrings[0].get_ref().get_queue().next_avail(),
            MAX_TAKEN_PER_EVENT as u16
        );
    }

    #[test]
    fn a_head_past_the_queue_breaks_the_device_after_draining_its_io() {
        let device = device();
        assert!(
            device.backend.engines[0].lock().unwrap().is_uring(),
            "this test needs io_uring"
        );
        // A read goes in flight on io_uring, then the guest names a
        // descriptor the queue does not have.
        device.post_read(0, 0);
        device.put_avail_entry(1, QUEUE_SIZE);
        device.set_avail_idx(2);
        let result = device.kick().expect("the worker returns");
        assert!(result.is_err(), "the worker must report the broken queue");
        assert!(device.backend.is_broken(), "the VMM must get to see it");
        assert_eq!(
            device.backend.engines[0].lock().unwrap().in_flight(),
            0,
            "I/O left in flight into memory the worker let go"
        );
    }
}
