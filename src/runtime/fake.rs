//! A test double of `ContainerRuntime` for the node tests: it runs nothing, lists the
//! containers a test gives it (removing one forgets it), and its builds print as many
//! progress lines as a test asks for.

use std::sync::Mutex;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::mpsc;

use super::{
    ContainerInfo, ContainerRuntime, ContainerSpec, ImageProgress, ImageTar, LogChunk, LogOptions,
    LogStream, RegistryAuth, RuntimeError,
};

/// A runtime that runs nothing.
#[derive(Default)]
pub struct FakeRuntime {
    /// Progress lines each build prints.
    pub build_lines: usize,
    /// What `list` answers (whatever the filter).
    pub containers: Mutex<Vec<ContainerInfo>>,
    /// What every container has written, chunk by chunk.
    pub output: Vec<LogChunk>,
}

#[async_trait]
impl ContainerRuntime for FakeRuntime {
    async fn ping(&self) -> Result<(), RuntimeError> {
        Ok(())
    }
    async fn image_exists(&self, _: &str) -> Result<bool, RuntimeError> {
        Ok(true)
    }
    async fn build_image(
        &self,
        _: &str,
        _: &str,
        _: Bytes,
        progress: mpsc::Sender<String>,
    ) -> Result<(), RuntimeError> {
        for i in 0..self.build_lines {
            let _ = progress.send(format!("step {i}")).await;
        }
        Ok(())
    }
    async fn pull_image(
        &self,
        _: &str,
        _: Option<&RegistryAuth>,
        _: mpsc::Sender<ImageProgress>,
    ) -> Result<(), RuntimeError> {
        Ok(())
    }
    async fn export_image(&self, image: &str) -> Result<(Option<u64>, ImageTar), RuntimeError> {
        Err(RuntimeError::ImageNotFound(image.to_string()))
    }
    async fn load_image(&self, _: ImageTar) -> Result<(), RuntimeError> {
        Ok(())
    }
    async fn run(&self, _: &ContainerSpec) -> Result<ContainerInfo, RuntimeError> {
        Err(RuntimeError::NoPort("test".into()))
    }
    async fn inspect(&self, _: &str) -> Result<Option<ContainerInfo>, RuntimeError> {
        Ok(None)
    }
    async fn logs_tail(&self, _: &str, _: usize) -> Result<String, RuntimeError> {
        Ok(String::new())
    }
    async fn logs(&self, _: &str, _: &LogOptions) -> Result<LogStream, RuntimeError> {
        let chunks = self.output.clone().into_iter().map(Ok);
        Ok(Box::pin(futures_util::stream::iter(chunks)))
    }
    async fn pause(&self, _: &str) -> Result<(), RuntimeError> {
        Ok(())
    }
    async fn unpause(&self, _: &str) -> Result<(), RuntimeError> {
        Ok(())
    }
    async fn stop(&self, _: &str, _: std::time::Duration) -> Result<(), RuntimeError> {
        Ok(())
    }
    async fn start(&self, id: &str) -> Result<ContainerInfo, RuntimeError> {
        Err(RuntimeError::NoPort(id.to_string()))
    }
    async fn remove(&self, id: &str) -> Result<(), RuntimeError> {
        let mut containers = self.containers.lock().unwrap_or_else(|e| e.into_inner());
        containers.retain(|c| c.id != id);
        Ok(())
    }
    async fn list(&self, _: &[(&str, &str)]) -> Result<Vec<ContainerInfo>, RuntimeError> {
        Ok(self
            .containers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone())
    }
}
