//! AWS SDK errors as typed provider errors, by error code: the controller
//! decides between waiting for the user, backing off and retrying from them.

use aws_sdk_ec2::error::{ProvideErrorMetadata, SdkError};
use cnlb_provider_core::ProviderError;

/// Maps the error of `operation`. Codes are the same across EC2 and ELBv2.
pub fn map<E>(operation: &str, err: SdkError<E>) -> ProviderError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    let code = err.code().unwrap_or_default().to_string();
    let message = err
        .message()
        .map(str::to_string)
        .unwrap_or_else(|| aws_sdk_ec2::error::DisplayErrorContext(&err).to_string());
    // The request may not have reached AWS, or AWS failed on its side (5xx):
    // the same request can succeed later.
    let transient = matches!(
        err,
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_)
    ) || err
        .raw_response()
        .is_some_and(|r| r.status().is_server_error());
    classify(operation, &code, &message, transient)
}

/// The pure part of [`map`], for tests. `transient` (a transport failure
/// or a 5xx) makes an error of an unknown code retryable.
pub fn classify(operation: &str, code: &str, message: &str, transient: bool) -> ProviderError {
    let operation = operation.to_string();
    match code {
        // Throttling codes, as the AWS SDKs' retry classifiers know them.
        "Throttling"
        | "ThrottlingException"
        | "ThrottledException"
        | "RequestThrottledException"
        | "EC2ThrottledException"
        | "RequestLimitExceeded"
        | "TooManyRequestsException"
        | "RequestThrottled"
        | "SlowDown"
        | "PriorRequestNotComplete" => ProviderError::Throttled { operation },
        c if c.starts_with("TooMany") || c.ends_with("LimitExceeded") => {
            ProviderError::QuotaExceeded {
                resource: format!("{operation}: {message}"),
            }
        }
        "LoadBalancerNotFound"
        | "TargetGroupNotFound"
        | "ListenerNotFound"
        | "InvalidSubnetID.NotFound"
        | "InvalidGroup.NotFound"
        | "InvalidPermission.NotFound"
        | "InvalidSubnet"
        | "SubnetNotFound"
        | "InvalidVpcID.NotFound"
        | "InvalidNetworkInterfaceID.NotFound"
        | "InvalidAttachmentID.NotFound"
        | "InvalidInstanceID.NotFound" => ProviderError::NotFound {
            resource: message.to_string(),
        },
        "DuplicateLoadBalancerName"
        | "DuplicateTargetGroupName"
        | "DuplicateListener"
        | "ResourceInUse"
        | "DependencyViolation"
        | "InvalidNetworkInterface.InUse"
        | "InvalidPermission.Duplicate"
        | "InvalidGroup.Duplicate" => ProviderError::Conflict {
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
            retryable: transient,
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
            c("EC2ThrottledException"),
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
            c("InvalidNetworkInterfaceID.NotFound"),
            ProviderError::NotFound { .. }
        ));
        assert!(matches!(
            c("InvalidNetworkInterface.InUse"),
            ProviderError::Conflict { .. }
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
