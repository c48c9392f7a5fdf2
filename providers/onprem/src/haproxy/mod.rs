//! The reference on-prem provider: HAProxy (>= 2.6) in master-worker mode.
//!
//! Each Service port is a frontend on the load balancer's address (from
//! the configured pool) and a backend whose servers are Pod IP:port.
//! - Backend membership changes only through the runtime API (`add server`,
//!   `set server ... state drain`, `del server`), never with a reload; a
//!   deregistered server drains (no new connections) and is deleted once
//!   its connections are gone or its deregistration delay has passed;
//!   [`HaproxyProvider::converge`] also re-adds registered servers the
//!   running HAProxy lacks.
//! - Frontends and backends appearing, changing or going need a new
//!   configuration: it is checked with `haproxy -c`, written, and applied
//!   by a graceful reload through the master socket (old connections finish
//!   in the old worker).
//! - Every change is written through, atomically, to the state file and to
//!   the configuration rendered from it, before it is applied, so an HAProxy
//!   restart loads exactly what the runtime API was told. A reload that
//!   fails puts the previous files back.
//!
//! HAProxy is run by the operator (e.g. `haproxy -W -S <master socket> -f
//! <config file>` under systemd); this provider owns the configuration file.

mod config;
mod runtime;
mod state;

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context;
use async_trait::async_trait;
use cnlb_provider_core::{
    IpMode, Listener, LoadBalancerIngress, LoadBalancerKey, LoadBalancerProvider, LoadBalancerSpec,
    LoadBalancerStatus, NodeProvider, OwnedLoadBalancer, ProviderError, ResourceIds, Result,
    TargetDelta, TargetHealth, TargetHealthState,
};
use tokio::io::AsyncWriteExt;
use tokio::sync::Mutex;

pub use config::{render, server_name};
pub use runtime::{ServerState, parse_servers_state};
pub use state::{
    ATTR_DEREGISTRATION_DELAY, ATTR_PROXY_PROTOCOL_V2, AddressPool, DEFAULT_DRAIN_SECONDS,
    ID_ADDRESS, LbState, State, proxy_name,
};

use crate::client::PluginInfo;
use crate::inventory::Inventory;
use crate::proto::Capability;
use crate::server::Plugin;
use runtime::{AdminState, Cli, Reply};

/// Where HAProxy and the provider's files are.
#[derive(Debug, Clone)]
pub struct HaproxyConfig {
    /// The configuration file HAProxy is started with; owned by the provider.
    pub config_file: PathBuf,
    /// The provider's state (JSON); the configuration is rendered from it.
    pub state_file: PathBuf,
    /// The worker's admin socket (`stats socket`, written into the
    /// configuration by the provider).
    pub runtime_socket: PathBuf,
    /// The master CLI socket (`haproxy -W -S <path>`), for reloads.
    pub master_socket: PathBuf,
    /// The haproxy binary, to check configurations before writing them.
    pub haproxy_bin: PathBuf,
    /// Frontend addresses: what Services get as `status.loadBalancer.ingress.ip`.
    pub address_pool: AddressPool,
    /// How long a reload may take before it counts as failed.
    pub reload_timeout: Duration,
    /// The machines behind Nodes, listed by the operator (see
    /// [`Inventory`]): the plugin's Node part. `None`: it has none.
    pub inventory: Option<PathBuf>,
}

pub struct HaproxyProvider {
    config: HaproxyConfig,
    runtime: Cli,
    master: Cli,
    /// Held for the whole of each call: one HAProxy, one writer.
    state: Mutex<State>,
    inventory: Option<Inventory>,
}

fn io_error(operation: &str, path: &Path) -> impl Fn(std::io::Error) -> ProviderError {
    let operation = format!("{operation} {}", path.display());
    move |e| ProviderError::cloud(operation.clone(), e.to_string(), true)
}

impl HaproxyProvider {
    /// Loads the state file (none: nothing managed yet) and brings the
    /// configuration file in line with it, reloading a running HAProxy if
    /// the file changed. An HAProxy that is not running loads it when it
    /// starts.
    pub async fn open(config: HaproxyConfig) -> anyhow::Result<HaproxyProvider> {
        let state = match tokio::fs::read(&config.state_file).await {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .with_context(|| format!("reading {}", config.state_file.display()))?,
            Err(e) if e.kind() == ErrorKind::NotFound => State::default(),
            Err(e) => {
                return Err(e).with_context(|| format!("reading {}", config.state_file.display()));
            }
        };
        let inventory = config.inventory.as_ref().map(Inventory::new);
        if let Some(inventory) = &inventory
            && let Err(e) = inventory.machines().await
        {
            // Load balancing does not need it: serve, and fail GetInstances
            // with this error until the file is fixed.
            tracing::warn!(error = %e, "the inventory cannot be used yet");
        }
        let provider = HaproxyProvider {
            runtime: Cli::new(&config.runtime_socket),
            master: Cli::new(&config.master_socket),
            config,
            state: Mutex::new(state),
            inventory,
        };
        let state = provider.state.lock().await.clone();
        let text = render(&state, &provider.config.runtime_socket);
        let on_disk = tokio::fs::read_to_string(&provider.config.config_file)
            .await
            .ok();
        if on_disk.as_deref() != Some(text.as_str()) {
            provider.check_config(&text).await?;
            provider.write_files(&state, &text).await?;
            if provider.runtime.worker_pid().await.is_ok() {
                provider.reload().await?;
            }
        }
        Ok(provider)
    }

    /// Brings the running HAProxy's servers in line with the state, for
    /// every backend: adds registered servers it lacks (left out by a crash
    /// or an error between write-through and runtime call) and deletes
    /// drained ones (see the module docs). The plugin calls this
    /// periodically, so a server whose connections ended goes even when no
    /// other change comes. Returns how many servers were added or deleted.
    pub async fn converge(&self) -> Result<usize> {
        let state = self.state.lock().await;
        let mut changed = 0;
        for lb in state.load_balancers.values() {
            for listener in &lb.spec.listeners {
                changed += self.converge_backend(lb, listener.port).await?;
            }
        }
        Ok(changed)
    }

    /// `haproxy -c` on `text`: what HAProxy would reject is never written.
    async fn check_config(&self, text: &str) -> Result<()> {
        let path = sibling(&self.config.config_file, "check");
        write_atomic(&path, text.as_bytes())
            .await
            .map_err(io_error("writing", &path))?;
        let out = tokio::process::Command::new(&self.config.haproxy_bin)
            .args(["-c", "-q", "-f"])
            .arg(&path)
            .stdin(Stdio::null())
            .output()
            .await
            .map_err(io_error("running", &self.config.haproxy_bin));
        let _ = tokio::fs::remove_file(&path).await;
        let out = out?;
        if out.status.success() {
            return Ok(());
        }
        Err(ProviderError::invalid(
            "spec",
            format!(
                "HAProxy rejects the configuration: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ))
    }

    /// State first, then the configuration rendered from it, each atomically.
    async fn write_files(&self, state: &State, text: &str) -> Result<()> {
        let json = serde_json::to_vec_pretty(state)
            .map_err(|e| ProviderError::cloud("encoding state", e.to_string(), false))?;
        write_atomic(&self.config.state_file, &json)
            .await
            .map_err(io_error("writing", &self.config.state_file))?;
        write_atomic(&self.config.config_file, text.as_bytes())
            .await
            .map_err(io_error("writing", &self.config.config_file))
    }

    /// Graceful reload through the master socket; done when a new worker
    /// answers on the runtime socket.
    async fn reload(&self) -> Result<()> {
        let old = self.runtime.worker_pid().await?;
        self.master.run("reload").await?;
        let deadline = Instant::now() + self.config.reload_timeout;
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if let Ok(pid) = self.runtime.worker_pid().await
                && pid != old
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(ProviderError::cloud(
                    "reload",
                    format!(
                        "HAProxy started no new worker within {:?} (see its log)",
                        self.config.reload_timeout
                    ),
                    true,
                ));
            }
        }
    }

    /// Makes `next` the state: written through to the files, then, when
    /// `reload` and the configuration changed, applied by a reload. If the
    /// reload fails the previous files are restored (and HAProxy reloaded
    /// with them, to leave the master's wait mode), so they always match
    /// what HAProxy runs or will run after a restart.
    async fn commit(&self, state: &mut State, next: State, reload: bool) -> Result<()> {
        let socket = &self.config.runtime_socket;
        let (old_text, new_text) = (render(state, socket), render(&next, socket));
        let changed = old_text != new_text;
        if reload && changed {
            self.check_config(&new_text).await?;
        }
        self.write_files(&next, &new_text).await?;
        if reload
            && changed
            && let Err(err) = self.reload().await
        {
            self.write_files(state, &old_text).await?;
            if let Err(again) = self.master.run("reload").await {
                tracing::warn!(error = %again, "reloading HAProxy with the restored configuration");
            }
            return Err(err);
        }
        *state = next;
        Ok(())
    }

    /// Stops new connections to a server (existing ones finish).
    async fn drain(&self, backend: &str, addr: SocketAddr) -> Result<()> {
        let command = runtime::set_server_state(backend, &server_name(addr), AdminState::Drain);
        match runtime::parse_reply(&self.runtime.run(&command).await?) {
            Reply::Done | Reply::NoSuchServer => Ok(()),
            other => Err(failed(backend, &command, other)),
        }
    }

    /// Adds a server (or takes back one that is draining), health-checked.
    async fn add(&self, backend: &str, addr: SocketAddr, args: &str) -> Result<()> {
        let name = server_name(addr);
        let command = runtime::add_server(backend, &name, &config::addr(addr), args);
        match runtime::parse_reply(&self.runtime.run(&command).await?) {
            Reply::Done | Reply::AlreadyExists => {}
            other => return Err(failed(backend, &command, other)),
        }
        for command in [
            runtime::enable_health(backend, &name),
            runtime::set_server_state(backend, &name, AdminState::Ready),
        ] {
            match runtime::parse_reply(&self.runtime.run(&command).await?) {
                Reply::Done => {}
                other => return Err(failed(backend, &command, other)),
            }
        }
        Ok(())
    }

    /// Converges the backend of the listener on `port`: adds registered
    /// servers HAProxy lacks; deletes unregistered ones that have no
    /// connections left or have drained longer than the deregistration
    /// delay, and drains any such server still in service. Returns how many
    /// servers were added or deleted.
    async fn converge_backend(&self, lb: &LbState, port: u16) -> Result<usize> {
        let backend = lb.proxy_name(port);
        let registered = lb.servers.get(&port).cloned().unwrap_or_default();
        let servers = parse_servers_state(
            &self
                .runtime
                .run(&runtime::show_servers_state(&backend))
                .await?,
        )?;
        let mut added = 0;
        for addr in &registered {
            if !servers.iter().any(|s| s.addr == *addr) {
                self.add(&backend, *addr, &config::server_args(lb)).await?;
                added += 1;
            }
        }
        let stale: Vec<ServerState> = servers
            .into_iter()
            .filter(|s| !registered.contains(&s.addr))
            .collect();
        if stale.is_empty() {
            return Ok(added);
        }
        let sessions =
            runtime::parse_sessions(&self.runtime.run(&runtime::show_stat(&backend)).await?);
        let mut changed = added;
        for server in stale {
            if !server.draining() && !server.in_maintenance() {
                self.drain(&backend, server.addr).await?;
                continue;
            }
            let idle = sessions.get(&server.name).is_none_or(|&n| n == 0);
            if !idle && server.seconds_since_change < lb.drain_seconds() {
                continue;
            }
            let mut commands = vec![runtime::set_server_state(
                &backend,
                &server.name,
                AdminState::Maint,
            )];
            if !idle {
                commands.push(runtime::shutdown_sessions(&backend, &server.name));
            }
            commands.push(runtime::del_server(&backend, &server.name));
            for command in commands {
                match runtime::parse_reply(&self.runtime.run(&command).await?) {
                    Reply::Done | Reply::NoSuchServer => {}
                    // Connections still closing: the next pass deletes it.
                    Reply::InUse => break,
                    other => return Err(failed(&backend, &command, other)),
                }
                if command.starts_with("del server") {
                    changed += 1;
                }
            }
        }
        Ok(changed)
    }
}

fn failed(backend: &str, command: &str, reply: Reply) -> ProviderError {
    match reply {
        Reply::NoSuchBackend => ProviderError::NotFound {
            resource: format!("HAProxy backend {backend}"),
        },
        other => ProviderError::cloud(
            runtime::verb(command),
            format!("{command}: {other:?}"),
            true,
        ),
    }
}

/// `<dir>/.<name>.<suffix>`: a temporary file on the same file system.
fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.{suffix}"))
}

/// Write to a temporary file, sync, rename: readers see the old or the new
/// content, never a part.
async fn write_atomic(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let tmp = sibling(path, "tmp");
    let mut file = tokio::fs::File::create(&tmp).await?;
    file.write_all(contents).await?;
    file.sync_all().await?;
    drop(file);
    tokio::fs::rename(&tmp, path).await
}

fn not_found(key: &LoadBalancerKey) -> ProviderError {
    ProviderError::NotFound {
        resource: format!("load balancer of {key}"),
    }
}

#[async_trait]
impl LoadBalancerProvider for HaproxyProvider {
    fn name(&self) -> &str {
        "haproxy"
    }

    async fn ensure_load_balancer(
        &self,
        spec: &LoadBalancerSpec,
        _known: &ResourceIds,
    ) -> Result<LoadBalancerStatus> {
        let mut state = self.state.lock().await;
        let next = state.ensure(spec, &self.config.address_pool)?;
        if next != *state {
            self.commit(&mut state, next, true).await?;
        }
        let lb = state.get(&spec.key).ok_or_else(|| not_found(&spec.key))?;
        Ok(LoadBalancerStatus {
            // HAProxy proxies: in-cluster clients must go through it too.
            ingress: vec![LoadBalancerIngress {
                hostname: None,
                ip: Some(lb.address),
                ip_mode: Some(IpMode::Proxy),
            }],
            ids: lb.ids(),
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
        if delta.is_empty() {
            return Ok(());
        }
        let mut state = self.state.lock().await;
        let lb = state.get(key).ok_or_else(|| not_found(key))?;
        let port = lb
            .listener(listener)
            .ok_or_else(|| ProviderError::NotFound {
                resource: format!("listener on port {} of {key}", listener.port),
            })?
            .port;
        let backend = lb.proxy_name(port);
        let args = config::server_args(lb);
        let mut next = state.clone();
        if let Some(servers) = next
            .load_balancers
            .get_mut(&key.short_name())
            .and_then(|lb| lb.servers.get_mut(&port))
        {
            for t in &delta.deregister {
                servers.remove(&t.addr());
            }
            servers.extend(delta.register.iter().map(|t| t.addr()));
        }
        // Written through first: from here on a restart has the new members.
        self.commit(&mut state, next, false).await?;
        // Draining first, so a terminating Pod stops getting new
        // connections before anything else happens.
        for t in &delta.deregister {
            self.drain(&backend, t.addr()).await?;
        }
        for t in &delta.register {
            self.add(&backend, t.addr(), &args).await?;
        }
        let lb = state.get(key).ok_or_else(|| not_found(key))?;
        self.converge_backend(lb, port).await?;
        Ok(())
    }

    async fn target_health(
        &self,
        key: &LoadBalancerKey,
        _known: &ResourceIds,
    ) -> Result<Vec<TargetHealth>> {
        let state = self.state.lock().await;
        let lb = state.get(key).ok_or_else(|| not_found(key))?;
        let mut health = Vec::new();
        for listener in &lb.spec.listeners {
            let backend = lb.proxy_name(listener.port);
            let registered = lb.servers.get(&listener.port).cloned().unwrap_or_default();
            let servers = parse_servers_state(
                &self
                    .runtime
                    .run(&runtime::show_servers_state(&backend))
                    .await?,
            )?;
            for server in &servers {
                let (state, reason) = server.health(registered.contains(&server.addr));
                health.push(TargetHealth {
                    listener: listener.name.clone(),
                    ip: server.addr.ip(),
                    port: server.addr.port(),
                    state,
                    reason,
                });
            }
            // Registered but not (yet) in the running HAProxy.
            for addr in registered
                .iter()
                .filter(|a| !servers.iter().any(|s| s.addr == **a))
            {
                health.push(TargetHealth {
                    listener: listener.name.clone(),
                    ip: addr.ip(),
                    port: addr.port(),
                    state: TargetHealthState::Unavailable,
                    reason: Some("not in the running HAProxy".into()),
                });
            }
        }
        Ok(health)
    }

    async fn delete_load_balancer(
        &self,
        key: &LoadBalancerKey,
        _known: &ResourceIds,
    ) -> Result<()> {
        let mut state = self.state.lock().await;
        if state.get(key).is_none() {
            return Ok(());
        }
        let next = state.without(key);
        self.commit(&mut state, next, true).await
    }

    async fn list_owned(&self, cluster: &str) -> Result<Vec<OwnedLoadBalancer>> {
        Ok(self.state.lock().await.owned(cluster))
    }
}

#[async_trait]
impl Plugin for HaproxyProvider {
    fn info(&self) -> PluginInfo {
        PluginInfo {
            name: self.name().to_string(),
            vendor_version: env!("CARGO_PKG_VERSION").to_string(),
            capabilities: vec![
                Capability::ProtocolTcp,
                Capability::SourceRanges,
                Capability::HealthCheckHttp,
                Capability::HealthCheckHttps,
                Capability::BackendDrain,
            ],
        }
    }

    /// Ready when both the worker and the master answer.
    async fn probe(&self) -> Result<()> {
        self.runtime.worker_pid().await?;
        self.master.run("show proc").await?;
        Ok(())
    }

    fn nodes(&self) -> Option<&dyn NodeProvider> {
        self.inventory.as_ref().map(|i| i as &dyn NodeProvider)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temporary_files_sit_beside_the_target() {
        assert_eq!(
            sibling(Path::new("/etc/haproxy/cnlb.cfg"), "tmp"),
            PathBuf::from("/etc/haproxy/.cnlb.cfg.tmp")
        );
    }

    #[tokio::test]
    async fn write_atomic_replaces_content() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("haproxy.cfg");
        write_atomic(&path, b"one").await.unwrap();
        write_atomic(&path, b"two").await.unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
