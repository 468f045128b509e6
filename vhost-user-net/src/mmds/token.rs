//! MMDS V2 session tokens, as Firecracker makes them: the expiry (CLOCK_MONOTONIC
//! milliseconds, u64 LE) sealed with AES-256-GCM under the microVM's key,
//! bound to `microvmid=<id>`, sent as base64 of nonce, ciphertext and tag.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use base64::Engine as _;
use tessera_backend_control::TOKEN_KEY_LEN;

/// The TTLs a token may be asked for, in seconds.
pub const TTL_RANGE: std::ops::RangeInclusive<u32> = 1..=21600;

const NONCE_LEN: usize = 12;
const EXPIRY_LEN: usize = 8;
const TAG_LEN: usize = 16;
const TOKEN_LEN: usize = NONCE_LEN + EXPIRY_LEN + TAG_LEN;
/// Longer than any token's base64: the rest is not even decoded.
const MAX_ENCODED: usize = 64;

/// Makes and checks tokens.
pub struct Tokens {
    cipher: Aes256Gcm,
    aad: String,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens")
            .field("aad", &self.aad)
            .finish_non_exhaustive()
    }
}

fn now_ms() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1000 + t.tv_nsec() as u64 / 1_000_000)
        .unwrap_or(0)
}

impl Tokens {
    pub fn new(key: &[u8; TOKEN_KEY_LEN], instance_id: &str) -> Self {
        Self {
            cipher: Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(key)),
            aad: format!("microvmid={instance_id}"),
        }
    }

    /// A token good for `ttl_s` seconds (in [`TTL_RANGE`]); `None` if the
    /// host gave no randomness for its nonce.
    pub fn generate(&self, ttl_s: u32) -> Option<String> {
        let expiry = now_ms().saturating_add(u64::from(ttl_s) * 1000);
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce).ok()?;
        let payload = Payload {
            msg: &expiry.to_le_bytes(),
            aad: self.aad.as_bytes(),
        };
        let sealed = self
            .cipher
            .encrypt(Nonce::from_slice(&nonce), payload)
            .ok()?;
        let mut token = Vec::with_capacity(TOKEN_LEN);
        token.extend(nonce);
        token.extend(sealed);
        Some(base64::engine::general_purpose::STANDARD.encode(token))
    }

    /// Whether `encoded` is a token of ours that has not expired.
    pub fn is_valid(&self, encoded: &str) -> bool {
        if encoded.len() > MAX_ENCODED {
            return false;
        }
        let Ok(token) = base64::engine::general_purpose::STANDARD.decode(encoded) else {
            return false;
        };
        if token.len() != TOKEN_LEN {
            return false;
        }
        let (nonce, sealed) = token.split_at(NONCE_LEN);
        let payload = Payload {
            msg: sealed,
            aad: self.aad.as_bytes(),
        };
        let Ok(expiry) = self.cipher.decrypt(Nonce::from_slice(nonce), payload) else {
            return false;
        };
        let Ok(expiry) = <[u8; EXPIRY_LEN]>::try_from(expiry.as_slice()) else {
            return false;
        };
        u64::from_le_bytes(expiry) > now_ms()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_good_until_it_expires_and_only_for_its_key_and_id() {
        let tokens = Tokens::new(&[1; TOKEN_KEY_LEN], "vm-a");
        let token = tokens.generate(60).unwrap();
        assert!(tokens.is_valid(&token));
        assert!(!Tokens::new(&[2; TOKEN_KEY_LEN], "vm-a").is_valid(&token));
        assert!(!Tokens::new(&[1; TOKEN_KEY_LEN], "vm-b").is_valid(&token));
        let mut forged = token.into_bytes();
        forged[20] = if forged[20] == b'A' { b'B' } else { b'A' };
        assert!(!tokens.is_valid(std::str::from_utf8(&forged).unwrap()));
        assert!(!tokens.is_valid("not base64!"));
        assert!(!tokens.is_valid(&"A".repeat(1000)));
        // Expired: a token sealed with an expiry in the past.
        let past = Payload {
            msg: &now_ms().saturating_sub(1).to_le_bytes(),
            aad: tokens.aad.as_bytes(),
        };
        let mut old = vec![0u8; NONCE_LEN];
        old.extend(
            tokens
                .cipher
                .encrypt(Nonce::from_slice(&[0; NONCE_LEN]), past)
                .unwrap(),
        );
        assert!(!tokens.is_valid(&base64::engine::general_purpose::STANDARD.encode(old)));
    }
}
