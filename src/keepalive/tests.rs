//! The keep-alive policies' decisions on hand-made gap histories.

use super::*;

fn minutes(m: u64) -> Duration {
    Duration::from_secs(60 * m)
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// Share of `gaps` that `w` covers when starts take `start`.
fn share(w: Windows, start: Duration, gaps: &[Duration]) -> f64 {
    let hit = gaps.iter().filter(|&&g| w.covers(g, start)).count();
    hit as f64 / gaps.len() as f64
}

/// Share of `gaps` the policy's windows now cover.
fn covered(h: &Hybrid, gaps: &[Duration]) -> f64 {
    share(h.windows(), h.start_time(), gaps)
}

#[test]
fn fixed_keeps_instances_for_its_timeout_and_never_prewarms() {
    let mut f = Fixed::new(minutes(10));
    f.observe_gap(minutes(3));
    f.observe_start(minutes(1));
    assert_eq!(
        f.windows(),
        Windows {
            prewarm: Duration::ZERO,
            keep_alive: minutes(10)
        }
    );
}

#[test]
fn windows_cover_a_call_only_once_the_prewarmed_instance_is_ready() {
    let keep = Windows {
        prewarm: Duration::ZERO,
        keep_alive: minutes(10),
    };
    assert!(keep.covers(minutes(9), minutes(1)));
    assert!(!keep.covers(minutes(10), Duration::ZERO));
    let prewarm = Windows {
        prewarm: minutes(20),
        keep_alive: minutes(5),
    };
    assert!(!prewarm.covers(minutes(19), Duration::ZERO));
    assert!(
        !prewarm.covers(minutes(20) + secs(30), minutes(1)),
        "still loading"
    );
    assert!(prewarm.covers(minutes(21), minutes(1)));
    assert!(prewarm.covers(minutes(25) + secs(59), minutes(1)));
    assert!(!prewarm.covers(minutes(26), minutes(1)));
}

#[test]
fn hybrid_falls_back_until_it_has_enough_gaps() {
    let mut h = Hybrid::new(minutes(10));
    for _ in 0..(MIN_SAMPLES - 1) {
        h.observe_gap(minutes(30));
    }
    assert_eq!(h.windows().keep_alive, minutes(10));
    assert!(h.windows().prewarm.is_zero());
}

#[test]
fn a_periodic_function_is_unloaded_then_prewarmed_just_before_its_next_call() {
    let mut h = Hybrid::new(minutes(10));
    for _ in 0..20 {
        h.observe_gap(minutes(30) + secs(10));
    }
    let w = h.windows();
    assert!(w.prewarm > minutes(25) && w.prewarm < minutes(30), "{w:?}");
    assert!(
        w.covers(minutes(30) + secs(10), Duration::ZERO),
        "covers the next call: {w:?}"
    );
    assert!(
        w.prewarm + w.keep_alive <= minutes(31),
        "and no more: {w:?}"
    );
    assert_eq!(
        idle_threshold(&w, minutes(1)),
        Duration::ZERO,
        "unload after the call"
    );
    assert!(!prewarm_due(&w, minutes(29)));
    assert!(prewarm_due(&w, minutes(30)));
    assert!(!prewarm_due(&w, minutes(40)));
}

#[test]
fn a_slow_start_is_prewarmed_that_much_earlier() {
    let periodic = |start: Option<Duration>| {
        let mut h = Hybrid::new(minutes(10));
        if let Some(took) = start {
            h.observe_start(took);
        }
        for _ in 0..20 {
            h.observe_gap(minutes(30) + secs(10));
        }
        h
    };
    let (quick, slow) = (periodic(None), periodic(Some(secs(45))));
    assert_eq!(slow.start_time(), secs(45));
    assert_eq!(
        slow.windows().prewarm + secs(45) + secs(45).mul_f64(MARGIN),
        quick.windows().prewarm,
        "the load begins its length ahead"
    );
    assert!(slow
        .windows()
        .covers(minutes(30) + secs(10), slow.start_time()));
}

#[test]
fn the_start_time_is_a_running_estimate() {
    let mut h = Hybrid::new(minutes(10));
    h.observe_start(secs(40));
    assert_eq!(h.start_time(), secs(40));
    h.observe_start(secs(0));
    assert_eq!(h.start_time(), secs(30), "a quarter of the newest");
}

#[test]
fn frequent_short_gaps_keep_the_instance_without_prewarming() {
    let mut h = Hybrid::new(minutes(10));
    for _ in 0..50 {
        h.observe_gap(secs(20));
    }
    let w = h.windows();
    assert!(w.prewarm.is_zero(), "{w:?}");
    assert!(
        w.keep_alive <= minutes(2),
        "much shorter than the fixed 10: {w:?}"
    );
}

#[test]
fn rare_long_gaps_are_not_worth_keeping_warm_for() {
    // Nine in ten gaps are short; the rest spread over one to three hours, where the
    // 99th percentile (the paper's keep-alive) would keep the instance for three hours
    // after every call to save one cold start in ten.
    let mut h = Hybrid::new(minutes(10));
    for i in 0..200u64 {
        let gap = if i % 10 == 9 {
            minutes(60 + i % 120)
        } else {
            secs(20)
        };
        h.observe_gap(gap);
    }
    assert!(!h.below_service_level());
    let w = h.windows();
    assert_eq!(
        w,
        Windows {
            prewarm: Duration::ZERO,
            keep_alive: BIN
        }
    );
}

#[test]
fn a_dear_start_buys_a_longer_keep_alive() {
    // Gaps spread evenly over 1 to 25 minutes: keeping the instance through all of them
    // costs about 13 minutes a gap, more than a cold start priced at 10; with a 5-minute
    // model load more of them are worth covering.
    let gaps: Vec<Duration> = (0..96u64).map(|i| secs(60 + i * 15)).collect();
    let feed = |start: Duration| {
        let mut h = Hybrid::new(minutes(10));
        h.observe_start(start);
        for &g in &gaps {
            h.observe_gap(g);
        }
        h
    };
    let (cheap, dear) = (feed(secs(1)), feed(minutes(5)));
    let short = cheap.choose(false);
    let long = dear.choose(false);
    assert!(
        share(long, dear.start_time(), &gaps) > share(short, cheap.start_time(), &gaps) + 0.2,
        "{short:?} against {long:?}"
    );
}

#[test]
fn a_function_left_cold_too_often_is_widened_by_the_service_level() {
    // Gaps spread over 35 minutes to 3 hours: the price alone keeps nothing warm, and
    // almost every call is cold.
    let gaps: Vec<Duration> = (0..60u64).map(|i| minutes(35 + (i * 7) % 140)).collect();
    let mut h = Hybrid::new(minutes(10));
    for &g in &gaps {
        h.observe_gap(g);
    }
    let priced = h.choose(false);
    assert!(share(priced, h.start_time(), &gaps) <= 0.1, "{priced:?}");
    assert!(h.below_service_level());
    assert!(
        covered(&h, &gaps) >= 1.0 - SERVICE_LEVEL,
        "{:?} covers {}",
        h.windows(),
        covered(&h, &gaps)
    );
}

#[test]
fn the_service_level_lets_go_once_calls_find_instances_again() {
    let mut h = Hybrid::new(minutes(10));
    for i in 0..30u64 {
        h.observe_gap(minutes(35 + (i * 7) % 140));
    }
    assert!(h.below_service_level());
    for _ in 0..RECENT_GAPS * 2 {
        h.observe_gap(secs(20));
    }
    assert!(!h.below_service_level());
}

#[test]
fn gaps_beyond_the_range_are_not_kept_warm_for() {
    let mut h = Hybrid::new(minutes(10));
    for _ in 0..20 {
        h.observe_gap(minutes(60 * 48));
    }
    assert_eq!(
        h.windows(),
        Windows {
            prewarm: Duration::ZERO,
            keep_alive: Duration::ZERO
        },
        "unloaded at once"
    );
    assert!(
        h.below_service_level(),
        "no window could help: the cheapest stays"
    );
}

#[test]
fn a_period_of_hours_is_prewarmed_from_the_coarse_bins_under_the_service_level() {
    let gap = minutes(5 * 60 + 10);
    let mut h = Hybrid::new(minutes(10));
    for _ in 0..20 {
        h.observe_gap(gap);
    }
    assert!(h.below_service_level());
    let w = h.windows();
    assert!(w.covers(gap, h.start_time()), "{w:?}");
    assert!(w.prewarm >= minutes(4 * 60), "unloaded in between: {w:?}");
}

#[test]
fn the_service_level_spends_a_bounded_multiple_of_the_priced_cost() {
    // Gaps spread over 5 to 24 hours: covering most of them would keep the instance
    // loaded for most of each day, far more than its cold starts are worth.
    let mut h = Hybrid::new(minutes(10));
    for i in 0..60u64 {
        h.observe_gap(minutes(300 + (i * 97) % 1100));
    }
    assert!(h.below_service_level());
    assert_eq!(h.windows(), h.choose(false), "not widened");
}

#[test]
fn a_full_bin_halves_the_histogram_so_older_gaps_weigh_less() {
    let mut h = Hybrid::new(minutes(10));
    for _ in 0..4 {
        h.observe_gap(minutes(30));
    }
    for _ in 0..u32::from(u16::MAX) + 1 {
        h.observe_gap(secs(20));
    }
    assert_eq!(h.bins[0], u16::MAX / 2 + 1);
    assert_eq!(h.bins[30], 2, "halved with the rest");
}

#[test]
fn the_policy_state_stays_about_six_hundred_bytes() {
    let h = Hybrid::new(minutes(10));
    let bytes = std::mem::size_of_val(&h) + std::mem::size_of_val(&*h.bins);
    assert!(
        bytes <= 700,
        "a function's keep-alive state takes {bytes} bytes"
    );
}

/// Seen in review: a gap of a few seconds was priced as half a bin (30 s), so with a short
/// `idle_timeout` unloading after every call looked cheaper than keeping the instance.
#[test]
fn a_function_called_every_few_seconds_is_kept_even_with_a_short_idle_timeout() {
    for (idle_timeout, start) in [(20, Some(secs(1))), (30, None), (10, Some(secs(5)))] {
        let mut h = Hybrid::new(secs(idle_timeout));
        if let Some(start) = start {
            h.observe_start(start);
        }
        let gaps = vec![secs(2); 64];
        for &g in &gaps {
            h.observe_gap(g);
        }
        let w = h.windows();
        assert!(w.prewarm.is_zero(), "{idle_timeout}s: {w:?}");
        assert_eq!(covered(&h, &gaps), 1.0, "{idle_timeout}s: {w:?}");
    }
}

#[test]
fn pricing_is_redone_when_a_bin_fills_not_on_every_gap() {
    let mut h = Hybrid::new(minutes(10));
    for _ in 0..=MIN_SAMPLES {
        h.observe_gap(secs(2));
    }
    assert_eq!(h.unpriced, 1, "a gap in a known bin waits");
    h.observe_gap(secs(61));
    assert_eq!(h.unpriced, 0, "a first gap in a new bin reprices at once");
    assert!(!h.below_service_level());
    for i in 1..RECOMPUTE_EVERY {
        h.observe_gap(secs(2));
        assert_eq!(h.unpriced, i);
    }
    h.observe_gap(secs(2));
    assert_eq!(h.unpriced, 0, "and every RECOMPUTE_EVERY gaps");
}
