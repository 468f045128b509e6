//! The probe's `journal` mode as the host checks it: numbered, checksummed
//! 512-byte records, one per sector, and the `probe.journal=<n>` lines
//! that promise records `0..n` are durable. The record format is written
//! out again here so that a check does not trust the writer.

use std::path::Path;

/// Bytes per record (a sector).
pub const SECTOR: usize = 512;
const WORDS: usize = SECTOR / 8;

/// Word `i` (1 to 62) of the record whose word 0 is `value`, and the
/// FNV-1a checksum in word 63.
pub fn expected_record(value: u64) -> [u64; WORDS] {
    let mut words = [0u64; WORDS];
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for (i, word) in words.iter_mut().enumerate().take(WORDS - 1) {
        *word = if i == 0 {
            value
        } else {
            value.rotate_left(i as u32) ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)
        };
        hash = (hash ^ *word).wrapping_mul(0x0000_0100_0000_01b3);
    }
    words[WORDS - 1] = hash;
    words
}

/// The first record of `0..durable` in `disk` that is missing or damaged,
/// with what is wrong with it.
pub fn first_bad_record(disk: &Path, durable: u64, seed: u64) -> Option<(u64, String)> {
    let bytes = std::fs::read(disk).unwrap();
    (0..durable).find_map(|record| {
        let at = record as usize * SECTOR;
        let Some(sector) = bytes.get(at..at + SECTOR) else {
            return Some((record, format!("the disk ends at byte {}", bytes.len())));
        };
        let want = expected_record(record ^ seed);
        let good = sector
            .chunks_exact(8)
            .zip(want)
            .all(|(got, want)| got == want.to_le_bytes());
        (!good).then(|| {
            let word0 = u64::from_le_bytes(sector[..8].try_into().unwrap());
            (
                record,
                format!("word 0 is {word0:#x}, not {:#x}", record ^ seed),
            )
        })
    })
}

/// The highest `n` of a whole `probe.journal=<n>` line (0 if none).
pub fn last_durable(stdout: &str) -> u64 {
    stdout
        .split_inclusive('\n')
        .filter(|line| line.ends_with('\n'))
        .filter_map(|line| line.trim_end().strip_prefix("probe.journal="))
        .filter_map(|n| n.parse().ok())
        .max()
        .unwrap_or(0)
}
