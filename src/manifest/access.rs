//! The `[access]` section: who may invoke the function. Functions are public unless
//! `private = true`; then a caller needs an invoke key for it (or an admin credential).
//! Checking credentials is the gateway's; this is only what the manifest says.

use serde::{Deserialize, Serialize};

/// Who may invoke the function.
#[derive(utoipa::ToSchema, Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Access {
    /// Callers must send an invoke key allowed to invoke this function (`Authorization:
    /// Bearer KEY` or `X-Ember-Key: KEY`); the function never sees it.
    #[serde(default)]
    pub private: bool,
}

#[cfg(test)]
mod tests {
    use crate::manifest::test_support::{fields, toml};

    const PLAIN: &str = "name = \"a\"\nimage = \"e:1\"";

    #[test]
    fn functions_are_public_unless_the_manifest_says_private() {
        assert!(!toml(PLAIN).unwrap().access.private);
        let private = toml(&format!("{PLAIN}\n[access]\nprivate = true")).unwrap();
        assert!(private.access.private);
        let err = toml(&format!("{PLAIN}\n[access]\nprivat = true")).unwrap_err();
        assert_eq!(fields(err), ["access.privat"]);
    }

    #[test]
    fn a_public_access_section_keeps_the_revision_id_and_private_changes_it() {
        let plain = toml(PLAIN).unwrap().revision_id();
        let public = toml(&format!("{PLAIN}\n[access]\nprivate = false")).unwrap();
        assert_eq!(public.revision_id(), plain);
        let private = toml(&format!("{PLAIN}\n[access]\nprivate = true")).unwrap();
        assert_ne!(private.revision_id(), plain);
        let json = serde_json::to_value(&private).unwrap();
        assert_eq!(json["access"], serde_json::json!({"private": true}));
    }
}
