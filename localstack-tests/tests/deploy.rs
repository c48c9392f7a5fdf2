#![allow(clippy::unwrap_used)] // test code: a failed call should fail the test

//! What a cluster operator applies (deploy/): the plain manifests go onto a
//! real kube-apiserver and the controller's ServiceAccount can do exactly
//! what cnlb-ccm needs and nothing else; the Helm chart grants the same RBAC
//! rules; the IAM policies list exactly the AWS calls the provider and the
//! vpc-ipam agent make, every mutation conditioned on the ownership tag.
//! The vpc-ipam DaemonSet likewise: its chart renders its manifests, its
//! Pods are created on every Node (tainted ones too) and admitted, they
//! hold no capability and only their four host paths, the conflist is one
//! our plugin accepts, and its ServiceAccount can read Nodes, nothing else.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use cnlb_localstack_tests::{Env, eventually};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::authorization::v1::SelfSubjectAccessReview;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Event, Namespace, Node, Pod, Secret, Service, ServiceAccount};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::events::v1::Event as EventV1;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{
    DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams, PostParams,
};
use kube::discovery::Scope;
use kube::{Api, Client};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(60);
const NS: &str = "kube-system";
const NAME: &str = "cnlb-ccm";
const OWNERSHIP_TAG: &str = "cnlb.dev/cluster";

// ---------------------------------------------------------------- files

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn read(rel: &str) -> String {
    let path = repo().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The documents of a (multi-document) YAML text, empty ones left out.
fn yaml_docs(text: &str, what: &str) -> Vec<Value> {
    let docs: Vec<Value> =
        serde_saphyr::from_multiple(text).unwrap_or_else(|e| panic!("{what}: {e}"));
    docs.into_iter().filter(|d| !d.is_null()).collect()
}

/// Every object of deploy/ccm/*.yaml, in file order (the order to apply them).
fn plain_manifests() -> Vec<Value> {
    manifests_in("deploy/ccm")
}

/// Every object of `<rel>/*.yaml`, in file order (the order to apply them).
fn manifests_in(rel: &str) -> Vec<Value> {
    let dir = repo().join(rel);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no manifests in {}", dir.display());
    files
        .iter()
        .flat_map(|f| {
            let text = std::fs::read_to_string(f).unwrap();
            yaml_docs(&text, &f.display().to_string())
        })
        .collect()
}

fn object<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in the manifests"))
}

/// What a list of RBAC rules grants: (apiGroup, resource, resourceName or
/// "*" for any, verb). Two lists granting the same are equal here whatever
/// their order or grouping.
fn grants(rules: &Value) -> BTreeSet<(String, String, String, String)> {
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| a.iter().map(|s| s.as_str().unwrap().to_string()).collect())
            .unwrap_or_default()
    };
    let mut out = BTreeSet::new();
    for rule in rules.as_array().expect("rules is a list") {
        let names = match strings(&rule["resourceNames"]) {
            n if n.is_empty() => vec!["*".to_string()],
            n => n,
        };
        for group in strings(&rule["apiGroups"]) {
            for resource in strings(&rule["resources"]) {
                for name in &names {
                    for verb in strings(&rule["verbs"]) {
                        out.insert((group.clone(), resource.clone(), name.clone(), verb));
                    }
                }
            }
        }
    }
    assert!(!out.is_empty(), "rules grant nothing: {rules}");
    out
}

// ---------------------------------------------------------------- chart vs plain manifests

fn same_grants(what: &str, chart: &Value, plain: &Value) {
    let (chart, plain) = (grants(chart), grants(plain));
    let only_chart: Vec<_> = chart.difference(&plain).collect();
    let only_plain: Vec<_> = plain.difference(&chart).collect();
    assert!(
        only_chart.is_empty() && only_plain.is_empty(),
        "{what} rules: only the chart grants {only_chart:?}; only deploy/ccm/ grants {only_plain:?}"
    );
}

#[test]
fn chart_grants_the_same_rbac_as_the_plain_manifests() {
    let plain = plain_manifests();
    let chart_rules = yaml_docs(
        &read("deploy/charts/cnlb-ccm/files/rbac-rules.yaml"),
        "rbac-rules.yaml",
    )
    .remove(0);

    same_grants(
        "ClusterRole",
        &chart_rules["clusterRole"],
        &object(&plain, "ClusterRole", NAME)["rules"],
    );
    same_grants(
        "lease Role",
        &chart_rules["leaseRole"],
        &object(&plain, "Role", NAME)["rules"],
    );

    // The chart's template takes its rule lists from that file and nowhere else.
    let template = read("deploy/charts/cnlb-ccm/templates/rbac.yaml");
    assert!(template.contains(r#".Files.Get "files/rbac-rules.yaml""#));
    let rules_keys = template.lines().filter(|l| l.trim() == "rules:").count();
    assert_eq!(
        rules_keys, 2,
        "one ClusterRole and one Role in templates/rbac.yaml"
    );
    assert!(template.contains("toYaml $rules.clusterRole"));
    assert!(template.contains("toYaml $rules.leaseRole"));

    // The Lease the Role lets the controller update is the one it is told to use.
    let role = object(&plain, "Role", NAME);
    let deployment = object(&plain, "Deployment", NAME);
    let args: Vec<&str> = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let lease_names: BTreeSet<String> = grants(&role["rules"])
        .into_iter()
        .filter(|(_, _, _, verb)| verb == "update")
        .map(|(_, _, name, _)| name)
        .collect();
    let lease_name = args
        .iter()
        .find_map(|a| a.strip_prefix("--leader-elect-lease-name="))
        .expect("--leader-elect-lease-name in the Deployment");
    let lease_ns = args
        .iter()
        .find_map(|a| a.strip_prefix("--leader-elect-namespace="))
        .expect("--leader-elect-namespace in the Deployment");
    assert_eq!(lease_names, BTreeSet::from([lease_name.to_string()]));
    assert_eq!(role["metadata"]["namespace"], lease_ns);
    assert!(args.contains(&"--leader-elect=true"), "{args:?}");
}

/// `helm template <release> deploy/charts/<release> <extra>` in kube-system:
/// the objects, or helm's error.
fn helm_template(release: &str, extra: &[&str]) -> Result<Vec<Value>, String> {
    let helm = cnlb_localstack_tests::paths::helm().unwrap();
    let out = std::process::Command::new(&helm)
        .args(["template", release])
        .arg(repo().join("deploy/charts").join(release))
        .args(["--namespace", NS, "--kube-version", "1.36.0"])
        .args(extra)
        .output()
        .unwrap();
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let text = String::from_utf8(out.stdout).unwrap();
    Ok(yaml_docs(&text, "helm template"))
}

/// The chart's default rendering is the plain manifests, object for object.
#[test]
fn chart_default_rendering_is_the_plain_manifests() {
    let rendered = helm_template(NAME, &[]).unwrap();
    same_objects(rendered, plain_manifests(), "deploy/ccm/");
}

fn same_objects(rendered: Vec<Value>, plain: Vec<Value>, dir: &str) {
    let key = |d: &Value| {
        format!(
            "{} {}/{}",
            d["kind"].as_str().unwrap(),
            d["metadata"]["namespace"].as_str().unwrap_or(""),
            d["metadata"]["name"].as_str().unwrap()
        )
    };
    let rendered: BTreeMap<String, Value> = rendered.into_iter().map(|d| (key(&d), d)).collect();
    let plain: BTreeMap<String, Value> = plain.into_iter().map(|d| (key(&d), d)).collect();
    assert_eq!(
        rendered.keys().collect::<Vec<_>>(),
        plain.keys().collect::<Vec<_>>()
    );
    for (k, v) in &plain {
        assert_eq!(&rendered[k], v, "{k}: chart rendering differs from {dir}");
    }
}

/// Every key an example values file sets exists in the chart's values.yaml
/// (Helm ignores unknown keys silently). Maps left empty in values.yaml are
/// free-form (annotations, labels) and are not descended into.
#[test]
fn example_values_set_only_keys_the_chart_has() {
    fn check(path: &str, set: &Value, defaults: &Value) {
        let (Some(set), Some(defaults)) = (set.as_object(), defaults.as_object()) else {
            return;
        };
        if defaults.is_empty() {
            return;
        }
        for (k, v) in set {
            let here = format!("{path}.{k}");
            let default = defaults
                .get(k)
                .unwrap_or_else(|| panic!("{here} is not a value of the chart"));
            check(&here, v, default);
        }
    }
    let defaults = yaml_docs(&read("deploy/charts/cnlb-ccm/values.yaml"), "values.yaml").remove(0);
    for (file, provider) in [
        ("deploy/values/eks.yaml", "aws"),
        ("deploy/values/gke.yaml", "gcp"),
    ] {
        let values = yaml_docs(&read(file), file).remove(0);
        check(file, &values, &defaults);
        assert_eq!(values["provider"], provider, "{file}");
        assert!(
            !values["clusterName"]
                .as_str()
                .unwrap_or_default()
                .is_empty(),
            "{file} names the cluster"
        );
    }
}

// ---------------------------------------------------------------- IAM policy

/// `(client, operation)` of every SDK call made on an `elbv2` or `ec2`
/// client in `src`: `clients.elbv2.describe_tags()`, also across lines.
fn sdk_calls(src: &str) -> BTreeSet<(String, String)> {
    let code: String = src
        .lines()
        .map(|l| l.split("//").next().unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n");
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut out = BTreeSet::new();
    for client in ["elbv2", "ec2"] {
        for (at, _) in code.match_indices(client) {
            let end = at + client.len();
            if code[..at].chars().next_back().is_some_and(ident)
                || code[end..].chars().next().is_some_and(ident)
            {
                continue; // part of another name: aws_sdk_ec2, ec2_client
            }
            let Some(rest) = code[end..].trim_start().strip_prefix('.') else {
                continue; // a path (ec2::types) or a binding, not a call
            };
            let rest = rest.trim_start();
            let op: String = rest.chars().take_while(|c| ident(*c)).collect();
            let called = rest[op.len()..].trim_start().starts_with('(');
            // Client methods that are not API operations.
            if !op.is_empty() && called && !["clone", "config"].contains(&op.as_str()) {
                out.insert((client.to_string(), op));
            }
        }
    }
    out
}

/// describe_load_balancers -> DescribeLoadBalancers, the IAM action's name.
fn pascal(snake: &str) -> String {
    snake
        .split('_')
        .map(|w| {
            let mut c = w.chars();
            c.next()
                .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                .unwrap_or_default()
        })
        .collect()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|x| x == "rs") {
            out.push(path);
        }
    }
}

fn policy() -> Value {
    serde_json::from_str(&read("deploy/aws/iam-policy.json")).unwrap()
}

fn statement_actions(statement: &Value) -> Vec<String> {
    match &statement["Action"] {
        Value::String(a) => vec![a.clone()],
        Value::Array(a) => a.iter().map(|a| a.as_str().unwrap().to_string()).collect(),
        other => panic!("Action must be a string or a list: {other}"),
    }
}

#[test]
fn sdk_call_scanner_finds_calls_and_only_calls() {
    let src = r#"
        use aws_sdk_ec2::types::Filter; // self.clients.ec2.delete_vpc()
        let out = self
            .clients
            .elbv2
            .describe_load_balancers()
            .send();
        self.clients.ec2.describe_subnets().send();
        let c = ec2::Client::new(&config);
        let d = self.clients.elbv2.clone();
        let e = my_ec2.terminate_instances();
    "#;
    let found = sdk_calls(src);
    assert_eq!(
        found,
        BTreeSet::from([
            ("ec2".to_string(), "describe_subnets".to_string()),
            ("elbv2".to_string(), "describe_load_balancers".to_string()),
        ])
    );
    assert_eq!(
        pascal("describe_target_group_attributes"),
        "DescribeTargetGroupAttributes"
    );
}

/// The IAM actions (`ec2:DescribeSubnets`, ...) of the SDK calls in `files`.
fn iam_actions_called(files: &[PathBuf]) -> BTreeSet<String> {
    let mut called = BTreeSet::new();
    for f in files {
        for (client, op) in sdk_calls(&std::fs::read_to_string(f).unwrap()) {
            let service = if client == "elbv2" {
                "elasticloadbalancing"
            } else {
                "ec2"
            };
            called.insert(format!("{service}:{}", pascal(&op)));
        }
    }
    called
}

/// `policy` allows exactly `called` (plus tagging on create), by name.
fn assert_policy_allows_exactly(file: &str, policy: &Value, called: BTreeSet<String>, code: &str) {
    let mut allowed = BTreeSet::new();
    for s in policy["Statement"].as_array().unwrap() {
        assert_eq!(s["Effect"], "Allow", "{s}");
        for a in statement_actions(s) {
            assert!(!a.contains('*'), "wildcard action {a}");
            allowed.insert(a);
        }
    }
    // Tagging in a create call (TagSpecifications) is authorized as a
    // separate action the code never calls by itself.
    const IMPLIED: &[&str] = &["ec2:CreateTags"];
    let called: BTreeSet<String> = called
        .into_iter()
        .chain(IMPLIED.iter().map(|a| a.to_string()))
        .collect();
    let missing: Vec<_> = called.difference(&allowed).collect();
    let unused: Vec<_> = allowed.difference(&called).collect();
    assert!(
        missing.is_empty() && unused.is_empty(),
        "{code} calls these but {file} does not allow them: {missing:?}; \
         the policy allows these but {code} never calls them: {unused:?}"
    );
}

/// vpc-ipam's EC2 calls, in the provider crate; the rest is the ccm's.
const VPC_IPAM_EC2: &str = "providers/aws/src/ipam.rs";

#[test]
fn iam_policy_allows_exactly_the_aws_calls_the_provider_makes() {
    let mut files = Vec::new();
    rust_files(&repo().join("providers/aws/src"), &mut files);
    files.retain(|f| !f.ends_with(VPC_IPAM_EC2));
    let called = iam_actions_called(&files);
    assert!(
        called.contains("elasticloadbalancing:CreateLoadBalancer"),
        "the scan of providers/aws/src found no CreateLoadBalancer call: {called:?}"
    );
    assert_policy_allows_exactly(
        "deploy/aws/iam-policy.json",
        &policy(),
        called,
        "providers/aws",
    );
}

fn vpc_ipam_policy() -> Value {
    serde_json::from_str(&read("deploy/aws/vpc-ipam-iam-policy.json")).unwrap()
}

#[test]
fn vpc_ipam_iam_policy_allows_exactly_the_ec2_calls_of_the_agent() {
    // The agent reaches EC2 only through the provider crate's ipam module;
    // its own sources are scanned too, so a direct call would show.
    let mut files = vec![repo().join(VPC_IPAM_EC2)];
    rust_files(&repo().join("vpc-ipam/src"), &mut files);
    let called = iam_actions_called(&files);
    assert!(
        called.contains("ec2:CreateNetworkInterface"),
        "the scan of {VPC_IPAM_EC2} found no CreateNetworkInterface call: {called:?}"
    );
    assert_policy_allows_exactly(
        "deploy/aws/vpc-ipam-iam-policy.json",
        &vpc_ipam_policy(),
        called,
        "vpc-ipam",
    );
}

/// Every change to a network interface needs the ownership tag on it (in
/// the request when created). Subnets, security groups and instances are
/// not the agent's and carry no such tag; statements on them alone are
/// allowed untagged because each of their actions also needs the network
/// interface, which the tagged statements guard.
#[test]
fn vpc_ipam_iam_policy_conditions_every_change_on_the_ownership_tag() {
    let policy = vpc_ipam_policy();
    assert_eq!(policy["Version"], "2012-10-17");
    let resources = |s: &Value| -> Vec<String> {
        match &s["Resource"] {
            Value::String(r) => vec![r.clone()],
            Value::Array(r) => r.iter().map(|r| r.as_str().unwrap().to_string()).collect(),
            other => panic!("Resource must be a string or a list: {other}"),
        }
    };
    let eni = "arn:aws:ec2:*:*:network-interface/*";
    let mut guarded = BTreeSet::new();
    let mut unguarded = BTreeSet::new();
    for s in policy["Statement"].as_array().unwrap() {
        let actions = statement_actions(s);
        if actions.iter().all(|a| a.starts_with("ec2:Describe")) {
            continue;
        }
        let tagged = [
            format!("aws:RequestTag/{OWNERSHIP_TAG}"),
            format!("aws:ResourceTag/{OWNERSHIP_TAG}"),
        ]
        .iter()
        .any(|k| s["Condition"]["Null"].get(k) == Some(&json!("false")));
        if tagged {
            assert_eq!(resources(s), [eni], "{actions:?}");
            guarded.extend(actions);
        } else {
            let foreign = ["subnet/*", "security-group/*", "instance/*"];
            for r in resources(s) {
                assert!(
                    foreign.iter().any(|f| r == format!("arn:aws:ec2:*:*:{f}")),
                    "{actions:?} are allowed on {r} without the ownership tag"
                );
            }
            unguarded.extend(actions);
        }
    }
    let loose: Vec<_> = unguarded.difference(&guarded).collect();
    assert!(
        loose.is_empty(),
        "{loose:?} need no tagged network interface"
    );
}

#[test]
fn iam_policy_conditions_every_change_on_the_ownership_tag() {
    let policy = policy();
    assert_eq!(policy["Version"], "2012-10-17");
    for s in policy["Statement"].as_array().unwrap() {
        let actions = statement_actions(s);
        let read_only = actions
            .iter()
            .all(|a| a.split(':').nth(1).unwrap().starts_with("Describe"));
        if read_only {
            continue;
        }
        let null = s["Condition"]["Null"]
            .as_object()
            .unwrap_or_else(|| panic!("{actions:?} are allowed without a condition"));
        let tagged = [
            format!("aws:RequestTag/{OWNERSHIP_TAG}"),
            format!("aws:ResourceTag/{OWNERSHIP_TAG}"),
        ]
        .iter()
        .any(|k| null.get(k) == Some(&json!("false")));
        assert!(
            tagged,
            "{actions:?}: the request or the resource must carry {OWNERSHIP_TAG}"
        );
    }
}

// ---------------------------------------------------------------- on a real API server

/// Server-side applies `doc` (any kind: the resource is found by discovery).
async fn apply(client: &Client, doc: &Value) {
    let obj: DynamicObject = serde_json::from_value(doc.clone()).unwrap();
    let gvk = GroupVersionKind::try_from(obj.types.as_ref().unwrap()).unwrap();
    let (resource, caps) = kube::discovery::pinned_kind(client, &gvk).await.unwrap();
    let api: Api<DynamicObject> = match caps.scope {
        Scope::Namespaced => Api::namespaced_with(
            client.clone(),
            obj.metadata.namespace.as_deref().unwrap(),
            &resource,
        ),
        Scope::Cluster => Api::all_with(client.clone(), &resource),
    };
    let name = obj.metadata.name.clone().unwrap();
    api.patch(
        &name,
        &PatchParams::apply("cnlb-test").force(),
        &Patch::Apply(&obj),
    )
    .await
    .unwrap_or_else(|e| panic!("applying {} {name}: {e}", gvk.kind));
}

fn forbidden<T>(r: Result<T, kube::Error>) -> bool {
    match r {
        Err(kube::Error::Api(e)) => e.is_forbidden(),
        _ => false,
    }
}

fn obj<T: serde::de::DeserializeOwned>(v: Value) -> T {
    serde_json::from_value(v).unwrap()
}

/// What the API server's authorizer answers the caller of `client`.
async fn can(client: &Client, verb: &str, group: &str, resource: &str, ns: Option<&str>) -> bool {
    let (resource, subresource) = match resource.split_once('/') {
        Some((r, s)) => (r, Some(s)),
        None => (resource, None),
    };
    let review: SelfSubjectAccessReview = obj(json!({
        "spec": {"resourceAttributes": {
            "verb": verb, "group": group, "resource": resource,
            "subresource": subresource, "namespace": ns,
        }},
    }));
    let answer = Api::<SelfSubjectAccessReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await
        .unwrap();
    answer.status.unwrap().allowed
}

/// Objects the controller works on, made by the admin as users and nodes would.
async fn seed(admin: &Client) {
    let pp = PostParams::default();
    Api::<Service>::namespaced(admin.clone(), "default")
        .create(
            &pp,
            &obj(json!({
                "metadata": {"name": "web"},
                "spec": {
                    "type": "LoadBalancer",
                    "loadBalancerClass": "cnlb.dev/nlb",
                    "selector": {"app": "web"},
                    "ports": [{"port": 80, "targetPort": 8080}],
                },
            })),
        )
        .await
        .unwrap();
    Api::<Pod>::namespaced(admin.clone(), "default")
        .create(
            &pp,
            &obj(json!({
                "metadata": {"name": "web-0", "labels": {"app": "web"}},
                "spec": {
                    "readinessGates": [{"conditionType": "cnlb.dev/load-balancer-ready"}],
                    "containers": [{"name": "web", "image": "example.invalid/web:1"}],
                },
            })),
        )
        .await
        .unwrap();
    Api::<Node>::all(admin.clone())
        .create(
            &pp,
            &obj(json!({
                "metadata": {"name": "node-a"},
                "spec": {"taints": [{
                    "key": "node.cloudprovider.kubernetes.io/uninitialized",
                    "value": "true", "effect": "NoSchedule",
                }]},
            })),
        )
        .await
        .unwrap();
    Api::<Secret>::namespaced(admin.clone(), NS)
        .create(
            &pp,
            &obj(json!({
                "metadata": {"name": "cloud-credentials"},
                "stringData": {"key": "hunter2"},
            })),
        )
        .await
        .unwrap();
    // Leases that are not the controller's: another one in its namespace, and
    // one of its name in another namespace.
    for (ns, name) in [(NS, "kube-scheduler-like"), ("default", NAME)] {
        Api::<Lease>::namespaced(admin.clone(), ns)
            .create(
                &pp,
                &obj(json!({
                    "metadata": {"name": name},
                    "spec": {"holderIdentity": "someone-else", "leaseDurationSeconds": 15},
                })),
            )
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn plain_manifests_apply_and_the_controller_gets_exactly_its_rbac() {
    let env = Env::builder("deploy").kube().start().await.unwrap();
    let cp = env.kube().unwrap();
    let admin = cp.admin_client().unwrap();
    let pp = PostParams::default();

    let manifests = plain_manifests();
    for doc in &manifests {
        apply(&admin, doc).await;
    }

    // The Deployment: 2 replicas, whose Pods pass admission (the
    // ServiceAccount exists, the priority class resolves).
    let deployments: Api<Deployment> = Api::namespaced(admin.clone(), NS);
    let deployment = deployments.get(NAME).await.unwrap();
    assert_eq!(deployment.spec.as_ref().unwrap().replicas, Some(2));
    eventually("the Deployment has 2 Pods", WAIT, || async {
        let d = deployments.get(NAME).await?;
        Ok(d.status.and_then(|s| s.replicas) == Some(2))
    })
    .await
    .unwrap();
    let pods = Api::<Pod>::namespaced(admin.clone(), NS)
        .list(&ListParams::default().labels("app.kubernetes.io/name=cnlb-ccm"))
        .await
        .unwrap();
    assert_eq!(pods.items.len(), 2);
    for pod in &pods.items {
        let spec = pod.spec.as_ref().unwrap();
        assert_eq!(spec.service_account_name.as_deref(), Some(NAME));
        assert_eq!(
            spec.priority,
            Some(2_000_000_000),
            "system-cluster-critical"
        );
    }

    // The PodDisruptionBudget exists and covers those two Pods.
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(admin.clone(), NS);
    let pdb = pdbs.get(NAME).await.unwrap();
    assert_eq!(pdb.spec.unwrap().min_available, Some(IntOrString::Int(1)));
    eventually(
        "the PodDisruptionBudget expects the 2 Pods",
        WAIT,
        || async {
            let pdb = pdbs.get(NAME).await?;
            Ok(pdb.status.is_some_and(|s| s.expected_pods == Some(2)))
        },
    )
    .await
    .unwrap();

    // The Pod passes the "restricted" Pod Security Standard; the same Pod
    // without its securityContext does not (so the check is live).
    let template = serde_json::to_value(&deployment.spec.unwrap().template).unwrap();
    Api::<Namespace>::all(admin.clone())
        .create(
            &pp,
            &obj(json!({"metadata": {
                "name": "restricted",
                "labels": {"pod-security.kubernetes.io/enforce": "restricted"},
            }})),
        )
        .await
        .unwrap();
    Api::<ServiceAccount>::namespaced(admin.clone(), "restricted")
        .create(&pp, &obj(json!({"metadata": {"name": NAME}})))
        .await
        .unwrap();
    let restricted: Api<Pod> = Api::namespaced(admin.clone(), "restricted");
    let dry_run = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    let mut pod = json!({"metadata": {"name": "cnlb-ccm-psa"}, "spec": template["spec"]});
    restricted
        .create(&dry_run, &obj(pod.clone()))
        .await
        .unwrap_or_else(|e| panic!("the restricted Pod Security Standard refuses the Pod: {e}"));
    pod["spec"]["securityContext"] = json!({});
    pod["spec"]["containers"][0]["securityContext"] = json!({});
    assert!(
        forbidden(restricted.create(&dry_run, &obj::<Pod>(pod)).await),
        "Pod Security admission is not enforcing in this API server"
    );

    // Acting as the controller's ServiceAccount.
    seed(&admin).await;
    let ccm = cp.service_account_client(NS, NAME).unwrap();
    let services: Api<Service> = Api::all(ccm.clone());
    // The authorizer sees new bindings through an informer: allow it a moment.
    eventually("the ServiceAccount can list Services", WAIT, || async {
        Ok(services.list(&ListParams::default()).await.is_ok())
    })
    .await
    .unwrap();

    // Watches: asked of the authorizer.
    for (group, resource) in [
        ("", "services"),
        ("discovery.k8s.io", "endpointslices"),
        ("", "pods"),
        ("", "nodes"),
    ] {
        for verb in ["list", "watch"] {
            assert!(
                can(&ccm, verb, group, resource, None).await,
                "cannot {verb} {resource}"
            );
        }
    }

    // Services: finalizer on, status written, finalizer off.
    let web: Api<Service> = Api::namespaced(ccm.clone(), "default");
    let web_admin: Api<Service> = Api::namespaced(admin.clone(), "default");
    let merge = PatchParams::default();
    web.patch(
        "web",
        &merge,
        &Patch::Merge(json!({"metadata": {"finalizers": ["cnlb.dev/load-balancer"]}})),
    )
    .await
    .unwrap();
    let hostname = "web-0123456789.elb.eu-west-1.amazonaws.com";
    web.patch_status(
        "web",
        &merge,
        &Patch::Merge(json!({"status": {"loadBalancer": {"ingress": [{"hostname": hostname}]}}})),
    )
    .await
    .unwrap();
    let seen = web_admin.get("web").await.unwrap();
    assert_eq!(
        seen.metadata.finalizers,
        Some(vec!["cnlb.dev/load-balancer".to_string()])
    );
    let ingress = seen.status.unwrap().load_balancer.unwrap().ingress.unwrap();
    assert_eq!(ingress[0].hostname.as_deref(), Some(hostname));
    web.patch(
        "web",
        &merge,
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await
    .unwrap();

    // EndpointSlices: readable everywhere.
    Api::<EndpointSlice>::all(ccm.clone())
        .list(&ListParams::default())
        .await
        .unwrap();

    // Pods: the readiness gate's condition set to True.
    let web_pods: Api<Pod> = Api::namespaced(ccm.clone(), "default");
    web_pods.get("web-0").await.unwrap();
    web_pods
        .patch_status(
            "web-0",
            &merge,
            &Patch::Strategic(json!({"status": {"conditions": [{
                "type": "cnlb.dev/load-balancer-ready", "status": "True",
            }]}})),
        )
        .await
        .unwrap();
    let seen = Api::<Pod>::namespaced(admin.clone(), "default")
        .get("web-0")
        .await
        .unwrap();
    let gate = seen
        .status
        .unwrap()
        .conditions
        .unwrap_or_default()
        .into_iter()
        .find(|c| c.type_ == "cnlb.dev/load-balancer-ready")
        .expect("readiness gate condition");
    assert_eq!(gate.status, "True");

    // Nodes: initialised (providerID, zone label, taint removed), addresses set.
    let nodes: Api<Node> = Api::all(ccm.clone());
    let node = nodes.get("node-a").await.unwrap();
    let taints: Vec<Value> = node
        .spec
        .unwrap()
        .taints
        .unwrap_or_default()
        .into_iter()
        .filter(|t| t.key != "node.cloudprovider.kubernetes.io/uninitialized")
        .map(|t| serde_json::to_value(t).unwrap())
        .collect();
    nodes
        .patch(
            "node-a",
            &merge,
            &Patch::Merge(json!({
                "metadata": {"labels": {"topology.kubernetes.io/zone": "eu-west-1a"}},
                "spec": {"providerID": "aws:///eu-west-1a/i-0123456789abcdef0", "taints": taints},
            })),
        )
        .await
        .unwrap();
    nodes
        .patch_status(
            "node-a",
            &merge,
            &Patch::Strategic(json!({"status": {"addresses": [
                {"type": "InternalIP", "address": "10.0.1.10"},
            ]}})),
        )
        .await
        .unwrap();
    let seen = Api::<Node>::all(admin.clone()).get("node-a").await.unwrap();
    let spec = seen.spec.unwrap();
    assert_eq!(
        spec.provider_id.as_deref(),
        Some("aws:///eu-west-1a/i-0123456789abcdef0")
    );
    assert!(
        !spec
            .taints
            .unwrap_or_default()
            .iter()
            .any(|t| t.key == "node.cloudprovider.kubernetes.io/uninitialized"),
        "the uninitialized taint is still there"
    );
    let addresses = seen.status.unwrap().addresses.unwrap_or_default();
    assert!(addresses.iter().any(|a| a.address == "10.0.1.10"));

    // Events, through both APIs.
    Api::<Event>::namespaced(ccm.clone(), "default")
        .create(
            &pp,
            &obj(json!({
                "metadata": {"name": "web.ensured"},
                "involvedObject": {"kind": "Service", "namespace": "default", "name": "web"},
                "reason": "EnsuredLoadBalancer", "message": "load balancer ready",
                "type": "Normal", "source": {"component": "cnlb-ccm"},
            })),
        )
        .await
        .unwrap();
    Api::<EventV1>::namespaced(ccm.clone(), "default")
        .create(
            &pp,
            &obj(json!({
                "metadata": {"name": "web.ensured.v1"},
                "eventTime": "2025-01-01T00:00:00.000000Z",
                "regarding": {"kind": "Service", "namespace": "default", "name": "web"},
                "reason": "EnsuredLoadBalancer", "action": "Ensure", "note": "load balancer ready",
                "type": "Normal", "reportingController": "cnlb.dev/cnlb-ccm",
                "reportingInstance": "cnlb-ccm-0",
            })),
        )
        .await
        .unwrap();

    // Its Lease: created, read, renewed.
    let leases: Api<Lease> = Api::namespaced(ccm.clone(), NS);
    leases
        .create(
            &pp,
            &obj(json!({
                "metadata": {"name": NAME},
                "spec": {"holderIdentity": "cnlb-ccm-0", "leaseDurationSeconds": 15},
            })),
        )
        .await
        .unwrap();
    let mut lease = leases.get(NAME).await.unwrap();
    lease.spec.as_mut().unwrap().holder_identity = Some("cnlb-ccm-1".into());
    leases.replace(NAME, &pp, &lease).await.unwrap();
    assert_eq!(
        leases
            .get(NAME)
            .await
            .unwrap()
            .spec
            .unwrap()
            .holder_identity
            .as_deref(),
        Some("cnlb-ccm-1")
    );

    // And nothing else.
    let secrets: Api<Secret> = Api::namespaced(ccm.clone(), NS);
    assert!(
        forbidden(secrets.list(&ListParams::default()).await),
        "secrets listable in kube-system"
    );
    assert!(
        forbidden(secrets.get("cloud-credentials").await),
        "a secret readable"
    );
    assert!(
        forbidden(
            Api::<Secret>::all(ccm.clone())
                .list(&ListParams::default())
                .await
        ),
        "secrets listable cluster-wide"
    );
    let new_pod: Pod = obj(json!({
        "metadata": {"name": "sneaky"},
        "spec": {"containers": [{"name": "x", "image": "example.invalid/x:1"}]},
    }));
    assert!(
        forbidden(web_pods.create(&pp, &new_pod).await),
        "pods creatable"
    );
    assert!(
        forbidden(web.delete("web", &DeleteParams::default()).await),
        "services deletable"
    );
    assert!(
        web_admin.get("web").await.is_ok(),
        "the Service is still there"
    );

    // Leases other than its own: not in another namespace...
    let other_ns: Api<Lease> = Api::namespaced(ccm.clone(), "default");
    let theirs = Api::<Lease>::namespaced(admin.clone(), "default")
        .get(NAME)
        .await
        .unwrap();
    assert!(
        forbidden(other_ns.get(NAME).await),
        "a lease in default readable"
    );
    assert!(
        forbidden(other_ns.replace(NAME, &pp, &theirs).await),
        "a lease in default updatable"
    );
    let fresh: Lease = obj(json!({"metadata": {"name": "cnlb-ccm-elsewhere"}}));
    assert!(
        forbidden(other_ns.create(&pp, &fresh).await),
        "leases creatable in default"
    );
    // ...nor another one in its own.
    let other_name = Api::<Lease>::namespaced(admin.clone(), NS)
        .get("kube-scheduler-like")
        .await
        .unwrap();
    assert!(
        forbidden(leases.get("kube-scheduler-like").await),
        "another lease readable"
    );
    assert!(
        forbidden(
            leases
                .replace("kube-scheduler-like", &pp, &other_name)
                .await
        ),
        "another lease updatable"
    );
}

// ---------------------------------------------------------------- the vpc-ipam DaemonSet

const AGENT: &str = "vpc-ipam-agent";
const VPC_IPAM_CHART: &str = "cnlb-vpc-ipam";
const CONFLIST: &str = "10-cnlb.conflist";

fn vpc_ipam_manifests() -> Vec<Value> {
    manifests_in("deploy/vpc-ipam")
}

fn containers<'a>(pod_spec: &'a Value, key: &str) -> &'a Vec<Value> {
    pod_spec[key].as_array().unwrap()
}

fn container<'a>(pod_spec: &'a Value, key: &str, name: &str) -> &'a Value {
    containers(pod_spec, key)
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no {key} {name}"))
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| a.iter().map(|s| s.as_str().unwrap().to_string()).collect())
        .unwrap_or_default()
}

/// The value of `--<flag>=<value>` in `args`.
fn flag<'a>(args: &'a [String], flag: &str) -> &'a str {
    let prefix = format!("--{flag}=");
    args.iter()
        .find_map(|a| a.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no --{flag}= in {args:?}"))
}

#[test]
fn vpc_ipam_chart_default_rendering_is_the_plain_manifests() {
    let rendered = helm_template(VPC_IPAM_CHART, &[]).unwrap();
    same_objects(rendered, vpc_ipam_manifests(), "deploy/vpc-ipam/");
}

#[test]
fn vpc_ipam_chart_takes_static_ranges_with_the_static_backend_only() {
    let err = helm_template(VPC_IPAM_CHART, &["--set", "backend=static"]).unwrap_err();
    assert!(err.contains("backend=static needs staticRanges"), "{err}");
    let err = helm_template(VPC_IPAM_CHART, &["--set", "staticRanges={10.1.0.0/24}"]).unwrap_err();
    assert!(err.contains("only used with backend=static"), "{err}");
    let err = helm_template(VPC_IPAM_CHART, &["--set", "bakend=static"]).unwrap_err();
    assert!(
        err.contains("bakend"),
        "the schema names an unknown key: {err}"
    );

    let docs = helm_template(
        VPC_IPAM_CHART,
        &[
            "--set",
            "backend=static",
            "--set",
            "staticRanges={10.1.0.0/24,10.1.1.0/24}",
        ],
    )
    .unwrap();
    let spec = &object(&docs, "DaemonSet", AGENT)["spec"]["template"]["spec"];
    let args = strings(&container(spec, "containers", "agent")["args"]);
    assert_eq!(
        args[..3],
        [
            "--backend=static",
            "--static-range=10.1.0.0/24",
            "--static-range=10.1.1.0/24"
        ]
    );
}

/// No capability, no privilege, read-only root, and of the host only the
/// node's network and four paths, each mounted by the one container that
/// needs it; the agent's socket and state are under its mounts, the
/// conflist points the plugin at that socket, the ServiceAccount is bound
/// to a role that reads Nodes.
#[test]
fn vpc_ipam_daemonset_is_least_privilege_and_consistent() {
    let docs = vpc_ipam_manifests();
    let ds = object(&docs, "DaemonSet", AGENT);
    let spec = &ds["spec"]["template"]["spec"];
    assert_eq!(spec["hostNetwork"], true);
    assert!(spec["hostPID"].is_null() && spec["hostIPC"].is_null());
    assert_eq!(spec["priorityClassName"], "system-node-critical");
    assert_eq!(spec["tolerations"], json!([{"operator": "Exists"}]));
    assert_eq!(spec["securityContext"]["runAsUser"], 0);

    let host_paths: BTreeMap<String, String> = spec["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| !v["hostPath"].is_null())
        .map(|v| {
            let path = v["hostPath"]["path"].as_str().unwrap().to_string();
            (v["name"].as_str().unwrap().to_string(), path)
        })
        .collect();
    assert_eq!(
        host_paths.values().cloned().collect::<BTreeSet<_>>(),
        BTreeSet::from(
            [
                "/opt/cni/bin",
                "/etc/cni/net.d",
                "/run/cnlb",
                "/var/lib/cnlb"
            ]
            .map(String::from)
        )
    );
    // Host paths each container mounts: host path -> mount path.
    let mounts = |c: &Value| -> BTreeMap<String, String> {
        c["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|m| {
                let host = host_paths.get(m["name"].as_str().unwrap())?;
                Some((host.clone(), m["mountPath"].as_str().unwrap().to_string()))
            })
            .collect()
    };
    for (key, c) in [("initContainers", 1), ("containers", 1)] {
        assert_eq!(containers(spec, key).len(), c, "{key}");
    }
    let init = container(spec, "initContainers", "install-cni");
    let agent = container(spec, "containers", "agent");
    for c in [init, agent] {
        let sc = &c["securityContext"];
        assert_eq!(
            sc["capabilities"],
            json!({"drop": ["ALL"]}),
            "{}",
            c["name"]
        );
        assert_eq!(sc["readOnlyRootFilesystem"], true, "{}", c["name"]);
        assert_eq!(sc["allowPrivilegeEscalation"], false, "{}", c["name"]);
        assert!(sc["privileged"].is_null(), "{}", c["name"]);
    }
    assert_eq!(
        mounts(init).keys().collect::<Vec<_>>(),
        ["/etc/cni/net.d", "/opt/cni/bin"]
    );
    let agent_mounts = mounts(agent);
    assert_eq!(
        agent_mounts.keys().collect::<Vec<_>>(),
        ["/run/cnlb", "/var/lib/cnlb"]
    );
    // The agent sees its host paths where they are on the node.
    assert!(agent_mounts.iter().all(|(host, mount)| host == mount));

    let args = strings(&agent["args"]);
    assert_eq!(flag(&args, "backend"), "aws");
    let socket = flag(&args, "socket");
    assert!(socket.starts_with("/run/cnlb/"), "{socket}");
    assert!(flag(&args, "state-dir").starts_with("/var/lib/cnlb/"));
    let env = agent["env"].as_array().unwrap();
    let node_name = env.iter().find(|e| e["name"] == "NODE_NAME").unwrap();
    assert_eq!(
        node_name["valueFrom"]["fieldRef"]["fieldPath"],
        "spec.nodeName"
    );
    assert!(env.iter().any(|e| e["name"] == "CNLB_CLUSTER_NAME"));

    // The conflist the init container installs points the plugin at the socket.
    let cm_name = spec["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|v| v["configMap"]["name"].as_str())
        .unwrap();
    let cm = object(&docs, "ConfigMap", cm_name);
    let conflist: Value = serde_json::from_str(cm["data"][CONFLIST].as_str().unwrap()).unwrap();
    assert_eq!(conflist["plugins"][0]["type"], "ptp");
    assert_eq!(conflist["plugins"][0]["ipam"]["type"], "vpc-ipam");
    assert_eq!(conflist["plugins"][0]["ipam"]["agentSocket"], socket);
    let script = strings(&init["args"]).join("\n");
    assert!(
        script.contains(&format!("/host/etc/cni/net.d/{CONFLIST}")),
        "{script}"
    );
    assert!(script.contains("/host/opt/cni/bin/vpc-ipam"), "{script}");

    // The ServiceAccount it runs as is bound to a role that only reads Nodes.
    assert_eq!(spec["serviceAccountName"], AGENT);
    object(&docs, "ServiceAccount", AGENT);
    let role = object(&docs, "ClusterRole", AGENT);
    assert_eq!(
        grants(&role["rules"]),
        BTreeSet::from([(String::new(), "nodes".into(), "*".into(), "get".into())])
    );
    let binding = object(&docs, "ClusterRoleBinding", AGENT);
    assert_eq!(binding["roleRef"]["name"], AGENT);
    assert_eq!(
        binding["subjects"],
        json!([{"kind": "ServiceAccount", "name": AGENT, "namespace": NS}])
    );
}

/// The conflist's version is one Debian's ptp and portmap (1.1.1) speak, and
/// our plugin takes its part of it: each plugin gets its object with the
/// list's name and version, as libcni passes it.
#[test]
fn vpc_ipam_conflist_is_accepted_by_the_plugins() {
    let docs = vpc_ipam_manifests();
    let cm = object(&docs, "ConfigMap", "vpc-ipam-cni");
    let conflist: Value = serde_json::from_str(cm["data"][CONFLIST].as_str().unwrap()).unwrap();
    let version = conflist["cniVersion"].clone();
    for plugin in conflist["plugins"].as_array().unwrap() {
        let name = plugin["type"].as_str().unwrap();
        let out = std::process::Command::new(format!("/usr/lib/cni/{name}"))
            .env("CNI_COMMAND", "VERSION")
            .output()
            .unwrap();
        let supported: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert!(
            supported["supportedVersions"]
                .as_array()
                .unwrap()
                .contains(&version),
            "{name} does not speak cniVersion {version}: {supported}"
        );
    }

    let mut conf = conflist["plugins"][0].clone();
    conf["name"] = conflist["name"].clone();
    conf["cniVersion"] = version;
    // A socket of our own: the plugin may queue the release next to it.
    let dir = tempfile::tempdir().unwrap();
    conf["ipam"]["agentSocket"] = json!(dir.path().join("vpc-ipam.sock"));
    let plugin = cnlb_localstack_tests::paths::workspace_bin("vpc-ipam").unwrap();
    let mut child = std::process::Command::new(plugin)
        .env("CNI_COMMAND", "DEL")
        .env("CNI_CONTAINERID", "deploy-test")
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/opt/cni/bin")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(
        &mut child.stdin.take().unwrap(),
        conf.to_string().as_bytes(),
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    // No agent runs here: DEL succeeds (nothing to release) or asks to try
    // again later; what it must not report is a configuration error
    // (1 version, 2 unsupported field, 6 decode, 7 invalid configuration).
    if !out.status.success() {
        let err: Value = serde_json::from_slice(&out.stdout).unwrap();
        let code = err["code"].as_u64().unwrap();
        assert!(
            ![1, 2, 6, 7].contains(&code),
            "the plugin refuses the conflist: {err}"
        );
    }
}

#[tokio::test]
async fn vpc_ipam_manifests_apply_and_the_agent_can_only_read_nodes() {
    let env = Env::builder("deploy-vpc-ipam")
        .kube()
        .start()
        .await
        .unwrap();
    let cp = env.kube().unwrap();
    let admin = cp.admin_client().unwrap();
    let pp = PostParams::default();

    // Linux Nodes, one tainted as special nodes are: the agent runs on
    // both; a Windows Node gets none.
    let nodes: Api<Node> = Api::all(admin.clone());
    for (name, os) in [("node-a", "linux"), ("node-w", "windows")] {
        let node = json!({"metadata": {"name": name, "labels": {"kubernetes.io/os": os}}});
        nodes.create(&pp, &obj(node)).await.unwrap();
    }
    nodes
        .create(
            &pp,
            &obj(json!({
                "metadata": {"name": "node-b", "labels": {"kubernetes.io/os": "linux"}},
                "spec": {"taints": [
                    {"key": "dedicated", "value": "gpu", "effect": "NoSchedule"},
                    {"key": "example.com/maintenance", "effect": "NoExecute"},
                ]},
            })),
        )
        .await
        .unwrap();
    for doc in &vpc_ipam_manifests() {
        apply(&admin, doc).await;
    }

    // The DaemonSet controller makes a Pod per Node, which admission takes
    // (ServiceAccount, system-node-critical priority).
    let pods: Api<Pod> = Api::namespaced(admin.clone(), NS);
    let selector = ListParams::default().labels("app.kubernetes.io/name=vpc-ipam-agent");
    eventually("a vpc-ipam-agent Pod per Node", WAIT, || async {
        Ok(pods.list(&selector).await?.items.len() == 2)
    })
    .await
    .unwrap();
    let mut placed = BTreeSet::new();
    for pod in pods.list(&selector).await.unwrap().items {
        let spec = serde_json::to_value(pod.spec.unwrap()).unwrap();
        assert_eq!(spec["priority"], 2_000_001_000, "system-node-critical");
        assert_eq!(spec["serviceAccountName"], AGENT);
        assert_eq!(spec["hostNetwork"], true);
        let terms = &spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
            ["nodeSelectorTerms"];
        placed.extend(strings(&terms[0]["matchFields"][0]["values"]));
    }
    assert_eq!(placed, BTreeSet::from(["node-a".into(), "node-b".into()]));

    // Acting as the agent's ServiceAccount: its Node (providerID) readable.
    let agent = cp.service_account_client(NS, AGENT).unwrap();
    let agent_nodes: Api<Node> = Api::all(agent.clone());
    // The authorizer sees new bindings through an informer: allow it a moment.
    eventually("the ServiceAccount can get a Node", WAIT, || async {
        Ok(agent_nodes.get("node-a").await.is_ok())
    })
    .await
    .unwrap();
    assert!(can(&agent, "get", "", "nodes", None).await);

    // And nothing else.
    for (verb, group, resource, ns) in [
        ("list", "", "nodes", None),
        ("watch", "", "nodes", None),
        ("patch", "", "nodes", None),
        ("patch", "", "nodes/status", None),
        ("get", "", "secrets", Some(NS)),
        ("list", "", "secrets", None),
        ("list", "", "pods", None),
        ("patch", "", "pods", Some(NS)),
        ("patch", "", "pods/status", Some(NS)),
        ("get", "", "configmaps", Some(NS)),
        ("create", "", "events", Some(NS)),
    ] {
        assert!(
            !can(&agent, verb, group, resource, ns).await,
            "the agent may {verb} {resource} in {ns:?}"
        );
    }
    assert!(
        forbidden(agent_nodes.list(&ListParams::default()).await),
        "nodes listable"
    );
    assert!(
        forbidden(
            Api::<Secret>::namespaced(agent.clone(), NS)
                .list(&ListParams::default())
                .await
        ),
        "secrets listable in kube-system"
    );
    let agent_pod = pods.list(&selector).await.unwrap().items[0]
        .metadata
        .name
        .clone()
        .unwrap();
    assert!(
        forbidden(
            Api::<Pod>::namespaced(agent.clone(), NS)
                .patch(
                    &agent_pod,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"metadata": {"labels": {"x": "y"}}})),
                )
                .await
        ),
        "pods patchable"
    );
    assert!(
        forbidden(
            agent_nodes
                .patch(
                    "node-a",
                    &PatchParams::default(),
                    &Patch::Merge(json!({"metadata": {"labels": {"x": "y"}}})),
                )
                .await
        ),
        "nodes patchable"
    );
}
