//! A function's logs: its instances' output, read from whichever nodes run them and
//! merged as it comes (`Activator::logs`), and what removed instances last wrote
//! (`Activator::previous_logs`), kept as each one is removed (`keep_output`) so a crashed
//! or reaped instance can still say why it ended.
//!
//! Reading goes through `Node::stream_logs` only: the gateway never reaches a container
//! engine itself. Keeping an instance's output costs its removal at most
//! `KEEP_READ_TIMEOUT`.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::Instrument;

use super::{Activator, ActivatorError, Function};
use crate::node::{ContainerState, Node};
use crate::runtime::{keep_last, LogLine, LogOptions, OutputStream};
use crate::store::PreviousLogs;

/// What is kept of a removed instance's output, at most: its last bytes.
pub const KEEP_BYTES: usize = 64 << 10;
/// Lines asked of the node when keeping an instance's output: more than `KEEP_BYTES`
/// holds of most programs' lines, without reading a chatty container's whole history.
const KEEP_LINES: usize = 4096;
/// How long keeping an instance's output may hold up its removal.
pub const KEEP_READ_TIMEOUT: Duration = Duration::from_secs(3);
/// Events buffered between the instances' readers and the client.
const LOG_BUFFER: usize = 1024;
/// How often a follow looks for instances that started since.
const RESCAN: Duration = Duration::from_secs(1);

/// What to read of a function's logs.
#[derive(Debug, Clone, Default)]
pub struct LogQuery {
    /// One instance only.
    pub instance: Option<String>,
    /// What to read of each instance running now. Instances a follow finds later are
    /// read from their start (no tail).
    pub options: LogOptions,
}

/// One event of a function's logs.
#[derive(Debug, Clone, PartialEq)]
pub enum LogEvent {
    /// A line an instance wrote.
    Line {
        /// The instance.
        instance: String,
        /// Its stream.
        stream: OutputStream,
        /// The text.
        line: String,
    },
    /// The gateway's word on an instance's output: it could not be read.
    Note {
        /// The instance.
        instance: String,
        /// What happened.
        text: String,
    },
}

/// The message of an unknown instance: which ones there are.
pub(super) fn missing_instance(
    function: &str,
    instance: &str,
    known: &[String],
    previous: bool,
) -> String {
    match (previous, known.is_empty()) {
        (false, true) => format!("function `{function}` has no instance `{instance}`; it has none now (`--previous` shows removed ones)"),
        (false, false) => format!("function `{function}` has no instance `{instance}`; its instances: {} (`--previous` shows removed ones)", known.join(", ")),
        (true, true) => format!("function `{function}` kept no output of instance `{instance}`; it has kept none yet"),
        (true, false) => format!("function `{function}` kept no output of instance `{instance}`; it kept: {}", known.join(", ")),
    }
}

impl Activator {
    /// The output of `name`'s instances (or of one) as `query` asks, merged line by line
    /// as it comes. Without `follow` it ends once every instance's output is read; with
    /// it, it goes on (taking in instances that start later) until the receiver is
    /// dropped or the gateway shuts down.
    pub fn logs(
        &self,
        name: &str,
        query: LogQuery,
    ) -> Result<mpsc::Receiver<LogEvent>, ActivatorError> {
        let f = self
            .function(name)
            .ok_or_else(|| ActivatorError::NotFound(name.to_string()))?;
        if let Some(id) = &query.instance {
            let known: Vec<String> = f.lock().instances.iter().map(|i| i.id.clone()).collect();
            if !known.contains(id) {
                return Err(ActivatorError::InstanceNotFound {
                    function: name.to_string(),
                    instance: id.clone(),
                    known,
                    previous: false,
                });
            }
        }
        let (tx, rx) = mpsc::channel(LOG_BUFFER);
        let this = self.clone();
        let span = tracing::info_span!("logs", function = %name);
        self.inner
            .tracker
            .spawn(async move { this.pump_logs(f, query, tx).await }.instrument(span));
        Ok(rx)
    }

    /// Reads every instance's output into `tx` (see `logs`).
    async fn pump_logs(&self, f: Arc<Function>, query: LogQuery, tx: mpsc::Sender<LogEvent>) {
        let follow = query.options.follow;
        let mut seen = HashSet::new();
        let mut readers = FuturesUnordered::new();
        let mut rescan = tokio::time::interval(RESCAN);
        rescan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The first tick is now: the instances running at the start are read first.
        rescan.tick().await;
        let mut options = query.options;
        loop {
            for (instance, node, container) in log_targets(&f, &query, &mut seen) {
                readers.push(read_instance(
                    instance,
                    node,
                    container,
                    options,
                    tx.clone(),
                ));
            }
            // What starts later is new: all of it is read.
            options.tail = None;
            let one_gone = query.instance.is_some() && !seen.is_empty();
            if readers.is_empty() && (!follow || one_gone) {
                break;
            }
            tokio::select! {
                biased;
                _ = self.inner.shutdown.cancelled() => break,
                _ = tx.closed() => break,
                Some(()) = readers.next(), if !readers.is_empty() => {}
                _ = rescan.tick(), if follow => {}
            }
        }
    }

    /// What `name`'s removed instances last wrote (or `instance`'s), oldest first.
    pub async fn previous_logs(
        &self,
        name: &str,
        instance: Option<&str>,
    ) -> Result<Vec<PreviousLogs>, ActivatorError> {
        if self.function(name).is_none() {
            return Err(ActivatorError::NotFound(name.to_string()));
        }
        let mut records = self.inner.store.previous_logs(name).await?;
        if let Some(id) = instance {
            if !records.iter().any(|r| r.instance == id) {
                return Err(ActivatorError::InstanceNotFound {
                    function: name.to_string(),
                    instance: id.to_string(),
                    known: records.into_iter().map(|r| r.instance).collect(),
                    previous: true,
                });
            }
            records.retain(|r| r.instance == id);
        }
        Ok(records)
    }

    /// Keeps the last output of an instance about to be removed, with why it ends and
    /// how its container ended, within `KEEP_READ_TIMEOUT`.
    pub(super) async fn keep_output(&self, gone: Gone<'_>) {
        let deadline = Instant::now() + KEEP_READ_TIMEOUT;
        let state = tokio::time::timeout_at(deadline, gone.node.state(gone.container));
        let ((lines, truncated), state) =
            tokio::join!(last_output(gone.node, gone.container, deadline), state);
        let (exit_code, status) = match state {
            Ok(Ok(ContainerState::Exited { code, status })) => (code, Some(status)),
            Ok(Ok(ContainerState::Running)) => (None, Some("running".to_string())),
            Ok(Ok(ContainerState::Gone)) => (None, Some("gone".to_string())),
            Ok(Err(e)) => {
                tracing::debug!(instance = %gone.instance, error = %e, "could not read how the container ended");
                (None, None)
            }
            Err(_) => (None, None),
        };
        self.inner.store.put_previous_logs(&PreviousLogs {
            function: gone.function.to_string(),
            instance: gone.instance.to_string(),
            revision: gone.revision.to_string(),
            node: gone.node.name().to_string(),
            ended_ms: crate::store::now_ms(),
            reason: gone.reason.to_string(),
            exit_code,
            status,
            lines,
            truncated,
        });
    }
}

/// An instance on its way out, as `keep_output` records it.
pub(super) struct Gone<'a> {
    pub function: &'a str,
    pub instance: &'a str,
    pub revision: &'a str,
    pub node: &'a dyn Node,
    pub container: &'a str,
    /// Why it is removed.
    pub reason: &'a str,
}

/// The instances to read that were not read yet: `(instance, node, container)`.
fn log_targets(
    f: &Function,
    query: &LogQuery,
    seen: &mut HashSet<String>,
) -> Vec<(String, Arc<dyn Node>, String)> {
    let st = f.lock();
    st.instances
        .iter()
        .filter(|i| query.instance.as_ref().is_none_or(|id| *id == i.id))
        .filter_map(|i| {
            let container = i.container_id.clone()?;
            seen.insert(container.clone())
                .then(|| (i.id.clone(), i.reservation.node().clone(), container))
        })
        .collect()
}

/// Passes one instance's output on as events, until it ends or nobody reads.
async fn read_instance(
    instance: String,
    node: Arc<dyn Node>,
    container: String,
    options: LogOptions,
    tx: mpsc::Sender<LogEvent>,
) {
    let failed = |e: crate::node::NodeError| {
        tracing::warn!(instance = %instance, node = %node.name(), error = %crate::model::error_chain(&e), "reading an instance's output failed");
        LogEvent::Note {
            instance: instance.clone(),
            text: format!("its output could not be read: {}", e.public_message()),
        }
    };
    let mut lines = match node.stream_logs(&container, &options).await {
        Ok(lines) => lines,
        Err(e) => {
            let _ = tx.send(failed(e)).await;
            return;
        }
    };
    while let Some(item) = lines.next().await {
        let event = match item {
            Ok(LogLine { stream, line }) => LogEvent::Line {
                instance: instance.clone(),
                stream,
                line,
            },
            Err(e) => failed(e),
        };
        if tx.send(event).await.is_err() {
            return;
        }
    }
}

/// The last `KEEP_BYTES` of a container's output, and whether older output was left
/// out; what was read by `deadline` when the node is slow.
async fn last_output(node: &dyn Node, container: &str, deadline: Instant) -> (Vec<LogLine>, bool) {
    let options = LogOptions {
        tail: Some(KEEP_LINES),
        ..LogOptions::default()
    };
    let mut lines = match tokio::time::timeout_at(deadline, node.stream_logs(container, &options))
        .await
    {
        Ok(Ok(lines)) => lines,
        Ok(Err(e)) => {
            tracing::warn!(container, error = %e, "could not read the output of a removed instance");
            return (Vec::new(), false);
        }
        Err(_) => return (Vec::new(), false),
    };
    let (mut kept, mut bytes, mut read) = (Vec::new(), 0, 0);
    let mut truncated = false;
    loop {
        match tokio::time::timeout_at(deadline, lines.next()).await {
            Ok(Some(Ok(line))) => {
                read += 1;
                bytes += line.line.len() + 1;
                kept.push(line);
                // Compacted now and then, so a long tail is never held whole.
                if bytes > 2 * KEEP_BYTES {
                    let cut;
                    (kept, cut) = compact(kept);
                    truncated |= cut;
                    bytes = size(&kept);
                }
            }
            Ok(Some(Err(e))) => {
                tracing::warn!(container, error = %e, "reading the output of a removed instance broke off");
                break;
            }
            Ok(None) => break,
            Err(_) => {
                tracing::warn!(container, timeout = ?KEEP_READ_TIMEOUT, "the node did not hand over a removed instance's output in time; keeping what came");
                break;
            }
        }
    }
    let (kept, cut) = compact(kept);
    // As many lines as were asked for: the container may have written more before them.
    (kept, truncated || cut || read >= KEEP_LINES)
}

/// Bytes of `lines`, each with its newline.
fn size(lines: &[LogLine]) -> usize {
    lines.iter().map(|l| l.line.len() + 1).sum()
}

/// The last `KEEP_BYTES` of `lines`, and whether anything was cut.
fn compact(lines: Vec<LogLine>) -> (Vec<LogLine>, bool) {
    let before = size(&lines);
    let kept = keep_last(lines, KEEP_BYTES);
    let cut = size(&kept) < before;
    (kept, cut)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unknown_instance_is_answered_with_the_known_ones() {
        let known = vec!["a1".to_string(), "b2".to_string()];
        let m = missing_instance("echo", "zz", &known, false);
        assert!(m.contains("no instance `zz`"), "{m}");
        assert!(m.contains("a1, b2"), "{m}");
        let m = missing_instance("echo", "zz", &[], true);
        assert!(m.contains("kept none"), "{m}");
    }
}
