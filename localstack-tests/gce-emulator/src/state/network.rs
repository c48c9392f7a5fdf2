//! The static world: the region, its zones, the network and the
//! subnetwork (with its secondary ranges), as GET and list serve them.

use google_cloud_compute_v1::model as m;
use serde_json::{Value, json};

use super::list::{ListQuery, list_page};
use super::{API, Result, Scope, World};
use crate::error::ApiError;
use crate::util::{b64_decode, to_value};

impl World {
    fn static_id(&self, key: &str) -> String {
        self.static_ids.get(key).copied().unwrap_or(0).to_string()
    }

    pub fn region(&self, r: &str) -> Result<Value> {
        self.check_scope(&Scope::Region(r.to_string()))?;
        let mut region = m::Region::default();
        region.kind = Some("compute#region".into());
        region.id = self.static_id(&format!("regions/{r}")).parse().ok();
        region.name = Some(r.to_string());
        region.description = Some(r.to_string());
        region.self_link = Some(self.region_link());
        region.status = Some(m::region::Status::Up);
        region.zones = self.cfg.zones.iter().map(|z| self.zone_link(z)).collect();
        region.creation_timestamp = Some("1969-12-31T16:00:00.000-08:00".into());
        to_value(&region)
    }

    pub fn regions(&self) -> Result<Value> {
        let items = vec![self.region(&self.cfg.region)?];
        let link = format!("{API}{}/regions", self.project_path());
        list_page(items, &ListQuery::default(), "compute#regionList", &link)
    }

    /// Zones are served as plain JSON (the library's `Zone` type is behind
    /// a feature cnlb does not build).
    pub fn zone(&self, z: &str) -> Result<Value> {
        self.check_scope(&Scope::Zone(z.to_string()))?;
        Ok(json!({
            "kind": "compute#zone",
            "id": self.static_id(&format!("zones/{z}")),
            "creationTimestamp": "1969-12-31T16:00:00.000-08:00",
            "name": z,
            "description": z,
            "status": "UP",
            "region": self.region_link(),
            "selfLink": self.zone_link(z),
            "supportsPzs": false,
        }))
    }

    pub fn zones(&self) -> Result<Value> {
        let items = self
            .cfg
            .zones
            .iter()
            .map(|z| self.zone(z))
            .collect::<Result<Vec<_>>>()?;
        let link = format!("{API}{}/zones", self.project_path());
        list_page(items, &ListQuery::default(), "compute#zoneList", &link)
    }

    /// Plain JSON too (`Network` is behind a feature cnlb does not build).
    pub fn network(&self, n: &str) -> Result<Value> {
        if n != self.cfg.network {
            return Err(ApiError::not_found(&format!(
                "{}/global/networks/{n}",
                self.project_path()
            )));
        }
        Ok(json!({
            "kind": "compute#network",
            "id": self.static_id(&format!("networks/{n}")),
            "creationTimestamp": "1969-12-31T16:00:00.000-08:00",
            "name": n,
            "selfLink": self.network_link(),
            "autoCreateSubnetworks": false,
            "subnetworks": [self.subnetwork_link()],
            "routingConfig": {"routingMode": "REGIONAL"},
            "mtu": 1460,
            "networkFirewallPolicyEnforcementOrder": "AFTER_CLASSIC_FIREWALL",
        }))
    }

    pub fn subnetwork(&self, r: &str, s: &str) -> Result<Value> {
        self.check_scope(&Scope::Region(r.to_string()))?;
        if s != self.cfg.subnetwork.name {
            return Err(ApiError::not_found(&format!(
                "{}/regions/{r}/subnetworks/{s}",
                self.project_path()
            )));
        }
        let primary = self.cfg.subnetwork.cidr;
        let mut sn = m::Subnetwork::default();
        sn.kind = Some("compute#subnetwork".into());
        sn.id = self.static_id(&format!("subnetworks/{s}")).parse().ok();
        sn.creation_timestamp = Some("1969-12-31T16:00:00.000-08:00".into());
        sn.name = Some(s.to_string());
        sn.network = Some(self.network_link());
        sn.region = Some(self.region_link());
        sn.self_link = Some(self.subnetwork_link());
        sn.ip_cidr_range = Some(primary.to_string());
        sn.gateway_address = primary.gce_reserved().get(1).map(ToString::to_string);
        sn.private_ip_google_access = Some(false);
        sn.purpose = Some(m::subnetwork::Purpose::from("PRIVATE"));
        sn.stack_type = Some(m::subnetwork::StackType::from("IPV4_ONLY"));
        sn.fingerprint = Some(b64_decode("c3VibmV0d29yaw==").into());
        sn.secondary_ip_ranges = self
            .cfg
            .secondary_ranges
            .iter()
            .map(|r| {
                let mut s = m::SubnetworkSecondaryRange::default();
                s.range_name = Some(r.name.clone());
                s.ip_cidr_range = Some(r.cidr.to_string());
                s
            })
            .collect();
        to_value(&sn)
    }

    pub fn subnetworks(&self, r: &str, q: &ListQuery) -> Result<Value> {
        let items = vec![self.subnetwork(r, &self.cfg.subnetwork.name)?];
        let link = format!("{API}{}/regions/{r}/subnetworks", self.project_path());
        list_page(items, q, "compute#subnetworkList", &link)
    }
}
