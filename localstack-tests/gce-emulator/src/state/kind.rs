//! The resource collections created through the API ([`Kind`]) and where
//! a resource lives ([`Scope`]).

use google_cloud_compute_v1::model as m;
use serde_json::Value;

use super::Result;
use crate::util::{from_value, to_value};

/// Where a resource lives.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    Global,
    Region(String),
    Zone(String),
}

impl Scope {
    pub fn path(&self) -> String {
        match self {
            Scope::Global => "global".into(),
            Scope::Region(r) => format!("regions/{r}"),
            Scope::Zone(z) => format!("zones/{z}"),
        }
    }

    /// The scope part of a method name (`zoneOperations`, ...).
    pub fn operations_prefix(&self) -> &'static str {
        match self {
            Scope::Global => "globalOperations",
            Scope::Region(_) => "regionOperations",
            Scope::Zone(_) => "zoneOperations",
        }
    }
}

/// The resource collections created through the API.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Neg,
    HealthCheck,
    BackendService,
    TargetTcpProxy,
    ForwardingRule,
    Address,
    Firewall,
}

impl Kind {
    pub fn collection(self) -> &'static str {
        match self {
            Kind::Neg => "networkEndpointGroups",
            Kind::HealthCheck => "healthChecks",
            Kind::BackendService => "backendServices",
            Kind::TargetTcpProxy => "targetTcpProxies",
            Kind::ForwardingRule => "forwardingRules",
            Kind::Address => "addresses",
            Kind::Firewall => "firewalls",
        }
    }

    pub fn from_collection(c: &str) -> Option<Kind> {
        [
            Kind::Neg,
            Kind::HealthCheck,
            Kind::BackendService,
            Kind::TargetTcpProxy,
            Kind::ForwardingRule,
            Kind::Address,
            Kind::Firewall,
        ]
        .into_iter()
        .find(|k| k.collection() == c)
    }

    /// `kind` of a resource (`compute#networkEndpointGroup`).
    pub fn resource_kind(self) -> &'static str {
        match self {
            Kind::Neg => "compute#networkEndpointGroup",
            Kind::HealthCheck => "compute#healthCheck",
            Kind::BackendService => "compute#backendService",
            Kind::TargetTcpProxy => "compute#targetTcpProxy",
            Kind::ForwardingRule => "compute#forwardingRule",
            Kind::Address => "compute#address",
            Kind::Firewall => "compute#firewall",
        }
    }

    /// The service part of a method name, as in GCE's discovery document.
    pub fn method_prefix(self) -> &'static str {
        match self {
            Kind::Neg => "networkEndpointGroups",
            Kind::HealthCheck => "regionHealthChecks",
            Kind::BackendService => "regionBackendServices",
            Kind::TargetTcpProxy => "regionTargetTcpProxies",
            Kind::ForwardingRule => "forwardingRules",
            Kind::Address => "addresses",
            Kind::Firewall => "firewalls",
        }
    }

    /// As GCE names it in "resource in use" messages.
    pub(super) fn label(self) -> &'static str {
        match self {
            Kind::Neg => "network_endpoint_group",
            Kind::HealthCheck => "health_check",
            Kind::BackendService => "backend_service",
            Kind::TargetTcpProxy => "target_tcp_proxy",
            Kind::ForwardingRule => "forwarding_rule",
            Kind::Address => "address",
            Kind::Firewall => "firewall",
        }
    }

    pub fn zonal(self) -> bool {
        self == Kind::Neg
    }

    pub fn global(self) -> bool {
        self == Kind::Firewall
    }

    pub fn supports_patch(self) -> bool {
        matches!(
            self,
            Kind::HealthCheck | Kind::BackendService | Kind::ForwardingRule | Kind::Firewall
        )
    }

    pub fn supports_update(self) -> bool {
        matches!(
            self,
            Kind::HealthCheck | Kind::BackendService | Kind::Firewall
        )
    }

    pub fn supports_set_labels(self) -> bool {
        matches!(self, Kind::ForwardingRule | Kind::Address)
    }

    /// Deserializes into the client library's model type and back: what is
    /// stored and served has exactly the library's wire format.
    pub(super) fn canonical(self, v: &Value) -> Result<Value> {
        match self {
            Kind::Neg => to_value(&from_value::<m::NetworkEndpointGroup>(v)?),
            Kind::HealthCheck => to_value(&from_value::<m::HealthCheck>(v)?),
            Kind::BackendService => to_value(&from_value::<m::BackendService>(v)?),
            Kind::TargetTcpProxy => to_value(&from_value::<m::TargetTcpProxy>(v)?),
            Kind::ForwardingRule => to_value(&from_value::<m::ForwardingRule>(v)?),
            Kind::Address => to_value(&from_value::<m::Address>(v)?),
            Kind::Firewall => to_value(&from_value::<m::Firewall>(v)?),
        }
    }
}
