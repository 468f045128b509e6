//! The pages a Diff snapshot writes: those written since the last
//! snapshot (or the boot or load), when the microVM tracks dirty pages:
//! KVM's log for what the vCPUs wrote, the backends' shared log
//! ([`DirtyLog`]) for what they wrote. Without tracking, or with a backend
//! that cannot log, every page resident in guest memory (`mincore`), as
//! Firecracker does: more than needed, never less.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::path::Path;

use devices::vhost_user::DirtyLog;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use super::CreateSnapshotError;
use crate::vstate::vm::Vm;

const PAGE: u64 = 4096;
const PAGES_PER_WORD: u64 = 64;

/// Per guest memory region, in order: bit `p % 64` of word `p / 64` is
/// the region's page `p`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyPages(Vec<Vec<u64>>);

impl DirtyPages {
    /// Adds the pages of `other`, of the same memory.
    pub fn merge(&mut self, other: &DirtyPages) {
        for (mine, theirs) in self.0.iter_mut().zip(&other.0) {
            for (a, b) in mine.iter_mut().zip(theirs) {
                *a |= b;
            }
        }
    }

    /// Every page of `mem`.
    pub fn all(mem: &GuestMemoryMmap) -> Self {
        Self(
            mem.iter()
                .map(|region| {
                    let pages = region.len() / PAGE;
                    let mut words = vec![u64::MAX; pages.div_ceil(PAGES_PER_WORD) as usize];
                    if !pages.is_multiple_of(PAGES_PER_WORD) {
                        if let Some(last) = words.last_mut() {
                            *last = (1 << (pages % PAGES_PER_WORD)) - 1;
                        }
                    }
                    words
                })
                .collect(),
        )
    }

    /// How many pages are marked.
    pub fn count(&self) -> u64 {
        (self.0.iter().flatten())
            .map(|w| u64::from(w.count_ones()))
            .sum()
    }

    /// Whether page `page` of region `region` is marked.
    pub(crate) fn is_marked(&self, region: usize, page: u64) -> bool {
        (self.0.get(region))
            .and_then(|words| words.get((page / PAGES_PER_WORD) as usize))
            .is_some_and(|w| w & (1 << (page % PAGES_PER_WORD)) != 0)
    }

    /// The runs of consecutive marked pages of region `region`, as
    /// (first page, pages).
    pub(crate) fn runs(&self, region: usize, pages: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
        let mut page = 0;
        std::iter::from_fn(move || {
            while page < pages && !self.is_marked(region, page) {
                page += 1;
            }
            let first = page;
            while page < pages && self.is_marked(region, page) {
                page += 1;
            }
            (first < pages).then_some((first, page - first))
        })
    }
}

/// Reads and clears KVM's log of every memory slot (slot `i` is region
/// `i`) and the backends' `log`: the pages written since the last call.
pub fn take_tracked(
    vm: &Vm,
    mem: &GuestMemoryMmap,
    log: Option<&DirtyLog>,
) -> Result<DirtyPages, CreateSnapshotError> {
    let backends = log.map(DirtyLog::take);
    let mut regions = Vec::with_capacity(mem.num_regions());
    for (slot, region) in mem.iter().enumerate() {
        let mut words = vm
            .fd()
            .get_dirty_log(slot as u32, region.len() as usize)
            .map_err(|err| CreateSnapshotError::Memory {
                op: "get_dirty_log",
                reason: format!("memory slot {slot}: {err}"),
            })?;
        if let Some(backends) = &backends {
            let first = region.start_addr().0 / PAGE;
            for page in 0..region.len() / PAGE {
                let gpa_page = first + page;
                let word = backends
                    .get((gpa_page / PAGES_PER_WORD) as usize)
                    .copied()
                    .unwrap_or(0);
                if word & (1 << (gpa_page % PAGES_PER_WORD)) != 0 {
                    words[(page / PAGES_PER_WORD) as usize] |= 1 << (page % PAGES_PER_WORD);
                }
            }
        }
        regions.push(words);
    }
    Ok(DirtyPages(regions))
}

/// Every page resident in guest memory (`mincore`).
pub fn resident(mem: &GuestMemoryMmap) -> Result<DirtyPages, CreateSnapshotError> {
    let mut regions = Vec::with_capacity(mem.num_regions());
    for region in mem.iter() {
        let pages = (region.len() / PAGE) as usize;
        let mut vector = vec![0u8; pages];
        let host = mem.get_host_address(region.start_addr()).map_err(|err| {
            CreateSnapshotError::Memory {
                op: "mincore",
                reason: err.to_string(),
            }
        })?;
        // SAFETY: `host` is the start of the region's live mapping of
        // `region.len()` bytes (page-aligned), and `vector` holds one byte
        // per page of it, which is what mincore writes.
        let ret = unsafe { libc::mincore(host.cast(), region.len() as usize, vector.as_mut_ptr()) };
        if ret != 0 {
            return Err(CreateSnapshotError::Memory {
                op: "mincore",
                reason: std::io::Error::last_os_error().to_string(),
            });
        }
        let mut words = vec![0u64; pages.div_ceil(PAGES_PER_WORD as usize)];
        for (page, _) in vector.iter().enumerate().filter(|(_, v)| **v & 1 != 0) {
            words[page / PAGES_PER_WORD as usize] |= 1 << (page % PAGES_PER_WORD as usize);
        }
        regions.push(words);
    }
    Ok(DirtyPages(regions))
}

/// Writes the `dirty` pages of `mem` into the memory file at `path`, each
/// at its place (regions one after another). An existing file of the
/// right size is updated in place, so a Diff can be written straight onto
/// a copy of its base, as in Firecracker; any other is replaced by a
/// sparse file of the right size.
pub fn write_dirty_memory(
    mem: &GuestMemoryMmap,
    path: &Path,
    dirty: &DirtyPages,
) -> Result<(), CreateSnapshotError> {
    let err = |op: &'static str| {
        move |err: std::io::Error| CreateSnapshotError::Memory {
            op,
            reason: format!("{}: {err}", path.display()),
        }
    };
    let total: u64 = mem.iter().map(|r| r.len()).sum();
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(err("open"))?;
    // Its length by seeking: the VMM thread's filter refuses statx.
    if file.seek(SeekFrom::End(0)).map_err(err("seek"))? != total {
        file.set_len(0).map_err(err("truncate"))?;
    }
    file.set_len(total).map_err(err("set_len"))?;
    let mut offset = 0;
    for (index, region) in mem.iter().enumerate() {
        for (first, pages) in dirty.runs(index, region.len() / PAGE) {
            write_run(mem, &mut file, region.start_addr(), offset, first, pages)
                .map_err(err("write"))?;
        }
        offset += region.len();
    }
    file.sync_all().map_err(err("sync"))
}

fn write_run(
    mem: &GuestMemoryMmap,
    file: &mut File,
    region_start: GuestAddress,
    region_offset: u64,
    first: u64,
    pages: u64,
) -> std::io::Result<()> {
    file.seek(SeekFrom::Start(region_offset + first * PAGE))?;
    let addr = GuestAddress(region_start.0 + first * PAGE);
    mem.write_all_volatile_to(addr, file, (pages * PAGE) as usize)
        .map_err(std::io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pages(words: Vec<Vec<u64>>) -> DirtyPages {
        DirtyPages(words)
    }

    #[test]
    fn runs_are_the_stretches_of_marked_pages() {
        let dirty = pages(vec![vec![0b0111_0010, 1 << 63]]);
        let runs: Vec<_> = dirty.runs(0, 128).collect();
        assert_eq!(runs, [(1, 1), (4, 3), (127, 1)]);
        assert_eq!(dirty.count(), 5);
    }

    #[test]
    fn a_run_stops_at_the_region_end() {
        let dirty = pages(vec![vec![u64::MAX]]);
        assert_eq!(dirty.runs(0, 10).collect::<Vec<_>>(), [(0, 10)]);
        assert_eq!(dirty.runs(1, 10).count(), 0);
    }

    #[test]
    fn all_marks_every_page_and_no_more() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 0x41000),
            (GuestAddress(0x100_0000), 0x1000),
        ])
        .unwrap();
        let all = DirtyPages::all(&mem);
        assert_eq!(all.count(), 0x42);
        assert_eq!(all.runs(0, 0x41).collect::<Vec<_>>(), [(0, 0x41)]);
    }

    #[test]
    fn merge_adds_the_other_pages() {
        let mut a = pages(vec![vec![0b01], vec![0]]);
        a.merge(&pages(vec![vec![0b10], vec![0b100]]));
        assert_eq!(a, pages(vec![vec![0b11], vec![0b100]]));
    }

    #[test]
    fn only_the_dirty_pages_are_written_into_a_file_of_the_right_size() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        mem.write_slice(&[0xaa; 4096], GuestAddress(0x2000))
            .unwrap();
        mem.write_slice(&[0xbb; 4096], GuestAddress(0x5000))
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mem");
        std::fs::write(&path, vec![0x11u8; 0x10000]).unwrap();
        write_dirty_memory(&mem, &path, &pages(vec![vec![1 << 2]])).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len(), 0x10000);
        assert!(bytes[0x2000..0x3000].iter().all(|&b| b == 0xaa));
        assert!(bytes[..0x2000].iter().all(|&b| b == 0x11));
        assert!(bytes[0x5000..0x6000].iter().all(|&b| b == 0x11));
    }

    #[test]
    fn a_file_of_another_size_is_replaced_by_a_sparse_one() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x4000)]).unwrap();
        mem.write_slice(&[0xcc; 4096], GuestAddress(0x1000))
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mem");
        std::fs::write(&path, vec![0x11u8; 100]).unwrap();
        write_dirty_memory(&mem, &path, &pages(vec![vec![0b10]])).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len(), 0x4000);
        assert!(bytes[..0x1000].iter().all(|&b| b == 0));
        assert!(bytes[0x1000..0x2000].iter().all(|&b| b == 0xcc));
    }

    #[test]
    fn resident_finds_the_pages_written() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        mem.write_obj(1u8, GuestAddress(0x3000)).unwrap();
        let dirty = resident(&mem).unwrap();
        assert!(dirty.is_marked(0, 3));
        assert!(!dirty.is_marked(0, 0x80));
    }
}
