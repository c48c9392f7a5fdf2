//! AWS provider for cnlb: Network Load Balancers in IP mode (ELBv2) whose
//! targets are Pod IPs, and EC2 for the node provider and vpc-ipam.
//! Feature `load-balancer` (cnlb-ccm) builds the load balancer and node
//! providers, feature `ipam` (vpc-ipam-agent) the ENI IPAM.
//!
//! [`AwsProvider`] implements the load balancer provider; clients are
//! configured from the standard AWS environment only ([`sdk_config`]).
//! Every AWS request it makes goes through one wrapper (`calls.rs`) that
//! rate-limits it per group of operations ([`RateLimits`]), retries it with
//! backoff and jitter on throttling and transient errors, and records the
//! `cnlb_cloud_api_*` metrics per operation in the registry given to
//! [`AwsProvider::new`]. [`AwsNodes`] (from [`AwsProvider::nodes`]) is the
//! node provider: the EC2 instances behind Nodes, in batches, through the
//! same wrapper. [`ipam::Ec2Ipam`] is vpc-ipam's door to EC2 (ENIs,
//! secondary IPs and prefixes), through a wrapper of its own.

#[cfg(feature = "load-balancer")]
mod backend;
#[cfg(any(feature = "load-balancer", feature = "ipam"))]
mod calls;
#[cfg(feature = "load-balancer")]
mod convert;
#[cfg(any(feature = "load-balancer", feature = "ipam"))]
mod error;
#[cfg(feature = "ipam")]
pub mod ipam;
#[cfg(feature = "load-balancer")]
pub mod nodes;
#[cfg(feature = "load-balancer")]
pub mod plan;
#[cfg(feature = "load-balancer")]
mod provider;

#[cfg(any(feature = "load-balancer", feature = "ipam"))]
pub use calls::group_of;
pub use cnlb_cloud_calls::{
    Group, MAX_ATTEMPTS, RETRY_MAX_DELAY, RETRY_MIN_DELAY, RateLimit, RateLimits,
};
#[cfg(feature = "load-balancer")]
pub use nodes::AwsNodes;
#[cfg(feature = "load-balancer")]
pub use provider::{AwsConfig, AwsProvider, ELB_SUBNET_TAG, INTERNAL_ELB_SUBNET_TAG};

pub use aws_sdk_ec2 as ec2;
#[cfg(feature = "load-balancer")]
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
    #[cfg(feature = "load-balancer")]
    pub elbv2: elbv2::Client,
}

impl Clients {
    /// Clients configured by [`sdk_config`], with the SDK's default retries
    /// (for callers outside the provider, e.g. tests setting up a VPC).
    pub async fn from_env() -> Clients {
        let config = sdk_config().await;
        Clients {
            ec2: ec2::Client::new(&config),
            #[cfg(feature = "load-balancer")]
            elbv2: elbv2::Client::new(&config),
        }
    }

    /// The same clients with the SDK's retries off; [`AwsProvider::new`]
    /// uses these. The provider retries each call itself (backoff with
    /// jitter, rate limit and metrics per attempt); the SDK's standard mode
    /// would retry every one of those attempts up to 3 times more, so one
    /// logical call could become 15 requests, and its retries would be
    /// invisible to the rate limiter and the metrics.
    pub fn without_sdk_retries(&self) -> Clients {
        use aws_config::retry::RetryConfig;
        Clients {
            ec2: ec2::Client::from_conf(
                self.ec2
                    .config()
                    .to_builder()
                    .retry_config(RetryConfig::disabled())
                    .build(),
            ),
            #[cfg(feature = "load-balancer")]
            elbv2: elbv2::Client::from_conf(
                self.elbv2
                    .config()
                    .to_builder()
                    .retry_config(RetryConfig::disabled())
                    .build(),
            ),
        }
    }
}

#[cfg(all(test, feature = "load-balancer"))]
mod tests {
    use super::*;

    fn max_attempts_ec2(c: &ec2::Client) -> Option<u32> {
        c.config().retry_config().map(|r| r.max_attempts())
    }

    fn max_attempts_elbv2(c: &elbv2::Client) -> Option<u32> {
        c.config().retry_config().map(|r| r.max_attempts())
    }

    #[test]
    fn provider_clients_do_not_retry_on_their_own() {
        let region = aws_config::Region::new("eu-west-1");
        let latest = aws_config::BehaviorVersion::latest();
        // What aws_config's loader sets: the standard mode, 3 attempts.
        let standard = aws_config::retry::RetryConfig::standard();
        let clients = Clients {
            ec2: ec2::Client::from_conf(
                ec2::Config::builder()
                    .behavior_version(latest)
                    .region(region.clone())
                    .retry_config(standard.clone())
                    .build(),
            ),
            elbv2: elbv2::Client::from_conf(
                elbv2::Config::builder()
                    .behavior_version(latest)
                    .region(region.clone())
                    .retry_config(standard.clone())
                    .build(),
            ),
        };
        assert_eq!(max_attempts_ec2(&clients.ec2), Some(3));
        assert_eq!(max_attempts_elbv2(&clients.elbv2), Some(3));

        let single = clients.without_sdk_retries();
        assert_eq!(max_attempts_ec2(&single.ec2), Some(1));
        assert_eq!(max_attempts_elbv2(&single.elbv2), Some(1));
        // Everything else is kept.
        assert_eq!(single.elbv2.config().region(), Some(&region));
        assert_eq!(single.ec2.config().region(), Some(&region));

        // The provider does this itself, whatever clients it is given.
        let provider = AwsProvider::new(
            clients.clone(),
            AwsConfig {
                vpc_id: "vpc-1".into(),
                ..Default::default()
            },
            &mut Default::default(),
        );
        assert_eq!(
            provider.clients().elbv2.config().retry_config(),
            Some(&aws_config::retry::RetryConfig::disabled())
        );
    }
}
