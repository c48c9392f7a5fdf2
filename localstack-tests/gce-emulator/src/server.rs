//! HTTP: the `/compute/v1/projects/{project}/...` paths the
//! google-cloud-compute-v1 clients call, and the admin API under
//! `/emulator/v1/`. The compute paths are routed here (not by axum) so that
//! every call is counted, faulted and rate limited in one place.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{Method, StatusCode, Uri, header};
use axum::response::Response;
use axum::routing::{get, post, put};
use serde::Serialize;
use serde_json::Value;
use tokio::task::JoinHandle;

use super::admin::{Fault, ForceHealth, QuotaSetting, SeedInstance};
use super::config::{GceOptions, QuotaGroup};
use super::error::ApiError;
use super::health;
use super::state::{Health, Kind, ListQuery, Mutating, Scope, World};
use super::util::parse_query;

type Shared = Arc<Mutex<World>>;

fn lock(w: &Shared) -> MutexGuard<'_, World> {
    w.lock().unwrap_or_else(PoisonError::into_inner)
}

/// How long `operations/{op}/wait` waits at most (GCE: about 2 minutes).
const WAIT_LIMIT: Duration = Duration::from_secs(120);

/// An emulator serving in this process (the binary, or a test).
pub struct Running {
    pub addr: SocketAddr,
    server: JoinHandle<()>,
    health: JoinHandle<()>,
}

impl Running {
    /// `http://127.0.0.1:PORT`: the compute clients' `with_endpoint`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Until the server stops (it does not by itself).
    pub async fn wait(&mut self) {
        let _ = (&mut self.server).await;
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.server.abort();
        self.health.abort();
    }
}

/// Binds `opts.listen` and serves, with the health checker, until dropped.
pub async fn start(opts: GceOptions) -> anyhow::Result<Running> {
    let world = World::new(opts.clone()).map_err(|e| anyhow!(e))?;
    let listener = tokio::net::TcpListener::bind(&opts.listen)
        .await
        .with_context(|| format!("binding {}", opts.listen))?;
    let addr = listener.local_addr()?;
    let world: Shared = Arc::new(Mutex::new(world));
    let floor = Duration::from_millis(opts.health_check_min_interval_ms);
    let tick = (floor / 4).clamp(Duration::from_millis(5), Duration::from_millis(100));
    let health = tokio::spawn(health::run(world.clone(), tick));
    let app = router(world);
    let server = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("serving: {e}");
        }
    });
    Ok(Running {
        addr,
        server,
        health,
    })
}

pub fn router(world: Shared) -> Router {
    Router::new()
        .route("/emulator/v1/healthz", get(|| async { "ok" }))
        .route("/emulator/v1/config", get(admin_config))
        .route("/emulator/v1/instances", post(admin_seed))
        .route(
            "/emulator/v1/instances/{zone}/{name}",
            axum::routing::delete(admin_delete_instance),
        )
        .route(
            "/emulator/v1/faults",
            post(admin_add_fault).delete(admin_clear_faults),
        )
        .route("/emulator/v1/quotas/{group}", put(admin_set_quota))
        .route("/emulator/v1/health", get(admin_health))
        .route(
            "/emulator/v1/health/{ip}/{port}",
            put(admin_force_health).delete(admin_clear_health),
        )
        .route(
            "/emulator/v1/calls",
            get(admin_calls).delete(admin_reset_calls),
        )
        .route("/emulator/v1/resources", get(admin_resources))
        .route("/emulator/v1/operation-delay", put(admin_operation_delay))
        .fallback(compute)
        .with_state(world)
}

fn json_response<T: Serialize>(status: StatusCode, v: &T) -> Response {
    let body =
        serde_json::to_vec(v).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}").into_bytes());
    let mut r = Response::new(Body::from(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json; charset=UTF-8"),
    );
    r
}

fn error_response(e: &ApiError) -> Response {
    json_response(
        StatusCode::from_u16(e.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        &e.body(),
    )
}

fn reply(r: Result<Value, ApiError>) -> Response {
    match r {
        Ok(v) => json_response(StatusCode::OK, &v),
        Err(e) => error_response(&e),
    }
}

// ---------------------------------------------------------------- compute

/// One compute API call, as routed from its path and HTTP method.
#[derive(Debug)]
enum Call<'a> {
    Regions,
    Region(&'a str),
    Zones,
    Zone(&'a str),
    Network(&'a str),
    Subnetworks(&'a str),
    Subnetwork(&'a str, &'a str),
    Instances(&'a str),
    Instance(&'a str, &'a str),
    UpdateNic(&'a str, &'a str),
    /// `instances.stop` (false) or `instances.start` (true).
    PowerInstance(&'a str, &'a str, bool),
    DeleteInstance(&'a str, &'a str),
    List(Kind, Scope),
    Get(Kind, Scope, &'a str),
    Insert(Kind, Scope),
    Delete(Kind, Scope, &'a str),
    Change(Kind, Scope, &'a str, bool),
    SetLabels(Kind, Scope, &'a str),
    Endpoints(&'a str, &'a str, bool),
    ListEndpoints(&'a str, &'a str),
    OpGet(Scope, &'a str),
    OpWait(Scope, &'a str),
}

fn scope_of(segs: &[&str]) -> Option<Scope> {
    match segs {
        ["global"] => Some(Scope::Global),
        ["regions", r] => Some(Scope::Region(r.to_string())),
        ["zones", z] => Some(Scope::Zone(z.to_string())),
        _ => None,
    }
}

/// The kind's collection in a scope of the right sort.
fn collection(scope: &[&str], coll: &str) -> Option<(Kind, Scope)> {
    let kind = Kind::from_collection(coll)?;
    let scope = scope_of(scope)?;
    let fits = match &scope {
        Scope::Zone(_) => kind.zonal(),
        Scope::Global => kind.global(),
        Scope::Region(_) => !kind.zonal() && !kind.global(),
    };
    fits.then_some((kind, scope))
}

fn route<'a>(method: &Method, segs: &[&'a str]) -> Option<Call<'a>> {
    let (get, post, patch) = (
        method == Method::GET,
        method == Method::POST,
        method == Method::PATCH,
    );
    Some(match segs {
        ["regions"] if get => Call::Regions,
        ["regions", r] if get => Call::Region(r),
        ["zones"] if get => Call::Zones,
        ["zones", z] if get => Call::Zone(z),
        ["global", "networks", n] if get => Call::Network(n),
        ["regions", r, "subnetworks"] if get => Call::Subnetworks(r),
        ["regions", r, "subnetworks", s] if get => Call::Subnetwork(r, s),
        ["zones", z, "instances"] if get => Call::Instances(z),
        ["zones", z, "instances", i] if get => Call::Instance(z, i),
        ["zones", z, "instances", i] if method == Method::DELETE => Call::DeleteInstance(z, i),
        ["zones", z, "instances", i, "updateNetworkInterface"] if patch => Call::UpdateNic(z, i),
        ["zones", z, "instances", i, "stop"] if post => Call::PowerInstance(z, i, false),
        ["zones", z, "instances", i, "start"] if post => Call::PowerInstance(z, i, true),
        [
            "zones",
            z,
            "networkEndpointGroups",
            n,
            "attachNetworkEndpoints",
        ] if post => Call::Endpoints(z, n, true),
        [
            "zones",
            z,
            "networkEndpointGroups",
            n,
            "detachNetworkEndpoints",
        ] if post => Call::Endpoints(z, n, false),
        [
            "zones",
            z,
            "networkEndpointGroups",
            n,
            "listNetworkEndpoints",
        ] if post => Call::ListEndpoints(z, n),
        _ => return generic(method, segs),
    })
}

/// `{scope}/{collection}[/{name}[/setLabels]]` and `{scope}/operations/{op}[/wait]`.
fn generic<'a>(method: &Method, segs: &[&'a str]) -> Option<Call<'a>> {
    let n = if segs.first() == Some(&"global") {
        1
    } else {
        2
    };
    if segs.len() <= n {
        return None;
    }
    let scope = scope_of(&segs[..n])?;
    let (get, post) = (method == Method::GET, method == Method::POST);
    Some(match &segs[n..] {
        ["operations", op] if get => Call::OpGet(scope, op),
        ["operations", op, "wait"] if post => Call::OpWait(scope, op),
        [coll] => {
            let (k, s) = collection(&segs[..n], coll)?;
            match () {
                _ if get => Call::List(k, s),
                _ if post => Call::Insert(k, s),
                _ => return None,
            }
        }
        [coll, name] => {
            let (k, s) = collection(&segs[..n], coll)?;
            match () {
                _ if get => Call::Get(k, s, name),
                _ if method == Method::DELETE => Call::Delete(k, s, name),
                _ if method == Method::PATCH && k.supports_patch() => {
                    Call::Change(k, s, name, false)
                }
                _ if method == Method::PUT && k.supports_update() => Call::Change(k, s, name, true),
                _ => return None,
            }
        }
        [coll, name, "setLabels"] if post => {
            let (k, s) = collection(&segs[..n], coll)?;
            if !k.supports_set_labels() {
                return None;
            }
            Call::SetLabels(k, s, name)
        }
        _ => return None,
    })
}

impl Call<'_> {
    /// As in GCE's discovery document (`networkEndpointGroups.attachNetworkEndpoints`).
    fn method(&self) -> String {
        match self {
            Call::Regions => "regions.list".into(),
            Call::Region(_) => "regions.get".into(),
            Call::Zones => "zones.list".into(),
            Call::Zone(_) => "zones.get".into(),
            Call::Network(_) => "networks.get".into(),
            Call::Subnetworks(_) => "subnetworks.list".into(),
            Call::Subnetwork(..) => "subnetworks.get".into(),
            Call::Instances(_) => "instances.list".into(),
            Call::Instance(..) => "instances.get".into(),
            Call::UpdateNic(..) => "instances.updateNetworkInterface".into(),
            Call::PowerInstance(_, _, false) => "instances.stop".into(),
            Call::PowerInstance(_, _, true) => "instances.start".into(),
            Call::DeleteInstance(..) => "instances.delete".into(),
            Call::List(k, _) => format!("{}.list", k.method_prefix()),
            Call::Get(k, ..) => format!("{}.get", k.method_prefix()),
            Call::Insert(k, _) => format!("{}.insert", k.method_prefix()),
            Call::Delete(k, ..) => format!("{}.delete", k.method_prefix()),
            Call::Change(k, _, _, replace) => format!(
                "{}.{}",
                k.method_prefix(),
                if *replace { "update" } else { "patch" }
            ),
            Call::SetLabels(k, ..) => format!("{}.setLabels", k.method_prefix()),
            Call::Endpoints(_, _, true) => "networkEndpointGroups.attachNetworkEndpoints".into(),
            Call::Endpoints(_, _, false) => "networkEndpointGroups.detachNetworkEndpoints".into(),
            Call::ListEndpoints(..) => "networkEndpointGroups.listNetworkEndpoints".into(),
            Call::OpGet(s, _) => format!("{}.get", s.operations_prefix()),
            Call::OpWait(s, _) => format!("{}.wait", s.operations_prefix()),
        }
    }

    fn group(&self) -> QuotaGroup {
        match self {
            Call::Endpoints(..) | Call::ListEndpoints(..) => QuotaGroup::Endpoints,
            Call::UpdateNic(..)
            | Call::PowerInstance(..)
            | Call::DeleteInstance(..)
            | Call::Insert(..)
            | Call::Delete(..)
            | Call::Change(..)
            | Call::SetLabels(..) => QuotaGroup::Write,
            _ => QuotaGroup::Read,
        }
    }

    fn mutating(&self) -> bool {
        matches!(
            self,
            Call::UpdateNic(..)
                | Call::PowerInstance(..)
                | Call::DeleteInstance(..)
                | Call::Insert(..)
                | Call::Delete(..)
                | Call::Change(..)
                | Call::SetLabels(..)
                | Call::Endpoints(..)
        )
    }

    fn scope(&self) -> Option<Scope> {
        match self {
            Call::Region(r) | Call::Subnetworks(r) | Call::Subnetwork(r, _) => {
                Some(Scope::Region(r.to_string()))
            }
            Call::Zone(z)
            | Call::Instances(z)
            | Call::Instance(z, _)
            | Call::UpdateNic(z, _)
            | Call::PowerInstance(z, ..)
            | Call::DeleteInstance(z, _)
            | Call::Endpoints(z, ..)
            | Call::ListEndpoints(z, _) => Some(Scope::Zone(z.to_string())),
            Call::List(_, s)
            | Call::Get(_, s, _)
            | Call::Insert(_, s)
            | Call::Delete(_, s, _)
            | Call::Change(_, s, ..)
            | Call::SetLabels(_, s, _)
            | Call::OpGet(s, _)
            | Call::OpWait(s, _) => Some(s.clone()),
            _ => None,
        }
    }
}

async fn compute(State(world): State<Shared>, method: Method, uri: Uri, body: Bytes) -> Response {
    let path = uri.path().to_string();
    let q = parse_query(uri.query().unwrap_or(""));
    let not_served = || {
        tracing::warn!(%method, %path, "not served by the emulator");
        lock(&world).count_not_served();
        error_response(&ApiError::new(
            404,
            "notFound",
            format!(
                "The emulator does not serve {method} {path} (see localstack-tests/gce-emulator/GCE_EMULATOR.md)"
            ),
        ))
    };
    let Some(rest) = path.strip_prefix("/compute/v1/projects/") else {
        return not_served();
    };
    let segs: Vec<&str> = rest.trim_end_matches('/').split('/').collect();
    let Some((project, segs)) = segs.split_first() else {
        return not_served();
    };
    let Some(call) = route(&method, segs) else {
        return not_served();
    };
    let started = Instant::now();
    let method_name = call.method();
    let result = {
        let mut w = lock(&world);
        w.advance(started);
        execute(&mut w, &call, project, &q, &body, started)
    };
    let result = match (result, &call) {
        (Ok(_), Call::OpWait(scope, op)) => wait(&world, scope, op, started).await,
        (r, _) => r,
    };
    match &result {
        Ok(_) if call.mutating() => tracing::info!(method = %method_name, "ok"),
        Ok(_) => tracing::debug!(method = %method_name, "ok"),
        Err(e) => tracing::info!(method = %method_name, "{e}"),
    }
    reply(result)
}

fn execute(
    w: &mut World,
    call: &Call,
    project: &str,
    q: &std::collections::HashMap<String, String>,
    body: &[u8],
    now: Instant,
) -> Result<Value, ApiError> {
    let fault = w.admit(&call.method(), call.group(), call.mutating(), now)?;
    w.check_project(project)?;
    if let Some(s) = call.scope() {
        w.check_scope(&s)?;
    }
    let ctx = Mutating {
        now,
        request_id: q.get("requestId").map(String::as_str),
        fault,
    };
    let lq = ListQuery {
        filter: q.get("filter").map(String::as_str),
        max_results: q.get("maxResults").map(String::as_str),
        page_token: q.get("pageToken").map(String::as_str),
    };
    match call {
        Call::Regions => w.regions(),
        Call::Region(r) => w.region(r),
        Call::Zones => w.zones(),
        Call::Zone(z) => w.zone(z),
        Call::Network(n) => w.network(n),
        Call::Subnetworks(r) => w.subnetworks(r, &lq),
        Call::Subnetwork(r, s) => w.subnetwork(r, s),
        Call::Instances(z) => w.instances(z, &lq),
        Call::Instance(z, i) => w.instance(z, i),
        Call::UpdateNic(z, i) => w.update_nic(
            z,
            i,
            q.get("networkInterface").map(String::as_str),
            body,
            ctx,
        ),
        Call::PowerInstance(z, i, start) => w.power_instance(z, i, *start, ctx),
        Call::DeleteInstance(z, i) => w.delete_instance_op(z, i, ctx),
        Call::List(k, s) => w.list(*k, s, &lq),
        Call::Get(k, s, n) => w.get(*k, s, n),
        Call::Insert(k, s) => w.insert(*k, s, body, ctx),
        Call::Delete(k, s, n) => w.delete(*k, s, n, ctx),
        Call::Change(k, s, n, replace) => w.change(*k, s, n, body, *replace, ctx),
        Call::SetLabels(k, s, n) => w.set_labels(*k, s, n, body, ctx),
        Call::Endpoints(z, n, attach) => w.endpoints_change(z, n, body, *attach, ctx),
        Call::ListEndpoints(z, n) => w.list_endpoints(z, n, body, &lq),
        Call::OpGet(s, op) | Call::OpWait(s, op) => w.operation(s, op),
    }
}

/// `operations/{op}/wait`: returns when the operation is DONE (or after
/// [`WAIT_LIMIT`], still running, as GCE does).
async fn wait(
    world: &Shared,
    scope: &Scope,
    op: &str,
    started: Instant,
) -> Result<Value, ApiError> {
    loop {
        {
            let mut w = lock(world);
            let now = Instant::now();
            w.advance(now);
            if w.operation_done(scope, op) || now.duration_since(started) >= WAIT_LIMIT {
                return w.operation(scope, op);
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

// ---------------------------------------------------------------- admin

fn parse_admin<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::invalid(format!("admin request: {e}")))
}

async fn admin_config(State(world): State<Shared>) -> Response {
    json_response(StatusCode::OK, &lock(&world).config())
}

async fn admin_seed(State(world): State<Shared>, body: Bytes) -> Response {
    let r = parse_admin::<SeedInstance>(&body).and_then(|s| {
        let mut w = lock(&world);
        w.advance(Instant::now());
        w.seed_instance(&s)
    });
    reply(r)
}

async fn admin_delete_instance(
    State(world): State<Shared>,
    Path((zone, name)): Path<(String, String)>,
) -> Response {
    let mut w = lock(&world);
    w.advance(Instant::now());
    reply(w.delete_instance(&zone, &name).map(|()| Value::Null))
}

async fn admin_add_fault(State(world): State<Shared>, body: Bytes) -> Response {
    reply(parse_admin::<Fault>(&body).map(|f| {
        lock(&world).add_fault(f);
        Value::Null
    }))
}

async fn admin_clear_faults(State(world): State<Shared>) -> Response {
    lock(&world).clear_faults();
    reply(Ok(Value::Null))
}

async fn admin_set_quota(
    State(world): State<Shared>,
    Path(group): Path<String>,
    body: Bytes,
) -> Response {
    let r = group
        .parse::<QuotaGroup>()
        .map_err(ApiError::invalid)
        .and_then(|g| Ok((g, parse_admin::<QuotaSetting>(&body)?)))
        .map(|(g, s)| {
            lock(&world).set_quota(g, s.per_minute);
            Value::Null
        });
    reply(r)
}

async fn admin_health(State(world): State<Shared>) -> Response {
    json_response(StatusCode::OK, &lock(&world).health_rows())
}

fn ip_port(ip: &str, port: &str) -> Result<(Ipv4Addr, u16), ApiError> {
    let ip = ip
        .parse()
        .map_err(|_| ApiError::invalid(format!("{ip:?} is not an IPv4 address")))?;
    let port = port
        .parse()
        .map_err(|_| ApiError::invalid(format!("{port:?} is not a port")))?;
    Ok((ip, port))
}

async fn admin_force_health(
    State(world): State<Shared>,
    Path((ip, port)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    let r = ip_port(&ip, &port).and_then(|(ip, port)| {
        let f: ForceHealth = parse_admin(&body)?;
        let h = Health::parse(&f.health_state).ok_or_else(|| {
            ApiError::invalid(format!(
                "{:?}: expected HEALTHY, UNHEALTHY, UNKNOWN or DRAINING",
                f.health_state
            ))
        })?;
        lock(&world).force_health(ip, port, Some(h));
        Ok(Value::Null)
    });
    reply(r)
}

async fn admin_clear_health(
    State(world): State<Shared>,
    Path((ip, port)): Path<(String, String)>,
) -> Response {
    reply(ip_port(&ip, &port).map(|(ip, port)| {
        lock(&world).force_health(ip, port, None);
        Value::Null
    }))
}

async fn admin_calls(State(world): State<Shared>) -> Response {
    json_response(StatusCode::OK, &lock(&world).calls())
}

async fn admin_reset_calls(State(world): State<Shared>) -> Response {
    lock(&world).reset_calls();
    reply(Ok(Value::Null))
}

async fn admin_resources(State(world): State<Shared>) -> Response {
    let mut w = lock(&world);
    w.advance(Instant::now());
    match w.resources() {
        Ok(r) => json_response(StatusCode::OK, &r),
        Err(e) => error_response(&e),
    }
}

#[derive(serde::Deserialize)]
struct OperationDelay {
    ms: u64,
}

async fn admin_operation_delay(State(world): State<Shared>, body: Bytes) -> Response {
    reply(parse_admin::<OperationDelay>(&body).map(|d| {
        lock(&world).set_operation_delay(Duration::from_millis(d.ms));
        Value::Null
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        let r = |m: Method, p: &str| {
            let segs: Vec<&str> = p.split('/').collect();
            route(&m, &segs).map(|c| c.method())
        };
        assert_eq!(
            r(
                Method::POST,
                "zones/z/networkEndpointGroups/n/attachNetworkEndpoints"
            )
            .as_deref(),
            Some("networkEndpointGroups.attachNetworkEndpoints")
        );
        assert_eq!(
            r(Method::GET, "regions/r/operations/op").as_deref(),
            Some("regionOperations.get")
        );
        assert_eq!(
            r(Method::POST, "global/operations/op/wait").as_deref(),
            Some("globalOperations.wait")
        );
        assert_eq!(
            r(Method::PUT, "regions/r/backendServices/b").as_deref(),
            Some("regionBackendServices.update")
        );
        assert_eq!(
            r(Method::POST, "regions/r/forwardingRules/f/setLabels").as_deref(),
            Some("forwardingRules.setLabels")
        );
        assert_eq!(r(Method::PUT, "regions/r/targetTcpProxies/t"), None);
        assert_eq!(r(Method::GET, "zones/z/healthChecks"), None);
        assert_eq!(r(Method::GET, "regions/r/networkEndpointGroups"), None);
        assert_eq!(
            r(Method::DELETE, "global/firewalls/f").as_deref(),
            Some("firewalls.delete")
        );
        assert_eq!(
            r(Method::GET, "regions/r/addresses/a").as_deref(),
            Some("addresses.get")
        );
        assert_eq!(
            r(Method::GET, "zones/z/networkEndpointGroups/n").as_deref(),
            Some("networkEndpointGroups.get")
        );
        assert_eq!(
            r(Method::GET, "zones/z/networkEndpointGroups").as_deref(),
            Some("networkEndpointGroups.list")
        );
        assert_eq!(r(Method::GET, "global/operations").as_deref(), None);
    }
}
