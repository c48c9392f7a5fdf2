//! `cnlb-ccm --provider=aws` against an environment, and the objects the
//! controller tests share.

use std::collections::BTreeSet;
use std::future::Future;
use std::process::Command;
use std::time::{Duration, Instant};

use cnlb_localstack_tests::aws::AwsEndpoints;
use cnlb_localstack_tests::paths::workspace_bin;
use cnlb_localstack_tests::process::Proc;
use cnlb_localstack_tests::{Env, sample_app};
use cnlb_provider_aws::Clients;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;

/// An environment with `nodes` real Nodes and moto, the VPC network of
/// [`super::ec2_network`], and clients of that moto.
pub struct Cluster {
    // Dropped last: the environment outlives the clients.
    pub aws: Clients,
    pub net: super::Network,
    pub client: Client,
    pub env: Env,
}

pub async fn cluster(name: &str, nodes: u8) -> Cluster {
    cluster_with(name, nodes, &[]).await
}

/// [`cluster`] whose Nodes also have `images` (e.g. cnlb-ccm's, to install it).
pub async fn cluster_with(name: &str, nodes: u8, images: &[String]) -> Cluster {
    let nodes = (1..=nodes)
        .map(cnlb_localstack_tests::NodeConfig::numbered)
        .collect();
    let mut builder = Env::builder(name).nodes(nodes).moto();
    for image in images {
        builder = builder.image(image);
    }
    let env = builder.start().await.unwrap();
    let aws = super::clients_for(&env.aws().unwrap()).await;
    let net = super::ec2_network(&aws).await;
    let client = env.kube().unwrap().admin_client().unwrap();
    Cluster {
        aws,
        net,
        client,
        env,
    }
}

/// `cnlb-ccm --provider=<provider>` for cluster `test` against the
/// environment's API server; callers add the provider's flags.
pub fn provider_command(env: &Env, provider: &str) -> Command {
    let mut cmd = Command::new(workspace_bin("cnlb-ccm").unwrap());
    cmd.arg(format!(
        "--kubeconfig={}",
        env.kube().unwrap().kubeconfig.display()
    ))
    .args(["--cluster-name=test", &format!("--provider={provider}")]);
    cmd
}

/// `cnlb-ccm --provider=aws` in `vpc`; callers add leader election,
/// metrics and AWS endpoints.
pub fn command(env: &Env, vpc: &str) -> Command {
    let mut cmd = provider_command(env, "aws");
    cmd.arg(format!("--aws-vpc-id={vpc}"));
    cmd
}

/// cnlb-ccm installed as users install it: the Helm chart of deploy/ (two
/// replicas electing a leader, the chart's ServiceAccount and RBAC,
/// in-cluster configuration), in the host network to reach moto, which the
/// standard AWS variables name. Needs the image: see [`cluster_with`].
pub async fn install(cluster: &Cluster) {
    let env = &cluster.env;
    let cp = env.kube().unwrap();
    let vars: Vec<(String, String)> = env
        .aws()
        .unwrap()
        .env_vars()
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    let mut values = cnlb_localstack_tests::install::ccm_values(
        cp,
        "test",
        "aws",
        "cnlb.dev/nlb",
        &[
            "--aws-write-rate=20/40".into(),
            "--aws-targets-rate=20/40".into(),
        ],
        &vars,
    )
    .unwrap();
    values["aws"] = json!({"vpcId": cluster.net.vpc});
    cnlb_localstack_tests::install::helm_install(cp, &env.dir, "cnlb-ccm", "cnlb-ccm", &values)
        .await
        .unwrap();
    cnlb_localstack_tests::install::wait_deployment_ready(cp, "cnlb-ccm", Duration::from_secs(90))
        .await
        .unwrap();
}

/// Starts the controller (leader election off) with the environment's AWS endpoints.
pub fn spawn(env: &Env, vpc: &str, name: &str) -> Proc {
    spawn_at(env, vpc, name, &env.aws().unwrap())
}

/// [`spawn`] with AWS at `endpoints` (e.g. a fault proxy's).
pub fn spawn_at(env: &Env, vpc: &str, name: &str, endpoints: &AwsEndpoints) -> Proc {
    let mut cmd = command(env, vpc);
    cmd.args(["--leader-elect=false", "--metrics-bind-address=0"])
        // These tests check behaviour; the benchmark measures the default limits.
        .args(["--aws-write-rate=20/40", "--aws-targets-rate=20/40"])
        .envs(endpoints.env_vars());
    Proc::spawn(name, cmd, &env.dir).unwrap()
}

/// Deployment `web` (label app=web) as JSON: `replicas` Pods of the sample
/// app serving port 8080 (named http), rolled out one new Pod before one
/// old one goes (maxSurge 1, maxUnavailable 0), declaring the readiness
/// gate `gate` when given. Tests adjust it before [`create_deployment`].
pub fn web(replicas: i32, gate: Option<&str>) -> serde_json::Value {
    let mut pod_spec = json!({"containers": [sample_app::container("web", &[8080])]});
    if let Some(gate) = gate {
        pod_spec["readinessGates"] = json!([{"conditionType": gate}]);
    }
    json!({
        "metadata": {"name": "web"},
        "spec": {
            "replicas": replicas,
            "strategy": {"rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "selector": {"matchLabels": {"app": "web"}},
            "template": {"metadata": {"labels": {"app": "web"}}, "spec": pod_spec},
        },
    })
}

pub async fn create_deployment(client: &Client, deployment: serde_json::Value) {
    let deployment: Deployment = serde_json::from_value(deployment).unwrap();
    let api: Api<Deployment> = Api::namespaced(client.clone(), "default");
    api.create(&PostParams::default(), &deployment)
        .await
        .unwrap();
}

/// [`web`] without a gate, created.
pub async fn create_web(client: &Client, replicas: i32) {
    create_deployment(client, web(replicas, None)).await;
}

/// [`web`] with readiness gate `gate`, created.
pub async fn create_gated_web(client: &Client, replicas: i32, gate: &str) {
    create_deployment(client, web(replicas, Some(gate))).await;
}

/// Ready endpoint addresses of Service `web`, with the node and zone each names.
pub async fn ready_endpoints(client: &Client) -> BTreeSet<(String, String, String)> {
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), "default");
    let list = slices
        .list(&ListParams::default().labels("kubernetes.io/service-name=web"))
        .await
        .unwrap();
    list.items
        .into_iter()
        .flat_map(|s| s.endpoints.unwrap_or_default())
        .filter(|ep| ep.conditions.as_ref().and_then(|c| c.ready) == Some(true))
        .flat_map(|ep| {
            let (node, zone) = (
                ep.node_name.unwrap_or_default(),
                ep.zone.unwrap_or_default(),
            );
            ep.addresses
                .into_iter()
                .map(move |a| (a, node.clone(), zone.clone()))
        })
        .collect()
}

pub async fn scale(client: &Client, replicas: i32) {
    let api: Api<Deployment> = Api::namespaced(client.clone(), "default");
    let patch = json!({"spec": {"replicas": replicas}});
    api.patch("web", &PatchParams::default(), &Patch::Merge(patch))
        .await
        .unwrap();
}

/// A LoadBalancer Service of class cnlb.dev/nlb in front of app=web.
pub fn service(name: &str, annotations: serde_json::Value) -> Service {
    serde_json::from_value(json!({
        "metadata": {"name": name, "annotations": annotations},
        "spec": {
            "type": "LoadBalancer",
            "loadBalancerClass": "cnlb.dev/nlb",
            "selector": {"app": "web"},
            "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}],
        },
    }))
    .unwrap()
}

/// Creates `count` Services `svc-0`, `svc-1`, ... and returns their names.
pub async fn create_services(services: &Api<Service>, count: usize) -> Vec<String> {
    let names: Vec<String> = (0..count).map(|i| format!("svc-{i}")).collect();
    for name in &names {
        services
            .create(&PostParams::default(), &service(name, json!({})))
            .await
            .unwrap();
    }
    names
}

/// How many Services exist besides `kubernetes`.
pub async fn our_services(services: &Api<Service>) -> kube::Result<usize> {
    let list = services.list(&ListParams::default()).await?;
    Ok(list
        .items
        .iter()
        .filter(|s| s.metadata.name.as_deref() != Some("kubernetes"))
        .count())
}

/// Rolls Deployment web to a new template and calls `measure` every 100 ms
/// until every Pod is new, Ready and among the addresses `measure` reports
/// attached. `measure` returns how many targets serve and which `ip:port`
/// are attached; the result is the fewest that served at any point.
pub async fn roll_out_web<F, Fut>(client: &Client, wait: Duration, mut measure: F) -> usize
where
    F: FnMut() -> Fut,
    Fut: Future<Output = (usize, BTreeSet<String>)>,
{
    // By name: a new Pod may get an IP an old one just released.
    let names = |ps: &[Pod]| -> BTreeSet<String> {
        ps.iter().filter_map(|p| p.metadata.name.clone()).collect()
    };
    let old = names(&web_pods(client).await);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "default");
    let patch = json!({"spec": {"template": {"metadata": {"annotations": {"rollout": "2"}}}}});
    deployments
        .patch("web", &PatchParams::default(), &Patch::Merge(patch))
        .await
        .unwrap();
    let start = Instant::now();
    let mut fewest = usize::MAX;
    loop {
        let (serving, attached) = measure().await;
        fewest = fewest.min(serving);
        let ps = web_pods(client).await;
        assert!(
            start.elapsed() < wait,
            "rollout did not finish: attached {attached:?}\npods:\n{}",
            ps.iter().map(describe_pod).collect::<Vec<_>>().join("\n")
        );
        let done = ps.len() == old.len()
            && names(&ps).is_disjoint(&old)
            && ps.iter().all(|p| pod_condition(p, "Ready"))
            && attached == pod_targets(client).await;
        if done {
            return fewest;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A Pod's name, IP, deletion and conditions, for failure messages.
fn describe_pod(p: &Pod) -> String {
    let conds: Vec<String> = p
        .status
        .as_ref()
        .and_then(|s| s.conditions.clone())
        .unwrap_or_default()
        .iter()
        .map(|c| format!("{}={}", c.type_, c.status))
        .collect();
    format!(
        "{} ip={:?} deleting={} {:?}",
        p.metadata.name.clone().unwrap_or_default(),
        p.status.as_ref().and_then(|s| s.pod_ip.clone()),
        p.metadata.deletion_timestamp.is_some(),
        conds
    )
}

/// True if the Pod's condition `kind` is True.
pub fn pod_condition(pod: &Pod, kind: &str) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == kind && c.status == "True"))
}

/// Service `name`'s condition `type_` in namespace default:
/// (status, reason, message).
pub async fn condition(
    client: &Client,
    name: &str,
    type_: &str,
) -> Option<(String, String, String)> {
    let svc = Api::<Service>::namespaced(client.clone(), "default")
        .get(name)
        .await
        .ok()?;
    svc.status?
        .conditions?
        .into_iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status, c.reason, c.message))
}

/// Every Pod of app=web, deleting ones included.
pub async fn web_pods(client: &Client) -> Vec<Pod> {
    let api: Api<Pod> = Api::namespaced(client.clone(), "default");
    api.list(&ListParams::default().labels("app=web"))
        .await
        .unwrap()
        .items
}

/// Waits until `n` Pods of app=web exist and all are Ready.
pub async fn wait_web_ready(client: &Client, n: usize, wait: Duration) {
    cnlb_localstack_tests::eventually(&format!("{n} Pods of web are Ready"), wait, || async {
        let pods = web_pods(client).await;
        Ok(pods.len() == n && pods.iter().all(|p| pod_condition(p, "Ready")))
    })
    .await
    .unwrap();
}

/// `ip:8080` of every live Pod of app=web.
pub async fn pod_targets(client: &Client) -> BTreeSet<String> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let list = pods
        .list(&ListParams::default().labels("app=web"))
        .await
        .unwrap();
    list.items
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter_map(|p| p.status.as_ref()?.pod_ip.clone())
        .map(|ip| format!("{ip}:8080"))
        .collect()
}

/// `ip:port` of every target registered in a target group.
pub async fn targets_of(aws: &Clients, target_group_arn: &str) -> BTreeSet<String> {
    let health = aws
        .elbv2
        .describe_target_health()
        .target_group_arn(target_group_arn)
        .send()
        .await
        .unwrap();
    health
        .target_health_descriptions()
        .iter()
        .filter_map(|d| d.target())
        .map(|t| format!("{}:{}", t.id().unwrap(), t.port().unwrap()))
        .collect()
}

/// Targets of every target group in the region.
pub async fn all_targets(aws: &Clients) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let tgs = aws.elbv2.describe_target_groups().send().await.unwrap();
    for tg in tgs.target_groups() {
        out.extend(targets_of(aws, tg.target_group_arn().unwrap()).await);
    }
    out
}

/// Number of load balancers and target groups in the region.
pub async fn counts(aws: &Clients) -> (usize, usize) {
    let lbs = aws.elbv2.describe_load_balancers().send().await.unwrap();
    let tgs = aws.elbv2.describe_target_groups().send().await.unwrap();
    (lbs.load_balancers().len(), tgs.target_groups().len())
}

/// Security groups tagged for cluster `test`: the NLBs' frontend groups
/// and the backend group.
pub async fn cluster_security_groups(aws: &Clients) -> usize {
    security_groups_tagged(aws, "tag:cnlb.dev/cluster", "test").await
}

/// The NLBs' frontend security groups (tagged with their Service).
pub async fn owned_security_groups(aws: &Clients) -> usize {
    security_groups_tagged(aws, "tag-key", "cnlb.dev/service").await
}

async fn security_groups_tagged(aws: &Clients, filter: &str, value: &str) -> usize {
    let filter = cnlb_provider_aws::ec2::types::Filter::builder()
        .name(filter)
        .values(value)
        .build();
    let out = aws
        .ec2
        .describe_security_groups()
        .filters(filter)
        .send()
        .await
        .unwrap();
    out.security_groups().len()
}

/// The hostname in `status.loadBalancer.ingress`, once there.
pub async fn hostname(services: &Api<Service>, name: &str) -> Option<String> {
    let svc = services.get(name).await.ok()?;
    svc.status?
        .load_balancer?
        .ingress?
        .into_iter()
        .next()?
        .hostname
}

/// Service `name` in default (port http 80 -> 8080), created as a
/// ClusterIP Service so that its UID is known, and the spec cnlb derives
/// from it (cluster `test`) once it is a LoadBalancer Service: what cnlb
/// names its resources after.
pub async fn cluster_ip_service(
    services: &Api<Service>,
    name: &str,
) -> cnlb_provider_core::LoadBalancerSpec {
    let mut svc = service(name, json!({}));
    let spec = svc.spec.as_mut().unwrap();
    spec.type_ = Some("ClusterIP".into());
    spec.load_balancer_class = None;
    let created = services.create(&PostParams::default(), &svc).await.unwrap();
    let mut as_load_balancer = service(name, json!({}));
    as_load_balancer.metadata = created.metadata;
    cnlb_ccm::annotations::parse_service(&as_load_balancer, "test").unwrap()
}

/// Makes Service `name` a LoadBalancer Service of class cnlb.dev/nlb with
/// `annotations`.
pub async fn make_load_balancer(
    services: &Api<Service>,
    name: &str,
    annotations: serde_json::Value,
) {
    let patch = json!({
        "metadata": {"annotations": annotations},
        "spec": {"type": "LoadBalancer", "loadBalancerClass": "cnlb.dev/nlb"},
    });
    services
        .patch(name, &PatchParams::default(), &Patch::Merge(patch))
        .await
        .unwrap();
}

/// Waits until Service `name` (in default) says that `resource` is not its
/// own: condition LoadBalancerReady False with reason Conflict, and a
/// Warning Event, both naming it, the condition also with `why`.
pub async fn wait_conflict(client: &Client, name: &str, resource: &str, why: &str) {
    let events: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(client.clone(), "default");
    cnlb_localstack_tests::eventually(
        &format!("{name}: a Conflict condition and Event naming {resource}"),
        Duration::from_secs(30),
        || async {
            let conflict = condition(client, name, "cnlb.dev/LoadBalancerReady")
                .await
                .is_some_and(|(status, reason, message)| {
                    status == "False"
                        && reason == "Conflict"
                        && message.contains(resource)
                        && message.contains(why)
                });
            let list = events
                .list(&ListParams::default().fields(&format!("involvedObject.name={name}")))
                .await?;
            let event = list.items.iter().any(|e| {
                e.type_.as_deref() == Some("Warning")
                    && e.reason.as_deref() == Some("SyncLoadBalancerFailed")
                    && e.message.as_deref().is_some_and(|m| m.contains(resource))
            });
            Ok(conflict && event)
        },
    )
    .await
    .unwrap();
}

/// Deletes Services `names` (in default) and waits until they are gone:
/// cnlb's cleanup has finished and removed its finalizer.
pub async fn delete_services(services: &Api<Service>, names: &[&str]) {
    for name in names {
        services
            .delete(name, &kube::api::DeleteParams::default())
            .await
            .unwrap();
    }
    cnlb_localstack_tests::eventually("the Services are gone", Duration::from_secs(30), || async {
        Ok(our_services(services).await? == 0)
    })
    .await
    .unwrap();
}
