//! Inflight I/O tracking (`VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`): a region
//! shared with the frontend in which a worker marks each request when it
//! takes it from a queue and clears the mark once the request is in the
//! used ring. The frontend keeps the region when the backend goes away and
//! hands it to the next one (`SET_INFLIGHT_FD`), which can then tell which
//! requests were left unfinished. The layout is the one QEMU and
//! libvhost-user use for split virtqueues, so a region moves between
//! backends of either kind.
//!
//! The frontend chooses the sizes and may hand over any file, so every
//! value is checked and every access is bounds-checked: a bad region is
//! refused, never a reason to crash.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};

use nix::fcntl::{fcntl, FcntlArg, SealFlag};
use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
use nix::sys::stat::fstat;
use vhost::vhost_user::message::VhostUserInflight;
use vm_memory::mmap::{MmapRegion, MmapRegionError};
use vm_memory::{Bytes, FileOffset, VolatileMemory};

/// One descriptor's state: `inflight: u8`, 5 bytes of padding, `next: u16`,
/// `counter: u64`.
const DESC_STATE_LEN: usize = 16;
const DESC_INFLIGHT: usize = 0;
const DESC_COUNTER: usize = 8;
/// A queue's header: `features: u64`, `version: u16`, `desc_num: u16`,
/// `last_batch_head: u16`, `used_idx: u16`; the descriptor states follow.
const QUEUE_HEADER_LEN: usize = 16;
const QUEUE_VERSION: usize = 8;
const QUEUE_DESC_NUM: usize = 10;
const QUEUE_LAST_BATCH_HEAD: usize = 12;
const QUEUE_USED_IDX: usize = 14;
/// Each queue's part starts on this boundary.
const QUEUE_ALIGN: usize = 64;
/// The version a backend writes into a fresh (all-zero) queue region.
const VERSION: u16 = 1;

/// Why a region was refused.
#[derive(Debug, thiserror::Error)]
pub enum InflightError {
    #[error("inflight region for {asked} queues; the device has 1 to {max}")]
    Queues { asked: u16, max: usize },
    #[error("inflight region for queues of {asked} entries; a power of two up to {max} is needed")]
    QueueSize { asked: u16, max: usize },
    #[error(
        "inflight region of {size} bytes (within its file); {queues} queues of {queue_size} \
         entries need {needed}"
    )]
    TooSmall {
        size: u64,
        queues: u16,
        queue_size: u16,
        needed: usize,
    },
    #[error(
        "the inflight region's file is not sealed against shrinking (F_SEAL_SHRINK), so the \
         frontend could truncate it under the mapping; seals: {seals}"
    )]
    NotSealed { seals: String },
    #[error("cannot create the inflight region: {0}")]
    Create(#[source] io::Error),
    #[error("cannot map the inflight region ({len} bytes at offset {offset}): {source}")]
    Map {
        len: usize,
        offset: u64,
        source: MmapRegionError,
    },
}

impl From<InflightError> for io::Error {
    fn from(err: InflightError) -> Self {
        io::Error::new(io::ErrorKind::InvalidInput, err)
    }
}

/// Bytes one queue of `queue_size` entries takes in the region.
fn queue_region_len(queue_size: u16) -> usize {
    (QUEUE_HEADER_LEN + DESC_STATE_LEN * usize::from(queue_size)).next_multiple_of(QUEUE_ALIGN)
}

/// A mapped inflight region.
pub struct InflightRegion {
    mmap: MmapRegion,
    queues: u16,
    queue_size: u16,
    /// Per queue, the order in which requests were taken (`counter`).
    taken: Vec<AtomicU64>,
}

impl std::fmt::Debug for InflightRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InflightRegion")
            .field("queues", &self.queues)
            .field("queue_size", &self.queue_size)
            .finish()
    }
}

impl InflightRegion {
    /// `GET_INFLIGHT_FD`: a zeroed region in a new memfd for what the
    /// frontend asked, with its description for the reply. The frontend
    /// hands it back with `SET_INFLIGHT_FD`, which is when it is used.
    pub fn create(
        asked: &VhostUserInflight,
        max_queues: usize,
        max_queue_size: usize,
    ) -> Result<(VhostUserInflight, File), InflightError> {
        check_shape(asked, max_queues, max_queue_size)?;
        let len = usize::from(asked.num_queues) * queue_region_len(asked.queue_size);
        let flags = MemFdCreateFlag::MFD_CLOEXEC | MemFdCreateFlag::MFD_ALLOW_SEALING;
        let fd = memfd_create(c"vhost-user-blk-inflight", flags)
            .map_err(|errno| InflightError::Create(errno.into()))?;
        let file = File::from(fd);
        file.set_len(len as u64).map_err(InflightError::Create)?;
        // A frontend that shrank the file would make the next access to the
        // mapping a SIGBUS.
        let seals = SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL;
        fcntl(file.as_raw_fd(), FcntlArg::F_ADD_SEALS(seals))
            .map_err(|errno| InflightError::Create(errno.into()))?;
        let reply = VhostUserInflight {
            mmap_size: len as u64,
            mmap_offset: 0,
            num_queues: asked.num_queues,
            queue_size: asked.queue_size,
        };
        Ok((reply, file))
    }

    /// `SET_INFLIGHT_FD`: maps the region the frontend handed over.
    pub fn open(
        given: &VhostUserInflight,
        file: File,
        max_queues: usize,
        max_queue_size: usize,
    ) -> Result<Self, InflightError> {
        check_shape(given, max_queues, max_queue_size)?;
        // Touching a mapping of a file truncated since is a SIGBUS: only a
        // file that cannot shrink (a sealed memfd, as GET_INFLIGHT_FD hands
        // out and QEMU hands back) is mapped.
        match fcntl(file.as_raw_fd(), FcntlArg::F_GET_SEALS) {
            Ok(seals) if SealFlag::from_bits_retain(seals).contains(SealFlag::F_SEAL_SHRINK) => {}
            Ok(seals) => {
                return Err(InflightError::NotSealed {
                    seals: format!("{:?}", SealFlag::from_bits_retain(seals)),
                })
            }
            Err(errno) => {
                return Err(InflightError::NotSealed {
                    seals: format!("none ({errno})"),
                })
            }
        }
        let needed = usize::from(given.num_queues) * queue_region_len(given.queue_size);
        // Touching a mapping past the end of its file is a SIGBUS.
        // fstat, not metadata(): std's statx is outside the seccomp filter.
        let file_len = fstat(file.as_raw_fd()).map_or(0, |stat| stat.st_size.max(0) as u64);
        let size = given
            .mmap_size
            .min(file_len.saturating_sub(given.mmap_offset));
        if size < needed as u64 {
            return Err(InflightError::TooSmall {
                size,
                queues: given.num_queues,
                queue_size: given.queue_size,
                needed,
            });
        }
        Self::map(
            file,
            given.mmap_offset,
            needed,
            given.num_queues,
            given.queue_size,
        )
    }

    fn map(
        file: File,
        offset: u64,
        len: usize,
        queues: u16,
        queue_size: u16,
    ) -> Result<Self, InflightError> {
        let mmap = MmapRegion::from_file(FileOffset::new(file, offset), len).map_err(|source| {
            InflightError::Map {
                len,
                offset,
                source,
            }
        })?;
        let region = Self {
            mmap,
            queues,
            queue_size,
            taken: (0..queues).map(|_| AtomicU64::new(0)).collect(),
        };
        for queue in 0..usize::from(queues) {
            region.store(queue, QUEUE_DESC_NUM, queue_size);
        }
        Ok(region)
    }

    /// When a queue starts: a fresh (all-zero) queue region gets its
    /// version. Returns how many requests an earlier backend left marked
    /// in flight there (0 for a fresh region).
    pub fn start_queue(&self, queue: usize) -> usize {
        if self.load::<u16>(queue, QUEUE_VERSION) == Some(0) {
            self.store(queue, QUEUE_VERSION, VERSION);
            return 0;
        }
        (0..self.queue_size)
            .filter(|head| self.load::<u8>(queue, desc_at(*head, DESC_INFLIGHT)) == Some(1))
            .count()
    }

    /// The requests an earlier backend left in flight on `queue`, oldest
    /// first, for a ring of `ring_size` entries whose used index in guest
    /// memory is `used_idx`. A request the earlier backend had put into the
    /// used ring but not yet unmarked (it stopped in between, so the
    /// region's used index lags the ring's) is done, and unmarked here;
    /// marks past the ring are stale and cleared. Requests taken from now
    /// on count after the ones returned.
    pub fn left_in_flight(&self, queue: usize, used_idx: u16, ring_size: u16) -> Vec<u16> {
        if self.load::<u16>(queue, QUEUE_USED_IDX) != Some(used_idx) {
            if let Some(head) = self.load::<u16>(queue, QUEUE_LAST_BATCH_HEAD) {
                if head < self.queue_size {
                    self.store(queue, desc_at(head, DESC_INFLIGHT), 0u8);
                }
            }
            self.store(queue, QUEUE_USED_IDX, used_idx);
        }
        let mut left: Vec<(u64, u16)> = Vec::new();
        for head in 0..self.queue_size {
            if self.load::<u8>(queue, desc_at(head, DESC_INFLIGHT)) != Some(1) {
                continue;
            }
            if head >= ring_size {
                self.store(queue, desc_at(head, DESC_INFLIGHT), 0u8);
                continue;
            }
            let counter = self
                .load::<u64>(queue, desc_at(head, DESC_COUNTER))
                .unwrap_or(0);
            left.push((counter, head));
        }
        left.sort_unstable();
        if let (Some(order), Some((last, _))) = (self.taken.get(queue), left.last()) {
            order.fetch_max(*last, Ordering::Relaxed);
        }
        left.into_iter().map(|(_, head)| head).collect()
    }

    /// A worker took request `head` from `queue`.
    pub fn taken(&self, queue: usize, head: u16) {
        let Some(order) = self.taken.get(queue) else {
            return;
        };
        if head >= self.queue_size {
            return;
        }
        let counter = order.fetch_add(1, Ordering::Relaxed) + 1;
        self.store(queue, desc_at(head, DESC_COUNTER), counter);
        self.store(queue, desc_at(head, DESC_INFLIGHT), 1u8);
    }

    /// Request `head` of `queue` is about to go into the used ring: if the
    /// backend stops between the two, the next one sees which.
    pub fn completing(&self, queue: usize, head: u16) {
        if head < self.queue_size {
            self.store(queue, QUEUE_LAST_BATCH_HEAD, head);
        }
    }

    /// Request `head` of `queue` is in the used ring, whose index is now
    /// `used_idx`.
    pub fn completed(&self, queue: usize, head: u16, used_idx: u16) {
        if head < self.queue_size {
            self.store(queue, desc_at(head, DESC_INFLIGHT), 0u8);
            self.store(queue, QUEUE_USED_IDX, used_idx);
        }
    }

    /// Whether request `head` of `queue` is marked in flight.
    #[cfg(test)]
    fn is_in_flight(&self, queue: usize, head: u16) -> bool {
        self.load::<u8>(queue, desc_at(head, DESC_INFLIGHT)) == Some(1)
    }

    /// The byte offset of `field` in `queue`'s part, or None past the end.
    fn offset(&self, queue: usize, field: usize) -> Option<usize> {
        (queue < usize::from(self.queues))
            .then(|| queue * queue_region_len(self.queue_size) + field)
    }

    fn store<T: vm_memory::AtomicAccess>(&self, queue: usize, field: usize, value: T) {
        if let Some(at) = self.offset(queue, field) {
            // Release: whoever reads the mark also sees what came before it.
            let _ = self
                .mmap
                .as_volatile_slice()
                .store(value, at, Ordering::Release);
        }
    }

    fn load<T: vm_memory::AtomicAccess>(&self, queue: usize, field: usize) -> Option<T> {
        let at = self.offset(queue, field)?;
        self.mmap
            .as_volatile_slice()
            .load(at, Ordering::Acquire)
            .ok()
    }
}

/// The offset of a descriptor state's field within its queue's part.
fn desc_at(head: u16, field: usize) -> usize {
    QUEUE_HEADER_LEN + usize::from(head) * DESC_STATE_LEN + field
}

fn check_shape(
    region: &VhostUserInflight,
    max_queues: usize,
    max_queue_size: usize,
) -> Result<(), InflightError> {
    if region.num_queues == 0 || usize::from(region.num_queues) > max_queues {
        return Err(InflightError::Queues {
            asked: region.num_queues,
            max: max_queues,
        });
    }
    if !region.queue_size.is_power_of_two() || usize::from(region.queue_size) > max_queue_size {
        return Err(InflightError::QueueSize {
            asked: region.queue_size,
            max: max_queue_size,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ask(num_queues: u16, queue_size: u16) -> VhostUserInflight {
        VhostUserInflight {
            mmap_size: 0,
            mmap_offset: 0,
            num_queues,
            queue_size,
        }
    }

    /// Reads a little-endian field of the region through its file, as the
    /// next backend (or QEMU) would see it.
    fn field(file: &File, at: usize, len: usize) -> u64 {
        use std::os::unix::fs::FileExt;
        let mut bytes = [0u8; 8];
        file.read_exact_at(&mut bytes[..len], at as u64).unwrap();
        u64::from_le_bytes(bytes)
    }

    fn create_and_open(queues: u16, queue_size: u16) -> (InflightRegion, File) {
        let (reply, file) = InflightRegion::create(&ask(queues, queue_size), 4, 1024).unwrap();
        let region = InflightRegion::open(&reply, file.try_clone().unwrap(), 4, 1024).unwrap();
        (region, file)
    }

    #[test]
    fn requests_are_marked_while_in_flight_in_qemus_layout() {
        let (reply, file) = InflightRegion::create(&ask(2, 256), 4, 1024).unwrap();
        // 16 + 256 * 16 bytes, rounded up to 64, per queue.
        assert_eq!(reply.mmap_size, 2 * 4160);
        assert_eq!((reply.num_queues, reply.queue_size), (2, 256));
        assert_eq!(file.metadata().unwrap().len(), 2 * 4160);
        assert!(file.set_len(100).is_err(), "the region's size is sealed");
        let region = InflightRegion::open(&reply, file.try_clone().unwrap(), 4, 1024).unwrap();
        assert_eq!(region.start_queue(1), 0, "a fresh region has nothing left");
        let queue1 = 4160;
        assert_eq!(field(&file, queue1 + QUEUE_VERSION, 2), 1);
        assert_eq!(field(&file, queue1 + QUEUE_DESC_NUM, 2), 256);

        region.taken(1, 7);
        region.taken(1, 3);
        let desc = |head: usize, at: usize| queue1 + QUEUE_HEADER_LEN + head * 16 + at;
        assert_eq!(field(&file, desc(7, DESC_INFLIGHT), 1), 1);
        assert_eq!(field(&file, desc(7, DESC_COUNTER), 8), 1);
        assert_eq!(field(&file, desc(3, DESC_COUNTER), 8), 2);
        region.completing(1, 7);
        assert_eq!(field(&file, queue1 + QUEUE_LAST_BATCH_HEAD, 2), 7);
        region.completed(1, 7, 1);
        assert!(!region.is_in_flight(1, 7));
        assert!(region.is_in_flight(1, 3));
        assert_eq!(field(&file, queue1 + QUEUE_USED_IDX, 2), 1);
        assert!(!region.is_in_flight(0, 3), "queue 0 is untouched");

        // The next backend maps the same file and finds request 3.
        let next = InflightRegion::open(&reply, file, 4, 1024).unwrap();
        assert_eq!(next.start_queue(1), 1);
        assert!(next.is_in_flight(1, 3));
    }

    #[test]
    fn the_next_backend_gets_what_was_left_oldest_first() {
        let (reply, file) = InflightRegion::create(&ask(1, 256), 4, 1024).unwrap();
        let old = InflightRegion::open(&reply, file.try_clone().unwrap(), 4, 1024).unwrap();
        old.start_queue(0);
        for head in [9, 4, 200, 6] {
            old.taken(0, head);
        }
        old.completing(0, 4);
        old.completed(0, 4, 1);
        // Request 6 reached the used ring (its index is now 2), but the
        // backend died before unmarking it.
        old.completing(0, 6);
        drop(old);

        let next = InflightRegion::open(&reply, file, 4, 1024).unwrap();
        assert_eq!(next.start_queue(0), 3);
        // The guest's ring has 128 entries: head 200 cannot be a request.
        assert_eq!(next.left_in_flight(0, 2, 128), vec![9]);
        assert!(!next.is_in_flight(0, 6), "done, so unmarked");
        assert!(!next.is_in_flight(0, 200), "stale, so unmarked");
        next.taken(0, 11);
        assert_eq!(
            next.left_in_flight(0, 2, 128),
            vec![9, 11],
            "new requests count after the resubmitted ones"
        );
    }

    #[test]
    fn out_of_range_heads_and_queues_are_ignored() {
        let (region, file) = create_and_open(1, 4);
        let contents = || {
            use std::os::unix::fs::FileExt;
            let mut bytes = vec![0u8; file.metadata().unwrap().len() as usize];
            file.read_exact_at(&mut bytes, 0).unwrap();
            bytes
        };
        let before = contents();
        region.taken(0, 4);
        region.taken(1, 0);
        region.completing(0, 9);
        region.completed(0, 9, 3);
        region.completed(5, 0, 3);
        assert_eq!(before, contents());
    }

    /// A memfd of `len` bytes with `seals`.
    fn memfd(len: u64, seals: SealFlag) -> File {
        let flags = MemFdCreateFlag::MFD_CLOEXEC | MemFdCreateFlag::MFD_ALLOW_SEALING;
        let file = File::from(memfd_create(c"test-inflight", flags).unwrap());
        file.set_len(len).unwrap();
        fcntl(file.as_raw_fd(), FcntlArg::F_ADD_SEALS(seals)).unwrap();
        file
    }

    #[test]
    fn a_region_the_frontend_could_shrink_is_refused() {
        let given = VhostUserInflight {
            mmap_size: 4160,
            ..ask(1, 256)
        };
        // Truncated after SET_INFLIGHT_FD, any of these would make the
        // worker's next mark a SIGBUS.
        let plain = tempfile::tempfile().unwrap();
        plain.set_len(4160).unwrap();
        for file in [
            plain,
            memfd(4160, SealFlag::empty()),
            memfd(4160, SealFlag::F_SEAL_GROW),
        ] {
            let err = InflightRegion::open(&given, file, 4, 1024).err();
            assert!(
                matches!(err, Some(InflightError::NotSealed { .. })),
                "{err:?}"
            );
        }
        assert!(
            InflightRegion::open(&given, memfd(4160, SealFlag::F_SEAL_SHRINK), 4, 1024).is_ok()
        );
    }

    #[test]
    fn bad_shapes_and_short_files_are_refused() {
        fn err<T>(result: Result<T, InflightError>) -> String {
            result.err().expect("refused").to_string()
        }
        let create = |queues, queue_size| InflightRegion::create(&ask(queues, queue_size), 4, 1024);
        assert!(err(create(0, 256)).contains("for 0 queues"));
        assert!(err(create(5, 256)).contains("for 5 queues"));
        assert!(err(create(1, 100)).contains("of 100 entries"));
        assert!(err(create(1, 2048)).contains("of 2048 entries"));

        let file = memfd(4096, SealFlag::F_SEAL_SHRINK);
        let small = VhostUserInflight {
            mmap_size: 4096,
            ..ask(1, 256)
        };
        assert!(err(InflightRegion::open(
            &small,
            file.try_clone().unwrap(),
            4,
            1024
        ))
        .contains("need 4160"));
        // Claims a size the file does not have.
        let past_end = VhostUserInflight {
            mmap_size: 8192,
            ..ask(1, 256)
        };
        assert!(err(InflightRegion::open(&past_end, file, 4, 1024)).contains("of 4096 bytes"));
    }
}
