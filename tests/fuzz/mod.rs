//! Bounded in-process fuzzing, shared by `fuzz_manifest.rs` and `fuzz_wire.rs`: a seeded
//! proptest runner driven until a deadline rather than for a number of cases, so CI spends
//! a fixed time on it and a longer run is one variable away.
//!
//! - `EMBER_FUZZ_SECS`: seconds per property (default [`DEFAULT_SECS`]);
//! - `EMBER_FUZZ_SEED`: the seed (default [`DEFAULT_SEED`]); a failure prints the seed it
//!   ran with and the shrunk input, which then becomes a plain `#[test]`.
//!
//! Also the hostile JSON values both files feed to the parsers.
#![allow(dead_code)]

pub mod doc;

use std::fmt::Debug;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestError, TestRng, TestRunner};
use serde_json::Value;

/// Seconds each property runs for unless `EMBER_FUZZ_SECS` says otherwise.
pub const DEFAULT_SECS: f64 = 8.0;
/// The seed unless `EMBER_FUZZ_SEED` says otherwise ("ember"): CI runs the same cases
/// every time.
pub const DEFAULT_SEED: u64 = 0x0065_6d62_6572;
/// Cases per round; the deadline is looked at between rounds.
const CASES_PER_ROUND: u32 = 64;

/// The seed this run uses.
pub fn seed() -> u64 {
    match std::env::var("EMBER_FUZZ_SEED") {
        Ok(s) => s
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("EMBER_FUZZ_SEED={s:?} is not a whole number")),
        Err(_) => DEFAULT_SEED,
    }
}

/// How long each property runs.
pub fn budget() -> Duration {
    match std::env::var("EMBER_FUZZ_SECS") {
        Ok(s) => s
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|secs| secs.is_finite() && *secs >= 0.0)
            .map(Duration::from_secs_f64)
            .unwrap_or_else(|| panic!("EMBER_FUZZ_SECS={s:?} is not a number of seconds")),
        Err(_) => Duration::from_secs_f64(DEFAULT_SECS),
    }
}

/// Runs `test` on values of `strategy` until the budget is spent (at least one round).
/// A failing case is shrunk and reported with the seed to run it again.
pub fn fuzz<S>(name: &str, strategy: S, test: impl Fn(S::Value) -> Result<(), TestCaseError>)
where
    S: Strategy,
    S::Value: Debug,
{
    let seed = seed();
    // Each property gets its own stream, so adding one does not change the others' cases.
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    for (i, b) in name.bytes().enumerate() {
        bytes[8 + i % 24] ^= b;
    }
    let config = Config {
        cases: CASES_PER_ROUND,
        failure_persistence: None,
        max_shrink_time: 60_000,
        ..Config::default()
    };
    // A runner counts its cases for good; each round gets a new one, seeded from this.
    let mut rounds_rng = TestRunner::new_with_rng(
        config.clone(),
        TestRng::from_seed(RngAlgorithm::ChaCha, &bytes),
    );
    let budget = budget();
    let started = Instant::now();
    let mut rounds = 0u64;
    loop {
        let mut runner = TestRunner::new_with_rng(config.clone(), rounds_rng.new_rng());
        match runner.run(&strategy, &test) {
            Ok(()) => rounds += 1,
            Err(TestError::Fail(why, input)) => panic!(
                "{name} failed: {why}\nminimal input: {input:?}\n\
                 run again with EMBER_FUZZ_SEED={seed}"
            ),
            Err(TestError::Abort(why)) => panic!("{name} gave up: {why}"),
        }
        if started.elapsed() >= budget {
            break;
        }
    }
    eprintln!(
        "{name}: {} cases in {:.1?} (EMBER_FUZZ_SEED={seed})",
        rounds * u64::from(CASES_PER_ROUND),
        started.elapsed()
    );
}

/// Strings a parser may choke on: empty, blank, control characters, unicode, long ones,
/// and numbers, sizes and durations past every limit.
pub fn hostile_string() -> impl Strategy<Value = String> {
    let words = prop::sample::select(vec![
        "",
        " ",
        "\u{0}",
        "\u{7f}",
        "\u{202e}",
        "é",
        "🔥",
        "\\",
        "\"",
        "a|b",
        "-1",
        "-1s",
        "0s",
        "1ns",
        "24h 1ns",
        "99999999999999h",
        "18446744073709551615s",
        "18446744073709551616B",
        "18446744073709551615B",
        "9223372036854775808",
        "16EiB",
        "16 EiB",
        "1e308",
        "-5MiB",
        "1.5.5GiB",
        "0x10",
        "1_000",
        "NaN",
        "inf",
        "null",
        "docker:",
        "/",
        "/proc",
        "..",
        "image_not_found",
        "exited_at_start",
        "runtime",
        "unauthorized",
    ]);
    prop_oneof![
        4 => words.prop_map(String::from),
        2 => any::<String>(),
        1 => "[0-9]{15,30}[a-zA-Z]{0,3}",
        1 => (1usize..5000).prop_map(|n| "a".repeat(n)),
    ]
}

/// Numbers at and past every integer type's limits, and floats at theirs.
pub fn hostile_number() -> impl Strategy<Value = Value> {
    let ints = prop::sample::select(vec![
        i64::MIN,
        -(1 << 31) - 1,
        -2,
        -1,
        0,
        1,
        i64::from(u16::MAX) + 1,
        i64::from(u32::MAX),
        i64::from(u32::MAX) + 1,
        i64::MAX,
    ]);
    let floats = prop::sample::select(vec![
        1e308,
        -1e308,
        5e-324,
        -0.0,
        0.0,
        1e-10,
        0.009,
        0.5,
        f64::EPSILON,
    ]);
    prop_oneof![
        ints.prop_map(Value::from),
        Just(Value::from(u64::MAX)),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        floats.prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
    ]
}

/// Any JSON value, hostile leaves preferred, nested up to a few levels.
pub fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        hostile_number(),
        hostile_string().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((key(), inner), 0..6)
                .prop_map(|entries| Value::Object(entries.into_iter().collect())),
        ]
    })
}

/// Object keys: the wire's and the manifest's own names, and anything.
pub fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(vec![
            "code", "message", "error", "details", "field", "state", "status",
            "exit_code", "name", "gpus", "volumes", "uuid", "memory", "memory_total",
            "memory_used", "mig", "sharing", "device_id", "progress", "done", "total", "line",
            "stream", "secret", "soft", "hard", "max", "wait",
        ])
        .prop_map(String::from),
        1 => any::<String>(),
    ]
}

/// `depth` arrays inside each other: past every parser's recursion limit when deep.
pub fn nested_arrays(depth: usize) -> String {
    format!("{}{}", "[".repeat(depth), "]".repeat(depth))
}
