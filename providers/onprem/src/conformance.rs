//! A conformance suite any plugin can run against itself, through the
//! protocol (so a plugin in any language is checked the same way): an
//! in-process provider is served first (see [`crate::server::serve`]).
//!
//! It creates one load balancer of a cluster name only it uses, drives it
//! through ensure, backend deltas, health and garbage-collection listing,
//! and deletes it. `backends` must be addresses the load balancer can
//! reach; with `expect_healthy` they must accept TCP connections on them,
//! and the suite waits for the plugin to report them healthy.
//!
//! A plugin that advertises `CAPABILITY_NODES` has its Node part checked
//! too (answers in order, a Node it does not know is not found, `nodes` are
//! found by name and again by the provider ID it gave them); one that does
//! not must refuse `GetInstances` with an error, never answer "not found"
//! (which would delete every Node).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use cnlb_provider_core::{
    Listener, LoadBalancerKey, LoadBalancerProvider, LoadBalancerSpec, NodeProvider, NodeRef,
    Protocol, ProviderError, ResourceIds, RetryPolicy, Target, TargetDelta, TargetHealthState,
    TargetState, registered_targets,
};
use futures::StreamExt;

use crate::client::{GrpcProvider, PluginInfo};
use crate::proto::Capability;

/// What the suite needs from the caller.
#[derive(Debug, Clone)]
pub struct Config {
    /// A cluster name no other load balancer of the plugin uses.
    pub cluster: String,
    /// The frontend port of the one listener.
    pub port: u16,
    /// At least two backend addresses.
    pub backends: Vec<SocketAddr>,
    /// Wait until every registered backend is reported healthy.
    pub expect_healthy: bool,
    /// How long health may take to settle.
    pub timeout: Duration,
    /// Names of Nodes whose machines the plugin's Node part knows (may be
    /// empty; unused without `CAPABILITY_NODES`).
    pub nodes: Vec<String>,
}

/// A failed check: which one, and what was seen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("conformance check {check:?} failed: {message}")]
pub struct Failure {
    pub check: &'static str,
    pub message: String,
}

fn fail(check: &'static str, message: impl Into<String>) -> Failure {
    Failure {
        check,
        message: message.into(),
    }
}

/// `Err(e)` of a provider call as a failure of `check`.
fn call<T>(check: &'static str, r: Result<T, ProviderError>) -> Result<T, Failure> {
    r.map_err(|e| fail(check, format!("unexpected error: {e}")))
}

/// The spec the suite creates.
pub fn spec(config: &Config) -> LoadBalancerSpec {
    let key = LoadBalancerKey::new(&config.cluster, "conformance", "lb", "uid-conformance-1");
    let mut spec = LoadBalancerSpec::new(key);
    spec.listeners.push(listener(config));
    spec.health_check.interval = Duration::from_secs(1);
    spec.health_check.timeout = Duration::from_secs(1);
    spec.health_check.healthy_threshold = 1;
    spec.health_check.unhealthy_threshold = 1;
    spec
}

fn listener(config: &Config) -> Listener {
    Listener {
        name: "tcp".into(),
        protocol: Protocol::Tcp,
        port: config.port,
        target_port: config.backends.first().map_or(1, SocketAddr::port),
    }
}

/// Runs every check in order and returns their names, or the first failure.
/// Leaves nothing behind when it passes.
pub async fn run(plugin: &GrpcProvider, config: &Config) -> Result<Vec<&'static str>, Failure> {
    let mut passed = Vec::new();
    if config.backends.len() < 2 {
        return Err(fail("config", "needs at least two backends"));
    }
    let spec = spec(config);
    let key = spec.key.clone();
    let listener = listener(config);

    let info = call("info", plugin.info().await)?;
    if info.name.is_empty() {
        return Err(fail("info", "GetInfo returned an empty name"));
    }
    call("probe", plugin.probe().await)?;
    passed.push("info and probe");
    passed.extend(check_nodes(plugin, config, &info).await?);

    // A spec no provider can build is a user error, and creates nothing.
    let mut bad = spec.clone();
    bad.listeners.clear();
    match plugin.ensure_load_balancer(&bad, &ResourceIds::new()).await {
        Err(e) if e.retry_policy() == RetryPolicy::AwaitChange && e.is_user_error() => {}
        other => {
            return Err(fail(
                "invalid spec",
                format!("expected InvalidSpec, got {other:?}"),
            ));
        }
    }
    if !call("invalid spec", plugin.list_owned(&config.cluster).await)?.is_empty() {
        return Err(fail(
            "invalid spec",
            "an invalid spec created a load balancer",
        ));
    }
    passed.push("invalid spec is a user error");

    let status = call(
        "ensure",
        plugin
            .ensure_load_balancer(&spec, &ResourceIds::new())
            .await,
    )?;
    if status.ingress.is_empty() {
        return Err(fail("ensure", "no ingress address"));
    }
    let again = call(
        "ensure",
        plugin.ensure_load_balancer(&spec, &status.ids).await,
    )?;
    // Lost IDs: found by key, not created twice.
    let lost = call(
        "ensure",
        plugin
            .ensure_load_balancer(&spec, &ResourceIds::new())
            .await,
    )?;
    if again != status || lost != status {
        return Err(fail(
            "ensure",
            format!("not idempotent: {status:?}, then {again:?}, then {lost:?}"),
        ));
    }
    passed.push("ensure is idempotent");
    let ids = status.ids.clone();

    let owned = call("list", plugin.list_owned(&config.cluster).await)?;
    if owned.len() != 1 || owned[0].key != key {
        return Err(fail(
            "list",
            format!("expected exactly {key}, got {owned:?}"),
        ));
    }
    if call(
        "list",
        plugin
            .list_owned(&format!("{}-other", config.cluster))
            .await,
    )?
    .iter()
    .any(|o| o.key == key)
    {
        return Err(fail("list", "listed under another cluster"));
    }
    passed.push("list for garbage collection");

    // Register all, then again (idempotent).
    let all: Vec<Target> = config
        .backends
        .iter()
        .map(|a| Target::new(a.ip(), a.port()))
        .collect();
    let register = TargetDelta {
        register: all.clone(),
        deregister: Vec::new(),
    };
    call(
        "register",
        plugin.sync_targets(&key, &listener, &register, &ids).await,
    )?;
    call(
        "register",
        plugin.sync_targets(&key, &listener, &register, &ids).await,
    )?;
    expect_registered(plugin, &key, &ids, &listener, &config.backends, "register").await?;
    passed.push("register backends");

    if config.expect_healthy {
        let deadline = tokio::time::Instant::now() + config.timeout;
        let mut watch = call(
            "health watch",
            plugin.watch_backend_health(&key, &ids).await,
        )?;
        loop {
            let next = tokio::time::timeout_at(deadline, watch.next()).await;
            let snapshot = match next {
                Ok(Some(snapshot)) => call("health watch", snapshot)?,
                Ok(None) => return Err(fail("health watch", "stream ended")),
                Err(_) => return Err(fail("health watch", "backends not healthy in time")),
            };
            let healthy = snapshot
                .iter()
                .filter(|h| h.state == TargetHealthState::Healthy)
                .count();
            if healthy == config.backends.len() {
                break;
            }
        }
        passed.push("health watch reports healthy backends");
    }

    // A terminating backend is drained: it leaves the registered set.
    let (gone, kept) = config.backends.split_at(1);
    let mut terminating = Target::new(gone[0].ip(), gone[0].port());
    terminating.state = TargetState {
        ready: false,
        serving: true,
        terminating: true,
    };
    let drain = TargetDelta {
        register: Vec::new(),
        deregister: vec![terminating],
    };
    call(
        "deregister",
        plugin.sync_targets(&key, &listener, &drain, &ids).await,
    )?;
    call(
        "deregister",
        plugin.sync_targets(&key, &listener, &drain, &ids).await,
    )?;
    expect_registered(plugin, &key, &ids, &listener, kept, "deregister").await?;
    passed.push("deregister drains");

    // Unknown load balancer: backends cannot be added to it.
    let mut missing = key.clone();
    missing.uid = "uid-conformance-missing".into();
    match plugin
        .sync_targets(&missing, &listener, &register, &ids)
        .await
    {
        Err(ProviderError::NotFound { .. }) => {}
        other => {
            return Err(fail(
                "not found",
                format!("expected NotFound, got {other:?}"),
            ));
        }
    }
    passed.push("backends of a missing load balancer are not found");

    call("delete", plugin.delete_load_balancer(&key, &ids).await)?;
    call("delete", plugin.delete_load_balancer(&key, &ids).await)?;
    call(
        "delete",
        plugin
            .delete_load_balancer(&missing, &ResourceIds::new())
            .await,
    )?;
    if !call("delete", plugin.list_owned(&config.cluster).await)?.is_empty() {
        return Err(fail("delete", "still listed after delete"));
    }
    match plugin.target_health(&key, &ids).await {
        Err(ProviderError::NotFound { .. }) => {}
        other => return Err(fail("delete", format!("health after delete: {other:?}"))),
    }
    passed.push("delete, also of what does not exist");
    Ok(passed)
}

/// The registered (non-draining) backends are exactly `want`.
async fn expect_registered(
    plugin: &GrpcProvider,
    key: &LoadBalancerKey,
    ids: &ResourceIds,
    listener: &Listener,
    want: &[SocketAddr],
    check: &'static str,
) -> Result<(), Failure> {
    let health = call(check, plugin.target_health(key, ids).await)?;
    let have: BTreeSet<SocketAddr> = registered_targets(&health, &listener.name)
        .iter()
        .map(Target::addr)
        .collect();
    let want: BTreeSet<SocketAddr> = want.iter().copied().collect();
    if have != want {
        return Err(fail(
            check,
            format!("registered {have:?}, expected {want:?}"),
        ));
    }
    Ok(())
}

/// The Node part: checked when advertised, refused when not.
async fn check_nodes(
    plugin: &GrpcProvider,
    config: &Config,
    info: &PluginInfo,
) -> Result<Vec<&'static str>, Failure> {
    let absent = NodeRef::named(format!("{}-no-such-node", config.cluster));
    if !info.capabilities.contains(&Capability::Nodes) {
        return match plugin.instances(std::slice::from_ref(&absent)).await {
            Err(e) if e.retry_policy() == RetryPolicy::AwaitChange => {
                Ok(vec!["no Node part: GetInstances is refused"])
            }
            other => Err(fail(
                "no Node part",
                format!("without CAPABILITY_NODES GetInstances must fail for good, got {other:?}"),
            )),
        };
    }
    let check = "nodes by name";
    let mut asked: Vec<NodeRef> = config.nodes.iter().map(NodeRef::named).collect();
    asked.insert(asked.len() / 2, absent.clone());
    let found = call(check, plugin.instances(&asked).await)?;
    if found.len() != asked.len() {
        return Err(fail(
            check,
            format!("{} results for {} Nodes", found.len(), asked.len()),
        ));
    }
    let mut by_id = Vec::new();
    for (node, instance) in asked.iter().zip(&found) {
        match instance {
            None if *node == absent => {}
            Some(i) if *node != absent && !i.metadata.provider_id.is_empty() => {
                // Found again by the provider ID it gave, whatever the name.
                by_id.push((
                    NodeRef {
                        name: format!("{}-renamed", node.name),
                        provider_id: Some(i.metadata.provider_id.clone()),
                        internal_ips: Vec::new(),
                    },
                    i.clone(),
                ));
            }
            other => {
                return Err(fail(check, format!("Node {}: got {other:?}", node.name)));
            }
        }
    }
    let check = "nodes by provider ID";
    let asked: Vec<NodeRef> = by_id.iter().map(|(n, _)| n.clone()).collect();
    let again = call(check, plugin.instances(&asked).await)?;
    for ((node, want), got) in by_id.iter().zip(&again) {
        if got.as_ref() != Some(want) {
            return Err(fail(
                check,
                format!("{node:?}: expected {want:?}, got {got:?}"),
            ));
        }
    }
    if again.len() != by_id.len() {
        return Err(fail(check, "a result per Node"));
    }
    Ok(vec![
        "Node part: results in order, unknown Nodes not found",
        "Node part: found by provider ID",
    ])
}
