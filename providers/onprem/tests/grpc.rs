//! The protocol end to end without HAProxy: an in-memory provider served on
//! a unix socket by `server::serve`, called through `GrpcProvider`. Checks
//! that the conformance suite works for any provider, that typed errors
//! survive the wire, that the health watch streams changes, and the Node
//! part: served from an inventory file when the plugin has one, refused
//! when it has none. Over TCP with mutual TLS: the suite passes for a
//! client with a certificate of the plugin's CA, and everyone else is
//! refused at the handshake.

#![allow(clippy::unwrap_used)]

mod certs;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use cnlb_provider_core::{InstanceState, NodeAddress, NodeAddressKind, NodeProvider, NodeRef};
use cnlb_provider_core::{
    Listener, LoadBalancerIngress, LoadBalancerKey, LoadBalancerProvider, LoadBalancerSpec,
    LoadBalancerStatus, OwnedLoadBalancer, ProviderError, ResourceIds, Result, Target, TargetDelta,
    TargetHealth, TargetHealthState, TargetSet,
};
use cnlb_provider_onprem::inventory::Inventory;
use cnlb_provider_onprem::proto::GetInfoRequest;
use cnlb_provider_onprem::proto::load_balancer_provider_client::LoadBalancerProviderClient;
use cnlb_provider_onprem::server::{Plugin, serve};
use cnlb_provider_onprem::{
    ClientTls, GrpcProvider, PemFile, PluginEndpoint, ServerTls, conformance,
};
use futures::StreamExt;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

/// Load balancers as data: every registered target is healthy. With an
/// inventory, it has a Node part.
#[derive(Default)]
struct Memory {
    lbs: Mutex<BTreeMap<LoadBalancerKey, BTreeMap<String, TargetSet>>>,
    inventory: Option<Inventory>,
}

impl Memory {
    fn lbs(
        &self,
    ) -> std::sync::MutexGuard<'_, BTreeMap<LoadBalancerKey, BTreeMap<String, TargetSet>>> {
        self.lbs.lock().unwrap()
    }
}

fn missing(key: &LoadBalancerKey) -> ProviderError {
    ProviderError::NotFound {
        resource: key.to_string(),
    }
}

#[async_trait]
impl LoadBalancerProvider for Memory {
    fn name(&self) -> &str {
        "memory"
    }

    async fn ensure_load_balancer(
        &self,
        spec: &LoadBalancerSpec,
        _known: &ResourceIds,
    ) -> Result<LoadBalancerStatus> {
        spec.validate()?;
        let mut lbs = self.lbs();
        let listeners = lbs.entry(spec.key.clone()).or_default();
        listeners.retain(|name, _| spec.listener(name).is_some());
        for l in &spec.listeners {
            listeners.entry(l.name.clone()).or_default();
        }
        Ok(LoadBalancerStatus {
            ingress: vec![LoadBalancerIngress {
                hostname: None,
                ip: Some(IpAddr::from([192, 0, 2, 1])),
                ip_mode: None,
            }],
            ids: ResourceIds::from([("lb".into(), spec.key.short_name())]),
            annotations: Default::default(),
        })
    }

    async fn sync_targets(
        &self,
        key: &LoadBalancerKey,
        listener: &Listener,
        delta: &TargetDelta,
        _known: &ResourceIds,
    ) -> Result<()> {
        let mut lbs = self.lbs();
        let targets = lbs
            .get_mut(key)
            .and_then(|l| l.get_mut(&listener.name))
            .ok_or_else(|| missing(key))?;
        delta.apply_to(targets);
        Ok(())
    }

    async fn target_health(
        &self,
        key: &LoadBalancerKey,
        _known: &ResourceIds,
    ) -> Result<Vec<TargetHealth>> {
        let lbs = self.lbs();
        let listeners = lbs.get(key).ok_or_else(|| missing(key))?;
        Ok(listeners
            .iter()
            .flat_map(|(name, targets)| {
                targets.iter().map(move |t| TargetHealth {
                    listener: name.clone(),
                    ip: t.ip,
                    port: t.port,
                    state: TargetHealthState::Healthy,
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
        self.lbs().remove(key);
        Ok(())
    }

    async fn list_owned(&self, cluster: &str) -> Result<Vec<OwnedLoadBalancer>> {
        Ok(self
            .lbs()
            .keys()
            .filter(|k| k.cluster == cluster)
            .map(|k| OwnedLoadBalancer {
                key: k.clone(),
                ids: ResourceIds::from([("lb".into(), k.short_name())]),
            })
            .collect())
    }
}

impl Plugin for Memory {
    fn nodes(&self) -> Option<&dyn NodeProvider> {
        self.inventory.as_ref().map(|i| i as &dyn NodeProvider)
    }
}

async fn plugin(dir: &tempfile::TempDir) -> GrpcProvider {
    serve_memory(dir, Memory::default()).await
}

async fn serve_memory(dir: &tempfile::TempDir, memory: Memory) -> GrpcProvider {
    let endpoint = PluginEndpoint::Unix(dir.path().join("plugin.sock"));
    let served = endpoint.clone();
    tokio::spawn(async move {
        let provider: Arc<dyn Plugin> = Arc::new(memory);
        serve(
            provider,
            &served,
            None,
            Duration::from_millis(50),
            std::future::pending(),
        )
        .await
    });
    for _ in 0..100 {
        if let Ok(p) = GrpcProvider::connect(&endpoint).await {
            return p;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("plugin did not come up");
}

/// Runs the conformance suite against `plugin` (an in-memory one).
async fn passes_conformance(plugin: &GrpcProvider) {
    assert_eq!(LoadBalancerProvider::name(plugin), "memory");
    let passed = conformance::run(
        plugin,
        &conformance::Config {
            cluster: "c-memory".into(),
            port: 80,
            backends: vec![
                "10.0.0.1:8080".parse().unwrap(),
                "10.0.0.2:8080".parse().unwrap(),
            ],
            expect_healthy: true,
            timeout: Duration::from_secs(10),
            nodes: Vec::new(),
        },
    )
    .await
    .unwrap();
    // Its last check: without a Node part, GetInstances is refused.
    assert_eq!(passed.len(), 10, "{passed:?}");
}

#[tokio::test]
async fn conformance_suite_passes_for_an_in_memory_plugin() {
    let dir = tempfile::tempdir().unwrap();
    passes_conformance(&plugin(&dir).await).await;
}

#[tokio::test]
async fn errors_cross_the_wire_typed_and_the_watch_streams_changes() {
    let dir = tempfile::tempdir().unwrap();
    let plugin = plugin(&dir).await;
    let config = conformance::Config {
        cluster: "c1".into(),
        port: 80,
        backends: Vec::new(),
        expect_healthy: false,
        timeout: Duration::from_secs(10),
        nodes: Vec::new(),
    };
    let mut spec = conformance::spec(&config);
    spec.health_check.timeout = Duration::from_secs(30);
    let err = plugin
        .ensure_load_balancer(&spec, &ResourceIds::new())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ProviderError::InvalidSpec { field, .. } if field == "health_check.timeout"),
        "{err:?}"
    );

    let spec = conformance::spec(&config);
    let key = spec.key.clone();
    let ids = plugin
        .ensure_load_balancer(&spec, &ResourceIds::new())
        .await
        .unwrap()
        .ids;
    let mut watch = plugin.watch_backend_health(&key, &ids).await.unwrap();
    assert!(watch.next().await.unwrap().unwrap().is_empty());
    let delta = TargetDelta {
        register: vec![Target::new(IpAddr::from([10, 0, 0, 9]), 8080)],
        deregister: Vec::new(),
    };
    plugin
        .sync_targets(&key, &spec.listeners[0], &delta, &ids)
        .await
        .unwrap();
    let next = tokio::time::timeout(Duration::from_secs(5), watch.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(next.len(), 1);
    assert_eq!(next[0].ip, IpAddr::from([10, 0, 0, 9]));

    // The load balancer goes: the stream ends with NotFound.
    plugin.delete_load_balancer(&key, &ids).await.unwrap();
    let end = tokio::time::timeout(Duration::from_secs(5), watch.next())
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(end, Err(ProviderError::NotFound { .. })),
        "{end:?}"
    );
    assert!(watch.next().await.is_none());
}

const INVENTORY: &str = r#"{"nodes": [
  {"name": "node-1", "addresses": {"InternalIP": "10.1.0.1", "Hostname": "node-1"},
   "zone": "rack-1", "region": "dc-1", "instanceType": "r640"},
  {"name": "node-2", "providerID": "metal://dc-1/node-2", "addresses": {"InternalIP": "10.1.0.2"},
   "state": "shutdown"}
]}"#;

#[tokio::test]
async fn the_node_part_is_served_from_an_inventory_and_refused_without_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("inventory.json");
    std::fs::write(&path, INVENTORY).unwrap();
    let plugin = serve_memory(
        &dir,
        Memory {
            inventory: Some(Inventory::new(&path)),
            ..Memory::default()
        },
    )
    .await;
    assert!(plugin.supports_nodes().await.unwrap());

    // The conformance suite checks the Node part too.
    let passed = conformance::run(
        &plugin,
        &conformance::Config {
            cluster: "c-nodes".into(),
            port: 80,
            backends: vec![
                "10.0.0.1:8080".parse().unwrap(),
                "10.0.0.2:8080".parse().unwrap(),
            ],
            expect_healthy: true,
            timeout: Duration::from_secs(10),
            nodes: vec!["node-1".into(), "node-2".into()],
        },
    )
    .await
    .unwrap();
    assert_eq!(passed.len(), 11, "{passed:?}");

    // By provider ID, by name, by IP, absent: in order, typed.
    let by_ip = NodeRef {
        name: "renamed".into(),
        provider_id: None,
        internal_ips: vec!["10.1.0.1".parse().unwrap()],
    };
    let mut by_id = NodeRef::named("whatever");
    by_id.provider_id = Some("metal://dc-1/node-2".into());
    let mut gone = NodeRef::named("node-1");
    gone.provider_id = Some("onprem://deleted".into());
    let nodes = [
        by_id,
        NodeRef::named("node-1"),
        by_ip,
        gone,
        NodeRef::named("node-9"),
    ];
    let found = plugin.instances(&nodes).await.unwrap();
    let ids: Vec<Option<&str>> = found
        .iter()
        .map(|i| i.as_ref().map(|i| i.metadata.provider_id.as_str()))
        .collect();
    assert_eq!(
        ids,
        [
            Some("metal://dc-1/node-2"),
            Some("onprem://node-1"),
            Some("onprem://node-1"),
            None,
            None
        ]
    );
    let node_1 = found[1].as_ref().unwrap();
    assert_eq!(node_1.state, InstanceState::Running);
    assert_eq!(
        (
            node_1.metadata.zone.as_str(),
            node_1.metadata.region.as_str(),
            node_1.metadata.instance_type.as_str()
        ),
        ("rack-1", "dc-1", "r640")
    );
    assert_eq!(
        node_1.metadata.addresses,
        [
            NodeAddress {
                kind: NodeAddressKind::InternalIP,
                address: "10.1.0.1".into()
            },
            NodeAddress {
                kind: NodeAddressKind::Hostname,
                address: "node-1".into()
            },
        ]
    );
    assert_eq!(found[0].as_ref().unwrap().state, InstanceState::Shutdown);

    // A broken file: an error naming the file and the field crosses the
    // wire (retryable: fixing the file is enough), never "not found".
    std::fs::write(&path, r#"{"nodes": [{"name": "node-1", "state": "off"}]}"#).unwrap();
    let err = plugin.instances(&nodes[1..2]).await.unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains(&path.display().to_string()) && text.contains("nodes[0].state"),
        "{text}"
    );
    assert_eq!(err.retry_policy(), cnlb_provider_core::RetryPolicy::Backoff);
    // Fixed: read again on the next call.
    std::fs::write(&path, r#"{"nodes": []}"#).unwrap();
    assert_eq!(plugin.instances(&nodes[1..2]).await.unwrap(), [None]);

    // A plugin without a Node part says so, and GetInstances fails for good.
    let other = tempfile::tempdir().unwrap();
    let bare = serve_memory(&other, Memory::default()).await;
    assert!(!bare.supports_nodes().await.unwrap());
    let err = bare.instances(&nodes[1..2]).await.unwrap_err();
    assert!(err.to_string().contains("no Node part"), "{err}");
    assert_eq!(
        err.retry_policy(),
        cnlb_provider_core::RetryPolicy::AwaitChange
    );
}

/// An in-memory plugin served on a free loopback port with mutual TLS
/// (`server::serve` over TCP), once it accepts connections.
async fn serve_memory_tls(tls: ServerTls) -> PluginEndpoint {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let endpoint = PluginEndpoint::Tcp(addr);
    let served = endpoint.clone();
    tokio::spawn(async move {
        let provider: Arc<dyn Plugin> = Arc::new(Memory::default());
        serve(
            provider,
            &served,
            Some(&tls),
            Duration::from_millis(50),
            std::future::pending(),
        )
        .await
    });
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return endpoint;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("plugin did not come up");
}

fn client_tls(
    ca: &std::path::Path,
    cert: &std::path::Path,
    key: &std::path::Path,
    name: Option<&str>,
) -> ClientTls {
    ClientTls::load(
        &PemFile::new("--onprem-plugin-tls-ca", ca),
        &PemFile::new("--onprem-plugin-tls-cert", cert),
        &PemFile::new("--onprem-plugin-tls-key", key),
        name,
    )
    .unwrap()
}

/// A call through a client that the plugin, or that itself, refuses: the
/// handshake's reason (one of `reasons`), retried (the plugin may be fixed)
/// with backoff.
async fn refused(endpoint: &PluginEndpoint, tls: Option<&ClientTls>, reasons: &[&str]) {
    let err = GrpcProvider::lazy_with_tls(endpoint, tls, "plugin")
        .unwrap()
        .probe()
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ProviderError::Cloud { operation, message, retryable: true }
            if operation == "Probe" && reasons.iter().any(|r| message.contains(r))),
        "{err:?}"
    );
}

/// What a client sees when the plugin ends the handshake: TLS 1.3 checks
/// the client's certificate after the client's side of the handshake is
/// done, so the plugin's alert arrives while the client already sends its
/// request, and is lost when the connection closes (or is reset) first.
const CLOSED: [&str; 3] = ["connection closed", "broken pipe", "Connection reset"];

#[tokio::test]
async fn mutual_tls_admits_clients_with_a_certificate_of_its_ca_only() {
    let dir = tempfile::tempdir().unwrap();
    let f = certs::write(dir.path());
    let tls = ServerTls::load(
        &PemFile::new("--tls-cert", &f.server_cert),
        &PemFile::new("--tls-key", &f.server_key),
        &PemFile::new("--tls-client-ca", &f.ca),
    )
    .unwrap();
    let endpoint = serve_memory_tls(tls).await;

    // cnlb-ccm's certificate: the whole protocol works, the plugin's
    // certificate checked against its IP SAN, or a DNS SAN when named.
    let ok = client_tls(&f.ca, &f.client_cert, &f.client_key, None);
    let plugin = GrpcProvider::connect_with_tls(&endpoint, Some(&ok))
        .await
        .unwrap();
    passes_conformance(&plugin).await;
    let named = client_tls(&f.ca, &f.client_cert, &f.client_key, Some("plugin.test"));
    let plugin = GrpcProvider::connect_with_tls(&endpoint, Some(&named))
        .await
        .unwrap();
    plugin.probe().await.unwrap();

    // The plugin refuses a client certificate of another CA, and plaintext
    // (the TLS handshake fails on the first bytes).
    let foreign = client_tls(&f.ca, &f.foreign_cert, &f.foreign_key, None);
    let alert = "received fatal alert: UnknownCA";
    refused(&endpoint, Some(&foreign), &[&[alert][..], &CLOSED].concat()).await;
    refused(&endpoint, None, &CLOSED).await;
    // The client refuses a plugin whose CA it does not trust, or whose
    // certificate does not carry the name it expects.
    let distrustful = client_tls(&f.foreign_ca, &f.client_cert, &f.client_key, None);
    refused(
        &endpoint,
        Some(&distrustful),
        &["invalid peer certificate: UnknownIssuer"],
    )
    .await;
    let misnamed = client_tls(&f.ca, &f.client_cert, &f.client_key, Some("other.test"));
    refused(
        &endpoint,
        Some(&misnamed),
        &[r#"not valid for name "other.test""#],
    )
    .await;

    // TLS without a client certificate (as `grpcurl -cacert` would call):
    // the plugin asks for one and ends the handshake.
    let https = endpoint.to_string().replace("tcp://", "https://");
    let ca = Certificate::from_pem(std::fs::read(&f.ca).unwrap());
    let channel = Endpoint::from_shared(https)
        .unwrap()
        .tls_config(ClientTlsConfig::new().ca_certificate(ca))
        .unwrap()
        .connect_lazy();
    let status = LoadBalancerProviderClient::new(channel)
        .get_info(GetInfoRequest {})
        .await
        .unwrap_err();
    let mut cause = std::error::Error::source(&status);
    while let Some(inner) = cause.and_then(std::error::Error::source) {
        cause = Some(inner);
    }
    let cause = cause.map(ToString::to_string).unwrap_or_default();
    let alert = "received fatal alert: CertificateRequired";
    assert!(
        [&[alert][..], &CLOSED]
            .concat()
            .iter()
            .any(|r| cause.contains(r)),
        "{status:?}"
    );
}
