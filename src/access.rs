//! Who may call: bearer credentials read from requests and compared in constant time, so
//! the time an answer takes says nothing about how much of a secret was right. Secrets
//! Ember hands out (keys, join tokens, node credentials) are random, shown once, and kept
//! only as their SHA-256 hash.

use http::{header, HeaderMap};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Random bytes in each secret Ember makes: 256 bits.
pub const SECRET_BYTES: usize = 32;

/// A new random secret, `PREFIX_` followed by 64 hex digits (the prefix says what it is
/// for, as `ek_` for a key, so a leaked one can be recognised).
pub fn new_secret(prefix: &str) -> String {
    let mut bytes = [0u8; SECRET_BYTES];
    // The operating system's generator; without it no secret can be made safely.
    getrandom::fill(&mut bytes).expect("the OS random number generator works");
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("{prefix}_{hex}")
}

/// The hash a secret is stored as (hex SHA-256).
pub fn hash_secret(secret: &str) -> String {
    Sha256::digest(secret.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Whether `presented` hashes to `stored_hash`, compared in constant time.
pub fn matches_hash(presented: &str, stored_hash: &str) -> bool {
    same_secret(&hash_secret(presented), stored_hash)
}

/// The bearer token of a request (`Authorization: Bearer T`), if it has one.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
}

/// Whether `presented` is `expected`, compared in constant time.
pub fn same_secret(presented: &str, expected: &str) -> bool {
    presented.as_bytes().ct_eq(expected.as_bytes()).into()
}

/// Whether the request carries `expected` as its bearer token.
pub fn check_bearer(headers: &HeaderMap, expected: &str) -> bool {
    bearer(headers).is_some_and(|p| same_secret(p, expected))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(auth: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, auth.parse().unwrap());
        h
    }

    #[test]
    fn secrets_are_random_prefixed_and_checked_by_their_hash() {
        let a = new_secret("ek");
        let b = new_secret("ek");
        assert_ne!(a, b);
        assert!(a.starts_with("ek_") && a.len() == 3 + 64, "{a}");
        let stored = hash_secret(&a);
        assert!(matches_hash(&a, &stored));
        assert!(!matches_hash(&b, &stored));
        assert!(
            !stored.contains(&a[3..]),
            "the hash does not contain the secret"
        );
    }

    #[test]
    fn only_the_exact_bearer_token_passes() {
        assert!(check_bearer(&with("Bearer s3cret-token"), "s3cret-token"));
        assert!(!check_bearer(&with("Bearer s3cret-toke"), "s3cret-token"));
        assert!(!check_bearer(&with("Bearer s3cret-tokenX"), "s3cret-token"));
        assert!(!check_bearer(&with("Basic s3cret-token"), "s3cret-token"));
        assert!(!check_bearer(&HeaderMap::new(), "s3cret-token"));
    }
}
