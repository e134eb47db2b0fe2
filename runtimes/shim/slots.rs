//! The concurrency limit: `--concurrency` slots, one taken per running command and given
//! back when its answer is sent. A request that finds none free is refused at once (429),
//! never queued: Ember's gateway is where requests wait, and it scales out on them.
//! The slots also know each running command's process group, so a shutdown whose grace
//! runs out can kill them.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Instant;

use crate::sys;

pub struct Slots {
    limit: usize,
    state: Mutex<State>,
    changed: Condvar,
}

#[derive(Default)]
struct State {
    used: usize,
    /// Process groups of the commands running now.
    groups: Vec<u32>,
}

/// A taken slot; dropping it gives the slot back.
pub struct Slot<'a> {
    slots: &'a Slots,
    pgid: Option<u32>,
}

impl Slots {
    pub fn new(limit: usize) -> Slots {
        Slots {
            limit,
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A free slot, or `None` when `limit` commands already run.
    pub fn try_take(&self) -> Option<Slot<'_>> {
        let mut state = self.lock();
        if state.used >= self.limit {
            return None;
        }
        state.used += 1;
        Some(Slot {
            slots: self,
            pgid: None,
        })
    }

    /// Waits until no slot is taken or `until` passes; whether none is.
    pub fn wait_idle(&self, until: Instant) -> bool {
        let mut state = self.lock();
        while state.used > 0 {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            state = self
                .changed
                .wait_timeout(state, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }

    /// Kills every running command's process group; how many there were.
    pub fn kill_all(&self) -> usize {
        let groups = self.lock().groups.clone();
        for pgid in &groups {
            let _ = sys::kill_group(*pgid);
        }
        groups.len()
    }
}

impl Slot<'_> {
    /// Records the process group of the command this slot runs.
    pub fn track(&mut self, pgid: u32) {
        self.pgid = Some(pgid);
        self.slots.lock().groups.push(pgid);
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        let mut state = self.slots.lock();
        state.used -= 1;
        if let Some(pgid) = self.pgid {
            state.groups.retain(|g| *g != pgid);
        }
        self.slots.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn one_past_the_limit_is_refused_until_a_slot_is_given_back() {
        let slots = Slots::new(2);
        let a = slots.try_take().unwrap();
        let _b = slots.try_take().unwrap();
        assert!(slots.try_take().is_none());
        drop(a);
        assert!(slots.try_take().is_some());
    }

    #[test]
    fn waiting_for_idle_ends_when_the_last_slot_is_given_back() {
        let slots = Slots::new(1);
        let soon = Instant::now() + Duration::from_millis(20);
        let slot = slots.try_take().unwrap();
        assert!(!slots.wait_idle(soon), "a taken slot keeps it busy");
        std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(20));
                drop(slot);
            });
            assert!(slots.wait_idle(Instant::now() + Duration::from_secs(5)));
        });
    }
}
