//! `vpc-ipam-agent`: the per-node agent behind the vpc-ipam CNI plugin.
//!
//! This build validates its configuration and prepares its state
//! directory; the cloud backends and the allocation server are not built
//! yet, so it stops with an error instead of pretending to serve.

use std::os::unix::fs::DirBuilderExt;
use std::process::ExitCode;

use cnlb_vpc_ipam::agent_cli::{AgentArgs, NLB_DEFAULT_DEREGISTRATION_DELAY};
use cnlb_vpc_ipam::telemetry;
use tracing::{info, warn};

fn main() -> ExitCode {
    let args = AgentArgs::parse_validated();
    if let Err(err) = telemetry::init(args.log_format) {
        eprintln!("vpc-ipam-agent: {err}");
        return ExitCode::FAILURE;
    }
    info!(
        node = %args.node_name,
        backend = %args.backend,
        socket = %args.socket.display(),
        state_dir = %args.state_dir.display(),
        static_ranges = ?args.static_ranges.iter().map(ToString::to_string).collect::<Vec<_>>(),
        min_target = args.min_target,
        warm_target = args.warm_target,
        max_target = args.max_target,
        cooldown = ?args.cooldown,
        "starting vpc-ipam-agent"
    );
    if args.cooldown < NLB_DEFAULT_DEREGISTRATION_DELAY {
        warn!(
            cooldown = ?args.cooldown,
            "--cooldown is shorter than the NLB default deregistration delay (300s): \
             a released address may be reused while a load balancer still sends it traffic"
        );
    }

    // Allocation state is private to root: 0700 for a directory we create.
    if let Err(err) = std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&args.state_dir)
    {
        eprintln!(
            "vpc-ipam-agent: cannot create --state-dir {}: {err}",
            args.state_dir.display()
        );
        return ExitCode::FAILURE;
    }

    eprintln!(
        "vpc-ipam-agent: the {} backend is not built yet",
        args.backend
    );
    ExitCode::FAILURE
}
