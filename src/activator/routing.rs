//! Which ready instance a request with a routing key gets (without one: the least loaded,
//! chosen in `Function::take_slot`).
//!
//! The key is the front door's hash of a prompt prefix; the choice is consistent hashing
//! with bounded loads, as
//! KubeAI's CHWBL. Each instance owns the keys it scores highest for (rendezvous hashing:
//! the ring without a ring, so there is no ring to rebuild as instances come and go, and
//! an instance joining or leaving moves only its own share of keys). The request walks
//! the instances in its key's order and takes the first whose load stays within
//! `load_factor × the mean` once it is counted, so a hot prefix spills over to its next
//! instances instead of piling onto one.

/// What routing needs to know of one instance.
#[derive(Debug, Clone, Copy)]
pub(super) struct Candidate<'a> {
    /// The instance's id: what keys are hashed against.
    pub id: &'a str,
    /// Requests in flight on it.
    pub in_flight: u32,
    /// Whether it can take one more now.
    pub free: bool,
}

/// The index of the instance in `candidates` a request with `key` goes to: the first in
/// the key's order whose load stays within the bound, else the least loaded free one;
/// `None` when none is free. `candidates` are the instances of one tier (the current
/// revision, not evacuating), free or not: the mean counts them all. Requests without a
/// key never come here (the caller takes the least loaded without building candidates).
pub(super) fn pick(candidates: &[Candidate<'_>], key: u64, load_factor: f64) -> Option<usize> {
    let total: u64 = candidates.iter().map(|c| u64::from(c.in_flight)).sum();
    // The bound, counting this request: ceil(load_factor × mean).
    let bound = (load_factor * (total + 1) as f64 / candidates.len().max(1) as f64).ceil();
    let mut order: Vec<(u64, usize)> = candidates
        .iter()
        .enumerate()
        .map(|(i, c)| (score(key, c.id), i))
        .collect();
    order.sort_unstable_by(|a, b| b.cmp(a));
    order
        .into_iter()
        .map(|(_, i)| i)
        .find(|&i| candidates[i].free && f64::from(candidates[i].in_flight + 1) <= bound)
        .or_else(|| {
            candidates
                .iter()
                .enumerate()
                .filter(|(_, c)| c.free)
                .min_by_key(|(_, c)| c.in_flight)
                .map(|(i, _)| i)
        })
}

/// The rendezvous score of `key` on the instance `id`.
fn score(key: u64, id: &str) -> u64 {
    mix(key ^ fnv1a(id.as_bytes()))
}

/// FNV-1a, 64 bits: stable across processes and releases (unlike std's hasher).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// splitmix64's finaliser: spreads close inputs over the whole range.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn idle(ids: &[String]) -> Vec<Candidate<'_>> {
        ids.iter()
            .map(|id| Candidate {
                id,
                in_flight: 0,
                free: true,
            })
            .collect()
    }

    fn ids(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("inst-{i}")).collect()
    }

    #[test]
    fn when_no_instance_within_the_bound_is_free_the_least_loaded_free_one_wins() {
        let ids = ids(3);
        let mut c = idle(&ids);
        c[0].in_flight = 3;
        c[1].in_flight = 2;
        c[2].in_flight = 0;
        c[2].free = false;
        // Total 5: the bound is ceil(1.0 × 6 / 3) = 2; neither free instance fits, so
        // every key gets the least loaded free one.
        for key in 0..50 {
            assert_eq!(pick(&c, key, 1.0), Some(1));
        }
        c.iter_mut().for_each(|c| c.free = false);
        assert_eq!(pick(&c, 7, 1.25), None);
    }

    #[test]
    fn keys_spread_evenly_and_a_leaving_instance_moves_only_its_own_keys() {
        let four = ids(4);
        let keys: Vec<u64> = (0..4000u64).map(|k| fnv1a(&k.to_le_bytes())).collect();
        let before: Vec<usize> = keys
            .iter()
            .map(|&k| pick(&idle(&four), k, 1.25).unwrap())
            .collect();
        for i in 0..4 {
            let share = before.iter().filter(|&&x| x == i).count();
            assert!(
                (800..1200).contains(&share),
                "instance {i} owns {share} of 4000"
            );
        }
        // inst-3 leaves: only its keys move.
        let three = ids(3);
        for (&k, &was) in keys.iter().zip(&before) {
            let now = pick(&idle(&three), k, 1.25).unwrap();
            if was != 3 {
                assert_eq!(now, was, "key {k} moved without its instance leaving");
            }
        }
    }

    #[test]
    fn a_hot_key_spills_to_its_next_instance_once_its_own_passes_the_bound() {
        let ids = ids(4);
        let key = 42;
        let first = pick(&idle(&ids), key, 1.25).unwrap();
        let mut c = idle(&ids);
        // Loads 2,2,2,2 with the owner at 2: the bound is ceil(1.25 × 9 / 4) = 3; it fits.
        c.iter_mut().for_each(|c| c.in_flight = 2);
        assert_eq!(pick(&c, key, 1.25), Some(first));
        // The owner at 3 with the others at 2 (total 9): ceil(1.25 × 10 / 4) = 4; it fits.
        c[first].in_flight = 3;
        assert_eq!(pick(&c, key, 1.25), Some(first));
        // The owner at 4 (total 10): bound ceil(1.25 × 11 / 4) = 4; 5 does not fit.
        c[first].in_flight = 4;
        let spill = pick(&c, key, 1.25).unwrap();
        assert_ne!(spill, first);
        // The spill goes to the same next instance every time.
        assert_eq!(pick(&c, key, 1.25), Some(spill));
    }

    #[test]
    fn a_long_run_of_one_key_keeps_every_instance_within_the_bound() {
        let ids = ids(4);
        let mut c = idle(&ids);
        for _ in 0..400 {
            let i = pick(&c, 99, 1.25).unwrap();
            c[i].in_flight += 1;
            let total: u32 = c.iter().map(|c| c.in_flight).sum();
            let max = c.iter().map(|c| c.in_flight).max().unwrap();
            let bound = (1.25 * f64::from(total) / 4.0).ceil() as u32;
            assert!(
                max <= bound.max(1),
                "max {max} above {bound} at total {total}"
            );
        }
    }
}
