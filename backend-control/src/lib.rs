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
const BUCKET: usize = 1 + 3 * 8;

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

/// One message from the VMM to a backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlMessage {
    /// The limits a limiter now has.
    RateLimits {
        target: LimitTarget,
        limits: RateLimiterConfig,
    },
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
            other => Err(ControlError::Kind(other)),
        }
    }
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
