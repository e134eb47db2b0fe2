//! Bounded fuzzing of the manifest parser and validator, TOML and JSON (issue 16): bad
//! input never panics, every refusal names its field, and whatever is accepted reads back
//! the same (same manifest, same revision id) after being written out again, whether as
//! JSON (the store, the API) or as TOML. See `fuzz/mod.rs` for the time and seed knobs.
//!
//! Inputs are arbitrary text, the valid [`BASES`] with characters changed, and the bases
//! with known fields set to hostile values or to odd-but-plausible ones.

mod fuzz;

use ember::manifest::{Format, Manifest, ManifestError};
use fuzz::doc::Doc;
use fuzz::{fuzz, hostile_string, json_value};
use proptest::prelude::*;

/// Valid manifests the mutations start from: a rich one using nearly every section, a
/// MIG one, and the smallest there is.
const BASES: &[&str] = &[
    r#"{
      "name": "full", "image": "ember/full:1", "build": ".", "dockerfile": "Dockerfile.gpu",
      "port": 9000, "command": ["/serve", "--fast"],
      "env": {"GREETING": "hi", "HF_TOKEN": {"secret": "hf"}},
      "readiness": {"http_path": "/healthz", "start_timeout": "90s"},
      "resources": {"cpus": 2.5, "memory": "4GiB", "shm": "2GiB", "pids": 8192,
        "ulimits": {"memlock": -1, "nofile": {"soft": 1024, "hard": 65536}}},
      "scale": {"min": 0, "max": 8, "concurrency": 1, "idle_timeout": "10m",
        "target_utilization": 0.6, "stable_window": "2m", "panic_window": "10s",
        "panic_threshold": 3.0, "on_idle": "pause", "pause_timeout": "1h",
        "keep_alive": "adaptive"},
      "queue": {"capacity": 500, "timeout": "30s"},
      "request": {"timeout": "120s", "max_body": "64MiB"},
      "gpu": {"count": 2, "sharing": "shared", "memory": "8GiB", "models": ["A100", "H100"],
        "min_memory": "40GiB"},
      "access": {"private": true},
      "volumes": [{"source": "models", "target": "/models"},
        {"source": "docker:hf-cache", "target": "/root/.cache", "read_only": false}],
      "openai": {"models": {"llama-8b": "meta-llama/Llama-3.1-8B"}, "routing": "least_loaded",
        "load_factor": 1.5, "prefix_bytes": 512},
      "comfyui": {"keep": "3d", "keep_bytes": "20GiB"},
      "jobs": {"concurrency": 1, "max_attempts": 5, "callback_secret": "hooks",
        "batch": {"max": 8, "wait": "500ms"}}
    }"#,
    r#"{"name": "g", "image": "e:1", "gpu": {"sharing": "mig", "mig_profile": "3g.40gb"}}"#,
    r#"{"name": "echo", "image": "e:1"}"#,
];

/// What a field holds, for values that are odd but may well be valid.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Int,
    Float,
    Size,
    Duration,
    Text,
    Name,
    Path,
    Bool,
    Word(&'static [&'static str]),
    Texts,
    /// Sections and other shapes: hostile values only.
    Any,
}

/// Every field the manifest knows (and a few sections whole), with what it holds.
const FIELDS: &[(&str, Kind)] = &[
    ("name", Kind::Name),
    ("image", Kind::Text),
    ("build", Kind::Text),
    ("dockerfile", Kind::Text),
    ("port", Kind::Int),
    ("command", Kind::Texts),
    ("command.0", Kind::Text),
    ("env.GREETING", Kind::Text),
    ("env.HF_TOKEN", Kind::Any),
    ("env.HF_TOKEN.secret", Kind::Name),
    ("readiness.http_path", Kind::Path),
    ("readiness.start_timeout", Kind::Duration),
    ("resources.cpus", Kind::Float),
    ("resources.memory", Kind::Size),
    ("resources.shm", Kind::Size),
    ("resources.pids", Kind::Int),
    ("resources.ulimits.memlock", Kind::Int),
    ("resources.ulimits.nofile", Kind::Any),
    ("resources.ulimits.nofile.soft", Kind::Int),
    ("resources.ulimits.nofile.hard", Kind::Int),
    ("scale.min", Kind::Int),
    ("scale.max", Kind::Int),
    ("scale.concurrency", Kind::Int),
    ("scale.idle_timeout", Kind::Duration),
    ("scale.target_utilization", Kind::Float),
    ("scale.stable_window", Kind::Duration),
    ("scale.panic_window", Kind::Duration),
    ("scale.panic_threshold", Kind::Float),
    ("scale.on_idle", Kind::Word(&["stop", "pause"])),
    ("scale.pause_timeout", Kind::Duration),
    ("scale.keep_alive", Kind::Word(&["fixed", "adaptive"])),
    ("queue.capacity", Kind::Int),
    ("queue.timeout", Kind::Duration),
    ("request.timeout", Kind::Duration),
    ("request.max_body", Kind::Size),
    ("gpu", Kind::Any),
    ("gpu.count", Kind::Int),
    ("gpu.memory", Kind::Size),
    ("gpu.sharing", Kind::Word(&["exclusive", "shared", "mig"])),
    (
        "gpu.mig_profile",
        Kind::Word(&["1g.10gb", "3g.40gb", "7g.80gb"]),
    ),
    ("gpu.models", Kind::Texts),
    ("gpu.min_memory", Kind::Size),
    ("access.private", Kind::Bool),
    ("volumes", Kind::Any),
    ("volumes.0.source", Kind::Name),
    ("volumes.0.target", Kind::Path),
    ("volumes.1.read_only", Kind::Bool),
    ("openai.models", Kind::Texts),
    ("openai.models.llama-8b", Kind::Text),
    ("openai.routing", Kind::Word(&["prefix", "least_loaded"])),
    ("openai.load_factor", Kind::Float),
    ("openai.prefix_bytes", Kind::Int),
    ("comfyui", Kind::Any),
    ("comfyui.keep", Kind::Duration),
    ("comfyui.keep_bytes", Kind::Size),
    ("jobs.concurrency", Kind::Int),
    ("jobs.max_attempts", Kind::Int),
    ("jobs.callback_secret", Kind::Name),
    ("jobs.batch", Kind::Any),
    ("jobs.batch.max", Kind::Int),
    ("jobs.batch.wait", Kind::Duration),
];

fn base(i: usize) -> Doc {
    let value: serde_json::Value = serde_json::from_str(BASES[i]).expect("bases are JSON");
    Doc::from_json(&value)
}

/// A value that may well be valid for a field of `kind`, in a form a person might write.
fn plausible(kind: Kind) -> BoxedStrategy<Doc> {
    let units = |u: &'static [&'static str]| prop::sample::select(u.to_vec());
    match kind {
        Kind::Int => prop_oneof![0i128..20, 1i128..70_000]
            .prop_map(Doc::Int)
            .boxed(),
        Kind::Float => prop_oneof![
            (1u32..2000, 1u32..1000).prop_map(|(a, b)| Doc::Float(f64::from(a) / f64::from(b))),
            (0.0f64..2.0).prop_map(Doc::Float),
            (1i128..100).prop_map(Doc::Int),
        ]
        .boxed(),
        Kind::Size => prop_oneof![
            (0u64..1 << 44).prop_map(|n| Doc::Int(n.into())),
            (
                0u64..100_000,
                units(&["B", "KB", "kB", "KiB", "MB", "MiB", "GB", "GiB", "TB", "TiB", "PB"]),
                prop::bool::ANY,
            )
                .prop_map(|(n, u, space)| Doc::Str(if space {
                    format!("{n} {u}")
                } else {
                    format!("{n}{u}")
                })),
            (0u32..10_000, units(&["KiB", "MiB", "GiB", "GB"]))
                .prop_map(|(n, u)| Doc::Str(format!("{}.{} {u}", n / 10, n % 10))),
        ]
        .boxed(),
        Kind::Duration => prop_oneof![
            (
                0u64..100_000,
                units(&["ns", "us", "ms", "s", "sec", "m", "min", "h", "d"])
            )
                .prop_map(|(n, u)| Doc::Str(format!("{n}{u}"))),
            (0u64..100, 0u64..1000, 0u64..1_000_000)
                .prop_map(|(m, ms, ns)| Doc::Str(format!("{m}m {ms}ms {ns}ns"))),
        ]
        .boxed(),
        Kind::Text => "[ -~é🔥\t\u{0}\u{7f}\u{202e}]{1,24}"
            .prop_map(Doc::Str)
            .boxed(),
        Kind::Name => "[a-z0-9][a-z0-9._-]{0,12}".prop_map(Doc::Str).boxed(),
        Kind::Path => "/[ -~é]{0,24}".prop_map(Doc::Str).boxed(),
        Kind::Bool => any::<bool>().prop_map(Doc::Bool).boxed(),
        Kind::Word(words) => prop_oneof![
            4 => units(words).prop_map(|w| Doc::Str(w.into())),
            1 => "[a-z_]{1,10}".prop_map(Doc::Str),
        ]
        .boxed(),
        Kind::Texts => prop::collection::vec(plausible(Kind::Text), 0..4)
            .prop_map(Doc::Arr)
            .boxed(),
        Kind::Any => hostile(),
    }
}

/// A value no field should take quietly: integer and float extremes (NaN included),
/// hostile strings, nulls, arrays and tables, deep nesting, TOML datetimes.
fn hostile() -> BoxedStrategy<Doc> {
    let extremes = prop::sample::select(vec![
        -(1i128 << 64),
        i128::from(i64::MIN),
        -2,
        -1,
        0,
        i128::from(u16::MAX) + 1,
        i128::from(u32::MAX) + 1,
        i128::from(i64::MAX) + 1,
        i128::from(u64::MAX),
        i128::from(u64::MAX) + 1,
    ]);
    let floats = prop::sample::select(vec![
        f64::NAN,
        f64::INFINITY,
        f64::NEG_INFINITY,
        1e308,
        -1e308,
        5e-324,
        1e-10,
        -0.0,
    ]);
    prop_oneof![
        2 => extremes.prop_map(Doc::Int),
        1 => floats.prop_map(Doc::Float),
        3 => hostile_string().prop_map(Doc::Str),
        1 => Just(Doc::Null),
        1 => Just(Doc::Datetime("1979-05-27T07:32:00Z".into())),
        1 => (1usize..300).prop_map(|depth| (0..depth).fold(Doc::Int(1), |d, _| Doc::Arr(vec![d]))),
        2 => json_value().prop_map(|v| Doc::from_json(&v)),
    ]
    .boxed()
}

/// Edits of a base: which base, and fields with the values to set them to.
type Edits = (usize, Vec<(&'static str, Doc)>);

/// A base with fields set: `hostile_share` in 4 of the values hostile, the rest plausible.
/// The edits, not the document, are the input, so a failure shows just what was changed.
fn mutated(hostile_share: u32, most: usize) -> impl Strategy<Value = Edits> {
    let field = (0..FIELDS.len()).prop_flat_map(move |i| {
        let (path, kind) = FIELDS[i];
        let value = if hostile_share == 0 {
            plausible(kind)
        } else {
            prop_oneof![hostile_share => hostile(), 4 - hostile_share => plausible(kind)].boxed()
        };
        (Just(path), value)
    });
    (0..BASES.len(), prop::collection::vec(field, 1..=most))
}

fn edited((b, edits): &Edits) -> Doc {
    let mut doc = base(*b);
    for (path, value) in edits {
        doc.set(path, value.clone());
    }
    doc
}

/// Parses `text`: a refusal must name a field and say something; an acceptance must be a
/// fixed point and within what Docker takes.
fn check(text: &str, format: Format) -> Result<Option<Manifest>, TestCaseError> {
    match Manifest::parse(text, format) {
        Ok(m) => {
            fixed_point(&m)?;
            within_docker_limits(&m)?;
            Ok(Some(m))
        }
        Err(e) => {
            names_its_fields(&e)?;
            Ok(None)
        }
    }
}

fn names_its_fields(e: &ManifestError) -> Result<(), TestCaseError> {
    let errors = e.field_errors();
    prop_assert!(!errors.is_empty(), "a refusal without errors: {e}");
    for f in errors {
        prop_assert!(!f.field.trim().is_empty(), "no field path: {f:?}");
        prop_assert!(!f.message.trim().is_empty(), "no message: {f:?}");
        prop_assert!(
            !f.message.starts_with("TOML parse error at"),
            "says where, not what: {f:?}"
        );
    }
    Ok(())
}

/// Written out as JSON (what the store keeps) or as TOML and read again, an accepted
/// manifest is the same manifest with the same revision id.
fn fixed_point(m: &Manifest) -> Result<(), TestCaseError> {
    let json = serde_json::to_string(m).expect("manifests serialize to JSON");
    let toml = toml::to_string(m).map_err(|e| TestCaseError::fail(format!("to TOML: {e}")))?;
    for (text, format) in [(json, Format::Json), (toml, Format::Toml)] {
        let back = Manifest::parse(&text, format).map_err(|e| {
            TestCaseError::fail(format!("{format:?} it wrote is refused: {e}\n{text}"))
        })?;
        prop_assert!(
            back == *m,
            "read back from {format:?}, it changed: {:?}\nit wrote: {text}",
            differences(&back, m)
        );
        prop_assert_eq!(back.revision_id(), m.revision_id());
    }
    Ok(())
}

/// The fields two manifests differ in, as `path: left != right`, by their Debug forms
/// (JSON would hide the difference where it is in how JSON writes them).
fn differences(a: &Manifest, b: &Manifest) -> Vec<String> {
    let (a, b) = (format!("{a:?}"), format!("{b:?}"));
    let split = |s: &str| s.split(", ").map(String::from).collect::<Vec<_>>();
    let (a, b) = (split(&a), split(&b));
    a.iter()
        .zip(&b)
        .filter(|(x, y)| x != y)
        .map(|(x, y)| format!("{x} != {y}"))
        .collect()
}

/// An accepted manifest's limits reach Docker as limits (runtime/docker.rs `create_body`):
/// memory and shm as i64 bytes (a wrap to -1 is "unlimited"), CPUs as nano-CPUs, where 0
/// is "unlimited" and Docker refuses anything under 0.01 CPU.
fn within_docker_limits(m: &Manifest) -> Result<(), TestCaseError> {
    let r = &m.resources;
    prop_assert!(
        i64::try_from(r.memory.as_u64()).is_ok(),
        "memory {}",
        r.memory
    );
    prop_assert!(i64::try_from(r.shm().as_u64()).is_ok(), "shm {}", r.shm());
    let nano_cpus = (r.cpus * 1e9) as i64;
    prop_assert!(
        nano_cpus >= 10_000_000,
        "cpus {:?} is {nano_cpus} nano-CPUs",
        r.cpus
    );
    Ok(())
}

/// Both formats of one document: each checked, and when both accept, the same manifest.
fn check_both(doc: &Doc) -> Result<usize, TestCaseError> {
    let json = check(&doc.json(), Format::Json)?;
    let toml = check(&doc.toml(), Format::Toml)?;
    if let (Some(j), Some(t)) = (&json, &toml) {
        prop_assert!(j == t, "JSON and TOML differ: {:?}", differences(j, t));
    }
    Ok(usize::from(json.is_some()) + usize::from(toml.is_some()))
}

/// Text soup: TOML and JSON tokens, section headers and field names in any order.
fn token_soup() -> impl Strategy<Value = String> {
    let tokens = prop::sample::select(vec![
        "name",
        "image",
        "=",
        ":",
        "\"",
        "'",
        "\"\"\"",
        "[",
        "]",
        "{",
        "}",
        ",",
        ".",
        "\n",
        " ",
        "#",
        "[scale]",
        "[[volumes]]",
        "[jobs.batch]",
        "max",
        "1",
        "-1",
        "1e308",
        "nan",
        "inf",
        "true",
        "null",
        "\"1s\"",
        "\"e:1\"",
        "\"a\"",
        "env",
        "secret",
        "\\u0000",
        "\\",
        "1979-05-27",
        "0x7f",
        "+",
        "_",
        "|",
        "\"a|b\"",
    ]);
    prop::collection::vec(tokens, 0..60).prop_map(|t| t.concat())
}

/// A valid base in one format with characters inserted, removed or replaced.
fn damaged_base() -> impl Strategy<Value = (String, Format)> {
    let edit = (any::<prop::sample::Index>(), 0u8..3, any::<char>());
    (
        0..BASES.len(),
        prop::bool::ANY,
        prop::collection::vec(edit, 1..6),
    )
        .prop_map(|(b, as_toml, edits)| {
            let doc = base(b);
            let (text, format) = if as_toml {
                (doc.toml(), Format::Toml)
            } else {
                (doc.json(), Format::Json)
            };
            let mut chars: Vec<char> = text.chars().collect();
            for (at, op, c) in edits {
                let i = at.index(chars.len() + 1);
                match op {
                    0 => chars.insert(i, c),
                    1 if i < chars.len() => drop(chars.remove(i)),
                    _ if i < chars.len() => chars[i] = c,
                    _ => chars.push(c),
                }
            }
            (chars.into_iter().collect(), format)
        })
}

#[test]
fn arbitrary_text_never_panics_and_every_refusal_names_a_field() {
    let text = prop_oneof![
        any::<String>().prop_map(|s| (s, Format::Toml)),
        any::<String>().prop_map(|s| (s, Format::Json)),
        prop::collection::vec(any::<u8>(), 0..256)
            .prop_map(|b| (String::from_utf8_lossy(&b).into_owned(), Format::Toml)),
        token_soup().prop_map(|s| (s, Format::Toml)),
        token_soup().prop_map(|s| (s, Format::Json)),
        damaged_base(),
    ];
    fuzz("arbitrary text", text, |(text, format)| {
        check(&text, format).map(drop)
    });
}

#[test]
fn hostile_values_at_known_fields_are_refused_with_their_field() {
    fuzz("hostile fields", mutated(3, 4), |edits| {
        check_both(&edited(&edits)).map(drop)
    });
}

#[test]
fn what_parses_reads_back_the_same_as_json_and_as_toml() {
    let accepted = std::sync::atomic::AtomicUsize::new(0);
    fuzz("plausible fields", mutated(0, 6), |edits| {
        let n = check_both(&edited(&edits))?;
        accepted.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    });
    // Mutations that are all refused would prove nothing about round trips.
    let accepted = accepted.into_inner();
    eprintln!("plausible fields: {accepted} documents accepted");
    assert!(accepted > 0, "no mutated manifest was accepted");
}

/// Inputs the fuzzer found, each once a panic or a wrong answer, now plain tests.
mod regressions {
    use super::*;

    #[test]
    fn the_fuzz_bases_are_valid_manifests_in_both_formats() {
        for i in 0..BASES.len() {
            let doc = base(i);
            let json = Manifest::parse(&doc.json(), Format::Json).unwrap();
            let toml = Manifest::parse(&doc.toml(), Format::Toml).unwrap();
            assert_eq!(json, toml);
        }
    }

    #[test]
    fn nesting_past_the_parsers_limits_is_refused_not_a_stack_overflow() {
        let deep = fuzz::nested_arrays(100_000);
        let e = Manifest::parse(&format!("{{\"name\": {deep}}}"), Format::Json).unwrap_err();
        names_its_fields(&e).unwrap();
        let e = Manifest::parse(&format!("name = {deep}"), Format::Toml).unwrap_err();
        names_its_fields(&e).unwrap();
    }
}
