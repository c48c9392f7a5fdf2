//! Property tests of the annotation parser: any Service and any annotation
//! map parse without a panic, a bad annotation is reported under its own key,
//! and valid annotations, written as users write them, parse back to the
//! values they were written from. In-crate for the attribute tables of
//! `values`, which the generated attributes follow.
//!
//! `PROPTEST_CASES` sets the cases per property (`make fuzz` raises it).

use std::cell::Cell;
use std::collections::BTreeMap;
use std::fmt::Debug;
use std::net::{Ipv4Addr, Ipv6Addr};

use cnlb_provider_core::{HealthCheckPort, HealthCheckProtocol, IpAddressType, Listener, Protocol};
use k8s_openapi::api::core::v1::{ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use proptest::collection::{btree_map, btree_set, vec};
use proptest::option;
use proptest::prelude::*;
use proptest::sample::select;
use proptest::test_runner::{TestCaseResult, TestRunner};

use super::values::{AttributeValue, KNOWN_LB_ATTRIBUTES, KNOWN_TG_ATTRIBUTES, PROXY_PROTOCOL_V2};
use super::*;

const CLUSTER: &str = "prod-eu";

/// Runs `test` on inputs of `strategy` with proptest's default config (so
/// `PROPTEST_CASES` applies) and prints the number of cases run, which
/// `make fuzz` reports. No regression files: a failure prints its minimal
/// input, which then belongs in the table tests.
fn check<S>(name: &str, strategy: S, test: impl Fn(S::Value) -> TestCaseResult)
where
    S: Strategy,
    S::Value: Debug,
{
    let config = ProptestConfig {
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    let cases = Cell::new(0u64);
    let result = TestRunner::new(config).run(&strategy, |value| {
        cases.set(cases.get() + 1);
        test(value)
    });
    eprintln!("properties: {name}: {} cases", cases.get());
    if let Err(err) = result {
        panic!("{name}: {err}");
    }
}

// ------------------------------------------------------------ any input

/// Values that are valid for some key, nearly valid, or broken in the ways
/// users break them, so random maps reach past the first check of each
/// parser.
const VALUE_PARTS: &[&str] = &[
    "",
    " ",
    "true",
    "False",
    "0",
    "1",
    "t",
    "internal",
    "internet-facing",
    "Internal",
    "External",
    "ipv4",
    "dualstack",
    "external",
    "nlb-ip",
    "nlb",
    "ip",
    "instance",
    "*",
    "tcp",
    "HTTP",
    "https",
    "traffic-port",
    "+5",
    "-1",
    "2",
    "5",
    "10",
    "11",
    "120",
    "300",
    "301",
    "65535",
    "65536",
    "99999999999",
    "/",
    "/healthz",
    "/a b",
    "healthz",
    "200",
    "200-399",
    "399-200",
    "599",
    "600",
    "200,204",
    "subnet-1",
    "10.0.0.0/8",
    "10.0.0.0/33",
    "2001:db8::/32",
    "::/129",
    "10.0.0.1",
    "a=b",
    "a=",
    "=b",
    "a",
    "a=b,a=c",
    "deletion_protection.enabled=yes",
    "deletion_protection.enabled=true",
    "deregistration_delay.timeout_seconds=3601",
    "proxy_protocol_v2.enabled=false",
    "stickiness.type=source_ip",
    "cnlb.dev/owner=x",
    "aws:x=y",
    "elbv2.k8s.aws/cluster=x",
    r#"{"exposed_ports":{"80":{"name":"neg-a"}}}"#,
    r#"{"exposed_ports":{"81":{}}}"#,
    r#"{"exposed_ports":{"0":{}}}"#,
    r#"{"exposed_ports":{"http":{}}}"#,
    r#"{"ingress":true}"#,
    r#"{"other":1}"#,
    "{",
    "é",
    "\u{0}",
];

/// A value made of parts and separators, or any string at all.
fn any_value() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => vec(
            (select(VALUE_PARTS), select(&[",", ", ", " ", "=", ";", ""][..])),
            1..4
        )
        .prop_map(|parts| parts.into_iter().flat_map(|(p, s)| [p, s]).collect::<String>()),
        1 => any::<String>(),
    ]
}

fn unsupported_keys() -> Vec<&'static str> {
    UNSUPPORTED.iter().map(|(key, _)| *key).collect()
}

/// Keys cnlb reads, LBC keys it refuses (also as `<key>.<suffix>`), other
/// LBC keys, and anyone's keys.
fn any_key() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => select(SUPPORTED).prop_map(str::to_owned),
        2 => lbc_key_not_read(),
        1 => any::<String>(),
    ]
}

/// LBC keys cnlb refuses (also as `<key>.<suffix>`) and unknown ones.
fn lbc_key_not_read() -> impl Strategy<Value = String> {
    prop_oneof![
        select(unsupported_keys()).prop_map(str::to_owned),
        (select(unsupported_keys()), "[.a-zA-Z0-9-]{0,6}")
            .prop_map(|(key, rest)| format!("{key}{rest}")),
        "[a-z0-9.-]{0,12}"
            .prop_map(|rest| format!("{LBC_PREFIX}{rest}"))
            .prop_filter("not a key cnlb reads", |key| !SUPPORTED
                .contains(&key.as_str())),
    ]
}

fn any_service_port() -> impl Strategy<Value = ServicePort> {
    (
        // Few names and numbers, so that duplicates are common.
        option::of(select(&["", "http", "dns", "p"][..])),
        option::of(prop_oneof![
            6 => select(&["TCP", "UDP"][..]).prop_map(str::to_owned),
            1 => select(&["SCTP", "tcp", ""][..]).prop_map(str::to_owned),
            1 => any::<String>(),
        ]),
        prop_oneof![6 => select(&[53, 80, 443][..]), 1 => any::<i32>()],
        option::of(prop_oneof![
            4 => select(&[53, 80, 8080][..]).prop_map(IntOrString::Int),
            1 => any::<i32>().prop_map(IntOrString::Int),
            2 => select(&["", "web", "dns"][..]).prop_map(|s| IntOrString::String(s.to_owned())),
        ]),
    )
        .prop_map(|(name, protocol, port, target_port)| ServicePort {
            name: name.map(str::to_owned),
            protocol,
            port,
            target_port,
            ..ServicePort::default()
        })
}

/// Any Service: made up from parts, or a valid one (see [`wanted`]) with
/// random annotations and ports added, which gets past the first checks.
fn any_service() -> impl Strategy<Value = Service> {
    let id = || {
        prop_oneof![
            8 => select(&["default", "web", "uid-1"][..]).prop_map(|s| Some(s.to_owned())),
            1 => Just(None),
            1 => Just(Some(String::new())),
        ]
    };
    let made_up = (
        (id(), id(), id()),
        option::of(btree_map(any_key(), any_value(), 0..6)),
        prop_oneof![
            1 => Just(None),
            6 => vec(any_service_port(), 0..4).prop_map(Some),
        ],
        prop_oneof![
            3 => Just(None),
            1 => vec(
                prop_oneof![
                    select(&["10.0.0.0/8", " ::/0 "][..]).prop_map(str::to_owned),
                    any_value()
                ],
                0..3,
            )
            .prop_map(Some),
        ],
    )
        .prop_map(
            |((namespace, name, uid), annotations, ports, ranges)| Service {
                metadata: ObjectMeta {
                    namespace,
                    name,
                    uid,
                    annotations,
                    ..ObjectMeta::default()
                },
                spec: Some(ServiceSpec {
                    type_: Some("LoadBalancer".into()),
                    ports,
                    load_balancer_source_ranges: ranges,
                    ..ServiceSpec::default()
                }),
                ..Service::default()
            },
        );
    let edited = (
        wanted(),
        btree_map(any_key(), any_value(), 0..3),
        vec(any_service_port(), 0..2),
    )
        .prop_map(|(w, annotations, ports)| {
            let mut service = render(&w);
            service
                .metadata
                .annotations
                .get_or_insert_default()
                .extend(annotations);
            if let Some(spec) = &mut service.spec {
                spec.ports.get_or_insert_default().extend(ports);
            }
            service
        });
    prop_oneof![made_up, edited]
}

/// An error names what the user wrote: an annotation present on the
/// Service (with its raw value), or a Service field that exists.
fn names_what_is_at_fault(err: &AnnotationError, service: &Service) -> TestCaseResult {
    prop_assert!(
        err.to_string().starts_with(&format!("{}: ", err.key)),
        "{err}"
    );
    if let Some(value) = service
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(&err.key))
    {
        prop_assert_eq!(&err.value, value, "{}", err);
        return Ok(());
    }
    let spec = service.spec.as_ref();
    let ports = spec.and_then(|s| s.ports.as_ref()).map_or(0, Vec::len);
    let ranges = spec
        .and_then(|s| s.load_balancer_source_ranges.as_ref())
        .map_or(0, Vec::len);
    let indexed = |prefix: &str, len: usize, fields: &[&str]| {
        (0..len).any(|i| {
            let item = format!("{prefix}[{i}]");
            (fields.is_empty() && err.key == item)
                || fields.iter().any(|f| err.key == format!("{item}.{f}"))
        })
    };
    let known = [
        "metadata.namespace",
        "metadata.name",
        "metadata.uid",
        "spec.ports",
    ]
    .contains(&err.key.as_str())
        || indexed("spec.ports", ports, &["protocol", "port", "targetPort"])
        || indexed("spec.loadBalancerSourceRanges", ranges, &[]);
    prop_assert!(known, "the error names nothing the Service has: {}", err);
    Ok(())
}

#[test]
fn any_service_parses_or_names_what_is_wrong() {
    check(
        "any_service_parses_or_names_what_is_wrong",
        any_service(),
        |service| {
            match parse_service(&service, CLUSTER) {
                // What parses is what providers may rely on.
                Ok(spec) => {
                    prop_assert_eq!(spec.validate(), Ok(()));
                    prop_assert_eq!(&spec.clone().normalized(), &spec);
                }
                Err(errors) => {
                    prop_assert!(!errors.is_empty());
                    for err in &errors {
                        names_what_is_at_fault(err, &service)?;
                    }
                }
            }
            Ok(())
        },
    );
}

/// A service that parses: `default/web`, TCP 80 -> 8080.
fn valid_service(annotations: BTreeMap<String, String>) -> Service {
    Service {
        metadata: ObjectMeta {
            namespace: Some("default".into()),
            name: Some("web".into()),
            uid: Some("uid-1".into()),
            annotations: Some(annotations),
            ..ObjectMeta::default()
        },
        spec: Some(ServiceSpec {
            type_: Some("LoadBalancer".into()),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: 80,
                target_port: Some(IntOrString::Int(8080)),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// A value no parser of `key` accepts. Most values cnlb reads are words,
/// numbers, CIDRs, JSON or `k=v` lists, none of which takes a '~' without
/// an '=' before it; a subnet list fails only by naming no subnet. On a
/// TCP health check, any path or success codes are an error.
fn bad_value(key: &str) -> BoxedStrategy<String> {
    if key == SUBNETS {
        return "[ ,]{0,4}".boxed();
    }
    ("[a-z0-9]{0,4}", "[a-z0-9~/]{0,4}", "[ \t]{0,2}")
        .prop_map(|(before, after, pad)| format!("{pad}{before}~{after}{pad}"))
        .boxed()
}

/// One annotation with an error among good ones (none of them LBC's, so
/// the rest parses).
fn one_bad_annotation() -> impl Strategy<Value = (String, String, BTreeMap<String, String>)> {
    let bad = prop_oneof![
        select(SUPPORTED).prop_flat_map(|key| (Just(key.to_owned()), bad_value(key))),
        // Refused whatever their value.
        (lbc_key_not_read(), any_value()),
    ];
    let others = btree_map("[a-z]{1,8}\\.example/[a-z]{1,8}", any_value(), 0..3);
    (bad, others).prop_map(|((key, value), others)| (key, value, others))
}

#[test]
fn a_bad_annotation_is_reported_under_its_key() {
    check(
        "a_bad_annotation_is_reported_under_its_key",
        one_bad_annotation(),
        |(key, value, mut annotations)| {
            annotations.insert(key.clone(), value.clone());
            let errors = match parse_service(&valid_service(annotations), CLUSTER) {
                Ok(spec) => {
                    return Err(TestCaseError::fail(format!(
                        "{key}: {value:?} was accepted: {spec:?}"
                    )));
                }
                Err(errors) => errors,
            };
            prop_assert_eq!(errors.len(), 1, "{:?}", errors);
            prop_assert_eq!(&errors[0].key, &key);
            prop_assert_eq!(&errors[0].value, &value);
            prop_assert!(errors[0].to_string().starts_with(&key), "{}", errors[0]);
            Ok(())
        },
    );
}

// ------------------------------------------------------ valid, round trip

/// What a user asks for, typed; [`render`] writes it as a Service with
/// annotations, [`expected`] is the spec it must parse to.
#[derive(Debug, Clone)]
struct Wanted {
    namespace: String,
    name: String,
    uid: String,
    ports: Vec<WantedPort>,
    /// The scheme, and which of the three keys carry it (at least one).
    scheme: Option<(Scheme, [bool; 3])>,
    ip_address_type: Option<IpAddressType>,
    /// LBC's opt-in annotations: the current or the deprecated form.
    lbc_opt_in: Option<bool>,
    subnets: Option<Vec<String>>,
    health_check: WantedHealthCheck,
    /// Source ranges, and whether they are in the spec (else the annotation).
    source_ranges: Option<(Vec<String>, bool)>,
    /// Attributes as written and as canonicalised.
    attributes: Vec<(String, String, String)>,
    target_group_attributes: Vec<(String, String, String)>,
    proxy_protocol: bool,
    tags: BTreeMap<String, String>,
    /// NEG names by Service port number; `None`: no name.
    neg: Option<BTreeMap<u16, Option<String>>>,
    style: Style,
}

/// How a user spaces lists and values (all of which cnlb trims).
#[derive(Debug, Clone)]
struct Style {
    pad: &'static str,
    separator: &'static str,
    /// Go's `strconv.ParseBool` spellings of true and false.
    true_word: &'static str,
    false_word: &'static str,
}

#[derive(Debug, Clone)]
struct WantedPort {
    port: u16,
    kind: PortKind,
    target: WantedTarget,
    /// Left out of the Service when empty (a single-port Service).
    name: String,
    /// Whether the protocol is written out (TCP is the API default).
    explicit_tcp: bool,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum PortKind {
    Tcp,
    Udp,
    /// A TCP and a UDP port with one number: one TCP_UDP listener.
    Both,
}

/// Where a Service port sends traffic. A named port's listener takes the
/// Service port as its default target port.
#[derive(Debug, Clone)]
enum WantedTarget {
    /// No targetPort: the API server defaults it to the port.
    Default,
    Number(u16),
    Named(String),
}

#[derive(Debug, Clone)]
struct WantedHealthCheck {
    /// And whether it is written in upper case (LBC upper-cases it).
    protocol: Option<(HealthCheckProtocol, bool)>,
    port: Option<HealthCheckPort>,
    path: Option<String>,
    interval: Option<u32>,
    timeout: Option<u32>,
    healthy_threshold: Option<u32>,
    unhealthy_threshold: Option<u32>,
    /// Items of `200,204,300-310`.
    success_codes: Option<Vec<(u16, Option<u16>)>>,
}

fn style() -> impl Strategy<Value = Style> {
    (
        select(&["", " ", "  ", "\t"][..]),
        select(&[",", ", ", " , ", ",,"][..]),
        select(&["true", "True", "TRUE", "t", "T", "1"][..]),
        select(&["false", "False", "FALSE", "f", "F", "0"][..]),
    )
        .prop_map(|(pad, separator, true_word, false_word)| Style {
            pad,
            separator,
            true_word,
            false_word,
        })
}

fn ports() -> impl Strategy<Value = Vec<WantedPort>> {
    let target = prop_oneof![
        Just(WantedTarget::Default),
        (1..=u16::MAX).prop_map(WantedTarget::Number),
        "[a-z]{1,8}".prop_map(WantedTarget::Named),
    ];
    let one = (
        select(&[PortKind::Tcp, PortKind::Udp, PortKind::Both][..]),
        target,
        any::<bool>(),
    );
    (btree_set(1..=u16::MAX, 1..5), vec(one, 4), any::<bool>()).prop_map(
        |(numbers, kinds, unnamed)| {
            let single = numbers.len() == 1;
            numbers
                .into_iter()
                .zip(kinds)
                .enumerate()
                .map(|(i, (port, (kind, target, explicit_tcp)))| WantedPort {
                    port,
                    kind,
                    // TCP and UDP share the listener's target group: one number.
                    target: match (kind, target) {
                        (PortKind::Both, WantedTarget::Named(_)) => WantedTarget::Default,
                        (_, target) => target,
                    },
                    name: if single && unnamed && kind != PortKind::Both {
                        String::new()
                    } else {
                        format!("p{i}")
                    },
                    explicit_tcp,
                })
                .collect()
        },
    )
}

fn health_check() -> impl Strategy<Value = WantedHealthCheck> {
    let protocol = select(
        &[
            HealthCheckProtocol::Tcp,
            HealthCheckProtocol::Http,
            HealthCheckProtocol::Https,
        ][..],
    );
    let code = 200..=599u16;
    let codes = vec(
        (code.clone(), option::of(code)).prop_map(|(a, b)| match b {
            Some(b) => (a.min(b), Some(a.max(b))),
            None => (a, None),
        }),
        1..4,
    );
    (
        option::of((protocol, any::<bool>())),
        option::of(prop_oneof![
            Just(HealthCheckPort::TrafficPort),
            (1..=u16::MAX).prop_map(HealthCheckPort::Port),
        ]),
        option::of("/[a-zA-Z0-9/._~%?=&-]{0,30}"),
        (option::of(5..=300u32), option::of(2..=120u32)),
        (option::of(2..=10u32), option::of(2..=10u32)),
        option::of(codes),
    )
        .prop_map(
            |(protocol, port, path, (interval, mut timeout), (healthy, unhealthy), codes)| {
                // A probe may not outlive its interval (defaults: 10 s each).
                let effective_interval = interval.unwrap_or(10);
                if timeout.unwrap_or(10) > effective_interval {
                    timeout = Some(effective_interval.min(120));
                }
                // Paths and codes are for HTTP(S) checks only.
                let http = protocol.is_some_and(|(p, _)| p != HealthCheckProtocol::Tcp);
                WantedHealthCheck {
                    protocol,
                    port,
                    path: path.filter(|_| http),
                    interval,
                    timeout,
                    healthy_threshold: healthy,
                    unhealthy_threshold: unhealthy,
                    success_codes: codes.filter(|_| http),
                }
            },
        )
}

fn cidr() -> impl Strategy<Value = String> {
    prop_oneof![
        (any::<u32>(), 0..=32u8).prop_map(|(a, p)| format!("{}/{p}", Ipv4Addr::from(a))),
        (any::<u128>(), 0..=128u8).prop_map(|(a, p)| format!("{}/{p}", Ipv6Addr::from(a))),
    ]
}

/// Attributes as written and canonicalised: known keys (from the parser's
/// own tables) with a valid value of their kind, and keys cnlb passes
/// through unchecked.
fn attributes(
    known: &'static [(&'static str, AttributeValue)],
) -> impl Strategy<Value = Vec<(String, String, String)>> {
    let known_one = select(known).prop_flat_map(|(key, kind)| {
        let value: BoxedStrategy<(String, String)> = match kind {
            AttributeValue::Bool => prop_oneof![
                select(&["true", "True", "TRUE", "t", "T", "1"][..])
                    .prop_map(|w| (w.to_owned(), "true".to_owned())),
                select(&["false", "False", "FALSE", "f", "F", "0"][..])
                    .prop_map(|w| (w.to_owned(), "false".to_owned())),
            ]
            .boxed(),
            AttributeValue::Int(range) => (range.min..=range.max, 0..3usize)
                .prop_map(|(n, zeros)| (format!("{}{n}", "0".repeat(zeros)), n.to_string()))
                .boxed(),
            AttributeValue::OneOf(names) => select(names)
                .prop_map(|name| (name.to_owned(), name.to_owned()))
                .boxed(),
        };
        (Just(key.to_owned()), value)
    });
    let unknown = (
        "[a-z][a-z_.]{0,20}".prop_filter("not a known attribute", move |key| {
            known.iter().all(|(name, _)| name != key)
        }),
        "[a-zA-Z0-9_./:=-]{0,12}",
    )
        .prop_map(|(key, value)| (key, (value.clone(), value)));
    // A key given twice is an error: one value per key.
    vec(prop_oneof![known_one, unknown], 0..4).prop_map(|items| {
        let unique: BTreeMap<String, (String, String)> = items.into_iter().collect();
        unique
            .into_iter()
            .map(|(key, (written, canonical))| (key, written, canonical))
            .collect()
    })
}

fn tags() -> impl Strategy<Value = BTreeMap<String, String>> {
    btree_map(
        "[a-zA-Z][a-zA-Z0-9_.:/+@-]{0,20}( [a-z]{1,3})?".prop_filter("not reserved", |key| {
            !RESERVED_TAG_PREFIXES.iter().any(|p| key.starts_with(p))
                && !key.to_ascii_lowercase().starts_with("aws:")
        }),
        "([a-zA-Z0-9_.:/+@=-]{1,10}( [a-z]{1,3})?)?",
        0..4,
    )
}

fn wanted() -> impl Strategy<Value = Wanted> {
    let scheme = (
        select(&[Scheme::Internal, Scheme::InternetFacing][..]),
        any::<[bool; 3]>(),
    )
        .prop_map(|(scheme, mut keys)| {
            if keys == [false; 3] {
                keys[0] = true;
            }
            (scheme, keys)
        });
    (
        (
            "[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?",
            "[a-z]([a-z0-9-]{0,10}[a-z0-9])?",
            "[0-9a-f-]{1,36}",
            ports(),
            style(),
        ),
        (
            option::of(scheme),
            option::of(select(&[IpAddressType::Ipv4, IpAddressType::DualStack][..])),
            option::of(any::<bool>()),
            option::of(vec("subnet-[a-z0-9]{1,8}|rack [0-9]", 1..4)),
            health_check(),
            option::of((vec(cidr(), 1..4), any::<bool>())),
        ),
        (
            attributes(KNOWN_LB_ATTRIBUTES),
            attributes(KNOWN_TG_ATTRIBUTES),
            any::<bool>(),
            tags(),
            option::of(btree_map(
                0..8usize,
                option::of("[a-z]([a-z0-9-]{0,10})"),
                0..3,
            )),
        ),
    )
        .prop_map(
            |(
                (namespace, name, uid, ports, style),
                (scheme, ip_address_type, lbc_opt_in, subnets, health_check, source_ranges),
                (attributes, mut target_group_attributes, proxy_protocol, tags, neg),
            )| {
                // The two ways to ask for proxy protocol must agree.
                if proxy_protocol {
                    target_group_attributes
                        .retain(|(k, _, c)| k != PROXY_PROTOCOL_V2 || c == "true");
                }
                // NEGs name Service ports (picked by index).
                let neg = neg.map(|names| {
                    names
                        .into_iter()
                        .map(|(i, name)| (ports[i % ports.len()].port, name))
                        .collect()
                });
                Wanted {
                    namespace,
                    name,
                    uid,
                    ports,
                    scheme,
                    ip_address_type,
                    lbc_opt_in,
                    subnets,
                    health_check,
                    source_ranges,
                    attributes,
                    target_group_attributes,
                    proxy_protocol,
                    tags,
                    neg,
                    style,
                }
            },
        )
}

/// `w` as a user writes it: LBC's annotation syntax, GKE's JSON, the
/// Service's own fields.
fn render(w: &Wanted) -> Service {
    let style = &w.style;
    let mut annotations = BTreeMap::new();
    let mut put = |key: &str, value: String| {
        annotations.insert(key.to_owned(), format!("{}{value}{}", style.pad, style.pad));
    };
    let list = |items: &mut dyn Iterator<Item = String>| -> String {
        items.collect::<Vec<_>>().join(style.separator)
    };
    let pairs = |items: &[(String, String, String)]| -> String {
        list(
            &mut items
                .iter()
                .map(|(k, v, _)| format!("{k}{}={}{v}", style.pad, style.pad)),
        )
    };
    if let Some((scheme, [by_scheme, by_internal, by_gke])) = w.scheme {
        let internal = scheme == Scheme::Internal;
        if by_scheme {
            put(SCHEME, scheme.as_str().to_owned());
        }
        if by_internal {
            let word = if internal {
                style.true_word
            } else {
                style.false_word
            };
            put(INTERNAL, word.to_owned());
        }
        if by_gke {
            put(
                GKE_LOAD_BALANCER_TYPE,
                (if internal { "Internal" } else { "External" }).to_owned(),
            );
        }
    }
    if let Some(t) = w.ip_address_type {
        put(IP_ADDRESS_TYPE, t.as_str().to_owned());
    }
    match w.lbc_opt_in {
        Some(true) => {
            put(TYPE, "external".to_owned());
            put(NLB_TARGET_TYPE, "ip".to_owned());
        }
        Some(false) => put(TYPE, "nlb-ip".to_owned()),
        None => {}
    }
    if let Some(subnets) = &w.subnets {
        put(SUBNETS, list(&mut subnets.iter().cloned()));
    }
    let hc = &w.health_check;
    if let Some((protocol, upper)) = hc.protocol {
        let word = match protocol {
            HealthCheckProtocol::Tcp => "tcp",
            HealthCheckProtocol::Http => "http",
            HealthCheckProtocol::Https => "https",
        };
        put(
            HEALTHCHECK_PROTOCOL,
            if upper {
                word.to_ascii_uppercase()
            } else {
                word.to_owned()
            },
        );
    }
    match hc.port {
        Some(HealthCheckPort::TrafficPort) => put(HEALTHCHECK_PORT, "traffic-port".to_owned()),
        Some(HealthCheckPort::Port(n)) => put(HEALTHCHECK_PORT, n.to_string()),
        None => {}
    }
    if let Some(path) = &hc.path {
        put(HEALTHCHECK_PATH, path.clone());
    }
    for (key, n) in [
        (HEALTHCHECK_INTERVAL, hc.interval),
        (HEALTHCHECK_TIMEOUT, hc.timeout),
        (HEALTHCHECK_HEALTHY_THRESHOLD, hc.healthy_threshold),
        (HEALTHCHECK_UNHEALTHY_THRESHOLD, hc.unhealthy_threshold),
    ] {
        if let Some(n) = n {
            put(key, n.to_string());
        }
    }
    if let Some(codes) = &hc.success_codes {
        // A plain string for the cloud, not a list: no empty items.
        let separator = style.separator.replace(",,", ",");
        let codes: Vec<String> = codes.iter().map(code_text).collect();
        put(HEALTHCHECK_SUCCESS_CODES, codes.join(&separator));
    }
    let mut spec_ranges = None;
    if let Some((ranges, in_spec)) = &w.source_ranges {
        if *in_spec {
            spec_ranges = Some(ranges.iter().map(|r| format!("{}{r}", style.pad)).collect());
        } else {
            put(SOURCE_RANGES, list(&mut ranges.iter().cloned()));
        }
    }
    if !w.attributes.is_empty() {
        put(ATTRIBUTES, pairs(&w.attributes));
    }
    if !w.target_group_attributes.is_empty() {
        put(TARGET_GROUP_ATTRIBUTES, pairs(&w.target_group_attributes));
    }
    if w.proxy_protocol {
        put(PROXY_PROTOCOL, "*".to_owned());
    }
    if !w.tags.is_empty() {
        put(
            ADDITIONAL_RESOURCE_TAGS,
            list(&mut w.tags.iter().map(|(k, v)| format!("{k}={v}"))),
        );
    }
    if let Some(neg) = &w.neg {
        let exposed: serde_json::Map<String, serde_json::Value> = neg
            .iter()
            .map(|(port, name)| {
                let entry = match name {
                    Some(name) => serde_json::json!({ "name": name }),
                    None => serde_json::json!({}),
                };
                (port.to_string(), entry)
            })
            .collect();
        put(
            GKE_NEG,
            serde_json::json!({ "exposed_ports": exposed }).to_string(),
        );
    }

    let mut service_ports = Vec::new();
    for p in &w.ports {
        let target_port = match &p.target {
            WantedTarget::Default => None,
            WantedTarget::Number(n) => Some(IntOrString::Int(i32::from(*n))),
            WantedTarget::Named(name) => Some(IntOrString::String(name.clone())),
        };
        let port = |name: String, protocol: Option<&str>| ServicePort {
            name: (!name.is_empty()).then_some(name),
            protocol: protocol.map(str::to_owned),
            port: i32::from(p.port),
            target_port: target_port.clone(),
            ..ServicePort::default()
        };
        let tcp = p.explicit_tcp.then_some("TCP");
        match p.kind {
            PortKind::Tcp => service_ports.push(port(p.name.clone(), tcp)),
            PortKind::Udp => service_ports.push(port(p.name.clone(), Some("UDP"))),
            // UDP first: the listener keeps the TCP port's name either way.
            PortKind::Both => {
                service_ports.push(port(format!("{}-udp", p.name), Some("UDP")));
                service_ports.push(port(p.name.clone(), tcp));
            }
        }
    }
    Service {
        metadata: ObjectMeta {
            namespace: Some(w.namespace.clone()),
            name: Some(w.name.clone()),
            uid: Some(w.uid.clone()),
            annotations: Some(annotations),
            ..ObjectMeta::default()
        },
        spec: Some(ServiceSpec {
            type_: Some("LoadBalancer".into()),
            ports: Some(service_ports),
            load_balancer_source_ranges: spec_ranges,
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

fn code_text(&(lo, hi): &(u16, Option<u16>)) -> String {
    match hi {
        Some(hi) => format!("{lo}-{hi}"),
        None => lo.to_string(),
    }
}

/// The spec `w` means, built from the model's defaults.
fn expected(w: &Wanted) -> LoadBalancerSpec {
    let mut spec =
        LoadBalancerSpec::new(LoadBalancerKey::new(CLUSTER, &w.namespace, &w.name, &w.uid));
    spec.listeners = w
        .ports
        .iter()
        .map(|p| Listener {
            name: p.name.clone(),
            protocol: match p.kind {
                PortKind::Tcp => Protocol::Tcp,
                PortKind::Udp => Protocol::Udp,
                PortKind::Both => Protocol::TcpUdp,
            },
            port: p.port,
            target_port: match p.target {
                WantedTarget::Number(n) => n,
                WantedTarget::Default | WantedTarget::Named(_) => p.port,
            },
        })
        .collect();
    if let Some((scheme, _)) = w.scheme {
        spec.scheme = scheme;
    }
    spec.ip_address_type = w.ip_address_type.unwrap_or_default();
    spec.subnets = w.subnets.clone();
    let hc = &w.health_check;
    let mut health_check = HealthCheck::default();
    if let Some((protocol, _)) = hc.protocol {
        health_check.protocol = protocol;
    }
    if let Some(port) = hc.port {
        health_check.port = port;
    }
    let seconds = |n: u32| Duration::from_secs(u64::from(n));
    if let Some(n) = hc.interval {
        health_check.interval = seconds(n);
    }
    if let Some(n) = hc.timeout {
        health_check.timeout = seconds(n);
    }
    if let Some(n) = hc.healthy_threshold {
        health_check.healthy_threshold = n;
    }
    if let Some(n) = hc.unhealthy_threshold {
        health_check.unhealthy_threshold = n;
    }
    if health_check.protocol != HealthCheckProtocol::Tcp {
        health_check.path = Some(hc.path.clone().unwrap_or_else(|| "/".to_owned()));
    }
    if let Some(codes) = &hc.success_codes {
        health_check.success_codes = codes.iter().map(code_text).collect::<Vec<_>>().join(",");
    }
    spec.health_check = health_check;
    spec.source_ranges = w.source_ranges.clone().map(|(r, _)| r).unwrap_or_default();
    let canonical = |items: &[(String, String, String)]| -> BTreeMap<String, String> {
        items
            .iter()
            .map(|(k, _, c)| (k.clone(), c.clone()))
            .collect()
    };
    spec.attributes = canonical(&w.attributes);
    spec.target_group_attributes = canonical(&w.target_group_attributes);
    if w.proxy_protocol {
        spec.target_group_attributes
            .insert(PROXY_PROTOCOL_V2.to_owned(), "true".to_owned());
    }
    spec.tags = w.tags.clone();
    for (port, name) in w.neg.iter().flatten() {
        if let (Some(p), Some(name)) = (w.ports.iter().find(|p| p.port == *port), name) {
            spec.target_group_names.insert(p.name.clone(), name.clone());
        }
    }
    spec.normalized()
}

#[test]
fn valid_annotations_round_trip() {
    check("valid_annotations_round_trip", wanted(), |w| {
        prop_assert_eq!(parse_service(&render(&w), CLUSTER), Ok(expected(&w)));
        Ok(())
    });
}
