//! `ember deploy PATH`: read a manifest, build its image through the gateway when it has a
//! build context and the image is missing, then deploy it.
//!
//! With `build` and no `image`, the image is named `ember/NAME:HASH` after a hash of the
//! build context, so changed sources make a new image and a new revision, and an unchanged
//! folder deploys as a no-op. The context tar is made deterministic (sorted entries, zero
//! times and owners) for exactly that reason.
//!
//! [`prepare`] does everything but talk to the gateway, and `--dry-run` (dry_run.rs) stops
//! there.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use bytes::Bytes;
use http::Method;
use sha2::{Digest, Sha256};

use crate::client::{encode, ApiClient};
use crate::manifest::{Format, Manifest, ManifestError};

/// A manifest read from disk and made ready to send: what `deploy` sends and what
/// `deploy --dry-run` shows. Both go through here, so a dry run sees exactly what a deploy
/// would send, and the revision id the gateway would give it.
pub struct Prepared {
    /// The manifest file.
    pub file: PathBuf,
    /// The manifest as the gateway receives it: `image` set to the build's tag when it
    /// has `build`, and parsed again from the JSON that is sent, as the gateway does.
    pub manifest: Manifest,
    /// The image to build when the nodes lack it, for a manifest with `build`.
    pub build: Option<Build>,
}

/// A manifest's build: its context, as a deterministic tar, and the tag it makes.
pub struct Build {
    /// The build context folder.
    pub context: PathBuf,
    /// The Dockerfile, relative to the context.
    pub dockerfile: String,
    /// `image` when the manifest names one, else `ember/NAME:HASH` of the context.
    pub tag: String,
    tar: Vec<u8>,
}

/// Reads and validates the manifest at `path` (a file, or a folder holding
/// `ember.toml`), hashing its build context when it has one; needs no gateway.
pub fn prepare(path: &Path) -> anyhow::Result<Prepared> {
    let file = if path.is_dir() {
        path.join("ember.toml")
    } else {
        path.to_path_buf()
    };
    let text = std::fs::read_to_string(&file)
        .with_context(|| format!("cannot read the manifest {}", file.display()))?;
    let mut manifest = Manifest::parse(&text, Format::Toml)
        .map_err(|e| anyhow::anyhow!(render_manifest_error(&file, &e)))?;
    let build = match manifest.build.clone() {
        Some(dir) => {
            // Collecting the components drops inner `.`: `f/./` prints as `f`.
            let context: PathBuf = file
                .parent()
                .unwrap_or(Path::new("."))
                .join(dir)
                .components()
                .collect();
            let build = context_build(&manifest, context, &file)?;
            manifest.image = Some(build.tag.clone());
            Some(build)
        }
        None => None,
    };
    let sent = serde_json::to_string(&manifest)?;
    let manifest = Manifest::parse(&sent, Format::Json)
        .map_err(|e| anyhow::anyhow!(render_manifest_error(&file, &e)))?;
    Ok(Prepared {
        file,
        manifest,
        build,
    })
}

/// Deploys the manifest at `path` (a file, or a folder holding `ember.toml`).
pub async fn deploy(client: &ApiClient, path: &Path) -> anyhow::Result<()> {
    let Prepared {
        manifest, build, ..
    } = prepare(path)?;
    if let Some(build) = build {
        build_if_missing(client, build).await?;
    }
    super::pull::pre_pull(client, &manifest).await?;
    let body = serde_json::to_vec(&manifest)?;
    let answer = client
        .call(
            Method::PUT,
            &format!("/api/v1/functions/{}", manifest.name),
            Some("application/json"),
            body.into(),
        )
        .await?;
    let answer: serde_json::Value = serde_json::from_slice(&answer)?;
    let revision = answer["revision"].as_str().unwrap_or("?");
    let name = &manifest.name;
    match (answer["created"].as_bool(), answer["changed"].as_bool()) {
        (Some(true), _) => println!("deployed {name} (revision {revision}, new function)"),
        (_, Some(false)) => println!("{name} is unchanged (revision {revision})"),
        _ => println!("deployed {name} (revision {revision}); older instances drain"),
    }
    for w in answer["warnings"].as_array().into_iter().flatten() {
        eprintln!("warning: {}", w.as_str().unwrap_or_default());
    }
    println!("invoke it at /fn/{name}/ on the gateway");
    Ok(())
}

fn render_manifest_error(file: &Path, e: &ManifestError) -> String {
    let mut out = format!("{} is not a valid manifest:", file.display());
    for fe in e.field_errors() {
        out.push_str(&format!("\n  {}: {}", fe.field, fe.message));
    }
    out
}

/// The build of `manifest` from `context`: its Dockerfile checked, its context in a tar,
/// its tag.
fn context_build(
    manifest: &Manifest,
    context: PathBuf,
    manifest_file: &Path,
) -> anyhow::Result<Build> {
    let dockerfile = manifest.dockerfile.as_deref().unwrap_or("Dockerfile");
    if !context.join(dockerfile).is_file() {
        bail!(
            "build: the context {} has no {dockerfile}; add one or set `dockerfile`",
            context.display()
        );
    }
    // The manifest itself stays out of the image: editing `env` or `scale` makes a new
    // revision, not a new image.
    let relative = manifest_file
        .canonicalize()
        .ok()
        .zip(context.canonicalize().ok())
        .and_then(|(f, c)| f.strip_prefix(c).ok().map(Path::to_path_buf));
    let tar = build_context_tar(&context, relative.as_deref())?;
    let tag = match &manifest.image {
        Some(image) => image.clone(),
        None => {
            let digest = Sha256::digest(&tar);
            let hash: String = digest[..6].iter().map(|b| format!("{b:02x}")).collect();
            format!("ember/{}:{hash}", manifest.name)
        }
    };
    Ok(Build {
        context,
        dockerfile: dockerfile.to_string(),
        tag,
        tar,
    })
}

async fn build_if_missing(client: &ApiClient, build: Build) -> anyhow::Result<()> {
    let Build {
        context,
        dockerfile,
        tag,
        tar,
    } = build;
    let status = client
        .get_json(&format!("/api/v1/images?tag={}", encode(&tag)))
        .await?;
    if status["exists"].as_bool() == Some(true) {
        return Ok(());
    }
    eprintln!(
        "building {tag} from {} ({} KiB of context)",
        context.display(),
        tar.len() / 1024
    );
    let path = format!(
        "/api/v1/images?tag={}&dockerfile={}",
        encode(&tag),
        encode(&dockerfile)
    );
    let mut done = false;
    super::pull::ndjson_call(client, &path, "application/x-tar", Bytes::from(tar), |v| {
        if let Some(p) = v["progress"].as_str() {
            eprintln!("  | {p}");
            let _ = std::io::stderr().flush();
        } else if let Some(e) = v["error"].as_str() {
            bail!("building {tag} failed: {e}");
        } else if v["done"].as_bool() == Some(true) {
            done = true;
        }
        Ok(())
    })
    .await?;
    if !done {
        bail!("building {tag}: the gateway closed the progress stream before the build finished");
    }
    eprintln!("built {tag}");
    Ok(())
}

/// A deterministic tar of a build context: sorted paths, zero times and owners, `.git`
/// (and `exclude`, a path relative to `dir`) left out, so the same files always give the
/// same bytes.
pub fn build_context_tar(dir: &Path, exclude: Option<&Path>) -> anyhow::Result<Vec<u8>> {
    let mut files = Vec::new();
    collect(dir, dir, &mut files)?;
    files.retain(|f| Some(f.as_path()) != exclude);
    files.sort();
    let mut tar = tar::Builder::new(Vec::new());
    for rel in files {
        let full = dir.join(&rel);
        let meta = std::fs::symlink_metadata(&full)?;
        let mut header = tar::Header::new_gnu();
        header.set_mtime(0);
        header.set_uid(0);
        header.set_gid(0);
        if meta.file_type().is_symlink() {
            header.set_entry_type(tar::EntryType::Symlink);
            header.set_size(0);
            header.set_mode(0o777);
            let target = std::fs::read_link(&full)?;
            tar.append_link(&mut header, &rel, target)?;
        } else {
            let data =
                std::fs::read(&full).with_context(|| format!("cannot read {}", full.display()))?;
            header.set_size(data.len() as u64);
            header.set_mode(file_mode(&meta));
            header.set_entry_type(tar::EntryType::Regular);
            tar.append_data(&mut header, &rel, data.as_slice())?;
        }
    }
    Ok(tar.into_inner()?)
}

#[cfg(unix)]
fn file_mode(meta: &std::fs::Metadata) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    if meta.permissions().mode() & 0o111 != 0 {
        0o755
    } else {
        0o644
    }
}

#[cfg(not(unix))]
fn file_mode(_: &std::fs::Metadata) -> u32 {
    0o644
}

fn collect(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    let entries = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read the build context {}", dir.display()))?;
    for entry in entries {
        let entry = entry?;
        let path = entry.path();
        if entry.file_name() == ".git" {
            continue;
        }
        let kind = entry.file_type()?;
        if kind.is_dir() {
            collect(root, &path, out)?;
        } else {
            out.push(path.strip_prefix(root)?.to_path_buf());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_tars_depend_on_content_only() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("Dockerfile"), "FROM scratch\n").unwrap();
        std::fs::create_dir(dir.path().join("bin")).unwrap();
        std::fs::write(dir.path().join("bin/app"), "x").unwrap();
        let a = build_context_tar(dir.path(), None).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(dir.path().join("bin/app"), "x").unwrap();
        assert_eq!(
            a,
            build_context_tar(dir.path(), None).unwrap(),
            "rewriting the same bytes changes nothing"
        );
        std::fs::write(dir.path().join("bin/app"), "y").unwrap();
        assert_ne!(a, build_context_tar(dir.path(), None).unwrap());
        let before = build_context_tar(dir.path(), None).unwrap();
        std::fs::write(dir.path().join("ember.toml"), "name = \"x\"").unwrap();
        let without = build_context_tar(dir.path(), Some(Path::new("ember.toml"))).unwrap();
        assert!(without == before, "the manifest can be left out");
        std::fs::remove_file(dir.path().join("ember.toml")).unwrap();
        let mut names: Vec<String> = tar::Archive::new(a.as_slice())
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        names.sort();
        assert_eq!(names, ["Dockerfile", "bin/app"]);
    }
}
