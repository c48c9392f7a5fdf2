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
    /// Connected, but the exchange failed (the agent died mid-request, or
    /// it refused us after checking our credentials).
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
    stream.write_all(&line)?;
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer)?;
    if answer.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "the agent closed the connection without answering",
        ));
    }
    Ok(serde_json::from_str(&answer)?)
}

#[cfg(test)]
mod tests {
    use super::*;

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
