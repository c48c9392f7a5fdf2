use cnlb_provider_core::{HealthCheckPort, IpAddressType, Listener, Protocol};
use k8s_openapi::api::core::v1::{ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::*;

const CLUSTER: &str = "prod-eu";

fn port(name: &str, protocol: &str, port: i32, target: Option<IntOrString>) -> ServicePort {
    ServicePort {
        name: Some(name.to_owned()),
        protocol: Some(protocol.to_owned()),
        port,
        target_port: target,
        ..ServicePort::default()
    }
}

/// `default/web`, one TCP port 80 -> 8080 named `http`.
fn service(annotations: &[(&str, &str)]) -> Service {
    Service {
        metadata: ObjectMeta {
            namespace: Some("default".into()),
            name: Some("web".into()),
            uid: Some("uid-1".into()),
            annotations: Some(
                annotations
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
            ),
            ..ObjectMeta::default()
        },
        spec: Some(ServiceSpec {
            type_: Some("LoadBalancer".into()),
            ports: Some(vec![port("http", "TCP", 80, Some(IntOrString::Int(8080)))]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

fn with_ports(ports: Vec<ServicePort>) -> Service {
    let mut svc = service(&[]);
    svc.spec.as_mut().unwrap().ports = Some(ports);
    svc
}

/// What [`service`] with no annotations parses to.
fn plain_spec() -> LoadBalancerSpec {
    let mut spec = LoadBalancerSpec::new(LoadBalancerKey::new(CLUSTER, "default", "web", "uid-1"));
    spec.listeners = vec![listener("http", Protocol::Tcp, 80, 8080)];
    spec
}

fn listener(name: &str, protocol: Protocol, port: u16, target_port: u16) -> Listener {
    Listener {
        name: name.into(),
        protocol,
        port,
        target_port,
    }
}

fn parse(annotations: &[(&str, &str)]) -> Result<LoadBalancerSpec, Vec<AnnotationError>> {
    parse_service(&service(annotations), CLUSTER)
}

fn errors_of(svc: &Service) -> Vec<AnnotationError> {
    match parse_service(svc, CLUSTER) {
        Ok(spec) => panic!("expected errors, got {spec:?}"),
        Err(errors) => errors,
    }
}

fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

#[test]
fn plain_service_gets_the_lbc_defaults() {
    let spec = parse(&[]).unwrap();
    assert_eq!(spec, plain_spec());
    assert_eq!(spec.scheme, Scheme::Internal);
    assert_eq!(spec.ip_address_type, IpAddressType::Ipv4);
    assert_eq!(spec.health_check, HealthCheck::default());
    assert_eq!(spec.subnets, None);
    assert!(spec.source_ranges.is_empty() && spec.tags.is_empty());
    assert!(spec.attributes.is_empty() && spec.target_group_attributes.is_empty());

    // No annotations at all, and annotations of other owners, are the same.
    let mut bare = service(&[]);
    bare.metadata.annotations = None;
    assert_eq!(parse_service(&bare, CLUSTER), Ok(plain_spec()));
    let other = [
        ("example.com/owner", "team-a"),
        (
            "service.beta.kubernetes.io/azure-load-balancer-internal",
            "true",
        ),
    ];
    assert_eq!(parse(&other), Ok(plain_spec()));
}

#[test]
fn error_display() {
    let err = AnnotationError::new(SCHEME, "public", "must be one of internal, internet-facing");
    assert_eq!(
        err.to_string(),
        "service.beta.kubernetes.io/aws-load-balancer-scheme: \"public\": \
         must be one of internal, internet-facing"
    );
    assert_eq!(parse(&[(SCHEME, "public")]), Err(vec![err]));
}

type Edit = fn(&mut LoadBalancerSpec);
/// A Service's annotations in a test table.
type Pairs<'a> = &'a [(&'a str, &'a str)];

#[test]
fn good_values() {
    let cases: &[(Pairs, Edit)] = &[
        (&[(SCHEME, "internet-facing")], |s| {
            s.scheme = Scheme::InternetFacing
        }),
        (&[(SCHEME, "internal")], |_| {}),
        (&[(SCHEME, " internet-facing ")], |s| {
            s.scheme = Scheme::InternetFacing
        }),
        (&[(INTERNAL, "true")], |_| {}),
        (&[(INTERNAL, "True")], |_| {}),
        (&[(INTERNAL, "false")], |s| {
            s.scheme = Scheme::InternetFacing
        }),
        (&[(INTERNAL, "0")], |s| s.scheme = Scheme::InternetFacing),
        (&[(SCHEME, "internet-facing"), (INTERNAL, "false")], |s| {
            s.scheme = Scheme::InternetFacing
        }),
        (&[(SCHEME, "internal"), (INTERNAL, "true")], |_| {}),
        (&[(IP_ADDRESS_TYPE, "ipv4")], |_| {}),
        (&[(IP_ADDRESS_TYPE, "dualstack")], |s| {
            s.ip_address_type = IpAddressType::DualStack
        }),
        (&[(SUBNETS, "subnet-0abc, my-subnet,,")], |s| {
            s.subnets = Some(vec!["my-subnet".into(), "subnet-0abc".into()])
        }),
        (&[(HEALTHCHECK_PROTOCOL, "tcp")], |_| {}),
        (&[(HEALTHCHECK_PROTOCOL, "HTTP")], |s| {
            s.health_check.protocol = HealthCheckProtocol::Http;
            s.health_check.path = Some("/".into());
        }),
        (
            &[
                (HEALTHCHECK_PROTOCOL, "Https"),
                (HEALTHCHECK_PATH, "/healthz?full=1"),
                (HEALTHCHECK_SUCCESS_CODES, "200, 204-206"),
            ],
            |s| {
                s.health_check.protocol = HealthCheckProtocol::Https;
                s.health_check.path = Some("/healthz?full=1".into());
                s.health_check.success_codes = "200,204-206".into();
            },
        ),
        (&[(HEALTHCHECK_PORT, "traffic-port")], |_| {}),
        (&[(HEALTHCHECK_PORT, "8081")], |s| {
            s.health_check.port = HealthCheckPort::Port(8081)
        }),
        (&[(HEALTHCHECK_PORT, "65535")], |s| {
            s.health_check.port = HealthCheckPort::Port(65535)
        }),
        (
            &[(HEALTHCHECK_INTERVAL, "30"), (HEALTHCHECK_TIMEOUT, "5")],
            |s| {
                s.health_check.interval = Duration::from_secs(30);
                s.health_check.timeout = Duration::from_secs(5);
            },
        ),
        (
            &[(HEALTHCHECK_INTERVAL, "300"), (HEALTHCHECK_TIMEOUT, "120")],
            |s| {
                s.health_check.interval = Duration::from_secs(300);
                s.health_check.timeout = Duration::from_secs(120);
            },
        ),
        (
            &[(HEALTHCHECK_INTERVAL, "5"), (HEALTHCHECK_TIMEOUT, "2")],
            |s| {
                s.health_check.interval = Duration::from_secs(5);
                s.health_check.timeout = Duration::from_secs(2);
            },
        ),
        (
            &[
                (HEALTHCHECK_HEALTHY_THRESHOLD, "2"),
                (HEALTHCHECK_UNHEALTHY_THRESHOLD, "10"),
            ],
            |s| {
                s.health_check.healthy_threshold = 2;
                s.health_check.unhealthy_threshold = 10;
            },
        ),
        (
            &[(
                ATTRIBUTES,
                "load_balancing.cross_zone.enabled=True, deletion_protection.enabled = false, \
                 access_logs.s3.bucket=my-bucket",
            )],
            |s| {
                s.attributes = map(&[
                    ("load_balancing.cross_zone.enabled", "true"),
                    ("deletion_protection.enabled", "false"),
                    ("access_logs.s3.bucket", "my-bucket"),
                ])
            },
        ),
        (&[(ATTRIBUTES, "")], |_| {}),
        (
            &[(
                TARGET_GROUP_ATTRIBUTES,
                "deregistration_delay.timeout_seconds=0,preserve_client_ip.enabled=t,\
                 load_balancing.cross_zone.enabled=use_load_balancer_configuration,new.key=x",
            )],
            |s| {
                s.target_group_attributes = map(&[
                    ("deregistration_delay.timeout_seconds", "0"),
                    ("preserve_client_ip.enabled", "true"),
                    (
                        "load_balancing.cross_zone.enabled",
                        "use_load_balancer_configuration",
                    ),
                    ("new.key", "x"),
                ])
            },
        ),
        (
            &[(
                TARGET_GROUP_ATTRIBUTES,
                "deregistration_delay.timeout_seconds=3600",
            )],
            |s| {
                s.target_group_attributes = map(&[("deregistration_delay.timeout_seconds", "3600")])
            },
        ),
        (&[(PROXY_PROTOCOL, "*")], |s| {
            s.target_group_attributes = map(&[("proxy_protocol_v2.enabled", "true")])
        }),
        (
            &[
                (PROXY_PROTOCOL, "*"),
                (TARGET_GROUP_ATTRIBUTES, "proxy_protocol_v2.enabled=TRUE"),
            ],
            |s| s.target_group_attributes = map(&[("proxy_protocol_v2.enabled", "true")]),
        ),
        (
            &[(
                ADDITIONAL_RESOURCE_TAGS,
                "team=web, cost-center = 42,empty=",
            )],
            |s| s.tags = map(&[("team", "web"), ("cost-center", "42"), ("empty", "")]),
        ),
        (&[(SOURCE_RANGES, "2001:db8::/32, 10.0.0.0/8")], |s| {
            s.source_ranges = vec!["10.0.0.0/8".into(), "2001:db8::/32".into()]
        }),
        (&[(TYPE, "external"), (NLB_TARGET_TYPE, "ip")], |_| {}),
        (&[(TYPE, "nlb-ip")], |_| {}),
    ];
    for (annotations, edit) in cases {
        let mut want = plain_spec();
        edit(&mut want);
        assert_eq!(parse(annotations), Ok(want.normalized()), "{annotations:?}");
    }
}

#[test]
fn bad_values() {
    let long_key = format!("{}=v", "k".repeat(129));
    let long_value = format!("k={}", "v".repeat(257));
    let http = (HEALTHCHECK_PROTOCOL, "http");
    // (annotations, the one key in error, part of its reason)
    let cases: &[(Pairs, &str, &str)] = &[
        (
            &[(SCHEME, "public")],
            SCHEME,
            "must be one of internal, internet-facing",
        ),
        (&[(SCHEME, "Internal")], SCHEME, "must be one of"),
        (&[(SCHEME, "")], SCHEME, "must be one of"),
        (&[(INTERNAL, "yes")], INTERNAL, "must be true or false"),
        (
            &[(SCHEME, "internet-facing"), (INTERNAL, "true")],
            INTERNAL,
            "conflicts with service.beta.kubernetes.io/aws-load-balancer-scheme",
        ),
        (
            &[(IP_ADDRESS_TYPE, "ipv6")],
            IP_ADDRESS_TYPE,
            "must be one of ipv4, dualstack",
        ),
        (&[(SUBNETS, " , ")], SUBNETS, "at least one subnet"),
        (&[(TYPE, "nlb")], TYPE, "Pod IPs only"),
        (&[(TYPE, "alb")], TYPE, "must be one of external, nlb-ip"),
        (
            &[(NLB_TARGET_TYPE, "instance")],
            NLB_TARGET_TYPE,
            "Pod IPs only",
        ),
        (&[(NLB_TARGET_TYPE, "pod")], NLB_TARGET_TYPE, "must be ip"),
        (
            &[(HEALTHCHECK_PROTOCOL, "udp")],
            HEALTHCHECK_PROTOCOL,
            "must be one of tcp, http, https",
        ),
        (
            &[(HEALTHCHECK_PORT, "0")],
            HEALTHCHECK_PORT,
            "traffic-port or an integer",
        ),
        (
            &[(HEALTHCHECK_PORT, "65536")],
            HEALTHCHECK_PORT,
            "traffic-port or an integer",
        ),
        (
            &[(HEALTHCHECK_PORT, "http")],
            HEALTHCHECK_PORT,
            "traffic-port or an integer",
        ),
        (
            &[(HEALTHCHECK_PATH, "/healthz")],
            HEALTHCHECK_PATH,
            "only applies to http",
        ),
        (
            &[http, (HEALTHCHECK_PATH, "healthz")],
            HEALTHCHECK_PATH,
            "must start with '/'",
        ),
        (
            &[http, (HEALTHCHECK_PATH, "/a b")],
            HEALTHCHECK_PATH,
            "without spaces",
        ),
        (
            &[(HEALTHCHECK_INTERVAL, "4")],
            HEALTHCHECK_INTERVAL,
            "from 5 to 300",
        ),
        (
            &[(HEALTHCHECK_INTERVAL, "301")],
            HEALTHCHECK_INTERVAL,
            "from 5 to 300",
        ),
        (
            &[(HEALTHCHECK_INTERVAL, "10s")],
            HEALTHCHECK_INTERVAL,
            "from 5 to 300",
        ),
        (
            &[(HEALTHCHECK_INTERVAL, "+10")],
            HEALTHCHECK_INTERVAL,
            "from 5 to 300",
        ),
        (
            &[(HEALTHCHECK_INTERVAL, "")],
            HEALTHCHECK_INTERVAL,
            "from 5 to 300",
        ),
        (
            &[(HEALTHCHECK_INTERVAL, "99999999999")],
            HEALTHCHECK_INTERVAL,
            "from 5 to 300",
        ),
        (
            &[(HEALTHCHECK_TIMEOUT, "1")],
            HEALTHCHECK_TIMEOUT,
            "from 2 to 120",
        ),
        (
            &[(HEALTHCHECK_TIMEOUT, "121")],
            HEALTHCHECK_TIMEOUT,
            "from 2 to 120",
        ),
        (
            &[(HEALTHCHECK_TIMEOUT, "20")],
            HEALTHCHECK_TIMEOUT,
            "must not be longer than the interval (10s)",
        ),
        (
            &[(HEALTHCHECK_INTERVAL, "5")],
            HEALTHCHECK_INTERVAL,
            "must not be shorter than the timeout (10s)",
        ),
        (
            &[(HEALTHCHECK_HEALTHY_THRESHOLD, "1")],
            HEALTHCHECK_HEALTHY_THRESHOLD,
            "from 2 to 10",
        ),
        (
            &[(HEALTHCHECK_UNHEALTHY_THRESHOLD, "11")],
            HEALTHCHECK_UNHEALTHY_THRESHOLD,
            "from 2 to 10",
        ),
        (
            &[(HEALTHCHECK_SUCCESS_CODES, "200-399")],
            HEALTHCHECK_SUCCESS_CODES,
            "only applies to http",
        ),
        (
            &[http, (HEALTHCHECK_SUCCESS_CODES, "2xx")],
            HEALTHCHECK_SUCCESS_CODES,
            "200 to 599",
        ),
        (
            &[http, (HEALTHCHECK_SUCCESS_CODES, "100")],
            HEALTHCHECK_SUCCESS_CODES,
            "200 to 599",
        ),
        (
            &[http, (HEALTHCHECK_SUCCESS_CODES, "600")],
            HEALTHCHECK_SUCCESS_CODES,
            "200 to 599",
        ),
        (
            &[http, (HEALTHCHECK_SUCCESS_CODES, "399-200")],
            HEALTHCHECK_SUCCESS_CODES,
            "200 to 599",
        ),
        (
            &[http, (HEALTHCHECK_SUCCESS_CODES, "200,,204")],
            HEALTHCHECK_SUCCESS_CODES,
            "200 to 599",
        ),
        (
            &[(ATTRIBUTES, "deletion_protection.enabled=yes")],
            ATTRIBUTES,
            "deletion_protection.enabled=\"yes\" must be true or false",
        ),
        (
            &[(ATTRIBUTES, "dns_record.client_routing_policy=nearest")],
            ATTRIBUTES,
            "must be one of any_availability_zone",
        ),
        (
            &[(ATTRIBUTES, "novalue")],
            ATTRIBUTES,
            "\"novalue\" is not key=value",
        ),
        (&[(ATTRIBUTES, "=x")], ATTRIBUTES, "has an empty key"),
        (
            &[(ATTRIBUTES, "a=1, a=2")],
            ATTRIBUTES,
            "key \"a\" is given twice",
        ),
        (
            &[(
                TARGET_GROUP_ATTRIBUTES,
                "deregistration_delay.timeout_seconds=3601",
            )],
            TARGET_GROUP_ATTRIBUTES,
            "from 0 to 3600",
        ),
        (
            &[(
                TARGET_GROUP_ATTRIBUTES,
                "deregistration_delay.timeout_seconds=-1",
            )],
            TARGET_GROUP_ATTRIBUTES,
            "from 0 to 3600",
        ),
        (
            &[(TARGET_GROUP_ATTRIBUTES, "preserve_client_ip.enabled=maybe")],
            TARGET_GROUP_ATTRIBUTES,
            "must be true or false",
        ),
        (
            &[(TARGET_GROUP_ATTRIBUTES, "proxy_protocol_v2.enabled=on")],
            TARGET_GROUP_ATTRIBUTES,
            "must be true or false",
        ),
        (&[(PROXY_PROTOCOL, "true")], PROXY_PROTOCOL, "must be \"*\""),
        (
            &[
                (PROXY_PROTOCOL, "*"),
                (TARGET_GROUP_ATTRIBUTES, "proxy_protocol_v2.enabled=false"),
            ],
            PROXY_PROTOCOL,
            "conflicts with proxy_protocol_v2.enabled=false",
        ),
        (
            &[(ADDITIONAL_RESOURCE_TAGS, "cnlb.dev/cluster=evil")],
            ADDITIONAL_RESOURCE_TAGS,
            "the prefix cnlb.dev/ is reserved for ownership tags",
        ),
        (
            &[(ADDITIONAL_RESOURCE_TAGS, "team=web,elbv2.k8s.aws/cluster=x")],
            ADDITIONAL_RESOURCE_TAGS,
            "the prefix elbv2.k8s.aws/ is reserved",
        ),
        (
            &[(
                ADDITIONAL_RESOURCE_TAGS,
                "service.k8s.aws/stack=default/web",
            )],
            ADDITIONAL_RESOURCE_TAGS,
            "the prefix service.k8s.aws/ is reserved",
        ),
        (
            &[(ADDITIONAL_RESOURCE_TAGS, "AWS:cloudformation=x")],
            ADDITIONAL_RESOURCE_TAGS,
            "reserved by AWS",
        ),
        (
            &[(ADDITIONAL_RESOURCE_TAGS, &long_key)],
            ADDITIONAL_RESOURCE_TAGS,
            "at most 128",
        ),
        (
            &[(ADDITIONAL_RESOURCE_TAGS, &long_value)],
            ADDITIONAL_RESOURCE_TAGS,
            "at most 256",
        ),
        (
            &[(SOURCE_RANGES, "10.0.0.0/8, 10.0.0.0/33, 1.2.3.4")],
            SOURCE_RANGES,
            "not CIDRs (like 10.0.0.0/8 or 2001:db8::/32): \"10.0.0.0/33\", \"1.2.3.4\"",
        ),
        (
            &[(
                lbc_key!("ssl-cert"),
                "arn:aws:acm:eu-west-1:1:certificate/x",
            )],
            lbc_key!("ssl-cert"),
            "not supported by cnlb yet: no TLS listeners yet",
        ),
        (
            &[(lbc_key!("eip-allocations"), "eipalloc-1")],
            lbc_key!("eip-allocations"),
            "not supported by cnlb yet",
        ),
        (
            &[(
                lbc_key!("listener-attributes.TCP-80"),
                "tcp.idle_timeout.seconds=60",
            )],
            lbc_key!("listener-attributes.TCP-80"),
            "not supported by cnlb yet",
        ),
        (
            &[(lbc_key!("access-log-enabled"), "true")],
            lbc_key!("access-log-enabled"),
            "use aws-load-balancer-attributes access_logs.s3.enabled",
        ),
        (
            &[(lbc_key!("schem"), "internet-facing")],
            lbc_key!("schem"),
            "unknown annotation",
        ),
        // A prefix of an unsupported key is not that key.
        (
            &[(lbc_key!("ssl-certificate"), "x")],
            lbc_key!("ssl-certificate"),
            "unknown annotation",
        ),
    ];
    for (annotations, key, reason) in cases {
        let errors = parse(annotations).expect_err(&format!("{annotations:?}"));
        assert_eq!(errors.len(), 1, "{annotations:?}: {errors:?}");
        let err = &errors[0];
        assert_eq!(err.key, *key, "{annotations:?}: {err}");
        assert!(err.reason.contains(reason), "{annotations:?}: {err}");
        let value = annotations.iter().find(|(k, _)| k == key).map(|(_, v)| *v);
        assert_eq!(Some(err.value.as_str()), value, "{err}");
    }
}

#[test]
fn several_bad_keys_give_one_error_each() {
    let mut svc = service(&[
        (SCHEME, "public"),
        (HEALTHCHECK_INTERVAL, "1"),
        (HEALTHCHECK_TIMEOUT, "500"),
        (lbc_key!("ssl-cert"), "arn"),
        (lbc_key!("security-groups"), "sg-1"),
        (
            ADDITIONAL_RESOURCE_TAGS,
            "cnlb.dev/service=x,elbv2.k8s.aws/cluster=y",
        ),
        (SOURCE_RANGES, "nope"),
    ]);
    svc.spec.as_mut().unwrap().ports = Some(vec![
        port("http", "TCP", 80, None),
        port("sctp", "SCTP", 9000, None),
    ]);
    svc.metadata.uid = None;
    let errors = errors_of(&svc);
    let keys: Vec<&str> = errors.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "metadata.uid",
            "spec.ports[1].protocol",
            SCHEME,
            HEALTHCHECK_INTERVAL,
            HEALTHCHECK_TIMEOUT,
            SOURCE_RANGES,
            ADDITIONAL_RESOURCE_TAGS,
            lbc_key!("security-groups"),
            lbc_key!("ssl-cert"),
        ]
    );
    // Both reserved tags are named in the one tags error.
    let tags = &errors[6];
    assert!(tags.reason.contains("cnlb.dev/") && tags.reason.contains("elbv2.k8s.aws/"));
    assert!(
        errors[1].to_string()
            == "spec.ports[1].protocol: \"SCTP\": NLB does not support SCTP; use TCP or UDP",
        "{}",
        errors[1]
    );
}

#[test]
fn spec_source_ranges_win_over_the_annotation() {
    let mut svc = service(&[(SOURCE_RANGES, "10.0.0.0/8")]);
    svc.spec.as_mut().unwrap().load_balancer_source_ranges =
        Some(vec!["192.168.0.0/16".into(), " 172.16.0.0/12".into()]);
    let spec = parse_service(&svc, CLUSTER).unwrap();
    assert_eq!(spec.source_ranges, ["172.16.0.0/12", "192.168.0.0/16"]);

    // The annotation is not read then, not even to reject it (LBC's rule).
    svc.metadata
        .annotations
        .as_mut()
        .unwrap()
        .insert(SOURCE_RANGES.into(), "garbage".into());
    assert!(parse_service(&svc, CLUSTER).is_ok());

    // Bad spec entries are named by index.
    svc.spec.as_mut().unwrap().load_balancer_source_ranges =
        Some(vec!["10.0.0.0/8".into(), "10.0.0.0".into()]);
    let errors = errors_of(&svc);
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].key, "spec.loadBalancerSourceRanges[1]");
    assert_eq!(errors[0].value, "10.0.0.0");
    assert!(errors[0].reason.starts_with("must be a CIDR"));

    // An empty spec list falls back to the annotation.
    svc.spec.as_mut().unwrap().load_balancer_source_ranges = Some(Vec::new());
    svc.metadata
        .annotations
        .as_mut()
        .unwrap()
        .insert(SOURCE_RANGES.into(), "10.0.0.0/8".into());
    assert_eq!(
        parse_service(&svc, CLUSTER).unwrap().source_ranges,
        ["10.0.0.0/8"]
    );
}

#[test]
fn listeners_from_ports() {
    let int = |n| Some(IntOrString::Int(n));
    let named = |s: &str| Some(IntOrString::String(s.into()));
    let cases: Vec<(Vec<ServicePort>, Vec<Listener>)> = vec![
        // targetPort defaults to port.
        (
            vec![port("", "TCP", 80, None)],
            vec![listener("", Protocol::Tcp, 80, 80)],
        ),
        // No protocol means TCP (the API server's default).
        (
            vec![ServicePort {
                port: 443,
                target_port: int(8443),
                ..ServicePort::default()
            }],
            vec![listener("", Protocol::Tcp, 443, 8443)],
        ),
        // TCP and UDP on one port merge into TCP_UDP under the TCP name,
        // whichever comes first.
        (
            vec![
                port("dns-tcp", "TCP", 53, int(5353)),
                port("dns-udp", "UDP", 53, int(5353)),
                port("http", "TCP", 80, int(8080)),
            ],
            vec![
                listener("dns-tcp", Protocol::TcpUdp, 53, 5353),
                listener("http", Protocol::Tcp, 80, 8080),
            ],
        ),
        (
            vec![
                port("dns-udp", "UDP", 53, None),
                port("dns-tcp", "TCP", 53, None),
            ],
            vec![listener("dns-tcp", Protocol::TcpUdp, 53, 53)],
        ),
        // Different numbers stay apart.
        (
            vec![port("a", "TCP", 53, None), port("b", "UDP", 54, None)],
            vec![
                listener("a", Protocol::Tcp, 53, 53),
                listener("b", Protocol::Udp, 54, 54),
            ],
        ),
        // A named targetPort keeps the Service port number as the fallback.
        (
            vec![port("http", "TCP", 80, named("web"))],
            vec![listener("http", Protocol::Tcp, 80, 80)],
        ),
    ];
    for (ports, want) in cases {
        let spec = parse_service(&with_ports(ports.clone()), CLUSTER)
            .unwrap_or_else(|e| panic!("{ports:?}: {e:?}"));
        assert_eq!(spec.listeners, want, "{ports:?}");
    }
}

#[test]
fn bad_ports() {
    let int = |n| Some(IntOrString::Int(n));
    let named = |s: &str| Some(IntOrString::String(s.into()));
    // (ports, key in error, value, part of the reason)
    let cases: Vec<(Vec<ServicePort>, &str, &str, &str)> = vec![
        (Vec::new(), "spec.ports", "", "at least one port"),
        (
            vec![port("a", "TCP", 80, None), port("b", "SCTP", 81, None)],
            "spec.ports[1].protocol",
            "SCTP",
            "NLB does not support SCTP",
        ),
        (
            vec![port("a", "tcp", 80, None)],
            "spec.ports[0].protocol",
            "tcp",
            "must be one of TCP, UDP",
        ),
        (
            vec![port("a", "TCP", 0, None)],
            "spec.ports[0].port",
            "0",
            "from 1 to 65535",
        ),
        (
            vec![port("a", "TCP", 70000, None)],
            "spec.ports[0].port",
            "70000",
            "from 1 to 65535",
        ),
        (
            vec![port("a", "TCP", 80, int(0))],
            "spec.ports[0].targetPort",
            "0",
            "from 1 to 65535",
        ),
        (
            vec![port("a", "TCP", 80, named(""))],
            "spec.ports[0].targetPort",
            "",
            "or a port name",
        ),
        // TCP_UDP needs one target port number for both.
        (
            vec![
                port("dns-tcp", "TCP", 53, int(5353)),
                port("dns-udp", "UDP", 53, int(5354)),
            ],
            "spec.ports[1].targetPort",
            "5354",
            "must be the same number (spec.ports[0] has 5353)",
        ),
        (
            vec![
                port("dns-tcp", "TCP", 53, named("dns-tcp")),
                port("dns-udp", "UDP", 53, named("dns-udp")),
            ],
            "spec.ports[1].targetPort",
            "dns-udp",
            "must be the same number",
        ),
        // Caught by LoadBalancerSpec::validate (the API server forbids it too).
        (
            vec![port("a", "TCP", 80, None), port("b", "TCP", 80, None)],
            "spec.ports",
            "",
            "port 80 is used twice (TCP and TCP) (listeners[1].port)",
        ),
    ];
    for (ports, key, value, reason) in cases {
        let errors = errors_of(&with_ports(ports.clone()));
        assert_eq!(errors.len(), 1, "{ports:?}: {errors:?}");
        assert_eq!(errors[0].key, key, "{ports:?}");
        assert_eq!(errors[0].value, value, "{ports:?}");
        assert!(errors[0].reason.contains(reason), "{}", errors[0]);
    }

    // No spec at all.
    let mut svc = service(&[]);
    svc.spec = None;
    assert_eq!(errors_of(&svc)[0].key, "spec.ports");
}

#[test]
fn key_comes_from_cluster_and_metadata() {
    let spec = parse(&[]).unwrap();
    assert_eq!(
        spec.key,
        LoadBalancerKey::new(CLUSTER, "default", "web", "uid-1")
    );

    for field in ["metadata.namespace", "metadata.name", "metadata.uid"] {
        let mut svc = service(&[]);
        match field {
            "metadata.namespace" => svc.metadata.namespace = None,
            "metadata.name" => svc.metadata.name = Some(String::new()),
            _ => svc.metadata.uid = None,
        }
        let errors = errors_of(&svc);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].key, field);
    }

    // An empty cluster name reaches the model's validation, mapped to a key
    // a person can read.
    let errors = parse_service(&service(&[]), "").unwrap_err();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].key, "cluster name");
}

#[test]
fn opted_in_cases() {
    const CLASS: &str = "cnlb.dev/nlb";
    let lbc_ip = [(TYPE, "external"), (NLB_TARGET_TYPE, "ip")];
    /// (service type, class, annotations, manage_unclassed, expected)
    type Case<'a> = (Option<&'a str>, Option<&'a str>, Pairs<'a>, bool, bool);
    let cases: &[Case] = &[
        (Some("LoadBalancer"), Some(CLASS), &[], false, true),
        (Some("LoadBalancer"), Some(CLASS), &[], true, true),
        (
            Some("LoadBalancer"),
            Some("service.k8s.aws/nlb"),
            &[],
            true,
            false,
        ),
        (
            Some("LoadBalancer"),
            Some("service.k8s.aws/nlb"),
            &lbc_ip,
            true,
            false,
        ),
        (Some("LoadBalancer"), None, &[], false, false),
        (Some("LoadBalancer"), None, &[], true, true),
        (Some("LoadBalancer"), None, &lbc_ip, false, true),
        (Some("LoadBalancer"), None, &[(TYPE, "nlb-ip")], false, true),
        (
            Some("LoadBalancer"),
            None,
            &[(TYPE, "external")],
            false,
            false,
        ),
        (
            Some("LoadBalancer"),
            None,
            &[(TYPE, "external"), (NLB_TARGET_TYPE, "instance")],
            false,
            false,
        ),
        (
            Some("LoadBalancer"),
            None,
            &[(NLB_TARGET_TYPE, "ip")],
            false,
            false,
        ),
        (Some("LoadBalancer"), None, &[(TYPE, "nlb")], false, false),
        (Some("ClusterIP"), Some(CLASS), &[], true, false),
        (Some("NodePort"), None, &lbc_ip, true, false),
        (None, None, &[], true, false),
    ];
    for &(type_, class, annotations, manage_unclassed, want) in cases {
        let mut svc = service(annotations);
        let spec = svc.spec.as_mut().unwrap();
        spec.type_ = type_.map(str::to_owned);
        spec.load_balancer_class = class.map(str::to_owned);
        assert_eq!(
            opted_in(&svc, CLASS, manage_unclassed, true),
            want,
            "{type_:?} {class:?} {annotations:?} unclassed={manage_unclassed}"
        );
    }
    let mut no_spec = service(&[]);
    no_spec.spec = None;
    assert!(!opted_in(&no_spec, CLASS, true, true));
    // LBC's opt-in counts only behind its flag.
    let lbc = service(&lbc_ip);
    assert!(!opted_in(&lbc, CLASS, false, false));
    assert!(opted_in(&lbc, CLASS, false, true));
}

#[test]
fn key_lists_are_consistent_and_documented() {
    let doc = include_str!("../../ANNOTATIONS.md");
    for key in SUPPORTED {
        assert!(
            !UNSUPPORTED.iter().any(|(u, _)| u == key),
            "{key} is both supported and not"
        );
        assert!(
            doc.contains(&format!("`{key}`")),
            "{key} missing from ANNOTATIONS.md"
        );
    }
    for (key, _) in UNSUPPORTED {
        assert!(key.starts_with(LBC_PREFIX), "{key}");
        let suffix = &key[LBC_PREFIX.len()..];
        assert!(
            doc.contains(&format!("`{suffix}`")),
            "{key} missing from ANNOTATIONS.md"
        );
    }
    // Each unsupported key is reported as such.
    for (key, _) in UNSUPPORTED {
        let errors = parse(&[(*key, "x")]).unwrap_err();
        assert_eq!(errors.len(), 1, "{key}: {errors:?}");
        assert!(
            errors[0].reason.starts_with("not supported by cnlb yet"),
            "{}",
            errors[0]
        );
    }
}

#[test]
fn gke_keys_set_the_scheme_and_neg_names() {
    let spec = parse(&[(GKE_LOAD_BALANCER_TYPE, "External")]).unwrap();
    assert_eq!(spec.scheme, Scheme::InternetFacing);
    let spec = parse(&[(GKE_LOAD_BALANCER_TYPE, "Internal")]).unwrap();
    assert_eq!(spec.scheme, Scheme::Internal);
    let errors = parse(&[
        (GKE_LOAD_BALANCER_TYPE, "Internal"),
        (SCHEME, "internet-facing"),
    ])
    .unwrap_err();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].key, GKE_LOAD_BALANCER_TYPE);
    assert!(parse(&[(GKE_LOAD_BALANCER_TYPE, "internal")]).is_err());

    let spec = parse(&[(GKE_NEG, r#"{"exposed_ports":{"80":{"name":"web-neg"}}}"#)]).unwrap();
    let (listener, name) = spec.target_group_names.iter().next().unwrap();
    assert_eq!(spec.listener(listener).unwrap().port, 80);
    assert_eq!(name, "web-neg");
    let spec = parse(&[(GKE_NEG, r#"{"exposed_ports":{"80":{}}}"#)]).unwrap();
    assert!(spec.target_group_names.is_empty());
    for bad in [
        r#"{"exposed_ports":{"81":{}}}"#,
        r#"{"exposed_ports":{"http":{}}}"#,
        r#"{"ingress":true}"#,
        r#"{"exposed_ports":{"80":{"nmae":"x"}}}"#,
        "not json",
    ] {
        let errors = parse(&[(GKE_NEG, bad)]).unwrap_err();
        assert_eq!(errors.len(), 1, "{bad}: {errors:?}");
        assert_eq!(errors[0].key, GKE_NEG, "{bad}");
    }
}
