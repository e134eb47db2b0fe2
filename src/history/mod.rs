//! The invocation history: a record of every request (later every job), and of how long
//! each instance held its GPUs, kept in the store for `ember history` and `ember usage`.
//!
//! The hot path only sends: a finished request's record goes through a channel to the
//! recorder task, which writes what came in one batch every `BATCH_EVERY` (or every
//! `BATCH_MAX` records), never one write per request, and trims the history to its
//! retention (`serve --history-max`, `--history-max-age`). A crash loses at most the last
//! batch; a shutdown writes everything ([`History::close`]).
//!
//! Ids ([`mint`]) are the arrival time in milliseconds shifted left 20 bits plus a counter,
//! so they sort by arrival and a time is a range of ids.
//!
//! `query.rs` reads pages of it; `usage.rs` sums GPU time from it.

pub mod query;
pub mod usage;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, Notify};
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::store::Store;
pub use crate::store::{now_us, AllocationRecord, InvocationRecord};

/// How often the recorder writes what came in.
pub const BATCH_EVERY: Duration = Duration::from_millis(200);
/// Records written in one batch at the most.
pub const BATCH_MAX: usize = 2048;
/// How often retention is applied when the count cap is not reached.
const TRIM_EVERY: Duration = Duration::from_secs(60);
/// Records over the cap tolerated before trimming (so trims come in chunks).
const TRIM_SLACK: usize = 1024;

/// How much history is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Invocation records kept at the most; 0 turns the history off.
    pub max: usize,
    /// Records older than this are removed.
    pub max_age: Duration,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            max: 1_000_000,
            max_age: Duration::from_secs(30 * 24 * 3600),
        }
    }
}

/// Records waiting for the recorder's next batch.
#[derive(Default)]
struct Buffer {
    invocations: Vec<(u64, Option<SocketAddr>, InvocationRecord)>,
    allocations: Vec<AllocationRecord>,
}

/// What the hot path and the recorder share: requests push under a short lock and never
/// wake the recorder (it wakes on its timer), unless a batch is full.
#[derive(Default)]
struct Shared {
    buffer: Mutex<Buffer>,
    full: Notify,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Buffer> {
        self.buffer.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The history's sending end. Cheap to share (`Arc`). The recorder ends when it is
/// dropped, after writing what it has.
pub struct History {
    shared: Option<Arc<Shared>>,
    /// Asks the recorder to write now; each gets an answer once it is on disk.
    flushes: Option<mpsc::UnboundedSender<oneshot::Sender<()>>>,
    /// Set at shutdown: what instances still running leave behind then is not an end
    /// (they are adopted at the next start, and their time counted from their start).
    closed: AtomicBool,
    /// The recorder's task (it outlives the gateway's tracker: requests still finishing
    /// at shutdown send their records after that tracker is done).
    _tracker: TaskTracker,
}

static SEQUENCE: AtomicU64 = AtomicU64::new(0);

/// A new invocation id: arrival milliseconds, then a counter (20 bits).
pub fn mint() -> u64 {
    let seq = SEQUENCE.fetch_add(1, Ordering::Relaxed) & 0xF_FFFF;
    id_at(now_us() / 1000) | seq
}

/// The smallest id minted at unix millisecond `ms`.
pub fn id_at(ms: u64) -> u64 {
    ms << 20
}

/// An id as users see it: 16 hex digits.
pub fn format_id(id: u64) -> String {
    String::from_utf8_lossy(&hex_id(id)).into_owned()
}

/// An id's 16 lowercase hex digits, without the formatting machinery (every request's
/// answer carries one).
pub fn hex_id(id: u64) -> [u8; 16] {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0u8; 16];
    for (i, b) in out.iter_mut().enumerate() {
        *b = DIGITS[((id >> (60 - 4 * i)) & 0xf) as usize];
    }
    out
}

/// An id as users wrote it.
pub fn parse_id(s: &str) -> Option<u64> {
    (s.len() == 16)
        .then(|| u64::from_str_radix(s, 16).ok())
        .flatten()
}

impl History {
    /// Starts the recorder on `store`; with `retention.max` 0 nothing is kept.
    pub fn start(store: Store, retention: Retention) -> Arc<History> {
        if retention.max == 0 {
            return History::off();
        }
        let tracker = TaskTracker::new();
        let shared = Arc::new(Shared::default());
        let (flushes, asked) = mpsc::unbounded_channel();
        tracker.spawn(
            record(store, retention, shared.clone(), asked)
                .instrument(tracing::info_span!("history recorder")),
        );
        tracker.close();
        Arc::new(History {
            shared: Some(shared),
            flushes: Some(flushes),
            closed: AtomicBool::new(false),
            _tracker: tracker,
        })
    }

    /// A history that keeps nothing.
    pub fn off() -> Arc<History> {
        Arc::new(History {
            shared: None,
            flushes: None,
            closed: AtomicBool::new(false),
            _tracker: TaskTracker::new(),
        })
    }

    /// Whether records are kept.
    pub fn enabled(&self) -> bool {
        self.shared.is_some()
    }

    /// Records invocation `id` from `client`, whose record's `id` and `client` the
    /// recorder writes (formatting is kept off the request's path).
    pub fn invocation(&self, id: u64, client: Option<SocketAddr>, record: InvocationRecord) {
        if let Some(shared) = &self.shared {
            let mut b = shared.lock();
            b.invocations.push((id, client, record));
            if b.invocations.len() == BATCH_MAX {
                shared.full.notify_one();
            }
        }
    }

    /// Records an instance's allocation, when it is gone.
    pub fn allocation(&self, record: AllocationRecord) {
        if self.closed.load(Ordering::Acquire) {
            return;
        }
        if let Some(shared) = &self.shared {
            shared.lock().allocations.push(record);
        }
    }

    /// At shutdown, after the last request: writes what is left; instances dropped with
    /// the process from now on leave no allocation record (they are not gone).
    pub async fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.flush().await;
    }

    /// Waits until every record sent before this call is on disk.
    pub async fn flush(&self) {
        if let Some(flushes) = &self.flushes {
            let (done, wait) = oneshot::channel();
            if flushes.send(done).is_ok() {
                let _ = wait.await;
            }
        }
    }
}

/// The recorder: every `BATCH_EVERY` (or when a batch is full, or asked to), writes what
/// came in as one record, and applies the retention.
async fn record(
    store: Store,
    retention: Retention,
    shared: Arc<Shared>,
    mut asked: mpsc::UnboundedReceiver<oneshot::Sender<()>>,
) {
    // Unknown (the count failed): only the age limit applies.
    let mut count = match store.invocation_count().await {
        Ok(n) => Some(n),
        Err(e) => {
            tracing::error!(error = %e, "cannot count the invocation history; only --history-max-age applies");
            None
        }
    };
    let mut tick = tokio::time::interval(BATCH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_trim = tokio::time::Instant::now();
    let mut trim_due = true;
    loop {
        let (open, flushed) = tokio::select! {
            done = asked.recv() => (done.is_some(), done),
            _ = shared.full.notified() => (true, None),
            _ = tick.tick() => (true, None),
        };
        let batch = std::mem::take(&mut *shared.lock());
        if !batch.invocations.is_empty() || !batch.allocations.is_empty() {
            count = count.map(|c| c + batch.invocations.len());
            let invocations = batch
                .invocations
                .into_iter()
                .map(|(id, client, mut r)| {
                    r.id = format_id(id);
                    r.client = client.map(crate::text::socket_addr);
                    r
                })
                .collect();
            store.put_history_later(invocations, &batch.allocations);
        }
        if let Some(done) = flushed {
            if let Err(e) = store.flush().await {
                tracing::error!(error = %e, "the invocation history did not reach the disk");
            }
            let _ = done.send(());
        }
        if !open {
            break;
        }
        trim_due |= last_trim.elapsed() >= TRIM_EVERY;
        if count.is_some_and(|c| c > retention.max + TRIM_SLACK) || trim_due {
            trim_due = false;
            last_trim = tokio::time::Instant::now();
            count = trim(&store, count, retention).await;
        }
    }
}

/// Applies the retention; returns the count left (`None`: unknown, the age limit alone).
async fn trim(store: &Store, count: Option<usize>, retention: Retention) -> Option<usize> {
    let age = u64::try_from(retention.max_age.as_micros()).unwrap_or(u64::MAX);
    let oldest_us = now_us().saturating_sub(age);
    let (known, max) = match count {
        Some(c) => (c, retention.max),
        None => (0, usize::MAX),
    };
    match store.trim_history(known, max, oldest_us).await {
        Ok(t) => {
            if t.invocations + t.allocations > 0 {
                tracing::info!(
                    invocations = t.invocations,
                    allocations = t.allocations,
                    "history trimmed to its retention"
                );
            }
            count.map(|c| c.saturating_sub(t.invocations))
        }
        Err(e) => {
            tracing::warn!(error = %e, "could not trim the invocation history; trying again later");
            count
        }
    }
}

#[cfg(test)]
mod tests;
