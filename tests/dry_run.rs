//! `ember deploy --dry-run`: a manifest checked on this machine, as the gateway would check
//! it, with no gateway needed and nothing deployed; the revision id it prints is the one a
//! real deploy gets. Every manifest the repository ships (functions/, runtimes/*/example,
//! examples/) must dry-run cleanly.

#![allow(clippy::disallowed_methods)] // the harness spawns tasks that end with the test

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::Gateway;

/// `ember deploy --dry-run PATH` with no gateway reachable at all.
fn dry_run(path: &Path) -> Output {
    let config = tempfile::tempdir().unwrap();
    common::cli_command(config.path())
        .args(["deploy", "--dry-run"])
        .arg(path)
        .env("EMBER_GATEWAY", "http://127.0.0.1:1")
        .output()
        .unwrap()
}

/// The revision id a dry run or a deploy printed.
fn revision(out: &Output) -> String {
    let text = String::from_utf8_lossy(&out.stdout);
    let after = text
        .split("revision")
        .nth(1)
        .unwrap_or_else(|| panic!("no revision in: {text}"));
    after
        .trim_start()
        .chars()
        .take_while(char::is_ascii_hexdigit)
        .collect()
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Every manifest the repository ships: functions/*, runtimes/*/example and examples/*.
fn shipped_manifests() -> Vec<PathBuf> {
    let mut found = Vec::new();
    for (dir, sub) in [("functions", ""), ("runtimes", "example"), ("examples", "")] {
        let Ok(entries) = std::fs::read_dir(common::repo().join(dir)) else {
            continue;
        };
        for entry in entries {
            let manifest = entry.unwrap().path().join(sub).join("ember.toml");
            if manifest.is_file() {
                found.push(manifest);
            }
        }
    }
    found.sort();
    found
}

#[test]
fn a_valid_manifest_dry_runs_without_a_gateway_and_prints_its_summary() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = "name = \"render\"\nimage = \"studio/render:1\"\n[gpu]\ncount = 1\n";
    std::fs::write(dir.path().join("ember.toml"), manifest).unwrap();
    let out = dry_run(dir.path());
    assert!(out.status.success(), "{}", text(&out));
    let shown = text(&out);
    assert!(shown.contains("is valid; nothing was deployed"), "{shown}");
    assert!(shown.contains("  name       render\n"), "{shown}");
    assert!(shown.contains("  gpu        1 × exclusive\n"), "{shown}");
    assert!(shown.contains("not checked without a gateway"), "{shown}");
    assert_eq!(revision(&out).len(), 12, "{shown}");
}

#[test]
fn an_invalid_manifest_fails_the_dry_run_naming_each_field() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = "name = \"Render\"\nimage = \"studio/render:1\"\n[scale]\nmax = 0\n";
    std::fs::write(dir.path().join("ember.toml"), manifest).unwrap();
    let out = dry_run(dir.path());
    assert!(!out.status.success());
    let shown = text(&out);
    assert!(shown.contains("is not a valid manifest:"), "{shown}");
    assert!(
        shown.contains("\n  name: `Render` is not a lower-case DNS label"),
        "{shown}"
    );
    assert!(
        shown.contains("\n  scale.max: must be between 1 and 1000"),
        "{shown}"
    );
}

#[test]
fn every_manifest_the_repository_ships_dry_runs() {
    let manifests = shipped_manifests();
    assert!(
        manifests
            .iter()
            .any(|m| m.ends_with("functions/echo/ember.toml")),
        "{manifests:?}"
    );
    for manifest in manifests {
        let out = dry_run(&manifest);
        assert!(
            out.status.success(),
            "{}: {}",
            manifest.display(),
            text(&out)
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dry_run_deploys_nothing_and_names_the_revision_a_deploy_then_gets() {
    require_docker!();
    common::build_static_programs();
    let gw = Gateway::start().await;
    let dir = tempfile::tempdir().unwrap();
    let image_manifest = dir.path().join("ember.toml");
    std::fs::write(&image_manifest, common::echo_manifest("plain", "", "")).unwrap();
    // One manifest names its image; echo's builds one from its folder.
    for path in [image_manifest, common::repo().join("functions/echo")] {
        let path = path.to_str().unwrap();
        let checked = gw.cli(&["deploy", "--dry-run", path]);
        assert!(checked.status.success(), "{}", text(&checked));
        let functions = gw.get_json("/api/v1/functions").await["functions"].clone();
        assert_eq!(
            functions,
            serde_json::json!([]),
            "a dry run deploys nothing"
        );

        let deployed = gw.cli(&["deploy", path]);
        assert!(deployed.status.success(), "{}", text(&deployed));
        assert_eq!(
            revision(&checked),
            revision(&deployed),
            "{}",
            text(&deployed)
        );
        let name = if path.ends_with("echo") {
            "echo"
        } else {
            "plain"
        };
        gw.cli(&["rm", name]);
    }
}
