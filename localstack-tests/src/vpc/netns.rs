//! Sockets in named network namespaces, from this process: a socket
//! belongs to the namespace of the thread that created it and stays there,
//! so each is created on a fresh thread that has entered the namespace
//! (never on a pooled thread, which would stay in it).

use std::fs::File;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use nix::sched::{CloneFlags, setns};

/// Connect and read timeout of [`http_get_in`].
const TIMEOUT: Duration = Duration::from_secs(2);

fn open_netns(ns: &str) -> Result<File> {
    let path = format!("/run/netns/{ns}");
    File::open(&path).with_context(|| format!("opening {path}"))
}

fn enter<T>(file: &File, ns: &str, f: impl FnOnce() -> T) -> Result<T> {
    setns(file, CloneFlags::CLONE_NEWNET)
        .with_context(|| format!("entering network namespace {ns}"))?;
    Ok(f())
}

/// Runs `f` on a fresh OS thread that has entered network namespace `ns`
/// (`/run/netns/<ns>`), and waits for it. Sockets `f` creates stay in `ns`.
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    let file = open_netns(ns)?;
    let name = ns.to_owned();
    std::thread::Builder::new()
        .name(format!("netns-{ns}"))
        .spawn(move || enter(&file, &name, f))?
        .join()
        .map_err(|_| anyhow!("a thread in network namespace {ns} panicked"))?
}

/// [`in_netns`] without blocking the async runtime while `f` runs.
pub async fn in_netns_async<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T> {
    let file = open_netns(ns)?;
    let name = ns.to_owned();
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name(format!("netns-{ns}"))
        .spawn(move || {
            let _ = tx.send(enter(&file, &name, f));
        })?;
    rx.await
        .map_err(|_| anyhow!("a thread in network namespace {ns} panicked"))?
}

/// HTTP/1.0 GET `http://ip:port/` over a TCP connection opened inside
/// namespace `ns`, with 2 s connect and read timeouts; the body. A refused
/// or timed-out connection, or a status other than 2xx, is an error.
pub async fn http_get_in(ns: &str, ip: IpAddr, port: u16) -> Result<String> {
    let addr = SocketAddr::new(ip, port);
    in_netns_async(ns, move || -> Result<String> {
        let mut s = TcpStream::connect_timeout(&addr, TIMEOUT).context("connecting")?;
        s.set_read_timeout(Some(TIMEOUT))?;
        s.set_write_timeout(Some(TIMEOUT))?;
        s.write_all(format!("GET / HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).context("reading the response")?;
        let text = String::from_utf8_lossy(&raw).into_owned();
        if !text.starts_with("HTTP/") {
            return Ok(text);
        }
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let status = head.lines().next().unwrap_or_default();
        if status
            .split_whitespace()
            .nth(1)
            .is_none_or(|c| !c.starts_with('2'))
        {
            bail!("{status}: {body}");
        }
        Ok(body.to_owned())
    })
    .await?
    .with_context(|| format!("GET http://{addr}/ in network namespace {ns}"))
}

/// A TCP server answering each connection with the address of the peer it
/// sees; stopped on drop.
pub struct PeerServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl PeerServer {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for PeerServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Serves on `ip:port` inside namespace `ns`: every connection gets an
/// HTTP/1.0 200 whose body is the peer's address (`<ip>\n`), then closes.
/// Whoever connected learns which source address arrived (SNAT or not).
pub fn serve_peer_address(ns: &str, ip: IpAddr, port: u16) -> Result<PeerServer> {
    let addr = SocketAddr::new(ip, port);
    let listener = in_netns(ns, move || TcpListener::bind(addr))?
        .with_context(|| format!("binding {addr} in network namespace {ns}"))?;
    listener.set_nonblocking(true)?;
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = stop.clone();
    let thread = std::thread::Builder::new()
        .name(format!("peer-server-{port}"))
        .spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((s, peer)) => answer_peer(s, peer),
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        })?;
    Ok(PeerServer {
        addr,
        stop,
        thread: Some(thread),
    })
}

fn answer_peer(mut s: TcpStream, peer: SocketAddr) {
    let _ = s.set_nonblocking(false);
    let _ = s.set_read_timeout(Some(Duration::from_millis(300)));
    // Read the request first: closing with unread data would reset the
    // connection before the client reads the answer.
    let mut request = Vec::new();
    let mut buf = [0u8; 1024];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
        request.extend_from_slice(&buf[..n]);
        if request.windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    let body = format!("{}\n", peer.ip());
    let _ = s.write_all(
        format!(
            "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    );
    let _ = s.shutdown(Shutdown::Write);
}

/// A TCP port forward (see [`forward_from_host`]); stops on drop.
pub struct Forward {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Forward {
    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Forward {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Host `127.0.0.1:port` forwarded to `127.0.0.1:port` inside namespace
/// `ns` (e.g. an agent's metrics there, for the test's HTTP client).
pub async fn forward_from_host(ns: &str, port: u16) -> Result<Forward> {
    forward(None, Some(ns), port).await
}

/// Listens on `127.0.0.1:port` in `listen_in` (or the host) and connects
/// each connection to `127.0.0.1:port` in `connect_in` (or the host).
pub(crate) async fn forward(
    listen_in: Option<&str>,
    connect_in: Option<&str>,
    port: u16,
) -> Result<Forward> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let listener = match listen_in {
        Some(ns) => in_netns_async(ns, move || TcpListener::bind(addr)).await?,
        None => TcpListener::bind(addr),
    }
    .with_context(|| format!("binding {addr} in {}", listen_in.unwrap_or("the host")))?;
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let connect_in = connect_in.map(str::to_owned);
    let task = tokio::spawn(async move {
        // Dropped with the task: aborting it ends the connections too.
        let mut connections = tokio::task::JoinSet::new();
        loop {
            let Ok((mut inbound, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let connect_in = connect_in.clone();
            connections.spawn(async move {
                let outbound = match connect_in {
                    Some(ns) => connect_in_netns(&ns, addr).await,
                    None => tokio::net::TcpStream::connect(addr)
                        .await
                        .map_err(Into::into),
                };
                if let Ok(mut outbound) = outbound {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
            while connections.try_join_next().is_some() {}
        }
    });
    Ok(Forward { addr, task })
}

async fn connect_in_netns(ns: &str, addr: SocketAddr) -> Result<tokio::net::TcpStream> {
    let s = in_netns_async(ns, move || TcpStream::connect_timeout(&addr, TIMEOUT)).await??;
    s.set_nonblocking(true)?;
    Ok(tokio::net::TcpStream::from_std(s)?)
}
