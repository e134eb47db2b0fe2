//! A prompt graph: `{node_id: {class_type, inputs}}`, where an input is a widget value or
//! a link `["node_id", output_index]`. This module checks a graph as ComfyUI's
//! `validate_prompt` does (same error types, messages and `node_errors` shape) and gives
//! the order its nodes run in. Graphs are walked with explicit stacks, never recursion,
//! so a deep or cyclic graph cannot overflow a thread's stack.

use std::collections::{HashMap, HashSet};

use crate::files::Dirs;
use crate::json::{quote, Json};
use crate::nodes::{self, Kind, SAMPLERS, SCHEDULERS};
use crate::{num, str_list, to_json};

/// A graph that may run: the output nodes to execute, and the errors of output nodes
/// that will not (as a JSON object, usually `{}`).
pub struct Checked {
    pub outputs: Vec<String>,
    pub node_errors: String,
}

/// A graph that may not run: the `error` object and `node_errors`, as JSON.
pub struct Rejected {
    pub error: String,
    pub node_errors: String,
}

/// One of ComfyUI's error objects.
#[derive(Clone)]
pub struct Error {
    kind: &'static str,
    message: String,
    details: String,
    /// A JSON object.
    extra_info: String,
}

/// An error object with these fields.
pub fn error(kind: &'static str, message: &str, details: &str, extra_info: &str) -> Error {
    Error { kind, message: message.into(), details: details.into(), extra_info: extra_info.into() }
}

impl Error {
    /// The error as JSON.
    pub fn render(&self) -> String {
        format!(
            r#"{{"type":{},"message":{},"details":{},"extra_info":{}}}"#,
            quote(self.kind),
            quote(&self.message),
            quote(&self.details),
            self.extra_info
        )
    }
}

fn rejected(kind: &'static str, message: &str, details: &str) -> Rejected {
    Rejected { error: error(kind, message, details, "{}").render(), node_errors: "{}".into() }
}

/// The nodes of a graph in order, keyed by id.
pub fn nodes_of(prompt: &Json) -> &[(String, Json)] {
    match prompt {
        Json::Obj(members) => members,
        _ => &[],
    }
}

/// A node's class name.
pub fn class_of(node: &Json) -> Option<&str> {
    node.get("class_type").and_then(Json::as_str)
}

/// A node's input `name`.
pub fn input<'a>(node: &'a Json, name: &str) -> Option<&'a Json> {
    node.get("inputs").and_then(|i| i.get(name))
}

/// A link's source node id and output index, if `v` is a well-formed link.
pub fn link(v: &Json) -> Option<(&str, usize)> {
    match v.as_array()? {
        [Json::Str(id), index] => Some((id, index.as_u64()? as usize)),
        _ => None,
    }
}

/// A widget value as a number, converted as Python's `int()`/`float()` would (`None` when
/// they would fail). `whole` truncates, as `int()` does.
pub fn number(v: &Json, whole: bool) -> Option<f64> {
    let n = match v {
        Json::Num(n) => *n,
        Json::Bool(b) => f64::from(u8::from(*b)),
        Json::Str(s) if whole => s.trim().parse::<i128>().ok()? as f64,
        Json::Str(s) => s.trim().parse::<f64>().ok()?,
        _ => return None,
    };
    Some(if whole { n.trunc() } else { n })
}

/// Checks a graph. Every node needs a known `class_type`; there must be an output node;
/// each output node is valid when its inputs and those of every node it depends on are.
/// Outputs that fail are left out and reported in `node_errors`; when none is left, the
/// whole prompt is rejected (`prompt_outputs_failed_validation`).
pub fn validate(prompt: &Json, dirs: &Dirs) -> Result<Checked, Rejected> {
    let Json::Obj(nodes) = prompt else {
        return Err(rejected("invalid_prompt", "Cannot execute because the prompt is not an object of nodes.", ""));
    };
    let mut outputs = Vec::new();
    for (id, node) in nodes {
        let details = format!("Node ID '#{id}'");
        let Some(class_type) = node.get("class_type") else {
            let message = "Cannot execute because a node is missing the class_type property.";
            return Err(rejected("invalid_prompt", message, &details));
        };
        let name = class_type.as_str().map_or_else(|| to_json(class_type, false), str::to_string);
        match nodes::class(&name) {
            None => {
                let message = format!("Cannot execute because node {name} does not exist.");
                return Err(rejected("invalid_prompt", &message, &details));
            }
            Some(class) if class.output_node => outputs.push(id.clone()),
            Some(_) => {}
        }
    }
    if outputs.is_empty() {
        return Err(rejected("prompt_no_outputs", "Prompt has no outputs", ""));
    }

    let index: HashMap<&str, &Json> = nodes.iter().map(|(k, v)| (k.as_str(), v)).collect();
    // Each node's own errors and whether it is valid (its own and upstream), once.
    let mut validated: HashMap<String, (bool, Vec<Error>)> = HashMap::new();
    let mut good = Vec::new();
    let mut failed: Vec<(String, Vec<Error>)> = Vec::new();
    let mut node_errors: Vec<(String, Vec<Error>, Vec<String>)> = Vec::new();
    for output in &outputs {
        let upstream = match walk(&index, &[output.as_str()]) {
            Ok(order) => order,
            Err(()) => {
                let cycle = error("exception_during_validation", "Exception when validating node", "Dependency cycle detected", "{}");
                validated.insert(output.clone(), (false, vec![cycle]));
                vec![output.clone()]
            }
        };
        for id in &upstream {
            if validated.contains_key(id) {
                continue;
            }
            let node = index[id.as_str()];
            let errors = own_errors(node, &index, dirs);
            let inputs_valid = deps(&index, node).iter().all(|d| validated.get(*d).is_some_and(|(ok, _)| *ok));
            validated.insert(id.clone(), (errors.is_empty() && inputs_valid, errors));
        }
        let (ok, own) = validated.get(output).cloned().unwrap_or((false, Vec::new()));
        if ok {
            good.push(output.clone());
            continue;
        }
        failed.push((output.clone(), own));
        for id in &upstream {
            let Some((false, errors)) = validated.get(id) else { continue };
            if errors.is_empty() {
                continue;
            }
            match node_errors.iter_mut().find(|(n, _, _)| n == id) {
                Some(entry) => entry.2.push(output.clone()),
                None => node_errors.push((id.clone(), errors.clone(), vec![output.clone()])),
            }
        }
    }
    let node_errors = render_node_errors(&node_errors, &index);
    if good.is_empty() {
        let details: Vec<String> = failed
            .iter()
            .flat_map(|(_, errors)| errors.iter())
            .map(|e| format!("{}: {}", e.message, e.details))
            .collect();
        let message = "Prompt outputs failed validation";
        let error = error("prompt_outputs_failed_validation", message, &details.join("\n"), "{}").render();
        return Err(Rejected { error, node_errors });
    }
    Ok(Checked { outputs: good, node_errors })
}

fn render_node_errors(entries: &[(String, Vec<Error>, Vec<String>)], index: &HashMap<&str, &Json>) -> String {
    let rendered: Vec<String> = entries
        .iter()
        .map(|(id, errors, dependents)| {
            let class = index.get(id.as_str()).and_then(|n| class_of(n)).unwrap_or_default();
            format!(
                r#"{}:{{"errors":[{}],"dependent_outputs":{},"class_type":{}}}"#,
                quote(id),
                errors.iter().map(Error::render).collect::<Vec<_>>().join(","),
                str_list(dependents),
                quote(class)
            )
        })
        .collect();
    format!("{{{}}}", rendered.join(","))
}

/// The errors of one node's own inputs (ComfyUI's `validate_inputs`, less the recursion).
fn own_errors(node: &Json, index: &HashMap<&str, &Json>, dirs: &Dirs) -> Vec<Error> {
    let Some(class) = class_of(node).and_then(nodes::class) else { return Vec::new() };
    let mut errors = Vec::new();
    for spec in class.inputs {
        let x = spec.name;
        let name_only = format!(r#"{{"input_name":{}}}"#, quote(x));
        let Some(val) = input(node, x) else {
            errors.push(error("required_input_missing", "Required input is missing", x, &name_only));
            continue;
        };
        let config = if spec.options.is_empty() { "null" } else { spec.options };
        let received = format!(r#"{{"input_name":{},"input_config":{config},"received_value":{}}}"#, quote(x), to_json(val, false));
        if let Json::Arr(items) = val {
            if items.len() != 2 {
                let message = "Bad linked input, must be a length-2 list of [node_id, slot_index]";
                errors.push(error("bad_linked_input", message, x, &received));
                continue;
            }
            let source = link(val).and_then(|(id, slot)| Some((index.get(id)?, slot)));
            let Some((source, slot)) = source else {
                let shown = py_str(&items[0]);
                let details = format!("'{shown}'");
                errors.push(error("exception_during_inner_validation", "Exception when validating inner node", &details, &name_only));
                continue;
            };
            let returns = class_of(source).and_then(nodes::class).map_or(&[][..], |c| c.outputs);
            let Some(received_type) = returns.get(slot) else {
                let message = "Exception when validating inner node";
                errors.push(error("exception_during_inner_validation", message, "tuple index out of range", &name_only));
                continue;
            };
            let expected = match spec.kind {
                Kind::Type(t) => t,
                _ => "COMBO",
            };
            if *received_type != expected {
                let details = format!("{x}, {received_type} != {expected}");
                errors.push(error("return_type_mismatch", "Return type mismatch between linked nodes", &details, &received));
            }
            continue;
        }
        if let Some(e) = widget_error(x, val, &spec.kind, spec.range, config, &received, dirs) {
            errors.push(e);
        }
    }
    errors
}

/// The error of a widget value, if any: a number that does not convert or is out of
/// range, a choice not in its list, a LoadImage file that is not there.
fn widget_error(x: &str, val: &Json, kind: &Kind, range: Option<(f64, f64)>, config: &str, received: &str, dirs: &Dirs) -> Option<Error> {
    match kind {
        Kind::Type(t @ ("INT" | "FLOAT")) => {
            let Some(n) = number(val, *t == "INT") else {
                let message = format!("Failed to convert an input value to a {t} value");
                let details = format!("{x}, {}, could not convert {} to {}", py_str(val), to_json(val, false), t.to_lowercase());
                return Some(error("invalid_input_type", &message, &details, received));
            };
            let (min, max) = range?;
            if n < min {
                let message = format!("Value {} smaller than min of {}", num(n), num(min));
                return Some(error("value_smaller_than_min", &message, x, received));
            }
            if n > max {
                let message = format!("Value {} bigger than max of {}", num(n), num(max));
                return Some(error("value_bigger_than_max", &message, x, received));
            }
            None
        }
        Kind::Samplers | Kind::Schedulers => {
            let list = if matches!(kind, Kind::Samplers) { SAMPLERS } else { SCHEDULERS };
            if val.as_str().is_some_and(|v| list.contains(&v)) {
                return None;
            }
            // ComfyUI leaves long lists (and their config) out of the message.
            let (list_info, config) = if list.len() > 20 {
                (format!("(list of length {})", list.len()), "null")
            } else {
                (py_list(list), config)
            };
            let details = format!("{x}: '{}' not in {list_info}", py_str(val));
            let extra = format!(r#"{{"input_name":{},"input_config":{config},"received_value":{}}}"#, quote(x), to_json(val, false));
            Some(error("value_not_in_list", "Value not in list", &details, &extra))
        }
        Kind::InputImages => {
            if val.as_str().and_then(|name| dirs.annotated_file(name)).is_some() {
                return None;
            }
            let details = format!("{x} - Invalid image file: {}", py_str(val));
            let extra = format!(r#"{{"input_name":{}}}"#, quote(x));
            Some(error("custom_validation_failed", "Custom validation failed for node", &details, &extra))
        }
        _ => None,
    }
}

/// A value as Python's `str()` shows it in ComfyUI's messages.
fn py_str(v: &Json) -> String {
    match v {
        Json::Str(s) => s.clone(),
        Json::Null => "None".into(),
        Json::Bool(b) => if *b { "True" } else { "False" }.into(),
        other => to_json(other, false),
    }
}

/// A list of strings as Python's `str()` shows it: `['a', 'b']`.
fn py_list(items: &[&str]) -> String {
    let shown: Vec<String> = items.iter().map(|s| format!("'{s}'")).collect();
    format!("[{}]", shown.join(", "))
}

/// The ids a node links to that exist in the graph, in input order.
fn deps<'a>(index: &HashMap<&'a str, &'a Json>, node: &'a Json) -> Vec<&'a str> {
    let inputs = node.get("inputs").map(nodes_of).unwrap_or_default();
    inputs
        .iter()
        .filter_map(|(_, v)| link(v))
        .filter_map(|(id, _)| index.get_key_value(id).map(|(k, _)| *k))
        .collect()
}

/// Every node `roots` depend on, and the roots, each after the nodes it links to (a
/// depth-first post-order); `Err` on a dependency cycle.
fn walk(index: &HashMap<&str, &Json>, roots: &[&str]) -> Result<Vec<String>, ()> {
    let mut done: HashSet<&str> = HashSet::new();
    let mut on_stack: HashSet<&str> = HashSet::new();
    let mut order = Vec::new();
    for &root in roots {
        let Some((&root, &node)) = index.get_key_value(root) else { continue };
        if done.contains(root) {
            continue;
        }
        let mut stack = vec![(root, deps(index, node), 0usize)];
        on_stack.insert(root);
        while let Some((id, next_deps, next)) = stack.last_mut() {
            if let Some(&dep) = next_deps.get(*next) {
                *next += 1;
                if done.contains(dep) {
                    continue;
                }
                if !on_stack.insert(dep) {
                    return Err(());
                }
                stack.push((dep, deps(index, index[dep]), 0));
            } else {
                let id = *id;
                stack.pop();
                on_stack.remove(id);
                done.insert(id);
                order.push(id.to_string());
            }
        }
    }
    Ok(order)
}

/// The order a checked graph's nodes run in: for each output in turn, the nodes it
/// depends on that have not run yet, then the output.
pub fn execution_order(prompt: &Json, outputs: &[String]) -> Vec<String> {
    let index: HashMap<&str, &Json> = nodes_of(prompt).iter().map(|(k, v)| (k.as_str(), v)).collect();
    let roots: Vec<&str> = outputs.iter().map(String::as_str).collect();
    walk(&index, &roots).unwrap_or_default()
}
