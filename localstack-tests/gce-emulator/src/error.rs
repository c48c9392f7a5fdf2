//! GCE's error shapes: the JSON body of a failed call, and the `error` /
//! `httpErrorStatusCode` / `httpErrorMessage` of an operation that failed
//! while running.

use google_cloud_compute_v1::model as m;
use serde_json::{Value, json};

/// One error, as GCE reports it.
#[derive(Clone, Debug, PartialEq)]
pub struct ApiError {
    /// HTTP status.
    pub code: u16,
    /// `errors[0].reason` (`notFound`, `rateLimitExceeded`, ...).
    pub reason: String,
    /// `errors[0].domain` (`global`, `usageLimits`).
    pub domain: String,
    pub message: String,
    /// Also send `status` and a `google.rpc.ErrorInfo` in `details`, as
    /// Google's API front end does for some errors (quota). The client
    /// library then reports the ErrorInfo instead of `errors[]`.
    pub with_details: bool,
}

impl ApiError {
    pub fn new(code: u16, reason: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            code,
            reason: reason.to_string(),
            domain: "global".to_string(),
            message: message.into(),
            with_details: false,
        }
    }

    /// `The resource 'projects/p/zones/z/instances/i' was not found`.
    pub fn not_found(resource: &str) -> ApiError {
        ApiError::new(
            404,
            "notFound",
            format!("The resource '{resource}' was not found"),
        )
    }

    pub fn already_exists(resource: &str) -> ApiError {
        ApiError::new(
            409,
            "alreadyExists",
            format!("The resource '{resource}' already exists"),
        )
    }

    pub fn invalid(message: impl Into<String>) -> ApiError {
        ApiError::new(400, "invalid", message)
    }

    /// `Invalid value for field 'resource.x': 'v'. why`
    pub fn invalid_field(field: &str, value: &str, why: &str) -> ApiError {
        ApiError::invalid(format!(
            "Invalid value for field '{field}': '{value}'. {why}"
        ))
    }

    pub fn required(field: &str) -> ApiError {
        ApiError::new(
            400,
            "required",
            format!("Required field '{field}' not specified"),
        )
    }

    pub fn in_use(kind: &str, resource: &str, user: &str) -> ApiError {
        ApiError::new(
            400,
            "resourceInUseByAnotherResource",
            format!("The {kind} resource '{resource}' is already being used by '{user}'"),
        )
    }

    pub fn condition_not_met(message: impl Into<String>) -> ApiError {
        ApiError::new(412, "conditionNotMet", message)
    }

    pub fn rate_limited(message: impl Into<String>) -> ApiError {
        ApiError {
            domain: "usageLimits".to_string(),
            ..ApiError::new(403, "rateLimitExceeded", message)
        }
    }

    fn status_name(&self) -> &'static str {
        match self.code {
            400 => "INVALID_ARGUMENT",
            401 => "UNAUTHENTICATED",
            403 => "PERMISSION_DENIED",
            404 => "NOT_FOUND",
            409 => "ALREADY_EXISTS",
            412 => "FAILED_PRECONDITION",
            429 => "RESOURCE_EXHAUSTED",
            503 => "UNAVAILABLE",
            _ => "UNKNOWN",
        }
    }

    /// The body of a failed call:
    /// `{"error":{"code","message","errors":[{"message","domain","reason"}]}}`.
    pub fn body(&self) -> Value {
        let mut error = json!({
            "code": self.code,
            "message": self.message,
            "errors": [{
                "message": self.message,
                "domain": self.domain,
                "reason": self.reason,
            }],
        });
        if self.with_details {
            error["status"] = json!(self.status_name());
            error["details"] = json!([{
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": upper_snake(&self.reason),
                "domain": "googleapis.com",
                "metadata": {"service": "compute.googleapis.com"},
            }]);
        }
        json!({ "error": error })
    }

    /// GCE's code for the error inside an operation (`RESOURCE_NOT_FOUND`, ...).
    pub fn operation_code(&self) -> String {
        match self.reason.as_str() {
            "notFound" => "RESOURCE_NOT_FOUND".to_string(),
            "alreadyExists" => "RESOURCE_ALREADY_EXISTS".to_string(),
            "invalid" => "INVALID_FIELD_VALUE".to_string(),
            "resourceInUseByAnotherResource" => "RESOURCE_IN_USE_BY_ANOTHER_RESOURCE".to_string(),
            "conditionNotMet" => "CONDITION_NOT_MET".to_string(),
            other => upper_snake(other),
        }
    }

    /// Fills the error fields of a finished operation.
    pub fn fill_operation(&self, op: &mut m::Operation) {
        let mut item = m::operation::error::Errors::default();
        item.code = Some(self.operation_code());
        item.message = Some(self.message.clone());
        let mut error = m::operation::Error::default();
        error.errors = vec![item];
        op.error = Some(error);
        op.http_error_status_code = Some(i32::from(self.code));
        op.http_error_message = Some(reason_phrase(self.code).to_string());
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.code, self.reason, self.message)
    }
}

impl std::error::Error for ApiError {}

/// `rateLimitExceeded` -> `RATE_LIMIT_EXCEEDED`.
fn upper_snake(s: &str) -> String {
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

fn reason_phrase(code: u16) -> &'static str {
    match code {
        400 => "BAD REQUEST",
        403 => "FORBIDDEN",
        404 => "NOT FOUND",
        409 => "CONFLICT",
        412 => "PRECONDITION FAILED",
        429 => "TOO MANY REQUESTS",
        500 => "INTERNAL SERVER ERROR",
        503 => "SERVICE UNAVAILABLE",
        _ => "ERROR",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_shape() {
        let e = ApiError::rate_limited("Rate Limit Exceeded");
        let b = e.body();
        assert_eq!(b["error"]["code"], 403);
        assert_eq!(b["error"]["errors"][0]["reason"], "rateLimitExceeded");
        assert_eq!(b["error"]["errors"][0]["domain"], "usageLimits");
        assert!(b["error"].get("details").is_none());
        let b = ApiError {
            with_details: true,
            ..e
        }
        .body();
        assert_eq!(b["error"]["details"][0]["reason"], "RATE_LIMIT_EXCEEDED");
        assert_eq!(b["error"]["status"], "PERMISSION_DENIED");
    }

    #[test]
    fn operation_codes() {
        assert_eq!(
            ApiError::already_exists("x").operation_code(),
            "RESOURCE_ALREADY_EXISTS"
        );
        assert_eq!(
            ApiError::new(400, "ipSpaceExhausted", "").operation_code(),
            "IP_SPACE_EXHAUSTED"
        );
    }
}
