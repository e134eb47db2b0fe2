//! Which gateway the CLI talks to and with which token, and `ember login`, which saves
//! both.
//!
//! The gateway: `--gateway`, `EMBER_GATEWAY`, the saved login's, then
//! `http://127.0.0.1:8080`. The token: `--token`, `EMBER_TOKEN`, the saved login's (only
//! for the gateway it was saved for: a token is never sent to another gateway), then
//! `./.ember/admin.token` when the gateway is on this machine's loopback, which is where
//! `ember serve` run from the same directory keeps it.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use super::{GatewayArgs, DEFAULT_GATEWAY};
use crate::access;
use crate::client::{ApiClient, ClientError};
use crate::tls::Trust;

/// What `ember login` saves.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Login {
    /// The gateway's URL.
    pub gateway: String,
    /// Its admin token (or an admin key).
    pub token: String,
    /// The pin of its CA, for an https gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_pin: Option<String>,
}

/// Where the CLI looks besides its flags; [`Places::here`] reads them from the process.
#[derive(Debug, Clone, Default)]
pub struct Places {
    /// `EMBER_GATEWAY`.
    pub env_gateway: Option<String>,
    /// `EMBER_TOKEN`.
    pub env_token: Option<String>,
    /// `EMBER_CA_PIN`.
    pub env_ca_pin: Option<String>,
    /// `EMBER_CA_FILE`.
    pub env_ca_file: Option<PathBuf>,
    /// The login file, if the CLI has a config directory.
    pub login_file: Option<PathBuf>,
    /// The admin token of a gateway run from the current directory.
    pub local_token: PathBuf,
    /// The CA of a gateway run from the current directory with `--tls self-signed`.
    pub local_ca: PathBuf,
}

impl Places {
    /// The environment and the files of this process.
    pub fn here() -> Places {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        Places {
            env_gateway: var("EMBER_GATEWAY"),
            env_token: var("EMBER_TOKEN"),
            env_ca_pin: var("EMBER_CA_PIN"),
            env_ca_file: var("EMBER_CA_FILE").map(PathBuf::from),
            login_file: login_file(var("XDG_CONFIG_HOME"), var("HOME")),
            local_token: Path::new(crate::config::DEFAULT_DATA_DIR).join(access::ADMIN_TOKEN_FILE),
            local_ca: Path::new(crate::config::DEFAULT_DATA_DIR)
                .join("tls")
                .join(crate::tls::CA_CERT_FILE),
        }
    }
}

/// `$XDG_CONFIG_HOME/ember/config.toml`, else `~/.config/ember/config.toml`.
pub fn login_file(xdg_config_home: Option<String>, home: Option<String>) -> Option<PathBuf> {
    // The XDG spec ignores relative values.
    let base = xdg_config_home
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| home.map(|h| Path::new(&h).join(".config")))?;
    Some(base.join("ember").join("config.toml"))
}

/// Where the token the CLI sends came from, for the hint after a 401.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// No token was found.
    None,
    /// `--token`.
    Flag,
    /// `EMBER_TOKEN`.
    Env,
    /// The file `ember login` wrote.
    Login(PathBuf),
    /// The admin token file of a gateway run from this directory.
    Local(PathBuf),
}

impl std::fmt::Display for TokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TokenSource::None => write!(
                f,
                "no token was sent: pass --token TOKEN, set EMBER_TOKEN, or run \
                 `ember login GATEWAY_URL --token TOKEN` once"
            ),
            TokenSource::Flag => write!(f, "the token sent came from --token"),
            TokenSource::Env => write!(f, "the token sent came from EMBER_TOKEN"),
            TokenSource::Login(p) => write!(
                f,
                "the token sent came from {} (`ember login` saved it)",
                p.display()
            ),
            TokenSource::Local(p) => write!(f, "the token sent came from {}", p.display()),
        }
    }
}

/// The gateway the CLI talks to and the token it sends.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    /// The gateway's URL.
    pub url: String,
    /// The token, if one was found.
    pub token: Option<String>,
    /// Where it came from.
    pub source: TokenSource,
    /// How an https gateway's certificate is trusted.
    pub trust: Trust,
}

impl Target {
    /// Resolves flags and places in the documented order.
    pub fn resolve(flags: &GatewayArgs, places: &Places) -> anyhow::Result<Target> {
        let needed = (flags.gateway.is_none() && places.env_gateway.is_none())
            || (flags.token.is_none() && places.env_token.is_none());
        let saved = match &places.login_file {
            Some(file) if needed => load(file)?,
            _ => None,
        };
        let url = flags
            .gateway
            .clone()
            .or_else(|| places.env_gateway.clone())
            .or_else(|| saved.as_ref().map(|s| s.gateway.clone()))
            .unwrap_or_else(|| DEFAULT_GATEWAY.to_string());
        let url = normalize(&url);
        let saved_here = saved.as_ref().filter(|s| normalize(&s.gateway) == url);
        let pin = flags
            .ca_pin
            .clone()
            .or_else(|| places.env_ca_pin.clone())
            .or_else(|| saved_here.and_then(|s| s.ca_pin.clone()));
        let local_ca = (pin.is_none() && is_loopback(&url) && places.local_ca.is_file())
            .then(|| places.local_ca.clone());
        let file = flags
            .ca_file
            .clone()
            .or_else(|| places.env_ca_file.clone())
            .or(local_ca);
        let trust = Trust::from_settings(pin.as_deref(), file.as_deref())?;
        let (token, source) = if let Some(t) = &flags.token {
            (Some(t.clone()), TokenSource::Flag)
        } else if let Some(t) = &places.env_token {
            (Some(t.clone()), TokenSource::Env)
        } else if let Some(s) = saved.filter(|s| normalize(&s.gateway) == url) {
            let file = places.login_file.clone().unwrap_or_default();
            (Some(s.token), TokenSource::Login(file))
        } else if is_loopback(&url) && places.local_token.is_file() {
            let text = std::fs::read_to_string(&places.local_token)
                .with_context(|| format!("cannot read {}", places.local_token.display()))?;
            (
                Some(text.trim().to_string()),
                TokenSource::Local(places.local_token.clone()),
            )
        } else {
            (None, TokenSource::None)
        };
        Ok(Target {
            url,
            token,
            source,
            trust,
        })
    }

    /// A client of the gateway that sends the token.
    pub fn client(&self) -> Result<ApiClient, ClientError> {
        Ok(ApiClient::with_trust(&self.url, &self.trust)?.with_token(self.token.clone()))
    }

    /// `e` with a hint about the token when the gateway refused it.
    pub fn explain(&self, e: anyhow::Error) -> anyhow::Error {
        match e.downcast_ref::<ClientError>() {
            Some(ClientError::Api { status, .. }) if status.as_u16() == 401 => {
                anyhow::anyhow!("{e:#}\n  ({})", self.source)
            }
            _ => e,
        }
    }
}

fn normalize(url: &str) -> String {
    url.trim().trim_end_matches('/').to_string()
}

/// Whether the URL's host is this machine's loopback (`localhost`, 127.0.0.0/8, `::1`).
pub fn is_loopback(url: &str) -> bool {
    let Ok(uri) = url.parse::<http::Uri>() else {
        return false;
    };
    let Some(host) = uri.host() else {
        return false;
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The saved login, if there is one.
fn load(file: &Path) -> anyhow::Result<Option<Login>> {
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", file.display())),
    };
    let login = toml::from_str(&text).with_context(|| {
        format!(
            "{} is not a login `ember login` wrote; run `ember login` again",
            file.display()
        )
    })?;
    Ok(Some(login))
}

/// Writes `login` to `file`, readable by its owner only, replacing what was there.
fn save(file: &Path, login: &Login) -> anyhow::Result<()> {
    let dir = file.parent().context("the login file has no directory")?;
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    let text = format!(
        "# Written by `ember login`; holds a credential, keep it private.\n{}",
        toml::to_string(login)?
    );
    access::replace_file(file, text.as_bytes(), 0o600)
        .with_context(|| format!("cannot write {}", file.display()))
}

/// `ember login URL --token T`: checks the token against the gateway, then saves both.
pub async fn login(url: &str, outer: &GatewayArgs, places: &Places) -> anyhow::Result<()> {
    let flags = GatewayArgs {
        gateway: Some(url.to_string()),
        ..outer.clone()
    };
    let target = Target::resolve(&flags, places)?;
    let Some(token) = target.token.clone() else {
        anyhow::bail!(
            "no token to log in with: pass --token TOKEN (the gateway's DATA_DIR/admin.token, \
             or an admin key from `ember keys create --name NAME --admin`)"
        );
    };
    let file = places
        .login_file
        .clone()
        .context("no config directory: set XDG_CONFIG_HOME or HOME")?;
    let info = target
        .client()?
        .get_json("/api/v1/gateway")
        .await
        .map_err(|e| target.explain(e.into()))
        .with_context(|| format!("logging in to {} failed; nothing was saved", target.url))?;
    save(
        &file,
        &Login {
            gateway: target.url.clone(),
            token,
            ca_pin: match &target.trust {
                Trust::Pin(pin) => Some(pin.clone()),
                _ => None,
            },
        },
    )?;
    println!(
        "logged in to {} (gateway {}); saved to {}",
        target.url,
        info["id"].as_str().unwrap_or("?"),
        file.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(gateway: Option<&str>, token: Option<&str>) -> GatewayArgs {
        GatewayArgs {
            gateway: gateway.map(str::to_string),
            token: token.map(str::to_string),
            ..GatewayArgs::default()
        }
    }

    /// Places with every source filled, in a temporary directory.
    fn everywhere(dir: &Path, saved_gateway: &str) -> Places {
        let login_file = dir.join("config/ember/config.toml");
        save(
            &login_file,
            &Login {
                gateway: saved_gateway.into(),
                token: "from-login".into(),
                ca_pin: None,
            },
        )
        .unwrap();
        let local_token = dir.join("admin.token");
        std::fs::write(&local_token, "from-local\n").unwrap();
        Places {
            env_gateway: None,
            env_token: Some("from-env".into()),
            env_ca_pin: None,
            env_ca_file: None,
            login_file: Some(login_file),
            local_token,
            local_ca: dir.join("ca.pem"),
        }
    }

    #[test]
    fn the_token_comes_from_the_flag_then_the_environment_then_the_login_then_the_local_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut places = everywhere(dir.path(), "http://127.0.0.1:8080/");
        let token = |places: &Places, f: &GatewayArgs| {
            let t = Target::resolve(f, places).unwrap();
            (t.token.unwrap_or_default(), t.source)
        };
        let none = flags(None, None);
        assert_eq!(
            token(&places, &flags(None, Some("from-flag"))),
            ("from-flag".into(), TokenSource::Flag)
        );
        assert_eq!(token(&places, &none), ("from-env".into(), TokenSource::Env));
        places.env_token = None;
        let (t, source) = token(&places, &none);
        assert_eq!(t, "from-login");
        assert!(matches!(source, TokenSource::Login(_)));
        std::fs::remove_file(places.login_file.as_ref().unwrap()).unwrap();
        let (t, source) = token(&places, &none);
        assert_eq!(t, "from-local", "the default gateway is on loopback");
        assert_eq!(source, TokenSource::Local(places.local_token.clone()));
        std::fs::remove_file(&places.local_token).unwrap();
        assert_eq!(token(&places, &none), (String::new(), TokenSource::None));
    }

    #[test]
    fn a_saved_login_names_the_default_gateway_and_its_token_goes_to_it_only() {
        let dir = tempfile::tempdir().unwrap();
        let mut places = everywhere(dir.path(), "http://gpu-gateway:8080");
        places.env_token = None;
        let t = Target::resolve(&flags(None, None), &places).unwrap();
        assert_eq!(t.url, "http://gpu-gateway:8080");
        assert_eq!(t.token.as_deref(), Some("from-login"));
        let t = Target::resolve(&flags(Some("http://elsewhere:8080"), None), &places).unwrap();
        assert_eq!(
            t.token, None,
            "not the other gateway's token, nor the local one"
        );
        places.env_gateway = Some("http://from-env:1".into());
        let t = Target::resolve(&flags(None, None), &places).unwrap();
        assert_eq!(t.url, "http://from-env:1");
        let t = Target::resolve(&flags(Some("http://127.0.0.1:9/"), None), &places).unwrap();
        assert_eq!(t.url, "http://127.0.0.1:9");
        assert_eq!(t.token.as_deref(), Some("from-local"));
    }

    #[test]
    fn the_local_admin_token_is_sent_only_to_loopback_gateways() {
        for url in [
            "http://127.0.0.1:8080",
            "http://localhost:1",
            "http://[::1]:8080",
            "http://127.0.0.2",
        ] {
            assert!(is_loopback(url), "{url}");
        }
        for url in [
            "http://10.0.0.1:8080",
            "http://gateway:8080",
            "http://0.0.0.0:1",
            "nonsense",
        ] {
            assert!(!is_loopback(url), "{url}");
        }
    }

    #[test]
    fn the_login_file_is_under_xdg_config_home_else_home_and_private() {
        assert_eq!(
            login_file(Some("/x".into()), Some("/home/u".into())),
            Some(PathBuf::from("/x/ember/config.toml"))
        );
        assert_eq!(
            login_file(Some("relative".into()), Some("/home/u".into())),
            Some(PathBuf::from("/home/u/.config/ember/config.toml"))
        );
        assert_eq!(login_file(None, None), None);
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("ember/config.toml");
        let login = Login {
            gateway: "http://g:1".into(),
            token: "t".into(),
            ca_pin: Some(format!("sha256:{}", "a".repeat(64))),
        };
        save(&file, &login).unwrap();
        save(&file, &login).unwrap();
        assert_eq!(load(&file).unwrap(), Some(login));
        assert!(!access::readable_by_others(&file));
        std::fs::write(&file, "not = [toml").unwrap();
        assert!(load(&file).is_err());
    }
}
