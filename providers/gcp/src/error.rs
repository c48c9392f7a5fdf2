//! Compute API errors as typed provider errors. GCE's error body carries a
//! `reason` per error (`notFound`, `alreadyExists`, `rateLimitExceeded`,
//! ...), which says more than the HTTP status (a 403 is a rate limit or a
//! permission problem; a 400 is a bad request or a resource still in use);
//! an operation that failed reports an error `code` instead
//! (`RESOURCE_NOT_FOUND`, `RESOURCE_IN_USE_BY_ANOTHER_RESOURCE`, ...).

use cnlb_provider_core::ProviderError;
use google_cloud_compute_v1::model::Operation;
use google_cloud_gax::error::rpc::StatusDetails;
use serde::Deserialize;

/// GCE's JSON error body: `{"error": {"code", "message", "errors": [{"reason", "message"}]}}`.
#[derive(Deserialize, Default)]
struct Body {
    #[serde(default)]
    error: BodyError,
}

#[derive(Deserialize, Default)]
struct BodyError {
    #[serde(default)]
    message: String,
    #[serde(default)]
    errors: Vec<BodyItem>,
}

#[derive(Deserialize, Default)]
struct BodyItem {
    #[serde(default)]
    reason: String,
}

/// Maps the error of the call `operation`. The client parses GCE's error
/// body into a status whose `details` carry each `errors[].reason` as an
/// `ErrorInfo`; a body it could not parse is kept as the raw payload.
pub fn map(operation: &str, err: &google_cloud_gax::error::Error) -> ProviderError {
    let Some(status) = err.http_status_code() else {
        // Nothing came back: the request may not have reached GCE, or the
        // connection broke; the same request can succeed later.
        let transient = err.is_timeout() || err.is_io() || err.is_connect() || err.is_transport();
        return ProviderError::cloud(operation, err.to_string(), transient);
    };
    let (message, reason) = match err.status() {
        Some(s) => {
            let reason = s.details.iter().find_map(|d| match d {
                StatusDetails::ErrorInfo(info) => Some(info.reason.clone()),
                _ => None,
            });
            (s.message.clone(), reason.unwrap_or_default())
        }
        None => {
            let body: Body = err
                .http_payload()
                .and_then(|p| serde_json::from_slice(p).ok())
                .unwrap_or_default();
            let reason = body.error.errors.first().map(|e| e.reason.clone());
            (body.error.message, reason.unwrap_or_default())
        }
    };
    let message = if message.is_empty() {
        err.to_string()
    } else {
        message
    };
    classify(operation, status, &reason, &message)
}

/// The pure part of [`map`]: HTTP status and GCE reason to a provider error.
pub fn classify(operation: &str, status: u16, reason: &str, message: &str) -> ProviderError {
    let operation = operation.to_string();
    match (status, reason) {
        (403 | 429, "rateLimitExceeded" | "userRateLimitExceeded" | "RATE_LIMIT_EXCEEDED")
        | (429, _) => ProviderError::Throttled { operation },
        (403, "quotaExceeded") => ProviderError::QuotaExceeded {
            resource: format!("{operation}: {message}"),
        },
        (404, _) => ProviderError::NotFound {
            resource: message.to_string(),
        },
        (409, _) | (412, _) | (400, "resourceInUseByAnotherResource") => ProviderError::Conflict {
            resource: operation,
            reason: if reason.is_empty() {
                message.to_string()
            } else {
                format!("{reason}: {message}")
            },
        },
        (400, _) => ProviderError::InvalidSpec {
            field: operation,
            reason: message.to_string(),
        },
        (s, _) => ProviderError::cloud(operation, format!("HTTP {s}: {message}"), s >= 500),
    }
}

/// The error of a finished operation, if it failed.
pub fn of_operation(operation: &str, op: &Operation) -> Option<ProviderError> {
    let first = op.error.as_ref().and_then(|e| e.errors.first());
    if first.is_none() && op.http_error_status_code.is_none_or(|s| s < 400) {
        return None;
    }
    let code = first.and_then(|e| e.code.as_deref()).unwrap_or_default();
    let message = first
        .and_then(|e| e.message.clone())
        .or_else(|| op.http_error_message.clone())
        .unwrap_or_else(|| code.to_string());
    let operation = operation.to_string();
    Some(match code {
        "RESOURCE_NOT_FOUND" | "NOT_FOUND" => ProviderError::NotFound { resource: message },
        "RESOURCE_ALREADY_EXISTS"
        | "ALREADY_EXISTS"
        | "RESOURCE_IN_USE_BY_ANOTHER_RESOURCE"
        | "CONDITION_NOT_MET" => ProviderError::Conflict {
            resource: operation,
            reason: format!("{code}: {message}"),
        },
        "QUOTA_EXCEEDED" => ProviderError::QuotaExceeded {
            resource: format!("{operation}: {message}"),
        },
        "RATE_LIMIT_EXCEEDED" => ProviderError::Throttled { operation },
        _ => {
            let status = op
                .http_error_status_code
                .and_then(|s| u16::try_from(s).ok())
                .unwrap_or(500);
            classify(&operation, status, "", &message)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_decide_over_statuses() {
        let c = |status, reason| classify("op", status, reason, "msg");
        assert!(matches!(
            c(403, "rateLimitExceeded"),
            ProviderError::Throttled { .. }
        ));
        assert!(matches!(c(429, ""), ProviderError::Throttled { .. }));
        assert!(matches!(
            c(403, "quotaExceeded"),
            ProviderError::QuotaExceeded { .. }
        ));
        assert!(matches!(
            c(403, "forbidden"),
            ProviderError::Cloud {
                retryable: false,
                ..
            }
        ));
        assert!(matches!(c(404, "notFound"), ProviderError::NotFound { .. }));
        assert!(matches!(
            c(409, "alreadyExists"),
            ProviderError::Conflict { .. }
        ));
        assert!(matches!(
            c(412, "conditionNotMet"),
            ProviderError::Conflict { .. }
        ));
        assert!(matches!(
            c(400, "resourceInUseByAnotherResource"),
            ProviderError::Conflict { .. }
        ));
        assert!(c(400, "invalid").is_user_error());
        assert!(matches!(
            c(503, ""),
            ProviderError::Cloud {
                retryable: true,
                ..
            }
        ));
    }

    /// GCE's body, as the client sees it: parsed into a status, or raw.
    #[test]
    fn reasons_are_read_from_the_client_error() {
        let body = bytes::Bytes::from_static(
            br#"{"error":{"code":403,"message":"Rate Limit Exceeded","errors":[{"domain":"usageLimits","reason":"rateLimitExceeded","message":"Rate Limit Exceeded"}]}}"#,
        );
        let status = google_cloud_gax::error::rpc::Status::try_from(&body).unwrap();
        let parsed =
            google_cloud_gax::error::Error::service_with_http_metadata(status, Some(403), None);
        assert!(matches!(
            map("op", &parsed),
            ProviderError::Throttled { .. }
        ));
        let raw = google_cloud_gax::error::Error::http(403, Default::default(), body);
        assert!(matches!(map("op", &raw), ProviderError::Throttled { .. }));
        let exists = bytes::Bytes::from_static(
            br#"{"error":{"code":409,"message":"The resource 'x' already exists","errors":[{"domain":"global","reason":"alreadyExists","message":"x"}]}}"#,
        );
        let status = google_cloud_gax::error::rpc::Status::try_from(&exists).unwrap();
        let err =
            google_cloud_gax::error::Error::service_with_http_metadata(status, Some(409), None);
        match map("insert", &err) {
            ProviderError::Conflict { reason, .. } => {
                assert!(reason.starts_with("alreadyExists"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn failed_operations_map_by_code() {
        let op: Operation = serde_json::from_value(serde_json::json!({
            "name": "operation-1", "status": "DONE", "httpErrorStatusCode": 400,
            "error": {"errors": [{"code": "RESOURCE_IN_USE_BY_ANOTHER_RESOURCE", "message": "in use"}]},
        }))
        .unwrap();
        assert!(matches!(
            of_operation("delete", &op),
            Some(ProviderError::Conflict { .. })
        ));
        let ok: Operation =
            serde_json::from_value(serde_json::json!({"name": "operation-2", "status": "DONE"}))
                .unwrap();
        assert_eq!(of_operation("insert", &ok), None);
    }
}
