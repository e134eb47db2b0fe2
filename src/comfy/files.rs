//! The bytes the gateway keeps for ComfyUI functions: uploads and prompts' outputs, as
//! content-addressed blobs under `DATA_DIR/comfy/blobs/` (the SHA-256 of the bytes, in
//! hex, is the file's name), with their names in the store (`store::FileRecord`). One
//! upload sent twice, or one output in two prompts, is one blob.
//!
//! Names follow ComfyUI's rules: `subfolder` and `filename` may not climb out (`..`,
//! absolute paths), and an upload whose name is taken by different bytes becomes
//! `name (1).ext`, `name (2).ext`… unless the client asked to overwrite.

use std::collections::HashSet;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use sha2::{Digest, Sha256};

/// A blob younger than this is never collected: its record may not be written yet.
const BLOB_GRACE: Duration = Duration::from_secs(600);

/// Why a file name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// Empty or unusable (ComfyUI answers 400).
    #[error("{0}")]
    Bad(String),
    /// It would leave its directory (ComfyUI answers 403).
    #[error("{0}")]
    Escapes(String),
}

/// Checks a `subfolder` (`a/b` allowed) and a `filename` (no directories).
pub fn check_name(subfolder: &str, filename: &str) -> Result<(), NameError> {
    if filename.is_empty() {
        return Err(NameError::Bad("the file has no name".into()));
    }
    if filename.chars().any(char::is_control) || subfolder.chars().any(char::is_control) {
        return Err(NameError::Bad(
            "the file's name has control characters".into(),
        ));
    }
    let climbs = |s: &str| {
        s.starts_with('/')
            || s.contains('\\')
            || s.split('/').any(|part| part == "..")
            || s.contains(':')
    };
    if climbs(subfolder) || climbs(filename) || filename.contains('/') || filename == "." {
        return Err(NameError::Escapes(format!(
            "`{subfolder}/{filename}` leaves its folder: names may not hold `..`, `\\`, `:` or \
             start with `/`"
        )));
    }
    Ok(())
}

/// `name (n).ext` for the n-th clash.
pub fn renamed(filename: &str, n: u32) -> String {
    match filename.rsplit_once('.') {
        Some((stem, ext)) if !stem.is_empty() => format!("{stem} ({n}).{ext}"),
        _ => format!("{filename} ({n})"),
    }
}

/// The blob directory.
#[derive(Debug, Clone)]
pub struct Blobs {
    dir: PathBuf,
}

/// The SHA-256 of `bytes`, in hex.
pub fn hash(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl Blobs {
    /// The blobs under `data_dir/comfy/blobs`, made if missing.
    pub fn open(data_dir: &Path) -> io::Result<Blobs> {
        let dir = data_dir.join("comfy").join("blobs");
        std::fs::create_dir_all(&dir)?;
        Ok(Blobs { dir })
    }

    fn path(&self, hash: &str) -> io::Result<PathBuf> {
        if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a blob hash",
            ));
        }
        Ok(self.dir.join(hash))
    }

    /// Keeps `bytes`; returns their hash.
    pub async fn put(&self, bytes: Bytes) -> io::Result<String> {
        let digest = hash(&bytes);
        let path = self.path(&digest)?;
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || -> io::Result<()> {
            if path.exists() {
                // Touch it, so a collection racing this write keeps it.
                return std::fs::File::options()
                    .append(true)
                    .open(&path)?
                    .set_modified(SystemTime::now());
            }
            let tmp = dir.join(format!(".{}.tmp", uuid::Uuid::new_v4().simple()));
            std::fs::write(&tmp, &bytes)?;
            std::fs::rename(&tmp, &path)
        })
        .await
        .map_err(io::Error::other)??;
        Ok(digest)
    }

    /// The bytes of a blob.
    pub async fn read(&self, hash: &str) -> io::Result<Bytes> {
        let path = self.path(hash)?;
        Ok(Bytes::from(tokio::fs::read(path).await?))
    }

    /// Removes every blob not in `keep` (and older than a grace period); returns how many
    /// bytes went.
    pub async fn collect(&self, keep: HashSet<String>) -> io::Result<u64> {
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || -> io::Result<u64> {
            let mut freed = 0;
            let now = SystemTime::now();
            for entry in std::fs::read_dir(&dir)? {
                let entry = entry?;
                let name = entry.file_name().to_string_lossy().into_owned();
                let meta = entry.metadata()?;
                let age = now
                    .duration_since(meta.modified()?)
                    .unwrap_or(Duration::ZERO);
                if keep.contains(&name) || age < BLOB_GRACE {
                    continue;
                }
                std::fs::remove_file(entry.path())?;
                freed += meta.len();
            }
            Ok(freed)
        })
        .await
        .map_err(io::Error::other)?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_may_not_climb_out_and_clashes_are_numbered_as_comfyui_does() {
        assert!(check_name("", "a.png").is_ok());
        assert!(check_name("x/y", "a b.png").is_ok());
        for (sub, name) in [
            ("..", "a"),
            ("x/../..", "a"),
            ("/etc", "a"),
            ("", "../a"),
            ("", "a/b"),
            ("c:", "a"),
        ] {
            assert!(
                matches!(check_name(sub, name), Err(NameError::Escapes(_))),
                "{sub} {name}"
            );
        }
        assert!(matches!(check_name("", ""), Err(NameError::Bad(_))));
        assert_eq!(renamed("cat.png", 1), "cat (1).png");
        assert_eq!(renamed("cat", 2), "cat (2)");
        assert_eq!(renamed(".hidden", 1), ".hidden (1)");
    }

    #[tokio::test]
    async fn the_same_bytes_are_one_blob_and_unknown_hashes_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = Blobs::open(dir.path()).unwrap();
        let a = blobs.put(Bytes::from_static(b"png")).await.unwrap();
        let b = blobs.put(Bytes::from_static(b"png")).await.unwrap();
        assert_eq!(a, b);
        assert_eq!(&blobs.read(&a).await.unwrap()[..], b"png");
        assert!(blobs.read("../../etc/passwd").await.is_err());
        // Young blobs survive a collection that keeps nothing.
        assert_eq!(blobs.collect(HashSet::new()).await.unwrap(), 0);
        assert!(blobs.read(&a).await.is_ok());
    }
}
