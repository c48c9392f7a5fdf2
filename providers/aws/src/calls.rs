//! How the AWS provider calls AWS: through `cnlb-cloud-calls` (rate
//! limits per group, retries, `cnlb_cloud_api_*` metrics with
//! `provider="aws"`), with SDK errors mapped by [`crate::error::map`].

use std::future::Future;

use aws_sdk_ec2::error::SdkError;
use cnlb_cloud_calls::Group;
pub(crate) use cnlb_cloud_calls::RateLimits;
use cnlb_provider_core::{ProviderError, Result};
use prometheus_client::registry::Registry;

/// Which bucket of [`crate::RateLimits`] an operation (an EC2 or ELBv2
/// action name) draws from.
pub fn group_of(operation: &str) -> Group {
    if ["Describe", "List", "Get"]
        .iter()
        .any(|p| operation.starts_with(p))
    {
        Group::Read
    } else if matches!(operation, "RegisterTargets" | "DeregisterTargets") {
        Group::Targets
    } else {
        Group::Write
    }
}

/// An error a call can fail with: SDK errors are mapped by code
/// ([`crate::error::map`]); a [`ProviderError`] is taken as it is.
pub(crate) trait CallError {
    fn into_provider_error(self, operation: &str) -> ProviderError;
}

impl<E> CallError for SdkError<E>
where
    E: aws_sdk_ec2::error::ProvideErrorMetadata + std::error::Error + 'static,
{
    fn into_provider_error(self, operation: &str) -> ProviderError {
        crate::error::map(operation, self)
    }
}

impl CallError for ProviderError {
    fn into_provider_error(self, _operation: &str) -> ProviderError {
        self
    }
}

/// Every EC2 and ELBv2 request of this process goes through one of these.
pub(crate) struct Calls(cnlb_cloud_calls::Calls);

impl Calls {
    pub(crate) fn new(limits: &RateLimits, registry: &mut Registry) -> Calls {
        Calls(cnlb_cloud_calls::Calls::new(
            "aws", group_of, limits, registry,
        ))
    }

    /// Runs `call` (which builds and sends one request, e.g.
    /// `|| client.describe_tags().resource_arns(arn).send()`) as the API
    /// action `operation`; see `cnlb_cloud_calls::Calls::run`.
    pub(crate) async fn run<T, E, F, Fut>(&self, operation: &'static str, call: F) -> Result<T>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = std::result::Result<T, E>>,
        E: CallError,
    {
        self.0
            .run(operation, || async {
                call().await.map_err(|e| e.into_provider_error(operation))
            })
            .await
    }

    /// [`Calls::run`] for a request that must not be sent twice blindly;
    /// `recover` looks for what a lost attempt did (see
    /// `cnlb_cloud_calls::Calls::run_unrepeatable`).
    pub(crate) async fn run_unrepeatable<T, E, F, Fut, R, RFut>(
        &self,
        operation: &'static str,
        call: F,
        recover: R,
    ) -> Result<T>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = std::result::Result<T, E>>,
        E: CallError,
        R: Fn() -> RFut,
        RFut: Future<Output = Result<Option<T>>>,
    {
        self.0
            .run_unrepeatable(
                operation,
                || async { call().await.map_err(|e| e.into_provider_error(operation)) },
                recover,
            )
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operations_map_to_groups() {
        for op in [
            "DescribeLoadBalancers",
            "DescribeTags",
            "DescribeSubnets",
            "DescribeTargetHealth",
        ] {
            assert_eq!(group_of(op), Group::Read, "{op}");
        }
        for op in ["RegisterTargets", "DeregisterTargets"] {
            assert_eq!(group_of(op), Group::Targets, "{op}");
        }
        for op in [
            "CreateLoadBalancer",
            "ModifyListener",
            "DeleteTargetGroup",
            "AddTags",
        ] {
            assert_eq!(group_of(op), Group::Write, "{op}");
        }
    }
}
