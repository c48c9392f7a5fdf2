//! [`GcpProvider`]: the regional proxy Network Load Balancer of a Service,
//! with zonal `GCE_VM_IP_PORT` NEGs of Pod IPs, on the Compute API.
//!
//! Every resource is found by name and then checked to be ours by its
//! `description` (see [`plan`]); one of another owner is a conflict, never
//! adopted. Creating is get-or-insert (insert first on a load balancer's
//! first ensure, when nothing is recorded), so a crash at any point leaves
//! resources the next call finds. Mutations wait for their operation;
//! inserts and endpoint changes carry a `requestId`, so a retried request is
//! not applied twice.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use cnlb_provider_core::{
    IpMode, Listener, LoadBalancerIngress, LoadBalancerKey, LoadBalancerProvider, LoadBalancerSpec,
    LoadBalancerStatus, OwnedLoadBalancer, ProviderError, ResourceIds, Result, Target, TargetDelta,
    TargetHealth, TargetHealthState, is_owned_by_cluster, owner_tags,
};
use futures::future::try_join_all;
use google_cloud_compute_v1::model::{
    Address, BackendService, Firewall, ForwardingRule, HealthCheck, NetworkEndpoint,
    NetworkEndpointGroup, NetworkEndpointGroupsAttachEndpointsRequest,
    NetworkEndpointGroupsDetachEndpointsRequest, NetworkEndpointGroupsListEndpointsRequest,
    TargetTcpProxy,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tracing::{info, warn};

use crate::MAX_ENDPOINTS_PER_CALL;
use crate::calls::{Calls, last_segment};
use crate::nodes::GcpNodes;
use crate::placements::Placements;
use crate::plan::{self, GcpConfig, Names, PortNames};

/// Service annotation GKE users read to find their NEGs.
pub const NEG_STATUS_ANNOTATION: &str = "cloud.google.com/neg-status";

/// The Compute resource collections a load balancer is made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind<'a> {
    Address,
    HealthCheck,
    Firewall,
    /// Zonal: the zone.
    Neg(&'a str),
    BackendService,
    Proxy,
    ForwardingRule,
}

/// What a deletion does with a resource of another owner where cnlb looks
/// for its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OnForeign {
    /// A conflict: the Service asks for something cnlb does not do.
    Refuse,
    /// The Service is going: only its own resources go with it.
    Leave,
}

impl Kind<'_> {
    /// Fields GCE cannot change in place (a difference means replacing
    /// the resource), and whether the others are updated in place.
    fn rules(self) -> (&'static [&'static str], bool) {
        match self {
            Kind::Address => (plan::ADDRESS_IMMUTABLE, false),
            Kind::HealthCheck => (&[], true),
            Kind::Firewall => (plan::FIREWALL_IMMUTABLE, true),
            Kind::Neg(_) => (&[], false),
            Kind::BackendService => (plan::BACKEND_SERVICE_IMMUTABLE, true),
            Kind::Proxy => (plan::PROXY_IMMUTABLE, false),
            Kind::ForwardingRule => (plan::FORWARDING_RULE_IMMUTABLE, false),
        }
    }
}

/// What [`GcpProvider::ensure`] found.
#[derive(Debug, PartialEq, Eq)]
enum Found {
    /// Created, unchanged or updated in place: it matches now.
    Ready(Value),
    /// It differs in a field GCE cannot change: replace it.
    MustReplace,
}

pub struct GcpProvider {
    /// Shared with [`GcpProvider::nodes`]: one set of buckets and metrics.
    calls: Arc<Calls>,
    cfg: GcpConfig,
    /// Every zone of the region: where garbage collection looks for NEGs.
    region_zones: Vec<String>,
    /// Zones outside `cfg.zones` that Pods turned up in since the start
    /// (their NEGs were created on demand).
    extra_zones: Mutex<BTreeSet<String>>,
    /// Where the NEGs' endpoints are, and which NEGs are known whole.
    placements: Mutex<Placements>,
    /// (Service UID, zone, NEG) found to be that Service's: endpoint
    /// changes and reads go only to those. NEG names come from the
    /// Service's annotations, which anyone who may edit it can write.
    owned_negs: Mutex<HashSet<(String, String, String)>>,
}

impl GcpProvider {
    /// A provider calling through `calls`. The region's zones are read
    /// once; they are the cluster's zones unless `cfg` names some.
    pub async fn new(calls: Calls, mut cfg: GcpConfig) -> Result<GcpProvider> {
        let c = calls.compute();
        let region = calls
            .run("regions.get", || {
                c.regions
                    .get()
                    .set_project(calls.project())
                    .set_region(&cfg.region)
                    .send()
            })
            .await?;
        let mut region_zones: Vec<String> = region
            .zones
            .iter()
            .map(|z| last_segment(z).to_string())
            .collect();
        region_zones.sort();
        if let Some(zone) = cfg.zones.iter().find(|z| !region_zones.contains(z)) {
            return Err(ProviderError::invalid(
                "--gcp-zones",
                format!("{zone} is not a zone of {} ({region_zones:?})", cfg.region),
            ));
        }
        if cfg.zones.is_empty() {
            cfg.zones = region_zones.clone();
        }
        info!(region = %cfg.region, zones = ?cfg.zones, "zones of the cluster");
        Ok(GcpProvider {
            calls: Arc::new(calls),
            cfg,
            region_zones,
            extra_zones: Mutex::default(),
            placements: Mutex::default(),
            owned_negs: Mutex::default(),
        })
    }

    pub fn config(&self) -> &GcpConfig {
        &self.cfg
    }

    /// The node provider of the same project and region, calling through
    /// this provider's wrapper (`instances.list` draws from the `read`
    /// bucket); Nodes without provider ID are looked for in every zone of
    /// the region, not only the cluster's zones.
    pub fn nodes(&self) -> GcpNodes {
        GcpNodes::new(Arc::clone(&self.calls), self.region_zones.clone())
    }

    fn project(&self) -> &str {
        self.calls.project()
    }

    fn region(&self) -> &str {
        &self.cfg.region
    }

    /// The resource, `None` if it does not exist.
    async fn get(&self, kind: Kind<'_>, name: &str) -> Result<Option<Value>> {
        let c = self.calls.compute();
        let (p, r) = (self.project(), self.region());
        let result = match kind {
            Kind::Address => self
                .calls
                .run("addresses.get", || {
                    c.addresses
                        .get()
                        .set_project(p)
                        .set_region(r)
                        .set_address(name)
                        .send()
                })
                .await
                .map(|v| value(&v)),
            Kind::HealthCheck => self
                .calls
                .run("regionHealthChecks.get", || {
                    c.health_checks
                        .get()
                        .set_project(p)
                        .set_region(r)
                        .set_health_check(name)
                        .send()
                })
                .await
                .map(|v| value(&v)),
            Kind::Firewall => self
                .calls
                .run("firewalls.get", || {
                    c.firewalls.get().set_project(p).set_firewall(name).send()
                })
                .await
                .map(|v| value(&v)),
            Kind::Neg(zone) => self
                .calls
                .run("networkEndpointGroups.get", || {
                    c.negs
                        .get()
                        .set_project(p)
                        .set_zone(zone)
                        .set_network_endpoint_group(name)
                        .send()
                })
                .await
                .map(|v| value(&v)),
            Kind::BackendService => self
                .calls
                .run("regionBackendServices.get", || {
                    c.backend_services
                        .get()
                        .set_project(p)
                        .set_region(r)
                        .set_backend_service(name)
                        .send()
                })
                .await
                .map(|v| value(&v)),
            Kind::Proxy => self
                .calls
                .run("regionTargetTcpProxies.get", || {
                    c.proxies
                        .get()
                        .set_project(p)
                        .set_region(r)
                        .set_target_tcp_proxy(name)
                        .send()
                })
                .await
                .map(|v| value(&v)),
            Kind::ForwardingRule => self
                .calls
                .run("forwardingRules.get", || {
                    c.forwarding_rules
                        .get()
                        .set_project(p)
                        .set_region(r)
                        .set_forwarding_rule(name)
                        .send()
                })
                .await
                .map(|v| value(&v)),
        };
        match result {
            Ok(v) => Ok(Some(v)),
            Err(ProviderError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Creates the resource and waits for it: `true` if this call created
    /// it. One that was there already (a concurrent or earlier, unrecorded
    /// insert) is not an error but `false`: the caller reads it and checks
    /// its owner.
    async fn insert(&self, kind: Kind<'_>, body: Value) -> Result<bool> {
        let name = body["name"].as_str().unwrap_or_default().to_string();
        let c = self.calls.compute();
        let (p, r) = (self.project(), self.region());
        let id = request_id();
        let result = match kind {
            Kind::Address => {
                let body: Address = model("addresses.insert", body)?;
                self.calls
                    .mutate("addresses.insert", || {
                        c.addresses
                            .insert()
                            .set_project(p)
                            .set_region(r)
                            .set_body(body.clone())
                            .set_request_id(&id)
                            .send()
                    })
                    .await
            }
            Kind::HealthCheck => {
                let body: HealthCheck = model("regionHealthChecks.insert", body)?;
                self.calls
                    .mutate("regionHealthChecks.insert", || {
                        c.health_checks
                            .insert()
                            .set_project(p)
                            .set_region(r)
                            .set_body(body.clone())
                            .set_request_id(&id)
                            .send()
                    })
                    .await
            }
            Kind::Firewall => {
                let body: Firewall = model("firewalls.insert", body)?;
                self.calls
                    .mutate("firewalls.insert", || {
                        c.firewalls
                            .insert()
                            .set_project(p)
                            .set_body(body.clone())
                            .set_request_id(&id)
                            .send()
                    })
                    .await
            }
            Kind::Neg(zone) => {
                let body: NetworkEndpointGroup = model("networkEndpointGroups.insert", body)?;
                self.calls
                    .mutate("networkEndpointGroups.insert", || {
                        c.negs
                            .insert()
                            .set_project(p)
                            .set_zone(zone)
                            .set_body(body.clone())
                            .set_request_id(&id)
                            .send()
                    })
                    .await
            }
            Kind::BackendService => {
                let body: BackendService = model("regionBackendServices.insert", body)?;
                self.calls
                    .mutate("regionBackendServices.insert", || {
                        c.backend_services
                            .insert()
                            .set_project(p)
                            .set_region(r)
                            .set_body(body.clone())
                            .set_request_id(&id)
                            .send()
                    })
                    .await
            }
            Kind::Proxy => {
                let body: TargetTcpProxy = model("regionTargetTcpProxies.insert", body)?;
                self.calls
                    .mutate("regionTargetTcpProxies.insert", || {
                        c.proxies
                            .insert()
                            .set_project(p)
                            .set_region(r)
                            .set_body(body.clone())
                            .set_request_id(&id)
                            .send()
                    })
                    .await
            }
            Kind::ForwardingRule => {
                let body: ForwardingRule = model("forwardingRules.insert", body)?;
                self.calls
                    .mutate("forwardingRules.insert", || {
                        c.forwarding_rules
                            .insert()
                            .set_project(p)
                            .set_region(r)
                            .set_body(body.clone())
                            .set_request_id(&id)
                            .send()
                    })
                    .await
            }
        };
        match result {
            Ok(_) => {
                if let Kind::Neg(zone) = kind {
                    self.placements().created(&name, zone);
                }
                Ok(true)
            }
            Err(ProviderError::Conflict { reason, .. }) if already_exists(&reason) => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn placements(&self) -> std::sync::MutexGuard<'_, Placements> {
        // Each change leaves the placements consistent whatever a
        // panicking holder did.
        self.placements
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Updates a resource in place (health checks, firewalls and backend
    /// services only; the others are replaced).
    async fn patch(&self, kind: Kind<'_>, name: &str, body: Value) -> Result<()> {
        let c = self.calls.compute();
        let (p, r) = (self.project(), self.region());
        let id = request_id();
        match kind {
            Kind::HealthCheck => {
                let body: HealthCheck = model("regionHealthChecks.patch", body)?;
                self.calls
                    .mutate("regionHealthChecks.patch", || {
                        c.health_checks
                            .patch()
                            .set_project(p)
                            .set_region(r)
                            .set_health_check(name)
                            .set_body(body.clone())
                            .set_request_id(&id)
                            .send()
                    })
                    .await?;
            }
            Kind::Firewall => {
                let body: Firewall = model("firewalls.patch", body)?;
                self.calls
                    .mutate("firewalls.patch", || {
                        c.firewalls
                            .patch()
                            .set_project(p)
                            .set_firewall(name)
                            .set_body(body.clone())
                            .set_request_id(&id)
                            .send()
                    })
                    .await?;
            }
            Kind::BackendService => {
                let body: BackendService = model("regionBackendServices.patch", body)?;
                self.calls
                    .mutate("regionBackendServices.patch", || {
                        c.backend_services
                            .patch()
                            .set_project(p)
                            .set_region(r)
                            .set_backend_service(name)
                            .set_body(body.clone())
                            .set_request_id(&id)
                            .send()
                    })
                    .await?;
            }
            other => {
                return Err(ProviderError::cloud(
                    "patch",
                    format!("{other:?} cannot be patched"),
                    false,
                ));
            }
        }
        Ok(())
    }

    /// Deletes the resource and waits; one already gone is done.
    async fn delete(&self, kind: Kind<'_>, name: &str) -> Result<()> {
        let c = self.calls.compute();
        let (p, r) = (self.project(), self.region());
        let id = request_id();
        let result = match kind {
            Kind::Address => {
                self.calls
                    .mutate("addresses.delete", || {
                        c.addresses
                            .delete()
                            .set_project(p)
                            .set_region(r)
                            .set_address(name)
                            .set_request_id(&id)
                            .send()
                    })
                    .await
            }
            Kind::HealthCheck => {
                self.calls
                    .mutate("regionHealthChecks.delete", || {
                        c.health_checks
                            .delete()
                            .set_project(p)
                            .set_region(r)
                            .set_health_check(name)
                            .set_request_id(&id)
                            .send()
                    })
                    .await
            }
            Kind::Firewall => {
                self.calls
                    .mutate("firewalls.delete", || {
                        c.firewalls
                            .delete()
                            .set_project(p)
                            .set_firewall(name)
                            .set_request_id(&id)
                            .send()
                    })
                    .await
            }
            Kind::Neg(zone) => {
                self.calls
                    .mutate("networkEndpointGroups.delete", || {
                        c.negs
                            .delete()
                            .set_project(p)
                            .set_zone(zone)
                            .set_network_endpoint_group(name)
                            .set_request_id(&id)
                            .send()
                    })
                    .await
            }
            Kind::BackendService => {
                self.calls
                    .mutate("regionBackendServices.delete", || {
                        c.backend_services
                            .delete()
                            .set_project(p)
                            .set_region(r)
                            .set_backend_service(name)
                            .set_request_id(&id)
                            .send()
                    })
                    .await
            }
            Kind::Proxy => {
                self.calls
                    .mutate("regionTargetTcpProxies.delete", || {
                        c.proxies
                            .delete()
                            .set_project(p)
                            .set_region(r)
                            .set_target_tcp_proxy(name)
                            .set_request_id(&id)
                            .send()
                    })
                    .await
            }
            Kind::ForwardingRule => {
                self.calls
                    .mutate("forwardingRules.delete", || {
                        c.forwarding_rules
                            .delete()
                            .set_project(p)
                            .set_region(r)
                            .set_forwarding_rule(name)
                            .set_request_id(&id)
                            .send()
                    })
                    .await
            }
        };
        match result {
            Ok(_) | Err(ProviderError::NotFound { .. }) => {
                if let Kind::Neg(zone) = kind {
                    self.placements().forget(name, zone);
                }
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Every resource of the collection, all pages.
    async fn list(&self, kind: Kind<'_>) -> Result<Vec<Value>> {
        let c = self.calls.compute();
        let (p, r) = (self.project(), self.region());
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let t = token.clone();
            let (items, next) = match kind {
                Kind::Address => {
                    let l = self
                        .calls
                        .run("addresses.list", || {
                            c.addresses
                                .list()
                                .set_project(p)
                                .set_region(r)
                                .set_or_clear_page_token(t.clone())
                                .send()
                        })
                        .await?;
                    (values(&l.items), l.next_page_token)
                }
                Kind::HealthCheck => {
                    let l = self
                        .calls
                        .run("regionHealthChecks.list", || {
                            c.health_checks
                                .list()
                                .set_project(p)
                                .set_region(r)
                                .set_or_clear_page_token(t.clone())
                                .send()
                        })
                        .await?;
                    (values(&l.items), l.next_page_token)
                }
                Kind::Firewall => {
                    let l = self
                        .calls
                        .run("firewalls.list", || {
                            c.firewalls
                                .list()
                                .set_project(p)
                                .set_or_clear_page_token(t.clone())
                                .send()
                        })
                        .await?;
                    (values(&l.items), l.next_page_token)
                }
                Kind::Neg(zone) => {
                    let l = self
                        .calls
                        .run("networkEndpointGroups.list", || {
                            c.negs
                                .list()
                                .set_project(p)
                                .set_zone(zone)
                                .set_or_clear_page_token(t.clone())
                                .send()
                        })
                        .await?;
                    (values(&l.items), l.next_page_token)
                }
                Kind::BackendService => {
                    let l = self
                        .calls
                        .run("regionBackendServices.list", || {
                            c.backend_services
                                .list()
                                .set_project(p)
                                .set_region(r)
                                .set_or_clear_page_token(t.clone())
                                .send()
                        })
                        .await?;
                    (values(&l.items), l.next_page_token)
                }
                Kind::Proxy => {
                    let l = self
                        .calls
                        .run("regionTargetTcpProxies.list", || {
                            c.proxies
                                .list()
                                .set_project(p)
                                .set_region(r)
                                .set_or_clear_page_token(t.clone())
                                .send()
                        })
                        .await?;
                    (values(&l.items), l.next_page_token)
                }
                Kind::ForwardingRule => {
                    let l = self
                        .calls
                        .run("forwardingRules.list", || {
                            c.forwarding_rules
                                .list()
                                .set_project(p)
                                .set_region(r)
                                .set_or_clear_page_token(t.clone())
                                .send()
                        })
                        .await?;
                    (values(&l.items), l.next_page_token)
                }
            };
            out.extend(items);
            match next.filter(|n| !n.is_empty()) {
                Some(n) => token = Some(n),
                None => return Ok(out),
            }
        }
    }

    /// Brings one resource to `desired`: inserts it if missing, checks it
    /// is `key`'s, updates drifted fields in place where the collection
    /// allows, and says [`Found::MustReplace`] when a field that cannot
    /// change differs ([`Kind::rules`]). When `fresh` (nothing of the load
    /// balancer is recorded yet) it is inserted without a look first. What
    /// this call inserted is `desired` and is not read back, but for an
    /// address, whose IP GCE picks.
    async fn ensure(
        &self,
        kind: Kind<'_>,
        key: &LoadBalancerKey,
        desired: Value,
        fresh: bool,
    ) -> Result<Found> {
        let (immutable, patchable) = kind.rules();
        let name = desired["name"].as_str().unwrap_or_default().to_string();
        let found = if fresh {
            None
        } else {
            self.get(kind, &name).await?
        };
        let existing = match found {
            Some(existing) => existing,
            None => {
                if self.insert(kind, desired.clone()).await? && kind != Kind::Address {
                    return Ok(Found::Ready(desired));
                }
                self.get(kind, &name).await?.ok_or_else(|| {
                    ProviderError::cloud(
                        "insert",
                        format!("{kind:?} {name} was created but cannot be read back"),
                        true,
                    )
                })?
            }
        };
        if plan::owner(existing["description"].as_str()).as_ref() != Some(key) {
            return Err(not_ours(kind, &name));
        }
        if plan::differs(&existing, &desired, immutable) {
            return Ok(Found::MustReplace);
        }
        let drifted = plan::drifted(&existing, &desired);
        if patchable && !drifted.is_empty() {
            info!(service = %key.service(), resource = %name, fields = ?drifted, "updating {kind:?}");
            self.patch(kind, &name, plan::merged(&existing, &desired))
                .await?;
            return Ok(Found::Ready(desired));
        }
        Ok(Found::Ready(existing))
    }

    /// [`ensure`](Self::ensure), replacing the resource (after deleting
    /// `dependents`, in order) when it must be.
    async fn ensure_replacing(
        &self,
        kind: Kind<'_>,
        key: &LoadBalancerKey,
        desired: Value,
        fresh: bool,
        dependents: &[(Kind<'_>, &str)],
    ) -> Result<Value> {
        if let Found::Ready(v) = self.ensure(kind, key, desired.clone(), fresh).await? {
            return Ok(v);
        }
        let name = desired["name"].as_str().unwrap_or_default().to_string();
        warn!(service = %key.service(), resource = %name, "replacing {kind:?}: a field that cannot change in place changed");
        for (dependent, dependent_name) in dependents {
            self.delete_owned(*dependent, key, dependent_name, OnForeign::Refuse)
                .await?;
        }
        self.delete(kind, &name).await?;
        match self.ensure(kind, key, desired, true).await? {
            Found::Ready(v) => Ok(v),
            Found::MustReplace => Err(ProviderError::cloud(
                "replace",
                format!("{kind:?} {name} still differs after being replaced"),
                true,
            )),
        }
    }

    /// The NEG of `port` in each of `zones`, created if missing.
    async fn ensure_negs(
        &self,
        spec: &LoadBalancerSpec,
        listener: &Listener,
        port: &PortNames,
        zones: &[String],
        fresh: bool,
    ) -> Result<()> {
        if port.neg != plan::default_neg_name(&spec.key, listener.port) {
            // A name from the Service's annotations: another owner's NEG
            // of that name in one zone must not get cnlb's in the others
            // (created at once, in parallel, before that one is seen).
            let negs: Vec<(&str, &str)> = zones
                .iter()
                .map(|z| (z.as_str(), port.neg.as_str()))
                .collect();
            self.check_negs(&spec.key, &negs).await?;
        }
        let body = plan::neg(spec, &self.cfg, listener, &port.neg);
        try_join_all(zones.iter().map(|zone| async {
            self.ensure(Kind::Neg(zone), &spec.key, body.clone(), fresh)
                .await?;
            self.remember_neg(&spec.key, zone, &port.neg);
            Ok::<_, ProviderError>(())
        }))
        .await?;
        Ok(())
    }

    fn remember_neg(&self, key: &LoadBalancerKey, zone: &str, neg: &str) {
        if let Ok(mut owned) = self.owned_negs.lock() {
            owned.insert((key.uid.clone(), zone.to_string(), neg.to_string()));
        }
    }

    /// Fails with a conflict unless each of `negs` (zone, name) is `key`'s
    /// or absent. One get per NEG not yet seen as `key`'s since the start.
    async fn check_negs(&self, key: &LoadBalancerKey, negs: &[(&str, &str)]) -> Result<()> {
        let unchecked: Vec<(&str, &str)> = match self.owned_negs.lock() {
            Ok(owned) => negs
                .iter()
                .filter(|(z, n)| !owned.contains(&(key.uid.clone(), z.to_string(), n.to_string())))
                .copied()
                .collect(),
            Err(_) => negs.to_vec(),
        };
        let found = try_join_all(unchecked.iter().map(|(z, n)| self.get(Kind::Neg(z), n))).await?;
        for ((zone, neg), found) in unchecked.iter().zip(found) {
            let Some(found) = found else { continue };
            if plan::owner(found["description"].as_str()).as_ref() != Some(key) {
                return Err(not_ours(Kind::Neg(zone), neg));
            }
            self.remember_neg(key, zone, neg);
        }
        Ok(())
    }

    /// Deletes the resource if it is `key`'s. One of another owner (its
    /// name from the Service's annotations, or taken before cnlb could) is
    /// never deleted: a conflict, or with [`OnForeign::Leave`] left alone.
    async fn delete_owned(
        &self,
        kind: Kind<'_>,
        key: &LoadBalancerKey,
        name: &str,
        on_foreign: OnForeign,
    ) -> Result<()> {
        let Some(found) = self.get(kind, name).await? else {
            return Ok(());
        };
        if plan::owner(found["description"].as_str()).as_ref() != Some(key) {
            if on_foreign == OnForeign::Leave {
                warn!(service = %key.service(), resource = %name, "not deleting {kind:?}: it is not this Service's");
                return Ok(());
            }
            return Err(not_ours(kind, name));
        }
        self.delete(kind, name).await
    }

    /// The front of one listener, once its NEGs, the health check and the
    /// address exist: backend service, proxy and forwarding rule.
    async fn ensure_front(
        &self,
        spec: &LoadBalancerSpec,
        names: &Names,
        port: &PortNames,
        zones: &[String],
        ip: &str,
        fresh: bool,
    ) -> Result<()> {
        let bs = plan::backend_service(spec, &self.cfg, names, port, zones)?;
        let chain = [
            (Kind::ForwardingRule, port.forwarding_rule.as_str()),
            (Kind::Proxy, port.proxy.as_str()),
        ];
        self.ensure_replacing(Kind::BackendService, &spec.key, bs, fresh, &chain)
            .await?;
        let proxy = plan::proxy(spec, &self.cfg, port);
        self.ensure_replacing(Kind::Proxy, &spec.key, proxy, fresh, &chain[..1])
            .await?;
        let fr = plan::forwarding_rule(spec, &self.cfg, port, ip);
        self.ensure_replacing(Kind::ForwardingRule, &spec.key, fr, fresh, &[])
            .await?;
        Ok(())
    }

    /// Deletes `key`'s parts of one port, front to back.
    async fn delete_port(
        &self,
        key: &LoadBalancerKey,
        port: &PortNames,
        zones: &[String],
        on_foreign: OnForeign,
    ) -> Result<()> {
        self.delete_owned(Kind::ForwardingRule, key, &port.forwarding_rule, on_foreign)
            .await?;
        self.delete_owned(Kind::Proxy, key, &port.proxy, on_foreign)
            .await?;
        self.delete_owned(Kind::BackendService, key, &port.backend_service, on_foreign)
            .await?;
        try_join_all(
            zones
                .iter()
                .map(|z| self.delete_owned(Kind::Neg(z), key, &port.neg, on_foreign)),
        )
        .await?;
        Ok(())
    }

    /// The cluster's zones plus any a NEG was created in on demand (known
    /// from the IDs, or since the start).
    fn zones(&self, known: &ResourceIds) -> Vec<String> {
        let mut zones: BTreeSet<String> = self.cfg.zones.iter().cloned().collect();
        zones.extend(plan::zones_of(known));
        if let Ok(extra) = self.extra_zones.lock() {
            zones.extend(extra.iter().cloned());
        }
        zones.into_iter().collect()
    }

    /// Attaches or detaches `endpoints` of NEG `neg` in `zone`, at most
    /// [`MAX_ENDPOINTS_PER_CALL`] per call, each call with its own
    /// requestId (kept across its retries).
    async fn change_endpoints(
        &self,
        zone: &str,
        neg: &str,
        endpoints: &[NetworkEndpoint],
        attach: bool,
    ) -> Result<()> {
        let c = self.calls.compute();
        let p = self.project();
        for chunk in endpoints.chunks(MAX_ENDPOINTS_PER_CALL) {
            let id = request_id();
            if attach {
                let body = NetworkEndpointGroupsAttachEndpointsRequest::new()
                    .set_network_endpoints(chunk.to_vec());
                self.calls
                    .mutate("networkEndpointGroups.attachNetworkEndpoints", || {
                        c.negs
                            .attach_network_endpoints()
                            .set_project(p)
                            .set_zone(zone)
                            .set_network_endpoint_group(neg)
                            .set_body(body.clone())
                            .set_request_id(&id)
                            .send()
                    })
                    .await?;
            } else {
                let body = NetworkEndpointGroupsDetachEndpointsRequest::new()
                    .set_network_endpoints(chunk.to_vec());
                self.calls
                    .mutate("networkEndpointGroups.detachNetworkEndpoints", || {
                        c.negs
                            .detach_network_endpoints()
                            .set_project(p)
                            .set_zone(zone)
                            .set_network_endpoint_group(neg)
                            .set_body(body.clone())
                            .set_request_id(&id)
                            .send()
                    })
                    .await?;
            }
        }
        Ok(())
    }

    /// Every endpoint of NEG `neg` in `zone` with its health; `None` if the
    /// NEG does not exist.
    async fn list_endpoints(&self, zone: &str, neg: &str) -> Result<Option<Vec<Value>>> {
        let c = self.calls.compute();
        let p = self.project();
        let body = NetworkEndpointGroupsListEndpointsRequest::new().set_health_status(
            google_cloud_compute_v1::model::network_endpoint_groups_list_endpoints_request::HealthStatus::Show,
        );
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let t = token.clone();
            let page = self
                .calls
                .run("networkEndpointGroups.listNetworkEndpoints", || {
                    c.negs
                        .list_network_endpoints()
                        .set_project(p)
                        .set_zone(zone)
                        .set_network_endpoint_group(neg)
                        .set_body(body.clone())
                        .set_or_clear_page_token(t.clone())
                        .send()
                })
                .await;
            let page = match page {
                Ok(page) => page,
                Err(ProviderError::NotFound { .. }) => return Ok(None),
                Err(e) => return Err(e),
            };
            out.extend(values(&page.items));
            match page.next_page_token.filter(|n| !n.is_empty()) {
                Some(n) => token = Some(n),
                None => return Ok(Some(out)),
            }
        }
    }

    /// Every resource of the cluster's Services, by owner: the collection
    /// and name of each.
    async fn owned(
        &self,
        cluster: &str,
    ) -> Result<BTreeMap<LoadBalancerKey, Vec<(String, String)>>> {
        let mut kinds = vec![
            ("forwardingRule", Kind::ForwardingRule),
            ("proxy", Kind::Proxy),
            ("backendService", Kind::BackendService),
            ("healthCheck", Kind::HealthCheck),
            ("firewall", Kind::Firewall),
            ("address", Kind::Address),
        ];
        let zones = self.region_zones.clone();
        kinds.extend(zones.iter().map(|z| ("neg", Kind::Neg(z))));
        let lists = try_join_all(kinds.iter().map(|(_, k)| self.list(*k))).await?;
        let mut out: BTreeMap<LoadBalancerKey, Vec<(String, String)>> = BTreeMap::new();
        for ((label, kind), items) in kinds.iter().zip(lists) {
            for item in items {
                let Some(key) = plan::owner(item["description"].as_str()) else {
                    continue;
                };
                if !is_owned_by_cluster(&owner_tags(&key), cluster) {
                    continue;
                }
                let name = item["name"].as_str().unwrap_or_default().to_string();
                let label = match kind {
                    Kind::Neg(zone) => format!("{label}/{zone}"),
                    _ => label.to_string(),
                };
                out.entry(key).or_default().push((label, name));
            }
        }
        Ok(out)
    }
}

#[async_trait]
impl LoadBalancerProvider for GcpProvider {
    fn name(&self) -> &str {
        "gcp"
    }

    async fn ensure_load_balancer(
        &self,
        spec: &LoadBalancerSpec,
        known: &ResourceIds,
    ) -> Result<LoadBalancerStatus> {
        plan::validate(spec)?;
        let key = &spec.key;
        let names = Names::of(key);
        let zones = self.zones(known);
        let known_ports = PortNames::from_ids(key, known);

        let ports: Vec<PortNames> = spec
            .listeners
            .iter()
            .map(|l| PortNames::of(spec, l))
            .collect();
        // Every forwarding rule uses the address. Changing the scheme
        // changes its type, which needs a new address, and the forwarding
        // rules on it go first.
        let dependents: Vec<(Kind<'_>, &str)> = ports
            .iter()
            .chain(&known_ports)
            .map(|p| (Kind::ForwardingRule, p.forwarding_rule.as_str()))
            .collect();
        // Nothing recorded: the first ensure, whose resources are inserted
        // without a look first.
        let fresh = known.is_empty();
        let address = plan::address(spec, &self.cfg, &names);
        let hc = plan::health_check(spec, &names);
        let fw = plan::firewall(spec, &self.cfg, &names);
        // The backends' parts do not depend on each other; each
        // listener's front needs them all.
        let (address, ..) = futures::try_join!(
            self.ensure_replacing(Kind::Address, key, address, fresh, &dependents),
            self.ensure(Kind::HealthCheck, key, hc, fresh),
            // Nothing refers to a firewall: replacing one is deleting it.
            self.ensure_replacing(Kind::Firewall, key, fw, fresh, &[]),
            try_join_all(
                spec.listeners
                    .iter()
                    .zip(&ports)
                    .map(|(l, p)| self.ensure_negs(spec, l, p, &zones, fresh))
            ),
        )?;
        let ip = match address["address"].as_str() {
            Some(ip) if !ip.is_empty() => ip.to_string(),
            _ => {
                return Err(ProviderError::cloud(
                    "addresses.get",
                    format!("address {} has no IP yet", names.address),
                    true,
                ));
            }
        };
        try_join_all(
            ports
                .iter()
                .map(|p| self.ensure_front(spec, &names, p, &zones, &ip, fresh)),
        )
        .await?;
        // Ports the Service no longer has, and NEGs renamed away from.
        for old in &known_ports {
            match ports.iter().find(|p| p.port == old.port) {
                None => {
                    self.delete_port(key, old, &zones, OnForeign::Refuse)
                        .await?;
                }
                Some(new) if new.neg != old.neg => {
                    try_join_all(zones.iter().map(|z| {
                        self.delete_owned(Kind::Neg(z), key, &old.neg, OnForeign::Refuse)
                    }))
                    .await?;
                }
                Some(_) => {}
            }
        }

        let neg_status = json!({
            "network_endpoint_groups": ports
                .iter()
                .map(|p| (p.port.to_string(), p.neg.clone()))
                .collect::<BTreeMap<_, _>>(),
            "zones": zones,
        });
        let parsed_ip: IpAddr = ip.parse().map_err(|_| {
            ProviderError::cloud("addresses.get", format!("{ip:?} is not an IP"), false)
        })?;
        Ok(LoadBalancerStatus {
            ingress: vec![LoadBalancerIngress {
                hostname: None,
                ip: Some(parsed_ip),
                // The proxy terminates connections: kube-proxy must not
                // short-cut in-cluster traffic to the IP.
                ip_mode: Some(IpMode::Proxy),
            }],
            ids: plan::ids(&names, &ports, &zones, &ip),
            annotations: BTreeMap::from([(
                NEG_STATUS_ANNOTATION.to_string(),
                neg_status.to_string(),
            )]),
        })
    }

    async fn sync_targets(
        &self,
        key: &LoadBalancerKey,
        listener: &Listener,
        delta: &TargetDelta,
        known: &ResourceIds,
    ) -> Result<()> {
        if delta.is_empty() {
            return Ok(());
        }
        let neg = known
            .get(&format!("{}{}", plan::ID_NEG, listener.port))
            .cloned()
            .unwrap_or_else(|| plan::default_neg_name(key, listener.port));
        let zones = self.zones(known);
        let mut detach: BTreeMap<String, Vec<NetworkEndpoint>> = BTreeMap::new();
        let mut attach: BTreeMap<String, Vec<NetworkEndpoint>> = BTreeMap::new();
        let mut unplaceable = Vec::new();
        {
            let placements = self.placements();
            for t in &delta.deregister {
                let cached = placements.get(&neg, t.addr());
                let zone = t.zone.clone().or_else(|| cached.map(|c| c.0.clone()));
                let instance = t.node.clone().or_else(|| cached.map(|c| c.1.clone()));
                match zone {
                    Some(zone) => detach
                        .entry(zone.to_string())
                        .or_default()
                        .push(self.endpoint(t, &zone, instance.as_deref())),
                    // Not seen since the start: it can only be in one of
                    // the NEGs, and detaching an absent endpoint is a no-op.
                    None => {
                        for zone in &zones {
                            detach
                                .entry(zone.clone())
                                .or_default()
                                .push(self.endpoint(t, zone, None));
                        }
                    }
                }
            }
            for t in &delta.register {
                match (&t.zone, &t.node) {
                    (Some(zone), Some(node)) => attach
                        .entry(zone.to_string())
                        .or_default()
                        .push(self.endpoint(t, zone, Some(node))),
                    _ => unplaceable.push(t.addr()),
                }
            }
        }
        // The first Pod in a zone the load balancer does not cover yet:
        // create that zone's NEG and add it to the backend service.
        let new_zones: Vec<String> = attach
            .keys()
            .filter(|z| !zones.contains(z))
            .cloned()
            .collect();
        let touched: Vec<(&str, &str)> = detach
            .keys()
            .chain(attach.keys())
            .filter(|z| !new_zones.contains(z))
            .map(|z| (z.as_str(), neg.as_str()))
            .collect();
        self.check_negs(key, &touched).await?;
        if !new_zones.is_empty() {
            self.extend_to_zones(key, listener, &neg, &new_zones)
                .await?;
        }
        try_join_all(
            detach
                .iter()
                .map(|(zone, eps)| self.change_endpoints(zone, &neg, eps, false)),
        )
        .await
        .map_err(|e| not_found_means_ensure_first(e, &neg))?;
        try_join_all(
            attach
                .iter()
                .map(|(zone, eps)| self.change_endpoints(zone, &neg, eps, true)),
        )
        .await
        .map_err(|e| not_found_means_ensure_first(e, &neg))?;
        {
            let mut placements = self.placements();
            for t in &delta.deregister {
                placements.detached(&neg, t.addr());
            }
            for t in &delta.register {
                if let (Some(zone), Some(node)) = (&t.zone, &t.node) {
                    placements.attached(&neg, t.addr(), (zone.clone(), node.clone()));
                }
            }
        }
        if !unplaceable.is_empty() {
            return Err(ProviderError::cloud(
                "networkEndpointGroups.attachNetworkEndpoints",
                format!(
                    "endpoints without a node or zone cannot join a zonal NEG (does the Node have topology.kubernetes.io/zone?): {unplaceable:?}"
                ),
                true,
            ));
        }
        Ok(())
    }

    async fn target_health(
        &self,
        key: &LoadBalancerKey,
        known: &ResourceIds,
    ) -> Result<Vec<TargetHealth>> {
        let ports = PortNames::from_ids(key, known);
        if ports.is_empty() {
            return Err(ProviderError::NotFound {
                resource: format!("load balancer of {}", key.service()),
            });
        }
        let zones = self.zones(known);
        // A NEG known to be empty (created or listed here, nothing attached
        // since) is not read: it can only say so.
        let lookups: Vec<(&PortNames, &String)> = {
            let placements = self.placements();
            ports
                .iter()
                .flat_map(|p| zones.iter().map(move |z| (p, z)))
                .filter(|(p, z)| !placements.known_empty(&p.neg, z))
                .collect()
        };
        let negs: Vec<(&str, &str)> = lookups
            .iter()
            .map(|(p, z)| (z.as_str(), p.neg.as_str()))
            .collect();
        self.check_negs(key, &negs).await?;
        let lists =
            try_join_all(lookups.iter().map(|(p, z)| self.list_endpoints(z, &p.neg))).await?;
        if !lists.is_empty() && lists.iter().all(Option::is_none) {
            return Err(ProviderError::NotFound {
                resource: format!("NEGs of {}", key.service()),
            });
        }
        let mut out = Vec::new();
        let mut placements = self.placements();
        for ((port, zone), items) in lookups.iter().zip(lists) {
            let Some(items) = items else {
                placements.forget(&port.neg, zone);
                continue;
            };
            let mut listed = Vec::with_capacity(items.len());
            for item in items {
                let ep = &item["networkEndpoint"];
                let Some(ip) = ep["ipAddress"]
                    .as_str()
                    .and_then(|i| i.parse::<IpAddr>().ok())
                else {
                    continue;
                };
                let Some(number) = ep["port"].as_u64().and_then(|p| u16::try_from(p).ok()) else {
                    continue;
                };
                let instance = ep["instance"].as_str().map(|i| Arc::from(last_segment(i)));
                listed.push((SocketAddr::new(ip, number), instance));
                let (state, reason) = health_state(&item["healths"]);
                out.push(TargetHealth {
                    listener: port.listener.clone(),
                    ip,
                    port: number,
                    state,
                    reason,
                });
            }
            placements.listed(&port.neg, zone, listed);
        }
        Ok(out)
    }

    async fn delete_load_balancer(&self, key: &LoadBalancerKey, known: &ResourceIds) -> Result<()> {
        // By name from the IDs, then anything else the cluster's listing
        // attributes to this key (ports whose IDs were never recorded).
        let zones = self.zones(known);
        for port in PortNames::from_ids(key, known) {
            self.delete_port(key, &port, &zones, OnForeign::Leave)
                .await?;
        }
        let found = self.owned(&key.cluster).await?;
        let mut rest = found.get(key).cloned().unwrap_or_default();
        // Dependency order: rules, proxies, backend services, then the rest.
        let rank = |label: &str| match label {
            "forwardingRule" => 0,
            "proxy" => 1,
            "backendService" => 2,
            _ => 3,
        };
        rest.sort_by_key(|(label, _)| rank(label));
        for (label, name) in &rest {
            let kind = match label.as_str() {
                "forwardingRule" => Kind::ForwardingRule,
                "proxy" => Kind::Proxy,
                "backendService" => Kind::BackendService,
                "healthCheck" => Kind::HealthCheck,
                "firewall" => Kind::Firewall,
                "address" => Kind::Address,
                other => match other.strip_prefix("neg/") {
                    Some(zone) => Kind::Neg(zone),
                    None => continue,
                },
            };
            self.delete(kind, name).await?;
        }
        let names = Names::of(key);
        for (kind, name) in [
            (Kind::HealthCheck, &names.health_check),
            (Kind::Firewall, &names.firewall),
            (Kind::Address, &names.address),
        ] {
            self.delete_owned(kind, key, name, OnForeign::Leave).await?;
        }
        {
            let mut placements = self.placements();
            for port in PortNames::from_ids(key, known) {
                placements.forget_all(&port.neg);
            }
        }
        if let Ok(mut owned) = self.owned_negs.lock() {
            owned.retain(|(uid, _, _)| *uid != key.uid);
        }
        Ok(())
    }

    async fn list_owned(&self, cluster: &str) -> Result<Vec<OwnedLoadBalancer>> {
        let found = self.owned(cluster).await?;
        Ok(found
            .into_iter()
            .map(|(key, resources)| {
                let mut ids = ResourceIds::new();
                for (label, name) in resources {
                    ids.insert(label, name);
                }
                OwnedLoadBalancer { key, ids }
            })
            .collect())
    }
}

impl GcpProvider {
    fn endpoint(&self, t: &Target, zone: &str, instance: Option<&str>) -> NetworkEndpoint {
        let ep = NetworkEndpoint::new()
            .set_ip_address(t.ip.to_string())
            .set_port(i32::from(t.port));
        match instance {
            Some(i) => ep.set_instance(self.cfg.instance_url(zone, i)),
            None => ep,
        }
    }

    /// Creates `listener`'s NEG in `new_zones` and adds them to its backend
    /// service.
    async fn extend_to_zones(
        &self,
        key: &LoadBalancerKey,
        listener: &Listener,
        neg: &str,
        new_zones: &[String],
    ) -> Result<()> {
        info!(service = %key.service(), zones = ?new_zones, "first Pods in new zones: adding NEGs");
        let mut spec = LoadBalancerSpec::new(key.clone());
        spec.listeners.push(listener.clone());
        spec.target_group_names
            .insert(listener.name.clone(), neg.to_string());
        let port = PortNames::of(&spec, listener);
        self.ensure_negs(&spec, listener, &port, new_zones, true)
            .await?;
        let Some(existing) = self
            .get(Kind::BackendService, &port.backend_service)
            .await?
        else {
            return Err(ProviderError::NotFound {
                resource: format!("backend service {}", port.backend_service),
            });
        };
        if plan::owner(existing["description"].as_str()).as_ref() != Some(key) {
            return Err(not_ours(Kind::BackendService, &port.backend_service));
        }
        let mut backends = existing["backends"].as_array().cloned().unwrap_or_default();
        let before = backends.len();
        for zone in new_zones {
            let group = self.cfg.neg_url(zone, neg);
            // After a restart the backend may be there already.
            let present = backends
                .iter()
                .any(|b| b["group"].as_str().is_some_and(|g| g.ends_with(&group)));
            if !present {
                backends.push(plan::neg_backend(&self.cfg, zone, neg));
            }
        }
        if backends.len() > before {
            let body = plan::merged(&existing, &json!({ "backends": backends }));
            self.patch(Kind::BackendService, &port.backend_service, body)
                .await?;
        }
        if let Ok(mut extra) = self.extra_zones.lock() {
            extra.extend(new_zones.iter().cloned());
        }
        Ok(())
    }
}

/// `name` exists but is not the Service's: cnlb neither adopts, changes
/// nor deletes it.
fn not_ours(kind: Kind<'_>, name: &str) -> ProviderError {
    ProviderError::Conflict {
        resource: format!("{kind:?} {name}"),
        reason: "it exists and is not this Service's (its description names another owner)".into(),
    }
}

/// A NEG missing during an endpoint change means the load balancer is not
/// (or no longer) built: the controller ensures it first.
fn not_found_means_ensure_first(err: ProviderError, neg: &str) -> ProviderError {
    match err {
        ProviderError::NotFound { .. } => ProviderError::NotFound {
            resource: format!("network endpoint group {neg}"),
        },
        other => other,
    }
}

/// The health of one endpoint from its `healths`. No entry means no health
/// check covers it: never healthy (a Pod behind an unchecked NEG must not
/// be marked ready, unlike ingress-gce#1718).
fn health_state(healths: &Value) -> (TargetHealthState, Option<String>) {
    let states: Vec<&str> = healths
        .as_array()
        .map(|h| h.iter().filter_map(|h| h["healthState"].as_str()).collect())
        .unwrap_or_default();
    if states.is_empty() {
        return (
            TargetHealthState::Unavailable,
            Some("no health check covers this endpoint".into()),
        );
    }
    // Every check must pass.
    let state = if states.iter().all(|s| *s == "HEALTHY") {
        TargetHealthState::Healthy
    } else if states.contains(&"DRAINING") {
        TargetHealthState::Draining
    } else if states.contains(&"UNHEALTHY") {
        TargetHealthState::Unhealthy
    } else {
        TargetHealthState::Initial
    };
    (state, Some(states.join(",")))
}

/// True for the conflict GCE reports on inserting a name that exists
/// (`alreadyExists`, or `RESOURCE_ALREADY_EXISTS` from an operation).
fn already_exists(reason: &str) -> bool {
    reason.starts_with("alreadyExists") || reason.contains("ALREADY_EXISTS")
}

/// A fresh requestId (a UUID, as GCE wants).
fn request_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

fn value<T: Serialize>(t: &T) -> Value {
    serde_json::to_value(t).unwrap_or(Value::Null)
}

fn values<T: Serialize>(items: &[T]) -> Vec<Value> {
    items.iter().map(value).collect()
}

fn model<T: DeserializeOwned>(operation: &str, body: Value) -> Result<T> {
    serde_json::from_value(body).map_err(|e| {
        ProviderError::cloud(operation, format!("building the request body: {e}"), false)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_needs_a_check_and_every_check_passing() {
        let (s, _) = health_state(&json!([]));
        assert_eq!(s, TargetHealthState::Unavailable);
        let (s, _) = health_state(&Value::Null);
        assert_eq!(s, TargetHealthState::Unavailable);
        let (s, _) = health_state(&json!([{"healthState": "HEALTHY"}]));
        assert_eq!(s, TargetHealthState::Healthy);
        let (s, _) =
            health_state(&json!([{"healthState": "HEALTHY"}, {"healthState": "UNHEALTHY"}]));
        assert_eq!(s, TargetHealthState::Unhealthy);
        let (s, _) = health_state(&json!([{"healthState": "UNKNOWN"}]));
        assert_eq!(s, TargetHealthState::Initial);
        let (s, _) = health_state(&json!([{"healthState": "DRAINING"}]));
        assert_eq!(s, TargetHealthState::Draining);
    }

    #[test]
    fn request_ids_are_uuids() {
        let a = request_id();
        assert_eq!(a.len(), 36);
        assert_ne!(a, request_id());
    }
}
