//! Images on nodes: a start creates its container at once, and only when the node says
//! the image is missing is it made present there (a start that finds its image, the usual
//! one, costs the engine no image lookup):
//!
//! - An image that names its registry (`HOST/team/sd:1.2`) is pulled there, with the
//!   registry's login when `ember registry login HOST` stored one; if the pull fails and
//!   another node has the image, it is copied from that node instead.
//! - An image that names none (`ember/echo:HASH` built by `ember deploy`, or one loaded
//!   by hand on the gateway's node) is copied from a node that has it: `docker save`
//!   there, streamed through the gateway, `docker load` here. A node that joins later gets
//!   it the same way on its first placement. With no node holding it, it is pulled (from
//!   Docker Hub).
//!
//! One supply per node and image runs at a time: a second start, or the deploy's pre-pull,
//! waits for it and watches the same meter (`ember ls` shows `pulling 45%`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::body::Body;
use futures_util::TryStreamExt;
use serde::Serialize;
use tokio::sync::mpsc;

use super::{Activator, Function};
use crate::node::{Node, NodeError};
use crate::runtime::{names_registry, registry_host, ImageProgress, RegistryAuth, RuntimeError};

/// What is being done to get an image onto a node.
#[derive(utoipa::ToSchema, Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageAction {
    /// Looking for it, or waiting for another start's supply.
    Checking,
    /// Pulling it from its registry.
    Pulling,
    /// Copying it from another node.
    Copying,
}

/// How far one supply has got; shared by everyone waiting for it.
#[derive(Debug, Default)]
pub struct ImageMeter {
    action: AtomicU8,
    done: AtomicU64,
    total: AtomicU64,
}

impl ImageMeter {
    fn begin(&self, action: ImageAction, total: u64) {
        self.done.store(0, Ordering::Relaxed);
        self.total.store(total, Ordering::Relaxed);
        self.action.store(action as u8, Ordering::Relaxed);
    }

    fn set(&self, p: ImageProgress) {
        self.total.store(p.total, Ordering::Relaxed);
        self.done.store(p.done, Ordering::Relaxed);
    }

    /// What it shows now.
    pub fn status(&self) -> ImageStatus {
        let progress = ImageProgress {
            done: self.done.load(Ordering::Relaxed),
            total: self.total.load(Ordering::Relaxed),
        };
        ImageStatus {
            action: match self.action.load(Ordering::Relaxed) {
                a if a == ImageAction::Pulling as u8 => ImageAction::Pulling,
                a if a == ImageAction::Copying as u8 => ImageAction::Copying,
                _ => ImageAction::Checking,
            },
            percent: progress.percent(),
            done_bytes: progress.done,
            total_bytes: progress.total,
        }
    }
}

/// An image on its way to a node, as the API shows it.
#[derive(utoipa::ToSchema, Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ImageStatus {
    /// Pulling, copying, or checking.
    pub action: ImageAction,
    /// Whole percent, once the size is known.
    pub percent: Option<u8>,
    /// Bytes done.
    pub done_bytes: u64,
    /// Bytes in all, as far as known.
    pub total_bytes: u64,
}

struct Supply {
    lock: tokio::sync::Mutex<()>,
    meter: Arc<ImageMeter>,
}

/// The supplies under way, by node and image.
#[derive(Default)]
pub(super) struct Supplies(Mutex<HashMap<(String, String), Arc<Supply>>>);

impl Supplies {
    fn join(&self, key: &(String, String)) -> Arc<Supply> {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(key.clone())
            .or_insert_with(|| {
                Arc::new(Supply {
                    lock: tokio::sync::Mutex::new(()),
                    meter: Arc::default(),
                })
            })
            .clone()
    }
}

/// A hold on a supply, let go of when dropped (also when the start is cancelled): the last
/// one out removes it from the map.
struct Hold<'a> {
    supplies: &'a Supplies,
    key: (String, String),
    supply: Arc<Supply>,
}

impl Drop for Hold<'_> {
    fn drop(&mut self) {
        let mut map = self.supplies.0.lock().unwrap_or_else(|e| e.into_inner());
        // Only `join` adds holders, under this lock: the map's and this one mean nobody
        // else holds it.
        if Arc::strong_count(&self.supply) == 2 {
            map.remove(&self.key);
        }
    }
}

impl Activator {
    /// Brings instance `id`'s image to its node (pulled, or copied from a node that has
    /// it); waiting requests keep waiting, and `ember ls` shows how far it has got. `None`:
    /// the instance was removed (or replaced) meanwhile, and the pull or copy it drove
    /// ended with it (the next start that needs the image begins again).
    pub(super) async fn bring_image(
        &self,
        f: &Function,
        id: &str,
        node: &Arc<dyn Node>,
        image: &str,
    ) -> Option<Result<(), NodeError>> {
        let retired = super::start::retired_token(f, id)?;
        let _pulling = self.inner.ledger.metrics.phase(f.name(), "pull");
        let got = tokio::select! {
            got = self.ensure_image(node, image, |meter| set_image_meter(f, id, Some(meter))) => got,
            () = retired.cancelled() => return None,
        };
        set_image_meter(f, id, None);
        Some(got)
    }
}

fn set_image_meter(f: &Function, id: &str, meter: Option<Arc<super::ImageMeter>>) {
    let mut st = f.lock();
    if let Some(inst) = st.instances.iter_mut().find(|i| i.id == id) {
        inst.image = meter;
    }
}

impl Activator {
    /// Makes sure `image` is on `node`: there already, or pulled, or copied from a node
    /// that has it. `watch` gets the meter of the work, when there is work to do.
    pub async fn ensure_image(
        &self,
        node: &Arc<dyn Node>,
        image: &str,
        watch: impl FnOnce(Arc<ImageMeter>),
    ) -> Result<(), NodeError> {
        if node.image_exists(image).await? {
            return Ok(());
        }
        let key = (node.name().to_string(), image.to_string());
        let hold = Hold {
            supply: self.inner.supplies.join(&key),
            supplies: &self.inner.supplies,
            key,
        };
        let supply = &*hold.supply;
        watch(supply.meter.clone());
        // Dropped before `hold` (declared after it): the turn, then the hold.
        let _turn = supply.lock.lock().await;
        // Another start may have brought it while this one waited.
        if node.image_exists(image).await? {
            return Ok(());
        }
        self.supply(node, image, &supply.meter).await
    }

    async fn supply(
        &self,
        node: &Arc<dyn Node>,
        image: &str,
        meter: &Arc<ImageMeter>,
    ) -> Result<(), NodeError> {
        // `docker save` of a digest reference names nothing in its tar: only a pull makes
        // `repo@sha256:…` present.
        if !names_registry(image) && !image.contains('@') {
            if let Some(source) = self.holder(image, node).await {
                match copy(&source, node, image, meter).await {
                    Ok(()) => return Ok(()),
                    Err(e) if is_ember_built(image) => return Err(e),
                    Err(e) => {
                        tracing::warn!(node = %node.name(), %image, error = %crate::model::error_chain(&e), "copy failed; pulling the image instead");
                    }
                }
            } else if is_ember_built(image) {
                // Never from Docker Hub: Ember does not own the `ember/` namespace there.
                return Err(RuntimeError::Transfer(format!(
                    "no node has `{image}` (built by `ember deploy`) to copy it from; deploy the function again to build it"
                ))
                .into());
            }
            return self.pull(node, image, meter).await;
        }
        match self.pull(node, image, meter).await {
            Ok(()) => Ok(()),
            Err(e) if image.contains('@') => Err(e),
            Err(e) => match self.holder(image, node).await {
                Some(source) => {
                    tracing::warn!(node = %node.name(), %image, error = %crate::model::error_chain(&e), source = %source.name(), "pull failed; copying the image from a node that has it");
                    copy(&source, node, image, meter).await
                }
                None => Err(e),
            },
        }
    }

    /// A reachable node other than `except` that has `image`.
    async fn holder(&self, image: &str, except: &Arc<dyn Node>) -> Option<Arc<dyn Node>> {
        for n in self.scheduler().live_nodes() {
            if n.name() != except.name() && matches!(n.image_exists(image).await, Ok(true)) {
                return Some(n);
            }
        }
        None
    }

    async fn pull(
        &self,
        node: &Arc<dyn Node>,
        image: &str,
        meter: &ImageMeter,
    ) -> Result<(), NodeError> {
        let host = registry_host(image);
        let auth = match self.store().registry(host) {
            Ok(login) => login.map(|l| RegistryAuth {
                server: l.host,
                username: l.username,
                password: l.password,
            }),
            Err(e) => {
                tracing::error!(registry = %host, error = %e, "cannot read the registry login; pulling without it");
                None
            }
        };
        meter.begin(ImageAction::Pulling, 0);
        let began = Instant::now();
        let (tx, mut rx) = mpsc::channel(16);
        let follow = async {
            while let Some(p) = rx.recv().await {
                meter.set(p);
            }
        };
        let (result, ()) = tokio::join!(node.pull_image(image, auth, tx), follow);
        result?;
        tracing::info!(node = %node.name(), %image, elapsed_ms = began.elapsed().as_millis() as u64, bytes = meter.status().total_bytes, "image pulled");
        Ok(())
    }
}

/// Whether `image` is a tag `ember deploy` made from a build context.
fn is_ember_built(image: &str) -> bool {
    image.starts_with("ember/")
}

/// Copies `image` from `source` to `node` (save there, load here), streamed through the
/// gateway.
async fn copy(
    source: &Arc<dyn Node>,
    node: &Arc<dyn Node>,
    image: &str,
    meter: &Arc<ImageMeter>,
) -> Result<(), NodeError> {
    let began = Instant::now();
    let (size, tar) = source.export_image(image).await?;
    meter.begin(ImageAction::Copying, size.unwrap_or(0));
    let counter = meter.clone();
    let counted = tar.into_data_stream().inspect_ok(move |chunk| {
        counter
            .done
            .fetch_add(chunk.len() as u64, Ordering::Relaxed);
    });
    node.load_image(Body::from_stream(counted)).await?;
    if !node.image_exists(image).await? {
        return Err(RuntimeError::Transfer(format!(
            "`{image}` was loaded from node `{}` but is not there afterwards",
            source.name()
        ))
        .into());
    }
    tracing::info!(node = %node.name(), source = %source.name(), %image, elapsed_ms = began.elapsed().as_millis() as u64, bytes = meter.status().done_bytes, "image copied");
    Ok(())
}
