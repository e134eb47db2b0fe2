//! The `[queue]` and `[request]` sections: the path of one request through the gateway,
//! first the buffer it waits in while no instance is free, then the limits on the request
//! itself (time to first byte, body size).

use std::time::Duration;

use bytesize::ByteSize;
use serde::{Deserialize, Serialize};

use super::check_duration;

/// Most requests one function may buffer while it is cold or saturated.
pub const MAX_QUEUE_CAPACITY: u32 = 1_000_000;
/// Largest request body a function may accept.
pub const MAX_BODY_LIMIT: ByteSize = ByteSize::gib(4);

/// The per-function request buffer.
#[derive(utoipa::ToSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[schema(as = QueueSettings)]
pub struct Queue {
    /// Requests buffered at most; one more answers 503.
    #[serde(default = "default_queue_capacity")]
    pub capacity: u32,
    /// How long a request may wait for an instance before it answers 504.
    #[serde(default = "default_queue_timeout", with = "humantime_serde")]
    #[schema(value_type = String, example = "30s")]
    pub timeout: Duration,
}

/// Per-request limits.
#[derive(utoipa::ToSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestLimits {
    /// How long the function may take to start answering a request.
    #[serde(default = "default_request_timeout", with = "humantime_serde")]
    #[schema(value_type = String, example = "30s")]
    pub timeout: Duration,
    /// Largest request body; a larger one answers 413.
    #[serde(
        default = "default_max_body",
        serialize_with = "super::size::serialize"
    )]
    #[schema(value_type = String, example = "64MiB")]
    pub max_body: ByteSize,
}

fn default_queue_capacity() -> u32 {
    1000
}
fn default_queue_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_request_timeout() -> Duration {
    Duration::from_secs(300)
}
fn default_max_body() -> ByteSize {
    ByteSize::mib(32)
}

impl Default for Queue {
    fn default() -> Self {
        Queue {
            capacity: default_queue_capacity(),
            timeout: default_queue_timeout(),
        }
    }
}

impl Default for RequestLimits {
    fn default() -> Self {
        RequestLimits {
            timeout: default_request_timeout(),
            max_body: default_max_body(),
        }
    }
}

impl Queue {
    /// Reports every problem in the section, each at its `queue.` field path.
    pub(super) fn validate(&self, bad: &mut impl FnMut(&str, String)) {
        if self.capacity == 0 || self.capacity > MAX_QUEUE_CAPACITY {
            bad(
                "queue.capacity",
                format!("must be between 1 and {MAX_QUEUE_CAPACITY}"),
            );
        }
        check_duration(
            bad,
            "queue.timeout",
            self.timeout,
            Duration::from_millis(100),
        );
    }
}

impl RequestLimits {
    /// Reports every problem in the section, each at its `request.` field path.
    pub(super) fn validate(&self, bad: &mut impl FnMut(&str, String)) {
        check_duration(bad, "request.timeout", self.timeout, Duration::from_secs(1));
        if self.max_body > MAX_BODY_LIMIT {
            bad(
                "request.max_body",
                format!("must be at most {MAX_BODY_LIMIT}"),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::manifest::test_support::{fields, toml};

    #[test]
    fn queue_and_request_limits_are_bounded() {
        let err = toml(
            "name = \"a\"\nimage = \"e:1\"\n[queue]\ncapacity = 0\ntimeout = \"10ms\"\n[request]\ntimeout = \"2d\"\nmax_body = \"5GiB\"",
        )
        .unwrap_err();
        assert_eq!(
            fields(err),
            [
                "queue.capacity",
                "queue.timeout",
                "request.timeout",
                "request.max_body"
            ]
        );
    }
}
