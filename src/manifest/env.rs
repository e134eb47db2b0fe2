//! `env`: the container's extra environment. A value is a plain string, or a reference to a
//! secret kept by the gateway (`HF_TOKEN = { secret = "hf" }`), whose value is filled in
//! only in the start call to the node: the manifest, its revision id and every API answer
//! hold the secret's name, never its value.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

/// Longest secret name.
pub const MAX_SECRET_NAME_LEN: usize = 63;

/// One value of `env`.
#[derive(utoipa::ToSchema, Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum EnvValue {
    /// A plain value (serialised as a bare string, as before secrets existed, so revision
    /// ids of existing manifests do not change).
    Plain(String),
    /// The value of the named secret.
    Secret {
        /// The secret's name (`ember secret set NAME`).
        secret: String,
    },
}

impl EnvValue {
    /// The plain value, if it is one.
    pub fn plain(&self) -> Option<&str> {
        match self {
            EnvValue::Plain(v) => Some(v),
            EnvValue::Secret { .. } => None,
        }
    }

    /// The secret's name, if it is one.
    pub fn secret(&self) -> Option<&str> {
        match self {
            EnvValue::Plain(_) => None,
            EnvValue::Secret { secret } => Some(secret),
        }
    }
}

impl From<&str> for EnvValue {
    fn from(v: &str) -> Self {
        EnvValue::Plain(v.to_string())
    }
}

impl PartialEq<&str> for EnvValue {
    fn eq(&self, other: &&str) -> bool {
        self.plain() == Some(*other)
    }
}

impl<'de> Deserialize<'de> for EnvValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(EnvValueVisitor)
    }
}

struct EnvValueVisitor;

const EXPECTED: &str = "a string, or { secret = \"NAME\" } (quote numbers and booleans: \"1\")";

impl<'de> Visitor<'de> for EnvValueVisitor {
    type Value = EnvValue;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(EXPECTED)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<EnvValue, E> {
        Ok(EnvValue::Plain(v.to_string()))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<EnvValue, A::Error> {
        let mut secret = None;
        while let Some(key) = map.next_key::<String>()? {
            if key != "secret" {
                return Err(de::Error::custom(format!(
                    "unknown key `{key}`: expected {{ secret = \"NAME\" }}"
                )));
            }
            secret = Some(map.next_value::<String>()?);
        }
        let secret = secret.ok_or_else(|| de::Error::custom("missing `secret = \"NAME\"`"))?;
        Ok(EnvValue::Secret { secret })
    }
}

/// A secret name: 1 to 63 of a-z, 0-9, `-`, `_` and `.`, starting with a letter or digit.
pub fn check_secret_name(name: &str) -> Result<(), String> {
    super::check_lower_name("secret", MAX_SECRET_NAME_LEN, name)
}

/// Reports every problem of `env`, each at its `env.NAME` path.
pub(super) fn validate(env: &BTreeMap<String, EnvValue>, bad: &mut impl FnMut(&str, String)) {
    for (key, value) in env {
        let field = format!("env.{key}");
        if !valid_env_name(key) {
            bad(
                &field,
                "variable names are letters, digits and `_`, not starting with a digit".into(),
            );
        } else if key == "PORT" {
            bad(
                "env.PORT",
                "is set by Ember from `port`; set `port` instead".into(),
            );
        }
        if let Some(name) = value.secret() {
            if let Err(m) = check_secret_name(name) {
                bad(&format!("{field}.secret"), m);
            }
        }
    }
}

fn valid_env_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use crate::manifest::test_support::{fields, toml};

    #[test]
    fn env_values_are_strings_or_secret_references() {
        let m = toml(
            "name = \"a\"\nimage = \"e:1\"\nenv = { GREETING = \"hi\", HF_TOKEN = { secret = \"hf\" } }",
        )
        .unwrap();
        assert_eq!(m.env["GREETING"], "hi");
        assert_eq!(m.env["HF_TOKEN"].secret(), Some("hf"));
        let json = serde_json::to_value(&m.env).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"GREETING": "hi", "HF_TOKEN": {"secret": "hf"}})
        );
    }

    #[test]
    fn bad_env_values_and_secret_names_name_their_field() {
        let err = toml("name = \"a\"\nimage = \"e:1\"\nenv = { N = 1 }").unwrap_err();
        let e = &err.field_errors()[0];
        assert_eq!(e.field, "env.N");
        assert!(e.message.contains("quote numbers"), "{}", e.message);
        let err =
            toml("name = \"a\"\nimage = \"e:1\"\nenv = { T = { secrte = \"x\" } }").unwrap_err();
        assert!(err.field_errors()[0]
            .message
            .contains("unknown key `secrte`"));
        let err = toml("name = \"a\"\nimage = \"e:1\"\nenv = { T = { secret = \"Bad Name\" } }")
            .unwrap_err();
        assert_eq!(fields(err), ["env.T.secret"]);
    }
}
