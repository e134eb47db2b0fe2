//! The Grafana dashboard, `deploy/grafana/ember.json`: its PromQL queries (panel targets
//! and template variables), the metric names they use, and a check of those names against
//! what a gateway's `/metrics` declares (its `# TYPE` lines).

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

/// The dashboard, relative to the repository root.
pub const PATH: &str = "deploy/grafana/ember.json";

/// Suffixes of a histogram's series.
const HISTOGRAM_SERIES: &[&str] = &["_bucket", "_sum", "_count"];

/// The dashboard, parsed.
pub fn load() -> Value {
    let text = std::fs::read_to_string(super::repo().join(PATH)).unwrap();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{PATH} is not JSON: {e}"))
}

/// Every panel target's `expr`, rows' nested panels included.
pub fn panel_queries(dashboard: &Value) -> Vec<String> {
    let mut out = Vec::new();
    collect_exprs(&dashboard["panels"], &mut out);
    out
}

fn collect_exprs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr", Value::String(expr)) => out.push(expr.clone()),
                    _ => collect_exprs(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| collect_exprs(v, out)),
        _ => {}
    }
}

/// Every query variable's query, such as `label_values(ember_node_up, node)`.
pub fn variable_queries(dashboard: &Value) -> Vec<String> {
    let vars = dashboard["templating"]["list"].as_array().unwrap();
    vars.iter()
        .filter(|v| v["type"] == "query")
        .map(|v| match &v["query"] {
            Value::String(q) => q.clone(),
            q => q["query"]
                .as_str()
                .expect("a query variable's query")
                .into(),
        })
        .collect()
}

/// The `ember_` metric names a PromQL expression uses (as written: `_bucket` kept), outside
/// string literals (label values).
pub fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut chars = expr.char_indices().peekable();
    while let Some((start, c)) = chars.next() {
        if c == '"' || c == '\'' || c == '`' {
            // Skips to the closing quote, over escaped ones.
            let mut escaped = false;
            for (_, d) in chars.by_ref() {
                if d == c && !escaped {
                    break;
                }
                escaped = d == '\\' && !escaped;
            }
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let mut end = start + c.len_utf8();
            while let Some(&(i, d)) = chars.peek() {
                if !(d.is_ascii_alphanumeric() || d == '_' || d == ':') {
                    break;
                }
                end = i + d.len_utf8();
                chars.next();
            }
            let ident = &expr[start..end];
            if ident.starts_with("ember_") {
                names.insert(ident.to_string());
            }
        } else if c.is_ascii_digit() {
            // A number such as 1e3 or 0x1f is not a name.
            while chars
                .peek()
                .is_some_and(|&(_, d)| d.is_ascii_alphanumeric())
            {
                chars.next();
            }
        }
    }
    names
}

/// The metric families an exposition declares, name to type, from its `# TYPE` lines.
pub fn declared(exposition: &str) -> BTreeMap<String, String> {
    exposition
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .map(|(name, kind)| (name.to_string(), kind.trim().to_string()))
        .collect()
}

/// The family a series name belongs to, if `declared` has it: itself, or a histogram's
/// `_bucket`, `_sum` or `_count`.
pub fn family<'a>(series: &'a str, declared: &BTreeMap<String, String>) -> Option<&'a str> {
    if declared.contains_key(series) {
        return Some(series);
    }
    HISTOGRAM_SERIES.iter().find_map(|suffix| {
        let base = series.strip_suffix(suffix)?;
        (declared.get(base)? == "histogram").then_some(base)
    })
}

/// The names among `queries` that are no series of a `declared` family, each with the
/// query that uses it.
pub fn unknown(queries: &[String], declared: &BTreeMap<String, String>) -> Vec<String> {
    queries
        .iter()
        .flat_map(|q| metric_names(q).into_iter().map(move |n| (n, q)))
        .filter(|(name, _)| family(name, declared).is_none())
        .map(|(name, q)| format!("{name} (in `{q}`)"))
        .collect()
}

/// A panel's query as Prometheus evaluates it: Grafana's variables given values (every
/// function and node, and `rate_interval`).
pub fn evaluable(expr: &str, rate_interval: &str) -> String {
    expr.replace("$__rate_interval", rate_interval)
        .replace("$function", ".*")
        .replace("$node", ".*")
}
