//! Node volumes: the directories a node lends to instances by name, so model weights stay
//! on the node's disk. A node's volumes are the directories its operator exposes
//! (`--volume models=/srv/models`) and the directories under its own `DATA_DIR/volumes/`.
//! A manifest names them (`source = "models"`); it can never name a host path.
//!
//! This module resolves a name to a directory for a mount (a missing writable one is made
//! empty under `DATA_DIR/volumes`; a read-only one must exist), lists volumes with their
//! size on disk, and writes files into them (`ember cp`) without ever leaving the volume:
//! paths are plain relative paths, the parent directory is checked to resolve inside the
//! volume (a container could have planted a symlink), and the file is written to a
//! temporary name and renamed into place.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::manifest::check_volume_name;

/// Where a node's own volumes live, under its data dir.
pub const VOLUMES_DIR: &str = "volumes";

/// Longest path inside a volume `ember cp` writes to.
const MAX_PATH_LEN: usize = 1024;

/// A node's volumes.
#[derive(Debug, Clone, Default)]
pub struct NodeVolumes {
    /// `DATA_DIR/volumes`, when the node has a data dir.
    root: Option<PathBuf>,
    /// Directories the operator exposes, by name.
    exposed: BTreeMap<String, PathBuf>,
}

/// A volume as listed.
#[derive(utoipa::ToSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VolumeInfo {
    /// Its name.
    pub name: String,
    /// Whether the operator exposes it (`--volume`), rather than it living under the data dir.
    pub exposed: bool,
    /// Where it is on the node.
    pub path: String,
    /// Bytes of its files (symlinks not followed).
    pub bytes: u64,
    /// Its files.
    pub files: u64,
}

/// Why a volume could not be used.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// A read-only volume the node does not have.
    #[error("node volume `{0}` is not on this node: expose a directory with `--volume {0}=PATH`, or copy files into it with `ember cp FILE NODE:{0}/PATH`")]
    Missing(String),
    /// The path inside a volume is not a plain relative path, or leaves the volume.
    #[error("`{0}` is not a plain relative path inside the volume (no `..`, no leading `/`)")]
    BadPath(String),
    /// The volume name is not one.
    #[error("{0}")]
    BadName(String),
    /// The file system failed.
    #[error("volume `{volume}`: {source}")]
    Io {
        /// The volume.
        volume: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// Parses `NAME=PATH` (the `--volume` flag): a volume name and an existing directory.
pub fn parse_exposed(s: &str) -> Result<(String, PathBuf), String> {
    let Some((name, path)) = s.split_once('=') else {
        return Err(format!("`{s}` is not NAME=PATH, e.g. models=/srv/models"));
    };
    check_volume_name(name)?;
    let path = PathBuf::from(path);
    if !path.is_absolute() {
        return Err(format!("`{}` is not an absolute path", path.display()));
    }
    if !path.is_dir() {
        return Err(format!(
            "`{}` is not a directory on this machine (a volume is a directory; create it first)",
            path.display()
        ));
    }
    Ok((name.to_string(), path))
}

impl NodeVolumes {
    /// Volumes under `data_dir/volumes`, and the `exposed` directories.
    pub fn new(data_dir: &Path, exposed: impl IntoIterator<Item = (String, PathBuf)>) -> Self {
        NodeVolumes {
            root: Some(data_dir.join(VOLUMES_DIR)),
            exposed: exposed.into_iter().collect(),
        }
    }

    /// The directory of volume `name`, whether or not it exists.
    fn dir(&self, name: &str) -> Option<PathBuf> {
        self.exposed
            .get(name)
            .cloned()
            .or_else(|| self.root.as_ref().map(|r| r.join(name)))
    }

    /// The names of the volumes the node has (blocking: reads the data dir).
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.exposed.keys().cloned().collect();
        let own = self
            .root
            .as_ref()
            .and_then(|r| std::fs::read_dir(r).ok())
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| check_volume_name(n).is_ok());
        for name in own {
            if !names.contains(&name) {
                names.push(name);
            }
        }
        names.sort();
        names
    }

    /// Every volume with its size on disk (blocking: walks each tree).
    pub fn list(&self) -> Vec<VolumeInfo> {
        self.names()
            .into_iter()
            .filter_map(|name| {
                let dir = self.dir(&name)?;
                let (bytes, files) = usage(&dir);
                Some(VolumeInfo {
                    exposed: self.exposed.contains_key(&name),
                    path: dir.display().to_string(),
                    name,
                    bytes,
                    files,
                })
            })
            .collect()
    }

    /// The directory to mount for volume `name` (blocking): it must exist when read-only;
    /// a missing writable one is made empty under the data dir.
    pub fn mount_dir(&self, name: &str, read_only: bool) -> Result<PathBuf, VolumeError> {
        check_volume_name(name).map_err(VolumeError::BadName)?;
        let dir = self
            .dir(name)
            .ok_or_else(|| VolumeError::Missing(name.to_string()))?;
        if dir.is_dir() {
            return Ok(dir);
        }
        if read_only || self.exposed.contains_key(name) {
            return Err(VolumeError::Missing(name.to_string()));
        }
        std::fs::create_dir_all(&dir).map_err(|source| VolumeError::Io {
            volume: name.to_string(),
            source,
        })?;
        Ok(dir)
    }

    /// Where a file at `path` inside volume `name` goes, its parent directories made
    /// (blocking). The volume itself is made when missing (under the data dir).
    pub fn file_target(&self, name: &str, path: &str) -> Result<PathBuf, VolumeError> {
        let relative = plain_relative(path)?;
        let dir = self.mount_dir(name, false)?;
        let io = |source| VolumeError::Io {
            volume: name.to_string(),
            source,
        };
        let target = dir.join(&relative);
        let parent = target.parent().unwrap_or(&dir).to_path_buf();
        std::fs::create_dir_all(&parent).map_err(io)?;
        let (root, parent) = (
            dir.canonicalize().map_err(io)?,
            parent.canonicalize().map_err(io)?,
        );
        if !parent.starts_with(&root) {
            return Err(VolumeError::BadPath(path.to_string()));
        }
        let file_name = target
            .file_name()
            .ok_or_else(|| VolumeError::BadPath(path.to_string()))?;
        Ok(parent.join(file_name))
    }
}

/// Streams `body` into `target` (in volume `volume`): to a temporary file beside it, then
/// renamed into place, so a reader never sees half a file and a failed upload leaves
/// nothing behind. Returns the bytes written.
pub async fn write_file(
    volume: &str,
    target: &Path,
    body: axum::body::Body,
) -> Result<u64, VolumeError> {
    use futures_util::StreamExt;
    use tokio::io::AsyncWriteExt;
    let io = |source| VolumeError::Io {
        volume: volume.to_string(),
        source,
    };
    let name = target.file_name().unwrap_or_default().to_string_lossy();
    let temp = target.with_file_name(format!(".{name}.{}.upload", crate::model::short_id()));
    let written = async {
        let mut file = tokio::fs::File::create(&temp).await?;
        let mut stream = body.into_data_stream();
        let mut written = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(std::io::Error::other)?;
            file.write_all(&chunk).await?;
            written += chunk.len() as u64;
        }
        file.sync_all().await?;
        tokio::fs::rename(&temp, target).await?;
        Ok::<_, std::io::Error>(written)
    }
    .await;
    if written.is_err() {
        let _ = tokio::fs::remove_file(&temp).await;
    }
    written.map_err(io)
}

/// `path` as a plain relative path: normal components only.
fn plain_relative(path: &str) -> Result<PathBuf, VolumeError> {
    let bad = || VolumeError::BadPath(path.to_string());
    if path.is_empty() || path.len() > MAX_PATH_LEN || path.contains('\0') {
        return Err(bad());
    }
    // Checked on the text: `Path::components` would quietly drop `.` and doubled `/`.
    let plain = path
        .split('/')
        .all(|part| !part.is_empty() && part != "." && part != ".." && !part.contains('\\'));
    let p = Path::new(path);
    if !plain || !p.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(bad());
    }
    Ok(p.to_path_buf())
}

/// Bytes and files under `dir`, symlinks not followed.
fn usage(dir: &Path) -> (u64, u64) {
    let (mut bytes, mut files) = (0, 0);
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(meta) = entry.metadata() else {
                continue;
            };
            if meta.is_dir() {
                todo.push(entry.path());
            } else if meta.is_file() {
                bytes += meta.len();
                files += 1;
            }
        }
    }
    (bytes, files)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn volumes(dir: &Path) -> (NodeVolumes, PathBuf) {
        let exposed = dir.join("srv-models");
        std::fs::create_dir_all(exposed.join("llama")).unwrap();
        std::fs::write(exposed.join("llama/weights.bin"), vec![7u8; 1000]).unwrap();
        let data = dir.join("data");
        std::fs::create_dir_all(data.join(VOLUMES_DIR).join("outputs")).unwrap();
        (
            NodeVolumes::new(&data, [("models".to_string(), exposed.clone())]),
            exposed,
        )
    }

    #[test]
    fn a_node_has_its_exposed_and_its_own_volumes_with_their_sizes() {
        let tmp = tempfile::tempdir().unwrap();
        let (v, exposed) = volumes(tmp.path());
        assert_eq!(v.names(), ["models", "outputs"]);
        let list = v.list();
        assert_eq!(
            (list[0].bytes, list[0].files, list[0].exposed),
            (1000, 1, true)
        );
        assert_eq!(list[0].path, exposed.display().to_string());
        assert_eq!((list[1].bytes, list[1].exposed), (0, false));
    }

    #[test]
    fn read_only_volumes_must_exist_and_writable_ones_are_made() {
        let tmp = tempfile::tempdir().unwrap();
        let (v, exposed) = volumes(tmp.path());
        assert_eq!(v.mount_dir("models", true).unwrap(), exposed);
        assert!(matches!(
            v.mount_dir("weights", true),
            Err(VolumeError::Missing(_))
        ));
        let made = v.mount_dir("cache", false).unwrap();
        assert!(made.is_dir() && made.ends_with("volumes/cache"));
        assert!(v.names().contains(&"cache".to_string()));
        assert!(matches!(
            v.mount_dir("../etc", false),
            Err(VolumeError::BadName(_))
        ));
    }

    #[test]
    fn files_land_inside_their_volume_and_never_outside() {
        let tmp = tempfile::tempdir().unwrap();
        let (v, exposed) = volumes(tmp.path());
        let t = v.file_target("models", "sd/v1.safetensors").unwrap();
        assert_eq!(t, exposed.canonicalize().unwrap().join("sd/v1.safetensors"));
        for bad in ["../x", "/etc/passwd", "a/../../x", "", "a/./b"] {
            assert!(
                matches!(v.file_target("models", bad), Err(VolumeError::BadPath(_))),
                "{bad}"
            );
        }
        // A symlink a container planted does not lead out of the volume.
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(tmp.path(), exposed.join("escape")).unwrap();
            assert!(matches!(
                v.file_target("models", "escape/pwned"),
                Err(VolumeError::BadPath(_))
            ));
        }
    }

    #[test]
    fn exposed_volumes_are_existing_directories_by_name() {
        let tmp = tempfile::tempdir().unwrap();
        let ok = format!("models={}", tmp.path().display());
        assert_eq!(parse_exposed(&ok).unwrap().0, "models");
        assert!(parse_exposed("models").is_err());
        assert!(parse_exposed("models=relative/dir").is_err());
        assert!(parse_exposed(&format!("Bad Name={}", tmp.path().display())).is_err());
        let file = tmp.path().join("docker.sock");
        std::fs::write(&file, "").unwrap();
        assert!(parse_exposed(&format!("sock={}", file.display())).is_err());
    }
}
