//! Instances: seeded through the admin API, served by GET and list,
//! stopped, started and deleted through operations (STOPPING or STAGING
//! meanwhile), and `nic0`'s alias IP ranges updated under its fingerprint.

use std::net::Ipv4Addr;

use google_cloud_compute_v1::model as m;
use serde_json::{Value, json};

use super::list::{ListQuery, list_page};
use super::{API, Mutating, Mutation, Result, Scope, World};
use crate::admin::SeedInstance;
use crate::config::valid_name;
use crate::error::ApiError;
use crate::util::{b64_decode, now_rfc3339, parse_body, to_value};

impl World {
    /// `POST /emulator/v1/instances`.
    pub fn seed_instance(&mut self, s: &SeedInstance) -> Result<Value> {
        self.check_scope(&Scope::Zone(s.zone.clone()))?;
        if !valid_name(&s.name) {
            return Err(ApiError::invalid_field(
                "name",
                &s.name,
                "Not a valid GCE name.",
            ));
        }
        let key = (s.zone.clone(), s.name.clone());
        if self.instances.contains_key(&key) {
            return Err(ApiError::already_exists(
                &self.instance_rel(&s.zone, &s.name),
            ));
        }
        let ip: Ipv4Addr = s.network_ip.parse().map_err(|_| {
            ApiError::invalid_field("networkIP", &s.network_ip, "Not an IPv4 address.")
        })?;
        let primary = self.cfg.subnetwork.cidr;
        if !primary.contains_ip(ip) || primary.gce_reserved().contains(&ip) {
            return Err(ApiError::invalid_field(
                "networkIP",
                &s.network_ip,
                &format!("Must be a usable address of the subnetwork's primary range {primary}."),
            ));
        }
        if self.used_ips(true, None).contains(&ip)
            || self
                .used_ranges(primary, ("", ""))
                .iter()
                .any(|(c, _)| c.contains_ip(ip))
        {
            return Err(ApiError::invalid_field(
                "networkIP",
                &s.network_ip,
                "IP address is already being used by another resource.",
            ));
        }
        let id = self.id();
        let mut nic = m::NetworkInterface::default();
        nic.kind = Some("compute#networkInterface".into());
        nic.name = Some("nic0".into());
        nic.network = Some(self.network_link());
        nic.subnetwork = Some(self.subnetwork_link());
        nic.network_ip = Some(ip.to_string());
        nic.stack_type = Some(m::network_interface::StackType::from("IPV4_ONLY"));
        nic.fingerprint = Some(b64_decode(&self.fingerprint()).into());
        if let Some(nat) = &s.nat_ip {
            let nat: Ipv4Addr = nat
                .parse()
                .map_err(|_| ApiError::invalid_field("natIP", nat, "Not an IPv4 address."))?;
            let mut config = m::AccessConfig::default();
            config.kind = Some("compute#accessConfig".into());
            config.r#type = Some(m::access_config::Type::from("ONE_TO_ONE_NAT"));
            config.name = Some("External NAT".into());
            config.nat_ip = Some(nat.to_string());
            config.network_tier = Some(m::access_config::NetworkTier::from("PREMIUM"));
            nic.access_configs = vec![config];
        }
        let mut inst = m::Instance::default();
        inst.kind = Some("compute#instance".into());
        inst.id = Some(id);
        inst.name = Some(s.name.clone());
        inst.creation_timestamp = Some(now_rfc3339());
        inst.zone = Some(self.zone_link(&s.zone));
        inst.self_link = Some(self.instance_link(&s.zone, &s.name));
        inst.machine_type = Some(format!(
            "{API}{}/zones/{}/machineTypes/{}",
            self.project_path(),
            s.zone,
            s.machine_type.as_deref().unwrap_or("e2-standard-2")
        ));
        inst.status = Some(m::instance::Status::from(
            s.status.as_deref().unwrap_or("RUNNING"),
        ));
        inst.hostname = Some(format!(
            "{}.{}.c.{}.internal",
            s.name, s.zone, self.cfg.project
        ));
        inst.labels = s.labels.clone().into_iter().collect();
        inst.fingerprint = Some(b64_decode(&self.fingerprint()).into());
        inst.can_ip_forward = Some(false);
        inst.network_interfaces = vec![nic];
        // Checked against everyone else first; the instance is not in the map yet.
        let asked: Vec<m::AliasIpRange> = s
            .alias_ip_ranges
            .iter()
            .map(|a| {
                let mut r = m::AliasIpRange::default();
                r.ip_cidr_range = Some(a.ip_cidr_range.clone());
                r.subnetwork_range_name = a.subnetwork_range_name.clone();
                r
            })
            .collect();
        self.instances.insert(key.clone(), inst);
        match self.resolve_alias_ranges(&s.zone, &s.name, &asked, true) {
            Ok(ranges) => {
                if let Some(i) = self.instances.get_mut(&key)
                    && let Some(n) = i.network_interfaces.first_mut()
                {
                    n.alias_ip_ranges = ranges;
                }
            }
            Err(e) => {
                self.instances.remove(&key);
                return Err(e);
            }
        }
        self.instance(&s.zone, &s.name)
    }

    /// Removes an instance; its endpoints leave every NEG, as in GCE.
    pub fn delete_instance(&mut self, zone: &str, name: &str) -> Result<()> {
        if self
            .instances
            .remove(&(zone.to_string(), name.to_string()))
            .is_none()
        {
            return Err(ApiError::not_found(&self.instance_rel(zone, name)));
        }
        for ((z, _), eps) in self.endpoints.iter_mut() {
            if z == zone {
                eps.retain(|(_, _, inst), _| inst != name);
            }
        }
        Ok(())
    }

    /// The status an instance shows while an operation on it runs: STOPPING
    /// while it is being stopped or deleted, STAGING while it is being
    /// started (the last such operation wins).
    fn transitional_status(&self, zone: &str, name: &str) -> Option<&'static str> {
        let mut status = None;
        for key in self.pending.values() {
            match self.ops.get(key).and_then(|r| r.mutation.as_ref()) {
                Some(Mutation::Power {
                    zone: z,
                    instance: i,
                    start,
                }) if z == zone && i == name => {
                    status = Some(if *start { "STAGING" } else { "STOPPING" });
                }
                Some(Mutation::DeleteInstance {
                    zone: z,
                    instance: i,
                }) if z == zone && i == name => status = Some("STOPPING"),
                _ => {}
            }
        }
        status
    }

    /// An instance as GET and list show it.
    fn render_instance(&self, zone: &str, name: &str, i: &m::Instance) -> Result<Value> {
        let mut v = to_value(i)?;
        if let Some(status) = self.transitional_status(zone, name) {
            v["status"] = json!(status);
        }
        Ok(v)
    }

    pub fn instance(&self, zone: &str, name: &str) -> Result<Value> {
        self.check_scope(&Scope::Zone(zone.to_string()))?;
        match self.instances.get(&(zone.to_string(), name.to_string())) {
            Some(i) => self.render_instance(zone, name, i),
            None => Err(ApiError::not_found(&self.instance_rel(zone, name))),
        }
    }

    pub fn instances(&self, zone: &str, q: &ListQuery) -> Result<Value> {
        self.check_scope(&Scope::Zone(zone.to_string()))?;
        let items = self
            .instances
            .iter()
            .filter(|((z, _), _)| z == zone)
            .map(|((z, n), i)| self.render_instance(z, n, i))
            .collect::<Result<Vec<_>>>()?;
        let link = format!("{API}{}/zones/{zone}/instances", self.project_path());
        list_page(items, q, "compute#instanceList", &link)
    }

    /// `instances.stop` (`start: false`) and `instances.start`: the
    /// instance must exist; it is TERMINATED (GCE's "stopped") or RUNNING
    /// when the operation completes. Stopping a stopped instance or
    /// starting a running one succeeds and changes nothing, as in GCE.
    pub fn power_instance(
        &mut self,
        zone: &str,
        name: &str,
        start: bool,
        ctx: Mutating,
    ) -> Result<Value> {
        let zone = zone.to_string();
        let name = name.to_string();
        self.mutate(ctx, move |w| {
            let inst = w
                .instances
                .get(&(zone.clone(), name.clone()))
                .ok_or_else(|| ApiError::not_found(&w.instance_rel(&zone, &name)))?;
            let id = inst.id;
            let link = w.instance_link(&zone, &name);
            Ok((
                Scope::Zone(zone.clone()),
                if start { "start" } else { "stop" },
                link,
                id,
                Mutation::Power {
                    zone,
                    instance: name,
                    start,
                },
            ))
        })
    }

    /// `instances.delete`: gone (and out of every NEG) when the operation
    /// completes, STOPPING until then.
    pub fn delete_instance_op(&mut self, zone: &str, name: &str, ctx: Mutating) -> Result<Value> {
        let zone = zone.to_string();
        let name = name.to_string();
        self.mutate(ctx, move |w| {
            let inst = w
                .instances
                .get(&(zone.clone(), name.clone()))
                .ok_or_else(|| ApiError::not_found(&w.instance_rel(&zone, &name)))?;
            let id = inst.id;
            let link = w.instance_link(&zone, &name);
            Ok((
                Scope::Zone(zone.clone()),
                "delete",
                link,
                id,
                Mutation::DeleteInstance {
                    zone,
                    instance: name,
                },
            ))
        })
    }

    fn check_nic_fingerprint(
        &self,
        zone: &str,
        name: &str,
        nic: &m::NetworkInterface,
    ) -> Result<()> {
        let inst = self
            .instances
            .get(&(zone.to_string(), name.to_string()))
            .ok_or_else(|| ApiError::not_found(&self.instance_rel(zone, name)))?;
        let have = inst
            .network_interfaces
            .first()
            .and_then(|n| n.fingerprint.as_ref());
        match (&nic.fingerprint, have) {
            (Some(given), Some(have)) if given == have => Ok(()),
            (None, _) => Err(ApiError::condition_not_met(
                "Required 'fingerprint' of the network interface not specified: read the instance and send its networkInterfaces[].fingerprint.",
            )),
            _ => Err(ApiError::condition_not_met(
                "Supplied fingerprint does not match current fingerprint.",
            )),
        }
    }

    /// `instances.updateNetworkInterface`: only `aliasIpRanges` changes.
    pub fn update_nic(
        &mut self,
        zone: &str,
        name: &str,
        nic_name: Option<&str>,
        body: &[u8],
        ctx: Mutating,
    ) -> Result<Value> {
        let zone = zone.to_string();
        let name = name.to_string();
        let nic_name = nic_name.map(str::to_string);
        self.mutate(ctx, move |w| {
            w.check_scope(&Scope::Zone(zone.clone()))?;
            let inst = w
                .instances
                .get(&(zone.clone(), name.clone()))
                .ok_or_else(|| ApiError::not_found(&w.instance_rel(&zone, &name)))?;
            let id = inst.id;
            match nic_name.as_deref() {
                Some("nic0") => {}
                Some(other) => {
                    return Err(ApiError::invalid_field(
                        "networkInterface",
                        other,
                        "The instance has no network interface of that name.",
                    ));
                }
                None => return Err(ApiError::required("networkInterface")),
            }
            let nic: m::NetworkInterface = parse_body(body)?;
            w.check_nic_fingerprint(&zone, &name, &nic)?;
            w.resolve_alias_ranges(&zone, &name, &nic.alias_ip_ranges, false)?;
            let link = w.instance_link(&zone, &name);
            Ok((
                Scope::Zone(zone.clone()),
                "updateNetworkInterface",
                link,
                id,
                Mutation::Nic {
                    zone,
                    instance: name,
                    nic: Box::new(nic),
                },
            ))
        })
    }

    pub(super) fn apply_nic(
        &mut self,
        zone: &str,
        name: &str,
        nic: &m::NetworkInterface,
    ) -> Result<()> {
        self.check_nic_fingerprint(zone, name, nic)?;
        let ranges = self.resolve_alias_ranges(zone, name, &nic.alias_ip_ranges, true)?;
        let fp = b64_decode(&self.fingerprint());
        let inst = self
            .instances
            .get_mut(&(zone.to_string(), name.to_string()))
            .ok_or_else(|| ApiError::not_found(name))?;
        if let Some(n) = inst.network_interfaces.first_mut() {
            n.alias_ip_ranges = ranges;
            n.fingerprint = Some(fp.into());
        }
        Ok(())
    }
}
