//! Who may call: bearer credentials read from requests and compared in constant time, so
//! the time an answer takes says nothing about how much of a secret was right. Secrets
//! Ember hands out (keys, join tokens, node credentials) are random, shown once, and kept
//! only as their SHA-256 hash. Also here: what a key may do ([`Scope`]) and the admin
//! token's file ([`admin_token`]). This module imports nothing of the crate; who checks
//! which credential on which route is the gateway's (`gateway/auth.rs`).

use std::io::Write;
use std::path::Path;

use http::{header, HeaderMap};
use serde::{Deserialize, Serialize};
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

/// The bearer token of a request (`Authorization: Bearer T`; the scheme's case does not
/// matter, as RFC 9110 says), if it has one.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// Whether `presented` is `expected`, compared in constant time.
pub fn same_secret(presented: &str, expected: &str) -> bool {
    presented.as_bytes().ct_eq(expected.as_bytes()).into()
}

/// Whether the request carries `expected` as its bearer token.
pub fn check_bearer(headers: &HeaderMap, expected: &str) -> bool {
    bearer(headers).is_some_and(|p| same_secret(p, expected))
}

/// Prefix of invoke and admin keys (`ember keys create`).
pub const KEY_PREFIX: &str = "ek";
/// Prefix of the gateway's admin token.
pub const ADMIN_TOKEN_PREFIX: &str = "ea";
/// The admin token's file name in the data dir.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";
/// Header that carries an invoke key as an alternative to `Authorization`. It is Ember's:
/// the gateway removes it from every request before a function sees it.
pub const KEY_HEADER: &str = "x-ember-key";
/// The `*` of `--invoke '*'`: every function.
pub const ANY_FUNCTION: &str = "*";

/// What a key may do.
#[derive(utoipa::ToSchema, Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Scope {
    /// Everything the admin token may: the control API and every function.
    Admin,
    /// Invoke these functions; [`ANY_FUNCTION`] among them means every function.
    Invoke {
        /// Function names, or `*`.
        functions: Vec<String>,
    },
}

impl Scope {
    /// Whether the key may use the control API (`/api/v1`).
    pub fn allows_admin(&self) -> bool {
        matches!(self, Scope::Admin)
    }

    /// Whether the key may invoke `function` (private functions ask; public ones do not).
    pub fn allows_invoke(&self, function: &str) -> bool {
        match self {
            Scope::Admin => true,
            Scope::Invoke { functions } => {
                functions.iter().any(|f| f == ANY_FUNCTION || f == function)
            }
        }
    }
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Scope::Admin => write!(f, "admin"),
            Scope::Invoke { functions } => write!(f, "invoke {}", functions.join(",")),
        }
    }
}

/// The admin token in `path`: read when the file exists, otherwise made (random, mode
/// 0600, created exclusively so two gateways starting at once cannot each write their
/// own). Returns the token and whether it was made now.
pub fn admin_token(path: &Path) -> std::io::Result<(String, bool)> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let token = text.trim().to_string();
            if token.len() < 16 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "the admin token file holds no token (remove it to make a new one)",
                ));
            }
            return Ok((token, false));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let token = new_secret(ADMIN_TOKEN_PREFIX);
    let mut file = private_file(path)?;
    file.write_all(format!("{token}\n").as_bytes())?;
    file.sync_all()?;
    Ok((token, true))
}

/// Whether `path` can be read by other users than its owner.
#[cfg(unix)]
pub fn readable_by_others(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o077 != 0)
}

/// Whether `path` can be read by other users than its owner.
#[cfg(not(unix))]
pub fn readable_by_others(_: &Path) -> bool {
    false
}

/// A new file only its owner can read and write; fails if `path` exists.
pub fn private_file(path: &Path) -> std::io::Result<std::fs::File> {
    new_file(path, 0o600)
}

/// A new file with `mode` (on Unix) from its first byte; fails if `path` exists.
fn new_file(path: &Path, mode: u32) -> std::io::Result<std::fs::File> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, mode);
    #[cfg(not(unix))]
    let _ = mode;
    options.open(path)
}

/// Replaces `path` with `bytes`, atomically: a reader sees the old file or the new one,
/// never part of it, and the new one has `mode` (on Unix) from its first byte, so a
/// secret is never readable by others, not even for a moment.
pub fn replace_file(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".new");
    let temp = path.with_file_name(name);
    match std::fs::remove_file(&temp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut file = new_file(&temp, mode)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&temp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens_are_read_whatever_the_schemes_case() {
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::AUTHORIZATION, v.parse().unwrap());
            bearer(&h).map(str::to_string)
        };
        assert_eq!(with("Bearer abc").as_deref(), Some("abc"));
        assert_eq!(with("bearer  abc ").as_deref(), Some("abc"));
        assert_eq!(with("BEARER abc").as_deref(), Some("abc"));
        assert_eq!(with("Basic abc"), None);
        assert_eq!(with("Bearer "), None);
        assert_eq!(with("Bearerabc"), None);
        assert_eq!(bearer(&HeaderMap::new()), None);
    }

    #[test]
    fn replaced_files_are_private_from_the_first_byte_and_leave_no_temp_behind() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.json");
        std::fs::write(&path, "old").unwrap();
        replace_file(&path, b"new", 0o600).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "new");
        assert!(!readable_by_others(&path) || cfg!(not(unix)));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        // A temp file a crash left behind does not stop the next write.
        std::fs::write(dir.path().join("node.json.new"), "junk").unwrap();
        replace_file(&path, b"newer", 0o600).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "newer");
    }

    #[test]
    fn invoke_scopes_admit_their_functions_and_only_admin_keys_reach_the_control_api() {
        let some = Scope::Invoke {
            functions: vec!["echo".into(), "llm".into()],
        };
        assert!(some.allows_invoke("echo") && some.allows_invoke("llm"));
        assert!(!some.allows_invoke("other"));
        assert!(!some.allows_invoke("ech"), "names match whole");
        assert!(!some.allows_admin());
        let any = Scope::Invoke {
            functions: vec![ANY_FUNCTION.into()],
        };
        assert!(any.allows_invoke("anything") && !any.allows_admin());
        assert!(Scope::Admin.allows_invoke("anything") && Scope::Admin.allows_admin());
        assert!(!Scope::Invoke { functions: vec![] }.allows_invoke("echo"));
        assert_eq!(some.to_string(), "invoke echo,llm");
    }

    #[test]
    fn scopes_have_a_tagged_json_form() {
        let json = serde_json::to_value(Scope::Invoke {
            functions: vec!["*".into()],
        })
        .unwrap();
        assert_eq!(
            json,
            serde_json::json!({"kind": "invoke", "functions": ["*"]})
        );
        let admin: Scope = serde_json::from_str(r#"{"kind":"admin"}"#).unwrap();
        assert_eq!(admin, Scope::Admin);
    }

    #[test]
    fn the_admin_token_is_made_once_private_and_then_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(ADMIN_TOKEN_FILE);
        let (token, made) = admin_token(&path).unwrap();
        assert!(made && token.starts_with("ea_"), "{token}");
        assert!(!readable_by_others(&path));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert_eq!(admin_token(&path).unwrap(), (token, false));
        std::fs::write(&path, "\n").unwrap();
        assert!(admin_token(&path).is_err(), "an empty file is not a token");
    }

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
