#![allow(clippy::unwrap_used)] // test code: a failed call should fail the test

//! What a cluster operator applies (deploy/): the plain manifests go onto a
//! real kube-apiserver and the controller's ServiceAccount can do exactly
//! what cnlb-ccm needs and nothing else; the Helm chart grants the same RBAC
//! rules; the IAM policy lists exactly the AWS calls the provider makes,
//! every mutation conditioned on the ownership tag.

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
    let dir = repo().join("deploy/ccm");
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
        .unwrap_or_else(|| panic!("no {kind} {name} in deploy/ccm/"))
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

/// The chart's default rendering is the plain manifests, object for object.
#[test]
fn chart_default_rendering_is_the_plain_manifests() {
    let helm = cnlb_localstack_tests::paths::helm().unwrap();
    let out = std::process::Command::new(&helm)
        .args(["template", NAME])
        .arg(repo().join("deploy/charts/cnlb-ccm"))
        .args(["--namespace", NS, "--kube-version", "1.36.0"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "helm template failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key = |d: &Value| {
        format!(
            "{} {}/{}",
            d["kind"].as_str().unwrap(),
            d["metadata"]["namespace"].as_str().unwrap_or(""),
            d["metadata"]["name"].as_str().unwrap()
        )
    };
    let rendered: BTreeMap<String, Value> =
        yaml_docs(&String::from_utf8(out.stdout).unwrap(), "helm template")
            .into_iter()
            .map(|d| (key(&d), d))
            .collect();
    let plain: BTreeMap<String, Value> = plain_manifests()
        .into_iter()
        .map(|d| (key(&d), d))
        .collect();
    assert_eq!(
        rendered.keys().collect::<Vec<_>>(),
        plain.keys().collect::<Vec<_>>()
    );
    for (k, v) in &plain {
        assert_eq!(
            &rendered[k], v,
            "{k}: chart rendering differs from deploy/ccm/"
        );
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

#[test]
fn iam_policy_allows_exactly_the_aws_calls_the_provider_makes() {
    let mut files = Vec::new();
    rust_files(&repo().join("providers/aws/src"), &mut files);
    let mut called = BTreeSet::new();
    for f in &files {
        for (client, op) in sdk_calls(&std::fs::read_to_string(f).unwrap()) {
            let service = if client == "elbv2" {
                "elasticloadbalancing"
            } else {
                "ec2"
            };
            called.insert(format!("{service}:{}", pascal(&op)));
        }
    }
    assert!(
        called.contains("elasticloadbalancing:CreateLoadBalancer"),
        "the scan of providers/aws/src found no CreateLoadBalancer call: {called:?}"
    );

    let policy = policy();
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
        "providers/aws calls these but deploy/aws/iam-policy.json does not allow them: {missing:?}; \
         the policy allows these but providers/aws never calls them: {unused:?}"
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
