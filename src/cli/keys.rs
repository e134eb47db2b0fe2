//! `ember keys create / ls / revoke`: invoke and admin keys. A new key's secret is printed
//! once, alone on stdout (so `KEY=$(ember keys create ...)` works); Ember keeps only its
//! hash, and `ls` shows names, scopes and dates.

use bytes::Bytes;
use http::Method;

use crate::client::ApiClient;

/// What a new key may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NewScope {
    /// Invoke these functions (`*`: all).
    Invoke(Vec<String>),
    /// Everything.
    Admin,
}

/// `ember keys create --name N (--invoke FN[,FN...] | --invoke '*' | --admin)`.
pub async fn create(client: &ApiClient, name: &str, scope: NewScope) -> anyhow::Result<()> {
    let body = match &scope {
        NewScope::Invoke(functions) => serde_json::json!({ "name": name, "invoke": functions }),
        NewScope::Admin => serde_json::json!({ "name": name, "admin": true }),
    };
    let answer = client
        .call(
            Method::POST,
            "/api/v1/keys",
            Some("application/json"),
            Bytes::from(body.to_string()),
        )
        .await?;
    let v: serde_json::Value = serde_json::from_slice(&answer)?;
    let key = v["key"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("the gateway's answer has no key"))?;
    println!("{key}");
    eprintln!(
        "created key `{name}` ({}); it is shown this once, Ember keeps only its hash",
        scope_text(&v["scope"])
    );
    Ok(())
}

fn scope_text(scope: &serde_json::Value) -> String {
    match scope["kind"].as_str() {
        Some("admin") => "admin".into(),
        Some("invoke") => {
            let functions: Vec<&str> = scope["functions"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|f| f.as_str())
                .collect();
            format!("invoke {}", functions.join(","))
        }
        _ => "?".into(),
    }
}

/// `ember keys ls [--json]`.
pub async fn ls(client: &ApiClient, json: bool) -> anyhow::Result<()> {
    let v = client.get_json("/api/v1/keys").await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let keys = v["keys"].as_array().cloned().unwrap_or_default();
    if keys.is_empty() {
        println!("no keys; `ember keys create --name NAME --invoke FUNCTION` makes one");
        return Ok(());
    }
    println!("{:<24} {:<40} CREATED", "NAME", "SCOPE");
    for k in keys {
        let created = k["created_ms"]
            .as_u64()
            .map(|ms| std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms))
            .map_or("?".to_string(), |t| {
                humantime::format_rfc3339_seconds(t).to_string()
            });
        println!(
            "{:<24} {:<40} {created}",
            k["name"].as_str().unwrap_or("?"),
            scope_text(&k["scope"]),
        );
    }
    Ok(())
}

/// `ember keys revoke NAME`.
pub async fn revoke(client: &ApiClient, name: &str) -> anyhow::Result<()> {
    client
        .call(
            Method::DELETE,
            &format!("/api/v1/keys/{}", crate::client::encode(name)),
            None,
            Bytes::new(),
        )
        .await?;
    println!("revoked key {name}; it fails from its next request on");
    Ok(())
}
