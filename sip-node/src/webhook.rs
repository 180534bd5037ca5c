//! Status callbacks to the customer's webhook: signed, retried with backoff, and delivered in
//! order per call (a `completed` never overtakes its `ringing`).
//!
//! Signature: header `X-Switchboard-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256>` over
//! `"<t>.<body>"` with the shared secret, so that receivers can check origin and freshness the
//! way they do for Stripe- or Twilio-style webhooks.

use std::sync::Arc;
use std::time::Duration;

use hmac::{Hmac, Mac};
use serde::Serialize;
use sha2::Sha256;
use switchboard_model::egress::EgressPolicy;
use tokio::sync::mpsc;

/// Attempts per event before it is given up (logged).
const ATTEMPTS: u32 = 6;
/// Header carrying the signature.
pub const SIGNATURE_HEADER: &str = "X-Switchboard-Signature";

/// Signs webhook bodies.
#[derive(Clone)]
pub struct Signer {
    secret: Vec<u8>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Signer(..)")
    }
}

impl Signer {
    /// A signer with `secret` (never logged).
    pub fn new(secret: impl Into<Vec<u8>>) -> Signer {
        Signer { secret: secret.into() }
    }

    /// The header value for `body` sent at `unix_seconds`.
    pub fn sign(&self, unix_seconds: i64, body: &[u8]) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.secret).expect("HMAC takes any key length");
        mac.update(unix_seconds.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        format!("t={unix_seconds},v1={}", hex::encode(mac.finalize().into_bytes()))
    }
}

/// The HTTP client for webhooks an API client named: it resolves each host once through the
/// egress policy and connects only to the addresses that passed (a name that resolves to a
/// private or metadata address is refused at connect time, whatever it resolved to when the
/// API checked it), follows no redirect (a public URL that answers `307 Location:
/// http://169.254.169.254/` would otherwise lead the node there), and uses no proxy from the
/// environment (which would connect to the name itself).
/// An error here stops the node: falling back to a default client would follow redirects.
pub fn guarded_client(egress: Arc<EgressPolicy>) -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .dns_resolver(Arc::new(EgressResolver(egress)))
        .build()
}

/// DNS for [`guarded_client`]: the allowed addresses only. (IP literals never reach a
/// resolver; [`CallHooks::start_guarded`] checks those before the first request.)
struct EgressResolver(Arc<EgressPolicy>);

impl reqwest::dns::Resolve for EgressResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = Arc::clone(&self.0);
        let host = name.as_str().to_string();
        Box::pin(async move {
            let addrs =
                policy.resolve(&host, 0).await.map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)?;
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// One call's ordered stream of events to one URL. Dropping it lets the queue drain and stop.
pub struct CallHooks {
    queue: Option<mpsc::UnboundedSender<serde_json::Value>>,
}

impl CallHooks {
    /// Starts the delivery task for `url` (or nothing when the call has no webhook).
    pub fn start(client: reqwest::Client, signer: Signer, url: Option<String>) -> CallHooks {
        let Some(url) = url.filter(|u| !u.trim().is_empty()) else { return CallHooks { queue: None } };
        let (tx, mut rx) = mpsc::unbounded_channel::<serde_json::Value>();
        tokio::spawn(async move {
            while let Some(event) = rx.recv().await {
                deliver(&client, &signer, &url, &event).await;
            }
        });
        CallHooks { queue: Some(tx) }
    }

    /// [`CallHooks::start`] for a URL an API client chose: refused (logged, no event sent) when
    /// the egress policy does not allow its host. `client` must be a [`guarded_client`].
    pub fn start_guarded(
        client: reqwest::Client,
        signer: Signer,
        url: Option<String>,
        egress: &EgressPolicy,
    ) -> CallHooks {
        if let Some(url) = url.as_deref().filter(|u| !u.trim().is_empty())
            && let Err(error) = egress.check_url(url)
        {
            tracing::warn!(%error, "webhook refused; no status callbacks are sent for this call");
            return CallHooks { queue: None };
        }
        CallHooks::start(client, signer, url)
    }

    /// Queues an event; never blocks.
    pub fn send(&self, event: &impl Serialize) {
        if let (Some(queue), Ok(value)) = (&self.queue, serde_json::to_value(event)) {
            let _ = queue.send(value);
        }
    }
}

async fn deliver(client: &reqwest::Client, signer: &Signer, url: &str, event: &serde_json::Value) {
    let body = serde_json::to_vec(event).unwrap_or_default();
    let mut delay = Duration::from_millis(500);
    for attempt in 1..=ATTEMPTS {
        let signature = signer.sign(chrono::Utc::now().timestamp(), &body);
        let result = client
            .post(url)
            .header("content-type", "application/json")
            .header(SIGNATURE_HEADER, signature)
            .body(body.clone())
            .timeout(Duration::from_secs(10))
            .send()
            .await;
        match result {
            Ok(response) if response.status().is_success() => return,
            Ok(response) => tracing::warn!(status = %response.status(), attempt, "webhook refused the event"),
            Err(error) => tracing::warn!(%error, attempt, "webhook unreachable"),
        }
        if attempt < ATTEMPTS {
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(30));
        }
    }
    tracing::error!(event = %event.get("status").and_then(|s| s.as_str()).unwrap_or("?"), "webhook event given up");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_are_stable_and_keyed() {
        let a = Signer::new("secret").sign(1_700_000_000, b"{}");
        assert_eq!(a, Signer::new("secret").sign(1_700_000_000, b"{}"));
        assert_ne!(a, Signer::new("other").sign(1_700_000_000, b"{}"));
        assert!(a.starts_with("t=1700000000,v1="));
        assert_eq!(a.len(), "t=1700000000,v1=".len() + 64);
    }
}
