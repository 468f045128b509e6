//! The vhost-user device: features, config space and queue processing.
//! One worker thread per queue (vhost-user-backend runs them); each fills
//! as many requests as the guest posted per kick, completes them in one
//! batch, and then polls the avail ring for a short window before going
//! back to waiting on the kick eventfd.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::VhostUserProtocolFeatures;
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

use std::sync::Mutex;

use crate::disk::{Disk, SECTOR_SIZE};
use crate::engine::{Done, Engine, Op};
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
    /// One I/O engine per queue worker, indexed by queue.
    engines: Vec<Mutex<Engine>>,
}

impl BlockBackend {
    /// Creates the device; `mem` is the guest memory the daemon maps.
    pub fn new(
        disk: Disk,
        config: BackendConfig,
        mem: GuestMemoryAtomic<GuestMemoryMmap>,
    ) -> io::Result<Self> {
        let exits = (0..config.queues)
            .map(|_| new_event_consumer_and_notifier(EventFlag::NONBLOCK))
            .collect::<io::Result<Vec<_>>>()?;
        let engines = (0..config.queues)
            .map(|_| Mutex::new(Engine::new(MAX_IN_FLIGHT, config.io_uring)))
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

    /// Serves `vring` until it has nothing posted and nothing in flight:
    /// takes every request the guest posted, keeps their I/O in flight
    /// together, completes them as they finish, and signals the guest once
    /// per batch of completions.
    fn process_queue(&self, vring: &VringRwLock, queue_index: usize) -> io::Result<()> {
        let event_idx = self.event_idx.load(Ordering::Relaxed);
        let mem = self.mem.memory();
        let engine = self
            .engines
            .get(queue_index)
            .ok_or_else(|| io::Error::other(format!("no engine for queue {queue_index}")))?;
        let mut engine = engine.lock().unwrap_or_else(|p| p.into_inner());
        let mut done: Vec<Done> = Vec::new();
        loop {
            if event_idx {
                vring.disable_notification().map_err(io::Error::other)?;
            }
            let mut completed_any = false;
            loop {
                let mut completed = 0usize;
                while engine.has_room() {
                    let chain = vring
                        .get_mut()
                        .get_queue_mut()
                        .pop_descriptor_chain(mem.clone());
                    let Some(chain) = chain else { break };
                    let head = chain.head_index();
                    let descriptors: Vec<Descriptor> = chain.collect();
                    let finished =
                        match request::plan(&descriptors, &mem, &self.disk, &self.config.serial) {
                            Plan::Done(completion) => Some((head, completion)),
                            Plan::Io { io, status } => engine
                                .start(&self.disk, head, status, Op::Io(io))
                                .map(|(h, st, r)| (h, request::finish(&mem, st, r))),
                            Plan::Flush { status } => engine
                                .start(&self.disk, head, status, Op::Flush)
                                .map(|(h, st, r)| (h, request::finish(&mem, st, r))),
                        };
                    if let Some((head, completion)) = finished {
                        self.complete(vring, head, completion)?;
                        completed += 1;
                    }
                }
                engine.reap(&self.disk, completed == 0, &mut done)?;
                for (head, status, result) in done.drain(..) {
                    self.complete(vring, head, request::finish(&mem, status, result))?;
                    completed += 1;
                }
                if completed > 0 {
                    completed_any = true;
                    let notify =
                        !event_idx || vring.needs_notification().map_err(io::Error::other)?;
                    if notify {
                        vring.signal_used_queue()?;
                    }
                } else if engine.in_flight() == 0 {
                    break;
                }
            }
            if completed_any && self.poll_for_more(vring, &mem) {
                continue;
            }
            if !event_idx || !vring.enable_notification().map_err(io::Error::other)? {
                return Ok(());
            }
            // More requests arrived while notifications were off: go again.
        }
    }

    fn complete(
        &self,
        vring: &VringRwLock,
        head: u16,
        completion: request::Completion,
    ) -> io::Result<()> {
        if let Err(err) = &completion.result {
            log::debug!("request {head} failed: {err}");
        }
        vring
            .add_used(head, completion.used_len)
            .map_err(io::Error::other)
    }

    /// Spins for the polling window; true if the guest posted a request.
    fn poll_for_more(&self, vring: &VringRwLock, mem: &GuestMemoryMmap) -> bool {
        if self.config.poll.is_zero() {
            return false;
        }
        let deadline = Instant::now() + self.config.poll;
        while Instant::now() < deadline {
            let state = vring.get_ref();
            let queue = state.get_queue();
            if let Ok(avail) = queue.avail_idx(mem, Ordering::Acquire) {
                if avail.0 != queue.next_avail() {
                    return true;
                }
            }
            drop(state);
            std::hint::spin_loop();
        }
        false
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
        (0..self.config.queues).map(|q| 1u64 << q).collect()
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
        _thread_id: usize,
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
        let vring = vrings
            .get(usize::from(device_event))
            .ok_or_else(|| io::Error::other(format!("no queue {device_event}")))?;
        self.process_queue(vring, usize::from(device_event))
    }
}
