//! Manifest-wide tests: parsing, top-level fields, and the revision-id golden values.
//! Each section's own checks are tested next to it.

use super::test_support::{fields, toml};
use super::*;
use bytesize::ByteSize;

#[test]
fn minimal_manifest_gets_the_documented_defaults() {
    let m = toml("name = \"echo\"\nimage = \"ember/echo:latest\"").unwrap();
    assert_eq!(m.port, 8080);
    assert_eq!(m.scale.max, 4);
    assert_eq!(m.scale.concurrency, 50);
    assert_eq!(m.scale.idle_timeout, Duration::from_secs(300));
    assert_eq!(m.queue.capacity, 1000);
    assert_eq!(m.queue.timeout, Duration::from_secs(60));
    assert_eq!(m.request.max_body, ByteSize::mib(32));
    assert_eq!(m.resources.memory, ByteSize::mib(512));
    assert_eq!(m.readiness.start_timeout, Duration::from_secs(120));
}

#[test]
fn full_manifest_from_the_reference_parses() {
    let m = toml(
        r#"
        name = "echo"
        image = "ember/echo:latest"
        build = "."
        port = 8080
        command = ["/echo"]
        env = { GREETING = "hi" }
        [readiness]
        http_path = "/healthz"
        start_timeout = "120s"
        [resources]
        cpus = 1.0
        memory = "512MiB"
        [scale]
        min = 0
        max = 4
        concurrency = 50
        idle_timeout = "5m"
        [queue]
        capacity = 1000
        timeout = "60s"
        [request]
        timeout = "300s"
        max_body = "32MiB"
        "#,
    )
    .unwrap();
    assert_eq!(m.env["GREETING"], "hi");
    assert_eq!(m.readiness.http_path.as_deref(), Some("/healthz"));
}

#[test]
fn unknown_fields_are_errors_with_their_path() {
    let err = toml("name = \"a\"\nimage = \"x\"\n[scale]\nmaxx = 3").unwrap_err();
    let e = &err.field_errors()[0];
    assert_eq!(e.field, "scale.maxx");
    assert!(e.message.contains("unknown field `maxx`"), "{}", e.message);
}

/// Found by tests/fuzz_manifest.rs: the error's field path was empty.
#[test]
fn an_empty_key_is_named_as_one() {
    let err = Manifest::parse(r#"{"name":"a","image":"x","":1}"#, Format::Json).unwrap_err();
    assert_eq!(fields(err), ["\"\""]);
    let err = toml("name = \"a\"\nimage = \"x\"\n\"\" = 1").unwrap_err();
    assert_eq!(fields(err), ["\"\""]);
}

/// Found by tests/fuzz_manifest.rs: a `|` in the message was taken for toml's source
/// excerpt, and only "TOML parse error at line 3, column 11" was left of it.
#[test]
fn a_bar_in_a_toml_error_keeps_its_message() {
    let err = toml("name = \"a\"\nimage = \"x\"\ncomfyui = \"a|b\"").unwrap_err();
    let e = &err.field_errors()[0];
    assert_eq!(e.field, "comfyui");
    assert!(
        e.message.contains("invalid type: string \"a|b\""),
        "{}",
        e.message
    );
}

#[test]
fn wrong_types_name_the_field() {
    let err = toml("name = \"a\"\nimage = \"x\"\n[scale]\nmax = \"four\"").unwrap_err();
    assert_eq!(fields(err), ["scale.max"]);
    let err = toml("name = \"a\"\nimage = \"x\"\n[queue]\ntimeout = \"soon\"").unwrap_err();
    assert_eq!(fields(err), ["queue.timeout"]);
    let err = toml("name = \"a\"\nimage = \"x\"\n[resources]\nmemory = \"lots\"").unwrap_err();
    assert_eq!(fields(err), ["resources.memory"]);
}

#[test]
fn json_manifests_parse_the_same_way() {
    let m = Manifest::parse(
        r#"{"name":"echo","image":"e:1","scale":{"idle_timeout":"2s"}}"#,
        Format::Json,
    )
    .unwrap();
    assert_eq!(m.scale.idle_timeout, Duration::from_secs(2));
    let err =
        Manifest::parse(r#"{"name":"echo","image":"e:1","prot":1}"#, Format::Json).unwrap_err();
    assert!(err.field_errors()[0]
        .message
        .contains("unknown field `prot`"));
}

#[test]
fn nonsense_values_are_all_reported_at_once() {
    let err = toml(
        r#"
        name = "Echo_1"
        port = 0
        env = { PORT = "1", "1BAD" = "x" }
        [readiness]
        http_path = "healthz"
        [scale]
        min = 5
        max = 2
        concurrency = 0
        [queue]
        capacity = 0
        "#,
    )
    .unwrap_err();
    let f = fields(err);
    for expected in [
        "name",
        "image",
        "port",
        "env.PORT",
        "env.1BAD",
        "readiness.http_path",
        "scale.min",
        "scale.concurrency",
        "queue.capacity",
    ] {
        assert!(
            f.contains(&expected.to_string()),
            "{expected} missing in {f:?}"
        );
    }
}

/// Found by tests/fuzz_manifest.rs: serde_json read the float it wrote one bit off, so a
/// manifest changed each time the store wrote and read it.
#[test]
fn floats_read_back_from_json_unchanged() {
    let text = r#"{"name":"a","image":"x","scale":{"target_utilization":0.012375987704156263}}"#;
    let m = Manifest::parse(text, Format::Json).unwrap();
    let back = Manifest::parse(&serde_json::to_string(&m).unwrap(), Format::Json).unwrap();
    assert_eq!(back, m);
}

#[test]
fn names_must_be_dns_labels() {
    for good in ["a", "echo", "llm-7b", "x1"] {
        assert!(check_name(good).is_ok(), "{good}");
    }
    for bad in ["", "Echo", "1abc", "a_b", "end-", &"a".repeat(64)] {
        assert!(check_name(bad).is_err(), "{bad}");
    }
}

#[test]
fn revision_changes_with_the_manifest_and_only_then() {
    let a = toml("name = \"echo\"\nimage = \"e:1\"").unwrap();
    let same = toml("image = \"e:1\"\nname = \"echo\"\nport = 8080").unwrap();
    let changed = toml("name = \"echo\"\nimage = \"e:1\"\nenv = { A = \"1\" }").unwrap();
    assert_eq!(a.revision_id(), same.revision_id());
    assert_ne!(a.revision_id(), changed.revision_id());
    assert_eq!(a.revision_id().len(), 12);
}

#[test]
fn build_without_image_is_accepted() {
    let m = toml("name = \"echo\"\nbuild = \".\"").unwrap();
    assert_eq!(m.build.as_deref(), Some("."));
    assert!(m.image.is_none());
}

const MINIMAL: &str = "name = \"echo\"\nimage = \"e:1\"";

/// Every field and section that exists today, none at its default.
const FULL: &str = r#"
    name = "full"
    image = "ember/full:1"
    build = "."
    dockerfile = "Dockerfile.gpu"
    port = 9000
    command = ["/serve", "--fast"]
    env = { GREETING = "hi", MODEL = "llama" }
    [readiness]
    http_path = "/healthz"
    start_timeout = "90s"
    [resources]
    cpus = 2.5
    memory = "4GiB"
    [scale]
    min = 1
    max = 8
    concurrency = 16
    idle_timeout = "10m"
    target_utilization = 0.6
    stable_window = "2m"
    panic_window = "10s"
    panic_threshold = 3.0
    on_idle = "pause"
    pause_timeout = "1h"
    keep_alive = "adaptive"
    [queue]
    capacity = 500
    timeout = "30s"
    [request]
    timeout = "120s"
    max_body = "64MiB"
    [gpu]
    count = 2
    sharing = "shared"
    memory = "8GiB"
    models = ["A100", "H100"]
    min_memory = "40GiB"
"#;

const MIG: &str =
    "name = \"g\"\nimage = \"e:1\"\n[gpu]\nsharing = \"mig\"\nmig_profile = \"3g.40gb\"";

/// Ids computed by Ember before the manifest was split by section. If this fails, an
/// upgrade would give every deployed function a new revision and roll its instances.
#[test]
fn revision_ids_are_stable_across_ember_versions() {
    for (text, id) in [
        (MINIMAL, "6f8bf72ad159"),
        (FULL, "581c2765b12b"),
        (MIG, "900a6089c380"),
    ] {
        assert_eq!(toml(text).unwrap().revision_id(), id, "{text}");
    }
}

fn key_paths(value: &serde_json::Value, prefix: &str, out: &mut Vec<String>) {
    let serde_json::Value::Object(map) = value else {
        out.push(prefix.to_string());
        return;
    };
    for (key, value) in map {
        let path = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        key_paths(value, &path, out);
    }
}

/// A new field that serialises at its default would show up here (and change every
/// revision id): skip it at its default instead, see the module docs.
#[test]
fn a_minimal_manifest_serialises_only_the_fields_it_always_did() {
    let json = serde_json::to_value(toml(MINIMAL).unwrap()).unwrap();
    let mut keys = Vec::new();
    key_paths(&json, "", &mut keys);
    keys.sort();
    assert_eq!(
        keys,
        [
            "image",
            "name",
            "port",
            "queue.capacity",
            "queue.timeout",
            "readiness.start_timeout",
            "request.max_body",
            "request.timeout",
            "resources.cpus",
            "resources.memory",
            "scale.concurrency",
            "scale.idle_timeout",
            "scale.keep_alive",
            "scale.max",
            "scale.min",
            "scale.on_idle",
            "scale.panic_threshold",
            "scale.panic_window",
            "scale.pause_timeout",
            "scale.stable_window",
            "scale.target_utilization",
        ]
    );
}

#[test]
fn is_default_holds_only_for_the_default_value() {
    assert!(is_default(&BTreeMap::<String, String>::new()));
    assert!(is_default(&None::<u32>));
    assert!(!is_default(&Some(0)));
    assert!(!is_default(&Scale {
        min: 1,
        ..Scale::default()
    }));
}
