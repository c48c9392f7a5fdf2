//! Identity of a load balancer, names derived from it, and ownership tags.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// Tag key holding the cluster name.
pub const TAG_CLUSTER: &str = "cnlb.dev/cluster";
/// Tag key holding `namespace/name` of the Service.
pub const TAG_SERVICE: &str = "cnlb.dev/service";
/// Tag key holding the Service UID.
pub const TAG_SERVICE_UID: &str = "cnlb.dev/service-uid";
/// Prefix reserved for our own tags; user tags may not use it.
pub const OWNER_TAG_PREFIX: &str = "cnlb.dev/";

/// Longest name [`LoadBalancerKey::short_name`] returns (AWS NLB and target
/// group names are limited to 32 characters).
pub const SHORT_NAME_MAX_LEN: usize = 32;

/// Identity of one load balancer: the Service it serves, in one cluster.
///
/// The UID is part of the identity so that a Service deleted and recreated
/// under the same name never adopts the old, still-deleting load balancer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct LoadBalancerKey {
    pub cluster: String,
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

impl LoadBalancerKey {
    pub fn new(
        cluster: impl Into<String>,
        namespace: impl Into<String>,
        name: impl Into<String>,
        uid: impl Into<String>,
    ) -> Self {
        Self {
            cluster: cluster.into(),
            namespace: namespace.into(),
            name: name.into(),
            uid: uid.into(),
        }
    }

    /// `namespace/name`, the value of the [`TAG_SERVICE`] tag.
    pub fn service(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Deterministic 64-bit hash of the identity. Stable across runs and
    /// versions: changing it would orphan every existing cloud resource.
    pub fn stable_hash(&self) -> u64 {
        self.hash_with("")
    }

    /// Short cloud resource name for this load balancer:
    /// `k8s-<namespace[..8]>-<name[..8]>-<hash[..10]>`, at most 32 characters
    /// of `[a-z0-9-]`, starting with a letter (valid for AWS and GCE names).
    /// The same scheme as aws-load-balancer-controller.
    pub fn short_name(&self) -> String {
        self.resource_name("")
    }

    /// Like [`short_name`](Self::short_name), but `discriminator` (e.g.
    /// `"tg-80-tcp"`) is mixed into the hash, so resources of one load
    /// balancer (one target group per listener, ...) get distinct names of
    /// the same shape. An empty discriminator gives `short_name()`.
    pub fn resource_name(&self, discriminator: &str) -> String {
        let hash = format!("{:016x}", self.hash_with(discriminator));
        let name = format!(
            "k8s-{}-{}-{}",
            sanitize(&self.namespace, 8),
            sanitize(&self.name, 8),
            &hash[..10]
        );
        // Can only exceed the limit if the format above changes; keep the
        // guarantee anyway.
        name.chars().take(SHORT_NAME_MAX_LEN).collect()
    }

    fn hash_with(&self, discriminator: &str) -> u64 {
        fmix64(fnv1a64(&[
            &self.cluster,
            &self.namespace,
            &self.name,
            &self.uid,
            discriminator,
        ]))
    }
}

impl fmt::Display for LoadBalancerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}/{}/{}",
            self.cluster, self.namespace, self.name, self.uid
        )
    }
}

/// Lowercase ASCII letters and digits of `s`, at most `max` of them.
fn sanitize(s: &str, max: usize) -> String {
    s.chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_lowercase())
        .take(max)
        .collect()
}

const FNV_OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// FNV-1a 64 over `parts`, with a NUL byte between parts so that
/// ("ab", "c") and ("a", "bc") hash differently (Kubernetes names never
/// contain NUL).
fn fnv1a64(parts: &[&str]) -> u64 {
    let step = |hash: u64, byte: u8| (hash ^ u64::from(byte)).wrapping_mul(FNV_PRIME);
    let mut hash = FNV_OFFSET_BASIS;
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            hash = step(hash, 0);
        }
        hash = part.bytes().fold(hash, step);
    }
    hash
}

/// MurmurHash3 finaliser: FNV's low and high bits mix poorly on short inputs,
/// and we keep only 40 of the 64 bits.
fn fmix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    h
}

/// Ownership tags every cloud resource of `key` carries.
pub fn owner_tags(key: &LoadBalancerKey) -> BTreeMap<String, String> {
    BTreeMap::from([
        (TAG_CLUSTER.to_owned(), key.cluster.clone()),
        (TAG_SERVICE.to_owned(), key.service()),
        (TAG_SERVICE_UID.to_owned(), key.uid.clone()),
    ])
}

/// True if `tags` carry exactly `key`'s ownership (cluster, service and UID).
pub fn is_owned_by(tags: &BTreeMap<String, String>, key: &LoadBalancerKey) -> bool {
    owner_tags(key).iter().all(|(k, v)| tags.get(k) == Some(v))
}

/// True if `tags` say the resource belongs to some Service of `cluster`.
pub fn is_owned_by_cluster(tags: &BTreeMap<String, String>, cluster: &str) -> bool {
    tags.get(TAG_CLUSTER).map(String::as_str) == Some(cluster)
}

/// Rebuilds the key from ownership tags (for garbage collection); `None` if
/// any of them is missing, empty or malformed.
pub fn key_from_owner_tags(tags: &BTreeMap<String, String>) -> Option<LoadBalancerKey> {
    let cluster = tags.get(TAG_CLUSTER).filter(|v| !v.is_empty())?;
    let (namespace, name) = tags.get(TAG_SERVICE)?.split_once('/')?;
    let uid = tags.get(TAG_SERVICE_UID).filter(|v| !v.is_empty())?;
    if namespace.is_empty() || name.is_empty() || name.contains('/') {
        return None;
    }
    Some(LoadBalancerKey::new(
        cluster.as_str(),
        namespace,
        name,
        uid.as_str(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> LoadBalancerKey {
        LoadBalancerKey::new(
            "prod-eu",
            "default",
            "my-service",
            "4f6c1b2a-0d3e-4e7f-9a1b-2c3d4e5f6a7b",
        )
    }

    #[test]
    fn fnv_matches_reference_vectors() {
        // Published FNV-1a 64 test vectors.
        assert_eq!(fnv1a64(&[""]), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(&["a"]), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(&["foobar"]), 0x8594_4171_f739_67e8);
        // The separator keeps part boundaries apart.
        assert_ne!(fnv1a64(&["ab", "c"]), fnv1a64(&["a", "bc"]));
    }

    #[test]
    fn display() {
        assert_eq!(
            key().to_string(),
            "prod-eu/default/my-service/4f6c1b2a-0d3e-4e7f-9a1b-2c3d4e5f6a7b"
        );
        assert_eq!(key().service(), "default/my-service");
    }

    #[test]
    fn names_are_stable() {
        // Fixed expectations: if these change, existing load balancers are
        // no longer found by name.
        assert_eq!(key().stable_hash(), 0x030e_50b2_36f4_d0a7);
        assert_eq!(key().short_name(), "k8s-default-myservic-030e50b236");
        assert_eq!(
            key().resource_name("tg-80-tcp"),
            "k8s-default-myservic-4f863e6e5c"
        );
    }

    #[test]
    fn names_are_short_valid_and_distinct() {
        let long = LoadBalancerKey::new("c", "Very-Long_Namespace.X", "Ünïcode-Service.name", "u");
        let name = long.short_name();
        assert!(name.len() <= SHORT_NAME_MAX_LEN, "{name}");
        assert!(name.starts_with("k8s-verylong-ncodeser-"), "{name}");
        assert!(
            name.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        );

        let mut other = key();
        other.uid = "another-uid".into();
        assert_ne!(key().short_name(), other.short_name());
        let mut other = key();
        other.cluster = "prod-us".into();
        assert_ne!(key().short_name(), other.short_name());
        assert_ne!(
            key().resource_name("tg-80-tcp"),
            key().resource_name("tg-443-tcp")
        );
        assert_eq!(key().resource_name(""), key().short_name());
    }

    #[test]
    fn owner_tags_round_trip() {
        let tags = owner_tags(&key());
        assert_eq!(tags.len(), 3);
        assert_eq!(tags[TAG_CLUSTER], "prod-eu");
        assert_eq!(tags[TAG_SERVICE], "default/my-service");
        assert_eq!(
            tags[TAG_SERVICE_UID],
            "4f6c1b2a-0d3e-4e7f-9a1b-2c3d4e5f6a7b"
        );
        assert!(is_owned_by(&tags, &key()));
        assert!(is_owned_by_cluster(&tags, "prod-eu"));
        assert!(!is_owned_by_cluster(&tags, "prod-us"));
        assert_eq!(key_from_owner_tags(&tags), Some(key()));

        // Extra user tags do not matter.
        let mut with_user = tags.clone();
        with_user.insert("team".into(), "web".into());
        assert!(is_owned_by(&with_user, &key()));

        // A recreated Service (new UID) does not own the old resources.
        let mut recreated = key();
        recreated.uid = "new-uid".into();
        assert!(!is_owned_by(&tags, &recreated));

        // Missing or malformed tags.
        let mut partial = tags.clone();
        partial.remove(TAG_SERVICE_UID);
        assert!(!is_owned_by(&partial, &key()));
        assert_eq!(key_from_owner_tags(&partial), None);
        let mut bad = tags;
        bad.insert(TAG_SERVICE.into(), "no-slash".into());
        assert_eq!(key_from_owner_tags(&bad), None);
        assert!(!is_owned_by_cluster(&BTreeMap::new(), "prod-eu"));
    }
}
