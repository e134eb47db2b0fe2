//! `[[volumes]]`: directories of the node mounted into each instance, so model weights
//! stay on the node's disk instead of in the image.
//!
//! A source is a *name*, never a host path: a node volume (`models`: the directory a node
//! exposes with `--volume models=/srv/models`, else `DATA_DIR/volumes/models` on the node),
//! or a Docker named volume (`docker:hf-cache`). So a manifest cannot mount an arbitrary
//! host path, nor the Docker socket, whoever may deploy. Read-only is the default. Where a
//! node volume must already exist (read-only ones: an empty directory of weights would only
//! fail later) is placement's business; the node creates missing writable ones empty.

use serde::{Deserialize, Serialize};

/// Most volumes one function may mount.
pub const MAX_VOLUMES: usize = 16;

/// Longest volume name.
const MAX_VOLUME_NAME_LEN: usize = 63;

/// Targets that belong to the container runtime, not to a volume.
const RESERVED_TARGETS: &[&str] = &["/proc", "/sys", "/dev"];

/// One mount.
#[derive(utoipa::ToSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Volume {
    /// `NAME` (a node volume) or `docker:NAME` (a Docker named volume).
    pub source: String,
    /// Absolute path inside the container.
    pub target: String,
    /// Whether the container may only read it.
    #[serde(default = "read_only_default")]
    pub read_only: bool,
}

fn read_only_default() -> bool {
    true
}

/// Where a volume's data lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VolumeSource<'a> {
    /// A node volume of this name.
    Node(&'a str),
    /// A Docker named volume of this name.
    Docker(&'a str),
}

impl Volume {
    /// The source, read.
    pub fn source(&self) -> VolumeSource<'_> {
        match self.source.strip_prefix("docker:") {
            Some(name) => VolumeSource::Docker(name),
            None => VolumeSource::Node(&self.source),
        }
    }

    /// The node volume a placement needs the node to have already: a read-only node
    /// volume's name.
    pub fn required_node_volume(&self) -> Option<&str> {
        match self.source() {
            VolumeSource::Node(name) if self.read_only => Some(name),
            _ => None,
        }
    }
}

/// A node volume's name: 1 to 63 of a-z, 0-9, `-`, `_` and `.`, starting with a letter or
/// digit (it names a directory, so no `/` and never `.` or `..`).
pub fn check_volume_name(name: &str) -> Result<(), String> {
    super::check_lower_name("volume", MAX_VOLUME_NAME_LEN, name)
}

/// A Docker named volume's name, as Docker takes it.
fn valid_docker_name(name: &str) -> bool {
    name.len() >= 2
        && name.len() <= 255
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
}

/// Reports every problem of `[[volumes]]`, each at its `volumes[i].FIELD` path.
pub(super) fn validate(volumes: &[Volume], bad: &mut impl FnMut(&str, String)) {
    if volumes.len() > MAX_VOLUMES {
        bad(
            "volumes",
            format!("{} volumes; at most {MAX_VOLUMES}", volumes.len()),
        );
    }
    for (i, v) in volumes.iter().enumerate() {
        let field = |f: &str| format!("volumes[{i}].{f}");
        match v.source() {
            VolumeSource::Node(name) if name.contains('/') || name.contains('\\') => bad(
                &field("source"),
                format!(
                    "`{name}` looks like a host path; a manifest names volumes, never host paths. Expose the directory on the node (`ember agent --volume NAME={name}`, or `ember serve --volume` for the gateway's own node) and write `source = \"NAME\"`"
                ),
            ),
            VolumeSource::Node(name) => {
                if let Err(m) = check_volume_name(name) {
                    bad(&field("source"), m);
                }
            }
            VolumeSource::Docker(name) if !valid_docker_name(name) => bad(
                &field("source"),
                format!("`docker:{name}` does not name a Docker volume (letters, digits, `_`, `.`, `-`; 2 or more)"),
            ),
            VolumeSource::Docker(_) => {}
        }
        if let Err(m) = check_target(&v.target) {
            bad(&field("target"), m);
        }
        if volumes[..i].iter().any(|o| o.target == v.target) {
            bad(&field("target"), format!("`{}` is mounted twice", v.target));
        }
    }
}

fn check_target(target: &str) -> Result<(), String> {
    if !target.starts_with('/') || target == "/" {
        return Err(format!(
            "`{target}` must be an absolute path inside the container, not `/`, e.g. \"/models\""
        ));
    }
    if target
        .split('/')
        .any(|part| part == ".." || part == "." || part.contains(':'))
        || target.contains("//")
        || target.ends_with('/')
    {
        return Err(format!(
            "`{target}` must be a plain absolute path (no `.`, `..`, `:`, empty or trailing parts)"
        ));
    }
    let reserved = RESERVED_TARGETS
        .iter()
        .find(|r| target == **r || target.starts_with(&format!("{r}/")));
    if let Some(r) = reserved {
        return Err(format!(
            "`{target}` is under `{r}`, which the container runtime owns; pick another path (shared memory is `[resources] shm`)"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::test_support::{fields, toml};

    #[test]
    fn volumes_name_node_or_docker_volumes_and_are_read_only_by_default() {
        let m = toml(
            r#"
            name = "a"
            image = "e:1"
            [[volumes]]
            source = "models"
            target = "/models"
            [[volumes]]
            source = "docker:hf-cache"
            target = "/root/.cache"
            read_only = false
            "#,
        )
        .unwrap();
        assert_eq!(m.volumes[0].source(), VolumeSource::Node("models"));
        assert!(m.volumes[0].read_only);
        assert_eq!(m.volumes[0].required_node_volume(), Some("models"));
        assert_eq!(m.volumes[1].source(), VolumeSource::Docker("hf-cache"));
        assert_eq!(m.volumes[1].required_node_volume(), None);
    }

    #[test]
    fn host_paths_the_docker_socket_and_runtime_paths_are_refused() {
        let err = toml(
            r#"
            name = "a"
            image = "e:1"
            [[volumes]]
            source = "/var/run/docker.sock"
            target = "/var/run/docker.sock"
            [[volumes]]
            source = "../etc"
            target = "/proc/x"
            [[volumes]]
            source = "docker:/etc"
            target = "models"
            [[volumes]]
            source = "ok"
            target = "/a/../b"
            "#,
        )
        .unwrap_err();
        let first = err.field_errors()[0].message.clone();
        assert!(first.contains("--volume"), "{first}");
        assert_eq!(
            fields(err),
            [
                "volumes[0].source",
                "volumes[1].source",
                "volumes[1].target",
                "volumes[2].source",
                "volumes[2].target",
                "volumes[3].target"
            ]
        );
    }

    #[test]
    fn a_target_mounted_twice_is_refused() {
        let err = toml(
            "name = \"a\"\nimage = \"e:1\"\n[[volumes]]\nsource = \"a\"\ntarget = \"/m\"\n[[volumes]]\nsource = \"b\"\ntarget = \"/m\"",
        )
        .unwrap_err();
        assert_eq!(fields(err), ["volumes[1].target"]);
    }
}
