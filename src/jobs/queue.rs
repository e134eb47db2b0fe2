//! Each function's jobs in memory: waiting in order, taken to run, and how many turns
//! (requests) are in flight. In batch mode (`[jobs] batch`) one turn takes up to `max`
//! waiting jobs of the same path and priority, once that many wait or the oldest of them
//! has waited `wait`.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::{JobRecord, Jobs, Priority, MAX_BODY};
use crate::history::format_id;
use crate::manifest::Batch;

/// What the queue knows of a job without reading its record: which jobs may share a
/// batch (the same path and priority), and its input's size.
#[derive(Debug, Clone)]
pub(super) struct Meta {
    path: std::sync::Arc<str>,
    priority: Priority,
    bytes: u64,
}

impl Meta {
    pub(super) fn of(job: &JobRecord) -> Meta {
        Meta {
            path: job.path.as_str().into(),
            priority: job.priority,
            bytes: job.input_bytes,
        }
    }

    fn same_group(&self, other: &Meta) -> bool {
        self.priority == other.priority && self.path == other.path
    }
}

/// One function's jobs: waiting in order (with when each began to wait), those taken to
/// run (each with the signal that cancels it), and every job this queue holds in any way
/// (waiting, running, or waiting out a back-off), so that no job is ever queued twice.
#[derive(Default)]
pub(super) struct Queue {
    pub(super) waiting: VecDeque<(u64, Instant)>,
    pub(super) running: HashMap<u64, CancellationToken>,
    held: HashMap<u64, Meta>,
    /// Requests in flight: a single job's, or a batch's.
    turns: usize,
    /// Jobs to send in a batch of their own: a batch they were in was refused (to find the
    /// input at fault).
    alone: HashSet<u64>,
    /// Whether a timer will pump this queue when a partial batch has waited enough.
    timer: bool,
}

/// How far into the queue a batch looks for jobs to join it, in batches.
const BATCH_LOOKAHEAD: usize = 8;

/// What one turn runs.
enum Turn {
    One(u64),
    Batch(Vec<u64>),
}

impl Jobs {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Queue>> {
        self.inner.queues.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues job `id` unless this queue holds it already; returns whether it did.
    pub(super) fn enqueue(&self, job: &JobRecord, id: u64) -> bool {
        {
            let mut queues = self.lock();
            let q = queues.entry(job.function.clone()).or_default();
            if q.held.contains_key(&id) {
                return false;
            }
            q.held.insert(id, Meta::of(job));
            q.waiting.push_back((id, Instant::now()));
        }
        self.pump(&job.function);
        true
    }

    /// Queues job `id` again after its back-off, if it is still held (not cancelled or
    /// purged meanwhile).
    pub(super) fn requeue(&self, function: &str, id: u64) {
        {
            let mut queues = self.lock();
            let Some(q) = queues.get_mut(function) else {
                return;
            };
            if !q.held.contains_key(&id)
                || q.waiting.iter().any(|(w, _)| *w == id)
                || q.running.contains_key(&id)
            {
                return;
            }
            q.waiting.push_back((id, Instant::now()));
        }
        self.pump(function);
    }

    /// Sends job `id` in a batch of its own from now on.
    pub(super) fn send_alone(&self, function: &str, id: u64) {
        if let Some(q) = self.lock().get_mut(function) {
            q.alone.insert(id);
        }
    }

    /// Lets go of job `id` (cancelled or purged while waiting): a retry may queue it again.
    pub(super) fn release(&self, function: &str, id: u64) {
        if let Some(q) = self.lock().get_mut(function) {
            q.waiting.retain(|(w, _)| *w != id);
            if !q.running.contains_key(&id) {
                q.held.remove(&id);
                q.alone.remove(&id);
            }
        }
    }

    /// The jobs of `function` waiting their turn, oldest first.
    pub(super) fn waiting(&self, function: &str) -> Vec<u64> {
        self.lock()
            .get(function)
            .map(|q| q.waiting.iter().map(|(id, _)| *id).collect())
            .unwrap_or_default()
    }

    /// Each function's jobs this gateway holds: queued (waiting for a turn, a back-off or
    /// room) and running.
    pub fn held(&self) -> Vec<(String, usize, usize)> {
        self.lock()
            .iter()
            .map(|(f, q)| (f.clone(), q.held.len() - q.running.len(), q.running.len()))
            .collect()
    }

    /// The signal that cancels job `id`, if it was taken to run.
    pub(super) fn running_signal(&self, function: &str, id: u64) -> Option<CancellationToken> {
        self.lock()
            .get(function)
            .and_then(|q| q.running.get(&id).cloned())
    }

    /// Starts as many turns of `function`'s waiting jobs as it may have in flight: `jobs.
    /// concurrency` per instance it runs, plus one instance's worth, so a backlog starts
    /// one more instance at a time up to `scale.max` while each instance keeps about
    /// `scale.concurrency − jobs.concurrency` slots for requests.
    pub(super) fn pump(&self, function: &str) {
        if self.inner.shutdown.is_cancelled() {
            // What waits stays queued in the store and resumes at the next start.
            return;
        }
        let activator = self.inner.invoker.activator();
        let (limit, batch, cap) = activator.function(function).map_or((1, None, 0), |f| {
            let m = &f.revision().manifest;
            let jobs = m.jobs.as_ref();
            let per_instance = jobs
                .and_then(|j| j.concurrency)
                .unwrap_or(m.scale.concurrency) as usize;
            let room = (f.serving_instances() + 1).min(m.scale.max as usize).max(1);
            // A batch's request is at most what one job's input may be, and what the
            // function takes (`request.max_body`), less the array's brackets and commas.
            let batch = jobs.and_then(|j| j.batch);
            let cap = (MAX_BODY as u64)
                .min(m.request.max_body.as_u64())
                .saturating_sub(batch.map_or(0, |b| u64::from(b.max) + 1));
            (room * per_instance.max(1), batch, cap)
        });
        let mut turns = Vec::new();
        let mut wake_at = None;
        {
            let mut queues = self.lock();
            let Some(q) = queues.get_mut(function) else {
                return;
            };
            while q.turns < limit {
                let Some(turn) = q.next_turn(batch, cap, &mut wake_at) else {
                    break;
                };
                q.turns += 1;
                turns.push(turn);
            }
            if wake_at.is_some() {
                if q.timer {
                    // One is armed already; it pumps again, and arms the next.
                    wake_at = None;
                } else {
                    q.timer = true;
                }
            }
        }
        for turn in turns {
            let (this, name) = (self.clone(), function.to_string());
            match turn {
                Turn::One(id) => {
                    let span = tracing::info_span!("job", function, job = %format_id(id));
                    self.inner.tracker.spawn(tracing::Instrument::instrument(
                        async move { this.run(&name, id).await },
                        span,
                    ));
                }
                Turn::Batch(ids) => {
                    let span = tracing::info_span!("job batch", function, jobs = ids.len());
                    self.inner.tracker.spawn(tracing::Instrument::instrument(
                        async move { this.run_batch(&name, ids).await },
                        span,
                    ));
                }
            }
        }
        if let Some(at) = wake_at {
            let (this, name) = (self.clone(), function.to_string());
            let shutdown = self.inner.shutdown.clone();
            self.inner.tracker.spawn(async move {
                tokio::select! {
                    _ = tokio::time::sleep_until(at.into()) => {
                        if let Some(q) = this.lock().get_mut(&name) {
                            q.timer = false;
                        }
                        this.pump(&name);
                    }
                    _ = shutdown.cancelled() => {}
                }
            });
        }
    }

    /// Lets go of jobs taken to run: for each, `again` when it waits out a back-off (still
    /// held), otherwise this queue forgets it. `ends_turn`: their turn is over, so the
    /// next may go (a batch lets go early of the jobs it will not send).
    pub(super) fn turn_over(&self, function: &str, jobs: &[(u64, bool)], ends_turn: bool) {
        if let Some(q) = self.lock().get_mut(function) {
            if ends_turn {
                q.turns = q.turns.saturating_sub(1);
            }
            for (id, again) in jobs {
                q.running.remove(id);
                if !again {
                    q.held.remove(id);
                    q.alone.remove(id);
                }
            }
        }
        if ends_turn {
            self.pump(function);
        }
    }
}

impl Queue {
    /// Takes the next turn from the queue, or `None` (with `wake_at` set when a partial
    /// batch waits to fill). Without batch mode, the oldest job. In batch mode, the first
    /// group (jobs of one path and priority, in the first `max × 8` waiting) that is full
    /// (`max` jobs, or `cap` bytes of inputs) or whose oldest job has waited `wait`; a job
    /// to send alone goes at once. A group still filling never holds up another.
    fn next_turn(
        &mut self,
        batch: Option<Batch>,
        cap: u64,
        wake_at: &mut Option<Instant>,
    ) -> Option<Turn> {
        let &(head, _) = self.waiting.front()?;
        let Some(batch) = batch else {
            self.waiting.pop_front();
            self.running.insert(head, CancellationToken::new());
            return Some(Turn::One(head));
        };
        let max = batch.max.max(1) as usize;
        let mut groups: Vec<Filling> = Vec::new();
        let mut alone = None;
        for (id, since) in self.waiting.iter().take(max * BATCH_LOOKAHEAD) {
            let meta = match self.held.get(id) {
                Some(meta) if !self.alone.contains(id) => meta,
                _ => {
                    alone = Some(*id);
                    break;
                }
            };
            let g = match groups.iter().position(|g| g.meta.same_group(meta)) {
                Some(g) => &mut groups[g],
                None => {
                    groups.push(Filling {
                        meta: meta.clone(),
                        since: *since,
                        ids: Vec::with_capacity(max),
                        bytes: 0,
                        full: false,
                    });
                    groups.last_mut().expect("just pushed")
                }
            };
            if g.full {
                continue;
            }
            // A batch's inputs come to at most `cap`, unless its first job alone is bigger.
            if !g.ids.is_empty() && g.bytes + meta.bytes > cap {
                g.full = true;
                continue;
            }
            g.bytes += meta.bytes;
            g.ids.push(*id);
            g.full = g.ids.len() == max;
        }
        let picked = match alone {
            Some(id) => vec![id],
            None => {
                let ready = groups
                    .iter()
                    .position(|g| g.full || g.since.elapsed() >= batch.wait);
                let Some(ready) = ready else {
                    let wait = batch.wait.max(Duration::from_millis(1));
                    *wake_at = groups.iter().map(|g| g.since + wait).min();
                    return None;
                };
                groups.swap_remove(ready).ids
            }
        };
        let set: HashSet<u64> = picked.iter().copied().collect();
        self.waiting.retain(|(id, _)| !set.contains(id));
        for id in &picked {
            self.running.insert(*id, CancellationToken::new());
        }
        Some(Turn::Batch(picked))
    }
}

/// A batch being gathered in [`Queue::next_turn`].
struct Filling {
    meta: Meta,
    since: Instant,
    ids: Vec<u64>,
    bytes: u64,
    full: bool,
}
