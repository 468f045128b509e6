//! Our `vhost-user-blk` backend driven by libblkio (the `blkio` crate, the
//! library QEMU uses) as an independent frontend: no guest, no VMM. Every
//! result is checked byte for byte against the backing file.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use tessera_tests::blkio_client::{run_queue_depth, BlkioDisk, BlkioQueues, Completions};
use tessera_tests::{workspace_bin, Running};

const MIB: u64 = 1 << 20;

struct Backend {
    _dir: tempfile::TempDir,
    image: PathBuf,
    socket: PathBuf,
    process: Option<Running>,
}

impl Backend {
    fn start(size: u64, fill: u8, extra: &[&str]) -> Self {
        Self::start_in(tempfile::tempdir().unwrap(), size, fill, extra)
    }

    /// With the image on tmpfs, where the backend copies through a
    /// mapping of it.
    fn start_on_tmpfs(size: u64, fill: u8, extra: &[&str]) -> Self {
        let backend = Self::start_in(tempfile::tempdir_in("/dev/shm").unwrap(), size, fill, extra);
        let pid = backend.process.as_ref().unwrap().pid();
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
        assert!(
            maps.contains(backend.image.to_str().unwrap()),
            "the backend has not mapped its tmpfs image:\n{maps}"
        );
        backend
    }

    fn start_in(dir: tempfile::TempDir, size: u64, fill: u8, extra: &[&str]) -> Self {
        let image = dir.path().join("disk.img");
        std::fs::write(&image, vec![fill; size as usize]).unwrap();
        let socket = dir.path().join("blk.sock");
        let mut command = Command::new(workspace_bin("vhost-user-blk"));
        command
            .arg("--socket")
            .arg(&socket)
            .arg("--path")
            .arg(&image)
            .args(extra);
        let process = Running::spawn(command);
        assert!(
            tessera_tests::wait_for_listener(&socket, Duration::from_secs(10)),
            "{} never appeared",
            socket.display()
        );
        Self {
            _dir: dir,
            image,
            socket,
            process: Some(process),
        }
    }

    fn file(&self) -> Vec<u8> {
        std::fs::read(&self.image).unwrap()
    }

    fn finish(mut self) -> tessera_tests::RunOutput {
        let mut process = self.process.take().unwrap();
        process.wait_until(Duration::from_secs(10), |_, _| false);
        process.finish()
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn read_write_flush_discard_and_write_zeroes_match_the_file() {
    read_write_flush_discard_and_write_zeroes(Backend::start(16 * MIB, 0x11, &[]));
}

#[test]
fn on_tmpfs_through_the_mapping_too() {
    read_write_flush_discard_and_write_zeroes(Backend::start_on_tmpfs(16 * MIB, 0x11, &[]));
}

fn read_write_flush_discard_and_write_zeroes(backend: Backend) {
    {
        let mut disk = BlkioDisk::connect(&backend.socket, MIB as usize).unwrap();
        assert_eq!(disk.capacity(), 16 * MIB);

        let data = pattern(256 * 1024, 7);
        disk.buffer()[..data.len()].copy_from_slice(&data);
        assert_eq!(disk.write(MIB, data.len()), 0);
        assert_eq!(disk.flush(), 0);
        let file = backend.file();
        assert_eq!(&file[MIB as usize..MIB as usize + data.len()], &data[..]);
        assert!(file[..MIB as usize].iter().all(|b| *b == 0x11));

        disk.buffer().fill(0);
        assert_eq!(disk.read(MIB, data.len()), 0);
        assert_eq!(&disk.buffer()[..data.len()], &data[..]);

        let before = std::fs::metadata(&backend.image).unwrap().blocks();
        assert_eq!(disk.discard(4 * MIB, 4 * MIB), 0);
        let after = std::fs::metadata(&backend.image).unwrap().blocks();
        assert!(
            before - after >= 8192,
            "discard freed {} blocks",
            before - after
        );
        assert_eq!(disk.write_zeroes(12 * MIB, MIB), 0);
        let file = backend.file();
        assert!(file[4 * MIB as usize..8 * MIB as usize]
            .iter()
            .all(|b| *b == 0));
        assert!(file[12 * MIB as usize..13 * MIB as usize]
            .iter()
            .all(|b| *b == 0));
        assert!(file[13 * MIB as usize..].iter().all(|b| *b == 0x11));

        // Out of range: past the end, and straddling it.
        assert_ne!(disk.read(16 * MIB, 4096), 0);
        assert_ne!(disk.read(16 * MIB - 512, 4096), 0);
        // The backend keeps serving after errors.
        assert_eq!(disk.read(0, 4096), 0);
        assert!(disk.buffer()[..4096].iter().all(|b| *b == 0x11));
    }
    let run = backend.finish();
    assert_eq!(run.code(), 0, "{}", run.describe());
    assert!(
        run.stderr.contains("the frontend disconnected"),
        "{}",
        run.describe()
    );
}

/// The resident size of the mapping of `image` in process `pid`.
fn resident_in(pid: u32, image: &std::path::Path) -> u64 {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let name = image.to_str().unwrap();
    let mut lines = smaps.lines().skip_while(|line| !line.ends_with(name));
    let rss = lines
        .find_map(|line| line.strip_prefix("Rss:"))
        .unwrap_or("0 kB");
    rss.trim()
        .trim_end_matches("kB")
        .trim()
        .parse::<u64>()
        .unwrap()
        << 10
}

#[test]
fn an_idle_backend_maps_its_whole_tmpfs_image_ahead_of_the_guest() {
    // Seccomp on: the prefault thread's calls are in the main filter.
    let backend = Backend::start_on_tmpfs(16 * MIB, 0x55, &[]);
    let pid = backend.process.as_ref().unwrap().pid();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while resident_in(pid, &backend.image) < 16 * MIB {
        assert!(
            std::time::Instant::now() < deadline,
            "after 30 s {} of 16 MiB of the image are mapped",
            resident_in(pid, &backend.image)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    {
        let mut disk = BlkioDisk::connect(&backend.socket, MIB as usize).unwrap();
        disk.buffer()[..4096].fill(0x66);
        assert_eq!(disk.write(15 * MIB, 4096), 0);
        assert_eq!(disk.read(0, 4096), 0);
        assert!(disk.buffer()[..4096].iter().all(|b| *b == 0x55));
    }
    let file = backend.file();
    assert_eq!(
        &file[15 * MIB as usize..15 * MIB as usize + 4096],
        &[0x66; 4096]
    );
    assert!(file[..15 * MIB as usize].iter().all(|b| *b == 0x55));
    let run = backend.finish();
    assert_eq!(run.code(), 0, "{}", run.describe());
}

#[test]
fn an_image_on_tmpfs_cut_short_under_the_backend_fails_those_reads_and_no_other() {
    let backend = Backend::start_on_tmpfs(16 * MIB, 0x33, &[]);
    {
        let mut disk = BlkioDisk::connect(&backend.socket, MIB as usize).unwrap();
        assert_eq!(disk.read(8 * MIB, 4096), 0);
        assert!(disk.buffer()[..4096].iter().all(|b| *b == 0x33));
        // Someone else truncates the image: the mapped pages past the new
        // end are gone (SIGBUS in the backend's worker, seccomp on).
        std::fs::OpenOptions::new()
            .write(true)
            .open(&backend.image)
            .unwrap()
            .set_len(4 * MIB)
            .unwrap();
        assert_ne!(
            disk.read(8 * MIB, 4096),
            0,
            "a read past the new end succeeded"
        );
        assert_eq!(disk.read(0, 4096), 0);
        assert!(disk.buffer()[..4096].iter().all(|b| *b == 0x33));
        disk.buffer()[..4096].fill(0x44);
        assert_eq!(disk.write(MIB, 4096), 0);
        assert_eq!(
            &backend.file()[MIB as usize..MIB as usize + 4096],
            &[0x44; 4096]
        );
    }
    let run = backend.finish();
    assert_eq!(run.code(), 0, "{}", run.describe());
    assert!(
        run.stderr
            .contains("a page of the image was lost under its mapping"),
        "no SIGBUS was taken in the mapping: {}",
        run.describe()
    );
}

#[test]
fn a_read_only_backend_refuses_writes() {
    // libblkio sees VIRTIO_BLK_F_RO and refuses a writable connection; the
    // backend serves one frontend, so the second attempt gets a new one.
    let first = Backend::start(4 * MIB, 0x22, &["--readonly"]);
    let err = BlkioDisk::connect(&first.socket, MIB as usize)
        .err()
        .unwrap();
    assert!(err.contains("read-only"), "{err}");
    drop(first.finish());

    let backend = Backend::start(4 * MIB, 0x22, &["--readonly"]);
    {
        let mut disk = BlkioDisk::connect_with(&backend.socket, MIB as usize, true).unwrap();
        disk.buffer()[..4096].fill(0xee);
        assert_ne!(
            disk.write(0, 4096),
            0,
            "a write to a read-only disk succeeded"
        );
        assert_ne!(disk.discard(0, MIB), 0);
        assert_eq!(disk.read(0, 4096), 0);
        assert!(disk.buffer()[..4096].iter().all(|b| *b == 0x22));
    }
    assert!(
        backend.file().iter().all(|b| *b == 0x22),
        "the read-only file changed"
    );
    drop(backend.finish());
}

/// Request i of 4096 writes its slot (i % 32) to a block of its own at
/// queue depth 32, then reads them all back into cleared slots; the file
/// and the slots are checked.
fn deep_queue_of_random_io(
    start: fn(u64, u8, &[&str]) -> Backend,
    backend_args: &[&str],
    completions: Completions,
) {
    const BLOCKS: u64 = 16384;
    const WRITES: usize = 4096;
    const DEPTH: usize = 32;
    let block = |i: usize| (i as u64 * 7919) % BLOCKS; // distinct for i < BLOCKS
    let backend = start(BLOCKS * 4096, 0, backend_args);
    {
        let mut client =
            BlkioQueues::connect_with(&backend.socket, 1, DEPTH * 4096, completions).unwrap();
        let base = client.region.addr;
        // SAFETY: the region is a live mapping of `len` bytes, and no
        // request is in flight while the slice is used.
        let slots = |fill: fn(usize) -> u8| unsafe {
            let buffer = std::slice::from_raw_parts_mut(base as *mut u8, client.region.len);
            for (slot, bytes) in buffer.chunks_mut(4096).enumerate() {
                bytes.fill(fill(slot));
            }
        };
        slots(|slot| slot as u8 + 1);
        let queue = &mut client.queues[0];
        // Request i writes its slot (i % 32) to a block of its own.
        let failed = run_queue_depth(queue, base, DEPTH, 4096, WRITES, |i| {
            (true, block(i) * 4096)
        });
        assert_eq!(failed, 0, "{completions:?}");
        slots(|_| 0);
        // The last 32 reads fetch what slot i % 32 wrote.
        let failed = run_queue_depth(queue, base, DEPTH, 4096, WRITES, |i| {
            (false, block(i) * 4096)
        });
        assert_eq!(failed, 0, "{completions:?}");
        // SAFETY: as above; the queue is idle.
        let buffer = unsafe { std::slice::from_raw_parts(base as *const u8, DEPTH * 4096) };
        for (slot, bytes) in buffer.chunks(4096).enumerate() {
            assert!(
                bytes.iter().all(|b| *b == slot as u8 + 1),
                "{completions:?}: slot {slot} read back wrong bytes"
            );
        }
    }
    let file = backend.file();
    let mut written = vec![false; BLOCKS as usize];
    for i in 0..WRITES {
        let at = (block(i) * 4096) as usize;
        written[block(i) as usize] = true;
        let want = (i % DEPTH) as u8 + 1;
        assert!(
            file[at..at + 4096].iter().all(|b| *b == want),
            "{backend_args:?} {completions:?}: block {}",
            block(i)
        );
    }
    for (b, was_written) in written.iter().enumerate() {
        if !was_written {
            assert!(
                file[b * 4096..(b + 1) * 4096].iter().all(|x| *x == 0),
                "block {b}"
            );
        }
    }
    drop(backend.finish());
}

#[test]
fn deep_queues_of_random_io_complete_and_land_on_disk() {
    deep_queue_of_random_io(Backend::start, &[], Completions::Interrupt);
}

#[test]
fn deep_queues_of_random_io_on_tmpfs_complete_and_land_in_the_file() {
    deep_queue_of_random_io(Backend::start_on_tmpfs, &[], Completions::Interrupt);
    deep_queue_of_random_io(Backend::start_on_tmpfs, &[], Completions::Polled);
}

#[test]
fn a_polling_frontend_gets_every_completion_without_interrupts() {
    // libblkio's poll queues turn used-ring notifications off; the backend
    // must still publish every completion.
    deep_queue_of_random_io(Backend::start, &[], Completions::Polled);
    deep_queue_of_random_io(Backend::start, &["--direct"], Completions::Polled);
}

#[test]
fn deep_queues_of_random_o_direct_io_complete_and_land_on_disk() {
    // O_DIRECT requests are submitted one by one, page-cache ones in batches.
    deep_queue_of_random_io(Backend::start, &["--direct"], Completions::Interrupt);
}

#[test]
fn four_queues_on_fewer_workers_each_land_their_writes() {
    const QUEUES: usize = 4;
    const DEPTH: usize = 8;
    const BLOCKS_PER_QUEUE: usize = 1024;
    const BLOCK: usize = 4096;
    // Block b belongs to queue b % QUEUES and holds the byte b % QUEUES + 1.
    let block_of = |queue: usize, i: usize| (i * QUEUES + queue) as u64;
    for threads in ["1", "2"] {
        let size = (QUEUES * BLOCKS_PER_QUEUE * BLOCK) as u64;
        let backend = Backend::start(size, 0, &["--queues", "4", "--threads", threads]);
        {
            let mut client =
                BlkioQueues::connect(&backend.socket, QUEUES, QUEUES * DEPTH * BLOCK).unwrap();
            let base = client.region.addr;
            // SAFETY: the region is a live mapping of `len` bytes that no
            // request uses yet.
            let buffer =
                unsafe { std::slice::from_raw_parts_mut(base as *mut u8, client.region.len) };
            for (queue, slots) in buffer.chunks_mut(DEPTH * BLOCK).enumerate() {
                slots.fill(queue as u8 + 1);
            }
            // All four queues write at once, each from its own thread.
            let failed: Vec<usize> = std::thread::scope(|scope| {
                let writers: Vec<_> = client
                    .queues
                    .iter_mut()
                    .enumerate()
                    .map(|(queue, q)| {
                        let slots = base + queue * DEPTH * BLOCK;
                        scope.spawn(move || {
                            run_queue_depth(q, slots, DEPTH, BLOCK, BLOCKS_PER_QUEUE, |i| {
                                (true, block_of(queue, i) * BLOCK as u64)
                            })
                        })
                    })
                    .collect();
                writers.into_iter().map(|w| w.join().unwrap()).collect()
            });
            assert_eq!(failed, [0; QUEUES], "--threads {threads}");
        }
        let file = backend.file();
        for (block, bytes) in file.chunks(BLOCK).enumerate() {
            let want = (block % QUEUES) as u8 + 1;
            assert!(
                bytes.iter().all(|b| *b == want),
                "--threads {threads}: block {block} does not hold {want}"
            );
        }
        let run = backend.finish();
        assert!(
            run.stderr
                .contains(&format!("4 queue(s) on {threads} worker thread(s)")),
            "{}",
            run.describe()
        );
    }
}

#[test]
fn more_threads_than_queues_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    std::fs::write(&image, vec![0; 1 << 20]).unwrap();
    let output = Command::new(workspace_bin("vhost-user-blk"))
        .arg("--socket")
        .arg(dir.path().join("blk.sock"))
        .arg("--path")
        .arg(&image)
        .args(["--queues", "2", "--threads", "3"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--threads 3 exceeds --queues 2"),
        "{stderr}"
    );
}
