//! One virtio-blk request: parsed from a guest descriptor chain with every
//! guest-controlled value checked (chain shape, directions, lengths, sector
//! ranges), then carried out on the [`Disk`]. A bad request gets `IOERR` or
//! `UNSUPP` in its status byte; nothing the guest sends can panic the
//! backend.

use std::io;

use vhost_user_common::BackendMemory;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::bitmap::Bitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::disk::{Disk, SECTOR_SIZE};

/// Data descriptors one request may carry (the `seg_max` we advertise).
pub const SEG_MAX: u32 = 128;
/// The largest data descriptor, in bytes (the `size_max` we advertise):
/// a request moves at most `SEG_MAX * SIZE_MAX` bytes (128 MiB).
pub const SIZE_MAX: u32 = 1 << 20;
/// Discard and write-zeroes segments one request may carry.
pub const MAX_DISCARD_SEG: u32 = 32;
/// The largest discard or write-zeroes range, in sectors.
pub const MAX_DISCARD_SECTORS: u32 = u32::MAX / SECTOR_SIZE as u32;
const HEADER_LEN: u32 = 16;
const SEGMENT_LEN: u32 = 16;
/// The serial number returned by GET_ID holds 20 bytes.
pub const ID_LEN: usize = 20;
const WRITE_ZEROES_FLAG_UNMAP: u32 = 1;

/// Why a request failed; the status byte says `IOERR` or `UNSUPP`.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("the descriptor chain has {0} descriptors; a request needs a header and a status")]
    TooShort(usize),
    #[error("the descriptor chain is longer than {0} descriptors")]
    TooLong(usize),
    #[error("the request header is {len} bytes or device-writable")]
    BadHeader { len: u32 },
    #[error("the last descriptor is not a device-writable status byte")]
    BadStatus,
    #[error("guest memory at {addr:#x} (+{len}) is not mapped")]
    BadAddress { addr: u64, len: u64 },
    #[error("a data descriptor of {len} bytes is larger than size_max ({SIZE_MAX})")]
    SegmentTooLarge { len: u32 },
    #[error("the request moves {0} bytes, more than a used ring entry can report")]
    TooLarge(u64),
    #[error("a data descriptor of a type {0} request has the wrong direction")]
    WrongDirection(u32),
    #[error("the data length {0} is not a multiple of 512")]
    Unaligned(u64),
    #[error("sectors {sector}+{count} go past the capacity of {capacity}")]
    OutOfRange {
        sector: u64,
        count: u64,
        capacity: u64,
    },
    #[error("a write to a read-only disk")]
    ReadOnly,
    #[error("a discard or write-zeroes segment list of {0} bytes is malformed")]
    BadSegments(u64),
    #[error("unsupported flags {0:#x} in a discard or write-zeroes segment")]
    BadSegmentFlags(u32),
    #[error("request type {0} is not supported")]
    Unsupported(u32),
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
}

impl RequestError {
    /// The virtio-blk status byte for this error.
    pub fn status(&self) -> u8 {
        match self {
            Self::Unsupported(_) => VIRTIO_BLK_S_UNSUPP as u8,
            _ => VIRTIO_BLK_S_IOERR as u8,
        }
    }
}

/// What a request asked the disk to do, for the backend's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Work {
    /// A read or write of this many bytes.
    Read(u32),
    Write(u32),
    Flush,
    /// A discard or write-zeroes.
    Discard,
    /// GET_ID, or a request that never got as far as the disk.
    Other,
}

/// The outcome of one chain: what to put in the used ring.
#[derive(Debug)]
pub struct Completion {
    /// Bytes written into guest memory (data and status).
    pub used_len: u32,
    pub work: Work,
    pub result: Result<(), RequestError>,
}

/// A parsed request.
struct Request {
    kind: u32,
    sector: u64,
    data: Vec<Descriptor>,
    status: Descriptor,
}

/// A read or write for an I/O engine to carry out: host addresses of the
/// guest buffers, checked to lie in guest memory, and the byte offset,
/// checked to lie inside the disk.
pub struct DataIo {
    pub write: bool,
    pub offset: u64,
    pub iovecs: Vec<libc::iovec>,
    /// Bytes in all the buffers (at most `SEG_MAX * SIZE_MAX`).
    pub len: u32,
    /// A write that must be durable before it completes (write-through).
    pub durable: bool,
}

impl DataIo {
    /// The work this I/O does.
    pub fn work(&self) -> Work {
        if self.write {
            Work::Write(self.len)
        } else {
            Work::Read(self.len)
        }
    }
}

// SAFETY: the iovecs point into guest memory, which the backend maps for as
// long as the request lives; moving them between threads is harmless.
unsafe impl Send for DataIo {}

/// What a chain asks for, once checked.
pub enum Plan {
    /// Nothing left to do asynchronously: the request is complete.
    Done(Completion),
    /// A read or write to submit; complete it with [`finish`].
    Io { io: DataIo, status: Descriptor },
    /// A flush to submit after the writes before it; complete it with [`finish`].
    Flush { status: Descriptor },
}

/// Writes the status byte of a request and says what goes in the used ring.
/// `result` is the number of bytes the device wrote into the guest's data
/// buffers, or why it failed.
pub fn finish(
    mem: &BackendMemory,
    status: Descriptor,
    work: Work,
    result: Result<u32, RequestError>,
) -> Completion {
    let (written, result) = match result {
        Ok(written) => (written, Ok(())),
        Err(err) => (0, Err(err)),
    };
    let byte = match &result {
        Ok(()) => VIRTIO_BLK_S_OK as u8,
        Err(err) => err.status(),
    };
    let used_len = match mem.write_obj(byte, status.addr()) {
        Ok(()) => written.saturating_add(1),
        Err(_) => written,
    };
    Completion {
        used_len,
        work,
        result,
    }
}

/// Checks the chain in `descriptors` and works out what it needs; requests
/// other than reads, writes and flushes are carried out here.
pub fn plan(descriptors: &[Descriptor], mem: &BackendMemory, disk: &Disk, serial: &[u8]) -> Plan {
    let request = match parse(descriptors, mem) {
        Ok(request) => request,
        Err(err) => {
            // Report the error if the chain at least ends in a status byte.
            let used_len = match descriptors.last() {
                Some(last) if last.is_write_only() && last.len() > 0 && descriptors.len() >= 2 => {
                    match mem.write_obj(err.status(), last.addr()) {
                        Ok(()) => 1,
                        Err(_) => 0,
                    }
                }
                _ => 0,
            };
            return Plan::Done(Completion {
                used_len,
                work: Work::Other,
                result: Err(err),
            });
        }
    };
    let status = request.status;
    match request.kind {
        VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => match data_io(&request, mem, disk) {
            Ok(io) => Plan::Io { io, status },
            Err(err) => Plan::Done(finish(mem, status, Work::Other, Err(err))),
        },
        VIRTIO_BLK_T_FLUSH => Plan::Flush { status },
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            let result = execute(&request, mem, disk, serial);
            Plan::Done(finish(mem, status, Work::Discard, result))
        }
        _ => Plan::Done(finish(
            mem,
            status,
            Work::Other,
            execute(&request, mem, disk, serial),
        )),
    }
}

/// Parses and carries out the request in `descriptors` (one whole chain)
/// with synchronous I/O: the engine's logic in one call, for tests.
#[cfg(test)]
pub fn process(
    descriptors: &[Descriptor],
    mem: &BackendMemory,
    disk: &Disk,
    serial: &[u8],
) -> Completion {
    match plan(descriptors, mem, disk, serial) {
        Plan::Done(completion) => completion,
        Plan::Io { io, status } => {
            let result = run_sync(&io, disk).map(|()| if io.write { 0 } else { io.len });
            finish(mem, status, io.work(), result)
        }
        Plan::Flush { status } => finish(
            mem,
            status,
            Work::Flush,
            disk.flush().map(|()| 0).map_err(Into::into),
        ),
    }
}

/// Carries out a planned read or write with blocking calls.
pub fn run_sync(io: &DataIo, disk: &Disk) -> Result<(), RequestError> {
    let mut offset = io.offset;
    for iov in &io.iovecs {
        // SAFETY: each iovec was built by `data_io` from a checked slice of
        // guest memory, which stays mapped while the request is served.
        unsafe {
            if io.write {
                disk.write_from(iov.iov_base.cast(), iov.iov_len, offset)?;
            } else {
                disk.read_to(iov.iov_base.cast(), iov.iov_len, offset)?;
            }
        }
        offset += iov.iov_len as u64;
    }
    if io.durable {
        disk.flush()?;
    }
    Ok(())
}

/// Checks a read or write and resolves its buffers to host addresses.
fn data_io(request: &Request, mem: &BackendMemory, disk: &Disk) -> Result<DataIo, RequestError> {
    let write = request.kind == VIRTIO_BLK_T_OUT;
    check_direction(request, !write)?;
    if write && disk.read_only() {
        return Err(RequestError::ReadOnly);
    }
    let total = data_len(&request.data);
    let len = u32::try_from(total).map_err(|_| RequestError::TooLarge(total))?;
    let offset = check_range(disk, request.sector, total)?;
    let iovecs = request
        .data
        .iter()
        .map(|desc| {
            host_ptr(mem, desc.addr(), desc.len(), !write).map(|ptr| libc::iovec {
                iov_base: ptr.cast(),
                iov_len: desc.len() as usize,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(DataIo {
        write,
        offset,
        iovecs,
        len,
        durable: write && disk.write_through(),
    })
}

/// The most descriptors a request may have: a header, `SEG_MAX` data
/// segments and a status.
pub const MAX_DESCRIPTORS: usize = SEG_MAX as usize + 2;

fn parse(descriptors: &[Descriptor], mem: &BackendMemory) -> Result<Request, RequestError> {
    if descriptors.len() > MAX_DESCRIPTORS {
        return Err(RequestError::TooLong(MAX_DESCRIPTORS));
    }
    let (header, rest) = match descriptors {
        [header, rest @ .., _] => (header, rest),
        _ => return Err(RequestError::TooShort(descriptors.len())),
    };
    let status = *descriptors.last().ok_or(RequestError::TooShort(0))?;
    if !status.is_write_only() || status.len() == 0 {
        return Err(RequestError::BadStatus);
    }
    if header.is_write_only() || header.len() < HEADER_LEN {
        return Err(RequestError::BadHeader { len: header.len() });
    }
    if let Some(data) = rest.iter().find(|d| d.len() > SIZE_MAX) {
        return Err(RequestError::SegmentTooLarge { len: data.len() });
    }
    let mut raw = [0u8; HEADER_LEN as usize];
    mem.read_slice(&mut raw, header.addr())
        .map_err(|_| RequestError::BadAddress {
            addr: header.addr().0,
            len: u64::from(HEADER_LEN),
        })?;
    let kind = u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]);
    let sector = u64::from_le_bytes([
        raw[8], raw[9], raw[10], raw[11], raw[12], raw[13], raw[14], raw[15],
    ]);
    Ok(Request {
        kind,
        sector,
        data: rest.to_vec(),
        status,
    })
}

fn data_len(data: &[Descriptor]) -> u64 {
    data.iter().map(|d| u64::from(d.len())).sum()
}

/// Checks that `[sector, sector + bytes / 512)` lies inside the disk.
fn check_range(disk: &Disk, sector: u64, bytes: u64) -> Result<u64, RequestError> {
    if !bytes.is_multiple_of(SECTOR_SIZE) {
        return Err(RequestError::Unaligned(bytes));
    }
    let count = bytes / SECTOR_SIZE;
    let capacity = disk.sectors();
    match sector.checked_add(count) {
        Some(end) if end <= capacity => Ok(sector * SECTOR_SIZE),
        _ => Err(RequestError::OutOfRange {
            sector,
            count,
            capacity,
        }),
    }
}

fn check_direction(request: &Request, write_only: bool) -> Result<(), RequestError> {
    if request.data.iter().any(|d| d.is_write_only() != write_only) {
        return Err(RequestError::WrongDirection(request.kind));
    }
    Ok(())
}

/// A host pointer to `len` bytes of guest memory at `addr`; when the
/// disk will write through it (`filled`), its pages are logged dirty now,
/// as vm-memory cannot see that write.
fn host_ptr(
    mem: &BackendMemory,
    addr: GuestAddress,
    len: u32,
    filled: bool,
) -> Result<*mut u8, RequestError> {
    let bad = || RequestError::BadAddress {
        addr: addr.0,
        len: u64::from(len),
    };
    let slice = mem.get_slice(addr, len as usize).map_err(|_| bad())?;
    if filled {
        slice.bitmap().mark_dirty(0, slice.len());
    }
    Ok(slice.ptr_guard_mut().as_ptr())
}

/// Carries out the requests that are not reads, writes or flushes;
/// returns the bytes written to the guest.
fn execute(
    request: &Request,
    mem: &BackendMemory,
    disk: &Disk,
    serial: &[u8],
) -> Result<u32, RequestError> {
    match request.kind {
        VIRTIO_BLK_T_GET_ID => {
            check_direction(request, true)?;
            let mut id = [0u8; ID_LEN];
            let n = serial.len().min(ID_LEN);
            id[..n].copy_from_slice(&serial[..n]);
            let desc = request.data.first().ok_or(RequestError::TooShort(2))?;
            let len = (desc.len() as usize).min(ID_LEN);
            mem.write_slice(&id[..len], desc.addr())
                .map_err(|_| RequestError::BadAddress {
                    addr: desc.addr().0,
                    len: len as u64,
                })?;
            Ok(len as u32)
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            check_direction(request, false)?;
            if disk.read_only() {
                return Err(RequestError::ReadOnly);
            }
            for (sector, count, flags) in segments(request, mem)? {
                let unmap = flags & WRITE_ZEROES_FLAG_UNMAP != 0;
                let allowed = if request.kind == VIRTIO_BLK_T_DISCARD {
                    0
                } else {
                    WRITE_ZEROES_FLAG_UNMAP
                };
                if flags & !allowed != 0 {
                    return Err(RequestError::BadSegmentFlags(flags));
                }
                let bytes = u64::from(count) * SECTOR_SIZE;
                let offset = check_range(disk, sector, bytes)?;
                if request.kind == VIRTIO_BLK_T_DISCARD {
                    disk.discard(offset, bytes)?;
                } else {
                    disk.write_zeroes(offset, bytes, unmap)?;
                }
            }
            Ok(0)
        }
        other => Err(RequestError::Unsupported(other)),
    }
}

/// Reads the `(sector, num_sectors, flags)` segments of a discard or
/// write-zeroes request.
fn segments(request: &Request, mem: &BackendMemory) -> Result<Vec<(u64, u32, u32)>, RequestError> {
    let total = data_len(&request.data);
    if total == 0
        || !total.is_multiple_of(u64::from(SEGMENT_LEN))
        || total / u64::from(SEGMENT_LEN) > u64::from(MAX_DISCARD_SEG)
    {
        return Err(RequestError::BadSegments(total));
    }
    let mut out = Vec::new();
    for desc in &request.data {
        if !desc.len().is_multiple_of(SEGMENT_LEN) {
            return Err(RequestError::BadSegments(u64::from(desc.len())));
        }
        for i in 0..desc.len() / SEGMENT_LEN {
            let addr = desc.addr().0.checked_add(u64::from(i * SEGMENT_LEN));
            let mut raw = [0u8; SEGMENT_LEN as usize];
            addr.map(GuestAddress)
                .and_then(|a| mem.read_slice(&mut raw, a).ok())
                .ok_or(RequestError::BadAddress {
                    addr: desc.addr().0,
                    len: u64::from(desc.len()),
                })?;
            let sector = u64::from_le_bytes(raw[0..8].try_into().unwrap_or_default());
            let count = u32::from_le_bytes(raw[8..12].try_into().unwrap_or_default());
            let flags = u32::from_le_bytes(raw[12..16].try_into().unwrap_or_default());
            out.push((sector, count, flags));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;

    const MEM_SIZE: usize = 0x10_0000;
    const HEADER: u64 = 0x1000;
    const DATA: u64 = 0x2000;
    const STATUS: u64 = 0x9000;

    struct Fixture {
        mem: BackendMemory,
        disk: Disk,
        _file: tempfile::NamedTempFile,
    }

    fn fixture(read_only: bool) -> Fixture {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        let content: Vec<u8> = (0..64 * 512).map(|i| (i / 512) as u8).collect();
        file.write_all(&content).unwrap();
        let disk = Disk::open(file.path(), read_only, false).unwrap();
        let mem = BackendMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        Fixture {
            mem,
            disk,
            _file: file,
        }
    }

    fn desc(addr: u64, len: u32, write: bool) -> RawDescriptor {
        let flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
        RawDescriptor::from(Descriptor::new(addr, len, flags, 0))
    }

    /// Builds a chain through virtio-queue's mock queue and runs it.
    fn run(f: &Fixture, kind: u32, sector: u64, descs: &[RawDescriptor]) -> (Completion, u8) {
        let mut header = [0u8; 16];
        header[0..4].copy_from_slice(&kind.to_le_bytes());
        header[8..16].copy_from_slice(&sector.to_le_bytes());
        f.mem.write_slice(&header, GuestAddress(HEADER)).unwrap();
        f.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let queue = MockSplitQueue::create(&f.mem, GuestAddress(0x10000), 256);
        let chain = queue.build_desc_chain(descs).unwrap();
        let descriptors: Vec<Descriptor> = chain.collect();
        let completion = process(&descriptors, &f.mem, &f.disk, b"tessera-disk");
        let status: u8 = f.mem.read_obj(GuestAddress(STATUS)).unwrap();
        (completion, status)
    }

    fn ok_chain(data: RawDescriptor) -> [RawDescriptor; 3] {
        [desc(HEADER, 16, false), data, desc(STATUS, 1, true)]
    }

    #[test]
    fn reads_and_writes_sectors() {
        let f = fixture(false);
        let (c, status) = run(&f, VIRTIO_BLK_T_IN, 3, &ok_chain(desc(DATA, 1024, true)));
        assert_eq!(status, VIRTIO_BLK_S_OK as u8, "{:?}", c.result);
        assert_eq!(c.used_len, 1025);
        let mut buf = [0u8; 1024];
        f.mem.read_slice(&mut buf, GuestAddress(DATA)).unwrap();
        assert!(buf[..512].iter().all(|b| *b == 3) && buf[512..].iter().all(|b| *b == 4));

        f.mem.write_slice(&[0xab; 512], GuestAddress(DATA)).unwrap();
        let (_, status) = run(&f, VIRTIO_BLK_T_OUT, 10, &ok_chain(desc(DATA, 512, false)));
        assert_eq!(status, VIRTIO_BLK_S_OK as u8);
        let mut back = [0u8; 512];
        // SAFETY: `back` is a live 512-byte buffer.
        unsafe { f.disk.read_to(back.as_mut_ptr(), 512, 10 * 512).unwrap() };
        assert_eq!(back, [0xab; 512]);
    }

    #[test]
    fn flush_get_id_and_unknown_types() {
        let f = fixture(false);
        let chain = [desc(HEADER, 16, false), desc(STATUS, 1, true)];
        assert_eq!(
            run(&f, VIRTIO_BLK_T_FLUSH, 0, &chain).1,
            VIRTIO_BLK_S_OK as u8
        );
        let (c, status) = run(&f, VIRTIO_BLK_T_GET_ID, 0, &ok_chain(desc(DATA, 20, true)));
        assert_eq!((status, c.used_len), (VIRTIO_BLK_S_OK as u8, 21));
        let mut id = [0u8; 12];
        f.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
        assert_eq!(&id, b"tessera-disk");
        assert_eq!(run(&f, 0x77, 0, &chain).1, VIRTIO_BLK_S_UNSUPP as u8);
    }

    #[test]
    fn out_of_range_and_overflowing_sectors_are_ioerr() {
        let f = fixture(false);
        for sector in [63, 64, u64::MAX, u64::MAX / 512] {
            let (c, status) = run(
                &f,
                VIRTIO_BLK_T_IN,
                sector,
                &ok_chain(desc(DATA, 1024, true)),
            );
            assert_eq!(status, VIRTIO_BLK_S_IOERR as u8, "sector {sector}");
            assert!(matches!(c.result, Err(RequestError::OutOfRange { .. })));
        }
    }

    #[test]
    fn unaligned_lengths_and_wrong_directions_are_ioerr() {
        let f = fixture(false);
        let (c, status) = run(&f, VIRTIO_BLK_T_IN, 0, &ok_chain(desc(DATA, 100, true)));
        assert_eq!(status, VIRTIO_BLK_S_IOERR as u8);
        assert!(matches!(c.result, Err(RequestError::Unaligned(100))));
        // A read whose data buffer the device may not write.
        let (c, status) = run(&f, VIRTIO_BLK_T_IN, 0, &ok_chain(desc(DATA, 512, false)));
        assert_eq!(status, VIRTIO_BLK_S_IOERR as u8);
        assert!(matches!(c.result, Err(RequestError::WrongDirection(_))));
        // A write whose data is device-writable.
        let (_, status) = run(&f, VIRTIO_BLK_T_OUT, 0, &ok_chain(desc(DATA, 512, true)));
        assert_eq!(status, VIRTIO_BLK_S_IOERR as u8);
    }

    #[test]
    fn malformed_chains_never_panic() {
        let f = fixture(false);
        // Too short: only a status byte.
        let (c, _) = run(&f, VIRTIO_BLK_T_IN, 0, &[desc(STATUS, 1, true)]);
        assert!(matches!(c.result, Err(RequestError::TooShort(1))));
        assert_eq!(c.used_len, 0);
        // A header the device could write, and one too short.
        let (c, status) = run(
            &f,
            VIRTIO_BLK_T_IN,
            0,
            &[desc(HEADER, 16, true), desc(STATUS, 1, true)],
        );
        assert!(matches!(c.result, Err(RequestError::BadHeader { .. })));
        assert_eq!(status, VIRTIO_BLK_S_IOERR as u8);
        let (c, _) = run(
            &f,
            VIRTIO_BLK_T_IN,
            0,
            &[desc(HEADER, 8, false), desc(STATUS, 1, true)],
        );
        assert!(matches!(c.result, Err(RequestError::BadHeader { len: 8 })));
        // A status descriptor the device may not write: nothing to report.
        let (c, status) = run(
            &f,
            VIRTIO_BLK_T_IN,
            0,
            &[desc(HEADER, 16, false), desc(STATUS, 1, false)],
        );
        assert!(matches!(c.result, Err(RequestError::BadStatus)));
        assert_eq!((c.used_len, status), (0, 0xff));
        // Data outside guest memory.
        let (c, status) = run(
            &f,
            VIRTIO_BLK_T_IN,
            0,
            &ok_chain(desc(MEM_SIZE as u64 - 256, 512, true)),
        );
        assert!(matches!(c.result, Err(RequestError::BadAddress { .. })));
        assert_eq!(status, VIRTIO_BLK_S_IOERR as u8);
        // Too many descriptors.
        let mut long = vec![desc(HEADER, 16, false)];
        long.extend((0..SEG_MAX + 1).map(|i| desc(DATA + u64::from(i) * 512, 512, true)));
        long.push(desc(STATUS, 1, true));
        let (c, _) = run(&f, VIRTIO_BLK_T_IN, 0, &long);
        assert!(matches!(c.result, Err(RequestError::TooLong(_))));
    }

    #[test]
    fn descriptors_over_size_max_are_refused_even_when_the_total_wraps_32_bits() {
        // A disk and guest memory large enough that only size_max stands
        // in the way; both stay sparse, nothing is read.
        let file = tempfile::NamedTempFile::new().unwrap();
        file.as_file().set_len(8 << 30).unwrap();
        let disk = Disk::open(file.path(), false, false).unwrap();
        let mem = BackendMemory::from_ranges(&[(GuestAddress(0), 3 << 30)]).unwrap();
        let mut header = [0u8; 16];
        header[0..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
        mem.write_slice(&header, GuestAddress(HEADER)).unwrap();
        // Two overlapping buffers of 2 GiB + 256 bytes: 4 GiB + 512 in all,
        // 512 once truncated to 32 bits.
        let big = (1u32 << 31) + 256;
        let chain = [
            Descriptor::new(HEADER, 16, 0, 0),
            Descriptor::new(0, big, VRING_DESC_F_WRITE as u16, 0),
            Descriptor::new(0, big, VRING_DESC_F_WRITE as u16, 0),
            Descriptor::new(STATUS, 1, VRING_DESC_F_WRITE as u16, 0),
        ];
        let Plan::Done(completion) = plan(&chain, &mem, &disk, b"") else {
            panic!("a request with descriptors over size_max was planned");
        };
        assert!(matches!(
            completion.result,
            Err(RequestError::SegmentTooLarge { len }) if len == big
        ));
        let status: u8 = mem.read_obj(GuestAddress(STATUS)).unwrap();
        assert_eq!(status, VIRTIO_BLK_S_IOERR as u8);
        // One byte over size_max is refused too; size_max itself is fine.
        let one = |len| {
            let chain = [
                Descriptor::new(HEADER, 16, 0, 0),
                Descriptor::new(DATA, len, VRING_DESC_F_WRITE as u16, 0),
                Descriptor::new(STATUS, 1, VRING_DESC_F_WRITE as u16, 0),
            ];
            plan(&chain, &mem, &disk, b"")
        };
        assert!(matches!(one(SIZE_MAX), Plan::Io { io, .. } if io.len == SIZE_MAX));
        assert!(matches!(one(SIZE_MAX + 512), Plan::Done(_)));
    }

    #[test]
    fn read_only_disks_refuse_writes_discards_and_zeroes() {
        let f = fixture(true);
        for kind in [
            VIRTIO_BLK_T_OUT,
            VIRTIO_BLK_T_DISCARD,
            VIRTIO_BLK_T_WRITE_ZEROES,
        ] {
            let (c, status) = run(&f, kind, 0, &ok_chain(desc(DATA, 512, false)));
            assert_eq!(status, VIRTIO_BLK_S_IOERR as u8);
            assert!(matches!(c.result, Err(RequestError::ReadOnly)), "{kind}");
        }
        assert_eq!(
            run(&f, VIRTIO_BLK_T_IN, 0, &ok_chain(desc(DATA, 512, true))).1,
            0
        );
    }

    #[test]
    fn discard_and_write_zeroes_segments_are_checked() {
        let f = fixture(false);
        let segment = |sector: u64, count: u32, flags: u32| {
            let mut raw = [0u8; 16];
            raw[0..8].copy_from_slice(&sector.to_le_bytes());
            raw[8..12].copy_from_slice(&count.to_le_bytes());
            raw[12..16].copy_from_slice(&flags.to_le_bytes());
            f.mem.write_slice(&raw, GuestAddress(DATA)).unwrap();
        };
        segment(8, 4, 0);
        let (c, status) = run(
            &f,
            VIRTIO_BLK_T_WRITE_ZEROES,
            0,
            &ok_chain(desc(DATA, 16, false)),
        );
        assert_eq!(status, VIRTIO_BLK_S_OK as u8, "{:?}", c.result);
        let mut back = [0xffu8; 512];
        // SAFETY: `back` is a live 512-byte buffer.
        unsafe { f.disk.read_to(back.as_mut_ptr(), 512, 9 * 512).unwrap() };
        assert_eq!(back, [0u8; 512]);

        segment(62, 4, 0);
        let (c, _) = run(
            &f,
            VIRTIO_BLK_T_DISCARD,
            0,
            &ok_chain(desc(DATA, 16, false)),
        );
        assert!(matches!(c.result, Err(RequestError::OutOfRange { .. })));
        segment(0, 1, 1);
        let (c, _) = run(
            &f,
            VIRTIO_BLK_T_DISCARD,
            0,
            &ok_chain(desc(DATA, 16, false)),
        );
        assert!(matches!(c.result, Err(RequestError::BadSegmentFlags(1))));
        let (c, _) = run(
            &f,
            VIRTIO_BLK_T_DISCARD,
            0,
            &ok_chain(desc(DATA, 12, false)),
        );
        assert!(matches!(c.result, Err(RequestError::BadSegments(12))));
    }
}
