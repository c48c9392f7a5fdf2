//! The CNI protocol as an IPAM plugin sees it (CNI specification 1.1):
//! the environment, the network configuration on stdin, the result and
//! error objects on stdout.

use std::ffi::OsString;
use std::net::IpAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::cidr::Cidr;

/// The version this plugin speaks when the caller's version is unknown.
pub const SPEC_VERSION: &str = "1.1.0";
/// 0.4.0 is kept for runtimes and main plugins that have not moved to 1.x
/// (Debian's containernetworking-plugins 1.1.1 speaks up to 1.0.0).
pub const SUPPORTED_VERSIONS: [&str; 3] = ["0.4.0", "1.0.0", "1.1.0"];

// ---------------------------------------------------------------- errors

/// The spec's well-known error codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    IncompatibleVersion,
    UnsupportedField,
    UnknownContainer,
    InvalidEnvironment,
    IoFailure,
    DecodeFailure,
    InvalidNetworkConfig,
    TryAgainLater,
    PluginNotAvailable,
    LimitedConnectivity,
}

impl ErrorCode {
    pub const fn code(self) -> u32 {
        match self {
            Self::IncompatibleVersion => 1,
            Self::UnsupportedField => 2,
            Self::UnknownContainer => 3,
            Self::InvalidEnvironment => 4,
            Self::IoFailure => 5,
            Self::DecodeFailure => 6,
            Self::InvalidNetworkConfig => 7,
            Self::TryAgainLater => 11,
            Self::PluginNotAvailable => 50,
            Self::LimitedConnectivity => 51,
        }
    }
}

/// The error object a plugin prints on stdout before exiting non-zero.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Error {
    pub cni_version: String,
    pub code: u32,
    pub msg: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub details: String,
}

impl Error {
    pub fn new(code: ErrorCode, msg: impl Into<String>, details: impl Into<String>) -> Self {
        Self {
            cni_version: SPEC_VERSION.into(),
            code: code.code(),
            msg: msg.into(),
            details: details.into(),
        }
    }

    /// The spec wants errors in the caller's version once it is known.
    pub fn with_version(mut self, version: &str) -> Self {
        self.cni_version = version.into();
        self
    }

    pub fn to_json(&self) -> String {
        let mut object = json!({
            "cniVersion": self.cni_version,
            "code": self.code,
            "msg": self.msg,
        });
        if !self.details.is_empty() {
            object["details"] = json!(self.details);
        }
        object.to_string()
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (CNI error {})", self.msg, self.code)?;
        if !self.details.is_empty() {
            write!(f, ": {}", self.details)?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {}

/// Output of the VERSION command.
pub fn version_json() -> String {
    json!({ "cniVersion": SPEC_VERSION, "supportedVersions": SUPPORTED_VERSIONS }).to_string()
}

// ------------------------------------------------------------ environment

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Add(Attachment),
    Del(Attachment),
    Check(Attachment),
    Version,
    Status,
    Gc,
}

impl Command {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Add(_) => "ADD",
            Self::Del(_) => "DEL",
            Self::Check(_) => "CHECK",
            Self::Version => "VERSION",
            Self::Status => "STATUS",
            Self::Gc => "GC",
        }
    }
}

/// Which container interface an ADD, DEL or CHECK is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    pub container_id: String,
    pub ifname: String,
    /// Always set for ADD and CHECK; DEL may come after the namespace is gone.
    pub netns: Option<PathBuf>,
}

/// The CNI_* environment of one plugin run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invocation {
    pub command: Command,
    /// CNI_ARGS pairs, in order ("IgnoreUnknown=1;K8S_POD_NAME=web-0").
    pub args: Vec<(String, String)>,
    /// CNI_PATH entries; only GC requires them, and this plugin never
    /// delegates, so it only validates them.
    pub path: Vec<PathBuf>,
}

impl Invocation {
    pub fn from_env() -> Result<Self, Error> {
        Self::parse_env(|name| std::env::var_os(name))
    }

    /// Parses the environment through `get`, so tests need not touch the
    /// process environment. Every bad or missing variable is named in `msg`.
    pub fn parse_env(get: impl Fn(&str) -> Option<OsString>) -> Result<Self, Error> {
        let mut env = EnvReader {
            get,
            problems: Vec::new(),
        };

        let Some(command) = env.read("CNI_COMMAND") else {
            return Err(env
                .error()
                .unwrap_or_else(|| env_error(&["CNI_COMMAND"], "")));
        };
        let needs = match command.as_str() {
            "ADD" | "CHECK" => Needs {
                attachment: true,
                netns: true,
                path: false,
            },
            "DEL" => Needs {
                attachment: true,
                netns: false,
                path: false,
            },
            "GC" => Needs {
                attachment: false,
                netns: false,
                path: true,
            },
            "VERSION" | "STATUS" => Needs {
                attachment: false,
                netns: false,
                path: false,
            },
            other => {
                let details = format!(
                    "CNI_COMMAND {other:?} is not one of ADD, DEL, CHECK, VERSION, STATUS, GC"
                );
                return Err(env_error(&["CNI_COMMAND"], &details));
            }
        };

        let container_id = env.read("CNI_CONTAINERID");
        let ifname = env.read("CNI_IFNAME");
        let netns = env.read("CNI_NETNS");
        let cni_args = env.read("CNI_ARGS");
        let cni_path = env.read("CNI_PATH");

        if needs.attachment {
            env.require("CNI_CONTAINERID", &container_id, &command);
            env.require("CNI_IFNAME", &ifname, &command);
        }
        if needs.netns {
            env.require("CNI_NETNS", &netns, &command);
        }
        if needs.path {
            env.require("CNI_PATH", &cni_path, &command);
        }
        if let Some(id) = &container_id {
            env.check("CNI_CONTAINERID", validate_container_id(id));
        }
        if let Some(name) = &ifname {
            env.check("CNI_IFNAME", validate_ifname(name));
        }
        let args = match cni_args.as_deref().map(parse_cni_args).transpose() {
            Ok(args) => args.unwrap_or_default(),
            Err(why) => {
                env.check("CNI_ARGS", Err(why));
                Vec::new()
            }
        };
        if let Some(error) = env.error() {
            return Err(error);
        }

        let path = cni_path
            .map(|p| {
                std::env::split_paths(&p)
                    .filter(|p| !p.as_os_str().is_empty())
                    .collect()
            })
            .unwrap_or_default();
        let attachment = || Attachment {
            container_id: container_id.clone().unwrap_or_default(),
            ifname: ifname.clone().unwrap_or_default(),
            netns: netns.clone().map(PathBuf::from),
        };
        let command = match command.as_str() {
            "ADD" => Command::Add(attachment()),
            "DEL" => Command::Del(attachment()),
            "CHECK" => Command::Check(attachment()),
            "GC" => Command::Gc,
            "STATUS" => Command::Status,
            _ => Command::Version,
        };
        Ok(Self {
            command,
            args,
            path,
        })
    }
}

/// Which variables a command requires (CNI spec 1.1, section 2).
struct Needs {
    attachment: bool,
    netns: bool,
    path: bool,
}

/// Reads variables and collects every problem, so one error names them all.
struct EnvReader<F> {
    get: F,
    problems: Vec<(&'static str, String)>,
}

impl<F: Fn(&str) -> Option<OsString>> EnvReader<F> {
    /// An empty value counts as unset, as runtimes pass e.g. `CNI_NETNS=`.
    fn read(&mut self, name: &'static str) -> Option<String> {
        let value = (self.get)(name).filter(|v| !v.is_empty())?;
        match value.into_string() {
            Ok(text) => Some(text),
            Err(_) => {
                self.problems
                    .push((name, format!("{name} is not valid UTF-8")));
                None
            }
        }
    }

    fn require(&mut self, name: &'static str, value: &Option<String>, command: &str) {
        let already_reported = self.problems.iter().any(|(n, _)| *n == name);
        if value.is_none() && !already_reported {
            self.problems
                .push((name, format!("{name} is required for {command}")));
        }
    }

    fn check(&mut self, name: &'static str, result: Result<(), String>) {
        if let Err(why) = result {
            self.problems.push((name, format!("{name} {why}")));
        }
    }

    fn error(&self) -> Option<Error> {
        if self.problems.is_empty() {
            return None;
        }
        let names: Vec<&str> = self.problems.iter().map(|(name, _)| *name).collect();
        let details: Vec<&str> = self.problems.iter().map(|(_, why)| why.as_str()).collect();
        Some(env_error(&names, &details.join("; ")))
    }
}

fn env_error(names: &[&str], details: &str) -> Error {
    Error::new(
        ErrorCode::InvalidEnvironment,
        format!(
            "invalid or missing environment variables: {}",
            names.join(", ")
        ),
        details,
    )
}

/// Spec: starts with an alphanumeric character, then alphanumerics, '_', '.', '-'.
fn validate_container_id(id: &str) -> Result<(), String> {
    let first_ok = id.chars().next().is_some_and(|c| c.is_ascii_alphanumeric());
    let rest_ok = id
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if first_ok && rest_ok {
        Ok(())
    } else {
        Err(format!(
            "{id:?} must start with a letter or digit followed by letters, digits, '_', '.' or '-'"
        ))
    }
}

/// Spec: a Linux interface name: 1-15 bytes, not "." or "..", no '/', ':' or whitespace.
fn validate_ifname(name: &str) -> Result<(), String> {
    if name.len() > 15 {
        return Err(format!("{name:?} is longer than 15 bytes"));
    }
    if name == "." || name == ".." {
        return Err(format!("{name:?} is not a valid interface name"));
    }
    if name
        .chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace())
    {
        return Err(format!("{name:?} must not contain '/', ':' or whitespace"));
    }
    Ok(())
}

/// "K1=V1;K2=V2"; empty segments (a trailing ';') are tolerated.
fn parse_cni_args(text: &str) -> Result<Vec<(String, String)>, String> {
    text.split(';')
        .filter(|pair| !pair.is_empty())
        .map(|pair| match pair.split_once('=') {
            Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
            _ => Err(format!("entry {pair:?} is not KEY=VALUE")),
        })
        .collect()
}

// ---------------------------------------------------- network configuration

/// The network configuration as the IPAM plugin receives it: the main
/// plugin's configuration, whose `ipam` object is ours. Fields that belong
/// to the main plugin are not kept.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    pub cni_version: String,
    pub name: String,
    #[serde(rename = "type")]
    pub plugin_type: String,
    pub ipam: IpamConf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prev_result: Option<Value>,
    /// Set for GC: the attachments the runtime still knows about.
    #[serde(
        rename = "cni.dev/valid-attachments",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub valid_attachments: Option<Vec<ValidAttachment>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IpamConf {
    #[serde(rename = "type")]
    pub plugin_type: String,
    /// Unix socket of the node agent; the default is used when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_socket: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ValidAttachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

const IPAM_FIELDS: [&str; 2] = ["type", "agentSocket"];

impl NetConf {
    /// Parses stdin: bad JSON is code 6, an unsupported version code 1, a
    /// missing or invalid field code 7 and an unknown `ipam` field code 2,
    /// each naming the field.
    pub fn parse(stdin: &[u8], command: &Command) -> Result<Self, Error> {
        let value: Value = serde_json::from_slice(stdin).map_err(|err| {
            Error::new(
                ErrorCode::DecodeFailure,
                "cannot decode the network configuration",
                err.to_string(),
            )
        })?;
        let Value::Object(top) = value else {
            return Err(Error::new(
                ErrorCode::DecodeFailure,
                "cannot decode the network configuration",
                "expected a JSON object",
            ));
        };

        let cni_version = required_str(&top, "cniVersion", "")
            .map_err(|e| e.with_version(SPEC_VERSION))?
            .to_owned();
        if !SUPPORTED_VERSIONS.contains(&cni_version.as_str()) {
            return Err(Error::new(
                ErrorCode::IncompatibleVersion,
                format!("incompatible CNI version {cni_version:?}"),
                format!("supported versions: {}", SUPPORTED_VERSIONS.join(", ")),
            ));
        }
        let version = |e: Error| e.with_version(&cni_version);

        let name = required_str(&top, "name", "").map_err(version)?;
        validate_network_name(name).map_err(|why| version(invalid_field("name", why)))?;
        let plugin_type = required_str(&top, "type", "").map_err(version)?;
        if plugin_type.is_empty() || plugin_type.contains(['/', '\\']) {
            let why = "must be a plugin file name, without '/' or '\\'";
            return Err(version(invalid_field("type", why)));
        }

        let ipam = match top.get("ipam") {
            Some(Value::Object(ipam)) => ipam,
            Some(_) => return Err(version(invalid_field("ipam", "must be an object"))),
            None => return Err(version(invalid_field("ipam", "is required"))),
        };
        if let Some((key, value)) = ipam
            .iter()
            .find(|(key, _)| !IPAM_FIELDS.contains(&key.as_str()))
        {
            return Err(version(Error::new(
                ErrorCode::UnsupportedField,
                format!("unsupported field ipam.{key} = {value}"),
                format!("vpc-ipam accepts only ipam.{}", IPAM_FIELDS.join(", ipam.")),
            )));
        }
        let ipam_type = required_str(ipam, "type", "ipam.").map_err(version)?;
        if ipam_type.is_empty() {
            return Err(version(invalid_field("ipam.type", "must not be empty")));
        }
        let agent_socket = match ipam.get("agentSocket") {
            None => None,
            Some(Value::String(path)) if path.starts_with('/') => Some(PathBuf::from(path)),
            Some(_) => {
                let why = "must be an absolute path string";
                return Err(version(invalid_field("ipam.agentSocket", why)));
            }
        };

        let prev_result = match top.get("prevResult") {
            None => None,
            Some(object @ Value::Object(_)) => Some(object.clone()),
            Some(_) => return Err(version(invalid_field("prevResult", "must be an object"))),
        };

        let valid_attachments = match (command, top.get("cni.dev/valid-attachments")) {
            (_, Some(list)) => Some(parse_valid_attachments(list).map_err(version)?),
            // Without the list, GC would take every allocation for stale.
            (Command::Gc, None) => {
                return Err(version(invalid_field(
                    "cni.dev/valid-attachments",
                    "is required for GC",
                )));
            }
            (_, None) => None,
        };

        Ok(Self {
            cni_version: cni_version.clone(),
            name: name.to_owned(),
            plugin_type: plugin_type.to_owned(),
            ipam: IpamConf {
                plugin_type: ipam_type.to_owned(),
                agent_socket,
            },
            prev_result,
            valid_attachments,
        })
    }
}

/// The cniVersion of a configuration if it is one we support, for errors
/// raised before the configuration is parsed.
pub fn peek_version(stdin: &[u8]) -> Option<&'static str> {
    #[derive(Deserialize)]
    struct Versioned {
        #[serde(rename = "cniVersion")]
        cni_version: String,
    }
    let versioned: Versioned = serde_json::from_slice(stdin).ok()?;
    SUPPORTED_VERSIONS
        .into_iter()
        .find(|v| *v == versioned.cni_version)
}

fn invalid_field(field: &str, why: impl std::fmt::Display) -> Error {
    Error::new(
        ErrorCode::InvalidNetworkConfig,
        format!("invalid network configuration: field {field} {why}"),
        "",
    )
}

fn required_str<'a>(
    object: &'a Map<String, Value>,
    key: &str,
    prefix: &str,
) -> Result<&'a str, Error> {
    match object.get(key) {
        Some(Value::String(text)) => Ok(text),
        Some(_) => Err(invalid_field(&format!("{prefix}{key}"), "must be a string")),
        None => Err(invalid_field(&format!("{prefix}{key}"), "is required")),
    }
}

/// Spec: starts with an alphanumeric character, then alphanumerics, '_', '.', '-'.
fn validate_network_name(name: &str) -> Result<(), &'static str> {
    let first_ok = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric());
    let rest_ok = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if first_ok && rest_ok {
        Ok(())
    } else {
        Err("must start with a letter or digit followed by letters, digits, '_', '.' or '-'")
    }
}

fn parse_valid_attachments(list: &Value) -> Result<Vec<ValidAttachment>, Error> {
    const FIELD: &str = "cni.dev/valid-attachments";
    let Value::Array(items) = list else {
        return Err(invalid_field(FIELD, "must be an array"));
    };
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let Value::Object(object) = item else {
                return Err(invalid_field(&format!("{FIELD}[{i}]"), "must be an object"));
            };
            let prefix = format!("{FIELD}[{i}].");
            Ok(ValidAttachment {
                container_id: required_str(object, "containerID", &prefix)?.to_owned(),
                ifname: required_str(object, "ifname", &prefix)?.to_owned(),
            })
        })
        .collect()
}

// ------------------------------------------------------------------ result

/// The abbreviated result an IPAM plugin returns for ADD: no interfaces,
/// which the main plugin owns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IpamResult {
    pub cni_version: String,
    pub ips: Vec<IpConfig>,
    #[serde(default)]
    pub routes: Vec<Route>,
    #[serde(default)]
    pub dns: Dns,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpConfig {
    /// The Pod address with the prefix of its subnet.
    pub address: Cidr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    pub dst: Cidr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<IpAddr>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dns {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
}

impl IpamResult {
    /// JSON in the result's own version: 0.x results also carry each
    /// address's IP version ("4" or "6"), which 1.0 dropped.
    pub fn to_json(&self) -> Result<String, serde_json::Error> {
        let mut value = serde_json::to_value(self)?;
        if self.cni_version.starts_with("0.")
            && let Some(Value::Array(ips)) = value.get_mut("ips")
        {
            for (ip, config) in ips.iter_mut().zip(&self.ips) {
                let family = if config.address.addr().is_ipv4() {
                    "4"
                } else {
                    "6"
                };
                ip["version"] = json!(family);
            }
        }
        Ok(value.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> {
        let map: HashMap<String, OsString> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), OsString::from(v)))
            .collect();
        move |name| map.get(name).cloned()
    }

    const ADD_ENV: [(&str, &str); 6] = [
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "3f6940ab5ab4"),
        ("CNI_NETNS", "/var/run/netns/pod1"),
        ("CNI_IFNAME", "eth0"),
        (
            "CNI_ARGS",
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0",
        ),
        ("CNI_PATH", "/opt/cni/bin:/usr/lib/cni"),
    ];

    fn env_without(name: &str) -> Vec<(&'static str, &'static str)> {
        ADD_ENV
            .iter()
            .copied()
            .filter(|(k, _)| *k != name)
            .collect()
    }

    fn env_with(name: &'static str, value: &'static str) -> Vec<(&'static str, &'static str)> {
        let mut vars = env_without(name);
        vars.push((name, value));
        vars
    }

    fn env_err(vars: &[(&str, &str)]) -> Error {
        Invocation::parse_env(env(vars)).unwrap_err()
    }

    #[test]
    fn parses_a_full_add_environment() {
        let inv = Invocation::parse_env(env(&ADD_ENV)).unwrap();
        assert_eq!(
            inv.command,
            Command::Add(Attachment {
                container_id: "3f6940ab5ab4".into(),
                ifname: "eth0".into(),
                netns: Some("/var/run/netns/pod1".into()),
            })
        );
        assert_eq!(inv.args[2], ("K8S_POD_NAME".to_owned(), "web-0".to_owned()));
        assert_eq!(
            inv.path,
            vec![PathBuf::from("/opt/cni/bin"), PathBuf::from("/usr/lib/cni")]
        );
    }

    #[test]
    fn missing_command_is_code_4() {
        let err = env_err(&[]);
        assert_eq!(err.code, 4);
        assert!(err.msg.contains("CNI_COMMAND"), "{err}");
    }

    #[test]
    fn unknown_command_is_code_4() {
        let err = env_err(&[("CNI_COMMAND", "FROB")]);
        assert_eq!(err.code, 4);
        assert!(err.msg.contains("CNI_COMMAND"), "{err}");
        assert!(err.details.contains("FROB"), "{err}");
    }

    #[test]
    fn each_required_variable_is_named_when_missing() {
        for name in ["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"] {
            let err = env_err(&env_without(name));
            assert_eq!(err.code, 4, "{name}");
            assert!(err.msg.contains(name), "{name}: {err}");
        }
    }

    #[test]
    fn all_missing_variables_are_named_at_once() {
        let err = env_err(&[("CNI_COMMAND", "CHECK")]);
        for name in ["CNI_CONTAINERID", "CNI_IFNAME", "CNI_NETNS"] {
            assert!(err.msg.contains(name), "{name}: {err}");
        }
    }

    #[test]
    fn empty_counts_as_missing() {
        let err = env_err(&env_with("CNI_NETNS", ""));
        assert!(err.msg.contains("CNI_NETNS"), "{err}");
    }

    #[test]
    fn invalid_values_are_code_4_naming_the_variable() {
        for (name, value) in [
            ("CNI_CONTAINERID", "-leading-dash"),
            ("CNI_CONTAINERID", "has space"),
            ("CNI_IFNAME", "averyveryverylongname"),
            ("CNI_IFNAME", "eth/0"),
            ("CNI_IFNAME", ".."),
            ("CNI_ARGS", "K8S_POD_NAME"),
            ("CNI_ARGS", "=value"),
        ] {
            let err = env_err(&env_with(name, value));
            assert_eq!(err.code, 4, "{name}={value}");
            assert!(err.msg.contains(name), "{name}={value}: {err}");
        }
    }

    #[test]
    fn non_utf8_is_code_4() {
        use std::os::unix::ffi::OsStringExt;
        let get = |name: &str| match name {
            "CNI_COMMAND" => Some(OsString::from("DEL")),
            "CNI_CONTAINERID" => Some(OsString::from("abc")),
            "CNI_IFNAME" => Some(OsString::from_vec(vec![0x65, 0xff])),
            _ => None,
        };
        let err = Invocation::parse_env(get).unwrap_err();
        assert_eq!(err.code, 4);
        assert!(err.msg.contains("CNI_IFNAME"), "{err}");
        assert!(err.details.contains("UTF-8"), "{err}");
    }

    #[test]
    fn del_does_not_need_netns() {
        let mut vars = env_without("CNI_NETNS");
        vars.retain(|(k, _)| *k != "CNI_COMMAND");
        vars.push(("CNI_COMMAND", "DEL"));
        let inv = Invocation::parse_env(env(&vars)).unwrap();
        let Command::Del(attachment) = inv.command else {
            panic!("not DEL")
        };
        assert_eq!(attachment.netns, None);
    }

    #[test]
    fn per_command_requirements() {
        assert_eq!(
            Invocation::parse_env(env(&[("CNI_COMMAND", "VERSION")]))
                .unwrap()
                .command,
            Command::Version
        );
        assert_eq!(
            Invocation::parse_env(env(&[("CNI_COMMAND", "STATUS")]))
                .unwrap()
                .command,
            Command::Status
        );
        let err = env_err(&[("CNI_COMMAND", "GC")]);
        assert!(err.msg.contains("CNI_PATH"), "{err}");
        let gc = Invocation::parse_env(env(&[("CNI_COMMAND", "GC"), ("CNI_PATH", "/opt/cni/bin")]));
        assert_eq!(gc.unwrap().command, Command::Gc);
    }

    fn add() -> Command {
        Invocation::parse_env(env(&ADD_ENV)).unwrap().command
    }

    fn conf_err(stdin: &str, command: &Command) -> Error {
        NetConf::parse(stdin.as_bytes(), command).unwrap_err()
    }

    const CONF: &str = r#"{
        "cniVersion": "1.0.0",
        "name": "pods",
        "type": "ptp",
        "mtu": 9001,
        "ipam": { "type": "vpc-ipam", "agentSocket": "/tmp/agent.sock" },
        "prevResult": { "ips": [] }
    }"#;

    #[test]
    fn parses_the_config_a_main_plugin_passes_on() {
        let conf = NetConf::parse(CONF.as_bytes(), &add()).unwrap();
        assert_eq!(conf.cni_version, "1.0.0");
        assert_eq!(conf.name, "pods");
        assert_eq!(conf.plugin_type, "ptp");
        assert_eq!(conf.ipam.plugin_type, "vpc-ipam");
        assert_eq!(
            conf.ipam.agent_socket,
            Some(PathBuf::from("/tmp/agent.sock"))
        );
        assert!(conf.prev_result.is_some());
    }

    #[test]
    fn bad_json_is_code_6() {
        for stdin in ["", "{", "not json", "[1, 2]"] {
            assert_eq!(conf_err(stdin, &add()).code, 6, "{stdin:?}");
        }
    }

    #[test]
    fn unsupported_version_is_code_1() {
        let err = conf_err(
            r#"{"cniVersion":"0.3.1","name":"n","type":"t","ipam":{"type":"i"}}"#,
            &add(),
        );
        assert_eq!(err.code, 1);
        assert!(err.msg.contains("0.3.1"), "{err}");
        assert!(err.details.contains("1.1.0"), "{err}");
    }

    #[test]
    fn missing_or_invalid_fields_are_code_7_naming_the_field() {
        for (stdin, field) in [
            (
                r#"{"name":"n","type":"t","ipam":{"type":"i"}}"#,
                "cniVersion",
            ),
            (
                r#"{"cniVersion":1,"name":"n","type":"t","ipam":{"type":"i"}}"#,
                "cniVersion",
            ),
            (
                r#"{"cniVersion":"1.1.0","type":"t","ipam":{"type":"i"}}"#,
                "name",
            ),
            (
                r#"{"cniVersion":"1.1.0","name":"-n","type":"t","ipam":{"type":"i"}}"#,
                "name",
            ),
            (
                r#"{"cniVersion":"1.1.0","name":"n","ipam":{"type":"i"}}"#,
                "type",
            ),
            (
                r#"{"cniVersion":"1.1.0","name":"n","type":"a/b","ipam":{"type":"i"}}"#,
                "type",
            ),
            (r#"{"cniVersion":"1.1.0","name":"n","type":"t"}"#, "ipam"),
            (
                r#"{"cniVersion":"1.1.0","name":"n","type":"t","ipam":[]}"#,
                "ipam",
            ),
            (
                r#"{"cniVersion":"1.1.0","name":"n","type":"t","ipam":{}}"#,
                "ipam.type",
            ),
            (
                r#"{"cniVersion":"1.1.0","name":"n","type":"t","ipam":{"type":""}}"#,
                "ipam.type",
            ),
            (
                r#"{"cniVersion":"1.1.0","name":"n","type":"t","ipam":{"type":"i","agentSocket":"rel.sock"}}"#,
                "ipam.agentSocket",
            ),
            (
                r#"{"cniVersion":"1.1.0","name":"n","type":"t","ipam":{"type":"i"},"prevResult":1}"#,
                "prevResult",
            ),
        ] {
            let err = conf_err(stdin, &add());
            assert_eq!(err.code, 7, "{stdin}: {err}");
            assert!(err.msg.contains(field), "{stdin}: {err}");
        }
    }

    #[test]
    fn errors_after_the_version_carry_the_callers_version() {
        let err = conf_err(r#"{"cniVersion":"0.4.0","name":"n","type":"t"}"#, &add());
        assert_eq!(err.cni_version, "0.4.0");
        let err = conf_err(r#"{"name":"n"}"#, &add());
        assert_eq!(err.cni_version, SPEC_VERSION);
    }

    #[test]
    fn unknown_ipam_field_is_code_2_with_key_and_value() {
        let err = conf_err(
            r#"{"cniVersion":"1.1.0","name":"n","type":"t","ipam":{"type":"i","subnet":"10.0.0.0/8"}}"#,
            &add(),
        );
        assert_eq!(err.code, 2);
        assert!(
            err.msg.contains("ipam.subnet") && err.msg.contains("10.0.0.0/8"),
            "{err}"
        );
    }

    #[test]
    fn gc_requires_valid_attachments() {
        let base = r#""cniVersion":"1.1.0","name":"n","type":"t","ipam":{"type":"i"}"#;
        let err = conf_err(&format!("{{{base}}}"), &Command::Gc);
        assert_eq!(err.code, 7);
        assert!(err.msg.contains("cni.dev/valid-attachments"), "{err}");

        let err = conf_err(
            &format!(r#"{{{base},"cni.dev/valid-attachments":[{{"containerID":"a"}}]}}"#),
            &Command::Gc,
        );
        assert!(
            err.msg.contains("cni.dev/valid-attachments[0].ifname"),
            "{err}"
        );

        let conf = NetConf::parse(
            format!(
                r#"{{{base},"cni.dev/valid-attachments":[{{"containerID":"a","ifname":"eth0"}}]}}"#
            )
            .as_bytes(),
            &Command::Gc,
        )
        .unwrap();
        assert_eq!(
            conf.valid_attachments,
            Some(vec![ValidAttachment {
                container_id: "a".into(),
                ifname: "eth0".into()
            }])
        );
    }

    #[test]
    fn version_output() {
        assert_eq!(
            version_json(),
            r#"{"cniVersion":"1.1.0","supportedVersions":["0.4.0","1.0.0","1.1.0"]}"#
        );
    }

    #[test]
    fn peeks_only_supported_versions() {
        assert_eq!(peek_version(br#"{"cniVersion":"0.4.0"}"#), Some("0.4.0"));
        assert_eq!(peek_version(br#"{"cniVersion":"0.2.0"}"#), None);
        assert_eq!(peek_version(b"garbage"), None);
    }

    #[test]
    fn error_json() {
        let err = Error::new(ErrorCode::TryAgainLater, "busy", "").with_version("1.0.0");
        assert_eq!(
            err.to_json(),
            r#"{"cniVersion":"1.0.0","code":11,"msg":"busy"}"#
        );
        let err = Error::new(ErrorCode::PluginNotAvailable, "down", "agent gone");
        let back: Error = serde_json::from_str(&err.to_json()).unwrap();
        assert_eq!(back, err);
    }

    #[test]
    fn error_codes_match_the_spec() {
        let codes = [
            (ErrorCode::IncompatibleVersion, 1),
            (ErrorCode::UnsupportedField, 2),
            (ErrorCode::UnknownContainer, 3),
            (ErrorCode::InvalidEnvironment, 4),
            (ErrorCode::IoFailure, 5),
            (ErrorCode::DecodeFailure, 6),
            (ErrorCode::InvalidNetworkConfig, 7),
            (ErrorCode::TryAgainLater, 11),
            (ErrorCode::PluginNotAvailable, 50),
            (ErrorCode::LimitedConnectivity, 51),
        ];
        for (code, number) in codes {
            assert_eq!(code.code(), number, "{code:?}");
        }
    }

    #[test]
    fn result_json_per_version() {
        let result = IpamResult {
            cni_version: "1.1.0".into(),
            ips: vec![IpConfig {
                address: "10.0.1.7/24".parse().unwrap(),
                gateway: Some("10.0.1.1".parse().unwrap()),
            }],
            routes: vec![Route {
                dst: "0.0.0.0/0".parse().unwrap(),
                gw: None,
            }],
            dns: Dns::default(),
        };
        let json: Value = serde_json::from_str(&result.to_json().unwrap()).unwrap();
        assert_eq!(
            json,
            json!({
                "cniVersion": "1.1.0",
                "ips": [{ "address": "10.0.1.7/24", "gateway": "10.0.1.1" }],
                "routes": [{ "dst": "0.0.0.0/0" }],
                "dns": {}
            })
        );
        let old = IpamResult {
            cni_version: "0.4.0".into(),
            ..result
        };
        let json: Value = serde_json::from_str(&old.to_json().unwrap()).unwrap();
        assert_eq!(json["ips"][0]["version"], "4");
    }
}
