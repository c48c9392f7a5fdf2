//! Property tests of the plugin protocol's conversions from messages to the
//! core model: what a plugin server decodes from cnlb-ccm's requests (and
//! what cnlb-ccm decodes from a plugin's replies). Any message, after the
//! wire, converts without a panic; one that cannot be converted is an
//! `InvalidSpec` naming a field that is indeed at fault, which survives the
//! trip through a gRPC status; valid model values survive the trip through
//! the protocol unchanged.
//!
//! `PROPTEST_CASES` sets the cases per property (`make fuzz` raises it).

#![allow(clippy::unwrap_used)]

mod properties {
    use std::cell::Cell;
    use std::collections::{BTreeMap, HashMap};
    use std::fmt::Debug;
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    use std::time::Duration;

    use cnlb_provider_core::{
        HealthCheck, HealthCheckPort, HealthCheckProtocol, IpAddressType, Listener,
        LoadBalancerKey, LoadBalancerSpec, NodeRef, Protocol, ProviderError, Scheme, Target,
        TargetState,
    };
    use cnlb_provider_onprem::proto;
    use cnlb_provider_onprem::{convert, status};
    use proptest::collection::{hash_map, vec};
    use proptest::option;
    use proptest::prelude::*;
    use proptest::sample::select;
    use proptest::test_runner::{TestCaseResult, TestRunner};
    use prost::Message;

    /// Runs `test` on inputs of `strategy` with proptest's default config
    /// (so `PROPTEST_CASES` applies) and prints the number of cases run,
    /// which `make fuzz` reports. No regression files: a failure prints its
    /// minimal input, which then belongs in the unit tests.
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

    /// `message` as the other side receives it.
    fn over_the_wire<M: Message + Default>(message: &M) -> M {
        M::decode(message.encode_to_vec().as_slice()).unwrap()
    }

    // ------------------------------------------------------- any message

    /// Any short text: chars of any kind, quicker to make than
    /// `any::<String>()`'s regular expression in a debug build.
    fn text() -> impl Strategy<Value = String> {
        vec(any::<char>(), 0..12).prop_map(String::from_iter)
    }

    /// Mostly in range, sometimes anything: enum values and ports.
    fn small_or_any_i32(max: i32) -> impl Strategy<Value = i32> {
        prop_oneof![4 => 0..=max, 1 => any::<i32>()]
    }

    fn port_or_any() -> impl Strategy<Value = u32> {
        prop_oneof![4 => 0..=65535u32, 1 => any::<u32>()]
    }

    fn ip_text() -> impl Strategy<Value = String> {
        prop_oneof![
            4 => any::<u32>().prop_map(|a| Ipv4Addr::from(a).to_string()),
            2 => any::<u128>().prop_map(|a| Ipv6Addr::from(a).to_string()),
            1 => select(&["", "10.0.0.256", "::1::", "localhost", " 10.0.0.1", "fe80::1%eth0"][..])
                .prop_map(str::to_owned),
            1 => text(),
        ]
    }

    fn strings() -> impl Strategy<Value = HashMap<String, String>> {
        hash_map(text(), text(), 0..3)
    }

    fn any_key() -> impl Strategy<Value = Option<proto::LoadBalancerKey>> {
        prop_oneof![
            1 => Just(None),
            6 => (text(), text(), text(), text()).prop_map(
                |(cluster, namespace, name, uid)| Some(proto::LoadBalancerKey {
                    cluster,
                    namespace,
                    name,
                    uid,
                })
            ),
        ]
    }

    fn any_listener() -> impl Strategy<Value = proto::Listener> {
        (text(), small_or_any_i32(5), port_or_any(), port_or_any()).prop_map(
            |(name, protocol, port, target_port)| proto::Listener {
                name,
                protocol,
                port,
                target_port,
            },
        )
    }

    fn any_health_check() -> impl Strategy<Value = proto::HealthCheck> {
        (
            small_or_any_i32(3),
            port_or_any(),
            option::of(text()),
            (any::<u64>(), any::<u64>()),
            (any::<u32>(), any::<u32>()),
            text(),
        )
            .prop_map(
                |(protocol, port, path, (interval_ms, timeout_ms), (healthy, unhealthy), codes)| {
                    proto::HealthCheck {
                        protocol,
                        port,
                        path,
                        interval_ms,
                        timeout_ms,
                        healthy_threshold: healthy,
                        unhealthy_threshold: unhealthy,
                        success_codes: codes,
                    }
                },
            )
    }

    fn any_spec() -> impl Strategy<Value = Option<proto::LoadBalancerSpec>> {
        let spec = (
            any_key(),
            (small_or_any_i32(2), small_or_any_i32(2)),
            vec(any_listener(), 0..4),
            option::of(any_health_check()),
            vec(text(), 0..3),
            (strings(), strings(), strings()),
            option::of(vec(text(), 0..3)),
        )
            .prop_map(
                |(
                    key,
                    (scheme, ip_address_type),
                    listeners,
                    health_check,
                    source_ranges,
                    maps,
                    subnets,
                )| {
                    let (attributes, target_group_attributes, tags) = maps;
                    proto::LoadBalancerSpec {
                        key,
                        scheme,
                        ip_address_type,
                        listeners,
                        health_check,
                        source_ranges,
                        attributes,
                        target_group_attributes,
                        tags,
                        subnets: subnets.map(|ids| proto::Subnets { ids }),
                    }
                },
            );
        prop_oneof![1 => Just(None), 8 => spec.prop_map(Some)]
    }

    fn any_backend() -> impl Strategy<Value = proto::Backend> {
        (
            ip_text(),
            port_or_any(),
            option::of(text()),
            option::of(text()),
            option::of(any::<[bool; 3]>()),
        )
            .prop_map(|(ip, port, node, zone, conditions)| proto::Backend {
                ip,
                port,
                node,
                zone,
                conditions: conditions.map(|[ready, serving, terminating]| {
                    proto::BackendConditions {
                        ready,
                        serving,
                        terminating,
                    }
                }),
            })
    }

    fn any_update() -> impl Strategy<Value = proto::UpdateBackendsRequest> {
        (
            any_key(),
            prop_oneof![1 => Just(None), 6 => any_listener().prop_map(Some)],
            vec(any_backend(), 0..4),
            vec(any_backend(), 0..4),
            strings(),
        )
            .prop_map(|(key, listener, register, deregister, known_ids)| {
                proto::UpdateBackendsRequest {
                    key,
                    listener,
                    register,
                    deregister,
                    known_ids,
                }
            })
    }

    fn any_nodes() -> impl Strategy<Value = proto::GetInstancesRequest> {
        vec(
            (text(), option::of(text()), vec(ip_text(), 0..3)).prop_map(
                |(name, provider_id, internal_ips)| proto::NodeRef {
                    name,
                    provider_id,
                    internal_ips,
                },
            ),
            0..4,
        )
        .prop_map(|nodes| proto::GetInstancesRequest { nodes })
    }

    fn bad_ip(text: &str) -> bool {
        text.parse::<IpAddr>().is_err()
    }

    fn bad_port(port: u32) -> bool {
        port > u32::from(u16::MAX)
    }

    /// Every field of `listener` (named `field`) that cannot convert.
    fn listener_faults(field: &str, listener: &proto::Listener, faults: &mut Vec<String>) {
        // PROTOCOL_UNSPECIFIED (0) is no protocol.
        if !(1..=4).contains(&listener.protocol) {
            faults.push(format!("{field}.protocol"));
        }
        if bad_port(listener.port) {
            faults.push(format!("{field}.port"));
        }
        if bad_port(listener.target_port) {
            faults.push(format!("{field}.target_port"));
        }
    }

    fn backend_faults(field: &str, backends: &[proto::Backend], faults: &mut Vec<String>) {
        for (i, backend) in backends.iter().enumerate() {
            if bad_ip(&backend.ip) {
                faults.push(format!("{field}[{i}].ip"));
            }
            if bad_port(backend.port) {
                faults.push(format!("{field}[{i}].port"));
            }
        }
    }

    /// A request a plugin server converts (the others carry no more than
    /// a key, or nothing).
    #[derive(Debug, Clone)]
    enum Request {
        Ensure(Box<proto::EnsureLoadBalancerRequest>),
        Update(proto::UpdateBackendsRequest),
        Delete(proto::DeleteLoadBalancerRequest),
        GetInstances(proto::GetInstancesRequest),
    }

    /// The fields of `request` that cannot convert, as the protocol
    /// defines them, written independently of the conversions.
    fn faults(request: &Request) -> Vec<String> {
        let mut faults = Vec::new();
        match request {
            Request::Ensure(r) => {
                let Some(spec) = &r.spec else {
                    return vec!["spec".to_owned()];
                };
                if spec.key.is_none() {
                    faults.push("key".to_owned());
                }
                if !(0..=1).contains(&spec.scheme) {
                    faults.push("scheme".to_owned());
                }
                if !(0..=1).contains(&spec.ip_address_type) {
                    faults.push("ip_address_type".to_owned());
                }
                for (i, listener) in spec.listeners.iter().enumerate() {
                    listener_faults(&format!("listeners[{i}]"), listener, &mut faults);
                }
                if let Some(hc) = &spec.health_check {
                    if !(0..=2).contains(&hc.protocol) {
                        faults.push("health_check.protocol".to_owned());
                    }
                    if bad_port(hc.port) {
                        faults.push("health_check.port".to_owned());
                    }
                }
            }
            Request::Update(r) => {
                if r.key.is_none() {
                    faults.push("key".to_owned());
                }
                match &r.listener {
                    None => faults.push("listener".to_owned()),
                    Some(l) => listener_faults("listener", l, &mut faults),
                }
                backend_faults("register", &r.register, &mut faults);
                backend_faults("deregister", &r.deregister, &mut faults);
            }
            Request::Delete(r) => {
                if r.key.is_none() {
                    faults.push("key".to_owned());
                }
            }
            Request::GetInstances(r) => {
                for (i, node) in r.nodes.iter().enumerate() {
                    for (j, ip) in node.internal_ips.iter().enumerate() {
                        if bad_ip(ip) {
                            faults.push(format!("nodes[{i}].internal_ips[{j}]"));
                        }
                    }
                }
            }
        }
        faults
    }

    /// What `server.rs` does with each request before the provider sees it,
    /// with the same field names.
    fn convert_request(request: Request) -> Result<(), ProviderError> {
        match request {
            Request::Ensure(r) => {
                convert::spec_from_proto(r.spec)?;
            }
            Request::Update(r) => {
                convert::key_from_proto(r.key)?;
                convert::listener_from_proto("listener", r.listener)?;
                convert::targets_from_proto("register", r.register)?;
                convert::targets_from_proto("deregister", r.deregister)?;
            }
            Request::Delete(r) => {
                convert::key_from_proto(r.key)?;
            }
            Request::GetInstances(r) => {
                convert::nodes_from_proto(r.nodes)?;
            }
        }
        Ok(())
    }

    fn any_request() -> impl Strategy<Value = Request> {
        prop_oneof![
            (any_spec(), strings()).prop_map(|(spec, known_ids)| {
                let request = proto::EnsureLoadBalancerRequest { spec, known_ids };
                Request::Ensure(Box::new(over_the_wire(&request)))
            }),
            any_update().prop_map(|r| Request::Update(over_the_wire(&r))),
            (any_key(), strings()).prop_map(|(key, known_ids)| {
                Request::Delete(over_the_wire(&proto::DeleteLoadBalancerRequest {
                    key,
                    known_ids,
                }))
            }),
            any_nodes().prop_map(|r| Request::GetInstances(over_the_wire(&r))),
        ]
    }

    /// A conversion error as the client sees it: an `INVALID_ARGUMENT`
    /// whose metadata names the field.
    fn names_a_fault(err: &ProviderError, faults: &[String]) -> TestCaseResult {
        let ProviderError::InvalidSpec { field, .. } = err else {
            return Err(TestCaseError::fail(format!("not a user error: {err:?}")));
        };
        prop_assert!(
            faults.contains(field),
            "{} is not at fault: {:?}",
            field,
            faults
        );
        prop_assert!(err.to_string().contains(field.as_str()), "{}", err);
        let status = status::to_status(err);
        prop_assert_eq!(status.code(), tonic::Code::InvalidArgument);
        prop_assert_eq!(&status::from_status("rpc", &status), err);
        Ok(())
    }

    #[test]
    fn any_plugin_request_converts_or_names_a_field_at_fault() {
        check(
            "any_plugin_request_converts_or_names_a_field_at_fault",
            any_request(),
            |request| {
                let faults = faults(&request);
                match convert_request(request) {
                    Ok(()) => prop_assert!(faults.is_empty(), "accepted with {:?}", faults),
                    Err(err) => names_a_fault(&err, &faults)?,
                }
                Ok(())
            },
        );
    }

    /// Bytes that are not what the server expects decode to some message or
    /// fail in prost; what decodes converts without a panic.
    #[test]
    fn any_request_bytes_decode_and_convert_without_panic() {
        check(
            "any_request_bytes_decode_and_convert_without_panic",
            vec(any::<u8>(), 0..128),
            |bytes| {
                let requests = [
                    proto::EnsureLoadBalancerRequest::decode(bytes.as_slice())
                        .map(|r| Request::Ensure(Box::new(r))),
                    proto::UpdateBackendsRequest::decode(bytes.as_slice()).map(Request::Update),
                    proto::DeleteLoadBalancerRequest::decode(bytes.as_slice()).map(Request::Delete),
                    proto::GetInstancesRequest::decode(bytes.as_slice()).map(Request::GetInstances),
                ];
                for request in requests.into_iter().flatten() {
                    let faults = faults(&request);
                    if let Err(err) = convert_request(request) {
                        names_a_fault(&err, &faults)?;
                    }
                }
                Ok(())
            },
        );
    }

    // ---------------------------------------------- replies from a plugin

    #[derive(Debug, Clone)]
    enum Reply {
        Ensure(proto::EnsureLoadBalancerResponse),
        Health(proto::BackendHealthSnapshot),
        Instances(proto::GetInstancesResponse),
    }

    fn any_reply() -> impl Strategy<Value = Reply> {
        let ingress = (
            option::of(text()),
            option::of(ip_text()),
            small_or_any_i32(3),
        )
            .prop_map(|(hostname, ip, ip_mode)| proto::Ingress {
                hostname,
                ip,
                ip_mode,
            });
        let health = (
            text(),
            ip_text(),
            port_or_any(),
            small_or_any_i32(5),
            option::of(text()),
        )
            .prop_map(|(listener, ip, port, state, reason)| proto::BackendHealth {
                listener,
                ip,
                port,
                state,
                reason,
            });
        let address = (small_or_any_i32(6), text())
            .prop_map(|(r#type, address)| proto::NodeAddress { r#type, address });
        let instance = (
            prop_oneof![
                select(&["", "onprem://n1"][..]).prop_map(str::to_owned),
                text()
            ],
            text(),
            vec(address, 0..3),
            (text(), text()),
            small_or_any_i32(3),
        )
            .prop_map(
                |(provider_id, instance_type, addresses, (zone, region), state)| proto::Instance {
                    provider_id,
                    instance_type,
                    addresses,
                    zone,
                    region,
                    state,
                },
            );
        use proto::instance_result::Result as R;
        let result = prop_oneof![
            Just(None),
            Just(Some(R::NotFound(proto::InstanceNotFound {}))),
            instance.prop_map(|i| Some(R::Found(i))),
        ]
        .prop_map(|result| proto::InstanceResult { result });
        prop_oneof![
            (vec(ingress, 0..3), strings()).prop_map(|(ingress, ids)| {
                Reply::Ensure(over_the_wire(&proto::EnsureLoadBalancerResponse {
                    ingress,
                    ids,
                }))
            }),
            vec(health, 0..3).prop_map(|backends| {
                Reply::Health(over_the_wire(&proto::BackendHealthSnapshot { backends }))
            }),
            vec(result, 0..3).prop_map(|results| {
                Reply::Instances(over_the_wire(&proto::GetInstancesResponse { results }))
            }),
        ]
    }

    /// Independent of the conversions, as for requests. Fields of replies
    /// name the list, not the entry, except for instance results.
    fn reply_faults(reply: &Reply) -> Vec<String> {
        use proto::instance_result::Result as R;
        let mut faults = Vec::new();
        match reply {
            Reply::Ensure(r) => {
                if r.ingress
                    .iter()
                    .any(|i| i.ip.as_deref().is_some_and(bad_ip))
                {
                    faults.push("ingress.ip".to_owned());
                }
            }
            Reply::Health(r) => {
                for backend in &r.backends {
                    if bad_ip(&backend.ip) {
                        faults.push("backends.ip".to_owned());
                    }
                    if bad_port(backend.port) {
                        faults.push("backends.port".to_owned());
                    }
                }
            }
            Reply::Instances(r) => {
                for (i, result) in r.results.iter().enumerate() {
                    let field = format!("results[{i}]");
                    match &result.result {
                        None => faults.push(field),
                        Some(R::NotFound(_)) => {}
                        Some(R::Found(found)) => {
                            if found.provider_id.is_empty() {
                                faults.push(format!("{field}.found.provider_id"));
                            }
                            if !(1..=2).contains(&found.state) {
                                faults.push(format!("{field}.found.state"));
                            }
                            for (j, a) in found.addresses.iter().enumerate() {
                                if !(1..=5).contains(&a.r#type) {
                                    faults.push(format!("{field}.found.addresses[{j}].type"));
                                }
                            }
                        }
                    }
                }
            }
        }
        faults
    }

    /// What `client.rs` does with each reply.
    fn convert_reply(reply: Reply) -> Result<(), ProviderError> {
        match reply {
            Reply::Ensure(r) => {
                convert::status_from_proto(r)?;
            }
            Reply::Health(r) => {
                for health in r.backends {
                    convert::health_from_proto(health)?;
                }
            }
            Reply::Instances(r) => {
                for (i, result) in r.results.into_iter().enumerate() {
                    convert::instance_result_from_proto(&format!("results[{i}]"), result)?;
                }
            }
        }
        Ok(())
    }

    #[test]
    fn any_plugin_reply_converts_or_names_a_field_at_fault() {
        check(
            "any_plugin_reply_converts_or_names_a_field_at_fault",
            any_reply(),
            |reply| {
                let faults = reply_faults(&reply);
                match convert_reply(reply) {
                    Ok(()) => prop_assert!(faults.is_empty(), "accepted with {:?}", faults),
                    Err(err) => names_a_fault(&err, &faults)?,
                }
                Ok(())
            },
        );
    }

    // ------------------------------------------------ valid, round trip

    fn ip() -> impl Strategy<Value = IpAddr> {
        prop_oneof![
            any::<u32>().prop_map(|a| IpAddr::V4(Ipv4Addr::from(a))),
            any::<u128>().prop_map(|a| IpAddr::V6(Ipv6Addr::from(a))),
        ]
    }

    fn key() -> impl Strategy<Value = LoadBalancerKey> {
        (text(), text(), text(), text()).prop_map(|(cluster, namespace, name, uid)| {
            LoadBalancerKey::new(cluster, namespace, name, uid)
        })
    }

    fn listener() -> impl Strategy<Value = Listener> {
        (
            text(),
            select(
                &[
                    Protocol::Tcp,
                    Protocol::Udp,
                    Protocol::TcpUdp,
                    Protocol::Tls,
                ][..],
            ),
            any::<u16>(),
            any::<u16>(),
        )
            .prop_map(|(name, protocol, port, target_port)| Listener {
                name,
                protocol,
                port,
                target_port,
            })
    }

    /// Whole milliseconds: the protocol's unit.
    fn millis() -> impl Strategy<Value = Duration> {
        (0..u64::from(u32::MAX)).prop_map(Duration::from_millis)
    }

    fn health_check() -> impl Strategy<Value = HealthCheck> {
        (
            select(
                &[
                    HealthCheckProtocol::Tcp,
                    HealthCheckProtocol::Http,
                    HealthCheckProtocol::Https,
                ][..],
            ),
            prop_oneof![
                Just(HealthCheckPort::TrafficPort),
                (1..=u16::MAX).prop_map(HealthCheckPort::Port),
            ],
            option::of(text()),
            (millis(), millis()),
            (any::<u32>(), any::<u32>()),
            text(),
        )
            .prop_map(
                |(protocol, port, path, (interval, timeout), (healthy, unhealthy), codes)| {
                    HealthCheck {
                        protocol,
                        port,
                        path,
                        interval,
                        timeout,
                        healthy_threshold: healthy,
                        unhealthy_threshold: unhealthy,
                        success_codes: codes,
                    }
                },
            )
    }

    fn string_map() -> impl Strategy<Value = BTreeMap<String, String>> {
        proptest::collection::btree_map(text(), text(), 0..3)
    }

    /// Any spec the model can express that the protocol carries (it has no
    /// NEG names or provider settings).
    fn spec() -> impl Strategy<Value = LoadBalancerSpec> {
        (
            key(),
            select(&[Scheme::Internal, Scheme::InternetFacing][..]),
            select(&[IpAddressType::Ipv4, IpAddressType::DualStack][..]),
            vec(listener(), 0..4),
            health_check(),
            vec(text(), 0..3),
            (string_map(), string_map(), string_map()),
            option::of(vec(text(), 0..3)),
        )
            .prop_map(
                |(
                    key,
                    scheme,
                    ip_address_type,
                    listeners,
                    health_check,
                    source_ranges,
                    maps,
                    subnets,
                )| {
                    let (attributes, target_group_attributes, tags) = maps;
                    LoadBalancerSpec {
                        key,
                        scheme,
                        ip_address_type,
                        listeners,
                        health_check,
                        source_ranges,
                        attributes,
                        target_group_attributes,
                        tags,
                        subnets,
                        target_group_names: BTreeMap::new(),
                        provider_settings: String::new(),
                    }
                    .normalized()
                },
            )
    }

    fn target() -> impl Strategy<Value = Target> {
        (
            ip(),
            any::<u16>(),
            option::of(text()),
            option::of(text()),
            any::<[bool; 3]>(),
        )
            .prop_map(
                |(ip, port, node, zone, [ready, serving, terminating])| Target {
                    ip,
                    port,
                    node: node.map(Into::into),
                    zone: zone.map(Into::into),
                    state: TargetState {
                        ready,
                        serving,
                        terminating,
                    },
                },
            )
    }

    fn node() -> impl Strategy<Value = NodeRef> {
        (
            text(),
            // An empty provider ID is none.
            option::of(".+"),
            vec(ip(), 0..3),
        )
            .prop_map(|(name, provider_id, internal_ips)| NodeRef {
                name,
                provider_id,
                internal_ips,
            })
    }

    #[test]
    fn plugin_requests_round_trip() {
        let cases = (
            spec(),
            (key(), listener(), vec(target(), 0..3)),
            vec(node(), 0..3),
        );
        check(
            "plugin_requests_round_trip",
            cases,
            |(spec, (key, listener, targets), nodes)| {
                let message = over_the_wire(&convert::spec_to_proto(&spec));
                prop_assert_eq!(convert::spec_from_proto(Some(message)), Ok(spec));

                let update = over_the_wire(&proto::UpdateBackendsRequest {
                    key: Some(convert::key_to_proto(&key)),
                    listener: Some(convert::listener_to_proto(&listener)),
                    register: targets.iter().map(convert::target_to_proto).collect(),
                    deregister: Vec::new(),
                    known_ids: HashMap::new(),
                });
                prop_assert_eq!(convert::key_from_proto(update.key), Ok(key));
                prop_assert_eq!(
                    convert::listener_from_proto("listener", update.listener),
                    Ok(listener)
                );
                prop_assert_eq!(
                    convert::targets_from_proto("register", update.register),
                    Ok(targets)
                );

                let request = over_the_wire(&proto::GetInstancesRequest {
                    nodes: nodes.iter().map(convert::node_to_proto).collect(),
                });
                prop_assert_eq!(convert::nodes_from_proto(request.nodes), Ok(nodes));
                Ok(())
            },
        );
    }
}
