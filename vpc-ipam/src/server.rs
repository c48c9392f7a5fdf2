//! The agent's unix socket, for the CNI plugin.

use std::future::Future;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tracing::{debug, info, warn};

use crate::agent::Agent;
use crate::cni::ErrorCode;
use crate::protocol::{AttachmentKey, Request, Response};

/// A request line must arrive within this time of connecting.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the plugin leaves DELs it could not deliver (the agent was down):
/// next to the socket, so both sides find it from the plugin's config.
pub fn pending_dir(socket: &Path) -> PathBuf {
    socket.with_extension("pending")
}

/// Binds the plugin socket, root-only (0600). A socket file left by a dead
/// agent is replaced; one a live agent answers on is an error.
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("another agent is serving on {}", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Delivers the DELs the plugin left while the agent was down. Only files
/// a user who may use the socket wrote are delivered: a DEL is as powerful
/// as one sent on the socket, so the directory must not be a way around
/// [`allowed`] when it is writable more widely.
pub async fn deliver_pending(agent: &Agent, socket: &Path) {
    let dir = pending_dir(socket);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        // Not followed: a link's target may belong to anyone.
        let owner = std::fs::symlink_metadata(&path)
            .ok()
            .filter(std::fs::Metadata::is_file)
            .map(|m| m.uid());
        if !owner.is_some_and(allowed_uid) {
            warn!(
                path = %path.display(),
                ?owner,
                "ignoring a pending DEL not written by root (the plugin runs as root)"
            );
            if let Err(err) = std::fs::remove_file(&path) {
                warn!(path = %path.display(), error = %err, "cannot remove an ignored pending DEL");
            }
            continue;
        }
        let key = std::fs::read(&path)
            .ok()
            .and_then(|bytes| serde_json::from_slice::<AttachmentKey>(&bytes).ok());
        match key {
            Some(key) => {
                info!(%key, "delivering a DEL made while the agent was down");
                if let Response::Error { msg, details, .. } =
                    agent.handle(Request::Del { key }).await
                {
                    // Kept for the next start.
                    warn!(msg, details, "pending DEL failed");
                    continue;
                }
            }
            None => warn!(path = %path.display(), "ignoring an unreadable pending DEL"),
        }
        if let Err(err) = std::fs::remove_file(&path) {
            warn!(path = %path.display(), error = %err, "cannot remove a delivered DEL");
        }
    }
}

/// Serves plugin requests until `shutdown` completes.
pub async fn serve(
    listener: UnixListener,
    agent: Arc<Agent>,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => return Ok(()),
            accepted = listener.accept() => {
                let (stream, _) = accepted?;
                let agent = agent.clone();
                tokio::spawn(async move {
                    if let Err(err) = connection(stream, &agent).await {
                        debug!(error = %err, "plugin connection ended");
                    }
                });
            }
        }
    }
}

/// Only root (and the agent's own user, which is root in a cluster) may
/// allocate: the socket's mode says so, and the peer's credentials are
/// checked too, in case the socket's directory is shared more widely.
fn allowed(stream: &UnixStream) -> Result<(), String> {
    let creds = stream.peer_cred().map_err(|e| e.to_string())?;
    if allowed_uid(creds.uid()) {
        Ok(())
    } else {
        Err(format!(
            "uid {} may not use the agent socket (root only)",
            creds.uid()
        ))
    }
}

/// Root, or the agent's own user.
fn allowed_uid(uid: u32) -> bool {
    uid == 0 || uid == nix::unistd::geteuid().as_raw()
}

async fn connection(stream: UnixStream, agent: &Agent) -> io::Result<()> {
    let response = match allowed(&stream) {
        Err(why) => {
            warn!(why, "refused a plugin connection");
            Response::error(ErrorCode::PluginNotAvailable, "permission denied", why)
        }
        Ok(()) => {
            let (read, mut write) = stream.into_split();
            // Bytes, not a String: a line that is not UTF-8 gets the decode
            // error below instead of a closed connection and no answer.
            let mut line = Vec::new();
            tokio::time::timeout(
                READ_TIMEOUT,
                BufReader::new(read).read_until(b'\n', &mut line),
            )
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no request"))??;
            let response = match serde_json::from_slice::<Request>(&line) {
                Ok(request) => agent.handle(request).await,
                Err(err) => Response::error(
                    ErrorCode::DecodeFailure,
                    "the agent cannot decode the request",
                    err.to_string(),
                ),
            };
            return reply(&mut write, &response).await;
        }
    };
    let (_, mut write) = stream.into_split();
    reply(&mut write, &response).await
}

async fn reply(
    write: &mut tokio::net::unix::OwnedWriteHalf,
    response: &Response,
) -> io::Result<()> {
    let mut line = serde_json::to_vec(response)?;
    line.push(b'\n');
    write.write_all(&line).await?;
    write.shutdown().await
}
