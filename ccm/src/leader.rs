//! Leader election on a coordination.k8s.io Lease, as client-go does it:
//! acquire when the lease is free or its holder stopped renewing, renew
//! every retry period, give up (and exit, so only one replica ever acts)
//! when renewal keeps failing, and hand the lease over on shutdown.
//!
//! Expiry is judged by when *this* process last saw the lease change, not by
//! the timestamps in it, so clock skew between replicas does not matter.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, PostParams};
use serde_json::json;
use tracing::{info, warn};

pub struct Config {
    pub namespace: String,
    pub name: String,
    pub identity: String,
    /// How long a lease stays valid without renewal (client-go: 15 s).
    pub lease_duration: Duration,
    /// Renewal must succeed within this, or leadership is lost (10 s).
    pub renew_deadline: Duration,
    /// Time between attempts (2 s).
    pub retry_period: Duration,
}

impl Config {
    pub fn new(namespace: &str, name: &str, identity: &str) -> Config {
        Config {
            namespace: namespace.to_string(),
            name: name.to_string(),
            identity: identity.to_string(),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

pub struct Elector {
    api: Api<Lease>,
    config: Config,
    /// The lease as last seen and when it was seen to change.
    observed: Option<(Lease, Instant)>,
}

impl Elector {
    pub fn new(client: Client, config: Config) -> Elector {
        Elector {
            api: Api::namespaced(client, &config.namespace),
            config,
            observed: None,
        }
    }

    /// Returns once this process holds the lease.
    pub async fn acquire(&mut self) {
        loop {
            // Bounded like a renewal: a request that never answers must not
            // keep a standby from taking over.
            let deadline = self.config.renew_deadline;
            match tokio::time::timeout(deadline, self.try_acquire_or_renew()).await {
                Ok(Ok(true)) => {
                    info!(lease = %self.config.name, identity = %self.config.identity, "became leader");
                    return;
                }
                Ok(Ok(false)) => {}
                Ok(Err(e)) => warn!("leader election: {e}"),
                Err(_) => warn!(
                    "leader election: no answer within {:?}",
                    self.config.renew_deadline
                ),
            }
            tokio::time::sleep(self.config.retry_period).await;
        }
    }

    /// Renews until renewal fails for longer than the renew deadline; then
    /// returns, and the caller must stop acting.
    pub async fn hold(&mut self) {
        let mut last_renewal = Instant::now();
        loop {
            tokio::time::sleep(self.config.retry_period).await;
            // A request that never answers (the API server cut off: the
            // client has no read timeout) counts against the deadline too,
            // as in client-go; otherwise this replica would act on long
            // after another one took the lease.
            let left = self
                .config
                .renew_deadline
                .saturating_sub(last_renewal.elapsed());
            match tokio::time::timeout(left, self.try_acquire_or_renew()).await {
                Ok(Ok(true)) => last_renewal = Instant::now(),
                Ok(Ok(false)) => {
                    warn!("leader election: the lease was taken over");
                    return;
                }
                Ok(Err(e)) => warn!("leader election: renewing: {e}"),
                Err(_) => warn!("leader election: renewing: no answer within the renew deadline"),
            }
            if last_renewal.elapsed() >= self.config.renew_deadline {
                warn!(
                    "leader election: could not renew within {:?}",
                    self.config.renew_deadline
                );
                return;
            }
        }
    }

    /// Hands the lease over at once (shutdown), so another replica need not
    /// wait for it to expire.
    pub async fn release(&mut self) {
        let Some((lease, _)) = &self.observed else {
            return;
        };
        if holder(lease) != Some(self.config.identity.as_str()) {
            return;
        }
        let mut released = lease.clone();
        if let Some(spec) = released.spec.as_mut() {
            spec.holder_identity = None;
            spec.lease_duration_seconds = Some(1);
        }
        // Bounded: a shutdown must not hang on an API server that does not
        // answer; the lease then simply expires.
        let params = PostParams::default();
        let replace = self.api.replace(&self.config.name, &params, &released);
        match tokio::time::timeout(self.config.retry_period, replace).await {
            Ok(Ok(_)) => info!("released the leader lease"),
            Ok(Err(e)) => warn!("releasing the leader lease: {e}"),
            Err(_) => warn!("releasing the leader lease: no answer; it will expire"),
        }
    }

    /// One round: Ok(true) if we hold the lease afterwards.
    async fn try_acquire_or_renew(&mut self) -> Result<bool, kube::Error> {
        let now = MicroTime(Timestamp::now());
        let duration = i32::try_from(self.config.lease_duration.as_secs()).unwrap_or(15);
        let Some(current) = self.api.get_opt(&self.config.name).await? else {
            let lease: Lease = serde_json::from_value(json!({
                "metadata": {"name": self.config.name, "namespace": self.config.namespace},
                "spec": {
                    "holderIdentity": self.config.identity,
                    "leaseDurationSeconds": duration,
                    "acquireTime": now,
                    "renewTime": now,
                    "leaseTransitions": 0,
                },
            }))
            .map_err(kube::Error::SerdeError)?;
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(created) => {
                    self.observed = Some((created, Instant::now()));
                    Ok(true)
                }
                Err(kube::Error::Api(s)) if s.is_already_exists() => Ok(false),
                Err(e) => Err(e),
            };
        };
        let changed = self
            .observed
            .as_ref()
            .is_none_or(|(seen, _)| seen.spec != current.spec);
        if changed {
            self.observed = Some((current.clone(), Instant::now()));
        }
        let ours = holder(&current) == Some(self.config.identity.as_str());
        let seen_at = self
            .observed
            .as_ref()
            .map(|(_, at)| *at)
            .unwrap_or_else(Instant::now);
        let held_for = current
            .spec
            .as_ref()
            .and_then(|s| s.lease_duration_seconds)
            .map(|s| Duration::from_secs(u64::try_from(s).unwrap_or(0)))
            .unwrap_or(self.config.lease_duration);
        let free = holder(&current).is_none() || seen_at.elapsed() > held_for;
        if !ours && !free {
            return Ok(false);
        }
        let mut next = current.clone();
        let spec = next.spec.get_or_insert_with(Default::default);
        if !ours {
            spec.acquire_time = Some(now.clone());
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        spec.holder_identity = Some(self.config.identity.clone());
        spec.lease_duration_seconds = Some(duration);
        spec.renew_time = Some(now);
        // replace carries the resourceVersion we read: a concurrent writer
        // makes this fail with 409 instead of two leaders.
        match self
            .api
            .replace(&self.config.name, &PostParams::default(), &next)
            .await
        {
            Ok(updated) => {
                self.observed = Some((updated, Instant::now()));
                Ok(true)
            }
            Err(kube::Error::Api(s)) if s.is_conflict() => Ok(false),
            Err(e) => Err(e),
        }
    }
}

fn holder(lease: &Lease) -> Option<&str> {
    lease
        .spec
        .as_ref()?
        .holder_identity
        .as_deref()
        .filter(|h| !h.is_empty())
}
