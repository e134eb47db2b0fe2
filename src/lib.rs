//! Ember: scattered GPU machines as one scale-to-zero function service.
//!
//! One HTTP gateway takes requests for functions (containers that serve HTTP). When a
//! function has no free instance, the activator holds its requests in a bounded queue,
//! cold-starts a container through the Docker Engine API on the least-loaded node, waits
//! until it is ready, and releases the queue to it. Idle instances are retired, down to
//! zero. State (functions, revisions, instances) lives in sled and survives restarts;
//! containers still running are adopted.
//!
//! # Layout
//! - [`access`]: bearer credentials, compared in constant time; key scopes; the admin
//!   token's file.
//! - [`text`]: addresses and numbers written as bytes, off `core::fmt` (the hot path).
//! - [`model`]: shared leaf types (phases, node states, GPU assignments, error codes and
//!   the error body); imports nothing of the crate.
//! - [`manifest`]: the function manifest, its parsing and validation.
//! - [`store`]: durable state in sled (the only module touching sled).
//! - [`runtime`]: the container runtime trait and its Docker implementation (the only
//!   module touching bollard).
//! - [`gpu`]: GPU inventory: NVML (the only module touching NVML) or a declared list.
//! - [`node`]: the node trait, the embedded local node, the remote node (an HTTP client
//!   of an agent) and the agent process.
//! - [`membership`]: which nodes belong to the gateway: join, heartbeats, loss, cordon, drain.
//! - [`scheduler`]: placement on the least-loaded node, with reservations.
//! - [`activator`]: per-function queues, permits, cold starts, retirement, adoption.
//! - [`autoscaler`]: scaling decisions, pure (the reaper that applies them is the
//!   activator's).
//! - [`keepalive`]: keep-alive policies, fixed and adaptive (a priced hybrid histogram).
//! - [`readiness`]: probing new instances.
//! - [`invoke`]: the invoke core: acquire, forward, retry what was not delivered; each
//!   call's trace (its history record and `Ember-*` headers).
//! - [`jobs`]: durable jobs: stored before they are acknowledged, run through the invoke
//!   core when an instance is free, retried, resumed after a restart.
//! - [`history`]: the invocation history and instances' GPU allocations, batched into the
//!   store; pages of it, and GPU usage summed from it.
//! - [`proxy`]: streaming a request to an instance and the answer back; WebSocket
//!   upgrades spliced while holding their permit.
//! - [`comfy`]: the ComfyUI front door's core: the gateway's prompt queue, clients'
//!   sockets, history and files that outlive instances.
//! - [`gateway`]: the `serve` process: routes, who may call them (`gateway/auth.rs`),
//!   errors as responses, shutdown.
//! - [`metrics`]: the Prometheus metrics (one `Metrics` struct owning its registry).
//! - [`tls`]: rustls for the listener and its clients: the gateway's own CA, pins.
//! - [`config`]: `serve` settings.
//! - [`client`]: the HTTP client of the gateway's API, shared by the CLI and the agent.
//! - [`cli`]: the client commands, and where they find their gateway and token.
//!
//! Dependencies point down: gateway → membership → activator → scheduler → node →
//! runtime, with model, manifest and store underneath; nothing imports gateway or cli.
//! `tests/architecture.rs` checks that no two modules import each other and that sled,
//! bollard and NVML stay in their modules.
#![warn(missing_docs)]
#![forbid(unsafe_code)]

pub mod access;
pub mod activator;
pub mod autoscaler;
pub mod cli;
pub mod client;
pub mod comfy;
pub mod config;
pub mod gateway;
pub mod gpu;
pub mod history;
pub mod invoke;
pub mod jobs;
pub mod keepalive;
pub mod manifest;
pub mod membership;
pub mod metrics;
pub mod model;
pub mod node;
pub mod proxy;
pub mod readiness;
pub mod runtime;
pub mod scheduler;
pub mod store;
pub mod text;
pub mod tls;
