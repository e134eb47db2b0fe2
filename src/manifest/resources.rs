//! The `[resources]` section: the CPU and memory limits each instance's container gets.

use bytesize::ByteSize;
use serde::{Deserialize, Serialize};

/// Smallest memory limit Docker accepts for a container.
pub const MIN_MEMORY: ByteSize = ByteSize::mib(6);

/// Most CPU cores one instance may ask for.
const MAX_CPUS: f64 = 1024.0;

/// Per-instance limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// CPU cores (fractions allowed).
    #[serde(default = "default_cpus")]
    pub cpus: f64,
    /// Memory limit.
    #[serde(default = "default_memory")]
    pub memory: ByteSize,
}

fn default_cpus() -> f64 {
    1.0
}
fn default_memory() -> ByteSize {
    ByteSize::mib(512)
}

impl Default for Resources {
    fn default() -> Self {
        Resources {
            cpus: default_cpus(),
            memory: default_memory(),
        }
    }
}

impl Resources {
    /// Reports every problem in the section, each at its `resources.` field path.
    pub(super) fn validate(&self, bad: &mut impl FnMut(&str, String)) {
        if !(self.cpus > 0.0 && self.cpus <= MAX_CPUS) {
            bad(
                "resources.cpus",
                format!("{} is not between 0 (excluded) and {MAX_CPUS}", self.cpus),
            );
        }
        if self.memory < MIN_MEMORY {
            bad(
                "resources.memory",
                format!("{} is below Docker's minimum of {MIN_MEMORY}", self.memory),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::manifest::test_support::{fields, toml};

    #[test]
    fn cpus_and_memory_outside_what_docker_takes_are_refused() {
        let err = toml("name = \"a\"\nimage = \"e:1\"\n[resources]\ncpus = 0.0\nmemory = \"1MiB\"")
            .unwrap_err();
        assert_eq!(
            err.field_errors()[0].message,
            "0 is not between 0 (excluded) and 1024"
        );
        assert_eq!(fields(err), ["resources.cpus", "resources.memory"]);
    }
}
