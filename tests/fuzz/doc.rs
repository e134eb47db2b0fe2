//! A document the fuzzer edits and then writes both as JSON and as TOML, so one mutation
//! reaches both parsers: it holds what either format can say (integers past 64 bits, NaN,
//! TOML datetimes, duplicate keys) and each writer renders what its format cannot as the
//! nearest thing it can (JSON: `null` for NaN, a string for a datetime; TOML: a missing key
//! for `null`).

use serde_json::Value;

/// A JSON or TOML value.
#[derive(Debug, Clone, PartialEq)]
pub enum Doc {
    /// JSON's `null`; a key TOML leaves out.
    Null,
    /// `true` or `false`.
    Bool(bool),
    /// An integer, possibly past what either format's parser takes.
    Int(i128),
    /// A float, NaN and infinities included.
    Float(f64),
    /// A string.
    Str(String),
    /// A TOML datetime, written bare (a string in JSON).
    Datetime(String),
    /// An array.
    Arr(Vec<Doc>),
    /// A table, in order, duplicate keys allowed.
    Obj(Vec<(String, Doc)>),
}

impl Doc {
    /// The document a JSON value is.
    pub fn from_json(v: &Value) -> Doc {
        match v {
            Value::Null => Doc::Null,
            Value::Bool(b) => Doc::Bool(*b),
            Value::Number(n) => match (n.as_i64(), n.as_u64()) {
                (Some(i), _) => Doc::Int(i.into()),
                (_, Some(u)) => Doc::Int(u.into()),
                _ => Doc::Float(n.as_f64().unwrap_or(f64::NAN)),
            },
            Value::String(s) => Doc::Str(s.clone()),
            Value::Array(items) => Doc::Arr(items.iter().map(Doc::from_json).collect()),
            Value::Object(map) => Doc::Obj(
                map.iter()
                    .map(|(k, v)| (k.clone(), Doc::from_json(v)))
                    .collect(),
            ),
        }
    }

    /// Sets the value at `path` (dotted; a number indexes an array), making the tables on
    /// the way, and replacing whatever is in the way that is not one.
    pub fn set(&mut self, path: &str, value: Doc) {
        let mut at = self;
        for part in path.split('.') {
            at = match (at, part.parse::<usize>()) {
                (Doc::Arr(items), Ok(i)) => {
                    if i >= items.len() {
                        items.push(Doc::Obj(Vec::new()));
                    }
                    let i = i.min(items.len() - 1);
                    &mut items[i]
                }
                (at, _) => {
                    if !matches!(at, Doc::Obj(_)) {
                        *at = Doc::Obj(Vec::new());
                    }
                    let Doc::Obj(entries) = at else {
                        unreachable!("made a table just above")
                    };
                    let i = match entries.iter().position(|(k, _)| k == part) {
                        Some(i) => i,
                        None => {
                            entries.push((part.to_string(), Doc::Null));
                            entries.len() - 1
                        }
                    };
                    &mut entries[i].1
                }
            };
        }
        *at = value;
    }

    /// The document as JSON text.
    pub fn json(&self) -> String {
        let mut out = String::new();
        self.write_json(&mut out);
        out
    }

    fn write_json(&self, out: &mut String) {
        match self {
            Doc::Null => out.push_str("null"),
            Doc::Bool(b) => out.push_str(&b.to_string()),
            Doc::Int(i) => out.push_str(&i.to_string()),
            Doc::Float(f) => match serde_json::Number::from_f64(*f) {
                Some(n) => out.push_str(&n.to_string()),
                None => out.push_str("null"),
            },
            Doc::Str(s) | Doc::Datetime(s) => out.push_str(&Value::from(s.as_str()).to_string()),
            Doc::Arr(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    item.write_json(out);
                }
                out.push(']');
            }
            Doc::Obj(entries) => {
                out.push('{');
                for (i, (k, v)) in entries.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&Value::from(k.as_str()).to_string());
                    out.push(':');
                    v.write_json(out);
                }
                out.push('}');
            }
        }
    }

    /// The document as TOML text: top-level tables as `[section]`s, arrays of tables as
    /// `[[section]]`s, everything deeper inline. Not a table: `value = ...`.
    pub fn toml(&self) -> String {
        let Doc::Obj(entries) = self else {
            return format!("value = {}\n", self.inline());
        };
        let mut out = String::new();
        let mut sections = Vec::new();
        for (k, v) in entries {
            match v {
                Doc::Null => {}
                Doc::Obj(_) => sections.push((k, v)),
                Doc::Arr(items) if !items.is_empty() && items.iter().all(is_table) => {
                    sections.push((k, v))
                }
                _ => out.push_str(&format!("{} = {}\n", toml_key(k), v.inline())),
            }
        }
        for (k, v) in sections {
            match v {
                Doc::Obj(fields) => {
                    out.push_str(&format!("[{}]\n", toml_key(k)));
                    write_fields(fields, &mut out);
                }
                Doc::Arr(tables) => {
                    for t in tables {
                        out.push_str(&format!("[[{}]]\n", toml_key(k)));
                        if let Doc::Obj(fields) = t {
                            write_fields(fields, &mut out);
                        }
                    }
                }
                _ => unreachable!("only tables are sections"),
            }
        }
        out
    }

    /// The value as an inline TOML value.
    fn inline(&self) -> String {
        match self {
            // Only reached inside arrays: TOML has no null, the nearest is an empty table.
            Doc::Null => "{}".into(),
            Doc::Bool(b) => b.to_string(),
            Doc::Int(i) => i.to_string(),
            Doc::Float(f) if f.is_nan() => "nan".into(),
            Doc::Float(f) if f.is_infinite() => if *f > 0.0 { "inf" } else { "-inf" }.into(),
            Doc::Float(f) => format!("{f:?}"),
            Doc::Str(s) => toml_string(s),
            Doc::Datetime(s) => s.clone(),
            Doc::Arr(items) => {
                let items: Vec<String> = items.iter().map(Doc::inline).collect();
                format!("[{}]", items.join(", "))
            }
            Doc::Obj(entries) => {
                let fields: Vec<String> = entries
                    .iter()
                    .filter(|(_, v)| *v != Doc::Null)
                    .map(|(k, v)| format!("{} = {}", toml_key(k), v.inline()))
                    .collect();
                format!("{{ {} }}", fields.join(", "))
            }
        }
    }
}

fn is_table(d: &Doc) -> bool {
    matches!(d, Doc::Obj(_))
}

fn write_fields(fields: &[(String, Doc)], out: &mut String) {
    for (k, v) in fields {
        if *v != Doc::Null {
            out.push_str(&format!("{} = {}\n", toml_key(k), v.inline()));
        }
    }
}

fn toml_key(k: &str) -> String {
    let bare = !k.is_empty()
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if bare {
        k.to_string()
    } else {
        toml_string(k)
    }
}

/// A TOML basic string: quotes, backslashes and control characters escaped.
fn toml_string(s: &str) -> String {
    let mut out = String::from('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}
