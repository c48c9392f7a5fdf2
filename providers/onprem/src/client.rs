//! [`GrpcProvider`]: a `LoadBalancerProvider` that forwards every call to an
//! out-of-process plugin over the protocol in `provider.proto`, and a
//! `NodeProvider` when the plugin has a Node part
//! ([`GrpcProvider::supports_nodes`]).
//!
//! The channel connects lazily and reconnects by itself, so a plugin that is
//! down or restarting makes calls fail with a retryable error (tonic reports
//! it as `UNAVAILABLE`) rather than failing the controller's start.

use std::time::Duration;

use async_trait::async_trait;
use cnlb_provider_core::{
    Instance, Listener, LoadBalancerKey, LoadBalancerProvider, LoadBalancerSpec,
    LoadBalancerStatus, NodeProvider, NodeRef, OwnedLoadBalancer, ProviderError, ResourceIds,
    Result, TargetDelta, TargetHealth,
};
use futures::stream::{BoxStream, StreamExt};
use hyper_util::rt::TokioIo;
use tonic::Code;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::convert;
use crate::endpoint::PluginEndpoint;
use crate::proto;
use crate::proto::load_balancer_provider_client::LoadBalancerProviderClient;
use crate::status::from_status;
use crate::tls::ClientTls;

/// Deadline of one call; ensure can include a load balancer reload.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// How long to wait for the plugin's socket to accept a connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// What a plugin says about itself (`GetInfo`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginInfo {
    pub name: String,
    pub vendor_version: String,
    pub capabilities: Vec<proto::Capability>,
}

/// A plugin behind the gRPC protocol.
#[derive(Clone)]
pub struct GrpcProvider {
    client: LoadBalancerProviderClient<Channel>,
    name: String,
    timeout: Duration,
}

impl GrpcProvider {
    /// A provider for the plugin at `endpoint`, named `name` in logs and
    /// metrics. Makes no connection yet (must be called inside a tokio
    /// runtime).
    pub fn lazy(endpoint: &PluginEndpoint, name: impl Into<String>) -> Result<GrpcProvider> {
        GrpcProvider::lazy_with_tls(endpoint, None, name)
    }

    /// [`lazy`](GrpcProvider::lazy), over mutual TLS when `tls` is given
    /// (tcp:// endpoints only: a unix socket is guarded by its file mode).
    pub fn lazy_with_tls(
        endpoint: &PluginEndpoint,
        tls: Option<&ClientTls>,
        name: impl Into<String>,
    ) -> Result<GrpcProvider> {
        let channel = match (endpoint, tls) {
            (PluginEndpoint::Unix(_), Some(_)) => {
                return Err(ProviderError::invalid(
                    "plugin endpoint",
                    format!("TLS is for tcp:// endpoints, not {endpoint}"),
                ));
            }
            (PluginEndpoint::Unix(path), None) => {
                let path = path.clone();
                // The URI is required by the API and ignored by the connector.
                Endpoint::from_static("http://plugin.invalid")
                    .connect_timeout(CONNECT_TIMEOUT)
                    .connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
                        let path = path.clone();
                        async move {
                            let stream = tokio::net::UnixStream::connect(path).await?;
                            Ok::<_, std::io::Error>(TokioIo::new(stream))
                        }
                    }))
            }
            (PluginEndpoint::Tcp(addr), tls) => {
                let scheme = if tls.is_some() { "https" } else { "http" };
                let invalid = |e: tonic::transport::Error| {
                    ProviderError::invalid("plugin endpoint", e.to_string())
                };
                let mut channel = Endpoint::from_shared(format!("{scheme}://{addr}"))
                    .map_err(invalid)?
                    .connect_timeout(CONNECT_TIMEOUT);
                if let Some(tls) = tls {
                    channel = channel.tls_config(tls.config()).map_err(invalid)?;
                }
                channel.connect_lazy()
            }
        };
        Ok(GrpcProvider {
            client: LoadBalancerProviderClient::new(channel),
            name: name.into(),
            timeout: DEFAULT_CALL_TIMEOUT,
        })
    }

    /// Connects to the plugin at `endpoint` and names the provider after
    /// the plugin's `GetInfo`.
    pub async fn connect(endpoint: &PluginEndpoint) -> Result<GrpcProvider> {
        GrpcProvider::connect_with_tls(endpoint, None).await
    }

    /// [`connect`](GrpcProvider::connect), over mutual TLS when `tls` is
    /// given.
    pub async fn connect_with_tls(
        endpoint: &PluginEndpoint,
        tls: Option<&ClientTls>,
    ) -> Result<GrpcProvider> {
        let mut provider = GrpcProvider::lazy_with_tls(endpoint, tls, "plugin")?;
        provider.name = provider.info().await?.name;
        Ok(provider)
    }

    /// The same provider with another per-call deadline.
    pub fn with_timeout(mut self, timeout: Duration) -> GrpcProvider {
        self.timeout = timeout;
        self
    }

    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.set_timeout(self.timeout);
        request
    }

    /// `GetInfo`.
    pub async fn info(&self) -> Result<PluginInfo> {
        let info = self
            .client
            .clone()
            .get_info(self.request(proto::GetInfoRequest {}))
            .await
            .map_err(|s| call_failed("GetInfo", &s))?
            .into_inner();
        Ok(PluginInfo {
            name: info.name,
            vendor_version: info.vendor_version,
            // Capabilities a newer plugin knows and we do not are skipped.
            capabilities: info
                .capabilities
                .into_iter()
                .filter_map(|c| proto::Capability::try_from(c).ok())
                .collect(),
        })
    }

    /// Whether the plugin has a Node part: it advertises `CAPABILITY_NODES`
    /// in `GetInfo` (asked anew each time: a plugin may be upgraded).
    /// Without it, [`NodeProvider::instances`] fails, never answers "not
    /// found".
    pub async fn supports_nodes(&self) -> Result<bool> {
        Ok(self
            .info()
            .await?
            .capabilities
            .contains(&proto::Capability::Nodes))
    }

    /// `Probe`: `Ok(())` when the plugin is ready, else why not.
    pub async fn probe(&self) -> Result<()> {
        let probe = self
            .client
            .clone()
            .probe(self.request(proto::ProbeRequest {}))
            .await
            .map_err(|s| call_failed("Probe", &s))?
            .into_inner();
        if probe.ready {
            Ok(())
        } else {
            Err(ProviderError::cloud("Probe", probe.message, true))
        }
    }

    /// `WatchBackendHealth`: the current health of every backend of `key`,
    /// then again each time it changes. Ends after an error (re-watch then).
    pub async fn watch_backend_health(
        &self,
        key: &LoadBalancerKey,
        known: &ResourceIds,
    ) -> Result<BoxStream<'static, Result<Vec<TargetHealth>>>> {
        let request = tonic::Request::new(proto::WatchBackendHealthRequest {
            key: Some(convert::key_to_proto(key)),
            known_ids: convert::ids_to_proto(known),
        });
        let stream = self
            .client
            .clone()
            .watch_backend_health(request)
            .await
            .map_err(|s| call_failed("WatchBackendHealth", &s))?
            .into_inner();
        Ok(stream
            .map(|snapshot| {
                snapshot
                    .map_err(|s| call_failed("WatchBackendHealth", &s))?
                    .backends
                    .into_iter()
                    .map(|h| convert::health_from_proto(h).map_err(bad_reply("WatchBackendHealth")))
                    .collect()
            })
            .boxed())
    }
}

/// The error of a failed call. A transport failure's status says only
/// "transport error"; its root cause says what happened (e.g. "received
/// fatal alert: CertificateRequired").
fn call_failed(rpc: &str, status: &tonic::Status) -> ProviderError {
    let mut root = std::error::Error::source(status);
    while let Some(cause) = root.and_then(std::error::Error::source) {
        root = Some(cause);
    }
    match root.map(ToString::to_string) {
        Some(cause) if !status.message().contains(&cause) => {
            let message = format!("{}: {cause}", status.message());
            from_status(rpc, &tonic::Status::new(status.code(), message))
        }
        _ => from_status(rpc, status),
    }
}

/// A reply the plugin should never have sent is the plugin's fault, not
/// the user's.
fn bad_reply(rpc: &'static str) -> impl Fn(ProviderError) -> ProviderError {
    move |err| ProviderError::cloud(rpc, format!("plugin sent an invalid reply: {err}"), false)
}

#[async_trait]
impl LoadBalancerProvider for GrpcProvider {
    fn name(&self) -> &str {
        &self.name
    }

    async fn ensure_load_balancer(
        &self,
        spec: &LoadBalancerSpec,
        known: &ResourceIds,
    ) -> Result<LoadBalancerStatus> {
        if let Some(listener) = spec.target_group_names.keys().next() {
            // The protocol has no field for them.
            return Err(ProviderError::invalid(
                format!("target_group_names[{listener}]"),
                "plugins name their backends themselves; they cannot be chosen",
            ));
        }
        let reply = self
            .client
            .clone()
            .ensure_load_balancer(self.request(proto::EnsureLoadBalancerRequest {
                spec: Some(convert::spec_to_proto(spec)),
                known_ids: convert::ids_to_proto(known),
            }))
            .await
            .map_err(|s| call_failed("EnsureLoadBalancer", &s))?
            .into_inner();
        convert::status_from_proto(reply).map_err(bad_reply("EnsureLoadBalancer"))
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
        self.client
            .clone()
            .update_backends(
                self.request(proto::UpdateBackendsRequest {
                    key: Some(convert::key_to_proto(key)),
                    listener: Some(convert::listener_to_proto(listener)),
                    register: delta
                        .register
                        .iter()
                        .map(convert::target_to_proto)
                        .collect(),
                    deregister: delta
                        .deregister
                        .iter()
                        .map(convert::target_to_proto)
                        .collect(),
                    known_ids: convert::ids_to_proto(known),
                }),
            )
            .await
            .map_err(|s| call_failed("UpdateBackends", &s))?;
        Ok(())
    }

    /// The first snapshot of `WatchBackendHealth`.
    async fn target_health(
        &self,
        key: &LoadBalancerKey,
        known: &ResourceIds,
    ) -> Result<Vec<TargetHealth>> {
        let mut stream = self.watch_backend_health(key, known).await?;
        let first = tokio::time::timeout(self.timeout, stream.next()).await;
        match first {
            Ok(Some(snapshot)) => snapshot,
            Ok(None) => Err(ProviderError::cloud(
                "WatchBackendHealth",
                "plugin closed the stream before the first snapshot",
                true,
            )),
            Err(_) => Err(ProviderError::cloud(
                "WatchBackendHealth",
                "no snapshot before the deadline",
                true,
            )),
        }
    }

    async fn delete_load_balancer(&self, key: &LoadBalancerKey, known: &ResourceIds) -> Result<()> {
        self.client
            .clone()
            .delete_load_balancer(self.request(proto::DeleteLoadBalancerRequest {
                key: Some(convert::key_to_proto(key)),
                known_ids: convert::ids_to_proto(known),
            }))
            .await
            .map_err(|s| call_failed("DeleteLoadBalancer", &s))?;
        Ok(())
    }

    async fn list_owned(&self, cluster: &str) -> Result<Vec<OwnedLoadBalancer>> {
        let reply = self
            .client
            .clone()
            .list_load_balancers(self.request(proto::ListLoadBalancersRequest {
                cluster: cluster.to_string(),
            }))
            .await
            .map_err(|s| call_failed("ListLoadBalancers", &s))?
            .into_inner();
        reply
            .load_balancers
            .into_iter()
            .map(|o| convert::owned_from_proto(o).map_err(bad_reply("ListLoadBalancers")))
            .collect()
    }
}

/// The error of a `GetInstances` the plugin does not serve: not retryable,
/// and saying so plainly.
fn no_node_part(status: &tonic::Status) -> ProviderError {
    ProviderError::cloud(
        "GetInstances",
        format!(
            "the plugin has no Node part (it does not advertise CAPABILITY_NODES): {}",
            status.message()
        ),
        false,
    )
}

/// `GetInstances`: the plugin's Node part, if it has one (see
/// [`GrpcProvider::supports_nodes`]).
#[async_trait]
impl NodeProvider for GrpcProvider {
    fn name(&self) -> &str {
        &self.name
    }

    async fn instances(&self, nodes: &[NodeRef]) -> Result<Vec<Option<Instance>>> {
        if nodes.is_empty() {
            return Ok(Vec::new());
        }
        let reply = self
            .client
            .clone()
            .get_instances(self.request(proto::GetInstancesRequest {
                nodes: nodes.iter().map(convert::node_to_proto).collect(),
            }))
            .await
            .map_err(|s| match s.code() {
                Code::Unimplemented => no_node_part(&s),
                _ => call_failed("GetInstances", &s),
            })?
            .into_inner();
        if reply.results.len() != nodes.len() {
            return Err(bad_reply("GetInstances")(ProviderError::invalid(
                "results",
                format!("{} results for {} Nodes", reply.results.len(), nodes.len()),
            )));
        }
        reply
            .results
            .into_iter()
            .enumerate()
            .map(|(i, r)| {
                convert::instance_result_from_proto(&format!("results[{i}]"), r)
                    .map_err(bad_reply("GetInstances"))
            })
            .collect()
    }
}
