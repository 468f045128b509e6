//! The snapshot state file: a fixed header, a JSON payload and a CRC.
//!
//! ```text
//! offset  size  field
//! 0       8     magic "TESSNAP\0"
//! 8       4     format version, little-endian (FORMAT_VERSION)
//! 12      8     payload length in bytes, little-endian
//! 20      n     payload: the microVM's state as JSON
//! 20+n    4     CRC-32 (IEEE) of every byte before it, little-endian
//! ```
//!
//! A reader checks the magic, the version, the length and the CRC before
//! it decodes anything, so a truncated, corrupted or newer file is refused
//! with the reason, before any part of a microVM is built.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::Path;

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Identifies a Tessera snapshot state file.
pub const MAGIC: [u8; 8] = *b"TESSNAP\0";
/// The format this build writes and the newest it reads.
pub const FORMAT_VERSION: u32 = 1;
/// No state file is larger (a 2-vCPU microVM's is 46 KiB; Firecracker's
/// limit is 10 MB): a length field beyond it is corruption, not an
/// allocation to make, and what a payload this size decodes to stays
/// bounded.
pub const MAX_PAYLOAD: u64 = 16 << 20;
const HEADER_LEN: usize = 20;
const CRC_LEN: usize = 4;

/// Errors reading or writing a state file; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum StateFileError {
    #[error("cannot open the snapshot file {path}: {source}")]
    Open { path: String, source: io::Error },
    #[error("cannot read the snapshot file {path}: {source}")]
    Read { path: String, source: io::Error },
    #[error("cannot write the snapshot file {path}: {source}")]
    Write { path: String, source: io::Error },
    #[error("{path} is not a Tessera snapshot file (its first bytes are {found:02x?})")]
    NotASnapshot { path: String, found: Vec<u8> },
    #[error(
        "{path} has snapshot format version {found}; this Tessera reads versions up to {FORMAT_VERSION}"
    )]
    NewerVersion { path: String, found: u32 },
    #[error("{path} says its state is {length} bytes, more than the {MAX_PAYLOAD} a snapshot has")]
    TooLarge { path: String, length: u64 },
    #[error("{path} is truncated: {expected} bytes expected, {found} present")]
    Truncated {
        path: String,
        expected: u64,
        found: u64,
    },
    #[error("{path} is {extra} byte(s) longer than its header says")]
    TrailingBytes { path: String, extra: u64 },
    #[error("{path} is corrupted: its CRC is {stored:#010x}, its contents give {computed:#010x}")]
    Crc {
        path: String,
        stored: u32,
        computed: u32,
    },
    #[error("the state in {path} does not decode: {reason}")]
    Decode { path: String, reason: String },
    #[error("cannot encode the microVM's state: {0}")]
    Encode(String),
}

/// Writes `state` to a new file at `path` (replacing one that is there).
pub fn write<T: Serialize>(path: &Path, state: &T) -> Result<(), StateFileError> {
    let bytes = encode(state)?;
    write_replacing(path, |file| file.write_all(&bytes)).map_err(|source| StateFileError::Write {
        path: path.display().to_string(),
        source,
    })
}

/// Makes a new file at `path` with `write`, under a temporary name beside
/// it that replaces `path` only once complete: a file a microVM maps (the
/// memory file it was loaded from, which clones may map too) keeps its
/// contents under its old inode, and no half-written file is left at
/// `path`.
pub fn write_replacing(
    path: &Path,
    write: impl FnOnce(&mut File) -> io::Result<()>,
) -> io::Result<()> {
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(format!(".tmp-{}", std::process::id()));
    let temporary = std::path::PathBuf::from(temporary);
    let written = File::create(&temporary)
        .and_then(|mut file| write(&mut file))
        .and_then(|()| std::fs::rename(&temporary, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&temporary);
    }
    written
}

/// Reads and checks the file at `path`, then decodes its state.
pub fn read<T: DeserializeOwned>(path: &Path) -> Result<T, StateFileError> {
    let display = path.display().to_string();
    let file = File::open(path).map_err(|source| StateFileError::Open {
        path: display.clone(),
        source,
    })?;
    // One byte more than the largest valid file tells a too-long one apart.
    let mut bytes = Vec::new();
    file.take(HEADER_LEN as u64 + MAX_PAYLOAD + CRC_LEN as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|source| StateFileError::Read {
            path: display.clone(),
            source,
        })?;
    decode(&bytes, &display)
}

/// The file's bytes for `state`.
pub fn encode<T: Serialize>(state: &T) -> Result<Vec<u8>, StateFileError> {
    let payload = serde_json::to_vec(state).map_err(|e| StateFileError::Encode(e.to_string()))?;
    Ok(frame(&payload))
}

/// `payload` with the header and the CRC around it.
pub fn frame(payload: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(HEADER_LEN + payload.len() + CRC_LEN);
    bytes.extend_from_slice(&MAGIC);
    bytes.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    bytes.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    bytes.extend_from_slice(payload);
    let crc = crc32fast::hash(&bytes);
    bytes.extend_from_slice(&crc.to_le_bytes());
    bytes
}

/// Checks `bytes` (the file named `path`) and decodes its state.
pub fn decode<T: DeserializeOwned>(bytes: &[u8], path: &str) -> Result<T, StateFileError> {
    let path = || path.to_string();
    let truncated = |expected: u64| StateFileError::Truncated {
        path: path(),
        expected,
        found: bytes.len() as u64,
    };
    let magic = bytes.get(..MAGIC.len()).unwrap_or(bytes);
    if magic != MAGIC {
        // A short file that starts like one is a truncated snapshot.
        if MAGIC.starts_with(magic) && !magic.is_empty() {
            return Err(truncated((HEADER_LEN + CRC_LEN) as u64));
        }
        return Err(StateFileError::NotASnapshot {
            path: path(),
            found: magic.to_vec(),
        });
    }
    let header = bytes
        .get(..HEADER_LEN)
        .ok_or_else(|| truncated((HEADER_LEN + CRC_LEN) as u64))?;
    let version = u32::from_le_bytes(header[8..12].try_into().unwrap_or_default());
    if version > FORMAT_VERSION {
        return Err(StateFileError::NewerVersion {
            path: path(),
            found: version,
        });
    }
    let length = u64::from_le_bytes(header[12..20].try_into().unwrap_or_default());
    if length > MAX_PAYLOAD {
        return Err(StateFileError::TooLarge {
            path: path(),
            length,
        });
    }
    let expected = HEADER_LEN as u64 + length + CRC_LEN as u64;
    match (bytes.len() as u64).cmp(&expected) {
        std::cmp::Ordering::Less => return Err(truncated(expected)),
        std::cmp::Ordering::Greater => {
            return Err(StateFileError::TrailingBytes {
                path: path(),
                extra: bytes.len() as u64 - expected,
            })
        }
        std::cmp::Ordering::Equal => {}
    }
    let (checked, crc) = bytes.split_at(bytes.len() - CRC_LEN);
    let stored = u32::from_le_bytes(crc.try_into().unwrap_or_default());
    let computed = crc32fast::hash(checked);
    if stored != computed {
        return Err(StateFileError::Crc {
            path: path(),
            stored,
            computed,
        });
    }
    serde_json::from_slice(&checked[HEADER_LEN..]).map_err(|e| StateFileError::Decode {
        path: path(),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct State {
        name: String,
        pages: Vec<u64>,
    }

    fn state() -> State {
        State {
            name: "vm".into(),
            pages: vec![1, 2, 3],
        }
    }

    fn decoded(bytes: &[u8]) -> Result<State, StateFileError> {
        decode(bytes, "s")
    }

    #[test]
    fn a_state_comes_back_as_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.snap");
        write(&path, &state()).unwrap();
        assert_eq!(read::<State>(&path).unwrap(), state());
    }

    #[test]
    fn every_truncation_is_refused_as_truncated() {
        let bytes = encode(&state()).unwrap();
        for len in 1..bytes.len() {
            let err = decoded(&bytes[..len]).unwrap_err();
            assert!(
                matches!(err, StateFileError::Truncated { .. }),
                "{len}: {err}"
            );
        }
        assert!(matches!(
            decoded(&[]).unwrap_err(),
            StateFileError::NotASnapshot { .. }
        ));
    }

    #[test]
    fn every_flipped_bit_after_the_header_is_caught() {
        let bytes = encode(&state()).unwrap();
        for at in HEADER_LEN..bytes.len() {
            for bit in 0..8 {
                let mut bad = bytes.clone();
                bad[at] ^= 1 << bit;
                let err = decoded(&bad).unwrap_err();
                assert!(
                    matches!(err, StateFileError::Crc { .. }),
                    "{at}.{bit}: {err}"
                );
            }
        }
    }

    #[test]
    fn a_bad_header_names_what_is_wrong() {
        let bytes = encode(&state()).unwrap();
        let mut other = bytes.clone();
        other[..8].copy_from_slice(b"\x7fELF\x02\x01\x01\0");
        assert!(matches!(
            decoded(&other).unwrap_err(),
            StateFileError::NotASnapshot { .. }
        ));
        let mut newer = bytes.clone();
        newer[8..12].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
        let err = decoded(&newer).unwrap_err();
        assert!(err.to_string().contains("format version 2"), "{err}");
        let mut huge = bytes.clone();
        huge[12..20].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            decoded(&huge).unwrap_err(),
            StateFileError::TooLarge { .. }
        ));
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(matches!(
            decoded(&longer).unwrap_err(),
            StateFileError::TrailingBytes { extra: 1, .. }
        ));
    }

    #[test]
    fn a_payload_of_another_shape_is_a_decode_error() {
        let bytes = encode(&serde_json::json!({"name": 7})).unwrap();
        assert!(matches!(
            decoded(&bytes).unwrap_err(),
            StateFileError::Decode { .. }
        ));
    }
}
