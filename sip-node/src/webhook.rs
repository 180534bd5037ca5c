//! Status callbacks to the customer's webhook: signed, retried with backoff, and delivered in
//! order per call (a `completed` never overtakes its `ringing`).
//!
//! Signature: header `X-Switchboard-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256>` over
//! `"<t>.<body>"` with the shared secret, so that receivers can check origin and freshness the
//! way they do for Stripe- or Twilio-style webhooks.

use std::time::Duration;

use hmac::{Hmac, Mac};
use serde::Serialize;
use sha2::Sha256;
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
