//! The `[openai]` section: the model ids a function serves behind the gateway's
//! OpenAI-compatible front door (`/v1/...`), and how requests for them pick an instance.
//!
//! ```toml
//! [openai]
//! models = ["llama-3.1-8b", "llama-3.1-8b-instruct"]   # ids clients ask for, or
//! # models = { "llama-8b" = "meta-llama/Llama-3.1-8B-Instruct" }  (id = name the server knows)
//! routing = "prefix"       # prefix (default) | least_loaded
//! load_factor = 1.25       # prefix routing skips an instance above this × the mean load
//! prefix_bytes = 256       # how much of the prompt's start picks the instance
//! ```
//!
//! That no two functions claim one id is checked at deploy, against the other functions.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

use super::is_default;

/// Longest model id (Hugging Face ids are `org/name`, well under this).
pub const MAX_MODEL_ID_LEN: usize = 256;
/// Most model ids one function may claim.
pub const MAX_MODELS: usize = 64;
/// Default bound on an instance's load under prefix routing, as a multiple of the mean.
pub const DEFAULT_LOAD_FACTOR: f64 = 1.25;
/// Default length of the prompt prefix that picks the instance.
pub const DEFAULT_PREFIX_BYTES: usize = 256;

/// The `[openai]` section.
#[derive(utoipa::ToSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenAi {
    /// The ids clients ask for, each with the name the function's server knows it by.
    pub models: Models,
    /// How a request picks one of the ready instances.
    #[serde(default, skip_serializing_if = "is_default")]
    pub routing: Routing,
    /// Prefix routing skips an instance whose in-flight count would pass this multiple of
    /// the mean (consistent hashing with bounded loads); at least 1.
    #[serde(
        default = "default_load_factor",
        skip_serializing_if = "is_default_load_factor"
    )]
    pub load_factor: f64,
    /// Bytes of the prompt's start (the first system message, then the first user
    /// message; or `prompt`) hashed to pick the instance.
    #[serde(
        default = "default_prefix_bytes",
        skip_serializing_if = "is_default_prefix_bytes"
    )]
    pub prefix_bytes: usize,
}

fn default_load_factor() -> f64 {
    DEFAULT_LOAD_FACTOR
}

fn is_default_load_factor(v: &f64) -> bool {
    *v == DEFAULT_LOAD_FACTOR
}

fn default_prefix_bytes() -> usize {
    DEFAULT_PREFIX_BYTES
}

fn is_default_prefix_bytes(v: &usize) -> bool {
    *v == DEFAULT_PREFIX_BYTES
}

/// How a request for a model picks one of its function's ready instances.
#[derive(utoipa::ToSchema, Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Routing {
    /// Requests sharing a prompt prefix go to the same instance (its prefix cache is
    /// warm), within the load bound; requests without a prompt go least loaded.
    #[default]
    Prefix,
    /// The instance with the fewest requests in flight.
    LeastLoaded,
}

/// Model ids: a list (each id is the name the server knows), or a table of id = the
/// server's name (the front door renames `model` in the body).
#[derive(utoipa::ToSchema, Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Models {
    /// `["a", "b"]`.
    List(Vec<String>),
    /// `{ "a" = "org/A" }`.
    Renamed(BTreeMap<String, String>),
}

impl Models {
    /// Each id with the name the function's server knows it by.
    pub fn pairs(&self) -> Vec<(&str, &str)> {
        match self {
            Models::List(ids) => ids.iter().map(|id| (id.as_str(), id.as_str())).collect(),
            Models::Renamed(map) => map.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect(),
        }
    }

    /// The field path of the id at `index` of [`Models::pairs`].
    pub fn field(&self, index: usize) -> String {
        match self {
            Models::List(_) => format!("openai.models[{index}]"),
            Models::Renamed(map) => {
                let id = map.keys().nth(index).map_or("", String::as_str);
                format!("openai.models.{id}")
            }
        }
    }
}

impl<'de> Deserialize<'de> for Models {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Models;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(
                    "a list of model ids (`[\"llama-3.1-8b\"]`) or a table of id = the name \
                     the server knows (`{ \"llama-8b\" = \"meta-llama/Llama-3.1-8B\" }`)",
                )
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Models, A::Error> {
                let mut ids = Vec::new();
                while let Some(id) = seq.next_element::<String>()? {
                    ids.push(id);
                }
                Ok(Models::List(ids))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Models, A::Error> {
                let mut out = BTreeMap::new();
                while let Some((id, name)) = map.next_entry::<String, String>()? {
                    if out.insert(id.clone(), name).is_some() {
                        return Err(de::Error::custom(format!("model `{id}` is listed twice")));
                    }
                }
                Ok(Models::Renamed(out))
            }
        }
        d.deserialize_any(V)
    }
}

impl OpenAi {
    /// Checks the section's values.
    pub(super) fn validate(&self, bad: &mut impl FnMut(&str, String)) {
        let pairs = self.models.pairs();
        if pairs.is_empty() {
            bad(
                "openai.models",
                "must name at least one model id, e.g. `models = [\"llama-3.1-8b\"]`".into(),
            );
        }
        if pairs.len() > MAX_MODELS {
            bad(
                "openai.models",
                format!("names {} models; at most {MAX_MODELS}", pairs.len()),
            );
        }
        for (i, (id, name)) in pairs.iter().enumerate() {
            let field = self.models.field(i);
            if let Err(m) = check_model_id(id) {
                bad(&field, m);
            } else if let Err(m) = check_model_id(name) {
                bad(&field, format!("the server's name: {m}"));
            } else if pairs[..i].iter().any(|(earlier, _)| earlier == id) {
                bad(&field, format!("model `{id}` is listed twice"));
            }
        }
        if !(1.0..=100.0).contains(&self.load_factor) {
            bad(
                "openai.load_factor",
                format!(
                    "{} is not between 1 and 100 (1.25: an instance takes at most 25% over the mean)",
                    self.load_factor
                ),
            );
        }
        if !(1..=64 * 1024).contains(&self.prefix_bytes) {
            bad(
                "openai.prefix_bytes",
                format!("{} is not between 1 and 65536", self.prefix_bytes),
            );
        }
    }
}

/// A model id: 1 to [`MAX_MODEL_ID_LEN`] printable characters, no whitespace.
pub fn check_model_id(id: &str) -> Result<(), String> {
    if id.is_empty()
        || id.len() > MAX_MODEL_ID_LEN
        || id.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(format!(
            "`{}` is not a model id: 1 to {MAX_MODEL_ID_LEN} characters, without spaces",
            id.escape_debug()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::manifest::test_support::{fields, toml};

    use super::*;

    const PLAIN: &str = "name = \"a\"\nimage = \"e:1\"";

    fn with(section: &str) -> String {
        format!("{PLAIN}\n[openai]\n{section}")
    }

    #[test]
    fn models_are_a_list_or_a_renaming_table_and_routing_defaults_to_prefix() {
        let m = toml(&with("models = [\"a\", \"org/b:1\"]")).unwrap();
        let o = m.openai.unwrap();
        assert_eq!(o.models.pairs(), [("a", "a"), ("org/b:1", "org/b:1")]);
        assert_eq!(o.routing, Routing::Prefix);
        assert_eq!(o.load_factor, DEFAULT_LOAD_FACTOR);
        let m = toml(&with(
            "models = { \"llama-8b\" = \"meta-llama/Llama-3.1-8B\" }\nrouting = \"least_loaded\"",
        ))
        .unwrap();
        let o = m.openai.unwrap();
        assert_eq!(o.models.pairs(), [("llama-8b", "meta-llama/Llama-3.1-8B")]);
        assert_eq!(o.routing, Routing::LeastLoaded);
    }

    #[test]
    fn bad_values_name_their_field() {
        let err = toml(&with("models = []")).unwrap_err();
        assert_eq!(fields(err), ["openai.models"]);
        let err = toml(&with("models = [\"a\", \"has space\", \"a\"]")).unwrap_err();
        assert_eq!(fields(err), ["openai.models[1]", "openai.models[2]"]);
        let err = toml(&with("models = { x = \"\" }")).unwrap_err();
        assert_eq!(fields(err), ["openai.models.x"]);
        let err = toml(&with(
            "models = [\"a\"]\nload_factor = 0.5\nprefix_bytes = 0",
        ))
        .unwrap_err();
        assert_eq!(fields(err), ["openai.load_factor", "openai.prefix_bytes"]);
        let err = toml(&with("models = 3")).unwrap_err();
        assert_eq!(fields(err), ["openai.models"]);
        assert!(err_text(&with("models = 3")).contains("a list of model ids"));
        let err = toml(&with("models = [\"a\"]\nrouting = \"random\"")).unwrap_err();
        assert_eq!(fields(err), ["openai.routing"]);
    }

    fn err_text(text: &str) -> String {
        toml(text).unwrap_err().to_string()
    }

    #[test]
    fn an_openai_section_at_its_defaults_adds_only_the_models_to_the_revision() {
        let m = toml(&with(
            "models = [\"a\"]\nrouting = \"prefix\"\nload_factor = 1.25",
        ))
        .unwrap();
        let json = serde_json::to_value(&m).unwrap();
        assert_eq!(json["openai"], serde_json::json!({"models": ["a"]}));
        assert_ne!(m.revision_id(), toml(PLAIN).unwrap().revision_id());
    }
}
