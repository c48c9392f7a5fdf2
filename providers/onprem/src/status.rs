//! The one place where gRPC status codes and [`ProviderError`]s meet, both
//! ways, as documented in `provider.proto`: the server turns a provider's
//! error into a status, the client turns a plugin's status (or a transport
//! failure, which tonic reports as `UNAVAILABLE`) back into the error whose
//! retry policy the controller follows.
//!
//! Details a code cannot carry travel as ASCII metadata, so plugins in any
//! language can set them.

use std::time::Duration;

use cnlb_provider_core::ProviderError;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Code, Status};

/// Field of an `INVALID_ARGUMENT`.
pub const FIELD: &str = "cnlb-field";
/// Resource of a `NOT_FOUND` or a conflict.
pub const RESOURCE: &str = "cnlb-resource";
/// Operation that was throttled or failed.
pub const OPERATION: &str = "cnlb-operation";
/// Set on `RESOURCE_EXHAUSTED` when a quota (not a rate limit) was hit.
pub const QUOTA_RESOURCE: &str = "cnlb-quota-resource";
/// Delay in milliseconds after which to retry.
pub const RETRY_AFTER_MS: &str = "cnlb-retry-after-ms";
/// `"false"` marks an error as not retryable whatever its code.
pub const RETRYABLE: &str = "cnlb-retryable";

/// The status a plugin returns for `err`.
pub fn to_status(err: &ProviderError) -> Status {
    let (code, message, metadata): (Code, String, Vec<(&str, String)>) = match err {
        ProviderError::InvalidSpec { field, reason } => (
            Code::InvalidArgument,
            reason.clone(),
            vec![(FIELD, field.clone())],
        ),
        ProviderError::RetryAfter(delay) => (
            Code::Unavailable,
            err.to_string(),
            vec![(RETRY_AFTER_MS, delay.as_millis().to_string())],
        ),
        ProviderError::Throttled { operation } => (
            Code::ResourceExhausted,
            err.to_string(),
            vec![(OPERATION, operation.clone())],
        ),
        ProviderError::QuotaExceeded { resource } => (
            Code::ResourceExhausted,
            err.to_string(),
            vec![(QUOTA_RESOURCE, resource.clone())],
        ),
        ProviderError::NotFound { resource } => (
            Code::NotFound,
            err.to_string(),
            vec![(RESOURCE, resource.clone())],
        ),
        ProviderError::Conflict { resource, reason } => (
            Code::FailedPrecondition,
            reason.clone(),
            vec![(RESOURCE, resource.clone())],
        ),
        ProviderError::Cloud {
            operation,
            message,
            retryable: true,
        } => (
            Code::Unavailable,
            message.clone(),
            vec![(OPERATION, operation.clone())],
        ),
        ProviderError::Cloud {
            operation,
            message,
            retryable: false,
        } => (
            Code::Internal,
            message.clone(),
            vec![(OPERATION, operation.clone()), (RETRYABLE, "false".into())],
        ),
    };
    let mut status = Status::new(code, message);
    for (key, value) in metadata {
        // Values that are not visible ASCII cannot be sent; the code and
        // the message still say what happened.
        if let Ok(value) = MetadataValue::try_from(value.as_str()) {
            status.metadata_mut().insert(key, value);
        }
    }
    status
}

/// The error for a failed call of the plugin's `rpc` (e.g.
/// `"EnsureLoadBalancer"`, used where the status names no operation).
pub fn from_status(rpc: &str, status: &Status) -> ProviderError {
    let meta = |key| get(status.metadata(), key);
    let message = status.message().to_string();
    let not_retryable = meta(RETRYABLE).as_deref() == Some("false");
    let cloud = |retryable| ProviderError::Cloud {
        operation: meta(OPERATION).unwrap_or_else(|| rpc.to_string()),
        message: if message.is_empty() {
            format!("plugin returned {:?}", status.code())
        } else {
            message.clone()
        },
        retryable,
    };
    match status.code() {
        Code::InvalidArgument | Code::OutOfRange => ProviderError::InvalidSpec {
            field: meta(FIELD).unwrap_or_else(|| "spec".into()),
            reason: message,
        },
        _ if not_retryable => cloud(false),
        Code::NotFound => ProviderError::NotFound {
            resource: meta(RESOURCE).unwrap_or(message),
        },
        Code::AlreadyExists | Code::FailedPrecondition | Code::Aborted => ProviderError::Conflict {
            resource: meta(RESOURCE).unwrap_or_else(|| rpc.to_string()),
            reason: message,
        },
        Code::ResourceExhausted => match meta(QUOTA_RESOURCE) {
            Some(resource) => ProviderError::QuotaExceeded { resource },
            None => ProviderError::Throttled {
                operation: meta(OPERATION).unwrap_or_else(|| rpc.to_string()),
            },
        },
        Code::PermissionDenied | Code::Unauthenticated | Code::Unimplemented => cloud(false),
        Code::Unavailable
        | Code::DeadlineExceeded
        | Code::Cancelled
        | Code::Internal
        | Code::Unknown
        | Code::DataLoss
        | Code::Ok => match meta(RETRY_AFTER_MS).and_then(|ms| ms.parse().ok()) {
            Some(ms) => ProviderError::RetryAfter(Duration::from_millis(ms)),
            None => cloud(true),
        },
    }
}

fn get(metadata: &MetadataMap, key: &str) -> Option<String> {
    metadata
        .get(key)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use cnlb_provider_core::RetryPolicy;

    use super::*;

    #[test]
    fn every_error_round_trips() {
        let errors = [
            ProviderError::invalid("listeners[0].protocol", "UDP is not supported"),
            ProviderError::RetryAfter(Duration::from_millis(1500)),
            ProviderError::Throttled {
                operation: "add server".into(),
            },
            ProviderError::QuotaExceeded {
                resource: "address pool".into(),
            },
            ProviderError::NotFound {
                resource: "backend b-1".into(),
            },
            ProviderError::Conflict {
                resource: "frontend f-1".into(),
                reason: "owned by another Service".into(),
            },
            ProviderError::cloud("reload", "timed out", true),
            ProviderError::cloud("reload", "config rejected", false),
        ];
        for err in errors {
            let status = to_status(&err);
            assert_eq!(from_status("Rpc", &status), err, "{status:?}");
        }
    }

    #[test]
    fn codes_from_plugins_in_any_language() {
        let cases = [
            (
                Code::InvalidArgument,
                RetryPolicy::AwaitChange,
                "invalid_spec",
            ),
            (Code::OutOfRange, RetryPolicy::AwaitChange, "invalid_spec"),
            (Code::NotFound, RetryPolicy::Backoff, "not_found"),
            (Code::AlreadyExists, RetryPolicy::Backoff, "conflict"),
            (Code::FailedPrecondition, RetryPolicy::Backoff, "conflict"),
            (Code::Aborted, RetryPolicy::Backoff, "conflict"),
            (Code::ResourceExhausted, RetryPolicy::Backoff, "throttled"),
            (Code::Unavailable, RetryPolicy::Backoff, "cloud"),
            (Code::DeadlineExceeded, RetryPolicy::Backoff, "cloud"),
            (Code::Internal, RetryPolicy::Backoff, "cloud"),
            (Code::Unknown, RetryPolicy::Backoff, "cloud"),
            (Code::PermissionDenied, RetryPolicy::AwaitChange, "cloud"),
            (Code::Unauthenticated, RetryPolicy::AwaitChange, "cloud"),
            (Code::Unimplemented, RetryPolicy::AwaitChange, "cloud"),
        ];
        for (code, policy, label) in cases {
            let err = from_status("EnsureLoadBalancer", &Status::new(code, "boom"));
            assert_eq!(err.retry_policy(), policy, "{code:?}");
            assert_eq!(err.metric_label(), label, "{code:?}");
        }
        // Without metadata, the message and the RPC fill in.
        assert_eq!(
            from_status("UpdateBackends", &Status::invalid_argument("bad port")),
            ProviderError::invalid("spec", "bad port")
        );
        assert_eq!(
            from_status("UpdateBackends", &Status::unavailable("")),
            ProviderError::cloud("UpdateBackends", "plugin returned Unavailable", true)
        );
        // The override marks any code as final.
        let mut status = Status::unavailable("no licence");
        status
            .metadata_mut()
            .insert(RETRYABLE, MetadataValue::from_static("false"));
        assert_eq!(
            from_status("Probe", &status).retry_policy(),
            RetryPolicy::AwaitChange
        );
    }
}
