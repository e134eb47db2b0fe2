//! ComfyUI's `PromptQueue`: the pending prompts in run order, the one running, and the
//! history of finished ones, behind one lock. It only keeps state; the worker in
//! `exec.rs` runs prompts and the routes in `api.rs` read and change the queue. Nothing
//! here sends on a socket: callers send `status` after a change, outside the lock.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};

use crate::json::{quote, Json};
use crate::{str_list, to_json};

/// ComfyUI's `MAXIMUM_HISTORY_SIZE`: the oldest entry goes when there are more.
const MAX_HISTORY: usize = 10_000;

/// A queued prompt: ComfyUI's `(number, prompt_id, prompt, extra_data, outputs)`.
pub struct Task {
    /// Its place in the run order (lower first); negative for `front`.
    pub number: f64,
    /// `number` as the answers show it (an integer, or a float when the client gave one).
    pub number_text: String,
    pub id: String,
    /// The graph, as posted.
    pub prompt: Json,
    /// An object; `client_id` is copied in from the request.
    pub extra_data: Json,
    /// The output nodes to execute.
    pub outputs: Vec<String>,
    /// Arrival order, to keep equal numbers first in, first out.
    seq: u64,
}

impl Task {
    /// A task; its arrival order is set when it is queued.
    pub fn new(number: (f64, String), id: String, prompt: Json, extra_data: Json, outputs: Vec<String>) -> Task {
        Task { number: number.0, number_text: number.1, id, prompt, extra_data, outputs, seq: 0 }
    }

    /// The client id the prompt's messages go to, if it has one.
    pub fn client_id(&self) -> Option<String> {
        match self.extra_data.get("client_id")? {
            Json::Str(s) => Some(s.clone()),
            Json::Null => None,
            other => Some(to_json(other, false)),
        }
    }

    /// The task as `/queue` and `/history` show it: a five-element list.
    pub fn render(&self) -> String {
        format!(
            "[{},{},{},{},{}]",
            self.number_text,
            quote(&self.id),
            to_json(&self.prompt, false),
            to_json(&self.extra_data, false),
            str_list(&self.outputs)
        )
    }
}

/// The running prompt, as the routes and sockets need to see it.
struct Running {
    id: String,
    rendered: String,
    client_id: Option<String>,
    /// The node executing now (ComfyUI's `last_node_id`), sent again to a client that
    /// reconnects.
    node: Option<String>,
}

struct State {
    /// ComfyUI's `server.number`: the number the next prompt without one gets.
    counter: u64,
    seq: u64,
    /// Sorted by number, then arrival.
    pending: Vec<Task>,
    running: Option<Running>,
    /// Finished prompts, oldest first: id and the entry as JSON.
    history: Vec<(String, String)>,
}

/// The queue, shared by the routes and the worker.
pub struct Queue {
    state: Mutex<State>,
    ready: Condvar,
    /// Set by `/interrupt`; the worker checks it between nodes and sampling steps.
    interrupt: AtomicBool,
}

impl Queue {
    pub fn new() -> Queue {
        let state = State { counter: 0, seq: 0, pending: Vec::new(), running: None, history: Vec::new() };
        Queue { state: Mutex::new(state), ready: Condvar::new(), interrupt: AtomicBool::new(false) }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The number for a new prompt, as ComfyUI picks it: the client's `number` (a float)
    /// if given, else the counter (which then moves on), negated for `front`.
    pub fn number(&self, given: Option<&Json>, front: bool) -> Option<(f64, String)> {
        if let Some(given) = given {
            let n = crate::graph::number(given, false).filter(|n| n.is_finite())?;
            let text = if n.fract() == 0.0 && n.abs() < 1e16 { format!("{n:.1}") } else { crate::num(n) };
            return Some((n, text));
        }
        let mut state = self.lock();
        let n = state.counter as f64;
        state.counter += 1;
        let n = if front { -n } else { n };
        Some((n, crate::num(n)))
    }

    /// Queues a task; the prompts remaining (pending and running).
    pub fn put(&self, mut task: Task) -> usize {
        let mut state = self.lock();
        state.seq += 1;
        task.seq = state.seq;
        let at = state.pending.partition_point(|t| (t.number, t.seq) <= (task.number, task.seq));
        state.pending.insert(at, task);
        self.ready.notify_one();
        remaining(&state)
    }

    /// Waits for the next task and marks it running; also the prompts remaining. Clears
    /// any interrupt left from before, as ComfyUI does when a prompt starts.
    pub fn take(&self) -> (Task, usize) {
        let mut state = self.lock();
        while state.pending.is_empty() {
            state = self.ready.wait(state).unwrap_or_else(|e| e.into_inner());
        }
        let task = state.pending.remove(0);
        state.running =
            Some(Running { id: task.id.clone(), rendered: task.render(), client_id: task.client_id(), node: None });
        self.interrupt.store(false, Ordering::SeqCst);
        (task, remaining(&state))
    }

    /// Records the node the running prompt is executing.
    pub fn set_node(&self, node: Option<&str>) {
        if let Some(running) = self.lock().running.as_mut() {
            running.node = node.map(str::to_string);
        }
    }

    /// The node to tell a client reconnecting as `sid`, if it owns the running prompt.
    pub fn node_for(&self, sid: &str) -> Option<String> {
        let state = self.lock();
        let running = state.running.as_ref()?;
        running.node.clone().filter(|_| running.client_id.as_deref() == Some(sid))
    }

    /// Ends the running prompt, keeping `entry` (JSON) as its history; the prompts remaining.
    pub fn finish(&self, id: &str, entry: String) -> usize {
        let mut state = self.lock();
        state.running = None;
        // As a Python dict: a re-used id keeps its place and takes the new entry.
        match state.history.iter_mut().find(|(k, _)| k == id) {
            Some(slot) => slot.1 = entry,
            None => state.history.push((id.to_string(), entry)),
        }
        if state.history.len() > MAX_HISTORY {
            state.history.remove(0);
        }
        remaining(&state)
    }

    /// Pending plus running, ComfyUI's `queue_remaining`.
    pub fn remaining(&self) -> usize {
        remaining(&self.lock())
    }

    /// `GET /queue`: `{"queue_running": [...], "queue_pending": [...]}`.
    pub fn render(&self) -> String {
        let state = self.lock();
        let running: Vec<&str> = state.running.iter().map(|r| r.rendered.as_str()).collect();
        let pending: Vec<String> = state.pending.iter().map(Task::render).collect();
        format!(r#"{{"queue_running":[{}],"queue_pending":[{}]}}"#, running.join(","), pending.join(","))
    }

    /// Drops every pending prompt (not the running one).
    pub fn clear_pending(&self) {
        self.lock().pending.clear();
    }

    /// Drops the pending prompt `id`; whether there was one.
    pub fn delete_pending(&self, id: &str) -> bool {
        let mut state = self.lock();
        let before = state.pending.len();
        if let Some(at) = state.pending.iter().position(|t| t.id == id) {
            state.pending.remove(at);
        }
        state.pending.len() != before
    }

    /// Interrupts the running prompt: any, or only `id` when given and running.
    pub fn interrupt(&self, id: Option<&str>) {
        let state = self.lock();
        let matches = match id {
            Some(id) => state.running.as_ref().is_some_and(|r| r.id == id),
            None => true,
        };
        if matches {
            self.interrupt.store(true, Ordering::SeqCst);
        }
    }

    /// Whether the running prompt has been interrupted.
    pub fn interrupted(&self) -> bool {
        self.interrupt.load(Ordering::SeqCst)
    }

    /// `GET /history`: entries from `offset` (by default the last `max_items`), at most
    /// `max_items`, oldest first, exactly as ComfyUI's `get_history` picks them.
    pub fn history(&self, max_items: Option<usize>, offset: Option<i64>) -> String {
        let state = self.lock();
        let mut offset = offset.unwrap_or(-1);
        if offset < 0 {
            if let Some(max) = max_items {
                offset = state.history.len() as i64 - max as i64;
            }
        }
        let picked: Vec<String> = state
            .history
            .iter()
            .enumerate()
            .filter(|(i, _)| *i as i64 >= offset)
            .take(max_items.unwrap_or(usize::MAX))
            .map(|(_, (id, entry))| format!("{}:{entry}", quote(id)))
            .collect();
        format!("{{{}}}", picked.join(","))
    }

    /// `GET /history/ID`: `{ID: entry}`, or `{}`.
    pub fn history_item(&self, id: &str) -> String {
        let state = self.lock();
        state
            .history
            .iter()
            .find(|(k, _)| k == id)
            .map_or_else(|| "{}".to_string(), |(k, entry)| format!("{{{}:{entry}}}", quote(k)))
    }

    /// Forgets every finished prompt.
    pub fn clear_history(&self) {
        self.lock().history.clear();
    }

    /// Forgets the finished prompt `id`.
    pub fn delete_history(&self, id: &str) {
        self.lock().history.retain(|(k, _)| k != id);
    }
}

fn remaining(state: &State) -> usize {
    state.pending.len() + usize::from(state.running.is_some())
}
