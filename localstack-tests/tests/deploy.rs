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
fn check_values_keys(path: &str, set: &Value, defaults: &Value) {
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
        check_values_keys(&here, v, default);
    }
}

#[test]
fn example_values_set_only_keys_the_chart_has() {
    let defaults = yaml_docs(&read("deploy/charts/cnlb-ccm/values.yaml"), "values.yaml").remove(0);
    for (file, provider) in [
        ("deploy/values/eks.yaml", "aws"),
        ("deploy/values/gke.yaml", "gcp"),
    ] {
        let values = yaml_docs(&read(file), file).remove(0);
        check_values_keys(file, &values, &defaults);
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

/// Every change the controller may make needs `cnlb.dev/cluster` on the
/// resource (or in the create request), except the backend rules: they go
/// on the security groups of the targets' ENIs, which are not cnlb's (as in
/// aws-load-balancer-controller's policy).
#[test]
fn iam_policy_conditions_every_change_on_the_ownership_tag() {
    for s in policy()["Statement"].as_array().unwrap() {
        let actions = statement_actions(s);
        if actions.iter().all(|a| a.contains(":Describe")) {
            continue;
        }
        let tagged = [
            format!("aws:RequestTag/{OWNERSHIP_TAG}"),
            format!("aws:ResourceTag/{OWNERSHIP_TAG}"),
        ]
        .iter()
        .any(|k| s["Condition"]["Null"].get(k) == Some(&json!("false")));
        if !tagged {
            assert_eq!(
                s["Sid"], "SecurityGroupRules",
                "{actions:?} need no ownership tag"
            );
            assert_eq!(s["Resource"], "arn:aws:ec2:*:*:security-group/*");
            assert_eq!(
                actions,
                [
                    "ec2:AuthorizeSecurityGroupIngress",
                    "ec2:RevokeSecurityGroupIngress"
                ]
            );
        }
    }
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

// ---------------------------------------------------------------- GCP role

/// vpc-ipam's Compute calls, in the GCP provider crate.
const VPC_IPAM_COMPUTE: &str = "providers/gcp/src/ipam.rs";

/// `(how, method)` of every Compute request in `src`: the method name
/// (`"instances.get"`) passed as the first argument of `Calls::run` or
/// `Calls::mutate` (`how`), also across lines.
fn compute_calls(src: &str) -> BTreeSet<(String, String)> {
    let code: String = src
        .lines()
        .map(|l| l.split("//").next().unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n");
    let mut out = BTreeSet::new();
    for how in ["run", "mutate"] {
        let call = format!(".{how}(");
        for (at, _) in code.match_indices(&call) {
            let Some(rest) = code[at + call.len()..].trim_start().strip_prefix('"') else {
                continue; // not a method name: another `run`
            };
            if let Some((method, _)) = rest.split_once('"') {
                out.insert((how.to_string(), method.to_string()));
            }
        }
    }
    out
}

/// What GCE checks with the agent's methods besides their own permission:
/// `Calls::mutate` waits for the update's zone operation, and an alias IP
/// range from a secondary range uses the subnetwork.
const VPC_IPAM_GCP_IMPLIED: &[(&str, &[&str])] = &[(
    "instances.updateNetworkInterface",
    &["compute.zoneOperations.get", "compute.subnetworks.use"],
)];

#[test]
fn compute_call_scanner_finds_method_names() {
    let src = r#"
        self.calls.run("instances.get", || c.instances.get().send()); // .run("x.y")
        self.calls
            .mutate(
                "instances.updateNetworkInterface",
                || c.instances.update_network_interface().send(),
            );
        tokio::spawn(agent.clone().run_pool());
        self.calls.run(operation, call);
    "#;
    assert_eq!(
        compute_calls(src),
        BTreeSet::from([
            (
                "mutate".to_string(),
                "instances.updateNetworkInterface".to_string()
            ),
            ("run".to_string(), "instances.get".to_string()),
        ])
    );
    assert_eq!(non_literal_compute_calls(src), ["operation"]);
    assert_eq!(
        compute_method_permission("instances.updateNetworkInterface"),
        "compute.instances.updateNetworkInterface"
    );
}

/// `deploy/gcp/vpc-ipam-role.yaml` grants exactly the permissions of the
/// Compute requests in `providers/gcp/src/ipam.rs` (each method's own, plus
/// [`VPC_IPAM_GCP_IMPLIED`]), each with a comment; the agent's own sources
/// make none.
#[test]
fn vpc_ipam_gcp_role_grants_exactly_the_compute_calls_of_the_agent() {
    let text = read(VPC_IPAM_COMPUTE);
    let code = text.split("#[cfg(test)]").next().unwrap();
    assert_eq!(
        non_literal_compute_calls(code),
        Vec::<String>::new(),
        "{VPC_IPAM_COMPUTE}: a Compute request the scan cannot name"
    );
    let methods: BTreeSet<String> = compute_calls(code).into_iter().map(|(_, m)| m).collect();
    assert!(
        methods.contains("instances.updateNetworkInterface"),
        "the scan of {VPC_IPAM_COMPUTE} found no updateNetworkInterface: {methods:?}"
    );
    let mut files = Vec::new();
    rust_files(&repo().join("vpc-ipam/src"), &mut files);
    for f in files {
        let direct = compute_calls(&std::fs::read_to_string(&f).unwrap());
        assert!(
            direct.is_empty(),
            "{} calls Compute itself: {direct:?}",
            f.display()
        );
    }
    let mut needed: BTreeSet<String> = methods
        .iter()
        .map(|m| compute_method_permission(m))
        .collect();
    for (method, implied) in VPC_IPAM_GCP_IMPLIED {
        assert!(
            methods.contains(*method),
            "VPC_IPAM_GCP_IMPLIED explains {method}, which the agent no longer calls"
        );
        needed.extend(implied.iter().map(|p| p.to_string()));
    }
    assert_gcp_role_grants_exactly("deploy/gcp/vpc-ipam-role.yaml", &needed, "vpc-ipam");
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
    // Without ranges, each node's own: its spec.podCIDRs.
    let docs = helm_template(VPC_IPAM_CHART, &["--set", "backend=static"]).unwrap();
    let spec = &object(&docs, "DaemonSet", AGENT)["spec"]["template"]["spec"];
    let agent = container(spec, "containers", "agent");
    assert_eq!(
        strings(&agent["args"])[..2],
        ["--backend=static", "--static-node-pod-cidrs"]
    );
    // Off AWS the agent changes nothing on the node: no privilege at all.
    assert_eq!(
        agent["securityContext"],
        json!({"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true,
               "capabilities": {"drop": ["ALL"]}})
    );
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

/// The GKE-style example values use only keys of the chart, and the agent
/// accepts the flags the chart renders from them.
#[test]
fn vpc_ipam_gke_values_render_flags_the_agent_takes() {
    let file = "deploy/values/vpc-ipam-gke.yaml";
    let values = yaml_docs(&read(file), file).remove(0);
    let defaults = yaml_docs(
        &read("deploy/charts/cnlb-vpc-ipam/values.yaml"),
        "values.yaml",
    )
    .remove(0);
    check_values_keys(file, &values, &defaults);
    let path = repo().join(file);
    let docs = helm_template(VPC_IPAM_CHART, &["-f", path.to_str().unwrap()]).unwrap();
    let spec = &object(&docs, "DaemonSet", AGENT)["spec"]["template"]["spec"];
    let args = strings(&container(spec, "containers", "agent")["args"]);
    assert_eq!(flag(&args, "backend"), "gcp");
    // The kubelet expands $(NODE_IP) from the downward API.
    let argv = ["vpc-ipam-agent", "--node-name=node-1", "--cluster-name=c1"]
        .into_iter()
        .map(String::from)
        .chain(args.iter().map(|a| a.replace("$(NODE_IP)", "10.0.0.1")));
    let parsed = cnlb_vpc_ipam::agent_cli::AgentArgs::try_parse_validated_from(argv)
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert_eq!(parsed.backend, cnlb_vpc_ipam::agent_cli::Backend::Gcp);
    assert_eq!(parsed.gcp.gcp_pod_range_name, "pods");
    assert_eq!(parsed.gcp.gcp_alias_size, 24);
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
    let sc = &init["securityContext"];
    assert_eq!(sc["capabilities"], json!({"drop": ["ALL"]}));
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert!(sc["privileged"].is_null());
    // The manifests are AWS's: the agent routes Pods on secondary ENIs
    // (rules, tables, SNAT, sysctls of links attached later).
    assert_eq!(
        agent["securityContext"],
        json!({"privileged": true, "readOnlyRootFilesystem": true})
    );
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
    // The agent itself installs them (the image has no shell).
    assert_eq!(
        strings(&init["command"]),
        ["/usr/local/bin/vpc-ipam-agent", "install-cni"]
    );
    let install = strings(&init["args"]);
    assert_eq!(
        flag(&install, "conflist"),
        format!("/etc/cnlb/cni/{CONFLIST}")
    );
    assert_eq!(flag(&install, "cni-conf-dir"), "/host/etc/cni/net.d");
    assert_eq!(flag(&install, "cni-bin-dir"), "/host/opt/cni/bin");

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
// ---------------------------------------------------------------- cnlb-ccm on GCP

/// Where cnlb-ccm's Compute requests are: the load balancer provider, the
/// node provider, and the one way both call (which waits for operations).
const CCM_GCP_SOURCES: [&str; 3] = [
    "providers/gcp/src/provider.rs",
    "providers/gcp/src/nodes.rs",
    "providers/gcp/src/calls.rs",
];
const CCM_GCP_ROLE: &str = "deploy/gcp/ccm-role.yaml";

/// The permission a Compute method needs on its own resource:
/// `compute.<collection>.<verb>`, insert -> create, patch -> update; an
/// operation's `wait` is its `get`; listing a NEG's endpoints reads the NEG.
fn compute_method_permission(method: &str) -> String {
    let (collection, verb) = method
        .split_once('.')
        .unwrap_or_else(|| panic!("{method:?} is not <collection>.<method>"));
    let verb = match verb {
        "insert" => "create",
        "patch" => "update",
        "get" | "list" | "delete" => verb,
        "attachNetworkEndpoints" | "detachNetworkEndpoints"
            if collection == "networkEndpointGroups" =>
        {
            verb
        }
        "listNetworkEndpoints" if collection == "networkEndpointGroups" => "get",
        "updateNetworkInterface" if collection == "instances" => verb,
        "wait" if collection.ends_with("Operations") => "get",
        _ => panic!("which permission does {method} need? add it to compute_method_permission"),
    };
    format!("compute.{collection}.{verb}")
}

/// What GCE checks on a method besides its own permission: `use` on each
/// resource the request body references, the `*Internal` address
/// permissions for internal load balancers, the network's firewall policy.
const CCM_GCP_IMPLIED: &[(&str, &[&str])] = &[
    // An internal address is reserved in --gcp-subnetwork.
    (
        "addresses.insert",
        &[
            "compute.addresses.createInternal",
            "compute.subnetworks.use",
        ],
    ),
    ("addresses.delete", &["compute.addresses.deleteInternal"]),
    // A firewall rule is part of its network's firewall policy.
    ("firewalls.insert", &["compute.networks.updatePolicy"]),
    ("firewalls.patch", &["compute.networks.updatePolicy"]),
    ("firewalls.delete", &["compute.networks.updatePolicy"]),
    // A NEG is in the network and subnetwork.
    (
        "networkEndpointGroups.insert",
        &["compute.networks.use", "compute.subnetworks.use"],
    ),
    // Each endpoint names its node's VM instance.
    (
        "networkEndpointGroups.attachNetworkEndpoints",
        &["compute.instances.use"],
    ),
    (
        "networkEndpointGroups.detachNetworkEndpoints",
        &["compute.instances.use"],
    ),
    // A backend service's health check and its NEG backends.
    (
        "regionBackendServices.insert",
        &[
            "compute.regionHealthChecks.useReadOnly",
            "compute.networkEndpointGroups.use",
        ],
    ),
    (
        "regionBackendServices.patch",
        &[
            "compute.regionHealthChecks.useReadOnly",
            "compute.networkEndpointGroups.use",
        ],
    ),
    // A proxy's backend service.
    (
        "regionTargetTcpProxies.insert",
        &["compute.regionBackendServices.use"],
    ),
    // A forwarding rule's reserved address (external or internal), its
    // target proxy, network and (internal) subnetwork.
    (
        "forwardingRules.insert",
        &[
            "compute.addresses.use",
            "compute.addresses.useInternal",
            "compute.regionTargetTcpProxies.use",
            "compute.networks.use",
            "compute.subnetworks.use",
        ],
    ),
];

/// The first argument of each `.run(` / `.mutate(` in `src` that is not a
/// string literal (a method the scan cannot name).
fn non_literal_compute_calls(src: &str) -> Vec<String> {
    let mut out = Vec::new();
    for call in [".run(", ".mutate("] {
        for (at, _) in src.match_indices(call) {
            let arg = src[at + call.len()..].trim_start();
            if !arg.starts_with('"') {
                let ident = |c: &char| c.is_ascii_alphanumeric() || *c == '_';
                out.push(arg.chars().take_while(ident).collect());
            }
        }
    }
    out
}

/// The custom role in `file` (the fields `gcloud iam roles create --file`
/// takes) grants exactly `needed` (what `code` calls), each permission
/// with a comment saying why.
fn assert_gcp_role_grants_exactly(file: &str, needed: &BTreeSet<String>, code: &str) {
    let text = read(file);
    let role = yaml_docs(&text, file).remove(0);
    let keys: BTreeSet<&str> = role
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        keys,
        BTreeSet::from(["title", "description", "stage", "includedPermissions"]),
        "the fields `gcloud iam roles create --file` takes"
    );
    assert_eq!(role["stage"], "GA");
    let title = role["title"].as_str().unwrap();
    let description = role["description"].as_str().unwrap();
    assert!(!title.is_empty() && title.len() <= 100, "{title}");
    assert!(description.len() <= 256, "{description}");

    let listed = strings(&role["includedPermissions"]);
    let granted: BTreeSet<String> = listed.iter().cloned().collect();
    assert_eq!(granted.len(), listed.len(), "a permission listed twice");
    let missing: Vec<_> = needed.difference(&granted).collect();
    let unexplained: Vec<_> = granted.difference(needed).collect();
    assert!(
        missing.is_empty() && unexplained.is_empty(),
        "{code} needs these but {file} lacks them: {missing:?}; \
         the role grants these but no call of {code} needs them: {unexplained:?}"
    );

    // Each permission says why: a comment on its line or just above it.
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    for (i, line) in lines.iter().enumerate() {
        if let Some(permission) = line.strip_prefix("- compute.") {
            let commented = line.contains(" # ") || (i > 0 && lines[i - 1].starts_with('#'));
            assert!(commented, "compute.{permission}: no comment says why");
        }
    }
}

/// `deploy/gcp/ccm-role.yaml` grants exactly the permissions of the Compute
/// requests cnlb-ccm's GCP provider makes (each method's own, plus what
/// [`CCM_GCP_IMPLIED`] says GCE checks with it), each with a comment.
#[test]
fn ccm_gcp_role_grants_exactly_the_compute_calls_of_the_provider() {
    assert_eq!(
        compute_method_permission("regionBackendServices.insert"),
        "compute.regionBackendServices.create"
    );
    assert_eq!(
        compute_method_permission("zoneOperations.wait"),
        "compute.zoneOperations.get"
    );

    let mut methods = BTreeSet::new();
    for file in CCM_GCP_SOURCES {
        let text = read(file);
        // Unit tests name methods that are not called.
        let code = text.split("#[cfg(test)]").next().unwrap();
        // Every request names its method with a literal, except the
        // passthrough of that name inside Calls.
        for arg in non_literal_compute_calls(code) {
            assert!(
                file.ends_with("calls.rs") && arg == "operation",
                "{file}: a Compute request named by `{arg}`, which the scan cannot read"
            );
        }
        methods.extend(compute_calls(code).into_iter().map(|(_, m)| m));
    }
    for m in [
        "networkEndpointGroups.attachNetworkEndpoints",
        "forwardingRules.insert",
        "zoneOperations.wait",
        "regions.get",
        "instances.list",
    ] {
        assert!(methods.contains(m), "the scan found no {m}: {methods:?}");
    }

    let mut needed = BTreeSet::new();
    for m in &methods {
        needed.insert(compute_method_permission(m));
    }
    for (method, implied) in CCM_GCP_IMPLIED {
        assert!(
            methods.contains(*method),
            "CCM_GCP_IMPLIED explains {method}, which the provider no longer calls"
        );
        needed.extend(implied.iter().map(|p| p.to_string()));
    }

    assert_gcp_role_grants_exactly(CCM_GCP_ROLE, &needed, "the provider");
}

/// The GKE example values render the GCP flags and project cnlb-ccm reads
/// (each a flag or variable of ccm/src/cli.rs), and nothing else differs
/// from the plain manifests but what the example changes on purpose.
#[test]
fn ccm_chart_renders_the_gke_values_as_gcp_flags() {
    let file = "deploy/values/gke.yaml";
    let values = yaml_docs(&read(file), file).remove(0);
    let gcp = &values["gcp"];
    let path = repo().join(file);
    let mut docs = helm_template(NAME, &["-f", path.to_str().unwrap()]).unwrap();
    let plain = plain_manifests();
    let plain_spec = &object(&plain, "Deployment", NAME)["spec"]["template"]["spec"];

    let deployment = docs.iter_mut().find(|d| d["kind"] == "Deployment").unwrap();
    let spec = &mut deployment["spec"]["template"]["spec"];
    let container = &mut spec["containers"][0];
    let args = strings(&container["args"]);
    assert_eq!(flag(&args, "provider"), "gcp");
    for (key, name) in [
        ("region", "gcp-region"),
        ("network", "gcp-network"),
        ("subnetwork", "gcp-subnetwork"),
    ] {
        let value = gcp[key].as_str().unwrap();
        assert!(!value.is_empty(), "{file} sets gcp.{key}");
        assert_eq!(flag(&args, name), value);
    }
    let ranges: Vec<String> = args
        .iter()
        .filter_map(|a| a.strip_prefix("--gcp-proxy-source-range="))
        .map(String::from)
        .collect();
    assert!(!ranges.is_empty(), "{file} names the proxy-only subnet");
    assert_eq!(ranges, strings(&gcp["proxySourceRanges"]));
    let env: BTreeMap<String, Value> = container["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["name"].as_str().unwrap().to_string(), e["value"].clone()))
        .collect();
    assert_eq!(
        env.keys().collect::<Vec<_>>(),
        ["CNLB_CLUSTER_NAME", "GOOGLE_CLOUD_PROJECT", "POD_IP"]
    );
    assert_eq!(env["CNLB_CLUSTER_NAME"], values["clusterName"]);
    assert_eq!(env["GOOGLE_CLOUD_PROJECT"], gcp["project"]);

    // cnlb-ccm has each flag and variable (clap: --gcp-region is the field
    // gcp_region, a variable is its `env = "..."`).
    let cli = read("ccm/src/cli.rs");
    for a in &args {
        let name = a.trim_start_matches("--").split('=').next().unwrap();
        let field = format!("pub {}:", name.replace('-', "_"));
        assert!(cli.contains(&field), "{a}: ccm/src/cli.rs has no {field}");
    }
    // Variables the flags name ($(POD_IP)) are the kubelet's to expand.
    let expanded = |name: &str| args.iter().any(|a| a.contains(&format!("$({name})")));
    for name in env.keys().filter(|n| !expanded(n)) {
        assert!(
            cli.contains(&format!("env = \"{name}\"")),
            "ccm/src/cli.rs reads no {name}"
        );
    }

    // Put back what differs on purpose: the provider's flags and variables,
    // no tolerations on GKE, the Workload Identity annotation. The rest is
    // the plain manifests'.
    container["args"] = plain_spec["containers"][0]["args"].clone();
    container["env"] = plain_spec["containers"][0]["env"].clone();
    assert!(spec.get("tolerations").is_none(), "{file} drops them");
    spec["tolerations"] = plain_spec["tolerations"].clone();
    let sa = docs
        .iter_mut()
        .find(|d| d["kind"] == "ServiceAccount")
        .unwrap();
    let annotations = sa["metadata"]
        .as_object_mut()
        .unwrap()
        .remove("annotations")
        .unwrap();
    assert_eq!(annotations, values["serviceAccount"]["annotations"]);
    same_objects(docs, plain, "deploy/ccm/");
}

/// The chart refuses malformed GCP values and zones outside the region,
/// renders zones as one flag, renders no flag for an unset value (cnlb-ccm
/// then exits naming it), and ignores the gcp block with another provider.
#[test]
fn ccm_chart_checks_the_gcp_values() {
    let base = [
        "--set",
        "provider=gcp,gcp.project=my-project,gcp.region=us-central1,gcp.network=vpc-1,gcp.subnetwork=nodes",
    ];
    let with = |more: &[&str]| helm_template(NAME, &[base.as_slice(), more].concat());
    let container = |docs: &[Value]| -> Value {
        object(docs, "Deployment", NAME)["spec"]["template"]["spec"]["containers"][0].clone()
    };

    let docs = with(&["--set", "gcp.zones={us-central1-a,us-central1-c}"]).unwrap();
    let args = strings(&container(&docs)["args"]);
    assert_eq!(flag(&args, "gcp-zones"), "us-central1-a,us-central1-c");
    assert!(
        !args
            .iter()
            .any(|a| a.starts_with("--gcp-proxy-source-range")),
        "{args:?}"
    );
    let err = with(&["--set", "gcp.zones={us-central1-a,europe-west1-b}"]).unwrap_err();
    assert!(
        err.contains("europe-west1-b is not in gcp.region us-central1"),
        "{err}"
    );
    for (bad, at) in [
        ("gcp.project=My_Project", "/gcp/project"),
        ("gcp.region=us_central1", "/gcp/region"),
        ("gcp.network=projects/p/global/networks/n", "/gcp/network"),
        ("gcp.subnetwork=Nodes", "/gcp/subnetwork"),
        ("gcp.zones={us-central1}", "/gcp/zones"),
        (
            "gcp.proxySourceRanges={10.129.0.0}",
            "/gcp/proxySourceRanges",
        ),
        ("gcp.netwrk=vpc-1", "netwrk"),
    ] {
        let err = with(&["--set", bad]).unwrap_err();
        assert!(err.contains(at), "{bad}: {err}");
    }

    let docs = helm_template(NAME, &["--set", "provider=gcp"]).unwrap();
    let c = container(&docs);
    let args = strings(&c["args"]);
    assert!(!args.iter().any(|a| a.starts_with("--gcp-")), "{args:?}");
    let env: Vec<&Value> = c["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| &e["name"])
        .collect();
    // POD_IP: where the metrics server binds.
    assert_eq!(env, [&json!("POD_IP"), &json!("CNLB_CLUSTER_NAME")]);

    let docs = helm_template(
        NAME,
        &["--set", "gcp.project=my-project,gcp.region=us-central1"],
    )
    .unwrap();
    same_objects(docs, plain_manifests(), "deploy/ccm/");
}
