//! `cnlb-pod-server`: the sample app of the local environment, run as the
//! container of the image `localhost/cnlb/pod-server` on real Nodes (and by
//! the simulated kubelet inside a Pod's network namespace). It answers every
//! HTTP GET on each given port with 200 and `<namespace>/<name> <ip>`, so a
//! test (or a load balancer) can tell which Pod answered; `/healthz` with
//! `ok`; and `/exit?code=N` by exiting with status N, as agnhost does, so a
//! test can crash a container. As a container's first process it must exit
//! on SIGTERM itself (the kernel ignores unhandled signals for PID 1); it
//! logs when it does. Plain std and a thread per connection: it must start
//! in milliseconds.

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;

#[derive(Parser)]
#[command(about = "Answers HTTP GET with the Pod's name, on each --port")]
struct Args {
    /// `<namespace>/<name>` of the Pod.
    #[arg(long)]
    pod: String,
    /// The Pod's IP, echoed in the answer.
    #[arg(long)]
    ip: String,
    /// A TCP port to listen on (all addresses), repeatable.
    #[arg(long = "port", required = true)]
    ports: Vec<u16>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    exit_on_termination()?;
    let body: Arc<str> = format!("{} {}\n", args.pod, args.ip).into();
    // Bind every port before serving, so a bind error exits at once.
    let listeners = args
        .ports
        .iter()
        .map(|p| {
            TcpListener::bind((Ipv4Addr::UNSPECIFIED, *p)).with_context(|| format!("port {p}"))
        })
        .collect::<Result<Vec<_>>>()?;
    eprintln!(
        "cnlb-pod-server {}: listening on {:?}",
        args.pod, args.ports
    );
    let threads: Vec<_> = listeners
        .into_iter()
        .map(|l| {
            let body = body.clone();
            std::thread::spawn(move || {
                for stream in l.incoming().flatten() {
                    let body = body.clone();
                    std::thread::spawn(move || {
                        if let Err(e) = answer(stream, &body) {
                            eprintln!("connection: {e}");
                        }
                    });
                }
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

/// Reads one request head and answers it; the connection then closes.
fn answer(stream: TcpStream, body: &str) -> Result<()> {
    // A TCP health check connects and closes without a request.
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request = String::new();
    if reader.read_line(&mut request)? == 0 {
        return Ok(());
    }
    let mut line = String::new();
    while reader.read_line(&mut line)? > 2 {
        line.clear();
    }
    let mut words = request.split_whitespace();
    let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let (status, text) = match (method, path) {
        ("GET" | "HEAD", "/healthz") => ("200 OK", "ok\n"),
        ("GET", p) if p.starts_with("/exit") => {
            let code = p
                .split_once("code=")
                .and_then(|(_, c)| c.parse::<i32>().ok())
                .unwrap_or(0);
            eprintln!("cnlb-pod-server: exiting with status {code} as asked");
            std::process::exit(code);
        }
        ("GET" | "HEAD", _) => ("200 OK", body),
        _ => ("405 Method Not Allowed", "only GET\n"),
    };
    let payload = if method == "HEAD" { "" } else { text };
    let mut out = stream;
    write!(
        out,
        "HTTP/1.1 {status}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{payload}",
        text.len()
    )?;
    out.flush()?;
    Ok(())
}

/// Blocks SIGTERM and SIGINT in every thread and exits on either from a
/// thread of its own, logging it (tests read when a container was signalled).
fn exit_on_termination() -> Result<()> {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set.thread_block().context("blocking SIGTERM")?;
    std::thread::spawn(move || {
        if let Ok(signal) = set.wait() {
            let since_epoch = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            eprintln!(
                "cnlb-pod-server: {signal} at {:.3}, exiting",
                since_epoch.as_secs_f64()
            );
            std::process::exit(0);
        }
    });
    Ok(())
}
