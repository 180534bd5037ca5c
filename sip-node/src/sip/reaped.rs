//! The final webhook of call requests the reaper failed (`operator/src/reaper.rs`): the node
//! that placed the call died, or no node took the request before it expired. The operator does
//! not hold the webhook signing secret, so it marks such requests `final_webhook_pending` and
//! notifies; a live node claims each (one at a time, `FOR UPDATE SKIP LOCKED`) and sends the
//! `failed` event with the request's error (`node lost`, `expired: ...`) as the reason.
//!
//! At most once: the mark is cleared when the event is claimed, so a node that dies while it
//! delivers leaves the event unsent (the request's state still says why it failed).

use sqlx::PgPool;
use uuid::Uuid;

use crate::drain::Drain;
use crate::webhook::{CallHooks, Signer};

/// The channel the reaper notifies on (`switchboard_operator::reaper::REAPED_CHANNEL`).
pub const CHANNEL: &str = "switchboard_call_requests_reaped";

/// A failed request whose webhook is owed.
#[derive(Debug, sqlx::FromRow)]
struct Reaped {
    id: Uuid,
    call_id: Option<String>,
    from_number: String,
    to_number: String,
    webhook_url: Option<String>,
    error: Option<String>,
}

impl Reaped {
    /// The `failed` status event, shaped as the events of placed calls.
    fn event(&self) -> serde_json::Value {
        serde_json::json!({
            "call_id": self.call_id.clone().unwrap_or_else(|| self.id.to_string()),
            "request_id": self.id.to_string(),
            "status": "failed",
            "from_number": self.from_number,
            "to_number": self.to_number,
            "timestamp": chrono::Utc::now().to_rfc3339(),
            "reason": self.error.clone().unwrap_or_else(|| "failed".into()),
        })
    }
}

/// Sends owed final webhooks until the node stops; a draining node leaves them to others.
pub async fn run(pool: PgPool, wakeup: std::sync::Arc<tokio::sync::Notify>, signer: Signer, drain: Drain) {
    let client = reqwest::Client::builder().build().unwrap_or_default();
    let queue = &pool;
    let drain = &drain;
    let claim = move || async move {
        if drain.is_draining() {
            return Ok(None);
        }
        sqlx::query_as::<_, Reaped>(
            "UPDATE call_requests SET final_webhook_pending = FALSE, updated_at = now()
             WHERE id = (SELECT id FROM call_requests WHERE final_webhook_pending ORDER BY updated_at
                         FOR UPDATE SKIP LOCKED LIMIT 1)
             RETURNING id, call_id, from_number, to_number, webhook_url, error",
        )
        .fetch_optional(queue)
        .await
    };
    let start = |reaped: Reaped| {
        tracing::info!(request = %reaped.id, reason = ?reaped.error, "sending the final webhook of a reaped call request");
        // Dropping the hooks lets the queued event be delivered (with retries) and the task end.
        CallHooks::start(client.clone(), signer.clone(), reaped.webhook_url.clone()).send(&reaped.event());
    };
    super::queue::serve(wakeup, "final webhooks of reaped call requests", claim, start).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_event_names_the_request_and_the_reason() {
        let reaped = Reaped {
            id: Uuid::nil(),
            call_id: None,
            from_number: "+1".into(),
            to_number: "+2".into(),
            webhook_url: Some("http://example.invalid/hook".into()),
            error: Some("node lost".into()),
        };
        let event = reaped.event();
        assert_eq!(event["status"], "failed");
        assert_eq!(event["reason"], "node lost");
        assert_eq!(event["call_id"], Uuid::nil().to_string());
        assert_eq!(event["request_id"], Uuid::nil().to_string());
    }
}
