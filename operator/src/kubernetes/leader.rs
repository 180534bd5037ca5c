//! Leader election with a `coordination.k8s.io/v1` Lease: one replica reconciles, the others
//! wait. The holder renews the lease every `renew_every`; a replica takes it over when it has not
//! been renewed for `lease_duration`. A holder that cannot renew within `renew_deadline` (shorter
//! than the lease duration) stops reconciling before anyone else may start.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
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

/// One replica's side of the election.
pub struct LeaderElection {
    api: Api<Lease>,
    name: String,
    identity: String,
    timing: LeaseTiming,
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
        Self { api, name: name.into(), identity: identity.into(), timing, is_leader: Arc::default() }
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
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let ours = holder.as_deref() == Some(self.identity.as_str());
        if !ours {
            let held_for = SignedDuration::from_secs(i64::from(spec.lease_duration_seconds.unwrap_or(duration_secs)));
            let expired = match &spec.renew_time {
                Some(renewed) => renewed.0 + held_for < now,
                None => true,
            };
            if holder.is_some() && !expired {
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
            Ok(_) => Ok(true),
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

    /// Gives the lease up so that a standby takes over without waiting for it to expire.
    pub async fn release(&self) {
        self.is_leader.store(false, Ordering::SeqCst);
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
