//! The `[readiness]` section: how Ember decides a new instance is ready (an HTTP GET on
//! a path, or a TCP connect) and how long it may take. Probing itself lives in
//! `crate::readiness`.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::check_duration;

/// Readiness probe of a new instance.
#[derive(utoipa::ToSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Readiness {
    /// HTTP path polled with GET until it answers 2xx; absent: a TCP connect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_path: Option<String>,
    /// How long an instance may take to become ready.
    #[serde(default = "default_start_timeout", with = "humantime_serde")]
    #[schema(value_type = String, example = "30s")]
    pub start_timeout: Duration,
}

fn default_start_timeout() -> Duration {
    Duration::from_secs(120)
}

impl Default for Readiness {
    fn default() -> Self {
        Readiness {
            http_path: None,
            start_timeout: default_start_timeout(),
        }
    }
}

impl Readiness {
    /// Reports every problem in the section, each at its `readiness.` field path.
    pub(super) fn validate(&self, bad: &mut impl FnMut(&str, String)) {
        if let Some(path) = &self.http_path {
            if !path.starts_with('/') {
                bad(
                    "readiness.http_path",
                    format!("`{path}` must start with `/`"),
                );
            }
        }
        check_duration(
            bad,
            "readiness.start_timeout",
            self.start_timeout,
            Duration::from_secs(1),
        );
    }
}

#[cfg(test)]
mod tests {
    use crate::manifest::test_support::{fields, toml};

    #[test]
    fn readiness_paths_start_with_a_slash_and_timeouts_are_bounded() {
        let err = toml(
            "name = \"a\"\nimage = \"e:1\"\n[readiness]\nhttp_path = \"healthz\"\nstart_timeout = \"0s\"",
        )
        .unwrap_err();
        assert_eq!(
            fields(err),
            ["readiness.http_path", "readiness.start_timeout"]
        );
    }
}
