//! Each function's jobs in memory: waiting in order, taken to run, and how many turns
//! (requests) are in flight. In batch mode (`[jobs] batch`) one turn takes up to `max`
//! waiting jobs of the same path and priority, once that many wait or the oldest of them
//! has waited `wait`.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::{JobRecord, Jobs, MAX_BODY};
use crate::history::format_id;
use crate::manifest::Batch;

/// What the queue knows of a job without reading its record: which jobs may share a
/// batch, and its input's size.
#[derive(Debug, Clone, Copy)]
pub(super) struct Meta {
    group: u64,
    bytes: u64,
}

impl Meta {
    pub(super) fn of(job: &JobRecord) -> Meta {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (&job.path, job.priority as u8).hash(&mut h);
        Meta {
            group: h.finish(),
            bytes: job.input_bytes,
        }
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
        let (limit, batch) = activator.function(function).map_or((1, None), |f| {
            let m = &f.revision().manifest;
            let jobs = m.jobs.as_ref();
            let per_instance = jobs
                .and_then(|j| j.concurrency)
                .unwrap_or(m.scale.concurrency) as usize;
            let s = activator.status(&f);
            let instances = s.ready + s.starting + s.paused;
            let room = (instances + 1).min(m.scale.max as usize).max(1);
            (room * per_instance.max(1), jobs.and_then(|j| j.batch))
        });
        let mut turns = Vec::new();
        let mut wake_at = None;
        {
            let mut queues = self.lock();
            let Some(q) = queues.get_mut(function) else {
                return;
            };
            while q.turns < limit {
                let Some(turn) = q.next_turn(batch, &mut wake_at) else {
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

    /// A turn ended: the next may go. For each of its jobs, `again`: it waits out a
    /// back-off (still held); otherwise this queue lets go of it.
    pub(super) fn turn_over(&self, function: &str, jobs: &[(u64, bool)]) {
        if let Some(q) = self.lock().get_mut(function) {
            q.turns = q.turns.saturating_sub(1);
            for (id, again) in jobs {
                q.running.remove(id);
                if !again {
                    q.held.remove(id);
                    q.alone.remove(id);
                }
            }
        }
        self.pump(function);
    }
}

impl Queue {
    /// Takes the next turn from the front of the queue, or `None` (with `wake_at` set when a
    /// partial batch waits to fill).
    fn next_turn(&mut self, batch: Option<Batch>, wake_at: &mut Option<Instant>) -> Option<Turn> {
        let &(head, since) = self.waiting.front()?;
        let Some(batch) = batch else {
            self.waiting.pop_front();
            self.running.insert(head, CancellationToken::new());
            return Some(Turn::One(head));
        };
        if self.alone.contains(&head) {
            self.waiting.pop_front();
            self.running.insert(head, CancellationToken::new());
            return Some(Turn::Batch(vec![head]));
        }
        let max = batch.max.max(1) as usize;
        let group = self.held.get(&head).map(|m| m.group);
        let mut picked = Vec::with_capacity(max);
        let mut bytes = 0u64;
        let mut full = false;
        for (id, _) in self.waiting.iter().take(max * BATCH_LOOKAHEAD) {
            let Some(meta) = self.held.get(id) else {
                continue;
            };
            if Some(meta.group) != group || self.alone.contains(id) {
                continue;
            }
            // One batch's request carries at most what one job's input may be, unless its
            // first job alone is that big.
            if !picked.is_empty() && bytes + meta.bytes > MAX_BODY as u64 {
                full = true;
                break;
            }
            bytes += meta.bytes;
            picked.push(*id);
            if picked.len() == max {
                break;
            }
        }
        if picked.is_empty() {
            // Not a job this queue knows the size of: it goes in a batch of its own.
            self.waiting.pop_front();
            self.running.insert(head, CancellationToken::new());
            return Some(Turn::Batch(vec![head]));
        }
        let full = full || picked.len() == max;
        let waited = since.elapsed() >= batch.wait;
        if !full && !waited {
            *wake_at = Some(since + batch.wait.max(Duration::from_millis(1)));
            return None;
        }
        let set: HashSet<u64> = picked.iter().copied().collect();
        self.waiting.retain(|(id, _)| !set.contains(id));
        for id in &picked {
            self.running.insert(*id, CancellationToken::new());
        }
        Some(Turn::Batch(picked))
    }
}
