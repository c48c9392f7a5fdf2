//! AWS provider for cnlb: Network Load Balancers in IP mode (ELBv2) whose
//! targets are Pod IPs, and EC2 for the node provider and vpc-ipam.
//!
//! [`AwsProvider`] implements the load balancer provider; clients are
//! configured from the standard AWS environment only ([`sdk_config`]).

mod error;
pub mod plan;
mod provider;

pub use provider::{AwsConfig, AwsProvider, ELB_SUBNET_TAG, INTERNAL_ELB_SUBNET_TAG};

pub use aws_sdk_ec2 as ec2;
pub use aws_sdk_elasticloadbalancingv2 as elbv2;

/// SDK configuration from the standard AWS sources only: environment
/// (`AWS_REGION`, credentials, `AWS_ENDPOINT_URL` and per-service
/// `AWS_ENDPOINT_URL_EC2` / `AWS_ENDPOINT_URL_ELASTIC_LOAD_BALANCING_V2`),
/// shared config files, web identity (IRSA), IMDS. Emulators are reached the
/// same way, so there is no test-only code path.
pub async fn sdk_config() -> aws_config::SdkConfig {
    aws_config::defaults(aws_config::BehaviorVersion::latest())
        .load()
        .await
}

/// EC2 and ELBv2 clients sharing one configuration.
#[derive(Clone, Debug)]
pub struct Clients {
    pub ec2: ec2::Client,
    pub elbv2: elbv2::Client,
}

impl Clients {
    pub async fn from_env() -> Clients {
        let config = sdk_config().await;
        Clients {
            ec2: ec2::Client::new(&config),
            elbv2: elbv2::Client::new(&config),
        }
    }
}
