//! What the `vpc-ipam` CNI plugin does for each command: it validates its
//! input and asks the node agent, which owns allocation.

use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use crate::DEFAULT_AGENT_SOCKET;
use crate::cidr::Cidr;
use crate::cni::{self, Command, ErrorCode, Invocation, IpConfig, IpamResult, NetConf, Route};
use crate::protocol::{self, AttachmentKey, ClientError, PodRef, Request, Response};
use crate::server::pending_dir;

/// How long the plugin waits for the agent's answer: longer than the
/// agent's default ADD wait (60 s) for an empty pool, shorter than
/// kubelet's 2-minute runtime request timeout.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(100);

/// A successful run: what goes to stdout (the result, if the command has
/// one) and an optional note for stderr, which runtimes keep as a log.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Success {
    pub stdout: Option<String>,
    pub note: Option<String>,
}

pub fn run(invocation: &Invocation, stdin: &[u8]) -> Result<Success, cni::Error> {
    if invocation.command == Command::Version {
        return Ok(Success {
            stdout: Some(cni::version_json()),
            note: None,
        });
    }
    let conf = NetConf::parse(stdin, &invocation.command)?;
    let socket = conf
        .ipam
        .agent_socket
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_AGENT_SOCKET));
    respond(invocation, &conf, &socket).map_err(|e| e.with_version(&conf.cni_version))
}

fn key(attachment: &cni::Attachment) -> AttachmentKey {
    AttachmentKey {
        container_id: attachment.container_id.clone(),
        ifname: attachment.ifname.clone(),
    }
}

fn respond(invocation: &Invocation, conf: &NetConf, socket: &Path) -> Result<Success, cni::Error> {
    let request = match &invocation.command {
        Command::Version => return Ok(Success::default()),
        Command::Add(a) => Request::Add {
            key: key(a),
            pod: pod_ref(&invocation.args),
        },
        Command::Del(a) => Request::Del { key: key(a) },
        Command::Check(a) => Request::Check {
            key: key(a),
            ips: previous_ips(conf.prev_result.as_ref())?,
        },
        Command::Gc => Request::Gc {
            valid: conf
                .valid_attachments
                .iter()
                .flatten()
                .map(|v| AttachmentKey {
                    container_id: v.container_id.clone(),
                    ifname: v.ifname.clone(),
                })
                .collect(),
        },
        Command::Status => Request::Status,
    };
    match protocol::call(socket, &request, ANSWER_TIMEOUT) {
        Ok(Response::Allocated(lease)) => {
            let default_route: Cidr = if lease.address.addr().is_ipv4() {
                Cidr::new(IpAddr::from([0, 0, 0, 0]), 0)
            } else {
                Cidr::new(IpAddr::from([0u16; 8]), 0)
            }
            .map_err(|e| cni::Error::new(ErrorCode::IoFailure, "internal error", e.to_string()))?;
            let result = IpamResult {
                cni_version: conf.cni_version.clone(),
                ips: vec![IpConfig {
                    address: lease.address,
                    gateway: Some(lease.gateway),
                }],
                routes: vec![Route {
                    dst: default_route,
                    gw: None,
                }],
                dns: cni::Dns::default(),
            };
            let text = result.to_json().map_err(|e| {
                cni::Error::new(
                    ErrorCode::IoFailure,
                    "cannot encode the result",
                    e.to_string(),
                )
            })?;
            Ok(Success {
                stdout: Some(text),
                note: None,
            })
        }
        Ok(Response::Ok { .. }) => Ok(Success::default()),
        Ok(error @ Response::Error { .. }) => Err(error
            .into_cni_error()
            .unwrap_or_else(|| cni::Error::new(ErrorCode::IoFailure, "internal error", ""))),
        Err(err) => unreachable_agent(&invocation.command, socket, err),
    }
}

/// Without an answer from the agent: DEL still succeeds (the spec wants DEL
/// to tolerate missing state, and a runtime that keeps failing DEL never
/// frees the Pod), leaving the release for the agent to deliver when it is
/// back; everything else asks the runtime to try again later.
fn unreachable_agent(
    command: &Command,
    socket: &Path,
    err: ClientError,
) -> Result<Success, cni::Error> {
    let hint = match &err {
        ClientError::Unreachable { source, .. }
            if source.kind() == std::io::ErrorKind::PermissionDenied =>
        {
            "the agent's socket is root only: run the plugin as root"
        }
        _ => "is the vpc-ipam-agent Pod running on this node?",
    };
    if let Command::Del(a) = command {
        let note = match leave_pending_del(socket, &key(a)) {
            Ok(path) => format!(
                "vpc-ipam: DEL: agent not reachable ({err}); the release is queued in {} \
                 for the agent's next start",
                path.display()
            ),
            Err(io) => format!(
                "vpc-ipam: DEL: agent not reachable ({err}) and the release could not be \
                 queued ({io}); the agent's GC will free the address"
            ),
        };
        return Ok(Success {
            stdout: None,
            note: Some(note),
        });
    }
    let code = match command {
        // STATUS has its own codes: 50 means "cannot service ADD".
        Command::Status => ErrorCode::PluginNotAvailable,
        _ => ErrorCode::TryAgainLater,
    };
    Err(cni::Error::new(
        code,
        "vpc-ipam agent is not reachable",
        format!("{err}; {hint}"),
    ))
}

/// Writes the DEL to the agent's pending directory, atomically (a file
/// appears whole or not at all).
fn leave_pending_del(socket: &Path, key: &AttachmentKey) -> std::io::Result<PathBuf> {
    use std::hash::{Hash, Hasher};
    let dir = pending_dir(socket);
    std::fs::create_dir_all(&dir)?;
    // The file name only has to be unique per attachment; the content says
    // which one it is.
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    key.hash(&mut hasher);
    let path = dir.join(format!("{:016x}.json", hasher.finish()));
    let tmp = dir.join(format!(
        ".{:016x}.{}.tmp",
        hasher.finish(),
        std::process::id()
    ));
    // A new file, never through a link someone left at that name.
    let _ = std::fs::remove_file(&tmp);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)?
        .write_all(&serde_json::to_vec(key)?)?;
    std::fs::rename(&tmp, &path)?;
    Ok(path)
}

/// The Pod from CNI_ARGS, as kubelet's runtimes pass it.
fn pod_ref(args: &[(String, String)]) -> PodRef {
    let get = |name: &str| {
        args.iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    PodRef {
        namespace: get("K8S_POD_NAMESPACE"),
        name: get("K8S_POD_NAME"),
    }
}

/// The addresses of prevResult (CHECK), to compare with the allocation.
fn previous_ips(prev: Option<&Value>) -> Result<Vec<IpAddr>, cni::Error> {
    let Some(ips) = prev.and_then(|p| p.get("ips")) else {
        return Ok(Vec::new());
    };
    let bad = |why: String| {
        cni::Error::new(
            ErrorCode::DecodeFailure,
            "cannot decode prevResult.ips",
            why,
        )
    };
    let configs: Vec<IpConfig> =
        serde_json::from_value(ips.clone()).map_err(|e| bad(e.to_string()))?;
    Ok(configs.iter().map(|c| c.address.addr()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cni::Attachment;
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixListener;

    fn attachment() -> Attachment {
        Attachment {
            container_id: "abc".into(),
            ifname: "eth0".into(),
            netns: Some("/var/run/netns/x".into()),
        }
    }

    fn invocation(command: Command) -> Invocation {
        Invocation {
            command,
            args: vec![
                ("K8S_POD_NAMESPACE".into(), "default".into()),
                ("K8S_POD_NAME".into(), "web-0".into()),
            ],
            path: vec!["/opt/cni/bin".into()],
        }
    }

    fn stdin(socket: &Path) -> Vec<u8> {
        serde_json::json!({
            "cniVersion": "1.0.0",
            "name": "pods",
            "type": "ptp",
            "ipam": { "type": "vpc-ipam", "agentSocket": socket },
            "cni.dev/valid-attachments": [],
        })
        .to_string()
        .into_bytes()
    }

    #[test]
    fn version_needs_no_config() {
        let out = run(&invocation(Command::Version), b"").unwrap();
        assert_eq!(out.stdout, Some(cni::version_json()));
    }

    #[test]
    fn invalid_config_fails_before_the_agent_is_asked() {
        let err = run(&invocation(Command::Del(attachment())), b"{").unwrap_err();
        assert_eq!(err.code, 6);
    }

    #[test]
    fn without_an_agent_del_is_queued_and_the_rest_retry() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("absent.sock");
        for (command, code) in [
            (Command::Add(attachment()), 11),
            (Command::Check(attachment()), 11),
            (Command::Gc, 11),
            (Command::Status, 50),
        ] {
            let name = command.name();
            let err = run(&invocation(command), &stdin(&socket)).unwrap_err();
            assert_eq!(err.code, code, "{name}: {err}");
            assert_eq!(err.cni_version, "1.0.0", "{name}");
            assert!(err.details.contains("absent.sock"), "{name}: {err}");
        }
        let out = run(&invocation(Command::Del(attachment())), &stdin(&socket)).unwrap();
        assert_eq!(out.stdout, None);
        let queued: Vec<_> = std::fs::read_dir(pending_dir(&socket)).unwrap().collect();
        assert_eq!(queued.len(), 1);
        let key: AttachmentKey =
            serde_json::from_slice(&std::fs::read(queued[0].as_ref().unwrap().path()).unwrap())
                .unwrap();
        assert_eq!(key.container_id, "abc");
    }

    /// An agent that answers one request with `answer` and returns what it
    /// was asked.
    fn agent_once(socket: &Path, answer: Response) -> std::thread::JoinHandle<Request> {
        let listener = UnixListener::bind(socket).unwrap();
        std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut line = String::new();
            BufReader::new(&stream).read_line(&mut line).unwrap();
            let mut out = serde_json::to_vec(&answer).unwrap();
            out.push(b'\n');
            (&stream).write_all(&out).unwrap();
            serde_json::from_str(&line).unwrap()
        })
    }

    #[test]
    fn add_prints_the_address_gateway_and_default_route() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agent.sock");
        let agent = agent_once(
            &socket,
            Response::Allocated(protocol::Lease {
                address: "10.1.0.7/24".parse().unwrap(),
                gateway: "10.1.0.1".parse().unwrap(),
            }),
        );
        let out = run(&invocation(Command::Add(attachment())), &stdin(&socket)).unwrap();
        let result: Value = serde_json::from_str(&out.stdout.unwrap()).unwrap();
        assert_eq!(
            result,
            serde_json::json!({
                "cniVersion": "1.0.0",
                "ips": [{"address": "10.1.0.7/24", "gateway": "10.1.0.1"}],
                "routes": [{"dst": "0.0.0.0/0"}],
                "dns": {},
            })
        );
        let Request::Add { key, pod } = agent.join().unwrap() else {
            panic!("expected ADD")
        };
        assert_eq!(key.container_id, "abc");
        assert_eq!(pod.name, "web-0");
    }

    #[test]
    fn agent_errors_keep_their_code() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agent.sock");
        let _agent = agent_once(
            &socket,
            Response::error(ErrorCode::UnknownContainer, "no allocation", "abc/eth0"),
        );
        let err = run(&invocation(Command::Check(attachment())), &stdin(&socket)).unwrap_err();
        assert_eq!((err.code, err.msg.as_str()), (3, "no allocation"));
        assert_eq!(err.cni_version, "1.0.0");
    }
}
