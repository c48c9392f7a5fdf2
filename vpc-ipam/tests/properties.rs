//! Property tests of what vpc-ipam reads from outside: the CNI environment
//! and network configuration the plugin gets from the runtime, and the
//! request lines the agent gets on its socket. Any input is answered
//! without a panic, a bad one with an error naming the variable or field at
//! fault, and valid input, written as runtimes and the plugin write it,
//! parses back to what it was written from.
//!
//! `PROPTEST_CASES` sets the cases per property (`make fuzz` raises it).

#![allow(clippy::unwrap_used)]

mod properties {
    use std::cell::Cell;
    use std::collections::BTreeMap;
    use std::ffi::OsString;
    use std::fmt::Debug;
    use std::io::{Read, Write};
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    use std::os::unix::ffi::OsStringExt;
    use std::os::unix::net::UnixStream;
    use std::path::PathBuf;
    use std::sync::Arc;
    use std::time::Duration;

    use cnlb_vpc_ipam::agent::{Agent, AgentConfig};
    use cnlb_vpc_ipam::backend::static_ranges::StaticRanges;
    use cnlb_vpc_ipam::cidr::Cidr;
    use cnlb_vpc_ipam::cni::{
        Attachment, Command, Invocation, IpamConf, NetConf, SPEC_VERSION, SUPPORTED_VERSIONS,
        ValidAttachment, peek_version,
    };
    use cnlb_vpc_ipam::metrics::Metrics;
    use cnlb_vpc_ipam::pool::TargetFlags;
    use cnlb_vpc_ipam::protocol::{AttachmentKey, Lease, PodRef, Request, Response};
    use cnlb_vpc_ipam::server;
    use cnlb_vpc_ipam::store::Store;
    use proptest::collection::{btree_map, vec};
    use proptest::option;
    use proptest::prelude::*;
    use proptest::sample::select;
    use proptest::test_runner::{TestCaseResult, TestRunner};
    use serde_json::{Value, json};

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

    // ------------------------------------------------------- environment

    const VARIABLES: [&str; 6] = [
        "CNI_COMMAND",
        "CNI_CONTAINERID",
        "CNI_IFNAME",
        "CNI_NETNS",
        "CNI_ARGS",
        "CNI_PATH",
    ];

    type Env = BTreeMap<String, OsString>;

    fn parse_env(env: &Env) -> Result<Invocation, cnlb_vpc_ipam::cni::Error> {
        Invocation::parse_env(|name| env.get(name).cloned())
    }

    fn container_id() -> impl Strategy<Value = String> {
        "[a-zA-Z0-9][a-zA-Z0-9_.-]{0,63}"
    }

    /// At most 15 bytes (é is two), neither "." nor "..".
    fn ifname() -> impl Strategy<Value = String> {
        "[a-zA-Z0-9_.é-]{1,7}".prop_filter("not . or ..", |n| n != "." && n != "..")
    }

    fn attachment(netns: bool) -> impl Strategy<Value = Attachment> {
        let netns = if netns {
            "\\PC{1,30}".prop_map(Some).boxed()
        } else {
            option::of("\\PC{1,30}").boxed()
        };
        (container_id(), ifname(), netns).prop_map(|(container_id, ifname, netns)| Attachment {
            container_id,
            ifname,
            netns: netns.map(PathBuf::from),
        })
    }

    /// A valid invocation and how to write it (a trailing ';' in CNI_ARGS).
    fn invocation() -> impl Strategy<Value = (Invocation, bool)> {
        let command = prop_oneof![
            attachment(true).prop_map(Command::Add),
            attachment(false).prop_map(Command::Del),
            attachment(true).prop_map(Command::Check),
            Just(Command::Version),
            Just(Command::Status),
            Just(Command::Gc),
        ];
        (
            command,
            vec(("[^=;]{1,12}", "[^;]{0,12}"), 0..4),
            vec("/[^:]{0,20}", 0..4),
            any::<bool>(),
        )
            .prop_map(|(command, args, mut path, trailing)| {
                // GC requires CNI_PATH.
                if command == Command::Gc && path.is_empty() {
                    path.push("/opt/cni/bin".to_owned());
                }
                let invocation = Invocation {
                    command,
                    args,
                    path: path.into_iter().map(PathBuf::from).collect(),
                };
                (invocation, trailing)
            })
    }

    /// The environment a runtime sets for `invocation`.
    fn render_env(invocation: &Invocation, trailing: bool) -> Env {
        let mut env = Env::new();
        let mut set = |name: &str, value: OsString| {
            env.insert(name.to_owned(), value);
        };
        set("CNI_COMMAND", invocation.command.name().into());
        if let Command::Add(a) | Command::Del(a) | Command::Check(a) = &invocation.command {
            set("CNI_CONTAINERID", a.container_id.clone().into());
            set("CNI_IFNAME", a.ifname.clone().into());
            if let Some(netns) = &a.netns {
                set("CNI_NETNS", netns.clone().into());
            }
        }
        if !invocation.args.is_empty() {
            let pairs: Vec<String> = invocation
                .args
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            let end = if trailing { ";" } else { "" };
            set("CNI_ARGS", format!("{}{end}", pairs.join(";")).into());
        }
        if !invocation.path.is_empty() {
            set("CNI_PATH", std::env::join_paths(&invocation.path).unwrap());
        }
        env
    }

    #[test]
    fn cni_environment_round_trips() {
        check(
            "cni_environment_round_trips",
            invocation(),
            |(invocation, trailing)| {
                let env = render_env(&invocation, trailing);
                prop_assert_eq!(parse_env(&env), Ok(invocation));
                Ok(())
            },
        );
    }

    /// Values for any CNI variable: valid ones, near misses, anything, and
    /// bytes that are not UTF-8.
    fn any_env_value() -> impl Strategy<Value = OsString> {
        prop_oneof![
            select(
                &[
                    "ADD",
                    "DEL",
                    "CHECK",
                    "VERSION",
                    "STATUS",
                    "GC",
                    "add",
                    "",
                    "eth0",
                    ".",
                    "..",
                    "a/b",
                    "abc",
                    "-abc",
                    "K=V",
                    "K=V;",
                    "K",
                    "=V",
                    "/opt/cni/bin:/x",
                    ":",
                ][..]
            )
            .prop_map(OsString::from),
            any::<String>().prop_map(OsString::from),
            vec(any::<u8>(), 0..20).prop_map(OsString::from_vec),
        ]
    }

    #[test]
    fn any_cni_environment_parses_or_names_its_variables() {
        let env = btree_map(
            select(&VARIABLES[..]).prop_map(str::to_owned),
            any_env_value(),
            0..7,
        );
        check(
            "any_cni_environment_parses_or_names_its_variables",
            env,
            |env| {
                match parse_env(&env) {
                    Ok(invocation) => {
                        let command = env.get("CNI_COMMAND").and_then(|c| c.to_str());
                        prop_assert_eq!(command, Some(invocation.command.name()));
                    }
                    Err(err) => {
                        prop_assert_eq!(err.code, 4, "{}", err);
                        let names = err
                            .msg
                            .strip_prefix("invalid or missing environment variables: ")
                            .unwrap_or_default();
                        prop_assert!(!names.is_empty(), "{}", err);
                        for name in names.split(", ") {
                            prop_assert!(VARIABLES.contains(&name), "{}", err);
                        }
                    }
                }
                Ok(())
            },
        );
    }

    /// One thing wrong with a valid environment, and the variable at fault.
    #[derive(Debug, Clone)]
    enum EnvFault {
        /// Unset, or set empty (which runtimes do and which counts as unset).
        Missing(&'static str, bool),
        Value(&'static str, OsString),
    }

    fn env_fault(command: &Command) -> BoxedStrategy<EnvFault> {
        let mut required = vec!["CNI_COMMAND"];
        match command {
            Command::Add(_) | Command::Check(_) => {
                required.extend(["CNI_CONTAINERID", "CNI_IFNAME", "CNI_NETNS"]);
            }
            Command::Del(_) => required.extend(["CNI_CONTAINERID", "CNI_IFNAME"]),
            Command::Gc => required.push("CNI_PATH"),
            Command::Version | Command::Status => {}
        }
        let bad = |name: &'static str, values: BoxedStrategy<String>| {
            values.prop_map(move |v| EnvFault::Value(name, v.into()))
        };
        prop_oneof![
            (select(required), any::<bool>())
                .prop_map(|(name, empty)| EnvFault::Missing(name, empty)),
            bad(
                "CNI_COMMAND",
                "[A-Za-z]{1,8}"
                    .prop_filter("not a command", |c| {
                        !["ADD", "DEL", "CHECK", "VERSION", "STATUS", "GC"].contains(&c.as_str())
                    })
                    .boxed()
            ),
            // Checked whenever set, whatever the command.
            bad(
                "CNI_CONTAINERID",
                "[_.-][a-z0-9]{0,5}|[a-z0-9]{1,5}[/ :@][a-z0-9]{0,5}".boxed()
            ),
            bad(
                "CNI_IFNAME",
                "[a-z0-9]{16,20}|\\.|\\.\\.|[a-z]{0,3}[/: \t][a-z]{0,3}".boxed()
            ),
            bad(
                "CNI_ARGS",
                "([A-Z]{1,5}=[a-z]{0,3};)?([A-Z]{1,5}|=[a-z]{0,3})".boxed()
            ),
            (select(&VARIABLES[..]), vec(any::<u8>(), 0..8)).prop_map(|(name, mut bytes)| {
                bytes.push(0xff);
                EnvFault::Value(name, OsString::from_vec(bytes))
            }),
        ]
        .boxed()
    }

    #[test]
    fn a_bad_cni_variable_is_named() {
        let cases = invocation().prop_flat_map(|(invocation, trailing)| {
            let fault = env_fault(&invocation.command);
            (Just(render_env(&invocation, trailing)), fault)
        });
        check("a_bad_cni_variable_is_named", cases, |(mut env, fault)| {
            let name = match fault {
                EnvFault::Missing(name, empty) => {
                    if empty {
                        env.insert(name.to_owned(), OsString::new());
                    } else {
                        env.remove(name);
                    }
                    name
                }
                EnvFault::Value(name, value) => {
                    env.insert(name.to_owned(), value);
                    name
                }
            };
            let err = match parse_env(&env) {
                Ok(invocation) => {
                    return Err(TestCaseError::fail(format!("accepted: {invocation:?}")));
                }
                Err(err) => err,
            };
            prop_assert_eq!(err.code, 4);
            prop_assert!(err.msg.contains(name), "{} not named: {}", name, err);
            Ok(())
        });
    }

    // ------------------------------------------------ network configuration

    fn network_name() -> impl Strategy<Value = String> {
        "[a-zA-Z0-9][a-zA-Z0-9_.-]{0,20}"
    }

    /// A valid configuration; with `gc`, with the attachments GC requires.
    fn net_conf(gc: bool) -> impl Strategy<Value = NetConf> {
        let attachments = vec(
            (container_id(), ifname()).prop_map(|(container_id, ifname)| ValidAttachment {
                container_id,
                ifname,
            }),
            0..3,
        );
        let valid_attachments = if gc {
            attachments.prop_map(Some).boxed()
        } else {
            option::of(attachments).boxed()
        };
        (
            select(&SUPPORTED_VERSIONS[..]),
            network_name(),
            "[a-z0-9_.-]{1,12}",
            "\\PC{1,12}",
            option::of("/[^\u{0}]{0,30}"),
            option::of(btree_map("[a-z]{1,6}", any::<u32>(), 0..3)),
            valid_attachments,
        )
            .prop_map(
                |(version, name, plugin, ipam_type, socket, prev, valid_attachments)| NetConf {
                    cni_version: version.to_owned(),
                    name,
                    plugin_type: plugin,
                    ipam: IpamConf {
                        plugin_type: ipam_type,
                        agent_socket: socket.map(PathBuf::from),
                    },
                    prev_result: prev.map(|fields| json!(fields)),
                    valid_attachments,
                },
            )
    }

    /// `conf` as a main plugin passes it on: its own fields too.
    fn render_conf(conf: &NetConf) -> Value {
        let mut ipam = json!({ "type": conf.ipam.plugin_type });
        if let Some(socket) = &conf.ipam.agent_socket {
            ipam["agentSocket"] = json!(socket.to_str().unwrap());
        }
        let mut value = json!({
            "cniVersion": conf.cni_version,
            "name": conf.name,
            "type": conf.plugin_type,
            "mtu": 9001,
            "isDefaultGateway": true,
            "ipam": ipam,
        });
        if let Some(prev) = &conf.prev_result {
            value["prevResult"] = prev.clone();
        }
        if let Some(list) = &conf.valid_attachments {
            let items: Vec<Value> = list
                .iter()
                .map(|a| json!({ "containerID": a.container_id, "ifname": a.ifname }))
                .collect();
            value["cni.dev/valid-attachments"] = json!(items);
        }
        value
    }

    fn command_and_conf() -> impl Strategy<Value = (Command, NetConf)> {
        prop_oneof![
            (attachment(true).prop_map(Command::Add), net_conf(false)),
            (attachment(false).prop_map(Command::Del), net_conf(false)),
            (Just(Command::Status), net_conf(false)),
            (Just(Command::Gc), net_conf(true)),
        ]
    }

    #[test]
    fn cni_network_configuration_round_trips() {
        check(
            "cni_network_configuration_round_trips",
            command_and_conf(),
            |(command, conf)| {
                let stdin = render_conf(&conf).to_string();
                prop_assert_eq!(NetConf::parse(stdin.as_bytes(), &command), Ok(conf.clone()));
                prop_assert_eq!(
                    peek_version(stdin.as_bytes()),
                    Some(conf.cni_version.as_str())
                );
                Ok(())
            },
        );
    }

    /// Any JSON (bounded depth and size).
    fn any_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            select(&["1.1.0", "0.4.0", "0.3.1", "", "/x", "a/b", "vpc-ipam"][..])
                .prop_map(Value::from),
            any::<String>().prop_map(Value::from),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                vec(inner.clone(), 0..4).prop_map(Value::Array),
                btree_map(
                    prop_oneof![
                        select(
                            &[
                                "cniVersion",
                                "name",
                                "type",
                                "ipam",
                                "agentSocket",
                                "prevResult",
                                "cni.dev/valid-attachments",
                                "containerID",
                                "ifname",
                            ][..]
                        )
                        .prop_map(str::to_owned),
                        any::<String>(),
                    ],
                    inner,
                    0..5
                )
                .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// Stdin a runtime could send, or not: valid configurations with one
    /// field replaced by anything, any JSON, any bytes.
    fn any_stdin() -> impl Strategy<Value = Vec<u8>> {
        let field = select(
            &[
                "cniVersion",
                "name",
                "type",
                "ipam",
                "prevResult",
                "cni.dev/valid-attachments",
            ][..],
        );
        prop_oneof![
            (net_conf(false), field, any_json()).prop_map(|(conf, field, value)| {
                let mut conf = render_conf(&conf);
                conf[field] = value;
                conf.to_string().into_bytes()
            }),
            (net_conf(false), "[a-zA-Z]{1,12}", any_json()).prop_map(|(conf, field, value)| {
                let mut conf = render_conf(&conf);
                conf["ipam"][field] = value;
                conf.to_string().into_bytes()
            }),
            any_json().prop_map(|v| v.to_string().into_bytes()),
            vec(any::<u8>(), 0..64),
        ]
    }

    #[test]
    fn any_cni_stdin_parses_or_is_a_cni_error() {
        let cases = (any_stdin(), select(vec![Command::Status, Command::Gc]));
        check(
            "any_cni_stdin_parses_or_is_a_cni_error",
            cases,
            |(stdin, command)| {
                let peeked = peek_version(&stdin);
                match NetConf::parse(&stdin, &command) {
                    Ok(conf) => {
                        prop_assert_eq!(peeked, Some(conf.cni_version.as_str()));
                        prop_assert!(!conf.name.is_empty() && !conf.ipam.plugin_type.is_empty());
                    }
                    Err(err) => {
                        prop_assert!([1, 2, 6, 7].contains(&err.code), "{}", err);
                        // Errors found after the version speak the caller's.
                        prop_assert!(
                            err.cni_version == SPEC_VERSION
                                || Some(err.cni_version.as_str()) == peeked,
                            "{}",
                            err
                        );
                        match err.code {
                            7 => prop_assert!(err.msg.contains(" field "), "{}", err),
                            2 => prop_assert!(err.msg.contains(" ipam."), "{}", err),
                            1 => prop_assert!(err.msg.contains("CNI version"), "{}", err),
                            _ => prop_assert!(!err.details.is_empty(), "{}", err),
                        }
                    }
                }
                Ok(())
            },
        );
    }

    /// A change to a configuration: a field (`ipam.` for the ipam object's)
    /// removed, or set to a value.
    #[derive(Debug, Clone)]
    enum Edit {
        Remove(&'static str),
        Set(String, Value),
    }

    impl Edit {
        fn apply(self, conf: &mut Value) {
            let (field, value) = match self {
                Edit::Remove(field) => (field.to_owned(), None),
                Edit::Set(field, value) => (field, Some(value)),
            };
            let (object, field) = match field.strip_prefix("ipam.") {
                Some(inner) => (&mut conf["ipam"], inner.to_owned()),
                None => (conf, field),
            };
            let object = object.as_object_mut().unwrap();
            match value {
                Some(value) => object.insert(field, value),
                None => object.remove(&field),
            };
        }
    }

    /// One thing wrong with a valid configuration, the error code it gets
    /// and the text its message must contain.
    fn conf_fault() -> impl Strategy<Value = (Edit, u32, String)> {
        let not_string = || {
            prop_oneof![
                Just(json!(null)),
                any::<i64>().prop_map(Value::from),
                Just(json!(["a"])),
                Just(json!({})),
                Just(json!(true)),
            ]
            .boxed()
        };
        let remove = |field: &'static str| Just((Edit::Remove(field), 7, field.to_owned()));
        let set =
            |field: &'static str, values: BoxedStrategy<Value>, code: u32, named: &'static str| {
                values.prop_map(move |v| (Edit::Set(field.to_owned(), v), code, named.to_owned()))
            };
        let strings = |re: &'static str| re.prop_map(Value::from).boxed();
        let unsupported_version = strings("[0-9]\\.[0-9]\\.[0-9]|[a-z]{0,4}")
            .prop_filter("unsupported", |v| {
                !SUPPORTED_VERSIONS.contains(&v.as_str().unwrap_or_default())
            })
            .boxed();
        const VALID_ATTACHMENTS: &str = "cni.dev/valid-attachments";
        prop_oneof![
            remove("cniVersion"),
            remove("name"),
            remove("type"),
            remove("ipam"),
            remove("ipam.type"),
            set("cniVersion", not_string(), 7, "cniVersion"),
            set("name", not_string(), 7, "name"),
            set("type", not_string(), 7, "type"),
            set("ipam.type", not_string(), 7, "ipam.type"),
            set("cniVersion", unsupported_version, 1, "CNI version"),
            set(
                "name",
                strings("[_.-][a-z]{0,4}|[a-z]{1,4}[/ :@][a-z]{0,4}|"),
                7,
                "name"
            ),
            set("type", strings("[a-z]{0,4}[/\\\\][a-z]{0,4}|"), 7, "type"),
            set(
                "ipam",
                prop_oneof![Just(json!(null)), Just(json!("vpc-ipam")), Just(json!([]))].boxed(),
                7,
                "ipam"
            ),
            set("ipam.type", Just(json!("")).boxed(), 7, "ipam.type"),
            set(
                "ipam.agentSocket",
                prop_oneof![strings("[a-z.]{0,12}"), not_string()].boxed(),
                7,
                "ipam.agentSocket"
            ),
            set(
                "prevResult",
                prop_oneof![
                    strings(".{0,5}"),
                    Just(json!([])),
                    any::<i64>().prop_map(Value::from)
                ]
                .boxed(),
                7,
                "prevResult"
            ),
            set(
                VALID_ATTACHMENTS,
                prop_oneof![Just(json!({})), Just(json!("a"))].boxed(),
                7,
                VALID_ATTACHMENTS
            ),
            set(
                VALID_ATTACHMENTS,
                prop_oneof![Just(json!([1])), Just(json!([null]))].boxed(),
                7,
                "cni.dev/valid-attachments[0]"
            ),
            set(
                VALID_ATTACHMENTS,
                prop_oneof![
                    Just(json!([{"ifname": "eth0"}])),
                    Just(json!([{"containerID": 1, "ifname": "eth0"}])),
                ]
                .boxed(),
                7,
                "cni.dev/valid-attachments[0].containerID"
            ),
            set(
                VALID_ATTACHMENTS,
                Just(json!([{"containerID": "a"}])).boxed(),
                7,
                "cni.dev/valid-attachments[0].ifname"
            ),
            "[a-zA-Z]{1,10}"
                .prop_filter("not an ipam field", |k| k != "type" && k != "agentSocket")
                .prop_map(|key| (
                    Edit::Set(format!("ipam.{key}"), json!("x")),
                    2,
                    format!("ipam.{key}")
                )),
        ]
    }

    #[test]
    fn a_bad_cni_configuration_field_is_named() {
        // GC reads every field, the valid attachments too.
        let cases = (net_conf(true), conf_fault());
        check(
            "a_bad_cni_configuration_field_is_named",
            cases,
            |(conf, (edit, code, named))| {
                let mut stdin = render_conf(&conf);
                edit.apply(&mut stdin);
                let err = match NetConf::parse(stdin.to_string().as_bytes(), &Command::Gc) {
                    Ok(conf) => return Err(TestCaseError::fail(format!("accepted: {conf:?}"))),
                    Err(err) => err,
                };
                prop_assert_eq!(err.code, code, "{}", err);
                prop_assert!(err.msg.contains(&named), "{} not named: {}", named, err);
                Ok(())
            },
        );
    }

    // ------------------------------------------------------ agent protocol

    fn attachment_key() -> impl Strategy<Value = AttachmentKey> {
        (any::<String>(), any::<String>()).prop_map(|(container_id, ifname)| AttachmentKey {
            container_id,
            ifname,
        })
    }

    fn ip() -> impl Strategy<Value = IpAddr> {
        prop_oneof![
            any::<u32>().prop_map(|a| IpAddr::V4(Ipv4Addr::from(a))),
            any::<u128>().prop_map(|a| IpAddr::V6(Ipv6Addr::from(a))),
        ]
    }

    fn request() -> impl Strategy<Value = Request> {
        prop_oneof![
            (attachment_key(), any::<String>(), any::<String>()).prop_map(
                |(key, namespace, name)| {
                    Request::Add {
                        key,
                        pod: PodRef { namespace, name },
                    }
                }
            ),
            attachment_key().prop_map(|key| Request::Del { key }),
            (attachment_key(), vec(ip(), 0..3)).prop_map(|(key, ips)| Request::Check { key, ips }),
            vec(attachment_key(), 0..3).prop_map(|valid| Request::Gc { valid }),
            Just(Request::Status),
        ]
    }

    fn key_json(key: &AttachmentKey) -> Value {
        json!({ "containerId": key.container_id, "ifname": key.ifname })
    }

    /// The wire format: an object tagged by `op`, camelCase fields, empty
    /// Pod fields left out.
    fn render_request(request: &Request) -> Value {
        match request {
            Request::Add { key, pod } => {
                let mut p = json!({});
                if !pod.namespace.is_empty() {
                    p["namespace"] = json!(pod.namespace);
                }
                if !pod.name.is_empty() {
                    p["name"] = json!(pod.name);
                }
                json!({ "op": "add", "key": key_json(key), "pod": p })
            }
            Request::Del { key } => json!({ "op": "del", "key": key_json(key) }),
            Request::Check { key, ips } => {
                json!({ "op": "check", "key": key_json(key), "ips": ips })
            }
            Request::Gc { valid } => {
                let valid: Vec<Value> = valid.iter().map(key_json).collect();
                json!({ "op": "gc", "valid": valid })
            }
            Request::Status => json!({ "op": "status" }),
        }
    }

    fn response() -> impl Strategy<Value = Response> {
        prop_oneof![
            (ip(), 0..=32u8).prop_map(|(ip, len)| {
                let len = if ip.is_ipv4() { len } else { len * 4 };
                Response::Allocated(Lease {
                    address: Cidr::new(ip, len).unwrap(),
                    gateway: ip,
                })
            }),
            any::<usize>().prop_map(|released| Response::Ok { released }),
            (any::<u32>(), any::<String>(), any::<String>())
                .prop_map(|(code, msg, details)| Response::Error { code, msg, details }),
        ]
    }

    #[test]
    fn agent_messages_round_trip_as_one_line() {
        check(
            "agent_messages_round_trip_as_one_line",
            (request(), response()),
            |(request, response)| {
                let line = serde_json::to_string(&request).unwrap();
                prop_assert!(!line.contains('\n'));
                prop_assert_eq!(
                    serde_json::from_str::<Value>(&line).unwrap(),
                    render_request(&request)
                );
                prop_assert_eq!(serde_json::from_str::<Request>(&line).unwrap(), request);
                let line = serde_json::to_string(&response).unwrap();
                prop_assert!(!line.contains('\n'));
                prop_assert_eq!(serde_json::from_str::<Response>(&line).unwrap(), response);
                Ok(())
            },
        );
    }

    #[test]
    fn a_request_without_a_field_names_it() {
        let cases = (
            attachment_key(),
            select(&["op", "key", "containerId", "ifname", "pod", "ips", "valid"][..]),
        );
        check(
            "a_request_without_a_field_names_it",
            cases,
            |(key, field)| {
                let request = match field {
                    "pod" | "op" => Request::Add {
                        key,
                        pod: PodRef::default(),
                    },
                    "ips" => Request::Check {
                        key,
                        ips: Vec::new(),
                    },
                    "valid" => Request::Gc { valid: vec![key] },
                    _ => Request::Del { key },
                };
                let mut value = render_request(&request);
                let object = match field {
                    "containerId" | "ifname" => &mut value["key"],
                    _ => &mut value,
                };
                object.as_object_mut().unwrap().remove(field);
                let err = serde_json::from_value::<Request>(value).unwrap_err();
                prop_assert!(err.to_string().contains(&format!("`{field}`")), "{}", err);
                Ok(())
            },
        );
    }

    /// A running agent with a static range, serving on a socket in a
    /// temporary directory.
    struct TestAgent {
        // Dropped first: the agent stops before its directory goes.
        _runtime: tokio::runtime::Runtime,
        socket: PathBuf,
        _dir: tempfile::TempDir,
    }

    fn start_agent() -> TestAgent {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agent.sock");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let range: Cidr = "10.0.0.0/24".parse().unwrap();
            let backend = Arc::new(StaticRanges::new(&[range]).unwrap());
            let store = Store::open(&dir.path().join("store.redb")).unwrap();
            let metrics = Metrics::register(&mut prometheus_client::registry::Registry::default());
            let config = AgentConfig {
                targets: TargetFlags {
                    min: Some(0),
                    warm: Some(0),
                    max: Some(0),
                },
                cooldown: Duration::ZERO,
                // An ADD on an empty pool answers at once.
                add_timeout: Duration::ZERO,
                batch_delay: Duration::ZERO,
            };
            let agent = Agent::start(backend, store, config, None, metrics)
                .await
                .unwrap();
            let listener = server::bind(&socket).unwrap();
            tokio::spawn(server::serve(listener, agent, std::future::pending()));
        });
        TestAgent {
            _runtime: runtime,
            socket,
            _dir: dir,
        }
    }

    /// Bytes a client could send: requests with one field replaced by
    /// anything, any JSON, any bytes.
    fn any_request_line() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            (
                request(),
                select(&["op", "key", "pod", "ips", "valid"][..]),
                any_json()
            )
                .prop_map(|(request, field, value)| {
                    let mut request = render_request(&request);
                    request[field] = value;
                    request.to_string().into_bytes()
                }),
            any_json().prop_map(|v| v.to_string().into_bytes()),
            vec(any::<u8>(), 0..64),
        ]
    }

    #[test]
    fn the_agent_answers_any_request_line() {
        let agent = start_agent();
        check(
            "the_agent_answers_any_request_line",
            (any_request_line(), any::<bool>()),
            |(bytes, newline)| {
                let mut stream = UnixStream::connect(&agent.socket).unwrap();
                stream
                    .set_read_timeout(Some(Duration::from_secs(10)))
                    .unwrap();
                let mut sent = bytes.clone();
                if newline {
                    sent.push(b'\n');
                }
                // One write: the agent answers the first line and closes,
                // which can beat anything written after it.
                stream.write_all(&sent).unwrap();
                let _ = stream.shutdown(std::net::Shutdown::Write);
                let mut answer = Vec::new();
                stream.read_to_end(&mut answer).unwrap();
                // Exactly one line, a response.
                prop_assert!(!answer.is_empty(), "no answer");
                prop_assert_eq!(
                    answer.iter().position(|b| *b == b'\n'),
                    Some(answer.len() - 1)
                );
                let response: Response = serde_json::from_slice(&answer).unwrap();
                // The agent reads up to the first newline.
                let line = bytes.split(|b| *b == b'\n').next().unwrap_or_default();
                if serde_json::from_slice::<Request>(line).is_err() {
                    let Response::Error { code, details, .. } = &response else {
                        return Err(TestCaseError::fail(format!("{response:?}")));
                    };
                    prop_assert_eq!(*code, 6);
                    prop_assert!(!details.is_empty());
                }
                Ok(())
            },
        );
    }
}
