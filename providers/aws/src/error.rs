//! AWS SDK errors as typed provider errors, by error code: the controller
//! decides between waiting for the user, backing off and retrying from them.

use aws_sdk_elasticloadbalancingv2::error::{ProvideErrorMetadata, SdkError};
use cnlb_provider_core::ProviderError;

/// Maps the error of `operation`. Codes are the same across EC2 and ELBv2.
pub fn map<E, R>(operation: &str, err: SdkError<E, R>) -> ProviderError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    let code = err.code().unwrap_or_default().to_string();
    let message = err.message().map(str::to_string).unwrap_or_else(|| {
        aws_sdk_elasticloadbalancingv2::error::DisplayErrorContext(&err).to_string()
    });
    let transport = matches!(
        err,
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_)
    );
    classify(operation, &code, &message, transport)
}

/// The pure part of [`map`], for tests.
pub fn classify(operation: &str, code: &str, message: &str, transport: bool) -> ProviderError {
    let operation = operation.to_string();
    match code {
        "Throttling"
        | "ThrottlingException"
        | "RequestLimitExceeded"
        | "TooManyRequestsException"
        | "RequestThrottled" => ProviderError::Throttled { operation },
        c if c.starts_with("TooMany") || c.ends_with("LimitExceeded") => {
            ProviderError::QuotaExceeded {
                resource: format!("{operation}: {message}"),
            }
        }
        "LoadBalancerNotFound"
        | "TargetGroupNotFound"
        | "ListenerNotFound"
        | "InvalidSubnetID.NotFound"
        | "InvalidSubnet"
        | "SubnetNotFound"
        | "InvalidVpcID.NotFound" => ProviderError::NotFound {
            resource: message.to_string(),
        },
        "DuplicateLoadBalancerName"
        | "DuplicateTargetGroupName"
        | "DuplicateListener"
        | "ResourceInUse" => ProviderError::Conflict {
            resource: operation,
            reason: message.to_string(),
        },
        "ValidationError"
        | "InvalidConfigurationRequest"
        | "InvalidTarget"
        | "InvalidLoadBalancerAction"
        | "IncompatibleProtocols"
        | "InvalidScheme"
        | "InvalidSecurityGroup"
        | "UnsupportedProtocol"
        | "InvalidParameterValue" => ProviderError::InvalidSpec {
            field: operation,
            reason: message.to_string(),
        },
        "InternalFailure" | "ServiceUnavailable" | "InternalError" | "Unavailable" => {
            ProviderError::Cloud {
                operation,
                message: message.to_string(),
                retryable: true,
            }
        }
        _ => ProviderError::Cloud {
            operation,
            message: message.to_string(),
            retryable: transport,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cnlb_provider_core::RetryPolicy;

    #[test]
    fn codes_map_to_typed_errors() {
        let c = |code| classify("CreateLoadBalancer", code, "m", false);
        assert!(matches!(c("Throttling"), ProviderError::Throttled { .. }));
        assert!(matches!(
            c("RequestLimitExceeded"),
            ProviderError::Throttled { .. }
        ));
        assert!(matches!(
            c("TooManyLoadBalancers"),
            ProviderError::QuotaExceeded { .. }
        ));
        assert!(matches!(
            c("TooManyTargets"),
            ProviderError::QuotaExceeded { .. }
        ));
        assert!(matches!(
            c("TargetGroupNotFound"),
            ProviderError::NotFound { .. }
        ));
        assert!(matches!(
            c("DuplicateLoadBalancerName"),
            ProviderError::Conflict { .. }
        ));
        assert_eq!(
            c("ValidationError").retry_policy(),
            RetryPolicy::AwaitChange
        );
        assert_eq!(c("InternalFailure").retry_policy(), RetryPolicy::Backoff);
        assert_eq!(c("AccessDenied").retry_policy(), RetryPolicy::AwaitChange);
        assert_eq!(
            classify("x", "", "timeout", true).retry_policy(),
            RetryPolicy::Backoff
        );
    }
}
