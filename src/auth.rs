//! API keys: minted from 32 random bytes, shown once, stored only as a SHA-256 digest.
//!
//! Format: `vt_<prefix>_<secret>`, where the 8-character prefix is stored in clear so people can
//! tell keys apart in listings and audit views.
use sha2::{Digest, Sha256};

const KEY_PREFIX: &str = "vt_";

/// A freshly minted key: `secret` is the full key, returned to the user exactly once.
pub struct MintedKey {
    pub secret: String,
    pub prefix: String,
    pub digest: [u8; 32],
}

/// Make a new random API key.
pub fn mint() -> MintedKey {
    let bytes: [u8; 24] = rand::random();
    let body = hex::encode(bytes);
    let prefix = body[..8].to_string();
    let secret = format!("{KEY_PREFIX}{prefix}_{}", &body[8..]);
    let digest = digest(&secret);
    MintedKey {
        secret,
        prefix,
        digest,
    }
}

/// The stored form of a key.
pub fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// Whether a string has the shape of a vidtune key (cheap check before touching the database).
pub fn looks_like_key(key: &str) -> bool {
    key.len() == KEY_PREFIX.len() + 8 + 1 + 40
        && key.starts_with(KEY_PREFIX)
        && key.as_bytes()[KEY_PREFIX.len() + 8] == b'_'
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_keys_are_unique_well_formed_and_digest_matches() {
        let a = mint();
        let b = mint();
        assert_ne!(a.secret, b.secret);
        assert!(looks_like_key(&a.secret), "{}", a.secret);
        assert!(a.secret.starts_with(&format!("vt_{}_", a.prefix)));
        assert_eq!(digest(&a.secret), a.digest);
        assert!(!looks_like_key("vt_short"));
    }
}
