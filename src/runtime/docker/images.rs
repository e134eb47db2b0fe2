//! Images on the Docker engine: pull (with progress and a registry login), save and load
//! (how an image reaches a node without a registry).

use std::collections::HashMap;

use bollard::auth::DockerCredentials;
use bollard::query_parameters::{CreateImageOptionsBuilder, ImportImageOptionsBuilder};
use bollard::Docker;
use futures_util::StreamExt;
use tokio::sync::mpsc;

use crate::runtime::{ImageProgress, ImageTar, RegistryAuth, RuntimeError};

/// How long an image call may take. bollard's default (120 s) bounds the wait for the
/// answer's headers, and `docker load` answers only once it has read and unpacked the
/// whole tar: a multi-gigabyte copy takes longer than that.
const IMAGE_CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(6 * 3600);

fn long(docker: &Docker) -> Docker {
    docker.clone().with_timeout(IMAGE_CALL_TIMEOUT)
}

/// The tag a pull must name: a reference without a tag or digest means `latest` (the
/// engine would otherwise pull every tag of the repository).
fn pull_tag(image: &str) -> Option<&'static str> {
    let last = image.rsplit('/').next().unwrap_or(image);
    (!last.contains(':') && !image.contains('@')).then_some("latest")
}

/// Sums the layers' download progress of a pull.
#[derive(Default)]
struct Layers(HashMap<String, (u64, u64)>);

impl Layers {
    fn update(&mut self, id: &str, status: &str, current: Option<i64>, total: Option<i64>) {
        let entry = self.0.entry(id.to_string()).or_default();
        match status {
            "Downloading" => {
                entry.0 = current.unwrap_or(0).max(0) as u64;
                entry.1 = total.unwrap_or(0).max(0) as u64;
            }
            "Verifying Checksum" | "Download complete" | "Extracting" | "Pull complete" => {
                entry.0 = entry.1;
            }
            _ => {}
        }
    }

    fn progress(&self) -> ImageProgress {
        self.0
            .values()
            .fold(ImageProgress::default(), |p, (done, total)| ImageProgress {
                done: p.done + done,
                total: p.total + total,
            })
    }
}

/// Pulls `image`, sending the download's progress whenever a whole percent changes.
pub(in crate::runtime) async fn pull(
    docker: &Docker,
    image: &str,
    auth: Option<&RegistryAuth>,
    progress: mpsc::Sender<ImageProgress>,
) -> Result<(), RuntimeError> {
    let mut options = CreateImageOptionsBuilder::new().from_image(image);
    if let Some(tag) = pull_tag(image) {
        options = options.tag(tag);
    }
    let credentials = auth.map(|a| DockerCredentials {
        username: Some(a.username.clone()),
        password: Some(a.password.clone()),
        serveraddress: Some(a.server.clone()),
        ..Default::default()
    });
    let failed = |reason: String| RuntimeError::Pull {
        image: image.to_string(),
        reason,
    };
    let docker = long(docker);
    let mut stream = docker.create_image(Some(options.build()), None, credentials);
    let (mut layers, mut shown) = (Layers::default(), None);
    while let Some(item) = stream.next().await {
        let info = item.map_err(|e| failed(engine_words(e)))?;
        if let Some(detail) = info.error_detail {
            return Err(failed(detail.message.unwrap_or_default()));
        }
        if let (Some(id), Some(status)) = (&info.id, &info.status) {
            let detail = info.progress_detail.unwrap_or_default();
            layers.update(id, status, detail.current, detail.total);
            let now = layers.progress();
            if now.percent() != shown {
                shown = now.percent();
                // Nobody watching is no reason to stop the pull.
                let _ = progress.try_send(now);
            }
        }
    }
    Ok(())
}

/// The engine's own message, without bollard's framing.
fn engine_words(e: bollard::errors::Error) -> String {
    match e {
        bollard::errors::Error::DockerResponseServerError { message, .. } => message,
        bollard::errors::Error::DockerStreamError { error } => error,
        other => other.to_string(),
    }
}

/// `docker save IMAGE`, streamed, with the image's size.
pub(in crate::runtime) async fn export(
    docker: &Docker,
    image: &str,
) -> Result<(Option<u64>, ImageTar), RuntimeError> {
    let size = match docker.inspect_image(image).await {
        Ok(i) => i.size.map(|s| s.max(0) as u64),
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => return Err(RuntimeError::ImageNotFound(image.to_string())),
        Err(e) => {
            return Err(RuntimeError::Docker {
                op: "image inspect",
                source: e.into(),
            })
        }
    };
    let image = image.to_string();
    let tar = long(docker).export_image(&image).map(move |chunk| {
        chunk.map_err(|e| RuntimeError::Transfer(format!("saving `{image}` failed: {e}")))
    });
    Ok((size, tar.boxed()))
}

/// `docker load`, from a streamed tar.
pub(in crate::runtime) async fn load(docker: &Docker, tar: ImageTar) -> Result<(), RuntimeError> {
    let options = ImportImageOptionsBuilder::new().quiet(true).build();
    let docker = long(docker);
    let mut answers = docker.import_image_stream(options, tar, None);
    while let Some(item) = answers.next().await {
        let info = item.map_err(|e| {
            RuntimeError::Transfer(format!("loading the image failed: {}", engine_words(e)))
        })?;
        if let Some(detail) = info.error_detail {
            return Err(RuntimeError::Transfer(format!(
                "loading the image failed: {}",
                detail.message.unwrap_or_default()
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pull_names_latest_only_when_the_reference_has_no_tag_or_digest() {
        assert_eq!(pull_tag("127.0.0.1:5000/team/sd"), Some("latest"));
        assert_eq!(pull_tag("127.0.0.1:5000/team/sd:1.2"), None);
        assert_eq!(pull_tag("ubuntu@sha256:abc"), None);
    }

    #[test]
    fn progress_sums_the_layers_and_counts_finished_ones_whole() {
        let mut l = Layers::default();
        l.update("a", "Pulling fs layer", None, None);
        l.update("a", "Downloading", Some(50), Some(100));
        l.update("b", "Downloading", Some(0), Some(300));
        assert_eq!(l.progress().percent(), Some(12));
        l.update("a", "Download complete", None, None);
        l.update("b", "Pull complete", None, None);
        assert_eq!(
            l.progress(),
            ImageProgress {
                done: 400,
                total: 400
            }
        );
        assert_eq!(ImageProgress::default().percent(), None);
    }
}
