//! The activator's errors: why a request got no instance, whose fault a failed start was,
//! and what fails outside the request path.

use std::time::Duration;

use super::logs;
use crate::store::StoreError;

/// Why a request got no instance.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AcquireError {
    /// The function's queue is full.
    #[error("function `{function}` has {capacity} requests waiting already (queue.capacity); retry shortly")]
    QueueFull {
        /// Function name.
        function: String,
        /// Its queue capacity.
        capacity: u32,
    },
    /// The request waited in the queue past `queue.timeout`.
    #[error("function `{function}` had no free instance within {} (queue.timeout)", humantime::format_duration(*waited))]
    QueueTimeout {
        /// Function name.
        function: String,
        /// How long it waited.
        waited: Duration,
    },
    /// Starting an instance failed, now or recently.
    #[error("function `{function}` could not start: {message}")]
    StartFailed {
        /// Function name.
        function: String,
        /// Why, with the container's last output when there is some (client-safe).
        message: String,
        /// Whether the container misbehaved or the platform could not run it.
        fault: StartFault,
        /// When a new start will be tried.
        retry_after: Duration,
    },
    /// No node has room for an instance (see the reason), or none meets the requirements.
    #[error("function `{function}` cannot be placed: {reason}")]
    NoCapacity {
        /// Function name.
        function: String,
        /// Which requirement no node meets, node by node.
        reason: String,
    },
    /// The gateway holds as many waiting requests (or bytes of their bodies) as it may.
    #[error("the gateway has {queued} requests ({bytes} body bytes) waiting already, its limit; retry shortly")]
    GatewayFull {
        /// Requests waiting across functions.
        queued: usize,
        /// Announced body bytes of those requests.
        bytes: u64,
    },
    /// The function was removed while the request waited.
    #[error("function `{0}` was removed")]
    Removed(String),
    /// The gateway is shutting down.
    #[error("the gateway is shutting down")]
    ShuttingDown,
}

/// Whose fault a failed start was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartFault {
    /// The container misbehaved: it exited, or never became ready.
    Container,
    /// The platform could not run it: a node or engine failure, a missing image.
    Platform,
}

/// Activator failures outside the request path.
#[derive(Debug, thiserror::Error)]
pub enum ActivatorError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// No such function.
    #[error("function `{0}` is not deployed")]
    NotFound(String),
    /// The function has no such instance (or kept no output of one).
    #[error("{}", logs::missing_instance(.function, .instance, .known, *.previous))]
    InstanceNotFound {
        /// Function name.
        function: String,
        /// The instance asked for.
        instance: String,
        /// The instances it has (or whose output it kept).
        known: Vec<String>,
        /// Whether removed instances were asked for.
        previous: bool,
    },
    /// A node's containers could not be reconciled with the records (the log says why).
    #[error("node `{0}` could not be reconciled: its containers could not be listed or the records read")]
    Reconcile(String),
    /// Another function serves a model id the manifest claims.
    #[error("{field}: model `{model}` is served by function `{function}` already; pick another id, or remove it from `{function}` first")]
    ModelClaimed {
        /// The manifest field naming the id.
        field: String,
        /// The model id.
        model: String,
        /// The function that has it.
        function: String,
    },
}
