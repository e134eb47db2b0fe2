//! Callbacks: when a job submitted with `X-Callback-Url` ends, the gateway POSTs its
//! record there, signed as Standard Webhooks signs (`webhook-id`, `webhook-timestamp`,
//! `webhook-signature: v1,BASE64(HMAC-SHA256(secret, "id.timestamp.body"))`), with the
//! secret the function's `[jobs] callback_secret` names (an `ember secret`; a `whsec_`
//! value is base64 after its prefix, as Standard Webhooks writes secrets).
//!
//! The delivery is durable: its entry is written in the same store write as the job's end
//! (the job's record stays the truth), and a worker sends due entries, retrying on a
//! failure after 5 s, 5 min, 30 min, 2 h, 5 h, 10 h and 10 h (Standard Webhooks' schedule)
//! before giving up; a 410 answer stops it at once. The result is inline (`result`, or
//! `result_base64` when it is not UTF-8) up to 256 KiB, a `result_url` past that.
//!
//! Addresses a callback may not reach: loopback, private, link-local and unspecified
//! ones, unless `serve --callback-allow HOST` names the host (a guard against using the
//! gateway to reach its own network). A host's addresses are checked before the send (a
//! private one stops the delivery) and again by the client's resolver as it connects, so
//! a name that resolves to another address the second time (DNS rebinding) reaches
//! nothing it may not.

use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use hmac::Mac;
use http::{header, Method, Request};
use http_body_util::{BodyExt, Full};
use serde_json::json;

use super::{JobRecord, Jobs};
use crate::client::Outbound;
use crate::store::{now_ms, OutboxEntry};

/// Results up to this size go inline in the callback.
pub(super) const MAX_INLINE: usize = 256 << 10;
/// The delays before each retry of a failed delivery.
const SCHEDULE: &[Duration] = &[
    Duration::from_secs(5),
    Duration::from_secs(300),
    Duration::from_secs(1800),
    Duration::from_secs(7200),
    Duration::from_secs(18000),
    Duration::from_secs(36000),
    Duration::from_secs(36000),
];
/// How long one delivery may take.
const TIMEOUT: Duration = Duration::from_secs(30);
/// How often due deliveries are looked for (a new one wakes the worker at once).
const POLL: Duration = Duration::from_secs(1);

/// Checks a callback URL at submission: `http` or `https`, with a host.
pub(super) fn check_url(url: &str) -> Result<(), String> {
    let uri: http::Uri = url.parse().map_err(|_| format!("`{url}` is not a URL"))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
        return Err(format!(
            "`{url}` is not an http:// or https:// URL with a host"
        ));
    }
    Ok(())
}

/// The key a secret's value gives: a `whsec_` value's base64, or the value's bytes.
fn key_of(secret: &str) -> Vec<u8> {
    secret
        .strip_prefix("whsec_")
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
        .unwrap_or_else(|| secret.as_bytes().to_vec())
}

/// `webhook-signature`'s value for a message.
pub fn sign(secret: &str, id: &str, timestamp: u64, body: &[u8]) -> String {
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&key_of(secret))
        .expect("HMAC takes a key of any length");
    mac.update(format!("{id}.{timestamp}.").as_bytes());
    mac.update(body);
    let sig = mac.finalize().into_bytes();
    format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(sig)
    )
}

/// Whether a callback may go to `ip`: not loopback, private, shared (CGNAT), link-local,
/// unspecified or broadcast, nor such an IPv4 address inside IPv6 (mapped, NAT64, 6to4).
fn public(ip: std::net::IpAddr) -> bool {
    match ip {
        std::net::IpAddr::V4(v4) => {
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.octets()[0] == 100 && (64..128).contains(&v4.octets()[1]))
        }
        std::net::IpAddr::V6(v6) => {
            let s = v6.segments();
            let inner = |hi: u16, lo: u16| {
                let [a, b] = hi.to_be_bytes();
                let [c, d] = lo.to_be_bytes();
                std::net::Ipv4Addr::new(a, b, c, d)
            };
            let embedded = if let Some(v4) = v6.to_ipv4_mapped() {
                Some(v4)
            } else if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                Some(inner(s[6], s[7]))
            } else if s[0] == 0x2002 {
                Some(inner(s[1], s[2]))
            } else {
                None
            };
            if let Some(v4) = embedded {
                return public(std::net::IpAddr::V4(v4));
            }
            !(v6.is_loopback()
                || v6.is_unspecified()
                || (s[0] & 0xfe00) == 0xfc00
                || (s[0] & 0xffc0) == 0xfe80)
        }
    }
}

impl Jobs {
    /// Sends due callbacks until shutdown.
    pub(super) async fn deliver_loop(&self) {
        // The addresses a name resolves to are checked again as it is connected to.
        let allow = self.inner.callback_allow.clone();
        let rule = move |host: &str, ip| may_reach(&allow, host, ip);
        let Some(client) = crate::client::outbound(rule) else {
            tracing::error!("cannot make the TLS client callbacks need; none will be sent");
            return;
        };
        loop {
            let due = self
                .inner
                .invoker
                .activator()
                .store()
                .outbox_due(now_ms())
                .await;
            match due {
                Ok(due) => {
                    for (id, entry) in due {
                        self.deliver(&client, id, entry).await;
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot read the callback outbox"),
            }
            tokio::select! {
                _ = tokio::time::sleep(POLL) => {}
                _ = self.inner.outbox.notified() => {}
                _ = self.inner.shutdown.cancelled() => return,
            }
        }
    }

    async fn deliver(&self, client: &Outbound, id: u64, mut entry: OutboxEntry) {
        let store = self.inner.invoker.activator().store();
        let job = match store.job(id) {
            Ok(Some(job)) => job,
            _ => {
                let _ = store.remove_outbox(id).await;
                return;
            }
        };
        let outcome = self.send_callback(client, id, &job, &entry).await;
        let result = match outcome {
            Ok(()) => store.remove_outbox(id).await,
            Err(Failure::Stop(why)) => {
                tracing::warn!(job = %job.id, url = %entry.url, why, "callback dropped");
                store.remove_outbox(id).await
            }
            Err(Failure::Retry(why)) => match SCHEDULE.get(entry.attempts as usize) {
                Some(delay) => {
                    entry.attempts += 1;
                    entry.next_ms = now_ms() + delay.as_millis() as u64;
                    tracing::info!(job = %job.id, url = %entry.url, attempt = entry.attempts, why, "callback failed; retrying");
                    store.put_outbox(id, &entry).await
                }
                None => {
                    tracing::warn!(job = %job.id, url = %entry.url, why, "callback failed on every attempt; dropped");
                    store.remove_outbox(id).await
                }
            },
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, "cannot update the callback outbox");
        }
    }

    async fn send_callback(
        &self,
        client: &Outbound,
        id: u64,
        job: &JobRecord,
        entry: &OutboxEntry,
    ) -> Result<(), Failure> {
        let uri: http::Uri = entry
            .url
            .parse()
            .map_err(|_| Failure::Stop("not a URL".into()))?;
        let host = uri
            .host()
            .unwrap_or_default()
            .trim_matches(['[', ']'])
            .to_string();
        // A name is checked by the client's resolver as it connects; an address written
        // in the URL is not resolved, so it is checked here.
        if let Ok(ip) = host.parse::<std::net::IpAddr>() {
            if !may_reach(&self.inner.callback_allow, &host, ip) {
                return Err(Failure::Stop(private(&host)));
            }
        }
        let secret = self.callback_secret(&job.function)?;
        let body = self.payload(id, job)?;
        // One id per ending (a retried job's next ending is another message), the same on
        // every try of its delivery.
        let msg_id = format!("{}.{}", job.id, job.finished_ms.unwrap_or_default());
        let timestamp = now_ms() / 1000;
        let signature = sign(&secret, &msg_id, timestamp, &body);
        let request = Request::builder()
            .method(Method::POST)
            .uri(uri)
            .header(header::CONTENT_TYPE, "application/json")
            .header("webhook-id", &msg_id)
            .header("webhook-timestamp", timestamp)
            .header("webhook-signature", signature)
            .header("x-call-id", &job.id)
            .header("x-function-status", job.status.unwrap_or(0))
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| Failure::Stop(e.to_string()))?;
        let answer = tokio::time::timeout(TIMEOUT, client.request(request))
            .await
            .map_err(|_| Failure::Retry("no answer within 30 s".into()))?
            .map_err(|e| {
                if refused_address(&e) {
                    Failure::Stop(private(&host))
                } else {
                    Failure::Retry(crate::model::error_chain(&e))
                }
            })?;
        let status = answer.status();
        let _ = answer.into_body().collect().await;
        if status.is_success() {
            Ok(())
        } else if status == http::StatusCode::GONE {
            Err(Failure::Stop("the receiver answered 410".into()))
        } else {
            Err(Failure::Retry(format!("the receiver answered {status}")))
        }
    }

    /// The secret the function's `[jobs] callback_secret` names, now.
    fn callback_secret(&self, function: &str) -> Result<String, Failure> {
        let activator = self.inner.invoker.activator();
        let name = activator
            .function(function)
            .and_then(|f| f.revision().manifest.jobs.as_ref()?.callback_secret.clone())
            .ok_or_else(|| {
                Failure::Stop(format!(
                    "function `{function}` names no [jobs] callback_secret"
                ))
            })?;
        match activator.store().secret(&name) {
            Ok(Some(s)) => Ok(s.value),
            _ => Err(Failure::Retry(format!(
                "secret `{name}` is not set (`ember secret set {name}`)"
            ))),
        }
    }

    /// The callback's body: the record, and the result inline or as a link.
    fn payload(&self, id: u64, job: &JobRecord) -> Result<Vec<u8>, Failure> {
        let mut v = json!({
            "type": "job.completed",
            "timestamp": now_ms() / 1000,
            "data": job,
        });
        let link = json!(format!("/api/v1/jobs/{}/result", job.id));
        match job.result_bytes {
            None => {}
            // Too big to inline: not read to find that out.
            Some(n) if n > MAX_INLINE as u64 => v["result_url"] = link,
            Some(_) => {
                let store = self.inner.invoker.activator().store();
                match store.job_result(id).ok().flatten() {
                    Some(r) if r.len() <= MAX_INLINE => match String::from_utf8(r) {
                        Ok(text) => v["result"] = json!(text),
                        Err(e) => {
                            let b64 =
                                base64::engine::general_purpose::STANDARD.encode(e.into_bytes());
                            v["result_base64"] = json!(b64);
                        }
                    },
                    Some(_) => v["result_url"] = link,
                    None => {}
                }
            }
        }
        serde_json::to_vec(&v).map_err(|e| Failure::Stop(e.to_string()))
    }
}

/// Whether a callback to `host` may go to `ip`: a public address, or any address of a
/// host `serve --callback-allow` names.
fn may_reach(allow: &[String], host: &str, ip: std::net::IpAddr) -> bool {
    allow.iter().any(|a| a == host) || public(ip)
}

fn private(host: &str) -> String {
    format!("{host} is a private address; allow it with `serve --callback-allow {host}`")
}

/// Whether a send failed because the client's resolver refused every address of the host.
fn refused_address(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(e);
    while let Some(c) = cause {
        if c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::PermissionDenied)
        {
            return true;
        }
        cause = c.source();
    }
    false
}

/// Why a delivery did not go through.
enum Failure {
    /// Worth trying again later.
    Retry(String),
    /// Not worth trying again.
    Stop(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_follow_standard_webhooks() {
        // Standard Webhooks' own example (its spec's test vector).
        let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let body = br#"{"test": 2432232314}"#;
        let sig = sign(secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body);
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn callbacks_may_not_reach_the_gateways_own_network() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "192.168.0.1",
            "169.254.169.254",
            "100.64.0.1",
            "::1",
            "fd00::1",
            "0.0.0.0",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::a00:1",
            "2002:c0a8:1::1",
        ] {
            assert!(!public(ip.parse().unwrap()), "{ip}");
        }
        assert!(public("93.184.216.34".parse().unwrap()));
        assert!(public("::ffff:93.184.216.34".parse().unwrap()));
        assert!(public("2606:2800:220:1::1".parse().unwrap()));
        assert!(check_url("ftp://x").is_err());
        assert!(check_url("https://example.com/hook").is_ok());
    }
}
