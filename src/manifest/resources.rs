//! The `[resources]` section: what each instance's container gets: CPU and memory limits,
//! and what GPU servers need beyond Docker's defaults: a larger `/dev/shm` (PyTorch's
//! data loaders and NCCL use it), a process limit, and ulimits (`memlock` for pinned
//! memory, `nofile` for servers with many connections).
//!
//! The hardening defaults stay whatever is set here: no capabilities, no new privileges,
//! not privileged. `shm` and `ulimits` relax only what they name, inside the container's
//! own cgroup (shared memory counts against `memory`).

use std::collections::BTreeMap;
use std::fmt;

use bytesize::ByteSize;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::{Deserialize, Serialize};

/// Smallest memory limit Docker accepts for a container.
pub const MIN_MEMORY: ByteSize = ByteSize::mib(6);

/// Largest memory limit: beyond any machine, and inside the signed 64-bit byte count Docker
/// takes (a larger one wraps, to -1 for 16 EiB, which Docker reads as no limit at all).
pub const MAX_MEMORY: ByteSize = ByteSize::tib(64);

/// Fewest CPU cores one instance may ask for: Docker's smallest CPU limit. Below it the
/// limit rounds to 0 nano-CPUs, which Docker reads as no limit at all.
const MIN_CPUS: f64 = 0.01;
/// Most CPU cores one instance may ask for.
const MAX_CPUS: f64 = 1024.0;

/// Docker's `/dev/shm` when `shm` is not set.
pub const DEFAULT_SHM: ByteSize = ByteSize::mib(64);

/// Bounds of `shm`.
const MIN_SHM: ByteSize = ByteSize::mib(1);
const MAX_SHM: ByteSize = ByteSize::tib(1);

/// Process limit when `pids` is not set: generous for thread-per-connection servers and
/// data loaders, still a cap on fork bombs.
pub const DEFAULT_PIDS: i64 = 4096;

/// Bounds of `pids`.
const MIN_PIDS: i64 = 16;
const MAX_PIDS: i64 = 4_194_304;

/// The ulimits Docker takes, by name.
pub const ULIMIT_NAMES: &[&str] = &[
    "core",
    "cpu",
    "data",
    "fsize",
    "locks",
    "memlock",
    "msgqueue",
    "nice",
    "nofile",
    "nproc",
    "rss",
    "rtprio",
    "rttime",
    "sigpending",
    "stack",
];

/// Per-instance limits.
#[derive(utoipa::ToSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// CPU cores (fractions allowed).
    #[serde(default = "default_cpus")]
    pub cpus: f64,
    /// Memory limit.
    #[serde(default = "default_memory", serialize_with = "super::size::serialize")]
    #[schema(value_type = String, example = "64MiB")]
    pub memory: ByteSize,
    /// Size of `/dev/shm`; absent: Docker's 64 MiB.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "super::size::serialize_opt"
    )]
    #[schema(value_type = Option<String>, example = "64MiB")]
    pub shm: Option<ByteSize>,
    /// Process (and thread) limit; absent: 4096.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids: Option<i64>,
    /// Ulimits by name (`memlock = -1`, `nofile = { soft = 65536, hard = 65536 }`); -1 is
    /// unlimited.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub ulimits: BTreeMap<String, Ulimit>,
}

/// One ulimit: a soft and a hard limit (-1: unlimited). A bare number sets both.
#[derive(utoipa::ToSchema, Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Ulimit {
    /// The soft limit.
    pub soft: i64,
    /// The hard limit.
    pub hard: i64,
}

impl<'de> Deserialize<'de> for Ulimit {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(UlimitVisitor)
    }
}

struct UlimitVisitor;

impl<'de> Visitor<'de> for UlimitVisitor {
    type Value = Ulimit;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a number (-1: unlimited), or { soft = N, hard = N }")
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Ulimit, E> {
        Ok(Ulimit { soft: v, hard: v })
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Ulimit, E> {
        let v = i64::try_from(v).map_err(|_| E::custom("too large"))?;
        Ok(Ulimit { soft: v, hard: v })
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Ulimit, A::Error> {
        let (mut soft, mut hard) = (None, None);
        while let Some(key) = map.next_key::<String>()? {
            match key.as_str() {
                "soft" => soft = Some(map.next_value::<i64>()?),
                "hard" => hard = Some(map.next_value::<i64>()?),
                other => {
                    return Err(de::Error::custom(format!(
                        "unknown key `{other}`: expected soft and hard"
                    )))
                }
            }
        }
        match (soft, hard) {
            (Some(soft), Some(hard)) => Ok(Ulimit { soft, hard }),
            _ => Err(de::Error::custom(
                "expected both `soft` and `hard`, or a bare number for both",
            )),
        }
    }
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
            shm: None,
            pids: None,
            ulimits: BTreeMap::new(),
        }
    }
}

impl Resources {
    /// Reports every problem in the section, each at its `resources.` field path.
    pub(super) fn validate(&self, bad: &mut impl FnMut(&str, String)) {
        if !(MIN_CPUS..=MAX_CPUS).contains(&self.cpus) {
            bad(
                "resources.cpus",
                format!("{} is not between {MIN_CPUS} and {MAX_CPUS}", self.cpus),
            );
        }
        if self.memory < MIN_MEMORY {
            bad(
                "resources.memory",
                format!("{} is below Docker's minimum of {MIN_MEMORY}", self.memory),
            );
        } else if self.memory > MAX_MEMORY {
            bad(
                "resources.memory",
                format!("{} is above the most allowed, {MAX_MEMORY}", self.memory),
            );
        }
        if let Some(shm) = self.shm {
            if !(MIN_SHM..=MAX_SHM).contains(&shm) {
                bad(
                    "resources.shm",
                    format!("{shm} is not between {MIN_SHM} and {MAX_SHM}"),
                );
            }
        }
        if let Some(pids) = self.pids {
            if !(MIN_PIDS..=MAX_PIDS).contains(&pids) {
                bad(
                    "resources.pids",
                    format!("{pids} is not between {MIN_PIDS} and {MAX_PIDS}"),
                );
            }
        }
        for (name, limit) in &self.ulimits {
            let field = format!("resources.ulimits.{name}");
            if !ULIMIT_NAMES.contains(&name.as_str()) {
                bad(
                    &field,
                    format!("not a ulimit; expected one of {}", ULIMIT_NAMES.join(", ")),
                );
            } else if limit.soft < -1 || limit.hard < -1 {
                bad(&field, "limits are -1 (unlimited) or more".into());
            } else if limit.hard != -1 && (limit.soft == -1 || limit.soft > limit.hard) {
                bad(
                    &field,
                    format!("soft ({}) is above hard ({})", limit.soft, limit.hard),
                );
            }
        }
    }

    /// `/dev/shm`'s size.
    pub fn shm(&self) -> ByteSize {
        self.shm.unwrap_or(DEFAULT_SHM)
    }

    /// The process limit.
    pub fn pids(&self) -> i64 {
        self.pids.unwrap_or(DEFAULT_PIDS)
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
            "0 is not between 0.01 and 1024"
        );
        assert_eq!(fields(err), ["resources.cpus", "resources.memory"]);
    }

    /// Found by tests/fuzz_manifest.rs: both were accepted and reached Docker as "no
    /// limit": 1e-10 CPUs as 0 nano-CPUs, 16 EiB of memory as -1 bytes.
    #[test]
    fn limits_docker_would_read_as_none_are_refused() {
        for resources in [
            "cpus = 1e-10",
            "cpus = 0.009",
            "memory = \"18446744073709551615B\"",
            "memory = \"16EiB\"",
            "memory = \"65TiB\"",
        ] {
            let err = toml(&format!(
                "name = \"a\"\nimage = \"e:1\"\n[resources]\n{resources}"
            ))
            .expect_err(resources);
            assert!(fields(err)[0].starts_with("resources."), "{resources}");
        }
        toml("name = \"a\"\nimage = \"e:1\"\n[resources]\ncpus = 0.01\nmemory = \"64TiB\"")
            .unwrap();
    }

    #[test]
    fn shm_pids_and_ulimits_parse_and_default_to_dockers() {
        let m = toml(
            "name = \"a\"\nimage = \"e:1\"\n[resources]\nshm = \"8GiB\"\npids = 8192\nulimits = { memlock = -1, nofile = { soft = 1024, hard = 65536 } }",
        )
        .unwrap();
        assert_eq!(m.resources.shm(), bytesize::ByteSize::gib(8));
        assert_eq!(m.resources.pids(), 8192);
        assert_eq!(m.resources.ulimits["memlock"].hard, -1);
        assert_eq!(m.resources.ulimits["nofile"].soft, 1024);
        let plain = toml("name = \"a\"\nimage = \"e:1\"").unwrap();
        assert_eq!(plain.resources.shm(), super::DEFAULT_SHM);
        assert_eq!(plain.resources.pids(), super::DEFAULT_PIDS);
    }

    #[test]
    fn bad_shm_pids_and_ulimits_name_their_field() {
        let err = toml(
            "name = \"a\"\nimage = \"e:1\"\n[resources]\nshm = \"1KiB\"\npids = 1\nulimits = { memlok = 1, nofile = { soft = 9, hard = 8 }, stack = -2 }",
        )
        .unwrap_err();
        assert_eq!(
            fields(err),
            [
                "resources.shm",
                "resources.pids",
                "resources.ulimits.memlok",
                "resources.ulimits.nofile",
                "resources.ulimits.stack"
            ]
        );
        let err =
            toml("name = \"a\"\nimage = \"e:1\"\n[resources]\nulimits = { nofile = { soft = 1 } }")
                .unwrap_err();
        assert_eq!(fields(err), ["resources.ulimits.nofile"]);
    }
}
