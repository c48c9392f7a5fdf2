//! What the CNI plugin and the agent say to each other over the agent's
//! unix socket: one JSON request line, one JSON response line, then the
//! connection closes. Plain JSON keeps the plugin small and quick to start
//! (it runs once per CNI command) and readable with `socat` when debugging.

use std::io::{BufRead, BufReader, Write};
use std::net::IpAddr;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::cidr::Cidr;
use crate::cni::{self, ErrorCode};

/// One container interface: what allocations are keyed by.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AttachmentKey {
    pub container_id: String,
    pub ifname: String,
}

impl std::fmt::Display for AttachmentKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.container_id, self.ifname)
    }
}

/// The Pod an allocation is for, from CNI_ARGS (K8S_POD_NAMESPACE,
/// K8S_POD_NAME), kept for operators and metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodRef {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub namespace: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "camelCase")]
pub enum Request {
    /// Allocate (or return the existing allocation of) `key`.
    Add { key: AttachmentKey, pod: PodRef },
    /// Release the allocation of `key`, if any.
    Del { key: AttachmentKey },
    /// Is `key` allocated, with these addresses (from prevResult)?
    Check {
        key: AttachmentKey,
        ips: Vec<IpAddr>,
    },
    /// Release every allocation whose key is not in `valid`.
    Gc { valid: Vec<AttachmentKey> },
    /// Can the agent serve ADD now?
    Status,
}

/// An address handed to a container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Lease {
    /// The address with the prefix length of its subnet.
    pub address: Cidr,
    pub gateway: IpAddr,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Response {
    Allocated(Lease),
    /// DEL, CHECK, STATUS: done; GC: `released` allocations freed.
    Ok {
        released: usize,
    },
    Error {
        code: u32,
        msg: String,
        details: String,
    },
}

impl Response {
    pub fn error(code: ErrorCode, msg: impl Into<String>, details: impl Into<String>) -> Self {
        Response::Error {
            code: code.code(),
            msg: msg.into(),
            details: details.into(),
        }
    }

    /// The error as the plugin prints it.
    pub fn into_cni_error(self) -> Option<cni::Error> {
        match self {
            Response::Error { code, msg, details } => {
                let mut err = cni::Error::new(ErrorCode::TryAgainLater, msg, details);
                err.code = code;
                Some(err)
            }
            _ => None,
        }
    }
}

/// Why a request got no answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No socket, a stale one, no permission: no agent to talk to.
    #[error("connect {path}: {source}")]
    Unreachable {
        path: String,
        source: std::io::Error,
    },
    /// Connected, but the exchange failed (the agent died mid-request).
    #[error("talking to the agent at {path}: {source}")]
    Exchange {
        path: String,
        source: std::io::Error,
    },
}

/// Sends one request and waits up to `timeout` for the answer.
pub fn call(socket: &Path, request: &Request, timeout: Duration) -> Result<Response, ClientError> {
    let path = socket.display().to_string();
    let stream = UnixStream::connect(socket).map_err(|source| ClientError::Unreachable {
        path: path.clone(),
        source,
    })?;
    exchange(stream, request, timeout).map_err(|source| ClientError::Exchange { path, source })
}

fn exchange(
    mut stream: UnixStream,
    request: &Request,
    timeout: Duration,
) -> std::io::Result<Response> {
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let mut line = serde_json::to_vec(request)?;
    line.push(b'\n');
    if let Err(err) = stream.write_all(&line) {
        // An agent that refuses us answers without reading the request and
        // closes: when that beat our write, its answer is still there to read.
        if matches!(
            err.kind(),
            std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
        ) && let Ok(Some(answer)) = read_answer(stream)
        {
            return Ok(answer);
        }
        return Err(err);
    }
    read_answer(stream)?.ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "the agent closed the connection without answering",
        )
    })
}

/// The answer line; `None` if the agent closed without one.
fn read_answer(stream: UnixStream) -> std::io::Result<Option<Response>> {
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer)?;
    if answer.is_empty() {
        return Ok(None);
    }
    Ok(Some(serde_json::from_str(&answer)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_sent_before_our_request_is_read_even_if_the_write_fails() {
        // The agent refused the connection, answered and closed before
        // the plugin wrote its request.
        let (client, agent) = UnixStream::pair().unwrap();
        let refusal = Response::error(ErrorCode::PluginNotAvailable, "permission denied", "uid 7");
        let mut line = serde_json::to_vec(&refusal).unwrap();
        line.push(b'\n');
        (&agent).write_all(&line).unwrap();
        drop(agent);
        let answer = exchange(client, &Request::Status, Duration::from_secs(1)).unwrap();
        assert_eq!(answer, refusal);
    }

    #[test]
    fn wire_format_is_tagged_json() {
        let req = Request::Add {
            key: AttachmentKey {
                container_id: "c1".into(),
                ifname: "eth0".into(),
            },
            pod: PodRef {
                namespace: "default".into(),
                name: "web-0".into(),
            },
        };
        let text = serde_json::to_string(&req).unwrap();
        assert_eq!(
            text,
            r#"{"op":"add","key":{"containerId":"c1","ifname":"eth0"},"pod":{"namespace":"default","name":"web-0"}}"#
        );
        assert_eq!(serde_json::from_str::<Request>(&text).unwrap(), req);
        let resp = Response::Allocated(Lease {
            address: "10.0.0.5/24".parse().unwrap(),
            gateway: "10.0.0.1".parse().unwrap(),
        });
        let text = serde_json::to_string(&resp).unwrap();
        assert_eq!(
            text,
            r#"{"allocated":{"address":"10.0.0.5/24","gateway":"10.0.0.1"}}"#
        );
    }
}
