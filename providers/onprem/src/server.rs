//! Serves any [`LoadBalancerProvider`] over the plugin protocol, so the same
//! provider code runs in the controller's process or behind a socket.
//!
//! The core trait has no notion of plugin metadata, readiness or health
//! streams; [`Plugin`] adds the first two (with defaults) and an optional
//! Node part (a [`NodeProvider`], served as `GetInstances` and advertised
//! as `CAPABILITY_NODES`), and the server turns `target_health` into
//! `WatchBackendHealth` by polling it and sending a snapshot whenever it
//! changed.

use std::fs::Permissions;
use std::os::unix::fs::PermissionsExt;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use cnlb_provider_core::{
    LoadBalancerKey, LoadBalancerProvider, NodeProvider, ProviderError, ResourceIds, Result,
    TargetDelta, TargetHealth,
};
use futures::Stream;
use tonic::{Request, Response, Status};

use crate::client::PluginInfo;
use crate::convert;
use crate::endpoint::PluginEndpoint;
use crate::proto;
use crate::proto::load_balancer_provider_server::{
    LoadBalancerProvider as ProviderService, LoadBalancerProviderServer,
};
use crate::status::to_status;
use crate::tls::ServerTls;

/// How often `WatchBackendHealth` asks the provider for target health.
pub const DEFAULT_HEALTH_POLL: Duration = Duration::from_secs(1);

/// A provider as a plugin: what `GetInfo` and `Probe` answer. Any provider
/// can be served with the defaults: `impl Plugin for MyProvider {}`.
#[async_trait]
pub trait Plugin: LoadBalancerProvider {
    fn info(&self) -> PluginInfo {
        PluginInfo {
            name: self.name().to_string(),
            vendor_version: String::new(),
            capabilities: Vec::new(),
        }
    }

    /// `Ok(())` when the provider can serve calls now; the error says why
    /// not.
    async fn probe(&self) -> Result<()> {
        Ok(())
    }

    /// The machines behind Nodes, if the plugin knows them: served as
    /// `GetInstances` and advertised as `CAPABILITY_NODES` (whatever
    /// [`info`](Plugin::info) says). `None`: `GetInstances` answers
    /// UNIMPLEMENTED.
    fn nodes(&self) -> Option<&dyn NodeProvider> {
        None
    }
}

/// The in-memory provider as a plugin: it answers at once, so what is
/// measured through it is the controller's own cost (cnlb-bench-memory).
impl Plugin for cnlb_provider_core::fake::Fake {}

/// What `GetInfo` advertises: the plugin's capabilities, with
/// `CAPABILITY_NODES` exactly when it has a Node part.
fn capabilities(plugin: &dyn Plugin) -> Vec<proto::Capability> {
    let mut capabilities = plugin.info().capabilities;
    capabilities.retain(|c| *c != proto::Capability::Nodes);
    if plugin.nodes().is_some() {
        capabilities.push(proto::Capability::Nodes);
    }
    capabilities
}

/// The gRPC service for `provider`.
pub fn service(
    provider: Arc<dyn Plugin>,
    health_poll: Duration,
) -> LoadBalancerProviderServer<PluginService> {
    LoadBalancerProviderServer::new(PluginService {
        provider,
        health_poll,
    })
}

/// Serves `provider` on `endpoint` until `shutdown` completes. A unix
/// socket is created mode 0600 (only root, or the plugin's user, may call
/// it), with its directory if missing; a stale socket file from an earlier
/// run is replaced. On TCP, `tls` makes it mutual TLS: only clients with a
/// certificate of its client CA get through the handshake; without it
/// anyone who reaches the port can program the load balancer, which is
/// logged as a warning.
pub async fn serve(
    provider: Arc<dyn Plugin>,
    endpoint: &PluginEndpoint,
    tls: Option<&ServerTls>,
    health_poll: Duration,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let mut server = tonic::transport::Server::builder();
    match (endpoint, tls) {
        (PluginEndpoint::Unix(_), Some(_)) => {
            anyhow::bail!("TLS is for tcp:// endpoints, not {endpoint}")
        }
        (PluginEndpoint::Unix(_), None) => {}
        (PluginEndpoint::Tcp(_), Some(tls)) => {
            server = server.tls_config(tls.config()).context("setting up TLS")?;
        }
        (PluginEndpoint::Tcp(addr), None) => tracing::warn!(
            %addr,
            "serving the plugin protocol over plaintext TCP: anyone who can reach \
             this address can program the load balancer (use mutual TLS)"
        ),
    }
    let router = server.add_service(service(provider, health_poll));
    match endpoint {
        PluginEndpoint::Unix(path) => {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
            }
            match std::fs::remove_file(path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).context(format!("removing {}", path.display())),
            }
            let listener = tokio::net::UnixListener::bind(path)
                .with_context(|| format!("binding {}", path.display()))?;
            std::fs::set_permissions(path, Permissions::from_mode(0o600))
                .with_context(|| format!("restricting {}", path.display()))?;
            let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
            router
                .serve_with_incoming_shutdown(incoming, shutdown)
                .await
                .context("serving the plugin protocol")?;
            let _ = std::fs::remove_file(path);
        }
        PluginEndpoint::Tcp(addr) => router
            .serve_with_shutdown(*addr, shutdown)
            .await
            .with_context(|| format!("serving the plugin protocol on {addr}"))?,
    }
    Ok(())
}

/// The protocol's server side over a [`Plugin`].
pub struct PluginService {
    provider: Arc<dyn Plugin>,
    health_poll: Duration,
}

fn status(err: cnlb_provider_core::ProviderError) -> Status {
    to_status(&err)
}

type HealthStream =
    Pin<Box<dyn Stream<Item = Result<proto::BackendHealthSnapshot, Status>> + Send>>;

#[async_trait]
impl ProviderService for PluginService {
    async fn get_info(
        &self,
        _request: Request<proto::GetInfoRequest>,
    ) -> Result<Response<proto::GetInfoResponse>, Status> {
        let info = self.provider.info();
        Ok(Response::new(proto::GetInfoResponse {
            name: info.name,
            vendor_version: info.vendor_version,
            capabilities: capabilities(self.provider.as_ref())
                .into_iter()
                .map(i32::from)
                .collect(),
        }))
    }

    async fn probe(
        &self,
        _request: Request<proto::ProbeRequest>,
    ) -> Result<Response<proto::ProbeResponse>, Status> {
        let reply = match self.provider.probe().await {
            Ok(()) => proto::ProbeResponse {
                ready: true,
                message: String::new(),
            },
            Err(err) => proto::ProbeResponse {
                ready: false,
                message: err.to_string(),
            },
        };
        Ok(Response::new(reply))
    }

    async fn ensure_load_balancer(
        &self,
        request: Request<proto::EnsureLoadBalancerRequest>,
    ) -> Result<Response<proto::EnsureLoadBalancerResponse>, Status> {
        let request = request.into_inner();
        let spec = convert::spec_from_proto(request.spec).map_err(status)?;
        let known = convert::ids_from_proto(request.known_ids);
        let done = self
            .provider
            .ensure_load_balancer(&spec, &known)
            .await
            .map_err(status)?;
        Ok(Response::new(convert::status_to_proto(&done)))
    }

    async fn update_backends(
        &self,
        request: Request<proto::UpdateBackendsRequest>,
    ) -> Result<Response<proto::UpdateBackendsResponse>, Status> {
        let request = request.into_inner();
        let key = convert::key_from_proto(request.key).map_err(status)?;
        let listener =
            convert::listener_from_proto("listener", request.listener).map_err(status)?;
        let delta = TargetDelta {
            register: convert::targets_from_proto("register", request.register).map_err(status)?,
            deregister: convert::targets_from_proto("deregister", request.deregister)
                .map_err(status)?,
        };
        let known = convert::ids_from_proto(request.known_ids);
        self.provider
            .sync_targets(&key, &listener, &delta, &known)
            .await
            .map_err(status)?;
        Ok(Response::new(proto::UpdateBackendsResponse {}))
    }

    async fn delete_load_balancer(
        &self,
        request: Request<proto::DeleteLoadBalancerRequest>,
    ) -> Result<Response<proto::DeleteLoadBalancerResponse>, Status> {
        let request = request.into_inner();
        let key = convert::key_from_proto(request.key).map_err(status)?;
        let known = convert::ids_from_proto(request.known_ids);
        self.provider
            .delete_load_balancer(&key, &known)
            .await
            .map_err(status)?;
        Ok(Response::new(proto::DeleteLoadBalancerResponse {}))
    }

    async fn list_load_balancers(
        &self,
        request: Request<proto::ListLoadBalancersRequest>,
    ) -> Result<Response<proto::ListLoadBalancersResponse>, Status> {
        let cluster = request.into_inner().cluster;
        let owned = self.provider.list_owned(&cluster).await.map_err(status)?;
        Ok(Response::new(proto::ListLoadBalancersResponse {
            load_balancers: owned.iter().map(convert::owned_to_proto).collect(),
        }))
    }

    async fn get_instances(
        &self,
        request: Request<proto::GetInstancesRequest>,
    ) -> Result<Response<proto::GetInstancesResponse>, Status> {
        let Some(provider) = self.provider.nodes() else {
            return Err(Status::unimplemented(
                "the plugin has no Node part: it does not advertise CAPABILITY_NODES",
            ));
        };
        let nodes = convert::nodes_from_proto(request.into_inner().nodes).map_err(status)?;
        let found = provider.instances(&nodes).await.map_err(status)?;
        if found.len() != nodes.len() {
            return Err(status(ProviderError::cloud(
                "GetInstances",
                format!(
                    "the node provider answered {} results for {} Nodes",
                    found.len(),
                    nodes.len()
                ),
                false,
            )));
        }
        Ok(Response::new(proto::GetInstancesResponse {
            results: found
                .iter()
                .map(|i| convert::instance_result_to_proto(i.as_ref()))
                .collect(),
        }))
    }

    type WatchBackendHealthStream = HealthStream;

    async fn watch_backend_health(
        &self,
        request: Request<proto::WatchBackendHealthRequest>,
    ) -> Result<Response<HealthStream>, Status> {
        let request = request.into_inner();
        let key = convert::key_from_proto(request.key).map_err(status)?;
        let known = convert::ids_from_proto(request.known_ids);
        let watch = HealthWatch {
            provider: Arc::clone(&self.provider),
            key,
            known,
            poll: self.health_poll,
            last: None,
            done: false,
        };
        // Polling stops when the client goes away: the stream is dropped.
        let stream = futures::stream::unfold(watch, |mut watch| async move {
            let item = watch.next().await?;
            Some((item, watch))
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

/// State of one `WatchBackendHealth` stream.
struct HealthWatch {
    provider: Arc<dyn Plugin>,
    key: LoadBalancerKey,
    known: ResourceIds,
    poll: Duration,
    /// The last snapshot sent; `None` before the first.
    last: Option<Vec<TargetHealth>>,
    /// An error was sent: the stream ends.
    done: bool,
}

impl HealthWatch {
    /// The next snapshot that differs from the last one sent, or the error
    /// that ends the stream.
    async fn next(&mut self) -> Option<Result<proto::BackendHealthSnapshot, Status>> {
        if self.done {
            return None;
        }
        loop {
            if self.last.is_some() {
                tokio::time::sleep(self.poll).await;
            }
            let mut health = match self.provider.target_health(&self.key, &self.known).await {
                Ok(health) => health,
                Err(err) => {
                    self.done = true;
                    return Some(Err(to_status(&err)));
                }
            };
            health.sort_by(|a, b| (&a.listener, a.ip, a.port).cmp(&(&b.listener, b.ip, b.port)));
            if self.last.as_ref() != Some(&health) {
                let snapshot = proto::BackendHealthSnapshot {
                    backends: health.iter().map(convert::health_to_proto).collect(),
                };
                self.last = Some(health);
                return Some(Ok(snapshot));
            }
        }
    }
}
