//! Who may call: bearer credentials read from requests and compared in constant time, so
//! the time an answer takes says nothing about how much of a secret was right.

use http::{header, HeaderMap};
use subtle::ConstantTimeEq;

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
    fn only_the_exact_bearer_token_passes() {
        assert!(check_bearer(&with("Bearer s3cret-token"), "s3cret-token"));
        assert!(!check_bearer(&with("Bearer s3cret-toke"), "s3cret-token"));
        assert!(!check_bearer(&with("Bearer s3cret-tokenX"), "s3cret-token"));
        assert!(!check_bearer(&with("Basic s3cret-token"), "s3cret-token"));
        assert!(!check_bearer(&HeaderMap::new(), "s3cret-token"));
    }
}
