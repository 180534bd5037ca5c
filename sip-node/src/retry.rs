//! Retry pacing and outage reporting shared by every task that talks to Postgres.
//!
//! A node must survive a database outage without flooding its log: each task retries on its
//! own schedule, but an outage is reported once when it starts and once when it ends.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Exponential backoff: the delay doubles after each failure up to a cap, and returns to the
/// first step after a success. Deterministic (no jitter) so that it can be tested exactly; the
/// number of nodes per database is small enough that synchronised retries do not matter.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    initial: Duration,
    cap: Duration,
    next: Duration,
}

impl Backoff {
    /// 100 ms doubling to 10 s: reconnecting to Postgres.
    pub(crate) fn reconnect() -> Self {
        Self::new(Duration::from_millis(100), Duration::from_secs(10))
    }

    /// A backoff from `initial`, doubling up to `cap`.
    pub(crate) fn new(initial: Duration, cap: Duration) -> Self {
        let initial = initial.min(cap);
        Self { initial, cap, next: initial }
    }

    /// The delay to wait before the next attempt; each call doubles the following one.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = self.next.saturating_mul(2).min(self.cap);
        delay
    }

    /// Starts over from the initial delay (after a success).
    pub(crate) fn reset(&mut self) {
        self.next = self.initial;
    }
}

/// Whether Postgres is currently reachable, as seen by the node's tasks. Shared so that one
/// outage gives one warning and one recovery message, however many tasks notice it.
///
/// Every report says when its operation started: an operation that started before the last
/// change of state tells nothing new (a query that began during an outage and timed out after
/// the recovery, or a reply that was already in flight when the outage began), so it does not
/// flip the state back and forth.
#[derive(Debug, Clone, Default)]
pub(crate) struct DbHealth {
    state: Arc<Mutex<HealthState>>,
}

#[derive(Debug, Default)]
struct HealthState {
    /// `Some(start of the outage)` while the database is unreachable.
    down_since: Option<Instant>,
    /// When the last outage ended.
    up_since: Option<Instant>,
}

impl DbHealth {
    /// Records a failed database operation that started at `started`. Logs a warning only when
    /// this starts an outage; further failures during the same outage (and stale ones) are
    /// logged at debug level.
    pub(crate) fn failed(&self, what: &str, error: &dyn std::fmt::Display, started: Instant, applied_generation: i64) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let stale = state.up_since.is_some_and(|up| started < up);
        if state.down_since.is_none() && !stale {
            state.down_since = Some(Instant::now());
            tracing::warn!(
                error = %error,
                applied_generation,
                "lost connection to Postgres ({what} failed: {error}); keeping the current config snapshot \
                 (generation {applied_generation}) and retrying in the background"
            );
        } else {
            tracing::debug!(error = %error, "{what} failed: {error}");
        }
    }

    /// Records a successful database operation that started at `started`; logs the end of an
    /// outage if there was one.
    pub(crate) fn ok(&self, started: Instant) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(since) = state.down_since else {
            return;
        };
        if started < since {
            return;
        }
        state.down_since = None;
        state.up_since = Some(Instant::now());
        tracing::info!(
            outage_ms = u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX),
            "Postgres is reachable again after {:.1?}",
            since.elapsed()
        );
    }

    /// Whether an outage is in progress.
    #[cfg(test)]
    pub(crate) fn is_down(&self) -> bool {
        self.state.lock().unwrap_or_else(PoisonError::into_inner).down_since.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_cap_and_resets() {
        let mut backoff = Backoff::reconnect();
        let delays: Vec<u128> = (0..10).map(|_| backoff.next_delay().as_millis()).collect();
        assert_eq!(delays, [100, 200, 400, 800, 1600, 3200, 6400, 10_000, 10_000, 10_000]);
        backoff.reset();
        assert_eq!(backoff.next_delay(), Duration::from_millis(100));
    }

    #[test]
    fn backoff_initial_above_cap_is_capped() {
        let mut backoff = Backoff::new(Duration::from_secs(5), Duration::from_secs(1));
        assert_eq!(backoff.next_delay(), Duration::from_secs(1));
        assert_eq!(backoff.next_delay(), Duration::from_secs(1));
    }

    #[test]
    fn health_tracks_one_outage_at_a_time() {
        let health = DbHealth::default();
        let before_outage = Instant::now();
        assert!(!health.is_down());
        health.failed("poll", &"connection refused", Instant::now(), 3);
        health.failed("heartbeat", &"connection refused", Instant::now(), 3);
        assert!(health.is_down());
        // A reply that was in flight before the outage began does not end it.
        health.ok(before_outage);
        assert!(health.is_down());
        let during_outage = Instant::now();
        health.ok(Instant::now());
        assert!(!health.is_down());
        // A query that started during the outage and failed after it does not start another.
        health.failed("LISTEN", &"pool timed out", during_outage, 3);
        assert!(!health.is_down());
        health.ok(Instant::now());
        health.failed("poll", &"connection refused", Instant::now(), 3);
        assert!(health.is_down());
    }
}
