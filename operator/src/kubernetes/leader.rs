//! Leader election with a `coordination.k8s.io/v1` Lease: one replica reconciles, the others
//! wait. The holder renews the lease every `retry_period`; a replica takes it over when it has not
//! seen the lease change for `lease_duration`. A holder that cannot renew within `renew_deadline`
//! (shorter than the lease duration) stops reconciling before anyone else may start.
//!
//! Expiry is judged as client-go judges it: from the local (monotonic) time at which this replica
//! observed the lease record change, never from the holder's `renewTime` against the local
//! clock. The replicas' clocks may disagree; a holder whose clock runs behind would otherwise look
//! expired while it renews, and two replicas would lead at once.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use tokio_util::sync::CancellationToken;

/// Timing of the election.
#[derive(Debug, Clone)]
pub struct LeaseTiming {
    pub lease_duration: Duration,
    pub renew_deadline: Duration,
    pub retry_period: Duration,
}

impl Default for LeaseTiming {
    fn default() -> Self {
        Self {
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// The lease record as this replica last saw it, and the local time it first saw that record.
#[derive(Debug, Default)]
struct Observed {
    record: Option<LeaseSpec>,
    at: Option<Instant>,
}

impl Observed {
    /// Notes the record read at `now`; returns when this record was first seen (`now` when it
    /// differs from the previous one: the holder renewed, or someone else took over).
    fn observe(&mut self, record: &LeaseSpec, now: Instant) -> Instant {
        match (&self.record, self.at) {
            (Some(previous), Some(at)) if previous == record => at,
            _ => {
                self.record = Some(record.clone());
                self.at = Some(now);
                now
            }
        }
    }

    /// Whether a lease held by someone else has expired at `now`: no holder, or no change seen
    /// for the lease's duration since it was observed.
    fn expired(&mut self, record: &LeaseSpec, default_duration: Duration, now: Instant) -> bool {
        let observed_at = self.observe(record, now);
        if record.holder_identity.as_deref().is_none_or(str::is_empty) {
            return true;
        }
        let duration = record
            .lease_duration_seconds
            .and_then(|s| u64::try_from(s).ok())
            .map_or(default_duration, Duration::from_secs);
        observed_at + duration <= now
    }
}

/// One replica's side of the election.
pub struct LeaderElection {
    api: Api<Lease>,
    name: String,
    identity: String,
    timing: LeaseTiming,
    observed: Mutex<Observed>,
    /// True while this replica holds the lease.
    pub is_leader: Arc<AtomicBool>,
}

/// Why holding the lease ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    Shutdown,
    Lost,
}

impl LeaderElection {
    pub fn new(api: Api<Lease>, name: impl Into<String>, identity: impl Into<String>, timing: LeaseTiming) -> Self {
        Self {
            api,
            name: name.into(),
            identity: identity.into(),
            timing,
            observed: Mutex::default(),
            is_leader: Arc::default(),
        }
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// One attempt to take or renew the lease. `Ok(true)`: we hold it now.
    pub async fn try_acquire_or_renew(&self) -> Result<bool, kube::Error> {
        let now = Timestamp::now();
        let duration_secs = self.timing.lease_duration.as_secs() as i32;
        let existing = self.api.get_opt(&self.name).await?;
        let Some(mut lease) = existing else {
            let lease = Lease {
                metadata: ObjectMeta { name: Some(self.name.clone()), ..ObjectMeta::default() },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(duration_secs),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
                Err(error) => Err(error),
            };
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        let ours = spec.holder_identity.as_deref() == Some(self.identity.as_str());
        if !ours {
            let expired = self.observed.lock().unwrap().expired(spec, self.timing.lease_duration, Instant::now());
            if !expired {
                return Ok(false);
            }
            spec.acquire_time = Some(MicroTime(now));
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        spec.holder_identity = Some(self.identity.clone());
        spec.lease_duration_seconds = Some(duration_secs);
        spec.renew_time = Some(MicroTime(now));
        // The resourceVersion in `lease` makes a concurrent takeover a 409 for one of us.
        match self.api.replace(&self.name, &PostParams::default(), &lease).await {
            Ok(written) => {
                if let Some(spec) = &written.spec {
                    self.observed.lock().unwrap().observe(spec, Instant::now());
                }
                Ok(true)
            }
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
            Err(error) => Err(error),
        }
    }

    /// Waits until this replica holds the lease. `false` when `shutdown` came first.
    pub async fn acquire(&self, shutdown: &CancellationToken) -> bool {
        let mut waiting_logged = false;
        loop {
            match self.try_acquire_or_renew().await {
                Ok(true) => {
                    self.is_leader.store(true, Ordering::SeqCst);
                    tracing::info!(lease = %self.name, identity = %self.identity, "became the leader");
                    return true;
                }
                Ok(false) if !waiting_logged => {
                    tracing::info!(lease = %self.name, "another replica holds the lease; standing by");
                    waiting_logged = true;
                }
                Ok(false) => {}
                Err(error) => tracing::warn!(%error, lease = %self.name, "cannot read or write the lease; retrying"),
            }
            tokio::select! {
                _ = tokio::time::sleep(self.timing.retry_period) => {}
                _ = shutdown.cancelled() => return false,
            }
        }
    }

    /// Renews the lease until `shutdown` (then releases it) or until it is lost. On loss,
    /// `is_leader` turns false before this returns, so reconciles stop at once.
    pub async fn hold(&self, shutdown: &CancellationToken) -> Ended {
        let mut last_renewed = Instant::now();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(self.timing.retry_period) => {}
                _ = shutdown.cancelled() => {
                    self.release().await;
                    return Ended::Shutdown;
                }
            }
            match self.try_acquire_or_renew().await {
                Ok(true) => last_renewed = Instant::now(),
                Ok(false) => {
                    self.is_leader.store(false, Ordering::SeqCst);
                    tracing::error!(lease = %self.name, "another replica took the lease; stopping");
                    return Ended::Lost;
                }
                Err(error) => tracing::warn!(%error, "cannot renew the lease"),
            }
            if last_renewed.elapsed() > self.timing.renew_deadline {
                self.is_leader.store(false, Ordering::SeqCst);
                tracing::error!(lease = %self.name, "could not renew the lease in time; stopping");
                return Ended::Lost;
            }
        }
    }

    /// Gives the lease up so that a standby takes over without waiting for it to expire. Bounded
    /// by the retry period: a slow or unreachable API server must not hold up the exit (the
    /// lease then expires by itself).
    pub async fn release(&self) {
        self.is_leader.store(false, Ordering::SeqCst);
        if tokio::time::timeout(self.timing.retry_period, self.give_up()).await.is_err() {
            tracing::warn!(lease = %self.name, "the API server did not answer the release in time; the lease expires by itself");
        }
    }

    async fn give_up(&self) {
        let Ok(Some(mut lease)) = self.api.get_opt(&self.name).await else { return };
        let Some(spec) = lease.spec.as_mut() else { return };
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        match self.api.replace(&self.name, &PostParams::default(), &lease).await {
            Ok(_) => tracing::info!(lease = %self.name, "released the lease"),
            Err(error) => tracing::warn!(%error, "cannot release the lease; it expires by itself"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::SignedDuration;

    fn record(holder: &str, renewed: Timestamp) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.into()),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(renewed)),
            ..LeaseSpec::default()
        }
    }

    /// The holder's clock runs an hour behind ours: its `renewTime` is always "an hour ago"
    /// here. It renews every 2 s, so the lease is not expired; comparing its `renewTime` with
    /// our clock (the old rule) would take it over at once and make two leaders.
    #[test]
    fn a_holder_with_a_clock_behind_ours_keeps_the_lease_while_it_renews() {
        let mut observed = Observed::default();
        let start = Instant::now();
        let skewed = Timestamp::now() - SignedDuration::from_hours(1);
        for renewal in 0..20u64 {
            let record = record("other", skewed + SignedDuration::from_secs(2 * renewal as i64));
            let now = start + Duration::from_secs(2 * renewal);
            assert!(!observed.expired(&record, Duration::from_secs(15), now), "renewal {renewal}");
        }
    }

    /// The holder's clock runs ahead: its `renewTime` is in our future. When it stops renewing,
    /// the lease expires one lease duration after we last saw it change, not never.
    #[test]
    fn a_holder_that_stops_renewing_expires_after_the_lease_duration_whatever_its_clock() {
        let mut observed = Observed::default();
        let start = Instant::now();
        let ahead = record("other", Timestamp::now() + SignedDuration::from_hours(1));
        assert!(!observed.expired(&ahead, Duration::from_secs(15), start));
        assert!(!observed.expired(&ahead, Duration::from_secs(15), start + Duration::from_secs(14)));
        assert!(observed.expired(&ahead, Duration::from_secs(15), start + Duration::from_secs(15)));
    }

    #[test]
    fn a_released_lease_is_free_at_once() {
        let mut observed = Observed::default();
        let released = LeaseSpec { holder_identity: None, lease_duration_seconds: Some(1), ..LeaseSpec::default() };
        assert!(observed.expired(&released, Duration::from_secs(15), Instant::now()));
    }
}
