//! The health checker: real probes of every endpoint that is under a
//! backend service with a health check, on the check's interval (scaled,
//! and never more often than the floor), counted against its thresholds;
//! checks of the same endpoint probed the same way share probes.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::state::{Probe, ProbeJob, World};

/// Runs until the task is dropped: every `tick`, completes due operations
/// and starts the probes that are due, each in its own task.
pub async fn run(world: Arc<Mutex<World>>, tick: Duration) {
    loop {
        let jobs = {
            let mut w = world.lock().unwrap_or_else(PoisonError::into_inner);
            let now = Instant::now();
            w.advance(now);
            w.health_due(now)
        };
        for job in jobs {
            let world = world.clone();
            tokio::spawn(async move {
                let ok = probe(&job).await;
                world
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .health_record(&job, ok, Instant::now());
            });
        }
        tokio::time::sleep(tick).await;
    }
}

/// One probe, within its timeout.
pub async fn probe(job: &ProbeJob) -> bool {
    tokio::time::timeout(job.timeout, probe_once(job))
        .await
        .unwrap_or(false)
}

async fn probe_once(job: &ProbeJob) -> bool {
    let Ok(mut stream) = TcpStream::connect(job.addr).await else {
        return false;
    };
    match &job.probe {
        Probe::Tcp { request, response } => {
            if let Some(req) = request
                && stream.write_all(req.as_bytes()).await.is_err()
            {
                return false;
            }
            match response {
                None => true,
                Some(want) => {
                    let mut got = vec![0u8; want.len()];
                    stream.read_exact(&mut got).await.is_ok() && got == want.as_bytes()
                }
            }
        }
        Probe::Http {
            path,
            host,
            response,
        } => {
            let host = host.clone().unwrap_or_else(|| job.addr.to_string());
            let req = format!(
                "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: GoogleHC/1.0\r\nConnection: close\r\n\r\n"
            );
            if stream.write_all(req.as_bytes()).await.is_err() {
                return false;
            }
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            // Enough for the status line and the start of the body.
            while buf.len() < 64 * 1024 {
                match stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
                if response.is_none() && buf.windows(2).any(|w| w == b"\r\n") {
                    break;
                }
                if let Some(want) = response
                    && let Some(i) = find(&buf, b"\r\n\r\n")
                    && buf.len() >= i + 4 + want.len()
                {
                    break;
                }
            }
            let status_ok = buf
                .split(|b| *b == b'\n')
                .next()
                .and_then(|l| std::str::from_utf8(l).ok())
                .and_then(|l| l.split_whitespace().nth(1))
                == Some("200");
            let body_ok = match response {
                None => true,
                Some(want) => find(&buf, b"\r\n\r\n")
                    .is_some_and(|i| buf[i + 4..].starts_with(want.as_bytes())),
            };
            status_ok && body_ok
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}
