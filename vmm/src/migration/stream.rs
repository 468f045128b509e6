//! The migration stream: `TESSMIG\0`, a format version (u32 LE), then
//! messages, each an 8-byte header (kind, three zero bytes, payload length
//! u32 LE) and its payload. Every length is bounded by its kind before
//! anything is allocated, and a page message's guest range is checked by
//! the receiver against guest memory before a byte lands there.
//!
//! Source to destination: `Hello` (JSON: the configuration, the memory
//! layout), `Pages` (guest address u64 LE, page count u32 LE, the pages),
//! `Zeros` (guest address, page count: pages that hold only zeros),
//! `State` (the device and vCPU state, encoded as a snapshot state file,
//! CRC and all), `Abort` (UTF-8 reason), `Sync` (the end of a pre-copy
//! round). Destination to source: `Accept`, `Refuse` (reason), `Synced`
//! (everything before the `Sync` is in guest memory), `Running`, `Failed`
//! (reason).

use std::io::{self, Read, Write};

/// The stream's first bytes.
pub const MAGIC: [u8; 8] = *b"TESSMIG\0";
/// The format this build writes and reads (2: `Hello` names the guest's
/// CPU features).
pub const VERSION: u32 = 2;
/// The page size of `Pages` and `Zeros`.
pub const PAGE: u64 = 4096;
/// The most pages one `Pages` or `Zeros` message carries.
pub const MAX_PAGES: u32 = 256;
/// The largest `Hello` or `State` payload.
pub const MAX_STATE: u32 = 16 << 20;
/// The largest reason text.
pub const MAX_REASON: u32 = 4096;
const HEADER: usize = 8;
/// Guest address and page count.
const RANGE: u32 = 12;

/// Errors reading or writing the stream.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("the stream broke: {0}")]
    Io(#[from] io::Error),
    #[error("not a Tessera migration stream (its first bytes are {0:02x?})")]
    Magic([u8; 8]),
    #[error("the stream is format version {found}; this Tessera reads version {VERSION}")]
    Version { found: u32 },
    #[error("unknown message kind {0}")]
    Kind(u8),
    #[error("a {kind} message of {len} bytes (at most {max})")]
    Length {
        kind: &'static str,
        len: u32,
        max: u32,
    },
    #[error("a {kind} message of {pages} pages (1 to {MAX_PAGES})")]
    Pages { kind: &'static str, pages: u32 },
    #[error("a message header with nonzero reserved bytes {0:02x?}")]
    Reserved([u8; 3]),
}

/// One message, as read. A `Pages` message's pages follow it in the
/// stream: the reader must take `pages * PAGE` bytes next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Hello(Vec<u8>),
    Accept,
    Refuse(String),
    Pages { addr: u64, pages: u32 },
    Zeros { addr: u64, pages: u32 },
    State(Vec<u8>),
    Abort(String),
    Running,
    Failed(String),
    Sync,
    Synced,
}

const HELLO: u8 = 1;
const ACCEPT: u8 = 2;
const REFUSE: u8 = 3;
const PAGES: u8 = 4;
const ZEROS: u8 = 5;
const STATE: u8 = 6;
const ABORT: u8 = 7;
const RUNNING: u8 = 8;
const FAILED: u8 = 9;
const SYNC: u8 = 10;
const SYNCED: u8 = 11;

/// Writes the magic and the version.
pub fn write_preamble<W: Write + ?Sized>(w: &mut W) -> io::Result<()> {
    w.write_all(&MAGIC)?;
    w.write_all(&VERSION.to_le_bytes())
}

/// Reads and checks the magic and the version.
pub fn read_preamble<R: Read + ?Sized>(r: &mut R) -> Result<(), StreamError> {
    let mut magic = [0u8; 8];
    r.read_exact(&mut magic)?;
    if magic != MAGIC {
        return Err(StreamError::Magic(magic));
    }
    let mut version = [0u8; 4];
    r.read_exact(&mut version)?;
    match u32::from_le_bytes(version) {
        VERSION => Ok(()),
        found => Err(StreamError::Version { found }),
    }
}

fn header(kind: u8, len: u32) -> [u8; HEADER] {
    let mut h = [0u8; HEADER];
    h[0] = kind;
    h[4..].copy_from_slice(&len.to_le_bytes());
    h
}

/// Writes a message without page data (for `Pages`, the caller writes the
/// `pages * PAGE` bytes right after).
pub fn write_message<W: Write + ?Sized>(w: &mut W, message: &Message) -> io::Result<()> {
    let (kind, body): (u8, Vec<u8>) = match message {
        Message::Hello(json) => (HELLO, json.clone()),
        Message::Accept => (ACCEPT, Vec::new()),
        Message::Refuse(reason) => (REFUSE, clip(reason)),
        Message::Pages { addr, pages } => (PAGES, range(*addr, *pages)),
        Message::Zeros { addr, pages } => (ZEROS, range(*addr, *pages)),
        Message::State(bytes) => (STATE, bytes.clone()),
        Message::Abort(reason) => (ABORT, clip(reason)),
        Message::Running => (RUNNING, Vec::new()),
        Message::Failed(reason) => (FAILED, clip(reason)),
        Message::Sync => (SYNC, Vec::new()),
        Message::Synced => (SYNCED, Vec::new()),
    };
    let len = match message {
        Message::Pages { pages, .. } => RANGE as u64 + u64::from(*pages) * PAGE,
        _ => body.len() as u64,
    };
    let len = u32::try_from(len).map_err(|_| io::Error::other("a message too long"))?;
    w.write_all(&header(kind, len))?;
    w.write_all(&body)
}

fn range(addr: u64, pages: u32) -> Vec<u8> {
    let mut body = Vec::with_capacity(RANGE as usize);
    body.extend_from_slice(&addr.to_le_bytes());
    body.extend_from_slice(&pages.to_le_bytes());
    body
}

/// A reason, cut to [`MAX_REASON`] bytes at a character boundary.
fn clip(reason: &str) -> Vec<u8> {
    let mut end = reason.len().min(MAX_REASON as usize);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    reason.as_bytes()[..end].to_vec()
}

fn bounded(kind: &'static str, len: u32, max: u32) -> Result<u32, StreamError> {
    if len > max {
        return Err(StreamError::Length { kind, len, max });
    }
    Ok(len)
}

fn read_body<R: Read + ?Sized>(r: &mut R, len: u32) -> Result<Vec<u8>, StreamError> {
    let mut body = vec![0u8; len as usize];
    r.read_exact(&mut body)?;
    Ok(body)
}

fn read_range<R: Read + ?Sized>(r: &mut R, kind: &'static str) -> Result<(u64, u32), StreamError> {
    let mut body = [0u8; RANGE as usize];
    r.read_exact(&mut body)?;
    let addr = u64::from_le_bytes(body[..8].try_into().expect("8 bytes"));
    let pages = u32::from_le_bytes(body[8..].try_into().expect("4 bytes"));
    if pages == 0 || pages > MAX_PAGES {
        return Err(StreamError::Pages { kind, pages });
    }
    Ok((addr, pages))
}

/// Reads the next message (a `Pages` message's pages stay in the stream).
pub fn read_message<R: Read + ?Sized>(r: &mut R) -> Result<Message, StreamError> {
    let mut h = [0u8; HEADER];
    r.read_exact(&mut h)?;
    let reserved = [h[1], h[2], h[3]];
    if reserved != [0; 3] {
        return Err(StreamError::Reserved(reserved));
    }
    let len = u32::from_le_bytes(h[4..].try_into().expect("4 bytes"));
    let text = |r: &mut dyn FnMut(u32) -> Result<Vec<u8>, StreamError>, kind| {
        let bytes = r(bounded(kind, len, MAX_REASON)?)?;
        Ok::<_, StreamError>(String::from_utf8_lossy(&bytes).into_owned())
    };
    let mut body = |n| read_body(r, n);
    Ok(match h[0] {
        HELLO => Message::Hello(body(bounded("Hello", len, MAX_STATE)?)?),
        STATE => Message::State(body(bounded("State", len, MAX_STATE)?)?),
        ACCEPT => Message::Accept.empty(len)?,
        RUNNING => Message::Running.empty(len)?,
        SYNC => Message::Sync.empty(len)?,
        SYNCED => Message::Synced.empty(len)?,
        REFUSE => Message::Refuse(text(&mut body, "Refuse")?),
        ABORT => Message::Abort(text(&mut body, "Abort")?),
        FAILED => Message::Failed(text(&mut body, "Failed")?),
        ZEROS => {
            bounded("Zeros", len, RANGE)?;
            if len != RANGE {
                return Err(StreamError::Length {
                    kind: "Zeros",
                    len,
                    max: RANGE,
                });
            }
            let (addr, pages) = read_range(r, "Zeros")?;
            Message::Zeros { addr, pages }
        }
        PAGES => {
            let (addr, pages) = read_range(r, "Pages")?;
            let expected = RANGE as u64 + u64::from(pages) * PAGE;
            if u64::from(len) != expected {
                return Err(StreamError::Length {
                    kind: "Pages",
                    len,
                    max: expected as u32,
                });
            }
            Message::Pages { addr, pages }
        }
        kind => return Err(StreamError::Kind(kind)),
    })
}

impl Message {
    /// This body-less message, if its header says it has no body.
    fn empty(self, len: u32) -> Result<Self, StreamError> {
        if len != 0 {
            let kind = match self {
                Self::Accept => "Accept",
                Self::Sync => "Sync",
                Self::Synced => "Synced",
                _ => "Running",
            };
            return Err(StreamError::Length { kind, len, max: 0 });
        }
        Ok(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(message: Message) -> Message {
        let mut bytes = Vec::new();
        write_message(&mut bytes, &message).unwrap();
        if let Message::Pages { pages, .. } = message {
            bytes.extend(std::iter::repeat_n(
                0xab,
                (u64::from(pages) * PAGE) as usize,
            ));
        }
        let mut reader = bytes.as_slice();
        let read = read_message(&mut reader).unwrap();
        if let Message::Pages { pages, .. } = read {
            assert_eq!(reader.len() as u64, u64::from(pages) * PAGE);
        } else {
            assert!(reader.is_empty());
        }
        read
    }

    #[test]
    fn every_message_reads_back_as_written() {
        for message in [
            Message::Hello(b"{\"a\":1}".to_vec()),
            Message::Accept,
            Message::Refuse("no".into()),
            Message::Pages {
                addr: 0x1000,
                pages: 3,
            },
            Message::Zeros {
                addr: 0x2000,
                pages: 256,
            },
            Message::State(vec![1, 2, 3]),
            Message::Abort("cancelled".into()),
            Message::Running,
            Message::Failed("bad".into()),
            Message::Sync,
            Message::Synced,
        ] {
            assert_eq!(round_trip(message.clone()), message);
        }
    }

    #[test]
    fn a_preamble_of_another_program_or_version_is_refused() {
        let mut ok = Vec::new();
        write_preamble(&mut ok).unwrap();
        assert!(read_preamble(&mut ok.as_slice()).is_ok());
        let mut newer = ok.clone();
        newer[8..12].copy_from_slice(&(VERSION + 1).to_le_bytes());
        assert!(matches!(
            read_preamble(&mut newer.as_slice()),
            Err(StreamError::Version { found }) if found == VERSION + 1
        ));
        assert!(matches!(
            read_preamble(&mut &b"TESSNAP\0\x01\0\0\0"[..]),
            Err(StreamError::Magic(_))
        ));
    }

    #[test]
    fn lengths_and_counts_are_bounded_before_anything_is_allocated() {
        let huge_state = header(STATE, u32::MAX);
        assert!(matches!(
            read_message(&mut &huge_state[..]),
            Err(StreamError::Length { kind: "State", .. })
        ));
        let mut too_many = header(PAGES, RANGE + 257 * PAGE as u32).to_vec();
        too_many.extend_from_slice(&range(0, 257));
        assert!(matches!(
            read_message(&mut too_many.as_slice()),
            Err(StreamError::Pages { pages: 257, .. })
        ));
        let mut lying = header(PAGES, 99).to_vec();
        lying.extend_from_slice(&range(0, 1));
        assert!(matches!(
            read_message(&mut lying.as_slice()),
            Err(StreamError::Length { kind: "Pages", .. })
        ));
        assert!(matches!(
            read_message(&mut &header(42, 0)[..]),
            Err(StreamError::Kind(42))
        ));
        let mut reserved = header(ACCEPT, 0);
        reserved[2] = 1;
        assert!(matches!(
            read_message(&mut &reserved[..]),
            Err(StreamError::Reserved(_))
        ));
        assert!(matches!(
            read_message(&mut &header(RUNNING, 5)[..]),
            Err(StreamError::Length {
                kind: "Running",
                ..
            })
        ));
    }

    #[test]
    fn a_long_reason_is_cut_at_a_character_boundary() {
        let reason = "é".repeat(3000);
        let mut bytes = Vec::new();
        write_message(&mut bytes, &Message::Failed(reason)).unwrap();
        let Message::Failed(read) = read_message(&mut bytes.as_slice()).unwrap() else {
            panic!("not Failed");
        };
        assert!(read.len() <= MAX_REASON as usize && read.chars().all(|c| c == 'é'));
    }
}
