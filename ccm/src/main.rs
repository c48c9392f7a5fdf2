//! cnlb-ccm: turns type=LoadBalancer Services into cloud load balancers
//! that send traffic straight to Pod IPs.

mod cli;
mod gc;
mod leader;
mod metrics;
mod run;

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = cli::Args::parse();
    cnlb_runtime::telemetry::init(args.log_format)?;
    run::run(args).await?;
    Ok(())
}
