//! The I/O engine one queue worker uses for reads, writes and flushes:
//! io_uring where the kernel has it, so that a batch of requests is in
//! flight together, and blocking calls otherwise.

use std::io;

use io_uring::{opcode, squeue, types, IoUring};

use crate::disk::Disk;
use crate::request::{run_sync, DataIo, RequestError};

/// One operation of a batch.
pub enum Op {
    Io(DataIo),
    Flush,
}

/// An io_uring instance, or none when the kernel lacks it.
pub struct Engine {
    ring: Option<IoUring>,
}

impl Engine {
    /// Sets up io_uring with room for `entries` operations, or falls back.
    pub fn new(entries: u32, use_uring: bool) -> Self {
        let ring = if use_uring {
            match IoUring::new(entries) {
                Ok(ring) => Some(ring),
                Err(err) => {
                    log::warn!("io_uring is unavailable ({err}); using synchronous I/O");
                    None
                }
            }
        } else {
            None
        };
        Self { ring }
    }

    /// Whether io_uring is in use.
    pub fn is_uring(&self) -> bool {
        self.ring.is_some()
    }

    /// Carries out `ops` and returns, for each, the bytes written into guest
    /// buffers or the error. Flushes wait for every operation before them.
    pub fn run(&mut self, disk: &Disk, ops: &[Op]) -> Vec<Result<u32, RequestError>> {
        match &mut self.ring {
            Some(ring) => match run_uring(ring, disk, ops) {
                Ok(results) => results,
                Err(err) => {
                    log::error!("io_uring failed ({err}); retrying the batch synchronously");
                    ops.iter().map(|op| run_one_sync(disk, op)).collect()
                }
            },
            None => ops.iter().map(|op| run_one_sync(disk, op)).collect(),
        }
    }
}

fn run_one_sync(disk: &Disk, op: &Op) -> Result<u32, RequestError> {
    match op {
        Op::Io(io) => run_sync(io, disk).map(|()| if io.write { 0 } else { io.len }),
        Op::Flush => disk.flush().map(|()| 0).map_err(Into::into),
    }
}

fn entry(fd: types::Fd, op: &Op, index: usize) -> squeue::Entry {
    match op {
        Op::Io(io) if io.write => {
            opcode::Writev::new(fd, io.iovecs.as_ptr(), io.iovecs.len() as u32)
                .offset(io.offset)
                .build()
        }
        Op::Io(io) => opcode::Readv::new(fd, io.iovecs.as_ptr(), io.iovecs.len() as u32)
            .offset(io.offset)
            .build(),
        // Drained: it starts only when everything before it has completed.
        Op::Flush => opcode::Fsync::new(fd)
            .flags(types::FsyncFlags::DATASYNC)
            .build()
            .flags(squeue::Flags::IO_DRAIN),
    }
    .user_data(index as u64)
}

fn run_uring(
    ring: &mut IoUring,
    disk: &Disk,
    ops: &[Op],
) -> io::Result<Vec<Result<u32, RequestError>>> {
    let fd = types::Fd(disk.raw_fd());
    let mut results: Vec<Option<Result<u32, RequestError>>> =
        (0..ops.len()).map(|_| None).collect();
    let mut next = 0;
    let mut done = 0;
    while done < ops.len() {
        while next < ops.len() {
            let sqe = entry(fd, &ops[next], next);
            // SAFETY: the iovecs and guest buffers an entry points to live
            // in `ops` until this function has reaped its completion.
            if unsafe { ring.submission().push(&sqe) }.is_err() {
                break; // full: submit what is queued first
            }
            next += 1;
        }
        ring.submit_and_wait(1)?;
        for cqe in ring.completion() {
            let index = cqe.user_data() as usize;
            let Some(op) = ops.get(index) else { continue };
            let res = cqe.result();
            results[index] = Some(if res < 0 {
                Err(RequestError::Io(io::Error::from_raw_os_error(-res)))
            } else {
                match op {
                    Op::Io(io) if res as u32 != io.len => Err(RequestError::Io(io::Error::other(
                        format!("short transfer: {res} of {} bytes", io.len),
                    ))),
                    Op::Io(io) => Ok(if io.write { 0 } else { io.len }),
                    Op::Flush => Ok(0),
                }
            });
            done += 1;
        }
    }
    Ok(results
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err(RequestError::Io(io::Error::other("no completion")))))
        .collect())
}
