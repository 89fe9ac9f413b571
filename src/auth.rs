//! API keys: minted from 32 random bytes, shown once, stored only as a SHA-256 digest.
//!
//! Format: `vt_<prefix>_<secret>`, where the 8-character prefix is stored in clear so people can
//! tell keys apart in listings and audit views.
use sha2::{Digest, Sha256};

const KEY_PREFIX: &str = "vt_";

/// What a key may do. Each role includes the one before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Works with its own tenant's datasets, jobs and models.
    Member,
    /// Also manages its own tenant's keys and reads its own tenant's audit trail.
    Admin,
    /// Also manages what every tenant shares: tenants, pretrained weights, TorchScript
    /// backbones, `/metrics`. Minted only on the host (`vidtune keys create --operator`),
    /// because whoever holds one can reach every tenant.
    Operator,
}

impl Role {
    /// The role stored as the `admin` and `operator` flags of `api_keys`.
    pub fn from_flags(admin: bool, operator: bool) -> Self {
        match (admin, operator) {
            (_, true) => Self::Operator,
            (true, false) => Self::Admin,
            (false, false) => Self::Member,
        }
    }

    pub fn is_admin(self) -> bool {
        self >= Self::Admin
    }

    pub fn is_operator(self) -> bool {
        self == Self::Operator
    }

    /// The word used in messages and `vidtune keys create` output.
    pub fn name(self) -> &'static str {
        match self {
            Self::Member => "tenant",
            Self::Admin => "admin",
            Self::Operator => "operator",
        }
    }
}

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

    #[test]
    fn roles_include_the_ones_below_and_round_trip_through_the_flags() {
        for role in [Role::Member, Role::Admin, Role::Operator] {
            assert_eq!(Role::from_flags(role.is_admin(), role.is_operator()), role);
        }
        assert!(Role::Operator.is_admin() && !Role::Admin.is_operator());
        assert!(!Role::Member.is_admin());
    }
}
