//! The terms of images that the layers above the runtime use: a registry login
//! (`RegistryAuth`), a pull's or copy's progress (`ImageProgress`), and which registry an
//! image reference names (`registry_host`). Docker's side is docker/images.rs.

use serde::{Deserialize, Serialize};

/// Docker Hub's name, for images that name no registry.
pub const DOCKER_HUB: &str = "docker.io";

/// A registry login. `Debug` hides the password.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct RegistryAuth {
    /// The registry (`HOST[:PORT]`, `docker.io` for Docker Hub).
    pub server: String,
    /// User name.
    pub username: String,
    /// Password or access token.
    pub password: String,
}

impl std::fmt::Debug for RegistryAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryAuth")
            .field("server", &self.server)
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// How far an image's pull or copy has got, in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageProgress {
    /// Bytes done.
    pub done: u64,
    /// Bytes in all, as far as known (0: not known yet).
    pub total: u64,
}

impl ImageProgress {
    /// Whole percent done, once the total is known. In u128: an agent's counts may be
    /// anything a u64 holds, and `done * 100` must not overflow.
    pub fn percent(&self) -> Option<u8> {
        let (done, total) = (u128::from(self.done), u128::from(self.total));
        (total > 0).then(|| (done.min(total) * 100 / total) as u8)
    }
}

/// The registry an image reference names: its first part when that looks like a host
/// (has a dot or a port, or is `localhost`), else Docker Hub.
pub fn registry_host(image: &str) -> &str {
    match image.split_once('/') {
        Some((first, _)) if first.contains(['.', ':']) || first == "localhost" => {
            if matches!(first, "index.docker.io" | "registry-1.docker.io") {
                DOCKER_HUB
            } else {
                first
            }
        }
        _ => DOCKER_HUB,
    }
}

/// Whether an image reference names its registry (and so is meant to be pulled).
pub fn names_registry(image: &str) -> bool {
    image
        .split_once('/')
        .is_some_and(|(first, _)| first.contains(['.', ':']) || first == "localhost")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_registry_is_the_first_part_when_it_looks_like_a_host() {
        assert_eq!(
            registry_host("127.0.0.1:5000/team/sd:1.2"),
            "127.0.0.1:5000"
        );
        assert_eq!(registry_host("ghcr.io/org/img"), "ghcr.io");
        assert_eq!(registry_host("localhost/img"), "localhost");
        assert_eq!(registry_host("vllm/vllm-openai:latest"), DOCKER_HUB);
        assert_eq!(registry_host("ubuntu"), DOCKER_HUB);
        assert_eq!(registry_host("index.docker.io/library/ubuntu"), DOCKER_HUB);
        assert!(names_registry("127.0.0.1:5000/x"));
        assert!(!names_registry("ember/echo:abc"));
    }

    /// Found by tests/fuzz_wire.rs: `{"progress":{"done":u64::MAX,"total":u64::MAX}}` from
    /// an agent overflowed `done * 100`.
    #[test]
    fn progress_near_the_limits_of_u64_is_still_a_percentage() {
        let p = |done, total| ImageProgress { done, total }.percent();
        assert_eq!(p(u64::MAX, u64::MAX), Some(100));
        assert_eq!(p(u64::MAX / 2, u64::MAX), Some(49));
        assert_eq!(p(u64::MAX, 1), Some(100));
    }

    #[test]
    fn a_login_never_prints_its_password() {
        let auth = RegistryAuth {
            server: "r".into(),
            username: "u".into(),
            password: "hunter2".into(),
        };
        assert!(!format!("{auth:?}").contains("hunter2"));
    }
}
