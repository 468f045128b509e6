//! The VMM's control channel to its backends: a message rides in a
//! vhost-user `SET_CONFIG` at [`CONTROL_OFFSET`], past the config space of
//! every virtio device Tessera serves (the largest, virtio-blk's, is 60
//! bytes), so that a jailed backend takes it on the connection it already
//! has, with no new syscall; `REPLY_ACK` carries the answer back. A
//! backend that does not know the channel refuses the write as a config
//! write out of range.
//!
//! A message is `TCTL`, a version byte, a kind byte, two zero bytes, then
//! the kind's payload; the whole is at most [`MAX_MESSAGE`] bytes, the
//! room vhost-user leaves after the offset.
//!
//! - Kind 1, rate limits: a target byte ([`LimitTarget`]), then the
//!   bandwidth and the ops bucket, each a presence byte (0 or 1) and
//!   `size`, `one_time_burst`, `refill_time` as u64 LE: the limits in
//!   force (the VMM merges a `PATCH` into them), an absent bucket limiting
//!   nothing.
//! - Kind 2, MMDS configuration: the version byte (1 or 2), the
//!   `imds_compat` byte (0 or 1), the IPv4 address (4 bytes), the 32-byte
//!   key of the session tokens, then the instance id (a length byte and at
//!   most [`MAX_INSTANCE_ID`] bytes of UTF-8).
//! - Kind 3, a piece of the MMDS store: a generation, the store's whole
//!   length and this piece's offset (u32 LE each), then the piece. A store
//!   is its compact JSON sent in order, piece by piece ([`mmds_store`]);
//!   the backend swaps it in when the last byte arrives.

use std::net::Ipv4Addr;

use tessera_rate_limiter::{RateLimiterConfig, TokenBucketConfig};

/// Where a control message is written in vhost-user's config window.
pub const CONTROL_OFFSET: u32 = 0xf00;
/// The longest message: what is left of vhost-user's 4 KiB window.
pub const MAX_MESSAGE: usize = 0x1000 - CONTROL_OFFSET as usize;
/// The format this build writes and reads.
pub const VERSION: u8 = 1;

const MAGIC: [u8; 4] = *b"TCTL";
const HEADER: usize = 8;
const KIND_RATE_LIMITS: u8 = 1;
const KIND_MMDS_CONFIG: u8 = 2;
const KIND_MMDS_DATA: u8 = 3;
const BUCKET: usize = 1 + 3 * 8;
/// The longest instance id an MMDS configuration carries (Firecracker's
/// limit on `--id`).
pub const MAX_INSTANCE_ID: usize = 64;
/// The bytes of the MMDS token key.
pub const TOKEN_KEY_LEN: usize = 32;
const MMDS_CONFIG_FIXED: usize = HEADER + 2 + 4 + TOKEN_KEY_LEN + 1;
const MMDS_DATA_HEADER: usize = HEADER + 12;
/// The store bytes one piece carries.
pub const MMDS_PIECE: usize = MAX_MESSAGE - MMDS_DATA_HEADER;

/// Why a message was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    #[error(
        "a control message of {0} bytes (the header takes {HEADER}, the most is {MAX_MESSAGE})"
    )]
    Length(usize),
    #[error("not a control message (its first bytes are {0:02x?})")]
    Magic([u8; 4]),
    #[error("control message version {0}; this backend reads version {VERSION}")]
    Version(u8),
    #[error("unknown control message kind {0}")]
    Kind(u8),
    #[error("nonzero reserved bytes {0:02x?}")]
    Reserved([u8; 2]),
    #[error("a rate limits message of {0} bytes (it takes {RATE_LIMITS_LEN})")]
    RateLimitsLength(usize),
    #[error("unknown rate limit target {0}")]
    Target(u8),
    #[error("bucket presence byte {0} (0 or 1)")]
    Presence(u8),
    #[error("an MMDS configuration of {0} bytes")]
    MmdsConfigLength(usize),
    #[error("MMDS version byte {0} (1 or 2)")]
    MmdsVersion(u8),
    #[error("imds_compat byte {0} (0 or 1)")]
    ImdsCompat(u8),
    #[error("an instance id that is not UTF-8 or longer than {MAX_INSTANCE_ID} bytes")]
    InstanceId,
    #[error("an MMDS piece of {0} bytes (its header takes {MMDS_DATA_HEADER})")]
    MmdsDataLength(usize),
    #[error("an MMDS piece at {offset} (+{len}) beyond the store's {total} bytes")]
    MmdsPieceBounds { offset: u32, len: usize, total: u32 },
}

const RATE_LIMITS_LEN: usize = HEADER + 1 + 2 * BUCKET;

/// Which of a device's limiters a message sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitTarget {
    /// A drive's (or the device's only) limiter.
    Device,
    /// A network interface's receive limiter (frames to the guest).
    Rx,
    /// A network interface's transmit limiter (frames from the guest).
    Tx,
}

impl LimitTarget {
    fn byte(self) -> u8 {
        match self {
            LimitTarget::Device => 0,
            LimitTarget::Rx => 1,
            LimitTarget::Tx => 2,
        }
    }

    fn from_byte(byte: u8) -> Result<Self, ControlError> {
        match byte {
            0 => Ok(LimitTarget::Device),
            1 => Ok(LimitTarget::Rx),
            2 => Ok(LimitTarget::Tx),
            other => Err(ControlError::Target(other)),
        }
    }
}

/// Which MMDS a guest is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MmdsVersion {
    V1,
    V2,
}

/// How an interface's backend serves MMDS.
#[derive(Clone, PartialEq, Eq)]
pub struct MmdsSettings {
    pub version: MmdsVersion,
    pub imds_compat: bool,
    pub ipv4_address: Ipv4Addr,
    /// The AES-256-GCM key of the session tokens, the same for every
    /// interface of the microVM (a token is good on each of them).
    pub token_key: [u8; TOKEN_KEY_LEN],
    /// Bound into each token (Firecracker's `microvmid=` AAD).
    pub instance_id: String,
}

impl std::fmt::Debug for MmdsSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmdsSettings")
            .field("version", &self.version)
            .field("imds_compat", &self.imds_compat)
            .field("ipv4_address", &self.ipv4_address)
            .field("instance_id", &self.instance_id)
            .finish_non_exhaustive()
    }
}

/// One piece of the MMDS store: `data` goes at `offset` of a store of
/// `total` bytes, generation `generation`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MmdsPiece {
    pub generation: u32,
    pub total: u32,
    pub offset: u32,
    pub data: Vec<u8>,
}

/// One message from the VMM to a backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlMessage {
    /// The limits a limiter now has.
    RateLimits {
        target: LimitTarget,
        limits: RateLimiterConfig,
    },
    /// The interface serves MMDS so.
    MmdsConfig(MmdsSettings),
    /// A piece of the MMDS store.
    MmdsData(MmdsPiece),
}

/// The messages that carry the MMDS store `json` (its compact JSON) as
/// generation `generation`; an empty store is one empty piece.
pub fn mmds_store(generation: u32, json: &[u8]) -> Vec<ControlMessage> {
    let total = json.len() as u32;
    let piece = |offset: usize, data: &[u8]| {
        ControlMessage::MmdsData(MmdsPiece {
            generation,
            total,
            offset: offset as u32,
            data: data.to_vec(),
        })
    };
    if json.is_empty() {
        return vec![piece(0, &[])];
    }
    json.chunks(MMDS_PIECE)
        .enumerate()
        .map(|(index, data)| piece(index * MMDS_PIECE, data))
        .collect()
}

fn put_bucket(out: &mut Vec<u8>, bucket: Option<&TokenBucketConfig>) {
    match bucket {
        None => out.extend([0; BUCKET]),
        Some(b) => {
            out.push(1);
            out.extend(b.size.to_le_bytes());
            out.extend(b.one_time_burst.unwrap_or(0).to_le_bytes());
            out.extend(b.refill_time.to_le_bytes());
        }
    }
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    let mut word = [0u8; 4];
    word.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(word)
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(word)
}

fn get_bucket(bytes: &[u8]) -> Result<Option<TokenBucketConfig>, ControlError> {
    match bytes[0] {
        0 => Ok(None),
        1 => Ok(Some(TokenBucketConfig {
            size: u64_at(bytes, 1),
            one_time_burst: Some(u64_at(bytes, 9)).filter(|&b| b != 0),
            refill_time: u64_at(bytes, 17),
        })),
        other => Err(ControlError::Presence(other)),
    }
}

impl ControlMessage {
    /// What the message sets: a later message with the same key replaces
    /// it (the VMM keeps the last of each for the device's next backends).
    pub fn key(&self) -> &'static str {
        match self {
            ControlMessage::RateLimits { target, .. } => match target {
                LimitTarget::Device => "rate_limiter",
                LimitTarget::Rx => "rx_rate_limiter",
                LimitTarget::Tx => "tx_rate_limiter",
            },
            ControlMessage::MmdsConfig(_) => "mmds_config",
            ControlMessage::MmdsData(_) => "mmds_data",
        }
    }

    /// The message's bytes, for `SET_CONFIG` at [`CONTROL_OFFSET`].
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(RATE_LIMITS_LEN);
        out.extend(MAGIC);
        match self {
            ControlMessage::RateLimits { target, limits } => {
                out.extend([VERSION, KIND_RATE_LIMITS, 0, 0]);
                out.push(target.byte());
                put_bucket(&mut out, limits.bandwidth.as_ref());
                put_bucket(&mut out, limits.ops.as_ref());
            }
            ControlMessage::MmdsConfig(settings) => {
                out.extend([VERSION, KIND_MMDS_CONFIG, 0, 0]);
                out.push(match settings.version {
                    MmdsVersion::V1 => 1,
                    MmdsVersion::V2 => 2,
                });
                out.push(u8::from(settings.imds_compat));
                out.extend(settings.ipv4_address.octets());
                out.extend(settings.token_key);
                let id = settings.instance_id.as_bytes();
                let id = &id[..id.len().min(MAX_INSTANCE_ID)];
                out.push(id.len() as u8);
                out.extend(id);
            }
            ControlMessage::MmdsData(piece) => {
                out.extend([VERSION, KIND_MMDS_DATA, 0, 0]);
                out.extend(piece.generation.to_le_bytes());
                out.extend(piece.total.to_le_bytes());
                out.extend(piece.offset.to_le_bytes());
                out.extend(&piece.data);
            }
        }
        out
    }

    /// Reads a message, checking every byte.
    pub fn decode(bytes: &[u8]) -> Result<Self, ControlError> {
        if bytes.len() < HEADER || bytes.len() > MAX_MESSAGE {
            return Err(ControlError::Length(bytes.len()));
        }
        let magic = [bytes[0], bytes[1], bytes[2], bytes[3]];
        if magic != MAGIC {
            return Err(ControlError::Magic(magic));
        }
        if bytes[4] != VERSION {
            return Err(ControlError::Version(bytes[4]));
        }
        if bytes[6..8] != [0, 0] {
            return Err(ControlError::Reserved([bytes[6], bytes[7]]));
        }
        match bytes[5] {
            KIND_RATE_LIMITS => {
                if bytes.len() != RATE_LIMITS_LEN {
                    return Err(ControlError::RateLimitsLength(bytes.len()));
                }
                let target = LimitTarget::from_byte(bytes[HEADER])?;
                let buckets = &bytes[HEADER + 1..];
                Ok(ControlMessage::RateLimits {
                    target,
                    limits: RateLimiterConfig {
                        bandwidth: get_bucket(&buckets[..BUCKET])?,
                        ops: get_bucket(&buckets[BUCKET..])?,
                    },
                })
            }
            KIND_MMDS_CONFIG => decode_mmds_config(bytes),
            KIND_MMDS_DATA => decode_mmds_data(bytes),
            other => Err(ControlError::Kind(other)),
        }
    }
}

fn decode_mmds_config(bytes: &[u8]) -> Result<ControlMessage, ControlError> {
    if bytes.len() < MMDS_CONFIG_FIXED {
        return Err(ControlError::MmdsConfigLength(bytes.len()));
    }
    let body = &bytes[HEADER..];
    let version = match body[0] {
        1 => MmdsVersion::V1,
        2 => MmdsVersion::V2,
        other => return Err(ControlError::MmdsVersion(other)),
    };
    let imds_compat = match body[1] {
        0 => false,
        1 => true,
        other => return Err(ControlError::ImdsCompat(other)),
    };
    let ipv4_address = Ipv4Addr::new(body[2], body[3], body[4], body[5]);
    let mut token_key = [0u8; TOKEN_KEY_LEN];
    token_key.copy_from_slice(&body[6..6 + TOKEN_KEY_LEN]);
    let id_len = usize::from(body[6 + TOKEN_KEY_LEN]);
    let id = &bytes[MMDS_CONFIG_FIXED..];
    if id.len() != id_len {
        return Err(ControlError::MmdsConfigLength(bytes.len()));
    }
    if id_len > MAX_INSTANCE_ID {
        return Err(ControlError::InstanceId);
    }
    let instance_id = std::str::from_utf8(id)
        .map_err(|_| ControlError::InstanceId)?
        .to_string();
    Ok(ControlMessage::MmdsConfig(MmdsSettings {
        version,
        imds_compat,
        ipv4_address,
        token_key,
        instance_id,
    }))
}

fn decode_mmds_data(bytes: &[u8]) -> Result<ControlMessage, ControlError> {
    if bytes.len() < MMDS_DATA_HEADER {
        return Err(ControlError::MmdsDataLength(bytes.len()));
    }
    let piece = MmdsPiece {
        generation: u32_at(bytes, HEADER),
        total: u32_at(bytes, HEADER + 4),
        offset: u32_at(bytes, HEADER + 8),
        data: bytes[MMDS_DATA_HEADER..].to_vec(),
    };
    let end = u64::from(piece.offset) + piece.data.len() as u64;
    if end > u64::from(piece.total) {
        return Err(ControlError::MmdsPieceBounds {
            offset: piece.offset,
            len: piece.data.len(),
            total: piece.total,
        });
    }
    Ok(ControlMessage::MmdsData(piece))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> ControlMessage {
        ControlMessage::RateLimits {
            target: LimitTarget::Tx,
            limits: RateLimiterConfig {
                bandwidth: Some(TokenBucketConfig {
                    size: 1 << 20,
                    one_time_burst: Some(4096),
                    refill_time: 100,
                }),
                ops: None,
            },
        }
    }

    #[test]
    fn a_message_reads_back_as_written_and_fits_the_window() {
        let bytes = limits().encode();
        assert!(bytes.len() <= MAX_MESSAGE);
        assert_eq!(ControlMessage::decode(&bytes), Ok(limits()));
    }

    fn mmds_config() -> ControlMessage {
        ControlMessage::MmdsConfig(MmdsSettings {
            version: MmdsVersion::V2,
            imds_compat: true,
            ipv4_address: Ipv4Addr::new(169, 254, 169, 254),
            token_key: [7; TOKEN_KEY_LEN],
            instance_id: "x".repeat(MAX_INSTANCE_ID),
        })
    }

    #[test]
    fn mmds_messages_read_back_and_fit() {
        let bytes = mmds_config().encode();
        assert!(bytes.len() <= MAX_MESSAGE);
        assert_eq!(ControlMessage::decode(&bytes), Ok(mmds_config()));
        let json = vec![b'a'; 3 * MMDS_PIECE + 5];
        let pieces = mmds_store(9, &json);
        assert_eq!(pieces.len(), 4);
        let mut joined = Vec::new();
        for piece in &pieces {
            let bytes = piece.encode();
            assert!(bytes.len() <= MAX_MESSAGE);
            let Ok(ControlMessage::MmdsData(p)) = ControlMessage::decode(&bytes) else {
                panic!("not a piece");
            };
            assert_eq!((p.generation, p.total), (9, json.len() as u32));
            assert_eq!(p.offset as usize, joined.len());
            joined.extend(p.data);
        }
        assert_eq!(joined, json);
        assert_eq!(mmds_store(1, b"").len(), 1);
    }

    #[test]
    fn malformed_mmds_messages_are_named() {
        let good = mmds_config().encode();
        let with = |at: usize, byte: u8| {
            let mut bytes = good.clone();
            bytes[at] = byte;
            ControlMessage::decode(&bytes)
        };
        assert_eq!(with(HEADER, 3), Err(ControlError::MmdsVersion(3)));
        assert_eq!(with(HEADER + 1, 2), Err(ControlError::ImdsCompat(2)));
        assert!(matches!(
            with(MMDS_CONFIG_FIXED - 1, 3),
            Err(ControlError::MmdsConfigLength(_))
        ));
        assert_eq!(with(MMDS_CONFIG_FIXED, 0xff), Err(ControlError::InstanceId));
        let mut piece = mmds_store(1, b"{}")[0].encode();
        piece[HEADER + 8] = 1;
        assert!(matches!(
            ControlMessage::decode(&piece),
            Err(ControlError::MmdsPieceBounds { offset: 1, .. })
        ));
        assert_eq!(
            ControlMessage::decode(&piece[..HEADER + 4]),
            Err(ControlError::MmdsDataLength(HEADER + 4))
        );
    }

    #[test]
    fn every_malformed_field_is_named() {
        let good = limits().encode();
        let with = |at: usize, byte: u8| {
            let mut bytes = good.clone();
            bytes[at] = byte;
            ControlMessage::decode(&bytes)
        };
        assert!(matches!(with(0, b'X'), Err(ControlError::Magic(_))));
        assert_eq!(with(4, 2), Err(ControlError::Version(2)));
        assert_eq!(with(5, 9), Err(ControlError::Kind(9)));
        assert!(matches!(with(6, 1), Err(ControlError::Reserved(_))));
        assert_eq!(with(HEADER, 3), Err(ControlError::Target(3)));
        assert_eq!(with(HEADER + 1, 2), Err(ControlError::Presence(2)));
        assert_eq!(
            ControlMessage::decode(&good[..good.len() - 1]),
            Err(ControlError::RateLimitsLength(good.len() - 1))
        );
        assert_eq!(
            ControlMessage::decode(&[0; 4]),
            Err(ControlError::Length(4))
        );
        assert_eq!(
            ControlMessage::decode(&[0; MAX_MESSAGE + 1]),
            Err(ControlError::Length(MAX_MESSAGE + 1))
        );
    }
}
