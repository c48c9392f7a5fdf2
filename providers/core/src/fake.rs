//! In-memory providers for the controllers' tests: [`Fake`], a
//! [`LoadBalancerProvider`] that keeps load balancers and their targets per
//! listener, answers health from a state the test sets, can be made to fail
//! and counts its calls; [`FakeNodes`], a [`NodeProvider`] whose instances
//! the test sets. The controllers' logic is tested against them and a real
//! API server, without cloud emulators.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::error::{ProviderError, Result};
use crate::model::{Listener, LoadBalancerKey, LoadBalancerSpec, TargetDelta, TargetSet};
use crate::node::{Instance, NodeProvider, NodeRef};
use crate::provider::{
    LoadBalancerIngress, LoadBalancerProvider, LoadBalancerStatus, OwnedLoadBalancer, ResourceIds,
    TargetHealth, TargetHealthState,
};

/// One load balancer the fake holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FakeLoadBalancer {
    pub spec: LoadBalancerSpec,
    /// Registered targets per listener name.
    pub targets: BTreeMap<String, TargetSet>,
}

#[derive(Default)]
struct State {
    balancers: BTreeMap<String, FakeLoadBalancer>,
    health: Option<TargetHealthState>,
    failing: Option<ProviderError>,
    calls: BTreeMap<&'static str, usize>,
}

/// See the module documentation.
#[derive(Default)]
pub struct Fake {
    state: Mutex<State>,
}

impl Fake {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts the call and fails it while [`Fake::fail_with`] is set.
    fn call(&self, name: &'static str) -> Result<MutexGuard<'_, State>> {
        let mut state = self.state();
        *state.calls.entry(name).or_default() += 1;
        match &state.failing {
            Some(e) => Err(e.clone()),
            None => Ok(state),
        }
    }

    /// The load balancer of the Service with `uid`, if there is one.
    pub fn load_balancer(&self, uid: &str) -> Option<FakeLoadBalancer> {
        self.state().balancers.get(uid).cloned()
    }

    /// How many load balancers exist.
    pub fn count(&self) -> usize {
        self.state().balancers.len()
    }

    /// Every target is reported in `state` from now on (default: Healthy).
    pub fn set_health(&self, state: TargetHealthState) {
        self.state().health = Some(state);
    }

    /// Every call fails with `error` (until `None`).
    pub fn fail_with(&self, error: Option<ProviderError>) {
        self.state().failing = error;
    }

    /// Calls so far, by method name (`ensure_load_balancer`, ...).
    pub fn calls(&self) -> BTreeMap<&'static str, usize> {
        self.state().calls.clone()
    }
}

#[async_trait::async_trait]
impl LoadBalancerProvider for Fake {
    fn name(&self) -> &str {
        "fake"
    }

    async fn ensure_load_balancer(
        &self,
        spec: &LoadBalancerSpec,
        known: &ResourceIds,
    ) -> Result<LoadBalancerStatus> {
        spec.validate()?;
        let mut state = self.call("ensure_load_balancer")?;
        let lb = state.balancers.entry(spec.key.uid.clone()).or_default();
        lb.spec = spec.clone();
        // Listeners the spec no longer has lose their targets.
        lb.targets
            .retain(|name, _| spec.listeners.iter().any(|l| &l.name == name));
        let mut ids = known.clone();
        ids.insert("lb".into(), spec.key.short_name());
        Ok(LoadBalancerStatus {
            ingress: vec![LoadBalancerIngress {
                hostname: Some(format!("{}.fake.example", spec.key.short_name())),
                ip: None,
                ip_mode: None,
            }],
            ids,
            annotations: BTreeMap::new(),
        })
    }

    async fn sync_targets(
        &self,
        key: &LoadBalancerKey,
        listener: &Listener,
        delta: &TargetDelta,
        _known: &ResourceIds,
    ) -> Result<()> {
        let mut state = self.call("sync_targets")?;
        let lb = state
            .balancers
            .get_mut(&key.uid)
            .ok_or_else(|| ProviderError::NotFound {
                resource: format!("load balancer of {key}"),
            })?;
        delta.apply_to(lb.targets.entry(listener.name.clone()).or_default());
        Ok(())
    }

    async fn target_health(
        &self,
        key: &LoadBalancerKey,
        _known: &ResourceIds,
    ) -> Result<Vec<TargetHealth>> {
        let state = self.call("target_health")?;
        let health = state.health.unwrap_or(TargetHealthState::Healthy);
        let lb = state
            .balancers
            .get(&key.uid)
            .ok_or_else(|| ProviderError::NotFound {
                resource: format!("load balancer of {key}"),
            })?;
        Ok(lb
            .targets
            .iter()
            .flat_map(|(listener, set)| {
                set.iter().map(move |t| TargetHealth {
                    listener: listener.clone(),
                    ip: t.ip,
                    port: t.port,
                    state: health,
                    reason: None,
                })
            })
            .collect())
    }

    async fn delete_load_balancer(
        &self,
        key: &LoadBalancerKey,
        _known: &ResourceIds,
    ) -> Result<()> {
        self.call("delete_load_balancer")?
            .balancers
            .remove(&key.uid);
        Ok(())
    }

    async fn list_owned(&self, cluster: &str) -> Result<Vec<OwnedLoadBalancer>> {
        let state = self.call("list_owned")?;
        Ok(state
            .balancers
            .values()
            .filter(|lb| lb.spec.key.cluster == cluster)
            .map(|lb| OwnedLoadBalancer {
                key: lb.spec.key.clone(),
                ids: ResourceIds::new(),
            })
            .collect())
    }
}

/// An in-memory [`NodeProvider`]: instances by Node name, which a test adds,
/// stops and deletes; counts its lookups.
#[derive(Default)]
pub struct FakeNodes {
    state: Mutex<(BTreeMap<String, Instance>, usize)>,
}

impl FakeNodes {
    fn state(&self) -> MutexGuard<'_, (BTreeMap<String, Instance>, usize)> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The instance behind Node `name` (replacing any).
    pub fn set(&self, name: &str, instance: Instance) {
        self.state().0.insert(name.to_string(), instance);
    }

    /// Node `name`'s instance is gone.
    pub fn remove(&self, name: &str) {
        self.state().0.remove(name);
    }

    /// How many times [`NodeProvider::instances`] was called.
    pub fn lookups(&self) -> usize {
        self.state().1
    }
}

#[async_trait::async_trait]
impl NodeProvider for FakeNodes {
    fn name(&self) -> &str {
        "fake"
    }

    async fn instances(&self, nodes: &[NodeRef]) -> Result<Vec<Option<Instance>>> {
        let mut state = self.state();
        state.1 += 1;
        Ok(nodes
            .iter()
            .map(|n| state.0.get(&n.name).cloned())
            .collect())
    }
}
