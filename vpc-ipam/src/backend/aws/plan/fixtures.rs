//! ENIs, subnets and instances as EC2 describes them, for the plan's tests.

use std::collections::BTreeMap;
use std::net::IpAddr;

use cnlb_provider_aws::ipam::{Eni, EniAttachment, InstanceInfo, SubnetInfo};
use cnlb_provider_core::TAG_CLUSTER;

use super::super::{TAG_INSTANCE, TAG_NODE};
use crate::backend::Assigned;

pub fn subnet(id: &str, zone: &str, free: u32) -> SubnetInfo {
    SubnetInfo {
        id: id.into(),
        vpc_id: "vpc-1".into(),
        availability_zone: zone.into(),
        cidr: "100.64.0.0/19".into(),
        available_ips: free,
    }
}

pub fn instance() -> InstanceInfo {
    InstanceInfo {
        id: "i-1".into(),
        instance_type: "m5.large".into(),
        vpc_id: "vpc-1".into(),
        availability_zone: "us-east-1a".into(),
        primary_security_groups: vec!["sg-1".into()],
    }
}

/// An ENI of cluster "c" attached to instance "i-1" of node "node-1", in
/// subnet-a, its primary address 100.64.0.4.
pub fn eni(id: &str, index: i32, ips: &[&str], prefixes: &[&str]) -> Eni {
    Eni {
        id: id.into(),
        subnet_id: "subnet-a".into(),
        status: "in-use".into(),
        attachment: Some(EniAttachment {
            id: format!("{id}-attach"),
            instance_id: "i-1".into(),
            device_index: index,
            status: "attached".into(),
            delete_on_termination: true,
        }),
        primary_ip: Some("100.64.0.4".into()),
        secondary_ips: ips.iter().map(|s| s.to_string()).collect(),
        prefixes: prefixes.iter().map(|s| s.to_string()).collect(),
        tags: BTreeMap::from([
            (TAG_CLUSTER.into(), "c".into()),
            (TAG_NODE.into(), "node-1".into()),
            (TAG_INSTANCE.into(), "i-1".into()),
        ]),
        mac: None,
    }
}

pub fn ips(list: &[&str]) -> Vec<IpAddr> {
    list.iter().map(|s| s.parse().unwrap()).collect()
}

/// An address of 100.64.0.0/19 held by `holder`.
pub fn assigned(ip: &str, holder: &str) -> Assigned {
    Assigned {
        ip: ip.parse().unwrap(),
        subnet: "100.64.0.0/19".parse().unwrap(),
        holder: holder.into(),
    }
}
