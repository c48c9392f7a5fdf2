//! `cnlb-pod-server`: what runs "in" a Pod of the local environment. The
//! harness starts it inside the Pod's network namespace; it answers every
//! HTTP GET on each given port with 200 and `<namespace>/<name> <ip>`, so a
//! test (or a load balancer) can tell which Pod answered, and `/healthz` with
//! `ok`. Plain std and a thread per connection: it must start in milliseconds.

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
