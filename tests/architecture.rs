//! The seams of DESIGN.md, checked on the source: no two modules import each other,
//! nothing imports the gateway or the CLI, sled, bollard and NVML stay in the one module
//! each that owns them, and only nodes dial instances and agents. A change that crosses a seam fails here, not in review.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every library source file with its text, comments removed, by path under src/.
fn library() -> Vec<(String, String)> {
    let mut files = Vec::new();
    sources(&src(), &mut files);
    files
        .into_iter()
        .map(|p| {
            let rel = p.strip_prefix(src()).unwrap().display().to_string();
            let text = std::fs::read_to_string(&p).unwrap();
            let code: String = text
                .lines()
                .map(|l| match l.find("//") {
                    Some(i) => &l[..i],
                    None => l,
                })
                .collect::<Vec<_>>()
                .join("\n");
            (rel, code)
        })
        .filter(|(rel, _)| rel != "main.rs")
        .collect()
}

/// The top-level module a file belongs to (`activator/start.rs` → `activator`).
fn module_of(rel: &str) -> String {
    rel.split(['/', '.']).next().unwrap().to_string()
}

/// The top-level modules a file names through `crate::`, including `use crate::{a, b::c}`.
fn imports(code: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 1;
            let end = group
                .char_indices()
                .find(|(_, c)| {
                    match c {
                        '{' => depth += 1,
                        '}' => depth -= 1,
                        _ => {}
                    }
                    depth == 0
                })
                .map_or(group.len(), |(i, _)| i);
            // Only the first path segment of each item at depth one names a module.
            let mut depth = 0;
            let mut items = vec![String::new()];
            for c in group[..end].chars() {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    ',' if depth == 0 => items.push(String::new()),
                    _ => {}
                }
                items.last_mut().unwrap().push(c);
            }
            for item in items {
                let word: String = item
                    .trim_start_matches([',', ' ', '\n'])
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !word.is_empty() {
                    out.insert(word);
                }
            }
        } else {
            let word: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !word.is_empty() {
                out.insert(word);
            }
        }
    }
    out
}

fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (rel, code) in library() {
        let from = module_of(&rel);
        let edges = graph.entry(from.clone()).or_default();
        for to in imports(&code) {
            if to != from && to != "self" {
                edges.insert(to);
            }
        }
    }
    graph
}

/// A path `a → … → a`, if the graph has a cycle.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        stack: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(pos) = stack.iter().position(|n| n == node) {
            let mut cycle = stack[pos..].to_vec();
            cycle.push(node.to_string());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        stack.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(c) = visit(next, graph, stack, done) {
                return Some(c);
            }
        }
        stack.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|n| visit(n, graph, &mut Vec::new(), &mut done))
}

#[test]
fn no_two_modules_import_each_other() {
    let graph = graph();
    assert!(graph.len() > 10, "the scan found the modules: {graph:?}");
    if let Some(cycle) = find_cycle(&graph) {
        panic!("import cycle: {}", cycle.join(" → "));
    }
}

#[test]
fn nothing_imports_the_gateway_or_the_cli() {
    for (from, edges) in graph() {
        for to in ["gateway", "cli"] {
            assert!(
                from == to || !edges.contains(to),
                "{from} imports {to}: the gateway and the CLI are the top of the tree"
            );
        }
    }
}

#[test]
fn the_model_imports_nothing_of_the_crate() {
    let graph = graph();
    assert_eq!(graph["model"], BTreeSet::new());
}

#[test]
fn sled_bollard_and_nvml_stay_in_their_modules() {
    let owners = [
        ("sled::", "store"),
        ("bollard::", "runtime/docker"),
        ("nvml_wrapper::", "gpu/nvml.rs"),
    ];
    for (rel, code) in library() {
        for (needle, owner) in owners {
            if code.contains(needle) {
                assert!(
                    rel.starts_with(owner),
                    "{rel} uses {needle}; only {owner} may (DESIGN.md seams)"
                );
            }
        }
    }
}

#[test]
fn only_nodes_dial_instances_and_agents() {
    // The gateway reaches an instance only through `Node::connect`, which a tunnelled
    // node answers with a stream of its tunnel; `client.rs` dials the gateway itself and,
    // for job callbacks, URLs outside the pool.
    for (rel, code) in library() {
        for needle in ["TcpStream::connect", "HttpConnector"] {
            if code.contains(needle) {
                assert!(
                    rel.starts_with("node/") || rel == "client.rs",
                    "{rel} uses {needle}; reach instances through Node::connect"
                );
            }
        }
    }
}

#[test]
fn a_remote_node_reaches_its_containers_only_through_its_tunnel() {
    let remote = library()
        .into_iter()
        .find(|(rel, _)| rel == "node/remote.rs")
        .expect("node/remote.rs")
        .1;
    for needle in [
        "TcpStream",
        "connect_tcp",
        "HttpConnector",
        "SocketAddr::new",
    ] {
        assert!(
            !remote.contains(needle),
            "node/remote.rs uses {needle}: a remote node's traffic goes through its tunnel only"
        );
    }
}

#[test]
fn the_import_scan_reads_grouped_uses() {
    let found = imports("use crate::{a::B, c, d::{e, f}};\nlet x = crate::g::h();");
    assert_eq!(
        found,
        ["a", "c", "d", "g"].iter().map(|s| s.to_string()).collect()
    );
}
