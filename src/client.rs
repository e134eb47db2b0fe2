//! The HTTP client of the gateway's API, shared by the CLI and the agent, and the
//! printing of the gateway's error bodies for people.

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode, Uri};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;

use crate::tls::Trust;

/// CLI failures.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The gateway URL is malformed.
    #[error("--gateway `{0}` is not a URL like http://127.0.0.1:8080 or https://gateway:8080")]
    BadUrl(String),
    /// The gateway could not be reached.
    #[error("cannot reach the gateway at {url}: {reason}; is `ember serve` running there? (set --gateway or EMBER_GATEWAY)")]
    Unreachable {
        /// The URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// The gateway answered with an error.
    #[error("{}", render_api_error(*.status, .body))]
    Api {
        /// HTTP status.
        status: StatusCode,
        /// Response body.
        body: Bytes,
    },
    /// The TLS settings are unusable.
    #[error("TLS: {0}")]
    Tls(String),
    /// The response could not be read.
    #[error("reading the gateway's answer failed: {0}")]
    Read(String),
}

/// Formats a gateway error body (`{"error":{"code","message","details"}}`) for people.
pub fn render_api_error(status: StatusCode, body: &[u8]) -> String {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else {
        return format!(
            "gateway answered {status}: {}",
            String::from_utf8_lossy(body).trim()
        );
    };
    let e = &v["error"];
    let mut out = format!(
        "{} ({status}, {})",
        e["message"].as_str().unwrap_or("no message"),
        e["code"].as_str().unwrap_or("unknown")
    );
    if let Some(details) = e["details"].as_array() {
        for d in details {
            out.push_str(&format!(
                "\n  {}: {}",
                d["field"].as_str().unwrap_or("?"),
                d["message"].as_str().unwrap_or("?")
            ));
        }
    }
    out
}

/// Percent-encodes a query or path value.
pub fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A client of one gateway.
pub struct ApiClient {
    base: String,
    client: Client<HttpsConnector<HttpConnector>, RequestBody>,
    token: Option<String>,
}

/// A request body: whole, or streamed (`ember cp` of a large file).
pub type RequestBody = BoxBody<Bytes, std::io::Error>;

/// A client for URLs outside the gateway's nodes (job callbacks), trusting public web
/// roots for https, that connects only to the addresses its [`Guarded`] resolver accepts.
pub type Outbound = Client<HttpsConnector<HttpConnector<Guarded>>, Full<Bytes>>;

/// Resolves names for [`outbound`], keeping only the addresses its rule accepts (given the
/// host and the address), so that the addresses checked are the ones connected to: a name
/// that resolves to a public address when checked and to a private one when connected
/// (DNS rebinding) gets nowhere. (An address written in the URL is not resolved: the
/// caller checks it.)
#[derive(Clone)]
pub struct Guarded(std::sync::Arc<AddressRule>);

/// Whether a connection to a host may go to an address.
type AddressRule = dyn Fn(&str, std::net::IpAddr) -> bool + Send + Sync;

type Resolving = std::pin::Pin<
    Box<
        dyn std::future::Future<Output = std::io::Result<std::vec::IntoIter<std::net::SocketAddr>>>
            + Send,
    >,
>;

impl tower_service::Service<hyper_util::client::legacy::connect::dns::Name> for Guarded {
    type Response = std::vec::IntoIter<std::net::SocketAddr>;
    type Error = std::io::Error;
    type Future = Resolving;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: hyper_util::client::legacy::connect::dns::Name) -> Self::Future {
        let rule = self.0.clone();
        Box::pin(async move {
            let host = name.as_str().to_string();
            let addrs: Vec<std::net::SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await?
                .filter(|a| rule(&host, a.ip()))
                .collect();
            if addrs.is_empty() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::PermissionDenied,
                    format!("{host} resolves to no address this client may reach"),
                ));
            }
            Ok(addrs.into_iter())
        })
    }
}

/// The client job callbacks are sent with, reaching only the addresses `allowed` accepts
/// for their host; `None` when no TLS configuration can be made.
pub fn outbound(
    allowed: impl Fn(&str, std::net::IpAddr) -> bool + Send + Sync + 'static,
) -> Option<Outbound> {
    let tls = Trust::PublicRoots.client_config(&[]).ok()?;
    let mut http = HttpConnector::new_with_resolver(Guarded(std::sync::Arc::new(allowed)));
    http.set_connect_timeout(Some(Duration::from_secs(10)));
    http.enforce_http(false);
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Some(Client::builder(TokioExecutor::new()).build(connector))
}

impl ApiClient {
    /// A client of the gateway at `url` (http, or https trusted by the public web roots).
    pub fn new(url: &str) -> Result<ApiClient, ClientError> {
        ApiClient::with_trust(url, &Trust::PublicRoots)
    }

    /// A client of the gateway at `url`, trusting an https gateway as `trust` says.
    pub fn with_trust(url: &str, trust: &Trust) -> Result<ApiClient, ClientError> {
        let base = url.trim_end_matches('/').to_string();
        let uri: Uri = base.parse().map_err(|_| ClientError::BadUrl(url.into()))?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
            return Err(ClientError::BadUrl(url.into()));
        }
        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(Duration::from_secs(5)));
        http.enforce_http(false);
        let tls = trust
            .client_config(&[])
            .map_err(|e| ClientError::Tls(e.to_string()))?;
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        Ok(ApiClient {
            base,
            client: Client::builder(TokioExecutor::new()).build(connector),
            token: None,
        })
    }

    /// Sends `token` with every request: as `Authorization: Bearer` to the API, and as
    /// `X-Ember-Key` to functions (`/fn/...`), which the gateway always removes, so the
    /// token never reaches a function's code. A header the caller sets itself wins.
    pub fn with_token(mut self, token: Option<String>) -> ApiClient {
        self.token = token;
        self
    }

    /// The gateway's URL.
    pub fn url(&self) -> &str {
        &self.base
    }

    /// The credential header for a request to `path`, unless `headers` has one already.
    fn credential(&self, path: &str, headers: &[(String, String)]) -> Option<(&str, String)> {
        let token = self.token.as_deref()?;
        let (name, value) = if path.starts_with("/fn/") {
            (crate::access::KEY_HEADER, token.to_string())
        } else {
            ("authorization", format!("Bearer {token}"))
        };
        let set = headers.iter().any(|(k, _)| k.eq_ignore_ascii_case(name));
        (!set).then_some((name, value))
    }

    /// Sends a request; returns the streaming response whatever its status.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        headers: &[(String, String)],
        body: Bytes,
    ) -> Result<http::Response<Incoming>, ClientError> {
        let body = Full::new(body).map_err(|never| match never {}).boxed();
        self.send_body(method, path, headers, body).await
    }

    /// Sends a request with a streamed body; returns the response whatever its status.
    pub async fn send_body(
        &self,
        method: Method,
        path: &str,
        headers: &[(String, String)],
        body: RequestBody,
    ) -> Result<http::Response<Incoming>, ClientError> {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base));
        for (k, v) in headers {
            req = req.header(k, v);
        }
        if let Some((k, v)) = self.credential(path, headers) {
            req = req.header(k, v);
        }
        let req = req
            .body(body)
            .map_err(|e| ClientError::BadUrl(e.to_string()))?;
        self.client
            .request(req)
            .await
            .map_err(|e| ClientError::Unreachable {
                url: self.base.clone(),
                reason: crate::model::error_chain(&e),
            })
    }

    /// Sends a request and reads the whole answer; error statuses become `ClientError::Api`.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        content_type: Option<&str>,
        body: Bytes,
    ) -> Result<Bytes, ClientError> {
        let headers: Vec<(String, String)> = content_type
            .map(|c| vec![("content-type".to_string(), c.to_string())])
            .unwrap_or_default();
        let resp = self.send(method, path, &headers, body).await?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| ClientError::Read(e.to_string()))?
            .to_bytes();
        if status.is_success() {
            Ok(body)
        } else {
            Err(ClientError::Api { status, body })
        }
    }

    /// GET and decode JSON.
    pub async fn get_json(&self, path: &str) -> Result<serde_json::Value, ClientError> {
        let body = self.call(Method::GET, path, None, Bytes::new()).await?;
        serde_json::from_slice(&body).map_err(|e| ClientError::Read(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn outbound_connects_only_to_addresses_its_rule_accepts() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let tracker = tokio_util::task::TaskTracker::new();
        tracker.spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            while let Ok((mut s, _)) = listener.accept().await {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(b"HTTP/1.1 204 No Content\r\nconnection: close\r\n\r\n")
                    .await;
            }
        });
        let uri: Uri = format!("http://localhost:{port}/").parse().unwrap();
        let refused = outbound(|_, ip| !ip.is_loopback()).unwrap();
        let e = refused.get(uri.clone()).await.unwrap_err();
        let chain = crate::model::error_chain(&e);
        assert!(chain.contains("resolves to no address"), "{chain}");
        let allowed = outbound(|host, _| host == "localhost").unwrap();
        assert_eq!(allowed.get(uri).await.unwrap().status(), 204);
    }

    #[test]
    fn api_errors_print_message_code_and_fields() {
        let body = br#"{"error":{"code":"invalid_manifest","message":"manifest is invalid","details":[{"field":"scale.max","message":"must be between 1 and 1000"}]}}"#;
        let text = render_api_error(StatusCode::BAD_REQUEST, body);
        assert!(text.starts_with("manifest is invalid (400 Bad Request, invalid_manifest)"));
        assert!(text.contains("\n  scale.max: must be between 1 and 1000"));
    }

    #[test]
    fn query_values_are_percent_encoded() {
        assert_eq!(encode("ember/echo:abc"), "ember%2Fecho%3Aabc");
    }

    #[test]
    fn the_token_goes_to_the_api_as_bearer_and_to_functions_as_the_key_header() {
        let c = ApiClient::new("http://127.0.0.1:1")
            .unwrap()
            .with_token(Some("t".into()));
        assert_eq!(
            c.credential("/api/v1/functions", &[]),
            Some(("authorization", "Bearer t".into()))
        );
        assert_eq!(
            c.credential("/fn/echo/", &[]),
            Some(("x-ember-key", "t".into()))
        );
        let own = [("Authorization".to_string(), "Bearer mine".to_string())];
        assert_eq!(c.credential("/api/v1/keys", &own), None);
        assert_eq!(
            ApiClient::new("http://127.0.0.1:1")
                .unwrap()
                .credential("/api/v1/keys", &[]),
            None
        );
    }

    #[test]
    fn bad_gateway_urls_are_refused_clearly() {
        assert!(ApiClient::new("localhost:8080").is_err());
        assert!(ApiClient::new("http://127.0.0.1:8080").is_ok());
    }
}
