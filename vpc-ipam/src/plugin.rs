//! What the `vpc-ipam` CNI plugin does for each command. Allocation lives in
//! the node agent; the plugin validates its input and asks the agent.
//!
//! The agent's allocation protocol is not part of this build, so ADD, CHECK
//! and GC answer "try again later" (code 11) and STATUS "not available"
//! (code 50), which makes the runtime retry instead of starting Pods
//! without an address.

use std::io;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use crate::DEFAULT_AGENT_SOCKET;
use crate::cni::{self, Command, ErrorCode, Invocation, NetConf};

/// A successful run: what goes to stdout (the result, if the command has
/// one) and an optional note for stderr, which runtimes keep as a log.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Success {
    pub stdout: Option<String>,
    pub note: Option<String>,
}

/// The agent as seen from the plugin.
enum Agent {
    /// No socket, a stale socket or no permission: no agent to talk to.
    Unreachable(io::Error),
    /// Something accepts connections, but allocations are not served yet.
    NotServing,
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
    let agent = match UnixStream::connect(&socket) {
        Ok(_) => Agent::NotServing,
        Err(err) => Agent::Unreachable(err),
    };
    respond(&invocation.command, &socket, agent).map_err(|e| e.with_version(&conf.cni_version))
}

fn respond(command: &Command, socket: &Path, agent: Agent) -> Result<Success, cni::Error> {
    let socket = socket.display();
    let (msg, details) = match agent {
        Agent::Unreachable(err) => (
            "vpc-ipam agent is not reachable",
            format!("connect {socket}: {err}; is the vpc-ipam-agent Pod running on this node?"),
        ),
        Agent::NotServing => (
            "vpc-ipam agent is not serving allocations yet",
            format!(
                "the agent at {socket} accepts connections, \
                 but its allocation protocol is not part of this build"
            ),
        ),
    };
    let code = match command {
        // DEL must succeed when there is nothing to release (the spec makes
        // DEL idempotent and tolerant of missing state), and this build
        // never hands out an address.
        Command::Del(_) => {
            let note = format!("vpc-ipam: DEL: {msg} ({details}); nothing to release");
            return Ok(Success {
                stdout: None,
                note: Some(note),
            });
        }
        // STATUS has its own codes: 50 means "cannot service ADD".
        Command::Status => ErrorCode::PluginNotAvailable,
        _ => ErrorCode::TryAgainLater,
    };
    Err(cni::Error::new(code, msg, details))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cni::Attachment;
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
            args: Vec::new(),
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

    fn all_commands() -> [Command; 5] {
        [
            Command::Add(attachment()),
            Command::Check(attachment()),
            Command::Gc,
            Command::Status,
            Command::Del(Attachment {
                netns: None,
                ..attachment()
            }),
        ]
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
    fn without_an_agent() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("absent.sock");
        let expected = [Some(11), Some(11), Some(11), Some(50), None];
        for (command, code) in all_commands().into_iter().zip(expected) {
            let name = command.name();
            let result = run(&invocation(command), &stdin(&socket));
            match code {
                Some(code) => {
                    let err = result.unwrap_err();
                    assert_eq!(err.code, code, "{name}: {err}");
                    assert_eq!(err.cni_version, "1.0.0", "{name}");
                    assert!(err.details.contains("absent.sock"), "{name}: {err}");
                }
                None => {
                    let out = result.unwrap();
                    assert_eq!(out.stdout, None, "{name}");
                    assert!(out.note.is_some(), "{name}");
                }
            }
        }
    }

    #[test]
    fn stale_socket_counts_as_no_agent() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("stale.sock");
        drop(UnixListener::bind(&socket).unwrap());
        assert!(socket.exists());
        let err = run(&invocation(Command::Add(attachment())), &stdin(&socket)).unwrap_err();
        assert_eq!(err.code, 11);
        assert!(err.msg.contains("not reachable"), "{err}");
    }

    #[test]
    fn with_an_agent_that_does_not_serve_allocations_yet() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agent.sock");
        let _listener = UnixListener::bind(&socket).unwrap();
        let expected = [Some(11), Some(11), Some(11), Some(50), None];
        for (command, code) in all_commands().into_iter().zip(expected) {
            let name = command.name();
            let result = run(&invocation(command), &stdin(&socket));
            match code {
                Some(code) => {
                    let err = result.unwrap_err();
                    assert_eq!(err.code, code, "{name}: {err}");
                    assert!(
                        err.msg.contains("not serving allocations yet"),
                        "{name}: {err}"
                    );
                }
                None => assert_eq!(result.unwrap().stdout, None, "{name}"),
            }
        }
    }
}
