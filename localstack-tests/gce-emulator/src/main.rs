//! `cnlb-gce-emulator`: Google Compute Engine's `/compute/v1` REST API for
//! the calls cnlb makes, on loopback, for tests and the local environment.
//! Prints `listening on http://ADDR` once it serves; stops on SIGTERM or
//! Ctrl-C. See localstack-tests/gce-emulator/GCE_EMULATOR.md.

use anyhow::Result;
use clap::Parser;
use cnlb_gce_emulator::{GceOptions, server};
use tokio::signal::unix::{SignalKind, signal};

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let opts = GceOptions::parse();
    if let Err(e) = opts.validate() {
        eprintln!("cnlb-gce-emulator: {e}");
        std::process::exit(2);
    }
    let mut running = server::start(opts.clone()).await?;
    println!("cnlb-gce-emulator listening on {}", running.url());
    tracing::info!(
        project = %opts.project,
        region = %opts.region,
        zones = %opts.zones.join(","),
        subnetwork = %opts.subnetwork,
        secondary = %opts.secondary_ranges.iter().map(ToString::to_string).collect::<Vec<_>>().join(","),
        "serving on {}",
        running.url()
    );
    let mut term = signal(SignalKind::terminate())?;
    tokio::select! {
        _ = running.wait() => {}
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    Ok(())
}
